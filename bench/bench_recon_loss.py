"""Reconstruction loss forward+backward: aefast's fused kernels against eager PyTorch and
torch.compile of the same composition, for every kind and reduction, on N x 1 x 28 x 28
(N=256, MNIST-like) and N x 3 x 128 x 128 (N=32). Reports the median time, the speedup, the
peak memory and its ratio, and GB/s of the minimum traffic against the machine's copy rate.

    python bench/bench_recon_loss.py [--device cuda] [--quick] [--no-compile] [--threads N]
                                     [--keep-memory-mapped] [--out DIR]

Minimum traffic of a fused forward+backward (what any implementation must move): read input
and target, write the input gradient (3 tensor sizes). Reduction none moves 7: its forward
cannot know the incoming gradient, so it reads input and target and writes the loss (3), and
the backward reads the incoming gradient, writes the input gradient and needs dl/dx again,
either by reading input and target (2) or by reading a gradient the forward wrote (1 + 1 in
the forward): 7 either way, the same as eager's mse_loss + mse_loss_backward. per_sample
reads one incoming value per sample (negligible).

The bound printed with each mse/mean ratio: no implementation called through autograd can
take less than the fixed cost of one differentiable call (torch.autograd.grad over a
one-element x.sum(), measured now) plus its minimum traffic at the copy rate of a working
set of that size (one thread's best copy rate measured now, times the thread count: perfect
scaling, so the floor errs low); eager's time over that floor is the largest speedup any
implementation could show here.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _harness import CPU_COPY_GBPS, Row, add_allocator_flag, apply_allocator_flag, copy_gbps, median_time  # noqa: E402
from _harness import minor_faults  # noqa: E402
from _harness import peak_memory_bytes, ratio_table, write_results  # noqa: E402

import aefast  # noqa: E402

# The shapes and the calls live in workloads.py, shared with the pytest-benchmark suite.
from workloads import LOSS_KINDS as KINDS, LOSS_QUICK_SHAPES, LOSS_REDUCTIONS as REDUCTIONS, LOSS_SHAPES  # noqa: E402
from workloads import loss_case, loss_eager as eager_loss, loss_fused as aefast_loss  # noqa: E402
from workloads import loss_inputs as make_inputs, loss_min_bytes as min_bytes  # noqa: E402


def call_floor_seconds(device, repeats):
    """Fixed cost of one differentiable op called from Python plus the autograd engine: the
    fastest of many calls (a lower bound, as the floor needs; a median would carry the load)."""
    x1 = torch.ones(1, device=device, requires_grad=True)
    one = torch.ones((), device=device)
    return min(median_time(lambda: torch.autograd.grad(x1.sum(), x1, one), device, warmup=5, repeats=1)
               for _ in range(40 * repeats))


def step_fn(loss_fn, x, t, grad_out):
    def step():
        loss = loss_fn(x, t)
        return torch.autograd.grad(loss, x, grad_out(loss))

    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16", "float64"))
    p.add_argument("--quick", action="store_true", help="tiny shapes, no torch.compile: a smoke run in seconds")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's default)")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--reductions", default=",".join(REDUCTIONS))
    add_allocator_flag(p)
    p.add_argument("--out", default=None, help="output directory (default bench/out or $AEFAST_BENCH_OUT)")
    args = p.parse_args(argv)

    device, dtype = args.device, getattr(torch, args.dtype)
    allocator = apply_allocator_flag(args)
    load_start = os.getloadavg()
    shapes = LOSS_QUICK_SHAPES if args.quick else LOSS_SHAPES
    use_compile = not (args.quick or args.no_compile)
    repeats = 3 if args.quick else 7
    rounds = 1 if args.quick else 7
    if args.threads:
        torch.set_num_threads(args.threads)
    rows: list[Row] = []
    for shape in shapes:
        # The copy rate for this shape's working set (read + write of one input-sized tensor),
        # measured now: the GB/s column and the bound below compare with it.
        numel = 1
        for d in shape:
            numel *= d
        shape_gbps = copy_gbps(numel * dtype.itemsize, device)
        for kind in args.kinds.split(","):
            for reduction in args.reductions.split(","):
                x, t = make_inputs(kind, shape, device, dtype)
                ones = {}

                def grad_out(loss):  # a preallocated incoming gradient, the same for every variant
                    key = tuple(loss.shape)
                    if key not in ones:
                        ones[key] = torch.ones_like(loss)
                    return ones[key]

                variants = {"eager": eager_loss(kind, reduction), "aefast": aefast_loss(kind, reduction)}
                if use_compile:
                    torch._dynamo.reset()  # one compiled graph per case; never the recompile limit's eager fallback
                    variants["compile"] = torch.compile(eager_loss(kind, reduction), dynamic=False)
                case = loss_case(kind, reduction, shape)
                nbytes = min_bytes(x, reduction)
                steps = {name: step_fn(fn, x, t, grad_out) for name, fn in variants.items()}
                for step in steps.values():
                    step()  # compile / warm up
                # Interleaved rounds: on a shared machine the load drifts in bursts of seconds, and
                # alternating the variants exposes each of them to the same conditions. The figure
                # is the least-disturbed round's median (min over rounds of the per-round median,
                # the same rule for every variant); the median over rounds is kept in `extra`.
                times = {name: [] for name in steps}
                faults = dict.fromkeys(steps, 0)
                for _ in range(rounds):
                    for name, step in steps.items():
                        before = minor_faults()
                        times[name].append(median_time(step, device, warmup=1, repeats=repeats))
                        faults[name] += minor_faults() - before
                for name, step in steps.items():
                    peak = peak_memory_bytes(step, device)
                    rows.append(Row(case, name, min(times[name]), peak, bytes_moved=nbytes,
                                    extra={"round_medians_s": times[name],
                                           "median_of_rounds_s": statistics.median(times[name]),
                                           "copy_gbps_at_size": shape_gbps,
                                           "minor_faults_per_call": faults[name] / (rounds * (1 + repeats))}))
                # correctness guard: the benchmark compares equal results
                a = torch.autograd.grad(variants["aefast"](x, t).sum(), x)[0]
                b = torch.autograd.grad(variants["eager"](x, t).sum(), x)[0]
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
                print(f"{case}: " + ", ".join(f"{r.variant} {1e3 * r.seconds:.3f} ms" for r in rows[-len(variants):]),
                      flush=True)
    floor_call = call_floor_seconds(device, repeats)
    fallbacks = aefast.info()["fallbacks"]
    table = ratio_table(rows, "eager", peak_gbps=CPU_COPY_GBPS if device == "cpu" else None)
    summary = [f"threads: {torch.get_num_threads()}, dtype: {args.dtype}, fallbacks: {fallbacks or 'none'}, "
               f"load average (1/5/15 min) at the start {' '.join(f'{v:.2f}' for v in load_start)}, "
               f"at the end {' '.join(f'{v:.2f}' for v in os.getloadavg())} on {os.cpu_count()} CPUs",
               allocator]
    for shape in shapes:
        key = f"mse/mean {'x'.join(map(str, shape))}"
        e = next(r for r in rows if r.case == key and r.variant == "eager") if any(r.case == key for r in rows) else None
        a = next((r for r in rows if r.case == key and r.variant == "aefast"), None)
        if e and a:
            gbps = a.extra["copy_gbps_at_size"]
            floor = floor_call + a.bytes_moved / (gbps * 1e9)
            ceiling = e.seconds / floor
            a.extra.update(floor_s=floor, call_floor_s=floor_call, copy_gbps_at_size=gbps, ceiling_x=ceiling)
            summary.append(f"acceptance 5 ({key}): aefast fwd+bwd is {e.seconds / a.seconds:.2f}x eager "
                           f"F.mse_loss + backward; bound: any implementation needs >= {1e3 * floor:.3f} ms "
                           f"({1e6 * floor_call:.1f} us autograd call floor + {a.bytes_moved / 1e6:.2f} MB at "
                           f"{gbps:.0f} GB/s, {torch.get_num_threads()} x one thread's copy rate measured now at this "
                           f"size), so at most {ceiling:.2f}x "
                           f"eager here; 3x is {'within' if ceiling >= 3 else 'BEYOND'} that bound; minor page faults "
                           f"per call: eager {e.extra['minor_faults_per_call']:.0f}, aefast "
                           f"{a.extra['minor_faults_per_call']:.0f}")
    table = "\n".join(summary) + "\n\n" + table
    out = write_results("bench_recon_loss" + ("_quick" if args.quick else ""), rows, device, table, args.out)
    print(table)
    print(f"results in {out}")
    if fallbacks:
        print("WARNING: reference fallbacks happened during the benchmark:", fallbacks)
    return rows


if __name__ == "__main__":
    main()
