"""Config files for ``python -m datalora train --config``: YAML numbers, field validation,
defaults for a real model vs the embedded tiny one."""

from __future__ import annotations

import pytest

from datalora.config import DATALORAConfig
from datalora.train import load_train_config


def test_yaml_scientific_notation_reads_as_numbers(tmp_path):
    """PyYAML (YAML 1.1) reads ``1e-4`` (no dot) as a string; the loader reads YAML 1.2
    floats."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lambda_prune: 1e-1\ntraining:\n  learning_rate: 1e-4\n")
    config, training = load_train_config(cfg)
    assert config.lambda_prune == 0.1 and training["learning_rate"] == 1e-4


@pytest.mark.parametrize("field, value", [("lambda_prune", "1e-1"),
                                          ("lora_alpha", float("nan")), ("lora_alpha", -16),
                                          ("target_retention", "5e-1"),
                                          ("alpha_balance", -0.1)])
def test_float_fields_are_validated(field, value):
    with pytest.raises(ValueError, match=field):
        DATALORAConfig(**{field: value})


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
])
def test_malformed_config_files_raise_value_errors(tmp_path, name, text, fragment):
    """ValueError (the CLI's exit 2 with a message), not a parser's own exception."""
    cfg = tmp_path / name
    cfg.write_text(text)
    with pytest.raises(ValueError, match=f"config: .*{fragment}"):
        load_train_config(cfg)
