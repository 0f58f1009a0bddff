#!/usr/bin/env bash
# GPU part of the test + benchmark suite; everything lands in one folder.
#   benchmarks/run_gpu_suite.sh [OUT_DIR]     (default: benchmarks/results/gpu_<date>)
# Runs: the gpu-marked tests, the full gpu preset of benchmarks.molora (JSON + PNG,
# targets checked) and the pytest-benchmark tests (JSON). Needs a CUDA GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
OUT=${1:-benchmarks/results/gpu_$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"
status=0
{
  nvidia-smi || true
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
  git rev-parse HEAD 2>/dev/null || true
} > "$OUT/env.txt" 2>&1

echo "== gpu tests" | tee -a "$OUT/summary.txt"
"$PY" -m pytest tests -m gpu -q -ra -p no:xdist --junitxml="$OUT/gpu_tests.xml" \
  > "$OUT/gpu_tests.log" 2>&1 || status=1
tail -n 3 "$OUT/gpu_tests.log" | tee -a "$OUT/summary.txt"

echo "== benchmarks.molora --preset gpu" | tee -a "$OUT/summary.txt"
"$PY" -m benchmarks.molora --preset gpu --out "$OUT" > "$OUT/molora_gpu.log" 2>&1 || status=1
sed -n '/^targets/,$p' "$OUT/molora_gpu.log" | tee -a "$OUT/summary.txt"

echo "== pytest-benchmark" | tee -a "$OUT/summary.txt"
"$PY" -m pytest benchmarks -q -p no:xdist --benchmark-only \
  --benchmark-json="$OUT/pytest_benchmark.json" > "$OUT/pytest_benchmark.log" 2>&1 || status=1
tail -n 3 "$OUT/pytest_benchmark.log" | tee -a "$OUT/summary.txt"
echo "results in $OUT (exit $status)"
exit $status
