"""Triton kernels of the recon_loss family (same schemas as the C++ ops; math in
csrc/include/aefast/recon_loss.h).

Loss: stage 1 gives each program one BLOCK of one row (rows = batch for per_sample, one row
otherwise); it writes the scaled gradients and either the loss (reduction none) or the
block's partial sum. Stage 2 sums each row's partials in a fixed order. No atomics, so the
result is deterministic. Accumulation is fp32 (fp64 for fp64 inputs).

Noise: tl.rand / tl.randn(seed, i) for element i, which is Philox4x32-10 keyed by the seed
with counter i: the same stream as csrc/include/aefast/philox.h, so uniforms (masking,
salt_pepper) agree bit for bit with the CPU and CUDA kernels, normals to the last bits.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024
KINDS = {"mse": 0, "l1": 1, "huber": 2, "bce": 3, "bce_logits": 4, "kl": 5}
OWN_TARGET_GRAD = (3, 4, 5)


def _warps(dtype):
    """Warps of a BLOCK-element loss or corrupt program: 8 for fp64, whose 64-bit values and
    libdevice calls (log1p, exp, Box-Muller's sin/cos) spilled a few bytes at 4 warps (8 elements
    per thread; sm_80 loss, sm_90 corrupt, scripts/check_triton_aot.py), 4 otherwise."""
    return 8 if dtype == torch.float64 else 4


@triton.jit
def _log1p(u):
    # Accurate log1p without libdevice: log(1+u) * u / ((1+u) - 1) cancels the rounding of 1+u.
    w = 1.0 + u
    return tl.where(w == 1.0, u, tl.log(w) * (u / (w - 1.0)))


@triton.jit
def _loss_fwd_kernel(x_ptr, t_ptr, w_ptr, pw_ptr, loss_ptr, gx_ptr, gt_ptr, part_ptr, cols, chunks, delta, gscale,
                     KIND: tl.constexpr, HAS_W: tl.constexpr, HAS_PW: tl.constexpr, GRAD_X: tl.constexpr,
                     GRAD_T: tl.constexpr, NONE: tl.constexpr, F64: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    r = pid // chunks
    c = pid - r * chunks
    col = c * BLOCK + tl.arange(0, BLOCK)
    mask = col < cols
    offs = r * cols + col
    x = tl.load(x_ptr + offs, mask=mask, other=0.5)
    t = tl.load(t_ptr + offs, mask=mask, other=0.5)
    if F64:
        x = x.to(tl.float64)
        t = t.to(tl.float64)
    else:
        x = x.to(tl.float32)
        t = t.to(tl.float32)
    if KIND == 0:  # mse
        d = x - t
        l = d * d
        dx = 2.0 * d
        dt = -dx
    elif KIND == 1:  # l1: sign, 0 at 0 and at NaN
        d = x - t
        l = tl.abs(d)
        dx = tl.where(d > 0, 1.0, 0.0) - tl.where(d < 0, 1.0, 0.0)
        dx = dx.to(x.dtype)
        dt = -dx
    elif KIND == 2:  # huber
        d = x - t
        a = tl.abs(d)
        l = tl.where(a < delta, 0.5 * d * d, delta * (a - 0.5 * delta))
        dx = tl.where(d < -delta, -delta, tl.where(d > delta, delta, d))
        dt = -dx
    elif KIND == 3:  # bce, logs clamped at -100 (NaN passes the clamp as in torch)
        log_x = tl.log(x)
        log_1mx = _log1p(-x)
        dt = log_1mx - log_x  # unclamped: torch's target gradient is -logit(x)
        log_x = tl.where(log_x < -100.0, -100.0, log_x)
        log_1mx = tl.where(log_1mx < -100.0, -100.0, log_1mx)
        l = (t - 1.0) * log_1mx - t * log_x
        denom = (1.0 - x) * x
        denom = tl.where(denom < 1e-12, 1e-12, denom)
        dx = (x - t) / denom
    elif KIND == 4:  # bce_logits, stable: only exp(-|x|) is taken
        if HAS_PW:
            pw = tl.load(pw_ptr + offs, mask=mask, other=1.0)
            pw = pw.to(x.dtype)
        else:
            pw = 1.0
        e = tl.exp(-tl.abs(x))
        log_sig = tl.where(x < 0, x, 0.0) - _log1p(e)
        sig = tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
        l = (1.0 - t) * x - (1.0 + (pw - 1.0) * t) * log_sig
        dx = (pw * t + 1.0 - t) * sig - pw * t
        dt = -x - (pw - 1.0) * log_sig
    else:  # kl: x = mu, t = logvar
        e = tl.exp(t)
        l = -0.5 * (1.0 + t - x * x - e)
        dx = x
        dt = 0.5 * (e - 1.0)
    if HAS_W:
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
        w = w.to(x.dtype)
        l = l * w
        dx = dx * w
        dt = dt * w
    if GRAD_X:
        tl.store(gx_ptr + offs, (dx * gscale).to(gx_ptr.dtype.element_ty), mask=mask)
    if GRAD_T:
        tl.store(gt_ptr + offs, (dt * gscale).to(gt_ptr.dtype.element_ty), mask=mask)
    if NONE:
        tl.store(loss_ptr + offs, l.to(loss_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(part_ptr + pid, tl.sum(tl.where(mask, l, 0.0), axis=0))


@triton.jit
def _row_sum_kernel(part_ptr, out_ptr, chunks, scale, BLOCK: tl.constexpr):
    # One program per row: a fixed-order sum of that row's partials.
    r = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([BLOCK], dtype=part_ptr.dtype.element_ty)
    for c0 in range(0, chunks, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        acc += tl.load(part_ptr + r * chunks + c, mask=c < chunks, other=0.0)
    tl.store(out_ptr + r, (tl.sum(acc, axis=0) * scale).to(out_ptr.dtype.element_ty))


def _plan(input, reduction, kl):
    """(rows, cols, out_scale, grad_scale), as csrc/include/aefast/recon_loss_host.h."""
    numel = input.numel()
    batch = input.shape[0] if input.dim() else 1
    if reduction == "per_sample":
        cols = numel // batch if batch else 0
        s = 1.0 if kl else (1.0 / cols if cols else float("inf"))
        return batch, cols, s, s
    if reduction == "mean":
        count = batch if kl else numel
        s = 1.0 / count if count else float("inf")
        return 1, numel, s, s
    return 1, numel, 1.0, 1.0


def _loss_forward(input, target, weight, pos_weight, kind, reduction, delta, grad_input, grad_target):
    if input.shape != target.shape or input.dtype != target.dtype:
        raise RuntimeError("aefast: target must have the input's shape and dtype")
    x, t = input.contiguous(), target.contiguous()
    w = weight.contiguous() if weight is not None else None
    pw = pos_weight.contiguous() if pos_weight is not None else None
    k = KINDS[kind]
    rows, cols, out_scale, grad_scale = _plan(x, reduction, k == 5)
    own_t = grad_target and k in OWN_TARGET_GRAD
    # Saved gradients in the accumulation dtype (fp32 for fp16/bf16), as the C++ kernels: the
    # backward scale by grad_output is then their one rounding (aefast/ops/recon_loss.py).
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    gx = torch.empty(x.shape, dtype=acc_dtype, device=x.device) if grad_input else x.new_empty((0,), dtype=acc_dtype)
    gt = torch.empty(x.shape, dtype=acc_dtype, device=x.device) if own_t else x.new_empty((0,), dtype=acc_dtype)
    none = reduction == "none"
    if none:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    elif reduction == "per_sample":
        out = torch.empty((rows,), dtype=x.dtype, device=x.device)
    else:
        out = torch.empty((), dtype=x.dtype, device=x.device)
    chunks = triton.cdiv(cols, BLOCK)
    part = torch.empty((max(rows * chunks, 1),), dtype=acc_dtype, device=x.device)
    if rows * chunks:
        _loss_fwd_kernel[(rows * chunks,)](
            x, t, w if w is not None else x, pw if pw is not None else x, out if none else x,
            gx if grad_input else x, gt if own_t else x, part, cols, chunks, float(delta), grad_scale,
            KIND=k, HAS_W=w is not None, HAS_PW=pw is not None, GRAD_X=grad_input, GRAD_T=own_t, NONE=none,
            F64=x.dtype == torch.float64, BLOCK=BLOCK, num_warps=_warps(x.dtype))
    if not none and rows:
        if chunks:
            _row_sum_kernel[(rows,)](part, out, chunks, out_scale, BLOCK=256)
        else:  # no elements per row: the sum is 0, the mean 0 * inf = NaN (as torch's empty mean)
            out.fill_(0.0 * out_scale)
    return out, gx, gt


def recon_loss(input, target, weight, pos_weight, kind, reduction, delta, grad_input, grad_target):
    if kind not in KINDS or kind == "kl":
        raise RuntimeError(f"aefast::recon_loss: unknown kind {kind!r}")
    return _loss_forward(input, target, weight, pos_weight, kind, reduction, delta, grad_input, grad_target)


def kl_divergence(mu, logvar, reduction, grad):
    return _loss_forward(mu, logvar, None, None, "kl", reduction, 0.0, grad, grad)


@triton.jit
def _grad_scale_kernel(g_ptr, s_ptr, out_ptr, n, cols, alpha, MODE: tl.constexpr, F64: tl.constexpr,
                       BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    s = tl.load(s_ptr + offs, mask=mask, other=0.0)
    if MODE == 0:
        g = tl.load(g_ptr + offs * 0, mask=mask, other=0.0)
    elif MODE == 1:
        g = tl.load(g_ptr + offs // cols, mask=mask, other=0.0)
    else:
        g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    if F64:
        v = s.to(tl.float64) * g.to(tl.float64) * alpha
    else:
        v = s.to(tl.float32) * g.to(tl.float32) * alpha
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


def loss_grad_scale(grad_output, saved, alpha):
    """alpha * saved * grad_output in grad_output's dtype; saved has that dtype or its
    accumulation dtype (a loss forward's saved gradient)."""
    acc = torch.float64 if grad_output.dtype == torch.float64 else torch.float32
    if saved.dtype not in (grad_output.dtype, acc):
        raise RuntimeError(f"aefast::loss_grad_scale: saved must have grad_output's dtype or its accumulation dtype, "
                           f"got {saved.dtype} and {grad_output.dtype}")
    if grad_output.shape == saved.shape:
        mode = 2
    elif grad_output.dim() == 0:
        mode = 0
    elif grad_output.dim() == 1 and saved.dim() >= 1 and grad_output.shape[0] == saved.shape[0]:
        mode = 1
    else:
        raise RuntimeError(f"aefast::loss_grad_scale: grad_output of shape {tuple(grad_output.shape)} does not "
                           f"broadcast over {tuple(saved.shape)}")
    g, s = grad_output.contiguous(), saved.contiguous()
    out = torch.empty(s.shape, dtype=g.dtype, device=s.device)
    n = s.numel()
    if n:
        cols = n // s.shape[0] if mode == 1 else 1
        _grad_scale_kernel[(triton.cdiv(n, BLOCK),)](g, s, out, n, cols, float(alpha), MODE=mode,
                                                     F64=g.dtype == torch.float64, BLOCK=BLOCK)
    return out


# ---------------------------------------------------------------- noise

@triton.jit
def corrupt_value(x, idx, seed, level, low, high, NOISE: tl.constexpr):
    """corrupt() of the elements x whose logical (NCHW) flat indices are idx, cast back to x's
    dtype: the one element function of the corrupt kernel below and of the encoder's input load
    (aefast/triton/conv_pool.py). NOISE: 0 gaussian, 1 masking, 2 salt_pepper."""
    if NOISE == 0:
        noise = tl.randn(seed, idx)
        if x.dtype == tl.float64:
            y = x.to(tl.float64) + level * noise.to(tl.float64)
        else:
            y = x.to(tl.float32) + level * noise
    else:
        u = tl.rand(seed, idx)
        if NOISE == 1:
            y = tl.where(u < level, 0.0, x)
        else:
            y = tl.where(u < level * 0.5, low, tl.where(u < level, high, x))
    return y.to(x.dtype)


@triton.jit
def _corrupt_kernel(x_ptr, y_ptr, n, seed, level, low, high, KIND: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, corrupt_value(x, offs, seed, level, low, high, KIND), mask=mask)


def corrupt(input, seed, kind, level, low, high):
    kinds = {"gaussian": 0, "masking": 1, "salt_pepper": 2}
    if kind not in kinds:
        raise RuntimeError(f"aefast::corrupt: unknown kind {kind!r}")
    x = input.contiguous()
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n = x.numel()
    if n:
        # float32 thresholds: the CPU/CUDA kernels compare the float uniform with float(level).
        _corrupt_kernel[(triton.cdiv(n, BLOCK),)](x, y, n, seed, level, low, high, KIND=kinds[kind], BLOCK=BLOCK,
                                                  num_warps=_warps(x.dtype))
    return y


@triton.jit
def _reparam_kernel(mu_ptr, lv_ptr, g_ptr, out_ptr, n, seed, BACKWARD: tl.constexpr, F64: tl.constexpr,
                    BLOCK: tl.constexpr):
    # forward: z = mu + exp(lv/2) eps;  backward: dlv = g exp(lv/2) eps / 2 (eps regenerated)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    eps = tl.randn(seed, offs)
    lv = tl.load(lv_ptr + offs, mask=mask, other=0.0)
    if F64:
        lv = lv.to(tl.float64)
        eps = eps.to(tl.float64)
    else:
        lv = lv.to(tl.float32)
    std = tl.exp(0.5 * lv)
    if BACKWARD:
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(lv.dtype)
        v = g * 0.5 * std * eps
    else:
        mu = tl.load(mu_ptr + offs, mask=mask, other=0.0).to(lv.dtype)
        v = mu + std * eps
    tl.store(out_ptr + offs, v.to(out_ptr.dtype.element_ty), mask=mask)


def _reparam_launch(mu, logvar, grad, seed, backward):
    lv = logvar.contiguous()
    other = (grad if backward else mu).contiguous()
    if other.shape != lv.shape or other.dtype != lv.dtype:
        raise RuntimeError("aefast::reparameterize: tensors must share shape and dtype")
    out = torch.empty(lv.shape, dtype=lv.dtype, device=lv.device)
    n = lv.numel()
    if n:
        _reparam_kernel[(triton.cdiv(n, BLOCK),)](other, lv, other, out, n, seed, BACKWARD=backward,
                                                  F64=lv.dtype == torch.float64, BLOCK=BLOCK)
    return out


def reparameterize(mu, logvar, seed):
    return _reparam_launch(mu, logvar, None, seed, False)


def reparameterize_backward(grad, logvar, seed):
    return _reparam_launch(None, logvar, grad, seed, True)
