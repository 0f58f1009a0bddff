"""NF4 base layers for :class:`~datalora.layers.MoLoRALinear` (QLoRA-style frozen 4-bit weights).

- :class:`NF4Linear`: a frozen ``y = x @ dequant(W)^T + bias`` holding an
  :class:`~datalora.nf4.NF4Tensor` as buffers (bitsandbytes layout); built from an
  ``nn.Linear`` (:meth:`NF4Linear.from_linear`, i.e. ``quantize="nf4"``) or wrapping a
  ``bnb.nn.Linear4bit`` without re-quantizing (:meth:`NF4Linear.from_bnb`). Its backward
  re-dequantizes W instead of keeping a full-precision copy alive.
- :func:`nf4_molora_linear`: ``base(x) + molora_delta(...)`` for an NF4 base (``NF4Linear`` or
  an nf4 ``bnb.nn.Linear4bit``); on a GPU with ``datalora._C``, 1..16 tokens and no gradient
  needed it runs the fused decode kernel (one pass over the 4-bit weight, LoRA expand in the
  same kernel).
"""

from __future__ import annotations

import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from datalora import _C_loader, nf4, ops
from datalora.nf4 import NF4Tensor

__all__ = ["NF4Linear", "is_nf4_base", "nf4_compute_dtype", "nf4_molora_linear",
           "nf4_weight", "quantize_linear"]

_FIELDS = ("data", "absmax", "nested_absmax", "nested_code", "offset")


class _NF4LinearFn(torch.autograd.Function):
    """``x @ dequant(W)^T + bias`` saving only the 4-bit weight for the backward."""

    @staticmethod
    def forward(ctx, x, bias, t):
        ctx.t = t
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.linear(x, nf4.dequantize(t, x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        dx = dbias = None
        if ctx.needs_input_grad[0]:
            dx = grad @ nf4.dequantize(ctx.t, grad.dtype)
        if ctx.needs_input_grad[1]:
            dbias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
        return dx, dbias, None


def nf4_linear(x: torch.Tensor, weight: NF4Tensor, bias: torch.Tensor | None = None):
    """``x [..., d_in] @ dequant(weight)^T + bias`` in x's dtype; weight is ``[d_out, d_in]``."""
    if len(weight.shape) != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x: expected shape [..., {weight.shape[-1]}] for weight "
                         f"{tuple(weight.shape)}, got {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"x: expected a floating dtype, got {x.dtype}")
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
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"bias: expected shape ({self.out_features},), got "
                             f"{tuple(bias.shape)}")
        self._meta = (weight.shape, weight.dtype, weight.blocksize)
        for name in _FIELDS:
            self.register_buffer(f"weight_{name}", getattr(weight, name))
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @property
    def weight(self) -> NF4Tensor:
        shape, dtype, blocksize = self._meta
        return NF4Tensor(shape=shape, dtype=dtype, blocksize=blocksize,
                         **{name: getattr(self, f"weight_{name}") for name in _FIELDS})

    @property
    def compute_dtype(self) -> torch.dtype:
        return self._meta[1]

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64,
                    double_quant: bool = False) -> NF4Linear:
        """Quantizes ``linear.weight`` to NF4 (same bytes as bitsandbytes would produce)."""
        if not isinstance(linear, nn.Linear) or _is_bnb_linear4bit(linear):
            raise TypeError(f"linear: expected a float nn.Linear, got {type(linear).__name__}")
        t = nf4.quantize(linear.weight.detach(), blocksize, double_quant)
        return cls(t, None if linear.bias is None else linear.bias.detach())

    @classmethod
    def from_bnb(cls, layer: nn.Module) -> NF4Linear:
        """Wraps a quantized nf4 ``bnb.nn.Linear4bit`` (shares its tensors, no re-quantizing)."""
        return cls(nf4_weight(layer), layer.bias)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return nf4.dequantize(self.weight, dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nf4_linear(x, self.weight, self.bias)

    def get_extra_state(self):
        shape, dtype, blocksize = self._meta
        return {"shape": list(shape), "dtype": str(dtype).removeprefix("torch."),
                "blocksize": blocksize}

    def set_extra_state(self, state) -> None:
        self._meta = (torch.Size(state["shape"]), getattr(torch, state["dtype"]),
                      int(state["blocksize"]))

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
    """The :class:`~datalora.nf4.NF4Tensor` of an NF4 base layer (shares storage)."""
    if isinstance(layer, NF4Linear):
        return layer.weight
    if not _is_bnb_linear4bit(layer):
        raise TypeError(f"layer: expected NF4Linear or bnb.nn.Linear4bit, got "
                        f"{type(layer).__name__}")
    if getattr(layer.weight, "quant_state", None) is None:
        raise ValueError("layer: the bnb.nn.Linear4bit weight is not quantized yet (move it to "
                         "its device first, e.g. layer.to('cuda') or layer.to('cpu'))")
    return NF4Tensor.from_bnb(layer.weight)


def nf4_compute_dtype(layer: nn.Module) -> torch.dtype:
    """The float dtype an NF4 base computes in (bnb ``compute_dtype``, else the weight's)."""
    if isinstance(layer, NF4Linear):
        return layer.compute_dtype
    dtype = getattr(layer, "compute_dtype", None)
    if dtype is None:
        state = getattr(layer.weight, "quant_state", None)
        dtype = state.dtype if state is not None else torch.float32
    return dtype


def quantize_linear(layer: nn.Module, quantize: str, blocksize: int = 64,
                    double_quant: bool = False) -> nn.Module:
    """``quantize="nf4"``: an ``nn.Linear`` becomes an :class:`NF4Linear`; NF4 bases pass."""
    if quantize != "nf4":
        raise ValueError(f"quantize: expected 'nf4' or None, got {quantize!r}")
    if is_nf4_base(layer):
        return layer
    return NF4Linear.from_linear(layer, blocksize, double_quant)


@torch.library.custom_op("datalora::nf4_molora_decode", mutates_args=())
def _nf4_molora_decode_op(
        x: torch.Tensor, data: torch.Tensor, absmax: torch.Tensor,
        nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None,
        offset: torch.Tensor | None, shape: list[int], blocksize: int,
        bias: torch.Tensor | None, A: torch.Tensor, B: torch.Tensor, expert_ids: torch.Tensor,
        gates: torch.Tensor, rank_scale: torch.Tensor | None, scaling: float) -> torch.Tensor:
    t = NF4Tensor(data, absmax, torch.Size(shape), x.dtype, blocksize, nested_absmax,
                  nested_code, offset)
    return _C_loader.nf4_molora_decode_cuda(x, t, bias, A, B, expert_ids, gates, rank_scale,
                                            scaling)


@_nf4_molora_decode_op.register_fake
def _(x, data, absmax, nested_absmax, nested_code, offset, shape, blocksize, bias, A, B,
      expert_ids, gates, rank_scale, scaling):
    return x.new_empty(x.shape[0], shape[0])


def _fused_decode_ok(x2: torch.Tensor, t: NF4Tensor, tensors) -> bool:
    if x2.device.type != "cuda" or not _C_loader.available():
        return False
    if torch.is_grad_enabled() and any(v is not None and v.requires_grad for v in tensors):
        return False  # the fused kernel is inference-only
    return _C_loader.decode_supported(x2, t) is None


def nf4_molora_linear(base: nn.Module, x: torch.Tensor, lora_x: torch.Tensor,
                      A: torch.Tensor, B: torch.Tensor, expert_ids: torch.Tensor,
                      gates: torch.Tensor, rank_scale: torch.Tensor | None = None,
                      scaling: float = 1.0, backend: str = "auto", *,
                      check_values: bool = True) -> torch.Tensor:
    """``base(x) + molora_delta(lora_x, A, B, ...)`` for an NF4 base layer.

    ``lora_x`` is the LoRA input (x after dropout; x itself in eval). Shapes as
    :func:`datalora.ops.molora_delta`.
    """
    t = nf4_weight(base)
    x2 = x.reshape(-1, x.shape[-1])
    if lora_x is x and _fused_decode_ok(x2, t, (x, A, B, gates, rank_scale, base.bias)):
        ids = expert_ids.reshape(x2.shape[0], -1)
        g = gates.reshape(x2.shape[0], -1)
        rs = None if rank_scale is None else rank_scale.reshape(x2.shape[0], -1)
        bias = None if base.bias is None else base.bias.to(x.dtype)
        y = _nf4_molora_decode_op(x2, t.data, t.absmax, t.nested_absmax, t.nested_code,
                                  t.offset, list(t.shape), t.blocksize, bias, A, B, ids, g, rs,
                                  float(scaling))
        return y.view(*x.shape[:-1], t.shape[0])
    delta = ops.molora_delta(lora_x, A, B, expert_ids, gates, rank_scale, scaling, backend,
                             check_values=check_values)
    return base(x).to(delta.dtype) + delta
