"""MoLoRALinear: drop-in behaviour, routing, gradients, torch.compile."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from datalora import MoLoRALinear, Routing, SMoRALinear, ops, sort_routes, topk_routing
from datalora.reference import (
    gather_tokens_reference,
    molora_delta_reference,
    molora_linear_reference,
    scatter_tokens_reference,
)


def make_layer(d_in=16, d_out=12, E=4, r=3, k=2, bias=True, dtype=torch.float32):
    base = nn.Linear(d_in, d_out, bias=bias, dtype=dtype)
    return base, MoLoRALinear(base, num_experts=E, rank=r, alpha=6, top_k=k)


def test_equals_base_at_init_and_freezes_base():
    base, layer = make_layer()
    x = torch.randn(2, 5, 16)
    assert torch.equal(layer(x), base(x))
    assert not base.weight.requires_grad and not base.bias.requires_grad
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B", "router.weight"}
    assert layer.weight is base.weight and layer.in_features == 16 and layer.out_features == 12
    assert layer.lora_A.abs().sum() > 0 and layer.lora_B.abs().sum() == 0


def test_forward_matches_reference_with_own_router():
    _, layer = make_layer()
    nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 5, 16)
    y = layer(x)
    routing = layer.last_routing
    assert routing.expert_ids.shape == (10, 2)
    torch.testing.assert_close(routing.gates.sum(-1), torch.ones(10))
    ref = molora_linear_reference(x.reshape(10, 16), layer.weight, layer.bias, layer.lora_A,
                                  layer.lora_B, routing.expert_ids, routing.gates, None,
                                  layer.scaling)
    torch.testing.assert_close(y.reshape(10, -1), ref)


def test_shared_routing_with_rank_scale():
    _, layer = make_layer(bias=False)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(7, 16)
    routing = Routing(expert_ids=torch.randint(0, 4, (7, 2)), gates=torch.rand(7, 2),
                      rank_scale=torch.rand(7, 3))
    ref = molora_linear_reference(x, layer.weight, None, layer.lora_A, layer.lora_B,
                                  routing.expert_ids, routing.gates, routing.rank_scale,
                                  layer.scaling)
    torch.testing.assert_close(layer(x, routing=routing), ref)


def test_training_updates_experts_and_router():
    base, layer = make_layer()
    opt = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(64, 16)
    with torch.no_grad():  # reachable target: the base plus a rank-2 update
        target = base(x) + x @ torch.randn(16, 2) @ torch.randn(2, 12)
    losses = []
    for _ in range(60):
        loss = (layer(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert layer.router.weight.grad is not None and layer.router.weight.grad.abs().sum() > 0


def test_disabled_adapter_is_exact_base():
    base, layer = make_layer()
    nn.init.normal_(layer.lora_B)
    x = torch.randn(4, 16)
    assert not torch.equal(layer(x), base(x))
    layer.adapter_enabled = False
    assert torch.equal(layer(x), base(x))


class _Doubled(nn.Linear):
    """An ``nn.Linear`` subclass with its own forward."""

    def forward(self, x):
        return 2 * super().forward(x)


def _hooked(kind):
    base = nn.Linear(16, 12)
    if kind == "forward_hook":
        base.register_forward_hook(lambda m, i, o: o * 3)
    elif kind == "pre_hook":
        base.register_forward_pre_hook(lambda m, i: (i[0] + 1,))
    else:  # accelerate-style: forward replaced on the instance
        base.forward = lambda x: nn.Linear.forward(base, x) - 1
    return base


@pytest.mark.parametrize("make_base", [lambda: _Doubled(16, 12), lambda: _hooked("forward_hook"),
                                       lambda: _hooked("pre_hook"),
                                       lambda: _hooked("instance_forward")],
                         ids=["subclass_forward", "forward_hook", "pre_hook", "instance_forward"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_base_forward_and_hooks_run_with_the_adapter_on(make_base, dropout):
    base = make_base()
    layer = MoLoRALinear(base, 4, 3, 6, 2, dropout=dropout)
    x = torch.randn(5, 16)
    assert torch.equal(layer(x), base(x))  # B = 0: identity at init, as with the adapter off
    nn.init.normal_(layer.lora_B)
    layer.eval()
    routing = layer.route(x)
    delta = layer(x, routing) - base(x)
    layer.adapter_enabled = False
    assert torch.equal(layer(x), base(x))
    plain = nn.Linear(16, 12)
    plain.load_state_dict(base.state_dict())
    ref = MoLoRALinear(plain, 4, 3, 6, 2)
    ref.load_state_dict(layer.state_dict())
    torch.testing.assert_close(delta, ref(x, routing) - plain(x))


@pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")
def test_old_style_weight_norm_base_uses_its_recomputed_weight():
    base = torch.nn.utils.weight_norm(nn.Linear(16, 12))
    layer = MoLoRALinear(base, 4, 3, 6, 2)
    state = layer.state_dict()
    state["base_layer.weight_g"] = state["base_layer.weight_g"] * 3  # a loaded checkpoint
    layer.load_state_dict(state)
    x = torch.randn(5, 16)
    assert torch.equal(layer(x), base(x))


@pytest.mark.parametrize("make_base", [lambda: nn.Linear(16, 12), lambda: _Doubled(16, 12)],
                         ids=["linear", "subclass"])
@pytest.mark.parametrize("routing", [False, True])
def test_forward_backward_on_meta(make_base, routing):
    # shape inference without memory, as nn.Linear allows (meta has no autocast)
    with torch.device("meta"):
        layer = MoLoRALinear(make_base(), 4, 3, 6, 2, dropout=0.1)
        x = torch.randn(2, 5, 16, requires_grad=True)
        shared = Routing(expert_ids=torch.zeros(10, 2, dtype=torch.long),
                         gates=torch.rand(10, 2)) if routing else None
    y = layer(x, shared)
    assert y.shape == (2, 5, 12) and y.is_meta
    y.sum().backward()
    assert x.grad.shape == x.shape and layer.lora_A.grad.is_meta


def test_dropout_path_and_dtype_cast():
    base = nn.Linear(16, 12, dtype=torch.bfloat16)
    layer = MoLoRALinear(base, 4, 3, 6, 2, dropout=0.1, dtype=torch.float32)
    assert layer.lora_A.dtype == torch.float32
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32


@pytest.mark.parametrize("base", ["plain", "hooked", "nf4"])
def test_dropout_reaches_the_lora_input_in_training_only(base):
    """In training the delta sees dropout(x) (same RNG draw as F.dropout), the base the
    clean x; in eval no dropout at all: on the fused, the module-base and the NF4 paths."""
    torch.manual_seed(0)
    kwargs = dict(quantize="nf4") if base == "nf4" else {}
    layer = MoLoRALinear(_hooked("forward_hook") if base == "hooked" else nn.Linear(16, 12),
                         4, 3, 6, 2, dropout=0.5, **kwargs)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(7, 16)
    routing = Routing(torch.randint(0, 4, (7, 2)), torch.rand(7, 2))
    with torch.no_grad():
        layer.adapter_enabled = False
        base_y = layer(x)
        layer.adapter_enabled = True

        def delta(lora_x):
            return ops.molora_delta(lora_x, layer.lora_A, layer.lora_B, routing.expert_ids,
                                    routing.gates, scaling=layer.scaling, backend="torch")

        layer.train()
        torch.manual_seed(1)
        y = layer(x, routing)
        torch.manual_seed(1)
        want = delta(torch.nn.functional.dropout(x, 0.5, training=True))
        torch.testing.assert_close(y - base_y, want, atol=1e-4, rtol=1e-4)
        layer.eval()
        torch.testing.assert_close(layer(x, routing) - base_y, delta(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(top_k=5), "top_k: expected <= num_experts=4"),
    (dict(rank=0), "rank: expected an int >= 1, got 0"),
    (dict(dropout=1.0), "dropout"),
    (dict(rank=True), "rank: expected an int >= 1, got True"),
    (dict(alpha=float("nan")), "alpha: expected a finite number"),
    (dict(alpha=float("inf")), "alpha: expected a finite number"),
    (dict(alpha="32"), "alpha: expected a finite number, got '32'"),
    (dict(alpha=0.0), "alpha: expected > 0"),
    # failed only at the first forward (BackendUnavailableError)
    (dict(backend="cuda"), "backend: 'cuda' needs an NF4 base .* got Linear"),
])
def test_bad_arguments(kwargs, fragment):
    args = dict(num_experts=4, rank=3, alpha=6, top_k=2) | kwargs
    with pytest.raises(ValueError, match=fragment):
        MoLoRALinear(nn.Linear(4, 4), **args)
    with pytest.raises(TypeError, match="base_layer"):
        MoLoRALinear(nn.Conv1d(4, 4, 1))


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(dtype=torch.int32), r"dtype: expected None or a floating torch.dtype \(torch.float16"),
    (dict(dtype="float32"), r"dtype: expected None or a floating torch.dtype .*got 'float32'"),
    (dict(dtype=torch.complex64), "dtype: expected None or a floating torch.dtype"),
    (dict(router="no"), "router: expected a bool, got 'no'"),
    (dict(router=None), "router: expected a bool, got None"),
])
def test_bad_argument_types(kwargs, fragment):
    # checked before the base is quantized or any parameter allocated
    with pytest.raises(TypeError, match=fragment):
        MoLoRALinear(nn.Linear(4, 4), 4, 3, 6, 2, **kwargs)


@pytest.mark.parametrize("router", [True, False])
@pytest.mark.parametrize("x,fragment", [
    (torch.randn(3, 7), r"x: expected shape \[..., in_features=8\], got \(3, 7\)"),
    (torch.randn(2, 5, 9), r"x: expected shape \[..., in_features=8\], got \(2, 5, 9\)"),
    (torch.tensor(1.0), r"x: expected shape \[..., in_features=8\], got \(\)"),
])
def test_wrong_input_shape_names_x_and_in_features(x, fragment, router):
    layer = MoLoRALinear(nn.Linear(8, 6), 4, 2, 4, 2, router=router)
    routing = None if router else Routing(expert_ids=torch.zeros(3, 2, dtype=torch.long),
                                          gates=torch.ones(3, 2))
    with pytest.raises(ValueError, match=fragment):
        layer(x, routing)


@pytest.mark.parametrize("routing", [(torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2)),
                                     {"expert_ids": torch.zeros(3, 2, dtype=torch.long)}])
def test_routing_of_the_wrong_type_names_routing(routing):
    layer = MoLoRALinear(nn.Linear(8, 6), 4, 2, 4, 2)
    with pytest.raises(TypeError, match="routing: expected a datalora.Routing or None, got "
                                        + type(routing).__name__):
        layer(torch.randn(3, 8), routing)


def test_uninitialized_lazy_linear_base_is_refused():
    with pytest.raises(ValueError, match="base_layer: an uninitialized nn.LazyLinear"):
        MoLoRALinear(nn.LazyLinear(6), 4, 2, 4, 2)


def _random_layer(k=2, E=4, rank_scale=False):
    torch.manual_seed(0)
    _, layer = make_layer(E=E, k=k)
    with torch.no_grad():
        layer.lora_B.normal_()  # B = 0 at init: every gradient but dB would be zero
    return layer


@pytest.mark.parametrize("k", [1, 2, 4])
def test_torch_func_grad_vmap_jacrev_match_autograd(k):
    """torch.func transforms run the ops as plain torch code: per-sample gradients
    (vmap of grad), Jacobians and vmap equal torch.autograd's / a loop's results."""
    from torch.func import functional_call, grad, jacrev, vmap

    layer = _random_layer(k=k)
    x = torch.randn(5, 16)
    params = {n: p.detach() for n, p in layer.named_parameters() if p.requires_grad}

    def loss(p, x):
        return functional_call(layer, p, (x,)).pow(2).sum()

    want = torch.autograd.grad(layer(x).pow(2).sum(), [layer.lora_A, layer.lora_B])
    got = grad(loss)(params, x)
    torch.testing.assert_close(got["lora_A"], want[0])
    torch.testing.assert_close(got["lora_B"], want[1])
    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, x[:, None])
    for i in range(5):
        one = torch.autograd.grad(layer(x[i:i + 1]).pow(2).sum(), [layer.lora_A])[0]
        # other GEMM shapes than the batched call: fp32 rounding differs (thread count)
        torch.testing.assert_close(per_sample["lora_A"][i], one, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vmap(layer)(x), layer(x))
    jac = jacrev(layer)(x[0])
    torch.testing.assert_close(jac, torch.autograd.functional.jacobian(layer, x[0]))


def test_torch_func_on_the_ops_with_rank_scale_and_repeated_experts():
    from torch.func import grad, jvp

    torch.manual_seed(0)
    T, E, r, d_in, d_out = 6, 3, 2, 8, 5
    x, A, B = torch.randn(T, d_in), torch.randn(E, r, d_in), torch.randn(E, d_out, r)
    ids = torch.tensor([[0, 0], [1, 2], [2, 1], [0, 2], [1, 1], [2, 2]])
    gates, rs = torch.rand(T, 2), torch.rand(T, r)
    W, b = torch.randn(d_out, d_in), torch.randn(d_out)

    def f(A, gates, rs):
        return ops.molora_linear(x, W, b, A, B, ids, gates, rs, 0.5).pow(2).sum()

    def ref(A, gates, rs):
        return molora_linear_reference(x, W, b, A, B, ids, gates, rs, 0.5).pow(2).sum()

    for argnum in range(3):
        torch.testing.assert_close(grad(f, argnums=argnum)(A, gates, rs),
                                   grad(ref, argnums=argnum)(A, gates, rs))
    tangent = torch.randn_like(x)
    _, got = jvp(lambda x: ops.molora_delta(x, A, B, ids, gates, rs, 0.5), (x,), (tangent,))
    torch.testing.assert_close(got, molora_delta_reference(tangent, A, B, ids, gates, rs, 0.5))


def test_router_less_layer_requires_routing():
    layer = MoLoRALinear(nn.Linear(4, 4), 2, 2, 2, 1, router=False)
    with pytest.raises(ValueError, match="routing"):
        layer(torch.randn(3, 4))


def test_torch_compile_fullgraph_forward_backward():
    torch._dynamo.reset()
    _, layer = make_layer()
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 5, 16, requires_grad=True)

    def step(layer, x):
        y = layer(x)
        y.pow(2).sum().backward()
        return y

    eager_y = step(layer, x)
    eager_grads = [p.grad.clone() for p in (layer.lora_A, layer.lora_B)] + [x.grad.clone()]
    layer.zero_grad()
    x.grad = None
    compiled = torch.compile(lambda x: layer(x), fullgraph=True)
    y = compiled(x)
    y.pow(2).sum().backward()
    torch.testing.assert_close(y, eager_y)
    for g, e in zip([layer.lora_A.grad, layer.lora_B.grad, x.grad], eager_grads, strict=True):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("fused", [False, True])
def test_autocast_leaves_float64_ops_in_float64(fused):
    # as F.linear: float64 is not autocast-eligible, so the result stays exact float64
    torch.manual_seed(0)
    x, W, b = torch.randn(5, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64), None
    A, B = torch.randn(3, 2, 8, dtype=torch.float64), torch.randn(3, 6, 2, dtype=torch.float64)
    ids, gates = torch.randint(0, 3, (5, 2)), torch.rand(5, 2, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = (ops.molora_linear(x, W, b, A, B, ids, gates, scaling=0.5) if fused
             else ops.molora_delta(x, A, B, ids, gates, scaling=0.5))
    want = molora_delta_reference(x, A, B, ids, gates, None, 0.5)
    want = x @ W.T + want if fused else want
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, want, atol=1e-12, rtol=1e-10)


def test_autocast_bf16_forward_backward_with_fp32_weights():
    base, layer = make_layer()
    nn.init.normal_(layer.lora_B)
    x = torch.randn(6, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        assert y.dtype == torch.bfloat16  # like F.linear under autocast
        loss = y.float().pow(2).sum()
    loss.backward()
    assert layer.lora_A.grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    ref = molora_linear_reference(x.detach(), layer.weight, layer.bias, layer.lora_A.detach(),
                                  layer.lora_B.detach(), layer.last_routing.expert_ids,
                                  layer.last_routing.gates.detach(), None, layer.scaling)
    torch.testing.assert_close(y.float(), ref, atol=0.1, rtol=0.05)


def test_shared_routing_is_value_checked_once(monkeypatch):
    import datalora.ops.validation as validation

    calls = []
    real = validation.check_routing_values
    monkeypatch.setattr(validation, "check_routing_values",
                        lambda *a: calls.append(1) or real(*a))
    layers = [make_layer()[1] for _ in range(3)]
    x = torch.randn(7, 16)
    routing = Routing(expert_ids=torch.randint(0, 4, (7, 2)), gates=torch.rand(7, 2))
    for layer in layers:
        layer(x, routing=routing)
    assert len(calls) == 1  # one host sync per routing decision, not one per layer
    for layer in layers:  # the layer's own top-k router: valid ids, no host sync
        layer(x)
    assert len(calls) == 1
    fresh = Routing(expert_ids=torch.randint(0, 4, (7, 2)), gates=torch.rand(7, 2))
    layers[0](x, routing=fresh)  # a fresh shared decision is checked again
    assert len(calls) == 2
    bad = Routing(expert_ids=torch.full((7, 2), 9), gates=torch.rand(7, 2))
    with pytest.raises(ValueError, match="expert_ids: expected values in"):
        layers[0](x, routing=bad)


def _trusted_routing(T, E, k, r, rank_scale=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(T, E, generator=g).argsort(-1)[:, :k]
    return Routing(expert_ids=ids, gates=torch.rand(T, k, generator=g),
                   rank_scale=torch.rand(T, r, generator=g) if rank_scale else None,
                   _trusted=True, _valid_experts=E)


def _count_checked_calls(monkeypatch):
    """A list that gets an entry per call of the checked ops (``molora_linear`` and
    ``molora_delta``, which a layer with active dropout or a non-plain base calls)."""
    calls = []
    for name in ("molora_linear", "molora_delta"):
        checked = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *args, checked=checked, **kwargs: (
            calls.append(1) or checked(*args, **kwargs)))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("rank_scale", [False, True])
@pytest.mark.parametrize("shape", [(0, 16), (1, 16), (5, 16), (2, 3, 16), "strided"])
def test_shared_routing_inference_forward_equals_the_checked_op(dtype, k, rank_scale, shape,
                                                                monkeypatch):
    """An inference call with a shared, value-checked routing (a DATALORA model's decode
    step) calls the backend directly, skipping the layer's and the op's checks: its output
    is the checked op's, bit for bit, for every token count, leading dims, strided x, k = 1
    and k = E, with and without a rank scale, in each dtype; the layer records the routing."""
    base, layer = make_layer(dtype=dtype)
    layer.to(dtype).eval()
    nn.init.normal_(layer.lora_B)
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(6, 32, generator=g)[:, ::2] if shape == "strided"
         else torch.randn(*shape, generator=g)).to(dtype)
    T = x[..., 0].numel()
    routing = _trusted_routing(T, 4, k, 3, rank_scale)
    calls = _count_checked_calls(monkeypatch)
    with torch.no_grad():
        got = layer(x, routing)
    assert calls == [] and layer.last_routing is routing
    rs = None if routing.rank_scale is None else routing.rank_scale.to(dtype)
    want = ops.molora_linear(x, base.weight, base.bias, layer.lora_A, layer.lora_B,
                             routing.expert_ids, routing.gates.to(dtype), rs, layer.scaling)
    assert got.shape == want.shape == (*x.shape[:-1], 12) and got.dtype == dtype
    assert torch.equal(got, want)


def test_the_checked_path_runs_wherever_the_inference_path_may_not(monkeypatch):
    """The layer's checks and the op run for a call needing a gradient, in training with
    dropout, under autocast, for routing tensors requiring grad (the record is detached),
    for a routing whose values no layer checked yet, for a base with hooks and for LoRA
    weights or x the op must cast or name; the inference path everywhere else."""
    base, layer = make_layer()
    layer.eval()
    nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 16)
    routing = _trusted_routing(5, 4, 2, 3)
    calls = _count_checked_calls(monkeypatch)
    with torch.no_grad():
        y = layer(x, routing)
    assert calls == []
    layer(x.clone().requires_grad_(), routing).sum().backward()  # autograd: checked
    assert len(calls) == 1 and layer.lora_A.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(layer(x, routing), y)
        assert len(calls) == 1
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer(x, routing).dtype == torch.bfloat16
        assert len(calls) == 2
        gates = routing.gates.clone().requires_grad_()
        layer(x, Routing(routing.expert_ids, gates, routing.rank_scale, _trusted=True,
                         _valid_experts=4))
        assert len(calls) == 3 and not layer.last_routing.gates.requires_grad
        unchecked = Routing(routing.expert_ids.clone(), routing.gates, routing.rank_scale)
        layer(x, unchecked)  # the first layer checks its values, through the op
        layer(x, unchecked)
        assert len(calls) == 4
        with pytest.raises(ValueError, match="x: expected dtype torch.float32"):
            layer(x.double(), routing)
        with pytest.raises(ValueError, match="x: expected shape"):
            layer(torch.randn(5, 15), routing)
        assert len(calls) == 4  # the layer named x before the op
        handle = base.register_forward_hook(lambda *args: None)
        torch.testing.assert_close(layer(x, routing), y)  # base(x) + the delta op
        handle.remove()
        assert len(calls) == 5
        layer.lora_B.data = layer.lora_B.data.double()  # the checked path casts B
        torch.testing.assert_close(layer(x, routing), y)
        assert len(calls) == 6
    dropout = MoLoRALinear(nn.Linear(16, 12), num_experts=4, rank=3, top_k=2, dropout=0.5)
    dropout.requires_grad_(False)
    with torch.no_grad():
        dropout(x, routing)  # training mode, active dropout: the op on the dropped input
        assert len(calls) == 7
        dropout.eval()
        dropout(x, routing)
        assert len(calls) == 7


def _own_router_layer(dtype=torch.float32, k=2):
    base, layer = make_layer(k=k, dtype=dtype)
    layer.to(dtype).eval()
    nn.init.normal_(layer.lora_B)
    nn.init.normal_(layer.router.weight)
    return base, layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("shape", [(0, 16), (1, 16), (5, 16), (2, 3, 16), "strided"])
def test_own_router_inference_forward_equals_the_checked_path(dtype, k, shape, monkeypatch):
    """An inference call of a layer routing its own tokens (a drop-in layer's decode step)
    routes with its router and calls the backend directly: the output and the recorded
    routing are the checked path's, bit for bit, for every token count, leading dims,
    strided x, k = 1 and k = E, in each dtype."""
    _, layer = _own_router_layer(dtype, k)
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(6, 32, generator=g)[:, ::2] if shape == "strided"
         else torch.randn(*shape, generator=g)).to(dtype)
    calls = _count_checked_calls(monkeypatch)
    with torch.no_grad():
        got = layer(x)
        got_routing = layer.last_routing
        assert calls == []
        monkeypatch.setattr(MoLoRALinear, "_checks_skippable", lambda *args: False)
        want = layer(x)
    assert calls == [1]
    assert got.shape == want.shape == (*x.shape[:-1], 12) and got.dtype == dtype
    assert torch.equal(got, want)
    assert torch.equal(got_routing.expert_ids, layer.last_routing.expert_ids)
    assert torch.equal(got_routing.gates, layer.last_routing.gates)


def test_own_router_takes_the_checked_path_wherever_the_inference_path_may_not(monkeypatch):
    """A layer routing its own tokens takes the checked path (router as a module, the op)
    when its router needs a gradient, has hooks, a parametrized weight or another dtype;
    the outputs agree with the inference path's."""
    import torch.nn.utils.parametrize as parametrize

    _, layer = _own_router_layer()
    x = torch.randn(5, 16)
    calls = _count_checked_calls(monkeypatch)
    with torch.no_grad():
        want = layer(x)
    assert calls == []
    layer.requires_grad_(False)
    layer.router.weight.requires_grad_(True)
    got = layer(x)  # grad mode on, the router needs a gradient: checked
    assert len(calls) == 1 and got.requires_grad
    torch.testing.assert_close(got, want)
    layer.router.weight.requires_grad_(False)
    assert not layer(x).requires_grad and len(calls) == 1  # nothing needs a gradient
    seen = []
    handle = layer.router.register_forward_hook(lambda *args: seen.append(1))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want)
    handle.remove()
    assert len(calls) == 2 and seen == [1]

    class Identity(nn.Module):
        def forward(self, t):
            return t

    parametrize.register_parametrization(layer.router, "weight", Identity())
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want)
    assert len(calls) == 3
    parametrize.remove_parametrizations(layer.router, "weight")
    layer.router.double()  # logits cast to x's dtype by the checked path
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want)
    assert len(calls) == 4


def test_a_checked_shared_routing_compiles_fullgraph():
    """A routing an eager call value-checked, then used inside a fullgraph compile: the
    inference path is not traced (dynamo could not guard on the routing's version
    counters) and the compiled output equals the eager one."""
    _, layer = make_layer()
    layer.eval()
    nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 16)
    routing = Routing(torch.rand(5, 4).argsort(-1)[:, :2], torch.rand(5, 2), torch.rand(5, 3))
    with torch.no_grad():
        want = layer(x, routing)
        assert not routing.needs_value_check(4)
        got = torch.compile(lambda x: layer(x, routing), fullgraph=True, backend="eager")(x)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", ["weight", "bias", "lora_A"])
def test_a_parametrized_weight_takes_the_checked_path(name, monkeypatch):
    """The inference path reads the weights from the modules' parameter dicts; a
    parametrized base weight, bias or LoRA weight (computed on access) is not there, so the
    call takes the checked path and computes with the parametrized value."""
    import torch.nn.utils.parametrize as parametrize

    class Double(nn.Module):
        def forward(self, t):
            return 2 * t

    base, layer = make_layer()
    layer.eval()
    nn.init.normal_(layer.lora_B)
    parametrize.register_parametrization(layer if name == "lora_A" else base, name, Double())
    x = torch.randn(5, 16)
    routing = _trusted_routing(5, 4, 2, 3)
    calls = _count_checked_calls(monkeypatch)
    with torch.no_grad():
        got = layer(x, routing)
        want = molora_linear_reference(x, base.weight, base.bias, layer.lora_A, layer.lora_B,
                                       routing.expert_ids, routing.gates, routing.rank_scale,
                                       layer.scaling)
    assert calls == [1]
    torch.testing.assert_close(got, want)


def test_numpy_scalars_are_numbers():
    import numpy as np

    layer = MoLoRALinear(nn.Linear(4, 4), num_experts=4, rank=3, alpha=np.float32(6.0), top_k=2,
                         dropout=np.float64(0.0))
    assert layer.scaling == 2.0


def test_torch_func_warns_once_when_it_replaces_gpu_kernels(monkeypatch):
    import warnings

    from torch.func import vmap

    import datalora.ops.molora as molora_ops

    monkeypatch.setattr(molora_ops, "resolve_backend", lambda backend, device: "triton")
    monkeypatch.setattr(molora_ops, "_warned_plain_torch", set())
    layer = _random_layer()
    x = torch.randn(4, 16)
    with pytest.warns(UserWarning, match="plain torch ops, not the 'triton' kernels"):
        got = vmap(layer)(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vmap(layer)(x)  # once
    monkeypatch.undo()
    torch.testing.assert_close(got, layer(x))


# ------------------------------------------------------------------ Routing objects

def test_a_changed_routing_is_checked_and_sorted_again():
    """Value checks and the expert sort are reused while a Routing's tensors stay the same
    objects at the same version: a reassigned field is checked / sorted anew."""
    torch.manual_seed(0)
    layer = MoLoRALinear(nn.Linear(8, 6), num_experts=4, rank=3, alpha=6, router=False)
    x = torch.randn(5, 8)
    routing = Routing(torch.randint(0, 4, (5, 2)), torch.rand(5, 2))
    layer(x, routing=routing)
    routing.expert_ids = torch.full((5, 2), 7)
    with pytest.raises(ValueError, match=r"expert_ids: expected values in \[0, 4\)"):
        layer(x, routing=routing)
    routing.expert_ids = torch.zeros(5, 2, dtype=torch.long)
    routing.gates = torch.full((5, 2), float("nan"))
    with pytest.raises(ValueError, match="gates: expected finite values"):
        layer(x, routing=routing)
    for trusted in (False, True):
        r = Routing(torch.zeros(5, 2, dtype=torch.long), torch.rand(5, 2), _trusted=trusted)
        assert r.permutation(4).expert_offsets.tolist() == [0, 10, 10, 10, 10]
        assert (r.permutation(4) is r.permutation(4)) == trusted  # cached: ours only
        r.expert_ids = torch.full((5, 2), 3)
        assert r.permutation(4).expert_offsets.tolist() == [0, 0, 0, 0, 10]
        r.expert_ids.fill_(1)  # in place: a version bump
        assert r.permutation(4).expert_offsets.tolist() == [0, 0, 10, 10, 10]


def test_a_reassigned_field_is_checked_even_when_its_id_is_reused():
    """A new tensor may take the ``id`` of the one it replaced (just freed) and starts at
    version 0: the value check keys on the object itself, so every bad reassignment fails."""
    layer = MoLoRALinear(nn.Linear(8, 6), num_experts=4, rank=3, alpha=6, router=False)
    x = torch.randn(5, 8)
    for _ in range(50):
        routing = Routing(torch.randint(0, 4, (5, 2)), torch.rand(5, 2), _trusted=True)
        layer(x, routing=routing)
        routing.permutation(4)
        routing.expert_ids = torch.full((5, 2), 99)
        with pytest.raises(ValueError, match="expert_ids: expected values in"):
            layer(x, routing=routing)
        with pytest.raises(ValueError, match="expert_ids: expected values in"):
            layer(x, routing=routing)  # a failed check is not recorded as passed
        with pytest.raises(RuntimeError, match=r"expert ids outside \[0, 4\)"):
            routing.permutation(4)  # sorted again, not the cached sort of the old ids


def test_routing_copies_leave_their_caches_behind():
    import copy
    import pickle

    layer = MoLoRALinear(nn.Linear(8, 6), num_experts=4, rank=3, alpha=6, router=False)
    x = torch.randn(5, 8)
    routing = Routing(torch.randint(0, 4, (5, 2)), torch.rand(5, 2), _trusted=True)
    routing.permutation(4)
    y = layer(x, routing=routing)
    for clone in (copy.deepcopy(routing), pickle.loads(pickle.dumps(routing))):
        assert not clone._values_checked and not clone._permutations
        assert clone.needs_value_check(4) and not routing.needs_value_check(4)
        torch.testing.assert_close(layer(x, routing=clone), y)


@pytest.mark.parametrize("grad", [True, False])
def test_a_non_tensor_input_is_a_type_error_naming_x(grad):
    # the inference fast path looks at x before the checks do
    layers = (MoLoRALinear(nn.Linear(8, 5), num_experts=4, rank=2),
              SMoRALinear(nn.Linear(8, 5), total_rank=4, active_ranks=2))
    with torch.set_grad_enabled(grad):
        for layer in layers:
            for bad in (np.zeros((3, 8), dtype=np.float32), [0.0] * 8, None):
                with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
                    layer(bad)


def test_routing_fields_shapes_and_identity():
    with pytest.raises(TypeError, match="expert_ids: expected a torch.Tensor, got list"):
        Routing([[0], [1]], torch.ones(2, 1))
    with pytest.raises(TypeError, match="gates: expected a torch.Tensor, got NoneType"):
        Routing(torch.zeros(2, 1, dtype=torch.long), None)
    r3 = Routing(torch.zeros(2, 3, 1, dtype=torch.long), torch.ones(2, 3, 1))  # [B, L, k]
    assert (r3.num_tokens, r3.top_k) == (6, 1)
    a = Routing(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1))
    b = Routing(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1))
    assert a != b and a == a  # compared by identity (tensors have no truth value)
    assert a.expert_load(2).tolist() == [1.0, 0.0]
    bad = Routing(torch.tensor([[5]]), torch.ones(1, 1))
    with pytest.raises(RuntimeError, match=r"expert_load: expert ids outside \[0, 2\)"):
        bad.expert_load(2)
    # num_experts 0 failed with "index -1 is out of bounds", 2.0 / None inside torch.zeros
    for num_experts in (0, 2.0, None):
        for call in (a.expert_load, a.permutation,
                     lambda e: sort_routes(a.expert_ids, e)):
            with pytest.raises(ValueError, match=r"^num_experts: expected an int >= 1"):
                call(num_experts)


def test_routing_and_sort_routes_refuse_bad_ids_gates_and_shapes():
    """Float ids were truncated by .long() (1.7 -> expert 1), out-of-range ids counted in
    the last expert's segment, and a Routing whose gates had other rows was accepted."""
    ids = torch.zeros(3, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="expert_ids: expected dtype int32 or int64, got "
                                         "torch.float32"):
        Routing(torch.zeros(3, 2), torch.ones(3, 2))
    with pytest.raises(ValueError, match=r"gates: expected shape \(3, 2\)"):
        Routing(ids, torch.ones(2, 2))
    with pytest.raises(ValueError, match="gates: expected a floating dtype"):
        Routing(ids, torch.ones(3, 2, dtype=torch.long))
    for name in ("rank_scale", "router_probs"):
        with pytest.raises(ValueError, match=rf"{name}: expected shape \[3, n\]"):
            Routing(ids, torch.ones(3, 2), **{name: torch.ones(2, 4)})
        with pytest.raises(ValueError, match=f"{name}: expected a floating dtype"):
            Routing(ids, torch.ones(3, 2), **{name: torch.ones(3, 4, dtype=torch.long)})
    with pytest.raises(ValueError, match="expert_ids: expected dtype int32 or int64"):
        sort_routes(torch.tensor([[1.7], [0.2]]), 3)
    with pytest.raises(RuntimeError, match=r"sort_routes: expert ids outside \[0, 3\)"):
        sort_routes(torch.full((2, 1), 7), 3)
    perm = sort_routes(torch.full((2, 1), 7), 3, check_values=False)  # counted as expert 2
    assert perm.expert_offsets.tolist() == [0, 0, 0, 2]
    with pytest.raises(TypeError, match="renormalize: expected a bool, got 'no'"):
        topk_routing(torch.randn(3, 4), 2, renormalize="no")


def test_a_routing_used_with_value_checks_off_is_checked_once_they_are_on(monkeypatch):
    """With DATALORA_CHECK_VALUES=0 the op skips the check, but the layer recorded the
    routing as checked: bad ids passed silently (clamped) after the variable was unset."""
    layer = MoLoRALinear(nn.Linear(8, 6), num_experts=4, rank=3, alpha=6, router=False)
    routing = Routing(torch.tensor([[0, 7]] * 5), torch.rand(5, 2))
    monkeypatch.setenv("DATALORA_CHECK_VALUES", "0")
    layer(torch.randn(5, 8), routing=routing)
    monkeypatch.delenv("DATALORA_CHECK_VALUES")
    with pytest.raises(ValueError, match="expert_ids: expected values in"):
        layer(torch.randn(5, 8), routing=routing)


def test_delta_is_scaled_by_alpha_over_rank():
    torch.manual_seed(0)
    base = nn.Linear(8, 6)
    layer = MoLoRALinear(base, num_experts=3, rank=4, alpha=2.0, top_k=2)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 8)
    routing = Routing(torch.tensor([[0, 1], [2, 0], [1, 2], [0, 2], [1, 0]]), torch.rand(5, 2))
    with torch.no_grad():
        want = molora_linear_reference(x, base.weight, base.bias, layer.lora_A, layer.lora_B,
                                       routing.expert_ids, routing.gates, None, 2.0 / 4)
        torch.testing.assert_close(layer(x, routing), want)


def test_topk_routing_refuses_integer_logits():
    """They used to give all-zero integer gates."""
    with pytest.raises(TypeError, match="logits: expected a floating tensor, got dtype "
                                        "torch.int64"):
        topk_routing(torch.randint(0, 3, (5, 4)), 2)


def test_topk_routing_gates_and_their_router_gradient():
    """Gates are the top-k softmax probabilities renormalised to sum 1 (raw with
    renormalize=False); at k = 1 the gate is exactly 1 and passes d log p to the router."""
    logits = torch.tensor([[2.0, 0.5, -1.0, 1.0], [0.0, 3.0, 1.0, -2.0]], dtype=torch.float64,
                          requires_grad=True)
    p = torch.softmax(logits.detach(), -1)
    two = topk_routing(logits, 2)
    assert two.expert_ids.tolist() == [[0, 3], [1, 2]]
    top = p.gather(1, two.expert_ids)
    torch.testing.assert_close(two.gates, top / top.sum(-1, keepdim=True))
    torch.testing.assert_close(topk_routing(logits, 2, renormalize=False).gates, top)
    one = topk_routing(logits, 1)
    assert one.gates.tolist() == [[1.0], [1.0]]
    (got,) = torch.autograd.grad(one.gates.sum(), logits)
    (want,) = torch.autograd.grad(torch.log_softmax(logits, -1).gather(1, one.expert_ids).sum(),
                                  logits)
    torch.testing.assert_close(got, want)


def test_expert_load_is_the_fraction_of_routes():
    # 6 routes (T = 3, k = 2) over 4 experts: counts 3, 1, 2, 0
    routing = Routing(torch.tensor([[0, 1], [2, 0], [0, 2]]), torch.ones(3, 2))
    torch.testing.assert_close(routing.expert_load(4), torch.tensor([3, 1, 2, 0]) / 6)


def test_meta_device_materialisation_gives_the_documented_init():
    """torch's recipe: build on ``meta``, ``to_empty()``, then ``reset_parameters()`` on
    every module that has one (FSDP, torchtitan): B zeros (the layer equals its base),
    router N(0, 0.02); the saliency network's heads keep their own init too."""
    from datalora.saliency import UnifiedSaliencyNetwork

    with torch.device("meta"):
        layer = MoLoRALinear(nn.Linear(256, 64), num_experts=8, rank=4, alpha=8)
        usn = UnifiedSaliencyNetwork(hidden_size=32, num_experts=4, rank=4, top_k=2)
    for module in (layer, usn):
        module.to_empty(device="cpu")
        for m in module.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
    x = torch.randn(3, 256)
    torch.testing.assert_close(layer(x), layer.base_layer(x))
    assert not layer.lora_B.any() and layer.lora_A.abs().max() <= 1 / 256 ** 0.5 * 1.01
    assert 0.015 < layer.router.weight.std() < 0.025
    assert torch.equal(usn.rank_head.bias, torch.full((4,), 2.0))
    assert 0.015 < usn.router_head.weight.std() < 0.025 and not usn.router_head.bias.any()
    assert not usn.backbone[0].bias.any()
    assert torch.isnan(usn.keep_threshold)  # not calibrated (was leftover memory)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("hooked", [False, True])
def test_x_of_the_wrong_dtype_is_named_on_every_path(dropout, hooked):
    layer = MoLoRALinear(nn.Linear(8, 6), num_experts=4, rank=3, alpha=6, dropout=dropout)
    if hooked:
        layer.base_layer.register_forward_hook(lambda m, i, o: None)
    for x, fragment in ((torch.randn(2, 8, dtype=torch.float64), "x: expected dtype"),
                        (torch.ones(2, 8, dtype=torch.long), "x: expected a floating dtype")):
        with pytest.raises(ValueError, match=fragment):
            layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast mixes dtypes
        assert layer(torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_x_on_another_device_is_named():
    """The op's check named A ("A: expected device ... (same as x)"), never passed by the
    user, for x on another device than the layer."""
    with pytest.raises(ValueError, match=r"^x: expected device cpu \(that of the layer's LoRA "
                                         r"weights\), got meta"):
        MoLoRALinear(nn.Linear(8, 6), num_experts=4, rank=3)(torch.randn(2, 8, device="meta"))
    with pytest.raises(ValueError, match=r"^x: expected device meta .*, got cpu"):
        MoLoRALinear(nn.Linear(8, 6, device="meta"), num_experts=4, rank=3)(torch.randn(2, 8))


@pytest.mark.parametrize("field", ["gates", "rank_scale"])
def test_integer_gates_or_rank_scale_are_refused_as_by_the_op(field):
    layer = MoLoRALinear(nn.Linear(8, 6), num_experts=4, rank=3, alpha=6, router=False)
    values = dict(gates=torch.rand(2, 2), rank_scale=torch.rand(2, 3))
    values[field] = torch.ones_like(values[field], dtype=torch.long)
    with pytest.raises(ValueError, match=f"{field}: expected a floating dtype"):
        Routing(torch.randint(0, 4, (2, 2)), **values)
    routing = Routing(torch.randint(0, 4, (2, 2)), torch.rand(2, 2), torch.rand(2, 3))
    setattr(routing, field, values[field])  # a field set later: the layer's op refuses it
    with pytest.raises(ValueError, match=f"{field}: expected a floating dtype"):
        layer(torch.randn(2, 8), routing=routing)


def test_flop_counter_and_global_hooks_see_the_base_gemm():
    from torch.utils.flop_counter import FlopCounterMode

    layer = MoLoRALinear(nn.Linear(64, 32), num_experts=4, rank=4, alpha=8, top_k=2)
    x = torch.randn(16, 64, requires_grad=True)
    T, d_in, d_out, k, r, E = 16, 64, 32, 2, 4, 4
    base, lora, router = 2 * T * d_in * d_out, 2 * T * k * r * (d_in + d_out), 2 * T * d_in * E
    with FlopCounterMode(display=False) as counter:
        layer(x)
    assert counter.get_total_flops() == base + lora + router
    with FlopCounterMode(display=False) as counter:
        layer(x).sum().backward()
    # backward: base dx (frozen weight), router dW and dx, LoRA dB + dz (expand-sized) and
    # dx + dA (shrink-sized)
    assert counter.get_total_flops() == (base + lora + router) + (base + 2 * router + 2 * lora)
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: seen.append(m))
    try:
        layer(x)
    finally:
        handle.remove()
    assert layer.base_layer in seen


def _saved_tensors(fn):
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = fn()
    return out, saved


def test_fp32_adapter_on_bf16_base_saves_x_once_in_bf16():
    """The router computes in x's dtype: no fp32 copy of bf16 x is kept for backward."""
    layer = MoLoRALinear(nn.Linear(32, 16).bfloat16(), num_experts=4, rank=4, alpha=8,
                         dtype=torch.float32)
    nn.init.normal_(layer.lora_B)  # B = 0 at init: no gradient would reach the router
    x = torch.randn(8, 32, dtype=torch.bfloat16, requires_grad=True)
    y, saved = _saved_tensors(lambda: layer(x))
    assert not [t for t in saved if t.shape == x.shape and t.dtype == torch.float32]
    y.float().sum().backward()
    assert layer.router.weight.grad.dtype == torch.float32 and layer.router.weight.grad.any()


def test_autocast_saves_one_cast_of_x_and_no_weight_copy_without_dx():
    layer = MoLoRALinear(nn.Linear(32, 16), num_experts=4, rank=4, alpha=8)
    x = torch.randn(8, 32)  # needs no gradient (e.g. after a frozen embedding)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, saved = _saved_tensors(lambda: layer(x))
    casts = {t.untyped_storage().data_ptr() for t in saved
             if t.shape == x.shape and t.dtype == torch.bfloat16}
    assert len(casts) == 1  # router and op share one bf16 x
    assert not [t for t in saved if t.shape == layer.weight.shape]
    y.float().sum().backward()
    assert layer.lora_A.grad is not None


def test_last_routing_keeps_no_graph_alive():
    import gc
    import weakref

    layer = MoLoRALinear(nn.Linear(16, 8), num_experts=4, rank=2, alpha=4)
    x = torch.randn(6, 16, requires_grad=True)
    hidden = x * 2
    y = layer(hidden)  # a forward without backward (an eval loop without no_grad)
    probe = weakref.ref(hidden)  # saved by the forward's graph while that graph lives
    del y, hidden
    gc.collect()
    assert probe() is None
    record = layer.last_routing
    assert record.gates.grad_fn is None and record.router_probs is None
    assert record.expert_ids.shape == (6, 2)


def test_fp16_overflow_in_an_unrouted_expert_does_not_poison_routed_tokens():
    torch.manual_seed(0)
    x = torch.randn(16, 8, dtype=torch.float16)
    A = torch.randn(4, 2, 8, dtype=torch.float16)
    A[3] = 3e4  # expert 3: H overflows fp16, but no token routes to it
    B = torch.randn(4, 6, 2, dtype=torch.float16, requires_grad=True)
    ids, gates = torch.randint(0, 3, (16, 2)), torch.rand(16, 2, dtype=torch.float16)
    A.requires_grad_(True)
    out = ops.molora_delta(x, A, B, ids, gates, backend="torch")
    assert torch.isfinite(out).all()
    want = molora_delta_reference(x.double(), A.double(), B.double(), ids, gates.double())
    torch.testing.assert_close(out.double(), want, atol=2e-2, rtol=2e-2)
    out.float().sum().backward()
    assert torch.isfinite(B.grad).all() and torch.isfinite(A.grad[:3]).all()


def test_fp16_overflow_in_an_unrouted_expert_stays_out_under_torch_func():
    """The plain-torch math that torch.func transforms run masks the unrouted expert's
    overflowing columns like the backend does (inf * 0 would be NaN in every output)."""
    from torch.func import vmap

    torch.manual_seed(0)
    x = torch.randn(16, 8, dtype=torch.float16)
    A = torch.randn(4, 2, 8, dtype=torch.float16)
    A[3] = 3e4  # expert 3: H overflows fp16, but no token routes to it
    B = torch.randn(4, 6, 2, dtype=torch.float16)
    ids, gates = torch.randint(0, 3, (16, 2)), torch.rand(16, 2, dtype=torch.float16)
    out = vmap(lambda x, i, g: ops.molora_delta(x, A, B, i, g, backend="torch"))(
        x[:, None], ids[:, None], gates[:, None])[:, 0]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ops.molora_delta(x, A, B, ids, gates, backend="torch"),
                               atol=2e-2, rtol=2e-2)


def test_router_hooks_and_parametrizations_apply():
    """The per-layer router runs as a module when it is not a bare linear: its hooks fire,
    an old-style weight_norm's recomputed weight is used."""
    layer = MoLoRALinear(nn.Linear(8, 6), num_experts=2, rank=2, alpha=4, top_k=1)
    calls = []
    layer.router.register_forward_hook(lambda m, i, o: calls.append(o.dtype))
    layer(torch.randn(3, 8))
    assert calls == [torch.float32]
    weighted = MoLoRALinear(nn.Linear(8, 6), num_experts=2, rank=2, alpha=4, top_k=2)
    torch.nn.utils.weight_norm(weighted.router)
    with torch.no_grad():
        weighted.router.weight_g.zero_()  # a zero weight: uniform router probabilities
    weighted(torch.randn(3, 8))
    torch.testing.assert_close(weighted.last_routing.gates, torch.full((3, 2), 0.5))


def test_custom_base_under_autocast_sees_x_as_given():
    """A base with its own forward gets the same x with the adapter on and off (no
    pre-cast to the autocast dtype), so with B = 0 the outputs match exactly."""
    class Scaled(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 1.0 if x.dtype == torch.float32 else x.new_zeros(1)

    layer = MoLoRALinear(Scaled(8, 6), num_experts=4, rank=2, alpha=4)
    x = torch.randn(5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        on = layer(x)
        layer.adapter_enabled = False
        off = layer(x)
    assert on.shape == off.shape == (5, 6)
    torch.testing.assert_close(on.float(), off.float(), rtol=0, atol=0)


def test_setting_a_routing_field_to_none_is_checked_again():
    layer = MoLoRALinear(nn.Linear(8, 6), num_experts=4, rank=3, alpha=6, router=False)
    x = torch.randn(5, 8)
    routing = Routing(torch.randint(0, 4, (5, 2)), torch.rand(5, 2), torch.rand(5, 3))
    layer(x, routing=routing)
    routing.rank_scale = None
    assert layer(x, routing=routing).shape == (5, 6)


def test_torch_func_grad_checks_the_routing_and_vmap_does_not_count_as_a_check():
    """Under grad the routing's values are read and checked as in eager mode; under vmap
    they cannot be read, and that unchecked forward must not mark the routing checked."""
    from torch.func import functional_call, grad, vmap

    layer = MoLoRALinear(nn.Linear(8, 6), num_experts=4, rank=3, alpha=6, router=False)
    x = torch.randn(5, 8)
    routing = Routing(torch.full((5, 2), 99), torch.rand(5, 2))  # out of range
    params = {k: v.detach() for k, v in layer.named_parameters()}
    with pytest.raises(ValueError, match="expert_ids: expected values in"):
        grad(lambda p: functional_call(layer, p, (x,), {"routing": routing}).sum())(params)
    vmap(lambda x: layer(x, routing=routing))(x[None].expand(3, -1, -1))
    with pytest.raises(ValueError, match="expert_ids: expected values in"):
        layer(x, routing=routing)


_BAD_ROUTING = [(torch.tensor([[0], [1], [7]]), torch.ones(3, 1), "expert_ids"),
                (torch.tensor([[0], [1], [1]]), torch.tensor([[1.0], [float("nan")], [1.0]]),
                 "gates")]


@pytest.mark.parametrize("ids,gates,name", _BAD_ROUTING)
def test_torch_func_and_forward_ad_check_the_routing_values(ids, gates, name):
    """grad / jacrev / jvp and forward-mode AD can read values: bad routing is refused as
    in eager mode (it used to be clamped silently there)."""
    import torch.autograd.forward_ad as fwAD
    from torch.func import grad, jacrev, jvp

    x, A, B, W = torch.randn(3, 4), torch.randn(2, 2, 4), torch.randn(2, 5, 2), torch.randn(5, 4)

    def delta(x):
        return ops.molora_delta(x, A, B, ids, gates)

    calls = [lambda: grad(lambda x: delta(x).sum())(x),
             lambda: jacrev(lambda x: ops.molora_linear(x, W, None, A, B, ids, gates))(x),
             lambda: jvp(delta, (x,), (torch.ones_like(x),))]
    for call in calls:
        with pytest.raises(ValueError, match=f"{name}: expected"):
            call()
    with fwAD.dual_level(), pytest.raises(ValueError, match=f"{name}: expected"):
        delta(fwAD.make_dual(x, torch.ones_like(x)))


def test_vmap_over_the_routing_and_token_positions():
    """Batched ids / positions cannot be read on the host: vmap over them runs unchecked
    (the value check used to fail on the batched tensor) and matches a loop."""
    from torch.func import vmap

    torch.manual_seed(0)
    x, A, B = torch.randn(3, 4), torch.randn(2, 2, 4), torch.randn(2, 5, 2)
    ids, gates = torch.randint(0, 2, (4, 3, 1)), torch.rand(3, 1)
    got = vmap(lambda i: ops.molora_delta(x, A, B, i, gates))(ids)
    torch.testing.assert_close(
        got, torch.stack([molora_delta_reference(x, A, B, i, gates) for i in ids]))
    hidden, packed = torch.randn(4, 2, 5, 3), torch.randn(4, 2, 2, 3)
    keep = torch.stack([torch.randperm(5)[:2] for _ in range(8)]).reshape(4, 2, 2)
    got = vmap(ops.gather_tokens)(hidden, keep)
    want = [gather_tokens_reference(h, k) for h, k in zip(hidden, keep, strict=True)]
    torch.testing.assert_close(got, torch.stack(want))
    got = vmap(ops.scatter_tokens)(hidden, packed, keep)
    torch.testing.assert_close(got, torch.stack(
        [scatter_tokens_reference(h, p, k) for h, p, k in zip(hidden, packed, keep, strict=True)]))


def test_flop_formula_of_the_fused_op():
    from torch.utils.flop_counter import FlopCounterMode

    T, d_in, d_out, E, r, k = 7, 16, 12, 4, 3, 2
    x, W = torch.randn(T, d_in), torch.randn(d_out, d_in)
    A, B = torch.randn(E, r, d_in), torch.randn(E, d_out, r)
    ids, gates = torch.randint(0, E, (T, k)), torch.rand(T, k)
    with FlopCounterMode(display=False) as counter:
        ops.molora_linear(x, W, None, A, B, ids, gates)
    assert counter.get_total_flops() == 2 * T * d_in * d_out + 2 * T * k * r * (d_in + d_out)


def test_torch_compile_dynamic_fullgraph():
    """Under dynamic=True the layer's scaling is a symbolic float: validated when eager,
    passed through while tracing (checking it broke the graph / failed fullgraph)."""
    torch._dynamo.reset()
    _, layer = make_layer()
    nn.init.normal_(layer.lora_B)
    compiled = torch.compile(lambda x: layer(x), fullgraph=True, dynamic=True,
                             backend="aot_eager")
    for T in (3, 5):
        x = torch.randn(T, 16)
        torch.testing.assert_close(compiled(x), layer(x))
    torch._dynamo.reset()


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_with_a_shared_routing_matches_plain_backward(reentrant):
    """The first (value-checked) forward and the recomputation save the same tensors:
    the check records no autograd graph on gates that require grad."""
    from torch.utils.checkpoint import checkpoint

    _, layer = make_layer()
    nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 3, 16, requires_grad=True)
    gates = torch.rand(6, 2, requires_grad=True)
    rank_scale = torch.rand(6, 3, requires_grad=True)
    ids = torch.randint(0, 4, (6, 2))
    leaves = (x, layer.lora_A, layer.lora_B, gates, rank_scale)
    grads = []
    for ckpt in (True, False):
        routing = Routing(ids, gates, rank_scale)  # a new decision: not yet value-checked
        y = (checkpoint(layer, x, routing, use_reentrant=reentrant) if ckpt
             else layer(x, routing))
        y.pow(2).sum().backward()  # reentrant checkpointing refuses torch.autograd.grad
        grads.append([t.grad.clone() for t in leaves])
        for t in leaves:
            t.grad = None
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize("smora", [False, True])
def test_zero_in_features_base_runs_with_its_own_router(smora):
    """d_in = 0 (as nn.Linear allows, and the ops): the router flattens x without -1."""
    from datalora.smora import SMoRALinear

    base = nn.Linear(0, 5)
    layer = (SMoRALinear(base, total_rank=4, active_ranks=2) if smora
             else MoLoRALinear(base, num_experts=4, rank=2, top_k=2))
    x = torch.randn(2, 3, 0, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, base(x))
    y.sum().backward()


@pytest.mark.parametrize("smora", [False, True])
@pytest.mark.parametrize(("x", "error", "fragment"), [
    (torch.randn(3, 7), ValueError, "in_features=16"),      # wrong d_in
    (torch.tensor(1.0), ValueError, "in_features=16"),      # 0-d
    (torch.ones(3, 16, dtype=torch.long), ValueError, "floating dtype"),
    ([1.0] * 16, TypeError, "torch.Tensor"),
])
def test_route_names_a_bad_x(smora, x, error, fragment):
    """The public ``route`` checks x as the forward does (it raised a matmul RuntimeError,
    an IndexError, or routed integer x)."""
    from datalora.smora import SMoRALinear

    base = nn.Linear(16, 12)
    layer = (SMoRALinear(base, total_rank=4, active_ranks=2) if smora
             else MoLoRALinear(base, num_experts=4, rank=3, top_k=2))
    with pytest.raises(error, match=f"x: .*{fragment}"):
        layer.route(x)


@pytest.mark.parametrize("autocast", [False, True])
def test_a_replaced_router_keeps_its_bias_when_x_has_another_dtype(autocast):
    """A router swapped for an ``nn.Linear`` with a bias: the logits in x's dtype (fp32
    LoRA parameters on a bf16 base, or autocast) still add the bias (it was dropped)."""
    dtype = torch.float32 if autocast else torch.bfloat16
    base = nn.Linear(16, 12, dtype=dtype)
    layer = MoLoRALinear(base, num_experts=4, rank=3, top_k=1, dtype=torch.float32)
    layer.router = nn.Linear(16, 4)
    with torch.no_grad():
        layer.router.bias.copy_(torch.tensor([0.0, 0.0, 100.0, 0.0]))  # expert 2 always
    x = torch.randn(6, 16, dtype=dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        layer(x)
    assert (layer.last_routing.expert_ids == 2).all()
