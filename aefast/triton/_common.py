"""Triton device functions shared by the conv families: activations, their derivatives, rounding.

Activation codes are aefast.ops.conv_pool.ACTIVATION_CODES: 0 none, 1 relu, 2 leaky_relu,
3 sigmoid, 4 tanh, 5 gelu (erf form), 6 silu. The names are stable (the decoder may import them).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def activate(z, ACT: tl.constexpr, slope):
    if ACT == 1:
        z = tl.where(z < 0, 0.0, z)  # NaN passes through, as torch.relu
    elif ACT == 2:
        z = tl.where(z >= 0, z, z * slope)
    elif ACT == 3:
        z = 1.0 / (1.0 + tl.exp(-z))
    elif ACT == 4:
        # tanh through exp(-2|z|) so that large |z| never overflows to inf/inf
        e = tl.exp(-2.0 * tl.abs(z))
        t = (1.0 - e) / (1.0 + e)
        z = tl.where(z >= 0, t, -t)
    elif ACT == 5:
        z = 0.5 * z * (1.0 + tl.erf(z * 0.7071067811865476))
    elif ACT == 6:
        z = z / (1.0 + tl.exp(-z))
    return z


@triton.jit
def activation_grad(z, ACT: tl.constexpr, slope):
    """d act / dz at the PRE-activation z.
    relu: 1[z > 0]; leaky: 1 or slope (1 at z == 0); sigmoid: s(1-s); tanh: 1-t^2;
    gelu: Phi(z) + z*phi(z); silu: s(1 + z(1-s))."""
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
def round_to(x, DT: tl.constexpr):
    """x (the accumulation type) rounded to DT and back, round-to-nearest-even. bf16 is rounded by
    hand: the interpreter's fp32 -> bf16 cast truncates (measured: half of random values differ)."""
    if DT == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        r = ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).to(tl.float32, bitcast=True)
        return tl.where(x != x, x, r)
    else:
        return x.to(DT).to(x.dtype)


@triton.jit
def mma_acc(acc, a, b, DOT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b. DOT: tl.dot on tensor cores (fp16/bf16 operands as they are, fp32 as
    PRECISION "tf32" or "ieee"), accumulating in fp32; UPCAST: bf16 operands go to fp32 first
    (the interpreter's bf16 tl.dot returns garbage). Without DOT (fp64, which has no tensor-core
    dot) a broadcast multiply and a tl.sum in the accumulator's type."""
    if DOT:
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=tl.float32)
    else:
        acc += tl.sum(a.to(acc.dtype)[:, :, None] * b.to(acc.dtype)[None, :, :], axis=1)
    return acc


@triton.jit
def patch_coords(k, CIN, KH: tl.constexpr, KW: tl.constexpr, CIN_INNER: tl.constexpr):
    """(ci, ki, kj) of the GEMM reduction indices k over Cin*KH*KW. CIN_INNER orders K as
    (ki, kj, ci) so that consecutive k are consecutive channels: contiguous in a channels_last
    input; otherwise (ci, ki, kj), contiguous along a row of an NCHW input."""
    if CIN_INNER:
        ci = k % CIN
        t = k // CIN
        kj = t % KW
        ki = t // KW
    else:
        kj = k % KW
        ki = (k // KW) % KH
        ci = k // (KW * KH)
    return ci, ki, kj
