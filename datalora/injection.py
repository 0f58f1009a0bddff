"""Which linear layers of a model get MoLoRA (:func:`inject_molora`), and what the DATALORA
method's shared routing needs of the model, checked before anything is changed
(:func:`check_shared`, :func:`auto_routing`)."""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from datalora.config import DATALORAConfig
from datalora.layers import MoLoRALinear
from datalora.nf4_linear import NF4Linear, is_nf4_base, quantize_linear
from datalora.ops.backends import CUDA_BACKEND_SCOPE
from datalora.pruning import (
    check_prunable,
    check_prune_range,
    find_decoder_layers,
    resolve_prune_range,
)


def _is_target(name: str, targets: list[str]) -> bool:
    return name.rsplit(".", 1)[-1] in targets


def parameter_elements(param: torch.Tensor) -> int:
    """Weights a parameter holds: a bnb ``Params4bit`` its unpacked element count."""
    state = getattr(param, "quant_state", None)
    if type(param).__name__ == "Params4bit" and state is not None:
        return int(torch.Size(state.shape).numel())
    return param.numel()


def _tied_parameters(model: nn.Module) -> set[int]:
    """ids of parameters registered under more than one name (tied weights)."""
    counts: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        counts[id(param)] = counts.get(id(param), 0) + 1
    return {i for i, n in counts.items() if n > 1}


def _adaptable(module: nn.Module) -> bool:
    """A layer MoLoRA can wrap: an ``nn.Linear`` (bnb's ``Linear4bit`` is one) or a
    datalora :class:`~datalora.nf4_linear.NF4Linear`."""
    return isinstance(module, (nn.Linear, NF4Linear))


def _class_name(module: nn.Module) -> str:
    """The class name, with its module path for a class named like one of torch.nn's
    (PEFT's LoRA layer is also called ``Linear``: ``peft.tuners.lora.layer.Linear``)."""
    cls = type(module)
    if cls.__module__.startswith("torch.") or not hasattr(nn, cls.__name__):
        return cls.__name__
    return f"{cls.__module__}.{cls.__qualname__}"


def _not_linear_hint(modules: list[tuple[str, nn.Module]], targets: list[str]) -> str:
    """``"; matching names that are not nn.Linear: [c_attn (Conv1D), ...]"`` or ``""``."""
    others = sorted({f"{n.rsplit('.', 1)[-1]} ({_class_name(m)})" for n, m in modules
                     if _is_target(n, targets) and not _adaptable(m)})
    return f"; matching names that are not nn.Linear: {others}" if others else ""


def inject_molora(model: nn.Module, config: DATALORAConfig, *,
                  progress: bool = False) -> list[str]:
    """Replaces targeted ``nn.Linear`` modules of ``model`` in place; returns their names.

    Every MoLoRA layer is built (its base quantized) before any is put in place, so an
    error (a weight NF4 cannot quantize) names the layer and leaves the model as it was.
    ``progress``: a bar over the layers while any is quantized.
    """
    check_types(model, config)  # a dict config failed with AttributeError: no 'quantize'
    replaced, kept_16bit = [], []
    modules = list(model.named_modules())  # before replacing: one walk serves both uses
    linear_names = {n.rsplit(".", 1)[-1] for n, m in modules if _adaptable(m)}
    tied = _tied_parameters(model) if config.quantize else set()
    plan = []  # (name, module, quantize, backend): checked before the model is modified
    for name, module in modules:
        if _adaptable(module) and _is_target(name, config.target_modules):
            quantize, backend = config.quantize, config.backend
            if quantize and id(getattr(module, "weight", None)) in tied:
                quantize = None  # a 4-bit copy would untie it (tie_weights would then fail)
                kept_16bit.append(name)
                if backend == "cuda":  # the NF4 kernels: not for a layer left 16-bit
                    backend = "auto"
            plan.append((name, module, quantize, backend))
    if config.backend == "cuda":
        not_nf4 = [name for name, module, quantize, backend in plan
                   if backend == "cuda" and not (quantize or is_nf4_base(module))]
        if not_nf4:
            raise ValueError(f"backend: 'cuda' runs NF4 bases only (quantize='nf4' or a 4-bit "
                             f"model); {not_nf4} are 16-bit layers; {CUDA_BACKEND_SCOPE}")
    built = []
    quantized = sum(1 for *_, quantize, _ in plan if quantize)
    with tqdm(total=len(plan), desc=f"quantizing {quantized} layers to NF4", unit="layer",
              disable=not (progress and quantized), dynamic_ncols=True) as bar:
        for name, module, quantize, backend in plan:
            # quantized here so that an error names the model's layer ("model.layers.1...")
            base = quantize_linear(module, quantize, name=name) if quantize else module
            try:
                built.append(MoLoRALinear(
                    base, num_experts=config.num_lora_experts, rank=config.lora_rank,
                    alpha=config.lora_alpha, top_k=config.num_active_experts,
                    dropout=config.lora_dropout, router=config.routing == "per_layer",
                    backend=backend))
            except (ValueError, TypeError) as err:  # name the model's layer, not base_layer
                if type(err) not in (ValueError, TypeError):
                    raise
                raise type(err)(f"{name}: {err}") from err
            bar.update()
    for (name, _, _, _), layer in zip(plan, built, strict=True):
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)
        replaced.append(name)
    if kept_16bit:
        note = "; they use backend 'auto', not 'cuda'" if config.backend == "cuda" else ""
        warnings.warn(f"quantize: {kept_16bit} share their weight with another module (tied "
                      f"embeddings) and stay 16-bit: quantizing would untie them{note}",
                      stacklevel=4)
    if not replaced:
        linears = sorted(linear_names)
        hint = _not_linear_hint(modules, config.target_modules)
        conv1d = sorted({n.rsplit(".", 1)[-1] for n, m in modules
                         if type(m).__name__ == "Conv1D"})
        if not hint and conv1d:  # GPT-2 style: its projections are not nn.Linear
            hint = f"; its Conv1D layers {conv1d} are not nn.Linear and cannot be adapted"
        raise ValueError(f"target_modules: none of {config.target_modules} matched an nn.Linear "
                         f"of the model; its linear layers are named {linears}{hint}")
    matched = {n.rsplit(".", 1)[-1] for n in replaced}
    unmatched = [t for t in config.target_modules if t not in matched]
    if unmatched:
        warnings.warn(f"target_modules: {unmatched} matched no nn.Linear of the model (adapted: "
                      f"{sorted(matched)}; its other linear layers are named "
                      f"{sorted(linear_names - matched)}"
                      f"{_not_linear_hint(modules, unmatched)})", stacklevel=4)
    return replaced


def _check_shared_targets(model: nn.Module, targets: list[str]) -> None:
    """Shared routing covers the tokens of the decoder layers: a target outside them (the LM
    head) would train, then fail in generate() (``logits_to_keep`` gives it fewer tokens)."""
    inside = {id(m) for m in find_decoder_layers(model).modules()}
    outside = [n for n, m in model.named_modules()
               if _adaptable(m) and _is_target(n, targets) and id(m) not in inside]
    if outside:
        raise ValueError(f"target_modules: routing='shared' drives adapted layers inside the "
                         f"decoder layers only, but {outside[:3]} are outside them; drop "
                         f"{sorted({n.rsplit('.', 1)[-1] for n in outside})} from "
                         f"target_modules or use routing='per_layer'")


def hidden_size_of(model: nn.Module) -> int:
    """``model.config.hidden_size``, which the saliency network of shared routing needs."""
    hidden_size = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(hidden_size, int):
        raise ValueError("model: routing='shared' needs model.config.hidden_size")
    return hidden_size


def check_shared(model: nn.Module, config: DATALORAConfig, strict: bool = True) -> nn.Module:
    """Raises the ValueError shared routing's build would raise (decoder layers,
    ``hidden_size``, ALiBi / router logits, targets, ``prune_layers`` unless not ``strict``,
    attention kinds), before anything is injected; returns the decoder layers."""
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
        raise ValueError("model: a PEFT model (PeftModel): its generate() calls the causal LM "
                         "inside it, past the hooks shared routing installs on the model you "
                         "pass; merge PEFT's adapter first (merge_and_unload()), adapt the "
                         "base before get_peft_model, or use routing='per_layer'")
    layers = find_decoder_layers(model)
    hidden_size_of(model)
    check_prunable(model)
    _check_shared_targets(model, config.target_modules)
    try:
        start, end = resolve_prune_range(config.prune_layers, len(layers))
    except ValueError:
        if strict:
            raise
        start = end = 0
    check_prune_range(model.config, layers, start, end)
    return layers


def auto_routing(model: nn.Module, config: DATALORAConfig) -> str:
    """``routing='auto'`` resolved: ``'shared'`` (the DATALORA method) where the model can run
    it (decoder layers on one device, ``config.hidden_size``, no ALiBi / MoE router logits,
    attention kinds the pruning masks reproduce, every target inside the decoder layers),
    else ``'per_layer'``, warned for a model with a ``config`` (a Hugging Face model, which
    may have been meant for the method). An invalid ``prune_layers`` is left to the
    shared-routing build to report."""
    try:
        layers = check_shared(model, config, strict=False)
        devices = sorted({str(p.device) for p in layers.parameters()})
        if len(devices) > 1:
            raise ValueError(f"model: the decoder layers are on {devices}; shared routing "
                             f"needs them on one device")
    except ValueError as err:
        if hasattr(model, "config"):
            warnings.warn(f"routing='auto' chose 'per_layer' (a router per layer, no saliency "
                          f"network or token pruning): {err}", stacklevel=4)
        return "per_layer"
    return "shared"


def check_types(model: object, config: object) -> nn.Module:
    """``model`` (returned) a module and ``config`` a :class:`DATALORAConfig` (TypeError
    naming them)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, DATALORAConfig):
        raise TypeError(f"config: expected DATALORAConfig, got {type(config).__name__}")
    return model
