"""Backward-only kernels: per-expert weight gradients and the routing gradients.

- ``segment_outer``: ``out[e] = sum_{routes m of expert e} M[token(m)]^T (x) v[m]`` with
  ``v[m, i] = mult * gate[m] * rank_scale[token(m), i] * raw[m, i]``. One program owns
  one ``[BLOCK_P, BLOCK_R]`` tile of one expert and walks that expert's segment of the
  sorted routes in order: deterministic, no atomics. With ``M = x`` and ``raw = B^T dy``
  it is ``dA [E, r, d_in]``; with ``M = dy`` and ``raw = h`` it is ``dB [E, d_out, r]``
  (the output strides pick the layout).
- ``route_grads``: ``dgates[t, j] = mult * sum_i dz*h*rank_scale`` and
  ``drank_scale[t, i] = mult * sum_j dz*h*gate`` from the per-route ``dz = B^T dy`` and
  ``h = A x`` (``[T*k, R]`` each), one pass, fp32 accumulation.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import LAUNCH_OPTIONS, int32_columns

BLOCK_P = 64
BLOCK_M = 32
ROUTE_TILE = 1024  # elements of one [BLOCK_T, R_PAD] tile of the routing-gradient pass
NUM_WARPS = 4


@triton.jit
def _segment_outer_kernel(
    m_ptr, raw_ptr, order_ptr, offsets_ptr, gates_ptr, rs_ptr, out_ptr,
    P, R, k,
    stride_mt, stride_mp, stride_rst, stride_oe, stride_op, stride_or,
    mult,
    BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
):
    expert = tl.program_id(0)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_p = offs_p < P
    mask_r = offs_r < R
    lo = tl.load(offsets_ptr + expert)
    hi = tl.load(offsets_ptr + expert + 1)
    acc = tl.zeros((BLOCK_P, BLOCK_R), dtype=tl.float32)
    for m0 in range(lo, hi, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        mask_m = rows < hi
        route = tl.load(order_ptr + rows, mask=mask_m, other=0).to(tl.int64)
        tok = route // k
        mt = tl.load(m_ptr + tok[None, :] * stride_mt + offs_p[:, None] * stride_mp,
                     mask=mask_p[:, None] & mask_m[None, :], other=0.0)
        mask_mr = mask_m[:, None] & mask_r[None, :]
        raw = tl.load(raw_ptr + route[:, None] * R + offs_r[None, :], mask=mask_mr, other=0.0)
        g = tl.load(gates_ptr + route, mask=mask_m, other=0.0)
        rs = tl.load(rs_ptr + tok[:, None] * stride_rst + offs_r[None, :], mask=mask_mr,
                     other=0.0)
        v = raw.to(tl.float32) * g[:, None] * rs * mult
        acc = tl.dot(mt, v.to(mt.dtype), acc, input_precision="ieee")
    # int64: dB takes B's strides, E*r per row when B is expert-minor (see expand.py)
    out = (out_ptr + expert.to(tl.int64) * stride_oe + offs_p.to(tl.int64)[:, None] * stride_op
           + offs_r[None, :] * stride_or)
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_p[:, None] & mask_r[None, :])


@triton.jit
def _route_grads_kernel(
    dz_ptr, h_ptr, gates_ptr, rs_ptr, dg_ptr, drs_ptr,
    T, R, k, stride_rst, mult,
    BLOCK_T: tl.constexpr, R_PAD: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_r = tl.arange(0, R_PAD)
    mask_t = offs_t < T
    mask = mask_t[:, None] & (offs_r < R)[None, :]
    rows = offs_t.to(tl.int64)
    rs = tl.load(rs_ptr + rows[:, None] * stride_rst + offs_r[None, :], mask=mask, other=0.0)
    drs = tl.zeros((BLOCK_T, R_PAD), dtype=tl.float32)
    for j in range(0, k):
        route = rows * k + j
        idx = route[:, None] * R + offs_r[None, :]
        dz = tl.load(dz_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        h = tl.load(h_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        p = dz * h * mult
        g = tl.load(gates_ptr + route, mask=mask_t, other=0.0).to(tl.float32)
        tl.store(dg_ptr + route, tl.sum(p * rs, 1).to(dg_ptr.dtype.element_ty), mask=mask_t)
        drs += p * g[:, None]
    tl.store(drs_ptr + rows[:, None] * R + offs_r[None, :], drs, mask=mask)


def segment_config(R: int) -> dict:
    block_r = 16 if R <= 16 else 64
    return dict(BLOCK_P=BLOCK_P, BLOCK_R=block_r, BLOCK_M=BLOCK_M,
                num_warps=8 if block_r == 64 else NUM_WARPS)


def segment_outer(m, raw, perm, k, gates, rs, rs_stride, out, out_strides, R, mult):
    """``out[e, p, i]`` (strides ``(e, p, i)``) from M ``[T, P]`` and raw ``[T*k, R]``."""
    m = int32_columns(m)
    E = perm.expert_offsets.numel() - 1
    P = m.shape[1]
    cfg = segment_config(R)
    grid = (E, triton.cdiv(P, cfg["BLOCK_P"]), triton.cdiv(R, cfg["BLOCK_R"]))
    _segment_outer_kernel[grid](
        m, raw, perm.order, perm.expert_offsets, gates, rs, out, P, R, k,
        m.stride(0), m.stride(1), rs_stride, *out_strides, float(mult),
        **cfg, **LAUNCH_OPTIONS)


def route_config(R: int) -> dict:
    r_pad = max(16, triton.next_power_of_2(R))
    return dict(BLOCK_T=max(1, ROUTE_TILE // r_pad), R_PAD=r_pad, num_warps=NUM_WARPS)


def route_grads(dz, h, gates, rs, rs_stride, dg, drs, T, R, k, mult):
    """Fills dg ``[T, k]`` (fp32 or dz's dtype: summed in fp32, rounded once) and drs fp32
    ``[T, R]`` from dz, h ``[T*k, R]`` (contiguous); gates fp32 or in dz's dtype."""
    cfg = route_config(R)
    grid = (triton.cdiv(T, cfg["BLOCK_T"]),)
    _route_grads_kernel[grid](dz, h, gates, rs, dg, drs, T, R, k, rs_stride, float(mult),
                              **cfg, **LAUNCH_OPTIONS)


def launch_configs() -> dict[str, list[dict]]:
    """Every constexpr set the launchers above can pick for r <= 128 (compile check)."""
    return {
        "_segment_outer_kernel": [segment_config(r) for r in (16, 64)],
        "_route_grads_kernel": [route_config(r) for r in (16, 32, 64, 128)],
    }
