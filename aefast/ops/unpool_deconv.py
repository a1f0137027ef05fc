"""unpool_deconv family (the decoder): aefast::unpool_conv_transpose2d (+ _backward) and the
drop-in aefast::max_unpool2d (+ _backward).

Forward (dilation 1, groups 1). With (h, w) = pos(n, ci, ph, pw) the position of pooled value
z[n, ci, ph, pw] in the unpooled plane (flat index h*W_u + w, or window offset i*pool_w + j with
h = ph*pool_h + i, w = pw*pool_w + j):

    pre[n, co, oy, ox] = b[co] + sum z[n, ci, ph, pw] * W[ci, co, kh, kw]
                         over oy = h*sh - padh + kh, ox = w*sw - padw + kw
    out = act(pre)

Backward, with gpre = grad_out * act'(pre) (act' from ``out`` for relu/sigmoid/tanh, from the
saved ``pre`` for leaky_relu/gelu/silu, which is the op's second output):

    grad_z[n, ci, ph, pw] = sum_{co, kh, kw} gpre[n, co, h*sh - padh + kh, w*sw - padw + kw] * W[ci, co, kh, kw]
    grad_W[ci, co, kh, kw] = sum_{n, ph, pw} z[n, ci, ph, pw] * gpre[n, co, h*sh - padh + kh, w*sw - padw + kw]
    grad_b[co] = sum_{n, oy, ox} gpre[n, co, oy, ox]

The backward op is linear in gpre, so a gradient that reaches the second output (``pre``) is
handled by a second call with activation=None.

Layout (every backend, and the fake functions): channels_last in gives channels_last out. The
input (pooled map) decides: when it is channels_last (dense in that layout and not contiguous,
``_layout``), the output and the pre-activation are channels_last and grad_input comes back
channels_last; grad_out is read in whichever of the two layouts it comes (``_dense``: no copy),
and act_input is read in grad_out's layout. The CPU kernels read channels_last z / idx / grad_out
without a tensor-sized copy (per-image transposes in cache, and direct channels_last epilogue and
gpre passes: csrc/cpu/unpool_deconv_entries_forward.cpp / _backward.cpp and
unpool_deconv_window_vectors.cpp); the CUDA GEMM form and the Triton twins convert their
results at the end.

max_unpool2d: out[plane, idx[p]] = in[plane, p], the last p (row-major) wins for duplicate
indices; grad_in[p] = grad_out[idx[p]] for the winning p and 0 for the overwritten ones.
"""
from __future__ import annotations

import re

import torch

from aefast import _C
from aefast.ops import _registry

NEEDS_PREACTIVATION = ("leaky_relu", "gelu", "silu")


def _layout(t):
    """The layout rule of the CPU kernels (aefast.reference.functional._memory_format): a 4-D tensor
    is channels_last when it is dense in that layout and not contiguous. channels_last in gives
    channels_last out, and grad_input follows the input's layout."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _dense(t):
    """t itself when it is dense in either layout the kernels read (no copy), else contiguous."""
    return t if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last) else t.contiguous()


def _out_hw(unpooled_size, weight, stride, padding, output_padding):
    return [(unpooled_size[a] - 1) * stride[a] - 2 * padding[a] + weight.shape[2 + a] + output_padding[a]
            for a in range(2)]


# ---------------------------------------------------------------- Triton twins

def _triton_forward(input, indices, weight, bias, pool_size, unpooled_size, stride, padding, output_padding,
                    activation, negative_slope):
    from aefast.triton import unpool_deconv as kernels

    out, pre = kernels.forward(input, indices, weight, bias, pool_size, unpooled_size, stride, padding,
                               output_padding, activation, negative_slope)
    fmt = _layout(input)  # every backend follows the CPU kernels' layout rule (and the fake)
    return out.contiguous(memory_format=fmt), pre.contiguous(memory_format=fmt) if pre.dim() == 4 else pre


def _triton_backward(grad_out, act_input, input, indices, weight, pool_size, unpooled_size, stride, padding,
                     output_padding, activation, negative_slope, output_mask):
    from aefast.triton import unpool_deconv as kernels

    gz, gw, gb = kernels.backward(grad_out, act_input, input, indices, weight, pool_size, unpooled_size, stride,
                                  padding, output_padding, activation, negative_slope, output_mask)
    return gz.contiguous(memory_format=_layout(input)), gw, gb


def _triton_max_unpool2d(input, indices, output_size):
    from aefast.triton import unpool_deconv as kernels

    return kernels.max_unpool2d(input, indices, output_size)


def _triton_max_unpool2d_backward(grad_out, indices):
    from aefast.triton import unpool_deconv as kernels

    return kernels.max_unpool2d_backward(grad_out, indices)


_registry.register_triton("unpool_conv_transpose2d", _triton_forward)
_registry.register_triton("unpool_conv_transpose2d_backward", _triton_backward)
_registry.register_triton("max_unpool2d", _triton_max_unpool2d)
_registry.register_triton("max_unpool2d_backward", _triton_max_unpool2d_backward)
# aefast.functional.conv_transpose2d has no op of its own: it runs unpool_conv_transpose2d with
# 1x1 pool windows, so its Triton kernels are those of that twin (tell the backend chooser).
if _registry.HAS_TRITON:
    _registry._triton_ops.add("conv_transpose2d")


# ---------------------------------------------------------------- fake (meta) functions

def _fake_forward(input, indices, weight, bias, pool_size, unpooled_size, stride, padding, output_padding,
                  activation, negative_slope):
    h, w = _out_hw(unpooled_size, weight, stride, padding, output_padding)
    fmt = _layout(input)
    out = input.new_empty((input.shape[0], weight.shape[1], h, w)).contiguous(memory_format=fmt)
    pre = torch.empty_like(out) if activation in NEEDS_PREACTIVATION else input.new_empty((0,))
    return out, pre


def _fake_backward(grad_out, act_input, input, indices, weight, pool_size, unpooled_size, stride, padding,
                   output_padding, activation, negative_slope, output_mask):
    return (torch.empty_like(input, memory_format=_layout(input)),
            torch.empty_like(weight, memory_format=torch.contiguous_format), weight.new_empty((weight.shape[1],)))


def _fake_max_unpool2d(input, indices, output_size):
    return input.new_empty((*input.shape[:-2], *output_size))


def _fake_max_unpool2d_backward(grad_out, indices):
    return grad_out.new_empty(indices.shape)


_registry.register_fake("unpool_conv_transpose2d", _fake_forward)
_registry.register_fake("unpool_conv_transpose2d_backward", _fake_backward)
_registry.register_fake("max_unpool2d", _fake_max_unpool2d)
_registry.register_fake("max_unpool2d_backward", _fake_max_unpool2d_backward)
torch.library.register_fake("aefast::first_bad_unpool_index",
                            lambda indices, unpooled_size, pool_size, in_window: indices.new_empty((), dtype=torch.int64))


# ---------------------------------------------------------------- autograd

def _setup_forward(ctx, inputs, output):
    (input, indices, weight, bias, pool_size, unpooled_size, stride, padding, output_padding, activation,
     negative_slope) = inputs
    out, pre = output
    act_input = pre if activation in NEEDS_PREACTIVATION else out
    # An unused output gets None, not a zero-filled tensor of its size (the backward handles None;
    # for leaky_relu/gelu/silu a materialised zero grad_pre would also cost a second backward call).
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(input, indices, weight, act_input)
    ctx.geometry = (pool_size, unpooled_size, stride, padding, output_padding)
    ctx.activation = activation
    ctx.negative_slope = negative_slope
    ctx.has_bias = bias is not None


def _make_forward_backward(ns):
    def backward(ctx, grad_out, grad_pre):
        input, indices, weight, act_input = ctx.saved_tensors
        need = [ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.has_bias and ctx.needs_input_grad[3]]
        grads = None
        if grad_out is not None:
            grads = ns.unpool_conv_transpose2d_backward(_dense(grad_out), act_input, input, indices, weight,
                                                        *ctx.geometry, ctx.activation, ctx.negative_slope, need)
        if grad_pre is not None and grad_pre.numel():
            # The op is linear in gpre: a gradient on the pre-activation output adds the
            # gradients of the transposed conv without activation.
            extra = ns.unpool_conv_transpose2d_backward(_dense(grad_pre), _dense(grad_pre), input, indices, weight,
                                                        *ctx.geometry, None, 0.0, need)
            grads = extra if grads is None else tuple(a + b for a, b in zip(grads, extra))
        if grads is None:
            return (None,) * 11
        gz, gw, gb = grads
        return (gz if need[0] else None, None, gw if need[1] else None, gb if need[2] else None,
                None, None, None, None, None, None, None)

    return backward


def _setup_max_unpool(ctx, inputs, output):
    _, indices, _ = inputs
    ctx.save_for_backward(indices)


def _make_max_unpool_backward(ns):
    def backward(ctx, grad_out):
        (indices,) = ctx.saved_tensors
        return ns.max_unpool2d_backward(grad_out.contiguous(), indices), None, None

    return backward


_registry.register_autograd("unpool_conv_transpose2d", _make_forward_backward, _setup_forward)
_registry.register_autograd("max_unpool2d", _make_max_unpool_backward, _setup_max_unpool)


# ---------------------------------------------------------------- entry points for aefast.functional

def unpool_conv_transpose2d(backend, input, indices, weight, bias, pool_size, unpooled_size, stride, padding,
                            output_padding, activation, negative_slope):
    """Arguments validated by aefast.functional; returns the activated output only.

    Eager calls on plain tensors take the C++ autograd entry (csrc/unpool_deconv_autograd.cpp,
    ``aefast._C.unpool_conv_transpose2d_autograd``): the same forward and backward ops as the
    formula registered above, without the torch.library autograd wrapper's Python (~65 us to enter,
    and the backward's call back into Python). torch.compile, subclasses and torch.func go through
    the registered formula."""
    if _registry.eager_autograd_entry_serves(input, weight, bias):
        return _C.unpool_conv_transpose2d_autograd(
            _registry.namespace_name(backend), input, indices, weight, bias, list(pool_size), list(unpooled_size),
            list(stride), list(padding), list(output_padding), activation, float(negative_slope))
    out, _ = _registry.op(backend, "unpool_conv_transpose2d")(
        input, indices, weight, bias, list(pool_size), list(unpooled_size), list(stride), list(padding),
        list(output_padding), activation, float(negative_slope))
    return out


_BAD_INDEX = re.compile(r"aefast::unpool_conv_transpose2d: invalid index at linear position (\d+)")


def bad_index_position(err):
    """The linear position the CPU forward kernel names when it meets an invalid index (it
    raises after decoding them all: the first bad one in row-major order), or None."""
    m = _BAD_INDEX.search(str(err))
    return int(m.group(1)) if m else None


def first_bad_index(indices, unpooled_size, pool_size, in_window):
    """Linear position of the first invalid index (C++ kernels, one pass), or -1, as a 0-dim
    int64 tensor on the indices' device (reading it is the caller's choice: a sync on CUDA)."""
    return torch.ops.aefast.first_bad_unpool_index(indices, list(unpooled_size), list(pool_size), in_window)


def max_unpool2d(backend, input, indices, output_size):
    return _registry.op(backend, "max_unpool2d")(input, indices, list(output_size))
