"""conv -> BatchNorm (training mode) -> ReLU -> max-pool benchmark: aefast.nn.ConvBNPool2d against eager
``nn.Sequential(nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d(2, return_indices=True))`` and
torch.compile of the same, forward / full (forward + backward w.r.t. the input and every parameter),
time and peak memory, in one run. Both are in training mode, so every call also updates the running
statistics.

    python bench/bench_conv_bn_pool.py [--quick] [--keep-memory-mapped] [--geometry tiling|general|all] [--out DIR]

Run it once with and once without --keep-memory-mapped (DESIGN.md: report CPU ratios in both
allocator settings). Variants are measured in interleaved rounds (each round times every variant
once; the figure is the median over rounds) so that a shared machine's load hits them alike.
GFLOP/s count the dense conv's FLOPs (forward 2*N*Cout*Hc*Wc*Cin*kh*kw, full three times that).
"""
from __future__ import annotations

import copy
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import aefast  # noqa: E402
from _harness import (CPU_SGEMM_GFLOPS, apply_allocator_flag, bench_parser, fallbacks_line,  # noqa: E402
                      interleaved_medians, module_steps, ratio_table, speedup_summary, step_rows,
                      write_results)

SHAPES = [  # N, Cin, Cout, H, W (3x3 conv, padding 1, 2x2 pool)[, pool, pool_stride, ceil_mode]
    (256, 1, 32, 28, 28),
    (64, 32, 64, 32, 32),
    (16, 64, 64, 64, 64),  # a SegNet-like stage
    (32, 3, 32, 128, 128),
    (16, 64, 64, 75, 75, 2, 2, True),  # ceil_mode: odd map, the last window clipped
    (16, 32, 64, 64, 64, 3, 2, False),  # overlapping windows
]
QUICK_SHAPES = [(4, 1, 8, 12, 12), (2, 8, 16, 10, 10), (2, 8, 16, 11, 11, 2, 2, True), (2, 4, 8, 10, 9, 3, 2, True)]


def make_models(cin, cout, pool=2, pool_stride=None, ceil_mode=False):
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(),
                          nn.MaxPool2d(pool, pool_stride, ceil_mode=ceil_mode, return_indices=True))
    fused = aefast.nn.ConvBNPool2d(cin, cout, 3, padding=1, activation="relu", pool_size=pool,
                                   pool_stride=pool_stride, ceil_mode=ceil_mode)
    fused.load_state_dict({k.replace("0.", "conv.", 1).replace("1.", "bn.", 1): v
                           for k, v in eager.state_dict().items()})
    return eager, fused


def bench_shape(shape, rounds, repeats, quick):
    n, cin, cout, h, w = shape[:5]
    case = f"N{n} C{cin}->{cout} {h}x{w}"
    if shape[5:]:
        case += " pool{}/{}{}".format(shape[5], shape[6], " ceil" if shape[7] else "")
    eager, fused = make_models(cin, cout, *shape[5:])
    variants = {"eager": eager, "aefast-cpu": fused}
    if not quick:
        variants["torch.compile"] = torch.compile(copy.deepcopy(eager))
    x = torch.randn(n, cin, h, w, generator=torch.Generator().manual_seed(1), requires_grad=True)
    # correctness first: the fused block must agree with eager on this shape (copies: stats advance)
    (ry, ridx), (y, idx) = copy.deepcopy(eager)(x), copy.deepcopy(fused)(x)
    if not torch.equal(idx, ridx) or not torch.allclose(y, ry, rtol=1e-4, atol=1e-4):
        raise SystemExit(f"aefast-cpu disagrees with eager on {case}")
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    fns = module_steps(variants, x, grad, output=lambda out: out[0])  # (pooled, indices)
    times = interleaved_medians({(name, mode): fns[name][mode] for mode in ("fwd", "full") for name in fns},
                                rounds=rounds, repeats=repeats)
    flops = 2 * n * cout * h * w * cin * 9
    return step_rows(case, fns, times, {"fwd": flops, "full": 3 * flops})


def main(argv=None):
    parser = bench_parser(__doc__)
    parser.add_argument("--geometry", default="all", choices=("tiling", "general", "all"),
                        help="only the 2x2 tiling pools, only the others (ceil_mode, overlapping), or both")
    args = parser.parse_args(argv)
    allocator = apply_allocator_flag(args)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.geometry != "all":
        shapes = [s for s in shapes if (len(s) > 5) == (args.geometry == "general")]
    rounds, repeats = (1, 2) if args.quick else (5, 3)
    rows = []
    for shape in shapes:
        rows += bench_shape(shape, rounds, repeats, args.quick)
    table = allocator + "\n\n" + ratio_table(rows, "eager", peak_gflops=CPU_SGEMM_GFLOPS)
    summary = speedup_summary(rows, "full (fwd+bwd, training mode) speedup and peak-memory ratio of aefast vs eager:")
    print(table + summary)
    print(fallbacks_line())
    out = write_results("bench_conv_bn_pool" + ("_quick" if args.quick else ""), rows, "cpu",
                        table + "\n" + summary + "\n", args.out)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
