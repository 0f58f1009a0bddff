"""Expert-minor storage of B (``datalora.ops.layout``): B_all is a view, dB keeps B's
strides, every backend gives the same values whatever B's layout, and
``use_expert_minor_b`` switches a model over."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from datalora import MoLoRALinear, ops
from datalora.ops.layout import (
    expert_columns,
    expert_columns_grad,
    expert_minor,
    use_expert_minor_b,
)
from datalora.reference import molora_linear_reference


def _layouts(B: torch.Tensor) -> dict[str, torch.Tensor]:
    """B ``[E, d_out, r]`` as contiguous, expert-minor and expanded (non-dense) tensors."""
    minor = expert_minor(B)
    expanded = B[:1].expand(*B.shape)  # every expert shares one storage: not dense
    return {"contiguous": B.contiguous(), "expert_minor": minor, "expanded": expanded}


def test_expert_minor_copy_makes_expert_columns_a_view():
    B0 = torch.randn(3, 5, 4, dtype=torch.float64)
    B = expert_minor(B0)
    assert B.shape == (3, 5, 4) and B.stride() == (4, 12, 1) and torch.equal(B, B0)
    columns = expert_columns(B)
    assert columns.data_ptr() == B.data_ptr() and columns.shape == (5, 12)
    for e in range(3):
        assert torch.equal(columns[:, e * 4:(e + 1) * 4], B[e])
    assert torch.equal(expert_columns(B0), columns)
    assert expert_columns(B0).data_ptr() != B0.data_ptr()  # a copy


@pytest.mark.parametrize("layout", ["contiguous", "expert_minor", "expanded"])
def test_expert_columns_grad_has_the_strides_of_b(layout):
    torch.manual_seed(0)
    E, d_out, r, T = 3, 7, 5, 11
    B = _layouts(torch.randn(E, d_out, r))[layout]
    dy, zs = torch.randn(T, d_out), torch.randn(T, E * r)
    dB = expert_columns_grad(dy, zs, B)
    want = (dy.t() @ zs).view(d_out, E, r).transpose(0, 1)
    assert dB.stride() == torch.empty_like(B).stride()
    torch.testing.assert_close(dB, want)
    assert torch.equal(expert_columns_grad(dy[:0], zs[:0], B), torch.zeros(E, d_out, r))


def test_use_expert_minor_b_switches_a_model_in_place_and_trains_the_same():
    """The same parameter objects and values, expert-minor; a training step (AdamW, fused)
    gives the contiguous model's parameters; the state dict round-trips bit-exact."""
    torch.manual_seed(4)

    def model():
        torch.manual_seed(5)
        net = torch.nn.Sequential(MoLoRALinear(torch.nn.Linear(6, 10), num_experts=4, rank=3),
                                  MoLoRALinear(torch.nn.Linear(10, 6), num_experts=4, rank=3))
        with torch.no_grad():
            for layer in net:
                layer.lora_B.normal_()
        return net

    plain, minor = model(), model()
    params = [layer.lora_B for layer in minor]
    assert all(p.is_contiguous() for p in params)  # the default layout
    assert use_expert_minor_b(minor) == 2 and use_expert_minor_b(minor) == 0
    for layer, p, q in zip(minor, params, plain, strict=True):
        assert layer.lora_B is p and p.stride() == (3, 3 * 4, 1) and p.requires_grad
        assert torch.equal(p, q.lora_B)
        assert expert_columns(p).data_ptr() == p.data_ptr()
    x = torch.randn(7, 6)
    for net in (plain, minor):
        opt = torch.optim.AdamW(net.parameters(), lr=0.1, fused=True)
        net(x).square().sum().backward()
        opt.step()
    for a, b in zip(plain.parameters(), minor.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    assert all(layer.lora_B.stride() == (3, 12, 1) for layer in minor)
    state = {k: v.clone() for k, v in minor.state_dict().items()}
    fresh = model()
    use_expert_minor_b(fresh)
    fresh.load_state_dict(state)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())
    assert all(layer.lora_B.stride() == (3, 12, 1) for layer in fresh)


@pytest.mark.parametrize("strategy", ["dense", "grouped"])
@pytest.mark.parametrize("layout", ["contiguous", "expert_minor", "expanded"])
def test_torch_backend_values_and_grads_match_the_reference_in_every_layout(layout, strategy,
                                                                            monkeypatch):
    monkeypatch.setenv("DATALORA_SHRINK_STRATEGY", strategy)
    torch.manual_seed(1)
    T, d_in, d_out, E, r, k = 13, 6, 9, 4, 3, 2
    x = torch.randn(T, d_in, dtype=torch.float64, requires_grad=True)
    W = torch.randn(d_out, d_in, dtype=torch.float64)
    A = torch.randn(E, r, d_in, dtype=torch.float64, requires_grad=True)
    base = torch.randn(E, d_out, r, dtype=torch.float64)
    B = _layouts(base)[layout].requires_grad_(layout != "expanded")
    ids = torch.rand(T, E).argsort(-1)[:, :k]
    gates = torch.rand(T, k, dtype=torch.float64)
    gy = torch.randn(T, d_out, dtype=torch.float64)
    y = ops.molora_linear(x, W, None, A, B, ids, gates, None, 1.5, backend="torch")
    y.backward(gy)
    xr, Ar, Br = (t.detach().contiguous().requires_grad_(True) for t in (x, A, B))
    want = molora_linear_reference(xr, W, None, Ar, Br, ids, gates, None, 1.5)
    want.backward(gy)
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(A.grad, Ar.grad)
    if B.requires_grad:
        torch.testing.assert_close(B.grad, Br.grad)
        assert B.grad.stride() == B.stride()  # accumulated without a layout copy


def _copies(step) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return sum(e.name == "aten::copy_" for e in prof.events())  # clones included


def test_expert_minor_b_saves_the_three_layout_copies_on_the_torch_backend():
    """Forward's B_all, backward's B_all and dB's transpose: three copies a contiguous B
    costs per call, none for an expert-minor one (the rest of the call is the same)."""
    torch.manual_seed(2)
    x = torch.randn(8, 6, requires_grad=True)
    W, A = torch.randn(5, 6), torch.randn(4, 3, 6, requires_grad=True)
    ids, gates = torch.rand(8, 4).argsort(-1)[:, :2], torch.rand(8, 2)
    layouts = _layouts(torch.randn(4, 5, 3))

    def step(B):
        B = B.detach().requires_grad_(True)
        return lambda: ops.molora_linear(x, W, None, A, B, ids, gates, None, 2.0,
                                         backend="torch", check_values=False).sum().backward()

    step(layouts["contiguous"])()  # warm up
    contiguous, minor = _copies(step(layouts["contiguous"])), _copies(step(layouts["expert_minor"]))
    assert contiguous - minor == 3, (contiguous, minor)


def test_opcheck_with_expert_minor_b():
    """The fake backward gives dB B's strides, as the backends do."""
    torch.manual_seed(3)
    x = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    A = torch.randn(4, 3, 6, dtype=torch.float64, requires_grad=True)
    B = expert_minor(torch.randn(4, 5, 3, dtype=torch.float64)).requires_grad_(True)
    ids, gates = torch.rand(9, 4).argsort(-1)[:, :2], torch.rand(9, 2, dtype=torch.float64)
    torch.library.opcheck(torch.ops.datalora.molora_delta.default,
                          (x, A, B, ids, gates, None, 2.0, "torch"))
    _, h = torch.ops.datalora.molora_delta(x, A, B, ids, gates, None, 2.0, "torch")
    grad = torch.randn(9, 5, dtype=torch.float64)
    args = (grad, x.detach(), A.detach(), B.detach(), ids, gates, None, h.detach(), 2.0,
            "torch", [True, True, True, False, False])
    torch.library.opcheck(torch.ops.datalora.molora_delta_backward.default, args)


DDP_EXPERT_MINOR_SCRIPT = r'''
import sys
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from datalora import MoLoRALinear
from datalora.ops.layout import use_expert_minor_b
dist.init_process_group("gloo")
torch.manual_seed(0)
net = torch.nn.Sequential(MoLoRALinear(torch.nn.Linear(8, 8), num_experts=4, rank=2))
with torch.no_grad():
    net[0].lora_B.normal_()
assert use_expert_minor_b(net) == 1
ddp = DistributedDataParallel(net)
opt = torch.optim.AdamW(ddp.parameters(), lr=0.1)
torch.manual_seed(dist.get_rank() + 1)  # different data per rank: the gradients are averaged
ddp(torch.randn(5, 8)).square().sum().backward()
opt.step()
B = net[0].lora_B.detach()
assert B.stride() == (2, 8, 1), B.stride()
gathered = [torch.empty(B.shape) for _ in range(2)]
dist.all_gather(gathered, B.contiguous())
assert torch.equal(gathered[0], gathered[1]), "ranks diverged"
print("DDP-MINOR-OK", dist.get_rank())
'''


def test_ddp_trains_an_expert_minor_b_on_two_cpu_processes(tmp_path):
    """DDP takes the non-contiguous parameter (FSDP2 does not: the layout is opt-in)."""
    from test_trainer import CLEAN_EXIT, run_torchrun

    out = run_torchrun(tmp_path, DDP_EXPERT_MINOR_SCRIPT + CLEAN_EXIT, 29536)
    assert out.count("DDP-MINOR-OK") == 2
