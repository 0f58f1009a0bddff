"""Decoder architectures other than Mistral (tiny random models from configs): what
shared routing + pruning supports runs right, what it cannot support is refused up front."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from datalora import DATALORAConfig, get_datalora_model
from datalora.hf_compat import cache_of

VOCAB = 128


def _build(config):
    torch.manual_seed(0)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 2, 0
    return AutoModelForCausalLM.from_config(config).eval()


def _falcon(alibi=False):
    return transformers.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4,
                                     num_attention_heads=4, new_decoder_architecture=False,
                                     alibi=alibi)


def _neox():
    return transformers.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=4, num_attention_heads=4,
                                      max_position_embeddings=64)


def _mixtral(router_logits=False):
    return transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=4, num_attention_heads=4,
                                      num_key_value_heads=2, num_local_experts=4,
                                      num_experts_per_tok=2, output_router_logits=router_logits)


def _shared(targets=None, **kwargs):
    """Shared routing over layers 1-2 (``targets`` None: the default target modules)."""
    settings = {**dict(num_lora_experts=4, lora_rank=4, routing="shared", prune_layers=[1, 3],
                       target_retention=0.5), **kwargs}
    if targets is not None:
        settings["target_modules"] = targets
    return DATALORAConfig(**settings)


def _randomise_adapter(model):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        model.saliency.score_head.weight.normal_(0, 1.0, generator=gen)


def test_cache_of_reads_layer_past():
    cache = transformers.DynamicCache()
    assert cache_of({"layer_past": cache}) is cache
    assert cache_of({"past_key_values": cache, "layer_past": None}) is cache
    assert cache_of({"layer_past": (torch.zeros(1), torch.zeros(1))}) is None  # legacy tuples


@pytest.mark.parametrize("make, targets", [
    (_falcon, ["query_key_value", "dense"]),            # layers take the cache as layer_past
    (_neox, ["query_key_value", "dense"]),              # gpt_neox.layers, layer_past
])
def test_cached_generation_with_pruning_equals_uncached(make, targets):
    model = get_datalora_model(_build(make()), _shared(targets), verbose=False)
    _randomise_adapter(model)
    model.eval()
    ids = torch.randint(4, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model(ids)
        model.runtime.calibrate(model.runtime.last.saliency.token_scores, retention=0.5)
        kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
        prompt, mask = ids[:, :8].clone(), torch.ones(2, 8, dtype=torch.long)
        prompt[0, :3], mask[0, :3] = 0, 0
        cached = model.generate(prompt, attention_mask=mask, use_cache=True, **kw)
        uncached = model.generate(prompt, attention_mask=mask, use_cache=False, **kw)
        assert torch.equal(cached, uncached)
        full = model(ids).logits
        cache = model(ids[:, :8], use_cache=True).past_key_values
        chunk = model(ids[:, 8:], past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(chunk, full[:, 8:], atol=1e-5, rtol=1e-5)


def _config(name, **kwargs):
    """A tiny config of a family this transformers release may not have (skips if not)."""
    cls = getattr(transformers, name, None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    return cls(**{**common, **kwargs})


_ALTERNATING = dict(sliding_window=64, layer_types=["sliding_attention", "full_attention"] * 2)


def _gemma3():  # local RoPE theta 10k on sliding layers, 1M on full ones
    return _config("Gemma3TextConfig", query_pre_attn_scalar=8, **_ALTERNATING)


def _gemma4(**kwargs):  # a per-layer input per token, positional
    return _config("Gemma4TextConfig", global_head_dim=8, **_ALTERNATING, **kwargs)


def _llama4(**kwargs):  # RoPE as one complex tensor; layer 1 a full-attention NoPE layer
    return _config("Llama4TextConfig", intermediate_size_mlp=64, num_local_experts=2,
                   interleave_moe_layer_step=2, attention_chunk_size=64,
                   no_rope_layers=[1, 0, 1, 0], **kwargs)


@pytest.mark.parametrize("make, prune", [(_gemma3, [1, 3]),
                                         (lambda: _gemma4(num_kv_shared_layers=0), [1, 3]),
                                         (lambda: _llama4(attn_temperature_tuning=False),
                                          [1, 2])])
def test_packed_layers_get_their_own_per_token_inputs(make, prune):
    """Every packed layer gets its own RoPE / per-layer input at the kept tokens: the first
    pruned layer's were given to all of them (Gemma 3's local and global RoPE), a single
    complex RoPE tensor (Llama 4) failed and Gemma 4's positional per-layer input was not
    gathered. All tokens kept, the packed range equals the dense one."""
    model = get_datalora_model(_build(make()), _shared(prune_layers=prune),
                               verbose=False)
    _randomise_adapter(model)
    ids = torch.randint(4, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        model.set_curriculum_state(tau=1.0, retention=1.0, hard=True)
        dense = model(ids).logits
        model.set_curriculum_state(tau=1.0, retention=0.99, hard=True)  # ceil: all 12 kept
        packed = model(ids).logits
        assert model.runtime.last.mode == "packed" and model.runtime.last.kept.all()
    torch.testing.assert_close(packed, dense, rtol=1e-5, atol=1e-5)
    model.train()  # a training step runs packed too
    model.set_curriculum_state(tau=1.0, retention=0.5, hard=False)
    model(ids, labels=ids).loss.backward()
    assert model.runtime.last.mode == "packed"


@pytest.mark.parametrize("make, fragment", [
    (lambda: _gemma4(hidden_size_per_layer_input=0, num_kv_shared_layers=2),
     "shares its keys / values"),
    (_llama4, "attention temperature tuning"),  # queries scaled by their packed index
    (lambda: _config("Gemma3nTextConfig", num_kv_shared_layers=0, laurel_rank=4,
                     hidden_size_per_layer_input=8, vocab_size_per_layer_input=VOCAB,
                     altup_num_inputs=2, activation_sparsity_pattern=[0.0] * 4,
                     **_ALTERNATING), "AltUp"),
])
def test_kv_sharing_and_altup_are_refused_up_front(make, fragment):
    """They built, then the first forward crashed inside the pruned range / the saliency
    network; routing='auto' now falls back to per-layer routing."""
    with pytest.raises(ValueError, match=fragment):
        get_datalora_model(_build(make()), _shared(prune_layers=[1, 3]), verbose=False)
    auto = DATALORAConfig(num_lora_experts=4, lora_rank=4, prune_layers=[1, 3])
    with pytest.warns(UserWarning, match=fragment):
        model = get_datalora_model(_build(make()), auto, verbose=False)
    assert model.datalora_config.routing == "per_layer"


@pytest.mark.parametrize("config, fragment", [
    (lambda: _falcon(alibi=True), "ALiBi attention"),
    (lambda: transformers.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=4, n_head=4),
     "ALiBi attention"),
    (lambda: _mixtral(router_logits=True), "output_router_logits"),
])
def test_unsupported_pruning_is_refused_at_construction(config, fragment):
    with pytest.raises(ValueError, match=fragment):
        get_datalora_model(_build(config()), _shared(["query_key_value", "dense", "q_proj"]),
                           verbose=False)


def test_router_logits_requested_per_call_are_refused():
    model = get_datalora_model(_build(_mixtral()), _shared(["q_proj", "v_proj"]),
                               verbose=False)
    with pytest.raises(ValueError, match="output_router_logits"):
        model(torch.randint(4, VOCAB, (1, 6)), output_router_logits=True)


def test_moe_outputs_carry_the_aux_losses():
    model = get_datalora_model(_build(_mixtral()), _shared(["q_proj", "v_proj"]),
                               verbose=False)
    model.train()
    out = model(torch.randint(4, VOCAB, (2, 8)), labels=torch.randint(4, VOCAB, (2, 8)))
    assert type(out).__name__ == "DATALORAMoeCausalLMOutputWithPast"
    assert isinstance(out, transformers.modeling_outputs.MoeCausalLMOutputWithPast)
    (out.loss + out.retention_loss + out.balance_loss).backward()
    assert model.saliency.score_head.weight.grad is not None


def test_no_decoder_layers_error_points_to_per_layer_routing():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(8, 8)
            self.config = transformers.PretrainedConfig(hidden_size=8)

    with pytest.raises(ValueError, match="routing='per_layer'"):
        get_datalora_model(Tiny(), _shared(["proj"]), verbose=False)


def test_an_adapter_loaded_onto_another_architecture_warns(tmp_path):
    llama = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2)
    qwen = transformers.Qwen2Config(**{k: getattr(llama, k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads")})
    config = DATALORAConfig(num_lora_experts=2, lora_rank=2, target_modules=["o_proj"])
    get_datalora_model(_build(llama), config, verbose=False).save_pretrained(tmp_path)
    from datalora import DATALORAModel

    with pytest.warns(UserWarning, match="trained on a 'llama' model"):
        DATALORAModel.from_pretrained(_build(qwen), tmp_path)


def test_partial_match_warning_names_conv1d_targets():
    gpt2 = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                   n_positions=64)
    with pytest.warns(UserWarning, match=r"not nn.Linear: \['c_attn \(Conv1D\)'\]"):
        get_datalora_model(_build(gpt2), DATALORAConfig(
            num_lora_experts=2, lora_rank=2, target_modules=["c_attn", "lm_head"]),
            verbose=False)


def test_a_vision_language_model_gets_its_decoder_layers_not_its_vision_blocks():
    from datalora.pruning import find_decoder_layers

    config = transformers.Qwen2VLConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]}),
        vision_config=dict(depth=3, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2,
                           in_chans=3, patch_size=2, spatial_merge_size=1,
                           temporal_patch_size=1))
    model = transformers.Qwen2VLForConditionalGeneration(config)
    layers = find_decoder_layers(model)
    assert type(layers[0]).__name__ == "Qwen2VLDecoderLayer" and len(layers) == 2


def test_moe_outputs_with_aux_losses_pickle():
    import pickle

    from datalora.model import output_with_aux_losses

    cls = output_with_aux_losses(transformers.modeling_outputs.MoeCausalLMOutputWithPast)
    out = cls(logits=torch.ones(1, 2), retention_loss=torch.tensor(0.5))
    back = pickle.loads(pickle.dumps(out))
    assert type(back) is cls and torch.equal(back.retention_loss, out.retention_loss)


def test_alibi_detection_covers_mpt_and_position_embedding_type():
    from datalora.pruning import check_prunable

    class Fake(torch.nn.Module):
        def __init__(self, **config):
            super().__init__()
            self.config = transformers.PretrainedConfig(**config)

    for config in (dict(model_type_="x", position_embedding_type="alibi"),
                   dict(attn_config={"alibi": True})):
        with pytest.raises(ValueError, match="ALiBi"):
            check_prunable(Fake(**config))
    check_prunable(Fake(attn_config={"alibi": False}))  # MPT without ALiBi: fine
    check_prunable(Fake(position_embedding_type="rotary"))


def test_a_moe_base_router_is_not_saved_as_an_adapter_tensor(tmp_path):
    """Adapter tensors were picked by name ('.router.' in it): a MoE base's own frozen
    router (GraniteMoe's block_sparse_moe.router.weight) was saved with the adapter and a load
    overwrote the base's router with it."""
    from safetensors.torch import load_file

    from datalora import DATALORAModel

    def granite():
        return _build(transformers.GraniteMoeConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
            num_experts_per_tok=2))

    config = DATALORAConfig(num_lora_experts=2, lora_rank=2, routing="per_layer",
                            target_modules=["q_proj", "v_proj"])
    model = get_datalora_model(granite(), config, verbose=False)
    assert not [k for k in model.adapter_state_dict() if "block_sparse_moe" in k]
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved and all(".q_proj." in k or ".v_proj." in k for k in saved)
    def router_weight(model):  # router.weight on transformers 5, router.layer.weight on 4.x
        return next(p for n, p in model.named_parameters()
                    if n.startswith("model.layers.0.block_sparse_moe.router."))

    other = granite()
    with torch.no_grad():
        router_weight(other).add_(1.0)  # another fine-tune of the base: its router stays
    expected = router_weight(other).detach().clone()
    DATALORAModel.from_pretrained(other, tmp_path)
    assert torch.equal(router_weight(other), expected)


def test_a_refused_shared_build_leaves_the_base_unchanged():
    """Shared routing's refusals (ALiBi, a bad prune_layers) came after the MoLoRA layers were
    injected: retrying with a fixed config then failed with "already holds MoLoRA layers"."""
    from datalora.layers import MoLoRALinear

    bloom = _build(transformers.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=4,
                                            n_head=4))
    with pytest.raises(ValueError, match="ALiBi"):
        get_datalora_model(bloom, _shared(["query_key_value"]), verbose=False)
    assert not any(isinstance(m, MoLoRALinear) for m in bloom.modules())
    assert all(p.requires_grad for p in bloom.parameters())
    get_datalora_model(bloom, DATALORAConfig(num_lora_experts=2, lora_rank=2,
                                             routing="per_layer",
                                             target_modules=["query_key_value"]),
                       verbose=False)
    neox = _build(_neox())
    with pytest.raises(ValueError, match="prune_layers"):
        get_datalora_model(neox, DATALORAConfig(num_lora_experts=2, lora_rank=2,
                                                routing="shared", prune_layers=[3, 9],
                                                target_modules=["dense"]), verbose=False)
    assert not any(isinstance(m, MoLoRALinear) for m in neox.modules())


def test_no_match_error_on_gpt2_names_its_conv1d_layers():
    """GPT-2 with the default targets said only "its linear layers are named ['lm_head']",
    as if the model had no projections: its Conv1D ones are named too."""
    gpt2 = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                   n_positions=64)
    with pytest.raises(ValueError, match=r"named \['lm_head'\]; its Conv1D layers \['c_attn', "
                                         r"'c_fc', 'c_proj'\] are not nn.Linear"):
        get_datalora_model(_build(gpt2), DATALORAConfig(num_lora_experts=2, lora_rank=2),
                           verbose=False)
