"""User flows outside the kernels: the final curriculum state after a short run, eval
splits of dataset folders and split-keyed files, reading eval data before training,
truncation that keeps the question, CLI errors, flag checks, JSONL edge cases."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from datalora.data import IGNORE_INDEX, load_instruction_dataset, tokenize_example, write_jsonl

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def _row(i):
    return {"system_prompt": "", "question": f"What is {i} + 1?", "response": str(i + 1)}


@pytest.fixture(scope="module")
def tokenizer():
    from datalora.testing import build_tokenizer

    return build_tokenizer()


@pytest.fixture()
def datasetdict_dir(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "dd"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list([_row(i) for i in range(16)]),
        "validation": datasets.Dataset.from_list([_row(i) for i in range(50, 54)]),
    }).save_to_disk(str(path))
    return path


# F1 --------------------------------------------------------------------------------------

def test_trainer_leaves_the_final_curriculum_state_so_reload_is_identical(tmp_path):
    """A 2-step run ends mid-sparsification: the returned model must be in the state a
    reloaded adapter gets (tau_final, target retention, hard), or their logits differ."""
    from datalora.model import DATALORAModel
    from datalora.testing import load_model_and_tokenizer
    from datalora.train import train_datalora

    rows = load_instruction_dataset(limit=16)
    res = train_datalora(None, dataset=rows, output_dir=tmp_path, max_steps=2, batch_size=4,
                         curriculum_mode="steps", progress=False, logging_steps=1)
    assert res.model.curriculum_state() == {"tau": 0.5, "retention": 0.5, "hard": True}
    base, tok = load_model_and_tokenizer()
    reloaded = DATALORAModel.from_pretrained(base, tmp_path)
    probe = tok([r["question"] for r in rows[:4]], return_tensors="pt", padding=True)
    res.model.eval()
    with torch.no_grad():
        assert torch.equal(res.model(**probe).logits, reloaded(**probe).logits)


def test_demo_with_two_steps_passes_its_reload_check(tmp_path):
    from datalora.cli import build_parser

    args = build_parser().parse_args(["demo", "--steps", "2", "--batch-size", "4", "--limit",
                                      "16", "--eval-limit", "8", "--no-progress", "--no-plot",
                                      "--output-dir", str(tmp_path)])
    assert args.func(args)["reload_identical"]  # raised RuntimeError before


# F2 --------------------------------------------------------------------------------------

def test_demo_reads_the_validation_split_of_a_datasets_folder(tmp_path, datasetdict_dir):
    from datalora.cli import build_parser

    args = build_parser().parse_args(["demo", "--method", "molora", "--dataset",
                                      str(datasetdict_dir), "--steps", "2", "--batch-size",
                                      "4", "--no-progress", "--no-plot", "--output-dir",
                                      str(tmp_path / "out")])
    summary = args.func(args)  # ValueError: split 'eval' not in the dataset, before
    assert [q["question"] for q in summary["questions"]] == ["What is 50 + 1?"]


def test_eval_rows_of_a_split_keyed_json(tmp_path):
    from datalora.data import load_eval_rows

    for n_val in (2, 4):  # different / equal lengths: both were misread as columns
        path = tmp_path / f"s{n_val}.json"
        path.write_text(json.dumps({"train": [_row(i) for i in range(4)],
                                    "validation": [_row(i) for i in range(10, 10 + n_val)]}))
        assert [r["question"] for r in load_eval_rows(path)] == [
            _row(i)["question"] for i in range(10, 10 + n_val)]
        assert len(load_instruction_dataset(path)) == 4
    path = tmp_path / "both.json"  # eval before validation before test
    path.write_text(json.dumps({"train": [_row(0)], "test": [_row(1)],
                                "validation": [_row(2)], "eval": [_row(3)]}))
    assert [r["question"] for r in load_eval_rows(path)] == [_row(3)["question"]]
    path.write_text(json.dumps({"train": [_row(0)], "test": [_row(1)],
                                "validation": [_row(2)]}))
    assert [r["question"] for r in load_eval_rows(path)] == [_row(2)["question"]]


def test_a_split_keyed_json_without_the_split_names_the_split(tmp_path):
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"train": [_row(i) for i in range(4)],
                                "validation": [_row(i) for i in range(10, 14)]}))
    with pytest.raises(ValueError, match=r"split: 'eval' not in .*\['train', 'validation'\]"):
        load_instruction_dataset(path, split="eval")


# F3 --------------------------------------------------------------------------------------

def test_train_reads_eval_dataset_before_training(tmp_path, monkeypatch):
    from datalora import train as train_mod
    from datalora.trainer import DATALORATrainer

    def no_training(self, *a, **k):
        raise AssertionError("trained before checking --eval-dataset")

    monkeypatch.setattr(DATALORATrainer, "train", no_training)
    with pytest.raises(FileNotFoundError, match="typo.jsonl"):
        train_mod.train_datalora(None, dataset=load_instruction_dataset(limit=8),
                                 eval_dataset=str(tmp_path / "typo.jsonl"),
                                 output_dir=tmp_path / "o", max_steps=2, progress=False)


# F4 --------------------------------------------------------------------------------------

def test_demo_says_when_eval_rows_are_training_rows(tmp_path, capsys):
    from datalora import demo

    write_jsonl([_row(i) for i in range(6)], tmp_path / "d.jsonl")
    args = argparse.Namespace(dataset=str(tmp_path / "d.jsonl"), limit=4)
    train_rows, eval_rows = demo._load_rows(args)
    assert len(train_rows) == 4 and len(eval_rows) == 6
    assert "4 of the 6 eval rows used are training rows" in capsys.readouterr().out
    # --eval-limit: the note counts the rows the demo evaluates, not the whole split
    demo._load_rows(argparse.Namespace(dataset=str(tmp_path / "d.jsonl"), limit=4,
                                       eval_limit=2, method="datalora"))
    assert "2 of the 2 eval rows used are training rows" in capsys.readouterr().out


# F5 --------------------------------------------------------------------------------------

def test_long_response_does_not_erase_the_question(tokenizer):
    row = {"system_prompt": "", "question": "Sort in ascending order: 5, 3, 9",
           "response": "The numbers sorted in ascending order are 3, 5 and 9. " * 6}
    out = tokenize_example(row, tokenizer, 96)
    assert len(out["input_ids"]) == 96
    prompt = [i for i, lab in zip(out["input_ids"], out["labels"], strict=True)
              if lab == IGNORE_INDEX]
    text = tokenizer.decode(prompt, skip_special_tokens=True)
    assert "5, 3, 9" in text and text.endswith("### Answer:\n")


def test_max_length_2_keeps_a_supervised_token(tokenizer):
    row = {"system_prompt": "", "question": "What is 2 + 2?", "response": "4"}
    out = tokenize_example(row, tokenizer, 2)  # accepted by the validator (>= 2)
    assert len(out["input_ids"]) == 2
    assert sum(lab != IGNORE_INDEX for lab in out["labels"]) == 1  # was 0: loss NaN


# F6 --------------------------------------------------------------------------------------

def test_cli_user_errors_exit_2_without_traceback():
    p = subprocess.run([sys.executable, "-m", "datalora", "demo", "--dataset", "nope.jsonl"],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert p.returncode == 2, p.stderr[-500:]
    assert "Traceback" not in p.stderr and "no such file or folder: nope.jsonl" in p.stderr


def test_demo_names_an_empty_dataset_file(tmp_path, capsys):
    from datalora.cli import main

    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(SystemExit) as exit_info:  # was "eval_dataset: no rows"
        main(["demo", "--dataset", str(tmp_path / "empty.jsonl"), "--steps", "1",
              "--output-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "--dataset (source): " in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--batch-size", "--steps", "--eval-limit", "--limit"])
def test_demo_count_flags_are_checked_by_argparse(flag, capsys):
    from datalora.cli import build_parser

    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["demo", flag, "0"])
    assert exc.value.code == 2 and f"argument {flag}" in capsys.readouterr().err


def test_demo_value_flags_and_method_only_flags(capsys):
    """--lr / --epochs / --retention are checked by argparse; datalora-only flags are
    refused with --method molora instead of being ignored."""
    from datalora import demo
    from datalora.cli import build_parser

    for argv in (["--lr", "-1"], ["--lr", "nan"], ["--epochs", "0"], ["--retention", "1.5"]):
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args(["demo", *argv])
        assert exc.value.code == 2 and f"argument {argv[0]}" in capsys.readouterr().err
    args = build_parser().parse_args(["demo", "--method", "molora", "--epochs", "2",
                                      "--retention", "0.3"])
    with pytest.raises(ValueError, match=r"--epochs, --retention: only for --method datalora"):
        demo.run(args)


def test_finetune_checks_lr_and_warns_on_a_batch_larger_than_the_data():
    import types

    from datalora.finetune import optimisation_steps

    class Scalar(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(2))

        def forward(self, x):
            return types.SimpleNamespace(loss=(x * self.w).sum())

    run = dict(collate=lambda rows: {"x": torch.stack(rows)},
               features=[torch.randn(2) for _ in range(3)], steps=1, progress=False)
    with pytest.raises(ValueError, match="lr"):
        list(optimisation_steps(Scalar(), batch_size=2, lr=-1.0, **run))
    with pytest.warns(UserWarning, match="batch_size: 16 is more than the 3 training examples"):
        steps = list(optimisation_steps(Scalar(), batch_size=16, lr=1e-3, **run))
    assert len(steps) == 1 and steps[0][1]["x"].shape == (3, 2)


@pytest.mark.parametrize("argv", [
    ["tle", "--eval-per-task", "0"], ["tle", "--tau", "0"], ["tle", "--every-n", "0"],
    ["titok", "--seed-prompts", "0"], ["titok", "--eval-rows", "0"], ["titok", "--lr", "-1"],
    ["titok", "--steps", "0"]])
def test_tle_and_titok_flags_are_checked_by_argparse(argv, capsys):
    from datalora.cli import build_parser

    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2 and f"argument {argv[1]}" in capsys.readouterr().err


def test_titok_run_rejects_zero_seed_prompts():
    """``train[-0:]`` would have been every row."""
    from datalora.experiments.titok_evidence import run

    with pytest.raises(ValueError, match="seed_prompts: expected an int >= 1, got 0"):
        run(seed_prompts=0, progress=False)


def test_help_texts_have_no_sphinx_markup():
    from datalora.cli import build_parser, plain_text

    assert plain_text(":class:`~datalora.trainer.DATALORATrainer` and ``x``") == \
        "DATALORATrainer and x"
    parser = build_parser()
    texts = [parser.format_help()] + [
        sub.format_help() for action in parser._subparsers._group_actions
        for sub in action.choices.values()]
    for text in texts:
        assert "``" not in text and ":class:" not in text and ":func:" not in text


def test_tle_cli_checks_embed_layer_before_building_the_pretrained_base(monkeypatch, capsys):
    """The check ran after the pretrained base was built: minutes when it is not cached."""
    from datalora.cli import main
    from datalora.experiments import task_adapters

    def built(*args, **kwargs):
        raise AssertionError("the pretrained base was built before --embed-layer's check")
    monkeypatch.setattr(task_adapters, "build_base_model", built)  # imported when it runs
    with pytest.raises(SystemExit) as exit_info:
        main(["tle", "--embed-layer", "99", "--no-progress"])
    assert exit_info.value.code == 2
    assert "--embed-layer" in capsys.readouterr().err


def test_tle_embed_layer_out_of_range_is_a_value_error():
    from datalora.tle.embedders import HiddenStateEmbedder

    class Model(torch.nn.Module):  # the embeddings + 2 decoder layers' hidden states
        def forward(self, input_ids, attention_mask=None, use_cache=False,
                    output_hidden_states=True, past_key_values=None):
            return type("Out", (), {"hidden_states": (torch.zeros(1, 2, 4),) * 3})()

    class Mixer:
        model = Model()

        def adapters_disabled(self):
            import contextlib
            return contextlib.nullcontext()

    ids = torch.zeros(1, 2, dtype=torch.long)
    assert HiddenStateEmbedder(-3)._hidden(Mixer(), ids, None).shape == (1, 2, 4)
    with pytest.raises(ValueError, match=r"layer: expected a hidden-state index in \[-3, 2\]"):
        HiddenStateEmbedder(99)._hidden(Mixer(), ids, None)


def test_finetune_rejects_batch_size_0(tokenizer):
    from datalora.finetune import finetune

    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="batch_size"):
        finetune(model, tokenizer, load_instruction_dataset(limit=4), steps=1, batch_size=0,
                 progress=False)


# F7 --------------------------------------------------------------------------------------

def test_jsonl_with_a_byte_order_mark(tmp_path):
    (tmp_path / "bom.jsonl").write_text(json.dumps(_row(1)) + "\n", encoding="utf-8-sig")
    assert load_instruction_dataset(tmp_path / "bom.jsonl")[0]["question"] == "What is 1 + 1?"


def test_write_jsonl_removes_its_temp_file_on_failure(tmp_path):
    with pytest.raises(TypeError):
        write_jsonl([_row(1), {"x": object()}], tmp_path / "out.jsonl")
    assert list(tmp_path.iterdir()) == []


def test_cli_errors_name_the_flag_the_user_typed():
    from datalora.cli import name_the_flag

    flags = {"source": "--dataset"}
    assert name_the_flag("source: no such file or folder: x", flags) == \
        "--dataset (source): no such file or folder: x"
    assert name_the_flag("other: bad", flags) == "other: bad"
    assert name_the_flag("no colon here", flags) == "no colon here"
    from datalora.cli import build_parser

    train_flags = build_parser().parse_args(["train"]).flag_names
    assert train_flags["eval_dataset"] == "--eval-dataset"
    p = subprocess.run([sys.executable, "-m", "datalora", "demo", "--top-k", "9"],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert p.returncode == 2 and "error: --top-k (num_active_experts): expected" in p.stderr


@pytest.mark.parametrize("argv,usage", [(["train", "--bogus"], "datalora train"),
                                        (["demo", "--steps", "3", "--bogus"], "datalora demo"),
                                        (["--bogus", "demo"], "datalora")])
def test_an_unknown_option_is_reported_against_its_command(argv, usage, capsys):
    """After a command, argparse's top-level parser used to report it with the top-level
    usage; the command's own usage and prefix now say which command refused it."""
    from datalora.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert f"{usage}: error: unrecognized arguments: --bogus" in err, err
    assert f"usage: {usage} " in err, err


def test_train_names_a_bad_eval_dataset():
    from datalora.train import train_datalora

    with pytest.raises(FileNotFoundError, match="eval_dataset: "):
        train_datalora(eval_dataset="/nonexistent/eval.jsonl", max_steps=1)


# train CLI with a user's own model and data -------------------------------------------

def test_train_checks_data_and_flags_before_loading_the_model(tmp_path, monkeypatch):
    from datalora import testing
    from datalora.train import train_datalora

    def no_loading(*a, **k):
        raise AssertionError("loaded the model before checking the arguments")

    monkeypatch.setattr(testing, "load_model_and_tokenizer", no_loading)
    bad = tmp_path / "bad.jsonl"
    write_jsonl([{"prompt": "q", "completion": "r"}], bad)
    empty = str(tmp_path / "empty.jsonl")
    write_jsonl([], empty)
    run = tmp_path / "run"
    (run / "checkpoint-2").mkdir(parents=True)
    (run / "checkpoint-10").mkdir()
    good = load_instruction_dataset(limit=4)
    for kwargs, error, match in (
            ({"dataset": str(bad)}, ValueError, r"line 1 of .*bad\.jsonl is missing"),
            ({"dataset": good, "max_length": 1}, ValueError, "max_length: expected an int >= 2"),
            ({"dataset": good, "resume_from_checkpoint": str(tmp_path / "nope")},
             FileNotFoundError, "resume_from_checkpoint: no such folder"),
            ({"dataset": good, "resume_from_checkpoint": str(run)}, ValueError,
             r"no trainer_state\.json\); it holds 2 checkpoint folder\(s\), the latest is "
             r".*checkpoint-10$"),
            ({"dataset": good, "trainer_args": {"eval_strategy": "steps"}}, ValueError,
             r"eval_strategy='steps' needs eval rows: set eval_dataset \(--eval-dataset\)"),
            ({"dataset": good, "limit": 0}, ValueError, r"no training rows \(limit=0\)"),
            ({"dataset": empty}, ValueError,
             r"no training rows \(limit=None\) in .*empty\.jsonl"),
            ({"dataset": good, "bf16": "false"}, ValueError,
             r"bf16: expected true or false, got 'false'"),
            ({"dataset": good, "logging_steps": 0}, ValueError, r"logging_steps: expected"),
            ({"dataset": good, "epochs": 0}, ValueError, r"^epochs: expected"),
            ({"dataset": good, "seed": "abc"}, ValueError, r"seed: expected"),
            ({"dataset": good, "trainer_args": {"per_device_train_batch_size": 0}}, ValueError,
             r"^trainer_args\.per_device_train_batch_size: expected an int >= 1, got 0"),
            ({"dataset": good, "trainer_args": {"learning_rate": -1}}, ValueError,
             r"^trainer_args\.learning_rate: expected a finite number >= 0, got -1"),
            ({"dataset": good, "seed": -1}, ValueError,  # numpy's error named no argument
             r"^seed: expected an int in \[0, 4294967295\], got -1"),
            ({"dataset": good, "curriculum_mode": "linear"}, ValueError,
             r"curriculum_mode: expected 'steps' or 'epochs', got 'linear'"),
            ({"dataset": [{"instruction": "Add", "output": 3}]}, ValueError,
             r"^dataset: column 'response' of row index 0 \(0-based\) of the dataset list "
             r"must be a string, got int"),
            ({"dataset": good, "eval_dataset": [*good, {"prompt": "q"}]}, ValueError,
             r"^eval_dataset: row index 4 \(0-based\) of the eval_dataset list is missing"),
            ({"dataset": good, "eval_dataset": []}, ValueError, r"^eval_dataset: no rows$"),
            ({"dataset": good, "eval_dataset": good, "eval_limit": 0}, ValueError,
             r"^eval_limit: expected an int >= 1"),
            ({"dataset": good, "resume_from_checkpoint": "last"}, ValueError,
             r"found no complete checkpoint-N folder \(with trainer_state.json\) in "
             r"the output folder .*o$"),
            # wrong types (a config file's value): TypeErrors naming the key, not a bare
            # "expected str, bytes or os.PathLike object" or an AttributeError
            ({"dataset": good, "resume_from_checkpoint": 3}, TypeError,
             r"^resume_from_checkpoint: expected a checkpoint folder, 'last', True or None, "
             r"got 3$"),
            ({"dataset": good, "tokenizer": 5}, TypeError,
             r"^tokenizer: expected None, a folder, a Hub name or a loaded tokenizer, got 5$")):
        with pytest.raises(error, match=match):
            train_datalora(None, output_dir=tmp_path / "o", max_steps=1, progress=False,
                           **kwargs)
    with pytest.raises(TypeError, match=r"^output_dir: expected a folder path, got 5$"):
        train_datalora(None, output_dir=5, dataset=good, max_steps=1, progress=False)


def test_train_path_arguments_take_a_path(tmp_path, monkeypatch):
    """``py.typed``: model_name_or_path, dataset, eval_dataset and resume_from_checkpoint
    take a ``Path`` (each is read through ``Path()`` / ``str()``) but were annotated
    without one, so a type checker rejected ``train_datalora(dataset=Path(...))``."""
    import typing

    from datalora import testing
    from datalora.train import train_datalora

    hints = typing.get_type_hints(train_datalora)
    for name in ("model_name_or_path", "dataset", "eval_dataset", "resume_from_checkpoint"):
        accepted = {typing.get_origin(a) or a for a in typing.get_args(hints[name])}
        assert os.PathLike in accepted, (name, hints[name])

    def no_loading(*a, **k):
        raise AssertionError("loaded the model before checking the arguments")

    monkeypatch.setattr(testing, "load_model_and_tokenizer", no_loading)
    good = load_instruction_dataset(limit=4)
    for kwargs, error, match in (
            ({"dataset": tmp_path / "none.jsonl"}, FileNotFoundError, "none.jsonl"),
            ({"dataset": good, "eval_dataset": tmp_path / "none.jsonl"}, FileNotFoundError,
             r"^eval_dataset: .*none\.jsonl"),
            ({"dataset": good, "resume_from_checkpoint": tmp_path / "nope"},
             FileNotFoundError, "resume_from_checkpoint: no such folder")):
        with pytest.raises(error, match=match):
            train_datalora(None, output_dir=tmp_path / "o", max_steps=1, progress=False,
                           **kwargs)

def test_train_maps_alpaca_and_chat_rows_given_as_lists(tmp_path):
    from datalora.train import train_datalora

    alpaca = [{"instruction": f"Add 1 to {i}", "output": str(i + 1)} for i in range(4)]
    chat = [{"messages": [{"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello"}]}] * 2
    result = train_datalora(None, dataset=alpaca, eval_dataset=chat, max_steps=1,
                            batch_size=4, output_dir=tmp_path / "o", progress=False)
    assert result.metrics["eval_rows"] == 2


@pytest.fixture()
def opt_folder(tmp_path, tokenizer):
    """A tiny OPT (learned position embeddings, 64 positions) saved with a tokenizer."""
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(vocab_size=1024, hidden_size=64, num_hidden_layers=2, ffn_dim=128,
                       num_attention_heads=4, max_position_embeddings=64,
                       word_embed_proj_dim=64, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(0)
    OPTForCausalLM(config).save_pretrained(tmp_path / "opt")
    tokenizer.save_pretrained(tmp_path / "opt")
    return tmp_path / "opt"


def test_max_length_is_checked_against_learned_positions(tmp_path, opt_folder, monkeypatch):
    from datalora import testing
    from datalora.train import train_datalora

    long_rows = [{"question": "Summarize: " + "alpha beta gamma " * 30, "response": "ok " * 5}
                 for _ in range(4)]
    common = dict(config={"num_lora_experts": 2, "lora_rank": 2, "routing": "shared",
                          "target_modules": ["q_proj", "v_proj"]},
                  dataset=long_rows, max_steps=1, batch_size=4, progress=False,
                  output_dir=tmp_path / "o")
    load = testing.load_model_and_tokenizer
    # the default (1024) is capped at the 64 positions: no IndexError mid-training
    with pytest.warns(UserWarning, match="truncated 4 of 4 to max_length=64"):
        train_datalora(model_name_or_path=str(opt_folder), **common)
    model, tok = load(str(opt_folder))
    with pytest.raises(ValueError, match=r"^max_length: the model takes at most 64 positions "
                                         r".*got 65$"):
        train_datalora(model=model, tokenizer=tok, max_length=65, **common)
    with pytest.warns(UserWarning, match="truncated 4 of 4 to max_length=64"):  # the limit
        train_datalora(model=model, tokenizer=tok, max_length=64, **common)

    def no_loading(*a, **k):
        raise AssertionError("loaded the model before checking max_length")

    monkeypatch.setattr(testing, "load_model_and_tokenizer", no_loading)
    with pytest.raises(ValueError, match=r"^max_length: the model takes at most 64 positions"):
        train_datalora(model_name_or_path=str(opt_folder), max_length=128, **common)


def test_short_runs_log_their_loss_and_save_steps_writes_checkpoints(tmp_path):
    """A run shorter than the default 5 logging steps still logs its loss (the default is
    min(5, max_steps)); ``save_steps`` saves a checkpoint-N folder every N steps."""
    from datalora.train import train_datalora

    result = train_datalora(None, dataset=load_instruction_dataset(limit=8), max_steps=2,
                            batch_size=4, save_steps=1, progress=False,
                            output_dir=tmp_path / "o")
    assert [e["step"] for e in result.log_history if "loss" in e] == [2]
    assert sorted(p.name for p in (tmp_path / "o").glob("checkpoint-*")) == [
        "checkpoint-1", "checkpoint-2"]


def test_final_eval_losses_are_pruned_and_dense(tmp_path):
    """``eval_loss_pruned`` is the eval loss at the calibrated keep threshold and
    ``eval_loss_dense`` at retention 1.0 (``evaluate_loss`` of the trained model)."""
    from datalora.train import evaluate_loss, train_datalora

    rows = load_instruction_dataset(limit=8)
    eval_rows = load_instruction_dataset(split="eval", limit=6)
    result = train_datalora(None, dataset=rows, eval_dataset=eval_rows, max_steps=2,
                            batch_size=4, progress=False, output_dir=tmp_path / "o")
    model, tok = result.model, result.tokenizer
    dense = evaluate_loss(model, eval_rows, tok, retention=1.0)
    pruned = evaluate_loss(model, eval_rows, tok)
    assert result.metrics["eval_loss_dense"] == pytest.approx(dense, rel=1e-6)
    assert result.metrics["eval_loss_pruned"] == pytest.approx(pruned, rel=1e-6)
    assert dense != pytest.approx(pruned, rel=1e-6)  # pruning on: another loss


def test_a_loaded_model_needs_its_loaded_tokenizer(tmp_path):
    """With ``model=`` a loaded model, a tokenizer folder / name is refused (it could be
    another model's vocabulary), as is none."""
    from datalora import testing
    from datalora.train import train_datalora

    model, _ = testing.load_model_and_tokenizer(None)
    for tokenizer in (None, "some-org/some-tokenizer", tmp_path):
        with pytest.raises(TypeError, match=r"^tokenizer: with a loaded model, pass its "
                                            r"loaded tokenizer"):
            train_datalora(None, model=model, tokenizer=tokenizer, max_steps=1,
                           progress=False, output_dir=tmp_path / "o")


def test_output_folder_is_checked_writable_before_loading(tmp_path, monkeypatch):
    from datalora import testing
    from datalora.train import train_datalora

    def no_loading(*a, **k):
        raise AssertionError("loaded the model")

    monkeypatch.setattr(testing, "load_model_and_tokenizer", no_loading)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(NotADirectoryError, match=r"^output_dir: cannot write to the output "
                                                 r"folder .*file\.txt/sub"):
        train_datalora(None, dataset=load_instruction_dataset(limit=4), max_steps=1,
                       output_dir=tmp_path / "file.txt" / "sub", progress=False)
    with pytest.raises(AssertionError, match="loaded the model"):  # created, then loading
        train_datalora(None, dataset=load_instruction_dataset(limit=4), max_steps=1,
                       output_dir=tmp_path / "new" / "run", progress=False)
    assert (tmp_path / "new" / "run").is_dir() and not any((tmp_path / "new" / "run").iterdir())


def _fake_checkpoint(folder, state=None):
    """A Trainer checkpoint folder's files (``trainer_state.json``, optimizer and scheduler
    states: empty stand-ins), without a model."""
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps(state or {}))
    for name in ("optimizer.pt", "scheduler.pt"):
        (folder / name).write_bytes(b"")
    return folder


def test_a_fresh_run_refuses_an_earlier_runs_checkpoints(tmp_path, monkeypatch):
    """'last' would otherwise resume the earlier run's highest checkpoint-N."""
    from datalora import testing
    from datalora.train import train_datalora

    def no_loading(*a, **k):
        raise AssertionError("loaded the model")

    monkeypatch.setattr(testing, "load_model_and_tokenizer", no_loading)
    run = tmp_path / "run"
    for n in (5, 9):
        _fake_checkpoint(run / f"checkpoint-{n}")
    other = _fake_checkpoint(tmp_path / "other" / "checkpoint-3")
    common = dict(dataset=load_instruction_dataset(limit=4), max_steps=1, output_dir=run,
                  progress=False)
    for resume in (None, str(other)):
        with pytest.raises(ValueError, match=r"^output_dir: the output folder .*run holds "
                                             r"checkpoints of an earlier run \(checkpoint-5, "
                                             r"checkpoint-9\); resume it .*overwrite_output_dir"):
            train_datalora(None, resume_from_checkpoint=resume, **common)
    for resume in ("last", str(run / "checkpoint-5")):  # resuming this folder's run is fine
        with pytest.raises(AssertionError, match="loaded the model"):
            train_datalora(None, resume_from_checkpoint=resume, **common)
    with pytest.raises(ValueError, match=r"overwrite_output_dir: expected true or false"):
        train_datalora(None, overwrite_output_dir="yes", **common)
    (run / "adapter_config.json").write_text("{}")
    with pytest.warns(UserWarning, match=r"deleted the earlier run's checkpoint-5, "
                                         r"checkpoint-9"), \
            pytest.raises(AssertionError, match="loaded the model"):
        train_datalora(None, overwrite_output_dir=True, **common)
    assert sorted(p.name for p in run.iterdir()) == ["adapter_config.json"]


def test_train_tokenizer_option_for_a_model_folder_without_one(tmp_path, tokenizer,
                                                               monkeypatch, capsys):
    from datalora import testing
    from datalora.cli import build_parser
    from datalora.train import train_datalora

    testing.build_tiny_model().save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "tok")
    data = tmp_path / "d.jsonl"
    write_jsonl(load_instruction_dataset(limit=4), data)
    argv = ["train", "--model", str(tmp_path / "m"), "--dataset", str(data), "--max-steps",
            "1", "--batch-size", "4", "--output-dir", str(tmp_path / "o")]
    args = build_parser().parse_args([*argv, "--tokenizer", str(tmp_path / "tok")])
    assert args.func(args).tokenizer("a b")["input_ids"] == tokenizer("a b")["input_ids"]
    assert "adapter saved to" in capsys.readouterr().out

    def no_loading(*a, **k):
        raise AssertionError("loaded the model")

    monkeypatch.setattr(testing, "load_model_and_tokenizer", no_loading)
    with pytest.raises(ValueError, match=r"^name_or_path: .*m has no tokenizer .*--tokenizer"):
        args = build_parser().parse_args(argv)
        args.func(args)
    with pytest.raises(TypeError, match=r"^tokenizer: with a loaded model, pass its loaded "
                                        r"tokenizer, got None"):
        train_datalora(model=testing.build_tiny_model(), dataset=str(data), progress=False,
                       output_dir=tmp_path / "o2")


def test_train_refuses_a_tokenizer_larger_than_the_models_vocabulary(tmp_path, tokenizer,
                                                                    capsys):
    """A tokenizer of another model (more tokens than the model's embeddings) is refused
    once the rows are tokenized, naming --tokenizer; it failed at the first training step
    with an IndexError traceback from torch.embedding."""
    from datalora import cli, testing

    testing.build_tiny_model(vocab_size=256).save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "tok")  # 1024 tokens
    data = tmp_path / "d.jsonl"
    write_jsonl(load_instruction_dataset(limit=4), data)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--model", str(tmp_path / "m"), "--tokenizer", str(tmp_path / "tok"),
                  "--dataset", str(data), "--max-steps", "1", "--batch-size", "4",
                  "--output-dir", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert "error: --tokenizer (tokenizer): gives token id" in err and "have 256 rows" in err


def test_resume_last_is_the_latest_checkpoint_of_the_output_folder(tmp_path):
    from datalora.train import _check_checkpoint

    for n in (2, 10, 9):
        _fake_checkpoint(tmp_path / f"checkpoint-{n}")
    (tmp_path / "checkpoint-x").mkdir()
    for last in ("last", True):
        assert _check_checkpoint(last, tmp_path) == tmp_path / "checkpoint-10"
    assert _check_checkpoint(None, tmp_path) is None
    (tmp_path / "checkpoint-12").mkdir()  # a save cut short: no trainer_state.json
    with pytest.warns(UserWarning, match="skipping checkpoint-12 .*resuming checkpoint-10"):
        assert _check_checkpoint("last", tmp_path) == tmp_path / "checkpoint-10"
    # killed while the Trainer wrote trainer_state.json (its last file, not written
    # atomically): 'last' resumed it and the Trainer failed on the JSON after the model loaded
    (tmp_path / "checkpoint-12" / "trainer_state.json").write_text('{"best_global_st')
    with pytest.warns(UserWarning, match="skipping checkpoint-12 .*resuming checkpoint-10"):
        assert _check_checkpoint("last", tmp_path) == tmp_path / "checkpoint-10"
    with pytest.raises(ValueError, match=r"checkpoint-12/trainer_state\.json is not valid JSON"):
        _check_checkpoint(tmp_path / "checkpoint-12", tmp_path)
    # save_only_model: no optimizer / scheduler state; refused before the model loads
    for name in ("optimizer.pt", "scheduler.pt"):
        (tmp_path / "checkpoint-10" / name).unlink()
    for path in ("last", tmp_path / "checkpoint-10"):
        with pytest.raises(ValueError, match=r"checkpoint-10 holds no optimizer or scheduler "
                                             r"state \(saved with save_only_model=True\?\)"):
            _check_checkpoint(path, tmp_path)


def test_resuming_a_finished_run_trains_no_step_past_max_steps(tmp_path, monkeypatch):
    """transformers' Trainer resumed from the checkpoint at max_steps trains one more step
    (a 5th of 4, changing the adapter a finished run saved); train_datalora refuses it."""
    from datalora import testing
    from datalora.data import load_instruction_dataset
    from datalora.train import train_datalora

    def no_loading(*a, **k):
        raise AssertionError("loaded the model")

    monkeypatch.setattr(testing, "load_model_and_tokenizer", no_loading)
    ckpt = _fake_checkpoint(tmp_path / "checkpoint-4", {"global_step": 4, "max_steps": 4})
    for resume in ("last", str(ckpt)):
        with pytest.raises(ValueError, match=r"checkpoint-4 is at step 4 and this run stops at "
                                             r"max_steps=4: nothing is left to train"):
            train_datalora(None, dataset=load_instruction_dataset(limit=4), max_steps=4,
                           output_dir=tmp_path, resume_from_checkpoint=resume, progress=False)


def test_train_limit_is_checked_by_argparse(capsys):
    from datalora.cli import build_parser

    for value in ("0", "-3"):
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args(["train", "--limit", value])
        assert exc.value.code == 2 and "argument --limit" in capsys.readouterr().err


def test_train_json_is_json_with_eval_metrics_on_every_eval_row(tmp_path, capsys):
    """``--json``: stdout holds only the JSON summary (with the eval losses over all 210
    eval rows, not the first 200); ``trainer_args: {eval_strategy: steps}`` evaluates the
    eval rows during training; a 1-step run logs its step."""
    from datalora.cli import build_parser

    write_jsonl([_row(i) for i in range(100, 310)], tmp_path / "eval.jsonl")
    cfg = tmp_path / "run.yaml"
    cfg.write_text("num_lora_experts: 2\nlora_rank: 2\ntraining:\n"
                   "  trainer_args: {eval_strategy: steps, eval_steps: 1}\n")
    out = tmp_path / "out"
    args = build_parser().parse_args(
        ["train", "--config", str(cfg), "--limit", "4", "--batch-size", "4", "--max-steps",
         "1", "--eval-dataset", str(tmp_path / "eval.jsonl"), "--output-dir", str(out),
         "--json"])
    result = args.func(args)
    captured = capsys.readouterr()
    summary = json.loads(captured.out)
    assert "trainable params" in captured.err
    # the final evaluations (minutes on a large eval set) show progress bars, on stderr
    assert "eval loss (pruned)" in captured.err and "eval loss (dense)" in captured.err
    assert summary["output_dir"] == str(out) and set(summary["phases"]) == {"warmup"}
    assert summary["metrics"]["eval_rows"] == 210
    assert summary["metrics"]["eval_loss_pruned"] > 0 and summary["metrics"]["eval_loss_dense"] > 0
    assert summary["keep_threshold"] == result.keep_threshold
    assert any("eval_loss" in entry for entry in result.log_history)


@pytest.mark.parametrize("rank, printed", [("0", True), ("1", False)])
def test_train_prints_its_summary_on_the_main_rank_only(tmp_path, monkeypatch, capsys, rank,
                                                        printed):
    """Under torchrun every rank ran the command: --json printed one JSON document per
    rank on stdout (not parseable as one value), with each rank's own phase table."""
    import datalora.train as train_module
    from datalora.cli import build_parser

    result = train_module.TrainResult(log_history=[], datalora_history=[], phase_summary={},
                                      output_dir=str(tmp_path / "out"))
    monkeypatch.setattr(train_module, "train_datalora", lambda config, **kw: result)
    monkeypatch.setenv("RANK", rank)
    args = build_parser().parse_args(["train", "--output-dir", str(tmp_path / "out"),
                                      "--json"])
    args.func(args)
    out = capsys.readouterr().out
    assert (json.loads(out)["output_dir"] == str(tmp_path / "out")) if printed else out == ""


def test_train_warns_how_many_rows_were_truncated(tokenizer):
    from datalora.train import _tokenized_rows

    rows = [_row(1), {**_row(2), "response": "many words " * 40}]
    with pytest.warns(UserWarning, match=r"training rows: truncated 1 of 2 to max_length=32 "
                                         r"\(1 lost response tokens and their EOS"):
        items = _tokenized_rows(rows, tokenizer, 32, "training rows")
    assert [len(i["input_ids"]) <= 32 for i in items] == [True, True]


def test_summary_says_why_the_phase_table_is_empty():
    from datalora.train import TrainResult, format_summary

    text = format_summary(TrainResult([], [], {}, "out"))
    assert "no log entries: the run had fewer optimizer steps than logging_steps" in text


def test_model_path_errors_say_what_is_wrong(tmp_path, monkeypatch):
    from datalora.testing import load_model_and_tokenizer

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(ValueError, match="models is not a model folder .no config.json"):
        load_model_and_tokenizer("models")  # was a tokenizer-conversion error
    with pytest.raises(FileNotFoundError, match="no such model folder: models/typo"):
        load_model_and_tokenizer("models/typo")  # was a minute of Hub retries


def test_demo_note_when_the_eval_split_shares_training_rows(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    from datalora import demo

    path = tmp_path / "dd"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_list([_row(i) for i in range(6)]),
        "validation": datasets.Dataset.from_list([_row(i) for i in (4, 5, 50, 51)]),
    }).save_to_disk(str(path))
    demo._load_rows(argparse.Namespace(dataset=str(path), limit=None))
    out = capsys.readouterr().out
    assert "2 of the 4 eval rows used are training rows (the eval split of" in out
    assert "shares them with its train split" in out and "has no eval" not in out
    assert "partly on training data" in out


def test_importing_datalora_silences_the_bitsandbytes_kernel_message():
    """bitsandbytes' CPU backend logs at import that an optional Hub kernel is missing
    (datalora does not use it): neither the library nor the CLI shows it; a level the
    user set on that logger is kept."""
    code = ("import logging; from datalora import DATALORATrainer; import bitsandbytes; "
            "print(logging.getLogger('bitsandbytes.backends.cpu.ops').level)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV,
                       timeout=300)
    assert p.returncode == 0 and "gemm_4bit" not in p.stderr, p.stderr
    assert p.stdout.strip() == "40"  # ERROR
    code = ("import logging; logging.getLogger('bitsandbytes.backends.cpu.ops').setLevel(10);"
            " import datalora; print(logging.getLogger('bitsandbytes.backends.cpu.ops').level)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV,
                       timeout=300)
    assert p.stdout.strip() == "10"


def test_cli_names_the_extra_of_a_missing_optional_package(monkeypatch, capsys):
    from datalora import cli

    def needs_peft(args):
        import peft_not_installed_here  # noqa: F401

    parser = cli.build_parser()
    real_parse = parser.parse_known_args

    def parse(argv):
        args, unknown = real_parse(argv)
        args.func = needs_peft
        return args, unknown

    monkeypatch.setattr(parser, "parse_known_args", parse)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    monkeypatch.setitem(cli.EXTRAS, "peft_not_installed_here", "peft")
    monkeypatch.delenv("DATALORA_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["titok"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "needs the optional package 'peft_not_installed_here'" in err
    assert "pip install 'datalora[peft]'" in err


def test_demo_model_folder_without_tokenizer_names_no_missing_flag(tmp_path, capsys):
    """``demo`` has no ``--tokenizer``: its error for a model folder saved without its
    tokenizer must not tell the user to pass one to it (only ``datalora train`` has it)."""
    from datalora import testing
    from datalora.cli import main

    testing.build_tiny_model().save_pretrained(tmp_path / "m")
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--model", str(tmp_path / "m"), "--steps", "1"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "has no tokenizer" in err
    assert "pass tokenizer (--tokenizer)" not in err
    assert "datalora train: --tokenizer" in err


def test_molora_demo_shows_the_expert_load_of_rows_without_a_task(tmp_path, capsys):
    """A --dataset without a 'task' column: the MoLoRA demo printed an empty "expert load
    per task" section (the datalora demo lists such rows as "unknown"), and "first 5
    steps" after 2 steps (then the same 2 steps as "first" and "last")."""
    from datalora.cli import build_parser

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i} + {i}?",
                                        "response": str(2 * i)}) + "\n" for i in range(8)))
    args = build_parser().parse_args(["demo", "--method", "molora", "--dataset", str(data),
                                      "--steps", "2", "--batch-size", "4", "--no-progress",
                                      "--no-plot", "--output-dir", str(tmp_path / "out")])
    args.func(args)
    out = capsys.readouterr().out
    section = out.split("expert load per task, last step (% of routes per expert):\n")[1]
    assert section.lstrip().startswith("unknown: [")
    assert "(first step)" in out and "(last step)" in out


@pytest.mark.parametrize("module", ["benchmarks.bench_tle", "datalora.experiments.tle_evidence",
                                    "datalora.experiments.titok_evidence"])
def test_readme_commands_usage_names_the_module(module, capsys):
    """Run as the README says (python -m ...), the usage line said "bench_tle.py" etc."""
    import importlib

    with pytest.raises(SystemExit) as exc:
        importlib.import_module(module).main(["--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m {module} ")


def test_train_config_value_of_a_wrong_type_is_a_clean_cli_error(tmp_path, capsys,
                                                                 monkeypatch):
    """A config file value of the wrong type (the library raises TypeError naming it) ended
    the command with a traceback and status 1, unlike a wrong value (status 2, one line)."""
    from datalora.cli import main

    monkeypatch.delenv("DATALORA_DEBUG", raising=False)
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"training": {"trainer_args": [1]}}))
    with pytest.raises(SystemExit) as exc:
        main(["train", "--config", str(cfg), "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert "datalora train: error: trainer_args: expected a mapping" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_train_with_a_backend_this_machine_lacks_fails_before_loading(tmp_path, capsys,
                                                                      monkeypatch):
    """``backend: cuda`` (the NF4 kernels) on a machine without CUDA loaded the model and
    the data, then the first step raised BackendUnavailableError (a RuntimeError): a
    traceback and status 1. Now one line, status 2, before anything loads; an error of
    that type from elsewhere gets the same line."""
    from datalora import cli, data, train
    from datalora.ops.backends import BackendUnavailableError

    monkeypatch.delenv("DATALORA_DEBUG", raising=False)
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"quantize": "nf4", "backend": "cuda"}))
    loaded = []
    monkeypatch.setattr(data, "load_instruction_dataset", lambda *a, **k: loaded.append(a))
    filters = list(warnings.filters)
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--config", str(cfg), "--output-dir", str(tmp_path / "out")])
    assert exc.value.code == 2 and loaded == []
    assert warnings.filters == filters  # main's own filter no longer outlives it
    assert ("datalora train: error: backend: 'cuda' cannot run on this machine: the "
            "datalora._C kernels need a CUDA device" in capsys.readouterr().err)

    def unavailable(*args, **kwargs):
        raise BackendUnavailableError("backend 'triton' needs a CUDA device")

    monkeypatch.setattr(train, "train_datalora", unavailable)
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--output-dir", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert "datalora train: error: backend 'triton' needs" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["molora", "datalora"])
def test_demo_output_dir_that_is_a_file_fails_before_training(tmp_path, monkeypatch, method):
    """The MoLoRA demo trained first and then failed at the save with a bare
    FileExistsError that named no flag."""
    from datalora import demo
    from datalora.cli import build_parser

    afile = tmp_path / "afile"
    afile.write_text("x")

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before the output folder was checked")

    monkeypatch.setattr(demo, "load_model_and_tokenizer", no_model)
    args = build_parser().parse_args(["demo", "--method", method, "--steps", "1", "--no-plot",
                                      "--no-progress", "--output-dir", str(afile)])
    with pytest.raises(ValueError, match=r"--output-dir: .*afile is a file, expected a folder"):
        args.func(args)
    # and the adapter flags: --top-k above --experts failed after the model had loaded
    args = build_parser().parse_args(["demo", "--method", method, "--experts", "2", "--top-k",
                                      "3", "--output-dir", str(tmp_path / "out")])
    with pytest.raises(ValueError, match=r"^num_active_experts: expected <= "
                                         r"num_lora_experts=2, got 3"):
        args.func(args)


def test_evidence_scripts_check_out_and_tune_keeps_before_the_runs(tmp_path, monkeypatch,
                                                                   capsys):
    """An --out below a file or naming a folder failed at the write after minutes of runs;
    a --tune-keeps without its colon was "not enough values to unpack"."""
    import datalora.experiments.task_adapters as task_adapters
    from datalora.experiments import titok_evidence, tle_evidence

    def no_work(*args, **kwargs):
        raise AssertionError("worked before --out was checked")

    monkeypatch.setattr(task_adapters, "train_task_adapter", no_work)
    monkeypatch.setattr(tle_evidence, "build_mixer", no_work)
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, match in ((afile / "r.json", r"^out: .*afile is a file, expected a folder to "
                                          r"write r\.json in$"),
                       (tmp_path, r"^out: .* is a folder, expected a file path$")):
        with pytest.raises(ValueError, match=match):
            titok_evidence.run("sort", base="random", out=str(out))
        with pytest.raises(ValueError, match=match):
            tle_evidence.run(str(tmp_path / "adapters"), base="random", out=str(out))
    with pytest.raises(SystemExit) as exc:
        titok_evidence.main(["--tune-keeps", "0.5"])
    assert exc.value.code == 2
    assert "argument --tune-keeps: expected SAMPLE:TOKEN keep fractions such as 0.5:0.75, " \
           "got '0.5'" in capsys.readouterr().err


def test_evaluate_loss_is_the_token_mean_of_the_models_own_loss(tokenizer):
    """evaluate_loss: next-token cross-entropy over the response tokens of all rows (a
    partial last batch included), the model's own shifted loss per row, weighted by each
    row's label count; the model's curriculum state and mode come back afterwards."""
    from datalora import DATALORAConfig, get_datalora_model
    from datalora.data import CausalLMCollator
    from datalora.testing import build_tiny_model
    from datalora.train import DEFAULT_TINY_CONFIG, evaluate_loss

    torch.manual_seed(0)
    model = get_datalora_model(build_tiny_model(), DATALORAConfig(**DEFAULT_TINY_CONFIG),
                               verbose=False)
    with torch.no_grad():  # a non-zero adapter: B starts at zero
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.05)
    model.set_curriculum_state(tau=2.0, retention=0.5, hard=True)
    model.train()
    rows = [_row(i) for i in (3, 17, 250)] + [{**_row(9), "response": "many words " * 3}]
    got = evaluate_loss(model, rows, tokenizer, max_length=48, batch_size=3, retention=1.0)
    assert model.curriculum_state() == {"tau": 2.0, "retention": 0.5, "hard": True}
    assert model.training
    model.eval()
    model.set_curriculum_state(retention=1.0)
    total = count = 0
    with torch.no_grad():
        for row in rows:
            batch = CausalLMCollator(tokenizer=tokenizer)([tokenize_example(row, tokenizer, 48)])
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            total += float(model(**batch).loss) * n
            count += n
    assert got == pytest.approx(total / count, rel=1e-5)


def test_summarize_phases_per_phase_means_and_ranges():
    from datalora.train import summarize_phases

    def rec(phase, lm, ret, tau, target=0.5, rank=1.0):
        return {"phase": phase, "lm_loss": lm, "retention": ret, "tau": tau,
                "retention_target": target, "rank_scale_mean": rank}

    history = [rec("warmup", 4.0, 1.0, 5.0, 1.0), rec("warmup", 3.0, 1.0, 5.0, 1.0),
               rec("sparsification", 2.5, 0.8, 4.0, 0.75, 0.9),
               rec("sparsification", 2.0, 0.6, 2.0, 0.5, 0.7),
               rec("sparsification", 1.5, 0.55, 1.0, 0.5, 0.5)]
    summary = summarize_phases(history)
    assert list(summary) == ["warmup", "sparsification"]  # no hardening logged
    assert summary["warmup"] == {"logs": 2, "loss_first": 4.0, "loss_last": 3.0,
                                 "loss_mean": 3.5, "retention_mean": 1.0,
                                 "retention_target_last": 1.0, "tau_first": 5.0,
                                 "tau_last": 5.0, "rank_scale_mean": 1.0}
    s = summary["sparsification"]
    assert (s["logs"], s["loss_first"], s["loss_last"], s["tau_first"], s["tau_last"],
            s["retention_target_last"]) == (3, 2.5, 1.5, 4.0, 1.0, 0.5)
    assert s["loss_mean"] == pytest.approx(2.0) and s["retention_mean"] == pytest.approx(0.65)
    assert s["rank_scale_mean"] == pytest.approx(0.7)


def test_train_json_summary_is_strict_json_without_a_calibrated_threshold():
    from datalora.train import TrainResult, summary_dict

    result = TrainResult([], [], {"warmup": {"loss_first": float("nan"), "logs": 1}}, "out",
                         keep_threshold=float("nan"), metrics={"eval_loss_dense": float("inf")})
    text = json.dumps(summary_dict(result), allow_nan=False)  # NaN is not JSON
    assert json.loads(text) == {"phases": {"warmup": {"loss_first": None, "logs": 1}},
                                "metrics": {"eval_loss_dense": None},
                                "keep_threshold": None, "output_dir": "out"}


def test_cli_flag_types_refuse_out_of_range_values():
    """The argparse types every command uses: inf / NaN / 0 / non-numbers refused where the
    bound says so, as argparse errors (which name the flag)."""
    from datalora.cli import fraction, int_at_least, non_negative_float, positive_float

    cases = [(positive_float, "0.5", 0.5, ("0", "-1", "inf", "nan", "x")),
             (non_negative_float, "0", 0.0, ("-1", "inf", "nan", "x")),
             (fraction, "1", 1.0, ("0", "1.5", "nan", "x")),
             (int_at_least(2), "2", 2, ("1", "2.5", "x"))]
    for parse, good, value, bad in cases:
        assert parse(good) == value
        for text in bad:
            with pytest.raises(argparse.ArgumentTypeError):
                parse(text)


def test_cli_missing_package_names_the_extra_only_for_optional_packages(monkeypatch, capsys):
    """A missing optional package exits 2 naming the extra; DATALORA_DEBUG=1 shows the
    traceback instead, and a missing module that is no optional package is raised."""
    from datalora import cli

    def parser_raising(name):
        def build():
            parser = argparse.ArgumentParser(prog="datalora")
            sub = parser.add_subparsers(dest="command")

            def run(args):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            sub.add_parser("x").set_defaults(func=run)
            return parser
        return build

    monkeypatch.delenv("DATALORA_DEBUG", raising=False)
    monkeypatch.setattr(cli, "build_parser", parser_raising("peft"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["x"])
    assert exit_info.value.code == 2
    assert "pip install 'datalora[peft]'" in capsys.readouterr().err
    monkeypatch.setenv("DATALORA_DEBUG", "1")
    with pytest.raises(ModuleNotFoundError):
        cli.main(["x"])
    monkeypatch.delenv("DATALORA_DEBUG")
    monkeypatch.setattr(cli, "build_parser", parser_raising("not_an_optional_package"))
    with pytest.raises(ModuleNotFoundError):
        cli.main(["x"])


@pytest.mark.parametrize("raised, code, message", [
    (KeyboardInterrupt(), 130, "datalora x: interrupted"),
    ("safetensors", 2, "datalora x: error: Error while serializing: I/O error"),
])
def test_cli_ctrl_c_and_failed_safetensors_writes_end_without_traceback(
        monkeypatch, capsys, raised, code, message):
    """Ctrl-C printed a 14-19 frame traceback; a safetensors write failing on a full disk
    (PEFT's save_pretrained) raised SafetensorError, which the CLI did not catch."""
    from safetensors import SafetensorError

    from datalora import cli

    if raised == "safetensors":
        raised = SafetensorError("Error while serializing: I/O error: File too large")

    def build():
        parser = argparse.ArgumentParser(prog="datalora")
        sub = parser.add_subparsers(dest="command")

        def run(args):
            raise raised
        sub.add_parser("x").set_defaults(func=run)
        return parser

    monkeypatch.delenv("DATALORA_DEBUG", raising=False)
    monkeypatch.setattr(cli, "build_parser", build)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["x"])
    assert exit_info.value.code == code
    assert message in capsys.readouterr().err
    monkeypatch.setenv("DATALORA_DEBUG", "1")
    with pytest.raises(type(raised)):
        cli.main(["x"])


def test_cli_ctrl_c_while_the_parser_imports_ends_without_traceback(monkeypatch, capsys):
    """building the parser imports torch and transformers (seconds): a Ctrl-C there was
    outside the handled block."""
    from datalora import cli

    def slow_imports():
        raise KeyboardInterrupt

    monkeypatch.delenv("DATALORA_DEBUG", raising=False)
    monkeypatch.setattr(cli, "build_parser", slow_imports)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--max-steps", "1"])
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == "datalora train: interrupted\n"


def test_save_tensors_reports_a_failed_write_as_an_os_error(tmp_path, monkeypatch):
    """A full disk made safetensors raise its own SafetensorError (no OSError), which the
    commands' error handling did not recognise; the temporary file is removed."""
    from safetensors import SafetensorError

    import datalora.io as io

    def full_disk(tensors, path, metadata=None):
        open(path, "wb").write(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device")

    monkeypatch.setattr(io, "save_file", full_disk)
    with pytest.raises(OSError, match=r"could not write .*w.safetensors: Error while "
                                      r"serializing"):
        io.save_tensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_a_plot_whose_write_fails_leaves_the_previous_png(tmp_path, monkeypatch):
    """The demo and datalora_eval wrote their PNG in place: a full disk left a truncated
    image where the good one was (the benchmarks' plots were already atomic)."""
    from matplotlib.figure import Figure

    from datalora import demo, io
    from datalora.experiments import datalora_eval

    assert demo.save_figure is io.save_figure is datalora_eval.save_figure
    fig = Figure()
    fig.add_subplot().plot([1, 2, 3])
    png = io.save_figure(fig, tmp_path / "plot.png", 50)
    good = png.read_bytes()

    def disk_full(self, fname, **kwargs):
        open(fname, "wb").write(good[:100])
        raise OSError(28, "No space left on device")

    pdf = io.save_figure(fig, tmp_path / "plot.pdf", 50)  # the suffix picks the format
    assert pdf.read_bytes().startswith(b"%PDF") and good.startswith(b"\x89PNG")
    monkeypatch.setattr(Figure, "savefig", disk_full)
    with pytest.raises(OSError, match="No space left"):
        io.save_figure(fig, png, 50)
    assert png.read_bytes() == good and sorted(tmp_path.iterdir()) == [pdf, png]


def test_the_checkout_root_does_not_shadow_pypi_kernels(tmp_path):
    """Run from the checkout's root, ``import kernels`` gets PyPI's package (transformers
    >= 5.25 imports it with its activations), never the repo's ``kernels/`` folder (that is
    ``datalora.kernels``). Without PyPI's package, transformers' probe (``find_spec``, then,
    finding no distribution, an import for the version) must neither raise nor take the
    folder for an install: it counts a module with no ``__version__`` and no ``__file__`` as
    a namespace folder, not installed (raising there broke every model import on 5.24)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("CUDAProperties = 'hub'\n")

    def run(code, *paths, isolated=True):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in paths)}
        # -S: no site-packages, so whether PyPI's kernels is installed here does not matter
        args = [sys.executable, *(["-S"] if isolated else []), "-c", code]
        done = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    assert run("from kernels import CUDAProperties\nprint(CUDAProperties)", root, site) == ["hub"]
    probe = ("import importlib\n"
             "m = importlib.import_module('kernels')\n"
             "print(getattr(m, '__version__', 'N/A'), getattr(m, '__file__', None))\n"
             "try:\n    from kernels import get_kernel\nexcept ImportError:\n    print('no')")
    assert run(probe, root) == ["N/A", "None", "no"]
    code = ("from transformers import MistralForCausalLM\nimport datalora.kernels as ours\n"
            "print(MistralForCausalLM.__name__, ours.__name__)")
    assert run(code, root, isolated=False) == ["MistralForCausalLM", "datalora.kernels"]
