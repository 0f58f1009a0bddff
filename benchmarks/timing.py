"""Round-robin wall-clock timing shared by the benchmarks.

Every method runs once per round, rounds repeat until the time budget is spent, so load
that drifts on a shared machine hits all methods alike; ratios are taken within one run.
On a CUDA device each call is bracketed by synchronizations.
"""

from __future__ import annotations

import contextlib
import math
import random
import statistics
import time
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence

import torch


def sync(device: torch.device) -> None:
    """Waits for ``device``'s queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quantiles(times_ms: list[float]) -> tuple[float, float, float, float]:
    """``(median, q20, q80, min)``; quantiles interpolate linearly, like numpy's default."""
    t = sorted(times_ms)

    def q(p):
        i = p * (len(t) - 1)
        lo, hi = math.floor(i), math.ceil(i)
        return t[lo] + (t[hi] - t[lo]) * (i - lo)
    return statistics.median(t), q(0.2), q(0.8), t[0]


def time_interleaved(steps: dict[Hashable, Callable[[], object]], device: torch.device,
                     budget_s: float, min_reps: int, max_reps: int,
                     order_seed: int | None = None) -> dict[Hashable, tuple]:
    """Times ``steps`` round-robin: ``key -> (median, q20, q80, min, reps, times)`` in ms,
    ``times[i]`` being round i's time. Two warm-up calls each first (allocator, first-call
    setup, autotuning); the number of rounds fits ``budget_s`` within
    ``[min_reps, max_reps]``. ``order_seed``: each round runs the steps in a fresh seeded
    random order, so no step always follows the same other one (whose caches and allocator
    state it would inherit); None keeps the given order."""
    for fn in steps.values():
        fn()
        fn()
    sync(device)
    t0 = time.perf_counter()
    for fn in steps.values():
        fn()
    sync(device)
    round_s = time.perf_counter() - t0
    reps = max(min_reps, min(max_reps, math.ceil(budget_s / max(round_s, 1e-9))))
    times: dict[Hashable, list[float]] = {key: [] for key in steps}
    order = list(steps)
    shuffler = None if order_seed is None else random.Random(order_seed)
    for _ in range(reps):
        if shuffler is not None:
            shuffler.shuffle(order)
        for key in order:
            fn = steps[key]
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            times[key].append((time.perf_counter() - t) * 1e3)
    return {key: (*quantiles(v), reps, v) for key, v in times.items()}


def bootstrap_ci(times: Mapping[Hashable, Sequence[float]],
                 statistic: Callable[[dict[Hashable, float]], float],
                 resamples: int = 1000, seed: int = 0) -> list[float]:
    """95 % percentile-bootstrap interval of ``statistic`` (a function of each step's median
    time, ``{key: ms}``) over the rounds of one :func:`time_interleaved` run (``times``:
    ``{key: per-round ms}``): each resample draws rounds with replacement, the same rounds
    for every step (the steps of one round ran back to back, under the same machine
    conditions), and takes each step's median over them."""
    rounds = len(next(iter(times.values())))
    if any(len(t) != rounds for t in times.values()):
        raise ValueError("times: expected the same number of rounds for every step")
    rng = random.Random(seed)
    values = []
    for _ in range(resamples):
        picks = [rng.randrange(rounds) for _ in range(rounds)]
        values.append(statistic({key: statistics.median(t[i] for i in picks)
                                 for key, t in times.items()}))
    values.sort()
    return [values[int(0.025 * (resamples - 1))], values[int(0.975 * (resamples - 1))]]


def format_ci(bounds: Sequence[float] | None) -> str:
    """``"[95% CI lo-hi]"`` of a :func:`bootstrap_ci` interval (empty for None), as the
    benchmarks print it."""
    return "" if bounds is None else f"[95% CI {bounds[0]:.3f}-{bounds[1]:.3f}]"


def cuda_graph_ms(fn: Callable[[], object], warmup_ms: float = 5,
                  rep_ms: float = 25) -> float | None:
    """Median time of ``fn`` replayed from a CUDA graph on the current device: its kernels
    back to back with no host work between them, i.e. the GPU time a fast host (or a
    serving stack that captures graphs) sees. ``fn`` is warmed up on a side stream (as
    ``torch.cuda.graph`` requires), captured once and replayed by ``do_bench``. Only for
    calls that never read the device from the host: when the capture fails this warns and
    returns None (the plain timings stand alone)."""
    from triton.testing import do_bench

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError as exc:  # a host sync or data-dependent shape inside fn
        warnings.warn(f"no CUDA-graph time: the capture failed ({str(exc)[:300]})",
                      stacklevel=2)
        with contextlib.suppress(RuntimeError):  # an invalidated capture may report again
            torch.cuda.synchronize()
        return None
    ms = do_bench(graph.replay, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    del graph
    torch.cuda.synchronize()
    return ms
