"""Routing decisions shared by MoLoRA layers.

A :class:`Routing` carries one decision per token (``expert_ids``, ``gates``, optional
``rank_scale``). The saliency network computes it once per forward and every adapted
layer reuses it, including the expert-sorted permutation that grouped kernels need
(computed lazily, once, without a host sync).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class ExpertPermutation:
    """Routes sorted by expert.

    Attributes:
        order: ``[T*k]`` flat route indices (``t*k + j``) sorted by expert, stable.
        expert_offsets: ``[E+1]`` int64 start of each expert's segment in ``order``.
    """

    order: torch.Tensor
    expert_offsets: torch.Tensor


def sort_routes(expert_ids: torch.Tensor, num_experts: int) -> ExpertPermutation:
    """Groups the ``T*k`` routes of ``expert_ids [T, k]`` by expert (no host sync)."""
    flat = expert_ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device)
    counts.scatter_add_(0, flat.clamp(0, num_experts - 1), torch.ones_like(flat))
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    return ExpertPermutation(order=order, expert_offsets=offsets)


@dataclass
class Routing:
    """One routing decision per token.

    Attributes:
        expert_ids: ``[T, k]`` int64 routed experts.
        gates: ``[T, k]`` float gate of each route.
        rank_scale: ``[T, r]`` float in (0, 1] or None.
        router_probs: ``[T, E]`` full router distribution (for load-balance losses), or None.
    """

    expert_ids: torch.Tensor
    gates: torch.Tensor
    rank_scale: torch.Tensor | None = None
    router_probs: torch.Tensor | None = None
    _permutations: dict[int, ExpertPermutation] = field(default_factory=dict, repr=False)
    _values_checked: set[int] = field(default_factory=set, repr=False)

    @property
    def num_tokens(self) -> int:
        return self.expert_ids.shape[0]

    @property
    def top_k(self) -> int:
        return self.expert_ids.shape[1]

    def permutation(self, num_experts: int) -> ExpertPermutation:
        """Routes sorted by expert, computed on first use and shared by every layer."""
        if num_experts not in self._permutations:
            self._permutations[num_experts] = sort_routes(self.expert_ids, num_experts)
        return self._permutations[num_experts]

    def take_value_check(self, num_experts: int) -> bool:
        """True the first time a layer with ``num_experts`` experts uses this routing: that
        layer validates the ids and gates on the host (a sync), the others skip it."""
        if num_experts in self._values_checked:
            return False
        self._values_checked.add(num_experts)
        return True

    def expert_load(self, num_experts: int) -> torch.Tensor:
        """``[E]`` fraction of routes sent to each expert."""
        flat = self.expert_ids.reshape(-1).long()
        counts = torch.zeros(num_experts, device=flat.device).scatter_add_(
            0, flat, torch.ones_like(flat, dtype=torch.float))
        return counts / max(flat.numel(), 1)


def topk_routing(logits: torch.Tensor, k: int, renormalize: bool = True) -> Routing:
    """Softmax top-k routing: logits ``[T, E]`` -> :class:`Routing` with ``k`` routes per token.

    Gates are the top-k softmax probabilities, renormalised to sum to 1 when
    ``renormalize`` (Mixtral style); gradients reach the router through them.
    """
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"k: expected 1 <= k <= num_experts={logits.shape[-1]}, got {k}")
    probs = torch.softmax(logits.float(), dim=-1)
    gates, expert_ids = probs.topk(k, dim=-1)
    if renormalize:
        # k = 1: gates / gates.sum() is the constant 1 (no router gradient): keep the forward
        # value 1 exactly, backward d log p
        denom = gates.detach() if k == 1 else gates.sum(-1, keepdim=True)
        gates = gates / denom
    return Routing(expert_ids=expert_ids, gates=gates.to(logits.dtype), router_probs=probs)
