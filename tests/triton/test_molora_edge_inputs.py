"""Triton MoLoRA ops on input layouts and dtypes the shape sweep of test_molora_triton.py
leaves out: batch dims with int32 ids, more experts than the block map's default pad,
ranks past the compile matrix, one routing tensor needing a gradient and not the other,
routing tensors in other float dtypes than x. Forward and every requested gradient vs the
fp64 reference, calibrated by the torch backend (interpreter on the CPU)."""

from __future__ import annotations

import pytest
import torch
from _cases import assert_close_calibrated, make_inputs

from datalora import ops
from datalora.reference import molora_delta_reference

STRATEGIES = ["dense", "grouped"]
ALL = (True,) * 5
NAMES = ("dx", "dA", "dB", "dgates", "drank_scale")

# (lead dims, d_in, d_out, E, r, k, x dtype, ids dtype, gates dtype, rank_scale dtype,
#  inputs needing a gradient (x, A, B, gates, rank_scale))
CASES = [
    ((3, 5), 13, 9, 4, 5, 2, torch.float32, torch.int32, None, None, ALL),  # [B, L, d] x, int32 ids
    ((5,), 8, 5, 65, 2, 2, torch.float32, torch.int64, None, None, ALL),  # E = 65: padded map
    ((4,), 9, 7, 3, 200, 2, torch.float32, torch.int64, None, None, ALL),   # r = 200 > 128
    ((17,), 13, 9, 4, 5, 2, torch.float32, torch.int64, None, None,
     (False, False, False, True, False)),                                  # gates only
    ((17,), 13, 9, 4, 5, 2, torch.float16, torch.int64, None, None,
     (False, True, False, False, True)),                                   # rank_scale, not gates
    ((17,), 13, 9, 4, 5, 3, torch.float16, torch.int32, torch.float32, torch.float64, ALL),
    ((9,), 13, 9, 4, 5, 2, torch.float32, torch.int64, torch.float16, "none", ALL),
]


def _leaves(tensors, needs):
    return [None if t is None else t.detach().clone().requires_grad_(need)
            for t, need in zip(tensors, needs, strict=True)]


def _run(fn, tensors, needs, cast=lambda t: t):
    leaves = _leaves([None if t is None else cast(t) for t in tensors], needs)
    out = fn(*leaves)
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    out.backward(gy)
    return out.detach(), [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("case", CASES)
def test_forward_and_grads(case, strategy, device, monkeypatch):
    monkeypatch.setenv("DATALORA_SHRINK_STRATEGY", strategy)
    lead, d_in, d_out, E, r, k, dtype, ids_dtype, g_dtype, rs_dtype, needs = case
    T = int(torch.tensor(lead).prod())
    x, A, B, ids, g, rs = make_inputs(T, d_in, d_out, E, r, k, dtype, device)
    ids = ids.to(ids_dtype)
    g = g if g_dtype is None else g.to(g_dtype)
    rs = None if rs_dtype == "none" else rs if rs_dtype is None else rs.to(rs_dtype)
    if rs is None:
        needs = needs[:4] + (False,)
    view = lambda t: None if t is None else t.reshape(*lead, t.shape[-1])  # noqa: E731
    tensors = (view(x), A, B, view(g), view(rs))

    def public(backend):
        return lambda x, A, B, g, rs: ops.molora_delta(x, A, B, view(ids), g, rs, 0.5,
                                                       backend=backend)

    def reference(x, A, B, g, rs):
        flat = lambda t: None if t is None else t.reshape(T, t.shape[-1])  # noqa: E731
        out = molora_delta_reference(flat(x), A, B, ids, flat(g), flat(rs), 0.5)
        return out.reshape(*lead, d_out)

    out, grads = _run(public("triton"), tensors, needs)
    base_out, base_grads = _run(public("torch"), tensors, needs)
    ref_out, ref_grads = _run(reference, tensors, needs, lambda t: t.double())
    eps = 1e-5 if dtype == torch.float32 else 2e-3
    assert out.shape == (*lead, d_out)
    assert_close_calibrated("delta", out, base_out, ref_out, eps)
    for name, got, base, ref, need in zip(NAMES, grads, base_grads, ref_grads, needs,
                                          strict=True):
        if not need:
            assert got is None, name
            continue
        assert got.dtype == base.dtype, name
        assert_close_calibrated(name, got, base, ref, eps)


def test_experts_past_the_default_pad_are_computed(device):
    """E = 70 > the block map's default pad of 64, every route on an expert >= 64 (the
    random routing of the E = 65 case above can miss expert 64 altogether): the grouped
    kernels must reach those experts, forward and backward."""
    from datalora.ops import torch_backend
    from datalora.ops import triton_backend as tb

    T, d_in, d_out, E, r, k = 6, 8, 5, 70, 2, 2
    x, A, B, _, g, rs = make_inputs(T, d_in, d_out, E, r, k, torch.float32, device)
    ids = torch.tensor([[64, 69], [65, 66], [69, 67], [68, 64], [66, 65], [67, 68]],
                       device=device)
    got, h = tb.delta_forward(x, A, B, ids, g, rs, 0.5, strategy="grouped")
    want, h_want = torch_backend.delta_forward(x, A, B, ids, g, rs, 0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h, h_want, rtol=1e-5, atol=1e-5)
    gy = torch.randn(got.shape, generator=torch.Generator().manual_seed(1)).to(got)
    grads = tb.delta_backward(gy, x, A, B, ids, g, rs, h, 0.5, ALL, strategy="grouped")
    wants = torch_backend.delta_backward(gy, x, A, B, ids, g, rs, h_want, 0.5, ALL)
    for name, a, b in zip(NAMES, grads, wants, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)
