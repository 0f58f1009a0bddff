"""Train DATALORA end to end: ``train_datalora(...)`` and the ``train`` CLI subcommand.

``python -m datalora train`` trains on the embedded tiny Mistral and the embedded
multi-task instruction data (OpenOrca columns) with the 3-phase curriculum, prints the
per-phase summary and writes the adapter (+ saliency network + config) to
``--output-dir``. ``--config file.yaml|json`` gives the :class:`DATALORAConfig` fields and,
under a ``training:`` key, :func:`train_datalora` arguments: the flags' names with
underscores (``model_name_or_path``, or ``model``; ``output_dir``, ``max_length``, ...),
``logging_steps``, ``gradient_accumulation_steps`` and ``trainer_args`` (any other
``TrainingArguments`` field, e.g. ``fsdp`` / ``fsdp_config``).

A base model given by ``--model``, ``model_name_or_path`` or ``base_model`` gets
DATALORAConfig's defaults (``prune_layers``: the second half of its layers), learning rate
2e-4 and max length 1024 (at most its positions when it has learned position embeddings,
as GPT-2 and OPT do; a larger ``--max-length`` is an error), and is recorded as
``base_model`` in the adapter's config; the embedded tiny model gets its tuned settings
(learning rate 3e-2, max length 96).
Rows are trained as
``{system_prompt}\\n\\n### Question:\\n{question}\\n\\n### Answer:\\n{response}<eos>``
(a tokenizer's chat template is not applied); rows longer than the max length are
truncated, with a warning that counts them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from datalora.checkpoints import (
    check_resumable,
    checkpoint_folders,
    last_complete_checkpoint,
    saved_trainer_state,
)
from datalora.checks import check_int, check_number
from datalora.cli import int_at_least, plain_text
from datalora.config import DATALORAConfig, read_config_file
from datalora.curriculum import MODES, PHASES, check_mode
from datalora.module_modes import eval_mode

DEFAULT_TINY_CONFIG: dict[str, Any] = dict(num_lora_experts=8, lora_rank=8, lora_alpha=16.0,
                                           num_active_experts=2, routing="shared",
                                           prune_layers=[1, 4], lambda_prune=1.0,
                                           alpha_balance=0.1)
"""DATALORA settings of the embedded tiny model (4 layers: layers 1-3 pruned). The aux
weights are stronger than DATALORAConfig's defaults: with 0.1 / 0.01 the tiny run's
experts collapsed onto two and the mean keep probability drifted to ~1."""

TINY_MODEL_DEFAULTS = {"learning_rate": 3e-2, "max_length": 96}
"""Run settings for the embedded tiny model."""
REAL_MODEL_DEFAULTS = {"learning_rate": 2e-4, "max_length": 1024}
"""Run settings for a base model given by path or Hub name."""


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


def _is_embedded(name: Any) -> bool:
    return name in (None, "embedded")


def _tokenized_rows(rows: list[dict[str, Any]], tokenizer: Any, max_length: int,
                    what: str = "rows", progress: bool = False,
                    position_limit: int | None = None) -> list[dict[str, Any]]:
    """Tokenized rows; warns (one line each) how many were truncated or have no response
    (``position_limit``: the model's, for the advice: see ``TokenizeStats.warnings``)."""
    from datalora.data import tokenize_rows

    items, stats = tokenize_rows(rows, tokenizer, max_length, progress=progress)
    for line in stats.warnings(what, max_length, position_limit):
        warnings.warn(line, stacklevel=3)
    return items


def _check_vocabulary(model: Any, tokenizer: Any, *row_lists: Any) -> None:
    """Every token id of the tokenized rows, and the padding id, indexes the model's input
    embeddings (a tokenizer of another model failed at the first step, with an IndexError
    inside ``torch.embedding``)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") \
        else None
    size = getattr(embeddings, "num_embeddings", None)
    if not isinstance(size, int):
        return
    top = max((max(row["input_ids"], default=-1) for rows in row_lists if rows is not None
               for row in rows), default=-1)
    pad = getattr(tokenizer, "pad_token_id", None)
    for what, token in (("gives token id", top), ("pads with token id", pad)):
        if isinstance(token, int) and token >= size:
            raise ValueError(f"tokenizer: {what} {token}, but the model's input embeddings "
                             f"have {size} rows (ids 0..{size - 1}); the tokenizer "
                             f"({len(tokenizer)} tokens) is not this model's")


def _with_training_state(folder: Path) -> Path:
    """``folder``, a checkpoint holding its optimizer and scheduler states (refused before
    the model loads; DATALORATrainer.train refuses it too)."""
    check_resumable(folder)
    return folder


def _check_checkpoint(path: Any, output_dir: str | Path) -> Path | None:
    """``resume_from_checkpoint`` resolved before the model loads: None, a folder holding
    ``trainer_state.json``, or ``"last"`` / True: the latest complete ``checkpoint-N`` in
    ``output_dir`` (one without a readable ``trainer_state.json``, a save cut short, is
    skipped with a warning); a run folder's error names its latest ``checkpoint-N``."""
    if path is None or path is False:
        return None
    if path is True or path == "last":
        return _with_training_state(last_complete_checkpoint(output_dir, stacklevel=3))
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"resume_from_checkpoint: expected a checkpoint folder, 'last', True "
                        f"or None, got {path!r}")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint: no such folder: {folder}")
    if (folder / "trainer_state.json").is_file():
        if saved_trainer_state(folder) is None:
            raise ValueError(f"resume_from_checkpoint: {folder / 'trainer_state.json'} is "
                             f"not valid JSON (a save cut short): resume an earlier "
                             f"checkpoint")
        return _with_training_state(folder)
    steps = checkpoint_folders(folder)
    hint = (f"; it holds {len(steps)} checkpoint folder(s), the latest is {steps[-1][1]}"
            if steps else "")
    raise ValueError(f"resume_from_checkpoint: {folder} is not a checkpoint folder (no "
                     f"trainer_state.json){hint}")


def _check_backend(backend: str) -> None:
    """An explicit ``backend`` that cannot run on the device training will use is an error
    now: the first training step raised it, after the model and the data had loaded."""
    if backend == "auto":
        return
    from datalora import _C_loader
    from datalora.ops.backends import unavailable_reason

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    why = (_C_loader.unsupported_reason(device) if backend == "cuda"  # the NF4 kernels
           else unavailable_reason(backend, device))
    if why is not None:
        raise ValueError(f"backend: {backend!r} cannot run on this machine: {why}")


def _check_tokenizer(base_model: str | None, model: Any, tokenizer: Any) -> None:
    """The tokenizer is there before the model loads: a loaded one with a given ``model``;
    else ``tokenizer`` (a name or path) or the model folder's (see
    :func:`~datalora.testing.check_tokenizer_source`)."""
    from datalora.testing import check_tokenizer_source

    if model is None:
        if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)) \
                and not callable(tokenizer):
            raise TypeError(f"tokenizer: expected None, a folder, a Hub name or a loaded "
                            f"tokenizer, got {tokenizer!r}")
        check_tokenizer_source(base_model, tokenizer)
    elif tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        raise TypeError(f"tokenizer: with a loaded model, pass its loaded tokenizer, got "
                        f"{tokenizer!r}")


def _writable_output_dir(output_dir: Any) -> Path:
    """``output_dir``, created when missing and checked writable (a probe file is written
    and removed) before the model loads; the error names the output folder."""
    if not isinstance(output_dir, (str, os.PathLike)):
        raise TypeError(f"output_dir: expected a folder path, got {output_dir!r}")
    folder = Path(output_dir).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise type(exc)(f"output_dir: cannot write to the output folder {folder}: "
                        f"{exc.strerror or exc}") from exc
    return folder


def _check_earlier_checkpoints(folder: Path, resume: Path | None, overwrite: bool) -> None:
    """A run that does not resume from a checkpoint of ``folder`` must not add its
    ``checkpoint-N`` folders to an earlier run's there (``'last'`` would later pick the
    highest N, maybe the earlier run's): refused, or with ``overwrite`` the earlier ones
    are deleted (with a warning)."""
    found = [path for _, path in checkpoint_folders(folder)]
    if not found or (resume is not None and resume.parent.resolve() == folder.resolve()):
        return
    names = ", ".join(path.name for path in found)
    if not overwrite:
        raise ValueError(f"output_dir: the output folder {folder} holds checkpoints of an "
                         f"earlier run ({names}); resume it (resume_from_checkpoint='last', "
                         f"--resume-from-checkpoint last), choose another output folder, or "
                         f"set overwrite_output_dir (--overwrite-output-dir) to delete them")
    for path in found:
        with contextlib.suppress(FileNotFoundError):  # another torchrun rank deleted it
            shutil.rmtree(path)
    warnings.warn(f"overwrite_output_dir: deleted the earlier run's {names} in {folder}",
                  stacklevel=3)


def _position_limit(model: Any) -> int | None:
    """How many positions a model with a learned position table takes (GPT-2's ``wpe``,
    OPT's ``embed_positions``; a longer row fails with an IndexError): its config's
    ``max_position_embeddings``. None for a model without one (rotary, ALiBi)."""
    inputs = model.get_input_embeddings()
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if (isinstance(module, torch.nn.Embedding) and module is not inputs
                and (leaf == "wpe" or "position" in leaf)):
            return getattr(model.config, "max_position_embeddings", None) or \
                module.num_embeddings
    return None


def _folder_position_limit(name_or_path: Any) -> int | None:
    """:func:`_position_limit` of a local model folder from its ``config.json`` alone (the
    model is built on the meta device: no weights are read); None for another name."""
    if _is_embedded(name_or_path):
        return None
    folder = Path(str(name_or_path)).expanduser()
    if not (folder / "config.json").is_file():
        return None
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    return _position_limit(skeleton)


def _fit_max_length(max_length: int, given: bool, limit: int | None) -> int:
    """``max_length`` within the model's position ``limit``: the default is capped at it, a
    larger value that was ``given`` is an error."""
    if limit is None or max_length <= limit:
        return max_length
    if given:
        raise ValueError(f"max_length: the model takes at most {limit} positions (learned "
                         f"position embeddings, max_position_embeddings), got {max_length}")
    return limit


def _train_config(config: DATALORAConfig | dict[str, Any] | None,
                  model_name_or_path: Any) -> DATALORAConfig:
    """The config to train with: defaults for the model (tiny settings for the embedded
    one), ``base_model`` set to ``model_name_or_path`` when given (it is saved with the
    adapter), shared routing checked."""
    if config is None:
        config = (DATALORAConfig(**DEFAULT_TINY_CONFIG) if _is_embedded(model_name_or_path)
                  else DATALORAConfig())
    elif isinstance(config, dict):
        config = DATALORAConfig.from_dict(config)
    if not isinstance(config, DATALORAConfig):
        raise TypeError(f"config: expected DATALORAConfig, dict or None, "
                        f"got {type(config).__name__}")
    if config.routing == "auto":  # the method, or its clear error where the model can't
        config = dataclasses.replace(config, routing="shared")
    if config.routing != "shared":
        raise ValueError(f"config.routing: DATALORA training needs 'shared' (or 'auto'), "
                         f"got {config.routing!r}")
    if model_name_or_path is not None:
        base = None if _is_embedded(model_name_or_path) else str(model_name_or_path)
        config = dataclasses.replace(config, base_model=base)
    return config


def _eval_rows(eval_dataset: Any, eval_limit: int | None) -> list[dict[str, Any]] | None:
    """The eval rows (first ``eval_limit``), errors naming ``eval_dataset``."""
    from datalora.data import load_eval_rows, normalize_rows

    if eval_dataset is None:
        return None
    if eval_limit is not None:
        eval_limit = check_int("eval_limit", eval_limit, low=1)
    if isinstance(eval_dataset, list):
        rows = normalize_rows(eval_dataset, "eval_dataset", eval_limit)
    else:
        try:
            rows = load_eval_rows(eval_dataset, limit=eval_limit)
        except (OSError, ValueError) as exc:  # name the argument, not the loader's "source"
            raise type(exc)(f"eval_dataset: {exc}") from exc
    if not rows:
        raise ValueError("eval_dataset: no rows")
    return rows


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


def evaluate_loss(model: Any, rows: list[dict[str, Any]], tokenizer: Any, max_length: int = 96,
                  batch_size: int = 16, retention: float | None = None) -> float:
    """Token-averaged LM loss (response tokens) of a DATALORA model on instruction rows.

    Args:
        model: a :class:`~datalora.model.DATALORAModel` (eval mode is set and restored).
        rows: rows with OpenOrca columns. retention: temporarily set this retention (1.0 =
            dense); default: the model's current setting (calibrated threshold if set).
    """
    if not rows:
        raise ValueError("rows: expected at least one row to evaluate on")
    batch_size = check_int("batch_size", batch_size, low=1)  # -2 evaluated nothing: 0.0
    items = _tokenized_rows(rows, tokenizer, max_length, "eval rows")
    return _evaluate_items(model, items, tokenizer, batch_size, retention)


@torch.no_grad()
def _evaluate_items(model: Any, items: list[dict[str, Any]], tokenizer: Any, batch_size: int,
                    retention: float | None, progress: bool = False,
                    desc: str = "eval") -> float:
    """:func:`evaluate_loss` on rows tokenized already (``progress``: a bar named
    ``desc``)."""
    from tqdm.auto import tqdm

    from datalora.data import CausalLMCollator

    collator = CausalLMCollator(tokenizer=tokenizer)
    previous = model.curriculum_state().get("retention")
    total, count = 0.0, 0
    device = next(model.parameters()).device
    with eval_mode(model):  # every module's own mode comes back after
        if retention is not None:
            model.set_curriculum_state(retention=retention)
        try:
            for i in tqdm(range(0, len(items), batch_size), desc=desc, disable=not progress,
                          dynamic_ncols=True):
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
    return total / max(count, 1)


def train_datalora(config: DATALORAConfig | dict[str, Any] | None = None,
                   model_name_or_path: str | os.PathLike[str] | None = None,
                   dataset: str | os.PathLike[str] | list[dict[str, Any]] | None = None,
                   output_dir: str | Path = "datalora-output", epochs: float = 3,
                   max_steps: int | None = None, batch_size: int = 8,
                   learning_rate: float | None = None, max_length: int | None = None,
                   limit: int | None = None, seed: int = 0, logging_steps: int | None = None,
                   save_steps: int | None = None,
                   resume_from_checkpoint: str | os.PathLike[str] | bool | None = None,
                   curriculum_mode: str = "epochs", bf16: bool = False,
                   gradient_accumulation_steps: int = 1, progress: bool = True,
                   model: Any = None, tokenizer: Any = None,
                   report_to: list[str] | None = None,
                   eval_dataset: str | os.PathLike[str] | list[dict[str, Any]] | None = None,
                   eval_limit: int | None = None,
                   trainer_args: dict[str, Any] | None = None,
                   overwrite_output_dir: bool = False) -> TrainResult:
    """Trains DATALORA and returns the logs (for printing / plotting per phase).

    Args:
        config: a :class:`DATALORAConfig` or its fields (default: the tiny-model settings
            :data:`DEFAULT_TINY_CONFIG` for the embedded model, DATALORAConfig's defaults
            for another; ``routing="shared"`` is required). Its ``base_model`` is loaded
            when ``model_name_or_path`` is None; the saved adapter records the model
            actually trained.
        model_name_or_path: None / ``"embedded"``: the tiny random Mistral; else a local
            path or Hub name (``datalora.testing.load_model_and_tokenizer``).
        dataset: None / ``"embedded"``: the multi-task data; a ``.jsonl/.json/.parquet``
            file, a folder, a Hub name, or a list of rows (OpenOrca, Alpaca or chat columns,
            mapped and checked as :func:`~datalora.data.load_instruction_dataset` does with
            a file's rows), read before the model loads.
        output_dir: checkpoints and the final adapter.
        epochs / max_steps: run length (``max_steps`` wins when set).
        learning_rate / max_length: default :data:`TINY_MODEL_DEFAULTS` on the embedded
            model, :data:`REAL_MODEL_DEFAULTS` on another. Longer rows are truncated (a
            warning counts them). On a model with learned position embeddings (GPT-2,
            OPT) the default max length is capped at its ``max_position_embeddings`` and a
            larger value is an error (checked before a local folder's weights load).
        curriculum_mode: ``"epochs"`` (one phase per third of the epochs, the card) or
            ``"steps"`` (by fraction of optimizer steps).
        limit: use only the first ``limit`` rows.
        logging_steps: log every n steps (default 5, at most ``max_steps``).
        save_steps: checkpoint every n steps (None: no intermediate checkpoints).
        resume_from_checkpoint: a ``checkpoint-N`` folder to resume from (exact; checked
            before the model loads), or ``"last"`` / True: the latest complete one in
            ``output_dir``. One at or past ``max_steps`` is an error (nothing is left to
            train; the Trainer would train a step more).
        overwrite_output_dir: delete the ``checkpoint-N`` folders an earlier run left in
            ``output_dir``. Without it a run that does not resume from one of them is
            refused (``"last"`` would later pick the highest N, maybe the earlier run's).
            The final adapter files of an earlier run are replaced in every case.
        bf16: bf16 frozen base weights (where the device supports bf16). Adapter and
            saliency weights are fp32 in every case (also on a bf16 / fp16 checkpoint
            trained without ``bf16``); the MoLoRA layers compute in the activations' dtype.
        model: an already loaded base model (skips loading; pass its loaded
            ``tokenizer`` with it). Without ``model_name_or_path`` the name it was loaded
            from (``model.config._name_or_path``) stands for it: its defaults and the
            ``base_model`` recorded.
        tokenizer: a loaded tokenizer, or a local folder or Hub name to load it from
            instead of the model's (a model folder saved without its tokenizer: a local
            folder without tokenizer files is an error before the model loads).
        eval_dataset: rows or a source (``"embedded"``: the embedded eval split; a folder or
            split-keyed file: its ``eval`` / ``validation`` / ``test`` split, see
            :func:`~datalora.data.load_eval_rows`; rows are checked like ``dataset``'s),
            read before the model loads, on which
            the final eval loss is measured with pruning (``metrics["eval_loss_pruned"]``,
            calibrated threshold) and dense (``metrics["eval_loss_dense"]``), on
            ``metrics["eval_rows"]`` rows. Also the Trainer's ``eval_dataset``, so
            ``trainer_args={"eval_strategy": "steps", ...}`` evaluates during training.
        eval_limit: evaluate on the first ``eval_limit`` eval rows only (default: all).
        trainer_args: more ``transformers.TrainingArguments`` fields (e.g. ``fsdp``,
            ``fsdp_config``, ``deepspeed``, ``weight_decay``, ``warmup_steps``,
            ``optim``); they override the values derived from the arguments above.

    Returns:
        :class:`TrainResult`.
    """
    from transformers import TrainingArguments

    from datalora.data import TASKS, CausalLMCollator, load_instruction_dataset, normalize_rows
    from datalora.model import get_datalora_model
    from datalora.trainer import DATALORATrainer

    if model is not None and model_name_or_path is None:
        # a loaded model is the one it was loaded from (a Mistral-7B given as model= must not
        # get the embedded tiny model's settings, lr 3e-2, nor be recorded as it); one built
        # in code (no name) keeps the config's base_model
        name = getattr(getattr(model, "config", None), "_name_or_path", None)
        model_name_or_path = name if isinstance(name, str) and name else None
    config = _train_config(config, model_name_or_path)
    defaults = TINY_MODEL_DEFAULTS if _is_embedded(config.base_model) else REAL_MODEL_DEFAULTS
    if max_steps is not None:
        max_steps = check_int("max_steps", max_steps, low=1)
    epochs = check_number("epochs", epochs, low=0, low_inclusive=False)
    if save_steps is not None:  # 0 would silently save nothing, -1 at the end only
        save_steps = check_int("save_steps", save_steps, low=1)
    learning_rate = check_number(
        "learning_rate", defaults["learning_rate"] if learning_rate is None else learning_rate,
        low=0, low_inclusive=False)
    max_length_given = max_length is not None
    max_length = check_int("max_length", defaults["max_length"] if max_length is None
                           else max_length, low=2)
    batch_size = check_int("batch_size", batch_size, low=1)
    gradient_accumulation_steps = check_int("gradient_accumulation_steps",
                                            gradient_accumulation_steps, low=1)
    if logging_steps is None:
        logging_steps = min(5, max_steps or 5)
    logging_steps = check_int("logging_steps", logging_steps, low=1)
    seed = check_int("seed", seed, low=0, high=2**32 - 1)  # numpy.random.seed's range
    for name, flag in (("bf16", bf16), ("overwrite_output_dir", overwrite_output_dir)):
        if flag is not None and not isinstance(flag, bool):  # bool("false") is True
            raise ValueError(f"{name}: expected true or false, got {flag!r}")
    check_mode("curriculum_mode", curriculum_mode)
    _check_backend(config.backend)
    trainer_args = _check_trainer_args(TrainingArguments, trainer_args, eval_dataset)
    # read the data before the model: a bad path or row fails now, not after minutes of loading
    eval_rows = _eval_rows(eval_dataset, eval_limit)
    if isinstance(dataset, list):
        rows = normalize_rows(dataset, "dataset", limit)
    else:
        rows = load_instruction_dataset(dataset, "train", limit=limit)
    if not rows:
        where = f" in {dataset}" if isinstance(dataset, (str, os.PathLike)) else ""
        raise ValueError(f"dataset: no training rows (limit={limit!r}){where}")
    resume_from_checkpoint = _check_checkpoint(resume_from_checkpoint, output_dir)
    if resume_from_checkpoint is not None and max_steps is not None:
        done = saved_trainer_state(resume_from_checkpoint).get("global_step", 0)  # checked above
        if done >= max_steps:  # the Trainer would train one step past max_steps
            raise ValueError(f"resume_from_checkpoint: {resume_from_checkpoint} is at step "
                             f"{done} and this run stops at max_steps={max_steps}: nothing "
                             f"is left to train (the finished run's adapter is in its output "
                             f"folder; raise max_steps to train on)")
    _check_tokenizer(config.base_model, model, tokenizer)
    output_folder = _writable_output_dir(output_dir)
    _check_earlier_checkpoints(output_folder, resume_from_checkpoint,
                               bool(overwrite_output_dir))
    if model is None:  # a local folder's config tells; a Hub model is checked once loaded
        max_length = _fit_max_length(max_length, max_length_given,
                                     _folder_position_limit(config.base_model))
    use_bf16 = bool(bf16) and (not torch.cuda.is_available() or torch.cuda.is_bf16_supported())
    if model is None:
        from datalora.testing import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(config.base_model, tokenizer=tokenizer,
                                                    dtype=torch.bfloat16 if use_bf16 else None)
    position_limit = _position_limit(model)
    max_length = _fit_max_length(max_length, max_length_given, position_limit)
    if use_bf16:  # a model given in another dtype (one loaded here already is bf16)
        from datalora.testing import cast_model

        cast_model(model, torch.bfloat16)
    if config.quantize and not (trainer_args or {}).get("use_cpu"):
        from datalora.testing import QUANTIZE_GPU_HEADROOM, to_gpu_if_it_fits

        to_gpu_if_it_fits(model, QUANTIZE_GPU_HEADROOM, "to be quantized there",
                          "its layers are quantized on the CPU (about a minute per billion "
                          "weights)")
    torch.manual_seed(seed)
    dl_model = get_datalora_model(model, config, verbose=progress)
    # fp32 master weights for the adapters whatever the frozen base's dtype (--bf16, or a
    # checkpoint stored in bf16 / fp16 as most are): AdamW steps on 16-bit weights round
    # most small updates away. The layers compute in the activations' dtype.
    for _, layer in dl_model.molora_layers():
        for param in layer.parameters():
            if param.requires_grad and param.dtype in (torch.float16, torch.bfloat16):
                param.data = param.data.float()
    dl_model.train()
    train_rows = _Rows(_tokenized_rows(rows, tokenizer, max_length, "training rows", progress,
                                       position_limit))
    eval_items = (_tokenized_rows(eval_rows, tokenizer, max_length, "eval rows", progress,
                                  position_limit)
                  if eval_rows is not None else None)
    _check_vocabulary(model, tokenizer, train_rows.rows, eval_items)
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
                              eval_dataset=_Rows(eval_items) if eval_items else None,
                              data_collator=collator, processing_class=tokenizer,
                              curriculum_mode=curriculum_mode, task_names=list(tasks))
    output = trainer.train(resume_from_checkpoint=None if resume_from_checkpoint is None
                           else str(resume_from_checkpoint))
    trainer.save_model(str(output_dir))
    history = trainer.datalora_history
    metrics = dict(output.metrics)
    if eval_items is not None:
        metrics["eval_rows"] = len(eval_items)
        metrics["eval_loss_pruned"] = _evaluate_items(dl_model, eval_items, tokenizer, 16, None,
                                                      progress, "eval loss (pruned)")
        metrics["eval_loss_dense"] = _evaluate_items(dl_model, eval_items, tokenizer, 16, 1.0,
                                                     progress, "eval loss (dense)")
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
    tiny, real = TINY_MODEL_DEFAULTS, REAL_MODEL_DEFAULTS
    p.add_argument("--model", dest="model_name_or_path",
                   help="base model: a local folder or a Hub name (default: embedded tiny)")
    p.add_argument("--tokenizer", default=None,
                   help="a local folder or Hub name to load the tokenizer from (default: "
                        "the --model folder's; for a model saved without its tokenizer)")
    p.add_argument("--dataset", help="a .jsonl / .json / .parquet file, a datasets folder or "
                                     "a Hub name with OpenOrca columns (system_prompt, "
                                     "question, response), Alpaca columns (instruction, "
                                     "input, output) or single-turn chat 'messages' "
                                     "(default: embedded)")
    p.add_argument("--output-dir", default=None, help="default: datalora-output")
    p.add_argument("--epochs", type=float, default=None,
                   help="training epochs (the curriculum's 3 phases span them; default: 3)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after N optimizer steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="rows per device and step (default: 8)")
    p.add_argument("--learning-rate", type=float, default=None,
                   help=f"AdamW peak rate (default: {tiny['learning_rate']:g} on the "
                        f"embedded tiny model, {real['learning_rate']:g} on a named one)")
    p.add_argument("--max-length", type=int, default=None,
                   help=f"tokens per row at most; longer rows are truncated, with a warning "
                        f"(default: {tiny['max_length']} on the embedded tiny model, "
                        f"{real['max_length']} on a named one, at most its positions when "
                        f"they are learned, as in GPT-2 and OPT)")
    p.add_argument("--limit", type=int_at_least(1), default=None,
                   help="use the first N training rows")
    p.add_argument("--save-steps", type=int_at_least(1), default=None,
                   help="also checkpoint every N steps (default: only the final adapter)")
    p.add_argument("--resume-from-checkpoint", default=None,
                   help="a checkpoint-N folder of an earlier run (weights + curriculum), "
                        "or 'last': the latest checkpoint-N in --output-dir")
    p.add_argument("--overwrite-output-dir", action="store_true", default=None,
                   help="delete the checkpoint-N folders an earlier run left in --output-dir "
                        "(without it, a run that does not resume from one of them is "
                        "refused)")
    p.add_argument("--curriculum-mode", choices=MODES, default=None,
                   help="phase boundaries by epoch (the card) or by step fraction")
    p.add_argument("--bf16", action="store_true", default=None,
                   help="frozen base in bf16 (adapters are fp32 with or without it; without "
                        "it the base keeps the checkpoint's dtype)")
    p.add_argument("--quantize", choices=["nf4"], default=None,
                   help="frozen base in 4-bit NF4 (the config's quantize field; default: "
                        "the --config file's, else 16-bit)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--eval-dataset", default=None,
                   help="'embedded' or a file / folder (its eval, validation or test split): "
                        "report eval loss pruned vs dense at the end (and at each "
                        "evaluation of trainer_args' eval_strategy)")
    p.add_argument("--eval-limit", type=int_at_least(1), default=None,
                   help="evaluate on the first N eval rows only (default: all)")
    p.add_argument("--json", action="store_true",
                   help="print the summary (phases, metrics, keep threshold, output dir) as "
                        "JSON on stdout; other output goes to stderr")
    p.set_defaults(func=run_train, flag_names={
        "name_or_path": "--model", "source": "--dataset", "path": "--resume-from-checkpoint",
        "resume_from_checkpoint": "--resume-from-checkpoint", "dataset": "--dataset",
        "output_dir": "--output-dir", "overwrite_output_dir": "--overwrite-output-dir",
        "tokenizer": "--tokenizer",
        "eval_dataset": "--eval-dataset", "eval_limit": "--eval-limit",
        "max_steps": "--max-steps", "batch_size": "--batch-size", "epochs": "--epochs",
        "learning_rate": "--learning-rate", "max_length": "--max-length", "limit": "--limit"})
    return p


# TrainingArguments fields whose bad values failed deep in torch or the optimizer
# ("batch_size should be a positive integer value", "Invalid learning rate: -1")
_TRAINER_COUNTS = {"per_device_train_batch_size": 1, "per_device_eval_batch_size": 1,
                   "gradient_accumulation_steps": 1}
_TRAINER_NUMBERS = {"learning_rate": (0, True), "weight_decay": (0, True),
                    "warmup_steps": (0, True), "num_train_epochs": (0, False)}


def _check_trainer_args(cls: type, extra: dict[str, Any] | None,
                        eval_dataset: Any = None) -> dict[str, Any]:
    """``extra`` validated (a mapping of real ``TrainingArguments`` fields, and an
    ``eval_strategy`` only with an ``eval_dataset``), before any model is loaded.
    ``remove_unused_columns=True`` is fine: DATALORATrainer keeps the task columns."""
    if extra is None:
        return {}
    if not isinstance(extra, dict):
        raise TypeError(f"trainer_args: expected a mapping of TrainingArguments fields, got "
                        f"{type(extra).__name__}")
    unknown = sorted(set(extra) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ValueError(f"trainer_args: {unknown} are not TrainingArguments fields")
    for name, low in _TRAINER_COUNTS.items():  # torch / the optimizer named no field
        if name in extra:
            check_int(f"trainer_args.{name}", extra[name], low=low)
    steps = extra.get("max_steps")
    for name, (low, inclusive) in _TRAINER_NUMBERS.items():
        if name == "num_train_epochs" and isinstance(steps, int) and steps > 0:
            continue  # transformers ignores the epochs when max_steps is set
        if name in extra:
            check_number(f"trainer_args.{name}", extra[name], low=low, low_inclusive=inclusive)
    strategy = extra.get("eval_strategy", "no")
    if str(getattr(strategy, "value", strategy)) != "no" and eval_dataset is None:
        raise ValueError(f"trainer_args: eval_strategy={strategy!r} needs eval rows: set "
                         f"eval_dataset (--eval-dataset)")
    return dict(extra)


_CLI_KEYS = ("model_name_or_path", "tokenizer", "dataset", "output_dir", "epochs",
             "max_steps", "batch_size", "learning_rate", "max_length", "limit", "save_steps",
             "resume_from_checkpoint", "overwrite_output_dir", "curriculum_mode", "bf16",
             "seed", "eval_dataset", "eval_limit")
_TRAINING_KEYS = (*_CLI_KEYS, "logging_steps", "gradient_accumulation_steps", "trainer_args")
"""Keys of a config file's ``training:`` section (``model`` and dashes are accepted too)."""
_KEY_ALIASES = {"model": "model_name_or_path"}


def _training_keys(training: dict[str, Any]) -> dict[str, Any]:
    """``training`` with the flag spellings (``model``, ``output-dir``) mapped to the
    argument names; unknown keys are an error listing the valid ones."""
    out = {}
    for key, value in training.items():
        name = str(key).replace("-", "_")
        out[_KEY_ALIASES.get(name, name)] = value
    unknown = sorted(set(out) - set(_TRAINING_KEYS))
    if unknown:
        raise ValueError(f"config: unknown training keys {unknown}; valid keys: "
                         f"{sorted(_TRAINING_KEYS)} (and 'model' for model_name_or_path)")
    return out


def train_settings(data: dict[str, Any], training: dict[str, Any]
                   ) -> tuple[DATALORAConfig, dict[str, Any]]:
    """The :class:`DATALORAConfig` and :func:`train_datalora` arguments for config fields
    ``data`` and run settings ``training``: the defaults follow the model that will be
    trained (``training["model_name_or_path"]``, else ``data["base_model"]``), which the
    config records as ``base_model``."""
    model = training.get("model_name_or_path") or data.get("base_model")
    if _is_embedded(model):
        merged = {**DEFAULT_TINY_CONFIG, **data}  # tuned for the embedded tiny model
    else:  # a real model: DATALORAConfig's defaults (prune_layers None = second half)
        merged = {**data, "base_model": str(model)}
        # max_length is left to train_datalora, which caps its default at the model's
        # positions
        training = {"learning_rate": REAL_MODEL_DEFAULTS["learning_rate"], **training}
    return DATALORAConfig.from_dict(merged), training


def load_train_config(path: str | Path, overrides: dict[str, Any] | None = None
                      ) -> tuple[DATALORAConfig, dict[str, Any]]:
    """Reads ``--config``: DATALORAConfig fields + an optional ``training`` section, which
    ``overrides`` (the command line's settings) update; see :func:`train_settings`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config: no such file {path}")
    data = read_config_file(path, json_only_by_suffix=True)
    training = data.pop("training", {}) or {}
    if not isinstance(training, dict):
        raise ValueError(f"config: expected 'training' to be a mapping of training settings, "
                         f"got {type(training).__name__}")
    return train_settings(data, {**_training_keys(training), **(overrides or {})})


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
    if not result.phase_summary:
        lines.insert(1, "(no log entries: the run had fewer optimizer steps than "
                        "logging_steps)")
    for key in ("eval_loss_pruned", "eval_loss_dense"):
        if key in result.metrics:
            rows = result.metrics.get("eval_rows")
            lines.append(f"{key}: {result.metrics[key]:.4f}"
                         + (f" ({rows} eval rows)" if rows else ""))
    lines.append(f"adapter saved to {result.output_dir}")
    return "\n".join(lines)


def summary_dict(result: TrainResult) -> dict[str, Any]:
    """What ``train --json`` prints: ``phases``, ``metrics`` (train metrics, ``eval_rows``,
    ``eval_loss_pruned`` / ``eval_loss_dense``), ``keep_threshold``, ``output_dir``; a
    non-finite number (an uncalibrated threshold) is null, so the output is strict JSON."""
    def finite(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        return None if isinstance(value, float) and not math.isfinite(value) else value

    return finite({"phases": result.phase_summary, "metrics": result.metrics,
                   "keep_threshold": result.keep_threshold, "output_dir": result.output_dir})


def run_train(args: argparse.Namespace) -> TrainResult:
    """Runs the ``train`` subcommand: CLI flags override the config file's ``training``.
    With ``--json`` only the JSON summary goes to stdout (logs and bars to stderr)."""
    overrides = {key: getattr(args, key) for key in _CLI_KEYS
                 if getattr(args, key, None) is not None}
    if args.config:
        config, training = load_train_config(args.config, overrides)
    else:
        config, training = train_settings({}, overrides)
    if getattr(args, "quantize", None) is not None:
        config = dataclasses.replace(config, quantize=args.quantize)
    as_json = getattr(args, "json", False)
    with contextlib.redirect_stdout(sys.stderr) if as_json else contextlib.nullcontext():
        result = train_datalora(config, **training)
    # under torchrun every rank runs this: one summary (one JSON document), the main one's
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary_dict(result), indent=2) if as_json else format_summary(result))
    return result


add_parser = add_train_parser

__all__ = ["DEFAULT_TINY_CONFIG", "REAL_MODEL_DEFAULTS", "TINY_MODEL_DEFAULTS", "TrainResult",
           "add_train_parser", "evaluate_loss", "format_summary", "load_train_config",
           "run_train", "summarize_phases", "summary_dict", "train_datalora",
           "train_settings"]
