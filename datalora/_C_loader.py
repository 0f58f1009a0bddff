"""Loads the optional ``datalora._C`` CUDA extension without ever breaking ``import datalora``.

The extension is imported on first use. A failure is kept (not raised): :func:`available`
returns False, a one-time warning says why when a caller falls back, and only calling a
CUDA-only entry point raises :class:`ExtensionUnavailableError` with the reason.

A build records the GPU archs it compiled (``compiled_archs``): :func:`unsupported_reason`
says when a device has no kernel image in it (a T4 against an sm_80/sm_90 build), and the
NF4 dispatch then takes the torch path with the one-time warning instead of a failed launch.

The wrappers below turn tensors into the raw pointers, shapes and current CUDA stream the
pybind11 boundary takes (the extension never links libtorch).
"""

from __future__ import annotations

import functools
import importlib
import types
import warnings

import torch

from datalora import _cuda_archs

__all__ = [
    "ExtensionUnavailableError",
    "available",
    "compiled_archs",
    "dequantize_nf4_cuda",
    "dequantize_nf4_host",
    "load",
    "load_error",
    "nf4_molora_decode_cuda",
    "nf4_molora_decode_host",
    "unsupported_reason",
    "warn_fallback",
]

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
MAX_DECODE_TOKENS = 16
_HINT = ("install a datalora wheel built with CUDA (e.g. the `+cu128` / `+cu130` builds), or "
         "build it from source with nvcc on PATH: `pip install --no-binary datalora "
         "--force-reinstall datalora` (`pip install .` in a checkout; DATALORA_BUILD_CUDA=1 "
         "makes a build that cannot compile it fail and say why)")


class ExtensionUnavailableError(RuntimeError):
    """A CUDA-only function was called but ``datalora._C`` could not be loaded."""


@functools.cache
def _load() -> types.ModuleType | Exception:
    try:
        return importlib.import_module("datalora._C")
    except Exception as exc:  # ImportError, or OSError from a broken shared library
        if not isinstance(exc, ModuleNotFoundError):
            warnings.warn(f"datalora: the CUDA extension datalora._C failed to load "
                          f"({type(exc).__name__}: {exc}); NF4 ops use the torch fallback",
                          RuntimeWarning, stacklevel=3)
        return exc


def available() -> bool:
    """True when ``datalora._C`` imported (it imports without a GPU)."""
    return not isinstance(_load(), Exception)


def load_error() -> Exception | None:
    """The exception that stopped ``datalora._C`` from loading, or None."""
    loaded = _load()
    return loaded if isinstance(loaded, Exception) else None


def load() -> types.ModuleType:
    """The extension module; raises :class:`ExtensionUnavailableError` saying why not."""
    loaded = _load()
    if isinstance(loaded, Exception):
        raise ExtensionUnavailableError(
            f"datalora._C is not available ({type(loaded).__name__}: {loaded}); {_HINT}")
    return loaded


def compiled_archs() -> tuple[list[str], list[str]] | None:
    """``(sass, ptx)`` arch names the loaded extension was compiled for (``["75", "80",
    "90"], ["90"]``), or None when it is not loaded or did not record them (an older build)."""
    loaded = _load()
    if isinstance(loaded, Exception) or not hasattr(loaded, "compiled_archs"):
        return None
    archs = loaded.compiled_archs()
    sass, ptx = ([a for a in archs[key].split(";") if a] for key in ("sass", "ptx"))
    return (sass, ptx) if sass or ptx else None


@functools.cache
def _device_reason(index: int) -> str | None:
    loaded = _load()
    if getattr(loaded, "device_count", lambda: 1)() == 0:
        # torch sees the GPU, the extension's own (static) CUDA runtime does not: a driver
        # older than that runtime, or torch on ROCm; every launch would fail
        version = loaded.cuda_runtime_version()
        return (f"datalora._C (CUDA runtime {version // 1000}.{version % 1000 // 10}) sees no "
                f"CUDA device, while torch sees cuda:{index} (torch CUDA {torch.version.cuda}, "
                f"HIP {torch.version.hip}): the driver is older than that runtime (a +cu130 "
                f"wheel needs a CUDA 13 driver) or torch runs on ROCm; install the datalora "
                f"build for your driver (e.g. +cu128) or build it from source")
    archs = compiled_archs()
    if archs is None:  # nothing recorded: the launch itself is the check, as before
        return None
    major, minor = torch.cuda.get_device_capability(index)
    if _cuda_archs.image_for(*archs, (major, minor)) is not None:
        return None
    sass, ptx = archs
    built = ", ".join([f"sm_{a}" for a in sass] + [f"compute_{a} (PTX)" for a in ptx])
    return (f"datalora._C has no kernel image for cuda:{index} "
            f"({torch.cuda.get_device_name(index)}, sm_{major}{minor}): it was built for "
            f"{built}; rebuild it with {major}{minor} in DATALORA_CUDA_ARCHS, e.g. "
            f"`DATALORA_CUDA_ARCHS='{major}{minor};{';'.join(sass)}' pip install --no-binary "
            f"datalora --force-reinstall datalora`")


def unsupported_reason(device: torch.device) -> str | None:
    """None when the extension's CUDA kernels can run on ``device`` (it loaded and holds a
    kernel image for the device's compute capability), else a sentence saying why not."""
    if device.type != "cuda":
        return f"the datalora._C kernels need a CUDA device, got {device}"
    err = load_error()
    if err is not None:
        return f"datalora._C is not available ({type(err).__name__}: {err}); {_HINT}"
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _device_reason(index)


def _check_device(device: torch.device) -> None:
    """Raises :class:`ExtensionUnavailableError` when the kernels cannot run on ``device``
    (no kernel image for its GPU): a clear error before the launch instead of CUDA's."""
    reason = unsupported_reason(device)
    if reason is not None:
        raise ExtensionUnavailableError(reason)


@functools.cache
def warn_fallback(what: str, reason: str | None = None) -> None:
    """Warns once per message that a CUDA-extension path fell back, and why (``reason``;
    default: why the extension did not load)."""
    if reason is None:
        err = load_error()
        reason = (f"datalora._C is not available ({type(err).__name__}: {err}); {_HINT}"
                  if err else "")
    warnings.warn(f"datalora: {what}: {reason}", RuntimeWarning, stacklevel=3)


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _scales(t) -> dict[str, int]:
    return dict(absmax=_ptr(t.absmax), nested_absmax=_ptr(t.nested_absmax),
                nested_code=_ptr(t.nested_code), offset=_ptr(t.offset))


def _contig(t) -> object:
    """NF4Tensor with contiguous fields (the kernels index them flat)."""
    from dataclasses import replace

    return replace(t, **{k: v.contiguous() for k, v in t.tensors().items()})


def _check_fields(t, device: torch.device) -> None:
    """The kernels read every NF4 field as a raw pointer on ``device``: fp32 scales
    (``nested_absmax``, ``nested_code``, ``offset``; ``absmax`` is checked by NF4Tensor) and
    one device for all, else a bf16 buffer is read as fp32 (past its end) or a host / other-GPU
    address is dereferenced."""
    for name, v in t.tensors().items():
        if v.device != device:
            raise ValueError(f"{name}: expected device {device}, got {v.device}")
    for name in ("nested_absmax", "nested_code", "offset"):
        v = getattr(t, name)
        if v is not None and v.dtype != torch.float32:
            raise ValueError(f"{name}: expected float32, got {v.dtype}")


def _check_nf4(t) -> None:
    """``t`` is an :class:`~datalora.nf4.NF4Tensor` (its fields become raw pointers)."""
    from datalora.nf4 import NF4Tensor

    if not isinstance(t, NF4Tensor):
        raise TypeError(f"t: expected a datalora.nf4.NF4Tensor, got {type(t).__name__}")


def _dequantize(t, dtype: torch.dtype, device_call: bool) -> torch.Tensor:
    if dtype not in _DTYPE_CODE:
        raise ValueError(f"dtype: expected one of {tuple(_DTYPE_CODE)}, got {dtype}")
    t = _contig(t)
    _check_fields(t, t.device)
    out = torch.empty(t.shape, dtype=dtype, device=t.device)
    if t.numel == 0:  # nothing to launch
        return out
    args = dict(data=_ptr(t.data), out=_ptr(out), n=t.numel, blocksize=t.blocksize,
                dtype=_DTYPE_CODE[dtype], **_scales(t))
    if device_call:
        with torch.cuda.device(t.device):
            load().dequantize_nf4(stream=torch.cuda.current_stream(t.device).cuda_stream, **args)
    else:
        load().dequantize_nf4_host(**args)
    return out


def dequantize_nf4_cuda(t, dtype: torch.dtype) -> torch.Tensor:
    """Dequantizes a CUDA :class:`~datalora.nf4.NF4Tensor` with the extension's kernel."""
    _check_nf4(t)
    if t.device.type != "cuda":
        raise ValueError(f"t: expected an NF4Tensor on a CUDA device, got {t.device}")
    _check_device(t.device)
    return _dequantize(t, dtype, True)


def dequantize_nf4_host(t, dtype: torch.dtype) -> torch.Tensor:
    """The extension's CPU twin of the dequant kernel (same ``nf4.cuh`` math)."""
    _check_nf4(t)
    if t.device.type != "cpu":
        raise ValueError(f"t: expected an NF4Tensor on the CPU, got {t.device}")
    return _dequantize(t, dtype, False)


def decode_supported(x2: torch.Tensor, t) -> str | None:
    """None when the fused decode kernel handles ``x2 [T, K]`` with weight ``t``, else why not."""
    T, K = x2.shape
    if not 1 <= T <= MAX_DECODE_TOKENS:
        return f"T={T} tokens (fused decode takes 1..{MAX_DECODE_TOKENS})"
    if K == 0 or K % 32:  # the kernel takes whole 32-value chunks, at least one per row
        return f"d_in={K} is not a positive multiple of 32"
    if x2.dtype not in (torch.float16, torch.bfloat16):
        return f"x dtype {x2.dtype} (fused decode takes float16/bfloat16)"
    if len(t.shape) != 2 or t.shape[0] < 1:
        return f"weight shape {tuple(t.shape)}"
    if t.device != x2.device:
        return f"weight on {t.device}, x on {x2.device}"
    if x2.is_cuda and t.data.data_ptr() % 16:
        return "weight data not 16-byte aligned (the dequant path handles it)"
    return None


def _aligned16(v: torch.Tensor) -> torch.Tensor:
    """``v`` contiguous at a 16-byte aligned address (the kernel's uint4 loads); a fresh copy
    when a storage offset misaligns it."""
    v = v.contiguous()
    return v.clone() if v.data_ptr() % 16 else v


# Zeroed int32 workspaces of the one-launch decode kernel (it leaves its workspace zero, so
# none is ever cleared again):
# - eager calls: one per (device, stream), reused by every call on that stream; two streams
#   never share one (their launches could overlap);
# - calls captured into a CUDA graph: a slot of a per-device slab zeroed (and synchronized)
#   outside any graph, each slot owned by one captured call for good, so a graph replays one
#   kernel per decode and no fill; once the slab is used up (or when the first decode call
#   of a device is itself captured), a fresh workspace zeroed by a fill node in the graph.
_DECODE_WORKSPACES: dict[tuple[int, int], torch.Tensor] = {}
CAPTURE_SLOTS = 4096
_capture_slabs: dict[int, list] = {}  # device index -> [slab, next free slot]


def _decode_workspace(device: torch.device, stream: torch.cuda.Stream) -> torch.Tensor:
    """The zeroed workspace for one decode launch on ``stream`` (see above)."""
    ints = load().decode_workspace_ints()
    if torch.cuda.is_current_stream_capturing():
        slab = _capture_slabs.get(device.index)
        if slab is None or slab[1] == CAPTURE_SLOTS:
            return torch.zeros(ints, dtype=torch.int32, device=device)
        slot, slab[1] = slab[1], slab[1] + 1
        return slab[0][slot * ints:(slot + 1) * ints]
    key = (device.index, stream.cuda_stream)
    workspace = _DECODE_WORKSPACES.get(key)
    if workspace is None:  # zeroed on `stream` itself: ordered before the launch
        workspace = _DECODE_WORKSPACES[key] = torch.zeros(ints, dtype=torch.int32,
                                                           device=device)
        if device.index not in _capture_slabs:
            slab = torch.zeros(CAPTURE_SLOTS * ints, dtype=torch.int32, device=device)
            stream.synchronize()  # zero before any graph, on any stream, can use a slot
            _capture_slabs[device.index] = [slab, 0]
    return workspace


def _decode(x2, t, bias, A, B, expert_ids, gates, rank_scale, scaling, device_call,
            check_values=True):
    from datalora.ops.validation import check_molora_inputs, check_tensor

    _check_nf4(t)
    # ranks, dtypes, devices and routing first: the shapes below are unpacked from them
    check_molora_inputs(x2, A, B, expert_ids, gates, rank_scale, check_values)
    if bias is not None:
        check_tensor("bias", bias)
    T, K = x2.shape
    if len(t.shape) != 2 or t.shape[1] != K:
        raise ValueError(f"weight: expected NF4 shape [d_out, d_in={K}], got {tuple(t.shape)}")
    N = t.shape[0]
    reason = decode_supported(x2, t)
    if reason is not None:
        raise ValueError(f"x: unsupported by the fused NF4 decode kernel: {reason}")
    dt = x2.dtype
    for name, v, shape in (("bias", bias, (N,)), ("A", A, None), ("B", B, None)):
        if v is not None and v.dtype != dt:
            raise ValueError(f"{name}: expected dtype {dt} (x's), got {v.dtype}")
        if v is not None and shape is not None and tuple(v.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape}, got {tuple(v.shape)}")
    E, r, _ = A.shape
    if tuple(A.shape) != (E, r, K) or tuple(B.shape) != (E, N, r):
        raise ValueError(f"A, B: expected [E, r, {K}] and [E, {N}, r], got {tuple(A.shape)} "
                         f"and {tuple(B.shape)}")
    # rank 0 adds nothing: the kernel runs the base alone (it takes no rank-0 experts)
    k = expert_ids.shape[1] if r > 0 else 0
    if bias is not None and bias.device != x2.device:
        raise ValueError(f"bias: expected device {x2.device} (x's), got {bias.device}")
    t = _contig(t)
    _check_fields(t, x2.device)
    x2, A, B = _aligned16(x2), _aligned16(A), B.contiguous()
    bias = None if bias is None else bias.contiguous()
    ids = expert_ids.to(torch.int32).contiguous()
    g = gates.to(torch.float32).contiguous()
    rs = None if rank_scale is None else rank_scale.to(torch.float32).contiguous()
    z = torch.empty(T * k * r, dtype=torch.float32, device=x2.device)
    y = torch.empty(T, N, dtype=dt, device=x2.device)
    args = dict(x=_ptr(x2), w=_ptr(t.data), blocksize=t.blocksize, bias=_ptr(bias), A=_ptr(A),
                B=_ptr(B), ids=_ptr(ids), gates=_ptr(g), rank_scale=_ptr(rs), z=_ptr(z),
                y=_ptr(y), T=T, K=K, N=N, E=E, r=r, k=k, scaling=float(scaling),
                dtype=_DTYPE_CODE[dt], **_scales(t))
    if device_call:
        with torch.cuda.device(x2.device):
            stream = torch.cuda.current_stream(x2.device)
            workspace = _decode_workspace(x2.device, stream)
            load().nf4_molora_decode(workspace=_ptr(workspace), workspace_ints=workspace.numel(),
                                     stream=stream.cuda_stream, **args)
    else:
        load().nf4_molora_decode_host(**args)
    return y


def nf4_molora_decode_cuda(x2, t, bias, A, B, expert_ids, gates, rank_scale=None, scaling=1.0,
                           check_values=True):
    """Fused ``x2 @ dequant(t)^T + bias + molora_delta`` for 1..16 tokens on a CUDA device."""
    if x2.device.type != "cuda":
        raise ValueError(f"x: expected a CUDA tensor, got {x2.device}")
    _check_device(x2.device)
    return _decode(x2, t, bias, A, B, expert_ids, gates, rank_scale, scaling, True,
                   check_values)


def nf4_molora_decode_host(x2, t, bias, A, B, expert_ids, gates, rank_scale=None, scaling=1.0):
    """CPU twin of :func:`nf4_molora_decode_cuda` (same math, for CPU-only tests)."""
    if x2.device.type != "cpu":
        raise ValueError(f"x: expected a CPU tensor, got {x2.device}")
    return _decode(x2, t, bias, A, B, expert_ids, gates, rank_scale, scaling, False)
