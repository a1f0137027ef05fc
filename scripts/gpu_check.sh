#!/usr/bin/env bash
# The whole GPU check in one command, for a lent GPU machine (torch+CUDA, Triton, nvcc, cmake,
# ninja, scikit-build-core and pybind11 present; no network). Well under 6 minutes:
#   1. builds the extension with CUDA into its own build dir, without build isolation;
#   2. runs every CUDA- and GPU-Triton-marked test on the GPU;
#   3. runs the benchmark suite (bench/suite, pytest-benchmark) on the GPU against eager with
#      cudnn.benchmark=True and torch.compile(mode="max-autotune"), fp32 then bf16 autocast;
#   4. writes logs and JSON to $OUT (a summary plus one tarball: the device tool returns few files).
# Without a GPU it says so and exits 0.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT="${OUT:-$PWD/out/gpu}"
mkdir -p "$OUT"
WORK="$(mktemp -d)"
summary="$OUT/summary.md"

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); nothing to check." | tee "$summary"
  exit 0
fi

BUDGET_S=${GPU_CHECK_BUDGET_S:-330}  # the whole check stays under 6 minutes
T0=$(date +%s)
step() {  # step NAME TIMEOUT_S CMD...: runs with a time limit, logs to $WORK/NAME.log
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET_S - ($(date +%s) - T0) ))
  # (a limit of 0 would mean none to timeout(1): skipped too)
  if [ "$left" -le 10 ] || [ "$limit" -le 0 ]; then
    echo "| $name | skipped: time budget spent | 0 s |" >>"$summary"; return 1
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local t0=$(date +%s)
  timeout "$limit" "$@" >"$WORK/$name.log" 2>&1
  local rc=$?
  echo "| $name | rc=$rc | $(( $(date +%s) - t0 )) s |" >>"$summary"
  tail -n 5 "$WORK/$name.log" | sed 's/^/    /' >>"$summary"
  return $rc
}

{
  echo "# aefast GPU check, $(date -u +%F)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  echo
  echo "| step | status | time |"
  echo "|---|---|---|"
} >"$summary"
nvidia-smi >"$WORK/nvidia-smi.txt" 2>&1

# Test-only packages may be missing there; ./scripts/fetch_gpu_wheels.sh stores them in gpu_wheels/.
if ! "$PY" -c "import pytest, hypothesis, expecttest, pytest_benchmark" 2>/dev/null && [ -d gpu_wheels ]; then
  "$PY" -m pip install -q --no-index --find-links gpu_wheels pytest hypothesis expecttest pytest-benchmark \
    >"$WORK/wheels.log" 2>&1
fi

export CMAKE_BUILD_PARALLEL_LEVEL=16
step build 200 "$PY" -m pip install --no-build-isolation --no-deps -v -e . \
  -Cbuild-dir=build/gpu-cuda -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=90
"$PY" -m aefast info --json >"$WORK/info.json" 2>&1
step tests 150 "$PY" -m pytest tests -m "cuda or gpu_triton" -q -p no:randomly --junitxml="$WORK/tests.xml"
export AEFAST_BENCH_OUT="$WORK/bench"
# The benchmark suite against eager with cudnn.benchmark=True and torch.compile(mode="max-autotune")
# (both the suite's defaults with --device cuda), fp32 then bf16 autocast; every environment line
# names GPU, driver, torch and date. Each case appends its row to
# $AEFAST_BENCH_OUT/suite_cuda_<precision>.jsonl as it finishes and the torch.compile cases run
# after all the others, so a run this budget cuts short keeps every aefast-vs-eager figure and
# as many compiled ones as fitted; the tables below name the cases not reached.
# The selection: every model workload (training step, inference), the encoder and decoder blocks
# forward+backward, and two losses. The whole suite's 68 max-autotune compiles do not fit 330 s;
# `./dev bench --device cuda` runs it all.
SUITE_K="model or full or mse/mean or bce_logits/none"
left=$(( BUDGET_S - ($(date +%s) - T0) - 20 ))  # 20 s kept for the tables and the tarball
step bench-suite-fp32 $(( left * 55 / 100 )) "$PY" -m pytest bench/suite --device cuda -k "$SUITE_K" -q \
  -p no:randomly --benchmark-json="$WORK/bench/suite_cuda_fp32_pytest_benchmark.json"
left=$(( BUDGET_S - ($(date +%s) - T0) - 20 ))
step bench-suite-bf16 "$left" "$PY" -m pytest bench/suite --device cuda --autocast bf16 -k "$SUITE_K" -q \
  -p no:randomly --benchmark-json="$WORK/bench/suite_cuda_bf16_pytest_benchmark.json"
# The tables again from the streamed rows: a run killed by its limit never wrote its own.
"$PY" bench/suite/_suite.py "$WORK"/bench/suite_cuda_*.jsonl >"$WORK/bench-tables.log" 2>&1
cat "$WORK"/bench/*.md >>"$summary" 2>/dev/null
tar -C "$WORK" -czf "$OUT/gpu_results.tar.gz" .
echo "gpu_check: wrote $summary and $OUT/gpu_results.tar.gz"
