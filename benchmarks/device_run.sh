#!/usr/bin/env bash
# The whole GPU check as one call of the device tool (a bare H100/H200 machine with
# Python 3.12, torch, Triton, transformers, peft and nvcc but no bitsandbytes and no
# network; at most 10 minutes a call, 8 files back from $OUT):
#   1. installs the wheels carried in .whl/ (bitsandbytes for the NF4 baselines),
#   2. builds datalora in place (`pip install -e .`, the CUDA extension for
#      DATALORA_CUDA_ARCHS, default 90); when that build fails, installs it without the
#      extension (the Triton benchmarks still run; the suite's extension step fails),
#   3. runs benchmarks/run_gpu_suite.sh (each step under its own limit) under
#      SUITE_TIMEOUT seconds, by default what is left of DEVICE_LIMIT_S (590, the call's
#      timeout_s) minus 40 s for packing, so the results always come back,
#   4. packs every result into $OUT/gpu_results.tgz and copies summary.txt beside it; also
#      every 20 s while the suite runs and on exit, so a call killed from outside (its
#      timeout_s shorter than DEVICE_LIMIT_S) still brings back what had finished.
#
# Prepare once on the CPU machine, in the repo root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl setuptools==84.2.1
# (setuptools >= 77 reads pyproject's SPDX license; the machine's own may be older)
# then call the device tool's run with command
#   "DATALORA_GIT_COMMIT=<git rev-parse HEAD> DEVICE_LIMIT_S=<timeout_s> bash benchmarks/device_run.sh"
# (the machine's copy has no .git, or the session start's: the JSON files record this
# commit), carry [".whl"] and timeout_s at most 590 (the same as DEVICE_LIMIT_S); unpack with
#   mkdir -p benchmarks/results/gpu_<device> && tar xzf gpu_results.tgz -C benchmarks/results/gpu_<device>
# SKIP_STEPS (run_gpu_suite.sh) skips steps; default "tle pytest_bench" (tle pretrains the
# tiny base on the CPU first: minutes of a 15-minute lease).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/datalora_device_out}
RESULTS=${RESULTS:-/tmp/datalora_gpu_results}
rm -rf "$RESULTS"  # a warm machine keeps the last call's files: report this call's only
mkdir -p "$OUT" "$RESULTS"
PY=${PYTHON:-python3}
pack() {  # $RESULTS -> $OUT/gpu_results.tgz (+ summary.txt), replaced whole
  tar czf "$OUT/gpu_results.tgz.part" -C "$RESULTS" . 2> /dev/null &&
    mv -f "$OUT/gpu_results.tgz.part" "$OUT/gpu_results.tgz"
  cp "$RESULTS/summary.txt" "$OUT/" 2> /dev/null
  return 0
}
trap pack EXIT

if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export DATALORA_CUDA_ARCHS=${DATALORA_CUDA_ARCHS:-90}
install() { "$PY" -m pip install -q --no-deps --no-build-isolation -e . >> "$OUT/install.log" 2>&1; }
if ! install; then
  echo "install with the CUDA extension failed (install.log); retrying without it"
  tail -n 20 "$OUT/install.log"
  DATALORA_BUILD_CUDA=0 install || { tail -n 40 "$OUT/install.log"; exit 1; }
fi

export PYTHON=$PY PYTHONUNBUFFERED=1 SKIP_STEPS=${SKIP_STEPS:-tle pytest_bench}
SUITE_TIMEOUT=${SUITE_TIMEOUT:-$(( ${DEVICE_LIMIT_S:-590} - SECONDS - 40 ))}
echo "install done after ${SECONDS} s; suite limit ${SUITE_TIMEOUT} s"
if (( SUITE_TIMEOUT < 30 )); then  # too little left: pack what there is, within the call
  echo "no time left for the suite after the install" | tee -a "$RESULTS/summary.txt"
  rc=1
else
  # short sleeps, no terminal: once killed, it leaves no process holding the call's output
  (exec > /dev/null 2>&1; n=0; while sleep 1; do (( ++n % 20 )) || pack; done) &
  PACKER=$!
  timeout --kill-after=10 "$SUITE_TIMEOUT" bash benchmarks/run_gpu_suite.sh "$RESULTS"
  rc=$?
  kill "$PACKER" 2> /dev/null
  wait "$PACKER" 2> /dev/null
fi
[ "$rc" -eq 124 ] && echo "run_gpu_suite.sh stopped after ${SUITE_TIMEOUT} s" \
  | tee -a "$RESULTS/summary.txt"
pack
cat "$RESULTS/summary.txt" 2>/dev/null
exit "$rc"
