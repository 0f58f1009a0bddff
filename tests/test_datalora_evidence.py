"""The DATALORA evidence harnesses run end to end on their smallest settings.

No timing or quality is asserted here (those are the committed results' job): the
pruning benchmark's smoke preset and the eval experiment with a few steps write JSON with
the documented schema and a PNG, and the pure functions they report with are checked.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import bench_pruning
from benchmarks.timing import bootstrap_ci
from datalora.experiments import datalora_eval

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_ideal_speedup_matches_the_issue():
    assert bench_pruning.ideal_speedup(8, (2, 8), 0.5) == pytest.approx(1.6)
    assert bench_pruning.ideal_speedup(8, (4, 8), 0.5) == pytest.approx(4 / 3)
    assert bench_pruning.ideal_speedup(4, (1, 4), 0.5) == pytest.approx(1.6)
    assert bench_pruning.ideal_speedup(4, (0, 4), 1.0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="prune_range"):
        bench_pruning.ideal_speedup(4, (2, 6), 0.5)


def test_pruning_benchmark_smoke_writes_json_and_plot(tmp_path):
    result = bench_pruning.run("smoke", tmp_path, device=torch.device("cpu"),
                               log=lambda *_: None, profile=True)
    data = json.loads((tmp_path / "pruning_smoke.json").read_text())
    assert data == json.loads(json.dumps(result))
    assert data["schema"] == bench_pruning.SCHEMA
    assert {"device", "device_name", "torch", "date", "git_commit", "load_average",
            "timer", "step"} <= set(data["meta"])
    cases = bench_pruning.PRESETS["smoke"]["cases"]
    expected = {(c.name, tuple(r)) for c in cases for r in c.prune_ranges}
    assert {(r["case"], tuple(r["prune_range"])) for r in data["results"]} == expected
    for row in data["results"]:
        for key in ("ms_r1.0", "ms_r0.5"):
            t = row[key]
            assert 0 < t["min"] <= t["q20"] <= t["median"] <= t["q80"]
        assert row["speedup"] == pytest.approx(row["ms_r1.0"]["median"]
                                               / row["ms_r0.5"]["median"])
        assert row["ideal_speedup"] == pytest.approx(bench_pruning.ideal_speedup(
            row["layers"], tuple(row["prune_range"]), 0.5))
        assert row["fraction_of_ideal"] == pytest.approx(row["speedup"] / row["ideal_speedup"])
        # attainable: four dense steps, the L-layer and the outside-the-range model at
        # full and half sequence length, combined as the module docstring says
        t = row["ms_dense"]
        outside = row["layers"] - row["pruned_layers"]
        full, half = row["seq"], row["seq"] // 2
        assert set(t) == {f"L{n}_seq{s}" for n in (row["layers"], outside) for s in (full, half)}
        total = t[f"L{row['layers']}_seq{full}"]
        pruned_half = max(t[f"L{row['layers']}_seq{half}"] - t[f"L{outside}_seq{half}"], 0)
        assert row["attainable_speedup"] == pytest.approx(
            total / (t[f"L{outside}_seq{full}"] + pruned_half))
        assert row["attainable_speedup"] > 0
        assert row["fraction_of_attainable"] == pytest.approx(
            row["speedup"] / row["attainable_speedup"])
        for key in ("speedup", "attainable", "fraction_of_attainable"):
            lo, hi = row[f"{key}_ci95"]
            point = row[key if key != "attainable" else "attainable_speedup"]
            assert lo <= hi and lo <= point * 1.5 and hi >= point / 1.5
        assert row["speedup_paired_median"] > 0
        # the timed pruned step really pruned: about half the tokens kept
        assert abs(row["kept_fraction_last_step"] - 0.5) < 0.1
    names = {t["name"] for t in data["targets"]}
    assert len(names) == len(data["results"])  # one vs-ideal target per row (no CPU 1.4x)
    for t in data["targets"]:
        assert t["status"] == ("PASS" if t["value"] >= t["threshold"] else "FAIL")
        row = next(r for r in data["results"] if t["name"].startswith(
            f"{r['case']}_layers{r['prune_range'][0]}-"))
        if t["status"] == "FAIL":  # a miss comes with a profile of the pruned step
            assert row["profile_r0.5"] and {"op", "self_ms", "calls", "share"} <= set(
                row["profile_r0.5"][0])
    assert (tmp_path / "pruning_smoke.png").read_bytes()[:8] == PNG_MAGIC


def test_bootstrap_ci_resamples_whole_rounds():
    # two steps whose times move together round by round: their ratio is 2 in every round,
    # so every resample that keeps rounds together gives exactly 2
    base = [10.0, 30.0, 12.0, 50.0, 11.0, 20.0]
    rounds = {"a": [2 * t for t in base], "b": base}
    assert bootstrap_ci(rounds, lambda m: m["a"] / m["b"]) == [2.0, 2.0]
    # one step's own spread: the interval covers its median and stays inside its range
    lo, hi = bootstrap_ci(rounds, lambda m: m["b"], resamples=400, seed=1)
    assert min(base) <= lo <= 15.5 <= hi <= max(base)
    assert bootstrap_ci(rounds, lambda m: m["b"], resamples=400, seed=1) == [lo, hi]
    with pytest.raises(ValueError, match="rounds"):
        bootstrap_ci({"a": base, "b": base[:-1]}, lambda m: m["a"])


def test_time_interleaved_shuffles_the_order_of_each_round():
    from benchmarks.timing import time_interleaved

    calls: list[str] = []
    steps = {k: (lambda k=k: calls.append(k)) for k in "abcd"}
    timed = time_interleaved(steps, torch.device("cpu"), 0.0, 20, 20, order_seed=0)
    rounds = [calls[i:i + 4] for i in range(12, len(calls), 4)]  # after 3 warm-up passes
    assert len(rounds) == 20 and all(sorted(r) == list("abcd") for r in rounds)
    assert len({tuple(r) for r in rounds}) > 1  # not one fixed order
    assert all(len(v[5]) == 20 for v in timed.values())
    calls.clear()
    time_interleaved(steps, torch.device("cpu"), 0.0, 5, 5)  # no seed: the given order
    assert calls[12:] == list("abcd") * 5


def test_attainable_speedup_needs_a_layer_outside_the_range():
    case = bench_pruning.PRESETS["smoke"]["cases"][0]
    with pytest.raises(ValueError, match="prune_range"):
        bench_pruning.dense_steps(case, (0, case.layers), torch.float32, torch.device("cpu"))


def test_attainable_speedup_from_hand_computed_times():
    # 4 layers, layers 1..3 pruned: whole model 100 ms at seq 96, 60 at 48; layer 0 alone
    # (with embedding, head, optimizer) 30 / 20 ms. Pruned layers: 70 ms at full length,
    # 40 at half, so the step would take 100 - 70 + 40 = 70 ms: 100 / 70 = 1.4286x.
    case = bench_pruning.PRESETS["cpu"]["cases"][0]
    ms = {(4, 96): 100.0, (4, 48): 60.0, (1, 96): 30.0, (1, 48): 20.0}
    out = bench_pruning.attainable_speedup(ms, case, (1, 4))
    assert out["attainable_speedup"] == pytest.approx(100 / 70)
    assert out["ms_dense"] == {"L4_seq96": 100.0, "L4_seq48": 60.0, "L1_seq96": 30.0,
                               "L1_seq48": 20.0}


def test_attainable_speedup_counts_a_negative_layer_time_as_zero():
    # a stalled repetition made the 1-layer model slower at half length than the 4-layer
    # one (CI once saw -13.5x): the pruned layers' half-length time is taken as 0, which
    # bounds the speedup by the step without them, 100 / 30
    case = bench_pruning.PRESETS["cpu"]["cases"][0]
    ms = {(4, 96): 100.0, (4, 48): 60.0, (1, 96): 30.0, (1, 48): 95.0}
    out = bench_pruning.attainable_speedup(ms, case, (1, 4))
    assert out["attainable_speedup"] == pytest.approx(100 / 30)


def test_cpu_targets_include_the_default_range_check():
    row = {"case": "tiny", "prune_range": [1, 4], "default_range": (1, 4), "speedup": 1.5,
           "fraction_of_ideal": 1.5 / 1.6, "ideal_speedup": 1.6}
    other = {**row, "prune_range": [2, 4], "speedup": 1.0, "fraction_of_ideal": 0.5}
    targets = {t["name"]: t for t in bench_pruning.check_targets([row, other], "cpu")}
    assert targets["tiny_layers1-3_vs_ideal"]["status"] == "PASS"
    assert targets["tiny_layers1-3_cpu_default_range"]["status"] == "PASS"
    assert targets["tiny_layers2-3_vs_ideal"]["status"] == "FAIL"
    assert "tiny_layers2-3_cpu_default_range" not in targets
    assert targets["tiny_layers1-3_vs_ideal"]["ci95"] is None  # the row has no interval
    row["speedup_ci95"] = [1.44, 1.6]
    targets = {t["name"]: t for t in bench_pruning.check_targets([row], "cpu")}
    assert targets["tiny_layers1-3_cpu_default_range"]["ci95"] == [1.44, 1.6]
    assert targets["tiny_layers1-3_vs_ideal"]["ci95"] == pytest.approx([0.9, 1.0])


def test_specialisation_scores():
    same = datalora_eval.specialisation({"a": [0.5, 0.5, 0, 0], "b": [0.5, 0.5, 0, 0]})
    assert same["jsd_mean"] == pytest.approx(0.0)
    assert same["max_share_mean"] == pytest.approx(0.5) and same["uniform_share"] == 0.25
    apart = datalora_eval.specialisation({"a": [1, 0, 0, 0], "b": [0, 0, 3, 0]})
    assert apart["jsd_mean"] == pytest.approx(1.0)  # disjoint: 1 bit
    assert apart["top_expert"] == {"a": 0, "b": 2}
    half = datalora_eval.jensen_shannon([1, 0], [0.5, 0.5])
    assert 0 < half < 1 and half == pytest.approx(datalora_eval.jensen_shannon([0.5, 0.5],
                                                                               [1, 0]))
    with pytest.raises(ValueError, match="load"):
        datalora_eval.specialisation({"a": [0, 0]})


def test_load_by_task_sums_rows_per_task_in_sorted_order():
    counts = torch.tensor([[1.0, 0, 1], [3, 0, 0], [0, 0, 0], [0, 2, 2]])
    load = datalora_eval.load_by_task(["b", "a", "c", "b"], counts)
    assert list(load) == ["a", "b"]  # c has no route: left out
    assert load["a"] == pytest.approx([1, 0, 0])
    assert load["b"] == pytest.approx([1 / 6, 2 / 6, 3 / 6])


def test_permutation_null_separates_task_routing_from_chance():
    tasks = ["a"] * 20 + ["b"] * 20
    apart = torch.zeros(40, 4)
    apart[:20, 0] = 5  # task a always on expert 0, task b on expert 1
    apart[20:, 1] = 5
    res = datalora_eval.permutation_null(tasks, apart, permutations=99)
    assert res["jsd_mean"] == pytest.approx(1.0)
    assert res["null_jsd_mean"] < 0.2 and res["null_jsd_q95"] < 0.5
    assert res["p_value"] == pytest.approx(1 / 100)  # no shuffle reaches the observed split
    assert res["permutations"] == 99
    # every row the same: any labelling gives the observed JSD (0), p = 1
    alike = torch.tensor([[2.0, 1, 1, 0]]).repeat(40, 1)
    res = datalora_eval.permutation_null(tasks, alike, permutations=20)
    assert res["jsd_mean"] == pytest.approx(0.0, abs=1e-12)
    assert res["p_value"] == pytest.approx(1.0)
    # seeded: the same null every call
    noisy = torch.randint(0, 4, (40, 4), generator=torch.Generator().manual_seed(1)).float()
    assert (datalora_eval.permutation_null(tasks, noisy, permutations=30)
            == datalora_eval.permutation_null(tasks, noisy, permutations=30))
    with pytest.raises(ValueError, match="counts"):
        datalora_eval.permutation_null(tasks[:-1], apart)
    with pytest.raises(ValueError, match="permutations"):
        datalora_eval.permutation_null(tasks, apart, permutations=0)


def _records(tasks, row, token_ids, experts, answer, num_experts=4):
    return datalora_eval.RouteRecords(
        tasks, torch.tensor(row), torch.tensor(token_ids), torch.tensor(experts),
        torch.tensor(answer), num_experts)


def test_lexical_jsd_separates_context_routing_from_token_identity():
    # the same two token ids in both tasks, each task routing them to its own expert: all
    # of the specialisation is context (lexical JSD 0, observed 1 bit)
    context = _records(["a", "b"], [0, 0, 1, 1], [7, 8, 7, 8], [[0], [0], [1], [1]],
                       [True] * 4)
    observed = datalora_eval.specialisation(
        datalora_eval.load_by_task(context.tasks, context.row_counts()))["jsd_mean"]
    assert observed == pytest.approx(1.0)
    assert datalora_eval.lexical_jsd(context) == pytest.approx(0.0, abs=1e-12)
    # disjoint token ids: token identity explains everything
    lexical = _records(["a", "b"], [0, 0, 1, 1], [7, 7, 9, 9], [[0], [0], [1], [1]],
                       [True] * 4)
    assert datalora_eval.lexical_jsd(lexical) == pytest.approx(1.0)
    # a shared token id routed alike plus task-only ids: lexical matches the observed loads
    mixed = _records(["a", "b"], [0, 0, 1, 1], [5, 7, 5, 9], [[2], [0], [2], [1]],
                     [True] * 4)
    want = datalora_eval.specialisation(
        datalora_eval.load_by_task(mixed.tasks, mixed.row_counts()))["jsd_mean"]
    assert 0 < want < 1 and datalora_eval.lexical_jsd(mixed) == pytest.approx(want)
    # answers only: the non-answer tokens (routed by context) are left out, and a token
    # routed twice to one expert counts twice
    part = _records(["a", "b"], [0, 0, 1, 1], [7, 8, 7, 8], [[0, 0], [3, 1], [1, 1], [3, 2]],
                    [False, True, False, True])
    assert part.route_counts(answers_only=True)[0].sum() == 0
    assert part.row_counts().tolist() == [[2, 1, 0, 1], [0, 2, 1, 1]]
    assert part.row_counts(answers_only=True).tolist() == [[0, 1, 0, 1], [0, 0, 1, 1]]
    # answers: token 8 goes to {3, 1} in a and {3, 2} in b; pooled per id: identical loads
    assert datalora_eval.lexical_jsd(part, answers_only=True) == pytest.approx(0, abs=1e-12)
    # every token: each task holds one token 7 and one token 8, so pooled per id the two
    # loads are the same though the observed ones differ
    assert datalora_eval.lexical_jsd(part) == pytest.approx(0, abs=1e-12)
    assert datalora_eval.specialisation(
        datalora_eval.load_by_task(part.tasks, part.row_counts()))["jsd_mean"] > 0.3


def test_shared_tokens_keep_the_ids_two_tasks_use():
    # token 5 in a and c, 6 only in b, 7 in a and b but as an answer only in a
    rec = _records(["a", "b", "c"], [0, 0, 1, 1, 2], [5, 7, 6, 7, 5],
                   [[0], [1], [2], [3], [0]], [True, True, True, False, True])
    assert rec.selection(shared_tokens=True).tolist() == [True, True, False, True, True]
    assert rec.selection(answers_only=True, shared_tokens=True).tolist() == [
        True, False, False, False, True]
    # over the shared answer tokens only a and c count, routed alike: 0 bits both ways
    assert datalora_eval.task_jsd(rec, answers_only=True, shared_tokens=True) == 0
    assert datalora_eval.lexical_jsd(rec, answers_only=True, shared_tokens=True) == 0
    # token 7: expert 1 in a, 3 in b: context; pooled per id it is the same for both
    assert datalora_eval.task_jsd(rec, shared_tokens=True) > datalora_eval.lexical_jsd(
        rec, shared_tokens=True)
    # nothing counted: no JSD
    alone = _records(["a", "b"], [0, 1], [5, 6], [[0], [1]], [True, True])
    assert datalora_eval.task_jsd(alone, shared_tokens=True) is None
    assert datalora_eval.lexical_jsd(alone, shared_tokens=True) is None
    assert datalora_eval.task_jsd(alone) == pytest.approx(1.0)


def test_row_expert_counts_counts_every_route_and_the_answers_apart():
    from datalora import DATALORAConfig, get_datalora_model
    from datalora.data import load_instruction_dataset
    from datalora.testing import build_tiny_model, build_tokenizer
    from datalora.train import DEFAULT_TINY_CONFIG

    config = DATALORAConfig(**DEFAULT_TINY_CONFIG)
    model = get_datalora_model(build_tiny_model(seed=0), config, verbose=False)
    model.train()
    tokenizer = build_tokenizer()
    rows = load_instruction_dataset("embedded", "eval", limit=6)
    tasks, every, answers = datalora_eval.row_expert_counts(model, rows, tokenizer,
                                                            batch_size=4)
    assert model.training  # mode restored
    assert tasks == [r["task"] for r in rows]
    from datalora.data import IGNORE_INDEX, tokenize_rows

    k = config.num_active_experts
    items, _ = tokenize_rows(rows, tokenizer, 96)
    for item, n_all, n_ans in zip(items, every.sum(1), answers.sum(1), strict=True):
        labelled = sum(t != IGNORE_INDEX for t in item["labels"])
        assert item["labels"][-1] == tokenizer.eos_token_id
        assert n_all == k * len(item["input_ids"])  # every real token
        assert n_ans == k * (labelled - 1) > 0  # the answer's tokens, less its EOS
    assert (answers <= every).all()
    records = datalora_eval.route_records(model, rows, tokenizer, batch_size=4)
    assert torch.equal(records.token_ids,
                       torch.tensor([t for item in items for t in item["input_ids"]]))
    assert torch.equal(records.row, torch.repeat_interleave(
        torch.arange(len(items)), torch.tensor([len(item["input_ids"]) for item in items])))
    assert records.experts.shape == (len(records.row), k)
    assert torch.equal(records.row_counts(), every)
    assert torch.equal(records.row_counts(answers_only=True), answers)
    # the [B, L] layout of the routes: padded batches count each row as it alone would
    # (a router sharpened so that routes vary from token to token)
    with torch.no_grad():
        model.saliency.router_head.weight.mul_(50)
    _, every, answers = datalora_eval.row_expert_counts(model, rows, tokenizer, batch_size=4)
    _, every_1, answers_1 = datalora_eval.row_expert_counts(model, rows, tokenizer,
                                                            batch_size=1)
    assert torch.equal(every, every_1) and torch.equal(answers, answers_1)
    assert (every > 0).sum(1).min() > k  # more than one pair of experts per row
    load = datalora_eval.task_expert_load(model, rows, tokenizer, answers_only=True)
    assert load == datalora_eval.load_by_task(tasks, answers)


def test_initial_model_is_the_model_train_datalora_starts_from(tmp_path, monkeypatch):
    """The specialisation reference: the same seeding and wrap as train_datalora's."""
    import copy

    from datalora import DATALORAConfig
    from datalora import model as model_module
    from datalora.testing import build_tiny_model, build_tokenizer
    from datalora.train import DEFAULT_TINY_CONFIG, train_datalora

    config = DATALORAConfig(**DEFAULT_TINY_CONFIG)
    base = build_tiny_model(seed=0)
    initial = datalora_eval.initial_model(copy.deepcopy(base), config, seed=3)
    started = {}
    real_wrap = model_module.get_datalora_model

    def wrap(*args, **kwargs):
        wrapped = real_wrap(*args, **kwargs)
        started.update({k: v.clone() for k, v in wrapped.state_dict().items()})
        return wrapped

    monkeypatch.setattr(model_module, "get_datalora_model", wrap)
    train_datalora(config, output_dir=tmp_path / "out", max_steps=1, batch_size=2, limit=4,
                   seed=3, progress=False, model=copy.deepcopy(base),
                   tokenizer=build_tokenizer())
    want = initial.state_dict()
    assert started.keys() == want.keys()
    # bit-exact (the keep threshold is NaN, uncalibrated, in both)
    torch.testing.assert_close(started, dict(want), rtol=0, atol=0, equal_nan=True)
    state = torch.get_rng_state()
    other = datalora_eval.initial_model(copy.deepcopy(base), config, seed=4)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG left as it was
    assert not torch.equal(other.state_dict()["saliency.router_head.weight"],
                           want["saliency.router_head.weight"])


def test_specialised_needs_more_than_the_initial_router_and_0_05_bits():
    passes = datalora_eval._specialised
    assert passes({"jsd_mean": 0.08, "initial_jsd_mean": 0.01}) == "PASS"
    assert passes({"jsd_mean": 0.08, "initial_jsd_mean": 0.09}) == "FAIL"
    assert passes({"jsd_mean": 0.04, "initial_jsd_mean": 0.0}) == "FAIL"
    assert datalora_eval._specialisation_bar({"initial_jsd_mean": 0.09}) == 0.09
    assert datalora_eval._specialisation_bar({"initial_jsd_mean": 0.01}) == 0.05


def test_eval_experiment_smoke_writes_json_and_plot(tmp_path):
    result = datalora_eval.run(steps=3, batch_size=4, limit=24, eval_limit=12, out_dir=tmp_path,
                               tag="smoke", work_dir=tmp_path / "work", progress=False,
                               log=lambda *_: None)
    data = json.loads((tmp_path / "datalora_eval_smoke.json").read_text())
    assert data == json.loads(json.dumps(result))
    assert data["schema"] == datalora_eval.SCHEMA
    assert {"git_commit", "date", "steps", "dense_arm", "load_average"} <= set(data["meta"])
    dense, pruned = data["arms"]
    assert (dense["target_retention"], pruned["target_retention"]) == (1.0, 0.5)
    assert dense["eval_retention_threshold"] == 1.0  # dense: nothing pruned
    assert 0 < pruned["eval_retention_threshold"] < 1
    for arm in data["arms"]:
        assert len(arm["history"]) == 3
        assert [h["phase"] for h in arm["history"]] == ["warmup", "sparsification",
                                                        "hardening"]
        for key in ("eval_loss", "eval_loss_topk", "eval_loss_dense"):
            assert math.isfinite(arm[key]) and arm[key] > 0
        for suffix in ("", "_answers"):
            load = arm[f"task_expert_load{suffix}"]
            assert set(load) == {"arithmetic", "lookup", "reverse", "sort"}
            assert all(abs(sum(v) - 1) < 1e-5 for v in load.values())
            scores = arm[f"specialisation{suffix}"]
            assert {"jsd_mean", "null_jsd_mean", "null_jsd_q95", "p_value",
                    "initial_jsd_mean", "lexical_jsd_mean", "initial_lexical_jsd_mean",
                    "shared_token_share", "shared_token_jsd_mean",
                    "shared_token_lexical_jsd_mean", "initial_shared_token_jsd_mean",
                    "initial_shared_token_lexical_jsd_mean"} <= set(scores)
            assert 0 < scores["shared_token_share"] <= 1
            assert 0 <= scores["lexical_jsd_mean"] <= 1
            assert set(arm[f"task_expert_load{suffix}_initial"]) == set(load)
            assert 0 < scores["p_value"] <= 1
    # dense eval of the dense arm is the same function as its eval loss
    assert dense["eval_loss_dense"] == pytest.approx(dense["eval_loss"])
    assert data["eval_loss_ratio"] == pytest.approx(pruned["eval_loss"] / dense["eval_loss"])
    ratio = next(t for t in data["targets"] if t["name"] == "eval_loss_ratio")
    assert ratio["status"] == ("PASS" if ratio["value"] <= 1.05 else "FAIL")
    names = [t["name"] for t in data["targets"]]
    assert names == ["eval_loss_ratio", "specialisation", "specialisation_answers"]
    for target, scores in zip(data["targets"][1:], (pruned["specialisation"],
                                                   pruned["specialisation_answers"]),
                              strict=True):
        assert target["threshold"] == max(0.05, scores["initial_jsd_mean"])
        assert target["status"] == ("PASS" if target["value"] > target["threshold"]
                                    else "FAIL")
    assert (tmp_path / "datalora_eval_smoke.png").read_bytes()[:8] == PNG_MAGIC


def test_eval_experiment_tunes_alpha_balance_on_validation_rows(tmp_path, monkeypatch):
    from datalora import testing

    seen = {}
    real_split = testing.train_validation_split

    def split(*args, **kwargs):
        train, val = real_split(*args, **kwargs)
        seen["val"] = {r["id"] for r in val}
        return train, val[::25]  # 8 validation rows keep the test fast

    monkeypatch.setattr(testing, "train_validation_split", split)
    # scripted validation losses: the two arms prefer different weights
    real_train = datalora_eval.train_and_evaluate
    scripted = {"tune_dense_molora_0.05": 5.0, "tune_dense_molora_2.0": 4.0,
                "tune_datalora_r0.5_0.05": 4.0, "tune_datalora_r0.5_2.0": 5.0}

    def train_and_evaluate(name, *args, **kwargs):
        record = real_train(name, *args, **kwargs)
        return {**record, "eval_loss": scripted[name]} if name in scripted else record

    monkeypatch.setattr(datalora_eval, "train_and_evaluate", train_and_evaluate)
    result = datalora_eval.run(steps=2, batch_size=4, limit=16, eval_limit=8, out_dir=tmp_path,
                               tag="tune", work_dir=tmp_path / "work", progress=False,
                               plot=False, log=lambda *_: None, tune_alpha_balance=(0.05, 2.0))
    tuning = result["meta"]["tuning"]
    assert [(t["arm"], t["alpha_balance"]) for t in tuning] == [
        ("dense_molora", 0.05), ("dense_molora", 2.0), ("datalora_r0.5", 0.05),
        ("datalora_r0.5", 2.0)]
    for arm in result["arms"]:  # each arm with its own best weight
        best = min((t for t in tuning if t["arm"] == arm["name"]),
                   key=lambda t: t["validation_loss"])["alpha_balance"]
        assert arm["alpha_balance"] == best
    dense, pruned = result["arms"]
    assert (dense["alpha_balance"], pruned["alpha_balance"]) == (2.0, 0.05)
    assert result["meta"]["alpha_balance"] == pruned["alpha_balance"]
    assert result["meta"]["dense_alpha_balance"] == dense["alpha_balance"]
    from datalora.data import load_instruction_dataset

    eval_ids = {r["id"] for r in load_instruction_dataset("embedded", "eval")}
    assert seen["val"] and not (seen["val"] & eval_ids)  # tuned on held-out train rows


def test_eval_experiment_gives_the_dense_arm_its_own_weight(tmp_path):
    result = datalora_eval.run(steps=2, batch_size=4, limit=8, eval_limit=4, out_dir=tmp_path,
                               tag="weights", work_dir=tmp_path / "work", progress=False,
                               plot=False, log=lambda *_: None, alpha_balance=0.2,
                               dense_alpha_balance=0.7)
    dense, pruned = result["arms"]
    assert (dense["alpha_balance"], pruned["alpha_balance"]) == (0.7, 0.2)
    assert (result["meta"]["dense_alpha_balance"], result["meta"]["alpha_balance"]) == (0.7, 0.2)
    same = datalora_eval.run(steps=1, batch_size=4, limit=4, eval_limit=4, out_dir=tmp_path,
                             tag="same", progress=False, plot=False, log=lambda *_: None,
                             alpha_balance=0.3)
    assert [arm["alpha_balance"] for arm in same["arms"]] == [0.3, 0.3]


def test_eval_experiment_writes_under_the_current_directory_by_default(tmp_path, monkeypatch):
    """An installed datalora must not write into site-packages: the default ``--out`` is
    ``benchmarks/results`` under the current directory, as the TLE / TITOK scripts'."""
    seen = []
    monkeypatch.setattr(datalora_eval, "run", lambda *args, **kwargs: seen.append(args[6]))
    monkeypatch.chdir(tmp_path)
    assert datalora_eval.main([]) == 0
    assert seen == [Path("benchmarks") / "results"]
    assert seen[0].resolve() == tmp_path / "benchmarks" / "results"


def test_eval_metadata_needs_no_checkout(monkeypatch):
    """An installed datalora has no ``benchmarks`` package beside it."""
    for name in ("benchmarks", "benchmarks.molora"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails
    meta = datalora_eval.run_metadata(steps=3, base="random")
    assert meta["steps"] == 3 and meta["base"] == "random"
    assert meta["torch"] == torch.__version__ and meta["cpu_model"]
    assert {"git_commit", "git_dirty", "date", "load_average", "dense_arm"} <= set(meta)


def test_provenance_names_the_cpu_versions_and_commit(monkeypatch):
    from datalora.experiments.run_info import provenance

    monkeypatch.setenv("DATALORA_GIT_COMMIT", "c" * 40)
    info = provenance()
    assert info["cpu_model"] and info["cpu_threads"] == torch.get_num_threads()
    assert (info["git_commit"], info["git_dirty"]) == ("c" * 40, None)
    import transformers

    assert info["transformers"] == transformers.__version__


def test_git_commit_only_of_a_checkout_root(tmp_path, monkeypatch):
    """A package installed inside some other repository (a venv in a project) reports no
    commit rather than that repository's."""
    from datalora.experiments.run_info import git_commit

    monkeypatch.delenv("DATALORA_GIT_COMMIT", raising=False)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    (tmp_path / "site-packages").mkdir()
    sha, dirty = git_commit(tmp_path)
    assert len(sha) == 40 and dirty is False
    assert git_commit(tmp_path / "site-packages") == (None, None)


def test_git_commit_of_a_copied_tree_from_the_environment(tmp_path, monkeypatch):
    """The GPU machine runs a copy of the tree without .git: the caller names the commit."""
    from datalora.experiments.run_info import git_commit

    monkeypatch.setenv("DATALORA_GIT_COMMIT", "a" * 40)
    assert git_commit(tmp_path) == ("a" * 40, None)
    monkeypatch.setenv("DATALORA_GIT_COMMIT", "")
    assert git_commit(tmp_path) == (None, None)
    # a copy that carries a stale .git (the GPU machine's does) still reports the named one
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path),
                    "init", "-q"], check=True)
    monkeypatch.setenv("DATALORA_GIT_COMMIT", "b" * 40)
    assert git_commit(tmp_path) == ("b" * 40, None)


@pytest.mark.parametrize("argv", [["--eval-limit", "0"], ["--steps", "0"], ["--limit", "0"],
                                  ["--batch-size", "-1"], ["--lr", "0"]])
def test_eval_experiment_flags_are_checked_by_argparse(argv, capsys):
    """--eval-limit 0 trained both arms, then failed on no eval rows; the others failed with
    a traceback."""
    with pytest.raises(SystemExit) as exc:
        datalora_eval.main(argv)
    assert exc.value.code == 2 and f"argument {argv[0]}" in capsys.readouterr().err


def test_eval_experiment_refuses_an_output_file_before_training(tmp_path, monkeypatch):
    """The JSON went to ``--out`` only after both arms had trained (minutes)."""
    def no_training(*args, **kwargs):
        raise AssertionError("trained before the output folder was checked")

    monkeypatch.setattr(datalora_eval, "train_and_evaluate", no_training)
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ValueError, match=r"out_dir: .*afile is a file, expected a folder"):
        datalora_eval.run(steps=1, out_dir=afile, plot=False)


def test_eval_experiment_without_matplotlib_fails_before_training(tmp_path, monkeypatch):
    """Without matplotlib the plot raised ImportError after both arms had trained (~10 min),
    though --no-plot would have run; plot=False still runs without it."""
    def no_training(*args, **kwargs):
        raise AssertionError("trained before matplotlib was checked")

    monkeypatch.setattr(datalora_eval, "train_and_evaluate", no_training)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    with pytest.raises(ModuleNotFoundError, match=r"plot: matplotlib .*--no-plot"):
        datalora_eval.run(steps=1, out_dir=tmp_path)
