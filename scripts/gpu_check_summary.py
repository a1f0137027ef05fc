"""Helpers of scripts/gpu_check.sh: the environment header, the merged benchmark tables, and the
check that a summary has every section (CI runs it on the dry run's summary).

    python scripts/gpu_check_summary.py env OUT.json            # GPU, driver, torch, date (+ header line)
    python scripts/gpu_check_summary.py tables BENCH_DIR        # merge each precision's phases, print tables
    python scripts/gpu_check_summary.py verify SUMMARY.md [--dry-run]

The summary is markdown: one ``## <section>`` per step of the check, in SECTIONS order, each with
a ``status:`` line (ok, FAILED (rc=N), TIMEOUT (...), or skipped: why).
"""
from __future__ import annotations

import datetime
import glob
import json
import os
import platform
import re
import subprocess
import sys

# The steps of scripts/gpu_check.sh, in the order it runs them (benchmark figures before the
# tests, the torch.compile cases last: a run cut short keeps the aefast-vs-eager figures).
SECTIONS = ("environment", "wheels", "build", "bench-fp32", "bench-bf16", "tests", "compile-fp32", "compile-bf16",
            "tables")
STATUS = re.compile(r"^status: (ok|FAILED \(rc=\d+\)|TIMEOUT .*|skipped: .+)$", re.M)
HERE = os.path.dirname(os.path.abspath(__file__))


def environment() -> dict:
    """GPU name, driver, torch, CUDA and the date: what every GPU figure must name."""
    import torch

    env = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
           "time_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%H:%M:%S"),
           "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
           "gpu": None, "driver": None}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
            env["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else None
        except (OSError, subprocess.TimeoutExpired):
            pass
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env


def header(env: dict, dry_run: bool) -> str:
    if dry_run:
        return (f"# aefast GPU check, DRY RUN on CPU (no GPU): torch {env['torch']}, {env['date']} "
                f"{env['time_utc']} UTC")
    return (f"# aefast GPU check: {env['gpu']}, driver {env['driver']}, torch {env['torch']} (CUDA {env['cuda']}), "
            f"{env['date']} {env['time_utc']} UTC")


def cmd_env(path: str, dry_run: bool) -> int:
    env = environment()
    env["dry_run"] = dry_run
    with open(path, "w") as f:
        json.dump(env, f, indent=1)
    print(header(env, dry_run))
    return 0


def _suite():
    sys.path.insert(0, os.path.join(HERE, "..", "bench", "suite"))
    import _suite  # noqa: E402  (bench/suite/_suite.py: the result files and the ratio table)

    return _suite


def merge_phases(bench_dir: str) -> list[str]:
    """The check runs each precision twice (aefast + eager, then torch.compile) into
    BENCH_DIR/<phase>/<tag>.jsonl; the ratio table needs both in one file. Writes
    BENCH_DIR/<tag>.jsonl and .md per tag and returns the markdown texts."""
    S = _suite()
    tags: dict[str, list[str]] = {}
    for path in sorted(glob.glob(os.path.join(bench_dir, "*", "*.jsonl"))):
        tags.setdefault(os.path.basename(path), []).append(path)
    texts = []
    for tag, paths in sorted(tags.items()):
        env, rows, collected = {}, [], []
        for path in paths:
            e, r, c = S.read_results(path)
            env = env or e
            rows += r
            collected += [x for x in c if x not in collected]
        merged = os.path.join(bench_dir, tag)
        with open(merged, "w") as f:
            f.write(json.dumps({"environment": env}) + "\n")
            f.write(json.dumps({"collected": [list(c) for c in collected]}) + "\n")
            for r in rows:
                f.write(json.dumps(r) + "\n")
        text = S.markdown(env, rows, collected)
        with open(os.path.splitext(merged)[0] + ".md", "w") as f:
            f.write(text)
        texts.append(text)
    return texts


def cmd_tables(bench_dir: str) -> int:
    texts = merge_phases(bench_dir)
    if not texts:
        print("(no benchmark results: no phase wrote a results file)")
        return 1
    # The tables go into the summary one heading level down.
    print("\n".join(re.sub(r"^# ", "### ", t, flags=re.M) for t in texts))
    return 0


def verify(text: str, dry_run: bool) -> list[str]:
    """The problems of a summary: missing or misordered sections, a section without a status
    line, the header; in a dry run every step must also have passed."""
    problems = []
    first = text.splitlines()[0] if text.strip() else ""
    if not first.startswith("# aefast GPU check"):
        problems.append("the first line is not the '# aefast GPU check' header")
    elif dry_run and "DRY RUN" not in first:
        problems.append("the header does not say DRY RUN")
    elif not dry_run and not all(k in first for k in ("driver", "torch")):
        problems.append("the header does not name the GPU, driver and torch")
    found = re.findall(r"^## (\S+)", text, re.M)
    if tuple(found) != SECTIONS:
        problems.append(f"sections {found}, expected {list(SECTIONS)}")
    for name in SECTIONS:
        m = re.search(rf"^## {re.escape(name)}\b.*?(?=^## |\Z)", text, re.M | re.S)
        if m is None:
            continue
        status = STATUS.search(m.group(0))
        if status is None:
            problems.append(f"section {name} has no status line")
        elif dry_run and status.group(1) != "ok":
            problems.append(f"section {name}: {status.group(1)}")
    if dry_run and not re.search(r"^\| .+ \| .+ \|", text, re.M):
        problems.append("no benchmark table in the summary")
    return problems


def cmd_verify(path: str, dry_run: bool) -> int:
    with open(path) as f:
        problems = verify(f.read(), dry_run)
    for p in problems:
        print(f"gpu_check summary {path}: {p}", file=sys.stderr)
    if not problems:
        print(f"gpu_check summary {path}: every section present" + (", every step ok" if dry_run else ""))
    return 1 if problems else 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    dry_run = "--dry-run" in argv
    args = [a for a in argv if a != "--dry-run"]
    if len(args) == 2 and args[0] == "env":
        return cmd_env(args[1], dry_run)
    if len(args) == 2 and args[0] == "tables":
        return cmd_tables(args[1])
    if len(args) == 2 and args[0] == "verify":
        return cmd_verify(args[1], dry_run)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
