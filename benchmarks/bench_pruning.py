"""Token-pruning benchmark: a DATALORA training step at retention 1.0 vs 0.5.

    python -m benchmarks.bench_pruning                    # preset by device (gpu | cpu)
    python -m benchmarks.bench_pruning --preset smoke --out /tmp/bench

One training step = forward (saliency network, shared routing, MoLoRA in every
projection, token pruning over the pruned layer range) + LM loss + the aux losses +
backward + AdamW step, in training mode (Gumbel noise on). For every model config and
pruned layer range the two retentions run interleaved in one process (rep 1 at 1.0,
rep 1 at 0.5, rep 2 at 1.0, ...), so load from other processes hits both alike; medians
with 20/80 % quantiles. The ideal speedup counts the decoder layers only::

    ideal = 1 / (unpruned_frac + pruned_frac * retention)

(pruning layers 2..7 of 0..7 at 0.5: 1.6x; the second half, 4..7: 1.33x). Targets, written as
PASS/FAIL to the JSON: measured >= 85 % of ideal for every row; on the CPU >= 1.4x with
the tiny model's default range (``DEFAULT_TINY_CONFIG``: layers 1..3 of 4, ideal 1.6x).
When a target fails, a ``torch.profiler`` table of the pruned step (top ops by self CPU
time) goes into the JSON so the overhead can be located.

The ideal assumes a layer's time halves with its tokens. Small layers do not scale so:
fixed per-op costs stay. So each row also gets an *attainable* speedup, measured rather
than assumed: four dense steps (no pruning) of the L-layer model and of a model with only
the L - n layers outside the pruned range, each at the full and at half the sequence
length, interleaved with the two retentions. The pruned layers' time at full length is
``t(L, seq) - t(L - n, seq)``, at half length ``t(L, seq/2) - t(L - n, seq/2)``
(embedding, head, loss and optimizer cancel in each difference), and::

    attainable = t(L, seq) / (t(L, seq) - [pruned layers at seq] + [pruned layers at seq/2])

is what pruning with zero gather/scatter/scoring overhead would reach: kept tokens run
as packed sequences of half the length. ``speedup / attainable`` is the pruning
machinery's own efficiency. A layer's time is never negative: when timing noise makes
the half-length difference negative (tiny models, few repetitions) it counts as zero,
so the attainable speedup is at most ``t(L, seq) / t(L - n, seq)`` and always positive.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.molora import (
    check_cli_only,
    check_cli_out,
    cli_preset,
    finish_progress,
    format_targets,
    metadata,
    paired_ratio,
    progress_path,
    result_path,
    wait_quiet,
    write_plot,
    write_result,
)
from benchmarks.plot import save_figure
from benchmarks.timing import bootstrap_ci, format_ci, sync, time_interleaved
from datalora.cli import int_at_least, non_negative_float, positive_float

SCHEMA = "datalora.benchmarks.pruning/1"
RESULTS_DIR = Path(__file__).parent / "results"
RETENTIONS = (1.0, 0.5)
IDEAL_FRACTION = 0.85
CPU_MIN_SPEEDUP = 1.4


@dataclasses.dataclass(frozen=True)
class ModelCase:
    """A Mistral-shaped model, a batch shape and the pruned ranges to time on it."""

    name: str
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    batch: int
    seq: int
    prune_ranges: tuple[tuple[int, int], ...]
    default_range: tuple[int, int] | None = None  # the range the 1.4x CPU target uses
    vocab: int = 1024


def _tiny(batch, seq, **kw) -> ModelCase:
    return ModelCase(hidden=128, intermediate=344, heads=4, kv_heads=2, batch=batch, seq=seq,
                     **kw)


PRESETS: dict[str, dict[str, Any]] = {
    "cpu": dict(dtype=torch.float32, budget_s=20.0, min_reps=5, max_reps=40, cases=[
        # the embedded tiny model (hidden 128) at the demo's batch (8 x 96 tokens): per-op
        # overheads weigh most; and at 4 x 512 tokens, the long sequences pruning is for
        _tiny(8, 96, name="tiny", layers=4, prune_ranges=((1, 4),), default_range=(1, 4)),
        _tiny(4, 512, name="tiny_seq512", layers=4, prune_ranges=((1, 4),),
              default_range=(1, 4)),
        _tiny(8, 96, name="tiny_8layers", layers=8, prune_ranges=((2, 8), (4, 8))),
        # compute dominates: hidden 512, seq 256, batch 8
        ModelCase("cpu_large", hidden=512, layers=8, intermediate=1376, heads=8, kv_heads=4,
                  batch=8, seq=256, prune_ranges=((2, 8), (4, 8)))]),
    "gpu": dict(dtype=torch.bfloat16, budget_s=5.0, min_reps=20, max_reps=200, cases=[
        _tiny(8, 96, name="tiny", layers=4, prune_ranges=((1, 4),), default_range=(1, 4)),
        ModelCase("mistral_8l_h1024", hidden=1024, layers=8, intermediate=3584, heads=8,
                  kv_heads=4, batch=8, seq=1024, prune_ranges=((2, 8), (4, 8)), vocab=32000),
        ModelCase("mistral_8l_h2048", hidden=2048, layers=8, intermediate=7168, heads=16,
                  kv_heads=8, batch=8, seq=2048, prune_ranges=((2, 8), (4, 8)),
                  vocab=32000)]),
    "smoke": dict(dtype=torch.float32, budget_s=0.05, min_reps=2, max_reps=3, cases=[
        _tiny(2, 16, name="tiny", layers=4, prune_ranges=((1, 4),), default_range=(1, 4)),
        ModelCase("small_8layers", hidden=32, layers=8, intermediate=64, heads=2, kv_heads=1,
                  batch=2, seq=16, prune_ranges=((2, 8),), vocab=300)]),
}


def ideal_speedup(num_layers: int, prune_range: tuple[int, int], retention: float) -> float:
    """``1 / (unpruned_frac + pruned_frac * retention)`` over the decoder layers."""
    start, end = prune_range
    if not 0 <= start < end <= num_layers:
        raise ValueError(f"prune_range: expected [start, end) within {num_layers} layers, "
                         f"got {prune_range}")
    frac = (end - start) / num_layers
    return 1.0 / ((1.0 - frac) + frac * retention)


def build(case: ModelCase, prune_range: tuple[int, int] | None, dtype: torch.dtype,
          device: torch.device):
    """The DATALORA model (shared routing, 8 experts x rank 8, top-2), its optimizer (fused
    AdamW, ``adamw_torch_fused`` as the Trainer uses) and a random batch (all tokens real).
    ``prune_range`` None: no pruning (the saliency network still routes)."""
    from transformers import MistralConfig, MistralForCausalLM

    from datalora.config import DATALORAConfig
    from datalora.model import get_datalora_model

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=case.vocab, hidden_size=case.hidden,
                        intermediate_size=case.intermediate, num_hidden_layers=case.layers,
                        num_attention_heads=case.heads, num_key_value_heads=case.kv_heads,
                        max_position_embeddings=max(512, case.seq), tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    base = MistralForCausalLM(cfg).to(device=device, dtype=dtype)
    config = DATALORAConfig(num_lora_experts=8, lora_rank=8, lora_alpha=16.0,
                            num_active_experts=2, routing="shared",
                            prune_layers=None if prune_range is None else list(prune_range),
                            lambda_prune=1.0,
                            alpha_balance=0.1)
    model = get_datalora_model(base, config, verbose=False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6, fused=True)  # DATALORATrainer's default optim
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, case.vocab, (case.batch, case.seq), generator=g).to(device)
    batch = dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    return model, opt, batch


def make_step(model, opt, batch, retention: float):
    """One optimizer step at ``retention`` (soft routing, tau 1, Gumbel noise on)."""
    cfg = model.datalora_config

    def step():
        model.set_curriculum_state(tau=1.0, retention=retention, hard=False)
        out = model(**batch)
        aux = cfg.lambda_prune * out.retention_loss + cfg.alpha_balance * out.balance_loss
        (out.loss + aux).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def profile_step(step, device: torch.device, rows: int = 15) -> list[dict[str, Any]]:
    """Top ops of one step by self CPU (or CUDA) time, from ``torch.profiler``."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    step()
    with profile(activities=acts) as prof:
        step()
        sync(device)
    # no getattr default: a renamed attribute (self_cuda_time_total is gone from the
    # averages) must fail, not give a table of zeros
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) or 1
    return [{"op": e.key, "self_ms": getattr(e, key) / 1e3, "calls": e.count,
             "share": getattr(e, key) / total} for e in events[:rows]]


def dense_steps(case: ModelCase, prune_range: tuple[int, int], dtype: torch.dtype,
                device: torch.device) -> dict[tuple[int, int], Any]:
    """The four dense (unpruned) steps the attainable speedup needs, keyed ``(layers, seq)``:
    the whole model and the ``L - n`` layers outside the pruned range, at full and half
    sequence length (module docstring)."""
    start, end = prune_range
    outside = case.layers - (end - start)
    if outside < 1 or case.seq < 2:
        raise ValueError(f"prune_range: the attainable speedup needs a layer outside the "
                         f"pruned range and seq >= 2, got {prune_range} of {case.layers} "
                         f"layers, seq {case.seq}")
    return {(layers, seq): make_step(*build(dataclasses.replace(case, layers=layers, seq=seq),
                                            None, dtype, device), 1.0)
            for layers in (case.layers, outside) for seq in (case.seq, case.seq // 2)}


def attainable_speedup(ms: dict[tuple[int, int], float], case: ModelCase,
                       prune_range: tuple[int, int]) -> dict[str, Any]:
    """``{"attainable_speedup", "ms_dense": {"L<layers>_seq<seq>": ms}}`` from the median
    times ``ms`` of :func:`dense_steps`' steps."""
    outside = case.layers - (prune_range[1] - prune_range[0])
    half = case.seq // 2
    full = ms[case.layers, case.seq]
    pruned_full = full - ms[outside, case.seq]
    pruned_half = max(ms[case.layers, half] - ms[outside, half], 0.0)  # noise floor
    return {"attainable_speedup": full / (full - pruned_full + pruned_half),
            "ms_dense": {f"L{layers}_seq{seq}": v for (layers, seq), v in ms.items()}}


def run_case(case: ModelCase, prune_range: tuple[int, int], preset: dict,
             device: torch.device, bound: bool = True) -> dict[str, Any]:
    """One row. With ``bound`` the four dense steps run in the same round-robin as the two
    retentions, so all six see the same machine conditions."""
    model, opt, batch = build(case, prune_range, preset["dtype"], device)
    steps: dict[Any, Any] = {r: make_step(model, opt, batch, r) for r in RETENTIONS}
    if bound:
        steps.update(dense_steps(case, prune_range, preset["dtype"], device))
    timed = time_interleaved(steps, device, preset["budget_s"], preset["min_reps"],
                             preset["max_reps"], order_seed=0)
    rounds = {key: value[5] for key, value in timed.items()}
    steps[0.5]()  # the rounds' order is shuffled: the model's last step may have been 1.0's
    kept = model.runtime.last.actual_retention() if model.runtime.last is not None else None
    dense, pruned = timed[1.0], timed[0.5]
    ideal = ideal_speedup(case.layers, prune_range, 0.5)
    speedup = dense[0] / pruned[0]
    row = {"case": case.name, **dataclasses.asdict(case), "prune_range": list(prune_range),
           "pruned_layers": prune_range[1] - prune_range[0],
           "dtype": str(preset["dtype"]).removeprefix("torch."),
           "tokens": case.batch * case.seq, "kept_fraction_last_step": kept,
           "ms_r1.0": {"median": dense[0], "q20": dense[1], "q80": dense[2], "min": dense[3]},
           "ms_r0.5": {"median": pruned[0], "q20": pruned[1], "q80": pruned[2],
                       "min": pruned[3]},
           "reps": dense[4], "speedup": speedup,
           # spread: slowest plausible vs fastest plausible ratio from the quantiles
           "speedup_q_range": [dense[1] / pruned[2], dense[2] / pruned[1]],
           "speedup_ci95": bootstrap_ci(rounds, lambda m: m[1.0] / m[0.5]),
           "speedup_paired_median": paired_ratio(dense[5], pruned[5]),
           "ideal_speedup": ideal, "fraction_of_ideal": speedup / ideal}
    if bound:
        def attainable(medians: dict[Any, float]) -> float:
            return attainable_speedup({k: v for k, v in medians.items() if isinstance(k, tuple)},
                                      case, prune_range)["attainable_speedup"]

        row.update(attainable_speedup({k: v[0] for k, v in timed.items()
                                       if isinstance(k, tuple)}, case, prune_range))
        row["fraction_of_attainable"] = speedup / row["attainable_speedup"]
        row["attainable_ci95"] = bootstrap_ci(rounds, attainable)
        row["fraction_of_attainable_ci95"] = bootstrap_ci(
            rounds, lambda m: m[1.0] / m[0.5] / attainable(m))
    row["_step"] = steps[0.5]
    return row


def row_label(row: dict) -> str:
    """``"<case>_layers<first>-<last>"`` with the pruned range's layers counted inclusively
    (``prune_range [2, 8)`` -> ``layers2-7``), as the console and the plot show them."""
    start, end = row["prune_range"]
    return f"{row['case']}_layers{start}-{end - 1}"


def check_targets(rows: list[dict], preset_name: str) -> list[dict]:
    """Each row's fraction of ideal (>= 85 %) and, on the CPU with the default range, its
    speedup (>= 1.4x); ``ci95`` from the row's bootstrap interval of the speedup."""
    out = []
    for row in rows:
        name = row_label(row)
        ci = row.get("speedup_ci95")
        ideal = row["ideal_speedup"]
        out.append({"name": f"{name}_vs_ideal", "description": f"measured speedup >= "
                    f"{IDEAL_FRACTION:.0%} of ideal {ideal:.3f}x",
                    "value": row["fraction_of_ideal"], "op": ">=",
                    "threshold": IDEAL_FRACTION,
                    "status": "PASS" if row["fraction_of_ideal"] >= IDEAL_FRACTION else "FAIL",
                    "ci95": None if ci is None else [ci[0] / ideal, ci[1] / ideal]})
        default = row.get("default_range")
        if preset_name == "cpu" and default is not None and \
                list(default) == row["prune_range"]:
            out.append({"name": f"{name}_cpu_default_range", "description":
                        f"CPU step speedup at retention 0.5 >= {CPU_MIN_SPEEDUP}x with the "
                        f"default pruned range", "value": row["speedup"], "op": ">=",
                        "threshold": CPU_MIN_SPEEDUP,
                        "status": "PASS" if row["speedup"] >= CPU_MIN_SPEEDUP else "FAIL",
                        "ci95": None if ci is None else list(ci)})
    return out


def run(preset_name: str, out_dir: Path, device: torch.device | None = None,
        plot: bool = True, log=print, max_load: float | None = None,
        max_wait_s: float = 300.0, profile: bool = True,
        only: str | None = None, bound: bool = True) -> dict[str, Any]:
    """Runs a preset; writes ``pruning_<preset>.json`` (+ ``.png``); returns the dict.

    ``bound``: also measure each row's attainable speedup (four more dense models).
    ``only``: run just the cases whose name contains this substring, written to
    ``pruning_<preset>_only-<SUBSTR>.json`` (a full run's file is never replaced by a
    partial one). The JSON is rewritten after every row, so a run cut short keeps its rows.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    preset = PRESETS[preset_name]
    meta = metadata("cpu" if preset_name != "gpu" else "gpu", device, [])
    meta.update(preset=preset_name, dtype=str(preset["dtype"]).removeprefix("torch."),
                timer="perf_counter (+cuda synchronize), retentions interleaved in a seeded "
                      "random order per round, median of reps with 20/80% quantiles; 95% "
                      "intervals by a bootstrap over the rounds (all steps of a round kept "
                      "together)",
                step="forward (USN + shared routing + MoLoRA + pruning) + LM loss + aux "
                     "losses + backward + fused AdamW step; 8 experts x rank 8, top-2, all 7 "
                     "projections; random tokens, no padding")
    meta.pop("backends", None)
    rows = []
    cases = [c for c in preset["cases"] if only is None or only in c.name]
    if not cases:
        raise ValueError(f"only: no case of preset {preset_name!r} contains {only!r}")
    path = result_path(out_dir, f"pruning_{preset_name}", only)
    partial = progress_path(path)
    meta["complete"], meta["only"] = False, only
    for case in cases:
        for prune_range in case.prune_ranges:
            load = wait_quiet(max_load if device.type == "cpu" else None, max_wait_s, log)
            t0 = time.perf_counter()
            row = run_case(case, prune_range, preset, device, bound=bound)
            row["load_1m"] = load
            rows.append(row)
            log(format_row(row) + f"   [{time.perf_counter() - t0:.0f}s, load {load}]")
            # partial results survive a run that is cut short (the GPU suite's step limit)
            write_result(partial, SCHEMA, meta, [_public(r) for r in rows],
                         check_targets(rows, preset_name))
    meta["complete"] = only is None
    targets = check_targets(rows, preset_name)
    if profile:  # where the time goes, for every row that misses a target
        failing = {t["name"].rsplit("_vs_ideal", 1)[0].rsplit("_cpu_default", 1)[0]
                   for t in targets if t["status"] == "FAIL"}
        for row in rows:
            name = row_label(row)
            if name in failing and "_step" in row:
                row["profile_r0.5"] = profile_step(row["_step"], device)
    for row in rows:
        row.pop("_step", None)
    result = write_result(path, SCHEMA, meta, rows, targets)
    finish_progress(path, partial)
    log(format_targets(targets))
    log(f"wrote {path}")
    if plot:
        write_plot(plot_file, path, log)
    return result


def _public(row: dict) -> dict:
    """A row without its private entries (the timed step, kept for profiling)."""
    return {k: v for k, v in row.items() if not k.startswith("_")}


def format_row(row: dict) -> str:
    a, b = row["ms_r1.0"], row["ms_r0.5"]
    return (f"{row['case']:18s} layers {row['prune_range'][0]}..{row['prune_range'][1] - 1} "
            f"of {row['layers']}: r=1.0 {a['median']:9.2f} ms [{a['q20']:.2f}, {a['q80']:.2f}]"
            f" | r=0.5 {b['median']:9.2f} ms [{b['q20']:.2f}, {b['q80']:.2f}] | speedup "
            f"{row['speedup']:.3f}x {_ci(row.get('speedup_ci95'))}vs ideal "
            f"{row['ideal_speedup']:.3f}x ({100 * row['fraction_of_ideal']:.0f}%)"
            + (f", attainable {row['attainable_speedup']:.3f}x "
               f"{_ci(row.get('attainable_ci95'))}({100 * row['fraction_of_attainable']:.0f}%)"
               if "attainable_speedup" in row else ""))


def _ci(bounds: list[float] | None) -> str:
    return format_ci(bounds) + " " if bounds else ""


def plot_file(path: Path) -> Path:
    """Bar chart (measured vs ideal speedup per row) drawn from the JSON file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(Path(path).read_text())
    rows = data["results"]
    labels = [f"{r['case']}\nlayers {r['prune_range'][0]}-{r['prune_range'][1] - 1}/"
              f"{r['layers']}" for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.8 * len(rows)), 4.5))
    ax.bar([i - 0.27 for i in x], [r["ideal_speedup"] for r in rows], 0.27, label="ideal",
           color="#bbbbbb")
    if any("attainable_speedup" in r for r in rows):
        ax.bar([i for i in x], [r.get("attainable_speedup", 0.0) for r in rows], 0.27,
               label="attainable (dense steps at half length)", color="#90b8e0")
    ax.bar([i + 0.27 for i in x], [r["speedup"] for r in rows], 0.27, label="measured",
           color="#3070b0",
           yerr=[[r["speedup"] - r["speedup_q_range"][0] for r in rows],
                 [r["speedup_q_range"][1] - r["speedup"] for r in rows]], capsize=3)
    for i, r in enumerate(rows):
        ax.text(i + 0.27, r["speedup"] + 0.03, f"{r['speedup']:.2f}x\n"
                f"{100 * r['fraction_of_ideal']:.0f}%", ha="center", fontsize=8)
        if "attainable_speedup" in r:
            ax.text(i, r["attainable_speedup"] + 0.03, f"{r['attainable_speedup']:.2f}x",
                    ha="center", fontsize=8)
        ax.hlines(IDEAL_FRACTION * r["ideal_speedup"], i - 0.4, i + 0.4, colors="r",
                  linestyles="--", lw=1, label="85% of ideal" if i == 0 else None)
    ax.axhline(1.0, color="k", lw=0.5)
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylabel("training-step speedup, retention 1.0 -> 0.5")
    meta = data["meta"]
    ax.set_title(f"DATALORA token pruning, {meta['device_name']} ({meta['cpu_threads']} "
                 f"threads), {meta['dtype']}, {meta['date']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path).with_suffix(".png")
    save_figure(fig, out, 100)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_pruning",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="gpu | cpu | smoke (default: gpu with CUDA, else cpu)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR,
                        help="output folder (default: benchmarks/results in the repository)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--no-profile", action="store_true",
                        help="skip the profile of the rows that miss a target")
    parser.add_argument("--no-bound", action="store_true",
                        help="skip the attainable-speedup measurement (four dense models "
                             "per row)")
    parser.add_argument("--threads", type=int_at_least(1), default=None,
                        help="torch CPU threads, >= 1 (default: torch's default)")
    parser.add_argument("--max-load", type=positive_float, default=None,
                        help="CPU: wait for the 1-min load average to drop below this")
    parser.add_argument("--max-wait", type=non_negative_float, default=300.0,
                        help="seconds --max-load waits at most before each row (default: 300)")
    parser.add_argument("--only", default=None, metavar="SUBSTR",
                        help="run only the cases whose name contains SUBSTR, written to "
                             "pruning_<preset>_only-SUBSTR.json (a full run's file is never "
                             "replaced)")
    args = parser.parse_args(argv)
    preset = cli_preset(parser, args.preset)
    check_cli_out(parser, args.out)
    check_cli_only(parser, args.only, preset, [c.name for c in PRESETS[preset]["cases"]])
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    run(preset, args.out, plot=not args.no_plot, max_load=args.max_load,
        max_wait_s=args.max_wait, profile=not args.no_profile, only=args.only,
        bound=not args.no_bound)
    return 0


if __name__ == "__main__":
    sys.exit(main())
