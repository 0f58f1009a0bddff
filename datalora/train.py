"""Train DATALORA end to end: ``train_datalora(...)`` and the ``train`` CLI subcommand.

``python -m datalora train`` trains on the embedded tiny Mistral and the embedded
multi-task instruction data (OpenOrca columns) with the 3-phase curriculum, prints the
per-phase summary and writes the adapter (+ saliency network + config) to
``--output-dir``. ``--config file.yaml|json`` gives the :class:`DATALORAConfig` fields and,
under a ``training:`` key, :func:`train_datalora` arguments: the flags' names,
``logging_steps``, ``gradient_accumulation_steps``, ``eval_limit``, and ``trainer_args``
(any other ``TrainingArguments`` field, e.g. ``fsdp`` / ``fsdp_config``).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from datalora.checks import check_int, check_number
from datalora.cli import int_at_least, plain_text
from datalora.config import DATALORAConfig
from datalora.curriculum import PHASES

DEFAULT_TINY_CONFIG = dict(num_lora_experts=8, lora_rank=8, lora_alpha=16.0,
                           num_active_experts=2, routing="shared", prune_layers=[1, 4],
                           lambda_prune=1.0, alpha_balance=0.1)
"""DATALORA settings of the embedded tiny model (4 layers: layers 1-3 pruned). The aux
weights are stronger than DATALORAConfig's defaults: with 0.1 / 0.01 the tiny run's
experts collapsed onto two and the mean keep probability drifted to ~1."""


@dataclass
class TrainResult:
    """What :func:`train_datalora` returns.

    Attributes:
        log_history: the Trainer's log entries (loss, phase, tau, retention, expert load...).
        datalora_history: per logging step: phase name, losses, retention, ``expert_load
            [E]`` and ``task_expert_load {task: [E]}``.
        phase_summary: per phase: mean loss, mean actual retention, tau range, steps.
        output_dir: where the final adapter was saved. model, tokenizer: the trained model.
        keep_threshold: the calibrated generation keep threshold.
    """

    log_history: list[dict[str, Any]]
    datalora_history: list[dict[str, Any]]
    phase_summary: dict[str, dict[str, float]]
    output_dir: str
    model: Any = None
    tokenizer: Any = None
    keep_threshold: float = float("nan")
    metrics: dict[str, Any] = field(default_factory=dict)


class _Rows(torch.utils.data.Dataset):
    def __init__(self, rows: list[dict[str, Any]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.rows[i]


def _tokenized_rows(rows: list[dict[str, Any]], tokenizer: Any,
                    max_length: int) -> list[dict[str, Any]]:
    from datalora.data import tokenize_example

    out = []
    for row in rows:
        item = tokenize_example(row, tokenizer, max_length)
        item["task"] = row.get("task", "unknown")
        out.append(item)
    return out


def summarize_phases(history: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean loss / retention and tau range per curriculum phase of a ``datalora_history``."""
    summary: dict[str, dict[str, float]] = {}
    for phase in PHASES:
        rows = [h for h in history if h["phase"] == phase]
        if not rows:
            continue
        summary[phase] = {
            "logs": len(rows),
            "loss_first": rows[0]["lm_loss"], "loss_last": rows[-1]["lm_loss"],
            "loss_mean": sum(r["lm_loss"] for r in rows) / len(rows),
            "retention_mean": sum(r["retention"] for r in rows) / len(rows),
            "retention_target_last": rows[-1]["retention_target"],
            "tau_first": rows[0]["tau"], "tau_last": rows[-1]["tau"],
            "rank_scale_mean": sum(r["rank_scale_mean"] for r in rows) / len(rows)}
    return summary


@torch.no_grad()
def evaluate_loss(model: Any, rows: list[dict[str, Any]], tokenizer: Any, max_length: int = 96,
                  batch_size: int = 16, retention: float | None = None) -> float:
    """Token-averaged LM loss (response tokens) of a DATALORA model on instruction rows.

    Args:
        model: a :class:`~datalora.model.DATALORAModel` (eval mode is set and restored).
        rows: rows with OpenOrca columns. retention: temporarily set this retention (1.0 =
            dense); default: the model's current setting (calibrated threshold if set).
    """
    from datalora.data import CausalLMCollator

    if not rows:
        raise ValueError("rows: expected at least one row to evaluate on")
    collator = CausalLMCollator(tokenizer=tokenizer)
    items = _tokenized_rows(rows, tokenizer, max_length)
    was_training = model.training
    previous = model.curriculum_state().get("retention")
    model.eval()
    if retention is not None:
        model.set_curriculum_state(retention=retention)
    total, count = 0.0, 0
    device = next(model.parameters()).device
    try:
        for i in range(0, len(items), batch_size):
            batch = collator([{k: v for k, v in x.items() if k != "task"}
                              for x in items[i:i + batch_size]])
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits.float()
            labels = batch["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                ignore_index=-100, reduction="sum")
            total += float(loss)
            count += int((labels != -100).sum())
    finally:
        if retention is not None and previous is not None:
            model.set_curriculum_state(retention=previous)
        model.train(was_training)
    return total / max(count, 1)


def train_datalora(config: DATALORAConfig | dict[str, Any] | None = None,
                   model_name_or_path: str | None = None,
                   dataset: str | list[dict[str, Any]] | None = None,
                   output_dir: str | Path = "datalora-output", epochs: float = 3,
                   max_steps: int | None = None, batch_size: int = 8,
                   learning_rate: float = 3e-2, max_length: int = 96, limit: int | None = None,
                   seed: int = 0, logging_steps: int = 5, save_steps: int | None = None,
                   resume_from_checkpoint: str | None = None,
                   curriculum_mode: str = "epochs", bf16: bool = False,
                   gradient_accumulation_steps: int = 1, progress: bool = True,
                   model: Any = None, tokenizer: Any = None,
                   report_to: list[str] | None = None,
                   eval_dataset: str | list[dict[str, Any]] | None = None,
                   eval_limit: int | None = 200,
                   trainer_args: dict[str, Any] | None = None) -> TrainResult:
    """Trains DATALORA and returns the logs (for printing / plotting per phase).

    Args:
        config: a :class:`DATALORAConfig` or its fields (default: the tiny-model settings
            :data:`DEFAULT_TINY_CONFIG`, ``routing="shared"`` is required).
        model_name_or_path: None / ``"embedded"``: the tiny random Mistral; else a local
            path or Hub name (``datalora.testing.load_model_and_tokenizer``).
        dataset: None / ``"embedded"``: the multi-task data; a ``.jsonl/.json/.parquet``
            file, a folder, a Hub name, or a list of rows with OpenOrca columns.
        output_dir: checkpoints and the final adapter.
        epochs / max_steps: run length (``max_steps`` wins when set).
        learning_rate: the default suits the embedded tiny model; use ~1e-4..2e-4 for
            a 7B model.
        curriculum_mode: ``"epochs"`` (one phase per third of the epochs, the card) or
            ``"steps"`` (by fraction of optimizer steps).
        limit: use only the first ``limit`` rows.
        save_steps: checkpoint every n steps (None: no intermediate checkpoints).
        resume_from_checkpoint: a ``checkpoint-N`` folder to resume from (exact).
        bf16: bf16 frozen base weights with fp32 adapter / saliency weights (where the
            device supports bf16); the MoLoRA layers compute in the activations' dtype.
        model / tokenizer: an already loaded base model and tokenizer (skips loading).
        eval_dataset: rows or a source (``"embedded"``: the embedded eval split; a folder or
            split-keyed file: its ``eval`` / ``validation`` / ``test`` split, see
            :func:`~datalora.data.load_eval_rows`), read before training, on which
            the final eval loss is measured with pruning (``metrics["eval_loss_pruned"]``,
            calibrated threshold) and dense (``metrics["eval_loss_dense"]``).
        trainer_args: more ``transformers.TrainingArguments`` fields (e.g. ``fsdp``,
            ``fsdp_config``, ``deepspeed``, ``weight_decay``, ``warmup_steps``,
            ``optim``); they override the values derived from the arguments above.

    Returns:
        :class:`TrainResult`.
    """
    from transformers import TrainingArguments

    from datalora.data import TASKS, CausalLMCollator, load_eval_rows, load_instruction_dataset
    from datalora.model import get_datalora_model
    from datalora.trainer import DATALORATrainer

    if config is None:
        config = DATALORAConfig(**DEFAULT_TINY_CONFIG)
    elif isinstance(config, dict):
        config = DATALORAConfig.from_dict(config)
    if not isinstance(config, DATALORAConfig):
        raise TypeError(f"config: expected DATALORAConfig, dict or None, "
                        f"got {type(config).__name__}")
    if config.routing != "shared":
        raise ValueError(f"config.routing: DATALORA training needs 'shared', "
                         f"got {config.routing!r}")
    if max_steps is not None:
        max_steps = check_int("max_steps", max_steps, low=1)
    if not float(epochs) > 0:
        raise ValueError(f"epochs: expected > 0, got {epochs!r}")
    learning_rate = check_number("learning_rate", learning_rate, low=0, low_inclusive=False)
    batch_size = check_int("batch_size", batch_size, low=1)
    gradient_accumulation_steps = check_int("gradient_accumulation_steps",
                                            gradient_accumulation_steps, low=1)
    trainer_args = _check_trainer_args(TrainingArguments, trainer_args)
    eval_rows = None
    if eval_dataset is not None:  # read before training: a bad path fails now, not hours later
        try:
            eval_rows = (eval_dataset[:eval_limit] if isinstance(eval_dataset, list) else
                         load_eval_rows(eval_dataset, limit=eval_limit))
        except (OSError, ValueError) as exc:  # name the argument, not the loader's "source"
            raise type(exc)(f"eval_dataset: {exc}") from exc
        if not eval_rows:
            raise ValueError(f"eval_dataset: no rows (eval_limit={eval_limit!r})")
    use_bf16 = bool(bf16) and (not torch.cuda.is_available() or torch.cuda.is_bf16_supported())
    if model is None or tokenizer is None:
        from datalora.testing import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(model_name_or_path or config.base_model,
                                                    dtype=torch.bfloat16 if use_bf16 else None)
    if use_bf16:
        model.to(torch.bfloat16)
    if isinstance(dataset, list):
        rows = dataset[:limit] if limit is not None else dataset
    else:
        rows = load_instruction_dataset(dataset, "train", limit=limit)
    if not rows:
        raise ValueError("dataset: no training rows")
    torch.manual_seed(seed)
    dl_model = get_datalora_model(model, config, verbose=progress)
    if use_bf16:  # bf16 frozen base, fp32 master weights for the adapter and the USN
        for _, layer in dl_model.molora_layers():
            layer.float()
            layer.base_layer.to(torch.bfloat16)
    dl_model.train()
    train_rows = _Rows(_tokenized_rows(rows, tokenizer, max_length))
    tasks = tuple(sorted({r.get("task", "unknown") for r in rows} | set(TASKS)))
    collator = CausalLMCollator(tokenizer=tokenizer, return_task_ids=True, tasks=tasks)
    args = TrainingArguments(**{**dict(
        output_dir=str(output_dir), num_train_epochs=float(epochs),
        max_steps=max_steps if max_steps is not None else -1,
        per_device_train_batch_size=batch_size, learning_rate=learning_rate,
        gradient_accumulation_steps=gradient_accumulation_steps,
        logging_steps=logging_steps, save_strategy="steps" if save_steps else "no",
        save_steps=save_steps or 500, report_to=report_to or [], seed=seed, data_seed=seed,
        use_cpu=not torch.cuda.is_available(), disable_tqdm=not progress,
        remove_unused_columns=False, lr_scheduler_type="cosine", warmup_steps=0,
        dataloader_num_workers=0), **trainer_args})
    trainer = DATALORATrainer(model=dl_model, args=args, train_dataset=train_rows,
                              data_collator=collator, processing_class=tokenizer,
                              curriculum_mode=curriculum_mode, task_names=list(tasks))
    output = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    trainer.save_model(str(output_dir))
    history = trainer.datalora_history
    metrics = dict(output.metrics)
    if eval_rows is not None:
        metrics["eval_loss_pruned"] = evaluate_loss(dl_model, eval_rows, tokenizer, max_length)
        metrics["eval_loss_dense"] = evaluate_loss(dl_model, eval_rows, tokenizer, max_length,
                                                   retention=1.0)
    return TrainResult(log_history=list(trainer.state.log_history), datalora_history=history,
                       phase_summary=summarize_phases(history), output_dir=str(output_dir),
                       model=dl_model, tokenizer=tokenizer,
                       keep_threshold=float(dl_model.saliency.keep_threshold),
                       metrics=metrics)


# ---------------------------------------------------------------------------- CLI

def add_train_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Registers ``train`` on an ``argparse`` subparsers object (``func`` = :func:`run_train`)."""
    p = subparsers.add_parser("train", help="train DATALORA (default: embedded tiny model "
                                            "and multi-task data)",
                              description=plain_text(__doc__),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="DATALORAConfig as .yaml/.yml/.json (optional "
                                    "'training:' section with train_datalora arguments)")
    p.add_argument("--model", dest="model_name_or_path", help="base model path / Hub name")
    p.add_argument("--dataset", help="dataset file, folder or Hub name (default: embedded)")
    p.add_argument("--output-dir", default=None, help="default: datalora-output")
    p.add_argument("--epochs", type=float, default=None,
                   help="training epochs (the curriculum's 3 phases span them)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after N optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per device and step")
    p.add_argument("--learning-rate", type=float, default=None,
                   help="AdamW peak rate (default: 3e-2 on the embedded tiny model, "
                        "2e-4 on a named one)")
    p.add_argument("--max-length", type=int, default=None, help="tokens per row at most")
    p.add_argument("--limit", type=int, default=None, help="use the first N rows")
    p.add_argument("--save-steps", type=int_at_least(1), default=None,
                   help="also checkpoint every N steps (default: only the final adapter)")
    p.add_argument("--resume-from-checkpoint", default=None,
                   help="a checkpoint folder of an earlier run (weights + curriculum)")
    p.add_argument("--curriculum-mode", choices=("epochs", "steps"), default=None,
                   help="phase boundaries by epoch (the card) or by step fraction")
    p.add_argument("--bf16", action="store_true", default=None,
                   help="bf16 autocast (frozen base in bf16, adapter fp32)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--eval-dataset", default=None,
                   help="'embedded' or a file: report eval loss pruned vs dense at the end")
    p.add_argument("--json", action="store_true", help="print the phase summary as JSON")
    p.set_defaults(func=run_train, flag_names={
        "name_or_path": "--model", "source": "--dataset", "path": "--resume-from-checkpoint",
        "eval_dataset": "--eval-dataset", "max_steps": "--max-steps",
        "batch_size": "--batch-size", "epochs": "--epochs", "learning_rate": "--learning-rate",
        "max_length": "--max-length"})
    return p


def _check_trainer_args(cls: type, extra: dict[str, Any] | None) -> dict[str, Any]:
    """``extra`` validated (a mapping of real ``TrainingArguments`` fields, with
    ``remove_unused_columns`` kept False: the collator passes task ids), before any model
    is loaded."""
    import dataclasses

    if extra is None:
        return {}
    if not isinstance(extra, dict):
        raise TypeError(f"trainer_args: expected a mapping of TrainingArguments fields, got "
                        f"{type(extra).__name__}")
    unknown = sorted(set(extra) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"trainer_args: {unknown} are not TrainingArguments fields")
    if extra.get("remove_unused_columns"):
        raise ValueError("trainer_args: remove_unused_columns must stay False (the DATALORA "
                         "collator passes task ids the model does not take)")
    return dict(extra)


_CLI_KEYS = ("model_name_or_path", "dataset", "output_dir", "epochs", "max_steps",
             "batch_size", "learning_rate", "max_length", "limit", "save_steps",
             "resume_from_checkpoint", "curriculum_mode", "bf16", "seed", "eval_dataset")


def load_train_config(path: str | Path) -> tuple[DATALORAConfig, dict[str, Any]]:
    """Reads ``--config``: DATALORAConfig fields + an optional ``training`` section."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config: no such file {path}")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        from datalora.config import load_yaml

        try:
            data = load_yaml(text) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"config: {path} is not valid YAML: {exc}") from None
    elif path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"config: {path} is not valid JSON: {exc}") from None
    else:
        raise ValueError(f"config: expected a .yaml, .yml or .json file, got {path.name}")
    if not isinstance(data, dict):
        raise ValueError(f"config: expected a mapping at the top of {path}, "
                         f"got {type(data).__name__}")
    training = data.pop("training", {}) or {}
    if not isinstance(training, dict):
        raise ValueError(f"config: expected 'training' to be a mapping of training settings, "
                         f"got {type(training).__name__}")
    unknown = sorted(set(training) - set(_CLI_KEYS) - {
        "logging_steps", "gradient_accumulation_steps", "eval_limit", "learning_rate",
        "trainer_args"})
    if unknown:
        raise ValueError(f"config: unknown training keys {unknown}")
    if data.get("base_model") in (None, "embedded"):
        merged = {**DEFAULT_TINY_CONFIG, **data}  # tuned for the embedded tiny model
    else:  # a real model: DATALORAConfig's defaults (prune_layers None = second half)
        merged = {"routing": "shared", **data}
        training.setdefault("learning_rate", 2e-4)  # train_datalora's 3e-2 is for the tiny one
    return DATALORAConfig.from_dict(merged), training


def format_summary(result: TrainResult) -> str:
    lines = [f"{'phase':<15}{'logs':>5}{'loss first':>12}{'loss last':>11}"
             f"{'retention':>11}{'tau':>14}"]
    for phase, s in result.phase_summary.items():
        lines.append(f"{phase:<15}{int(s['logs']):>5}{s['loss_first']:>12.4f}"
                     f"{s['loss_last']:>11.4f}{s['retention_mean']:>11.3f}"
                     f"{s['tau_first']:>7.2f}->{s['tau_last']:<5.2f}")
    thr = result.keep_threshold
    lines.append(f"keep threshold: {thr:.4f}" if not math.isnan(thr) else
                 "keep threshold: not calibrated")
    for key in ("eval_loss_pruned", "eval_loss_dense"):
        if key in result.metrics:
            lines.append(f"{key}: {result.metrics[key]:.4f}")
    lines.append(f"adapter saved to {result.output_dir}")
    return "\n".join(lines)


def run_train(args: argparse.Namespace) -> TrainResult:
    """Runs the ``train`` subcommand: CLI flags override the config file's ``training``."""
    if args.config:
        config, training = load_train_config(args.config)
    else:
        config, training = DATALORAConfig(**DEFAULT_TINY_CONFIG), {}
    for key in _CLI_KEYS:
        value = getattr(args, key, None)
        if value is not None:
            training[key] = value
    result = train_datalora(config, **training)
    if getattr(args, "json", False):
        print(json.dumps(result.phase_summary, indent=2))
    else:
        print(format_summary(result))
    return result


add_parser = add_train_parser

__all__ = ["DEFAULT_TINY_CONFIG", "TrainResult", "add_train_parser", "evaluate_loss",
           "format_summary",
           "load_train_config", "run_train", "summarize_phases", "train_datalora"]
