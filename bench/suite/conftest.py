"""pytest-benchmark suite of aefast against its eager PyTorch twins and torch.compile of them.

    python -m pytest bench/suite [--device cuda] [--autocast bf16] [--quick] [pytest-benchmark options]

(`./dev bench` runs exactly that.) Each benchmark group is one workload; its rows are the
variants (aefast on each backend, eager, torch.compile). Besides pytest-benchmark's own table
and JSON (--benchmark-json, --benchmark-autosave), every case streams a row (median, GFLOP/s,
GB/s, peak memory; or FAILED with the reason) to <out>/<tag>.jsonl as it finishes, and the
session ends by writing <out>/<tag>.md, the ratio table against eager with the environment
(GPU, driver, torch, date). <out> is --bench-out, else $AEFAST_BENCH_OUT, else bench/out.
"""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch

import _suite as S

_OPTS = S.OPTS_KEY
_ROWS = pytest.StashKey()


def pytest_addoption(parser):
    group = parser.getgroup("aefast benchmark suite")
    group.addoption("--device", default="cpu", choices=("cpu", "cuda"), help="device (default cpu)")
    group.addoption("--quick", action="store_true",
                    help="tiny shapes and 2 rounds: the CI smoke run (seconds, figures meaningless)")
    group.addoption("--autocast", default="fp32", choices=("fp32", "bf16", "fp16"),
                    help="run every variant under torch.autocast of this dtype (default fp32: none)")
    group.addoption("--compile-mode", default=None,
                    help="torch.compile mode (default: max-autotune on cuda, inductor's default on cpu; "
                         "'default' for inductor's default everywhere)")
    group.addoption("--compile-backend", default="inductor",
                    help="torch.compile backend (default inductor; aot_eager for a fast check of capture)")
    group.addoption("--rounds", type=int, default=None,
                    help="timed rounds per benchmark (default: 2 with --quick, else 15 per op, 7 per model)")
    group.addoption("--bench-out", default=None,
                    help="folder of the JSONL/markdown results (default $AEFAST_BENCH_OUT or bench/out)")


def options(config) -> S.Options:
    return config.stash[_OPTS]


def pytest_configure(config):
    device = config.getoption("--device")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise pytest.UsageError("--device cuda: torch.cuda.is_available() is False")
        # cuDNN autotuning for eager (and for aefast's cuDNN-free kernels it changes nothing).
        torch.backends.cudnn.benchmark = True
    mode = config.getoption("--compile-mode")
    if mode is None and config.getoption("--compile-backend") == "inductor":
        mode = "max-autotune" if device == "cuda" else None
    quick = config.getoption("--quick")
    autocast = config.getoption("--autocast")
    out_dir = (config.getoption("--bench-out") or os.environ.get("AEFAST_BENCH_OUT")
               or os.path.join(S.BENCH_DIR, "out"))
    config.stash[_OPTS] = S.Options(device=device, quick=quick, autocast=None if autocast == "fp32" else autocast,
                                    compile_mode=None if mode == "default" else mode,
                                    compile_backend=config.getoption("--compile-backend"),
                                    rounds=config.getoption("--rounds") or 0, out_dir=out_dir)
    config.stash[_ROWS] = []
    if not hasattr(config, "workerinput"):  # the controller (or a plain run) owns the results file
        S.start_results(options(config), environment(config))


def environment(config) -> dict:
    opts = options(config)
    env = S.H.environment(opts.device)  # date, torch, python, CPU, threads; GPU name and driver on CUDA
    env.update(tag=opts.tag, precision=opts.autocast or "fp32", quick=opts.quick,
               compile_mode=opts.compile_mode or "default", compile_backend=opts.compile_backend,
               cudnn_benchmark=torch.backends.cudnn.benchmark, sgemm_gflops=round(S.H.CPU_SGEMM_GFLOPS, 1),
               copy_gbps=round(S.H.CPU_COPY_GBPS, 1))
    if opts.device == "cuda":
        env["cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
    try:
        env["loadavg"] = os.getloadavg()[0]
    except OSError:
        pass
    return env


def pytest_benchmark_update_machine_info(config, machine_info):
    """pytest-benchmark's JSON names the GPU, driver, torch, date and run settings too."""
    machine_info["aefast"] = environment(config)


@pytest.fixture
def opts(request) -> S.Options:
    return options(request.config)


@pytest.fixture
def bench(benchmark, request, opts):
    """bench(case): times one case through pytest-benchmark and records its result row."""

    def run(case: S.Case):
        rounds = opts.rounds or (2 if opts.quick else (7 if case.family == "model" else 15))
        row = S.run_case(benchmark, case, dataclasses.replace(opts, rounds=rounds))
        request.config.stash[_ROWS].append(row)
        S.append_row(opts, row)
        return row

    return run


@pytest.hookimpl(trylast=True)  # after -k/-m deselection: only the cases that will run
def pytest_collection_modifyitems(session, config, items):
    """Every other case runs before the torch.compile ones (whose compiles, with max-autotune
    on a GPU, take most of the time): a run cut short by a time limit keeps all the
    aefast-vs-eager figures. The collected cases go to the results file first, so that its table
    can name the cases a cut-short run never reached."""
    def is_compile(item):
        case = getattr(item, "callspec", None) and item.callspec.params.get("case")
        return isinstance(case, S.Case) and case.variant == S.COMPILE

    items.sort(key=is_compile)  # stable: the collection order stays within each part
    if not hasattr(config, "workerinput"):
        S.append_row(options(config), {"collected": [[c.group, c.variant] for c in
                                                     (item.callspec.params["case"] for item in items
                                                      if getattr(item, "callspec", None) and
                                                      isinstance(item.callspec.params.get("case"), S.Case))]})


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed case (torch.compile that does not compile, an aefast error) is a FAILED row in
    the results, next to the timed ones, not a skip and not a silent gap."""
    report = yield
    case = getattr(item, "callspec", None) and item.callspec.params.get("case")
    if isinstance(case, S.Case) and report.failed and report.when in ("setup", "call"):
        exc = call.excinfo.value if call.excinfo else None
        reason = (f"{type(exc).__name__}: {exc}" if exc is not None else report.longreprtext)
        row = {"group": case.group, "family": case.family, "variant": case.variant, "status": "FAILED",
               "error": (reason.splitlines() or ["failed"])[0][:600]}
        item.config.stash[_ROWS].append(row)
        S.append_row(options(item.config), row)
    return report


def pytest_sessionfinish(session):
    config = session.config
    if hasattr(config, "workerinput") or _OPTS not in config.stash:
        return
    jsonl, md = S.results_paths(options(config))
    if os.path.exists(jsonl):
        with open(md, "w") as f:
            f.write(S.markdown(*S.read_results(jsonl)))


def pytest_terminal_summary(terminalreporter, config):
    if _OPTS in config.stash:
        jsonl, md = S.results_paths(options(config))
        terminalreporter.write_line(f"aefast suite results: {md} (rows streamed to {jsonl})")
