"""Triton kernels of the conv_pool family: the fused encoder block and the drop-in max_pool2d.

Same math as csrc/cpu/conv_pool.cpp (derivations in aefast/ops/conv_pool.py). Both conv kernels are
implicit GEMMs on tensor cores (`tl.dot`, fp32 accumulation; fp64 keeps a tl.sum path):

forward    C[r, co] = sum_k A[r, k] * B[k, co], K = Cin*KH*KW in BLOCK_K slices, where a GEMM row
           r = (pooled position p, window offset o) is the conv output at (p*pool_stride + o):
             A[r, k] = x[n, ci, (ph*SPH + o//PKW)*SH - PH + ki, (pw*SPW + o%PKW)*SW - PW + kj]
           (SPH, SPW) the pool stride, = (PKH, PKW) for the non-overlapping pool. A row whose conv
           position lies past the conv output (a ceil_mode window clipped at the edge) is -inf
           before the max, so it never wins: offset 0 always lies inside.
             B[k, co] = w[co, ci, ki, kj]          with (ci, ki, kj) = patch_coords(k)
           The rows of one pooled position are its PKH*PKW window offsets (padded to NW, a power of
           two), so each program holds one fp32 accumulator per window offset in one tile and every
           loaded weight tile serves all of them in one tl.dot. A is gathered from the input through
           its strides (NCHW or channels_last; for channels_last K is ordered (ki, kj, ci) so a
           K slice is contiguous channels), corrupted in the load when asked. Epilogue, in
           registers: z = round(acc + bias), a = round(act(z)) (rounded to the tensor dtype where
           eager rounds, so the argmax compares torch's numbers), then max/argmax over the NW rows of
           each position with torch's scan rule (first maximum wins, a NaN wins, the last NaN of a
           window wins). Only the pooled map, the uint8 window offsets and z at the argmax are
           written. On a GPU the max/argmax is one tl.reduce with that rule as its combine
           (_scan_max); under TRITON_INTERPRET=1 (constexpr INTERPRETED) it is the same winner from
           tl.max/tl.min/tl.sum (_scan_max_vectorized), because the interpreter calls a Python
           combine once per element (~95% of an interpreted encoder test) and numpy for those.
backward   gz = grad * act'(preact), pooled-size (one elementwise kernel).
  wgrad    grad_w[co, k] = sum_{(j, o)} A[co, (j, o)] * B[(j, o), k] with
             A[co, (j, o)] = gz[n, co, j] if window[n, co, j] == o else 0   (built in registers)
             B[(j, o), k]  = x at conv position (j*pool_stride + o), patch element k
           (with overlapping windows two rows (j, o) may name one conv position: the GEMM sums
           both, which is the derivative's sum over windows)
           a GEMM over conv positions whose A-tile is the unpooled gradient, never stored. The
           positions are split into S fixed chunks (split-K); each program writes its partial sum
           to its own buffer and a second kernel adds the S buffers in order: deterministic, no
           atomics. grad_b[co] = sum_j gz[n, co, j] is summed from the same A-tiles (the pid_k == 0
           programs), into the same partial buffers.
  dgrad    grad_x = conv_transpose2d(max_unpool(gz, window), w): the decoder's forward with no
           bias and no activation (aefast.triton.unpool_deconv.forward, window-format indices).
           Its unpooled size is the full conv output (positions past pool*pooled get no
           gradient; a ceil_mode window clipped at the edge only names positions inside) and its
           output_padding = (H + 2P - KH) mod S makes its output exactly H x W. With pool stride !=
           pool (windows overlap or leave gaps) the unpool is not the decoder's: the dense
           dL/dz[n, co, r, c] = sum over the windows containing (r, c) whose argmax it is of gz
           is gathered first (_unpool_sum_kernel: per position, the windows in row-major order, so
           deterministic), then the same decoder with a 1x1 pool maps it to grad_x.
corruption with corruption != "none" the forward and the weight gradient read corrupt(x) in their
           input load: corrupt_value is aefast.triton.recon_loss's corrupt kernel on one element
           (tl.rand / tl.randn keyed by the seed, counter = the element's logical NCHW index, also
           for a channels_last input), so the result equals corrupt-then-conv_pool2d and no
           corrupted copy is stored.
max_pool2d torch's window scan (`v > best or isnan(v)`, first in-bounds element to start), any
           strides (channels_last in gives channels_last out). Backward is an atomic scatter-add
           (the op's schema has no window geometry for a gather): bitwise reproducible while no
           input element is the maximum of three or more windows (always, for non-overlapping
           pools); with torch.use_deterministic_algorithms(True) it is torch's deterministic
           accumulate-index_put_ instead.

Precision: fp32 runs tl.dot as TF32 when torch.backends.cudnn.allow_tf32 is on (as cuDNN's
convolutions do) and IEEE fp32 when it is off; under TRITON_INTERPRET=1 always IEEE fp32, and bf16
operands are upcast to fp32 before tl.dot (the interpreter's bf16 dot is wrong).

Tiling: on a GPU triton.autotune picks among GPU_CONFIGS per (positions, Cout, K); under the
interpreter one fixed config (INTERPRET_CONFIGS). scripts/check_triton_aot.py compiles every GPU
config of each specialization the tests launch for sm_80 and sm_90.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from aefast.ops.conv_pool import conv_output_size, pool_output_size, pooled_size
from aefast.triton._common import activate, activation_grad, mma_acc, patch_coords, round_to
from aefast.triton.recon_loss import corrupt_value

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _config(num_warps=4, num_stages=3, maxnreg=None, **blocks):
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages, maxnreg=maxnreg)


# BLOCK_M counts GEMM rows (pooled positions x padded window offsets); BLOCK_N output channels.
# Sized so that the epilogue's three row x channel tiles (z, activation, offsets) fit the
# registers without spills (checked by scripts/check_triton_aot.py for sm_80 and sm_90).
# The gathers' addresses dominate the registers, so two pipeline stages. "name:ieee" holds the tiles
# of fp32 with TF32 off (tl.dot as FMAs, more registers) and "name:fp64" fp64's (a tl.sum over a
# BLOCK_M x BLOCK_K x BLOCK_N product in registers); see config_variant().
# maxnreg=255 (.maxnreg in the PTX): without it ptxas budgets the forward kernel for two CTAs per SM
# (128 registers at 8 warps, 64-80 for the IEEE and fp64 tiles) and, since the pool stride/ceil_mode
# rows (in_window) added live values, spilled 8-36 B in some specializations (activation, corruption)
# on sm_80 or sm_90; with the whole register file allowed they compile without spills (1 CTA of 8
# warps per SM, as bench/roofline_h100.py models). 64x32x32 at 4 warps spilled 12-72 B at 255
# registers as TF32: 8 warps instead.
_WHOLE_FILE = 255
GPU_CONFIGS = {
    "_conv_pool_fwd_kernel": [
        _config(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=8, num_stages=2, maxnreg=_WHOLE_FILE),
        _config(BLOCK_M=128, BLOCK_N=32, BLOCK_K=32, num_warps=8, num_stages=2),
        _config(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, num_warps=8, num_stages=2, maxnreg=_WHOLE_FILE),
    ],
    "_conv_pool_fwd_kernel:ieee": [
        _config(BLOCK_M=32, BLOCK_N=64, BLOCK_K=16, num_warps=8, num_stages=2, maxnreg=_WHOLE_FILE),
        _config(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=2, maxnreg=_WHOLE_FILE),
    ],
    "_conv_pool_fwd_kernel:fp64": [_config(BLOCK_M=32, BLOCK_N=8, BLOCK_K=8, num_warps=4, num_stages=1,
                                           maxnreg=_WHOLE_FILE)],
    "_conv_pool_wgrad_kernel": [
        _config(BLOCK_CO=64, BLOCK_K=64, BLOCK_R=32, num_warps=8, num_stages=2),
        _config(BLOCK_CO=128, BLOCK_K=64, BLOCK_R=32, num_warps=8, num_stages=2),
        _config(BLOCK_CO=64, BLOCK_K=32, BLOCK_R=32, num_warps=4, num_stages=2),
    ],
    "_conv_pool_wgrad_kernel:ieee": [
        # (32x64x16 at 8 warps spilled 8 B on sm_90 in the ptxas run Triton makes: left out; this one
        # spilled 8 B at 96 registers on sm_90 in one recorded specialization without the .maxnreg)
        _config(BLOCK_CO=32, BLOCK_K=32, BLOCK_R=16, num_warps=4, num_stages=2, maxnreg=_WHOLE_FILE),
    ],
    # (16x16x16 spilled 12 B on sm_80 in one recorded specialization without the .maxnreg)
    "_conv_pool_wgrad_kernel:fp64": [_config(BLOCK_CO=16, BLOCK_K=16, BLOCK_R=16, num_warps=4, num_stages=1,
                                             maxnreg=_WHOLE_FILE)],
}
# The interpreter runs each block as numpy arrays: larger blocks, fewer Python-level steps.
INTERPRET_CONFIGS = {
    "_conv_pool_fwd_kernel": [_config(BLOCK_M=256, BLOCK_N=32, BLOCK_K=64)],
    "_conv_pool_fwd_kernel:ieee": [_config(BLOCK_M=256, BLOCK_N=32, BLOCK_K=64)],
    "_conv_pool_fwd_kernel:fp64": [_config(BLOCK_M=256, BLOCK_N=32, BLOCK_K=64)],
    "_conv_pool_wgrad_kernel": [_config(BLOCK_CO=32, BLOCK_K=64, BLOCK_R=128)],
    "_conv_pool_wgrad_kernel:ieee": [_config(BLOCK_CO=32, BLOCK_K=64, BLOCK_R=128)],
    "_conv_pool_wgrad_kernel:fp64": [_config(BLOCK_CO=32, BLOCK_K=64, BLOCK_R=128)],
}
# Elementwise and reduction kernels: no GEMM, so no tensor-core instruction expected
# (scripts/check_triton_aot.py requires one in every other kernel of this module).
NO_TENSOR_CORE_KERNELS = {"_pooled_grad_kernel", "_sum_splits_kernel", "_max_pool_fwd_kernel", "_max_pool_bwd_kernel",
                          "_unpool_sum_kernel"}


def _configs(name):
    return (INTERPRET_CONFIGS if _INTERPRET else GPU_CONFIGS)[name]


@triton.jit
def _scan_max(a1, z1, i1, a2, z2, i2):
    """torch's max-pool scan (`take if v > best or isnan(v)`, row-major) as an order-free combine:
    a NaN beats any number and the later NaN beats an earlier one; among numbers the larger wins
    and, equal, the earlier. A total order on distinct offsets, so any reduction tree agrees."""
    num1 = a1 == a1
    num2 = a2 == a2
    take2 = ((~num2) & (num1 | (i2 > i1))) | (num1 & num2 & ((a2 > a1) | ((a2 == a1) & (i2 < i1))))
    return tl.where(take2, a2, a1), tl.where(take2, z2, z1), tl.where(take2, i2, i1)


@triton.jit
def _at_winner(x, won, ACC: tl.constexpr):
    """x at the one True of won along axis 1, bit for bit: an integer sum of the bit patterns (a
    float sum would turn a -0.0 winner into +0.0: numpy's sum starts from +0.0)."""
    if ACC == tl.float64:
        return tl.sum(tl.where(won, x.to(tl.int64, bitcast=True), 0), axis=1).to(tl.float64, bitcast=True)
    else:
        return tl.sum(tl.where(won, x.to(tl.int32, bitcast=True), 0), axis=1).to(tl.float32, bitcast=True)


@triton.jit
def _scan_max_vectorized(a, z, offs, NW: tl.constexpr, ACC: tl.constexpr):
    """_scan_max's winner over axis 1 of (positions, NW, channels), from whole-array reductions: the
    interpreter runs tl.reduce with a Python combine function element by element (~95% of an
    interpreted encoder test), but tl.max/tl.min/tl.sum as one numpy call each. Same total order:
    a window holding a NaN takes its last NaN offset; otherwise the first offset equal to the
    window's maximum (a == max is false for every NaN, and a window without NaN has no NaN to
    mask, so the maximum over where(isnan, -inf, a) is the plain maximum; +0.0 == -0.0, so the
    first of the two wins, as in _scan_max). a and z (ACC) are then taken at the winning offset."""
    nan = a != a
    last_nan = tl.max(tl.where(nan, offs, -1), axis=1)
    peak = tl.max(tl.where(nan, float("-inf"), a), axis=1)
    first_peak = tl.min(tl.where(a == peak[:, None, :], offs, NW), axis=1)
    best_o = tl.where(last_nan >= 0, last_nan, first_peak)
    won = offs == best_o[:, None, :]
    return _at_winner(a, won, ACC), _at_winner(z, won, ACC), best_o


@triton.jit
def _conv_pool_fwd_kernel(x_ptr, w_ptr, b_ptr, out_ptr, win_ptr, pre_ptr,
                          M, CIN, H, W, COUT, HO, WO, K, SH, SW, PH, PW, HC, WC, SPH, SPW,
                          xs_n, xs_c, xs_h, xs_w, ws_o, ws_i, ws_h, ws_w,
                          slope_ptr, seed, nlevel, nlow, nhigh,
                          KH: tl.constexpr, KW: tl.constexpr, PKH: tl.constexpr, PKW: tl.constexpr,
                          NW: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
                          NOISE: tl.constexpr, CIN_INNER: tl.constexpr, DOT: tl.constexpr,
                          PRECISION: tl.constexpr, UPCAST: tl.constexpr, IDX64: tl.constexpr,
                          INTERPRETED: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    BLOCK_P: tl.constexpr = (BLOCK_M + NW - 1) // NW  # pooled positions per program
    ROWS: tl.constexpr = BLOCK_P * NW
    r = tl.arange(0, ROWS)
    pid = tl.program_id(0)
    if IDX64:  # int32 index math unless a tensor has 2^30 elements or more: half the registers
        pid = pid.to(tl.int64)
    p = pid * BLOCK_P + r // NW
    off = r % NW
    pw = p % WO
    ph = (p // WO) % HO
    n = p // (WO * HO)
    # this row's conv position; past the conv output only in a ceil_mode window clipped at the edge
    in_window = (off < PKH * PKW) & (ph * SPH + off // PKW < HC) & (pw * SPW + off % PKW < WC)
    row_ok = (p < M) & in_window
    y0 = (ph * SPH + off // PKW) * SH - PH  # top-left input row of this conv position's patch
    x0 = (pw * SPW + off % PKW) * SW - PW
    co = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = co < COUT
    acc = tl.zeros((ROWS, BLOCK_N), ACC)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        ci, ki, kj = patch_coords(k, CIN, KH, KW, CIN_INNER)
        y = y0[:, None] + ki[None, :]
        xx = x0[:, None] + kj[None, :]
        m = row_ok[:, None] & k_ok[None, :] & (y >= 0) & (y < H) & (xx >= 0) & (xx < W)
        a = tl.load(x_ptr + n[:, None] * xs_n + ci[None, :] * xs_c + y * xs_h + xx * xs_w, mask=m, other=0.0)
        if NOISE >= 0:
            logical = ((n[:, None] * CIN + ci[None, :]) * H + y) * W + xx
            a = tl.where(m, corrupt_value(a, logical, seed, nlevel, nlow, nhigh, NOISE), 0.0)
        b = tl.load(w_ptr + co[None, :] * ws_o + ci[:, None] * ws_i + ki[:, None] * ws_h + kj[:, None] * ws_w,
                    mask=k_ok[:, None] & c_ok[None, :], other=0.0)
        acc = mma_acc(acc, a, b, DOT, PRECISION, UPCAST)
    out_dtype = out_ptr.dtype.element_ty
    slope = tl.load(slope_ptr)  # a tensor, so that fp64 keeps a fp64 slope
    if HAS_BIAS:
        acc += tl.load(b_ptr + co, mask=c_ok, other=0.0).to(ACC)[None, :]
    z = round_to(acc, out_dtype)
    a = round_to(activate(z, ACT, slope), out_dtype)
    a = tl.where(in_window[:, None], a, float("-inf"))  # padding offsets and clipped rows never win
    offs = tl.broadcast_to(off[:, None], (ROWS, BLOCK_N))
    a3 = tl.reshape(a, (BLOCK_P, NW, BLOCK_N))
    z3 = tl.reshape(z, (BLOCK_P, NW, BLOCK_N))
    o3 = tl.reshape(offs, (BLOCK_P, NW, BLOCK_N))
    if INTERPRETED:
        best, best_z, best_o = _scan_max_vectorized(a3, z3, o3, NW, ACC)
    else:
        best, best_z, best_o = tl.reduce((a3, z3, o3), 1, _scan_max)
    q = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    qw = q % WO
    qh = (q // WO) % HO
    qn = q // (WO * HO)
    o = ((qn[:, None] * COUT + co[None, :]) * HO + qh[:, None]) * WO + qw[:, None]
    m = (q < M)[:, None] & c_ok[None, :]
    tl.store(out_ptr + o, best.to(out_dtype), mask=m)
    tl.store(win_ptr + o, best_o.to(tl.uint8), mask=m)
    tl.store(pre_ptr + o, best_z.to(out_dtype), mask=m)


@triton.jit
def _pooled_grad_kernel(g_ptr, pre_ptr, gz_ptr, total, slope_ptr, ACT: tl.constexpr, ACC: tl.constexpr,
                        BLOCK: tl.constexpr):
    """gz = grad * act'(preact) at the argmax, rounded once to the gradient's dtype (as eager's
    activation backward rounds)."""
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = e < total
    g = tl.load(g_ptr + e, mask=live, other=0.0).to(ACC)
    z = tl.load(pre_ptr + e, mask=live, other=0.0).to(ACC)
    dt = gz_ptr.dtype.element_ty
    gz = round_to(g * activation_grad(z, ACT, tl.load(slope_ptr)), dt)
    tl.store(gz_ptr + e, gz.to(dt), mask=live)


@triton.jit
def _unpool_sum_kernel(gz_ptr, win_ptr, dz_ptr, total, HC, WC, HO, WO, PKH: tl.constexpr, PKW: tl.constexpr,
                       SPH: tl.constexpr, SPW: tl.constexpr, ACC: tl.constexpr, BLOCK: tl.constexpr):
    """dz[n, c, r, q] = sum of gz over the windows (i, j) that contain (r, q) and whose argmax it is,
    i in [ceil((r - PKH + 1)/SPH), r // SPH] (and < HO), likewise j; in row-major window order, so
    the sum is the same every run. One conv position per element; NCHW contiguous."""
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = e < total
    q = e % WC
    r = (e // WC) % HC
    plane = e // (WC * HC)
    acc = tl.zeros((BLOCK,), ACC)
    i_hi = r // SPH
    j_hi = q // SPW
    for di in tl.static_range((PKH + SPH - 1) // SPH):
        i = i_hi - ((PKH + SPH - 1) // SPH - 1) + di
        for dj in tl.static_range((PKW + SPW - 1) // SPW):
            j = j_hi - ((PKW + SPW - 1) // SPW - 1) + dj
            oi = r - i * SPH
            oj = q - j * SPW
            ok = live & (i >= 0) & (i < HO) & (j >= 0) & (j < WO) & (oi < PKH) & (oj < PKW)
            src = (plane * HO + i) * WO + j
            hit = tl.load(win_ptr + src, mask=ok, other=255).to(tl.int32) == oi * PKW + oj
            acc += tl.where(ok & hit, tl.load(gz_ptr + src, mask=ok & hit, other=0.0).to(ACC), 0.0)
    tl.store(dz_ptr + e, acc.to(dz_ptr.dtype.element_ty), mask=live)


@triton.jit
def _conv_pool_wgrad_kernel(gz_ptr, win_ptr, x_ptr, part_ptr, part_b_ptr,
                            J, CIN, H, W, COUT, HO, WO, K, SH, SW, PH, PW, SPH, SPW, CHUNK,
                            xs_n, xs_c, xs_h, xs_w, seed, nlevel, nlow, nhigh,
                            KH: tl.constexpr, KW: tl.constexpr, PKH: tl.constexpr, PKW: tl.constexpr,
                            NW: tl.constexpr, ACC: tl.constexpr, NOISE: tl.constexpr, CIN_INNER: tl.constexpr,
                            DOT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                            IDX64: tl.constexpr,
                            BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    BLOCK_J: tl.constexpr = (BLOCK_R + NW - 1) // NW  # pooled positions per reduction step
    ROWS: tl.constexpr = BLOCK_J * NW
    split = tl.program_id(2)
    if IDX64:
        split = split.to(tl.int64)
    co = tl.program_id(0) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    c_ok = co < COUT
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = k < K
    ci, ki, kj = patch_coords(k, CIN, KH, KW, CIN_INNER)
    r = tl.arange(0, ROWS)
    off = r % NW
    acc = tl.zeros((BLOCK_CO, BLOCK_K), ACC)
    bsum = tl.zeros((BLOCK_CO,), ACC)
    j_start = split * CHUNK
    j_end = tl.minimum(j_start + CHUNK, J)
    for j0 in range(j_start, j_end, BLOCK_J):
        j = j0 + r // NW
        r_ok = (j < j_end) & (off < PKH * PKW)
        pw = j % WO
        ph = (j // WO) % HO
        n = j // (WO * HO)
        # A^T tile [BLOCK_CO, ROWS]: gz where this row's offset is the window's argmax
        ga = ((n[None, :] * COUT + co[:, None]) * HO + ph[None, :]) * WO + pw[None, :]
        am = c_ok[:, None] & r_ok[None, :]
        g = tl.load(gz_ptr + ga, mask=am, other=0.0)
        hit = tl.load(win_ptr + ga, mask=am, other=0).to(tl.int32) == off[None, :]
        a = tl.where(hit, g, 0.0).to(g.dtype)
        # B tile [ROWS, BLOCK_K]: the patch of each row's conv position
        y = ((ph * SPH + off // PKW) * SH - PH)[:, None] + ki[None, :]
        xx = ((pw * SPW + off % PKW) * SW - PW)[:, None] + kj[None, :]
        m = r_ok[:, None] & k_ok[None, :] & (y >= 0) & (y < H) & (xx >= 0) & (xx < W)
        b = tl.load(x_ptr + n[:, None] * xs_n + ci[None, :] * xs_c + y * xs_h + xx * xs_w, mask=m, other=0.0)
        if NOISE >= 0:  # the forward's corruption, regenerated
            logical = ((n[:, None] * CIN + ci[None, :]) * H + y) * W + xx
            b = tl.where(m, corrupt_value(b, logical, seed, nlevel, nlow, nhigh, NOISE), 0.0)
        acc = mma_acc(acc, a, b, DOT, PRECISION, UPCAST)
        bsum += tl.sum(a.to(ACC), axis=1)
    # partial[split, co, kk] with kk the (ci, ki, kj) row-major index of grad_w's element
    kk = (ci * KH + ki) * KW + kj
    base = split * COUT * K
    tl.store(part_ptr + base + co[:, None] * K + kk[None, :], acc, mask=c_ok[:, None] & k_ok[None, :])
    first_k = (tl.zeros((BLOCK_CO,), tl.int32) + tl.program_id(1)) == 0  # one K block writes grad_b
    tl.store(part_b_ptr + split * COUT + co, bsum, mask=c_ok & first_k)


def config_variant(operand_dtype, precision):
    """Which GPU_CONFIGS entry serves operands of this dtype ("fp32", "fp16", ... as Triton names
    them) at this PRECISION: "" (tensor cores), "ieee" (fp32, TF32 off) or "fp64"."""
    if operand_dtype == "fp64":
        return "fp64"
    return "ieee" if operand_dtype == "fp32" and precision == "ieee" else ""


def _tuned(kernel, name, key):
    """One autotuner per config variant, each with the tiles that fit its registers."""
    return {v: triton.autotune(configs=_configs(name + (":" + v if v else "")), key=key)(kernel)
            for v in ("", "ieee", "fp64")}


def _launcher(tuned, dtype, mode):
    short = {torch.float64: "fp64", torch.float32: "fp32"}.get(dtype, "fp16")
    return tuned[config_variant(short, mode["PRECISION"])]


_FWD = _tuned(_conv_pool_fwd_kernel, "_conv_pool_fwd_kernel", ["M", "COUT", "K"])
_WGRAD = _tuned(_conv_pool_wgrad_kernel, "_conv_pool_wgrad_kernel", ["J", "COUT", "K"])


@triton.jit
def _sum_splits_kernel(part_ptr, out_ptr, S, L, BLOCK: tl.constexpr):
    """out[e] = sum_s part[s, e], s in increasing order: the fixed second stage of split-K."""
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = e < L
    acc = tl.load(part_ptr + e, mask=live, other=0.0)
    for s in range(1, S):
        acc += tl.load(part_ptr + s * L + e, mask=live, other=0.0)
    tl.store(out_ptr + e, acc, mask=live)


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _slope(negative_slope, like):
    return torch.full((1,), float(negative_slope), dtype=_acc_dtype(like.dtype), device=like.device)


def _gemm_mode(dtype):
    """(DOT, PRECISION, UPCAST) constexprs of mma_acc for operands of this dtype."""
    if dtype == torch.float64:
        return dict(DOT=False, PRECISION="ieee", UPCAST=False)
    tf32 = dtype == torch.float32 and torch.backends.cudnn.allow_tf32 and not _INTERPRET
    return dict(DOT=True, PRECISION="tf32" if tf32 else "ieee", UPCAST=_INTERPRET and dtype == torch.bfloat16)


def _needs_int64(*tensors):
    """Index math in int64 only when some tensor has 2^30 elements or more (int32 otherwise, with
    room for the masked lanes' addresses past the end)."""
    return max(t.numel() for t in tensors) >= 2**30


def _window_rows(pool_size):
    """The window offsets padded to a power of two: the GEMM rows of one pooled position."""
    return triton.next_power_of_2(pool_size[0] * pool_size[1])


def _cin_inner(x):
    """channels_last inputs reduce over K ordered (ki, kj, ci): contiguous channels per slice."""
    return x.dim() == 4 and x.shape[1] > 1 and x.stride(1) == 1


def _operand(t):
    """The tensor as the kernels read it: any NCHW or channels_last strides are served as they are."""
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return t
    return t.contiguous()


def _pool_stride(pool_size, pool_stride):
    return [st if st else k for k, st in zip(pool_size, pool_stride)]


_NOISE_CODES = {"none": -1, "gaussian": 0, "masking": 1, "salt_pepper": 2}


def _noise_code(corruption):
    if corruption not in _NOISE_CODES:
        raise RuntimeError(f"aefast::conv_pool2d: unknown corruption {corruption!r} (none, gaussian, masking, "
                           "salt_pepper)")
    return _NOISE_CODES[corruption]


def conv_pool2d_forward(input, weight, bias, stride, padding, activation, negative_slope, pool_size,
                        corruption="none", corruption_level=0.0, seed=0, low=0.0, high=1.0, pool_stride=(0, 0),
                        ceil_mode=False):
    noise = _noise_code(corruption)
    x = _operand(input)
    w = weight.contiguous()
    n, cin, h, wd = x.shape
    cout, _, kh, kw = w.shape
    hc, wc = conv_output_size((h, wd), (kh, kw), stride, padding)
    sp = _pool_stride(pool_size, pool_stride)
    ho, wo = pooled_size((hc, wc), pool_size, sp, ceil_mode)
    pooled = torch.empty((n, cout, ho, wo), dtype=x.dtype, device=x.device)
    window = torch.empty((n, cout, ho, wo), dtype=torch.uint8, device=x.device)
    preact = torch.empty((n, cout, ho, wo), dtype=x.dtype, device=x.device)
    if pooled.numel() == 0:
        return pooled, window, preact
    b = bias.contiguous() if bias is not None else w  # never read without HAS_BIAS
    nw = _window_rows(pool_size)
    m = n * ho * wo

    def grid(meta):
        return triton.cdiv(m, triton.cdiv(meta["BLOCK_M"], nw)), triton.cdiv(cout, meta["BLOCK_N"])

    mode = _gemm_mode(x.dtype)
    _launcher(_FWD, x.dtype, mode)[grid](
        x, w, b, pooled, window, preact, m, cin, h, wd, cout, ho, wo, cin * kh * kw, stride[0], stride[1],
        padding[0], padding[1], hc, wc, sp[0], sp[1], *x.stride(), *w.stride(), _slope(negative_slope, x), seed, float(corruption_level),
        float(low), float(high), KH=kh, KW=kw, PKH=pool_size[0], PKW=pool_size[1], NW=nw, ACT=int(activation),
        HAS_BIAS=bias is not None, ACC=_tl_acc(x.dtype), NOISE=noise, CIN_INNER=_cin_inner(x),
        IDX64=_needs_int64(x, w, pooled), INTERPRETED=_INTERPRET, **mode)
    return pooled, window, preact


def _pooled_grad(grad, preact, activation, negative_slope):
    g = grad.contiguous()
    gz = torch.empty(g.shape, dtype=g.dtype, device=g.device)
    total = g.numel()
    if total:
        block = 1024
        _pooled_grad_kernel[(triton.cdiv(total, block),)](g, preact.contiguous(), gz, total,
                                                          _slope(negative_slope, g), ACT=int(activation),
                                                          ACC=_tl_acc(g.dtype), BLOCK=block)
    return gz


# Split-K of the weight gradient: a fixed number of position chunks per shape, each at least
# _MIN_CHUNK pooled positions, so that small problems are one chunk and large ones fill the GPU. On
# a GPU the count fills whole waves of WGRAD_TARGET_PROGRAMS programs over the (Cout, K) tiles of a
# 64x64 tile, up to four waves (a layer with few channels, 3->64, has one tile and needs the splits
# to occupy 132 SMs); the interpreter keeps at most _MAX_SPLITS.
_MAX_SPLITS = 32
_MIN_CHUNK = 512
WGRAD_TARGET_PROGRAMS = 8 * 132
_WAVE_TILE = 64


def wgrad_splits(positions, cout=1, k=1, gpu=not _INTERPRET):
    if not gpu:
        return max(1, min(_MAX_SPLITS, positions // _MIN_CHUNK))
    tiles = triton.cdiv(cout, _WAVE_TILE) * triton.cdiv(k, _WAVE_TILE)
    most = max(1, min(4 * WGRAD_TARGET_PROGRAMS // tiles, positions // _MIN_CHUNK))  # up to four waves
    # the fewest splits whose programs fill their waves best (288 tiles: 7 splits, 95%, not 3, 82%)
    return max(range(1, most + 1), key=lambda s: (s * tiles / (triton.cdiv(s * tiles, WGRAD_TARGET_PROGRAMS)
                                                               * WGRAD_TARGET_PROGRAMS), -s))


def conv_pool2d_backward_input(grad, window, preact, weight, input_size, stride, padding, activation,
                               negative_slope, pool_size, pool_stride=(0, 0), ceil_mode=False):
    from aefast.triton import unpool_deconv

    w = weight.contiguous()
    kh, kw = w.shape[-2:]
    hc, wc = conv_output_size(input_size, (kh, kw), stride, padding)
    out_pad = [(input_size[a] + 2 * padding[a] - (kh, kw)[a]) % stride[a] for a in range(2)]
    gz = _pooled_grad(grad, preact, activation, negative_slope)
    if gz.numel() == 0:
        return torch.zeros((grad.shape[0], w.shape[1], *input_size), dtype=grad.dtype, device=grad.device)
    sp = _pool_stride(pool_size, pool_stride)
    if sp == list(pool_size):  # non-overlapping windows (ceil_mode's clipped ones included): the decoder's unpool
        gx, _ = unpool_deconv.forward(gz, window.contiguous(), w, None, list(pool_size), [hc, wc], list(stride),
                                      list(padding), out_pad, None, 0.0)
        return gx
    ho, wo = gz.shape[-2:]
    dz = torch.empty((gz.shape[0], gz.shape[1], hc, wc), dtype=gz.dtype, device=gz.device)
    block = 1024
    _unpool_sum_kernel[(triton.cdiv(dz.numel(), block),)](
        gz, window.contiguous(), dz, dz.numel(), hc, wc, ho, wo, PKH=pool_size[0], PKW=pool_size[1], SPH=sp[0],
        SPW=sp[1], ACC=_tl_acc(gz.dtype), BLOCK=block)
    # dz is dense: the decoder with a 1x1 pool whose every offset is 0 (a stride-0 uint8 zero) is
    # conv_transpose2d(dz, w).
    zero = torch.zeros((1, 1, 1, 1), dtype=torch.uint8, device=dz.device).expand(dz.shape)
    gx, _ = unpool_deconv.forward(dz, zero, w, None, [1, 1], [hc, wc], list(stride), list(padding), out_pad, None,
                                  0.0)
    return gx


def conv_pool2d_backward_weight(grad, window, preact, input, kernel_size, stride, padding, activation,
                                negative_slope, pool_size, corruption="none", corruption_level=0.0, seed=0, low=0.0,
                                high=1.0, splits=None, pool_stride=(0, 0), ceil_mode=False):
    noise = _noise_code(corruption)
    x = _operand(input)
    n, cin, h, wd = x.shape
    cout = grad.shape[1]
    kh, kw = kernel_size
    k = cin * kh * kw
    acc = _acc_dtype(grad.dtype)
    ho, wo = grad.shape[-2:]
    positions = n * ho * wo
    if positions == 0 or cout == 0 or k == 0:
        return (torch.zeros((cout, cin, kh, kw), dtype=grad.dtype, device=grad.device),
                torch.zeros((cout,), dtype=grad.dtype, device=grad.device))
    gz = _pooled_grad(grad, preact, activation, negative_slope)
    s = wgrad_splits(positions, cout, k) if splits is None else splits
    chunk = triton.cdiv(positions, s)
    part_w = torch.empty((s, cout * k), dtype=acc, device=grad.device)
    part_b = torch.empty((s, cout), dtype=acc, device=grad.device)
    nw = _window_rows(pool_size)

    def grid(meta):
        return triton.cdiv(cout, meta["BLOCK_CO"]), triton.cdiv(k, meta["BLOCK_K"]), s

    mode = _gemm_mode(x.dtype)
    _launcher(_WGRAD, x.dtype, mode)[grid](
        gz, window.contiguous(), x, part_w, part_b, positions, cin, h, wd, cout, ho, wo, k, stride[0], stride[1],
        padding[0], padding[1], *_pool_stride(pool_size, pool_stride), chunk, *x.stride(), seed, float(corruption_level), float(low), float(high),
        KH=kh, KW=kw, PKH=pool_size[0], PKW=pool_size[1], NW=nw, ACC=_tl_acc(grad.dtype), NOISE=noise,
        CIN_INNER=_cin_inner(x), IDX64=_needs_int64(x, gz, part_w), **mode)
    gw = _sum_splits(part_w)
    gb = _sum_splits(part_b)
    return gw.view(cout, cin, kh, kw).to(grad.dtype), gb.to(grad.dtype)


def _sum_splits(part):
    out = torch.empty(part.shape[1:], dtype=part.dtype, device=part.device)
    block = 1024
    _sum_splits_kernel[(triton.cdiv(out.numel(), block),)](part, out, part.shape[0], out.numel(), BLOCK=block)
    return out


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
    # grad_x[n, c, idx] += grad[n, c, oh, ow]: a scatter. The op's schema (grad, indices, input)
    # does not carry the window geometry that a gather would need. An element that is the maximum
    # of at most two windows (any non-overlapping pool, kernel <= stride) gets 0 + a + b in either
    # order, the same bits; only three or more overlapping windows sharing a maximum make the
    # float atomics order-dependent; under torch.use_deterministic_algorithms max_pool2d_backward uses torch's
    # deterministic accumulate-index_put_ instead.
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
            ACC=_tl_acc(input.dtype), BLOCK=block, num_warps=8)  # one window per thread: no spills
    return out, idx


def max_pool2d_backward(grad_output, indices, input):
    n, c, h, w = input.shape
    acc = torch.zeros((n, c, h, w), dtype=_acc_dtype(grad_output.dtype), device=grad_output.device)
    total = grad_output.numel()
    if total and torch.are_deterministic_algorithms_enabled():
        # torch's accumulate-index_put_ is deterministic in this mode (sorted, on CUDA too): the
        # overlapping windows' sums then come out the same on every run.
        planes = torch.arange(n * c, device=indices.device).view(n, c, 1, 1) * (h * w)
        acc.view(-1).index_put_(((indices + planes).reshape(-1),), grad_output.reshape(-1).to(acc.dtype),
                                accumulate=True)
    elif total:
        block = 256
        _max_pool_bwd_kernel[(triton.cdiv(total, block),)](
            grad_output, indices, acc, total, c, grad_output.shape[2], grad_output.shape[3], h * w,
            *grad_output.stride(), *indices.stride(), BLOCK=block)
    return acc.to(grad_output.dtype).contiguous(memory_format=_memory_format(input))
