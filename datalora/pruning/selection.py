"""Which tokens run through the pruned layers: per-sequence top-k of the saliency scores
(:func:`select_tokens`, training), the causal mask over a subset of positions
(:func:`packed_attention_mask`), the packed width under ``torch.compile``
(:func:`compiled_width_fraction`) and the calibrated keep threshold's value
(:func:`_keep_threshold`, eval and generation)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from datalora.checks import check_number
from datalora.ops.validation import check_tensor
from datalora.saliency import uniform_noise

COMPILED_WIDTH_STEPS = 4
"""Grid steps between the target retention and 1 that the packed width takes under
``torch.compile`` (:func:`compiled_width_fraction`)."""


def keep_count(num_tokens: torch.Tensor | int, retention: float) -> torch.Tensor | int:
    """``ceil(retention * n)`` without float round-up (0.3 * 10 keeps 3, not 4); a retention
    > 0 keeps at least 1 of ``n >= 1`` tokens (the round-up guard would keep none below
    1e-9 / n)."""
    low = 1 if retention > 0 else 0
    if isinstance(num_tokens, torch.Tensor):
        count = torch.ceil(num_tokens.double() * retention - 1e-9).clamp_min(low).long()
        return torch.minimum(count, num_tokens.long().clamp_min(0))
    return min(max(math.ceil(num_tokens * retention - 1e-9), low), max(num_tokens, 0))


def compiled_width_fraction(retention: float, target: float | None,
                            steps: int = COMPILED_WIDTH_STEPS) -> float:
    """The fraction of the sequence length the packed batch is wide under ``torch.compile``:
    ``retention`` rounded up to the grid ``target + (1 - target) * j / steps`` (j = 0 ..
    steps), or ``retention`` itself below ``target`` or without one.

    The packed width is a tensor shape, so dynamo specializes the float it comes from and
    recompiles for each new value: a curriculum annealing the retention every step would
    recompile every step (past ``torch._dynamo.config.recompile_limit`` the rest runs
    eagerly). Rounded to the grid, the width changes ``steps`` times; each row still keeps
    exactly ``ceil(retention * n)`` tokens (a tensor computation, no recompile), the extra
    slots are filler (masked, written back unchanged)."""
    check_number("retention", retention, low=0, low_inclusive=False, high=1)
    if target is None or retention <= target or target >= 1.0:
        return retention
    step = (1.0 - target) / steps
    j = math.ceil((retention - target) / step - 1e-9)
    return min(target + j * step, 1.0)


@dataclass
class TokenSelection:
    """Which tokens of each sequence run through the pruned layers.

    Attributes:
        keep_idx: ``[B, K]`` int64 positions, ascending per row, distinct.
        valid: ``[B, K]`` bool; False marks filler slots (padding or surplus tokens of
            shorter rows), which are masked out and written back unchanged.
        counts: ``[B]`` int64 kept real tokens per sequence.
    """

    keep_idx: torch.Tensor
    valid: torch.Tensor
    counts: torch.Tensor

    def keep_mask(self, seq_len: int) -> torch.Tensor:
        """``[B, L]`` bool: True at kept real tokens."""
        mask = torch.zeros(self.keep_idx.shape[0], seq_len, dtype=torch.bool,
                           device=self.keep_idx.device)
        return mask.scatter_(1, self.keep_idx, self.valid)


def select_tokens(scores: torch.Tensor, retention: float,
                  attention_mask: torch.Tensor | None = None, *, tau: float = 1.0,
                  noise: bool = False, keep_last: bool = True,
                  generator: torch.Generator | None = None,
                  width_fraction: float | None = None) -> TokenSelection:
    """Per-sequence top-k of token scores (ties: the earlier position first).

    Args:
        scores: ``[B, L]`` keep logits.
        retention: fraction in (0, 1]; sequence b keeps ``ceil(retention * n_b)`` of its
            ``n_b`` real tokens; the packed width is ``K = ceil(retention * L)`` (no host
            sync).
        attention_mask: ``[B, L]`` 1 = real token, 0 = padding (never kept); None = all real.
        tau: Gumbel-top-k temperature: noisy keys are ``scores / tau + Gumbel``.
        noise: add the Gumbel noise (sampling without replacement, training).
        keep_last: always keep each sequence's last real token.
        generator: RNG for the noise.
        width_fraction: in ``[retention, 1]``: the packed width is ``ceil(width_fraction *
            L)`` instead, the slots past each row's count filler
            (:func:`compiled_width_fraction`); None: ``retention``.

    Returns:
        :class:`TokenSelection`.
    """
    if check_tensor("scores", scores).dim() != 2:
        raise ValueError(f"scores: expected shape [B, L], got {tuple(scores.shape)}")
    if not 0.0 < float(retention) <= 1.0:
        raise ValueError(f"retention: expected a value in (0, 1], got {retention!r}")
    if width_fraction is None:
        width_fraction = retention
    elif not float(retention) <= float(width_fraction) + 1e-9 <= 1.0 + 1e-9:
        # the slack: a grid point computed as target + j * step may round a hair below the
        # retention it equals (0.65 -> 0.6499999999999999); keep_count's slack is the same
        raise ValueError(f"width_fraction: expected a value in [retention, 1] = "
                         f"[{retention!r}, 1], got {width_fraction!r}")
    bsz, seq_len = scores.shape
    if attention_mask is None:
        real = torch.ones_like(scores, dtype=torch.bool)
    else:
        if check_tensor("attention_mask", attention_mask).shape != scores.shape:
            raise ValueError(f"attention_mask: expected shape {tuple(scores.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        real = attention_mask.to(device=scores.device).bool()
    key = scores.detach().float() / float(tau)
    if noise:
        u = uniform_noise(key.shape, key.device, generator=generator)
        key = key - torch.log(-torch.log(u.clamp(1e-10, 1 - 1e-7)))
    if keep_last:
        pos = torch.arange(seq_len, device=scores.device).expand(bsz, -1)
        last = torch.where(real, pos, -1).amax(1, keepdim=True)
        key = torch.where(pos == last, torch.inf, key)
    key = torch.where(real, key, -torch.inf)
    width = max(keep_count(seq_len, float(width_fraction)), 1)
    counts = keep_count(real.sum(1), float(retention))
    # best first; a stable sort, not topk: among tied keys the earlier position wins, so a
    # wider packed batch keeps the same tokens (topk may pick any of the tied)
    order = key.sort(dim=1, descending=True, stable=True).indices[:, :width]
    slot_valid = torch.arange(width, device=scores.device)[None] < counts[:, None]
    keep_idx, perm = order.sort(dim=1)
    return TokenSelection(keep_idx=keep_idx, valid=slot_valid.gather(1, perm), counts=counts)


def packed_attention_mask(key_ok: torch.Tensor, query_index: torch.Tensor,
                          key_index: torch.Tensor, dtype: torch.dtype, *,
                          as_bool: bool, sliding_window: int | None = None) -> torch.Tensor:
    """Causal attention mask over an arbitrary subset of positions.

    Query ``i`` may attend key ``j`` when ``key_ok[b, j]`` and ``key_index[b, j] <=
    query_index[b, i]`` (and within ``sliding_window`` of it); a query always sees its own
    position, so no row is empty (rows of filler slots stay finite).

    Args:
        key_ok: ``[B, S]`` bool. query_index: ``[B, Q]``, key_index: ``[B, S]`` int64
            indices in the original (cache) order.
        dtype: dtype of an additive mask. as_bool: return a bool mask (True = attend).

    Returns:
        ``[B, 1, Q, S]``: bool, or additive (0 / dtype min).
    """
    qi, kj = query_index[:, :, None], key_index[:, None, :]
    allowed = key_ok[:, None, :] & (kj <= qi)
    if sliding_window is not None:
        allowed = allowed & (kj > qi - sliding_window)
    allowed = (allowed | (kj == qi))[:, None]
    if as_bool:
        return allowed
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def _keep_threshold(flat: torch.Tensor, retention: float) -> float:
    """The threshold keeping ``retention`` of the scores ``flat [N]`` (those strictly above
    it): halfway between the two scores that bracket their ``1 - retention`` quantile (the
    ranks of ``torch.quantile``'s linear interpolation), so it keeps as many of them as the
    quantile does but no calibration score sits on it. (The quantile often *is* a score:
    a token scored exactly at the threshold was kept on one path and pruned on the other,
    whose scores differ by ~1e-7, when generating from the calibration prompts.) Any N
    (``torch.quantile`` refuses more than 2**24 elements).

    When both bracketing scores are one tied value (an untrained score head scores every
    token alike), the threshold goes halfway to the nearest other score below or above the
    tie (below the smallest score: 1 below it), whichever keeps a count nearer the target
    (ties: below, keeping more)."""
    rank = (1.0 - retention) * (flat.numel() - 1)
    lower = math.floor(rank)
    upper = min(lower + 1, flat.numel() - 1)
    low = float(torch.kthvalue(flat, lower + 1).values)  # 1-based
    high = float(torch.kthvalue(flat, upper + 1).values)
    if low != high:
        return _between32(low, high)
    target = retention * flat.numel()
    under, over = flat[flat < low], flat[flat > low]
    keep_tie, drop_tie = flat.numel() - under.numel(), over.numel()
    if over.numel() and abs(drop_tie - target) < abs(keep_tie - target):
        return _between32(low, float(over.min()))
    if under.numel():
        return _between32(float(under.max()), low)
    below = _fp32(low - 1.0)
    return below if below < low else float(torch.nextafter(
        torch.tensor(low), torch.tensor(-math.inf)))


def _fp32(value: float) -> float:
    return float(torch.tensor(value, dtype=torch.float32))


def _between32(a: float, b: float) -> float:
    """The fp32 threshold (the buffer's dtype) halfway between scores ``a < b``, so that
    ``score > threshold`` keeps b and drops a: the midpoint rounded to fp32, or ``a``
    itself when that rounding reaches ``b`` (no fp32 value lies between them)."""
    mid = _fp32(a + (b - a) / 2)
    return mid if mid < b else a
