#!/usr/bin/env bash
# Puts what one GPU check returned under bench/results/, named by GPU, driver, torch and date, and
# prints (or, with --commit, runs) the git commands that commit it. The one step after a device call:
#
#   scripts/gpu_results_commit.sh <files_at folder of the device reply> [--commit]
#
# The folder holds summary.md and gpu_results.tar.gz (scripts/gpu_check.sh). Everything lands in
# bench/results/gpu_<tag>/ with <tag> = <gpu>_drv<driver>_torch<version>_<date>, each file's name
# carrying the tag too (summary_<tag>.md, suite_cuda_fp32_<tag>.md, tests_<tag>.xml, build_<tag>.log, ...).
# Then update the README's status line from summary_<tag>.md by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_python.sh
PY="$(aefast_python)"
src="${1:-}"
commit=0
[ "${2:-}" = "--commit" ] && commit=1
if [ -z "$src" ] || [ ! -f "$src/gpu_results.tar.gz" ]; then
  sed -n '2,11p' "$0"
  echo "gpu_results_commit: no gpu_results.tar.gz in '${src}'" >&2
  exit 2
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
tar -C "$tmp" -xzf "$src/gpu_results.tar.gz"
tag=$("$PY" - "$tmp/environment.json" <<'EOF'
import json, re, sys
env = json.load(open(sys.argv[1]))
slug = lambda s: re.sub(r"[^A-Za-z0-9.]+", "-", str(s)).strip("-")
gpu = slug(env.get("gpu") or "cpu-dry-run").replace("NVIDIA-", "")
print(f"{gpu}_drv{slug(env.get('driver') or 'none')}_torch{slug(env['torch'])}_{env['date']}")
EOF
)
dest="bench/results/gpu_$tag"
mkdir -p "$dest"
copy() {  # copy SOURCE NAME EXT: SOURCE -> $dest/NAME_<tag>.EXT, when it exists
  [ -s "$1" ] && cp "$1" "$dest/$2_$tag.$3" || true  # (empty logs left out)
}
copy "$src/summary.md" summary md
copy "$tmp/environment.json" environment json
copy "$tmp/info.json" aefast_info json
copy "$tmp/nvidia-smi.txt" nvidia-smi txt
copy "$tmp/tests/junit.xml" tests xml
for log in "$tmp"/logs/*.log; do copy "$log" "$(basename "$log" .log)" log; done
for f in "$tmp"/bench/suite_*.jsonl "$tmp"/bench/suite_*.md; do
  [ -f "$f" ] && copy "$f" "$(basename "${f%.*}")" "${f##*.}"
done
for f in "$tmp"/bench/*/pytest_benchmark_*.json; do
  [ -f "$f" ] && copy "$f" "$(basename "${f%.json}")_$(basename "$(dirname "$f")")" json
done
ls -l "$dest"
cmds=("git add $dest" "git commit -m \"bench/results: GPU check on $tag (scripts/gpu_check.sh)\"")
if [ "$commit" = 1 ]; then
  git add "$dest"
  git commit -m "bench/results: GPU check on $tag (scripts/gpu_check.sh)"
else
  echo "to commit:"
  printf '  %s\n' "${cmds[@]}"
fi
echo "then update the README's status line from $dest/summary_$tag.md"
