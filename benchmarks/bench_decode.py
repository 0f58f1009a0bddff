"""Decode speed of a DATALORA model: greedy tokens at batch 1 against the base and PEFT.

    python -m benchmarks.bench_decode [--out DIR] [--budget-s 20] [--hidden 128] [--layers 4]

Greedy decoding with a KV cache (a 24-token prompt, then ``--new-tokens`` single-token
steps), every method on the same randomly initialised embedded Mistral-shaped model
(``--hidden`` / ``--layers`` scale it), timed round-robin (one round = one whole greedy
generation of each method, prompt included), medians reported as ms per new token:

- ``base``: the base model alone;
- ``peft_lora``: one PEFT LoRA (rank 16, unmerged) on the same target modules;
- ``datalora_pruned``: ``get_datalora_model`` with the default config (8 experts, top-2,
  rank 16, shared saliency routing, token pruning over the second half of the layers) at
  retention 0.5, its keep threshold calibrated on 8 random sequences: a generated token
  below it skips the pruned layers;
- ``datalora_dense``: the same model with token pruning off.

At batch 1 every step is a one-token forward, so these times are host time: the Python
and op-dispatch cost of each layer, which is what a served model pays per token on a CPU
and what a GPU waits on unless the step is captured in a CUDA graph. Writes
``benchmarks/results/decode_cpu.json`` (``decode_cuda.json`` on a GPU) with each method's
median, the ratios to ``base`` and ``peft_lora`` (and ``datalora_pruned``'s to
``datalora_dense``) with their 95 % bootstrap intervals, and the fraction of the generated
tokens the pruned model kept.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from benchmarks.bench_tle import _greedy
from benchmarks.molora import _git_commit, budget_cli, parse_budget_cli, write_result
from benchmarks.timing import bootstrap_ci, time_interleaved
from datalora.cli import int_at_least
from datalora.experiments.run_info import cpu_model, package_version

SCHEMA = "datalora.benchmarks.decode/1"
PROMPT_TOKENS = 24
METHODS = ("base", "peft_lora", "datalora_pruned", "datalora_dense")


def _model(hidden: int, layers: int, seed: int = 0):
    from datalora.testing import build_tiny_model

    heads = hidden // 32
    return build_tiny_model(seed, hidden_size=hidden, intermediate_size=hidden * 344 // 128,
                            num_hidden_layers=layers, num_attention_heads=heads,
                            num_key_value_heads=max(1, heads // 2))


def model_size_cli(prog: str, doc: str, filename: str, min_layers: int) -> argparse.ArgumentParser:
    """A :func:`~benchmarks.molora.budget_cli` parser (20 s default budget) with ``--hidden``
    and ``--layers`` (at least ``min_layers``) of :func:`_model`; read it with
    :func:`parse_model_size_cli`."""
    parser = budget_cli(prog, doc, filename, 20.0, "seconds of timing rounds, at least 5 rounds")
    parser.add_argument("--hidden", type=int_at_least(32), default=128,
                        help="hidden size, a multiple of 32 (default: %(default)s)")
    parser.add_argument("--layers", type=int_at_least(min_layers), default=4,
                        help="decoder layers (default: %(default)s)")
    return parser


def parse_model_size_cli(parser: argparse.ArgumentParser,
                         argv: list[str] | None) -> argparse.Namespace:
    """Arguments of a :func:`model_size_cli` parser, ``--hidden`` a multiple of the head
    size 32 as :func:`_model` needs."""
    args = parse_budget_cli(parser, argv)
    if args.hidden % 32:
        parser.error(f"--hidden: expected a multiple of 32 (head size 32), got {args.hidden}")
    return args


def run_meta(device: torch.device, hidden: int, layers: int) -> dict:
    """The ``meta`` a run starts from: device, versions, commit, argv and model size."""
    sha, dirty = _git_commit()
    return dict(device=device.type, device_name=(torch.cuda.get_device_name(device)
                                                 if device.type == "cuda" else cpu_model()),
                cpu_threads=torch.get_num_threads(), torch=torch.__version__,
                transformers=package_version("transformers"),
                datalora=package_version("datalora"), git_commit=sha, git_dirty=dirty,
                argv=sys.argv[1:], hidden=hidden, layers=layers)


def ratio_columns(name: str, refs: tuple[str, ...], medians: dict[str, float],
                  times: dict[str, list[float]]) -> dict:
    """``vs_<ref>`` (median ratio) and ``vs_<ref>_ci95`` (bootstrap interval over the
    rounds) of method ``name`` against each of ``refs``."""
    columns = {}
    for ref in refs:
        columns[f"vs_{ref}"] = medians[name] / medians[ref]
        columns[f"vs_{ref}_ci95"] = bootstrap_ci(times,
                                                 lambda m, ref=ref: m[name] / m[ref])
    return columns


def build_methods(hidden: int, layers: int, device: torch.device) -> dict:
    """``name -> model`` (eval mode, on ``device``) of every method."""
    from peft import LoraConfig, get_peft_model

    from datalora import DATALORAConfig, get_datalora_model

    config = DATALORAConfig(target_retention=0.5)
    base = _model(hidden, layers).to(device)
    peft = get_peft_model(_model(hidden, layers).to(device),
                          LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha,
                                     target_modules=list(config.target_modules))).eval()
    datalora = get_datalora_model(_model(hidden, layers).to(device), config,
                                  verbose=False).eval()
    g = torch.Generator().manual_seed(1)
    calibration = torch.randint(4, base.config.vocab_size, (8, 64), generator=g).to(device)
    datalora.set_curriculum_state(retention=config.target_retention)  # as after training
    with torch.no_grad():
        datalora(input_ids=calibration)
        record = datalora.runtime.own_last
        datalora.runtime.calibrate(record.saliency.token_scores, record.valid)
    return {"base": base, "peft_lora": peft, "datalora": datalora}


def kept_fraction(model, prompt: torch.Tensor, new_tokens: int) -> float:
    """The fraction of the generated tokens (the single-token steps) that ran the pruned
    layers, in one greedy generation of the DATALORA ``model`` with pruning on."""
    kept = []

    def last_kept() -> bool:
        return bool(model.runtime.own_last.kept.reshape(-1)[-1])

    def before_step(step: int) -> None:
        if step >= 2:  # step 1 follows the prompt's forward, step s the (s-1)-th token's
            kept.append(last_kept())

    model.runtime.pruning_enabled = True
    _greedy(model, prompt, new_tokens, before_step)
    if new_tokens > 1:
        kept.append(last_kept())
    return sum(kept) / max(1, len(kept))


def _step(model, prompt: torch.Tensor, new_tokens: int, pruning: bool | None = None):
    def run():
        if pruning is not None:
            model.runtime.pruning_enabled = pruning
        _greedy(model, prompt, new_tokens)
    return run


@torch.no_grad()
def run(out: Path, *, budget_s: float = 20.0, hidden: int = 128, layers: int = 4,
        new_tokens: int = 32) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)  # the adapters' and saliency network's init: the same models per run
    models = build_methods(hidden, layers, device)
    g = torch.Generator().manual_seed(0)
    vocab = models["base"].config.vocab_size
    prompt = torch.randint(4, vocab, (1, PROMPT_TOKENS), generator=g).to(device)
    steps = {"base": _step(models["base"], prompt, new_tokens),
             "peft_lora": _step(models["peft_lora"], prompt, new_tokens),
             "datalora_pruned": _step(models["datalora"], prompt, new_tokens, True),
             "datalora_dense": _step(models["datalora"], prompt, new_tokens, False)}
    timed = time_interleaved(steps, device, budget_s, 5, 2000, order_seed=0)
    times = {name: res[5] for name, res in timed.items()}
    per_token = {name: timed[name][0] / new_tokens for name in METHODS}
    kept = kept_fraction(models["datalora"], prompt, new_tokens)
    rows = []
    for name in METHODS:
        row = dict(method=name, ms_per_token=per_token[name],
                   tokens_per_s=1e3 / per_token[name], rounds=timed[name][4])
        refs = ("base", "peft_lora", "datalora_dense") if name == "datalora_pruned" else (
            "base", "peft_lora")
        row.update(ratio_columns(name, tuple(ref for ref in refs if ref != name), per_token,
                                 times))
        rows.append(row)
    meta = dict(run_meta(device, hidden, layers), peft=package_version("peft"), batch=1,
                prompt_tokens=PROMPT_TOKENS, new_tokens=new_tokens,
                datalora_pruned_kept_fraction=kept)
    return write_result(out, SCHEMA, meta, rows, [])


def main(argv: list[str] | None = None) -> int:
    name = "decode_cuda.json" if torch.cuda.is_available() else "decode_cpu.json"
    parser = model_size_cli("python -m benchmarks.bench_decode", __doc__, name, min_layers=1)
    parser.add_argument("--new-tokens", type=int_at_least(1), default=32,
                        help="greedy steps after the prompt (default: %(default)s)")
    args = parse_model_size_cli(parser, argv)
    result = run(args.out / name, budget_s=args.budget_s, hidden=args.hidden,
                 layers=args.layers, new_tokens=args.new_tokens)
    for row in result["results"]:
        ratio = "" if row["method"] == "base" else f"  {row['vs_base']:.2f}x base"
        print(f"{row['method']:>16}: {row['ms_per_token']:7.2f} ms/token{ratio}")
    print(f"wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
