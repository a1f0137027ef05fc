"""Triton kernels of the conv_pool family: the fused encoder block and the drop-in max_pool2d.

Same math as csrc/cpu/conv_pool.cpp (derivations in aefast/ops/conv_pool.py):

forward    one program = BLOCK_P pooled positions x BLOCK_C output channels. For each of the
           PKH*PKW window offsets it computes the conv at that position as a direct convolution,
           reducing K = Cin*KH*KW in BLOCK_K slices (gathered patches times weight slices, summed
           in fp32, fp64 for fp64), then bias -> activation -> running max/argmax in registers.
           Values are rounded to the tensor dtype where the eager composition rounds them (conv
           output, activation output) so the argmax compares the same numbers as torch. Only the
           pooled map, the uint8 window offsets and the conv output at the argmax are written.
backward   one program = one (n, co) plane slice of BLOCK_J pooled positions: gz = grad * act'(z)
           at the argmax, then for each K slice
             grad_w[co, k] += sum_j gz_j * x[n, patch_j(k)]     (a reduction, one atomic per k)
             grad_x[n, patch_j(k)] += gz_j * w[co, k]           (atomic scatter, gz_j != 0 only)
           so only the argmax positions are touched: 1/(PKH*PKW) of the dense MACs.
corruption with corruption != "none" the forward and the weight gradient read corrupt(x) in their
           input load: corrupt_value is aefast.triton.recon_loss's corrupt kernel on one
           element (tl.rand / tl.randn keyed by the seed, counter = the element's NCHW index),
           so the result equals corrupt-then-conv_pool2d and no corrupted copy is stored.
max_pool2d torch's window scan (`v > best or isnan(v)`, first in-bounds element to start), any
           strides (channels_last in gives channels_last out); backward is an atomic scatter-add.

Under TRITON_INTERPRET=1 these run on CPU tensors (the tests do that on small shapes).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from aefast.ops.conv_pool import conv_output_size, pool_output_size
from aefast.triton.recon_loss import corrupt_value


@triton.jit
def _activate(z, ACT: tl.constexpr, slope):
    if ACT == 1:
        z = tl.where(z < 0, 0.0, z)  # NaN passes through, as torch.relu
    elif ACT == 2:
        z = tl.where(z >= 0, z, z * slope)
    elif ACT == 3:
        z = 1.0 / (1.0 + tl.exp(-z))
    elif ACT == 4:
        e = tl.exp(-2.0 * tl.abs(z))
        t = (1.0 - e) / (1.0 + e)
        z = tl.where(z >= 0, t, -t)
    elif ACT == 5:
        z = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACT == 6:
        z = z / (1.0 + tl.exp(-z))
    return z


@triton.jit
def _round_to(x, DT: tl.constexpr):
    """x (the accumulation type) rounded to DT and back, round-to-nearest-even. bf16 is rounded by
    hand: the interpreter's fp32 -> bf16 cast truncates (measured: half of random values differ)."""
    if DT == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        r = ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        return tl.where(x != x, x, r)
    else:
        return x.to(DT).to(x.dtype)


@triton.jit
def _activation_grad(z, ACT: tl.constexpr, slope):
    # relu: 1[z > 0]; leaky: 1 or slope (1 at z == 0); sigmoid: s(1-s); tanh: 1-t^2;
    # gelu: Phi(z) + z*phi(z); silu: s(1 + z(1-s)).
    if ACT == 0:
        d = tl.full(z.shape, 1.0, z.dtype)
    elif ACT == 1:
        d = tl.where(z > 0, 1.0, 0.0).to(z.dtype)
    elif ACT == 2:
        d = tl.where(z >= 0, 1.0, slope).to(z.dtype)
    elif ACT == 3:
        s = 1.0 / (1.0 + tl.exp(-z))
        d = s * (1.0 - s)
    elif ACT == 4:
        e = tl.exp(-2.0 * tl.abs(z))
        t = (1.0 - e) / (1.0 + e)
        d = 1.0 - t * t
    elif ACT == 5:
        cdf = 0.5 * (1.0 + tl.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        d = cdf + z * pdf
    else:
        s = 1.0 / (1.0 + tl.exp(-z))
        d = s * (1.0 + z * (1.0 - s))
    return d


@triton.jit
def _conv_pool_fwd_kernel(x_ptr, w_ptr, b_ptr, out_ptr, win_ptr, pre_ptr,
                          N, CIN, H, W, COUT, HO, WO, SH, SW, PH, PW, slope_ptr,
                          seed, nlevel, nlow, nhigh,
                          KH: tl.constexpr, KW: tl.constexpr, PKH: tl.constexpr, PKW: tl.constexpr,
                          ACT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr, NOISE: tl.constexpr,
                          BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    co = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    p_mask = p < N * HO * WO
    c_mask = co < COUT
    pw = p % WO
    ph = (p // WO) % HO
    n = p // (WO * HO)
    K = CIN * KH * KW
    out_dtype = out_ptr.dtype.element_ty
    slope = tl.load(slope_ptr)  # a tensor, so that fp64 keeps a fp64 slope
    if HAS_BIAS:
        bias = tl.load(b_ptr + co, mask=c_mask, other=0.0).to(ACC)
    else:
        bias = tl.zeros((BLOCK_C,), ACC)
    best = tl.full((BLOCK_P, BLOCK_C), float("-inf"), ACC)
    best_z = tl.zeros((BLOCK_P, BLOCK_C), ACC)
    best_k = tl.zeros((BLOCK_P, BLOCK_C), tl.int32)
    for off in tl.static_range(PKH * PKW):
        h = ph * PKH + off // PKW
        w = pw * PKW + off % PKW
        acc = tl.zeros((BLOCK_P, BLOCK_C), ACC)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_mask = k < K
            kj = k % KW
            ki = (k // KW) % KH
            ci = k // (KW * KH)
            y = h[:, None] * SH - PH + ki[None, :]
            xx = w[:, None] * SW - PW + kj[None, :]
            m = p_mask[:, None] & k_mask[None, :] & (y >= 0) & (y < H) & (xx >= 0) & (xx < W)
            xa = ((n[:, None] * CIN + ci[None, :]) * H + y) * W + xx
            xv = tl.load(x_ptr + xa, mask=m, other=0.0)
            if NOISE >= 0:
                xv = tl.where(m, corrupt_value(xv, xa, seed, nlevel, nlow, nhigh, NOISE), 0.0)
            xv = xv.to(ACC)
            wv = tl.load(w_ptr + co[None, :] * K + k[:, None], mask=k_mask[:, None] & c_mask[None, :],
                         other=0.0).to(ACC)
            acc += tl.sum(xv[:, :, None] * wv[None, :, :], axis=1)
        z = _round_to(acc + bias[None, :], out_dtype)
        a = _round_to(_activate(z, ACT, slope), out_dtype)
        take = (a > best) | (a != a)
        best = tl.where(take, a, best)
        best_z = tl.where(take, z, best_z)
        best_k = tl.where(take, off, best_k)
    o = ((n[:, None] * COUT + co[None, :]) * HO + ph[:, None]) * WO + pw[:, None]
    m = p_mask[:, None] & c_mask[None, :]
    tl.store(out_ptr + o, best.to(out_dtype), mask=m)
    tl.store(win_ptr + o, best_k.to(tl.uint8), mask=m)
    tl.store(pre_ptr + o, best_z.to(out_dtype), mask=m)


@triton.jit
def _conv_pool_bwd_kernel(g_ptr, win_ptr, pre_ptr, x_ptr, w_ptr, gx_ptr, gw_ptr, gb_ptr,
                          CIN, H, W, COUT, HO, WO, SH, SW, PH, PW, slope_ptr,
                          seed, nlevel, nlow, nhigh,
                          KH: tl.constexpr, KW: tl.constexpr, PKH: tl.constexpr, PKW: tl.constexpr,
                          ACT: tl.constexpr, ACC: tl.constexpr, DGRAD: tl.constexpr, WGRAD: tl.constexpr,
                          NOISE: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr):
    plane = tl.program_id(0).to(tl.int64)  # n * COUT + co
    n = plane // COUT
    co = plane % COUT
    j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    j_mask = j < HO * WO
    slope = tl.load(slope_ptr)
    g = tl.load(g_ptr + plane * HO * WO + j, mask=j_mask, other=0.0).to(ACC)
    z = tl.load(pre_ptr + plane * HO * WO + j, mask=j_mask, other=0.0).to(ACC)
    off = tl.load(win_ptr + plane * HO * WO + j, mask=j_mask, other=0).to(tl.int32)
    gz = g * _activation_grad(z, ACT, slope)
    gz = tl.where(j_mask, gz, 0.0)
    h = (j // WO) * PKH + off // PKW
    w = (j % WO) * PKW + off % PKW
    K = CIN * KH * KW
    if WGRAD:
        tl.atomic_add(gb_ptr + co, tl.sum(gz, axis=0))
    nz = j_mask & (gz != 0)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < K
        kj = k % KW
        ki = (k // KW) % KH
        ci = k // (KW * KH)
        y = h[:, None] * SH - PH + ki[None, :]
        xx = w[:, None] * SW - PW + kj[None, :]
        m = nz[:, None] & k_mask[None, :] & (y >= 0) & (y < H) & (xx >= 0) & (xx < W)
        addr = ((n * CIN + ci[None, :]) * H + y) * W + xx
        if WGRAD:
            xv = tl.load(x_ptr + addr, mask=m, other=0.0)
            if NOISE >= 0:  # the forward's corruption, regenerated
                xv = tl.where(m, corrupt_value(xv, addr, seed, nlevel, nlow, nhigh, NOISE), 0.0)
            xv = xv.to(ACC)
            tl.atomic_add(gw_ptr + co * K + k, tl.sum(gz[:, None] * xv, axis=0), mask=k_mask)
        if DGRAD:
            wv = tl.load(w_ptr + co * K + k, mask=k_mask, other=0.0).to(ACC)
            tl.atomic_add(gx_ptr + addr, gz[:, None] * wv[None, :], mask=m)


# The interpreter runs each block as numpy arrays, so larger blocks mean fewer Python-level
# steps; on a GPU the smaller ones keep the (BLOCK_P, BLOCK_K, BLOCK_C) product in registers.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_FWD_BLOCKS = (64, 32, 64) if _INTERPRET else (32, 16, 16)
_BWD_BLOCKS = (64, 64) if _INTERPRET else (32, 16)


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _slope(negative_slope, like):
    return torch.full((1,), float(negative_slope), dtype=_acc_dtype(like.dtype), device=like.device)


def _shape(input_hw, kernel_hw, stride, padding, pool_size):
    hc, wc = conv_output_size(input_hw, kernel_hw, stride, padding)
    return hc // pool_size[0], wc // pool_size[1]


_NOISE_CODES = {"none": -1, "gaussian": 0, "masking": 1, "salt_pepper": 2}


def _noise_code(corruption):
    if corruption not in _NOISE_CODES:
        raise RuntimeError(f"aefast::conv_pool2d: unknown corruption {corruption!r} (none, gaussian, masking, "
                           "salt_pepper)")
    return _NOISE_CODES[corruption]


def conv_pool2d_forward(input, weight, bias, stride, padding, activation, negative_slope, pool_size,
                        corruption="none", corruption_level=0.0, seed=0, low=0.0, high=1.0):
    noise = _noise_code(corruption)
    x = input.contiguous()
    w = weight.contiguous()
    n, cin, h, wd = x.shape
    cout, _, kh, kw = w.shape
    ho, wo = _shape((h, wd), (kh, kw), stride, padding, pool_size)
    pooled = torch.empty((n, cout, ho, wo), dtype=x.dtype, device=x.device)
    window = torch.empty((n, cout, ho, wo), dtype=torch.uint8, device=x.device)
    preact = torch.empty((n, cout, ho, wo), dtype=x.dtype, device=x.device)
    if pooled.numel() == 0:
        return pooled, window, preact
    b = bias.contiguous() if bias is not None else w  # never read without HAS_BIAS
    block_p, block_c, block_k = _FWD_BLOCKS
    grid = (triton.cdiv(n * ho * wo, block_p), triton.cdiv(cout, block_c))
    _conv_pool_fwd_kernel[grid](x, w, b, pooled, window, preact, n, cin, h, wd, cout, ho, wo, stride[0], stride[1],
                                padding[0], padding[1], _slope(negative_slope, x), seed, float(corruption_level),
                                float(low), float(high), KH=kh, KW=kw, PKH=pool_size[0],
                                PKW=pool_size[1], ACT=int(activation), HAS_BIAS=bias is not None,
                                ACC=_tl_acc(x.dtype), NOISE=noise, BLOCK_P=block_p, BLOCK_C=block_c, BLOCK_K=block_k)
    return pooled, window, preact


def _backward(grad, window, preact, x, w, input_size, kernel_size, cin, stride, padding, activation,
              negative_slope, pool_size, dgrad, wgrad, noise=(-1, 0, 0.0, 0.0, 1.0)):
    n, cout, ho, wo = grad.shape
    h, wd = input_size
    kh, kw = kernel_size
    acc = _acc_dtype(grad.dtype)
    gx = torch.zeros((n, cin, h, wd), dtype=acc, device=grad.device) if dgrad else None
    gw = torch.zeros((cout, cin, kh, kw), dtype=acc, device=grad.device) if wgrad else None
    gb = torch.zeros((cout,), dtype=acc, device=grad.device) if wgrad else None
    if grad.numel():
        block_j, block_k = _BWD_BLOCKS
        dummy = gx if gx is not None else gw
        grid = (n * cout, triton.cdiv(ho * wo, block_j))
        _conv_pool_bwd_kernel[grid](grad.contiguous(), window.contiguous(), preact.contiguous(),
                                    x if x is not None else dummy, w if w is not None else dummy,
                                    dummy if gx is None else gx, dummy if gw is None else gw,
                                    dummy if gb is None else gb, cin, h, wd, cout, ho, wo, stride[0], stride[1],
                                    padding[0], padding[1], _slope(negative_slope, grad), noise[1],
                                    float(noise[2]), float(noise[3]), float(noise[4]), KH=kh, KW=kw,
                                    PKH=pool_size[0], PKW=pool_size[1], ACT=int(activation), ACC=_tl_acc(grad.dtype),
                                    DGRAD=dgrad, WGRAD=wgrad, NOISE=noise[0], BLOCK_J=block_j, BLOCK_K=block_k)
    return gx, gw, gb


def conv_pool2d_backward_input(grad, window, preact, weight, input_size, stride, padding, activation,
                               negative_slope, pool_size):
    w = weight.contiguous()
    gx, _, _ = _backward(grad, window, preact, None, w, input_size, w.shape[-2:], w.shape[1], stride, padding,
                         activation, negative_slope, pool_size, True, False)
    return gx.to(grad.dtype)


def conv_pool2d_backward_weight(grad, window, preact, input, kernel_size, stride, padding, activation,
                                negative_slope, pool_size, corruption="none", corruption_level=0.0, seed=0, low=0.0,
                                high=1.0):
    x = input.contiguous()
    noise = (_noise_code(corruption), seed, corruption_level, low, high)
    _, gw, gb = _backward(grad, window, preact, x, None, x.shape[-2:], kernel_size, x.shape[1], stride, padding,
                          activation, negative_slope, pool_size, False, True, noise)
    return gw.to(grad.dtype), gb.to(grad.dtype)


# ---------------------------------------------------------------- drop-in max_pool2d

@triton.jit
def _max_pool_fwd_kernel(x_ptr, out_ptr, idx_ptr, total, C, H, W, OH, OW,
                         xs0, xs1, xs2, xs3, os0, os1, os2, os3,
                         SH, SW, PH, PW, DH, DW, KH: tl.constexpr, KW: tl.constexpr, ACC: tl.constexpr,
                         BLOCK: tl.constexpr):
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = e < total
    ow = e % OW
    oh = (e // OW) % OH
    c = (e // (OW * OH)) % C
    n = e // (OW * OH * C)
    hs = oh * SH - PH
    ws = ow * SW - PW
    # torch starts from the first in-bounds element of the window with max = -inf.
    h0 = tl.where(hs < 0, hs + ((-hs + DH - 1) // DH) * DH, hs)
    w0 = tl.where(ws < 0, ws + ((-ws + DW - 1) // DW) * DW, ws)
    best = tl.full((BLOCK,), float("-inf"), ACC)
    best_i = h0 * W + w0
    base = n * xs0 + c * xs1
    for i in tl.static_range(KH):
        for j in tl.static_range(KW):
            h = hs + i * DH
            w = ws + j * DW
            m = mask & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            v = tl.load(x_ptr + base + h * xs2 + w * xs3, mask=m, other=float("-inf")).to(ACC)
            take = m & ((v > best) | (v != v))
            best = tl.where(take, v, best)
            best_i = tl.where(take, h * W + w, best_i)
    o = n * os0 + c * os1 + oh * os2 + ow * os3
    tl.store(out_ptr + o, best.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(idx_ptr + o, best_i, mask=mask)


@triton.jit
def _max_pool_bwd_kernel(g_ptr, idx_ptr, gx_ptr, total, C, OH, OW, HW, gs0, gs1, gs2, gs3, is0, is1, is2, is3,
                         BLOCK: tl.constexpr):
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = e < total
    ow = e % OW
    oh = (e // OW) % OH
    c = (e // (OW * OH)) % C
    n = e // (OW * OH * C)
    g = tl.load(g_ptr + n * gs0 + c * gs1 + oh * gs2 + ow * gs3, mask=mask, other=0.0).to(gx_ptr.dtype.element_ty)
    k = tl.load(idx_ptr + n * is0 + c * is1 + oh * is2 + ow * is3, mask=mask, other=0)
    m = mask & (k >= 0) & (k < HW)
    tl.atomic_add(gx_ptr + (n * C + c) * HW + k, g, mask=m)


def _memory_format(t):
    return torch.channels_last if (t.is_contiguous(memory_format=torch.channels_last)
                                   and not t.is_contiguous()) else torch.contiguous_format


def max_pool2d_forward(input, kernel_size, stride, padding, dilation, ceil_mode):
    n, c, h, w = input.shape
    oh = pool_output_size(h, kernel_size[0], stride[0], padding[0], dilation[0], ceil_mode)
    ow = pool_output_size(w, kernel_size[1], stride[1], padding[1], dilation[1], ceil_mode)
    fmt = _memory_format(input)
    out = torch.empty((n, c, oh, ow), dtype=input.dtype, device=input.device, memory_format=fmt)
    idx = torch.empty((n, c, oh, ow), dtype=torch.int64, device=input.device, memory_format=fmt)
    total = out.numel()
    if total:
        block = 256
        _max_pool_fwd_kernel[(triton.cdiv(total, block),)](
            input, out, idx, total, c, h, w, oh, ow, *input.stride(), *out.stride(), stride[0], stride[1],
            padding[0], padding[1], dilation[0], dilation[1], KH=kernel_size[0], KW=kernel_size[1],
            ACC=_tl_acc(input.dtype), BLOCK=block)
    return out, idx


def max_pool2d_backward(grad_output, indices, input):
    n, c, h, w = input.shape
    acc = torch.zeros((n, c, h, w), dtype=_acc_dtype(grad_output.dtype), device=grad_output.device)
    total = grad_output.numel()
    if total:
        block = 256
        _max_pool_bwd_kernel[(triton.cdiv(total, block),)](
            grad_output, indices, acc, total, c, grad_output.shape[2], grad_output.shape[3], h * w,
            *grad_output.stride(), *indices.stride(), BLOCK=block)
    return acc.to(grad_output.dtype).contiguous(memory_format=_memory_format(input))
