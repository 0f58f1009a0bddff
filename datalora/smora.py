"""SMoRA-style rank-wise experts: every rank of a LoRA is an expert (E = total rank, r = 1).

A LoRA of rank R is ``dW = (alpha / R) * sum_i b_i a_i^T``: a sum of R rank-1 terms. SMoRA
("each rank could be an expert") routes each token to ``k`` of those R terms. That is a
:class:`~datalora.layers.MoLoRALinear` with ``num_experts = R``, ``rank = 1`` and the LoRA's
scaling ``alpha / R``; with all R ranks active and gate 1 it *is* the rank-R LoRA.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from datalora.checks import check_int
from datalora.layers import MoLoRALinear, check_alpha
from datalora.nf4_linear import NF4Linear
from datalora.routing import Routing, check_topk, softmax_topk

__all__ = ["GATES", "SMoRALinear", "smora_linear"]

GATES: tuple[str, ...] = ("one", "softmax")
_FIXED_KWARGS = frozenset({"num_experts", "rank", "top_k", "router"})  # MoLoRALinear's, set here
_PASSED_KWARGS = frozenset({"dropout", "backend", "dtype", "quantize"})  # passed to MoLoRALinear


class SMoRALinear(MoLoRALinear):
    """Rank-wise mixture: ``y = W x + (alpha / R) * sum_{i in topk(x)} g_i b_i (a_i . x)``.

    Args:
        base_layer: the frozen ``nn.Linear``.
        total_rank: R, the number of rank-1 experts.
        active_ranks: k, ranks used per token (router top-k).
        alpha: LoRA alpha of the equivalent rank-R LoRA (scaling ``alpha / R``).
        gate: ``"one"``: selected ranks get gate exactly 1 (straight-through: the router
            still gets the softmax gradient), so all-active equals the LoRA, forward and
            backward (no router gradient then: the output does not depend on it);
            ``"softmax"``: renormalised top-k softmax gates (Mixtral style).
        kwargs: ``dropout``, ``backend``, ``dtype``, ``quantize`` as for :class:`MoLoRALinear`
            (``num_experts``, ``rank``, ``top_k`` and ``router`` are set from ``total_rank``
            and ``active_ranks``, so they are rejected).

    Attributes: ``lora_alpha`` is the ``alpha`` given (the rank-R LoRA's); ``total_rank``
    / ``active_ranks`` are R / k. The inherited MoLoRALinear view is per rank-1 expert:
    ``rank`` 1, ``alpha`` ``alpha / R``, so ``scaling`` (``alpha / R``) is the same in both.
    """

    def __init__(self, base_layer: nn.Linear | NF4Linear, total_rank: int = 16,
                 active_ranks: int = 8, alpha: float = 32.0, gate: str = "one", **kwargs):
        fixed = sorted(_FIXED_KWARGS & kwargs.keys())
        if fixed:
            raise TypeError(f"SMoRALinear: unexpected keyword argument {fixed[0]}= (set by the "
                            "rank-wise layer: use total_rank= and active_ranks=)")
        unknown = sorted(kwargs.keys() - _PASSED_KWARGS)
        if unknown:
            raise TypeError(f"SMoRALinear: unexpected keyword argument {unknown[0]}= (accepted: "
                            f"total_rank, active_ranks, alpha, gate, "
                            f"{', '.join(sorted(_PASSED_KWARGS))})")
        total_rank = check_int("total_rank", total_rank, low=1)
        active_ranks = check_int("active_ranks", active_ranks, low=1, high=total_rank)
        if gate not in GATES:
            raise ValueError(f"gate: expected one of {GATES}, got {gate!r}")
        check_alpha(alpha)
        super().__init__(base_layer, num_experts=total_rank, rank=1,
                         alpha=float(alpha) / total_rank, top_k=active_ranks, router=True,
                         **kwargs)
        self.total_rank, self.gate = total_rank, gate
        self.lora_alpha = float(alpha)

    @property
    def active_ranks(self) -> int:
        """k, the ranks each token uses: the inherited ``top_k`` (setting either sets both)."""
        return self.top_k

    @active_ranks.setter
    def active_ranks(self, value: int) -> None:
        self.top_k = check_int("active_ranks", value, low=1, high=self.total_rank)

    def _route(self, x: torch.Tensor, trusted: bool) -> Routing:
        """Top-k ranks of ``x [..., d_in]`` (tokens flattened) with the configured gates
        (:meth:`route` hands it out untrusted; the forward's own is trusted). Logits in x's
        dtype as :class:`MoLoRALinear`'s."""
        if self.gate not in GATES:  # an attribute set after construction
            raise ValueError(f"gate: expected one of {GATES}, got {self.gate!r}")
        if self.gate == "softmax":  # renormalised top-k (k = 1 keeps a router gradient)
            return super()._route(x, trusted)
        logits = self._router_logits(x)
        check_topk(self.top_k, self.total_rank, "active_ranks")
        probs, top, ids = softmax_topk(logits, self.top_k)
        if self.top_k == self.total_rank:  # the output does not depend on the router
            gates = torch.ones_like(top)
        else:
            gates = 1.0 + (top - top.detach())  # value 1, gradient of the softmax
        return Routing(expert_ids=ids, gates=gates.to(logits.dtype), router_probs=probs,
                       _trusted=trusted)

    def lora_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The equivalent rank-R LoRA: ``A [R, d_in]``, ``B [d_out, R]`` (scaling ``alpha/R``)."""
        return self.lora_A[:, 0, :], self.lora_B[:, :, 0].T

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"total_rank={self.total_rank}, active_ranks={self.active_ranks}, "
                f"gate={self.gate}, scaling={self.scaling:g}")


def smora_linear(base: nn.Linear | NF4Linear, total_rank: int, active_ranks: int, alpha: float,
                 gate: str = "one", **kwargs) -> SMoRALinear:
    """Wraps ``base`` as an SMoRA layer (see :class:`SMoRALinear`)."""
    return SMoRALinear(base, total_rank=total_rank, active_ranks=active_ranks, alpha=alpha,
                       gate=gate, **kwargs)
