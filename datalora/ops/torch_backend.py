"""The ``torch`` backend: vectorized MoLoRA forward/backward with no loop over experts.

Strategy ("shrink all, then select"): one GEMM ``x @ A_all^T`` with N = E*r computes
every expert's projection while reading x once; the routed slices are gathered,
scaled by gate and rank scale, scattered into a dense ``[T, E*r]`` buffer (zeros for
unrouted experts) and expanded with one GEMM against ``B_all [E*r, d_out]``.
E*r is small next to d, so both GEMMs together cost a few percent of the base linear.

This module doubles as the reference implementation of the backend protocol
(see ``datalora.ops.backends``): ``delta_forward`` returns the un-scaled per-route
projections ``h [T, k, r]`` that ``delta_backward`` needs.
"""

from __future__ import annotations

import torch

from datalora.reference import gather_tokens_reference, scatter_tokens_reference


def _flat_A(A: torch.Tensor) -> torch.Tensor:
    """``[E, r, d_in] -> [E*r, d_in]``."""
    return A.reshape(-1, A.shape[-1])


def _flat_B(B: torch.Tensor) -> torch.Tensor:
    """``[E, d_out, r] -> [d_out, E*r]`` (column ``e*r + i`` is ``B[e, :, i]``)."""
    return B.permute(1, 0, 2).reshape(B.shape[1], -1)


def _route_index(expert_ids: torch.Tensor, r: int) -> torch.Tensor:
    """Column indices ``[T, k*r]`` of each routed expert's rank slice in ``[T, E*r]``."""
    ids = expert_ids.long()
    offsets = torch.arange(r, device=ids.device)
    return (ids[..., None] * r + offsets).reshape(ids.shape[0], ids.shape[1] * r)


def _dense(values: torch.Tensor, index: torch.Tensor, E: int) -> torch.Tensor:
    """Scatter-adds per-route ``values [T, k, r]`` into a dense ``[T, E*r]`` buffer at the
    columns ``index [T, k*r]`` of :func:`_route_index`."""
    T, k, r = values.shape
    out = values.new_zeros(T, E * r)
    return out.scatter_add_(1, index, values.reshape(T, k * r))


def _route_scale(gates, rank_scale, dtype):
    """Per-route multiplier ``gates[t,j] * rank_scale[t, i]`` as ``[T, k, r]`` (broadcastable)."""
    s = gates.to(dtype)[..., None]
    if rank_scale is not None:
        s = s * rank_scale.to(dtype)[:, None, :]
    return s


def _routed(x, A, expert_ids, gates, rank_scale, scaling):
    """``(h, zdense)``: routed projections ``h = A[e] @ x`` ``[T, k, r]`` and, scattered to
    ``[T, E*r]``, ``h`` times gate, rank scale and ``scaling`` (applied on the k*r routed
    values per token, not on d_out)."""
    E, r, _ = A.shape
    index = _route_index(expert_ids, r)
    H = x @ _flat_A(A).T  # [T, E*r]: every expert at once, reading x once
    h = H.gather(1, index).view(x.shape[0], expert_ids.shape[1], r)
    z = h * (_route_scale(gates, rank_scale, x.dtype) * scaling)
    return h, _dense(z, index, E)


def delta_forward(x, A, B, expert_ids, gates, rank_scale, scaling):
    """Returns ``(delta [T, d_out], h [T, k, r])`` with ``h = A[e] @ x`` per route."""
    h, zdense = _routed(x, A, expert_ids, gates, rank_scale, scaling)
    return zdense @ _flat_B(B).T, h


def linear_forward(x, weight, bias, A, B, expert_ids, gates, rank_scale, scaling):
    """``(y, h)``: ``y = x W^T + b + delta`` accumulated in one ``[T, d_out]`` buffer."""
    h, zdense = _routed(x, A, expert_ids, gates, rank_scale, scaling)
    y = torch.mm(x, weight.T) if bias is None else torch.addmm(bias, x, weight.T)
    return y.addmm_(zdense, _flat_B(B).T), h


def delta_backward(grad, x, A, B, expert_ids, gates, rank_scale, h, scaling, needs):
    """Gradients ``(dx, dA, dB, dgates, drank_scale)``; entries not in ``needs`` are None.

    ``needs`` is a 5-tuple of bools in that order.
    """
    E, r, _ = A.shape
    T, k = expert_ids.shape
    need_x, need_A, need_B, need_g, need_rs = needs
    grad = grad.to(x.dtype)
    s = _route_scale(gates, rank_scale, x.dtype)
    index = _route_index(expert_ids, r)
    dx = dA = dB = dgates = drs = None
    # dZ[t, j] = scaling * B[e_tj]^T dy[t]
    dz = (grad @ _flat_B(B)).gather(1, index).view(T, k, r) * scaling
    if need_B:
        dB_flat = grad.T @ _dense(h * (s * scaling), index, E)  # [d_out, E*r]
        dB = dB_flat.view(B.shape[1], E, r).permute(1, 0, 2).contiguous()
    if need_g:
        hr = h if rank_scale is None else h * rank_scale.to(h.dtype)[:, None, :]
        dgates = (dz * hr).sum(-1).to(gates.dtype)
    if need_rs:
        drs = (dz * h * gates.to(h.dtype)[..., None]).sum(1).to(rank_scale.dtype)
    if need_x or need_A:
        dH = _dense(dz * s, index, E)  # [T, E*r]
        if need_x:
            dx = dH @ _flat_A(A)
        if need_A:
            dA = (dH.T @ x).view(E, r, x.shape[1])
    return dx, dA, dB, dgates, drs


def gather_tokens(hidden, keep_idx):
    return gather_tokens_reference(hidden, keep_idx)


def scatter_tokens(hidden, packed, keep_idx, weight):
    return scatter_tokens_reference(hidden, packed, keep_idx, weight)
