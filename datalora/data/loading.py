"""Loading instruction datasets (the embedded splits, local JSONL / JSON / parquet files,
``datasets`` folders, Hub names) as rows of :data:`~datalora.data.multitask.COLUMNS`, with
Alpaca and single-turn chat rows mapped to them."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from datalora.checks import check_int
from datalora.data.multitask import canonical_split, shipped_split_path

REQUIRED_COLUMNS: tuple[str, ...] = ("question", "response")
"""Columns a loaded dataset must have (or the Alpaca / chat columns they are mapped from);
``id`` and ``task`` are filled in when missing, a missing ``system_prompt`` is ``""``."""

_FORMAT_HINT = ("Alpaca rows (instruction, input, output) and single-turn chat rows "
                "(messages: optional system, user, assistant) are mapped to these columns; "
                "convert other formats to one of them")

UNKNOWN_TASK = "unknown"


EVAL_SPLITS: tuple[str, ...] = ("eval", "validation", "test")
"""Split names :func:`load_eval_rows` tries, in order, on folders and split-keyed files."""


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
                except RecursionError:  # thousands of nested brackets
                    raise ValueError(f"source: {path} line {lineno} nests its values too "
                                     f"deeply to parse") from None
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
    except RecursionError:
        raise ValueError(f"source: {path} nests its values too deeply to parse") from None
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
    """Rows as :data:`~datalora.data.multitask.COLUMNS`; errors start with ``arg`` and name
    the 1-based line of a JSON-lines file (``lines``) or the 0-based row index
    (``dataset[i]``), said as such."""
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
    """Load instruction rows with the columns :data:`~datalora.data.multitask.COLUMNS`.

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
        not applied: every row is trained in the
        :func:`~datalora.data.tokens.format_prompt` format).

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
        return _normalize(rows, f"the embedded {canonical_split(split)} split", limit, lines)
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
