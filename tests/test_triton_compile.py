"""Compiles every Triton kernel for sm_80 and sm_90 on the CPU (DESIGN.md section 5).

The interpreter accepts code that real GPU compilation rejects, so each kernel is
built with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` for every
constexpr set its launcher can pick (``launch_configs()`` of each kernel module) in fp16,
bf16 and fp32, and the cubin is checked with Triton's bundled ``cuobjdump
--dump-resource-usage``: no compile error, no register spills (STACK == 0) and shared
memory within the chip's per-block limit (A100 164 KB, H100 228 KB).

The compile runs in a subprocess with ``TRITON_INTERPRET`` removed, so it is independent
of the interpreter the other Triton tests use. Results are cached under
``~/.cache/datalora/triton-compile`` (or ``$DATALORA_CACHE_DIR``) keyed by the hash of the
kernel sources, this file and the Triton version; a cold run compiles 216 variants
(about 4 minutes on 2 cores, ``DATALORA_COMPILE_JOBS`` sets the worker count).
"""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")

REPO = pathlib.Path(__file__).resolve().parents[1]
MODULES = ("shrink", "expand", "backward", "tokens")
ARCHS = {80: 164 * 1024, 90: 228 * 1024}  # compute capability -> max shared bytes/block
DTYPES = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}
# pointer arguments whose element type does not follow x's dtype
FIXED_POINTERS = {
    "ids_ptr": "*i32", "keep_ptr": "*i32", "inv_ptr": "*i32",
    "order_ptr": "*i64", "offsets_ptr": "*i64",
    "gates_ptr": "*fp32", "rs_ptr": "*fp32", "dg_ptr": "*fp32", "drs_ptr": "*fp32",
    "weight_ptr": "*fp32",
}
FLOAT_SCALARS = {"mult", "alpha"}
# extra pointer-type variants a launcher uses (grouped expand into fp32 per-route partials)
VARIANTS = {"_expand_grouped_kernel": [{}, {"y_ptr": "*fp32"}]}


def _import_kernels():
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


def _resource_usage(cubin: bytes, path: pathlib.Path) -> dict[str, int]:
    import triton

    path.write_bytes(cubin)
    tool = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    text = subprocess.run([str(tool), "--dump-resource-usage", str(path)], check=True,
                          capture_output=True, text=True).stdout
    usage = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        found = re.findall(rf"\b{key}:(\d+)", text)
        usage[key] = max(int(v) for v in found) if found else -1
    return usage


def _jobs():
    only = os.environ.get("DATALORA_COMPILE_ONLY", "")  # comma-separated kernel names
    seen = set()
    for mod_name, mod in _import_kernels().items():
        for kernel_name, configs in mod.launch_configs().items():
            if only and kernel_name not in only.split(","):
                continue
            for overrides in VARIANTS.get(kernel_name, [{}]):
                for launch in configs:
                    cfg = {k: v for k, v in launch.items() if k not in ("num_warps", "dtypes")}
                    for dtype in launch.get("dtypes", DTYPES):
                        for cc in ARCHS:
                            job = (mod_name, kernel_name, cfg, overrides, dtype, cc,
                                   launch.get("num_warps", 4))
                            if repr(job) not in seen:  # configs may coincide per dtype
                                seen.add(repr(job))
                                yield job


def _compile_one(job):
    import triton
    from triton.backends.compiler import GPUTarget

    mod_name, kernel_name, cfg, overrides, dtype, cc, warps = job
    fn = getattr(_import_kernels()[mod_name], kernel_name)
    src = triton.compiler.ASTSource(fn, _signature(fn, cfg, dtype, overrides), dict(cfg))
    target = GPUTarget("cuda", cc, 32)
    options = triton.compiler.make_backend(target).parse_options({"num_warps": warps})
    result = dict(kernel=kernel_name, config=cfg, num_warps=warps, overrides=overrides,
                  dtype=dtype, cc=cc)
    try:
        compiled = triton.compile(src, target=target, options=options.__dict__)
    except Exception as exc:  # report every failure, not only the first
        return {**result, "error": f"{type(exc).__name__}: {str(exc)[:2000]}"}
    tmp = pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / f"dl_{os.getpid()}.cubin"
    usage = _resource_usage(compiled.asm["cubin"], tmp)
    return {**result, **usage, "shared_meta": compiled.metadata.shared}


def main() -> None:
    from concurrent.futures import ProcessPoolExecutor

    jobs = list(_jobs())
    workers = int(os.environ.get("DATALORA_COMPILE_JOBS", min(2, os.cpu_count() or 1)))
    with ProcessPoolExecutor(workers) as pool:
        for row in pool.map(_compile_one, jobs, chunksize=4):
            print(json.dumps(row), flush=True)


def _cache_file() -> pathlib.Path:
    """Result cache keyed by the kernel sources, this file and the Triton version."""
    import hashlib

    import triton

    digest = hashlib.sha256(triton.__version__.encode())
    for path in sorted((REPO / "kernels").glob("*.py")) + [pathlib.Path(__file__)]:
        digest.update(path.read_bytes())
    root = os.environ.get("DATALORA_CACHE_DIR") or pathlib.Path.home() / ".cache" / "datalora"
    return pathlib.Path(root) / "triton-compile" / f"{digest.hexdigest()[:24]}.jsonl"


@pytest.fixture(scope="module")
def compile_results():
    cache = _cache_file()
    if cache.exists():
        return [json.loads(line) for line in cache.read_text().splitlines()]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                          cwd=REPO, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, proc.stderr[-4000:]
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text("\n".join(lines) + "\n")
    return [json.loads(line) for line in lines]


def test_every_kernel_compiles(compile_results):
    mods = _import_kernels()
    expected = {k for m in mods.values() for k in m.launch_configs()}
    assert {r["kernel"] for r in compile_results} == expected
    errors = [f"{r['kernel']} {r['config']} {r['dtype']} sm_{r['cc']}: {r['error']}"
              for r in compile_results if "error" in r]
    assert not errors, "\n".join(errors)


def test_no_spills_and_shared_memory_fits(compile_results):
    bad = []
    for r in compile_results:
        if "error" in r:
            continue
        shared = max(r["SHARED"], r["shared_meta"])
        if r["STACK"] != 0 or r["LOCAL"] > 0 or shared > ARCHS[r["cc"]] or r["REG"] <= 0:
            bad.append(f"{r['kernel']} {r['config']} {r['dtype']} sm_{r['cc']}: REG {r['REG']}"
                       f" STACK {r['STACK']} LOCAL {r['LOCAL']} SHARED {shared}")
    assert not bad, "\n".join(bad)


if __name__ == "__main__":
    main()
