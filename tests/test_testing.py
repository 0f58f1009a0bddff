"""The embedded default model and tokenizer (``datalora.testing``)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from datalora.data import (
    CausalLMCollator,
    format_prompt,
    load_instruction_dataset,
    tokenize_example,
)
from datalora.testing import (
    BOS_TOKEN,
    DEFAULT_VOCAB_SIZE,
    EOS_TOKEN,
    PAD_TOKEN,
    UNK_TOKEN,
    build_pretrained_tiny_model,
    build_tiny_model,
    build_tokenizer,
    embedded_corpus,
    load_model_and_tokenizer,
    tiny_mistral_config,
    train_validation_split,
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tokcache")


@pytest.fixture(scope="module")
def tokenizer(cache):
    return build_tokenizer(cache_dir=cache)


@pytest.fixture(scope="module")
def model():
    return build_tiny_model(seed=0)


def _batch(tokenizer, n=4, max_length=96):
    rows = load_instruction_dataset(split="eval", limit=n)
    return CausalLMCollator(tokenizer, max_length=max_length)(rows)


# --------------------------------------------------------------------------- tokenizer

def test_tokenizer_special_tokens_and_padding_side(tokenizer):
    from transformers import PreTrainedTokenizerFast

    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert len(tokenizer) == DEFAULT_VOCAB_SIZE
    assert (tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token,
            tokenizer.pad_token) == (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id,
            tokenizer.pad_token_id) == (0, 1, 2, 3)
    assert tokenizer.padding_side == "right"
    enc = tokenizer(["ab", "What is 12 + 30?"], padding=True)
    assert enc["input_ids"][0][0] == tokenizer.bos_token_id
    assert enc["input_ids"][0][-1] == tokenizer.pad_token_id  # right padding
    assert enc["attention_mask"][0][-1] == 0


def test_tokenizer_round_trip(tokenizer):
    texts = embedded_corpus()[:200] + [
        "  leading and trailing spaces  ", "tabs\tand\nnewlines\r\n", "ünïcödé 漢字 🙂", ""]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
        assert tokenizer.unk_token_id not in ids
    # BPE compresses the training text well below one token per byte
    text = embedded_corpus()[0]
    assert len(tokenizer(text)["input_ids"]) < len(text.encode()) / 2.5


def test_tokenizer_offsets_map_to_characters(tokenizer):
    text = "Reverse the letters: hello"
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    pieces = [text[a:b] for a, b in enc["offset_mapping"]]
    assert "".join(pieces) == text


def test_tokenizer_is_cached_deterministic_and_race_safe(tmp_path, cache, tokenizer):
    # one cache entry, reused: a second build does not add a folder
    entries = sorted(p.name for p in cache.iterdir())
    assert len(entries) == 1 and entries[0].startswith("tokenizer-")
    again = build_tokenizer(cache_dir=cache)
    assert sorted(p.name for p in cache.iterdir()) == entries
    assert again.get_vocab() == tokenizer.get_vocab()
    # two builds racing on an empty cache: same result, one folder, no temp leftovers
    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(lambda _: build_tokenizer(cache_dir=tmp_path / "race"), range(2))
    assert [p.name for p in (tmp_path / "race").iterdir()] == entries
    # a fresh training gives a byte-identical tokenizer.json
    saved = [json.loads((d / entries[0] / "tokenizer.json").read_text())
             for d in (cache, tmp_path / "race")]
    assert saved[0]["model"] == saved[1]["model"]
    assert a.get_vocab() == b.get_vocab() == tokenizer.get_vocab()


def test_second_tokenizer_differs(tmp_path, tokenizer):
    small = build_tokenizer(cache_dir=tmp_path, vocab_size=512)
    assert len(small) == 512
    assert small.eos_token_id == tokenizer.eos_token_id == 2
    text = format_prompt(load_instruction_dataset(limit=1)[0])
    assert small(text)["input_ids"] != tokenizer(text)["input_ids"]
    assert small.decode(small(text)["input_ids"], skip_special_tokens=True) == text
    other = build_tokenizer(cache_dir=tmp_path, vocab_size=300, texts=["abc abd " * 50])
    assert len(other) < 300  # tiny corpus: fewer merges than asked for
    assert other.decode(other("abc zz")["input_ids"], skip_special_tokens=True) == "abc zz"


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(vocab_size=100), ValueError, "vocab_size"),
    (dict(min_frequency=0), ValueError, "min_frequency"),
    (dict(texts="one string"), TypeError, "texts"),
    (dict(texts=[]), TypeError, "texts"),
])
def test_build_tokenizer_validates(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        build_tokenizer(cache_dir=tmp_path, **kwargs)


# --------------------------------------------------------------------------- model

def test_config_is_tiny_mistral():
    cfg = tiny_mistral_config(DEFAULT_VOCAB_SIZE)
    assert cfg.model_type == "mistral"
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.intermediate_size) == (128, 4, 4, 2, 344)
    assert cfg.tie_word_embeddings is False and cfg.max_position_embeddings == 512
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, 3)
    assert tiny_mistral_config(512, num_hidden_layers=2).num_hidden_layers == 2
    with pytest.raises(ValueError, match="vocab_size"):
        tiny_mistral_config(0)


def test_model_forward_shapes_and_loss(model, tokenizer):
    n_params = sum(p.numel() for p in model.parameters())
    assert 0.5e6 < n_params < 3e6
    batch = _batch(tokenizer)
    with torch.no_grad():
        out = model(**batch)
    assert out.logits.shape == (*batch["input_ids"].shape, DEFAULT_VOCAB_SIZE)
    # random init: loss near log(vocab) over the response tokens
    assert abs(out.loss.item() - torch.log(torch.tensor(DEFAULT_VOCAB_SIZE)).item()) < 1.0


def test_model_is_deterministic_by_seed(model):
    state = torch.random.get_rng_state()
    same = build_tiny_model(seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    other = build_tiny_model(seed=1)
    for (name, p), q, r in zip(model.named_parameters(), same.parameters(),
                               other.parameters(), strict=True):
        assert torch.equal(p, q), name
        if p.dim() == 2:
            assert not torch.equal(p, r), name


def test_second_model_and_dtype():
    small = build_tiny_model(seed=0, vocab_size=512, hidden_size=96, num_hidden_layers=3,
                             intermediate_size=256, dtype=torch.bfloat16)
    assert small.config.vocab_size == 512 and len(small.model.layers) == 3
    assert all(p.dtype == torch.bfloat16 for p in small.parameters())
    logits = small(torch.tensor([[1, 5, 9]])).logits
    assert logits.shape == (1, 3, 512) and logits.dtype == torch.bfloat16
    with pytest.raises(TypeError, match="dtype"):
        build_tiny_model(dtype=torch.int8)
    with pytest.raises(TypeError, match="seed"):
        build_tiny_model(seed="0")


def test_save_and_load_round_trip(tmp_path, model, tokenizer):
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, loaded_tok = load_model_and_tokenizer(tmp_path)
    assert type(loaded) is type(model) and not loaded.training
    assert loaded.dtype == torch.float32
    text = embedded_corpus()[3]
    assert loaded_tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    batch = _batch(loaded_tok)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, model(**batch).logits)
    half, _ = load_model_and_tokenizer(str(tmp_path), dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16


def test_load_sets_missing_pad_token(tmp_path, model, tokenizer):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    model.config.pad_token_id = None
    try:
        model.save_pretrained(tmp_path)
    finally:
        model.config.pad_token_id = 3
    loaded, loaded_tok = load_model_and_tokenizer(tmp_path)
    assert loaded_tok.pad_token == EOS_TOKEN and loaded_tok.pad_token_id == 2
    assert loaded.config.pad_token_id == 2


def test_load_embedded_and_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("DATALORA_CACHE", str(tmp_path / "cache"))
    model, tok = load_model_and_tokenizer("embedded", dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and tok.pad_token_id == 3
    assert tok.name_or_path.startswith(str(tmp_path / "cache" / "tokenizer-"))
    with pytest.raises(FileNotFoundError, match="name_or_path"):
        load_model_and_tokenizer(tmp_path / "missing")
    with pytest.raises(ValueError, match="dtype"):
        load_model_and_tokenizer(None, dtype="float99")
    with pytest.raises(TypeError, match="name_or_path"):
        load_model_and_tokenizer(3)


def test_a_model_folder_without_tokenizer_needs_the_tokenizer_argument(tmp_path, model,
                                                                        tokenizer):
    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "tok")
    with pytest.raises(ValueError, match=r"^name_or_path: .*m has no tokenizer \(none of "
                                         r"\['tokenizer.json'.*pass tokenizer= \(datalora train: "
                                         r"--tokenizer\)"):
        load_model_and_tokenizer(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match=r"^tokenizer: no such tokenizer folder: "):
        load_model_and_tokenizer(tmp_path / "m", tokenizer=tmp_path / "nope")
    with pytest.raises(ValueError, match=r"^tokenizer: .*m has no tokenizer"):
        load_model_and_tokenizer(tmp_path / "m", tokenizer=tmp_path / "m")
    text = embedded_corpus()[3]
    for source in (tmp_path / "tok", str(tmp_path / "tok"), tokenizer):
        loaded, loaded_tok = load_model_and_tokenizer(tmp_path / "m", tokenizer=source)
        assert loaded_tok(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert type(loaded) is type(model)


def test_trainer_runs_with_collator(tmp_path, tokenizer):
    from transformers import Trainer, TrainingArguments

    model = build_tiny_model(seed=0)
    rows = load_instruction_dataset(limit=16)
    features = [tokenize_example(r, tokenizer, 96) for r in rows]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8,
                             max_steps=3, learning_rate=3e-3, use_cpu=True, report_to=[],
                             logging_steps=1, save_strategy="no", disable_tqdm=True)
    before = model.lm_head.weight.detach().clone()
    trainer = Trainer(model=model, args=args, train_dataset=features,
                      data_collator=CausalLMCollator(tokenizer))
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert not torch.equal(before, model.lm_head.weight)


# --------------------------------------------------------------------------- pretrained base

PRE_SMALL = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=1)
PRE_STEPS = dict(steps=25, batch_size=8, lr=1e-2, max_length=64, progress=False)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("pretrained")
    model = build_pretrained_tiny_model(seed=0, tokenizer=tokenizer, cache_dir=root,
                                        **PRE_STEPS, **PRE_SMALL)
    return root, model


def test_train_validation_split():
    train, val = train_validation_split()
    assert len(val) == 50 * 4 and len(train) == 450 * 4
    assert not {r["id"] for r in train} & {r["id"] for r in val}
    rows = load_instruction_dataset("embedded", "train")
    for task in ("arithmetic", "lookup"):
        task_rows = [r for r in rows if r["task"] == task]
        assert [r for r in val if r["task"] == task] == task_rows[-50:]
    train2, val2 = train_validation_split(rows[:8], per_task=1)
    assert [r["id"] for r in val2] == [r["id"] for r in rows[4:8]] and train2 == rows[:4]
    with pytest.raises(ValueError, match="per_task"):
        train_validation_split(per_task=-1)


def test_pretrained_model_is_cached_and_deterministic(pretrained, tokenizer, tmp_path,
                                                      monkeypatch):
    root, model = pretrained
    (entry,) = [p for p in root.iterdir() if p.name.startswith("pretrained-")]
    info = json.loads((entry / "pretrain.json").read_text())
    assert info["settings"]["steps"] == 25 and info["last_loss"] < info["first_loss"]
    fresh = build_tiny_model(seed=0, **PRE_SMALL)
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                     fresh.state_dict().values(), strict=True))
    # a second call loads the cached weights without training
    import datalora.finetune

    def no_training(*args, **kwargs):
        raise AssertionError("trained again instead of loading the cache")

    with monkeypatch.context() as m:
        m.setattr(datalora.finetune, "optimisation_steps", no_training)
        again = build_pretrained_tiny_model(seed=0, tokenizer=tokenizer, cache_dir=root,
                                            **PRE_STEPS, **PRE_SMALL)
    assert not again.training and [p.name for p in root.iterdir()] == [entry.name]
    # a fresh training in another cache gives the same weights; other settings another entry
    other = build_pretrained_tiny_model(seed=0, tokenizer=tokenizer, cache_dir=tmp_path,
                                        **PRE_STEPS, **PRE_SMALL)
    for a, b, c in zip(model.state_dict().values(), again.state_dict().values(),
                       other.state_dict().values(), strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    build_pretrained_tiny_model(seed=1, tokenizer=tokenizer, cache_dir=tmp_path,
                                **{**PRE_STEPS, "steps": 2}, **PRE_SMALL)
    assert len(list(tmp_path.iterdir())) == 2


@torch.no_grad()
def test_pretrained_model_beats_the_random_one_on_held_out_rows(pretrained, tokenizer):
    _, model = pretrained
    rows = train_validation_split()[1][::10]  # never seen in pretraining
    batch = tokenizer([format_prompt(r) for r in rows], padding=True, return_tensors="pt")
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    random_loss = build_tiny_model(seed=0, **PRE_SMALL)(**batch, labels=labels).loss
    assert model(**batch, labels=labels).loss < random_loss - 1.0


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(steps=0), ValueError, "steps"),
    (dict(batch_size=1.5), ValueError, "batch_size"),
    (dict(lr=0), ValueError, "lr"),
    (dict(dtype=torch.int8), TypeError, "dtype"),
    (dict(vocab_size=300), ValueError, "tokenizer"),
])
def test_build_pretrained_validates(tmp_path, tokenizer, kwargs, error, match):
    with pytest.raises(error, match=match):
        build_pretrained_tiny_model(tokenizer=tokenizer, cache_dir=tmp_path, progress=False,
                                    **kwargs)
    assert not any(tmp_path.iterdir())


def test_a_damaged_or_half_built_tokenizer_cache_is_built_again(tmp_path):
    """A 0-byte tokenizer.json failed every run ("Expecting value", no path named); a
    target folder left without its marker failed every run ("Directory not empty"); build
    folders of killed processes piled up in the shared cache."""
    import os
    import time

    from datalora.testing import build_tokenizer

    fcntl = pytest.importorskip("fcntl")

    reference = build_tokenizer(tmp_path)
    [folder] = [p for p in tmp_path.iterdir() if p.name.startswith("tokenizer-")]
    (folder / "tokenizer.json").write_text("")
    with pytest.warns(UserWarning, match=rf"{folder.name} does not load .*building it again"):
        again = build_tokenizer(tmp_path)
    text = embedded_corpus()[5]
    assert again(text)["input_ids"] == reference(text)["input_ids"]
    (folder / "tokenizer.json").unlink()  # no marker: a half-built entry
    old = time.time() - 7200
    stale = tmp_path / f".{folder.name}.killed"  # no lock (an older datalora): by age
    stale.mkdir()
    os.utime(stale, (old, old))
    fresh = tmp_path / f".{folder.name}.young"
    fresh.mkdir()
    dead = tmp_path / f".{folder.name}.dead"  # its lock is held by no process
    dead.mkdir()
    (tmp_path / f".{folder.name}.dead.lock").touch()
    running = tmp_path / f".{folder.name}.running"  # a build running for hours, locked
    running.mkdir()
    os.utime(running, (old, old))
    with open(tmp_path / f".{folder.name}.running.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert build_tokenizer(tmp_path)(text)["input_ids"] == reference(text)["input_ids"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [folder.name, fresh.name, running.name, f"{running.name}.lock"])


def test_a_cache_entry_another_process_just_finished_is_kept(tmp_path, monkeypatch):
    """Between the marker check and the discarding of a half-built entry, another process
    may rename its finished build into place: it was discarded and built again."""
    from datalora import testing

    target = tmp_path / "entry"

    def another_process_finishes(entry):
        entry.mkdir()
        (entry / "marker").write_text("theirs")

    monkeypatch.setattr(testing, "_remove_dead_builds", another_process_finishes)
    built = []
    testing._build_cached(target, "marker", lambda tmp: built.append(tmp) or (
        tmp / "marker").write_text("ours"))
    assert (target / "marker").read_text() == "theirs" and not built
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]
