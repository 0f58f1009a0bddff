"""TITOK: excess scoring (hand-checked), selection fractions, offset alignment, training."""

from __future__ import annotations

import math
import warnings
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from datalora.data import IGNORE_INDEX, format_prompt, prompt_inputs, tokenize_example
from datalora.testing import build_tiny_model, build_tokenizer
from datalora.titok import (
    ScoredSample,
    align_token_scores,
    build_masked_examples,
    contrastive_excess,
    generate_synthetic,
    response_log_probs,
    response_offsets,
    select_samples,
    select_tokens,
    tile_spans,
    train_masked,
)
from datalora.titok.synthetic import _decode_whole_characters

V = 300


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(vocab_size=V)


@pytest.fixture(scope="module")
def tok_other():
    # a different tokenizer: other vocabulary size, trained on other texts
    texts = ["abc ab a b c reverse sort", "the quick brown fox", "12 + 34 = 46"] * 20
    return build_tokenizer(vocab_size=270, texts=texts)


class Bigram(nn.Module):
    """p(y_t | y_<t) = softmax(table[y_{t-1}]): log-probs computable by hand."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(self, input_ids, attention_mask=None, **_):
        return SimpleNamespace(logits=self.table[input_ids])


ROW = {"system_prompt": "", "question": "Reverse the letters: abc", "response": "cba cb"}


def test_excess_hand_checked(tok):
    resp_ids = tok(ROW["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    star, c = resp_ids[0], 2.0
    base = Bigram(torch.zeros(V, V))
    table = torch.zeros(V, V)
    table[:, star] = c                          # the "LoRA" raises one token everywhere
    lora = Bigram(table)
    [s] = contrastive_excess(lora, tok, [ROW], base_model=base)
    z = math.log(math.exp(c) + V - 1)
    want_lora = torch.tensor([(c if y == star else 0.0) - z for y in resp_ids])
    want_base = torch.full((len(resp_ids),), -math.log(V))
    torch.testing.assert_close(s.logp_lora, want_lora, atol=1e-5, rtol=0)
    torch.testing.assert_close(s.logp_base, want_base, atol=1e-5, rtol=0)
    torch.testing.assert_close(s.excess, want_lora - want_base, atol=1e-5, rtol=0)
    assert s.excess[0] > 0 and (s.excess[1:][torch.tensor(resp_ids[1:]) != star] < 0).all()
    assert s.offsets == response_offsets(tok, ROW["response"])
    assert len(s.offsets) == len(resp_ids)


def test_response_log_probs_batched_equals_direct(tok):
    model = build_tiny_model(seed=1, vocab_size=V, hidden_size=32, intermediate_size=48,
                             num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    rows = [ROW, {"system_prompt": "Be short.", "question": "What is 2 + 2?",
                  "response": "4"}]
    got = response_log_probs(model, tok, rows, batch_size=2)  # padded batch
    for row, lp in zip(rows, got, strict=True):
        ex = tokenize_example(row, tok, 256)
        ids = torch.tensor([ex["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        pos = [t for t, y in enumerate(ex["labels"]) if y != IGNORE_INDEX]
        want = torch.stack([logp[t - 1, ex["input_ids"][t]] for t in pos])
        torch.testing.assert_close(lp, want, atol=1e-5, rtol=1e-5)


def test_peft_excess_is_zero_for_an_identity_lora(tok):
    peft = pytest.importorskip("peft")
    base = build_tiny_model(seed=1, vocab_size=V, hidden_size=32, intermediate_size=48,
                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    [s] = contrastive_excess(model, tok, [ROW])          # B = 0: adapter is the identity
    assert s.excess.abs().max() < 1e-6
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    [s] = contrastive_excess(model, tok, [ROW])
    assert s.excess.abs().max() > 1e-3


@pytest.mark.parametrize("keep,want", [(0.25, [1]), (0.3, [1, 3]), (0.5, [1, 3]),
                                       (1.0, [1, 3, 0, 2])])
def test_select_samples_fractions(keep, want):
    assert select_samples([0.1, 0.5, -0.2, 0.3], keep) == want
    assert select_samples(torch.tensor([0.1, 0.5, -0.2, 0.3]), keep) == want


@pytest.mark.parametrize("scores,error,match", [
    (torch.rand(2, 3), ValueError, r"scores: expected shape \[n\].*got \(2, 3\)"),
    (None, TypeError, "scores: expected a sequence of numbers or a 1-D tensor, got NoneType"),
    (["a", "b"], TypeError, "scores: .*got list holding str"),
    ("ab", TypeError, "scores: .*got str"),
])
def test_select_samples_names_bad_scores(scores, error, match):
    with pytest.raises(error, match=match):
        select_samples(scores, 0.5)


def test_select_tokens_fractions():
    excess = torch.tensor([1.0, 5.0, 3.0, float("nan"), 2.0])
    assert select_tokens(excess, 0.5).tolist() == [False, True, True, False, False]
    assert select_tokens(excess, 0.01).tolist() == [False, True, False, False, False]
    assert select_tokens(excess, 1.0).tolist() == [True, True, True, False, True]
    assert select_tokens(torch.tensor([2.0, 2.0, 1.0]), 0.5).tolist() == [True, True, False]
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="keep_fraction"):
            select_tokens(excess, bad)
        with pytest.raises(ValueError, match="keep_fraction"):
            select_samples([1.0], bad)


def test_select_tokens_breaks_ties_by_position_and_counts_minus_inf_as_a_score():
    """Among equal scores the earlier token wins; only NaN is "no score": a -inf excess
    is a (lowest) score, kept when every token is."""
    assert select_tokens(torch.tensor([1.0, 2.0, 2.0, 2.0]), 0.5).tolist() == [
        False, True, True, False]
    assert select_tokens(torch.tensor([-math.inf, 1.0]), 1.0).tolist() == [True, True]

def test_scores_that_are_not_tensors_are_refused_by_name():
    """A list of scores named its argument in a TypeError, not an AttributeError from
    deep inside (``'list' object has no attribute 'dim'``)."""
    with pytest.raises(TypeError, match="excess: expected a torch.Tensor, got list"):
        select_tokens([1.0, 2.0], 0.5)
    with pytest.raises(TypeError, match="src_scores: expected a torch.Tensor, got list"):
        align_token_scores([(0, 1), (1, 2)], [1.0, 2.0], [(0, 2)])


def test_align_refuses_scores_that_are_not_one_per_span():
    with pytest.raises(ValueError, match=r"src_scores: expected shape \[n\].*got \(1, 2\)"):
        align_token_scores([(0, 3), (3, 4)], torch.tensor([[1.0, 2.0]]), [(0, 3)])


def test_align_refuses_spans_that_are_not_start_end_pairs():
    """``[0, 1]`` (ints, not spans) failed as "'int' object is not iterable", and a reversed
    span ``(5, 2)`` silently scored NaN; both name the argument and the span now."""
    one = torch.tensor([1.0])
    cases = [(([0, 1], torch.tensor([1.0, 2.0]), [(0, 1)]), TypeError,
              r"^src_offsets: span 0 is 0, expected a \(start, end\) pair of ints$"),
             (([(0, 2.5)], one, [(0, 2)]), TypeError, r"^src_offsets: span 0 is \(0, 2.5\)"),
             ((None, one, [(0, 2)]), TypeError,
              r"^src_offsets: expected a sequence of \(start, end\) spans, got NoneType$"),
             (([(5, 2)], one, [(0, 5)]), ValueError,
              r"^src_offsets: span 0 is \(5, 2\), expected 0 <= start <= end$"),
             (([(0, 2)], one, [(0, 1), (-1, 1)]), ValueError, r"^tgt_offsets: span 1 is")]
    for args, error, match in cases:
        with pytest.raises(error, match=match):
            align_token_scores(*args)
    # a [n, 2] tensor of spans is read as the pairs it holds
    spans = torch.tensor([[0, 2], [2, 4]])
    assert align_token_scores(spans, torch.tensor([1.0, 2.0]), [(0, 4)]).tolist() == [2.0]


def test_align_hand_case():
    src = [(0, 2), (2, 5), (5, 6), (6, 6)]
    scores = torch.tensor([1.0, 3.0, 2.0, -4.0])
    tgt = [(0, 1), (1, 3), (3, 6), (6, 6)]
    assert align_token_scores(src, scores, tgt, "max").tolist() == [1.0, 3.0, 3.0, -4.0]
    mean = align_token_scores(src, scores, tgt, "mean")
    torch.testing.assert_close(mean, torch.tensor([1.0, 2.0, 8 / 3, -4.0]))
    assert torch.isnan(align_token_scores(src[:2], scores[:2], [(0, 5), (5, 7)]))[1]
    with pytest.raises(ValueError, match="reduce"):
        align_token_scores(src, scores, tgt, "sum")
    with pytest.raises(ValueError, match="src_scores"):
        align_token_scores(src, scores[:2], tgt)


@pytest.mark.parametrize("reduce", ["max", "mean"])
def test_align_leaves_nan_source_scores_out_whatever_their_order(reduce):
    """Python's max() with a NaN depends on the order: a target token over a NaN and a
    finite source score got NaN when the NaN came first (never selected), else the
    finite score."""
    nan = float("nan")
    src, tgt = [(0, 2), (2, 4), (4, 4)], [(0, 4), (4, 4)]
    for scores in ([nan, 1.0, 0.5], [1.0, nan, 0.5]):
        assert align_token_scores(src, torch.tensor(scores), tgt, reduce).tolist() == [1.0, 0.5]
    assert torch.isnan(align_token_scores(src, torch.tensor([nan, nan, 0.5]), tgt, reduce)[0])


def test_align_across_two_real_tokenizers(tok, tok_other):
    text = "Reverse the letters: quickbrown, 12 + 34 = 46"
    src, tgt = response_offsets(tok, text), response_offsets(tok_other, text)
    assert src != tgt                                    # really different tokenizations
    for spans in (src, tgt):                             # spans tile the text, EOS last
        assert spans[0][0] == 0 and spans[-1] == (len(text), len(text))
        assert all(a[1] == b[0] for a, b in zip(spans[:-1], spans[1:], strict=True))
    scores = torch.arange(len(src), dtype=torch.float32) * 0.7 - 3.0
    got = align_token_scores(src, scores, tgt, "max")
    char = [None] * len(text)                            # independent oracle: per character
    for (s, e), v in zip(src, scores.tolist(), strict=True):
        for c in range(s, e):
            char[c] = v
    want = [max(char[s:e]) if e > s else scores[-1].item() for s, e in tgt]
    torch.testing.assert_close(got, torch.tensor(want))
    torch.testing.assert_close(align_token_scores(src, scores, src), scores)  # identity


def _align_every_pair(src, scores, tgt, reduce):
    """align_token_scores' rule, comparing every target span with every source span (the
    same tokenization, or a prefix of it, keeps each token's own score)."""
    from datalora.titok.alignment import tile_spans

    tiled_src, out = tile_spans(src), []
    for ts, te in tile_spans(tgt):
        hits = [(v, 1) for (ss, se), v in zip(tiled_src, scores, strict=True)
                if te == ts and ss == se == ts]
        hits += [(v, min(te, se) - max(ts, ss))
                 for (ss, se), v in zip(tiled_src, scores, strict=True)
                 if te > ts and min(te, se) - max(ts, ss) > 0]
        hits = [(v, w) for v, w in hits if not math.isnan(v)]
        out.append(float("nan") if not hits else max(v for v, _ in hits) if reduce == "max"
                   else sum(v * w for v, w in hits) / sum(w for _, w in hits))
    n = len(src)
    if n and [tuple(s) for s in src] == [tuple(t) for t in tgt[:n]]:
        out[:n] = scores
    return torch.tensor(out)


@pytest.mark.parametrize("reduce", ["max", "mean"])
def test_align_matches_every_pair_comparison(tok, tok_other, reduce):
    """The bisection over tiled spans (85 ms per 512-token sample before: every pair) finds
    exactly the overlaps every-pair comparison finds: real tokenizers on random texts,
    zero-width and repeated spans, NaN scores, and spans that are not monotone."""
    import random

    rng = random.Random(0)
    words = ["quick", "brown", " ", "12", "+", "ééé", "\n", "  ", "Reverse", "x"]
    for trial in range(30):
        text = "".join(rng.choice(words) for _ in range(rng.randint(1, 40)))
        src, tgt = response_offsets(tok, text), response_offsets(tok_other, text)
        if trial % 3 == 0:
            src, tgt = tgt, src
        if trial % 5 == 0:  # the source cut shorter (score_max_length)
            src, tgt = tgt[:max(1, len(tgt) // 2)], tgt
        scores = [rng.choice([float("nan"), rng.uniform(-3, 3)]) if trial % 2 else
                  rng.uniform(-3, 3) for _ in src]
        got = align_token_scores(src, torch.tensor(scores), tgt, reduce)
        torch.testing.assert_close(got, _align_every_pair(src, scores, tgt, reduce),
                                   equal_nan=True)
    odd = [(3, 5), (0, 2), (2, 2), (1, 4)]  # not monotone: every pair is compared
    scores = [1.0, 2.0, 3.0, 4.0]
    for tgt in ([(0, 3), (3, 5), (5, 5)], [(2, 2), (0, 5)]):
        torch.testing.assert_close(align_token_scores(odd, torch.tensor(scores), tgt, reduce),
                                   _align_every_pair(odd, scores, tgt, reduce), equal_nan=True)


def test_response_offsets_follow_tokenize_example_with_a_metaspace_tokenizer(
        metaspace_tokenizer):
    """One span per labelled token (EOS included), covering the response text; encoded
    alone, the response's first token would be a spurious "▁5"-style token."""
    from datalora.data import load_instruction_dataset

    tok = metaspace_tokenizer
    rows = load_instruction_dataset(limit=8)
    n = len(tok)
    scored = contrastive_excess(Bigram(torch.randn(n, n)), tok, rows,
                                base_model=Bigram(torch.zeros(n, n)))
    for row, sample in zip(rows, scored, strict=True):
        prompt, response = format_prompt(row), row["response"]
        labels = [v for v in tokenize_example(row, tok, 512)["labels"] if v != IGNORE_INDEX]
        spans = response_offsets(tok, response, prompt)
        assert len(spans) == len(labels) and spans[-1] == (len(response), len(response))
        assert "".join(response[s:e] for s, e in spans) == response
        assert sample.offsets == spans and len(sample.excess) == len(labels)


def test_response_offsets_of_a_response_merged_into_the_prompts_last_token(
        run_merging_tokenizer):
    """The spanning last token is a labelled response token (tokenize_example), so it has
    a span: one span per label, as for any other row."""
    tok = run_merging_tokenizer()
    for response in ("   ", "ok"):
        row = dict(ROW, response=response)
        labels = [v for v in tokenize_example(row, tok, 64)["labels"] if v != IGNORE_INDEX]
        spans = response_offsets(tok, response, format_prompt(row))
        assert len(spans) == len(labels), (response, spans, labels)
        assert spans[-1] == (len(response), len(response))


def test_response_offsets_with_a_tokenizer_that_adds_eos_itself(run_merging_tokenizer):
    tok = run_merging_tokenizer(adds_eos=True)
    row = dict(ROW, response="ok")
    labels = [v for v in tokenize_example(row, tok, 64)["labels"] if v != IGNORE_INDEX]
    assert labels == [ord("o") + 10, ord("k") + 10, 2]  # one EOS
    assert response_offsets(tok, "ok", format_prompt(row)) == [(0, 1), (1, 2), (2, 2)]


def test_build_masked_examples_fractions(tok, tok_other):
    rows = [dict(ROW, response=r) for r in ("cba", "cb a cb", "abc abc abc", "a")]
    scored = []
    for i, row in enumerate(rows):
        offsets = response_offsets(tok, row["response"])
        lp = torch.linspace(-1, 1, len(offsets)) + i  # sample i has mean excess ~ i
        scored.append(ScoredSample(row=row, offsets=offsets, logp_lora=lp,
                                   logp_base=torch.zeros(len(offsets))))
    ex, stats = build_masked_examples(scored, tok_other, sample_keep=0.5, token_keep=0.5)
    assert stats["kept_samples"] == [3, 2]
    for e, i in zip(ex, stats["kept_samples"], strict=True):
        full = tokenize_example(rows[i], tok_other, 128)
        n = sum(v != IGNORE_INDEX for v in full["labels"])
        kept = [v for v in e["labels"] if v != IGNORE_INDEX]
        assert e["input_ids"] == full["input_ids"] and len(kept) == math.ceil(n / 2)
        assert set(kept) <= set(full["input_ids"])
    empty = ScoredSample(row=dict(ROW, response=""), offsets=[(0, 0)],
                         logp_lora=torch.tensor([9.0]), logp_base=torch.zeros(1))
    _, stats_e = build_masked_examples([*scored, empty], tok_other, sample_keep=0.5)
    assert stats_e["kept_samples"] == [3, 2]              # the empty response is dropped
    _, stats_e = build_masked_examples([*scored, empty], tok_other, sample_keep=0.4,
                                       drop_empty=False)
    assert stats_e["kept_samples"] == [4, 3]
    ex_all, stats_all = build_masked_examples(scored, tok_other, sample_keep=1, token_keep=1)
    assert len(ex_all) == 4 and stats_all["token_fraction"] == 1.0
    assert ex_all[-1]["labels"] == tokenize_example(rows[0], tok_other, 128)["labels"]


def test_a_response_cut_by_max_new_tokens_keeps_no_eos_label(tok):
    """A synthetic response cut before its EOS was trained as complete: tokenize_example
    appends an EOS, labelled, so the target learnt to stop where the source was cut."""
    peft = pytest.importorskip("peft")
    source = peft.get_peft_model(_small(seed=2), peft.LoraConfig(
        r=2, target_modules=["q_proj"], init_lora_weights=False))
    [row] = generate_synthetic(source, tok, [ROW], max_new_tokens=2, do_sample=False,
                               progress=False)
    assert row["finished"] is False  # 2 tokens of a random model: no EOS
    offsets = response_offsets(tok, row["response"], format_prompt(row))
    sample = ScoredSample(row=row, offsets=offsets, logp_lora=torch.zeros(len(offsets)),
                          logp_base=torch.zeros(len(offsets)))
    [ex], stats = build_masked_examples([sample], tok, sample_keep=1, token_keep=1)
    full = tokenize_example(row, tok, 128)
    assert full["labels"][-1] == tok.eos_token_id and ex["labels"][-1] == IGNORE_INDEX
    assert ex["labels"][:-1] == full["labels"][:-1] and stats["unfinished_no_eos_label"] == 1
    [done], _ = build_masked_examples([replace(sample, row={**row, "finished": True})], tok,
                                      sample_keep=1, token_keep=1)
    assert done["labels"] == full["labels"]


def test_a_response_cut_inside_a_character_ends_at_the_last_whole_one(tok):
    """A byte-level tokenizer spreads a character over several tokens: a response cut by
    max_new_tokens inside one decoded to U+FFFD, which was then scored and trained."""
    ids = tok("日本", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids[:-1]).endswith("\ufffd")  # a character spread over tokens

    class Source(nn.Module):
        def __init__(self, answer):
            super().__init__()
            self.answer, self.w = answer, nn.Parameter(torch.zeros(1))

        def generate(self, input_ids, **_):
            new = torch.tensor([self.answer] * input_ids.shape[0])
            return torch.cat([input_ids, new], dim=1)

    row = {"question": "Say it"}
    [cut] = generate_synthetic(Source(ids[:-1]), tok, [row], progress=False)
    assert cut == {**cut, "response": "日", "finished": False}
    [whole] = generate_synthetic(Source(ids), tok, [row], progress=False)
    assert whole["response"] == "日本" and whole["finished"] is False
    [done] = generate_synthetic(Source(ids[:-1] + [tok.eos_token_id]), tok, [row],
                                progress=False)
    assert done["finished"] is True and done["response"].endswith("\ufffd")  # as generated


def test_a_cut_responses_eos_is_neither_scored_nor_selected(tok):
    """The EOS tokenize_example appends to a cut response is not the source's token: it was
    scored (counted in the sample's mean excess) and could be the selected token, whose
    label was then removed, dropping the sample as 'no label left'."""
    row = dict(ROW, finished=False)
    offsets = response_offsets(tok, row["response"], format_prompt(row))
    n = len(offsets)
    excess = torch.full((n,), -3.0)
    excess[-1] = 5.0  # the appended EOS scores highest
    sample = ScoredSample(row=row, offsets=offsets, logp_lora=excess,
                          logp_base=torch.zeros(n))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "dropped ... no label left"
        [ex], stats = build_masked_examples([sample], tok, sample_keep=1,
                                            token_keep=1 / n)
    labelled = [p for p, v in enumerate(ex["labels"]) if v != IGNORE_INDEX]
    assert len(labelled) == 1 and ex["input_ids"][labelled[0]] != tok.eos_token_id
    assert stats["dropped_no_labels"] == 0 and stats["unfinished_no_eos_label"] == 1

    model = _small(seed=3)
    [cut, done] = contrastive_excess(model, tok, [row, ROW], base_model=_small(seed=4),
                                     progress=False)
    assert len(cut.offsets) == n - 1 and cut.offsets == offsets[:-1]
    assert len(done.offsets) == n and done.offsets[-1] == (len(ROW["response"]),) * 2
    torch.testing.assert_close(cut.excess, done.excess[:-1])
    assert cut.mean_excess == pytest.approx(float(done.excess[:-1].mean()))


def test_all_tokens_baseline_and_whitespace_responses(tok):
    """token_keep = 1 is the all-tokens baseline: every response token keeps its label, even
    one no source token scored (NaN excess); drop_empty also drops a whitespace-only
    response (no answer text, as an empty one)."""
    row = dict(ROW, response="cb a")
    n = len(response_offsets(tok, row["response"]))
    unscored = ScoredSample(row=row, offsets=response_offsets(tok, row["response"]),
                            logp_lora=torch.full((n,), math.nan), logp_base=torch.zeros(n))
    examples, stats = build_masked_examples([unscored], tok, sample_keep=1, token_keep=1)
    assert examples[0]["labels"] == tokenize_example(row, tok, 128)["labels"]
    assert stats["token_fraction"] == 1.0
    scored = ScoredSample(row=row, offsets=unscored.offsets, logp_lora=torch.zeros(n),
                          logp_base=torch.zeros(n))
    blank = dict(ROW, response="   ")
    spans = response_offsets(tok, blank["response"])
    spaces = ScoredSample(row=blank, offsets=spans, logp_lora=torch.full((len(spans),), 9.0),
                          logp_base=torch.zeros(len(spans)))
    _, stats = build_masked_examples([scored, spaces], tok, sample_keep=0.5)
    assert stats["num_usable"] == 1 and stats["kept_samples"] == [0]
    _, stats = build_masked_examples([scored, spaces], tok, sample_keep=0.5, drop_empty=False)
    assert stats["num_usable"] == 2 and stats["kept_samples"] == [1]


def test_scoring_runs_in_eval_mode_and_restores_the_modes(tok):
    """A source left in training mode (lora_dropout) scores deterministically: the dropout
    would hit the LoRA pass only and turn the excess into noise."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_small(), peft.LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q_proj", "v_proj"],
        init_lora_weights=False))
    model.train()
    frozen = model.get_submodule("base_model.model.model.embed_tokens").eval()
    [a] = contrastive_excess(model, tok, [ROW])
    [b] = contrastive_excess(model, tok, [ROW])
    model.eval()
    [c] = contrastive_excess(model, tok, [ROW])
    torch.testing.assert_close(a.excess, c.excess)
    torch.testing.assert_close(b.excess, c.excess)
    model.train()
    frozen.eval()
    generate_synthetic(model, tok, [ROW], max_new_tokens=2, progress=False)
    assert model.training and not frozen.training      # each module's own mode is back


def test_titok_takes_the_row_and_number_formats_pipelines_give(tok):
    """The checks added on 2026-12-05 refused what worked before: a datasets.Dataset, a
    streamed dataset or a generator of seed rows, top_p=None (transformers' default),
    do_sample / drop_empty as 0 / 1 or numpy bools, offsets in a float array; a numpy
    temperature passed the check and failed in transformers; contrastive_excess sliced a
    Dataset into a dict of columns; train_masked failed on [1, L] tensor labels."""
    import numpy as np

    datasets = pytest.importorskip("datasets")
    peft = pytest.importorskip("peft")
    seeds = datasets.Dataset.from_list([ROW])
    model = _small()
    for rows in (seeds, seeds.to_iterable_dataset(), (r for r in [ROW])):
        [row] = generate_synthetic(model, tok, rows, max_new_tokens=2, top_p=None,
                                   do_sample=np.True_, temperature=np.float32(0.7),
                                   progress=False)
        assert row["question"] == ROW["question"]
    generate_synthetic(model, tok, [ROW], max_new_tokens=2, do_sample=0, progress=False)
    lora = peft.get_peft_model(_small(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    [scored] = contrastive_excess(lora, tok, datasets.Dataset.from_list([ROW]))
    examples, _ = build_masked_examples([scored], tok, drop_empty=1)
    assert len(examples) == 1
    spans = np.array([[0.0, 3.0], [3.0, 5.0]])
    assert align_token_scores(spans, torch.tensor([1.0, 2.0]), spans).tolist() == [1.0, 2.0]
    example = tokenize_example(ROW, tok, 64)
    example = {k: torch.tensor([v]) for k, v in example.items()}  # [1, L]
    assert len(train_masked(_small(), tok, [example], steps=1, progress=False)) == 1
    assert len(train_masked(_small(), tok, {"a": example}.values(), steps=1,
                            progress=False)) == 1  # indexed after the check: a list
    with pytest.raises(ValueError, match=r"^examples: example 0 has labels \['x'\], expected a "
                                         r"list of ints"):
        train_masked(_small(), tok, [{"input_ids": [1], "labels": ["x"]}], steps=1)


def test_batch_sizes_below_one_are_refused_by_name(tok):
    model = _small()
    for bad in (0, -1):  # -1 made generate_synthetic return no row at all
        with pytest.raises(ValueError, match="batch_size"):
            generate_synthetic(model, tok, [ROW], batch_size=bad, progress=False)
        with pytest.raises(ValueError, match="batch_size"):
            response_log_probs(model, tok, [ROW], batch_size=bad)


def test_scoring_shows_progress_unless_told_not_to(tok, capsys):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_small(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    contrastive_excess(model, tok, [ROW] * 3, batch_size=1)
    err = capsys.readouterr().err
    assert "scoring (with adapter)" in err and "scoring (base)" in err
    contrastive_excess(model, tok, [ROW], progress=False)
    assert "scoring" not in capsys.readouterr().err


def test_generate_synthetic_and_train_masked(tok):
    peft = pytest.importorskip("peft")
    base = build_tiny_model(seed=2, vocab_size=V, hidden_size=32, intermediate_size=48,
                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    seeds = [ROW, {"system_prompt": "Be short.", "question": "What is 2 + 2?", "task": "x"}]
    state = torch.random.get_rng_state()
    rows = generate_synthetic(model, tok, seeds, max_new_tokens=5, progress=False, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG not reseeded
    again = generate_synthetic(model, tok, seeds, max_new_tokens=5, progress=False, seed=3)
    assert rows == again and [r["question"] for r in rows] == [s["question"] for s in seeds]
    assert tok.padding_side == "right"                    # restored
    # left-padded batched generation continues each prompt like an unbatched greedy run
    greedy = generate_synthetic(model, tok, seeds, max_new_tokens=5, do_sample=False,
                                progress=False)
    for row, seed in zip(greedy, seeds, strict=True):
        ids = prompt_inputs(tok, format_prompt(seed))
        out = model.generate(**ids, max_new_tokens=5, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        if not row["finished"]:  # a cut inside a multi-byte character is left out
            text = _decode_whole_characters(tok, out[0, ids["input_ids"].shape[1]:].tolist())
        assert row["response"] == text.strip()
    scored = contrastive_excess(model, tok, [r for r in rows if r["response"]] or [ROW])
    examples, _ = build_masked_examples(scored, tok, sample_keep=1.0, token_keep=0.5)
    target = peft.get_peft_model(build_tiny_model(seed=4, vocab_size=V, hidden_size=32,
                                                  intermediate_size=48, num_hidden_layers=1,
                                                  num_attention_heads=2, num_key_value_heads=1),
                                 peft.LoraConfig(r=2, target_modules=["q_proj"]))
    before = [p.clone() for p in target.parameters() if p.requires_grad]
    losses = train_masked(target, tok, examples, steps=2, batch_size=2, progress=False)
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    after = [p for p in target.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
    with pytest.raises(ValueError, match="examples"):
        train_masked(target, tok, [], steps=1)
    with pytest.raises(ValueError, match="seed_rows"):
        generate_synthetic(model, tok, [])
    with pytest.raises(TypeError, match="base_model"):
        contrastive_excess(base, tok, [ROW])


def test_titok_transfer_is_reproducible_from_its_seed(tok, tok_other):
    """Same seed, same data: the same target adapter, whatever ran before (the adapter's
    initialisation is seeded too, so compared arms differ only by their selection)."""
    peft = pytest.importorskip("peft")
    from datalora.titok import titok_transfer

    small = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=1)
    source = peft.get_peft_model(build_tiny_model(seed=2, vocab_size=V, **small),
                                 peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    rows = [ROW, {"system_prompt": "", "question": "Sort: 3, 1, 2", "response": "1, 2, 3"}]

    def transfer():
        target, report = titok_transfer(
            source, tok, build_tiny_model(seed=4, vocab_size=270, **small), tok_other, rows,
            sample_keep=1.0, token_keep=1.0, target_modules=("q_proj",), steps=2,
            batch_size=2, seed=5, synthetic=rows, progress=False)
        return [p.detach().clone() for p in target.parameters() if p.requires_grad], report

    state = torch.random.get_rng_state()
    first, report = transfer()
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG not reseeded
    torch.rand(7)  # moves the global generator
    second, again = transfer()
    assert report["losses"] == again["losses"]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_titok_transfer_with_only_empty_responses_says_so(tok):
    """Every synthetic response empty (dropped by drop_empty) failed in the training step
    with "examples: expected at least one training example", naming neither cause."""
    peft = pytest.importorskip("peft")
    from datalora.titok import titok_transfer

    source = peft.get_peft_model(_small(seed=2), peft.LoraConfig(
        r=2, target_modules=["q_proj"], init_lora_weights=False))
    empty = [dict(ROW, response=""), dict(ROW, response="  ")]
    with pytest.raises(ValueError, match=r"synthetic: no training example left of the 2 "
                                         r"synthetic samples \(2 with an empty response"):
        titok_transfer(source, tok, _small(seed=4), tok, [ROW], synthetic=empty, steps=1,
                       progress=False)


@pytest.mark.parametrize("adapter", ["lora", "molora"])
def test_titok_transfer_takes_one_target_module_as_a_string(tok, adapter):
    """target_modules="q_proj" passed the up-front check, then the adapter was attached to
    list("q_proj"), the modules "q", "_", "p", ... (after generation and scoring)."""
    peft = pytest.importorskip("peft")
    from datalora.layers import MoLoRALinear
    from datalora.titok import titok_transfer

    source = peft.get_peft_model(_small(seed=2), peft.LoraConfig(
        r=2, target_modules=["q_proj"], init_lora_weights=False))
    target, _ = titok_transfer(source, tok, _small(seed=4), tok, [ROW], sample_keep=1.0,
                               token_keep=1.0, adapter=adapter, target_modules="q_proj",
                               steps=1, synthetic=[ROW], progress=False)
    wrapped = [n for n, m in target.named_modules()
               if isinstance(m, MoLoRALinear) or hasattr(m, "lora_A")]
    assert wrapped and all(n.endswith("q_proj") for n in wrapped)


def test_titok_evidence_multi_seed_smoke(tmp_path):
    """The evidence script end to end on the random base (seconds): per-seed losses, their
    means, the paired TITOK - all-tokens difference, keeps chosen on the seed mean."""
    pytest.importorskip("peft")
    import json

    from datalora.experiments.titok_evidence import main

    out = tmp_path / "titok.json"
    main(["--task", "lookup", "--base", "random", "--adapter-dir", str(tmp_path / "adapters"),
          "--seed-prompts", "4", "--steps", "2", "--source-steps", "3", "--eval-rows", "2",
          "--seeds", "0", "1", "--tune-keeps", "1:0.5", "0.5:1", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["config"]["source_steps"] == 3  # its own folder, not the 80-step adapters'
    assert {"cpu_model", "cpu_threads", "transformers", "git_commit", "git_dirty"} <= set(report)
    trained = json.loads((tmp_path / "adapters" / "steps-3" / "random" / "lookup"
                          / "datalora_train.json").read_text())
    assert trained["settings"]["steps"] == 3
    per_seed = report["eval_loss_per_seed"]
    assert sorted(per_seed) == ["0", "1"]
    for name in ("target_all_synthetic_tokens", "target_titok_selected"):
        want = (per_seed["0"][name] + per_seed["1"][name]) / 2
        assert report["eval_loss"][name] == pytest.approx(want)
    diffs = [per_seed[s]["target_titok_selected"] - per_seed[s]["target_all_synthetic_tokens"]
             for s in ("0", "1")]
    diff = report["titok_minus_all_tokens"]
    assert diff["eval_per_seed"] == pytest.approx(diffs)
    assert diff["titok_wins"] == sum(d < 0 for d in diffs) and diff["seeds"] == 2
    best = min(report["validation_tuning"], key=lambda r: r["validation_loss"])
    assert (report["config"]["sample_keep"], report["config"]["token_keep"]) == (
        best["sample_keep"], best["token_keep"])
    assert all(r["validation_loss"] == pytest.approx(sum(r["validation_loss_per_seed"]) / 2)
               for r in report["validation_tuning"])
    with pytest.raises(ValueError, match="seeds"):
        from datalora.experiments.titok_evidence import run
        run("lookup", base="random", adapter_dir=str(tmp_path / "adapters"), seeds=(0, 0))


def test_tokenizer_without_offsets_gets_a_clear_error():
    from transformers import ByT5Tokenizer

    with pytest.raises(ValueError, match="offset"):
        response_offsets(ByT5Tokenizer(), "abc")

    def python_tokenizer(text, **kwargs):  # transformers 4.x's slow tokenizers raise instead
        raise NotImplementedError("return_offset_mapping is not available when using Python "
                                  "tokenizers")
    with pytest.raises(ValueError, match="returns no character offsets"):
        response_offsets(python_tokenizer, "abc")


def test_align_is_the_identity_for_the_same_tokenization():
    """Tokens splitting one multi-byte character share its span: with one tokenizer on both
    sides token i's score must stay token i's (it took a neighbour's max)."""
    offsets = response_offsets(build_tokenizer(), "héllo wörld 😀 ok")
    scores = torch.arange(len(offsets), dtype=torch.float32)
    assert torch.equal(align_token_scores(offsets, scores, offsets), scores)
    # the source scored fewer tokens (cut by score_max_length): still token i on the prefix
    cut = len(offsets) - 3
    got = align_token_scores(offsets[:cut], scores[:cut], offsets)
    assert torch.equal(got[:cut], scores[:cut])


# --------------------------------------------------------------------------- review fixes

def test_nan_excess_ranks_last_and_is_ignored_in_means():
    nan = float("nan")
    assert select_samples([1.0, nan, 2.0, 3.0], 0.5) == [3, 2]
    assert select_samples([1.0, 2.0, 3.0, nan], 0.5) == [2, 1]
    assert select_samples([nan, 0.0, float("-inf")], 1.0) == [1, 0, 2]
    s = ScoredSample(row=ROW, offsets=[(0, 1), (1, 2), (2, 3)],
                     logp_lora=torch.tensor([1.0, -math.inf, 3.0]),
                     logp_base=torch.tensor([0.0, -math.inf, 0.0]))  # -inf - -inf = NaN
    assert s.mean_excess == pytest.approx(2.0)
    s.logp_lora = torch.full((3,), -math.inf)
    assert s.mean_excess == -math.inf
    assert not select_tokens(torch.tensor([nan, 1.0, nan]), 1.0)[[0, 2]].any()


@pytest.mark.parametrize("f,n,want", [(0.28, 25, 7), (0.56, 25, 14), (0.14, 50, 7),
                                      (0.07, 100, 7)])
def test_keep_counts_survive_float_rounding(f, n, want):
    assert math.ceil(f * n) == want + 1                  # the float product rounds up
    assert len(select_samples([0.0] * n, f)) == want
    assert int(select_tokens(torch.zeros(n), f).sum()) == want


def _trained(tokenizer_model, pre, trainer, texts, **special):
    from transformers import PreTrainedTokenizerFast

    tokenizer_model.pre_tokenizer = pre
    tokenizer_model.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer_model, **special)


TEXTS = ["1, 2, 3 😀 ok  x", "the quick brown fox", "emoji 😀 ok"] * 20


def _byte_level_bpe():
    """GPT-2 / RoBERTa-style: byte-level BPE whose offsets trim whitespace."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    t = Tokenizer(models.BPE())
    t.post_processor = processors.ByteLevel(trim_offsets=True)
    return _trained(t, pre_tokenizers.ByteLevel(add_prefix_space=False), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()), TEXTS,
        eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def _metaspace_unigram():
    """sentencepiece-style: Unigram over ``▁``-marked words."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    trainer = trainers.UnigramTrainer(vocab_size=60, special_tokens=["<pad>", "<unk>", "</s>"],
                                      unk_token="<unk>", show_progress=False)
    return _trained(Tokenizer(models.Unigram()), pre_tokenizers.Metaspace(), trainer, TEXTS,
                    eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def test_trimmed_source_offsets_still_score_target_whitespace_tokens():
    """GPT-2-style offsets leave spaces out (``Ġ2`` is (3, 4), a lone ``Ġ`` zero-width);
    the Metaspace target's standalone ``▁`` tokens must still get a score."""
    text = TEXTS[0]
    bpe, spm = _byte_level_bpe(), _metaspace_unigram()
    src = response_offsets(bpe, text)
    assert any(e == s < len(text) for s, e in src)       # really trimmed: zero-width mid-text
    tgt = response_offsets(spm, text)
    tokens = spm.convert_ids_to_tokens(spm(text, add_special_tokens=False)["input_ids"])
    spaces = [j for j, t in enumerate(tokens) if t == "▁"]
    assert len(spaces) >= 2                              # standalone ▁ tokens exist
    scores = align_token_scores(src, torch.arange(len(src), dtype=torch.float32), tgt)
    assert not torch.isnan(scores).any()
    assert select_tokens(scores, 0.99)[spaces].all()
    assert tile_spans([(0, 1), (3, 4), (6, 6), (7, 8), (8, 8)]) == [
        (0, 1), (1, 4), (4, 8), (4, 8), (8, 8)]
    assert tile_spans(tgt) == tgt                        # spans that tile stay unchanged
    # trailing gap characters belong to the last token; a zero-width span there stays
    assert tile_spans([(0, 3), (5, 5)]) == [(0, 5), (5, 5)]
    # a zero-width target token (EOS) takes only a zero-width source span at its position:
    # a source cut shorter ends in a zero-width span elsewhere, which scores nothing here
    scores = align_token_scores([(0, 3), (4, 4)], torch.tensor([1.0, 7.0]),
                                [(0, 3), (3, 6), (6, 6)])
    assert scores[:2].tolist() == [1.0, 1.0] and math.isnan(scores[2])


class _MergingTokenizer:
    """Character-level (id = code point + 10; BOS 1, EOS 2), except that "ZQ" is one token:
    a prompt ending in Z and a response starting with Q share it."""

    bos_token_id, eos_token_id = 1, 2

    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False):
        ids, offsets, i = [], [], 0
        while i < len(text):
            width = 2 if text.startswith("ZQ", i) else 1
            ids.append(999 if width == 2 else ord(text[i]) + 10)
            offsets.append((i, i + width))
            i += width
        if add_special_tokens:
            ids, offsets = [1, *ids], [(0, 0), *offsets]
        return {"input_ids": ids, **({"offset_mapping": offsets} if return_offsets_mapping
                                     else {})}


def test_a_token_straddling_the_prompt_end_spans_the_response_from_0():
    offsets = response_offsets(_MergingTokenizer(), "Qab", "Say Z")
    assert offsets == [(0, 1), (1, 2), (2, 3), (3, 3)]   # "ZQ" is (4, 6) in "Say ZQab"


def test_trailing_whitespace_tokens_are_scored_with_the_last_word_not_the_eos():
    """Trimmed offsets give trailing whitespace tokens zero-width spans: they were matched
    like the EOS (one took the source EOS's score, another none)."""
    text = TEXTS[0] + "  "
    tgt = response_offsets(_byte_level_bpe(), text)
    trailing = [j for j, (s, e) in enumerate(tgt[:-1]) if s == e and s > len(TEXTS[0]) - 2]
    assert len(trailing) >= 2                            # zero-width, before the EOS
    src = [(i, i + 1) for i in range(len(text))] + [(len(text), len(text))]  # per character
    scores = torch.arange(len(src), dtype=torch.float32)
    scores[-1] = 100.0                                   # the source EOS
    got = align_token_scores(src, scores, tgt)
    last_word = tile_spans(tgt)[trailing[0]]
    assert last_word[1] == len(text) and all(tile_spans(tgt)[j] == last_word for j in trailing)
    assert got[trailing].tolist() == [float(len(text) - 1)] * len(trailing)
    assert got[-1] == 100.0 and not torch.isnan(got).any()


def test_truncated_responses_select_among_kept_tokens_and_drop_unlabelled(tok):
    long = dict(ROW, response=" ".join(str(i) for i in range(150)))
    offsets = response_offsets(tok, long["response"])
    n = len(offsets)
    late = torch.cat([torch.zeros(n - 40), torch.ones(40)])   # best tokens in the cut tail
    sample = ScoredSample(row=long, offsets=offsets, logp_lora=late, logp_base=torch.zeros(n))
    with warnings.catch_warnings():
        warnings.simplefilter("error")                    # nothing dropped: no warning
        examples, stats = build_masked_examples([sample], tok, sample_keep=1.0,
                                                token_keep=0.3, max_length=64)
    resp = [v for v in tokenize_example(long, tok, 64)["labels"] if v != IGNORE_INDEX]
    kept = [v for v in examples[0]["labels"] if v != IGNORE_INDEX]
    assert len(kept) == math.ceil(0.3 * len(resp) - 1e-9) > 0
    empty = ScoredSample(row=long, offsets=offsets, logp_lora=torch.full((n,), math.nan),
                         logp_base=torch.zeros(n))          # no token scored: no label
    with pytest.warns(UserWarning, match="dropped 1 of the 2"):
        examples, stats = build_masked_examples([sample, empty], tok, sample_keep=1.0,
                                                token_keep=0.3, max_length=64)
    assert len(examples) == 1 and stats["dropped_no_labels"] == 1
    assert stats["kept_samples"] == [0]
    with pytest.raises(ValueError, match="examples: 1 examples have no label"):
        train_masked(nn.Linear(1, 1), tok, [{**examples[0],
                                             "labels": [IGNORE_INDEX] * len(resp)}], steps=1)


def _small(vocab=V, seed=1):
    return build_tiny_model(seed=seed, vocab_size=vocab, hidden_size=32, intermediate_size=48,
                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)


def test_datalora_source_runs_the_base_pass_with_the_adapter_off(tok):
    from datalora.config import DATALORAConfig
    from datalora.model import get_datalora_model

    base = _small()
    with torch.no_grad():
        want_base = response_log_probs(base, tok, [ROW])[0]
    dl = get_datalora_model(base, DATALORAConfig(num_lora_experts=2, lora_rank=2,
                                                 num_active_experts=1,
                                                 target_modules=["q_proj", "v_proj"]),
                            verbose=False)
    with torch.no_grad():
        for name, p in dl.named_parameters():
            if "lora_B" in name:
                p.normal_()
    [s] = contrastive_excess(dl, tok, [ROW])
    torch.testing.assert_close(s.logp_base, want_base)
    torch.testing.assert_close(s.logp_lora, response_log_probs(dl, tok, [ROW])[0])
    assert s.excess.abs().max() > 1e-3
    assert all(layer.adapter_enabled for _, layer in dl.molora_layers())   # re-enabled
    [s2] = contrastive_excess(dl.base_model, tok, [ROW])  # injected MoLoRA, no wrapper
    torch.testing.assert_close(s2.excess, s.excess)
    for shared in (dl.base_model, dl):
        with pytest.raises(ValueError, match="base_model: shares parameters.*excess would be 0"):
            contrastive_excess(dl, tok, [ROW], base_model=shared)


def test_titok_transfer_checks_arguments_before_any_work(tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    from datalora.titok import titok_transfer

    class NoWork(nn.Module):
        def generate(self, *a, **k):
            raise AssertionError("generated before the arguments were checked")

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=64, n_embd=16, n_layer=1,
                                      n_head=2))
    cases = [(dict(sample_keep=0), "sample_keep"), (dict(token_keep=1.5), "token_keep"),
             (dict(token_keep=math.nan), "token_keep"),
             ({}, r"target_modules: none of \['q_proj'.*c_attn"),   # GPT-2 names
             (dict(adapter="molora", target_modules=("c_attn",)), "nn.Linear"),
             (dict(adapter="dora"), "adapter")]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            titok_transfer(NoWork(), tok, gpt2, tok, [ROW], progress=False, **kwargs)


def test_titok_transfer_checks_reduce_lengths_training_and_offsets_before_any_work(tok):
    from transformers import ByT5Tokenizer

    from datalora.titok import titok_transfer

    class NoWork(nn.Module):
        def disable_adapter(self):
            raise AssertionError("scored before the arguments were checked")

        def generate(self, *a, **k):
            raise AssertionError("generated before the arguments were checked")

    target = _small()
    no_pad = _byte_level_bpe()
    no_pad.pad_token = None
    cases = [(dict(target_tokenizer=no_pad), "target_tokenizer: has no pad_token_id"),
             (dict(source_tokenizer=no_pad), "source_tokenizer: has no pad_token_id"),
             (dict(reduce="sum"), "reduce"), (dict(max_length=1), "max_length"),
             (dict(score_max_length=0), "score_max_length"), (dict(steps=0), "steps"),
             (dict(batch_size=0), "batch_size"), (dict(lr=-1.0), "lr"),
             (dict(rank=0), "rank"), (dict(alpha=0.0), "alpha"),
             (dict(target_modules=["q_proj", "mlp"]), "'model.layers.0.mlp' is a MistralMLP"),
             (dict(target_tokenizer=ByT5Tokenizer()), "target_tokenizer: .*offsets"),
             (dict(source_tokenizer=ByT5Tokenizer()), "source_tokenizer: .*offsets")]
    for kwargs, match in cases:
        args = dict(source_tokenizer=tok, target_tokenizer=tok, target_modules=["q_proj"])
        args |= kwargs
        with pytest.raises(ValueError, match=match):
            titok_transfer(NoWork(), args.pop("source_tokenizer"), target,
                           args.pop("target_tokenizer"), [ROW], progress=False, **args)


def test_titok_cli_transfers_local_models_and_saves_the_adapter(tmp_path, tok, tok_other,
                                                                capsys):
    """``titok --source-model ...`` on tiny local folders: the target adapter and the report
    are saved; bad flags are named, before any model loads."""
    peft = pytest.importorskip("peft")
    import json

    from datalora.cli import main

    source = _small(seed=2)
    source.save_pretrained(tmp_path / "src")
    tok.save_pretrained(tmp_path / "src")
    lora = peft.get_peft_model(source, peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                       init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    _small(vocab=270, seed=4).save_pretrained(tmp_path / "tgt")
    tok_other.save_pretrained(tmp_path / "tgt")
    (tmp_path / "seeds.txt").write_text("Reverse the letters: abc\n\nSort: 3, 1, 2\n")
    out = tmp_path / "out"
    flags = ["titok", "--source-model", str(tmp_path / "src"), "--source-adapter",
             str(tmp_path / "adapter"), "--target-model", str(tmp_path / "tgt"),
             "--seed-file", str(tmp_path / "seeds.txt"), "--target-modules", "q_proj",
             "--steps", "1", "--max-new-tokens", "4", "--sample-keep", "1",
             "--output-dir", str(out), "--no-progress"]
    assert main(flags) == 0
    report = json.loads((out / "titok_report.json").read_text())
    assert report["seed_prompts"] == 2 and len(report["losses"]) == 1
    loaded = peft.PeftModel.from_pretrained(_small(vocab=270, seed=4), str(out))
    assert any("lora_B" in n for n, _ in loaded.named_parameters())
    for bad, flag in ((["--sample-keep", "0"], "--sample-keep"),
                      (["--source-adapter", str(tmp_path / "missing")], "--source-adapter"),
                      (["--target-modules", "c_attn"], "--target-modules"),
                      (["--seed-file", str(tmp_path / "seeds.csv")], "--seed-file"),
                      (["--output-dir", str(tmp_path / "seeds.txt")], "--output-dir")):
        with pytest.raises(SystemExit) as exc:
            main(flags + bad)
        assert exc.value.code == 2 and flag in capsys.readouterr().err
    # a flag of the other mode is refused, not ignored (both ways)
    for argv, flag in ((flags + ["--task", "sort"], "--task"),
                       (flags + ["--eval-rows", "5", "--base", "random"], "--base, --eval-rows"),
                       (["titok", "--output-dir", str(out), "--no-progress"], "--output-dir"),
                       (["titok", "--max-new-tokens", "4"], "--max-new-tokens")):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
        assert f"{flag}: not used by" in capsys.readouterr().err


def test_titok_cli_transfers_a_datalora_adapter(tmp_path, tok, tok_other):
    """``--source-adapter`` may be a datalora adapter folder (a DATALORATrainer's output:
    MoLoRA layers, the saliency network, token pruning): the CLI loads it with
    ``DATALORAModel.from_pretrained`` and transfers it like a PEFT one."""
    peft = pytest.importorskip("peft")
    import json

    from datalora.cli import main
    from datalora.config import DATALORAConfig
    from datalora.model import get_datalora_model

    source = _small(seed=2)
    source.save_pretrained(tmp_path / "src")
    tok.save_pretrained(tmp_path / "src")
    adapted = get_datalora_model(source, DATALORAConfig(
        num_lora_experts=2, lora_rank=2, num_active_experts=1, target_modules=["q_proj"],
        target_retention=0.5), verbose=False)
    with torch.no_grad():
        for _, layer in adapted.molora_layers():
            layer.lora_B.normal_(std=0.5)
    adapted.save_pretrained(tmp_path / "adapter")
    _small(vocab=270, seed=4).save_pretrained(tmp_path / "tgt")
    tok_other.save_pretrained(tmp_path / "tgt")
    (tmp_path / "seeds.txt").write_text("Reverse the letters: abc\nSort: 3, 1, 2\n")
    out = tmp_path / "out"
    assert main(["titok", "--source-model", str(tmp_path / "src"), "--source-adapter",
                 str(tmp_path / "adapter"), "--target-model", str(tmp_path / "tgt"),
                 "--seed-file", str(tmp_path / "seeds.txt"), "--target-modules", "q_proj",
                 "--steps", "1", "--max-new-tokens", "4", "--sample-keep", "1",
                 "--output-dir", str(out), "--no-progress"]) == 0
    report = json.loads((out / "titok_report.json").read_text())
    assert report["seed_prompts"] == 2 and len(report["losses"]) == 1
    assert all(math.isfinite(loss) for loss in report["losses"])
    loaded = peft.PeftModel.from_pretrained(_small(vocab=270, seed=4), str(out))
    assert any("lora_B" in n for n, _ in loaded.named_parameters())


def test_seed_file_rows_are_checked_where_they_are_read(tmp_path):
    """A non-string system_prompt passed the seed file's check and failed after both
    models had loaded, naming neither the file nor the line."""
    from datalora.titok.cli import load_seed_prompts

    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text('{"question": "q1", "system_prompt": null}\n'
                     '{"question": "q2", "system_prompt": "Be short."}\n')
    assert load_seed_prompts(seeds) == [{"question": "q1", "system_prompt": ""},
                                        {"question": "q2", "system_prompt": "Be short."}]
    for bad in ("5", "0", "false"):  # (falsy ones too)
        seeds.write_text('{"question": "q1"}\n{"question": "q2", "system_prompt": ' + bad
                         + '}\n')
        with pytest.raises(ValueError, match=r"seed_file: .*seeds.jsonl line 2: 'system_prompt' "
                                             r"must be a string, got (int|bool)"):
            load_seed_prompts(seeds)


def test_datalora_source_with_pruning_runs_the_plain_base_pass(tok):
    """With shared routing and token pruning the base pass must also run unpruned: the
    adapter off and the pruned layers dense, i.e. the plain base model."""
    from datalora.config import DATALORAConfig
    from datalora.model import get_datalora_model

    base = _small()
    with torch.no_grad():
        want_base = response_log_probs(base, tok, [ROW])[0]
    dl = get_datalora_model(base, DATALORAConfig(num_lora_experts=2, lora_rank=2,
                                                 num_active_experts=1, routing="shared",
                                                 target_modules=["q_proj", "v_proj"]),
                            verbose=False)
    dl.set_curriculum_state(retention=0.5)
    with torch.no_grad():
        dl.saliency.score_head.weight.normal_()
    [s] = contrastive_excess(dl, tok, [ROW])
    torch.testing.assert_close(s.logp_base, want_base)
    assert dl.runtime.pruning_enabled and all(
        layer.adapter_enabled for _, layer in dl.molora_layers())


def _qwen_with_biases(seed=2):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)).eval()


def _with_trained_biases(model):
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                      bias="all", init_lora_weights=False))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if name.endswith("bias") and p.requires_grad:
                p.add_(0.3)
    return lora


def test_peft_source_whose_disabled_model_is_not_the_base_needs_base_model(tok, monkeypatch):
    """A PEFT adapter with trained biases (bias='all') keeps them on with the adapter
    disabled, and PiSSA / OLoRA inits rewrote the base: scoring against that "base" gave
    wrong excesses silently. Refused without base_model (before any generation in
    titok_transfer); with it, the base pass is the real base model."""
    from datalora.titok import disabled_is_not_base, response_log_probs, titok_transfer

    peft = pytest.importorskip("peft")
    lora = _with_trained_biases(_qwen_with_biases())
    assert "bias='all'" in disabled_is_not_base(lora)
    with pytest.raises(ValueError, match="base_model: required: .*bias='all'"):
        contrastive_excess(lora, tok, [ROW])
    base = _qwen_with_biases()
    [s] = contrastive_excess(lora, tok, [ROW], base_model=base)
    [want] = response_log_probs(base, tok, [ROW])
    torch.testing.assert_close(s.logp_base, want)
    monkeypatch.setattr(lora, "generate", lambda *a, **k: pytest.fail("generated first"))
    with pytest.raises(ValueError, match="base_model: required"):
        titok_transfer(lora, tok, _small(seed=4), tok, [ROW], progress=False)
    pissa = peft.get_peft_model(_small(), peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                          init_lora_weights="pissa"))
    assert "init_lora_weights='pissa'" in disabled_is_not_base(pissa)
    plain = peft.get_peft_model(_small(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    assert disabled_is_not_base(plain) is None
    for bias in ("all", "lora_only"):  # a model without biases: disabling gives the base
        no_biases = peft.get_peft_model(_small(), peft.LoraConfig(
            r=2, target_modules=["q_proj"], bias=bias))
        assert disabled_is_not_base(no_biases) is None
    only_lora = peft.get_peft_model(_qwen_with_biases(), peft.LoraConfig(
        r=2, target_modules=["q_proj"], bias="lora_only"))   # Qwen2's q_proj has a bias
    assert "bias='lora_only'" in disabled_is_not_base(only_lora)
    outside = peft.get_peft_model(_qwen_with_biases(), peft.LoraConfig(
        r=2, target_modules=["o_proj"], bias="lora_only"))   # o_proj has none
    assert disabled_is_not_base(outside) is None
    # replicated layers still run, and KaSA's truncated base stays, when disabled
    replicated = peft.get_peft_model(_small(), peft.LoraConfig(
        r=2, target_modules=["q_proj"], layer_replication=[[0, 1], [0, 1]]))
    assert "layer_replication" in disabled_is_not_base(replicated)
    kasa = getattr(peft.tuners.lora.config, "KasaConfig", None)  # peft >= 0.18
    if kasa is not None:
        truncated = peft.get_peft_model(_small(), peft.LoraConfig(
            r=2, target_modules=["q_proj"], kasa_config=kasa()))
        assert "KaSA" in disabled_is_not_base(truncated)


def test_titok_cli_scores_a_bias_adapter_against_a_fresh_base(tmp_path, tok, tok_other):
    """The CLI loads the source model a second time for the base pass when the adapter's
    disabled model is not the base (here: trained biases)."""
    from datalora.cli import main

    source = _qwen_with_biases()
    source.save_pretrained(tmp_path / "src")
    tok.save_pretrained(tmp_path / "src")
    _with_trained_biases(source).save_pretrained(tmp_path / "adapter")
    _small(vocab=270, seed=4).save_pretrained(tmp_path / "tgt")
    tok_other.save_pretrained(tmp_path / "tgt")
    (tmp_path / "seeds.txt").write_text("Reverse the letters: abc\n")
    assert main(["titok", "--source-model", str(tmp_path / "src"), "--source-adapter",
                 str(tmp_path / "adapter"), "--target-model", str(tmp_path / "tgt"),
                 "--seed-file", str(tmp_path / "seeds.txt"), "--target-modules", "q_proj",
                 "--steps", "1", "--max-new-tokens", "4", "--sample-keep", "1",
                 "--output-dir", str(tmp_path / "out"), "--no-progress"]) == 0


def test_titok_cli_names_the_model_flag_and_checks_both_before_loading(tmp_path, monkeypatch,
                                                                       capsys):
    """A bad --source-model / --target-model said "name_or_path: ..." (which of the two?),
    and a bad source model was found only after the target model had loaded."""
    from datalora import testing
    from datalora.cli import main

    _small(seed=2).save_pretrained(tmp_path / "notok")  # a model folder without tokenizer
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    (tmp_path / "seeds.txt").write_text("Reverse the letters: abc\n")

    def no_loading(*a, **k):
        raise AssertionError("loaded a model")

    monkeypatch.setattr(testing, "load_model_and_tokenizer", no_loading)
    for source, target, flag in (
            ("./missing-src", str(tmp_path / "notok"), "--source-model (source_model): no "
                                                       "such model folder"),
            ("embedded", "./missing-tgt", "--target-model (target_model): no such model "
                                          "folder"),
            (str(tmp_path / "notok"), "embedded", "--source-model (source_model): "),
            ("embedded", str(tmp_path / "notok"), "--target-model (target_model): ")):
        with pytest.raises(SystemExit) as exc:
            main(["titok", "--source-model", source, "--target-model", target,
                  "--source-adapter", str(tmp_path / "adapter"), "--seed-file",
                  str(tmp_path / "seeds.txt"), "--no-progress"])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and flag in err, err
    # an existing folder as --out, and --output-dir = --source-adapter (it would be
    # overwritten), fail before any model loads (the first only after the whole transfer)
    (tmp_path / "afolder").mkdir()
    for extra, flag in ((["--out", str(tmp_path / "afolder")], "--out (out): "),
                        (["--output-dir", str(tmp_path / "adapter")],
                         "--output-dir (output_dir): ")):
        with pytest.raises(SystemExit) as exc:
            main(["titok", "--source-model", "embedded", "--target-model", "embedded",
                  "--source-adapter", str(tmp_path / "adapter"), "--seed-file",
                  str(tmp_path / "seeds.txt"), "--no-progress", *extra])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and flag in err, err


def test_a_truncated_source_adapter_is_named_before_any_model_loads(tmp_path):
    """A source adapter whose weights file was cut short (an interrupted save) failed inside
    PEFT with a SafetensorError traceback naming no file."""
    from safetensors.torch import save_file

    from datalora.titok.cli import check_adapter_folder

    (tmp_path / "adapter_config.json").write_text("{}")
    save_file({"w": torch.zeros(64)}, tmp_path / "adapter_model.safetensors")
    assert check_adapter_folder(tmp_path) == tmp_path
    data = (tmp_path / "adapter_model.safetensors").read_bytes()
    (tmp_path / "adapter_model.safetensors").write_bytes(data[:-40])
    with pytest.raises(ValueError, match=r"source_adapter: .*adapter_model.safetensors is not "
                                         r"a readable safetensors file"):
        check_adapter_folder(tmp_path)


class _NoWork(nn.Module):
    """A source whose every pass fails: the arguments must be refused before one runs."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))

    def disable_adapter(self):
        raise AssertionError("scored before the arguments were checked")

    def forward(self, *args, **kwargs):
        raise AssertionError("ran before the arguments were checked")

    generate = forward


def test_malformed_rows_examples_and_scored_samples_are_named(tok):
    """A row without a response failed as ``KeyError: 'response'`` (contrastive_excess), an
    example without labels as ``KeyError: 'labels'`` (train_masked), a dict where a
    ScoredSample belongs as an AttributeError and a sample with one score fewer than its
    offsets as ``src_scores: expected 4 scores`` (build_masked_examples), naming no row."""
    with pytest.raises(ValueError, match=r"^rows: row 1 has no 'response' column$"):
        contrastive_excess(_NoWork(), tok, [ROW, {"question": "a"}])
    with pytest.raises(TypeError, match=r"^rows: expected a list of rows \(dicts\), got str$"):
        contrastive_excess(_NoWork(), tok, "abc")
    with pytest.raises(TypeError, match=r"^rows: row 0 is a str, expected a dict$"):
        contrastive_excess(_NoWork(), tok, ["abc"])
    with pytest.raises(ValueError, match=r"^examples: example 0 has no 'labels' column$"):
        train_masked(_NoWork(), tok, [{"input_ids": [1, 2]}], steps=1)
    with pytest.raises(TypeError, match=r"^scored: expected ScoredSample objects \(from "
                                        r"contrastive_excess\), got dict$"):
        build_masked_examples([{"row": {}}], tok)
    offsets = response_offsets(tok, ROW["response"], format_prompt(ROW))
    n = len(offsets)
    good = ScoredSample(row=ROW, offsets=offsets, logp_lora=torch.zeros(n),
                        logp_base=torch.zeros(n))
    short = replace(good, logp_lora=torch.zeros(n - 1), logp_base=torch.zeros(n - 1))
    with pytest.raises(ValueError, match=rf"^scored\[1\]: expected logp_lora and logp_base of "
                                         rf"shape \[{n}\] \(one score per offset\), got "
                                         rf"\({n - 1},\) and \({n - 1},\)$"):
        build_masked_examples([good, short], tok)
    assert build_masked_examples([good, good], tok, sample_keep=1.0)[0]


def test_generation_settings_seed_and_drop_empty_are_checked_before_any_work(tok):
    """top_p=2.0 used to run, temperature="0.7" failed as "'>' not supported between
    'str' and 'int'", seed_rows="abc" as "example: missing column 'question', found ['a']",
    seed="x" as "invalid literal for int()", and drop_empty="no" read as True."""
    from datalora.titok import titok_transfer

    cases = [(dict(top_p=2.0), ValueError, r"top_p: expected a finite number in \(0, 1\], "
                                           r"got 2.0"),
             (dict(top_p=0.0), ValueError, "top_p: expected"),
             (dict(temperature="0.7"), ValueError,
              "temperature: expected a finite number > 0, got '0.7'"),
             (dict(temperature=0.0), ValueError, "temperature: expected"),
             (dict(do_sample="no"), TypeError, "do_sample: expected a bool, got 'no'"),
             (dict(samples_per_prompt=0), ValueError, "samples_per_prompt: expected"),
             (dict(max_new_tokens=0), ValueError, "max_new_tokens: expected"),
             (dict(seed="x"), ValueError, "seed: expected an int, got 'x'"),
             (dict(seed_rows="abc"), TypeError,
              r"seed_rows: expected a list of rows \(dicts\), got str"),
             (dict(seed_rows=[{"q": "a"}]), ValueError,
              "seed_rows: row 0 has no 'question' column")]
    for kwargs, error, match in cases:
        seed_rows = kwargs.pop("seed_rows", [ROW])
        with pytest.raises(error, match=f"^{match}"):
            generate_synthetic(_NoWork(), tok, seed_rows, progress=False, **kwargs)
        with pytest.raises(error, match=f"^{match}"):
            titok_transfer(_NoWork(), tok, _small(), tok, seed_rows, target_modules=["q_proj"],
                           progress=False, **kwargs)
    with pytest.raises(TypeError, match="^drop_empty: expected a bool, got 'no'$"):
        titok_transfer(_NoWork(), tok, _small(), tok, [ROW], drop_empty="no", progress=False)
    with pytest.raises(TypeError, match="^drop_empty: expected a bool, got 'no'$"):
        build_masked_examples([], tok, drop_empty="no")
    # greedy decoding reads neither: a temperature of 0 is not refused there
    with pytest.raises(AssertionError, match="ran before"):
        generate_synthetic(_NoWork(), tok, [ROW], do_sample=False, temperature=0.0,
                           top_p=2.0, progress=False)


def test_a_source_adapter_of_another_model_size_is_named_by_the_cli(tmp_path, tok, capsys):
    """An adapter trained on a model of another width printed PEFT's traceback
    ("RuntimeError: Error(s) in loading state_dict for PeftModel: size mismatch for ...")
    and exited 1, in both modes of ``titok``."""
    peft = pytest.importorskip("peft")
    from datalora.cli import main

    source = _small(seed=2)  # hidden 32
    source.save_pretrained(tmp_path / "src")
    tok.save_pretrained(tmp_path / "src")
    _small(seed=4).save_pretrained(tmp_path / "tgt")
    tok.save_pretrained(tmp_path / "tgt")
    wide = build_tiny_model(vocab_size=V, hidden_size=64, intermediate_size=96,
                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    peft.get_peft_model(wide, peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(
        tmp_path / "wide")
    (tmp_path / "seeds.txt").write_text("Reverse the letters: abc\n")
    transfer = ["--source-model", str(tmp_path / "src"), "--target-model",
                str(tmp_path / "tgt"), "--seed-file", str(tmp_path / "seeds.txt"),
                "--target-modules", "q_proj", "--output-dir", str(tmp_path / "out")]
    embedded = ["--base", "random", "--eval-rows", "2"]  # the embedded tiny model: hidden 128
    for mode in (transfer, embedded):
        with pytest.raises(SystemExit) as exc:
            main(["titok", *mode, "--steps", "1", "--no-progress", "--source-adapter",
                  str(tmp_path / "wide")])
        err = capsys.readouterr().err
        assert exc.value.code == 2, err
        assert (f"datalora titok: error: --source-adapter (source_adapter): "
                f"{tmp_path / 'wide'} was trained on another model (size mismatch for "
                f"base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight: "
                f"copying a param with shape ") in err, err
        assert "Traceback" not in err
