"""TITOK step 3: keep the samples with the largest mean excess and the top tokens of
each."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from datalora.ops.validation import check_tensor
from datalora.pruning import keep_count
from datalora.titok._util import check_fraction


def _as_scores(name: str, scores: object) -> torch.Tensor:
    """``scores`` (a sequence of numbers or a 1-D tensor) as an fp64 ``[n]`` tensor; a
    TypeError / ValueError naming ``name`` otherwise."""
    if isinstance(scores, torch.Tensor):
        values = scores
    elif isinstance(scores, Sequence) and not isinstance(scores, (str, bytes)) and all(
            isinstance(v, numbers.Real) or (isinstance(v, torch.Tensor) and v.numel() == 1)
            for v in scores):
        values = torch.tensor([float(v) for v in scores])
    else:
        raise TypeError(f"{name}: expected a sequence of numbers or a 1-D tensor, got "
                        f"{type(scores).__name__}" + (f" holding {type(scores[0]).__name__}"
                                                      if isinstance(scores, Sequence)
                                                      and len(scores) else ""))
    if values.is_complex():
        raise TypeError(f"{name}: expected real scores, got dtype {values.dtype}")
    if values.dim() != 1:
        raise ValueError(f"{name}: expected shape [n] (one score per sample), got "
                         f"{tuple(values.shape)}")
    return values.to(torch.float64)


def select_samples(scores: Sequence[float] | torch.Tensor, keep_fraction: float) -> list[int]:
    """Indices of the ``ceil(keep_fraction * n)`` samples with the largest mean excess,
    best first (ties: lower index first; a NaN score ranks last, like ``-inf``)."""
    check_fraction("keep_fraction", keep_fraction)
    values = _as_scores("scores", scores)
    if values.numel() == 0:
        return []
    k = keep_count(values.numel(), keep_fraction)
    values = values.nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    order = sorted(range(values.numel()), key=lambda i: (-float(values[i]), i))
    return order[:k]


def select_tokens(excess: torch.Tensor, keep_fraction: float) -> torch.Tensor:
    """``[n]`` bool mask of the ``ceil(keep_fraction * n_valid)`` tokens with the largest
    excess (NaN scores -- tokens no source token covers -- are never selected)."""
    check_fraction("keep_fraction", keep_fraction)
    check_tensor("excess", excess)
    if excess.dim() != 1:
        raise ValueError(f"excess: expected shape [n], got {tuple(excess.shape)}")
    valid = ~torch.isnan(excess)
    mask = torch.zeros_like(valid)
    n = int(valid.sum())
    if n == 0:
        return mask
    k = keep_count(n, keep_fraction)
    scores = torch.where(valid, excess.double(), torch.tensor(-math.inf, dtype=torch.float64))
    # stable: among equal scores the earlier token wins
    order = sorted(range(excess.numel()), key=lambda i: (-float(scores[i]), i))
    mask[torch.tensor(order[:k])] = True
    return mask


