"""TITOK step 1: synthetic (prompt, response) rows from the source model with its
adapter."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from datalora.checks import as_scalar, check_flag, check_int, check_number
from datalora.data import (
    format_prompt,
    prompt_inputs,
)
from datalora.module_modes import eval_mode
from datalora.titok._util import check_rows, model_device, seeded


def _decode_whole_characters(tokenizer: Any, ids: list[int]) -> str:
    """``ids`` decoded without a character cut in the middle at the end.

    A byte-level tokenizer spreads a multi-byte character over several tokens, so a
    generation stopped by ``max_new_tokens`` can end inside one, which decodes to U+FFFD.
    A trailing U+FFFD is taken for such a cut: the last tokens (at most 3: a UTF-8
    character has at most 4 bytes) are dropped when that removes it (a U+FFFD the model
    generated as a whole last token goes too: the text was cut there anyway); one that
    dropping them does not remove is kept.
    """
    text = tokenizer.decode(ids, skip_special_tokens=True)
    for cut in range(1, min(3, len(ids)) + 1):
        if not text.endswith("\ufffd"):
            break
        shorter = tokenizer.decode(ids[:-cut], skip_special_tokens=True)
        if not shorter.endswith("\ufffd"):
            return shorter
    return text


def check_generation(seed_rows: Any, samples_per_prompt: Any, max_new_tokens: Any,
                     do_sample: Any, temperature: Any, top_p: Any
                     ) -> tuple[list[Any], bool, Any, Any]:
    """The generation arguments of :func:`generate_synthetic` (``temperature`` and ``top_p``
    only when sampling); a ValueError / TypeError naming the first bad one. Returns
    ``(seed rows as a list, do_sample, temperature, top_p)`` as Python values (a generator
    or streamed dataset of rows is read once; numpy numbers, which transformers refuses,
    become floats)."""
    if isinstance(seed_rows, Iterable) and not isinstance(seed_rows, (str, bytes, Mapping)):
        seed_rows = list(seed_rows)
    check_rows("seed_rows", seed_rows, "question")
    if not seed_rows:
        raise ValueError("seed_rows: expected at least one seed prompt, got none")
    check_int("samples_per_prompt", samples_per_prompt, low=1)
    check_int("max_new_tokens", max_new_tokens, low=1)
    do_sample = check_flag("do_sample", do_sample)
    if do_sample:
        temperature = check_number("temperature", as_scalar(temperature), low=0,
                                   low_inclusive=False)
        if top_p is not None:  # None: transformers' default
            top_p = check_number("top_p", as_scalar(top_p), low=0, low_inclusive=False,
                                 high=1)
    return seed_rows, do_sample, temperature, top_p


@torch.no_grad()
def generate_synthetic(model: nn.Module, tokenizer: Any, seed_rows: Sequence[dict[str, str]],
                       *, samples_per_prompt: int = 1, max_new_tokens: int = 24,
                       do_sample: bool = True, temperature: float = 0.7, top_p: float = 0.95,
                       batch_size: int = 16, seed: int = 0,
                       progress: bool = True) -> list[dict[str, str]]:
    """Synthetic rows: the source model + LoRA answers each seed prompt.

    Args:
        model: the source model with its adapter active (e.g. a ``PeftModel``).
        seed_rows: rows with ``question`` (and optional ``system_prompt``, ``task``); their
            ``response`` is never read.
        samples_per_prompt: responses sampled per seed prompt.
        seed: seeds the sampling (torch's RNG inside the call; the caller's RNG state is
            restored after).

    Returns:
        Rows ``{id, system_prompt, question, response, task, finished}``; ``response`` is
        the generated text (up to EOS), ``finished`` False when ``max_new_tokens`` cut it
        before an EOS (its training example then has no EOS label: the target must not
        learn to stop there; a multi-byte character it cut in the middle is left out
        rather than decoded to U+FFFD), with ``samples_per_prompt * len(seed_rows)``
        rows.
    """
    seed_rows, do_sample, temperature, top_p = check_generation(
        seed_rows, samples_per_prompt, max_new_tokens, do_sample, temperature, top_p)
    batch_size = check_int("batch_size", batch_size, low=1)
    seed = check_int("seed", seed)
    device = model_device(model)
    jobs = [row for row in seed_rows for _ in range(samples_per_prompt)]
    out: list[dict[str, str]] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # batched generation continues every prompt at its end
    try:
        # no dropout / training noise; modes and the caller's RNG state restored after
        with eval_mode(model), seeded(seed, device):
            for i in tqdm(range(0, len(jobs), batch_size), desc="synthetic data",
                          disable=not progress, dynamic_ncols=True):
                chunk = jobs[i:i + batch_size]
                enc = prompt_inputs(tokenizer, [format_prompt(r) for r in chunk], device,
                                    padding=True)
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                     temperature=temperature if do_sample else None,
                                     top_p=top_p if do_sample else None, top_k=None,
                                     pad_token_id=tokenizer.pad_token_id,
                                     eos_token_id=tokenizer.eos_token_id)
                for j, row in enumerate(chunk):
                    new = gen[j, enc["input_ids"].shape[1]:]
                    finished = bool((new == tokenizer.eos_token_id).any())
                    text = (tokenizer.decode(new, skip_special_tokens=True) if finished
                            else _decode_whole_characters(tokenizer, new.tolist()))
                    out.append({"id": f"synthetic.{len(out)}",
                                "system_prompt": row.get("system_prompt", "") or "",
                                "question": row["question"], "response": text.strip(),
                                "task": row.get("task", "unknown"), "finished": finished})
    finally:
        tokenizer.padding_side = side
    return out


