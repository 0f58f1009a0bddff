"""The README's demo runs end to end (few steps) and the CLI wires it up."""

from __future__ import annotations

import subprocess
import sys

from datalora.cli import build_parser


def test_demo_end_to_end(tmp_path, capsys):
    args = build_parser().parse_args(["demo", "--steps", "6", "--batch-size", "4",
                                      "--output-dir", str(tmp_path / "adapter"),
                                      "--no-progress"])
    summary = args.func(args)
    out = capsys.readouterr().out
    assert summary["reload_identical"]
    assert len(summary["losses"]) == 6 and len(summary["answers"]) == 4
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert "expert load per task" in out and "bit-identical = True" in out


def test_cli_help_lists_demo():
    out = subprocess.run([sys.executable, "-m", "datalora", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "demo" in out
