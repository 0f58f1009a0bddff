"""TITOK evidence: transfer a task LoRA between two tiny models with different tokenizers.

Source: the embedded tiny Mistral (vocab 1024, hidden 128, 4 layers) with a PEFT LoRA
trained on one task. Target: ``build_tiny_model(vocab_size=512, hidden_size=96,
num_hidden_layers=3)`` with ``build_tokenizer(vocab_size=512)``. The source + LoRA answers
seed questions of the task (synthetic data, no labels used); the target gets a fresh LoRA
trained on (a) every synthetic token, (b) TITOK's selection (samples by mean contrastive
excess, then top tokens, aligned by character offsets). All are evaluated by the response
loss on the task's real eval rows, with the untuned target as reference. Writes
``benchmarks/results/titok_cpu.json``::

    python -m datalora.experiments.titok_evidence --task reverse
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import datetime, timezone
from typing import Any

import torch

from datalora.data import TASKS, load_instruction_dataset
from datalora.io import atomic_write_text

TARGET_KWARGS = dict(vocab_size=512, hidden_size=96, num_hidden_layers=3,
                     intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)


def response_loss(model: Any, tokenizer: Any, rows: list[dict[str, str]]) -> float:
    """Mean negative log-likelihood per response token (EOS included)."""
    from datalora.titok import response_log_probs

    lps = response_log_probs(model, tokenizer, rows)
    return float(-torch.cat(lps).mean())


def run(task: str = "reverse", *, source_adapter: str | None = None,
        adapter_dir: str = "/tmp/datalora_work/task_adapters", seed_prompts: int = 96,
        sample_keep: float = 0.5, token_keep: float = 0.5, steps: int = 60,
        adapter: str = "lora", eval_rows: int = 32, out: str | None = None,
        real_data_baseline: bool = False, progress: bool = True) -> dict[str, Any]:
    import peft

    from datalora.experiments.task_adapters import train_task_adapter
    from datalora.testing import build_tiny_model, build_tokenizer
    from datalora.titok import (
        build_masked_examples,
        contrastive_excess,
        generate_synthetic,
        titok_transfer,
    )

    if task not in TASKS:
        raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
    start = time.perf_counter()
    src_tok = build_tokenizer()
    tgt_tok = build_tokenizer(vocab_size=512)
    folder = source_adapter or str(train_task_adapter(task, adapter_dir, tokenizer=src_tok,
                                                      progress=progress))
    source = peft.PeftModel.from_pretrained(build_tiny_model(), folder).eval()
    train = [r for r in load_instruction_dataset("embedded", "train") if r["task"] == task]
    evals = [r for r in load_instruction_dataset("embedded", "eval")
             if r["task"] == task][:eval_rows]
    seeds = [{k: v for k, v in r.items() if k != "response"} for r in train[-seed_prompts:]]
    truth = [r["response"] for r in train[-seed_prompts:]]

    synthetic = generate_synthetic(source, src_tok, seeds, progress=progress)
    scored = contrastive_excess(source, src_tok, synthetic)
    correct = [s["response"] == t for s, t in zip(synthetic, truth, strict=True)]
    _, sel = build_masked_examples(scored, tgt_tok, sample_keep=sample_keep,
                                   token_keep=token_keep)
    kept = sel["kept_samples"]

    losses: dict[str, float] = {}
    with torch.no_grad():
        losses["source_with_lora"] = response_loss(source, src_tok, evals)
        with source.disable_adapter():
            losses["source_without_lora"] = response_loss(source, src_tok, evals)
        losses["target_untuned"] = response_loss(build_tiny_model(seed=1, **TARGET_KWARGS),
                                                 tgt_tok, evals)
    train_losses: dict[str, list[float]] = {}
    settings = {"target_all_synthetic_tokens": (1.0, 1.0),
                "target_titok_selected": (sample_keep, token_keep),
                "target_titok_samples_only": (sample_keep, 1.0),
                "target_titok_tokens_only": (1.0, token_keep)}
    for name, (sk, tk) in settings.items():
        target, report = titok_transfer(source, src_tok, build_tiny_model(seed=1, **TARGET_KWARGS),
                                        tgt_tok, seeds, sample_keep=sk, token_keep=tk,
                                        adapter=adapter, steps=steps, synthetic=synthetic,
                                        scored=scored, progress=progress)
        with torch.no_grad():
            losses[name] = response_loss(target, tgt_tok, evals)
        train_losses[name] = report["losses"]
    if real_data_baseline:
        from datalora.data import tokenize_example as _tok_ex
        from datalora.titok import _attach_adapter, train_masked

        target = _attach_adapter(build_tiny_model(seed=1, **TARGET_KWARGS), adapter, 8, 16.0,
                                 ("q_proj", "v_proj", "o_proj", "up_proj", "down_proj"))
        examples = [_tok_ex(r, tgt_tok, 128) for r in train[:seed_prompts]]
        train_masked(target, tgt_tok, examples, steps=steps, progress=progress)
        with torch.no_grad():
            losses["target_real_labels_upper_bound"] = response_loss(target, tgt_tok, evals)
    result = {
        "device": "cpu", "torch": torch.__version__, "peft": peft.__version__,
        "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": {"task": task, "source": "embedded tiny Mistral (vocab 1024, h128, 4 layers)",
                   "target": TARGET_KWARGS, "target_tokenizer_vocab": len(tgt_tok),
                   "source_adapter": folder, "seed_prompts": seed_prompts,
                   "sample_keep": sample_keep, "token_keep": token_keep,
                   "target_adapter": adapter, "train_steps": steps, "eval_rows": len(evals)},
        "eval_loss": losses,
        "synthetic": {
            "exact_match_all": sum(correct) / len(correct),
            "exact_match_kept_samples": sum(correct[i] for i in kept) / max(len(kept), 1),
            "mean_excess_all": sum(s.mean_excess for s in scored) / len(scored),
            "token_fraction_labelled_titok": sel["token_fraction"],
            "examples": [{"question": s["question"], "response": s["response"], "truth": t}
                         for s, t in list(zip(synthetic, truth, strict=True))[:5]]},
        "final_train_loss": {k: sum(v[-5:]) / len(v[-5:]) for k, v in train_losses.items()},
        "titok_beats_all_tokens": losses["target_titok_selected"]
        < losses["target_all_synthetic_tokens"],
        "titok_beats_untuned": losses["target_titok_selected"] < losses["target_untuned"],
        "seconds": time.perf_counter() - start,
    }
    if out:
        atomic_write_text(out, json.dumps(result, indent=1))
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=TASKS, default="reverse")
    p.add_argument("--adapter-dir", default="/tmp/datalora_work/task_adapters")
    p.add_argument("--seed-prompts", type=int, default=96)
    p.add_argument("--sample-keep", type=float, default=0.5)
    p.add_argument("--token-keep", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--adapter", choices=("lora", "molora"), default="lora")
    p.add_argument("--real-data-baseline", action="store_true")
    p.add_argument("--out", default="benchmarks/results/titok_cpu.json")
    args = p.parse_args(argv)
    result = run(args.task, adapter_dir=args.adapter_dir, seed_prompts=args.seed_prompts,
                 sample_keep=args.sample_keep, token_keep=args.token_keep, steps=args.steps,
                 adapter=args.adapter, out=args.out, real_data_baseline=args.real_data_baseline)
    for name, value in result["eval_loss"].items():
        print(f"{name:>32}: eval loss {value:.3f}")
    print(json.dumps(result["synthetic"], indent=1)[:1500])


if __name__ == "__main__":
    main()
