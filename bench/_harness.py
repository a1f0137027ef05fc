"""Shared benchmark machinery: median timings, peak memory, ratio tables, JSON/markdown/PNG.

Speed and memory claims are ratios measured in one run against the PyTorch reference on the
same machine; absolute CPU times on shared 2-core machines are noise.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

def _measure_cpu_limits() -> tuple[float, float]:
    """The machine's fp32 GEMM peak in GFLOP/s and copy GB/s (read+write), measured now, in this
    run: a stored constant goes stale with the load on a shared machine (the 120 GFLOP/s once
    noted for these 2-core machines is ~190 on a quiet one).

    The GEMM peak is the better of two vendor GEMMs doing dense fp32 multiply-adds: torch.mm of a
    1024x1024 square (MKL's sgemm) and oneDNN's channels-last 3x3 conv, an implicit GEMM
    (8x128->128 at 32x32, 1.2 GFLOP). On these AMD cores (AVX-512) MKL's sgemm reaches only about
    half of what oneDNN's kernels reach (measured, 1 thread: ~110 vs ~245 GFLOP/s), so sgemm
    alone put well-tuned kernels at 140-160% of "the peak"."""
    a = torch.randn(1024, 1024)
    b = torch.randn(1024, 1024)
    x = torch.randn(8, 128, 32, 32).contiguous(memory_format=torch.channels_last)
    w = torch.randn(128, 128, 3, 3).contiguous(memory_format=torch.channels_last)
    src = torch.ones(16 * 2**20)  # 64 MiB, beyond the L3 (written, so no shared zero page)
    dst = torch.empty_like(src)
    torch.mm(a, b)
    torch.conv2d(x, w, padding=1)
    dst.copy_(src)
    mm_s = min(_timed(lambda: torch.mm(a, b)) for _ in range(5))
    conv_s = min(_timed(lambda: torch.conv2d(x, w, padding=1)) for _ in range(5))
    copy_s = min(_timed(lambda: dst.copy_(src)) for _ in range(5))
    gemm_gflops = max(2 * 1024**3 / mm_s, 2 * 8 * 128 * 128 * 9 * 32 * 32 / conv_s) / 1e9
    return gemm_gflops, 2 * src.numel() * 4 / copy_s / 1e9


def copy_gbps(nbytes: int, device: str = "cpu") -> float:
    """The read+write rate of copying an ``nbytes`` buffer into another, measured now, for a
    working set of this size (in cache when it fits), which CPU_COPY_GBPS (64 MiB, beyond the
    L3) understates for small tensors. Meant for a lower bound on any implementation's time,
    so it errs high: on CPU it is ONE thread's best rate times the intra-op thread count
    (perfect scaling). A multi-threaded copy itself is not timed: on a loaded machine every
    parallel region waits for its slowest thread to be scheduled (seen: 12 ms for a 0.8 MB
    copy at load 6 on 2 cores), which would make the bound meaningless. The best of at least
    20 runs spread over at least 50 ms."""
    n = max(1, nbytes // 4)
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    threads = torch.get_num_threads()
    if not device.startswith("cuda"):
        torch.set_num_threads(1)
    try:
        dst.copy_(src)
        synchronize(device)
        best = float("inf")
        runs, start = 0, time.perf_counter()
        while runs < 20 or time.perf_counter() - start < 0.05:
            t0 = time.perf_counter()
            dst.copy_(src)
            synchronize(device)
            best = min(best, time.perf_counter() - t0)
            runs += 1
    finally:
        torch.set_num_threads(threads)
    rate = 2 * n * 4 / best / 1e9
    return rate if device.startswith("cuda") else rate * threads


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def cpu_limits_around(fn: Callable[[], object], device: str = "cpu") -> tuple[object, float | None, float | None, str]:
    """Runs ``fn()`` between two measurements of the CPU's fp32 GEMM peak (_measure_cpu_limits: the
    better of MKL's sgemm and oneDNN's conv) and copy rate and returns (its result, GEMM GFLOP/s,
    copy GB/s, a line on the GEMM figures for the result file). Each limit is the better
    of the two measurements (as the per-kernel breakdown does): taken in the same run as the
    timings, after the allocator flag is applied, with the load the timings saw. On CUDA
    (None, None, "")."""
    if device.startswith("cuda"):
        return fn(), None, None, ""
    g0, c0 = _measure_cpu_limits()
    result = fn()
    g1, c1 = _measure_cpu_limits()
    line = (f"fp32 GEMM peak (the better of torch.mm's sgemm and oneDNN's conv) measured in this run: "
            f"{g0:.0f} GFLOP/s before and {g1:.0f} after the timings (the better is the peak)")
    return result, max(g0, g1), max(c0, c1), line


def __getattr__(name: str) -> float:
    """CPU_SGEMM_GFLOPS / CPU_COPY_GBPS: measured once, when first asked for (importing this
    module measures nothing). Scripts that time kernels use cpu_limits_around instead, which
    measures in the same run as their timings."""
    if name in ("CPU_SGEMM_GFLOPS", "CPU_COPY_GBPS"):
        limits = globals().get("_CPU_LIMITS") or _measure_cpu_limits()
        globals()["_CPU_LIMITS"] = limits
        return limits[0] if name == "CPU_SGEMM_GFLOPS" else limits[1]
    raise AttributeError(name)


def minor_faults() -> int:
    """Minor page faults of this process so far: a fresh multi-MB CPU buffer faults once per
    4 KiB page on first touch, which on this machine can cost as much as the kernel itself."""
    import resource  # noqa: PLC0415 - POSIX only, used by CPU runs

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def keep_freed_memory_mapped() -> bool:
    """Make glibc keep freed memory mapped (no mmap'ed blocks, no heap trimming), so that no
    variant's fresh buffers page-fault: the allocator setting most favourable to eager PyTorch,
    which allocates more buffers per step than the fused kernels. True if glibc accepted it."""
    import ctypes  # noqa: PLC0415

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def bench_parser(doc: str, *, devices=("cpu",), quick_help: str = "tiny shapes, no torch.compile: a smoke run"):
    """The options every ratio-table script shares: --device (`aefast bench` passes it), --quick,
    --out and --keep-memory-mapped; a script adds its own to the parser returned."""
    import argparse  # noqa: PLC0415

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=list(devices),
                        help="CPU only" if tuple(devices) == ("cpu",) else "device (default cpu)")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out", default=None, help="output folder (default bench/out or $AEFAST_BENCH_OUT)")
    add_allocator_flag(parser)
    return parser


def result_name(name: str, args) -> str:
    """The result files' name: ``name`` with _quick and _keep_mapped as the run was."""
    return name + ("_quick" if args.quick else "") + ("_keep_mapped" if args.keep_memory_mapped else "")


def fallbacks_line() -> str:
    """The fallbacks to the reference path aefast counted during the run: never silent in a benchmark."""
    import aefast  # noqa: PLC0415

    fallbacks = aefast.info()["fallbacks"]
    return "fallbacks to the reference path during the run: " + (
        ", ".join(f"{k} x{v}" for k, v in fallbacks.items()) if fallbacks else "none")


def add_allocator_flag(parser) -> None:
    """--keep-memory-mapped, the same for every benchmark script."""
    parser.add_argument("--keep-memory-mapped", action="store_true",
                        help="tell glibc never to unmap or trim freed memory (mallopt), so that no variant pays page "
                             "faults for fresh buffers: eager's most favourable allocator setting (aefast's CPU "
                             "kernels reuse their large buffers either way)")


def apply_allocator_flag(args) -> str:
    """Applies --keep-memory-mapped; returns the allocator line every result file starts with."""
    if not getattr(args, "keep_memory_mapped", False):
        return "allocator: glibc default (freed multi-MB blocks go back to the OS; fresh buffers page-fault)"
    if keep_freed_memory_mapped():
        return "allocator: mallopt, freed memory kept mapped (no variant page-faults)"
    return "allocator: mallopt refused, glibc default"


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], device: str = "cpu", *, warmup: int = 2, repeats: int = 7,
                min_seconds: float = 0.0) -> float:
    """Median wall time of ``fn()`` in seconds (device-synchronised)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    start_all = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start_all < min_seconds:
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_medians(fns: dict, device: str = "cpu", *, rounds: int = 5, repeats: int = 3,
                        warmup: int = 1) -> dict:
    """{key: median seconds} of every callable in ``fns`` (None: skipped, absent from the
    result), measured in interleaved rounds: each round times every callable once (a
    median_time of ``repeats`` calls after ``warmup``), in ``fns``' order, and the figure is
    the median over the rounds, so that a shared machine's load hits every variant alike."""
    times = {key: [] for key, fn in fns.items() if fn is not None}
    for _ in range(rounds):
        for key in times:
            times[key].append(median_time(fns[key], device, warmup=warmup, repeats=repeats))
    return {key: statistics.median(ts) for key, ts in times.items()}


@contextlib.contextmanager
def environment_switches(switches: dict[str, str] | None):
    """Sets the environment variables ``switches`` (the kernels' A/B switches, read per call:
    AEFAST_ENCODER_BACKWARD, AEFAST_CPU_ISA, ...; a value None unsets one) for the duration, then
    restores them."""
    def apply(values):
        for name, value in values.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    switches = switches or {}
    saved = {name: os.environ.get(name) for name in switches}
    apply(switches)
    try:
        yield
    finally:
        apply(saved)


def module_steps(variants: dict, x: torch.Tensor, grad: torch.Tensor, *, output=lambda out: out,
                 no_grad_forward: bool = True) -> dict:
    """{name: {"fwd": forward, "full": forward + backward}} for the modules ``variants`` called on
    ``x``: "fwd" one forward of x (under no_grad unless ``no_grad_forward`` is False: then it
    records the graph, as a training step's forward does), "full" a forward and the gradients for
    ``grad`` w.r.t. x and every parameter; ``output`` picks the tensor of the module's output that
    the gradient flows from."""
    steps = {}
    for name, model in variants.items():
        inputs = [x, *model.parameters()]

        def forward(model=model):
            with torch.no_grad() if no_grad_forward else contextlib.nullcontext():
                return model(x.detach())

        def full(model=model, inputs=inputs):
            return torch.autograd.grad(output(model(x)), inputs, grad)

        steps[name] = {"fwd": forward, "full": full}
    return steps


def step_rows(case: str, steps: dict, times: dict, amounts: dict, *, memory_bound: bool = False,
              extra: dict | None = None) -> list[Row]:
    """Rows of the ``times`` of ``steps`` ({name: {mode: fn}}, as module_steps gives them), each with
    its peak memory and the amount its mode must do: ``amounts[mode]`` FLOPs, or bytes moved when
    ``memory_bound``."""
    return [Row(f"{case} {mode}", name, times[(name, mode)], peak_memory_bytes(steps[name][mode], "cpu"),
                **({"bytes_moved": amount} if memory_bound else {"flops": amount}), extra=dict(extra or {}))
            for name in steps for mode, amount in amounts.items()]


def module_bench_main(argv, doc: str, name: str, bench_shapes: Callable, *, flops: bool) -> list[Row]:
    """main() of a module benchmark (fused module against eager and torch.compile): the shared
    options, the allocator flag, ``bench_shapes(quick, rounds, repeats)`` for its rows (1 round of
    2 with --quick, else 5 of 5), then the ratio table against eager (GFLOP/s against the fp32
    GEMM peak when ``flops``), the fallbacks and the result files."""
    args = bench_parser(doc).parse_args(argv)
    allocator = apply_allocator_flag(args)
    rounds, repeats = (1, 2) if args.quick else (5, 5)
    rows = bench_shapes(args.quick, rounds, repeats)
    peak = __getattr__("CPU_SGEMM_GFLOPS") if flops else None  # this module's lazily measured constant
    table = allocator + "\n\n" + ratio_table(rows, "eager", peak_gflops=peak)
    print(table)
    print(fallbacks_line())
    out = write_results(result_name(name, args), rows, "cpu", table + "\n", args.out)
    print(f"\nwrote {out}")
    return rows


def speedup_summary(rows: list[Row], title: str, baseline: str = "eager") -> str:
    """Lines of the "full" cases (fwd+bwd): each aefast variant's speedup and peak-memory ratio
    against ``baseline``, under ``title``."""
    by = {(r.case, r.variant): r for r in rows}
    lines = ["", title]
    for r in rows:
        if r.case.endswith(" full") and r.variant.startswith("aefast"):
            base = by[(r.case, baseline)]
            lines.append(f"  {r.case[:-5]:<28} {r.variant:<14} {base.seconds / r.seconds:5.2f}x faster, "
                         f"peak memory {r.peak_bytes / max(base.peak_bytes, 1):.2f}x of {baseline}")
    return "\n".join(lines)


def peak_memory_bytes(fn: Callable[[], object], device: str = "cpu") -> int:
    """Peak bytes allocated while ``fn()`` runs, above what was live before it.

    CUDA: the caching allocator's peak counter. CPU: the profiler's allocator events
    (every c10 CPU allocation, kernel-internal buffers included), summed in time order.
    """
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Allocations are charged to the op that made them (its self usage, so nesting does not
    # count twice); frees of tensors outliving their op show as standalone "[memory]" events.
    deltas = sorted((e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
                    for e in prof.events())
    live = peak = 0
    for _, delta in deltas:
        live += delta
        peak = max(peak, live)
    return peak


@dataclass
class Row:
    case: str
    variant: str
    seconds: float
    peak_bytes: int
    flops: float = 0.0
    bytes_moved: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def gflops(self) -> float:
        return self.flops / self.seconds / 1e9 if self.seconds else 0.0

    @property
    def gbps(self) -> float:
        return self.bytes_moved / self.seconds / 1e9 if self.seconds else 0.0


def cpu_model() -> str:
    """The CPU's model name and the SIMD level torch dispatches to (platform.processor() is empty on
    Linux; these hosts have been AMD EPYC and Intel Xeon, whose ratios differ)."""
    name = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name} ({torch.backends.cpu.get_cpu_capability()})"


def environment(device: str) -> dict:
    env = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": cpu_model(),
        "cpu_threads": torch.get_num_threads(),
        "device": device,
    }
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(0)
        try:
            import subprocess

            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, check=False).stdout.strip()
        except OSError:
            env["driver"] = "unknown"
    return env


def ratio_table(rows: list[Row], baseline: str, *, peak_gflops: float | None = None,
                peak_gbps: float | None = None) -> str:
    """Markdown: each variant's time, speedup over ``baseline``, peak memory and its ratio, and
    achieved GFLOP/s and GB/s against the machine's limits. The GFLOP/s (GB/s) column is left out
    when no row carries a FLOP (byte) count, rather than printed as a column of zeros. A row whose
    ``extra`` holds ``copy_gbps_at_size`` (the copy rate for its working set, see copy_gbps) is
    compared with that instead of ``peak_gbps``: in-cache tensors move faster than the 64 MiB figure."""
    show_gf = any(r.flops for r in rows)
    show_gb = any(r.bytes_moved for r in rows)
    header = "| case | variant | median ms | speedup vs " + baseline + " | peak MiB | memory ratio |"
    header += " GFLOP/s |" * show_gf + " GB/s |" * show_gb
    lines = [header, "|" + "---|" * (6 + show_gf + show_gb)]
    by_case: dict[str, dict[str, Row]] = {}
    for r in rows:
        by_case.setdefault(r.case, {})[r.variant] = r
    for case, variants in by_case.items():
        base = variants.get(baseline)
        for name, r in variants.items():
            speed = f"{base.seconds / r.seconds:.2f}x" if base and r.seconds else "-"
            mem = f"{r.peak_bytes / base.peak_bytes:.2f}" if base and base.peak_bytes else "-"
            line = f"| {case} | {name} | {1e3 * r.seconds:.3f} | {speed} | {r.peak_bytes / 2**20:.1f} | {mem} |"
            if show_gf:
                line += f" {r.gflops:.1f}" + (f" ({100 * r.gflops / peak_gflops:.0f}% of peak)"
                                              if peak_gflops and r.flops else "") + " |"
            if show_gb:
                row_peak = r.extra.get("copy_gbps_at_size") or peak_gbps
                line += f" {r.gbps:.1f}" + (f" ({100 * r.gbps / row_peak:.0f}% of copy)"
                                            if row_peak and r.bytes_moved else "") + " |"
            lines.append(line)
    return "\n".join(lines)


def kernel_ledger_table(rows: list[Row], peak_gflops: float | None, peak_gbps: float | None) -> str:
    """Markdown, one section per kernel (``extra["kernel"]``, in order of appearance) with one
    row per (case, variant): time, the amount the kernel must do (``Row.flops``, or
    ``Row.bytes_moved`` for a memory-bound one), the rate and its fraction of the machine's limit
    measured in the same run (the GEMM peak in GFLOP/s, or the copy GB/s: a row's
    ``extra["copy_gbps_at_size"]`` when given, for in-cache working sets), and the ``extra``
    fields ``executes`` (what the variant executes against the counted amount), ``rule`` (True:
    the variant the dispatch rule takes) and ``verdict``; a kernel's ``extra["counted_as"]`` (what
    its amount counts) heads its section."""
    sections: dict[str, list[str]] = {}
    counted_as: dict[str, str] = {}
    for r in rows:
        e = r.extra
        counted_as.setdefault(e.get("kernel", ""), e.get("counted_as", ""))
        if r.flops:
            amount, rate = f"{r.flops / 1e9:.3g} GFLOP", f"{r.gflops:.1f} GFLOP/s"
            limit = f"{100 * r.gflops / peak_gflops:.0f}% of GEMM peak" if peak_gflops else "-"
        else:
            row_peak = e.get("copy_gbps_at_size") or peak_gbps
            amount, rate = f"{r.bytes_moved / 1e6:.3g} MB", f"{r.gbps:.1f} GB/s"
            limit = f"{100 * r.gbps / row_peak:.0f}% of copy" if row_peak else "-"
        rule = "yes" if e.get("rule") else ""
        sections.setdefault(e.get("kernel", ""), []).append(
            f"| {e.get('case', r.case)} | {r.variant} | {rule} | {1e3 * r.seconds:.3f} | {amount} | {rate} | {limit} "
            f"| {e.get('executes', '')} | {e.get('verdict', '')} |")
    header = ["| case | variant | rule | ms | counted | rate | % of limit | executes | verdict |", "|" + "---|" * 9]
    return "\n\n".join(f"### {kernel}\n\n" + (f"{counted_as[kernel]}\n\n" if counted_as[kernel] else "")
                       + "\n".join(header + lines) for kernel, lines in sections.items())


def write_results(name: str, rows: list[Row], device: str, table: str, out_dir: str | None = None,
                  extra: dict | None = None) -> str:
    """Writes <name>.json, <name>.md and <name>.png under out_dir (default bench/out or $OUT);
    ``extra`` adds top-level keys to the JSON (e.g. the per-kernel breakdowns)."""
    out_dir = out_dir or os.environ.get("AEFAST_BENCH_OUT") or os.path.join(os.path.dirname(__file__), "out")
    os.makedirs(out_dir, exist_ok=True)
    env = environment(device)
    payload = {"benchmark": name, "environment": env,
               "rows": [dict(asdict(r), gflops=r.gflops, gbps=r.gbps) for r in rows], **(extra or {})}
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(payload, f, indent=2)
    with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
        f.write(f"# {name}\n\n{json.dumps(env)}\n\n{table}\n")
    _plot(name, rows, os.path.join(out_dir, f"{name}.png"))
    return out_dir


def _plot(name: str, rows: list[Row], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r.case for r in rows))
    variants = list(dict.fromkeys(r.variant for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / max(len(variants), 1)
    for vi, v in enumerate(variants):
        times = [next((1e3 * r.seconds for r in rows if r.case == c and r.variant == v), 0) for c in cases]
        mems = [next((r.peak_bytes / 2**20 for r in rows if r.case == c and r.variant == v), 0) for c in cases]
        xs = [i + vi * width for i in range(len(cases))]
        axes[0].bar(xs, times, width, label=v)
        axes[1].bar(xs, mems, width, label=v)
    for ax, title in zip(axes, ("median time (ms)", "peak memory (MiB)")):
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
        ax.set_xticklabels(cases, rotation=20, ha="right", fontsize=7)
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.suptitle(name)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
