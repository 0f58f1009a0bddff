"""datalora.hf_compat: the KV-cache keyword across transformers releases."""

from __future__ import annotations

import inspect
import warnings

import torch
import torch.nn as nn

from datalora.hf_compat import cache_kwargs, cache_of, output_cache
from datalora.testing import build_tiny_model


def _expected_name(model):
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def test_cache_of_reads_either_name():
    assert cache_of({"cache": 1}) == 1
    assert cache_of({"past_key_values": 2}) == 2
    assert cache_of({"cache": None, "past_key_values": 3}) == 3
    assert cache_of({}) is None


def test_cache_kwargs_looks_through_wrappers_and_round_trips():
    import peft

    model = build_tiny_model().eval()
    name = _expected_name(model)
    assert cache_kwargs(model, "c") == {name: "c"}
    wrapped = peft.get_peft_model(build_tiny_model(), peft.LoraConfig(target_modules=["q_proj"]))
    assert cache_kwargs(wrapped, "c") == {name: "c"}
    assert cache_kwargs(nn.Linear(2, 2), "c") == {"past_key_values": "c"}  # no cache anywhere
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the current name, not a deprecated one
        full = model(input_ids=ids).logits
        out = model(input_ids=ids[:, :3], use_cache=True)
        step = model(input_ids=ids[:, 3:], use_cache=True, **cache_kwargs(model, output_cache(out)))
    torch.testing.assert_close(step.logits[:, -1], full[:, -1], atol=1e-5, rtol=1e-5)
