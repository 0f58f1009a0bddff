"""Train one PEFT LoRA per task of the embedded dataset on the embedded tiny model (cached).

The adapters deliberately differ in rank, alpha and target modules, so mixing them
exercises rank padding and missing-module experts::

    python -m datalora.experiments.task_adapters --out tmp/task_adapters --steps 80
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from datalora.data import TASKS, load_instruction_dataset
from datalora.finetune import finetune
from datalora.testing import build_tiny_model, build_tokenizer

# task -> (rank, alpha, target modules): different on purpose (padding, missing modules).
# lm_head is adapted too: the tiny model's random lm_head (std 0.02) caps the logit range
# a LoRA on the decoder layers alone can reach (eval loss stays near 5.9 without it).
_MLP = ("gate_proj", "up_proj", "down_proj")
ADAPTER_SPECS: dict[str, tuple[int, float, tuple[str, ...]]] = {
    "arithmetic": (8, 16.0, ("q_proj", "v_proj", "o_proj", *_MLP, "lm_head")),
    "reverse": (4, 8.0, ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj", "lm_head")),
    "sort": (8, 32.0, ("v_proj", "o_proj", *_MLP, "lm_head")),
    "lookup": (16, 16.0, ("q_proj", "v_proj", "up_proj", "down_proj", "lm_head")),
}


def train_task_adapter(task: str, out_dir: str | Path, *, steps: int = 80, lr: float = 2e-2,
                       batch_size: int = 8, seed: int = 0, model_seed: int = 0,
                       model_kwargs: dict[str, Any] | None = None, tokenizer: Any = None,
                       rows: list[dict[str, str]] | None = None,
                       spec: tuple[int, float, tuple[str, ...]] | None = None,
                       progress: bool = True) -> Path:
    """Trains a PEFT LoRA on ``task`` rows and saves it to ``out_dir / task`` (cached).

    Returns the adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``).
    A folder that already holds an adapter trained with the same settings is reused.
    """
    from peft import LoraConfig, get_peft_model

    if task not in TASKS:
        raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
    rank, alpha, targets = spec or ADAPTER_SPECS[task]
    folder = Path(out_dir) / task
    stamp = {"task": task, "steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed,
             "model_seed": model_seed, "model_kwargs": model_kwargs or {}, "rank": rank,
             "alpha": alpha, "targets": list(targets)}
    stamp_file = folder / "datalora_train.json"
    if stamp_file.is_file() and json.loads(stamp_file.read_text()).get("settings") == stamp \
            and (folder / "adapter_model.safetensors").is_file():
        return folder
    tokenizer = tokenizer if tokenizer is not None else build_tokenizer()
    model = build_tiny_model(seed=model_seed, **(model_kwargs or {}))
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets),
                        lora_dropout=0.0, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    if rows is None:
        rows = [r for r in load_instruction_dataset("embedded", "train") if r["task"] == task]
    torch.manual_seed(seed)
    start = time.perf_counter()
    records = finetune(peft_model, tokenizer, rows, steps=steps, batch_size=batch_size, lr=lr,
                       seed=seed, progress=progress)
    peft_model.save_pretrained(str(folder))
    stamp_file.write_text(json.dumps({
        "settings": stamp, "seconds": time.perf_counter() - start,
        "first_loss": records[0].loss, "last_loss": sum(r.loss for r in records[-5:]) / 5},
        indent=1))
    return folder


def train_task_adapters(out_dir: str | Path, *, steps: int = 80, lr: float = 2e-2,
                        progress: bool = True) -> dict[str, Path]:
    """One adapter per task of :data:`~datalora.data.TASKS`; returns ``{task: folder}``."""
    tokenizer = build_tokenizer()
    return {task: train_task_adapter(task, out_dir, steps=steps, lr=lr, tokenizer=tokenizer,
                                     progress=progress) for task in TASKS}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="tmp/task_adapters")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--lr", type=float, default=2e-2)
    args = p.parse_args(argv)
    for task, folder in train_task_adapters(args.out, steps=args.steps, lr=args.lr).items():
        info = json.loads((folder / "datalora_train.json").read_text())
        print(f"{task:>10}: {folder}  loss {info['first_loss']:.3f} -> {info['last_loss']:.3f}"
              f"  ({info['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
