"""Upsampler benchmark: aefast.nn.ConvTransposeAct2d (conv_transpose_act2d: the vendor's transposed
conv with bias -> activation fused into one pass over its output, and the activation's gradient made
in one pass that feeds the vendor's backward) against eager ``nn.Sequential(nn.ConvTranspose2d,
activation)`` and torch.compile of the same, forward / full (forward + backward w.r.t. the input
and every parameter), time and peak memory, in one run.

    python bench/bench_conv_transpose_act.py [--quick] [--keep-memory-mapped] [--out DIR]

Shapes are the upsamplers of bench/architectures.py's decoders at benchmark sizes (U-Net, conv VAE,
tutorial AE: stride 2; FCN-8s: stride 2 and 8). Run once with and once without --keep-memory-mapped
(DESIGN.md: CPU ratios in both allocator settings). Variants run in interleaved rounds; the figure is the median over rounds.
GFLOP/s count the dense transposed conv's FLOPs (forward 2*N*Cin*H*W*Cout*kh*kw, full three times that).
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
from _harness import interleaved_medians, module_bench_main, module_steps, step_rows  # noqa: E402

# N, Cin, Cout, H, W (input size), kernel, stride, padding, output_padding, activation
SHAPES = [
    (16, 32, 16, 24, 24, 2, 2, 0, 0, "relu"),         # U-Net up: 2x2 stride 2
    (128, 16, 8, 4, 4, 3, 2, 1, 1, "leaky_relu"),     # conv VAE: 3x3 stride 2, output_padding 1
    (128, 4, 16, 7, 7, 2, 2, 0, 0, "relu"),           # tutorial AE, first upsampler
    (128, 16, 1, 14, 14, 2, 2, 0, 0, "sigmoid"),      # tutorial AE, image out
    (16, 64, 32, 48, 48, 2, 2, 0, 0, "relu"),         # a wider U-Net stage
    (16, 4, 4, 6, 6, 4, 2, 0, 0, None),               # FCN-8s upscore_pool4: 4x4 stride 2, scores
    (16, 4, 4, 12, 12, 16, 8, 0, 0, None),            # FCN-8s upscore8: 16x16 stride 8 (sub-pixel GEMM)
]
QUICK_SHAPES = [(2, 4, 3, 5, 5, 2, 2, 0, 0, "relu"), (2, 3, 2, 4, 4, 3, 2, 1, 1, "sigmoid"),
                (2, 3, 4, 3, 3, 16, 8, 4, 0, None)]
ACT_MODULES = {"relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.2), "sigmoid": nn.Sigmoid, None: nn.Identity}


def make_models(cin, cout, k, s, p, op, act):
    torch.manual_seed(0)
    eager = nn.Sequential(nn.ConvTranspose2d(cin, cout, k, stride=s, padding=p, output_padding=op), ACT_MODULES[act]())
    fused = aefast.nn.ConvTransposeAct2d(cin, cout, k, stride=s, padding=p, output_padding=op, activation=act,
                                         negative_slope=0.2)
    fused.load_state_dict({k.replace("0.", "", 1): v for k, v in eager.state_dict().items()})
    return eager, fused


def bench_shape(shape, rounds, repeats, quick):
    n, cin, cout, h, w, k, s, p, op, act = shape
    case = f"N{n} C{cin}->{cout} {h}x{w} k{k} s{s} {act}"
    eager, fused = make_models(cin, cout, k, s, p, op, act)
    variants = {"eager": eager, "aefast-cpu": fused}
    if not quick:
        variants["torch.compile"] = torch.compile(copy.deepcopy(eager))
    x = torch.randn(n, cin, h, w, generator=torch.Generator().manual_seed(1), requires_grad=True)
    y_ref, y = eager(x), fused(x)  # correctness first
    if not torch.allclose(y, y_ref, rtol=1e-4, atol=1e-5):
        raise SystemExit(f"aefast-cpu disagrees with eager on {case}")
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    fns = module_steps(variants, x, grad)
    times = interleaved_medians({(name, mode): fns[name][mode] for mode in ("fwd", "full") for name in fns},
                                rounds=rounds, repeats=repeats)
    flops = 2 * n * cin * h * w * cout * k * k
    return step_rows(case, fns, times, {"fwd": flops, "full": 3 * flops})


def bench_shapes(quick, rounds, repeats):
    return [row for shape in (QUICK_SHAPES if quick else SHAPES) for row in bench_shape(shape, rounds, repeats, quick)]


def main(argv=None):
    return module_bench_main(argv, __doc__, "bench_conv_transpose_act", bench_shapes, flops=True)


if __name__ == "__main__":
    main()
