"""Config files for ``python -m datalora train --config``: YAML numbers, field validation,
defaults for a real model vs the embedded tiny one."""

from __future__ import annotations

import json

import pytest

from datalora.config import DATALORAConfig, read_config_file
from datalora.train import load_train_config


def test_yaml_scientific_notation_reads_as_numbers(tmp_path):
    """PyYAML (YAML 1.1) reads ``1e-4`` (no dot) as a string; the loader reads YAML 1.2
    floats."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lambda_prune: 1e-1\ntraining:\n  learning_rate: 1e-4\n")
    config, training = load_train_config(cfg)
    assert config.lambda_prune == 0.1 and training["learning_rate"] == 1e-4
    cfg.write_text("lora_alpha: 1e2\nlambda_prune: 5E+1\n")  # an unsigned exponent too
    config = DATALORAConfig.from_file(cfg)
    assert (config.lora_alpha, config.lambda_prune) == (100.0, 50.0)
    # a JSON string (or a quoted YAML one): the error says how to write the number
    with pytest.raises(ValueError, match=r"^lambda_prune: expected a finite number, got "
                                         r"'1e-4' \(YAML 1\.1 reads 1e-4 as a string: write "
                                         r"1\.0e-4\)"):
        DATALORAConfig(lambda_prune="1e-4")


def test_an_empty_yaml_config_file_gives_the_defaults(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("# nothing set yet\n")
    assert DATALORAConfig.from_file(cfg) == DATALORAConfig()
    assert load_train_config(cfg)[0].num_lora_experts == 8


def test_scaling_is_alpha_over_rank():
    assert DATALORAConfig(lora_alpha=32, lora_rank=16).scaling == 2.0
    assert DATALORAConfig(lora_alpha=8, lora_rank=16).scaling == 0.5


@pytest.mark.parametrize("name", ["c.YAML", "c.Yml"])
def test_config_suffixes_are_case_insensitive(tmp_path, name):
    """A .YAML file was read as JSON ('not valid JSON')."""
    cfg = tmp_path / name
    cfg.write_text("lambda_prune: 0.5\n")
    assert load_train_config(cfg)[0].lambda_prune == 0.5
    assert DATALORAConfig.from_file(cfg).lambda_prune == 0.5
    with pytest.raises(ValueError, match=r"config: expected a \.yaml, \.yml or \.json file"):
        load_train_config(cfg.rename(tmp_path / "c.txt"))


@pytest.mark.parametrize("field, value", [("lambda_prune", "1e-1"),
                                          ("lora_alpha", float("nan")), ("lora_alpha", -16),
                                          ("target_retention", "5e-1"),
                                          ("alpha_balance", -0.1)])
def test_float_fields_are_validated(field, value):
    with pytest.raises(ValueError, match=field):
        DATALORAConfig(**{field: value})


@pytest.mark.parametrize("value", [None, [], [1, 2], ["q_proj", ""], 5])
def test_target_modules_must_be_module_names(value):
    with pytest.raises(ValueError, match="target_modules: expected a non-empty list of module "
                                         "names"):
        DATALORAConfig(target_modules=value)


def test_target_modules_and_base_model_forms():
    from pathlib import Path

    config = DATALORAConfig(base_model=Path("models") / "m", target_modules=("q_proj",))
    assert config.base_model == str(Path("models") / "m")  # JSON-serialisable
    assert config.target_modules == ["q_proj"]
    assert DATALORAConfig.from_dict(config.to_dict()) == config
    assert DATALORAConfig(target_modules="v_proj").target_modules == ["v_proj"]
    with pytest.raises(ValueError, match="base_model: expected None, a Hub name or a local "
                                         "path, got 123"):
        DATALORAConfig(base_model=123)
    # "" loaded from the current folder; a repeated name was kept (and saved) twice
    with pytest.raises(ValueError, match="base_model: expected None, .*, got ' '"):
        DATALORAConfig(base_model=" ")
    assert DATALORAConfig(target_modules=["q_proj", "v_proj", "q_proj"]).target_modules == [
        "q_proj", "v_proj"]


def test_config_file_for_a_real_model_keeps_datalora_defaults(tmp_path):
    """The embedded tiny model's settings (prune layers 1-3, learning rate 3e-2) apply to
    the embedded model only, not to a named base model."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("base_model: mistralai/Mistral-7B-v0.3\nnum_lora_experts: 8\n")
    config, training = load_train_config(cfg)
    assert config.prune_layers == DATALORAConfig().prune_layers
    assert config.lambda_prune == DATALORAConfig().lambda_prune
    assert training["learning_rate"] < 1e-3


@pytest.mark.parametrize("name, text, fragment", [
    ("c.yaml", "a: [1\n", "is not valid YAML"),
    ("c.json", "{bad", "is not valid JSON"),
    ("c.yaml", "training: 5\n", "expected 'training' to be a mapping"),
    ("c.json", "\udcff{}", r"c\.json is not UTF-8 text"),  # was a bare UnicodeDecodeError
    ("c.json", "[" * 100_000, "nests its values too deeply"),  # was a RecursionError
    ("c.yaml", "yes: 1\nfoo: 2\n", r"unknown DATALORAConfig fields \['foo', True\]"),
])
def test_malformed_config_files_raise_value_errors(tmp_path, name, text, fragment):
    """ValueError (the CLI's exit 2 with a message), not a parser's own exception."""
    cfg = tmp_path / name
    cfg.write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ValueError, match=f"config: .*{fragment}"):
        load_train_config(cfg)
    if name.endswith(".json"):
        with pytest.raises(ValueError, match=f"config: .*{fragment}"):
            DATALORAConfig.from_file(cfg)


def _captured_run(monkeypatch, argv):
    """What ``datalora train ARGV`` passes to train_datalora (which is replaced)."""
    from datalora import train
    from datalora.cli import build_parser

    seen = {}
    monkeypatch.setattr(train, "train_datalora",
                        lambda config, **kw: seen.update(kw, config=config) or None)
    monkeypatch.setattr(train, "format_summary", lambda result: "")
    args = build_parser().parse_args(["train", *argv])
    args.func(args)
    return seen.pop("config"), seen


def test_a_model_given_by_flag_or_training_key_gets_real_model_defaults(tmp_path, monkeypatch):
    """Not the embedded tiny model's (prune layers [1, 4], learning rate 3e-2, max length
    96), and the adapter config records the model."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("training:\n  model_name_or_path: org/model\n")
    for argv in (["--model", "org/model"], ["--config", str(cfg)]):
        config, training = _captured_run(monkeypatch, argv)
        assert config.base_model == "org/model", argv
        assert config.prune_layers is None and config.lambda_prune == \
            DATALORAConfig().lambda_prune
        # max_length is left to train_datalora (its default is capped at the positions of
        # a model with learned position embeddings; an explicit value is checked)
        assert training["learning_rate"] == 2e-4 and "max_length" not in training
    config, training = _captured_run(monkeypatch, [])  # the embedded model: tiny settings
    assert config.base_model is None and config.prune_layers == [1, 4]
    assert "learning_rate" not in training
    assert _captured_run(monkeypatch, ["--overwrite-output-dir"])[1] == \
        {"overwrite_output_dir": True}


def test_model_flag_overrides_the_recorded_base_model(tmp_path, monkeypatch):
    from datalora.train import _train_config

    cfg = tmp_path / "c.yaml"
    cfg.write_text("base_model: org/small\nnum_lora_experts: 4\ntraining:\n"
                   "  learning_rate: 1e-3\n")
    config, training = _captured_run(monkeypatch, ["--config", str(cfg), "--model", "org/big"])
    assert config.base_model == "org/big" and training["learning_rate"] == 1e-3
    # the library call records what it loads, too (the CLI is not the only caller)
    assert _train_config(DATALORAConfig(base_model="org/small", routing="shared"),
                         "org/big").base_model == \
        "org/big"
    assert _train_config(None, "org/big").prune_layers is None
    assert _train_config(None, None).prune_layers == [1, 4]


def test_quantize_flag_sets_the_config_field(tmp_path, monkeypatch):
    # NF4 needed a config file; the flag overrides the file's field
    config, _ = _captured_run(monkeypatch, ["--quantize", "nf4"])
    assert config.quantize == "nf4"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("num_lora_experts: 4\n")
    config, _ = _captured_run(monkeypatch, ["--config", str(cfg), "--quantize", "nf4"])
    assert config.quantize == "nf4" and config.num_lora_experts == 4
    config, _ = _captured_run(monkeypatch, ["--config", str(cfg)])
    assert config.quantize is None


def test_training_keys_take_the_flag_spellings(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("training:\n  model: org/model\n  output-dir: out\n  max-steps: 2\n")
    config, training = load_train_config(cfg)
    assert training["model_name_or_path"] == "org/model" and training["output_dir"] == "out"
    assert training["max_steps"] == 2 and config.base_model == "org/model"
    cfg.write_text("training:\n  epochz: 3\n")
    with pytest.raises(ValueError, match=r"unknown training keys \['epochz'\]; valid keys: "
                                         r".*'model_name_or_path'.*'output_dir'"):
        load_train_config(cfg)


def test_train_help_states_the_defaults():
    from datalora.cli import build_parser

    parser = build_parser()
    train = next(a for a in parser._subparsers._group_actions).choices["train"]
    text = " ".join(train.format_help().split())
    for fragment in ("default: 3)", "(default: 8)", "default: 96 on the embedded tiny model, "
                     "1024 on a named one", "0.03 on the embedded tiny model, 0.0002",
                     "Alpaca columns", "chat template is not applied"):
        assert fragment in text, fragment


def test_config_from_file_refuses_bad_files_naming_them(tmp_path):
    """DATALORAConfig.from_file / from_pretrained / from_dict on a file that is not a
    mapping, or not valid YAML / JSON, raised AttributeError or a bare parser error."""
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "broken.yaml").write_text("num_lora_experts: [4\n")
    (tmp_path / "broken.json").write_text("{\"num_lora_experts\": ")
    (tmp_path / "train.json").write_text('{"num_lora_experts": 4, "training": {"epochs": 1}}')
    for name in ("list.yaml", "list.json"):
        with pytest.raises(ValueError, match=r"^config: expected a mapping at the top of "
                                             r".*list\.(yaml|json), got list"):
            DATALORAConfig.from_file(tmp_path / name)
    with pytest.raises(ValueError, match=r"^config: expected a mapping at the top"):
        DATALORAConfig.from_pretrained(tmp_path / "list.json")
    for name, kind in (("broken.yaml", "YAML"), ("broken.json", "JSON")):
        with pytest.raises(ValueError, match=rf"^config: .*{name} is not valid {kind}"):
            DATALORAConfig.from_file(tmp_path / name)
    with pytest.raises(FileNotFoundError, match=r"^path: no such config file"):
        DATALORAConfig.from_file(tmp_path / "none.yaml")
    with pytest.raises(ValueError, match=r"'training' section belongs to datalora train"):
        DATALORAConfig.from_file(tmp_path / "train.json")
    with pytest.raises(TypeError, match=r"^config: expected a mapping of DATALORAConfig "
                                        r"fields, got list"):
        DATALORAConfig.from_dict([("num_lora_experts", 4)])



def test_a_config_path_that_is_not_a_path_is_named():
    with pytest.raises(TypeError, match=r"^path: expected a folder or file path \(str or "
                                        r"Path\), got NoneType$"):
        DATALORAConfig.from_pretrained(None)


def test_from_dict_is_annotated_to_take_any_mapping():
    """``py.typed``: from_dict takes any mapping (it checks ``isinstance(data, Mapping)``)
    but was annotated ``dict``, so a type checker rejected e.g. a MappingProxyType."""
    import typing
    from collections.abc import Mapping
    from types import MappingProxyType

    hint = typing.get_type_hints(DATALORAConfig.from_dict)["data"]
    assert typing.get_origin(hint) is Mapping
    assert DATALORAConfig.from_dict(MappingProxyType({"lora_rank": 4})).lora_rank == 4


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(lora_alpha=0), r"^lora_alpha: expected > 0, got 0"),  # scaling 0: a no-op adapter
    (dict(target_retention=1.5), r"^target_retention: expected a value in \(0, 1\]"),
    (dict(lora_dropout=1.0), r"^lora_dropout: expected a value in \[0, 1\), got 1.0"),
    (dict(temperature_init=0.0), r"^temperature_init: expected > 0, got 0.0"),
    (dict(temperature_final=0.0), r"^temperature_final: expected > 0, got 0.0"),
    (dict(prune_layers=[2, 2]), r"^prune_layers: expected \[start, end\) with 0 <= start < "
                                r"end, got \[2, 2\]"),  # an empty range
    (dict(prune_layers=[-1, 2]), r"^prune_layers\[0\]: expected an int >= 0"),
    (dict(num_lora_experts=2, num_active_experts=3), r"^num_active_experts: expected <= "
                                                     r"num_lora_experts=2, got 3"),
])
def test_config_edges_that_are_refused(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        DATALORAConfig(**kwargs)


def test_config_edges_that_are_valid_settings():
    """The closed ends of each range are accepted: weight 0 turns an aux loss off, k = E
    routes every token to every expert, retention 1 prunes nothing, equal temperatures
    keep tau constant, a one-layer prune range starts at layer 0."""
    cfg = DATALORAConfig(lambda_prune=0.0, alpha_balance=0.0, num_lora_experts=2,
                         num_active_experts=2, target_retention=1.0, lora_dropout=0.0,
                         temperature_init=0.5, temperature_final=0.5, prune_layers=[0, 1])
    assert (cfg.lambda_prune, cfg.alpha_balance, cfg.num_active_experts,
            cfg.target_retention, cfg.prune_layers) == (0.0, 0.0, 2, 1.0, [0, 1])


def test_command_line_values_override_the_config_file_even_when_zero(tmp_path, monkeypatch):
    """``--seed 0`` is a value like any other: it overrides the config file's seed."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("training:\n  seed: 3\n  max_steps: 7\n")
    assert _captured_run(monkeypatch, ["--config", str(cfg)])[1]["seed"] == 3
    training = _captured_run(monkeypatch, ["--config", str(cfg), "--seed", "0"])[1]
    assert (training["seed"], training["max_steps"]) == (0, 7)


def test_a_yaml_alias_bomb_is_refused_before_anything_expands_it(tmp_path):
    """A few hundred bytes of nested aliases stood for ~13 GB of strings, which the error
    message of the invalid ``target_modules`` expanded (a MemoryError after seconds)."""
    lines = ["target_modules:", '  - &l0 ["xxxxxxxx", "xxxxxxxx", "xxxxxxxx", "xxxxxxxx"]']
    lines += [f"  - &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(lines) + "\n")
    assert bomb.stat().st_size < 1000
    with pytest.raises(ValueError, match=r"bomb.yaml repeats more than 100,000 values "
                                         r"through YAML aliases"):
        DATALORAConfig.from_file(bomb)
    endless = tmp_path / "endless.yaml"
    endless.write_text("target_modules: &s [q_proj, *s]\n")
    with pytest.raises(ValueError, match="repeats more than 100,000 values"):
        read_config_file(endless)
    shared = tmp_path / "shared.yaml"  # aliases of a modest size stay usable
    shared.write_text("target_modules: &t [q_proj, v_proj]\nbase_model: x\n"
                      "training: {note: *t}\n")
    assert read_config_file(shared)["training"]["note"] == ["q_proj", "v_proj"]
    n = 21_000  # rows of 5 values: past the limit, but written out, not aliased
    rows = [{"instruction": f"q{i}", "response": f"a{i}"} for i in range(n)]
    for suffix, text in ((".json", json.dumps({"training": {"dataset": rows}})),
                         (".yaml", "training:\n  dataset:\n" + "".join(
                             f"  - {{instruction: q{i}, response: a{i}}}\n"
                             for i in range(n)))):
        inline = tmp_path / f"inline{suffix}"  # a dataset written into the config: fine
        inline.write_text(text)
        assert len(read_config_file(inline)["training"]["dataset"]) == n
