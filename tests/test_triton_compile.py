"""Compiles every Triton kernel for sm_80 and sm_90 on the CPU (README, "Tests").

The interpreter accepts code that real GPU compilation rejects, so each kernel is built
with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` for every
constexpr set its launcher can pick (``launch_configs()`` of each kernel module) in fp16,
bf16 and fp32, and the cubin is checked with Triton's bundled ``cuobjdump
--dump-resource-usage``: no compile error, no register spills (STACK == 0, LOCAL == 0) and
shared memory within the chip's per-block limit (A100 164 KB, H100 228 KB). The matrix and
the checks live in ``benchmarks.resources`` (which also writes
``benchmarks/results/resource_usage.md``; ``tests/test_gpu_readiness.py`` keeps that table
current and runs the nvcc half).

The compile runs in a subprocess without ``TRITON_INTERPRET``; results are cached under
``~/.cache/datalora`` (or ``$DATALORA_CACHE``) keyed by the kernel sources, the compile
code and the Triton version. Cold (measured at 208 Triton compiles; 312 now, with the fused
linear kernel's 32, the NF4 fused linear's 64, the two dense routing passes' 40 instead of
the dense shrink / expand GEMMs' and the gate gradients' 16-bit gate variants, + nvcc for
both archs, this file and
``test_gpu_readiness.py``, Triton's own cache empty): 2m23s of CPU, 3m54s wall on a shared
2-core machine at load ~8;
``DATALORA_COMPILE_JOBS`` sets the worker count. Warm: seconds.
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("triton")

from benchmarks import resources  # noqa: E402


def _key(row: dict) -> str:
    return json.dumps({k: row[k] for k in ("module", "kernel", "config", "num_warps",
                                           "overrides", "dtype", "cc")}, sort_keys=True)


@pytest.fixture(scope="module")
def compile_results():
    return resources.triton_results()


def test_matrix_covers_every_launch_config():
    rows = resources.expected_triton_rows()
    mods = resources._kernel_modules()
    kernels = {k for m in mods.values() for k in m.launch_configs()}
    assert {r["kernel"] for r in rows} == kernels
    for mod in mods.values():  # every config x each dtype it launches x both archs
        for kernel, configs in mod.launch_configs().items():
            for launch in configs:
                cfg = {k: v for k, v in launch.items() if k not in ("num_warps", "dtypes")}
                for dtype in launch.get("dtypes", resources.DTYPES):
                    hits = {r["cc"] for r in rows if r["kernel"] == kernel and r["dtype"] == dtype
                            and r["config"] == cfg and r["num_warps"] == launch.get("num_warps",
                                                                                    4)}
                    assert hits == set(resources.ARCHS), (kernel, cfg, dtype)
    # both pointer variants of the grouped expand (fp32 partials for k > 1) in 16-bit
    variants = {(r["dtype"], json.dumps(r["overrides"])) for r in rows
                if r["kernel"] == "_expand_grouped_kernel"}
    assert ("bf16", json.dumps({"y_ptr": "*fp32"})) in variants and ("bf16", "{}") in variants
    assert len({_key(r) for r in rows}) == len(rows)


def test_every_kernel_compiles(compile_results):
    assert sorted(_key(r) for r in compile_results) == sorted(
        _key(r) for r in resources.expected_triton_rows())
    errors = [f"{r['kernel']} {r['config']} {r['dtype']} sm_{r['cc']}: {r['error']}"
              for r in compile_results if "error" in r]
    assert not errors, "\n".join(errors)


def test_no_spills_and_shared_memory_fits(compile_results):
    bad = resources.violations(compile_results, None)
    assert not bad, "\n".join(bad)
    assert all(r["REG"] > 0 and r["SHARED"] >= 0 for r in compile_results)


@pytest.mark.parametrize("change, needle", [
    (dict(STACK=16), "STACK 16"),          # a register spill to the stack
    (dict(LOCAL=8), "LOCAL 8"),            # local memory
    (dict(SHARED=165 * 1024), "SHARED"),   # over A100's 164 KB per block (sm_80 row)
    (dict(error="CompilationError: x"), "compile error"),
])
def test_violations_flag_spills_shared_memory_and_errors(change, needle):
    ok = dict(module="shrink", kernel="_k", config={"BLOCK": 16}, num_warps=4, overrides={},
              dtype="bf16", cc=80, REG=64, STACK=0, LOCAL=0, SHARED=1024)
    assert resources.violations([ok], None) == []
    bad = resources.violations([{**ok, **change}], None)
    assert len(bad) == 1 and needle in bad[0] and "sm_80" in bad[0]
    # 165 KB fits H100's 228 KB
    assert resources.violations([{**ok, "cc": 90, "SHARED": 165 * 1024}], None) == []


@pytest.mark.parametrize("damage", ["cut_mid_line", "cut_at_a_line"])
def test_a_damaged_compile_cache_is_compiled_again(tmp_path, monkeypatch, damage):
    """The cache was written in place and trusted when it existed: a write cut mid-line
    failed every later run with a JSONDecodeError, one cut at a line boundary reported
    100 builds, 0 violations, for the 312 of the matrix."""
    import subprocess

    monkeypatch.setenv("DATALORA_CACHE", str(tmp_path))
    expected = len(resources.expected_triton_rows())
    fresh = [json.dumps({"row": i}) for i in range(expected)]
    cache = resources.triton_cache_file()
    cache.parent.mkdir(parents=True)
    text = "\n".join(fresh[:100]) + "\n"
    cache.write_text(text[:-7] if damage == "cut_mid_line" else text)
    compiled = []

    def worker(*args, **kwargs):
        compiled.append(args)
        return subprocess.CompletedProcess(args, 0, stdout="\n".join(fresh) + "\n", stderr="")

    monkeypatch.setattr(resources, "run_killable", worker)
    assert len(resources.triton_results()) == expected and len(compiled) == 1
    assert len(cache.read_text().splitlines()) == expected
    assert len(resources.triton_results()) == expected and len(compiled) == 1  # now cached
