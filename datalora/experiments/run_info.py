"""What a result was produced on and with (the ``meta`` of the evidence JSON files): the CPU
model, package versions and the git commit of the datalora checkout. Needs no checkout: an
installed datalora reports None for the commit."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

from datalora.ops.cpu_costs import cpuinfo_field

__all__ = ["cpu_model", "git_commit", "package_version", "provenance"]

GIT_COMMIT_ENV = "DATALORA_GIT_COMMIT"
_MEASURED = ("datalora", "kernels", "csrc", "benchmarks", ":(exclude)benchmarks/results")
"""What ``git_dirty`` covers: the library and the benchmark code (an edited baseline or timer
changes what a run measures), not the result files the runs write."""
CHECKOUT = Path(__file__).resolve().parents[2]
"""The source tree's root when datalora runs from a checkout (site-packages when installed)."""


def git_commit(root: Path = CHECKOUT) -> tuple[str | None, bool | None]:
    """``(HEAD sha, whether :data:`_MEASURED` has uncommitted changes)`` of the git
    checkout at ``root``; ``(None, None)`` when ``root`` is not one (an installed package:
    never the commit of some repository that happens to enclose site-packages).

    ``DATALORA_GIT_COMMIT``, when set, names the commit instead, dirtiness unknown (None):
    the GPU machine's working copy is the tree as sent (HEAD's files plus any edits) with,
    at best, the ``.git`` of an earlier state, so only the caller knows what it holds."""
    named = os.environ.get(GIT_COMMIT_ENV)
    if named:
        return named, None
    if not (Path(root) / ".git").exists():
        return None, None
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, check=True).stdout.strip()
        # the library and the benchmark code that measured it (not the results it writes)
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", *_MEASURED],
                                    cwd=root, capture_output=True, text=True,
                                    check=True).stdout.strip())
        return sha, dirty
    except (OSError, subprocess.CalledProcessError):
        return None, None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    return cpuinfo_field("model name") or platform.processor() or platform.machine()


def package_version(module: str) -> str | None:
    """``module.__version__``, or None when it does not import."""
    try:
        return __import__(module).__version__
    except Exception:
        return None


def provenance() -> dict[str, object]:
    """Where and with what a result was computed: ``cpu_model``, ``cpu_threads`` (torch's),
    the ``transformers`` and ``datalora`` versions, ``git_commit`` and ``git_dirty`` (see
    :func:`git_commit`). The evidence runs' losses follow the CPU's rounding (the tiny
    models' training is chaotic enough that another CPU type moves single-seed results),
    so each result file records it."""
    import torch

    sha, dirty = git_commit()
    return {"cpu_model": cpu_model(), "cpu_threads": torch.get_num_threads(),
            "transformers": package_version("transformers"),
            "datalora": package_version("datalora"), "git_commit": sha, "git_dirty": dirty}
