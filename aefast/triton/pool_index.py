"""Triton kernels of the pool_index family (flat <-> window index conversion).

Same arithmetic as csrc/include/aefast/pool_index.h: window (oh, ow) starts at
(oh*sh - ph, ow*sw - pw); its element (i, j) lies at (start_h + i*dh, start_w + j*dw); the
window offset is i*kw + j. Invalid entries become sentinels (255 / -1) that the Python layer
reports, so no kernel ever traps.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _flat_to_window_kernel(idx_ptr, out_ptr, n, out_h, out_w, in_h, in_w, kh, kw, sh, sw, ph, pw, dh, dw,
                           BLOCK: tl.constexpr):
    k = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = k < n
    flat = tl.load(idx_ptr + k, mask=mask, other=0)
    ow = k % out_w
    oh = (k // out_w) % out_h
    h = flat // in_w
    w = flat - h * in_w
    rh = h - (oh * sh - ph)
    rw = w - (ow * sw - pw)
    i = rh // dh
    j = rw // dw
    inside = (flat >= 0) & (flat < in_h * in_w) & (rh >= 0) & (rw >= 0)
    inside = inside & (rh % dh == 0) & (rw % dw == 0) & (i < kh) & (j < kw)
    offset = tl.where(inside, i * kw + j, 255)
    tl.store(out_ptr + k, offset.to(tl.uint8), mask=mask)


@triton.jit
def _window_to_flat_kernel(win_ptr, out_ptr, n, out_h, out_w, in_h, in_w, kh, kw, sh, sw, ph, pw, dh, dw,
                           BLOCK: tl.constexpr):
    k = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = k < n
    off = tl.load(win_ptr + k, mask=mask, other=0).to(tl.int64)
    ow = k % out_w
    oh = (k // out_w) % out_h
    i = off // kw
    j = off - i * kw
    h = oh * sh - ph + i * dh
    w = ow * sw - pw + j * dw
    valid = (off < kh * kw) & (h >= 0) & (h < in_h) & (w >= 0) & (w < in_w)
    tl.store(out_ptr + k, tl.where(valid, h * in_w + w, -1), mask=mask)


def _launch(kernel, src: torch.Tensor, out_dtype, input_size, kernel_size, stride, padding, dilation):
    flat = src.contiguous()
    out = torch.empty(flat.shape, dtype=out_dtype, device=flat.device)
    n = flat.numel()
    if n:
        grid = (triton.cdiv(n, BLOCK),)
        kernel[grid](flat, out, n, flat.shape[-2], flat.shape[-1], *input_size, *kernel_size, *stride, *padding,
                     *dilation, BLOCK=BLOCK)
    return out


def flat_to_window(indices, input_size, kernel_size, stride, padding, dilation):
    return _launch(_flat_to_window_kernel, indices, torch.uint8, input_size, kernel_size, stride, padding, dilation)


def window_to_flat(window, input_size, kernel_size, stride, padding, dilation):
    return _launch(_window_to_flat_kernel, window, torch.int64, input_size, kernel_size, stride, padding, dilation)
