"""Pure-PyTorch twins of every public function in aefast.functional.

These are written from the definitions (windows, scatters, formulas), not by calling the
torch.nn.functional function they stand for, so that the tests comparing them with
torch.nn.functional pin down the semantics every kernel must implement:

* pooling windows are scanned row-major with a strict ``>``: the first maximum wins;
* a NaN wins: once a NaN is seen every later NaN replaces it (torch's ``val > max || isnan(val)``),
  so the LAST NaN of a window gives the index;
* a window of only ``-inf`` (or padding) reports its first in-bounds element;
* indices are flat ``h * W + w`` positions in one unpadded (N, C) plane.

Arguments are validated by aefast.functional before any twin runs.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from aefast._checks import pair, pool_geometry, unpool_output_size

ACTIVATIONS = (None, "relu", "leaky_relu", "sigmoid", "tanh", "gelu", "silu")


def apply_activation(x: torch.Tensor, name: str | None, negative_slope: float = 0.01) -> torch.Tensor:
    if name is None:
        return x
    if name == "relu":
        return torch.relu(x)
    if name == "leaky_relu":
        return torch.where(x >= 0, x, x * negative_slope)
    if name == "sigmoid":
        return torch.sigmoid(x)
    if name == "tanh":
        return torch.tanh(x)
    if name == "gelu":  # the exact (erf) form, torch's default
        return 0.5 * x * (1.0 + torch.erf(x * (1.0 / math.sqrt(2.0))))
    if name == "silu":
        return x * torch.sigmoid(x)
    raise ValueError(f"aefast: unknown activation {name!r}; choose one of {ACTIVATIONS}")


# ---------------------------------------------------------------- index formats

def flat_to_window(indices, input_size, kernel_size, stride=None, padding=0, dilation=1):
    """Flat plane indices -> uint8 offsets i*kW + j inside each window (255 if not inside it)."""
    geo = _geometry_for(indices, input_size, kernel_size, stride, padding, dilation)
    oh, ow = _output_coords(indices)
    w_in = geo.input_size[1]
    h, w = torch.div(indices, w_in, rounding_mode="floor"), torch.remainder(indices, w_in)
    rh = h - (oh * geo.stride[0] - geo.padding[0])
    rw = w - (ow * geo.stride[1] - geo.padding[1])
    i, j = torch.div(rh, geo.dilation[0], rounding_mode="floor"), torch.div(rw, geo.dilation[1], rounding_mode="floor")
    inside = ((indices >= 0) & (indices < geo.input_size[0] * w_in) & (rh >= 0) & (rw >= 0)
              & (rh % geo.dilation[0] == 0) & (rw % geo.dilation[1] == 0)
              & (i < geo.kernel_size[0]) & (j < geo.kernel_size[1]))
    offset = torch.where(inside, i * geo.kernel_size[1] + j, torch.full_like(indices, 255))
    return offset.to(torch.uint8)


def window_to_flat(window, input_size, kernel_size, stride=None, padding=0, dilation=1):
    """uint8 window offsets -> flat plane indices (-1 where the offset names no input element)."""
    geo = _geometry_for(window, input_size, kernel_size, stride, padding, dilation)
    oh, ow = _output_coords(window)
    off = window.to(torch.int64)
    i, j = torch.div(off, geo.kernel_size[1], rounding_mode="floor"), torch.remainder(off, geo.kernel_size[1])
    h = oh * geo.stride[0] - geo.padding[0] + i * geo.dilation[0]
    w = ow * geo.stride[1] - geo.padding[1] + j * geo.dilation[1]
    valid = (off < geo.window_elements) & (h >= 0) & (h < geo.input_size[0]) & (w >= 0) & (w < geo.input_size[1])
    return torch.where(valid, h * geo.input_size[1] + w, torch.full_like(off, -1))


def _geometry_for(t, input_size, kernel_size, stride, padding, dilation):
    geo = pool_geometry(input_size, kernel_size, stride, padding, dilation, ceil_mode=False)
    # The pooled tensor may come from ceil_mode pooling (one more window); take its size as given.
    return type(geo)(geo.input_size, geo.kernel_size, geo.stride, geo.padding, geo.dilation, tuple(t.shape[-2:]))


def _output_coords(t):
    out_h, out_w = t.shape[-2:]
    oh = torch.arange(out_h, device=t.device).view(out_h, 1)
    ow = torch.arange(out_w, device=t.device).view(1, out_w)
    return oh, ow


# ---------------------------------------------------------------- pooling

def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    squeeze = input.dim() == 3
    x = input.unsqueeze(0) if squeeze else input
    geo = pool_geometry(x.shape[-2:], kernel_size, stride, padding, dilation, ceil_mode)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = geo.kernel_size, geo.stride, geo.padding, geo.dilation
    (H, W), (oh, ow) = geo.input_size, geo.output_size
    span_h, span_w = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    # Pad so that every window, ceil_mode ones included, lies inside the padded plane.
    extra_h = max(0, (oh - 1) * sh + span_h - (H + 2 * ph))
    extra_w = max(0, (ow - 1) * sw + span_w - (W + 2 * pw))
    low = -math.inf if x.dtype.is_floating_point else torch.iinfo(x.dtype).min
    padded = F.pad(x, (pw, pw + extra_w, ph, ph + extra_h), value=low)
    inside = F.pad(torch.ones((H, W), dtype=torch.bool, device=x.device), (pw, pw + extra_w, ph, ph + extra_h))

    def windows(t):  # (..., Hp, Wp) -> (..., oh, ow, kh*kw) in row-major window order
        t = t.unfold(-2, span_h, sh).unfold(-2, span_w, sw)[..., ::dh, ::dw]
        return t[..., :oh, :ow, :, :].reshape(*t.shape[:-4], oh, ow, kh * kw)

    vals = windows(padded)
    valid = windows(inside).expand(vals.shape)
    # Padding never wins: it is -inf, and a window whose max is -inf reports its first
    # in-bounds element, as does torch's kernel (it starts from that element with max=-inf).
    best_val, best = vals.max(dim=-1)
    first_valid = valid.to(torch.uint8).argmax(dim=-1)
    best = torch.where(valid.gather(-1, best.unsqueeze(-1)).squeeze(-1), best, first_valid)
    if x.dtype.is_floating_point:
        nan = vals.isnan()
        last_nan = (kh * kw - 1) - nan.flip(-1).to(torch.uint8).argmax(dim=-1)
        has_nan = nan.any(dim=-1)
        best = torch.where(has_nan, last_nan, best)
        best_val = torch.where(has_nan, torch.full_like(best_val, math.nan), best_val)
    out = best_val.contiguous(memory_format=_memory_format(input))
    if squeeze:
        out = out.squeeze(0)
    if not return_indices:
        return out
    oy = torch.arange(oh, device=x.device).view(oh, 1)
    ox = torch.arange(ow, device=x.device).view(1, ow)
    h = oy * sh - ph + torch.div(best, kw, rounding_mode="floor") * dh
    w = ox * sw - pw + torch.remainder(best, kw) * dw
    idx = (h * W + w).contiguous(memory_format=_memory_format(input))
    return out, idx.squeeze(0) if squeeze else idx


def _memory_format(t):
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def max_unpool2d(input, indices, kernel_size, stride=None, padding=0, output_size=None):
    k = pair(kernel_size, "kernel_size", minimum=1)
    s = k if stride is None else pair(stride, "stride", minimum=1)
    p = pair(padding, "padding", minimum=0)
    out_hw = unpool_output_size(tuple(input.shape[-2:]), k, s, p, output_size)
    lead = input.shape[:-2]
    flat_in = input.reshape(-1, input.shape[-2] * input.shape[-1])
    flat_idx = indices.reshape(flat_in.shape).to(torch.int64)
    out = flat_in.new_zeros(flat_in.shape[0], out_hw[0] * out_hw[1])
    # Duplicate indices: the last pooled position (row-major) that names an element wins,
    # which is what torch's CPU kernel does.
    out = _scatter_last_wins(out, flat_idx, flat_in)
    return out.reshape(*lead, *out_hw).contiguous(memory_format=_memory_format(input))


def _scatter_last_wins(out, idx, src):
    """out[idx[k]] = src[k], the last k winning among duplicates. Only winners reach the output,
    so only they receive a gradient (torch's own backward also hands it to the overwritten ones)."""
    order = torch.arange(idx.shape[-1], device=idx.device).expand_as(idx)
    winner = torch.full(out.shape, -1, dtype=torch.int64, device=out.device)
    winner = winner.scatter_reduce(-1, idx, order, reduce="amax", include_self=True)
    is_winner = winner.gather(-1, idx) == order
    rows = torch.arange(out.shape[0], device=out.device).unsqueeze(1).expand_as(idx)
    # Only winners write, so each element receives exactly one value, deterministically.
    return out.index_put((rows[is_winner], idx[is_winner]), src[is_winner])


# ---------------------------------------------------------------- transposed convolution

def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """A transposed conv is the conv2d of the stride-dilated input with the flipped, transposed
    kernel, padded by dilation*(k-1) - padding (plus output_padding on the far side)."""
    squeeze = input.dim() == 3
    x = input.unsqueeze(0) if squeeze else input
    s, p = pair(stride, "stride", minimum=1), pair(padding, "padding", minimum=0)
    op, d = pair(output_padding, "output_padding", minimum=0), pair(dilation, "dilation", minimum=1)
    n, c_in, h, w = x.shape
    k = weight.shape[-2:]
    up = x.new_zeros(n, c_in, (h - 1) * s[0] + 1, (w - 1) * s[1] + 1)
    up[:, :, :: s[0], :: s[1]] = x
    lo = [d[a] * (k[a] - 1) - p[a] for a in range(2)]
    hi = [lo[a] + op[a] for a in range(2)]
    up = F.pad(up, (lo[1], hi[1], lo[0], hi[0]))  # negative pads crop
    c_out_g = weight.shape[1]
    wt = weight.reshape(groups, c_in // groups, c_out_g, *k).transpose(1, 2)
    wt = wt.reshape(groups * c_out_g, c_in // groups, *k).flip(-1, -2)
    out = F.conv2d(up, wt, bias, stride=1, padding=0, dilation=d, groups=groups)
    out = out.contiguous(memory_format=_memory_format(input))
    return out.squeeze(0) if squeeze else out


# ---------------------------------------------------------------- losses

def _reduce(loss, reduction):
    if reduction == "none":
        return loss
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "per_sample":
        return loss.reshape(loss.shape[0], -1).mean(dim=1) if loss.dim() > 0 else loss
    raise ValueError(f"aefast: unknown reduction {reduction!r}")


def _weighted_by_sum(loss, weight, reduction):
    # torch's weighted mse_loss / l1_loss: the weighted mean is normalised by sum(weight).
    if weight is None:
        return _reduce(loss, reduction)
    if reduction == "mean":
        return (loss * weight).sum() / weight.sum()
    return _reduce(loss * weight, reduction)


def mse_loss(input, target, size_average=None, reduce=None, reduction="mean", weight=None):
    return _weighted_by_sum((input - target) ** 2, weight, reduction)


def l1_loss(input, target, size_average=None, reduce=None, reduction="mean", weight=None):
    return _weighted_by_sum((input - target).abs(), weight, reduction)


def huber_loss(input, target, reduction="mean", delta=1.0, weight=None):
    diff = (input - target).abs()
    loss = torch.where(diff < delta, 0.5 * diff * diff, delta * (diff - 0.5 * delta))
    return _reduce(loss * weight if weight is not None else loss, reduction)


def binary_cross_entropy(input, target, weight=None, size_average=None, reduce=None, reduction="mean"):
    # torch clamps each log at -100 so that p = 0 or 1 gives a finite loss.
    log_p = torch.clamp(torch.log(input), min=-100)
    log_1mp = torch.clamp(torch.log1p(-input), min=-100)
    loss = -(target * log_p + (1 - target) * log_1mp)
    return _reduce(loss * weight if weight is not None else loss, reduction)


def binary_cross_entropy_with_logits(input, target, weight=None, size_average=None, reduce=None,
                                     reduction="mean", pos_weight=None):
    # -[pw*t*log σ(x) + (1-t)*log(1-σ(x))] = (1-t)*x - (1 + (pw-1)*t) * log σ(x). F.logsigmoid is
    # stable for large |x| and, unlike a clamp/abs formulation, has the exact gradient at x = 0.
    log_sig = F.logsigmoid(input)
    if pos_weight is None:
        loss = (1 - target) * input - log_sig
    else:
        log_weight = 1 + (pos_weight - 1) * target
        loss = (1 - target) * input - log_weight * log_sig
    return _reduce(loss * weight if weight is not None else loss, reduction)


LOSS_KINDS = ("mse", "l1", "huber", "bce", "bce_logits")
REDUCTIONS = ("mean", "sum", "none", "per_sample")


def reconstruction_loss(input, target, kind="mse", reduction="mean", *, delta=1.0):
    """``per_sample`` is the mean over every non-batch dim: one anomaly score per item."""
    if kind == "mse":
        loss = mse_loss(input, target, reduction="none")
    elif kind == "l1":
        loss = l1_loss(input, target, reduction="none")
    elif kind == "huber":
        loss = huber_loss(input, target, reduction="none", delta=delta)
    elif kind == "bce":
        loss = binary_cross_entropy(input, target, reduction="none")
    elif kind == "bce_logits":
        loss = binary_cross_entropy_with_logits(input, target, reduction="none")
    else:
        raise ValueError(f"aefast: unknown loss kind {kind!r}; choose one of {LOSS_KINDS}")
    return _reduce(loss, reduction)


# ---------------------------------------------------------------- corruption and VAE terms

CORRUPTIONS = ("gaussian", "masking", "salt_pepper")


def corrupt(input, kind="gaussian", level=0.1, generator=None, *, low=0.0, high=1.0):
    """Vincent et al. 2010: additive gaussian (std=level), masking (a fraction ``level`` set to
    0) and salt-and-pepper (a fraction ``level`` set to ``low`` or ``high`` by a fair coin)."""
    if kind == "gaussian":
        noise = torch.randn(input.shape, generator=generator, device=input.device, dtype=torch.float32)
        return (input.float() + level * noise).to(input.dtype)
    u = torch.rand(input.shape, generator=generator, device=input.device, dtype=torch.float32)
    if kind == "masking":
        return torch.where(u < level, torch.zeros_like(input), input)
    if kind == "salt_pepper":
        coin = torch.rand(input.shape, generator=generator, device=input.device, dtype=torch.float32)
        flipped = torch.where(coin < 0.5, torch.full_like(input, low), torch.full_like(input, high))
        return torch.where(u < level, flipped, input)
    raise ValueError(f"aefast: unknown corruption {kind!r}; choose one of {CORRUPTIONS}")


def reparameterize(mu, logvar, generator=None):
    eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=torch.float32).to(mu.dtype)
    return mu + torch.exp(0.5 * logvar) * eps


def kl_divergence(mu, logvar, reduction="mean"):
    """KL(N(mu, exp(logvar)) || N(0, 1)) per element; ``mean`` is the sum over latent dims
    averaged over the batch (the usual VAE objective), ``per_sample`` one value per item."""
    kl = -0.5 * (1 + logvar - mu * mu - torch.exp(logvar))
    if reduction == "none":
        return kl
    per_sample = kl.reshape(kl.shape[0], -1).sum(dim=1)
    if reduction == "per_sample":
        return per_sample
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    raise ValueError(f"aefast: unknown reduction {reduction!r}")


# ---------------------------------------------------------------- fused blocks

def conv_pool2d(input, weight, bias=None, stride=1, padding=0, activation="relu", pool_size=2,
                return_indices=True, index_format="flat", *, negative_slope=0.01, pool_stride=None, ceil_mode=False):
    """max_pool2d(act(conv2d(...)), pool_size, pool_stride, ceil_mode=ceil_mode); window indices are
    the offsets inside each window (which starts at (i*pool_stride_h, j*pool_stride_w))."""
    y = F.conv2d(input, weight, bias, stride=stride, padding=padding)
    y = apply_activation(y, activation, negative_slope)
    pooled, idx = max_pool2d(y, pool_size, pool_stride, ceil_mode=ceil_mode, return_indices=True)
    if not return_indices:
        return pooled
    if index_format == "window":
        idx = flat_to_window(idx, y.shape[-2:], pool_size, pool_stride)
    return pooled, idx


def unpool_conv_transpose2d(input, indices, weight, bias=None, pool_size=2, output_size=None, stride=1,
                            padding=0, output_padding=0, activation=None, index_format="flat", *,
                            negative_slope=0.01, pool_stride=None):
    """act(conv_transpose2d(max_unpool2d(input, indices, pool_size, pool_stride, output_size), ...));
    window indices are offsets inside windows pool_stride apart (default: pool_size)."""
    k = pair(pool_size, "pool_size", minimum=1)
    ks = k if pool_stride is None else pair(pool_stride, "pool_stride", minimum=1)
    unpooled_hw = unpool_output_size(tuple(input.shape[-2:]), k, ks, (0, 0), output_size)
    if index_format == "window":
        indices = window_to_flat(indices, unpooled_hw, k, ks)
    u = max_unpool2d(input, indices, k, ks, output_size=unpooled_hw)
    y = conv_transpose2d(u, weight, bias, stride, padding, output_padding)
    return apply_activation(y, activation, negative_slope)


def update_running_stats(running_mean, running_var, num_batches_tracked, momentum, mean, var, count):
    """nn.BatchNorm2d's update in training mode, in place: ``num_batches_tracked += 1``; with
    ``f = momentum`` (or ``1 / num_batches_tracked`` when momentum is None, 0 without a counter),
    ``running = (1 - f) * running + f * batch_stat``, the variance unbiased (``var * M / (M - 1)``)."""
    with torch.no_grad():
        if num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        if running_mean is None:
            return
        if momentum is None:
            if num_batches_tracked is None:
                return  # torch's factor 0.0: the running statistics stay
            factor = 1.0 / num_batches_tracked.to(running_mean.dtype)
        else:
            factor = float(momentum)
        unbiased = var * (count / (count - 1))
        running_mean.mul_(1 - factor).add_(mean.to(running_mean.dtype) * factor)
        running_var.mul_(1 - factor).add_(unbiased.to(running_var.dtype) * factor)


def conv_bn_pool2d(input, weight, bias, bn_weight, bn_bias, running_mean, running_var, training=True, momentum=0.1,
                   eps=1e-5, stride=1, padding=0, activation="relu", pool_size=2, return_indices=True,
                   index_format="flat", num_batches_tracked=None, *, negative_slope=0.01, pool_stride=None,
                   ceil_mode=False):
    """max_pool2d(act(batch_norm(conv2d(input, weight, bias))), pool_size, pool_stride, ceil_mode=ceil_mode): batch statistics (biased variance)
    when ``training`` or without running statistics, else the running ones; running statistics
    and num_batches_tracked are updated in training mode as nn.BatchNorm2d does. The normalisation
    and activation run in the op-math dtype (float32 for half/bf16), the pool on the input dtype."""
    y = F.conv2d(input, weight, bias, stride=stride, padding=padding)
    a = batch_norm_act2d(y, bn_weight, bn_bias, running_mean, running_var, training, momentum, eps, activation,
                         num_batches_tracked, negative_slope=negative_slope)
    pooled, idx = max_pool2d(a, pool_size, pool_stride, ceil_mode=ceil_mode, return_indices=True)
    if not return_indices:
        return pooled
    if index_format == "window":
        idx = flat_to_window(idx, a.shape[-2:], pool_size, pool_stride)
    return pooled, idx


def batch_norm_act2d(input, bn_weight, bn_bias, running_mean, running_var, training=True, momentum=0.1, eps=1e-5,
                     activation="relu", num_batches_tracked=None, *, negative_slope=0.01):
    """act(batch_norm(input, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)):
    batch statistics (biased variance) when ``training`` or without running statistics, else the
    running ones; running statistics and num_batches_tracked are updated in training mode as
    nn.BatchNorm2d does. The normalisation and activation run in the op-math dtype (float32 for
    half/bf16); the result has the input's dtype."""
    stat_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    xf = input.to(stat_dtype)
    if training or running_mean is None:
        mean = xf.mean(dim=(0, 2, 3))
        var = (xf - mean[:, None, None]).square().mean(dim=(0, 2, 3))
        if training:
            update_running_stats(running_mean, running_var, num_batches_tracked, momentum, mean.detach(),
                                 var.detach(), xf.numel() // xf.shape[1])
    else:
        mean, var = running_mean.to(stat_dtype), running_var.to(stat_dtype)
    z = (xf - mean[:, None, None]) * torch.rsqrt(var + eps)[:, None, None]
    if bn_weight is not None:
        z = z * bn_weight.to(stat_dtype)[:, None, None]
    if bn_bias is not None:
        z = z + bn_bias.to(stat_dtype)[:, None, None]
    return apply_activation(z, activation, negative_slope).to(input.dtype)


def conv_transpose_act2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, activation=None, *,
                         negative_slope=0.01):
    """act(conv_transpose2d(input, weight, bias, stride, padding, output_padding)): the decoder's
    upsampler without unpool (groups 1, dilation 1)."""
    y = conv_transpose2d(input, weight, bias, stride, padding, output_padding)
    return apply_activation(y, activation, negative_slope)
