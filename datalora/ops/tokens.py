"""``gather_tokens`` / ``scatter_tokens``: pack kept tokens of pruned sequences and write back.

Both are custom ops whose backward is expressed with the same two primitives, so a
backend only implements the two forward kernels. In plain eager mode (not traced, not
under a torch.func transform) the same forward, ``setup_context`` and backward run
through a ``torch.autograd.Function`` without the custom-op dispatcher, as
``molora_delta`` / ``molora_linear`` do (:mod:`datalora.ops.molora`); a backward recorded
for a double backward (``create_graph=True``) keeps the registered ops, whose own
autograd differentiates it again.
"""

from __future__ import annotations

import torch

from datalora.ops.backends import get_backend, resolve_backend
from datalora.ops.eager import eager_function, needs_autograd, tracing, under_torch_func
from datalora.ops.validation import check_token_inputs


@torch.library.custom_op("datalora::gather_tokens", mutates_args=())
def _gather_op(hidden: torch.Tensor, keep_idx: torch.Tensor, backend: str) -> torch.Tensor:
    return get_backend(backend).gather_tokens(hidden, keep_idx)


@_gather_op.register_fake
def _(hidden, keep_idx, backend):
    return hidden.new_empty(hidden.shape[0], keep_idx.shape[1], hidden.shape[2])


@torch.library.custom_op("datalora::scatter_tokens", mutates_args=())
def _scatter_op(hidden: torch.Tensor, packed: torch.Tensor, keep_idx: torch.Tensor,
                weight: torch.Tensor | None, backend: str) -> torch.Tensor:
    return get_backend(backend).scatter_tokens(hidden, packed, keep_idx, weight)


@_scatter_op.register_fake
def _(hidden, packed, keep_idx, weight, backend):
    return hidden.new_empty(hidden.shape)  # contiguous, as every backend returns it


def _dispatched(*tensors: torch.Tensor | None) -> bool:
    """Whether the registered ops must run: traced or under a torch.func transform."""
    return tracing(*tensors) or under_torch_func()


def _gather(hidden, keep_idx, backend):
    """The gather of a backward: the backend's kernel, or the op where :func:`_dispatched`
    or where the backward is recorded (grad mode on: ``create_graph=True``)."""
    if torch.is_grad_enabled() or _dispatched(hidden, keep_idx):
        return _gather_op(hidden, keep_idx, backend)
    return get_backend(backend).gather_tokens(hidden, keep_idx)


def _scatter(hidden, packed, keep_idx, weight, backend):
    """The scatter of a backward, as :func:`_gather`."""
    if torch.is_grad_enabled() or _dispatched(hidden, packed, keep_idx, weight):
        return _scatter_op(hidden, packed, keep_idx, weight, backend)
    return get_backend(backend).scatter_tokens(hidden, packed, keep_idx, weight)


def _gather_setup(ctx, inputs, output):
    hidden, keep_idx, backend = inputs
    ctx.save_for_backward(keep_idx)
    ctx.hidden_shape = hidden.shape


def _gather_backward(ctx, grad_packed):
    """Scatter-add: a position gathered twice gets both rows' gradients (gather accepts
    repeated positions; a scatter kernel would keep one of them, on a GPU any one). Ids are
    clamped like the kernels clamp them (unchecked input never indexes out of bounds)."""
    (keep_idx,) = ctx.saved_tensors
    index = keep_idx.long().clamp(0, ctx.hidden_shape[1] - 1)
    index = index[..., None].expand(-1, -1, grad_packed.shape[-1])
    grad = grad_packed.new_zeros(ctx.hidden_shape).scatter_add_(1, index, grad_packed)
    return grad, None, None


def _scatter_setup(ctx, inputs, output):
    hidden, packed, keep_idx, weight, backend = inputs
    ctx.save_for_backward(hidden, packed, keep_idx, weight)
    ctx.backend = backend


def _scatter_backward(ctx, grad_out):
    hidden, packed, keep_idx, weight = ctx.saved_tensors
    grad_out = grad_out.contiguous()
    g_kept = _gather(grad_out, keep_idx, ctx.backend)  # [B, K, d]
    w = None if weight is None else weight.to(g_kept.dtype)[..., None]
    d_hidden = d_packed = d_weight = None
    if ctx.needs_input_grad[0]:
        # kept rows: d/dhidden of hidden + w (packed - hidden) = (1 - w) g
        kept_grad = torch.zeros_like(g_kept) if w is None else g_kept * (1 - w)
        d_hidden = _scatter(grad_out, kept_grad, keep_idx, None, ctx.backend)
    if ctx.needs_input_grad[1]:
        d_packed = g_kept if w is None else g_kept * w
    if weight is not None and ctx.needs_input_grad[3]:
        acc = torch.promote_types(g_kept.dtype, torch.float32)  # the forward's precision
        diff = packed.to(acc) - _gather(hidden, keep_idx, ctx.backend).to(acc)
        d_weight = (g_kept.to(acc) * diff).sum(-1).to(weight.dtype)
    return d_hidden, d_packed, None, d_weight, None


_gather_op.register_autograd(_gather_backward, setup_context=_gather_setup)
_scatter_op.register_autograd(_scatter_backward, setup_context=_scatter_setup)

_EagerGather = eager_function("_EagerGather", "gather_tokens", _gather_setup, _gather_backward)
_EagerScatter = eager_function("_EagerScatter", "scatter_tokens", _scatter_setup,
                               _scatter_backward)


def _run(op, function: type[torch.autograd.Function], *inputs):
    """``op(*inputs)`` where :func:`_dispatched`; in eager mode ``function`` when a gradient
    is needed, else the backend's kernel alone (``inputs``: the op's, the backend last)."""
    tensors = inputs[:-1]
    if _dispatched(*tensors):
        return op(*inputs)
    if needs_autograd(*tensors):
        return function.apply(*inputs)
    return getattr(get_backend(inputs[-1]), function.backend_forward)(*tensors)


def gather_tokens(hidden: torch.Tensor, keep_idx: torch.Tensor,
                  backend: str = "auto", *, check_values: bool = True) -> torch.Tensor:
    """Packs kept tokens: hidden ``[B, L, d]``, keep_idx ``[B, K]`` -> packed ``[B, K, d]``.

    ``check_values``: validate keep_idx's values on the host (a sync; callers that built
    the indices themselves pass False)."""
    check_token_inputs(hidden, keep_idx, check_values=check_values)
    return _run(_gather_op, _EagerGather, hidden, keep_idx,
                resolve_backend(backend, hidden.device))


def scatter_tokens(hidden: torch.Tensor, packed: torch.Tensor, keep_idx: torch.Tensor,
                   weight: torch.Tensor | None = None, backend: str = "auto", *,
                   check_values: bool = True) -> torch.Tensor:
    """Writes packed results back: kept rows become ``hidden + weight * (packed - hidden)``.

    hidden ``[B, L, d]``, packed ``[B, K, d]``, keep_idx ``[B, K]`` distinct per row, weight
    ``[B, K]`` or None (= 1). Other rows equal ``hidden`` (the residual bypass).
    ``check_values``: validate keep_idx's values (in ``[0, L)``, distinct per row) and a
    finite weight on the host (one sync). Returns ``[B, L, d]``.
    """
    check_token_inputs(hidden, keep_idx, packed, weight, check_values=check_values)
    return _run(_scatter_op, _EagerScatter, hidden, packed, keep_idx, weight,
                resolve_backend(backend, hidden.device))
