"""The README's demo runs end to end (few steps, both methods) and the CLI wires it up."""

from __future__ import annotations

import subprocess
import sys

import pytest

from datalora import demo
from datalora.cli import build_parser
from datalora.curriculum import PHASES

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_demo_datalora_end_to_end(tmp_path, capsys):
    out_dir = tmp_path / "adapter"
    args = build_parser().parse_args(["demo", "--steps", "6", "--batch-size", "4",
                                      "--limit", "64", "--eval-limit", "16",
                                      "--output-dir", str(out_dir), "--no-progress"])
    assert args.method == "datalora"
    summary = args.func(args)
    out = capsys.readouterr().out
    assert summary["reload_identical"]
    # one log per step: loss and retention records cover the three curriculum phases
    assert summary["phases"] == ["warmup"] * 2 + ["sparsification"] * 2 + ["hardening"] * 2
    assert set(summary["phase_summary"]) == set(PHASES)
    assert len(summary["losses"]) == len(summary["retention"]) == 6
    assert summary["retention"][:2] == [1.0, 1.0]  # warmup is dense
    assert all(abs(r - 0.5) < 0.1 for r in summary["retention"][-2:])  # hardening prunes
    assert set(summary["task_load_by_phase"]) == set(PHASES)
    for loads in summary["task_load_by_phase"].values():
        assert all(abs(sum(v) - 1.0) < 1e-4 for v in loads.values())
    assert len(summary["answers"]) == 4 == len(summary["prompt_kept_fraction"])
    assert all(0 < f <= 1 for f in summary["prompt_kept_fraction"])
    assert summary["eval_loss_pruned"] > 0 and summary["eval_loss_dense"] > 0
    assert (out_dir / "adapter_model.safetensors").exists()
    assert (out_dir / "datalora_demo.png").read_bytes()[:8] == PNG_MAGIC
    assert "bit-identical (pruning on and off) = True" in out
    assert "expert load per task" in out and "expected:" in out
    assert "step-log" in out and "{'loss'" not in out  # the compact per-log lines


def test_demo_molora_end_to_end(tmp_path, capsys):
    out_dir = tmp_path / "adapter"
    out_dir.mkdir()
    # an earlier datalora run's records in the folder: removed, they describe another run
    for name in demo.DATALORA_RUN_FILES:
        (out_dir / name).write_text("earlier run")
    args = build_parser().parse_args(["demo", "--method", "molora", "--steps", "4",
                                      "--batch-size", "4", "--output-dir", str(out_dir),
                                      "--no-progress"])
    summary = args.func(args)
    out = capsys.readouterr().out
    assert summary["method"] == "molora" and summary["reload_identical"]
    assert len(summary["losses"]) == 4 and len(summary["answers"]) == 4
    assert (out_dir / "adapter_model.safetensors").exists()
    assert (out_dir / "datalora_demo.png").read_bytes()[:8] == PNG_MAGIC
    assert "expert load per task" in out and "bit-identical = True" in out
    assert not any((out_dir / name).exists() for name in demo.DATALORA_RUN_FILES)
    assert "of an earlier run from" in out
    # 4 steps: the loss summary compares the first and the last 2, not 4 and 4
    assert "(first 2 steps)" in out and "(last 2 steps)" in out


def test_drop_stale_removes_only_the_named_files_there(tmp_path, capsys):
    (tmp_path / demo.PLOT_NAME).write_bytes(b"old")
    (tmp_path / "mine.txt").write_text("keep")
    demo._drop_stale(tmp_path, [demo.PLOT_NAME, "absent.json"])
    assert not (tmp_path / demo.PLOT_NAME).exists() and (tmp_path / "mine.txt").exists()
    assert f"removed {demo.PLOT_NAME} of an earlier run" in capsys.readouterr().out
    demo._drop_stale(tmp_path, [demo.PLOT_NAME])
    assert capsys.readouterr().out == ""


def test_compact_logs_rewrites_trainer_dicts_only():
    import io

    from datalora.demo import _CompactLogs

    sink = io.StringIO()
    stream = _CompactLogs(sink)
    stream.write("plain line\n{'loss': '6.8', 'phase': 1, 'lm_loss': '6.7', 'retention': "
                 "'0.9', 'retention_target': '0.875', 'tau': '3.1', 'epoch': '0.04'}\n{'x")
    stream.write("': 1}\n{not a dict\n")
    stream.flush()
    lines = sink.getvalue().splitlines()
    assert lines[0] == "plain line"
    assert "sparsification" in lines[1] and "LM loss 6.700" in lines[1] and "kept 0.90" in lines[1]
    assert lines[2:] == ["{'x': 1}", "{not a dict"]


def test_cli_help_lists_demo():
    out = subprocess.run([sys.executable, "-m", "datalora", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "demo" in out


def test_demo_without_matplotlib_skips_the_plot_up_front(monkeypatch):
    """Checked before training (an ImportError at the end would lose the run's output)."""
    import argparse

    from datalora import demo

    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
        args = argparse.Namespace(no_plot=False)
        with pytest.warns(UserWarning, match="matplotlib is not installed"):
            demo._check_plotting(args)
        assert args.no_plot is True
    # sys.modules as it was: deleting the entry instead made the next import build a second
    # matplotlib package beside the first one's submodules, and a later test's Figure then
    # found no matplotlib.colors on it
    args = argparse.Namespace(no_plot=False)
    demo._check_plotting(args)
    assert args.no_plot is False


def test_demo_learning_rate_defaults_to_a_real_model_rate_with_model():
    """The embedded tiny model's rates (3e-2 / 5e-3) would wreck a pretrained model."""
    import argparse

    from datalora import demo

    for method in ("datalora", "molora"):
        args = argparse.Namespace(method=method, model=None, lr=None)
        assert demo._setting(args, "lr") == demo.DEFAULTS[method]["lr"]
        args.model = "some/model"
        assert demo._setting(args, "lr") == demo.REAL_MODEL_LR
        args.lr = 1e-3
        assert demo._setting(args, "lr") == 1e-3


def test_layer_range_reads_as_the_layers_pruned():
    from datalora.demo import _layer_range

    assert [_layer_range(r) for r in ([1, 4], [2, 3], None)] == ["1-3", "2", "second half"]
