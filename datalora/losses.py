"""DATALORA auxiliary losses: ``L = L_LM + lambda_prune*L_retention + alpha_balance*L_balance``."""

from __future__ import annotations

import torch

from datalora.ops.validation import INDEX_DTYPES, check_tensor
from datalora.routing import at_least_fp32


def _valid_mask(reference: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    if valid is None:
        return torch.ones(reference.shape, dtype=torch.bool, device=reference.device)
    if check_tensor("valid", valid).shape != reference.shape:
        raise ValueError(f"valid: expected shape {tuple(reference.shape)}, "
                         f"got {tuple(valid.shape)}")
    return valid.to(device=reference.device, dtype=torch.bool)


def retention_loss(keep_prob: torch.Tensor, target: float,
                   valid: torch.Tensor | None = None) -> torch.Tensor:
    """``(mean keep probability over valid tokens - target)^2`` (a 0-dim fp32 tensor, fp64 for
    fp64 inputs; 0 when no token is valid, as :func:`balance_loss`: nothing was kept or
    dropped).

    Args:
        keep_prob: ``[B, L]`` (or any shape) keep probabilities in [0, 1].
        target: the scheduled retention in (0, 1].
        valid: bool mask of ``keep_prob``'s shape (False: padding); None = all valid.
    """
    try:
        ok = 0.0 < float(target) <= 1.0
    except (TypeError, ValueError, RuntimeError):  # None, "abc", a multi-value tensor
        ok = False
    if not ok:
        raise ValueError(f"target: expected a retention in (0, 1], got {target!r}")
    mask = _valid_mask(check_tensor("keep_prob", keep_prob), valid)
    p = torch.where(mask, at_least_fp32(keep_prob), 0.0)  # not a multiply: NaN * 0 is NaN
    count = mask.sum()
    mean = p.sum() / count.clamp_min(1)
    return torch.where(count > 0, (mean - float(target)) ** 2, 0.0)  # no host sync


def balance_loss(router_probs: torch.Tensor, expert_ids: torch.Tensor,
                 valid: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-Transformer load balance ``E * sum_e f_e * P_e`` (1.0 when perfectly uniform).

    Args:
        router_probs: ``[T, E]`` router distribution per token (gradient flows here).
        expert_ids: ``[T, k]`` routed experts; ``f_e`` is the fraction of the ``T*k`` routes
            (of valid tokens) that go to expert ``e`` (no gradient).
        valid: ``[T]`` bool (False: padding, excluded from both ``f`` and ``P``; its
            probabilities and expert ids are ignored, NaN or out of range included).

    Returns:
        A 0-dim fp32 tensor (fp64 for fp64 probabilities); ``P_e`` is the mean router
        probability of expert ``e``.
    """
    if check_tensor("router_probs", router_probs).dim() != 2:
        raise ValueError(f"router_probs: expected shape [T, E], got {tuple(router_probs.shape)}")
    if check_tensor("expert_ids", expert_ids).dim() != 2 \
            or expert_ids.shape[0] != router_probs.shape[0]:
        raise ValueError(f"expert_ids: expected shape [T={router_probs.shape[0]}, k], "
                         f"got {tuple(expert_ids.shape)}")
    if expert_ids.dtype not in INDEX_DTYPES:
        raise ValueError(f"expert_ids: expected dtype int32 or int64, got {expert_ids.dtype}")
    num_experts = router_probs.shape[1]
    mask = _valid_mask(router_probs[:, 0], valid)
    w = mask.float()
    ids = torch.where(mask[:, None], expert_ids.long(), 0)  # padding: weight 0, any id
    if ids.numel():  # on the device: no host sync
        torch._assert_async(((ids >= 0) & (ids < num_experts)).all(),
                            f"expert_ids: expected values in [0, {num_experts})")
    counts = torch.zeros(num_experts, device=router_probs.device).scatter_add_(
        0, ids.reshape(-1), w[:, None].expand_as(ids).reshape(-1).contiguous())
    f = counts / (w.sum() * expert_ids.shape[1]).clamp_min(1)
    p = torch.where(mask[:, None], at_least_fp32(router_probs), 0.0).sum(0) / w.sum().clamp_min(1)
    return num_experts * (f.detach() * p).sum()


__all__ = ["balance_loss", "retention_loss"]
