"""TITOK step 2: the contrastive excess of each response token,
``log p_source+LoRA(y_t) - log p_source(y_t)``, and switching the source's adapter off."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from datalora.checks import check_int
from datalora.data import (
    IGNORE_INDEX,
    CausalLMCollator,
    appended_special_ids,
    format_prompt,
    response_start,
    strip_appended,
    tokenize_example,
)
from datalora.layers import MoLoRALinear, adapters_off
from datalora.module_modes import eval_mode
from datalora.titok._util import check_rows, model_device
from datalora.tle.adapters import BASE_CHANGING_INITS


@dataclass
class ScoredSample:
    """One synthetic row scored by the source.

    Attributes:
        row: the synthetic row.
        offsets: ``[n]`` character spans ``(start, end)`` of the response tokens in
            ``row["response"]`` (source tokenizer); the final EOS is ``(len, len)``. A row
            with ``finished`` False (cut by ``max_new_tokens``) has no EOS here: the EOS
            :func:`~datalora.data.tokenize_example` appends is not a token the source
            produced, so it is neither scored nor trained.
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
        suffix = appended_special_ids(tokenizer)
        start = response_start(
            strip_appended(tokenizer(prompt, add_special_tokens=True)["input_ids"], suffix),
            enc["input_ids"], response, len(suffix))
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
        device = model_device(model) if isinstance(model, nn.Module) else torch.device("cpu")
    out: list[torch.Tensor] = []
    with eval_mode(model):  # no dropout / training noise in a score; modes restored after
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


def _has_adapter_biases(model: nn.Module, bias: str) -> bool:
    """Whether a PEFT adapter's ``bias`` setting (``'all'``: every bias of the model,
    ``'lora_only'``: those of the LoRA-adapted layers) covers any bias parameter."""
    modules = (model.modules() if bias != "lora_only"
               else (m for m in model.modules() if hasattr(m, "lora_A")))
    return any(isinstance(getattr(m, "bias", None), nn.Parameter) for m in modules)


def disabled_is_not_base(model: nn.Module) -> str | None:
    """Why ``model``'s ``disable_adapter()`` would not run its base model, or None: a PEFT
    adapter whose ``bias='all'`` / ``'lora_only'`` covers biases (trained: they stay on;
    a model without biases is fine), one whose
    initialisation rewrote the base weights (PiSSA, OLoRA, ...: the residual stays), one
    replicating decoder layers (``layer_replication``: they still run) or KaSA (its SVD
    truncation of the base weights stays)."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        return None
    active = getattr(model, "active_adapters", None) or [getattr(model, "active_adapter", None)]
    for name in active:
        config = configs.get(name)
        bias = getattr(config, "bias", "none")
        if bias not in (None, "none") and _has_adapter_biases(model, bias):
            return f"adapter {name!r} has bias={bias!r}, whose biases stay on when disabled"
        init = getattr(config, "init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
            return (f"adapter {name!r} was initialised with init_lora_weights={init!r}, "
                    f"which rewrote the base weights")
        if getattr(config, "layer_replication", None):
            return (f"adapter {name!r} replicates decoder layers (layer_replication), which "
                    f"still run when it is disabled")
        if getattr(config, "kasa_config", None) is not None:
            return (f"adapter {name!r} is a KaSA adapter, whose truncation of the base "
                    f"weights stays when it is disabled")
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
    check_rows("rows", rows, "response")
    rows = list(rows)  # a datasets.Dataset sliced to a dict of columns
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
        if row.get("finished", True) is False:
            offsets = offsets[:-1]  # the appended EOS of a cut response: not the source's
        n = min(len(offsets), lp.numel())  # truncation by max_length cuts the tail
        scored.append(ScoredSample(row=dict(row), offsets=offsets[:n], logp_lora=lp[:n],
                                   logp_base=bp[:n]))
    return scored


