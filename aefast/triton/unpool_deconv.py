"""Triton kernels of the unpool_deconv family (the decoder), forward and backward, as implicit
GEMMs on tensor cores (``tl.dot``).

Notation (see aefast/ops/unpool_deconv.py for the op's formulas). z[n, ci, ph, pw] is the pooled
input, idx its index (uint8 window offset or int64 flat position), U the unpooled map that z and
idx describe: U[n, ci, h, w] = z[n, ci, h // pool_h, w // pool_w] when the index of that pooled
entry names (h, w), else 0. The indices are validated to lie in their own pool window before any
kernel runs (aefast.functional), so every unpooled position belongs to exactly one window and U is
well defined without any "last writer wins" rule.

Forward, M = output positions (n, oy, ox), N = Cout, K = (kh, kw, ci):
    pre[m, co] = b[co] + sum_{kh, kw, ci} U[n, ci, h, w] * W[ci, co, kh, kw],
    h = (oy + padh - kh) / sh (only when divisible and 0 <= h < H_u), w alike.
  The A-tile U[m, ci-slice] is built in registers: load z and idx at the window of (h, w) and keep
  z where the index equals (h, w)'s own offset, else 0; the unpooled map never exists.
  Epilogue: + bias, round to the tensor dtype (eager rounds the conv output), activation, round.
  K runs tap by tap with a channel loop inside; below PACK_K_BELOW channels the taps are packed
  into one flattened K = (t, ci) instead, so that 3 channels pad K from 27 to 32, not 9 x 16.

Backward, gpre = grad_out * act'(.) rounded to the tensor dtype (eager's activation backward
rounds), written once as an (M, Cout) matrix, positions-major, by ``_gpre_kernel``, which also
writes per-block partial sums of gpre per channel (grad_b's first stage).
  grad_z is the transposed conv's dgrad at the argmax: with M = unpooled positions (n, h, w),
      D[m, ci] = sum_{kh, kw, co} gpre[n, h*sh - padh + kh, w*sw - padw + kw, co] * W[ci, co, kh, kw]
  is a plain implicit GEMM (K = (kh, kw, co)), and its epilogue stores D[m, ci] to
  grad_z[n, ci, h // pool_h, w // pool_w] only where idx names (h, w): one writer per element,
  and every element is written (each index names a position of the plane), so no zero fill.
  The argmax differs per channel, so a gather at the argmax would be one matrix-vector product per
  channel; the dense GEMM plus a selecting store keeps the tensor cores busy instead.
  grad_W is one GEMM over the unpooled positions P with the taps packed into N:
      grad_W[ci, co, kh, kw] = sum_p U[p, ci] * gpre[n, h*sh - padh + kh, w*sw - padw + kw, co],
  A = U^T (Cin x P, the forward's A-tile builder, transposed), B = im2col(gpre) (P x KH*KW*Cout).
  K = P is split into SPLIT fixed chunks (a function of the shapes only); each writes its own
  partial, and a fixed-order sum adds them.
  grad_b = fixed-order sum of gpre's per-block partials.
No float atomics anywhere: results are bitwise reproducible.

Precision: fp32 operands use TF32 when torch.backends.cudnn.allow_tf32 is on (as cuDNN's convs)
and IEEE fp32 when it is off; fp16/bf16 accumulate in fp32; fp64 reduces in fp64 with a broadcast
product and tl.sum, as the encoder's fp64 does (gradcheck's dtype, not a speed path). Under
TRITON_INTERPRET=1, bf16 operands are upcast to fp32 before tl.dot (the interpreter's bf16 dot
returns garbage), which is exact for the products and keeps fp32 accumulation.

max_unpool2d: integer atomic_max picks the last pooled position naming each element (order-free,
hence deterministic); only that position writes (or receives the gradient).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from aefast.triton._common import mma_acc
from aefast.triton.conv_pool import config_variant

BLOCK = 256
NEEDS_PREACTIVATION = ("leaky_relu", "gelu", "silu")
_ACT_CODES = {None: 0, "relu": 1, "leaky_relu": 2, "sigmoid": 3, "tanh": 4, "gelu": 5, "silu": 6}
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---------------------------------------------------------------- tile configurations

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) the autotuner tries on a GPU, per kernel and config
# variant (config_variant(): "" tensor cores (fp16, bf16, fp32 as TF32), "ieee" fp32 with TF32 off,
# "fp64"): only tiles that compile without spilling for sm_80 and sm_90 for every specialization the
# tests launch (scripts/check_triton_aot.py, which CI runs; spills as ptxas -v counts them).
# Tensor cores: per thread, at most ~16 gathered A-tile elements and 32 accumulator elements (16 for
# dgrad, whose epilogue gathers the indices in the accumulator's layout); 128x128 tiles and 4-warp
# 128-row tiles spilled up to 1.9 KB; the 64x16x16 weight-gradient and 64x8x16 forward tiles spilled
# on sm_80 with three pipeline stages (not with two), and the 64x128x32 weight-gradient tile with two
# or three for fp16/bf16 (ptxas kept it at 128 registers; 64x128x16 does not spill). Narrow N serves
# few output channels (Cout = 3 pads to the MMA's n8, not to 64); BLOCK_K 16 serves few channels per
# tap.
# Tiles that bench/roofline_h100.py's model never picks for the G1/G2 and per-op shapes are left out
# (64x64 forward and weight-gradient tiles, 32x64 dgrad, 64x16 forward): each tile costs one compile
# per specialization and arch in CI and one autotune trial per new shape on a GPU.
# IEEE fp32 runs tl.dot as FMAs on register-resident operands and fp64 as DMMA with 64-bit
# accumulators: both need about half the tensor-core tile and two stages. BLOCK_K is 16 for IEEE too (8
# used fewer registers, but the GPU image's Triton 3.6 refuses a tl.dot with K < 16; the forward's 32x32x16
# spilled 8-24 B on sm_90 at 4 and 8 warps, so IEEE's forward has one tile). fp64 (gradcheck's
# dtype, not a speed path) reduces with tl.sum over a (BLOCK_M, BLOCK_K, BLOCK_N) product held in
# registers, so its tile is small and K may be 8: 32x32x8 at 8 warps, one stage, 104-128 registers
# under Triton 3.6 and 3.9 (at 4 warps the forward spilled 16 B on sm_90 under 3.6, and 16x32x8 8 B
# in the weight gradient under 3.9).
TILES = {
    "fwd": [(64, 128, 32, 8, 3), (128, 64, 16, 8, 3), (64, 32, 16, 4, 3), (64, 8, 16, 4, 2)],
    "fwd:ieee": [(64, 64, 16, 8, 2)],
    "fwd:fp64": [(32, 32, 8, 8, 1)],
    "dgrad": [(64, 64, 32, 8, 3), (64, 64, 16, 8, 3), (64, 16, 32, 4, 3)],
    "dgrad:ieee": [(64, 64, 16, 8, 2), (32, 32, 16, 4, 2)],
    "dgrad:fp64": [(32, 32, 8, 8, 1)],
    "wgrad": [(64, 128, 16, 8, 3), (128, 64, 16, 8, 3), (64, 32, 16, 4, 3), (64, 16, 16, 4, 2)],
    "wgrad:ieee": [(64, 32, 16, 8, 2), (32, 32, 16, 4, 2)],
    "wgrad:fp64": [(32, 32, 8, 8, 1)],
}
_KERNEL_NAMES = {"fwd": "_forward_kernel", "dgrad": "_dgrad_kernel", "wgrad": "_wgrad_kernel"}
_VARIANTS = ("", "ieee", "fp64")


def _gemm_configs(interpreting: bool, kernel: str = "fwd"):
    """Tile shapes the autotuner tries on a GPU (keyed on the GEMM shape) for TILES[kernel]; one
    small fixed tile under the interpreter, where every tile costs Python time."""
    if interpreting:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=1, num_stages=1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=st)
            for m, n, k, w, st in TILES[kernel]]


def _tile_key(kernel, variant):
    return kernel + (":" + variant if variant else "")


# What scripts/check_triton_aot.py compiles ahead of time: each autotuned kernel with every tile the
# autotuner may pick on a GPU ("name:variant" as config_variant() names the variant), and the
# kernels that have no GEMM (no tensor-core instruction expected).
GPU_CONFIGS = {_tile_key(name, v): _gemm_configs(False, _tile_key(kernel, v))
               for kernel, name in _KERNEL_NAMES.items() for v in _VARIANTS}
NO_TENSOR_CORE_KERNELS = {"_gpre_kernel", "_claim_kernel", "_unpool_write_kernel", "_unpool_grad_kernel"}


def _tuned(kernel_fn, kernel, key):
    """One autotuner per config variant, each over the tiles that fit its registers."""
    return {v: triton.autotune(configs=_gemm_configs(INTERPRETING, _tile_key(kernel, v)), key=key)(kernel_fn)
            for v in _VARIANTS}


def _variant(dtype):
    """The config variant that serves tensors of this dtype under the current TF32 setting."""
    short = {torch.float64: "fp64", torch.float32: "fp32"}.get(dtype, "fp16")
    return config_variant(short, _precision(dtype))


@triton.jit
def _slope(x, slope_hi, slope_lo):
    """leaky_relu's slope in x's precision: float kernel arguments are fp32, so fp64 gets it as
    hi + lo (slope_lo = slope - fp32(slope)), exact to ~48 bits."""
    s = slope_hi
    if x.dtype == tl.float64:  # (a compile-time branch: one return, as Triton wants one return type)
        s = (tl.zeros_like(x) + slope_hi) + slope_lo  # both added in fp64
    return s


@triton.jit
def _act_forward(x, ACT: tl.constexpr, slope_hi, slope_lo):
    if ACT == 1:
        x = tl.where(x < 0, 0.0, x)
    elif ACT == 2:
        x = tl.where(x >= 0, x, x * _slope(x, slope_hi, slope_lo))
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
def _act_derivative(v, ACT: tl.constexpr, slope_hi, slope_lo):
    # v is the output y for relu/sigmoid/tanh and the pre-activation x for leaky_relu/gelu/silu.
    d = tl.zeros_like(v) + 1.0
    if ACT == 1:
        d = tl.where(v > 0, 1.0, 0.0)
    elif ACT == 2:
        d = tl.where(v >= 0, 1.0, _slope(v, slope_hi, slope_lo))
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
def _unpooled_tile(z_ptr, idx_ptr, n, h, w, ok, ci, szn, szc, szh, szw, sin, sic, sih, siw, HP, WP, WU,
                   POOL_H: tl.constexpr, POOL_W: tl.constexpr, IS_FLAT: tl.constexpr):
    """U[n, ci, h, w] on a 2-D tile: the arguments broadcast to (rows, channels) (rows index
    (n, h, w), which may differ per column when taps are packed into K). z of (h, w)'s window where
    that window's index names (h, w), else 0. ``ok`` marks real unpooled positions and channels."""
    ph = h // POOL_H
    pw = w // POOL_W
    ok = ok & (ph < HP) & (pw < WP)
    if POOL_H * POOL_W == 1 and not IS_FLAT:
        # 1x1 windows with window offsets (a plain transposed conv: conv_transpose_act2d and the
        # drop-in conv_transpose2d): the only valid offset is 0, so U = z and nothing is loaded.
        u = tl.load(z_ptr + (n * szn + ci * szc + ph * szh + pw * szw), mask=ok, other=0)
    else:
        if IS_FLAT:
            want = h * WU + w
        else:
            want = (h - ph * POOL_H) * POOL_W + (w - pw * POOL_W)
        # Both loads depend on the geometry only (not on each other), so the compiler may pipeline
        # them; the selection happens in registers. Valid indices are < 2**31 (checked before).
        got = tl.load(idx_ptr + (n * sin + ci * sic + ph * sih + pw * siw), mask=ok, other=-1).to(tl.int32)
        zv = tl.load(z_ptr + (n * szn + ci * szc + ph * szh + pw * szw), mask=ok, other=0)
        u = tl.where(got == want.to(tl.int32), zv, tl.zeros_like(zv))
    return u


@triton.jit
def _unpool_source(oy, ox, kh, kw, HU, WU, SH, SW, PADH, PADW):
    """The unpooled position (h, w) that output (oy, ox) reads through tap (kh, kw) of the
    transposed conv, h = (oy + padh - kh) / sh when divisible and in range (likewise w)."""
    hn = oy + PADH - kh
    wn = ox + PADW - kw
    h = hn // SH
    w = wn // SW
    ok = (hn >= 0) & (wn >= 0) & (hn - h * SH == 0) & (wn - w * SW == 0) & (h < HU) & (w < WU)
    return tl.where(ok, h, 0), tl.where(ok, w, 0), ok


@triton.jit
def _forward_kernel(z_ptr, idx_ptr, wt_ptr, b_ptr, out_ptr, pre_ptr, M, C_IN, C_OUT, HP, WP, HU, WU, HO, WO, KH, KW,
                    SH, SW, PADH, PADW, slope_hi, slope_lo,
                    szn, szc, szh, szw, sin, sic, sih, siw, son, soc, soh, sow,
                    DTYPE_KEY, POOL_H: tl.constexpr, POOL_W: tl.constexpr, IS_FLAT: tl.constexpr,
                    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, STORE_PRE: tl.constexpr, DOT: tl.constexpr,
                    PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr, INDEX64: tl.constexpr,
                    PACK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # wt is W permuted to (KH, KW, Cin, Cout), contiguous: K row k = t * Cin + ci (tap t = kh*KW + kw).
    # PACK_K (few input channels): one K loop over the flattened (t, ci), so K pads once to
    # BLOCK_K instead of once per tap; else a loop over taps with a Cin loop inside.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = m < M
    co_ok = co < C_OUT
    ox = m % WO
    oy = (m // WO) % HO
    n = m // (WO * HO)
    if INDEX64:
        n = n.to(tl.int64)
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)
    if PACK_K:
        K = KH * KW * C_IN
        for k0 in range(0, K, BLOCK_K):
            k = k0 + kk
            t = k // C_IN
            ci = k - t * C_IN
            kh = t // KW
            h, w, ok = _unpool_source(oy[:, None], ox[:, None], kh[None, :], (t - kh * KW)[None, :], HU, WU, SH, SW,
                                      PADH, PADW)
            a = _unpooled_tile(z_ptr, idx_ptr, n[:, None], h, w, ok & m_ok[:, None] & (k < K)[None, :], ci[None, :],
                               szn, szc, szh, szw, sin, sic, sih, siw, HP, WP, WU, POOL_H, POOL_W, IS_FLAT)
            b = tl.load(wt_ptr + k[:, None] * C_OUT + co[None, :], mask=(k < K)[:, None] & co_ok[None, :], other=0)
            acc = mma_acc(acc, a, b, DOT, PRECISION, UPCAST)
    else:
        for t in range(KH * KW):
            kh = t // KW
            h, w, row_ok = _unpool_source(oy, ox, kh, t - kh * KW, HU, WU, SH, SW, PADH, PADW)
            row_ok = row_ok & m_ok
            for c0 in range(0, C_IN, BLOCK_K):
                ci = c0 + kk
                ci_ok = ci < C_IN
                a = _unpooled_tile(z_ptr, idx_ptr, n[:, None], h[:, None], w[:, None], row_ok[:, None] & ci_ok[None, :],
                                   ci[None, :], szn, szc, szh, szw, sin, sic, sih, siw, HP, WP, WU, POOL_H, POOL_W,
                                   IS_FLAT)
                b = tl.load(wt_ptr + (t * C_IN + ci)[:, None] * C_OUT + co[None, :],
                            mask=ci_ok[:, None] & co_ok[None, :], other=0)
                acc = mma_acc(acc, a, b, DOT, PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_ptr + co, mask=co_ok, other=0).to(ACC_DTYPE)[None, :]
    # Eager rounds the conv output to the tensor dtype before the activation reads it.
    pre = acc.to(out_ptr.dtype.element_ty)
    off = (n * son + oy * soh + ox * sow)[:, None] + co[None, :] * soc
    ok = m_ok[:, None] & co_ok[None, :]
    if STORE_PRE:
        tl.store(pre_ptr + off, pre, mask=ok)
    y = _act_forward(pre.to(ACC_DTYPE), ACT, slope_hi, slope_lo)
    tl.store(out_ptr + off, y.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _gpre_kernel(g_ptr, a_ptr, gpre_ptr, part_ptr, M, C_OUT, HO, WO, slope_hi, slope_lo,
                 sgn, sgc, sgh, sgw, san, sac, sah, saw,
                 ACT: tl.constexpr, ACC_DTYPE: tl.constexpr, INDEX64: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """gpre[m, co] = grad_out * act'(.), rounded to gpre's dtype, positions-major; and
    part[pid_m, co] = sum over this block's rows of the rounded gpre (grad_b's first stage)."""
    pid_m = tl.program_id(0)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    co = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ox = m % WO
    oy = (m // WO) % HO
    n = m // (WO * HO)
    if INDEX64:
        n = n.to(tl.int64)
        m = m.to(tl.int64)
    ok = (m < M)[:, None] & (co < C_OUT)[None, :]
    g = tl.load(g_ptr + (n * sgn + oy * sgh + ox * sgw)[:, None] + co[None, :] * sgc, mask=ok, other=0)
    g = g.to(ACC_DTYPE)
    if ACT != 0:
        v = tl.load(a_ptr + (n * san + oy * sah + ox * saw)[:, None] + co[None, :] * sac, mask=ok, other=0)
        g = g * _act_derivative(v.to(ACC_DTYPE), ACT, slope_hi, slope_lo)
    gr = g.to(gpre_ptr.dtype.element_ty)
    tl.store(gpre_ptr + m[:, None] * C_OUT + co[None, :], gr, mask=ok)
    tl.store(part_ptr + pid_m * C_OUT + co, tl.sum(gr.to(ACC_DTYPE), axis=0), mask=co < C_OUT)


@triton.jit
def _dgrad_kernel(gpre_ptr, idx_ptr, wt_ptr, gz_ptr, M, C_IN, C_OUT, HP, WP, HU, WU, HO, WO, KH, KW, SH, SW,
                  PADH, PADW, sin, sic, sih, siw, DTYPE_KEY,
                  POOL_H: tl.constexpr, POOL_W: tl.constexpr, IS_FLAT: tl.constexpr, DOT: tl.constexpr,
                  PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr, INDEX64: tl.constexpr,
                  PACK_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # M = unpooled positions (n, h, w); N = Cin; K = (t, co). wt is W permuted to (KH, KW, Cout, Cin),
    # contiguous (K row k = t * Cout + co). gz (contiguous NCHW) gets D only at the argmax.
    # PACK_K (few output channels): one loop over the flattened (t, co), as in the forward.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ci = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = m < M
    ci_ok = ci < C_IN
    w = m % WU
    h = (m // WU) % HU
    n = m // (WU * HU)
    if INDEX64:
        n = n.to(tl.int64)
    kk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)
    if PACK_K:
        K = KH * KW * C_OUT
        for k0 in range(0, K, BLOCK_K):
            k = k0 + kk
            t = k // C_OUT
            co = k - t * C_OUT
            kh = t // KW
            oy = h[:, None] * SH - PADH + kh[None, :]
            ox = w[:, None] * SW - PADW + (t - kh * KW)[None, :]
            ok = m_ok[:, None] & (k < K)[None, :] & (oy >= 0) & (oy < HO) & (ox >= 0) & (ox < WO)
            a = tl.load(gpre_ptr + ((n[:, None] * HO + oy) * WO + ox) * C_OUT + co[None, :], mask=ok, other=0)
            b = tl.load(wt_ptr + k[:, None] * C_IN + ci[None, :], mask=(k < K)[:, None] & ci_ok[None, :], other=0)
            acc = mma_acc(acc, a, b, DOT, PRECISION, UPCAST)
    else:
        for t in range(KH * KW):
            kh = t // KW
            oy = h * SH - PADH + kh
            ox = w * SW - PADW + (t - kh * KW)
            row_ok = m_ok & (oy >= 0) & (oy < HO) & (ox >= 0) & (ox < WO)
            row = (n * HO + oy) * WO + ox
            for c0 in range(0, C_OUT, BLOCK_K):
                co = c0 + kk
                co_ok = co < C_OUT
                a = tl.load(gpre_ptr + row[:, None] * C_OUT + co[None, :], mask=row_ok[:, None] & co_ok[None, :],
                            other=0)
                b = tl.load(wt_ptr + (t * C_OUT + co)[:, None] * C_IN + ci[None, :],
                            mask=co_ok[:, None] & ci_ok[None, :], other=0)
                acc = mma_acc(acc, a, b, DOT, PRECISION, UPCAST)
    ph = h // POOL_H
    pw = w // POOL_W
    r_ok = m_ok & (ph < HP) & (pw < WP)
    if IS_FLAT:
        want = h * WU + w
    else:
        want = (h - ph * POOL_H) * POOL_W + (w - pw * POOL_W)
    ok = r_ok[:, None] & ci_ok[None, :]
    if POOL_H * POOL_W == 1 and not IS_FLAT:
        mine = ok  # 1x1 windows, window offsets: every position is its window's only one (see _unpooled_tile)
    else:
        got = tl.load(idx_ptr + n[:, None] * sin + ci[None, :] * sic + (ph * sih + pw * siw)[:, None], mask=ok,
                      other=-1)
        mine = ok & (got.to(tl.int32) == want[:, None].to(tl.int32))
    dst = ((n[:, None] * C_IN + ci[None, :]) * HP + ph[:, None]) * WP + pw[:, None]
    tl.store(gz_ptr + dst, acc.to(gz_ptr.dtype.element_ty), mask=mine)


@triton.jit
def _wgrad_kernel(gpre_ptr, z_ptr, idx_ptr, part_ptr, P, CHUNK, SPLIT, C_IN, C_OUT, HP, WP, HU, WU, HO, WO, KH, KW,
                  SH, SW, PADH, PADW, szn, szc, szh, szw, sin, sic, sih, siw, DTYPE_KEY,
                  POOL_H: tl.constexpr, POOL_W: tl.constexpr, IS_FLAT: tl.constexpr, DOT: tl.constexpr,
                  PRECISION: tl.constexpr, UPCAST: tl.constexpr, ACC_DTYPE: tl.constexpr, INDEX64: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # Program (tile of ci x (t, co), chunk s): part[s, ci, t * Cout + co] = sum over the unpooled
    # positions p of chunk s of U[p, ci] * gpre[shift_t(p), co]: the im2col of gpre packs the taps
    # into N (N = KH*KW*Cout pads once, not per tap), M = Cin, K = p.
    pid_mn = tl.program_id(0)
    s = tl.program_id(1)
    NT = KH * KW * C_OUT
    num_n = tl.cdiv(NT, BLOCK_N)
    ci = (pid_mn // num_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    j = (pid_mn % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    ci_ok = ci < C_IN
    j_ok = j < NT
    t = j // C_OUT
    co = j - t * C_OUT
    kh = t // KW
    kw = t - kh * KW
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=ACC_DTYPE)
    start = s * CHUNK
    for p0 in range(0, CHUNK, BLOCK_K):
        p = start + p0 + tl.arange(0, BLOCK_K)
        p_ok = (p < P) & (p0 + tl.arange(0, BLOCK_K) < CHUNK)
        w = p % WU
        h = (p // WU) % HU
        n = p // (WU * HU)
        if INDEX64:
            n = n.to(tl.int64)
        # (BLOCK_K, BLOCK_M) tile of U, transposed into the A operand.
        u = _unpooled_tile(z_ptr, idx_ptr, n[:, None], h[:, None], w[:, None], p_ok[:, None] & ci_ok[None, :],
                           ci[None, :], szn, szc, szh, szw, sin, sic, sih, siw, HP, WP, WU, POOL_H, POOL_W, IS_FLAT)
        oy = h[:, None] * SH - PADH + kh[None, :]
        ox = w[:, None] * SW - PADW + kw[None, :]
        g_ok = p_ok[:, None] & j_ok[None, :] & (oy >= 0) & (oy < HO) & (ox >= 0) & (ox < WO)
        g = tl.load(gpre_ptr + ((n[:, None] * HO + oy) * WO + ox) * C_OUT + co[None, :], mask=g_ok, other=0)
        acc = mma_acc(acc, tl.trans(u), g, DOT, PRECISION, UPCAST)
    base = s.to(tl.int64) * C_IN * NT
    tl.store(part_ptr + base + ci[:, None] * NT + j[None, :], acc, mask=ci_ok[:, None] & j_ok[None, :])


# ---------------------------------------------------------------- host side

_FORWARD = _tuned(_forward_kernel, "fwd", ["M", "C_IN", "C_OUT", "KH", "KW", "DTYPE_KEY"])
_DGRAD = _tuned(_dgrad_kernel, "dgrad", ["M", "C_IN", "C_OUT", "KH", "KW", "DTYPE_KEY"])
_WGRAD = _tuned(_wgrad_kernel, "wgrad", ["P", "C_IN", "C_OUT", "KH", "KW", "SPLIT", "DTYPE_KEY"])


def _acc_dtype(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _precision(dtype):
    """tl.dot's input_precision: TF32 for fp32 exactly when cuDNN's convs would use it."""
    if dtype == torch.float32 and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


def _dot_flags(dtype):
    """mma_acc's constexprs. fp64 reduces with tl.sum, not tl.dot: Triton 3.6 (the GPU image's)
    asserts on a fp64 dot with the default out_dtype and, given out_dtype=fp64, aborts the process in
    its MMAv2 lowering ("fp64 don't support largeK MMA") for these kernels' K=16 tiles."""
    return dict(DOT=dtype != torch.float64, PRECISION=_precision(dtype),
                UPCAST=INTERPRETING and dtype == torch.bfloat16, ACC_DTYPE=_acc_dtype(dtype))


# Channels per tap below which the taps are packed into K (the K loop runs over (tap, channel)):
# with 3 channels a per-tap K pads 3 -> 16, a packed one 27 -> 32.
PACK_K_BELOW = 16


def _out_hw(unpooled_size, weight, stride, padding, output_padding):
    return [(unpooled_size[a] - 1) * stride[a] - 2 * padding[a] + weight.shape[2 + a] + output_padding[a]
            for a in range(2)]


def _dtype_key(dtype):
    return {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}[dtype]


def _index64(*tensors):
    """Whether some offset may pass 2**31 - 1: then the batch term of every offset is int64
    (int32 elsewhere keeps the address math out of the register budget)."""
    return any(t.numel() and sum((d - 1) * abs(st) for d, st in zip(t.shape, t.stride())) >= 2**31 - 1
               for t in tensors)


def _slope_parts(negative_slope):
    """(hi, lo) with hi = fp32(slope) and lo = fp32(slope - hi): see _slope."""
    hi = float(torch.tensor(float(negative_slope), dtype=torch.float32))
    return hi, float(negative_slope) - hi


def _grid_mn(m, n):
    return lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))


def forward(input, indices, weight, bias, pool_size, unpooled_size, stride, padding, output_padding, activation,
            negative_slope):
    """(out, pre): out = act(pre), pre = unpool-transposed-conv + bias; pre is empty unless the
    activation's derivative needs it. Any strides (NCHW, channels_last) for input and indices."""
    z, idx = input, indices
    n, c_in, hp, wp = z.shape
    c_out, kh, kw = weight.shape[1], weight.shape[2], weight.shape[3]
    ho, wo = _out_hw(unpooled_size, weight, stride, padding, output_padding)
    out = torch.empty((n, c_out, ho, wo), dtype=z.dtype, device=z.device)
    store_pre = activation in NEEDS_PREACTIVATION
    pre = torch.empty_like(out) if store_pre else out.new_empty((0,))
    m = n * ho * wo
    if m and c_out:
        wt = weight.permute(2, 3, 0, 1).contiguous()
        b = bias.contiguous() if bias is not None else out
        _FORWARD[_variant(z.dtype)][_grid_mn(m, c_out)](
            z, idx, wt, b, out, pre if store_pre else out, m, c_in, c_out, hp, wp, unpooled_size[0],
            unpooled_size[1], ho, wo, kh, kw, stride[0], stride[1], padding[0], padding[1],
            *_slope_parts(negative_slope), *z.stride(), *idx.stride(), *out.stride(), _dtype_key(z.dtype),
            POOL_H=pool_size[0], POOL_W=pool_size[1], IS_FLAT=idx.dtype == torch.int64, HAS_BIAS=bias is not None,
            ACT=_ACT_CODES[activation], STORE_PRE=store_pre, INDEX64=_index64(z, idx, out),
            PACK_K=c_in < PACK_K_BELOW, **_dot_flags(z.dtype))
    return out, pre


GPRE_BLOCK_M = 64
GPRE_BLOCK_N = 32
# Programs the weight gradient aims for: whole waves of an H100's 132 SMs at 1-2 CTAs each. A
# fixed number, so the split (and the summation order) depends on the shapes only.
WGRAD_TARGET_PROGRAMS = 8 * 132
WGRAD_MIN_CHUNK = 256  # positions: keeps the partials small beside the operands


def _wgrad_split(p, tiles_mn):
    """Number of position chunks of the weight-gradient GEMM."""
    if INTERPRETING:
        return max(1, min(3, triton.cdiv(p, 64)))
    # Rounded down: at most WGRAD_TARGET_PROGRAMS programs, so whole waves. Rounding up overshot
    # the target by up to tiles_mn - 1 programs, a ninth wave that was ~90% idle (64->64 channels
    # at 256x256: 5 x 212 = 1060 programs for 1056 slots).
    want = max(1, WGRAD_TARGET_PROGRAMS // max(1, tiles_mn))
    return max(1, min(want, triton.cdiv(p, WGRAD_MIN_CHUNK)))


def backward(grad_out, act_input, input, indices, weight, pool_size, unpooled_size, stride, padding, output_padding,
             activation, negative_slope, output_mask):
    z, idx = input, indices
    n, c_in, hp, wp = z.shape
    c_out, kh, kw = weight.shape[1], weight.shape[2], weight.shape[3]
    hu, wu = unpooled_size
    ho, wo = _out_hw(unpooled_size, weight, stride, padding, output_padding)
    acc_torch = torch.float64 if z.dtype == torch.float64 else torch.float32
    flags = _dot_flags(z.dtype)
    m_out = n * ho * wo
    index64 = _index64(z, idx, grad_out, act_input) or m_out * c_out >= 2**31 - 1
    geo = dict(POOL_H=pool_size[0], POOL_W=pool_size[1], IS_FLAT=idx.dtype == torch.int64, INDEX64=index64,
               **flags)
    m_un = n * hu * wu
    run_dgrad = bool(output_mask[0] and z.numel() and m_un and m_out and c_out)
    # The dgrad kernel writes every element of grad_z exactly once (each index names one position of
    # the unpooled plane, validated before the op runs), so no zero fill is needed when it runs.
    grad_z = (torch.empty if run_dgrad else torch.zeros)(z.shape, dtype=z.dtype, device=z.device)
    grad_w = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)
    grad_b = torch.zeros((c_out,), dtype=z.dtype, device=z.device)
    if not (m_out and c_out):
        return grad_z, grad_w, grad_b
    # gpre in the tensor dtype (fp16/bf16 round as eager's activation backward does).
    gpre = torch.empty((m_out, c_out), dtype=z.dtype, device=z.device)
    blocks_m = triton.cdiv(m_out, GPRE_BLOCK_M)
    part_b = torch.empty((blocks_m, c_out), dtype=acc_torch, device=z.device)
    act = _ACT_CODES[activation]
    a = act_input if act != 0 else grad_out
    _gpre_kernel[(blocks_m, triton.cdiv(c_out, GPRE_BLOCK_N))](
        grad_out, a, gpre, part_b, m_out, c_out, ho, wo, *_slope_parts(negative_slope), *grad_out.stride(), *a.stride(),
        ACT=act, ACC_DTYPE=flags["ACC_DTYPE"], INDEX64=index64, BLOCK_M=GPRE_BLOCK_M, BLOCK_N=GPRE_BLOCK_N)
    if output_mask[2]:
        grad_b = part_b.sum(0).to(z.dtype)  # fixed-order second stage
    if run_dgrad:
        wt = weight.permute(2, 3, 1, 0).contiguous()  # (KH, KW, Cout, Cin)
        _DGRAD[_variant(z.dtype)][_grid_mn(m_un, c_in)](
            gpre, idx, wt, grad_z, m_un, c_in, c_out, hp, wp, hu, wu, ho, wo, kh, kw, stride[0], stride[1],
            padding[0], padding[1], *idx.stride(), _dtype_key(z.dtype), PACK_K=c_out < PACK_K_BELOW, **geo)
    if output_mask[1] and weight.numel() and m_un:
        nt = kh * kw * c_out
        split = _wgrad_split(m_un, triton.cdiv(c_in, 128) * triton.cdiv(nt, 128))
        chunk = triton.cdiv(m_un, split)
        split = triton.cdiv(m_un, chunk)
        part_w = torch.empty((split, c_in, nt), dtype=acc_torch, device=z.device)
        _WGRAD[_variant(z.dtype)][
            lambda meta: (triton.cdiv(c_in, meta["BLOCK_M"]) * triton.cdiv(nt, meta["BLOCK_N"]), split)](
            gpre, z, idx, part_w, m_un, chunk, split, c_in, c_out, hp, wp, hu, wu, ho, wo, kh, kw, stride[0],
            stride[1], padding[0], padding[1], *z.stride(), *idx.stride(), _dtype_key(z.dtype), **geo)
        # fixed-order second stage, then (ci, kh, kw, co) -> (ci, co, kh, kw)
        grad_w = part_w.sum(0).reshape(c_in, kh, kw, c_out).permute(0, 3, 1, 2).contiguous().to(weight.dtype)
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
