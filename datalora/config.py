"""``DATALORAConfig``: every knob of a DATALORA model, validated, JSON round-trippable."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from datalora.checks import check_finite, check_fractions, check_int, check_path_like
from datalora.curriculum import check_temperature_order
from datalora.ops.backends import BACKEND_NAMES

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                          "down_proj")
CONFIG_NAME = "adapter_config.json"
ROUTINGS = ("auto", "shared", "per_layer")


def _check_base_model(base_model: object) -> str | None:
    """None, or a Hub name / local path as a ``str`` (an ``os.PathLike`` is converted, so the
    config stays JSON-serialisable)."""
    if isinstance(base_model, str) and not base_model.strip():  # would load from the cwd
        raise ValueError(f"base_model: expected None, a Hub name or a local path, got "
                         f"{base_model!r}")
    if base_model is None or isinstance(base_model, str):
        return base_model
    if isinstance(base_model, os.PathLike) and isinstance(os.fspath(base_model), str):
        return os.fspath(base_model)
    raise ValueError(f"base_model: expected None, a Hub name or a local path, got "
                     f"{base_model!r}")


def _check_target_modules(target_modules: object) -> list[str]:
    """A non-empty list of non-empty module names (one name alone becomes a list)."""
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    if not isinstance(target_modules, (list, tuple)) or not target_modules \
            or not all(isinstance(name, str) and name for name in target_modules):
        raise ValueError(f"target_modules: expected a non-empty list of module names, got "
                         f"{target_modules!r}")
    return list(dict.fromkeys(target_modules))  # a repeat changes nothing: kept once


@dataclass
class DATALORAConfig:
    """Configuration of MoLoRA injection and the DATALORA method (seed model card names)."""

    base_model: str | None = field(default=None, metadata={
        "help": "Hub name or local path of the base model (None: the embedded tiny model)."})
    num_lora_experts: int = field(default=8, metadata={"help": "E, LoRA experts per layer."})
    lora_rank: int = field(default=16, metadata={"help": "r, rank of each expert."})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA alpha; scaling = alpha/r."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input."})
    target_retention: float = field(default=0.5, metadata={
        "help": "Fraction of tokens kept in the pruned layer range after the curriculum."})
    num_active_experts: int = field(default=2, metadata={"help": "k, experts per token."})
    temperature_init: float = field(default=5.0, metadata={"help": "Initial Gumbel temperature."})
    temperature_final: float = field(default=0.5, metadata={"help": "Final Gumbel temperature."})
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES),
                                      metadata={"help": "Names (last path component) of the "
                                                        "nn.Linear modules to adapt."})
    routing: str = field(default="auto", metadata={
        "help": "'shared': the DATALORA method, one saliency network decision per token "
                "drives every layer and prunes tokens; 'per_layer': MoLoRA with a router per "
                "layer (any module, no pruning); 'auto': 'shared' where the model supports it "
                "(a decoder LM whose targets lie inside its decoder layers), else "
                "'per_layer'."})
    lambda_prune: float = field(default=0.1, metadata={"help": "Weight of L_retention."})
    alpha_balance: float = field(default=0.01, metadata={"help": "Weight of L_balance."})
    prune_layers: list[int] | None = field(default=None, metadata={
        "help": "[start, end) decoder-layer range run on pruned tokens (None: second half)."})
    curriculum_split: list[float] = field(default_factory=lambda: [1 / 3, 1 / 3, 1 / 3],
                                          metadata={"help": "Fractions of training spent in "
                                                            "warmup, sparsification, hardening."})
    saliency_hidden_size: int = field(default=64, metadata={
        "help": "Width of the saliency network's shared backbone."})
    backend: str = field(default="auto", metadata={"help": "datalora.ops backend."})
    quantize: str | None = field(default=None, metadata={
        "help": "'nf4': store the targeted base weights in 4-bit NF4 (bitsandbytes layout); "
                "None keeps them as they are (bnb Linear4bit bases are used as loaded)."})

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Checks (and normalises) every field: run on construction and again by every
        consumer (model wrapping, the trainer), so a field assigned afterwards
        (``config.routing = "per-layer"``) is refused there with the same message."""
        for name in ("num_lora_experts", "lora_rank", "num_active_experts",
                     "saliency_hidden_size"):
            setattr(self, name, check_int(name, getattr(self, name), low=1))
        for name in ("lora_alpha", "lora_dropout", "target_retention", "temperature_init",
                     "temperature_final", "lambda_prune", "alpha_balance"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise ValueError(f"{name}: expected a finite number, got {value!r} "
                                 "(YAML 1.1 reads 1e-4 as a string: write 1.0e-4)")
            setattr(self, name, check_finite(name, value))
        if not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha: expected > 0, got {self.lora_alpha}")
        for name in ("lambda_prune", "alpha_balance"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected >= 0, got {getattr(self, name)}")
        if self.num_active_experts > self.num_lora_experts:
            raise ValueError(f"num_active_experts: expected <= num_lora_experts="
                             f"{self.num_lora_experts}, got {self.num_active_experts}")
        if not 0.0 < self.target_retention <= 1.0:
            raise ValueError(f"target_retention: expected a value in (0, 1], "
                             f"got {self.target_retention}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout: expected a value in [0, 1), got {self.lora_dropout}")
        for name in ("temperature_init", "temperature_final"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected > 0, got {getattr(self, name)}")
        check_temperature_order(self.temperature_init, self.temperature_final)
        self.base_model = _check_base_model(self.base_model)
        self.target_modules = _check_target_modules(self.target_modules)
        if self.routing not in ROUTINGS:
            raise ValueError(f"routing: expected one of {ROUTINGS}, got {self.routing!r}")
        if self.backend not in BACKEND_NAMES:
            raise ValueError(f"backend: expected one of {BACKEND_NAMES}, got {self.backend!r}")
        if self.quantize not in (None, "nf4"):
            raise ValueError(f"quantize: expected None or 'nf4', got {self.quantize!r}")
        if self.prune_layers is not None:
            if not isinstance(self.prune_layers, (list, tuple)) or len(self.prune_layers) != 2:
                raise ValueError(f"prune_layers: expected [start, end), got "
                                 f"{self.prune_layers!r}")
            self.prune_layers = [check_int("prune_layers[0]", self.prune_layers[0], low=0),
                                 check_int("prune_layers[1]", self.prune_layers[1], low=1)]
            if not self.prune_layers[0] < self.prune_layers[1]:
                raise ValueError(f"prune_layers: expected [start, end) with 0 <= start < end, "
                                 f"got {self.prune_layers}")
        self.curriculum_split = check_fractions("curriculum_split", self.curriculum_split)

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.lora_rank

    def to_dict(self) -> dict[str, Any]:
        return {"adapter_type": "datalora", **asdict(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DATALORAConfig:
        if not isinstance(data, Mapping):
            raise TypeError(f"config: expected a mapping of DATALORAConfig fields, got "
                            f"{type(data).__name__}")
        known = {f.name for f in fields(cls)}
        if "peft_type" in data and data.get("adapter_type") != "datalora":
            raise ValueError(f"config: a PEFT adapter config (peft_type {data['peft_type']!r}),"
                             f" not a datalora one: load it with peft, or mix PEFT LoRA "
                             f"adapters with datalora.tle.TokenLevelAdapterMixer")
        data = {k: v for k, v in data.items() if k != "adapter_type"}
        unknown = sorted(set(data) - known, key=repr)  # YAML keys may be bools, numbers
        if unknown:
            hint = ("; a 'training' section belongs to datalora train's config files "
                    "(datalora.train.load_train_config reads both parts)"
                    if "training" in unknown else "")
            raise ValueError(f"config: unknown DATALORAConfig fields {unknown}{hint}")
        return cls(**data)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_pretrained(cls, path: str | Path) -> DATALORAConfig:
        """Reads ``adapter_config.json`` from a folder (or the file itself)."""
        check_path_like("path", path, "a folder or file path")
        path = Path(path)
        file = path / CONFIG_NAME if path.is_dir() else path
        if not file.exists():
            raise FileNotFoundError(f"path: no {CONFIG_NAME} found at {path}")
        return cls.from_dict(_parse_config(file, json.loads, "JSON"))

    @classmethod
    def from_file(cls, path: str | Path) -> DATALORAConfig:
        """Loads a JSON or YAML config file (YAML needs the file suffix .yaml/.yml)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"path: no such config file {path}")
        return cls.from_dict(read_config_file(path))


def read_config_file(path: Path, *, json_only_by_suffix: bool = False) -> dict[str, Any]:
    """The mapping in a YAML (suffix .yaml / .yml, any case) or JSON config file: a
    ValueError naming the file when it is not valid YAML / JSON or holds no mapping at its
    top. Other suffixes are read as JSON, or refused with ``json_only_by_suffix``."""
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        return _parse_config(path, lambda text: load_yaml(text) or {}, "YAML")
    if json_only_by_suffix and suffix != ".json":
        raise ValueError(f"config: expected a .yaml, .yml or .json file, got {path.name}")
    return _parse_config(path, json.loads, "JSON")


def _parse_config(path: Path, parse: Any, kind: str) -> dict[str, Any]:
    """``parse`` of the file's text: a ValueError naming the file when it is not valid
    ``kind`` or holds no mapping at its top."""
    import yaml

    try:
        data = parse(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:  # named no file
        raise ValueError(f"config: {path} is not UTF-8 text ({exc.reason} at byte "
                         f"{exc.start})") from None
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"config: {path} is not valid {kind}: {exc}") from None
    except RecursionError:  # thousands of nested brackets
        raise ValueError(f"config: {path} nests its values too deeply to parse") from None
    if not isinstance(data, dict):
        raise ValueError(f"config: expected a mapping at the top of {path}, "
                         f"got {type(data).__name__}")
    if kind == "YAML" and _alias_expansion(data, CONFIG_MAX_ALIAS_VALUES) > \
            CONFIG_MAX_ALIAS_VALUES:
        raise ValueError(f"config: {path} repeats more than {CONFIG_MAX_ALIAS_VALUES:,} values "
                         f"through YAML aliases (aliases of nested lists: a few hundred bytes "
                         f"can stand for gigabytes); write the values out")
    return data


# values YAML aliases may add by repeating lists and mappings: a few hundred bytes of nested
# aliases stand for gigabytes, which error messages and checks would then print
CONFIG_MAX_ALIAS_VALUES = 100_000


def _alias_expansion(data: Any, limit: int) -> int:
    """The values ``data``'s repeated (aliased) lists and mappings add beyond their first
    occurrence, counted up to just past ``limit`` (a self-referencing alias is endless).
    Values written out (an inline dataset of any size) add nothing."""
    seen: set[int] = set()
    extra, stack = 0, [(data, False)]
    while stack and extra <= limit:
        item, repeated = stack.pop()
        extra += repeated
        if isinstance(item, dict | list):
            again = repeated or id(item) in seen
            seen.add(id(item))
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            stack.extend((child, again) for child in children)
    return extra


def load_yaml(text: str):
    """``yaml.safe_load`` with YAML 1.2 floats: PyYAML (YAML 1.1) reads ``1e-4`` (no dot) as
    the string ``'1e-4'``."""
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+][0-9]+)?
                    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
        list("-+0123456789."))
    return yaml.load(text, Loader=_Loader)
