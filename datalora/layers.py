"""``MoLoRALinear``: a drop-in mixture-of-LoRA-experts wrapper around a frozen linear layer."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules import module as _torch_module

from datalora import nf4, ops
from datalora.checks import check_bool, check_finite, check_int
from datalora.init_linear import NormalInitLinear
from datalora.nf4 import NF4Tensor
from datalora.nf4_linear import (
    NF4Linear,
    is_nf4_base,
    nf4_base_forward,
    nf4_compute_dtype,
    nf4_molora_linear,
    quantize_linear,
)
from datalora.ops.backends import BACKEND_NAMES, CUDA_BACKEND_SCOPE, get_backend, resolve_backend
from datalora.ops.eager import (
    cast_routing,
    eager_call,
    needs_autograd,
    tracing,
    under_torch_func,
)
from datalora.ops.molora import _autocast, autocast_enabled
from datalora.ops.validation import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_float,
    check_tensor,
    under_vmap,
    value_checks_enabled,
)
from datalora.routing import Routing, topk_routing


def _in_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without the call when it already is (a no-op ``to`` still costs host
    time, four per layer call)."""
    return t if t.dtype == dtype else t.to(dtype)


def check_alpha(alpha: object) -> None:
    """LoRA ``alpha`` (scaling = alpha / r): a finite number > 0."""
    check_finite("alpha", alpha)
    if not alpha > 0:
        raise ValueError(f"alpha: expected > 0, got {alpha}")


def check_lora_dtype(dtype: object) -> None:
    """The LoRA parameters' ``dtype``: None or a floating ``torch.dtype`` (TypeError)."""
    if dtype is not None and dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype: expected None or a floating torch.dtype {FLOAT_DTYPES}, "
                        f"got {dtype!r}")


@contextmanager
def adapters_off(layers: Sequence[MoLoRALinear]) -> Iterator[None]:
    """``layers`` compute their base only inside the block (``adapter_enabled`` off); each
    layer's own setting comes back after."""
    enabled = [layer.adapter_enabled for layer in layers]
    for layer in layers:
        layer.adapter_enabled = False
    try:
        yield
    finally:
        for layer, flag in zip(layers, enabled, strict=True):
            layer.adapter_enabled = flag


def _plain_linear(module: nn.Module) -> bool:
    """True when ``module(x)`` is exactly ``F.linear(x, module.weight, module.bias)``: an
    ``nn.Linear`` whose ``forward`` is not overridden (by a subclass or on the instance)
    and no module hook applies (its own or global ones: ``register_module_forward_hook``
    and friends, which profilers use). A parametrized weight is read through
    ``module.weight`` either way."""
    hooks = _torch_module
    return type(module).forward is nn.Linear.forward and "forward" not in module.__dict__ \
        and not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                 or module._backward_pre_hooks or hooks._global_forward_hooks
                 or hooks._global_forward_pre_hooks or hooks._global_backward_hooks
                 or hooks._global_backward_pre_hooks)


def _in_dtype_and_on_device(x: torch.Tensor, *tensors: torch.Tensor | None) -> bool:
    """Whether every tensor of ``tensors`` (None skipped) has x's dtype and device."""
    for t in tensors:
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            return False
    return True


def _routing_fits(routing: Routing, T: int, E: int, r: int, device: torch.device) -> bool:
    """Whether ``routing`` has the ``[T, k]`` int32 / int64 ids (``1 <= k <= E``), float
    gates and rank scale (``[T, r]`` or None) on ``device`` that the op's checks accept
    (their values aside), none of them nor its router probabilities requiring grad (the
    layer records the routing itself: it would keep their graph alive)."""
    ids, gates, rank_scale = routing.expert_ids, routing.gates, routing.rank_scale
    probs = routing.router_probs
    if probs is not None and probs.requires_grad:
        return False
    if not (ids.dim() == 2 and ids.shape[0] == T and 1 <= ids.shape[1] <= E
            and ids.dtype in INDEX_DTYPES and ids.device == device
            and gates.shape == ids.shape and gates.dtype in FLOAT_DTYPES
            and gates.device == device and not gates.requires_grad):
        return False
    return rank_scale is None or (
        rank_scale.shape == (T, r) and rank_scale.dtype in FLOAT_DTYPES
        and rank_scale.device == device and not rank_scale.requires_grad)


class MoLoRALinear(nn.Module):
    """``y = base(x) + scaling * sum_j gate_j * B[e_j] @ (rank_scale * (A[e_j] @ x))``.

    The base layer is frozen. ``num_experts`` LoRA experts ``A [E, r, d_in]`` (Kaiming
    uniform) and ``B [E, d_out, r]`` (zeros, so the layer equals its base at init) are
    trained. Without a shared ``routing`` each token goes to its ``top_k`` experts by a
    per-layer linear router (softmax, top-k, renormalised gates).

    Args:
        base_layer: the ``nn.Linear`` to adapt (kept as ``self.base_layer``). A subclass
            with its own ``forward``, or a base with module hooks, is called as
            ``base_layer(x)`` (plus the delta); a plain ``nn.Linear`` fuses the two GEMMs.
        num_experts: E. rank: r. alpha: LoRA alpha (``scaling = alpha / r``).
        top_k: routed experts per token for the per-layer router.
        dropout: dropout on the LoRA input (the base path sees the clean input).
        router: build the per-layer router (False when a shared routing always drives it).
        backend: ``datalora.ops`` backend.
        dtype: dtype of the LoRA parameters: float16, bfloat16, float32 or float64 (default:
            the base weight's floating dtype).
            They, the gates and ``rank_scale`` are cast to ``x.dtype`` on every forward;
            ``x`` must have the base weight's dtype (``torch.autocast`` mixes dtypes).
        quantize: ``"nf4"`` quantizes an ``nn.Linear`` base to an ``NF4Linear`` first. An
            ``NF4Linear`` or nf4 ``bnb.nn.Linear4bit`` base is used as is (QLoRA).
    """

    def __init__(self, base_layer: nn.Linear | NF4Linear, num_experts: int = 8, rank: int = 16,
                 alpha: float = 32.0, top_k: int = 2, *, dropout: float = 0.0,
                 router: bool = True, backend: str = "auto", dtype: torch.dtype | None = None,
                 quantize: str | None = None):
        super().__init__()
        check_lora_dtype(dtype)
        check_bool("router", router)
        if quantize is not None:
            base_layer = quantize_linear(base_layer, quantize, name="base_layer")
        self._nf4_base = is_nf4_base(base_layer)
        if self._nf4_base:  # a bitsandbytes base has no NF4Linear to do it
            nf4.warm_code_table(base_layer.weight.device)
        if not (self._nf4_base or isinstance(base_layer, nn.Linear)):
            raise TypeError("base_layer: expected nn.Linear, NF4Linear or nf4 bnb.nn.Linear4bit, "
                            f"got {type(base_layer).__name__}")
        if backend not in BACKEND_NAMES:
            raise ValueError(f"backend: expected one of {BACKEND_NAMES}, got {backend!r}")
        if backend == "cuda" and not self._nf4_base:  # refused here, not at the first forward
            raise ValueError(f"backend: 'cuda' needs an NF4 base (quantize='nf4', NF4Linear or "
                             f"nf4 bnb Linear4bit), got {type(base_layer).__name__}; "
                             f"{CUDA_BACKEND_SCOPE}")
        num_experts = check_int("num_experts", num_experts, low=1)
        rank = check_int("rank", rank, low=1)
        top_k = check_int("top_k", top_k, low=1)
        if top_k > num_experts:
            raise ValueError(f"top_k: expected <= num_experts={num_experts}, got {top_k}")
        check_alpha(alpha)
        check_finite("dropout", dropout)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a probability in [0, 1), got {dropout}")
        if isinstance(getattr(base_layer, "weight", None), nn.parameter.UninitializedParameter):
            raise ValueError("base_layer: an uninitialized nn.LazyLinear; run one forward "
                             "through it first (that materializes its weight)")
        self.base_layer = base_layer
        base_layer.requires_grad_(False)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.num_experts, self.rank, self.top_k = num_experts, rank, top_k
        self.alpha, self.scaling = float(alpha), float(alpha) / rank
        self.backend = backend
        self.adapter_enabled = True
        if dtype is None and self._nf4_base:
            dtype = nf4_compute_dtype(base_layer)
        if dtype is None:
            w = base_layer.weight
            dtype = w.dtype if w.dtype.is_floating_point else torch.float32
        device = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.empty(num_experts, rank, self.in_features,
                                               device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, self.out_features, rank,
                                               device=device, dtype=dtype))
        self.router = (NormalInitLinear(self.in_features, num_experts, bias=False, std=0.02,
                                        device=device, dtype=dtype) if router else None)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.last_routing: Routing | None = None
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A: Kaiming uniform per expert (as PEFT's LoRA); B: zeros; router: small normal."""
        with torch.no_grad():
            for e in range(self.num_experts):
                nn.init.kaiming_uniform_(self.lora_A[e], a=math.sqrt(5))
            self.lora_B.zero_()
            if self.router is not None:
                self.router.reset_parameters()

    def reset_parameters(self) -> None:
        """The adapter's initialisation (:meth:`reset_lora_parameters`), under the name
        torch's meta-device recipe calls on every module after ``to_empty()``; the base
        layer is a module of its own (its weights come from a checkpoint)."""
        self.reset_lora_parameters()

    def __setattr__(self, name: str, value) -> None:
        # ``weight`` / ``bias`` belong to the base layer (read-only properties here): Hugging
        # Face ``tie_weights()`` assigns ``lm_head.weight = embed_tokens.weight``
        if name in ("weight", "bias") and "base_layer" in self.__dict__.get("_modules", {}):
            setattr(self.base_layer, name, value)
            return
        super().__setattr__(name, value)

    def __getstate__(self):
        # last_routing may hold non-leaf tensors (gates with a grad_fn), which copy.deepcopy
        # refuses; it is a per-forward record, not state
        state = super().__getstate__()
        state["last_routing"] = None
        return state

    @property
    def weight(self) -> torch.Tensor | NF4Tensor:
        """The base layer's weight: ``[d_out, d_in]``, or an :class:`~datalora.nf4.NF4Tensor`
        on an :class:`NF4Linear` base (a bnb ``Params4bit`` on a ``Linear4bit`` base)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def route(self, x: torch.Tensor) -> Routing:
        """Per-layer top-k routing of ``x [..., d_in]`` (tokens flattened), yours to change:
        not marked trusted for the backends' table caches (see :func:`_route`)."""
        self._check_x(x)
        return self._route(x, trusted=False)

    def _route(self, x: torch.Tensor, trusted: bool) -> Routing:
        """:meth:`route`; ``trusted`` for the forward's own routing, which nobody can
        write to before the layer uses it (its tables are then cached for the backward)."""
        return topk_routing(self._router_logits(x), self.top_k, _trusted=trusted)

    def _router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``[T, E]`` router logits of ``x [..., d_in]`` (tokens flattened)."""
        if self.router is None:
            raise ValueError("routing: this MoLoRALinear has no router (router=False); "
                             "pass routing=Routing(...)")
        x2 = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # not -1: d_in may be 0
        router = self.router
        if x2.dtype != router.weight.dtype and _plain_linear(router):
            # logits in x's dtype (softmax in fp32): an fp32 router over bf16 x would save
            # an fp32 copy of x for its weight gradient, twice the size of x itself
            bias = None if router.bias is None else router.bias.to(x2.dtype)
            return F.linear(x2, router.weight.to(x2.dtype), bias)
        return router(x2.to(router.weight.dtype))  # as a module: hooks / parametrizations

    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base layer alone, x ``[..., d_in]`` -> ``[..., d_out]`` (an NF4 base as in the
        adapted path: no bitsandbytes repack)."""
        return nf4_base_forward(self.base_layer, x) if self._nf4_base else self.base_layer(x)

    def forward(self, x: torch.Tensor, routing: Routing | None = None) -> torch.Tensor:
        """x ``[..., d_in]`` -> ``[..., d_out]``; ``routing`` has ``T = x[..., 0].numel()`` rows."""
        if not self.adapter_enabled:
            return self.base_forward(x)
        # compile / torch.func (vmap) first: their tensors' version counters are not for
        # reading here, and the inference path is for plain eager calls only
        if not torch.compiler.is_compiling() and not under_torch_func():
            if routing is None:
                if self._checks_skippable(x, None):  # the router's ids are valid by design
                    # untrusted: one call uses its tables, and the record is yours to change
                    routing = self._route(x, trusted=False)
                    self.__dict__["last_routing"] = routing  # nothing requires grad
                    return self._forward_checked_inputs(x, routing)
            elif isinstance(routing, Routing) \
                    and not routing.needs_value_check(self.num_experts) \
                    and self._checks_skippable(x, routing):
                routing.note_layer(self)
                self.__dict__["last_routing"] = routing  # nothing requires grad: no graph held
                return self._forward_checked_inputs(x, routing)
        self._check_inputs(x, routing)
        plain = not self._nf4_base and self._plain_base()
        if plain:  # cast once under autocast: the router and the op save the same copy of x
            (x,) = _autocast(x)
        own = routing is None
        if own:
            routing = self._route(x, trusted=True)
        else:
            routing.note_layer(self)
        # a plain attribute (skips Module.__setattr__); detached: the record must not keep
        # this forward's graph alive (an eval forward without no_grad, a skipped step)
        self.__dict__["last_routing"] = Routing(
            routing.expert_ids, routing.gates.detach(),
            None if routing.rank_scale is None else routing.rank_scale.detach())
        dtype = x.dtype
        A, B = _in_dtype(self.lora_A, dtype), _in_dtype(self.lora_B, dtype)
        gates = cast_routing(routing.gates, dtype)
        rank_scale = None if routing.rank_scale is None else cast_routing(routing.rank_scale,
                                                                          dtype)
        # a Routing shared by many layers is validated once (under compile: never, as a
        # flag baked into a graph would check on every call); the layer's own top-k router
        # yields valid ids by construction: no host sync. Marked checked only when the
        # values were read (not with DATALORA_CHECK_VALUES=0 or in a CUDA graph capture)
        check = not own and not torch.compiler.is_compiling() and not under_vmap() \
            and routing.needs_value_check(self.num_experts) \
            and value_checks_enabled(x, routing.expert_ids, gates, rank_scale)
        y = self._adapted(x, plain, routing.expert_ids, A, B, gates, rank_scale, check)
        if check:  # the op validated the values (else it raised)
            routing.mark_values_checked(self.num_experts)
        return y

    def _adapted(self, x, plain: bool, expert_ids, A, B, gates, rank_scale,
                 check: bool) -> torch.Tensor:
        """Base output + MoLoRA delta (inputs cast to x's dtype) on the fastest path;
        ``plain``: :meth:`_plain_base` (the base is a bare ``F.linear``)."""
        if self._nf4_base:  # 4-bit base: fused NF4 decode kernel on GPU, else base(x) + delta
            lora_x = self.lora_dropout(x) if self.training else x
            return nf4_molora_linear(self.base_layer, x, lora_x, A, B, expert_ids, gates,
                                     rank_scale, self.scaling, self.backend, check_values=check)
        no_dropout = isinstance(self.lora_dropout, nn.Identity) or not self.training
        if plain and no_dropout:  # fused: the expand accumulates into the base GEMM's output
            return ops.molora_linear(x, self.base_layer.weight, self.base_layer.bias, A, B,
                                     expert_ids, gates, rank_scale, self.scaling,
                                     self.backend, check_values=check)
        delta = ops.molora_delta(x if no_dropout else self.lora_dropout(x), A, B,
                                 expert_ids, gates, rank_scale, self.scaling,
                                 self.backend, check_values=check)
        base = (F.linear(x, self.base_layer.weight, self.base_layer.bias) if plain
                else self.base_layer(x))
        return base + delta

    def _checks_skippable(self, x: torch.Tensor, routing: Routing | None) -> bool:
        """Whether this forward may call the backend's fused linear directly
        (:meth:`_forward_checked_inputs`), skipping this forward's and the op's argument
        checks and dispatch because they would pass: an inference call (no gradient needed,
        no autocast, tracing or torch.func transform, no active dropout) on a plain
        ``nn.Linear`` base; x ``[..., d_in]``, the base weight ``[d_out, d_in]`` and bias
        ``[d_out]``, lora_A ``[E, r, d_in]`` and lora_B ``[E, d_out, r]`` in one floating
        dtype on one device; a finite float ``scaling``; and either a shared routing that
        fits (:func:`_routing_fits`) and whose values were checked, or (``routing`` None)
        the layer's own router, a plain ``nn.Linear`` in that dtype on that device
        (:meth:`_router_fits`), whose top-k ids are in range by construction. The caller
        (:meth:`forward`) asks first what needs no layer: not compiling, no torch.func
        transform, the routing's ``needs_value_check``. Anything else takes the checked
        path, which names the bad argument. This is the decode step of a model sharing one
        routing (a DATALORA model's saliency routing, the LoRA-TLE mixer's), at T = 1 about
        half the checked path's host time, or of a drop-in layer routing its own tokens,
        12-17 % less."""
        if self._nf4_base or not isinstance(x, torch.Tensor):
            return False
        # the modules' own dicts, not nn.Module.__getattr__ (host time: this runs per call);
        # a parametrized weight or bias is in neither and takes the checked path
        base, own = self._modules["base_layer"], self._parameters
        if "bias" not in base._parameters:
            return False
        weight, bias = base._parameters.get("weight"), base._parameters["bias"]
        A, B = own.get("lora_A"), own.get("lora_B")
        if weight is None or A is None or B is None or x.dim() < 1 \
                or x.dtype not in FLOAT_DTYPES or A.dim() != 3:
            return False
        E, r, d_in = A.shape
        d_out = weight.shape[0]
        return (x.shape[-1] == d_in and weight.shape == (d_out, d_in)
                and B.shape == (E, d_out, r) and (bias is None or bias.shape == (d_out,))
                and _in_dtype_and_on_device(x, weight, A, B, bias)
                and (self._router_fits(x) if routing is None
                     else _routing_fits(routing, math.prod(x.shape[:-1]), E, r, x.device))
                and type(self.scaling) is float and math.isfinite(self.scaling)
                and (not self.training or isinstance(self.lora_dropout, nn.Identity))
                and self._plain_base()
                and not needs_autograd(x, weight, bias, A, B)
                and not tracing(x, weight, bias, A, B,
                                *(() if routing is None else (routing.gates, routing.rank_scale)))
                and not autocast_enabled(x.device.type))

    def _router_fits(self, x: torch.Tensor) -> bool:
        """Whether the layer's own router is a plain ``nn.Linear`` (no hooks, no
        parametrization) ``[E, d_in]`` with x's dtype and device, needing no gradient: its
        logits are then ``F.linear`` of x, routed without casts."""
        router = self._modules.get("router")
        if router is None or not _plain_linear(router) or "bias" not in router._parameters:
            return False
        weight, bias = router._parameters.get("weight"), router._parameters["bias"]
        return (weight is not None and weight.shape == (self.num_experts, x.shape[-1])
                and _in_dtype_and_on_device(x, weight, bias)
                and not needs_autograd(weight, bias) and not tracing(weight, bias))

    def _forward_checked_inputs(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """``y [..., d_out]``: the backend's ``linear_forward``, what
        :func:`datalora.ops.molora_linear` runs for an inference call, on inputs
        :meth:`_checks_skippable` accepted (the gates and rank scale cast to x's dtype)."""
        gates = cast_routing(routing.gates, x.dtype)
        rank_scale = (None if routing.rank_scale is None
                      else cast_routing(routing.rank_scale, x.dtype))
        x2 = x.reshape(math.prod(x.shape[:-1]), self.in_features)
        backend = get_backend(resolve_backend(self.backend, x.device))
        with eager_call():  # layers sharing a routing share its tables
            y = backend.linear_forward(x2, self.base_layer.weight, self.base_layer.bias,
                                       self.lora_A, self.lora_B, routing.expert_ids, gates,
                                       rank_scale, self.scaling, need_h=False)[0]
        return y.view(*x.shape[:-1], self.out_features)

    def _check_x(self, x: object) -> None:
        """``x``: a floating tensor ``[..., in_features]``."""
        check_tensor("x", x)
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x: expected shape [..., in_features={self.in_features}], "
                             f"got {tuple(x.shape)}")
        check_float("x", x)

    def _check_inputs(self, x: object, routing: object) -> None:
        """``x [..., in_features]`` and ``routing`` (None or a ``Routing`` with float gates
        and rank_scale), named before the router, dropout, base or op would fail on them.
        Outside autocast, x must have the dtype of an ``nn.Linear`` base's weight (unless
        the base's own forward or a pre-hook may convert it)."""
        self._check_x(x)
        if x.device != self.lora_A.device:  # the op named A, which the user never passed
            raise ValueError(f"x: expected device {self.lora_A.device} (that of the layer's "
                             f"LoRA weights), got {x.device}")
        base = self.base_layer
        if (not self._nf4_base and x.dtype != base.weight.dtype
                and not autocast_enabled(x.device.type)
                and type(base).forward is nn.Linear.forward and "forward" not in base.__dict__
                and not base._forward_pre_hooks):
            raise ValueError(f"x: expected dtype {base.weight.dtype} (that of base_layer.weight;"
                             f" torch.autocast mixes dtypes), got {x.dtype}")
        if routing is not None:
            if not isinstance(routing, Routing):
                raise TypeError(f"routing: expected a datalora.Routing or None, "
                                f"got {type(routing).__name__}")
            check_float("gates", routing.gates)
            if routing.rank_scale is not None:
                check_float("rank_scale", routing.rank_scale)

    def _plain_base(self) -> bool:
        """:func:`_plain_linear` of the base (accelerate's hooks replace ``forward`` on the
        instance). Else the layer calls ``base_layer(x)`` with x as given (a custom forward,
        hooks, old-style ``weight_norm``'s pre-hook run as with the adapter disabled) and
        adds the delta."""
        return _plain_linear(self.base_layer)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"num_experts={self.num_experts}, rank={self.rank}, top_k={self.top_k}, "
                f"scaling={self.scaling:g}")
