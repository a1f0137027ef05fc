#!/usr/bin/env bash
# Compiles every csrc/cuda/*.cu (or the files named) for sm_80 and sm_90 against the installed torch's headers,
# so that the CUDA code cannot rot on machines without a GPU. Needs nvcc; skips without it.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_python.sh
PY="$(aefast_python)"
if ! command -v nvcc >/dev/null 2>&1; then
  echo "check_cuda_compile: nvcc not found, skipping"; exit 0
fi
mapfile -t TORCH_INC < <("$PY" -c "from torch.utils.cpp_extension import include_paths; print('\n'.join(include_paths()))")
ABI=$("$PY" -c "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))")
PYINC=$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
PYBIND_INC=$("$PY" -c "import pybind11; print(pybind11.get_include())")
inc=(); for d in "${TORCH_INC[@]}"; do inc+=(-isystem "$d"); done
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
status=0
files=("$@"); [ ${#files[@]} -gt 0 ] || files=(csrc/cuda/*.cu)
for f in "${files[@]}"; do
  start=$(date +%s)
  if nvcc -std=c++20 -O2 --expt-relaxed-constexpr \
      -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
      -Xcompiler -fPIC -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -D_GLIBCXX_USE_CXX11_ABI="$ABI" \
      -Icsrc/include "${inc[@]}" -isystem "$PYINC" -isystem "$PYBIND_INC" \
      -c "$f" -o "$tmp/$(basename "$f").o"; then
    echo "check_cuda_compile: OK   $f ($(( $(date +%s) - start )) s)"
  else
    echo "check_cuda_compile: FAIL $f"; status=1
  fi
done
exit $status
