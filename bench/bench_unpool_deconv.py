"""Decoder block benchmark: aefast.functional.unpool_conv_transpose2d against eager
``act(F.conv_transpose2d(F.max_unpool2d(z, idx, 2), w, b, 1, 1))`` and torch.compile of the
same composition, forward / backward / full (forward + backward), on the mirror shapes of the
encoder. Speed and peak memory are ratios to eager measured in this run; the MAC columns say
how many multiply-adds each variant executes against the dense transposed conv's count.

The "vendor GEMM form" rows time only the GEMMs that a vendor-GEMM decoder would run, on
pre-gathered operands: a lower bound on any such implementation (gather, col2im and epilogue
come on top). The argmax of a pooled value is per channel, so the channels summed into one
unpooled position differ from window to window and offset to offset: a dense GEMM cannot skip
the zeros of the unpooled map, and the GEMM form executes the dense multiply-adds (pool window
times aefast's). aefast keeps its sparse kernels where they beat this bound. The fp32 GEMM peak (the better of
torch.mm's sgemm and oneDNN's conv) is measured in this run, before and after the timings (the better of the two).

    python bench/bench_unpool_deconv.py [--device cuda] [--quick] [--no-compile] [--channels-last] [--out DIR]
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench._harness import (Row, apply_allocator_flag, bench_parser, cpu_limits_around, fallbacks_line,  # noqa: E402
                            median_time, peak_memory_bytes, ratio_table, write_results)
from bench.workloads import UNPOOL_KERNEL, gemm_form_steps  # noqa: E402

# The shapes and the calls live in bench/workloads.py, shared with the pytest-benchmark suite.
from bench.workloads import UNPOOL_QUICK_SHAPES as QUICK_SHAPES  # noqa: E402
from bench.workloads import UNPOOL_SHAPES as SHAPES  # noqa: E402
from bench.workloads import unpool_eager as eager_decoder, unpool_fused, unpool_inputs as make_inputs  # noqa: E402
from bench.workloads import unpool_macs  # noqa: E402


def bench_shape(name, n, c_in, c_out, hw, act, device, backend, use_compile, repeats, channels_last=False):
    z, idx, window, w, b = make_inputs(n, c_in, c_out, hw, device)
    if channels_last:  # the pooled map and both index forms in channels_last (eager and aefast alike)
        z, idx, window = (t.contiguous(memory_format=torch.channels_last) for t in (z, idx, window))
        name = f"{name} channels_last"
    dense_macs, sparse_macs = unpool_macs(n, c_in, c_out, hw)
    leaves = [t.clone().requires_grad_() for t in (z, w, b)]
    g = None

    def fused(indices, fmt):
        return unpool_fused(backend, indices, fmt, act)

    variants = {"eager": (lambda zz, ww, bb: eager_decoder(zz, idx, ww, bb, act), dense_macs)}
    if use_compile:
        torch._dynamo.reset()  # a fresh static-shape compile per shape (no dynamic-shape recompiles)
        compiled = torch.compile(lambda zz, ww, bb: eager_decoder(zz, idx, ww, bb, act), dynamic=False)
        variants["torch.compile"] = (compiled, dense_macs)
    variants[f"aefast[{backend}] flat idx"] = (fused(idx, "flat"), sparse_macs)
    variants[f"aefast[{backend}] window idx"] = (fused(window, "window"), sparse_macs)

    rows = []
    for vname, (fn, macs) in variants.items():
        def fwd():
            with torch.no_grad():
                return fn(*leaves)

        y = fn(*leaves)
        if g is None:
            g = torch.randn_like(y)  # in y's layout (channels_last out for channels_last in)

        def bwd():
            return torch.autograd.grad(y, leaves, g, retain_graph=True)

        def full():
            out = fn(*leaves)
            return torch.autograd.grad(out, leaves, g)

        for mode, step, mode_macs in (("fwd", fwd, macs), ("bwd", bwd, 2 * macs), ("full", full, 3 * macs)):
            seconds = median_time(step, device, warmup=2, repeats=repeats)
            peak = peak_memory_bytes(step, device)
            rows.append(Row(case=f"{name} {mode}", variant=vname, seconds=seconds, peak_bytes=peak,
                            flops=2.0 * mode_macs,
                            extra={"macs": mode_macs, "dense_macs": {"fwd": 1, "bwd": 2, "full": 3}[mode] * dense_macs,
                                   "macs_vs_dense": macs / dense_macs}))
        del y
    rows.extend(gemm_form_rows(name, n, c_in, c_out, hw, device, repeats, dense_macs))
    return rows


GEMM_FORM = "vendor GEMM form (GEMMs alone)"


def gemm_form_rows(name, n, c_in, c_out, hw, device, repeats, dense_macs):
    """The GEMMs of the vendor-GEMM decoder alone (workloads.gemm_form_steps): forward the
    columns, backward dgrad and wgrad."""
    gemms = gemm_form_steps(n * hw * hw, c_in, c_out * UNPOOL_KERNEL ** 2, device)

    def bwd():
        gemms["dgrad"]()
        gemms["wgrad"]()

    def full():
        gemms["cols"]()
        bwd()

    rows = []
    for mode, step, mult in (("fwd", gemms["cols"], 1), ("bwd", bwd, 2), ("full", full, 3)):
        seconds = median_time(step, device, warmup=2, repeats=repeats)
        rows.append(Row(case=f"{name} {mode}", variant=GEMM_FORM, seconds=seconds,
                        peak_bytes=peak_memory_bytes(step, device), flops=2.0 * mult * dense_macs,
                        extra={"macs": mult * dense_macs, "dense_macs": mult * dense_macs, "macs_vs_dense": 1.0}))
    return rows


def mac_table(rows):
    lines = ["| case | variant | MACs executed (G) | dense MACs (G) | executed / dense |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.case} | {r.variant} | {r.extra['macs'] / 1e9:.3f} | {r.extra['dense_macs'] / 1e9:.3f} | "
                     f"{r.extra['macs_vs_dense']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = bench_parser(__doc__, devices=("cpu", "cuda"))
    parser.add_argument("--backend", default=None, help="aefast backend (default: cpu on CPU, cuda on CUDA)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--channels-last", action="store_true",
                        help="pooled map and indices in channels_last (outputs and gradients follow)")
    args = parser.parse_args(argv)
    allocator = apply_allocator_flag(args)
    backend = args.backend or args.device
    shapes = QUICK_SHAPES if args.quick else SHAPES
    use_compile = not (args.quick or args.no_compile)
    repeats = 3 if args.quick else 7
    def run_all():
        return [row for shape in shapes
                for row in bench_shape(*shape, args.device, backend, use_compile, repeats, args.channels_last)]

    rows, peak, _, limits_line = cpu_limits_around(run_all, args.device)
    table = allocator + ("\n" + limits_line if limits_line else "") + "\n\n" + ratio_table(rows, "eager", peak_gflops=peak)
    table += "\n\nGFLOP/s count the MACs each variant executes (2 FLOP each)" + \
             (f"; the machine's fp32 GEMM peak, measured in this run, is {peak:.0f} GFLOP/s." if peak else ".") + \
             f" \"{GEMM_FORM}\": the GEMMs a vendor-GEMM decoder would run (dense multiply-adds: the argmax is " \
             "per channel), timed alone on pre-gathered operands, a lower bound on that form.\n\n" + mac_table(rows)
    table += "\n\n" + fallbacks_line()
    out_dir = write_results("bench_unpool_deconv", rows, args.device, table, args.out)
    print(table)
    print(f"\nwritten to {out_dir}")
    return rows


if __name__ == "__main__":
    main()
