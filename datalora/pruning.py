"""Token pruning over a decoder-layer range, steered by the saliency network.

:class:`DATALORARuntime` hooks a Hugging Face decoder (Mistral / Llama / Qwen style:
``model.model.layers[i](hidden, attention_mask=, position_ids=, cache=, use_cache=,
position_embeddings=)``; ``past_key_values=`` before transformers 5.24) without changing its
modules or parameter names:

1. before decoder layer 0 the :class:`~datalora.saliency.UnifiedSaliencyNetwork` runs once
   on the hidden states -> token scores, and one :class:`~datalora.routing.Routing` that
   every :class:`~datalora.layers.MoLoRALinear` receives through a forward pre-hook;
2. at the first pruned layer each sequence keeps ``ceil(retention * n)`` of its ``n`` real
   tokens (highest score, Gumbel noise in training; the last real token is always kept,
   padding never) -- :func:`select_tokens`; kept tokens are packed with
   :func:`datalora.ops.gather_tokens` and run through the range with their original
   position ids, each layer's own RoPE cos/sin (and other per-token inputs,
   :data:`PER_TOKEN_INPUTS`) gathered to the kept tokens and a causal mask over kept
   positions (:func:`packed_attention_mask`); the MoLoRA layers get the routing rows of
   the kept tokens (gathered once);
3. after the range :func:`datalora.ops.scatter_tokens` writes kept rows back with the keep
   weight ``w = 1 + p - stopgrad(p)`` (``p = sigmoid(score)``): exactly 1 in the
   forward, the Mixture-of-Depths gradient ``dL/dp = g . (f(h) - h)`` in the backward;
   pruned tokens bypass the range on the residual stream.

With a KV cache (``generate``) per-sequence top-k is not causal, so a token is kept when
its score exceeds the calibrated ``keep_threshold`` (:meth:`DATALORARuntime.calibrate`);
the pruned layers then run on all new tokens with a mask that hides pruned tokens as keys
and their outputs are replaced by the bypass, so every cached K/V of a kept token is what
the packed computation produces and the cache stays exact (the keep flags of cached tokens
live on the cache object). This is numerically the same function as the uncached
threshold forward; it saves no compute at decode time. Beam search works: the keep flags
and the saliency network's running context follow the cache's ``reorder_cache``. An
uncalibrated threshold runs the range dense in eval forwards that decide token by token
(``generate`` passes ``use_cache``, with or without a cache), on both paths.
"""

from __future__ import annotations

import functools
import inspect
import math
import threading
import warnings
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from datalora import ops
from datalora.checks import check_number
from datalora.hf_compat import cache_of
from datalora.layers import MoLoRALinear
from datalora.ops.backends import warn_once
from datalora.ops.validation import check_tensor
from datalora.routing import Routing
from datalora.saliency import (
    SaliencyOutput,
    UnifiedSaliencyNetwork,
    gather_routing,
    uniform_noise,
)

_CACHE_KEEP_ATTR = "_datalora_keep"  # [B, positions] bool: kept in the pruned range
# (feature sums [B, positions, h], counts [B, positions]): the saliency network's running
# context after each cached position; the last one resumes it, any one after a crop (a cache
# pickled by a release that kept only the last, as `_datalora_usn_context`, is refused)
_CACHE_CONTEXT_ATTR = "_datalora_saliency_context"
_CACHE_ATTRS = (_CACHE_KEEP_ATTR, _CACHE_CONTEXT_ATTR)


COMPILED_WIDTH_STEPS = 4
"""Grid steps between the target retention and 1 that the packed width takes under
``torch.compile`` (:func:`compiled_width_fraction`)."""


def keep_count(num_tokens: torch.Tensor | int, retention: float) -> torch.Tensor | int:
    """``ceil(retention * n)`` without float round-up (0.3 * 10 keeps 3, not 4); a retention
    > 0 keeps at least 1 of ``n >= 1`` tokens (the round-up guard would keep none below
    1e-9 / n)."""
    low = 1 if retention > 0 else 0
    if isinstance(num_tokens, torch.Tensor):
        count = torch.ceil(num_tokens.double() * retention - 1e-9).clamp_min(low).long()
        return torch.minimum(count, num_tokens.long().clamp_min(0))
    return min(max(math.ceil(num_tokens * retention - 1e-9), low), max(num_tokens, 0))


def compiled_width_fraction(retention: float, target: float | None,
                            steps: int = COMPILED_WIDTH_STEPS) -> float:
    """The fraction of the sequence length the packed batch is wide under ``torch.compile``:
    ``retention`` rounded up to the grid ``target + (1 - target) * j / steps`` (j = 0 ..
    steps), or ``retention`` itself below ``target`` or without one.

    The packed width is a tensor shape, so dynamo specializes the float it comes from and
    recompiles for each new value: a curriculum annealing the retention every step would
    recompile every step (past ``torch._dynamo.config.recompile_limit`` the rest runs
    eagerly). Rounded to the grid, the width changes ``steps`` times; each row still keeps
    exactly ``ceil(retention * n)`` tokens (a tensor computation, no recompile), the extra
    slots are filler (masked, written back unchanged)."""
    check_number("retention", retention, low=0, low_inclusive=False, high=1)
    if target is None or retention <= target or target >= 1.0:
        return retention
    step = (1.0 - target) / steps
    j = math.ceil((retention - target) / step - 1e-9)
    return min(target + j * step, 1.0)


@dataclass
class TokenSelection:
    """Which tokens of each sequence run through the pruned layers.

    Attributes:
        keep_idx: ``[B, K]`` int64 positions, ascending per row, distinct.
        valid: ``[B, K]`` bool; False marks filler slots (padding or surplus tokens of
            shorter rows), which are masked out and written back unchanged.
        counts: ``[B]`` int64 kept real tokens per sequence.
    """

    keep_idx: torch.Tensor
    valid: torch.Tensor
    counts: torch.Tensor

    def keep_mask(self, seq_len: int) -> torch.Tensor:
        """``[B, L]`` bool: True at kept real tokens."""
        mask = torch.zeros(self.keep_idx.shape[0], seq_len, dtype=torch.bool,
                           device=self.keep_idx.device)
        return mask.scatter_(1, self.keep_idx, self.valid)


def select_tokens(scores: torch.Tensor, retention: float,
                  attention_mask: torch.Tensor | None = None, *, tau: float = 1.0,
                  noise: bool = False, keep_last: bool = True,
                  generator: torch.Generator | None = None,
                  width_fraction: float | None = None) -> TokenSelection:
    """Per-sequence top-k of token scores (ties: the earlier position first).

    Args:
        scores: ``[B, L]`` keep logits.
        retention: fraction in (0, 1]; sequence b keeps ``ceil(retention * n_b)`` of its
            ``n_b`` real tokens; the packed width is ``K = ceil(retention * L)`` (no host
            sync).
        attention_mask: ``[B, L]`` 1 = real token, 0 = padding (never kept); None = all real.
        tau: Gumbel-top-k temperature: noisy keys are ``scores / tau + Gumbel``.
        noise: add the Gumbel noise (sampling without replacement, training).
        keep_last: always keep each sequence's last real token.
        generator: RNG for the noise.
        width_fraction: in ``[retention, 1]``: the packed width is ``ceil(width_fraction *
            L)`` instead, the slots past each row's count filler
            (:func:`compiled_width_fraction`); None: ``retention``.

    Returns:
        :class:`TokenSelection`.
    """
    if check_tensor("scores", scores).dim() != 2:
        raise ValueError(f"scores: expected shape [B, L], got {tuple(scores.shape)}")
    if not 0.0 < float(retention) <= 1.0:
        raise ValueError(f"retention: expected a value in (0, 1], got {retention!r}")
    if width_fraction is None:
        width_fraction = retention
    elif not float(retention) <= float(width_fraction) + 1e-9 <= 1.0 + 1e-9:
        # the slack: a grid point computed as target + j * step may round a hair below the
        # retention it equals (0.65 -> 0.6499999999999999); keep_count's slack is the same
        raise ValueError(f"width_fraction: expected a value in [retention, 1] = "
                         f"[{retention!r}, 1], got {width_fraction!r}")
    bsz, seq_len = scores.shape
    if attention_mask is None:
        real = torch.ones_like(scores, dtype=torch.bool)
    else:
        if check_tensor("attention_mask", attention_mask).shape != scores.shape:
            raise ValueError(f"attention_mask: expected shape {tuple(scores.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        real = attention_mask.to(device=scores.device).bool()
    key = scores.detach().float() / float(tau)
    if noise:
        u = uniform_noise(key.shape, key.device, generator=generator)
        key = key - torch.log(-torch.log(u.clamp(1e-10, 1 - 1e-7)))
    if keep_last:
        pos = torch.arange(seq_len, device=scores.device).expand(bsz, -1)
        last = torch.where(real, pos, -1).amax(1, keepdim=True)
        key = torch.where(pos == last, torch.inf, key)
    key = torch.where(real, key, -torch.inf)
    width = max(keep_count(seq_len, float(width_fraction)), 1)
    counts = keep_count(real.sum(1), float(retention))
    # best first; a stable sort, not topk: among tied keys the earlier position wins, so a
    # wider packed batch keeps the same tokens (topk may pick any of the tied)
    order = key.sort(dim=1, descending=True, stable=True).indices[:, :width]
    slot_valid = torch.arange(width, device=scores.device)[None] < counts[:, None]
    keep_idx, perm = order.sort(dim=1)
    return TokenSelection(keep_idx=keep_idx, valid=slot_valid.gather(1, perm), counts=counts)


def packed_attention_mask(key_ok: torch.Tensor, query_index: torch.Tensor,
                          key_index: torch.Tensor, dtype: torch.dtype, *,
                          as_bool: bool, sliding_window: int | None = None) -> torch.Tensor:
    """Causal attention mask over an arbitrary subset of positions.

    Query ``i`` may attend key ``j`` when ``key_ok[b, j]`` and ``key_index[b, j] <=
    query_index[b, i]`` (and within ``sliding_window`` of it); a query always sees its own
    position, so no row is empty (rows of filler slots stay finite).

    Args:
        key_ok: ``[B, S]`` bool. query_index: ``[B, Q]``, key_index: ``[B, S]`` int64
            indices in the original (cache) order.
        dtype: dtype of an additive mask. as_bool: return a bool mask (True = attend).

    Returns:
        ``[B, 1, Q, S]``: bool, or additive (0 / dtype min).
    """
    qi, kj = query_index[:, :, None], key_index[:, None, :]
    allowed = key_ok[:, None, :] & (kj <= qi)
    if sliding_window is not None:
        allowed = allowed & (kj > qi - sliding_window)
    allowed = (allowed | (kj == qi))[:, None]
    if as_bool:
        return allowed
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def _select_rows(value: torch.Tensor, index: Any) -> torch.Tensor:
    """``value``'s rows picked as the cache picks its keys / values: by integer indices, a
    bool mask or a slice."""
    if isinstance(index, slice):
        return value[index]
    index = torch.as_tensor(index, device=value.device)
    if index.dtype == torch.bool:
        index = index.nonzero().flatten()
    return value.index_select(0, index.long())


def _repeat_rows(value: torch.Tensor, repeats: int) -> torch.Tensor:
    return value.repeat_interleave(repeats, dim=0)


def _each_tensor(value: Any, fn: Any, arg: Any) -> Any:
    """``fn(tensor, arg)`` on ``value`` or on each tensor of a (nested) tuple."""
    if isinstance(value, tuple):
        return tuple(_each_tensor(v, fn, arg) for v in value)
    return fn(value, arg)


# the cache's batch-row operations (transformers' Cache API) and the same operation on the
# DATALORA per-row state, from the operation's first argument
_ROW_OPERATIONS = {"reorder_cache": _select_rows, "batch_select_indices": _select_rows,
                   "batch_repeat_interleave": _repeat_rows}


def _crop_state(cache: Any, length: int) -> None:
    """The DATALORA state on ``cache`` after ``cache.crop`` kept its first ``length``
    positions (assisted decoding drops the drafted tokens it rejected): the keep flags and
    the saliency context cut to them."""
    for attr in _CACHE_ATTRS:
        value = getattr(cache, attr, None)
        if value is not None:
            setattr(cache, attr, _each_tensor(value, lambda t, n: t[:, :n], length))


def _foreign_cache_error(cached: int, layer: int, recorded: int, what: str) -> ValueError:
    """The cache holds ``cached`` positions in decoder layer ``layer`` where the DATALORA
    state on it covers ``recorded`` (``what``: the keep flags or the saliency context)."""
    return ValueError(f"cache: the KV cache holds {cached} tokens in layer {layer} but "
                      f"DATALORA recorded {what} for {recorded}: the cache was filled or "
                      f"changed outside this DATALORA model (by another model, or by "
                      f"operations other than crop and the batch-row ones), and the keep "
                      f"flags and saliency state cannot follow that; start from an empty "
                      f"cache or prefill it again with this model")


class _RowsFollow:
    """``cache.<method>`` (a batch-row operation: beam search's reorder, dropping or
    repeating rows; or ``crop``, assisted decoding's rollback) that applies the same
    operation to the DATALORA state stored on the cache (keep flags, USN context).

    It holds the cache through a weak reference: stored on the cache, a strong one made a
    reference cycle, so every cache a generate() filled (GPU memory) lived on until Python's
    cyclic collector ran. Picklable, so ``copy.deepcopy`` / ``pickle`` / ``torch.save`` of
    the cache carry it over pointing at the copy (the prefix-caching recipe copies a
    prefilled cache)."""

    def __init__(self, cache: Any, method: str):
        self._cache, self.method = weakref.ref(cache), method

    @property
    def cache(self) -> Any:
        return self._cache()

    def __reduce__(self):
        return _RowsFollow, (self.cache, self.method)

    def __call__(self, *args, **kwargs) -> Any:
        cache = self.cache
        out = getattr(type(cache), self.method)(cache, *args, **kwargs)
        if self.method == "crop":  # its argument's meaning differs between transformers
            # releases (a length, or minus the positions to drop): read the length it left
            _crop_state(cache, cache.get_seq_length())
            return out
        rows = args[0] if args else next(iter(kwargs.values()))  # the rows / repeats
        for attr in _CACHE_ATTRS:
            value = getattr(cache, attr, None)
            if value is not None:
                setattr(cache, attr, _each_tensor(value, _ROW_OPERATIONS[self.method], rows))
        return out


def _follow_cache_rows(cache: Any) -> None:
    """Makes the cache's batch-row operations and ``crop`` follow with the DATALORA state."""
    for method in (*_ROW_OPERATIONS, "crop"):
        if hasattr(type(cache), method) and not isinstance(getattr(cache, method), _RowsFollow):
            setattr(cache, method, _RowsFollow(cache, method))


def _refuse_capture(tensor: torch.Tensor, what: str) -> None:
    """ValueError instead of a CUDA error when ``what`` (a host read) would run inside a
    CUDA graph capture."""
    if tensor.is_cuda and torch.cuda.is_current_stream_capturing():
        raise ValueError(f"CUDA graph capture: {what} reads the device on the host, which a "
                         f"capture cannot do; capture a training-mode forward instead")


_TAKES_POSITIONS: dict[type, bool] = {}
"""Per cache class: whether its ``get_mask_sizes`` takes ``cache_position`` (transformers
< 5.2x) rather than ``query_length`` (read from the signature once, not every decode step)."""


def _mask_sizes(cache: Any, query_length: int, layer_idx: int, total: int,
                device: torch.device) -> tuple[int, int]:
    """``(kv_length, kv_offset)`` of the keys layer ``layer_idx`` attends to this step
    (sliding-window caches keep the last window only; static caches have fixed length)."""
    fn = getattr(cache, "get_mask_sizes", None)
    if fn is None:
        return total, 0
    takes_positions = _TAKES_POSITIONS.get(type(cache))
    if takes_positions is None:
        first = next(iter(inspect.signature(fn).parameters))
        takes_positions = _TAKES_POSITIONS[type(cache)] = first == "cache_position"
    if takes_positions:
        start = total - query_length
        return fn(torch.arange(start, total, device=device), layer_idx)
    return fn(query_length, layer_idx)


PER_TOKEN_INPUTS = ("position_ids", "position_embeddings", "per_layer_input")
"""Decoder-layer inputs (keyword or positional) with one row per token, gathered to the
kept tokens for every packed layer from that layer's own value (so are inputs named
``position_embeddings_*``): Gemma 3 / 4 and OLMo 3 pass local and global RoPE to
different layers (transformers < 5: both, as ``position_embeddings_global`` /
``_local``), Gemma 4 a per-layer input."""


def _per_token(name: str) -> bool:
    return name in PER_TOKEN_INPUTS or name.startswith("position_embeddings")


def _warn(message: str, stacklevel: int) -> None:
    """``warnings.warn(message)`` (a UserWarning) reported ``stacklevel`` frames up from the
    caller; under torch.compile the trace-time warning of
    :func:`~datalora.ops.backends.warn_once` (dynamo cannot trace ``warnings.warn``: a graph
    break, an error under ``fullgraph=True``), once per process there, not per runtime."""
    if torch.compiler.is_compiling():
        warn_once(message, category=UserWarning)
    else:
        warnings.warn(message, stacklevel=stacklevel + 1)


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


def _keep_threshold(flat: torch.Tensor, retention: float) -> float:
    """The threshold keeping ``retention`` of the scores ``flat [N]`` (those strictly above
    it): halfway between the two scores that bracket their ``1 - retention`` quantile (the
    ranks of ``torch.quantile``'s linear interpolation), so it keeps as many of them as the
    quantile does but no calibration score sits on it. (The quantile often *is* a score:
    a token scored exactly at the threshold was kept on one path and pruned on the other,
    whose scores differ by ~1e-7, when generating from the calibration prompts.) Any N
    (``torch.quantile`` refuses more than 2**24 elements).

    When both bracketing scores are one tied value (an untrained score head scores every
    token alike), the threshold goes halfway to the nearest other score below or above the
    tie (below the smallest score: 1 below it), whichever keeps a count nearer the target
    (ties: below, keeping more)."""
    rank = (1.0 - retention) * (flat.numel() - 1)
    lower = math.floor(rank)
    upper = min(lower + 1, flat.numel() - 1)
    low = float(torch.kthvalue(flat, lower + 1).values)  # 1-based
    high = float(torch.kthvalue(flat, upper + 1).values)
    if low != high:
        return _between32(low, high)
    target = retention * flat.numel()
    under, over = flat[flat < low], flat[flat > low]
    keep_tie, drop_tie = flat.numel() - under.numel(), over.numel()
    if over.numel() and abs(drop_tie - target) < abs(keep_tie - target):
        return _between32(low, float(over.min()))
    if under.numel():
        return _between32(float(under.max()), low)
    below = _fp32(low - 1.0)
    return below if below < low else float(torch.nextafter(
        torch.tensor(low), torch.tensor(-math.inf)))


def _fp32(value: float) -> float:
    return float(torch.tensor(value, dtype=torch.float32))


def _between32(a: float, b: float) -> float:
    """The fp32 threshold (the buffer's dtype) halfway between scores ``a < b``, so that
    ``score > threshold`` keeps b and drops a: the midpoint rounded to fp32, or ``a``
    itself when that rounding reaches ``b`` (no fp32 value lies between them)."""
    mid = _fp32(a + (b - a) / 2)
    return mid if mid < b else a


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


@dataclass
class ForwardRecord:
    """What one forward decided (read by the trainer for losses and logs).

    Attributes:
        saliency: the USN output (``token_scores [B, L]``, routing over ``B*L``).
        valid: ``[B, L]`` bool real tokens of this forward.
        keep_prob: ``[B, L]`` ``sigmoid(score)`` (differentiable).
        kept: ``[B, L]`` bool tokens that ran through the pruned range.
        mode: ``"dense"``, ``"packed"`` or ``"masked"`` (cached generation).
    """

    saliency: SaliencyOutput
    valid: torch.Tensor
    keep_prob: torch.Tensor
    kept: torch.Tensor
    mode: str

    @property
    def routing(self) -> Routing:
        return self.saliency.routing

    def actual_retention(self) -> float:
        return float(self.kept[self.valid].float().mean()) if self.valid.any() else 1.0


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


@dataclass
class _Context:
    attention_mask: torch.Tensor | None
    cache: Any
    mode: str = "dense"
    routing: Routing | None = None
    record: ForwardRecord | None = None
    hidden_in: torch.Tensor | None = None
    selection: TokenSelection | None = None
    keep_q: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    # id -> (a per-token input of the packed layers, its kept rows): one gather per tensor
    gathered: dict[int, tuple[Any, Any]] = field(default_factory=dict)
    # attention mask per window of the pruned layers (None: full attention)
    masks: dict[int | None, torch.Tensor] = field(default_factory=dict)
    threshold: float | None = None  # keep_threshold, read once per forward
    # decides token by token (generate() or a cache): no per-sequence top-k in eval
    stepwise: bool = False
    # the pruned range's layers carrying a _SkippableForward for this forward (a cached one,
    # not under compile, no attention maps returned: a skipped layer computes none); they
    # may be skipped when every row of a step is pruned
    skippable_layers: list[nn.Module] = field(default_factory=list)
    # this step skips them: each appends placeholder keys / values to ``skip_cache``
    skip_cache: Any = None


@functools.cache
def _dynamic_cache_types() -> tuple[type | None, tuple[type, ...]]:
    """``(DynamicCache, its layer classes a skipped layer can append to)``; ``(None, ())``
    for a transformers release without per-layer caches (the layers then always run).
    Imported on first use: ``import datalora`` does not import transformers."""
    try:
        from transformers.cache_utils import (
            DynamicCache,
            DynamicLayer,
            DynamicSlidingWindowLayer,
        )
    except ImportError:
        return None, ()
    return DynamicCache, (DynamicLayer, DynamicSlidingWindowLayer)


class _SkippableForward:
    """The forward a cached DATALORA forward puts on each decoder layer of the pruned range
    for its duration (an instance attribute, called by ``nn.Module.__call__`` between the
    layer's hooks; removed when the forward ends): :meth:`DATALORARuntime._skip_or_run`.
    Holds the layer weakly (the layer holds this while it is set)."""

    __slots__ = ("runtime", "_layer")

    def __init__(self, runtime: DATALORARuntime, layer: nn.Module):
        self.runtime = runtime
        self._layer = weakref.ref(layer)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.runtime._skip_or_run(self._layer(), *args, **kwargs)


GRADIENT_CHECKPOINTING_REFUSED = (
    "gradient_checkpointing: not supported with the DATALORA saliency / pruning hooks "
    "(recomputation would re-run them, drawing other keep decisions); disable it, or build "
    "the model with routing='per_layer' (no saliency network or pruning), which supports it")


def _activation_checkpointing(module: nn.Module) -> bool:
    """Whether ``module`` (a decoder stack) recomputes layers in its backward: transformers'
    ``is_activation_checkpointing`` (``is_gradient_checkpointing`` before 5.x). It scans
    every submodule, so it is asked in training forwards only."""
    checkpointing = getattr(module, "is_activation_checkpointing", None)
    if checkpointing is None:
        checkpointing = getattr(module, "is_gradient_checkpointing", False)
    return bool(checkpointing)


class DATALORARuntime:
    """Installs the shared-routing + pruning hooks on a HF causal LM.

    Args:
        model: the (MoLoRA-injected) causal LM.
        saliency: the :class:`UnifiedSaliencyNetwork`.
        prune_layers: ``[start, end)`` (None: second half of the decoder layers).
        retention: initial retention (the curriculum sets it); 1.0 disables pruning.
        keep_last: always keep each sequence's last real token in top-k selection.
        target_retention: the retention the curriculum anneals to: under ``torch.compile``
            the packed width follows :func:`compiled_width_fraction` towards it, so the
            annealing recompiles :data:`COMPILED_WIDTH_STEPS` times, not every step. None:
            the width follows the retention exactly (eager mode always does).

    Attributes:
        retention, target_retention, last (the :class:`ForwardRecord` of the latest
        forward), start, end.

    The model and its decoder layers hold this runtime through their hooks, so the runtime
    refers to the model weakly (:attr:`model`; :attr:`layers` are found in it): a deleted
    model is freed by reference counting, without waiting for Python's cyclic garbage
    collector.
    """

    def __init__(self, model: nn.Module, saliency: UnifiedSaliencyNetwork,
                 prune_layers: list[int] | None = None, retention: float = 1.0,
                 keep_last: bool = True, target_retention: float | None = None):
        self.saliency = saliency
        self._model = weakref.ref(model)
        check_prunable(model)
        self.start, self.end = resolve_prune_range(prune_layers, len(self.layers))
        self._target_retention = None
        self.retention = 1.0
        self.set_retention(retention)
        self.target_retention = target_retention
        # False while the model's adapters are off: the pruned layers run dense (the base)
        self.pruning_enabled = True
        self.keep_last = keep_last
        self.last: ForwardRecord | None = None
        self._local = threading.local()  # the forward in progress, one per thread
        self._warned = False
        self._warned_train_cache = False
        self.threshold_calibrated_for(None)
        config = getattr(model, "config", None)
        # sliding window of each pruned layer (None: full attention); its mask is built per window
        self.windows = check_prune_range(config, self.layers, self.start, self.end)
        self._forward_parameters = {i: _parameter_names(type(self.layers[i]))
                                    for i in range(self.start, self.end)}
        # decoder-layer class -> whether its forward returned a plain tensor (a skipped
        # layer returns one)
        self._returns_tensor: dict[type, bool] = {}
        self._handles = self._install()

    # ------------------------------------------------------------------ state

    @property
    def model(self) -> nn.Module:
        """The causal LM the hooks are installed on."""
        return self._model()

    @property
    def layers(self) -> nn.ModuleList:
        """The model's decoder layers (found again on each use: a replaced layer list
        stays reachable)."""
        return find_decoder_layers(self.model)

    def __getstate__(self):
        # ``last`` / the forward context hold non-leaf tensors of the latest forward, which
        # copy.deepcopy (of the DATALORAModel holding this runtime) refuses; the model goes
        # in as an object, so that a copy refers to the copied model
        state = self.__dict__.copy()
        state["last"] = state["_local"] = None
        state["_model"] = self.model
        return state

    def __setstate__(self, state) -> None:
        state.setdefault("_target_retention", None)  # a runtime pickled before it existed
        state.setdefault("_compiled_width", state["retention"])
        state.setdefault("_returns_tensor", {})
        self.__dict__.update(state)
        model = state["_model"]
        self._model = (lambda: None) if model is None else weakref.ref(model)
        self._local = threading.local()

    @property
    def attn_implementation(self) -> str:
        """The model's attention implementation now (``set_attn_implementation`` may change
        it after the model was wrapped)."""
        config = getattr(self.model, "config", None)
        return getattr(config, "_attn_implementation", None) or "eager"

    @property
    def own_last(self) -> ForwardRecord | None:
        """The :class:`ForwardRecord` of this thread's latest forward (:attr:`last` is the
        latest of any thread), else :attr:`last` (a forward run in other threads, as
        ``nn.DataParallel``'s replicas run it)."""
        own = getattr(self._local, "last", None)
        return own if own is not None else self.last

    @property
    def _ctx(self) -> _Context | None:
        """The context of this thread's forward in progress (threads serving one model each
        have their own: ``generate`` from a thread pool)."""
        return getattr(self._local, "ctx", None)

    @_ctx.setter
    def _ctx(self, ctx: _Context | None) -> None:
        self._local.ctx = ctx

    def set_retention(self, retention: float) -> None:
        # a number in (0, 1]: float() took the strings "0.5" / "nan" and True
        self.retention = check_number("retention", retention, low=0, low_inclusive=False,
                                      high=1)
        self._update_compiled_width()

    def _update_compiled_width(self) -> None:
        # on the host when the retention or its target changes, not in the forward: dynamo
        # would specialize the retention on it
        self._compiled_width = compiled_width_fraction(self.retention, self._target_retention)

    @property
    def target_retention(self) -> float | None:
        """The retention the curriculum anneals to (None: not known); sets the packed
        width's grid under ``torch.compile`` (:func:`compiled_width_fraction`)."""
        return self._target_retention

    @target_retention.setter
    def target_retention(self, value: float | None) -> None:
        self._target_retention = None if value is None else check_number(
            "target_retention", value, low=0, low_inclusive=False, high=1)
        self._update_compiled_width()

    @property
    def threshold(self) -> float:
        """``saliency.keep_threshold`` as a float (NaN: not calibrated); a host read."""
        buffer = self.saliency.keep_threshold
        _refuse_capture(buffer, "reading keep_threshold")
        return float(buffer)

    def _forward_threshold(self, ctx: _Context) -> float:
        """:attr:`threshold`, read once per forward (each read is a host sync; eval forwards
        and every generated token consult it)."""
        if ctx.threshold is None:
            ctx.threshold = self.threshold
        return ctx.threshold

    def _uncalibrated(self, ctx: _Context) -> bool:
        """Whether ``keep_threshold`` is not calibrated (NaN), where a forward deciding token
        by token needs it (generate() with or without the cache, a cache): the pruned layers
        then run dense, with a warning (once), since a per-sequence top-k is not causal."""
        if not math.isnan(self._forward_threshold(ctx)):
            return False
        if not self._warned:
            _warn("keep_threshold is not calibrated: generation (with or without the KV "
                  "cache) and any forward given use_cache or a cache decide token by token, "
                  "so they run the pruned layers dense (call runtime.calibrate())",
                  stacklevel=2)
            self._warned = True
        return True

    def _threshold_in_use(self, threshold: float) -> float:
        """The calibrated threshold, about to select tokens at eval / generation time; warns
        once when it was calibrated for another retention than the current one (the
        threshold, not the retention, decides what is kept there)."""
        calibrated = self.calibrated_retention
        if (calibrated is not None and abs(calibrated - self.retention) > 1e-6
                and not self._warned_stale):
            _warn(f"keep_threshold was calibrated for retention {calibrated:g}; eval and "
                  f"generation keep the tokens above it (about {calibrated:g} of them), not "
                  f"retention {self.retention:g}: call calibrate() again", stacklevel=3)
            self._warned_stale = True
        return threshold

    def _retention_disables(self, ctx: _Context) -> bool:
        """Retention 1.0 turns pruning off, also where a threshold calibrated for a lower
        retention would otherwise decide (eval / generation): warned once there."""
        if self.retention < 1.0:
            return False
        calibrated = self.calibrated_retention
        if ctx.stepwise and calibrated is not None and calibrated < 1.0 \
                and not self._warned_off:
            _warn(f"keep_threshold was calibrated for retention {calibrated:g}, but the "
                  f"runtime's retention is 1.0, which turns pruning off: "
                  f"set_retention({calibrated:g}) to prune", stacklevel=3)
            self._warned_off = True
        return True

    @contextmanager
    def routing_scope(self, routing: Routing) -> Iterator[None]:
        """Runs MoLoRA layers called by hand (outside a model forward) with ``routing``."""
        previous, self._ctx = self._ctx, _Context(attention_mask=None, cache=None,
                                                  routing=routing)
        try:
            yield
        finally:
            self._ctx = previous

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # ------------------------------------------------------------------ skipped layers

    def _put_skippable_forwards(self, ctx: _Context, model: nn.Module) -> None:
        """Puts a :class:`_SkippableForward` on each decoder layer of ``model`` (the model
        this forward runs: a ``nn.DataParallel`` replica's own) in the pruned range that
        has no instance ``forward`` (accelerate's hooks set one: then no layer skips)."""
        layers = find_decoder_layers(model)
        if len(layers) < self.end:
            return
        for i in range(self.start, self.end):
            own = layers[i].__dict__.get("forward")
            if own is not None and not isinstance(own, _SkippableForward):  # left by a
                return  # forward that failed before it ended: replaced below
        for i in range(self.start, self.end):
            layers[i].forward = _SkippableForward(self, layers[i])
            ctx.skippable_layers.append(layers[i])

    @staticmethod
    def _remove_skippable_forwards(ctx: _Context) -> None:
        for layer in ctx.skippable_layers:
            if isinstance(layer.__dict__.get("forward"), _SkippableForward):
                del layer.__dict__["forward"]
        ctx.skippable_layers = []

    def _skippable(self, ctx: _Context, cache: Any, bsz: int) -> bool:
        """Whether the pruned layers may append placeholder keys / values to ``cache``
        instead of running: a ``DynamicCache`` whose layers for the pruned range are filled
        dynamic (or sliding-window) layers of this batch, decoder layer ``i`` carrying this
        forward's :class:`_SkippableForward`, writing cache layer ``i`` (its attention's
        ``layer_idx``) and, when it last ran, returning a plain tensor."""
        dynamic_cache, cache_layers = _dynamic_cache_types()
        if dynamic_cache is None or type(cache) is not dynamic_cache \
                or len(ctx.skippable_layers) != self.end - self.start:
            return False
        cached = getattr(cache, "layers", None)
        if cached is None or len(cached) < self.end:
            return False
        for i, layer in enumerate(ctx.skippable_layers, start=self.start):
            kv = cached[i]
            keys, values = getattr(kv, "keys", None), getattr(kv, "values", None)
            if not (self._returns_tensor.get(type(layer))
                    and getattr(getattr(layer, "self_attn", None), "layer_idx", None) == i
                    and type(kv) in cache_layers
                    and isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor)
                    and keys.dim() == 4 and values.dim() == 4 and keys.shape[0] == bsz):
                return False
        return True

    def _skip_or_run(self, layer: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """A pruned-range decoder layer's forward in a cached forward. In a step whose every
        row is pruned (:meth:`_skippable`), the layer's output would be replaced by the
        bypass and its keys / values masked from every later query: it appends zeros of
        their shape to its cache layer instead (the positions stay aligned), clears its
        MoLoRA layers' ``last_routing`` (they did not run) and returns a copy of its input
        (a hook may change the output in place). Otherwise it runs the layer's own forward."""
        ctx = self._ctx
        cache = None if ctx is None else ctx.skip_cache
        if cache is None:
            out = type(layer).forward(layer, *args, **kwargs)
            self._returns_tensor[type(layer)] = isinstance(out, torch.Tensor)
            return out
        hidden = args[0] if args else kwargs["hidden_states"]
        index = layer.self_attn.layer_idx
        kv = cache.layers[index]
        seq_len = hidden.shape[1]
        keys = kv.keys.new_zeros(*kv.keys.shape[:2], seq_len, kv.keys.shape[3])
        values = kv.values.new_zeros(*kv.values.shape[:2], seq_len, kv.values.shape[3])
        cache.update(keys, values, index)
        for module in layer.modules():
            if isinstance(module, MoLoRALinear):
                module.__dict__["last_routing"] = None
        return hidden.clone()

    def _install(self) -> list[Any]:
        handles = [self.model.register_forward_pre_hook(self._begin, with_kwargs=True),
                   self.model.register_forward_hook(self._finish, always_call=True),
                   self.layers[0].register_forward_pre_hook(self._run_saliency,
                                                            with_kwargs=True)]
        for i in range(self.start, self.end):
            handles.append(self.layers[i].register_forward_pre_hook(
                functools.partial(self._enter_layer, i), with_kwargs=True))
        # first among the layer's forward hooks: the output_hidden_states recorder (installed
        # lazily by transformers, maybe before these hooks) records the merged output
        handles.append(self.layers[self.end - 1].register_forward_hook(self._leave_range,
                                                                       prepend=True))
        for module in self.model.modules():
            if isinstance(module, MoLoRALinear):
                handles.append(module.register_forward_pre_hook(self._give_routing,
                                                                with_kwargs=True))
        return handles

    # ------------------------------------------------------------------ hooks

    def _begin(self, module, args, kwargs):
        if module.training and _activation_checkpointing(module):
            raise ValueError(GRADIENT_CHECKPOINTING_REFUSED)
        router_logits = kwargs.get("output_router_logits")
        if router_logits is None:
            router_logits = getattr(getattr(module, "config", None), "output_router_logits", False)
        if router_logits:
            raise ValueError(_ROUTER_LOGITS_ERROR)
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1:
            mask = args[1]
        cache = cache_of(kwargs)
        if cache is not None and getattr(cache, "is_compileable", False):
            raise ValueError(f"cache: {type(cache).__name__} (a static / compileable cache) is "
                             f"not supported by the DATALORA hooks; use the default dynamic "
                             f"cache (no cache_implementation='static')")
        if cache is None and kwargs.get("use_cache") is True and module.training \
                and torch.is_grad_enabled():
            # a training forward keeps each sequence's top-k tokens, which the cache path
            # (a threshold, token by token) cannot: it ran the pruned layers dense
            if not self._warned_train_cache:
                _warn("use_cache=True in a training forward: token pruning keeps each "
                      "sequence's top-k, which the KV-cache path cannot, so the forward runs "
                      "with use_cache=False", stacklevel=2)
                self._warned_train_cache = True
            kwargs = {**kwargs, "use_cache": False}
        # generate() always passes use_cache, True or False; a plain forward does not
        stepwise = cache is not None or "use_cache" in kwargs
        if cache is None and kwargs.get("use_cache") is not True:
            kwargs = {**kwargs, "use_cache": False}  # no cache: the packed path
        if mask is not None and mask.dim() != 2:
            raise ValueError(f"attention_mask: expected a [B, L] padding mask, got shape "
                             f"{tuple(mask.shape)} (continuous batching / paged attention, "
                             f"as generate_batch and transformers serve use, packs requests "
                             f"into one row, which the DATALORA hooks do not support: use "
                             f"generate)")
        attentions = kwargs.get("output_attentions")
        if attentions is None:
            attentions = getattr(getattr(module, "config", None), "output_attentions", False)
        ctx = self._ctx = _Context(attention_mask=mask, cache=cache if cache is not None else (
            "new" if kwargs.get("use_cache") else None), stepwise=stepwise)
        if ctx.cache is not None and not attentions and not torch.compiler.is_compiling():
            self._put_skippable_forwards(ctx, module)
        return args, kwargs

    def _finish(self, module, args, output):
        ctx = self._ctx
        if ctx is not None:
            self._remove_skippable_forwards(ctx)
            self.last = self._local.last = ctx.record
            hidden_states = getattr(output, "hidden_states", None)
            if hidden_states is not None and ctx.record is not None \
                    and ctx.record.mode != "dense":
                output.hidden_states = self._carried_hidden_states(ctx, hidden_states)
        self._ctx = None

    def _carried_hidden_states(self, ctx: _Context, hidden_states: tuple) -> tuple:
        """``output_hidden_states`` as the model carries them through the pruned range.

        HF records the output of decoder layer ``i`` as ``hidden_states[i + 1]`` (entry 0:
        the embeddings). Those of layers ``start .. end-2`` are what the layer computed:
        packed ``[B, K, d]`` (no cache; filler slots included) or ``[B, L, d]`` with values
        at pruned tokens (cached, masked). Each becomes ``[B, L, d]`` with the layer output
        at kept tokens and the bypass (the range's input) at the others; layer ``end-1``'s
        entry is recorded after :meth:`_leave_range` merged it.
        """
        kept = ctx.record.kept[..., None]
        fixed = list(hidden_states)
        for i in range(self.start + 1, self.end):
            h = fixed[i]
            if h is None:  # output_hidden_states selected other entries
                continue
            if ctx.record.mode == "packed":
                h = ops.scatter_tokens(ctx.hidden_in, h, ctx.selection.keep_idx,
                                       check_values=False)
            fixed[i] = torch.where(kept, h, ctx.hidden_in)
        return tuple(fixed)

    def _run_saliency(self, layer, args, kwargs):
        ctx = self._ctx
        if ctx is None:
            raise RuntimeError("the DATALORA decoder was called outside the causal LM's "
                               "forward; call the whole model")
        hidden = args[0] if args else kwargs["hidden_states"]
        bsz, seq_len = hidden.shape[:2]
        mask = ctx.attention_mask
        valid = (torch.ones(bsz, seq_len, dtype=torch.bool, device=hidden.device)
                 if mask is None else mask[:, -seq_len:].to(hidden.device).bool())
        cache = cache_of(kwargs)
        context = state = None
        # resume the context of the positions cached before this forward (layer 0 runs after
        # this hook); none cached: a new cache, or a reused one that was reset
        cached = 0 if cache is None else cache.get_seq_length(0)
        if cached:
            context = getattr(cache, _CACHE_CONTEXT_ATTR, None)
            recorded = 0 if context is None else context[1].shape[1]
            if recorded != cached:
                raise _foreign_cache_error(cached, 0, recorded, "the saliency context")
            state = (context[0][:, -1], context[1][:, -1])
        out = self.saliency(hidden, valid, state)
        if cache is not None:
            new = out.context
            setattr(cache, _CACHE_CONTEXT_ATTR, new if context is None else (
                torch.cat([context[0], new[0]], 1), torch.cat([context[1], new[1]], 1)))
            _follow_cache_rows(cache)
        out.context = None  # [B, L, h]: on the cache only, not held by the forward's record
        keep_prob = self.saliency.keep_probability(out.token_scores)
        ctx.routing = out.routing
        ctx.record = ForwardRecord(saliency=out, valid=valid, keep_prob=keep_prob,
                                   kept=valid.clone(), mode="dense")
        return None

    def _give_routing(self, module, args, kwargs):
        if len(args) > 1 or kwargs.get("routing") is not None:
            return None
        ctx = self._ctx
        if ctx is None or ctx.routing is None:
            raise RuntimeError("MoLoRALinear with shared routing was called outside a "
                               "DATALORA model forward (no routing available)")
        x = args[0] if args else kwargs["x"]
        if ctx.routing.expert_ids.device != x.device:
            raise ValueError(f"routing: the shared routing is on {ctx.routing.expert_ids.device} "
                             f"but this layer's input is on {x.device}; shared routing and "
                             f"token pruning need every decoder layer on one device (for a "
                             f"model split over GPUs with device_map, use routing='per_layer' "
                             f"or shard with FSDP / DDP instead)")
        tokens = x[..., 0].numel()
        if tokens != ctx.routing.num_tokens:
            raise ValueError(f"routing: the shared routing covers {ctx.routing.num_tokens} "
                             f"tokens but this layer got {tokens}; shared routing supports "
                             f"adapted layers inside the decoder only")
        return args, {**kwargs, "routing": ctx.routing}

    def _enter_layer(self, layer_idx, layer, args, kwargs):
        ctx = self._ctx
        if ctx is None or ctx.record is None:
            return None
        if layer_idx == self.start:
            self._start_range(ctx, args, kwargs)
            if ctx.mode == "packed":
                # the selection's indices are in range and distinct by construction
                hidden = ops.gather_tokens(ctx.hidden_in, ctx.selection.keep_idx,
                                           check_values=False)
                if args:
                    args = (hidden, *args[1:])
                else:
                    kwargs = {**kwargs, "hidden_states": hidden}
        if ctx.mode == "dense" or ctx.skip_cache is not None:
            return None
        if ctx.mode == "packed":
            args, kwargs = self._packed_inputs(ctx, layer_idx, args, kwargs)
        window = self.windows[layer_idx]
        return args, {**kwargs, "attention_mask": ctx.masks[window]}

    def _packed_inputs(self, ctx: _Context, layer_idx: int, args, kwargs):
        """Layer ``layer_idx``'s :data:`PER_TOKEN_INPUTS` gathered to the kept tokens."""
        names = self._forward_parameters[layer_idx]
        args = tuple(self._gathered(ctx, value) if 0 < i < len(names) and _per_token(names[i])
                     else value for i, value in enumerate(args))
        kwargs = {name: self._gathered(ctx, value) if _per_token(name) else value
                  for name, value in kwargs.items()}
        return args, kwargs

    @staticmethod
    def _gathered(ctx: _Context, value: Any) -> Any:
        """``value`` (a ``[1 or B, L, ...]`` tensor, a tuple of them, or None) at the kept
        tokens; computed once per forward for the layers that share it."""
        if value is None:
            return None
        if torch.compiler.is_compiling():  # a memo by id() makes dynamo guard on the object:
            # a recompile per forward (each makes new position ids); the graph dedupes
            return _each_tensor(value, _gather_rows, ctx.selection.keep_idx)
        memo = ctx.gathered.get(id(value))
        if memo is not None and memo[0] is value:
            return memo[1]
        rows = _each_tensor(value, _gather_rows, ctx.selection.keep_idx)
        ctx.gathered[id(value)] = (value, rows)
        return rows

    def _start_range(self, ctx: _Context, args, kwargs) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        record = ctx.record
        bsz, seq_len, _ = hidden.shape
        ctx.hidden_in = hidden
        if ctx.cache is None:
            if not self.pruning_enabled or self._retention_disables(ctx) or (
                    ctx.stepwise and not self.saliency.training and self._uncalibrated(ctx)):
                return
            self._start_packed(ctx, hidden, kwargs, record)
        else:
            self._start_masked(ctx, hidden, kwargs, record)

    def _range_windows(self) -> dict[int | None, int]:
        """``{window: first pruned layer with it}`` over the pruned layers (None: full)."""
        first: dict[int | None, int] = {}
        for i in range(self.start, self.end):
            first.setdefault(self.windows[i], i)
        return first

    def _mask_as_bool(self, kwargs) -> bool:
        if "flash" in self.attn_implementation or "flex" in self.attn_implementation:
            # flash attention takes no 4-D mask; flex attention adds a tensor mask to the
            # scores (a bool one would mask nothing)
            raise ValueError(f"attn_implementation: token pruning needs an explicit 4-D mask;"
                             f" use 'sdpa' or 'eager', not {self.attn_implementation!r}")
        original = kwargs.get("attention_mask")
        if isinstance(original, torch.Tensor):
            return original.dtype == torch.bool
        return self.attn_implementation != "eager"

    def _start_packed(self, ctx, hidden, kwargs, record) -> None:
        bsz, seq_len, _ = hidden.shape
        scores = record.saliency.token_scores
        compiling = torch.compiler.is_compiling()
        sel = select_tokens(scores, self.retention, record.valid, tau=self.saliency.tau,
                            noise=self.saliency.training, keep_last=self.keep_last,
                            width_fraction=self._compiled_width if compiling else None)
        if not self.saliency.training:
            threshold = self._forward_threshold(ctx)
            # calibrated (not NaN); not ``t == t``: a traced symbolic float (compile with
            # capture_scalar_outputs) folds that to True and prunes every token
            if not math.isnan(threshold):
                sel = self._threshold_selection(scores, record.valid, threshold)
        idx = sel.keep_idx
        p = record.keep_prob.gather(1, idx)
        weight = torch.where(sel.valid, 1.0 + (p - p.detach()), torch.zeros_like(p))
        ctx.weight = weight.to(hidden.dtype)
        ctx.selection = sel
        as_bool = self._mask_as_bool(kwargs)
        ctx.masks = {window: packed_attention_mask(sel.valid, idx, idx, hidden.dtype,
                                                   as_bool=as_bool, sliding_window=window)
                     for window in self._range_windows()}
        ctx.routing = gather_routing(record.routing, idx, seq_len)
        record.kept = sel.keep_mask(seq_len) & record.valid
        record.mode = ctx.mode = "packed"

    def _threshold_selection(self, scores, valid, threshold: float) -> TokenSelection:
        keep = (scores > self._threshold_in_use(threshold)) & valid
        counts = keep.sum(1)
        _refuse_capture(scores, "the calibrated-threshold eval forward (it sizes the packed "
                                "batch from the kept count)")
        width = max(int(counts.max()), 1)  # eval only: one host sync
        # the kept tokens first, in position order (a stable sort; a float key "keep -
        # position * 1e-6" ranked a pruned token above a kept one 1e6 positions later)
        idx = keep.to(torch.uint8).sort(dim=1, descending=True, stable=True).indices[:, :width]
        slot_valid = keep.gather(1, idx)
        keep_idx, perm = idx.sort(dim=1)
        return TokenSelection(keep_idx=keep_idx, valid=slot_valid.gather(1, perm),
                              counts=counts)

    def _start_masked(self, ctx, hidden, kwargs, record) -> None:
        bsz, seq_len, _ = hidden.shape
        cache = cache_of(kwargs)
        if not self.pruning_enabled or self._retention_disables(ctx) or self._uncalibrated(ctx):
            keep_new = record.valid.clone()
        else:
            threshold = self._threshold_in_use(self._forward_threshold(ctx))
            keep_new = (record.saliency.token_scores > threshold) & record.valid
        past = getattr(cache, _CACHE_KEEP_ATTR, None) if cache is not None else None
        if cache is not None:
            cached = cache.get_seq_length(self.start) if hasattr(cache, "get_seq_length") else 0
            if cached == 0:
                past = None  # a reused cache object that was reset (as for the USN state)
        past_len = 0 if past is None else past.shape[1]
        if cache is not None:
            if cached != past_len:
                raise _foreign_cache_error(cached, self.start, past_len, "keep flags")
        keep_all = keep_new if past is None else torch.cat([past, keep_new], 1)
        if cache is not None:
            setattr(cache, _CACHE_KEEP_ATTR, keep_all)
        ctx.keep_q = keep_new
        record.kept = keep_new
        record.mode = ctx.mode = "masked"
        if self._skippable(ctx, cache, bsz) and not bool(keep_new.any()):
            ctx.skip_cache = cache  # every row pruned: the pruned layers need not run
            return
        total = keep_all.shape[1]
        if ctx.attention_mask is not None:
            keep_all = keep_all & ctx.attention_mask[:, -total:].to(keep_all.device).bool()
        query_index = torch.arange(total - seq_len, total, device=hidden.device).expand(bsz, -1)
        as_bool = self._mask_as_bool(kwargs)
        ctx.masks = {}
        for window, layer_idx in self._range_windows().items():
            kv_length, kv_offset = (total, 0) if cache is None else _mask_sizes(
                cache, seq_len, layer_idx, total, hidden.device)
            key_index = torch.arange(kv_offset, kv_offset + kv_length,
                                     device=hidden.device).expand(bsz, -1)
            # keys the cache layer holds: the last window (sliding) or fixed slots (static,
            # unused ones hidden: index >= total fails kj <= qi and is not kept)
            filled = max(min(total, kv_offset + kv_length) - kv_offset, 0)
            key_ok = torch.zeros(bsz, kv_length, dtype=torch.bool, device=hidden.device)
            key_ok[:, :filled] = keep_all[:, kv_offset:kv_offset + filled]
            ctx.masks[window] = packed_attention_mask(key_ok, query_index, key_index,
                                                      hidden.dtype, as_bool=as_bool,
                                                      sliding_window=window)

    def _leave_range(self, layer, args, output):
        ctx = self._ctx
        if ctx is None or ctx.mode == "dense":
            return None
        out = output[0] if isinstance(output, tuple) else output
        if ctx.mode == "packed":
            full = ops.scatter_tokens(ctx.hidden_in, out, ctx.selection.keep_idx, ctx.weight,
                                      check_values=False)
            ctx.routing = ctx.record.routing
        else:
            full = torch.where(ctx.keep_q[..., None], out, ctx.hidden_in)
        ctx.mode = "dense"
        ctx.gathered, ctx.masks, ctx.skip_cache = {}, {}, None
        return (full, *output[1:]) if isinstance(output, tuple) else full

    # ------------------------------------------------------------------ threshold

    @torch.no_grad()
    def calibrate(self, scores: torch.Tensor, valid: torch.Tensor | None = None,
                  retention: float | None = None) -> float:
        """Sets ``keep_threshold`` to keep ``retention`` of the tokens (the score quantile,
        moved halfway to the next score: see :func:`_keep_threshold`).

        Args:
            scores: ``[N]`` or ``[B, L]`` token scores collected on representative data.
            valid: same shape, bool (False: padding, ignored).
            retention: default: the current retention.
        """
        retention = self.retention if retention is None else check_number(
            "retention", retention, low=0, low_inclusive=False, high=1)
        flat = scores.float().reshape(-1)
        if valid is not None:
            flat = flat[valid.reshape(-1).bool()]
        if flat.numel() == 0:
            raise ValueError("scores: no valid token scores to calibrate on")
        bad = int((~torch.isfinite(flat)).sum())
        if bad:  # NaN ranks above every score, -inf + inf is NaN: a wrong threshold
            raise ValueError(f"scores: expected finite values, got {bad} NaN or inf of "
                             f"{flat.numel()} valid token scores")
        value = _keep_threshold(flat, retention) if retention < 1.0 else -math.inf
        kept = float((flat > value).float().mean())
        if abs(kept - retention) > max(0.05, 1.0 / flat.numel()):
            warnings.warn(f"scores: many token scores are tied, so the threshold {value:.6g} "
                          f"keeps {kept:.1%} of the {flat.numel()} calibration tokens for "
                          f"retention {retention} (an untrained saliency network scores "
                          f"tokens alike)", UserWarning, stacklevel=2)
        self.saliency.keep_threshold.fill_(value)
        self.threshold_calibrated_for(retention)
        return value

    def threshold_calibrated_for(self, retention: float | None) -> None:
        """Records the retention the keep threshold now holds the calibration of (None:
        unknown, e.g. a loaded threshold) and re-arms the warnings about it."""
        self.calibrated_retention = retention
        self._warned_stale = self._warned_off = False
