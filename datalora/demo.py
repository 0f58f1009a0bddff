"""``python -m datalora demo``: DATALORA on the embedded default, end to end, on the CPU.

``--method datalora`` (default): trains the full method -- the Unified Saliency Network
routing every MoLoRA layer (shared routing), token pruning over decoder layers 1..3 and
the 3-phase curriculum (warmup -> sparsification -> hardening) -- with the
:class:`~datalora.trainer.DATALORATrainer` on the embedded tiny Mistral and multi-task
data (or a model / dataset given by path or name), with progress bars; then prints and
plots (``<output-dir>/datalora_demo.png``) the loss, the kept fraction and tau, and the
expert load per task over the three phases; saves the adapter, reloads it on a fresh copy
of the base model (the logits must be bit-identical, pruning on and off, or the demo
fails) and generates one answer per task with pruning on (calibrated keep threshold, KV
cache). Under a minute on 2 CPU cores on an idle machine (23 s end to end on 2026-12-04;
85 s has been seen on a busy one).

``--method molora``: the quick plain MoLoRA fine-tune (per-layer routers, no pruning,
:func:`datalora.finetune.finetune`), same save / reload / generate checks and a plot.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import io
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from datalora.cli import check_output_folder, fraction, int_at_least, plain_text, positive_float
from datalora.config import DATALORAConfig
from datalora.curriculum import PHASES
from datalora.data import (
    UNKNOWN_TASK,
    format_prompt,
    load_eval_rows,
    load_instruction_dataset,
    prompt_inputs,
)
from datalora.finetune import finetune, generate_answer
from datalora.io import save_figure
from datalora.model import DATALORAModel, get_datalora_model
from datalora.testing import load_model_and_tokenizer
from datalora.train import REAL_MODEL_DEFAULTS

PLOT_NAME = "datalora_demo.png"
# what a datalora run writes beside the adapter (train_datalora: the Trainer's save_model)
DATALORA_RUN_FILES = ("curriculum_state.json", "datalora_history.json", "training_args.bin")
DEFAULTS = {"datalora": dict(steps=300, batch_size=8, lr=3e-2, retention=0.5, eval_limit=200),
            "molora": dict(steps=120, batch_size=16, lr=5e-3)}
# the embedded tiny model's rates would wreck a pretrained model: train's rate for one
REAL_MODEL_LR = REAL_MODEL_DEFAULTS["learning_rate"]
_DATALORA_ONLY = (("--epochs", "epochs"), ("--retention", "retention"),
                  ("--eval-limit", "eval_limit"))


def _layer_range(prune_layers: list[int] | None) -> str:
    """``[start, end)`` decoder layers as ``"1-3"`` (one layer: ``"2"``; None: the second
    half, the config's default)."""
    if not prune_layers:
        return "second half"
    start, end = prune_layers
    return f"{start}" if end - start == 1 else f"{start}-{end - 1}"


def _load_rows(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Train rows and eval rows (the ``eval`` / ``validation`` / ``test`` split); warns when
    eval rows are training rows: all of them when the source has no eval split (a single
    file: its eval rows begin with the training rows), else those the splits share."""
    train_rows = load_instruction_dataset(args.dataset, split="train", limit=args.limit)
    if not train_rows:  # was blamed on the eval rows, a step later
        raise ValueError(f"source: {args.dataset} holds no rows")
    eval_rows = load_eval_rows(args.dataset)
    seen = {(r["system_prompt"], r["question"]) for r in train_rows}
    limit = (getattr(args, "eval_limit", None)
             if getattr(args, "method", "datalora") == "datalora" else None)
    used = eval_rows[:limit] if limit else eval_rows  # the rows evaluated / answered
    overlap = sum((r["system_prompt"], r["question"]) in seen for r in used)
    if overlap:
        why = (f"{args.dataset} has no eval / validation / test split"
               if eval_rows[:len(train_rows)] == train_rows else
               f"the eval split of {args.dataset} shares them with its train split")
        print(f"note: {overlap} of the {len(used)} eval rows used are training rows ({why}), "
              f"so the eval loss and the answers below are "
              f"{'' if overlap == len(used) else 'partly '}on training data")
    return train_rows, eval_rows


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="train DATALORA (USN + MoLoRA + token pruning + "
                                           "curriculum) on the embedded default and generate "
                                           "(under a minute on 2 idle CPU cores)",
                              description=plain_text(__doc__),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=("datalora", "molora"), default="datalora",
                   help="datalora: the full method (default); molora: plain per-layer "
                        "MoLoRA fine-tuning")
    p.add_argument("--model", default=None, help="model name or path (default: embedded tiny)")
    p.add_argument("--dataset", default=None, help="dataset file/folder/name (default: "
                                                   "embedded multi-task data)")
    p.add_argument("--steps", type=int_at_least(1), default=None,
                   help="optimizer steps (default: 300 datalora, 120 molora)")
    p.add_argument("--epochs", type=positive_float, default=None,
                   help="datalora: train this many epochs instead of --steps, one curriculum "
                        "phase per third")
    p.add_argument("--batch-size", type=int_at_least(1), default=None,
                   help="default: 8 datalora, 16 molora")
    p.add_argument("--lr", type=positive_float, default=None,
                   help=f"default: 3e-2 datalora, 5e-3 molora on the embedded model; "
                        f"{REAL_MODEL_LR:g} with --model")
    p.add_argument("--experts", type=int_at_least(1), default=8,
                   help="LoRA experts per adapted layer (default: 8)")
    p.add_argument("--rank", type=int_at_least(1), default=8,
                   help="rank of each expert; alpha is twice the rank (default: 8)")
    p.add_argument("--top-k", type=int_at_least(1), default=2,
                   help="experts each token is routed to (default: 2)")
    p.add_argument("--retention", type=fraction, default=None,
                   help=f"datalora: target retention of the pruned layers (default: "
                        f"{DEFAULTS['datalora']['retention']})")
    p.add_argument("--limit", type=int_at_least(1), default=None,
                   help="use the first N training rows")
    p.add_argument("--eval-limit", type=int_at_least(1), default=None,
                   help=f"datalora: eval rows for the final pruned / dense eval loss "
                        f"(default: {DEFAULTS['datalora']['eval_limit']})")
    p.add_argument("--output-dir", default="demo_output",
                   help="where the adapter, checkpoints and the plot go (default: demo_output;"
                        " an earlier demo run's plot and training records there are replaced "
                        "or removed)")
    p.add_argument("--seed", type=int, default=0, help="seed of the run (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.set_defaults(func=run, flag_names={
        "name_or_path": "--model", "source": "--dataset", "target_retention": "--retention",
        "num_active_experts": "--top-k", "num_lora_experts": "--experts",
        "lora_rank": "--rank"})


def _setting(args: argparse.Namespace, name: str) -> Any:
    value = getattr(args, name, None)
    if value is not None:
        return value
    if name == "lr" and args.model is not None:
        return REAL_MODEL_LR
    return DEFAULTS[args.method][name]


def _format_load(load: list[float]) -> str:
    return " ".join(f"{100 * v:4.1f}" for v in load)


def _phases(history: list[dict[str, Any]]) -> list[str]:
    """The curriculum phases in order, then any other phase names in order of appearance."""
    seen = list(dict.fromkeys(h["phase"] for h in history))
    return [p for p in PHASES if p in seen] + [p for p in seen if p not in PHASES]


def phase_task_load(history: list[dict[str, Any]]) -> dict[str, dict[str, list[float]]]:
    """``{phase: {task: mean load [E]}}`` over the logs of each curriculum phase."""
    out: dict[str, dict[str, list[float]]] = {}
    for phase in _phases(history):
        sums: dict[str, list[float]] = {}
        counts: dict[str, int] = {}
        for h in history:
            if h["phase"] != phase:
                continue
            for task, load in h.get("task_expert_load", {}).items():
                acc = sums.setdefault(task, [0.0] * len(load))
                sums[task] = [a + v for a, v in zip(acc, load, strict=True)]
                counts[task] = counts.get(task, 0) + 1
        if sums:
            out[phase] = {t: [v / counts[t] for v in s] for t, s in sorted(sums.items())}
    return out


def plot_history(history: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Draws loss, kept fraction / tau and per-phase task x expert load to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from datalora.experiments.datalora_eval import specialisation

    if not history:
        raise ValueError("history: nothing to plot (no logged steps)")
    per_phase = phase_task_load(history)
    steps = [h["step"] for h in history]
    fig = plt.figure(figsize=(13, 7.5))
    grid = fig.add_gridspec(2, max(3, len(per_phase)))
    ax_loss, ax_ret, ax_spec = (fig.add_subplot(grid[0, i]) for i in range(3))
    colors = {"warmup": "#dde8f5", "sparsification": "#f7e6d0", "hardening": "#e0f0dd"}
    for ax in (ax_loss, ax_ret, ax_spec):
        for phase in _phases(history):
            xs = [s for s, h in zip(steps, history, strict=True) if h["phase"] == phase]
            if xs:
                ax.axvspan(min(xs) - 0.5, max(xs) + 0.5, color=colors.get(phase, "#eeeeee"),
                           lw=0,
                           label=phase if ax is ax_loss else None)
        ax.set_xlabel("step")
    ax_loss.plot(steps, [h["lm_loss"] for h in history], "k.-", label="LM loss")
    ax_loss.set_title("LM loss (response tokens)")
    ax_loss.legend(fontsize=8)
    if "retention" in history[0]:
        ax_ret.plot(steps, [h["retention"] for h in history], "b.-", label="kept (actual)")
        ax_ret.plot(steps, [h["retention_target"] for h in history], "b--", label="target")
        ax_ret.set_ylim(0, 1.05)
        tau = ax_ret.twinx()
        tau.plot(steps, [h["tau"] for h in history], "r-", lw=1, label="tau")
        tau.set_ylabel("tau", color="r")
        ax_ret.set_title("kept fraction in the pruned layers, tau")
        ax_ret.legend(fontsize=8, loc="lower left")
    else:
        ax_ret.set_title("no pruning (plain MoLoRA)")
    jsd = [specialisation(h["task_expert_load"])["jsd_mean"] if h.get("task_expert_load")
           else float("nan") for h in history]
    ax_spec.plot(steps, jsd, "g.-")
    ax_spec.set_title("task specialisation: mean pairwise JSD of\nexpert load (bits)",
                      fontsize=10)
    for i, (phase, loads) in enumerate(per_phase.items()):
        ax = fig.add_subplot(grid[1, i])
        tasks = list(loads)
        im = ax.imshow([loads[t] for t in tasks], aspect="auto", cmap="viridis", vmin=0)
        ax.set_yticks(range(len(tasks)), tasks)
        ax.set_xlabel("expert")
        ax.set_title(f"{phase}: share of routes per task", fontsize=10)
        fig.colorbar(im, ax=ax)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, 100)
    plt.close(fig)
    return Path(path)


class _CompactLogs(io.TextIOBase):
    """A stdout wrapper: the Trainer's per-log dict lines become one short line each."""

    def __init__(self, stream: Any):
        self.stream, self.pending = stream, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            self.stream.write(self._compact(line) + "\n")
        return len(text)

    def flush(self) -> None:
        if self.pending:
            self.stream.write(self._compact(self.pending))
            self.pending = ""
        self.stream.flush()

    @staticmethod
    def _compact(line: str) -> str:
        if not line.startswith("{'"):
            return line
        try:
            logs = ast.literal_eval(line)
        except (ValueError, SyntaxError):
            return line
        if "phase" in logs:
            return (f"  step-log epoch {float(logs.get('epoch', 0)):5.2f} | "
                    f"{PHASES[int(logs['phase'])]:<14} | LM loss {float(logs['lm_loss']):.3f}"
                    f" | kept {float(logs['retention']):.2f} (target "
                    f"{float(logs['retention_target']):.2f}) | tau {float(logs['tau']):.2f}")
        if "train_runtime" in logs:
            return f"  trained in {float(logs['train_runtime']):.0f} s"
        return line


def _one_per_task(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    shown: dict[str, dict[str, Any]] = {}
    for row in rows:
        shown.setdefault(row.get("task", "unknown"), row)
    return list(shown.values())


@torch.no_grad()
def _check_reload(trained: DATALORAModel, reloaded: DATALORAModel, probe: dict[str, Any],
                  pruning: bool) -> bool:
    """Same logits (bit for bit) from the trained and the reloaded model."""
    trained.eval()
    reloaded.eval()
    same = torch.equal(trained(**probe).logits, reloaded(**probe).logits)
    if pruning:  # and with the pruning off
        state = trained.curriculum_state()["retention"]
        for m in (trained, reloaded):
            m.set_curriculum_state(retention=1.0)
        try:
            same = same and torch.equal(trained(**probe).logits, reloaded(**probe).logits)
        finally:
            for m in (trained, reloaded):
                m.set_curriculum_state(retention=state)
    return same


def _generate(model: DATALORAModel, tokenizer: Any, rows: list[dict[str, Any]],
              pruning: bool) -> tuple[list[str], list[float]]:
    """Greedy answers (KV cache; with pruning at the calibrated threshold) and, per prompt,
    the fraction of its tokens kept in the pruned layers."""
    answers, kept = [], []
    for row in rows:
        answer = generate_answer(model, tokenizer, row)
        answers.append(answer)
        if pruning:
            with torch.no_grad():
                model(**prompt_inputs(tokenizer, format_prompt(row)))
            kept.append(model.runtime.last.actual_retention())
        shown = f"   (prompt tokens kept: {100 * kept[-1]:.0f}%)" if pruning else ""
        print(f"  [{row.get('task', '?')}] Q: {row['question']}\n     model: "
              f"{answer.strip()!r}   expected: {row['response']!r}{shown}")
    return answers, kept


def _check_plotting(args: argparse.Namespace) -> None:
    """Before training: without matplotlib the plot is skipped (``args.no_plot`` set), with
    a warning now rather than an ImportError after minutes of training."""
    if args.no_plot:
        return
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        warnings.warn("matplotlib is not installed: the demo runs without its plot "
                      "(pip install matplotlib, or datalora[plot]; --no-plot silences this)",
                      stacklevel=2)
        args.no_plot = True


def _check_adapter_flags(args: argparse.Namespace, **fields: Any) -> None:
    """The adapter flags as a config, checked before the model loads (``--top-k`` above
    ``--experts`` failed only after loading it, minutes for a large ``--model``)."""
    DATALORAConfig(num_lora_experts=args.experts, lora_rank=args.rank,
                   lora_alpha=2.0 * args.rank, num_active_experts=args.top_k, **fields)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the demo; returns a summary dict (also used by the end-to-end test)."""
    check_output_folder("--output-dir", args.output_dir)  # not after the training
    _check_plotting(args)
    if getattr(args, "method", "datalora") == "molora":
        unused = [flag for flag, name in _DATALORA_ONLY if getattr(args, name, None) is not None]
        if unused:
            raise ValueError(f"{', '.join(unused)}: only for --method datalora (the MoLoRA "
                             f"demo trains --steps without pruning)")
        _check_adapter_flags(args)
        return _run_molora(args)
    for name in ("retention", "eval_limit"):
        setattr(args, name, _setting(args, name))
    _check_adapter_flags(args, target_retention=args.retention)
    return _run_datalora(args)


def _run_datalora(args: argparse.Namespace) -> dict[str, Any]:
    from datalora.train import DEFAULT_TINY_CONFIG, format_summary, train_datalora

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    steps, batch_size, lr = (_setting(args, k) for k in ("steps", "batch_size", "lr"))
    train_rows, eval_rows = _load_rows(args)  # before the model: a bad --dataset fails fast
    model, tokenizer = load_model_and_tokenizer(args.model)
    pristine = copy.deepcopy(model)
    num_layers = getattr(model.config, "num_hidden_layers", 4)
    tiny = dict(DEFAULT_TINY_CONFIG)
    if args.model is not None:  # a real model: prune its second half (the config default)
        tiny["prune_layers"] = None
    else:
        tiny["prune_layers"] = [min(1, num_layers - 1), num_layers]
    config = DATALORAConfig(**{**tiny, "base_model": args.model,
                               "num_lora_experts": args.experts, "lora_rank": args.rank,
                               "lora_alpha": 2.0 * args.rank, "num_active_experts": args.top_k,
                               "target_retention": args.retention})
    by_epochs = args.epochs is not None
    run_len = (f"{args.epochs:g} epoch{'s' if args.epochs != 1 else ''}" if by_epochs
               else f"{steps} step{'s' if steps != 1 else ''}")
    print(f"DATALORA demo | model: {args.model or 'embedded tiny Mistral'} | dataset: "
          f"{len(train_rows)} rows | {args.experts} experts x rank {args.rank}, top-"
          f"{args.top_k}, routed by the saliency network | pruned layers "
          f"{_layer_range(config.prune_layers)} at target retention {args.retention} | "
          f"{run_len}, batch {batch_size}, lr {lr:g}")
    with contextlib.redirect_stdout(_CompactLogs(sys.stdout)) as compact:
        result = train_datalora(
            config, dataset=train_rows, output_dir=args.output_dir,
            epochs=args.epochs if by_epochs else 3, max_steps=None if by_epochs else steps,
            batch_size=batch_size, learning_rate=lr, seed=args.seed,
            logging_steps=max(1, (steps if not by_epochs else
                                  int(args.epochs * len(train_rows) / batch_size)) // 30),
            curriculum_mode="epochs" if by_epochs else "steps", progress=not args.no_progress,
            model=model, tokenizer=tokenizer, eval_dataset=eval_rows,
            eval_limit=args.eval_limit)
        compact.flush()
    history = result.datalora_history
    trained = result.model
    print("\nper phase:")
    print(format_summary(result))
    print("\nexpert load per task, mean over each phase (% of routes per expert):")
    per_phase = phase_task_load(history)
    for phase, loads in per_phase.items():
        print(f"  {phase}")
        for task, load in loads.items():
            print(f"    {task:>10}: [{_format_load(load)}]")

    out = Path(result.output_dir)  # train_datalora saved the adapter there
    reloaded = DATALORAModel.from_pretrained(pristine, out)
    probe = prompt_inputs(tokenizer, [r["question"] for r in eval_rows[:4]], padding=True)
    same = _check_reload(trained, reloaded, probe, pruning=True)
    print(f"\nreloaded the adapter from {out}/ on a fresh base model: logits "
          f"bit-identical (pruning on and off) = {same}")
    if not same:
        raise RuntimeError("reloaded adapter does not reproduce the trained model's logits")
    thr = reloaded.saliency.keep_threshold.item()
    print(f"generation with pruning on (keep threshold {thr:.3f}, KV cache), one eval "
          f"question per task:")
    shown = _one_per_task(eval_rows)
    answers, kept = _generate(reloaded, tokenizer, shown, pruning=True)
    _drop_stale(out, [PLOT_NAME] if args.no_plot else [])
    plot = None
    if not args.no_plot:
        plot = plot_history(history, out / PLOT_NAME,
                            title=f"DATALORA demo: {run_len}, target retention "
                                  f"{args.retention}, eval loss pruned "
                                  f"{result.metrics.get('eval_loss_pruned', math.nan):.3f} / "
                                  f"dense {result.metrics.get('eval_loss_dense', math.nan):.3f}")
        print(f"plot: {plot}")
    elapsed = time.perf_counter() - start
    print(f"demo finished in {elapsed:.0f} s")
    return {"method": "datalora", "history": history, "phase_summary": result.phase_summary,
            "phases": [h["phase"] for h in history],
            "losses": [h["lm_loss"] for h in history],
            "retention": [h["retention"] for h in history],
            "task_load_by_phase": per_phase, "reload_identical": same, "answers": answers,
            "questions": shown, "prompt_kept_fraction": kept, "keep_threshold": thr,
            "eval_loss_pruned": result.metrics.get("eval_loss_pruned"),
            "eval_loss_dense": result.metrics.get("eval_loss_dense"),
            "output_dir": str(out), "plot": str(plot) if plot else None, "seconds": elapsed}


def _drop_stale(out: Path, names: list[str]) -> None:
    """Removes the files ``names`` an earlier demo run left in ``out`` and this one does not
    rewrite (its plot under ``--no-plot``, a datalora run's training records after a
    MoLoRA run), so the folder describes one run; says which."""
    stale = [name for name in names if (out / name).is_file()]
    for name in stale:
        (out / name).unlink()
    if stale:
        print(f"removed {', '.join(stale)} of an earlier run from {out}/")


def _run_molora(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    steps, batch_size, lr = (_setting(args, k) for k in ("steps", "batch_size", "lr"))
    train_rows, eval_rows = _load_rows(args)  # before the model: a bad --dataset fails fast
    model, tokenizer = load_model_and_tokenizer(args.model)
    pristine = copy.deepcopy(model)
    config = DATALORAConfig(base_model=args.model, num_lora_experts=args.experts,
                            lora_rank=args.rank, lora_alpha=2.0 * args.rank,
                            num_active_experts=args.top_k, routing="per_layer")
    print(f"MoLoRA demo | model: {args.model or 'embedded tiny Mistral'} | dataset: "
          f"{len(train_rows)} rows | {args.experts} experts x rank {args.rank}, "
          f"top-{args.top_k}, per-layer routers")
    wrapped = get_datalora_model(model, config)

    def report(record):
        if record.step == 1 or record.step % max(1, steps // 6) == 0:
            print(f"  step {record.step:4d}  loss {record.loss:.3f}  expert load % "
                  f"[{_format_load(record.expert_load)}]")

    records = finetune(wrapped, tokenizer, train_rows, steps=steps, batch_size=batch_size,
                       lr=lr, seed=args.seed, progress=not args.no_progress, on_step=report)
    n = min(5, max(1, len(records) // 2))  # windows that do not overlap
    first = sum(r.loss for r in records[:n]) / n
    last = sum(r.loss for r in records[-n:]) / n
    unit = "step" if n == 1 else f"{n} steps"
    print(f"loss: {first:.3f} (first {unit}) -> {last:.3f} (last {unit})")
    print("expert load per task, last step (% of routes per expert):")
    task_load = records[-1].task_expert_load
    if not task_load and records[-1].expert_load is not None:
        # rows of no embedded task (a --dataset without a known 'task' column) are counted
        # by no task: show their load as the datalora demo does, under "unknown"
        task_load = {UNKNOWN_TASK: records[-1].expert_load}
    for task, load in task_load.items():
        print(f"  {task:>10}: [{_format_load(load)}]")

    out = Path(args.output_dir)
    wrapped.save_pretrained(out)
    reloaded = DATALORAModel.from_pretrained(pristine, out)
    probe = prompt_inputs(tokenizer, [r["question"] for r in eval_rows[:4]], padding=True)
    same = _check_reload(wrapped, reloaded, probe, pruning=False)
    print(f"saved adapter to {out}/ and reloaded it: logits bit-identical = {same}")
    if not same:
        raise RuntimeError("reloaded adapter does not reproduce the trained model's logits")
    shown = _one_per_task(eval_rows)
    answers, _ = _generate(reloaded, tokenizer, shown, pruning=False)
    history = [{"step": r.step, "phase": "MoLoRA (no curriculum)", "lm_loss": r.loss,
                "task_expert_load": r.task_expert_load} for r in records]
    _drop_stale(out, [*DATALORA_RUN_FILES, *([PLOT_NAME] if args.no_plot else [])])
    plot = None
    if not args.no_plot:
        plot = plot_history(history, out / PLOT_NAME, title=f"plain MoLoRA demo: {steps} "
                                                            f"steps (no curriculum)")
        print(f"plot: {plot}")
    elapsed = time.perf_counter() - start
    print(f"demo finished in {elapsed:.0f} s")
    return {"method": "molora", "losses": [r.loss for r in records], "reload_identical": same,
            "answers": answers, "questions": shown, "output_dir": str(out),
            "plot": str(plot) if plot else None, "seconds": elapsed}
