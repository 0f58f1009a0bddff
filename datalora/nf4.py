"""4-bit NormalFloat (NF4) weights in exactly the bitsandbytes layout.

An :class:`NF4Tensor` holds what ``bitsandbytes.functional.quantize_4bit(w,
quant_type="nf4")`` returns, field for field, so a ``bnb.nn.Params4bit`` can be wrapped
without re-quantizing (:meth:`NF4Tensor.from_bnb`) and handed back (:meth:`NF4Tensor.to_bnb`):

- ``data``: ``[ceil(n/2), 1]`` uint8; byte ``i`` holds value ``2i`` in its high nibble and
  ``2i+1`` in its low nibble (row-major order of ``shape``); an odd tail is padded with
  the code of 0.0 (nibble 7).
- ``absmax``: one scale per block of ``blocksize`` consecutive values (the last block may be
  short): fp32 ``[nblocks]``, or with double quantization uint8 codes of
  ``absmax - offset`` in the 8-bit dynamic map, with an fp32 ``nested_absmax`` per 256 codes.
- value ``v = NF4_CODE[nibble] * absmax[block]`` in fp32, cast to the output dtype (RNE).

:func:`quantize` and :func:`dequantize` are vectorized torch, so they run on any device
without bitsandbytes; they are bit-identical to bitsandbytes' CPU path (checked in
``tests/test_nf4.py``). On a CUDA tensor :func:`dequantize` uses the ``datalora._C``
kernel when the extension is built, else the same torch code (with one warning).
"""

from __future__ import annotations

import functools
import numbers
from dataclasses import dataclass, replace
from math import gcd, prod
from typing import Any

import torch

from datalora.checks import check_bool

__all__ = ["BLOCKSIZES", "NF4_CODE", "NF4Tensor", "dequantize", "dynamic_map", "quantize"]

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The 16 NF4 levels (QLoRA, Dettmers et al. 2023): quantiles of N(0, 1) scaled to [-1, 1].
# Kept as the literals bitsandbytes and csrc/nf4.cuh use; they round to the same fp32 values.
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)


# the two levels a packed byte holds, high nibble first: [256, 2]
NF4_PAIRS = torch.stack([NF4_CODE.repeat_interleave(16), NF4_CODE.repeat(16)], dim=1)

_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def _table_on(name: str, source: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``source`` on ``device``, copied once per device (a host-to-device copy on every
    dequantize would synchronise the stream once per layer call). Read-only.

    Under ``torch.compile`` a table not yet cached is built inside the graph and not kept:
    cached from inside an ``autograd.Function`` (``NF4Linear``'s training forward), it would
    escape the function's traced subgraph, which dynamo refuses; a fake tensor from AOT
    autograd's tracing of the backward would be no table at all.
    """
    key = (name, torch.device(device))
    table = _TABLES.get(key)
    if table is None:
        table = source.to(key[1])
        if not torch.compiler.is_compiling() and type(table) is torch.Tensor:
            _TABLES[key] = table
    return table


def code_table(device: torch.device) -> torch.Tensor:
    """:data:`NF4_CODE` on ``device`` (cached, read-only: see :func:`_table_on`)."""
    return _table_on("code", NF4_CODE, device)


def pair_table(device: torch.device) -> torch.Tensor:
    """:data:`NF4_PAIRS` on ``device`` (cached, read-only: see :func:`_table_on`)."""
    return _table_on("pairs", NF4_PAIRS, device)


def warm_code_table(device: torch.device | str) -> None:
    """Caches the code tables on ``device`` now (an NF4 layer built or moved there): a
    process that compiles before any eager call would otherwise never cache it, and each
    compiled call would copy it to the device (a sync on a GPU; no CUDA graph)."""
    device = torch.device(device)
    if device.type != "meta" and not torch.compiler.is_compiling():
        code_table(device)
        pair_table(device)


# Decision boundaries: a scaled value goes to the highest level whose lower midpoint it exceeds.
_NF4_BOUNDS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2

_LUT_SIZE = 65536  # bins of [-1, 1] used by bitsandbytes' CPU 8-bit blockwise quantizer


@functools.cache
def dynamic_map() -> torch.Tensor:
    """The signed 8-bit dynamic map (bitsandbytes ``create_dynamic_map()``): 256 sorted fp32.

    For exponent i = 0..6, 2**i fraction midpoints of ``linspace(0.1, 1)`` are scaled by
    ``10**(i-6)`` and mirrored; 0 and 1 complete the 256 values.
    """
    values = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2 ** i + 1, dtype=torch.float32)
        mids = (10 ** (i - 6)) * ((edges[:-1] + edges[1:]) / 2.0)
        values += mids.tolist() + (-mids).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


@functools.cache
def _dynamic_lut() -> torch.Tensor:
    """Code index of each of 65536 even bins of [-1, 1] (nearest level by fp32 midpoints)."""
    code = dynamic_map()
    mids = 0.5 * (code[:-1] + code[1:])
    grid = -1.0 + (2.0 * torch.arange(_LUT_SIZE, dtype=torch.float32)) / (_LUT_SIZE - 1)
    return torch.bucketize(grid, mids).to(torch.uint8)


def _check_blocksize(name: str, blocksize: int) -> int:
    """``blocksize`` as a plain int (numpy integers pass), one of :data:`BLOCKSIZES`."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, numbers.Integral) \
            or int(blocksize) not in BLOCKSIZES:
        raise ValueError(f"{name}: expected one of {BLOCKSIZES}, got {blocksize!r}")
    return int(blocksize)


@dataclass
class NF4Tensor:
    """An NF4-quantized tensor in bitsandbytes' layout (see the module docstring).

    Attributes:
        data: ``[ceil(numel/2), 1]`` uint8 packed nibbles.
        absmax: ``[nblocks]`` fp32 scales, or uint8 codes when double-quantized.
        shape: shape of the original tensor. dtype: its dtype (fp32/fp16/bf16).
        blocksize: values per absmax block (32..4096, a power of two).
        nested_absmax: ``[ceil(nblocks/256)]`` fp32 (double quant only).
        nested_code: ``[256]`` fp32 dynamic map of the uint8 absmax (double quant only).
        offset: 0-dim fp32 mean subtracted from absmax before its quantization (double quant).
    """

    data: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    offset: torch.Tensor | None = None

    def __post_init__(self) -> None:
        try:
            self.shape = torch.Size(self.shape)
        except TypeError:  # None, "abc", (8.0, 64): torch.Size's own message names nothing
            raise TypeError(f"shape: expected a sequence of ints, got {self.shape!r:.60}") \
                from None
        if any(d < 0 for d in self.shape):
            raise ValueError(f"shape: expected non-negative sizes, got {tuple(self.shape)}")
        for name in ("data", "absmax", "nested_absmax", "nested_code", "offset"):
            value = getattr(self, name)
            if not (isinstance(value, torch.Tensor)
                    or (value is None and name not in ("data", "absmax"))):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
        _check_blocksize("blocksize", self.blocksize)
        if self.dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype: expected one of {FLOAT_DTYPES}, got {self.dtype}")
        n = self.numel
        if self.data.dtype != torch.uint8 or self.data.numel() != (n + 1) // 2:
            raise ValueError(f"data: expected {(n + 1) // 2} uint8 bytes for shape "
                             f"{tuple(self.shape)}, got {self.data.numel()} {self.data.dtype}")
        nblocks = -(-n // self.blocksize)
        if self.absmax.numel() != nblocks:
            raise ValueError(f"absmax: expected {nblocks} blocks of {self.blocksize} for "
                             f"{n} values, got {self.absmax.numel()}")
        nested = (self.nested_absmax, self.nested_code, self.offset)
        if any(t is None for t in nested) != all(t is None for t in nested):
            raise ValueError("nested_absmax, nested_code, offset: expected all three (double "
                             "quant) or none")
        if self.double_quant:
            if self.absmax.dtype != torch.uint8:
                raise ValueError("absmax: expected uint8 with double quant, got "
                                 f"{self.absmax.dtype}")
            if self.nested_absmax.numel() != -(-nblocks // NESTED_BLOCKSIZE):
                raise ValueError(f"nested_absmax: expected {-(-nblocks // NESTED_BLOCKSIZE)} "
                                 f"values, got {self.nested_absmax.numel()}")
            if self.offset.numel() != 1:
                raise ValueError(f"offset: expected one value, got {self.offset.numel()}")
            if self.nested_code.numel() != 256:
                raise ValueError("nested_code: expected 256 values, got "
                                 f"{self.nested_code.numel()}")
        elif self.absmax.dtype != torch.float32:
            raise ValueError(f"absmax: expected float32, got {self.absmax.dtype}")

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        extra = (self.nested_absmax, self.nested_code, self.offset)
        return sum(t.numel() * t.element_size() for t in (self.data, self.absmax, *extra)
                   if t is not None)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensor fields by name (None fields left out)."""
        names = ("data", "absmax", "nested_absmax", "nested_code", "offset")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}

    def to(self, device: torch.device | str) -> NF4Tensor:
        """A copy on ``device``, or the same tensors when already there (the 4-bit data
        keeps its format: for another float dtype use :meth:`dequantize`)."""
        if isinstance(device, torch.dtype):
            raise TypeError(f"device: NF4Tensor.to takes a device, got dtype {device}; "
                            f"dequantize(dtype) gives a float tensor")
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as exc:  # "gpu0": torch's message named nothing
            raise ValueError(f"device: expected a torch.device or a device name such as "
                             f"'cuda:0', got {device!r} ({exc})") from None
        return replace(self, **{k: v.to(device) for k, v in self.tensors().items()})

    def absmax_float(self) -> torch.Tensor:
        """fp32 ``[nblocks]`` scales (decodes the double-quantized absmax like bitsandbytes)."""
        if not self.double_quant:
            return self.absmax
        codes = self.nested_code[self.absmax.long()]
        n = codes.numel()
        pad = -n % NESTED_BLOCKSIZE
        scaled = torch.nn.functional.pad(codes, (0, pad)).view(-1, NESTED_BLOCKSIZE)
        scaled = (scaled * self.nested_absmax.view(-1, 1)).reshape(-1)[:n]
        return scaled + self.offset

    def dequantize(self, dtype: torch.dtype | None = torch.bfloat16) -> torch.Tensor:
        """:func:`dequantize`: ``[*self.shape]`` in ``dtype`` (default bf16; None:
        ``self.dtype``)."""
        return dequantize(self, dtype)

    # ---------------------------------------------------------------- bitsandbytes interop
    @classmethod
    def from_bnb(cls, param) -> NF4Tensor:
        """Wraps ``bnb.nn.Params4bit`` or ``(data, QuantState)`` (nf4) without re-quantizing.

        The returned tensor shares storage with the bitsandbytes one, except for a weight
        bitsandbytes (>= 0.49) repacked for CPU inference on a ``Linear4bit``'s first CPU
        forward: its tiling is undone into new tensors (absmax then the bf16 copy
        bitsandbytes made, without double quant), and for the absmax bitsandbytes' undoing
        of that packing leaves packed (bf16 ``[K / blocksize, N]``): read into a new fp32
        tensor.
        """
        if isinstance(param, tuple | list):
            if len(param) != 2:
                raise TypeError("param: expected Params4bit or a (data, QuantState) pair, got "
                                f"a sequence of length {len(param)}")
            data, state = param
        else:
            data, state = param, getattr(param, "quant_state", None)
        if not isinstance(data, torch.Tensor) or state is None:
            raise TypeError("param: expected a quantized bnb.nn.Params4bit (with quant_state) or "
                            f"a (data, QuantState) pair, got {type(param).__name__}")
        if not hasattr(state, "quant_type"):
            raise TypeError("param: expected a (data, QuantState) pair, got a quant_state of "
                            f"type {type(state).__name__}")
        if state.quant_type != "nf4":
            raise ValueError(f"param: expected quant_type 'nf4', got {state.quant_type!r}")
        if data.dtype != torch.uint8:  # quant_storage=bf16 etc. (FSDP-QLoRA): the same bytes
            if not data.is_contiguous():
                raise ValueError(f"param: a {data.dtype} quant_storage must be contiguous")
            data = data.detach().view(torch.uint8).reshape(-1, 1)
        if getattr(state, "packing_format_for_cpu", False):
            # bitsandbytes >= 0.49 repacks a Linear4bit's weight in place on its first CPU
            # inference forward (AVX512-BF16): nibbles tiled 32 rows at a time, absmax
            # bf16 [K / blocksize, N], double quant dropped. Undo the tiling (a copy).
            return cls._from_cpu_packed(data, state)
        kwargs = {}
        if state.nested:
            s2 = state.state2
            if s2.blocksize != NESTED_BLOCKSIZE:
                raise ValueError(f"param: expected nested blocksize {NESTED_BLOCKSIZE}, got "
                                 f"{s2.blocksize}")
            kwargs = dict(nested_absmax=s2.absmax, nested_code=s2.code,
                          offset=torch.as_tensor(state.offset, dtype=torch.float32))
        absmax = state.absmax
        if absmax.dim() == 2 and not state.nested:
            # bnb's undoing of its CPU packing (``state_dict()``, a device move) restores the
            # nibbles but, without double quant, leaves absmax as packed: bf16 [K / blocksize, N]
            absmax = absmax.T.reshape(-1).float()
        return cls(data=torch.Tensor(data) if type(data) is not torch.Tensor else data,
                   absmax=absmax, shape=state.shape, dtype=state.dtype,
                   blocksize=state.blocksize, **kwargs)

    @classmethod
    def _from_cpu_packed(cls, data: torch.Tensor, state) -> NF4Tensor:
        """The bitsandbytes layout of a weight in bnb's CPU packed format
        (``bitsandbytes.functional._convert_weight_packed_for_cpu``)."""
        n, k_half = data.shape
        packed = data.reshape(-1, 32)
        q = torch.cat([packed & 0xF, packed >> 4], dim=-1)  # 32 low nibbles, then 32 high
        q = q.reshape(n // 32, k_half, 32, 2).transpose(1, 2).reshape(-1)  # row-major codes
        flat = ((q[0::2] << 4) | q[1::2]).to(torch.uint8).unsqueeze(1)
        absmax = state.absmax.T.reshape(-1).float()
        dtype = getattr(state, "original_dtype", state.dtype)
        return cls(data=flat, absmax=absmax, shape=state.shape, dtype=dtype,
                   blocksize=state.blocksize)

    def quant_state(self) -> Any:
        """A ``bitsandbytes.functional.QuantState`` over the same tensors."""
        from bitsandbytes.functional import QuantState

        code = NF4_CODE.to(self.device, copy=True)  # never the module's constant itself
        state2 = None
        if self.double_quant:
            state2 = QuantState(absmax=self.nested_absmax, code=self.nested_code,
                                blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
        return QuantState(absmax=self.absmax, shape=self.shape, code=code,
                          blocksize=self.blocksize, quant_type="nf4", dtype=self.dtype,
                          offset=self.offset, state2=state2)

    def to_bnb(self) -> Any:
        """A ``bnb.nn.Params4bit`` sharing this tensor's storage (no re-quantizing)."""
        import bitsandbytes as bnb

        return bnb.nn.Params4bit(self.data, requires_grad=False, quant_state=self.quant_state(),
                                 blocksize=self.blocksize, compress_statistics=self.double_quant,
                                 quant_type="nf4", bnb_quantized=True)


def _blockwise_absmax(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pads fp32 ``flat`` with zeros to whole blocks: ``(blocks [nb, bs], absmax [nb])``."""
    blocks = torch.nn.functional.pad(flat, (0, -flat.numel() % blocksize)).view(-1, blocksize)
    return blocks, blocks.abs().amax(dim=1)


def _quantize_absmax(absmax: torch.Tensor):
    """bitsandbytes' double quant: 8-bit dynamic codes of ``absmax - mean`` per 256."""
    offset = absmax.mean()
    centered = absmax - offset
    blocks, nested = _blockwise_absmax(centered, NESTED_BLOCKSIZE)
    inv = torch.where(nested > 0, 1.0 / nested, torch.zeros_like(nested))
    # bitsandbytes multiplies by the reciprocal; a subnormal spread overflows it to inf
    # (0 * inf = NaN), where dividing stays exact
    normed = torch.where(torch.isinf(inv)[:, None], blocks / nested[:, None],
                         blocks * inv[:, None]).clamp(-1.0, 1.0)
    # bin of [-1, 1] (round half up), then the nearest code of that bin
    bins = ((normed + 1.0) * 0.5 * (_LUT_SIZE - 1) + 0.5).to(torch.int32)
    codes = _dynamic_lut().to(absmax.device)[bins.long()]
    codes = torch.where(nested[:, None] > 0, codes, torch.zeros_like(codes))
    # own storage for both: a view of the 256-padded codes would carry (and save) the pad, and
    # the cached map must not be shared with layers whose buffers may be written in place
    codes = codes.reshape(-1)[: absmax.numel()].clone()
    return codes, nested, dynamic_map().to(absmax.device, copy=True), offset


def quantize(w: torch.Tensor, blocksize: int = 64, double_quant: bool = False) -> NF4Tensor:
    """NF4-quantizes ``w`` (fp32/fp16/bf16, any shape) like ``bnb.functional.quantize_4bit``.

    Args:
        w: tensor to quantize (any device).
        blocksize: values per absmax block, one of :data:`BLOCKSIZES`.
        double_quant: also quantize the absmax (bitsandbytes ``compress_statistics=True``).
    """
    return quantize_named(w, blocksize, double_quant, "w")


def quantize_named(w: torch.Tensor, blocksize: int, double_quant: bool,
                   name: str) -> NF4Tensor:
    """:func:`quantize`, its errors about ``w`` naming it ``name`` (the caller's argument,
    e.g. ``"linear.weight"``)."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(w).__name__}")
    if w.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: expected dtype in {FLOAT_DTYPES}, got {w.dtype}")
    if w.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty tensor, got shape {tuple(w.shape)}")
    blocksize = _check_blocksize("blocksize", blocksize)
    check_bool("double_quant", double_quant)
    flat = w.detach().reshape(-1).float()
    n = flat.numel()
    blocks, absmax = _blockwise_absmax(flat, blocksize)
    scaled = blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]
    if n % blocksize:  # as bitsandbytes' portable (CPU) quantizer: a short last block's
        # absmax clamped to 1e-38 and divided by (not times its reciprocal: one ulp apart
        # flips a nibble on a boundary; bitsandbytes' CUDA kernel multiplies, README)
        absmax[-1:] = absmax[-1:].clamp(min=1e-38)
        scaled[-1] = blocks[-1] / absmax[-1]
    scaled = scaled.clamp(-1.0, 1.0).reshape(-1)
    scaled = scaled[: n + (n % 2)]  # odd n: one zero pad value (nibble 7) fills the last byte
    q = torch.bucketize(scaled, _NF4_BOUNDS.to(w.device), out_int32=True).to(torch.uint8)
    data = ((q[0::2] << 4) | q[1::2]).unsqueeze(1)
    t = NF4Tensor(data=data, absmax=absmax, shape=w.shape, dtype=w.dtype, blocksize=blocksize)
    if absmax.device.type != "meta":  # (a meta tensor has no values: model skeletons)
        finite, mean_finite = torch.stack([torch.isfinite(absmax).all(),
                                           torch.isfinite(absmax.mean())]).tolist()
        if not finite:  # bitsandbytes gives the whole block NaN, silently
            raise ValueError(f"{name}: has NaN or inf values, which NF4 cannot encode (their "
                             f"block of {blocksize} values would dequantize to NaN"
                             + (", and with double_quant=True the 256 blocks sharing a code"
                                if double_quant else "") + ")")
        if double_quant and not mean_finite:
            raise ValueError(f"{name}: its block scales (up to {float(absmax.max()):.3g}) "
                             f"overflow fp32 when double quantization (double_quant=True) "
                             f"averages them; quantize without double_quant")
    if double_quant:
        codes, nested, code, offset = _quantize_absmax(absmax)
        t = replace(t, absmax=codes, nested_absmax=nested, nested_code=code, offset=offset)
    return t


# Elements the CPU dequantizes at a time: a 4 MB fp32 chunk and its 2 MB index come from
# the heap again and again, where whole-weight temporaries over glibc's 32 MB mmap ceiling
# were mapped, page-faulted in and unmapped on every call (2048 x 5632, bf16: 27 -> 11 ms)
CPU_CHUNK = 1 << 20


def dequantize_torch(t: NF4Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The vectorized torch reference of :func:`dequantize` (any device). On the CPU (eager,
    real tensors) a weight of more than :data:`CPU_CHUNK` values is decoded a chunk at a
    time into the output: the same values, bit for bit."""
    dtype = t.dtype if dtype is None else dtype
    if not _decodes_in_chunks(t):
        return _decode(t, 0, t.numel, t.absmax_float()).to(dtype).view(t.shape)
    out = torch.empty(t.numel, dtype=dtype, device=t.data.device)
    for start, stop, values in _chunks(t, CPU_CHUNK // t.blocksize * t.blocksize):
        out[start:stop].copy_(values)
    return out.view(t.shape)


def _decodes_in_chunks(t: NF4Tensor) -> bool:
    """Whether ``t`` is decoded :data:`CPU_CHUNK` values at a time: more of them, in a real
    CPU tensor, in eager mode (a traced graph would unroll the loop)."""
    return (t.numel > CPU_CHUNK and t.data.device.type == "cpu"
            and type(t.data) is torch.Tensor and not torch.compiler.is_compiling())


def _chunks(t: NF4Tensor, step: int):
    """``(start, stop, fp32 values [start, stop))`` of the flat weight, ``step`` values (a
    whole number of blocks, so of bytes: blocks are even) at a time."""
    scales = t.absmax_float()
    for start in range(0, t.numel, step):
        stop = min(start + step, t.numel)
        yield start, stop, _decode(t, start, stop, scales)


def cpu_row_chunk(t: NF4Tensor, dtype: torch.dtype) -> int | None:
    """Rows of a 2-D weight per chunk when a CPU matmul in ``dtype`` should decode and
    multiply it a chunk at a time (:func:`linear_in_chunks`, :func:`grad_input_in_chunks`),
    else None: fp32 on the CPU (eager, real tensors, no autograd recording) for a weight of
    more than :data:`CPU_CHUNK` values, whose whole fp32 copy would be over glibc's 32 MB
    mmap ceiling and page-faulted in on every call (2048 x 5632, 512 tokens: 86 -> 72 ms
    forward). Each chunk starts on a block boundary."""
    if (dtype != torch.float32 or len(t.shape) != 2 or torch.is_grad_enabled()
            or not _decodes_in_chunks(t)):
        return None
    d_in = t.shape[1]
    align = t.blocksize // gcd(d_in, t.blocksize)  # rows per whole number of blocks
    return max(align, CPU_CHUNK // d_in // align * align)


def _row_chunks(t: NF4Tensor, rows: int):
    """``(start, stop, weight rows [start, stop) in fp32)`` of a 2-D weight, ``rows`` at a
    time (``rows`` from :func:`cpu_row_chunk`)."""
    d_in = t.shape[1]
    for start, stop, values in _chunks(t, rows * d_in):
        yield start // d_in, stop // d_in, values.view(-1, d_in)


def linear_in_chunks(x: torch.Tensor, t: NF4Tensor, rows: int) -> torch.Tensor:
    """``x [T, d_in] @ dequantize(t, fp32)^T -> [T, d_out]``, ``rows`` rows of the weight
    at a time (:func:`cpu_row_chunk`); each output column is the whole GEMM's dot product."""
    out = x.new_empty(x.shape[0], t.shape[0])
    for start, stop, weight in _row_chunks(t, rows):
        torch.mm(x, weight.T, out=out[:, start:stop])
    return out


def grad_input_in_chunks(grad: torch.Tensor, t: NF4Tensor, rows: int) -> torch.Tensor:
    """``grad [T, d_out] @ dequantize(t, fp32) -> [T, d_in]``, ``rows`` rows of the weight
    at a time (:func:`cpu_row_chunk`), accumulated in fp32."""
    out = grad.new_zeros(grad.shape[0], t.shape[1])
    for start, stop, weight in _row_chunks(t, rows):
        out.addmm_(grad[:, start:stop], weight)
    return out


def _decode(t: NF4Tensor, start: int, stop: int, scales: torch.Tensor) -> torch.Tensor:
    """fp32 values ``[start, stop)`` of the flat weight (``start`` on a block boundary;
    ``scales``: ``t.absmax_float()``)."""
    bs = t.blocksize
    # each byte's two levels at once (index_select: advanced indexing stalls the thread
    # pool); an odd count's last byte carries one pad nibble
    packed = t.data.reshape(-1)[start // 2:(stop + 1) // 2]
    vals = pair_table(t.device).index_select(0, packed.int()).reshape(-1)
    count = stop - start
    if vals.numel() != count or count % bs:
        vals = torch.nn.functional.pad(vals[:count], (0, -count % bs))
    first = start // bs
    blocks = vals.view(-1, bs).mul_(scales[first:first + vals.numel() // bs, None])
    return blocks.reshape(-1)[:count]


def dequantize(t: NF4Tensor, dtype: torch.dtype | None = torch.bfloat16) -> torch.Tensor:
    """``[*t.shape]`` tensor of ``dtype`` (default bf16, the design's signature; None:
    ``t.dtype``, the dtype of the quantized weight, as bitsandbytes' ``dequantize_4bit``
    returns it, bit for bit). Values
    are fp32 ``code * absmax`` rounded to ``dtype`` (float64 holds them exactly: a
    ``.double()`` model computes with the same weights).
    """
    if not isinstance(t, NF4Tensor):
        raise TypeError(f"t: expected an NF4Tensor, got {type(t).__name__}")
    dtype = t.dtype if dtype is None else dtype
    if dtype == torch.float64:
        return dequantize(t, torch.float32).to(torch.float64)
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype: expected one of {(*FLOAT_DTYPES, torch.float64)}, got "
                         f"{dtype}")
    for name, value in t.tensors().items():
        if value.device != t.data.device:
            raise ValueError(f"t.{name}: expected device {t.data.device} (data's), got "
                             f"{value.device}")
    if t.device.type == "cuda":
        from datalora import _C_loader

        reason = _C_loader.unsupported_reason(t.device)
        if reason is None:
            return _dequantize_cuda_op(t.data, t.absmax, t.nested_absmax, t.nested_code,
                                       t.offset, list(t.shape), t.blocksize, dtype)
        _C_loader.warn_fallback("nf4.dequantize on CUDA uses the torch fallback", reason)
    return dequantize_torch(t, dtype)


@torch.library.custom_op("datalora::nf4_dequantize_cuda", mutates_args=())
def _dequantize_cuda_op(data: torch.Tensor, absmax: torch.Tensor,
                        nested_absmax: torch.Tensor | None, nested_code: torch.Tensor | None,
                        offset: torch.Tensor | None, shape: list[int], blocksize: int,
                        dtype: torch.dtype) -> torch.Tensor:
    from datalora import _C_loader

    t = NF4Tensor(data, absmax, torch.Size(shape), dtype, blocksize, nested_absmax,
                  nested_code, offset)
    return _C_loader.dequantize_nf4_cuda(t, dtype)


@_dequantize_cuda_op.register_fake
def _(data, absmax, nested_absmax, nested_code, offset, shape, blocksize, dtype):
    return data.new_empty(shape, dtype=dtype)
