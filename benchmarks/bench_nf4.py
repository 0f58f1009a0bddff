"""NF4 benchmark: datalora's NF4 dequant / fused decode vs bitsandbytes, JSON + plot.

    python -m benchmarks.bench_nf4                    # preset by device (gpu | cpu)
    python -m benchmarks.bench_nf4 --preset smoke --out /tmp/bench

Groups (all inference, under ``torch.no_grad``; bf16 on GPU, fp32 on CPU):

* ``dequant``: ``nf4.dequantize`` (``datalora._C`` kernel on GPU, torch elsewhere) vs
  ``bnb.functional.dequantize_4bit``, double-quantized weight; GB/s counts packed bytes +
  absmax read and output written.
* ``decode`` (T = 1..16): the fused ``nf4_molora_linear`` (one launch: one pass over W, LoRA
  shrink and expand in the same kernel)
  vs ``bnb.matmul_4bit`` + a PEFT-style per-expert LoRA add (``benchmarks.baselines``);
  ``hbm_frac`` = 4-bit weight bytes / time / peak bandwidth (target >= 0.70 of the GPU's HBM
  peak, H100 / H200 / A100, at 4096 x 14336, T = 1); on CUDA the fused kernel is also timed
  replayed from a CUDA graph (``graph_ms``, ``hbm_frac_graph``: the kernel without the
  call's host time).
* ``large_t``: NF4 MoLoRA layer, default path (``nf4_molora``: dequant + GEMM + delta) and,
  on CUDA, the one-kernel Triton path (``triton_nf4_fused``: ``DATALORA_NF4_FUSED=1``, NF4
  tiles decoded in the GEMM, LoRA expand fused) vs the bf16 ``molora_linear`` (target
  <= 1.10x at T >= 2048).

On a modelled GPU every row also has ``floor_ms`` (``benchmarks.roofline``) and
``fraction_of_floor = floor_ms / ms``.

Timers as ``benchmarks.molora`` (``do_bench`` medians + 20/80 % quantiles on GPU,
round-robin ``perf_counter`` on CPU); the datalora layers run with ``check_values=False``,
as model layers do after their shared routing's one check per forward. Output:
``<out>/nf4_<preset>.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import functools
import json
import warnings
from pathlib import Path

import torch

from benchmarks import roofline
from benchmarks.baselines import loop_delta
from benchmarks.molora import (
    AGREE_TOL,
    check_cli_out,
    cli_preset,
    finish_progress,
    progress_path,
    rel_max_error,
    time_cuda,
    with_env,
    worst_error,
    write_plot,
)
from benchmarks.molora import metadata as _metadata
from benchmarks.plot import save_figure
from benchmarks.timing import cuda_graph_ms, time_interleaved
from datalora import _C_loader, nf4, ops
from datalora.io import atomic_write_text
from datalora.nf4_linear import NF4Linear, fused_decode_applies, nf4_molora_linear

RESULTS_DIR = Path(__file__).parent / "results"
NF4_FUSED_ENV = {"DATALORA_NF4_FUSED": "1"}
NF4_METHODS = ("nf4_molora", "triton_nf4_fused")  # large_t methods with a target

GROUPS = ("dequant", "decode", "large_t")
PRESETS = {
    "gpu": dict(dtype=torch.bfloat16, dequant=[(4096, 4096), (4096, 14336), (14336, 4096)],
                decode=[(T, 4096, 14336) for T in (1, 2, 4, 8, 16)] + [(1, 4096, 4096)],
                large_t=[(T, 4096, 4096) for T in (2048, 4096)], E=8, r=16, k=2),
    "cpu": dict(dtype=torch.float32, dequant=[(512, 512), (1024, 2048)],
                decode=[(1, 512, 1024), (8, 512, 1024)], large_t=[(256, 512, 512)],
                E=4, r=8, k=2, budget_s=1.0),
    "smoke": dict(dtype=torch.float32, dequant=[(64, 128)], decode=[(1, 64, 96)],
                  large_t=[(16, 64, 64)], E=2, r=4, k=1, budget_s=0.05),
}


def _timer(device):
    if device.type == "cuda":
        return lambda steps: {k: dict(ms=v[0], q20=v[1], q80=v[2], peak_mb=v[3])
                              for k, v in time_cuda(steps, []).items()}
    return lambda steps, b=0.5: {k: dict(ms=v[0], q20=v[1], q80=v[2], reps=v[4])
                                 for k, v in time_interleaved(steps, device, b, 3, 200).items()}


def _peak_gbs(device) -> float | None:
    if device.type != "cuda":
        return None
    # the roofline's HBM peaks (SXM parts), so hbm_frac and fraction_of_floor agree
    key = roofline.device_key(torch.cuda.get_device_name(device))
    return None if key is None else roofline.DEVICES[key].hbm_bytes_s / 1e9


def _bnb():
    """``(bitsandbytes, bitsandbytes.functional)``, or ``(None, None)`` with a warning naming
    why: the benchmark then runs without its bitsandbytes rows."""
    try:
        import bitsandbytes as bnb
        import bitsandbytes.functional as bnbf
    except Exception as exc:
        warnings.warn(f"bitsandbytes not importable ({type(exc).__name__}: {exc}): no "
                      "bitsandbytes baselines (pip install datalora[bnb])", stacklevel=2)
        return None, None
    return bnb, bnbf


def _errors(steps: dict, ref: torch.Tensor) -> dict[str, float]:
    """Each step's output against the fp32 ``ref``, ``max |out - ref| / max |ref|``: every
    timed method is checked in the run to compute the same thing (target
    ``outputs_match_fp32``)."""
    return {name: rel_max_error(fn(), ref) for name, fn in steps.items()}


def _layer_ref(x, t, bias, A, B, ids, gates) -> torch.Tensor:
    """The NF4 MoLoRA layer in fp32: the weight by ``nf4.dequantize_torch`` (the torch
    reference, not the kernel a method times), the LoRA part by the per-expert loop."""
    def f(v):
        return None if v is None else v.float()
    return (torch.nn.functional.linear(f(x), nf4.dequantize_torch(t, torch.float32), f(bias))
            + loop_delta(f(x), f(A), f(B), ids, f(gates)))


def bench_dequant(shapes, dtype, device, timer):
    bnb, bnbf = _bnb()
    rows = []
    for shape in shapes:
        w = torch.randn(shape, device=device, dtype=dtype)
        t = nf4.quantize(w, 64, double_quant=True)
        steps = {"datalora": lambda t=t: nf4.dequantize(t, dtype)}
        if bnbf is not None:
            data, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True,
                                             quant_type="nf4")
            steps["bitsandbytes"] = lambda d=data, s=state: bnbf.dequantize_4bit(
                d, s, quant_type="nf4")
        moved = t.nbytes + w.numel() * w.element_size()
        errors = _errors(steps, nf4.dequantize_torch(t, torch.float32))
        for method, res in timer(steps).items():
            rows.append(dict(group="dequant", method=method, shape=list(shape),
                             gbs=moved / res["ms"] / 1e6, rel_err_vs_fp32=errors[method], **res))
    return rows


def _lora(T, K, N, E, r, k, dtype, device):
    x = torch.randn(T, K, device=device, dtype=dtype)
    A = torch.randn(E, r, K, device=device, dtype=dtype) / K**0.5
    B = torch.randn(E, N, r, device=device, dtype=dtype) / r**0.5
    ids = torch.stack([torch.randperm(E, device=device)[:k] for _ in range(T)])
    gates = torch.rand(T, k, device=device, dtype=dtype)
    return x, A, B, ids, gates


def bench_decode(cases, p, device, timer, peak):
    bnb, bnbf = _bnb()
    dtype, rows = p["dtype"], []
    for T, K, N in cases:
        lin = torch.nn.Linear(K, N, bias=False, device=device, dtype=dtype)
        base = NF4Linear.from_linear(lin, 64, double_quant=True)
        x, A, B, ids, gates = _lora(T, K, N, p["E"], p["r"], p["k"], dtype, device)
        # named by the path that runs: without the CUDA extension (or for a shape it
        # refuses) nf4_molora_linear dequantizes instead, and the HBM target is not its
        fused = fused_decode_applies(base, x, A, B, gates)
        steps = {"datalora_fused" if fused else "datalora_dequant_fallback": functools.partial(
            nf4_molora_linear, base, x, x, A, B, ids, gates, check_values=False)}
        if bnb is not None:
            q = base.weight.to_bnb()

            def bnb_peft(q=q, x=x, A=A, B=B, ids=ids, gates=gates):
                return bnb.matmul_4bit(x, q.t(), quant_state=q.quant_state) + loop_delta(
                    x, A, B, ids, gates)
            steps["bnb_matmul_4bit+peft_loop"] = bnb_peft
        wbytes = base.weight.nbytes
        errors = _errors(steps, _layer_ref(x, base.weight, None, A, B, ids, gates))
        for method, res in timer(steps).items():
            # the one-launch kernel replayed from a CUDA graph: its own time, no host work
            graph = (cuda_graph_ms(steps[method])
                     if method == "datalora_fused" and device.type == "cuda" else None)
            rows.append(dict(group="decode", method=method, T=T, d_in=K, d_out=N,
                             weight_gbs=wbytes / res["ms"] / 1e6,
                             hbm_frac=None if peak is None else wbytes / res["ms"] / 1e6 / peak,
                             graph_ms=graph,
                             hbm_frac_graph=None if peak is None or graph is None
                             else wbytes / graph / 1e6 / peak,
                             rel_err_vs_fp32=errors[method], **res))
    return rows


def bench_large_t(cases, p, device, timer):
    dtype, rows = p["dtype"], []
    for T, K, N in cases:
        lin = torch.nn.Linear(K, N, device=device, dtype=dtype)
        base = NF4Linear.from_linear(lin, 64, double_quant=True)
        x, A, B, ids, gates = _lora(T, K, N, p["E"], p["r"], p["k"], dtype, device)
        w = base.dequantize(dtype)
        layer = functools.partial(nf4_molora_linear, base, x, x, A, B, ids, gates,
                                  check_values=False)
        steps = {
            "nf4_molora": layer,
            "bf16_molora_linear": functools.partial(ops.molora_linear, x, w, lin.bias, A, B, ids,
                                                    gates, check_values=False),
        }
        if device.type == "cuda":
            steps["triton_nf4_fused"] = with_env(NF4_FUSED_ENV, layer)
        errors = _errors(steps, _layer_ref(x, base.weight, lin.bias, A, B, ids, gates))
        res = timer(steps)
        bf16_ms = res["bf16_molora_linear"]["ms"]
        for method, r in res.items():
            rows.append(dict(group="large_t", method=method, T=T, d_in=K, d_out=N,
                             ratio_vs_bf16=r["ms"] / bf16_ms, rel_err_vs_fp32=errors[method],
                             **r))
    return rows


def add_floors(rows: list[dict], device_name: str, p: dict) -> None:
    """Adds ``floor_ms`` (``benchmarks.roofline``) and ``fraction_of_floor = floor / ms``
    to every row (None on a device the model does not know)."""
    short = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[p["dtype"]]
    for row in rows:
        floor = roofline.nf4_floor_ms(device_name, row, short, p["E"], p["r"], p["k"])
        row["floor_ms"] = floor
        row["fraction_of_floor"] = None if floor is None else floor / row["ms"]
        row["floor_passes"] = (None if floor is None or row["group"] == "dequant"
                               else 1 if roofline.nf4_one_pass(row["method"]) else 2)


def check_targets(rows, preset):
    errors = [r["rel_err_vs_fp32"] for r in rows if r.get("rel_err_vs_fp32") is not None]
    tol = AGREE_TOL[PRESETS[preset]["dtype"]]
    worst, status = worst_error(errors, tol)
    out = [dict(target=f"outputs_match_fp32: every method within {tol} of the fp32 reference "
                       f"(max abs error / max abs value)", value=worst, status=status)]
    if preset != "gpu":
        return out
    for r in rows:
        decode_7b = (r["group"] == "decode" and r["T"] == 1
                     and (r["d_in"], r["d_out"]) == (4096, 14336))
        if decode_7b and r["method"] == "datalora_fused" and r["hbm_frac"] is not None:
            out.append(dict(target="decode T=1 4096x14336 >= 70% HBM", value=r["hbm_frac"],
                            status="PASS" if r["hbm_frac"] >= 0.70 else "FAIL"))
            if r.get("hbm_frac_graph") is not None:  # the kernel alone (CUDA-graph replay)
                frac = r["hbm_frac_graph"]
                out.append(dict(target="decode T=1 4096x14336 >= 70% HBM, CUDA graph",
                                value=frac, status="PASS" if frac >= 0.70 else "FAIL"))
        if decode_7b and r["method"] == "datalora_dequant_fallback":
            out.append(dict(target="decode T=1 4096x14336 >= 70% HBM", value=None,
                            status="NOT_RUN (the fused decode kernel did not run: no CUDA "
                                   "extension, see meta.extension)"))
        if r["group"] == "large_t" and r["method"] in NF4_METHODS:
            out.append(dict(target=f"large T={r['T']} {r['method']} <= 1.10x bf16 molora_linear",
                            value=r["ratio_vs_bf16"],
                            status="PASS" if r["ratio_vs_bf16"] <= 1.10 else "FAIL"))
    return out


def plot(path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(path.read_text())
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, group in zip(axes, GROUPS, strict=True):
        rows = [r for r in data["rows"] if r["group"] == group]
        labels = sorted({r["method"] for r in rows})
        keys = sorted({json.dumps(r.get("shape") or [r["T"], r["d_in"], r["d_out"]])
                       for r in rows}, key=json.loads)  # numerically: T = 1, 2, 4, .., 16
        width = 0.8 / max(len(labels), 1)
        for i, m in enumerate(labels):
            vals = []
            for key in keys:
                hit = [r for r in rows if r["method"] == m and json.dumps(
                    r.get("shape") or [r["T"], r["d_in"], r["d_out"]]) == key]
                metric = "gbs" if group == "dequant" else "ms"
                vals.append(hit[0][metric] if hit else 0.0)
            ax.bar([j + i * width for j in range(len(keys))], vals, width, label=m)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))])
        ax.set_xticklabels(keys, rotation=30, fontsize=7)
        ax.set_title(group)
        ax.set_ylabel("GB/s" if group == "dequant" else "ms (median)")
        ax.legend(fontsize=7)
    fig.suptitle(f"NF4 on {data['meta']['device_name']} ({data['meta']['date']})")
    fig.tight_layout()
    out = path.with_suffix(".png")
    save_figure(fig, out, 120)
    plt.close(fig)
    return out


def run(preset: str, out_dir: Path, device: torch.device | None = None,
        groups: tuple[str, ...] = GROUPS) -> Path:
    """Times the preset's cases of ``groups`` and writes ``nf4_<preset>.json``, rewritten
    after every group (``meta.complete`` False until the last)."""
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        raise ValueError(f"groups: expected a subset of {GROUPS}, got {unknown}")
    if not groups:
        raise ValueError(f"groups: expected at least one of {GROUPS}, got none")
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    p = PRESETS[preset]
    timer = _timer(device)
    if device.type == "cpu":
        base_timer = timer
        timer = lambda steps: base_timer(steps, p.get("budget_s", 0.5))  # noqa: E731
    meta = _metadata("gpu" if device.type == "cuda" else "cpu", device, [])
    meta.update(preset=preset, groups=list(groups), dtype=str(p["dtype"]).removeprefix("torch."),
                extension=_C_loader.available(), peak_gbs=_peak_gbs(device),
                roofline_device=(roofline.device_key(meta["device_name"])
                                 if device.type == "cuda" else None),
                bitsandbytes=getattr(_bnb()[0], "__version__", None), complete=False)
    path = out_dir / f"nf4_{preset}.json"
    partial = progress_path(path)
    benches = {"dequant": lambda: bench_dequant(p["dequant"], p["dtype"], device, timer),
               "decode": lambda: bench_decode(p["decode"], p, device, timer, _peak_gbs(device)),
               "large_t": lambda: bench_large_t(p["large_t"], p, device, timer)}
    rows = []
    for i, group in enumerate(g for g in GROUPS if g in groups):
        with torch.no_grad():
            new = benches[group]()
        if device.type == "cuda":
            add_floors(new, torch.cuda.get_device_name(device), p)
        rows += new
        # rewritten after every group: a run stopped by a time limit keeps the finished ones
        meta["complete"] = i + 1 == len(set(groups))
        atomic_write_text(path if meta["complete"] else partial,
                          json.dumps(dict(meta=meta, rows=rows,
                                          targets=check_targets(rows, preset)), indent=1))
    finish_progress(path, partial)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_nf4", description=__doc__.split("\n")[0],
        epilog="Presets differ in shapes and dtype: gpu (bf16, 4096 x 14336 layers, needs "
               "CUDA), cpu (fp32, layers up to 1024 x 2048), smoke (fp32, tiny shapes, "
               "seconds).")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None,
                    help="gpu | cpu | smoke (default: gpu with CUDA, else cpu)")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR,
                    help="output folder for nf4_<preset>.json / .png (default: "
                         "benchmarks/results in the repository)")
    ap.add_argument("--groups", nargs="+", choices=GROUPS, default=list(GROUPS),
                    help="which benchmarks to run (default: all)")
    ap.add_argument("--no-plot", action="store_true", help="skip the PNG")
    args = ap.parse_args(argv)
    preset = cli_preset(ap, args.preset)
    check_cli_out(ap, args.out)
    path = run(preset, args.out, groups=tuple(args.groups))
    data = json.loads(path.read_text())
    for r in data["rows"]:
        shape = r.get("shape") or f"T{r['T']} {r['d_in']}x{r['d_out']}"
        extra = f"{r['gbs']:.1f} GB/s" if "gbs" in r else (
            f"hbm {r['hbm_frac']:.2f}" if r.get("hbm_frac") else "")
        if r.get("fraction_of_floor") is not None:
            extra += f"  {r['fraction_of_floor']:.0%} of roofline"
        print(f"{r['group']:8s} {str(shape):22s} {r['method']:28s} {r['ms']:9.4f} ms  {extra}")
    for t in data["targets"]:
        value = "n/a" if t["value"] is None else f"{t['value']:.3f}"
        print(f"target {t['target']}: {value} {t['status']}")
    if not args.no_plot:
        write_plot(plot, path)
    print("results:", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
