"""The DATALORA state a KV cache carries between forwards, and how it follows the cache.

Per cached position: the keep flags of the pruned range and the saliency network's running
context. Stored as attributes of the cache object; beam search's row operations and
assisted decoding's ``crop`` apply to them too (:class:`_RowsFollow`, put on each cache).
"""

from __future__ import annotations

import functools
import inspect
import weakref
from typing import Any

import torch

_CACHE_KEEP_ATTR = "_datalora_keep"  # [B, positions] bool: kept in the pruned range
# (feature sums [B, positions, h], counts [B, positions]): the saliency network's running
# context after each cached position; the last one resumes it, any one after a crop (a cache
# pickled by a release that kept only the last, as `_datalora_usn_context`, is refused)
_CACHE_CONTEXT_ATTR = "_datalora_saliency_context"
_CACHE_ATTRS = (_CACHE_KEEP_ATTR, _CACHE_CONTEXT_ATTR)


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
