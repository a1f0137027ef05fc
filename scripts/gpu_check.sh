#!/usr/bin/env bash
# The whole GPU check in one command, for a lent GPU machine (torch+CUDA, Triton, nvcc, cmake,
# ninja, scikit-build-core and pybind11 present; no network). Well under 6 minutes:
#   1. builds the extension with CUDA into its own build dir, without build isolation;
#   2. runs every CUDA- and GPU-Triton-marked test on the GPU;
#   3. runs the GPU benchmarks;
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
  if [ "$left" -le 10 ]; then echo "| $name | skipped: time budget spent | 0 s |" >>"$summary"; return 1; fi
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
if ! "$PY" -c "import pytest, hypothesis, expecttest" 2>/dev/null && [ -d gpu_wheels ]; then
  "$PY" -m pip install -q --no-index --find-links gpu_wheels pytest hypothesis expecttest >"$WORK/wheels.log" 2>&1
fi

export CMAKE_BUILD_PARALLEL_LEVEL=16
step build 200 "$PY" -m pip install --no-build-isolation --no-deps -v -e . \
  -Cbuild-dir=build/gpu-cuda -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=90
"$PY" -m aefast info --json >"$WORK/info.json" 2>&1
step tests 150 "$PY" -m pytest tests -m "cuda or gpu_triton" -q -p no:randomly --junitxml="$WORK/tests.xml"
export AEFAST_BENCH_OUT="$WORK/bench"
# Per-op benchmarks first (each a few seconds on a GPU), then the end-to-end ones.
for b in bench/bench_conv_pool.py bench/bench_unpool_deconv.py bench/bench_recon_loss.py bench/bench_optimize.py; do
  step "bench-$(basename "$b" .py)" 40 "$PY" "$b" --device cuda
done
step bench-training 90 "$PY" bench/bench_training.py --device cuda --repeats 5
cat "$WORK"/bench/*.md >>"$summary" 2>/dev/null
tar -C "$WORK" -czf "$OUT/gpu_results.tar.gz" .
echo "gpu_check: wrote $summary and $OUT/gpu_results.tar.gz"
