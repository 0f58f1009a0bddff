"""Token pruning: selection, packed layer range == layers on the kept subsequence, bypass,
scorer gradients, retention 1.0, and cached generation with pruning."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from datalora import DATALORAConfig, Routing, get_datalora_model
from datalora.hf_compat import cache_kwargs, output_cache
from datalora.pruning import (
    compiled_width_fraction,
    keep_count,
    packed_attention_mask,
    resolve_prune_range,
    select_tokens,
)
from datalora.saliency import gather_routing


def tiny_model(attn="sdpa", layers=4, seed=0, sliding_window=None):
    cfg = MistralConfig(vocab_size=97, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=128, sliding_window=sliding_window,
                        pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg._attn_implementation = attn
    torch.manual_seed(seed)
    return MistralForCausalLM(cfg).eval()


def datalora_model(attn="sdpa", prune_layers=(1, 3), randomize=True, **kw):
    config = DATALORAConfig(num_lora_experts=4, lora_rank=4, num_active_experts=2,
                            routing="shared", prune_layers=list(prune_layers), **kw)
    model = get_datalora_model(tiny_model(attn), config, verbose=False)
    if randomize:  # non-zero adapters and scores, so routing and selection matter
        with torch.no_grad():
            for _, layer in model.molora_layers():
                layer.lora_B.normal_(std=0.05)
            model.saliency.score_head.weight.normal_(std=1.0)
            model.saliency.router_head.weight.normal_(std=1.0)
    return model.eval()


def batch(B=3, L=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 97, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 8:] = 0   # right padding (training collator)
    mask[2, 5:] = 0
    ids[mask == 0] = 0
    return ids, mask


@pytest.mark.parametrize("retention", [0.5, 0.3, 0.25, 1 / 3, 0.9, 1.0])
@pytest.mark.parametrize("noise", [False, True])
def test_select_tokens_counts_padding_last(retention, noise):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 10, generator=g)
    mask = torch.ones(4, 10, dtype=torch.long)
    mask[1, 7:] = 0     # right padding
    mask[2, :4] = 0     # left padding
    mask[3, 1:] = 0     # a single real token
    sel = select_tokens(scores, retention, mask, noise=noise, tau=2.0, generator=g)
    n = mask.sum(1)
    assert sel.keep_idx.shape == (4, math.ceil(round(retention * 10, 9)))
    assert torch.equal(sel.counts, torch.tensor([math.ceil(round(retention * int(x), 9))
                                                 for x in n]))
    kept = sel.keep_mask(10)
    assert torch.equal(kept.sum(1), sel.counts)            # exactly ceil(r * n_b)
    assert not (kept & (mask == 0)).any()                  # padding never kept
    last = torch.tensor([9, 6, 9, 0])
    assert kept[torch.arange(4), last].all()               # last real token kept
    assert (sel.keep_idx.diff(dim=1) > 0).all()            # ascending, distinct
    if not noise:  # the other kept tokens are the best scores
        for b in range(4):
            others = [i for i in range(10) if mask[b, i] and i != last[b]]
            want = sorted(sorted(others, key=lambda i: -scores[b, i])[:int(sel.counts[b]) - 1])
            got = sorted(i for i in kept[b].nonzero().flatten().tolist() if i != last[b])
            assert got == want


def test_keep_count_no_float_roundup():
    assert keep_count(10, 0.3) == 3 and keep_count(10, 0.7) == 7 and keep_count(7, 0.5) == 4
    assert torch.equal(keep_count(torch.tensor([10, 3, 0]), 0.3), torch.tensor([3, 1, 0]))
    # 25 * 0.28 is 7.000000000000001 in doubles (10 * 0.3 is exactly 3.0): ceil gave 8
    assert 25 * 0.28 > 7 and keep_count(25, 0.28) == 7
    assert torch.equal(keep_count(torch.tensor([25, 50, 75]), 0.28), torch.tensor([7, 14, 21]))
    sel = select_tokens(torch.zeros(1, 25), 0.28)
    assert sel.counts.tolist() == [7] and sel.keep_idx.shape == (1, 7)


def test_a_tiny_retention_still_keeps_the_last_real_token():
    """ceil(retention * n) >= 1 for any retention > 0: the 1e-9 guard against float
    round-up must not round a tiny retention down to 0 kept tokens."""
    assert keep_count(6, 1e-12) == 1 and keep_count(0, 1e-12) == 0
    assert torch.equal(keep_count(torch.tensor([6, 1, 0]), 1e-12), torch.tensor([1, 1, 0]))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 3:] = 0
    sel = select_tokens(torch.randn(2, 6), 1e-12, mask)
    assert sel.counts.tolist() == [1, 1]
    assert sel.keep_mask(6).int().tolist() == [[0, 0, 0, 0, 0, 1], [0, 0, 1, 0, 0, 0]]


def test_select_tokens_validation():
    with pytest.raises(ValueError, match="retention"):
        select_tokens(torch.zeros(2, 3), 0.0)
    with pytest.raises(ValueError, match="attention_mask"):
        select_tokens(torch.zeros(2, 3), 0.5, torch.ones(2, 4))
    with pytest.raises(ValueError, match="scores"):
        select_tokens(torch.zeros(3), 0.5)


def test_packed_mask_is_causal_over_original_positions():
    idx = torch.tensor([[0, 2, 5, 6]])
    ok = torch.tensor([[True, True, False, True]])
    m = packed_attention_mask(ok, idx, idx, torch.float32, as_bool=True)[0, 0]
    expected = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 1]]).bool()
    assert torch.equal(m, expected)  # never a later key; a filler key hidden; own row kept
    w = packed_attention_mask(ok, idx, idx, torch.float32, as_bool=True, sliding_window=3)
    assert not w[0, 0, 3, 1] and w[0, 0, 3, 3]  # 6 - 2 >= 3: outside the window
    run = torch.tensor([[3, 4, 5, 6]])                # the window's edge: 6 sees 4..6, not 3
    edge = packed_attention_mask(torch.ones(1, 4, dtype=torch.bool), run, run, torch.float32,
                                 as_bool=True, sliding_window=3)
    assert edge[0, 0, 3].tolist() == [False, True, True, True]
    add = packed_attention_mask(ok, idx, idx, torch.float16, as_bool=False)
    assert add.dtype == torch.float16 and add[0, 0, 0, 1] == torch.finfo(torch.float16).min


def capture_range(model):
    """Hooks recording the hidden entering the pruned range and the one leaving it."""
    rt = model.runtime
    seen = {}
    h1 = rt.layers[rt.start].register_forward_pre_hook(
        lambda m, a, k: seen.__setitem__("in", (a[0] if a else k["hidden_states"]).clone()),
        with_kwargs=True, prepend=True)
    h2 = rt.layers[rt.end - 1].register_forward_hook(
        lambda m, a, out: seen.__setitem__("out", out.clone()))
    h3 = rt.layers[rt.start].register_forward_pre_hook(
        lambda m, a, k: seen.__setitem__("kw", k), with_kwargs=True)
    return seen, (h1, h2, h3)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("retention", [0.5, 0.3])
def test_pruned_range_equals_layers_on_kept_subsequence(attn, retention):
    model = datalora_model(attn)
    rt = model.runtime
    model.set_curriculum_state(retention=retention)
    ids, mask = batch()
    seen, handles = capture_range(model)
    model(input_ids=ids, attention_mask=mask)
    for h in handles:
        h.remove()
    record = rt.last
    hidden_in, hidden_out = seen["in"], seen["out"]
    n = mask.sum(1)
    assert record.mode == "packed"
    assert torch.equal(record.kept.sum(1), keep_count(n, retention))
    pruned = ~record.kept
    assert torch.equal(hidden_out[pruned], hidden_in[pruned])  # bypass is exact
    assert not torch.equal(hidden_out[record.kept], hidden_in[record.kept])
    # reference: each sequence's kept tokens alone through the layers, plain causal mask
    ref_model = datalora_model("sdpa")  # same seed and weights, sdpa: mask None = causal
    ref_model.load_state_dict(model.state_dict())
    inner = ref_model.base_model.model
    L = ids.shape[1]
    for b in range(ids.shape[0]):
        pos = record.kept[b].nonzero().flatten()
        h = hidden_in[b:b + 1, pos]
        position_ids = pos[None]
        emb = inner.rotary_emb(h, position_ids)
        full_idx = pos[None].expand(ids.shape[0], -1)
        rows = gather_routing(record.routing, full_idx, L)
        k = pos.numel()
        sub = type(rows)(expert_ids=rows.expert_ids[b * k:(b + 1) * k],
                         gates=rows.gates[b * k:(b + 1) * k],
                         rank_scale=rows.rank_scale[b * k:(b + 1) * k])
        with ref_model.runtime.routing_scope(sub), torch.no_grad():
            for layer in inner.layers[rt.start:rt.end]:
                h = layer(h, attention_mask=None, position_ids=position_ids,
                          position_embeddings=emb)
        torch.testing.assert_close(hidden_out[b, pos], h[0], atol=2e-5, rtol=1e-5)
    # the packed layers got the original position ids of the kept tokens
    packed_pos = seen["kw"]["position_ids"]
    for b in range(ids.shape[0]):
        kept_pos = record.kept[b].nonzero().flatten()
        assert torch.equal(packed_pos[b][torch.isin(packed_pos[b], kept_pos)], kept_pos)


def test_scorer_and_router_get_gradient_through_pruned_range():
    model = datalora_model().train()
    model.set_curriculum_state(retention=0.5, tau=1.0, hard=False)
    ids, mask = batch()
    labels = ids.masked_fill(mask == 0, -100)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert model.runtime.last.mode == "packed"
    out.loss.backward()  # the LM loss alone, no retention loss
    sal = model.saliency
    assert sal.score_head.weight.grad.abs().sum() > 0
    assert sal.router_head.weight.grad.abs().sum() > 0
    assert sal.rank_head.weight.grad.abs().sum() > 0
    for _, layer in model.molora_layers():
        assert layer.lora_A.grad is not None


def test_retention_one_is_the_unpruned_model():
    model = datalora_model()
    ids, mask = batch()
    model.set_curriculum_state(retention=1.0)
    dense = model(input_ids=ids, attention_mask=mask).logits
    assert model.runtime.last.mode == "dense"
    # every real token kept through the packed path gives the same function
    model.set_curriculum_state(retention=0.9999)
    packed = model(input_ids=ids, attention_mask=mask).logits
    assert model.runtime.last.mode == "packed"
    assert torch.equal(model.runtime.last.kept, mask.bool())
    valid = mask.bool()
    torch.testing.assert_close(packed[valid], dense[valid], atol=2e-5, rtol=1e-5)
    # a fresh adapter at retention 1.0 is exactly the base model
    fresh = datalora_model(randomize=False)
    fresh.set_curriculum_state(retention=1.0)
    base = tiny_model()
    torch.testing.assert_close(fresh(input_ids=ids, attention_mask=mask).logits,
                               base(input_ids=ids, attention_mask=mask).logits, atol=0, rtol=0)


def test_pruning_changes_the_output_and_pruned_tokens_cost_nothing_in_range():
    model = datalora_model()
    ids, mask = batch()
    model.set_curriculum_state(retention=1.0)
    dense = model(input_ids=ids, attention_mask=mask).logits
    model.set_curriculum_state(retention=0.5)
    seen, handles = capture_range(model)
    pruned = model(input_ids=ids, attention_mask=mask).logits
    for h in handles:
        h.remove()
    assert not torch.allclose(dense, pruned, atol=1e-3)
    assert seen["kw"]["attention_mask"].shape[-1] == math.ceil(0.5 * ids.shape[1])


def calibrated_model(retention=0.5):
    model = datalora_model(attn="sdpa", prune_layers=(1, 4),
                           target_modules=["q_proj", "v_proj", "down_proj"])
    model.set_curriculum_state(retention=retention)
    ids, mask = batch(B=4, L=16, seed=5)
    model(input_ids=ids, attention_mask=mask)
    rec = model.runtime.last
    model.runtime.calibrate(rec.saliency.token_scores, rec.valid)
    return model


def test_a_compiled_calibrated_forward_does_not_recompile_per_call():
    """The per-forward memo of gathered per-token inputs was keyed by id(): dynamo guarded
    on the position_ids object, which every forward makes anew, so each call recompiled
    (seconds each with Inductor) until the recompile limit sent the frame to eager."""
    from torch._dynamo.utils import counters

    model = calibrated_model(0.5)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    ids, mask = batch(B=3, L=12, seed=3)
    graphs = []
    with torch.no_grad():
        for _ in range(4):
            out = compiled(input_ids=ids, attention_mask=mask)
            graphs.append(counters["stats"]["unique_graphs"])
        torch.testing.assert_close(out.logits, model(input_ids=ids, attention_mask=mask).logits)
    torch._dynamo.reset()
    assert graphs[1:] == [graphs[1]] * 3, graphs


def test_compiled_width_fraction_rounds_up_to_the_grid_towards_the_target():
    f = compiled_width_fraction
    assert [f(r, 0.5) for r in (1.0, 0.99, 0.875, 0.76, 0.75, 0.51, 0.5)] == [
        1.0, 1.0, 0.875, 0.875, 0.75, 0.625, 0.5]
    assert f(0.31, 0.3) == pytest.approx(0.475)  # the grid starts at the target
    # grid points computed a hair below the retention they equal are accepted as it
    scores = torch.zeros(2, 20)
    for retention, target in ((0.65, 0.3), (0.8250000000000001, 0.3)):
        assert f(retention, target) < retention
        sel = select_tokens(scores, retention, width_fraction=f(retention, target))
        assert sel.keep_idx.shape[1] == keep_count(20, retention)
    assert f(0.4, 0.5) == 0.4 and f(0.9, None) == 0.9 and f(0.7, 1.0) == 0.7
    with pytest.raises(ValueError, match="retention"):
        f(0.0, 0.5)


@pytest.mark.parametrize("noise", [False, True])
def test_a_wider_packed_batch_keeps_the_same_tokens(noise):
    scores = torch.randn(3, 11, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, :3] = 0

    def select(**kw):
        return select_tokens(scores, 0.4, mask, noise=noise, tau=0.7,
                             generator=torch.Generator().manual_seed(1), **kw)

    exact, wide = select(), select(width_fraction=0.75)
    assert exact.keep_idx.shape == (3, 5) and wide.keep_idx.shape == (3, 9)
    assert torch.equal(wide.counts, exact.counts)
    assert torch.equal(wide.valid.sum(1), exact.counts)
    assert torch.equal(wide.keep_mask(11), exact.keep_mask(11))
    with pytest.raises(ValueError, match="width_fraction"):
        select_tokens(scores, 0.5, width_fraction=0.4)


def test_tied_scores_keep_the_same_tokens_at_any_width():
    """topk picks any of tied keys (a wider packed batch kept other tokens): a stable sort
    keeps the earliest."""
    scores = torch.randint(0, 3, (6, 13), generator=torch.Generator().manual_seed(2)).float()
    exact = select_tokens(scores, 0.3)
    for width in (0.5, 0.7, 1.0):
        wide = select_tokens(scores, 0.3, width_fraction=width)
        assert torch.equal(wide.keep_mask(13), exact.keep_mask(13)), width
    # the earliest of tied tokens: row of equal scores keeps its first tokens (and the last)
    flat = select_tokens(torch.zeros(1, 10), 0.3)
    assert flat.keep_idx[0].tolist() == [0, 1, 9]


def test_a_wider_packed_batch_gives_the_same_loss_and_gradients(monkeypatch):
    """Eager mode packs exactly; the compiled path's wider batch (filler slots) computes the
    same function: forced here in eager mode to compare gradients."""
    from datalora.pruning import runtime

    model = datalora_model(target_retention=0.5).train()
    model.set_curriculum_state(retention=0.6, tau=0.7)
    ids, mask = batch(B=3, L=12, seed=7)
    widths = []
    exact_select = runtime.select_tokens

    def run():
        torch.manual_seed(0)
        model.zero_grad()
        out = model(input_ids=ids, attention_mask=mask, labels=ids)
        (out.loss + out.retention_loss + out.balance_loss).backward()
        return [out.loss.detach()] + [p.grad.clone() for p in model.parameters()
                                      if p.grad is not None]

    def spy(*args, **kw):
        widths.append(kw["width_fraction"])
        return exact_select(*args, **kw)

    monkeypatch.setattr(runtime, "select_tokens", spy)
    want = run()
    assert widths == [None]  # eager: the exact width
    monkeypatch.setattr(runtime, "select_tokens",
                        lambda *a, **kw: exact_select(*a, **{**kw, "width_fraction": 1.0}))
    got = run()
    assert model.runtime.last.mode == "packed"
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_the_runtime_takes_the_configs_target_retention():
    model = datalora_model(target_retention=0.3)
    assert model.runtime.target_retention == 0.3
    model.set_curriculum_state(retention=0.5)
    assert model.runtime._compiled_width == pytest.approx(0.65)  # grid 0.3, 0.475, 0.65
    model.runtime.target_retention = None
    assert model.runtime._compiled_width == 0.5
    # a runtime pickled before the grid existed
    state = model.runtime.__getstate__()
    del state["_target_retention"], state["_compiled_width"]
    old = type(model.runtime).__new__(type(model.runtime))
    old.__setstate__(state)
    assert old.target_retention is None and old._compiled_width == 0.5
    with pytest.raises(ValueError, match="target_retention"):
        model.runtime.target_retention = 1.5


def test_annealing_the_retention_recompiles_only_at_the_width_grid():
    """The packed width is a shape, so dynamo (with AOT autograd, as Inductor) specialized
    the retention it came from: a curriculum annealing it every step recompiled every step
    until the recompile limit sent the rest of training to eager. The width now follows
    the grid towards the target; each row still keeps ceil(retention * n) tokens."""
    from torch._dynamo.utils import counters

    model = datalora_model(target_retention=0.5).train()
    ids, mask = batch(B=3, L=12, seed=4)
    torch._dynamo.reset()

    def forward(i, m):
        return model(input_ids=i, attention_mask=m, labels=i).loss

    compiled = torch.compile(forward, backend="aot_eager", fullgraph=True)
    graphs = []
    with torch.no_grad():
        # grid 0.5 / 0.625 / 0.75 / 0.875 / 1: widths 12, 12, 12, 11, 11
        for retention in (0.95, 0.9, 0.88, 0.8, 0.77):
            model.set_curriculum_state(tau=4 * retention, retention=retention)
            torch.manual_seed(0)
            got = compiled(ids, mask)
            assert model.runtime.last.mode == "packed"
            kept = model.runtime.last.kept.sum(1)
            torch.manual_seed(0)
            torch.testing.assert_close(got, forward(ids, mask))
            assert torch.equal(kept, model.runtime.last.kept.sum(1))
            assert torch.equal(kept, keep_count(mask.sum(1), retention))
            graphs.append(counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    # the first compile specializes every float; then one graph per grid step
    assert graphs[2] == graphs[1] and graphs[4] == graphs[3] == graphs[1] + 1, graphs


def test_a_compiled_pruned_training_forward_traces_without_warnings(monkeypatch):
    """The decoder layer's parameter names came from a functools.cache'd function called in
    the forward: dynamo traced through the cache and warned of "silent incorrectness" on
    every compiled pruned model. They are read when the hooks are installed."""
    import warnings

    model = datalora_model().train()
    model.set_curriculum_state(retention=0.5, tau=0.5, hard=True)
    ids, mask = batch(B=3, L=12, seed=4)
    torch._dynamo.reset()
    # dynamo gives each of its own warnings once per process: an earlier compile in this
    # process would otherwise have used it up
    monkeypatch.setattr(torch._dynamo.utils, "warn_once_cache", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = torch.compile(lambda i, m: model(input_ids=i, attention_mask=m,
                                                    labels=i).loss,
                                 backend="eager", fullgraph=True)
        compiled(ids, mask)
    torch._dynamo.reset()
    assert model.runtime.last.mode == "packed"
    assert not [str(w.message) for w in caught if "torch" in w.filename], [
        str(w.message) for w in caught]


def test_the_runtime_warnings_reach_a_fullgraph_compile():
    """The runtime warned with warnings.warn, which dynamo cannot trace: a compiled training
    forward given use_cache=True failed under fullgraph=True instead of saying that pruning
    runs it without the cache."""
    from datalora.ops.backends import _warn_once

    _warn_once.cache_clear()
    model = datalora_model().train()
    model.set_curriculum_state(retention=0.5, tau=0.5, hard=True)
    ids, mask = batch(B=3, L=12, seed=4)
    torch._dynamo.reset()
    compiled = torch.compile(lambda i, m: model(input_ids=i, attention_mask=m, labels=i,
                                                use_cache=True).loss,
                             backend="eager", fullgraph=True)
    with pytest.warns(UserWarning, match="use_cache=True in a training forward"):
        loss = compiled(ids, mask)
    torch._dynamo.reset()
    _warn_once.cache_clear()
    assert torch.isfinite(loss) and model.runtime.last.mode == "packed"


def test_threshold_mode_is_causal_and_calibrated():
    model = calibrated_model(0.5)
    ids, mask = batch(B=4, L=16, seed=5)
    model(input_ids=ids, attention_mask=mask)
    assert abs(model.runtime.last.actual_retention() - 0.5) < 0.1
    a = model(input_ids=ids[:1]).logits
    changed = ids[:1].clone()
    changed[0, 10:] = (changed[0, 10:] + 7) % 90 + 3
    b = model(input_ids=changed).logits
    torch.testing.assert_close(a[:, :10], b[:, :10], atol=1e-6, rtol=0)  # no peeking ahead
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_score_tokens_stops_before_the_decoder_and_cleans_up():
    model = calibrated_model(0.5)
    ids, mask = batch(B=3, L=12, seed=3)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask)
        want = model.runtime.last.saliency.token_scores
        ran = []
        hook = model.runtime.layers[0].register_forward_hook(lambda *a: ran.append(1))
        record = model.runtime.score_tokens(lambda: model(input_ids=ids, attention_mask=mask))
        hook.remove()
        assert ran == [] and torch.equal(record.saliency.token_scores, want)
        assert torch.equal(record.valid, mask.bool())
        # no hook or context left behind: the next forward is whole and the same
        torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits,
                                   full.logits, atol=0, rtol=0)
        with pytest.raises(RuntimeError, match="score_tokens: the forward ended without "
                                               "reaching decoder layer 0"):
            model.runtime.score_tokens(lambda: None)
        # another thread's forward meanwhile runs whole (the stop is this thread's)
        other = {}

        def scored_while_another_thread_runs():
            thread = threading.Thread(target=lambda: other.update(
                out=model(input_ids=ids, attention_mask=mask)))
            thread.start()
            thread.join()
            return model(input_ids=ids, attention_mask=mask)

        model.runtime.score_tokens(scored_while_another_thread_runs)
        torch.testing.assert_close(other["out"].logits, full.logits, atol=0, rtol=0)
        with pytest.raises(ValueError, match="attention_mask"):  # the forward's own errors
            model.runtime.score_tokens(lambda: model(input_ids=ids, attention_mask=mask[:, None]))
        assert model(input_ids=ids, attention_mask=mask).logits.shape == full.logits.shape


@pytest.mark.parametrize("n, retention", [(25, 0.5), (24, 0.5), (101, 0.3), (7, 0.99)])
def test_calibrated_threshold_keeps_the_quantiles_count_halfway_between_scores(n, retention):
    """As many calibration tokens are kept as with torch.quantile's threshold, but the
    threshold lies halfway between two scores: the quantile was often a calibration score
    itself ((n - 1)(1 - retention) an integer), and that token flipped between the cached
    and uncached paths when generating from the calibration prompts."""
    model = datalora_model()
    scores = torch.randn(n, generator=torch.Generator().manual_seed(n))
    value = model.runtime.calibrate(scores, retention=retention)
    assert float(model.saliency.keep_threshold) == pytest.approx(value, abs=1e-6)
    quantile = torch.quantile(scores, 1 - retention)
    assert int((scores > value).sum()) == int((scores > quantile).sum())
    below, above = scores[scores < value].max(), scores[scores > value].min()
    torch.testing.assert_close(torch.tensor(value), (below + above) / 2)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_calibrate_refuses_non_finite_scores(bad):
    """NaN ranked above every score (3 of 7 finite scores kept at retention 0.5), -inf in
    the bracket gave a NaN threshold (read as "not calibrated" right after calibrating),
    +inf one that keeps nothing."""
    model = datalora_model()
    scores = torch.tensor([0.0, 1, 2, 3, 4, 5, 6, bad])
    with pytest.raises(ValueError, match=r"scores: expected finite values, got 1 NaN or inf "
                                         r"of 8"):
        model.runtime.calibrate(scores, retention=0.5)
    assert math.isnan(float(model.saliency.keep_threshold))
    valid = torch.ones(8, dtype=torch.bool)
    valid[-1] = False  # a padded token's score is not read
    assert model.runtime.calibrate(scores, valid, retention=0.5) == 3.5


@pytest.mark.parametrize("scores, retention, kept, warns", [
    ([1.0, 1, 1, 1], 0.5, 4, True),             # all tied: keep all rather than none
    ([1.0, 1, 1, 1], 0.25, 4, True),
    ([0.0, 1, 1, 1, 1, 1, 5], 0.3, 1, True),     # the tie lies below the target count
    ([0.0, 1, 1, 1, 1, 1, 5], 0.75, 6, False),   # 6 of 7 is within a token of 0.75
    ([0.0, 1, 2, 2, 3, 4, 5, 6], 0.5, 4, False),  # a tie off the bracket: the quantile's
])
def test_tied_scores_calibrate_to_the_count_nearest_the_retention(scores, retention, kept,
                                                                  warns):
    """Tied bracketing scores put the threshold on the tie, and the strict comparison
    pruned every tied token: equal scores (an untrained score head) kept 0 % at retention
    0.5, silently."""
    import warnings

    model = datalora_model()
    scores = torch.tensor(scores)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = model.runtime.calibrate(scores, retention=retention)
    assert int((scores > value).sum()) == kept
    assert not (scores == value).any()
    assert any("scores are tied" in str(w.message) for w in caught) == warns


def test_threshold_selection_keeps_every_token_above_it_in_million_token_rows():
    """The kept tokens were ordered by ``keep - position * 1e-6``: past 1e6 positions a
    pruned token outranked a kept one, which fell out of the packed batch."""
    model = datalora_model()
    length = 1_100_000
    scores = torch.full((1, length), -1.0)
    scores[0, -2:] = 1.0
    scores[0, 5] = 1.0
    selection = model.runtime._threshold_selection(scores, torch.ones(1, length, dtype=torch.bool),
                                                   0.0)
    assert selection.keep_idx.tolist() == [[5, length - 2, length - 1]]
    assert selection.valid.all() and selection.counts.tolist() == [3]


def test_a_threshold_between_adjacent_fp32_scores_does_not_round_onto_one():
    """The midpoint was a Python float; stored in the fp32 buffer it could round onto the
    upper score, which the strict comparison then pruned (0 of 8 kept for 0.75)."""
    import warnings

    model = datalora_model()
    below = float(torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)))
    scores = torch.tensor([below] * 2 + [1.0] * 6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        value = model.runtime.calibrate(scores, retention=0.75)
    stored = model.saliency.keep_threshold
    assert float(stored) == value
    assert int((scores > stored).sum()) == 6


def test_calibrate_takes_more_scores_than_torch_quantile_does():
    """torch.quantile refuses more than 2**24 elements (16.7 M tokens: a few hundred batches
    of long sequences)."""
    model = datalora_model()
    big = torch.randn((1 << 24) + 1, generator=torch.Generator().manual_seed(1))
    value = model.runtime.calibrate(big, retention=0.5)
    assert abs(value) < 1e-3 and float(model.saliency.keep_threshold) == pytest.approx(value)


@pytest.mark.parametrize("retention", [1.5, 0.0, -0.2, float("nan"), "0.5"])
def test_calibrate_refuses_a_retention_outside_0_1(retention):
    """A retention above 1 or NaN calibrated to -inf (every token kept) and 0 to the maximum
    score (none kept), silently; -0.2 failed inside torch.quantile."""
    model = datalora_model()
    with pytest.raises(ValueError, match=r"retention: expected a finite number in \(0, 1\]"):
        model.runtime.calibrate(torch.randn(50), retention=retention)
    assert math.isnan(float(model.saliency.keep_threshold))


def test_generation_with_pruning_and_kv_cache_equals_no_cache():
    model = calibrated_model(0.5)
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(11))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # row 1 left-padded (generation), row 0 not
    ids[1, :3] = 0
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
              eos_token_id=None)
    with_cache = model.generate(ids, use_cache=True, **kw)
    assert model.runtime.last.mode == "masked"
    no_cache = model.generate(ids, use_cache=False, **kw)
    assert model.runtime.last.mode == "packed"
    assert torch.equal(with_cache, no_cache)
    # logits of the whole sequence: prefill + one-token steps vs one uncached forward
    full = with_cache
    fmask = torch.cat([mask, torch.ones(2, full.shape[1] - ids.shape[1], dtype=mask.dtype)], 1)
    ref = model(input_ids=full, attention_mask=fmask).logits
    assert (~model.runtime.last.kept & fmask.bool()).any()  # tokens really pruned
    out = model(input_ids=full[:, :9], attention_mask=fmask[:, :9], use_cache=True)
    steps = [out.logits]
    cache = output_cache(out)
    for t in range(9, full.shape[1]):
        out = model(input_ids=full[:, t:t + 1], attention_mask=fmask[:, :t + 1],
                    use_cache=True, **cache_kwargs(model, cache))
        steps.append(out.logits)
    cached = torch.cat(steps, 1)
    valid = fmask.bool()
    torch.testing.assert_close(cached[valid], ref[valid], atol=2e-5, rtol=1e-5)


def test_a_training_forward_with_use_cache_still_prunes():
    """use_cache=True in a training forward took the cache path, which decides by the
    (uncalibrated) threshold: every token ran through the pruned layers, silently dense."""
    model = datalora_model().train()
    model.set_curriculum_state(retention=0.5)
    ids, mask = batch()
    with pytest.warns(UserWarning, match="use_cache=True in a training forward"):
        loss = model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=True).loss
    assert model.runtime.last.mode == "packed"
    assert (~model.runtime.last.kept & mask.bool()).any()  # tokens really pruned
    loss.backward()
    assert model.saliency.score_head.weight.grad is not None
    with torch.no_grad():  # a no-grad prefill (manual decoding) keeps its cache
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
    assert output_cache(out) is not None and model.runtime.last.mode == "masked"


def test_bad_prune_range():
    with pytest.raises(ValueError, match="prune_layers"):
        datalora_model(prune_layers=(2, 9))
    for empty in ([2, 2], [3, 1]):
        with pytest.raises(ValueError, match=r"^prune_layers: expected \[start, end\)"):
            resolve_prune_range(empty, 4)


def test_default_prune_range_is_the_second_half():
    """Odd layer counts give the extra layer to the pruned half (the later layers)."""
    assert [resolve_prune_range(None, n) for n in (1, 4, 5, 32)] == [
        (0, 1), (2, 4), (2, 5), (16, 32)]


def test_gradient_checkpointing_is_rejected():
    model = datalora_model().train()
    base = model.base_model  # transformers >= 5.2x renamed gradient_ -> activation_checkpointing
    enable = (getattr(base, "activation_checkpointing_enable", None)
              or base.gradient_checkpointing_enable)
    enable()
    ids, mask = batch()
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        model(input_ids=ids, attention_mask=mask)


def test_parts_of_a_shared_routing_model_called_on_their_own_are_named():
    """A shared-routing model's adapted layer or decoder called outside the causal LM's
    forward has no routing: a RuntimeError saying so; an adapted layer given other tokens
    than the forward's (a hook calling it on a slice) a ValueError naming the counts; and
    calibrating on no valid score a ValueError (not a NaN threshold)."""
    model = datalora_model()
    ids, mask = batch()
    q_proj = model.base_model.model.layers[0].self_attn.q_proj
    with pytest.raises(RuntimeError, match="called outside a DATALORA model forward"):
        q_proj(torch.randn(2, 5, 64))
    assert torch.equal(q_proj(torch.zeros(2, 64), Routing(torch.zeros(2, 2, dtype=torch.long),
                                                           torch.ones(2, 2))),
                       q_proj.base_layer(torch.zeros(2, 64)))  # its own routing: runs
    with pytest.raises(RuntimeError, match="decoder was called outside the causal LM"):
        model.base_model.model(input_ids=ids, attention_mask=mask)
    handle = model.base_model.model.layers[0].mlp.register_forward_pre_hook(
        lambda module, args: q_proj(args[0][:, :1]) and None)
    with pytest.raises(ValueError, match=r"routing: the shared routing covers 33 tokens but "
                                         r"this layer got 3"):
        model(input_ids=ids, attention_mask=mask)
    handle.remove()
    model(input_ids=ids, attention_mask=mask)  # the failed forward left nothing behind
    with pytest.raises(ValueError, match="scores: no valid token scores to calibrate on"):
        model.runtime.calibrate(torch.rand(2, 3), torch.zeros(2, 3, dtype=torch.bool))
    assert math.isnan(float(model.saliency.keep_threshold))


def test_eval_uses_the_threshold_however_it_was_written():
    """The threshold is read once per forward, so writes that bypass the version counter
    (``.data.fill_``) are seen too."""
    model = datalora_model()
    model.set_curriculum_state(retention=0.5)
    ids, mask = batch()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
        model.runtime.calibrate(model.runtime.last.saliency.token_scores, mask.bool())
        model(input_ids=ids, attention_mask=mask)
        kept_calibrated = model.runtime.last.kept.sum()
        model.saliency.keep_threshold.data.fill_(1e9)  # keeps nothing above it
        model(input_ids=ids, attention_mask=mask)
    assert model.runtime.last.kept.sum() == 0 < kept_calibrated


def test_compiled_uncalibrated_eval_with_captured_scalars_keeps_like_eager():
    """With capture_scalar_outputs the keep threshold is a traced symbolic float, whose NaN
    test ``t == t`` folded to True: an uncalibrated eval forward pruned every token."""
    torch._dynamo.reset()
    model = datalora_model(prune_layers=(1, 3)).eval()
    ids, mask = batch()

    def forward(ids, mask):
        return model(input_ids=ids, attention_mask=mask).logits

    with torch.no_grad(), torch._dynamo.config.patch(capture_scalar_outputs=True):
        want = forward(ids, mask)
        kept = model.runtime.last.kept.sum(1)
        got = torch.compile(forward, backend="aot_eager")(ids, mask)
    assert torch.equal(model.runtime.last.kept.sum(1), kept)
    torch.testing.assert_close(got, want)
    torch._dynamo.reset()


def test_keep_score_gets_the_mixture_of_depths_gradient():
    """The keep weight ``1 + p - stopgrad(p)`` gives each kept token's keep probability the
    gradient ``dL/dp = g . (f(h) - h)`` (g: the gradient at the range's output, h: the
    range's input, f(h) - h: the update the range's output carries, exactly as w = 1 in the
    forward) and the pruned tokens none."""
    model = datalora_model().train()
    model.set_curriculum_state(retention=0.5, tau=1.0, hard=False)
    rt = model.runtime
    seen = {}
    h1 = rt.layers[rt.start].register_forward_pre_hook(
        lambda m, a, k: seen.__setitem__("h", (a[0] if a else k["hidden_states"]).detach()),
        with_kwargs=True, prepend=True)

    def after(m, a, out):  # after the runtime's merge: the range's [B, L, d] output
        full = out[0] if isinstance(out, tuple) else out
        full.retain_grad()
        seen["full"] = full

    h2 = rt.layers[rt.end - 1].register_forward_hook(after)
    ids, mask = batch()
    labels = ids.masked_fill(mask == 0, -100)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    h1.remove()
    h2.remove()
    record = rt.last
    assert record.mode == "packed"
    record.keep_prob.retain_grad()
    out.loss.backward()  # the LM loss alone
    full, h = seen["full"], seen["h"]
    kept = record.kept
    want = torch.where(kept, (full.grad * (full.detach() - h)).sum(-1), 0.0)
    assert (want != 0).sum() >= kept.sum() - ids.shape[0]  # all but the last tokens (no label)
    torch.testing.assert_close(record.keep_prob.grad, want, atol=1e-7, rtol=1e-4)


def test_noisy_selection_samples_tokens_by_softmax_of_scores_over_tau():
    """Gumbel top-k: keeping one of three tokens (no forced last token), token i is kept with
    probability ``softmax(scores / tau)_i``."""
    logits = torch.tensor([0.0, 1.0, 2.0])
    g = torch.Generator().manual_seed(0)
    sel = select_tokens(logits.expand(20000, 3), 1 / 3, tau=2.0, noise=True, keep_last=False,
                        generator=g)
    freq = sel.keep_mask(3).float().mean(0)
    torch.testing.assert_close(freq, torch.softmax(logits / 2.0, 0), atol=0.015, rtol=0)


def test_calibrate_keeps_the_retention_of_the_valid_scores():
    """The threshold keeps retention of the valid scores (11.2 is their 0.8 quantile, moved
    halfway to the next score: 11.5); padded scores (here huge) take no part."""
    model = datalora_model()
    scores = torch.arange(20.0).reshape(2, 10)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[1, 5:] = False
    scores[1, 5:] = 1e6
    value = model.runtime.calibrate(scores, valid, retention=0.2)  # valid: 0 .. 14
    assert value == 11.5
    assert (scores[valid] > value).sum() == 3 == 0.2 * 15
    assert float(model.saliency.keep_threshold) == 11.5


def test_training_output_carries_the_aux_losses_of_the_real_tokens():
    """``retention_loss`` is (mean keep probability over the real tokens - the runtime's
    current retention)^2 and ``balance_loss`` Switch's ``E * sum_e f_e P_e`` over the real
    tokens' routes, written out here; padding takes no part."""
    model = datalora_model().train()
    model.set_curriculum_state(retention=0.7, tau=1.0, hard=False)
    ids, mask = batch()
    out = model(input_ids=ids, attention_mask=mask)
    record = model.runtime.last
    valid = mask.bool()
    assert torch.equal(record.valid, valid)
    p = torch.sigmoid(record.saliency.token_scores)
    torch.testing.assert_close(out.retention_loss, (p[valid].mean() - 0.7) ** 2)
    routing = record.routing
    real = valid.reshape(-1)
    probs, expert_ids = routing.router_probs[real], routing.expert_ids[real]
    f = torch.zeros(4).index_add_(0, expert_ids.reshape(-1), torch.ones(expert_ids.numel()))
    f = f / expert_ids.numel()
    torch.testing.assert_close(out.balance_loss, 4 * (f * probs.mean(0)).sum())
    model.eval()  # only training outputs carry them
    assert getattr(model(input_ids=ids, attention_mask=mask), "retention_loss", None) is None


def test_disable_adapter_restores_a_switched_off_pruning():
    """disable_adapter() gives back the previous settings: pruning switched off with the
    adapters stays off after the block."""
    model = datalora_model()
    model.set_adapter_enabled(False)
    assert not model.runtime.pruning_enabled
    with model.disable_adapter():
        pass
    assert not model.runtime.pruning_enabled
    model.set_adapter_enabled(True)
    with model.disable_adapter():
        assert not model.runtime.pruning_enabled
    assert model.runtime.pruning_enabled


def test_an_eval_forward_selects_without_noise():
    """Uncalibrated eval forwards (no generate) keep each sequence's top-k scores, with no
    Gumbel noise: the same input keeps the same tokens and gives the same logits."""
    model = datalora_model()
    model.set_curriculum_state(retention=0.5)
    ids, mask = batch()
    with torch.no_grad():
        first = model(input_ids=ids, attention_mask=mask).logits
        kept = model.runtime.last.kept
        want = select_tokens(model.runtime.last.saliency.token_scores, 0.5, mask).keep_mask(
            ids.shape[1])
        for _ in range(3):
            assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, first)
            assert torch.equal(model.runtime.last.kept, kept)
    assert torch.equal(kept, want)


@pytest.mark.parametrize("prune_layers", [(1, 4), (1, 3)])
def test_a_pruned_training_step_builds_each_routings_tables_once(prune_layers, monkeypatch):
    """Full-length and packed routings alternate over a pruned step (full, packed, [full,]
    then back in the backward): the routing cache keeps both, one gate matrix build each."""
    from datalora.ops import torch_backend
    from datalora.ops.eager import RoutingCache

    builds = []
    build = torch_backend._gate_matrix
    monkeypatch.setattr(torch_backend, "_gate_matrix", lambda *a: builds.append(1) or build(*a))
    monkeypatch.setattr(torch_backend, "_tables_cache", RoutingCache())
    model = datalora_model(prune_layers=prune_layers, backend="torch").train()
    model.set_curriculum_state(tau=1.0, retention=0.5, hard=False)
    ids, mask = batch()
    out = model(input_ids=ids, attention_mask=mask, labels=ids)
    out.loss.backward()
    assert len(builds) == 2
