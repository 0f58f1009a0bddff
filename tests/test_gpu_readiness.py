"""GPU readiness on the CPU: the csrc/ kernels under ptxas for sm_80/sm_90, the committed
resource table kept current, and the roofline model (``benchmarks.roofline``) checked by
hand on a few shapes.

The Triton half of the compile matrix is ``tests/test_triton_compile.py``; both read
``benchmarks.resources`` and share its cache (cold: nvcc about a minute on 2 cores, in
parallel with the Triton compiles when this module runs first).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

from benchmarks import resources, roofline

H100, A100 = roofline.DEVICES["H100"], roofline.DEVICES["A100"]
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")


# ----------------------------------------------------------------------------- nvcc / ptxas
@needs_nvcc
def test_cuda_kernels_compile_for_sm80_sm90_without_spills():
    # what setup.py builds, per real arch: ptxas must not spill or use a stack frame
    rows = resources.cuda_results()
    errors = [r["error"] for r in rows if "error" in r]
    assert not errors, "\n".join(errors)
    for cc in resources.ARCHS:  # 3 dequant + 10 one-launch decode (T tile 1..16 x 2 dtypes)
        names = [r["kernel"] for r in rows if r["cc"] == cc]
        assert len(names) == 13, names
        assert sum(n.startswith("nf4_decode_kernel<") for n in names) == 10, names
    bad = resources.violations([], rows)
    assert not bad, "\n".join(bad)


PTXAS_LOG = """\
ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'
ptxas info    : Function properties for _Z3fooPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 4096 bytes smem, 384 bytes cmem[0]
ptxas info    : Compiling entry function '_Z3barPf' for 'sm_80'
ptxas info    : Function properties for _Z3barPf
    24 bytes stack frame, 20 bytes spill stores, 20 bytes spill loads
ptxas info    : Used 255 registers, used 0 barriers, 380 bytes cmem[0]
"""


def test_ptxas_log_parsed_and_spills_flagged():
    rows = resources.parse_ptxas(PTXAS_LOG)
    assert [(r["cc"], r["REG"], r["SHARED"], r["STACK"], r["spill_stores"]) for r in rows] == [
        (90, 40, 4096, 0, 0), (80, 255, 0, 24, 20)]
    bad = resources.violations([], rows)
    assert len(bad) == 1 and "sm_80" in bad[0] and "spill stores 20" in bad[0]
    big = dict(rows[0], SHARED=229 * 1024)  # over H100's 228 KB
    assert resources.violations([], [big])


def test_occupancy_ceiling():
    assert resources.ctas_per_sm(255, 8, 16384, 90) == 1  # 256 regs/thread x 256 threads
    assert resources.ctas_per_sm(32, 4, 0, 80) == 16      # warp limit: 64 / 4
    assert resources.ctas_per_sm(32, 1, 0, 80) == 32      # block limit
    assert resources.ctas_per_sm(32, 4, 100 * 1024, 90) == 2  # shared: 228 KB / 100 KB


# ----------------------------------------------------------------------------- the table
def test_committed_resource_table_is_current():
    """The committed table equals a fresh run (or, built with other compiler versions,
    still lists every kernel x config x dtype x arch of the matrix)."""
    pytest.importorskip("triton")
    import triton

    md, bad, triton_rows, cuda_rows = resources.generate()
    assert not bad, "\n".join(bad)
    committed = resources.TABLE.read_text()
    same_tools = (f"Triton {triton.__version__} " in committed
                  and f"nvcc {resources.nvcc_version() or 'absent'} " in committed
                  and shutil.which("c++filt") is not None)
    if same_tools:
        assert committed == md, "stale: run `python -m benchmarks.resources` and commit it"
        return
    table = [line for line in committed.splitlines() if line.startswith("| _")]
    for r in triton_rows:
        cells = f"| {r['kernel']} | {resources._triton_config(r)} | {r['dtype']} | sm_{r['cc']} |"
        assert any(line.startswith(cells) for line in table), cells


# ----------------------------------------------------------------------------- roofline
def test_base_gemv_t1_is_memory_bound_at_the_weight_bytes():
    d_in, d_out = 4096, 14336
    cost = roofline.linear_cost(1, d_in, d_out, "bf16")
    assert cost.bytes == 2 * (d_in + d_in * d_out + d_out)  # ~ 2 * d_in * d_out
    assert cost.flops == 2 * d_in * d_out
    assert cost.bound(H100, "bf16") == "memory" and cost.bound(A100, "bf16") == "memory"
    assert cost.floor_s(H100, "bf16") == pytest.approx(2 * d_in * d_out / 3.35e12, rel=1e-3)


def test_large_t_linear_is_compute_bound():
    cost = roofline.linear_cost(4096, 4096, 4096, "bf16")
    assert cost.flops == 2 * 4096**3
    assert cost.bytes == 2 * 3 * 4096**2
    assert cost.bound(H100, "bf16") == "compute"
    assert cost.floor_s(H100, "bf16") == pytest.approx(2 * 4096**3 / 989e12)
    assert cost.floor_s(A100, "bf16") == pytest.approx(2 * 4096**3 / 312e12)


def test_molora_linear_t1_hand_count():
    # T = 1, k = 2: two experts touched, each A [16, 4096] + B [4096, 16] in bf16
    lora = 2 * 2 * 16 * (4096 + 4096)
    routing = 2 * (8 + 2)
    base = roofline.linear_cost(1, 4096, 4096)
    fused = roofline.molora_linear_cost(1, 4096, 4096, 8, 16, 2, "uniform")
    assert fused.bytes == base.bytes + lora + routing
    assert fused.flops == base.flops + 2 * 2 * 16 * (4096 + 4096)
    ratio = fused.floor_s(H100, "bf16") / base.floor_s(H100, "bf16")
    assert ratio == pytest.approx(1 + (lora + routing) / base.bytes)
    assert 1.01 < ratio < 1.02
    delta = roofline.molora_delta_cost(1, 4096, 4096, 8, 16, 2, "uniform")
    assert delta.bytes == 2 * (4096 + 4096) + lora + routing


def test_two_pass_costs_more_than_fused_at_large_t():
    fused = roofline.molora_linear_cost(4096, 4096, 4096, fused=True)
    two = roofline.molora_linear_cost(4096, 4096, 4096, fused=False)
    base = roofline.linear_cost(4096, 4096, 4096)
    # the separate LoRA pass re-reads x and reads + writes y: 3 * 4096^2 * 2 bytes more
    assert two.bytes - fused.bytes == pytest.approx(2 * (4096 * 4096 + 2 * 4096 * 4096))
    r_fused = fused.floor_s(H100, "bf16") / base.floor_s(H100, "bf16")
    r_two = two.floor_s(H100, "bf16") / base.floor_s(H100, "bf16")
    assert 1.0 < r_fused < 1.05 < 1.15 < r_two


def test_experts_touched():
    assert roofline.experts_touched(1, 8, 2, "uniform") == pytest.approx(2.0)
    assert roofline.experts_touched(10_000, 8, 2, "uniform") == pytest.approx(8.0)
    assert roofline.experts_touched(3, 64, 1, "distinct") == 3
    assert roofline.experts_touched(4096, 8, 2, "one") == 2
    with pytest.raises(ValueError, match="skew"):
        roofline.experts_touched(1, 8, 2, "zipf")


@pytest.mark.parametrize("op", ["linear", "molora_linear", "molora_delta"])
@pytest.mark.parametrize("mode", ["fwd", "fwd_bwd"])
def test_floors_grow_with_every_dimension(op, mode):
    def floor(**kw):
        shape = dict(T=256, d_in=1024, d_out=1024, E=8, r=16, k=2, skew="uniform")
        shape.update(kw)
        return roofline.molora_cost(op, **shape, dtype="bf16", mode=mode).floor_s(H100, "bf16")

    Ts = [1, 16, 256, 4096, 16384]
    assert all(a < b for a, b in zip([floor(T=t) for t in Ts], [floor(T=t) for t in Ts[1:]],
                                     strict=False))
    assert floor(d_in=2048) > floor() and floor(d_out=2048) > floor()
    if op != "linear":
        assert floor(r=64) > floor() and floor(k=4) > floor()
    # A100 is never faster than H100
    cost = roofline.molora_cost(op, 256, 1024, 1024, 8, 16, 2, "uniform", "bf16", mode)
    assert cost.floor_s(A100, "bf16") > cost.floor_s(H100, "bf16")


def test_ratio_to_base_approaches_one_as_t_grows_when_fused():
    ratios = []
    for T in (1024, 4096, 16384):
        base = roofline.linear_cost(T, 4096, 4096).floor_s(H100, "bf16")
        ml = roofline.molora_linear_cost(T, 4096, 4096).floor_s(H100, "bf16")
        ratios.append(ml / base)
    assert all(1.0 < r < 1.05 for r in ratios)


def test_nf4_decode_t1_reads_a_quarter_of_bf16():
    K, N = 4096, 14336
    w = roofline.nf4_weight_bytes(K * N)
    blocks = K * N // 64
    assert w == K * N / 2 + blocks + 4 * (blocks // 256) + 4 * 256 + 4
    dec = roofline.nf4_decode_cost(1, K, N)
    assert dec.bound(H100, "bf16") == "memory"
    ratio = dec.floor_s(H100, "bf16") / roofline.linear_cost(1, K, N).floor_s(H100, "bf16")
    assert 0.25 < ratio < 0.30  # 4.13 bits per weight + LoRA, vs 16 bits
    deq = roofline.nf4_dequant_cost(N, K)
    assert deq.bytes == pytest.approx(w + 2 * K * N)


def test_floor_lookup_for_benchmark_rows():
    row = dict(method="molora_linear[triton]", mode="fwd", dtype="bf16", T=1, d_in=4096,
               d_out=4096, E=8, r=16, k=2, skew="uniform", median_ms=1.0, case="x")
    ms = roofline.molora_floor_ms("NVIDIA H100 80GB HBM3", **row)
    # cuBLAS, then the expand: the two-pass floor (the one-pass floor is out of its reach)
    assert ms == pytest.approx(roofline.molora_linear_cost(1, 4096, 4096, fused=False).floor_s(
        H100, "bf16") * 1e3)
    fused = roofline.molora_floor_ms("NVIDIA H100 80GB HBM3",
                                     **{**row, "method": "molora_linear[triton-fused]"})
    assert fused == pytest.approx(roofline.molora_linear_cost(1, 4096, 4096).floor_s(
        H100, "bf16") * 1e3) and fused < ms
    assert roofline.molora_floor_ms("NVIDIA A100-SXM4-80GB", **{**row, "method": "loop_linear"}
                                    ) > ms
    assert roofline.molora_floor_ms("AMD EPYC", **row) is None  # not modelled: no fraction
    assert roofline.molora_op("peft_mixed") == "molora_linear"
    assert roofline.molora_op("loop_delta") == "molora_delta"
    nf4_row = dict(group="decode", method="datalora_fused", T=1, d_in=4096, d_out=14336)
    assert roofline.nf4_floor_ms("NVIDIA H100", nf4_row, "bf16", 8, 16, 2) == pytest.approx(
        roofline.nf4_decode_cost(1, 4096, 14336).floor_s(H100, "bf16") * 1e3)


def test_committed_roofline_is_current():
    data = json.loads(json.dumps(roofline.build()))
    committed = json.loads((roofline.RESULTS_DIR / "roofline.json").read_text())
    assert committed == data, "stale: run `python -m benchmarks.roofline` and commit it"
    assert (roofline.RESULTS_DIR / "roofline.md").read_text() == roofline.render_markdown(data)
    # every GPU benchmark case of both scripts has its rows
    from benchmarks import bench_nf4, molora

    cases = {c.id for c in molora.PRESETS["gpu"]["cases"]}
    assert {r["case"] for r in data["rows"] if r["bench"] == "molora"} == cases
    p = bench_nf4.PRESETS["gpu"]
    assert sum(r["bench"] == "nf4" for r in data["rows"]) == (
        len(p["dequant"]) + len(p["decode"]) + len(p["large_t"]))


def test_benchmark_rows_get_fraction_of_floor():
    import torch

    from benchmarks import bench_nf4, molora

    case = molora.Case("T_sweep", 1, 4096, 4096)
    floor = roofline.molora_linear_cost(1, 4096, 4096, fused=False).floor_s(H100, "bf16") * 1e3
    got = molora._floor("NVIDIA H100 80GB HBM3", case, "molora_linear[triton]", "fwd",
                        torch.bfloat16, 2 * floor)
    assert got["floor_ms"] == pytest.approx(floor) and got["fraction_of_floor"] == 0.5
    assert got["floor_passes"] == 2
    assert molora._floor(None, case, "linear", "fwd", torch.float32, 1.0) == dict(
        floor_ms=None, fraction_of_floor=None, floor_passes=None)
    rows = [dict(group="dequant", method="bitsandbytes", shape=[4096, 14336], ms=1.0),
            dict(group="large_t", method="bf16_molora_linear", T=2048, d_in=4096, d_out=4096,
                 ms=1.0)]
    bench_nf4.add_floors(rows, "NVIDIA A100-SXM4-80GB", bench_nf4.PRESETS["gpu"])
    assert rows[0]["floor_ms"] == pytest.approx(
        roofline.nf4_dequant_cost(4096, 14336).floor_s(A100, "bf16") * 1e3)
    assert rows[1]["fraction_of_floor"] == pytest.approx(roofline.molora_linear_cost(
        2048, 4096, 4096, fused=False).floor_s(A100, "bf16") * 1e3)


# ----------------------------------------------------------------------------- cleanup
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc")
def test_sigterm_kills_the_compile_subprocess_and_its_children(tmp_path):
    """``python -m benchmarks.resources`` turns SIGTERM into SystemExit, and
    :func:`resources.run_killable` then kills the compile worker's whole process group: a
    grandchild (the worker's pool) does not outlive it."""
    pid_file = tmp_path / "grandchild.pid"
    worker = ("import subprocess, sys, time; p = subprocess.Popen(['sleep', '120']); "
              "open(sys.argv[1], 'w').write(str(p.pid)); time.sleep(120)")
    parent = subprocess.Popen([sys.executable, "-c", (
        "import signal, sys\n"
        "from benchmarks import resources\n"
        "signal.signal(signal.SIGTERM, resources._exit_on_sigterm)\n"
        f"resources.run_killable([sys.executable, '-c', {worker!r}, {str(pid_file)!r}], 300)\n"
    )], cwd=resources.REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (pid_file.exists() and pid_file.read_text()):
        assert parent.poll() is None, parent.stderr.read()
        assert time.monotonic() < deadline, "the worker did not start"
        time.sleep(0.05)
    grandchild = int(pid_file.read_text())
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=30) == 128 + signal.SIGTERM

    def running(pid: int) -> bool:  # a killed, unreaped process is a zombie ("Z")
        try:
            stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            return False
        return stat.rsplit(")", 1)[1].split()[0] != "Z"

    deadline = time.monotonic() + 10
    while running(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    if running(grandchild):
        os.kill(grandchild, signal.SIGKILL)
        pytest.fail("the compile worker's child outlived SIGTERM")


def test_a_killed_nvcc_caches_nothing(tmp_path, monkeypatch):
    """An interrupted run (Ctrl-C / SIGTERM kill the compiles) cached the killed nvcc runs
    as compile errors: every later --check failed until --no-cache."""
    monkeypatch.setenv("DATALORA_CACHE", str(tmp_path))
    monkeypatch.setattr(resources, "nvcc_version", lambda: "test")
    monkeypatch.setattr(resources, "_nvcc_one", lambda cc: (-signal.SIGKILL, "", "nvcc ..."))
    with pytest.raises(RuntimeError, match="nvcc was killed"):
        resources.cuda_results(use_cache=False)
    assert not resources.cuda_cache_file("test").exists()
