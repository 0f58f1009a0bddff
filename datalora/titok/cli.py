"""``python -m datalora titok``: transfer an adapter, or run the embedded experiment."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch.nn as nn

from datalora.cli import (
    check_output_file,
    check_output_folder,
    fraction,
    int_at_least,
    positive_float,
)
from datalora.io import load_header
from datalora.titok.excess import disabled_is_not_base
from datalora.titok.transfer import (
    ADAPTERS,
    DEFAULT_TARGET_MODULES,
    check_target_modules,
    titok_transfer,
)


def check_adapter_folder(folder: str | os.PathLike[str]) -> Path:
    """``folder`` as a path, if it holds a saved adapter (``adapter_config.json``, and a
    readable ``adapter_model.safetensors`` where it has one: a truncated file failed
    inside PEFT with a traceback naming no file)."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"source_adapter: no such folder: {folder}")
    if not (path / "adapter_config.json").is_file():
        raise ValueError(f"source_adapter: {folder} has no adapter_config.json (expected a "
                         f"folder written by save_pretrained: a PEFT or datalora adapter)")
    weights = path / "adapter_model.safetensors"
    if weights.is_file():
        load_header(weights, argument="source_adapter")
    return path


def load_peft_source(model: nn.Module, folder: str | os.PathLike[str]) -> nn.Module:
    """``model`` with the PEFT adapter in ``folder``, in eval mode; an adapter trained on a
    model of another size (PEFT's "size mismatch" RuntimeError, a traceback) is a
    ValueError naming ``source_adapter``, the folder and the first mismatch."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(folder)).eval()
    except RuntimeError as exc:
        mismatch = next((line.strip().rstrip(".") for line in str(exc).splitlines()
                         if line.strip().startswith("size mismatch for ")), None)
        if mismatch is None:
            raise
        raise ValueError(f"source_adapter: {folder} was trained on another model "
                         f"({mismatch})") from exc


def load_seed_prompts(path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """Seed prompts from a ``.txt`` file (one prompt per non-empty line) or a ``.jsonl``
    file (rows with a string ``question``, optional ``system_prompt``)."""
    from datalora.data.loading import _read_jsonl

    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"seed_file: no such file: {path}")
    if file.suffix.lower() == ".txt":
        rows = [{"question": line.strip()}
                for line in file.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    elif file.suffix.lower() == ".jsonl":
        found, lines = _read_jsonl(file)
        rows = []
        for row, line in zip(found, lines, strict=True):
            if not isinstance(row, dict) or not isinstance(row.get("question"), str):
                raise ValueError(f"seed_file: {path} line {line} has no string 'question'")
            if not isinstance(row.get("system_prompt", ""), (str, type(None))):
                raise ValueError(f"seed_file: {path} line {line}: 'system_prompt' must be a "
                                 f"string, got {type(row['system_prompt']).__name__}")
            rows.append({"question": row["question"],
                         "system_prompt": row.get("system_prompt") or ""})
    else:
        raise ValueError(f"seed_file: expected a .jsonl or .txt file, got {path}")
    if not rows:
        raise ValueError(f"seed_file: {path} holds no prompt")
    return rows


@contextmanager
def _model_argument(param: str) -> Iterator[None]:
    """Errors about a model name (``name_or_path: ...``) renamed to ``param``
    (``source_model`` / ``target_model``), so the CLI names the flag that gave it."""
    try:
        yield
    except (OSError, ValueError) as exc:
        name, sep, rest = str(exc).partition(":")
        if not sep or name.strip() != "name_or_path":
            raise
        kind = type(exc) if type(exc) in (OSError, FileNotFoundError, ValueError) else OSError
        raise kind(f"{param}:{rest}") from exc


def _check_model_names(args: argparse.Namespace) -> None:
    """Both model names checked (a local path that does not exist, a folder without
    config.json or tokenizer files) before either model loads."""
    from datalora.testing import EMBEDDED_NAMES, _model_source, check_tokenizer_source

    for param in ("source_model", "target_model"):
        name = getattr(args, param)
        if name in EMBEDDED_NAMES:
            continue
        with _model_argument(param):
            _model_source(name)
            check_tokenizer_source(name)


def _load_model(param: str, name: str) -> tuple[nn.Module, Any]:
    from datalora.testing import load_model_and_tokenizer

    with _model_argument(param):
        return load_model_and_tokenizer(name)


def _load_source(name: str, folder: Path) -> tuple[nn.Module, Any]:
    """The source model with its saved adapter (PEFT or datalora format) and tokenizer."""
    model, tokenizer = _load_model("source_model", name)
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    if "peft_type" in config:
        return load_peft_source(model, folder), tokenizer
    from datalora.model import DATALORAModel

    return DATALORAModel.from_pretrained(model, folder), tokenizer


def transfer_cli(args: argparse.Namespace) -> dict[str, Any]:
    """``titok --source-model ...``: transfers the adapter at ``--source-adapter`` to
    ``--target-model`` and saves it (``save_pretrained``) and the JSON report in
    ``--output-dir``. Every argument is checked before a model loads."""
    from datalora.io import atomic_write_text
    from datalora.train import REAL_MODEL_DEFAULTS

    for flag in ("source_model", "target_model", "source_adapter", "seed_file"):
        if getattr(args, flag) is None:
            raise ValueError(f"{flag}: required with --source-model / --target-model")
    if len(args.seeds) != 1:
        raise ValueError(f"seeds: one seed with --source-model, got {args.seeds}")
    folder = check_adapter_folder(args.source_adapter)
    prompts = load_seed_prompts(args.seed_file)
    check_output_folder("output_dir", args.output_dir)
    if Path(args.output_dir).resolve() == Path(folder).resolve():
        raise ValueError(f"output_dir: {args.output_dir} is the --source-adapter folder; the "
                         f"transferred adapter would overwrite the source one")
    check_output_file("out", args.out)
    _check_model_names(args)
    target, target_tok = _load_model("target_model", args.target_model)
    check_target_modules(target, args.adapter, args.target_modules)
    source, source_tok = _load_source(args.source_model, folder)
    source_base = None
    if disabled_is_not_base(source) is not None:  # score against a clean copy of the base
        source_base, _ = _load_model("source_model", args.source_model)
    lr = REAL_MODEL_DEFAULTS["learning_rate"] if args.lr is None else args.lr
    adapted, report = titok_transfer(
        source, source_tok, target, target_tok, prompts, sample_keep=args.sample_keep,
        token_keep=args.token_keep, max_new_tokens=args.max_new_tokens,
        adapter=args.adapter, target_modules=args.target_modules, steps=args.steps, lr=lr,
        seed=args.seeds[0], source_base_model=source_base, progress=not args.no_progress)
    out = Path(args.output_dir)
    adapted.save_pretrained(str(out))
    result = {"source_model": args.source_model, "source_adapter": str(folder),
              "target_model": args.target_model, "seed_file": args.seed_file,
              "seed_prompts": len(prompts), "adapter": args.adapter,
              "target_modules": list(args.target_modules), "sample_keep": args.sample_keep,
              "token_keep": args.token_keep, "steps": args.steps, "lr": lr,
              "seed": args.seeds[0], "selection": report["selection"],
              "losses": report["losses"], "synthetic": report["synthetic"],
              "output_dir": str(out)}
    atomic_write_text(args.out or out / "titok_report.json", json.dumps(result, indent=1))
    return result


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from datalora.data import TASKS
    from datalora.train import REAL_MODEL_DEFAULTS

    p = subparsers.add_parser(
        "titok", help="TITOK: transfer a LoRA / DATALORA adapter to another base model "
                      "(--source-model ...), or the embedded tiny-model experiment",
        description="Transfer an adapter with TITOK: the source model + its adapter answers "
                    "seed prompts, tokens are scored by the adapter's contrastive excess, the "
                    "best samples and tokens train a fresh adapter on the target model "
                    "(another size and tokenizer).\n\n"
                    "Your models: --source-model, --source-adapter (a PEFT or datalora "
                    "save_pretrained folder), --target-model, --seed-file (.jsonl with a "
                    "'question' column, or .txt with one prompt per line); the target "
                    "adapter (PEFT format for --adapter lora, datalora's for molora) and "
                    "titok_report.json are saved in --output-dir.\n\n"
                    "Without --source-model / --target-model: the experiment on the embedded "
                    "tiny models (--task, --base, --seed-prompts, --eval-rows); it prints the "
                    "eval loss of every variant and writes the report to --out only.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source-model", default=None,
                   help="source model name or path (with --source-adapter, --target-model, "
                        "--seed-file)")
    p.add_argument("--target-model", default=None, help="target model name or path")
    p.add_argument("--seed-file", default=None,
                   help="seed prompts: .jsonl with a 'question' column (optional "
                        "'system_prompt') or .txt, one prompt per line")
    p.add_argument("--output-dir", default=None,
                   help="with --source-model: where the target adapter and "
                        f"titok_report.json are saved (default: "
                        f"{TRANSFER_DEFAULTS['output_dir']})")
    p.add_argument("--target-modules", nargs="+", default=None,
                   help="with --source-model: target model modules the new adapter wraps "
                        "(MoLoRA: nn.Linear only; GPT-2's Conv1D c_attn is not supported; "
                        f"default: {' '.join(TRANSFER_DEFAULTS['target_modules'])})")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=None,
                   help=f"with --source-model: tokens generated per synthetic response "
                        f"(default: {TRANSFER_DEFAULTS['max_new_tokens']})")
    p.add_argument("--task", choices=TASKS, default=None,
                   help=f"embedded experiment: the task transferred (default: "
                        f"{EXPERIMENT_DEFAULTS['task']})")
    p.add_argument("--base", choices=("pretrained", "random"), default=None,
                   help=f"embedded experiment: tiny base models pretrained on the embedded "
                        f"corpus or random (default: {EXPERIMENT_DEFAULTS['base']})")
    p.add_argument("--source-adapter", default=None,
                   help="adapter folder of the source (PEFT, or datalora with "
                        "--source-model; embedded experiment default: train one)")
    p.add_argument("--adapter-dir", default=None,
                   help="embedded experiment: where source adapters are trained / reused "
                        f"(default: {EXPERIMENT_DEFAULTS['adapter_dir']})")
    p.add_argument("--seed-prompts", type=int_at_least(1), default=None,
                   help=f"embedded experiment: task prompts the source answers (default: "
                        f"{EXPERIMENT_DEFAULTS['seed_prompts']})")
    p.add_argument("--sample-keep", type=fraction, default=0.5,
                   help="fraction of synthetic samples kept, by mean contrastive excess")
    p.add_argument("--token-keep", type=fraction, default=0.5,
                   help="fraction of tokens of a kept sample in the loss, by excess")
    p.add_argument("--steps", type=int_at_least(1), default=60,
                   help="training steps of the target adapter")
    p.add_argument("--lr", type=positive_float, default=None,
                   help=f"target adapter learning rate (default: "
                        f"{REAL_MODEL_DEFAULTS['learning_rate']:g} with --source-model; "
                        f"embedded: 3e-3 pretrained, 2e-2 random)")
    p.add_argument("--adapter", choices=ADAPTERS, default="lora")
    p.add_argument("--eval-rows", type=int_at_least(1), default=None,
                   help=f"embedded experiment: rows of the task's eval (and validation) split "
                        f"(default: {EXPERIMENT_DEFAULTS['eval_rows']})")
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="one transfer per seed; losses averaged over the seeds (one seed "
                        "with --source-model)")
    p.add_argument("--out", default=None, help="write the JSON report here (default with "
                                               "--source-model: OUTPUT_DIR/titok_report.json)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_cli, flag_names={
        "sample_keep": "--sample-keep", "token_keep": "--token-keep", "seeds": "--seeds",
        "source_adapter": "--source-adapter", "source_model": "--source-model",
        "target_model": "--target-model", "seed_file": "--seed-file",
        "target_modules": "--target-modules", "adapter": "--adapter", "steps": "--steps",
        "output_dir": "--output-dir", "out": "--out",
        "seed_prompts": "--seed-prompts", "eval_rows": "--eval-rows"})


TRANSFER_DEFAULTS = {"output_dir": "titok_output", "max_new_tokens": 24,
                     "target_modules": list(DEFAULT_TARGET_MODULES), "seed_file": None}
"""Flags of ``titok --source-model ...`` only, with their defaults."""
EXPERIMENT_DEFAULTS = {"task": "reverse", "base": "pretrained", "seed_prompts": 96,
                       "eval_rows": 50, "adapter_dir": "outputs/titok/source_adapters"}
"""Flags of the embedded experiment only, with their defaults."""


def _mode_flags(args: argparse.Namespace, transfer: bool) -> None:
    """Refuses a flag the chosen mode would ignore and fills in the mode's defaults."""
    own, other = ((TRANSFER_DEFAULTS, EXPERIMENT_DEFAULTS) if transfer
                  else (EXPERIMENT_DEFAULTS, TRANSFER_DEFAULTS))
    given = [name for name in other if getattr(args, name) is not None]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        mode = ("a transfer of your models (--source-model / --target-model)" if transfer
                else "the embedded experiment (no --source-model / --target-model)")
        raise ValueError(f"{flags}: not used by {mode}")
    for name, default in own.items():
        if getattr(args, name) is None:
            setattr(args, name, default)


def run_cli(args: argparse.Namespace) -> dict[str, Any]:
    transfer = args.source_model is not None or args.target_model is not None
    _mode_flags(args, transfer)
    if transfer:
        report = transfer_cli(args)
        print(f"target adapter saved in {report['output_dir']}; final training loss "
              f"{report['losses'][-1]:.3f}")
        return report
    from datalora.experiments.titok_evidence import run

    if args.source_adapter is not None:
        check_adapter_folder(args.source_adapter)
    report = run(task=args.task, base=args.base, source_adapter=args.source_adapter,
                 adapter_dir=args.adapter_dir, seed_prompts=args.seed_prompts,
                 sample_keep=args.sample_keep, token_keep=args.token_keep, steps=args.steps,
                 lr=args.lr, adapter=args.adapter, eval_rows=args.eval_rows, seeds=args.seeds,
                 out=args.out,
                 progress=not args.no_progress)
    width = max(map(len, report["eval_loss"]), default=0)
    for name, value in report["eval_loss"].items():
        print(f"{name:>{width}}: eval loss {value:.3f}")
    return report
