"""Backend registry and selection (``backend="auto" | "torch" | "triton" | "cuda"``).

A backend is a module exposing the protocol of ``datalora.ops.torch_backend``:

    delta_forward(x, A, B, expert_ids, gates, rank_scale, scaling, need_h=True) -> (delta, h)
    linear_forward(x, weight, bias, A, B, expert_ids, gates, rank_scale, scaling,
                   need_h=True) -> (y, h)
        (``h [T, k, r]`` is what the backward needs; with ``need_h=False``, a forward
        without autograd, a backend may return None for it)
    delta_backward(grad, x, A, B, expert_ids, gates, rank_scale, h, scaling, needs,
                   dx_out=None) -> (dx, dA, dB, dgates, drank_scale)
        (with ``dx_out`` [T, d_in] given, the LoRA dx is added into it in place and it is
        returned as dx: ``molora_linear``'s backward passes the base ``grad @ W`` there)
    gather_tokens(hidden, keep_idx) -> packed
    scatter_tokens(hidden, packed, keep_idx, weight) -> out

``linear_forward`` computes base + LoRA into one output (the backward of
``molora_linear`` reuses ``delta_backward`` plus the base GEMMs). Backends load lazily:
importing datalora loads neither the kernels nor the CUDA extension (Triton itself, where
installed, comes with ``torch.utils.flop_counter``, which datalora registers FLOP formulas
with).
"""

from __future__ import annotations

import functools
import importlib
import os
import types
import warnings

import torch

BACKENDS = ("torch", "triton", "cuda")
BACKEND_NAMES = ("auto", *BACKENDS)
"""What a ``backend=`` argument accepts."""
_MODULES = {
    "torch": "datalora.ops.torch_backend",
    "triton": "datalora.ops.triton_backend",
}
CUDA_BACKEND_SCOPE = ("backend 'cuda' (the datalora._C extension) runs the NF4 base-weight "
                      "kernels used by MoLoRALinear over NF4Linear / bnb Linear4bit bases; for "
                      "molora_delta and molora_linear on bf16/fp16/fp32 weights use 'triton' "
                      "or 'torch'")
"""What the CUDA extension accelerates: 4-bit NF4 bases, not the bf16/fp16 ops."""
# Preference order of ``auto`` on a CUDA device; the CPU always uses torch.
_GPU_PREFERENCE = ("triton", "torch")
MIN_TRITON_CAPABILITY = (8, 0)
"""Oldest NVIDIA compute capability the Triton kernels run on (A100 / RTX 30xx); on older
GPUs (T4, V100) ``auto`` picks the torch backend with a one-time warning."""


STRATEGIES = ("dense", "grouped")
"""The two ways a backend computes the LoRA part: every expert in one GEMM, or per expert
over its routed tokens (see each backend's ``choose_strategy``)."""
STRATEGY_ENV = "DATALORA_SHRINK_STRATEGY"


def forced_strategy() -> str | None:
    """The strategy ``DATALORA_SHRINK_STRATEGY`` forces (``dense`` / ``grouped``), or None
    when it is unset or empty; another value raises a ``ValueError``."""
    forced = os.environ.get(STRATEGY_ENV, "")
    if not forced:
        return None
    if forced not in STRATEGIES:
        raise ValueError(f"{STRATEGY_ENV}: expected one of {STRATEGIES}, got {forced!r}")
    return forced


class BackendUnavailableError(RuntimeError):
    """Raised when an explicitly requested backend cannot run here; says why."""


@functools.cache
def _load(name: str) -> types.ModuleType | Exception:
    try:
        return importlib.import_module(_MODULES[name])
    except Exception as exc:  # keep the reason; report it when the backend is asked for
        return exc


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """None when backend ``name`` can run on ``device``, else a sentence saying why not."""
    if name not in BACKENDS:
        return f"unknown backend {name!r}; expected one of {('auto', *BACKENDS)}"
    if name == "torch":
        return None
    if name == "cuda":
        return CUDA_BACKEND_SCOPE
    if device.type != "cuda" and not (name == "triton" and _interpreting()):
        return (f"backend {name!r} needs a CUDA device (or TRITON_INTERPRET=1 for triton), "
                f"got device {device}")
    loaded = _load(name)
    if isinstance(loaded, Exception):
        return f"backend {name!r} failed to import: {type(loaded).__name__}: {loaded}"
    return None if device.type != "cuda" else _triton_gpu_reason(device)


def _triton_gpu_reason(device: torch.device) -> str | None:
    """None when the Triton kernels can run on the CUDA ``device``, else why not: they
    need compute capability >= 8.0 (bf16 ``tl.dot`` and the tuned tile configurations
    need Ampere or newer; Triton itself supports 8.0+ since 3.3). ROCm devices pass."""
    if torch.version.hip is not None:
        return None
    capability = torch.cuda.get_device_capability(device)
    if capability >= MIN_TRITON_CAPABILITY:
        return None
    major, minor = capability
    return (f"backend 'triton' needs an NVIDIA GPU of compute capability >= "
            f"{MIN_TRITON_CAPABILITY[0]}.{MIN_TRITON_CAPABILITY[1]} (Ampere or newer); "
            f"{torch.cuda.get_device_name(device)} is sm_{major}{minor}")


def _assume_constant_result(fn):
    """``torch.compiler.assume_constant_result`` without its ``import torch._dynamo`` (about
    1.5 s at ``import datalora``): the decorator only sets this mark, which dynamo reads when
    it traces a call (tests/test_ops_torch.py checks that the two agree)."""
    fn._dynamo_marked_constant = True
    return fn


def warn_once(message: str, stacklevel: int = 2,
              category: type[Warning] = RuntimeWarning) -> None:
    """A warning (RuntimeWarning by default) the first time ``message`` comes in this
    process (a slower path taken, and why), reported ``stacklevel`` frames up from the
    caller as ``warnings.warn`` counts. Under torch.compile it is given while dynamo traces,
    from outside the graph (see :func:`_warn_while_tracing`): compiled code is warned as
    eager code is, with no graph break, and the compiled graph never warns again."""
    if torch.compiler.is_compiling():
        _warn_while_tracing(message, category)
    else:
        _warn_once(message, stacklevel + 2, category)


@functools.cache
def _warn_once(message: str, stacklevel: int, category: type[Warning]) -> None:
    warnings.warn(message, category, stacklevel=stacklevel)


@_assume_constant_result
def _warn_while_tracing(message: str, category: type[Warning]) -> bool:
    """:func:`_warn_once` for traced code. Dynamo cannot trace ``warnings.warn`` (a graph
    break, an error under ``fullgraph=True``), but it calls a function marked constant once,
    at trace time, and keeps its result. Reported here, not at the caller: the frames above
    are dynamo's."""
    _warn_once(message, 1, category)
    return True


def resolve_backend(backend: str, device: torch.device | str) -> str:
    """Maps ``backend`` (possibly ``"auto"``) to a concrete backend name for ``device``
    (a ``torch.device`` or its name, as :func:`available_backends` takes).

    ``DATALORA_BACKEND`` overrides ``"auto"``. An explicit backend that cannot run
    raises ``BackendUnavailableError``; ``auto`` falls back to torch on a GPU with a
    one-time warning saying why. Under ``torch.compile`` the answer is a trace-time
    constant (changing ``DATALORA_BACKEND`` later needs a recompile).
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a str, got {type(backend).__name__}")
    if not isinstance(device, torch.device):  # "cuda" read .type off a str
        device = torch.device(device)
    return _resolve(backend, device.type)


@_assume_constant_result
def environment_backend() -> str:
    """What ``DATALORA_BACKEND`` names (any case, e.g. ``TORCH``): ``"auto"`` when it is
    unset or empty."""
    return (os.environ.get("DATALORA_BACKEND", "auto") or "auto").strip().lower()


@_assume_constant_result
def auto_backend(device_type: str) -> str:
    """The backend ``"auto"`` picks on a device type, ``DATALORA_BACKEND`` aside: torch on
    the CPU; on a GPU the first of :data:`_GPU_PREFERENCE` that can run there (a fallback
    warns once, saying why)."""
    device = torch.device(device_type)
    if device.type != "cuda":
        return "torch"
    reasons = []
    for name in _GPU_PREFERENCE:
        reason = unavailable_reason(name, device)
        if reason is None:
            if reasons:
                warn_once("datalora: falling back to the slower torch backend: "
                          + "; ".join(reasons) + " (install the 'triton' extra / a newer "
                          "GPU for the kernels, or set DATALORA_BACKEND=torch to choose "
                          "torch and silence this)")
            return name
        reasons.append(reason)
    raise AssertionError("the torch backend runs everywhere")


@_assume_constant_result
def _resolve(backend: str, device_type: str) -> str:
    device = torch.device(device_type)
    source = "backend"
    if backend == "auto":
        backend = environment_backend()
        source = "DATALORA_BACKEND (environment)" if backend != "auto" else source
    if backend == "auto":
        return auto_backend(device_type)
    if backend not in BACKENDS:
        raise ValueError(f"{source}: expected one of {BACKEND_NAMES}, got {backend!r}")
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise BackendUnavailableError(reason if source == "backend"
                                      else f"{reason} (chosen by {source})")
    return backend


def get_backend(name: str) -> types.ModuleType:
    """The loaded module of a concrete, available backend name."""
    loaded = _load(name)
    if isinstance(loaded, Exception):
        raise BackendUnavailableError(f"backend {name!r} failed to import: {loaded}")
    return loaded


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Concrete backends that can run on ``device``."""
    device = torch.device(device)
    return [b for b in BACKENDS if unavailable_reason(b, device) is None]
