"""A small, dependency-free fine-tuning loop for adapters (demo, tests, adapter experiments).

For full training runs use :class:`datalora.trainer.DATALORATrainer` (a HF ``Trainer``);
this loop is for short CPU runs where a progress bar and per-step records are all we need.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from datalora.checks import check_int, check_number
from datalora.data import TASKS, CausalLMCollator, tokenize_example
from datalora.layers import MoLoRALinear


@dataclass
class StepRecord:
    """What one optimisation step measured."""

    step: int
    loss: float
    expert_load: list[float] | None = None  # [E] fraction of routes per expert (all layers)
    task_expert_load: dict[str, list[float]] = field(default_factory=dict)


def routed_expert_load(model: nn.Module, token_task: torch.Tensor | None = None,
                       token_mask: torch.Tensor | None = None,
                       tasks: Sequence[str] = TASKS) -> tuple[list[float] | None,
                                                              dict[str, list[float]]]:
    """Expert load of the last forward, averaged over every MoLoRA layer.

    Args:
        model: contains :class:`MoLoRALinear` layers that have run a forward (layers
            whose routing covers fewer tokens, inside a pruned range, are not counted).
        token_task: ``[T]`` task id per token (same flattening as the layers' input).
        token_mask: ``[T]`` bool, tokens to count (e.g. not padding).

    Returns:
        ``(load [E], {task: load [E]})`` as fractions of routes, or ``(None, {})``.
    """
    expected = next((t.numel() for t in (token_mask, token_task) if t is not None), None)
    # layers inside a pruned range routed only the kept tokens: they are left out
    layers = [m for m in model.modules() if isinstance(m, MoLoRALinear)
              and m.last_routing is not None
              and (expected is None or m.last_routing.num_tokens == expected)]
    if not layers:
        return None, {}
    E = layers[0].num_experts
    total = torch.zeros(E)
    per_task = torch.zeros(len(tasks), E)
    for layer in layers:
        ids = layer.last_routing.expert_ids.detach().cpu().long()
        keep = torch.ones(ids.shape[0], dtype=torch.bool) if token_mask is None else token_mask
        onehot = torch.zeros(ids.shape[0], E).scatter_add_(1, ids, torch.ones_like(ids,
                                                                                  dtype=torch.float))
        onehot = onehot[keep]
        total += onehot.sum(0)
        if token_task is not None:
            task = token_task[keep]
            valid = (task >= 0) & (task < len(tasks))
            per_task.index_add_(0, task[valid], onehot[valid])
    load = (total / total.sum().clamp_min(1)).tolist()
    task_load = {tasks[i]: (row / row.sum()).tolist() for i, row in enumerate(per_task)
                 if row.sum() > 0}
    return load, task_load


def optimisation_steps(model: nn.Module, collate: Callable[[list], dict[str, torch.Tensor]],
                       features: Sequence[Any], *, steps: int, batch_size: int, lr: float,
                       seed: int = 0, weight_decay: float = 0.0, warmup: bool = False,
                       progress: bool = True, desc: str = "fine-tuning",
                       aux_loss: Callable[[nn.Module], torch.Tensor] | None = None,
                       ) -> Iterator[tuple[int, dict[str, torch.Tensor], torch.Tensor]]:
    """AdamW over the trainable parameters of ``model``, one batch per step.

    Batches of ``batch_size`` features cycle through a shuffled order (``seed``; the model's
    own randomness -- dropout, DATALORA's Gumbel routing noise -- draws from torch's global
    RNG: seed it with ``torch.manual_seed`` for a reproducible run); each batch
    goes through ``collate``, its tensors (all but ``task_ids``) move to the model's device.
    ``warmup`` ramps the learning rate linearly over the first tenth of the steps. Yields
    ``(step, batch, loss)`` after every optimizer step (``batch`` keeps ``task_ids`` on the
    CPU when the collator returns them); the model is in eval mode when it is exhausted.
    """
    steps = check_int("steps", steps, low=1)
    batch_size = check_int("batch_size", batch_size, low=1)
    lr = check_number("lr", lr, low=0, low_inclusive=False)
    if not features:
        raise ValueError("features: no training examples")
    if batch_size > len(features):
        warnings.warn(f"batch_size: {batch_size} is more than the {len(features)} training "
                      f"examples; each batch holds all {len(features)}", stacklevel=2)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model: has no trainable parameters (attach adapters first)")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = (torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, steps // 10))) if warmup else None)
    order = list(range(len(features)))
    rng = random.Random(seed)
    device = next(model.parameters()).device
    model.train()
    bar = tqdm(range(steps), desc=desc, disable=not progress, dynamic_ncols=True)
    cursor = len(order)
    for step in bar:
        if cursor + batch_size > len(order):
            rng.shuffle(order)
            cursor = 0
        batch = collate([features[i] for i in order[cursor:cursor + batch_size]])
        cursor += batch_size
        batch = {k: v if k == "task_ids" else v.to(device) for k, v in batch.items()}
        loss = model(**{k: v for k, v in batch.items() if k != "task_ids"}).loss
        if aux_loss is not None:
            loss = loss + aux_loss(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if schedule is not None:
            schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        yield step + 1, batch, loss
    model.eval()


def finetune(model: nn.Module, tokenizer: Any, rows: Sequence[dict[str, str]], *, steps: int,
             batch_size: int = 16, lr: float = 3e-3, max_length: int = 128, seed: int = 0,
             weight_decay: float = 0.0, progress: bool = True,
             aux_loss: Callable[[nn.Module], torch.Tensor] | None = None,
             on_step: Callable[[StepRecord], None] | None = None) -> list[StepRecord]:
    """Trains the parameters of ``model`` that require grad with AdamW on ``rows``.

    Args:
        model: a causal LM (e.g. a :class:`~datalora.model.DATALORAModel`).
        tokenizer: tokenizes rows with :func:`~datalora.data.tokenize_example`.
        rows: instruction rows (``system_prompt, question, response[, task]``).
        steps: optimisation steps; batches cycle through shuffled rows.
        seed: the batch order; dropout and routing noise draw from torch's global RNG
            (seed it with ``torch.manual_seed`` for a reproducible run).
        aux_loss: optional extra loss computed from the model after each forward.
        on_step: callback receiving every :class:`StepRecord`.

    Returns:
        One :class:`StepRecord` per step.
    """
    if not rows:
        raise ValueError("rows: expected at least one training row, got none")
    collate = CausalLMCollator(tokenizer=tokenizer, return_task_ids=True)
    encoded = [dict(tokenize_example(r, tokenizer, max_length), task=r.get("task", ""))
               for r in rows]
    records: list[StepRecord] = []
    for step, batch, loss in optimisation_steps(
            model, collate, encoded, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
            weight_decay=weight_decay, warmup=True, progress=progress, aux_loss=aux_loss):
        mask = batch["attention_mask"].reshape(-1).bool().cpu()
        token_task = batch["task_ids"][:, None].expand_as(batch["input_ids"]).reshape(-1)
        load, task_load = routed_expert_load(model, token_task, mask)
        record = StepRecord(step=step, loss=loss.item(), expert_load=load,
                            task_expert_load=task_load)
        records.append(record)
        if on_step is not None:
            on_step(record)
    return records


@torch.no_grad()
def generate_answer(model: nn.Module, tokenizer: Any, row: dict[str, str],
                    max_new_tokens: int = 24) -> str:
    """Greedy answer of ``model`` to an instruction row (prompt per ``format_prompt``)."""
    from datalora.data import format_prompt, prompt_inputs

    inputs = prompt_inputs(tokenizer, format_prompt(row), next(model.parameters()).device)
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
