"""Adapter tensors of FSDP-sharded models: gather them to save, scatter them back to load.

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) every parameter is a ``DTensor``
holding one shard per rank; saving it as is would write one rank's slice. These helpers
turn such tensors into full ones (collective: every rank calls them, in the same order)
and write full tensors back into the shards. FSDP1 (``FullyShardedDataParallel``) flattens
parameters into per-module flat buffers; its full state dict must come from FSDP itself
(``FSDP.state_dict_type(..., FULL_STATE_DICT)``, which ``transformers.Trainer`` gathers
and passes to ``_save``), so :func:`sharding_kind` only reports it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn


def _dtensor_type() -> type | None:
    if not torch.distributed.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def sharding_kind(module: nn.Module) -> str | None:
    """``"fsdp2"`` when ``module`` holds DTensor parameters, ``"fsdp1"`` when it contains a
    ``FullyShardedDataParallel`` module, else None."""
    dtensor = _dtensor_type()
    if dtensor is None:
        return None
    if any(isinstance(p, dtensor) for p in module.parameters()):
        return "fsdp2"
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(m, FullyShardedDataParallel) for m in module.modules()):
        return "fsdp1"
    return None


# submodules that FSDP1 and activation checkpointing insert between a parent and the module
# they wrap; their state_dict hooks leave these names out of the keys
WRAPPER_ATTRIBUTES = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


def unwrapped_name(name: str) -> str:
    """``name`` (a dotted parameter path) without FSDP1 / activation-checkpoint wrapper
    segments: the key the wrapped model's ``state_dict()`` uses, and the name the parameter
    had before wrapping."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_ATTRIBUTES)


def full_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached full copies of ``tensors``: DTensors are all-gathered (collective, so every
    rank must call this with the same names in the same order), others copied as they are."""
    dtensor = _dtensor_type()
    out = {}
    for name, t in tensors.items():
        if dtensor is not None and isinstance(t, dtensor):
            t = t.full_tensor()
        out[name] = t.detach().clone()
    return out


@torch.no_grad()
def copy_full_into(targets: Mapping[str, torch.Tensor],
                   sources: Mapping[str, torch.Tensor]) -> None:
    """``targets[name].copy_(sources[name])`` for every name of ``sources``, where a DTensor
    target receives its own shard of the full source (collective for DTensors: every rank
    calls this with the same names in the same order; rank 0's values are scattered)."""
    dtensor = _dtensor_type()
    for name, src in sources.items():
        dst = targets[name]
        if dtensor is not None and isinstance(dst, dtensor):
            from torch.distributed.tensor import distribute_tensor

            src = distribute_tensor(src.to(device=dst.device, dtype=dst.dtype),
                                    dst.device_mesh, dst.placements)
        dst.copy_(src)


__all__ = ["copy_full_into", "full_tensors", "sharding_kind", "unwrapped_name"]
