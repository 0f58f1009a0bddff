"""datalora: kernel-accelerated mixture-of-LoRA-experts adapters for PyTorch."""

from datalora import ops
from datalora.layers import MoLoRALinear
from datalora.routing import ExpertPermutation, Routing, sort_routes, topk_routing

__version__ = "0.1.0"

__all__ = [
    "ExpertPermutation",
    "MoLoRALinear",
    "Routing",
    "ops",
    "sort_routes",
    "topk_routing",
]
