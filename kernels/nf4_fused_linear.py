"""Fused NF4 MoLoRA linear: ``Y = X @ dequant(W)^T + bias + Zd @ B_all^T`` in one GEMM kernel.

The large-T NF4 path (README, "NF4 4-bit base weights"). ``kernels/fused_linear.py`` with the base
weight read as 4-bit NF4 in the bitsandbytes layout (``datalora.nf4``): every
``[BLOCK_K, BLOCK_N]`` tile of ``W^T`` is loaded as packed bytes (value ``i`` of the
row-major flat weight in the high nibble of byte ``i // 2`` when ``i`` is even, the low
nibble when odd), decoded in registers through the 16-level code table and multiplied by
its block's absmax (double quant: ``nested_code[q] * nested_absmax[block // 256] +
offset``), then fed to ``tl.dot``. So W is never written out in 16 bits, unlike
``nf4.dequantize`` + cuBLAS. The LoRA expand is ``E*R`` extra K-iterations over the dense
shrink's ``Zd [T, E*R]`` (``shrink.shrink_dense``, already ``scaling * gate-sum *
rank_scale * A[e] x``) exactly as in ``fused_linear``; bias is added in the epilogue and Y
is written once, in X's dtype.

Absmax blocks run over the flat weight, so with ``d_in`` not a multiple of the blocksize a
block spans two rows and a row starts mid-block. Every tile column covers ``BLOCK_K <=
32 <= blocksize`` consecutive flat values, hence touches at most two blocks: the kernel
decodes those two scales per column and K-step (not per element) and picks one per value.
Any blocksize of ``datalora.nf4.BLOCKSIZES``, any ``d_in`` and odd sizes work.

Values are ``code * absmax`` in fp32 rounded to X's dtype, as ``nf4.dequantize(W,
x.dtype)`` produces them (bit for bit: launched without FMA contraction,
``_common.LAUNCH_OPTIONS``, the double-quant scale rounds its multiply and add apart).
On an H200 it is slower than dequantize + cuBLAS (``benchmarks.bench_nf4``, method
``triton_nf4_fused``: 1.17 / 2.31 ms vs 0.46 / 0.51 ms at T = 2048 / 4096, 4096 x 4096;
``benchmarks/results/gpu_h200/nf4_gpu.json``), so ``datalora.nf4_linear`` runs it only
with ``DATALORA_NF4_FUSED=1``. Tiles come from buckets of T (:func:`config`), programs
are grouped by ``GROUP_M`` row tiles as in ``fused_linear``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import LAUNCH_OPTIONS
from .fused_linear import bucket_config, grouped_tile, lora_expand, store_tile

# (max T of the bucket, BLOCK_M, BLOCK_N, BLOCK_K, num_stages, num_warps), 16-bit inputs.
# BLOCK_K <= 32, the smallest NF4 blocksize. The per-value byte and code-table gathers hold
# 64-bit addresses in registers, so every tile takes 8 warps and fp32 a K-step of 16:
# with 4 warps 16x64x32 spills (and 64x64x32 on sm_80 with double quant), and under
# Triton 3.6 (the GPU machine's release, which allocates more registers here than 3.9)
# so do 16x64 with 4 warps in every dtype and 128x128x32 at any stage count; 128x64x32
# with 3 stages does not (benchmarks/results/resource_usage.md is the 3.9 build).
TILES_16BIT = (
    (16, 16, 64, 32, 4, 8),
    (128, 64, 64, 32, 4, 8),
    (None, 128, 64, 32, 3, 8),
)
TILES_FP32 = (
    (16, 16, 64, 16, 3, 8),
    (None, 64, 64, 16, 2, 8),  # 3 stages spill 8 bytes on sm_90 in the aligned build
)


@triton.jit
def _block_scale(blk, valid, absmax_ptr, qabsmax_ptr, nested_absmax_ptr, nested_code_ptr,
                 offset, DOUBLE_QUANT: tl.constexpr):
    """fp32 absmax of blocks ``blk`` (0 where not ``valid``)."""
    if DOUBLE_QUANT:
        q = tl.load(qabsmax_ptr + blk, mask=valid, other=0).to(tl.int32)
        # one nested absmax per 256 codes (datalora.nf4.NESTED_BLOCKSIZE)
        nested = tl.load(nested_absmax_ptr + blk // 256, mask=valid, other=0.0)
        scale = tl.where(valid, tl.load(nested_code_ptr + q) * nested + offset, 0.0)
    else:
        scale = tl.load(absmax_ptr + blk, mask=valid, other=0.0)
    return scale


@triton.jit
def _nf4_fused_linear_kernel(
    x_ptr, data_ptr, absmax_ptr, qabsmax_ptr, nested_absmax_ptr, nested_code_ptr, offset_ptr,
    code_ptr, z_ptr, b_ptr, bias_ptr, y_ptr,
    M, N, K, E, R, BS, NBLOCKS,
    stride_xm, stride_xk, stride_be, stride_bo, stride_br, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    rows, cols, mask_m, mask_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offset = 0.0
    if DOUBLE_QUANT:
        offset = tl.load(offset_ptr)

    # base GEMM: X [M, K] @ dequant(W)^T; column n of the W^T tile at k0 starts at flat
    # value n*K + k0, inside block n*K + k0 // BS at position `lo`
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    flat = cols * K
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        xt = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        blk = flat // BS
        lo = (flat - blk * BS).to(tl.int32)
        s_lo = _block_scale(blk, mask_n, absmax_ptr, qabsmax_ptr, nested_absmax_ptr,
                            nested_code_ptr, offset, DOUBLE_QUANT)
        s_hi = _block_scale(blk + 1, mask_n & (blk + 1 < NBLOCKS), absmax_ptr, qabsmax_ptr,
                            nested_absmax_ptr, nested_code_ptr, offset, DOUBLE_QUANT)
        # value flat + k sits in byte flat // 2 + (flat % 2 + k) // 2, high nibble if even
        rel = (flat % 2).to(tl.int32)[None, :] + offs_k[:, None]
        packed = tl.load(data_ptr + (flat // 2)[None, :] + rel // 2,
                         mask=mask_k[:, None] & mask_n[None, :], other=0).to(tl.int32)
        nibble = (packed >> (4 - 4 * (rel % 2))) & 0xF
        scale = tl.where(lo[None, :] + offs_k[:, None] >= BS, s_hi[None, :], s_lo[None, :])
        wt = tl.load(code_ptr + nibble) * scale
        acc = tl.dot(xt, wt.to(x_ptr.dtype.element_ty), acc, input_precision="ieee")
        x_ptrs += BLOCK_K * stride_xk
        flat += BLOCK_K

    acc = lora_expand(acc, z_ptr, b_ptr, rows, cols, mask_m, mask_n, E, R, stride_be,
                      stride_bo, stride_br, BLOCK_K)
    store_tile(acc, bias_ptr, y_ptr, rows, cols, mask_m, mask_n, stride_ym, stride_yn,
               HAS_BIAS)


def config(T: int, fp32: bool = False) -> dict:
    """Tile, stages and warps for T tokens from :data:`TILES_16BIT` / :data:`TILES_FP32`."""
    return bucket_config(T, TILES_FP32 if fp32 else TILES_16BIT)


def nf4_fused_linear(x, t, code, bias, z, b, E, R, y, cfg=None):
    """``y = x @ dequant(t)^T + bias + z @ B_all^T`` with ``B_all[o, e*R + i] = b[e, o, i]``.

    x ``[T, K]`` (any strides); t a ``datalora.nf4.NF4Tensor`` of shape ``[N, K]`` with
    contiguous fields on x's device; code ``[16]`` fp32 NF4 levels (``nf4.NF4_CODE``) on
    x's device; bias ``[N]`` or None; z ``[T, E*R]`` contiguous; b ``[E, N, R]`` (any
    strides); y ``[T, N]`` (written, any strides). ``cfg`` overrides :func:`config` (tests
    use it for the program grouping); its ``BLOCK_K`` may not exceed ``t.blocksize``.
    """
    T, K = x.shape
    N = t.shape[0]
    if T == 0 or N == 0:
        return
    cfg = cfg or config(T, x.dtype == torch.float32)
    if cfg["BLOCK_K"] > t.blocksize:
        raise ValueError(f"cfg: expected BLOCK_K <= blocksize {t.blocksize}, got "
                         f"{cfg['BLOCK_K']}")
    dq = t.double_quant
    # unused pointers get stand-ins of the same element type (one compiled signature)
    absmax, qabsmax = (code, t.absmax) if dq else (t.absmax, t.data)
    nested_absmax, nested_code, offset = (t.nested_absmax, t.nested_code, t.offset) if dq \
        else (code, code, code)
    grid = (triton.cdiv(T, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"]),)
    has_bias = bias is not None
    if has_bias and bias.stride(0) != 1:
        bias = bias.contiguous()  # the epilogue reads bias[cols] at unit stride
    _nf4_fused_linear_kernel[grid](
        x, t.data, absmax, qabsmax, nested_absmax, nested_code, offset, code, z, b,
        bias if has_bias else y, y, T, N, K, E, R, t.blocksize, t.absmax.numel(),
        x.stride(0), x.stride(1), *b.stride(), y.stride(0), y.stride(1),
        HAS_BIAS=has_bias, DOUBLE_QUANT=dq, **cfg, **LAUNCH_OPTIONS)


def launch_configs() -> dict[str, list[dict]]:
    """Every constexpr set :func:`nf4_fused_linear` can pick (for the compile check)."""
    picks = [(dict(config(t[0] or 4096, False)), ("fp16", "bf16")) for t in TILES_16BIT]
    picks += [(dict(config(t[0] or 4096, True)), ("fp32",)) for t in TILES_FP32]
    return {"_nf4_fused_linear_kernel": [dict(cfg, HAS_BIAS=hb, DOUBLE_QUANT=dq, dtypes=dts)
                                         for cfg, dts in picks for hb in (False, True)
                                         for dq in (False, True)]}
