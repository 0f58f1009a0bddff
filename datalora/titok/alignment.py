"""TITOK step 4: map token scores across tokenizers by character offsets, and build
the target's masked training examples."""

from __future__ import annotations

import bisect
import math
import operator
import warnings
from collections.abc import Sequence
from typing import Any

import torch

from datalora.checks import as_scalar, as_whole, check_flag
from datalora.data import (
    IGNORE_INDEX,
    format_prompt,
    tokenize_example,
)
from datalora.ops.validation import check_tensor
from datalora.titok._util import check_fraction
from datalora.titok.excess import ScoredSample, response_offsets
from datalora.titok.selection import select_samples, select_tokens


def tile_spans(offsets: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """``[n]`` spans widened to cover every character of the text.

    Tokenizers that trim offsets (GPT-2 / RoBERTa byte-level BPE, ``trim_offsets=True``)
    leave the space of ``Ġword`` outside its span and give a whitespace-only ``Ġ`` a
    zero-width span. Here a gap before a token belongs to that token (a leading space is
    part of the word, as ``Ġ`` / ``▁`` mean), trailing gap characters to the last token, and
    a zero-width token before a wider one takes that token's span, and one after the last
    wide token (trailing whitespace) that token's span. Spans that already tile the text
    are returned unchanged; the final span, when zero-width (the EOS of
    :func:`~datalora.titok.excess.response_offsets`), stays as it is.
    """
    spans = [(int(s), int(e)) for s, e in offsets]
    out, end = list(spans), 0
    for i, (s, e) in enumerate(spans):
        if e > s:
            out[i] = (min(s, end), e)
            end = max(end, e)
    text_end = max((e for _, e in spans), default=0)
    wide = [i for i, (s, e) in enumerate(spans) if e > s]
    if wide and out[wide[-1]][1] < text_end:
        out[wide[-1]] = (out[wide[-1]][0], text_end)
    following = None
    for i in reversed(range(len(spans))):
        if spans[i][1] > spans[i][0]:
            following = out[i]
        elif following is not None:
            out[i] = following
    if wide:  # trailing whitespace, before the final (EOS) span
        for i in range(wide[-1] + 1, len(spans) - 1):
            out[i] = out[wide[-1]]
    return out


def _check_spans(name: str, offsets: Any) -> list[tuple[int, int]]:
    """``offsets`` as ``(start, end)`` int pairs with ``0 <= start <= end``; a TypeError /
    ValueError naming ``name`` and the first span that is not one."""
    try:
        spans = list(offsets)
    except TypeError:
        raise TypeError(f"{name}: expected a sequence of (start, end) spans, got "
                        f"{type(offsets).__name__}") from None
    out = []
    for i, span in enumerate(spans):
        try:  # ints, or floats holding whole numbers (offsets through a float array)
            start, end = (operator.index(as_whole(as_scalar(v))) for v in span)
        except (TypeError, ValueError):
            raise TypeError(f"{name}: span {i} is {span!r}, expected a (start, end) pair of "
                            f"ints") from None
        if not 0 <= start <= end:
            raise ValueError(f"{name}: span {i} is {span!r}, expected 0 <= start <= end")
        out.append((start, end))
    return out


def align_token_scores(src_offsets: Sequence[tuple[int, int]], src_scores: torch.Tensor,
                       tgt_offsets: Sequence[tuple[int, int]], reduce: str = "max"
                       ) -> torch.Tensor:
    """Maps per-token scores from one tokenization of a text to another by characters.

    A target token ``[s, e)`` takes the scores of the source tokens whose spans overlap it:
    their max (``reduce="max"``) or their mean weighted by overlapping characters
    (``"mean"``). Both sides' spans first go through :func:`tile_spans`, so whitespace a
    tokenizer leaves outside its spans (``trim_offsets``) still scores the target's
    whitespace tokens. Zero-width spans (EOS at the end) match zero-width source spans at
    the same position. NaN source scores (tokens the scoring could not score) are left out
    of both reductions, whatever their order; a target token no scored source token covers
    gets NaN.

    Args:
        src_offsets: ``[n]`` source spans; src_scores: ``[n]``.
        tgt_offsets: ``[m]`` target spans.

    Returns:
        ``[m]`` float32 target scores.
    """
    if reduce not in ("max", "mean"):
        raise ValueError(f"reduce: expected 'max' or 'mean', got {reduce!r}")
    src_spans = _check_spans("src_offsets", src_offsets)
    tgt_spans = _check_spans("tgt_offsets", tgt_offsets)
    check_tensor("src_scores", src_scores)
    if src_scores.dim() != 1:
        raise ValueError(f"src_scores: expected shape [n] (one score per source span), got "
                         f"{tuple(src_scores.shape)}")
    if len(src_spans) != src_scores.numel():
        raise ValueError(f"src_scores: expected {len(src_spans)} scores (one per source "
                         f"span), got {src_scores.numel()}")
    n = len(src_spans)
    if src_spans == tgt_spans:
        return src_scores.float().clone()  # same tokenization: token i is token i
    # the same tokenization with the source cut shorter (score_max_length): token i is
    # token i on the shared prefix (tokens splitting one character share its span)
    prefix = n > 0 and src_spans == tgt_spans[:n]
    src_offsets, tgt_offsets = tile_spans(src_spans), tile_spans(tgt_spans)
    out = torch.full((len(tgt_offsets),), float("nan"))
    scores = src_scores.float().tolist()
    candidates = _overlap_candidates(src_offsets)
    for j, (ts, te) in enumerate(tgt_offsets):
        if prefix and j < n:  # the shared prefix: token i's own score (below)
            continue
        hits: list[tuple[float, int]] = []
        for i in candidates(ts, te):
            (ss, se), score = src_offsets[i], scores[i]
            if te == ts:  # zero-width target token (EOS)
                if se == ss == ts:
                    hits.append((score, 1))
                continue
            overlap = min(te, se) - max(ts, ss)
            if overlap > 0:
                hits.append((score, overlap))
        hits = [(s, w) for s, w in hits if not math.isnan(s)]  # max() with NaN: by order
        if hits:
            if reduce == "max":
                out[j] = max(s for s, _ in hits)
            else:
                out[j] = sum(s * w for s, w in hits) / sum(w for _, w in hits)
    if prefix:
        out[:n] = src_scores.float()
    return out


def _overlap_candidates(spans: Sequence[tuple[int, int]]):
    """``(ts, te) -> indices`` of the ``spans`` that may overlap ``[ts, te)`` (or, for a
    zero-width one, start at ``ts``), in order. Tiled spans have non-decreasing starts and
    ends, so those form one run found by bisection: aligning two tokenizations is
    O((n + m) log n) instead of comparing every pair (85 ms per 512-token sample); other
    spans fall back to every index."""
    starts, ends = [s for s, _ in spans], [e for _, e in spans]
    if any(a > b for a, b in zip(starts, starts[1:], strict=False)) or any(
            a > b for a, b in zip(ends, ends[1:], strict=False)):
        return lambda ts, te: range(len(spans))

    def run(ts: int, te: int) -> range:
        if te == ts:
            return range(bisect.bisect_left(starts, ts), bisect.bisect_right(starts, ts))
        lo = bisect.bisect_right(ends, ts)  # before it, every span ends by ts
        return range(lo, max(lo, bisect.bisect_left(starts, te)))  # from it, starts >= te
    return run


def build_masked_examples(scored: Sequence[ScoredSample], tokenizer: Any, *,
                          sample_keep: float = 0.5, token_keep: float = 0.5,
                          max_length: int = 128, reduce: str = "max", drop_empty: bool = True
                          ) -> tuple[list[dict[str, list[int]]], dict[str, Any]]:
    """Target-tokenizer training examples whose labels keep only the selected tokens.

    Samples are filtered by mean excess (source tokens); each kept sample's scores are
    aligned to ``tokenizer`` by character offsets and its top ``token_keep`` tokens keep
    their label (others ``-100``). With ``sample_keep = token_keep = 1`` every synthetic
    token is a label (the "all tokens" baseline). With ``drop_empty`` samples whose
    response is empty (EOS only) are dropped first: their mean excess is the EOS token's
    alone, which tends to be large, so they would crowd out real answers.

    Tokens are selected among the response tokens that survive the ``max_length`` cut of
    :func:`~datalora.data.tokenize_example`; a kept sample left without any label (its
    response cut away, or no token scored) is dropped, with a warning giving the count.
    A row with ``finished`` False (:func:`~datalora.titok.synthetic.generate_synthetic`:
    ``max_new_tokens`` cut it before an EOS) keeps no label on its final EOS: the target
    must not learn to stop where the source was cut; its tokens are selected among the
    others.

    Returns:
        ``(examples, stats)``: examples with ``input_ids, attention_mask, labels``; stats
        with the kept sample indices (those with an example), the count dropped for
        having no label, the count of unfinished samples whose EOS label was removed, and
        the fraction of response tokens kept.
    """
    check_fraction("sample_keep", sample_keep)
    check_fraction("token_keep", token_keep)
    drop_empty = check_flag("drop_empty", drop_empty)
    for i, sample in enumerate(scored):
        if not isinstance(sample, ScoredSample):
            raise TypeError(f"scored: expected ScoredSample objects (from contrastive_excess), "
                            f"got {type(sample).__name__}")
        n = len(sample.offsets)
        shapes = [tuple(getattr(t, "shape", ())) for t in (sample.logp_lora, sample.logp_base)]
        if shapes != [(n,), (n,)]:
            raise ValueError(f"scored[{i}]: expected logp_lora and logp_base of shape [{n}] "
                             f"(one score per offset), got {shapes[0]} and {shapes[1]}")
    usable = [i for i, s in enumerate(scored) if s.row["response"].strip() or not drop_empty]
    ranked = select_samples([scored[i].mean_excess for i in usable], sample_keep)
    kept = [usable[j] for j in ranked]
    examples, with_labels, labelled, total, unfinished = [], [], 0, 0, 0
    for i in kept:
        sample = scored[i]
        ex = tokenize_example(sample.row, tokenizer, max_length)
        labels = list(ex["labels"])
        resp = [p for p, v in enumerate(labels) if v != IGNORE_INDEX]  # after truncation
        tgt_offsets = response_offsets(tokenizer, sample.row["response"],
                                       format_prompt(sample.row))
        scores = align_token_scores(sample.offsets, sample.excess, tgt_offsets,
                                    reduce)[:len(resp)]
        cut_eos = sample.row.get("finished", True) is False and bool(resp) \
            and ex["input_ids"][resp[-1]] == tokenizer.eos_token_id
        if cut_eos:  # cut by max_new_tokens: not where it stops, and never a selected token
            scores[-1] = float("nan")
        mask = select_tokens(scores, token_keep) if token_keep < 1 else torch.ones(
            len(resp), dtype=torch.bool)
        for pos, keep in zip(resp, mask.tolist(), strict=True):
            if not keep:
                labels[pos] = IGNORE_INDEX
        if cut_eos:
            labels[resp[-1]] = IGNORE_INDEX
            unfinished += 1
        n_labels = sum(v != IGNORE_INDEX for v in labels)
        if n_labels == 0:
            continue
        labelled += n_labels
        total += len(resp)
        examples.append({**ex, "labels": labels})
        with_labels.append(i)
    dropped = len(kept) - len(with_labels)
    if dropped:
        warnings.warn(f"build_masked_examples: dropped {dropped} of the {len(kept)} kept "
                      f"samples: no label left (response cut by max_length={max_length}, "
                      f"or no scored token)", stacklevel=2)
    stats = {"kept_samples": with_labels, "dropped_no_labels": dropped,
             "unfinished_no_eos_label": unfinished,
             "num_samples": len(scored), "num_usable": len(usable),
             "token_fraction": labelled / max(total, 1)}
    return examples, stats


