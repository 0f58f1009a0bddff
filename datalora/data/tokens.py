"""The prompt format (:func:`format_prompt`) and tokenizing rows into causal-LM examples
(prompt positions labelled :data:`IGNORE_INDEX`, long examples truncated)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from datalora.checks import check_int
from datalora.data.loading import UNKNOWN_TASK

IGNORE_INDEX = -100
"""Label value ignored by the causal-LM loss (prompt and padding positions)."""


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


def check_tokenizer(name: str, tokenizer: Any) -> None:
    """TypeError naming ``name`` unless ``tokenizer`` is callable, as a transformers
    tokenizer is (None or a folder name failed deep inside as "not callable")."""
    if not callable(tokenizer):
        raise TypeError(f"{name}: expected a transformers tokenizer, got "
                        f"{type(tokenizer).__name__}")


def prompt_inputs(tokenizer: Any, prompts: str | list[str], device: Any = None,
                  **kwargs: Any) -> dict[str, Any]:
    """``input_ids`` / ``attention_mask`` tensors of ``prompts`` for a causal LM's forward
    or ``generate`` (``tokenizer(..., return_tensors="pt", **kwargs)``, on ``device``):
    several prompts are padded (``padding=True`` unless given) on the tokenizer's
    ``padding_side`` (set it to ``"left"`` for batched ``generate``).

    Only those two: a tokenizer that also returns ``token_type_ids`` (the embedded one on
    transformers 4.x, BERT-style ones) would have ``generate`` refuse them as unused."""
    check_tokenizer("tokenizer", tokenizer)
    if not (isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                         and all(isinstance(p, str) for p in prompts))):
        raise TypeError(f"prompts: expected a string or a non-empty list of strings, got "
                        f"{prompts!r:.60}")
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device: not a torch device: {device!r} ({exc})") from None
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
    else:  # several prompts padded, as above (the tokenizer's padding side); one is not
        # (a tokenizer without a pad token refuses to pad even one)
        enc = tokenizer(prompts, return_tensors="pt",
                        **{"padding": not isinstance(prompts, str), **kwargs})
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
    if not isinstance(example, Mapping):
        raise TypeError(f"example: expected a row mapping (question, response), got "
                        f"{type(example).__name__}")
    check_tokenizer("tokenizer", tokenizer)
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
