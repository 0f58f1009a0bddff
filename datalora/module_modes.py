"""Train / eval modes of a module tree, switched for a block and put back per module."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch.nn as nn


@contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """``model`` (an ``nn.Module``) in eval mode inside the block: no dropout, no training-time
    noise (DATALORA's Gumbel pruning); every submodule's own mode comes back after (a plain
    ``model.train(was_training)`` would set them all to the top module's mode)."""
    if not isinstance(model, nn.Module):
        yield
        return
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        model.train(modes[0][1])  # train() overrides run (transformers' kernel modes)
        for m, training in modes:
            m.training = training
