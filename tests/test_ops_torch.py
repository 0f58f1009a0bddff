"""torch backend of ``molora_delta`` / ``molora_linear`` vs the plain reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from datalora import ops
from datalora.ops import cpu_costs, torch_backend
from datalora.ops.eager import RoutingCache, eager_call, trust_routing
from datalora.reference import molora_delta_reference, molora_linear_reference


def make_inputs(T, d_in=24, d_out=20, E=6, r=4, k=2, dtype=torch.float32, rank_scale=True,
                skew=False, requires_grad=False):
    x = torch.randn(T, d_in, dtype=dtype)
    A = torch.randn(E, r, d_in, dtype=dtype) / d_in**0.5
    B = torch.randn(E, d_out, r, dtype=dtype) / r**0.5
    if skew:  # every token's first route goes to expert 0; experts > k are empty
        ids = torch.stack([torch.arange(k) for _ in range(T)]) if T else torch.empty(0, k)
    else:
        ids = torch.rand(T, E).argsort(-1)[:, :k]
    ids = ids.long()
    gates = torch.rand(T, k, dtype=dtype)
    rs = torch.rand(T, r, dtype=dtype) if rank_scale else None
    tensors = [x, A, B, gates] + ([rs] if rank_scale else [])
    for t in tensors:
        t.requires_grad_(requires_grad)
    return x, A, B, ids, gates, rs


TOLERANCES = [  # (dtype, atol, rtol)
    (torch.float64, 1e-12, 1e-10),
    (torch.float32, 1e-5, 1e-5),
    (torch.bfloat16, None, None),  # calibrated against fp32 below
]


@pytest.fixture(params=["dense", "grouped"])
def strategy(request, monkeypatch):
    """Runs a test under each CPU strategy of the torch backend (fp32 / fp64; 16-bit
    inputs always take the dense one)."""
    monkeypatch.setenv("DATALORA_SHRINK_STRATEGY", request.param)
    return request.param


@pytest.mark.parametrize("T", [0, 1, 37, 256])  # empty, single token, odd, larger
@pytest.mark.parametrize("k", [1, 2, 6])  # multi-tenant, top-2, dense k = E
@pytest.mark.parametrize("rank_scale", [False, True])
@pytest.mark.parametrize("dtype,atol,rtol", TOLERANCES)
def test_delta_matches_reference(T, k, rank_scale, dtype, atol, rtol, strategy):
    x, A, B, ids, gates, rs = make_inputs(T, k=k, dtype=dtype, rank_scale=rank_scale)
    out = ops.molora_delta(x, A, B, ids, gates, rs, scaling=2.0, backend="torch")
    assert out.shape == (T, B.shape[1]) and out.dtype == dtype
    if T == 0:
        return
    if dtype == torch.bfloat16:
        # the kernel's error vs fp32 must be at most 2x the reference's own bf16 error (+ eps)
        exact = molora_delta_reference(*(t.double() if t is not None and t.is_floating_point()
                                         else t for t in (x, A, B, ids, gates, rs)), 2.0)
        ref_err = (molora_delta_reference(x, A, B, ids, gates, rs, 2.0).double() - exact).abs()
        err = (out.double() - exact).abs()
        assert err.max() <= 2 * ref_err.max() + 1e-2
    else:
        ref = molora_delta_reference(x, A, B, ids, gates, rs, 2.0)
        torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)


def test_hand_computed_case():
    # one token, two rank-1 experts: delta = s * sum_j g_j * b_j * (a_j.x) * rs
    x = torch.tensor([[1.0, 2.0]])
    A = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # a0.x = 1, a1.x = 2
    B = torch.tensor([[[3.0]], [[5.0]]])
    ids = torch.tensor([[0, 1]])
    gates = torch.tensor([[0.25, 0.5]])
    rs = torch.tensor([[0.5]])
    expected = 2.0 * (0.25 * 3 * 1 * 0.5 + 0.5 * 5 * 2 * 0.5)
    for fn in (ops.molora_delta, molora_delta_reference):
        assert fn(x, A, B, ids, gates, rs, scaling=2.0).item() == pytest.approx(expected)


@pytest.mark.parametrize("T,k,skew", [(1, 1, False), (37, 2, False), (37, 3, True), (16, 6, False)])
def test_gradients_match_reference_autograd(T, k, skew, strategy):
    inputs = make_inputs(T, k=k, dtype=torch.float64, skew=skew, requires_grad=True)
    x, A, B, ids, gates, rs = inputs
    grad = torch.randn(T, B.shape[1], dtype=torch.float64)
    leaves = (x, A, B, gates, rs)
    out = ops.molora_delta(x, A, B, ids, gates, rs, scaling=0.5, backend="torch")
    got = torch.autograd.grad(out, leaves, grad)
    ref = molora_delta_reference(x, A, B, ids, gates, rs, 0.5)
    want = torch.autograd.grad(ref, leaves, grad)
    for name, g, w in zip(("x", "A", "B", "gates", "rank_scale"), got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10, msg=f"grad of {name}")


def test_gradcheck_fp64(strategy):
    x, A, B, ids, gates, rs = make_inputs(7, d_in=5, d_out=4, E=3, r=2, k=2,
                                          dtype=torch.float64, requires_grad=True)
    fn = lambda x, A, B, g, rs: ops.molora_delta(x, A, B, ids, g, rs, 1.5, backend="torch")
    assert torch.autograd.gradcheck(fn, (x, A, B, gates, rs))
    ref = lambda x, A, B, g, rs: molora_delta_reference(x, A, B, ids, g, rs, 1.5)
    assert torch.autograd.gradcheck(ref, (x, A, B, gates, rs))


def test_repeated_expert_in_a_row(strategy):
    # a token routed twice to the same expert adds both contributions
    x, A, B, _, gates, rs = make_inputs(5, k=2, dtype=torch.float64, requires_grad=True)
    ids = torch.zeros(5, 2, dtype=torch.long)
    out = ops.molora_delta(x, A, B, ids, gates, rs)
    torch.testing.assert_close(out, molora_delta_reference(x, A, B, ids, gates, rs))
    g_out = torch.autograd.grad(out.sum(), (A, B, gates))
    g_ref = torch.autograd.grad(molora_delta_reference(x, A, B, ids, gates, rs).sum(),
                                (A, B, gates))
    for a, b in zip(g_out, g_ref, strict=True):
        torch.testing.assert_close(a, b)


def test_non_contiguous_and_batched_input(strategy):
    x, A, B, ids, gates, rs = make_inputs(24, dtype=torch.float64)
    x_nc = torch.randn(24, 2 * x.shape[1], dtype=torch.float64)[:, ::2]  # strided view
    assert not x_nc.is_contiguous()
    out = ops.molora_delta(x_nc, A, B, ids, gates, rs)
    torch.testing.assert_close(out, molora_delta_reference(x_nc.contiguous(), A, B, ids,
                                                           gates, rs))
    # leading batch dims: [2, 12, d] with routing [2, 12, k] or [24, k]
    xb = x.view(2, 12, -1)
    for ids_, g_, rs_ in ((ids, gates, rs), (ids.view(2, 12, -1), gates.view(2, 12, -1),
                                             rs.view(2, 12, -1))):
        outb = ops.molora_delta(xb, A, B, ids_, g_, rs_)
        assert outb.shape == (2, 12, B.shape[1])
        torch.testing.assert_close(outb.reshape(24, -1),
                                   molora_delta_reference(x, A, B, ids, gates, rs))


def test_int32_ids(strategy):
    x, A, B, ids, gates, rs = make_inputs(9)
    torch.testing.assert_close(ops.molora_delta(x, A, B, ids.int(), gates, rs),
                               molora_delta_reference(x, A, B, ids, gates, rs))


@pytest.mark.parametrize("bias", [False, True])
def test_molora_linear(bias, strategy):
    x, A, B, ids, gates, rs = make_inputs(13, dtype=torch.float64, requires_grad=True)
    W = torch.randn(B.shape[1], x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.randn(B.shape[1], dtype=torch.float64, requires_grad=True) if bias else None
    y = ops.molora_linear(x, W, b, A, B, ids, gates, rs, 2.0, backend="torch")
    ref = molora_linear_reference(x, W, b, A, B, ids, gates, rs, 2.0)
    torch.testing.assert_close(y, ref)
    leaves = [t for t in (x, W, b, A, B, gates, rs) if t is not None]
    for g, w in zip(torch.autograd.grad(y.sum(), leaves), torch.autograd.grad(ref.sum(), leaves),
                    strict=True):
        torch.testing.assert_close(g, w)
    assert y.shape == F.linear(x, W, b).shape


@pytest.mark.parametrize("env", [False, True])  # check_values=False, DATALORA_CHECK_VALUES=0
@pytest.mark.parametrize("op", ["delta", "linear"])
def test_unchecked_out_of_range_ids_are_clamped(env, op, monkeypatch, strategy):
    # as the triton / CUDA kernels (and the README) promise: ids E and -1 act as E-1 and 0
    x, A, B, ids, gates, rs = make_inputs(7, dtype=torch.float64, requires_grad=True)
    E = A.shape[0]
    bad = ids.clone()
    bad[0, 0], bad[1, 1], bad[2, 0] = E, -1, E + 5
    W = torch.randn(B.shape[1], x.shape[1], dtype=torch.float64)

    def run(expert_ids, check_values):
        if op == "delta":
            return ops.molora_delta(x, A, B, expert_ids, gates, rs, 2.0, backend="torch",
                                    check_values=check_values)
        return ops.molora_linear(x, W, None, A, B, expert_ids, gates, rs, 2.0, backend="torch",
                                 check_values=check_values)

    if env:
        monkeypatch.setenv("DATALORA_CHECK_VALUES", "0")
    y = run(bad, check_values=env)
    want = run(bad.clamp(0, E - 1), check_values=True)
    torch.testing.assert_close(y, want, rtol=0, atol=0)
    leaves = (x, A, B, gates, rs)
    for g, w in zip(torch.autograd.grad(y.sum(), leaves), torch.autograd.grad(want.sum(), leaves),
                    strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("op", ["delta", "linear"])
def test_ops_on_meta(op):
    # shape inference: no autocast on meta, no value check (no values to read)
    with torch.device("meta"):
        x, A, B, ids, gates, rs = make_inputs(7, requires_grad=True)
        W = torch.randn(B.shape[1], x.shape[1])
    y = (ops.molora_delta(x, A, B, ids, gates, rs) if op == "delta"
         else ops.molora_linear(x, W, None, A, B, ids, gates, rs))
    assert y.is_meta and y.shape == (7, B.shape[1])
    y.sum().backward()
    assert A.grad.is_meta and A.grad.shape == A.shape


def test_nan_in_one_token_does_not_leak(strategy):
    x, A, B, ids, gates, rs = make_inputs(8, dtype=torch.float32)
    x[3] = float("nan")
    out = ops.molora_delta(x, A, B, ids, gates, rs)
    assert torch.isnan(out[3]).all()
    assert torch.isfinite(torch.cat([out[:3], out[4:]])).all()


def test_opcheck():
    x, A, B, ids, gates, rs = make_inputs(11, dtype=torch.float64, requires_grad=True)
    for args in ((x, A, B, ids, gates, rs, 2.0, "torch"), (x, A, B, ids, gates, None, 1.0,
                                                          "torch")):
        torch.library.opcheck(torch.ops.datalora.molora_delta.default, args)
    W, b = torch.randn(B.shape[1], x.shape[1], dtype=x.dtype, requires_grad=True), None
    for bias in (b, torch.randn(B.shape[1], dtype=x.dtype, requires_grad=True)):
        torch.library.opcheck(torch.ops.datalora.molora_linear.default,
                              (x, W, bias, A, B, ids, gates, rs, 2.0, "torch"))


def _values_and_grads(fn, inputs):
    out = fn(*inputs)
    out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out))
    grads = [t.grad.clone() for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    for t in inputs:
        if isinstance(t, torch.Tensor):
            t.grad = None
    return [out.detach(), *grads]


@pytest.mark.parametrize("op", ["delta", "linear"])
def test_eager_function_equals_custom_op_bitwise(op, monkeypatch):
    """Eager mode skips the custom-op dispatcher (an autograd.Function runs the same backend
    code); forced through the registered ops, values and every gradient are bit-identical."""
    x, A, B, ids, gates, rs = make_inputs(37, requires_grad=True)
    if op == "delta":
        inputs = (x, A, B, ids, gates, rs, 2.0, "torch")
        fn = ops.molora_delta
    else:
        W = torch.randn(B.shape[1], x.shape[1], requires_grad=True)
        bias = torch.randn(B.shape[1], requires_grad=True)
        inputs = (x, W, bias, A, B, ids, gates, rs, 2.0, "torch")
        fn = ops.molora_linear
    from datalora.ops import molora

    called = []
    for name in ("_molora_delta_op", "_molora_linear_op", "_molora_delta_backward_op"):
        real = getattr(molora, name)
        monkeypatch.setattr(molora, name, lambda *a, _r=real, _n=name: called.append(_n) or _r(*a))
    eager = _values_and_grads(fn, inputs)
    assert called == []  # plain eager tensors: no custom-op dispatch, forward or backward
    monkeypatch.setattr(molora, "tracing", lambda *tensors: True)
    dispatched = _values_and_grads(fn, inputs)
    assert len(called) == 2  # forward op and backward op
    assert len(eager) == len(dispatched) == (6 if op == "delta" else 8)
    for a, b in zip(eager, dispatched, strict=True):
        assert torch.equal(a, b)


def test_custom_op_used_under_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from datalora.ops import molora

    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.randn(5, 24))
        assert molora.tracing(x)
        out = ops.molora_delta(x, *[mode.from_tensor(t) for t in make_inputs(5)[1:3]],
                               torch.zeros(5, 2, dtype=torch.long), torch.ones(5, 2),
                               check_values=False)
    assert out.shape == (5, 20)
    assert not molora.tracing(torch.randn(2), torch.nn.Parameter(torch.randn(2)))


def test_backend_env_override(monkeypatch):
    monkeypatch.setenv("DATALORA_BACKEND", "torch")
    assert ops.resolve_backend("auto", torch.device("cpu")) == "torch"
    monkeypatch.setenv("DATALORA_BACKEND", " TORCH ")  # any case, as DATALORA_CHECK_VALUES
    assert ops.resolve_backend("auto", torch.device("cpu")) == "torch"
    monkeypatch.setenv("DATALORA_BACKEND", "bogus")
    with pytest.raises(ValueError, match=r"DATALORA_BACKEND \(environment\): expected one"):
        ops.resolve_backend("auto", torch.device("cpu"))
    monkeypatch.setenv("DATALORA_BACKEND", "cuda")  # cannot run on the CPU: says who chose it
    with pytest.raises(ops.BackendUnavailableError, match=r"chosen by DATALORA_BACKEND"):
        ops.resolve_backend("auto", torch.device("cpu"))
    with pytest.raises(ops.BackendUnavailableError) as exc:  # an explicit backend: no mention
        ops.resolve_backend("cuda", torch.device("cpu"))
    assert "DATALORA_BACKEND" not in str(exc.value)
    monkeypatch.delenv("DATALORA_BACKEND")
    assert ops.resolve_backend("auto", torch.device("cpu")) == "torch"
    assert "torch" in ops.available_backends("cpu")
    # a device name, as available_backends takes (was AttributeError: 'str' ... 'type')
    assert ops.resolve_backend("auto", "cpu") == "torch"
    with pytest.raises(ops.BackendUnavailableError, match="NF4"):
        ops.resolve_backend("cuda", "cpu")


def test_triton_without_gpu_or_interpreter_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ops.BackendUnavailableError, match="CUDA"):
        ops.resolve_backend("triton", torch.device("cpu"))


@pytest.mark.parametrize("capability, name", [((7, 5), "Tesla T4"), ((7, 0), "Tesla V100")])
def test_triton_refuses_gpus_older_than_ampere_and_auto_falls_back(monkeypatch, capability,
                                                                     name):
    pytest.importorskip("triton")
    from datalora.ops import backends

    gpu = {"capability": capability}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: gpu["capability"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: name)
    monkeypatch.delenv("DATALORA_BACKEND", raising=False)
    backends._warn_once.cache_clear()
    cuda = torch.device("cuda")
    sm = f"sm_{capability[0]}{capability[1]}"
    with pytest.raises(ops.BackendUnavailableError,
                       match=rf"compute capability >= 8\.0 .*; {name} is {sm}"):
        ops.resolve_backend("triton", cuda)
    with pytest.warns(RuntimeWarning, match=rf"falling back to the slower torch backend: "
                                            rf".*{sm}.*DATALORA_BACKEND=torch"):
        assert ops.resolve_backend("auto", cuda) == "torch"
    assert ops.available_backends(cuda) == ["torch"]
    gpu["capability"] = (8, 0)
    assert ops.resolve_backend("auto", cuda) == "triton"
    backends._warn_once.cache_clear()


def _count_gate_matrix_builds(monkeypatch, strategy="dense"):
    """Counts builds of the torch backend's per-routing table of ``strategy``: the dense
    gate matrix or the grouped strategy's expert sort."""

    calls = []
    if strategy == "dense":
        real = torch_backend._gate_matrix
        monkeypatch.setattr(torch_backend, "_gate_matrix",
                            lambda *a: calls.append(1) or real(*a))
    else:
        real_init = torch_backend.ExpertGroups.__init__
        monkeypatch.setattr(torch_backend.ExpertGroups, "__init__",
                            lambda self, *a: calls.append(1) or real_init(self, *a))
    monkeypatch.setattr(torch_backend, "_tables_cache", RoutingCache())
    return calls


def test_a_routing_you_build_shares_its_tables_once_asked_and_else_says_so(monkeypatch):
    """A Routing built by the user rebuilt its gate matrix in each of the layers sharing it,
    silently and with no public way to opt in: ``cache_tables()`` is that way; without it
    a second layer warns once (one layer called twice does not)."""
    import warnings

    from datalora import MoLoRALinear, Routing
    from datalora.ops.backends import _warn_once

    calls = _count_gate_matrix_builds(monkeypatch)
    _warn_once.cache_clear()
    layers = [MoLoRALinear(torch.nn.Linear(16, 16), num_experts=4, rank=2, router=False)
              for _ in range(4)]
    x = torch.randn(5, 16)
    ids, gates = torch.randint(0, 4, (5, 2)), torch.full((5, 2), 0.5)
    mine = Routing(expert_ids=ids, gates=gates)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layers[0](x, routing=mine)
        layers[0](x, routing=mine)  # the same layer again: no warning
    with pytest.warns(RuntimeWarning, match=r"reached a second MoLoRA layer.*cache_tables\(\)"):
        for layer in layers[1:]:
            layer(x, routing=mine)
    assert len(calls) == 5  # one per call
    calls.clear()
    shared = Routing(expert_ids=ids.clone(), gates=gates.clone()).cache_tables()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        outs = [layer(x, routing=shared) for layer in layers]
    assert len(calls) == 1
    assert all(torch.equal(a, layer(x, routing=Routing(expert_ids=ids, gates=gates)))
               for a, layer in zip(outs, layers, strict=True))


def _routed_inputs(T=19, k=2, dtype=torch.float64):
    """Inputs whose routing is computed (not leaves) and marked as datalora's own, as its
    routers' outputs are."""
    x, A, B, ids, gates, rs = make_inputs(T, k=k, dtype=dtype, requires_grad=True)
    gates, rs = gates * 1, rs * 1
    trust_routing(ids, gates, rs)
    return x, A, B, ids, gates, rs


def _delta_and_grads(x, A, B, ids, gates, rs, leaves):
    out = ops.molora_delta(x, A, B, ids, gates, rs, 2.0, backend="torch")
    return [out.detach(), *torch.autograd.grad(out.square().sum(), leaves)]


def test_routing_tables_cached_for_the_same_tensors(monkeypatch):
    calls = _count_gate_matrix_builds(monkeypatch)
    x, A, B, ids, gates, rs = _routed_inputs()
    first = _delta_and_grads(x, A, B, ids, gates, rs, (x, A, B, gates, rs))
    again = _delta_and_grads(x, A, B, ids, gates, rs, (x, A, B, gates, rs))
    assert len(calls) == 1  # two forwards and two backwards, one build
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("change", ["gates_in_place", "rank_scale_in_place", "ids_in_place",
                                    "new_gates", "scaling"])
def test_routing_tables_rebuilt_after_a_change(change, monkeypatch):
    calls = _count_gate_matrix_builds(monkeypatch)
    x, A, B, ids, gates, rs = _routed_inputs()
    scaling = 2.0
    ops.molora_delta(x, A, B, ids, gates, rs, scaling, backend="torch")
    with torch.no_grad():
        if change == "gates_in_place":
            gates.mul_(0.5)
        elif change == "rank_scale_in_place":
            rs[0].zero_()
        elif change == "ids_in_place":
            ids.copy_(ids.flip(1))
        elif change == "new_gates":
            gates = gates.flip(1).clone()
            trust_routing(gates)
        else:
            scaling = 0.5
    out = ops.molora_delta(x, A, B, ids, gates, rs, scaling, backend="torch")
    assert len(calls) == 2
    torch.testing.assert_close(out, molora_delta_reference(x, A, B, ids, gates, rs, scaling))


def test_layers_casting_one_shared_routing_share_its_tables(monkeypatch):
    """bf16 layers with fp32 adapters each cast the shared fp32 gates to bf16: every cast
    is a new tensor, so the tables were rebuilt in every layer (forward and backward). The
    casts now key the cache by their source; results are bit-identical to no caching."""
    from datalora.layers import MoLoRALinear
    from datalora.ops import eager
    from datalora.routing import topk_routing

    def run():
        torch.manual_seed(0)
        layers = [MoLoRALinear(torch.nn.Linear(16, 16).bfloat16(), num_experts=4, rank=2,
                               top_k=2, router=False, dtype=torch.float32, backend="torch")
                  for _ in range(3)]
        for layer in layers:
            torch.nn.init.normal_(layer.lora_B)
        logits = torch.randn(10, 4, requires_grad=True)
        routing = topk_routing(logits * 1, 2, _trusted=True)
        x = torch.randn(10, 16).bfloat16().requires_grad_()
        h = x
        for layer in layers:
            h = layer(h, routing)
        h.float().square().sum().backward()
        return [h.detach(), x.grad, logits.grad, *(p.grad for l in layers
                                                    for p in (l.lora_A, l.lora_B))]

    calls = _count_gate_matrix_builds(monkeypatch)
    cached = run()
    assert len(calls) == 1  # three layers, forward and backward: one build
    monkeypatch.setattr(eager, "_is_trusted", lambda t: False)  # no caching at all
    calls.clear()
    plain = run()
    assert len(calls) == 6
    for a, b in zip(cached, plain, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_routing_tables_keyed_by_dtype(dtype, monkeypatch):
    calls = _count_gate_matrix_builds(monkeypatch)
    x, A, B, ids, gates, rs = _routed_inputs()
    ops.molora_delta(x.to(dtype), A.to(dtype), B.to(dtype), ids, gates, rs, backend="torch")
    ops.molora_delta(x, A, B, ids, gates, rs, backend="torch")
    assert len(calls) == (1 if dtype == torch.float64 else 2)


def test_routing_tables_not_cached_for_leaves_inference_tensors_or_compiled_calls(monkeypatch):
    """Only calls from eager Python cache. Leaves that require grad may change through
    ``.data`` (as gradcheck does), which bumps no version; inference tensors have no version
    counter; the registered custom op (what a compiled graph runs) may be handed buffers
    Inductor reuses for new values without a version bump."""
    calls = _count_gate_matrix_builds(monkeypatch)
    x, A, B, ids, gates, rs = make_inputs(9, dtype=torch.float64, requires_grad=True)
    trust_routing(ids, gates, rs)  # trusted, as Routing.cache_tables() marks them: only the
    # leaf rule keeps them uncached (untrusted tensors are never cached)
    ops.molora_delta(x, A, B, ids, gates, rs, backend="torch")
    gates.data.mul_(0.5)
    out = ops.molora_delta(x, A, B, ids, gates, rs, backend="torch")
    torch.testing.assert_close(out, molora_delta_reference(x, A, B, ids, gates, rs))
    assert len(calls) == 2
    with torch.inference_mode():
        x, A, B, ids, gates, rs = make_inputs(9, dtype=torch.float64)
        for _ in range(2):
            out = ops.molora_delta(x, A, B, ids, gates, rs, backend="torch")
        torch.testing.assert_close(out, molora_delta_reference(x, A, B, ids, gates, rs))
    assert len(calls) == 4
    x, A, B, ids, gates, rs = make_inputs(9, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(2):
            torch.ops.datalora.molora_delta(x, A, B, ids, gates, rs, 1.0, "torch")
    assert len(calls) == 6


def test_routing_tables_cached_for_inference_calls(monkeypatch):
    """Without autograd (generation) the eager path skips the autograd node and still builds
    a shared routing's tables once; an in-place change of the routing is still seen."""
    calls = _count_gate_matrix_builds(monkeypatch)
    x, A, B, ids, gates, rs = make_inputs(9, dtype=torch.float64)
    trust_routing(ids, gates, rs)
    with torch.no_grad():
        first = ops.molora_delta(x, A, B, ids, gates, rs, 2.0, backend="torch")
        again = ops.molora_delta(x, A, B, ids, gates, rs, 2.0, backend="torch")
        assert len(calls) == 1 and torch.equal(first, again) and first.grad_fn is None
        gates.mul_(0.5)
        changed = ops.molora_delta(x, A, B, ids, gates, rs, 2.0, backend="torch")
    assert len(calls) == 2
    torch.testing.assert_close(changed, molora_delta_reference(x, A, B, ids, gates, rs, 2.0))


def test_inference_path_equals_the_autograd_path(strategy):
    """The no-autograd call gives the same bits as the autograd Function's forward."""
    x, A, B, ids, gates, rs = make_inputs(13, dtype=torch.float32, requires_grad=True)
    W = torch.randn(B.shape[1], x.shape[1])
    with_grad = ops.molora_linear(x, W, None, A, B, ids, gates, rs, 2.0, backend="torch")
    with torch.no_grad():
        without = ops.molora_linear(x, W, None, A, B, ids, gates, rs, 2.0, backend="torch")
    assert with_grad.grad_fn is not None and without.grad_fn is None
    assert torch.equal(with_grad.detach(), without)
    frozen = [t.detach() for t in (x, A, B)]  # grad mode on, nothing requires grad
    plain = ops.molora_delta(*frozen, ids, gates.detach(), rs.detach(), 2.0, backend="torch")
    assert plain.grad_fn is None


def test_forward_without_h_skips_it_and_gives_the_same_output(strategy):
    """``need_h=False`` (the no-autograd call) skips gathering the per-route ``h`` the
    backward needs; the output bits do not change."""
    x, A, B, ids, gates, rs = make_inputs(13, dtype=torch.float32)
    W = torch.randn(B.shape[1], x.shape[1])
    y, h = torch_backend.linear_forward(x, W, None, A, B, ids, gates, rs, 2.0)
    y_fast, h_fast = torch_backend.linear_forward(x, W, None, A, B, ids, gates, rs, 2.0,
                                                  need_h=False)
    d, _ = torch_backend.delta_forward(x, A, B, ids, gates, rs, 2.0)
    d_fast, hd_fast = torch_backend.delta_forward(x, A, B, ids, gates, rs, 2.0, need_h=False)
    assert h.shape == (13, ids.shape[1], A.shape[1]) and h_fast is None and hd_fast is None
    assert torch.equal(y, y_fast) and torch.equal(d, d_fast)


@pytest.mark.parametrize("rank_scale", [False, True])
def test_shared_routing_equals_separate_copies(rank_scale, monkeypatch, strategy):
    """Two layers on one Routing (tables built once, reused by the second layer and both
    backwards) give the values and gradients of two layers on separate copies."""
    from datalora.layers import MoLoRALinear
    from datalora.routing import Routing

    calls = _count_gate_matrix_builds(monkeypatch, strategy)
    torch.manual_seed(0)
    layers = [MoLoRALinear(torch.nn.Linear(24, 24, dtype=torch.float64), num_experts=6, rank=4,
                           top_k=2, router=False, backend="torch") for _ in range(2)]
    for layer in layers:
        torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 9, 24, dtype=torch.float64)
    logits = torch.randn(18, 6, dtype=torch.float64, requires_grad=True)
    rs_logits = torch.randn(18, 4, dtype=torch.float64, requires_grad=True)
    ids = torch.rand(18, 6).argsort(-1)[:, :2]
    ids[0] = 3  # one token routed twice to the same expert

    def run(copies):
        gates = logits.softmax(-1).gather(1, ids)
        rs = rs_logits.sigmoid() if rank_scale else None
        shared = Routing(ids, gates, rs, _trusted=True)  # as the saliency network's
        out = x
        for layer in layers:
            routing = (Routing(ids.clone(), gates.clone(), None if rs is None else rs.clone(),
                               _trusted=True) if copies else shared)
            out = layer(out, routing)
        leaves = [logits, *(p for layer in layers for p in (layer.lora_A, layer.lora_B))]
        leaves += [rs_logits] if rank_scale else []
        return [out.detach(), *torch.autograd.grad(out.square().sum(), leaves)]

    shared = run(copies=False)
    assert len(calls) == 1
    separate = run(copies=True)
    # two routings kept: both forwards build, both backwards hit
    assert len(calls) == 1 + 2
    for a, b in zip(shared, separate, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_tables_of_a_callers_routing_are_rebuilt_every_call(monkeypatch):
    """Routing tensors the caller built may change without a version bump (a numpy view
    written, a ``.data`` write): their tables are never cached, so every call sees the
    current values."""
    np = pytest.importorskip("numpy")
    calls = _count_gate_matrix_builds(monkeypatch)
    x, A, B, ids, _, rs = make_inputs(9, dtype=torch.float64)
    g_np = np.random.default_rng(0).random((9, ids.shape[1]))
    gates = torch.from_numpy(g_np)
    with torch.no_grad():
        ops.molora_delta(x, A, B, ids, gates, rs, 2.0, backend="torch")
        g_np[:] = 0.25  # no version bump
        out = ops.molora_delta(x, A, B, ids, gates, rs, 2.0, backend="torch")
    assert len(calls) == 2
    torch.testing.assert_close(out, molora_delta_reference(x, A, B, ids, gates, rs, 2.0))


def test_cached_tables_die_with_their_routing(monkeypatch):
    """The routing caches hold tables only while the routing tensors live: a deleted
    model's tables are not kept until the next call (torch tables, triton expert sort)."""
    import gc

    from datalora.ops import triton_backend

    _count_gate_matrix_builds(monkeypatch)
    monkeypatch.setattr(triton_backend, "_perm_cache", RoutingCache())
    x, A, B, ids, gates, rs = _routed_inputs()
    with eager_call():
        torch_backend.routing_tables(ids, gates, rs, 6, 4, 1.0, x.dtype)
        triton_backend.permutation(ids, 6)
    assert len(torch_backend._tables_cache) == len(triton_backend._perm_cache) == 1
    del ids, gates, rs
    gc.collect()
    assert len(torch_backend._tables_cache) == len(triton_backend._perm_cache) == 0


def test_routing_cache_keeps_the_two_latest_routings():
    """A pruned step alternates two routings (full, packed, packed, full): both stay cached;
    a third evicts the least recently used."""
    first, second, third = (torch.arange(4.0) + i for i in range(3))
    cache = RoutingCache()
    cache.put((first,), ("k",), "first")
    cache.put((second,), ("k",), "second")
    assert cache.get((first,), ("k",)) == "first"  # now the most recently used
    assert cache.get((second,), ("k",)) == "second"
    assert cache.get((first,), ("other key",)) is None
    assert cache.get((first,), ("k",)) == "first"
    cache.put((third,), ("k",), "third")  # evicts second, the least recently used
    assert len(cache) == 2
    assert cache.get((second,), ("k",)) is None
    assert (cache.get((first,), ("k",)), cache.get((third,), ("k",))) == ("first", "third")
    first.add_(1)  # a version bump: no longer the cached state
    assert cache.get((first,), ("k",)) is None


def test_routing_cache_lookup_survives_an_entry_freed_during_it(monkeypatch):
    """A routing freed while get() scans the entries (cyclic GC inside the lookup, another
    thread) drops its entry through a weakref callback: get() moved the hit with an index
    into the list that callback had just replaced (IndexError)."""
    import gc

    from datalora.ops.eager import TensorsState

    held = {"a": torch.arange(3.0), "b": torch.arange(4.0)}
    cache = RoutingCache()
    cache.put((held["a"],), ("k",), "A")
    cache.put((held["b"],), ("k",), "B")  # order A, B: the scan checks A first
    same = TensorsState.same

    def freeing(self, *tensors):
        if "a" in held:
            del held["a"]
            gc.collect()  # A's entry is dropped now, in the middle of the scan
        return same(self, *tensors)

    monkeypatch.setattr(TensorsState, "same", freeing)
    assert cache.get((held["b"],), ("k",)) == "B"
    assert len(cache) == 1


# ---- randomized review findings ------------------------------------------------------------
def test_fp16_large_gates_and_gate_gradients_stay_finite():
    """In fp16 a gate times scaling beyond 65504 overflowed the gate matrix (NaN / inf
    output), and dz * h per route overflowed before the fp32 gate gradient's sum."""
    torch.manual_seed(0)
    x, A, B, ids, _, _ = make_inputs(8, dtype=torch.float16, rank_scale=False)
    x = x * 1e-3  # h ~ 1e-3: G = 2e5 overflows fp16, H * G ~ 200 does not
    gates = torch.full((8, 2), 1e5, requires_grad=True)  # fp32 gates, fp16 weights
    delta = ops.molora_delta(x, A, B, ids, gates, None, 2.0, backend="torch")
    want = molora_delta_reference(x.double(), A.double(), B.double(), ids, gates.double(),
                                  None, 2.0)
    assert torch.isfinite(delta).all()
    torch.testing.assert_close(delta.detach().double(), want.detach(), rtol=2e-3,
                               atol=2e-3 * want.abs().max().item())
    xs, As, Bs, ids, g, _ = make_inputs(8, dtype=torch.float16, rank_scale=False)
    As, Bs = (As * 60).requires_grad_(), Bs * 60  # dz * h ~ 1e5 per route
    g = torch.rand(8, 2).requires_grad_()
    grad_out = torch.full((8, 20), 30.0, dtype=torch.float16)
    (dg,) = torch.autograd.grad(ops.molora_delta(xs, As, Bs, ids, g, None, 2.0,
                                                 backend="torch"), g, grad_out)
    gd = g.detach().double().requires_grad_()
    (want_dg,) = torch.autograd.grad(molora_delta_reference(
        xs.double(), As.detach().double(), Bs.double(), ids, gd, None, 2.0), gd,
        grad_out.double())
    assert want_dg.abs().max() > 65504 and torch.isfinite(dg).all()
    torch.testing.assert_close(dg.double(), want_dg, rtol=1e-2,
                               atol=1e-2 * want_dg.abs().max().item())


@pytest.mark.parametrize("scaling, match", [
    (float("nan"), "scaling"), ("abc", "scaling"), (None, "scaling"),
    (torch.tensor(2.0, requires_grad=True), "scaling")])
def test_scaling_is_validated(scaling, match):
    x, A, B, ids, gates, rs = make_inputs(4)
    with pytest.raises(ValueError, match=match):
        ops.molora_delta(x, A, B, ids, gates, rs, scaling)
    with pytest.raises(ValueError, match=match):
        ops.molora_linear(x, torch.randn(20, 24), None, A, B, ids, gates, rs, scaling)


def test_routing_with_other_leading_dims_than_x_and_list_rank_scale_are_refused():
    x, A, B, ids, gates, rs = make_inputs(6)
    with pytest.raises(ValueError, match=r"expert_ids: expected leading dims \(2, 3\)"):
        ops.molora_delta(x.view(2, 3, 24), A, B, ids.view(3, 2, 2), gates.view(3, 2, 2))
    with pytest.raises(TypeError, match="rank_scale"):
        ops.molora_delta(x, A, B, ids, gates, rs.tolist())
    got = ops.molora_delta(x.view(2, 3, 24), A, B, ids.view(2, 3, 2), gates.view(2, 3, 2))
    torch.testing.assert_close(got.view(6, 20), ops.molora_delta(x, A, B, ids, gates))


@pytest.mark.parametrize("d_in, d_out", [(0, 5), (6, 0)])
def test_zero_width_features(d_in, d_out, strategy):
    x, A, B, ids, gates, rs = make_inputs(3, d_in=d_in, d_out=d_out, requires_grad=True)
    delta = ops.molora_delta(x, A, B, ids, gates, rs, backend="torch")
    assert delta.shape == (3, d_out) and not delta.any()
    W = torch.randn(d_out, d_in)
    y = ops.molora_linear(x, W, None, A, B, ids, gates, rs, backend="torch")
    assert y.shape == (3, d_out)
    y.sum().backward()
    assert x.grad.shape == (3, d_in)


def test_topk_routing_handed_to_the_caller_is_not_cached_past_a_data_write():
    """The public topk_routing's tensors may be written through ``.data`` (no version
    bump): their tables are rebuilt per call, so the write is seen."""
    from datalora.routing import topk_routing

    x, A, B, _, _, _ = make_inputs(8, rank_scale=False)
    routing = topk_routing(torch.randn(8, 6), 2)
    first = ops.molora_delta(x, A, B, routing.expert_ids, routing.gates)
    routing.gates.data.mul_(3.0)
    routing.expert_ids.data.copy_(routing.expert_ids.flip(1))
    got = ops.molora_delta(x, A, B, routing.expert_ids, routing.gates)
    want = molora_delta_reference(x, A, B, routing.expert_ids, routing.gates, None, 1.0)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, first)


def test_a_layers_public_route_is_not_cached_past_a_data_write():
    """``MoLoRALinear.route`` hands its routing to the caller: not trusted for caching."""
    import torch.nn as nn

    from datalora.layers import MoLoRALinear

    torch.manual_seed(0)
    layer = MoLoRALinear(nn.Linear(8, 6), num_experts=4, rank=2, top_k=2, backend="torch")
    nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 8)
    with torch.no_grad():
        routing = layer.route(x)
        first = layer(x, routing)
        routing.gates.data.mul_(3.0)
        got = layer(x, routing)
        want = layer.base_layer(x) + molora_delta_reference(
            x, layer.lora_A, layer.lora_B, routing.expert_ids, routing.gates, None,
            layer.scaling)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, first)


def test_backend_choice_is_marked_constant_as_torch_compiler_marks_it():
    """``_resolve`` carries the mark ``torch.compiler.assume_constant_result`` sets (set
    directly, so ``import datalora`` does not import torch._dynamo): a torch release that
    changes the mechanism fails here rather than recompiling per call."""
    from datalora.ops import backends

    def probe():
        return "torch"

    marked = torch.compiler.assume_constant_result(probe)
    assert marked is probe and vars(probe)
    assert all(getattr(backends._resolve, k, None) == v for k, v in vars(probe).items())


def test_a_slow_path_warning_reaches_compiled_code_once_with_no_graph_break():
    """``warn_once`` said nothing under torch.compile, so a model that only ever ran compiled
    took a slow path silently: it now warns while dynamo traces (fullgraph=True: no graph
    break), once per message over recompiles, and the compiled graph never warns."""
    import warnings

    from datalora.ops import backends

    backends._warn_once.cache_clear()

    def forward(x):
        backends.warn_once(f"datalora: test slow path for {x.dtype}")
        return x * 2

    compiled = torch.compile(forward, backend="eager", fullgraph=True, dynamic=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for n in (3, 3, 4, 5):  # two recompiles (new static shapes)
            torch.testing.assert_close(compiled(torch.ones(n)), torch.full((n,), 2.0))
    said = [str(w.message) for w in caught if "test slow path" in str(w.message)]
    assert said == ["datalora: test slow path for torch.float32"]
    assert all(w.category is RuntimeWarning for w in caught if "test slow path" in
               str(w.message))
    backends._warn_once.cache_clear()


def test_import_datalora_leaves_dynamo_and_transformers_unimported():
    """``import datalora`` costs about what ``import torch`` does: torch._dynamo (1.5 s) and
    transformers (1 s) load on first use, and the public names still import."""
    import subprocess
    import sys

    code = ("import sys, datalora; "
            "print(sorted(m for m in ('torch._dynamo', 'transformers') if m in sys.modules)); "
            "from datalora import (DATALORAConfig, MoLoRALinear, UnifiedSaliencyNetwork, "
            "CurriculumScheduler, DATALORATrainer, get_datalora_model, ops, nf4); "
            "from datalora.model import DATALORACausalLMOutput as O; "
            "from transformers.modeling_outputs import CausalLMOutputWithPast as C; "
            "assert issubclass(O, C) and O(retention_loss=1).retention_loss == 1; "
            "import datalora.model as m; assert m.output_with_aux_losses(C) is O")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_every_public_name_is_listed_and_visible_to_type_checkers():
    """``dir(datalora)`` (what ``help()`` and completion list) and a static reading of
    ``datalora/__init__.py`` both hold every name of ``__all__``: the lazily imported
    DATALORATrainer / TokenLevelAdapterMixer were missing from both (``Any`` to a type
    checker of this ``py.typed`` package)."""
    import ast
    import inspect

    import datalora

    assert set(datalora.__all__) <= set(dir(datalora))
    tree = ast.parse(inspect.getsource(datalora))
    bound = set()
    for node in tree.body:
        for stmt in (node.body if isinstance(node, ast.If) else [node]):
            if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                bound |= {alias.asname or alias.name for alias in stmt.names}
    assert set(datalora.__all__) - bound == set()
    assert all(getattr(datalora, name) is not None for name in datalora.__all__)


# --- the torch backend's two CPU strategies ---------------------------------------------

def test_forced_strategy_runs_that_strategy(strategy, monkeypatch):
    """DATALORA_SHRINK_STRATEGY picks the CPU path, forward and backward."""
    calls = []
    for name in ("_grouped_lora_into", "_grouped_backward", "_shrink", "_dense_h"):
        original = getattr(torch_backend, name)
        monkeypatch.setattr(torch_backend, name,
                            lambda *a, _f=original, _n=name, **kw: calls.append(_n) or _f(*a, **kw))
    x, A, B, ids, gates, rs = make_inputs(9, dtype=torch.float64, requires_grad=True)
    ops.molora_delta(x, A, B, ids, gates, rs, backend="torch").sum().backward()
    grouped = {"_grouped_lora_into", "_grouped_backward"}
    assert set(calls) == (grouped if strategy == "grouped" else {"_shrink", "_dense_h"})


def test_a_bad_strategy_name_is_refused(monkeypatch):
    monkeypatch.setenv("DATALORA_SHRINK_STRATEGY", "sparse")
    x, A, B, ids, gates, rs = make_inputs(4)
    with pytest.raises(ValueError, match="DATALORA_SHRINK_STRATEGY.*'sparse'"):
        ops.molora_delta(x, A, B, ids, gates, rs, backend="torch")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_inputs_stay_dense_even_when_grouped_is_forced(dtype, monkeypatch):
    monkeypatch.setenv("DATALORA_SHRINK_STRATEGY", "grouped")
    x, A, B, ids, gates, rs = make_inputs(6, dtype=dtype)
    tables = torch_backend.RoutingTables(ids, gates, rs, 6, 4, 1.0, dtype)
    assert torch_backend.choose_strategy(x, 20, tables) == "dense"


def test_off_the_cpu_the_strategy_is_dense_without_reading_the_routes(monkeypatch):
    monkeypatch.setenv("DATALORA_SHRINK_STRATEGY", "grouped")
    x = torch.randn(2048, 64, device="meta")
    ids = torch.rand(2048, 32).argsort(-1)[:, :1]
    tables = torch_backend.RoutingTables(ids.to("meta"), torch.rand(2048, 1, device="meta"),
                                         None, 32, 64, 1.0, x.dtype)
    assert torch_backend.choose_strategy(x, 64, tables) == "dense"
    assert "counts" not in vars(tables)  # never read back


@pytest.fixture
def cpu_vendor(monkeypatch):
    """Sets the CPU vendor whose cost-model constants ``choose_strategy`` uses."""
    def set_vendor(vendor):
        monkeypatch.setattr(cpu_costs, "cpu_vendor", lambda: vendor)
    return set_vendor


@pytest.mark.parametrize("vendor, shape, backward, want", [
    # (T, d, E, r, k) and the direction, with the faster strategy in each of the runs of
    # benchmarks.cpu_strategy behind the vendor's constants (four on an Intel Xeon, the
    # last committed in cpu_intel_xeon/; four on an AMD EPYC, in cpu_amd_epyc/), the other
    # 1.2-5x slower: many experts per route or rank 64 on large calls: grouped; few experts
    # per route, a tiny layer: dense
    *[(cpu_costs.INTEL, *case) for case in [
        ((2048, 2048, 32, 16, 2), False, "grouped"), ((2048, 2048, 32, 16, 2), True, "grouped"),
        ((2048, 2048, 8, 64, 2), True, "grouped"), ((512, 2048, 8, 64, 2), True, "grouped"),
        ((2048, 2048, 8, 16, 8), False, "dense"), ((2048, 2048, 8, 16, 8), True, "dense"),
        ((2048, 2048, 4, 16, 2), True, "dense"), ((128, 64, 8, 16, 2), False, "dense")]],
    *[(cpu_costs.AMD, *case) for case in [
        ((2048, 2048, 32, 16, 2), False, "grouped"), ((2048, 2048, 32, 16, 2), True, "grouped"),
        ((2048, 2048, 8, 64, 2), True, "grouped"), ((512, 2048, 32, 16, 2), False, "grouped"),
        ((2048, 2048, 8, 16, 8), True, "dense"), ((2048, 2048, 8, 8, 2), False, "dense"),
        ((2048, 2048, 4, 16, 2), True, "dense"), ((128, 64, 8, 16, 2), False, "dense")]],
])
def test_the_cpu_heuristic_picks_the_measured_faster_strategy(vendor, shape, backward, want,
                                                              cpu_vendor, monkeypatch):
    monkeypatch.delenv("DATALORA_SHRINK_STRATEGY", raising=False)
    cpu_vendor(vendor)
    T, d, E, r, k = shape
    x = torch.randn(T, d)
    ids = torch.rand(T, E).argsort(-1)[:, :k]
    tables = torch_backend.RoutingTables(ids, torch.rand(T, k), None, E, r, 1.0, x.dtype)
    assert torch_backend.choose_strategy(x, d, tables, backward=backward) == want


@pytest.mark.parametrize("T, d, E, read", [(128, 64, 8, False), (64, 512, 32, True)])
def test_the_routes_are_counted_only_when_the_pick_depends_on_them(T, d, E, read, cpu_vendor,
                                                                   monkeypatch):
    """A small layer is dense whatever the experts hit: its routes are not read back."""
    monkeypatch.delenv("DATALORA_SHRINK_STRATEGY", raising=False)
    cpu_vendor(cpu_costs.INTEL)
    r, k = 16, 2
    picks = {torch_backend.grouped_is_cheaper(T, d, d, E, r, k, hit) for hit in (1, E)}
    assert picks == ({True, False} if read else {False})  # the premise
    ids = torch.rand(T, E).argsort(-1)[:, :k]
    tables = torch_backend.RoutingTables(ids, torch.rand(T, k), None, E, r, 1.0, torch.float32)
    torch_backend.choose_strategy(torch.randn(T, d), d, tables)
    assert ("counts" in vars(tables)) == read


def test_each_cpu_vendor_has_its_cost_model_and_another_gets_intels():
    assert cpu_costs.strategy_costs(False, cpu_costs.AMD) is cpu_costs.COSTS[cpu_costs.AMD][0]
    assert cpu_costs.strategy_costs(True, cpu_costs.AMD) is cpu_costs.COSTS[cpu_costs.AMD][1]
    for vendor in ("HygonGenuine", ""):
        assert cpu_costs.strategy_costs(True, vendor) is cpu_costs.COSTS[cpu_costs.INTEL][1]
    # the same shape, picked differently by the two machine types' constants
    shape = (2048, 2048, 2048, 8, 16, 2, 8)
    assert cpu_costs.grouped_is_cheaper(*shape, costs=cpu_costs.strategy_costs(
        False, cpu_costs.INTEL))
    assert not cpu_costs.grouped_is_cheaper(*shape, costs=cpu_costs.strategy_costs(
        False, cpu_costs.AMD))


@pytest.mark.parametrize("cpuinfo, want", [
    ("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC\n", "AuthenticAMD"),
    ("processor\t: 0\nmodel name\t: something\n", "PROCESSOR"),
    (OSError("no /proc"), "PROCESSOR"),
    (OSError("Windows"), "AuthenticAMD"),
])
def test_the_cpu_vendor_comes_from_cpuinfo_else_platform(cpuinfo, want, monkeypatch):
    class FakePath:
        def __init__(self, path):
            assert path == "/proc/cpuinfo"

        def read_text(self):
            if isinstance(cpuinfo, Exception):
                raise cpuinfo
            return cpuinfo

    monkeypatch.setattr(cpu_costs, "Path", FakePath)
    processor = ("AMD64 Family 25 Model 1 Stepping 1, AuthenticAMD" if str(cpuinfo) == "Windows"
                 else "PROCESSOR")
    monkeypatch.setattr(cpu_costs.platform, "processor", lambda: processor)
    cpu_costs.cpu_vendor.cache_clear()
    try:
        assert cpu_costs.cpu_vendor() == want
    finally:
        cpu_costs.cpu_vendor.cache_clear()


def test_the_pick_is_made_once_per_routing_and_layer_shape(monkeypatch):
    """Layers sharing a routing's tables reuse the cost model's pick for their shape; the
    environment's override is still read on every call."""
    monkeypatch.delenv("DATALORA_SHRINK_STRATEGY", raising=False)
    calls = []
    model = torch_backend.grouped_is_cheaper
    monkeypatch.setattr(torch_backend, "grouped_is_cheaper",
                        lambda *args: calls.append(args) or model(*args))
    ids = torch.rand(64, 32).argsort(-1)[:, :2]
    tables = torch_backend.RoutingTables(ids, torch.rand(64, 2), None, 32, 16, 1.0,
                                         torch.float32)
    x = torch.randn(64, 512)
    pick = torch_backend.choose_strategy(x, 512, tables)
    made = len(calls)
    assert made >= 2 and torch_backend.choose_strategy(x, 512, tables) == pick
    assert len(calls) == made  # the same layer shape: no new pick
    torch_backend.choose_strategy(x, 256, tables)
    torch_backend.choose_strategy(x, 512, tables, backward=True)
    assert len(calls) > made + 1  # another d_out, the backward: picked again
    other = "dense" if pick == "grouped" else "grouped"
    monkeypatch.setenv("DATALORA_SHRINK_STRATEGY", other)
    assert torch_backend.choose_strategy(x, 512, tables) == other


def test_a_bad_strategy_name_is_refused_off_the_cpu_too(monkeypatch):
    monkeypatch.setenv("DATALORA_SHRINK_STRATEGY", "sparse")
    x = torch.randn(4, 8, device="meta")
    tables = torch_backend.RoutingTables(torch.zeros(4, 1, dtype=torch.long, device="meta"),
                                         torch.ones(4, 1, device="meta"), None, 2, 2, 1.0,
                                         x.dtype)
    with pytest.raises(ValueError, match="DATALORA_SHRINK_STRATEGY"):
        torch_backend.choose_strategy(x, 8, tables)


@pytest.mark.parametrize("rank_scale", [False, True])
def test_grouped_h_equals_dense_h_and_feeds_either_backward(rank_scale):
    """The per-route ``h`` is strategy-independent (up to the BLAS's summation order: the
    same dot products, bit for bit on an Intel Xeon's MKL path, 1e-15 apart on an AMD
    EPYC's): a grouped forward followed by a dense backward (each direction picks on its
    own) gives the dense step's gradients."""
    x, A, B, ids, gates, rs = make_inputs(23, dtype=torch.float64, rank_scale=rank_scale)
    ids[0] = 1  # a token routed twice to one expert
    grad = torch.randn(23, B.shape[1], dtype=torch.float64)
    outs = {s: torch_backend.delta_forward(x, A, B, ids, gates, rs, 1.5, strategy=s)
            for s in ("dense", "grouped")}
    torch.testing.assert_close(outs["grouped"][0], outs["dense"][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(outs["grouped"][1], outs["dense"][1], rtol=1e-13, atol=1e-14)
    needs = (True, True, True, True, rank_scale)
    for backward in ("dense", "grouped"):
        got = torch_backend.delta_backward(grad, x, A, B, ids, gates, rs, outs["grouped"][1],
                                           1.5, needs, strategy=backward)
        want = torch_backend.delta_backward(grad, x, A, B, ids, gates, rs, outs["dense"][1],
                                            1.5, needs, strategy="dense")
        for g, w in zip(got, want, strict=True):
            assert (g is None) == (w is None)
            if g is not None:
                torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_grouped_strategy_with_no_tokens_gives_zero_gradients(monkeypatch):
    monkeypatch.setenv("DATALORA_SHRINK_STRATEGY", "grouped")
    x, A, B, ids, gates, rs = make_inputs(0, dtype=torch.float64, requires_grad=True)
    out = ops.molora_delta(x, A, B, ids, gates, rs, backend="torch")
    grads = torch.autograd.grad(out.sum(), (x, A, B, gates, rs))
    assert [tuple(g.shape) for g in grads] == [tuple(t.shape) for t in (x, A, B, gates, rs)]
    assert not any(g.any() for g in grads)


def test_grouped_strategy_leaves_experts_without_routes_at_zero_gradient(monkeypatch):
    monkeypatch.setenv("DATALORA_SHRINK_STRATEGY", "grouped")
    x, A, B, ids, gates, rs = make_inputs(10, k=2, dtype=torch.float64, skew=True,
                                          requires_grad=True)
    out = ops.molora_delta(x, A, B, ids, gates, rs, backend="torch")
    out.backward(torch.randn_like(out))
    assert not A.grad[2:].any() and not B.grad[2:].any()
    assert A.grad[:2].abs().sum(-1).gt(0).all() and B.grad[:2].abs().sum(-2).gt(0).all()


def test_grouped_strategy_keeps_a_nan_token_out_of_unrouted_experts_gradients(monkeypatch):
    """Unlike the dense strategy (module docstring), the grouped one spoils only the
    experts a non-finite token is routed to."""
    monkeypatch.setenv("DATALORA_SHRINK_STRATEGY", "grouped")
    x, A, B, ids, gates, rs = make_inputs(16, dtype=torch.float32, requires_grad=True)
    with torch.no_grad():
        x[3] = float("nan")
    ops.molora_delta(x, A, B, ids, gates, rs, backend="torch").sum().backward()
    spoiled = set(ids[3].tolist())
    for e in range(A.shape[0]):
        assert torch.isfinite(A.grad[e]).all() == (e not in spoiled), e
    assert torch.isfinite(torch.cat([x.grad[:3], x.grad[4:]])).all()


@pytest.mark.parametrize("need", range(5))
def test_grouped_backward_computes_only_what_is_needed(need):
    """Each gradient alone equals the dense strategy's."""
    x, A, B, ids, gates, rs = make_inputs(21, dtype=torch.float64)
    grad = torch.randn(21, B.shape[1], dtype=torch.float64)
    _, h = torch_backend.delta_forward(x, A, B, ids, gates, rs, 2.0, strategy="dense")
    needs = tuple(i == need for i in range(5))
    got = torch_backend.delta_backward(grad, x, A, B, ids, gates, rs, h, 2.0, needs,
                                       strategy="grouped")
    want = torch_backend.delta_backward(grad, x, A, B, ids, gates, rs, h, 2.0, needs,
                                        strategy="dense")
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert (g is None) == (w is None) == (i != need)
        if g is not None:
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_grouped_dx_is_added_into_dx_out():
    x, A, B, ids, gates, rs = make_inputs(9, dtype=torch.float64)
    grad = torch.randn(9, B.shape[1], dtype=torch.float64)
    _, h = torch_backend.delta_forward(x, A, B, ids, gates, rs, 2.0, strategy="grouped")
    needs = (True, False, False, False, False)
    base = torch.randn(9, x.shape[1], dtype=torch.float64)
    out = base.clone()
    dx = torch_backend.delta_backward(grad, x, A, B, ids, gates, rs, h, 2.0, needs,
                                      dx_out=out, strategy="grouped")[0]
    want = torch_backend.delta_backward(grad, x, A, B, ids, gates, rs, h, 2.0, needs,
                                        strategy="dense")[0]
    assert dx is out
    torch.testing.assert_close(out, base + want)

