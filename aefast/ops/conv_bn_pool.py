"""conv_bn_pool family: conv -> BatchNorm (training mode) -> activation -> max-pool, fused.

Ops (schemas in csrc/ops.cpp, CPU kernels in csrc/cpu/conv_bn_pool.cpp, CUDA kernels in
csrc/cuda/conv_bn_pool.cu, Triton kernels in aefast/triton/conv_bn_pool.py):

* ``conv_bn_pool2d_forward(x, w, b, gamma, beta, stride, padding, eps, act, slope, pool)
  -> (pooled, window, conv_out, mean, var)``; conv_out is y as (N, HC, WC, C) (channels-last memory)
* ``conv_bn_pool2d_backward(grad_pooled, window, conv_out, mean, var, x, w, gamma, beta, ...,
  output_mask) -> (grad_x, grad_w, grad_b, grad_gamma, grad_beta)``

Forward, two passes over the conv output after the vendor conv (oneDNN on CPU)::

    y = conv2d(x, w, b)                   (N, C, HC, WC), channels-last in memory; M = N*HC*WC
    pass 1 (per conv row): shifted sums over the row, k_c = y[0, c, 0, 0], in double:
                           s1_c = sum (y - k_c),  s2_c = sum (y - k_c)^2;  rows added in order;
                           mean_c = k_c + s1_c/M,  var_c = s2_c/M - (s1_c/M)^2   (biased; the shift
                           keeps the one-pass form free of cancellation)
    pass 2 (per window):   invstd_c = 1/sqrt(var_c + eps),  z = gamma_c*(y - mean_c)*invstd_c + beta_c,
                           a = act(z),  pooled = max over the window of a,  window = offset of the
                           first maximum (torch's rule: ``v > best or isnan(v)`` replaces it)

The conv runs channels-last (oneDNN's fast layout on CPU; an NCHW input is transposed in and
grad_input back out), so conv_out is channels-last and every CPU pass is vectorised over channels.
Only pooled-size tensors and per-channel statistics are written, plus y itself, which BatchNorm's
gradient needs at every conv position (below): unlike conv_pool2d the gradient is dense, so y is
kept instead of being recomputed by a second conv in the backward (eager keeps y, BN's output, the
activation's output and int64 indices). The running statistics are updated by the caller from
(mean, var) exactly as nn.BatchNorm2d does (aefast.functional.conv_bn_pool2d):
``running = (1 - f) * running + f * stat`` with ``var * M / (M - 1)`` for running_var and
``f = momentum``, or ``1 / num_batches_tracked`` (after its increment) when momentum is None.

Backward. The pool routes each pooled gradient to one conv position, so with yhat = (y - mean)*invstd
and ``g = grad_pooled * act'(z)`` at each argmax (zero at every other conv position)::

    grad_beta_c  = sum g               grad_gamma_c = sum g * yhat      (pool-sparse sums)
    dL/dy        = gamma*invstd * (g - grad_beta/M - yhat * grad_gamma/M)   (BatchNorm's formula)
                 = c0_c + c1_c * (y - mean_c) + gamma_c*invstd_c * g,
                   c1 = -gamma*invstd^2 * grad_gamma/M,  c0 = -gamma*invstd * grad_beta/M
    grad_x, grad_w, grad_b = conv2d's backward of dL/dy           (vendor: at::convolution_backward)

The two sums come from the sparse entries only (one pass over the pooled map); dL/dy is dense
because every y moved the mean and variance, so it is written once (one pass) and handed to the
vendor conv backward. (Splitting dL/dy by linearity into the sparse k*g part and the affine c0 + c1*y
part does not save work: the c1*y part needs a dense transposed conv of y itself.) grad_b is sum dL/dy,
zero up to rounding, since BatchNorm removes the mean.

Backends: cpu runs the C++ kernels (oneDNN for the conv, except the small-channel convs where
oneDNN is slow, whose forward and weight gradient run by direct accumulation: csrc/cpu/conv_direct.cpp
and its rule, e.g. a conv VAE's 1 -> 8 and 8 -> 16 stride-2 encoder). triton (aefast/triton/conv_bn_pool.py)
hands the conv and its backward to the vendor through torch (cuDNN on a GPU, TF32 as
torch.backends.cudnn.allow_tf32 says) and runs the statistics, the normalise -> activate -> pool ->
argmax epilogue, the pool-sparse sums and the dense dL/dy as Triton kernels: the same schema,
outputs and layouts as the CPU op, so the running-statistics update stays one code path. cuda
(csrc/cuda/conv_bn_pool.cu, host code aefast/conv_bn_pool_host.h) is the same split with cuDNN
through ATen and grid-stride kernels whose per-element bodies (aefast/conv_bn_pool_body.h) the tests
run on the CPU (torch.ops.aefast.emulate_cuda_conv_bn_pool2d_*) against the reference twin.
"""
from __future__ import annotations

import torch

from aefast import _C
from aefast.ops import _registry
from aefast.ops.conv_pool import _memory_format, conv_output_size, pooled_size, resolve_pool_stride


def _stat_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_forward(input, weight, bias, bn_weight, bn_bias, stride, padding, eps, activation, negative_slope,
                  pool_size, pool_stride=(0, 0), ceil_mode=False):
    hc, wc = conv_output_size(input.shape[-2:], weight.shape[-2:], stride, padding)
    conv_shape = (input.shape[0], weight.shape[0], hc, wc)
    shape = (input.shape[0], weight.shape[0], *pooled_size((hc, wc), pool_size, pool_stride, ceil_mode))
    stat = _stat_dtype(input.dtype)
    conv_out = input.new_empty((input.shape[0], hc, wc, weight.shape[0]))  # (N, HC, WC, C): channels-last
    return (input.new_empty(shape), input.new_empty(shape, dtype=torch.uint8), conv_out,
            input.new_empty((weight.shape[0],), dtype=stat), input.new_empty((weight.shape[0],), dtype=stat))


def _fake_backward(grad_pooled, window, conv_out, mean, var, input, weight, bn_weight, bn_bias, stride, padding, eps,
                   activation, negative_slope, pool_size, output_mask, pool_stride=(0, 0), ceil_mode=False):
    def grad(wanted, shape, like):
        if not wanted or like is None:
            return conv_out.new_empty((0,))
        # The CPU kernels hand grad_input and grad_weight back in the layout of the input and the
        # weight (channels_last ones in channels_last: aefast.optimize's layout pass), as torch does.
        layout = _memory_format(like) if len(shape) == 4 else torch.contiguous_format
        return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=layout)

    c = conv_out.shape[3]
    return (grad(output_mask[0], input.shape, input), grad(output_mask[1], weight.shape, weight),
            grad(output_mask[2], (c,), conv_out), grad(output_mask[3], (c,), bn_weight),
            grad(output_mask[4], (c,), bn_bias))


def _triton_forward(*args):
    from aefast.triton import conv_bn_pool as kernels

    return kernels.conv_bn_pool2d_forward(*args)


def _triton_backward(*args):
    from aefast.triton import conv_bn_pool as kernels

    return kernels.conv_bn_pool2d_backward(*args)


# The Triton twins first: register_fake and register_autograd cover the namespaces registered so far.
_registry.register_triton("conv_bn_pool2d_forward", _triton_forward)
_registry.register_triton("conv_bn_pool2d_backward", _triton_backward)
_registry.register_fake("conv_bn_pool2d_forward", _fake_forward)
_registry.register_fake("conv_bn_pool2d_backward", _fake_backward)


def _setup_forward(ctx, inputs, output):
    input, weight, bias, bn_weight, bn_bias, stride, padding, eps, activation, negative_slope, pool_size = inputs[:11]
    pool_stride, ceil_mode = (tuple(inputs[11:]) + ((0, 0), False)[len(inputs) - 11:])[:2]
    ctx.pool = (resolve_pool_stride(pool_size, pool_stride), bool(ceil_mode))
    _, window, conv_out, mean, var = output
    ctx.mark_non_differentiable(window, conv_out, mean, var)
    ctx.set_materialize_grads(False)
    ctx.geometry = (list(stride), list(padding), eps, activation, negative_slope, list(pool_size))
    ctx.present = (True, True, bias is not None, bn_weight is not None, bn_bias is not None)
    ctx.save_for_backward(window, conv_out, mean, var, input, weight, bn_weight, bn_bias)


def _make_backward(ns):
    def backward(ctx, grad_pooled, *unused):
        if grad_pooled is None:
            return (None,) * len(ctx.needs_input_grad)
        window, conv_out, mean, var, input, weight, bn_weight, bn_bias = ctx.saved_tensors
        mask = [bool(need and present) for need, present in zip(ctx.needs_input_grad[:5], ctx.present)]
        if not any(mask):
            return (None,) * len(ctx.needs_input_grad)
        grads = ns.conv_bn_pool2d_backward(grad_pooled.contiguous(), window, conv_out, mean, var, input, weight,
                                           bn_weight, bn_bias, *ctx.geometry, mask, *ctx.pool)
        return (*(g if m else None for g, m in zip(grads, mask)), *(None,) * (len(ctx.needs_input_grad) - 5))

    return backward


_registry.register_autograd("conv_bn_pool2d_forward", _make_backward, _setup_forward)


def conv_bn_pool2d_forward(backend, input, weight, bias, bn_weight, bn_bias, stride, padding, eps, activation,
                           negative_slope, pool_size, pool_stride, ceil_mode):
    """(pooled, window, conv_out, mean, var); arguments validated by aefast.functional.

    Eager calls on plain tensors take the C++ autograd entry (csrc/conv_bn_pool_autograd.cpp,
    ``aefast._C.conv_bn_pool2d_autograd``): the same forward and backward ops as the formula
    registered above, without the torch.library autograd wrapper's Python on every call and the
    engine's call back into Python for the backward. torch.compile, subclasses and torch.func go
    through the registered formula."""
    args = (input, weight, bias, bn_weight, bn_bias, list(stride), list(padding), float(eps), int(activation),
            float(negative_slope), list(pool_size), list(pool_stride), bool(ceil_mode))
    if _registry.eager_autograd_entry_serves(input, weight, bias, bn_weight, bn_bias):
        return _C.conv_bn_pool2d_autograd(_registry.namespace_name(backend), *args)
    return _registry.op(backend, "conv_bn_pool2d_forward")(*args)
