"""Every target of the committed benchmark results in one markdown table.

Reads the ``targets`` of the result JSONs in :data:`SOURCES` (each benchmark writes its
own) and renders one row per target: the run (machine, commit, date), the target, the
measured value with its 95 % bootstrap interval where the run has one, and PASS / FAIL.
``benchmarks/RESULTS.md`` carries the table between :data:`BEGIN` and :data:`END`; a test
checks it matches the JSONs, so regenerate it after committing new results::

    python -m benchmarks.targets_table            # print the table
    python -m benchmarks.targets_table --write    # update benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from datalora.io import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
BEGIN = "<!-- targets table: python -m benchmarks.targets_table --write -->"
END = "<!-- end of targets table -->"

SOURCES: tuple[tuple[str, str], ...] = (
    ("MoLoRA layer, GPU", "benchmarks/results/gpu_h200/molora_gpu.json"),
    ("NF4, GPU", "benchmarks/results/gpu_h200/nf4_gpu.json"),
    ("Token pruning, GPU", "benchmarks/results/gpu_h200/baseline_e717fa7/pruning_gpu.json"),
    ("MoLoRA layer, CPU", "benchmarks/results/molora_cpu.json"),
    ("MoLoRA layer, CPU", "benchmarks/results/molora_cpu_amd_epyc.json"),
    ("Token pruning, CPU", "benchmarks/results/pruning_cpu.json"),
    ("Token pruning, CPU", "benchmarks/results/cpu_intel_xeon/pruning_cpu.json"),
    ("DATALORA vs dense MoLoRA (seed 0)", "benchmarks/results/datalora_eval_cpu_pretrained.json"),
)
"""``(benchmark, JSON path from the repository root)``, in table order."""


def _machine(meta: dict[str, Any]) -> str:
    name = meta.get("device_name") or meta.get("cpu_model") or meta.get("device") or "?"
    return name.replace("(R)", "").replace(" Processor", "").strip()


def _target(entry: dict[str, Any]) -> tuple[str, str]:
    """``(target, condition)`` cells: bench_nf4 writes one ``"target"`` string (a name and
    its condition after ": ", or the condition alone), the others a name, an operator and a
    threshold."""
    if "name" in entry:
        return f"`{entry['name']}`", f"{entry['op']} {entry['threshold']:g}"
    name, sep, condition = entry["target"].partition(": ")
    return (f"`{name}`", condition) if sep else ("", name)


def _value(entry: dict[str, Any]) -> str:
    value = entry.get("value")
    if value is None:
        return "n/a"
    text = f"{value:#.3g}"
    ci = entry.get("ci95")
    return text if not ci else f"{text} ({ci[0]:#.3g}-{ci[1]:#.3g})"


NOTE_MARK = " †"
"""Appended to the run cell of a run whose JSON carries a ``git_commit_note`` (e.g. a tree
sent to a GPU machine with another commit's ``.git``); the notes follow the table."""


def _run(meta: dict[str, Any]) -> str:
    """The run cell: machine, commit (as the run's ``.git`` said), date."""
    return (f"{_machine(meta)}, {str(meta.get('git_commit') or '?')[:7]}, "
            f"{str(meta.get('date', '?'))[:10]}")


def _sources(root: Path) -> list[tuple[str, str, dict[str, Any], list[dict[str, Any]]]]:
    """``(benchmark, path, meta, targets)`` of each of :data:`SOURCES`, each JSON read once."""
    out = []
    for benchmark, rel in SOURCES:
        data = json.loads((root / rel).read_text())
        out.append((benchmark, rel, data.get("meta", {}), data.get("targets") or []))
    return out


def table_rows(root: Path = ROOT) -> list[list[str]]:
    """One ``[benchmark, run, target, condition, value, status]`` row per target."""
    return _rows(_sources(root))


def _rows(sources) -> list[list[str]]:
    rows = []
    for benchmark, _, meta, targets in sources:
        run = _run(meta) + (NOTE_MARK if meta.get("git_commit_note") else "")
        for entry in targets:
            name, condition = _target(entry)
            rows.append([benchmark, run, name, condition, _value(entry), entry["status"]])
    return rows


def _notes(sources) -> list[str]:
    """``"run (folder): note"`` for each distinct run with a ``git_commit_note``, in table
    order."""
    notes = {}
    for _, rel, meta, _ in sources:
        if meta.get("git_commit_note"):
            notes.setdefault(_run(meta), f"(`{Path(rel).parent}/`): {meta['git_commit_note']}")
    return [f"{run} {note}" for run, note in notes.items()]


def markdown(root: Path = ROOT) -> str:
    """The table, its header included, then the runs' notes (see :data:`NOTE_MARK`)."""
    lines = ["| benchmark | run | target | condition | value (95 % CI) | status |",
             "|---|---|---|---|--:|---|"]
    sources = _sources(root)
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |"
              for row in _rows(sources)]
    notes = _notes(sources)
    if notes:
        lines += [""] + [f"{NOTE_MARK.strip()} {note}" + ("  " if i < len(notes) - 1 else "")
                         for i, note in enumerate(notes)]
    return "\n".join(lines)


def replace_block(text: str, table: str) -> str:
    """``text`` with the part between :data:`BEGIN` and :data:`END` replaced by ``table``."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"RESULTS.md: expected the markers {BEGIN!r} and {END!r}")
    return text[:start + len(BEGIN)] + "\n\n" + table + "\n\n" + text[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.targets_table",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true",
                        help=f"update the table in {RESULTS_MD.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    table = markdown()
    if args.write:
        atomic_write_text(RESULTS_MD, replace_block(RESULTS_MD.read_text(), table))
        print(f"wrote {RESULTS_MD.relative_to(ROOT)}")
    else:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
