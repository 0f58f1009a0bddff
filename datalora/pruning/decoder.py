"""The decoder stack token pruning hooks: finding its layer list, what each pruned layer
needs (its sliding window, its per-token inputs) and the architectures it refuses."""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn as nn

PER_TOKEN_INPUTS = ("position_ids", "position_embeddings", "per_layer_input")
"""Decoder-layer inputs (keyword or positional) with one row per token, gathered to the
kept tokens for every packed layer from that layer's own value (so are inputs named
``position_embeddings_*``): Gemma 3 / 4 and OLMo 3 pass local and global RoPE to
different layers (transformers < 5: both, as ``position_embeddings_global`` /
``_local``), Gemma 4 a per-layer input."""


def _per_token(name: str) -> bool:
    return name in PER_TOKEN_INPUTS or name.startswith("position_embeddings")


def _parameter_names(layer_cls: type) -> tuple[str, ...]:
    """The names of a decoder layer's ``forward`` parameters after ``self`` (to tell which
    positional argument is which); read once per pruned layer when the hooks are installed,
    not in the forward, which torch.compile traces."""
    return tuple(inspect.signature(layer_cls.forward).parameters)[1:]


def _gather_rows(t: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
    """``t [1 or B, L, ...]`` -> ``[B, K, ...]`` rows ``keep_idx``."""
    t = t.expand(keep_idx.shape[0], *t.shape[1:])
    idx = keep_idx.reshape(*keep_idx.shape, *([1] * (t.dim() - 2))).expand(
        *keep_idx.shape, *t.shape[2:])
    return t.gather(1, idx)


_LAYER_PATHS = ("model.layers", "model.decoder.layers", "model.language_model.layers",
                "transformer.h", "layers")


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder-layer list of a HF causal LM: ``model.model.layers`` and similar paths,
    ``<base_model_prefix>.layers`` (GPT-NeoX's ``gpt_neox.layers``), else the first
    ``ModuleList`` of ``*DecoderLayer`` modules, else of the model's ``_no_split_modules``
    blocks."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    paths = (*_LAYER_PATHS, *(f"{prefix}.{p}" for p in ("layers", "h", "decoder.layers")
                              if prefix))
    for path in paths:
        try:
            layers = model.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    blocks = set(getattr(model, "_no_split_modules", None) or ())
    # *DecoderLayer first: a vision-language model's vision blocks are no-split too
    for matches in (lambda name: name.endswith("DecoderLayer"), lambda name: name in blocks):
        found = next((m for m in lists if matches(type(m[0]).__name__)), None)
        if found is not None:
            return found
    raise ValueError(f"model: found no decoder-layer ModuleList in {type(model).__name__} "
                     f"(tried {list(paths)} and lists of *DecoderLayer / _no_split_modules "
                     f"blocks); shared routing and token pruning need one: use "
                     f"routing='per_layer'")


def check_prunable(model: nn.Module) -> None:
    """Refuses what token pruning cannot run: ALiBi attention (Bloom, MPT, Falcon with
    ``alibi=True``: the position bias rides in the attention mask, which the pruned layers
    replace), MoE router logits (``output_router_logits``: the pruned layers' logits
    cover the kept tokens only, the base's load-balancing loss needs all of them) and
    Gemma 3n's AltUp (several hidden-state streams per token, not ``[B, L, d]``)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", "")
    attn_config = getattr(config, "attn_config", None)  # MPT
    mpt_alibi = (attn_config.get("alibi", True) if isinstance(attn_config, dict)
                 else getattr(attn_config, "alibi", model_type == "mpt"))
    if (getattr(config, "alibi", False) or model_type == "bloom" or mpt_alibi
            or getattr(config, "position_embedding_type", None) == "alibi"):
        raise ValueError(f"model: token pruning does not support ALiBi attention "
                         f"({model_type or type(model).__name__}: the position bias is part "
                         f"of the attention mask the pruned layers rebuild); use "
                         f"routing='per_layer'")
    if getattr(config, "output_router_logits", False):
        raise ValueError(_ROUTER_LOGITS_ERROR)
    if getattr(config, "altup_num_inputs", None):
        raise ValueError(f"model: token pruning and the saliency network need one [B, L, d] "
                         f"hidden state per layer; {model_type or type(model).__name__} "
                         f"carries {config.altup_num_inputs} AltUp streams; use "
                         f"routing='per_layer'")


def check_prune_range(config: Any, layers: nn.ModuleList, start: int, end: int
                      ) -> dict[int, int | None]:
    """The sliding window of each pruned layer ``start..end-1`` (:func:`layer_window`);
    refuses a pruned layer whose keys / values later layers reuse or that reuses an earlier
    layer's (Gemma 3n / 4 KV sharing: packed keys would meet full-length queries), and one
    that scales its queries by their index in the sequence it is given rather than by
    their position (Llama 4's attention temperature tuning on NoPE layers)."""
    def attention(index: int, flag: str) -> bool:
        return bool(getattr(getattr(layers[index], "self_attn", None), flag, False))

    sharing = any(attention(i, "is_kv_shared_layer") for i in range(len(layers)))
    windows = {}
    for index in range(start, end):
        windows[index] = layer_window(config, index)
        if sharing and (attention(index, "is_kv_shared_layer")
                        or attention(index, "store_full_length_kv")):
            raise ValueError(f"prune_layers: decoder layer {index} shares its keys / values "
                             f"with other layers (KV sharing); token pruning needs each "
                             f"pruned layer's keys to be its own (choose a prune range "
                             f"without it)")
        if attention(index, "attn_temperature_tuning") and not attention(index, "use_rope"):
            raise ValueError(f"prune_layers: decoder layer {index} scales its queries by their "
                             f"index in the sequence (attention temperature tuning), which "
                             f"packed tokens do not keep (choose a prune range without it, or "
                             f"set config.attn_temperature_tuning=False)")
    return windows


_ROUTER_LOGITS_ERROR = (
    "output_router_logits: not supported with token pruning (the pruned layers' router "
    "logits cover the kept tokens only, and the base's load-balancing loss needs every "
    "layer's over all tokens); set model.config.output_router_logits = False (DATALORA's "
    "balance loss balances the LoRA experts)")


def resolve_prune_range(prune_layers: list[int] | None, num_layers: int) -> tuple[int, int]:
    """``[start, end)`` of the pruned layers; None = the second half."""
    if prune_layers is None:
        return num_layers // 2, num_layers
    start, end = prune_layers
    if not 0 <= start < end <= num_layers:
        raise ValueError(f"prune_layers: expected [start, end) with 0 <= start < end <= "
                         f"{num_layers} (decoder layers), got {list(prune_layers)}")
    return start, end


_WINDOWED = ("sliding_attention",)


def layer_window(config: Any, layer_idx: int) -> int | None:
    """The sliding window of decoder layer ``layer_idx`` (None: full causal attention).

    ``config.layer_types`` (Qwen2, Gemma 2/3, gpt-oss, ...) names each layer's attention:
    ``"sliding_attention"`` layers see the last ``config.sliding_window`` keys,
    ``"full_attention"`` layers all of them. Without ``layer_types`` (Mistral) every layer
    uses ``config.sliding_window`` when it is set. Other kinds (chunked, linear attention)
    are refused: the pruning masks cannot reproduce them.
    """
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is None:
        return window
    kind = types[layer_idx]
    if kind == "full_attention":
        return None
    if kind in _WINDOWED:
        return window
    raise ValueError(f"prune_layers: decoder layer {layer_idx} uses {kind!r} attention; token "
                     f"pruning supports 'full_attention' and 'sliding_attention' layers only "
                     f"(choose a prune range without it)")
