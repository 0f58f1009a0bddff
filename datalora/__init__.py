"""datalora: kernel-accelerated mixture-of-LoRA-experts adapters for PyTorch."""

import logging as _logging
from typing import TYPE_CHECKING as _TYPE_CHECKING

from datalora import nf4, ops
from datalora.config import DATALORAConfig
from datalora.curriculum import CurriculumScheduler
from datalora.injection import inject_molora
from datalora.layers import MoLoRALinear
from datalora.model import DATALORAModel, get_datalora_model
from datalora.routing import ExpertPermutation, Routing, sort_routes, topk_routing
from datalora.saliency import UnifiedSaliencyNetwork
from datalora.smora import SMoRALinear, smora_linear

__version__ = "0.1.0"

# bitsandbytes' CPU backend (imported through transformers' Trainer / PEFT) logs at import
# that it could not fetch an optional 4-bit kernel from the Hub; datalora's NF4 does not use
# that kernel, so the message only misleads. A level the user set on that logger wins.
_bnb_cpu_log = _logging.getLogger("bitsandbytes.backends.cpu.ops")
if _bnb_cpu_log.level == _logging.NOTSET:
    _bnb_cpu_log.setLevel(_logging.ERROR)

# imported on first use: they pull in transformers.Trainer / PEFT, which are slow to import
_LAZY = {"DATALORATrainer": "datalora.trainer", "TokenLevelAdapterMixer": "datalora.tle"}
if _TYPE_CHECKING:  # type checkers see the classes (through __getattr__ they were Any)
    from datalora.tle import TokenLevelAdapterMixer
    from datalora.trainer import DATALORATrainer


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'datalora' has no attribute {name!r}")


def __dir__() -> list[str]:
    """The module's names and the lazy ones, so ``dir()`` and ``help(datalora)`` list them."""
    return sorted({*globals(), *_LAZY})


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
