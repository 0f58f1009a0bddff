"""Runs the Triton kernels under the interpreter on the CPU (README, "Tests").

``TRITON_INTERPRET=1`` must be set before Triton is first imported (its standard
library's ``@jit`` functions are built at import time), so ``tests/conftest.py`` sets it
for the whole session on a machine without CUDA. With a CUDA GPU the kernels run
natively on it instead.

bf16 is not covered here: the interpreter computes a ``tl.dot`` of bf16 tiles wrongly,
so the CPU tests use fp32 / fp16 and every bf16 Triton GEMM path
(grouped strategy, fused linear, NF4 fused) is checked only by the ``gpu``-marked tests
(``test_bf16_forward_matches_fp32_gpu``, the bf16 cases of ``test_large_shapes_gpu``).
"""

from __future__ import annotations

import os

import pytest
import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    # every knob that picks a kernel path: a value left in the shell must not change which
    # path a test checks
    for name in ("DATALORA_SHRINK_STRATEGY", "DATALORA_BACKEND", "DATALORA_FUSED_LINEAR",
                 "DATALORA_NF4_FUSED", "DATALORA_CHECK_VALUES"):
        monkeypatch.delenv(name, raising=False)
    yield


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if ON_GPU else "cpu")


requires_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (not the interpreter)")
