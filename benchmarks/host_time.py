"""Host time of one MoLoRA call, measured on the CPU (no GPU needed).

    python -m benchmarks.host_time [--out DIR] [--budget-s 6]

On a GPU small and medium calls are bound by the host: the time to enqueue the launches
(``benchmarks.profile_gpu``; at T = 4096 on the H200 the forward + backward kept the GPU
busy 0.50 ms but took 1.5-2.1 ms to enqueue). Most of that host time is datalora's own:
argument checks, autograd, the torch ops around the kernels. This benchmark times that part
on the CPU: the ``triton`` backend's dense path with its Triton launches replaced by no-ops
(the outputs are garbage, only the time counts; Triton's own launcher cost comes on top on
a GPU), the ``torch`` backend, and a plain ``F.linear`` for scale, at T = 1 and d = 64,
where the arithmetic is negligible. Each with B contiguous (``MoLoRALinear``'s default) and
expert-minor (:func:`datalora.ops.layout.use_expert_minor_b`), the routing's tables (the
torch backend's gate matrix, the Triton backend's index tables) built on every call
(``routing="per_call"``: a caller's own routing tensors, or a model's first layer), and,
with B contiguous, taken from the cache every later layer sharing a model's routing hits
(``routing="shared"``, :mod:`datalora.ops.eager`). Round-robin timing, medians in
microseconds, written to ``host_time_cpu.json``.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.molora import budget_cli, parse_budget_cli, write_result
from benchmarks.timing import time_interleaved
from datalora import ops
from datalora.experiments.run_info import cpu_model, git_commit, package_version
from datalora.ops.eager import trust_routing
from datalora.ops.layout import expert_minor

SCHEMA = "datalora.benchmarks.host_time/2"
SHAPE = dict(T=1, d=64, E=8, r=16, k=2)
MODES = ("fwd_no_grad", "fwd_bwd")


@contextlib.contextmanager
def triton_launches_stubbed():
    """The Triton backend runnable on the CPU with its kernel launches as no-ops: the
    interpreter flag lets the backend be chosen, no kernel runs."""
    from datalora.ops import triton_backend

    stubs = {(triton_backend._sh, "route_dense"), (triton_backend._sh, "dense_from_routes"),
             (triton_backend._bw, "route_grads")}
    saved = {(mod, name): getattr(mod, name) for mod, name in stubs}
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        for mod, name in stubs:
            setattr(mod, name, lambda *args, **kwargs: None)
        yield
    finally:
        for (mod, name), fn in saved.items():
            setattr(mod, name, fn)
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous


def make_steps() -> dict[tuple[str, str, str, str], Callable[[], None]]:
    """``(method, B layout, routing, mode) -> step``; the MoLoRA calls skip the value
    checks, as layers sharing a checked routing do."""
    g = torch.Generator().manual_seed(0)
    T, d, E, r, k = (SHAPE[n] for n in ("T", "d", "E", "r", "k"))
    x = torch.randn(T, d, generator=g).requires_grad_(True)
    W = torch.randn(d, d, generator=g) / d ** 0.5
    A = (torch.randn(E, r, d, generator=g) / d ** 0.5).requires_grad_(True)
    B0 = torch.randn(E, d, r, generator=g) / r ** 0.5
    ids = torch.rand(T, E, generator=g).argsort(-1)[:, :k].contiguous()
    gates = torch.rand(T, k, generator=g)
    grad = torch.randn(T, d, generator=g)
    # the same values as tensors datalora's routers would have built: their tables cached
    routing_of = {"per_call": (ids, gates), "shared": (ids.clone(), gates.clone())}
    trust_routing(*routing_of["shared"])
    steps = {}

    def add(method, layout, routing, fwd, leaves):
        def no_grad():
            with torch.no_grad():
                fwd()

        def fwd_bwd():
            fwd().backward(grad)
            for t in leaves:
                t.grad = None
        steps[(method, layout, routing, "fwd_no_grad")] = no_grad
        steps[(method, layout, routing, "fwd_bwd")] = fwd_bwd

    add("linear", "-", "-", lambda: F.linear(x, W), [x])
    cases = (("contiguous", B0.clone(), ("per_call", "shared")),
             ("expert_minor", expert_minor(B0), ("per_call",)))
    for layout, B, routings in cases:
        B.requires_grad_(True)
        for routing in routings:
            for backend in ("triton", "torch"):
                add(backend, layout, routing,
                    lambda B=B, backend=backend, route=routing_of[routing]: ops.molora_linear(
                        x, W, None, A, B, *route, None, 2.0, backend=backend,
                        check_values=False), [x, A, B])
    return steps


def run(out_dir: Path, budget_s: float) -> dict:
    with triton_launches_stubbed():
        timed = time_interleaved(make_steps(), torch.device("cpu"), budget_s, 200, 20000)
    rows = [dict(method=method, b_layout=layout, routing=routing, mode=mode, **SHAPE,
                 median_us=res[0] * 1e3, q20_us=res[1] * 1e3, q80_us=res[2] * 1e3, reps=res[4])
            for (method, layout, routing, mode), res in timed.items()]
    sha, dirty = git_commit(Path(__file__).resolve().parents[1])
    meta = dict(device="cpu", device_name=cpu_model(), cpu_threads=torch.get_num_threads(),
                torch=torch.__version__, triton=package_version("triton"),
                datalora=package_version("datalora"), git_commit=sha, git_dirty=dirty,
                argv=sys.argv[1:], triton_kernels="launches replaced by no-ops")
    return write_result(out_dir / "host_time_cpu.json", SCHEMA, meta, rows, [])


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'method':8s} {'B layout':13s} {'routing':9s} "
             + " ".join(f"{m:>12s}" for m in MODES)]
    keys = dict.fromkeys((r["method"], r["b_layout"], r["routing"]) for r in rows)
    for method, layout, routing in keys:
        cells = {r["mode"]: r["median_us"] for r in rows
                 if (r["method"], r["b_layout"], r["routing"]) == (method, layout, routing)}
        lines.append(f"{method:8s} {layout:13s} {routing:9s} "
                     + " ".join(f"{cells[m]:9.1f} us" for m in MODES))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = budget_cli("python -m benchmarks.host_time", __doc__, "host_time_cpu.json", 6.0,
                        "seconds of timing rounds")
    args = parse_budget_cli(parser, argv)
    result = run(args.out, args.budget_s)
    print(format_rows(result["results"]))
    print(f"wrote {args.out / 'host_time_cpu.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
