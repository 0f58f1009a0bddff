"""DATALORA evidence: eval loss at 50 % retention vs dense MoLoRA, and expert specialisation.

On the embedded multi-task data, with the same steps, seed, batch, learning rate and
curriculum (``train_datalora``, ``curriculum_mode="steps"``), trains

* **dense MoLoRA**: the same shared-routing model (USN router + rank scale + MoLoRA)
  with ``target_retention = 1.0``, i.e. retention 1.0 throughout (no token is ever
  pruned; tau is annealed and routing hardened exactly as in DATALORA), and
* **DATALORA**: ``target_retention = 0.5`` (layers 1..3 of the tiny model pruned),

then reports the eval loss of each (DATALORA with pruning on at its calibrated keep
threshold, and also at per-sequence top-k with retention 0.5, and dense), the ratio
DATALORA / dense (target <= 1.05), and the expert load per task on the eval rows with two
specialisation scores: the mean over tasks of the largest expert share (uniform = 1/E)
and the mean pairwise Jensen-Shannon divergence between the tasks' load distributions
(bits, 0 = identical, 1 = disjoint), next to the same model's JSD at initialisation (its
routing differs by task already, as the tasks' tokens do: the reference training must beat)
and the JSD chance gives (the rows' task labels permuted, :func:`permutation_null`). A
router that looked at the token alone would load the experts differently by task too, as
the tasks use different tokens: :func:`lexical_jsd` gives the JSD of the same router's
routes pooled per token id, the part of the specialisation token identity explains. All
over every real token and over the answer tokens alone: the tasks share the prompt template
and the EOS that ends each answer, whose tokens route alike whatever the task.
Writes ``datalora_eval_<tag>.json`` + ``.png`` into
``benchmarks/results/`` under the current directory (``--out`` picks another)::

    python -m datalora.experiments.datalora_eval            # ~5 min on 2 CPU cores
    python -m datalora.experiments.datalora_eval --steps 6 --out /tmp/x --tag smoke
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from datalora.cli import check_output_folder, int_at_least, positive_float
from datalora.experiments.run_info import provenance
from datalora.io import atomic_write_text, save_figure

SCHEMA = "datalora.experiments.datalora_eval/2"
RESULTS_DIR = Path("benchmarks") / "results"
"""Default output folder, relative to the current directory (as the TLE and TITOK evidence
scripts'), so an installed datalora never writes into site-packages."""
TARGET_RATIO = 1.05


# ---------------------------------------------------------------------------- metrics

def _normalise(load: Sequence[float]) -> list[float]:
    total = float(sum(load))
    if total <= 0:
        raise ValueError(f"load: expected a non-negative distribution with a positive sum, "
                         f"got {list(load)}")
    return [float(v) / total for v in load]


def jensen_shannon(p: Sequence[float], q: Sequence[float]) -> float:
    """Jensen-Shannon divergence of two distributions, in bits (0 .. 1)."""
    if len(p) != len(q):
        raise ValueError(f"q: expected {len(p)} entries like p, got {len(q)}")
    p, q = _normalise(p), _normalise(q)
    m = [(a + b) / 2 for a, b in zip(p, q, strict=True)]

    def kl(a: list[float], b: list[float]) -> float:
        return sum(x * math.log2(x / y) for x, y in zip(a, b, strict=True) if x > 0)

    return max(0.5 * kl(p, m) + 0.5 * kl(q, m), 0.0)


def specialisation(task_load: dict[str, Sequence[float]]) -> dict[str, Any]:
    """Scores of how differently tasks use the experts.

    Args:
        task_load: ``{task: load [E]}`` (shares of routes, or counts).

    Returns:
        ``max_share_mean``: mean over tasks of the largest expert share (uniform: 1/E);
        ``jsd_mean``: mean pairwise Jensen-Shannon divergence (bits); ``top_expert``:
        ``{task: expert}``; ``uniform_share``: 1/E.
    """
    if not task_load:
        raise ValueError("task_load: expected at least one task")
    loads = {t: _normalise(v) for t, v in task_load.items()}
    num_experts = len(next(iter(loads.values())))
    pairs = list(itertools.combinations(sorted(loads), 2))
    jsd = [jensen_shannon(loads[a], loads[b]) for a, b in pairs]
    return {"max_share_mean": sum(max(v) for v in loads.values()) / len(loads),
            "jsd_mean": sum(jsd) / len(jsd) if jsd else 0.0,
            "top_expert": {t: int(max(range(num_experts), key=v.__getitem__))
                           for t, v in loads.items()},
            "uniform_share": 1.0 / num_experts}


def permutation_null(tasks: Sequence[str], counts: torch.Tensor, permutations: int = 200,
                     seed: int = 0) -> dict[str, float]:
    """How much of a mean pairwise JSD chance alone gives: the rows' task labels shuffled.

    A JSD estimated from a few hundred routes per task is above 0 even when every task
    routes alike, so the observed ``jsd_mean`` of :func:`specialisation` is compared with
    the same statistic after permuting the task labels across rows (each row keeps its
    routes; the tasks keep their row counts).

    Args:
        tasks: ``[N]`` task of each row.
        counts: ``[N, E]`` routes per expert of each row.
        permutations: shuffles drawn (seeded: the same null on every run).

    Returns:
        ``jsd_mean`` (observed), ``null_jsd_mean`` and ``null_jsd_q95`` (mean and 95th
        percentile over the shuffles), ``p_value`` (one-sided, ``(1 + #null >= observed) /
        (1 + permutations)``), ``permutations``.
    """
    if len(tasks) != counts.shape[0]:
        raise ValueError(f"counts: expected {len(tasks)} rows like tasks, got {counts.shape[0]}")
    if permutations < 1:
        raise ValueError(f"permutations: expected >= 1, got {permutations}")
    observed = specialisation(load_by_task(tasks, counts))["jsd_mean"]
    generator = torch.Generator().manual_seed(seed)
    null = []
    for _ in range(permutations):
        order = torch.randperm(len(tasks), generator=generator).tolist()
        null.append(specialisation(load_by_task([tasks[i] for i in order], counts))["jsd_mean"])
    null_sorted = sorted(null)
    return {"jsd_mean": observed, "null_jsd_mean": sum(null) / len(null),
            "null_jsd_q95": null_sorted[min(len(null) - 1, math.ceil(0.95 * len(null)) - 1)],
            # a shuffle that keeps the partition sums the rows in another order: equal
            # up to rounding
            "p_value": (1 + sum(v >= observed - 1e-12 for v in null)) / (1 + permutations),
            "permutations": permutations}


def load_by_task(tasks: Sequence[str], counts: torch.Tensor) -> dict[str, list[float]]:
    """``{task: share of routes per expert [E]}`` from per-row ``counts [N, E]``, tasks in
    sorted order (a task none of whose rows has a route is left out)."""
    totals: dict[str, torch.Tensor] = {}
    for task, row in zip(tasks, counts, strict=True):
        totals[task] = totals[task] + row if task in totals else row.clone()
    return {t: (c / c.sum()).tolist() for t, c in sorted(totals.items()) if c.sum() > 0}


@dataclass
class RouteRecords:
    """Every real token's routes over some rows (:func:`route_records`), on the CPU.

    Attributes:
        tasks: ``[N]`` task of each row (``"unknown"`` for a row without one).
        row: ``[M]`` int64, the row of each token. token_ids: ``[M]`` int64.
        experts: ``[M, k]`` int64, the token's expert ids.
        answer: ``[M]`` bool, the token is an answer token (labelled, not the EOS).
        num_experts: E.
    """

    tasks: list[str]
    row: torch.Tensor
    token_ids: torch.Tensor
    experts: torch.Tensor
    answer: torch.Tensor
    num_experts: int

    def selection(self, answers_only: bool = False, shared_tokens: bool = False
                  ) -> torch.Tensor:
        """``[M]`` bool: the tokens counted: every one, or the answer tokens alone; with
        ``shared_tokens`` only those whose token id occurs (among those counted) in at least
        two tasks, where a router can tell the tasks apart only by the context."""
        selected = self.answer.clone() if answers_only else torch.ones_like(self.answer)
        if shared_tokens and bool(selected.any()):
            task_ids = {t: i for i, t in enumerate(sorted(set(self.tasks)))}
            task_of = torch.tensor([task_ids[t] for t in self.tasks])[self.row]
            ids = self.token_ids[selected]
            pairs = torch.unique(torch.stack([ids, task_of[selected]]), dim=1)
            vocab, tasks_per_id = torch.unique(pairs[0], return_counts=True)
            shared = vocab[tasks_per_id >= 2]
            selected[selected.clone()] = torch.isin(ids, shared)
        return selected

    def route_counts(self, answers_only: bool = False, shared_tokens: bool = False
                     ) -> torch.Tensor:
        """``[M, E]`` fp32: each token's routes per expert (a token routed twice to one
        expert counts 2); zero rows for the tokens not counted (:meth:`selection`)."""
        counts = torch.nn.functional.one_hot(self.experts, self.num_experts).sum(-2).float()
        if answers_only or shared_tokens:
            counts *= self.selection(answers_only, shared_tokens)[:, None]
        return counts

    def row_counts(self, answers_only: bool = False, shared_tokens: bool = False
                   ) -> torch.Tensor:
        """``[N, E]`` fp32: routes per expert of each row (:meth:`route_counts` summed)."""
        return self.per_row(self.route_counts(answers_only, shared_tokens))

    def per_row(self, values: torch.Tensor) -> torch.Tensor:
        """``[M, E]`` per-token values summed into ``[N, E]`` per row."""
        return torch.zeros(len(self.tasks), values.shape[1]).index_add_(0, self.row, values)


@torch.no_grad()
def route_records(model: Any, rows: Sequence[dict[str, Any]], tokenizer: Any,
                  max_length: int = 96, batch_size: int = 16) -> RouteRecords:
    """The saliency network's routes of every real token of ``rows``.

    Runs ``model`` (a shared-routing :class:`~datalora.model.DATALORAModel`) in eval mode
    over ``rows`` and records the ``expert_ids`` of every real token (the USN routes every
    token; pruned tokens skip the pruned layers but are routed in the others), its token id,
    row, and whether it is an answer token (labelled, less the EOS every answer ends with:
    every task shares the prompt template and that EOS, whose tokens route alike whatever
    the task).
    """
    from datalora.data import IGNORE_INDEX, CausalLMCollator
    from datalora.data.tokens import _eos_id
    from datalora.train import _tokenized_rows

    if model.runtime is None:
        raise ValueError("model: expected routing='shared' (a saliency network)")
    num_experts = model.datalora_config.num_lora_experts
    collate = CausalLMCollator(tokenizer=tokenizer)
    eos = _eos_id(tokenizer)
    items = _tokenized_rows(list(rows), tokenizer, max_length)
    tasks = [x["task"] for x in items]  # one item per row, "unknown" without a task
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    parts: list[tuple[torch.Tensor, ...]] = []
    try:
        for i in range(0, len(items), batch_size):
            batch = collate([{k: v for k, v in x.items() if k != "task"}
                             for x in items[i:i + batch_size]])
            input_ids = batch["input_ids"]
            model(input_ids=input_ids.to(device),
                  attention_mask=batch["attention_mask"].to(device))
            rec = model.runtime.last
            valid = rec.valid.cpu().bool()
            experts = rec.routing.expert_ids.view(*input_ids.shape, -1).cpu().long()
            answer = (batch["labels"] != IGNORE_INDEX) & (input_ids != eos)
            rows_of = torch.arange(i, i + input_ids.shape[0])[:, None].expand_as(input_ids)
            parts.append((rows_of[valid], input_ids[valid], experts[valid], answer[valid]))
    finally:
        model.train(was_training)
    k = model.datalora_config.num_active_experts
    row, token_ids, experts, answer = (
        (torch.cat(p) for p in zip(*parts, strict=True)) if parts else
        (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long),
         torch.zeros(0, k, dtype=torch.long), torch.zeros(0, dtype=torch.bool)))
    return RouteRecords(tasks, row, token_ids, experts, answer, num_experts)


def row_expert_counts(model: Any, rows: Sequence[dict[str, Any]], tokenizer: Any,
                      max_length: int = 96, batch_size: int = 16
                      ) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Routes per expert of every row (see :func:`route_records`): over every real token,
    and over the answer tokens alone.

    Returns:
        ``(tasks [N], all_counts [N, E], answer_counts [N, E])``, counts fp32 on the CPU.
    """
    records = route_records(model, rows, tokenizer, max_length, batch_size)
    return records.tasks, records.row_counts(), records.row_counts(answers_only=True)


def task_jsd(records: RouteRecords, answers_only: bool = False,
             shared_tokens: bool = False) -> float | None:
    """The tasks' mean pairwise JSD (bits) of the tokens counted (see
    :meth:`RouteRecords.selection`); None when no token is."""
    return _jsd_or_none(records.tasks, records.row_counts(answers_only, shared_tokens))


def _jsd_or_none(tasks: Sequence[str], counts: torch.Tensor) -> float | None:
    load = load_by_task(tasks, counts)
    return specialisation(load)["jsd_mean"] if load else None


def lexical_jsd(records: RouteRecords, answers_only: bool = False,
                shared_tokens: bool = False) -> float | None:
    """The tasks' mean pairwise JSD (bits) if each token were routed as this router routes
    its token id on average.

    Each token's routes are replaced by the mean routes of its token id over the tokens
    counted (:meth:`RouteRecords.selection`) of every task (this router's context-free
    approximation: a token id's routes pooled across contexts), then summed per task as
    :func:`load_by_task` does. Tasks use different tokens, so a router that never looks past
    the token still loads the experts differently by task; the observed JSD's excess over
    this one is the part that depends on the context. A token id seen in one task only
    keeps its routes (counted as lexical): over ``shared_tokens`` alone (ids that two tasks
    or more use), the observed JSD's excess is context only. None when no token is counted.
    """
    counts = records.route_counts(answers_only, shared_tokens)
    selected = counts.sum(1) > 0
    vocab, slot = torch.unique(records.token_ids[selected], return_inverse=True)
    per_id = torch.zeros(len(vocab), counts.shape[1]).index_add_(0, slot, counts[selected])
    per_id /= torch.bincount(slot, minlength=len(vocab)).clamp_min(1)[:, None]
    lexical = torch.zeros_like(counts)
    lexical[selected] = per_id[slot]
    return _jsd_or_none(records.tasks, records.per_row(lexical))


def initial_model(base: Any, config: Any, seed: int) -> Any:
    """The DATALORA model ``train_datalora(config, model=base, seed=seed)`` starts training
    from (its seeding right before the same wrap): the routing at initialisation, which
    already differs by task where the tasks' tokens differ, is the reference a trained
    router's specialisation is compared with."""
    from datalora.model import get_datalora_model

    with torch.random.fork_rng(devices=[]):  # the caller's RNG state is left as it was
        torch.manual_seed(seed)
        return get_datalora_model(base, config, verbose=False)


def task_expert_load(model: Any, rows: Sequence[dict[str, Any]], tokenizer: Any,
                     max_length: int = 96, batch_size: int = 16,
                     answers_only: bool = False) -> dict[str, list[float]]:
    """Share of routes per expert for each task (see :func:`row_expert_counts`): over every
    real token, or over the answer tokens alone. A task none of whose rows has such a token
    is left out (see :func:`load_by_task`)."""
    records = route_records(model, rows, tokenizer, max_length, batch_size)
    return load_by_task(records.tasks, records.row_counts(answers_only))


# ---------------------------------------------------------------------------- runs

BASES = ("random", "pretrained")


def base_model(base: str, progress: bool = True) -> tuple[Any, Any]:
    """``(model, tokenizer)``: the embedded tiny Mistral, random (``"random"``) or after the
    cached prompt pretraining of :func:`datalora.testing.build_pretrained_tiny_model`."""
    from datalora.testing import build_pretrained_tiny_model, build_tiny_model, build_tokenizer

    if base not in BASES:
        raise ValueError(f"base: expected one of {BASES}, got {base!r}")
    tokenizer = build_tokenizer()
    if base == "random":
        return build_tiny_model(), tokenizer
    return build_pretrained_tiny_model(tokenizer=tokenizer, progress=progress), tokenizer


def train_and_evaluate(name: str, target_retention: float, *, steps: int, batch_size: int,
                       learning_rate: float, seed: int, limit: int | None, eval_rows: list,
                       out_dir: Path, progress: bool, base: str = "random",
                       alpha_balance: float | None = None,
                       train_rows: list | None = None) -> dict[str, Any]:
    """Trains one arm with ``train_datalora`` on a fresh ``base`` model (see
    :func:`base_model`) and evaluates it on ``eval_rows``; returns its record.

    ``alpha_balance`` overrides the load-balance weight of ``DEFAULT_TINY_CONFIG``;
    ``train_rows`` replaces the embedded train split (validation tuning holds rows out).
    """
    from datalora.config import DATALORAConfig
    from datalora.train import DEFAULT_TINY_CONFIG, evaluate_loss, train_datalora

    fields = {**DEFAULT_TINY_CONFIG, "target_retention": target_retention}
    if alpha_balance is not None:
        fields["alpha_balance"] = alpha_balance
    config = DATALORAConfig(**fields)
    model, tokenizer = base_model(base, progress)
    eval_rows = list(eval_rows)
    initial = route_records(initial_model(copy.deepcopy(model), config, seed), eval_rows,
                            tokenizer)
    t0 = time.perf_counter()
    result = train_datalora(config, dataset=train_rows, output_dir=out_dir / name,
                            max_steps=steps, batch_size=batch_size,
                            learning_rate=learning_rate, seed=seed, limit=limit,
                            curriculum_mode="steps", progress=progress,
                            logging_steps=max(1, steps // 30), model=model,
                            tokenizer=tokenizer)
    train_s = time.perf_counter() - t0
    model, tok = result.model, result.tokenizer
    record: dict[str, Any] = {
        "name": name, "target_retention": target_retention, "train_seconds": train_s,
        "alpha_balance": config.alpha_balance,
        "keep_threshold": result.keep_threshold if math.isfinite(result.keep_threshold)
        else None,
        "final_train_lm_loss": result.datalora_history[-1]["lm_loss"]
        if result.datalora_history else None,
        "phase_summary": result.phase_summary,
        "history": [{k: h[k] for k in ("step", "phase", "lm_loss", "retention",
                                       "retention_target", "tau")}
                    for h in result.datalora_history]}
    # eval with the model's inference state: calibrated threshold (pruning on)
    record["eval_loss"] = evaluate_loss(model, eval_rows, tok)
    model.eval()
    rec_kept = []
    with torch.no_grad():  # the fraction of eval tokens actually kept at the threshold
        from datalora.data import CausalLMCollator
        from datalora.train import _tokenized_rows

        collate = CausalLMCollator(tokenizer=tok)
        items = _tokenized_rows(eval_rows, tok, 96)
        device = next(model.parameters()).device
        for i in range(0, len(items), 16):
            batch = collate([{k: v for k, v in x.items() if k != "task"}
                             for x in items[i:i + 16]])
            model(input_ids=batch["input_ids"].to(device),
                  attention_mask=batch["attention_mask"].to(device))
            last = model.runtime.last
            rec_kept.append((int(last.kept[last.valid].sum()), int(last.valid.sum())))
    record["eval_retention_threshold"] = (sum(k for k, _ in rec_kept)
                                          / max(sum(n for _, n in rec_kept), 1))
    # the same model with per-sequence top-k at exactly the target retention, and dense
    threshold = model.saliency.keep_threshold.clone()
    model.saliency.keep_threshold.fill_(float("nan"))
    try:
        record["eval_loss_topk"] = evaluate_loss(model, eval_rows, tok,
                                                 retention=target_retention)
    finally:
        model.saliency.keep_threshold.copy_(threshold)
    record["eval_loss_dense"] = evaluate_loss(model, eval_rows, tok, retention=1.0)
    trained = route_records(model, eval_rows, tok)
    for suffix, answers_only in (("", False), ("_answers", True)):
        counts = trained.row_counts(answers_only)
        record[f"task_expert_load{suffix}"] = load = load_by_task(trained.tasks, counts)
        record[f"task_expert_load{suffix}_initial"] = initial_load = load_by_task(
            initial.tasks, initial.row_counts(answers_only))
        record[f"specialisation{suffix}"] = {
            **specialisation(load), **permutation_null(trained.tasks, counts),
            "initial_jsd_mean": specialisation(initial_load)["jsd_mean"],
            "lexical_jsd_mean": lexical_jsd(trained, answers_only),
            "initial_lexical_jsd_mean": lexical_jsd(initial, answers_only),
            "shared_token_share": float(trained.selection(answers_only, True).sum()
                                        / trained.selection(answers_only).sum().clamp_min(1)),
            "shared_token_jsd_mean": task_jsd(trained, answers_only, True),
            "shared_token_lexical_jsd_mean": lexical_jsd(trained, answers_only, True),
            "initial_shared_token_jsd_mean": task_jsd(initial, answers_only, True),
            "initial_shared_token_lexical_jsd_mean": lexical_jsd(initial, answers_only,
                                                                 True)}
    return record


def run_metadata(**config: Any) -> dict[str, Any]:
    """The result's ``meta``: device, CPU, versions, date, git commit (None outside a
    checkout), load average, and ``config``."""
    return {"device": "cuda" if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__, **provenance(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **config,
            "dense_arm": "shared routing (USN + MoLoRA), target_retention 1.0: retention 1.0 "
                         "throughout, same curriculum of tau / hard routing",
            "load_average": list(os.getloadavg())}


def run(steps: int = 300, batch_size: int = 8, learning_rate: float = 3e-2, seed: int = 0,
        limit: int | None = None, eval_limit: int | None = 200,
        out_dir: Path = RESULTS_DIR, tag: str = "cpu", work_dir: Path | None = None,
        plot: bool = True, progress: bool = True, log=print,
        base: str = "random", alpha_balance: float | None = None,
        tune_alpha_balance: Sequence[float] = (),
        dense_alpha_balance: float | None = None) -> dict[str, Any]:
    """Trains both arms, writes ``datalora_eval_<tag>.json`` (+ ``.png``), returns the dict.

    ``alpha_balance``: the load-balance weight of the DATALORA arm (default
    ``DEFAULT_TINY_CONFIG``'s); ``dense_alpha_balance`` the dense arm's (default: the same).
    ``tune_alpha_balance``: candidate weights, tried for each arm alike: each candidate
    trains the arm on the train split minus its validation rows
    (``datalora.testing.train_validation_split``) and is scored by the validation eval loss;
    each arm then trains with its best (overriding both weights). The eval split is never
    used for the choice. Every candidate is recorded under ``"tuning"``.
    """
    import tempfile

    from datalora.data import load_instruction_dataset

    check_output_folder("out_dir", out_dir)  # before the training, not at the write after it
    if plot:  # likewise: without matplotlib plot_result failed after both arms had trained
        try:
            import matplotlib  # noqa: F401
        except ImportError as exc:
            raise ModuleNotFoundError("plot: matplotlib is not installed (pip install "
                                      "matplotlib, or datalora[plot]); pass plot=False "
                                      "(--no-plot) to run without the PNG") from exc
    eval_rows = load_instruction_dataset("embedded", "eval", limit=eval_limit)
    meta = run_metadata(steps=steps, batch_size=batch_size, learning_rate=learning_rate,
                        seed=seed, limit=limit, eval_rows=len(eval_rows), base=base)
    from datalora.train import DEFAULT_TINY_CONFIG

    if alpha_balance is None:
        alpha_balance = DEFAULT_TINY_CONFIG["alpha_balance"]
    chosen = {"dense_molora": alpha_balance if dense_alpha_balance is None
              else dense_alpha_balance, "datalora_r0.5": alpha_balance}
    retentions = {"dense_molora": 1.0, "datalora_r0.5": 0.5}
    arms, tuning = [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(work_dir) if work_dir is not None else Path(tmp)
        if tune_alpha_balance:
            from datalora.testing import train_validation_split

            train_rows, val_rows = train_validation_split()
            for name, retention in retentions.items():
                scores = []
                for alpha in tune_alpha_balance:
                    log(f"== tuning {name}: alpha_balance {alpha} on {len(val_rows)} "
                        f"validation rows")
                    rec = train_and_evaluate(
                        f"tune_{name}_{alpha}", retention, steps=steps, batch_size=batch_size,
                        learning_rate=learning_rate, seed=seed, limit=limit,
                        eval_rows=val_rows, out_dir=work, progress=progress, base=base,
                        alpha_balance=alpha, train_rows=train_rows)
                    scores.append({"arm": name, "alpha_balance": alpha,
                                   "validation_loss": rec["eval_loss"],
                                   "specialisation": rec["specialisation"],
                                   "specialisation_answers": rec["specialisation_answers"]})
                chosen[name] = min(scores, key=lambda t: t["validation_loss"])["alpha_balance"]
                tuning += scores
                log(f"   {name}: chose alpha_balance {chosen[name]}")
            meta["tuning"] = tuning
        meta["alpha_balance"] = chosen["datalora_r0.5"]
        meta["dense_alpha_balance"] = chosen["dense_molora"]
        for name, retention in retentions.items():
            log(f"== {name}: target retention {retention}, alpha_balance {chosen[name]}, "
                f"{steps} steps")
            arms.append(train_and_evaluate(
                name, retention, steps=steps, batch_size=batch_size,
                learning_rate=learning_rate, seed=seed, limit=limit, eval_rows=eval_rows,
                out_dir=work, progress=progress, base=base, alpha_balance=chosen[name]))
    dense, pruned = arms
    ratio = pruned["eval_loss"] / dense["eval_loss"]
    targets = [{"name": "eval_loss_ratio", "description": "DATALORA (50% retention, pruning "
                "on at the calibrated threshold) eval loss / dense MoLoRA eval loss <= 1.05",
                "value": ratio, "op": "<=", "threshold": TARGET_RATIO,
                "status": "PASS" if ratio <= TARGET_RATIO else "FAIL"},
               {"name": "specialisation", "description": "experts specialise by task: mean "
                "pairwise JSD of the tasks' expert loads > 0.05 bits and above the same "
                "model's at initialisation (same seed: its routing differs by task only as "
                "the tasks' tokens do)",
                "value": pruned["specialisation"]["jsd_mean"], "op": ">",
                "threshold": _specialisation_bar(pruned["specialisation"]),
                "status": _specialised(pruned["specialisation"])},
               {"name": "specialisation_answers", "description": "the same over the answer "
                "tokens alone (the prompt template and the final EOS are shared by every "
                "task)",
                "value": pruned["specialisation_answers"]["jsd_mean"], "op": ">",
                "threshold": _specialisation_bar(pruned["specialisation_answers"]),
                "status": _specialised(pruned["specialisation_answers"])}]
    meta["load_average_end"] = list(os.getloadavg())
    result = {"schema": SCHEMA, "meta": meta, "arms": arms,
              "eval_loss_ratio": ratio, "targets": targets}
    log(format_report(result))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"datalora_eval_{tag}.json"
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")
    log(f"wrote {path}")
    if plot:
        log(f"wrote {plot_result(result, path.with_suffix('.png'))}")
    return result


def _specialisation_bar(scores: dict[str, Any]) -> float:
    """The JSD the specialisation target asks to exceed: 0.05 bits, or the initial model's
    where that is higher."""
    return max(0.05, scores["initial_jsd_mean"])


def _specialised(scores: dict[str, Any]) -> str:
    """PASS when the mean pairwise JSD is above :func:`_specialisation_bar`."""
    return "PASS" if scores["jsd_mean"] > _specialisation_bar(scores) else "FAIL"


def format_load_table(task_load: dict[str, Sequence[float]]) -> str:
    experts = len(next(iter(task_load.values())))
    lines = [f"  {'task':>10} | " + " ".join(f"e{i:<4d}" for i in range(experts))]
    for task, load in task_load.items():
        lines.append(f"  {task:>10} | " + " ".join(f"{100 * v:5.1f}" for v in load))
    return "\n".join(lines)


def _bits(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def format_report(result: dict[str, Any]) -> str:
    lines = []
    for arm in result["arms"]:
        lines.append(f"{arm['name']}: eval loss {arm['eval_loss']:.4f} (kept "
                     f"{100 * arm['eval_retention_threshold']:.1f}% of tokens in the pruned "
                     f"layers) | top-k at target {arm['eval_loss_topk']:.4f} | dense "
                     f"{arm['eval_loss_dense']:.4f} | train {arm['train_seconds']:.0f} s")
        for suffix, tokens in (("", "every token"), ("_answers", "answer tokens")):
            s = arm[f"specialisation{suffix}"]
            lines.append(f"  expert load per task on eval rows, {tokens} (% of routes); max "
                         f"share mean {s['max_share_mean']:.3f} (uniform "
                         f"{s['uniform_share']:.3f}), JSD mean {s['jsd_mean']:.3f} bits "
                         f"(at initialisation {s['initial_jsd_mean']:.3f}; routed by token "
                         f"id alone {_bits(s['lexical_jsd_mean'])}; on the "
                         f"{100 * s['shared_token_share']:.0f}% of tokens whose id several "
                         f"tasks use {_bits(s['shared_token_jsd_mean'])}, by token id alone "
                         f"{_bits(s['shared_token_lexical_jsd_mean'])}, at initialisation "
                         f"{_bits(s['initial_shared_token_jsd_mean'])} / "
                         f"{_bits(s['initial_shared_token_lexical_jsd_mean'])}; task labels "
                         f"permuted: {s['null_jsd_mean']:.3f}, 95th percentile "
                         f"{s['null_jsd_q95']:.3f}; p = {s['p_value']:.3f})")
            lines.append(format_load_table(arm[f"task_expert_load{suffix}"]))
    lines.append(f"eval loss ratio DATALORA / dense: {result['eval_loss_ratio']:.4f}")
    for t in result["targets"]:
        lines.append(f"  {t['status']:5s} {t['name']}: {t['value']:.4f} {t['op']} "
                     f"{t['threshold']}  ({t['description']})")
    return "\n".join(lines)


def plot_result(result: dict[str, Any], path: Path) -> Path:
    """Training loss / retention of both arms, eval losses, and the per-task load heatmaps
    (every token; answer tokens)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = result["arms"]
    fig, axes = plt.subplots(3, 2, figsize=(12, 11))
    ax_loss, ax_ret = axes[0]
    for arm in arms:
        steps = [h["step"] for h in arm["history"]]
        ax_loss.plot(steps, [h["lm_loss"] for h in arm["history"]], label=arm["name"])
        ax_ret.plot(steps, [h["retention"] for h in arm["history"]], label=arm["name"])
        ax_loss.axhline(arm["eval_loss"], ls="--", lw=0.8,
                        color=ax_loss.lines[-1].get_color(),
                        label=f"{arm['name']} eval {arm['eval_loss']:.3f}")
    ax_loss.set(title=f"LM loss (eval ratio {result['eval_loss_ratio']:.3f})", xlabel="step")
    ax_ret.set(title="kept fraction in the pruned layers", xlabel="step", ylim=(0, 1.05))
    for ax in (ax_loss, ax_ret):
        ax.legend(fontsize=8)
    for row, (suffix, tokens) in zip(axes[1:], (("", "every token"),
                                                ("_answers", "answer tokens")), strict=True):
        for ax, arm in zip(row, arms, strict=True):
            load = arm[f"task_expert_load{suffix}"]
            tasks = list(load)
            im = ax.imshow([load[t] for t in tasks], aspect="auto", cmap="viridis", vmin=0)
            ax.set_yticks(range(len(tasks)), tasks)
            ax.set_xlabel("expert")
            s = arm[f"specialisation{suffix}"]
            ax.set_title(f"{arm['name']}: load per task, {tokens} (JSD {s['jsd_mean']:.3f}; "
                         f"at init {s['initial_jsd_mean']:.3f}, chance "
                         f"{s['null_jsd_mean']:.3f})", fontsize=9)
            fig.colorbar(im, ax=ax)
    meta = result["meta"]
    fig.suptitle(f"DATALORA vs dense MoLoRA, {meta['steps']} steps, {meta['cpu_model']}, "
                 f"{meta['date']}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path, 100)
    plt.close(fig)
    return Path(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m datalora.experiments.datalora_eval",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int_at_least(1), default=300)
    p.add_argument("--batch-size", type=int_at_least(1), default=8)
    p.add_argument("--lr", type=positive_float, default=3e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int_at_least(1), default=None,
                   help="use the first N training rows")
    p.add_argument("--eval-limit", type=int_at_least(1), default=200)
    p.add_argument("--out", type=Path, default=RESULTS_DIR,
                   help="output folder (default: benchmarks/results under the current "
                        "directory)")
    p.add_argument("--tag", default="cpu")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--base", choices=BASES, default="random",
                   help="the embedded tiny model as initialised, or after the cached prompt "
                        "pretraining (datalora.testing.build_pretrained_tiny_model)")
    p.add_argument("--alpha-balance", type=float, default=None,
                   help="load-balance loss weight (default: datalora.train.DEFAULT_TINY_CONFIG)")
    p.add_argument("--dense-alpha-balance", type=float, default=None,
                   help="the dense arm's load-balance weight (default: --alpha-balance)")
    p.add_argument("--tune-alpha-balance", type=float, nargs="+", default=(), metavar="A",
                   help="choose each arm's alpha_balance among these on validation rows held "
                        "out of the train split (overrides --alpha-balance and "
                        "--dense-alpha-balance)")
    a = p.parse_args(argv)
    run(a.steps, a.batch_size, a.lr, a.seed, a.limit, a.eval_limit, a.out, a.tag,
        plot=not a.no_plot, progress=not a.no_progress, base=a.base,
        alpha_balance=a.alpha_balance, tune_alpha_balance=a.tune_alpha_balance,
        dense_alpha_balance=a.dense_alpha_balance)
    return 0


if __name__ == "__main__":
    sys.exit(main())
