"""conv_transpose_act (the decoder's upsampler without unpool): aefast::conv_transpose_act2d (+ _backward).

    out = act(pre),  pre = conv_transpose2d(input, W, b, stride, padding, output_padding)
    (groups 1, dilation 1)

Backward, with gpre = grad_out * act'(pre) (act' from ``out`` for relu/sigmoid/tanh, from the saved
``pre`` for leaky_relu/gelu/silu, the op's second output):

    grad_input = conv2d(gpre, W, stride, padding)       (the transposed conv's adjoint)
    grad_W[ci, co] = sum_n correlation of input[n, ci] with gpre[n, co] at the stride
    grad_b[co] = sum_{n, oy, ox} gpre[n, co, oy, ox]

The CPU and CUDA kernels (csrc/cpu/conv_transpose_act.cpp, csrc/cuda/conv_transpose_act.cu, shared
host code in csrc/include/aefast/conv_transpose_act_host.h) put the multiply-adds on the vendor's
transposed conv and its backward (oneDNN / cuDNN) and fuse bias -> activation into one pass over its
output, and the activation's gradient (with grad_b's sums on CPU) into the one pass that makes gpre.

The Triton twin is the fused decoder's kernels (aefast/triton/unpool_deconv.py) with 1x1 pool windows:
every input value is its own window's maximum, offset 0. The window offsets are a stride-0 view of
one zero byte (no memory), and with 1x1 windows the kernels skip loading them (POOL_H*POOL_W == 1,
window format: the only offset there is 0). So no new Triton math.

The backward op is linear in gpre, so a gradient reaching the second output (``pre``) is handled
by a second call with activation=None.
"""
from __future__ import annotations

import torch

from aefast import _C
from aefast.ops import _registry
from aefast.ops.unpool_deconv import NEEDS_PREACTIVATION

OP = "conv_transpose_act2d"


def _out_hw(input, weight, stride, padding, output_padding):
    return [(input.shape[2 + a] - 1) * stride[a] - 2 * padding[a] + weight.shape[2 + a] + output_padding[a]
            for a in range(2)]


def _layout(input, weight):
    """The layout the CPU kernels keep (csrc/cpu/conv_transpose_act.cpp, conv_layout): channels_last
    when the input or the weight is strictly channels_last, as oneDNN decides; else contiguous."""
    def strictly_cl(t):
        return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if strictly_cl(input) or strictly_cl(weight) else torch.contiguous_format


def _zero_offsets(input):
    """Window offsets for 1x1 pool windows: all 0, as a stride-0 view of one byte."""
    return input.new_zeros((), dtype=torch.uint8).expand(input.shape)


# ---------------------------------------------------------------- Triton twin

def _cpu_layout(input, weight):
    """The layout the op's outputs have (the fake functions say it): the CPU kernels' (_layout) on
    CPU tensors, contiguous on CUDA."""
    return _layout(input, weight) if input.device.type == "cpu" else torch.contiguous_format


def _triton_forward(input, weight, bias, stride, padding, output_padding, activation, negative_slope):
    from aefast.triton import unpool_deconv as kernels

    layout = _cpu_layout(input, weight)
    out, pre = kernels.forward(input.contiguous(), _zero_offsets(input), weight.contiguous(), bias, (1, 1),
                               tuple(input.shape[-2:]), stride, padding, output_padding, activation, negative_slope)
    return out.contiguous(memory_format=layout), pre.contiguous(memory_format=layout) if pre.dim() == 4 else pre


def _triton_backward(grad_out, act_input, input, weight, stride, padding, output_padding, activation, negative_slope,
                     output_mask):
    from aefast.triton import unpool_deconv as kernels

    layout = _cpu_layout(input, weight)
    gi, gw, gb = kernels.backward(grad_out.contiguous(), act_input.contiguous(), input.contiguous(),
                                  _zero_offsets(input), weight.contiguous(), (1, 1), tuple(input.shape[-2:]), stride,
                                  padding, output_padding, activation, negative_slope, output_mask)
    return gi.contiguous(memory_format=layout), gw.contiguous(memory_format=layout), gb


_registry.register_triton(OP, _triton_forward)
_registry.register_triton(f"{OP}_backward", _triton_backward)


# ---------------------------------------------------------------- fake (meta) functions

def _fake_forward(input, weight, bias, stride, padding, output_padding, activation, negative_slope):
    h, w = _out_hw(input, weight, stride, padding, output_padding)
    layout = _cpu_layout(input, weight)
    out = torch.empty((input.shape[0], weight.shape[1], h, w), dtype=input.dtype, device=input.device,
                      memory_format=layout)
    pre = torch.empty_like(out) if activation in NEEDS_PREACTIVATION else input.new_empty((0,))
    return out, pre


def _fake_backward(grad_out, act_input, input, weight, stride, padding, output_padding, activation, negative_slope,
                   output_mask):
    layout = _cpu_layout(input, weight)
    return (torch.empty_like(input, memory_format=layout),
            torch.empty_like(weight, memory_format=layout), weight.new_empty((weight.shape[1],)))


_registry.register_fake(OP, _fake_forward)
_registry.register_fake(f"{OP}_backward", _fake_backward)


# ---------------------------------------------------------------- autograd

def _setup_forward(ctx, inputs, output):
    input, weight, bias, stride, padding, output_padding, activation, negative_slope = inputs
    out, pre = output
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(input, weight, pre if activation in NEEDS_PREACTIVATION else out)
    ctx.geometry = (stride, padding, output_padding)
    ctx.activation = activation
    ctx.negative_slope = negative_slope
    ctx.has_bias = bias is not None


def _make_backward(ns):
    backward_op = getattr(ns, f"{OP}_backward")

    def backward(ctx, grad_out, grad_pre):
        input, weight, act_input = ctx.saved_tensors
        need = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]]
        grads = None
        layout = _cpu_layout(input, weight)
        if grad_out is not None:
            grads = backward_op(grad_out.contiguous(memory_format=layout), act_input, input, weight, *ctx.geometry,
                                ctx.activation, ctx.negative_slope, need)
        if grad_pre is not None and grad_pre.numel():
            extra = backward_op(grad_pre.contiguous(memory_format=layout), grad_pre, input, weight, *ctx.geometry,
                                None, 0.0, need)
            grads = extra if grads is None else tuple(a + b for a, b in zip(grads, extra))
        if grads is None:
            return (None,) * 8
        gi, gw, gb = grads
        return (gi if need[0] else None, gw if need[1] else None, gb if need[2] else None,
                None, None, None, None, None)

    return backward


_registry.register_autograd(OP, _make_backward, _setup_forward)


# ---------------------------------------------------------------- entry point for aefast.functional

def conv_transpose_act2d(backend, input, weight, bias, stride, padding, output_padding, activation, negative_slope):
    """Arguments validated by aefast.functional; returns the activated output only.

    Eager calls on plain tensors take the C++ autograd entry (csrc/conv_transpose_act_autograd.cpp,
    ``aefast._C.conv_transpose_act2d_autograd``): the same forward and backward ops as the formula
    registered above, without the torch.library autograd wrapper's Python (~40 us a call, which
    made the fused site slower than eager's conv_transpose2d -> act on small decoders). torch.compile,
    subclasses and torch.func go through the registered formula."""
    if _registry.eager_autograd_entry_serves(input, weight, bias):
        return _C.conv_transpose_act2d_autograd(_registry.namespace_name(backend), input, weight, bias, stride,
                                                padding, output_padding, activation, float(negative_slope))
    out, _ = _registry.op(backend, OP)(input, weight, bias, list(stride), list(padding), list(output_padding),
                                       activation, float(negative_slope))
    return out
