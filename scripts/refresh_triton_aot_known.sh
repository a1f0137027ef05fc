#!/usr/bin/env bash
# Refreshes .ci/triton_aot_known.jsonl, the results CI's Triton AOT gate answers from (see .ci/run and
# scripts/check_triton_aot.py, "Known results"): records the suite's Triton launches as CI does (fixed
# fuzz examples), then runs the gate over them, compiling what the file does not hold (Triton's own
# cache answers the rest on this machine), and rewrites the file with this recording's results. Run it
# after changing a Triton kernel, a tile config or the tests' Triton cases, and commit the file.
# Extra arguments go to pytest (e.g. -n 0). Takes the test suite's time plus the new compiles.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_python.sh
mkdir -p out
specs=out/triton_specs.jsonl  # kept: scripts/check_triton_aot.py --specs out/triton_specs.jsonl reruns the gate alone
rm -f "$specs"
AEFAST_HYPOTHESIS_PROFILE=ci AEFAST_RECORD_TRITON_SPECS="$specs" ./dev test "$@"
"$(aefast_python)" scripts/check_triton_aot.py --specs "$specs" --out out/triton_aot.md \
    --known .ci/triton_aot_known.jsonl --write-known .ci/triton_aot_known.jsonl \
    --source "scripts/refresh_triton_aot_known.sh (the suite with AEFAST_HYPOTHESIS_PROFILE=ci)"
