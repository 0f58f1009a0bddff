"""SMoRA: rank-wise experts equal a single LoRA of the total rank when all are active."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from datalora.layers import MoLoRALinear
from datalora.routing import Routing
from datalora.smora import SMoRALinear, smora_linear


def make(R=6, k=6, gate="one", d_in=11, d_out=7, bias=True):
    torch.manual_seed(0)
    layer = smora_linear(nn.Linear(d_in, d_out, bias=bias), R, k, alpha=12.0, gate=gate)
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.router.weight.normal_()
    return layer


@pytest.mark.parametrize("shape", [(5, 11), (2, 3, 11), (1, 11)])  # batch dims, T = 1
def test_all_ranks_active_equals_single_lora(shape):
    layer = make()
    x = torch.randn(*shape)
    A, B = layer.lora_weights()
    assert A.shape == (6, 11) and B.shape == (7, 6)
    want = layer.base_layer(x) + (12.0 / 6) * (x @ A.T) @ B.T
    torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)
    # the same as a one-expert MoLoRA of rank R holding that LoRA
    lora = MoLoRALinear(layer.base_layer, num_experts=1, rank=6, alpha=12.0, router=False,
                        top_k=1)
    with torch.no_grad():
        lora.lora_A.copy_(A[None])
        lora.lora_B.copy_(B[None])
    T = x[..., 0].numel()
    one = Routing(torch.zeros(T, 1, dtype=torch.long), torch.ones(T, 1))
    torch.testing.assert_close(layer(x), lora(x, one), atol=1e-5, rtol=1e-5)


def test_top_k_uses_only_selected_ranks():
    layer = make(R=6, k=2)
    x = torch.randn(4, 11)
    y = layer(x)
    ids = layer.last_routing.expert_ids
    assert ids.shape == (4, 2)
    assert torch.equal(layer.last_routing.gates, torch.ones(4, 2))
    A, B = layer.lora_weights()
    for t in range(4):
        m = torch.zeros(6)
        m[ids[t]] = 1.0
        want = layer.base_layer(x[t]) + 2.0 * B @ (m * (A @ x[t]))
        torch.testing.assert_close(y[t], want, atol=1e-5, rtol=1e-5)


def test_gates_and_gradients():
    layer = make(R=5, k=3, gate="softmax")
    x = torch.randn(4, 11)
    layer(x).sum().backward()
    torch.testing.assert_close(layer.last_routing.gates.sum(-1), torch.ones(4))
    layer_one = make(R=5, k=3, gate="one")
    layer_one(x).pow(2).sum().backward()
    assert layer_one.router.weight.grad is not None  # straight-through reaches the router
    assert layer_one.router.weight.grad.abs().sum() > 0
    assert layer_one.lora_A.grad.abs().sum() > 0


def test_softmax_gates_with_one_active_rank_still_train_the_router():
    """gate="softmax", k = 1: top / top.sum() is the constant 1, so the router got no
    gradient and never trained (MoLoRALinear's top-1 routing keeps d log p)."""
    layer = make(R=6, k=1, gate="softmax")
    twin = MoLoRALinear(layer.base_layer, num_experts=6, rank=1, alpha=12.0 / 6, top_k=1)
    twin.load_state_dict(layer.state_dict())
    x = torch.randn(10, 11)
    layer(x).pow(2).sum().backward()
    twin(x).pow(2).sum().backward()
    assert layer.router.weight.grad.abs().sum() > 1e-2
    torch.testing.assert_close(layer.router.weight.grad, twin.router.weight.grad)


def test_all_ranks_active_has_the_loras_input_gradient():
    """gate="one" with every rank active: the straight-through term sent a surrogate
    router gradient into x.grad (2 % off the rank-R LoRA's), though the output does not
    depend on the router."""
    layer = make(R=4, k=4, d_in=8, d_out=5)
    x = torch.randn(3, 8, requires_grad=True)
    layer(x).pow(2).sum().backward()
    A, B = (t.detach() for t in layer.lora_weights())
    x2 = x.detach().clone().requires_grad_()
    (layer.base_layer(x2) + (12.0 / 4) * (x2 @ A.T) @ B.T).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    assert layer.router.weight.grad is None or not layer.router.weight.grad.any()


def test_active_ranks_is_top_k_and_is_checked():
    """Setting top_k after construction was ignored (active_ranks was read), and an
    active_ranks above the total rank failed in torch.topk."""
    layer = make(R=6, k=2)
    layer.top_k = 4
    layer(torch.randn(3, 11))
    assert layer.active_ranks == 4 and layer.last_routing.expert_ids.shape == (3, 4)
    assert "active_ranks=4" in repr(layer)
    layer.active_ranks = 3
    assert layer.top_k == 3
    with pytest.raises(ValueError, match=r"active_ranks: expected an int in \[1, 6\], got 7"):
        layer.active_ranks = 7
    layer.top_k = 7
    with pytest.raises(ValueError, match=r"active_ranks: expected an int 1 <= active_ranks "
                                         r"<= num_experts=6, got 7"):
        layer(torch.randn(3, 11))


def test_router_logits_in_the_inputs_dtype_as_molora():
    """A bf16 x over an fp32 router: SMoRA computed the logits on an fp32 copy of x (saved
    for the router's backward, twice the size of x), unlike MoLoRALinear."""
    base = nn.Linear(11, 7).bfloat16()
    torch.manual_seed(0)
    layer = SMoRALinear(base, total_rank=6, active_ranks=2, alpha=12.0, dtype=torch.float32)
    twin = MoLoRALinear(base, num_experts=6, rank=1, alpha=2.0, top_k=2, dtype=torch.float32)
    twin.load_state_dict(layer.state_dict())
    x = torch.randn(4, 11).bfloat16()
    torch.testing.assert_close(layer.route(x).router_probs, twin.route(x).router_probs,
                               rtol=0, atol=0)


def test_validation():
    with pytest.raises(ValueError, match="active_ranks"):
        SMoRALinear(nn.Linear(4, 4), total_rank=4, active_ranks=5)
    with pytest.raises(ValueError, match="total_rank"):
        SMoRALinear(nn.Linear(4, 4), total_rank=0, active_ranks=1)
    with pytest.raises(ValueError, match="gate"):
        SMoRALinear(nn.Linear(4, 4), total_rank=4, active_ranks=2, gate="sigmoid")
    with pytest.raises(TypeError, match="base_layer"):
        SMoRALinear(nn.Conv1d(4, 4, 1), total_rank=4, active_ranks=2)
    for alpha, fragment in ((-1.0, "alpha: expected > 0, got -1.0"),
                            (float("nan"), "alpha: expected a finite number")):
        with pytest.raises(ValueError, match=fragment):
            SMoRALinear(nn.Linear(4, 4), total_rank=4, active_ranks=2, alpha=alpha)


@pytest.mark.parametrize("kwarg", ["router", "top_k", "num_experts", "rank"])
def test_rejects_molora_kwargs_it_sets_itself(kwarg):
    with pytest.raises(TypeError, match=rf"SMoRALinear: unexpected keyword argument {kwarg}= "
                                        r"\(set by the rank-wise layer: use total_rank= and "
                                        r"active_ranks=\)"):
        SMoRALinear(nn.Linear(4, 4), total_rank=4, active_ranks=2, **{kwarg: 3})


def test_smora_attribute_names_gate_and_unknown_keywords():
    import torch.nn as nn

    from datalora import SMoRALinear

    s = SMoRALinear(nn.Linear(8, 8), total_rank=16, active_ranks=4, alpha=32)
    assert (s.lora_alpha, s.total_rank, s.active_ranks) == (32.0, 16, 4)
    assert s.scaling == 32 / 16 == s.alpha / s.rank  # the per-rank-1-expert view agrees
    with pytest.raises(TypeError, match="SMoRALinear: unexpected keyword argument bogus="):
        SMoRALinear(nn.Linear(8, 8), bogus=1)
    s.gate = "bogus"
    with pytest.raises(ValueError, match="gate: expected one of"):
        s(torch.randn(2, 8))


def test_far_apart_router_logits_still_select_the_best_ranks():
    """Logit gaps over ~104 underflow the fp32 softmax to ties at 0: the ranks are chosen
    on the logits (gate "one" would otherwise give an arbitrary rank gate 1)."""
    from datalora.routing import topk_routing

    logits = torch.tensor([[0.0, 5.0, -300.0, 200.0, 1.0]])
    assert topk_routing(logits, 3).expert_ids.tolist() == [[3, 1, 4]]
    layer = SMoRALinear(nn.Linear(5, 3), total_rank=5, active_ranks=2)
    with torch.no_grad():
        layer.router.weight.copy_(torch.diag(logits[0]))
    routing = layer.route(torch.ones(1, 5))
    assert routing.expert_ids.tolist() == [[3, 1]]
    assert torch.equal(routing.gates, torch.ones(1, 2))


@pytest.mark.parametrize("smora", [False, True])
def test_float64_layer_with_its_own_router_passes_gradcheck(smora):
    """A float64 layer routes in float64 (its softmax was fp32: finite differences of the
    router's gates then disagreed with autograd by a few percent)."""
    torch.manual_seed(0)
    base = nn.Linear(5, 4).double()
    layer = (SMoRALinear(base, total_rank=4, active_ranks=2, gate="softmax") if smora
             else MoLoRALinear(base, num_experts=3, rank=2, top_k=2, backend="torch"))
    nn.init.normal_(layer.lora_B)
    with torch.no_grad():
        layer.router.weight.mul_(50)  # gates far from uniform: the router gradient matters
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))
