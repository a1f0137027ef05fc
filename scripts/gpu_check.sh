#!/usr/bin/env bash
# The whole GPU check in ONE device call, inside 6 minutes; or its dry run on this GPU-less machine.
#
#   scripts/gpu_check.sh             on a lent GPU (device tool: run, carry=["gpu_wheels"], timeout_s=420)
#   scripts/gpu_check.sh --dry-run   every step on CPU: CPU build, collection of the GPU tests, the
#                                    benchmark suite with --quick (CI runs this and verifies the summary)
#
# Steps, in this order (each one's status, time and log tail go into $OUT/summary.md):
#   environment   header line: GPU, driver, torch, date
#   wheels        test packages missing from the image (expecttest) from gpu_wheels/ (made here by
#                 scripts/fetch_gpu_wheels.sh), pip --no-index --no-deps into a private folder
#   build         pip install -e with editable.rebuild=false (no rebuild at import), its own build dir
#                 build/gpu-cuda, CMAKE_CUDA_ARCHITECTURES=90. Dry run: the same build as a wheel, in
#                 the editable install's build dir (incremental), not installed (that would rewire
#                 the developer's editable install).
#                 A failed build skips every GPU step (said so in the summary).
#   bench-fp32, bench-bf16     bench/suite on CUDA, aefast against eager (cudnn.benchmark=True),
#                 time-capped: the figures come back even if the tests below fail or hang
#   tests         pytest -m "cuda or gpu_triton" (dry run: --co, collection only)
#   compile-fp32, compile-bf16 the torch.compile(mode="max-autotune") cases of the same workloads
#   tables        each precision's ratio table (aefast, eager, compile side by side) from the rows
#                 that every case streamed as it finished (a capped run keeps what it measured)
# $OUT gets two files: summary.md and gpu_results.tar.gz (logs, junit XML, JSONL/markdown/JSON results,
# environment). Commit them with scripts/gpu_results_commit.sh <the reply's files_at folder>.
set -uo pipefail
cd "$(dirname "$0")/.."
. scripts/_python.sh

DRY=0
case "${1:-}" in
  --dry-run) DRY=1 ;;
  "") ;;
  *) sed -n '2,26p' "$0"; exit 2 ;;
esac
PY="$(aefast_python)"
if [ "$DRY" = 1 ]; then
  OUT="${OUT:-$PWD/out/gpu-check-dry}"
  BUDGET_S=${GPU_CHECK_BUDGET_S:-3000}  # CPU: no device clock to beat; a hang still ends
else
  OUT="${OUT:-$PWD/out/gpu-check}"
  BUDGET_S=${GPU_CHECK_BUDGET_S:-330}   # under 6 minutes with the tarball and the device tool's transfers
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA GPU here (torch.cuda.is_available() is False); use --dry-run" >&2
    exit 2
  fi
fi
mkdir -p "$OUT"
WORK="$(mktemp -d)"
# Every folder a step writes into exists before the step starts (pytest-benchmark opens its
# --benchmark-json file while parsing arguments, before any fixture could make the folder).
mkdir -p "$WORK/logs" "$WORK/bench/eager" "$WORK/bench/compile" "$WORK/tests" "$WORK/site"
summary="$OUT/summary.md"
T0=$(date +%s)
BUILD_OK=0

elapsed() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( BUDGET_S - $(elapsed) )); }

section() {  # section NAME STATUS [SECONDS]: the heading and status line of one step
  printf '\n## %s\nstatus: %s\n' "$1" "$2" >>"$summary"
  [ -n "${3:-}" ] && printf 'time: %s s (at %s s of %s)\n' "$3" "$(elapsed)" "$BUDGET_S" >>"$summary"
  return 0
}

skip() {  # skip NAME WHY
  section "$1" "skipped: $2"
}

step() {  # step NAME LIMIT_S CMD...: runs CMD with a time limit, logs to $WORK/logs/NAME.log
  local name=$1 limit=$2; shift 2
  local remaining; remaining=$(left)
  if [ "$remaining" -le 10 ] || [ "$limit" -le 0 ]; then
    skip "$name" "time budget spent ($(elapsed) s of $BUDGET_S)"; return 1
  fi
  [ "$limit" -gt "$remaining" ] && limit=$remaining
  local t0 rc status log="$WORK/logs/$name.log"
  t0=$(date +%s)
  echo "\$ $*" >"$log"
  timeout -k 10 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  case $rc in
    0) status="ok" ;;
    124|137) status="TIMEOUT after $limit s (rc=$rc): the rows streamed so far are kept" ;;
    *) status="FAILED (rc=$rc)" ;;
  esac
  section "$name" "$status" "$(( $(date +%s) - t0 ))"
  { echo '```'; tail -n 12 "$log"; echo '```'; } >>"$summary"
  return $rc
}

# ---------------------------------------------------------------- environment
: >"$summary"
if "$PY" scripts/gpu_check_summary.py env "$WORK/environment.json" $([ "$DRY" = 1 ] && echo --dry-run) \
    >"$WORK/header.txt" 2>"$WORK/logs/environment.log"; then
  cat "$WORK/header.txt" >"$summary"
  env_status=ok
else
  echo "# aefast GPU check: environment unreadable (see logs/environment.log)" >"$summary"
  env_status="FAILED (rc=1)"
fi
section environment "$env_status" 0
{
  echo "mode: $([ "$DRY" = 1 ] && echo 'dry run on CPU' || echo GPU); python: $PY; budget: $BUDGET_S s"
  if [ "$DRY" = 0 ]; then
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>&1
    nvidia-smi >"$WORK/nvidia-smi.txt" 2>&1
  fi
  echo '```'; cat "$WORK/environment.json" 2>/dev/null; echo; echo '```'
} >>"$summary"

# ---------------------------------------------------------------- wheels
# The image lacks expecttest (and a future image may lack more): install only what is missing,
# from the cp312 wheels carried in gpu_wheels/, without the network and without their deps.
missing=$("$PY" - <<'EOF'
import importlib.util
need = {"pytest": "pytest", "hypothesis": "hypothesis", "expecttest": "expecttest",
        "pytest_benchmark": "pytest-benchmark", "cpuinfo": "py-cpuinfo", "pygments": "pygments"}
print(" ".join(dist for mod, dist in need.items() if importlib.util.find_spec(mod) is None))
EOF
)
wheels=(gpu_wheels/*.whl)
if [ -n "$missing" ] || { [ "$DRY" = 1 ] && [ -e "${wheels[0]}" ]; }; then
  if [ -e "${wheels[0]}" ]; then
    # (dry run: the same install into the private folder, to prove the wheels install; not put on the path)
    step wheels 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$WORK/site" "${wheels[@]}" \
      && [ "$DRY" = 0 ] && export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
    echo "missing from the image: ${missing:-none}; carried: $(cd gpu_wheels && ls *.whl | tr '\n' ' ')" >>"$summary"
  else
    section wheels "FAILED (rc=1)" 0
    echo "missing: $missing, and no gpu_wheels/ was carried (run scripts/fetch_gpu_wheels.sh here, carry gpu_wheels)" >>"$summary"
  fi
else
  section wheels ok 0
  echo "every test package is installed; nothing to install" >>"$summary"
fi

# ---------------------------------------------------------------- build
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
if [ "$DRY" = 1 ]; then
  mkdir -p "$WORK/wheel"
  # The editable install's own build dir: the same flags, so only what changed rebuilds (CI ran a
  # full second build in a dir of its own: ~4 min quiet, 16 min loaded), and the wheel is built, not
  # installed, so the editable install stays as it was.
  step build 1200 "$PY" -m pip wheel --no-build-isolation --no-deps -v . -w "$WORK/wheel" \
    "-Cbuild-dir=build/{wheel_tag}" && BUILD_OK=1
else
  # sm_90 only (H100/H200): torch's CMake config compiles the archs of TORCH_CUDA_ARCH_LIST, which an
  # image may set for itself (CMakeLists.txt maps CMAKE_CUDA_ARCHITECTURES onto it when it is unset).
  step build 200 env TORCH_CUDA_ARCH_LIST=9.0 "$PY" -m pip install --no-build-isolation --no-deps -v -e . \
    -Cbuild-dir=build/gpu-cuda -Ceditable.rebuild=false -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=90 \
    && "$PY" -c "import aefast, sys; sys.exit(0 if aefast.BUILD_INFO['cuda'] else 1)" >>"$WORK/logs/build.log" 2>&1 \
    && BUILD_OK=1
  [ "$BUILD_OK" = 1 ] || echo "BUILD FAILED (or built without CUDA kernels): every GPU step below is skipped" >>"$summary"
fi
"$PY" -m aefast info --json >"$WORK/info.json" 2>&1

# ---------------------------------------------------------------- benchmarks and tests
# The GPU workloads of bench/suite: every model workload (training step and inference; G1/G2
# when bench/workloads.py has them), the encoder and decoder blocks forward+backward ("full"),
# and two losses. The whole suite's max-autotune compiles do not fit the budget;
# `./dev bench --device cuda` runs it all.
SUITE_K="model or full or mse/mean or bce_logits/none"
if [ "$DRY" = 1 ]; then
  SUITE_K="W1-tiny or mse/mean"  # CI time: a model and a loss exercise every step's machinery
  SUITE=("$PY" -m pytest bench/suite --quick --rounds 1 -q -p no:randomly)
  COMPILE_OPTS=(--compile-backend aot_eager)  # CPU: capture + AOT autograd, not minutes of inductor
  TESTS=("$PY" -m pytest tests -m "cuda or gpu_triton" --co -q -p no:randomly)
else
  # 5 timed rounds (the suite's default is 15 per op, 7 per model): more cases within the budget
  SUITE=("$PY" -m pytest bench/suite --device cuda --rounds 5 -q -p no:randomly)
  COMPILE_OPTS=()  # the suite's CUDA default: inductor, mode="max-autotune"
  TESTS=("$PY" -m pytest tests -m "cuda or gpu_triton" -q -p no:randomly --junitxml="$WORK/tests/junit.xml")
  if "$PY" -c "import xdist" 2>/dev/null; then TESTS+=(-n 8); fi  # Triton compiles are CPU-bound
fi

bench() {  # bench STEP PRECISION PHASE LIMIT_S
  local name=$1 precision=$2 phase=$3 limit=$4 sel extra=()
  if [ "$phase" = eager ]; then sel="($SUITE_K) and not compile"; else sel="($SUITE_K) and compile"; extra=("${COMPILE_OPTS[@]}"); fi
  step "$name" "$limit" "${SUITE[@]}" --autocast "$precision" -k "$sel" "${extra[@]}" \
    --bench-out "$WORK/bench/$phase" --benchmark-json="$WORK/bench/$phase/pytest_benchmark_$precision.json"
}

if [ "$BUILD_OK" = 1 ]; then
  reserve=15  # the tables and the tarball
  avail=$(( $(left) - reserve ))
  bench bench-fp32 fp32 eager $(( avail * 20 / 100 ))
  bench bench-bf16 bf16 eager $(( avail * 15 / 100 ))
  avail=$(( $(left) - reserve ))
  step tests $(( avail * 45 / 100 )) "${TESTS[@]}"
  avail=$(( $(left) - reserve ))
  bench compile-fp32 fp32 compile $(( avail / 2 ))
  bench compile-bf16 bf16 compile $(( $(left) - reserve ))
else
  for s in bench-fp32 bench-bf16 tests compile-fp32 compile-bf16; do skip "$s" "the build failed"; done
fi

# ---------------------------------------------------------------- tables, files
if "$PY" scripts/gpu_check_summary.py tables "$WORK/bench" >"$WORK/tables.md" 2>"$WORK/logs/tables.log"; then
  section tables ok
else
  section tables "FAILED (rc=1)"
fi
cat "$WORK/tables.md" >>"$summary"
cp "$summary" "$WORK/summary.md"
tar -C "$WORK" --exclude=./wheel --exclude=./site -czf "$OUT/gpu_results.tar.gz" .  # (not the dry run's wheel)
printf '\n%s\n' "files: summary.md, gpu_results.tar.gz ($(du -h "$OUT/gpu_results.tar.gz" | cut -f1)); total $(elapsed) s" >>"$summary"
echo "gpu_check: wrote $summary and $OUT/gpu_results.tar.gz in $(elapsed) s"
rm -rf "$WORK"
