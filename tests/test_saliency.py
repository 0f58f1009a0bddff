"""UnifiedSaliencyNetwork shapes/ranges/gradients, Gumbel top-k, losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from datalora.losses import balance_loss, retention_loss
from datalora.routing import Routing
from datalora.saliency import UnifiedSaliencyNetwork, gather_routing, gumbel_topk


@pytest.mark.parametrize("B,L,E,r,k", [
    (2, 7, 8, 16, 2),   # card defaults, odd L
    (1, 1, 3, 1, 3),    # single token, k = E, rank 1 (SMoRA-like)
    (3, 5, 5, 4, 1),    # top-1, prime E
])
def test_usn_shapes_ranges_and_gradients(B, L, E, r, k):
    usn = UnifiedSaliencyNetwork(24, E, r, k, saliency_hidden_size=16, temperature=2.0).train()
    hidden = torch.randn(B, L, 24, dtype=torch.float64).to(torch.bfloat16).requires_grad_()
    out = usn(hidden)
    T = B * L
    assert out.token_scores.shape == (B, L) and out.token_scores.dtype == torch.float32
    assert out.router_logits.shape == (B, L, E)
    assert out.rank_scale.shape == (B, L, r)
    assert ((out.rank_scale > 0) & (out.rank_scale <= 1)).all()
    rt = out.routing
    assert rt.expert_ids.shape == (T, k) and rt.expert_ids.dtype == torch.int64
    assert rt.gates.shape == (T, k) and rt.rank_scale.shape == (T, r)
    assert rt.router_probs.shape == (T, E)
    torch.testing.assert_close(rt.gates.sum(-1), torch.ones(T))
    assert (rt.expert_ids.sort(-1).values.diff(dim=-1) > 0).all()  # distinct experts
    loss = (out.token_scores.sum() + (rt.gates * torch.arange(k)).sum()
            + rt.rank_scale.sum() + balance_loss(rt.router_probs, rt.expert_ids))
    loss.backward()
    assert hidden.grad is not None and hidden.grad.float().abs().sum() > 0
    for name, p in usn.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    if k < E:  # with k = E the renormalised gates sum to 1 whatever the logits
        assert usn.router_head.weight.grad.abs().sum() > 0


def test_usn_rejects_bad_arguments():
    with pytest.raises(ValueError, match="top_k"):
        UnifiedSaliencyNetwork(8, 2, 4, 3)
    with pytest.raises(ValueError, match="saliency_hidden_size"):
        UnifiedSaliencyNetwork(8, 2, 4, 1, saliency_hidden_size=0)
    for temperature in (None, True, "2", float("inf"), 0.0):
        with pytest.raises(ValueError, match="temperature: expected a finite number > 0"):
            UnifiedSaliencyNetwork(8, 2, 4, 1, temperature=temperature)
    usn = UnifiedSaliencyNetwork(8, 2, 4, 1, saliency_hidden_size=6)
    with pytest.raises(ValueError, match="hidden"):
        usn(torch.randn(2, 3, 9))
    with pytest.raises(TypeError, match="hidden: expected a torch.Tensor, got list"):
        usn([[0.0] * 8])
    for dtype in (torch.int64, torch.bool, torch.complex64):  # were cast silently
        with pytest.raises(TypeError, match=f"^hidden: expected a float tensor, got {dtype}$"):
            usn(torch.zeros(1, 2, 8, dtype=dtype))
    with pytest.raises(TypeError, match="valid: expected a torch.Tensor, got list"):
        usn(torch.randn(1, 2, 8), [[True, True]])
    # a float mask weighted the context mean (0.5, 2); another device was torch's error
    hidden = torch.randn(1, 3, 8)  # any mask dtype reads as bool (0.5 / 2 weighted the mean)
    usn.eval()
    want = usn(hidden, torch.tensor([[True, True, False]])).token_scores
    for mask in ([[1, 1, 0]], [[0.5, 2.0, 0.0]]):
        torch.testing.assert_close(usn(hidden, torch.tensor(mask)).token_scores, want)
    with pytest.raises(ValueError, match=r"hidden: expected device cpu \(that of the "
                                         r"saliency network\), got meta"):
        usn(torch.randn(1, 2, 8, device="meta"))
    state = usn(torch.randn(2, 3, 8)).state
    with pytest.raises(ValueError, match=r"state: expected shapes \(\(1, 6\), \(1,\)\)"):
        usn(torch.randn(1, 3, 8), state=state)  # another batch's state
    with pytest.raises(ValueError, match=r"state: expected shapes .*got \(\(2, 6\), \(2, 1\)\)"):
        usn(torch.randn(2, 3, 8), state=(state[0], state[1][:, None]))  # count [B, 1]
    with pytest.raises(TypeError, match=r"state: expected a \(feature_sum \[B, h\], count "
                                        r"\[B\]\) pair of tensors, got \(Tensor\)"):
        usn(torch.randn(2, 3, 8), state=state[:1])


def test_usn_empty_sequence_gives_empty_outputs_and_keeps_the_state():
    # L = 0 (an empty chunk): correctly shaped empty heads and routing, state passed on
    usn = UnifiedSaliencyNetwork(8, 5, 4, 2, saliency_hidden_size=6).train()
    hidden = torch.randn(3, 0, 8, requires_grad=True)
    out = usn(hidden)
    assert out.token_scores.shape == (3, 0) and out.router_logits.shape == (3, 0, 5)
    assert out.rank_scale.shape == (3, 0, 4)
    rt = out.routing
    assert rt.expert_ids.shape == rt.gates.shape == (0, 2) and rt.rank_scale.shape == (0, 4)
    assert rt.router_probs.shape == (0, 5)
    assert [tuple(t.shape) for t in out.state] == [(3, 6), (3,)]
    assert not any(t.any() for t in out.state)  # no context yet
    (out.token_scores.sum() + rt.gates.sum()).backward()
    assert hidden.grad.shape == hidden.shape
    before = usn(torch.randn(3, 4, 8)).state
    after = usn(torch.randn(3, 0, 8), torch.ones(3, 0, dtype=torch.bool), before).state
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))


def test_usn_eval_is_deterministic_train_is_stochastic():
    usn = UnifiedSaliencyNetwork(16, 8, 4, 2, temperature=5.0)
    x = torch.randn(2, 9, 16)
    usn.eval()
    a, b = usn(x).routing, usn(x).routing
    assert torch.equal(a.expert_ids, b.expert_ids) and torch.equal(a.gates, b.gates)
    usn.train()
    c, d = usn(x).routing, usn(x).routing
    assert not torch.equal(c.expert_ids, d.expert_ids)


def test_gumbel_topk_hard_straight_through():
    logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    w, ids = gumbel_topk(logits, 1, tau=0.7, hard=True)
    one_hot = torch.zeros(6, 5, dtype=torch.float32).scatter_(1, ids, 1.0)
    assert torch.equal(w, one_hot)  # exactly one-hot in the forward
    coeff = torch.randn(6, 5, dtype=torch.float32)
    (w * coeff).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0  # soft gradients
    # the gradient is that of the soft sample: check with the same noise reproduced
    gen = torch.Generator().manual_seed(3)
    logits2 = logits.detach().clone().requires_grad_()
    w2, ids2 = gumbel_topk(logits2, 1, tau=0.7, hard=True, generator=gen)
    gen = torch.Generator().manual_seed(3)
    logits3 = logits.detach().clone().requires_grad_()
    from datalora.saliency import sample_gumbel
    g = sample_gumbel(logits3.shape, "cpu", generator=gen)
    soft = torch.softmax((logits3.float() + g) / 0.7, -1)
    (w2 * coeff).sum().backward()
    (soft * coeff).sum().backward()
    torch.testing.assert_close(logits2.grad, logits3.grad)
    assert torch.equal(ids2.squeeze(1), soft.argmax(-1))


def test_gumbel_topk_hard_k2_and_soft():
    logits = torch.randn(4, 6, requires_grad=True)
    w, ids = gumbel_topk(logits, 2, tau=1.0, hard=True)
    assert torch.equal((w > 0).sum(-1), torch.full((4,), 2))
    assert torch.equal(w.gather(1, ids), torch.full((4, 2), 0.5))
    ws, ids_s = gumbel_topk(logits, 2, tau=1.0, hard=False, noise=False)
    probs = torch.softmax(logits, -1)
    top = probs.topk(2, -1)
    assert torch.equal(ids_s, top.indices)
    torch.testing.assert_close(ws.gather(1, ids_s), top.values / top.values.sum(-1, True))
    with pytest.raises(ValueError, match="k"):
        gumbel_topk(logits, 7, 1.0)
    with pytest.raises(ValueError, match="tau"):
        gumbel_topk(logits, 1, 0.0)


def test_gumbel_topk_low_temperature_follows_logits():
    logits = torch.tensor([[0.0, 3.0, 0.0, -1.0]]).repeat(2000, 1)
    _, ids = gumbel_topk(logits, 1, tau=1.0)
    freq = torch.bincount(ids.flatten(), minlength=4).float() / 2000
    torch.testing.assert_close(freq, torch.softmax(logits[0], -1), atol=0.03, rtol=0)


def test_gather_routing_rows_and_gradient():
    B, L, k, r = 2, 5, 2, 3
    gates = torch.rand(B * L, k, requires_grad=True)
    rt = Routing(expert_ids=torch.arange(B * L * k).reshape(B * L, k) % 4, gates=gates,
                 rank_scale=torch.rand(B * L, r), router_probs=torch.rand(B * L, 4))
    keep = torch.tensor([[0, 3], [1, 4]])
    packed = gather_routing(rt, keep, L)
    rows = torch.tensor([0, 3, 6, 9])
    assert torch.equal(packed.expert_ids, rt.expert_ids[rows])
    assert torch.equal(packed.rank_scale, rt.rank_scale[rows])
    packed.gates.sum().backward()
    assert torch.equal(gates.grad.sum(-1) > 0, torch.isin(torch.arange(10), rows))
    with pytest.raises(ValueError, match="routing"):
        gather_routing(rt, keep, 6)


def test_retention_loss_hand_computed():
    p = torch.tensor([[0.2, 0.4, 0.9], [1.0, 0.0, 0.5]], requires_grad=True)
    valid = torch.tensor([[True, True, False], [True, True, True]])
    loss = retention_loss(p, 0.5, valid)  # mean of valid = 2.1/5 = 0.42
    torch.testing.assert_close(loss, torch.tensor((0.42 - 0.5) ** 2))
    loss.backward()
    expected = 2 * (0.42 - 0.5) / 5 * valid.float()
    torch.testing.assert_close(p.grad, expected)
    torch.testing.assert_close(retention_loss(p, 1.0), torch.tensor((3.0 / 6 - 1.0) ** 2))
    none = torch.zeros_like(valid)  # an all-padding batch: no retention to penalise
    assert retention_loss(p, 0.5, none).item() == 0.0 == balance_loss(
        torch.full((6, 3), 1 / 3), torch.zeros(6, 1, dtype=torch.long), none.reshape(-1)).item()
    with pytest.raises(ValueError, match="target"):
        retention_loss(p, 0.0)
    with pytest.raises(ValueError, match="valid"):
        retention_loss(p, 0.5, valid[:, :2])


def test_balance_loss_hand_computed():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1],
                          [0.2, 0.2, 0.6]], requires_grad=True)
    ids = torch.tensor([[0], [1], [0], [2]])
    valid = torch.tensor([True, True, True, False])
    # f over the 3 valid routes = [2/3, 1/3, 0]; P = mean of 3 valid rows = [1.4, 1.3, 0.3]/3
    loss = balance_loss(probs, ids, valid)
    expected = 3 * (2 / 3 * 1.4 / 3 + 1 / 3 * 1.3 / 3)
    torch.testing.assert_close(loss, torch.tensor(expected))
    loss.backward()
    assert torch.equal(probs.grad[3], torch.zeros(3))
    # uniform routing and probabilities give exactly 1
    E = 4
    u = torch.full((8, E), 1 / E)
    torch.testing.assert_close(balance_loss(u, torch.arange(8)[:, None] % E), torch.tensor(1.0))
    # all tokens to one expert with probability 1 gives E
    one = torch.zeros(8, E)
    one[:, 2] = 1
    torch.testing.assert_close(balance_loss(one, torch.full((8, 1), 2)), torch.tensor(4.0))
    with pytest.raises(ValueError, match="expert_ids"):
        balance_loss(u, torch.zeros(7, 1, dtype=torch.long))


def test_usn_context_is_causal_ignores_padding_and_resumes_from_state():
    usn = UnifiedSaliencyNetwork(16, 6, 4, 2, saliency_hidden_size=8).eval()
    with torch.no_grad():
        usn.router_head.weight.normal_()
    x = torch.randn(2, 9, 16)
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, :3] = False  # left padding
    full = usn(x, valid)
    later = x.clone()
    later[:, 6:] = torch.randn(2, 3, 16)
    changed = usn(later, valid)
    torch.testing.assert_close(changed.router_logits[:, :6], full.router_logits[:, :6])
    assert not torch.allclose(changed.router_logits[:, 6:], full.router_logits[:, 6:])
    # the context changes the decision: same token, different prefix -> different logits
    x2 = x.clone()
    x2[0, 8] = x2[0, 0]
    out2 = usn(x2, valid)
    assert not torch.allclose(out2.router_logits[0, 8], out2.router_logits[0, 0])
    # padding values do not matter
    padded = x.clone()
    padded[1, :3] = 100.0
    torch.testing.assert_close(usn(padded, valid).router_logits[1, 3:],
                               full.router_logits[1, 3:])
    # chunked (KV-cache style) == one pass
    head = usn(x[:, :5], valid[:, :5])
    tail = usn(x[:, 5:], valid[:, 5:], head.state)
    torch.testing.assert_close(torch.cat([head.router_logits, tail.router_logits], 1),
                               full.router_logits, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(torch.cat([head.token_scores, tail.token_scores], 1),
                               full.token_scores, atol=1e-6, rtol=1e-6)
    # the context after each position is the state a chunk ending there returns (what a
    # cache cropped inside a chunk resumes from)
    sums, counts = full.context
    assert sums.shape == (2, 9, 8) and counts.shape == (2, 9) and not sums.requires_grad
    for end in (1, 5, 9):
        state = usn(x[:, :end], valid[:, :end]).state
        torch.testing.assert_close(sums[:, end - 1], state[0], atol=1e-6, rtol=1e-6)
        assert torch.equal(counts[:, end - 1], state[1])
    torch.testing.assert_close(tail.context[0][:, -1], full.state[0], atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="valid"):
        usn(x, valid[:, :4])


def _chunked_scores(usn, x, prefill):
    """Token scores ``[1, L]`` of ``x [1, L, d]`` as cached generation computes them: the
    first ``prefill`` tokens at once, then one token per step on the returned state."""
    out = usn(x[:, :prefill])
    scores, state = [out.token_scores], out.state
    for t in range(prefill, x.shape[1]):
        out = usn(x[:, t:t + 1], None, state)
        scores.append(out.token_scores)
        state = out.state
    return torch.cat(scores, 1), state


def test_usn_stays_fp32_in_a_bf16_model_and_counts_context_past_256_tokens():
    """``model.to(torch.bfloat16)`` moves the USN and keeps it fp32 (the threshold is not
    rounded), and the running context is summed in fp32 also under bf16 autocast: in bf16
    256 + 1 == 256, so a cached count stopped at 256 and cached scores drifted."""
    usn = UnifiedSaliencyNetwork(16, 4, 4, 2, saliency_hidden_size=8).eval()
    with torch.no_grad():
        usn.score_head.weight.normal_()
    usn.keep_threshold.fill_(-1.382)
    model = nn.ModuleDict({"saliency": usn}).to(torch.bfloat16)
    assert all(t.dtype == torch.float32 for t in (*usn.parameters(), *usn.buffers()))
    assert float(usn.keep_threshold) == float(torch.tensor(-1.382))
    assert model.to("meta").saliency.score_head.weight.device.type == "meta"
    assert UnifiedSaliencyNetwork(16, 4, 4, 2).double().score_head.weight.dtype == torch.float64
    usn.to_empty(device="cpu").reset_parameters()
    assert torch.isnan(usn.keep_threshold)  # not calibrated (not to_empty's leftover memory)
    with torch.no_grad():
        usn.score_head.weight.normal_()
    x = torch.randn(1, 300, 16).to(torch.bfloat16)  # the hidden states of a bf16 model
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        full = usn(x)
        chunked, state = _chunked_scores(usn, x, 250)
    assert state[0].dtype == state[1].dtype == torch.float32
    assert full.state[1].item() == state[1].item() == 300
    torch.testing.assert_close(chunked, full.token_scores, atol=1e-2, rtol=0)


def test_top1_soft_gates_pass_the_router_gradient():
    """k = 1: the renormalised gate top / top.sum() is the constant 1, which gave the router
    no gradient from the LM loss; the gate stays exactly 1 forward and passes d log y."""
    from datalora.routing import topk_routing

    logits = torch.randn(6, 4, requires_grad=True)
    weights, ids = gumbel_topk(logits, 1, tau=2.0, noise=False)
    assert torch.equal(weights.gather(-1, ids), torch.ones(6, 1))
    (weights * torch.randn(6, 4)).sum().backward()
    assert logits.grad.abs().sum() > 1e-3
    logits.grad = None
    routing = topk_routing(logits, 1)
    assert torch.equal(routing.gates, torch.ones(6, 1))
    (routing.gates * torch.randn(6, 1)).sum().backward()
    assert logits.grad.abs().sum() > 1e-3


def test_noise_compiles_with_dynamic_shapes():
    """``torch.rand(..., generator=None)`` fails on symbolic sizes: a compiled DATALORA
    model crashed once the sequence length changed."""
    from datalora.pruning import select_tokens

    def route(logits):
        return gumbel_topk(logits, 2, 1.0)[1]

    def select(scores):
        return select_tokens(scores, 0.5, None, tau=1.0, noise=True).keep_idx

    torch._dynamo.reset()
    compiled_route = torch.compile(route, backend="aot_eager", dynamic=True, fullgraph=True)
    compiled_select = torch.compile(select, backend="aot_eager", dynamic=True)
    for T in (6, 9):
        assert compiled_route(torch.randn(T, 4)).shape == (T, 2)
        assert compiled_select(torch.randn(2, T)).shape == (2, -(-T // 2))


def test_compiled_layers_do_not_bake_a_routing_value_check(monkeypatch):
    """Under compile the value-check flag must be False: an NF4 op would otherwise check
    (a host sync) at every call of every layer."""
    import torch.nn as nn

    import datalora.layers as layers
    from datalora import MoLoRALinear

    seen = []
    original = layers.nf4_molora_linear

    def spy(*args, check_values, **kwargs):
        seen.append(check_values)
        return original(*args, check_values=check_values, **kwargs)

    monkeypatch.setattr(layers, "nf4_molora_linear", spy)
    layer = MoLoRALinear(nn.Linear(64, 64), 4, 2, 4.0, 2, quantize="nf4", router=False).eval()
    ids, gates = torch.randint(0, 4, (3, 2)), torch.rand(3, 2)

    def forward(x, ids, gates):
        return layer(x, routing=Routing(ids, gates))

    torch._dynamo.reset()
    with torch.no_grad():
        forward(torch.randn(3, 64), ids, gates)
        torch.compile(forward, backend="aot_eager", fullgraph=True)(torch.randn(3, 64), ids,
                                                                   gates)
    assert seen == [True, False]


def test_usn_nan_in_a_padded_token_does_not_reach_the_real_tokens():
    usn = UnifiedSaliencyNetwork(8, 4, 3, 2, saliency_hidden_size=8).eval()
    x = torch.randn(2, 5, 8)
    valid = torch.ones(2, 5, dtype=torch.bool)
    valid[1, :2] = False  # left padding holding NaN / inf (fully masked attention rows)
    clean = usn(x, valid)
    bad = x.clone()
    bad[1, 0] = float("nan")
    bad[1, 1] = float("inf")
    out = usn(bad, valid)
    torch.testing.assert_close(out.token_scores[:, 2:], clean.token_scores[:, 2:])
    torch.testing.assert_close(out.router_logits[:, 2:], clean.router_logits[:, 2:])
    assert torch.isfinite(out.state[0]).all()
    usn.train()
    out = usn(bad, valid)
    (out.token_scores[valid].sum() + out.router_logits[valid].square().sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in usn.parameters() if p.grad is not None)


def test_a_non_finite_token_spoils_its_row_not_the_shared_routing_forward():
    """The saliency network's routing was value-checked like a routing a user builds: a
    NaN in one token's input (an fp16 overflow, a bad embedding row) raised "gates:
    expected finite values" for the whole batch, where per-layer routing gives that row a
    NaN loss (which GradScaler / logging_nan_inf_filter skip). Its ids are a top-k, in
    range by construction: no check, no host sync."""
    import warnings

    from datalora import DATALORAConfig, get_datalora_model
    from datalora.testing import build_tiny_model

    for routing in ("per_layer", "shared"):
        base = build_tiny_model(seed=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_datalora_model(base, DATALORAConfig(
                num_lora_experts=4, lora_rank=4, routing=routing), verbose=False).train()
        with torch.no_grad():
            base.get_input_embeddings().weight[7] = float("nan")
        ids = torch.randint(10, 1000, (2, 8), generator=torch.Generator().manual_seed(0))
        ids[0, 3] = 7
        logits = model(input_ids=ids, labels=ids).logits
        assert not torch.isfinite(logits[0]).all(), routing
        assert torch.isfinite(logits[1]).all(), routing


def test_the_saliency_routing_is_still_checked_by_a_layer_with_other_experts():
    """Valid by construction for the saliency network's E only: a layer with fewer experts
    checks the ids as it checks any routing."""
    from datalora import MoLoRALinear

    usn = UnifiedSaliencyNetwork(16, 8, 4, 2, saliency_hidden_size=8).eval()
    routing = usn(torch.randn(1, 6, 16)).routing
    assert not routing.needs_value_check(8)
    layer = MoLoRALinear(nn.Linear(16, 16), 4, 4, 8.0, 2, router=False)
    routing = Routing(torch.full((6, 2), 7), torch.full((6, 2), 0.5), _trusted=True,
                      _valid_experts=8)
    with pytest.raises(ValueError, match=r"expert_ids: expected values in \[0, 4\)"):
        layer(torch.randn(6, 16), routing=routing)


def test_losses_ignore_the_values_of_padded_tokens():
    keep = torch.tensor([[0.25, float("nan"), 0.75]])
    valid = torch.tensor([[True, False, True]])
    torch.testing.assert_close(retention_loss(keep, 0.25, valid), torch.tensor(0.0625))
    probs = torch.tensor([[0.5, 0.5], [float("nan"), float("inf")], [1.0, 0.0]])
    ids = torch.tensor([[0], [-1], [0]])  # padding row: garbage probabilities and id
    pad = torch.tensor([True, False, True])
    # f = (1, 0), P = (0.75, 0.25): E * sum f P = 2 * 0.75
    torch.testing.assert_close(balance_loss(probs, ids, pad), torch.tensor(1.5))


@pytest.mark.parametrize("tau", [1e-38, 1e-45, 1e-30, 1e30])  # far below / above fp32 scale
@pytest.mark.parametrize("hard", [False, True])
def test_gumbel_topk_extreme_temperatures_stay_finite(tau, hard):
    logits = torch.tensor([[0.5, 2.0, -1.0, 1.0], [3.0, 3.5, -2.0, 0.0]], requires_grad=True)
    g = torch.Generator().manual_seed(0)
    weights, ids = gumbel_topk(logits, 2, tau, hard=hard, generator=g)
    assert torch.isfinite(weights).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(2))
    (weights * torch.randn(2, 4)).sum().backward()
    assert torch.isfinite(logits.grad).all()
    if tau < 1 and not hard:  # near-discrete: the top-1 of the noisy logits takes it all
        assert (weights.max(-1).values == 1).all()


@pytest.mark.parametrize("tau", [None, "0.5", 0.0, -1.0, float("nan"), [0.5],
                                 torch.tensor([0.5, 1.0])])
def test_gumbel_topk_names_a_bad_temperature(tau):
    with pytest.raises(ValueError, match="tau: expected a temperature > 0"):
        gumbel_topk(torch.zeros(2, 3), 1, tau)


def test_gumbel_topk_rejects_non_tensor_logits():
    with pytest.raises(TypeError, match="logits: expected a torch.Tensor"):
        gumbel_topk([[0.0, 1.0]], 1, 1.0)


@pytest.mark.parametrize("k", [0, 5, 2.0, True, "2"])
def test_topk_routing_names_a_bad_k(k):
    from datalora.routing import topk_routing

    with pytest.raises(ValueError, match=r"k: expected an int 1 <= k <= num_experts=4"):
        topk_routing(torch.randn(3, 4), k)


def test_losses_and_gather_routing_name_bad_arguments():
    probs = torch.full((3, 4), 0.25)
    with pytest.raises(ValueError, match="target: expected a retention"):
        retention_loss(torch.rand(2, 3), None)
    with pytest.raises(TypeError, match="keep_prob: expected a torch.Tensor"):
        retention_loss([0.5], 0.5)
    with pytest.raises(ValueError, match="expert_ids: expected dtype int32 or int64"):
        balance_loss(probs, torch.zeros(3, 1))  # float ids were truncated silently
    with pytest.raises(RuntimeError, match=r"expert_ids: expected values in \[0, 4\)"):
        balance_loss(probs, torch.tensor([[0], [1], [4]]))
    routing = Routing(torch.zeros(6, 1, dtype=torch.long), torch.ones(6, 1))
    with pytest.raises(ValueError, match="keep_idx: expected a 2-D tensor"):
        gather_routing(routing, torch.tensor([0, 1]), 3)
    with pytest.raises(TypeError, match="keep_idx: expected a torch.Tensor"):
        gather_routing(routing, [[0, 1]], 3)
    with pytest.raises(ValueError, match="keep_idx: expected dtype"):
        gather_routing(routing, torch.tensor([[0.0], [1.0]]), 3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_sample_gumbel_is_finite_in_every_float_dtype(dtype):
    from datalora.saliency import sample_gumbel

    g = torch.Generator().manual_seed(0)
    noise = sample_gumbel((200_000,), "cpu", dtype=dtype, generator=g)  # fp16: ~100 zeros
    assert noise.dtype == dtype and torch.isfinite(noise).all()


@pytest.mark.parametrize("hard", [False, True])
def test_gumbel_topk_low_temperature_still_picks_the_next_best_experts(hard):
    # at tau = 0.05 every softmax entry but the max underflows to 0 in fp32
    logits = torch.tensor([[0.0, 1.0, 0.0, 10.0], [9.0, -3.0, 2.0, 0.0]])
    weights, ids = gumbel_topk(logits, 2, 0.05, hard=hard, noise=False)
    assert ids.tolist() == [[3, 1], [0, 2]]
    if hard:
        assert torch.equal(weights.gather(1, ids), torch.full((2, 2), 0.5))


def test_method_functions_name_non_tensor_arguments():
    """Lists raised AttributeError ('list' object has no attribute 'dim' / 'shape') from
    inside gumbel_topk, the losses and select_tokens; each names its argument now."""
    from datalora.pruning import select_tokens

    probs, ids = torch.full((1, 2), 0.5), torch.zeros(1, 1, dtype=torch.long)
    cases = [("logits", lambda: gumbel_topk([[1.0, 2.0]], 1, 1.0)),
             ("keep_prob", lambda: retention_loss([0.5], 0.5)),
             ("valid", lambda: retention_loss(torch.ones(2), 0.5, [True, False])),
             ("router_probs", lambda: balance_loss([[0.5, 0.5]], ids)),
             ("expert_ids", lambda: balance_loss(probs, [[0]])),
             ("scores", lambda: select_tokens([[1.0]], 0.5)),
             ("attention_mask", lambda: select_tokens(torch.ones(1, 1), 0.5, [[1]]))]
    for name, call in cases:
        with pytest.raises(TypeError, match=f"{name}: expected a torch.Tensor, got list"):
            call()


def test_usn_heads_equal_a_hand_written_reference():
    """The documented forward, written out: ``f = GELU(W2 GELU(W1 LN(x)))``, ``z = [f_t, mean
    of f_s over real s <= t]``, score / router / sigmoid(rank) heads on z; ``router_probs`` the
    noise-free ``softmax(logits)``; in eval the gates are the renormalised top-k of
    ``softmax(logits / tau)``; the keep probability is ``sigmoid(score)``."""
    torch.manual_seed(0)
    usn = UnifiedSaliencyNetwork(12, 5, 3, 2, saliency_hidden_size=6, temperature=3.0).eval()
    with torch.no_grad():
        for head in (usn.score_head, usn.router_head, usn.rank_head):
            head.weight.normal_()
        for layer in usn.backbone[::2]:  # trained biases: padding's features are not 0
            layer.bias.normal_()
    x = torch.randn(2, 5, 12)
    valid = torch.tensor([[True] * 5, [False, False, True, True, True]])  # left padding
    out = usn(x, valid)
    lin1, lin2 = usn.backbone[0], usn.backbone[2]
    ln = torch.nn.functional.layer_norm(x, (12,))
    f = torch.nn.functional.gelu(lin2(torch.nn.functional.gelu(lin1(ln))))
    w = valid.float()[..., None]
    context = (f * w).cumsum(1) / w.cumsum(1).clamp_min(1)
    z = torch.cat([f, context], -1)
    for b, t in ((0, slice(None)), (1, slice(2, None))):  # the real tokens
        torch.testing.assert_close(out.token_scores[b, t], usn.score_head(z)[b, t, 0])
        torch.testing.assert_close(out.router_logits[b, t], usn.router_head(z)[b, t])
        torch.testing.assert_close(out.rank_scale[b, t], torch.sigmoid(usn.rank_head(z)[b, t]))
    logits = out.router_logits.reshape(-1, 5)
    torch.testing.assert_close(out.routing.router_probs, torch.softmax(logits, -1))
    y = torch.softmax(logits / 3.0, -1)
    top = y.topk(2, -1)
    assert torch.equal(out.routing.expert_ids, top.indices)
    torch.testing.assert_close(out.routing.gates, top.values / top.values.sum(-1, keepdim=True))
    torch.testing.assert_close(usn.keep_probability(out.token_scores),
                               torch.sigmoid(out.token_scores))


def test_balance_loss_counts_the_fraction_of_all_k_routes():
    """With k routes per token f_e is the share of the T*k routes: top-2 routing spread
    evenly over 4 experts with uniform probabilities gives exactly 1, all routes on experts
    0 and 1 (probability 1/2 each) gives E * (1/2 * 1/2) * 2 = 2."""
    u = torch.full((8, 4), 0.25)
    even = torch.tensor([[0, 1], [2, 3]]).repeat(4, 1)
    torch.testing.assert_close(balance_loss(u, even), torch.tensor(1.0))
    half = torch.tensor([[0.5, 0.5, 0.0, 0.0]]).repeat(8, 1)
    torch.testing.assert_close(balance_loss(half, torch.tensor([[0, 1]]).repeat(8, 1)),
                               torch.tensor(2.0))


def test_an_fp64_saliency_network_computes_in_fp64_so_its_gradients_check():
    """``.double()`` promised fp64, but the heads, the context sum, the Gumbel top-k and the
    two losses rounded through fp32: finite differences of an fp64 model were off by O(1)."""
    torch.manual_seed(0)
    usn = UnifiedSaliencyNetwork(12, 4, 3, 2, saliency_hidden_size=8).double().eval()
    for head in (usn.score_head, usn.router_head, usn.rank_head):
        nn.init.normal_(head.weight)  # the score head starts at 0, the router near uniform
    hidden = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    valid = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    out = usn(hidden, valid)
    assert {out.token_scores.dtype, out.router_logits.dtype, out.rank_scale.dtype,
            out.routing.gates.dtype, out.state[0].dtype} == {torch.float64}

    def losses(h):
        out = usn(h, valid)
        routing = out.routing
        keep = usn.keep_probability(out.token_scores)
        return (retention_loss(keep, 0.5, valid)
                + balance_loss(routing.router_probs, routing.expert_ids, valid.reshape(-1))
                + (routing.gates * routing.rank_scale[:, :2]).sum())

    assert losses(hidden).dtype == torch.float64
    assert torch.autograd.gradcheck(losses, (hidden,), eps=1e-6, atol=1e-7, rtol=1e-5)
