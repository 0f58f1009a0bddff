"""Wrapping Hugging Face models and the layer API: transposed routing ids, deepcopy after
a forward, train/eval mode, shared-routing targets, base parameters trained with the
adapter, target-name typos, tied weights, Hugging Face save keywords, autocast of fp64,
non-Linear targets."""
import copy
import warnings

import pytest
import torch
import torch.nn as nn
import transformers
from transformers import AutoModelForCausalLM

from datalora import DATALORAConfig, DATALORAModel, MoLoRALinear, get_datalora_model, ops


def _llama(tie=False):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tie)
    return AutoModelForCausalLM.from_config(cfg).eval()


def _cfg(**kw):
    return DATALORAConfig(num_lora_experts=4, lora_rank=2, **kw)


# F1 -------------------------------------------------------------------------------------
def test_transposed_expert_ids():
    torch.manual_seed(0)
    E, r, d, d_out, T, k = 4, 3, 8, 6, 5, 2
    x, A, B = torch.randn(T, d), torch.randn(E, r, d), torch.randn(E, d_out, r)
    ids_t = torch.randint(0, E, (k, T)).T          # [T, k], not contiguous
    gates = torch.rand(T, k)
    expected = ops.molora_delta(x, A, B, ids_t.contiguous(), gates)
    assert torch.equal(ops.molora_delta(x, A, B, ids_t, gates), expected)
    W = torch.randn(d_out, d)
    assert torch.allclose(ops.molora_linear(x, W, None, A, B, ids_t, gates), x @ W.T + expected,
                          atol=1e-5)


# F2 -------------------------------------------------------------------------------------
def test_deepcopy_after_training_forward():
    layer = MoLoRALinear(nn.Linear(16, 16), num_experts=4, rank=2)
    layer(torch.randn(3, 16)).sum().backward()
    copy.deepcopy(layer)
    for routing in ("per_layer", "shared"):
        w = get_datalora_model(_llama(), _cfg(routing=routing), verbose=False)
        w.train()
        ids = torch.randint(2, 128, (2, 7))
        w(ids, labels=ids).loss.backward()
        w2 = copy.deepcopy(w)
        w2.eval()
        w.eval()
        with torch.no_grad():
            assert torch.equal(w2(ids).logits, w(ids).logits)


def test_pickled_model_prunes_like_the_original():
    """``torch.save`` of the whole model: the copy's hooks address its own layers."""
    import io

    w = get_datalora_model(_llama(), _cfg(routing="shared", prune_layers=[1, 2]), verbose=False)
    w.set_curriculum_state(retention=0.5)
    ids = torch.randint(2, 128, (2, 7))
    buffer = io.BytesIO()
    torch.save(w, buffer)
    buffer.seek(0)
    w2 = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        torch.manual_seed(0)
        expected = w(ids).logits
        torch.manual_seed(0)
        got = w2(ids).logits
    assert w2.runtime.last.mode == "packed"
    assert torch.equal(got, expected)


# F3 -------------------------------------------------------------------------------------
def test_wrapper_follows_base_mode(tmp_path):
    ids = torch.randint(2, 128, (2, 7))
    for routing, extra in (("shared", {"target_retention": 1.0}),
                           ("per_layer", {"lora_dropout": 0.5})):
        trained = get_datalora_model(_llama(), _cfg(routing=routing, **extra), verbose=False)
        with torch.no_grad():
            for n, p in trained.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
        trained.save_pretrained(tmp_path / routing)
        # load the adapter into a freshly wrapped eval-mode base and run inference
        w = get_datalora_model(_llama(), _cfg(routing=routing, **extra), verbose=False)
        w.load_adapter(tmp_path / routing)
        assert not any(m.training for m in w.modules())
        with torch.no_grad():
            assert torch.equal(w(ids).logits, w(ids).logits)


# F4 -------------------------------------------------------------------------------------
def test_shared_routing_rejects_targets_outside_decoder():
    with pytest.raises(ValueError, match="outside"):
        get_datalora_model(_llama(), _cfg(routing="shared", target_retention=1.0,
                                          target_modules=["q_proj", "lm_head"]), verbose=False)


# F5 -------------------------------------------------------------------------------------
def test_unfrozen_base_parameter_round_trips(tmp_path):
    base = _llama()
    fresh = copy.deepcopy(base)
    w = get_datalora_model(base, _cfg(), verbose=False)
    norm = w.base_model.model.norm.weight
    norm.requires_grad_(True)
    with torch.no_grad():
        norm.mul_(1.5)
    w.save_pretrained(tmp_path)
    w2 = DATALORAModel.from_pretrained(fresh, tmp_path)
    assert torch.equal(w2.base_model.model.norm.weight, norm)
    ids = torch.randint(2, 128, (2, 7))
    w.eval()
    with torch.no_grad():
        assert torch.equal(w(ids).logits, w2(ids).logits)
    w2.save_pretrained(tmp_path / "again")  # re-saving keeps it
    DATALORAModel.from_pretrained(_llama(), tmp_path / "again")


def test_switching_back_from_an_adapter_that_replaced_a_base_weight_says_why(tmp_path):
    """Adapter B trained (and saved) the final norm; loading A after B cannot restore the
    base's norm from A: the error says so (it read "missing ['model.norm.weight']")."""
    plain = get_datalora_model(_llama(), _cfg(), verbose=False)
    plain.save_pretrained(tmp_path / "a")
    trained_norm = get_datalora_model(_llama(), _cfg(), verbose=False)
    trained_norm.base_model.model.norm.weight.requires_grad_(True)
    trained_norm.save_pretrained(tmp_path / "b")
    served = DATALORAModel.from_pretrained(_llama(), tmp_path / "a")
    served.load_adapter(tmp_path / "b")
    with pytest.raises(ValueError, match=r"replaced with the base weights it trained.*fresh "
                                         r"base model"):
        served.load_adapter(tmp_path / "a")


# F6 -------------------------------------------------------------------------------------
def test_verbose_is_a_bool():
    with pytest.raises(TypeError, match=r"^verbose: expected a bool, got 'no'$"):
        get_datalora_model(_llama(), _cfg(), verbose="no")  # printed the report


def test_unmatched_target_name_warns():
    with pytest.warns(UserWarning, match="v_prj"):
        get_datalora_model(_llama(), _cfg(target_modules=["q_proj", "v_prj"]), verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        get_datalora_model(_llama(), _cfg(), verbose=False)  # all default names exist


# F7 -------------------------------------------------------------------------------------
def test_tie_weights_with_lm_head_target():
    w = get_datalora_model(_llama(tie=True), _cfg(target_modules=["q_proj", "lm_head"]),
                           verbose=False)
    w.tie_weights()
    assert w.base_model.lm_head.weight is w.base_model.model.embed_tokens.weight
    assert isinstance(w.base_model.lm_head, MoLoRALinear)


# F8 -------------------------------------------------------------------------------------
def test_save_pretrained_accepts_hf_keywords(tmp_path):
    w = get_datalora_model(_llama(), _cfg(), verbose=False)
    w.save_pretrained(tmp_path / "a", is_main_process=False)
    assert not (tmp_path / "a" / "adapter_model.safetensors").exists()
    w.save_pretrained(tmp_path / "b", is_main_process=True, safe_serialization=True)
    assert (tmp_path / "b" / "adapter_model.safetensors").exists()
    # Path(3) failed unnamed; a list said it "lacks adapter tensors"
    with pytest.raises(TypeError, match="^save_directory: expected a folder path"):
        w.save_pretrained(3)
    with pytest.raises(TypeError, match="^state_dict: expected a mapping of names to tensors, "
                                        "got list"):
        w.save_pretrained(tmp_path / "c", state_dict=[1])


# F9 -------------------------------------------------------------------------------------
def test_own_router_does_no_host_value_check(monkeypatch):
    import datalora.ops.validation as validation

    calls = []
    real = validation.check_routing_values
    monkeypatch.setattr(validation, "check_routing_values",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    w = get_datalora_model(_llama(), _cfg(routing="per_layer"), verbose=False)
    with torch.no_grad():
        w(torch.randint(2, 128, (2, 7)))
    assert calls == []


# F10 ------------------------------------------------------------------------------------
def test_autocast_keeps_float64_like_f_linear():
    x, W = torch.randn(3, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64)
    A, B = torch.randn(2, 2, 8, dtype=torch.float64), torch.randn(2, 6, 2, dtype=torch.float64)
    ids, g = torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.nn.functional.linear(x, W).dtype == torch.float64
        assert ops.molora_linear(x, W, None, A, B, ids, g).dtype == torch.float64


# F11 ------------------------------------------------------------------------------------
def test_conv1d_target_error_names_the_module_type():
    torch.manual_seed(0)
    gpt2 = AutoModelForCausalLM.from_config(transformers.GPT2Config(
        vocab_size=128, n_embd=32, n_layer=1, n_head=4, n_positions=32))
    with pytest.raises(ValueError, match="Conv1D"):
        get_datalora_model(gpt2, _cfg(target_modules=["c_attn"]), verbose=False)


def test_shared_routing_on_another_device_than_a_layer_is_refused_clearly():
    """device_map splitting the decoder over GPUs: one clear error, not a kernel's."""
    from datalora.routing import Routing

    w = get_datalora_model(_llama(), _cfg(routing="shared"), verbose=False)
    runtime = w.runtime
    routing = Routing(expert_ids=torch.zeros(3, 2, dtype=torch.long, device="meta"),
                      gates=torch.zeros(3, 2, device="meta"))
    layer = next(m for _, m in w.molora_layers())
    with runtime.routing_scope(routing), pytest.raises(ValueError, match="one device"):
        runtime._give_routing(layer, (torch.zeros(3, layer.in_features),), {})


def test_wrapping_a_model_twice_says_it_already_holds_molora():
    """get_datalora_model adapts its model in place: passing the same base (or the wrapper)
    again failed with "target_modules: none of [...] matched an nn.Linear"."""
    base = _llama()
    wrapped = get_datalora_model(base, _cfg(), verbose=False)
    for model in (base, wrapped):
        with pytest.raises(ValueError, match=r"^model: already holds MoLoRA layers .*freshly "
                                             r"loaded base model"):
            get_datalora_model(model, _cfg(), verbose=False)


def test_from_pretrained_checks_its_base_and_path(tmp_path):
    """DATALORAModel.from_pretrained (and the constructor) skipped get_datalora_model's
    checks: loading twice onto the same base failed with "target_modules: none of [...]
    matched an nn.Linear", a str model with AttributeError, path=None with a bare TypeError."""
    from datalora import DATALORAModel

    get_datalora_model(_llama(), _cfg(), verbose=False).save_pretrained(tmp_path)
    base = _llama()
    wrapped = DATALORAModel.from_pretrained(base, tmp_path)
    for model in (base, wrapped):
        with pytest.raises(ValueError, match=r"^model: already holds MoLoRA layers"):
            DATALORAModel.from_pretrained(model, tmp_path)
    with pytest.raises(TypeError, match=r"^model: expected a torch.nn.Module, got str"):
        DATALORAModel.from_pretrained("llama", tmp_path)
    with pytest.raises(TypeError, match=r"^config: expected DATALORAConfig, got str"):
        DATALORAModel(_llama(), "config")
    with pytest.raises(TypeError, match=r"^path: expected a folder path"):
        DATALORAModel.from_pretrained(_llama(), None)
    with pytest.raises(TypeError, match=r"^path: expected a folder path"):
        wrapped.load_adapter(None)
    with pytest.raises(TypeError, match=r"^is_trainable: expected a bool"):  # "no" was true
        DATALORAModel.from_pretrained(_llama(), tmp_path, is_trainable="no")



def test_inject_molora_names_a_bad_model_or_config():
    """The public inject_molora failed on a dict / None config with AttributeError ('dict'
    object has no attribute 'quantize') and on a str model likewise."""
    from datalora import inject_molora

    model = nn.Sequential(nn.Linear(4, 4))
    for config in ({"target_modules": ["0"]}, None):
        with pytest.raises(TypeError, match=r"^config: expected DATALORAConfig"):
            inject_molora(model, config)
    with pytest.raises(TypeError, match=r"^model: expected a torch.nn.Module, got str"):
        inject_molora("model", DATALORAConfig(target_modules=["0"]))
    assert inject_molora(model, DATALORAConfig(target_modules=["0"], num_lora_experts=2,
                                               lora_rank=2, num_active_experts=1,
                                               routing="per_layer")) == ["0"]


def _state(model):
    """Modules (type, mode, hooks) and trainable flags: what a wrap changes."""
    return ([(type(m).__name__, m.training, len(m._forward_hooks), len(m._forward_pre_hooks))
             for m in model.modules()], [p.requires_grad for p in model.parameters()])


def test_a_failed_wrap_leaves_the_model_as_it_was(monkeypatch):
    """A ValueError from get_datalora_model left the caller's model frozen (it was frozen
    before the layers were built), and a weight NF4 cannot quantize in a later layer left the
    earlier ones replaced (a second attempt then said the model "already holds MoLoRA
    layers"), its error not naming the layer."""
    model = _llama()
    before = _state(model)
    with pytest.raises(ValueError, match="target_modules: none of"):
        get_datalora_model(model, _cfg(target_modules=["nope"]))
    assert _state(model) == before
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^model\.layers\.1\.mlp\.down_proj: cannot be "
                                         r"quantized to NF4 \(model\.layers\.1\.mlp\."
                                         r"down_proj\.weight: .*NaN"):
        get_datalora_model(model, _cfg(quantize="nf4", routing="per_layer"))
    assert _state(model) == before
    from datalora import inject_molora

    lazy = _llama()  # an error of the layer, not the quantization, names the layer too
    lazy.model.layers[0].self_attn.q_proj = nn.LazyLinear(32)
    with pytest.raises(ValueError, match=r"^model\.layers\.0\.self_attn\.q_proj: base_layer: "
                                         r"an uninitialized nn\.LazyLinear"):
        inject_molora(lazy, _cfg(routing="per_layer"))

    # a failure after the layers and the pruning hooks are in place undoes both
    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = 0.0
    monkeypatch.setattr(DATALORAModel, "set_curriculum_state", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        get_datalora_model(model, _cfg(routing="shared"))
    assert _state(model) == before
    monkeypatch.undo()
    assert isinstance(get_datalora_model(model, _cfg()), DATALORAModel)
