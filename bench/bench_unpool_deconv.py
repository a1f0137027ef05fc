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
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import aefast  # noqa: E402
from aefast import functional as AF  # noqa: E402
from bench._harness import (CPU_SGEMM_GFLOPS, Row, median_time, peak_memory_bytes, ratio_table,  # noqa: E402
                            write_results)

# (name, N, C_in, C_out, unpooled H=W, activation); kernel 3, stride 1, padding 1, pool 2.
SHAPES = [
    ("64->32 @14x14 N=256", 256, 64, 32, 14, "relu"),
    ("32->1 @28x28 N=256", 256, 32, 1, 28, "sigmoid"),
    ("32->3 @128x128 N=32", 32, 32, 3, 128, "sigmoid"),
]
QUICK_SHAPES = [
    ("quick 8->4 @8x8 N=2", 2, 8, 4, 8, "relu"),
    ("quick 4->1 @6x6 N=1", 1, 4, 1, 6, "sigmoid"),
]
KERNEL, STRIDE, PADDING, POOL = 3, 1, 1, 2


def eager_decoder(z, idx, w, b, act):
    y = F.conv_transpose2d(F.max_unpool2d(z, idx, POOL), w, b, STRIDE, PADDING)
    return torch.relu(y) if act == "relu" else torch.sigmoid(y)


def make_inputs(n, c_in, c_out, hw, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, hw, hw, generator=gen)
    z, idx = F.max_pool2d(x, POOL, return_indices=True)
    w = torch.randn(c_in, c_out, KERNEL, KERNEL, generator=gen) / (c_in * KERNEL * KERNEL) ** 0.5
    b = torch.randn(c_out, generator=gen)
    window = AF.flat_to_window(idx, (hw, hw), POOL)
    return [t.to(device) for t in (z, idx, window, w, b)]


def bench_shape(name, n, c_in, c_out, hw, act, device, backend, use_compile, repeats):
    z, idx, window, w, b = make_inputs(n, c_in, c_out, hw, device)
    dense_macs = n * c_in * hw * hw * c_out * KERNEL * KERNEL          # transposed conv over the unpooled map
    sparse_macs = n * c_in * (hw // POOL) ** 2 * c_out * KERNEL * KERNEL  # over the pooled values only
    leaves = [t.clone().requires_grad_() for t in (z, w, b)]
    g = None

    def fused(indices, fmt):
        def run(zz, ww, bb):
            with aefast.set_backend(backend):
                return AF.unpool_conv_transpose2d(zz, indices, ww, bb, POOL, None, STRIDE, PADDING, 0, act, fmt)
        return run

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
    args = parser.parse_args(argv)
    backend = args.backend or args.device
    shapes = QUICK_SHAPES if args.quick else SHAPES
    use_compile = not (args.quick or args.no_compile)
    repeats = 3 if args.quick else 7
    rows = []
    for shape in shapes:
        rows.extend(bench_shape(*shape, args.device, backend, use_compile, repeats))
    peak = CPU_SGEMM_GFLOPS if args.device == "cpu" else None
    table = ratio_table(rows, "eager", peak_gflops=peak)
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
