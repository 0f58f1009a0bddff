"""Roofline floors of every benchmarked op: minimum bytes, FLOPs, bound and lower-bound time.

    python -m benchmarks.roofline            # writes results/roofline.md and roofline.json

For each op and each GPU benchmark shape of ``benchmarks.molora`` (7B shapes, E/r/k
sweep, multi-tenant) and ``benchmarks.bench_nf4`` (dequant, decode T = 1..16, large T)
the model counts the bytes an ideal kernel must move between HBM and the chip and the
FLOPs it must run, and gives the lower-bound time ``max(bytes / HBM, FLOPs / peak)`` on
each device of :data:`DEVICES` (dense peaks: bf16/fp16 tensor cores; fp32 the CUDA-core
FMA rate, which the ``ieee`` Triton dots use).

What counts:

* every operand read once and every result written once per *pass*; a forward and a
  backward are separate passes (each reads its operands from HBM again) and their floors
  add up. The base weight is frozen (the benchmarks' setting): the backward computes
  ``dx`` only for it, and ``dA``/``dB`` (all E experts, as allocated) for the adapters.
* LoRA weights: only the experts the routing touches are read: ``k`` for the ``one``
  skew, ``min(E, T*k)`` for ``distinct`` and the expectation ``E * (1 - (1 - k/E)^T)``
  for ``uniform`` (k distinct random experts per token), as ``benchmarks.molora`` routes.
* routing: int64 expert ids and gates in the op dtype, ``T*k`` of each.
* ``molora_linear`` has two floors: ``floor`` (the LoRA work fused into the base GEMM,
  one pass) and ``two_pass`` (a base GEMM, then a LoRA pass that reads x again and
  reads + writes y: what cuBLAS + an in-place expand can reach at best).
* NF4 weights: 4-bit codes + uint8 absmax per 64 values + fp32 nested absmax per 256
  absmax (double quantization, as ``bench_nf4`` quantizes).

The predicted ratio to base is ``floor(op) / floor(base linear)`` on the same device and
mode (for NF4: the bf16 linear, or the bf16 ``molora_linear`` for large T). The benchmark
scripts import :func:`molora_floor_ms` / :func:`nf4_floor_ms` so every GPU row also has
``fraction_of_floor = floor / measured median`` (1.0 = at the roofline).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

RESULTS_DIR = Path(__file__).parent / "results"
SCHEMA = "datalora.benchmarks.roofline/1"
ELEMENT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
ID_BYTES = 8  # int64 expert ids


@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    hbm_bytes_s: float
    peak_flops: dict  # dtype -> FLOP/s (dense)


DEVICES = {
    "H100": Device("H100 SXM", 3.35e12, {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
    "A100": Device("A100 SXM", 2.0e12, {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}),
    # the GPU machine lent to this project: H100's SMs and peaks, faster HBM
    "H200": Device("H200 SXM", 4.8e12, {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}),
}


def device_key(device_name: str | None) -> str | None:
    """``"H100"`` / ``"A100"`` / ``"H200"`` from a CUDA device name, None if unknown."""
    for key in ("H200", "H100", "A100"):
        if device_name and key in device_name:
            return key
    return None


def _device(key: str) -> Device:
    return DEVICES[key]


@dataclasses.dataclass(frozen=True)
class Pass:
    """One kernel pass: bytes it must move to/from HBM and FLOPs it must run."""

    bytes: float
    flops: float

    def time_s(self, device: Device, dtype: str) -> float:
        return max(self.bytes / device.hbm_bytes_s, self.flops / device.peak_flops[dtype])

    def bound(self, device: Device, dtype: str) -> str:
        mem = self.bytes / device.hbm_bytes_s
        return "compute" if self.flops / device.peak_flops[dtype] > mem else "memory"


@dataclasses.dataclass(frozen=True)
class Cost:
    """Sequential passes of one op; the floor is the sum of the passes' floors."""

    passes: tuple[Pass, ...]

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.passes + other.passes)

    @property
    def bytes(self) -> float:
        return sum(p.bytes for p in self.passes)

    @property
    def flops(self) -> float:
        return sum(p.flops for p in self.passes)

    def floor_s(self, device: Device, dtype: str) -> float:
        return sum(p.time_s(device, dtype) for p in self.passes)

    def bound(self, device: Device, dtype: str) -> str:
        """Bound of the pass that takes most of the floor."""
        return max(self.passes, key=lambda p: p.time_s(device, dtype)).bound(device, dtype)


def experts_touched(T: int, E: int, k: int, skew: str = "uniform") -> float:
    """Distinct experts the routing of ``benchmarks.molora`` reaches (expected for uniform)."""
    if T == 0:
        return 0.0
    if skew == "one":
        return float(min(E, k))
    if skew == "distinct":
        return float(min(E, T * k))
    if skew == "uniform":
        return E * (1.0 - (1.0 - k / E) ** T)
    raise ValueError(f"skew: expected one of ('uniform', 'one', 'distinct'), got {skew!r}")


# ----------------------------------------------------------------------------- MoLoRA ops
def linear_cost(T, d_in, d_out, dtype="bf16", mode="fwd", bias=False) -> Cost:
    """``y = x @ W^T (+ b)``; fwd_bwd adds the ``dx = dy @ W`` pass (W frozen)."""
    s = ELEMENT_BYTES[dtype]
    fwd = Pass(s * (T * d_in + d_in * d_out + T * d_out + (d_out if bias else 0)),
               2.0 * T * d_in * d_out)
    if mode == "fwd":
        return Cost((fwd,))
    bwd = Pass(s * (T * d_out + d_in * d_out + T * d_in), 2.0 * T * d_in * d_out)
    return Cost((fwd, bwd))


def _lora_parts(T, d_in, d_out, E, r, k, skew, dtype):
    s = ELEMENT_BYTES[dtype]
    weights = s * experts_touched(T, E, k, skew) * r * (d_in + d_out)
    routing = T * k * (ID_BYTES + s)
    flops = 2.0 * T * k * r * (d_in + d_out)  # shrink + expand of the k routes
    grads = s * E * r * (d_in + d_out)  # dA, dB written for every expert
    return s, weights, routing, flops, grads


def molora_delta_cost(T, d_in, d_out, E=8, r=16, k=2, skew="uniform", dtype="bf16",
                      mode="fwd") -> Cost:
    """The LoRA part alone: ``delta = scaling * sum_j g * B[e] A[e] x`` (one pass each way).

    Backward: ``dz = B^T dy``, ``dx = A^T dh``, ``dA``, ``dB``: twice the forward FLOPs.
    """
    s, weights, routing, flops, grads = _lora_parts(T, d_in, d_out, E, r, k, skew, dtype)
    fwd = Pass(s * (T * d_in + T * d_out) + weights + routing, flops)
    if mode == "fwd":
        return Cost((fwd,))
    bwd = Pass(s * (T * d_out + 2 * T * d_in) + weights + routing + grads, 2 * flops)
    return Cost((fwd, bwd))


def molora_linear_cost(T, d_in, d_out, E=8, r=16, k=2, skew="uniform", dtype="bf16",
                       mode="fwd", fused=True) -> Cost:
    """Whole layer ``y = x W^T + delta``.

    ``fused``: the LoRA work rides in the base GEMM's passes (x, y, dy, dx moved once; the
    backward reads x once more for ``dA``). Otherwise a separate LoRA pass per direction
    reads x (dy) again and reads + writes y (dx).
    """
    s, weights, routing, flops, grads = _lora_parts(T, d_in, d_out, E, r, k, skew, dtype)
    base = linear_cost(T, d_in, d_out, dtype, mode)
    if fused:
        fwd = Pass(base.passes[0].bytes + weights + routing, base.passes[0].flops + flops)
        if mode == "fwd":
            return Cost((fwd,))
        b = base.passes[1]
        bwd = Pass(b.bytes + s * T * d_in + weights + routing + grads, b.flops + 2 * flops)
        return Cost((fwd, bwd))
    lora_fwd = Pass(s * (T * d_in + 2 * T * d_out) + weights + routing, flops)
    if mode == "fwd":
        return base + Cost((lora_fwd,))
    lora_bwd = Pass(s * (T * d_out + 3 * T * d_in) + weights + routing + grads, 2 * flops)
    return Cost((base.passes[0], lora_fwd, base.passes[1], lora_bwd))


def molora_op(method: str) -> str:
    """Op whose floor applies to a ``benchmarks.molora`` method (same math, any backend)."""
    if method == "linear":
        return "linear"
    if method.startswith("molora_delta") or method == "loop_delta":
        return "molora_delta"
    if method.startswith("molora_linear") or method in ("loop_linear", "peft_mixed"):
        return "molora_linear"
    raise ValueError(f"method: expected a benchmarks.molora method, got {method!r}")


def molora_cost(op, T, d_in, d_out, E, r, k, skew, dtype, mode, fused=True) -> Cost:
    if op == "linear":
        return linear_cost(T, d_in, d_out, dtype, mode)
    if op == "molora_delta":
        return molora_delta_cost(T, d_in, d_out, E, r, k, skew, dtype, mode)
    if op == "molora_linear":
        return molora_linear_cost(T, d_in, d_out, E, r, k, skew, dtype, mode, fused)
    raise ValueError(f"op: expected linear | molora_delta | molora_linear, got {op!r}")


def one_pass(method: str) -> bool:
    """Whether a ``benchmarks.molora`` method can reach the one-pass floor: only the fused
    kernel adds the LoRA work inside the base GEMM; the default ``molora_linear`` (cuBLAS,
    then the expand), the torch backend, the loop and PEFT run it as a second pass."""
    return molora_op(method) != "molora_linear" or method == "molora_linear[triton-fused]"


def molora_floor_ms(device_name, method, mode, dtype, T, d_in, d_out, E, r, k, skew,
                    **_) -> float | None:
    """Floor (ms) of one ``benchmarks.molora`` row on the named CUDA device (one- or
    two-pass as the method runs: :func:`one_pass`); None if the device is not modelled.
    Extra keyword arguments (the rest of a row) are ignored."""
    key = device_key(device_name)
    if key is None or dtype not in ELEMENT_BYTES:
        return None
    cost = molora_cost(molora_op(method), T, d_in, d_out, E, r, k, skew, dtype, mode,
                       fused=one_pass(method))
    return cost.floor_s(_device(key), dtype) * 1e3


# ----------------------------------------------------------------------------- NF4 ops
def nf4_weight_bytes(numel: int, blocksize: int = 64, double_quant: bool = True) -> float:
    """Packed codes + absmax (+ nested absmax, code table and offset with double quant)."""
    blocks = -(-numel // blocksize)
    if not double_quant:
        return numel / 2 + 4 * blocks
    return numel / 2 + blocks + 4 * -(-blocks // 256) + 4 * 256 + 4


def nf4_dequant_cost(N, K, dtype="bf16") -> Cost:
    """Read the NF4 weight, write it in ``dtype`` (one multiply per value)."""
    return Cost((Pass(nf4_weight_bytes(N * K) + ELEMENT_BYTES[dtype] * N * K, float(N * K)),))


def nf4_decode_cost(T, K, N, E=8, r=16, k=2, dtype="bf16", fused=True) -> Cost:
    """``y = x @ dequant(W)^T + delta`` (uniform routing): fused = one pass over W with
    the shrink and expand inside (what ``csrc/`` launches); otherwise the shrink is its own
    pass writing fp32 ``z [T, k, r]``, which the GEMV + expand pass reads."""
    s = ELEMENT_BYTES[dtype]
    touched = experts_touched(T, E, k, "uniform")
    routing = T * k * (ID_BYTES + s)
    gemv = Pass(nf4_weight_bytes(N * K) + s * (T * K + T * N) + s * touched * r * N + routing,
                2.0 * T * K * N + 2.0 * T * k * r * N)
    shrink_bytes = s * (T * K + touched * r * K) + routing
    shrink_flops = 2.0 * T * k * r * K
    if fused:
        return Cost((Pass(gemv.bytes + shrink_bytes - s * T * K - routing,
                          gemv.flops + shrink_flops),))
    z = 4.0 * T * k * r
    return Cost((Pass(shrink_bytes + z, shrink_flops),
                 Pass(gemv.bytes + z, gemv.flops)))


def nf4_large_t_cost(T, K, N, E=8, r=16, k=2, dtype="bf16", fused=True) -> Cost:
    """NF4 ``molora_linear``: fused = dequantized tiles feed the GEMM (W read as 4 bit);
    otherwise dequantize to a workspace first, then the bf16 fused layer."""
    s = ELEMENT_BYTES[dtype]
    bf16 = molora_linear_cost(T, K, N, E, r, k, "uniform", dtype).passes[0]
    if fused:
        return Cost((Pass(bf16.bytes - s * K * N + nf4_weight_bytes(N * K), bf16.flops),))
    return nf4_dequant_cost(N, K, dtype) + Cost((bf16,))


def nf4_op_cost(group, T, K, N, E, r, k, dtype, fused=True) -> Cost:
    if group == "dequant":
        return nf4_dequant_cost(N, K, dtype)
    if group == "decode":
        return nf4_decode_cost(T, K, N, E, r, k, dtype, fused)
    if group == "large_t":
        return nf4_large_t_cost(T, K, N, E, r, k, dtype, fused)
    raise ValueError(f"group: expected dequant | decode | large_t, got {group!r}")


def nf4_floor_ms(device_name, row: dict, dtype: str, E: int, r: int, k: int) -> float | None:
    """Floor (ms) of one ``bench_nf4`` row: dequant rows have ``shape [N, K]``; the others
    ``T, d_in, d_out``. Every method of a group computes the same op; the fused kernels
    (:func:`nf4_one_pass`) get its one-pass floor, the others (dequantize + GEMM + delta,
    the bitsandbytes baseline) the two-pass one, and ``bf16_molora_linear`` of ``large_t``
    the bf16 layer's two-pass floor (cuBLAS, then the expand)."""
    key = device_key(device_name)
    if key is None:
        return None
    dev = _device(key)
    if row["group"] == "dequant":
        N, K = row["shape"]
        return nf4_dequant_cost(N, K, dtype).floor_s(dev, dtype) * 1e3
    T, K, N = row["T"], row["d_in"], row["d_out"]
    if row["group"] == "large_t" and row["method"] == "bf16_molora_linear":
        cost = molora_linear_cost(T, K, N, E, r, k, "uniform", dtype, fused=False)
    else:
        cost = nf4_op_cost(row["group"], T, K, N, E, r, k, dtype,
                           fused=nf4_one_pass(row["method"]))
    return cost.floor_s(dev, dtype) * 1e3


def nf4_one_pass(method: str) -> bool:
    """Whether a ``bench_nf4`` method runs as one fused pass over the weight."""
    return method in ("datalora_fused", "triton_nf4_fused")


# ----------------------------------------------------------------------------- tables
def _device_cols(cost: Cost, base: Cost | None, dtype: str, two_pass: Cost | None) -> dict:
    out = {}
    for key, dev in DEVICES.items():
        floor = cost.floor_s(dev, dtype)
        out[key] = dict(bound=cost.bound(dev, dtype), floor_us=floor * 1e6,
                        ratio_to_base=None if base is None else floor / base.floor_s(dev, dtype),
                        two_pass_ratio_to_base=None if two_pass is None or base is None
                        else two_pass.floor_s(dev, dtype) / base.floor_s(dev, dtype))
    return out


def molora_rows(preset: str = "gpu") -> list[dict]:
    from benchmarks.molora import MODES, PRESETS

    dtype = str(PRESETS[preset]["dtype"]).removeprefix("torch.").replace("bfloat16", "bf16")
    dtype = {"float16": "fp16", "float32": "fp32"}.get(dtype, dtype)
    rows = []
    for case in PRESETS[preset]["cases"]:
        shape = dict(T=case.T, d_in=case.d_in, d_out=case.d_out, E=case.E, r=case.r, k=case.k,
                     skew=case.skew)
        for mode in MODES:
            base = linear_cost(case.T, case.d_in, case.d_out, dtype, mode)
            for op in ("linear", "molora_linear", "molora_delta"):
                cost = molora_cost(op, **shape, dtype=dtype, mode=mode)
                two = (molora_cost(op, **shape, dtype=dtype, mode=mode, fused=False)
                       if op == "molora_linear" else None)
                rows.append(dict(bench="molora", group=case.group, case=case.id, op=op,
                                 mode=mode, dtype=dtype, **shape, bytes=cost.bytes,
                                 flops=cost.flops, passes=len(cost.passes),
                                 devices=_device_cols(cost, base, dtype, two)))
    return rows


def nf4_rows(preset: str = "gpu") -> list[dict]:
    from benchmarks.bench_nf4 import PRESETS

    p = PRESETS[preset]
    dtype = "bf16"
    E, r, k = p["E"], p["r"], p["k"]
    rows = []
    for N, K in p["dequant"]:
        cost = nf4_dequant_cost(N, K, dtype)
        rows.append(dict(bench="nf4", group="dequant", op="nf4_dequant", T=None, d_in=K,
                         d_out=N, dtype=dtype, bytes=cost.bytes, flops=cost.flops, passes=1,
                         base="none", devices=_device_cols(cost, None, dtype, None)))
    for group, cases, base_name in (("decode", p["decode"], "bf16 linear"),
                                    ("large_t", p["large_t"], "bf16 molora_linear")):
        for T, K, N in cases:
            cost = nf4_op_cost(group, T, K, N, E, r, k, dtype)
            two = nf4_op_cost(group, T, K, N, E, r, k, dtype, fused=False)
            base = (linear_cost(T, K, N, dtype) if group == "decode"
                    else molora_linear_cost(T, K, N, E, r, k, "uniform", dtype))
            rows.append(dict(bench="nf4", group=group, op=f"nf4_{group}", T=T, d_in=K, d_out=N,
                             E=E, r=r, k=k, dtype=dtype, bytes=cost.bytes, flops=cost.flops,
                             passes=1, base=base_name,
                             devices=_device_cols(cost, base, dtype, two)))
    return rows


def _fmt(v, spec):
    return "–" if v is None else format(v, spec)


def _table(rows, two_pass: bool) -> list[str]:
    """Markdown rows: each modelled device's floor and ratio to the base (the one-pass
    floor; ``two_pass`` adds the two-pass ratio), H100's bound kind."""
    devices = [d for d in ("H100", "H200", "A100") if d in rows[0]["devices"]] if rows else []
    head = "| shape | op | mode | MB | GFLOP | bound H100 |"
    sep = "|---|---|---|--:|--:|---|"
    for d in devices:
        head += f" floor {d} µs | ratio {d} |"
        sep += "--:|--:|"
    if two_pass:
        head += "".join(f" 2-pass {d} |" for d in devices)
        sep += "--:|" * len(devices)
    lines = [head, sep]
    for row in rows:
        if row["bench"] == "molora":
            shape = (f"T={row['T']} {row['d_in']}x{row['d_out']} E={row['E']} r={row['r']} "
                     f"k={row['k']} {row['skew']}")
        else:
            shape = (f"{row['d_out']}x{row['d_in']}" if row["T"] is None
                     else f"T={row['T']} {row['d_in']}x{row['d_out']}")
        line = (f"| {shape} | {row['op']} | {row.get('mode', 'fwd')} | {row['bytes'] / 1e6:.2f} |"
                f" {row['flops'] / 1e9:.3f} | {row['devices']['H100']['bound']} |")
        for d in devices:
            cost = row["devices"][d]
            line += f" {cost['floor_us']:.2f} | {_fmt(cost['ratio_to_base'], '.3f')} |"
        if two_pass:
            line += "".join(f" {_fmt(row['devices'][d]['two_pass_ratio_to_base'], '.3f')} |"
                            for d in devices)
        lines.append(line)
    return lines


def render_markdown(data: dict) -> str:
    devs = ", ".join(f"{d['name']}: HBM {d['hbm_bytes_s'] / 1e12:.2f} TB/s, bf16 "
                     f"{d['peak_flops']['bf16'] / 1e12:.0f} TFLOP/s"
                     for d in data["devices"].values())
    out = [
        "# Roofline floors of the GPU benchmark shapes",
        "",
        "Generated by `python -m benchmarks.roofline` (model and assumptions: docstring of",
        f"`benchmarks/roofline.py`). Devices: {devs}. bf16 throughout.",
        "",
        "*floor* = lower-bound time, sum over passes of max(bytes / HBM, FLOPs / peak);",
        "*ratio* = floor / floor of the base linear (same shape, mode, device); for",
        "`molora_linear` *2-pass* is the floor when the LoRA work runs as its own pass",
        "after the base GEMM (reads x and reads + writes y again) instead of fused into it.",
        "fwd_bwd: base weight frozen (dx only), adapters trained.",
        "",
    ]
    sections = [("7B shapes, ratio vs T (`benchmarks.molora`, group T_sweep)", "T_sweep"),
                ("E / r / k / skew sweep at T = d = 4096 (group sweep)", "sweep"),
                ("Multi-tenant k = 1 (group tenant)", "tenant")]
    for title, group in sections:
        rows = [r for r in data["rows"] if r["bench"] == "molora" and r["group"] == group]
        out += [f"## {title}", ""] + _table(rows, two_pass=True) + [""]
    out += ["## NF4 (`benchmarks.bench_nf4`, double-quantized, blocksize 64, E=8 r=16 k=2)",
            "", "dequant: ratio n/a; decode: ratio vs the bf16 linear of the same shape "
            "(2-pass = the shrink as its own launch; `csrc/` runs the fused one); large_t: "
            "ratio vs the bf16 fused `molora_linear` (2-pass = dequantize to a workspace, then "
            "the bf16 layer).", ""]
    out += _table([r for r in data["rows"] if r["bench"] == "nf4"], two_pass=True) + [""]
    return "\n".join(out)


def build(preset: str = "gpu") -> dict:
    return dict(schema=SCHEMA, devices={k: dataclasses.asdict(v) for k, v in DEVICES.items()},
                rows=molora_rows(preset) + nf4_rows(preset))


def write(out_dir: Path = RESULTS_DIR) -> tuple[Path, Path]:
    """Writes ``roofline.json`` and ``roofline.md`` to ``out_dir``, each atomically."""
    from datalora.io import atomic_write_text

    data = build()
    js, md = out_dir / "roofline.json", out_dir / "roofline.md"
    atomic_write_text(js, json.dumps(data, indent=1) + "\n")
    atomic_write_text(md, render_markdown(data))
    return md, js


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.roofline",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=RESULTS_DIR,
                    help="output folder (default: benchmarks/results in the repository)")
    args = ap.parse_args(argv)
    from benchmarks.molora import check_cli_out

    check_cli_out(ap, args.out)
    for path in write(args.out):
        print("wrote", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
