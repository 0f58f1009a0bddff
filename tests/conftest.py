"""Shared fixtures: deterministic seeds and the ``gpu`` marker skip.

Without CUDA, Triton kernels run under its interpreter. ``TRITON_INTERPRET=1`` has to be
set before anything imports Triton (bitsandbytes and PEFT do, at import time), so it is
set here, in the first module pytest loads. ``backend="auto"`` still picks torch on the
CPU; tests that need the plain environment (the GPU compile check) use a subprocess.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
