"""Where the time of one MoLoRA call goes on a GPU: wall time per call (synchronised),
host time to enqueue one call, GPU kernel time from torch.profiler, and the kernels.

    python -m benchmarks.profile_gpu [--T 1 4096] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.molora import Case, env_set, make_inputs
from datalora import ops
from datalora.ops.layout import expert_minor


def inputs(T: int, d: int = 4096) -> dict:
    """``benchmarks.molora``'s inputs of the 7B case (bf16, E = 8, r = 16, k = 2) at T
    tokens, x / A / B requiring grad, plus the output gradient."""
    inp = make_inputs(Case("T_sweep", T, d, d), torch.bfloat16, torch.device("cuda"))
    for name in ("x", "A", "B"):
        inp[name].requires_grad_(True)
    inp["grad"] = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    return inp


def calls(inp, backend):
    """``{"fwd", "fwd_bwd"}`` steps of ``backend``: ``linear``, a backend name, or
    ``triton-fused`` (the caller sets ``DATALORA_FUSED_LINEAR``); a ``-minor`` suffix
    stores B expert-minor (:func:`datalora.ops.layout.expert_minor`)."""
    x, W, A, B, ids, gates = (inp[k] for k in ("x", "weight", "A", "B", "expert_ids",
                                                "gates"))
    if backend.endswith("-minor"):
        B = expert_minor(B.detach()).requires_grad_(True)
    if backend == "linear":
        fwd = lambda: torch.nn.functional.linear(x, W)  # noqa: E731
    else:
        be = backend.split("-")[0]  # "triton-fused" / "triton-minor" run "triton"
        fwd = lambda: ops.molora_linear(x, W, None, A, B, ids, gates, None, 2.0,  # noqa: E731
                                        backend=be)

    def fwd_bwd():
        fwd().backward(inp["grad"])
        for t in (x, A, B):
            t.grad = None
    return {"fwd": fwd, "fwd_bwd": fwd_bwd}


def measure(fn, reps=30):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    pipelined = (time.perf_counter() - t0) / reps * 1e3
    walls = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        walls.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    enqueue = (time.perf_counter() - t0) * 1e3
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels = defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            kernels[ev.name][0] += 1
            kernels[ev.name][1] += ev.device_time / 1e3
    walls.sort()
    return walls[len(walls) // 2], pipelined, enqueue, kernels


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, nargs="+", default=[1, 4096])
    ap.add_argument("--backends", nargs="+", default=["linear", "torch", "triton",
                                                      "triton-minor", "triton-fused"])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.profile_gpu needs a CUDA GPU (none is visible)")
    lines = []

    def say(s=""):
        print(s, flush=True)
        lines.append(s)
    for T in args.T:
        inp = inputs(T)
        for backend in args.backends:
            for checks in ("1", "0") if backend != "linear" else ("1",):
                env = {"DATALORA_FUSED_LINEAR": "1" if backend == "triton-fused" else "0",
                       "DATALORA_CHECK_VALUES": checks}
                for mode, fn in calls(inp, backend).items():
                    try:
                        with env_set(env):
                            wall, pipe, enq, kernels = measure(fn)
                    except Exception as exc:  # noqa: BLE001
                        say(f"T={T} {backend} checks={checks} {mode}: {type(exc).__name__} {exc}")
                        continue
                    gpu = sum(v[1] for v in kernels.values())
                    n = sum(v[0] for v in kernels.values())
                    say(f"T={T:<5} {backend:13s} checks={checks} {mode:7s} wall {wall:.4f} ms"
                        f" | pipelined {pipe:.4f} | enqueue {enq:.4f} | gpu {gpu:.4f} ms in"
                        f" {n} kernels")
                    if checks == "0" or backend == "linear":
                        top = sorted(kernels.items(), key=lambda kv: -kv[1][1])[:14]
                        for name, (cnt, ms) in top:
                            say(f"      {ms:8.4f} ms x{cnt:<3d} {name[:110]}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile_gpu.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
