"""Padding tokenized examples into a batch (:class:`CausalLMCollator`), with task ids."""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from datalora.checks import as_scalar, as_whole, check_int
from datalora.data.multitask import TASKS
from datalora.data.tokens import IGNORE_INDEX, tokenize_example


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
            if not hasattr(self.tokenizer, "pad_token_id"):  # "tok": an AttributeError
                raise TypeError(f"tokenizer: expected a transformers tokenizer (with a "
                                f"pad_token_id), got {type(self.tokenizer).__name__}")
            self.pad_token_id = self.tokenizer.pad_token_id
            if self.pad_token_id is None:
                raise ValueError("tokenizer: has no pad_token_id; set tokenizer.pad_token "
                                 "(e.g. to its eos_token) or pass pad_token_id")
        self.pad_token_id = check_int("pad_token_id", self.pad_token_id, error=TypeError)
        if self.pad_token_id < 0:  # padding is embedded too: -1 failed there
            raise ValueError(f"pad_token_id: expected a token id >= 0, got {self.pad_token_id}")
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
