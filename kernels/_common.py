"""Helpers shared by the kernels: block -> expert mapping of grouped launches, tile picks.

Grouped kernels run over routes sorted by expert (``datalora.routing.sort_routes``):
``order [T*k]`` holds flat route ids ``t*k + j`` grouped by expert and
``offsets [E+1]`` the segment bounds. Every expert segment is cut into ``BLOCK_M``-row
blocks; the launch grid has the static upper bound ``cdiv(T*k, BLOCK_M) + E`` blocks
(no host sync to count them) and each program finds its expert on device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Largest number of experts the grouped block map handles with its default pad;
# more experts use the next power of two (still correct, not in the compile matrix).
E_PAD_DEFAULT = 64


def e_pad(num_experts: int) -> int:
    """Static length of the per-expert vectors in the block map (power of two >= E)."""
    return max(E_PAD_DEFAULT, triton.next_power_of_2(num_experts))


def grouped_grid_blocks(num_routes: int, num_experts: int, block_m: int) -> int:
    """Upper bound on the number of ``block_m``-row blocks over all expert segments."""
    return triton.cdiv(num_routes, block_m) + num_experts


def row_block(n: int) -> int:
    """Token/route tile height bucket: 16 for tiny batches (decode), else 64."""
    return 16 if n <= 16 else 64


LAUNCH_OPTIONS = {"enable_fp_fusion": False}
"""Compile options of every launch. No FMA contraction of separate multiplies and adds
(``tl.dot`` is unaffected): the kernels round as the torch reference does (the NF4
double-quant scale as ``nf4.dequantize``), the same under every Triton release (3.9 warns
when the option is unset, 3.10 changes its default)."""


def col_block(n: int) -> int:
    """Tile width bucket for a small dimension (E*r or r): 16 when it fits, else 64."""
    return 16 if n <= 16 else 64


def warps_for(rows: int, cols: int) -> int:
    """Warps of a ``rows x cols`` GEMM tile: 8 for 64x64 (keeps it in registers), else 4."""
    return 8 if rows * cols >= 64 * 64 else 4


def as_index(t: torch.Tensor, size: int) -> torch.Tensor:
    """Contiguous int32 copy of an index tensor, clamped to ``[0, size)`` first: a value
    of 2**31 or more would wrap in the cast and pick another row than the clamped one (as
    the torch backend and the grouped strategy clamp in int64)."""
    return t.clamp(0, size - 1).to(torch.int32).contiguous()


def int32_columns(m: torch.Tensor) -> torch.Tensor:
    """``m [..., cols]`` as is, or contiguous when its column offsets overflow int32: the
    kernels index columns with int32 ``offs * stride`` (only a transposed ``m`` with about
    150k rows or more at 14336 columns gets there; rows are indexed in int64)."""
    return m.contiguous() if (m.shape[-1] - 1) * m.stride(-1) >= 2**31 else m


def as_f32(t: torch.Tensor) -> torch.Tensor:
    """Contiguous fp32 view or copy of a small routing tensor (gates, rank scales)."""
    return t.to(torch.float32).contiguous()


@triton.jit
def block_expert(offsets_ptr, pid, E, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr):
    """Maps grouped block ``pid`` to ``(expert, first_row, segment_end)``.

    ``expert >= E`` means the block is past the last segment and must do nothing.
    """
    e_idx = tl.arange(0, E_PAD)
    in_range = e_idx < E
    lo = tl.load(offsets_ptr + e_idx, mask=in_range, other=0)
    hi = tl.load(offsets_ptr + e_idx + 1, mask=in_range, other=0)
    nblk = (hi - lo + BLOCK_M - 1) // BLOCK_M
    cum = tl.cumsum(nblk, 0)  # inclusive block count up to each expert
    expert = tl.sum((cum <= pid).to(tl.int32), 0)
    sel = e_idx == expert
    blk_start = tl.sum(tl.where(sel, cum - nblk, 0), 0)
    seg_lo = tl.sum(tl.where(sel, lo, 0), 0)
    seg_hi = tl.sum(tl.where(sel, hi, 0), 0)
    return expert, seg_lo + (pid - blk_start) * BLOCK_M, seg_hi
