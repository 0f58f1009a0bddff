"""pytest-benchmark view of the MoLoRA comparison (CPU-sized; larger shapes on CUDA).

    python -m pytest benchmarks -p no:xdist --benchmark-only

Each test times one method of ``benchmarks.molora`` on one case; pytest-benchmark groups
them by case and mode so the table shows datalora, the loop and PEFT side by side.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.molora import Case, as_step, build_methods, make_inputs, timed_backends

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
D = 4096 if DEVICE.type == "cuda" else 1024
CASES = [
    Case("T_sweep", 1024, D, D),  # E = 8, r = 16, k = 2, uniform routing
    Case("tenant", 1024, D, D, k=1, skew="distinct"),  # every token a different adapter
]
METHODS = ["linear", "loop_linear", "loop_delta", "peft_mixed"] + [
    f"{op}[{be}]" for be in timed_backends(DEVICE) for op in ("molora_linear", "molora_delta")]


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_molora(benchmark, case, method, mode):
    inp = make_inputs(case, DTYPE, DEVICE)
    methods = build_methods(case, inp, timed_backends(DEVICE))
    if method not in methods or (method == "peft_mixed" and mode == "fwd_bwd"):
        pytest.skip(f"{method} does not run {mode} on {case.id}")
    if mode == "fwd_bwd":
        for name in ("x", "A", "B"):
            inp[name].requires_grad_(True)
    grad_out = torch.randn(case.T, case.d_out, device=DEVICE, dtype=DTYPE)
    step = as_step(methods[method], mode, inp, grad_out)

    def run():
        step()
        _sync()

    benchmark.group = f"{case.id} {mode}"
    benchmark.pedantic(run, warmup_rounds=1, rounds=5 if DEVICE.type == "cpu" else 50)
