"""LoRA-TLE mixer: :class:`TokenLevelAdapterMixer` puts N pretrained adapters into a base
model as MoLoRA experts, routes them per token, generates, and saves / loads itself."""

from __future__ import annotations

import json
import numbers
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, overload

import torch
import torch.nn as nn
import torch.nn.functional as F

from datalora.checks import as_scalar, check_flag, check_int, check_number, check_path_like
from datalora.cli import check_output_folder
from datalora.data import prompt_inputs
from datalora.hf_compat import cache_kwargs
from datalora.io import (
    atomic_write_text,
    check_saved_weight,
    load_metadata,
    load_tensors,
    save_tensors,
)
from datalora.layers import MoLoRALinear
from datalora.tle.adapters import (
    AdapterMixLinear,
    LoRAAdapter,
    _RoutingSlot,
    foreign_base_weights,
    load_peft_adapter,
    pack_adapters,
    trained_biases,
)
from datalora.tle.embedders import HiddenStateEmbedder, SentenceEmbedder
from datalora.tle.routing import _check_mode, anchor_positions, routing_weights

MIXER_CONFIG = "tle_config.json"
MIXER_WEIGHTS = "tle_mixer.safetensors"
# what from_pretrained reads from MIXER_CONFIG (save_pretrained also writes adapter_paths)
_SAVED_KEYS = frozenset({"names", "tau", "mode", "every_n", "top_k", "modules", "embedder"})


def _json_or_none(text: str) -> Any:
    """``json.loads(text)``, None when it is not valid JSON."""
    try:
        return json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return None


def _read_saved_config(file: Path) -> dict[str, Any]:
    """The settings :meth:`TokenLevelAdapterMixer.save_pretrained` wrote to ``file``: a
    ValueError naming the file when it is not UTF-8 JSON of that form."""
    def damaged(why: str) -> ValueError:
        return ValueError(f"directory: {file} {why} (not a file "
                          f"TokenLevelAdapterMixer.save_pretrained wrote)")

    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"directory: {file} is not UTF-8 text ({exc.reason} at byte "
                         f"{exc.start})") from None
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"directory: {file} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise damaged(f"holds a {type(config).__name__}, not a JSON object")
    absent = sorted(_SAVED_KEYS - set(config))
    if absent:
        raise damaged(f"lacks {absent}")
    for key in ("modules", "names"):
        value = config[key]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise damaged(f"has {key} {value!r:.60}, expected a list of strings")
    spec = config["embedder"]
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
        raise damaged(f"has embedder {spec!r:.60}, expected an object with a 'type'")
    return config


def _check_batch(input_ids: Any, attention_mask: Any, vocab_size: int,
                 labels: Any = None) -> None:
    """``input_ids [B >= 1, L >= 1]`` integer ids in ``[0, vocab_size)``, ``attention_mask`` None
    or ``[B, L]`` with a real token in every row, ``labels`` None or ``[B, L]`` integer ids
    in ``[0, vocab_size)`` or -100; a ValueError / TypeError naming the argument
    otherwise."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point() \
            or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids: expected an integer tensor, got "
                        f"{getattr(input_ids, 'dtype', type(input_ids).__name__)}")
    if input_ids.dim() != 2 or 0 in input_ids.shape:
        raise ValueError(f"input_ids: expected shape [B >= 1, L >= 1], got "
                         f"{tuple(input_ids.shape)}")
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask: expected a torch.Tensor or None, got "
                        f"{type(attention_mask).__name__}")  # a numpy mask: "got (2, 22)"
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask: expected shape {tuple(input_ids.shape)} (that of "
                         f"input_ids), got {tuple(attention_mask.shape)}")
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape:
            got = tuple(labels.shape) if isinstance(labels, torch.Tensor) \
                else type(labels).__name__
            raise ValueError(f"labels: expected shape {tuple(input_ids.shape)} (that of "
                             f"input_ids), got {got}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"labels: expected an integer tensor, got {labels.dtype}")
    # every value fact in one transfer to the host (one sync per forward on a GPU): the
    # ids' and labels' ranges, the mask's values other than 0 / 1 and its rows without a
    # token
    targets = input_ids if labels is None else labels.masked_fill(labels == -100, 0)
    facts = [input_ids.min().view(1), input_ids.max().view(1), targets.min().view(1),
             targets.max().view(1)]
    if attention_mask is not None:
        facts += [((attention_mask != 0) & (attention_mask != 1)).any().view(1),
                  attention_mask.sum(1) == 0]
    low, high, label_low, label_high, *mask_facts = torch.cat(
        [f.to(input_ids.device, torch.long) for f in facts]).tolist()
    _check_id_range(low, high, vocab_size)
    if label_low < 0 or label_high >= vocab_size:
        raise ValueError(f"labels: expected ids in [0, {vocab_size}) or -100 (ignored), got "
                         + (f"min {label_low}" if label_low < 0 else f"max {label_high}"))
    if attention_mask is None:
        return
    other_values, *no_token = mask_facts
    if other_values:
        raise ValueError("attention_mask: expected 0 / 1 values (any dtype: bool, int or "
                         "float), got others")
    empty = [row for row, none in enumerate(no_token) if none]
    if empty:
        raise ValueError(f"attention_mask: rows {empty} have no token (all padding)")


def _check_id_range(low: int, high: int, vocab_size: int) -> None:
    """ValueError unless the smallest / largest id ``low`` / ``high`` are in ``[0,
    vocab_size)`` (F.embedding would raise "IndexError: index out of range in self")."""
    if low < 0 or high >= vocab_size:
        raise ValueError(f"input_ids: expected ids in [0, {vocab_size}), got "
                         + (f"min {low}" if low < 0 else f"max {high}"))


def _check_right_padding(attention_mask: torch.Tensor) -> None:
    """ValueError for a left-padded batch (a padding position before a real token): the
    routing anchors count positions from the start of each row."""
    mask = attention_mask.bool()
    if bool((~mask[:, :-1] & mask[:, 1:]).any()):
        raise ValueError("attention_mask: expected right padding (real tokens first); this "
                         "batch has padding before real tokens")


def _check_packed(packed: Mapping[str, Any]) -> int:
    """The adapter count N of a packed mapping ``{module: (A [N, R, d_in], B [N, d_out, R])}``
    (one N for all modules); ValueError naming the module otherwise."""
    if not packed:
        raise ValueError("adapters: expected a non-empty mapping {module: (A, B)}, got none")
    counts = set()
    for module, pair in packed.items():
        ok = isinstance(pair, (tuple, list)) and len(pair) == 2 and all(
            isinstance(t, torch.Tensor) and t.dim() == 3 for t in pair)
        if not ok or pair[0].shape[0] != pair[1].shape[0] \
                or pair[0].shape[1] != pair[1].shape[2]:
            got = [tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                   for t in (pair if isinstance(pair, (tuple, list)) else [pair])]
            raise ValueError(f"adapters: module {module!r} expected (A [N, R, d_in], B [N, "
                             f"d_out, R]), got {got}")
        for label, t in zip("AB", pair, strict=True):
            if not t.is_floating_point():
                raise TypeError(f"adapters: module {module!r}: {label} is {t.dtype}, "
                                f"expected a float tensor")
            if t.is_meta:
                raise ValueError(f"adapters: module {module!r}: {label} is on the meta "
                                 f"device (no values)")
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"adapters: module {module!r}: {label} holds NaN or inf")
        counts.add(pair[0].shape[0])
    if len(counts) > 1:
        raise ValueError(f"adapters: every module must hold the same number of adapters N, "
                         f"got {sorted(counts)}")
    return counts.pop()


def _embedding_width(model: nn.Module, embedder: Any) -> int | None:
    """Width of the hidden-state embedder's context embeddings (None: not known here)."""
    if embedder is not None and not isinstance(embedder, HiddenStateEmbedder):
        return None
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    factor = 1 if embedder is None else embedder.width_factor
    return hidden * factor if isinstance(hidden, int) else None


def _rebuilt_embedder(spec: dict[str, Any], overrides: dict[str, Any], window: int | None,
                      decay: float | None, whole_weight: float | None, has_centroids: bool,
                      lm_tokenizer: Any) -> HiddenStateEmbedder | SentenceEmbedder:
    """The saved hidden-state or sentence embedder with ``from_pretrained``'s recency
    overrides, refusing those the saved centroids cannot route: adding or removing a
    whole-context share changes the embedding's width."""
    saved = spec.get("whole_weight")
    sentence = spec["type"] == "sentence"
    if sentence and decay is not None:
        raise ValueError("decay: not available for a sentence embedder")
    refit = ("load the mixer as saved, then set mixer.embedder and refit the centroids "
             "(mixer.fit_centroids)")
    if saved is not None and "whole_weight" not in overrides and window is None \
            and decay is None:
        raise ValueError(f"{next(iter(overrides), 'window')}: the mixer was saved with "
                         f"whole_weight={saved}, which needs "
                         f"{'a window' if sentence else 'a window or decay'}; to route on "
                         f"the whole context, "
                         + (refit if has_centroids else "pass whole_weight=None as well"))
    if has_centroids and (saved is None) != (whole_weight is None):
        raise ValueError(f"whole_weight: the saved centroids were fitted for whole_weight="
                         f"{saved}; {'adding' if saved is None else 'removing'} the "
                         f"whole-context share changes the embedding's width, so they cannot "
                         f"route it: {refit}")
    if not sentence:
        return HiddenStateEmbedder(spec["layer"], window=window, decay=decay,
                                   whole_weight=whole_weight)
    if lm_tokenizer is None:
        raise ValueError("lm_tokenizer: needed to rebuild the sentence embedder")
    return SentenceEmbedder(lm_tokenizer, spec.get("model"), window=window,
                            whole_weight=whole_weight)


def _warn_mixed_bases(adapters: Sequence[LoRAAdapter]) -> None:
    """Warns when the adapters' configs name different base models (``base_model_name_or_
    path``; adapters that name none are not compared)."""
    named = {a.name: a.config.get("base_model_name_or_path") for a in adapters}
    bases = {b for b in named.values() if b}
    if len(bases) > 1:
        listing = ", ".join(f"{n!r}: {b!r}" for n, b in named.items() if b)
        warnings.warn(f"adapters: trained on different base models ({listing}); mixing "
                      f"needs adapters of one base model", UserWarning, stacklevel=3)


BASE_SAMPLES = 64
"""Weights per mixed module saved with a mixer to recognise its base model on reload."""


def _as_linear(module: nn.Module) -> nn.Module:
    """GPT-2's ``transformers`` ``Conv1D`` (``y = x @ W + b``, W ``[d_in, d_out]``) as the
    equal ``nn.Linear`` (its weight transposed into a new ``[d_out, d_in]`` tensor; the
    Conv1D is dropped when the mixer replaces it). PEFT stores such a module's LoRA as
    ``lora_A [r, d_in]`` / ``lora_B [d_out, r]`` like a Linear's (``fan_in_fan_out``
    only transposes the merged update). Any other module is returned as is."""
    if type(module).__name__ != "Conv1D" or getattr(module, "weight", None) is None \
            or module.weight.dim() != 2:
        return module
    d_in, d_out = module.weight.shape
    linear = nn.Linear(d_in, d_out, bias=module.bias is not None, device="meta")
    linear.weight = nn.Parameter(module.weight.detach().t().contiguous(), requires_grad=False)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.detach(), requires_grad=False)
    return linear


def _base_samples(layers: Sequence[nn.Module]) -> torch.Tensor:
    """``[len(layers), BASE_SAMPLES]`` fp32: evenly spaced entries of each base weight."""
    rows = []
    for layer in layers:
        w = layer.base_layer.weight.detach().reshape(-1)
        idx = torch.linspace(0, w.numel() - 1, BASE_SAMPLES, device=w.device).long()
        rows.append(w[idx].float().cpu())
    return torch.stack(rows)


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
        backend: :mod:`datalora.ops` backend of every :class:`AdapterMixLinear`.
    """

    centroids: torch.Tensor | None  # a buffer (registered in __init__)

    def __init__(self, model: nn.Module, adapters: Sequence[str | Path | LoRAAdapter]
                 | Mapping[str, tuple[torch.Tensor, torch.Tensor]], *,
                 names: Sequence[str] | None = None, centroids: torch.Tensor | None = None,
                 tau: float = 0.1, mode: str = "token", every_n: int = 2,
                 top_k: int | None = None, embedder: Any = None, backend: str = "auto"):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        if embedder is not None and not all(callable(getattr(embedder, method, None))
                                            for method in ("prefix_embeddings", "stream")):
            raise TypeError(f"embedder: expected a HiddenStateEmbedder, a SentenceEmbedder or "
                            f"an object with their prefix_embeddings() and stream() methods, "
                            f"got {type(embedder).__name__}")
        if isinstance(names, (str, bytes)):  # list("abc") would name three adapters
            raise TypeError(f"names: expected a sequence of adapter names, got the string "
                            f"{names!r}")
        if isinstance(adapters, Mapping):
            packed = dict(adapters)
            if names is None:
                raise ValueError("names: required when adapters is a packed mapping")
        else:
            if not isinstance(adapters, (str, Path, Sequence)):
                raise TypeError(f"adapters: expected a sequence of adapter folders or "
                                f"LoRAAdapter objects, or a packed mapping, got "
                                f"{type(adapters).__name__}")
            if isinstance(adapters, (str, Path)) or not len(adapters):
                raise ValueError("adapters: expected a non-empty sequence of adapter folders")
            loaded = [a if isinstance(a, LoRAAdapter) else load_peft_adapter(a)
                      for a in adapters]
            for adapter in loaded:
                biased = trained_biases(model, adapter)
                if biased:
                    raise ValueError(
                        f"adapters: {adapter.name!r} was saved with trained biases "
                        f"(bias={adapter.config.get('bias')!r}) in {len(biased)} modules, e.g. "
                        f"{biased[0]!r}; the mixer mixes lora_A / lora_B only and would drop "
                        f"them. Train the adapter with bias='none'.")
                foreign = foreign_base_weights(model, adapter)
                if foreign:
                    diffs = ", ".join(f"{m}: max |diff| {d:.3g}" for m, d in foreign.items())
                    warnings.warn(
                        f"adapters: {adapter.name!r} holds copies of base weights that differ "
                        f"from this model's ({diffs}): it was trained on another base model. "
                        f"The mixer keeps this model's weights; PEFT would load the copies, "
                        f"so the two would disagree.", UserWarning, stacklevel=2)
            _warn_mixed_bases(loaded)
            names = names or [a.name for a in loaded]
            packed = pack_adapters(loaded)
            self.adapter_paths = [a.path for a in loaded]
        names = list(names)
        if not all(isinstance(n, str) for n in names):
            raise TypeError(f"names: expected adapter names (strings), got {names}")
        N = _check_packed(packed)
        if len(names) != N or len(set(names)) != N:
            raise ValueError(f"names: expected {N} distinct names, got {names}")
        top_k = check_int("top_k", N if top_k is None else top_k, low=1, high=N)
        every_n = _check_mode(mode, every_n)
        tau = check_number("tau", tau, low=0, low_inclusive=False)
        if centroids is not None:
            if not isinstance(centroids, torch.Tensor) or centroids.dim() != 2 \
                    or centroids.shape[0] != N:
                raise ValueError(f"centroids: expected a [{N}, D] tensor (one row per adapter), "
                                 f"got {getattr(centroids, 'shape', type(centroids).__name__)}")
            if not bool(torch.isfinite(centroids).all()):
                raise ValueError("centroids: expected finite values, got NaN or inf")
            width = _embedding_width(model, embedder)
            if width is not None and centroids.shape[1] != width:
                raise ValueError(f"centroids: expected [{N}, {width}] (the context "
                                 f"embedding's width), got {tuple(centroids.shape)}")
        self.model, self.names, self.tau, self.mode, self.every_n = model, names, tau, mode, every_n
        self.top_k, self.num_adapters = top_k, N
        self.embedder = embedder if embedder is not None else HiddenStateEmbedder()
        self._slot = _RoutingSlot(top_k)
        self.register_buffer("centroids", None if centroids is None else centroids.float())
        self.last_weights: torch.Tensor | None = None
        bases = {}  # every module checked before any is replaced: a failure leaves the
        for module, (A, B) in packed.items():  # caller's model untouched
            try:
                base = model.get_submodule(module)
            except AttributeError as exc:
                raise ValueError(f"adapters: module {module!r} is not in the model") from exc
            if isinstance(base, AdapterMixLinear):
                raise ValueError(f"model: module {module!r} is already mixed by a "
                                 f"TokenLevelAdapterMixer (it replaces the model's layers in "
                                 f"place); build each mixer on a fresh copy of the base model")
            base = _as_linear(base)
            if not isinstance(base, nn.Linear) or isinstance(base, MoLoRALinear):
                raise ValueError(f"adapters: module {module!r} is a {type(base).__name__}, "
                                 f"expected a plain nn.Linear (or GPT-2's Conv1D)")
            if (B.shape[1], A.shape[2]) != (base.out_features, base.in_features):
                raise ValueError(f"adapters: module {module!r} is [{base.out_features}, "
                                 f"{base.in_features}] in the model but [{B.shape[1]}, "
                                 f"{A.shape[2]}] in the adapters")
            bases[module] = base
        model.requires_grad_(False)
        dtype = next(model.parameters()).dtype
        self.modules_mixed = []
        for module, (A, B) in packed.items():
            base = bases[module]
            parent, _, child = module.rpartition(".")
            layer = AdapterMixLinear(base, A.to(dtype), B.to(dtype), top_k, self._slot, backend)
            setattr(model.get_submodule(parent) if parent else model, child, layer)
            self.modules_mixed.append(module)

    def _apply(self, fn, recurse=True):
        """Module-wide casts (``.to(torch.bfloat16)``) leave the centroids fp32: routing
        compares them in fp32, and a rounded copy would be saved and never recovered."""
        centroids = self.centroids
        out = super()._apply(fn, recurse)
        if centroids is not None and self.centroids.dtype in (torch.float16, torch.bfloat16):
            self.centroids = centroids.to(self.centroids.device, torch.float32)
        return out

    # ---- helpers
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def _vocab_size(self) -> int:
        """Token ids the base model embeds (ids from 0 to this - 1)."""
        return self.model.get_input_embeddings().num_embeddings

    def mix_layers(self) -> Iterator[AdapterMixLinear]:
        return (m for m in self.model.modules() if isinstance(m, AdapterMixLinear))

    @contextmanager
    def adapters_disabled(self) -> Iterator[None]:
        """Runs the exact base model inside the block, in this thread only (the embedder's
        base pass opens one while other threads may be mixing); blocks nest."""
        with self._slot.base_only_block():
            yield

    @contextmanager
    def fixed_weights(self, weights: Sequence[float] | torch.Tensor) -> Iterator[None]:
        """Every token of every forward inside the block mixes with ``weights [N]``."""
        try:
            w = torch.as_tensor(weights, dtype=torch.float32, device=self.device).reshape(-1)
        except (TypeError, ValueError):  # e.g. a string: "new(): invalid data type 'str'"
            raise TypeError(f"weights: expected {self.num_adapters} numbers (a sequence or a "
                            f"tensor), got {weights!r}") from None
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
                      pooling: str = "context", progress: bool = False) -> torch.Tensor:
        """Sets ``centroids [N, D]``: per adapter, the mean of its example texts'
        L2-normalised embeddings.

        Args:
            prompts: per adapter, example texts (prompts, or whole examples with their
                responses for ``"positions"``), as a list in adapter order or by name.
            pooling: ``"context"`` (default) pools each example exactly as the routing
                pools the context (the embedder's ``window`` / ``decay`` applied at the
                text's last token), so centroid and query come from the same distribution;
                ``"whole"`` pools over all the text's tokens, ignoring the recency (without
                recency both are the same); ``"positions"`` averages the context embedding
                at *every* position of each text, the distribution every-token routing
                queries while it reads a prompt and writes an answer. On the embedded
                tasks ``"context"`` scored better than ``"whole"`` on validation in 49 of
                the grid's 63 settings with recency (much better for short windows, which
                mostly see the shared ``### Answer:`` cue), at most 0.214 nats worse in
                the others, and ``"positions"`` trailed it (best selection score 3.191
                vs 3.131; ``benchmarks/results/tle_eval_cpu.json``).
            progress: a progress bar over the batches of all adapters' examples.
        """
        if pooling not in ("whole", "context", "positions"):
            raise ValueError(f"pooling: expected 'whole', 'context' or 'positions', got "
                             f"{pooling!r}")
        batch_size = check_int("batch_size", batch_size, low=1)
        if isinstance(prompts, (str, bytes)):
            raise TypeError("prompts: expected one list of example texts per adapter, got a "
                            "single string")
        if isinstance(prompts, Mapping):
            missing = [n for n in self.names if n not in prompts]
            if missing:
                raise ValueError(f"prompts: no example prompts for adapters {missing}")
            prompts = [prompts[n] for n in self.names]
        if len(prompts) != self.num_adapters or any(not p for p in prompts):
            raise ValueError(f"prompts: expected {self.num_adapters} non-empty lists of "
                             f"example prompts (one per adapter)")
        for name, group in zip(self.names, prompts, strict=True):
            if isinstance(group, (str, bytes)) or not all(isinstance(t, str) for t in group):
                raise TypeError(f"prompts: the examples of adapter {name!r} must be a list of "
                                f"strings, got {type(group).__name__}"
                                + (" (one string: wrap it in a list)"
                                   if isinstance(group, str) else ""))
        embedder = self.embedder
        if pooling == "whole" and hasattr(embedder, "whole_context"):
            embedder = embedder.whole_context()
        from tqdm.auto import tqdm

        centroids = []
        bar = tqdm(total=sum(-(-len(g) // batch_size) for g in prompts), desc="centroids",
                   disable=not progress, leave=False)
        with bar:
            for group in prompts:
                embs = []
                for i in range(0, len(group), batch_size):
                    embs.append(self.embed_texts(list(group[i:i + batch_size]), tokenizer,
                                                 embedder, every_position=pooling == "positions"))
                    bar.update()
                centroids.append(F.normalize(torch.cat(embs), dim=-1).mean(0))
        self.centroids = torch.stack(centroids)
        return self.centroids

    @torch.no_grad()
    def embed_texts(self, texts: list[str], tokenizer: Any, embedder: Any = None, *,
                    every_position: bool = False) -> torch.Tensor:
        """Context embeddings of ``texts`` (``embedder`` default: the mixer's, with its
        recency): ``[n, D]`` at each text's last token, or with ``every_position``
        ``[n_tokens, D]`` at every token of every text (padding dropped)."""
        embedder = self.embedder if embedder is None else embedder
        if not callable(tokenizer):
            raise TypeError(f"tokenizer: expected the model's tokenizer (a callable "
                            f"transformers tokenizer), got {type(tokenizer).__name__}")
        # right padding: the last token of text i is at mask.sum(1) - 1 (and positions
        # start at 0), whatever the tokenizer's padding_side; encoded as prompts are for
        # generation (without an EOS the tokenizer appends to every text)
        batch = prompt_inputs(tokenizer, texts, self.device, padding=True,
                              padding_side="right")
        mask = batch["attention_mask"]
        empty = (mask.sum(1) == 0).nonzero().flatten().tolist()
        if empty:  # no BOS added: an empty text has no token, so no context embedding
            raise ValueError(f"texts: {texts[empty[0]]!r} encodes to no token (the tokenizer "
                             f"adds no BOS); every example text needs at least one token")
        high = int(batch["input_ids"].max())
        if high >= self._vocab_size:  # F.embedding: "IndexError: index out of range"
            raise ValueError(f"tokenizer: produced token id {high} >= the model's vocabulary "
                             f"size {self._vocab_size} (a tokenizer of another model?)")
        if not every_position:
            last = (mask.sum(1) - 1).reshape(-1, 1)
            return embedder.prefix_embeddings(self, batch["input_ids"], mask, last)[:, 0]
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        embs = embedder.prefix_embeddings(self, batch["input_ids"], mask, positions)
        return embs[mask.bool()]

    # ---- forward (teacher forcing)
    def routing_for(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    prompt_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, L, N]`` weights of every position under the current mode (right padding:
        a row's prompt ends at its last real token at the latest)."""
        _check_batch(input_ids, attention_mask, self._vocab_size)
        return self._routing(input_ids, attention_mask, prompt_lengths)

    def _routing(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 prompt_lengths: torch.Tensor | None) -> torch.Tensor:
        """:meth:`routing_for` of a batch already checked (one host sync per forward)."""
        B, L = input_ids.shape
        if attention_mask is not None:
            _check_right_padding(attention_mask)
        lengths = (torch.full((B,), L, device=input_ids.device) if attention_mask is None
                   else attention_mask.bool().sum(1).to(input_ids.device))
        if prompt_lengths is None:
            prompt_lengths = lengths
        prompt_lengths = torch.as_tensor(prompt_lengths, device=input_ids.device)
        if prompt_lengths.shape != (B,):
            raise ValueError(f"prompt_lengths: expected shape [{B}] (one per row), got "
                             f"{tuple(prompt_lengths.shape)}")
        if prompt_lengths.is_floating_point() or bool((prompt_lengths < 1).any()):
            raise ValueError(f"prompt_lengths: expected integers >= 1 (a prompt has a token), "
                             f"got {prompt_lengths.tolist()}")
        prompt_lengths = torch.minimum(prompt_lengths, lengths)
        anchors = anchor_positions(prompt_lengths, L, self.mode, self.every_n)
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
            weights: ``[N]`` or ``[B, L, N]`` mixing weights that replace the routing
                (default inside :meth:`fixed_weights`: those weights). Needed after a
                filled KV cache (``past_key_values``): routing needs the whole context.

        Returns:
            The model's output (``logits [B, L, V]``, ``loss``).
        """
        _check_batch(input_ids, attention_mask, self._vocab_size, labels)
        B, L = input_ids.shape
        if weights is None and self._slot.weights is not None:
            weights = self._slot.weights  # inside fixed_weights(): no routing, as generate
        past = kwargs.get("past_key_values", kwargs.get("cache"))
        if weights is None and past is not None and (
                past.get_seq_length() > 0 if hasattr(past, "get_seq_length") else len(past)):
            raise ValueError("past_key_values: a forward's routing needs the whole context "
                             "(input_ids from position 0), not the tokens after a filled "
                             "cache; continue a sequence with generate(), or pass weights=")
        if weights is None:
            if prompt_lengths is None and labels is not None:
                valid = labels != -100
                first = torch.where(valid.any(1), valid.float().argmax(1),
                                    torch.full((B,), L, device=labels.device))
                prompt_lengths = first.clamp(1, L)
            weights = self._routing(input_ids, attention_mask, prompt_lengths)
        weights = torch.as_tensor(weights, dtype=torch.float32, device=input_ids.device)
        if weights.dim() == 1:
            weights = weights.expand(B, L, -1)
        if weights.shape != (B, L, self.num_adapters):
            raise ValueError(f"weights: expected [{self.num_adapters}] or [{B}, {L}, "
                             f"{self.num_adapters}], got {tuple(weights.shape)}")
        if not bool(torch.isfinite(weights).all()):
            raise ValueError("weights: expected finite values, got NaN or inf")
        self.last_weights = weights
        previous = self._slot.weights
        self._slot.set(weights.reshape(B * L, -1))
        try:
            return self.model(input_ids=input_ids, attention_mask=attention_mask,
                              labels=labels, **kwargs)
        finally:
            self._slot.set(previous)

    # ---- generation
    # the result's type follows return_details (one union made every caller narrow it)
    @overload
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = ..., *,
                 eos_token_id: int | Sequence[int] | torch.Tensor | None = ...,
                 do_sample: bool = ..., temperature: float = ...,
                 generator: torch.Generator | None = ...,
                 attention_mask: torch.Tensor | None = ...,
                 return_details: Literal[False] = ...) -> torch.Tensor: ...

    @overload
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = ..., *,
                 eos_token_id: int | Sequence[int] | torch.Tensor | None = ...,
                 do_sample: bool = ..., temperature: float = ...,
                 generator: torch.Generator | None = ...,
                 attention_mask: torch.Tensor | None = ...,
                 return_details: Literal[True]) -> dict[str, Any]: ...

    @overload
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = ..., *,
                 eos_token_id: int | Sequence[int] | torch.Tensor | None = ...,
                 do_sample: bool = ..., temperature: float = ...,
                 generator: torch.Generator | None = ...,
                 attention_mask: torch.Tensor | None = ...,
                 return_details: bool) -> torch.Tensor | dict[str, Any]: ...

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 32, *,
                 eos_token_id: int | Sequence[int] | torch.Tensor | None = None,
                 do_sample: bool = False, temperature: float = 1.0,
                 generator: torch.Generator | None = None,
                 attention_mask: torch.Tensor | None = None,
                 return_details: bool = False) -> torch.Tensor | dict[str, Any]:
        """Greedy / sampled generation with the routing updated per the mode (KV cache).

        One sequence at a time (no batch, beams or top-p: the routing follows one
        context). Inside :meth:`fixed_weights` every step mixes with those weights.

        Args:
            input_ids: ``[1, P]`` integer prompt (one sequence, no padding).
            max_new_tokens: tokens to generate at most.
            eos_token_id: stop after generating this token (an id, or several ids: any of
                them); default the model's ``generation_config.eos_token_id``, as
                ``transformers``' ``generate``; ``[]`` never stops early.
            return_details: also return the step logits ``[n, V]``, the weights used at
                each step ``[n, N]`` and the recompute count.
            attention_mask: optional ``[1, P]`` mask of ones (what a tokenizer returns with
                the ids, so ``mixer.generate(**prompt_inputs(tokenizer, text))`` works;
                :func:`~datalora.data.prompt_inputs` leaves out the EOS some tokenizers
                append to every text, which would end the prompt); padding is refused.

        Returns:
            ``[1, P + n]`` token ids, or a dict with ``sequences``, ``logits``,
            ``weights``, ``recomputes``.
        """
        from transformers import DynamicCache

        if not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point() \
                or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids: expected an integer tensor, got "
                            f"{getattr(input_ids, 'dtype', type(input_ids).__name__)}")
        if input_ids.dim() != 2 or input_ids.shape[0] != 1 or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids: expected shape [1, P >= 1], got "
                             f"{tuple(input_ids.shape)}")
        if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
            raise TypeError(f"attention_mask: expected a torch.Tensor or None, got "
                            f"{type(attention_mask).__name__}")
        if attention_mask is not None and (
                tuple(attention_mask.shape) != tuple(input_ids.shape)
                or not bool((attention_mask == 1).all())):
            raise ValueError(f"attention_mask: expected ones of shape {tuple(input_ids.shape)} "
                             f"(generate takes one sequence without padding)")
        max_new_tokens = check_int("max_new_tokens", max_new_tokens, low=1)
        do_sample = check_flag("do_sample", do_sample)  # bool("no") is True
        return_details = check_flag("return_details", return_details)
        if do_sample:  # a one-value tensor / numpy number worked before the check: still does
            temperature = check_number("temperature", as_scalar(temperature), low=0,
                                       low_inclusive=False)
        stop = self._stop_ids(eos_token_id)
        ids = input_ids.to(self.device)
        P = ids.shape[1]
        tokens = ids[0].tolist()  # the prompt's range checked on the host, once per call
        _check_id_range(min(tokens), max(tokens), self._vocab_size)
        fixed = self._slot.weights  # set by fixed_weights(): no routing
        previous = fixed
        if fixed is None:
            stream = self.embedder.stream(self)
            stream.extend(tokens)
            w = self.weights_for(stream.embedding())
            recomputes = 1
        else:
            w, recomputes = fixed, 0
        cache = DynamicCache()
        self._slot.set(w)
        steps_logits, steps_weights = [], []
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
                if nxt in stop or i == max_new_tokens - 1:
                    break
                if fixed is None:
                    stream.extend([nxt])
                t = P + i  # position of the token just generated
                if fixed is None and self._recompute_at(t, P):
                    w = self.weights_for(stream.embedding())
                    recomputes += 1
                    self._slot.set(w)
                out = self.model(input_ids=torch.tensor([[nxt]], device=self.device),
                                 use_cache=True, **cache_kwargs(self.model, cache))
        finally:
            self._slot.set(previous)
        sequences = torch.tensor([tokens], device=self.device)
        if not return_details:
            return sequences
        return {"sequences": sequences, "logits": torch.stack(steps_logits),
                "weights": torch.stack(steps_weights), "recomputes": recomputes}

    def _stop_ids(self, eos_token_id: Any) -> frozenset[int]:
        """The ids that end generation: ``eos_token_id`` as an int, a sequence of ints or
        an integer tensor; None: the model's ``generation_config.eos_token_id``."""
        given = eos_token_id is not None
        if not given:
            config = getattr(self.model, "generation_config", None)
            eos_token_id = getattr(config, "eos_token_id", None)
            if eos_token_id is None:
                return frozenset()
        if isinstance(eos_token_id, torch.Tensor):
            if eos_token_id.is_floating_point() or eos_token_id.dim() > 1:
                raise TypeError(f"eos_token_id: expected integer ids, got a "
                                f"{eos_token_id.dtype} tensor of shape "
                                f"{tuple(eos_token_id.shape)}")
            eos_token_id = eos_token_id.reshape(-1).tolist()
        ids = [eos_token_id] if not isinstance(eos_token_id, (list, tuple, set, frozenset)) \
            else list(eos_token_id)
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, numbers.Integral):
                raise TypeError(f"eos_token_id: expected an int or a sequence of ints, got "
                                f"{eos_token_id!r}")
        outside = [int(i) for i in ids if given and not 0 <= i < self._vocab_size]
        if outside:  # never generated (another tokenizer's id?): no stop, silently
            raise ValueError(f"eos_token_id: expected ids in [0, {self._vocab_size}) (the "
                             f"model's vocabulary), got {outside[0]}")
        return frozenset(int(i) for i in ids)

    def _recompute_at(self, t: int, prompt_length: int) -> bool:
        if self.mode == "token":
            return True
        if self.mode == "prompt":
            return False
        return (t - (prompt_length - 1)) % self.every_n == 0

    # ---- save / load
    def save_pretrained(self, directory: str | Path) -> None:
        """Writes the padded experts, centroids and settings (self-contained)."""
        check_path_like("directory", directory)
        check_output_folder("directory", directory)
        directory = Path(directory)
        tensors: dict[str, torch.Tensor] = {}
        for module, layer in zip(self.modules_mixed, self._layers_by_name(), strict=True):
            tensors[f"{module}.lora_A"] = layer.lora_A
            tensors[f"{module}.lora_B"] = layer.lora_B
        if self.centroids is not None:
            tensors["centroids"] = self.centroids
        tensors["base_samples"] = _base_samples(self._layers_by_name())
        config = {"names": self.names, "tau": self.tau, "mode": self.mode,
                  "every_n": self.every_n, "top_k": self.top_k, "modules": self.modules_mixed,
                  "embedder": self.embedder.spec() if hasattr(self.embedder, "spec")
                  else {"type": "custom"},
                  "adapter_paths": getattr(self, "adapter_paths", None)}
        text = json.dumps(config, indent=1)
        # the config rides in the weights file too: a save interrupted between the two
        # writes leaves a pair from_pretrained recognises as mismatched
        save_tensors(tensors, directory / MIXER_WEIGHTS, metadata={
            "format": "pt", "adapter_type": "lora-tle", "tle_config": text})
        atomic_write_text(directory / MIXER_CONFIG, text)

    def _layers_by_name(self) -> list[AdapterMixLinear]:
        return [self.model.get_submodule(m) for m in self.modules_mixed]

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | Path, *,
                        embedder: Any = None, lm_tokenizer: Any = None,
                        **overrides: Any) -> TokenLevelAdapterMixer:
        """Rebuilds a saved mixer on a fresh copy of its base ``model``.

        A sentence-embedder mixer needs ``lm_tokenizer`` (or pass ``embedder``);
        ``overrides`` replace saved settings (``tau``, ``mode``, ``every_n``, ``top_k``,
        and the rebuilt embedder's ``window`` / ``decay`` / ``whole_weight``).
        """
        check_path_like("directory", directory)
        directory = Path(directory)
        if not (directory / MIXER_CONFIG).is_file():
            raise FileNotFoundError(f"directory: no {MIXER_CONFIG} in {directory}")
        config = _read_saved_config(directory / MIXER_CONFIG)
        if not (directory / MIXER_WEIGHTS).is_file():
            raise FileNotFoundError(f"directory: no {MIXER_WEIGHTS} in {directory}")
        embedded = load_metadata(directory / MIXER_WEIGHTS, argument="directory").get(
            "tle_config")
        tensors = load_tensors(directory / MIXER_WEIGHTS, argument="directory")
        missing = [f"{m}.{ab}" for m in config["modules"] for ab in ("lora_A", "lora_B")
                   if f"{m}.{ab}" not in tensors]
        if (embedded is not None and _json_or_none(embedded) != config) or missing:
            raise ValueError(f"directory: {MIXER_CONFIG} does not match {MIXER_WEIGHTS} in "
                             f"{directory}" + (f" (no tensor {missing[0]})" if missing else "")
                             + " (a save interrupted between the two files?); save the "
                               "mixer again")
        packed = {m: (tensors[f"{m}.lora_A"], tensors[f"{m}.lora_B"])
                  for m in config["modules"]}
        for name in (f"{m}.{ab}" for m in config["modules"] for ab in ("lora_A", "lora_B")):
            check_saved_weight("directory", name, tensors[name], directory / MIXER_WEIGHTS)
        recency = {k: overrides.pop(k) for k in ("window", "decay", "whole_weight")
                   if k in overrides}
        if embedder is None:
            spec = config["embedder"]
            window = recency.get("window", spec.get("window"))
            decay = recency.get("decay", spec.get("decay"))
            whole_weight = recency.get("whole_weight", spec.get("whole_weight"))
            if spec["type"] in ("hidden", "sentence"):
                embedder = _rebuilt_embedder(spec, recency, window, decay, whole_weight,
                                             "centroids" in tensors, lm_tokenizer)
            else:
                raise ValueError("embedder: the mixer was saved with a custom embedder; "
                                 "pass embedder=")
        elif recency:
            raise ValueError(f"{next(iter(recency))}: set it on the embedder you pass")
        settings = {k: config[k] for k in ("tau", "mode", "every_n", "top_k")}
        settings.update(overrides)
        try:
            mixer = cls(model, packed, names=config["names"],
                        centroids=tensors.get("centroids"), embedder=embedder, **settings)
        except ValueError as exc:
            message = str(exc)  # the shapes of another base (not a wrapped / adapted one)
            if not (message.startswith("centroids: expected [") or (
                    message.startswith("adapters: module") and " in the model but " in message)):
                raise
            raise ValueError(f"model: not the base model the mixer in {directory} was saved "
                             f"with (its {exc}); load it on that base model") from exc
        mixer.adapter_paths = config.get("adapter_paths")
        saved = tensors.get("base_samples")
        if saved is not None:
            now = _base_samples(mixer._layers_by_name())
            # rtol: the same base loaded in another dtype (bf16 rounds to 2^-8)
            if saved.shape != now.shape or not torch.allclose(saved, now, rtol=1e-2,
                                                              atol=1e-6):
                warnings.warn(f"model: its weights differ from those of the base model the "
                              f"mixer in {directory} was saved with; the adapters were "
                              f"trained on another base", UserWarning, stacklevel=2)
        return mixer.to(mixer.device)
