"""Triton token gather / scatter (fused weighted residual bypass) vs the torch reference,
forward and backward, through the public ops (interpreter on the CPU)."""

from __future__ import annotations

import pytest
import torch

from datalora import ops
from datalora.ops import triton_backend as tb
from datalora.reference import gather_tokens_reference, scatter_tokens_reference

# (B, L, K, d)
SHAPES = [
    (2, 10, 5, 37),     # odd d, d < BLOCK_D
    (3, 7, 7, 130),     # keep everything; d just over one block
    (1, 1, 1, 16),      # single token
    (2, 9, 0, 8),       # keep nothing: pure residual bypass
]
DTYPES = [(torch.float32, 1e-6), (torch.float16, 1e-3)]


def _keep(Bsz, L, K, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(L, generator=gen)[:K] for _ in range(Bsz)])
    return idx.reshape(Bsz, K).to(device)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("weighted", [True, False])
def test_gather_scatter_forward_backward(shape, dtype, tol, weighted, device):
    Bsz, L, K, d = shape
    hidden = torch.randn(Bsz, L, d, device=device).to(dtype)
    packed_in = torch.randn(Bsz, K, d, device=device).to(dtype)
    weight = (torch.rand(Bsz, K, device=device) + 0.5) if weighted else None
    keep = _keep(Bsz, L, K, device)

    def run(backend):
        h = hidden.clone().requires_grad_(True)
        p = packed_in.clone().requires_grad_(True)
        w = None if weight is None else weight.clone().requires_grad_(True)
        if backend == "reference":
            packed = gather_tokens_reference(h, keep)
            out = scatter_tokens_reference(h, p + packed, keep, w)
        else:
            packed = ops.gather_tokens(h, keep, backend=backend)
            out = ops.scatter_tokens(h, p + packed, keep, w, backend=backend)
        gen = torch.Generator().manual_seed(1)
        gy = torch.randn(out.shape, generator=gen).to(out)
        (out.float() * gy.float()).sum().backward()
        return packed.detach(), out.detach(), h.grad, p.grad, None if w is None else w.grad

    got, want = run("triton"), run("reference")
    for name, a, b in zip(("packed", "out", "dhidden", "dpacked", "dweight"), got, want,
                          strict=True):
        if b is None:
            assert a is None
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * 4,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_non_contiguous_and_bypass_rows(device):
    base = torch.randn(2, 12, 2 * 20, device=device)
    hidden = base[..., ::2]                            # stride 2 along d
    packed = torch.randn(2, 20, 4, device=device).transpose(1, 2)  # [2, 4, 20], non-contig
    keep = torch.tensor([[0, 11, 5, 3], [2, 1, 7, 9]], device=device, dtype=torch.int32)
    weight = torch.rand(2, 4, device=device).t().contiguous().t()
    assert not (hidden.is_contiguous() or packed.is_contiguous())
    torch.testing.assert_close(tb.gather_tokens(hidden, keep),
                               gather_tokens_reference(hidden, keep))
    out = tb.scatter_tokens(hidden, packed, keep, weight)
    torch.testing.assert_close(out, scatter_tokens_reference(hidden, packed, keep, weight))
    pruned = torch.ones(2, 12, dtype=torch.bool, device=device)
    pruned.scatter_(1, keep.long(), False)
    assert torch.equal(out[pruned], hidden[pruned])  # bypass rows pass through bit-exact


@pytest.mark.parametrize("weighted", [True, False])
def test_non_finite_pruned_rows_pass_through(weighted, device):
    """A pruned row holding inf / NaN comes out as it went in (0 * inf would turn it into
    NaN), and does not touch the kept rows."""
    hidden = torch.randn(2, 6, 8, device=device)
    hidden[0, 1, 2], hidden[1, 4, :] = float("inf"), float("nan")
    keep = torch.tensor([[0, 3], [5, 2]], device=device)
    packed = torch.randn(2, 2, 8, device=device)
    weight = torch.rand(2, 2, device=device) + 0.5 if weighted else None
    out = tb.scatter_tokens(hidden, packed, keep, weight)
    want = scatter_tokens_reference(hidden, packed, keep, weight)
    torch.testing.assert_close(out, want, equal_nan=True)
    assert out[0, 1, 2] == float("inf") and torch.isnan(out[1, 4]).all()
    assert torch.isfinite(out[0, [0, 3]]).all() and torch.isfinite(out[1, [5, 2]]).all()


def test_out_of_range_keep_idx_is_clamped(device):
    hidden = torch.randn(1, 6, 8, device=device)
    keep = torch.tensor([[-4, 99, 2**32 + 1]], device=device)  # the last wraps in int32
    got = tb.gather_tokens(hidden, keep)
    torch.testing.assert_close(got, hidden[:, [0, 5, 5]])


def test_out_of_range_keep_idx_is_clamped_in_scatter(device):
    """Unchecked out-of-range positions act as the clamped ones in scatter too (the inverse
    map is built with the clamped ids), never an index error or a write out of bounds."""
    hidden = torch.randn(1, 6, 8, device=device)
    packed = torch.randn(1, 3, 8, device=device)
    weight = torch.rand(1, 3, device=device) + 0.5
    keep = torch.tensor([[-4, 2, 99]], device=device)
    got = tb.scatter_tokens(hidden, packed, keep, weight)
    want = scatter_tokens_reference(hidden, packed, keep.clamp(0, 5), weight)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gather_backward_sums_a_repeated_position(backend, device):
    """A position gathered twice gets both rows' gradients (a scatter would keep one)."""
    hidden = torch.randn(1, 5, 8, device=device, requires_grad=True)
    keep = torch.tensor([[1, 1, 3]], device=device)
    ops.gather_tokens(hidden, keep, backend=backend).sum().backward()
    want = torch.zeros(1, 5, 8, device=device)
    want[0, 1], want[0, 3] = 2.0, 1.0
    assert torch.equal(hidden.grad, want)


def test_layouts_whose_column_offsets_overflow_int32_are_copied():
    """A d-major hidden (column stride B*L) past 2**31 offsets goes contiguous before the
    kernels' int32 ``offs_d * stride``; ordinary layouts pass through as views."""
    from datalora.kernels._common import int32_columns

    wide = torch.empty_strided((2, 3, 8), (3, 1, 2**29), device="meta")  # 7 * 2**29 >= 2**31
    assert int32_columns(wide).stride(-1) == 1
    normal = torch.empty(2, 3, 8)
    assert int32_columns(normal) is normal


def test_scatter_in_fp64_is_exact(device):
    """fp64 runs on the torch backend (the kernel computes in fp32, and rounded even the
    rows it should pass through)."""
    hidden = torch.randn(2, 6, 5, dtype=torch.float64, device=device, requires_grad=True)
    packed = torch.randn(2, 3, 5, dtype=torch.float64, device=device, requires_grad=True)
    weight = torch.rand(2, 3, dtype=torch.float64, device=device, requires_grad=True)
    keep = _keep(2, 6, 3, device)
    got = ops.scatter_tokens(hidden, packed, keep, weight, backend="triton")
    want = scatter_tokens_reference(hidden, packed, keep, weight)
    assert torch.equal(got, want)
    grad = torch.randn_like(got)
    for a, b in zip(torch.autograd.grad(got, (hidden, packed, weight), grad),
                    torch.autograd.grad(want, (hidden, packed, weight), grad), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)  # fp32 rounding: ~1e-8


def test_double_backward_through_the_kernels(device):
    """A backward recorded with create_graph=True runs the registered ops (the kernels'
    calls themselves are not differentiable): the second-order gradients match the
    reference's, gather and scatter, in fp32."""
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 7, 12, generator=gen).to(device).requires_grad_(True)
    packed = torch.randn(2, 4, 12, generator=gen).to(device).requires_grad_(True)
    weight = (torch.rand(2, 4, generator=gen) + 0.5).to(device).requires_grad_(True)
    keep = _keep(2, 7, 4, device, seed=4)

    def penalty(gather, scatter):
        out = scatter(hidden, packed + gather(hidden, keep), keep, weight)
        first = torch.autograd.grad((out ** 3).sum(), (hidden, packed, weight),
                                    create_graph=True)
        return torch.autograd.grad(sum((g ** 2).sum() for g in first), (hidden, packed, weight))

    got = penalty(lambda h, k: ops.gather_tokens(h, k, backend="triton"),
                  lambda h, p, k, w: ops.scatter_tokens(h, p, k, w, backend="triton"))
    want = penalty(gather_tokens_reference, scatter_tokens_reference)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_scatter_is_exact_at_weights_0_and_1():
    from tests.test_tokens_torch import scatter_is_exact_at_weights_0_and_1

    scatter_is_exact_at_weights_0_and_1("triton")
