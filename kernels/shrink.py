"""Shrink kernels: per-route ``raw[t, j, :] = W[e_tj] @ X[t]`` plus the routed-scaled form.

Two strategies over the same math (``W`` is ``[E, R, K]`` reached through strides, so
the forward uses ``A [E, r, d_in]`` and the backward ``B^T`` of ``B [E, d_out, r]``):

- dense: one cuBLAS GEMM ``hd = X [T, K] @ W_all^T [K, E*R]`` over every expert (the
  caller's ``torch.mm``: x read once, cuBLAS speed), then ``route_dense`` selects the
  routed slices into ``raw [T*k, R]`` and writes the dense ``[T, E*R]`` buffer ``mult *
  gsum[t, e] * rank_scale[t, i] * hd`` (``gsum`` = sum of the gates routed to e), which
  the dense expand (another GEMM) consumes. Measured on an H200 (bf16, T = 4096, d = 4096,
  E*R = 128): the Triton GEMM with this epilogue fused that this replaced took 98 us,
  cuBLAS takes 14 us for the product. The backward's ``dB = dy^T Zs`` needs that dense
  buffer again: ``dense_from_routes`` rebuilds it from the routed slices the forward kept
  (``raw``), with no second GEMM over x.
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
def _route_tile(T, E, R, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's ``BLOCK_T x BLOCK_N`` tile of a ``[T, E*R]`` dense buffer: int64 rows,
    columns, each column's expert and rank index, the row mask and the tile mask."""
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_t = offs_t < T
    mask_tn = mask_t[:, None] & (offs_n < E * R)[None, :]
    return offs_t.to(tl.int64), offs_n, offs_n // R, offs_n % R, mask_t, mask_tn


@triton.jit
def _route_match(ids_ptr, gates_ptr, route, mask_t, e_n, E):
    """``(match [BLOCK_T, BLOCK_N], gate [BLOCK_T])``: whether each column belongs to the
    expert of ``route`` (the flat route id of each row; ids clamped to ``[0, E)``)."""
    e_tj = tl.load(ids_ptr + route, mask=mask_t, other=0)
    e_tj = tl.minimum(tl.maximum(e_tj, 0), E - 1)
    g = tl.load(gates_ptr + route, mask=mask_t, other=0.0).to(tl.float32)
    return e_tj[:, None] == e_n[None, :], g


@triton.jit
def _store_scaled(dense_ptr, rs_ptr, rows, offs_n, i_n, mask_tn, h, gsum, stride_rst, mult,
                  E, R):
    """``dense = mult * gsum * rank_scale * h`` on the tile, 0 where no gate is routed
    (also where h is not finite: a NaN token's Zd then stays out of the other experts' dB,
    as in the torch backend)."""
    rs = tl.load(rs_ptr + rows[:, None] * stride_rst + i_n[None, :], mask=mask_tn, other=0.0)
    val = tl.where(gsum != 0.0, h * gsum * rs * mult, 0.0)
    tl.store(dense_ptr + rows[:, None] * (E * R) + offs_n[None, :],
             val.to(dense_ptr.dtype.element_ty), mask=mask_tn)


@triton.jit
def _route_dense_kernel(
    hd_ptr, ids_ptr, gates_ptr, rs_ptr, dense_ptr, raw_ptr,
    T, E, R, k, stride_ht, stride_rst,
    mult,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows, offs_n, e_n, i_n, mask_t, mask_tn = _route_tile(T, E, R, BLOCK_T, BLOCK_N)
    hd = tl.load(hd_ptr + rows[:, None] * stride_ht + offs_n[None, :], mask=mask_tn, other=0.0)
    # the routed slices of each token go to raw; gsum = the gates routed to each column
    gsum = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for j in range(0, k):
        route = rows * k + j
        match, g = _route_match(ids_ptr, gates_ptr, route, mask_t, e_n, E)
        gsum += tl.where(match, g[:, None], 0.0)
        tl.store(raw_ptr + route[:, None] * R + i_n[None, :], hd.to(raw_ptr.dtype.element_ty),
                 mask=mask_tn & match)
    _store_scaled(dense_ptr, rs_ptr, rows, offs_n, i_n, mask_tn, hd.to(tl.float32), gsum,
                  stride_rst, mult, E, R)


@triton.jit
def _dense_from_routes_kernel(
    raw_ptr, ids_ptr, gates_ptr, rs_ptr, dense_ptr,
    T, E, R, k, stride_rst,
    mult,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows, offs_n, e_n, i_n, mask_t, mask_tn = _route_tile(T, E, R, BLOCK_T, BLOCK_N)
    # each column's value comes from a route to its expert (a token routed twice to one
    # expert has the same slice in both); gsum = the gates routed to each column
    gsum = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    h = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for j in range(0, k):
        route = rows * k + j
        match, g = _route_match(ids_ptr, gates_ptr, route, mask_t, e_n, E)
        gsum += tl.where(match, g[:, None], 0.0)
        slice_j = tl.load(raw_ptr + route[:, None] * R + i_n[None, :], mask=mask_tn & match,
                          other=0.0)
        h = tl.where(match, slice_j.to(tl.float32), h)
    _store_scaled(dense_ptr, rs_ptr, rows, offs_n, i_n, mask_tn, h, gsum, stride_rst, mult,
                  E, R)


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
        # int64: an expert-minor B's row stride here is E*r (see expand.py)
        wt = tl.load(w_cols + offs_k.to(tl.int64)[:, None] * stride_wk,
                     mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        acc = tl.dot(xt, wt, acc, input_precision="ieee")
    mask = mask_m[:, None] & mask_r[None, :]
    out = route[:, None] * R + offs_r[None, :]
    tl.store(raw_ptr + out, acc.to(raw_ptr.dtype.element_ty), mask=mask)
    g = tl.load(gates_ptr + route, mask=mask_m, other=0.0)
    rs = tl.load(rs_ptr + tok[:, None] * stride_rst + offs_r[None, :], mask=mask, other=0.0)
    tl.store(scaled_ptr + out, (acc * g[:, None] * rs * mult).to(scaled_ptr.dtype.element_ty),
             mask=mask)


def route_config(N: int) -> dict:
    """Tile of ``_route_dense_kernel`` / ``_dense_from_routes_kernel`` for N = E*R columns:
    elementwise, so small (16 rows; a 64-row tile's int64 pointer tiles spill on sm_80 and
    sm_90)."""
    return dict(BLOCK_T=16, BLOCK_N=col_block(N), num_warps=4)


def grouped_config(num_routes: int, R: int, fp32: bool = False) -> dict:
    """Tile of ``_shrink_grouped_kernel`` for ``num_routes = T*k`` routes of rank R."""
    return dict(BLOCK_M=row_block(num_routes), BLOCK_R=col_block(R),
                BLOCK_K=16 if fp32 else BLOCK_K,
                num_warps=warps_for(row_block(num_routes), col_block(R)))


def _route_launch(T: int, N: int) -> tuple[dict, tuple[int, int]]:
    """``(config, grid)`` of a dense routing pass over a ``[T, N = E*R]`` buffer."""
    cfg = route_config(N)
    return cfg, (triton.cdiv(T, cfg["BLOCK_T"]), triton.cdiv(N, cfg["BLOCK_N"]))


def route_dense(hd, ids, gates, rs, rs_stride, raw, dense, E, R, mult):
    """Routes the dense per-expert products ``hd [T, E*R]`` (``hd[t, e*R + i] = (A[e] @
    x[t])[i]``, one cuBLAS GEMM over every expert; row stride any, columns contiguous):
    writes raw ``[T*k, R]`` (each route's slice of hd) and dense ``[T, E*R]`` = ``mult *
    gsum[t, e] * rs[t, i] * hd`` (both contiguous). ids int64 (clamped here) / gates
    ``[T, k]`` contiguous (fp32 or hd's dtype, summed in fp32); rs fp32 ``[T or 1, R]`` with
    row stride ``rs_stride``."""
    T = hd.shape[0]
    cfg, grid = _route_launch(T, E * R)
    _route_dense_kernel[grid](
        hd, ids, gates, rs, dense, raw, T, E, R, ids.shape[1], hd.stride(0), rs_stride,
        float(mult), **cfg, **LAUNCH_OPTIONS)


def dense_from_routes(raw, ids, gates, rs, rs_stride, dense, E, R, mult):
    """The dense buffer of :func:`route_dense` rebuilt from its routed slices: ``dense [T,
    E*R] = mult * gsum[t, e] * rs[t, i] * raw[route to e, i]``, 0 in unrouted columns
    (contiguous). ``raw [T*k, R]`` contiguous (what ``route_dense`` wrote); ids, gates,
    rs as there. Bit-identical to ``route_dense``'s dense output for the same hd."""
    T = dense.shape[0]
    cfg, grid = _route_launch(T, E * R)
    _dense_from_routes_kernel[grid](
        raw, ids, gates, rs, dense, T, E, R, ids.shape[1], rs_stride, float(mult), **cfg,
        **LAUNCH_OPTIONS)


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
        "_route_dense_kernel": [route_config(n) for n in cols],
        "_dense_from_routes_kernel": [route_config(n) for n in cols],
        "_shrink_grouped_kernel": [dict(grouped_config(m, r, fp32), E_PAD=e_pad(1), dtypes=dts)
                                   for m in rows for r in cols for fp32, dts in SPLIT],
    }

