"""When a backend may cache per-routing tables: calls made straight from eager Python.

Layers sharing one :class:`~datalora.routing.Routing` pass the same ``expert_ids`` /
``gates`` / ``rank_scale`` tensor objects, so a backend can build its per-routing tables
(the torch backend's gate matrix, the triton backend's expert sort) once and reuse them
while those objects come back with unchanged version counters. That is safe only where
the tensors are real eager tensors:

* not inside a compiled graph, whose runtime may hand the op a buffer Inductor reused for
  new values without bumping its version: compiled graphs call the registered custom ops,
  which never enter :func:`eager_call`;
* not for leaves that require grad: gradcheck and optimizers change those through
  ``.data``, which bumps no version;
* not for inference-mode tensors, which have no version counter (the caches check);
* only for routing tensors datalora built itself (:func:`trust_routing`: the saliency
  network's and the layers' routers): a caller's tensors may change without a version bump
  (a ``torch.from_numpy`` view whose array is written, a ``.data`` write), so their tables
  are built on every call.

The eager entry points (``molora_delta`` / ``molora_linear`` outside tracing, with or
without autograd, and their eager backward) run the backend inside :func:`eager_call`.

The module also holds what every op's eager path is built from: :func:`tracing` (whether
the registered custom ops must run), :func:`under_torch_func`, :func:`needs_autograd` and
:func:`eager_function` (an ``autograd.Function`` running an op's backend code without the
custom-op dispatcher, whose host time dominates small layers).
"""

from __future__ import annotations

import functools
import threading
import weakref

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from datalora.ops.backends import get_backend
from datalora.ops.validation import PLAIN_TENSORS

_state = threading.local()
ROUTING_CACHE_ENTRIES = 2  # routings a backend keeps tables of (see RoutingCache)
_trusted: dict[int, weakref.ref] = {}  # id -> weak reference of routing tensors we built


def trust_routing(*tensors: torch.Tensor | None) -> None:
    """Marks routing tensors datalora built itself (fresh outputs of its routers, never
    exposed for writing before use) as safe to cache tables of."""
    for t in tensors:
        if t is not None:
            key = id(t)
            _trusted[key] = weakref.ref(t, functools.partial(_forget, key))


def _forget(key: int, _ref: weakref.ref) -> None:
    _trusted.pop(key, None)


def _is_trusted(t: torch.Tensor) -> bool:
    ref = _trusted.get(id(t))
    return (ref is not None and ref() is t) or _cast_source(t) is not None


_casts: dict[int, tuple[weakref.ref, weakref.ref]] = {}  # id -> (cast, its trusted source)


def cast_routing(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` (``t`` itself when it already is). A cast of a trusted routing
    tensor (a layer casting the shared gates to its compute dtype) is trusted too, and the
    routing caches key it by its source (:func:`cache_sources`): every layer makes its own
    cast (autograd sums their gradients in the source's dtype) but they share tables."""
    if t.dtype == dtype:
        return t
    out = t.to(dtype)
    if _is_trusted(t) and not torch.compiler.is_compiling():
        source = _source_or_self(t)
        key = id(out)
        _casts[key] = (weakref.ref(out, functools.partial(_forget_cast, key)),
                       weakref.ref(source))
    return out


def _forget_cast(key: int, _ref: weakref.ref) -> None:
    _casts.pop(key, None)


def _cast_source(t: torch.Tensor) -> torch.Tensor | None:
    """The trusted tensor ``t`` was cast from (:func:`cast_routing`), while both live."""
    entry = _casts.get(id(t))
    if entry is None or entry[0]() is not t:
        return None
    source = entry[1]()
    return source if source is not None and _is_trusted(source) else None


def cache_sources(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """``tensors`` with each cast of a routing tensor (:func:`cast_routing`) replaced by its
    source: the identity a routing cache keys on (with the tensors' dtypes in its key, a
    cast's values are a function of its source's)."""
    return tuple(None if t is None else _source_or_self(t) for t in tensors)


def _source_or_self(t: torch.Tensor) -> torch.Tensor:
    source = _cast_source(t)
    return t if source is None else source


class TensorsState:
    """The identity (weak references) and version counters of a few tensors (None allowed):
    :meth:`same` is True while exactly those tensor objects come back unmodified. Object
    identity, not ``id()``: a tensor allocated after another was freed may reuse its
    ``id``, and a fresh tensor's version is 0 like any unmodified one's. ``on_free`` is
    called (with the dead reference) when one of the tensors is freed."""

    __slots__ = ("refs", "versions")

    def __init__(self, tensors: tuple[torch.Tensor | None, ...], on_free=None) -> None:
        self.versions = tuple(None if t is None else t._version for t in tensors)
        self.refs = tuple(None if t is None else weakref.ref(t, on_free) for t in tensors)

    @classmethod
    def of(cls, *tensors: torch.Tensor | None, on_free=None) -> TensorsState | None:
        """The state of ``tensors``, or None for inference tensors (no version counter)."""
        try:
            return cls(tensors, on_free)
        except RuntimeError:
            return None

    def same(self, *tensors: torch.Tensor | None) -> bool:
        try:
            return len(tensors) == len(self.refs) and all(
                (t is None and ref is None) or (t is not None and ref is not None
                                                and ref() is t and t._version == version)
                for t, ref, version in zip(tensors, self.refs, self.versions, strict=True))
        except RuntimeError:  # an inference tensor: no version counter
            return False


class RoutingCache:
    """A few cached values (:data:`ROUTING_CACHE_ENTRIES`), each keyed by routing tensors (a
    :class:`TensorsState`) and extra hashable fields; the least recently used one goes first.
    Two because a pruned model's step alternates two routings (the full-length one outside
    the pruned layers, the packed one inside: forward full, packed, backward packed, full):
    one entry would rebuild the full routing's value in the backward. An entry is dropped as
    soon as one of its tensors is freed: it never outlives the routing (a deleted model's
    tables do not stay in memory until the next call)."""

    __slots__ = ("_entries",)

    def __init__(self) -> None:
        self._entries: list[tuple] = []  # (state, key, value, token), most recent last

    def __len__(self) -> int:
        return len(self._entries)

    # The entry list is only ever replaced whole, never changed in place: ``_drop`` runs as
    # a weakref callback (cyclic GC inside a lookup, another thread) and must not shift a
    # list another call is iterating.
    def get(self, tensors: tuple[torch.Tensor | None, ...], key: tuple):
        """The value stored for these unmodified tensor objects and ``key``, or None."""
        for entry in self._entries:
            if entry[1] == key and entry[0].same(*tensors):
                entries = self._entries
                if entries and entries[-1] is not entry:  # most recently used last
                    self._entries = [e for e in entries if e is not entry] + [entry]
                return entry[2]
        return None

    def put(self, tensors: tuple[torch.Tensor | None, ...], key: tuple, value) -> None:
        """Stores ``value`` for ``tensors`` and ``key`` (not for inference tensors)."""
        token = object()
        state = TensorsState.of(*tensors, on_free=functools.partial(self._drop, token))
        if state is not None:
            entries = self._entries
            kept = entries[max(0, len(entries) + 1 - ROUTING_CACHE_ENTRIES):]
            self._entries = [*kept, (state, key, value, token)]

    def _drop(self, token: object, _ref: weakref.ref) -> None:
        self._entries = [entry for entry in self._entries if entry[3] is not token]


class eager_call:  # noqa: N801 -- used like a function: ``with eager_call(): ...``
    """Marks the backend calls inside as made from eager Python (see the module doc).

    A plain class rather than ``contextlib.contextmanager``: this wraps every eager op call,
    and a generator-based manager costs about four times as much host time.
    """

    __slots__ = ("_previous",)

    def __enter__(self) -> None:
        self._previous = getattr(_state, "active", False)
        _state.active = True

    def __exit__(self, *exc_info) -> None:
        _state.active = self._previous


def may_cache_routing(*routing: torch.Tensor | None) -> bool:
    """True inside :func:`eager_call` when every one of ``routing`` was built by datalora
    (:func:`trust_routing`), none is a leaf requiring grad and no CUDA graph is being
    captured (the capture must record every build)."""
    if not getattr(_state, "active", False):
        return False
    tensors = [t for t in routing if t is not None]
    if not all(_is_trusted(t) for t in tensors):
        return False
    if any(t.requires_grad and t.grad_fn is None for t in tensors):
        return False
    return not (tensors and tensors[0].is_cuda and torch.cuda.is_current_stream_capturing())


def tracing(*tensors: torch.Tensor | None) -> bool:
    """True under torch.compile / export / make_fx or with tensor subclasses (fake or
    functional tensors): there the registered custom ops must be used."""
    return (torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None
            or any(t is not None and type(t) not in PLAIN_TENSORS for t in tensors))


def under_torch_func() -> bool:
    """True inside a torch.func transform (``grad``, ``vmap``, ``jacrev``, ``jvp``, ...) or
    a ``torch.autograd.forward_ad.dual_level()`` (forward-mode AD: the kernels write into
    new buffers, which would carry no tangent)."""
    return (torch._C._functorch.maybe_current_level() is not None
            or torch.autograd.forward_ad._current_level >= 0)


def needs_autograd(*inputs) -> bool:
    """Whether grad mode is on and one of ``inputs`` (tensors or other values) requires grad."""
    return torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in inputs)


def eager_function(name: str, backend_forward: str, setup_context, backward) -> type:
    """A ``torch.autograd.Function`` running a custom op without the dispatcher: the
    backend's ``backend_forward`` (the op's inputs, the backend name last), then the op's
    own ``setup_context`` and ``backward``, the backend calls inside :func:`eager_call`
    (routing caches).

    Old-style ``forward(ctx, ...)``: a ``setup_context`` staticmethod would make every
    ``apply`` bind its arguments with ``inspect.signature`` (tens of microseconds per call).
    """

    def forward(ctx, *inputs):
        with eager_call():
            output = getattr(get_backend(inputs[-1]), backend_forward)(*inputs[:-1])
        setup_context(ctx, inputs, output)
        return output

    def eager_backward(ctx, *grads):
        with eager_call():
            return backward(ctx, *grads)

    return type(name, (torch.autograd.Function,), {
        "__doc__": f"``datalora::{backend_forward.removesuffix('_forward')}`` in eager mode.",
        "backend_forward": backend_forward, "forward": staticmethod(forward),
        "backward": staticmethod(eager_backward)})


__all__ = ["RoutingCache", "TensorsState", "eager_call", "eager_function", "may_cache_routing",
           "needs_autograd", "tracing", "trust_routing", "under_torch_func"]
