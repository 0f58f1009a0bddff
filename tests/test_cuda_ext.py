"""The ``datalora._C`` extension: host (CPU) twins of the kernels vs bitsandbytes and the
torch reference, argument checks at the pybind11 boundary, import without a GPU, the
``gpu``-marked kernel tests, and the wheel build. The ptxas check of the kernels for
sm_80/sm_90 (registers, spills, shared memory) is in ``tests/test_gpu_readiness.py``."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import types
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

from datalora import _C_loader, _cuda_archs, nf4
from datalora.reference import molora_delta_reference

ROOT = Path(__file__).resolve().parents[1]
BUILT = _C_loader.available()
needs_ext = pytest.mark.skipif(
    not BUILT, reason=f"datalora._C is not built here ({_C_loader.load_error()}); build with "
                      "`pip install -e . --no-build-isolation` with nvcc on PATH")


def _weight(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g).to(dtype)
    w.view(-1)[:64] = 0  # an all-zero block
    return w


def _lora(T, K, N, E, r, k, dtype, seed=0, rank_scale=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, K, generator=g).to(dtype)
    A = (torch.randn(E, r, K, generator=g) / K**0.5).to(dtype)
    B = (torch.randn(E, N, r, generator=g) / r**0.5).to(dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    gates = torch.rand(T, k, generator=g)
    rs = torch.rand(T, r, generator=g) if rank_scale else None
    bias = torch.randn(N, generator=g).to(dtype)
    return x, A, B, ids, gates, rs, bias


def _decode_reference(x, t, bias, A, B, ids, gates, rs, scaling):
    """fp32 math on the dtype-rounded weights: what the kernels compute."""
    w = nf4.dequantize(t, x.dtype).float()
    base = x.float() @ w.T + (0 if bias is None else bias.float())
    rs32 = None if rs is None else rs.float()
    return base + molora_delta_reference(x.float(), A.float(), B.float(), ids, gates.float(),
                                         rs32, scaling)


# ----------------------------------------------------------------------------- import
def test_loader_never_breaks_import_and_reports_reason(monkeypatch):
    loaded = _C_loader._load()
    if BUILT:
        assert _C_loader.load_error() is None
        assert _C_loader.load().cuda_runtime_version() >= 12000
    else:
        assert isinstance(loaded, Exception)
        with pytest.raises(_C_loader.ExtensionUnavailableError, match="datalora._C"):
            _C_loader.load()


def test_broken_extension_warns_once_and_raises_only_when_called(monkeypatch):
    import importlib

    real = importlib.import_module

    def fake(name, *args):
        if name == "datalora._C":
            raise OSError("libcudart.so.99: cannot open shared object file")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", fake)
    _C_loader._load.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="failed to load.*libcudart.so.99"):
            assert not _C_loader.available()
        assert isinstance(_C_loader.load_error(), OSError)
        with pytest.raises(_C_loader.ExtensionUnavailableError, match="libcudart.so.99"):
            _C_loader.load()
        t = nf4.quantize(torch.randn(4, 64))  # the torch path keeps working
        assert nf4.dequantize(t, None).shape == (4, 64)
    finally:
        monkeypatch.undo()
        _C_loader._load.cache_clear()


def test_unavailable_hint_works_for_a_wheel_install(monkeypatch):
    """Someone who installed a wheel has no source tree: the hint names a pip command that
    rebuilds from the sdist (build isolation brings pybind11), not ``pip install -e .``."""
    monkeypatch.setattr(_C_loader, "_load",
                        lambda: ModuleNotFoundError("No module named 'datalora._C'"))
    with pytest.raises(_C_loader.ExtensionUnavailableError) as info:
        _C_loader.load()
    assert "pip install --no-binary datalora --force-reinstall datalora" in str(info.value)
    assert "-e ." not in str(info.value)
    assert "pip install --no-binary datalora" in _C_loader.unsupported_reason(
        torch.device("cuda", 0))


@needs_ext
def test_extension_imports_without_gpu_driver():
    # a fresh interpreter that hides every GPU: import and a CUDA runtime query must not fail
    code = ("import datalora._C as C; print(C.device_count(), C.cuda_runtime_version())")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    count, version = map(int, out.stdout.split())
    assert count == 0 and version >= 12000
    so = next((ROOT / "datalora").glob("_C*.so"), None)
    if so is not None and shutil.which("ldd"):
        deps = subprocess.run(["ldd", str(so)], capture_output=True, text=True).stdout
        assert "libcudart" not in deps, "cudart must be linked statically"


# ----------------------------------------------------------------------------- GPU archs
@pytest.mark.parametrize("text, sass, ptx", [
    ("80;90", ["80", "90"], ["90"]),            # the documented form: PTX of the last
    ("75,80,90", ["75", "80", "90"], ["90"]),   # commas
    (" 80; 90 ", ["80", "90"], ["90"]),         # spaces around entries
    ("8.0 9.0+PTX", ["80", "90"], ["90"]),      # TORCH_CUDA_ARCH_LIST style
    ("8.0+PTX;9.0a", ["80", "90a"], ["80"]),    # PTX where marked, not of the last
    ("10.0;12.0", ["100", "120"], ["120"]),     # two-digit majors
])
def test_arch_list_forms(text, sass, ptx):
    assert _cuda_archs.parse_archs(text) == (sass, ptx)


@pytest.mark.parametrize("text", ["", " ; ", "compute_80", "sm80", "8", "80;9.0.1", "80 PTX"])
def test_arch_list_rejects_other_forms_naming_the_variable(text):
    with pytest.raises(ValueError, match="DATALORA_CUDA_ARCHS: expected"):
        _cuda_archs.parse_archs(text)


@pytest.mark.parametrize("capability, image", [
    ((7, 5), None),            # T4: older than every cubin and the PTX
    ((8, 0), "sm_80"),         # A100
    ((8, 9), "sm_80"),         # L4 / RTX 4090: the sm_80 cubin runs on 8.x
    ((9, 0), "sm_90"),         # H100
    ((10, 0), "compute_90"),   # B200: only the PTX (JIT)
    ((12, 0), "compute_90"),
])
def test_kernel_image_for_a_capability(capability, image):
    assert _cuda_archs.image_for(["80", "90"], ["90"], capability) == image


def test_arch_specific_cubins_run_only_on_their_capability():
    assert _cuda_archs.image_for(["90a"], [], (9, 0)) == "sm_90a"
    assert _cuda_archs.image_for(["90a"], ["90a"], (10, 0)) is None
    assert _cuda_archs.image_for(["75"], [], (8, 0)) is None  # cubins never cross a major


def test_default_archs_cover_t4_a100_h100():
    sass, ptx = _cuda_archs.parse_archs(_cuda_archs.DEFAULT_ARCHS)
    for capability in ((7, 5), (8, 0), (8, 6), (9, 0)):
        assert _cuda_archs.image_for(sass, ptx, capability), capability


@pytest.fixture
def fake_gpu(monkeypatch):
    """A loaded extension built for sm_80/sm_90 and a GPU whose capability the test sets
    (``fake_gpu["capability"]``); the loader's caches are cleared around it."""
    state = {"capability": (7, 5), "archs": {"sass": "80;90", "ptx": "90"}, "devices": 1}
    ext = types.SimpleNamespace(compiled_archs=lambda: dict(state["archs"]),
                                device_count=lambda: state["devices"],
                                cuda_runtime_version=lambda: 13000)
    monkeypatch.setattr(_C_loader, "_load", lambda: ext)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: state["capability"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "Tesla T4")
    caches = (_C_loader._device_reason, _C_loader.warn_fallback)
    for cache in caches:
        cache.cache_clear()
    yield state
    for cache in caches:
        cache.cache_clear()


def test_device_without_a_kernel_image_is_unsupported_with_the_reason(fake_gpu):
    cuda0 = torch.device("cuda", 0)
    reason = _C_loader.unsupported_reason(cuda0)
    assert "no kernel image for cuda:0 (Tesla T4, sm_75)" in reason
    assert "sm_80, sm_90, compute_90 (PTX)" in reason and "DATALORA_CUDA_ARCHS='75;80;90'" in reason
    _C_loader._device_reason.cache_clear()
    fake_gpu["capability"] = (8, 6)
    assert _C_loader.unsupported_reason(cuda0) is None
    assert "need a CUDA device" in _C_loader.unsupported_reason(torch.device("cpu"))


def test_gpu_the_extensions_cuda_runtime_cannot_see_is_unsupported_with_the_reason(fake_gpu):
    """A +cu130 build under a CUDA 12 driver (or torch on ROCm): torch sees the GPU, the
    extension's static CUDA runtime sees none, so every launch would fail ('CUDA driver
    version is insufficient'); the NF4 ops take the torch path and say why instead."""
    fake_gpu["capability"] = (9, 0)
    fake_gpu["devices"] = 0
    reason = _C_loader.unsupported_reason(torch.device("cuda", 0))
    assert "datalora._C (CUDA runtime 13.0) sees no CUDA device, while torch sees cuda:0" in reason
    assert "driver is older than that runtime" in reason
    _C_loader._device_reason.cache_clear()
    fake_gpu["devices"] = 1
    assert _C_loader.unsupported_reason(torch.device("cuda", 0)) is None


def test_build_without_recorded_archs_is_not_second_guessed(fake_gpu):
    fake_gpu["archs"] = {"sass": "", "ptx": ""}
    assert _C_loader.compiled_archs() is None
    assert _C_loader.unsupported_reason(torch.device("cuda", 0)) is None


@needs_ext
def test_extension_reports_the_archs_it_was_built_for():
    """setup.py writes the arch list into the build; the loader reads it back (as names
    ``parse_archs`` accepts), so a GPU outside it is caught before any launch."""
    sass, ptx = _C_loader.compiled_archs()
    assert sass and ptx
    assert _cuda_archs.parse_archs(";".join(sass))[0] == sass


class _OnCuda(nf4.NF4Tensor):
    """CPU tensors that report a CUDA device: what the NF4 dispatch sees for a GPU weight."""

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", 0)


def test_nf4_on_a_gpu_the_build_lacks_falls_back_with_one_warning(fake_gpu, monkeypatch):
    t = nf4.quantize(torch.randn(8, 64))
    on_gpu = _OnCuda(**{f.name: getattr(t, f.name) for f in dataclasses.fields(t)})
    real = nf4.dequantize_torch  # the torch path, run on the CPU tensors underneath
    monkeypatch.setattr(nf4, "dequantize_torch", lambda w, dtype: real(t, dtype))
    with pytest.warns(RuntimeWarning, match=r"torch fallback: datalora._C has no kernel image "
                                            r"for cuda:0 \(Tesla T4, sm_75\)"):
        out = nf4.dequantize(on_gpu, torch.float32)
    assert torch.equal(out, nf4.dequantize_torch(t, torch.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        nf4.dequantize(on_gpu, torch.float32)


def test_cuda_entry_points_raise_before_launching_on_a_gpu_the_build_lacks(fake_gpu):
    t = nf4.quantize(torch.randn(8, 64))
    on_gpu = _OnCuda(**{f.name: getattr(t, f.name) for f in dataclasses.fields(t)})
    with pytest.raises(_C_loader.ExtensionUnavailableError, match=r"no kernel image.*sm_75"):
        _C_loader.dequantize_nf4_cuda(on_gpu, torch.bfloat16)
    x = types.SimpleNamespace(device=torch.device("cuda", 0))
    with pytest.raises(_C_loader.ExtensionUnavailableError, match=r"no kernel image.*sm_75"):
        _C_loader.nf4_molora_decode_cuda(x, on_gpu, None, None, None, None, None)


def test_nf4_layer_paths_on_a_gpu_the_build_lacks(fake_gpu):
    from datalora.nf4_linear import _fused_decode_ok, _lora_backend
    from datalora.ops import BackendUnavailableError

    x = types.SimpleNamespace(device=torch.device("cuda", 0))
    assert not _fused_decode_ok(x, None, ())  # dequantize + GEMM instead of a failed launch
    with pytest.raises(BackendUnavailableError, match=r"no kernel image for cuda:0.*sm_75"):
        _lora_backend("cuda", x)
    fake_gpu["capability"] = (9, 0)
    _C_loader._device_reason.cache_clear()
    assert _lora_backend("cuda", x) == "triton"  # what auto picks there


def test_nf4_layer_backend_under_datalora_backend_cuda(fake_gpu, monkeypatch):
    """``DATALORA_BACKEND=cuda`` names the NF4 extension: an NF4 layer's LoRA ops run the
    backend auto picks (they read the variable too and have no 'cuda' MoLoRA ops, so
    ``backend="cuda"`` raised there); with ``backend="auto"`` the extension is required as
    with ``backend="cuda"``, and an error says the variable chose it."""
    from datalora.nf4_linear import _lora_backend
    from datalora.ops import BackendUnavailableError, resolve_backend

    monkeypatch.setenv("DATALORA_BACKEND", "cuda")
    x = types.SimpleNamespace(device=torch.device("cuda", 0))
    fake_gpu["capability"] = (9, 0)
    for backend in ("cuda", "auto"):
        lora = _lora_backend(backend, x)
        assert lora == "triton" and resolve_backend(lora, x.device) == "triton"
    assert _lora_backend("torch", x) == "torch"
    fake_gpu["capability"] = (7, 5)
    _C_loader._device_reason.cache_clear()
    with pytest.raises(BackendUnavailableError, match=r"sm_75.*chosen by DATALORA_BACKEND"):
        _lora_backend("auto", x)
    with pytest.raises(BackendUnavailableError, match=r"device cpu.*chosen by DATALORA_BACKEND"):
        _lora_backend("auto", torch.zeros(2, 4))


# ----------------------------------------------------------------------------- dequant host
@needs_ext
@pytest.mark.parametrize("shape", [
    (64, 128),    # whole 32-value chunks
    (7,),         # one short block
    (33, 65),     # odd numel: tail chunk and half-filled last byte
    (300, 257),   # > 256 absmax blocks (several nested blocks)
])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 4096])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequantize_host_equals_bitsandbytes(shape, blocksize, double_quant, dtype):
    F = pytest.importorskip("bitsandbytes.functional")
    w = _weight(shape, dtype, seed=blocksize)
    data, state = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant,
                                  quant_type="nf4")
    t = nf4.NF4Tensor.from_bnb((data, state))
    import torch._dynamo

    with torch._dynamo.config.patch(disable=True):
        ref = F.dequantize_4bit(data, state, quant_type="nf4")
    assert torch.equal(_C_loader.dequantize_nf4_host(t, dtype), ref)
    # other output dtypes: the same fp32 value, rounded once
    for other in (torch.float16, torch.bfloat16):
        assert torch.equal(_C_loader.dequantize_nf4_host(t, other), nf4.dequantize(t, other))


# ----------------------------------------------------------------------------- decode host
@needs_ext
@pytest.mark.parametrize("T, K, N, E, r, k, blocksize", [
    (1, 64, 40, 4, 8, 2, 64),     # T = 1 decode step
    (5, 96, 33, 3, 4, 3, 64),     # odd N, k = E (dense mixture)
    (16, 32, 8, 5, 1, 1, 64),     # max T, r = 1 (SMoRA), prime E
    (7, 96, 24, 4, 4, 2, 32),     # blocksize 32
    (12, 96, 20, 4, 4, 2, 128),   # blocks span rows (K = 96 < 128)
])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype, atol, rtol", [(torch.bfloat16, 2e-2, 2e-2),
                                               (torch.float16, 2e-3, 2e-3)])
def test_decode_host_matches_reference(T, K, N, E, r, k, blocksize, double_quant, dtype, atol,
                                       rtol):
    x, A, B, ids, gates, rs, bias = _lora(T, K, N, E, r, k, dtype)
    t = nf4.quantize(_weight((N, K), dtype), blocksize, double_quant)
    y = _C_loader.nf4_molora_decode_host(x, t, bias, A, B, ids, gates, rs, 2.0)
    ref = _decode_reference(x, t, bias, A, B, ids, gates, rs, 2.0)
    assert y.dtype == dtype and y.shape == (T, N)
    # one rounding of the fp32 result to dtype
    torch.testing.assert_close(y.float(), ref, atol=atol, rtol=rtol)
    # the LoRA term is really in there: zero B changes the output
    y0 = _C_loader.nf4_molora_decode_host(x, t, bias, A, torch.zeros_like(B), ids, gates, rs, 2.0)
    assert not torch.equal(y0, y)


@needs_ext
def test_decode_host_without_rank_scale_or_bias():
    x, A, B, ids, gates, _, _ = _lora(3, 64, 24, 4, 4, 2, torch.float16)
    t = nf4.quantize(_weight((24, 64), torch.float16))
    y = _C_loader.nf4_molora_decode_host(x, t, None, A, B, ids, gates, None, 0.5)
    ref = _decode_reference(x, t, torch.zeros(24, dtype=torch.float16), A, B, ids, gates, None,
                            0.5)
    torch.testing.assert_close(y.float(), ref, atol=2e-3, rtol=2e-3)


@needs_ext
def test_decode_host_rank_zero_is_the_base_alone():
    """r = 0 (accepted by ops.molora_delta) adds nothing; the kernel boundary takes no
    rank-0 experts, so the call runs the base alone instead of raising."""
    x, _, _, ids, gates, _, bias = _lora(4, 64, 24, 4, 4, 2, torch.float16)
    A, B = torch.zeros(4, 0, 64, dtype=torch.float16), torch.zeros(4, 24, 0, dtype=torch.float16)
    t = nf4.quantize(_weight((24, 64), torch.float16))
    y = _C_loader.nf4_molora_decode_host(x, t, bias, A, B, ids, gates, torch.ones(4, 0), 2.0)
    ref = _decode_reference(x, t, bias, A, B, ids, gates, None, 2.0)
    torch.testing.assert_close(y.float(), ref, atol=2e-3, rtol=2e-3)


@needs_ext
def test_python_entry_points_name_malformed_arguments():
    """Wrong ranks or types reach the shape unpacking / raw-pointer code only after the
    argument checks: errors name the argument (not "not enough values to unpack")."""
    x, A, B, ids, gates, _, _ = _lora(2, 64, 16, 3, 4, 2, torch.float16)
    t = nf4.quantize(_weight((16, 64), torch.float16))
    good = dict(x2=x, t=t, bias=None, A=A, B=B, expert_ids=ids, gates=gates)
    for over, error, match in [
            (dict(A=A[0]), ValueError, "A: expected a 3-D tensor"),
            (dict(expert_ids=ids[:, 0]), ValueError, "expert_ids: expected a 2-D tensor"),
            (dict(x2=x[0]), ValueError, "x: expected a 2-D tensor"),
            (dict(bias=[0.0] * 16), TypeError, "bias: expected a torch.Tensor"),
            (dict(t=t.dequantize(torch.float16)), TypeError, "t: expected a datalora.nf4"),
            # a 0-d weight: the shape check runs before d_out is read off it (IndexError)
            (dict(t=nf4.quantize(torch.tensor(1.0, dtype=torch.float16))), ValueError,
             r"weight: expected NF4 shape \[d_out, d_in=64\], got \(\)"),
    ]:
        with pytest.raises(error, match=match):
            _C_loader.nf4_molora_decode_host(**{**good, **over})
    with pytest.raises(TypeError, match="t: expected a datalora.nf4.NF4Tensor, got Tensor"):
        _C_loader.dequantize_nf4_host(torch.zeros(4, dtype=torch.uint8), torch.float16)


@needs_ext
def test_fused_decode_path_checks_the_routing_layout_as_the_ops_do(monkeypatch):
    """The fused decode path of nf4_molora_linear flattens the routing as the ops do: routing
    of another layout than x's leading dims (same numel: [L, B, k] for x [B, L, d]) is a
    ValueError naming it, not reshaped to [T, k] with tokens mixed. The kernel's host twin
    stands in for the GPU launch."""
    from datalora import nf4_linear

    def host_op(x, data, absmax, nested_absmax, nested_code, offset, shape, blocksize, bias,
                A, B, ids, gates, rank_scale, scaling, check_values=True):
        t = nf4.NF4Tensor(data, absmax, torch.Size(shape), x.dtype, blocksize, nested_absmax,
                          nested_code, offset)
        return _C_loader.nf4_molora_decode_host(x, t, bias, A, B, ids, gates, rank_scale,
                                                scaling)

    monkeypatch.setattr(nf4_linear, "_fused_decode_ok", lambda *args: True)
    monkeypatch.setattr(nf4_linear, "_nf4_molora_decode_op", host_op)
    x, A, B, ids, gates, _, _ = _lora(6, 64, 16, 3, 4, 2, torch.bfloat16)
    base = nf4_linear.NF4Linear(nf4.quantize(_weight((16, 64), torch.bfloat16)))
    x3 = x.view(2, 3, 64)
    y = nf4_linear.nf4_molora_linear(base, x3, x3, A, B, ids.view(2, 3, 2), gates.view(2, 3, 2))
    assert y.shape == (2, 3, 16)
    assert torch.equal(y, nf4_linear.nf4_molora_linear(base, x3, x3, A, B, ids, gates))
    with pytest.raises(ValueError, match=r"expert_ids: expected leading dims \(2, 3\)"):
        nf4_linear.nf4_molora_linear(base, x3, x3, A, B, ids.view(3, 2, 2), gates.view(3, 2, 2))
    with pytest.raises(ValueError, match="expert_ids: expected a 2-D tensor"):
        nf4_linear.nf4_molora_linear(base, x3, x3, A, B, ids.reshape(-1), gates)


def test_small_t_inference_the_fused_decode_skips_warns_once_why(fake_gpu):
    """On a GPU the extension serves, a 1..16-token inference call the decode kernel does
    not take (fp32 x, d_in not a multiple of 32) runs dequantize + GEMM with a one-time
    warning naming the reason; T > 16 (not a decode step) stays silent."""
    from datalora.nf4_linear import _fused_decode_ok

    fake_gpu["capability"] = (9, 0)
    t = nf4.quantize(torch.randn(8, 64))
    on_gpu = _OnCuda(**{f.name: getattr(t, f.name) for f in dataclasses.fields(t)})

    def x_on_gpu(T, dtype):
        return types.SimpleNamespace(shape=torch.Size([T, 64]), dtype=dtype, is_cuda=True,
                                     device=torch.device("cuda", 0))

    with pytest.warns(RuntimeWarning, match=r"fused NF4 decode kernel does not take these "
                                            r"inputs.*x dtype torch.float32"):
        assert not _fused_decode_ok(x_on_gpu(4, torch.float32), on_gpu, ())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not _fused_decode_ok(x_on_gpu(4, torch.float32), on_gpu, ())  # once only
        assert not _fused_decode_ok(x_on_gpu(40, torch.bfloat16), on_gpu, ())  # T > 16
        assert _fused_decode_ok(x_on_gpu(4, torch.bfloat16), on_gpu, ())


def test_decode_supported_agrees_with_the_kernel_boundary_on_d_in():
    """What ``decode_supported`` accepts the boundary must take: a d_in = 0 weight (a valid
    NF4Tensor, and ops take d_in = 0) goes to dequantize + GEMM, not to a launch refused with
    'K: expected a positive multiple of 32'."""
    empty = nf4.NF4Tensor(torch.empty(0, dtype=torch.uint8), torch.empty(0), torch.Size([8, 0]),
                          torch.bfloat16, 64)
    reason = _C_loader.decode_supported(torch.zeros(1, 0, dtype=torch.bfloat16), empty)
    assert reason == "d_in=0 is not a positive multiple of 32"
    assert "d_in=48" in _C_loader.decode_supported(torch.zeros(1, 48, dtype=torch.bfloat16),
                                                   nf4.quantize(torch.randn(8, 48)))
    assert _C_loader.decode_supported(torch.zeros(1, 32, dtype=torch.bfloat16),
                                      nf4.quantize(torch.randn(8, 32))) is None


@needs_ext
def test_decode_host_clamps_expert_ids_like_the_triton_kernels(monkeypatch):
    """Unchecked ids (``DATALORA_CHECK_VALUES=0``, CUDA-graph capture) never read outside A
    and B: the kernels clamp them to ``[0, E)``. A and B are views into bigger buffers here,
    so an unclamped id would silently read a neighbouring expert."""
    monkeypatch.setenv("DATALORA_CHECK_VALUES", "0")
    g = torch.Generator().manual_seed(0)
    A_all = torch.randn(8, 4, 64, generator=g).to(torch.bfloat16)
    B_all = torch.randn(8, 16, 4, generator=g).to(torch.bfloat16)
    A, B = A_all[:2], B_all[:2]  # E = 2
    x = torch.randn(2, 64, generator=g).to(torch.bfloat16)
    t = nf4.quantize(_weight((16, 64), torch.bfloat16))
    gates = torch.ones(2, 1)
    y = _C_loader.nf4_molora_decode_host(x, t, None, A, B, torch.tensor([[5], [-3]]), gates)
    want = _C_loader.nf4_molora_decode_host(x, t, None, A, B, torch.tensor([[1], [0]]), gates)
    assert torch.equal(y, want)


def test_nf4_fields_on_one_device_in_float32_before_any_kernel():
    """The kernels read every NF4 field through a raw pointer: a cast scale buffer or a
    field on another device is a clear ValueError, not a misread."""
    t = nf4.quantize(torch.randn(8, 64), 64, double_quant=True)
    bad = dataclasses.replace(t, nested_absmax=t.nested_absmax.to(torch.bfloat16))
    with pytest.raises(ValueError, match="nested_absmax: expected float32"):
        _C_loader._check_fields(bad, t.device)
    with pytest.raises(ValueError, match="expected device meta"):
        _C_loader._check_fields(t, torch.device("meta"))
    _C_loader._check_fields(t, t.device)


@needs_ext
def test_dequantize_host_of_an_empty_tensor():
    """An empty NF4Tensor (quantize rejects empty input, a hand-built one is valid) gives
    an empty result, as the torch path does, instead of a launch of zero blocks."""
    t = nf4.NF4Tensor(torch.empty(0, dtype=torch.uint8), torch.empty(0), torch.Size([0, 64]),
                      torch.float32, 64)
    out = _C_loader.dequantize_nf4_host(t, torch.bfloat16)
    assert out.shape == (0, 64) and out.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- checks
@needs_ext
def test_boundary_rejects_bad_arguments():
    C = _C_loader.load()
    t = nf4.quantize(torch.randn(8, 64))
    base = dict(data=t.data.data_ptr(), absmax=t.absmax.data_ptr(), nested_absmax=0,
                nested_code=0, offset=0, out=torch.empty(512).data_ptr(), n=512, blocksize=64,
                dtype=0)
    with pytest.raises(ValueError, match="blocksize: expected a power of two"):
        C.dequantize_nf4_host(**{**base, "blocksize": 48})
    with pytest.raises(ValueError, match="data: expected a non-null"):
        C.dequantize_nf4_host(**{**base, "data": 0})
    with pytest.raises(ValueError, match="dtype: expected"):
        C.dequantize_nf4_host(**{**base, "dtype": 7})
    with pytest.raises(ValueError, match="nested_absmax, nested_code, offset"):
        C.dequantize_nf4_host(**{**base, "nested_absmax": t.absmax.data_ptr()})
    with pytest.raises(ValueError, match="n: expected >= 1"):
        C.dequantize_nf4_host(**{**base, "n": 0})
    x, A, B, ids, gates, rs, bias = _lora(2, 64, 8, 3, 4, 2, torch.bfloat16)
    tw = nf4.quantize(torch.randn(8, 64))
    with pytest.raises(ValueError, match="T=17"):
        _C_loader.nf4_molora_decode_host(torch.zeros(17, 64, dtype=torch.bfloat16), tw, bias, A,
                                         B, torch.zeros(17, 2, dtype=torch.long),
                                         torch.ones(17, 2))
    with pytest.raises(ValueError, match="d_in=48"):
        _C_loader.nf4_molora_decode_host(torch.zeros(2, 48, dtype=torch.bfloat16),
                                         nf4.quantize(torch.randn(8, 48)), bias, A, B, ids, gates)
    with pytest.raises(ValueError, match="bias: expected dtype"):
        _C_loader.nf4_molora_decode_host(x, tw, bias.float(), A, B, ids, gates)
    with pytest.raises(ValueError, match="x: expected a CUDA tensor"):
        _C_loader.nf4_molora_decode_cuda(x, tw, bias, A, B, ids, gates)


@needs_ext
def test_decode_boundary_checks_the_workspace_before_launching():
    """The one-launch decode's cross-CTA workspace is checked at the boundary (on the CPU
    the checks run before any CUDA call, so they are testable here)."""
    C = _C_loader.load()
    assert C.decode_workspace_ints() == 3
    x, A, B, ids, gates, rs, bias = _lora(2, 64, 8, 3, 4, 2, torch.bfloat16)
    tw = nf4.quantize(torch.randn(8, 64))
    z, y = torch.empty(2 * 2 * 4), torch.empty(2, 8, dtype=torch.bfloat16)
    ids32 = ids.to(torch.int32)
    workspace = torch.zeros(4, dtype=torch.int32)
    args = dict(x=x.data_ptr(), w=tw.data.data_ptr(), absmax=tw.absmax.data_ptr(),
                nested_absmax=0, nested_code=0, offset=0, blocksize=64, bias=bias.data_ptr(),
                A=A.data_ptr(), B=B.data_ptr(), ids=ids32.data_ptr(), gates=gates.data_ptr(),
                rank_scale=rs.data_ptr(), z=z.data_ptr(), y=y.data_ptr(), T=2, K=64, N=8, E=3,
                r=4, k=2, scaling=1.0, dtype=2, workspace=workspace.data_ptr(),
                workspace_ints=3, stream=0)
    with pytest.raises(ValueError, match="workspace: expected a non-null"):
        C.nf4_molora_decode(**{**args, "workspace": 0})
    with pytest.raises(ValueError, match="workspace: expected a 4-byte aligned"):
        C.nf4_molora_decode(**{**args, "workspace": workspace.data_ptr() + 2})
    with pytest.raises(ValueError, match="workspace_ints: expected >= 3, got 2"):
        C.nf4_molora_decode(**{**args, "workspace_ints": 2})


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("shape", [(4096, 4096), (33, 65), (7,), (1000, 4096)])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequantize_cuda_equals_host(shape, double_quant, dtype):
    t = nf4.quantize(_weight(shape, dtype), 64, double_quant)
    host = _C_loader.dequantize_nf4_host(t, dtype)
    dev = nf4.dequantize(t.to("cuda"), dtype)
    assert torch.equal(dev.cpu(), host)
    # a misaligned (non-16-byte) output/data view takes the scalar path, same values
    t_off = nf4.NF4Tensor(torch.cat([t.data.new_zeros(1, 1), t.data]).cuda()[1:], t.absmax.cuda(),
                          t.shape, t.dtype, t.blocksize,
                          *(None if v is None else v.cuda()
                            for v in (t.nested_absmax, t.nested_code, t.offset)))
    assert torch.equal(nf4.dequantize(t_off, dtype).cpu(), host)


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("T, K, N, E, r, k, blocksize", [
    (1, 4096, 4096, 8, 16, 2, 64),   # decode step at model size
    (3, 96, 33, 3, 4, 3, 64),        # tiny, odd N, k = E
    (16, 512, 1000, 8, 8, 2, 64),    # max T
    (7, 256, 72, 4, 8, 2, 32),       # the 8-token tile partly filled; blocksize 32
    (12, 384, 40, 6, 4, 2, 128),     # the 16-token tile partly filled; blocks span rows
    (9, 4096, 64, 8, 16, 2, 4096),   # one absmax block per row
])
@pytest.mark.parametrize("dtype, atol, rtol", [(torch.bfloat16, 3e-2, 2e-2),
                                               (torch.float16, 5e-3, 5e-3)])
def test_decode_cuda_matches_reference(T, K, N, E, r, k, blocksize, dtype, atol, rtol):
    x, A, B, ids, gates, rs, bias = _lora(T, K, N, E, r, k, dtype)
    t = nf4.quantize(_weight((N, K), dtype), blocksize, True)
    ref = _decode_reference(x, t, bias, A, B, ids, gates, rs, 2.0)
    cuda = [v.cuda() for v in (x, bias, A, B, ids, gates, rs)]
    xd, bd, Ad, Bd, idd, gd, rsd = cuda
    y = _C_loader.nf4_molora_decode_cuda(xd, t.to("cuda"), bd, Ad, Bd, idd, gd, rsd, 2.0)
    torch.testing.assert_close(y.float().cpu(), ref, atol=atol, rtol=rtol)


def _decode_case(T, K, N, E, r, k, seed, bias=True, rank_scale=True):
    """Inputs of one bf16 decode call on the GPU (weight quantized there) and its fp32
    reference."""
    x, A, B, ids, gates, rs, b = (None if v is None else v.cuda() for v in _lora(
        T, K, N, E, r, k, torch.bfloat16, seed, rank_scale))
    b = b if bias else None
    t = nf4.quantize(_weight((N, K), torch.bfloat16, seed).cuda(), 64, True)
    return (x, b, A, B, ids, gates, rs), t, _decode_reference(x, t, b, A, B, ids, gates, rs, 2.0)


def _workspace_of_current_stream():
    stream = torch.cuda.current_stream()
    return _C_loader._DECODE_WORKSPACES[(stream.device.index, stream.cuda_stream)]


# shrink chunks (8 dot products each) vs CTAs of 8 output rows:
DECODE_GRIDS = [
    (16, 64, 8, 8, 16, 8),       # 256 chunks, 1 row CTA: most CTAs only shrink
    (16, 64, 8, 8, 64, 8),       # 1024 chunks, more than fit at once: CTAs help in the wait
    (1, 4096, 14336, 8, 16, 2),  # 4 chunks, 1792 row CTAs: the decode step at model size
]


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("T, K, N, E, r, k", DECODE_GRIDS)
def test_decode_cuda_workspace_is_left_zero_for_the_next_launch(T, K, N, E, r, k):
    """Back-to-back launches on one stream share a workspace: each must find it zero (the
    last CTA of the previous launch resets it), or z would be read before it is written."""
    for seed in range(2):
        (x, bias, A, B, ids, gates, rs), t, ref = _decode_case(T, K, N, E, r, k, seed)
        y = _C_loader.nf4_molora_decode_cuda(x, t, bias, A, B, ids, gates, rs, 2.0)
        torch.testing.assert_close(y.float(), ref, atol=3e-2, rtol=2e-2)
        torch.cuda.synchronize()
        assert _workspace_of_current_stream().count_nonzero().item() == 0


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("T, K, N, E, r, k", DECODE_GRIDS[:2] + [(2, 512, 4096, 8, 16, 2)])
def test_decode_cuda_back_to_back_without_sync(T, K, N, E, r, k):
    """Launches queued with no host sync in between, alternating two inputs (a z left from
    the previous launch would show as the other input's delta)."""
    def launch(case):
        (x, bias, A, B, ids, gates, rs), t, _ = case
        return _C_loader.nf4_molora_decode_cuda(x, t, bias, A, B, ids, gates, rs, 2.0)

    cases = [_decode_case(T, K, N, E, r, k, seed) for seed in (0, 1)]
    outs = [launch(case) for _ in range(25) for case in cases]
    for i, y in enumerate(outs):
        torch.testing.assert_close(y.float(), cases[i % 2][2], atol=3e-2, rtol=2e-2)


@pytest.mark.gpu
@needs_ext
def test_decode_cuda_without_bias_or_rank_scale():
    (x, bias, A, B, ids, gates, rs), t, ref = _decode_case(3, 256, 40, 4, 8, 2, 0, bias=False,
                                                           rank_scale=False)
    y = _C_loader.nf4_molora_decode_cuda(x, t, None, A, B, ids, gates, None, 2.0)
    torch.testing.assert_close(y.float(), ref, atol=3e-2, rtol=2e-2)


@pytest.mark.gpu
@needs_ext
def test_decode_cuda_on_two_streams_and_in_a_cuda_graph(monkeypatch):
    """Each stream gets its own workspace; a captured decode takes a slot of the zeroed slab
    (not the capture stream's eager workspace, no fill in the graph) and replays correctly
    with new inputs."""
    (x, bias, A, B, ids, gates, rs), t, ref = _decode_case(4, 256, 96, 4, 8, 2, 0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        y_side = _C_loader.nf4_molora_decode_cuda(x, t, bias, A, B, ids, gates, rs, 2.0)
        side_workspace = _workspace_of_current_stream()
    y_main = _C_loader.nf4_molora_decode_cuda(x, t, bias, A, B, ids, gates, rs, 2.0)
    torch.cuda.synchronize()
    assert side_workspace.data_ptr() != _workspace_of_current_stream().data_ptr()
    torch.testing.assert_close(y_side.float(), ref, atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(y_main.float(), ref, atol=3e-2, rtol=2e-2)

    used = []
    real = _C_loader._decode_workspace
    monkeypatch.setattr(_C_loader, "_decode_workspace",
                        lambda *a: used.append(real(*a)) or used[-1])
    slab, first_free = _C_loader._capture_slabs[torch.cuda.current_device()]
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):  # side has an eager workspace: not for graphs
        y_graph = _C_loader.nf4_molora_decode_cuda(x, t, bias, A, B, ids, gates, rs, 2.0,
                                                   check_values=False)
    assert used[0].data_ptr() == slab.data_ptr() + first_free * used[0].numel() * 4
    assert _C_loader._capture_slabs[torch.cuda.current_device()][1] == first_free + 1
    for seed in (1, 2):
        (x2, _, A2, _, ids2, gates2, rs2), _, _ = _decode_case(4, 256, 96, 4, 8, 2, seed)
        for static, new in ((x, x2), (A, A2), (ids, ids2), (gates, gates2), (rs, rs2)):
            static.copy_(new)
        graph.replay()
        want = _C_loader.nf4_molora_decode_cuda(x, t, bias, A, B, ids, gates, rs, 2.0)
        torch.testing.assert_close(y_graph, want, atol=0, rtol=0)
    torch.cuda.synchronize()
    assert used[0].count_nonzero().item() == 0


@pytest.mark.gpu
@needs_ext
@pytest.mark.parametrize("T", [1, 4, 16, 40])  # 40: beyond the fused kernel, dequant + GEMM
def test_molora_nf4_layer_fused_path_on_gpu(T):
    from datalora import MoLoRALinear
    from datalora.routing import Routing

    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 192).to(torch.bfloat16)
    layer = MoLoRALinear(lin, num_experts=4, rank=8, top_k=2, quantize="nf4").cuda().eval()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(T, 256, device="cuda", dtype=torch.bfloat16)
    ids = torch.stack([torch.randperm(4)[:2] for _ in range(T)]).cuda()
    routing = Routing(ids, torch.rand(T, 2, device="cuda"), torch.rand(T, 8, device="cuda"))
    with torch.no_grad():
        y = layer(x, routing=routing)
    w = layer.base_layer.dequantize(torch.bfloat16).float()
    ref = (x.float() @ w.T + layer.bias.float()
           + molora_delta_reference(x.float(), layer.lora_A.float(), layer.lora_B.float(),
                                    ids, routing.gates, routing.rank_scale, layer.scaling))
    # bf16 compute: rounding errors scale with the largest terms (|y| reaches ~26 here, where
    # one bf16 step is 0.125), so the absolute tolerance is relative to them
    torch.testing.assert_close(y.float(), ref, atol=1e-2 * ref.abs().max().item(), rtol=2e-2)


@pytest.mark.gpu
@needs_ext
def test_custom_ops_opcheck_on_gpu():
    from datalora.nf4 import _dequantize_cuda_op
    from datalora.nf4_linear import _nf4_molora_decode_op

    t = nf4.quantize(_weight((64, 96), torch.bfloat16), 64, True).to("cuda")
    torch.library.opcheck(_dequantize_cuda_op, (t.data, t.absmax, t.nested_absmax,
                                                 t.nested_code, t.offset, [64, 96], 64,
                                                 torch.bfloat16))
    x, A, B, ids, gates, rs, bias = (v.cuda() for v in _lora(2, 96, 64, 4, 4, 2,
                                                             torch.bfloat16))
    torch.library.opcheck(_nf4_molora_decode_op, (x, t.data, t.absmax, t.nested_absmax,
                                                  t.nested_code, t.offset, [64, 96], 64, bias,
                                                  A, B, ids, gates, rs, 2.0))


# ----------------------------------------------------------------------------- wheel
def test_sdist_holds_what_the_extension_build_needs(tmp_path):
    """The sdist carries every CUDA source and header setup.py compiles (MANIFEST.in)."""
    pytest.importorskip("build")
    import shutil
    import tarfile

    # from a copy of the source files alone: an in-tree *.egg-info (from `pip install -e`)
    # would list files MANIFEST.in must provide
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "--cached", "--others",
                             "--exclude-standard"], capture_output=True, text=True)
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    src = tmp_path / "src"
    for name in listed.stdout.splitlines():
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir",
                    str(dist), str(src)], check=True, capture_output=True, timeout=300)
    with tarfile.open(next(dist.glob("datalora-*.tar.gz"))) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    csrc = {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").iterdir() if p.is_file()}
    assert csrc and csrc <= names, csrc - names
    assert {"LICENSE", "setup.py", "pyproject.toml", "kernels/shrink.py",
            "datalora/py.typed", "datalora/shipped-data/multitask_train.jsonl"} <= names


@pytest.mark.slow
@needs_ext
def test_wheel_contains_extension_and_installs(tmp_path):
    pytest.importorskip("build")
    dist = tmp_path / "dist"
    env = dict(os.environ, DATALORA_BUILD_CUDA="1")
    # build checks pyproject's build requirements against this environment (make wheel)
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir",
                    str(dist), str(ROOT)], check=True, env=env, capture_output=True,
                   timeout=900)
    wheel = next(dist.glob("datalora-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("datalora/_C") and n.endswith(".so") for n in names), names
    assert "datalora/kernels/shrink.py" in names
    assert "datalora/shipped-data/multitask_train.jsonl" in names
    assert "datalora/tle/mixer.py" in names  # a subpackage listed in pyproject.toml
    assert "datalora/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    assert not any(n.startswith("kernels/") for n in names)  # no top-level "kernels" package
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)],
                   check=True, timeout=300)
    py = venv / "bin" / "python"
    # torch & co. come from this interpreter's site-packages (a plain path entry, so its
    # editable-install hook for the source tree is not activated there)
    import sysconfig

    new_site = subprocess.run([str(py), "-c", "import sysconfig; "
                               "print(sysconfig.get_paths()['purelib'])"],
                              capture_output=True, text=True, check=True).stdout.strip()
    Path(new_site, "_parent_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # without PYTHONPATH: a source tree on it (with its *.egg-info) reads as installed
    clean_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True, timeout=300, env=clean_env)
    # run outside the repo so the installed copy (not the source tree) is imported
    code = ("import datalora, datalora._C as C, datalora.nf4 as n, torch; "
            f"assert C.__file__.startswith({str(venv)!r}), C.__file__; "
            "t = n.quantize(torch.randn(8, 64)); "
            "from datalora import _C_loader as L; "
            "assert torch.equal(L.dequantize_nf4_host(t, torch.float32), n.dequantize(t, None)); "
            "import datalora.kernels.shrink, datalora.ops.triton_backend; "
            "print(C.__file__)")
    out = subprocess.run([str(py), "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env=clean_env, timeout=300)
    assert out.returncode == 0, out.stderr


def test_cuda_backend_on_an_nf4_layer_needs_a_gpu_and_the_extension():
    from datalora import MoLoRALinear
    from datalora.ops import BackendUnavailableError

    layer = MoLoRALinear(torch.nn.Linear(64, 32), 4, 4, quantize="nf4", backend="cuda")
    with pytest.raises(BackendUnavailableError, match="needs a CUDA device and the built "
                                                      "extension; device cpu"):
        layer(torch.randn(3, 64))


@pytest.mark.gpu
@needs_ext
def test_cuda_backend_on_an_nf4_layer_trains_and_decodes():
    """``backend="cuda"`` names the NF4 kernels: the MoLoRA ops around them run ``auto``
    (training and prefill), the decode kernel serves 1..16 tokens."""
    from datalora import MoLoRALinear

    torch.manual_seed(0)
    base = torch.nn.Linear(256, 128, dtype=torch.bfloat16)
    layer = MoLoRALinear(base, 4, 8, quantize="nf4", backend="cuda").cuda()
    ref = MoLoRALinear(torch.nn.Linear(256, 128, dtype=torch.bfloat16), 4, 8,
                       quantize="nf4").cuda()
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn_like(layer.lora_B) * 0.1)
    ref.load_state_dict(layer.state_dict())  # the same 4-bit weight and experts
    x = torch.randn(40, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    layer(x).float().square().sum().backward()
    assert layer.lora_A.grad is not None and x.grad is not None
    with torch.no_grad():
        for T in (1, 40):
            torch.testing.assert_close(layer(x[:T]), ref(x[:T]), atol=3e-2, rtol=2e-2)


@needs_ext
def test_wheel_workflow_smoke_test_passes_on_this_build():
    """The cibuildwheel test command of .github/workflows/wheels.yml, run as written (it
    fell behind nf4.dequantize's default dtype once and failed every wheel job)."""
    yaml = pytest.importorskip("yaml")
    workflow = ROOT / ".github" / "workflows" / "wheels.yml"
    steps = [s for job in yaml.safe_load(workflow.read_text())["jobs"].values()
             for s in job["steps"]]
    command = next(s["env"]["CIBW_TEST_COMMAND"] for s in steps
                   if "CIBW_TEST_COMMAND" in s.get("env", {}))
    code = command.strip().removeprefix('python -c "').removesuffix('"')
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "cuda runtime" in out.stdout
