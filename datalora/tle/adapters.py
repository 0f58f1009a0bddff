"""LoRA-TLE adapters: loading PEFT LoRA folders (scaling folded into ``B``), packing them
into zero-padded MoLoRA experts, and the mixed linear layer with its shared routing slot."""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import regex
import torch
import torch.nn as nn

from datalora.io import check_saved_weight, load_tensors
from datalora.layers import MoLoRALinear
from datalora.ops.layout import expert_minor
from datalora.routing import Routing

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.lora_(?P<ab>[AB])"
                  r"(?:\.(?P<adapter>[^.]+))?\.weight$")
# a module's own weight / bias: the base layer's under a LoRA (``X.base_layer.weight``,
# PEFT saves lm_head's), a bias (bias='all' saves those of modules without LoRA as
# ``X.bias``), a weight saved as a copy (save_embedding_layers) or trained (modules_to_save)
_MODULE_TENSOR = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)(?:\.base_layer)?\."
                            r"(?P<kind>weight|bias)$")
# PEFT's LoraConfig default when adapter_config.json has no lora_alpha
_PEFT_DEFAULT_ALPHA = 8.0


@dataclass
class LoRAAdapter:
    """One PEFT LoRA adapter with its scaling folded in.

    Attributes:
        name: adapter name. path: where it was loaded from (or None).
        modules: ``{module name: (A [r, d_in], B_scaled [d_out, r])}`` with
            ``B_scaled = scaling * B``, so ``dW = B_scaled @ A``.
        config: the adapter's ``adapter_config.json``.
        base_weights: ``{module name: weight}`` copies of frozen base weights the file also
            holds (PEFT saves ``lm_head``'s with an lm_head adapter); not part of the update,
            kept to check that the adapter was trained on the model it is mixed into.
    """

    name: str
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    config: dict[str, Any]
    path: str | None = None
    base_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    base_biases: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def max_rank(self) -> int:
        return max(a.shape[0] for a, _ in self.modules.values())

    def delta_weight(self, module: str) -> torch.Tensor:
        """``dW [d_out, d_in]`` of ``module`` (scaling included)."""
        a, b = self.modules[module]
        return b.float() @ a.float()


# a rank / alpha pattern key is a regex from the file: matched with a time limit, so a
# catastrophically backtracking key (``(.*.*)*X``) fails instead of hanging the load
_PATTERN_TIMEOUT_S = 1.0


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any,
                   cfg_file: Path) -> Any:
    for key, value in patterns.items():  # PEFT's rule: the key (a regex) ends the name
        try:
            if regex.match(rf"(.*\.)?({key})$", module, timeout=_PATTERN_TIMEOUT_S):
                return value
        except regex.error as exc:
            raise ValueError(f"path: pattern key {key!r} in {cfg_file} is not a valid regular "
                             f"expression ({exc})") from None
        except TimeoutError:
            raise ValueError(f"path: pattern key {key!r} in {cfg_file} took over "
                             f"{_PATTERN_TIMEOUT_S:g} s to match {module!r} (a regular "
                             f"expression that backtracks without end)") from None
    return default


def _finite_number(name: str, value: Any, cfg_file: Path) -> float:
    """``value`` as a finite float (``json`` reads ``NaN`` / ``Infinity`` / ``1e999``)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or isinstance(value, bool):
        raise ValueError(f"path: {name} in {cfg_file} must be a finite number, got {value!r}")
    return number


# init_lora_weights methods that also rewrite the base weights (the saved A / B only make
# sense on that modified base, unless PEFT converted them on save)
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


def _check_plain_lora(config: Mapping[str, Any], folder: Path) -> None:
    """ValueError for LoRA variants whose update is not ``B @ A`` on the frozen base."""
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(f"path: {folder} holds a {config.get('peft_type')} adapter, "
                         f"expected LORA")
    if config.get("use_dora"):
        raise ValueError(f"path: {folder} is a DoRA adapter; only plain LoRA can be mixed")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise ValueError(f"path: {folder} was initialised with init_lora_weights={init!r}, "
                         f"which also changes the base weights; re-save it with PEFT's "
                         f"path_initial_model_for_weight_conversion (a plain LoRA) to mix it")
    if config.get("alora_invocation_tokens"):
        raise ValueError(f"path: {folder} is an activated LoRA (alora_invocation_tokens): it "
                         f"applies only after its invocation tokens; only plain LoRA can be "
                         f"mixed")
    if config.get("use_bdlora"):
        raise ValueError(f"path: {folder} is a block-diagonal LoRA (use_bdlora): its saved "
                         f"lora_A / lora_B are compact blocks, not [r, d_in] / [d_out, r]; "
                         f"only plain LoRA can be mixed")
    if config.get("layer_replication"):
        raise ValueError(f"path: {folder} replicates decoder layers (layer_replication); "
                         f"only plain LoRA can be mixed")


def _weights_file(folder: Path) -> Path:
    """``adapter_model.safetensors``, else ``adapter_model.bin`` (``safe_serialization=False``)."""
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"path: {folder} must contain adapter_config.json and "
                            f"adapter_model.safetensors (or adapter_model.bin)")


def _read_weights(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix == ".bin":  # tensors only: no code runs from the pickle
        return torch.load(file, map_location="cpu", weights_only=True)
    return load_tensors(file)


def _modules_to_save(config: Mapping[str, Any], module: str) -> bool:
    """True when ``module`` or a module containing it (``"mlp"`` saves its linears' weights)
    is one of the config's ``modules_to_save``, matched as PEFT matches them: by plain name
    suffix (``"layernorm"`` trains every ``input_layernorm``)."""
    parts = module.split(".")
    enclosing = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(path.endswith(name) for path in enclosing
               for name in config.get("modules_to_save") or ())


def load_peft_adapter(path: str | Path, name: str | None = None) -> LoRAAdapter:
    """Loads a PEFT LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors`` or
    ``adapter_model.bin``).

    Handles per-module ranks (``rank_pattern``; the tensors must have the rank the config
    gives), ``alpha_pattern`` and rsLoRA; ``lora_alpha`` defaults to PEFT's 8. Saved copies
    of base modules (``save_embedding_layers``, biases of ``bias='all'`` / ``'lora_only'``)
    are kept to be checked against the model by the mixer. DoRA, block-diagonal and
    activated LoRA, LoRA on embeddings, ``modules_to_save`` and initialisations that rewrite
    the base (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA) are not supported (``ValueError``).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"path: {folder} is not a folder (a PEFT LoRA adapter is a "
                                f"folder with adapter_config.json and its weights)"
                                if folder.exists() else f"path: {folder} does not exist")
    cfg_file = folder / "adapter_config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"path: {folder} must contain adapter_config.json and "
                                f"adapter_model.safetensors (or adapter_model.bin)")
    weights = _weights_file(folder)
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"path: {cfg_file} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"path: {cfg_file} holds a JSON {type(config).__name__}, expected an "
                         f"object (a PEFT adapter_config.json)")
    if config.get("adapter_type") == "datalora":
        raise ValueError(f"path: {folder} is a datalora MoLoRA adapter (adapter_type "
                         f"'datalora', saved by DATALORAModel.save_pretrained), not a PEFT "
                         f"LoRA adapter; load it with DATALORAModel.from_pretrained")
    _check_plain_lora(config, folder)
    alpha = _finite_number("lora_alpha", config.get("lora_alpha", _PEFT_DEFAULT_ALPHA), cfg_file)
    alpha_pattern = config.get("alpha_pattern") or {}
    rank_pattern = config.get("rank_pattern") or {}
    for field_name, patterns in (("alpha_pattern", alpha_pattern), ("rank_pattern", rank_pattern)):
        if not isinstance(patterns, dict):
            raise ValueError(f"path: {field_name} in {cfg_file} must be an object, got "
                             f"{type(patterns).__name__}")
    rslora = bool(config.get("use_rslora", False))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    base_weights: dict[str, torch.Tensor] = {}
    base_biases: dict[str, torch.Tensor] = {}
    for key, tensor in _read_weights(weights).items():
        check_saved_weight("path", key, tensor, weights)
        match = _KEY.match(key)
        if match is not None:
            module_parts = parts.setdefault(match["module"], {})
            if match["ab"] in module_parts:
                raise ValueError(f"path: {weights} holds two lora_{match['ab']} tensors of "
                                 f"module {match['module']!r} (of two adapters?)")
            module_parts[match["ab"]] = tensor
            continue
        copy = _MODULE_TENSOR.match(key)
        if copy is None or "lora_" in key:
            raise ValueError(f"path: unsupported tensor {key!r} in {weights} (only "
                             f"lora_A / lora_B weights of linear layers can be mixed)")
        module = copy["module"]
        if _modules_to_save(config, module):
            raise ValueError(f"path: {folder} trains module {module!r} as a whole "
                             f"(modules_to_save={config.get('modules_to_save')}); the mixer "
                             f"mixes lora_A / lora_B only and would drop it")
        # a copy of a base tensor (PEFT saves lm_head's, embedding layers, biases): no
        # update, checked against the model by the mixer (a trained bias is refused there)
        (base_weights if copy["kind"] == "weight" else base_biases)[module] = tensor
    modules = {}
    for module, ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"path: module {module!r} of {folder} lacks lora_A or lora_B")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"path: {module!r} has lora_A {tuple(a.shape)} and lora_B "
                             f"{tuple(b.shape)}; expected [r, d_in] and [d_out, r]")
        r = a.shape[0]
        expected = _pattern_value(rank_pattern, module, config.get("r"), cfg_file)
        if expected is not None and not (isinstance(expected, int)
                                         and not isinstance(expected, bool)):
            raise ValueError(f"path: the rank of module {module!r} in {cfg_file} must be an "
                             f"integer, got {expected!r}")
        if expected is not None and expected != r:
            raise ValueError(f"path: module {module!r} of {folder} has rank {r} in its "
                             f"tensors but r={expected} in adapter_config.json")
        a_mod = _finite_number(f"alpha_pattern[{module!r}]",
                               _pattern_value(alpha_pattern, module, alpha, cfg_file), cfg_file)
        scaling = a_mod / math.sqrt(r) if rslora else a_mod / r
        modules[module] = (a.float(), b.float() * scaling)
    if not modules:
        raise ValueError(f"path: {folder} holds no LoRA tensors")
    return LoRAAdapter(name=name or folder.name, modules=modules, config=config,
                       path=str(folder), base_weights=base_weights, base_biases=base_biases)


def trained_biases(model: nn.Module, adapter: LoRAAdapter) -> list[str]:
    """Modules whose bias saved in ``adapter`` (PEFT ``bias='all'`` / ``'lora_only'``)
    differs from ``model``'s: trained biases, which mixing lora_A / lora_B would drop."""
    changed = []
    for module, saved in adapter.base_biases.items():
        try:
            own = model.get_submodule(module).bias
        except AttributeError:
            own = None
        if own is None or own.shape != saved.shape or not _same_up_to_rounding(
                own.detach().cpu(), saved):
            changed.append(module)
    return sorted(changed)


def _same_up_to_rounding(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a == b`` once both are rounded to the less precise of their dtypes (a bias saved
    from a bf16 model equals the fp32 model's own rounded to bf16)."""
    if not (a.is_floating_point() and b.is_floating_point()):
        return torch.equal(a, b)
    low = max((a.dtype, b.dtype), key=lambda d: torch.finfo(d).eps)
    return torch.equal(a.to(low), b.to(low))


def foreign_base_weights(model: nn.Module, adapter: LoRAAdapter) -> dict[str, float]:
    """``{module: max |difference|}`` for the base-weight copies in ``adapter`` that differ
    from ``model``'s own weights beyond dtype rounding (``inf`` for another shape): the
    sign of an adapter trained on another base model."""
    foreign = {}
    for module, saved in adapter.base_weights.items():
        try:
            own = model.get_submodule(module).weight.detach().float().cpu()
        except AttributeError:
            continue
        if own.shape != saved.shape:
            foreign[module] = math.inf
        elif not torch.allclose(own, saved.float(), rtol=1e-2, atol=1e-3):
            foreign[module] = float((own - saved.float()).abs().max())
    return foreign


def pack_adapters(adapters: Sequence[LoRAAdapter]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Stacks adapters into MoLoRA experts, zero-padding ranks to the largest.

    Returns:
        ``{module: (A [N, R, d_in], B [N, d_out, R])}`` over the union of modules; ``B``
        carries each adapter's scaling, so the MoLoRA scaling is 1. A module missing from
        an adapter gets a zero expert; padded rank dims are zero in A and B.
    """
    if not adapters:
        raise ValueError("adapters: expected at least one adapter, got none")
    N = len(adapters)
    R = max(a.max_rank for a in adapters)
    shapes: dict[str, tuple[int, int]] = {}
    for adapter in adapters:
        for module, (a, b) in adapter.modules.items():
            shape = (b.shape[0], a.shape[1])
            if shapes.setdefault(module, shape) != shape:
                raise ValueError(f"adapters: module {module!r} is {shapes[module]} (d_out, "
                                 f"d_in) in one adapter and {shape} in {adapter.name!r}; "
                                 f"adapters must share a base model")
    packed = {}
    for module, (d_out, d_in) in sorted(shapes.items()):
        A, B = torch.zeros(N, R, d_in), torch.zeros(N, d_out, R)
        for e, adapter in enumerate(adapters):
            if module in adapter.modules:
                a, b = adapter.modules[module]
                A[e, :a.shape[0]] = a
                B[e, :, :a.shape[0]] = b
        packed[module] = (A, B)
    return packed


# --------------------------------------------------------------------------- layers

class _RoutingSlot:
    """Routing shared by every mixer layer for the current forward, one per thread (threads
    serving one mixer each set their own weights).

    ``weights`` is ``[T, N]`` (per token) or ``[N]`` (every token alike), or None.
    """

    def __init__(self, top_k: int):
        self.top_k = top_k
        self._local = threading.local()

    def __getstate__(self) -> dict:
        return {"top_k": self.top_k}  # a copy starts with no weights set

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["top_k"])

    @property
    def weights(self) -> torch.Tensor | None:
        return getattr(self._local, "weights", None)

    @property
    def _cache(self) -> tuple[int, Routing] | None:
        return getattr(self._local, "cache", None)

    @property
    def base_only(self) -> bool:
        """Whether this thread's forwards run the base layers alone
        (:meth:`~datalora.tle.mixer.TokenLevelAdapterMixer.adapters_disabled`)."""
        return getattr(self._local, "base_only", False)

    @contextmanager
    def base_only_block(self) -> Iterator[None]:
        """This thread's forwards run the base layers alone inside the block (other
        threads' forwards still mix); nests."""
        previous = self.base_only
        self._local.base_only = True
        try:
            yield
        finally:
            self._local.base_only = previous

    def set(self, weights: torch.Tensor | None) -> None:
        self._local.weights, self._local.cache = weights, None

    def routing(self, num_tokens: int) -> Routing:
        if self.weights is None:
            raise ValueError("routing: no mixing weights are set; call the model through "
                             "TokenLevelAdapterMixer (forward / generate) or use "
                             "mixer.fixed_weights(...)")
        if self._cache is not None and self._cache[0] == num_tokens:
            return self._cache[1]
        w = self.weights
        if w.dim() == 1:
            w = w.expand(num_tokens, -1)
        if w.shape[0] != num_tokens:
            raise ValueError(f"weights: expected {num_tokens} rows (tokens of this forward), "
                             f"got {w.shape[0]}")
        N = w.shape[-1]
        if self.top_k >= N:
            ids = torch.arange(N, device=w.device).expand(num_tokens, N)
            gates = w.clone()  # the caller's weights: a copy datalora owns
        else:
            gates, ids = w.topk(self.top_k, dim=-1)
            total = gates.sum(-1, keepdim=True)
            if not bool((total > 0).all()):  # renormalising would give NaN / flipped gates
                raise ValueError(f"weights: expected the {self.top_k} largest weights of "
                                 f"each token to sum to > 0 (top_k={self.top_k} renormalises "
                                 f"them), got sums {total.flatten().tolist()[:8]}")
            gates = gates / total
        routing = Routing(expert_ids=ids.contiguous(), gates=gates.contiguous(), _trusted=True)
        self._local.cache = (num_tokens, routing)
        return routing


class AdapterMixLinear(MoLoRALinear):
    """A :class:`MoLoRALinear` whose experts are pretrained adapters and whose routing
    comes from the mixer's shared slot (scaling 1: each expert's B carries its scaling)."""

    def __init__(self, base_layer: nn.Linear, A: torch.Tensor, B: torch.Tensor, top_k: int,
                 slot: _RoutingSlot, backend: str = "auto"):
        E, R, _ = A.shape
        super().__init__(base_layer, num_experts=E, rank=R, alpha=float(R), top_k=top_k,
                         router=False, backend=backend)
        self.requires_grad_(False)
        with torch.no_grad():
            self.lora_A.copy_(A)
            # inference only (never sharded): expert-minor B, no copy of B per forward
            # (datalora.ops.layout)
            self.lora_B.data = expert_minor(B.to(self.lora_B.device, self.lora_B.dtype))
        self._slot = slot

    def forward(self, x: torch.Tensor, routing: Routing | None = None) -> torch.Tensor:
        """x ``[..., d_in]`` -> ``[..., d_out]``. The first mixed layer of a forward
        value-checks the slot's routing; the others take ``MoLoRALinear``'s inference path
        (:meth:`~datalora.layers.MoLoRALinear._checks_skippable`) when it applies."""
        if routing is None and self._slot.base_only:
            return self.base_forward(x)
        if routing is None and self.adapter_enabled:
            routing = self._slot.routing(x[..., 0].numel())
        return super().forward(x, routing)
