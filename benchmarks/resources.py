"""GPU resource usage without a GPU: every kernel compiled for sm_80 and sm_90 on the CPU.

    python -m benchmarks.resources            # writes results/resource_usage.md
    python -m benchmarks.resources --check    # exit 1 on errors / spills / shared memory
    python -m benchmarks.resources --triton-only   # the Triton half alone, any release

The table is built with the development Triton release (3.9); ``make compile-check-alt``
runs ``--triton-only`` under a second release in a side venv (3.6, the GPU machine's),
which allocates registers differently, so a tile that fits under one can spill under the
other.

Two halves, one table:

* **Triton** (``kernels/``): each ``@triton.jit`` kernel is built with
  ``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", cc, 32))``
  for every constexpr set its launcher can pick (``launch_configs()`` of each kernel
  module: tiles, num_warps, num_stages where the launcher sets it, ACCUMULATE, E_PAD) x
  the x dtypes that launch it (fp16 / bf16 / fp32) x the pointer-type variants of
  :data:`VARIANTS`, and the cubin's resources are read with the ``cuobjdump
  --dump-resource-usage`` bundled with Triton. The compile runs in a subprocess without
  ``TRITON_INTERPRET`` (which would turn the kernels into interpreted functions), on
  ``DATALORA_COMPILE_JOBS`` workers (default: 2).
* **CUDA** (``csrc/``): ``nvcc -Xptxas -v`` per arch, as ``setup.py`` builds it (the two
  archs compile in parallel); ptxas reports registers, stack frame, spill stores/loads and
  static shared memory per entry function.

A row fails on a compile error, any spill (Triton ``STACK``/``LOCAL`` > 0, ptxas stack frame
or spill stores > 0) or shared memory over the chip's per-block limit (:data:`ARCHS`).
Results are cached under ``$DATALORA_CACHE`` (default ``~/.cache/datalora``) keyed by
the hash of the sources (kernels + this file, or csrc/) and the compiler versions, so a
warm run costs nothing and any kernel edit recompiles.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import inspect
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

from datalora.io import atomic_write_text, cache_root

REPO = pathlib.Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO / "benchmarks" / "results"
TABLE = RESULTS_DIR / "resource_usage.md"
MODULES = ("shrink", "expand", "backward", "tokens", "fused_linear", "nf4_fused_linear")
ARCHS = {80: 164 * 1024, 90: 228 * 1024}  # compute capability -> max shared bytes / block
ARCH_GPU = {80: "A100", 90: "H100"}
MAX_REGISTERS = 255
DTYPES = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}
# pointer arguments whose element type does not follow x's dtype
FIXED_POINTERS = {
    "ids_ptr": "*i32", "keep_ptr": "*i32", "inv_ptr": "*i32",
    "order_ptr": "*i64", "offsets_ptr": "*i64",
    "gates_ptr": "*fp32", "rs_ptr": "*fp32", "dg_ptr": "*fp32", "drs_ptr": "*fp32",
    "weight_ptr": "*fp32",
    # NF4 weight (nf4_fused_linear): packed nibbles, fp32 or uint8 (double quant) absmax
    "data_ptr": "*u8", "qabsmax_ptr": "*u8", "absmax_ptr": "*fp32", "nested_absmax_ptr": "*fp32",
    "nested_code_ptr": "*fp32", "offset_ptr": "*fp32", "code_ptr": "*fp32",
}
FLOAT_SCALARS = {"mult", "alpha"}
# extra pointer-type variants a launcher uses (grouped expand into fp32 per-route partials
# when k > 1, see datalora.ops.triton_backend._expand_routes); X_DTYPE stands for the
# launch's dtype
X_DTYPE = "x"
VARIANTS = {"_expand_grouped_kernel": [{}, {"y_ptr": "*fp32"}],
            # the dense routing passes read the router's int64 ids as they are, and its
            # gates as they are when in x's dtype (fp32 otherwise)
            "_route_dense_kernel": [{"ids_ptr": "*i64"}, {"ids_ptr": "*i64", "gates_ptr": X_DTYPE}],
            "_dense_from_routes_kernel": [{"ids_ptr": "*i64"},
                                          {"ids_ptr": "*i64", "gates_ptr": X_DTYPE}],
            # the gate gradient is written in the gates' dtype when that is x's
            "_route_grads_kernel": [{}, {"dg_ptr": X_DTYPE},
                                    {"gates_ptr": X_DTYPE, "dg_ptr": X_DTYPE}]}
CUDA_SOURCE = REPO / "csrc" / "nf4_kernels.cu"
# process groups of the running compile subprocesses (see run_killable)
_live_groups: set[int] = set()
NVCC_FLAGS = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-Xptxas", "-v"]


def _digest(paths, *extra: str) -> str:
    h = hashlib.sha256()
    for s in extra:
        h.update(s.encode())
    for path in paths:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:24]


# ----------------------------------------------------------------------------- Triton
def _kernel_modules():
    return {m: importlib.import_module(f"datalora.kernels.{m}") for m in MODULES}


def _signature(fn, constexprs, dtype, overrides):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in overrides:
            sig[name] = overrides[name]
        elif name.endswith("_ptr"):
            sig[name] = FIXED_POINTERS.get(name, DTYPES[dtype])
        else:
            sig[name] = "fp32" if name in FLOAT_SCALARS else "i32"
    return sig


def expected_triton_rows() -> list[dict]:
    """One dict per (kernel, constexpr set, num_warps, pointer variant, dtype, arch) the
    launchers can pick: the compile matrix. Variants equal to the plain signature (fp32
    partials of an fp32 launch) are compiled once."""
    rows, seen = [], set()
    for mod_name, mod in _kernel_modules().items():
        for kernel, configs in mod.launch_configs().items():
            for launch in configs:
                cfg = {k: v for k, v in launch.items() if k not in ("num_warps", "dtypes")}
                for dtype in launch.get("dtypes", DTYPES):
                    for overrides in VARIANTS.get(kernel, [{}]):
                        resolved = {k: DTYPES[dtype] if v == X_DTYPE else v
                                    for k, v in overrides.items()}
                        # an override equal to the pointer's plain type is no variant
                        overrides = {k: v for k, v in resolved.items()
                                     if v != FIXED_POINTERS.get(k, DTYPES[dtype])}
                        for cc in ARCHS:
                            row = dict(module=mod_name, kernel=kernel, config=cfg,
                                       num_warps=launch.get("num_warps", 4),
                                       overrides=overrides, dtype=dtype, cc=cc)
                            key = json.dumps(row, sort_keys=True)
                            if key not in seen:
                                seen.add(key)
                                rows.append(row)
    return rows


def _cuobjdump_usage(cubin: bytes) -> dict[str, int]:
    import triton

    tool = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "--dump-resource-usage", f.name], check=True,
                              capture_output=True, text=True).stdout
    usage = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        found = re.findall(rf"\b{key}:(\d+)", text)
        usage[key] = max(int(v) for v in found) if found else -1
    return usage


def compile_triton(row: dict) -> dict:
    """Compiles one matrix row; returns it with REG / STACK / SHARED / LOCAL or ``error``."""
    import triton
    from datalora.kernels._common import LAUNCH_OPTIONS
    from triton.backends.compiler import GPUTarget

    fn = getattr(importlib.import_module(f"datalora.kernels.{row['module']}"), row["kernel"])
    cfg = dict(row["config"])
    opts = {"num_warps": row["num_warps"], **LAUNCH_OPTIONS}  # as the launchers pass them
    if "num_stages" in cfg:  # a launch option (fused_linear), not a constexpr
        opts["num_stages"] = cfg.pop("num_stages")
    src = triton.compiler.ASTSource(fn, _signature(fn, cfg, row["dtype"], row["overrides"]),
                                    cfg)
    target = GPUTarget("cuda", row["cc"], 32)
    options = triton.compiler.make_backend(target).parse_options(opts)
    try:
        compiled = triton.compile(src, target=target, options=options.__dict__)
    except Exception as exc:  # report every failure, not only the first
        return {**row, "error": f"{type(exc).__name__}: {str(exc)[:2000]}"}
    usage = _cuobjdump_usage(compiled.asm["cubin"])
    usage["SHARED"] = max(usage["SHARED"], compiled.metadata.shared)
    return {**row, **usage}


def _die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent dies. The compile processes run in a
    process group of their own (:func:`run_killable`), which a SIGKILL of the parent (no
    handler sees it) or of the parent's group would not reach."""
    if sys.platform.startswith("linux"):
        import ctypes

        parent = os.getppid()
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            return
        if os.getppid() != parent:  # the parent died before prctl: nobody will signal
            os._exit(1)


def _triton_worker() -> None:
    """Subprocess entry: compiles the whole matrix, one JSON line per row on stdout."""
    _die_with_parent()
    rows = expected_triton_rows()
    workers = int(os.environ.get("DATALORA_COMPILE_JOBS", min(2, os.cpu_count() or 1)))
    with ProcessPoolExecutor(workers, initializer=_die_with_parent) as pool:
        for result in pool.map(compile_triton, rows, chunksize=2):
            print(json.dumps(result), flush=True)


def run_killable(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)`` in a process group of its own,
    killed whole (a compile worker's pool processes included) when the wait ends by an
    exception: a timeout, Ctrl-C, or the SystemExit :func:`main` raises on SIGTERM. A
    SIGTERM killed this process alone (a CI timeout or ``timeout``) and left the compiles
    running on every core."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True, **kwargs) as proc:
        _live_groups.add(proc.pid)
        try:
            out, err = proc.communicate(timeout=timeout)
        except BaseException:
            _kill_group(proc.pid)
            raise
        finally:
            _live_groups.discard(proc.pid)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:  # already gone
        pass


def kill_live_groups() -> None:
    """Kill every running :func:`run_killable` group (their waits run in pool threads, which
    an exception in the main thread does not reach)."""
    for pgid in list(_live_groups):
        _kill_group(pgid)


def _code_key(*objs) -> str:
    """What of this file decides a compile result (not the table layout)."""
    return "".join(inspect.getsource(o) for o in objs)


def triton_cache_file() -> pathlib.Path:
    import triton

    key = _code_key(expected_triton_rows, _signature, compile_triton, _cuobjdump_usage)
    key += repr((DTYPES, FIXED_POINTERS, FLOAT_SCALARS, VARIANTS, ARCHS, MODULES))
    sources = sorted((REPO / "kernels").glob("*.py"))
    return cache_root() / "triton-compile" / f"{_digest(sources, triton.__version__, key)}.jsonl"


def triton_results(use_cache: bool = True) -> list[dict]:
    """The Triton matrix, from the cache or compiled in a clean subprocess."""
    cache = triton_cache_file()
    if use_cache and cache.exists():
        try:
            rows = [json.loads(line) for line in cache.read_text().splitlines()]
        except ValueError:  # damaged (a write cut short before writes were atomic)
            rows = []
        if len(rows) == len(expected_triton_rows()):
            return rows
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = run_killable([sys.executable, "-m", "benchmarks.resources", "--triton-worker"],
                        timeout=1800, env=env, cwd=REPO)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"Triton compile worker failed:\n{proc.stderr[-4000:]}")
    atomic_write_text(cache, "\n".join(lines) + "\n")
    return [json.loads(line) for line in lines]


# ----------------------------------------------------------------------------- CUDA
def nvcc_version() -> str | None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    found = re.search(r"release [\d.]+, V([\d.]+)", out)
    return found.group(1) if found else out.strip().splitlines()[-1]


def _demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt")
    if tool is None or not names:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True)
    lines = out.stdout.splitlines()
    return lines if out.returncode == 0 and len(lines) == len(names) else names


def parse_ptxas(log: str) -> list[dict]:
    """Per entry function of a ``-Xptxas -v`` log: arch, registers, stack frame, spill
    stores/loads, static shared memory (bytes)."""
    rows, current = [], None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)' for '(sm_\d+)'", line)
        if m:
            current = dict(mangled=m.group(1), cc=int(m.group(2)[3:]), REG=-1, STACK=-1,
                           spill_stores=-1, spill_loads=-1, SHARED=0)
            rows.append(current)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill "
                      r"loads", line)
        if m:
            current.update(STACK=int(m.group(1)), spill_stores=int(m.group(2)),
                           spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["REG"] = int(m.group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            current["SHARED"] = int(smem.group(1)) if smem else 0
    for row, name in zip(rows, _demangle([r["mangled"] for r in rows]), strict=True):
        row["kernel"] = _short_name(name)
    return rows


def _short_name(demangled: str) -> str:
    """``void ns::(anonymous namespace)::k<T, 4>(args)`` -> ``k<T, 4>``."""
    name = re.sub(r"^void ", "", demangled)
    name = re.sub(r"^(\w+::)*\(anonymous namespace\)::", "", name)
    depth = 0
    for i, ch in enumerate(name):  # cut the parameter list (first '(' outside <...>)
        depth += (ch == "<") - (ch == ">")
        if ch == "(" and depth == 0 and i > 0:
            return name[:i]
    return name


def _nvcc_one(cc: int) -> tuple[int, str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["nvcc", "-c", str(CUDA_SOURCE), "-o", str(pathlib.Path(tmp) / "k.o"),
               *NVCC_FLAGS, "-gencode", f"arch=compute_{cc},code=sm_{cc}"]
        proc = run_killable(cmd, timeout=900)
    return proc.returncode, proc.stdout + proc.stderr, " ".join(cmd)


def cuda_cache_file(version: str) -> pathlib.Path:
    sources = sorted((REPO / "csrc").glob("*.c*")) + sorted((REPO / "csrc").glob("*.h"))
    key = _code_key(parse_ptxas, _short_name, _nvcc_one) + repr((NVCC_FLAGS, list(ARCHS)))
    return cache_root() / "nvcc-ptxas" / f"{_digest(sources, version, key)}.json"


def cuda_results(use_cache: bool = True) -> list[dict] | None:
    """ptxas rows of every csrc/ kernel for each arch; None without nvcc. A failed compile
    becomes one ``error`` row for that arch; a killed one (an interrupted run) raises
    RuntimeError and caches nothing."""
    version = nvcc_version()
    if version is None:
        return None
    cache = cuda_cache_file(version)
    if use_cache and cache.exists():
        try:
            return json.loads(cache.read_text())
        except ValueError:  # damaged: compile again
            pass
    rows = []
    with ThreadPoolExecutor(len(ARCHS)) as pool:
        runs = list(pool.map(_nvcc_one, ARCHS))
    if any(rc < 0 for rc, _, _ in runs):  # killed (kill_live_groups): no result, not an error
        raise RuntimeError("nvcc was killed before it finished; nothing cached")
    for cc, (rc, log, cmd) in zip(ARCHS, runs, strict=True):
        if rc != 0:
            rows.append(dict(kernel=CUDA_SOURCE.name, cc=cc, error=f"{cmd}\n{log[-3000:]}"))
        else:
            rows += parse_ptxas(log)
    atomic_write_text(cache, json.dumps(rows))
    return rows


# ----------------------------------------------------------------------------- checks
def violations(triton_rows: list[dict], cuda_rows: list[dict] | None) -> list[str]:
    """Compile errors, spills, stack use and shared memory over the per-block limit."""
    bad = []
    for r in triton_rows:
        where = f"{r['kernel']} {_triton_config(r)} {r['dtype']} sm_{r['cc']}"
        if "error" in r:
            bad.append(f"{where}: compile error: {r['error']}")
        elif (r["STACK"] != 0 or r["LOCAL"] > 0 or r["REG"] <= 0 or r["REG"] > MAX_REGISTERS
              or r["SHARED"] > ARCHS[r["cc"]]):
            bad.append(f"{where}: REG {r['REG']} STACK {r['STACK']} LOCAL {r['LOCAL']} "
                       f"SHARED {r['SHARED']} (limit {ARCHS[r['cc']]})")
    for r in cuda_rows or []:
        where = f"{r['kernel']} sm_{r['cc']}"
        if "error" in r:
            bad.append(f"{where}: nvcc error: {r['error']}")
        elif (r["STACK"] != 0 or r["spill_stores"] != 0 or r["spill_loads"] != 0
              or r["REG"] <= 0 or r["SHARED"] > ARCHS[r["cc"]]):
            bad.append(f"{where}: REG {r['REG']} stack {r['STACK']} spill stores "
                       f"{r['spill_stores']} loads {r['spill_loads']} SHARED {r['SHARED']}")
    return bad


# ----------------------------------------------------------------------------- table
def _triton_config(r: dict) -> str:
    parts = [f"{k}={int(v) if isinstance(v, bool) else v}" for k, v in r["config"].items()]
    parts.append(f"warps={r['num_warps']}")
    parts += [f"{k.removesuffix('_ptr')}:{v.lstrip('*')}" for k, v in r["overrides"].items()]
    return " ".join(parts)


SM_REGISTERS = 64 * 1024
SM_MAX_WARPS = {80: 64, 90: 64}
SM_MAX_CTAS = 32


def ctas_per_sm(regs: int, warps: int, shared: int, cc: int) -> int:
    """Resident CTAs per SM allowed by registers (per-warp allocation in units of 256),
    shared memory and the warp limit: the occupancy a launch of this build can reach."""
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = SM_REGISTERS // (per_warp * warps) if regs > 0 else SM_MAX_CTAS
    by_smem = ARCHS[cc] // shared if shared > 0 else SM_MAX_CTAS
    return max(0, min(by_regs, by_smem, SM_MAX_WARPS[cc] // warps, SM_MAX_CTAS))


def _kb(n: int) -> str:
    return f"{n / 1024:.1f}"


def render_table(triton_rows: list[dict], cuda_rows: list[dict] | None, triton_version: str,
                 nvcc: str | None) -> str:
    arch_list = ", ".join(f"sm_{cc} ({ARCH_GPU[cc]}, {ARCHS[cc] // 1024} KB)" for cc in ARCHS)
    out = [
        "# Kernel resource usage (sm_80 / sm_90), compiled on the CPU",
        "",
        "Generated by `python -m benchmarks.resources`; checked by "
        "`tests/test_triton_compile.py` and `tests/test_gpu_readiness.py`.",
        f"Triton {triton_version} (`cuobjdump --dump-resource-usage`), nvcc {nvcc or 'absent'} "
        "(`-Xptxas -v`).",
        f"Archs and shared-memory limit per block: {arch_list}. Fails on compile errors, any "
        "spill or stack use, shared memory over the limit.",
        "",
    ]
    ok = [r for r in triton_rows if "error" not in r]
    if ok:
        top = max(ok, key=lambda r: r["REG"])
        top_smem = max(ok, key=lambda r: r["SHARED"])
        capped = sorted({f"{r['kernel']} ({_triton_config(r)}, {r['dtype']})" for r in ok
                         if r["REG"] >= MAX_REGISTERS})
        out += [f"Triton: {len(triton_rows)} compiles; max {top['REG']} registers "
                f"({top['kernel']} {_triton_config(top)} {top['dtype']} sm_{top['cc']}), max "
                f"shared {_kb(top_smem['SHARED'])} KB ({top_smem['kernel']} "
                f"{_triton_config(top_smem)} {top_smem['dtype']} sm_{top_smem['cc']}).",
                "*CTAs/SM*: resident blocks per SM that registers, shared memory and the "
                "64-warp limit allow (occupancy ceiling of that build).", ""]
        if capped:
            out += [f"At the {MAX_REGISTERS}-register cap (no spill, but one 8-warp block "
                    "per SM at most; first candidates for smaller tiles or fewer stages):", ""]
            out += [f"- {c}" for c in capped] + [""]
    out += ["## Triton kernels (`kernels/`)", "",
            "| kernel | config | dtype | arch | registers | spills (stack / local B) "
            "| shared KB | CTAs/SM | status |", "|---|---|---|---|--:|--:|--:|--:|---|"]
    for r in sorted(triton_rows, key=lambda r: (r["module"], r["kernel"], _triton_config(r),
                                                r["dtype"], r["cc"])):
        if "error" in r:
            out.append(f"| {r['kernel']} | {_triton_config(r)} | {r['dtype']} | sm_{r['cc']} "
                       "| – | – | – | – | compile error |")
            continue
        status = "ok" if not violations([r], None) else "FAIL"
        out.append(f"| {r['kernel']} | {_triton_config(r)} | {r['dtype']} | sm_{r['cc']} | "
                   f"{r['REG']} | {r['STACK']} / {max(r['LOCAL'], 0)} | {_kb(r['SHARED'])} | "
                   f"{ctas_per_sm(r['REG'], r['num_warps'], r['SHARED'], r['cc'])} | {status} |")
    out += ["", "## CUDA kernels (`csrc/nf4_kernels.cu`)", ""]
    if cuda_rows is None:
        out += ["nvcc not on PATH: not compiled.", ""]
    else:
        out += ["| kernel | arch | registers | spills (stack / stores / loads B) | shared KB "
                "| status |", "|---|---|--:|--:|--:|---|"]
        for r in sorted(cuda_rows, key=lambda r: (r["kernel"], r["cc"])):
            if "error" in r:
                out.append(f"| {r['kernel']} | sm_{r['cc']} | – | – | – | nvcc error |")
                continue
            status = "ok" if not violations([], [r]) else "FAIL"
            out.append(f"| `{r['kernel']}` | sm_{r['cc']} | {r['REG']} | {r['STACK']} / "
                       f"{r['spill_stores']} / {r['spill_loads']} | {_kb(r['SHARED'])} | "
                       f"{status} |")
        out.append("")
    return "\n".join(out)


def generate(use_cache: bool = True) -> tuple[str, list[str], list[dict], list[dict] | None]:
    """``(markdown, violations, triton_rows, cuda_rows)``; Triton and nvcc run concurrently."""
    import triton

    with ThreadPoolExecutor(2) as pool:
        tri = pool.submit(triton_results, use_cache)
        cu = pool.submit(cuda_results, use_cache)
        try:
            triton_rows, cuda_rows = tri.result(), cu.result()
        except BaseException:  # Ctrl-C / SIGTERM here: stop the compiles the threads wait on
            kill_live_groups()
            raise
    md = render_table(triton_rows, cuda_rows, triton.__version__, nvcc_version())
    return md, violations(triton_rows, cuda_rows), triton_rows, cuda_rows


def _exit_on_sigterm(signum: int, _frame) -> None:
    """SIGTERM as an exception, so the compile subprocesses are killed on the way out."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.resources",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=pathlib.Path, default=TABLE)
    ap.add_argument("--no-cache", action="store_true", help="recompile everything")
    ap.add_argument("--check", action="store_true",
                    help="do not write the table; exit 1 on violations or a stale table")
    ap.add_argument("--triton-only", action="store_true",
                    help="compile the Triton matrix only (no nvcc, no table); exit 1 on "
                         "violations (for checking another Triton release)")
    ap.add_argument("--triton-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if threading.current_thread() is not threading.main_thread():  # signal() would raise
        return _main(args)
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return _main(args)
    finally:
        if previous is not None:  # None: a handler installed from C, not restorable
            signal.signal(signal.SIGTERM, previous)


def _main(args: argparse.Namespace) -> int:
    if args.triton_worker:
        _triton_worker()
        return 0
    if args.triton_only:
        import triton

        rows = triton_results(use_cache=not args.no_cache)
        bad = violations(rows, None)
        for line in bad:
            print("VIOLATION", line)
        print(f"Triton {triton.__version__}: {len(rows)} kernel builds, {len(bad)} violations")
        return 1 if bad else 0
    md, bad, _, _ = generate(use_cache=not args.no_cache)
    for line in bad:
        print("VIOLATION", line)
    if args.check:
        stale = not args.out.exists() or args.out.read_text() != md
        if stale:
            print(f"{args.out} is stale: run python -m benchmarks.resources")
        return 1 if bad or stale else 0
    atomic_write_text(args.out, md)
    print(f"wrote {args.out}")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
