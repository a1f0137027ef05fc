"""Triton kernels of the conv_bn_pool family: conv -> BatchNorm (batch statistics) -> activation ->
max-pool, forward and backward. The formulas are derived in aefast/ops/conv_bn_pool.py.

The multiply-adds go to the vendor through torch: the forward conv is torch.ops.aten.convolution
and the backward's is torch.ops.aten.convolution_backward (cuDNN on a GPU, on tensor cores and
honouring torch.backends.cudnn.allow_tf32, as eager's Conv2d; oneDNN under the interpreter), run
channels-last so that the conv output y is (N, HC, WC, C) in memory, the op's ``conv_out``. What
no library does is aefast's, in these memory-bound kernels over y as an (M, C) matrix,
M = N*HC*WC conv positions, each row C contiguous channels:

statistics  _stats_partial_kernel: S fixed chunks of rows x a block of channels per program. Each
            BLOCK_M-row tile is reduced in registers in two steps (a first mean m0 = sum y / nb, then
            the deviations d = y - m0: mb = m0 + sum d / nb, m2b = sum d^2 - (sum d)^2 / nb, the
            corrected two-pass form, exact whatever m0's rounding), and the tiles are merged in row
            order with Chan's update
                n = na + nb,  d = mb - ma,  mean = ma + d*nb/n,  M2 = M2a + m2b + d^2*na*nb/n
            (fp32 for fp32/fp16/bf16 y, fp64 for fp64). _stats_combine_kernel merges the S chunk
            partials in chunk order with the same update, in fp64, and writes mean and the biased
            var = M2/M. Why this form and not fp32 sums of y and y^2: a one-pass fp32 sum of
            y^2 loses the variance to cancellation when |mean| >> std (mean/std ~ 1e3 leaves ~1
            correct digit); the tile's two steps see only deviations from the tile's own mean, and
            Chan's merge adds tile results without cancellation, so the error is set by the fp32
            rounding of the tile means, not by M (measured: var within 1.5e-5 at mean/std = 1e5,
            tests/test_conv_bn_pool.py). Unlike the CPU op's shifted sums, nothing depends on the
            first value being typical. Fixed chunks, fixed tiles, fixed merge order, no atomics:
            the same bits every run.
pool        _bn_act_pool_kernel: per pooled position and channel, over the window offsets o in
            row-major order (offsets past the conv output in a ceil_mode window clipped at the edge
            skipped; offset 0 always lies inside):
                z = ((y - mean) * invstd) * gamma + beta,   invstd = 1 / sqrt(var + eps)
                a = round(act(z))            (rounded to the tensor dtype, as the reference twin and
                                              eager round the activation before pooling)
                best, o* <- a, o   if a > best or a is NaN   (torch's scan: the first maximum wins)
            and writes the pooled map (tensor dtype) and o* as a uint8 window offset, NCHW. Any pool
            geometry: windows (PKH, PKW) at (i*SPH, j*SPW), overlapping or with gaps.
backward    g = grad * act'(z) at each window's argmax (z recomputed from y, mean, var, gamma, beta as
            above), yhat = (y - mean)*invstd there:
  sums      _routed_sums_kernel: chunks of pooled positions x channel blocks, per program the sums
            of g and g*yhat over its chunk (tiles in order, ACC), g kept pooled-size (ACC) for the
            dense pass; _sums_combine_kernel adds the chunk partials in order in fp64:
            grad_beta = sum g,  grad_gamma = sum g*yhat (the window sums: a conv position that is
            the argmax of several overlapping windows counts each window's g, as the gradient
            routes it).
  dense     _bn_dense_grad_kernel: per conv position (n, r, q) and channel, gathered, never
            scattered:  dL/dy = c0 + c1*(y - mean) + k * sum over windows (i, j) containing (r, q)
            whose argmax it is of g[n, c, i, j]   (windows in row-major order),
            k = gamma*invstd, c1 = -k*invstd*grad_gamma/M, c0 = -k*grad_beta/M, in ACC, rounded
            once to y's dtype, written channels-last; then the vendor conv backward.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from aefast.ops.conv_pool import _memory_format, pooled_size, resolve_pool_stride
from aefast.triton._common import activate, activation_grad, round_to

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Tiles: elements per program tile, rows x channels (channels innermost, contiguous in y), 32 per
# thread at 4 warps (fp64: 16, whose values take two registers each); the interpreter launches the
# same tiles, so the specializations the tests record are the ones a GPU runs, and
# scripts/check_triton_aot.py checks them for registers and spills (16384-element tiles spilled on
# sm_80).
_TILE = 4096
_TILE_FP64 = 2048
_MAX_BLOCK_C = 64
_NUM_WARPS = 4
# Chunks of the reductions: enough programs to fill a GPU (~8 per SM of an H100) while the
# combine kernels' in-order loops over the chunks stay short.
_TARGET_PROGRAMS = 4 if _INTERPRET else 8 * 132
# Elementwise and reduction kernels only: no GEMM here (scripts/check_triton_aot.py).
NO_TENSOR_CORE_KERNELS = {"_stats_partial_kernel", "_stats_combine_kernel", "_bn_act_pool_kernel",
                          "_routed_sums_kernel", "_sums_combine_kernel", "_bn_dense_grad_kernel"}


@triton.jit
def _chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.'s pairwise update of (count, mean, sum of squared deviations); an empty side
    (count 0) leaves the other unchanged. The counts are scalars (every channel has the same), so
    the one division is a scalar's (fp64 division is a subroutine call on a GPU)."""
    n = n_a + n_b
    d = mean_b - mean_a
    frac = n_b / tl.maximum(n, 1.0)
    return n, mean_a + d * frac, m2_a + m2_b + d * d * (n_a * frac)


@triton.jit
def _stats_partial_kernel(y_ptr, part_ptr, M, C, TILES, ACC: tl.constexpr, IDX64: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """part[s, 0, c] = mean and part[s, 1, c] = M2 of chunk s (TILES tiles of BLOCK_M rows)."""
    s = tl.program_id(0)
    if IDX64:
        s = s.to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    n_run = tl.zeros((), ACC)
    mean_run = tl.zeros((BLOCK_C,), ACC)
    m2_run = tl.zeros((BLOCK_C,), ACC)
    for t in range(0, TILES):
        rows = (s * TILES + t) * BLOCK_M + tl.arange(0, BLOCK_M)
        r_ok = rows < M
        m = r_ok[:, None] & c_ok[None, :]
        y = tl.load(y_ptr + rows[:, None] * C + c[None, :], mask=m, other=0.0).to(ACC)
        nb = tl.sum(r_ok.to(ACC), axis=0)
        inv_nb = 1.0 / tl.maximum(nb, 1.0)
        mb = tl.sum(y, axis=0) * inv_nb  # a first mean, then its correction from the deviations
        d = tl.where(m, y - mb[None, :], 0.0)
        s1 = tl.sum(d, axis=0)
        m2b = tl.maximum(tl.sum(d * d, axis=0) - s1 * s1 * inv_nb, 0.0)
        n_run, mean_run, m2_run = _chan_merge(n_run, mean_run, m2_run, nb, mb + s1 * inv_nb, m2b)
    tl.store(part_ptr + (2 * s) * C + c, mean_run, mask=c_ok)
    tl.store(part_ptr + (2 * s + 1) * C + c, m2_run, mask=c_ok)


@triton.jit
def _stats_combine_kernel(part_ptr, mean_ptr, var_ptr, M, C, S, CHUNK_ROWS, BLOCK_C: tl.constexpr):
    """The S chunk partials merged in chunk order in fp64; mean and the biased var = M2 / M."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    n_run = tl.zeros((), tl.float64)
    mean_run = tl.zeros((BLOCK_C,), tl.float64)
    m2_run = tl.zeros((BLOCK_C,), tl.float64)
    for s in range(0, S):
        nb = tl.minimum(CHUNK_ROWS, M - s * CHUNK_ROWS).to(tl.float64)
        mb = tl.load(part_ptr + (2 * s) * C + c, mask=c_ok, other=0.0).to(tl.float64)
        m2b = tl.load(part_ptr + (2 * s + 1) * C + c, mask=c_ok, other=0.0).to(tl.float64)
        n_run, mean_run, m2_run = _chan_merge(n_run, mean_run, m2_run, nb, mb, m2b)
    out = mean_ptr.dtype.element_ty
    tl.store(mean_ptr + c, mean_run.to(out), mask=c_ok)
    tl.store(var_ptr + c, (m2_run / M).to(out), mask=c_ok)


@triton.jit
def _channel_params(c, c_ok, mean_ptr, var_ptr, gamma_ptr, beta_ptr, eps_ptr, HAS_GAMMA: tl.constexpr,
                    HAS_BETA: tl.constexpr, ACC: tl.constexpr):
    """mean, invstd = 1/sqrt(var + eps) (IEEE-rounded), gamma (1 when absent), beta (0 when absent)."""
    mean = tl.load(mean_ptr + c, mask=c_ok, other=0.0).to(ACC)
    var = tl.load(var_ptr + c, mask=c_ok, other=1.0).to(ACC)
    eps = tl.load(eps_ptr)
    if ACC == tl.float64:  # fp64 sqrt and division are IEEE-rounded as they are
        invstd = 1.0 / tl.sqrt(var + eps)
    else:  # fp32's tl.sqrt and `/` may be approximate on a GPU
        invstd = tl.div_rn(tl.full(var.shape, 1.0, ACC), tl.sqrt_rn(var + eps))
    if HAS_GAMMA:
        gamma = tl.load(gamma_ptr + c, mask=c_ok, other=1.0).to(ACC)
    else:
        gamma = tl.full(var.shape, 1.0, ACC)
    if HAS_BETA:
        beta = tl.load(beta_ptr + c, mask=c_ok, other=0.0).to(ACC)
    else:
        beta = tl.zeros(var.shape, ACC)
    return mean, invstd, gamma, beta


@triton.jit
def _normalize(y, mean, invstd, gamma, beta, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr):
    """BatchNorm's z in the reference twin's order: ((y - mean) * invstd) * gamma + beta."""
    z = (y - mean[None, :]) * invstd[None, :]
    if HAS_GAMMA:
        z = z * gamma[None, :]
    if HAS_BETA:
        z = z + beta[None, :]
    return z


@triton.jit
def _bn_act_pool_kernel(y_ptr, mean_ptr, var_ptr, gamma_ptr, beta_ptr, out_ptr, win_ptr, slope_ptr, eps_ptr,
                        P, C, HC, WC, HO, WO, SPH, SPW, PKW, NWIN,
                        ACT: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, ACC: tl.constexpr,
                        IDX64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    if IDX64:
        p = p.to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    p_ok = p < P
    pw = p % WO
    ph = (p // WO) % HO
    n = p // (WO * HO)
    mean, invstd, gamma, beta = _channel_params(c, c_ok, mean_ptr, var_ptr, gamma_ptr, beta_ptr, eps_ptr,
                                                HAS_GAMMA, HAS_BETA, ACC)
    slope = tl.load(slope_ptr)
    out_dtype = out_ptr.dtype.element_ty
    r0 = ph * SPH
    q0 = pw * SPW
    m = p_ok[:, None] & c_ok[None, :]
    first = ((n * HC + r0) * WC + q0)[:, None] * C + c[None, :]
    y = tl.load(y_ptr + first, mask=m, other=0.0).to(ACC)
    best = round_to(activate(_normalize(y, mean, invstd, gamma, beta, HAS_GAMMA, HAS_BETA), ACT, slope), out_dtype)
    best_o = tl.zeros((BLOCK_P, BLOCK_C), tl.int32)
    for o in range(1, NWIN):
        ki = o // PKW
        kj = o % PKW
        inside = (r0 + ki < HC) & (q0 + kj < WC)  # a ceil_mode window clipped at the edge
        mo = m & inside[:, None]
        y = tl.load(y_ptr + first + (ki * WC + kj) * C, mask=mo, other=0.0).to(ACC)
        a = round_to(activate(_normalize(y, mean, invstd, gamma, beta, HAS_GAMMA, HAS_BETA), ACT, slope), out_dtype)
        take = inside[:, None] & ((a > best) | (a != a))
        best = tl.where(take, a, best)
        best_o = tl.where(take, o, best_o)
    dst = (n[:, None] * C + c[None, :]) * (HO * WO) + (ph * WO + pw)[:, None]
    tl.store(out_ptr + dst, best.to(out_dtype), mask=m)
    tl.store(win_ptr + dst, best_o.to(tl.uint8), mask=m)


@triton.jit
def _routed_sums_kernel(grad_ptr, win_ptr, y_ptr, mean_ptr, var_ptr, gamma_ptr, beta_ptr, g_ptr, part_ptr,
                        slope_ptr, eps_ptr, P, C, HC, WC, HO, WO, SPH, SPW, PKW, TILES,
                        ACT: tl.constexpr, HAS_GAMMA: tl.constexpr, HAS_BETA: tl.constexpr, ACC: tl.constexpr,
                        IDX64: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """g = grad * act'(z) at each argmax, stored pooled-size (NCHW, ACC); the chunk's sums of g
    and g*yhat per channel into part[s, 0/1, c] (tiles in order)."""
    s = tl.program_id(0)
    if IDX64:
        s = s.to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    mean, invstd, gamma, beta = _channel_params(c, c_ok, mean_ptr, var_ptr, gamma_ptr, beta_ptr, eps_ptr,
                                                HAS_GAMMA, HAS_BETA, ACC)
    slope = tl.load(slope_ptr)
    sum_g = tl.zeros((BLOCK_C,), ACC)
    sum_gy = tl.zeros((BLOCK_C,), ACC)
    for t in range(0, TILES):
        p = (s * TILES + t) * BLOCK_P + tl.arange(0, BLOCK_P)
        m = (p < P)[:, None] & c_ok[None, :]
        pw = p % WO
        ph = (p // WO) % HO
        n = p // (WO * HO)
        src = (n[:, None] * C + c[None, :]) * (HO * WO) + (ph * WO + pw)[:, None]
        o = tl.load(win_ptr + src, mask=m, other=0).to(tl.int32)
        r = ph[:, None] * SPH + o // PKW
        q = pw[:, None] * SPW + o % PKW
        y = tl.load(y_ptr + ((n[:, None] * HC + r) * WC + q) * C + c[None, :], mask=m, other=0.0).to(ACC)
        z = _normalize(y, mean, invstd, gamma, beta, HAS_GAMMA, HAS_BETA)
        g = tl.load(grad_ptr + src, mask=m, other=0.0).to(ACC) * activation_grad(z, ACT, slope)
        g = tl.where(m, g, 0.0)
        tl.store(g_ptr + src, g, mask=m)
        sum_g += tl.sum(g, axis=0)
        sum_gy += tl.sum(g * ((y - mean[None, :]) * invstd[None, :]), axis=0)
    tl.store(part_ptr + (2 * s) * C + c, sum_g, mask=c_ok)
    tl.store(part_ptr + (2 * s + 1) * C + c, sum_gy, mask=c_ok)


@triton.jit
def _sums_combine_kernel(part_ptr, sums_ptr, C, S, M, BLOCK_C: tl.constexpr):
    """sums[0/1, c] = sum over the chunks s, in order, of part[s, 0/1, c], in fp64; sums[2/3, c]
    the same divided by M (the dense kernel's per-channel constants: no fp64 division there)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    sg = tl.zeros((BLOCK_C,), tl.float64)
    sgy = tl.zeros((BLOCK_C,), tl.float64)
    for s in range(0, S):
        sg += tl.load(part_ptr + (2 * s) * C + c, mask=c_ok, other=0.0).to(tl.float64)
        sgy += tl.load(part_ptr + (2 * s + 1) * C + c, mask=c_ok, other=0.0).to(tl.float64)
    tl.store(sums_ptr + c, sg, mask=c_ok)
    tl.store(sums_ptr + C + c, sgy, mask=c_ok)
    tl.store(sums_ptr + 2 * C + c, sg / M, mask=c_ok)
    tl.store(sums_ptr + 3 * C + c, sgy / M, mask=c_ok)


@triton.jit
def _bn_dense_grad_kernel(y_ptr, g_ptr, win_ptr, sums_ptr, mean_ptr, var_ptr, gamma_ptr, dy_ptr, eps_ptr,
                          R, C, HC, WC, HO, WO, SPH, SPW, PKH, PKW, NI, NJ,
                          HAS_GAMMA: tl.constexpr, ACC: tl.constexpr, IDX64: tl.constexpr,
                          BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """dL/dy at every conv position (channels-last, as y): c0 + c1*(y - mean) plus k*g of each
    window (i, j) whose argmax it is, gathered over the NI x NJ candidate windows in row-major
    order: i in [r // SPH - NI + 1, r // SPH] (NI = ceil(PKH / SPH)), likewise j."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    if IDX64:
        rows = rows.to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    m = (rows < R)[:, None] & c_ok[None, :]
    q = rows % WC
    r = (rows // WC) % HC
    n = rows // (WC * HC)
    mean, invstd, gamma, beta = _channel_params(c, c_ok, mean_ptr, var_ptr, gamma_ptr, gamma_ptr, eps_ptr,
                                                HAS_GAMMA, False, ACC)
    sg = tl.load(sums_ptr + 2 * C + c, mask=c_ok, other=0.0).to(ACC)  # grad_beta / M
    sgy = tl.load(sums_ptr + 3 * C + c, mask=c_ok, other=0.0).to(ACC)  # grad_gamma / M
    k = gamma * invstd
    c1 = -k * invstd * sgy
    c0 = -k * sg
    at = rows[:, None] * C + c[None, :]
    y = tl.load(y_ptr + at, mask=m, other=0.0).to(ACC)
    acc = c0[None, :] + c1[None, :] * (y - mean[None, :])
    i_hi = r // SPH
    j_hi = q // SPW
    plane = (n[:, None] * C + c[None, :]) * (HO * WO)
    for di in range(0, NI):
        i = i_hi - (NI - 1) + di
        oi = r - i * SPH
        for dj in range(0, NJ):
            j = j_hi - (NJ - 1) + dj
            oj = q - j * SPW
            ok = (i >= 0) & (i < HO) & (j >= 0) & (j < WO) & (oi < PKH) & (oj < PKW)
            mo = m & ok[:, None]
            src = plane + (i * WO + j)[:, None]
            hit = mo & (tl.load(win_ptr + src, mask=mo, other=0).to(tl.int32) == (oi * PKW + oj)[:, None])
            g = tl.load(g_ptr + src, mask=hit, other=0.0)
            acc += tl.where(hit, k[None, :] * g, 0.0)
    dt = dy_ptr.dtype.element_ty
    tl.store(dy_ptr + at, round_to(acc, dt).to(dt), mask=m)


# ---------------------------------------------------------------- launchers

def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _scalar(value, like):
    """A one-element tensor in the accumulation dtype (fp64 keeps fp64 constants; a fill kernel,
    no host-to-device copy)."""
    return torch.full((1,), float(value), dtype=_acc_dtype(like.dtype), device=like.device)


def _blocks(rows, channels, dtype, shrink=1):
    """(BLOCK_rows, BLOCK_C): channels innermost (contiguous in y), _TILE / shrink elements a tile."""
    block_c = min(_MAX_BLOCK_C, triton.next_power_of_2(max(channels, 1)))
    tile = (_TILE_FP64 if dtype == torch.float64 else _TILE) // shrink
    block_r = max(16, min(tile // block_c, triton.next_power_of_2(max(rows, 1))))
    return block_r, block_c


def _chunks(tiles, channel_blocks):
    """(chunks, tiles per chunk) of a reduction over `tiles` row tiles."""
    chunks = max(1, min(tiles, triton.cdiv(_TARGET_PROGRAMS, channel_blocks)))
    per = triton.cdiv(tiles, chunks)
    return triton.cdiv(tiles, per), per


def _needs_int64(*tensors):
    return max(t.numel() for t in tensors) >= 2**30


def _check(cond, message):
    if not cond:
        raise RuntimeError(f"aefast::conv_bn_pool2d: {message}")


def _geometry(conv_hw, pool_size, pool_stride, ceil_mode):
    """(pool stride, pooled (HO, WO)) with the CPU op's checks (csrc/cpu/conv_bn_pool.cpp)."""
    _check(len(pool_size) == 2 and pool_size[0] > 0 and pool_size[1] > 0 and pool_size[0] * pool_size[1] <= 255,
           "pool_size needs two positive entries with at most 255 elements in a window")
    _check(len(pool_stride) == 2 and pool_stride[0] >= 0 and pool_stride[1] >= 0,
           "pool_stride needs two non-negative entries (0: pool_size)")
    _check(conv_hw[0] >= pool_size[0] and conv_hw[1] >= pool_size[1],
           f"the conv output {conv_hw[0]}x{conv_hw[1]} is smaller than the pool window")
    sp = resolve_pool_stride(pool_size, pool_stride)
    return sp, pooled_size(conv_hw, pool_size, sp, ceil_mode)


def _check_activation(activation):
    _check(0 <= int(activation) <= 6, f"unknown activation code {activation}")


def _bn_param(t, dtype):
    return None if t is None else t.to(dtype).contiguous()


def _vendor_operand(x):
    """The conv's input, channels-last: cuDNN's (and oneDNN's) fast layout, and the one that makes
    the conv output (N, HC, WC, C) in memory."""
    return x.contiguous(memory_format=torch.channels_last)


def channel_stats(y2d):
    """(mean, biased var) per column of the (M, C) matrix y2d, in the op-math dtype."""
    rows, cols = y2d.shape
    stat = _acc_dtype(y2d.dtype)
    mean = torch.empty((cols,), dtype=stat, device=y2d.device)
    var = torch.empty((cols,), dtype=stat, device=y2d.device)
    block_m, block_c = _blocks(rows, cols, y2d.dtype)
    c_blocks = triton.cdiv(cols, block_c)
    chunks, tiles = _chunks(triton.cdiv(rows, block_m), c_blocks)
    part = torch.empty((chunks, 2, cols), dtype=stat, device=y2d.device)
    _stats_partial_kernel[(chunks, c_blocks)](y2d, part, rows, cols, tiles, ACC=_tl_acc(y2d.dtype),
                                             IDX64=_needs_int64(y2d), BLOCK_M=block_m, BLOCK_C=block_c,
                                             num_warps=_NUM_WARPS)
    _stats_combine_kernel[(c_blocks,)](part, mean, var, rows, cols, chunks, tiles * block_m, BLOCK_C=block_c,
                                       num_warps=_NUM_WARPS)
    return mean, var


def conv_bn_pool2d_forward(input, weight, bias, bn_weight, bn_bias, stride, padding, eps, activation, negative_slope,
                           pool_size, pool_stride=(0, 0), ceil_mode=False):
    _check(input.dim() == 4 and weight.dim() == 4, "input and weight must be 4-D")
    _check(len(stride) == 2 and len(padding) == 2, "stride and padding need two entries")
    _check_activation(activation)
    # the vendor's conv: cuDNN on a GPU (TF32 as torch.backends.cudnn.allow_tf32 says), channels-last
    y = torch.ops.aten.convolution(_vendor_operand(input), weight, bias, list(stride), list(padding), [1, 1], False,
                                   [0, 0], 1)
    n, c, hc, wc = y.shape
    conv_out = y.permute(0, 2, 3, 1).contiguous()  # (N, HC, WC, C); no copy when y is channels-last
    sp, (ho, wo) = _geometry((hc, wc), list(pool_size), list(pool_stride), ceil_mode)
    _check(n * hc * wc > 1, "expected more than 1 value per channel when training")
    stat = _acc_dtype(y.dtype)
    gamma, beta = _bn_param(bn_weight, stat), _bn_param(bn_bias, stat)
    for t in (gamma, beta):
        _check(t is None or t.shape == (c,), f"bn_weight and bn_bias must have shape ({c},)")
    y2d = conv_out.view(n * hc * wc, c)
    mean, var = channel_stats(y2d)
    pooled = torch.empty((n, c, ho, wo), dtype=y.dtype, device=y.device)
    window = torch.empty((n, c, ho, wo), dtype=torch.uint8, device=y.device)
    positions = n * ho * wo
    block_p, block_c = _blocks(positions, c, y.dtype)
    _bn_act_pool_kernel[(triton.cdiv(positions, block_p), triton.cdiv(c, block_c))](
        y2d, mean, var, gamma if gamma is not None else mean, beta if beta is not None else mean, pooled, window,
        _scalar(negative_slope, y), _scalar(eps, y), positions, c, hc, wc, ho, wo, sp[0], sp[1], int(pool_size[1]),
        int(pool_size[0] * pool_size[1]), ACT=int(activation), HAS_GAMMA=gamma is not None,
        HAS_BETA=beta is not None, ACC=_tl_acc(y.dtype), IDX64=_needs_int64(y2d, pooled), BLOCK_P=block_p,
        BLOCK_C=block_c, num_warps=_NUM_WARPS)
    return pooled, window, conv_out, mean, var


def conv_bn_pool2d_backward(grad_pooled, window, conv_out, mean, var, input, weight, bn_weight, bn_bias, stride,
                            padding, eps, activation, negative_slope, pool_size, output_mask, pool_stride=(0, 0),
                            ceil_mode=False):
    _check(conv_out.dim() == 4 and window.dtype == torch.uint8 and grad_pooled.shape == window.shape,
           "grad_pooled and the uint8 window must have the pooled shape")
    _check_activation(activation)
    n, hc, wc, c = conv_out.shape
    sp, (ho, wo) = _geometry((hc, wc), list(pool_size), list(pool_stride), ceil_mode)
    _check(n * hc * wc > 1, "expected more than 1 value per channel when training")
    _check(tuple(grad_pooled.shape) == (n, c, ho, wo) and mean.numel() == c and var.numel() == c,
           "grad_pooled, mean and var do not match conv_out")
    stat = _acc_dtype(conv_out.dtype)
    gamma, beta = _bn_param(bn_weight, stat), _bn_param(bn_bias, stat)
    for t in (gamma, beta):
        _check(t is None or t.shape == (c,), f"bn_weight and bn_bias must have shape ({c},)")
    y2d = conv_out.contiguous().view(n * hc * wc, c)
    mean_s, var_s = mean.to(stat).contiguous(), var.to(stat).contiguous()
    grad = grad_pooled.to(conv_out.dtype).contiguous()
    win = window.contiguous()
    acc_dtype, tl_acc = _acc_dtype(conv_out.dtype), _tl_acc(conv_out.dtype)
    slope, eps_t = _scalar(negative_slope, y2d), _scalar(eps, y2d)
    big = _needs_int64(y2d, grad)
    # pass 1: g at the argmaxes and the sums of g and g*yhat
    positions = n * ho * wo
    block_p, block_c = _blocks(positions, c, y2d.dtype)
    c_blocks = triton.cdiv(c, block_c)
    chunks, tiles = _chunks(triton.cdiv(positions, block_p), c_blocks)
    g = torch.empty(grad.shape, dtype=acc_dtype, device=grad.device)
    part = torch.empty((chunks, 2, c), dtype=acc_dtype, device=grad.device)
    sums = torch.empty((4, c), dtype=torch.float64, device=grad.device)
    _routed_sums_kernel[(chunks, c_blocks)](
        grad, win, y2d, mean_s, var_s, gamma if gamma is not None else mean_s, beta if beta is not None else mean_s,
        g, part, slope, eps_t, positions, c, hc, wc, ho, wo, sp[0], sp[1], int(pool_size[1]), tiles,
        ACT=int(activation), HAS_GAMMA=gamma is not None, HAS_BETA=beta is not None, ACC=tl_acc, IDX64=big,
        BLOCK_P=block_p, BLOCK_C=block_c, num_warps=_NUM_WARPS)
    _sums_combine_kernel[(c_blocks,)](part, sums, c, chunks, n * hc * wc, BLOCK_C=block_c, num_warps=_NUM_WARPS)
    grad_input = grad_weight = grad_bias = None
    if output_mask[0] or output_mask[1] or output_mask[2]:
        # pass 2: the dense dL/dy, written once (channels-last, as y), then the vendor conv backward
        dy = torch.empty_like(y2d)
        # a quarter tile: the window gather keeps several index tiles live (a full one took 255
        # registers and spilled in fp64 on sm_90)
        block_r, block_c = _blocks(y2d.shape[0], c, y2d.dtype, shrink=4)
        _bn_dense_grad_kernel[(triton.cdiv(y2d.shape[0], block_r), triton.cdiv(c, block_c))](
            y2d, g, win, sums, mean_s, var_s, gamma if gamma is not None else mean_s, dy, eps_t, y2d.shape[0], c, hc,
            wc, ho, wo, sp[0], sp[1], int(pool_size[0]), int(pool_size[1]), triton.cdiv(int(pool_size[0]), sp[0]),
            triton.cdiv(int(pool_size[1]), sp[1]), HAS_GAMMA=gamma is not None, ACC=tl_acc,
            IDX64=big, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=_NUM_WARPS)
        dy_nchw = dy.view(n, hc, wc, c).permute(0, 3, 1, 2)
        grad_input, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
            dy_nchw, _vendor_operand(input), weight, [c], list(stride), list(padding), [1, 1], False, [0, 0], 1,
            [bool(output_mask[0]), bool(output_mask[1]), bool(output_mask[2])])
        if grad_input is not None:
            grad_input = grad_input.contiguous(memory_format=_memory_format(input))
        if grad_weight is not None:
            grad_weight = grad_weight.contiguous(memory_format=_memory_format(weight))

    def or_empty(t, wanted):
        return t if wanted and t is not None else conv_out.new_empty((0,))

    def param_grad(row, wanted, like):
        if not wanted or like is None:
            return conv_out.new_empty((0,))
        return sums[row].to(like.dtype)

    return (or_empty(grad_input, output_mask[0]), or_empty(grad_weight, output_mask[1]),
            or_empty(grad_bias, output_mask[2]), param_grad(1, output_mask[3], bn_weight),
            param_grad(0, output_mask[4], bn_bias))
