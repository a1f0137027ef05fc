"""conv_pool family: the fused encoder block and the drop-in max_pool2d.

Ops (schemas in csrc/ops.cpp):

* ``conv_pool2d_forward(x, w, b, stride, padding, act, slope, pool, ..., pool_stride, ceil_mode)
  -> (pooled, window, preact)``: ``pooled = max_pool2d(act(z), pool, pool_stride, ceil_mode=...)``
  with ``z = conv2d(x, w, b)`` (pool_stride ``[0, 0]`` means pool: the non-overlapping pool);
  ``window`` is the uint8 row-major offset ``r*pool_w + c`` of each window's first maximum inside
  its window, which starts at ``(i*pool_stride_h, j*pool_stride_w)`` of z (the offset is counted
  in the full window also where a ceil_mode window is clipped at the edge), and ``preact`` is z at
  that maximum. All three are pooled-size: nothing at conv resolution is kept for the backward.
* ``conv_pool2d_backward_input`` / ``conv_pool2d_backward_weight``: the gradient formula.
  The pool routes each pooled gradient to one conv position, so with
  ``gz = grad_pooled * act'(preact)`` (pooled-size) and ``pos`` the conv position named by
  ``window``::

      dL/dz[n, co, pos]  = gz[n, co, i, j]            (zero at every other conv position)
      grad_b[co]         = sum_{n,i,j} gz
      grad_w[co,ci,u,v]  = sum_{n,i,j} gz * x[n, ci, pos_h*SH - PH + u, pos_w*SW - PW + v]
      grad_x[n,ci,y,x]   = sum_{co,i,j,u,v : pos*S - P + (u,v) = (y,x)} gz * w[co,ci,u,v]

  which is 1/(pool_h*pool_w) of the dense backward's multiply-adds. With overlapping windows
  (pool stride < pool) one conv position can be the argmax of several windows: dL/dz there is the
  SUM of their gz (each window's max is a function of z; the derivative of a sum of such terms).
  The kernels that serve such pools sum per (n, co) plane in a fixed order (deterministic).
* ``corruption`` (``"none"`` | gaussian | masking | salt_pepper, with ``corruption_level``, ``seed``,
  ``low``, ``high`` as in ``aefast::corrupt``): the forward and ``backward_weight`` read
  ``xc = corrupt(x)`` element by element in their input load (the noise is regenerated from the
  seed, never stored), so the op is conv_pool2d(corrupt(x)). The gradient w.r.t. the CLEAN x is
  ``dL/dx = dL/dxc * dxc/dx``: dxc/dx = 1 for gaussian (xc = x + level n) and the keep mask
  ``u >= level`` for masking and salt_pepper (a replaced element does not depend on x), i.e.
  ``backward_input`` (the gradient w.r.t. xc) followed by the masking corruption of that gradient
  with the same seed, exactly corrupt()'s own backward.
* ``conv_pool2d_backward(grad, window, preact, x, w, ...) -> (grad_x, grad_w, grad_b)``: both in
  one call, so that a backend can compute gz once for the two (autograd uses it when the input
  and the weight or bias all need gradients).
* ``max_pool2d_forward`` / ``max_pool2d_backward``: torch's max_pool2d with indices and its
  scatter-add backward.

Each op has a fake function and an autograd formula here, registered for the ``aefast`` op and
its ``aefast_triton`` twin; the backward of a backend runs on the same backend.
"""
from __future__ import annotations

import torch

from aefast import _checks
from aefast.ops import _registry

ACTIVATION_CODES = {None: 0, "relu": 1, "leaky_relu": 2, "sigmoid": 3, "tanh": 4, "gelu": 5, "silu": 6}


def conv_output_size(in_hw, kernel_hw, stride, padding):
    return tuple((in_hw[a] + 2 * padding[a] - kernel_hw[a]) // stride[a] + 1 for a in range(2))


def resolve_pool_stride(pool_size, pool_stride):
    """The schemas' ``int[2] pool_stride`` (0 = pool_size) as a list of two positive ints."""
    if isinstance(pool_stride, int):
        pool_stride = [pool_stride, pool_stride]
    return [int(st) if st else int(k) for k, st in zip(pool_size, pool_stride)]


def pooled_size(conv_hw, pool_size, pool_stride=(0, 0), ceil_mode=False):
    """The pooled (H, W) of the encoder blocks' pool (no padding, dilation 1), torch's rule."""
    st = resolve_pool_stride(pool_size, pool_stride)
    return tuple(_checks.pooling_output_size(conv_hw[a], pool_size[a], st[a], 0, 1, bool(ceil_mode)) for a in range(2))


def is_tiling_pool(conv_hw, pool_size, pool_stride=(0, 0), ceil_mode=False):
    """The pool the tiling kernels were written for: stride = pool and no clipped ceil_mode window
    (csrc/include/aefast/conv_pool.h has the same rule, pool_is_tiling)."""
    if resolve_pool_stride(pool_size, pool_stride) != [int(k) for k in pool_size]:
        return False
    return pooled_size(conv_hw, pool_size, pool_size, ceil_mode) == tuple(conv_hw[a] // pool_size[a] for a in range(2))


# ---------------------------------------------------------------- Triton twins

def _triton_forward(input, weight, bias, stride, padding, activation, negative_slope, pool_size, corruption="none",
                    corruption_level=0.0, seed=0, low=0.0, high=1.0, pool_stride=(0, 0), ceil_mode=False):
    from aefast.triton import conv_pool as kernels

    return kernels.conv_pool2d_forward(input, weight, bias, stride, padding, activation, negative_slope, pool_size,
                                       corruption, corruption_level, seed, low, high, pool_stride, ceil_mode)


def _triton_backward_input(grad, window, preact, weight, input_size, stride, padding, activation, negative_slope,
                           pool_size, pool_stride=(0, 0), ceil_mode=False):
    from aefast.triton import conv_pool as kernels

    return kernels.conv_pool2d_backward_input(grad, window, preact, weight, input_size, stride, padding, activation,
                                              negative_slope, pool_size, pool_stride, ceil_mode)


def _triton_backward_weight(grad, window, preact, input, kernel_size, stride, padding, activation, negative_slope,
                            pool_size, corruption="none", corruption_level=0.0, seed=0, low=0.0, high=1.0,
                            pool_stride=(0, 0), ceil_mode=False):
    from aefast.triton import conv_pool as kernels

    return kernels.conv_pool2d_backward_weight(grad, window, preact, input, kernel_size, stride, padding, activation,
                                               negative_slope, pool_size, corruption, corruption_level, seed, low,
                                               high, pool_stride=pool_stride, ceil_mode=ceil_mode)


def _triton_backward(grad, window, preact, input, weight, stride, padding, activation, negative_slope, pool_size,
                     corruption="none", corruption_level=0.0, seed=0, low=0.0, high=1.0, pool_stride=(0, 0),
                     ceil_mode=False):
    noise = (corruption, corruption_level, seed, low, high)
    grad_input = _triton_backward_input(grad, window, preact, weight, list(input.shape[-2:]), stride, padding,
                                        activation, negative_slope, pool_size, pool_stride, ceil_mode)
    grad_weight, grad_bias = _triton_backward_weight(grad, window, preact, input, list(weight.shape[-2:]), stride,
                                                     padding, activation, negative_slope, pool_size, *noise,
                                                     pool_stride, ceil_mode)
    return grad_input, grad_weight, grad_bias


def _triton_max_pool2d_forward(input, kernel_size, stride, padding, dilation, ceil_mode):
    from aefast.triton import conv_pool as kernels

    return kernels.max_pool2d_forward(input, kernel_size, stride, padding, dilation, ceil_mode)


def _triton_max_pool2d_backward(grad_output, indices, input):
    from aefast.triton import conv_pool as kernels

    return kernels.max_pool2d_backward(grad_output, indices, input)


_registry.register_triton("conv_pool2d_forward", _triton_forward)
_registry.register_triton("conv_pool2d_backward_input", _triton_backward_input)
_registry.register_triton("conv_pool2d_backward_weight", _triton_backward_weight)
_registry.register_triton("conv_pool2d_backward", _triton_backward)
_registry.register_triton("max_pool2d_forward", _triton_max_pool2d_forward)
_registry.register_triton("max_pool2d_backward", _triton_max_pool2d_backward)


# ---------------------------------------------------------------- fake functions

def _fake_forward(input, weight, bias, stride, padding, activation, negative_slope, pool_size, corruption="none",
                  corruption_level=0.0, seed=0, low=0.0, high=1.0, pool_stride=(0, 0), ceil_mode=False):
    conv_hw = conv_output_size(input.shape[-2:], weight.shape[-2:], stride, padding)
    shape = (input.shape[0], weight.shape[0], *pooled_size(conv_hw, pool_size, pool_stride, ceil_mode))
    fmt = _cpu_layout(input, input, weight)
    return (torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=fmt),
            torch.empty(shape, dtype=torch.uint8, device=input.device, memory_format=fmt),
            torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=fmt))


def _fake_backward_input(grad, window, preact, weight, input_size, stride, padding, activation, negative_slope,
                         pool_size, pool_stride=(0, 0), ceil_mode=False):
    return torch.empty((grad.shape[0], weight.shape[1], *input_size), dtype=grad.dtype, device=grad.device,
                       memory_format=_cpu_layout(grad, grad, weight))


def _fake_backward_weight(grad, window, preact, input, kernel_size, stride, padding, activation, negative_slope,
                          pool_size, corruption="none", corruption_level=0.0, seed=0, low=0.0, high=1.0,
                          pool_stride=(0, 0), ceil_mode=False):
    return (grad.new_empty((grad.shape[1], input.shape[1], *kernel_size)), grad.new_empty((grad.shape[1],)))


def _fake_backward(grad, window, preact, input, weight, stride, padding, activation, negative_slope, pool_size,
                   corruption="none", corruption_level=0.0, seed=0, low=0.0, high=1.0, pool_stride=(0, 0),
                   ceil_mode=False):
    return (torch.empty((grad.shape[0], weight.shape[1], *input.shape[-2:]), dtype=grad.dtype, device=grad.device,
                        memory_format=_cpu_layout(grad, grad, input, weight)),
            grad.new_empty((grad.shape[1], input.shape[1], *weight.shape[-2:])), grad.new_empty((grad.shape[1],)))


def _cpu_layout(device_of, *tensors):
    """The layout of the CPU kernels' activation-sized outputs (csrc/cpu/conv_pool.cpp,
    outputs_channels_last): channels_last when any of ``tensors`` is, as eager's conv2d;
    contiguous on the other devices."""
    if device_of.device.type != "cpu":
        return torch.contiguous_format
    return torch.channels_last if any(_memory_format(t) == torch.channels_last for t in tensors) \
        else torch.contiguous_format


def _memory_format(t):
    return torch.channels_last if (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)
                                   and not t.is_contiguous()) else torch.contiguous_format


pool_output_size = _checks.pooling_output_size  # torch's rule, written once (aefast/_checks.py)


def _fake_max_pool2d_forward(input, kernel_size, stride, padding, dilation, ceil_mode):
    oh = pool_output_size(input.shape[2], kernel_size[0], stride[0], padding[0], dilation[0], ceil_mode)
    ow = pool_output_size(input.shape[3], kernel_size[1], stride[1], padding[1], dilation[1], ceil_mode)
    fmt = _memory_format(input)
    shape = (input.shape[0], input.shape[1], oh, ow)
    return (torch.empty(shape, dtype=input.dtype, device=input.device, memory_format=fmt),
            torch.empty(shape, dtype=torch.int64, device=input.device, memory_format=fmt))


def _fake_max_pool2d_backward(grad_output, indices, input):
    return torch.empty(input.shape, dtype=grad_output.dtype, device=grad_output.device,
                       memory_format=_memory_format(input))


_registry.register_fake("conv_pool2d_forward", _fake_forward)
_registry.register_fake("conv_pool2d_backward_input", _fake_backward_input)
_registry.register_fake("conv_pool2d_backward_weight", _fake_backward_weight)
_registry.register_fake("conv_pool2d_backward", _fake_backward)
_registry.register_fake("max_pool2d_forward", _fake_max_pool2d_forward)
_registry.register_fake("max_pool2d_backward", _fake_max_pool2d_backward)


# ---------------------------------------------------------------- autograd

def _setup_forward(ctx, inputs, output):
    input, weight, bias, stride, padding, activation, negative_slope, pool_size = inputs[:8]
    # (corruption, corruption_level, seed, low, high, pool_stride, ceil_mode); the defaults where the
    # call left them out.
    rest = tuple(inputs[8:]) + ("none", 0.0, 0, 0.0, 1.0, (0, 0), False)[len(inputs) - 8:]
    ctx.noise = rest[:5]
    ctx.pool = (resolve_pool_stride(pool_size, rest[5]), bool(rest[6]))
    _, window, preact = output
    # window and preact are the backward's own bookkeeping, not values to differentiate.
    ctx.mark_non_differentiable(window, preact)
    # Their gradients are never used: without this autograd would allocate and zero-fill two
    # pooled-size tensors per backward just to pass them in as grad_window / grad_preact.
    ctx.set_materialize_grads(False)
    ctx.geometry = (list(stride), list(padding), activation, negative_slope, list(pool_size))
    ctx.input_size = list(input.shape[-2:])
    ctx.kernel_size = list(weight.shape[-2:])
    ctx.has_bias = bias is not None
    # Only pooled-size tensors (window, preact) plus the operands themselves are saved: the input
    # when the weight or bias gradient is needed (backward_weight computes both), the weight when
    # the input gradient is.
    needs_wb = ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2])
    ctx.save_for_backward(input if needs_wb else None, weight if ctx.needs_input_grad[0] else None, window, preact)


def _make_forward_backward(ns):
    def backward(ctx, grad_pooled, grad_window, grad_preact):
        input, weight, window, preact = ctx.saved_tensors
        stride, padding, activation, negative_slope, pool_size = ctx.geometry
        grad_input = grad_weight = grad_bias = None
        rest = (None,) * (len(ctx.needs_input_grad) - 3)
        if grad_pooled is None:  # grads are not materialised: no gradient reached the output
            return grad_input, grad_weight, grad_bias, *rest
        # The CPU kernels read channels_last pooled tensors as they are (a channels_last model's
        # gradient arrives so): no NCHW copy of grad, window and preact per backward.
        if not grad_pooled.is_contiguous(memory_format=_memory_format(preact)):
            grad_pooled = grad_pooled.contiguous(memory_format=_memory_format(preact))
        kind, level, seed, _, _ = ctx.noise

        def clean_input_grad(grad_input):  # dL/dx from dL/dxc, xc = corrupt(x)
            if kind in ("masking", "salt_pepper"):
                # dxc/dx is the keep mask: zero where the element was replaced (corrupt's backward)
                return ns.corrupt(grad_input, seed, "masking", level, 0.0, 0.0)
            return grad_input

        needs_wb = ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2])
        if ctx.needs_input_grad[0] and needs_wb:  # all of them: one call, gz computed once
            grad_input, grad_weight, grad_bias = ns.conv_pool2d_backward(grad_pooled, window, preact, input, weight,
                                                                         stride, padding, activation, negative_slope,
                                                                         pool_size, *ctx.noise, *ctx.pool)
            if not ctx.needs_input_grad[1]:
                grad_weight = None
            if not (ctx.has_bias and ctx.needs_input_grad[2]):
                grad_bias = None
            return clean_input_grad(grad_input), grad_weight, grad_bias, *rest
        if ctx.needs_input_grad[0]:
            grad_input = clean_input_grad(ns.conv_pool2d_backward_input(grad_pooled, window, preact, weight,
                                                                        ctx.input_size, stride, padding, activation,
                                                                        negative_slope, pool_size, *ctx.pool))
        if needs_wb:
            grad_weight, grad_bias = ns.conv_pool2d_backward_weight(grad_pooled, window, preact, input,
                                                                    ctx.kernel_size, stride, padding, activation,
                                                                    negative_slope, pool_size, *ctx.noise, *ctx.pool)
            if not ctx.needs_input_grad[1]:
                grad_weight = None
            if not (ctx.has_bias and ctx.needs_input_grad[2]):
                grad_bias = None
        return grad_input, grad_weight, grad_bias, *rest

    return backward


def _setup_max_pool2d(ctx, inputs, output):
    input = inputs[0]
    _, indices = output
    ctx.mark_non_differentiable(indices)
    ctx.set_materialize_grads(False)  # no zero-filled int64 grad_indices
    ctx.save_for_backward(indices, input)


def _make_max_pool2d_backward(ns):
    def backward(ctx, grad_output, grad_indices):
        indices, input = ctx.saved_tensors
        if grad_output is None:
            return None, None, None, None, None, None
        return ns.max_pool2d_backward(grad_output, indices, input), None, None, None, None, None

    return backward


_registry.register_autograd("conv_pool2d_forward", _make_forward_backward, _setup_forward)
_registry.register_autograd("max_pool2d_forward", _make_max_pool2d_backward, _setup_max_pool2d)


# ---------------------------------------------------------------- entry point for aefast.functional

def conv_pool2d(backend, input, weight, bias, stride, padding, activation, negative_slope, pool_size,
               pool_stride, ceil_mode):
    """(pooled, window) of conv_pool2d_forward on a clean input (no corruption in the load);
    arguments validated by aefast.functional.

    Eager calls on plain tensors take the C++ autograd entry (csrc/conv_pool_autograd.cpp,
    ``aefast._C.conv_pool2d_autograd``): the same forward and backward ops as the formula registered
    above, without the torch.library autograd wrapper's Python on entry and the engine's call back
    into Python for the backward, which cost a large part of a small block's kernel time (FCN-8s'
    6x6 and 3x3 stages). torch.compile, subclasses and torch.func go through the registered formula."""
    if _registry.eager_autograd_entry_serves(input, weight, bias):
        from aefast import _C

        return _C.conv_pool2d_autograd(_registry.namespace_name(backend), input, weight, bias, list(stride),
                                       list(padding), ACTIVATION_CODES[activation], float(negative_slope),
                                       list(pool_size), list(pool_stride), bool(ceil_mode))
    pooled, window, _ = _registry.op(backend, "conv_pool2d_forward")(
        input, weight, bias, list(stride), list(padding), ACTIVATION_CODES[activation], float(negative_slope),
        list(pool_size), pool_stride=list(pool_stride), ceil_mode=bool(ceil_mode))
    return pooled, window
