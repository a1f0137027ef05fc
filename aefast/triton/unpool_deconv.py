"""Triton kernels of the unpool_deconv family (the decoder), forward and backward.

Same math as csrc/cpu/unpool_deconv.cpp (see aefast/ops/unpool_deconv.py for the formulas).
Every kernel is a gather: each program owns its outputs and sums in a fixed order, so results
are bitwise reproducible (no float atomics).

* forward: one lane per output element (n, co, oy, ox). For each kernel tap (kh, kw) the only
  unpooled position that reaches it is h = (oy + padh - kh) / sh (when divisible), likewise w;
  that position holds channel ci's value iff ci's argmax in window (h // pool_h, w // pool_w) is
  exactly (h, w). So pre = b + sum_{kh, kw, ci} [argmax(ci) == (h, w)] z * W[ci, co, kh, kw].
* grad_input: one lane per pooled value; its position (h, w) from the index, then
  sum_{co, kh, kw} gpre[n, co, h*sh - padh + kh, w*sw - padw + kw] * W[ci, co, kh, kw].
* grad_weight: one program per weight element, a vector sum over all pooled values of channel
  ci of z * gpre at their footprint tap, reduced with tl.sum (fixed tree).
* grad_bias: one program per output channel, a tl.sum over gpre.
* max_unpool2d: integer atomic_max picks the last pooled position naming each element
  (order-free, hence deterministic); only that position writes (or receives the gradient).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 256
NEEDS_PREACTIVATION = ("leaky_relu", "gelu", "silu")
_ACT_CODES = {None: 0, "relu": 1, "leaky_relu": 2, "sigmoid": 3, "tanh": 4, "gelu": 5, "silu": 6}


@triton.jit
def _act_forward(x, ACT: tl.constexpr, slope):
    if ACT == 1:
        x = tl.where(x < 0, 0.0, x)
    elif ACT == 2:
        x = tl.where(x >= 0, x, x * slope)
    elif ACT == 3:
        x = 1.0 / (1.0 + tl.exp(-x))
    elif ACT == 4:
        x = 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)
    elif ACT == 5:
        x = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    elif ACT == 6:
        x = x / (1.0 + tl.exp(-x))
    return x


@triton.jit
def _act_derivative(v, ACT: tl.constexpr, slope):
    # v is the output y for relu/sigmoid/tanh and the pre-activation x for leaky_relu/gelu/silu.
    d = tl.zeros_like(v) + 1.0
    if ACT == 1:
        d = tl.where(v > 0, 1.0, 0.0)
    elif ACT == 2:
        d = tl.where(v >= 0, 1.0, slope)
    elif ACT == 3:
        d = v * (1.0 - v)
    elif ACT == 4:
        d = 1.0 - v * v
    elif ACT == 5:
        d = 0.5 * (1.0 + tl.math.erf(v * 0.7071067811865476)) + v * 0.3989422804014327 * tl.exp(-0.5 * v * v)
    elif ACT == 6:
        s = 1.0 / (1.0 + tl.exp(-v))
        d = s * (1.0 + v * (1.0 - s))
    return d


@triton.jit
def _forward_kernel(z_ptr, idx_ptr, w_ptr, b_ptr, out_ptr, pre_ptr, total, C_IN, C_OUT, HP, WP, HU, WU, HO, WO,
                    KH, KW, SH, SW, PH, PW, slope, POOL_H: tl.constexpr, POOL_W: tl.constexpr,
                    IS_FLAT: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, STORE_PRE: tl.constexpr,
                    ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = e < total
    ox = e % WO
    oy = (e // WO) % HO
    co = (e // (WO * HO)) % C_OUT
    n = e // (WO * HO * C_OUT)
    acc = tl.zeros([BLOCK], dtype=ACC_DTYPE)
    if HAS_BIAS:
        acc += tl.load(b_ptr + co, mask=live, other=0).to(ACC_DTYPE)
    for kh in range(KH):
        hn = oy + PH - kh
        h = hn // SH
        ok_h = (hn >= 0) & (hn - h * SH == 0) & (h < HU)
        for kw in range(KW):
            wn = ox + PW - kw
            w = wn // SW
            ok = live & ok_h & (wn >= 0) & (wn - w * SW == 0) & (w < WU)
            ph = h // POOL_H
            pw = w // POOL_W
            ok = ok & (ph < HP) & (pw < WP)
            if IS_FLAT:
                want = h * WU + w
            else:
                want = (h - ph * POOL_H) * POOL_W + (w - pw * POOL_W)
            for ci in range(C_IN):
                k = ((n * C_IN + ci) * HP + ph) * WP + pw
                got = tl.load(idx_ptr + k, mask=ok, other=0).to(tl.int64)
                hit = ok & (got == want)
                zv = tl.load(z_ptr + k, mask=hit, other=0).to(ACC_DTYPE)
                wv = tl.load(w_ptr + ((ci * C_OUT + co) * KH + kh) * KW + kw, mask=hit, other=0).to(ACC_DTYPE)
                acc += zv * wv
    if STORE_PRE:
        tl.store(pre_ptr + e, acc.to(pre_ptr.dtype.element_ty), mask=live)
    y = _act_forward(acc, ACT, slope)
    tl.store(out_ptr + e, y.to(out_ptr.dtype.element_ty), mask=live)


@triton.jit
def _gpre_kernel(g_ptr, a_ptr, out_ptr, total, slope, ACT: tl.constexpr, ACC_DTYPE: tl.constexpr,
                 BLOCK: tl.constexpr):
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = e < total
    g = tl.load(g_ptr + e, mask=live, other=0).to(ACC_DTYPE)
    v = tl.load(a_ptr + e, mask=live, other=0).to(ACC_DTYPE)
    tl.store(out_ptr + e, g * _act_derivative(v, ACT, slope), mask=live)


@triton.jit
def _grad_input_kernel(gpre_ptr, idx_ptr, w_ptr, gz_ptr, total, C_IN, C_OUT, HP, WP, WU, HO, WO, KH, KW, SH, SW,
                       PH, PW, POOL_H: tl.constexpr, POOL_W: tl.constexpr, IS_FLAT: tl.constexpr,
                       ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = e < total
    pw = e % WP
    ph = (e // WP) % HP
    ci = (e // (WP * HP)) % C_IN
    n = e // (WP * HP * C_IN)
    raw = tl.load(idx_ptr + e, mask=live, other=0).to(tl.int64)
    if IS_FLAT:
        h = raw // WU
        w = raw - h * WU
    else:
        h = ph * POOL_H + raw // POOL_W
        w = pw * POOL_W + raw % POOL_W
    acc = tl.zeros([BLOCK], dtype=ACC_DTYPE)
    for co in range(C_OUT):
        for kh in range(KH):
            oy = h * SH - PH + kh
            ok_h = live & (oy >= 0) & (oy < HO)
            for kw in range(KW):
                ox = w * SW - PW + kw
                ok = ok_h & (ox >= 0) & (ox < WO)
                gv = tl.load(gpre_ptr + ((n * C_OUT + co) * HO + oy) * WO + ox, mask=ok, other=0)
                wv = tl.load(w_ptr + ((ci * C_OUT + co) * KH + kh) * KW + kw, mask=live, other=0).to(ACC_DTYPE)
                acc += gv * wv
    tl.store(gz_ptr + e, acc.to(gz_ptr.dtype.element_ty), mask=live)


@triton.jit
def _grad_weight_kernel(gpre_ptr, idx_ptr, z_ptr, gw_ptr, N, C_IN, C_OUT, HP, WP, WU, HO, WO, KH, KW, SH, SW, PH,
                        PW, POOL_H: tl.constexpr, POOL_W: tl.constexpr, IS_FLAT: tl.constexpr,
                        ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    widx = tl.program_id(0)
    kw = widx % KW
    kh = (widx // KW) % KH
    co = (widx // (KW * KH)) % C_OUT
    ci = widx // (KW * KH * C_OUT)
    plane = HP * WP
    count = N * plane
    acc = tl.zeros([BLOCK], dtype=ACC_DTYPE)
    for start in range(0, count, BLOCK):
        r = start + tl.arange(0, BLOCK).to(tl.int64)
        live = r < count
        n = r // plane
        p = r - n * plane
        ph = p // WP
        pw = p - ph * WP
        k = (n * C_IN + ci) * plane + p
        raw = tl.load(idx_ptr + k, mask=live, other=0).to(tl.int64)
        if IS_FLAT:
            h = raw // WU
            w = raw - h * WU
        else:
            h = ph * POOL_H + raw // POOL_W
            w = pw * POOL_W + raw % POOL_W
        oy = h * SH - PH + kh
        ox = w * SW - PW + kw
        ok = live & (oy >= 0) & (oy < HO) & (ox >= 0) & (ox < WO)
        zv = tl.load(z_ptr + k, mask=ok, other=0).to(ACC_DTYPE)
        gv = tl.load(gpre_ptr + ((n * C_OUT + co) * HO + oy) * WO + ox, mask=ok, other=0)
        acc += zv * gv
    tl.store(gw_ptr + widx, tl.sum(acc, axis=0).to(gw_ptr.dtype.element_ty))


@triton.jit
def _grad_bias_kernel(gpre_ptr, gb_ptr, N, C_OUT, PLANE, BLOCK: tl.constexpr, ACC_DTYPE: tl.constexpr):
    co = tl.program_id(0)
    count = N * PLANE
    acc = tl.zeros([BLOCK], dtype=ACC_DTYPE)
    for start in range(0, count, BLOCK):
        r = start + tl.arange(0, BLOCK).to(tl.int64)
        live = r < count
        n = r // PLANE
        p = r - n * PLANE
        acc += tl.load(gpre_ptr + (n * C_OUT + co) * PLANE + p, mask=live, other=0)
    tl.store(gb_ptr + co, tl.sum(acc, axis=0).to(gb_ptr.dtype.element_ty))


def _acc_dtype(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _out_hw(unpooled_size, weight, stride, padding, output_padding):
    return [(unpooled_size[a] - 1) * stride[a] - 2 * padding[a] + weight.shape[2 + a] + output_padding[a]
            for a in range(2)]


def forward(input, indices, weight, bias, pool_size, unpooled_size, stride, padding, output_padding, activation,
            negative_slope):
    z, idx, w = input.contiguous(), indices.contiguous(), weight.contiguous()
    n, c_in, hp, wp = z.shape
    c_out, kh, kw = w.shape[1], w.shape[2], w.shape[3]
    ho, wo = _out_hw(unpooled_size, w, stride, padding, output_padding)
    out = torch.empty((n, c_out, ho, wo), dtype=z.dtype, device=z.device)
    store_pre = activation in NEEDS_PREACTIVATION
    pre = torch.empty_like(out) if store_pre else out.new_empty((0,))
    total = out.numel()
    if total:
        b = bias.contiguous() if bias is not None else out
        _forward_kernel[(triton.cdiv(total, BLOCK),)](
            z, idx, w, b, out, pre if store_pre else out, total, c_in, c_out, hp, wp, unpooled_size[0],
            unpooled_size[1], ho, wo, kh, kw, stride[0], stride[1], padding[0], padding[1], float(negative_slope),
            POOL_H=pool_size[0], POOL_W=pool_size[1], IS_FLAT=idx.dtype == torch.int64, HAS_BIAS=bias is not None,
            ACT=_ACT_CODES[activation], STORE_PRE=store_pre, ACC_DTYPE=_acc_dtype(z.dtype), BLOCK=BLOCK)
    return out, pre


def backward(grad_out, act_input, input, indices, weight, pool_size, unpooled_size, stride, padding, output_padding,
             activation, negative_slope, output_mask):
    z, idx, w = input.contiguous(), indices.contiguous(), weight.contiguous()
    n, c_in, hp, wp = z.shape
    c_out, kh, kw = w.shape[1], w.shape[2], w.shape[3]
    ho, wo = _out_hw(unpooled_size, w, stride, padding, output_padding)
    acc_dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    gpre = torch.empty((n, c_out, ho, wo), dtype=acc_dtype, device=z.device)
    total = gpre.numel()
    if total:
        _gpre_kernel[(triton.cdiv(total, BLOCK),)](grad_out.contiguous(), act_input.contiguous(), gpre, total,
                                                    float(negative_slope), ACT=_ACT_CODES[activation],
                                                    ACC_DTYPE=_acc_dtype(z.dtype), BLOCK=BLOCK)
    is_flat = idx.dtype == torch.int64
    geo = dict(POOL_H=pool_size[0], POOL_W=pool_size[1], IS_FLAT=is_flat, ACC_DTYPE=_acc_dtype(z.dtype), BLOCK=BLOCK)
    grad_z = torch.zeros_like(z)
    if output_mask[0] and z.numel():
        _grad_input_kernel[(triton.cdiv(z.numel(), BLOCK),)](
            gpre, idx, w, grad_z, z.numel(), c_in, c_out, hp, wp, unpooled_size[1], ho, wo, kh, kw, stride[0],
            stride[1], padding[0], padding[1], **geo)
    grad_w = torch.zeros_like(w)
    if output_mask[1] and w.numel():
        _grad_weight_kernel[(w.numel(),)](
            gpre, idx, z, grad_w, n, c_in, c_out, hp, wp, unpooled_size[1], ho, wo, kh, kw, stride[0], stride[1],
            padding[0], padding[1], **geo)
    grad_b = torch.zeros((c_out,), dtype=z.dtype, device=z.device)
    if output_mask[2] and c_out:
        _grad_bias_kernel[(c_out,)](gpre, grad_b, n, c_out, ho * wo, BLOCK=BLOCK, ACC_DTYPE=_acc_dtype(z.dtype))
    return grad_z, grad_w, grad_b


# ---------------------------------------------------------------- max_unpool2d

@triton.jit
def _claim_kernel(idx_ptr, winner_ptr, total, PLANE_IN, PLANE_OUT, BLOCK: tl.constexpr):
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = e < total
    plane = e // PLANE_IN
    p = e - plane * PLANE_IN
    t = tl.load(idx_ptr + e, mask=live, other=0)
    tl.atomic_max(winner_ptr + plane * PLANE_OUT + t, p.to(tl.int32), mask=live)


@triton.jit
def _unpool_write_kernel(x_ptr, idx_ptr, winner_ptr, out_ptr, total, PLANE_IN, PLANE_OUT, BLOCK: tl.constexpr):
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = e < total
    plane = e // PLANE_IN
    p = e - plane * PLANE_IN
    dst = plane * PLANE_OUT + tl.load(idx_ptr + e, mask=live, other=0)
    win = tl.load(winner_ptr + dst, mask=live, other=-1)
    mine = live & (win == p.to(tl.int32))
    tl.store(out_ptr + dst, tl.load(x_ptr + e, mask=mine, other=0), mask=mine)


@triton.jit
def _unpool_grad_kernel(g_ptr, idx_ptr, winner_ptr, gin_ptr, total, PLANE_IN, PLANE_OUT, BLOCK: tl.constexpr):
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = e < total
    plane = e // PLANE_IN
    p = e - plane * PLANE_IN
    src = plane * PLANE_OUT + tl.load(idx_ptr + e, mask=live, other=0)
    win = tl.load(winner_ptr + src, mask=live, other=-1)
    mine = live & (win == p.to(tl.int32))
    tl.store(gin_ptr + e, tl.load(g_ptr + src, mask=mine, other=0), mask=live)


def _winners(idx, planes, plane_in, plane_out):
    winner = torch.full((planes * plane_out,), -1, dtype=torch.int32, device=idx.device)
    total = idx.numel()
    if total:
        _claim_kernel[(triton.cdiv(total, BLOCK),)](idx, winner, total, plane_in, plane_out, BLOCK=BLOCK)
    return winner


def max_unpool2d(input, indices, output_size):
    x, idx = input.contiguous(), indices.contiguous()
    plane_in = x.shape[-2] * x.shape[-1]
    plane_out = output_size[0] * output_size[1]
    planes = x.numel() // plane_in if plane_in else 0
    out = torch.zeros((*x.shape[:-2], *output_size), dtype=x.dtype, device=x.device)
    total = x.numel()
    if total:
        winner = _winners(idx, planes, plane_in, plane_out)
        _unpool_write_kernel[(triton.cdiv(total, BLOCK),)](x, idx, winner, out, total, plane_in, plane_out,
                                                            BLOCK=BLOCK)
    return out


def max_unpool2d_backward(grad_out, indices):
    g, idx = grad_out.contiguous(), indices.contiguous()
    plane_in = idx.shape[-2] * idx.shape[-1]
    plane_out = g.shape[-2] * g.shape[-1]
    planes = idx.numel() // plane_in if plane_in else 0
    grad_in = torch.empty(idx.shape, dtype=g.dtype, device=g.device)
    total = idx.numel()
    if total:
        winner = _winners(idx, planes, plane_in, plane_out)
        _unpool_grad_kernel[(triton.cdiv(total, BLOCK),)](g, idx, winner, grad_in, total, plane_in, plane_out,
                                                           BLOCK=BLOCK)
    return grad_in
