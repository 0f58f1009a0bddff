"""TITOK: transplant a LoRA adapter to another base model through token-level signals.

Pipeline (seeds/titok_summary.txt):

1. :func:`generate_synthetic` -- the source model *with* its LoRA answers seed prompts
   (sampling), giving synthetic (prompt, response) rows without the original data.
2. :func:`contrastive_excess` -- per response token ``y_t`` (EOS included)
   ``excess_t = log p_source+LoRA(y_t | y_<t) - log p_source(y_t | y_<t)``: how much the
   adapter contributes to that token.
3. :func:`select_samples` keeps the samples with the largest mean excess (a fraction);
   :func:`select_tokens` keeps the top fraction of tokens of each kept sample; the kept
   tokens form the loss mask.
4. :func:`align_token_scores` -- when the target's tokenizer differs, each target token
   takes the scores of the source tokens whose character spans overlap it.
5. :func:`train_masked` trains a fresh LoRA (PEFT) or MoLoRA on the target with that mask.

:func:`titok_transfer` runs all five steps.
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from datalora.checks import check_int, check_number
from datalora.cli import (
    check_output_file,
    check_output_folder,
    fraction,
    int_at_least,
    positive_float,
)
from datalora.data import (
    IGNORE_INDEX,
    CausalLMCollator,
    format_prompt,
    prompt_inputs,
    response_start,
    tokenize_example,
)
from datalora.finetune import optimisation_steps
from datalora.layers import MoLoRALinear, adapters_off
from datalora.ops.validation import check_tensor
from datalora.pruning import keep_count
from datalora.tle.adapters import BASE_CHANGING_INITS

__all__ = [
    "ScoredSample",
    "adapter_disabled",
    "align_token_scores",
    "build_masked_examples",
    "check_target_modules",
    "contrastive_excess",
    "generate_synthetic",
    "response_log_probs",
    "response_offsets",
    "select_samples",
    "select_tokens",
    "tile_spans",
    "titok_transfer",
    "train_masked",
]


def _check_fraction(name: str, value: float) -> None:
    check_number(name, value, low=0, low_inclusive=False, high=1)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def _eval_mode(model: Any) -> Iterator[None]:
    """``model`` (an ``nn.Module``) in eval mode inside the block: no dropout, no training-time
    noise (DATALORA's Gumbel pruning); every submodule's own mode comes back after."""
    if not isinstance(model, nn.Module):
        yield
        return
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


# --------------------------------------------------------------------------- 1. synthetic data

@torch.no_grad()
def generate_synthetic(model: nn.Module, tokenizer: Any, seed_rows: Sequence[dict[str, str]],
                       *, samples_per_prompt: int = 1, max_new_tokens: int = 24,
                       do_sample: bool = True, temperature: float = 0.7, top_p: float = 0.95,
                       batch_size: int = 16, seed: int = 0,
                       progress: bool = True) -> list[dict[str, str]]:
    """Synthetic rows: the source model + LoRA answers each seed prompt.

    Args:
        model: the source model with its adapter active (e.g. a ``PeftModel``).
        seed_rows: rows with ``question`` (and optional ``system_prompt``, ``task``); their
            ``response`` is never read.
        samples_per_prompt: responses sampled per seed prompt.

    Returns:
        Rows ``{id, system_prompt, question, response, task}``; ``response`` is the
        generated text (up to EOS), with ``samples_per_prompt * len(seed_rows)`` rows.
    """
    if not seed_rows:
        raise ValueError("seed_rows: expected at least one seed prompt, got none")
    samples_per_prompt = check_int("samples_per_prompt", samples_per_prompt, low=1)
    batch_size = check_int("batch_size", batch_size, low=1)
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature: expected > 0, got {temperature!r}")
    device = _device(model)
    jobs = [row for row in seed_rows for _ in range(samples_per_prompt)]
    out: list[dict[str, str]] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # batched generation continues every prompt at its end
    torch.manual_seed(seed)
    try:
        with _eval_mode(model):  # no dropout / training noise; modes restored after
            for i in tqdm(range(0, len(jobs), batch_size), desc="synthetic data",
                          disable=not progress, dynamic_ncols=True):
                chunk = jobs[i:i + batch_size]
                enc = prompt_inputs(tokenizer, [format_prompt(r) for r in chunk], device,
                                    padding=True)
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                     temperature=temperature if do_sample else None,
                                     top_p=top_p if do_sample else None, top_k=None,
                                     pad_token_id=tokenizer.pad_token_id,
                                     eos_token_id=tokenizer.eos_token_id)
                for j, row in enumerate(chunk):
                    text = tokenizer.decode(gen[j, enc["input_ids"].shape[1]:],
                                            skip_special_tokens=True)
                    out.append({"id": f"synthetic.{len(out)}",
                                "system_prompt": row.get("system_prompt", "") or "",
                                "question": row["question"], "response": text.strip(),
                                "task": row.get("task", "unknown")})
    finally:
        tokenizer.padding_side = side
    return out


# --------------------------------------------------------------------------- 2. excess

@dataclass
class ScoredSample:
    """One synthetic row scored by the source.

    Attributes:
        row: the synthetic row.
        offsets: ``[n]`` character spans ``(start, end)`` of the response tokens in
            ``row["response"]`` (source tokenizer); the final EOS is ``(len, len)``.
        logp_lora / logp_base: ``[n]`` log-probabilities of each response token.
        excess: ``[n]`` ``logp_lora - logp_base``.
    """

    row: dict[str, str]
    offsets: list[tuple[int, int]]
    logp_lora: torch.Tensor
    logp_base: torch.Tensor

    @property
    def excess(self) -> torch.Tensor:
        return self.logp_lora - self.logp_base

    @property
    def mean_excess(self) -> float:
        """Mean of the finite token excesses (a token both models rule out gives
        ``-inf - -inf = NaN``); ``-inf`` when there is none, so the sample ranks last."""
        excess = self.excess
        finite = excess[torch.isfinite(excess)]
        return float(finite.mean()) if finite.numel() else float("-inf")


def response_offsets(tokenizer: Any, response: str,
                     prompt: str | None = None) -> list[tuple[int, int]]:
    """Character spans (in ``response``) of the response tokens as
    :func:`~datalora.data.tokenize_example` encodes them: with ``prompt`` (the row's
    :func:`~datalora.data.format_prompt`), the tokens of prompt + response encoded as one
    text after those matching the prompt's own encoding (a token starting in the prompt
    spans from 0); without, ``tokenizer(response, add_special_tokens=False)`` (the same
    tokens for a byte-level BPE). Plus ``(len, len)`` for EOS."""
    text = response if prompt is None else prompt + response
    try:
        enc = tokenizer(text, add_special_tokens=prompt is not None, return_offsets_mapping=True)
    except NotImplementedError:  # a Python (slow) tokenizer on transformers 4.x
        enc = {}
    if "offset_mapping" not in enc:
        raise ValueError(f"tokenizer: {type(tokenizer).__name__} returns no character offsets "
                         f"(return_offsets_mapping); TITOK aligns tokens by offsets and needs "
                         f"a fast (tokenizers-backed) tokenizer")
    start, shift = 0, 0
    if prompt is not None:
        start = response_start(tokenizer(prompt, add_special_tokens=True)["input_ids"],
                               enc["input_ids"], response)
        shift = len(prompt)
    spans = [(max(int(s) - shift, 0), max(int(e) - shift, 0))
             for s, e in enc["offset_mapping"][start:]]
    ids = enc["input_ids"]
    if prompt is not None and len(ids) > start and ids[-1] == getattr(tokenizer, "eos_token_id",
                                                                       None):
        spans.pop()  # the tokenizer's own EOS: tokenize_example appends no second one
    return spans + [(len(response), len(response))]


@torch.no_grad()
def response_log_probs(model: nn.Module | Callable[..., Any], tokenizer: Any,
                       rows: Sequence[dict[str, str]], *, batch_size: int = 16,
                       max_length: int = 256, device: torch.device | None = None,
                       progress: bool = False, desc: str = "scoring") -> list[torch.Tensor]:
    """``log p(y_t | prompt, y_<t)`` of every response token (EOS included) of each row.

    Rows are encoded with :func:`~datalora.data.tokenize_example`; ``model(input_ids,
    attention_mask)`` must return an object with ``logits [B, L, V]``. An ``nn.Module``
    runs in eval mode (no dropout), its own mode restored after.

    Returns:
        One float32 tensor ``[n_i]`` per row (``n_i`` = response tokens + EOS).
    """
    batch_size = check_int("batch_size", batch_size, low=1)
    collate = CausalLMCollator(tokenizer=tokenizer)
    if device is None:
        device = _device(model) if isinstance(model, nn.Module) else torch.device("cpu")
    out: list[torch.Tensor] = []
    with _eval_mode(model):  # no dropout / training noise in a score; modes restored after
        for i in tqdm(range(0, len(rows), batch_size), desc=desc, disable=not progress,
                      dynamic_ncols=True):
            batch = collate([tokenize_example(r, tokenizer, max_length)
                             for r in rows[i:i + batch_size]])
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits.float()
            logp = F.log_softmax(logits[:, :-1], dim=-1)
            target = batch["labels"][:, 1:]
            picked = logp.gather(-1, target.clamp_min(0)[..., None])[..., 0]
            for b in range(target.shape[0]):
                out.append(picked[b][target[b] != IGNORE_INDEX].cpu())
    return out


def _molora_layers(model: nn.Module) -> list[MoLoRALinear]:
    return [m for m in model.modules() if isinstance(m, MoLoRALinear)]


def disabled_is_not_base(model: nn.Module) -> str | None:
    """Why ``model``'s ``disable_adapter()`` would not run its base model, or None: a PEFT
    adapter with trained biases (``bias='all'`` / ``'lora_only'``: they stay on) or one
    whose initialisation rewrote the base weights (PiSSA, OLoRA, ...: the residual stays)."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        return None
    active = getattr(model, "active_adapters", None) or [getattr(model, "active_adapter", None)]
    for name in active:
        config = configs.get(name)
        bias = getattr(config, "bias", "none")
        if bias not in (None, "none"):
            return f"adapter {name!r} has bias={bias!r}, whose biases stay on when disabled"
        init = getattr(config, "init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
            return (f"adapter {name!r} was initialised with init_lora_weights={init!r}, "
                    f"which rewrote the base weights")
    return None


def _check_can_disable(model: nn.Module) -> None:
    if not (hasattr(model, "disable_adapter") or _molora_layers(model)):
        raise TypeError(f"base_model: required when lora_model is neither a PEFT model (no "
                        f"disable_adapter()) nor a DATALORA / MoLoRA model (no MoLoRA layer); "
                        f"got {type(model).__name__}")
    reason = disabled_is_not_base(model)
    if reason is not None:
        raise ValueError(f"base_model: required: {reason}, so the model with its adapter "
                         f"disabled is not the base model; pass base_model=, the source model "
                         f"loaded again without the adapter")


@contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[None]:
    """Runs ``model`` without its adapter: a PEFT or :class:`~datalora.model.DATALORAModel`
    inside its ``disable_adapter()`` (DATALORA: token pruning off too); a model with
    injected MoLoRA layers with their ``adapter_enabled`` off; restored after."""
    _check_can_disable(model)
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield
        return
    with adapters_off(_molora_layers(model)):
        yield


def _check_separate_base(lora_model: nn.Module, base_model: nn.Module) -> None:
    """Refuses a ``base_model`` sharing parameters with ``lora_model``: PEFT and DATALORA
    inject the adapter in place, so the wrapped model runs the adapter too."""
    own = {id(p) for p in lora_model.parameters()}
    if base_model is lora_model or any(id(p) in own for p in base_model.parameters()):
        raise ValueError("base_model: shares parameters with lora_model (e.g. the model the "
                         "adapter was injected into in place, such as a DATALORA model's "
                         ".base_model or a PEFT model's get_base_model()), so both passes "
                         "would run the adapter and every excess would be 0; pass "
                         "base_model=None to run the base pass with the adapter disabled, or "
                         "a separate copy of the source model")


def contrastive_excess(lora_model: nn.Module, tokenizer: Any,
                       rows: Sequence[dict[str, str]], *, base_model: nn.Module | None = None,
                       batch_size: int = 16, max_length: int = 256,
                       progress: bool = True) -> list[ScoredSample]:
    """Scores every response token of ``rows`` by ``log p_lora - log p_base``.

    Args:
        lora_model: source model with its adapter: a PEFT model, a
            :class:`~datalora.model.DATALORAModel` or a model with injected MoLoRA layers;
            without ``base_model`` the base pass runs with the adapter disabled
            (:func:`adapter_disabled`).
        base_model: the source model without the adapter (optional): a separate model,
            sharing no parameter with ``lora_model``.
        max_length: the prompt + response length scored (longer rows are cut as by
            :func:`~datalora.data.tokenize_example`; their tail tokens get no score).
        progress: a progress bar per pass (with the adapter, base).

    Returns:
        One :class:`ScoredSample` per row.
    """
    if base_model is None:
        _check_can_disable(lora_model)
    else:
        _check_separate_base(lora_model, base_model)
    if rows:
        response_offsets(tokenizer, rows[0]["response"])  # fail before the forward passes
    lora_lp = response_log_probs(lora_model, tokenizer, rows, batch_size=batch_size,
                                 max_length=max_length, progress=progress,
                                 desc="scoring (with adapter)")
    with adapter_disabled(lora_model) if base_model is None else nullcontext():
        base_lp = response_log_probs(base_model or lora_model, tokenizer, rows,
                                     batch_size=batch_size, max_length=max_length,
                                     progress=progress, desc="scoring (base)")
    scored = []
    for row, lp, bp in zip(rows, lora_lp, base_lp, strict=True):
        offsets = response_offsets(tokenizer, row["response"], format_prompt(row))
        n = min(len(offsets), lp.numel())  # truncation by max_length cuts the tail
        scored.append(ScoredSample(row=dict(row), offsets=offsets[:n], logp_lora=lp[:n],
                                   logp_base=bp[:n]))
    return scored


# --------------------------------------------------------------------------- 3. selection

def _as_scores(name: str, scores: object) -> torch.Tensor:
    """``scores`` (a sequence of numbers or a 1-D tensor) as an fp64 ``[n]`` tensor; a
    TypeError / ValueError naming ``name`` otherwise."""
    if isinstance(scores, torch.Tensor):
        values = scores
    elif isinstance(scores, Sequence) and not isinstance(scores, (str, bytes)) and all(
            isinstance(v, numbers.Real) or (isinstance(v, torch.Tensor) and v.numel() == 1)
            for v in scores):
        values = torch.tensor([float(v) for v in scores])
    else:
        raise TypeError(f"{name}: expected a sequence of numbers or a 1-D tensor, got "
                        f"{type(scores).__name__}" + (f" holding {type(scores[0]).__name__}"
                                                      if isinstance(scores, Sequence)
                                                      and len(scores) else ""))
    if values.is_complex():
        raise TypeError(f"{name}: expected real scores, got dtype {values.dtype}")
    if values.dim() != 1:
        raise ValueError(f"{name}: expected shape [n] (one score per sample), got "
                         f"{tuple(values.shape)}")
    return values.to(torch.float64)


def select_samples(scores: Sequence[float] | torch.Tensor, keep_fraction: float) -> list[int]:
    """Indices of the ``ceil(keep_fraction * n)`` samples with the largest mean excess,
    best first (ties: lower index first; a NaN score ranks last, like ``-inf``)."""
    _check_fraction("keep_fraction", keep_fraction)
    values = _as_scores("scores", scores)
    if values.numel() == 0:
        return []
    k = keep_count(values.numel(), keep_fraction)
    values = values.nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    order = sorted(range(values.numel()), key=lambda i: (-float(values[i]), i))
    return order[:k]


def select_tokens(excess: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """``[n]`` bool mask of the ``ceil(keep_fraction * n_valid)`` tokens with the largest
    excess (NaN scores -- tokens no source token covers -- are never selected)."""
    _check_fraction("keep_fraction", keep_fraction)
    check_tensor("excess", excess)
    if excess.dim() != 1:
        raise ValueError(f"excess: expected shape [n], got {tuple(excess.shape)}")
    valid = ~torch.isnan(excess)
    mask = torch.zeros_like(valid)
    n = int(valid.sum())
    if n == 0:
        return mask
    k = keep_count(n, keep_fraction)
    scores = torch.where(valid, excess.double(), torch.tensor(-math.inf, dtype=torch.float64))
    # stable: among equal scores the earlier token wins
    order = sorted(range(excess.numel()), key=lambda i: (-float(scores[i]), i))
    mask[torch.tensor(order[:k])] = True
    return mask


# --------------------------------------------------------------------------- 4. alignment

def tile_spans(offsets: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """``[n]`` spans widened to cover every character of the text.

    Tokenizers that trim offsets (GPT-2 / RoBERTa byte-level BPE, ``trim_offsets=True``)
    leave the space of ``Ġword`` outside its span and give a whitespace-only ``Ġ`` a
    zero-width span. Here a gap before a token belongs to that token (a leading space is
    part of the word, as ``Ġ`` / ``▁`` mean), trailing gap characters to the last token, and
    a zero-width token before a wider one takes that token's span. Spans that already tile
    the text are returned unchanged; zero-width spans at the end (EOS) stay as they are.
    """
    spans = [(int(s), int(e)) for s, e in offsets]
    out, end = list(spans), 0
    for i, (s, e) in enumerate(spans):
        if e > s:
            out[i] = (min(s, end), e)
            end = max(end, e)
    text_end = max((e for _, e in spans), default=0)
    wide = [i for i, (s, e) in enumerate(spans) if e > s]
    if wide and out[wide[-1]][1] < text_end:
        out[wide[-1]] = (out[wide[-1]][0], text_end)
    following = None
    for i in reversed(range(len(spans))):
        if spans[i][1] > spans[i][0]:
            following = out[i]
        elif following is not None:
            out[i] = following
    return out


def align_token_scores(src_offsets: Sequence[tuple[int, int]], src_scores: torch.Tensor,
                       tgt_offsets: Sequence[tuple[int, int]], reduce: str = "max"
                       ) -> torch.Tensor:
    """Maps per-token scores from one tokenization of a text to another by characters.

    A target token ``[s, e)`` takes the scores of the source tokens whose spans overlap it:
    their max (``reduce="max"``) or their mean weighted by overlapping characters
    (``"mean"``). Both sides' spans first go through :func:`tile_spans`, so whitespace a
    tokenizer leaves outside its spans (``trim_offsets``) still scores the target's
    whitespace tokens. Zero-width spans (EOS at the end) match zero-width source spans at
    the same position. A target token no source token covers gets NaN.

    Args:
        src_offsets: ``[n]`` source spans; src_scores: ``[n]``.
        tgt_offsets: ``[m]`` target spans.

    Returns:
        ``[m]`` float32 target scores.
    """
    if reduce not in ("max", "mean"):
        raise ValueError(f"reduce: expected 'max' or 'mean', got {reduce!r}")
    check_tensor("src_scores", src_scores)
    if src_scores.dim() != 1:
        raise ValueError(f"src_scores: expected shape [n] (one score per source span), got "
                         f"{tuple(src_scores.shape)}")
    if len(src_offsets) != src_scores.numel():
        raise ValueError(f"src_scores: expected {len(src_offsets)} scores (one per source "
                         f"span), got {src_scores.numel()}")
    src_spans = [tuple(s) for s in src_offsets]
    n = len(src_spans)
    if src_spans == [tuple(t) for t in tgt_offsets]:
        return src_scores.float().clone()  # same tokenization: token i is token i
    # the same tokenization with the source cut shorter (score_max_length): token i is
    # token i on the shared prefix (tokens splitting one character share its span)
    prefix = n > 0 and src_spans == [tuple(t) for t in tgt_offsets[:n]]
    src_offsets, tgt_offsets = tile_spans(src_offsets), tile_spans(tgt_offsets)
    out = torch.full((len(tgt_offsets),), float("nan"))
    scores = src_scores.float().tolist()
    for j, (ts, te) in enumerate(tgt_offsets):
        hits: list[tuple[float, int]] = []
        for (ss, se), score in zip(src_offsets, scores, strict=True):
            if te == ts:  # zero-width target token (EOS)
                if se == ss == ts:
                    hits.append((score, 1))
                continue
            overlap = min(te, se) - max(ts, ss)
            if overlap > 0:
                hits.append((score, overlap))
        if hits:
            if reduce == "max":
                out[j] = max(s for s, _ in hits)
            else:
                out[j] = sum(s * w for s, w in hits) / sum(w for _, w in hits)
    if prefix:
        out[:n] = src_scores.float()
    return out


def build_masked_examples(scored: Sequence[ScoredSample], tokenizer: Any, *,
                          sample_keep: float = 0.5, token_keep: float = 0.5,
                          max_length: int = 128, reduce: str = "max", drop_empty: bool = True
                          ) -> tuple[list[dict[str, list[int]]], dict[str, Any]]:
    """Target-tokenizer training examples whose labels keep only the selected tokens.

    Samples are filtered by mean excess (source tokens); each kept sample's scores are
    aligned to ``tokenizer`` by character offsets and its top ``token_keep`` tokens keep
    their label (others ``-100``). With ``sample_keep = token_keep = 1`` every synthetic
    token is a label (the "all tokens" baseline). With ``drop_empty`` samples whose
    response is empty (EOS only) are dropped first: their mean excess is the EOS token's
    alone, which tends to be large, so they would crowd out real answers.

    Tokens are selected among the response tokens that survive the ``max_length`` cut of
    :func:`~datalora.data.tokenize_example`; a kept sample left without any label (its
    response cut away, or no token scored) is dropped, with a warning giving the count.

    Returns:
        ``(examples, stats)``: examples with ``input_ids, attention_mask, labels``; stats
        with the kept sample indices (those with an example), the count dropped for
        having no label, and the fraction of response tokens kept.
    """
    _check_fraction("sample_keep", sample_keep)
    _check_fraction("token_keep", token_keep)
    usable = [i for i, s in enumerate(scored) if s.row["response"].strip() or not drop_empty]
    ranked = select_samples([scored[i].mean_excess for i in usable], sample_keep)
    kept = [usable[j] for j in ranked]
    examples, with_labels, labelled, total = [], [], 0, 0
    for i in kept:
        sample = scored[i]
        ex = tokenize_example(sample.row, tokenizer, max_length)
        labels = list(ex["labels"])
        resp = [p for p, v in enumerate(labels) if v != IGNORE_INDEX]  # after truncation
        tgt_offsets = response_offsets(tokenizer, sample.row["response"],
                                       format_prompt(sample.row))
        scores = align_token_scores(sample.offsets, sample.excess, tgt_offsets,
                                    reduce)[:len(resp)]
        mask = select_tokens(scores, token_keep) if token_keep < 1 else torch.ones(
            len(resp), dtype=torch.bool)
        for pos, keep in zip(resp, mask.tolist(), strict=True):
            if not keep:
                labels[pos] = IGNORE_INDEX
        n_labels = sum(v != IGNORE_INDEX for v in labels)
        if n_labels == 0:
            continue
        labelled += n_labels
        total += len(resp)
        examples.append({**ex, "labels": labels})
        with_labels.append(i)
    dropped = len(kept) - len(with_labels)
    if dropped:
        warnings.warn(f"build_masked_examples: dropped {dropped} of the {len(kept)} kept "
                      f"samples: no label left (response cut by max_length={max_length}, "
                      f"or no scored token)", stacklevel=2)
    stats = {"kept_samples": with_labels, "dropped_no_labels": dropped,
             "num_samples": len(scored), "num_usable": len(usable),
             "token_fraction": labelled / max(total, 1)}
    return examples, stats


# --------------------------------------------------------------------------- 5. training

def train_masked(model: nn.Module, tokenizer: Any, examples: Sequence[dict[str, list[int]]], *,
                 steps: int, batch_size: int = 8, lr: float = 2e-2, seed: int = 0,
                 progress: bool = True) -> list[float]:
    """AdamW on the trainable parameters of ``model`` with the examples' label masks.

    Returns:
        The loss of every step.
    """
    if not examples:
        raise ValueError("examples: expected at least one training example, got none")
    unlabelled = [i for i, ex in enumerate(examples)
                  if all(v == IGNORE_INDEX for v in ex["labels"])]
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

    Arguments are checked (keep fractions, adapter, target modules, ``reduce``, lengths,
    training settings, the tokenizers' character offsets) before any generation or
    scoring.

    Returns:
        ``(target with the new adapter, report)``; ``report`` holds the synthetic rows,
        the selection stats and the training losses. Pass ``synthetic`` / ``scored`` to
        reuse earlier steps (e.g. to compare selections on the same data). Save the
        adapter with ``target.save_pretrained(folder)`` (PEFT or datalora format).
    """
    _check_fraction("sample_keep", sample_keep)
    _check_fraction("token_keep", token_keep)
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
    torch.manual_seed(seed)  # before the adapter: its initialisation is part of the seed
    target = _attach_adapter(target_model, adapter, rank, alpha, target_modules)
    losses = train_masked(target, target_tokenizer, examples, steps=steps,
                          batch_size=batch_size, lr=lr, seed=seed, progress=progress)
    return target, {"synthetic": list(synthetic), "scored": list(scored), "selection": stats,
                    "losses": losses}


# --------------------------------------------------------------------------- CLI

def check_adapter_folder(folder: str | os.PathLike[str]) -> Path:
    """``folder`` as a path, if it holds a saved adapter (``adapter_config.json``)."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"source_adapter: no such folder: {folder}")
    if not (path / "adapter_config.json").is_file():
        raise ValueError(f"source_adapter: {folder} has no adapter_config.json (expected a "
                         f"folder written by save_pretrained: a PEFT or datalora adapter)")
    return path


def load_seed_prompts(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Seed prompts from a ``.txt`` file (one prompt per non-empty line) or a ``.jsonl``
    file (rows with a string ``question``, optional ``system_prompt``)."""
    from datalora.data import _read_jsonl

    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"seed_file: no such file: {path}")
    if file.suffix.lower() == ".txt":
        rows = [{"question": line.strip()}
                for line in file.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    elif file.suffix.lower() == ".jsonl":
        found, lines = _read_jsonl(file)
        rows = []
        for row, line in zip(found, lines, strict=True):
            if not isinstance(row, dict) or not isinstance(row.get("question"), str):
                raise ValueError(f"seed_file: {path} line {line} has no string 'question'")
            rows.append({"question": row["question"],
                         "system_prompt": row.get("system_prompt") or ""})
    else:
        raise ValueError(f"seed_file: expected a .jsonl or .txt file, got {path}")
    if not rows:
        raise ValueError(f"seed_file: {path} holds no prompt")
    return rows


@contextmanager
def _model_argument(param: str) -> Iterator[None]:
    """Errors about a model name (``name_or_path: ...``) renamed to ``param``
    (``source_model`` / ``target_model``), so the CLI names the flag that gave it."""
    try:
        yield
    except (OSError, ValueError) as exc:
        name, sep, rest = str(exc).partition(":")
        if not sep or name.strip() != "name_or_path":
            raise
        kind = type(exc) if type(exc) in (OSError, FileNotFoundError, ValueError) else OSError
        raise kind(f"{param}:{rest}") from exc


def _check_model_names(args: argparse.Namespace) -> None:
    """Both model names checked (a local path that does not exist, a folder without
    config.json or tokenizer files) before either model loads."""
    from datalora.testing import EMBEDDED_NAMES, _model_source, check_tokenizer_source

    for param in ("source_model", "target_model"):
        name = getattr(args, param)
        if name in EMBEDDED_NAMES:
            continue
        with _model_argument(param):
            _model_source(name)
            check_tokenizer_source(name)


def _load_model(param: str, name: str) -> tuple[nn.Module, Any]:
    from datalora.testing import load_model_and_tokenizer

    with _model_argument(param):
        return load_model_and_tokenizer(name)


def _load_source(name: str, folder: Path) -> tuple[nn.Module, Any]:
    """The source model with its saved adapter (PEFT or datalora format) and tokenizer."""
    model, tokenizer = _load_model("source_model", name)
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    if "peft_type" in config:
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(folder)).eval(), tokenizer
    from datalora.model import DATALORAModel

    return DATALORAModel.from_pretrained(model, folder), tokenizer


def transfer_cli(args: argparse.Namespace) -> dict[str, Any]:
    """``titok --source-model ...``: transfers the adapter at ``--source-adapter`` to
    ``--target-model`` and saves it (``save_pretrained``) and the JSON report in
    ``--output-dir``. Every argument is checked before a model loads."""
    from datalora.io import atomic_write_text
    from datalora.train import REAL_MODEL_DEFAULTS

    for flag in ("source_model", "target_model", "source_adapter", "seed_file"):
        if getattr(args, flag) is None:
            raise ValueError(f"{flag}: required with --source-model / --target-model")
    if len(args.seeds) != 1:
        raise ValueError(f"seeds: one seed with --source-model, got {args.seeds}")
    folder = check_adapter_folder(args.source_adapter)
    prompts = load_seed_prompts(args.seed_file)
    check_output_folder("output_dir", args.output_dir)
    if Path(args.output_dir).resolve() == Path(folder).resolve():
        raise ValueError(f"output_dir: {args.output_dir} is the --source-adapter folder; the "
                         f"transferred adapter would overwrite the source one")
    check_output_file("out", args.out)
    _check_model_names(args)
    target, target_tok = _load_model("target_model", args.target_model)
    check_target_modules(target, args.adapter, args.target_modules)
    source, source_tok = _load_source(args.source_model, folder)
    source_base = None
    if disabled_is_not_base(source) is not None:  # score against a clean copy of the base
        source_base, _ = _load_model("source_model", args.source_model)
    lr = REAL_MODEL_DEFAULTS["learning_rate"] if args.lr is None else args.lr
    adapted, report = titok_transfer(
        source, source_tok, target, target_tok, prompts, sample_keep=args.sample_keep,
        token_keep=args.token_keep, max_new_tokens=args.max_new_tokens,
        adapter=args.adapter, target_modules=args.target_modules, steps=args.steps, lr=lr,
        seed=args.seeds[0], source_base_model=source_base, progress=not args.no_progress)
    out = Path(args.output_dir)
    adapted.save_pretrained(str(out))
    result = {"source_model": args.source_model, "source_adapter": str(folder),
              "target_model": args.target_model, "seed_file": args.seed_file,
              "seed_prompts": len(prompts), "adapter": args.adapter,
              "target_modules": list(args.target_modules), "sample_keep": args.sample_keep,
              "token_keep": args.token_keep, "steps": args.steps, "lr": lr,
              "seed": args.seeds[0], "selection": report["selection"],
              "losses": report["losses"], "synthetic": report["synthetic"],
              "output_dir": str(out)}
    atomic_write_text(args.out or out / "titok_report.json", json.dumps(result, indent=1))
    return result


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from datalora.data import TASKS
    from datalora.train import REAL_MODEL_DEFAULTS

    p = subparsers.add_parser(
        "titok", help="TITOK: transfer a LoRA / DATALORA adapter to another base model "
                      "(--source-model ...), or the embedded tiny-model experiment",
        description="Transfer an adapter with TITOK: the source model + its adapter answers "
                    "seed prompts, tokens are scored by the adapter's contrastive excess, the "
                    "best samples and tokens train a fresh adapter on the target model "
                    "(another size and tokenizer).\n\n"
                    "Your models: --source-model, --source-adapter (a PEFT or datalora "
                    "save_pretrained folder), --target-model, --seed-file (.jsonl with a "
                    "'question' column, or .txt with one prompt per line); the target "
                    "adapter (PEFT format for --adapter lora, datalora's for molora) and "
                    "titok_report.json are saved in --output-dir.\n\n"
                    "Without --source-model / --target-model: the experiment on the embedded "
                    "tiny models (--task, --base, --seed-prompts, --eval-rows); it prints the "
                    "eval loss of every variant and writes the report to --out only.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source-model", default=None,
                   help="source model name or path (with --source-adapter, --target-model, "
                        "--seed-file)")
    p.add_argument("--target-model", default=None, help="target model name or path")
    p.add_argument("--seed-file", default=None,
                   help="seed prompts: .jsonl with a 'question' column (optional "
                        "'system_prompt') or .txt, one prompt per line")
    p.add_argument("--output-dir", default=None,
                   help="with --source-model: where the target adapter and "
                        f"titok_report.json are saved (default: "
                        f"{TRANSFER_DEFAULTS['output_dir']})")
    p.add_argument("--target-modules", nargs="+", default=None,
                   help="with --source-model: target model modules the new adapter wraps "
                        "(MoLoRA: nn.Linear only; GPT-2's Conv1D c_attn is not supported; "
                        f"default: {' '.join(TRANSFER_DEFAULTS['target_modules'])})")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=None,
                   help=f"with --source-model: tokens generated per synthetic response "
                        f"(default: {TRANSFER_DEFAULTS['max_new_tokens']})")
    p.add_argument("--task", choices=TASKS, default=None,
                   help=f"embedded experiment: the task transferred (default: "
                        f"{EXPERIMENT_DEFAULTS['task']})")
    p.add_argument("--base", choices=("pretrained", "random"), default=None,
                   help=f"embedded experiment: tiny base models pretrained on the embedded "
                        f"corpus or random (default: {EXPERIMENT_DEFAULTS['base']})")
    p.add_argument("--source-adapter", default=None,
                   help="adapter folder of the source (PEFT, or datalora with "
                        "--source-model; embedded experiment default: train one)")
    p.add_argument("--adapter-dir", default=None,
                   help="embedded experiment: where source adapters are trained / reused "
                        f"(default: {EXPERIMENT_DEFAULTS['adapter_dir']})")
    p.add_argument("--seed-prompts", type=int_at_least(1), default=None,
                   help=f"embedded experiment: task prompts the source answers (default: "
                        f"{EXPERIMENT_DEFAULTS['seed_prompts']})")
    p.add_argument("--sample-keep", type=fraction, default=0.5,
                   help="fraction of synthetic samples kept, by mean contrastive excess")
    p.add_argument("--token-keep", type=fraction, default=0.5,
                   help="fraction of tokens of a kept sample in the loss, by excess")
    p.add_argument("--steps", type=int_at_least(1), default=60,
                   help="training steps of the target adapter")
    p.add_argument("--lr", type=positive_float, default=None,
                   help=f"target adapter learning rate (default: "
                        f"{REAL_MODEL_DEFAULTS['learning_rate']:g} with --source-model; "
                        f"embedded: 3e-3 pretrained, 2e-2 random)")
    p.add_argument("--adapter", choices=ADAPTERS, default="lora")
    p.add_argument("--eval-rows", type=int_at_least(1), default=None,
                   help=f"embedded experiment: rows of the task's eval (and validation) split "
                        f"(default: {EXPERIMENT_DEFAULTS['eval_rows']})")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="one transfer per seed; losses averaged over the seeds (one seed "
                        "with --source-model)")
    p.add_argument("--out", default=None, help="write the JSON report here (default with "
                                               "--source-model: OUTPUT_DIR/titok_report.json)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_cli, flag_names={
        "sample_keep": "--sample-keep", "token_keep": "--token-keep", "seeds": "--seeds",
        "source_adapter": "--source-adapter", "source_model": "--source-model",
        "target_model": "--target-model", "seed_file": "--seed-file",
        "target_modules": "--target-modules", "adapter": "--adapter", "steps": "--steps",
        "output_dir": "--output-dir", "out": "--out",
        "seed_prompts": "--seed-prompts", "eval_rows": "--eval-rows"})


TRANSFER_DEFAULTS = {"output_dir": "titok_output", "max_new_tokens": 24,
                     "target_modules": list(DEFAULT_TARGET_MODULES), "seed_file": None}
"""Flags of ``titok --source-model ...`` only, with their defaults."""
EXPERIMENT_DEFAULTS = {"task": "reverse", "base": "pretrained", "seed_prompts": 96,
                       "eval_rows": 50, "adapter_dir": "outputs/titok/source_adapters"}
"""Flags of the embedded experiment only, with their defaults."""


def _mode_flags(args: argparse.Namespace, transfer: bool) -> None:
    """Refuses a flag the chosen mode would ignore and fills in the mode's defaults."""
    own, other = ((TRANSFER_DEFAULTS, EXPERIMENT_DEFAULTS) if transfer
                  else (EXPERIMENT_DEFAULTS, TRANSFER_DEFAULTS))
    given = [name for name in other if getattr(args, name) is not None]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        mode = ("a transfer of your models (--source-model / --target-model)" if transfer
                else "the embedded experiment (no --source-model / --target-model)")
        raise ValueError(f"{flags}: not used by {mode}")
    for name, default in own.items():
        if getattr(args, name) is None:
            setattr(args, name, default)


def run_cli(args: argparse.Namespace) -> dict[str, Any]:
    transfer = args.source_model is not None or args.target_model is not None
    _mode_flags(args, transfer)
    if transfer:
        report = transfer_cli(args)
        print(f"target adapter saved in {report['output_dir']}; final training loss "
              f"{report['losses'][-1]:.3f}")
        return report
    from datalora.experiments.titok_evidence import run

    if args.source_adapter is not None:
        check_adapter_folder(args.source_adapter)
    report = run(task=args.task, base=args.base, source_adapter=args.source_adapter,
                 adapter_dir=args.adapter_dir, seed_prompts=args.seed_prompts,
                 sample_keep=args.sample_keep, token_keep=args.token_keep, steps=args.steps,
                 lr=args.lr, adapter=args.adapter, eval_rows=args.eval_rows, seeds=args.seeds,
                 out=args.out,
                 progress=not args.no_progress)
    width = max(map(len, report["eval_loss"]), default=0)
    for name, value in report["eval_loss"].items():
        print(f"{name:>{width}}: eval loss {value:.3f}")
    return report
