"""The one-kernel MoLoRA linear (``kernels/fused_linear.py``, ``DATALORA_FUSED_LINEAR=1``)
vs the fp64 reference, the torch backend and the default cuBLAS + expand Triton path:
forward, every gradient through ``ops.molora_linear``, odd shapes, strides, the program
grouping, the dispatch rules (interpreter on the CPU)."""

from __future__ import annotations

import warnings

import pytest
import torch
from _cases import (
    DTYPES,
    assert_close_calibrated,
    assert_linear_grads_close,
    bucket_picks,
    make_inputs,
    max_err,
    spy_launches,
)
from conftest import requires_gpu
from datalora.kernels import fused_linear as fl

from datalora import ops
from datalora.ops import torch_backend
from datalora.ops import triton_backend as tb
from datalora.reference import molora_linear_reference

# (T, d_in, d_out, E, r, k)
SHAPES = [
    (0, 16, 12, 4, 4, 2),       # empty batch
    (1, 16, 24, 4, 8, 2),       # T = 1 (decode bucket)
    (37, 45, 29, 5, 3, 1),      # odd T, d_in, d_out, r; k = 1
    (100, 37, 70, 4, 6, 4),     # k = E (dense mixture), two row tiles, odd d_in = 37
    (20, 70, 130, 3, 16, 3),    # k = E, d_out over two column tiles, K2 = 48 masked
]


@pytest.fixture(autouse=True)
def _fused_env(monkeypatch):
    monkeypatch.delenv("DATALORA_FUSED_LINEAR", raising=False)
    yield


@pytest.fixture
def spy(monkeypatch):
    """Counts launches of the fused kernel's launcher (the real one runs)."""
    return spy_launches(monkeypatch, tb._fl, "fused_linear")


def _weights(d_in, d_out, dtype, device, bias, seed=3):
    gen = torch.Generator().manual_seed(seed)
    W = (torch.randn(d_out, d_in, generator=gen) / d_in ** 0.5).to(device, dtype)
    b = torch.randn(d_out, generator=gen).to(device, dtype) if bias else None
    return W, b


def _up(t):
    return None if t is None else t.double()


@pytest.mark.parametrize("rank_scale", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,eps", DTYPES)
def test_forward_matches_reference(shape, bias, rank_scale, dtype, eps, device, monkeypatch,
                                   spy):
    T, d_in, d_out, E, r, k = shape
    x, A, B, ids, g, rs = make_inputs(T, d_in, d_out, E, r, k, dtype, device,
                                      rank_scale=rank_scale)
    W, b = _weights(d_in, d_out, dtype, device, bias)
    args = (x, W, b, A, B, ids, g, rs, 0.5)
    unfused, h_unfused = tb.linear_forward(*args)
    assert not spy
    monkeypatch.setenv("DATALORA_FUSED_LINEAR", "1")
    y, h = tb.linear_forward(*args)
    assert len(spy) == (T > 0)
    base, h_base = torch_backend.linear_forward(*args)
    ref = molora_linear_reference(*(_up(t) for t in (x, W, b, A, B)), ids, _up(g), _up(rs),
                                  0.5)
    assert y.shape == (T, d_out) and y.dtype == dtype and h.shape == (T, k, r)
    assert_close_calibrated("y", y, base, ref, eps)
    assert_close_calibrated("y (vs cuBLAS + expand)", y, base, unfused.double(), eps)
    torch.testing.assert_close(h, h_unfused, rtol=0, atol=0)  # the same dense shrink
    torch.testing.assert_close(h, h_base, rtol=eps, atol=eps)


@pytest.mark.parametrize("layout", ["strided", "expanded"])
def test_bias_of_any_layout(layout, device, monkeypatch):
    """The fused epilogue reads bias[cols] at unit stride: a strided view (every other
    element) or an expanded scalar (stride 0, one stored element) is made contiguous first
    instead of read wrong or past its storage."""
    T, d_in, d_out, E, r, k = 9, 16, 24, 4, 4, 2
    x, A, B, ids, g, rs = make_inputs(T, d_in, d_out, E, r, k, torch.float32, device)
    W, _ = _weights(d_in, d_out, torch.float32, device, False)
    bias = (torch.randn(2 * d_out, device=device)[::2] if layout == "strided"
            else torch.tensor(0.3, device=device).expand(d_out))
    monkeypatch.setenv("DATALORA_FUSED_LINEAR", "1")
    y = ops.molora_linear(x, W, bias, A, B, ids, g, rs, 0.5, backend="triton")
    want = ops.molora_linear(x, W, bias.contiguous(), A, B, ids, g, rs, 0.5, backend="torch")
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)


def _direct_reference(x, W, bias, z, B):
    """fp64 ``x @ W^T + bias + z @ B_all^T`` with ``B_all[o, e*r + i] = B[e, o, i]``."""
    E, d_out, r = B.shape
    B_all = B.double().permute(1, 0, 2).reshape(d_out, E * r)
    y = x.double() @ W.double().T + z.double() @ B_all.T
    return y if bias is None else y + bias.double()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_kernel_strides_and_program_groups(dtype, tol, device):
    """Non-contiguous x / W / B / y, and a small tile with GROUP_M = 2 so that T = 100
    spans 7 row tiles: full groups, a remainder group and masked edges in M, N, K, K2."""
    gen = torch.Generator().manual_seed(0)
    T, d_in, d_out, E, r = 100, 37, 53, 3, 7
    rnd = lambda *s: torch.randn(*s, generator=gen).to(device, dtype)
    x = torch.cat([rnd(T, d_in), rnd(T, d_in)], 1)[:, ::2]            # column stride 2
    W = rnd(d_in, d_out).T                                             # [d_out, d_in], K-major
    B = rnd(d_out, E, r).permute(1, 0, 2)                              # [E, d_out, r] view
    z = rnd(T, E * r)
    bias = rnd(d_out)
    y_store = torch.full((d_out, T), float("nan"), device=device, dtype=dtype)
    y = y_store.T                                                      # row stride 1
    assert not (x.is_contiguous() or W.is_contiguous() or B.is_contiguous()
                or y.is_contiguous())
    cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_stages=2, num_warps=4)
    fl.fused_linear(x, W, bias, z, B, E, r, y, cfg=cfg)
    ref = _direct_reference(x, W, bias, z, B)
    low = (x.float() @ W.float().T + z.float() @ B.float().permute(1, 0, 2)
           .reshape(d_out, E * r).T + bias.float()).to(dtype)  # torch in the same dtype
    assert torch.isfinite(y).all(), "a tile was never written"
    assert max_err(y, ref) <= 2 * max_err(low, ref) + tol * ref.abs().max().item()
    y2 = torch.empty(T, d_out, device=device, dtype=dtype)
    fl.fused_linear(x, W, None, z, B, E, r, y2)  # the launcher's own bucket, no bias
    assert max_err(y2, ref - bias.double()) <= 2 * max_err(low - bias, ref - bias.double()) + \
        tol * ref.abs().max().item()


def test_nan_token_does_not_leak(device, monkeypatch):
    monkeypatch.setenv("DATALORA_FUSED_LINEAR", "1")
    x, A, B, ids, g, rs = make_inputs(70, 24, 20, 4, 4, 2, torch.float32, device)
    W, b = _weights(24, 20, torch.float32, device, True)
    x[5, 3] = float("nan")
    y, _ = tb.linear_forward(x, W, b, A, B, ids, g, rs, 1.0)
    assert torch.isnan(y[5]).all()
    assert torch.isfinite(torch.cat([y[:5], y[6:]])).all()


def _grads(fn, inputs):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None
              for t in inputs]
    out = fn(*leaves)
    gen = torch.Generator().manual_seed(1)
    out.backward(torch.randn(out.shape, generator=gen).to(out))
    return out.detach(), [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype,eps", DTYPES)
def test_molora_linear_grads(bias, dtype, eps, device, monkeypatch, spy):
    """Through the public op with the fused forward: output and every gradient."""
    k = 2 if bias else 4  # k = E without bias
    x, A, B, ids, g, rs = make_inputs(45, 40, 36, 4, 8, k, dtype, device)
    W, b = _weights(40, 36, dtype, device, bias)

    def run(backend, cast=lambda t: t):
        def fn(x, W, b, A, B, g, rs):
            if backend == "reference":
                return molora_linear_reference(x, W, b, A, B, ids, g, rs, 0.5)
            return ops.molora_linear(x, W, b, A, B, ids, g, rs, 0.5, backend=backend)
        return _grads(fn, tuple(None if t is None else cast(t) for t in (x, W, b, A, B, g, rs)))

    base_out, base_grads = run("torch")
    ref_out, ref_grads = run("reference", lambda t: t.double())
    monkeypatch.setenv("DATALORA_FUSED_LINEAR", "1")
    out, grads = run("triton")
    assert len(spy) == 1
    assert_close_calibrated("y", out, base_out, ref_out, eps)
    assert_linear_grads_close(grads, base_grads, ref_grads, eps)


def test_opcheck_fused(device, monkeypatch):
    monkeypatch.setenv("DATALORA_FUSED_LINEAR", "1")
    x, A, B, ids, g, rs = make_inputs(12, 16, 20, 4, 4, 2, torch.float32, device)
    W, b = _weights(16, 20, torch.float32, device, True)
    for t in (x, A, B, g, rs, W, b):
        t.requires_grad_(True)
    torch.library.opcheck(torch.ops.datalora.molora_linear.default,
                          (x, W, b, A, B, ids, g, rs, 0.5, "triton"))


def test_grouped_strategy_keeps_cublas_path(device, monkeypatch, spy):
    """Large E*r (grouped strategy) would make Zd cost E/k times the routed work: the
    fused flag leaves that case on cuBLAS + expand, still correct, and says so once (the
    flag was dropped without a word)."""
    from datalora.ops.backends import _warn_once

    _warn_once.cache_clear()
    monkeypatch.setenv("DATALORA_FUSED_LINEAR", "1")
    x, A, B, ids, g, rs = make_inputs(30, 24, 20, 40, 32, 2, torch.float32, device)
    assert tb.choose_strategy(40, 32, 2) == "grouped"  # E*r = 1280
    W, b = _weights(24, 20, torch.float32, device, True)
    with pytest.warns(RuntimeWarning, match="DATALORA_FUSED_LINEAR=1 has no effect on layers "
                                            "of the grouped strategy"):
        y, _ = tb.linear_forward(x, W, b, A, B, ids, g, rs, 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tb.linear_forward(x, W, b, A, B, ids, g, rs, 0.5)  # once
    assert not spy
    ref = molora_linear_reference(*(_up(t) for t in (x, W, b, A, B)), ids, _up(g), _up(rs),
                                  0.5)
    assert max_err(y, ref) <= 1e-5 * ref.abs().max().item()
    monkeypatch.setenv("DATALORA_SHRINK_STRATEGY", "dense")  # forcing dense fuses it
    y2, _ = tb.linear_forward(x, W, b, A, B, ids, g, rs, 0.5)
    assert len(spy) == 1 and max_err(y2, ref) <= 1e-5 * ref.abs().max().item()


def test_env_flag_is_validated(monkeypatch):
    assert not tb.fused_linear_enabled()
    monkeypatch.setenv("DATALORA_FUSED_LINEAR", "1")
    assert tb.fused_linear_enabled()
    monkeypatch.setenv("DATALORA_FUSED_LINEAR", "yes")
    with pytest.raises(ValueError, match="DATALORA_FUSED_LINEAR"):
        tb.fused_linear_enabled()


def test_configs_are_buckets_in_the_compile_matrix():
    """Tiles depend on buckets of T, and every pick is in ``launch_configs`` (compiled
    for sm_80 / sm_90 by tests/test_triton_compile.py)."""
    picks = bucket_picks(fl.config, fl.launch_configs()["_fused_linear_kernel"])
    for fp32, by_T in picks.items():
        assert len({frozenset(p.items()) for p in by_T.values()}) == (2 if fp32 else 3)


# ---------------------------------------------------------------- GPU only (bf16, large)

@pytest.mark.gpu
@pytest.mark.xdist_group("gpu_large")  # fp64 references up to ~40 GiB: one at a time
@requires_gpu
@pytest.mark.parametrize("dtype,eps", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("shape", [
    (4096, 4096, 4096, 8, 16, 2),     # 7B attention projection, top-2 of 8 (largest tile)
    (3001, 3424, 1000, 8, 16, 2),     # odd d_in = 3424, T not a tile multiple
    (1, 4096, 14336, 8, 16, 8),       # decode, dense mixture
    (77, 4096, 4096, 4, 16, 4),       # small-batch bucket
])
def test_large_shapes_gpu(shape, dtype, eps, device, monkeypatch):
    T, d_in, d_out, E, r, k = shape
    x, A, B, ids, g, rs = make_inputs(T, d_in, d_out, E, r, k, dtype, device)
    W, b = _weights(d_in, d_out, dtype, device, True)
    args = (x, W, b, A, B, ids, g, rs, 2.0)
    unfused, _ = tb.linear_forward(*args)
    monkeypatch.setenv("DATALORA_FUSED_LINEAR", "1")
    y, _ = tb.linear_forward(*args)
    base, _ = torch_backend.linear_forward(*args)
    ref = molora_linear_reference(*(t.float() if t is not None else None
                                    for t in (x, W, b, A, B)), ids, g.float(), rs.float(), 2.0)
    assert_close_calibrated("y", y, base, ref, eps)
    assert max_err(y, ref) <= 2 * max_err(unfused, ref) + eps * ref.abs().max().item()
