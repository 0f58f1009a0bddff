"""Fused MoLoRA linear: ``Y = X @ W^T + bias + Zd @ B_all^T`` in one GEMM kernel.

The base GEMM runs over ``K = d_in``; the LoRA expand is ``K2 = E*R`` extra
K-iterations into the same fp32 accumulator, reading the dense shrink's buffer
``Zd [T, E*R]`` (already ``scaling * gate-sum * rank_scale * A[e] x``, see
``shrink.shrink_dense``) and ``B_all[o, e*R + i] = B[e, o, i]`` straight from
``B [E, d_out, R]`` through its strides (no copy). Bias is added in the epilogue and Y
is written once, in X's dtype. Compared with cuBLAS + the in-place expand this saves
one read and one write of Y (``benchmarks/results/roofline.md``: floor 1.016x instead
of 1.22x the base GEMM at T = 4096 on H100); whether it beats cuBLAS's base GEMM in
practice is measured by ``benchmarks.molora`` (method ``molora_linear[triton-fused]``),
so the path is opt-in (``DATALORA_FUSED_LINEAR=1``, ``datalora.ops.triton_backend``).

Programs are ordered in groups of ``GROUP_M`` row tiles (the Triton matmul tutorial's
swizzle) so neighbouring programs share W and X tiles in L2. Tiles come from shape
buckets of T (:func:`config`), never the exact T. fp32 runs ``input_precision="ieee"``
(exact enough for the tests; ``"tf32"`` would be the fast option on Ampere/Hopper).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import LAUNCH_OPTIONS

GROUP_M = 8
# (max T of the bucket, BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps), 16-bit inputs.
# Sized for the worst build: Triton specialises pointers/strides on 16-byte alignment, and
# without it (odd d_in such as 37, unaligned views) every load is a per-element gather
# through registers, unpipelined: 64x128x32 / 128x64x32 (4 warps) and any BLOCK_K = 64
# beyond 16 rows hit the 255-register cap and spill there, these do not
# (benchmarks/results/resource_usage.md). Aligned builds pipeline with cp.async; their
# A + B tiles x stages: 16x64x64 x4: 40 KB, 64x64x32 x4: 32 KB, 128x128x32 x4: 64 KB --
# within A100's 164 KB and H100's 228 KB per block.
TILES_16BIT = (
    (16, 16, 64, 64, 4, 4),      # decode: bound by reading W, many column tiles
    (128, 64, 64, 32, 4, 4),     # small batches
    (None, 128, 128, 32, 4, 8),  # prefill / training
)
# fp32 (ieee FMA dot): short K-steps keep operands and accumulator in registers; 64x64
# with 3 stages spills on sm_80 under Triton 3.6 (the GPU machine's release), 2 do not.
TILES_FP32 = (
    (16, 16, 64, 32, 3, 4),
    (None, 64, 64, 16, 2, 4),
)


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """``(rows, cols, mask_m, mask_n)`` of this program's output tile: int64 row / column
    indices and their bounds masks. GROUP_M row tiles sweep the column tiles together
    (neighbouring programs share W and X tiles in L2)."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return offs_m.to(tl.int64), offs_n.to(tl.int64), offs_m < M, offs_n < N


@triton.jit
def lora_expand(acc, z_ptr, b_ptr, rows, cols, mask_m, mask_n, E, R,
                stride_be, stride_bo, stride_br, BLOCK_K: tl.constexpr):
    """``acc [BLOCK_M, BLOCK_N] += Zd[rows] @ B_all[cols]^T``: K2 = E*R more K-iterations
    over the contiguous ``Zd [M, E*R]`` and ``B_all[o, e*R + i] = B[e, o, i]`` read through
    B's strides."""
    offs_k = tl.arange(0, BLOCK_K)
    K2 = E * R
    z_ptrs = z_ptr + rows[:, None] * K2 + offs_k[None, :]
    b_cols = b_ptr + cols[None, :] * stride_bo
    for k0 in range(0, K2, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < K2
        zt = tl.load(z_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        e_k = (kk // R).to(tl.int64)
        i_k = kk % R
        bt = tl.load(b_cols + e_k[:, None] * stride_be + i_k[:, None] * stride_br,
                     mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(zt, bt, acc, input_precision="ieee")
        z_ptrs += BLOCK_K
    return acc


@triton.jit
def store_tile(acc, bias_ptr, y_ptr, rows, cols, mask_m, mask_n, stride_ym, stride_yn,
               HAS_BIAS: tl.constexpr):
    """Adds the bias (if any) to the fp32 tile and writes it to ``y`` in y's dtype."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _fused_linear_kernel(
    x_ptr, w_ptr, z_ptr, b_ptr, bias_ptr, y_ptr,
    M, N, K, E, R,
    stride_xm, stride_xk, stride_wn, stride_wk,
    stride_be, stride_bo, stride_br, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    rows, cols, mask_m, mask_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    # base GEMM: X [M, K] @ W^T, W [N, K] read as [BLOCK_K, BLOCK_N] tiles
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + cols[None, :] * stride_wn + offs_k[:, None] * stride_wk
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        xt = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        wt = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(xt, wt, acc, input_precision="ieee")
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    acc = lora_expand(acc, z_ptr, b_ptr, rows, cols, mask_m, mask_n, E, R, stride_be,
                      stride_bo, stride_br, BLOCK_K)
    store_tile(acc, bias_ptr, y_ptr, rows, cols, mask_m, mask_n, stride_ym, stride_yn,
               HAS_BIAS)


def bucket_config(T: int, tiles) -> dict:
    """Launch config of the first ``(max T, BLOCK_M, BLOCK_N, BLOCK_K, num_stages,
    num_warps)`` row of ``tiles`` whose bound holds (buckets of T, not the exact T; the last
    row's bound is None)."""
    for bound, bm, bn, bk, stages, warps in tiles:
        if bound is None or T <= bound:
            return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=GROUP_M,
                        num_stages=stages, num_warps=warps)
    raise AssertionError("the last bucket has no bound")


def config(T: int, fp32: bool = False) -> dict:
    """Tile, stages and warps for T tokens from :data:`TILES_16BIT` / :data:`TILES_FP32`."""
    return bucket_config(T, TILES_FP32 if fp32 else TILES_16BIT)


def fused_linear(x, w, bias, z, b, E, R, y, cfg=None):
    """``y = x @ w^T + bias + z @ B_all^T`` with ``B_all[o, e*R + i] = b[e, o, i]``.

    x ``[T, K]`` and w ``[N, K]`` (any strides), bias ``[N]`` or None, z ``[T, E*R]``
    contiguous, b ``[E, N, R]`` (any strides), y ``[T, N]`` (written, any strides).
    ``cfg`` overrides :func:`config` (tests use it to exercise the program grouping).
    """
    T, K = x.shape
    N = w.shape[0]
    if T == 0 or N == 0:
        return
    cfg = cfg or config(T, x.dtype == torch.float32)
    grid = (triton.cdiv(T, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    has_bias = bias is not None
    if has_bias and bias.stride(0) != 1:
        bias = bias.contiguous()  # the epilogue reads bias[cols] at unit stride
    _fused_linear_kernel[grid](
        x, w, z, b, bias if has_bias else y, y, T, N, K, E, R,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), *b.stride(),
        y.stride(0), y.stride(1), HAS_BIAS=has_bias, **cfg, **LAUNCH_OPTIONS)


def launch_configs() -> dict[str, list[dict]]:
    """Every constexpr set :func:`fused_linear` can pick (for the compile check)."""
    picks = [(dict(config(t[0] or 4096, False)), ("fp16", "bf16")) for t in TILES_16BIT]
    picks += [(dict(config(t[0] or 4096, True)), ("fp32",)) for t in TILES_FP32]
    return {"_fused_linear_kernel": [dict(cfg, HAS_BIAS=hb, dtypes=dts)
                                     for cfg, dts in picks for hb in (False, True)]}
