"""Storage layout of the experts' up-projections ``B [E, d_out, r]``.

The dense strategy of every backend multiplies by ``B_all [d_out, E*r]`` with
``B_all[o, e*r + i] = B[e, o, i]`` (the expand in the forward, ``dy @ B_all`` in the
backward) and computes ``dB`` as ``dy^T @ Zs`` in that same ``[d_out, E*r]`` form. For a
contiguous B (``MoLoRALinear``'s default) each is a copy: of B in the forward, again in the
backward, and of dB (a launch each on a GPU). A B stored *expert-minor*, as a contiguous
``[d_out, E, r]`` buffer seen through a transposed view of shape ``[E, d_out, r]``, makes
``B_all`` a view and lets the dB GEMM write the gradient in place.

The ops accept B with any strides and return dB with B's strides (a dense B), so autograd
accumulates it into ``B.grad`` without a copy. :func:`use_expert_minor_b` switches a
model's MoLoRA layers over; it is opt-in because FSDP2 (``fully_shard``) refuses
non-contiguous parameters.
"""

from __future__ import annotations

import torch


def expert_rows(A: torch.Tensor) -> torch.Tensor:
    """``A [E, r, d_in]`` as ``A_all [E*r, d_in]`` (a view for contiguous A), the dense
    strategy's shrink weight."""
    return A.reshape(A.shape[0] * A.shape[1], A.shape[2])  # not -1: d_in may be 0


def expert_columns_is_view(B: torch.Tensor) -> bool:
    """Whether :func:`expert_columns` of ``B`` is a view (B stored expert-minor)."""
    return B.transpose(0, 1).is_contiguous()


def expert_columns(B: torch.Tensor) -> torch.Tensor:
    """``B [E, d_out, r]`` as ``B_all [d_out, E*r]``, ``B_all[o, e*r + i] = B[e, o, i]``: a
    view for an expert-minor B, else a copy of B's size."""
    E, d_out, r = B.shape
    return B.transpose(0, 1).reshape(d_out, E * r)


def expert_columns_grad(dy: torch.Tensor, zs: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``dB [E, d_out, r]`` from ``dB_all = dy^T @ zs`` (``dy [T, d_out]``, ``zs [T, E*r]``),
    with B's strides (``torch.empty_like``): the GEMM writes into an expert-minor dB
    directly; any other layout gets the product copied in."""
    E, d_out, r = B.shape
    dB = torch.empty_like(B)
    if expert_columns_is_view(dB):
        torch.mm(dy.t(), zs, out=dB.transpose(0, 1).view(d_out, E * r))
    else:
        dB.copy_(torch.mm(dy.t(), zs).view(d_out, E, r).transpose(0, 1))
    return dB


def expert_minor(B: torch.Tensor) -> torch.Tensor:
    """A copy of ``B [E, d_out, r]`` stored expert-minor (strides ``(r, E*r, 1)``), same
    shape, values, dtype and device: :func:`expert_columns` of it is a view."""
    E, d_out, r = B.shape
    out = torch.empty(d_out, E, r, dtype=B.dtype, device=B.device).transpose(0, 1)
    return out.copy_(B)


def use_expert_minor_b(model: torch.nn.Module) -> int:
    """Stores the ``lora_B`` of every :class:`~datalora.MoLoRALinear` in ``model``
    expert-minor, in place (same parameter objects, values and ``requires_grad``); returns
    how many changed. Call it before building the optimizer. Not for models sharded with
    FSDP2 (``fully_shard`` refuses non-contiguous parameters). ``save_pretrained``,
    Trainer checkpoints and ``torch.save`` work as before (datalora writes contiguous copies;
    loading copies into the parameter); a ``state_dict()`` given to safetensors' own
    ``save_file`` needs ``.contiguous()`` values, as for any non-contiguous tensor."""
    from datalora.layers import MoLoRALinear  # the layers import the ops

    changed = 0
    for module in model.modules():
        if isinstance(module, MoLoRALinear):
            B = module.lora_B
            if expert_columns_is_view(B):
                continue
            B.data = expert_minor(B.data)
            changed += 1
    return changed
