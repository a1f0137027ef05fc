#!/usr/bin/env bash
# Compiles every csrc/cuda/*.cu (or the files named) for sm_80 and sm_90 against the installed torch's headers,
# so that the CUDA code cannot rot on machines without a GPU. Needs nvcc; skips without it.
# The files compile concurrently, AEFAST_CUDA_JOBS at a time (default: all cores; each nvcc run is one
# process at a time, ~30-40 CPU-s per file against torch's headers); the largest files start first, so
# that the longest one is not left alone at the end. One OK/FAIL line per file as it finishes; nvcc's output
# (errors, warnings) is printed per file after all have finished, not interleaved; exit 1 if any failed.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_python.sh
PY="$(aefast_python)"
if ! command -v nvcc >/dev/null 2>&1; then
  echo "check_cuda_compile: nvcc not found, skipping"; exit 0
fi
# One Python start-up for all the paths (each import of torch costs seconds on a loaded machine).
mapfile -t PATHS < <("$PY" -c "
import sysconfig, pybind11, torch
from torch.utils.cpp_extension import include_paths
print(int(torch._C._GLIBCXX_USE_CXX11_ABI)); print(sysconfig.get_paths()['include']); print(pybind11.get_include())
print('\n'.join(include_paths()))")
[ ${#PATHS[@]} -ge 4 ] || { echo "check_cuda_compile: no torch include paths from $PY"; exit 1; }
ABI=${PATHS[0]}
inc=(); for d in "${PATHS[@]:3}" "${PATHS[1]}" "${PATHS[2]}"; do inc+=(-isystem "$d"); done  # torch's, Python's, pybind11's
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
files=("$@"); [ ${#files[@]} -gt 0 ] || files=(csrc/cuda/*.cu)
mapfile -t files < <(ls -S -- "${files[@]}")  # largest first
jobs_max=${AEFAST_CUDA_JOBS:-$(nproc)}

compile_one() {  # file, index: writes $tmp/<index>.log and $tmp/<index>.rc, prints one line
  local f=$1 i=$2 start rc=0
  start=$(date +%s)
  nvcc -std=c++20 -O2 --expt-relaxed-constexpr \
      -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
      -Xcompiler -fPIC -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -D_GLIBCXX_USE_CXX11_ABI="$ABI" \
      -Icsrc/include "${inc[@]}" -c "$f" -o "$tmp/$i.o" > "$tmp/$i.log" 2>&1 || rc=$?
  echo "$rc" > "$tmp/$i.rc"
  if [ "$rc" = 0 ]; then
    echo "check_cuda_compile: OK   $f ($(( $(date +%s) - start )) s)"
  else
    echo "check_cuda_compile: FAIL $f (nvcc exit $rc, $(( $(date +%s) - start )) s)"
  fi
}

started=$(date +%s)
for i in "${!files[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$jobs_max" ]; do wait -n || true; done
  compile_one "${files[$i]}" "$i" &
done
wait
status=0
for i in "${!files[@]}"; do  # nvcc's output (errors, or warnings of a file that compiled), one file at a time
  [ "$(cat "$tmp/$i.rc" 2>/dev/null || echo missing)" = 0 ] || status=1
  if [ -s "$tmp/$i.log" ]; then echo "---- nvcc output for ${files[$i]}:"; cat "$tmp/$i.log"; fi
done
echo "check_cuda_compile: ${#files[@]} files, $jobs_max at a time, $(( $(date +%s) - started )) s," \
     "$([ $status = 0 ] && echo "all compile" || echo "FAILURES above")"
exit $status
