"""Per-kernel breakdown of one profiled step against the machine's limits.

One call of ``profile_breakdown(fn)`` runs ``fn`` under torch.profiler (record_shapes) and
attributes the step's time to the kernels it ran: each OUTERMOST dispatcher op whose name is in
``FORMULAS`` (aten::conv2d, aefast::conv_pool2d_forward, ...) becomes one kernel call, with its
inclusive time; its nested ops (aten::convolution -> aten::mkldnn_convolution, the aten::empty
of its outputs) are part of it. Ops not in the table are kept with their time only and marked
unmodelled. Wrappers that are not ops (autograd nodes, Python autograd Functions,
Optimizer.step) are looked through. What is left of the step's wall time (Python, the autograd
engine, the profiler itself) is the "(outside ops)" row.

For each kernel the table gives, from the recorded input shapes, dtypes and scalar arguments:

- FLOPs EXECUTED. Convolutions and GEMMs: 2 x the multiply-adds the kernel performs (bias,
  activation, pool comparisons not counted, as torch.utils.flop_counter does). For eager convs
  that is the dense count; for aefast's sparse ops it is what they actually execute (see each
  formula: the encoder's backward and the decoder touch one conv position per pool window, so
  1/(pool window) of the dense count). Elementwise, pooling and loss ops: a nominal count per
  element (stated at each formula); they are memory-bound by construction and the figure only
  places them against the compute roof.
- Minimum bytes: every input tensor read once plus every output written once (dtype sizes;
  uint8 window offsets, int64 flat indices). Temporaries a kernel makes (oneDNN's full-resolution
  conv output inside conv_pool2d_forward, an im2col buffer) are not minimum traffic and are not
  counted: a kernel far above its memory roof shows where they cost.
- Which limit binds: the roofline. The time the op needs at the machine's measured fp32 GEMM peak
  (flops / peak) against the time it needs at the copy bandwidth (bytes / bandwidth); the larger
  one is the limit that binds (compute if the op's FLOP/byte exceeds the machine's balance,
  peak GFLOP/s / peak GB/s), and "% of roof" is that minimum time over the measured time.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

# ---------------------------------------------------------------------------------------------
# dtype names as the profiler records them (FunctionEvent.input_dtypes).
DTYPE_BYTES = {"float": 4, "double": 8, "c10::Half": 2, "c10::BFloat16": 2, "long int": 8, "int": 4,
               "short int": 2, "unsigned char": 1, "signed char": 1, "bool": 1,
               "c10::Float8_e4m3fn": 1, "c10::Float8_e5m2": 1}


@dataclass
class Cost:
    flops: float        # FLOPs executed
    bytes: float        # minimum bytes moved
    family: str         # conv, gemm, elementwise, pool, loss, index, view
    dense_flops: float = 0.0  # the dense equivalent, where the op is sparse (else = flops)


class _Call:
    """One recorded op call: shapes, dtypes, scalar arguments by position."""

    def __init__(self, shapes, dtypes, args):
        self.shapes, self.dtypes, self.args = list(shapes), list(dtypes), list(args)

    def is_tensor(self, i) -> bool:
        return i < len(self.dtypes) and self.dtypes[i] in DTYPE_BYTES

    def shape(self, i):
        return list(self.shapes[i])

    def numel(self, i) -> int:
        return math.prod(self.shapes[i]) if self.is_tensor(i) else 0

    def esize(self, i) -> int:
        return DTYPE_BYTES.get(self.dtypes[i], 0) if i < len(self.dtypes) else 0

    def nbytes(self, i) -> int:
        return self.numel(i) * self.esize(i)

    def arg(self, i, default=None):
        v = self.args[i] if i < len(self.args) else None
        return default if v is None else v

    def tensor_bytes(self) -> int:
        return sum(self.nbytes(i) for i in range(len(self.shapes)))

    def first_float_size(self) -> int:
        return next((self.esize(i) for i in range(len(self.dtypes))
                     if self.dtypes[i] in ("float", "double", "c10::Half", "c10::BFloat16")), 4)


def _pair(v, default):
    if v is None or v == []:
        v = default
    if isinstance(v, int):
        return v, v
    v = list(v)
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


# ---------------------------------------------------------------------------------------------
# Convolutions. Dense forward MACs of a conv: N * Cout * Ho * Wo * (Cin/groups) * KH * KW; of a
# transposed conv: N * Cin * H * W * (Cout/groups) * KH * KW (each input value scatters its
# footprint), i.e. N * H * W * weight.numel() -- torch.utils.flop_counter's conv_flop_count.
def conv_out_hw(h, w, k, stride, padding, dilation, transposed=False, output_padding=(0, 0)):
    (sh, sw), (ph, pw), (dh, dw), (oph, opw) = stride, padding, dilation, output_padding
    if transposed:
        return ((h - 1) * sh - 2 * ph + dh * (k[0] - 1) + oph + 1,
                (w - 1) * sw - 2 * pw + dw * (k[1] - 1) + opw + 1)
    return ((h + 2 * ph - dh * (k[0] - 1) - 1) // sh + 1, (w + 2 * pw - dw * (k[1] - 1) - 1) // sw + 1)


def conv_macs(x_shape, w_shape, out_shape, transposed) -> int:
    """Dense MACs; x (N, C, H, W), weight as stored, out (N, C', Ho, Wo)."""
    if transposed:
        return x_shape[0] * math.prod(x_shape[2:]) * math.prod(w_shape)
    return out_shape[0] * math.prod(out_shape[1:]) * math.prod(w_shape[1:])


def _conv(c: _Call, x, wt, b, stride, padding, dilation, transposed, output_padding, groups) -> Cost:
    xs, ws = c.shape(x), c.shape(wt)
    stride, dilation, output_padding = _pair(stride, 1), _pair(dilation, 1), _pair(output_padding, 0)
    k = ws[2:]
    if padding is None:  # padding="same" (a str the profiler does not record): output = input / stride
        ho, wo = -(-xs[2] // stride[0]), -(-xs[3] // stride[1])
    else:
        ho, wo = conv_out_hw(xs[2], xs[3], k, stride, _pair(padding, 0), dilation, transposed, output_padding)
    cout = ws[1] * groups if transposed else ws[0]
    out = [xs[0], cout, ho, wo]
    macs = conv_macs(xs, ws, out, transposed)
    out_bytes = math.prod(out) * c.esize(x)
    return Cost(2.0 * macs, c.nbytes(x) + c.nbytes(wt) + (c.nbytes(b) if b is not None else 0) + out_bytes, "conv")


def f_conv2d(c):  # conv2d(input, weight, bias, stride, padding, dilation, groups)
    return _conv(c, 0, 1, 2, c.arg(3), c.args[4] if len(c.args) > 4 else 0, c.arg(5), False, 0, c.arg(6, 1))


def f_conv_transpose2d(c):  # conv_transpose2d(input, weight, bias, stride, padding, output_padding, groups, dilation)
    return _conv(c, 0, 1, 2, c.arg(3), c.arg(4, 0), c.arg(7), True, c.arg(5), c.arg(6, 1))


def f_convolution(c):  # convolution / _convolution(input, weight, bias, stride, padding, dilation, transposed, output_padding, groups, ...)
    return _conv(c, 0, 1, 2, c.arg(3), c.arg(4, 0), c.arg(5), bool(c.arg(6, False)), c.arg(7), c.arg(8, 1))


def f_mkldnn_convolution(c):  # mkldnn_convolution(input, weight, bias, padding, stride, dilation, groups)
    return _conv(c, 0, 1, 2, c.arg(4), c.arg(3, 0), c.arg(5), False, 0, c.arg(6, 1))


def f_convolution_backward(c):
    """convolution_backward(grad_output, input, weight, bias_sizes, stride, padding, dilation,
    transposed, output_padding, groups, output_mask): grad_input and grad_weight each cost the
    forward's MACs (a conv of the same size); grad_bias is a reduction (not counted)."""
    go, x, wt = c.shape(0), c.shape(1), c.shape(2)
    transposed = bool(c.arg(7, False))
    mask = list(c.arg(10, [True, True, True]))
    macs = conv_macs(x, wt, go, transposed)
    flops = 2.0 * macs * (int(bool(mask[0])) + int(bool(mask[1])))
    e = c.esize(0)
    cout = go[1]
    nbytes = (c.nbytes(0) + (c.nbytes(2) if mask[0] else 0) + (c.nbytes(1) if mask[1] else 0)
              + (math.prod(x) * e if mask[0] else 0) + (math.prod(wt) * e if mask[1] else 0)
              + (cout * e if len(mask) > 2 and mask[2] else 0))
    return Cost(flops, nbytes, "conv")


# aefast's upsampler. conv_transpose_act2d(input, weight, bias, stride, padding, output_padding,
# activation, negative_slope) -> (out, pre): a dense transposed conv whatever form the CPU rule
# picks (oneDNN, GEMM + col2im, sub-pixel GEMM, the gather kernel), so the op itself is the row: its
# forms do not all nest a modelled op. Bytes: input, weight, bias read, the output written once.
def f_conv_transpose_act2d(c):
    return _conv(c, 0, 1, 2, c.arg(3), c.arg(4, 0), 1, True, c.arg(5), 1)


def f_conv_transpose_act2d_backward(c):
    """conv_transpose_act2d_backward(grad_out, act_input, input, weight, stride, padding,
    output_padding, activation, negative_slope, output_mask): grad_input and grad_weight each the
    forward's dense MACs (whether oneDNN, the sub-pixel GEMMs or the direct weight grad computes
    them); the activation gradient and grad_bias are elementwise / a reduction (bytes only)."""
    go, x, wt = c.shape(0), c.shape(2), c.shape(3)
    mask = list(c.arg(9, [True, True, True]))
    macs = conv_macs(x, wt, go, True)
    e = c.esize(0)
    nbytes = (c.nbytes(0) + c.nbytes(1) + (c.nbytes(3) if mask[0] else 0) + (c.nbytes(2) if mask[1] else 0)
              + (math.prod(x) * e if mask[0] else 0) + (math.prod(wt) * e if mask[1] else 0)
              + (go[1] * e if len(mask) > 2 and mask[2] else 0))
    return Cost(2.0 * macs * (int(bool(mask[0])) + int(bool(mask[1]))), nbytes, "conv")


# aefast's encoder. conv_pool2d_forward(input, weight, bias, stride, padding, activation,
# negative_slope, pool_size) -> (pooled, window uint8, preact): the conv is computed densely, but
# only on the rows/cols that feed a pool window (HO*PKH x WO*PKW, csrc/cpu/conv_pool.cpp), and
# writes three pooled-size tensors.
def _encoder_geometry(c, x_shape, w_shape, stride, padding, pool):
    hc, wc = conv_out_hw(x_shape[2], x_shape[3], w_shape[2:], _pair(stride, 1), _pair(padding, 0), (1, 1))
    pkh, pkw = _pair(pool, 2)
    return hc, wc, hc // pkh, wc // pkw, pkh, pkw


def f_conv_pool2d_forward(c):
    x, wt = c.shape(0), c.shape(1)
    hc, wc, ho, wo, pkh, pkw = _encoder_geometry(c, x, wt, c.arg(3), c.arg(4), c.arg(7))
    n, cout, k = x[0], wt[0], math.prod(wt[1:])
    macs = n * cout * (ho * pkh) * (wo * pkw) * k
    pooled = n * cout * ho * wo
    e = c.esize(0)
    return Cost(2.0 * macs, c.nbytes(0) + c.nbytes(1) + c.nbytes(2) + pooled * (2 * e + 1), "conv",
                dense_flops=2.0 * n * cout * hc * wc * k)


def f_conv_pool2d_backward_input(c):
    """conv_pool2d_backward_input(grad_pooled, window, preact, weight, input_size, stride, padding,
    activation, negative_slope, pool_size): the conv output's gradient is nonzero at one position
    per window, so dgrad is one K-long axpy per pooled element and output channel:
    N*Cout*HO*WO*K MACs, 1/(PKH*PKW) of the dense dgrad."""
    gp, wt = c.shape(0), c.shape(3)
    n, cout, ho, wo = gp
    cin = wt[1]
    h, w = _pair(c.arg(4), 0)
    pkh, pkw = _pair(c.arg(9), 2)
    macs = n * cout * ho * wo * math.prod(wt[1:])
    return Cost(2.0 * macs, c.nbytes(0) + c.nbytes(1) + c.nbytes(2) + c.nbytes(3) + n * cin * h * w * c.esize(0),
                "conv", dense_flops=2.0 * macs * pkh * pkw)


def f_conv_pool2d_backward_weight(c):
    """conv_pool2d_backward_weight(grad_pooled, window, preact, input, kernel_size, stride, padding,
    activation, negative_slope, pool_size) -> (grad_weight, grad_bias): one K-long axpy into
    grad_weight per pooled element and output channel: N*Cout*HO*WO*Cin*KH*KW MACs."""
    gp, x = c.shape(0), c.shape(3)
    n, cout, ho, wo = gp
    kh, kw = _pair(c.arg(4), 3)
    pkh, pkw = _pair(c.arg(9), 2)
    k = x[1] * kh * kw
    macs = n * cout * ho * wo * k
    return Cost(2.0 * macs, c.nbytes(0) + c.nbytes(1) + c.nbytes(2) + c.nbytes(3) + (cout * k + cout) * c.esize(0),
                "conv", dense_flops=2.0 * macs * pkh * pkw)


def f_conv_pool2d_backward(c):
    """conv_pool2d_backward(grad_pooled, window, preact, input, weight, stride, padding, activation,
    negative_slope, pool_size, ...) -> (grad_input, grad_weight, grad_bias): both sparse gradients
    from one pass, 2 * N*Cout*HO*WO*K MACs."""
    gp, x, wt = c.shape(0), c.shape(3), c.shape(4)
    n, cout, ho, wo = gp
    pkh, pkw = _pair(c.arg(9), 2)
    k = math.prod(wt[1:])
    macs = 2 * n * cout * ho * wo * k
    e = c.esize(0)
    nbytes = (c.nbytes(0) + c.nbytes(1) + c.nbytes(2) + c.nbytes(3) + c.nbytes(4)
              + (math.prod(x) + cout * k + cout) * e)
    return Cost(2.0 * macs, nbytes, "conv", dense_flops=2.0 * macs * pkh * pkw)


# aefast's decoder. unpool_conv_transpose2d(input z (N, Cin, Hz, Wz), indices, weight (Cin, Cout,
# KH, KW), bias, pool_size, unpooled_size, stride, padding, output_padding, activation,
# negative_slope): each pooled value scatters z * W[ci] over its one footprint
# (csrc/cpu/unpool_deconv.cpp), N*Cin*Hz*Wz*Cout*KH*KW MACs, 1/(pool window) of the dense
# transposed conv over the unpooled map (equal to it for pool_size 1).
def _decoder(c, z, idx, wt, pool, unpooled, stride, padding, output_padding):
    zs, ws = c.shape(z), c.shape(wt)
    pkh, pkw = _pair(pool, 2)
    hu, wu = _pair(unpooled, 0)
    ho, wo = conv_out_hw(hu, wu, ws[2:], _pair(stride, 1), _pair(padding, 0), (1, 1), True, _pair(output_padding, 0))
    macs = math.prod(zs) * math.prod(ws[1:])
    return macs, pkh * pkw, [zs[0], ws[1], ho, wo]


def f_unpool_conv_transpose2d(c):
    macs, window, out = _decoder(c, 0, 1, 2, c.arg(4), c.arg(5), c.arg(6), c.arg(7), c.arg(8))
    # The pre-activation it also saves for leaky_relu/gelu/silu is not counted: the activation is
    # a string, which the profiler does not record (so this is a lower bound for those).
    nbytes = c.nbytes(0) + c.nbytes(1) + c.nbytes(2) + c.nbytes(3) + math.prod(out) * c.esize(0)
    return Cost(2.0 * macs, nbytes, "conv", dense_flops=2.0 * macs * window)


def f_unpool_conv_transpose2d_backward(c):
    """unpool_conv_transpose2d_backward(grad_out, act_input, input, indices, weight, pool_size,
    unpooled_size, stride, padding, output_padding, activation, negative_slope, output_mask):
    grad_z is the dgrad conv evaluated at the one position per window (a gather-dot), grad_W the
    same sparse set of products: each the forward's sparse MACs."""
    macs, window, _ = _decoder(c, 2, 3, 4, c.arg(5), c.arg(6), c.arg(7), c.arg(8), c.arg(9))
    mask = list(c.arg(12, [True, True, True]))
    flops = 2.0 * macs * (int(bool(mask[0])) + int(bool(mask[1])))
    e = c.esize(0)
    cout = c.shape(4)[1]
    nbytes = (c.nbytes(0) + c.nbytes(1) + c.nbytes(2) + c.nbytes(3) + c.nbytes(4)
              + (c.nbytes(2) if mask[0] else 0) + (c.numel(4) * e if mask[1] else 0)
              + (cout * e if len(mask) > 2 and mask[2] else 0))
    return Cost(flops, nbytes, "conv", dense_flops=flops * window)


# ---------------------------------------------------------------------------------------------
# GEMMs: 2*M*K*N (addmm's bias add and the epilogue not counted, as flop_counter).
def f_mm(c):
    (m, k), (_, n) = c.shape(0), c.shape(1)
    return Cost(2.0 * m * k * n, c.nbytes(0) + c.nbytes(1) + m * n * c.esize(0), "gemm")


def f_addmm(c):  # addmm(bias, a, b, beta, alpha)
    (m, k), (_, n) = c.shape(1), c.shape(2)
    return Cost(2.0 * m * k * n, c.nbytes(0) + c.nbytes(1) + c.nbytes(2) + m * n * c.esize(1), "gemm")


def f_linear(c):  # linear(input (..., K), weight (N, K), bias)
    x, wt = c.shape(0), c.shape(1)
    m = math.prod(x[:-1])
    n, k = wt
    return Cost(2.0 * m * k * n, c.tensor_bytes() + m * n * c.esize(0), "gemm")


# ---------------------------------------------------------------------------------------------
# Memory-bound ops. Elementwise: FLOPS_PER_ELEMENT nominal flops per output element; reads every
# tensor input, writes one output the size of the largest input (in place: the same tensor).
def _elementwise(per_element):
    def f(c):
        n = max((c.numel(i) for i in range(len(c.shapes))), default=0)
        return Cost(per_element * n, c.tensor_bytes() + n * c.first_float_size(), "elementwise")
    return f


def _write_only(c):  # zero_ / fill_: one write of the tensor
    return Cost(0.0, c.nbytes(0), "elementwise")


def _copy(c):  # clone / copy_ / _to_copy: one read and one write
    return Cost(0.0, 2 * c.nbytes(0) if c.numel(1) == 0 else c.nbytes(0) + c.nbytes(1), "elementwise")


def _reduction(c):  # sum / mean(input, dim, keepdim, dtype): one add per input element
    dims = c.arg(1) or []
    shape = c.shape(0)
    out = 1 if not dims else math.prod(s for i, s in enumerate(shape) if i not in {d % len(shape) for d in dims})
    return Cost(float(c.numel(0)), c.nbytes(0) + out * c.esize(0), "elementwise")


def _pool_out(c):
    x = c.shape(0)
    k = _pair(c.arg(1), 2)
    s = _pair(c.arg(2) or k, 2)
    p, d = _pair(c.arg(3), 0), _pair(c.arg(4), 1)
    ceil = bool(c.arg(5, False))
    out = []
    for size, kk, ss, pp, dd in zip(x[-2:], k, s, p, d):
        span = size + 2 * pp - dd * (kk - 1) - 1
        o = (-(-span // ss) if ceil else span // ss) + 1
        if ceil and (o - 1) * ss >= size + pp:
            o -= 1
        out.append(o)
    return x[:-2] + out, k


def f_max_pool2d(c):
    """max_pool2d_with_indices: one comparison per window element; writes values and int64 indices."""
    out, k = _pool_out(c)
    n = math.prod(out)
    return Cost(float(n * k[0] * k[1]), c.nbytes(0) + n * (c.esize(0) + 8), "pool")


def f_max_pool2d_backward(c):  # (grad_out, input, k, s, p, d, ceil, indices): zero-fill + scatter
    return Cost(0.0, c.nbytes(0) + c.nbytes(7) + c.nbytes(1), "pool")


def f_aefast_max_pool2d_backward(c):  # (grad_output, indices, input)
    return Cost(0.0, c.nbytes(0) + c.nbytes(1) + c.nbytes(2), "pool")


def f_max_unpool2d(c):  # (input, indices, output_size): zero-fill + scatter
    oh, ow = _pair(c.arg(2), 0)
    out = c.shape(0)[:-2] + [oh, ow]
    return Cost(0.0, c.nbytes(0) + c.nbytes(1) + math.prod(out) * c.esize(0), "pool")


def f_max_unpool2d_backward(c):  # aefast::max_unpool2d_backward(grad_out, indices): gather
    return Cost(0.0, c.nbytes(1) + 2 * c.numel(1) * c.esize(0), "pool")


def f_gather(c):  # gather(self, dim, index): reads one element per index, writes it
    return Cost(0.0, c.nbytes(2) + 2 * c.numel(2) * c.esize(0), "pool")


def _loss(per_element, inputs, grad_out=False):
    """Fused loss ops: nominal flops per element; reads the given inputs, writes the loss (the
    reduction arg, when recorded as an int, says whether it is elementwise) or, for a backward,
    the input-sized gradient."""
    def f(c):
        n = c.numel(inputs[0])
        nbytes = sum(c.nbytes(i) for i in inputs)
        red = c.args[len(c.shapes) - 1] if c.args else None
        if grad_out:
            nbytes += c.nbytes(0) + n * c.esize(inputs[0])
        else:
            nbytes += (n if red == 0 else 1) * c.esize(inputs[0])
        return Cost(float(per_element * n), nbytes, "loss")
    return f


def f_recon_loss(c):
    """aefast::recon_loss(input, target, weight, pos_weight, kind, reduction, delta, grad_input,
    grad_target): one pass, the loss AND the gradient: reads input, target (and the optional
    weights), writes the requested gradients; ~5 flops per element (the kind, a string, is not
    recorded). The loss itself is counted as a scalar (a lower bound for reduction none)."""
    n, e = c.numel(0), c.esize(0)
    nbytes = c.nbytes(0) + c.nbytes(1) + c.nbytes(2) + c.nbytes(3) + e
    nbytes += n * e * (int(bool(c.arg(7, False))) + int(bool(c.arg(8, False))))
    return Cost(5.0 * n, nbytes, "loss")


def f_loss_grad_scale(c):  # (grad_output, saved, alpha) -> alpha * saved * grad_output
    return Cost(float(c.numel(1)), c.nbytes(0) + 2 * c.nbytes(1), "elementwise")


def f_kl_divergence(c):  # (mu, logvar, reduction, grad): ~6 flops per element, 2 grads
    n, e = c.numel(0), c.esize(0)
    return Cost(6.0 * n, c.nbytes(0) + c.nbytes(1) + e + (2 * n * e if c.arg(3, False) else 0), "loss")


def f_index_convert(c):  # flat_to_window / window_to_flat(indices, ...): int64 <-> uint8
    other = 1 if c.esize(0) == 8 else 8
    return Cost(0.0, c.nbytes(0) + c.numel(0) * other, "index")


def f_first_bad_unpool_index(c):  # one read of the indices
    return Cost(0.0, c.nbytes(0), "index")


def _view(c):  # metadata, allocation or a scalar read: no FLOPs, no traffic of its own
    return Cost(0.0, 0.0, "view")


FORMULAS: dict[str, Callable[[_Call], Cost]] = {
    "aten::conv2d": f_conv2d,
    "aten::conv_transpose2d": f_conv_transpose2d,
    "aten::convolution": f_convolution,
    "aten::_convolution": f_convolution,
    "aten::mkldnn_convolution": f_mkldnn_convolution,
    "aten::convolution_backward": f_convolution_backward,
    "aefast::conv_transpose_act2d": f_conv_transpose_act2d,
    "aefast::conv_transpose_act2d_backward": f_conv_transpose_act2d_backward,
    "aefast::conv_pool2d_forward": f_conv_pool2d_forward,
    "aefast::conv_pool2d_backward_input": f_conv_pool2d_backward_input,
    "aefast::conv_pool2d_backward_weight": f_conv_pool2d_backward_weight,
    "aefast::conv_pool2d_backward": f_conv_pool2d_backward,
    "aefast::unpool_conv_transpose2d": f_unpool_conv_transpose2d,
    "aefast::unpool_conv_transpose2d_backward": f_unpool_conv_transpose2d_backward,
    "aten::mm": f_mm,
    "aten::addmm": f_addmm,
    "aten::linear": f_linear,
    "aten::max_pool2d_with_indices": f_max_pool2d,
    "aefast::max_pool2d_forward": f_max_pool2d,
    "aten::max_pool2d_with_indices_backward": f_max_pool2d_backward,
    "aefast::max_pool2d_backward": f_aefast_max_pool2d_backward,
    "aten::max_unpool2d": f_max_unpool2d,
    "aefast::max_unpool2d": f_max_unpool2d,
    "aefast::max_unpool2d_backward": f_max_unpool2d_backward,
    "aten::gather": f_gather,
    "aten::mse_loss": _loss(3, [0, 1]),
    "aten::mse_loss_backward": _loss(3, [1, 2], grad_out=True),
    "aten::l1_loss": _loss(3, [0, 1]),
    "aten::huber_loss": _loss(4, [0, 1]),
    "aten::huber_loss_backward": _loss(4, [1, 2], grad_out=True),
    "aten::binary_cross_entropy": _loss(6, [0, 1]),
    "aten::binary_cross_entropy_backward": _loss(5, [1, 2], grad_out=True),
    "aten::binary_cross_entropy_with_logits": _loss(8, [0, 1]),
    "aefast::recon_loss": f_recon_loss,
    "aefast::loss_grad_scale": f_loss_grad_scale,
    "aefast::kl_divergence": f_kl_divergence,
    "aefast::flat_to_window": f_index_convert,
    "aefast::window_to_flat": f_index_convert,
    "aefast::first_bad_unpool_index": f_first_bad_unpool_index,
    "aten::sum": _reduction,
    "aten::mean": _reduction,
    "aten::zero_": _write_only,
    "aten::fill_": _write_only,
    "aten::clone": _copy,
    "aten::copy_": _copy,
    "aten::_to_copy": _copy,
}
# Elementwise ops: nominal flops per element (1 for arithmetic and max/threshold; transcendental
# ones are counted 4: exp/log/div dominate them).
for _name, _per in {"relu": 1, "relu_": 1, "clamp_min": 1, "clamp_min_": 1, "threshold_backward": 1,
                    "leaky_relu": 2, "leaky_relu_backward": 2, "sigmoid": 4, "sigmoid_backward": 2,
                    "tanh": 4, "tanh_backward": 2, "gelu": 8, "gelu_backward": 8, "silu": 5,
                    "silu_backward": 6, "add": 1, "add_": 1, "sub": 1, "sub_": 1, "rsub": 1, "mul": 1,
                    "mul_": 1, "div": 1, "div_": 1, "neg": 1, "exp": 4, "log": 4, "pow": 1, "clamp": 2,
                    "where": 1, "addcmul_": 2, "lerp_": 2}.items():
    FORMULAS["aten::" + _name] = _elementwise(_per)
for _name in ("view", "reshape", "_unsafe_view", "permute", "t", "transpose", "as_strided", "detach", "expand",
              "unsqueeze", "squeeze", "slice", "select", "narrow", "flatten", "unflatten", "alias", "empty",
              "empty_like", "empty_strided", "resize_", "item", "_local_scalar_dense", "scalar_tensor", "lift_fresh",
              "resolve_conj", "resolve_neg", "contiguous", "to", "broadcast_tensors", "ones_like", "zeros_like",
              "zeros", "ones", "split", "chunk", "unbind"):
    # contiguous / to / zeros / ones_like are looked through when they copy or fill (their nested
    # clone / _to_copy / fill_ carries the traffic): see _walk.
    FORMULAS.setdefault("aten::" + _name, _view)
# Ops that may or may not do work: attributed to their nested modelled ops when they have any.
_LOOK_THROUGH = {"aten::contiguous", "aten::to", "aten::reshape", "aten::zeros", "aten::ones_like",
                 "aten::zeros_like", "aten::ones", "aten::flatten"}


def op_cost(name: str, shapes, dtypes, args) -> Cost | None:
    """The cost of one call of op ``name`` with the recorded shapes/dtypes/scalar args, or None
    when it is not in the formula table (or its record is too incomplete for the formula)."""
    f = FORMULAS.get(name)
    if f is None:
        return None
    try:
        cost = f(_Call(shapes, dtypes, args))
    except (IndexError, TypeError, ValueError):
        return None
    if not cost.dense_flops:
        cost.dense_flops = cost.flops
    return cost


# ---------------------------------------------------------------------------------------------
@dataclass
class KernelRow:
    op: str
    calls: float = 0.0          # per step
    ms: float = 0.0             # per step
    share: float = 0.0          # of the profiled step's wall time
    modelled: bool = True
    family: str = ""
    flops: float = 0.0          # executed, per step
    dense_flops: float = 0.0    # the dense equivalent, per step
    bytes: float = 0.0          # minimum, per step
    gflops: float = 0.0
    pct_flops_peak: float = 0.0
    gbps: float = 0.0
    pct_bw_peak: float = 0.0
    binds: str = ""
    pct_roof: float = 0.0       # the binding limit's minimum time over the measured time


@dataclass
class Breakdown:
    step_ms: float
    steps: int
    peak_gflops: float
    peak_gbps: float
    timing: str
    rows: list[KernelRow] = field(default_factory=list)
    peak_label: str = "GEMM peak"

    def as_dict(self) -> dict:
        return dict(asdict(self))


def _is_op(name: str) -> bool:
    ns, sep, _ = name.partition("::")
    return bool(sep) and " " not in name and ns not in ("autograd", "torch")


def _has_modelled(e) -> bool:
    return any(c.name in FORMULAS or _has_modelled(c) for c in e.cpu_children)


def _walk(e, out: list, device: str) -> float:
    """Collect (name, modelled, ms, shapes, dtypes, args) for the outermost modelled ops under e
    (see the module doc); returns the time collected. An op that is looked through keeps its own
    time outside its nested rows (its self time) as a row of its own."""
    name = e.name
    if name in FORMULAS and not (name in _LOOK_THROUGH and _has_modelled(e)):
        modelled = True
    elif _is_op(name) and not _has_modelled(e):
        modelled = False
    else:
        inner = sum(_walk(c, out, device) for c in e.cpu_children)
        if not _is_op(name):
            return inner
        ms = max(_device_ms(e, device) - inner, 0.0)
        # A looked-through op of the table costs nothing itself (a view / an allocation); any
        # other op keeps its self time, unmodelled.
        out.append((name, name in FORMULAS, ms, [], [], []))
        return inner + ms
    ms = _device_ms(e, device)
    # Under autocast the outer call (fp32 arguments) casts them and calls the op again: the cost
    # is that of the inner call, in the dtype it computes in; the casts stay in the op's time.
    inner_call = e
    while True:
        again = next((c for c in inner_call.cpu_children if c.name == name), None)
        if again is None:
            break
        inner_call = again
    out.append((name, modelled, ms, list(inner_call.input_shapes or []), list(inner_call.input_dtypes or []),
                list(inner_call.concrete_inputs or [])))
    return ms


def _device_ms(e, device) -> float:
    return (e.device_time_total if device.startswith("cuda") else e.cpu_time_total) / 1e3


def machine_limits(device: str, dtype: torch.dtype | None = None) -> tuple[float, float, str]:
    """(GEMM GFLOP/s, copy GB/s, label) measured now. CPU: the harness's fp32 GEMM peak (the better of
    torch.mm 1024^3 and oneDNN's 3x3 conv) and copy (64 MiB), best of 5. CUDA: a 8192^3 GEMM in the step's compute dtype (fp32, or
    bf16/fp16 under autocast) and a 1 GiB device copy, best of 5."""
    import _harness as H

    if not device.startswith("cuda"):
        gflops, gbps = H._measure_cpu_limits()
        return gflops, gbps, "GEMM peak (fp32)"
    dt = dtype or torch.float32
    a = torch.randn(8192, 8192, device=device, dtype=dt)
    src = torch.ones(2**28, device=device)
    dst = torch.empty_like(src)

    def best(f):
        f()
        times = []
        for _ in range(5):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            f()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return min(times)

    gemm_s = best(lambda: a @ a)
    copy_s = best(lambda: dst.copy_(src))
    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dt, str(dt))
    tf32 = " (TF32 allowed)" if dt == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else ""
    return 2 * 8192**3 / gemm_s / 1e9, 2 * src.numel() * 4 / copy_s / 1e9, f"GEMM {name}{tf32}"


def profile_breakdown(fn: Callable[[], object], *, steps: int = 3, device: str = "cpu",
                      peak_gflops: float | None = None, peak_gbps: float | None = None,
                      peak_label: str = "GEMM peak", dtype: torch.dtype | None = None,
                      warmup: int = 1) -> Breakdown:
    """Profiles ``steps`` calls of ``fn`` (after ``warmup``), each on its own, and returns the
    per-kernel breakdown of the median one by wall time: on a shared machine one step in a few
    stalls on a descheduled thread, and a median step keeps its rows adding up to its time.
    On CUDA the times are the device time of the kernels each op launched and the step time is
    their sum; on CPU they are the ops' inclusive CPU time and the step's wall time.

    Without ``peak_gflops`` / ``peak_gbps`` the limits are measured (``machine_limits``) right
    before and right after the profiled steps, and the better of the two is used: on a shared
    machine a figure measured minutes earlier, under another load, is not this step's limit."""
    for _ in range(warmup):
        fn()
    measure = peak_gflops is None or peak_gbps is None
    before = machine_limits(device, dtype) if measure else None
    profiled = sorted((_profile_one(fn, device) for _ in range(max(steps, 1))), key=lambda p: p[0])
    if measure:
        after = machine_limits(device, dtype)
        peak_gflops, peak_gbps, peak_label = max(before[0], after[0]), max(before[1], after[1]), after[2]
    wall, found = profiled[len(profiled) // 2]
    b = _aggregate(found, wall, max(steps, 1), device, peak_gflops, peak_gbps)
    b.peak_label = peak_label
    return b


def _profile_one(fn, device):
    from torch.profiler import ProfilerActivity, profile

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=activities, record_shapes=True) as prof:
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    found: list = []
    for e in prof.events():
        if e.cpu_parent is None and e.device_type == torch.autograd.DeviceType.CPU:
            _walk(e, found, device)
    return wall, found


def _aggregate(found, wall, steps, device, peak_gflops, peak_gbps) -> Breakdown:
    agg: dict[str, KernelRow] = {}
    for name, modelled, ms, shapes, dtypes, args in found:
        row = agg.setdefault(name, KernelRow(name, modelled=modelled))
        row.calls += 1
        row.ms += ms
        if row.modelled:
            cost = op_cost(name, shapes, dtypes, args)
            if cost is None:
                row.modelled = False
            else:
                row.family = cost.family
                row.flops += cost.flops
                row.dense_flops += cost.dense_flops
                row.bytes += cost.bytes
    rows = list(agg.values())
    for r in rows:
        if not r.modelled:
            r.flops = r.dense_flops = r.bytes = 0.0
    if device.startswith("cuda"):
        step_ms = sum(r.ms for r in rows)
        timing = f"device time of the ops' kernels, summed; median of {steps} profiled steps"
    else:
        step_ms = 1e3 * wall
        timing = (f"inclusive CPU time per op; the step's wall time with the profiler on; "
                  f"median of {steps} profiled steps")
        outside = step_ms - sum(r.ms for r in rows)
        rows.append(KernelRow("(outside ops: Python, autograd engine, profiler)", 1.0, max(outside, 0.0),
                              modelled=False, family="overhead"))
    for r in rows:
        r.share = r.ms / step_ms if step_ms else 0.0
        _roofline(r, peak_gflops, peak_gbps)
    rows.sort(key=lambda r: -r.ms)
    return Breakdown(step_ms, steps, peak_gflops, peak_gbps, timing, rows)


def _roofline(r: KernelRow, peak_gflops: float, peak_gbps: float) -> None:
    if not r.modelled or r.ms <= 0:
        return
    s = r.ms / 1e3
    r.gflops = r.flops / s / 1e9
    r.gbps = r.bytes / s / 1e9
    r.pct_flops_peak = 100 * r.gflops / peak_gflops if peak_gflops else 0.0
    r.pct_bw_peak = 100 * r.gbps / peak_gbps if peak_gbps else 0.0
    t_compute = r.flops / (peak_gflops * 1e9) if peak_gflops else 0.0
    t_memory = r.bytes / (peak_gbps * 1e9) if peak_gbps else 0.0
    if t_compute == 0 and t_memory == 0:
        r.binds = "-"
        return
    r.binds = "compute" if t_compute >= t_memory else "memory"
    r.pct_roof = 100 * max(t_compute, t_memory) / s


def breakdown_table(title: str, b: Breakdown, *, min_share: float = 0.005) -> str:
    """Markdown: one row per kernel (sorted by time); kernels under ``min_share`` of the step are
    folded into one row (the JSON keeps them all)."""
    balance = b.peak_gflops / b.peak_gbps if b.peak_gbps else float("nan")
    modelled = [r for r in b.rows if r.modelled]
    flops = sum(r.flops for r in modelled)
    dense = sum(r.dense_flops for r in modelled)
    nbytes = sum(r.bytes for r in modelled)
    unmodelled_ms = sum(r.ms for r in b.rows if not r.modelled)
    totals = (f"Modelled ops execute {flops / 1e9:.3g} GFLOP per step"
              + (f" (dense equivalent {dense / 1e9:.3g})" if dense > 1.01 * flops else "")
              + f" and move at least {nbytes / 1e6:.3g} MB; {100 * unmodelled_ms / b.step_ms:.1f}% of the step"
              " is in unmodelled ops or outside ops.") if b.step_ms else ""
    lines = [f"**{title}**: {b.step_ms:.3f} ms per step ({b.timing}). "
             f"Limits measured around the profiled steps: {b.peak_label} {b.peak_gflops:.1f} GFLOP/s, copy {b.peak_gbps:.1f} GB/s "
             f"(balance {balance:.1f} FLOP/byte). " + totals, "",
             "| op | calls | ms/step | share | GFLOP executed | GFLOP/s | % peak | MB min. moved | GB/s | % copy BW "
             "| FLOP/byte | binds | % of roof |",
             "|" + "---|" * 13]
    small = [r for r in b.rows if r.share < min_share and not r.op.startswith("(")]
    for r in b.rows:
        if r in small:
            continue
        if not r.modelled:
            what = "outside any op" if r.family == "overhead" else "not modelled (time only)"
            tail = f"| - | - | - | - | - | - | - | {what} | - |"
            lines.append(f"| {r.op} | {r.calls:g} | {r.ms:.3f} | {100 * r.share:.1f}% {tail}")
            continue
        sparse = f" (dense {r.dense_flops / 1e9:.3g})" if r.dense_flops > 1.01 * r.flops else ""
        ai = f"{r.flops / r.bytes:.2f}" if r.bytes else "-"
        gf = f"{r.gflops:.3g}" if r.flops else "-"
        pf = f"{r.pct_flops_peak:.0f}%" if r.flops else "-"
        gb = f"{r.gbps:.3g}" if r.bytes else "-"
        pb = f"{r.pct_bw_peak:.0f}%" if r.bytes else "-"
        roof = f"{r.pct_roof:.0f}%" if r.binds not in ("", "-") else "-"
        lines.append(f"| {r.op} | {r.calls:g} | {r.ms:.3f} | {100 * r.share:.1f}% | {r.flops / 1e9:.3g}{sparse} | {gf} | "
                     f"{pf} | {r.bytes / 1e6:.3g} | {gb} | {pb} | {ai} | {r.binds} | {roof} |")
    if small:
        ms = sum(r.ms for r in small)
        unmodelled = sum(not r.modelled for r in small)
        lines.append(f"| ({len(small)} smaller ops, {unmodelled} not modelled) | - | {ms:.3f} | {100 * ms / b.step_ms:.1f}% "
                     "| - | - | - | - | - | - | - | - | - |")
    return "\n".join(lines)


BREAKDOWN_LEGEND = """FLOPs executed: 2 x the multiply-adds each kernel performs (convolutions and GEMMs: eager's
dense convs in full; aefast's sparse kernels what they execute, 1/(pool window) of the dense
count for the encoder backward and the decoder, the dense count in brackets; elementwise, pool
and loss ops a nominal count per element). Minimum bytes: inputs read once + outputs written
once, in the dtypes the op computes in (uint8 window offsets, int64 flat indices; kernel
temporaries not counted; under autocast the wrapper's casts are in the op's time, not its bytes).
Binds: the limit (the GEMM GFLOP/s or the copy GB/s, measured just before and after the
profiled steps, the better of the two) that sets the op's minimum time; % of roof = that minimum
time over the measured time (above 100%: the machine was busier while the limits were measured
than while the op ran, as happens on a shared machine). Op times are inclusive
(nested aten calls belong to the op that made them); "(outside ops)" is the rest of the step's
wall time: Python, the autograd engine, the profiler. Ops under 0.5% of the step are folded
into one row here; the JSON lists them all. The formulas: bench/_breakdown.py."""
