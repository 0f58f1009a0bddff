"""Dense vs grouped strategy of the torch backend on the CPU, and what the heuristic picks.

    python -m benchmarks.cpu_strategy [--out DIR] [--budget-s 0.3] [--quick]

For each shape of a grid (T, d_in = d_out, E, r, k; fp32, uniform routing, no rank scale)
times the torch backend's two strategies side by side, round-robin: ``fwd`` is
``delta_forward`` without ``h`` (the LoRA part of a layer at inference), ``bwd`` is
``delta_backward`` for every input from the same ``h`` (a training step adds the two; the
strategy of each direction is picked on its own).
Each row records both medians, which one the backend's cost model picks
(:func:`datalora.ops.cpu_costs.grouped_is_cheaper` with this CPU vendor's constants, as
``choose_strategy`` does when ``DATALORA_SHRINK_STRATEGY`` is unset), and the pick's time
over the faster one's (``pick_vs_faster``, 1 when it picks the faster). The summary says
in how many shapes the pick is the faster strategy or within 10 % of it. Writes
``cpu_strategy.json``; ``python -m benchmarks.fit_cpu_strategy`` fits the cost model's
constants to such runs.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch

from benchmarks.molora import budget_cli, parse_budget_cli, write_result
from benchmarks.timing import time_interleaved
from datalora.experiments.run_info import cpu_model, git_commit, package_version
from datalora.ops import cpu_costs, torch_backend

SCHEMA = "datalora.benchmarks.cpu_strategy/1"
STRATEGIES = ("dense", "grouped")
MODES = ("fwd", "bwd")
EXPERTS = [(8, 16, 2), (8, 16, 1), (8, 8, 2), (8, 64, 2), (4, 16, 2), (16, 16, 2),
           (32, 16, 2), (8, 16, 8)]  # (E, r, k)
FULL_GRID = dict(T=[1, 8, 32, 128, 512, 2048], d=[64, 512, 2048], experts=EXPERTS)
QUICK_GRID = dict(T=[1, 128], d=[64, 512], experts=EXPERTS[:2])
NEAR = 1.10  # a pick within 10 % of the faster strategy counts as near


def make_inputs(T: int, d: int, E: int, r: int, k: int, seed: int = 0):
    """fp32 ``(x, A, B, ids, gates, grad)`` with every token routed to k distinct
    experts uniformly at random."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, d, generator=gen)
    A = torch.randn(E, r, d, generator=gen) / d**0.5
    B = torch.randn(E, d, r, generator=gen) / r**0.5
    ids = torch.rand(T, E, generator=gen).argsort(-1)[:, :k]
    gates = torch.rand(T, k, generator=gen)
    grad = torch.randn(T, d, generator=gen)
    return x, A, B, ids, gates, grad


def steps_for(T: int, d: int, E: int, r: int, k: int) -> dict:
    """``(mode, strategy) -> callable`` for one shape."""
    x, A, B, ids, gates, grad = make_inputs(T, d, E, r, k)
    needs = (True, True, True, True, False)
    _, h = torch_backend.delta_forward(x, A, B, ids, gates, None, 2.0, strategy="dense")

    def forward(strategy):
        return lambda: torch_backend.delta_forward(x, A, B, ids, gates, None, 2.0,
                                                   need_h=False, strategy=strategy)

    def backward(strategy):
        return lambda: torch_backend.delta_backward(grad, x, A, B, ids, gates, None, h, 2.0,
                                                    needs, strategy=strategy)

    steps = {}
    for strategy in STRATEGIES:
        steps["fwd", strategy] = forward(strategy)
        steps["bwd", strategy] = backward(strategy)
    return steps


def experts_hit(T: int, d: int, E: int, r: int, k: int) -> int:
    """How many experts the seeded routing of a shape (:func:`make_inputs`) gives routes."""
    ids = make_inputs(T, d, E, r, k)[3]
    return len(set(ids.reshape(-1).tolist()))


def picked(T: int, d: int, E: int, r: int, k: int, mode: str) -> str:
    """The strategy the torch backend's cost model
    (:func:`~datalora.ops.cpu_costs.grouped_is_cheaper`) picks for a shape, whatever
    ``DATALORA_SHRINK_STRATEGY`` forces."""
    hit = experts_hit(T, d, E, r, k)
    cheaper = cpu_costs.grouped_is_cheaper(T, d, d, E, r, k, hit, backward=mode == "bwd")
    return "grouped" if cheaper else "dense"


def run(out_dir: Path, budget_s: float, grid: dict) -> dict:
    rows = []
    shapes = list(itertools.product(grid["T"], grid["d"], grid["experts"]))
    for i, (T, d, (E, r, k)) in enumerate(shapes):
        timed = time_interleaved(steps_for(T, d, E, r, k), torch.device("cpu"), budget_s, 5,
                                 2000, order_seed=i)
        picks = {mode: picked(T, d, E, r, k, mode) for mode in MODES}
        for mode in MODES:
            pick = picks[mode]
            ms = {s: timed[mode, s][0] for s in STRATEGIES}
            best = min(ms.values())
            rows.append(dict(T=T, d_in=d, d_out=d, E=E, r=r, k=k, mode=mode,
                             dense_ms=ms["dense"], grouped_ms=ms["grouped"],
                             reps=timed[mode, "dense"][4], picked=pick,
                             faster=min(ms, key=ms.get),
                             pick_vs_faster=ms[pick] / best))
        print(f"[{i + 1}/{len(shapes)}] T={T} d={d} E={E} r={r} k={k}: "
              + ", ".join(f"{r['mode']} dense {r['dense_ms']:.3f} grouped "
                          f"{r['grouped_ms']:.3f} ms, picks {r['picked']}" for r in rows[-2:]),
              flush=True)
    sha, dirty = git_commit(Path(__file__).resolve().parents[1])
    meta = dict(device="cpu", device_name=cpu_model(), cpu_vendor=cpu_costs.cpu_vendor(),
                cpu_threads=torch.get_num_threads(),
                dtype="float32", torch=torch.__version__,
                datalora=package_version("datalora"), git_commit=sha, git_dirty=dirty,
                argv=sys.argv[1:], summary=summarize(rows))
    return write_result(out_dir / "cpu_strategy.json", SCHEMA, meta, rows, [])


def summarize(rows: list[dict]) -> dict:
    """Per mode: shapes, how many the pick is the faster strategy in, within 10 % of it
    in, and the worst ratio of the pick's time to the faster one's."""
    out = {}
    for mode in MODES:
        ratios = [r["pick_vs_faster"] for r in rows if r["mode"] == mode]
        out[mode] = dict(shapes=len(ratios), pick_fastest=sum(x == 1.0 for x in ratios),
                         pick_within_10pct=sum(x <= NEAR for x in ratios),
                         worst_pick_vs_faster=max(ratios, default=None))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = budget_cli("python -m benchmarks.cpu_strategy", __doc__, "cpu_strategy.json", 0.3,
                        "seconds of timing rounds per shape")
    parser.add_argument("--quick", action="store_true",
                        help="a small grid (a smoke run, seconds)")
    args = parse_budget_cli(parser, argv)
    result = run(args.out, args.budget_s, QUICK_GRID if args.quick else FULL_GRID)
    for mode, s in result["meta"]["summary"].items():
        print(f"{mode}: the pick is the faster strategy in {s['pick_fastest']} of "
              f"{s['shapes']} shapes, within 10 % of it in {s['pick_within_10pct']}; worst "
              f"{s['worst_pick_vs_faster']:.2f}x the faster one")
    print(f"wrote {args.out / 'cpu_strategy.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
