"""``DATALORATrainer``: a ``transformers.Trainer`` that trains DATALORA.

On top of the Trainer it

* adds ``lambda_prune * L_retention + alpha_balance * L_balance`` to the LM loss (training
  only; evaluation reports the LM loss; ``L_retention`` is weighted 0 while the schedule
  is dense, i.e. in warmup);
* drives the :class:`~datalora.curriculum.CurriculumScheduler` from a callback (the phase,
  tau, retention and hard routing are set on the model before every optimizer step);
* logs ``phase`` (0/1/2), ``tau``, ``retention_target``, ``retention`` (actual kept
  fraction), ``lm_loss``, ``retention_loss``, ``balance_loss``, ``rank_scale_mean`` and
  ``expert_load_e{i}`` to the Trainer's loggers and progress bar, and keeps a richer record
  (per-task expert load when batches carry ``task_ids``) in ``datalora_history``; each
  record covers steps of one phase (a phase change between logs closes a record with
  ``loss`` None, and the next log's metrics cover the new phase's steps);
* saves the adapter + saliency network + config (``adapter_model.safetensors``,
  ``adapter_config.json``), the curriculum (``curriculum_state.json``) and
  ``datalora_history`` (``datalora_history.json``, plus the metric sums of the steps since
  the last log in ``datalora_pending_metrics.json``) in every checkpoint and resumes from
  them exactly (weights bit-exact, same schedule, the same history records but for the
  Trainer's own ``loss``, which restarts at a resume);
* calibrates the generation keep threshold at the end of training.

Works with the Trainer's accelerate integration (DDP under ``torchrun``, bf16).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import TrainOutput, has_length

from datalora.checkpoints import check_resumable, last_complete_checkpoint, saved_trainer_state
from datalora.checks import check_int
from datalora.config import DATALORAConfig
from datalora.curriculum import PHASES, CurriculumScheduler, CurriculumState, check_mode
from datalora.data import check_task_names, first_row_without_token
from datalora.io import atomic_write_text
from datalora.model import DATALORAModel, out_of_vocabulary
from datalora.module_modes import eval_mode
from datalora.sharding import sharding_kind

CURRICULUM_STATE_NAME = "curriculum_state.json"
HISTORY_NAME = "datalora_history.json"
PENDING_NAME = "datalora_pending_metrics.json"


TASK_ROUTES_COMPACTED_AT = 256
"""Micro-batches of per-task expert routes kept before they are summed per task."""


def _gather_varying(t: torch.Tensor, ranks: int) -> torch.Tensor:
    """The 1-D tensors ``t`` of every rank (their lengths may differ) concatenated, on
    every rank."""
    size = torch.tensor([t.numel()], device=t.device)
    sizes = [torch.zeros_like(size) for _ in range(ranks)]
    torch.distributed.all_gather(sizes, size)
    longest = max(int(n) for n in sizes)
    padded = torch.zeros(longest, dtype=t.dtype, device=t.device)
    padded[:t.numel()] = t
    parts = [torch.empty_like(padded) for _ in range(ranks)]
    torch.distributed.all_gather(parts, padded)
    return torch.cat([part[:int(n)] for part, n in zip(parts, sizes, strict=True)])


class CurriculumCallback(TrainerCallback):
    """Sets the curriculum state on the model at the start of every optimizer step."""

    def __init__(self, trainer: DATALORATrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._setup_curriculum(state)

    def on_step_begin(self, args, state, control, **kwargs):
        self.trainer._advance_curriculum(state)

    def on_step_end(self, args, state, control, **kwargs):
        # position = optimizer steps done, so a checkpoint at step n stores n
        if self.trainer.curriculum is not None:
            self.trainer.curriculum.step(int(state.global_step), epoch=float(state.epoch or 0))


def _warn_schedule_change(current: dict[str, Any], saved: dict[str, Any]) -> None:
    """Warns when a resumed run's own schedule (e.g. another ``max_steps``) differs from the
    checkpoint's, which is kept: the run then continues the checkpoint's curriculum."""
    changed = [f"{k}: checkpoint {saved.get(k)!r}, this run {v!r}" for k, v in current.items()
               if k not in ("step_count", "epoch") and saved.get(k) != v]
    if changed:
        warnings.warn(f"resume_from_checkpoint: continuing the checkpoint's curriculum, not "
                      f"this run's ({'; '.join(changed)}); its phase boundaries stay where "
                      f"the checkpoint put them", stacklevel=3)


def _check_trainer_config(config: Any, model: DATALORAModel) -> DATALORAConfig:
    """``config`` (default: the model's), checked against the model: its training settings
    (loss weights, temperatures, retention, curriculum split) may differ, but the fields
    that define the model (:data:`~datalora.adapter_files.FUNCTION_FIELDS`) cannot be changed by
    the trainer (a different ``num_lora_experts`` silently misreported the expert load)."""
    from datalora.adapter_files import function_fields

    if config is None:
        return model.datalora_config
    if not isinstance(config, DATALORAConfig):
        raise TypeError(f"datalora_config: expected a DATALORAConfig, got "
                        f"{type(config).__name__}")
    config.validate()  # fields assigned after construction
    own = model.datalora_config
    resolved = (dataclasses.replace(config, routing=own.routing)
                if config.routing == "auto" else config)  # as the model resolved 'auto'
    differs = [f"{name}: datalora_config {a!r}, model {b!r}"
               for name, a, b in function_fields(resolved, own, model.base_model) if a != b]
    if differs:
        raise ValueError(f"datalora_config: differs from the model's config in fields that "
                         f"define the model ({'; '.join(differs)}); build the model with "
                         f"this config, or pass only training settings (loss weights, "
                         f"temperatures, target_retention, curriculum_split) that differ")
    return config


METRICS: tuple[str, ...] = ("lm_loss", "retention_loss", "balance_loss", "retention",
                            "keep_prob_mean", "rank_scale_mean")
"""Per-step metrics the trainer averages between logs (in this order on the device)."""


def _task_column(dataset: Any) -> set[str]:
    """The ``task`` names of a list of rows, a ``datasets.Dataset`` or a dict of them (eval
    datasets by name); none for other datasets (nothing to read without iterating)."""
    if dataset is None:
        return set()
    if isinstance(dataset, Mapping):
        return set().union(*(_task_column(d) for d in dataset.values()))
    columns = getattr(dataset, "column_names", None)
    if isinstance(columns, list) and hasattr(dataset, "unique"):  # a datasets.Dataset
        names = dataset.unique("task") if "task" in columns else []
    elif isinstance(dataset, (list, tuple)):
        names = [row["task"] for row in dataset if isinstance(row, Mapping) and "task" in row]
    else:
        names = []
    return {name for name in names if isinstance(name, str)}


def _complete_collator_tasks(collator: Any, *datasets: Any) -> None:
    """Appends to a task-id collator's ``tasks`` (sorted) the dataset task names it lacks:
    its default lists the embedded tasks only, and other names would all get id -1."""
    tasks = getattr(collator, "tasks", None)
    if not getattr(collator, "return_task_ids", False) or not isinstance(tasks, tuple):
        return
    missing = set().union(*(_task_column(d) for d in datasets)) - set(tasks)
    if missing:
        collator.tasks = tasks + tuple(sorted(missing))


class DATALORATrainer(Trainer):
    """``transformers.Trainer`` for a :class:`~datalora.model.DATALORAModel` with shared routing.

    Args:
        *args, **kwargs: as ``transformers.Trainer`` (``model`` must be a DATALORAModel
            built with ``routing="shared"``).
        datalora_config: the method's config (default: the model's): its training
            settings may differ from the model's, the fields that define the model
            (:data:`~datalora.adapter_files.FUNCTION_FIELDS`) must not (ValueError).
        curriculum: a ready :class:`CurriculumScheduler` (its missing ``total_steps`` /
            ``num_epochs`` are filled in from the run); default: built at every
            ``train()`` from the config over the run's optimizer steps
            (``curriculum_mode="steps"``) or epochs (``"epochs"``: each phase a third of the
            run's epochs, one epoch each with ``num_train_epochs=3`` as the card).
        curriculum_mode: ``"steps"`` or ``"epochs"``.
        task_names: names (a list or tuple; numbers read as text) of the ``task_ids`` in
            batches (per-task expert load); default: the data collator's ``tasks`` when it
            has them, after appending (sorted) the names of the ``task`` column of the
            train / eval datasets it lacks (a list of rows or a ``datasets.Dataset``), so
            every rank numbers the tasks alike.
        calibrate_batches: training batches used to calibrate the keep threshold at the
            end of training (0: skip).

    Evaluations during training run before the keep threshold is calibrated, so their
    pruned layers keep each sequence's top ``ceil(retention * L)`` tokens; after training
    the calibrated threshold decides (as in generation), so ``evaluate()`` then can differ
    from the last in-training ``eval_loss`` by the change of token selection.
    """

    def __init__(self, *args: Any, datalora_config: DATALORAConfig | None = None,
                 curriculum: CurriculumScheduler | None = None, curriculum_mode: str = "steps",
                 task_names: list[str] | tuple[str, ...] | None = None,
                 calibrate_batches: int = 4, **kwargs: Any):
        super().__init__(*args, **kwargs)
        model = self.accelerator.unwrap_model(self.model)
        if not isinstance(model, DATALORAModel):
            raise TypeError(f"model: expected a DATALORAModel (get_datalora_model), "
                            f"got {type(model).__name__}")
        if model.runtime is None:
            raise ValueError("model: DATALORATrainer needs routing='shared' (the saliency "
                             "network); this model routes per layer")
        check_mode("curriculum_mode", curriculum_mode)
        if curriculum is not None and not isinstance(curriculum, CurriculumScheduler):
            raise TypeError(f"curriculum: expected a CurriculumScheduler, "
                            f"got {type(curriculum).__name__}")
        self.datalora_config = _check_trainer_config(datalora_config, model)
        self.curriculum = curriculum
        self._own_curriculum = curriculum is None  # rebuilt at every fresh train()
        self.curriculum_mode = curriculum_mode
        if task_names is None:
            _complete_collator_tasks(self.data_collator, self.train_dataset, self.eval_dataset)
            task_names = getattr(self.data_collator, "tasks", None)
        else:  # "abc" was split into its letters, 5 failed as not iterable
            task_names = check_task_names("task_names", task_names)
        self.task_names = list(task_names) if task_names is not None else None
        # a negative count silently skipped the calibration
        self.calibrate_batches = check_int("calibrate_batches", calibrate_batches, low=0)
        self.datalora_history: list[dict[str, Any]] = []
        self._resume_curriculum: dict[str, Any] | None = None
        self._run_checkpoint: str | None = None  # what train() resumes from
        self._first_batch_checked = False  # its mask and token ids (compute_loss)
        self._filled_curriculum_fields: list[str] = []  # of a curriculum the user passed
        self._applied = None
        self._reset_metrics()
        if self.args.label_names is None:
            # the Trainer reads label names off forward's signature, and DATALORAModel's
            # forward(*args, **kwargs) names none: without this no eval loss is computed
            # (no eval_loss; load_best_model_at_end fails)
            self.label_names = ["labels"]
        if self.label_smoother is not None:
            # the Trainer shifts labels only for class names it knows as causal LMs
            smoother = self.label_smoother
            self.label_smoother = lambda outputs, labels, shift_labels=True, **kw: smoother(
                outputs, labels, shift_labels=True, **kw)
        self.add_callback(CurriculumCallback(self))

    # ------------------------------------------------------------------ helpers

    @property
    def datalora_model(self) -> DATALORAModel:
        return self.accelerator.unwrap_model(self.model)

    def _reset_metrics(self) -> None:
        # [len(METRICS) + 1] on the device: each micro-batch's metrics weighted 1 / (its
        # optimizer step's micro-batches), then the weight of the finite lm_loss values
        self._sums: torch.Tensor | None = None
        self._count = 0.0  # optimizer steps since the last record (fractions of a step)
        self._load: torch.Tensor | None = None  # [E] routes per expert, on the device
        # per micro-batch: task ids [B] and routes per expert [B, E] of its sequences
        self._task_routes: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            base = self.datalora_model.base_model
            self._signature_columns = list(inspect.signature(base.forward).parameters) + [
                "label", "label_ids", "labels", "task_ids", "task", "task_id"]

    def _run_epochs(self, state, mode: str) -> float:
        """The epochs this run trains: ``num_train_epochs``, or in epochs mode with
        ``max_steps`` the epochs those steps reach (the Trainer stops there)."""
        if mode != "epochs" or self.args.max_steps <= 0:
            return float(self.args.num_train_epochs)
        gas = max(int(self.args.gradient_accumulation_steps), 1)
        try:
            n = len(self.get_train_dataloader())
        except TypeError:  # an iterable dataset: epochs are undefined
            raise ValueError("curriculum_mode='epochs' with max_steps needs a sized "
                             "train dataset; use curriculum_mode='steps'") from None
        return int(state.max_steps) / max(n // gas + int(n % gas > 0), 1)

    def _setup_curriculum(self, state) -> None:
        if self.curriculum is None:
            self.curriculum = CurriculumScheduler.from_config(
                self.datalora_config, total_steps=max(int(state.max_steps), 1),
                num_epochs=self._run_epochs(state, self.curriculum_mode),
                mode=self.curriculum_mode)
        elif self.curriculum.total_steps is None and self.curriculum.mode == "steps":
            self.curriculum.total_steps = max(int(state.max_steps), 1)
            self._filled_curriculum_fields.append("total_steps")
        elif self.curriculum.num_epochs is None and self.curriculum.mode == "epochs":
            self.curriculum.num_epochs = self._run_epochs(state, "epochs")
            self._filled_curriculum_fields.append("num_epochs")
        if self._resume_curriculum is not None:
            _warn_schedule_change(self.curriculum.state_dict(), self._resume_curriculum)
            if self._resume_curriculum.get("total_steps") != self.curriculum.total_steps:
                self._resync_learning_rate()
            self.curriculum.load_state_dict(self._resume_curriculum)
            self._resume_curriculum = None
        # the packed width's grid under torch.compile ends at this run's target
        self.datalora_model.runtime.target_retention = self.curriculum.target_retention
        self._advance_curriculum(state)

    def _resync_learning_rate(self) -> None:
        """A run resumed with another ``max_steps``: Hugging Face's Trainer rebuilds its
        learning-rate schedule for the new length but restores the optimizer's rate of the
        checkpoint's last step (0 at the end of a decayed schedule), so the first resumed
        step trained at that stale rate. Sets the rate the rebuilt schedule gives at the
        resumed step (``LambdaLR`` schedules: linear, cosine, constant, ...)."""
        scheduler = getattr(self.lr_scheduler, "scheduler", self.lr_scheduler)  # accelerate's
        optimizer = self.optimizer
        if not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR) or optimizer is None:
            return
        step = scheduler.last_epoch
        rates = [base * fn(step) for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas,
                                                      strict=True)]
        for group, rate in zip(optimizer.param_groups, rates, strict=True):
            group["lr"] = rate
        scheduler._last_lr = rates

    def _advance_curriculum(self, state) -> None:
        if self.curriculum is None:
            return
        self.curriculum.step(int(state.global_step), epoch=float(state.epoch or 0.0))
        previous = self._applied
        if previous is not None and self._count \
                and self.curriculum.state.phase_index != previous.phase_index:
            # the steps since the last log belong to the phase that just ended: record them
            # under it, not averaged into the next log under the new phase's name
            self._record_history(None)
        self._applied = self.curriculum.apply(self.datalora_model)

    # ------------------------------------------------------------------ loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """LM loss (+ the weighted aux losses in training); logs the DATALORA metrics."""
        inputs = dict(inputs)
        task_ids = inputs.pop("task_ids", None)
        if model.training and inputs.get("labels") is None and self.compute_loss_func is None:
            raise ValueError("inputs: DATALORATrainer needs 'labels' in every training batch "
                             "(datalora.data.CausalLMCollator adds them; with the Trainer's "
                             "default collator pass a 'labels' column)")
        if model.training and not self._first_batch_checked:
            self._first_batch_checked = True  # once per run, not a host sync per step
            self._check_first_batch(inputs)
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        dl = self.datalora_model
        record = dl.runtime.own_last
        if record is None or not model.training:
            return (loss, outputs) if return_outputs else loss
        cfg = self.datalora_config
        if isinstance(outputs, dict) and "retention_loss" in outputs:
            l_ret, l_bal = outputs["retention_loss"], outputs["balance_loss"]
        else:
            aux_losses = dl.aux_losses()
            l_ret, l_bal = aux_losses["retention_loss"], aux_losses["balance_loss"]
        # no retention pressure while dense (warmup): a target of 1 would saturate the
        # keep sigmoid before pruning starts; the term stays in the graph (DDP) at weight 0
        lam = cfg.lambda_prune if dl.runtime.retention < 1.0 else 0.0
        aux = lam * l_ret + cfg.alpha_balance * l_bal
        lm_scaled = self._loss_scaled_for_ga(num_items_in_batch)
        ga = max(int(getattr(self, "current_gradient_accumulation_steps", 1) or 1), 1)
        total = loss + (aux / ga if lm_scaled else aux).to(loss.dtype)
        self._accumulate(loss.detach() * (ga if lm_scaled else 1), l_ret, l_bal, record,
                         task_ids, ga)
        return (total, outputs) if return_outputs else total

    def _check_first_batch(self, inputs: dict[str, Any]) -> None:
        """The first training batch's rows each hold a real token (data whose masks were
        all 0 trained the run with no token for the saliency network and failed at its end,
        "no valid token scores to calibrate on") and its ids and labels fit the model's
        vocabulary (on a GPU an id past it is a device-side assert naming nothing; labels
        are left to a ``compute_loss_func`` of the caller's, which may read them otherwise).
        CausalLMCollator checks every row's mask."""
        mask = inputs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            empty = first_row_without_token(mask)
            if empty is not None:
                raise ValueError(f"inputs: row {empty} of the first training batch has no "
                                 f"real token (attention_mask all 0)")
        problem = out_of_vocabulary(self.datalora_model.base_model, inputs.get("input_ids"),
                                    None if self.compute_loss_func else inputs.get("labels"))
        if problem is not None:
            raise ValueError(f"inputs: the first training batch's {problem}")

    def _loss_scaled_for_ga(self, num_items_in_batch) -> bool:
        """True when the Trainer takes ``compute_loss``'s loss as already divided for
        gradient accumulation (it then skips its own division), decided as
        ``Trainer.training_step`` decides it: the ``loss_is_scaled_for_ga`` override
        (transformers >= 5.2x; older releases lack it) or a loss normalised by
        ``num_items_in_batch`` in the model or in ``compute_loss_func``."""
        override = getattr(self, "loss_is_scaled_for_ga", None)
        if override is not None:
            return bool(override)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                    or self.compute_loss_func is not None)

    @torch.no_grad()
    def _accumulate(self, lm_loss, l_ret, l_bal, record, task_ids, micro_batches: int) -> None:
        """Adds this micro-batch's metrics to running sums kept on the device: no host
        sync here (it runs every micro-batch); :meth:`log` reads them once per log.

        Each is weighted ``1 / micro_batches`` (the micro-batches of its optimizer step), so
        a record is the mean over optimizer steps, as the Trainer's ``loss`` is (an epoch's
        short last step counts as one step, not as fewer micro-batches). A non-finite
        ``lm_loss`` (a batch without targets: 0 / 0) is left out of its mean when
        ``logging_nan_inf_filter`` is on, as the Trainer leaves it out of ``loss``."""
        valid = record.valid.reshape(-1)
        routing = record.routing
        device = valid.device
        n_valid = valid.sum()
        denom = n_valid.clamp_min(1).float()
        kept = (record.kept.reshape(-1) & valid).sum().float()
        rank_scale = routing.rank_scale.float()
        weight = 1.0 / micro_batches
        lm = torch.as_tensor(lm_loss, device=device).float()
        lm_ok = torch.isfinite(lm) if self.args.logging_nan_inf_filter \
            else torch.ones((), dtype=torch.bool, device=device)
        values = weight * torch.stack([
            torch.where(lm_ok, lm, torch.zeros((), device=device)),
            torch.as_tensor(l_ret, device=device).float(),
            torch.as_tensor(l_bal, device=device).float(),
            torch.where(n_valid > 0, kept / denom, torch.ones((), device=device)),
            (record.keep_prob.reshape(-1).float() * valid).sum() / denom,
            (rank_scale * valid[:, None]).sum() / (denom * rank_scale.shape[-1]),
            lm_ok.float()])
        self._sums = values if self._sums is None else self._sums + values
        self._count += weight
        # routes per expert of each sequence [B, E]; their sum is the expert load
        num_experts = self.datalora_config.num_lora_experts
        bsz = record.valid.shape[0]
        ids = routing.expert_ids.long()
        route_valid = valid[:, None].expand_as(ids)
        per_sequence = torch.zeros(bsz, num_experts, device=device).scatter_add_(
            1, ids.reshape(bsz, -1).clamp(0, num_experts - 1),
            route_valid.reshape(bsz, -1).float())
        counts = per_sequence.sum(0)
        self._load = counts if self._load is None else self._load + counts
        if task_ids is not None:
            self._task_routes.append((task_ids.to(device).reshape(-1), per_sequence))
            if len(self._task_routes) >= TASK_ROUTES_COMPACTED_AT:
                self._compact_task_routes()

    def _compact_task_routes(self) -> None:
        """Sums the pending ``(task ids, routes)`` pairs per task into one pair (one read
        of the device, for the distinct ids): without logging they would pile up for a
        whole curriculum phase."""
        tasks = torch.cat([t for t, _ in self._task_routes])
        counts = torch.cat([c for _, c in self._task_routes])
        ids, slot = torch.unique(tasks, return_inverse=True)
        sums = torch.zeros(ids.numel(), counts.shape[1], device=counts.device)
        self._task_routes = [(ids, sums.index_add_(0, slot, counts))]

    def _task_expert_load(self) -> dict[int, torch.Tensor]:
        """``{task id: [E] routes per expert}`` over the micro-batches since the last log
        (host tensors; reads the device once)."""
        if not self._task_routes:
            return {}
        self._compact_task_routes()
        [(tasks, counts)] = self._task_routes
        loads = dict(zip(tasks.cpu().tolist(), counts.cpu(), strict=True))
        return {t: c for t, c in loads.items() if c.sum() > 0}  # tasks seen only as padding

    def _data_parallel_ranks(self) -> int:
        """Processes training this model together (DDP / FSDP ranks), 1 without them."""
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        return max(int(self.args.world_size), 1) if distributed else 1

    def _ranks_task_expert_load(self, ranks: int) -> dict[int, torch.Tensor]:
        """:meth:`_task_expert_load` summed over the ``ranks`` (a collective when > 1)."""
        own = self._task_expert_load()
        if ranks == 1:
            return own
        gathered: list[Any] = [None] * ranks
        torch.distributed.all_gather_object(gathered, {t: c.tolist() for t, c in own.items()})
        total: dict[int, torch.Tensor] = {}
        for loads in gathered:
            for t, c in loads.items():
                total[t] = total.get(t, 0) + torch.tensor(c)
        return total

    # ------------------------------------------------------------------ logging

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._count and self._applied is not None:
            logs.update(self._record_history(logs["loss"]))
        super().log(logs, start_time)

    def _record_history(self, loss: float | None) -> dict[str, float]:
        """Appends the steps since the last record to ``datalora_history`` (``loss``: the
        Trainer's logged loss, None for the steps after the last log) and returns the flat
        metrics for the Trainer's loggers; resets the sums."""
        cur = self._applied  # the schedule of the last step run
        sums = torch.cat([self._sums, self._load])
        ranks = self._data_parallel_ranks()
        if ranks > 1:  # every rank logs (the Trainer's own loss is gathered here too)
            torch.distributed.all_reduce(sums)
            sums = sums / ranks  # the same count of steps on every rank
        sums = sums.tolist()  # one read of the device
        means = {k: v / self._count for k, v in zip(METRICS, sums, strict=False)}
        lm_weight = sums[len(METRICS)]
        means["lm_loss"] = sums[0] / lm_weight if lm_weight > 0 else math.nan
        counts = torch.tensor(sums[len(METRICS) + 1:])
        load = (counts / counts.sum().clamp_min(1)).tolist()
        task_load = {}
        for t, c in sorted(self._ranks_task_expert_load(ranks).items()):
            name = (self.task_names[t] if self.task_names is not None
                    and 0 <= t < len(self.task_names) else str(t))
            task_load[name] = (c / c.sum().clamp_min(1)).tolist()
        self.datalora_history.append({
            "step": self.state.global_step, "epoch": self.state.epoch,
            "phase": PHASES[cur.phase_index], "loss": loss, **means,
            "tau": cur.tau, "retention_target": cur.retention, "expert_load": load,
            "task_expert_load": task_load})
        self._reset_metrics()
        return {"phase": cur.phase_index, "tau": round(cur.tau, 6),
                "retention_target": round(cur.retention, 6),
                **{k: round(v, 6) for k, v in means.items()},
                **{f"expert_load_e{i}": round(x, 6) for i, x in enumerate(load)}}

    # ------------------------------------------------------------------ save / resume

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Writes the adapter, saliency network, config and curriculum (main process).

        ``state_dict``: the full model state dict the Trainer gathers under FSDP
        (``FULL_STATE_DICT``) or DeepSpeed ZeRO-3, where the live parameters are shards.
        """
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.datalora_model.save_pretrained(output_dir, state_dict=state_dict)
        if self.curriculum is not None:
            atomic_write_text(os.path.join(output_dir, CURRICULUM_STATE_NAME),
                              json.dumps(self.curriculum.state_dict(), indent=2, sort_keys=True))
        # compact: rewritten whole at every checkpoint (a record per log, a load per task)
        atomic_write_text(os.path.join(output_dir, HISTORY_NAME),
                          json.dumps(self.datalora_history, separators=(",", ":")))
        pending = os.path.join(output_dir, PENDING_NAME)
        if self._count and self._applied is not None:  # steps since the last log
            atomic_write_text(pending, json.dumps(self._pending_metrics()))
        elif os.path.exists(pending):  # an earlier save's, in a folder saved again
            os.remove(pending)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _pending_metrics(self) -> dict[str, Any]:
        """The metric sums of the steps since the last log and the schedule they ran with
        (what :meth:`_record_history` reads), for a checkpoint."""
        return {"count": self._count, "sums": self._sums.tolist(), "load": self._load.tolist(),
                "task_load": {str(t): c.tolist() for t, c in self._task_expert_load().items()},
                "applied": dataclasses.asdict(self._applied)}

    def _restore_pending_metrics(self, pending: dict[str, Any]) -> None:
        """Continues the sums :meth:`_pending_metrics` saved: the resumed run's next record
        covers the same steps as the uninterrupted run's."""
        device = self.args.device
        self._count = float(pending["count"])
        sums = pending["sums"]
        if len(sums) == len(METRICS):  # a checkpoint of an earlier release: no lm weight
            sums = [*sums, self._count]
        self._sums = torch.tensor(sums, dtype=torch.float32, device=device)
        self._load = torch.tensor(pending["load"], dtype=torch.float32, device=device)
        tasks = pending["task_load"]
        # under DDP every rank restores the main rank's unreduced sums (the only ones
        # saved): the mean over ranks keeps them once, and the per-task loads, summed over
        # ranks, are restored on the main rank only
        if self._data_parallel_ranks() > 1 and torch.distributed.get_rank() != 0:
            tasks = {}
        self._task_routes = [(torch.tensor([int(t) for t in tasks], device=device),
                              torch.tensor(list(tasks.values()), device=device))] if tasks else []
        self._applied = CurriculumState(**pending["applied"])

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if self.is_fsdp_enabled:  # the Trainer's FSDP checkpoint holds the sharded model
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        else:
            self.datalora_model.load_adapter(resume_from_checkpoint)

    def _saved_json(self, checkpoint: str | bool | None, name: str) -> Any:
        """The JSON file ``name`` saved in ``checkpoint`` (``True``: the last complete
        checkpoint in ``output_dir``), or None when there is none."""
        if checkpoint is None or checkpoint is False:
            return None
        if checkpoint is True:
            checkpoint = str(last_complete_checkpoint(self.args.output_dir, stacklevel=3))
        path = os.path.join(checkpoint, name)
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return json.load(f)

    def _curriculum_state_at(self, checkpoint: str | bool | None) -> dict[str, Any] | None:
        """The curriculum state saved in ``checkpoint`` (see :meth:`_saved_json`), or None."""
        return self._saved_json(checkpoint, CURRICULUM_STATE_NAME)

    def _load_best_model(self) -> None:
        if self.is_fsdp_enabled:
            super()._load_best_model()
        else:
            self.datalora_model.load_adapter(self.state.best_model_checkpoint)
        self._warn_if_best_is_not_hardened()

    def _warn_if_best_is_not_hardened(self) -> None:
        """``load_best_model_at_end`` may pick a checkpoint saved before the hardening
        phase (its evaluations ran at that step's retention, dense in warmup); train() then
        sets the curriculum's final state, in which those weights were never trained."""
        checkpoint = self.state.best_model_checkpoint
        saved = self._curriculum_state_at(checkpoint)
        if not saved:
            return
        schedule = CurriculumScheduler()
        schedule.load_state_dict(saved)
        phase = PHASES[schedule.state.phase_index]
        if phase != "hardening":
            tau, retention = self._final_state()
            warnings.warn(f"load_best_model_at_end: the best checkpoint {checkpoint} was saved "
                          f"in the {phase} phase (its eval metrics were taken at that step's "
                          f"retention); the model is then set to the curriculum's final state "
                          f"(tau {tau:g}, retention {retention:g}, hard routing), which those "
                          f"weights were never trained in; compare checkpoints of the "
                          f"hardening phase (save and evaluate after it starts), or restore "
                          f"the state you want with set_curriculum_state",
                          UserWarning, stacklevel=2)

    # ------------------------------------------------------------------ threshold

    def _final_state(self) -> tuple[float, float]:
        """``(tau, retention)`` training ends in: the curriculum's end (its own temperatures
        and target when one was passed), else this trainer's config's."""
        if self.curriculum is not None:
            end = self.curriculum.state_at_progress(1.0)
            return end.tau, end.retention
        return self.datalora_config.temperature_final, self.datalora_config.target_retention

    @torch.no_grad()
    def calibrate_keep_threshold(self, max_batches: int | None = None) -> float:
        """Sets the generation keep threshold from training batches (the valid token
        scores of every rank pooled: the same threshold on every rank, the quantile of
        all their tokens)."""
        dl = self.datalora_model
        if max_batches is None:  # calibrate_batches=0 skips the end-of-training call only
            max_batches = self.calibrate_batches or 4
        max_batches = check_int("max_batches", max_batches, low=1)
        scores, valid = [], []
        # FSDP2 and DeepSpeed gather a module's parameters in its pre-forward hook and free
        # them in its post-forward one, which a forward stopped after the scores skips
        early = sharding_kind(dl) != "fsdp2" and not self.is_deepspeed_enabled
        with eval_mode(dl):  # every module's own mode comes back after
            for i, batch in enumerate(self.get_train_dataloader()):
                if i >= max_batches:
                    break
                batch = self._prepare_inputs(batch)
                batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
                if early:  # the decoder layers need not run
                    rec = dl.runtime.score_tokens(lambda batch=batch: dl(**batch))
                else:
                    dl(**batch)
                    rec = dl.runtime.own_last
                scores.append(rec.saliency.token_scores.reshape(-1))
                valid.append(rec.valid.reshape(-1))
        if not scores:
            raise ValueError("train_dataset: no batches to calibrate the keep threshold on")
        pooled = torch.cat(scores)[torch.cat(valid).bool()]
        ranks = self._data_parallel_ranks()
        if ranks > 1:  # every rank calibrates on every rank's scores: one threshold
            pooled = _gather_varying(pooled, ranks)
        return dl.runtime.calibrate(pooled, retention=self._final_state()[1])

    def _check_resumable(self, checkpoint: str) -> None:
        """:func:`~datalora.checkpoints.check_resumable` (``save_only_model`` checkpoints;
        DeepSpeed and FSDP keep the optimizer state in their own files)."""
        if not (self.is_deepspeed_enabled or self.is_fsdp_enabled
                or not os.path.isdir(checkpoint)):
            check_resumable(checkpoint)

    def _inner_training_loop(self, *args: Any, **kwargs: Any) -> TrainOutput:
        """Every run of the training loop starts from train()'s checkpoint (or nothing): its
        own curriculum, metric sums and history. ``auto_find_batch_size`` runs the loop
        again after an out-of-memory error, with another step count; the first attempt's
        curriculum and records must not carry over."""
        checkpoint = self._run_checkpoint
        self._resume_curriculum = self._curriculum_state_at(checkpoint)
        if self._own_curriculum:
            self.curriculum = None
        else:  # a curriculum passed in gets this run's length again
            for name in self._filled_curriculum_fields:
                setattr(self.curriculum, name, None)
        self._filled_curriculum_fields = []
        self._applied = None
        self._first_batch_checked = False
        self._reset_metrics()
        history = self._saved_json(checkpoint, HISTORY_NAME)
        self.datalora_history = list(history or [])
        pending = self._saved_json(checkpoint, PENDING_NAME)
        if pending:
            self._restore_pending_metrics(pending)
        if checkpoint:
            _warn_if_metrics_were_not_saved(checkpoint, history, pending is not None)
        return super()._inner_training_loop(*args, **kwargs)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any,
              **kwargs: Any) -> TrainOutput:
        """``Trainer.train``, then sets the final curriculum state (``temperature_final``,
        ``target_retention``, hard routing) and calibrates the keep threshold.

        The curriculum state is read from ``resume_from_checkpoint`` here, not where the
        weights are loaded: DeepSpeed resumes without ``_load_from_checkpoint``. So is the
        ``datalora_history`` of the steps before the checkpoint, which the new records
        extend (a checkpoint written before the history was saved resumes with none).
        ``resume_from_checkpoint=True`` resumes the last *complete* checkpoint in
        ``output_dir`` (one without a readable ``trainer_state.json``, a save cut short, is
        skipped with a warning; Hugging Face's own choice would fail on it).
        """
        # (no model between hyperparameter-search trials: the Trainer builds it from model_init)
        if self.model is not None and not any(p.requires_grad for p in self.model.parameters()):
            raise ValueError("model: has no trainable parameters (DATALORAModel.from_pretrained "
                             "loads an adapter frozen for inference; pass is_trainable=True "
                             "to train it further)")
        if has_length(self.train_dataset) and len(self.train_dataset) == 0:
            # failed in torch's sampler: "num_samples should be a positive integer value"
            raise ValueError("train_dataset: empty (0 rows), nothing to train on")
        if resume_from_checkpoint is True:
            resume_from_checkpoint = str(last_complete_checkpoint(self.args.output_dir))
        if resume_from_checkpoint:
            self._check_resumable(str(resume_from_checkpoint))
        self._run_checkpoint = resume_from_checkpoint or None
        output = super().train(resume_from_checkpoint, *args, **kwargs)
        if self._count and self._applied is not None:  # steps after the last log
            self._record_history(None)
        # the callback applies a step's state when the step begins, so the model would be
        # left in the state of the last step's start (sparsification for runs of 1-2 steps
        # or a split without hardening); leave it in the final inference state instead,
        # the one a reloaded adapter gets (DATALORAModel.__init__)
        # (the trainer's curriculum / config, which may differ from the model's config)
        tau, retention = self._final_state()
        stopped = self._applied is not None and self.state.global_step < self.state.max_steps
        if stopped and PHASES[self._applied.phase_index] != "hardening":
            warnings.warn(f"training stopped at step {self.state.global_step} of "
                          f"{self.state.max_steps} (a callback, e.g. early stopping), in the "
                          f"{PHASES[self._applied.phase_index]} phase: the model is set to the "
                          f"curriculum's final state (tau {tau:g}, retention {retention:g}, "
                          f"hard routing), which it was never trained in; set max_steps to "
                          f"the run you expect, or restore the state you want with "
                          f"set_curriculum_state", UserWarning, stacklevel=2)
        self.datalora_model.set_curriculum_state(tau, retention, True)
        if self.calibrate_batches > 0:
            self.calibrate_keep_threshold()
        return output


def _warn_if_metrics_were_not_saved(checkpoint: str, history: list | None,
                                    has_pending: bool) -> None:
    """Checkpoints of releases before the history (2026-11-30) and the pending metric sums
    (2026-12-02) were saved resume the weights and the curriculum exactly, but not the
    DATALORA records: say which part of the run's history the resumed one lacks."""
    state = saved_trainer_state(Path(checkpoint)) or {}
    step = state.get("global_step")
    if history is None and step:
        warnings.warn(f"resume_from_checkpoint: {checkpoint} holds no {HISTORY_NAME} (saved by "
                      f"an older datalora): the resumed datalora_history starts after step "
                      f"{step}", UserWarning, stacklevel=4)
    elif (not has_pending and history and isinstance(step, int)
          and history[-1].get("step", step) < step):
        warnings.warn(f"resume_from_checkpoint: {checkpoint} holds no {PENDING_NAME} (saved "
                      f"by an older datalora): the first DATALORA record after it averages "
                      f"only the steps after step {step}, not those since the last log "
                      f"(step {history[-1]['step']})", UserWarning, stacklevel=4)


__all__ = ["CURRICULUM_STATE_NAME", "HISTORY_NAME", "PENDING_NAME", "CurriculumCallback",
           "DATALORATrainer"]
