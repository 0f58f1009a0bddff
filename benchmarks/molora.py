"""MoLoRA benchmark: datalora vs base linear, the per-expert loop and PEFT, side by side.

    python -m benchmarks.molora                      # preset picked by device (gpu | cpu)
    python -m benchmarks.molora --preset smoke --out /tmp/bench

Every case (shape x routing) times all methods in the same run:

* ``linear``               base ``F.linear`` alone (the floor; ratios are against it)
* ``molora_linear[B]``     datalora whole layer, for each backend B available here
* ``molora_linear[triton-fused]``  (CUDA) the triton backend with ``DATALORA_FUSED_LINEAR=1``:
  base GEMM and LoRA expand in one Triton kernel, vs cuBLAS + expand of ``[triton]``
* ``molora_delta[B]``      datalora LoRA part alone
* ``loop_linear`` / ``loop_delta``  the per-expert loop (``benchmarks.baselines``)
* ``peft_mixed``           PEFT LoRA with E adapters and ``adapter_names=`` (k = 1 only)

in two modes: ``fwd`` (inference, under ``torch.no_grad``) and ``fwd_bwd`` (forward +
backward, gradients to x and the LoRA parameters, base weight frozen; PEFT mixed
batches are eval-only, so PEFT has no ``fwd_bwd`` row).

Timers: on CUDA ``triton.testing.do_bench`` in :data:`GPU_ROUNDS` windows per method taken
round-robin over the methods (median and 20/80 % quantiles of the window medians, L2
flushed) plus peak memory; on the CPU a ``perf_counter`` median of N calls where the methods of
a case run round-robin (rep 1 of every method, then rep 2, ...), so load from other
processes hits all of them alike and the ratios stay meaningful. On a modelled GPU
(H100 / A100 / H200) each row also has ``floor_ms`` (the ``benchmarks.roofline`` lower
bound of its op) and ``fraction_of_floor = floor_ms / median_ms``. On CUDA the base
linear and datalora's ops are also timed replayed from a CUDA graph (``graph_ms``,
``graph_ratio_vs_linear``): their kernels without host time between them, which is what a
fast host or a graph-capturing stack sees (the targets stay on the plain timings). The Triton
interpreter is never timed. datalora's ops run with ``check_values=False`` (see
:data:`VALUE_CHECKS`). Results go to ``<out>/molora_<preset>.json`` and a plot
drawn from that file by ``benchmarks.plot``; the issue's targets are checked at the
end and written to the JSON as PASS/FAIL.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import roofline
from benchmarks.baselines import PeftMixedBatch, loop_delta, loop_linear
from benchmarks.timing import bootstrap_ci, cuda_graph_ms, format_ci, quantiles, time_interleaved
from datalora import ops
from datalora.cli import int_at_least, non_negative_float, positive_float
from datalora.experiments.run_info import cpu_model, git_commit, package_version

SCHEMA = "datalora.benchmarks.molora/1"
RESULTS_DIR = Path(__file__).parent / "results"
NO_PLOT_HINT = "matplotlib not installed: pip install datalora[plot], or pass --no-plot"
MODES = ("fwd", "fwd_bwd")
SKEWS = ("uniform", "one", "distinct")
# the one-kernel Triton linear (kernels/fused_linear.py), opt-in until these rows show it
# beating cuBLAS + expand (molora_linear[triton]); timed on CUDA only
FUSED_METHOD = "molora_linear[triton-fused]"
# The ops are timed as MoLoRALinear layers call them: a model's routing is validated once
# per forward (``Routing``: ids in range, finite gates; one host sync) and every layer then
# calls the ops with ``check_values=False``. Checking per call would time a device sync
# per layer, which no model pays.
VALUE_CHECKS = False
FUSED_ENV = {"DATALORA_FUSED_LINEAR": "1"}
# max |output - per-expert loop in fp32| / max |loop in fp32| a timed method may reach (its
# dtype's rounding); above it the method computes another layer and its time means nothing
AGREE_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


@dataclasses.dataclass(frozen=True)
class Case:
    """One shape and routing. ``group``: ``T_sweep`` (ratio vs T), ``sweep`` or ``tenant``.

    skew: ``uniform`` (k distinct random experts per token), ``one`` (every token to
    experts 0..k-1: one expert takes every token's first route), ``distinct`` (token t
    to experts ``t*k .. t*k+k-1 mod E``: neighbouring tokens never share an adapter).
    """

    group: str
    T: int
    d_in: int
    d_out: int
    E: int = 8
    r: int = 16
    k: int = 2
    skew: str = "uniform"

    @property
    def id(self) -> str:
        return (f"{self.group}/T{self.T}_d{self.d_in}x{self.d_out}_E{self.E}_r{self.r}"
                f"_k{self.k}_{self.skew}")


def _sweep(T: int, d: int, Es, rs, ks) -> list[Case]:
    base = dict(group="sweep", T=T, d_in=d, d_out=d)
    cases = [Case(**base, E=E) for E in Es] + [Case(**base, r=r) for r in rs]
    cases += [Case(**base, k=k) for k in ks]
    cases += [Case(**base, skew="one")]
    return cases


def _tenant(Ts, d: int, E: int = 8) -> list[Case]:
    """k = 1 multi-tenant: random adapters, all on one adapter, every token a different one."""
    return [Case("tenant", T, d, d, E=E, k=1, skew=s) for T in Ts for s in SKEWS]


def _7b_sweep(Ts) -> list[Case]:
    return [Case("T_sweep", T, 4096, 4096) for T in Ts]


PRESETS = {
    # 7B shapes in bf16: d = 4096 (attention projections), d_ff = 14336 (MLP up / down)
    "gpu": dict(
        dtype=torch.bfloat16,
        cases=_7b_sweep([1, 16, 64, 256, 1024, 2048, 4096, 8192, 16384])
        + [Case("T_sweep", T, 4096, 14336) for T in (1, 4096, 16384)]
        + [Case("T_sweep", T, 14336, 4096) for T in (1, 4096, 16384)]
        + _sweep(4096, 4096, Es=(2, 4, 16, 32, 64), rs=(4, 8, 32, 64, 128), ks=(1, 4, 8))
        # E*r = 2048: beyond the dense strategy's columns, the grouped kernels' shape
        + [Case("sweep", 4096, 4096, 4096, E=64, r=32)]
        # k = 1 with as many adapters as tokens: "distinct" puts every token on its own
        # adapter (with E = 8, "distinct" spreads 4096 tokens evenly over 8 adapters)
        + _tenant((64, 4096), 4096) + _tenant((64,), 4096, E=64),
        target_T=4096, target_d=4096),
    # reduced CPU set, fp32; includes the CPU target shape T = d = 2048
    "cpu": dict(
        dtype=torch.float32,
        cases=[Case("T_sweep", T, 2048, 2048) for T in (1, 16, 128, 512, 2048)]
        + _sweep(1024, 1024, Es=(2, 4, 16, 32), rs=(4, 8, 32, 64), ks=(1, 4, 8))
        + _tenant((1024,), 1024),
        target_T=2048, target_d=2048, budget_s=5.0, min_reps=7, max_reps=200),
    # seconds: the harness end to end (CI)
    "smoke": dict(
        dtype=torch.float32,
        cases=[Case("T_sweep", T, 64, 64, E=4, r=4) for T in (1, 8, 32)]
        + [Case("sweep", 32, 64, 64, E=4, r=4, k=4), Case("sweep", 32, 64, 64, E=4, r=4,
                                                          skew="one")]
        + [Case("tenant", 32, 64, 64, E=4, r=4, k=1, skew=s) for s in SKEWS],
        target_T=None, target_d=None, budget_s=0.05, min_reps=3, max_reps=20),
}


# ----------------------------------------------------------------------------- inputs
def make_routing(case: Case, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``expert_ids [T, k]`` (int64) and ``gates [T, k]`` (fp32, rows sum to 1) for a skew."""
    T, E, k = case.T, case.E, case.k
    if k > E:
        raise ValueError(f"k: expected <= E={E}, got {k}")
    if case.skew == "uniform":
        ids = torch.rand(T, E, device=device).argsort(-1)[:, :k]
    elif case.skew == "one":
        ids = torch.arange(k, device=device).expand(T, k)
    elif case.skew == "distinct":
        ids = (torch.arange(T * k, device=device).view(T, k)) % E
    else:
        raise ValueError(f"skew: expected one of {SKEWS}, got {case.skew!r}")
    gates = torch.rand(T, k, device=device) + 0.1
    return ids.contiguous().long(), gates / gates.sum(-1, keepdim=True)


def make_inputs(case: Case, dtype: torch.dtype, device) -> dict:
    """Inputs of one case, scaled like a trained layer (unit-variance x, nonzero B)."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=g) * std).to(device=device, dtype=dtype)

    ids, gates = make_routing(case, device)
    return dict(x=randn(case.T, case.d_in), weight=randn(case.d_out, case.d_in,
                                                         std=case.d_in ** -0.5),
                bias=None, A=randn(case.E, case.r, case.d_in, std=case.d_in ** -0.5),
                B=randn(case.E, case.d_out, case.r, std=case.r ** -0.5),
                expert_ids=ids, gates=gates.to(dtype), scaling=2.0)


def timed_backends(device: torch.device) -> list[str]:
    """Backends to time: every backend available on ``device``; the Triton interpreter
    (``TRITON_INTERPRET=1`` on a CPU) is never timed."""
    return [b for b in ops.available_backends(device) if device.type == "cuda" or b == "torch"]


def build_methods(case: Case, inp: dict, backends: list[str]) -> dict[str, Callable]:
    """``name -> fn()`` computing the layer output (or the LoRA delta) of one case."""
    x, W, b, A, B = inp["x"], inp["weight"], inp["bias"], inp["A"], inp["B"]
    ids, gates, s = inp["expert_ids"], inp["gates"], inp["scaling"]
    methods = {"linear": lambda: F.linear(x, W, b)}
    for be in backends:
        methods[f"molora_linear[{be}]"] = (
            lambda be=be: ops.molora_linear(x, W, b, A, B, ids, gates, None, s, backend=be,
                                            check_values=VALUE_CHECKS))
        methods[f"molora_delta[{be}]"] = (
            lambda be=be: ops.molora_delta(x, A, B, ids, gates, None, s, backend=be,
                                           check_values=VALUE_CHECKS))
    if x.device.type == "cuda" and "triton" in backends and fused_applies(case):
        methods[FUSED_METHOD] = with_env(
            FUSED_ENV, lambda: ops.molora_linear(x, W, b, A, B, ids, gates, None, s,
                                                 backend="triton", check_values=VALUE_CHECKS))
    methods["loop_linear"] = lambda: loop_linear(x, W, b, A, B, ids, gates, None, s)
    methods["loop_delta"] = lambda: loop_delta(x, A, B, ids, gates, None, s)
    if case.k == 1:
        peft = PeftMixedBatch(W, b, A, B, s)
        names = PeftMixedBatch.names(ids)
        methods["peft_mixed"] = lambda: peft(x, names)
    return methods


def fused_applies(case: Case) -> bool:
    """Whether ``DATALORA_FUSED_LINEAR=1`` runs the fused kernel for this case: it fuses the
    dense strategy only (grouped shapes keep cuBLAS + expand, which ``[triton]`` times)."""
    from datalora.ops.triton_backend import choose_strategy

    return choose_strategy(case.E, case.r, case.k) == "dense"


def with_env(env: dict[str, str], fn: Callable) -> Callable:
    """``fn`` with the variables of ``env`` set for the call (restored after it). The result
    keeps ``env`` and ``inner = fn``: :func:`time_cuda` sets ``env`` once around all of its
    timed calls of ``inner``, so setting it is not timed (microseconds: a launch-bound
    small-T layer's time would carry them)."""
    def call():
        with env_set(env):
            return fn()
    call.env, call.inner = env, fn
    return call


@contextlib.contextmanager
def env_set(env: dict[str, str]):
    """The variables of ``env`` set in ``os.environ`` within the block, restored after it."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def rel_max_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |out - ref| / max |ref|`` (out compared in fp32 with the fp32 ``ref``)."""
    return ((out.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def worst_error(errors: list[float], tol: float) -> tuple[float | None, str]:
    """``(max of errors, PASS / FAIL against tol)``, ``(None, NOT_RUN)`` without errors:
    the verdict of the outputs-match targets."""
    worst = max(errors) if errors else None
    return worst, "NOT_RUN" if worst is None else "PASS" if worst <= tol else "FAIL"


def output_errors(methods: dict[str, Callable], inp: dict) -> dict[str, float | None]:
    """Each method's forward output against the per-expert loop run in fp32 (whole layer or
    LoRA part, as the method computes): ``max |out - ref| / max |ref|`` (None for the base
    linear), so every timed method is checked to compute the same layer in the run."""
    f32 = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v
           for k, v in inp.items()}
    args = (f32["A"], f32["B"], f32["expert_ids"], f32["gates"], None, f32["scaling"])
    errors: dict[str, float | None] = {}
    with torch.no_grad():
        refs = {"delta": loop_delta(f32["x"], *args),
                "linear": loop_linear(f32["x"], f32["weight"], f32["bias"], *args)}
        for name, fn in methods.items():
            if name == "linear":
                errors[name] = None
                continue
            errors[name] = rel_max_error(fn(), refs["delta" if "delta" in name else "linear"])
    return errors


def as_step(fn: Callable, mode: str, inp: dict, grad_out: torch.Tensor) -> Callable:
    """``fwd``: fn under no_grad. ``fwd_bwd``: fn then backward of ``grad_out``. A
    :func:`with_env` fn gives a :func:`with_env` step (its env set around the whole step)."""
    if hasattr(fn, "env"):
        return with_env(fn.env, as_step(fn.inner, mode, inp, grad_out))
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return fn()
        return step
    leaves = [inp["x"], inp["A"], inp["B"]]

    def step():
        for t in leaves:
            t.grad = None
        out = fn()
        out.backward(grad_out)
    return step


# ----------------------------------------------------------------------------- timers
def paired_ratio(times: list[float], base: list[float]) -> float:
    """Median over rounds of ``times[i] / base[i]``: the two ran back to back in each round,
    so load that drifts between rounds cancels (the ratio of medians does not pair them)."""
    return statistics.median(t / b for t, b in zip(times, base, strict=True))


# do_bench's warm-up and timed windows (its defaults, 25 / 100 ms, give the ~600 timings of
# the gpu preset a 75 s floor; a device lease is 15 minutes), widened for slow calls so
# the median and quantiles come from at least MIN_TIMED_CALLS calls (do_bench times
# rep / estimate of them: 1-2 for a 30 ms fwd + bwd of the loop at T = 16384)
DO_BENCH_WARMUP_MS = 10
DO_BENCH_REP_MS = 50
MIN_TIMED_CALLS = 7


def timed_window_ms(call_ms: float) -> float:
    """do_bench's ``rep`` for a call of about ``call_ms``: at least ``DO_BENCH_REP_MS`` and
    long enough for ``MIN_TIMED_CALLS`` calls."""
    return max(DO_BENCH_REP_MS, MIN_TIMED_CALLS * call_ms)


def graph_safe(method: str) -> bool:
    """Methods timed from a CUDA graph too: the base linear and datalora's ops (called with
    ``check_values=False``, they never read the device from the host); the per-expert loop
    and PEFT select tokens with data-dependent shapes, which a graph cannot capture."""
    return method == "linear" or method.startswith("molora")


def time_cuda_graphs(steps: dict[str, Callable]) -> dict[str, float | None]:
    """``name -> graph_ms`` (:func:`benchmarks.timing.cuda_graph_ms`) for the
    :func:`graph_safe` methods, None for the others."""
    out = {}
    for name, call in steps.items():
        out[name] = None
        if graph_safe(name):
            with env_set(getattr(call, "env", {})):
                out[name] = cuda_graph_ms(getattr(call, "inner", call))
    return out


GPU_ROUNDS = 5
"""Round-robin rounds of :func:`time_cuda`: each method's window is split into this many,
interleaved with the other methods' (as the CPU timer interleaves its calls)."""


def time_cuda(steps: dict[str, Callable], grad_leaves: list[torch.Tensor]):
    """``triton.testing.do_bench`` + peak memory: ``name -> (med, q20, q80, mem_mb,
    round_ms)``, ``round_ms`` the median of each round's window.

    Each method's window is split into :data:`GPU_ROUNDS` shorter ``do_bench`` windows
    taken round-robin with the other methods'; the result is the median (and 20 / 80 %
    quantiles) of the windows' medians. A host-bound method's time depends on the host
    while it is timed: timed one after another, identical work differed up to 2x between
    rows. A :func:`with_env` step is timed as its ``inner`` with its ``env`` set around
    each of its windows."""
    from triton.testing import do_bench

    plans = {}
    for name, call in steps.items():
        with env_set(getattr(call, "env", {})):
            fn = getattr(call, "inner", call)
            plans[name] = (fn, _window_ms(fn) / GPU_ROUNDS)
    medians: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(GPU_ROUNDS):
        for name, call in steps.items():
            fn, rep = plans[name]
            with env_set(getattr(call, "env", {})):
                value = do_bench(fn, warmup=DO_BENCH_WARMUP_MS / GPU_ROUNDS, rep=rep,
                                 quantiles=[0.5], grad_to_none=grad_leaves)
            medians[name].append(value[0] if isinstance(value, (list, tuple)) else value)
    out = {}
    for name, call in steps.items():
        with env_set(getattr(call, "env", {})):
            peak = _peak_memory_mb(plans[name][0], grad_leaves)
        med, q20, q80, _ = quantiles(medians[name])
        out[name] = (med, q20, q80, peak, medians[name])
    return out


def _window_ms(fn: Callable) -> float:
    """The first call (allocator, autotuning) outside any estimate, then one timed call:
    the ``do_bench`` window for ``fn`` (:func:`timed_window_ms`)."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return timed_window_ms((time.perf_counter() - start) * 1e3)


def _peak_memory_mb(fn: Callable, grad_leaves: list[torch.Tensor]) -> float:
    """Memory one call allocates at its peak beyond what is allocated before it."""
    torch.cuda.synchronize()
    for t in grad_leaves:  # the last timed call's gradients are not part of the baseline
        t.grad = None
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# ----------------------------------------------------------------------------- run
def run_case(case: Case, preset: dict, device: torch.device, backends: list[str]) -> list[dict]:
    dtype = preset["dtype"]
    inp = make_inputs(case, dtype, device)
    methods = build_methods(case, inp, backends)
    errors = output_errors(methods, inp)
    rows = []
    for mode in MODES:
        if mode == "fwd_bwd":
            for name in ("x", "A", "B"):
                inp[name].requires_grad_(True)
        grad_out = torch.randn(case.T, case.d_out, device=device, dtype=dtype)
        steps = {n: as_step(fn, mode, inp, grad_out) for n, fn in methods.items()
                 if not (mode == "fwd_bwd" and n == "peft_mixed")}
        if device.type == "cuda":
            timed = time_cuda(steps, [inp["x"], inp["A"], inp["B"]])
            graphs = time_cuda_graphs(steps)
            extra = {n: dict(peak_mem_mb=v[3], round_ms=v[4], graph_ms=graphs[n],
                             graph_ratio_vs_linear=None if graphs[n] is None
                             else graphs[n] / graphs["linear"])
                     for n, v in timed.items()}
            gpu_name = torch.cuda.get_device_name(device)
        else:
            timed = time_interleaved(steps, device, preset["budget_s"], preset["min_reps"],
                                     preset["max_reps"])
            extra = {n: dict(min_ms=v[3], reps=v[4], round_ms=v[5],
                             paired_ratio_vs_linear=paired_ratio(v[5], timed["linear"][5]))
                     for n, v in timed.items()}
            gpu_name = None
        for name, (med, q20, q80, *_) in timed.items():
            lora_part = name.startswith("molora_delta") or name == "loop_delta"
            loop = "loop_delta" if lora_part else "loop_linear"
            rows.append(dict(
                case=case.id, **dataclasses.asdict(case), dtype=str(dtype).removeprefix("torch."),
                method=name, mode=mode, median_ms=med, q20_ms=q20, q80_ms=q80,
                ratio_vs_linear=med / timed["linear"][0],
                speedup_vs_loop=timed[loop][0] / med if loop in timed else None,
                rel_err_vs_fp32_loop=errors[name],
                **_floor(gpu_name, case, name, mode, dtype, med), **extra[name]))
        for name in ("x", "A", "B"):
            inp[name].requires_grad_(False)
    return rows


def _floor(gpu_name: str | None, case: Case, method: str, mode: str, dtype: torch.dtype,
           median_ms: float) -> dict:
    """``floor_ms`` (``benchmarks.roofline``) and ``fraction_of_floor = floor / median``
    on a modelled GPU (H100 / A100 / H200); None on the CPU or another device."""
    short = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype)
    floor = (None if gpu_name is None or short is None else roofline.molora_floor_ms(
        gpu_name, method, mode, short, **dataclasses.asdict(case)))
    return dict(floor_ms=floor, fraction_of_floor=None if floor is None else floor / median_ms,
                floor_passes=None if floor is None else 1 if roofline.one_pass(method) else 2)


def _git_commit() -> tuple[str | None, bool | None]:
    return git_commit(Path(__file__).resolve().parents[1])


def metadata(preset_name: str, device: torch.device, backends: list[str]) -> dict:
    sha, dirty = _git_commit()
    cuda = device.type == "cuda"
    return dict(
        preset=preset_name, device=device.type,
        device_name=torch.cuda.get_device_name(device) if cuda else cpu_model(),
        cpu_model=cpu_model(), cpu_threads=torch.get_num_threads(),
        load_average=list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        dtype=str(PRESETS[preset_name]["dtype"]).removeprefix("torch."), backends=backends,
        timer=(f"triton.testing.do_bench in {GPU_ROUNDS} windows per method, round-robin over "
               f"methods (median and 20/80% quantiles of the window medians)" if cuda else
               "perf_counter, round-robin over methods, median of reps (20/80% quantiles)"),
        torch=torch.__version__, triton=package_version("triton"),
        transformers=package_version("transformers"), peft=package_version("peft"),
        datalora=package_version("datalora"), python=platform.python_version(),
        cuda=torch.version.cuda if cuda else None,
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        git_commit=sha, git_dirty=dirty, argv=sys.argv[1:],
        value_checks=("per call" if VALUE_CHECKS else
                      "off (check_values=False, as MoLoRALinear layers call the ops after "
                      "their shared routing's one check per forward)"))


# ----------------------------------------------------------------------------- targets
def _find(rows, method, mode, **shape):
    for row in rows:
        if row["method"] == method and row["mode"] == mode and all(
                row[k] == v for k, v in shape.items()):
            return row
    return None


def _ratio_ci95(num: dict | None, den: dict | None) -> list[float] | None:
    """95 % bootstrap interval of ``num``'s median over ``den``'s, two rows of one case
    (timed round-robin: whole rounds resampled, see :func:`benchmarks.timing.bootstrap_ci`);
    None without their per-round times."""
    if not num or not den or not num.get("round_ms") or not den.get("round_ms"):
        return None
    return bootstrap_ci({"num": num["round_ms"], "den": den["round_ms"]},
                        lambda m: m["num"] / m["den"])


def check_targets(rows: list[dict], preset_name: str, backends: list[str]) -> list[dict]:
    """The issue's targets, each ``PASS``/``FAIL`` (``NOT_RUN`` when its case is absent)."""
    preset = PRESETS[preset_name]
    T, d = preset["target_T"], preset["target_d"]
    main = dict(group="T_sweep", T=T, d_in=d, d_out=d, E=8, r=16, k=2, skew="uniform")
    out = []

    def target(name, desc, num, den, mode, op, threshold, shape_num=main, shape_den=main):
        a, b = _find(rows, num, mode, **shape_num), _find(rows, den, mode, **shape_den)
        value = a["median_ms"] / b["median_ms"] if a and b else None
        status = ("NOT_RUN" if value is None else
                  "PASS" if (value <= threshold if op == "<=" else value >= threshold)
                  else "FAIL")
        # CPU, against the base linear of the same case: the per-round paired ratio too
        # (reported beside the ratio of medians, which decides the status)
        paired = (a.get("paired_ratio_vs_linear") if a and den == "linear"
                  and shape_num == shape_den else None)
        out.append(dict(name=name, description=desc, value=value, op=op, threshold=threshold,
                        status=status, numerator=f"{num} {mode}", denominator=f"{den} {mode}",
                        shape=shape_num, paired_value=paired,
                        ci95=_ratio_ci95(a, b) if shape_num == shape_den else None))

    errors = [r["rel_err_vs_fp32_loop"] for r in rows
              if r.get("rel_err_vs_fp32_loop") is not None]
    tol = AGREE_TOL[preset["dtype"]]
    worst, status = worst_error(errors, tol)
    out.append(dict(name="outputs_match_fp32_loop", description=f"every method's output within "
                    f"{tol} of the per-expert loop in fp32 (max abs error / max abs value)",
                    value=worst, op="<=", threshold=tol, status=status,
                    numerator="rel_err_vs_fp32_loop", denominator=None, shape=None,
                    paired_value=None, ci95=None))
    if preset_name == "gpu":
        for be in backends:
            ml, md = f"molora_linear[{be}]", f"molora_delta[{be}]"
            target(f"gpu_{be}_layer_fwd_vs_linear", "molora_linear fwd <= 1.10x base linear",
                   ml, "linear", "fwd", "<=", 1.10)
            target(f"gpu_{be}_layer_fwd_bwd_vs_linear",
                   "molora_linear fwd+bwd <= 1.15x base linear", ml, "linear", "fwd_bwd",
                   "<=", 1.15)
            for mode in MODES:
                target(f"gpu_{be}_delta_{mode}_speedup_vs_loop",
                       f"loop_delta / molora_delta ({mode}) >= 4", "loop_delta", md, mode,
                       ">=", 4.0)
            if be == "triton" and any(r["method"] == FUSED_METHOD for r in rows):
                target("gpu_triton-fused_layer_fwd_vs_linear",
                       "molora_linear (fused kernel) fwd <= 1.10x base linear", FUSED_METHOD,
                       "linear", "fwd", "<=", 1.10)
                target("gpu_triton-fused_layer_fwd_bwd_vs_linear",
                       "molora_linear (fused kernel) fwd+bwd <= 1.15x base linear",
                       FUSED_METHOD, "linear", "fwd_bwd", "<=", 1.15)
            tenant = dict(group="tenant", T=64, d_in=d, d_out=d, E=64, k=1)
            target(f"gpu_{be}_tenant_distinct_vs_one",
                   "k=1 fwd, 64 tokens: every token a different adapter (E = 64) <= 1.2x all "
                   "on one adapter", ml, ml, "fwd", "<=", 1.2,
                   shape_num={**tenant, "skew": "distinct"}, shape_den={**tenant, "skew": "one"})
            balanced = dict(group="tenant", T=T, d_in=d, d_out=d, E=8, k=1)
            target(f"gpu_{be}_tenant_balanced_vs_one",
                   "k=1 fwd: tokens spread evenly over 8 adapters <= 1.2x all on one adapter",
                   ml, ml, "fwd", "<=", 1.2, shape_num={**balanced, "skew": "distinct"},
                   shape_den={**balanced, "skew": "one"})
    elif preset_name == "cpu":
        ml, md = "molora_linear[torch]", "molora_delta[torch]"
        target("cpu_layer_fwd_bwd_speedup_vs_loop",
               "loop_linear / molora_linear fwd+bwd >= 1.35", "loop_linear", ml, "fwd_bwd",
               ">=", 1.35)
        target("cpu_layer_fwd_bwd_vs_linear", "molora_linear fwd+bwd <= 1.25x base linear",
               ml, "linear", "fwd_bwd", "<=", 1.25)
        for mode in MODES:
            target(f"cpu_delta_{mode}_speedup_vs_loop",
                   f"loop_delta / molora_delta ({mode}) >= 2", "loop_delta", md, mode, ">=", 2.0)
    return out


# ----------------------------------------------------------------------------- main
def wait_quiet(max_load: float | None, max_wait_s: float, log=print) -> float | None:
    """Sleeps until the 1-minute load average is below ``max_load`` (at most max_wait_s).

    The CPU is shared on a dev machine; the load seen by each case goes into its rows.
    """
    if not hasattr(os, "getloadavg"):
        return None
    waited = 0.0
    while max_load is not None and os.getloadavg()[0] > max_load and waited < max_wait_s:
        if waited == 0:
            log(f"  (load {os.getloadavg()[0]:.1f} > {max_load}: waiting up to {max_wait_s}s)")
        time.sleep(5.0)
        waited += 5.0
    return os.getloadavg()[0]


def result_path(out_dir: Path, stem: str, only: str | None) -> Path:
    """``<stem>.json``, or for a run filtered by ``--only`` ``<stem>_only-<SUBSTR>.json``:
    a partial run never replaces a full run's file (nor is merged into it: its rows would
    take the other run's provenance)."""
    if only is None:
        return out_dir / f"{stem}.json"
    return out_dir / f"{stem}_only-{re.sub(r'[^A-Za-z0-9._-]+', '_', only)}.json"


def run(preset_name: str, out_dir: Path, device: torch.device | None = None,
        plot: bool = True, log=print, only: str | None = None, max_load: float | None = None,
        max_wait_s: float = 120.0) -> dict:
    """Runs a preset, writes ``molora_<preset>.json`` (+ ``.png``) to out_dir, returns it.

    ``only``: run just the cases whose id contains this substring, written to
    ``molora_<preset>_only-<SUBSTR>.json`` (:func:`result_path`). ``max_load`` (CPU):
    before each case wait (up to ``max_wait_s``) for the 1-minute load average to drop
    below it.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preset = PRESETS[preset_name]
    backends = timed_backends(device)
    meta = metadata(preset_name, device, backends)
    meta["roofline_device"] = (roofline.device_key(meta["device_name"])
                               if device.type == "cuda" else None)
    log(f"# {preset_name} on {meta['device_name']} ({meta['dtype']}), backends {backends}")
    rows = []
    cases = [c for c in preset["cases"] if only is None or only in c.id]
    if not cases:
        raise ValueError(f"only: no case id of preset {preset_name!r} contains {only!r}")
    path = result_path(out_dir, f"molora_{preset_name}", only)
    partial = progress_path(path)
    meta["complete"], meta["only"] = False, only
    for i, case in enumerate(cases):
        load = wait_quiet(max_load if device.type == "cpu" else None, max_wait_s, log)
        t0 = time.perf_counter()
        case_rows = run_case(case, preset, device, backends)
        for row in case_rows:
            row["load_1m"] = load
        rows += case_rows
        log(format_case(case, case_rows) + f"   [{time.perf_counter() - t0:.1f}s]")
        if i + 1 < len(cases):  # partial results survive a run that is cut short
            write_result(partial, SCHEMA, meta, rows,
                         check_targets(rows, preset_name, backends))
    targets = check_targets(rows, preset_name, backends)
    meta["complete"] = only is None
    result = write_result(path, SCHEMA, meta, rows, targets)
    finish_progress(path, partial)
    log(format_targets(targets))
    log(f"wrote {path}")
    if plot:
        from benchmarks.plot import plot_file

        write_plot(plot_file, path, log)
    return result


def write_plot(plot_file: Callable[[Path], Path], path: Path, log=print) -> None:
    """Draws ``path``'s plot with ``plot_file``; without matplotlib logs a warning instead
    (the JSON is already written)."""
    try:
        log(f"wrote {plot_file(path)}")
    except ImportError as exc:
        log(f"warning: no plot ({exc}; {NO_PLOT_HINT})")


def progress_path(path: Path) -> Path:
    """Where a run writes its rows so far (its result rewritten after every case, so a run
    cut short keeps them): ``path`` itself, unless ``path`` holds a complete run's result,
    which a run cut short must not replace; then ``<stem>.partial.json`` beside it (the
    finished run writes ``path`` and removes it: :func:`finish_progress`)."""
    try:
        complete = json.loads(path.read_text())["meta"]["complete"] is True
    except (OSError, ValueError, KeyError, TypeError):
        complete = False
    return path.with_name(f"{path.stem}.partial.json") if complete else path


def finish_progress(path: Path, partial: Path) -> None:
    """Removes the progress file of a run whose final result is now at ``path``."""
    if partial != path:
        partial.unlink(missing_ok=True)


def write_result(path: Path, schema: str, meta: dict, rows: list[dict],
                 targets: list[dict]) -> dict:
    """Writes one benchmark result file atomically (load average at the end added to meta)."""
    from datalora.io import atomic_write_text

    if hasattr(os, "getloadavg"):
        meta["load_average_end"] = list(os.getloadavg())
    result = {"schema": schema, "meta": meta, "results": rows, "targets": targets}
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")
    return result


def vs_loop(speedup: float) -> str:
    """``speedup`` (loop time / this method's) as words: ``  1.47x slower than loop`` for
    0.68, not "0.68x faster"."""
    if speedup >= 1:
        return f"  {speedup:.2f}x faster than loop"
    return f"  {1 / speedup:.2f}x slower than loop"


def format_case(case: Case, rows: list[dict]) -> str:
    lines = [case.id]
    for row in rows:
        # the base linear does less work than the loop: no "faster than loop" for it
        loop = (None if row["method"].startswith("loop") or row["method"] == "linear"
                else row["speedup_vs_loop"])
        frac, err = row.get("fraction_of_floor"), row.get("rel_err_vs_fp32_loop")
        wrong = err is not None and err > AGREE_TOL.get(getattr(torch, row["dtype"]), 1e-4)
        lines.append(f"  {row['mode']:8s} {row['method']:22s} {row['median_ms']:10.3f} ms "
                     f"[{row['q20_ms']:.3f}, {row['q80_ms']:.3f}]  x{row['ratio_vs_linear']:.3f}"
                     " vs linear" + (vs_loop(loop) if loop else "")
                     + (f"  {frac:.0%} of roofline" if frac is not None else "")
                     + (f"  graph {row['graph_ms']:.3f} ms x{row['graph_ratio_vs_linear']:.3f}"
                        if row.get("graph_ms") is not None else "")
                     + (f"  WRONG OUTPUT (rel err {err:.2g} vs the fp32 loop)" if wrong else ""))
    return "\n".join(lines)


def format_targets(targets: list[dict]) -> str:
    lines = ["targets:"] if targets else ["targets: none for this preset"]
    for t in targets:
        v = "n/a" if t["value"] is None else f"{t['value']:.3f}"
        paired = ("" if t.get("paired_value") is None
                  else f", paired per round {t['paired_value']:.3f}")
        ci = "" if t.get("ci95") is None else " " + format_ci(t["ci95"])
        lines.append(f"  {t['status']:7s} {t['name']}: {v}{ci} {t['op']} {t['threshold']}"
                     f"  ({t['description']}{paired})")
    return "\n".join(lines)


def cli_preset(parser: argparse.ArgumentParser, preset: str | None) -> str:
    """The preset to run: ``preset``, else gpu with CUDA and cpu without; gpu without CUDA
    is a parser error."""
    preset = preset or ("gpu" if torch.cuda.is_available() else "cpu")
    if preset == "gpu" and not torch.cuda.is_available():
        parser.error("--preset gpu needs a CUDA device")
    return preset


def check_cli_out(parser: argparse.ArgumentParser, out: Path) -> None:
    """``--out`` must be a folder (or not exist yet): checked before any case runs."""
    if out.exists() and not out.is_dir():
        parser.error(f"--out: expected a folder, got the file {out}")


def budget_cli(prog: str, doc: str, filename: str, budget_s: float,
               budget_help: str) -> argparse.ArgumentParser:
    """A benchmark's parser with ``--out`` (the folder for ``filename``) and ``--budget-s``
    (default ``budget_s``); read it with :func:`parse_budget_cli`."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR,
                        help=f"directory for {filename} (default: %(default)s)")
    parser.add_argument("--budget-s", type=float, default=budget_s,
                        help=f"{budget_help} (default: %(default)s)")
    return parser


def parse_budget_cli(parser: argparse.ArgumentParser,
                     argv: list[str] | None) -> argparse.Namespace:
    """Arguments of a :func:`budget_cli` parser, ``--out`` and ``--budget-s`` checked."""
    args = parser.parse_args(argv)
    check_cli_out(parser, args.out)
    if not args.budget_s > 0:
        parser.error(f"--budget-s: expected > 0, got {args.budget_s}")
    return args


def check_cli_only(parser: argparse.ArgumentParser, only: str | None, preset: str,
                   names: list[str]) -> None:
    """``--only SUBSTR`` must match one of the preset's case ``names``."""
    if only is not None and not any(only in name for name in names):
        parser.error(f"--only: no case of preset {preset!r} contains {only!r}; its cases: "
                     + ", ".join(names))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.molora", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="gpu | cpu | smoke (default: gpu with CUDA, else cpu)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR,
                        help="output folder (default: benchmarks/results in the repository)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--only", default=None, metavar="SUBSTR",
                        help="run only the cases whose id contains SUBSTR (e.g. T_sweep/T2048);"
                             " a partial run draws no plot")
    parser.add_argument("--threads", type=int_at_least(1), default=None,
                        help="torch CPU threads, >= 1 (default: torch's default)")
    parser.add_argument("--max-load", type=positive_float, default=None,
                        help="CPU: before each case wait for the 1-min load average to drop "
                             "below this (at most --max-wait seconds)")
    parser.add_argument("--max-wait", type=non_negative_float, default=120.0,
                        help="seconds --max-load waits at most before each case (default: 120)")
    args = parser.parse_args(argv)
    preset = cli_preset(parser, args.preset)
    check_cli_out(parser, args.out)
    check_cli_only(parser, args.only, preset, [c.id for c in PRESETS[preset]["cases"]])
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    run(preset, args.out, plot=not args.no_plot and args.only is None, only=args.only,
        max_load=args.max_load, max_wait_s=args.max_wait)
    return 0


if __name__ == "__main__":
    sys.exit(main())
