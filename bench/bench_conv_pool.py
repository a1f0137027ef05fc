"""Encoder block benchmark: aefast.conv_pool2d against eager
``F.max_pool2d(F.relu(F.conv2d(x, w, b, 1, 1)), 2, return_indices=True)`` and torch.compile of
the same, forward / backward / full (forward + backward), time and peak memory, in one run.

    python bench/bench_conv_pool.py [--device cuda] [--quick] [--geometry tiling|general|all] [--out DIR]

--geometry general times the pools beyond the 2x2 tiling instead (GENERAL_SHAPES: FCN-8s's ceil_mode
pool on an odd map, AlexNet-style overlapping 3x3 stride 2), against the same eager block with that
max_pool2d.

The input requires grad on every shape (so dgrad is timed too). Variants are measured in
interleaved rounds (each round times every variant once, the figure is the median over rounds)
so that a shared machine's load hits them alike. GFLOP/s count the DENSE conv's FLOPs for every
variant (forward 2*N*Cout*Hc*Wc*Cin*kh*kw, backward twice that), so they compare as speeds;
aefast's sparse backward does about a quarter of them.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from _harness import (CPU_SGEMM_GFLOPS, Row, apply_allocator_flag, bench_parser, interleaved_medians,  # noqa: E402
                      peak_memory_bytes, ratio_table, speedup_summary, synchronize, write_results)
# The shapes and the calls live in workloads.py, shared with the pytest-benchmark suite.
from workloads import CONV_POOL_QUICK_SHAPES as QUICK_SHAPES  # noqa: E402
from workloads import CONV_POOL_SHAPES as SHAPES  # noqa: E402
from workloads import conv_pool_case, conv_pool_flops, conv_pool_fused, conv_pool_inputs  # noqa: E402
from workloads import conv_pool_eager as eager_block  # noqa: E402

import aefast  # noqa: E402
import aefast.functional as AF  # noqa: E402


# (N, Cin, Cout, H, W, pool, pool_stride, ceil_mode): 3x3 conv, padding 1, then that pool.
GENERAL_SHAPES = [
    (16, 64, 64, 75, 75, 2, 2, True),  # FCN-8s: odd map, the last window clipped
    (16, 128, 128, 37, 37, 2, 2, True),
    (16, 32, 64, 64, 64, 3, 2, False),  # overlapping windows
]
GENERAL_QUICK_SHAPES = [(2, 8, 16, 11, 11, 2, 2, True), (2, 4, 8, 10, 9, 3, 2, True)]


def general_blocks(pool, pool_stride, ceil_mode):
    def eager(x, w, b):
        return F.max_pool2d(F.relu(F.conv2d(x, w, b, 1, 1)), pool, pool_stride, ceil_mode=ceil_mode,
                            return_indices=True)

    def fused(backend):
        def run(x, w, b):
            with aefast.set_backend(backend):
                return AF.conv_pool2d(x, w, b, 1, 1, "relu", pool, pool_stride=pool_stride, ceil_mode=ceil_mode)
        return run
    return eager, fused


def make_variants(device, quick, eager=eager_block, fused=conv_pool_fused):
    variants = {"eager": eager}
    if not quick:
        variants["torch.compile"] = torch.compile(eager)
    backends = ["cuda", "triton"] if device == "cuda" else ["cpu"]
    for name in backends:
        variants[f"aefast-{name}"] = fused(name)
    return variants


def bench_shape(shape, device, variants, rounds, repeats):
    geometry = shape[5:]
    shape = shape[:5]
    eager_block = variants["eager"]
    inputs = conv_pool_inputs(shape, device)
    g = torch.Generator().manual_seed(1)
    fwd_flops = conv_pool_flops(shape)
    case = conv_pool_case(shape)
    if geometry:
        case += " pool{}/{}{}".format(geometry[0], geometry[1], " ceil" if geometry[2] else "")

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

    times = interleaved_medians({(name, mode): fns[name][mode] for mode in ("fwd", "bwd", "full") for name in fns},
                                device, rounds=rounds, repeats=repeats)
    rows = []
    for name in fns:
        for mode, flops in (("fwd", fwd_flops), ("bwd", 2 * fwd_flops), ("full", 3 * fwd_flops)):
            seconds = times.get((name, mode)) or max(1e-9, times[(name, "full")] - times[(name, "fwd")])
            fn = fns[name][mode] or fns[name]["full"]
            peak = peak_memory_bytes(fn, device)
            rows.append(Row(f"{case} {mode}", name, seconds, peak, flops=flops))
    synchronize(device)
    return rows


def main(argv=None):
    parser = bench_parser(__doc__, devices=("cpu", "cuda"))
    parser.add_argument("--geometry", default="tiling", choices=("tiling", "general", "all"),
                        help="the 2x2 tiling pool (default), the GENERAL_SHAPES pools, or both")
    args = parser.parse_args(argv)
    allocator = apply_allocator_flag(args)
    shapes, general = (QUICK_SHAPES, GENERAL_QUICK_SHAPES) if args.quick else (SHAPES, GENERAL_SHAPES)
    rounds, repeats = (1, 2) if args.quick else (5, 3)
    rows = []
    if args.geometry in ("tiling", "all"):
        variants = make_variants(args.device, args.quick)
        for shape in shapes:
            rows += bench_shape(shape, args.device, variants, rounds, repeats)
    if args.geometry in ("general", "all"):
        for shape in general:
            eager, fused = general_blocks(*shape[5:])
            rows += bench_shape(shape, args.device, make_variants(args.device, args.quick, eager, fused), rounds,
                                repeats)
    peak = CPU_SGEMM_GFLOPS if args.device == "cpu" else None
    table = allocator + "\n\n" + ratio_table(rows, "eager", peak_gflops=peak)
    print(table)
    summary = speedup_summary(rows, "full (fwd+bwd) speedup and peak-memory ratio of aefast vs eager:")
    print(summary)
    out = write_results("bench_conv_pool" + ("_quick" if args.quick else "") +
                        ("" if args.geometry == "tiling" else "_" + args.geometry) + ("_cuda" if args.device == "cuda" else ""),
                        rows, args.device, table + "\n" + summary + "\n", args.out)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
