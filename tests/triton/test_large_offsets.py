"""Weight offsets past 2**31 elements: the grouped kernels index B's rows in int64.

A B stored expert-minor (``datalora.ops.layout.expert_minor``) has row stride ``E*r``, so
row ``o`` of a 262k-row output (a LoRA on Gemma 3's lm_head with E*r = 8192) starts past
2**31 elements; the expand read, the backward's ``B^T dy`` read and the dB store computed
those offsets in int32 and wrapped to 4 GiB before the tensor. Here a 4-row B with row
stride 2**30 reaches the same offsets (rows 2 and 3); the tensor sits 2**31 elements into
its storage, so a wrapped offset reads or writes memory of the storage (garbage, a
sentinel) instead of crashing. Only the touched pages of the storage are allocated.
"""

from __future__ import annotations

import torch
from datalora.kernels import backward as bw
from datalora.kernels import expand as ex
from datalora.kernels import shrink as sh

from datalora.routing import sort_routes

R, O, STRIDE, START = 16, 4, 2**30, 2**31


def _far_weight(device, fill: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(storage, B [1, O, R])`` with row stride 2**30, 2**31 elements into storage."""
    storage = torch.empty(START + (O - 1) * STRIDE + R, dtype=torch.float16, device=device)
    storage[:4096] = -7.0  # where a wrapped offset lands
    B = storage.as_strided((1, O, R), (R, STRIDE, 1), START)
    for o in range(O):
        B[0, o] = 0.0 if fill is None else fill[o]
    return storage, B


def _one_route(device):
    return sort_routes(torch.zeros(1, 1, dtype=torch.int64, device=device), 1,
                       check_values=False)


def test_expand_reads_weight_rows_past_2_31_elements(device):
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(O, R, generator=g).half().to(device)
    _, B = _far_weight(device, rows)
    z = torch.randn(1, R, generator=g).half().to(device)
    y = torch.zeros(1, O, dtype=torch.float16, device=device)
    ex.expand_grouped(z, B, B.stride(), _one_route(device), y, 1, R, 1.0, False)
    torch.testing.assert_close(y.float(), z.float() @ rows.float().T, rtol=2e-3, atol=2e-2)


def test_backward_shrink_reads_weight_rows_past_2_31_elements(device):
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(O, R, generator=g).half().to(device)
    _, B = _far_weight(device, rows)
    dy = torch.randn(1, O, generator=g).half().to(device)
    raw, scaled = (torch.empty(1, R, dtype=torch.float16, device=device) for _ in range(2))
    ones = torch.ones(R, dtype=torch.float32, device=device)
    gates = torch.ones(1, 1, dtype=torch.float32, device=device)
    s0, s1, s2 = B.stride()
    sh.shrink_grouped(dy, B, (s0, s2, s1), _one_route(device), 1, gates, ones, 0, raw, scaled,
                      1, R, 1.0)
    torch.testing.assert_close(raw.float(), dy.float() @ rows.float(), rtol=2e-3, atol=2e-2)


def test_weight_gradient_stores_rows_past_2_31_elements(device):
    g = torch.Generator().manual_seed(2)
    storage, dB = _far_weight(device)
    dy = torch.randn(1, O, generator=g).half().to(device)
    h = torch.randn(1, R, generator=g).half().to(device)
    ones = torch.ones(R, dtype=torch.float32, device=device)
    gates = torch.ones(1, 1, dtype=torch.float32, device=device)
    bw.segment_outer(dy, h, _one_route(device), 1, gates, ones, 0, dB, dB.stride(), R, 1.0)
    torch.testing.assert_close(dB[0].float(), dy.float().T @ h.float(), rtol=2e-3, atol=2e-2)
    assert bool((storage[:4096] == -7.0).all())  # nothing written before the tensor
