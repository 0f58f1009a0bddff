"""Small helpers shared by the TITOK steps."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn

from datalora.checks import check_number


def check_fraction(name: str, value: float) -> None:
    check_number(name, value, low=0, low_inclusive=False, high=1)


def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """torch's RNG seeded with ``seed`` inside the block (the CPU generator and ``device``'s
    CUDA one); the caller's RNG state comes back after, so a call taking a ``seed`` does not
    reseed the caller's random stream."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
