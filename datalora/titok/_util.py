"""Small helpers shared by the TITOK steps."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sized
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn

from datalora.checks import check_number


def check_fraction(name: str, value: float) -> None:
    check_number(name, value, low=0, low_inclusive=False, high=1)


def check_rows(name: str, rows: Any, *columns: str, item: str = "row") -> None:
    """TypeError unless ``rows`` holds dicts (a list, a ``datasets.Dataset``: any sized
    iterable but a string or a mapping), ValueError naming the first without one of
    ``columns``: ``"{name}: {item} {i} has no {column!r} column"``."""
    if isinstance(rows, (str, bytes, Mapping)) or not isinstance(rows, Sized) \
            or not isinstance(rows, Iterable):
        raise TypeError(f"{name}: expected a list of {item}s (dicts), got "
                        f"{type(rows).__name__}")
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(f"{name}: {item} {i} is a {type(row).__name__}, expected a dict")
        for column in columns:
            if column not in row:
                raise ValueError(f"{name}: {item} {i} has no {column!r} column")


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
