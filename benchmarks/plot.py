"""Plot a ``benchmarks.molora`` JSON: time ratio vs base linear against T, one line per method.

    python -m benchmarks.plot benchmarks/results/molora_cpu.json   # writes molora_cpu.png
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

from datalora.io import save_figure

STYLE = {  # method prefix -> (color, linestyle)
    "linear": ("black", "-"),
    "molora_linear": ("tab:blue", "-"),
    "molora_delta": ("tab:blue", "--"),
    "loop_linear": ("tab:red", "-"),
    "loop_delta": ("tab:red", "--"),
    "peft_mixed": ("tab:green", "-"),
}
BACKEND_SHADES = {"torch": "tab:blue", "triton": "tab:purple", "cuda": "tab:cyan",
                  "triton-fused": "tab:orange"}
# issue 4's whole-layer targets (molora_linear / base linear), drawn as dotted lines
TARGET_LINES = {"gpu": {"fwd": 1.10, "fwd_bwd": 1.15}, "cpu": {"fwd_bwd": 1.25}}


def _style(method: str) -> tuple[str, str]:
    base, _, backend = method.partition("[")
    color, ls = STYLE.get(base, ("gray", ":"))
    if backend:
        color = BACKEND_SHADES.get(backend.rstrip("]"), color)
    return color, ls


def _shape(row: dict) -> tuple:
    """``(d_in, d_out, E, r, k, skew)`` of a result row."""
    return tuple(row[k] for k in ("d_in", "d_out", "E", "r", "k", "skew"))


def _draw_mode(ax, rows: list[dict], mode: str, target: float | None) -> None:
    """One panel: ratio vs base linear against T, a line per method, for one shape."""
    methods = dict.fromkeys(r["method"] for r in rows if r["mode"] == mode)
    for method in methods:
        pts = sorted((r["T"], r["ratio_vs_linear"]) for r in rows
                     if r["mode"] == mode and r["method"] == method)
        color, ls = _style(method)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=4, color=color,
                ls=ls, label=method)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.axhline(1.0, color="gray", lw=0.8)
    if target:
        ax.axhline(target, color="tab:blue", lw=0.8, ls=":",
                   label=f"target molora_linear <= {target}x")
    ax.set_xlabel("tokens T")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def plot_file(path: Path | str, out: Path | str | None = None) -> Path:
    """Draws the T sweep of the JSON at ``path`` into ``out`` (default: same name, .png):
    a row of panels (forward, forward + backward) per layer shape of the sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    data = json.loads(path.read_text())
    if not str(data.get("schema", "")).startswith("datalora.benchmarks.molora/"):
        raise ValueError(f"json: {path} is not a benchmarks.molora result (schema "
                         f"{data.get('schema')!r}); bench_pruning / bench_nf4 draw their own")
    meta = data["meta"]
    if meta.get("complete") is False and not meta.get("only"):
        warnings.warn(f"{path}: an incomplete run (stopped before its last case): the plot "
                      f"shows the cases it finished", UserWarning, stacklevel=2)
    rows = [r for r in data["results"] if r["group"] == "T_sweep"]
    if not rows:
        raise ValueError(f"{path}: no T_sweep rows to plot")
    shapes = list(dict.fromkeys(_shape(r) for r in rows))  # in run order: 7B attn, MLP, ...
    fig, axes = plt.subplots(len(shapes), 2, figsize=(12, 4.4 * len(shapes)), sharey="row",
                             squeeze=False)
    for shape, row_axes in zip(shapes, axes, strict=True):
        shape_rows = [r for r in rows if _shape(r) == shape]
        for ax, mode in zip(row_axes, ("fwd", "fwd_bwd"), strict=True):
            _draw_mode(ax, shape_rows, mode, TARGET_LINES.get(meta.get("preset"), {}).get(mode))
            d_in, d_out, E, r, k, skew = shape
            ax.set_title(f"{'forward' if mode == 'fwd' else 'forward + backward'}: "
                         f"d_in={d_in} d_out={d_out} E={E} r={r} k={k} ({skew})", fontsize=9)
        row_axes[0].set_ylabel("time / base F.linear (log)")
    fig.suptitle(f"MoLoRA, {meta['dtype']}, {meta['device_name']}, torch {meta['torch']}",
                 fontsize=10)
    fig.tight_layout()
    out = Path(out) if out else path.with_suffix(".png")
    if out.is_dir():
        out = out / path.with_suffix(".png").name
    save_figure(fig, out, 110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plot")
    parser.add_argument("json", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not args.json.is_file():
        parser.error(f"json: no such file: {args.json}")
    try:
        print(plot_file(args.json, args.out))
    except ValueError as exc:
        parser.error(str(exc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
