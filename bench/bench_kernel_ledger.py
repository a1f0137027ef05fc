"""The CPU kernel ledger: every CPU kernel family of aefast, per kernel and shape, against the
machine's limits measured in the same run, and every place where two algorithms compete, side by
side with the verdict of the dispatch rule.

    python bench/bench_kernel_ledger.py [--quick] [--keep-memory-mapped] [--out DIR]

Each row times ONE raw op call (torch.ops.aefast.*, inputs prepared once; a backward row calls
the backward op on the saved tensors of one forward), so the figures are the kernels' own. Per row:
the time (median over interleaved rounds: every variant of every case once per round), the work
the kernel must do, its rate and the fraction of the limit:

- compute-bound kernels: FLOPs (2 per multiply-add) against the fp32 GEMM peak, the
  better of torch.mm of a 1024x1024 square (MKL's sgemm) and oneDNN's channels-last 3x3 conv (an
  implicit GEMM) in this process with the same thread count, measured before and after the
  timings (the better of the two; bench/_harness.py _measure_cpu_limits, cpu_limits_around). On
  these AMD cores MKL's sgemm reaches about half of oneDNN's rate, so it is not the limit. Which FLOPs are counted
  is said per kernel: the DENSE conv where the kernel must do it all (the encoder forward, the
  BatchNorm encoder, the upsampler), the POOL-SPARSE count where only one conv position per pool
  window carries a value (the encoder backward, the decoder: 1/4 of the dense count for 2x2
  pools). "executes" says what a variant actually multiplies: the vendor routes and the GEMM form
  run the dense count (4x the sparse one), Winograd F(2x2, 3x3) 16/36 of the direct multiplies.
- memory-bound kernels (batch_norm_act2d, recon_loss): bytes of the algorithm's passes against
  the copy rate for a working set of the same size, measured in this run (copy_gbps).

Variants are forced by the kernels' own switches, environment variables read per call by the
C++ code (set around each call here; see SWITCHES), or are other ops:

- "GEMM form, scalar gathers": the CUDA backend's algorithm (aefast/gemm_gather_host.h: unpool or
  im2col rows, at::mm, gather-col2im) run on the CPU by the test-only torch.ops.aefast.emulate_cuda_*
  ops, chunked at CHUNK_BYTES. Its GEMMs are MKL's; its gathers are the per-element bodies the GPU
  runs, in scalar CPU loops: an UPPER bound on a CPU GEMM form (a tuned one would vectorise them).
  It takes seconds on the workload shapes, so its figure is the one call that checks it (the
  first call, under the profiler: coarse, and said so in its name), not interleaved rounds.
- "GEMMs alone": only the GEMMs of that form, on pre-gathered operands of their shapes
  (workloads.gemm_form_steps): a LOWER bound on any GEMM form.

The rule's pick: the C++ kernels name the path they take in the profiler (RECORD_USER_SCOPE
"aefast path: ..."). The op as dispatched (every switch unset) is run once under the profiler,
and the variant whose path it took is the rule's ("yes" in the rule column); every forced variant
is checked the same way to have taken its path (one that cannot be forced on a shape, e.g. the
window-vector kernels on a large slab, is left out and said so) and to agree with the dispatched
op's outputs. The rule is not restated here: it lives once in the C++ (aefast/conv_algorithm.h,
conv_pool_winograd.cpp, conv_pool.cpp, unpool_deconv.cpp, conv_transpose_act.cpp,
conv_transpose_gemm.cpp). Verdict, on the rule's row: "kept: X faster than Y by Z%" when the rule's
variant is the fastest full implementation, else "rule takes X, but Y is Z% faster in this run"; and, where a GEMM form exists, how the rule's variant
stands against the GEMMs alone. Absolute CPU times on a shared machine are noise: run it on a
quiet one (uptime below ~1), once with and once without --keep-memory-mapped.

Shapes: every encoder / decoder layer of the W1 (1x28x28, N256) and W2 (3x128x128, N32) training
workloads (bench/workloads.py model_layers), plus one small and one odd shape per family; the
upsampler and BatchNorm families are not in W1/W2 and take bench_conv_transpose_act.py's /
W1's conv output shapes instead (said per case).
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import aefast.functional as AF  # noqa: E402
from aefast.ops.conv_pool import ACTIVATION_CODES as ACT  # noqa: E402  (the ops' int activation codes)
from bench._harness import (Row, apply_allocator_flag, bench_parser, copy_gbps, cpu_limits_around,  # noqa: E402
                            environment_switches, fallbacks_line, interleaved_medians, kernel_ledger_table,
                            result_name, write_results)
from bench.workloads import MODEL_WORKLOADS, gemm_form_steps, model_layers  # noqa: E402

ops = torch.ops.aefast
SLOPE = 0.01
ON_PAR = 0.05  # times within 5% are a tie: about the spread of interleaved medians on a quiet 2-core machine
CHUNK_BYTES = 2 << 20  # the GEMM form's batch chunks: about the L2 + a share of the L3 of these machines
S1, P1, POOL = [1, 1], [1, 1], [2, 2]  # 3x3 convs, stride 1, padding 1, 2x2 pools (the workloads')
GEMM_FORM = "GEMM form, scalar gathers (CUDA algorithm; timed once)"

# Every environment switch used, where it is read (each per call, in ONE place of the C++ code).
SWITCHES = {
    "AEFAST_ENCODER_WINOGRAD": "0|1, csrc/cpu/conv_pool_winograd.cpp encoder_uses_winograd",
    "AEFAST_ENCODER_CONV": "vendor|direct, csrc/cpu/conv_pool_winograd.cpp encoder_cpu_uses_vendor_conv",
    "AEFAST_ENCODER_BACKWARD": "sparse|vendor, csrc/cpu/conv_pool_backward.cpp backward_uses_vendor",
    "AEFAST_ENCODER_WGRAD": "entries|positions, csrc/cpu/conv_pool_backward.cpp wgrad_uses_positions",
    "AEFAST_ENCODER_DGRAD": "decoder|buckets, csrc/cpu/conv_pool_backward.cpp dgrad_uses_decoder_forward",
    "AEFAST_DECODER_WINDOW_VECTORS": "0|1, csrc/cpu/unpool_deconv.cpp use_window_vectors",
    "AEFAST_DECODER_FORWARD": "vendor|sparse, csrc/cpu/unpool_deconv.cpp decoder_forward_uses_vendor",
    "AEFAST_CONV_TRANSPOSE_FORWARD": "gather|vendor, csrc/cpu/conv_transpose_act.cpp use_gather_forward",
    "AEFAST_CONV_TRANSPOSE_GEMM": "auto|always|subpixel|never, csrc/cpu/conv_transpose_gemm.cpp conv_transpose_form",
}


@dataclass
class Variant:
    name: str
    run: Callable[[], object]
    switches: dict | None = None  # environment switches forcing it; None: another op (never the rule's pick)
    path: str | tuple | None = None  # the profiler label(s) of the path it forces (None with switches: the op's only path)
    executes: str = "counted"     # what it multiplies, against the counted FLOPs
    lower_bound: bool = False     # the GEMMs alone: a bound, not a kernel
    timed_once: bool = False      # seconds per call: its checking call is its figure (no rounds)


@dataclass
class Entry:
    kernel: str
    case: str
    amount: float                 # FLOPs counted, or bytes moved (memory_bound)
    dispatched: Callable[[], object]
    variants: list[Variant] = field(default_factory=list)
    memory_bound: bool = False
    counted_as: str = ""          # what ``amount`` counts, said once per kernel
    working_set: int = 0          # bytes of the tensor a memory-bound kernel streams (for its copy rate)
    compared: int | None = None   # leading outputs the variants must agree on (None: all)


def _tensors(out):
    return [t for t in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(t, torch.Tensor)]


PATH_LABEL = "aefast path: "  # the C++ kernels name the path they take in the profiler (RECORD_USER_SCOPE)


def run_and_paths(fn):
    """fn()'s outputs, the paths the kernels it ran say they took, and its wall time."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - start
    return out, {e.name[len(PATH_LABEL):] for e in prof.events() if e.name.startswith(PATH_LABEL)}, seconds


def check_close(name, got, want, case, compared=None):
    """A variant must compute the same thing as the dispatched op: its first ``compared`` outputs
    (all: None), the floating ones, to fp32 tolerance (indices may differ at numerical ties between
    algorithms, and with them what is saved at the argmax)."""
    for g, w in list(zip(_tensors(got), _tensors(want)))[:compared]:
        if w.is_floating_point() and w.numel() and g.shape == w.shape:
            scale = max(float(w.abs().max()), 1.0)
            if not torch.allclose(g, w, rtol=1e-3, atol=1e-3 * scale):
                raise SystemExit(f"{name} disagrees with the dispatched op on {case}: "
                                 f"max diff {float((g - w).abs().max()):.3g}")


def _randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def conv_operands(n, cin, cout, h, w, k=3, transposed=False):
    """Seeded (input, weight, bias) of a k x k conv (transposed: weight (Cin, Cout, k, k)), the
    weight scaled by 1/sqrt(fan-in)."""
    shape = (cin, cout, k, k) if transposed else (cout, cin, k, k)
    return _randn(n, cin, h, w, seed=1), _randn(*shape, seed=2, scale=1 / (cin * k * k) ** 0.5), _randn(cout, seed=3)


# ------------------------------------------------------------------------------------ shapes
def workload_layers():
    """(encoder rows (label, N, Cin, Cout, H, W), decoder rows (label, N, Cin, Cout, H, W, act)) of W1
    and W2, as their training steps run them."""
    enc, dec = [], []
    for case, name, kwargs, shape in MODEL_WORKLOADS:
        if case not in ("W1", "W2"):
            continue
        e, d = model_layers(name, kwargs, shape)
        enc += [(f"{case} {n}x{ci}->{co} {h}x{w}", n, ci, co, h, w) for n, ci, co, h, w in e]
        dec += [(f"{case} {n}x{ci}->{co} {hw}x{hw}", n, ci, co, hw, hw, act) for _, n, ci, co, hw, act in d]
    return enc, dec


# The last: a channels-last block with few output channels on a large map, where the forward's rule
# takes oneDNN's conv over Winograd (bench_encoder_blocks.py's U-Net / SegNet first stage).
ENCODER_EXTRA = [("small 4x8->16 12x12", 4, 8, 16, 12, 12), ("odd 7x17->33 15x13", 7, 17, 33, 15, 13),
                 ("U-Net 16x8->8 96x96 channels_last", 16, 8, 8, 96, 96, True)]
DECODER_EXTRA = [("small 2x8->4 8x8", 2, 8, 4, 8, 8, "relu"), ("odd 7x17->3 15x13", 7, 17, 3, 15, 13, "sigmoid"),
                 ("SegNet 16x16->16 48x48 channels_last", 16, 16, 16, 48, 48, "relu", True)]
ENCODER_QUICK = [("quick 2x1->8 12x12", 2, 1, 8, 12, 12), ("quick 2x8->16 10x9", 2, 8, 16, 10, 9),
                 ("quick 1x8->8 64x64 channels_last", 1, 8, 8, 64, 64, True)]
DECODER_QUICK = [("quick 2x8->1 8x8", 2, 8, 1, 8, 8, "sigmoid"), ("quick 1x16->24 6x7", 1, 16, 24, 6, 7, "sigmoid")]
# The upsampler (conv_transpose_act2d) is in no W1/W2 layer: bench_conv_transpose_act.py's shapes
# (N, Cin, Cout, H, W, kernel, stride, padding, output_padding, act).
UPSAMPLER = [("tutorial AE out 128x16->1 14x14 k2s2", 128, 16, 1, 14, 14, 2, 2, 0, 0, "sigmoid"),
             ("U-Net up 16x32->16 24x24 k2s2", 16, 32, 16, 24, 24, 2, 2, 0, 0, "relu"),
             ("small 2x4->3 5x5 k2s2", 2, 4, 3, 5, 5, 2, 2, 0, 0, "relu"),
             ("odd 7x17->3 9x11 k3s2p1o1", 7, 17, 3, 9, 11, 3, 2, 1, 1, "sigmoid"),
             # FCN-8s (bench/architectures.py, N16 3x96x96): upscore2 / upscore_pool4 and upscore8
             ("FCN-8s upscore_pool4 16x4->4 6x6 k4s2", 16, 4, 4, 6, 6, 4, 2, 0, 0, None),
             ("FCN-8s upscore8 16x4->4 12x12 k16s8", 16, 4, 4, 12, 12, 16, 8, 0, 0, None)]
UPSAMPLER_QUICK = [UPSAMPLER[2], ("quick 2x3->8 4x5 k3s2p1o1", 2, 3, 8, 4, 5, 3, 2, 1, 1, "relu"),
                   ("quick 2x3->4 3x4 k16s8p4", 2, 3, 4, 3, 4, 16, 8, 4, 0, None)]
# BatchNorm -> act on the conv outputs of W1 / W2's first layers (as if BatchNorm followed them),
# bench_batch_norm_act.py's U-Net stage in channels_last, small, odd.
BN_ACT = [("W1 conv1 out 256x32 28x28", 256, 32, 28, 28, False),
          ("W2 conv1 out 32x32 128x128", 32, 32, 128, 128, False),
          ("U-Net 16x16 48x48 channels_last", 16, 16, 48, 48, True), ("small 2x3 5x4", 2, 3, 5, 4, False),
          ("odd 3x17 15x13", 3, 17, 15, 13, False)]
BN_ACT_QUICK = [BN_ACT[3], ("quick 2x5 6x7 channels_last", 2, 5, 6, 7, True)]
LOSS = [("W1 256x1x28x28", (256, 1, 28, 28)), ("W2 32x3x128x128", (32, 3, 128, 128)), ("small 4x1x8x8", (4, 1, 8, 8)),
        ("odd 3x3x15x13", (3, 3, 15, 13))]
LOSS_QUICK = [LOSS[2], ("quick 2x3x5x7", (2, 3, 5, 7))]
LOSS_KINDS = ("mse", "bce_logits")  # the autoencoders' and SegNet's losses, reduction mean


# ------------------------------------------------------------------------------------ encoder
def encoder_entries(label, n, cin, cout, h, w, channels_last=False):
    x, wt, b = conv_operands(n, cin, cout, h, w)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=layout)  # the outputs and gradients follow the input's layout
    hc, wc = h, w  # 3x3, stride 1, padding 1
    ho, wo = hc // 2, wc // 2
    k = cin * 9
    dense = 2.0 * n * cout * (2 * ho) * (2 * wo) * k  # the conv over the pooled region
    sparse = 2.0 * n * cout * ho * wo * k  # one conv position per window

    def fwd():
        return ops.conv_pool2d_forward(x, wt, b, S1, P1, ACT["relu"], SLOPE, POOL)

    forward = Entry("conv_pool2d forward (encoder)", label, dense, fwd, [
        Variant("Winograd F(2x2,3x3) + fused epilogue", fwd, {"AEFAST_ENCODER_WINOGRAD": "1"},
                "conv_pool2d_forward winograd", "16/36 of counted"),
        Variant("oneDNN conv + fused epilogue", fwd, {"AEFAST_ENCODER_WINOGRAD": "0", "AEFAST_ENCODER_CONV": "vendor"},
                "conv_pool2d_forward onednn"),
        Variant("direct (im2col strip + own GEMM + epilogue)", fwd,
                {"AEFAST_ENCODER_WINOGRAD": "0", "AEFAST_ENCODER_CONV": "direct"}, "conv_pool2d_forward direct"),
    ], compared=1,  # the pooled map (preact is z at the argmax, which a near-tie may move)
        counted_as="FLOPs counted: the DENSE conv over the pooled region, 2*N*Cout*(2*HO)*(2*WO)*Cin*9.")
    _, window, preact = fwd()
    gp = _randn(n, cout, ho, wo, seed=4).contiguous(memory_format=layout)

    def bwd():
        return ops.conv_pool2d_backward(gp, window, preact, x, wt, S1, P1, ACT["relu"], SLOPE, POOL)

    def gemm_form():
        return ops.emulate_cuda_conv_pool2d_backward(gp, window, preact, x, wt, S1, P1, ACT["relu"], SLOPE, POOL,
                                                     "none", 0.0, 0, 0.0, 1.0, CHUNK_BYTES)

    gemms = gemm_form_steps(n * hc * wc, cout, k)

    def gemms_alone():
        gemms["cols"]()   # dgrad: gz rows (every conv position) x W
        gemms["wgrad"]()  # wgrad: gz^T x im2col rows of x

    by_decoder = "conv_pool2d_backward dgrad by decoder forward"

    def sparse_switches(wgrad, dgrad):
        return {"AEFAST_ENCODER_BACKWARD": "sparse", "AEFAST_ENCODER_WGRAD": wgrad, "AEFAST_ENCODER_DGRAD": dgrad}

    backward = Entry("conv_pool2d backward (encoder dgrad + wgrad)", label, 2 * sparse, bwd, [
        Variant("sparse gather kernels, wgrad per entry, dgrad buckets", bwd,
                sparse_switches("entries", "buckets"),
                "conv_pool2d_backward sparse, wgrad per entry"),
        Variant("sparse gather kernels, wgrad per entry, dgrad = decoder forward", bwd,
                sparse_switches("entries", "decoder"),
                ("conv_pool2d_backward sparse, wgrad per entry", by_decoder)),
        Variant("sparse gather kernels, wgrad by position, dgrad buckets", bwd,
                sparse_switches("positions", "buckets"),
                "conv_pool2d_backward sparse, wgrad by position", "2.5x counted (dense wgrad)"),
        Variant("sparse gather kernels, wgrad by position, dgrad = decoder forward", bwd,
                sparse_switches("positions", "decoder"),
                ("conv_pool2d_backward sparse, wgrad by position", by_decoder), "2.5x counted (dense wgrad)"),
        Variant("scatter + oneDNN convolution_backward", bwd, {"AEFAST_ENCODER_BACKWARD": "vendor"},
                "conv_pool2d_backward scatter + onednn", "4x counted"),
        Variant(GEMM_FORM, gemm_form, executes="4x counted", timed_once=True),
        Variant("GEMMs alone (bound)", gemms_alone, executes="4x counted", lower_bound=True),
    ], counted_as="FLOPs counted: POOL-SPARSE, dgrad + wgrad at the one conv position per window that carries a "
                  "gradient, 2 x 2*N*Cout*HO*WO*Cin*9 (the dense backward is 4x that).")
    return [forward, backward]


def conv_bn_pool_entries(label, n, cin, cout, h, w, channels_last=False):
    x, wt, b = conv_operands(n, cin, cout, h, w)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    gamma, beta = 1 + 0.1 * _randn(cout, seed=5), 0.1 * _randn(cout, seed=6)
    dense = 2.0 * n * cout * h * w * cin * 9

    def fwd():
        return ops.conv_bn_pool2d_forward(x, wt, b, gamma, beta, S1, P1, 1e-5, ACT["relu"], SLOPE, POOL)

    _, window, conv_out, mean, var = fwd()
    gp = _randn(n, cout, h // 2, w // 2, seed=4)

    def bwd():
        return ops.conv_bn_pool2d_backward(gp, window, conv_out, mean, var, x, wt, gamma, beta, S1, P1, 1e-5,
                                           ACT["relu"], SLOPE, POOL, [True] * 5)

    only = "oneDNN conv + aefast BN/act/pool passes"
    return [Entry("conv_bn_pool2d forward", label, dense, fwd, [Variant(only, fwd, {})],
                  counted_as="FLOPs counted: the DENSE conv, 2*N*Cout*H*W*Cin*9 (BatchNorm's statistics need "
                             "every conv output)."),
            Entry("conv_bn_pool2d backward (dense dy: dgrad + wgrad)", label, 2 * dense, bwd,
                  [Variant("aefast dy pass + oneDNN convolution_backward", bwd, {})],
                  counted_as="FLOPs counted: DENSE dgrad + wgrad, 2x the forward (BatchNorm's gradient dy is dense).")]


# ------------------------------------------------------------------------------------ decoder
DECODER_COUNT = ("FLOPs counted: POOL-SPARSE, the pooled values only, 2*N*Cin*HP*WP*Cout*9 (the dense transposed "
                 "conv over the unpooled map is 4x that).")


def decoder_entries(label, n, cin, cout, h, w, act, channels_last=False):
    x = _randn(n, cin, h, w, seed=1)
    z, idx = F.max_pool2d(x.contiguous(memory_format=torch.channels_last) if channels_last else x, 2,
                          return_indices=True)
    window = AF.flat_to_window(idx, (h, w), 2)
    wt, b = _randn(cin, cout, 3, 3, seed=2, scale=1 / (cin * 9) ** 0.5), _randn(cout, seed=3)
    hp, wp = z.shape[2:]
    sparse = 2.0 * n * cin * hp * wp * cout * 9
    geometry = (POOL, [h, w], S1, P1, [0, 0], act, 0.0)

    def fwd():
        return ops.unpool_conv_transpose2d(z, window, wt, b, *geometry)

    def gemm_fwd():
        return ops.emulate_cuda_unpool_conv_transpose2d(z, window, wt, b, *geometry, CHUNK_BYTES)

    gemms = gemm_form_steps(n * (2 * hp) * (2 * wp), cin, cout * 9)
    # Where the rule does not take the window vectors (large slabs), "on" only lets the rule decide,
    # the per-entry path runs, and that row is dropped (the forced path was not taken).
    per_entry = "sparse gather kernels per entry (slab / band sums)"
    window_vectors = "window-vector kernels (lanes = pool windows)"
    forward = Entry("unpool_conv_transpose2d forward (decoder)", label, sparse, fwd, [
        Variant(per_entry, fwd, {"AEFAST_DECODER_WINDOW_VECTORS": "0", "AEFAST_DECODER_FORWARD": "sparse"},
                "unpool_conv_transpose2d per entry"),
        Variant(window_vectors, fwd, {"AEFAST_DECODER_WINDOW_VECTORS": "1", "AEFAST_DECODER_FORWARD": "sparse"},
                "unpool_conv_transpose2d window vectors", "4x counted (dense select)"),
        Variant("scatter + oneDNN transposed conv over the unpooled map", fwd, {"AEFAST_DECODER_FORWARD": "vendor"},
                "unpool_conv_transpose2d vendor conv", "4x counted (dense conv)"),
        Variant(GEMM_FORM, gemm_fwd, executes="4x counted", timed_once=True),
        Variant("GEMMs alone (bound)", gemms["cols"], executes="4x counted", lower_bound=True),
    ], counted_as=DECODER_COUNT)
    out, saved = fwd()
    act_input = saved if saved.numel() else out
    g = _randn(*out.shape, seed=4)

    def bwd():
        return ops.unpool_conv_transpose2d_backward(g, act_input, z, window, wt, *geometry, [True] * 3)

    def gemm_bwd():
        return ops.emulate_cuda_unpool_conv_transpose2d_backward(g, act_input, z, window, wt, *geometry, [True] * 3,
                                                                 CHUNK_BYTES)

    def gemms_bwd():
        gemms["dgrad"]()
        gemms["wgrad"]()

    backward = Entry("unpool_conv_transpose2d backward (decoder)", label, 2 * sparse, bwd, [
        Variant(per_entry, bwd, {"AEFAST_DECODER_WINDOW_VECTORS": "0"}, "unpool_conv_transpose2d_backward per entry"),
        Variant(window_vectors, bwd, {"AEFAST_DECODER_WINDOW_VECTORS": "1"},
                "unpool_conv_transpose2d_backward window vectors", "4x counted (dense select)"),
        Variant(GEMM_FORM, gemm_bwd, executes="4x counted", timed_once=True),
        Variant("GEMMs alone (bound)", gemms_bwd, executes="4x counted", lower_bound=True),
    ], counted_as=DECODER_COUNT.replace("FLOPs counted:", "FLOPs counted: grad_z + grad_W, each"))
    return [forward, backward]


def upsampler_entries(label, n, cin, cout, h, w, k, s, p, op, act):
    x, wt, b = conv_operands(n, cin, cout, h, w, k, transposed=True)
    dense = 2.0 * n * cin * h * w * cout * k * k
    geometry = ([s, s], [p, p], [op, op], act, 0.0)

    def fwd():
        return ops.conv_transpose_act2d(x, wt, b, *geometry)

    forward = Entry("conv_transpose_act2d forward (upsampler)", label, dense, fwd, [
        Variant("decoder gather kernel, 1x1 windows", fwd, {"AEFAST_CONV_TRANSPOSE_FORWARD": "gather"},
                "conv_transpose_act2d gather"),
        Variant("oneDNN transposed conv + activation pass", fwd,
                {"AEFAST_CONV_TRANSPOSE_FORWARD": "vendor", "AEFAST_CONV_TRANSPOSE_GEMM": "never"},
                "conv_transpose_act2d onednn"),
        Variant("one GEMM (at::mm) + col2im + activation pass", fwd,
                {"AEFAST_CONV_TRANSPOSE_FORWARD": "vendor", "AEFAST_CONV_TRANSPOSE_GEMM": "always"},
                "conv_transpose_act2d gemm + col2im"),
        Variant("sub-pixel GEMM (at::mm) + phase interleave + activation pass", fwd,
                {"AEFAST_CONV_TRANSPOSE_FORWARD": "vendor", "AEFAST_CONV_TRANSPOSE_GEMM": "subpixel"},
                "conv_transpose_act2d sub-pixel gemm", "(ceil(k/s)*s/k)^2 x counted (zero taps)"),
    ], counted_as="FLOPs counted: the DENSE transposed conv, 2*N*Cin*H*W*Cout*k*k.")
    out, saved = fwd()
    act_input = saved if saved.numel() else out
    g = _randn(*out.shape, seed=4)

    def bwd():
        return ops.conv_transpose_act2d_backward(g, act_input, x, wt, *geometry, [True] * 3)

    # The retired alternative: the decoder's backward kernel with 1x1 windows (every input value
    # its own window's maximum at offset 0), as the forward's gather path calls the decoder.
    offsets = torch.zeros(x.shape, dtype=torch.uint8)

    def gather_bwd():
        return ops.unpool_conv_transpose2d_backward(g, act_input, x, offsets, wt, [1, 1], [h, w], *geometry,
                                                    [True] * 3)

    backward = Entry("conv_transpose_act2d backward (dgrad + wgrad)", label, 2 * dense, bwd, [
        Variant("activation-gradient pass + oneDNN convolution_backward", bwd, {"AEFAST_CONV_TRANSPOSE_GEMM": "never"},
                "conv_transpose_act2d_backward onednn"),
        Variant("activation-gradient pass + sub-pixel GEMMs (grad_input, grad_W)", bwd,
                {"AEFAST_CONV_TRANSPOSE_GEMM": "subpixel"}, "conv_transpose_act2d_backward sub-pixel gemm",
                "(ceil(k/s)*s/k)^2 x counted (zero taps)"),
        Variant("decoder gather kernel backward, 1x1 windows (retired)", gather_bwd)],
        counted_as="FLOPs counted: DENSE dgrad + wgrad, 2x the forward.")
    return [forward, backward]


# ------------------------------------------------------------------------------------ memory-bound
BN_COUNT = ("Bytes counted: the passes' traffic (see the title), against the copy rate of a buffer of the "
            "tensor's size measured in this run.")


def batch_norm_act_entries(label, n, c, h, w, channels_last):
    x = _randn(n, c, h, w, seed=1)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    gamma, beta = 1 + 0.1 * _randn(c, seed=2), 0.1 * _randn(c, seed=3)
    size = x.numel() * x.element_size()

    def fwd():
        return ops.batch_norm_act2d_forward(x, gamma, beta, 1e-5, ACT["relu"], SLOPE)

    _, mean, var = fwd()
    g = _randn(n, c, h, w, seed=4).contiguous(memory_format=torch.channels_last if channels_last else
                                               torch.contiguous_format)

    def bwd():
        return ops.batch_norm_act2d_backward(g, x, mean, var, gamma, beta, 1e-5, ACT["relu"], SLOPE, [True] * 3)

    return [Entry("batch_norm_act2d forward (2 passes: x read twice, out written)", label, 3 * size, fwd,
                  [Variant("aefast two-pass kernel", fwd, {})], memory_bound=True, working_set=size,
                  counted_as=BN_COUNT),
            Entry("batch_norm_act2d backward (2 passes: grad_out and x read twice, grad_input written)", label,
                  5 * size, bwd, [Variant("aefast two-pass kernel", bwd, {})], memory_bound=True, working_set=size,
                  counted_as=BN_COUNT)]


def loss_entries(label, shape):
    entries = []
    for kind in LOSS_KINDS:
        x = _randn(*shape, seed=1)
        t = torch.rand(*shape, generator=torch.Generator().manual_seed(2))

        def fused(x=x, t=t, kind=kind):
            return ops.recon_loss(x, t, None, None, kind, "mean", 1.0, True, False)

        entries.append(Entry(f"recon_loss {kind}/mean, value + gradient (input, target read; grad written)", label,
                             3 * x.numel() * x.element_size(), fused, [Variant("aefast one-pass kernel", fused, {})],
                             memory_bound=True, working_set=x.numel() * x.element_size(),
                             counted_as="Bytes counted: input and target read, gradient written (3 tensor sizes), "
                                        "against the copy rate of a buffer of the tensor's size measured in this run."))
    return entries


# ------------------------------------------------------------------------------------ run
def all_entries(quick):
    """Every entry, built shape by shape as the run reaches it (so that only one shape's tensors
    and GEMM operands are alive at a time)."""
    enc, dec = workload_layers()
    enc, dec = (ENCODER_QUICK, DECODER_QUICK) if quick else (enc + ENCODER_EXTRA, dec + DECODER_EXTRA)
    for shape in enc:
        yield from encoder_entries(*shape)
    for shape in enc:
        yield from conv_bn_pool_entries(*shape)
    for shape in dec:
        yield from decoder_entries(*shape)
    for shape in (UPSAMPLER_QUICK if quick else UPSAMPLER):
        yield from upsampler_entries(*shape)
    for shape in (BN_ACT_QUICK if quick else BN_ACT):
        yield from batch_norm_act_entries(*shape)
    for label, shape in (LOSS_QUICK if quick else LOSS):
        yield from loss_entries(label, shape)


def variant_paths(v):
    """The profiler labels a variant forces, as a set (empty: none named)."""
    if v.path is None:
        return set()
    return {v.path} if isinstance(v.path, str) else set(v.path)


def resolve_variants(entry):
    """Runs the op as dispatched (every switch unset) and every variant once, under the profiler:
    checks that each variant computes the same thing and that a forced one took its path (one
    whose switch cannot force its path on this shape is left out, and said so), and marks the
    variant whose path the dispatched op took: the rule's pick. A variant of the op's only path
    (switches {}, no path) is the pick; another op (switches None) never is.
    Returns ([(variant, is_rule_pick)], paths the dispatched op took, names left out, the checking
    call's seconds of each variant)."""
    with environment_switches(dict.fromkeys(SWITCHES)):
        want, taken, _ = run_and_paths(entry.dispatched)
    kept, left_out, first_call = [], [], {}
    # A variant's path may be several labels (an op that runs two kernels, e.g. the encoder
    # backward's dgrad and wgrad): it is the rule's pick when the dispatched op took exactly its
    # labels among those the entry's variants name.
    named = {p for v in entry.variants for p in variant_paths(v)}
    for v in entry.variants:
        with environment_switches(v.switches):
            got, paths, first_call[v.name] = run_and_paths(v.run)
        if v.lower_bound:
            kept.append((v, False))
            continue
        if not variant_paths(v) <= set(paths):
            left_out.append(v.name)
            continue
        check_close(v.name, got, want, f"{entry.kernel} | {entry.case}", entry.compared)
        rule = v.switches is not None and (variant_paths(v) == named & set(taken) if v.path is not None else True)
        kept.append((v, rule))
    return kept, taken, left_out, first_call


def verdict(timed, taken, left_out):
    """timed: [(variant, is_rule, seconds)] of one case; taken: the dispatched op's paths."""
    rule = next(((v, s) for v, r, s in timed if r), None)
    full = [(v, s) for v, r, s in timed if not v.lower_bound]
    note = f" ({', '.join(left_out)}: cannot be forced on this shape)" if left_out else ""
    if rule is None:
        return f"the dispatched op took {sorted(taken) or 'no named path'}, which no variant here forces" + note
    rv, rs = rule
    if len(full) == 1:
        return "only implementation" + note
    best_s, best = min((s, v.name) for v, s in full if v is not rv)
    if abs(best_s / rs - 1) < ON_PAR:
        text = f"kept: {rv.name}, on par with {best} (within {100 * ON_PAR:.0f}%)"
    elif rs < best_s:
        text = f"kept: {rv.name} faster than {best} by {100 * (best_s / rs - 1):.0f}%"
    else:
        text = f"rule takes {rv.name}, but {best} is {100 * (rs / best_s - 1):.0f}% faster in this run"
    bound = next((s for v, r, s in timed if v.lower_bound), None)
    if bound is not None:
        text += (f"; {100 * (bound / rs - 1):.0f}% faster than even the GEMMs alone" if rs <= bound else
                 f"; the GEMMs alone take {100 * bound / rs:.0f}% of its time (a tuned GEMM form could win)")
    return text + note


def run_ledger(entries, rounds, repeats):
    rows = []
    for entry in entries:
        kept, taken, left_out, first_call = resolve_variants(entry)

        def forced(v):
            def call():
                with environment_switches(v.switches):
                    return v.run()
            return call

        medians = interleaved_medians({i: forced(v) for i, (v, _) in enumerate(kept) if not v.timed_once},
                                      rounds=rounds, repeats=repeats)
        timed = [(v, rule, first_call[v.name] if v.timed_once else medians[i]) for i, (v, rule) in enumerate(kept)]
        text = verdict(timed, taken, left_out)
        copy_rate = copy_gbps(entry.working_set) if entry.memory_bound else None
        for v, rule, seconds in timed:
            extra = {"kernel": entry.kernel, "case": entry.case, "counted_as": entry.counted_as,
                     "executes": v.executes, "rule": rule,
                     "switches": v.switches, "lower_bound": v.lower_bound, "verdict": text if rule else ""}
            if copy_rate:
                extra["copy_gbps_at_size"] = copy_rate
            rows.append(Row(f"{entry.kernel} | {entry.case}", v.name, seconds, 0,
                            flops=0.0 if entry.memory_bound else entry.amount,
                            bytes_moved=entry.amount if entry.memory_bound else 0.0, extra=extra))
        print(f"{entry.kernel} | {entry.case}: {text}", flush=True)
    return rows


def main(argv=None):
    parser = bench_parser(__doc__, quick_help="tiny shapes, one round: a smoke run")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3; --quick 1)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed calls per variant and round (default 2; --quick 1)")
    args = parser.parse_args(argv)
    allocator = apply_allocator_flag(args)
    rounds, repeats = (1, 1) if args.quick else (3, 2)
    rounds, repeats = args.rounds or rounds, args.repeats or repeats
    entries = all_entries(args.quick)
    rows, peak_gflops, peak_gbps, limits_line = cpu_limits_around(lambda: run_ledger(entries, rounds, repeats))
    table = (f"{allocator}\n{limits_line}; copy {peak_gbps:.1f} GB/s (64 MiB; memory-bound rows use the copy rate "
             f"of their own working set); {torch.get_num_threads()} threads; ISA "
             f"{['baseline', 'avx2', 'avx512'][ops.unpool_deconv_cpu_isa()]}\n\n"
             + kernel_ledger_table(rows, peak_gflops, peak_gbps)
             + "\n\nSwitches (environment variables read per call by the C++ code):\n"
             + "\n".join(f"- {name}={where}" for name, where in SWITCHES.items()))
    table += "\n\n" + fallbacks_line()
    print(table)
    out = write_results(result_name("bench_kernel_ledger", args), rows, "cpu", table + "\n", args.out)
    print(f"\nwrote {out}")
    return rows


if __name__ == "__main__":
    main()
