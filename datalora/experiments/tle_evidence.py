"""LoRA-TLE evidence on the embedded default: token-level mix vs single adapters vs prompt mix.

Trains (or reuses) one PEFT LoRA per embedded task, builds a
:class:`~datalora.tle.TokenLevelAdapterMixer`, and reports the eval loss per task of

- each single adapter (one-hot weights: exactly that PEFT adapter),
- the uniform mix, the prompt-level mix (routing once per prompt),
- the token-level mix (every token) and every-other-token,

plus how often the routing's top adapter is the row's task. Writes
``benchmarks/results/tle_eval_cpu.json``::

    python -m datalora.experiments.tle_evidence --adapters /tmp/task_adapters
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


def run(adapter_dir: str, *, steps: int = 80, tau: float = 0.02, embed_layer: int = 0,
        per_task: int = 24, centroid_prompts: int = 32, out: str | None = None,
        progress: bool = True) -> dict[str, Any]:
    from datalora.experiments.task_adapters import ADAPTER_SPECS, train_task_adapters
    from datalora.testing import build_tiny_model, build_tokenizer
    from datalora.tle import HiddenStateEmbedder, TokenLevelAdapterMixer

    start = time.perf_counter()
    folders = train_task_adapters(adapter_dir, steps=steps, progress=progress)
    tokenizer = build_tokenizer()
    mixer = TokenLevelAdapterMixer(build_tiny_model(), list(folders.values()), names=list(folders),
                                   tau=tau, mode="token",
                                   embedder=HiddenStateEmbedder(embed_layer))
    train = load_instruction_dataset("embedded", "train")
    mixer.fit_centroids({t: [format_prompt(r) for r in train if r["task"] == t]
                         [-centroid_prompts:] for t in TASKS}, tokenizer)
    eval_rows = load_instruction_dataset("embedded", "eval")
    N = len(TASKS)
    results: dict[str, Any] = {}
    for i, task in enumerate(TASKS):
        onehot = [1.0 if j == i else 0.0 for j in range(N)]
        results[f"single:{task}"] = eval_loss_by_task(mixer, tokenizer, eval_rows,
                                                      per_task=per_task, weights=onehot)
    results["uniform"] = eval_loss_by_task(mixer, tokenizer, eval_rows, per_task=per_task,
                                           weights=[1.0 / N] * N)
    routing: dict[str, dict[str, list[float]]] = {}
    for label, mode in (("prompt_level", "prompt"), ("every_token", "token"),
                        ("every_other_token", "every_n")):
        mixer.mode, mixer.every_n = mode, 2
        routing[label] = {}
        results[label] = eval_loss_by_task(mixer, tokenizer, eval_rows, per_task=per_task,
                                           routing_stats=routing[label], progress=progress)
    oracle = {t: results[f"single:{t}"][t] for t in TASKS}
    oracle["mean"] = sum(oracle.values()) / N
    results["oracle_own_adapter"] = oracle
    best_single = min((k for k in results if k.startswith("single:")),
                      key=lambda k: results[k]["mean"])
    summary = {
        "device": "cpu", "torch": torch.__version__, "python": platform.python_version(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": {"adapter_dir": str(adapter_dir), "train_steps": steps, "tau": tau,
                   "embed_layer": embed_layer, "eval_rows_per_task": per_task,
                   "centroid_prompts_per_task": centroid_prompts,
                   "adapters": {t: {"rank": s[0], "alpha": s[1], "targets": list(s[2])}
                                for t, s in ADAPTER_SPECS.items()}},
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
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--tau", type=float, default=0.02)
    p.add_argument("--embed-layer", type=int, default=0)
    p.add_argument("--per-task", type=int, default=24)
    p.add_argument("--out", default="benchmarks/results/tle_eval_cpu.json")
    args = p.parse_args(argv)
    summary = run(args.adapters, steps=args.steps, tau=args.tau, embed_layer=args.embed_layer,
                  per_task=args.per_task, out=args.out)
    print(f"{'setting':>22} " + " ".join(f"{t:>10}" for t in (*TASKS, "mean")))
    for label, losses in summary["eval_loss"].items():
        print(f"{label:>22} " + " ".join(f"{losses[t]:10.3f}" for t in (*TASKS, "mean")))
    for label, stats in summary["mean_routing_weights_on_response"].items():
        print(f"routing {label}: " + "; ".join(
            f"{t}->[{', '.join(f'{w:.2f}' for w in ws)}]" for t, ws in stats.items()))


if __name__ == "__main__":
    main()
