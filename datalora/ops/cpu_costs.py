"""The torch backend's CPU cost model: dense or grouped strategy, per call shape.

The two strategies (see :mod:`datalora.ops.torch_backend`) trade arithmetic for GEMM shape:
dense runs ``E/k`` times the routed FLOPs in two wide GEMMs (N or K = ``E*r``), grouped the
routed FLOPs only, in narrow per-expert GEMMs (N or K = ``r``) plus row gathers and
``index_add_``. Which wins depends on how fast the CPU's BLAS (MKL in torch's x86 builds)
runs narrow GEMMs next to wide ones, and that differs by machine type: on an AMD EPYC the
rank-16 GEMMs of T = d = 2048, E = 8, r = 16, k = 2 ran at 43-110 GFLOP/s (unsteady between
processes) against ~175 for the dense strategy's wide ones, and constants fitted on an
Intel Xeon lost time there, as the AMD ones do on the Xeon (benchmarks/RESULTS.md). So the
constants are fitted per vendor (``/proc/cpuinfo``'s ``vendor_id``), each to runs of
``python -m benchmarks.cpu_strategy`` on that vendor's machine
(``python -m benchmarks.fit_cpu_strategy`` refits them); another vendor gets Intel's.
"""

from __future__ import annotations

import dataclasses
import functools
import platform
from pathlib import Path

INTEL = "GenuineIntel"
AMD = "AuthenticAMD"


@dataclasses.dataclass(frozen=True)
class StrategyCosts:
    """Constants of the CPU cost model of one direction, in microseconds (see
    :func:`grouped_is_cheaper`). Rates count the forward's FLOPs; the backward's constants
    absorb its twice as many."""

    op_us: float  # host cost of one torch op
    dense_flops_per_us: float  # the dense strategy's two wide GEMMs
    grouped_flops_per_us: float  # the per-expert GEMMs (narrow: r columns)
    row_us_per_element: float  # gathering a route's row(s) and adding its output row back
    dense_weight_us_per_element: float  # dense: reading every expert's A and B (and B's copy)
    grouped_weight_us_per_element: float  # grouped: reading the routed experts' A and B
    idle_weight_us_per_element: float  # grouped backward: zeroing the idle experts' dA, dB
    ops_per_expert: int  # grouped: ops per expert that has routes


# (forward, backward) per vendor. Intel's: fitted to runs on an Intel Xeon (2 threads, fp32,
# 144 shapes: T = 1 .. 2048, d = 64 .. 2048, E = 4 .. 32, r = 8 .. 64, k = 1 .. 8), the
# constants that lose the least time to wrong picks, first over two runs, then adjusted
# over the five runs of both versions (the backward's idle term, the forward's dense
# weight term: single-token calls had been picked wrong), checked on a sixth
# (benchmarks/results/cpu_intel_xeon/cpu_strategy.json).
COSTS = {
    INTEL: (StrategyCosts(8.0, 2.0e5, 1.5e5, 3.5e-4, 3.0e-4, 0.0, 0.0, 9),
            StrategyCosts(10.0, 2.0e5, 1.5e5, 1.8e-4, 2.0e-4, 1.0e-4, 2.0e-4, 9)),
    # AMD's: fitted by `python -m benchmarks.fit_cpu_strategy` to four runs on an AMD EPYC
    # (2 threads, the same grid; benchmarks/results/cpu_amd_epyc/cpu_strategy_fit*.json),
    # checked on a fifth (cpu_amd_epyc/cpu_strategy.json)
    AMD: (StrategyCosts(1.7, 2.4e5, 1.1e5, 3.0e-4, 9.2e-5, 0.0, 0.0, 9),
          StrategyCosts(1.8, 1.4e5, 8.6e4, 1.0e-3, 2.4e-4, 3.3e-4, 1.1e-5, 10)),
}


def cpuinfo_field(key: str) -> str | None:
    """The first ``key`` line's value in ``/proc/cpuinfo`` (None without that file or
    line: not Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


@functools.cache
def cpu_vendor() -> str:
    """The CPU's vendor id (``GenuineIntel``, ``AuthenticAMD``, ...: ``/proc/cpuinfo``),
    else a vendor id ``platform.processor()`` contains (Windows: ``"AMD64 Family 25 ...,
    AuthenticAMD"``), else that string (``""`` when nothing is known)."""
    vendor = cpuinfo_field("vendor_id")
    if vendor is not None:
        return vendor
    processor = platform.processor()
    return next((vendor for vendor in COSTS if vendor in processor), processor)


def strategy_costs(backward: bool, vendor: str | None = None) -> StrategyCosts:
    """The cost model's constants for one direction on ``vendor``'s CPUs (default: this
    machine's; Intel's for a vendor without its own)."""
    forward_costs, backward_costs = COSTS.get(cpu_vendor() if vendor is None else vendor,
                                              COSTS[INTEL])
    return backward_costs if backward else forward_costs


def grouped_is_cheaper(T: int, d_in: int, d_out: int, E: int, r: int, k: int,
                       experts_hit: int, backward: bool = False,
                       costs: StrategyCosts | None = None) -> bool:
    """Whether the grouped strategy is expected to beat the dense one on the CPU
    (``costs``: this machine's :func:`strategy_costs` unless given).

    Dense: ``2*T*E*r*(d_in + d_out)`` FLOPs in wide GEMMs, a few ops, and every expert's
    weights read (B copied too, unless stored expert-minor). Grouped: ``k/E`` of those
    FLOPs in narrow GEMMs, but each route's row of x gathered and its output row added
    back, several ops per expert with routes, and only those experts' weights read (the
    backward still writes every expert's dA and dB: zeros for the idle ones).
    """
    c = strategy_costs(backward) if costs is None else costs
    weights = r * (d_in + d_out)  # elements of one expert's A and B
    dense = (4 * c.op_us + 2 * T * E * weights / c.dense_flops_per_us
             + c.dense_weight_us_per_element * E * weights)
    grouped = (c.ops_per_expert * c.op_us * experts_hit
               + T * k * (d_in + d_out) * (2 * r / c.grouped_flops_per_us
                                           + c.row_us_per_element)
               + c.grouped_weight_us_per_element * experts_hit * weights
               + c.idle_weight_us_per_element * (E - experts_hit) * weights)
    return grouped < dense
