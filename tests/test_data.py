"""The embedded multi-task dataset, dataset loading, tokenization and collation."""

from __future__ import annotations

import json
import re
from collections import Counter
from importlib import resources

import pytest
import torch

from datalora.data import (
    COLUMNS,
    IGNORE_INDEX,
    SHIPPED_SPLITS,
    TASKS,
    CausalLMCollator,
    SplitNotFoundError,
    format_prompt,
    generate_multitask_dataset,
    load_eval_rows,
    load_instruction_dataset,
    prompt_inputs,
    shipped_split_rows,
    tokenize_example,
    tokenize_rows,
    write_jsonl,
)
from datalora.testing import build_tokenizer, with_appended_eos


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    # the parent of the base temp dir is shared by pytest-xdist workers: one training,
    # the others reuse it (or race on it, which build_tokenizer must survive)
    return build_tokenizer(cache_dir=tmp_path_factory.getbasetemp().parent / "datalora-cache")


@pytest.fixture(scope="module")
def train_rows():
    return load_instruction_dataset()


# --------------------------------------------------------------------------- generator

def _expected_answer(task: str, question: str) -> str:
    """Recompute the answer of a question independently of the generator."""
    if task == "arithmetic":
        m = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", question)
        a, op, b = int(m[1]), m[2], int(m[3])
        return str({"+": a + b, "-": a - b, "*": a * b}[op])
    if task == "reverse":
        m = re.fullmatch(r"Reverse the letters: ([a-z]+)", question)
        return m[1][::-1]
    if task == "sort":
        m = re.fullmatch(r"Sort in ascending order: (.+)", question)
        items = m[1].split(", ")
        key = int if items[0].isdigit() else str
        return ", ".join(sorted(items, key=key))
    if task == "lookup":
        m = re.fullmatch(r"Given (.+), what is ([a-z])\?", question)
        table = dict(pair.split("=") for pair in m[1].split(", "))
        assert len(table) == len(m[1].split(", "))  # keys are distinct
        return table[m[2]]
    raise AssertionError(f"unknown task {task}")


def test_generator_is_deterministic_and_seed_dependent():
    a = generate_multitask_dataset(20, seed=3)
    assert a == generate_multitask_dataset(20, seed=3)
    assert a != generate_multitask_dataset(20, seed=4)
    assert len(a) == 20 * len(TASKS)
    assert all(tuple(r) == COLUMNS for r in a)


def test_generator_task_rows_do_not_depend_on_other_tasks():
    full = generate_multitask_dataset(10, seed=5)
    only_sort = generate_multitask_dataset(10, seed=5, tasks=["sort"])
    assert only_sort == [r for r in full if r["task"] == "sort"]
    # interleaved round-robin: every prefix of len(TASKS) rows holds each task once
    assert [r["task"] for r in full[: 2 * len(TASKS)]] == list(TASKS) * 2


@pytest.mark.parametrize("split", ["train", "eval"])
def test_answers_are_correct(split):
    rows = load_instruction_dataset(split=split)
    assert set(TASKS) == {r["task"] for r in rows}
    for r in rows:
        assert r["response"] == _expected_answer(r["task"], r["question"]), r


def test_answers_checker_rejects_wrong_answers():
    # the checker above would notice a wrong answer (it is not vacuous)
    assert _expected_answer("arithmetic", "What is 7 - 9?") == "-2"
    assert _expected_answer("sort", "Sort in ascending order: 10, 9, 100") == "9, 10, 100"
    assert _expected_answer("sort", "Sort in ascending order: q, b, k") == "b, k, q"
    assert _expected_answer("lookup", "Given a=3, b=7, c=1, what is b?") == "7"
    assert _expected_answer("reverse", "Reverse the letters: abc") == "cba"


def test_splits_are_balanced_unique_and_disjoint():
    train = load_instruction_dataset(split="train")
    evals = load_instruction_dataset(split="eval")
    assert Counter(r["task"] for r in train) == {t: SHIPPED_SPLITS["train"][1] for t in TASKS}
    assert Counter(r["task"] for r in evals) == {t: SHIPPED_SPLITS["eval"][1] for t in TASKS}
    train_q = {r["question"] for r in train}
    assert len(train_q) == len(train)
    assert len({r["id"] for r in train}) == len(train)
    assert not train_q & {r["question"] for r in evals}
    assert load_instruction_dataset(split="validation") == evals


@pytest.mark.parametrize("split", ["train", "eval"])
def test_shipped_jsonl_equals_generator(split):
    path = resources.files("datalora") / "shipped-data" / f"multitask_{split}.jsonl"
    assert path.is_file()
    with path.open(encoding="utf-8") as f:
        shipped = [json.loads(line) for line in f]
    assert shipped == shipped_split_rows(split)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(num_per_task=-1), ValueError, "num_per_task"),
    (dict(num_per_task=2, tasks=["poetry"]), ValueError, "tasks"),
    (dict(num_per_task=2, tasks=["sort", "sort"]), ValueError, "tasks"),
    (dict(num_per_task=2, tasks="sort"), TypeError, "tasks"),
    (dict(num_per_task=2, seed=1.5), TypeError, "seed"),
])
def test_generator_validates_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        generate_multitask_dataset(**kwargs)


# --------------------------------------------------------------------------- loading

@pytest.fixture()
def sample_rows():
    return generate_multitask_dataset(3, seed=11)


def test_load_local_jsonl_json_parquet(tmp_path, sample_rows):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")

    write_jsonl(sample_rows, tmp_path / "d.jsonl")
    (tmp_path / "d.json").write_text(json.dumps(sample_rows), encoding="utf-8")
    (tmp_path / "split.json").write_text(json.dumps({"train": sample_rows}), encoding="utf-8")
    (tmp_path / "data.json").write_text(json.dumps({"version": 1, "data": sample_rows}),
                                        encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(sample_rows), tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.json", "split.json", "data.json", "d.parquet"):
        assert load_instruction_dataset(tmp_path / name) == sample_rows, name
        assert load_instruction_dataset(str(tmp_path / name), limit=5) == sample_rows[:5]


def test_a_parquet_limit_reads_only_the_row_groups_it_needs(tmp_path, sample_rows,
                                                             monkeypatch):
    """limit=100 of an OpenOrca-sized parquet file read every row first (seconds, GBs of
    Python dicts): now the batches up to the limit only."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")

    rows = sample_rows * 20
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet", row_group_size=7)
    batches = []
    real = pq.ParquetFile.iter_batches

    def counted(self, *args, **kwargs):
        for batch in real(self, *args, **kwargs):
            batches.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counted)
    assert load_instruction_dataset(tmp_path / "d.parquet", limit=9) == rows[:9]
    assert 0 < sum(batches) < 20 < len(rows)
    assert load_instruction_dataset(tmp_path / "d.parquet") == rows


def test_load_save_to_disk(tmp_path, sample_rows):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(sample_rows)
    ds.save_to_disk(str(tmp_path / "single"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(
        str(tmp_path / "dict"))
    assert load_instruction_dataset(tmp_path / "single") == sample_rows
    assert load_instruction_dataset(tmp_path / "dict") == sample_rows
    assert load_instruction_dataset(tmp_path / "dict", split="test") == sample_rows[:2]
    with pytest.raises(SplitNotFoundError, match="split.*'eval'.*available"):
        load_instruction_dataset(tmp_path / "dict", split="eval")
    # no 'eval' / 'validation' split: load_eval_rows goes on to 'test'
    assert load_eval_rows(tmp_path / "dict") == sample_rows[:2]


def test_openorca_rows_without_task_or_id(tmp_path):
    rows = [{"id": "flan.1", "system_prompt": None, "question": "q1", "response": "r1"},
            {"system_prompt": "s", "question": "q2", "response": "r2", "extra": 5}]
    write_jsonl(rows, tmp_path / "orca.jsonl")
    assert load_instruction_dataset(tmp_path / "orca.jsonl") == [
        {"id": "flan.1", "system_prompt": "", "question": "q1", "response": "r1",
         "task": "unknown"},
        {"id": "1", "system_prompt": "s", "question": "q2", "response": "r2",
         "task": "unknown"},
    ]


def test_missing_columns_are_named(tmp_path, sample_rows):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")

    rows = [{k: v for k, v in r.items() if k not in ("response", "system_prompt")}
            for r in sample_rows]
    write_jsonl(rows, tmp_path / "bad.jsonl")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "bad.parquet")
    for name in ("bad.jsonl", "bad.parquet"):
        with pytest.raises(ValueError, match=r"missing required column.*\['response'\]"):
            load_instruction_dataset(tmp_path / name)
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "bad_ds"))
    with pytest.raises(ValueError, match=r"missing required column.*found \["):
        load_instruction_dataset(tmp_path / "bad_ds")
    write_jsonl([{"system_prompt": "", "question": "q", "response": 3}], tmp_path / "t.jsonl")
    with pytest.raises(ValueError, match="'response'.*must be a string"):
        load_instruction_dataset(tmp_path / "t.jsonl")


def test_jsonl_errors_name_the_line(tmp_path):
    """The 1-based line of the file (blank lines counted), not the index of the record."""
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"question": "q", "response": "r"}) + "\n\n\n"
                    + json.dumps({"question": "q", "answer": "r"}) + "\n")
    with pytest.raises(ValueError, match=r"line 4 of .*d\.jsonl is missing required "
                                         r"column\(s\) \['response'\].*Alpaca"):
        load_instruction_dataset(path)
    path.write_text(json.dumps({"question": "q", "response": 5}) + "\n")
    with pytest.raises(ValueError, match=r"'response' of line 1 of .* must be a string"):
        load_instruction_dataset(path)


def test_non_utf8_bytes_name_the_file_and_line(tmp_path):
    """A non-UTF-8 byte is a ValueError naming the file (and the line of a .jsonl), not a
    bare UnicodeDecodeError; a BOM and CRLF line endings are still read."""
    row = json.dumps({"question": "q", "response": "r"}).encode()
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + row + b"\r\n\r\n" + row.replace(b"q", b"q\xff") + b"\r\n")
    with pytest.raises(ValueError, match=r"d\.jsonl line 3 is not valid UTF-8"):
        load_instruction_dataset(path)
    assert len(load_instruction_dataset(path, limit=1)) == 1
    path.write_bytes(row + b"\r" + row + b"\r\r" + row[:-1] + b"\r")  # old Mac line ends
    with pytest.raises(ValueError, match=r"d\.jsonl line 4 is not valid JSON"):
        load_instruction_dataset(path)
    assert len(load_instruction_dataset(path, limit=2)) == 2
    path = tmp_path / "d.json"
    path.write_bytes(b"[" + row.replace(b"q", b"q\xff") + b"]")
    with pytest.raises(ValueError, match=r"d\.json is not valid UTF-8"):
        load_instruction_dataset(path)


def test_malformed_json_names_the_line_of_the_error(tmp_path):
    """A pretty-printed .json with a syntax error names where it is (not "line 1" of a
    JSON-lines reading); a .json of JSON lines still names its bad line."""
    path = tmp_path / "d.json"
    path.write_text('[\n {"question": "q",\n  "response": "r"},\n {"question": "q2" '
                    '"response": "r2"}\n]\n')
    with pytest.raises(ValueError, match=r"d\.json is not valid JSON: .* at line 4 column"):
        load_instruction_dataset(path)
    row = json.dumps({"question": "q", "response": "r"})
    path.write_text(f"{row}\n\n{row[:-3]}\n")
    with pytest.raises(ValueError, match=r"d\.json line 3 is not valid JSON"):
        load_instruction_dataset(path)
    path.write_text(f"{row}\n{row}\n")
    assert len(load_instruction_dataset(path)) == 2
    deep = "[" * 100_000  # was a RecursionError
    path.write_text(deep)
    with pytest.raises(ValueError, match=r"d\.json nests its values too deeply to parse$"):
        load_instruction_dataset(path)
    (tmp_path / "d.jsonl").write_text(f"{row}\n{deep}\n")
    with pytest.raises(ValueError, match=r"d\.jsonl line 2 nests its values too deeply"):
        load_instruction_dataset(tmp_path / "d.jsonl")
    path.write_text("\n")
    assert load_instruction_dataset(path) == []


def test_unreadable_parquet_names_the_argument(tmp_path):
    pytest.importorskip("pyarrow")
    path = tmp_path / "d.parquet"
    for content in (b"", b"not parquet"):
        path.write_bytes(content)
        with pytest.raises(ValueError, match=r"^source: .*d\.parquet is not a readable "
                                             r"parquet file"):
            load_instruction_dataset(path)


def test_an_empty_source_is_refused_not_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl([{"question": "q", "response": "r"}], tmp_path / "train.jsonl")
    for source in ("", " "):
        with pytest.raises(ValueError, match=r"^source: expected a file, folder or Hub "):
            load_instruction_dataset(source)


def test_an_empty_folder_names_the_source(tmp_path):
    """datasets' own EmptyDatasetError did not start with 'source:' (the CLI names the flag
    of the argument an error starts with)."""
    pytest.importorskip("datasets")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"^source: the folder .*empty holds no data files"):
        load_instruction_dataset(tmp_path / "empty")


def test_a_lone_surrogate_names_the_column_and_line(tmp_path):
    """JSON's "\\ud800" escape decodes to a string no tokenizer encodes (a bare TypeError
    from the tokenizer, naming no row): refused at load time."""
    path = tmp_path / "d.jsonl"
    path.write_text('{"question": "q", "response": "r"}\n{"question": "q\\ud800", '
                    '"response": "r"}\n')
    with pytest.raises(ValueError, match=r"column 'question' of line 2 of .*d\.jsonl is not "
                                         r"valid Unicode"):
        load_instruction_dataset(path)


def test_missing_system_prompt_is_empty(tmp_path):
    write_jsonl([{"question": "q", "response": "r"},
                 {"system_prompt": None, "question": "q2", "response": "r2"}],
                tmp_path / "d.jsonl")
    assert [r["system_prompt"] for r in load_instruction_dataset(tmp_path / "d.jsonl")] == \
        ["", ""]


def test_alpaca_and_chat_rows_are_mapped(tmp_path):
    alpaca = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
              {"instruction": "Say hi.", "input": "", "output": "hi", "id": "a1"}]
    write_jsonl(alpaca, tmp_path / "alpaca.jsonl")
    (tmp_path / "alpaca.json").write_text(json.dumps(alpaca))
    expected = [{"id": "0", "system_prompt": "", "question": "Add the numbers.\n\n2 and 3",
                 "response": "5", "task": "unknown"},
                {"id": "a1", "system_prompt": "", "question": "Say hi.", "response": "hi",
                 "task": "unknown"}]
    for name in ("alpaca.jsonl", "alpaca.json"):
        assert load_instruction_dataset(tmp_path / name) == expected
    chat = [{"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "2 + 2?"},
                          {"role": "assistant", "content": "4"}]},
            {"messages": [{"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello"}], "task": "greet"}]
    write_jsonl(chat, tmp_path / "chat.jsonl")
    assert load_instruction_dataset(tmp_path / "chat.jsonl") == [
        {"id": "0", "system_prompt": "Be brief.", "question": "2 + 2?", "response": "4",
         "task": "unknown"},
        {"id": "1", "system_prompt": "", "question": "Hi", "response": "Hello",
         "task": "greet"}]
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(alpaca).save_to_disk(str(tmp_path / "alpaca_ds"))
    assert load_instruction_dataset(tmp_path / "alpaca_ds")[0]["question"] == \
        expected[0]["question"]
    turns = chat[0]["messages"][1:] * 2
    write_jsonl([{"messages": turns}], tmp_path / "multi.jsonl")
    with pytest.raises(ValueError, match=r"line 1 of .*single-turn.*\['user', 'assistant', "
                                         r"'user', 'assistant'\]"):
        load_instruction_dataset(tmp_path / "multi.jsonl")


def test_alpaca_number_input_is_text_and_other_types_are_refused(tmp_path):
    write_jsonl([{"instruction": "Add 5 to", "input": 7, "output": "12"},
                 {"instruction": "Halve", "input": 2.5, "output": "1.25"},
                 {"instruction": "Say hi.", "input": None, "output": "hi"}],
                tmp_path / "a.jsonl")
    assert [r["question"] for r in load_instruction_dataset(tmp_path / "a.jsonl")] == \
        ["Add 5 to\n\n7", "Halve\n\n2.5", "Say hi."]
    for bad, shown in (([1, 2], "[1, 2]"), ({"a": 1}, "{'a': 1}"), (True, "True")):
        write_jsonl([{"instruction": "Add", "input": "", "output": "1"},
                     {"instruction": "Add", "input": bad, "output": "3"}], tmp_path / "b.jsonl")
        with pytest.raises(ValueError, match=r"source: column 'input' of line 2 of .*b\.jsonl "
                                             r"must be a string or a finite number, got "
                                             + re.escape(shown)):
            load_instruction_dataset(tmp_path / "b.jsonl")


def test_jsonl_limit_stops_reading_at_the_limit(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"question": "q", "response": "r"}) + "\n\n"
                    + json.dumps({"question": "q2", "response": "r2"}) + "\n{not json\n")
    assert [r["question"] for r in load_instruction_dataset(path, limit=2)] == ["q", "q2"]
    assert load_instruction_dataset(path, limit=0) == []
    with pytest.raises(ValueError, match=r"line 4 is not valid JSON"):
        load_instruction_dataset(path, limit=3)


def test_a_json_file_holding_one_row_says_to_wrap_it_in_a_list(tmp_path):
    chat = {"messages": [{"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello"}]}
    for i, row in enumerate((chat, {"question": "q", "response": "r"},
                             {"instruction": "Say hi.", "output": "hi"})):
        path = tmp_path / f"one{i}.json"
        path.write_text(json.dumps(row))
        with pytest.raises(ValueError, match=r"one\d\.json holds a single row object, not a "
                                             r"list of rows: wrap it in a list"):
            load_instruction_dataset(path)
        path.write_text(json.dumps([row]))
        assert len(load_instruction_dataset(path)) == 1
    path = tmp_path / "columns.json"
    path.write_text(json.dumps({"question": ["q1", "q2"], "response": ["r1", "r2"]}))
    assert [r["response"] for r in load_instruction_dataset(path)] == ["r1", "r2"]
    path.write_text(json.dumps({"question": ["q1"], "response": ["r1", "r2"]}))
    with pytest.raises(ValueError, match=r"source: columns of .*columns\.json have different "
                                         r"lengths"):
        load_instruction_dataset(path)  # not one row with the second response dropped
    path.write_text(json.dumps({"version": 1, "rows": 2}))
    with pytest.raises(ValueError, match=r"columns\.json holds a JSON object without a list "
                                         r"of rows \(expected a list, \{'train': \[\.\.\.\]\}"):
        load_instruction_dataset(path)
    path.write_text("5")
    with pytest.raises(ValueError, match=r"columns\.json must hold a list of row objects, got "
                                         r"int"):
        load_instruction_dataset(path)


def test_trained_ids_are_the_documented_texts_tokens_with_a_metaspace_tokenizer(
        metaspace_tokenizer):
    """Encoded apart, the response would start with a spurious "▁" token."""
    tok = metaspace_tokenizer
    assert tok.convert_ids_to_tokens(tok("5", add_special_tokens=False)["input_ids"]) == \
        ["▁5"]
    rows = load_instruction_dataset(limit=16)
    items, _ = tokenize_rows(rows, tok, 512)
    for row, item in zip(rows, items, strict=True):
        text = format_prompt(row) + row["response"]
        assert item["input_ids"] == tok(text)["input_ids"] + [tok.eos_token_id]
        response = [i for i, label in zip(item["input_ids"], item["labels"], strict=True)
                    if label != IGNORE_INDEX]
        assert response == item["labels"][-len(response):]
        assert tok.decode(response) == row["response"] + "</s>"
        assert not tok.convert_ids_to_tokens(response)[0].startswith("▁")


def test_looks_like_local_path(tmp_path, monkeypatch):
    from datalora.data import looks_like_local_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for name in ("data/orca.txt", "a/b/c", "./x", "~/x", "/abs/x", "models/typo"):
        assert looks_like_local_path(name), name
    for name in ("Open-Orca/OpenOrca", "gpt2", "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
                 "Qwen/Qwen2.5-0.5B"):
        assert not looks_like_local_path(name), name
    with pytest.raises(FileNotFoundError, match="no such file or folder: data/orca.txt"):
        load_instruction_dataset("data/orca.txt")  # was: Hub retries, then an OSError


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_instruction_dataset(tmp_path / "nope.jsonl")
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_instruction_dataset(tmp_path / "d.csv")
    with pytest.raises(ValueError, match="split"):
        load_instruction_dataset(split="dev")
    with pytest.raises(ValueError, match="limit"):
        load_instruction_dataset(limit=-1)
    assert len(load_instruction_dataset(limit=7)) == 7


def test_hub_name_fails_clearly_offline(monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    # offline mode makes the failure immediate instead of network retries
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match=r"'no-such-org/no-such-dataset'.*Hub.*load_dataset"):
        load_instruction_dataset("no-such-org/no-such-dataset", limit=2)


@pytest.mark.parametrize("message", ['Unknown split "{}". Should be one of [\'train\', \'test\'].',
                                     "Bad split: {}. Available splits: ['train', 'test']"])
def test_eval_rows_of_a_hub_dataset_try_validation_and_test(monkeypatch, message):
    """A Hub dataset without an 'eval' split: load_eval_rows goes on to 'validation' /
    'test' (datasets' unknown-split ValueError, in either wording datasets has used, is a
    SplitNotFoundError)."""
    datasets = pytest.importorskip("datasets")
    row = {"question": "q", "response": "r"}

    def load_dataset(name, split, streaming=False):
        if split != "test":
            raise ValueError(message.format(split))
        return datasets.Dataset.from_list([row])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert load_eval_rows("some-org/some-data")[0]["question"] == "q"
    with pytest.raises(SplitNotFoundError, match=r"'train' not in the Hub dataset"):
        load_instruction_dataset("some-org/some-data", split="train")


# --------------------------------------------------------------------------- prompt, tokens

def test_format_prompt():
    row = {"system_prompt": "Be brief.", "question": "What is 1 + 2?", "response": "3"}
    assert format_prompt(row) == "Be brief.\n\n### Question:\nWhat is 1 + 2?\n\n### Answer:\n"
    assert format_prompt({**row, "system_prompt": ""}).startswith("### Question:\n")
    with pytest.raises(ValueError, match="question"):
        format_prompt({"response": "3"})
    for bad in ({"question": None}, {"question": 5}, {"system_prompt": float("nan")}):
        col = next(iter(bad))
        with pytest.raises(ValueError, match=f"column '{col}' must be a string"):
            format_prompt({**row, **bad})  # not the text "None" / "5" / "nan" trained
    assert format_prompt({**row, "system_prompt": None}).startswith("### Question:\n")
    # the system prompt is the data's text as it is (it is trained on): not stripped
    assert format_prompt({**row, "system_prompt": " Be brief. "}).startswith(" Be brief. \n\n")


def test_prompt_inputs_are_what_a_causal_lm_takes(tokenizer):
    """Only input_ids / attention_mask: ``generate`` refuses the token_type_ids some
    tokenizers add (the embedded one on transformers 4.x)."""
    def with_types(*args, **kwargs):
        enc = tokenizer(*args, **kwargs)
        if kwargs.get("return_tensors") == "pt":  # (lists for the appended-EOS probe)
            enc["token_type_ids"] = torch.zeros_like(enc["input_ids"])
        return enc

    prompts = ["What is 1 + 2?", "Sort: b a"]
    got = prompt_inputs(with_types, prompts, "cpu", padding=True)
    want = tokenizer(prompts, return_tensors="pt", padding=True)
    assert sorted(got) == ["attention_mask", "input_ids"]
    assert all(torch.equal(got[k], want[k]) for k in got)


def test_tokenize_example_masks_prompt(tokenizer, train_rows):
    for row in train_rows[:8]:
        out = tokenize_example(row, tokenizer, max_length=128)
        ids, labels = out["input_ids"], out["labels"]
        prompt_len = len(tokenizer(format_prompt(row))["input_ids"])
        assert len(ids) == len(labels) == len(out["attention_mask"])
        assert ids[0] == tokenizer.bos_token_id
        assert labels[:prompt_len] == [IGNORE_INDEX] * prompt_len
        assert labels[prompt_len:] == ids[prompt_len:]
        assert ids[-1] == tokenizer.eos_token_id and ids.count(tokenizer.eos_token_id) == 1
        assert tokenizer.decode(ids[prompt_len:-1]) == row["response"]
        assert tokenizer.decode(ids, skip_special_tokens=True) == (
            format_prompt(row) + row["response"])


class _EosAddingTokenizer:
    """The embedded tokenizer with add_eos_token-style behaviour: EOS after every text."""

    def __init__(self, tok):
        self.tok, self.eos_token_id, self.bos_token_id = tok, tok.eos_token_id, tok.bos_token_id

    def __call__(self, text, add_special_tokens=True):
        enc = self.tok(text, add_special_tokens=add_special_tokens)["input_ids"]
        if not add_special_tokens:
            return {"input_ids": enc}
        add = (lambda ids: list(ids) + [self.eos_token_id])
        return {"input_ids": add(enc) if isinstance(text, str) else [add(x) for x in enc]}


def test_a_tokenizer_adding_eos_itself_gets_one_eos(tokenizer):
    row = {"question": "What is 2 + 3?", "response": "5"}
    plain = tokenize_example(row, tokenizer, 64)
    item = tokenize_example(row, _EosAddingTokenizer(tokenizer), 64)
    assert item == plain  # not response + EOS + EOS (the model taught EOS -> EOS)
    assert item["input_ids"].count(tokenizer.eos_token_id) == 1


def test_response_merged_into_the_prompts_last_token_is_still_trained(run_merging_tokenizer):
    from datalora.data import format_prompt

    row = {"system_prompt": "", "question": "Indent?", "response": "   "}
    tok = run_merging_tokenizer()
    item = tokenize_example(row, tok, 64)
    prompt_ids = tok.ids(format_prompt(row))
    assert item["input_ids"] == prompt_ids + [2]  # the joint text ends in one whitespace run
    # the spanning last token and EOS are labelled, not the EOS alone
    assert item["labels"] == [-100] * (len(prompt_ids) - 1) + [1, 2]
    plain = tokenize_example({**row, "response": "ok"}, tok, 64)
    assert plain["labels"][-3:] == [ord("o") + 10, ord("k") + 10, 2]
    assert plain["labels"].count(-100) == len(prompt_ids)


def test_an_eos_appending_tokenizer_is_queried_with_the_prompt_it_was_trained_on(tokenizer):
    """Generation encoded the prompt with its appended EOS ("### Answer:\n</s>"), which
    training never shows before an answer; an empty response was trained as EOS -> EOS."""
    from datalora.data import appended_special_ids, format_prompt, prompt_inputs

    tok = with_appended_eos(tokenizer)
    assert appended_special_ids(tok) == [tok.eos_token_id]
    assert appended_special_ids(tokenizer) == []
    rows = [{"question": "What is 2 + 3?", "response": "5"},
            {"question": "Sort in ascending order: 3, 1", "response": ""}]
    for row in rows:
        item = tokenize_example(row, tok, 64)
        prompt = item["labels"].count(IGNORE_INDEX)
        assert item == tokenize_example(row, tokenizer, 64)  # the appended EOS ends it once
        generation = prompt_inputs(tok, format_prompt(row))
        assert generation["input_ids"][0].tolist() == item["input_ids"][:prompt]
    batch = prompt_inputs(tok, [format_prompt(r) for r in rows], padding=True)
    for i, row in enumerate(rows):
        ids = batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist()
        assert ids == prompt_inputs(tokenizer, format_prompt(row))["input_ids"][0].tolist()
    # the padding settings reach the padding (left padding for batched generate)
    texts = [format_prompt(r) for r in rows]
    for kwargs in (dict(padding=True, padding_side="left"),
                   dict(padding="max_length", max_length=40),
                   dict(padding=True, pad_to_multiple_of=16)):
        got, want = prompt_inputs(tok, texts, **kwargs), prompt_inputs(tokenizer, texts, **kwargs)
        assert got["attention_mask"].shape == want["attention_mask"].shape, kwargs
        assert torch.equal(got["attention_mask"], want["attention_mask"]), kwargs


def test_a_merged_response_token_is_trained_with_an_eos_appending_tokenizer(
        run_merging_tokenizer):
    """The merged-token check compared the split with the joint length, which the appended
    EOS made one longer: only the EOS was labelled."""
    row = {"system_prompt": "", "question": "Indent?", "response": "   "}
    plain = tokenize_example(row, run_merging_tokenizer(), 64)
    appending = tokenize_example(row, run_merging_tokenizer(adds_eos=True), 64)
    assert appending == plain and plain["labels"][-2:] == [1, 2]


def test_tokenize_example_truncates_prompt_first(tokenizer, train_rows):
    row = train_rows[0]
    full = tokenize_example(row, tokenizer, max_length=128)
    n_resp = sum(lab != IGNORE_INDEX for lab in full["labels"])
    short = tokenize_example(row, tokenizer, max_length=n_resp + 3)
    assert len(short["input_ids"]) == n_resp + 3
    assert short["input_ids"][0] == tokenizer.bos_token_id
    assert short["labels"][-n_resp:] == full["labels"][-n_resp:]
    assert short["labels"][:3] == [IGNORE_INDEX] * 3
    tiny = tokenize_example(row, tokenizer, max_length=2)
    assert len(tiny["input_ids"]) == 2
    with pytest.raises(ValueError, match="max_length"):
        tokenize_example(row, tokenizer, max_length=1)


def test_tokenize_rows_counts_truncation_and_empty_responses(tokenizer):
    from datalora.data import tokenize_rows

    rows = [{"system_prompt": "", "question": "What is 2 + 2?", "response": "4"},
            {"system_prompt": "", "question": "Sort: " + "9, " * 40, "response": "1"},
            {"system_prompt": "", "question": "Tell a story.", "response": "once " * 60},
            {"system_prompt": "", "question": "Say nothing.", "response": ""}]
    items, stats = tokenize_rows(rows, tokenizer, 48)
    assert items == [{**tokenize_example(r, tokenizer, 48), "task": "unknown"} for r in rows]
    assert (stats.rows, stats.truncated, stats.response_cut, stats.empty_response) == \
        (4, 2, 1, 1)
    assert stats.warnings("training rows", 48) == [
        "training rows: truncated 2 of 4 to max_length=48 (1 lost response tokens and their "
        "EOS, 1 only prompt tokens); raise max_length (--max-length) to keep them whole",
        "training rows: 1 of 4 have an empty response (trained on the EOS token alone)"]
    # at the model's position limit raising max_length is impossible: the advice changes
    at_limit = stats.warnings("training rows", 48, position_limit=48)[0]
    assert at_limit.endswith("the model's position limit (max_position_embeddings): "
                             "shorten those rows to keep them whole")
    assert "raise" in stats.warnings("training rows", 48, position_limit=1024)[0]
    assert tokenize_rows(rows[:1], tokenizer, 48)[1].warnings("x", 48) == []


def test_truncation_keeps_half_of_max_length_for_the_prompt_and_counts_only_longer_rows(
        tokenizer):
    """A long prompt and a long response: the prompt keeps max_length // 2 tokens (its BOS
    and its end), the response the rest; a row of exactly max_length tokens is whole."""
    import types

    from datalora.data import tokenize_rows
    from datalora.data.tokens import _truncate

    prompt, response = [1, *range(100, 139)], list(range(200, 240))
    cut_prompt, cut_response = _truncate(prompt, response, 20, types.SimpleNamespace(
        bos_token_id=1))
    assert cut_prompt == [1, *range(130, 139)] and cut_response == list(range(200, 210))
    row = {"system_prompt": "", "question": "What is 2 + 2?", "response": "4"}
    n = len(tokenize_example(row, tokenizer, 10_000)["input_ids"])
    assert tokenize_rows([row], tokenizer, n)[1].truncated == 0
    assert tokenize_rows([row], tokenizer, n - 1)[1].truncated == 1
    # a whitespace-only response trains its spaces and EOS: not counted as empty
    blank = dict(row, response="  ")
    assert tokenize_rows([blank], tokenizer, n)[1].empty_response == 0


def test_collator_pads_right(tokenizer, train_rows):
    feats = [tokenize_example(r, tokenizer, 128) for r in train_rows[:4]]
    for f, r in zip(feats, train_rows[:4], strict=True):
        f["task"] = r["task"]
    lengths = [len(f["input_ids"]) for f in feats]
    batch = CausalLMCollator(tokenizer, return_task_ids=True)(feats)
    assert batch["input_ids"].shape == (4, max(lengths))
    assert batch["input_ids"].dtype == torch.long
    assert batch["task_ids"].tolist() == [TASKS.index(r["task"]) for r in train_rows[:4]]
    for b, n in enumerate(lengths):
        assert batch["input_ids"][b, :n].tolist() == feats[b]["input_ids"]
        assert batch["labels"][b, :n].tolist() == feats[b]["labels"]
        assert (batch["input_ids"][b, n:] == tokenizer.pad_token_id).all()
        assert (batch["labels"][b, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][b].tolist() == [1] * n + [0] * (max(lengths) - n)
    assert min(lengths) < max(lengths)  # the batch really was padded


def test_collator_default_labels_ignore_a_features_own_padding(tokenizer):
    """Features pre-padded by a left-padding tokenizer (no labels): the pad positions
    (attention_mask 0) are -100, not trained as pad tokens."""
    import copy

    left = copy.deepcopy(tokenizer)
    left.padding_side = "left"
    enc = left(["What is 1 + 1?", "Sort in ascending order: b, a, c"], padding=True)
    feats = [{k: enc[k][i] for k in ("input_ids", "attention_mask")} for i in range(2)]
    assert 0 in feats[0]["attention_mask"]  # really left-padded
    batch = CausalLMCollator(left)(feats)
    for b, f in enumerate(feats):
        expected = [x if m else IGNORE_INDEX for x, m in zip(f["input_ids"],
                                                             f["attention_mask"], strict=True)]
        assert batch["labels"][b].tolist() == expected
        assert batch["attention_mask"][b].tolist() == f["attention_mask"]


def test_collator_refuses_fractional_ids_instead_of_truncating(tokenizer):
    collate = CausalLMCollator(tokenizer)
    batch = collate([{"input_ids": [5.0, 6.0], "labels": [IGNORE_INDEX, 6]}])
    assert batch["input_ids"].tolist() == [[5, 6]]  # whole floats (a numpy float array) pass
    for feature, key in (({"input_ids": [5.5, 6]}, "input_ids"),
                         ({"input_ids": [5, 6], "labels": [float("nan"), 6]}, "labels")):
        with pytest.raises(ValueError, match=f"feature 0 has non-integer {key}"):
            collate([feature])


def test_collator_raw_rows_dataloader_and_options(tokenizer, train_rows):
    collate = CausalLMCollator(tokenizer, max_length=64, return_task_ids=True,
                               pad_to_multiple_of=8)
    loader = torch.utils.data.DataLoader(train_rows[:6], batch_size=3, collate_fn=collate)
    batches = list(loader)
    assert len(batches) == 2
    for i, batch in enumerate(batches):
        assert batch["input_ids"].shape[1] % 8 == 0
        rows = train_rows[3 * i: 3 * i + 3]
        assert batch["task_ids"].tolist() == [TASKS.index(r["task"]) for r in rows]
        expected = tokenize_example(rows[0], tokenizer, 64)["input_ids"]
        assert batch["input_ids"][0, : len(expected)].tolist() == expected
    unknown = CausalLMCollator(pad_token_id=0, return_task_ids=True)(
        [{"input_ids": [5, 6], "task": "unknown"}, {"input_ids": [7], "task_id": 2}])
    assert unknown["task_ids"].tolist() == [-1, 2]
    assert unknown["labels"].tolist() == [[5, 6], [7, IGNORE_INDEX]]


def test_collator_errors(tokenizer):
    with pytest.raises(ValueError, match="pad_token_id"):
        CausalLMCollator()
    with pytest.raises(ValueError, match="empty"):
        CausalLMCollator(tokenizer)([])
    with pytest.raises(ValueError, match="input_ids.*tokenizer and max_length"):
        CausalLMCollator(pad_token_id=0)([{"question": "q", "response": "r"}])
    with pytest.raises(ValueError, match="task"):
        CausalLMCollator(pad_token_id=0, return_task_ids=True)([{"input_ids": [1]}])
    with pytest.raises(ValueError, match="2 input_ids but 1 labels"):
        CausalLMCollator(pad_token_id=0)([{"input_ids": [1, 2], "labels": [1]}])
    with pytest.raises(ValueError, match=r"^pad_token_id: expected a token id >= 0, got -1$"):
        CausalLMCollator(pad_token_id=-1)  # failed in the embedding
    with pytest.raises(TypeError, match=r"^tokenizer: expected a transformers tokenizer "
                                        r"\(with a pad_token_id\), got str$"):
        CausalLMCollator("tok")  # was AttributeError 'str' object has no attribute ...
    # an object that only gives the pad id serves pre-tokenized rows
    from types import SimpleNamespace
    batch = CausalLMCollator(SimpleNamespace(pad_token_id=0))([{"input_ids": [5, 6]},
                                                               {"input_ids": [7]}])
    assert batch["input_ids"].tolist() == [[5, 6], [7, 0]]
    with pytest.raises(TypeError, match=r"^tokenizer: expected a transformers tokenizer"):
        CausalLMCollator(SimpleNamespace(pad_token_id=0), max_length=8)(
            [{"question": "q", "response": "r"}])


def test_tokenizing_helpers_name_bad_arguments(tokenizer):
    from datalora.data import prompt_inputs, tokenize_example

    row = {"question": "q", "response": "r"}
    for call, error, match in (
            (lambda: prompt_inputs(None, "hi"), TypeError,
             r"^tokenizer: expected a transformers tokenizer, got NoneType$"),
            (lambda: prompt_inputs(tokenizer, []), TypeError,
             r"^prompts: expected a string or a non-empty list of strings, got \[\]$"),
            (lambda: prompt_inputs(tokenizer, "hi", device="nope"), ValueError,
             r"^device: not a torch device: 'nope'"),
            (lambda: tokenize_example(None, tokenizer, 32), TypeError,
             r"^example: expected a row mapping \(question, response\), got NoneType$"),
            (lambda: tokenize_example(row, None, 32), TypeError,
             r"^tokenizer: expected a transformers tokenizer, got NoneType$")):
        with pytest.raises(error, match=match):
            call()
    assert prompt_inputs(tokenizer, ["hi", "there"])["input_ids"].shape[0] == 2
    import copy
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None  # one prompt needs no padding (raw GPT-2 / Llama tokenizers)
    assert prompt_inputs(no_pad, "hi")["input_ids"].shape[0] == 1


@pytest.mark.parametrize("kwargs, match", [
    # 1.5 was truncated to 1: padding was labelled, and trained, as token 1
    ({"label_pad_token_id": 1.5}, r"^label_pad_token_id: expected an int, got 1\.5$"),
    # failed inside torch.full at the first batch
    ({"label_pad_token_id": "x"}, r"^label_pad_token_id: expected an int, got 'x'$"),
    ({"pad_token_id": 0.5}, r"^pad_token_id: expected an int, got 0\.5$"),
    # a string was split into its letters: tasks ('a', 'b', 'c')
    ({"tasks": "abc"}, r"^tasks: expected a sequence of task names, got the string 'abc'$"),
    ({"tasks": 5}, r"^tasks: expected a sequence of task names, got int$"),  # not iterable
    ({"tasks": ["a", None]}, r"^tasks: expected a sequence of task names, got \['a', None\]"),
])
def test_collator_refuses_bad_arguments(kwargs, match):
    with pytest.raises(TypeError, match=match):
        CausalLMCollator(**{"pad_token_id": 0, **kwargs})
    assert CausalLMCollator(pad_token_id=0, tasks=["a", "b"]).tasks == ("a", "b")

@pytest.mark.parametrize("features, error, match", [
    # two rows were merged into one sequence [[1, 2, 3, 4]]
    ([{"input_ids": [[1, 2], [3, 4]], "task_id": 0}], ValueError,
     r"^features: feature 0 has input_ids of shape \(2, 2\), expected one sequence$"),
    ([{"input_ids": [1, 2], "labels": [[1], [2]], "task_id": 0}], ValueError,
     r"^features: feature 0 has labels of shape \(2, 1\), expected one sequence$"),
    ([{"input_ids": 5, "task_id": 0}], ValueError, r"of shape \(\), expected one sequence"),
    # int() truncated it to task 2
    ([{"input_ids": [1], "task_id": 2.7}], ValueError,
     r"^features: feature 0 has a non-integer task_id 2\.7$"),
    # int()'s "invalid literal for int()"
    ([{"input_ids": [1], "task_id": "abc"}], ValueError, r"non-integer task_id 'abc'$"),
    # "unhashable type: 'list'"
    ([{"input_ids": [1], "task": ["x"]}], ValueError,
     r"^features: feature 0 has task \['x'\], expected a task name \(str\)$"),
    # torch's "Could not infer dtype of NoneType"
    ([{"input_ids": None, "task_id": 0}], ValueError,
     r"^features: feature 0 has input_ids None, expected a list of ints$"),
    ([{"input_ids": [1], "task_id": 0}, {"input_ids": ["a"], "task_id": 0}], ValueError,
     r"^features: feature 1 has input_ids \['a'\], expected a list of ints$"),
    # "string indices must be integers" (a dict was taken as the list of features)
    ({"input_ids": [1, 2]}, TypeError, r"^features: expected a list of feature dicts, got dict$"),
    # "object of type 'NoneType' has no len()"
    (None, TypeError, r"^features: expected a list of feature dicts, got NoneType$"),
    # said "feature 0 has no 'input_ids'", though it is no row at all
    ([[1, 2, 3]], ValueError,
     r"^features: feature 0 is a list, expected a dict with 'input_ids'$"),
    # collated as an all-padding row; DATALORATrainer.train() then failed deep in the model
    # ("cannot reshape tensor of 0 elements")
    ([{"input_ids": [], "task_id": 0}], ValueError,
     r"^features: feature 0 has no tokens \(empty input_ids\)$"),
    # attention_mask all 0: rows of only such features trained the whole run with lm_loss nan,
    # then failed at the end ("scores: no valid token scores to calibrate on")
    ([{"input_ids": [1, 2], "task_id": 0},
      {"input_ids": [1, 2], "attention_mask": [0, 0], "task_id": 0}], ValueError,
     r"^features: feature 1 has no real token \(attention_mask all 0\)$"),
])
def test_collator_refuses_bad_features(features, error, match):
    with pytest.raises(error, match=match):
        CausalLMCollator(pad_token_id=0, return_task_ids=True)(features)


def test_collator_takes_one_sequence_in_a_row_and_whole_task_ids():
    """A ``[1, L]`` sequence (a tokenizer's ``return_tensors="pt"``) is one row; a task id
    may be a one-element tensor (a torch-formatted dataset) or a whole float."""
    collate = CausalLMCollator(pad_token_id=0, return_task_ids=True)
    batch = collate([{"input_ids": torch.tensor([[5, 6, 7]]), "task_id": torch.tensor(1)},
                     {"input_ids": [[8]], "task_id": 2.0}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["task_ids"].tolist() == [1, 2]
    # numpy formats, a tensor pad label and an array of task names pass too
    import numpy as np

    collate = CausalLMCollator(pad_token_id=0, return_task_ids=True, tasks=np.array(["a", "b"]),
                               label_pad_token_id=torch.tensor(-100))
    assert collate.tasks == ("a", "b") and collate.label_pad_token_id == -100
    batch = collate([{"input_ids": [5], "task_id": np.array(1)},
                     {"input_ids": [8, 9], "task_id": np.float32(0)}])
    assert batch["task_ids"].tolist() == [1, 0] and batch["labels"][0, 1] == -100


def test_table_errors_name_the_row_index(tmp_path):
    """A table (parquet / ``datasets``) has no lines: the error says which 0-based index."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.Table.from_pylist([{"question": "q", "response": "r"},
                                         {"question": "q", "response": None}]),
                   tmp_path / "t.parquet")
    with pytest.raises(ValueError, match=r"'response' of row index 1 \(0-based\) of "
                                         r".*t\.parquet must be a string, got NoneType"):
        load_instruction_dataset(tmp_path / "t.parquet")


def test_tokenize_rows_batches_equal_one_text_at_a_time(tokenizer, monkeypatch):
    """Batched encoding in chunks (a chunk boundary inside the rows) gives the ids of
    encoding each text alone."""
    import datalora.data.tokens as data

    monkeypatch.setattr(data, "TOKENIZE_CHUNK", 3)
    rows = load_instruction_dataset("embedded", "eval", limit=7)
    rows[2] = {**rows[2], "response": ""}
    rows[5] = {**rows[5], "question": "Sort: " + "9, " * 40}
    items, stats = data.tokenize_rows(rows, tokenizer, 40)
    assert len(items) == 7 and stats.rows == 7 and stats.empty_response == 1
    for row, item in zip(rows, items, strict=True):
        prompt = tokenizer(format_prompt(row))["input_ids"]
        response = tokenizer(row["response"], add_special_tokens=False)["input_ids"]
        want = data._example(*data._truncate(prompt, response + [tokenizer.eos_token_id], 40,
                                              tokenizer))
        assert item == {**want, "task": row["task"]}
    assert data.tokenize_rows([], tokenizer, 40) == ([], data.TokenizeStats())


def test_pad_to_multiple_of_rounds_up_only_when_needed():
    collate = CausalLMCollator(pad_token_id=0, pad_to_multiple_of=4)
    batch = collate([{"input_ids": [1, 2, 3, 4]}, {"input_ids": [5]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4], [5, 0, 0, 0]]  # 4: no extra block
    assert batch["labels"].tolist() == [[1, 2, 3, 4], [5] + [IGNORE_INDEX] * 3]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 0, 0, 0]]
    assert collate([{"input_ids": [1] * 5}])["input_ids"].shape == (1, 8)
