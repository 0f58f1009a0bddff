"""Literal, loop-free but memory-hungry transcriptions of the MoLoRA math (README, first lines)
and of the token gather / scatter.

These are the test oracles: written for clarity, not speed (they materialise the
per-token expert weights ``A[expert_ids]`` of shape ``[T, k, r, d_in]``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def molora_delta_reference(
    x: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    expert_ids: torch.Tensor,
    gates: torch.Tensor,
    rank_scale: torch.Tensor | None = None,
    scaling: float = 1.0,
) -> torch.Tensor:
    """``delta[t] = scaling * sum_j gates[t,j] * B[e_tj] @ (rank_scale[t] * (A[e_tj] @ x[t]))``.

    Shapes: x ``[T, d_in]``, A ``[E, r, d_in]``, B ``[E, d_out, r]``, expert_ids and
    gates ``[T, k]``, rank_scale ``[T, r]`` or None. Returns ``[T, d_out]``.
    """
    ids = expert_ids.long()
    h = torch.einsum("tkrd,td->tkr", A[ids], x)
    if rank_scale is not None:
        h = h * rank_scale[:, None, :]
    z = h * gates[..., None]
    return scaling * torch.einsum("tkor,tkr->to", B[ids], z)


def molora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    A: torch.Tensor,
    B: torch.Tensor,
    expert_ids: torch.Tensor,
    gates: torch.Tensor,
    rank_scale: torch.Tensor | None = None,
    scaling: float = 1.0,
) -> torch.Tensor:
    """``y = x @ weight.T + bias + molora_delta(x, ...)``; shapes as in the delta."""
    return F.linear(x, weight, bias) + molora_delta_reference(
        x, A, B, expert_ids, gates, rank_scale, scaling)


def gather_tokens_reference(hidden: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
    """``packed[b, i] = hidden[b, keep_idx[b, i]]``: hidden ``[B, L, d]``, keep_idx ``[B, K]``."""
    index = keep_idx.long()[..., None].expand(-1, -1, hidden.shape[-1])
    return torch.gather(hidden, 1, index)


def scatter_tokens_reference(hidden: torch.Tensor, packed: torch.Tensor, keep_idx: torch.Tensor,
                             weight: torch.Tensor | None = None) -> torch.Tensor:
    """Kept rows become ``hidden + weight * (packed - hidden)`` (``packed`` when weight is
    None), computed as ``torch.lerp`` does: exact at weight 0 and 1.

    hidden ``[B, L, d]``, packed ``[B, K, d]``, keep_idx ``[B, K]`` (distinct per row),
    weight ``[B, K]`` or None. Rows not in keep_idx pass ``hidden`` through.
    """
    acc = torch.promote_types(hidden.dtype, torch.float32)  # as the Triton kernel: one rounding
    new = packed.to(acc)
    if weight is not None:
        kept = gather_tokens_reference(hidden, keep_idx).to(acc)
        w = weight[..., None].to(acc)
        diff = new - kept
        new = torch.where(w < 0.5, kept + w * diff, new - diff * (1 - w))
    index = keep_idx.long()[..., None].expand(-1, -1, hidden.shape[-1])
    # kept rows rounded once to hidden's dtype; the rest of hidden is copied as it is (no
    # [B, L, d] round trip through fp32: the same values, a third of the memory traffic)
    return hidden.scatter(1, index, new.to(hidden.dtype))
