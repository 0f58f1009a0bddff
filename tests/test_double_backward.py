"""Double backward (``create_graph=True``): gradient penalties and Hessian-vector products
through MoLoRA layers and ops equal the same computation written in plain torch."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from datalora import MoLoRALinear, ops
from datalora.reference import molora_delta_reference, molora_linear_reference
from datalora.routing import topk_routing


def _layer(k=2):
    torch.manual_seed(0)
    layer = MoLoRALinear(nn.Linear(12, 10), num_experts=4, rank=3, alpha=6, top_k=k)
    nn.init.normal_(layer.lora_B)  # as after training: the LoRA path matters
    return layer


def _reference_layer(layer, x):
    """The layer's forward in plain torch ops (same router, same routing function)."""
    routing = topk_routing(layer.router(x), layer.top_k)
    return molora_linear_reference(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B,
                                   routing.expert_ids, routing.gates, None, layer.scaling)


def _penalty_grads(forward, params, x, target):
    """Gradients of ``||d sum(y^2) / d target||^2`` w.r.t. ``params`` and ``x``."""
    y = forward(x)
    (g,) = torch.autograd.grad(y.pow(2).sum(), target(x), create_graph=True)
    return torch.autograd.grad(g.pow(2).sum(), [*params, x], allow_unused=True)


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("wrt", ["lora_A", "lora_B", "x"])
def test_gradient_penalty_through_layer_matches_plain_torch(k, wrt):
    layer = _layer(k)
    params = [layer.lora_A, layer.lora_B, layer.router.weight]
    x = torch.randn(7, 12, requires_grad=True)
    target = (lambda x: x) if wrt == "x" else (lambda x: getattr(layer, wrt))
    got = _penalty_grads(layer, params, x, target)
    want = _penalty_grads(lambda x: _reference_layer(layer, x), params, x, target)
    for name, g, w in zip(["lora_A", "lora_B", "router", "x"], got, want, strict=True):
        if w is None:
            assert g is None or not g.any(), name
        else:
            torch.testing.assert_close(g, w, atol=1e-5 * w.abs().max(), rtol=1e-4, msg=name)


@pytest.mark.parametrize("fused", [True, False])
def test_hessian_vector_product_of_the_ops(fused):
    """``molora_linear`` / ``molora_delta`` with rank_scale and a repeated expert: the HVP
    over every differentiable input equals the reference's."""
    torch.manual_seed(1)
    T, d_in, d_out, E, r = 5, 6, 4, 3, 2
    x, W = torch.randn(T, d_in), torch.randn(d_out, d_in)
    A, B = torch.randn(E, r, d_in), torch.randn(E, d_out, r)
    ids = torch.tensor([[0, 2], [1, 1], [2, 0], [0, 1], [2, 2]])
    gates, rs = torch.rand(T, 2), torch.rand(T, r)
    inputs = (x, W, A, B, gates, rs)
    vectors = tuple(torch.randn_like(t) for t in inputs)

    def ours(x, W, A, B, gates, rs):
        if fused:
            y = ops.molora_linear(x, W, None, A, B, ids, gates, rs, scaling=1.5)
        else:
            y = x @ W.T + ops.molora_delta(x, A, B, ids, gates, rs, scaling=1.5)
        return y.sin().sum()

    def reference(x, W, A, B, gates, rs):
        return molora_linear_reference(x, W, None, A, B, ids, gates, rs, 1.5).sin().sum()

    _, got = torch.autograd.functional.hvp(ours, inputs, vectors)
    _, want = torch.autograd.functional.hvp(reference, inputs, vectors)
    for name, g, w in zip(["x", "W", "A", "B", "gates", "rank_scale"], got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4, msg=name)


def test_first_order_backward_is_unchanged_by_grad_mode_outside():
    """A plain backward (no create_graph) still takes the backend's own backward."""
    torch.manual_seed(2)
    x = torch.randn(6, 8, requires_grad=True)
    A = torch.randn(4, 2, 8, requires_grad=True)
    B = torch.randn(4, 5, 2, requires_grad=True)
    ids, gates = torch.randint(0, 4, (6, 2)), torch.rand(6, 2)
    ops.molora_delta(x, A, B, ids, gates).pow(2).sum().backward()
    ref = [t.detach().clone().requires_grad_() for t in (x, A, B)]
    molora_delta_reference(*ref, ids, gates).pow(2).sum().backward()
    for t, r in zip((x, A, B), ref, strict=True):
        torch.testing.assert_close(t.grad, r.grad)
        assert t.grad.grad_fn is None


def test_gradient_penalty_on_the_weight_when_x_needs_no_gradient():
    """A weight that requires grad with an x that does not (the weight is still needed to
    differentiate its own gradient again)."""
    torch.manual_seed(3)
    x, ids, gates = torch.randn(5, 6), torch.randint(0, 3, (5, 2)), torch.rand(5, 2)
    W, A = torch.randn(4, 6, requires_grad=True), torch.randn(3, 2, 6, requires_grad=True)
    B = torch.randn(3, 4, 2)

    def penalty(linear):
        (dW,) = torch.autograd.grad(linear(x, W, None, A, B, ids, gates).sin().sum(), W,
                                    create_graph=True)
        return torch.autograd.grad(dW.pow(2).sum(), [W, A])

    for g, w in zip(penalty(ops.molora_linear), penalty(molora_linear_reference), strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
