"""Fit the torch backend's CPU cost model to runs of ``benchmarks.cpu_strategy``.

    python -m benchmarks.fit_cpu_strategy RUN.json [RUN.json ...] [--start VENDOR_ID]
        [--rounds 6] [--restarts 20]

The runs must come from machines of one CPU vendor (a run's ``cpu_vendor``, or read from
its ``device_name``). Starting from the constants in use for that vendor
(:data:`datalora.ops.cpu_costs.COSTS`; ``--start`` names another vendor's), coordinate
descent multiplies one constant at a time by each of a few factors and keeps a change when
it lowers the loss, then starts again from random perturbations of the best (seeded: the
same runs and start give the same constants); every point tried is rounded to two
significant digits, as pasted. The loss is the mean over every (run, shape) of
``log(time of the pick / time of the faster strategy)`` (every shape counts alike, so
single-token calls weigh as much as the largest).
Prints, per direction, the current and fitted constants with their loss and how many
shapes each picks the faster strategy in, within 10 % of it in, and the worst pick, for
pasting into ``COSTS``. Times nothing: seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
from pathlib import Path

from benchmarks.cpu_strategy import NEAR, experts_hit
from datalora.ops import cpu_costs

FACTORS = (0.25, 0.5, 0.7, 0.85, 1.2, 1.4, 2.0, 4.0)
ZERO_TRIES = (1e-5, 3e-5, 1e-4, 3e-4)  # a constant at 0 is tried at these values
VENDORS = {"amd": cpu_costs.AMD, "intel": cpu_costs.INTEL}


@dataclasses.dataclass(frozen=True)
class Shape:
    """One timed (run, shape, direction): the inputs of the cost model and both times."""

    T: int
    d_in: int
    d_out: int
    E: int
    r: int
    k: int
    experts_hit: int
    backward: bool
    dense_ms: float
    grouped_ms: float


def run_vendor(result: dict) -> str | None:
    """A run's CPU vendor: recorded, else recognised in the CPU model name."""
    meta = result["meta"]
    if meta.get("cpu_vendor"):
        return meta["cpu_vendor"]
    name = str(meta.get("device_name", "")).lower()
    return next((vendor for key, vendor in VENDORS.items() if key in name), None)


def load_shapes(paths: list[Path]) -> tuple[list[Shape], str | None]:
    """Every timed row of the runs, and their vendor (None when no run names one;
    ValueError when runs of two vendors are mixed, a run is not a ``cpu_strategy`` result,
    a time is not positive or a direction has no rows)."""
    shapes, known, hits = [], set(), {}
    for path in paths:
        result = json.loads(path.read_text())
        if (not isinstance(result, dict)
                or result.get("schema") != "datalora.benchmarks.cpu_strategy/1"
                or not isinstance(result.get("results"), list)):
            raise ValueError(f"{path}: not a benchmarks.cpu_strategy result")
        known.add(run_vendor(result))
        for row in result["results"]:
            if not (row["dense_ms"] > 0 and row["grouped_ms"] > 0):
                raise ValueError(f"{path}: a row's times are not positive: {row}")
            key = (row["T"], row["d_in"], row["E"], row["r"], row["k"])
            if key not in hits:
                hits[key] = experts_hit(*key)
            shapes.append(Shape(row["T"], row["d_in"], row["d_out"], row["E"], row["r"],
                                row["k"], hits[key], row["mode"] == "bwd", row["dense_ms"],
                                row["grouped_ms"]))
    for backward, mode in ((False, "fwd"), (True, "bwd")):
        if not any(s.backward == backward for s in shapes):
            raise ValueError(f"the runs have no {mode} rows")
    known.discard(None)
    if len(known) > 1:
        raise ValueError(f"the runs come from CPUs of {len(known)} vendors "
                         f"({', '.join(sorted(known))}): fit one vendor at a time")
    return shapes, known.pop() if known else None


def pick_ratios(shapes: list[Shape], costs: cpu_costs.StrategyCosts) -> list[float]:
    """Per shape, the time of the strategy ``costs`` picks over the faster one's."""
    ratios = []
    for s in shapes:
        grouped = cpu_costs.grouped_is_cheaper(s.T, s.d_in, s.d_out, s.E, s.r, s.k,
                                               s.experts_hit, s.backward, costs)
        picked = s.grouped_ms if grouped else s.dense_ms
        ratios.append(picked / min(s.dense_ms, s.grouped_ms))
    return ratios


def loss(shapes: list[Shape], costs: cpu_costs.StrategyCosts) -> float:
    """Mean log slowdown of the picks (0: every pick the faster strategy)."""
    return sum(math.log(x) for x in pick_ratios(shapes, costs)) / len(shapes)


def free_fields(backward: bool) -> list[str]:
    """The constants a direction fits (the forward zeroes no idle expert's gradients)."""
    return [f.name for f in dataclasses.fields(cpu_costs.StrategyCosts)
            if backward or f.name != "idle_weight_us_per_element"]


def candidates(costs: cpu_costs.StrategyCosts, fields: list[str]):
    """Every constant of ``fields`` changed alone by each factor, or to 0 unless a rate (a
    zero one tried at small values; ``ops_per_expert`` stays a whole number >= 1), all
    :func:`rounded`: the search stays on the constants it prints."""
    for name in fields:
        value = getattr(costs, name)
        if name == "ops_per_expert":
            tries = [value - 2, value - 1, value + 1, value + 2]
            tries = [v for v in tries if v >= 1]
        elif value == 0:
            tries = list(ZERO_TRIES)
        else:  # a rate stays positive, a cost may drop out
            tries = [value * f for f in FACTORS] + ([] if "per_us" in name else [0.0])
        for new in tries:
            yield rounded(dataclasses.replace(costs, **{name: new}))


def descend(shapes: list[Shape], start: cpu_costs.StrategyCosts, fields: list[str],
            rounds: int) -> tuple[cpu_costs.StrategyCosts, float]:
    """Coordinate descent from ``start``: up to ``rounds`` passes over ``fields``, stopping
    at a pass that changes nothing. Returns the constants and their loss."""
    best, best_loss = start, loss(shapes, start)
    for _ in range(rounds):
        improved = False
        for costs in candidates(best, fields):
            value = loss(shapes, costs)
            if value < best_loss - 1e-12:
                best, best_loss, improved = costs, value, True
        if not improved:
            break
    return best, best_loss


def fit(shapes: list[Shape], start: cpu_costs.StrategyCosts, backward: bool, rounds: int,
        restarts: int, seed: int = 0) -> cpu_costs.StrategyCosts:
    """:func:`descend` from ``start``, then from ``restarts`` random perturbations of the
    best so far (every free constant times a random factor; seeded), keeping the best. Every
    point tried is :func:`rounded`, so the result never loses to the (rounded) start.
    The loss is a step function of the constants, so a single descent stops at the first
    plateau it reaches."""
    fields = free_fields(backward)
    best, best_loss = descend(shapes, rounded(start), fields, rounds)
    rng = random.Random(seed)
    for _ in range(restarts):
        moved = {name: getattr(best, name) * rng.choice(FACTORS) for name in fields
                 if name != "ops_per_expert"}
        costs, value = descend(shapes, rounded(dataclasses.replace(best, **moved)), fields,
                               rounds)
        if value < best_loss - 1e-12:
            best, best_loss = costs, value
    return best


def rounded(costs: cpu_costs.StrategyCosts) -> cpu_costs.StrategyCosts:
    """The constants to two significant digits (what gets pasted into ``COSTS``)."""
    return dataclasses.replace(costs, **{
        name: float(f"{getattr(costs, name):.2g}") for name in free_fields(True)
        if name != "ops_per_expert"})


def describe(shapes: list[Shape], costs: cpu_costs.StrategyCosts) -> str:
    ratios = pick_ratios(shapes, costs)
    return (f"loss {loss(shapes, costs):.4f}, faster pick {sum(x == 1.0 for x in ratios)} / "
            f"{len(ratios)}, within 10 % {sum(x <= NEAR for x in ratios)}, worst "
            f"{max(ratios):.2f}x\n    {costs}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fit_cpu_strategy",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="cpu_strategy.json files")
    parser.add_argument("--start", choices=sorted(VENDORS.values()),
                        help="the vendor whose constants to start from (default: the "
                             "runs'; Intel's for runs of another or no known vendor)")
    parser.add_argument("--rounds", type=int, default=6,
                        help="passes of each coordinate descent at most (default 6)")
    parser.add_argument("--restarts", type=int, default=20,
                        help="descents from random perturbations of the best (default 20)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds: expected >= 1, got {args.rounds}")
    if args.restarts < 0:
        parser.error(f"--restarts: expected >= 0, got {args.restarts}")
    for path in args.runs:
        if not path.is_file():
            parser.error(f"{path}: no such file")
    try:
        shapes, vendor = load_shapes(args.runs)
    except (ValueError, KeyError, TypeError, json.JSONDecodeError) as err:
        parser.error(f"{type(err).__name__}: {err}")
    start_vendor = args.start or vendor or cpu_costs.INTEL
    print(f"{len(shapes)} timed shapes from {len(args.runs)} run(s) on "
          f"{vendor or 'an unknown vendor'}'s CPUs, starting from {start_vendor}'s constants")
    for backward in (False, True):
        subset = [s for s in shapes if s.backward == backward]
        start = cpu_costs.strategy_costs(backward, start_vendor)
        fitted = fit(subset, start, backward, args.rounds, args.restarts)
        name = "backward" if backward else "forward"
        print(f"{name} now:    {describe(subset, start)}")
        print(f"{name} fitted: {describe(subset, fitted)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
