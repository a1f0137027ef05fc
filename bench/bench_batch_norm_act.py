"""BatchNorm -> activation benchmark: aefast.nn.BatchNormAct2d (batch_norm_act2d: batch statistics
and the activation in two passes forward and two backward, only BatchNorm's input kept) against eager
``nn.Sequential(nn.BatchNorm2d, activation)`` in training mode and torch.compile of the same, forward /
full (forward + backward w.r.t. the input and both BatchNorm parameters), in both memory formats, time
and peak memory, in one run.

    python bench/bench_batch_norm_act.py [--quick] [--keep-memory-mapped] [--out DIR]

Shapes are the conv -> BN -> act outputs that no pool follows in bench/architectures.py's models at
benchmark sizes (U-Net's double convs, SegNet's decoders, the conv VAE). The op is memory-bound: GB/s
counts the bytes it must move at the least (forward: x read twice, out written; full: that plus
grad_out and x read twice and grad_input written; fp32), against the copy rate for the same working
set measured in this run. Run once with and once without --keep-memory-mapped (DESIGN.md: CPU ratios
in both allocator settings). Variants run in interleaved rounds; the figure is the median over rounds.
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
from _harness import copy_gbps, interleaved_medians, module_bench_main, module_steps, step_rows  # noqa: E402

# N, C, H, W, activation
SHAPES = [
    (16, 8, 96, 96, "relu"),        # U-Net / SegNet first stage
    (16, 16, 48, 48, "relu"),       # second stage
    (16, 32, 24, 24, "relu"),       # U-Net bottom
    (128, 16, 8, 8, "leaky_relu"),  # conv VAE encoder
]
QUICK_SHAPES = [(2, 3, 5, 4, "relu"), (3, 2, 3, 3, "leaky_relu")]
ACT_MODULES = {"relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.2)}
LAYOUTS = {"NCHW": torch.contiguous_format, "channels_last": torch.channels_last}


def bench_shape(shape, layout, rounds, repeats, quick):
    n, c, h, w, act = shape
    case = f"N{n} C{c} {h}x{w} {act} {layout}"
    torch.manual_seed(0)
    eager = nn.Sequential(nn.BatchNorm2d(c), ACT_MODULES[act]())
    fused = aefast.nn.BatchNormAct2d(c, act, negative_slope=0.2)
    variants = {"eager": eager, "aefast-cpu": fused}
    if not quick:
        variants["torch.compile"] = torch.compile(copy.deepcopy(eager))
    x = torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(1)).contiguous(
        memory_format=LAYOUTS[layout]).requires_grad_()
    y_ref, y = eager(x), fused(x)  # correctness first
    if not torch.allclose(y, y_ref, rtol=1e-4, atol=1e-5):
        raise SystemExit(f"aefast-cpu disagrees with eager on {case}")
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).contiguous(memory_format=LAYOUTS[layout])
    fns = module_steps(variants, x, grad, no_grad_forward=False)
    times = interleaved_medians({(name, mode): fns[name][mode] for mode in ("fwd", "full") for name in fns},
                                rounds=rounds, repeats=repeats)
    size = x.numel() * 4
    return step_rows(case, fns, times, {"fwd": 3 * size, "full": 9 * size}, memory_bound=True,
                     extra={"copy_gbps_at_size": copy_gbps(size)})


def bench_shapes(quick, rounds, repeats):
    return [row for shape in (QUICK_SHAPES if quick else SHAPES) for layout in LAYOUTS
            for row in bench_shape(shape, layout, rounds, repeats, quick)]


def main(argv=None):
    return module_bench_main(argv, __doc__, "bench_batch_norm_act", bench_shapes, flops=False)


if __name__ == "__main__":
    main()
