"""Machinery of the pytest-benchmark suite: the run options, the Case/Workload contract, timing
through pytest-benchmark, peak memory, and the result rows.

A Case is one (group, variant) pair: the group names the workload (family, shape, mode) and is
what pytest-benchmark groups its table by, so that aefast, eager and torch.compile of one
workload sit side by side; the variant says which implementation runs. A case's ``build``
returns a Workload: the timed call, an optional untimed setup before each call (the backward
mode uses it to run the forward), the FLOPs and bytes used for GFLOP/s and GB/s, and an
optional correctness check run before any timing.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
import torch._dynamo

BENCH_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if BENCH_DIR not in sys.path:
    sys.path.insert(0, BENCH_DIR)

import _harness as H  # noqa: E402

OPTS_KEY = pytest.StashKey()  # config.stash[OPTS_KEY]: the run's Options
COMPILE = "torch.compile"
EAGER = "eager"


@dataclass(frozen=True)
class Options:
    device: str
    quick: bool
    autocast: str | None  # None, "bf16" or "fp16"
    compile_mode: str | None
    compile_backend: str
    rounds: int
    out_dir: str

    @property
    def autocast_dtype(self):
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.autocast)

    @property
    def tag(self) -> str:
        """Names the result files: device, precision, quick."""
        return f"suite_{self.device}_{self.autocast or 'fp32'}" + ("_quick" if self.quick else "")

    def amp(self):
        """The autocast context every variant runs in (a no-op for fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device, dtype=self.autocast_dtype)

    def aefast_backends(self) -> list[str]:
        # Both GPU backends are always listed on CUDA: an unusable one fails its rows (with
        # BackendUnavailableError saying why) instead of silently vanishing from the table.
        return ["cuda", "triton"] if self.device == "cuda" else ["cpu"]

    def compile(self, fn):
        """torch.compile with the run's mode and backend; errors are never suppressed into a
        silent eager fallback (a compile failure must show as a failure)."""
        torch._dynamo.config.suppress_errors = False
        kwargs = {"backend": self.compile_backend}
        if self.compile_mode:
            kwargs["mode"] = self.compile_mode
        return torch.compile(fn, **kwargs)


@dataclass
class Workload:
    fn: Callable
    flops: float = 0.0
    bytes_moved: float = 0.0
    setup: Callable[[], tuple] | None = None  # untimed, before each timed call; returns fn's args
    check: Callable[[], None] | None = None   # correctness against eager, before timing
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Case:
    family: str
    group: str
    variant: str
    build: Callable[[Options], Workload] = field(compare=False, repr=False)

    @property
    def id(self) -> str:
        return f"{self.group}|{self.variant}".replace(" ", "_")


def synchronize(device):
    H.synchronize(device)


def run_case(benchmark, case: Case, opts: Options) -> dict:
    """Builds, warms up (compiles), checks, times and measures one case; returns its row."""
    benchmark.group = case.group
    if case.variant == COMPILE:
        torch._dynamo.reset()  # a fresh compile per case: no recompile limit, no stale graphs
    try:
        work = case.build(opts)
        for _ in range(2):  # warm-up; the first call of a compiled variant compiles
            args = work.setup() if work.setup else ()
            work.fn(*args)
        synchronize(opts.device)
    except Exception as exc:
        if case.variant == COMPILE:
            reason = f"{type(exc).__name__}: {exc}"
            # dynamo's messages are several lines ("backend='inductor' raised:", the error, advice):
            # keep the first two non-blank ones, on one line
            reason = " ".join([line.strip() for line in reason.splitlines() if line.strip()][:2])[:400]
            raise CompileFailed(f"torch.compile(mode={opts.compile_mode}, backend={opts.compile_backend}) "
                                f"failed on {case.group}: {reason}") from exc
        raise
    if work.check is not None:
        work.check()

    def setup():
        args = work.setup() if work.setup else ()
        synchronize(opts.device)
        return args, {}

    def timed(*args):
        out = work.fn(*args)
        synchronize(opts.device)
        return out

    benchmark.pedantic(timed, setup=setup, rounds=opts.rounds, iterations=1, warmup_rounds=0)
    stats = benchmark.stats.stats if benchmark.stats is not None else None  # None with --benchmark-disable
    seconds = stats.median if stats is not None else float("nan")
    args, _ = setup()
    peak = H.peak_memory_bytes(lambda: work.fn(*args), opts.device)
    row = {
        "group": case.group, "family": case.family, "variant": case.variant, "status": "ok",
        "median_s": seconds, "min_s": stats.min if stats is not None else float("nan"),
        "rounds": stats.rounds if stats is not None else 0,
        "flops": work.flops, "bytes": work.bytes_moved, "peak_bytes": peak,
        "gflops": work.flops / seconds / 1e9 if work.flops and seconds > 0 else 0.0,
        "gbps": work.bytes_moved / seconds / 1e9 if work.bytes_moved and seconds > 0 else 0.0,
        "peak_mib": peak / 2**20,
        **work.extra,
    }
    benchmark.extra_info.update({k: v for k, v in row.items() if k not in ("group", "status")})
    benchmark.extra_info.update(device=opts.device, precision=opts.autocast or "fp32",
                                compile_mode=opts.compile_mode, compile_backend=opts.compile_backend)
    return row


class CompileFailed(AssertionError):
    """torch.compile of the reference could not compile or run this workload."""


# --- result files -------------------------------------------------------------------------------

def results_paths(opts: Options) -> tuple[str, str]:
    return (os.path.join(opts.out_dir, opts.tag + ".jsonl"), os.path.join(opts.out_dir, opts.tag + ".md"))


def start_results(opts: Options, env: dict) -> None:
    """Truncates the JSONL results file and writes its first line (the environment). Rows are
    appended one by one as cases finish, so a run cut short by a time limit keeps what it did."""
    os.makedirs(opts.out_dir, exist_ok=True)
    with open(results_paths(opts)[0], "w") as f:
        f.write(json.dumps({"environment": env}) + "\n")


def append_row(opts: Options, row: dict) -> None:
    with open(results_paths(opts)[0], "a") as f:
        f.write(json.dumps(row) + "\n")


def read_results(path: str) -> tuple[dict, list[dict], list[tuple[str, str]]]:
    """(environment, result rows, collected (group, variant) pairs) of a JSONL results file."""
    env, rows, collected = {}, [], []
    with open(path) as f:
        for line in f:
            item = json.loads(line)
            if "environment" in item:
                env = item["environment"]
            elif "collected" in item:
                collected = [tuple(c) for c in item["collected"]]
            else:
                rows.append(item)
    return env, rows, collected


def markdown(env: dict, rows: list[dict], collected=()) -> str:
    """The ratio table (speedup and memory ratio against eager in each group), the failures, and
    the collected cases that produced no row (a run cut short)."""
    ok = [H.Row(r["group"], r["variant"], r["median_s"], r["peak_bytes"], r["flops"], r["bytes"])
          for r in rows if r["status"] == "ok" and not math.isnan(r["median_s"])]
    failed = [r for r in rows if r["status"] != "ok"]
    lines = [f"# aefast benchmark suite: {env.get('tag', '')}", "", "```", json.dumps(env, indent=1), "```", ""]
    lines.append(H.ratio_table(ok, EAGER) if ok else "(no timed rows)")
    untimed = sum(1 for r in rows if r["status"] == "ok" and math.isnan(r["median_s"]))
    lines += ["", f"{len(ok)} timed, {len(failed)} failed."
              + (f" {untimed} ran untimed (--benchmark-disable)." if untimed else "")]
    if failed:
        lines += ["", "| case | variant | FAILED |", "|---|---|---|"]
        lines += [f"| {r['group']} | {r['variant']} | {r['error']} |" for r in failed]
    done = {(r["group"], r["variant"]) for r in rows}
    missing = [c for c in collected if c not in done]
    if missing:
        lines += ["", f"{len(missing)} collected cases not run (the run stopped early):", ""]
        lines += [f"- {group} | {variant}" for group, variant in missing]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    """python bench/suite/_suite.py RESULTS.jsonl: prints (and writes next to it) the markdown
    table of a run, also of one cut short."""
    argv = sys.argv[1:] if argv is None else argv
    for path in argv:
        text = markdown(*read_results(path))
        with open(os.path.splitext(path)[0] + ".md", "w") as f:
            f.write(text)
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
