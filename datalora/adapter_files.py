"""A saved DATALORA adapter folder (``adapter_model.safetensors`` + ``adapter_config.json``):
finding its weights, checking them against a model before anything is injected, and the
config fields that must match between save and load (:data:`FUNCTION_FIELDS`)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from datalora.config import CONFIG_NAME, DATALORAConfig
from datalora.io import load_header
from datalora.pruning import find_decoder_layers, resolve_prune_range
from datalora.sharding import WRAPPER_ATTRIBUTES, unwrapped_name

WEIGHTS_NAME = "adapter_model.safetensors"


def check_not_a_file(folder: Path) -> None:
    """ValueError naming ``path`` when ``folder`` is a file (its weights file, say)."""
    if folder.is_file():
        raise ValueError(f"path: {folder} is a file; pass the folder holding "
                         f"{WEIGHTS_NAME} and its config ({folder.parent})")


def weights_file(folder: Path) -> Path:
    """``folder``'s adapter weights file; FileNotFoundError naming ``path`` when missing."""
    check_not_a_file(folder)
    file = folder / WEIGHTS_NAME
    if not file.exists():
        raise FileNotFoundError(f"path: no {WEIGHTS_NAME} found in {folder}")
    return file


def without_wrapper_names(saved: dict[str, Any], file: Path) -> dict[str, Any]:
    """``saved`` (tensors or header entries by name) keyed without FSDP1 /
    activation-checkpoint wrapper segments, as datalora saves them: releases before
    2026-12-04 kept ``_checkpoint_wrapped_module`` in the names of a wrapped model's
    adapter."""
    named = {unwrapped_name(name): value for name, value in saved.items()}
    if len(named) != len(saved):
        raise ValueError(f"path: {file} holds tensors whose names differ only by wrapper "
                         f"segments ({sorted(WRAPPER_ATTRIBUTES)}); save the adapter again")
    return named


BASE_PARAMETERS_KEY = "base_parameters"  # weights-file metadata: the base tensors it holds


def check_declared_base_parameters(extra: set[str], metadata: dict[str, str],
                                    file: Path) -> None:
    """Refuses base-model tensors (``extra``: those the weights ``file`` holds besides the
    MoLoRA layers' and the saliency network's) that its metadata does not list (a file
    edited after saving would replace base weights unannounced); warns for a file saved
    before datalora listed them."""
    declared = metadata.get(BASE_PARAMETERS_KEY)
    if declared is None:
        if extra:
            warnings.warn(f"path: {file} replaces base weights {sorted(extra)[:5]} "
                          f"({len(extra)} in all) without listing them (saved by an older "
                          f"datalora): they overwrite the base model's; save the adapter again "
                          f"to record them", stacklevel=3)
        return
    try:
        names = json.loads(declared)
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise ValueError
    except ValueError:
        raise ValueError(f"path: the {BASE_PARAMETERS_KEY!r} metadata of {file} is not a "
                         f"list of names: {declared[:200]!r}") from None
    undeclared = sorted(extra - set(names))
    if undeclared:
        raise ValueError(f"path: {file} holds base weights its metadata does not list "
                         f"({undeclared[:5]}, {len(undeclared)} in all): a file edited after "
                         f"saving would replace them in the base model; refusing to load it")


def check_adapter_fits(model: nn.Module, folder: Path, config: DATALORAConfig
                        ) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """The modules the saved MoLoRA tensors adapt exist in ``model`` with the features
    their shapes need (``lora_A [E, r, d_in]``, ``lora_B [E, d_out, r]``), and the sizes the
    saved ``config`` allocates (experts, rank, the saliency network's width) are those of
    the saved tensors: checked from the weights file's header before
    :meth:`~datalora.model.DATALORAModel.from_pretrained` injects anything, so an adapter
    of another model size fails with the user's model untouched, and an edited
    ``adapter_config.json`` (``num_lora_experts: 10000000``) allocates nothing (the full
    name and shape check of :meth:`~datalora.model.DATALORAModel.load_adapter` follows the
    injection). Returns the file's header (``name -> (shape, dtype)``)."""
    file = weights_file(folder)
    modules = {unwrapped_name(name): module for name, module in model.named_modules()}
    header = without_wrapper_names(load_header(file), file)
    sizes = {"lora_A": lambda s: (s[0], s[1]), "lora_B": lambda s: (s[0], s[2])}
    want_sizes = (config.num_lora_experts, config.lora_rank)
    # saves write the resolved routing ("shared" / "per_layer"), never "auto"
    saved = header.get("saliency.backbone.0.weight", (None, None))[0]
    if config.routing == "shared" or (config.routing == "auto" and saved is not None):
        if saved is None or saved[:1] != (config.saliency_hidden_size,):
            raise ValueError(f"path: {folder / CONFIG_NAME} says saliency_hidden_size="
                             f"{config.saliency_hidden_size} (shared routing), but "
                             f"{file.name} holds saliency.backbone.0.weight of shape {saved}")
    if not any(name.endswith(".lora_A") for name in header):
        raise ValueError(f"path: {file} holds no MoLoRA tensors (no '*.lora_A'); expected a "
                         f"datalora adapter folder")
    for name, (shape, _) in header.items():
        module_name, _, leaf = name.rpartition(".")
        if leaf not in ("lora_A", "lora_B"):
            continue
        if len(shape) == 3 and sizes[leaf](shape) != want_sizes:
            raise ValueError(f"{name}: saved shape {shape}, but {folder / CONFIG_NAME} says "
                             f"num_lora_experts={want_sizes[0]}, lora_rank={want_sizes[1]}")
        module = modules.get(module_name)
        if module is None:
            raise ValueError(f"path: the adapter at {folder} adapts {module_name!r}, which "
                             f"this model lacks")
        d_in, d_out = (getattr(module, "in_features", None),
                       getattr(module, "out_features", None))
        if len(shape) != 3 or d_in is None or d_out is None:
            continue  # not a linear layer: load_adapter names the mismatch
        want = (shape[0], shape[1], d_in) if leaf == "lora_A" else (shape[0], d_out, shape[2])
        if shape != want:
            raise ValueError(f"{name}: saved shape {shape}, but {module_name!r} of this model "
                             f"is {d_in} -> {d_out} (expected {want}): the adapter was "
                             f"trained on another model size")
    return header


FUNCTION_FIELDS: tuple[str, ...] = (
    "num_lora_experts", "lora_rank", "lora_alpha", "num_active_experts", "target_modules",
    "routing", "prune_layers", "saliency_hidden_size")
"""Config fields that, with the adapter tensors, define the function a DATALORA model
computes. Training-only settings (losses' weights, curriculum, temperatures, dropout, target
retention), the backend and the base's quantization may differ between save and load."""


def check_path(path: object) -> None:
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path: expected a folder path (str or Path), got {type(path).__name__}")


def config_from_json(text: str, source: Path) -> DATALORAConfig:
    """The config a weights file ``source`` carries in its metadata: a ValueError naming
    the file when the text is not a valid config."""
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"path: the datalora_config stored in {source} is not valid JSON "
                         f"({exc}); save the adapter again") from None
    try:
        return DATALORAConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"path: the datalora_config stored in {source} is not a valid "
                         f"config: {exc}") from exc


def function_fields(saved: DATALORAConfig, current: DATALORAConfig, base_model: nn.Module):
    """``(name, saved value, current value)`` for :data:`FUNCTION_FIELDS`, normalised:
    target modules as a set; the pruned range resolved (None = the second half) and the
    saliency width compared only with shared routing on both sides (per-layer routing has
    neither)."""
    shared = saved.routing == "shared" and current.routing == "shared"
    for name in FUNCTION_FIELDS:
        a, b = getattr(saved, name), getattr(current, name)
        if name == "target_modules":
            a, b = sorted(set(a)), sorted(set(b))
        elif name == "saliency_hidden_size" and not shared:
            continue
        elif name == "prune_layers":
            if not shared:
                continue
            num_layers = len(find_decoder_layers(base_model))
            a, b = (resolve_prune_range(v, num_layers) for v in (a, b))
        yield name, a, b
