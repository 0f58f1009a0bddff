"""The real alternatives datalora is compared against, written the way people write them.

* :func:`loop_delta` / :func:`loop_linear`: the usual mixture-of-LoRA-experts layer of
  MixLoRA / MoE-PEFT (and of Hugging Face's Mixtral MoE block): for each expert select
  the tokens routed to it, run its two LoRA matmuls on them, weight by the gate and
  ``index_add_`` the result back. One host sync per expert (``torch.where``), 2·E small
  GEMMs, gathers and scatters.
* :class:`PeftMixedBatch`: PEFT's LoRA layer holding E adapters, called with
  ``adapter_names=`` (one adapter per row: the k = 1 multi-tenant serving case).
  PEFT allows mixed-adapter batches in eval mode only, so it is timed forward only.

All compute the MoLoRA math (README, first lines), so they are checked against
``datalora.reference`` in ``tests/test_benchmarks.py`` before any timing is trusted.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def loop_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, expert_ids: torch.Tensor,
               gates: torch.Tensor, rank_scale: torch.Tensor | None = None,
               scaling: float = 1.0) -> torch.Tensor:
    """LoRA part of the per-expert loop.

    x ``[T, d_in]``, A ``[E, r, d_in]``, B ``[E, d_out, r]``, expert_ids and gates ``[T, k]``.
    """
    out = x.new_zeros(x.shape[0], B.shape[1])
    for e in range(A.shape[0]):
        tok, slot = torch.where(expert_ids == e)  # tokens routed to expert e (host sync)
        if tok.numel() == 0:
            continue
        h = F.linear(x[tok], A[e])  # [n_e, r]
        if rank_scale is not None:
            h = h * rank_scale[tok]
        y = F.linear(h, B[e]) * (gates[tok, slot, None] * scaling)  # [n_e, d_out]
        out.index_add_(0, tok, y.to(out.dtype))
    return out


def loop_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                A: torch.Tensor, B: torch.Tensor, expert_ids: torch.Tensor,
                gates: torch.Tensor, rank_scale: torch.Tensor | None = None,
                scaling: float = 1.0) -> torch.Tensor:
    """Whole layer of the per-expert loop: base linear plus :func:`loop_delta`."""
    return F.linear(x, weight, bias) + loop_delta(x, A, B, expert_ids, gates, rank_scale,
                                                  scaling)


class PeftMixedBatch:
    """PEFT ``lora.Linear`` with adapters ``e0 .. e{E-1}`` copied from ``A``/``B``.

    ``__call__(x, adapter_names)`` runs PEFT's mixed-batch forward; ``adapter_names``
    has one name per row of x (row = request; use :meth:`names` to build it from
    ``expert_ids [T, 1]``). The layer computes ``x W^T + b + scaling * B_e A_e x``, which
    equals ``molora_linear`` with k = 1 and gate 1.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, A: torch.Tensor,
                 B: torch.Tensor, scaling: float):
        from peft import LoraConfig, get_peft_model  # optional dependency

        E, r, d_in = A.shape
        d_out = B.shape[1]
        holder = nn.Module()
        holder.proj = nn.Linear(d_in, d_out, bias=bias is not None, device=weight.device,
                                dtype=weight.dtype)
        with torch.no_grad():
            holder.proj.weight.copy_(weight)
            if bias is not None:
                holder.proj.bias.copy_(bias)
        config = LoraConfig(r=r, lora_alpha=scaling * r, target_modules=["proj"],
                            lora_dropout=0.0, bias="none")
        model = get_peft_model(holder, config, adapter_name="e0")
        for e in range(1, E):
            model.add_adapter(f"e{e}", config)
        model.eval()
        self.layer = model.base_model.model.proj
        with torch.no_grad():
            for e in range(E):
                self.layer.lora_A[f"e{e}"].weight.copy_(A[e])
                self.layer.lora_B[f"e{e}"].weight.copy_(B[e])
                self.layer.scaling[f"e{e}"] = scaling
        self.model = model

    @staticmethod
    def names(expert_ids: torch.Tensor) -> list[str]:
        """Adapter name per row from ``expert_ids [T, 1]`` (k must be 1)."""
        if expert_ids.dim() != 2 or expert_ids.shape[1] != 1:
            raise ValueError(f"expert_ids: expected shape [T, 1], got {tuple(expert_ids.shape)}")
        return [f"e{e}" for e in expert_ids[:, 0].tolist()]

    def __call__(self, x: torch.Tensor, adapter_names: list[str]) -> torch.Tensor:
        return self.layer(x, adapter_names=adapter_names)
