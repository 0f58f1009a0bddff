"""NF4 base layers for :class:`~datalora.layers.MoLoRALinear` (QLoRA-style frozen 4-bit weights).

- :class:`NF4Linear`: a frozen ``y = x @ dequant(W)^T + bias`` holding an
  :class:`~datalora.nf4.NF4Tensor` as buffers (bitsandbytes layout); built from an
  ``nn.Linear`` (:meth:`NF4Linear.from_linear`, i.e. ``quantize="nf4"``) or wrapping a
  ``bnb.nn.Linear4bit`` without re-quantizing (:meth:`NF4Linear.from_bnb`). Its backward
  re-dequantizes W instead of keeping a full-precision copy alive.
- :func:`nf4_molora_linear`: ``base(x) + molora_delta(...)`` for an NF4 base (``NF4Linear`` or
  an nf4 ``bnb.nn.Linear4bit``); on a GPU with ``datalora._C``, 1..16 tokens and no gradient
  needed it runs the fused decode kernel: one launch that streams the 4-bit weight once, with
  the LoRA shrink computed by the first CTAs alongside and the expand added before the single
  store of y.

  Every other call (large T, training) defaults to ``nf4.dequantize`` + cuBLAS + a separate
  ``molora_delta``. With ``DATALORA_NF4_FUSED=1`` and the triton backend (and the dense shrink
  strategy, ``datalora.ops.triton_backend.choose_strategy``) it instead runs the dense shrink
  and one Triton GEMM that decodes the NF4 tiles in registers and adds the LoRA expand as
  extra K-iterations (``kernels/nf4_fused_linear.py``): W is never materialised in 16 bits
  and y is written once. The backward is ``grad @ dequant(W)`` for x (W is frozen) plus the
  ``datalora::molora_delta_backward`` op. The flag is opt-in because on an H200 it was slower
  than dequantize + cuBLAS (``benchmarks.bench_nf4``, method ``triton_nf4_fused``: 1.17 /
  2.31 ms vs 0.46 / 0.51 ms at T = 2048 / 4096; the target is <= 1.10x the bf16
  ``molora_linear`` at T >= 2048), as ``DATALORA_FUSED_LINEAR`` is for the bf16 fused
  linear.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from datalora import _C_loader, nf4, ops
from datalora.nf4 import NF4Tensor
from datalora.ops.backends import (
    BackendUnavailableError,
    auto_backend,
    environment_backend,
    resolve_backend,
    warn_once,
)
from datalora.ops.layout import expert_rows
from datalora.ops.molora import (
    _DOUBLE_BACKWARD,
    _autocast,
    _create_graph,
    _delta_of,
    _differentiable_grads,
    _flatten,
    _lora_backward,
    _warn_plain_torch,
    linear_flops,
)
from datalora.ops.validation import check_molora_inputs

__all__ = ["NF4Linear", "is_nf4_base", "nf4_base_forward", "nf4_compute_dtype",
           "nf4_fused_enabled", "nf4_molora_linear", "nf4_weight", "quantize_linear"]

_FIELDS = ("data", "absmax", "nested_absmax", "nested_code", "offset")
_SCALE_BUFFERS = tuple(f"weight_{name}" for name in _FIELDS[1:])


class _NF4LinearFn(torch.autograd.Function):
    """``x @ dequant(W)^T + bias`` saving only the 4-bit weight for the backward."""

    @staticmethod
    def forward(ctx, x, bias, t):
        ctx.t = t
        ctx.bias_dtype = None if bias is None else bias.dtype
        bias = None if bias is None else bias.to(x.dtype)
        rows = nf4.cpu_row_chunk(t, x.dtype)
        if rows is None:
            return F.linear(x, nf4.dequantize(t, x.dtype), bias)
        out = nf4.linear_in_chunks(x.reshape(-1, t.shape[1]), t, rows)
        out = out.view(*x.shape[:-1], t.shape[0])
        return out if bias is None else out.add_(bias)

    @staticmethod
    def backward(ctx, grad):
        dx = dbias = None
        if ctx.needs_input_grad[0]:
            rows = nf4.cpu_row_chunk(ctx.t, grad.dtype)
            if rows is None:
                dx = grad @ nf4.dequantize(ctx.t, grad.dtype)
            else:
                d_out, d_in = ctx.t.shape
                dx = nf4.grad_input_in_chunks(grad.reshape(-1, d_out), ctx.t, rows)
                dx = dx.view(*grad.shape[:-1], d_in)
        if ctx.needs_input_grad[1]:
            dbias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
        return dx, dbias, None


def nf4_linear(x: torch.Tensor, weight: NF4Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., d_in] @ dequant(weight)^T + bias`` in x's dtype; weight is ``[d_out, d_in]``."""
    if not isinstance(weight, NF4Tensor):
        raise TypeError(f"weight: expected an NF4Tensor, got {type(weight).__name__}")
    if len(weight.shape) != 2:
        raise ValueError(f"weight: expected shape [d_out, d_in], got {tuple(weight.shape)}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x: expected shape [..., {weight.shape[-1]}] for weight "
                         f"{tuple(weight.shape)}, got {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"x: expected a floating dtype, got {x.dtype}")
    if bias is not None and (not isinstance(bias, torch.Tensor)
                             or tuple(bias.shape) != (weight.shape[0],)):
        got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"bias: expected shape ({weight.shape[0]},), got {got}")
    return _NF4LinearFn.apply(x, bias, weight)


class NF4Linear(nn.Module):
    """Frozen linear layer with an NF4 weight (bitsandbytes layout) and optional bias.

    The packed weight and its scales are buffers (``weight_data``, ``weight_absmax`` and, with
    double quant, ``weight_nested_absmax``, ``weight_nested_code``, ``weight_offset``), so
    ``.to(device)`` and ``state_dict`` carry them; :attr:`weight` reassembles the
    :class:`~datalora.nf4.NF4Tensor`.
    """

    def __init__(self, weight: NF4Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        if not isinstance(weight, NF4Tensor):
            raise TypeError(f"weight: expected an NF4Tensor, got {type(weight).__name__}")
        if len(weight.shape) != 2:
            raise ValueError(f"weight: expected shape [d_out, d_in], got {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        if bias is not None and not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias: expected a torch.Tensor or None, got {type(bias).__name__}")
        if bias is not None and not bias.dtype.is_floating_point:
            raise ValueError(f"bias: expected a floating dtype, got {bias.dtype}")
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias: expected shape ({self.out_features},), got "
                             f"{tuple(bias.shape)}")
        self._meta = (weight.shape, weight.dtype, weight.blocksize)
        for name in _FIELDS:
            self.register_buffer(f"weight_{name}", getattr(weight, name))
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        nf4.warm_code_table(weight.data.device)

    @property
    def weight(self) -> NF4Tensor:
        shape, dtype, blocksize = self._meta
        return NF4Tensor(shape=shape, dtype=dtype, blocksize=blocksize,
                         **{name: getattr(self, f"weight_{name}") for name in _FIELDS})

    @property
    def compute_dtype(self) -> torch.dtype:
        return self._meta[1]

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = False,
                    *, _weight_name: str = "linear.weight") -> NF4Linear:
        """Quantizes ``linear.weight`` to NF4 (same bytes as bitsandbytes would produce).
        ``_weight_name``: what an error about the weight calls it (the caller's argument)."""
        if not isinstance(linear, nn.Linear) or _is_bnb_linear4bit(linear):
            raise TypeError(f"linear: expected a float nn.Linear, got {type(linear).__name__}")
        t = nf4.quantize_named(linear.weight.detach(), blocksize, double_quant, _weight_name)
        return cls(t, None if linear.bias is None else linear.bias.detach())

    @classmethod
    def from_bnb(cls, layer: nn.Module) -> NF4Linear:
        """Wraps a quantized nf4 ``bnb.nn.Linear4bit`` (shares its tensors, no re-quantizing;
        see :meth:`NF4Tensor.from_bnb <datalora.nf4.NF4Tensor.from_bnb>` for a weight
        bitsandbytes repacked for CPU inference, which is copied)."""
        return cls(nf4_weight(layer), layer.bias)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return nf4.dequantize(self.weight, dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nf4_linear(x, self.weight, self.bias)

    def _apply(self, fn, recurse=True):
        """Moves with the module (``.to(device)``, ``.cuda()``), but a dtype cast
        (``.to(torch.bfloat16)``, ``.half()``, ``.float()``, ``model.to(dtype)``) keeps the NF4
        scales fp32, bitsandbytes' format, which the CUDA kernels read as ``float*``; the
        cast sets the compute dtype (what :meth:`dequantize` returns) instead."""
        device = self.weight_data.device
        probes = {fn(torch.empty(0, dtype=d, device=device)).dtype
                  for d in (torch.float32, torch.bfloat16)}
        scales = {k: v for k in _SCALE_BUFFERS if (v := self._buffers.get(k)) is not None}
        super()._apply(fn, recurse)
        for name, scale in scales.items():
            moved = self._buffers[name]
            if moved.dtype != scale.dtype:
                self._buffers[name] = scale.to(moved.device)
        # both probes came back in one dtype: fn casts floats to it; NF4 computes in
        # fp32 / fp16 / bf16 only, so a cast to another (model.double()) keeps the dtype
        cast_to = probes.pop() if len(probes) == 1 else None
        if cast_to in nf4.FLOAT_DTYPES:
            shape, _, blocksize = self._meta
            self._meta = (shape, cast_to, blocksize)
        nf4.warm_code_table(self.weight_data.device)
        return self

    def get_extra_state(self) -> torch.Tensor:
        """``[d_out, d_in, blocksize, dtype code]`` int64: a tensor, so a ``state_dict``
        holding this layer saves as safetensors (``save_pretrained``, ``save_model``)."""
        shape, dtype, blocksize = self._meta
        return torch.tensor([*shape, blocksize, nf4.FLOAT_DTYPES.index(dtype)],
                            dtype=torch.int64)

    def set_extra_state(self, state) -> None:
        """Reads :meth:`get_extra_state`'s tensor (or the dict saved before it was one),
        checked: it comes from a file."""
        try:
            if isinstance(state, dict):  # saved before the extra state was a tensor
                (d_out, d_in), names = state["shape"], [str(d) for d in nf4.FLOAT_DTYPES]
                dtype = nf4.FLOAT_DTYPES[names.index(f"torch.{state['dtype']}")]
                blocksize = state["blocksize"]
            else:
                d_out, d_in, blocksize, code = state.tolist()
                if not 0 <= code < len(nf4.FLOAT_DTYPES):
                    raise ValueError
                dtype = nf4.FLOAT_DTYPES[code]
            blocksize = nf4._check_blocksize("blocksize", blocksize)
            if not (isinstance(d_out, int) and isinstance(d_in, int) and d_out > 0
                    and d_in > 0):
                raise ValueError
        except (ValueError, TypeError, KeyError, AttributeError):
            raise ValueError(f"state: not the extra state of an NF4Linear ([d_out, d_in, "
                             f"blocksize, dtype code]): {state!r}") from None
        self._meta = (torch.Size((d_out, d_in)), dtype, blocksize)

    def extra_repr(self) -> str:
        shape, dtype, blocksize = self._meta
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, blocksize={blocksize}, "
                f"double_quant={self.weight_nested_absmax is not None}, dtype={dtype}")


def _is_bnb_linear4bit(layer: nn.Module) -> bool:
    bnb = sys.modules.get("bitsandbytes")  # a Linear4bit exists only if bnb was imported
    return bnb is not None and isinstance(layer, bnb.nn.Linear4bit)


def is_nf4_base(layer: nn.Module) -> bool:
    """True for an :class:`NF4Linear` or an nf4 ``bnb.nn.Linear4bit``.

    Raises TypeError for a ``Linear4bit`` of another quant type (fp4), which MoLoRA does not
    support as a base.
    """
    if isinstance(layer, NF4Linear):
        return True
    if not _is_bnb_linear4bit(layer):
        return False
    quant_type = getattr(layer.weight, "quant_type", None)
    if quant_type != "nf4":
        raise TypeError(f"base_layer: expected a bnb.nn.Linear4bit with quant_type 'nf4', got "
                        f"{quant_type!r}")
    return True


def nf4_weight(layer: nn.Module) -> NF4Tensor:
    """The :class:`~datalora.nf4.NF4Tensor` of an NF4 base layer (shares storage, but for a
    bitsandbytes weight repacked for CPU inference: a copy in bitsandbytes' layout, see
    :func:`_unpacked_cpu_weight`)."""
    if isinstance(layer, NF4Linear):
        return layer.weight
    if not _is_bnb_linear4bit(layer):
        raise TypeError(f"layer: expected NF4Linear or bnb.nn.Linear4bit, got "
                        f"{type(layer).__name__}")
    if getattr(layer.weight, "quant_state", None) is None:
        raise ValueError("layer: the bnb.nn.Linear4bit weight is not quantized yet (move it to "
                         "its device first, e.g. layer.to('cuda') or layer.to('cpu'))")
    state = layer.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        return _unpacked_cpu_weight(layer.weight)
    if "_datalora_unpacked" in vars(state) and not torch.compiler.is_compiling():
        del state._datalora_unpacked  # bnb undid the packing (state_dict(), a move): stale
    return NF4Tensor.from_bnb(layer.weight)


def _unpacked_cpu_weight(weight) -> NF4Tensor:
    """:meth:`NF4Tensor.from_bnb <datalora.nf4.NF4Tensor.from_bnb>` of a weight bitsandbytes
    repacked for CPU inference (on a ``Linear4bit``'s first no-grad CPU forward with
    AVX512-BF16): a copy, made once per weight version and kept on its quant state, not on
    every forward (7 ms at 2048 x 2048, three times the layer's own T = 1 forward). A write
    through ``.data`` keeps the version and goes unseen (as for any cached tensor state).
    Not cached while compiling (the pointer comparison would break the graph) nor for
    inference tensors (bnb repacked under ``torch.inference_mode``), which have no version."""
    state = weight.quant_state
    if torch.compiler.is_compiling() or weight.is_inference() or state.absmax.is_inference():
        return NF4Tensor.from_bnb(weight)
    key = (weight.data_ptr(), weight._version, state.absmax.data_ptr(), state.absmax._version)
    memo = getattr(state, "_datalora_unpacked", None)
    if memo is None or memo[0] != key:
        memo = (key, NF4Tensor.from_bnb(weight))
        state._datalora_unpacked = memo
    return memo[1]


def nf4_compute_dtype(layer: nn.Module, x_dtype: torch.dtype | None = None) -> torch.dtype:
    """The float dtype an NF4 base computes in: bnb's ``compute_dtype``; a ``Linear4bit``
    without one (never called, built with ``compute_dtype=None``) computes in its input's
    dtype as bitsandbytes does (``x_dtype``; the weight's original dtype when not given)."""
    if isinstance(layer, NF4Linear):
        return layer.compute_dtype
    dtype = getattr(layer, "compute_dtype", None)
    if dtype is None and x_dtype is not None:
        return x_dtype
    if dtype is None:
        state = getattr(layer.weight, "quant_state", None)
        dtype = state.dtype if state is not None else torch.float32
    return dtype


def nf4_base_forward(base: nn.Module, x: torch.Tensor,
                     weight: NF4Tensor | None = None) -> torch.Tensor:
    """``base(x)`` of an NF4 base layer computed by datalora, in x's dtype (``weight``: its
    :func:`nf4_weight` when the caller has it already).

    An :class:`NF4Linear` is called as is. A bnb ``Linear4bit`` is not: bitsandbytes (0.49+)
    repacks the weight in place on its first CPU inference forward, and its packed path has
    no autograd (the base's share of ``x.grad`` would be lost) and rounds absmax to bf16;
    datalora decodes either layout itself (:func:`nf4_weight`) and computes in the layer's
    ``compute_dtype`` as bitsandbytes does (x cast in, the result cast back to x's dtype).
    """
    if isinstance(base, NF4Linear):
        return base(x)
    weight = nf4_weight(base) if weight is None else weight
    out = nf4_linear(x.to(nf4_compute_dtype(base, x.dtype)), weight, base.bias)
    return out.to(x.dtype)


def quantize_linear(layer: nn.Module, quantize: str, blocksize: int = 64,
                    double_quant: bool = False, *, name: str = "layer") -> nn.Module:
    """``quantize="nf4"``: an ``nn.Linear`` becomes an :class:`NF4Linear`; NF4 bases pass.
    An error quantizing the weight names the layer as ``name`` (the caller's argument)."""
    if quantize != "nf4":
        raise ValueError(f"quantize: expected 'nf4', got {quantize!r}")
    if is_nf4_base(layer):
        return layer
    if not isinstance(layer, nn.Linear):
        raise TypeError(f"{name}: expected an nn.Linear to quantize (or an NF4Linear / nf4 "
                        f"bnb.nn.Linear4bit), got {type(layer).__name__}")
    try:
        return NF4Linear.from_linear(layer, blocksize, double_quant,
                                     _weight_name=f"{name}.weight")
    except ValueError as exc:  # e.g. an fp64 weight
        raise ValueError(f"{name}: cannot be quantized to NF4 ({exc})") from None


@torch.library.custom_op("datalora::nf4_molora_decode", mutates_args=())
def _nf4_molora_decode_op(
        x: torch.Tensor, data: torch.Tensor, absmax: torch.Tensor,
        nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None,
        offset: torch.Tensor | None, shape: list[int], blocksize: int,
        bias: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor, expert_ids: torch.Tensor,
        gates: torch.Tensor, rank_scale: torch.Tensor | None, scaling: float,
        check_values: bool = True) -> torch.Tensor:
    t = NF4Tensor(data, absmax, torch.Size(shape), x.dtype, blocksize, nested_absmax,
                  nested_code, offset)
    return _C_loader.nf4_molora_decode_cuda(x, t, bias, A, B, expert_ids, gates, rank_scale,
                                            scaling, check_values)


@_nf4_molora_decode_op.register_fake
def _(x, data, absmax, nested_absmax, nested_code, offset, shape, blocksize, bias, A, B,
      expert_ids, gates, rank_scale, scaling, check_values=True):
    return x.new_empty(x.shape[0], shape[0])


@register_flop_formula(torch.ops.datalora.nf4_molora_decode)
def _nf4_decode_flops(x_shape, data, absmax, nested_absmax, nested_code, offset, shape,
                      blocksize, bias, A_shape, B_shape, ids_shape, *args, out_shape=None,
                      **kwargs) -> int:
    d_out, d_in = shape
    return linear_flops(x_shape[0], ids_shape[1], A_shape[1], d_in, d_out)


def fused_decode_applies(base: NF4Linear, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                         gates: torch.Tensor, rank_scale: torch.Tensor | None = None) -> bool:
    """Whether :func:`nf4_molora_linear` (with ``lora_x is x``) runs the one-launch CUDA
    decode kernel for these inputs, rather than dequantize + GEMM + delta (for benchmarks
    and logs that must name the path that ran)."""
    return _fused_decode_ok(x.reshape(-1, x.shape[-1]), base.weight,
                            (x, A, B, gates, rank_scale, base.bias))


def _fused_decode_ok(x2: torch.Tensor, t: NF4Tensor, tensors) -> bool:
    if x2.device.type != "cuda" or _C_loader.unsupported_reason(x2.device) is not None:
        return False  # the dequantize path runs (and warns once why)
    if any(v is not None and v.device != x2.device for v in tensors):
        return False
    if not _no_grad_needed(tensors):
        return False  # the fused kernel is inference-only
    reason = _C_loader.decode_supported(x2, t)
    if reason is not None and 1 <= x2.shape[0] <= _C_loader.MAX_DECODE_TOKENS:
        # a decode step the kernel was made for, but these inputs (fp32 x, d_in % 32,
        # a misaligned weight) take the slower path: say so once, and why
        _C_loader.warn_fallback("the fused NF4 decode kernel does not take these inputs; "
                                "dequantize + GEMM runs instead", reason)
    return reason is None


NF4_FUSED_ENV = "DATALORA_NF4_FUSED"


def nf4_fused_enabled() -> bool:
    """Whether ``DATALORA_NF4_FUSED`` asks for the one-kernel Triton NF4 linear (``1``; ``0``
    or unset: dequantize + cuBLAS + ``molora_delta``)."""
    value = os.environ.get(NF4_FUSED_ENV, "0")
    if value not in ("0", "1", ""):
        raise ValueError(f"{NF4_FUSED_ENV}: expected '0' or '1', got {value!r}")
    return value == "1"


def _nf4_of(data, absmax, nested_absmax, nested_code, offset, shape, blocksize, dtype):
    return NF4Tensor(data, absmax, torch.Size(shape), dtype, blocksize, nested_absmax,
                     nested_code, offset)


@torch.library.custom_op("datalora::nf4_molora_linear", mutates_args=())
def _nf4_molora_linear_op(
        x: torch.Tensor, lora_x: torch.Tensor, data: torch.Tensor, absmax: torch.Tensor,
        nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None,
        offset: torch.Tensor | None, shape: list[int], blocksize: int,
        bias: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor, expert_ids: torch.Tensor,
        gates: torch.Tensor, rank_scale: torch.Tensor | None,
        scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y [T, d_out], h [T, k, r])``: the dense shrink of ``lora_x`` gives ``Zd`` (and h),
    then one Triton GEMM computes ``x @ dequant(W)^T + bias + Zd @ B_all^T``."""
    from datalora.kernels import nf4_fused_linear as _nfl
    from datalora.ops.triton_backend import (
        _dense_shrink,
        _kernel_gates,
        _rank_scale,
        _route_ids,
        launch_device,
    )

    T = x.shape[0]
    E, r, _ = A.shape
    h = x.new_empty(T, expert_ids.shape[1], r)
    y = x.new_empty(T, shape[0])
    if T == 0:
        return y, h
    with launch_device(x):
        rs, rs_stride = _rank_scale(rank_scale, r, x.device)
        zd = _dense_shrink(lora_x, expert_rows(A), _route_ids(expert_ids),
                           _kernel_gates(gates, lora_x.dtype, "dense"), rs, rs_stride, h, E, r,
                           scaling)
        t = _nf4_of(data, absmax, nested_absmax, nested_code, offset, shape, blocksize, x.dtype)
        _nfl.nf4_fused_linear(x, t, nf4.code_table(x.device), bias, zd, B, E, r, y)
    return y, h


@_nf4_molora_linear_op.register_fake
def _(x, lora_x, data, absmax, nested_absmax, nested_code, offset, shape, blocksize, bias, A, B,
      expert_ids, gates, rank_scale, scaling):
    T, k = expert_ids.shape
    return x.new_empty(x.shape[0], shape[0]), x.new_empty(T, k, A.shape[1])


@torch.library.custom_op("datalora::nf4_grad_x", mutates_args=())
def _nf4_grad_x_op(grad: torch.Tensor, data: torch.Tensor, absmax: torch.Tensor,
                   nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None,
                   offset: torch.Tensor | None, shape: list[int],
                   blocksize: int) -> torch.Tensor:
    """``grad [T, d_out] @ dequant(W) -> [T, d_in]`` (an op, so the backward traces under
    ``torch.compile`` although the torch dequantize indexes a constant code table)."""
    t = _nf4_of(data, absmax, nested_absmax, nested_code, offset, shape, blocksize, grad.dtype)
    return grad @ nf4.dequantize(t, grad.dtype)


@_nf4_grad_x_op.register_fake
def _(grad, data, absmax, nested_absmax, nested_code, offset, shape, blocksize):
    return grad.new_empty(grad.shape[0], shape[1])


def _nf4_linear_setup_context(ctx, inputs, output):
    (x, lora_x, data, absmax, nested_absmax, nested_code, offset, shape, blocksize, _bias, A, B,
     expert_ids, gates, rank_scale, scaling) = inputs
    ctx.save_for_backward(lora_x, A, B, expert_ids, gates, rank_scale, output[1], data, absmax,
                          nested_absmax, nested_code, offset)
    ctx.shape, ctx.blocksize, ctx.dtype, ctx.scaling = shape, blocksize, x.dtype, scaling
    ctx.set_materialize_grads(False)  # h is internal: never fill its gradient with zeros


def _nf4_linear_backward(ctx, grad_y, _grad_h):
    """dx = grad @ dequant(W) (W frozen, re-dequantized), dbias = column sums, and the LoRA
    gradients (d lora_x, dA, dB, dgates, drank_scale) from ``molora_delta_backward``."""
    if grad_y is None:
        return (None,) * 16
    lora_x, A, B, expert_ids, gates, rank_scale, h, *weight = ctx.saved_tensors
    need = ctx.needs_input_grad
    grad = grad_y.to(ctx.dtype).contiguous()
    lora_needs = [need[i] for i in (1, 10, 11, 13, 14)]
    dbias = grad.sum(0) if need[9] else None
    if _create_graph(grad, lora_x):  # differentiable gradients, in plain torch ops
        _warn_plain_torch("triton", *_DOUBLE_BACKWARD)
        dlx, dA, dB, dg, drs = _differentiable_grads(
            _delta_of(expert_ids, ctx.scaling), (lora_x, A, B, gates, rank_scale), lora_needs,
            grad)
        w = nf4.dequantize(_nf4_of(*weight, ctx.shape, ctx.blocksize, grad.dtype), grad.dtype)
        dx = grad @ w if need[0] else None
        return (dx, dlx, None, None, None, None, None, None, None, dbias, dA, dB, None, dg, drs,
                None)
    lora = _lora_backward(grad, lora_x, A, B, expert_ids, gates, rank_scale, h,
                          ctx.scaling, "triton", lora_needs)
    dlx, dA, dB, dg, drs = (g if n else None for g, n in zip(lora, lora_needs, strict=True))
    dx = _nf4_grad_x_op(grad, *weight, ctx.shape, ctx.blocksize) if need[0] else None
    return (dx, dlx, None, None, None, None, None, None, None, dbias, dA, dB, None, dg, drs,
            None)


@register_flop_formula(torch.ops.datalora.nf4_molora_linear)
def _nf4_linear_flops(x_shape, lora_x_shape, data, absmax, nested_absmax, nested_code, offset,
                      shape, blocksize, bias, A_shape, B_shape, ids_shape, *args,
                      out_shape=None, **kwargs) -> int:
    d_out, d_in = shape
    return linear_flops(x_shape[0], ids_shape[1], A_shape[1], d_in, d_out)


@register_flop_formula(torch.ops.datalora.nf4_grad_x)
def _nf4_grad_x_flops(grad_shape, data, absmax, nested_absmax, nested_code, offset, shape,
                      blocksize, out_shape=None, **kwargs) -> int:
    return 2 * grad_shape[0] * shape[0] * shape[1]


_nf4_molora_linear_op.register_autograd(_nf4_linear_backward,
                                        setup_context=_nf4_linear_setup_context)


def _triton_fused_ok(x: torch.Tensor, t: NF4Tensor, A: torch.Tensor, expert_ids: torch.Tensor,
                     backend: str) -> bool:
    """``DATALORA_NF4_FUSED=1``, the triton backend, x a float tensor on the weight's device
    and the dense shrink strategy (for the grouped one ``Zd`` would cost ``E/k`` times the
    routed work, as in ``triton_backend.linear_forward``)."""
    if not nf4_fused_enabled() or x.dtype not in nf4.FLOAT_DTYPES or x.device != t.device:
        return False
    if A.dim() != 3 or expert_ids.dim() < 1:
        return False
    if resolve_backend(backend, x.device) != "triton":
        warn_once(f"datalora: {NF4_FUSED_ENV}=1 has no effect off the triton backend: NF4 "
                  f"layers run dequantize + GEMM + molora_delta")
        return False
    from datalora.ops.triton_backend import choose_strategy

    if choose_strategy(A.shape[0], A.shape[1], expert_ids.shape[-1]) != "dense":
        warn_once(f"datalora: {NF4_FUSED_ENV}=1 has no effect on layers of the grouped "
                  f"strategy (large E*r): they run dequantize + GEMM + molora_delta")
        return False
    return True


def _triton_fused(base, t, x, lora_x, A, B, expert_ids, gates, rank_scale, scaling,
                  check_values):
    """Validated call of ``datalora::nf4_molora_linear``; x/lora_x ``[..., d_in]`` ->
    ``[..., d_out]``."""
    if lora_x.shape != x.shape:
        raise ValueError(f"lora_x: expected shape {tuple(x.shape)} (x's), got "
                         f"{tuple(lora_x.shape)}")
    x2, ids, g, rs = _flatten(x, expert_ids, gates, rank_scale)
    lx2 = x2 if lora_x is x else lora_x.reshape(x2.shape)
    x2, lx2, A, B, bias = _autocast(x2, lx2, A, B, base.bias)
    check_molora_inputs(lx2, A, B, ids, g, rs, check_values)
    d_out, d_in = t.shape
    if x2.shape[1] != d_in or x2.dtype != lx2.dtype:
        raise ValueError(f"x: expected shape [..., {d_in}] and lora_x's dtype {lx2.dtype} for "
                         f"weight {tuple(t.shape)}, got {tuple(x.shape)} {x2.dtype}")
    if B.shape[1] != d_out:
        raise ValueError(f"B: expected shape [E, d_out={d_out}, r] (d_out of the NF4 weight), "
                         f"got {tuple(B.shape)}")
    bias = None if bias is None else bias.to(x2.dtype).contiguous()
    y, _ = _nf4_molora_linear_op(x2, lx2, t.data, t.absmax, t.nested_absmax, t.nested_code,
                                 t.offset, list(t.shape), t.blocksize, bias, A, B, ids, g, rs,
                                 float(scaling))
    return y.view(*x.shape[:-1], d_out)


def _lora_backend(backend: str, x: torch.Tensor) -> str:
    """The ``datalora.ops`` backend of the LoRA part: ``"cuda"`` (or ``"auto"`` with
    ``DATALORA_BACKEND=cuda``) names the NF4 extension (the decode kernel and the
    dequantize), so it must be able to run, and the MoLoRA ops around it run the backend
    ``"auto"`` picks on x's device (not ``DATALORA_BACKEND``'s ``cuda``, which has no
    MoLoRA ops)."""
    chosen_by = ""
    if backend == "auto" and environment_backend() == "cuda":
        backend, chosen_by = "cuda", " (chosen by DATALORA_BACKEND (environment))"
    if backend != "cuda":
        return backend
    why = (f"device {x.device}" if x.device.type != "cuda"
           else _C_loader.unsupported_reason(x.device))
    if why is not None:
        raise BackendUnavailableError(f"backend 'cuda' (the datalora._C NF4 kernels) needs a "
                                      f"CUDA device and the built extension; {why}"
                                      f"{chosen_by}")
    return auto_backend(x.device.type)


def _computes_in_x_dtype(base: nn.Module, x: torch.Tensor) -> bool:
    """Whether the base computes in x's dtype (an ``NF4Linear`` always; a bnb
    ``Linear4bit`` when x has its ``compute_dtype``): what the paths that dequantize the
    weight to x's dtype (the fused kernels, ``molora_linear``) compute."""
    return isinstance(base, NF4Linear) or x.dtype == nf4_compute_dtype(base, x.dtype)


def _warn_compute_dtype(compute: torch.dtype, x_dtype: torch.dtype) -> None:
    """Once per dtype pair: a bnb base whose ``compute_dtype`` is not its input's (reported
    at the MoLoRALinear forward that took it; under torch.compile, while it is traced). Not
    a cached function, which dynamo would trace through uncached, warning of that: the
    message costs a few microseconds on a path that already casts the layer's input."""
    warn_once(
        f"datalora: a bnb Linear4bit base with compute_dtype={compute} gets {x_dtype} inputs: "
        f"its GEMM runs in {compute} with casts in and out (as bitsandbytes computes), and "
        f"the NF4 fast paths (the CUDA decode kernel, the Triton NF4 GEMM, the one-pass "
        f"no-grad forward) need the two equal; set bnb_4bit_compute_dtype={x_dtype} in "
        f"BitsAndBytesConfig (or the layer's compute_dtype)", stacklevel=4)


def _no_grad_needed(tensors) -> bool:
    """Whether none of ``tensors`` (None allowed) needs a gradient here."""
    return not (torch.is_grad_enabled()
                and any(v is not None and v.requires_grad for v in tensors))


def nf4_molora_linear(base: nn.Module, x: torch.Tensor, lora_x: torch.Tensor,
                      A: torch.Tensor, B: torch.Tensor, expert_ids: torch.Tensor,
                      gates: torch.Tensor, rank_scale: torch.Tensor | None = None,
                      scaling: float = 1.0, backend: str = "auto", *,
                      check_values: bool = True) -> torch.Tensor:
    """``base(x) + molora_delta(lora_x, A, B, ...)`` for an NF4 base layer.

    ``lora_x`` is the LoRA input (x after dropout; x itself in eval). Shapes as
    :func:`datalora.ops.molora_delta`. Paths: the CUDA decode kernel (1..16 tokens, no
    gradient), the Triton NF4 GEMM (``DATALORA_NF4_FUSED=1``, triton backend, dense
    strategy), without a gradient ``molora_linear`` over the dequantized weight (the expand
    accumulates into the base GEMM's output), else the base (:func:`nf4_base_forward`) +
    ``molora_delta`` (module docstring).
    """
    t = nf4_weight(base)
    backend = _lora_backend(backend, x)
    # routing flattened (and its layout checked) as the ops do: a reshape to [T, -1] would
    # take routing of another layout, e.g. [L, B, k] for x [B, L, d], mixing tokens
    x2, ids, g, rs = _flatten(x, expert_ids, gates, rank_scale)
    same_dtype = _computes_in_x_dtype(base, x)
    if not same_dtype:
        _warn_compute_dtype(nf4_compute_dtype(base, x.dtype), x.dtype)
    tensors = (x, A, B, gates, rank_scale, base.bias)
    if lora_x is x and same_dtype and _fused_decode_ok(x2, t, tensors):
        bias = None if base.bias is None else base.bias.to(x.dtype)
        y = _nf4_molora_decode_op(x2, t.data, t.absmax, t.nested_absmax, t.nested_code,
                                  t.offset, list(t.shape), t.blocksize, bias, A, B, ids, g, rs,
                                  float(scaling), check_values)
        return y.view(*x.shape[:-1], t.shape[0])
    if same_dtype and _triton_fused_ok(x, t, A, expert_ids, backend):
        return _triton_fused(base, t, x, lora_x, A, B, expert_ids, gates, rank_scale, scaling,
                             check_values)
    if lora_x is x and same_dtype and _no_grad_needed(tensors):
        # no backward, so the dequantized W need not be kept: molora_linear writes y once,
        # the expand accumulating into the base GEMM's output (no separate delta + add)
        bias = None if base.bias is None else base.bias.to(x.dtype)
        return ops.molora_linear(x, nf4.dequantize(t, x.dtype), bias, A, B, expert_ids, gates,
                                 rank_scale, scaling, backend, check_values=check_values)
    delta = ops.molora_delta(lora_x, A, B, expert_ids, gates, rank_scale, scaling, backend,
                             check_values=check_values)
    return nf4_base_forward(base, x, t).to(delta.dtype) + delta
