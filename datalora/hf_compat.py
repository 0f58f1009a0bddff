"""Names that changed across the transformers releases datalora supports (>= 4.56).

transformers 5.24 renamed the KV-cache keyword of model and decoder-layer forwards from
``past_key_values`` to ``cache`` (the old name still works there, with a FutureWarning,
until 5.40) and the output field likewise.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch.nn as nn


def cache_of(kwargs: dict[str, Any]) -> Any:
    """The KV cache among a forward's kwargs (``cache``, ``past_key_values``, or the
    ``layer_past`` Falcon / GPT-NeoX / Bloom decoder layers take), or None."""
    for name in ("cache", "past_key_values", "layer_past"):
        cache = kwargs.get(name)
        if cache is not None and (name != "layer_past" or hasattr(cache, "get_seq_length")):
            return cache
    return None


@functools.cache
def _cache_param(module_cls: type) -> str | None:
    params = inspect.signature(module_cls.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def cache_kwargs(model: nn.Module, cache: Any) -> dict[str, Any]:
    """``{"cache": cache}`` or ``{"past_key_values": cache}``: the name the first module of
    ``model.modules()`` whose forward names either takes (so wrappers with ``**kwargs``
    forwards, such as PEFT or :class:`~datalora.model.DATALORAModel`, are looked through)."""
    for module in model.modules():
        name = _cache_param(type(module))
        if name is not None:
            return {name: cache}
    return {"past_key_values": cache}


def output_cache(output: Any) -> Any:
    """The cache a model forward returned (``output.cache`` or ``output.past_key_values``)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def transformers_major() -> int:
    """The installed transformers' major version (imported here: ``import datalora`` does
    not import it)."""
    import transformers

    return int(transformers.__version__.split(".")[0])
