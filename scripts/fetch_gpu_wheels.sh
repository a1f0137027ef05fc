#!/usr/bin/env bash
# Downloads the pure-Python test packages into gpu_wheels/ (git-ignored), to be carried to a GPU
# machine that has no network: run it here, then pass carry=["gpu_wheels"] to the device tool.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --only-binary=:all: --no-deps -d gpu_wheels \
  pytest pluggy iniconfig packaging hypothesis sortedcontainers attrs expecttest \
  pytest-benchmark py-cpuinfo2
ls gpu_wheels
