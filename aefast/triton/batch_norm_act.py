"""Triton kernels of the batch_norm_act family (same schemas as the C++ ops; math in
aefast/ops/batch_norm_act.py).

The input is addressed as (N, C, HW) through its strides, so one kernel serves NCHW (HW unit
stride: loads coalesce along a tile's rows) and channels-last (C unit stride: along its channels)
without a copy. A program owns a tile of BLOCK_M positions (m = n*HW + hw) by BLOCK_C channels.

Statistics and the backward sums: each program writes its tile's per-channel partial sums, and
torch adds the partials of each channel in program order (a fixed-shape reduction, no atomics), so
the results are deterministic. The forward sums are shifted by a value of each channel (k_c, the
first one), which keeps the one-pass variance free of cancellation. Accumulation is fp32 (fp64 for
fp64 inputs); the partials are added in double.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from aefast.triton._common import activate, activation_grad

# Tiles of 32 positions x up to 32 channels (8 values a thread at 4 warps): 64 x 64 tiles spilled
# 8-288 B in the grad_input / forward kernels with the transcendental activations (gelu's erf, silu,
# tanh) on sm_80 and sm_90 (scripts/check_triton_aot.py over every activation and dtype).
BLOCK_M = 32


def _block_c(c):
    return max(2, min(32, triton.next_power_of_2(c)))


@triton.jit
def _tile(m0, c0, M, C, HW, sN, sC, sHW, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Offsets and mask of the tile at (m0, c0) of an (N, C, HW) tensor with strides (sN, sC, sHW)."""
    m = m0 + tl.arange(0, BLOCK_M)
    c = c0 + tl.arange(0, BLOCK_C)
    n = (m // HW).to(tl.int64)
    hw = (m % HW).to(tl.int64)
    offs = (n * sN + hw * sHW)[:, None] + c.to(tl.int64)[None, :] * sC
    mask = (m < M)[:, None] & (c < C)[None, :]
    return offs, mask, c


@triton.jit
def _moments_kernel(x_ptr, shift_ptr, part_ptr, M, C, HW, sN, sC, sHW, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_C: tl.constexpr):
    pid_m, pid_c = tl.program_id(0), tl.program_id(1)
    offs, mask, c = _tile(pid_m * BLOCK_M, pid_c * BLOCK_C, M, C, HW, sN, sC, sHW, BLOCK_M, BLOCK_C)
    k = tl.load(shift_ptr + c, mask=c < C, other=0.0).to(ACC)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    d = tl.where(mask, x - k[None, :], 0.0)
    row = part_ptr + pid_m.to(tl.int64) * 2 * C
    tl.store(row + c, tl.sum(d, axis=0), mask=c < C)
    tl.store(row + C + c, tl.sum(d * d, axis=0), mask=c < C)


@triton.jit
def _forward_kernel(x_ptr, out_ptr, scale_ptr, shift_ptr, M, C, HW, sN, sC, sHW, oN, oC, oHW, slope_ptr,
                    ACT: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_m, pid_c = tl.program_id(0), tl.program_id(1)
    offs, mask, c = _tile(pid_m * BLOCK_M, pid_c * BLOCK_C, M, C, HW, sN, sC, sHW, BLOCK_M, BLOCK_C)
    out_offs, _, _ = _tile(pid_m * BLOCK_M, pid_c * BLOCK_C, M, C, HW, oN, oC, oHW, BLOCK_M, BLOCK_C)
    scale = tl.load(scale_ptr + c, mask=c < C, other=0.0).to(ACC)
    shift = tl.load(shift_ptr + c, mask=c < C, other=0.0).to(ACC)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    out = activate(scale[None, :] * x + shift[None, :], ACT, tl.load(slope_ptr))
    tl.store(out_ptr + out_offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_sums_kernel(go_ptr, x_ptr, scale_ptr, shift_ptr, mean_ptr, part_ptr, M, C, HW, sN, sC, sHW, gN, gC, gHW,
                      slope_ptr, ACT: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_m, pid_c = tl.program_id(0), tl.program_id(1)
    offs, mask, c = _tile(pid_m * BLOCK_M, pid_c * BLOCK_C, M, C, HW, sN, sC, sHW, BLOCK_M, BLOCK_C)
    g_offs, _, _ = _tile(pid_m * BLOCK_M, pid_c * BLOCK_C, M, C, HW, gN, gC, gHW, BLOCK_M, BLOCK_C)
    scale = tl.load(scale_ptr + c, mask=c < C, other=0.0).to(ACC)
    shift = tl.load(shift_ptr + c, mask=c < C, other=0.0).to(ACC)
    mean = tl.load(mean_ptr + c, mask=c < C, other=0.0).to(ACC)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    go = tl.load(go_ptr + g_offs, mask=mask, other=0.0).to(ACC)
    g = tl.where(mask, go * activation_grad(scale[None, :] * x + shift[None, :], ACT, tl.load(slope_ptr)), 0.0)
    row = part_ptr + pid_m.to(tl.int64) * 2 * C
    tl.store(row + c, tl.sum(g, axis=0), mask=c < C)
    tl.store(row + C + c, tl.sum(g * (x - mean[None, :]), axis=0), mask=c < C)


@triton.jit
def _grad_input_kernel(go_ptr, x_ptr, gx_ptr, scale_ptr, shift_ptr, mean_ptr, c0_ptr, c1_ptr, M, C, HW, sN, sC, sHW,
                       gN, gC, gHW, oN, oC, oHW, slope_ptr, ACT: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    pid_m, pid_c = tl.program_id(0), tl.program_id(1)
    offs, mask, c = _tile(pid_m * BLOCK_M, pid_c * BLOCK_C, M, C, HW, sN, sC, sHW, BLOCK_M, BLOCK_C)
    g_offs, _, _ = _tile(pid_m * BLOCK_M, pid_c * BLOCK_C, M, C, HW, gN, gC, gHW, BLOCK_M, BLOCK_C)
    out_offs, _, _ = _tile(pid_m * BLOCK_M, pid_c * BLOCK_C, M, C, HW, oN, oC, oHW, BLOCK_M, BLOCK_C)
    cm = c < C
    scale = tl.load(scale_ptr + c, mask=cm, other=0.0).to(ACC)
    shift = tl.load(shift_ptr + c, mask=cm, other=0.0).to(ACC)
    mean = tl.load(mean_ptr + c, mask=cm, other=0.0).to(ACC)
    c0 = tl.load(c0_ptr + c, mask=cm, other=0.0).to(ACC)
    c1 = tl.load(c1_ptr + c, mask=cm, other=0.0).to(ACC)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(ACC)
    go = tl.load(go_ptr + g_offs, mask=mask, other=0.0).to(ACC)
    g = go * activation_grad(scale[None, :] * x + shift[None, :], ACT, tl.load(slope_ptr))
    gx = scale[None, :] * g + c0[None, :] + c1[None, :] * (x - mean[None, :])
    tl.store(gx_ptr + out_offs, gx.to(gx_ptr.dtype.element_ty), mask=mask)


def _view(t):
    """(M, C, HW, strides (sN, sC, sHW)) of a 4-D tensor whose (H, W) merge into one dimension."""
    n, c, h, w = t.shape
    if h > 1 and w > 1 and t.stride(2) != w * t.stride(3):
        raise ValueError("not viewable")
    s_hw = t.stride(3) if w > 1 else t.stride(2)
    return n * h * w, c, h * w, (t.stride(0), t.stride(1), s_hw)


def _plain(t):
    """``t`` if its (H, W) merge (every layout torch makes), else a contiguous copy."""
    try:
        _view(t)
        return t
    except ValueError:
        return t.contiguous()


def _memory_format(t):
    return torch.channels_last if (t.is_contiguous(memory_format=torch.channels_last)
                                   and not t.is_contiguous()) else torch.contiguous_format


def _warps(dtype):
    # 8 for fp64: 64-bit values at 4 warps spilled in the grad_input kernel on sm_90
    # (scripts/check_triton_aot.py).
    return 8 if dtype == torch.float64 else 4


def _acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _slope(negative_slope, dtype, device):
    # A tensor, so that fp64 keeps a fp64 slope (a Python float argument is passed as fp32).
    return torch.full((1,), float(negative_slope), dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                      device=device)


def _grid(M, C):
    return triton.cdiv(M, BLOCK_M), triton.cdiv(C, _block_c(C))


def _affine(mean, var, weight, bias, eps):
    """Per-channel (scale, shift, invstd) of z = scale*x + shift, in the statistics' dtype."""
    invstd = torch.rsqrt(var + eps)
    scale = invstd if weight is None else weight.to(var.dtype) * invstd
    shift = -mean * scale if bias is None else bias.to(var.dtype) - mean * scale
    return scale.contiguous(), shift.contiguous(), invstd


def forward(input, weight, bias, eps, activation, negative_slope):
    x = _plain(input)
    M, C, HW, (sN, sC, sHW) = _view(x)
    stat = torch.float64 if x.dtype == torch.float64 else torch.float32
    grid = _grid(M, C)
    shift_k = x[0, :, 0, 0].to(stat).contiguous()
    part = torch.empty((grid[0], 2, C), dtype=stat, device=x.device)
    _moments_kernel[grid](x, shift_k, part, M, C, HW, sN, sC, sHW, ACC=_acc(x.dtype), BLOCK_M=BLOCK_M,
                          BLOCK_C=_block_c(C), num_warps=_warps(x.dtype))
    sums = part.double().sum(0)
    d = sums[0] / M
    mean = (shift_k.double() + d).to(stat)
    var = (sums[1] / M - d * d).clamp_min(0).to(stat)
    scale, shift, _ = _affine(mean, var, weight, bias, eps)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_memory_format(x))
    _, _, _, (oN, oC, oHW) = _view(out)
    _forward_kernel[grid](x, out, scale, shift, M, C, HW, sN, sC, sHW, oN, oC, oHW,
                          _slope(negative_slope, x.dtype, x.device), ACT=int(activation), ACC=_acc(x.dtype),
                          BLOCK_M=BLOCK_M, BLOCK_C=_block_c(C), num_warps=_warps(x.dtype))
    return out, mean, var


def backward(grad_out, input, mean, var, weight, bias, eps, activation, negative_slope, output_mask):
    x = _plain(input)
    go = _plain(grad_out.to(x.dtype))
    M, C, HW, (sN, sC, sHW) = _view(x)
    _, _, _, (gN, gC, gHW) = _view(go)
    grid = _grid(M, C)
    scale, shift, invstd = _affine(mean, var, weight, bias, eps)
    mean_c = mean.contiguous()
    part = torch.empty((grid[0], 2, C), dtype=mean.dtype, device=x.device)
    _grad_sums_kernel[grid](go, x, scale, shift, mean_c, part, M, C, HW, sN, sC, sHW, gN, gC, gHW,
                            _slope(negative_slope, x.dtype, x.device), ACT=int(activation), ACC=_acc(x.dtype),
                            BLOCK_M=BLOCK_M, BLOCK_C=_block_c(C), num_warps=_warps(x.dtype))
    sums = part.double().sum(0)
    sum_g, sum_gx = sums[0], sums[1]
    empty = x.new_empty((0,))
    grad_weight = ((sum_gx * invstd.double()).to(weight.dtype)
                   if output_mask[1] and weight is not None else empty)
    grad_bias = sum_g.to(bias.dtype) if output_mask[2] and bias is not None else empty
    grad_input = empty
    if output_mask[0]:
        k, inv = scale.double(), invstd.double()
        c0 = (-k * sum_g / M).to(mean.dtype)
        c1 = (-k * inv * inv * sum_gx / M).to(mean.dtype)
        grad_input = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_memory_format(x))
        _, _, _, (oN, oC, oHW) = _view(grad_input)
        _grad_input_kernel[grid](go, x, grad_input, scale, shift, mean_c, c0, c1, M, C, HW, sN, sC, sHW, gN, gC, gHW,
                                 oN, oC, oHW, _slope(negative_slope, x.dtype, x.device), ACT=int(activation),
                                 ACC=_acc(x.dtype), BLOCK_M=BLOCK_M, BLOCK_C=_block_c(C), num_warps=_warps(x.dtype))
    return grad_input, grad_weight, grad_bias
