"""TITOK evidence: transfer a task LoRA between two tiny models with different tokenizers.

Source: the embedded tiny Mistral (vocab 1024, hidden 128, 4 layers; pretrained with
:func:`~datalora.testing.build_pretrained_tiny_model` unless ``--base random``) with a PEFT
LoRA trained on one task. Target: :data:`TARGET_KWARGS` (vocab 512, hidden 96, 3 layers,
pretrained the same way) with ``build_tokenizer(vocab_size=512)``. The source + LoRA
answers seed questions of the task (synthetic data, no labels used); the target gets a
fresh LoRA trained on (a) every synthetic token, (b) TITOK's selection (samples by mean
contrastive excess, then top tokens, aligned by character offsets). All are evaluated by
the response loss on the task's real eval rows (reported) and validation rows (tuning),
with the untuned target as reference. Writes
``benchmarks/results/titok_cpu.json``::

    python -m datalora.experiments.titok_evidence --task sort --seed-prompts 192 \
        --seeds 0 1 2 --real-data-baseline \
        --tune-keeps 0.5:0.5 0.75:0.75 0.9:0.9 1:0.8 0.8:1 0.9:0.6

The source adapter trains ``--source-steps`` steps (80 by default, as the LoRA-TLE task
adapters) on the task's train rows, the seed prompts among them. Excess-based filtering
needs a source that answers some seed prompts right and others wrong: at 80 steps the
tiny source answers almost none; on lookup 1200 steps give about two fifths (39 %).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from statistics import fmean, stdev
from typing import Any

import torch

from datalora.checks import check_int, check_number
from datalora.cli import check_output_file
from datalora.data import TASKS, load_instruction_dataset
from datalora.experiments.run_info import provenance
from datalora.experiments.task_adapters import BASES, WORK_DIR
from datalora.io import atomic_write_text

TARGET_KWARGS = dict(vocab_size=512, hidden_size=96, num_hidden_layers=3,
                     intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)


def response_loss(model: Any, tokenizer: Any, rows: list[dict[str, str]]) -> float:
    """Mean negative log-likelihood per response token (EOS included)."""
    from datalora.titok import response_log_probs

    lps = response_log_probs(model, tokenizer, rows)
    return float(-torch.cat(lps).mean())


def _evaluate(model: Any, tokenizer: Any, splits: dict[str, list[dict[str, str]]],
              name: str, losses: dict[str, dict[str, float]]) -> None:
    """Records ``losses[split][name]`` = response loss of ``model`` on each split's rows."""
    with torch.no_grad():
        for split, rows in splits.items():
            losses[split][name] = response_loss(model, tokenizer, rows)


def run(task: str = "reverse", *, base: str = "pretrained", source_adapter: str | None = None,
        adapter_dir: str = WORK_DIR, seed_prompts: int = 96,
        sample_keep: float = 0.5, token_keep: float = 0.5, steps: int = 60,
        source_steps: int | None = None,
        lr: float | None = None,
        adapter: str = "lora", eval_rows: int = 50, out: str | None = None,
        tune_keeps: Sequence[tuple[float, float]] = (), seeds: Sequence[int] = (0,),
        real_data_baseline: bool = False, progress: bool = True) -> dict[str, Any]:
    """Runs the transfer and every baseline; losses on the eval rows and validation rows.

    Seed prompts are the last ``seed_prompts`` train rows of ``task`` outside the validation
    split; ``eval_rows`` rows of the task's eval split (reported) and of its validation split
    (:func:`~datalora.testing.train_validation_split`, for tuning) are scored (50 = all).
    ``lr`` (target LoRA) defaults to the base's adapter rate
    (:data:`~datalora.experiments.task_adapters.ADAPTER_LR`). Each of ``seeds`` seeds its
    own synthetic sampling and target training; every target loss is reported per seed and
    as the mean over seeds, and the TITOK-minus-all-tokens difference as mean, standard
    deviation and wins. With ``tune_keeps`` (pairs ``(sample_keep, token_keep)``) the pair
    whose TITOK targets have the lowest validation loss averaged over the seeds replaces
    ``sample_keep`` / ``token_keep`` (one choice for all seeds); every pair is reported.
    """
    import peft

    from datalora.experiments.task_adapters import (
        ADAPTER_LR,
        ADAPTER_STEPS,
        build_base_model,
        task_rows,
        train_task_adapter,
    )
    from datalora.testing import build_tokenizer, train_validation_split
    from datalora.titok import (
        build_masked_examples,
        contrastive_excess,
        generate_synthetic,
        titok_transfer,
    )
    from datalora.titok.cli import load_peft_source

    if task not in TASKS:
        raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
    check_output_file("out", out or None)  # before the runs, not at the write after them
    for name, value in (("sample_keep", sample_keep), ("token_keep", token_keep),
                        *(("tune_keeps", v) for pair in tune_keeps for v in pair)):
        check_number(name, value, low=0, low_inclusive=False, high=1)
    seed_prompts = check_int("seed_prompts", seed_prompts, low=1)
    eval_rows = check_int("eval_rows", eval_rows, low=1)
    steps = check_int("steps", steps, low=1)
    source_steps = check_int("source_steps", ADAPTER_STEPS if source_steps is None
                             else source_steps, low=1)
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds: expected distinct seeds, at least one, got {seeds}")
    start = time.perf_counter()
    lr = ADAPTER_LR[base] if lr is None else lr
    src_tok = build_tokenizer()
    tgt_tok = build_tokenizer(vocab_size=TARGET_KWARGS["vocab_size"])
    if source_steps != ADAPTER_STEPS:  # not the LoRA-TLE evidence's cached task adapters
        adapter_dir = f"{adapter_dir}/steps-{source_steps}"
    folder = source_adapter or str(train_task_adapter(task, adapter_dir, base=base,
                                                      steps=source_steps, tokenizer=src_tok,
                                                      progress=progress))
    source = load_peft_source(build_base_model(base, progress=progress), folder)

    def fresh_target() -> Any:
        return build_base_model(base, 1, progress=progress, **TARGET_KWARGS)

    train = task_rows(task)
    splits = {"eval": [r for r in load_instruction_dataset("embedded", "eval")
                       if r["task"] == task][:eval_rows],
              "validation": [r for r in train_validation_split()[1]
                             if r["task"] == task][:eval_rows]}
    prompts = [{k: v for k, v in r.items() if k != "response"} for r in train[-seed_prompts:]]
    truth = [r["response"] for r in train[-seed_prompts:]]

    synthetic, scored = {}, {}
    for seed in seeds:
        synthetic[seed] = generate_synthetic(source, src_tok, prompts, seed=seed,
                                             progress=progress)
        scored[seed] = contrastive_excess(source, src_tok, synthetic[seed], progress=progress)

    def transfer(seed: int, sk: float, tk: float, show: bool) -> tuple[Any, dict]:
        return titok_transfer(source, src_tok, fresh_target(), tgt_tok, prompts,
                              sample_keep=sk, token_keep=tk, adapter=adapter, steps=steps,
                              lr=lr, seed=seed, synthetic=synthetic[seed],
                              scored=scored[seed], progress=show)

    tuning = []
    for sk, tk in tune_keeps:
        per_seed = []
        for seed in seeds:
            target, _ = transfer(seed, sk, tk, False)
            with torch.no_grad():
                per_seed.append(response_loss(target, tgt_tok, splits["validation"]))
        tuning.append({"sample_keep": sk, "token_keep": tk,
                       "validation_loss": fmean(per_seed), "validation_loss_per_seed": per_seed})
    if tuning:
        best = min(tuning, key=lambda r: r["validation_loss"])
        sample_keep, token_keep = best["sample_keep"], best["token_keep"]

    fixed: dict[str, dict[str, float]] = {split: {} for split in splits}
    _evaluate(source, src_tok, splits, "source_with_lora", fixed)
    with source.disable_adapter():
        _evaluate(source, src_tok, splits, "source_without_lora", fixed)
    _evaluate(fresh_target(), tgt_tok, splits, "target_untuned", fixed)
    settings = {"target_all_synthetic_tokens": (1.0, 1.0),
                "target_titok_selected": (sample_keep, token_keep),
                "target_titok_samples_only": (sample_keep, 1.0),
                "target_titok_tokens_only": (1.0, token_keep)}
    per_seed_losses: dict[int, dict[str, dict[str, float]]] = {}
    train_losses: dict[str, list[float]] = {name: [] for name in settings}
    synthetic_stats = []
    for seed in seeds:
        losses: dict[str, dict[str, float]] = {split: {} for split in splits}
        for name, (sk, tk) in settings.items():
            target, report = transfer(seed, sk, tk, progress)
            _evaluate(target, tgt_tok, splits, name, losses)
            train_losses[name].append(fmean(report["losses"][-5:]))
        per_seed_losses[seed] = losses
        _, sel = build_masked_examples(scored[seed], tgt_tok, sample_keep=sample_keep,
                                       token_keep=token_keep)
        kept = sel["kept_samples"]
        correct = [s["response"] == t for s, t in zip(synthetic[seed], truth, strict=True)]
        synthetic_stats.append({
            "exact_match_all": sum(correct) / len(correct),
            "exact_match_kept_samples": sum(correct[i] for i in kept) / max(len(kept), 1),
            "mean_excess_all": fmean([s.mean_excess for s in scored[seed]]),
            "token_fraction_labelled_titok": sel["token_fraction"]})
    if real_data_baseline:
        from datalora.data import tokenize_example as _tok_ex
        from datalora.titok.transfer import _attach_adapter, train_masked

        fresh = fresh_target()
        torch.manual_seed(seeds[0])
        target = _attach_adapter(fresh, adapter, 8, 16.0,
                                 ("q_proj", "v_proj", "o_proj", "up_proj", "down_proj"))
        examples = [_tok_ex(r, tgt_tok, 128) for r in train[:seed_prompts]]
        train_masked(target, tgt_tok, examples, steps=steps, lr=lr, seed=seeds[0],
                     progress=progress)
        _evaluate(target, tgt_tok, splits, "target_real_labels_upper_bound", fixed)

    def averaged(split: str) -> dict[str, float]:
        """Seed-independent losses plus each trained target's mean over the seeds."""
        return {**fixed[split], **{name: fmean([per_seed_losses[s][split][name] for s in seeds])
                                   for name in settings}}

    ev = averaged("eval")
    diffs = [per_seed_losses[s]["eval"]["target_titok_selected"]
             - per_seed_losses[s]["eval"]["target_all_synthetic_tokens"] for s in seeds]
    result = {
        "device": "cpu", "torch": torch.__version__, "peft": peft.__version__,
        "python": platform.python_version(), **provenance(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": {"task": task, "base": base,
                   "source": "embedded tiny Mistral (vocab 1024, h128, 4 layers)",
                   "target": TARGET_KWARGS, "target_tokenizer_vocab": len(tgt_tok),
                   "source_adapter": folder,
                   "source_steps": None if source_adapter else source_steps,
                   "seed_prompts": seed_prompts,
                   "sample_keep": sample_keep, "token_keep": token_keep,
                   "target_adapter": adapter, "train_steps": steps, "lr": lr, "seeds": seeds,
                   "eval_rows": len(splits["eval"]),
                   "validation_rows": len(splits["validation"])},
        "validation_tuning": tuning,
        "eval_loss": ev,
        "validation_loss": averaged("validation"),
        "eval_loss_per_seed": {str(s): per_seed_losses[s]["eval"] for s in seeds},
        "titok_minus_all_tokens": {"eval_per_seed": diffs, "mean": fmean(diffs),
                                   "std": stdev(diffs) if len(diffs) > 1 else 0.0,
                                   "titok_wins": sum(d < 0 for d in diffs),
                                   "seeds": len(diffs)},
        "synthetic": {
            **{k: fmean([st[k] for st in synthetic_stats]) for k in synthetic_stats[0]},
            "examples": [{"question": s["question"], "response": s["response"], "truth": t}
                         for s, t in list(zip(synthetic[seeds[0]], truth, strict=True))[:5]]},
        "final_train_loss": {k: fmean(v) for k, v in train_losses.items()},
        "titok_beats_all_tokens": ev["target_titok_selected"]
        < ev["target_all_synthetic_tokens"],
        "titok_beats_untuned": ev["target_titok_selected"] < ev["target_untuned"],
        "seconds": time.perf_counter() - start,
    }
    if out:
        atomic_write_text(out, json.dumps(result, indent=1))
    return result


def _keep_pair(text: str) -> tuple[float, float]:
    """An argparse ``type``: ``SAMPLE:TOKEN`` keep fractions."""
    try:
        sample, token = (float(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SAMPLE:TOKEN keep fractions such as "
                                         f"0.5:0.75, got {text!r}") from None
    return sample, token


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m datalora.experiments.titok_evidence",
                                description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=TASKS, default="reverse")
    p.add_argument("--base", choices=BASES, default="pretrained")
    p.add_argument("--adapter-dir", default=WORK_DIR)
    p.add_argument("--seed-prompts", type=int, default=96)
    p.add_argument("--sample-keep", type=float, default=0.5)
    p.add_argument("--token-keep", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=60, help="target LoRA training steps")
    p.add_argument("--source-steps", type=int, default=None,
                   help="training steps of the source task adapter, batch 8 (default: "
                        "ADAPTER_STEPS of datalora.experiments.task_adapters, 80)")
    p.add_argument("--lr", type=float, default=None, help="default: by base (ADAPTER_LR)")
    p.add_argument("--adapter", choices=("lora", "molora"), default="lora")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="one run per seed (synthetic sampling + target training); losses "
                        "are averaged and the TITOK - all-tokens difference reported per seed")
    p.add_argument("--eval-rows", type=int, default=50,
                   help="rows of the task's eval and validation splits scored (50 = all)")
    p.add_argument("--tune-keeps", type=_keep_pair, nargs="*", default=[],
                   metavar="SAMPLE:TOKEN",
                   help="choose (sample_keep, token_keep) among these by the validation loss")
    p.add_argument("--real-data-baseline", action="store_true")
    p.add_argument("--out", default="benchmarks/results/titok_cpu.json")
    args = p.parse_args(argv)
    result = run(args.task, base=args.base, adapter_dir=args.adapter_dir,
                 seed_prompts=args.seed_prompts, sample_keep=args.sample_keep,
                 token_keep=args.token_keep, steps=args.steps,
                 source_steps=args.source_steps, lr=args.lr,
                 adapter=args.adapter, out=args.out, real_data_baseline=args.real_data_baseline,
                 seeds=args.seeds, eval_rows=args.eval_rows,
                 tune_keeps=args.tune_keeps)
    for name, value in result["eval_loss"].items():
        print(f"{name:>32}: eval loss {value:.3f}  validation "
              f"{result['validation_loss'][name]:.3f}")
    diff = result["titok_minus_all_tokens"]
    print(f"TITOK - all tokens (eval): {diff['mean']:+.3f} +- {diff['std']:.3f} over "
          f"{diff['seeds']} seeds, TITOK wins {diff['titok_wins']}")
    print(json.dumps(result["synthetic"], indent=1)[:1500])


if __name__ == "__main__":
    main()
