"""The one-kernel NF4 MoLoRA linear (``kernels/nf4_fused_linear.py``, ``DATALORA_NF4_FUSED=1``)
vs ``nf4.dequantize`` in fp64 + matmul + the reference delta: the kernel over blocksizes,
double quant, odd sizes and strides; forward and every gradient through
``nf4_molora_linear``; the dispatch rules (interpreter on the CPU)."""

from __future__ import annotations

import warnings

import pytest
import torch
from _cases import (
    DTYPES,
    assert_close_calibrated,
    bucket_picks,
    make_inputs,
    make_routing,
    max_err,
    spy_launches,
)
from conftest import requires_gpu
from datalora.kernels import nf4_fused_linear as nfl

from datalora import nf4
from datalora.nf4_linear import NF4Linear, nf4_fused_enabled, nf4_molora_linear
from datalora.reference import molora_linear_reference


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("DATALORA_NF4_FUSED", raising=False)
    yield


@pytest.fixture
def spy(monkeypatch):
    """Counts launches of the NF4 kernel's launcher (the real one runs)."""
    return spy_launches(monkeypatch, nfl, "nf4_fused_linear")


def _nf4(d_out, d_in, blocksize, double_quant, device, seed=3):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=gen) / d_in ** 0.5
    return nf4.quantize(w, blocksize, double_quant).to(device)


def _b_all(B):
    E, d_out, r = B.shape
    return B.permute(1, 0, 2).reshape(d_out, E * r)


# (T, d_in, d_out, E, r, bias)
KERNEL_SHAPES = [
    (0, 96, 24, 3, 4, True),       # empty batch
    (1, 96, 70, 2, 8, False),      # T = 1; d_in = 96: rows start mid-block for blocksize >= 64
    (37, 45, 29, 3, 5, True),      # odd T, d_in, d_out: 1305 values, an odd packed tail
]


@pytest.mark.parametrize("shape", KERNEL_SHAPES)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256])
@pytest.mark.parametrize("dtype,eps", DTYPES)
def test_kernel_matches_dequantize_reference(shape, blocksize, double_quant, dtype, eps,
                                             device):
    T, d_in, d_out, E, r, has_bias = shape
    t = _nf4(d_out, d_in, blocksize, double_quant, device)
    gen = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=gen).to(device, dtype)  # noqa: E731
    x, z, B = rnd(T, d_in), rnd(T, E * r), rnd(E, d_out, r)
    bias = rnd(d_out) if has_bias else None
    y = torch.full((T, d_out), float("nan"), device=device, dtype=dtype)
    nfl.nf4_fused_linear(x, t, nf4.NF4_CODE.to(device), bias, z, B, E, r, y)
    W = nf4.dequantize(t, torch.float32)  # exact fp32 code * absmax
    ref = x.double() @ W.double().T + z.double() @ _b_all(B).double().T
    low = x @ W.to(dtype).T + z @ _b_all(B).T  # torch in the kernel's dtype
    if has_bias:
        ref, low = ref + bias.double(), low + bias
    assert_close_calibrated("y", y, low, ref, eps)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_kernel_strides_and_program_groups(double_quant, dtype, tol, device):
    """Non-contiguous x / B / y, and 16x16x16 tiles with GROUP_M = 2 so that T = 100 spans 7
    row tiles (full and remainder groups) over a 53 x 37 weight of blocksize 32: masked
    edges in M, N, K and K2, blocks spanning rows."""
    T, d_in, d_out, E, r = 100, 37, 53, 3, 7
    t = _nf4(d_out, d_in, 32, double_quant, device)
    gen = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=gen).to(device, dtype)  # noqa: E731
    x = torch.cat([rnd(T, d_in), rnd(T, d_in)], 1)[:, ::2]           # column stride 2
    B = rnd(d_out, E, r).permute(1, 0, 2)                             # [E, d_out, r] view
    z, bias = rnd(T, E * r), rnd(d_out)
    y = torch.full((d_out, T), float("nan"), device=device, dtype=dtype).T  # row stride 1
    assert not (x.is_contiguous() or B.is_contiguous() or y.is_contiguous())
    cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_stages=2, num_warps=4)
    nfl.nf4_fused_linear(x, t, nf4.NF4_CODE.to(device), bias, z, B, E, r, y, cfg=cfg)
    W = nf4.dequantize(t, torch.float32)
    ref = x.double() @ W.double().T + z.double() @ _b_all(B).double().T + bias.double()
    low = x @ W.to(dtype).T + z @ _b_all(B).T + bias
    assert torch.isfinite(y).all(), "a tile was never written"
    assert max_err(y, ref) <= 2 * max_err(low, ref) + tol * ref.abs().max().item()


@pytest.mark.parametrize("dtype,eps", DTYPES)
def test_kernel_double_quant_past_one_nested_block(dtype, eps, device):
    """A 24 x 352 weight of blocksize 32 has 264 absmax blocks: the last 8 take the second
    nested absmax (one per 256 blocks), which the shapes above (at most 210 blocks) never
    reach."""
    T, d_in, d_out, E, r = 3, 352, 24, 2, 4
    t = _nf4(d_out, d_in, 32, True, device)
    assert t.nested_absmax.numel() == 2
    assert not torch.isclose(t.nested_absmax[0], t.nested_absmax[1])
    gen = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=gen).to(device, dtype)  # noqa: E731
    x, z, B = rnd(T, d_in), rnd(T, E * r), rnd(E, d_out, r)
    y = torch.full((T, d_out), float("nan"), device=device, dtype=dtype)
    nfl.nf4_fused_linear(x, t, nf4.NF4_CODE.to(device), None, z, B, E, r, y)
    W = nf4.dequantize(t, torch.float32)
    ref = x.double() @ W.double().T + z.double() @ _b_all(B).double().T
    low = x @ W.to(dtype).T + z @ _b_all(B).T
    assert_close_calibrated("y", y, low, ref, eps)


def test_block_k_over_blocksize_is_rejected(device):
    t = _nf4(8, 64, 32, False, device)
    x, z, B = (torch.zeros(2, 64, device=device), torch.zeros(2, 4, device=device),
               torch.zeros(1, 8, 4, device=device))
    y = torch.empty(2, 8, device=device)
    cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=64, GROUP_M=8, num_stages=2, num_warps=4)
    with pytest.raises(ValueError, match="BLOCK_K"):
        nfl.nf4_fused_linear(x, t, nf4.NF4_CODE.to(device), None, z, B, 1, 4, y, cfg=cfg)


# ------------------------------------------------------------ through nf4_molora_linear

def _base(d_in, d_out, blocksize, double_quant, bias, device):
    t = _nf4(d_out, d_in, blocksize, double_quant, "cpu")
    b = torch.randn(d_out, generator=torch.Generator().manual_seed(4)) if bias else None
    base = NF4Linear(t, b).to(device)
    if bias:
        base.bias.requires_grad_(True)  # a trainable bias (bnb Linear4bit allows one)
    return base


def _grads(fn, inputs, bias):
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in inputs]
    if bias is not None:
        bias.grad = None
    out = fn(*leaves)
    gen = torch.Generator().manual_seed(1)
    out.backward(torch.randn(out.shape, generator=gen).to(out))
    grads = [None if t is None else t.grad for t in leaves]
    return out.detach(), grads + [None if bias is None else bias.grad.clone()]


# (T, d_in, d_out, E, r, k, routing, blocksize, double_quant, bias)
LAYER_CASES = [
    (0, 32, 16, 4, 4, 2, "random", 32, False, True),        # empty batch
    (1, 40, 24, 4, 8, 1, "random", 32, True, False),        # T = 1, k = 1, d_in % 32 = 8
    (37, 96, 45, 3, 4, 3, "random", 64, True, True),        # odd T and d_out, k = E
    (20, 45, 33, 4, 4, 2, "one_expert", 128, False, True),  # skewed: every token to one expert
]
GRAD_NAMES = ("dx", "dA", "dB", "dgates", "drank_scale", "dbias")


@pytest.mark.parametrize("case", LAYER_CASES)
@pytest.mark.parametrize("dtype,eps", DTYPES)
def test_nf4_molora_linear_forward_and_grads(case, dtype, eps, device, monkeypatch, spy):
    T, d_in, d_out, E, r, k, routing, bs, dq, bias = case
    base = _base(d_in, d_out, bs, dq, bias, device)
    x, A, B, ids, g, rs = make_inputs(T, d_in, d_out, E, r, k, dtype, device, routing=routing)
    W = base.dequantize(torch.float32).double()
    b = base.bias

    def layer(backend):
        return lambda x, A, B, g, rs: nf4_molora_linear(base, x, x, A, B, ids, g, rs, 0.5,
                                                        backend)

    def reference(x, A, B, g, rs):
        return molora_linear_reference(x, W, None if b is None else b.double(), A, B, ids, g,
                                       rs, 0.5).to(torch.float64)

    monkeypatch.setenv("DATALORA_NF4_FUSED", "1")
    base_out, base_grads = _grads(layer("torch"), (x, A, B, g, rs), b)  # dequantize + delta
    assert not spy
    out, grads = _grads(layer("triton"), (x, A, B, g, rs), b)
    assert len(spy) == (T > 0)
    ref_out, ref_grads = _grads(reference, tuple(t.double() for t in (x, A, B, g, rs)), b)
    assert out.shape == (T, d_out) and out.dtype == dtype
    assert_close_calibrated("y", out, base_out, ref_out, eps)
    for name, got, low, ref in zip(GRAD_NAMES, grads, base_grads, ref_grads, strict=True):
        if ref is None:
            assert got is None, name
        else:
            assert_close_calibrated(name, got, low, ref.to(torch.float64), eps)


def test_double_backward_through_the_fused_path(device, monkeypatch, spy):
    """``create_graph=True`` over the one-kernel path: a Hessian-vector product in x and the
    LoRA inputs equals the reference's over the dequantized weight."""
    import warnings

    import datalora.ops.molora as molora_ops

    monkeypatch.setattr(molora_ops, "_warned_plain_torch", set())
    monkeypatch.setenv("DATALORA_NF4_FUSED", "1")
    base = _base(40, 24, 32, True, False, device)
    x, A, B, ids, g, rs = make_inputs(11, 40, 24, 4, 4, 2, torch.float32, device)
    W = base.dequantize(torch.float32)
    inputs = (x, A, B, g, rs)
    vectors = tuple(torch.randn_like(t) for t in inputs)

    def ours(x, A, B, g, rs):
        return nf4_molora_linear(base, x, x, A, B, ids, g, rs, 0.5, "triton").tanh().sum()

    def reference(x, A, B, g, rs):
        return molora_linear_reference(x, W, None, A, B, ids, g, rs, 0.5).tanh().sum()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, got = torch.autograd.functional.hvp(ours, inputs, vectors)
    assert spy  # the fused kernel ran the forward
    _, want = torch.autograd.functional.hvp(reference, inputs, vectors)
    for name, a, b in zip(["x", "A", "B", "gates", "rank_scale"], got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=name)


def test_flop_counter_counts_the_fused_ops(device, monkeypatch, spy):
    from torch.utils.flop_counter import FlopCounterMode

    monkeypatch.setenv("DATALORA_NF4_FUSED", "1")
    T, d_in, d_out, E, r, k = 6, 64, 24, 4, 4, 2
    base = _base(d_in, d_out, 32, False, False, device)
    x, A, B, ids, g, rs = make_inputs(T, d_in, d_out, E, r, k, torch.float32, device)
    for t in (x, A, B):
        t.requires_grad_(True)
    gemm, lora = 2 * T * d_in * d_out, 2 * T * k * r * (d_in + d_out)
    with FlopCounterMode(display=False) as counter:
        nf4_molora_linear(base, x, x, A, B, ids, g, rs, 0.5, "triton").sum().backward()
    assert spy
    # forward: base + LoRA; backward: dx of the base (nf4_grad_x), dB + dz, dx + dA
    assert counter.get_total_flops() == (gemm + lora) + (gemm + 2 * lora)


@pytest.mark.parametrize("dtype,eps", DTYPES)
def test_lora_input_differs_and_batch_dims(dtype, eps, device, monkeypatch, spy):
    """lora_x != x (LoRA dropout): the base GEMM reads x, the shrink lora_x, each gets its
    own gradient; x is a non-contiguous ``[2, 9, d_in]`` view."""
    monkeypatch.setenv("DATALORA_NF4_FUSED", "1")
    d_in, d_out, E, r, k = 48, 20, 4, 4, 2
    base = _base(d_in, d_out, 32, True, False, device)
    gen = torch.Generator().manual_seed(5)
    xs = torch.randn(2, 9, 2 * d_in, generator=gen).to(device, dtype)
    lx = torch.randn(2, 9, d_in, generator=gen).to(device, dtype)
    _, A, B, _, _, rs = make_inputs(18, d_in, d_out, E, r, k, dtype, device)
    ids, g = make_routing(18, E, k, "dup", device, gen)  # the same expert twice per token
    g = g.to(dtype)
    W = base.dequantize(torch.float32).double()

    def run(fn, cast, backend=None):
        leaves = [cast(t).detach().requires_grad_(True) for t in (xs, lx, A, B, g, rs)]
        xv = leaves[0][..., ::2]
        out = fn(xv, *leaves[1:], backend)
        out.backward(torch.ones_like(out))
        return out.detach(), [t.grad for t in leaves]

    def layer(x, lx, A, B, g, rs, backend):
        return nf4_molora_linear(base, x, lx, A, B, ids.view(2, 9, k), g.view(2, 9, k),
                                 rs.view(2, 9, r), 2.0, backend)

    def reference(x, lx, A, B, g, rs, _):
        from datalora.reference import molora_delta_reference
        return (x.reshape(18, d_in) @ W.T + molora_delta_reference(
            lx.reshape(18, d_in), A, B, ids, g, rs, 2.0)).view(2, 9, d_out)

    low_out, low_grads = run(layer, lambda t: t, "torch")
    out, grads = run(layer, lambda t: t, "triton")
    ref_out, ref_grads = run(reference, lambda t: t.double())
    assert len(spy) == 1 and out.shape == (2, 9, d_out)
    assert_close_calibrated("y", out, low_out, ref_out, eps)
    for name, got, low, ref in zip(("dx", "dlora_x", "dA", "dB", "dgates", "drank_scale"),
                                   grads, low_grads, ref_grads, strict=True):
        assert_close_calibrated(name, got, low, ref, eps)


def test_dispatch_rules(device, monkeypatch, spy):
    """Off by default; the torch backend and the grouped strategy (large E*r) keep the
    dequantize + delta path, each said once (the flag was dropped without a word); a bad
    flag value raises."""
    from datalora.ops.backends import _warn_once

    _warn_once.cache_clear()
    base = _base(32, 16, 32, False, False, device)
    x, A, B, ids, g, rs = make_inputs(5, 32, 16, 40, 32, 2, torch.float32, device)
    nf4_molora_linear(base, x, x, A, B, ids, g, rs, 1.0, "triton")
    assert not spy and not nf4_fused_enabled()
    monkeypatch.setenv("DATALORA_NF4_FUSED", "1")
    with pytest.warns(RuntimeWarning, match="NF4_FUSED=1 has no effect on layers of the "
                                            "grouped strategy"):
        nf4_molora_linear(base, x, x, A, B, ids, g, rs, 1.0, "triton")  # E*r = 1280: grouped
    with pytest.warns(RuntimeWarning, match="NF4_FUSED=1 has no effect off the triton"):
        nf4_molora_linear(base, x, x, A[:4], B[:4], ids % 4, g, rs, 1.0, "torch")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once each
        nf4_molora_linear(base, x, x, A, B, ids, g, rs, 1.0, "triton")
        nf4_molora_linear(base, x, x, A[:4], B[:4], ids % 4, g, rs, 1.0, "torch")
    assert not spy
    nf4_molora_linear(base, x, x, A[:4], B[:4], ids % 4, g, rs, 1.0, "triton")
    assert len(spy) == 1
    with pytest.raises(ValueError, match="B: expected shape"):
        nf4_molora_linear(base, x, x, A[:4], B[:4, :15], ids % 4, g, rs, 1.0, "triton")
    monkeypatch.setenv("DATALORA_NF4_FUSED", "yes")
    with pytest.raises(ValueError, match="DATALORA_NF4_FUSED"):
        nf4_fused_enabled()


def test_opcheck(device):
    t = _nf4(20, 40, 32, True, device)
    x, A, B, ids, g, rs = make_inputs(6, 40, 20, 4, 4, 2, torch.float32, device)
    bias = torch.randn(20, device=device)
    for v in (x, A, B, g, rs, bias):
        v.requires_grad_(True)
    torch.library.opcheck(torch.ops.datalora.nf4_molora_linear.default,
                          (x, x, t.data, t.absmax, t.nested_absmax, t.nested_code, t.offset,
                           list(t.shape), t.blocksize, bias, A, B, ids, g, rs, 0.5))


def test_configs_are_buckets_in_the_compile_matrix():
    """Tiles depend on buckets of T, never exceed the smallest blocksize in K, and every
    pick is in ``launch_configs`` (compiled for sm_80 / sm_90 by test_triton_compile)."""
    picks = bucket_picks(nfl.config, nfl.launch_configs()["_nf4_fused_linear_kernel"])
    for by_T in picks.values():
        assert all(p["BLOCK_K"] <= min(nf4.BLOCKSIZES) for p in by_T.values())


# ---------------------------------------------------------------- GPU only (bf16, large)

@pytest.mark.gpu
@pytest.mark.xdist_group("gpu_large")  # fp64 references up to ~40 GiB: one at a time
@requires_gpu
@pytest.mark.parametrize("dtype,eps", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("shape", [
    (4096, 4096, 4096, 8, 16, 2, 64, True),    # 7B projection, top-2 of 8, double quant
    (3001, 3424, 1000, 8, 16, 2, 128, False),  # odd d_in = 3424 (rows start mid-block)
    (77, 4096, 14336, 4, 16, 4, 64, True),     # small-batch bucket, k = E
])
def test_large_shapes_gpu(shape, dtype, eps, device, monkeypatch):
    T, d_in, d_out, E, r, k, bs, dq = shape
    base = _base(d_in, d_out, bs, dq, True, device)
    x, A, B, ids, g, rs = make_inputs(T, d_in, d_out, E, r, k, dtype, device)
    with torch.no_grad():
        default = nf4_molora_linear(base, x, x, A, B, ids, g, rs, 2.0)
        monkeypatch.setenv("DATALORA_NF4_FUSED", "1")
        y = nf4_molora_linear(base, x, x, A, B, ids, g, rs, 2.0)
        W = base.dequantize(torch.float32)
        ref = molora_linear_reference(x.float(), W, base.bias.float(), A.float(), B.float(),
                                      ids, g.float(), rs.float(), 2.0)
    assert_close_calibrated("y", y, default, ref, eps)
