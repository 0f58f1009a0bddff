"""The embedded multi-task instruction dataset, dataset loading, prompt format and collation.

Rows follow OpenOrca's column format plus a ``task`` column::

    {"id": "arithmetic.0.17", "system_prompt": "...", "question": "What is 23 + 58?",
     "response": "81", "task": "arithmetic"}

The shipped splits (``datalora/shipped-data/multitask_{train,eval}.jsonl``) are written by
``python -m datalora.data`` from :func:`generate_multitask_dataset` with fixed seeds;
a test checks they equal the generator's output.

Loading a real dataset (a local JSONL / JSON / parquet file, a ``datasets`` folder, or a
Hub name) goes through :func:`load_instruction_dataset` and returns rows with the same
columns, so the demo and the trainer treat the embedded data and real data alike. Alpaca
rows (``instruction`` / ``input`` / ``output``) and single-turn chat rows (``messages``:
optional system, user, assistant) are mapped to these columns.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import random
import re
import string
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from datalora.checks import as_scalar, as_whole, check_int

__all__ = [
    "COLUMNS",
    "IGNORE_INDEX",
    "REQUIRED_COLUMNS",
    "SHIPPED_SPLITS",
    "TASKS",
    "CausalLMCollator",
    "format_prompt",
    "SplitNotFoundError",
    "TokenizeStats",
    "check_task_names",
    "first_row_without_token",
    "generate_multitask_dataset",
    "load_eval_rows",
    "load_instruction_dataset",
    "looks_like_local_path",
    "normalize_rows",
    "prompt_inputs",
    "shipped_split_path",
    "shipped_split_rows",
    "tokenize_example",
    "tokenize_rows",
    "write_jsonl",
]

TASKS: tuple[str, ...] = ("arithmetic", "reverse", "sort", "lookup")
"""Task names of the embedded dataset, in generation order (a task's id is its index)."""

COLUMNS: tuple[str, ...] = ("id", "system_prompt", "question", "response", "task")
"""Columns of every row returned by this module (OpenOrca's four plus ``task``)."""

REQUIRED_COLUMNS: tuple[str, ...] = ("question", "response")
"""Columns a loaded dataset must have (or the Alpaca / chat columns they are mapped from);
``id`` and ``task`` are filled in when missing, a missing ``system_prompt`` is ``""``."""

_FORMAT_HINT = ("Alpaca rows (instruction, input, output) and single-turn chat rows "
                "(messages: optional system, user, assistant) are mapped to these columns; "
                "convert other formats to one of them")

UNKNOWN_TASK = "unknown"
IGNORE_INDEX = -100
"""Label value ignored by the causal-LM loss (prompt and padding positions)."""

SYSTEM_PROMPTS: tuple[str, ...] = (
    "",
    "You are a helpful assistant. Answer with the result only.",
    "You are an AI assistant. Give a short, exact answer.",
    "Reply with just the answer, nothing else.",
)

# name -> (seed, rows per task) of the splits shipped under datalora/shipped-data/.
SHIPPED_SPLITS: dict[str, tuple[int, int]] = {"train": (0, 500), "eval": (1, 50)}
_SPLIT_ALIASES = {"train": "train", "eval": "eval", "validation": "eval", "test": "eval"}
EVAL_SPLITS: tuple[str, ...] = ("eval", "validation", "test")
"""Split names :func:`load_eval_rows` tries, in order, on folders and split-keyed files."""
_DATA_PACKAGE = "datalora"
_DATA_DIR = "shipped-data"  # not a package name: setuptools treats it as data


# --------------------------------------------------------------------------- generation

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
    split = _canonical_split(split)
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


def _canonical_split(split: str) -> str:
    if split not in _SPLIT_ALIASES:
        raise ValueError(f"split: expected one of {sorted(_SPLIT_ALIASES)} for the embedded "
                         f"dataset, got {split!r}")
    return _SPLIT_ALIASES[split]


def shipped_split_path(split: str = "train") -> Path:
    """Path of the shipped JSONL of ``split``, found with ``importlib.resources``."""
    name = f"multitask_{_canonical_split(split)}.jsonl"
    return Path(str(resources.files(_DATA_PACKAGE) / _DATA_DIR / name))


# --------------------------------------------------------------------------- loading

class SplitNotFoundError(ValueError):
    """The requested split is not in a folder / split-keyed file (see :data:`EVAL_SPLITS`)."""


def _read_jsonl(path: Path, limit: int | None = None) -> tuple[list[dict[str, Any]], list[int]]:
    """The rows of a JSON-lines file (the first ``limit``: reading stops there) and the
    1-based line number of each (blank lines skipped), so errors can name the line."""
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    lineno = 0
    with open(path, "rb") as f:  # decoded per line, so a non-UTF-8 byte names its line
        for chunk in f:
            # a lone "\r" ends a line too (as in text mode; JSON strings cannot hold one)
            for raw in chunk.rstrip(b"\n").removesuffix(b"\r").split(b"\r"):
                lineno += 1
                if limit is not None and len(rows) >= limit:
                    return rows, lines
                try:  # -sig on the first line: tolerate a UTF-8 byte-order mark
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"source: {path} line {lineno} is not valid UTF-8 text "
                                     f"({e}); re-save the file as UTF-8") from e
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"source: {path} line {lineno} is not valid JSON: "
                                     f"{e}") from e
                rows.append(row)
                lines.append(lineno)
    return rows, lines


def _is_row(data: Mapping[str, Any]) -> bool:
    """Whether a JSON object is one row (a chat ``messages`` list of role objects, or a
    row column holding a single value) rather than splits or columns of rows."""
    messages = data.get("messages")
    if isinstance(messages, list) and messages and all(
            isinstance(m, Mapping) and "role" in m for m in messages):
        return True
    return any(key in data and not isinstance(data[key], list)
               for key in (*REQUIRED_COLUMNS, "instruction", "output"))


def _read_json(path: Path, split: str) -> list[dict[str, Any]]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"source: {path} is not valid UTF-8 text ({e}); re-save the file "
                         f"as UTF-8") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" or not text.strip():  # a .json file holding JSON lines
            return _read_jsonl(path)[0]
        raise ValueError(f"source: {path} is not valid JSON: {e.msg} at line {e.lineno} "
                         f"column {e.colno}") from e
    if isinstance(data, Mapping) and _is_row(data):
        raise ValueError(f"source: {path} holds a single row object, not a list of rows: "
                         f"wrap it in a list ([{{...}}])")
    if isinstance(data, Mapping):
        row_lists = [k for k, v in data.items() if isinstance(v, list) and v
                     and all(isinstance(x, Mapping) for x in v)]
        if split in data and isinstance(data[split], list):
            data = data[split]
        elif "data" in data and isinstance(data["data"], list):
            data = data["data"]
        elif row_lists and len(row_lists) == len(data):
            # split-keyed ({"train": [rows], "validation": [rows]}) without `split`
            raise SplitNotFoundError(f"split: {split!r} not in {path}; available: "
                                     f"{sorted(row_lists)}")
        elif all(isinstance(v, list) for v in data.values()) and data:
            # column-oriented: {"question": [...], "response": [...], ...}
            n = len(next(iter(data.values())))
            if any(len(v) != n for v in data.values()):
                raise ValueError(f"source: columns of {path} have different lengths")
            data = [{k: v[i] for k, v in data.items()} for i in range(n)]
        else:
            raise ValueError(f"source: {path} holds a JSON object without a list of rows "
                             f"(expected a list, {{{split!r}: [...]}} or {{'data': [...]}})")
    if not isinstance(data, list):
        raise ValueError(f"source: {path} must hold a list of row objects, "
                         f"got {type(data).__name__}")
    return data


def _read_parquet(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """The rows of a parquet file (the first ``limit``: reading stops there, a few row
    batches instead of the whole file)."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - pyarrow comes with `datasets`
        raise ImportError("reading parquet needs pyarrow: pip install 'datalora[data]'") from e
    import pyarrow as pa

    rows: list[dict[str, Any]] = []
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=min(limit or 65536, 65536)):
            rows += batch.to_pylist()
            if limit is not None and len(rows) >= limit:
                return rows[:limit]
    except pa.ArrowException as e:  # an empty, truncated or non-parquet file
        raise ValueError(f"source: {path} is not a readable parquet file: {e}") from e
    return rows


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("loading a dataset folder or a Hub dataset needs the `datasets` "
                          "package: pip install 'datalora[data]'") from e
    return datasets


def _read_dataset_dir(path: Path, split: str) -> Any:
    datasets = _import_datasets()
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        ds = datasets.load_from_disk(str(path))
    else:  # a folder of data files (e.g. a downloaded Hub repo snapshot)
        try:
            ds = datasets.load_dataset(str(path))
        except datasets.data_files.EmptyDatasetError as e:
            raise ValueError(f"source: the folder {path} holds no data files (JSONL, JSON, "
                             f"parquet, CSV, ...) and no saved dataset") from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise SplitNotFoundError(f"split: {split!r} not in the dataset at {path}; "
                                     f"available: {sorted(ds)}")
        ds = ds[split]
    return ds


def _read_hub(name: str, split: str, limit: int | None) -> Any:
    datasets = _import_datasets()
    try:
        if limit is None:
            return datasets.load_dataset(name, split=split)
        return datasets.load_dataset(name, split=split, streaming=True).take(limit)
    except Exception as e:
        if isinstance(e, ValueError) and str(e).startswith(("Unknown split", "Bad split")):
            # so load_eval_rows goes on to the next of EVAL_SPLITS
            raise SplitNotFoundError(f"split: {split!r} not in the Hub dataset {name!r}: "
                                     f"{e}") from e
        raise OSError(
            f"source: {name!r} is not a local file or folder, and loading it from the Hugging "
            f"Face Hub with datasets.load_dataset(split={split!r}) failed (offline machine or "
            f"unknown dataset?): {type(e).__name__}: {e}") from e


def _column_names(rows: Any) -> list[str] | None:
    names = getattr(rows, "column_names", None)
    return list(names) if names is not None else None


def _check_columns(columns: list[str] | None, source: str) -> None:
    """A table's columns (``datasets`` / parquet) hold OpenOrca, Alpaca or chat rows."""
    if columns is None or "messages" in columns or {"instruction", "output"} <= set(columns):
        return
    if any(c not in columns for c in REQUIRED_COLUMNS):
        raise _missing_columns(source, columns)


def _missing_columns(where: str, found: list[str], arg: str = "source") -> ValueError:
    """The error for a table or row (``where``) of argument ``arg`` without the required
    columns."""
    missing = [c for c in REQUIRED_COLUMNS if c not in found]
    return ValueError(f"{arg}: {where} is missing required column(s) {missing}; expected "
                      f"{list(REQUIRED_COLUMNS)} (plus optional 'system_prompt', 'id', "
                      f"'task'), found {found}. {_FORMAT_HINT}")


def _from_alpaca(row: Mapping[str, Any], where: str, arg: str) -> dict[str, Any]:
    """Alpaca columns: ``question = instruction`` (+ ``"\\n\\n" + input`` when non-empty; a
    number is written as text), ``response = output``; another ``input`` type is an error."""
    question, extra = row["instruction"], row.get("input")
    if (isinstance(extra, int) and not isinstance(extra, bool)
            or isinstance(extra, float) and math.isfinite(extra)):
        extra = str(extra)
    elif extra is not None and not isinstance(extra, str):
        raise ValueError(f"{arg}: column 'input' of {where} must be a string or a finite "
                         f"number, got {extra!r:.40}")
    if extra and isinstance(question, str):
        question = f"{question}\n\n{extra}"
    return {"system_prompt": row.get("system_prompt"), "question": question,
            "response": row["output"]}


def _from_messages(messages: Any, where: str, arg: str) -> dict[str, Any]:
    """A single-turn chat (optional system, user, assistant) as OpenOrca columns."""
    roles = ([m.get("role") for m in messages] if isinstance(messages, list)
             and all(isinstance(m, Mapping) for m in messages) else None)
    if roles not in (["user", "assistant"], ["system", "user", "assistant"]):
        raise ValueError(f"{arg}: {where}: 'messages' must be one single-turn conversation "
                         f"[system (optional), user, assistant] of {{'role', 'content'}} "
                         f"objects, got roles {roles}; multi-turn chats are not supported")
    content = {m["role"]: m.get("content") for m in messages}
    return {"system_prompt": content.get("system"), "question": content["user"],
            "response": content["assistant"]}


def _openorca_fields(row: Mapping[str, Any], where: str, arg: str) -> dict[str, Any]:
    """``system_prompt`` / ``question`` / ``response`` of an OpenOrca, Alpaca or chat row."""
    if all(c in row for c in REQUIRED_COLUMNS):
        return {"system_prompt": row.get("system_prompt"), "question": row["question"],
                "response": row["response"]}
    if "instruction" in row and "output" in row:
        return _from_alpaca(row, where, arg)
    if "messages" in row:
        return _from_messages(row["messages"], where, arg)
    raise _missing_columns(where, sorted(row), arg)


def _normalize(rows: Iterable[Mapping[str, Any]], source: str, limit: int | None,
               lines: list[int] | None = None, arg: str = "source") -> list[dict[str, str]]:
    """Rows as :data:`COLUMNS`; errors start with ``arg`` and name the 1-based line of a
    JSON-lines file (``lines``) or the 0-based row index (``dataset[i]``), said as such."""
    _check_columns(_column_names(rows), source)
    out: list[dict[str, str]] = []
    for i, row in enumerate(rows):
        if limit is not None and i >= limit:
            break
        where = (f"line {lines[i]} of {source}" if lines is not None
                 else f"row index {i} (0-based) of {source}")
        if not isinstance(row, Mapping):
            raise ValueError(f"{arg}: {where} is a {type(row).__name__}, expected an object "
                             f"with columns {list(REQUIRED_COLUMNS)}")
        fields = _openorca_fields(row, where, arg)
        if fields["system_prompt"] is None:
            fields["system_prompt"] = ""
        for col, value in fields.items():
            if not isinstance(value, str):
                raise ValueError(f"{arg}: column {col!r} of {where} must be a string, got "
                                 f"{type(value).__name__}")
            try:  # a JSON escape such as "\ud800" gives a lone surrogate: no tokenizer takes it
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                raise ValueError(f"{arg}: column {col!r} of {where} is not valid Unicode "
                                 f"({e.reason} at character {e.start})") from e
        row_id = row.get("id")
        task = row.get("task")
        out.append({"id": str(i) if row_id is None else str(row_id), **fields,
                    "task": UNKNOWN_TASK if task is None else str(task)})
    return out


def normalize_rows(rows: Sequence[Mapping[str, Any]], arg: str = "rows",
                   limit: int | None = None) -> list[dict[str, str]]:
    """In-memory rows (OpenOrca, Alpaca or single-turn chat columns) mapped and checked as
    :func:`load_instruction_dataset` does with a file's rows; errors name ``arg`` (the
    argument that passed the rows) and the row's 0-based index.

    Raises:
        TypeError: ``rows`` is not a list or tuple.
        ValueError: a row is not an object, lacks the required columns or has a non-string
            value in one.
    """
    if not isinstance(rows, (list, tuple)):
        raise TypeError(f"{arg}: expected a list of row objects, got {type(rows).__name__}")
    if limit is not None:
        limit = check_int("limit", limit, low=0)
    return _normalize(rows, f"the {arg} list", limit, arg=arg)


def looks_like_local_path(name: str | os.PathLike[str]) -> bool:
    """Whether a model / dataset name that does not exist locally was meant as a local
    path rather than a Hub name (``org/name``), so it fails at once instead of after the
    Hub's retries: a path object, an absolute path, one starting with ``.`` or ``~``, more
    than one ``/``, a backslash, a file suffix (``.txt``, ``.jsonl``; not a version such
    as ``-v1.2``), or a name whose parent folder exists here (``models/typo``)."""
    if isinstance(name, os.PathLike):
        return True
    path = Path(name)
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1
            or "\\" in name or bool(re.fullmatch(r"\.[A-Za-z][A-Za-z0-9]*", path.suffix))
            or (path.parent != Path(".") and path.parent.is_dir()))


def load_instruction_dataset(source: str | os.PathLike[str] | None = None, split: str = "train",
                             limit: int | None = None) -> list[dict[str, str]]:
    """Load instruction rows with the columns :data:`COLUMNS`.

    Args:
        source: ``None`` or ``"embedded"``: the shipped multi-task data. A local ``.jsonl``,
            ``.json`` or ``.parquet`` file; a local folder written by ``save_to_disk`` (or a
            folder of data files ``datasets.load_dataset`` understands); or else a Hugging
            Face Hub dataset name (e.g. ``"Open-Orca/OpenOrca"``), loaded with
            ``datasets.load_dataset`` (streamed when ``limit`` is set).
        split: ``"train"`` or ``"eval"`` (aliases ``validation``, ``test``) for the embedded
            data; the split to select for folders and Hub datasets; ignored for single files.
        limit: keep only the first ``limit`` rows (>= 0); ``None`` keeps all.

    Returns:
        A list of dicts with string values for ``id, system_prompt, question, response,
        task``. Rows without ``id`` get their index, without ``task`` get ``"unknown"``,
        a null or missing ``system_prompt`` becomes ``""``; other columns are dropped.
        Alpaca rows become ``question = instruction`` (plus ``"\\n\\n" + input`` when
        ``input`` is non-empty; a number is written as text), ``response = output``;
        chat rows with ``messages`` ``[system (optional), user, assistant]`` become
        ``system_prompt`` / ``question`` / ``response`` (the tokenizer's chat template is
        not applied: every row is trained in the :func:`format_prompt` format).

    Raises:
        ValueError: a required column (``question``, ``response``) is missing or not a
            string (the error names the 1-based line of a ``.jsonl`` file), an Alpaca
            ``input`` is neither a string nor a number, a ``messages`` row is not
            single-turn, or ``split`` / ``limit`` is invalid.
        FileNotFoundError: ``source`` looks like a local path (see
            :func:`looks_like_local_path`) that does not exist.
        OSError: a Hub name could not be loaded (e.g. offline).
    """
    if limit is not None:
        limit = check_int("limit", limit, low=0)
    if not isinstance(split, str):
        raise TypeError(f"split: expected a str, got {type(split).__name__}")
    if source is None or source == "embedded":
        rows, lines = _read_jsonl(shipped_split_path(split), limit)
        return _normalize(rows, f"the embedded {_canonical_split(split)} split", limit, lines)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source: expected None, 'embedded', a path or a Hub dataset name, "
                        f"got {type(source).__name__}")
    if not os.fspath(source).strip():  # Path("") is the current folder
        raise ValueError(f"source: expected a file, folder or Hub dataset name, got "
                         f"{os.fspath(source)!r}")
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    lines = None
    if path.is_dir():
        rows = _read_dataset_dir(path, split)
    elif path.is_file():
        if suffix == ".jsonl":
            rows, lines = _read_jsonl(path, limit)
        elif suffix == ".json":
            rows = _read_json(path, split)
        elif suffix == ".parquet":
            rows = _read_parquet(path, limit)
        else:
            raise ValueError(f"source: unsupported file type {suffix!r} for {path}; expected "
                             f".jsonl, .json or .parquet")
    elif looks_like_local_path(source):
        raise FileNotFoundError(f"source: no such file or folder: {path}")
    else:
        rows = _read_hub(str(source), split, limit)
    return _normalize(rows, str(source), limit, lines)


def load_eval_rows(source: str | os.PathLike[str] | None = None,
                   limit: int | None = None) -> list[dict[str, str]]:
    """The evaluation rows of ``source``: the embedded eval split, or the first of
    :data:`EVAL_SPLITS` (``eval``, ``validation``, ``test``) that a folder or a split-keyed
    ``.json`` file has. A single ``.jsonl`` / ``.parquet`` file has no splits: all its rows.

    Raises:
        SplitNotFoundError: a folder / split-keyed file has none of :data:`EVAL_SPLITS`.
    """
    error: SplitNotFoundError | None = None
    for split in EVAL_SPLITS:
        try:
            return load_instruction_dataset(source, split=split, limit=limit)
        except SplitNotFoundError as e:
            error = e
    raise SplitNotFoundError(f"split: none of {list(EVAL_SPLITS)} in {source} ({error})")


# --------------------------------------------------------------------------- prompts, tokens

def format_prompt(example: Mapping[str, Any]) -> str:
    """The model input for a row: optional system prompt, the question, an answer cue.

    ``"{system_prompt}\\n\\n### Question:\\n{question}\\n\\n### Answer:\\n"`` (the first
    part only when the system prompt is non-empty). The response follows the cue directly.
    """
    if "question" not in example:
        raise ValueError(f"example: missing column 'question', found {sorted(example)}")
    for col in ("question", "system_prompt"):  # None (a null column) would be the text "None"
        value = example.get(col)
        if not isinstance(value, str) and (col == "question" or value is not None):
            raise ValueError(f"example: column {col!r} must be a string, got "
                             f"{type(value).__name__}")
    system_prompt = example.get("system_prompt") or ""
    head = f"{system_prompt}\n\n" if system_prompt else ""
    return f"{head}### Question:\n{example['question']}\n\n### Answer:\n"


def _encode(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def prompt_inputs(tokenizer: Any, prompts: str | list[str], device: Any = None,
                  **kwargs: Any) -> dict[str, Any]:
    """``input_ids`` / ``attention_mask`` tensors of ``prompts`` for a causal LM's forward
    or ``generate`` (``tokenizer(..., return_tensors="pt", **kwargs)``, on ``device``).

    Only those two: a tokenizer that also returns ``token_type_ids`` (the embedded one on
    transformers 4.x, BERT-style ones) would have ``generate`` refuse them as unused."""
    suffix = appended_special_ids(tokenizer)
    if suffix:  # the prompt as training encodes it: without the EOS the tokenizer appends
        padding = ("padding", "padding_side", "pad_to_multiple_of")
        ids = tokenizer(prompts, **{k: v for k, v in kwargs.items() if k not in padding})
        rows = [ids["input_ids"]] if isinstance(prompts, str) else ids["input_ids"]
        rows = [strip_appended(row, suffix) for row in rows]
        enc = tokenizer.pad({"input_ids": rows}, padding=kwargs.get("padding", True),
                            return_tensors="pt",
                            **{k: kwargs[k] for k in (*padding[1:], "max_length")
                               if k in kwargs})
    else:
        enc = tokenizer(prompts, return_tensors="pt", **kwargs)
    return {k: enc[k] if device is None else enc[k].to(device)
            for k in ("input_ids", "attention_mask") if k in enc}


def appended_special_ids(tokenizer: Any) -> list[int]:
    """The special tokens ``tokenizer`` appends to every text it encodes (the EOS of a
    Llama-2 / Mistral tokenizer with ``add_eos_token=True``, a BERT-style ``[SEP]``), found
    by encoding a probe with and without special tokens; ``[]`` for most causal LMs'."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if list(full[start:start + len(plain)]) == list(plain):
            return list(full[start + len(plain):])
    return []


def strip_appended(ids: Sequence[int], suffix: Sequence[int]) -> list[int]:
    """``ids`` without a trailing ``suffix`` (:func:`appended_special_ids`): a prompt's
    encoding as the prefix of its training example, which continues with the response."""
    ids = list(ids)
    return ids[:-len(suffix)] if suffix and ids[-len(suffix):] == list(suffix) else ids


def tokenize_example(example: Mapping[str, Any], tokenizer: Any,
                     max_length: int) -> dict[str, list[int]]:
    """Tokenize a row for causal-LM fine-tuning with the loss on the response only.

    Prompt (:func:`format_prompt`) + response are encoded as one text, with the
    tokenizer's special tokens (its BOS, if it adds one), then ``eos_token_id`` is
    appended (unless the tokenizer ended the text with it); the ids are the documented
    text's tokens. Labels are ``-100`` on the
    prompt's tokens and equal to ``input_ids`` on response + EOS (a token spanning the end
    of the prompt and the start of the response is labelled). When longer
    than ``max_length``, prompt tokens are dropped from the left (keeping a leading BOS)
    down to half of ``max_length`` (so the answer cue and the end of the question stay),
    then the response is cut on the right. At least one response token always remains.

    Returns:
        ``input_ids``, ``attention_mask`` (all 1), ``labels``: lists of length
        ``L <= max_length``.
    """
    max_length = check_int("max_length", max_length, low=2)
    [(prompt, response)] = _encode_examples([example], tokenizer)
    return _example(*_truncate(prompt, response, max_length, tokenizer))


def _eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("tokenizer: has no eos_token_id; set tokenizer.eos_token")
    return eos


def _encode_examples(examples: Sequence[Mapping[str, Any]],
                     tokenizer: Any) -> list[tuple[list[int], list[int]]]:
    """Prompt ids (with special tokens) and response ids + EOS, untruncated, of each
    example: the encoding of prompt + response as one text (so the trained ids are that
    text's tokens: a SentencePiece-style tokenizer would give a response encoded on its
    own a leading "▁"), split where it stops matching the prompt's own encoding (a token
    spanning the end of the prompt and the start of the response goes to the response).
    Two batched tokenizer calls (a fast tokenizer encodes a batch in parallel, many times
    faster than one call per text)."""
    eos = _eos_id(tokenizer)
    for example in examples:
        if "response" not in example:
            raise ValueError(f"example: missing column 'response', found {sorted(example)}")
        if not isinstance(example["response"], str):
            raise ValueError(f"example: column 'response' must be a string, got "
                             f"{type(example['response']).__name__}")
    if not examples:
        return []
    texts = [format_prompt(e) for e in examples]
    suffix = appended_special_ids(tokenizer)  # an appended EOS ends the example, not the prompt
    prompts = [strip_appended(p, suffix)
               for p in tokenizer(texts, add_special_tokens=True)["input_ids"]]
    joint = tokenizer([t + e["response"] for t, e in zip(texts, examples, strict=True)],
                      add_special_tokens=True)["input_ids"]
    out = []
    for prompt, ids, example in zip(prompts, joint, examples, strict=True):
        split = response_start(prompt, ids, example["response"], len(suffix))
        response = list(ids[split:])
        if not response or response[-1] != eos:  # a tokenizer may add EOS itself
            response.append(eos)
        out.append((list(ids[:split]), response))
    return out


def response_start(prompt_ids: Sequence[int], joint_ids: Sequence[int], response: str,
                   appended: int = 0) -> int:
    """Index of the first response token in ``joint_ids`` (the encoding of prompt + response
    as one text, ending in ``appended`` special tokens the tokenizer adds, which
    ``prompt_ids`` lacks): where it stops matching ``prompt_ids`` (the prompt's own
    encoding), so a token spanning the end of the prompt and the start of the response is a
    response token; when the response merged into the prompt's last token (same id: e.g. a
    run of whitespace or unknown characters), that token, since it spans both."""
    n = min(len(prompt_ids), len(joint_ids))
    split = next((i for i in range(n) if prompt_ids[i] != joint_ids[i]), n)
    if split == len(joint_ids) - appended and split > 0 and response:
        split -= 1
    return split


def _truncate(prompt: list[int], response: list[int], max_length: int,
              tokenizer: Any) -> tuple[list[int], list[int]]:
    """Prompt and response cut to ``max_length`` in all (see :func:`tokenize_example`)."""
    overflow = len(prompt) + len(response) - max_length
    if overflow > 0:
        bos = getattr(tokenizer, "bos_token_id", None)
        keep_first = 1 if prompt and bos is not None and prompt[0] == bos else 0
        # the prompt keeps half of max_length (a long response must not erase the question)
        keep = max(min(len(prompt), max_length // 2), keep_first + 1)
        drop = min(overflow, max(len(prompt) - keep, 0))
        prompt = prompt[:keep_first] + prompt[keep_first + drop:]
        if len(prompt) >= max_length:  # max_length 2 with a BOS: keep one response token
            prompt = prompt[:max_length - 1]
        response = response[: max_length - len(prompt)]
    return prompt, response


def _example(prompt: list[int], response: list[int]) -> dict[str, list[int]]:
    input_ids = prompt + response
    return {"input_ids": input_ids, "attention_mask": [1] * len(input_ids),
            "labels": [IGNORE_INDEX] * len(prompt) + response}


TOKENIZE_CHUNK = 1024
"""Rows per batched tokenizer call in :func:`tokenize_rows`."""


@dataclass
class TokenizeStats:
    """What :func:`tokenize_rows` did to the rows.

    Attributes:
        rows: rows tokenized. truncated: rows longer than ``max_length``.
        response_cut: truncated rows that lost response tokens (and so their EOS: the
            model does not learn to stop on them). empty_response: rows whose response is
            empty (trained on the EOS token alone).
    """

    rows: int = 0
    truncated: int = 0
    response_cut: int = 0
    empty_response: int = 0

    def warnings(self, what: str, max_length: int,
                 position_limit: int | None = None) -> list[str]:
        """One line per kind of loss, e.g. ``"training rows: truncated 3 of 8 to
        max_length=64 (1 lost response tokens and its EOS)"``; empty when none.
        ``position_limit``: the model's maximum positions (learned position tables); when
        ``max_length`` is already at it the advice is to shorten the rows, not to raise it."""
        out = []
        if self.truncated:
            advice = ("the model's position limit (max_position_embeddings): shorten those "
                      "rows to keep them whole"
                      if position_limit is not None and max_length >= position_limit
                      else "raise max_length (--max-length) to keep them whole")
            out.append(f"{what}: truncated {self.truncated} of {self.rows} to max_length="
                       f"{max_length} ({self.response_cut} lost response tokens and their EOS, "
                       f"{self.truncated - self.response_cut} only prompt tokens); {advice}")
        if self.empty_response:
            out.append(f"{what}: {self.empty_response} of {self.rows} have an empty response "
                       f"(trained on the EOS token alone)")
        return out


def tokenize_rows(rows: Sequence[Mapping[str, Any]], tokenizer: Any, max_length: int,
                  progress: bool = False) -> tuple[list[dict[str, list[int]]], TokenizeStats]:
    """:func:`tokenize_example` over ``rows``, counting truncated rows and empty responses.

    Args:
        progress: show a progress bar (only when it takes more than a second or two).

    Returns:
        The tokenized rows (each with the row's ``task``, default ``"unknown"``) and a
        :class:`TokenizeStats`.
    """
    from tqdm.auto import tqdm

    max_length = check_int("max_length", max_length, low=2)
    _eos_id(tokenizer)
    stats = TokenizeStats(rows=len(rows))
    out = []
    with tqdm(total=len(rows), desc="tokenizing", unit="row", disable=not progress,
              delay=2) as bar:
        for start in range(0, len(rows), TOKENIZE_CHUNK):
            chunk = rows[start:start + TOKENIZE_CHUNK]
            for row, (prompt, response) in zip(chunk, _encode_examples(chunk, tokenizer),
                                               strict=True):
                cut_prompt, cut_response = _truncate(prompt, response, max_length, tokenizer)
                stats.truncated += len(prompt) + len(response) > max_length
                stats.response_cut += len(cut_response) < len(response)
                stats.empty_response += not row["response"]
                item: dict[str, Any] = _example(cut_prompt, cut_response)
                item["task"] = row.get("task", UNKNOWN_TASK)
                out.append(item)
            bar.update(len(chunk))
    return out, stats


def check_task_names(name: str, tasks: Any) -> tuple[str, ...]:
    """``tasks`` (an ordered iterable of names: a list, tuple, numpy array or range; numbers
    read as their text) as a tuple of strings; otherwise TypeError ``"{name}: expected a
    sequence of task names, got ..."`` (a string was split into its letters, a number
    failed as not iterable; a set's order, so the ids, differs per process)."""
    if isinstance(tasks, (str, bytes)):
        got = f"the string {tasks!r}"
    elif isinstance(tasks, (Mapping, set, frozenset)) or not isinstance(tasks, Iterable):
        got = type(tasks).__name__  # a set's order differs per process: ids per rank too
    else:
        names = tuple(as_scalar(t) for t in tasks)  # a list, tuple, numpy array, range
        # names are labels: numbers (task ids) read as their text; numpy's str_ is a str
        if all(isinstance(t, str) or (isinstance(t, numbers.Real) and not isinstance(t, bool))
               for t in names):
            return tuple(str(t) for t in names)
        got = f"{tasks!r:.80}"
    raise TypeError(f"{name}: expected a sequence of task names, got {got}")


def first_row_without_token(attention_mask: torch.Tensor) -> int | None:
    """The first row of ``attention_mask [B, L]`` with no real (nonzero) token, or None:
    one cheap reduction when every row has one (a check per row cost the collator
    10-25 %), one host read either way."""
    if int(attention_mask.amax(1).amin()) > 0:
        return None
    empty = ~attention_mask.ne(0).any(1)
    return int(empty.nonzero()[0]) if bool(empty.any()) else None


def _long(value: Any, i: int, key: str) -> torch.Tensor:
    """A feature's ids / mask / labels (one sequence: ``[L]`` or ``[1, L]``) as an ``[L]``
    int64 tensor; fractional values (a float array) are an error, not truncated to other
    ids, and so are several sequences (``[2, L]`` was merged into one row of ``2 L``)."""
    try:
        t = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as e:  # None, strings, ragged lists
        raise ValueError(f"features: feature {i} has {key} {value!r:.60}, expected a list "
                         f"of ints") from e
    if t.dim() != 1 and not (t.dim() == 2 and len(t) == 1):
        raise ValueError(f"features: feature {i} has {key} of shape {tuple(t.shape)}, "
                         f"expected one sequence")
    if t.is_floating_point() and not torch.equal(t, t.round()):
        raise ValueError(f"features: feature {i} has non-integer {key}: {value!r:.60}")
    return t.to(torch.long).reshape(-1)


@dataclass
class CausalLMCollator:
    """Pad a list of tokenized examples (right padding) into a batch.

    Usable as a ``transformers.Trainer`` ``data_collator`` and as a ``DataLoader``
    ``collate_fn``. Features are dicts with ``input_ids`` (one non-empty sequence of ints,
    ``[L]`` or ``[1, L]``; optional ``attention_mask`` with a 1 somewhere and ``labels``
    alike, of its length); raw rows (with ``question`` / ``response`` but no
    ``input_ids``) are tokenized with :func:`tokenize_example` when ``tokenizer`` and
    ``max_length`` are set.

    Args:
        tokenizer: gives ``pad_token_id`` (and tokenizes raw rows); or pass ``pad_token_id``.
        pad_token_id: the padding id for ``input_ids`` (default: the tokenizer's).
        max_length: for tokenizing raw rows.
        label_pad_token_id: label value at padded positions (-100).
        pad_to_multiple_of: round the padded length up to a multiple of this.
        return_task_ids: also return ``task_ids [B]`` (int64): a feature's ``task_id`` or the
            index of its ``task`` in ``tasks`` (-1 when not listed, with a one-time warning
            naming the task). A plain ``Trainer`` needs ``remove_unused_columns=False`` so
            ``task`` reaches the collator (and ``task_ids`` popped before the model's
            forward); :class:`~datalora.trainer.DATALORATrainer` keeps the task columns and
            pops ``task_ids`` itself (raw-text rows, tokenized here, still need False).
        tasks: task names (see :func:`check_task_names`) for ``task_ids`` (default
            :data:`TASKS`, the embedded tasks; :class:`~datalora.trainer.DATALORATrainer`
            appends the other names its datasets' ``task`` column holds).

    Returns (from ``__call__``):
        ``input_ids [B, L]`` (int64), ``attention_mask [B, L]`` (int64, 0 on padding),
        ``labels [B, L]`` (int64, -100 on padding; a feature without ``labels`` gets its
        ``input_ids`` with -100 where its ``attention_mask`` is 0), optionally ``task_ids [B]``;
        ``L`` is the longest feature (rounded up to ``pad_to_multiple_of``).
    """

    tokenizer: Any = None
    pad_token_id: int | None = None
    max_length: int | None = None
    label_pad_token_id: int = IGNORE_INDEX
    pad_to_multiple_of: int | None = None
    return_task_ids: bool = False
    tasks: tuple[str, ...] = field(default=TASKS)
    _unlisted: set[str] = field(default_factory=set, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.pad_token_id is None:
            if self.tokenizer is None:
                raise ValueError("pad_token_id: pass pad_token_id or a tokenizer")
            self.pad_token_id = self.tokenizer.pad_token_id
            if self.pad_token_id is None:
                raise ValueError("tokenizer: has no pad_token_id; set tokenizer.pad_token "
                                 "(e.g. to its eos_token) or pass pad_token_id")
        self.pad_token_id = check_int("pad_token_id", self.pad_token_id, error=TypeError)
        # a float was truncated (1.5 labelled padding as token 1), a string failed in torch
        self.label_pad_token_id = check_int("label_pad_token_id",
                                            as_scalar(self.label_pad_token_id), error=TypeError)
        if self.pad_to_multiple_of is not None:
            self.pad_to_multiple_of = check_int("pad_to_multiple_of", self.pad_to_multiple_of,
                                                low=1)
        self.tasks = check_task_names("tasks", self.tasks)

    def _tokenized(self, feature: Mapping[str, Any], i: int) -> Mapping[str, Any]:
        if not isinstance(feature, Mapping):  # a list was said to have no 'input_ids'
            raise ValueError(f"features: feature {i} is a {type(feature).__name__}, expected "
                             f"a dict with 'input_ids'")
        if "input_ids" in feature:
            return feature
        if self.tokenizer is None or self.max_length is None:
            raise ValueError(f"features: feature {i} has no 'input_ids'; to tokenize raw rows "
                             f"pass tokenizer and max_length to CausalLMCollator")
        return tokenize_example(feature, self.tokenizer, self.max_length)

    def _task_id(self, feature: Mapping[str, Any], i: int) -> int:
        if "task_id" in feature:  # int() truncated 2.7 to 2
            # torch / numpy formats of a datasets.Dataset, a whole float
            task_id = as_whole(as_scalar(feature["task_id"]))
            if isinstance(task_id, bool) or not isinstance(task_id, numbers.Integral):
                raise ValueError(f"features: feature {i} has a non-integer task_id "
                                 f"{task_id!r:.60}")
            return int(task_id)
        if "task" in feature:
            task = as_scalar(feature["task"])
            if isinstance(task, numbers.Real) and not isinstance(task, bool):
                task = str(task)  # numeric names read as their text, as in tasks=
            if not isinstance(task, str):  # a list failed as unhashable
                raise ValueError(f"features: feature {i} has task {task!r:.60}, expected a "
                                 f"task name (str)")
            if task in self.tasks:
                return self.tasks.index(task)
            if task not in self._unlisted:
                self._unlisted.add(task)
                warnings.warn(f"CausalLMCollator: task {task!r} is not in tasks {self.tasks}: "
                              f"its task_id is -1 (pass tasks= listing it)", stacklevel=3)
            return -1
        raise ValueError(f"features: feature {i} has neither 'task' nor 'task_id' but "
                         f"return_task_ids=True")

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not isinstance(features, (list, tuple)):  # a dict was indexed as a list
            raise TypeError(f"features: expected a list of feature dicts, got "
                            f"{type(features).__name__}")
        if len(features) == 0:
            raise ValueError("features: expected at least one feature, got an empty batch")
        tokenized = [self._tokenized(f, i) for i, f in enumerate(features)]
        ids = [_long(f["input_ids"], i, "input_ids") for i, f in enumerate(tokenized)]
        for i, x in enumerate(ids):  # trained nothing, or failed deep in the model's forward
            if len(x) == 0:
                raise ValueError(f"features: feature {i} has no tokens (empty input_ids)")
        length = max(len(x) for x in ids)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            length = (length + m - 1) // m * m
        batch = len(ids)
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)
        labels = torch.full((batch, length), self.label_pad_token_id, dtype=torch.long)
        for b, (f, x) in enumerate(zip(tokenized, ids, strict=True)):
            n = len(x)
            input_ids[b, :n] = x
            for key, target, default in (("attention_mask", attention_mask, 1),
                                         ("labels", labels, x)):
                value = f.get(key)
                if value is None:
                    target[b, :n] = default
                    if key == "labels":  # a pre-padded feature: its masked positions too
                        target[b, :n][attention_mask[b, :n] == 0] = self.label_pad_token_id
                    continue
                value = _long(value, b, key)
                if len(value) != n:
                    raise ValueError(f"features: feature {b} has {n} input_ids but "
                                     f"{len(value)} {key}")
                target[b, :n] = value
        # a row with no real token trains nothing (and the saliency network sees nothing)
        empty = first_row_without_token(attention_mask)
        if empty is not None:
            raise ValueError(f"features: feature {empty} has no real token (attention_mask "
                             f"all 0)")
        out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        if self.return_task_ids:
            out["task_ids"] = torch.tensor([self._task_id(f, i) for i, f in enumerate(features)],
                                           dtype=torch.long)
        return out


def _main() -> None:
    """Rewrite the shipped JSONL files from the generator (``python -m datalora.data``)."""
    folder = Path(__file__).with_name(_DATA_DIR)
    folder.mkdir(exist_ok=True)
    for split in SHIPPED_SPLITS:
        rows = shipped_split_rows(split)
        write_jsonl(rows, folder / f"multitask_{split}.jsonl")
        print(f"wrote {len(rows)} rows to {folder / f'multitask_{split}.jsonl'}")


if __name__ == "__main__":
    _main()
