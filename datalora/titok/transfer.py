"""TITOK step 5: train a fresh LoRA / MoLoRA on the target with the selection mask, and
:func:`titok_transfer`, which runs all five steps."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from datalora.checks import as_scalar, check_flag, check_int, check_number
from datalora.data import (
    IGNORE_INDEX,
    CausalLMCollator,
)
from datalora.finetune import optimisation_steps
from datalora.titok._util import check_fraction, check_rows, model_device, seeded
from datalora.titok.alignment import build_masked_examples
from datalora.titok.excess import (
    ScoredSample,
    _check_can_disable,
    _check_separate_base,
    contrastive_excess,
    response_offsets,
)
from datalora.titok.synthetic import check_generation, generate_synthetic


def _labels(labels: Any, i: int) -> torch.Tensor:
    try:
        return torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError):  # strings, ragged lists, None
        raise ValueError(f"examples: example {i} has labels {labels!r:.60}, expected a list "
                         f"of ints") from None


def train_masked(model: nn.Module, tokenizer: Any, examples: Sequence[dict[str, list[int]]], *,
                 steps: int, batch_size: int = 8, lr: float = 2e-2, seed: int = 0,
                 progress: bool = True) -> list[float]:
    """AdamW on the trainable parameters of ``model`` with the examples' label masks.

    Returns:
        The loss of every step.
    """
    check_rows("examples", examples, "input_ids", "labels", item="example")
    examples = list(examples)  # indexed by the batching (a dict_values is not)
    if not examples:
        raise ValueError("examples: expected at least one training example, got none")
    unlabelled = [i for i, ex in enumerate(examples)  # labels: a list, [L] or [1, L]
                  if not _labels(ex["labels"], i).ne(IGNORE_INDEX).any()]
    if unlabelled:
        raise ValueError(f"examples: {len(unlabelled)} examples have no label (every label "
                         f"{IGNORE_INDEX}; first: index {unlabelled[0]}); a batch of them has "
                         f"a NaN loss (build_masked_examples drops them)")
    return [loss.item() for _, _, loss in optimisation_steps(
        model, CausalLMCollator(tokenizer=tokenizer), examples, steps=steps,
        batch_size=batch_size, lr=lr, seed=seed, progress=progress, desc="TITOK training")]


ADAPTERS = ("lora", "molora")
DEFAULT_TARGET_MODULES = ("q_proj", "v_proj", "o_proj", "up_proj", "down_proj")


def check_target_modules(model: nn.Module, adapter: str, targets: Sequence[str]) -> None:
    """Checks, before any work, that ``targets`` name modules of ``model`` the adapter can
    wrap: for ``"lora"`` (PEFT) a module whose name is a target or ends with ``.target``;
    for ``"molora"`` an ``nn.Linear`` whose last name part is a target (GPT-2's ``Conv1D``
    ``c_attn`` / ``c_proj`` cannot take MoLoRA)."""
    if adapter not in ADAPTERS:
        raise ValueError(f"adapter: expected one of {ADAPTERS}, got {adapter!r}")
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets:
        raise ValueError("target_modules: expected at least one module name, got none")
    modules = [(n, m) for n, m in model.named_modules() if n]
    linears = sorted({n.rsplit(".", 1)[-1] for n, m in modules
                      if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"})
    if adapter == "molora":
        found = [n for n, m in modules if isinstance(m, nn.Linear)
                 and n.rsplit(".", 1)[-1] in targets]
    else:
        named = [(n, m) for n, m in modules if any(n == t or n.endswith(f".{t}")
                                                    for t in targets)]
        # PEFT refuses a container (a decoder layer's MLP): its layers must be named
        for n, m in named:
            if not hasattr(m, "weight") and next(m.children(), None) is not None:
                raise ValueError(f"target_modules: {n!r} is a {type(m).__name__}, a "
                                 f"container a LoRA cannot wrap; name its layers (the "
                                 f"model's linear layers are named {linears})")
        found = [n for n, _ in named]
    if not found:
        need = "nn.Linear " if adapter == "molora" else ""
        raise ValueError(f"target_modules: none of {targets} names a {need}module of the "
                         f"target model; its linear layers are named {linears}")


def _attach_adapter(model: nn.Module, adapter: str, rank: int, alpha: float,
                    targets: Sequence[str]) -> nn.Module:
    """A fresh trainable adapter on ``model``: a PEFT LoRA, or MoLoRA (4 experts, top-2)."""
    if adapter == "lora":
        from peft import LoraConfig, get_peft_model

        return get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha,
                                                target_modules=list(targets),
                                                lora_dropout=0.0, task_type="CAUSAL_LM"))
    if adapter == "molora":
        from datalora.config import DATALORAConfig
        from datalora.model import get_datalora_model

        return get_datalora_model(model, DATALORAConfig(
            num_lora_experts=4, lora_rank=rank, lora_alpha=alpha, num_active_experts=2,
            target_modules=list(targets), routing="per_layer"), verbose=False)
    raise ValueError(f"adapter: expected one of {ADAPTERS}, got {adapter!r}")


def titok_transfer(source_model: nn.Module, source_tokenizer: Any, target_model: nn.Module,
                   target_tokenizer: Any, seed_rows: Sequence[dict[str, str]], *,
                   sample_keep: float = 0.5, token_keep: float = 0.5,
                   samples_per_prompt: int = 1, max_new_tokens: int = 24,
                   do_sample: bool = True, temperature: float = 0.7, top_p: float = 0.95,
                   score_max_length: int = 256, max_length: int = 128, reduce: str = "max",
                   drop_empty: bool = True,
                   adapter: str = "lora", rank: int = 8, alpha: float = 16.0,
                   target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
                   steps: int = 60, batch_size: int = 8, lr: float = 2e-2, seed: int = 0,
                   synthetic: Sequence[dict[str, str]] | None = None,
                   scored: Sequence[ScoredSample] | None = None,
                   source_base_model: nn.Module | None = None,
                   progress: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """Transfers ``source_model``'s adapter to ``target_model``.

    Args:
        source_model: the source with its adapter (a PEFT model, a DATALORA model or a
            model with injected MoLoRA layers, see :func:`contrastive_excess`).
        seed_rows: prompts (``question``, optional ``system_prompt``) the source answers.
        samples_per_prompt, max_new_tokens, do_sample, temperature, top_p: generation of
            the synthetic responses (:func:`generate_synthetic`).
        score_max_length: prompt + response tokens scored by the source
            (:func:`contrastive_excess`); max_length: the target's training length (tokens
            are selected among the response tokens it keeps).
        reduce, drop_empty, sample_keep, token_keep: see :func:`build_masked_examples`.
        source_base_model: the source model without its adapter, for the base pass of
            the scoring (``base_model`` of :func:`contrastive_excess`; required where
            :func:`disabled_is_not_base` gives a reason).
        adapter: ``"lora"`` (PEFT ``LoraConfig(r=rank, lora_alpha=alpha)``) or ``"molora"``
            (datalora MoLoRA, 4 experts, top-2, per-layer routing); ``target_modules``
            must name modules of ``target_model`` (MoLoRA: ``nn.Linear`` only, so GPT-2's
            ``Conv1D`` ``c_attn`` is not supported).

    ``seed`` seeds the generation, the adapter's initialisation and the training's batch
    order and dropout (torch's RNG inside the call; the caller's RNG state is restored
    after): the same seed gives the same adapter whatever ran before.

    Arguments are checked (keep fractions, ``drop_empty``, ``seed``, the seed rows and
    generation settings unless ``synthetic`` is given, adapter, target modules,
    ``reduce``, lengths, training settings, the tokenizers' character offsets) before any
    generation or scoring.

    Returns:
        ``(target with the new adapter, report)``; ``report`` holds the synthetic rows,
        the selection stats and the training losses. Pass ``synthetic`` / ``scored`` to
        reuse earlier steps (e.g. to compare selections on the same data). Save the
        adapter with ``target.save_pretrained(folder)`` (PEFT or datalora format).
    """
    check_fraction("sample_keep", sample_keep)
    check_fraction("token_keep", token_keep)
    drop_empty = check_flag("drop_empty", drop_empty)
    seed = check_int("seed", as_scalar(seed))  # a numpy int failed in random.Random later
    if synthetic is None:
        seed_rows, do_sample, temperature, top_p = check_generation(
            seed_rows, samples_per_prompt, max_new_tokens, do_sample, temperature, top_p)
    # one name as a str (list("q_proj") would target the modules "q", "_", "p", ...)
    target_modules = [target_modules] if isinstance(target_modules, str) \
        else list(target_modules)
    check_target_modules(target_model, adapter, target_modules)
    if reduce not in ("max", "mean"):
        raise ValueError(f"reduce: expected 'max' or 'mean', got {reduce!r}")
    for name, value in (("max_length", max_length), ("score_max_length", score_max_length)):
        check_int(name, value, low=2)
    check_int("steps", steps, low=1)
    check_int("batch_size", batch_size, low=1)
    check_number("lr", lr, low=0, low_inclusive=False)
    check_int("rank", rank, low=1)
    check_number("alpha", alpha, low=0, low_inclusive=False)
    tokenizers = [("target_tokenizer", target_tokenizer)]
    if scored is None:
        tokenizers.append(("source_tokenizer", source_tokenizer))
    for name, tokenizer in tokenizers:  # both align by character offsets, pad and end rows
        try:
            response_offsets(tokenizer, "a")
        except ValueError as exc:
            raise ValueError(f"{name}: {str(exc).partition(': ')[2]}") from None
        for token in ("eos", "pad"):
            if getattr(tokenizer, f"{token}_token_id", None) is None:
                raise ValueError(f"{name}: has no {token}_token_id; set {name}.{token}_token"
                                 + (" (e.g. to its eos_token)" if token == "pad" else ""))
    if scored is None:  # before generating: the scoring's base pass must be possible
        if source_base_model is None:
            _check_can_disable(source_model)
        else:
            _check_separate_base(source_model, source_base_model)
    if synthetic is None:
        synthetic = generate_synthetic(source_model, source_tokenizer, seed_rows,
                                       samples_per_prompt=samples_per_prompt,
                                       max_new_tokens=max_new_tokens, do_sample=do_sample,
                                       temperature=temperature, top_p=top_p, seed=seed,
                                       progress=progress)
    if scored is None:
        scored = contrastive_excess(source_model, source_tokenizer, synthetic,
                                    base_model=source_base_model, max_length=score_max_length,
                                    progress=progress)
    examples, stats = build_masked_examples(scored, target_tokenizer, sample_keep=sample_keep,
                                            token_keep=token_keep, max_length=max_length,
                                            reduce=reduce, drop_empty=drop_empty)
    if not examples:
        empty = len(scored) - stats["num_usable"]
        raise ValueError(f"synthetic: no training example left of the {len(scored)} synthetic "
                         f"samples ({empty} with an empty response, dropped by drop_empty; "
                         f"{stats['dropped_no_labels']} without a label after selection): "
                         f"give the source more max_new_tokens or other seed prompts")
    # seeded before the adapter: its initialisation is part of the seed
    with seeded(seed, model_device(target_model)):
        target = _attach_adapter(target_model, adapter, rank, alpha, target_modules)
        losses = train_masked(target, target_tokenizer, examples, steps=steps,
                              batch_size=batch_size, lr=lr, seed=seed, progress=progress)
    return target, {"synthetic": list(synthetic), "scored": list(scored), "selection": stats,
                    "losses": losses}


