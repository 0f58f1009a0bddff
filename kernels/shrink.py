"""Shrink kernels: per-route ``raw[t, j, :] = W[e_tj] @ X[t]`` plus the routed-scaled form.

Two strategies over the same math (``W`` is ``[E, R, K]`` reached through strides, so
the forward uses ``A [E, r, d_in]`` and the backward ``B^T`` of ``B [E, d_out, r]``):

- ``shrink_dense``: one GEMM ``X [T, K] @ W_all^T [K, E*R]`` over every expert,
  reading X once; the epilogue selects the routed slices into ``raw [T*k, R]`` and
  writes the dense ``[T, E*R]`` buffer ``mult * gsum[t, e] * rank_scale[t, i] * H``
  (``gsum`` = sum of the gates routed to e), which the dense expand consumes.
- ``shrink_grouped``: over routes sorted by expert, each program one ``BLOCK_M``-row
  block of one expert's segment: ``raw[route] = W[e] @ X[token(route)]`` and
  ``scaled[route] = mult * gate * rank_scale * raw``. Only routed experts are read.

``rank_scale`` is always a pointer: callers pass a ``[R]`` vector of ones with row
stride 0 when there is none. Expert ids are clamped to ``[0, E)``.
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
    int32_columns,
    row_block,
    warps_for,
)

BLOCK_K = 32
# launch_configs: 16-bit configs and fp32 configs (fp32 FMA dots need a K-step of 16)
SPLIT = ((False, ("fp16", "bf16")), (True, ("fp32",)))


@triton.jit
def _shrink_dense_kernel(
    x_ptr, w_ptr, ids_ptr, gates_ptr, rs_ptr, dense_ptr, raw_ptr,
    T, K, E, R, k,
    stride_xt, stride_xk, stride_we, stride_wr, stride_wk, stride_rst,
    mult,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_t = offs_t < T
    mask_n = offs_n < E * R
    e_n = offs_n // R
    i_n = offs_n % R
    rows = offs_t.to(tl.int64)
    x_rows = x_ptr + rows[:, None] * stride_xt
    w_cols = w_ptr + e_n[None, :].to(tl.int64) * stride_we + i_n[None, :] * stride_wr
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        xt = tl.load(x_rows + offs_k[None, :] * stride_xk,
                     mask=mask_t[:, None] & mask_k[None, :], other=0.0)
        wt = tl.load(w_cols + offs_k[:, None] * stride_wk,
                     mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(xt, wt, acc, input_precision="ieee")
    # epilogue: select routed slices, sum the gates routed to each column's expert
    gsum = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    mask_tn = mask_t[:, None] & mask_n[None, :]
    for j in range(0, k):
        route = rows * k + j
        e_tj = tl.load(ids_ptr + route, mask=mask_t, other=0)
        e_tj = tl.minimum(tl.maximum(e_tj, 0), E - 1)
        g = tl.load(gates_ptr + route, mask=mask_t, other=0.0)
        match = e_tj[:, None] == e_n[None, :]
        gsum += tl.where(match, g[:, None], 0.0)
        tl.store(raw_ptr + route[:, None] * R + i_n[None, :],
                 acc.to(raw_ptr.dtype.element_ty), mask=mask_tn & match)
    rs = tl.load(rs_ptr + rows[:, None] * stride_rst + i_n[None, :], mask=mask_tn, other=0.0)
    val = acc * gsum * rs * mult
    tl.store(dense_ptr + rows[:, None] * (E * R) + offs_n[None, :],
             val.to(dense_ptr.dtype.element_ty), mask=mask_tn)


@triton.jit
def _shrink_grouped_kernel(
    x_ptr, w_ptr, order_ptr, offsets_ptr, gates_ptr, rs_ptr, raw_ptr, scaled_ptr,
    K, E, R, k,
    stride_xt, stride_xk, stride_we, stride_wr, stride_wk, stride_rst,
    mult,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    E_PAD: tl.constexpr,
):
    expert, row0, seg_hi = block_expert(offsets_ptr, tl.program_id(0), E, BLOCK_M, E_PAD)
    if expert >= E:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    mask_m = rows < seg_hi
    route = tl.load(order_ptr + rows, mask=mask_m, other=0).to(tl.int64)
    tok = route // k
    offs_r = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = offs_r < R
    x_rows = x_ptr + tok[:, None] * stride_xt
    w_cols = w_ptr + expert.to(tl.int64) * stride_we + offs_r[None, :] * stride_wr
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        xt = tl.load(x_rows + offs_k[None, :] * stride_xk,
                     mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        wt = tl.load(w_cols + offs_k[:, None] * stride_wk,
                     mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        acc = tl.dot(xt, wt, acc, input_precision="ieee")
    mask = mask_m[:, None] & mask_r[None, :]
    out = route[:, None] * R + offs_r[None, :]
    tl.store(raw_ptr + out, acc.to(raw_ptr.dtype.element_ty), mask=mask)
    g = tl.load(gates_ptr + route, mask=mask_m, other=0.0)
    rs = tl.load(rs_ptr + tok[:, None] * stride_rst + offs_r[None, :], mask=mask, other=0.0)
    tl.store(scaled_ptr + out, (acc * g[:, None] * rs * mult).to(scaled_ptr.dtype.element_ty),
             mask=mask)


def dense_config(T: int, N: int, fp32: bool = False) -> dict:
    """Tile of ``_shrink_dense_kernel`` for T tokens and N = E*R columns.

    fp32 takes a K-step of 16 (its FMA dot and gate-selection epilogue do not fit registers
    with 32). The 64x64 tile takes a K-step of 16 in 16-bit too and is 64x32 with 8 warps
    in fp32: under Triton 3.6 (the GPU machine's release) 64x64x32 in 16-bit and 64x64x16
    in fp32 spill on sm_80 (8 and 40 bytes of stack), these do not.
    """
    rows, cols = row_block(T), col_block(N)
    big = rows * cols >= 64 * 64
    if fp32 and big:
        cols = 32
    return dict(BLOCK_T=rows, BLOCK_N=cols, BLOCK_K=16 if fp32 or big else BLOCK_K,
                num_warps=8 if big else warps_for(rows, cols))


def grouped_config(num_routes: int, R: int, fp32: bool = False) -> dict:
    """Tile of ``_shrink_grouped_kernel`` for ``num_routes = T*k`` routes of rank R."""
    return dict(BLOCK_M=row_block(num_routes), BLOCK_R=col_block(R),
                BLOCK_K=16 if fp32 else BLOCK_K,
                num_warps=warps_for(row_block(num_routes), col_block(R)))


def shrink_dense(x, w, w_strides, ids, gates, rs, rs_stride, raw, dense, E, R, mult):
    """Dense shrink. x ``[T, K]`` (any strides); w reached by ``(stride_e, stride_r, stride_k)``;
    ids int32 / gates fp32 ``[T, k]`` contiguous; rs fp32 ``[T or 1, R]`` with row stride
    ``rs_stride``; writes raw ``[T*k, R]`` and dense ``[T, E*R]`` (both contiguous)."""
    x = int32_columns(x)
    T, K = x.shape
    cfg = dense_config(T, E * R, x.dtype == torch.float32)
    grid = (triton.cdiv(T, cfg["BLOCK_T"]), triton.cdiv(E * R, cfg["BLOCK_N"]))
    _shrink_dense_kernel[grid](
        x, w, ids, gates, rs, dense, raw, T, K, E, R, ids.shape[1],
        x.stride(0), x.stride(1), *w_strides, rs_stride, float(mult),
        **cfg, **LAUNCH_OPTIONS)


def shrink_grouped(x, w, w_strides, perm, k, gates, rs, rs_stride, raw, scaled, E, R, mult):
    """Grouped shrink over ``perm`` (``ExpertPermutation``); raw/scaled ``[T*k, R]``."""
    x = int32_columns(x)
    num_routes = perm.order.numel()
    cfg = grouped_config(num_routes, R, x.dtype == torch.float32)
    grid = (grouped_grid_blocks(num_routes, E, cfg["BLOCK_M"]), triton.cdiv(R, cfg["BLOCK_R"]))
    _shrink_grouped_kernel[grid](
        x, w, perm.order, perm.expert_offsets, gates, rs, raw, scaled, x.shape[1], E, R, k,
        x.stride(0), x.stride(1), *w_strides, rs_stride, float(mult),
        E_PAD=e_pad(E), **cfg, **LAUNCH_OPTIONS)


def launch_configs() -> dict[str, list[dict]]:
    """Every constexpr set the launchers above can pick (for the compile check);
    ``dtypes`` limits a config to the x dtypes that launch it."""
    rows, cols = (16, 64), (16, 64)
    return {
        "_shrink_dense_kernel": [dict(dense_config(t, n, fp32), dtypes=dts)
                                 for t in rows for n in cols
                                 for fp32, dts in SPLIT],
        "_shrink_grouped_kernel": [dict(grouped_config(m, r, fp32), E_PAD=e_pad(1), dtypes=dts)
                                   for m in rows for r in cols for fp32, dts in SPLIT],
    }

