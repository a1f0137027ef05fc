#!/usr/bin/env bash
# Compiles every csrc/cuda/*.cu (or the files named) for sm_80 and sm_90 against the installed torch's headers,
# so that the CUDA code cannot rot on machines without a GPU. Needs nvcc; skips without it.
# The files compile concurrently, AEFAST_CUDA_JOBS at a time (default: all cores; each nvcc run is one
# process at a time, ~30-40 CPU-s per file against torch's headers); the largest files start first, so
# that the longest one is not left alone at the end. One OK/FAIL line per file as it finishes; nvcc's output
# (errors, warnings) is printed per file after all have finished, not interleaved; exit 1 if any failed.
#
# Result cache (as Triton's kernel cache serves the AOT gate): a file that compiled is remembered under a
# key of everything the compile reads that can change: the .cu file and every project header it includes,
# transitively (#include "..." resolved beside the including file, then in csrc/include), the nvcc and
# host compiler versions, the whole command line (flags, archs, include dirs) and the version of the
# torch whose headers it reads. The same key again is the same compile, so it is not repeated: "OK
# (cached)", with nvcc's output kept from that compile. A change to any of those inputs compiles the file
# again; failures are never cached. The cache lives in AEFAST_CUDA_CHECK_CACHE (default
# ${XDG_CACHE_HOME:-~/.cache}/aefast/cuda_check); AEFAST_CUDA_CHECK_CACHE=off compiles every file.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_python.sh
PY="$(aefast_python)"
if ! command -v nvcc >/dev/null 2>&1; then
  echo "check_cuda_compile: nvcc not found, skipping"; exit 0
fi
files=("$@"); [ ${#files[@]} -gt 0 ] || files=(csrc/cuda/*.cu)
mapfile -t files < <(ls -S -- "${files[@]}")  # largest first
jobs_max=${AEFAST_CUDA_JOBS:-$(nproc)}
cache=${AEFAST_CUDA_CHECK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/aefast/cuda_check}
# The compile, but for the ABI flag and the include dirs, which come from the Python below.
flags=(-std=c++20 -O2 --expt-relaxed-constexpr
       -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90
       -Xcompiler -fPIC -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -Icsrc/include)
AEFAST_CUDA_KEY_PREFIX="$(nvcc --version)
$(c++ --version 2>/dev/null | head -1)
${flags[*]}"
export AEFAST_CUDA_KEY_PREFIX
# One Python start-up for all the paths and cache keys (each import of torch costs seconds on a loaded
# machine): the ABI flag, Python's and pybind11's include dirs, torch's version, then torch's include
# dirs, one per line, then "--", then one cache key per file (in the order of $files).
mapfile -t PATHS < <("$PY" - "${files[@]}" <<'PYEOF'
import os, sys, sysconfig, pybind11, torch
from torch.utils.cpp_extension import include_paths
print(int(torch._C._GLIBCXX_USE_CXX11_ABI)); print(sysconfig.get_paths()['include']); print(pybind11.get_include())
print(torch.__version__)
print('\n'.join(include_paths()))
print("--")
# the key's prefix: nvcc's version and flags (from the shell), torch's version and every include dir
prefix = "\n".join([os.environ["AEFAST_CUDA_KEY_PREFIX"], torch.__version__, str(torch._C._GLIBCXX_USE_CXX11_ABI),
                    sysconfig.get_paths()["include"], pybind11.get_include(), *include_paths()])
import hashlib, re
quoted = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.M)
def closure(path, seen):
    """path and every project header it includes, transitively (conditional includes too)."""
    if path in seen:
        return
    seen.add(path)
    with open(path, errors="replace") as f:
        text = f.read()
    for name in quoted.findall(text):
        for base in (os.path.dirname(path), "csrc/include"):
            cand = os.path.normpath(os.path.join(base, name))
            if os.path.isfile(cand):
                closure(cand, seen)
                break
for f in sys.argv[1:]:
    seen = set()
    closure(os.path.normpath(f), seen)
    h = hashlib.sha256(prefix.encode())
    for path in sorted(seen):
        h.update(b"\0" + path.encode() + b"\0")
        with open(path, "rb") as fh:
            h.update(fh.read())
    print(h.hexdigest())
PYEOF
)
sep=-1; for i in "${!PATHS[@]}"; do [ "${PATHS[$i]}" = "--" ] && { sep=$i; break; }; done
[ "$sep" -ge 5 ] || { echo "check_cuda_compile: no torch include paths from $PY"; exit 1; }
ABI=${PATHS[0]}
inc=(); for d in "${PATHS[@]:4:$((sep - 4))}" "${PATHS[1]}" "${PATHS[2]}"; do inc+=(-isystem "$d"); done  # torch's, Python's, pybind11's
keys=("${PATHS[@]:$((sep + 1))}")
[ ${#keys[@]} = ${#files[@]} ] || { echo "check_cuda_compile: no cache keys from $PY"; exit 1; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT

compile_one() {  # file, index, key: writes $tmp/<index>.log and $tmp/<index>.rc, prints one line
  local f=$1 i=$2 key=$3 start rc=0
  start=$(date +%s)
  if [ "$cache" != off ] && [ -f "$cache/$key.log" ]; then
    cp "$cache/$key.log" "$tmp/$i.log"; echo 0 > "$tmp/$i.rc"
    echo "check_cuda_compile: OK   $f (cached: these exact inputs compiled before)"
    return
  fi
  nvcc "${flags[@]}" -D_GLIBCXX_USE_CXX11_ABI="$ABI" "${inc[@]}" -c "$f" -o "$tmp/$i.o" > "$tmp/$i.log" 2>&1 || rc=$?
  echo "$rc" > "$tmp/$i.rc"
  if [ "$rc" = 0 ]; then
    if [ "$cache" != off ] && mkdir -p "$cache" 2>/dev/null; then  # (atomic: a reader never sees half a log)
      cp "$tmp/$i.log" "$cache/$key.log.$$.$i" && mv -f "$cache/$key.log.$$.$i" "$cache/$key.log" || true
    fi
    echo "check_cuda_compile: OK   $f ($(( $(date +%s) - start )) s)"
  else
    echo "check_cuda_compile: FAIL $f (nvcc exit $rc, $(( $(date +%s) - start )) s)"
  fi
}

started=$(date +%s)
for i in "${!files[@]}"; do
  while [ "$(jobs -rp | wc -l)" -ge "$jobs_max" ]; do wait -n || true; done
  compile_one "${files[$i]}" "$i" "${keys[$i]}" &
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
