"""datalora: kernel-accelerated mixture-of-LoRA-experts adapters for PyTorch."""

from datalora import ops
from datalora.config import DATALORAConfig
from datalora.layers import MoLoRALinear
from datalora.model import DATALORAModel, get_datalora_model, inject_molora
from datalora.routing import ExpertPermutation, Routing, sort_routes, topk_routing

__version__ = "0.1.0"

__all__ = [
    "DATALORAConfig",
    "DATALORAModel",
    "ExpertPermutation",
    "MoLoRALinear",
    "Routing",
    "get_datalora_model",
    "inject_molora",
    "ops",
    "sort_routes",
    "topk_routing",
]
