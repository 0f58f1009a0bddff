"""LoRA-TLE evidence on the embedded default: token-level mix vs single adapters vs prompt mix.

Trains (or reuses) one PEFT LoRA per embedded task on the pretrained tiny base (or the
random one, ``--base random``), builds a
:class:`~datalora.tle.TokenLevelAdapterMixer`, and reports the eval loss per task of

- each single adapter (one-hot weights: exactly that PEFT adapter),
- the uniform mix, the prompt-level mix (routing once per prompt),
- the token-level mix (every token) and every-other-token,

plus the mean routing weights per task, on the eval split and on the validation rows
carved from the train split (which alone choose tau and the embedding layer). Writes
``benchmarks/results/tle_eval_cpu.json``::

    python -m datalora.experiments.tle_evidence --tune-taus 0.01 0.02 0.05 0.1 0.2 \
        --tune-embed-layers 0 2 4
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import torch
from tqdm.auto import tqdm

from datalora.data import TASKS, CausalLMCollator, format_prompt, load_instruction_dataset
from datalora.data import tokenize_example as _tokenize
from datalora.experiments.task_adapters import BASES
from datalora.io import atomic_write_text


@torch.no_grad()
def eval_loss_by_task(mixer: Any, tokenizer: Any, rows: Sequence[dict[str, str]], *,
                      per_task: int | None = None, weights: Any = None, batch_size: int = 16,
                      max_length: int = 128, progress: bool = False,
                      routing_stats: dict[str, list[float]] | None = None) -> dict[str, float]:
    """Mean response-token loss per task of ``mixer`` (token-weighted within a task).

    Args:
        mixer: a :class:`~datalora.tle.TokenLevelAdapterMixer`.
        rows: eval rows with a ``task`` column; ``per_task`` keeps the first rows per task.
        weights: fixed ``[N]`` weights (None: the mixer's routing).
        routing_stats: filled with ``{task: mean weights [N] over response positions}``.

    Returns:
        ``{task: loss}`` and ``"mean"``: the mean over tasks.
    """
    grouped: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        group = grouped.setdefault(row["task"], [])
        if per_task is None or len(group) < per_task:
            group.append(row)
    collate = CausalLMCollator(tokenizer=tokenizer)
    result: dict[str, float] = {}
    for task, group in tqdm(grouped.items(), desc="eval", disable=not progress, leave=False):
        total, count = 0.0, 0
        wsum, wcount = None, 0
        for i in range(0, len(group), batch_size):
            batch = collate([_tokenize(r, tokenizer, max_length) for r in group[i:i + batch_size]])
            batch = {k: v.to(mixer.device) for k, v in batch.items()}
            labels = batch["labels"]
            out = mixer(batch["input_ids"], batch["attention_mask"], labels=None,
                        prompt_lengths=_prompt_lengths(labels), weights=weights)
            logits = out.logits[:, :-1].float()
            target = labels[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                     target.reshape(-1), ignore_index=-100,
                                                     reduction="sum")
            n = int((target != -100).sum())
            total, count = total + float(loss), count + n
            if routing_stats is not None and mixer.last_weights is not None:
                pos = target != -100  # positions predicting response tokens
                w = mixer.last_weights[:, :-1][pos]
                wsum = w.sum(0) if wsum is None else wsum + w.sum(0)
                wcount += w.shape[0]
        result[task] = total / max(count, 1)
        if routing_stats is not None and wsum is not None:
            routing_stats[task] = (wsum / wcount).tolist()
    result["mean"] = sum(result[t] for t in grouped) / len(grouped)
    return result


def _prompt_lengths(labels: torch.Tensor) -> torch.Tensor:
    valid = labels != -100
    L = labels.shape[1]
    first = torch.where(valid.any(1), valid.float().argmax(1), torch.full_like(valid[:, 0], L,
                                                                               dtype=torch.long))
    return first.long().clamp(1, L)


def build_mixer(adapter_dir: str, *, base: str = "pretrained", steps: int = 80,
                tau: float = 0.02, embed_layer: int = 0, centroid_prompts: int = 32,
                progress: bool = True) -> tuple[Any, Any, dict[str, list[str]]]:
    """Trains (or reuses) the task adapters on ``base`` and mixes them.

    Centroids come from the last ``centroid_prompts`` training prompts of each task (never
    validation or eval rows).

    Returns:
        ``(mixer, tokenizer, centroid prompts {task: [prompt]})``.
    """
    from datalora.experiments.task_adapters import build_base_model, task_rows, train_task_adapters
    from datalora.testing import build_tokenizer
    from datalora.tle import HiddenStateEmbedder, TokenLevelAdapterMixer

    folders = train_task_adapters(adapter_dir, base=base, steps=steps, progress=progress)
    tokenizer = build_tokenizer()
    mixer = TokenLevelAdapterMixer(build_base_model(base, progress=progress),
                                   list(folders.values()), names=list(folders), tau=tau,
                                   mode="token", embedder=HiddenStateEmbedder(embed_layer))
    prompts = {t: [format_prompt(r) for r in task_rows(t)][-centroid_prompts:] for t in TASKS}
    mixer.fit_centroids(prompts, tokenizer)
    return mixer, tokenizer, prompts


def evaluate_settings(mixer: Any, tokenizer: Any, rows: Sequence[dict[str, str]], *,
                      per_task: int, progress: bool = False
                      ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, list[float]]]]:
    """Eval loss per task of each single adapter, the uniform mix and the three routing modes.

    Returns:
        ``(losses {setting: {task: loss, "mean": ...}}, routing {mode: {task: weights [N]}})``;
        settings ``single:<task>``, ``uniform``, ``prompt_level``, ``every_token``,
        ``every_other_token`` and ``oracle_own_adapter`` (each task with its own adapter).
    """
    N = len(TASKS)
    results: dict[str, dict[str, float]] = {}
    for i, task in enumerate(TASKS):
        onehot = [1.0 if j == i else 0.0 for j in range(N)]
        results[f"single:{task}"] = eval_loss_by_task(mixer, tokenizer, rows,
                                                      per_task=per_task, weights=onehot)
    results["uniform"] = eval_loss_by_task(mixer, tokenizer, rows, per_task=per_task,
                                           weights=[1.0 / N] * N)
    routing: dict[str, dict[str, list[float]]] = {}
    for label, mode in (("prompt_level", "prompt"), ("every_token", "token"),
                        ("every_other_token", "every_n")):
        mixer.mode, mixer.every_n = mode, 2
        routing[label] = {}
        results[label] = eval_loss_by_task(mixer, tokenizer, rows, per_task=per_task,
                                           routing_stats=routing[label], progress=progress)
    oracle = {t: results[f"single:{t}"][t] for t in TASKS}
    oracle["mean"] = sum(oracle.values()) / N
    results["oracle_own_adapter"] = oracle
    return results, routing


def tune(mixer: Any, tokenizer: Any, rows: Sequence[dict[str, str]],
         prompts: dict[str, list[str]], *, taus: Sequence[float], embed_layers: Sequence[int],
         per_task: int, progress: bool = True) -> list[dict[str, Any]]:
    """Token-level (every token) mean loss on ``rows`` for every ``(tau, embed_layer)``.

    Meant for validation rows. Centroids are refitted from ``prompts`` per embed layer.
    Returns one ``{tau, embed_layer, every_token, prompt_level}`` record per pair (mean
    losses).
    """
    from datalora.tle import HiddenStateEmbedder

    records = []
    for layer in embed_layers:
        mixer.embedder = HiddenStateEmbedder(layer)
        mixer.fit_centroids(prompts, tokenizer)
        for tau in tqdm(taus, desc=f"tuning (layer {layer})", disable=not progress):
            mixer.tau = tau
            record: dict[str, Any] = {"tau": tau, "embed_layer": layer}
            for label, mode in (("every_token", "token"), ("prompt_level", "prompt")):
                mixer.mode = mode
                record[label] = eval_loss_by_task(mixer, tokenizer, rows,
                                                  per_task=per_task)["mean"]
            records.append(record)
    return records


def run(adapter_dir: str, *, base: str = "pretrained", steps: int = 80, tau: float = 0.02,
        embed_layer: int = 0, per_task: int = 24, centroid_prompts: int = 32,
        taus: Sequence[float] = (), embed_layers: Sequence[int] = (), out: str | None = None,
        progress: bool = True) -> dict[str, Any]:
    """Evaluates every setting on the eval split (and the validation split).

    With ``taus`` / ``embed_layers``, ``tau`` and ``embed_layer`` are first chosen by the
    lowest every-token mean loss on the validation rows
    (:func:`~datalora.testing.train_validation_split`); the eval rows are only reported.
    """
    from datalora.experiments.task_adapters import ADAPTER_SPECS
    from datalora.testing import train_validation_split
    from datalora.tle import HiddenStateEmbedder

    start = time.perf_counter()
    mixer, tokenizer, prompts = build_mixer(adapter_dir, base=base, steps=steps, tau=tau,
                                      embed_layer=embed_layer,
                                      centroid_prompts=centroid_prompts, progress=progress)
    validation = train_validation_split()[1]
    grid: list[dict[str, Any]] = []
    if taus or embed_layers:
        grid = tune(mixer, tokenizer, validation, prompts, taus=list(taus) or [tau],
                    embed_layers=list(embed_layers) or [embed_layer], per_task=per_task,
                    progress=progress)
        best = min(grid, key=lambda r: r["every_token"])
        tau, embed_layer = best["tau"], best["embed_layer"]
        mixer.embedder = HiddenStateEmbedder(embed_layer)
        mixer.fit_centroids(prompts, tokenizer)
    mixer.tau = tau
    val_results, _ = evaluate_settings(mixer, tokenizer, validation, per_task=per_task)
    results, routing = evaluate_settings(mixer, tokenizer,
                                         load_instruction_dataset("embedded", "eval"),
                                         per_task=per_task, progress=progress)
    best_single = min((k for k in results if k.startswith("single:")),
                      key=lambda k: results[k]["mean"])
    summary = {
        "device": "cpu", "torch": torch.__version__, "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": {"base": base, "adapter_dir": str(adapter_dir), "train_steps": steps,
                   "tau": tau, "embed_layer": embed_layer, "eval_rows_per_task": per_task,
                   "centroid_prompts_per_task": centroid_prompts,
                   "adapters": {t: {"rank": s[0], "alpha": s[1], "targets": list(s[2])}
                                for t, s in ADAPTER_SPECS.items()}},
        "validation_tuning": grid,
        "validation_loss": val_results,
        "eval_loss": results,
        "mean_routing_weights_on_response": routing,
        "best_single_adapter": best_single,
        "token_mix_beats_best_single": results["every_token"]["mean"]
        < results[best_single]["mean"],
        "token_mix_beats_prompt_mix": results["every_token"]["mean"]
        < results["prompt_level"]["mean"],
        "seconds": time.perf_counter() - start,
    }
    if out:
        atomic_write_text(out, json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapters", default="/tmp/datalora_work/task_adapters")
    p.add_argument("--base", choices=BASES, default="pretrained")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--tau", type=float, default=0.02)
    p.add_argument("--embed-layer", type=int, default=0)
    p.add_argument("--tune-taus", type=float, nargs="*", default=[],
                   help="choose tau among these by the validation loss")
    p.add_argument("--tune-embed-layers", type=int, nargs="*", default=[],
                   help="choose the embed layer among these by the validation loss")
    p.add_argument("--per-task", type=int, default=24)
    p.add_argument("--out", default="benchmarks/results/tle_eval_cpu.json")
    args = p.parse_args(argv)
    summary = run(args.adapters, base=args.base, steps=args.steps, tau=args.tau,
                  embed_layer=args.embed_layer, per_task=args.per_task,
                  taus=args.tune_taus, embed_layers=args.tune_embed_layers, out=args.out)
    print(f"{'setting':>22} " + " ".join(f"{t:>10}" for t in (*TASKS, "mean")))
    for label, losses in summary["eval_loss"].items():
        print(f"{label:>22} " + " ".join(f"{losses[t]:10.3f}" for t in (*TASKS, "mean")))
    for label, stats in summary["mean_routing_weights_on_response"].items():
        print(f"routing {label}: " + "; ".join(
            f"{t}->[{', '.join(f'{w:.2f}' for w in ws)}]" for t, ws in stats.items()))


if __name__ == "__main__":
    main()
