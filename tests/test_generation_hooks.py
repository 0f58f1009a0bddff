"""The DATALORA hooks under Hugging Face ``generate`` and other model-forward options:
beam search, sliding-window and static caches, reused caches, hidden states, an
uncalibrated or stale keep threshold, assisted decoding (which crops the cache)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from transformers import DynamicCache, MistralConfig, MistralForCausalLM

from datalora import DATALORAConfig, get_datalora_model
from datalora.hf_compat import transformers_major

GREEDY = dict(do_sample=False, pad_token_id=0, eos_token_id=None)


def _model(prune_layers=(1, 3), sliding_window=None):
    """A 4-layer hidden-64 Mistral with shared routing and non-trivial adapter / saliency
    weights (B, score and router heads random), in eval mode."""
    cfg = MistralConfig(vocab_size=97, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=128, sliding_window=sliding_window,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return _datalora(MistralForCausalLM, cfg, prune_layers)


def _datalora(model_cls, cfg, prune_layers):
    """``model_cls(cfg)`` (sdpa) with shared routing, 4 experts of rank 4, top-2, pruning
    ``prune_layers``, random B and score / router heads (so routing and selection matter),
    in eval mode."""
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    config = DATALORAConfig(num_lora_experts=4, lora_rank=4, num_active_experts=2,
                            routing="shared", prune_layers=list(prune_layers))
    model = get_datalora_model(model_cls(cfg).eval(), config, verbose=False)
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for _, layer in model.molora_layers():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.05)
        for head in (model.saliency.score_head, model.saliency.router_head):
            head.weight.copy_(torch.randn(head.weight.shape, generator=g))
    return model.eval()


def _calibrated(model, retention=0.5):
    model.set_curriculum_state(retention=retention)
    ids = torch.randint(3, 97, (4, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        model(input_ids=ids)
    record = model.runtime.last
    model.runtime.calibrate(record.saliency.token_scores, record.valid)
    return model


def _ids(batch, length, seed=0):
    return torch.randint(3, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


class _UnpackedCache(DynamicCache):
    """Any cache but a plain ``DynamicCache`` has the pruned layers of a cached forward of
    several tokens run on every token, masked, not packed (a subclass may write keys
    another way): the path that compares the packed prefill with."""


def _stepwise_logits(model, ids, prefill):
    """Logits ``[B, L, V]`` of ``ids`` run with a fresh cache: the first ``prefill`` tokens
    at once, then one token per call (the masked path: asserted)."""
    from datalora.hf_compat import cache_kwargs

    cache = DynamicCache(config=model.config)
    steps = [model(input_ids=ids[:, :prefill], use_cache=True,
                   **cache_kwargs(model, cache)).logits]
    for t in range(prefill, ids.shape[1]):
        steps.append(model(input_ids=ids[:, t:t + 1], use_cache=True,
                           **cache_kwargs(model, cache)).logits)
    assert model.runtime.last.mode == "masked"
    return torch.cat(steps, 1)


@pytest.mark.parametrize("retention", [1.0, 0.5])
def test_beam_search_with_cache_equals_without(retention):
    """The keep flags and the saliency context on the cache follow its reorder_cache."""
    model = _calibrated(_model(prune_layers=(1, 4)), retention)
    kw = dict(max_new_tokens=8, num_beams=3, num_return_sequences=3, **GREEDY)
    with torch.no_grad():
        assert torch.equal(model.generate(_ids(2, 7), use_cache=True, **kw),
                           model.generate(_ids(2, 7), use_cache=False, **kw))


def test_beam_search_on_a_deep_copied_prefix_cache():
    """The transformers prefix-caching recipe: prefill a prefix once, then generate on
    ``copy.deepcopy`` of that cache; beam search reorders the copy (and its keep flags /
    saliency context), not the original, and equals generating without a prefix cache."""
    import copy

    from datalora.hf_compat import cache_kwargs, output_cache

    model = _calibrated(_model(prune_layers=(1, 4)))
    beams, prefix = 3, _ids(1, 6, seed=1)
    full = torch.cat([prefix, _ids(1, 4, seed=2)], 1)
    kw = dict(max_new_tokens=6, num_beams=beams, num_return_sequences=beams, **GREEDY)
    with torch.no_grad():
        cache = output_cache(model(input_ids=prefix.repeat_interleave(beams, 0), use_cache=True,
                                   **cache_kwargs(model, DynamicCache(config=model.config))))
        keys = cache.layers[0].keys.clone()
        copied = model.generate(full, **cache_kwargs(model, copy.deepcopy(cache)), **kw)
        assert torch.equal(copied, model.generate(full, **kw))
    assert torch.equal(cache.layers[0].keys, keys)


@pytest.mark.parametrize("retention", [1.0, 0.5])
def test_sliding_window_generation_with_cache(retention):
    """Past the window the cache returns the last window's keys only; the mask follows."""
    model = _calibrated(_model(sliding_window=4), retention)
    with torch.no_grad():
        a = model.generate(_ids(2, 10), use_cache=True, max_new_tokens=6, **GREEDY)
        b = model.generate(_ids(2, 10), use_cache=False, max_new_tokens=6, **GREEDY)
    assert torch.equal(a, b)


def test_sliding_window_cache_past_the_window_equals_the_full_forward():
    """Past the window a sliding cache holds the last window's keys only (a key offset):
    the keep flags of exactly those keys mask them, so step-by-step logits with the cache
    equal the packed forward's over the whole sequence."""
    model = _calibrated(_model(prune_layers=(1, 4), sliding_window=4), 0.5)
    ids = _ids(2, 12, seed=5)
    with torch.no_grad():
        full = model(input_ids=ids).logits
        kept = model.runtime.last.kept
        assert kept.any() and not kept.all()
        steps = _stepwise_logits(model, ids, prefill=6)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)


def test_static_cache_is_rejected_clearly():
    model = _calibrated(_model())
    with pytest.raises(ValueError, match="static"):
        model.generate(_ids(2, 10), cache_implementation="static", max_new_tokens=3, **GREEDY)


def _count_crops(monkeypatch):
    """A list that gets the kept length of every cache crop that dropped positions (the
    case the DATALORA state must be rolled back for)."""
    from datalora.pruning import cache_state

    cuts, real = [], cache_state._crop_state

    def counted(cache, length):
        context = getattr(cache, cache_state._CACHE_CONTEXT_ATTR, None)
        if context is not None and length < context[1].shape[1]:
            cuts.append(length)
        return real(cache, length)

    monkeypatch.setattr(cache_state, "_crop_state", counted)
    return cuts


def _draft_models():
    """Two draft models for assisted decoding on :func:`_model`'s vocabulary: a small plain
    Mistral and a DATALORA model (pruning its layers 1-2, its head perturbed so it often
    drafts other tokens than the main model picks)."""
    cfg = MistralConfig(vocab_size=97, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(7)
    plain = MistralForCausalLM(cfg).eval()
    datalora = _calibrated(_model(prune_layers=(1, 3)))
    with torch.no_grad():
        head = datalora.base_model.lm_head.weight
        head.add_(torch.randn(head.shape, generator=torch.Generator().manual_seed(8)) * 0.5)
    return {"plain": plain, "datalora": datalora}


@pytest.mark.parametrize("sliding_window", [None, 8])
def test_assisted_and_prompt_lookup_decoding_equal_greedy(sliding_window, monkeypatch):
    """Prompt-lookup decoding and assisted decoding (with a plain or a DATALORA draft model)
    verify several drafted tokens per forward, then crop the caches back to the accepted
    ones (the draft's by several of its forwards): the keep flags and the saliency
    network's running context are rolled back with them, so the tokens are greedy
    decoding's, with pruning active (also past a sliding window)."""
    model = _calibrated(_model(sliding_window=sliding_window))
    drafts = _draft_models()
    cuts = _count_crops(monkeypatch)
    options = {**GREEDY, "eos_token_id": 2}  # transformers 4.x's prompt lookup needs one
    kept = []
    for seed in range(3):
        prompt = _ids(1, 12, seed=seed)
        prompt = torch.cat([prompt, prompt[:, :6]], 1)  # repeats: the lookup finds drafts
        with torch.no_grad():
            greedy = model.generate(prompt, max_new_tokens=16, **options)
            kept.append(model.runtime.last.kept.float().mean())
            outs = [model.generate(prompt, prompt_lookup_num_tokens=3, max_new_tokens=16,
                                   **options)]
            outs += [model.generate(prompt, assistant_model=draft, max_new_tokens=16,
                                    **options) for draft in drafts.values()]
        for out in outs:  # transformers 4.x may add a token past the limit
            assert torch.equal(out[:, :greedy.shape[1]], greedy)
    assert len(cuts) >= 6  # drafts were rejected
    assert min(kept) < 1  # some generated tokens were pruned


def test_a_cropped_cache_resumes_from_the_positions_it_kept():
    """Prefill 10 tokens and crop 4 off, or run one more token and crop 3 off (to before
    that forward): the cache holds what prefilling the kept tokens holds (keep flags,
    saliency context, the next step's logits). ``crop`` by keyword works too."""
    import inspect

    from datalora.hf_compat import cache_kwargs
    from datalora.pruning import cache_state

    model = _calibrated(_model(prune_layers=(1, 4)))
    ids = _ids(1, 11, seed=4)

    def same_as_prefilled(cache, length):
        fresh = DynamicCache(config=model.config)
        model(input_ids=ids[:, :length], **cache_kwargs(model, fresh))
        assert torch.equal(getattr(cache, cache_state._CACHE_KEEP_ATTR),
                           getattr(fresh, cache_state._CACHE_KEEP_ATTR))
        for got, want in zip(getattr(cache, cache_state._CACHE_CONTEXT_ATTR),
                             getattr(fresh, cache_state._CACHE_CONTEXT_ATTR), strict=True):
            torch.testing.assert_close(got, want)
        nxt = ids[:, length:length + 1]
        torch.testing.assert_close(model(input_ids=nxt, **cache_kwargs(model, cache)).logits,
                                   model(input_ids=nxt, **cache_kwargs(model, fresh)).logits)

    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        model(input_ids=ids[:, :10], **cache_kwargs(model, cache))
        cache.crop(-4)
        same_as_prefilled(cache, 6)  # runs token 6 on the cache: 7 cached
        name = list(inspect.signature(type(cache).crop).parameters)[1]  # after self
        cache.crop(**{name: -3})  # 7 -> 4, before the last forward: by keyword
        same_as_prefilled(cache, 4)


def test_self_speculative_decoding_is_refused():
    from transformers import GenerationConfig

    model = _calibrated(_model())
    with pytest.raises(ValueError, match="assistant_early_exit: self-speculative decoding"):
        model.generate(_ids(1, 10), max_new_tokens=3, assistant_early_exit=2, **GREEDY)
    config = GenerationConfig(assistant_early_exit=2, max_new_tokens=3, **GREEDY)
    with pytest.raises(ValueError, match="assistant_early_exit: self-speculative decoding"):
        model.generate(_ids(1, 10), config)  # the config as the second positional argument


def test_chunked_prefill_equals_one_prefill_or_is_refused_on_transformers_4():
    """``prefill_chunk_size``: transformers 5 runs each chunk through the model (packed, on a
    filled cache from the second one on) and gives the tokens of one prefill; 4.x calls
    the model's forward without its hooks, so it is refused with the cause."""
    model = _calibrated(_model(prune_layers=(1, 4), sliding_window=5))
    ids = _ids(2, 17, seed=4)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    kw = dict(attention_mask=mask, max_new_tokens=8, **GREEDY)
    with torch.no_grad():
        if transformers_major() < 5:
            with pytest.raises(ValueError, match="prefill_chunk_size: transformers 4.x"):
                model.generate(ids, prefill_chunk_size=4, **kw)
            return
        want = model.generate(ids, **kw)
        for chunk in (2, 5):
            assert torch.equal(model.generate(ids, prefill_chunk_size=chunk, **kw), want), chunk


def test_a_cache_filled_outside_the_model_is_refused_with_cause_and_remedy():
    """A cache a plain base model filled is refused before any layer changes it: the keep
    flags and the saliency state cannot follow; the error names the cause and the remedy."""
    from datalora.hf_compat import cache_kwargs

    model = _calibrated(_model(prune_layers=(2, 4)))
    with torch.no_grad():
        foreign = DynamicCache(config=model.config)
        plain = MistralForCausalLM(model.base_model.config).eval()  # no DATALORA hooks
        plain(input_ids=_ids(1, 6), **cache_kwargs(plain, foreign))
        with pytest.raises(ValueError, match=r"holds 6 tokens in layer 0 but DATALORA recorded "
                                             r"the saliency context for 0: the cache was "
                                             r"filled or changed outside this DATALORA model"
                                             r".* empty cache or prefill"):
            model(input_ids=_ids(1, 1), **cache_kwargs(model, foreign))
    assert [foreign.get_seq_length(i) for i in range(4)] == [6, 6, 6, 6]  # left unchanged


def test_reset_cache_can_be_reused():
    model = _calibrated(_model(prune_layers=(1, 4)))
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        first = model(input_ids=_ids(1, 6), past_key_values=cache, use_cache=True).logits
        cache.reset()
        if cache.get_seq_length():
            pytest.skip("this transformers' DynamicCache.reset() zeroes the keys and values "
                        "but keeps their length (4.x): not reusable by a plain model either")
        again = model(input_ids=_ids(1, 6), past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(again, first)


def test_output_hidden_states_have_full_length_with_pruning():
    """Pruned layers' outputs come back at every position (pruned tokens: the bypass)."""
    model = _model(prune_layers=(1, 4))
    model.set_curriculum_state(retention=0.5)
    with torch.no_grad():
        out = model(input_ids=_ids(2, 10), output_hidden_states=True)
    assert model.runtime.last.mode == "packed"
    assert all(h.shape == (2, 10, 64) for h in out.hidden_states)


def test_output_hidden_states_hold_the_bypass_at_pruned_tokens():
    """Inside the pruned range the hidden states hold each layer's output at kept tokens and
    the bypass (the range's input) at pruned ones: the same with the cache (packed
    prefill, or masked) and without (packed), and for a row alone or beside a row that
    keeps every token."""
    from datalora.hf_compat import cache_kwargs

    model = _calibrated(_model(prune_layers=(1, 4)))
    ids = _ids(2, 10, seed=4)
    with torch.no_grad():
        scores = model.saliency(model.base_model.model.embed_tokens(ids)).token_scores
        model.saliency.keep_threshold.fill_(float(scores[0].min()) - 1e-3)  # row 0 keeps all
        packed = model(input_ids=ids, output_hidden_states=True).hidden_states
        kept = model.runtime.last.kept
        assert model.runtime.last.mode == "packed" and kept[0].all() and not kept[1].all()
        prefill = model(input_ids=ids, use_cache=True, output_hidden_states=True).hidden_states
        # transformers 4.x records hidden states by replacing the layers' forward for the
        # call, which leaves the DATALORA hooks the unpacked (masked) layers only
        assert model.runtime.last.mode == ("masked" if transformers_major() < 5 else "packed")
        masked = model(input_ids=ids, output_hidden_states=True, use_cache=True,
                       **cache_kwargs(model, _UnpackedCache(config=model.config))).hidden_states
        assert model.runtime.last.mode == "masked"
        alone = model(input_ids=ids[1:], output_hidden_states=True).hidden_states
    for i in (2, 3):  # outputs of layers 1, 2 (layer 3's is the final norm's)
        assert torch.equal(packed[i][~kept], packed[1][~kept])
    for a, b, c, d in zip(packed, masked, alone, prefill, strict=True):
        torch.testing.assert_close(b, a)
        torch.testing.assert_close(c[0], a[1])
        torch.testing.assert_close(d, a)


def test_a_token_scoring_exactly_the_threshold_is_pruned():
    """keep_threshold is the score a token must exceed: one scoring exactly it is pruned,
    in the packed forward and with the cache (packed prefill, or masked)."""
    from datalora.hf_compat import cache_kwargs

    model = _calibrated(_model(prune_layers=(1, 4)))
    ids = _ids(1, 10, seed=4)
    unpacked = cache_kwargs(model, _UnpackedCache(config=model.config))
    with torch.no_grad():
        scores = model.saliency(model.base_model.model.embed_tokens(ids)).token_scores[0]
        model.saliency.keep_threshold.fill_(scores.median())  # one token's own score
        for kw, mode in (({}, "packed"), ({"use_cache": True}, "packed"),
                         ({"use_cache": True, **unpacked}, "masked")):
            model(input_ids=ids, **kw)
            assert model.runtime.last.mode == mode
            assert torch.equal(model.runtime.last.kept[0], scores > scores.median()), kw


def test_padding_is_never_kept_packed_or_with_the_cache():
    model = _calibrated(_model(prune_layers=(1, 4)))
    ids = _ids(2, 10, seed=4)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        model.saliency.keep_threshold.fill_(-1e9)  # every real token scores above it
        for use_cache in (False, True):
            model(input_ids=ids, attention_mask=mask, use_cache=use_cache)
            assert torch.equal(model.runtime.last.kept, mask.bool()), use_cache
        model.set_curriculum_state(retention=1.0)  # dense: every real token, no padding
        with pytest.warns(UserWarning, match="turns pruning off"):  # once
            for use_cache in (False, True):
                model(input_ids=ids, attention_mask=mask, use_cache=use_cache)
                assert torch.equal(model.runtime.last.kept, mask.bool()), ("dense", use_cache)


def test_uncalibrated_generate_is_the_same_with_and_without_cache():
    """A fresh model (retention 0.5, no threshold) generates dense either way, with a
    warning, instead of top-k without the cache and dense with it."""
    model = _model(prune_layers=(1, 4))
    model.set_curriculum_state(retention=0.5)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = model.generate(_ids(2, 8), use_cache=True, max_new_tokens=8, **GREEDY)
        b = model.generate(_ids(2, 8), use_cache=False, max_new_tokens=8, **GREEDY)
    assert torch.equal(a, b)
    assert any("not calibrated" in str(w.message) for w in caught)
    assert model.runtime.retention == 0.5


def test_uncalibrated_base_model_generate_is_the_same_with_and_without_cache():
    """The hooks, not only DATALORAModel.generate, run an uncalibrated model dense when
    generating: ``base_model.generate`` (any tool holding the HF model) does not fall back
    to a per-sequence top-k without the cache. A plain eval forward still prunes (top-k)."""
    model = _model(prune_layers=(1, 4))
    model.set_curriculum_state(retention=0.5)
    with torch.no_grad(), pytest.warns(UserWarning, match="not calibrated"):
        a = model.base_model.generate(_ids(2, 8), use_cache=True, max_new_tokens=8, **GREEDY)
        b = model.base_model.generate(_ids(2, 8), use_cache=False, max_new_tokens=8, **GREEDY)
        assert model.runtime.last.mode == "dense"
        model(input_ids=_ids(2, 8))
    assert torch.equal(a, b)
    assert model.runtime.last.mode == "packed"


def test_generate_in_training_mode_warns_to_call_eval():
    """A model left in train() (say, generating from a Trainer callback) routes and selects
    with noise: generate() warns instead of returning random tokens silently."""
    model = _calibrated(_model(prune_layers=(1, 4)))
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.generate(_ids(1, 5), max_new_tokens=2, **GREEDY)
    assert not [w for w in caught if "training mode" in str(w.message)]
    model.train()
    with torch.no_grad(), pytest.warns(UserWarning, match=r"training mode.*model\.eval\(\)"):
        model.generate(_ids(1, 5), max_new_tokens=2, **GREEDY)


@pytest.mark.parametrize("training", [True, False])
def test_a_forward_names_ids_past_the_vocabulary(training):
    """The embedding's and the loss's IndexError ("index out of range in self", "Target
    ... is out of bounds") become a ValueError naming input_ids or labels; only a failing
    forward reads the ids (no host read per step)."""
    model = _model(prune_layers=(1, 4)).train(training)
    vocab = model.base_model.get_input_embeddings().num_embeddings
    ids = _ids(2, 6)
    labels = ids.clone()
    labels[:, 0] = -100
    assert torch.isfinite(model(input_ids=ids, labels=labels).loss)
    with pytest.raises(ValueError, match=rf"^input_ids: expected ids in \[0, {vocab}\) "
                                         rf"\(the model's vocabulary\), got {vocab + 1}$"):
        model(ids + vocab + 1 - ids.max())
    labels[1, 2] = vocab
    with pytest.raises(ValueError, match=rf"^labels: expected ids in \[0, {vocab}\) or -100 "
                                         rf"\(ignored\) \(the model's vocabulary\), got "
                                         rf"{vocab}$"):
        model(input_ids=ids, labels=labels)
    labels[1, 2] = -5
    with pytest.raises(ValueError, match=r"^labels: expected ids .*, got -5$"):
        model(input_ids=ids, labels=labels)


def test_generate_names_ids_it_cannot_embed_and_a_bad_num_beams():
    """transformers failed deep inside: float ids (embedding's dtype error), ids past the
    vocabulary (IndexError) and num_beams=0 (ZeroDivisionError)."""
    model = _calibrated(_model(prune_layers=(1, 4))).eval()
    vocab = model.base_model.get_input_embeddings().num_embeddings
    ids = _ids(1, 5)
    for bad, match in [(ids.float(), "input_ids: expected integer token ids"),
                       (ids + vocab, rf"input_ids: expected ids in \[0, {vocab}\)"),
                       (ids - 100, rf"expected ids in \[0, {vocab}\) .*, got -")]:
        with pytest.raises(ValueError, match=match):
            model.generate(bad, max_new_tokens=1, **GREEDY)
    with pytest.raises(ValueError, match="num_beams: expected an int >= 1, got 0"):
        model.generate(input_ids=ids, max_new_tokens=1, num_beams=0)
    assert model.generate(input_ids=ids, max_new_tokens=1, **GREEDY).shape == (1, 6)
    with pytest.raises(ValueError, match="input_ids: expected integer token ids"):
        model.generate(inputs=ids.float(), max_new_tokens=1, **GREEDY)  # transformers' name
    for beams in (torch.tensor(2), np.array([2])):  # passed on as the int they hold
        assert model.generate(ids, max_new_tokens=1, num_beams=beams, **GREEDY).shape == (1, 6)


def test_threshold_calibrated_for_another_retention_warns():
    model = _calibrated(_model(prune_layers=(1, 4)), 0.5)
    model.set_curriculum_state(retention=0.45)  # any other retention, however close
    with torch.no_grad(), pytest.warns(UserWarning, match="calibrated for retention 0.5"):
        model(input_ids=_ids(2, 10))
    _calibrated(model, 0.2)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        model(input_ids=_ids(2, 10))
    assert abs(model.runtime.last.actual_retention() - 0.2) < 0.15


def test_mask_sizes_reads_each_cache_class_signature_once(monkeypatch):
    """``get_mask_sizes(cache_position, layer_idx)`` (older transformers) gets the positions
    of this step, ``get_mask_sizes(query_length, layer_idx)`` the length; the signature is
    inspected once per cache class, not on every decode step."""
    import inspect

    from datalora.pruning import cache_state

    class PositionsCache:
        def get_mask_sizes(self, cache_position, layer_idx):
            return int(cache_position[-1]) + 1, int(cache_position[0])

    class LengthCache:
        def get_mask_sizes(self, query_length, layer_idx):
            return 100 + query_length, layer_idx

    calls = []
    real_signature = inspect.signature
    monkeypatch.setattr(inspect, "signature", lambda fn: calls.append(fn) or real_signature(fn))
    monkeypatch.setattr(cache_state, "_TAKES_POSITIONS", {})
    cpu = torch.device("cpu")
    for _ in range(3):
        assert cache_state._mask_sizes(PositionsCache(), 2, 0, 7, cpu) == (7, 5)
        assert cache_state._mask_sizes(LengthCache(), 2, 3, 7, cpu) == (102, 3)
    assert cache_state._mask_sizes(object(), 2, 0, 7, cpu) == (7, 0)
    assert len(calls) == 2


def _mixed_attention_model(types, window=4, prune_layers=(1, 4)):
    """A Qwen2 model whose layers mix full and sliding-window attention (``layer_types``)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=len(types), num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128,
                      use_sliding_window=True, sliding_window=window, layer_types=list(types),
                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return _datalora(Qwen2ForCausalLM, cfg, prune_layers)


def test_pruned_range_mixing_full_and_sliding_layers_gets_a_mask_per_layer_type():
    """Past the window, full-attention layers see every key and sliding ones the last
    window: with every token kept, the packed path (no cache) and the cached path (step by
    step) both equal the unpruned model, whose masks HF builds per layer type."""
    model = _mixed_attention_model(("full_attention", "sliding_attention", "full_attention",
                                    "sliding_attention"))
    ids = _ids(2, 13, seed=5)
    with torch.no_grad():
        model.set_curriculum_state(retention=1.0)
        dense = model(input_ids=ids).logits
        model.set_curriculum_state(retention=0.9999)  # ceil(0.9999 * 13) = 13: all kept
        packed = model(input_ids=ids).logits
        assert model.runtime.last.mode == "packed"
        torch.testing.assert_close(packed, dense, atol=1e-5, rtol=1e-5)
        model.set_curriculum_state(retention=1.0)
        steps = _stepwise_logits(model, ids, prefill=9)
    torch.testing.assert_close(steps, dense, atol=1e-5, rtol=1e-5)


def test_prune_range_over_an_unsupported_attention_kind_is_refused():
    from datalora.pruning import layer_window

    class Config:
        sliding_window = 8
        layer_types = ["chunked_attention", "full_attention", "sliding_attention"]

    assert layer_window(Config, 1) is None and layer_window(Config, 2) == 8
    with pytest.raises(ValueError, match="prune_layers: decoder layer 0 uses 'chunked_attention'"):
        layer_window(Config, 0)


def test_disabled_adapter_is_the_exact_base_model_also_with_pruning():
    """``set_adapter_enabled(False)`` promises the exact base model: with pruning on (a
    calibrated threshold, retention 0.5) the pruned layers must run dense too, on the
    packed (no cache) and the cached path, and in training mode."""
    from transformers import MistralConfig, MistralForCausalLM

    model = _calibrated(_model(prune_layers=(1, 4)))
    cfg = MistralConfig(vocab_size=97, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    plain = MistralForCausalLM(cfg).eval()  # the same weights _model wrapped
    ids = _ids(2, 12)
    with torch.no_grad():
        want = plain(input_ids=ids).logits
        pruned = model(input_ids=ids).logits
        model.set_adapter_enabled(False)
        for use_cache in (False, True):
            got = model(input_ids=ids, use_cache=use_cache).logits
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        model.train()
        torch.testing.assert_close(model(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
        model.eval()
        model.set_adapter_enabled(True)
        torch.testing.assert_close(model(input_ids=ids).logits, pruned, atol=0, rtol=0)
    assert not torch.allclose(pruned, want, atol=1e-3)


# ---- serving: cache row operations, pickling, threads (user review) -------------------------
def _next_logits(model, ids, cache):
    from datalora.hf_compat import cache_kwargs

    return model(input_ids=ids, use_cache=True, **cache_kwargs(model, cache)).logits[:, -1]


@pytest.mark.parametrize("operation, rows", [
    (lambda c: c.batch_select_indices(torch.tensor([1, 0])), [1, 0]),   # reorder
    (lambda c: c.batch_select_indices(torch.tensor([1])), [1]),          # drop a finished row
    (lambda c: c.batch_repeat_interleave(2), [0, 0, 1, 1]),              # share a prefix
])
def test_cache_row_operations_carry_the_pruning_state(operation, rows):
    """The cache's public batch-row operations move the keep flags and the saliency context
    with the K/V (only reorder_cache did: rows got each other's state silently)."""
    from datalora.hf_compat import cache_kwargs, output_cache

    model = _calibrated(_model(prune_layers=(1, 4)))
    prompt, step = _ids(2, 9), _ids(2, 1, seed=3)
    with torch.no_grad():
        cache = output_cache(model(input_ids=prompt, use_cache=True,
                                   **cache_kwargs(model, DynamicCache(config=model.config))))
        operation(cache)
        got = _next_logits(model, step[rows], cache)
        fresh = DynamicCache(config=model.config)
        _next_logits(model, prompt[rows], fresh)
        want = _next_logits(model, step[rows], fresh)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_filled_cache_pickles_with_its_pruning_state():
    import io
    import pickle

    from datalora.hf_compat import cache_kwargs, output_cache

    model = _calibrated(_model(prune_layers=(1, 4)))
    prompt, step = _ids(2, 9), _ids(2, 1, seed=3)
    with torch.no_grad():
        cache = output_cache(model(input_ids=prompt, use_cache=True,
                                   **cache_kwargs(model, DynamicCache(config=model.config))))
        buffer = io.BytesIO()
        pickle.dump(cache, buffer)
        restored = pickle.loads(buffer.getvalue())
        torch.testing.assert_close(_next_logits(model, step, restored),
                                   _next_logits(model, step, cache))
        restored.reorder_cache(torch.tensor([1, 0]))  # follows the restored cache, not cache
        assert torch.equal(restored._datalora_keep, cache._datalora_keep[[1, 0]])


def test_generate_from_threads_equals_sequential():
    """Each thread's forward has its own context (one per model was overwritten by the
    other threads: misleading errors, or one request using another's routing)."""
    from concurrent.futures import ThreadPoolExecutor

    model = _calibrated(_model(prune_layers=(1, 4)))
    prompts = [_ids(1, 5 + i, seed=i) for i in range(6)]
    with torch.no_grad():
        want = [model.generate(p, max_new_tokens=5, **GREEDY) for p in prompts]

        def run(p):
            with torch.no_grad():
                return model.generate(p, max_new_tokens=5, **GREEDY)

        with ThreadPoolExecutor(3) as pool:
            got = list(pool.map(run, prompts))
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


def test_a_filled_cache_is_freed_without_the_cycle_collector():
    """The row-operation wrappers stored on a cache held it strongly (a reference cycle):
    every cache generate() filled lived on until Python's cyclic collector ran."""
    import gc
    import weakref

    from datalora.hf_compat import cache_kwargs, output_cache

    model = _calibrated(_model(prune_layers=(1, 4)))
    refs = []
    gc.disable()
    try:
        with torch.no_grad():
            for seed in range(3):
                empty = cache_kwargs(model, DynamicCache(config=model.config))
                cache = output_cache(model(input_ids=_ids(2, 6, seed=seed), use_cache=True,
                                           **empty))
                del empty
                assert hasattr(cache, "_datalora_keep")
                refs.append(weakref.ref(cache))
                del cache
        assert all(ref() is None for ref in refs)
    finally:
        gc.enable()


@pytest.mark.parametrize("routing", ["shared", "per_layer"])
def test_a_deleted_model_is_freed_without_the_cycle_collector(routing):
    """The pruning runtime held the model and its decoder layers while their hooks held
    the runtime: a deleted shared-routing model (its GPU memory) lived on until Python's
    cyclic collector ran; a per-layer one was freed at once."""
    import gc
    import weakref

    from datalora import DATALORAConfig, get_datalora_model
    from datalora.testing import build_tiny_model

    gc.collect()
    gc.disable()
    try:
        base = build_tiny_model(seed=0)
        model = get_datalora_model(base, DATALORAConfig(
            num_lora_experts=4, lora_rank=4, routing=routing), verbose=False).train()
        if routing == "shared":
            model.set_curriculum_state(tau=1.0, retention=0.5, hard=False)
        ids = _ids(2, 8, seed=0)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        model.eval()
        with torch.no_grad():
            model.generate(_ids(1, 5, seed=1), max_new_tokens=3, do_sample=False,
                           pad_token_id=0, eos_token_id=None)
        refs = [weakref.ref(base), weakref.ref(model.base_model.model.layers[0])]
        del base, model, out
        assert [ref() is None for ref in refs] == [True, True]
    finally:
        gc.enable()


def test_a_model_whose_layer_list_was_replaced_still_copies_and_pickles():
    """The runtime held the layer list weakly: a model whose ModuleList was replaced by one
    holding the same layers (the hooks stay on the layers) failed to deepcopy / pickle
    ("cannot create weak reference to 'NoneType' object")."""
    import copy
    import io

    model = _model(prune_layers=(1, 4))
    base = model.base_model
    base.model.layers = torch.nn.ModuleList(list(base.model.layers))
    ids = _ids(2, 6, seed=0)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        assert torch.equal(copy.deepcopy(model)(input_ids=ids).logits, want)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        assert torch.equal(loaded(input_ids=ids).logits, want)
    assert model.runtime.layers is base.model.layers


def test_each_thread_gets_the_aux_losses_of_its_own_forward():
    """A training forward's aux losses came from the runtime's latest forward of any
    thread: a forward run meanwhile in another thread gave its losses."""
    import threading

    model = _model(prune_layers=(1, 4)).train()
    model.set_curriculum_state(tau=1.0, retention=0.5, hard=False)
    torch.manual_seed(0)
    model(input_ids=_ids(2, 8, seed=1))
    mine = model.aux_losses()
    other = threading.Thread(target=lambda: model(input_ids=_ids(3, 12, seed=2)))
    other.start()
    other.join()
    assert model.runtime.last is not model.runtime.own_last  # the other thread's is latest
    for name, value in model.aux_losses().items():
        assert torch.equal(value, mine[name]), name


def test_flex_attention_and_packed_masks_are_refused_by_name():
    """Flex attention adds a tensor mask to the scores, so the pruned layers' bool mask
    masked nothing: refused like flash attention, also when the model switches to it after
    it was wrapped (the runtime kept the implementation it was built under: the pruned
    forward then corrupted the heap). A 4-D mask (continuous batching) is refused naming
    the cause."""
    model = _calibrated(_model(prune_layers=(1, 4)))
    model.base_model.config._attn_implementation = "flex_attention"
    with torch.no_grad(), pytest.raises(ValueError, match="not 'flex_attention'"):
        model(input_ids=_ids(2, 8))
    model.base_model.config._attn_implementation = "sdpa"
    with torch.no_grad(), pytest.raises(ValueError, match="continuous batching"):
        model(input_ids=_ids(1, 4), attention_mask=torch.ones(1, 1, 4, 4, dtype=torch.bool))


def test_retention_one_with_a_lower_calibration_warns_that_pruning_is_off():
    model = _calibrated(_model(prune_layers=(1, 4)), 0.5)
    model.set_curriculum_state(retention=1.0)
    with torch.no_grad(), pytest.warns(UserWarning, match="turns pruning off"):
        model.generate(_ids(1, 6), max_new_tokens=2, **GREEDY)
    assert model.runtime.last.actual_retention() == 1.0


def test_cache_row_selection_by_bool_mask_and_slice():
    from datalora.pruning.cache_state import _each_tensor, _select_rows

    value = (torch.arange(6).view(3, 2), torch.arange(3))
    mask = torch.tensor([False, True, True])
    picked = _each_tensor(value, _select_rows, mask)
    assert torch.equal(picked[0], value[0][1:]) and torch.equal(picked[1], value[1][1:])
    assert torch.equal(_each_tensor(value, _select_rows, slice(0, 2))[1], value[1][:2])
    assert torch.equal(_each_tensor(value, _select_rows, [2, 0])[1], torch.tensor([2, 0]))


def _count_layer_runs(model, monkeypatch):
    """``runs[i]``: how often decoder layer ``i``'s own forward ran."""
    from datalora.pruning import find_decoder_layers

    layers = find_decoder_layers(model.base_model)
    runs = [0] * len(layers)
    cls = type(layers[0])
    original = cls.forward

    def counted(self, *args, **kwargs):
        runs[next(i for i, layer in enumerate(layers) if layer is self)] += 1
        return original(self, *args, **kwargs)
    monkeypatch.setattr(cls, "forward", counted)
    return runs


def _skipping_off(monkeypatch):
    from datalora.pruning import DATALORARuntime

    monkeypatch.setattr(DATALORARuntime, "_skippable", lambda self, ctx, cache, bsz: False)


@pytest.mark.parametrize("sliding_window", [None, 3])
@pytest.mark.parametrize("batch", [1, 2])
def test_cached_steps_with_every_row_pruned_skip_the_pruned_layers(sliding_window, batch,
                                                                   monkeypatch):
    """A cached step whose every row is pruned appends placeholder keys / values to the
    pruned layers' caches instead of running them (their output is the bypass, their keys
    masked from every later query): the logits equal those of the layers run, bit for bit,
    the caches stay aligned, and the pruned layers run fewer times."""
    model = _calibrated(_model(prune_layers=(1, 3), sliding_window=sliding_window))
    ids = _ids(batch, 14, seed=3)
    runs = _count_layer_runs(model, monkeypatch)
    with torch.no_grad():
        skipped = _stepwise_logits(model, ids, prefill=4)
        skipped_runs = list(runs)
        _skipping_off(monkeypatch)
        runs[:] = [0] * len(runs)
        ran = _stepwise_logits(model, ids, prefill=4)
    assert torch.equal(skipped, ran)
    steps = ids.shape[1] - 4 + 1
    assert runs == [steps] * 4  # every layer ran every step without skipping
    assert skipped_runs[0] == skipped_runs[3] == steps  # outside the range: every step
    assert skipped_runs[1] == skipped_runs[2] < steps  # some steps skipped the range


def test_skipped_steps_keep_generate_and_the_cache_consistent(monkeypatch):
    """generate() with the skipping equals generate() with the layers run (greedy and beam
    search), and every layer's cache holds every position."""
    from datalora.hf_compat import cache_kwargs

    model = _calibrated(_model(prune_layers=(1, 4)))
    kw = dict(max_new_tokens=10, **GREEDY)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        greedy = model.generate(_ids(1, 6), **cache_kwargs(model, cache), **kw)
        beams = model.generate(_ids(2, 6), num_beams=3, num_return_sequences=3, **kw)
        assert {cache.get_seq_length(i) for i in range(4)} == {greedy.shape[1] - 1}
        _skipping_off(monkeypatch)
        assert torch.equal(greedy, model.generate(_ids(1, 6), **kw))
        assert torch.equal(beams, model.generate(_ids(2, 6), num_beams=3,
                                                 num_return_sequences=3, **kw))


def test_no_step_skips_when_attention_maps_are_returned(monkeypatch):
    """A skipped layer computes no attention map: with ``output_attentions`` every pruned
    layer runs every step."""
    from datalora.hf_compat import cache_kwargs

    model = _calibrated(_model(prune_layers=(1, 3)))
    model.base_model.config._attn_implementation = "eager"
    runs = _count_layer_runs(model, monkeypatch)
    ids = _ids(1, 10, seed=3)
    for attentions in (False, True):
        runs[:] = [0] * 4
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=ids[:, :4], use_cache=True, **cache_kwargs(model, cache))
            for t in range(4, 10):
                out = model(input_ids=ids[:, t:t + 1], use_cache=True,
                            output_attentions=attentions, **cache_kwargs(model, cache))
                if attentions:
                    assert all(a is not None for a in out.attentions)
        assert (runs == [7] * 4) == attentions  # without the maps, some steps skip


def test_the_skippable_forwards_last_one_cached_forward():
    """The pruned range's layers carry the skipping forward only during a cached forward
    (and a DataParallel replica's own layers would get their own)."""
    from datalora.hf_compat import cache_kwargs
    from datalora.pruning import find_decoder_layers
    from datalora.pruning.runtime import _SkippableForward

    model = _calibrated(_model(prune_layers=(1, 3)))
    layers = find_decoder_layers(model.base_model)
    seen = []
    hook = layers[2].register_forward_pre_hook(
        lambda layer, args: seen.append(isinstance(layer.__dict__.get("forward"),
                                                   _SkippableForward)))
    with torch.no_grad():
        model(input_ids=_ids(1, 5), use_cache=True,
              **cache_kwargs(model, DynamicCache(config=model.config)))
        model(input_ids=_ids(1, 5))
    hook.remove()
    assert seen == [True, False]
    assert not any("forward" in layer.__dict__ for layer in layers)


def test_overlapping_cached_forwards_keep_the_skippable_forwards_until_the_last_ends():
    """Two cached forwards in flight at once (two threads): the first to end took the
    pruned layers' skipping forward from the other, and two ends could race on one
    ``del`` (KeyError in the always-called finish hook). Each forward is counted in and
    out; the last one out removes them."""
    from datalora.pruning import find_decoder_layers
    from datalora.pruning.runtime import _Context, _SkippableForward

    model = _calibrated(_model(prune_layers=(1, 3)))
    runtime = model.runtime
    layers = find_decoder_layers(model.base_model)
    first, second = (_Context(attention_mask=None, cache="new") for _ in range(2))
    runtime._put_skippable_forwards(first, runtime.model)
    installed = [layers[i].__dict__["forward"] for i in (1, 2)]
    runtime._put_skippable_forwards(second, runtime.model)
    assert [layers[i].__dict__["forward"] for i in (1, 2)] == installed  # shared
    assert second.skippable_layers == [layers[1], layers[2]]
    runtime._remove_skippable_forwards(first)
    assert [layers[i].__dict__.get("forward") for i in (1, 2)] == installed
    runtime._remove_skippable_forwards(second)
    assert not any("forward" in layer.__dict__ for layer in layers)
    assert len(runtime._skippable_users) == 0
    stale = _SkippableForward(runtime, layers[1])  # left by a forward that never ended
    layers[1].forward = stale
    runtime._put_skippable_forwards(first, runtime.model)
    assert layers[1].__dict__["forward"] is not stale
    runtime._remove_skippable_forwards(first)
    assert "forward" not in layers[1].__dict__


def test_a_cached_forward_interrupted_by_ctrl_c_stops_counting_once_dropped():
    """torch skips always_call hooks on a KeyboardInterrupt: the interrupted forward never
    counted itself out, so its skipping forwards stayed on the layers for good and the
    runtime held the layers (a model deleted later waited for the cyclic collector)."""
    import gc
    import weakref

    from datalora.pruning import find_decoder_layers

    model = _calibrated(_model(prune_layers=(1, 3)))
    layers = find_decoder_layers(model.base_model)
    greedy = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    calls = []

    def interrupt(layer, args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    hook = layers[0].register_forward_pre_hook(interrupt)
    with torch.no_grad(), pytest.raises(KeyboardInterrupt):
        model.generate(_ids(1, 5), max_new_tokens=6, **greedy)
    hook.remove()
    assert all("forward" in layers[i].__dict__ for i in (1, 2))  # left by the interrupt
    with torch.no_grad():
        model.generate(_ids(1, 5), max_new_tokens=4, **greedy)
    assert not any("forward" in layer.__dict__ for layer in layers)
    assert len(model.runtime._skippable_users) == 0
    gc.collect()
    gc.disable()
    try:
        refs = [weakref.ref(model), weakref.ref(layers[1]), weakref.ref(model.runtime)]
        del model, layers
        assert [ref() is None for ref in refs] == [True, True, True]
    finally:
        gc.enable()


def _replicate(module):
    """What ``nn.parallel.replicate`` does to each module (a shallow copy of its
    ``__dict__``), without devices: the replica shares the parameters."""
    replica = module._replicate_for_data_parallel()
    replica._parameters = dict(module._parameters)  # replicate sets each device's copies
    for name, child in module._modules.items():
        replica._modules[name] = None if child is None else _replicate(child)
    return replica


def test_a_replicas_layers_drop_the_skipping_forward_copied_from_the_original():
    """A DataParallel replica made while another thread's cached forward runs copies the
    original layers' skipping forward, bound to the original layers: a plain forward of
    the replica ran those (on another device in a real replica)."""
    from datalora.pruning import find_decoder_layers
    from datalora.pruning.runtime import _Context

    model = _calibrated(_model(prune_layers=(1, 3)))
    runtime = model.runtime
    other = _Context(attention_mask=None, cache="new")
    runtime._put_skippable_forwards(other, runtime.model)  # another thread's forward
    replica = _replicate(runtime.model)
    originals = find_decoder_layers(runtime.model)
    copies = find_decoder_layers(replica)
    assert all(copies[i].__dict__["forward"]._layer() is originals[i] for i in (1, 2))
    ids = _ids(2, 6, seed=2)
    with torch.no_grad():
        got = replica(input_ids=ids).logits
    assert not any("forward" in layer.__dict__ for layer in copies)
    assert all("forward" in originals[i].__dict__ for i in (1, 2))  # the other's stay
    runtime._remove_skippable_forwards(other)
    with torch.no_grad():
        torch.testing.assert_close(got, model(input_ids=ids).logits)


def test_threads_generating_at_once_get_the_sequential_answers():
    """Greedy generation (batch-1 steps skip the pruned layers; a padded batch of 2),
    cached and plain forwards from three threads at once, interleaved often: each result
    is the one it has alone, no call fails, and no layer keeps a skipping forward."""
    import sys
    import threading

    from datalora.pruning import find_decoder_layers

    model = _calibrated(_model(prune_layers=(1, 3)))
    greedy = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    jobs = []
    for i in range(3):
        prompt, batch = _ids(1, 4 + i, seed=10 + i), _ids(2, 7, seed=20 + i)
        mask = torch.ones_like(batch)
        mask[1, :i + 1] = 0  # left padding
        jobs += [lambda p=prompt: model.generate(p, max_new_tokens=8, **greedy),
                 lambda b=batch, m=mask: model.generate(b, attention_mask=m, max_new_tokens=5,
                                                        **greedy),
                 lambda b=batch: model(input_ids=b, use_cache=True).logits,
                 lambda b=batch: model(input_ids=b).logits]
    with torch.no_grad():
        want = [job() for job in jobs]
    got, errors = {}, []

    def work(first):
        try:
            with torch.no_grad():
                for _ in range(2):
                    for i in range(first, len(jobs), 3):
                        got.setdefault(i, []).append(jobs[i]())
        except Exception as exc:  # reported below: a thread's exception is not raised
            errors.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    finally:
        sys.setswitchinterval(interval)
    assert errors == [] and not any(thread.is_alive() for thread in threads)
    for i, results in got.items():
        for result in results:
            if result.dtype == torch.long:
                assert torch.equal(result, want[i]), i
            else:
                torch.testing.assert_close(result, want[i], rtol=1e-5, atol=1e-5)
    assert sorted(got) == list(range(len(jobs)))
    assert not any("forward" in layer.__dict__
                   for layer in find_decoder_layers(model.base_model))


@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_a_model_copied_while_a_cached_forward_runs_is_bound_to_its_own_layers(how,
                                                                              monkeypatch):
    """A copy taken while another thread's cached forward ran: pickling failed on the
    skipping forward's weak reference, and a deep copy's pruned layers called the original
    model's layers (a plain forward of the copy then raised). The copy's skipping forwards
    are bound to its own layers and runtime, run them, and go with its first cached
    forward."""
    import copy
    import io

    from datalora.hf_compat import cache_kwargs
    from datalora.pruning import find_decoder_layers
    from datalora.pruning.runtime import DATALORARuntime, _SkippableForward

    model = _calibrated(_model(prune_layers=(1, 3)))
    copies = []
    skip_or_run = DATALORARuntime._skip_or_run

    def copy_first(self, layer, *args, **kwargs):
        if not copies:  # mid-forward: the skipping forwards are on the layers
            if how == "deepcopy":
                copies.append(copy.deepcopy(model))
            else:
                buffer = io.BytesIO()
                torch.save(model, buffer)
                buffer.seek(0)
                copies.append(torch.load(buffer, weights_only=False))
        return skip_or_run(self, layer, *args, **kwargs)

    monkeypatch.setattr(DATALORARuntime, "_skip_or_run", copy_first)
    ids = _ids(2, 7, seed=4)
    with torch.no_grad():
        model(input_ids=_ids(1, 5), use_cache=True,
              **cache_kwargs(model, DynamicCache(config=model.config)))
        copied = copies[0]
        layers = find_decoder_layers(copied.base_model)
        for i in (1, 2):
            stale = layers[i].__dict__["forward"]
            assert isinstance(stale, _SkippableForward)
            assert stale._layer() is layers[i] and stale.runtime is copied.runtime
        assert torch.equal(copied(input_ids=ids).logits, model(input_ids=ids).logits)
        copied(input_ids=_ids(1, 5), use_cache=True,
               **cache_kwargs(copied, DynamicCache(config=copied.config)))
    assert not any("forward" in layer.__dict__ for layer in layers)


def test_a_hook_changing_a_skipped_layers_output_in_place_changes_only_it(monkeypatch):
    """A skipped layer returns a copy of its input: a forward hook editing a pruned layer's
    output in place (activation patching) leaves the bypass as it was, as when the layers
    run."""
    from datalora.pruning import find_decoder_layers

    model = _calibrated(_model(prune_layers=(1, 3)))
    layers = find_decoder_layers(model.base_model)
    layers[1].register_forward_hook(lambda layer, args, out: out.add_(1.0))
    ids = _ids(1, 12, seed=3)
    with torch.no_grad():
        skipped = _stepwise_logits(model, ids, prefill=4)
        _skipping_off(monkeypatch)
        ran = _stepwise_logits(model, ids, prefill=4)
    assert torch.equal(skipped, ran)


def test_a_skipped_layers_molora_layers_record_no_routing(monkeypatch):
    """The MoLoRA layers of a skipped decoder layer did not run: their ``last_routing`` is
    None rather than an earlier step's."""
    from datalora.hf_compat import cache_kwargs
    from datalora.pruning import find_decoder_layers

    model = _calibrated(_model(prune_layers=(1, 3)))
    runs = _count_layer_runs(model, monkeypatch)
    inner = [m for m in find_decoder_layers(model.base_model)[2].modules()
             if hasattr(m, "last_routing")]
    ids = _ids(1, 14, seed=3)
    cache = DynamicCache(config=model.config)
    records = []
    with torch.no_grad():
        model(input_ids=ids[:, :4], use_cache=True, **cache_kwargs(model, cache))
        for t in range(4, 14):
            before = runs[2]
            model(input_ids=ids[:, t:t + 1], use_cache=True, **cache_kwargs(model, cache))
            records.append((runs[2] > before, {m.last_routing is None for m in inner}))
    assert {ran for ran, _ in records} == {True, False}  # some steps skipped, some ran
    assert all(nones == {not ran} for ran, nones in records)


def _tokens_seen_by(layer):
    """A list that gets the token count of every forward of ``layer`` (an adapted layer)."""
    seen = []
    layer.register_forward_pre_hook(lambda module, args: seen.append(args[0][..., 0].numel()))
    return seen


def _cache_tensors(cache, layers=range(4)):
    return [(cache.layers[i].keys.clone(), cache.layers[i].values.clone()) for i in layers]


@pytest.mark.parametrize("sliding_window", [None, 4])
def test_a_cached_prefill_runs_the_pruned_layers_on_the_kept_tokens(sliding_window):
    """A cached forward of several tokens (the prompt, a chunk of it) runs the pruned layers
    on its kept tokens only: their keys / values reach the cache at their positions, zeros
    at pruned ones (masked from every query); the logits, the keep flags, the cache of the
    layers outside the range and of the kept positions equal those of the unpacked
    (masked) forward, a second chunk on the filled cache likewise, and so do the next
    steps' logits."""
    from datalora.hf_compat import cache_kwargs
    from datalora.pruning import cache_state

    model = _calibrated(_model(prune_layers=(1, 3), sliding_window=sliding_window))
    ids = _ids(2, 14, seed=17)  # rows keep 3 and 5 of the first chunk, 1 and 2 of the second
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    seen = _tokens_seen_by(model.base_model.model.layers[1].self_attn.q_proj)
    results = {}
    with torch.no_grad():
        for name, cache in (("packed", DynamicCache(config=model.config)),
                            ("masked", _UnpackedCache(config=model.config))):
            kw = cache_kwargs(model, cache)
            first = model(input_ids=ids[:, :8], attention_mask=mask[:, :8], use_cache=True, **kw)
            kept_first = model.runtime.last.kept.clone()
            assert model.runtime.last.mode == name
            second = model(input_ids=ids[:, 8:12], attention_mask=mask[:, :12], use_cache=True,
                           **kw)
            kept_second = model.runtime.last.kept.clone()
            step = model(input_ids=ids[:, 12:13], attention_mask=mask[:, :13], use_cache=True,
                         **kw)
            step_runs = [2] if model.runtime.last.kept.any() else []  # else skipped
            results[name] = dict(logits=torch.cat([first.logits, second.logits, step.logits], 1),
                                 keep=getattr(cache, cache_state._CACHE_KEEP_ATTR).clone(),
                                 tensors=_cache_tensors(cache), tokens=list(seen))
            seen.clear()
    packed, masked = results["packed"], results["masked"]
    kept = torch.cat([kept_first, kept_second], 1)
    assert kept_second.any(1).all() and not kept[mask[:, :12].bool()].all()
    torch.testing.assert_close(packed["logits"], masked["logits"], atol=1e-5, rtol=1e-5)
    assert torch.equal(packed["keep"], masked["keep"])
    # the unpacked forwards run every token; the packed ones as many as a row keeps at most
    assert masked["tokens"] == [2 * 8, 2 * 4, 2]
    widths = [int(kept_first.sum(1).max()), int(kept_second.sum(1).max())]
    assert packed["tokens"] == [2 * widths[0], 2 * widths[1], *step_runs] and widths == [5, 2]
    for layer in range(4):
        for got, want in zip(packed["tensors"][layer], masked["tensors"][layer], strict=True):
            if layer in (1, 2):  # pruned: the kept positions' keys / values, zeros elsewhere
                positions = got.shape[2] - 1  # the chunks' last ones (a window holds fewer)
                flags = kept[:, kept.shape[1] - positions:]
                got, want = got[:, :, :positions], want[:, :, :positions]
                assert not got.transpose(1, 2)[~flags].any()
                got, want = got.transpose(1, 2)[flags], want.transpose(1, 2)[flags]
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_generation_with_a_packed_prefill_equals_the_unpacked_and_the_uncached():
    """Greedy and beam search from a pruned prompt: the packed prefill gives the tokens of the
    unpacked (masked) prefill and of generating without a cache, for a batch with padding."""
    from datalora.hf_compat import cache_kwargs

    model = _calibrated(_model(prune_layers=(1, 4)))
    ids = _ids(2, 12, seed=8)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    with torch.no_grad():
        for kw in (dict(max_new_tokens=8, **GREEDY),
                   dict(max_new_tokens=6, num_beams=3, num_return_sequences=3, **GREEDY)):
            packed = model.generate(ids, attention_mask=mask, **kw)
            unpacked = model.generate(ids, attention_mask=mask, **kw, **cache_kwargs(
                model, _UnpackedCache(config=model.config)))
            uncached = model.generate(ids, attention_mask=mask, use_cache=False, **kw)
            assert torch.equal(packed, unpacked) and torch.equal(packed, uncached), kw


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_packed_prefill_on_the_gpu_equals_the_unpacked(dtype):
    """On the GPU (the Triton backend, sdpa kernels): the packed prefill's logits and the
    next step's equal the unpacked path's within the dtype's rounding."""
    from datalora.hf_compat import cache_kwargs

    model = _calibrated(_model(prune_layers=(1, 4))).to("cuda", dtype)
    ids = _ids(2, 24, seed=17).cuda()
    logits = {}
    with torch.no_grad():
        for name, cache in (("packed", DynamicCache(config=model.config)),
                            ("masked", _UnpackedCache(config=model.config))):
            kw = cache_kwargs(model, cache)
            first = model(input_ids=ids[:, :20], use_cache=True, **kw).logits
            assert model.runtime.last.mode == name
            kept = model.runtime.last.kept
            step = model(input_ids=ids[:, 20:21], use_cache=True, **kw).logits
            logits[name] = torch.cat([first, step], 1).float()
    assert kept.any() and not kept.all()
    scale = float(logits["masked"].abs().max())
    atol = 1e-4 * scale if dtype == torch.float32 else 3e-2 * scale
    torch.testing.assert_close(logits["packed"], logits["masked"], atol=atol, rtol=0)
