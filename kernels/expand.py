"""Expand kernels: ``Y (+)= alpha * sum_j Z[t, j] @ W[e_tj]^T``.

``W`` is ``[E, O, R]`` reached through strides, so the forward expands with
``B [E, d_out, r]`` and the backward's ``dx`` with ``A^T`` of ``A [E, r, d_in]``.

- dense: the caller's cuBLAS GEMM ``Y (+)= alpha * Zd [T, E*R] @ W_all^T`` with
  ``W_all[o, e*R + i] = W[e, o, i]`` (``datalora.ops.triton_backend``).
- ``expand_grouped``: over routes sorted by expert, each program one block of one
  expert's segment: ``Yr[route] (+)= alpha * Z[route] @ W[e]^T``. With k = 1 a route
  is its token and Yr is Y itself; otherwise the caller sums the k routes per token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    LAUNCH_OPTIONS,
    block_expert,
    col_block,
    e_pad,
    grouped_grid_blocks,
    row_block,
    warps_for,
)

BLOCK_O = 64


@triton.jit
def _expand_grouped_kernel(
    z_ptr, w_ptr, order_ptr, offsets_ptr, y_ptr,
    O, E, R,
    stride_we, stride_wo, stride_wr, stride_yt, stride_yo,
    alpha,
    ACCUMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr,
    BLOCK_R: tl.constexpr, E_PAD: tl.constexpr,
):
    expert, row0, seg_hi = block_expert(offsets_ptr, tl.program_id(0), E, BLOCK_M, E_PAD)
    if expert >= E:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    mask_m = rows < seg_hi
    route = tl.load(order_ptr + rows, mask=mask_m, other=0).to(tl.int64)
    offs_o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    mask_o = offs_o < O
    w_base = w_ptr + expert.to(tl.int64) * stride_we
    acc = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        mask_r = offs_r < R
        zt = tl.load(z_ptr + route[:, None] * R + offs_r[None, :],
                     mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        # int64 columns: an expert-minor B's column stride is E*r (d_out * E * r > 2**31
        # at E*r = 8192 and a 262k-row vocabulary)
        cols = offs_o.to(tl.int64)[None, :] * stride_wo
        wt = tl.load(w_base + offs_r[:, None] * stride_wr + cols,
                     mask=mask_r[:, None] & mask_o[None, :], other=0.0)
        acc = tl.dot(zt, wt, acc, input_precision="ieee")
    acc = acc * alpha
    y_ptrs = y_ptr + route[:, None] * stride_yt + offs_o[None, :] * stride_yo
    mask = mask_m[:, None] & mask_o[None, :]
    if ACCUMULATE:
        acc += tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


def grouped_config(num_routes: int, R: int, fp32: bool = False) -> dict:
    """Tile of ``_expand_grouped_kernel`` for ``num_routes = T*k`` routes of rank R."""
    return dict(BLOCK_M=row_block(num_routes), BLOCK_O=BLOCK_O,
                BLOCK_R=16 if fp32 else col_block(R),
                num_warps=warps_for(row_block(num_routes), BLOCK_O))


def expand_grouped(z, w, w_strides, perm, y, E, R, alpha, accumulate):
    """``y[route] (+)= alpha * z[route] @ W[e]^T``; z ``[T*k, R]``, y ``[T*k, O]``."""
    num_routes, O = y.shape
    cfg = grouped_config(num_routes, R, z.dtype == torch.float32)
    grid = (grouped_grid_blocks(num_routes, E, cfg["BLOCK_M"]), triton.cdiv(O, cfg["BLOCK_O"]))
    _expand_grouped_kernel[grid](
        z, w, perm.order, perm.expert_offsets, y, O, E, R, *w_strides,
        y.stride(0), y.stride(1), float(alpha), ACCUMULATE=accumulate, E_PAD=e_pad(E),
        **cfg, **LAUNCH_OPTIONS)


def launch_configs() -> dict[str, list[dict]]:
    """Every constexpr set the launchers above can pick (for the compile check)."""
    rows, cols = (16, 64), (16, 64)
    split = ((False, ("fp16", "bf16")), (True, ("fp32",)))
    return {
        "_expand_grouped_kernel": [dict(grouped_config(m, r, fp32), ACCUMULATE=a,
                                        E_PAD=e_pad(1), dtypes=dts)
                                   for m in rows for r in cols for a in (False, True)
                                   for fp32, dts in split],
    }
