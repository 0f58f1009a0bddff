"""Token gather / scatter for pruned sequences (references: ``datalora.reference``).

- ``gather``: ``packed[b, i] = hidden[b, keep_idx[b, i]]``.
- ``scatter``: one pass over every row of ``hidden``: kept rows become
  ``hidden + weight * (packed - hidden)``, the others pass ``hidden`` through (the
  residual bypass), so each input row is read once and each output row written once.
  The slot of each position comes from an inverse map ``inv [B, L]`` (-1 = pruned).

Indices are clamped to their valid range; inputs may have any strides (a layout whose
column offsets overflow int32 is copied contiguous first).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import LAUNCH_OPTIONS, as_index, int32_columns

BLOCK_ROWS = 16
BLOCK_D = 128
NUM_WARPS = 4


@triton.jit
def _gather_kernel(
    hidden_ptr, keep_ptr, packed_ptr,
    n_rows, K, L, D,
    stride_hb, stride_hl, stride_hd,
    BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_r = rows < n_rows
    mask = mask_r[:, None] & (offs_d < D)[None, :]
    rows64 = rows.to(tl.int64)
    src = tl.load(keep_ptr + rows64, mask=mask_r, other=0)
    src = tl.minimum(tl.maximum(src, 0), L - 1).to(tl.int64)
    b = rows64 // K
    vals = tl.load(hidden_ptr + b[:, None] * stride_hb + src[:, None] * stride_hl
                   + offs_d[None, :] * stride_hd, mask=mask)
    tl.store(packed_ptr + rows64[:, None] * D + offs_d[None, :], vals, mask=mask)


@triton.jit
def _scatter_kernel(
    hidden_ptr, packed_ptr, inv_ptr, weight_ptr, out_ptr,
    n_rows, K, L, D,
    stride_hb, stride_hl, stride_hd, stride_pb, stride_pk, stride_pd, stride_wb, stride_wk,
    BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_r = rows < n_rows
    mask = mask_r[:, None] & (offs_d < D)[None, :]
    rows64 = rows.to(tl.int64)
    b = rows64 // L
    pos = rows64 % L
    slot = tl.load(inv_ptr + rows64, mask=mask_r, other=-1)
    kept = slot >= 0
    slot = tl.minimum(tl.maximum(slot, 0), K - 1).to(tl.int64)
    h = tl.load(hidden_ptr + b[:, None] * stride_hb + pos[:, None] * stride_hl
                + offs_d[None, :] * stride_hd, mask=mask, other=0.0).to(tl.float32)
    mask_kept = mask & kept[:, None]
    p = tl.load(packed_ptr + b[:, None] * stride_pb + slot[:, None] * stride_pk
                + offs_d[None, :] * stride_pd, mask=mask_kept, other=0.0).to(tl.float32)
    w = tl.load(weight_ptr + b * stride_wb + slot * stride_wk, mask=mask_r & kept, other=0.0)
    # hidden + w (packed - hidden) in torch.lerp's form, exact at w = 0 and w = 1
    w = w[:, None]
    diff = p - h
    out = tl.where(mask_kept, tl.where(w < 0.5, h + w * diff, p - diff * (1.0 - w)), h)
    tl.store(out_ptr + rows64[:, None] * D + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask)


def _grid(n_rows: int, D: int) -> tuple[int, int]:
    return (triton.cdiv(n_rows, BLOCK_ROWS), triton.cdiv(D, BLOCK_D))


def gather(hidden: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
    """hidden ``[B, L, D]``, keep_idx ``[B, K]`` -> packed ``[B, K, D]`` (contiguous)."""
    Bsz, L, D = hidden.shape
    K = keep_idx.shape[1]
    packed = hidden.new_empty(Bsz, K, D)
    if packed.numel() == 0:
        return packed
    keep = as_index(keep_idx, L)
    hidden = int32_columns(hidden)
    _gather_kernel[_grid(Bsz * K, D)](
        hidden, keep, packed, Bsz * K, K, L, D, *hidden.stride(),
        BLOCK_ROWS=BLOCK_ROWS, BLOCK_D=BLOCK_D, num_warps=NUM_WARPS, **LAUNCH_OPTIONS)
    return packed


def scatter(hidden, packed, keep_idx, weight=None):
    """Kept rows ``hidden + weight * (packed - hidden)``, others ``hidden``: ``[B, L, D]``."""
    Bsz, L, D = hidden.shape
    K = keep_idx.shape[1]
    out = torch.empty(Bsz, L, D, dtype=hidden.dtype, device=hidden.device)
    if out.numel() == 0:
        return out
    hidden, packed = int32_columns(hidden), int32_columns(packed)
    inv = torch.full((Bsz, L), -1, dtype=torch.int32, device=hidden.device)
    if K > 0:
        slots = torch.arange(K, dtype=torch.int32, device=hidden.device).expand(Bsz, K)
        inv.scatter_(1, keep_idx.long().clamp(0, L - 1), slots)
    if weight is None:
        w, w_strides = torch.ones(1, dtype=torch.float32, device=hidden.device), (0, 0)
    else:
        w = weight.to(torch.float32)
        w_strides = w.stride()
    p = packed if K > 0 else hidden  # any valid pointer; never read when nothing is kept
    _scatter_kernel[_grid(Bsz * L, D)](
        hidden, p, inv, w, out, Bsz * L, max(K, 1), L, D, *hidden.stride(), *p.stride(),
        *w_strides, BLOCK_ROWS=BLOCK_ROWS, BLOCK_D=BLOCK_D, num_warps=NUM_WARPS,
        **LAUNCH_OPTIONS)
    return out


def launch_configs() -> dict[str, list[dict]]:
    """The one constexpr set of each kernel (for the compile check)."""
    cfg = dict(BLOCK_ROWS=BLOCK_ROWS, BLOCK_D=BLOCK_D, num_warps=NUM_WARPS)
    return {"_gather_kernel": [cfg], "_scatter_kernel": [cfg]}
