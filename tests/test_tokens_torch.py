"""``gather_tokens`` / ``scatter_tokens`` (torch backend) vs reference and autograd."""

from __future__ import annotations

import pytest
import torch

from datalora import ops
from datalora.reference import gather_tokens_reference, scatter_tokens_reference


def make(Bsz=3, L=11, K=5, d=7, dtype=torch.float64):
    hidden = torch.randn(Bsz, L, d, dtype=dtype, requires_grad=True)
    keep = torch.stack([torch.randperm(L)[:K].sort().values for _ in range(Bsz)])
    packed = torch.randn(Bsz, K, d, dtype=dtype, requires_grad=True)
    weight = torch.rand(Bsz, K, dtype=dtype, requires_grad=True)
    return hidden, keep, packed, weight


def test_gather_hand_case():
    hidden = torch.arange(12.0).view(1, 4, 3)
    packed = ops.gather_tokens(hidden, torch.tensor([[3, 1]]))
    assert packed.tolist() == [[[9.0, 10.0, 11.0], [3.0, 4.0, 5.0]]]


def test_gather_of_a_repeated_position_sums_both_gradients():
    """gather accepts a position twice (only scatter needs distinct ones): the backward
    adds both packed rows' gradients into that hidden row."""
    hidden = torch.zeros(1, 4, 2, requires_grad=True)
    packed = ops.gather_tokens(hidden, torch.tensor([[2, 0, 2]]))
    packed.backward(torch.tensor([[[1.0, 2.0], [3.0, 4.0], [10.0, 20.0]]]))
    assert hidden.grad.tolist() == [[[3.0, 4.0], [0.0, 0.0], [11.0, 22.0], [0.0, 0.0]]]


def test_scatter_hand_case():
    hidden = torch.zeros(1, 3, 2)
    packed = torch.ones(1, 1, 2) * 4
    out = ops.scatter_tokens(hidden, packed, torch.tensor([[1]]), torch.tensor([[0.25]]))
    assert out.tolist() == [[[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]]]


@pytest.mark.parametrize("K", [0, 1, 5, 11])  # nothing kept, one, some, all
@pytest.mark.parametrize("with_weight", [False, True])
def test_scatter_and_gather_match_reference(K, with_weight):
    hidden, keep, packed, weight = make(K=K)
    w = weight if with_weight else None
    out = ops.scatter_tokens(hidden, packed, keep, w)
    ref = scatter_tokens_reference(hidden, packed, keep, w)
    torch.testing.assert_close(out, ref)
    leaves = [hidden, packed] + ([weight] if with_weight else [])
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(ref, leaves, g),
                    strict=True):
        torch.testing.assert_close(a, b)
    p = ops.gather_tokens(hidden, keep)
    torch.testing.assert_close(p, gather_tokens_reference(hidden, keep))
    gp = torch.randn_like(p)
    torch.testing.assert_close(torch.autograd.grad(p, hidden, gp)[0],
                               torch.autograd.grad(gather_tokens_reference(hidden, keep), hidden,
                                                   gp)[0])


@pytest.mark.parametrize("with_weight", [False, True])
def test_a_16_bit_scatter_makes_no_fp32_copy_of_the_whole_sequence(with_weight):
    """The scatter upcast all of hidden [B, L, d] to fp32 and back to change K rows: three
    full-size tensors per call. Only the kept rows are computed in fp32 now, with the same
    values (hidden's other rows pass through as they are)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class FullSizeFp32(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32 \
                        and t.shape == (2, 40, 24):
                    self.seen.append(func)
            return out

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 40, 24, generator=g).bfloat16()
    packed = torch.randn(2, 5, 24, generator=g).bfloat16()
    idx = torch.tensor([[0, 3, 9, 20, 39], [1, 2, 5, 30, 31]])
    weight = torch.rand(2, 5, generator=g) if with_weight else None
    from datalora.ops import torch_backend

    with FullSizeFp32() as mode:  # the backend itself (the op would dispatch as one call)
        out = torch_backend.scatter_tokens(hidden, packed, idx, weight)
    assert mode.seen == []
    # the fp32 result rounded once: kept rows as computed, the others hidden's own values
    want = scatter_tokens_reference(hidden.float(), packed.float(), idx, weight).bfloat16()
    assert torch.equal(out, want)


def test_gradcheck_and_opcheck():
    hidden, keep, packed, weight = make(Bsz=2, L=5, K=3, d=3)
    assert torch.autograd.gradcheck(lambda h, p, w: ops.scatter_tokens(h, p, keep, w),
                                    (hidden, packed, weight))
    assert torch.autograd.gradcheck(lambda h: ops.gather_tokens(h, keep), (hidden,))
    torch.library.opcheck(torch.ops.datalora.scatter_tokens.default,
                          (hidden, packed, keep, weight, "torch"))
    torch.library.opcheck(torch.ops.datalora.gather_tokens.default, (hidden, keep, "torch"))


def _token_ops_values_and_grads(hidden, keep, packed, weight):
    out = ops.scatter_tokens(hidden, packed, keep, weight)
    gathered = ops.gather_tokens(out, keep)
    loss = (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum() \
        + (gathered ** 2).sum()
    grads = torch.autograd.grad(loss, (hidden, packed, weight))
    return [out.detach(), gathered.detach(), *grads]


def test_eager_token_ops_skip_the_dispatcher_and_equal_the_custom_ops_bitwise(monkeypatch):
    """Eager mode runs gather / scatter through autograd.Functions (no custom-op dispatch,
    forward or backward); forced through the registered ops, values and gradients are
    bit-identical."""
    from datalora.ops import tokens

    hidden, keep, packed, weight = make(L=13, K=6, dtype=torch.float32)
    called = []
    for name in ("_gather_op", "_scatter_op"):
        real = getattr(tokens, name)
        monkeypatch.setattr(tokens, name, lambda *a, _r=real, _n=name: called.append(_n) or _r(*a))
    eager = _token_ops_values_and_grads(hidden, keep, packed, weight)
    assert called == []
    with torch.no_grad():  # no autograd: the backend's kernel alone
        assert torch.equal(ops.gather_tokens(hidden, keep), gather_tokens_reference(hidden, keep))
    assert called == []
    monkeypatch.setattr(tokens, "tracing", lambda *tensors: True)
    dispatched = _token_ops_values_and_grads(hidden, keep, packed, weight)
    # forward: scatter + gather; backward: gather's scatter-add is plain torch, scatter's
    # backward gathers twice and scatters once
    assert sorted(called) == ["_gather_op"] * 3 + ["_scatter_op"] * 2
    for a, b in zip(eager, dispatched, strict=True):
        assert torch.equal(a, b)


def test_token_ops_double_backward():
    """A backward recorded with create_graph=True (gradient penalties) is differentiable
    again: the second-order gradients match the reference's."""
    hidden, keep, packed, weight = make(Bsz=2, L=6, K=3, d=4)

    def penalty(fn):
        out = fn(hidden, packed, keep, weight)
        g = torch.autograd.grad((out ** 3).sum(), (hidden, packed, weight), create_graph=True)
        return torch.autograd.grad(sum((t ** 2).sum() for t in g), (hidden, packed, weight))

    for a, b in zip(penalty(ops.scatter_tokens), penalty(scatter_tokens_reference), strict=True):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradgradcheck(lambda h, p, w: ops.scatter_tokens(h, p, keep, w),
                                        (hidden, packed, weight))
    assert torch.autograd.gradgradcheck(lambda h: ops.gather_tokens(h, keep), (hidden,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unchecked_out_of_range_positions_are_clamped(dtype):
    # as the triton kernels (fp64 runs this backend under backend="triton" too): positions
    # L and -1 act as L-1 and 0, never an out-of-bounds read
    hidden, packed = torch.randn(2, 6, 4, dtype=dtype), torch.randn(2, 2, 4, dtype=dtype)
    bad, clamped = torch.tensor([[9, -1], [1, 2**32 + 1]]), torch.tensor([[5, 0], [1, 5]])
    torch.testing.assert_close(ops.gather_tokens(hidden, bad, check_values=False),
                               gather_tokens_reference(hidden, clamped), rtol=0, atol=0)
    torch.testing.assert_close(ops.scatter_tokens(hidden, packed, bad, check_values=False),
                               scatter_tokens_reference(hidden, packed, clamped), rtol=0, atol=0)


def test_unchecked_out_of_range_positions_are_clamped_in_the_backward():
    # the gather's backward (a scatter-add) clamps the positions as the forward does
    hidden = torch.randn(2, 6, 4, requires_grad=True)
    bad, clamped = torch.tensor([[9, -1], [1, 2**32 + 1]]), torch.tensor([[5, 0], [1, 5]])
    grad = torch.randn(2, 2, 4)
    ops.gather_tokens(hidden, bad, check_values=False).backward(grad)
    want = torch.zeros(2, 6, 4).scatter_add_(1, clamped[..., None].expand(-1, -1, 4), grad)
    torch.testing.assert_close(hidden.grad, want, rtol=0, atol=0)


def test_pruned_rows_pass_through_exactly():
    hidden, keep, packed, weight = make(dtype=torch.float32)
    out = ops.scatter_tokens(hidden, packed, keep, weight)
    mask = torch.ones(hidden.shape[:2], dtype=torch.bool)
    mask.scatter_(1, keep, False)
    assert torch.equal(out[mask], hidden[mask])


def test_scatter_with_unit_weight_writes_packed_rows_exactly_in_bf16():
    """``hidden + 1 * (packed - hidden)`` is computed in fp32 and rounded once: the kept rows
    are the packed rows bit for bit (in bf16 arithmetic they were up to an ulp off)."""
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(2, 16, 64, generator=g) * 30).to(torch.bfloat16)
    packed = torch.randn(2, 8, 64, generator=g).to(torch.bfloat16)
    keep = torch.stack([torch.randperm(16, generator=g)[:8] for _ in range(2)])
    out = ops.scatter_tokens(hidden, packed, keep, torch.ones(2, 8), backend="torch")
    assert torch.equal(ops.gather_tokens(out, keep, backend="torch"), packed)


def _far_apart_rows(dtype=torch.float32):
    """hidden rows ~1e3, packed rows ~1e-3: ``h + 1 * (p - h)`` in fp32 loses p entirely."""
    g = torch.Generator().manual_seed(1)
    hidden = (torch.randn(2, 12, 8, generator=g) * 1e3).to(dtype)
    packed = (torch.randn(2, 5, 8, generator=g) * 1e-3).to(dtype)
    keep = torch.stack([torch.randperm(12, generator=g)[:5] for _ in range(2)])
    return hidden, packed, keep


def scatter_is_exact_at_weights_0_and_1(backend):
    """No weight and weight 1 write the packed rows bit for bit, weight 0 keeps hidden's
    (fp32: kept rows far from their hidden rows used to come out ~1 % off); the backward's
    kept-row gradient ``(1 - w) g`` is computed, not rebuilt from ``g``."""
    hidden, packed, keep = _far_apart_rows()
    ones, zeros = torch.ones(2, 5), torch.zeros(2, 5)
    for weight in (None, ones):
        out = ops.scatter_tokens(hidden, packed, keep, weight, backend=backend)
        assert torch.equal(ops.gather_tokens(out, keep, backend=backend), packed)
    out = ops.scatter_tokens(hidden, packed, keep, zeros, backend=backend)
    assert torch.equal(out, hidden)
    h = hidden.clone().requires_grad_(True)
    weight = torch.full((2, 5), 1 - 1e-6)
    grad = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(2)) * 1e3
    ops.scatter_tokens(h, packed, keep, weight, backend=backend).backward(grad)
    kept_grad = ops.gather_tokens(h.grad, keep, backend=backend)
    want = ops.gather_tokens(grad, keep, backend=backend) * (1 - weight)[..., None]
    torch.testing.assert_close(kept_grad, want, rtol=1e-6, atol=0)


def test_scatter_is_exact_at_weights_0_and_1():
    scatter_is_exact_at_weights_0_and_1("torch")


def test_scatter_fake_kernel_matches_a_non_contiguous_hidden():
    """The real op returns a contiguous tensor; the fake one kept a transposed hidden's
    strides (inductor then asserted on the strides)."""
    hidden = torch.randn(2, 4, 6).transpose(1, 2)
    packed, weight = torch.randn(2, 3, 4), torch.rand(2, 3)
    keep = torch.tensor([[0, 2, 5], [1, 3, 4]])
    torch.library.opcheck(torch.ops.datalora.scatter_tokens.default,
                          (hidden, packed, keep, weight, "torch"))
