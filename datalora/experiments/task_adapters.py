"""Train one PEFT LoRA per task of the embedded dataset on the embedded tiny model (cached).

The base is the pretrained tiny model (:func:`~datalora.testing.build_pretrained_tiny_model`,
default) or the random one (``--base random``). Adapters train on the task's train rows
minus the validation rows (:func:`~datalora.testing.train_validation_split`). They
deliberately differ in rank, alpha and target modules, so mixing them exercises rank
padding and missing-module experts::

    python -m datalora.experiments.task_adapters --out tmp/task_adapters --steps 80
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from datalora.data import TASKS
from datalora.finetune import finetune
from datalora.io import atomic_write_text
from datalora.testing import (
    build_pretrained_tiny_model,
    build_tiny_model,
    build_tokenizer,
    train_validation_split,
)

BASES: tuple[str, ...] = ("pretrained", "random")
"""Base model kinds: pretrained (:func:`build_pretrained_tiny_model`) or random init."""
ADAPTER_STEPS = 80
"""Default training steps of a task adapter (batch 8)."""
WORK_DIR = "/tmp/datalora_work/task_adapters"
"""Where the evidence scripts (LoRA-TLE, TITOK) train or reuse the task adapters by
default."""
ADAPTER_LR: dict[str, float] = {"pretrained": 3e-3, "random": 2e-2}
"""Default adapter learning rate per base kind. 2e-2 suits the random base; on the
pretrained base it undoes the pretraining (validation loss above the base's), 3e-3 was the
best of {1e-3, 3e-3, 1e-2} x 80 steps on the validation rows."""

# task -> (rank, alpha, target modules): different on purpose (padding, missing modules).
# lm_head is adapted too: the random tiny model's lm_head (std 0.02) caps the logit range
# a LoRA on the decoder layers alone can reach (eval loss stays near 5.9 without it).
_MLP = ("gate_proj", "up_proj", "down_proj")
ADAPTER_SPECS: dict[str, tuple[int, float, tuple[str, ...]]] = {
    "arithmetic": (8, 16.0, ("q_proj", "v_proj", "o_proj", *_MLP, "lm_head")),
    "reverse": (4, 8.0, ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj", "lm_head")),
    "sort": (8, 32.0, ("v_proj", "o_proj", *_MLP, "lm_head")),
    "lookup": (16, 16.0, ("q_proj", "v_proj", "up_proj", "down_proj", "lm_head")),
}


def build_base_model(base: str = "pretrained", seed: int = 0, *, progress: bool = True,
                     **model_kwargs: Any) -> Any:
    """The tiny base model of kind ``base`` (one of :data:`BASES`), built from ``seed``.

    ``model_kwargs`` (``vocab_size`` and ``MistralConfig`` fields) go to
    :func:`build_tiny_model` / :func:`build_pretrained_tiny_model`; the pretrained one is
    cached after its first build.
    """
    if base == "pretrained":
        return build_pretrained_tiny_model(seed=seed, progress=progress, **model_kwargs)
    if base == "random":
        return build_tiny_model(seed=seed, **model_kwargs)
    raise ValueError(f"base: expected one of {BASES}, got {base!r}")


def weights_digest(model: torch.nn.Module) -> str:
    """A short hash of every parameter and buffer of ``model`` (names, shapes, values)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def task_rows(task: str) -> list[dict[str, str]]:
    """The embedded train rows of ``task`` that are not validation rows."""
    return [r for r in train_validation_split()[0] if r["task"] == task]


def train_task_adapter(task: str, out_dir: str | Path, *, base: str = "pretrained",
                       steps: int = ADAPTER_STEPS, lr: float | None = None,
                       batch_size: int = 8, seed: int = 0, model_seed: int = 0,
                       model_kwargs: dict[str, Any] | None = None, tokenizer: Any = None,
                       rows: list[dict[str, str]] | None = None,
                       spec: tuple[int, float, tuple[str, ...]] | None = None,
                       progress: bool = True) -> Path:
    """Trains a PEFT LoRA on ``task`` rows and saves it to ``out_dir / base / task`` (cached).

    Args:
        base: base model kind (:data:`BASES`), built with ``model_seed`` and
            ``model_kwargs``.
        lr: AdamW learning rate (default :data:`ADAPTER_LR` of ``base``).
        rows: training rows (default :func:`task_rows`).

    Returns the adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).
    A folder that already holds an adapter trained with the same settings is reused.
    """
    from peft import LoraConfig, get_peft_model

    if task not in TASKS:
        raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
    if base not in BASES:
        raise ValueError(f"base: expected one of {BASES}, got {base!r}")
    rank, alpha, targets = spec or ADAPTER_SPECS[task]
    lr = ADAPTER_LR[base] if lr is None else lr
    folder = Path(out_dir) / base / task
    if rows is None:
        rows = task_rows(task)
    model = build_base_model(base, model_seed, progress=progress, **(model_kwargs or {}))
    # "recipe": bumped when the training changes (2: the LoRA initialised after seeding)
    stamp = {"recipe": 2, "task": task, "base": base, "base_weights": weights_digest(model),
             "rows": [r["id"] for r in rows], "steps": steps,
             "lr": lr, "batch_size": batch_size, "seed": seed,
             "model_seed": model_seed, "model_kwargs": model_kwargs or {}, "rank": rank,
             "alpha": alpha, "targets": list(targets)}
    stamp_file = folder / "datalora_train.json"
    try:
        cached = json.loads(stamp_file.read_text()).get("settings") == stamp
    except (OSError, ValueError):  # none yet, or unreadable: train anew
        cached = False
    if cached and (folder / "adapter_model.safetensors").is_file():
        return folder
    # the stamp goes first: a run cut short while it saves must not leave the new adapter
    # files under the stamp of the earlier settings (reused for them next time)
    stamp_file.unlink(missing_ok=True)
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets),
                        lora_dropout=0.0, task_type="CAUSAL_LM")
    torch.manual_seed(seed)  # before the adapter: its initialisation is part of the seed
    peft_model = get_peft_model(model, config)
    start = time.perf_counter()
    records = finetune(peft_model, tokenizer, rows, steps=steps, batch_size=batch_size, lr=lr,
                       seed=seed, progress=progress)
    with warnings.catch_warnings():  # lm_head is tied to the embeddings: PEFT says it
        warnings.filterwarnings("ignore", message=".*save_embedding_layers.*")  # saves them
        peft_model.save_pretrained(str(folder))
    atomic_write_text(stamp_file, json.dumps({
        "settings": stamp, "seconds": time.perf_counter() - start,
        "first_loss": records[0].loss, "last_loss": sum(r.loss for r in records[-5:]) / 5},
        indent=1))
    return folder


def train_task_adapters(out_dir: str | Path, *, base: str = "pretrained",
                        steps: int = ADAPTER_STEPS, lr: float | None = None, seed: int = 0,
                        progress: bool = True) -> dict[str, Path]:
    """One adapter per task of :data:`~datalora.data.TASKS`; returns ``{task: folder}``.
    ``seed``: each adapter's initialisation and data order (see :func:`train_task_adapter`;
    a folder holding another seed's adapter is retrained)."""
    tokenizer = build_tokenizer()
    return {task: train_task_adapter(task, out_dir, base=base, steps=steps, lr=lr, seed=seed,
                                     tokenizer=tokenizer, progress=progress) for task in TASKS}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="tmp/task_adapters")
    p.add_argument("--steps", type=int, default=ADAPTER_STEPS)
    p.add_argument("--lr", type=float, default=None, help="default: by base (ADAPTER_LR)")
    p.add_argument("--base", choices=BASES, default="pretrained")
    args = p.parse_args(argv)
    for task, folder in train_task_adapters(args.out, base=args.base, steps=args.steps,
                                            lr=args.lr).items():
        info = json.loads((folder / "datalora_train.json").read_text())
        print(f"{task:>10}: {folder}  loss {info['first_loss']:.3f} -> {info['last_loss']:.3f}"
              f"  ({info['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
