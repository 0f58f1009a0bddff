"""Runs the Triton kernels under the interpreter on the CPU (DESIGN.md section 5).

``TRITON_INTERPRET=1`` must be set before a ``@triton.jit`` function is decorated, so
this conftest sets it, (re)imports ``datalora.kernels`` interpreted, then restores the
variable so test modules collected later see the environment they started with; an
autouse fixture sets it again while each test here runs (the backend registry only
allows ``backend="triton"`` on the CPU when it is set). With a CUDA GPU the kernels
run natively on it instead.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
KERNEL_MODULES = ("_common", "shrink", "expand", "backward", "tokens")


def _import_interpreted() -> None:
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        importlib.import_module("datalora.kernels")
        for name in KERNEL_MODULES:
            full = f"datalora.kernels.{name}"
            if full in sys.modules:  # imported earlier without the interpreter
                importlib.reload(sys.modules[full])
            else:
                importlib.import_module(full)
        importlib.import_module("datalora.ops.triton_backend")
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


if not ON_GPU:
    _import_interpreted()


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    if not ON_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("DATALORA_SHRINK_STRATEGY", raising=False)
    monkeypatch.delenv("DATALORA_BACKEND", raising=False)
    yield


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if ON_GPU else "cpu")


requires_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU (not the interpreter)")
