"""Triton MoLoRA kernels vs the fp64 reference and the torch backend: forward, every
gradient, both strategies, skewed routing, edge shapes (interpreter on the CPU)."""

from __future__ import annotations

import warnings

import pytest
import torch
from _cases import (
    DTYPES,
    assert_close_calibrated,
    assert_linear_grads_close,
    make_inputs,
    max_err,
)
from conftest import requires_gpu

from datalora import ops
from datalora.ops import torch_backend
from datalora.ops import triton_backend as tb
from datalora.ops.layout import expert_minor
from datalora.reference import molora_delta_reference, molora_linear_reference
from datalora.routing import sort_routes

STRATEGIES = ["dense", "grouped"]

# (T, d_in, d_out, E, r, k)
SHAPES = [
    (1, 16, 24, 4, 8, 2),       # T = 1 (decode)
    (37, 45, 29, 5, 3, 2),      # odd T, d_in, d_out, r; T not a multiple of the block
    (70, 37, 50, 6, 16, 6),     # k = E: dense mixture, every expert weighted
    (20, 64, 40, 1, 1, 1),      # one expert of rank 1 (SMoRA-like column)
    (33, 40, 24, 7, 5, 3),      # prime E, odd k
    (9, 24, 20, 2, 128, 1),     # largest rank, k = 1 (multi-tenant)
    (24, 32, 16, 64, 2, 2),     # E = 64: most experts empty
]


def _grads(fn, inputs):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None
              for t in inputs]
    out = fn(*leaves)
    gen = torch.Generator().manual_seed(1)
    gy = torch.randn(out.shape, generator=gen).to(out)
    out.backward(gy)
    return out.detach(), [None if t is None else t.grad for t in leaves]


def _run_public(x, A, B, ids, g, rs, scaling, backend):
    fn = lambda x, A, B, g, rs: ops.molora_delta(x, A, B, ids, g, rs, scaling, backend=backend)
    return _grads(fn, (x, A, B, g, rs))


def _run_reference(x, A, B, ids, g, rs, scaling):
    up = lambda t: None if t is None else t.double()
    fn = lambda x, A, B, g, rs: molora_delta_reference(x, A, B, ids, g, rs, scaling)
    return _grads(fn, tuple(up(t) for t in (x, A, B, g, rs)))


def _check_all(x, A, B, ids, g, rs, eps, scaling=0.5):
    out, grads = _run_public(x, A, B, ids, g, rs, scaling, "triton")
    base_out, base_grads = _run_public(x, A, B, ids, g, rs, scaling, "torch")
    ref_out, ref_grads = _run_reference(x, A, B, ids, g, rs, scaling)
    assert_close_calibrated("delta", out, base_out, ref_out, eps)
    for name, got, base, ref in zip(("dx", "dA", "dB", "dgates", "drank_scale"), grads,
                                    base_grads, ref_grads, strict=True):
        if ref is None:
            assert got is None
            continue
        assert_close_calibrated(name, got, base, ref, eps)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,eps", DTYPES)
def test_delta_forward_backward(shape, strategy, dtype, eps, device, monkeypatch):
    monkeypatch.setenv("DATALORA_SHRINK_STRATEGY", strategy)
    T, d_in, d_out, E, r, k = shape
    _check_all(*make_inputs(T, d_in, d_out, E, r, k, dtype, device), eps)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("routing", ["one_expert", "dup"])
@pytest.mark.parametrize("rank_scale", [True, False])
def test_skewed_routing(strategy, routing, rank_scale, device, monkeypatch):
    """All tokens on one expert (others empty), or one expert twice in a token."""
    monkeypatch.setenv("DATALORA_SHRINK_STRATEGY", strategy)
    inputs = make_inputs(67, 40, 36, 6, 8, 2, torch.float32, device, routing=routing,
                         rank_scale=rank_scale)
    _check_all(*inputs, eps=1e-5)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_backend_functions_match_torch_backend(strategy, device):
    """The protocol functions directly, including h and partial ``needs``."""
    x, A, B, ids, g, rs = make_inputs(40, 24, 20, 8, 4, 2, torch.float32, device)
    delta, h = tb.delta_forward(x, A, B, ids, g, rs, 2.0, strategy=strategy)
    delta_t, h_t = torch_backend.delta_forward(x, A, B, ids, g, rs, 2.0)
    torch.testing.assert_close(delta, delta_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_t, rtol=1e-5, atol=1e-5)
    gy = torch.randn_like(delta)
    for needs in [(True, False, False, False, False), (False, True, True, False, False),
                  (False, True, False, False, False), (False, False, True, False, False),
                  (False, False, False, True, True)]:
        got = tb.delta_backward(gy, x, A, B, ids, g, rs, h, 2.0, needs, strategy=strategy)
        want = torch_backend.delta_backward(gy, x, A, B, ids, g, rs, h_t, 2.0, needs)
        for a, b, need in zip(got, want, needs, strict=True):
            assert (a is None) == (not need)
            if need:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("budget", [1, 4 * 3 * 128 * 4])
def test_grouped_expand_in_column_and_token_chunks(budget, device, monkeypatch):
    """With k > 1 the grouped expand sums per-route products in an fp32 buffer; past the
    memory budget it goes in column chunks (of d_out forward, d_in for dx) and, when even
    128 columns of every route do not fit, in token chunks with their own expert sort
    (budget 1: one token at a time; then 4 tokens), same result."""
    monkeypatch.setattr(tb, "PARTIAL_BUDGET_BYTES", budget)  # 128-column chunks
    partial_rows = []
    real = tb._ex.expand_grouped
    monkeypatch.setattr(tb._ex, "expand_grouped", lambda z, w, ws, perm, out, *a: (
        partial_rows.append(out.shape[0]), real(z, w, ws, perm, out, *a))[1])
    x, A, B, ids, g, rs = make_inputs(9, 300, 260, 4, 4, 3, torch.float32, device)
    delta, h = tb.delta_forward(x, A, B, ids, g, rs, 2.0, strategy="grouped")
    assert max(partial_rows) == 3 * max(1, budget // (4 * 3 * 128))  # routes per chunk
    delta_t, h_t = torch_backend.delta_forward(x, A, B, ids, g, rs, 2.0)
    torch.testing.assert_close(delta, delta_t, rtol=1e-5, atol=1e-5)
    gy = torch.randn_like(delta)
    needs = (True, False, False, False, False)
    dx = tb.delta_backward(gy, x, A, B, ids, g, rs, h, 2.0, needs, strategy="grouped")[0]
    want = torch_backend.delta_backward(gy, x, A, B, ids, g, rs, h_t, 2.0, needs)[0]
    torch.testing.assert_close(dx, want, rtol=1e-5, atol=1e-5)


def test_grouped_expand_token_chunks_add_into_the_output(device, monkeypatch):
    """In token chunks the grouped expand still adds into an existing output: the base
    GEMM's y of ``linear_forward`` and the ``dx_out`` of ``delta_backward`` (a budget of
    4 tokens per chunk: chunks of 4, 4 and 1 of the 9 tokens)."""
    monkeypatch.setattr(tb, "PARTIAL_BUDGET_BYTES", 4 * 3 * 128 * 4)
    monkeypatch.setenv("DATALORA_SHRINK_STRATEGY", "grouped")
    x, A, B, ids, g, rs = make_inputs(9, 40, 36, 4, 4, 3, torch.float32, device)
    W = torch.randn(36, 40, generator=torch.Generator().manual_seed(3)).to(device) / 40 ** 0.5
    y, h = tb.linear_forward(x, W, None, A, B, ids, g, rs, 2.0)
    y_t, h_t = torch_backend.linear_forward(x, W, None, A, B, ids, g, rs, 2.0)
    torch.testing.assert_close(y, y_t, rtol=1e-5, atol=1e-5)
    gy = torch.randn_like(y)
    needs = (True, False, False, False, False)
    dx = tb.delta_backward(gy, x, A, B, ids, g, rs, h, 2.0, needs, dx_out=gy @ W,
                           strategy="grouped")[0]
    want = torch_backend.delta_backward(gy, x, A, B, ids, g, rs, h_t, 2.0, needs,
                                        dx_out=gy @ W)[0]
    torch.testing.assert_close(dx, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [1, 2])
def test_grouped_expand_over_a_partial_second_column_tile(k, device):
    """d_out = 100: the grouped expand's 64-wide output tiles end in a partial one (every
    shape above has d_out < 64 on the grouped path); k = 1 writes y in-kernel, k = 2 goes
    through the per-route buffer."""
    x, A, B, ids, g, rs = make_inputs(10, 16, 100, 6, 4, k, torch.float32, device)
    got, _ = tb.delta_forward(x, A, B, ids, g, rs, 0.5, strategy="grouped")
    want, _ = torch_backend.delta_forward(x, A, B, ids, g, rs, 0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_non_contiguous_inputs(strategy, device, monkeypatch):
    monkeypatch.setenv("DATALORA_SHRINK_STRATEGY", strategy)
    x, A, B, ids, g, rs = make_inputs(30, 26, 22, 4, 6, 2, torch.float32, device)
    x_nc = torch.cat([x, x], 1)[:, ::2]                       # column stride 2
    A_nc = A.transpose(1, 2).contiguous().transpose(1, 2)    # d_in-major experts
    B_nc = B.permute(1, 0, 2).contiguous().permute(1, 0, 2)   # [d_out, E, r] storage
    ids_nc = torch.cat([ids, ids], 1)[:, ::2]
    assert not (x_nc.is_contiguous() or A_nc.is_contiguous() or B_nc.is_contiguous())
    _check_all(x_nc, A_nc, B_nc, ids_nc, g.t().contiguous().t(), rs, eps=1e-5)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_empty_batch(strategy, device, monkeypatch):
    monkeypatch.setenv("DATALORA_SHRINK_STRATEGY", strategy)
    x, A, B, ids, g, rs = make_inputs(0, 16, 12, 4, 4, 2, torch.float32, device)
    out, grads = _run_public(x, A, B, ids, g, rs, 1.0, "triton")
    assert out.shape == (0, 12)
    assert grads[0].shape == (0, 16)
    assert torch.equal(grads[1], torch.zeros_like(A))
    assert torch.equal(grads[2], torch.zeros_like(B))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_out_of_range_ids_are_clamped(strategy, device):
    """Unchecked bad ids never read out of bounds: they act as the clamped expert."""
    x, A, B, ids, g, rs = make_inputs(19, 24, 16, 5, 4, 2, torch.float32, device)
    bad = ids.clone()
    bad[0, 0], bad[3, 1], bad[7, 0], bad[9, 0] = -3, 5, 1000, 2**32 + 1  # wraps in int32
    if bad[0, 1] == 0:
        bad[0, 1] = 1
    got, h = tb.delta_forward(x, A, B, bad, g, rs, 1.0, strategy=strategy)
    want, h_want = torch_backend.delta_forward(x, A, B, bad.clamp(0, 4), g, rs, 1.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_nan_token_does_not_leak(strategy, device):
    x, A, B, ids, g, rs = make_inputs(40, 24, 16, 4, 4, 2, torch.float32, device)
    x[5, 3] = float("nan")
    out, _ = tb.delta_forward(x, A, B, ids, g, rs, 1.0, strategy=strategy)
    assert torch.isnan(out[5]).all()
    others = torch.cat([out[:5], out[6:]])
    assert torch.isfinite(others).all()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_weight_grads_are_deterministic(strategy, device):
    x, A, B, ids, g, rs = make_inputs(90, 32, 24, 4, 8, 2, torch.float32, device,
                                      routing="one_expert")
    delta, h = tb.delta_forward(x, A, B, ids, g, rs, 1.0, strategy=strategy)
    gy = torch.randn_like(delta)
    runs = [tb.delta_backward(gy, x, A, B, ids, g, rs, h, 1.0, (True,) * 5, strategy=strategy)
            for _ in range(2)]
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_strategy_heuristic():
    assert tb.choose_strategy(8, 16, 2) == "dense"      # E*r = 128
    assert tb.choose_strategy(64, 16, 64) == "dense"    # dense mixture k = E
    assert tb.choose_strategy(64, 16, 2) == "dense"     # E*r = 1024: cuBLAS still wins
    assert tb.choose_strategy(64, 32, 2) == "grouped"   # E*r = 2048
    assert tb.choose_strategy(32, 128, 2) == "grouped"


def test_permutation_is_shared_until_ids_change(device):
    ids = torch.randint(0, 6, (50, 2), device=device)
    p1, p2 = tb.permutation(ids, 6), tb.permutation(ids, 6)
    assert p1 is p2
    assert torch.equal(p1.expert_offsets[-1].cpu(), torch.tensor(100))
    assert tb.permutation(ids, 6, cache=False) is not p1  # no-history gates: never cached
    ids[0, 0] = (ids[0, 0] + 1) % 6
    assert tb.permutation(ids, 6) is not p1


def test_permutation_cache_is_keyed_by_the_expert_count(device):
    """The same ids tensor sorted for another number of experts gets that count's
    segments, not the cached sort's (whose bounds would end at the old count)."""
    ids = torch.randint(0, 4, (20, 2), device=device)
    p4 = tb.permutation(ids, 4)
    p6 = tb.permutation(ids, 6)
    assert p4.expert_offsets.numel() == 5
    assert torch.equal(p6.expert_offsets, sort_routes(ids, 6).expert_offsets)



@pytest.mark.parametrize("grads", ["all", "A", "B"])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_backward_sorts_an_uncached_routing_once(strategy, grads, device, monkeypatch):
    """A routing the backend may not cache (plain user tensors) is sorted by expert at most
    once per backward, whichever gradients it computes (the grouped dx and dA / dB share
    the sort); the dense strategy's GEMMs over every expert need no sort."""
    monkeypatch.setenv("DATALORA_SHRINK_STRATEGY", strategy)
    sorts = []
    monkeypatch.setattr(tb, "sort_routes",
                        lambda *a, **k: (sorts.append(1), sort_routes(*a, **k))[1])
    x, A, B, ids, g, rs = make_inputs(20, 16, 12, 8, 4, 2, torch.float32, device)
    wanted = {"all": (x, A, B, g, rs), "A": (A,), "B": (B,)}[grads]
    for t in wanted:
        t.requires_grad_(True)
    delta = ops.molora_delta(x, A, B, ids, g, rs, 1.0, backend="triton")
    sorts.clear()
    delta.sum().backward()
    assert len(sorts) == (strategy == "grouped")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype,eps", DTYPES)
def test_molora_linear(bias, strategy, dtype, eps, device, monkeypatch):
    monkeypatch.setenv("DATALORA_SHRINK_STRATEGY", strategy)
    k = 3 if bias else 1  # k = 1: the grouped expand adds into y in-kernel
    x, A, B, ids, g, rs = make_inputs(45, 40, 36, 6, 8, k, dtype, device)
    gen = torch.Generator().manual_seed(3)
    W = (torch.randn(36, 40, generator=gen) / 40 ** 0.5).to(device, dtype)
    b = torch.randn(36, generator=gen).to(device, dtype) if bias else None

    def run(backend, dt=None):
        cast = (lambda t: t) if dt is None else (lambda t: None if t is None else t.to(dt))
        fn = (lambda x, W, b, A, B, g, rs: ops.molora_linear(x, W, b, A, B, ids, g, rs, 0.5,
                                                             backend=backend))
        if backend == "reference":
            fn = (lambda x, W, b, A, B, g, rs: molora_linear_reference(x, W, b, A, B, ids, g,
                                                                       rs, 0.5))
        return _grads(fn, tuple(cast(t) for t in (x, W, b, A, B, g, rs)))

    out, grads = run("triton")
    base_out, base_grads = run("torch")
    ref_out, ref_grads = run("reference", torch.float64)
    assert_close_calibrated("y", out, base_out, ref_out, eps)
    assert_linear_grads_close(grads, base_grads, ref_grads, eps)


def test_float64_runs_the_torch_backend_and_says_so_once(device):
    """The kernels have no float64 path: the torch backend computes it, which went unsaid."""
    from datalora.ops.backends import _warn_once

    _warn_once.cache_clear()
    x, A, B, ids, g, rs = make_inputs(7, 16, 12, 4, 4, 2, torch.float64, device)
    with pytest.warns(RuntimeWarning, match="'triton' has no float64 kernels"):
        got = ops.molora_delta(x, A, B, ids, g, rs, 0.5, backend="triton")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.molora_delta(x, A, B, ids, g, rs, 0.5, backend="triton")
    assert torch.equal(got, ops.molora_delta(x, A, B, ids, g, rs, 0.5, backend="torch"))


def test_molora_linear_opcheck(device):
    x, A, B, ids, g, rs = make_inputs(12, 16, 20, 4, 4, 2, torch.float32, device)
    W = torch.randn(20, 16, device=device)
    for t in (x, A, B, g, rs, W):
        t.requires_grad_(True)
    op = torch.ops.datalora.molora_linear.default
    torch.library.opcheck(op, (x, W, None, A, B, ids, g, rs, 0.5, "triton"))
    op = torch.ops.datalora.molora_delta.default
    torch.library.opcheck(op, (x, A, B, ids, g, rs, 0.5, "triton"))


@pytest.mark.parametrize("fused", [True, False])
def test_double_backward_matches_reference_and_warns_once(fused, device, monkeypatch):
    """``create_graph=True`` through the triton ops: the gradients are recomputed in plain
    torch ops (differentiable), with a one-time warning naming the backend."""

    import datalora.ops.molora as molora_ops

    monkeypatch.setattr(molora_ops, "_warned_plain_torch", set())
    x, A, B, ids, g, rs = make_inputs(9, 16, 12, 4, 4, 2, torch.float32, device)
    W = torch.randn(12, 16, device=device)
    inputs = (x, W, A, B, g, rs)
    vectors = tuple(torch.randn_like(t) for t in inputs)

    def model(backend):
        def fn(x, W, A, B, g, rs):
            if backend == "reference":
                y = molora_linear_reference(x, W, None, A, B, ids, g, rs, 0.5)
            elif fused:
                y = ops.molora_linear(x, W, None, A, B, ids, g, rs, 0.5, backend=backend)
            else:
                y = x @ W.T + ops.molora_delta(x, A, B, ids, g, rs, 0.5, backend=backend)
            return y.tanh().sum()
        return fn

    with pytest.warns(UserWarning, match="double backward.*not the 'triton' kernels"):
        _, got = torch.autograd.functional.hvp(model("triton"), inputs, vectors)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.autograd.functional.hvp(model("triton"), inputs, vectors)  # warned once
    _, want = torch.autograd.functional.hvp(model("reference"), inputs, vectors)
    for name, a, b in zip(["x", "W", "A", "B", "gates", "rank_scale"], got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=name)


# ---------------------------------------------------------------- GPU only (bf16, large)

@pytest.mark.gpu
@pytest.mark.xdist_group("gpu_large")  # fp64 references up to ~40 GiB: one at a time
@requires_gpu
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype,eps", [(torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("shape", [
    (4096, 4096, 4096, 8, 16, 2),     # 7B attention projection, top-2 of 8
    (3001, 3424, 1000, 64, 128, 2),   # odd d (3424), many experts, large rank
    (1, 4096, 14336, 8, 16, 8),       # decode, dense mixture
])
def test_large_shapes_gpu(shape, strategy, dtype, eps, device, monkeypatch):
    monkeypatch.setenv("DATALORA_SHRINK_STRATEGY", strategy)
    T, d_in, d_out, E, r, k = shape
    _check_all(*make_inputs(T, d_in, d_out, E, r, k, dtype, device), eps)


@pytest.mark.gpu
@requires_gpu
def test_bf16_forward_matches_fp32_gpu(device):
    x, A, B, ids, g, rs = make_inputs(257, 512, 384, 8, 16, 2, torch.bfloat16, device)
    out, _ = tb.delta_forward(x, A, B, ids, g, rs, 2.0)
    ref = molora_delta_reference(x.float(), A.float(), B.float(), ids, g.float(), rs.float(),
                                 2.0)
    base, _ = torch_backend.delta_forward(x, A, B, ids, g, rs, 2.0)
    assert max_err(out, ref) <= 2 * max_err(base, ref) + 1e-2 * ref.abs().max().item()


def test_entry_points_launch_on_the_tensors_device(monkeypatch):
    """Triton launches on the current CUDA device: each backend entry point makes its first
    tensor's device current (a layer on cuda:1 while cuda:0 is current, as under
    ``device_map="auto"``), and leaves the current device alone when they agree."""
    entered = []

    class RecordingGuard:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc_info):
            entered.append("exit")

    class OnCuda1:  # stands in for a tensor on cuda:1 (no GPU here)
        is_cuda, device = True, torch.device("cuda", 1)

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", RecordingGuard)
    seen = tb._on_tensor_device(lambda first, extra: (list(entered), extra))(OnCuda1(), 7)
    assert seen == ([torch.device("cuda", 1)], 7) and entered[-1] == "exit"
    entered.clear()
    OnCuda1.device = torch.device("cuda", 0)
    tb._on_tensor_device(lambda first: None)(OnCuda1())
    assert entered == []
    names = ("delta_forward", "delta_backward", "linear_forward", "gather_tokens",
             "scatter_tokens")
    assert all(getattr(tb, n).__wrapped__.__name__ == n for n in names)


def test_int32_column_offsets_guard():
    """A transposed x whose last column offset passes int32 is copied to row-major before a
    launch (the kernels index columns with int32 offsets); any other layout is kept."""
    from datalora.kernels._common import int32_columns

    wide = torch.empty(14_336, 160_000, device="meta").t()  # [T=160k, d=14336], column-major
    assert (wide.shape[1] - 1) * wide.stride(1) >= 2**31
    assert int32_columns(wide).is_contiguous()
    small = torch.randn(64, 48).t()
    assert int32_columns(small) is small
    # the last column offset at exactly 2**31 no longer fits int32; 2**31 - 1 still does
    edge = torch.empty_strided((2, 3), (1, 2**30), device="meta")
    assert int32_columns(edge).is_contiguous()
    fits = torch.empty_strided((2, 2), (1, 2**31 - 1), device="meta")
    assert int32_columns(fits) is fits


@pytest.mark.parametrize("x_requires_grad", [False, True])
def test_forward_mode_ad_gives_the_reference_tangent(x_requires_grad, device):
    """Inside ``forward_ad.dual_level()`` the ops run as plain torch ops (the kernels'
    outputs carried no tangent: the delta's was None, the linear's missed the LoRA part)."""
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(0)
    T, E, r, d_in, d_out = 6, 3, 2, 8, 5
    x = torch.randn(T, d_in, device=device, requires_grad=x_requires_grad)
    A, B = torch.randn(E, r, d_in, device=device), torch.randn(E, d_out, r, device=device)
    ids = torch.tensor([[0, 0], [1, 2], [2, 1], [0, 2], [1, 1], [2, 2]], device=device)
    gates = torch.rand(T, 2, device=device)
    W = torch.randn(d_out, d_in, device=device)
    tangent = torch.randn_like(x)
    want = molora_delta_reference(tangent, A, B, ids, gates, None, 0.5)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, tangent)
        delta = ops.molora_delta(dual, A, B, ids, gates, None, 0.5, backend="triton")
        linear = ops.molora_linear(dual, W, None, A, B, ids, gates, None, 0.5,
                                   backend="triton")
        torch.testing.assert_close(fwAD.unpack_dual(delta).tangent, want)
        torch.testing.assert_close(fwAD.unpack_dual(linear).tangent, tangent @ W.T + want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dense_strategy_issues_no_index_casts_or_fills(dtype, device, monkeypatch):
    """The dense routing passes read the router's int64 ids as they are (clamped in the
    kernel) and its gates in x's dtype as they are (a 16-bit model's router; their gradient
    is written in that dtype too), and a missing rank scale is a kept vector of ones: per
    call no clamp, cast or fill runs beside the GEMMs and the routing kernels (on a GPU
    each is one more launch)."""
    from torch.profiler import ProfilerActivity, profile

    monkeypatch.setenv("DATALORA_SHRINK_STRATEGY", "dense")
    x, A, B, ids, g, _ = make_inputs(24, 16, 12, 4, 4, 2, dtype, device, rank_scale=False)
    W = torch.randn(12, 16).to(device, dtype)
    gy = torch.randn(24, 12).to(device, dtype)
    x, A, B, g = (t.requires_grad_(True) for t in (x, A, B, g))
    assert ids.dtype == torch.int64 and g.dtype == dtype

    def step():
        ops.molora_linear(x, W, None, A, B, ids, g, None, 1.5, backend="triton",
                          check_values=False).backward(gy)
    step()  # the ones vector is made once
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    names = {e.name for e in prof.events()}
    assert not names & {"aten::clamp", "aten::ones", "aten::fill_", "aten::_to_copy"}, names
    assert "aten::mm" in names  # the profile saw the call's ops


def test_kept_ones_are_shared_and_outlive_inference_mode():
    first = tb._ones(5, torch.device("cpu"))
    assert tb._ones(5, torch.device("cpu")) is first and torch.equal(first, torch.ones(5))
    with torch.inference_mode():
        made_inside = tb._ones(7, torch.device("cpu"))
    assert not made_inside.is_inference()  # usable by later calls outside inference mode


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_a_nan_token_spoils_only_its_own_dx_and_its_experts_dB(strategy, device):
    """Backward with one token's x NaN: the other tokens' dx and every gate gradient but its
    own stay finite, and dB only for the experts it routes to (both strategies, as the
    torch backend); dA: its experts' (grouped) or every expert's (dense: one GEMM over all
    tokens, 0 x NaN)."""
    x, A, B, ids, g, rs = make_inputs(20, 16, 12, 8, 4, 2, torch.float32, device)
    x[3, 5] = float("nan")
    delta, h = tb.delta_forward(x, A, B, ids, g, rs, 1.0, strategy=strategy)
    dx, dA, dB, dg, _ = tb.delta_backward(torch.randn_like(delta), x, A, B, ids, g, rs, h, 1.0,
                                          (True,) * 5, strategy=strategy)
    others = torch.arange(20, device=device) != 3
    assert torch.isfinite(dx[others]).all() and torch.isfinite(dg[others]).all()
    routed = torch.zeros(8, dtype=torch.bool, device=device)
    routed[ids[3]] = True
    finite = lambda t: torch.isfinite(t).flatten(1).all(1)  # noqa: E731
    assert torch.equal(finite(dB), ~routed)
    assert torch.equal(finite(dA), ~routed if strategy == "grouped" else torch.zeros_like(routed))



@pytest.mark.parametrize("E, R, rank_scale", [(5, 3, True), (8, 12, False), (2, 40, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dense_from_routes_equals_the_forward_routing_pass(E, R, rank_scale, dtype, device):
    """``dense_from_routes`` rebuilds ``route_dense``'s scaled dense buffer from the routed
    slices alone, bit for bit: a token routed twice to one expert (gates summed), a NaN
    slice routed with gate 0 only and one in an unrouted column (0 there), one in a routed
    column (NaN), ids out of range (clamped), T and E*R not multiples of the tile."""
    from datalora.kernels import shrink as sh

    T, k = 37, 3
    gen = torch.Generator().manual_seed(7)
    hd = torch.randn(T, E * R, generator=gen).to(device, dtype)
    ids = torch.randint(0, E, (T, k), generator=gen)
    ids[0] = torch.tensor([1, 1, 0]) % E          # the same expert twice
    ids[1, 2] = E + 3                              # clamped to E - 1
    ids[2] = torch.tensor([1, 0, 0])               # expert 1 routed with gate 0 only
    ids[3] = 0                                     # expert 1 unrouted: its NaN stays out
    ids = ids.to(device)
    gates = torch.rand(T, k, generator=gen).to(device)
    gates[2, 0] = 0.0
    hd[2, R] = float("nan")                        # a zero gate's NaN slice gives 0 too
    hd[3, R] = float("nan")
    hd[4, int(ids[4, 0].clamp(0, E - 1)) * R + R - 1] = float("nan")
    if rank_scale:
        rs, rs_stride = torch.rand(T, R, generator=gen).to(device), R
    else:
        rs, rs_stride = torch.ones(R, device=device), 0
    raw = torch.empty(T * k, R, dtype=dtype, device=device)
    want = torch.empty(T, E * R, dtype=dtype, device=device)
    sh.route_dense(hd, ids, gates, rs, rs_stride, raw, want, E, R, 0.75)
    got = torch.full((T, E * R), 123.0, dtype=dtype, device=device)
    sh.dense_from_routes(raw, ids, gates, rs, rs_stride, got, E, R, 0.75)
    assert torch.equal(got.isnan(), want.isnan()) and got.isnan().any()
    assert torch.equal(got.nan_to_num(), want.nan_to_num())


def test_dense_backward_runs_no_second_gemm_over_x(device, monkeypatch):
    """The dense strategy's dB takes the forward's scaled dense shrink rebuilt from the
    routed slices: the backward runs four GEMMs (dZ, dx, dA, dB), none recomputing x A^T."""
    from torch.profiler import ProfilerActivity, profile

    monkeypatch.setenv("DATALORA_SHRINK_STRATEGY", "dense")
    x, A, B, ids, g, rs = make_inputs(24, 16, 12, 4, 4, 2, torch.float32, device)
    x, A, B = (t.requires_grad_(True) for t in (x, A, B))
    delta = ops.molora_delta(x, A, B, ids, g, rs, 1.5, backend="triton", check_values=False)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        delta.backward(torch.randn_like(delta))
    gemms = [e.name for e in prof.events() if e.name in ("aten::mm", "aten::addmm_")]
    assert len(gemms) == 4, gemms


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_db_has_the_strides_of_b(strategy, device):
    """dB comes back with B's strides, contiguous or expert-minor (``datalora.ops.layout``),
    so autograd accumulates it into ``B.grad`` as it is; both layouts give the same values."""
    x, A, B, ids, g, rs = make_inputs(21, 16, 12, 4, 4, 2, torch.float32, device)
    minor = expert_minor(B)
    gy = torch.randn(21, 12).to(device)
    grads = {}
    for name, b in (("contiguous", B), ("expert_minor", minor)):
        delta, h = tb.delta_forward(x, A, b, ids, g, rs, 2.0, strategy=strategy)
        dB = tb.delta_backward(gy, x, A, b, ids, g, rs, h, 2.0,
                               (False, False, True, False, False), strategy=strategy)[2]
        assert dB.stride() == b.stride(), name
        leaf = b.detach().clone().requires_grad_(True)  # clone keeps the strides
        ops.molora_delta(x, A, leaf, ids, g, rs, 2.0, backend="triton").backward(gy)
        assert leaf.grad.stride() == b.stride() and torch.equal(leaf.grad, dB), name
        grads[name] = dB
    torch.testing.assert_close(grads["expert_minor"], grads["contiguous"])


def test_dense_strategy_copies_no_expert_minor_b(device, monkeypatch):
    """A contiguous B costs the dense strategy three copies per forward + backward (B_all
    in each, dB's transpose); an expert-minor B none of them (the calls are otherwise
    the same, the interpreter's own copies included)."""
    from torch.profiler import ProfilerActivity, profile

    monkeypatch.setenv("DATALORA_SHRINK_STRATEGY", "dense")
    x, A, B, ids, g, _ = make_inputs(24, 16, 12, 4, 4, 2, torch.float32, device)
    x, A = x.requires_grad_(True), A.requires_grad_(True)  # the backward needs B_all
    W = torch.randn(12, 16).to(device)
    minor = expert_minor(B)

    def copies(b):
        b = b.detach().clone().requires_grad_(True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            ops.molora_linear(x, W, None, A, b, ids, g, None, 1.5, backend="triton",
                              check_values=False).sum().backward()
        return sum(e.name == "aten::copy_" for e in prof.events())

    copies(B)  # warm up
    assert copies(B) - copies(minor) == 3


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_16bit_gates_read_as_they_are_match_fp32_gates_bitwise(strategy, device):
    """fp16 gates of fp16 x (the dense passes read them as they are, the grouped kernels
    from an fp32 copy) give the output and every gradient of the same gates given in fp32,
    bit for bit (the gate gradient compared in fp16)."""
    x, A, B, ids, g16, rs = make_inputs(29, 24, 20, 6, 8, 3, torch.float16, device)

    def run(gates):
        gates = gates.detach().clone().requires_grad_(True)
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, A, B, rs)]
        out = ops.molora_delta(leaves[0], leaves[1], leaves[2], ids, gates, leaves[3], 0.5,
                               backend="triton")
        out.backward(torch.linspace(-1, 1, out.numel()).view_as(out).to(out))
        # the gate gradient is summed in fp32 either way, then rounded to the gates' dtype
        return [out.detach(), gates.grad.half(), *(t.grad for t in leaves)]

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DATALORA_SHRINK_STRATEGY", strategy)
        native, widened = run(g16), run(g16.float())
    for a, b in zip(native, widened, strict=True):
        assert torch.equal(a, b)
