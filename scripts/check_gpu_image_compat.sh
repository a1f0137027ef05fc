#!/usr/bin/env bash
# Builds and tests aefast here, on CPU, against the GPU image's PyTorch and Triton (the device tool's
# KINDS.md: torch 2.11.0+cu130, triton 3.6.0), which the rest of this project never sees: ./dev and CI
# use torch 2.13.0 and triton 3.9.0. A lent GPU's check (scripts/gpu_check.sh) builds against the
# image's torch; an API that only the newer torch has fails that build and wastes the lent minutes
# (2026-12-07: torch 2.13 keeps autograd nodes in c10::intrusive_ptr, 2.11 in std::shared_ptr, and every
# *_autograd.cpp failed to compile against 2.11). Run it after C++ or Triton changes, before a device
# session; not part of CI (it downloads ~4 GB of CUDA wheels and builds for ~10 min on 2 cores).
#
# Steps (a folder per run under $COMPAT, default /tmp/aefast-gpu-image-compat):
#   1. a virtual environment with torch==$TORCH_PIN (the cu130 wheel from PyPI, with its CUDA wheels, which
#      pull in triton==3.6.0) and the test dependencies;
#   2. the gpu_check build: pip install -e with CUDA for sm_90 (TORCH_CUDA_ARCH_LIST=9.0), in build/gpu-image;
#      nvrtc from the CUDA wheels (this machine's toolkit has nvcc but no libnvrtc);
#   3. the Triton AOT gate with triton 3.6 over a recording of the Triton tests (one specialization
#      per kernel, operand dtypes, activation and precision), for sm_80 and sm_90;
#   4. the test suite (CPU and the Triton interpreter of 3.6), unless --no-tests.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_PIN=${TORCH_PIN:-2.11.0}
COMPAT=${COMPAT:-/tmp/aefast-gpu-image-compat}
RUN_TESTS=1
[ "${1:-}" = "--no-tests" ] && RUN_TESTS=0
mkdir -p "$COMPAT"
VPY="$COMPAT/venv/bin/python"
if [ ! -x "$VPY" ]; then
  python3 -m venv "$COMPAT/venv"
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$VPY" -m pip install -q "torch==$TORCH_PIN" numpy scikit-build-core pybind11 cmake ninja scipy tqdm scikit-learn \
  matplotlib pytest pytest-xdist hypothesis pytest-benchmark expecttest onnx onnxscript onnxruntime
"$VPY" -c "import torch, triton; print('compat: torch', torch.__version__, 'triton', triton.__version__)"
NVRTC=$("$VPY" -c "import glob, os, nvidia; print((glob.glob(os.path.join(nvidia.__path__[0], 'cu*', 'lib', 'libnvrtc.so.*')) + [''])[0])")
echo "compat: build (CUDA for sm_90)"
env -u VIRTUAL_ENV TORCH_CUDA_ARCH_LIST=9.0 CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$VPY" -m pip install -q \
  --no-build-isolation --no-deps -e . -Cbuild-dir=build/gpu-image -Ceditable.rebuild=false \
  -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=90 ${NVRTC:+-Ccmake.define.CUDA_nvrtc_LIBRARY=$NVRTC}
"$VPY" -c "import aefast; assert aefast.BUILD_INFO['cuda'], aefast.BUILD_INFO; print('compat: built', aefast.BUILD_INFO)"
echo "compat: Triton AOT with the image's triton"
specs="$COMPAT/specs.jsonl"; sample="$COMPAT/sample.jsonl"; rm -f "$specs"
env -u VIRTUAL_ENV TRITON_INTERPRET=1 AEFAST_HYPOTHESIS_PROFILE=ci AEFAST_RECORD_TRITON_SPECS="$specs" "$VPY" -m pytest -q \
  -p no:benchmark -p no:cacheprovider -n "$(nproc)" -k triton tests >"$COMPAT/record.log" 2>&1 || echo "compat: (the recording run had failures: $COMPAT/record.log)"
"$VPY" - "$specs" "$sample" <<'PYEOF'
import json, sys
seen = {}
for line in open(sys.argv[1]):
    s = json.loads(line)
    c = s["constexprs"]
    key = (s["kernel"], tuple(sorted({t for t in s["args"].values() if t.startswith("*")})),
           *(str(c.get(k)) for k in ("ACT", "PRECISION", "NOISE", "IS_FLAT", "ACC", "ACC_DTYPE")))
    seen.setdefault(key, s)
with open(sys.argv[2], "w") as f:
    f.writelines(json.dumps(s) + "\n" for s in seen.values())
print(f"compat: {len(seen)} specializations sampled")
PYEOF
aot=0
env -u VIRTUAL_ENV "$VPY" scripts/check_triton_aot.py --specs "$sample" --out "$COMPAT/triton_aot.md" \
  --source "scripts/check_gpu_image_compat.sh (triton of the GPU image)" | tail -3 || aot=$?
tests=0
if [ "$RUN_TESTS" = 1 ]; then
  echo "compat: test suite"
  env -u VIRTUAL_ENV TRITON_INTERPRET=1 "$VPY" -m pytest -q -p no:benchmark -p no:cacheprovider -n "$(nproc)" \
    --dist worksteal tests >"$COMPAT/tests.log" 2>&1 || tests=$?
  tail -n 15 "$COMPAT/tests.log"
fi
echo "compat: build ok, Triton AOT exit $aot, tests exit $tests (logs in $COMPAT)"
[ "$aot" = 0 ] && [ "$tests" = 0 ]
