"""datalora: kernel-accelerated mixture-of-LoRA-experts adapters for PyTorch."""

from datalora import nf4, ops
from datalora.config import DATALORAConfig
from datalora.curriculum import CurriculumScheduler
from datalora.layers import MoLoRALinear
from datalora.model import DATALORAModel, get_datalora_model, inject_molora
from datalora.routing import ExpertPermutation, Routing, sort_routes, topk_routing
from datalora.saliency import UnifiedSaliencyNetwork
from datalora.smora import SMoRALinear, smora_linear

__version__ = "0.1.0"

# imported on first use: they pull in transformers.Trainer / PEFT, which are slow to import
_LAZY = {"DATALORATrainer": "datalora.trainer", "TokenLevelAdapterMixer": "datalora.tle"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'datalora' has no attribute {name!r}")


__all__ = [
    "CurriculumScheduler",
    "DATALORAConfig",
    "DATALORAModel",
    "DATALORATrainer",
    "ExpertPermutation",
    "MoLoRALinear",
    "Routing",
    "SMoRALinear",
    "TokenLevelAdapterMixer",
    "UnifiedSaliencyNetwork",
    "get_datalora_model",
    "inject_molora",
    "nf4",
    "ops",
    "smora_linear",
    "sort_routes",
    "topk_routing",
]
