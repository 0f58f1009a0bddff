"""The ``checkpoint-N`` folders a Hugging Face ``Trainer`` run writes, and which are complete.

The Trainer writes ``trainer_state.json`` last (and not atomically), so a folder without a
readable one is a save cut short: resuming it fails after the model has loaded. The
command line's ``--resume-from-checkpoint last`` and ``DATALORATrainer.train(
resume_from_checkpoint=True)`` both resume the latest *complete* checkpoint.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any


def checkpoint_folders(folder: Path) -> list[tuple[int, Path]]:
    """``(N, path)`` of the ``checkpoint-N`` folders in ``folder``, by N."""
    return sorted((int(m[1]), child) for child in folder.iterdir()
                  if child.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", child.name)))


def saved_trainer_state(folder: Path) -> dict[str, Any] | None:
    """The ``trainer_state.json`` of checkpoint ``folder``, None when missing or unreadable
    (a save cut short)."""
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def last_complete_checkpoint(run: str | Path, *, stacklevel: int = 2) -> Path:
    """The latest ``checkpoint-N`` in the output folder ``run`` with a readable
    ``trainer_state.json``; later ones without it are skipped with a warning. A ValueError
    (naming ``resume_from_checkpoint``) when there is none."""
    run = Path(run).expanduser()
    found = checkpoint_folders(run) if run.is_dir() else []
    skipped = []
    for _, folder in reversed(found):  # newest first: each state holds the whole log
        if saved_trainer_state(folder) is None:
            skipped.append(folder.name)
            continue
        if skipped:
            warnings.warn(f"resume_from_checkpoint: skipping {', '.join(reversed(skipped))} in "
                          f"{run}: no readable trainer_state.json (a save cut short); "
                          f"resuming {folder.name}", stacklevel=stacklevel + 1)
        return folder
    raise ValueError(f"resume_from_checkpoint: found no complete checkpoint-N folder "
                     f"(with trainer_state.json) in the output folder {run}")


def missing_training_state(folder: str | Path) -> list[str]:
    """What of the optimizer / learning-rate scheduler state a Trainer checkpoint lacks
    (``["optimizer", "scheduler"]`` for one saved with ``save_only_model=True``): resuming
    it would restart both. DeepSpeed (``global_step*``) and FSDP (``optimizer_0``) keep
    the optimizer in their own files."""
    names = [p.name for p in Path(folder).iterdir()]
    deepspeed = any(name.startswith("global_step") for name in names)
    missing = []
    if not (deepspeed or any(name.startswith("optimizer") for name in names)):
        missing.append("optimizer")
    if not (deepspeed or "scheduler.pt" in names):
        missing.append("scheduler")
    return missing


def check_resumable(folder: str | Path) -> None:
    """A ValueError naming ``resume_from_checkpoint`` when the checkpoint ``folder`` lacks
    its optimizer or scheduler state (:func:`missing_training_state`): it would resume with
    a fresh optimizer and the learning-rate schedule from its start, while the curriculum
    and history continued, not the exact resume it looked like."""
    lacking = missing_training_state(folder)
    if lacking:
        raise ValueError(f"resume_from_checkpoint: {folder} holds no {' or '.join(lacking)} "
                         f"state (saved with save_only_model=True?): resuming would restart "
                         f"the optimizer and the learning-rate schedule; to train its weights "
                         f"further, load them with DATALORAModel.from_pretrained(model, "
                         f"checkpoint, is_trainable=True) and start a new run")


__all__ = ["check_resumable", "checkpoint_folders", "last_complete_checkpoint",
           "missing_training_state", "saved_trainer_state"]
