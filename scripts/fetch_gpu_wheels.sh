#!/usr/bin/env bash
# Fetches, as cp312 manylinux wheels, the test packages that the GPU image lacks, into gpu_wheels/
# (git-ignored), for a GPU machine that has no network. Run it here, then call the device tool with
# carry=["gpu_wheels"]; scripts/gpu_check.sh installs them there with pip --no-index --no-deps.
#
# The image (device tool's KINDS.md) has Python 3.12 with torch, triton, pytest, hypothesis,
# pytest-benchmark, py-cpuinfo, pygments, numpy and scikit-learn; it lacks expecttest (pure Python,
# no dependencies). Name more packages as arguments if a later image lacks them (NAME or NAME==VER).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_python.sh
PY="$(aefast_python)"
if [ $# -gt 0 ]; then
  pkgs=("$@")
else
  # The version this checkout tests with, when installed here; else the newest.
  v=$("$PY" -c "import importlib.metadata as m; print(m.version('expecttest'))" 2>/dev/null || true)
  pkgs=("expecttest${v:+==$v}")
fi
mkdir -p gpu_wheels
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d gpu_wheels "${pkgs[@]}"
ls -l gpu_wheels
