"""The hooks that run the saliency network, share its routing and prune tokens in a forward
(:class:`DATALORARuntime`), and what one forward decided (:class:`ForwardRecord`)."""

from __future__ import annotations

import copy
import functools
import math
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from datalora import ops
from datalora.checks import check_number
from datalora.hf_compat import cache_of
from datalora.layers import MoLoRALinear
from datalora.ops.backends import warn_once
from datalora.pruning.cache_state import (
    _CACHE_CONTEXT_ATTR,
    _CACHE_KEEP_ATTR,
    _dynamic_cache_types,
    _each_tensor,
    _follow_cache_rows,
    _foreign_cache_error,
    _mask_sizes,
)
from datalora.pruning.decoder import (
    _ROUTER_LOGITS_ERROR,
    _gather_rows,
    _parameter_names,
    _per_token,
    check_prunable,
    check_prune_range,
    find_decoder_layers,
    resolve_prune_range,
)
from datalora.pruning.selection import (
    TokenSelection,
    _keep_threshold,
    compiled_width_fraction,
    packed_attention_mask,
    select_tokens,
)
from datalora.routing import Routing
from datalora.saliency import SaliencyOutput, UnifiedSaliencyNetwork, gather_routing


def _refuse_capture(tensor: torch.Tensor, what: str) -> None:
    """ValueError instead of a CUDA error when ``what`` (a host read) would run inside a
    CUDA graph capture."""
    if tensor.is_cuda and torch.cuda.is_current_stream_capturing():
        raise ValueError(f"CUDA graph capture: {what} reads the device on the host, which a "
                         f"capture cannot do; capture a training-mode forward instead")


def _warn(message: str, stacklevel: int) -> None:
    """``warnings.warn(message)`` (a UserWarning) reported ``stacklevel`` frames up from the
    caller; under torch.compile the trace-time warning of
    :func:`~datalora.ops.backends.warn_once` (dynamo cannot trace ``warnings.warn``: a graph
    break, an error under ``fullgraph=True``), once per process there, not per runtime."""
    if torch.compiler.is_compiling():
        warn_once(message, category=UserWarning)
    else:
        warnings.warn(message, stacklevel=stacklevel + 1)


@dataclass
class ForwardRecord:
    """What one forward decided (read by the trainer for losses and logs).

    Attributes:
        saliency: the USN output (``token_scores [B, L]``, routing over ``B*L``).
        valid: ``[B, L]`` bool real tokens of this forward.
        keep_prob: ``[B, L]`` ``sigmoid(score)`` (differentiable).
        kept: ``[B, L]`` bool tokens that ran through the pruned range.
        mode: ``"dense"``, ``"packed"`` (also a cached forward of several tokens) or
            ``"masked"`` (the other cached forwards).
    """

    saliency: SaliencyOutput
    valid: torch.Tensor
    keep_prob: torch.Tensor
    kept: torch.Tensor
    mode: str

    @property
    def routing(self) -> Routing:
        return self.saliency.routing

    def actual_retention(self) -> float:
        return float(self.kept[self.valid].float().mean()) if self.valid.any() else 1.0


@dataclass(eq=False)  # compared and hashed by identity (a WeakSet member)
class _Context:
    attention_mask: torch.Tensor | None
    cache: Any
    mode: str = "dense"
    routing: Routing | None = None
    record: ForwardRecord | None = None
    hidden_in: torch.Tensor | None = None
    selection: TokenSelection | None = None
    keep_q: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    # id -> (a per-token input of the packed layers, its kept rows): one gather per tensor
    gathered: dict[int, tuple[Any, Any]] = field(default_factory=dict)
    # attention mask per window of the pruned layers (None: full attention)
    masks: dict[int | None, torch.Tensor] = field(default_factory=dict)
    threshold: float | None = None  # keep_threshold, read once per forward
    # decides token by token (generate() or a cache): no per-sequence top-k in eval
    stepwise: bool = False
    # the pruned range's layers carrying a _SkippableForward for this forward (a cached one,
    # not under compile, no attention maps returned: a skipped layer computes none); they
    # may be skipped when every row of a step is pruned
    skippable_layers: list[nn.Module] = field(default_factory=list)
    # this step skips them: each appends placeholder keys / values to ``skip_cache``
    skip_cache: Any = None
    # a packed prefill: the pruned layers write the cache through this (and its kwarg name)
    prefill_cache: tuple[str, _PackedPrefillCache] | None = None


class _PackedPrefillCache:
    """The KV cache a pruned-range decoder layer writes in a packed prefill (a cached forward
    of several tokens: a prompt, a chunk of one, or assisted decoding's draft): the layer
    runs on the kept tokens only, and its ``update`` spreads their keys / values ``[B, H,
    K, D]`` to their positions of the chunk ``[B, H, L, D]``, zeros at the pruned ones
    (and at filler slots), before the real cache appends them; the pruned positions' keys
    are masked from every later query, as in the unpacked (masked) forward, whose cache
    holds the same positions. The layer attends to the keys the cache held before the
    chunk followed by the chunk's packed ones ``[B, H, P + K, D]``, not the whole chunk.
    Anything else is read from the real cache."""

    __slots__ = ("cache", "_index", "_valid", "_length")

    def __init__(self, cache: Any, keep_idx: torch.Tensor, valid: torch.Tensor, length: int):
        self.cache, self._index, self._valid, self._length = cache, keep_idx, valid, length

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self.cache.update(self._spread(key_states), self._spread(value_states),
                                         *args, **kwargs)
        past = keys.shape[2] - self._length  # the keys held before this chunk (a window's)
        if past == 0:
            return key_states, value_states
        return (torch.cat([keys[:, :, :past], key_states], 2),
                torch.cat([values[:, :, :past], value_states], 2))

    def _spread(self, states: torch.Tensor) -> torch.Tensor:
        bsz, heads, width, dim = states.shape
        index = self._index[:, None, :, None].expand(bsz, heads, width, dim)
        kept = torch.where(self._valid[:, None, :, None], states, 0)
        return states.new_zeros(bsz, heads, self._length, dim).scatter_(2, index, kept)

    def __getattr__(self, name: str) -> Any:
        if name in _PackedPrefillCache.__slots__:  # not set yet (a copy being built)
            raise AttributeError(name)
        return getattr(self.cache, name)


class _SkippableForward:
    """The forward cached DATALORA forwards put on each decoder layer of the pruned range
    while any of them runs (an instance attribute, called by ``nn.Module.__call__`` between
    the layer's hooks; removed when the last of them ends, see
    :meth:`DATALORARuntime._put_skippable_forwards`): :meth:`DATALORARuntime._skip_or_run`,
    which skips only in the calling thread's forward. Holds the layer weakly (the layer
    holds this while it is set); a model pickled or deep-copied while another thread runs
    it gets one bound to its own layer and runtime (it runs the layer's forward until a
    cached forward of the copy replaces it)."""

    __slots__ = ("runtime", "_layer")

    def __init__(self, runtime: DATALORARuntime, layer: nn.Module):
        self.runtime = runtime
        self._layer = weakref.ref(layer)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.runtime._skip_or_run(self._layer(), *args, **kwargs)

    def __reduce__(self):
        return _SkippableForward, (self.runtime, self._layer())

    def __deepcopy__(self, memo: dict) -> _SkippableForward:
        return _SkippableForward(copy.deepcopy(self.runtime, memo),
                                 copy.deepcopy(self._layer(), memo))


GRADIENT_CHECKPOINTING_REFUSED = (
    "gradient_checkpointing: not supported with the DATALORA saliency / pruning hooks "
    "(recomputation would re-run them, drawing other keep decisions); disable it, or build "
    "the model with routing='per_layer' (no saliency network or pruning), which supports it")


class _Scored(Exception):
    """Stops a forward of :meth:`DATALORARuntime.score_tokens` once the tokens are scored."""


def _activation_checkpointing(module: nn.Module) -> bool:
    """Whether ``module`` (a decoder stack) recomputes layers in its backward: transformers'
    ``is_activation_checkpointing`` (``is_gradient_checkpointing`` before 5.x). It scans
    every submodule, so it is asked in training forwards only."""
    checkpointing = getattr(module, "is_activation_checkpointing", None)
    if checkpointing is None:
        checkpointing = getattr(module, "is_gradient_checkpointing", False)
    return bool(checkpointing)


class DATALORARuntime:
    """Installs the shared-routing + pruning hooks on a HF causal LM.

    Args:
        model: the (MoLoRA-injected) causal LM.
        saliency: the :class:`UnifiedSaliencyNetwork`.
        prune_layers: ``[start, end)`` (None: second half of the decoder layers).
        retention: initial retention (the curriculum sets it); 1.0 disables pruning.
        keep_last: always keep each sequence's last real token in top-k selection.
        target_retention: the retention the curriculum anneals to: under ``torch.compile``
            the packed width follows :func:`compiled_width_fraction` towards it, so the
            annealing recompiles :data:`~datalora.pruning.selection.COMPILED_WIDTH_STEPS`
            times, not every step. None: the width follows the retention exactly (eager mode
            always does).

    Attributes:
        retention, target_retention, last (the :class:`ForwardRecord` of the latest
        forward), start, end.

    The model and its decoder layers hold this runtime through their hooks, so the runtime
    refers to the model weakly (:attr:`model`; :attr:`layers` are found in it): a deleted
    model is freed by reference counting, without waiting for Python's cyclic garbage
    collector.
    """

    def __init__(self, model: nn.Module, saliency: UnifiedSaliencyNetwork,
                 prune_layers: list[int] | None = None, retention: float = 1.0,
                 keep_last: bool = True, target_retention: float | None = None):
        self.saliency = saliency
        self._model = weakref.ref(model)
        check_prunable(model)
        self.start, self.end = resolve_prune_range(prune_layers, len(self.layers))
        self._target_retention = None
        self.retention = 1.0
        self.set_retention(retention)
        self.target_retention = target_retention
        # False while the model's adapters are off: the pruned layers run dense (the base)
        self.pruning_enabled = True
        self.keep_last = keep_last
        self.last: ForwardRecord | None = None
        self._local = threading.local()  # the forward in progress, one per thread
        # decoder layer -> the contexts of the cached forwards (of any thread) running with
        # its skipping forward: weak both ways, so that a forward that never ended (Ctrl-C:
        # torch skips always_call hooks on a KeyboardInterrupt) stops counting once its
        # thread drops the context, and no layer is kept alive
        self._skippable_users = weakref.WeakKeyDictionary()
        self._skippable_lock = threading.Lock()
        self._warned = False
        self._warned_train_cache = False
        self.threshold_calibrated_for(None)
        config = getattr(model, "config", None)
        # sliding window of each pruned layer (None: full attention); its mask is built per window
        self.windows = check_prune_range(config, self.layers, self.start, self.end)
        self._forward_parameters = {i: _parameter_names(type(self.layers[i]))
                                    for i in range(self.start, self.end)}
        # decoder-layer class -> whether its forward returned a plain tensor (a skipped
        # layer returns one)
        self._returns_tensor: dict[type, bool] = {}
        self._handles = self._install()

    # ------------------------------------------------------------------ state

    @property
    def model(self) -> nn.Module:
        """The causal LM the hooks are installed on."""
        return self._model()

    @property
    def layers(self) -> nn.ModuleList:
        """The model's decoder layers (found again on each use: a replaced layer list
        stays reachable)."""
        return find_decoder_layers(self.model)

    def __getstate__(self):
        # ``last`` / the forward context hold non-leaf tensors of the latest forward, which
        # copy.deepcopy (of the DATALORAModel holding this runtime) refuses; the model goes
        # in as an object, so that a copy refers to the copied model
        state = self.__dict__.copy()
        state["last"] = state["_local"] = state["_skippable_lock"] = None
        state["_skippable_users"] = None  # forwards in progress elsewhere are not the copy's
        state["_model"] = self.model
        return state

    def __setstate__(self, state) -> None:
        state.setdefault("_target_retention", None)  # a runtime pickled before it existed
        state.setdefault("_compiled_width", state["retention"])
        state.setdefault("_returns_tensor", {})
        state["_skippable_users"] = weakref.WeakKeyDictionary()
        self.__dict__.update(state)
        model = state["_model"]
        self._model = (lambda: None) if model is None else weakref.ref(model)
        self._local = threading.local()
        self._skippable_lock = threading.Lock()

    @property
    def attn_implementation(self) -> str:
        """The model's attention implementation now (``set_attn_implementation`` may change
        it after the model was wrapped)."""
        config = getattr(self.model, "config", None)
        return getattr(config, "_attn_implementation", None) or "eager"

    @property
    def own_last(self) -> ForwardRecord | None:
        """The :class:`ForwardRecord` of this thread's latest forward (:attr:`last` is the
        latest of any thread), else :attr:`last` (a forward run in other threads, as
        ``nn.DataParallel``'s replicas run it)."""
        own = getattr(self._local, "last", None)
        return own if own is not None else self.last

    @property
    def _ctx(self) -> _Context | None:
        """The context of this thread's forward in progress (threads serving one model each
        have their own: ``generate`` from a thread pool)."""
        return getattr(self._local, "ctx", None)

    @_ctx.setter
    def _ctx(self, ctx: _Context | None) -> None:
        self._local.ctx = ctx

    def set_retention(self, retention: float) -> None:
        # a number in (0, 1]: float() took the strings "0.5" / "nan" and True
        self.retention = check_number("retention", retention, low=0, low_inclusive=False,
                                      high=1)
        self._update_compiled_width()

    def _update_compiled_width(self) -> None:
        # on the host when the retention or its target changes, not in the forward: dynamo
        # would specialize the retention on it
        self._compiled_width = compiled_width_fraction(self.retention, self._target_retention)

    @property
    def target_retention(self) -> float | None:
        """The retention the curriculum anneals to (None: not known); sets the packed
        width's grid under ``torch.compile`` (:func:`compiled_width_fraction`)."""
        return self._target_retention

    @target_retention.setter
    def target_retention(self, value: float | None) -> None:
        self._target_retention = None if value is None else check_number(
            "target_retention", value, low=0, low_inclusive=False, high=1)
        self._update_compiled_width()

    @property
    def threshold(self) -> float:
        """``saliency.keep_threshold`` as a float (NaN: not calibrated); a host read."""
        buffer = self.saliency.keep_threshold
        _refuse_capture(buffer, "reading keep_threshold")
        return float(buffer)

    def _forward_threshold(self, ctx: _Context) -> float:
        """:attr:`threshold`, read once per forward (each read is a host sync; eval forwards
        and every generated token consult it)."""
        if ctx.threshold is None:
            ctx.threshold = self.threshold
        return ctx.threshold

    def _uncalibrated(self, ctx: _Context) -> bool:
        """Whether ``keep_threshold`` is not calibrated (NaN), where a forward deciding token
        by token needs it (generate() with or without the cache, a cache): the pruned layers
        then run dense, with a warning (once), since a per-sequence top-k is not causal."""
        if not math.isnan(self._forward_threshold(ctx)):
            return False
        if not self._warned:
            _warn("keep_threshold is not calibrated: generation (with or without the KV "
                  "cache) and any forward given use_cache or a cache decide token by token, "
                  "so they run the pruned layers dense (call runtime.calibrate())",
                  stacklevel=2)
            self._warned = True
        return True

    def _threshold_in_use(self, threshold: float) -> float:
        """The calibrated threshold, about to select tokens at eval / generation time; warns
        once when it was calibrated for another retention than the current one (the
        threshold, not the retention, decides what is kept there)."""
        calibrated = self.calibrated_retention
        if (calibrated is not None and abs(calibrated - self.retention) > 1e-6
                and not self._warned_stale):
            _warn(f"keep_threshold was calibrated for retention {calibrated:g}; eval and "
                  f"generation keep the tokens above it (about {calibrated:g} of them), not "
                  f"retention {self.retention:g}: call calibrate() again", stacklevel=3)
            self._warned_stale = True
        return threshold

    def _retention_disables(self, ctx: _Context) -> bool:
        """Retention 1.0 turns pruning off, also where a threshold calibrated for a lower
        retention would otherwise decide (eval / generation): warned once there."""
        if self.retention < 1.0:
            return False
        calibrated = self.calibrated_retention
        if ctx.stepwise and calibrated is not None and calibrated < 1.0 \
                and not self._warned_off:
            _warn(f"keep_threshold was calibrated for retention {calibrated:g}, but the "
                  f"runtime's retention is 1.0, which turns pruning off: "
                  f"set_retention({calibrated:g}) to prune", stacklevel=3)
            self._warned_off = True
        return True

    @contextmanager
    def routing_scope(self, routing: Routing) -> Iterator[None]:
        """Runs MoLoRA layers called by hand (outside a model forward) with ``routing``."""
        previous, self._ctx = self._ctx, _Context(attention_mask=None, cache=None,
                                                  routing=routing)
        try:
            yield
        finally:
            self._ctx = previous

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # ------------------------------------------------------------------ skipped layers

    def _put_skippable_forwards(self, ctx: _Context, model: nn.Module) -> None:
        """Puts a :class:`_SkippableForward` on each decoder layer of ``model`` (the model
        this forward runs: a ``nn.DataParallel`` replica's own) in the pruned range that
        has no instance ``forward`` (accelerate's hooks set one: then no layer skips), or
        counts this forward in where another thread's forward put one; under a lock, so
        that one thread's forward ending never takes away what another's still uses."""
        layers = find_decoder_layers(model)
        if len(layers) < self.end:
            return
        pruned = [layers[i] for i in range(self.start, self.end)]
        with self._skippable_lock:
            for layer in pruned:
                own = layer.__dict__.get("forward")
                if own is not None and not isinstance(own, _SkippableForward):  # one left
                    return  # by a forward that failed before it ended is replaced below
            for layer in pruned:
                users = self._skippable_users.get(layer)
                if not users:  # none, or only forwards that never ended: put a fresh one
                    users = self._skippable_users[layer] = weakref.WeakSet()
                    layer.forward = _SkippableForward(self, layer)
                users.add(ctx)
                ctx.skippable_layers.append(layer)

    def _remove_skippable_forwards(self, ctx: _Context) -> None:
        """Counts this forward out; the last one out removes the layers' forwards."""
        if not ctx.skippable_layers:  # none put (e.g. while compiling: no lock to trace)
            return
        with self._skippable_lock:
            for layer in ctx.skippable_layers:
                users = self._skippable_users.get(layer)
                if users is not None:
                    users.discard(ctx)
                if users:
                    continue
                self._skippable_users.pop(layer, None)
                if isinstance(layer.__dict__.get("forward"), _SkippableForward):
                    del layer.__dict__["forward"]
            ctx.skippable_layers = []

    def _drop_copied_skippable_forwards(self, model: nn.Module) -> None:
        """Removes from ``model``'s pruned layers a skipping forward bound to another layer:
        an ``nn.DataParallel`` replica copies each module's ``__dict__``, so its layers
        carry the original's while another thread's cached forward runs, and a plain
        forward of the replica would run the original layers (on another device)."""
        layers = find_decoder_layers(model)
        for layer in layers[self.start:self.end]:
            own = layer.__dict__.get("forward")
            if isinstance(own, _SkippableForward) and own._layer() is not layer:
                del layer.__dict__["forward"]

    def _layers_write(self, ctx: _Context, cache: Any) -> bool:
        """Whether the pruned layers write ``cache`` in a way this runtime may take over:
        a plain ``DynamicCache``, decoder layer ``i`` carrying this forward's
        :class:`_SkippableForward` and writing cache layer ``i`` (its attention's
        ``layer_idx``)."""
        dynamic_cache, _ = _dynamic_cache_types()
        return (dynamic_cache is not None and type(cache) is dynamic_cache
                and len(ctx.skippable_layers) == self.end - self.start
                and all(getattr(getattr(layer, "self_attn", None), "layer_idx", None) == i
                        for i, layer in enumerate(ctx.skippable_layers, start=self.start)))

    def _skippable(self, ctx: _Context, cache: Any, bsz: int) -> bool:
        """Whether the pruned layers may append placeholder keys / values to ``cache``
        instead of running: :meth:`_layers_write`, the cache's layers for the pruned range
        filled dynamic (or sliding-window) layers of this batch, and each decoder layer,
        when it last ran, returning a plain tensor."""
        if not self._layers_write(ctx, cache):
            return False
        _, cache_layers = _dynamic_cache_types()
        cached = getattr(cache, "layers", None)
        if cached is None or len(cached) < self.end:
            return False
        for i, layer in enumerate(ctx.skippable_layers, start=self.start):
            kv = cached[i]
            keys, values = getattr(kv, "keys", None), getattr(kv, "values", None)
            if not (self._returns_tensor.get(type(layer))
                    and type(kv) in cache_layers
                    and isinstance(keys, torch.Tensor) and isinstance(values, torch.Tensor)
                    and keys.dim() == 4 and values.dim() == 4 and keys.shape[0] == bsz):
                return False
        return True

    def _skip_or_run(self, layer: nn.Module, *args: Any, **kwargs: Any) -> Any:
        """A pruned-range decoder layer's forward in a cached forward. In a step whose every
        row is pruned (:meth:`_skippable`), the layer's output would be replaced by the
        bypass and its keys / values masked from every later query: it appends zeros of
        their shape to its cache layer instead (the positions stay aligned), clears its
        MoLoRA layers' ``last_routing`` (they did not run) and returns a copy of its input
        (a hook may change the output in place). Otherwise it runs the layer's own forward."""
        ctx = self._ctx
        cache = None if ctx is None else ctx.skip_cache
        if cache is None:
            out = type(layer).forward(layer, *args, **kwargs)
            self._returns_tensor[type(layer)] = isinstance(out, torch.Tensor)
            return out
        hidden = args[0] if args else kwargs["hidden_states"]
        index = layer.self_attn.layer_idx
        kv = cache.layers[index]
        seq_len = hidden.shape[1]
        keys = kv.keys.new_zeros(*kv.keys.shape[:2], seq_len, kv.keys.shape[3])
        values = kv.values.new_zeros(*kv.values.shape[:2], seq_len, kv.values.shape[3])
        cache.update(keys, values, index)
        for module in layer.modules():
            if isinstance(module, MoLoRALinear):
                module.__dict__["last_routing"] = None
        return hidden.clone()

    def _install(self) -> list[Any]:
        handles = [self.model.register_forward_pre_hook(self._begin, with_kwargs=True),
                   self.model.register_forward_hook(self._finish, always_call=True),
                   self.layers[0].register_forward_pre_hook(self._run_saliency,
                                                            with_kwargs=True)]
        for i in range(self.start, self.end):
            handles.append(self.layers[i].register_forward_pre_hook(
                functools.partial(self._enter_layer, i), with_kwargs=True))
        # first among the layer's forward hooks: the output_hidden_states recorder (installed
        # lazily by transformers, maybe before these hooks) records the merged output
        handles.append(self.layers[self.end - 1].register_forward_hook(self._leave_range,
                                                                       prepend=True))
        for module in self.model.modules():
            if isinstance(module, MoLoRALinear):
                handles.append(module.register_forward_pre_hook(self._give_routing,
                                                                with_kwargs=True))
        return handles

    # ------------------------------------------------------------------ hooks

    def _begin(self, module, args, kwargs):
        if not torch.compiler.is_compiling() and module is not self.model:
            self._drop_copied_skippable_forwards(module)  # a replica's
        if module.training and _activation_checkpointing(module):
            raise ValueError(GRADIENT_CHECKPOINTING_REFUSED)
        router_logits = kwargs.get("output_router_logits")
        if router_logits is None:
            router_logits = getattr(getattr(module, "config", None), "output_router_logits", False)
        if router_logits:
            raise ValueError(_ROUTER_LOGITS_ERROR)
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1:
            mask = args[1]
        cache = cache_of(kwargs)
        if cache is not None and getattr(cache, "is_compileable", False):
            raise ValueError(f"cache: {type(cache).__name__} (a static / compileable cache) is "
                             f"not supported by the DATALORA hooks; use the default dynamic "
                             f"cache (no cache_implementation='static')")
        if cache is None and kwargs.get("use_cache") is True and module.training \
                and torch.is_grad_enabled():
            # a training forward keeps each sequence's top-k tokens, which the cache path
            # (a threshold, token by token) cannot: it ran the pruned layers dense
            if not self._warned_train_cache:
                _warn("use_cache=True in a training forward: token pruning keeps each "
                      "sequence's top-k, which the KV-cache path cannot, so the forward runs "
                      "with use_cache=False", stacklevel=2)
                self._warned_train_cache = True
            kwargs = {**kwargs, "use_cache": False}
        # generate() always passes use_cache, True or False; a plain forward does not
        stepwise = cache is not None or "use_cache" in kwargs
        if cache is None and kwargs.get("use_cache") is not True:
            kwargs = {**kwargs, "use_cache": False}  # no cache: the packed path
        if mask is not None and mask.dim() != 2:
            raise ValueError(f"attention_mask: expected a [B, L] padding mask, got shape "
                             f"{tuple(mask.shape)} (continuous batching / paged attention, "
                             f"as generate_batch and transformers serve use, packs requests "
                             f"into one row, which the DATALORA hooks do not support: use "
                             f"generate)")
        attentions = kwargs.get("output_attentions")
        if attentions is None:
            attentions = getattr(getattr(module, "config", None), "output_attentions", False)
        ctx = self._ctx = _Context(attention_mask=mask, cache=cache if cache is not None else (
            "new" if kwargs.get("use_cache") else None), stepwise=stepwise)
        if ctx.cache is not None and not attentions and not torch.compiler.is_compiling():
            self._put_skippable_forwards(ctx, module)
        return args, kwargs

    def _finish(self, module, args, output):
        ctx = self._ctx
        if ctx is not None:
            self._remove_skippable_forwards(ctx)
            self.last = self._local.last = ctx.record
            hidden_states = getattr(output, "hidden_states", None)
            if hidden_states is not None and ctx.record is not None \
                    and ctx.record.mode != "dense":
                output.hidden_states = self._carried_hidden_states(ctx, hidden_states)
        self._ctx = None

    def _carried_hidden_states(self, ctx: _Context, hidden_states: tuple) -> tuple:
        """``output_hidden_states`` as the model carries them through the pruned range.

        HF records the output of decoder layer ``i`` as ``hidden_states[i + 1]`` (entry 0:
        the embeddings). Those of layers ``start .. end-2`` are what the layer computed:
        packed ``[B, K, d]`` (no cache; filler slots included) or ``[B, L, d]`` with values
        at pruned tokens (cached, masked). Each becomes ``[B, L, d]`` with the layer output
        at kept tokens and the bypass (the range's input) at the others; layer ``end-1``'s
        entry is recorded after :meth:`_leave_range` merged it.
        """
        kept = ctx.record.kept[..., None]
        fixed = list(hidden_states)
        for i in range(self.start + 1, self.end):
            h = fixed[i]
            if h is None:  # output_hidden_states selected other entries
                continue
            if ctx.record.mode == "packed":
                h = ops.scatter_tokens(ctx.hidden_in, h, ctx.selection.keep_idx,
                                       check_values=False)
            fixed[i] = torch.where(kept, h, ctx.hidden_in)
        return tuple(fixed)

    def _run_saliency(self, layer, args, kwargs):
        ctx = self._ctx
        if ctx is None:
            raise RuntimeError("the DATALORA decoder was called outside the causal LM's "
                               "forward; call the whole model")
        hidden = args[0] if args else kwargs["hidden_states"]
        bsz, seq_len = hidden.shape[:2]
        mask = ctx.attention_mask
        valid = (torch.ones(bsz, seq_len, dtype=torch.bool, device=hidden.device)
                 if mask is None else mask[:, -seq_len:].to(hidden.device).bool())
        cache = cache_of(kwargs)
        context = state = None
        # resume the context of the positions cached before this forward (layer 0 runs after
        # this hook); none cached: a new cache, or a reused one that was reset
        cached = 0 if cache is None else cache.get_seq_length(0)
        if cached:
            context = getattr(cache, _CACHE_CONTEXT_ATTR, None)
            recorded = 0 if context is None else context[1].shape[1]
            if recorded != cached:
                raise _foreign_cache_error(cached, 0, recorded, "the saliency context")
            state = (context[0][:, -1], context[1][:, -1])
        out = self.saliency(hidden, valid, state)
        if cache is not None:
            new = out.context
            setattr(cache, _CACHE_CONTEXT_ATTR, new if context is None else (
                torch.cat([context[0], new[0]], 1), torch.cat([context[1], new[1]], 1)))
            _follow_cache_rows(cache)
        out.context = None  # [B, L, h]: on the cache only, not held by the forward's record
        keep_prob = self.saliency.keep_probability(out.token_scores)
        ctx.routing = out.routing
        ctx.record = ForwardRecord(saliency=out, valid=valid, keep_prob=keep_prob,
                                   kept=valid.clone(), mode="dense")
        if getattr(self._local, "stop_after_scoring", False):
            raise _Scored  # score_tokens: the record is kept (_finish always runs)
        return None

    def _give_routing(self, module, args, kwargs):
        if len(args) > 1 or kwargs.get("routing") is not None:
            return None
        ctx = self._ctx
        if ctx is None or ctx.routing is None:
            raise RuntimeError("MoLoRALinear with shared routing was called outside a "
                               "DATALORA model forward (no routing available)")
        x = args[0] if args else kwargs["x"]
        if ctx.routing.expert_ids.device != x.device:
            raise ValueError(f"routing: the shared routing is on {ctx.routing.expert_ids.device} "
                             f"but this layer's input is on {x.device}; shared routing and "
                             f"token pruning need every decoder layer on one device (for a "
                             f"model split over GPUs with device_map, use routing='per_layer' "
                             f"or shard with FSDP / DDP instead)")
        tokens = x[..., 0].numel()
        if tokens != ctx.routing.num_tokens:
            raise ValueError(f"routing: the shared routing covers {ctx.routing.num_tokens} "
                             f"tokens but this layer got {tokens}; shared routing supports "
                             f"adapted layers inside the decoder only")
        return args, {**kwargs, "routing": ctx.routing}

    def _enter_layer(self, layer_idx, layer, args, kwargs):
        ctx = self._ctx
        if ctx is None or ctx.record is None:
            return None
        if layer_idx == self.start:
            self._start_range(ctx, args, kwargs)
            if ctx.mode == "packed":
                # the selection's indices are in range and distinct by construction
                hidden = ops.gather_tokens(ctx.hidden_in, ctx.selection.keep_idx,
                                           check_values=False)
                if args:
                    args = (hidden, *args[1:])
                else:
                    kwargs = {**kwargs, "hidden_states": hidden}
        if ctx.mode == "dense" or ctx.skip_cache is not None:
            return None
        if ctx.mode == "packed":
            args, kwargs = self._packed_inputs(ctx, layer_idx, args, kwargs)
            if ctx.prefill_cache is not None:
                name, writer = ctx.prefill_cache
                kwargs = {**kwargs, name: writer}
        window = self.windows[layer_idx]
        return args, {**kwargs, "attention_mask": ctx.masks[window]}

    def _packed_inputs(self, ctx: _Context, layer_idx: int, args, kwargs):
        """Layer ``layer_idx``'s :data:`~datalora.pruning.decoder.PER_TOKEN_INPUTS`
        gathered to the kept tokens."""
        names = self._forward_parameters[layer_idx]
        args = tuple(self._gathered(ctx, value) if 0 < i < len(names) and _per_token(names[i])
                     else value for i, value in enumerate(args))
        kwargs = {name: self._gathered(ctx, value) if _per_token(name) else value
                  for name, value in kwargs.items()}
        return args, kwargs

    @staticmethod
    def _gathered(ctx: _Context, value: Any) -> Any:
        """``value`` (a ``[1 or B, L, ...]`` tensor, a tuple of them, or None) at the kept
        tokens; computed once per forward for the layers that share it."""
        if value is None:
            return None
        if torch.compiler.is_compiling():  # a memo by id() makes dynamo guard on the object:
            # a recompile per forward (each makes new position ids); the graph dedupes
            return _each_tensor(value, _gather_rows, ctx.selection.keep_idx)
        memo = ctx.gathered.get(id(value))
        if memo is not None and memo[0] is value:
            return memo[1]
        rows = _each_tensor(value, _gather_rows, ctx.selection.keep_idx)
        ctx.gathered[id(value)] = (value, rows)
        return rows

    def _start_range(self, ctx: _Context, args, kwargs) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        record = ctx.record
        bsz, seq_len, _ = hidden.shape
        ctx.hidden_in = hidden
        if ctx.cache is None:
            if not self.pruning_enabled or self._retention_disables(ctx) or (
                    ctx.stepwise and not self.saliency.training and self._uncalibrated(ctx)):
                return
            self._start_packed(ctx, hidden, kwargs, record)
        else:
            self._start_masked(ctx, hidden, kwargs, record)

    def _range_windows(self) -> dict[int | None, int]:
        """``{window: first pruned layer with it}`` over the pruned layers (None: full)."""
        first: dict[int | None, int] = {}
        for i in range(self.start, self.end):
            first.setdefault(self.windows[i], i)
        return first

    def _mask_as_bool(self, kwargs) -> bool:
        if "flash" in self.attn_implementation or "flex" in self.attn_implementation:
            # flash attention takes no 4-D mask; flex attention adds a tensor mask to the
            # scores (a bool one would mask nothing)
            raise ValueError(f"attn_implementation: token pruning needs an explicit 4-D mask;"
                             f" use 'sdpa' or 'eager', not {self.attn_implementation!r}")
        original = kwargs.get("attention_mask")
        if isinstance(original, torch.Tensor):
            return original.dtype == torch.bool
        return self.attn_implementation != "eager"

    def _start_packed(self, ctx, hidden, kwargs, record) -> None:
        bsz, seq_len, _ = hidden.shape
        scores = record.saliency.token_scores
        compiling = torch.compiler.is_compiling()
        sel = select_tokens(scores, self.retention, record.valid, tau=self.saliency.tau,
                            noise=self.saliency.training, keep_last=self.keep_last,
                            width_fraction=self._compiled_width if compiling else None)
        if not self.saliency.training:
            threshold = self._forward_threshold(ctx)
            # calibrated (not NaN); not ``t == t``: a traced symbolic float (compile with
            # capture_scalar_outputs) folds that to True and prunes every token
            if not math.isnan(threshold):
                sel = self._threshold_selection(scores, record.valid, threshold)
        self._pack(ctx, hidden, record, sel)
        as_bool = self._mask_as_bool(kwargs)
        ctx.masks = {window: packed_attention_mask(sel.valid, sel.keep_idx, sel.keep_idx,
                                                   hidden.dtype, as_bool=as_bool,
                                                   sliding_window=window)
                     for window in self._range_windows()}

    @staticmethod
    def _pack(ctx: _Context, hidden: torch.Tensor, record: ForwardRecord,
              sel: TokenSelection) -> None:
        """Runs the pruned range on the tokens ``sel`` keeps: their keep weights (the
        scorer's gradient, see the package docstring), routing rows and record."""
        seq_len = hidden.shape[1]
        p = record.keep_prob.gather(1, sel.keep_idx)
        weight = torch.where(sel.valid, 1.0 + (p - p.detach()), torch.zeros_like(p))
        ctx.weight = weight.to(hidden.dtype)
        ctx.selection = sel
        ctx.routing = gather_routing(record.routing, sel.keep_idx, seq_len)
        record.kept = sel.keep_mask(seq_len) & record.valid
        record.mode = ctx.mode = "packed"

    def _prefill_cache_name(self, ctx: _Context, kwargs: dict[str, Any], cache: Any,
                            seq_len: int) -> str | None:
        """The keyword under which the pruned layers get ``cache``, when a cached forward of
        ``seq_len`` tokens may run them packed (:class:`_PackedPrefillCache`): several
        tokens, :meth:`_layers_write`, the cache passed by keyword; else None (the layers
        run on every token, masked)."""
        if seq_len < 2 or not self._layers_write(ctx, cache):
            return None
        return next((name for name in ("cache", "past_key_values")
                     if kwargs.get(name) is cache), None)

    def _threshold_selection(self, scores, valid, threshold: float) -> TokenSelection:
        keep = (scores > self._threshold_in_use(threshold)) & valid
        _refuse_capture(scores, "the calibrated-threshold eval forward (it sizes the packed "
                                "batch from the kept count)")
        return self._selection_of(keep)

    @staticmethod
    def _selection_of(keep: torch.Tensor, counts: torch.Tensor | None = None,
                      most: int | None = None) -> TokenSelection:
        """The kept tokens ``keep [B, L]`` (bool) packed: the batch as wide as the most any
        row keeps (at least 1), each row's kept tokens in position order, the other slots
        filler. ``counts`` (``keep.sum(1)``) and ``most`` (its maximum, read to the host)
        when the caller has them already."""
        counts = keep.sum(1) if counts is None else counts
        width = max(int(counts.max()) if most is None else most, 1)  # eval only: one host sync
        # the kept tokens first, in position order (a stable sort; a float key "keep -
        # position * 1e-6" ranked a pruned token above a kept one 1e6 positions later)
        idx = keep.to(torch.uint8).sort(dim=1, descending=True, stable=True).indices[:, :width]
        slot_valid = keep.gather(1, idx)
        keep_idx, perm = idx.sort(dim=1)
        return TokenSelection(keep_idx=keep_idx, valid=slot_valid.gather(1, perm),
                              counts=counts)

    def _start_masked(self, ctx, hidden, kwargs, record) -> None:
        bsz, seq_len, _ = hidden.shape
        cache = cache_of(kwargs)
        thresholded = (self.pruning_enabled and not self._retention_disables(ctx)
                       and not self._uncalibrated(ctx))
        if not thresholded:
            keep_new = record.valid.clone()
        else:
            threshold = self._threshold_in_use(self._forward_threshold(ctx))
            keep_new = (record.saliency.token_scores > threshold) & record.valid
        past = getattr(cache, _CACHE_KEEP_ATTR, None) if cache is not None else None
        if cache is not None:
            cached = cache.get_seq_length(self.start) if hasattr(cache, "get_seq_length") else 0
            if cached == 0:
                past = None  # a reused cache object that was reset (as for the USN state)
        past_len = 0 if past is None else past.shape[1]
        if cache is not None:
            if cached != past_len:
                raise _foreign_cache_error(cached, self.start, past_len, "keep flags")
        keep_all = keep_new if past is None else torch.cat([past, keep_new], 1)
        if cache is not None:
            setattr(cache, _CACHE_KEEP_ATTR, keep_all)
        ctx.keep_q = keep_new
        record.kept = keep_new
        record.mode = ctx.mode = "masked"
        skippable = self._skippable(ctx, cache, bsz)
        writer = self._prefill_cache_name(ctx, kwargs, cache, seq_len) if thresholded else None
        counts = most = None
        if skippable or writer is not None:  # this forward's one host read: the most kept
            counts = keep_new.sum(1)
            most = int(counts.max()) if bsz else 0
        if skippable and most == 0:
            ctx.skip_cache = cache  # every row pruned: the pruned layers need not run
            return
        total = keep_all.shape[1]
        if ctx.attention_mask is not None:
            keep_all = keep_all & ctx.attention_mask[:, -total:].to(keep_all.device).bool()
        sel = None
        if writer is not None:  # several tokens: the pruned layers run on the kept ones
            sel = self._selection_of(keep_new, counts, most)
            self._pack(ctx, hidden, record, sel)
            ctx.prefill_cache = (writer, _PackedPrefillCache(cache, sel.keep_idx, sel.valid,
                                                             seq_len))
        query_index = (sel.keep_idx + (total - seq_len) if sel is not None else
                       torch.arange(total - seq_len, total, device=hidden.device).expand(bsz, -1))
        as_bool = self._mask_as_bool(kwargs)
        ctx.masks = {}
        for window, layer_idx in self._range_windows().items():
            kv_length, kv_offset = (total, 0) if cache is None else _mask_sizes(
                cache, seq_len, layer_idx, total, hidden.device)
            # keys the cache layer holds: the last window (sliding) or fixed slots (static,
            # unused ones hidden: index >= total fails kj <= qi and is not kept)
            filled = max(min(total, kv_offset + kv_length) - kv_offset, 0)
            key_ok = torch.zeros(bsz, kv_length, dtype=torch.bool, device=hidden.device)
            key_ok[:, :filled] = keep_all[:, kv_offset:kv_offset + filled]
            key_index = torch.arange(kv_offset, kv_offset + kv_length,
                                     device=hidden.device).expand(bsz, -1)
            if sel is not None:  # the keys held before the chunk, then its packed ones
                held = kv_length - seq_len
                key_ok = torch.cat([key_ok[:, :held], sel.valid], 1)
                key_index = torch.cat([key_index[:, :held], query_index], 1)
            ctx.masks[window] = packed_attention_mask(key_ok, query_index, key_index,
                                                      hidden.dtype, as_bool=as_bool,
                                                      sliding_window=window)

    def _leave_range(self, layer, args, output):
        ctx = self._ctx
        if ctx is None or ctx.mode == "dense":
            return None
        out = output[0] if isinstance(output, tuple) else output
        if ctx.mode == "packed":
            full = ops.scatter_tokens(ctx.hidden_in, out, ctx.selection.keep_idx, ctx.weight,
                                      check_values=False)
            ctx.routing = ctx.record.routing
        else:
            full = torch.where(ctx.keep_q[..., None], out, ctx.hidden_in)
        ctx.mode = "dense"
        ctx.gathered, ctx.masks, ctx.skip_cache, ctx.prefill_cache = {}, {}, None, None
        return (full, *output[1:]) if isinstance(output, tuple) else full

    # ------------------------------------------------------------------ threshold

    def score_tokens(self, forward: Callable[[], Any]) -> ForwardRecord:
        """Runs ``forward`` (a call of the model) only until the saliency network has
        scored its tokens, before decoder layer 0, and returns that forward's record
        (``saliency.token_scores [B, L]``, ``valid``): what :meth:`calibrate` needs, without
        the decoder layers' cost (the scores depend on the embeddings only). Only this
        thread's forwards stop. Under FSDP2 or DeepSpeed ZeRO-3 the stopped forward skips
        the post-forward hooks that free gathered parameters (they stay gathered until the
        next forward): ``DATALORATrainer`` runs whole forwards there."""
        self._local.stop_after_scoring = True  # this thread's forwards only
        try:
            forward()
        except _Scored:
            pass
        else:
            raise RuntimeError("score_tokens: the forward ended without reaching decoder "
                               "layer 0; pass a call of the whole model")
        finally:
            self._local.stop_after_scoring = False
        return self.own_last

    @torch.no_grad()
    def calibrate(self, scores: torch.Tensor, valid: torch.Tensor | None = None,
                  retention: float | None = None) -> float:
        """Sets ``keep_threshold`` to keep ``retention`` of the tokens (the score quantile,
        moved halfway to the next score: see :func:`_keep_threshold`).

        Args:
            scores: ``[N]`` or ``[B, L]`` token scores collected on representative data.
            valid: same shape, bool (False: padding, ignored).
            retention: default: the current retention.
        """
        retention = self.retention if retention is None else check_number(
            "retention", retention, low=0, low_inclusive=False, high=1)
        flat = scores.float().reshape(-1)
        if valid is not None:
            flat = flat[valid.reshape(-1).bool()]
        if flat.numel() == 0:
            raise ValueError("scores: no valid token scores to calibrate on")
        bad = int((~torch.isfinite(flat)).sum())
        if bad:  # NaN ranks above every score, -inf + inf is NaN: a wrong threshold
            raise ValueError(f"scores: expected finite values, got {bad} NaN or inf of "
                             f"{flat.numel()} valid token scores")
        value = _keep_threshold(flat, retention) if retention < 1.0 else -math.inf
        kept = float((flat > value).float().mean())
        if abs(kept - retention) > max(0.05, 1.0 / flat.numel()):
            warnings.warn(f"scores: many token scores are tied, so the threshold {value:.6g} "
                          f"keeps {kept:.1%} of the {flat.numel()} calibration tokens for "
                          f"retention {retention} (an untrained saliency network scores "
                          f"tokens alike)", UserWarning, stacklevel=2)
        self.saliency.keep_threshold.fill_(value)
        self.threshold_calibrated_for(retention)
        return value

    def threshold_calibrated_for(self, retention: float | None) -> None:
        """Records the retention the keep threshold now holds the calibration of (None:
        unknown, e.g. a loaded threshold) and re-arms the warnings about it."""
        self.calibrated_retention = retention
        self._warned_stale = self._warned_off = False
