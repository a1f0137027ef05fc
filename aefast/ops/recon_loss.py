"""recon_loss family: fused losses, their backward scale, KL divergence, corruption and the
VAE reparameterisation (schemas in csrc/ops.cpp).

Gradient formulas (the kernels compute them, see csrc/include/aefast/recon_loss.h):

* ``recon_loss`` / ``kl_divergence`` compute, in their forward pass, the gradient of the
  REDUCED loss with respect to the input (and target when it needs its own formula), the
  reduction's 1/numel or 1/M included. The backward is therefore only
  ``loss_grad_scale(grad_output, saved, alpha)``: grad_output broadcast as a scalar (mean,
  sum), per row (per_sample) or elementwise (none). For mse, l1 and huber dl/dt = -dl/dx, so
  the target's gradient is the same buffer scaled by alpha = -1 (no second buffer).
  aefast.functional calls reduction="none" of mse/l1/huber with the flags off: the backward is one more
  recon_loss pass with weight = grad_output (see _recon_loss_grads); the op called directly
  with the flags on keeps the saved-gradient path, so both are correct.
* The saved gradients are in the accumulation dtype (fp32 for fp16/bf16 inputs), and
  ``loss_grad_scale`` returns grad_output's dtype: the gradient is rounded ONCE, after
  grad_output's scale, as torch rounds it. Rounded to fp16 in the forward, 2(x-t)/numel would
  underflow for large tensors before a loss scale (GradScaler's 2^16) multiplied it.
* When grad_output is the plain scalar 1.0 (``loss.backward()``) and the saved gradient has the
  input's dtype (fp32, fp64), the saved gradient IS the answer and is returned without a pass
  over memory (Liger-Kernel's trick). It is kept with
  ``save_for_backward``, so if autograd later accumulates into it in place, a second
  backward through a retained graph raises instead of reading a modified buffer.
* Two entries, one formula: eager calls on plain tensors go through the C++ autograd node of
  csrc/recon_loss_autograd.cpp (``aefast._C.recon_loss_autograd``: no Python in the backward);
  torch.compile and tensor subclasses go through the formula registered below. Both implement
  exactly the rules above.
* ``corrupt``: gaussian is y = x + noise, so dy/dx = 1; masking and salt_pepper replace
  elements where u < level, so dy/dx is the keep mask, and the backward is the masking
  corruption of grad_output with the same seed (the mask is regenerated, never stored).
* ``reparameterize``: z = mu + exp(logvar/2) eps, so dz/dmu = 1 and
  dz/dlogvar = exp(logvar/2) eps / 2, with eps regenerated from the seed.
"""
from __future__ import annotations

import torch

from aefast import _C
from aefast.ops import _registry

OWN_TARGET_GRAD = ("bce", "bce_logits")


# ---------------------------------------------------------------- Triton twins

def _triton(name):
    def impl(*args):
        from aefast.triton import recon_loss as kernels

        return getattr(kernels, name)(*args)

    impl.__name__ = f"triton_{name}"
    return impl


for _name in ("recon_loss", "loss_grad_scale", "kl_divergence", "corrupt", "reparameterize",
              "reparameterize_backward"):
    _registry.register_triton(_name, _triton(_name))


# ---------------------------------------------------------------- fake functions

def _dense(t, shape=None, dtype=None):
    return torch.empty(t.shape if shape is None else shape, dtype=dtype or t.dtype, device=t.device)


def saved_grad_dtype(dtype):
    """The dtype of the gradients a loss saves (csrc/include/aefast/recon_loss_host.h)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _reduced(input, reduction):
    if reduction == "none":
        return _dense(input)
    if reduction == "per_sample":
        return _dense(input, (input.shape[0],))
    return _dense(input, ())


def _fake_recon_loss(input, target, weight, pos_weight, kind, reduction, delta, grad_input, grad_target):
    acc = saved_grad_dtype(input.dtype)
    gx = _dense(input, dtype=acc) if grad_input else _dense(input, (0,), acc)
    gt = _dense(input, dtype=acc) if grad_target and kind in OWN_TARGET_GRAD else _dense(input, (0,), acc)
    return _reduced(input, reduction), gx, gt


def _fake_kl(mu, logvar, reduction, grad):
    acc = saved_grad_dtype(mu.dtype)
    g = (lambda: _dense(mu, dtype=acc)) if grad else (lambda: _dense(mu, (0,), acc))
    return _reduced(mu, reduction), g(), g()


_registry.register_fake("recon_loss", _fake_recon_loss)
_registry.register_fake("kl_divergence", _fake_kl)
_registry.register_fake("loss_grad_scale", lambda grad_output, saved, alpha: _dense(saved, dtype=grad_output.dtype))
_registry.register_fake("corrupt", lambda input, seed, kind, level, low, high: _dense(input))
_registry.register_fake("reparameterize", lambda mu, logvar, seed: _dense(mu))
_registry.register_fake("reparameterize_backward", lambda grad, logvar, seed: _dense(logvar))


# ---------------------------------------------------------------- autograd

def _is_plain_one(g) -> bool:
    """grad_output is the eager CPU scalar 1.0 (not a fake/functional tensor under tracing)."""
    return (type(g) is torch.Tensor and g.dim() == 0 and g.device.type == "cpu"
            and not torch.compiler.is_compiling() and g.item() == 1.0)


def _no_double_backward(what):
    # The saved gradient is a constant to autograd, so a graph built through it would have no
    # second derivative: refuse instead of returning a silently wrong Hessian.
    if torch.is_grad_enabled():
        raise RuntimeError(f"aefast: double backward (create_graph=True) through the fused {what} is not supported; "
                           "use aefast.set_backend('reference') for higher-order gradients")


def _scale(ns, g, saved, alpha, what):
    if saved.numel() == 0 and g.numel() != 0:
        raise RuntimeError(f"aefast: the forward was called without computing the gradient w.r.t. {what}; "
                           "call the op with its grad flag set when that tensor requires grad")
    if alpha == 1.0 and saved.dtype == g.dtype and _is_plain_one(g):
        return saved
    return ns.loss_grad_scale(g, saved, alpha)


def _keep_saved_grads(ctx, output, *inputs):
    # The gradient outputs are not differentiable, and autograd must not zero-fill a grad for
    # them (that would be two extra input-sized passes per backward). The inputs are kept for
    # the reduction="none" backward (references, no copies).
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[1], output[2], *inputs)


def _setup_recon_loss(ctx, inputs, output):
    input, target, weight, pos_weight, kind, reduction, delta, _, _ = inputs
    ctx.kind, ctx.reduction, ctx.delta = kind, reduction, delta
    _keep_saved_grads(ctx, output, input, target, weight, pos_weight)


def _recon_loss_grads(ns, ctx, grad):
    """(grad_input, grad_target) from the saved gradients: the whole backward is this scale.

    reduction="none" is the exception: its incoming gradient is elementwise, so a gradient
    saved in the forward saves nothing (the backward would still read it, read grad_output
    and write the result) and costs an input-sized buffer between the passes. That case is
    called with the gradient flags off, and its backward is ONE more recon_loss pass with
    weight = grad_output (times weight) and reduction "sum", which writes only the gradients:
    dl_i/dx_i * g_i is exactly the gradient of sum_i g_i l_i."""
    _no_double_backward("loss")
    gx, gt, inp, tgt, w, pw = ctx.saved_tensors
    need_x, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
        raise RuntimeError("aefast::recon_loss does not differentiate weight or pos_weight; "
                           "aefast.functional routes such calls to the reference")
    if ctx.reduction == "none" and gx.numel() == 0 and gt.numel() == 0:
        own = ctx.kind in OWN_TARGET_GRAD
        w_eff = grad.contiguous() if w is None else grad * w
        args = (inp, tgt, w_eff, pw, ctx.kind, "sum", ctx.delta, need_x or (need_t and not own), need_t and own)
        if type(inp) is torch.Tensor and type(tgt) is torch.Tensor and not torch.compiler.is_compiling():
            # Eager: straight to the kernel. The op's own autograd wrapper would only find that
            # nothing needs a graph here (double backward is refused above), at ~5 us a call.
            with torch._C._AutoDispatchBelowAutograd():
                _, rx, rt = ns.recon_loss.default(*args)
        else:
            _, rx, rt = ns.recon_loss.default(*args)
        # (the op's gradients are fp32 for fp16/bf16 inputs: this cast is their one rounding)
        rx, rt = rx.to(inp.dtype), rt.to(inp.dtype)
        return (rx if need_x else None), ((rt if own else -rx) if need_t else None)
    grad_x = _scale(ns, grad, gx, 1.0, "input") if need_x else None
    grad_t = None
    if need_t:
        if ctx.kind in OWN_TARGET_GRAD:
            grad_t = _scale(ns, grad, gt, 1.0, "target")
        else:
            grad_t = _scale(ns, grad, gx, -1.0, "target")
    return grad_x, grad_t


def _make_recon_loss_backward(ns):
    def backward(ctx, grad, _g_gx, _g_gt):
        if grad is None:  # the loss itself was not used (grads are not zero-filled)
            return (None,) * 9
        return (*_recon_loss_grads(ns, ctx, grad), None, None, None, None, None, None, None)

    return backward


def eager_recon_loss(backend, input, target, weight, pos_weight, kind, reduction, delta):
    """Eager calls on plain tensors (no tracing, no torch.func transform): the C++ autograd entry (csrc/recon_loss_autograd.cpp), the
    same forward and backward as the registered formula without two Python crossings (~20 us a
    call, more than the whole kernel on a 256x1x28x28 batch). It derives the op's gradient flags
    from requires_grad itself."""
    return _C.recon_loss_autograd(_registry.namespace_name(backend), input, target, weight, pos_weight, kind,
                                  reduction, delta)


def recon_loss(backend, input, target, weight, pos_weight, kind, reduction, delta, grad_input, grad_target):
    """The loss value of aefast::recon_loss on ``backend`` (the gradient outputs stay internal).
    ``grad_input``/``grad_target`` are the op's flags as derived from requires_grad (see
    aefast.functional._fused_loss)."""
    if (type(input) is torch.Tensor and type(target) is torch.Tensor
            and (weight is None or type(weight) is torch.Tensor)
            and (pos_weight is None or type(pos_weight) is torch.Tensor)
            and not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active()):
        return eager_recon_loss(backend, input, target, weight, pos_weight, kind, reduction, delta)
    if reduction == "none" and kind not in OWN_TARGET_GRAD:
        # mse/l1/huber: the gradient is recomputed in the backward (see _recon_loss_grads), which
        # moves as many bytes as saving it and holds no input-sized buffer between the passes.
        # bce/bce_logits keep the saved gradient: recomputing would pay their log/exp twice.
        grad_input = grad_target = False
    return _registry.op(backend, "recon_loss")(input, target, weight, pos_weight, kind, reduction, delta,
                                               grad_input, grad_target)[0]


def _setup_kl(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[1], output[2])


def _make_kl_backward(ns):
    def backward(ctx, grad, _g1, _g2):
        gmu, glv = ctx.saved_tensors
        if grad is None:
            return None, None, None, None
        _no_double_backward("kl_divergence")
        grad_mu = _scale(ns, grad, gmu, 1.0, "mu") if ctx.needs_input_grad[0] else None
        grad_lv = _scale(ns, grad, glv, 1.0, "logvar") if ctx.needs_input_grad[1] else None
        return grad_mu, grad_lv, None, None

    return backward


def _setup_loss_grad_scale(ctx, inputs, output):
    grad_output, saved, alpha = inputs
    ctx.alpha = alpha
    ctx.go_shape = grad_output.shape
    ctx.save_for_backward(grad_output, saved)


def _make_loss_grad_scale_backward(ns):
    # out = alpha * saved * g (g broadcast): d/dsaved = alpha * g * grad, d/dg = alpha * sum(saved * grad)
    # over the broadcast dims. Only double backward needs this; written with torch ops.
    def backward(ctx, grad):
        g, saved = ctx.saved_tensors
        grad_g = grad_saved = None
        if ctx.needs_input_grad[1]:
            grad_saved = ns.loss_grad_scale(g, grad.contiguous(), ctx.alpha).to(saved.dtype)
        if ctx.needs_input_grad[0]:
            prod = ctx.alpha * saved * grad
            if g.shape == saved.shape:
                grad_g = prod
            elif g.dim() == 0:
                grad_g = prod.sum()
            else:
                grad_g = prod.reshape(prod.shape[0], -1).sum(1)
            grad_g = grad_g.to(g.dtype)
        return grad_g, grad_saved, None

    return backward


def _setup_corrupt(ctx, inputs, output):
    _, seed, kind, level, _, _ = inputs
    ctx.seed, ctx.kind, ctx.level = seed, kind, level


def _make_corrupt_backward(ns):
    def backward(ctx, grad):
        if ctx.kind == "gaussian":
            return grad, None, None, None, None, None
        return ns.corrupt(grad.contiguous(), ctx.seed, "masking", ctx.level, 0.0, 0.0), None, None, None, None, None

    return backward


def _setup_reparameterize(ctx, inputs, output):
    _, logvar, seed = inputs
    ctx.seed = seed
    ctx.save_for_backward(logvar)


def _make_reparameterize_backward(ns):
    def backward(ctx, grad):
        (logvar,) = ctx.saved_tensors
        grad_lv = ns.reparameterize_backward(grad.contiguous(), logvar, ctx.seed) if ctx.needs_input_grad[1] else None
        return grad, grad_lv, None

    return backward


def _setup_reparameterize_backward(ctx, inputs, output):
    grad, logvar, seed = inputs
    ctx.seed = seed
    ctx.save_for_backward(grad, logvar, output)


def _make_reparameterize_backward_backward(ns):
    # out = g * exp(lv/2) * eps / 2: d/dg = exp(lv/2) eps / 2 = out / g (regenerated, not divided),
    # d/dlv = out / 2.
    def backward(ctx, grad_out):
        g, logvar, out = ctx.saved_tensors
        grad_g = ns.reparameterize_backward(grad_out.contiguous(), logvar, ctx.seed) if ctx.needs_input_grad[0] else None
        grad_lv = 0.5 * out * grad_out if ctx.needs_input_grad[1] else None
        return grad_g, grad_lv, None

    return backward


_registry.register_autograd("recon_loss", _make_recon_loss_backward, _setup_recon_loss)
_registry.register_autograd("kl_divergence", _make_kl_backward, _setup_kl)
_registry.register_autograd("loss_grad_scale", _make_loss_grad_scale_backward, _setup_loss_grad_scale)
_registry.register_autograd("corrupt", _make_corrupt_backward, _setup_corrupt)
_registry.register_autograd("reparameterize", _make_reparameterize_backward, _setup_reparameterize)
_registry.register_autograd("reparameterize_backward", _make_reparameterize_backward_backward,
                            _setup_reparameterize_backward)
