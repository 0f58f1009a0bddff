"""``python -m datalora generate``: answers from a saved adapter, as the Python API gives
them; prompts from flags and a file; pruning on and off; errors that name the flag."""

from __future__ import annotations

import json

import pytest
import torch

from datalora.cli import main
from datalora.data import format_prompt, load_instruction_dataset, prompt_inputs


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    """An adapter of the embedded model, trained 4 steps (its config names no base model:
    the embedded one)."""
    from datalora.train import train_datalora

    out = tmp_path_factory.mktemp("adapter")
    train_datalora(None, dataset=load_instruction_dataset(limit=16), output_dir=out,
                   max_steps=4, batch_size=4, curriculum_mode="steps", progress=False)
    return out


def _generate(capsys, *argv):
    assert main(["generate", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_answers_equal_the_python_api(adapter, capsys, tmp_path):
    from datalora.model import DATALORAModel
    from datalora.testing import load_model_and_tokenizer

    questions = ["What is 2 + 3?", "Reverse the letters: abcd", "Sort: 3, 1, 2"]
    (tmp_path / "prompts.txt").write_text(f"{questions[1]}\n\n  {questions[2]}  \n")
    got = _generate(capsys, "--adapter", str(adapter), "--prompt", questions[0],
                    "--prompts-file", str(tmp_path / "prompts.txt"), "--max-new-tokens", "6",
                    "--batch-size", "1")
    assert [r["prompt"] for r in got] == questions
    base, tok = load_model_and_tokenizer()
    model = DATALORAModel.from_pretrained(base, adapter)
    for row in got:
        inputs = prompt_inputs(tok, format_prompt({"question": row["prompt"]}))
        with torch.no_grad():
            model(**inputs)
            kept = model.runtime.last.actual_retention()
            out = model.generate(**inputs, max_new_tokens=6, do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        want = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        assert row["answer"] == want.strip()
        assert row["prompt_tokens_kept"] == pytest.approx(kept) and 0 < kept < 1


def test_batches_are_left_padded_and_keep_each_rows_share(adapter, capsys):
    from datalora.model import DATALORAModel
    from datalora.testing import load_model_and_tokenizer

    questions = ["What is 2 + 3?", "Reverse the letters: abcdefgh", "Sort: 3, 1, 2"]
    argv = ["--adapter", str(adapter), "--max-new-tokens", "5"]
    for q in questions:
        argv += ["--prompt", q]
    single = _generate(capsys, *argv, "--batch-size", "1")
    batched = _generate(capsys, *argv, "--batch-size", "2")  # rows 0-1 padded, then row 2
    assert [r["prompt"] for r in batched] == questions
    for one, many in zip(single, batched, strict=True):  # a row's keep decisions do not
        assert many["prompt_tokens_kept"] == pytest.approx(one["prompt_tokens_kept"])
    base, tok = load_model_and_tokenizer()
    model = DATALORAModel.from_pretrained(base, adapter)
    tok.padding_side = "left"
    inputs = prompt_inputs(tok, [format_prompt({"question": q}) for q in questions[:2]])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    want = tok.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert [r["answer"] for r in batched[:2]] == [w.strip() for w in want]
    assert batched[2] == single[2]


def test_a_system_prompt_goes_before_each_question(adapter, capsys, monkeypatch):
    import datalora.generate as generate

    seen = []
    real = generate.prompt_inputs
    monkeypatch.setattr(generate, "prompt_inputs",
                        lambda tok, texts, *a, **k: seen.extend(texts) or real(tok, texts, *a,
                                                                                **k))
    _generate(capsys, "--adapter", str(adapter), "--prompt", "What is 1 + 2?",
              "--system-prompt", "You add numbers.", "--max-new-tokens", "1")
    assert seen == [format_prompt({"system_prompt": "You add numbers.",
                                   "question": "What is 1 + 2?"})]
    assert seen[0].startswith("You add numbers.\n\n### Question:")


def test_no_pruning_and_sampling(adapter, capsys):
    dense = _generate(capsys, "--adapter", str(adapter), "--prompt", "What is 4 + 4?",
                      "--no-pruning", "--max-new-tokens", "3")
    assert dense[0]["prompt_tokens_kept"] == 1.0
    runs = [_generate(capsys, "--adapter", str(adapter), "--prompt", "What is 4 + 4?",
                      "--sample", "--temperature", "2.0", "--seed", str(seed),
                      "--max-new-tokens", "8") for seed in (0, 0)]
    assert runs[0] == runs[1]  # seeded


def test_an_uncalibrated_adapter_keeps_every_prompt_token(adapter, capsys, tmp_path):
    """Its cached prefill runs the pruned layers dense (a warning); the share said so, not
    what a plain forward's top-k would keep."""
    from datalora.model import DATALORAModel
    from datalora.testing import load_model_and_tokenizer

    model = DATALORAModel.from_pretrained(load_model_and_tokenizer()[0], adapter)
    model.saliency.keep_threshold.fill_(float("nan"))
    model.save_pretrained(tmp_path / "uncalibrated")
    with pytest.warns(UserWarning, match="keep_threshold"):
        got = _generate(capsys, "--adapter", str(tmp_path / "uncalibrated"), "--prompt",
                        "What is 4 + 4?", "--max-new-tokens", "2")
    assert got[0]["prompt_tokens_kept"] == 1.0


def test_plain_output_names_each_prompt(adapter, capsys):
    assert main(["generate", "--adapter", str(adapter), "--prompt", "What is 1 + 1?",
                 "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "Q: What is 1 + 1?\nA: " in out and "prompt tokens kept" in out


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "q"], "the following arguments are required: --adapter"),
    (["--adapter", "{adapter}"], "prompts: none given; pass --prompt TEXT or --prompts-file"),
    (["--adapter", "{missing}", "--prompt", "q"], "--adapter (path): no adapter_config.json"),
    (["--adapter", "{adapter}", "--prompts-file", "{missing}"],
     "--prompts-file (prompts_file): no such file"),
    (["--adapter", "{adapter}", "--prompt", "q", "--top-p", "1.5"],
     "argument --top-p: expected a fraction in (0, 1]"),
    (["--adapter", "{adapter}", "--prompt", "q", "--batch-size", "0"],
     "argument --batch-size: expected an int >= 1, got 0"),
])
def test_bad_input_exits_2_naming_the_flag(adapter, tmp_path, capsys, argv, message):
    argv = [a.format(adapter=adapter, missing=tmp_path / "missing") for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
