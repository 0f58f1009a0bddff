"""The embedded multi-task instruction dataset: four synthetic tasks (arithmetic, reverse,
sort, lookup) generated with fixed seeds, and the splits shipped as JSONL under
``datalora/shipped-data/`` (rewritten by ``python -m datalora.data``)."""

from __future__ import annotations

import json
import os
import random
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from datalora.checks import check_int

TASKS: tuple[str, ...] = ("arithmetic", "reverse", "sort", "lookup")
"""Task names of the embedded dataset, in generation order (a task's id is its index)."""

COLUMNS: tuple[str, ...] = ("id", "system_prompt", "question", "response", "task")
"""Columns of every row :mod:`datalora.data` returns (OpenOrca's four plus ``task``)."""

SYSTEM_PROMPTS: tuple[str, ...] = (
    "",
    "You are a helpful assistant. Answer with the result only.",
    "You are an AI assistant. Give a short, exact answer.",
    "Reply with just the answer, nothing else.",
)

# name -> (seed, rows per task) of the splits shipped under datalora/shipped-data/.
SHIPPED_SPLITS: dict[str, tuple[int, int]] = {"train": (0, 500), "eval": (1, 50)}
_SPLIT_ALIASES = {"train": "train", "eval": "eval", "validation": "eval", "test": "eval"}
_DATA_PACKAGE = "datalora"
_DATA_DIR = "shipped-data"  # not a package name: setuptools treats it as data


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
    else:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
    result = {"+": a + b, "-": a - b, "*": a * b}[op]
    return f"What is {a} {op} {b}?", str(result)


def _reverse(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 8)))
    return f"Reverse the letters: {word}", word[::-1]


def _sort(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(3, 6)
    if rng.random() < 0.5:
        items = [str(v) for v in rng.sample(range(100), n)]
        ordered = sorted(items, key=int)
    else:
        items = rng.sample(string.ascii_lowercase, n)
        ordered = sorted(items)
    return f"Sort in ascending order: {', '.join(items)}", ", ".join(ordered)


def _lookup(rng: random.Random) -> tuple[str, str]:
    keys = rng.sample(string.ascii_lowercase, rng.randint(3, 5))
    values = [rng.randint(0, 99) for _ in keys]
    pairs = ", ".join(f"{k}={v}" for k, v in zip(keys, values, strict=True))
    target = rng.randrange(len(keys))
    return f"Given {pairs}, what is {keys[target]}?", str(values[target])


_GENERATORS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "arithmetic": _arithmetic,
    "reverse": _reverse,
    "sort": _sort,
    "lookup": _lookup,
}


def generate_multitask_dataset(num_per_task: int, seed: int = 0,
                               tasks: Sequence[str] | None = None, *,
                               exclude_questions: Iterable[str] = ()) -> list[dict[str, str]]:
    """Generate a deterministic multi-task instruction dataset.

    Each task draws from its own ``random.Random`` seeded by ``(seed, task)``, so a task's
    rows do not depend on which other tasks are requested. Questions are unique within the
    result and never in ``exclude_questions`` (use it to keep an eval split disjoint from
    train). Rows are interleaved round-robin over tasks, so any prefix is balanced.

    Args:
        num_per_task: rows per task (>= 0).
        seed: generation seed.
        tasks: subset of :data:`TASKS` (default: all, in that order).
        exclude_questions: questions that must not be generated.

    Returns:
        ``num_per_task * len(tasks)`` rows with the columns :data:`COLUMNS`.
    """
    num_per_task = check_int("num_per_task", num_per_task, low=0)
    seed = check_int("seed", seed, error=TypeError)
    if tasks is None:
        tasks = TASKS
    if isinstance(tasks, str):
        raise TypeError(f"tasks: expected a sequence of task names, got the string {tasks!r}")
    tasks = tuple(tasks)
    unknown = [t for t in tasks if t not in _GENERATORS]
    if unknown or not tasks or len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks: expected distinct names from {TASKS}, got {tasks}")
    seen = set(exclude_questions)
    per_task: list[list[dict[str, str]]] = []
    for task in tasks:
        rng = random.Random(f"datalora:{seed}:{task}")
        rows: list[dict[str, str]] = []
        attempts = 0
        while len(rows) < num_per_task:
            attempts += 1
            if attempts > 100 * num_per_task + 1000:
                raise ValueError(f"num_per_task: cannot draw {num_per_task} distinct "
                                 f"questions for task {task!r}; got {len(rows)}")
            question, answer = _GENERATORS[task](rng)
            system_prompt = rng.choice(SYSTEM_PROMPTS)
            if question in seen:
                continue
            seen.add(question)
            rows.append({"id": f"{task}.{seed}.{len(rows)}", "system_prompt": system_prompt,
                         "question": question, "response": answer, "task": task})
        per_task.append(rows)
    return [rows[i] for i in range(num_per_task) for rows in per_task]


def shipped_split_rows(split: str = "train") -> list[dict[str, str]]:
    """Regenerate a shipped split (``"train"`` or ``"eval"``) from :data:`SHIPPED_SPLITS`.

    The eval split excludes every train question. The shipped JSONL equals this output.
    """
    split = canonical_split(split)
    seed, n = SHIPPED_SPLITS[split]
    exclude: set[str] = set()
    if split != "train":
        exclude = {r["question"] for r in shipped_split_rows("train")}
    return generate_multitask_dataset(n, seed=seed, exclude_questions=exclude)


def write_jsonl(rows: Iterable[Mapping[str, Any]], path: str | os.PathLike[str]) -> None:
    """Write rows as JSON lines (UTF-8, one object per line, keys in row order), atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(dict(row), ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def canonical_split(split: str) -> str:
    if split not in _SPLIT_ALIASES:
        raise ValueError(f"split: expected one of {sorted(_SPLIT_ALIASES)} for the embedded "
                         f"dataset, got {split!r}")
    return _SPLIT_ALIASES[split]


def shipped_split_path(split: str = "train") -> Path:
    """Path of the shipped JSONL of ``split``, found with ``importlib.resources``."""
    name = f"multitask_{canonical_split(split)}.jsonl"
    return Path(str(resources.files(_DATA_PACKAGE) / _DATA_DIR / name))
