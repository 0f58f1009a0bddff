"""get_datalora_model: injection into a HF causal LM, freezing, save -> reload bit-exact."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from datalora import DATALORAConfig, DATALORAModel, MoLoRALinear, get_datalora_model
from datalora.testing import build_tiny_model

CFG = dict(num_lora_experts=4, lora_rank=4, lora_alpha=8, num_active_experts=2)


def model_and_ids():
    return build_tiny_model(seed=0), torch.randint(4, 1000, (2, 11))


def perturb(wrapped):
    with torch.no_grad():
        for _, layer in wrapped.molora_layers():
            layer.lora_B.normal_(std=0.05)


def test_injects_default_targets_and_freezes_base(capsys):
    model, ids = model_and_ids()
    reference = model(input_ids=ids).logits
    n_layers = model.config.num_hidden_layers
    wrapped = get_datalora_model(model, DATALORAConfig(**CFG))
    assert "trainable params" in capsys.readouterr().out
    names = [n for n, _ in wrapped.molora_layers()]
    assert len(names) == 7 * n_layers
    assert {n.rsplit(".", 1)[-1] for n in names} == set(DATALORAConfig().target_modules)
    assert torch.equal(wrapped(input_ids=ids).logits, reference)  # B = 0: identity at init
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    # routing='auto' on a decoder LM: the DATALORA method (MoLoRA + the saliency network)
    assert wrapped.config_datalora.routing == "shared"
    assert trainable and all((".lora_" in n or n.startswith("saliency.")) for n in trainable)
    t, total = wrapped.get_nb_trainable_parameters()
    assert 0 < t < total
    assert not isinstance(model.lm_head, MoLoRALinear)  # lm_head is not a target


def test_save_and_reload_is_bit_exact(tmp_path):
    model, ids = model_and_ids()
    wrapped = get_datalora_model(model, DATALORAConfig(**CFG), verbose=False)
    perturb(wrapped)
    logits = wrapped(input_ids=ids).logits
    wrapped.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((tmp_path / "adapter_config.json").read_text())["lora_rank"] == 4
    reloaded = DATALORAModel.from_pretrained(build_tiny_model(seed=0), tmp_path)
    assert torch.equal(reloaded(input_ids=ids).logits, logits)
    saved, loaded = wrapped.adapter_state_dict(), reloaded.adapter_state_dict()
    assert saved.keys() == loaded.keys()
    for k in saved:  # bit-exact; keep_threshold is NaN (not calibrated) on both sides
        torch.testing.assert_close(saved[k], loaded[k], rtol=0, atol=0, equal_nan=True)
    assert reloaded.curriculum_state() == wrapped.curriculum_state()
    assert not any(p.requires_grad for p in reloaded.parameters())


def test_wrapped_layers_save_and_load_under_their_unwrapped_names(tmp_path):
    """FSDP1 and activation checkpointing insert ``_fsdp_wrapped_module`` /
    ``_checkpoint_wrapped_module`` between a layer and its parent; their state_dict hooks
    drop those names, so the adapter (and the state dict the Trainer gathers) must too."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing,
    )
    from transformers.models.mistral.modeling_mistral import MistralDecoderLayer

    model, ids = model_and_ids()
    wrapped = get_datalora_model(model, DATALORAConfig(**CFG), verbose=False)
    perturb(wrapped)
    names = set(wrapped.adapter_state_dict())
    apply_activation_checkpointing(
        wrapped.base_model, check_fn=lambda m: isinstance(m, MistralDecoderLayer))
    assert any("_checkpoint_wrapped_module" in n for n, _ in wrapped.named_parameters())
    assert set(wrapped.adapter_state_dict()) == names
    logits = wrapped(input_ids=ids).logits
    wrapped.save_pretrained(tmp_path / "full", state_dict=wrapped.state_dict())
    wrapped.save_pretrained(tmp_path / "own")
    for folder in ("full", "own"):
        reloaded = DATALORAModel.from_pretrained(build_tiny_model(seed=0), tmp_path / folder)
        assert set(reloaded.adapter_state_dict()) == names
        assert torch.equal(reloaded(input_ids=ids).logits, logits)
    fresh = get_datalora_model(build_tiny_model(seed=0), DATALORAConfig(**CFG), verbose=False)
    apply_activation_checkpointing(
        fresh.base_model, check_fn=lambda m: isinstance(m, MistralDecoderLayer))
    fresh.load_adapter(tmp_path / "full")  # into a wrapped model too
    assert torch.equal(fresh(input_ids=ids).logits, logits)


def test_from_pretrained_is_for_inference_unless_trainable(tmp_path):
    """As PEFT's: a reloaded adapter comes back frozen and in eval mode (no dropout, no
    routing noise), whatever mode the base was in; ``is_trainable=True`` makes exactly the
    adapter's tensors trainable again (the base's own weights stay frozen)."""
    model, _ = model_and_ids()
    wrapped = get_datalora_model(model, DATALORAConfig(**CFG), verbose=False)
    wrapped.save_pretrained(tmp_path)
    trainable_names = {n for n, p in wrapped.named_parameters() if p.requires_grad}
    loaded = DATALORAModel.from_pretrained(build_tiny_model(seed=0).train(), tmp_path)
    assert not any(m.training for m in loaded.modules())
    assert not any(p.requires_grad for p in loaded.parameters())
    again = DATALORAModel.from_pretrained(build_tiny_model(seed=0), tmp_path, is_trainable=True)
    assert {n for n, p in again.named_parameters() if p.requires_grad} == trainable_names


def test_loading_an_adapter_leaves_the_callers_rng_alone(tmp_path):
    """from_pretrained initialised the layers (then overwrote them) from the global RNG:
    seed, load, sample drew other numbers than load, seed, sample."""
    model, _ = model_and_ids()
    get_datalora_model(model, DATALORAConfig(**CFG), verbose=False).save_pretrained(tmp_path)
    fresh = build_tiny_model(seed=0)
    torch.manual_seed(7)
    DATALORAModel.from_pretrained(fresh, tmp_path)
    after_load = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(after_load, torch.rand(3))


def test_save_is_atomic(tmp_path, monkeypatch):
    model, _ = model_and_ids()
    wrapped = get_datalora_model(model, DATALORAConfig(**CFG), verbose=False)
    wrapped.save_pretrained(tmp_path)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()
    perturb(wrapped)

    def crash(tensors, path, metadata=None):  # the disk fills halfway through the file
        Path(path).write_bytes(b"partial write ")
        raise OSError("disk full")

    monkeypatch.setattr("datalora.io.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        wrapped.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before  # old file intact
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]


def test_the_same_checkpoint_saves_to_the_same_bytes(tmp_path):
    """safetensors writes the metadata in a hash map's random order: two saves of one
    adapter differed from byte 27 (checksums and caches saw a change)."""
    from safetensors import safe_open

    from datalora.io import save_tensors

    tensors = {"b": torch.arange(6.0).view(2, 3), "a": torch.ones(3, dtype=torch.bfloat16)}
    metadata = {f"key{i}": f'value "{i}"\n\u00e9' for i in range(6)}
    saved = []
    for i in range(6):
        save_tensors(tensors, tmp_path / f"{i}.safetensors", metadata=metadata)
        saved.append((tmp_path / f"{i}.safetensors").read_bytes())
    assert len(set(saved)) == 1
    size = int.from_bytes(saved[0][:8], "little")
    assert list(json.loads(saved[0][8:8 + size])["__metadata__"]) == sorted(metadata)
    with safe_open(str(tmp_path / "0.safetensors"), framework="pt") as f:
        assert f.metadata() == metadata
        assert all(torch.equal(f.get_tensor(k), v) for k, v in tensors.items())
    model, _ = model_and_ids()
    wrapped = get_datalora_model(model, DATALORAConfig(**CFG), verbose=False)
    for name in ("first", "again"):
        wrapped.save_pretrained(tmp_path / name)
    assert (tmp_path / "first" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "again" / "adapter_model.safetensors").read_bytes()


def test_saved_files_get_umask_permissions_and_keep_existing_ones(tmp_path):
    from datalora.io import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "new.json", "{}")
        assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0o600
        kept = tmp_path / "kept.json"
        kept.write_text("old")
        kept.chmod(0o640)
        atomic_write_text(kept, "new")
        assert kept.read_text() == "new" and kept.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="Linux /proc")
def test_saving_reads_the_umask_without_setting_it(tmp_path, monkeypatch):
    """Setting the umask to 0 to read it gave, for that moment, world-writable files to
    whatever other threads of the process created."""
    from datalora.io import atomic_write_text

    old = os.umask(0o027)
    try:
        def no_set(mask):
            raise AssertionError(f"os.umask({mask:#o}) called")

        monkeypatch.setattr(os, "umask", no_set)
        atomic_write_text(tmp_path / "new.json", "{}")
        assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o640
    finally:
        monkeypatch.undo()
        os.umask(old)


def test_disable_adapter_restores_base():
    model, ids = model_and_ids()
    base_logits = model(input_ids=ids).logits
    wrapped = get_datalora_model(model, DATALORAConfig(**CFG), verbose=False)
    perturb(wrapped)
    assert not torch.equal(wrapped(input_ids=ids).logits, base_logits)
    adapted = wrapped(input_ids=ids).logits
    (_, first), *_ = wrapped.molora_layers()
    first.adapter_enabled = False  # a caller's own setting, kept by disable_adapter()
    partly = wrapped(input_ids=ids).logits
    with wrapped.disable_adapter():  # as PEFT's
        assert torch.equal(wrapped(input_ids=ids).logits, base_logits)
    assert torch.equal(wrapped(input_ids=ids).logits, partly) and not first.adapter_enabled
    first.adapter_enabled = True
    assert torch.equal(wrapped(input_ids=ids).logits, adapted)
    wrapped.set_adapter_enabled(False)
    assert torch.equal(wrapped(input_ids=ids).logits, base_logits)
    for bad in ("False", 0, None):  # "False" used to leave every adapter on
        with pytest.raises(TypeError, match="enabled: expected a bool"):
            wrapped.set_adapter_enabled(bad)
    assert torch.equal(wrapped(input_ids=ids).logits, base_logits)


def test_load_mismatch_and_bad_targets(tmp_path):
    model, _ = model_and_ids()
    wrapped = get_datalora_model(model, DATALORAConfig(**CFG), verbose=False)
    wrapped.save_pretrained(tmp_path)
    other = get_datalora_model(build_tiny_model(seed=0),
                               DATALORAConfig(**(CFG | {"lora_rank": 2})), verbose=False)
    with pytest.raises(ValueError, match="lora_rank: saved 4, this model 2"):
        other.load_adapter(tmp_path)
    with pytest.raises(ValueError, match="target_modules: none of"):
        get_datalora_model(nn.Sequential(nn.Linear(3, 3)), DATALORAConfig(target_modules=["q"]))
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        DATALORAModel.from_pretrained(build_tiny_model(), tmp_path / "missing")


@pytest.mark.parametrize("change", [{"lora_alpha": 16.0}, {"num_active_experts": 1},
                                    {"routing": "shared", "prune_layers": [1, 4]}])
def test_load_refuses_a_config_that_computes_another_function(tmp_path, change):
    """Same tensor names and shapes, another function: refused, naming the field."""
    base = CFG | ({"routing": "shared", "prune_layers": [2, 4]} if "routing" in change else {})
    wrapped = get_datalora_model(build_tiny_model(seed=0), DATALORAConfig(**base),
                                 verbose=False)
    wrapped.save_pretrained(tmp_path)
    other = get_datalora_model(build_tiny_model(seed=0), DATALORAConfig(**(base | change)),
                               verbose=False)
    field = [k for k in change if k != "routing"][0]
    with pytest.raises(ValueError, match=f"another config .*{field}: saved"):
        other.load_adapter(tmp_path)
    training_only = DATALORAConfig(**(base | {"lambda_prune": 0.7, "lora_dropout": 0.1}))
    get_datalora_model(build_tiny_model(seed=0), training_only, verbose=False).load_adapter(
        tmp_path)


def test_load_accepts_changes_that_compute_the_same_function(tmp_path):
    """Per-layer routing has no saliency network (its width is irrelevant); an edited
    adapter_config.json that changes only settings such as the backend still loads."""
    import json

    get_datalora_model(build_tiny_model(seed=0), DATALORAConfig(**CFG, routing="per_layer"),
                       verbose=False).save_pretrained(tmp_path)
    get_datalora_model(build_tiny_model(seed=0),
                       DATALORAConfig(**(CFG | {"saliency_hidden_size": 32,
                                                "routing": "per_layer"})),
                       verbose=False).load_adapter(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config.update(backend="torch", lora_dropout=0.1)
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    loaded = DATALORAModel.from_pretrained(build_tiny_model(seed=0), tmp_path)
    assert loaded.config_datalora.backend == "torch"


def test_load_into_another_dtype_warns_that_it_casts(tmp_path):
    import warnings

    get_datalora_model(build_tiny_model(seed=0), DATALORAConfig(**CFG),
                       verbose=False).save_pretrained(tmp_path)
    same = get_datalora_model(build_tiny_model(seed=0), DATALORAConfig(**CFG), verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same.load_adapter(tmp_path)
    narrow = get_datalora_model(build_tiny_model(seed=0).to(torch.bfloat16),
                                DATALORAConfig(**CFG), verbose=False)
    with pytest.warns(UserWarning, match=r"cast .*torch.float32 -> torch.bfloat16.*not bit-exact"):
        narrow.load_adapter(tmp_path)


def test_load_refuses_a_config_file_that_does_not_match_the_weights(tmp_path):
    """A save interrupted between its two files leaves new weights beside an old config."""
    old = get_datalora_model(build_tiny_model(seed=0), DATALORAConfig(**CFG), verbose=False)
    old.save_pretrained(tmp_path)
    stale = (tmp_path / "adapter_config.json").read_text()
    new = get_datalora_model(build_tiny_model(seed=0),
                             DATALORAConfig(**(CFG | {"lora_alpha": 2.0})), verbose=False)
    new.save_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text(stale)
    with pytest.raises(ValueError, match="does not match the config stored in"):
        DATALORAModel.from_pretrained(build_tiny_model(seed=0), tmp_path)


def test_training_step_reduces_loss():
    model, ids = model_and_ids()
    wrapped = get_datalora_model(model, DATALORAConfig(**CFG), verbose=False)
    opt = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2)
    wrapped.train()
    losses = []
    for _ in range(8):
        loss = wrapped(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(num_active_experts=9), "num_active_experts: expected <= num_lora_experts=8"),
    (dict(target_retention=0.0), "target_retention"),
    (dict(lora_rank=0), "lora_rank: expected an int >= 1, got 0"),
    (dict(routing="global"), "routing: expected"),
    (dict(curriculum_split=[0.5, 0.5, 0.5]), "curriculum_split"),
    (dict(prune_layers=[3, 1]), "prune_layers"),
    (dict(temperature_init=0.5, temperature_final=5.0),
     r"temperature_final: expected <= temperature_init=0.5"),
    (dict(temperature_final=-1.0), r"^temperature_final: expected > 0, got -1.0"),
    (dict(temperature_init=-1.0), r"^temperature_init: expected > 0, got -1.0"),
])
def test_config_validation(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        DATALORAConfig(**kwargs)


def test_a_field_assigned_after_construction_is_checked_when_the_model_is_built():
    """A typo assigned to a field used to build a model without routers or saliency
    network, failing at the first forward with an error about the layers."""
    model, _ = model_and_ids()
    cfg = DATALORAConfig(**CFG)
    cfg.routing = "per-layer"
    with pytest.raises(ValueError, match=r"routing: expected one of .*got 'per-layer'"):
        get_datalora_model(model, cfg, verbose=False)
    assert not any(isinstance(m, MoLoRALinear) for m in model.modules())
    cfg = DATALORAConfig(**CFG)
    cfg.lora_rank = 0
    with pytest.raises(ValueError, match="lora_rank: expected an int >= 1, got 0"):
        DATALORAModel(model, cfg)


def test_a_failed_from_pretrained_leaves_the_model_as_it_was(tmp_path):
    """An adapter of another model size used to be injected before its shapes were
    checked: the user's model kept MoLoRA layers and a retry said it already held them."""
    model, _ = model_and_ids()
    wrapped = get_datalora_model(model, DATALORAConfig(**CFG), verbose=False)
    wrapped.save_pretrained(tmp_path / "adapter")
    other = build_tiny_model(seed=0, intermediate_size=200)
    before = {n: (p.clone(), p.requires_grad) for n, p in other.named_parameters()}
    modules = [type(m) for m in other.modules()]
    for _ in range(2):  # the same error again: nothing was left half-done
        with pytest.raises(ValueError, match=r"down_proj.lora_A: saved shape .* trained on "
                                             r"another model size"):
            DATALORAModel.from_pretrained(other, tmp_path / "adapter")
    assert [type(m) for m in other.modules()] == modules
    assert all(torch.equal(p, before[n][0]) and p.requires_grad == before[n][1]
               for n, p in other.named_parameters())
    same = DATALORAModel.from_pretrained(build_tiny_model(seed=0), tmp_path / "adapter")
    assert sum(1 for _ in same.molora_layers()) == sum(1 for _ in wrapped.molora_layers())


def test_a_generation_config_assigned_to_the_wrapper_is_the_one_generate_uses():
    """The assignment landed on the wrapper while generate() read the base's config:
    max_new_tokens=3 generated 20 tokens."""
    from transformers import GenerationConfig

    model, ids = model_and_ids()
    wrapped = get_datalora_model(model, DATALORAConfig(**CFG), verbose=False).eval()
    wrapped.generation_config = GenerationConfig(max_new_tokens=3, do_sample=False,
                                                 pad_token_id=0)
    assert model.generation_config is wrapped.generation_config
    assert wrapped.generate(input_ids=ids[:1, :5]).shape[1] == 5 + 3


def test_parameter_counts_and_footprint_include_the_saliency_network():
    """num_parameters / get_memory_footprint were the base model's: the saliency network
    (on the wrapper) was left out."""
    model, _ = model_and_ids()
    wrapped = get_datalora_model(model, DATALORAConfig(**CFG), verbose=False)
    assert wrapped.num_parameters() == sum(p.numel() for p in wrapped.parameters())
    assert wrapped.num_parameters(only_trainable=True) == wrapped.get_nb_trainable_parameters()[0]
    nbytes = sum(t.numel() * t.element_size()
                 for t in (*wrapped.parameters(), *wrapped.buffers()))
    assert wrapped.get_memory_footprint() == nbytes


def test_shared_routing_refuses_a_peft_model_as_its_base():
    """PEFT's generate() calls the causal LM inside the PeftModel, past the runtime's hooks
    on the PeftModel: forward worked, generate failed with "called outside the causal LM's
    forward". The not-nn.Linear hint named PEFT's layers "(Linear)"."""
    import warnings

    peft = pytest.importorskip("peft")
    def peft_model():
        return peft.get_peft_model(build_tiny_model(seed=0),
                                   peft.LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"model: a PEFT model \(PeftModel\).*merge_and_unload"):
        get_datalora_model(peft_model(), DATALORAConfig(**CFG, routing="shared"),
                           verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        wrapped = get_datalora_model(peft_model(), DATALORAConfig(**CFG), verbose=False)
    assert wrapped.config_datalora.routing == "per_layer"
    messages = " ".join(str(w.message) for w in caught)
    assert "chose 'per_layer'" in messages and "q_proj (peft.tuners.lora.layer.Linear)" in messages


def test_token_embeddings_resized_after_wrapping_are_saved_with_the_adapter(tmp_path):
    """The new rows of resize_token_embeddings (random, in no base checkpoint) were not
    saved, and a reload onto the base loaded silently, then failed with an IndexError on
    the new token (resizing again drew other rows)."""
    model, _ = model_and_ids()
    wrapped = get_datalora_model(model, DATALORAConfig(**CFG), verbose=False).eval()
    rows = model.get_input_embeddings().weight.shape[0]
    perturb(wrapped)
    wrapped.resize_token_embeddings(rows + 1)
    ids = torch.tensor([[5, 9, rows, 7]])  # the new token
    logits = wrapped(input_ids=ids).logits
    wrapped.save_pretrained(tmp_path)
    base = build_tiny_model(seed=0)
    with pytest.raises(ValueError, match=rf"saved with {rows + 1} token embeddings .*"
                                         rf"resize_token_embeddings\({rows + 1}\)"):
        DATALORAModel.from_pretrained(base, tmp_path)
    base.resize_token_embeddings(rows + 1)  # other new rows: the saved ones replace them
    reloaded = DATALORAModel.from_pretrained(base, tmp_path)
    assert torch.equal(reloaded(input_ids=ids).logits, logits)
    plain = get_datalora_model(build_tiny_model(seed=0), DATALORAConfig(**CFG), verbose=False)
    assert not any("embed" in name for name in plain.adapter_state_dict())


def _model_state(model):
    """What a failed load must leave as it was: module types, parameter values and flags,
    train / eval modes and hook counts."""
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks")
    return ([(n, type(m), m.training, [len(getattr(m, h)) for h in hooks])
             for n, m in model.named_modules()],
            {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()})


def _assert_same_state(model, state):
    modules, params = _model_state(model)
    assert modules == state[0]
    assert params.keys() == state[1].keys()
    assert all(torch.equal(v, state[1][n][0]) and flag == state[1][n][1]
               for n, (v, flag) in params.items())


def _shallower_adapter(folder):
    get_datalora_model(build_tiny_model(seed=0, num_hidden_layers=2),
                       DATALORAConfig(**CFG, prune_layers=[1, 2]),
                       verbose=False).save_pretrained(folder)


def _interrupted_save(folder):
    """New weights beside the old config: a save cut short between its two files."""
    get_datalora_model(build_tiny_model(seed=0), DATALORAConfig(**CFG),
                       verbose=False).save_pretrained(folder)
    stale = (folder / "adapter_config.json").read_text()
    get_datalora_model(build_tiny_model(seed=0), DATALORAConfig(**(CFG | {"lora_alpha": 2.0})),
                       verbose=False).save_pretrained(folder)
    (folder / "adapter_config.json").write_text(stale)


def _edited_save(folder, edit):
    """A (perturbed) adapter saved to ``folder``, its weights file then rewritten with
    ``edit(tensors, metadata, wrapped) -> (tensors, metadata)``: a file changed after
    saving."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    wrapped = get_datalora_model(build_tiny_model(seed=0), DATALORAConfig(**CFG), verbose=False)
    perturb(wrapped)
    wrapped.save_pretrained(folder)
    file = str(folder / "adapter_model.safetensors")
    with safe_open(file, "pt") as f:
        metadata = f.metadata()
    tensors, metadata = edit(load_file(file), metadata, wrapped)
    save_file(tensors, file, metadata=metadata)


def _bad_curriculum(folder, text='{"tau": 0.5, "retention": 1.5, "hard": true}'):
    _edited_save(folder, lambda tensors, metadata, _: (tensors,
                                                       {**metadata, "curriculum_state": text}))


def _bad_stored_config(folder, text):
    _edited_save(folder, lambda tensors, metadata, _: (tensors,
                                                       {**metadata, "datalora_config": text}))


@pytest.mark.parametrize("make, error", [
    (_shallower_adapter, r"does not fit this model: missing \['model.layers.2"),
    (lambda folder: _bad_stored_config(folder, "{bad"),
     r"^path: the datalora_config stored in .*adapter_model.safetensors is not valid JSON"),
    (lambda folder: _bad_stored_config(folder, "[1]"),
     r"^path: the datalora_config stored in .*adapter_model.safetensors is not a valid "
     r"config: config: expected a mapping"),
    (_interrupted_save, "does not match the config stored in"),
    (_bad_curriculum, r"curriculum state in .* is invalid \(retention: .*1.5"),
    (lambda folder: _bad_curriculum(folder, "{not json"),
     "curriculum state in .* is not readable"),
])
def test_a_load_that_fails_after_the_injection_leaves_the_model_as_it_was(tmp_path, make,
                                                                          error):
    """These adapters pass the header check and fail in load_adapter, after the MoLoRA layers
    were injected: the user's model used to keep them (frozen, with pruning hooks) and a
    retry said it already held MoLoRA layers."""
    make(tmp_path / "bad")
    get_datalora_model(build_tiny_model(seed=0), DATALORAConfig(**CFG),
                       verbose=False).save_pretrained(tmp_path / "good")
    model = build_tiny_model(seed=0)
    model.model.layers[1].train(False)  # modes are restored per module
    state = _model_state(model)
    for _ in range(2):  # the same error again: nothing was left half-done
        with pytest.raises(ValueError, match=error):
            DATALORAModel.from_pretrained(model, tmp_path / "bad")
        _assert_same_state(model, state)
    DATALORAModel.from_pretrained(model, tmp_path / "good")


def test_load_adapter_checks_the_curriculum_state_before_replacing_any_weight(tmp_path):
    _bad_curriculum(tmp_path)
    wrapped = get_datalora_model(build_tiny_model(seed=0), DATALORAConfig(**CFG), verbose=False)
    before = {n: t.clone() for n, t in wrapped.adapter_state_dict().items()}
    with pytest.raises(ValueError, match="curriculum state in .* is invalid"):
        wrapped.load_adapter(tmp_path)
    after = wrapped.adapter_state_dict()
    for name, tensor in before.items():
        torch.testing.assert_close(after[name], tensor, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage"])
def test_a_damaged_weights_file_is_a_value_error_naming_it(tmp_path, damage):
    """safetensors' own SafetensorError is neither a ValueError nor an OSError and names no
    file."""
    get_datalora_model(build_tiny_model(seed=0), DATALORAConfig(**CFG),
                       verbose=False).save_pretrained(tmp_path)
    file = tmp_path / "adapter_model.safetensors"
    data = file.read_bytes()
    file.write_bytes({"truncate": data[:-100], "empty": b"",
                      "garbage": b"\x10" + data[1:]}[damage])
    model = build_tiny_model(seed=0)
    state = _model_state(model)
    with pytest.raises(ValueError, match=r"path: .*adapter_model.safetensors is not a readable "
                                         r"safetensors file"):
        DATALORAModel.from_pretrained(model, tmp_path)
    _assert_same_state(model, state)
    wrapped = get_datalora_model(model, DATALORAConfig(**CFG), verbose=False)
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        wrapped.load_adapter(tmp_path)


def test_an_invalid_config_file_is_named_by_load_adapter(tmp_path):
    wrapped = get_datalora_model(build_tiny_model(seed=0), DATALORAConfig(**CFG), verbose=False)
    wrapped.save_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"adapter_config.json is not valid JSON"):
        wrapped.load_adapter(tmp_path)


@pytest.mark.parametrize("is_trainable", [False, True])
@pytest.mark.parametrize("base_dtype, adapter_dtype", [(torch.bfloat16, torch.float32),
                                                       (torch.float32, torch.bfloat16)])
def test_adapters_in_another_dtype_than_the_base_reload_exactly(tmp_path, is_trainable,
                                                                 base_dtype, adapter_dtype):
    """train_datalora keeps fp32 adapters on a bf16 base; from_pretrained cast them to
    bf16 (a warning said the load was not bit-exact), so further training ran on 16-bit
    weights and saving again changed the stored tensors. The mirror case (bf16 adapters on
    an fp32 base) needs the header's BF16 dtype read back."""
    import warnings

    from safetensors.torch import load_file

    wrapped = get_datalora_model(build_tiny_model(seed=0, dtype=base_dtype),
                                 DATALORAConfig(**CFG), verbose=False)
    for _, layer in wrapped.molora_layers():
        for param in layer.parameters():
            if param.requires_grad:
                param.data = param.data.to(adapter_dtype)
    perturb(wrapped)
    ids = torch.randint(4, 1000, (2, 11))
    logits = wrapped(input_ids=ids).logits
    wrapped.save_pretrained(tmp_path / "first")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = DATALORAModel.from_pretrained(build_tiny_model(seed=0, dtype=base_dtype),
                                               tmp_path / "first", is_trainable=is_trainable)
    assert {p.dtype for _, layer in loaded.molora_layers()
            for n, p in layer.named_parameters() if "lora_" in n} == {adapter_dtype}
    assert torch.equal(loaded(input_ids=ids).logits, logits)
    loaded.save_pretrained(tmp_path / "again")
    first, again = (load_file(tmp_path / name / "adapter_model.safetensors")
                    for name in ("first", "again"))
    assert first.keys() == again.keys()
    for name in first:
        assert first[name].dtype == again[name].dtype, name
        torch.testing.assert_close(first[name], again[name], rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("routing", ["shared", "per_layer"])
def test_a_training_step_through_the_wrapper_compiles_fullgraph_and_matches_eager(routing):
    """The README's claim, through ``DATALORAModel.forward`` (whose shared-routing output
    class with the aux losses used to be made while dynamo traced: "setattr() on unsupported
    type")."""
    ids = torch.randint(5, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    model = get_datalora_model(build_tiny_model(seed=0),
                               DATALORAConfig(**CFG, routing=routing, lora_dropout=0.0),
                               verbose=False).train()
    perturb(model)
    if routing == "shared":
        model.set_curriculum_state(tau=0.5, retention=0.5, hard=True)
    params = [p for p in model.parameters() if p.requires_grad]

    def step(i, a):
        out = model(input_ids=i, attention_mask=a, labels=i)
        return out.loss + (out.retention_loss + out.balance_loss if routing == "shared" else 0)

    def run(fn):
        torch.manual_seed(1)  # the same Gumbel noise
        for p in params:
            p.grad = None
        loss = fn(ids, mask)
        loss.backward()
        return [loss.detach()] + [p.grad for p in params]

    want = run(step)
    got = run(torch.compile(step, backend="aot_eager", fullgraph=True))
    torch._dynamo.reset()
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_gradient_checkpointing_is_refused_when_enabled_on_shared_routing():
    """It used to be accepted and fail at the first training forward; per-layer routing
    supports it (same loss and gradients)."""
    ids = torch.randint(5, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    shared = get_datalora_model(build_tiny_model(seed=0), DATALORAConfig(**CFG),
                                verbose=False)
    with pytest.raises(ValueError, match=r"gradient_checkpointing: .*routing='per_layer'"):
        shared.gradient_checkpointing_enable()
    # transformers 5.x's Trainer calls activation_checkpointing_enable: it reached the base
    # and the refusal came at the first training forward
    with pytest.raises(ValueError, match=r"gradient_checkpointing: .*routing='per_layer'"):
        shared.activation_checkpointing_enable()

    def step(checkpointing):
        torch.manual_seed(0)  # the same adapter initialisation
        model = get_datalora_model(build_tiny_model(seed=0),
                                   DATALORAConfig(**CFG, routing="per_layer", lora_dropout=0.0),
                                   verbose=False).train()
        perturb(model)
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(input_ids=ids, labels=ids).loss.backward()
        return [p.grad for p in model.parameters() if p.requires_grad]

    for a, b in zip(step(True), step(False), strict=True):
        torch.testing.assert_close(a, b)


def test_misused_model_calls_are_named(tmp_path):
    """Calls a user can get wrong, each an error naming the argument (or a warning for an
    ignored keyword), the model unchanged: aux losses before a forward or without a saliency
    network, a curriculum state on a per-layer model, pickle serialization, unknown
    ``save_pretrained`` keywords, and loading a folder without weights, with no MoLoRA
    tensors, or adapting a module the model lacks."""
    from safetensors.torch import save_file

    model, ids = model_and_ids()
    wrapped = get_datalora_model(model, DATALORAConfig(**CFG), verbose=False)
    with pytest.raises(ValueError, match="aux_losses: needs routing='shared' and a forward"):
        wrapped.aux_losses()
    per_layer = get_datalora_model(build_tiny_model(seed=0),
                                   DATALORAConfig(**CFG, routing="per_layer"), verbose=False)
    with pytest.raises(ValueError, match="aux_losses: needs routing='shared'"):
        per_layer.aux_losses()
    with pytest.raises(ValueError, match="routing: set_curriculum_state needs "
                                         "routing='shared'"):
        per_layer.set_curriculum_state(tau=1.0)
    with pytest.raises(ValueError, match="safe_serialization: datalora adapters are saved as "
                                         "safetensors only"):
        wrapped.save_pretrained(tmp_path / "pickle", safe_serialization=False)
    assert not (tmp_path / "pickle").exists()
    with pytest.warns(UserWarning, match=r"save_pretrained: ignoring \['max_shard_size'\]"):
        wrapped.save_pretrained(tmp_path / "saved", max_shard_size="1GB")
    assert (tmp_path / "saved" / "adapter_model.safetensors").exists()

    def load(folder):
        return DATALORAModel.from_pretrained(build_tiny_model(seed=0), folder)

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "adapter_config.json").write_text(
        (tmp_path / "saved" / "adapter_config.json").read_text())
    with pytest.raises(FileNotFoundError, match="path: no adapter_model.safetensors found"):
        load(no_weights)
    file = tmp_path / "saved" / "adapter_model.safetensors"  # was "config: ... not UTF-8"
    for call in (lambda: load(file), lambda: wrapped.load_adapter(file)):
        with pytest.raises(ValueError, match=r"^path: .*adapter_model.safetensors is a file; "
                                             r"pass the folder holding"):
            call()
    saved = wrapped.adapter_state_dict()
    no_molora = {k: v.contiguous() for k, v in saved.items() if k.startswith("saliency.")}
    save_file(no_molora, no_weights / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="holds no MoLoRA tensors"):
        load(no_weights)
    elsewhere = {k.replace("layers.0.", "layers.9.") if k.endswith(".lora_A") else k:
                 v.contiguous() for k, v in saved.items()}
    save_file(elsewhere, no_weights / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"adapts 'model.layers.9.[a-z_]+.[a-z_]+_proj', "
                                         r"which this model lacks"):
        load(no_weights)


def test_a_peft_adapter_config_is_named_as_such():
    with pytest.raises(ValueError, match=r"a PEFT adapter config \(peft_type 'LORA'\)"):
        DATALORAConfig.from_dict({"peft_type": "LORA", "r": 8, "lora_alpha": 16,
                                  "target_modules": ["q_proj"]})


def test_save_pretrained_to_an_existing_file_names_the_argument(tmp_path):
    model, _ = model_and_ids()
    wrapped = get_datalora_model(model, DATALORAConfig(**CFG), verbose=False)
    afile = tmp_path / "afile"
    afile.write_text("")
    with pytest.raises(ValueError, match=r"save_directory: .*afile is a file"):
        wrapped.save_pretrained(afile)
    assert afile.read_text() == ""


def test_config_json_and_yaml_round_trip(tmp_path):
    cfg = DATALORAConfig(lora_rank=8, target_modules=["q_proj"], prune_layers=[1, 3])
    assert DATALORAConfig.from_dict(json.loads(cfg.to_json_string())) == cfg
    (tmp_path / "c.yaml").write_text("lora_rank: 8\ntarget_modules: [q_proj]\n")
    assert DATALORAConfig.from_file(tmp_path / "c.yaml").lora_rank == 8
    with pytest.raises(ValueError, match="unknown DATALORAConfig fields"):
        DATALORAConfig.from_dict({"lora_rnak": 8})
    # a file whose top level is not a mapping: a ValueError, not AttributeError 'items'
    for name, text in (("l.yaml", "- 1\n"), ("l.json", "[1]")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=r"config: expected a mapping at the top of "
                                             r".*, got list"):
            DATALORAConfig.from_file(tmp_path / name)


def test_quantizing_shows_a_bar_when_verbose(capsys):
    """Quantizing a 7B base on a CPU takes minutes; without a bar nothing said why."""
    cfg = DATALORAConfig(**CFG, quantize="nf4")
    get_datalora_model(build_tiny_model(seed=0), cfg, verbose=False)
    assert "NF4" not in capsys.readouterr().err
    wrapped = get_datalora_model(build_tiny_model(seed=0), cfg, verbose=True)
    err = capsys.readouterr().err
    count = len(wrapped.adapted_modules)
    assert f"quantizing {count} layers to NF4" in err and f"{count}/{count}" in err
    get_datalora_model(build_tiny_model(seed=0), DATALORAConfig(**CFG), verbose=True)
    assert "NF4" not in capsys.readouterr().err  # nothing to quantize: no bar


def test_nf4_base_trains_and_reloads_bit_exact(tmp_path):
    model, ids = model_and_ids()
    base_logits = model(input_ids=ids).logits
    cfg = DATALORAConfig(**CFG, quantize="nf4")
    wrapped = get_datalora_model(model, cfg, verbose=False)
    layer = next(layer for _, layer in wrapped.molora_layers())
    assert type(layer.base_layer).__name__ == "NF4Linear"
    logits = wrapped(input_ids=ids).logits
    # 4-bit weights change the output, but only by quantization error
    assert 0 < (logits - base_logits).abs().max() < 0.5 * base_logits.abs().max()
    wrapped.train()
    loss = wrapped(input_ids=ids, labels=ids).loss
    loss.backward()
    assert layer.lora_A.grad is not None
    perturb(wrapped)
    wrapped.eval()
    logits = wrapped(input_ids=ids).logits
    wrapped.save_pretrained(tmp_path)
    reloaded = DATALORAModel.from_pretrained(build_tiny_model(seed=0), tmp_path)
    assert torch.equal(reloaded(input_ids=ids).logits, logits)
    # the 4-bit adapter on a 16-bit model loads, with a warning saying it was trained 4-bit
    plain = get_datalora_model(build_tiny_model(seed=0), DATALORAConfig(**CFG), verbose=False)
    assert plain.get_nb_trainable_parameters() == wrapped.get_nb_trainable_parameters()
    with pytest.warns(UserWarning, match="trained on a 4-bit NF4 base and this model has a "
                                         "16-bit one"):
        plain.load_adapter(tmp_path)
    with pytest.raises(ValueError, match="quantize"):
        DATALORAConfig(quantize="int8")


def test_nf4linear_targets_are_adapted(tmp_path):
    """Another blocksize / double quant: NF4Linear modules swapped in by the user are
    targets like nn.Linear ones, and the adapter reloads onto the same swapped base."""
    from datalora.nf4_linear import NF4Linear

    def swapped():
        model, ids = model_and_ids()
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if isinstance(child, nn.Linear) and name != "lm_head":
                    setattr(module, name, NF4Linear.from_linear(child, 128, True))
        return model, ids

    model, ids = swapped()
    wrapped = get_datalora_model(model, DATALORAConfig(**CFG), verbose=False)
    layers = dict(wrapped.molora_layers())
    assert len(layers) == 28 and all(type(m.base_layer) is NF4Linear for m in layers.values())
    assert next(iter(layers.values())).base_layer.weight.blocksize == 128
    perturb(wrapped)
    wrapped.eval()
    logits = wrapped(input_ids=ids).logits
    wrapped.save_pretrained(tmp_path)
    reloaded = DATALORAModel.from_pretrained(swapped()[0], tmp_path)
    assert torch.equal(reloaded(input_ids=ids).logits, logits)


def test_quantize_keeps_a_tied_target_16_bit():
    """A targeted lm_head tied to the embeddings stays 16-bit (a 4-bit copy would untie it
    and break tie_weights / resize_token_embeddings)."""
    model = build_tiny_model(seed=0, tie_word_embeddings=True)
    cfg = DATALORAConfig(**CFG, quantize="nf4", target_modules=["q_proj", "lm_head"])
    with pytest.warns(UserWarning, match=r"quantize: \['lm_head'\] share their weight"):
        wrapped = get_datalora_model(model, cfg, verbose=False)
    layers = dict(wrapped.molora_layers())
    assert type(layers["lm_head"].base_layer) is nn.Linear
    assert type(layers["model.layers.0.self_attn.q_proj"].base_layer).__name__ == "NF4Linear"
    assert layers["lm_head"].weight is model.get_input_embeddings().weight
    model.tie_weights()
    model.resize_token_embeddings(1040)


def test_cuda_backend_is_checked_before_the_model_changes():
    """backend 'cuda' (the NF4 kernels) on 16-bit layers is refused before any layer is
    replaced (it failed at the first forward); a tied target left 16-bit uses 'auto'."""
    model = build_tiny_model(seed=0, tie_word_embeddings=True)
    with pytest.raises(ValueError, match=r"backend: 'cuda' runs NF4 bases only .*q_proj"):
        get_datalora_model(model, DATALORAConfig(**CFG, backend="cuda"), verbose=False)
    assert not any(isinstance(m, MoLoRALinear) for m in model.modules())
    cfg = DATALORAConfig(**CFG, quantize="nf4", backend="cuda",
                         target_modules=["q_proj", "lm_head"])
    with pytest.warns(UserWarning, match=r"stay 16-bit.*use backend 'auto', not 'cuda'"):
        wrapped = get_datalora_model(model, cfg, verbose=False)
    layers = dict(wrapped.molora_layers())
    assert layers["lm_head"].backend == "auto"
    assert layers["model.layers.0.self_attn.q_proj"].backend == "cuda"


def test_routed_expert_load_skips_layers_of_the_pruned_range():
    """finetune logs the expert load with a mask over every token; the pruned layers
    routed only the kept tokens and are left out instead of failing on the mask."""
    from datalora.finetune import routed_expert_load

    model, ids = model_and_ids()
    wrapped = get_datalora_model(model, DATALORAConfig(**CFG, routing="shared",
                                                       target_retention=0.5), verbose=False)
    wrapped.set_curriculum_state(retention=0.5)  # a new model keeps every token
    wrapped.train()
    wrapped(input_ids=ids)
    mask = torch.ones(ids.numel(), dtype=torch.bool)
    load, _ = routed_expert_load(wrapped, token_mask=mask)
    assert load is not None and abs(sum(load) - 1) < 1e-5
    pruned = [m for _, m in wrapped.molora_layers() if m.last_routing.num_tokens < ids.numel()]
    assert pruned  # the case this covers


def test_auto_routing_falls_back_to_per_layer_where_shared_cannot_run(tmp_path):
    """routing='auto' (the default) builds per-layer routers for a plain module (silently)
    and for a decoder LM whose targets leave the decoder layers (with a warning naming
    why); the saved config records what was built."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = get_datalora_model(nn.Sequential(nn.Linear(8, 8)),
                                   DATALORAConfig(**CFG, target_modules=["0"]), verbose=False)
    assert plain.config_datalora.routing == "per_layer" and plain.saliency is None
    with pytest.warns(UserWarning, match=r"routing='auto' chose 'per_layer'.*lm_head"):
        head = get_datalora_model(build_tiny_model(seed=0), DATALORAConfig(
            **CFG, target_modules=["q_proj", "lm_head"]), verbose=False)
    assert head.saliency is None
    head.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["routing"] == "per_layer"
    user_config = DATALORAConfig(**CFG)
    get_datalora_model(build_tiny_model(seed=0), user_config, verbose=False)
    assert user_config.routing == "auto"  # the caller's config is not modified


def test_load_adapter_forgets_the_retention_the_replaced_threshold_was_calibrated_for(
        tmp_path):
    """The loaded keep_threshold replaces the calibrated one: generation must not warn that
    it was calibrated for the retention of the threshold it replaced."""
    import warnings

    model, ids = model_and_ids()
    wrapped = get_datalora_model(model, DATALORAConfig(**CFG, routing="shared"),
                                 verbose=False).eval()
    wrapped.set_curriculum_state(retention=0.5)
    wrapped(input_ids=ids)
    wrapped.runtime.calibrate(wrapped.runtime.last.saliency.token_scores)
    wrapped.save_pretrained(tmp_path)
    wrapped.set_curriculum_state(retention=0.3)
    wrapped.runtime.calibrate(wrapped.runtime.last.saliency.token_scores)
    wrapped.load_adapter(tmp_path)
    assert wrapped.curriculum_state()["retention"] == 0.5
    assert wrapped.runtime.calibrated_retention is None  # unknown, as after from_pretrained
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="keep_threshold was calibrated")
        wrapped.generate(ids, max_new_tokens=2, do_sample=False)


@pytest.mark.parametrize("kwargs,match", [
    (dict(tau=float("inf")), r"^tau: expected a finite number > 0, got inf"),
    (dict(tau=0.0), r"^tau: expected a finite number > 0"),
    (dict(retention="0.5"), r"^retention: expected a finite number in \(0, 1\]"),
    (dict(retention=True), r"^retention: expected a finite number in \(0, 1\]"),
    (dict(retention=float("nan")), r"^retention: expected a finite number in \(0, 1\]"),
    (dict(hard="no"), r"^hard: expected True or False, got 'no'"),
])
def test_set_curriculum_state_refuses_bad_values_and_changes_nothing(kwargs, match):
    """tau = inf (uniform routing), the string "0.5" and hard="no" (bool("no") is True)
    were accepted; a refused call leaves the state as it was."""
    model, _ = model_and_ids()
    wrapped = get_datalora_model(model, DATALORAConfig(**CFG, routing="shared"),
                                 verbose=False)
    before = wrapped.curriculum_state()
    with pytest.raises(ValueError, match=match):
        wrapped.set_curriculum_state(**{"tau": 1.0, "retention": 0.5, "hard": False,
                                        **kwargs})
    assert wrapped.curriculum_state() == before


def test_a_new_model_keeps_every_token_and_a_loaded_one_its_saved_state(tmp_path):
    """A new shared-routing model runs unpruned (equal to its base at init); a reload
    restores the curriculum state saved with the weights, and an adapter saved without one
    (before it was recorded) loads in the inference state."""
    from safetensors.torch import load_file, save_file

    model, ids = model_and_ids()
    reference = model(input_ids=ids).logits
    wrapped = get_datalora_model(model, DATALORAConfig(**CFG, routing="shared",
                                                       target_retention=0.5), verbose=False)
    assert wrapped.curriculum_state() == {"tau": 0.5, "retention": 1.0, "hard": True}
    assert torch.equal(wrapped(input_ids=ids).logits, reference)
    wrapped.set_curriculum_state(tau=2.0, retention=0.75, hard=False)
    wrapped.save_pretrained(tmp_path)
    again = DATALORAModel.from_pretrained(build_tiny_model(seed=0), tmp_path)
    assert again.curriculum_state() == {"tau": 2.0, "retention": 0.75, "hard": False}
    weights = tmp_path / "adapter_model.safetensors"
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        metadata = {k: v for k, v in f.metadata().items() if k != "curriculum_state"}
    save_file(load_file(weights), weights, metadata=metadata)
    old = DATALORAModel.from_pretrained(build_tiny_model(seed=0), tmp_path)
    assert old.curriculum_state() == {"tau": 0.5, "retention": 0.5, "hard": True}


def test_load_compares_the_resolved_pruned_range(tmp_path):
    """``prune_layers=None`` is the second half of the decoder layers: an adapter saved with
    it loads into a model that names the same range, and not into one with another range."""
    wrapped = get_datalora_model(build_tiny_model(seed=0),
                                 DATALORAConfig(**CFG, routing="shared", prune_layers=None),
                                 verbose=False)
    wrapped.save_pretrained(tmp_path)
    same = DATALORAConfig(**CFG, routing="shared", prune_layers=[2, 4])  # 4 layers: [2, 4)
    get_datalora_model(build_tiny_model(seed=0), same, verbose=False).load_adapter(tmp_path)
    other = DATALORAConfig(**CFG, routing="shared", prune_layers=[1, 4])
    with pytest.raises(ValueError, match="prune_layers: saved"):
        get_datalora_model(build_tiny_model(seed=0), other, verbose=False).load_adapter(tmp_path)


def _with_base_weight(folder, metadata_change):
    """A saved adapter whose weights file also holds a base weight (``lm_head.weight``,
    zeros), its metadata changed by ``metadata_change``: a file edited after saving."""
    def edit(tensors, metadata, wrapped):
        assert json.loads(metadata["base_parameters"]) == []
        head = torch.zeros_like(wrapped.base_model.lm_head.weight)
        return {**tensors, "lm_head.weight": head}, metadata_change(metadata)
    _edited_save(folder, edit)


def test_an_adapter_cannot_replace_base_weights_its_metadata_does_not_list(tmp_path):
    """A downloaded adapter holding a base weight it did not declare (a backdoored or broken
    lm_head) replaced it silently; a file saved before datalora declared them warns."""
    _with_base_weight(tmp_path / "edited", lambda metadata: metadata)
    model = build_tiny_model(seed=0)
    state = _model_state(model)
    with pytest.raises(ValueError, match=r"base weights its metadata does not list "
                                         r"\(\['lm_head.weight'\]"):
        DATALORAModel.from_pretrained(model, tmp_path / "edited")
    _assert_same_state(model, state)
    _with_base_weight(tmp_path / "old", lambda metadata: {
        k: v for k, v in metadata.items() if k != "base_parameters"})
    with pytest.warns(UserWarning, match=r"replaces base weights \['lm_head.weight'\] .*older"):
        loaded = DATALORAModel.from_pretrained(model, tmp_path / "old")
    assert not loaded.base_model.lm_head.weight.any()


@pytest.mark.parametrize("field, value, error", [
    ("num_lora_experts", 10_000_000, r"lora_A: saved shape \(4, 4, \d+\), but .* says "
                                     r"num_lora_experts=10000000"),
    ("lora_rank", 1_000_000, "lora_rank=1000000"),
    ("saliency_hidden_size", 10_000_000, "saliency_hidden_size=10000000"),
])
def test_an_edited_config_is_refused_before_it_allocates(tmp_path, field, value, error):
    """The sizes in adapter_config.json were allocated for every targeted layer before the
    weights file's shapes were compared: ten million experts ran the machine out of
    memory instead of failing."""
    get_datalora_model(build_tiny_model(seed=0), DATALORAConfig(**CFG),
                       verbose=False).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps(config | {field: value}))
    model = build_tiny_model(seed=0)
    state = _model_state(model)
    with pytest.raises(ValueError, match=error):
        DATALORAModel.from_pretrained(model, tmp_path)
    _assert_same_state(model, state)


@pytest.mark.parametrize("edit, error", [
    (lambda t: t.fill_(float("nan")), "holds NaN or inf"),
    (lambda t: t.to(torch.int32), "is torch.int32, expected a float tensor"),
])
def test_non_finite_or_integer_adapter_weights_are_refused(tmp_path, edit, error):
    """A diverged (NaN) adapter loaded silently and gave NaN logits; integer tensors were
    cast with a warning about rounding."""
    key = "model.layers.0.self_attn.q_proj.lora_B"
    saved = {}

    def damage(tensors, metadata, _):
        saved.update(tensors)
        return {**tensors, key: edit(tensors[key].clone())}, metadata
    _edited_save(tmp_path, damage)
    with pytest.raises(ValueError, match=f"path: {key} in .* {error}"):
        DATALORAModel.from_pretrained(build_tiny_model(seed=0), tmp_path)
    # the curriculum's unset keep_threshold is a NaN buffer, not a weight: it loads
    assert saved["saliency.keep_threshold"].isnan()


def test_an_unlisted_base_weight_is_refused_also_when_this_model_trains_it(tmp_path):
    """The check covers base weights the loading model already treats as adapter tensors
    (its lm_head unfrozen before the load), not only the ones it adds for the file."""
    _with_base_weight(tmp_path / "edited", lambda metadata: metadata)
    wrapped = get_datalora_model(build_tiny_model(seed=0), DATALORAConfig(**CFG), verbose=False)
    wrapped.base_model.lm_head.weight.requires_grad_(True)
    with pytest.raises(ValueError, match=r"does not list \(\['lm_head.weight'\]"):
        wrapped.load_adapter(tmp_path / "edited")
    assert wrapped.base_model.lm_head.weight.any()


def test_an_adapter_saved_with_wrapper_segments_in_its_names_loads(tmp_path):
    """Releases before 2026-12-04 saved a checkpoint-wrapped model's adapter under names
    with ``_checkpoint_wrapped_module`` in them; those files fitted no model any more."""
    def wrapped_names(tensors, metadata, _):
        return {k.replace("layers.0.", "layers.0._checkpoint_wrapped_module."): v
                for k, v in tensors.items()}, metadata

    for name, edit in (("old", wrapped_names), ("new", lambda t, metadata, _: (t, metadata))):
        torch.manual_seed(0)  # the same adapter weights
        _edited_save(tmp_path / name, edit)
    ids = torch.randint(4, 1000, (2, 9))
    logits = [DATALORAModel.from_pretrained(build_tiny_model(seed=0), tmp_path / name)(
        input_ids=ids).logits for name in ("old", "new")]
    assert torch.equal(*logits)

    def colliding(tensors, metadata, _):
        key = "model.layers.0.self_attn.q_proj.lora_A"
        wrapped = key.replace("layers.0.", "layers.0._checkpoint_wrapped_module.")
        return {**tensors, wrapped: tensors[key].clone()}, metadata

    _edited_save(tmp_path / "both", colliding)
    with pytest.raises(ValueError, match="names differ only by wrapper segments"):
        DATALORAModel.from_pretrained(build_tiny_model(seed=0), tmp_path / "both")
