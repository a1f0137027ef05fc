"""Decoder block benchmark: aefast.functional.unpool_conv_transpose2d against eager
``act(F.conv_transpose2d(F.max_unpool2d(z, idx, 2), w, b, 1, 1))`` and torch.compile of the
same composition, forward / backward / full (forward + backward), on the mirror shapes of the
encoder. Speed and peak memory are ratios to eager measured in this run; the MAC columns say
how many multiply-adds each variant executes against the dense transposed conv's count.

    python bench/bench_unpool_deconv.py [--device cuda] [--quick] [--no-compile] [--out DIR]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import aefast  # noqa: E402
from bench._harness import (CPU_SGEMM_GFLOPS, Row, add_allocator_flag, apply_allocator_flag,  # noqa: E402
                            median_time, peak_memory_bytes, ratio_table, write_results)

# The shapes and the calls live in bench/workloads.py, shared with the pytest-benchmark suite.
from bench.workloads import UNPOOL_QUICK_SHAPES as QUICK_SHAPES  # noqa: E402
from bench.workloads import UNPOOL_SHAPES as SHAPES  # noqa: E402
from bench.workloads import unpool_eager as eager_decoder, unpool_fused, unpool_inputs as make_inputs  # noqa: E402
from bench.workloads import unpool_macs  # noqa: E402


def bench_shape(name, n, c_in, c_out, hw, act, device, backend, use_compile, repeats):
    z, idx, window, w, b = make_inputs(n, c_in, c_out, hw, device)
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
            g = torch.randn_like(y)

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
    return rows


def mac_table(rows):
    lines = ["| case | variant | MACs executed (G) | dense MACs (G) | executed / dense |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.case} | {r.variant} | {r.extra['macs'] / 1e9:.3f} | {r.extra['dense_macs'] / 1e9:.3f} | "
                     f"{r.extra['macs_vs_dense']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--backend", default=None, help="aefast backend (default: cpu on CPU, cuda on CUDA)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, no torch.compile: a smoke run in seconds")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument("--out", default=None, help="output folder (default bench/out or $AEFAST_BENCH_OUT)")
    add_allocator_flag(parser)
    args = parser.parse_args(argv)
    allocator = apply_allocator_flag(args)
    backend = args.backend or args.device
    shapes = QUICK_SHAPES if args.quick else SHAPES
    use_compile = not (args.quick or args.no_compile)
    repeats = 3 if args.quick else 7
    rows = []
    for shape in shapes:
        rows.extend(bench_shape(*shape, args.device, backend, use_compile, repeats))
    peak = CPU_SGEMM_GFLOPS if args.device == "cpu" else None
    table = allocator + "\n\n" + ratio_table(rows, "eager", peak_gflops=peak)
    table += "\n\nGFLOP/s count the MACs each variant executes (2 FLOP each); the machine's sgemm peak is " \
             f"{CPU_SGEMM_GFLOPS:.0f} GFLOP/s.\n\n" + mac_table(rows)
    fallbacks = aefast.info()["fallbacks"]
    table += "\n\nfallbacks to the reference path during the run: " + (str(fallbacks) if fallbacks else "none")
    out_dir = write_results("bench_unpool_deconv", rows, args.device, table, args.out)
    print(table)
    print(f"\nwritten to {out_dir}")
    return rows


if __name__ == "__main__":
    main()
