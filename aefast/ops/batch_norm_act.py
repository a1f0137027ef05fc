"""batch_norm_act family: BatchNorm with batch statistics (training mode) -> activation, fused.

Ops (schemas in csrc/ops.cpp, CPU kernels in csrc/cpu/batch_norm_act.cpp):

* ``batch_norm_act2d_forward(x, gamma, beta, eps, act, slope) -> (out, mean, var)``
* ``batch_norm_act2d_backward(grad_out, x, mean, var, gamma, beta, eps, act, slope, output_mask)
  -> (grad_x, grad_gamma, grad_beta)``

Forward, two passes over x (N, C, H, W), M = N*H*W values per channel::

    pass 1 (per work unit): shifted sums, k_c = x[0, c, 0, 0], in double:
                            s1_c = sum (x - k_c),  s2_c = sum (x - k_c)^2;  units added in order;
                            mean_c = k_c + s1_c/M,  var_c = s2_c/M - (s1_c/M)^2   (biased)
    pass 2:                 invstd_c = 1/sqrt(var_c + eps),  z = gamma_c*(x - mean_c)*invstd_c + beta_c,
                            out = act(z)

Only x (BatchNorm's input, which the gradient needs at every position) and the per-channel
statistics are kept; eager keeps x, BatchNorm's output and the activation's output, and runs the
activation as a pass of its own each way.

Backward, with xhat = (x - mean)*invstd and g = grad_out * act'(z), z recomputed from x::

    pass 1:  grad_beta_c = sum g,   S_c = sum g*(x - mean_c),   grad_gamma_c = invstd_c * S_c
    pass 2:  dL/dx = gamma*invstd * (g - grad_beta/M - xhat * grad_gamma/M)   (BatchNorm's formula)
                   = k_c*g + c0_c + c1_c*(x - mean_c),
             k = gamma*invstd,  c0 = -k*grad_beta/M,  c1 = -k*invstd^2*S/M

Layouts: channels-last in -> channels-last out and grad_input (vectorised over channels);
otherwise contiguous NCHW (vectorised over each plane). Work units are fixed, partial sums added in
order: the results do not depend on the thread count.

Backends: cpu runs the C++ kernels; triton runs aefast/triton/batch_norm_act.py (the same passes,
tiles of positions x channels addressed through the strides, partial sums added in program order).
cuda runs csrc/cuda/batch_norm_act.cu: the same passes as per-element bodies
(csrc/include/aefast/batch_norm_act_host.h; per-(run, channel) partial sums added by a fixed-shape
at::sum), which the tests run on the CPU through emulate_cuda_batch_norm_act2d*. Triton is the
default on CUDA tensors (aefast/backend.py) until a GPU measures the two.
"""
from __future__ import annotations

import torch

from aefast import _C
from aefast.ops import _registry
from aefast.ops.conv_pool import _memory_format


def _stat_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_forward(input, weight, bias, eps, activation, negative_slope):
    stat = _stat_dtype(input.dtype)
    c = input.shape[1]
    out = torch.empty(input.shape, dtype=input.dtype, device=input.device, memory_format=_memory_format(input))
    return out, input.new_empty((c,), dtype=stat), input.new_empty((c,), dtype=stat)


def _fake_backward(grad_out, input, mean, var, weight, bias, eps, activation, negative_slope, output_mask):
    c = input.shape[1]
    grad_input = (torch.empty(input.shape, dtype=input.dtype, device=input.device,
                              memory_format=_memory_format(input))
                  if output_mask[0] else input.new_empty((0,)))

    def param_grad(wanted, like):
        return like.new_empty((c,)) if wanted and like is not None else input.new_empty((0,))

    return grad_input, param_grad(output_mask[1], weight), param_grad(output_mask[2], bias)


def _triton_forward(input, weight, bias, eps, activation, negative_slope):
    from aefast.triton import batch_norm_act as kernels

    return kernels.forward(input, weight, bias, eps, activation, negative_slope)


def _triton_backward(grad_out, input, mean, var, weight, bias, eps, activation, negative_slope, output_mask):
    from aefast.triton import batch_norm_act as kernels

    return kernels.backward(grad_out, input, mean, var, weight, bias, eps, activation, negative_slope, output_mask)


# The Triton twins first: register_fake / register_autograd cover the namespaces registered so far.
_registry.register_triton("batch_norm_act2d_forward", _triton_forward)
_registry.register_triton("batch_norm_act2d_backward", _triton_backward)
_registry.register_fake("batch_norm_act2d_forward", _fake_forward)
_registry.register_fake("batch_norm_act2d_backward", _fake_backward)


def _setup_forward(ctx, inputs, output):
    input, weight, bias, eps, activation, negative_slope = inputs
    _, mean, var = output
    ctx.mark_non_differentiable(mean, var)
    ctx.set_materialize_grads(False)
    ctx.args = (eps, activation, negative_slope)
    ctx.present = (True, weight is not None, bias is not None)
    ctx.save_for_backward(input, mean, var, weight, bias)


def _make_backward(ns):
    def backward(ctx, grad_out, *unused):
        if grad_out is None:
            return (None,) * len(ctx.needs_input_grad)
        input, mean, var, weight, bias = ctx.saved_tensors
        mask = [bool(need and present) for need, present in zip(ctx.needs_input_grad[:3], ctx.present)]
        if not any(mask):
            return (None,) * len(ctx.needs_input_grad)
        grads = ns.batch_norm_act2d_backward(grad_out, input, mean, var, weight, bias, *ctx.args, mask)
        return (*(g if m else None for g, m in zip(grads, mask)), *(None,) * (len(ctx.needs_input_grad) - 3))

    return backward


_registry.register_autograd("batch_norm_act2d_forward", _make_backward, _setup_forward)


def batch_norm_act2d(backend, input, weight, bias, eps, activation, negative_slope):
    """(out, mean, var); arguments validated by aefast.functional.

    Eager calls on plain tensors take the C++ autograd entry (csrc/batch_norm_act_autograd.cpp,
    ``aefast._C.batch_norm_act2d_autograd``): the same forward and backward ops as the formula
    registered above, without the torch.library autograd wrapper's Python on every call and the
    engine's call back into Python for the backward. torch.compile, subclasses and torch.func go
    through the registered formula."""
    if _registry.eager_autograd_entry_serves(input, weight, bias):
        return _C.batch_norm_act2d_autograd(_registry.namespace_name(backend), input, weight, bias, float(eps),
                                            int(activation), float(negative_slope))
    return _registry.op(backend, "batch_norm_act2d_forward")(input, weight, bias, float(eps), int(activation),
                                                            float(negative_slope))


def update_running_stats(running_mean, running_var, num_batches_tracked, momentum, mean, var, count):
    """nn.BatchNorm2d's training-mode update of the running statistics, in place, after a fused
    BatchNorm op (batch_norm_act2d, conv_bn_pool2d) on any backend: its specification is
    aefast.reference.functional.update_running_stats. Eager calls on plain tensors run it as one C++
    call (``aefast._C.update_running_stats``, csrc/batch_norm_act_autograd.cpp: one loop over the
    channels on CPU, the reference's tensor ops elsewhere), ~15x cheaper than the reference's eight
    small tensor ops from Python; torch.compile, subclasses and torch.func run the reference."""
    if _registry.eager_autograd_entry_serves(running_mean, running_var, num_batches_tracked, mean, var):
        _C.update_running_stats(running_mean, running_var, num_batches_tracked,
                                None if momentum is None else float(momentum), mean, var, int(count))
    else:
        from aefast.reference import functional as ref

        ref.update_running_stats(running_mean, running_var, num_batches_tracked, momentum, mean, var, count)
