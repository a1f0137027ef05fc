"""Encoder block benchmark: aefast.conv_pool2d against eager
``F.max_pool2d(F.relu(F.conv2d(x, w, b, 1, 1)), 2, return_indices=True)`` and torch.compile of
the same, forward / backward / full (forward + backward), time and peak memory, in one run.

    python bench/bench_conv_pool.py [--device cuda] [--quick] [--out DIR]

The input requires grad on every shape (so dgrad is timed too). Variants are measured in
interleaved rounds (each round times every variant once, the figure is the median over rounds)
so that a shared machine's load hits them alike. GFLOP/s count the DENSE conv's FLOPs for every
variant (forward 2*N*Cout*Hc*Wc*Cin*kh*kw, backward twice that), so they compare as speeds;
aefast's sparse backward does about a quarter of them.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import aefast  # noqa: E402
import aefast.functional as AF  # noqa: E402
from _harness import (CPU_SGEMM_GFLOPS, Row, median_time, peak_memory_bytes, ratio_table,  # noqa: E402
                      synchronize, write_results)

SHAPES = [  # N, Cin, Cout, H, W  (3x3 conv, stride 1, padding 1, relu, 2x2 pool)
    (256, 1, 32, 28, 28),
    (256, 32, 64, 14, 14),
    (32, 3, 32, 128, 128),
]
QUICK_SHAPES = [(4, 1, 8, 12, 12), (2, 8, 16, 10, 10)]


def eager_block(x, w, b):
    return F.max_pool2d(F.relu(F.conv2d(x, w, b, 1, 1)), 2, return_indices=True)


def make_variants(device, quick):
    variants = {"eager": eager_block}
    if not quick:
        variants["torch.compile"] = torch.compile(eager_block)
    backends = ["cuda", "triton"] if device == "cuda" else ["cpu"]
    for name in backends:
        def fused(x, w, b, _name=name):
            with aefast.set_backend(_name):
                return AF.conv_pool2d(x, w, b, 1, 1, "relu", 2)
        variants[f"aefast-{name}"] = fused
    return variants


def bench_shape(shape, device, variants, rounds, repeats):
    n, cin, cout, h, w = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, cin, h, w, generator=g).to(device).requires_grad_()
    wt = (torch.randn(cout, cin, 3, 3, generator=g) / (3 * cin ** 0.5)).to(device).requires_grad_()
    b = torch.randn(cout, generator=g).to(device).requires_grad_()
    inputs = (x, wt, b)
    fwd_flops = 2.0 * n * cout * h * w * cin * 9
    case = f"N{n} {cin}->{cout} {h}x{w}"

    fns = {}
    for name, fn in variants.items():
        # correctness first: every variant must agree with eager on this shape
        y, idx = fn(*inputs)
        ry, ridx = eager_block(*inputs)
        if not torch.equal(idx, ridx) or not torch.allclose(y, ry, rtol=1e-4, atol=1e-4):
            raise SystemExit(f"{name} disagrees with eager on {case}")
        grad = torch.randn(y.shape, generator=g).to(device)

        def forward(fn=fn):
            with torch.no_grad():
                return fn(*inputs)

        def full(fn=fn, grad=grad):
            y, _ = fn(*inputs)
            return torch.autograd.grad(y, inputs, grad)

        y_kept, _ = fn(*inputs)

        def backward(y_kept=y_kept, grad=grad):
            return torch.autograd.grad(y_kept, inputs, grad, retain_graph=True)

        try:
            backward()
        except RuntimeError:  # a compiled graph that cannot be replayed: time it as full - forward
            backward = None
        fns[name] = {"fwd": forward, "bwd": backward, "full": full}

    times = {(name, mode): [] for name in fns for mode in ("fwd", "bwd", "full")}
    for _ in range(rounds):
        for mode in ("fwd", "bwd", "full"):
            for name in fns:
                fn = fns[name][mode]
                if fn is not None:
                    times[(name, mode)].append(median_time(fn, device, warmup=1, repeats=repeats))
    rows = []
    for name in fns:
        for mode, flops in (("fwd", fwd_flops), ("bwd", 2 * fwd_flops), ("full", 3 * fwd_flops)):
            ts = times[(name, mode)]
            if not ts:
                ts = [max(1e-9, statistics.median(times[(name, "full")]) - statistics.median(times[(name, "fwd")]))]
            fn = fns[name][mode] or fns[name]["full"]
            peak = peak_memory_bytes(fn, device)
            rows.append(Row(f"{case} {mode}", name, statistics.median(ts), peak, flops=flops))
    synchronize(device)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--quick", action="store_true", help="tiny shapes, no torch.compile: a smoke run")
    parser.add_argument("--out", default=None, help="output folder (default bench/out or $AEFAST_BENCH_OUT)")
    args = parser.parse_args(argv)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    rounds, repeats = (1, 2) if args.quick else (5, 3)
    variants = make_variants(args.device, args.quick)
    rows = []
    for shape in shapes:
        rows += bench_shape(shape, args.device, variants, rounds, repeats)
    peak = CPU_SGEMM_GFLOPS if args.device == "cpu" else None
    table = ratio_table(rows, "eager", peak_gflops=peak)
    print(table)
    summary = ["", "full (fwd+bwd) speedup and peak-memory ratio of aefast vs eager:"]
    by = {(r.case, r.variant): r for r in rows}
    for r in rows:
        if r.case.endswith(" full") and r.variant.startswith("aefast"):
            base = by[(r.case, "eager")]
            summary.append(f"  {r.case[:-5]:<24} {r.variant:<14} {base.seconds / r.seconds:5.2f}x faster, "
                           f"peak memory {r.peak_bytes / max(base.peak_bytes, 1):.2f}x of eager")
    print("\n".join(summary))
    out = write_results("bench_conv_pool" + ("_quick" if args.quick else "") + ("_cuda" if args.device == "cuda" else ""),
                        rows, args.device, table + "\n" + "\n".join(summary) + "\n", args.out)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
