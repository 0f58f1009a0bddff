"""``molora_delta`` / ``molora_linear``: validated entry points over registered custom ops.

Each op is a ``torch.library.custom_op`` with a fake (meta) kernel and an autograd
formula, so it traces under ``torch.compile(fullgraph=True)`` and CUDA graphs. The
concrete backend is resolved before the op is called and passed as a string.

In plain eager mode the same forward, ``setup_context`` and backward run through a
``torch.autograd.Function`` instead (:func:`datalora.ops.eager.tracing` decides): the
custom-op dispatcher costs about 0.2-0.3 ms of host time per layer forward + backward,
which dominates small models (28 MoLoRA layers of the embedded tiny model). Both paths
call the same backend functions, so they give bit-identical results (tested). Without
autograd (no input requires grad, or grad mode off) the eager path calls the backend
directly.

Inside a torch.func transform (``grad``, ``vmap``, ``jacrev``, ``jvp``: per-sample
gradients, Jacobians) neither composes (their autograd is a custom one), so the ops run
the torch backend's math as plain torch ops there, which the transforms handle like any
torch code (a one-time warning when that replaces GPU kernels). Likewise a backward run
with ``create_graph=True`` (gradient penalties, Hessian-vector products) recomputes its
gradients through that math, so autograd can differentiate them again; the kernels'
backward is not itself differentiable.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from datalora.checks import check_bool, check_number
from datalora.ops import torch_backend
from datalora.ops.backends import get_backend, resolve_backend
from datalora.ops.eager import (
    eager_call,
    eager_function,
    needs_autograd,
    tracing,
    under_torch_func,
)
from datalora.ops.validation import (
    check_linear_inputs,
    check_molora_inputs,
    check_tensor,
)

_EMPTY = torch.empty(0)


@torch.library.custom_op("datalora::molora_delta", mutates_args=())
def _molora_delta_op(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                     expert_ids: torch.Tensor, gates: torch.Tensor,
                     rank_scale: torch.Tensor | None, scaling: float,
                     backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    delta, h = get_backend(backend).delta_forward(x, A, B, expert_ids, gates, rank_scale,
                                                  scaling)
    return delta, h


@_molora_delta_op.register_fake
def _(x, A, B, expert_ids, gates, rank_scale, scaling, backend):
    T, k = expert_ids.shape
    return x.new_empty(x.shape[0], B.shape[1]), x.new_empty(T, k, A.shape[1])


@torch.library.custom_op("datalora::molora_delta_backward", mutates_args=())
def _molora_delta_backward_op(
        grad: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
        expert_ids: torch.Tensor, gates: torch.Tensor, rank_scale: torch.Tensor | None,
        h: torch.Tensor, scaling: float, backend: str, needs: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = get_backend(backend).delta_backward(grad, x, A, B, expert_ids, gates, rank_scale,
                                                h, scaling, tuple(needs))
    # custom ops cannot return None: an ungraded input gets an empty placeholder
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@_molora_delta_backward_op.register_fake
def _(grad, x, A, B, expert_ids, gates, rank_scale, h, scaling, backend, needs):
    like = (x, A, B, gates, rank_scale)
    grads = [t.new_empty(t.shape) if need else x.new_empty(0)
             for t, need in zip(like, needs, strict=True)]
    if needs[2]:  # dB comes with B's strides (datalora.ops.layout)
        grads[2] = torch.empty_like(B)
    return tuple(grads)


_warned_plain_torch: set[tuple[str, str]] = set()


def _warn_plain_torch(backend: str, where: str, why: str) -> None:
    """Warns once per (backend, situation) that the ops run as plain torch ops ``where``
    instead of ``backend``'s kernels; nothing to say for the torch backend."""
    if backend != "torch" and (backend, where) not in _warned_plain_torch:
        _warned_plain_torch.add((backend, where))
        warnings.warn(f"datalora ops {where} run as plain torch ops, not the {backend!r} "
                      f"kernels ({why})", UserWarning, stacklevel=5)


def _create_graph(grad: torch.Tensor, x: torch.Tensor) -> bool:
    """True when this backward runs with ``create_graph=True`` (autograd keeps grad mode on
    for it) in eager mode: its gradients will be differentiated again."""
    return torch.is_grad_enabled() and not tracing(grad, x)


def _differentiable_grads(fn, inputs, needs, grad: torch.Tensor) -> list[torch.Tensor | None]:
    """Gradients of ``fn(*inputs)`` weighted by ``grad`` for the inputs flagged in ``needs``
    (None for the others), recorded by autograd so they can be differentiated again: the
    backward of a double backward. The inputs are the tensors the forward saved, which
    keep their autograd history."""
    wrt = [t for t, need in zip(inputs, needs, strict=True) if need]
    if not wrt:
        return [None] * len(needs)
    grads = iter(torch.autograd.grad(fn(*inputs), wrt, grad, create_graph=True,
                                     allow_unused=True))
    return [next(grads) if need else None for need in needs]


def _delta_of(expert_ids: torch.Tensor, scaling: float):
    """``(x, A, B, gates, rank_scale) -> delta`` in plain torch ops for one routing."""
    def delta(x, A, B, gates, rank_scale):
        return torch_backend.delta_composite(x, A, B, expert_ids, gates, rank_scale, scaling)
    return delta


_DOUBLE_BACKWARD = ("in a double backward (create_graph=True)",
                    "the kernels' backward is not itself differentiable")


def _lora_backward(grad, x, A, B, expert_ids, gates, rank_scale, h, scaling, backend, needs,
                   dx_out=None):
    """``(dx, dA, dB, dgates, drank_scale)``; entries not in ``needs`` are None or empty.

    ``dx_out`` ``[T, d_in]`` (optional): dx is added into it, in place in eager mode.
    """
    if tracing(grad, x):
        grads = _molora_delta_backward_op(grad, x, A, B, expert_ids, gates, rank_scale, h,
                                          scaling, backend, needs)
        if dx_out is None or not needs[0]:
            return grads
        return (dx_out + grads[0], *grads[1:])
    return get_backend(backend).delta_backward(grad, x, A, B, expert_ids, gates, rank_scale,
                                               h, scaling, tuple(needs), dx_out)


def _delta_setup_context(ctx, inputs, output):
    x, A, B, expert_ids, gates, rank_scale, scaling, backend = inputs
    ctx.save_for_backward(x, A, B, expert_ids, gates, rank_scale, output[1])
    ctx.scaling, ctx.backend = scaling, backend
    ctx.set_materialize_grads(False)  # h is internal: never fill its gradient with zeros


def _delta_backward(ctx, grad_delta, _grad_h):
    if grad_delta is None:  # undefined gradient: nothing flows back
        return (None,) * 8
    x, A, B, expert_ids, gates, rank_scale, h = ctx.saved_tensors
    needs = [ctx.needs_input_grad[i] for i in (0, 1, 2, 4, 5)]
    if _create_graph(grad_delta, x):
        _warn_plain_torch(ctx.backend, *_DOUBLE_BACKWARD)
        dx, dA, dB, dg, drs = _differentiable_grads(
            _delta_of(expert_ids, ctx.scaling), (x, A, B, gates, rank_scale), needs,
            grad_delta.to(x.dtype))
        return dx, dA, dB, None, dg, drs, None, None
    dx, dA, dB, dg, drs = _lora_backward(
        grad_delta.to(x.dtype).contiguous(), x, A, B, expert_ids, gates, rank_scale, h, ctx.scaling,
        ctx.backend, needs)
    grads = [g if need else None for g, need in zip((dx, dA, dB, dg, drs), needs, strict=True)]
    return grads[0], grads[1], grads[2], None, grads[3], grads[4], None, None


_molora_delta_op.register_autograd(_delta_backward, setup_context=_delta_setup_context)


@torch.library.custom_op("datalora::molora_linear", mutates_args=())
def _molora_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      A: torch.Tensor, B: torch.Tensor, expert_ids: torch.Tensor,
                      gates: torch.Tensor, rank_scale: torch.Tensor | None, scaling: float,
                      backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return get_backend(backend).linear_forward(x, weight, bias, A, B, expert_ids, gates,
                                               rank_scale, scaling)


@_molora_linear_op.register_fake
def _(x, weight, bias, A, B, expert_ids, gates, rank_scale, scaling, backend):
    T, k = expert_ids.shape
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(T, k, A.shape[1])


def _linear_setup_context(ctx, inputs, output):
    x, weight, bias, A, B, expert_ids, gates, rank_scale, scaling, backend = inputs
    # the weight serves dx only (and its own gradient's double backward): under autocast it
    # is a fresh low-precision copy, not worth keeping when x needs no gradient
    need = getattr(ctx, "needs_input_grad", None)
    if need is not None and not (need[0] or need[1]):
        weight = None
    ctx.save_for_backward(x, weight, A, B, expert_ids, gates, rank_scale, output[1])
    ctx.scaling, ctx.backend, ctx.has_bias = scaling, backend, bias is not None
    ctx.set_materialize_grads(False)


def _linear_backward(ctx, grad_y, _grad_h):
    if grad_y is None:
        return (None,) * 10
    x, weight, A, B, expert_ids, gates, rank_scale, h = ctx.saved_tensors
    need = ctx.needs_input_grad
    grad_y = grad_y.to(x.dtype).contiguous()
    dbias = grad_y.sum(0) if ctx.has_bias and need[2] else None
    if _create_graph(grad_y, x):
        _warn_plain_torch(ctx.backend, *_DOUBLE_BACKWARD)
        delta = _delta_of(expert_ids, ctx.scaling)
        dx, dW, dA, dB, dg, drs = _differentiable_grads(
            lambda x, W, A, B, g, rs: delta(x, A, B, g, rs) if W is None
            else F.linear(x, W) + delta(x, A, B, g, rs),
            (x, weight, A, B, gates, rank_scale), [need[i] for i in (0, 1, 3, 4, 6, 7)],
            grad_y)
        return dx, dW, dbias, dA, dB, None, dg, drs, None, None
    lora_needs = [need[i] for i in (0, 3, 4, 6, 7)]
    base_dx = grad_y @ weight if need[0] else None  # the LoRA part of dx is added into it
    dx, dA, dB, dg, drs = _lora_backward(
        grad_y, x, A, B, expert_ids, gates, rank_scale, h, ctx.scaling, ctx.backend, lora_needs,
        base_dx)
    dx = dx if need[0] else None
    dW = grad_y.T @ x if need[1] else None
    lora = [g if n else None for g, n in zip((dA, dB, dg, drs), lora_needs[1:], strict=True)]
    return dx, dW, dbias, lora[0], lora[1], None, lora[2], lora[3], None, None


_molora_linear_op.register_autograd(_linear_backward, setup_context=_linear_setup_context)


# FLOP formulas (torch.utils.flop_counter.FlopCounterMode; under it the custom ops run):
# the routed work, 2 T k r per d of shrink and expand, whatever the strategy (the torch
# backend's dense shrink / expand does E / k times that); plus the base GEMM.

def lora_flops(T: int, k: int, r: int, d_in: int, d_out: int) -> int:
    """FLOPs of one MoLoRA forward's routed work: shrink ``2 T k r d_in`` + expand
    ``2 T k r d_out``."""
    return 2 * T * k * r * (d_in + d_out)


@register_flop_formula(torch.ops.datalora.molora_delta)
def _delta_flops(x_shape, A_shape, B_shape, ids_shape, *args, out_shape=None, **kwargs) -> int:
    return lora_flops(x_shape[0], ids_shape[1], A_shape[1], A_shape[2], B_shape[1])


def linear_flops(T: int, k: int, r: int, d_in: int, d_out: int) -> int:
    """FLOPs of one MoLoRA linear forward: the base GEMM ``2 T d_in d_out`` +
    :func:`lora_flops`."""
    return 2 * T * d_in * d_out + lora_flops(T, k, r, d_in, d_out)


@register_flop_formula(torch.ops.datalora.molora_linear)
def _linear_flops(x_shape, w_shape, bias_shape, A_shape, B_shape, ids_shape, *args,
                  out_shape=None, **kwargs) -> int:
    d_out, d_in = w_shape
    return linear_flops(x_shape[0], ids_shape[1], A_shape[1], d_in, d_out)


@register_flop_formula(torch.ops.datalora.molora_delta_backward)
def _delta_backward_flops(grad_shape, x_shape, A_shape, B_shape, ids_shape, gates_shape,
                          rank_scale_shape, h_shape, scaling, backend, needs, out_shape=None,
                          **kwargs) -> int:
    """dB and ``dz = dy B`` (each the expand's FLOPs), dx and dA (each the shrink's)."""
    need_x, need_A, need_B, need_g, need_rs = needs
    T, k, r = h_shape
    expand, shrink = 2 * T * k * r * B_shape[1], 2 * T * k * r * A_shape[2]
    dz = need_x or need_A or need_g or need_rs
    return expand * (need_B + dz) + shrink * (need_x + need_A)


_EagerMoLoRADelta = eager_function("_EagerMoLoRADelta", "delta_forward",
                                    _delta_setup_context, _delta_backward)
_EagerMoLoRALinear = eager_function("_EagerMoLoRALinear", "linear_forward",
                                     _linear_setup_context, _linear_backward)


def _composite_delta(x, A, B, ids, gates, rank_scale, scaling, backend: str):
    """Under a torch.func transform: the torch backend's math as plain torch ops
    (:func:`~datalora.ops.torch_backend.delta_composite`); the kernels' custom autograd
    does not compose with the transforms. Warns once when that replaces GPU kernels."""
    _warn_plain_torch(backend, "under a torch.func transform",
                      "their custom autograd does not compose with grad / vmap / jacrev")
    return torch_backend.delta_composite(x, A, B, ids, gates, rank_scale, scaling)


def _run_eager(function: type[torch.autograd.Function], *inputs):
    """Eager call: through ``function`` (from :func:`datalora.ops.eager.eager_function`)
    when a gradient is needed, else its backend forward directly (no autograd node:
    inference pays only the backend's host time). Returns the op's first output."""
    if needs_autograd(*inputs[:-1]):
        return function.apply(*inputs)[0]
    with eager_call():
        forward = getattr(get_backend(inputs[-1]), function.backend_forward)
        return forward(*inputs[:-1], need_h=False)[0]


def _check_scaling(scaling: object) -> float:
    """``scaling`` as a float: a finite real number (a tensor is refused, its gradient would
    be dropped); a symbolic float of a ``torch.compile`` trace passes."""
    if isinstance(scaling, torch.SymFloat) or torch.compiler.is_compiling():
        return scaling  # traced: a symbolic float under dynamic=True (checked when eager)
    return check_number("scaling", scaling)


def _flatten(x, expert_ids, gates, rank_scale):
    """Flattens leading batch dims: x ``[..., d_in] -> [T, d_in]``, routing to ``[T, *]``."""
    check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError(f"x: expected shape [..., d_in], got {tuple(x.shape)}")
    x2 = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # not -1: d_in may be 0
    check_tensor("expert_ids", expert_ids)
    check_tensor("gates", gates)
    if rank_scale is not None:
        check_tensor("rank_scale", rank_scale)
    flat = []
    for name, t in (("expert_ids", expert_ids), ("gates", gates), ("rank_scale", rank_scale)):
        if t is not None and t.dim() > 2:
            if t.shape[:-1] != x.shape[:-1]:  # same T in another layout would mix tokens
                raise ValueError(f"{name}: expected leading dims {tuple(x.shape[:-1])} (those "
                                 f"of x) or [T, *], got shape {tuple(t.shape)}")
            t = t.reshape(-1, t.shape[-1])
        flat.append(t)
    return x2, *flat


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (False for one without autocast: meta)."""
    return (torch.amp.is_autocast_available(device_type)
            and torch.is_autocast_enabled(device_type))


def _autocast(*tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Under autocast, casts the GEMM operands to the autocast dtype (as F.linear would).
    A device type without autocast (``meta``) is left as is."""
    device_type = tensors[0].device.type
    if not autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    # float64 is not autocast-eligible: F.linear keeps it in float64
    return tuple(t.to(dtype) if t is not None and t.is_floating_point()
                 and t.dtype != torch.float64 else t for t in tensors)


def molora_delta(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, expert_ids: torch.Tensor,
                 gates: torch.Tensor, rank_scale: torch.Tensor | None = None,
                 scaling: float = 1.0, backend: str = "auto", *,
                 check_values: bool = True) -> torch.Tensor:
    """The MoLoRA update of token t: ``scaling * sum_j gates[t, j] * B[e] @ (rank_scale[t] *
    (A[e] @ x[t]))`` with ``e = expert_ids[t, j]`` (the README's formula).

    Args:
        x: ``[..., d_in]`` tokens (leading dims are flattened to T).
        A: ``[E, r, d_in]`` expert down-projections; B: ``[E, d_out, r]`` up-projections.
        expert_ids: ``[T, k]`` int32/int64 routed experts per token.
        gates: ``[T, k]`` float gate of each route.
        rank_scale: optional ``[T, r]`` per-token soft mask over rank dimensions.
        scaling: ``lora_alpha / r``.
        backend: ``"auto" | "torch" | "triton"`` (``DATALORA_BACKEND`` overrides auto);
            ``"cuda"`` (the ``datalora._C`` extension runs NF4 kernels only) is refused
            with :class:`~datalora.ops.backends.BackendUnavailableError`.
        check_values: validate expert ids and gates on the host (eager only; a sync). Layers
            sharing one :class:`~datalora.routing.Routing` check it once and pass False.

    Returns:
        ``[..., d_out]`` delta in x's dtype (the autocast dtype under ``torch.autocast``).
    """
    scaling = _check_scaling(scaling)
    check_bool("check_values", check_values)
    x2, ids, g, rs = _flatten(x, expert_ids, gates, rank_scale)
    x2, A, B = _autocast(x2, A, B)
    functional = under_torch_func()  # the composite path (values checked but under vmap)
    check_molora_inputs(x2, A, B, ids, g, rs, check_values)
    name = resolve_backend(backend, x.device)
    inputs = (x2, A, B, ids, g, rs, float(scaling), name)
    if functional:
        delta = _composite_delta(*inputs)
    else:
        delta = (_molora_delta_op(*inputs)[0] if tracing(x2, A, B, g, rs)
                 else _run_eager(_EagerMoLoRADelta, *inputs))
    return delta.view(*x.shape[:-1], B.shape[1])


def molora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  A: torch.Tensor, B: torch.Tensor, expert_ids: torch.Tensor,
                  gates: torch.Tensor, rank_scale: torch.Tensor | None = None,
                  scaling: float = 1.0, backend: str = "auto", *,
                  check_values: bool = True) -> torch.Tensor:
    """``y = x @ weight.T + bias + molora_delta(x, ...)``; shapes as in :func:`molora_delta`.

    weight is ``[d_out, d_in]`` in x's dtype, bias ``[d_out]`` or None. Under
    ``torch.autocast`` x, weight, bias, A and B are cast to the autocast dtype.
    """
    scaling = _check_scaling(scaling)
    check_bool("check_values", check_values)
    x2, ids, g, rs = _flatten(x, expert_ids, gates, rank_scale)
    x2, weight, bias, A, B = _autocast(x2, weight, bias, A, B)
    functional = under_torch_func()
    check_molora_inputs(x2, A, B, ids, g, rs, check_values)
    check_linear_inputs(x2, weight, bias)
    if weight.shape[0] != B.shape[1]:
        raise ValueError(f"B: expected shape [E, d_out={weight.shape[0]}, r] (d_out of weight),"
                         f" got {tuple(B.shape)}")
    name = resolve_backend(backend, x.device)
    if functional:
        y = F.linear(x2, weight, bias) + _composite_delta(x2, A, B, ids, g, rs, float(scaling),
                                                          name)
        return y.view(*x.shape[:-1], weight.shape[0])
    inputs = (x2, weight, bias, A, B, ids, g, rs, float(scaling), name)
    y = (_molora_linear_op(*inputs)[0] if tracing(x2, weight, bias, A, B, g, rs)
         else _run_eager(_EagerMoLoRALinear, *inputs))
    return y.view(*x.shape[:-1], weight.shape[0])
