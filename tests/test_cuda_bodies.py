"""The CUDA backend's conv-family algorithms, run on the CPU and held to torch's composition.

csrc/include/aefast/gemm_gather_host.h writes each CUDA op once over an executor; the CUDA build
runs it with one GPU thread per element, and the test-only ops ``torch.ops.aefast.emulate_cuda_*``
(csrc/cpu/emulate_cuda_bodies.cpp) run the SAME per-element bodies (aefast/gemm_gather_body.h)
over the same index spaces on the CPU, with the same at::mm sequence and batch chunking
(``chunk_bytes`` forces many chunks here). So this file executes, without a GPU, the index
arithmetic, gathers, GEMM operands and epilogues of the CUDA kernels:

  covered    unpool rows, im2col rows (with corruption), gather-col2im + bias + activation,
             select rows (grad of the pooled values), decoder/encoder activation gradients,
             encoder epilogue after the vendor conv, direct encoder kernel, corrupt chunk,
             drop-in max_pool2d forward, max_pool2d backward planes (and its index check).
  not here   the GEMMs themselves (cuBLAS/cuDNN vs at::mm on the CPU), the grid-stride launch,
             the device-side assert, and the max_unpool2d / first_bad_unpool_index kernels
             (integer atomicMax/atomicMin elections, unchanged, not in body form).
The tests marked ``cuda`` compare the real CUDA ops with the emulation and check that the
backwards are bitwise reproducible; they need a GPU.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import aefast  # noqa: F401  (loads the extension)
from conftest import HAS_CUDA_BACKEND, TOLERANCES

ops = torch.ops.aefast
ACTS = [None, "relu", "leaky_relu", "sigmoid", "tanh", "gelu", "silu"]
ACT_CODES = {None: 0, "relu": 1, "leaky_relu": 2, "sigmoid": 3, "tanh": 4, "gelu": 5, "silu": 6}
SLOPE = 0.1
BIG = 1 << 30  # one chunk
TINY = 1  # one image per chunk


def act_fn(y, act):
    if act is None:
        return y
    if act == "leaky_relu":  # the reference twin's form: derivative 1 at y == 0 (F.leaky_relu's is the slope)
        return torch.where(y >= 0, y, y * SLOPE)
    return getattr(F, act)(y)


def to_window(flat, pooled_hw, pool, unpooled_w):
    """Flat unpooled positions -> uint8 offsets inside each pool window."""
    hp, wp = pooled_hw
    ph = torch.arange(hp).view(1, 1, hp, 1)
    pw = torch.arange(wp).view(1, 1, 1, wp)
    i = flat // unpooled_w - ph * pool[0]
    j = flat % unpooled_w - pw * pool[1]
    return (i * pool[1] + j).to(torch.uint8)


def window_to_flat(win, pool, unpooled_w):
    hp, wp = win.shape[-2:]
    ph = torch.arange(hp).view(1, 1, hp, 1)
    pw = torch.arange(wp).view(1, 1, 1, wp)
    w64 = win.long()
    return (ph * pool[0] + w64 // pool[1]) * unpooled_w + pw * pool[1] + w64 % pool[1]


# ------------------------------------------------------------------ decoder

DECODER_CASES = [
    # n, cin, cout, unpooled hw, pool, k, stride, padding, output_padding, ceil_mode
    (2, 3, 5, (8, 10), (2, 2), 3, 1, 1, 0, False),
    (1, 17, 3, (7, 9), (2, 2), 3, 1, 0, 0, True),  # clipped windows (ceil mode), odd sizes
    (3, 4, 1, (9, 7), (3, 2), 2, 2, 0, 1, False),  # stride 2, output_padding, 1 output channel
    (2, 2, 3, (6, 6), (2, 3), 1, 1, 0, 0, False),  # 1x1 kernel
]


def decoder_case(case, dtype, seed=0, ties=False):
    n, cin, cout, (uh, uw), pool, k, stride, padding, op, ceil = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, uh, uw, generator=g, dtype=torch.float64)
    if ties:
        x = x.round()  # many equal values: the first maximum wins in the pool
    z, idx = F.max_pool2d(x, pool, return_indices=True, ceil_mode=ceil)
    w = torch.randn(cin, cout, k, k, generator=g, dtype=torch.float64) * 0.3
    b = torch.randn(cout, generator=g, dtype=torch.float64)
    return z.to(dtype), idx, w.to(dtype), b.to(dtype), (uh, uw), pool, stride, padding, op


def decoder_reference(z, idx, w, b, unpooled, pool, stride, padding, op, act):
    u = F.max_unpool2d(z.double(), idx, pool, output_size=unpooled)
    return act_fn(F.conv_transpose2d(u, w.double(), None if b is None else b.double(), stride, padding, op), act)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("fmt", ["flat", "window"])
@pytest.mark.parametrize("case", range(len(DECODER_CASES)))
@pytest.mark.parametrize("chunk", [BIG, TINY])
def test_decoder_forward_and_backward(act, fmt, case, chunk):
    dtype = torch.float32
    z, idx, w, b, unpooled, pool, stride, padding, op = decoder_case(DECODER_CASES[case], dtype, seed=case, ties=True)
    index = idx if fmt == "flat" else to_window(idx, z.shape[-2:], pool, unpooled[1])
    out, saved = ops.emulate_cuda_unpool_conv_transpose2d(z, index, w, b, pool, unpooled, [stride] * 2, [padding] * 2,
                                                          [op] * 2, act, SLOPE, chunk)
    # the same tensors with autograd through torch's composition, in float64
    zr, wr, br = (t.double().requires_grad_() for t in (z, w, b))
    ref = decoder_reference(zr, idx, wr, br, unpooled, pool, stride, padding, op, act)
    torch.testing.assert_close(out.double(), ref.detach(), **TOLERANCES[dtype])
    gy = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ref.backward(gy)
    act_input = saved if saved.numel() else out
    gz, gw, gb = ops.emulate_cuda_unpool_conv_transpose2d_backward(
        gy.to(dtype), act_input, z, index, w, pool, unpooled, [stride] * 2, [padding] * 2, [op] * 2, act, SLOPE,
        [True, True, True], chunk)
    tol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gz.double(), zr.grad, **tol)
    torch.testing.assert_close(gw.double(), wr.grad, **tol)
    torch.testing.assert_close(gb.double(), br.grad, **tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_decoder_dtypes_and_chunks_agree(dtype):
    z, idx, w, b, unpooled, pool, stride, padding, op = decoder_case(DECODER_CASES[1], dtype, seed=3)
    args = (pool, unpooled, [stride] * 2, [padding] * 2, [op] * 2, "gelu", SLOPE)
    out, pre = ops.emulate_cuda_unpool_conv_transpose2d(z, idx, w, b, *args, BIG)
    out1, pre1 = ops.emulate_cuda_unpool_conv_transpose2d(z, idx, w, b, *args, TINY)
    # chunking changes no value: each output's sum order is per image
    assert torch.equal(out, out1) and torch.equal(pre, pre1)
    ref = decoder_reference(z, idx, w, b, unpooled, pool, stride, padding, op, "gelu")
    torch.testing.assert_close(out.double(), ref, **TOLERANCES[dtype])
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    g1 = ops.emulate_cuda_unpool_conv_transpose2d_backward(gy, pre, z, idx, w, *args, [True] * 3, BIG)
    g2 = ops.emulate_cuda_unpool_conv_transpose2d_backward(gy, pre, z, idx, w, *args, [True] * 3, BIG)
    assert all(torch.equal(a, c) for a, c in zip(g1, g2))  # run to run


def test_decoder_output_mask_and_no_bias():
    z, idx, w, b, unpooled, pool, stride, padding, op = decoder_case(DECODER_CASES[0], torch.float32)
    args = (pool, unpooled, [stride] * 2, [padding] * 2, [op] * 2, None, SLOPE)
    out, _ = ops.emulate_cuda_unpool_conv_transpose2d(z, idx, w, None, *args, BIG)
    torch.testing.assert_close(out.double(), decoder_reference(z, idx, w, None, unpooled, pool, stride, padding, op,
                                                               None), **TOLERANCES[torch.float32])
    gy = torch.randn(out.shape)
    full = ops.emulate_cuda_unpool_conv_transpose2d_backward(gy, out, z, idx, w, *args, [True] * 3, TINY)
    for k in range(3):
        mask = [i == k for i in range(3)]
        part = ops.emulate_cuda_unpool_conv_transpose2d_backward(gy, out, z, idx, w, *args, mask, TINY)
        torch.testing.assert_close(part[k], full[k], rtol=0, atol=0)
        assert all(not part[i].any() for i in range(3) if i != k)


def test_decoder_index_naming_no_window_position_contributes_nothing():
    """An entry whose index is outside its own window is skipped, for both formats, in every pass."""
    z, idx, w, b, unpooled, pool, stride, padding, op = decoder_case(DECODER_CASES[0], torch.float64)
    bad = idx.clone()
    bad[0, 0, 0, 0] = idx[0, 0, 1, 1]  # another window's position
    win = to_window(idx, z.shape[-2:], pool, unpooled[1])
    win[0, 0, 0, 0] = 200  # offset past the window
    args = (pool, unpooled, [stride] * 2, [padding] * 2, [op] * 2, None, SLOPE)
    zz = z.clone()
    zz[0, 0, 0, 0] = 0
    expect = decoder_reference(zz, idx, w, b, unpooled, pool, stride, padding, op, None)
    for index in (bad, win):
        out, _ = ops.emulate_cuda_unpool_conv_transpose2d(z, index, w, b, *args, BIG)
        torch.testing.assert_close(out, expect, **TOLERANCES[torch.float64])
        gz, _, _ = ops.emulate_cuda_unpool_conv_transpose2d_backward(torch.ones_like(out), out, z, index, w, *args,
                                                                     [True] * 3, BIG)
        assert gz[0, 0, 0, 0] == 0


# ------------------------------------------------------------------ encoder

ENCODER_CASES = [
    # n, cin, cout, hw, k, stride, padding, pool   (K = cin*k*k: < 64 direct kernel, >= 64 vendor conv)
    (2, 3, 5, (9, 11), 3, 1, 1, (2, 2)),   # K = 27: direct
    (1, 17, 3, (8, 7), 3, 1, 0, (2, 2)),   # K = 153: cuDNN + epilogue; odd W, unused conv column
    (3, 8, 4, (11, 9), 3, 2, 1, (2, 3)),   # K = 72, stride 2, rectangular pool
    (2, 1, 2, (5, 5), 1, 1, 0, (2, 2)),    # 1x1 kernel, K = 1
]


def encoder_case(case, dtype, seed=0, ties=False):
    n, cin, cout, hw, k, stride, padding, pool = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, *hw, generator=g, dtype=torch.float64)
    w = torch.randn(cout, cin, k, k, generator=g, dtype=torch.float64) * 0.3
    b = torch.randn(cout, generator=g, dtype=torch.float64)
    if ties:  # small integers: exact conv outputs with many equal values in a window
        x, w, b = (x * 2).round(), w.sign(), b.round()
    return x.to(dtype), w.to(dtype), b.to(dtype), stride, padding, pool


def encoder_reference(x, w, b, stride, padding, pool, act):
    z = F.conv2d(x, w, b, stride, padding)
    y, idx = F.max_pool2d(act_fn(z, act), pool, return_indices=True)
    return y, idx, z


def emulate_encoder(x, w, b, stride, padding, pool, act, chunk=BIG, corruption="none", level=0.0, seed=0):
    return ops.emulate_cuda_conv_pool2d_forward(x, w, b, [stride] * 2, [padding] * 2, ACT_CODES[act], SLOPE, pool,
                                                corruption, level, seed, 0.0, 1.0, chunk)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("case", range(len(ENCODER_CASES)))
@pytest.mark.parametrize("chunk", [BIG, TINY])
def test_encoder_forward_and_backward(act, case, chunk):
    x, w, b, stride, padding, pool = encoder_case(ENCODER_CASES[case], torch.float64, seed=case, ties=True)
    pooled, window, preact = emulate_encoder(x, w, b, stride, padding, pool, act, chunk)
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    y, idx, z = encoder_reference(xr, wr, br, stride, padding, pool, act)
    wc = z.shape[-1]
    assert torch.equal(window_to_flat(window, pool, wc), idx)  # ties: the first maximum, exactly
    torch.testing.assert_close(pooled, y.detach(), **TOLERANCES[torch.float64])
    torch.testing.assert_close(preact, z.detach().flatten(2).gather(2, idx.flatten(2)).view_as(y),
                               **TOLERANCES[torch.float64])
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y.backward(gy)
    gx, gw, gb = ops.emulate_cuda_conv_pool2d_backward(gy, window, preact, x, w, [stride] * 2, [padding] * 2,
                                                       ACT_CODES[act], SLOPE, pool, "none", 0.0, 0, 0.0, 1.0, chunk)
    torch.testing.assert_close(gx, xr.grad, **TOLERANCES[torch.float64])
    torch.testing.assert_close(gw, wr.grad, **TOLERANCES[torch.float64])
    torch.testing.assert_close(gb, br.grad, **TOLERANCES[torch.float64])


@pytest.mark.parametrize("case", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_encoder_float_types(case, dtype):
    x, w, b, stride, padding, pool = encoder_case(ENCODER_CASES[case], dtype, seed=11)
    pooled, window, preact = emulate_encoder(x, w, b, stride, padding, pool, "silu")
    y, idx, z = encoder_reference(x.double(), w.double(), b.double(), stride, padding, pool, "silu")
    torch.testing.assert_close(pooled.double(), y, **TOLERANCES[dtype])
    if dtype == torch.float32:  # bf16 rounding may flip near-ties
        assert torch.equal(window_to_flat(window, pool, z.shape[-1]), idx)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    args = ([stride] * 2, [padding] * 2, ACT_CODES["silu"], SLOPE, pool, "none", 0.0, 0, 0.0, 1.0, BIG)
    first = ops.emulate_cuda_conv_pool2d_backward(gy, window, preact, x, w, *args)
    again = ops.emulate_cuda_conv_pool2d_backward(gy, window, preact, x, w, *args)
    assert all(t.dtype == dtype for t in first)
    assert all(torch.equal(a, c) for a, c in zip(first, again))


@pytest.mark.parametrize("case", [0, 1])
def test_encoder_nan_wins(case):
    x, w, b, stride, padding, pool = encoder_case(ENCODER_CASES[case], torch.float64, seed=4)
    x[0, 0, 2, 3] = float("nan")
    for act in ["relu", "leaky_relu", None]:
        pooled, window, preact = emulate_encoder(x, w, b, stride, padding, pool, act)
        y, idx, z = encoder_reference(x, w, b, stride, padding, pool, act)
        assert torch.equal(window_to_flat(window, pool, z.shape[-1]), idx)
        torch.testing.assert_close(pooled, y, equal_nan=True)
        assert pooled.isnan().any()


@pytest.mark.parametrize("cin", [2, 64])  # direct kernel and vendor conv + epilogue
def test_encoder_minus_inf_window_keeps_offset_zero_preactivation(cin):
    """A window whose activations are all -inf stores offset 0 and z at offset 0 (not 0): the
    leaky_relu backward then scales by the slope, as on the CPU (issue 13)."""
    x = torch.randn(1, cin, 6, 6, dtype=torch.float64)
    x[:, :, :2, :2] = float("-inf")
    w = torch.rand(3, cin, 1, 1, dtype=torch.float64) + 0.1  # positive: the conv stays -inf there
    b = torch.zeros(3, dtype=torch.float64)
    for act in ["leaky_relu", None]:
        pooled, window, preact = emulate_encoder(x, w, b, 1, 0, (2, 2), act)
        assert (window[:, :, 0, 0] == 0).all()
        assert (preact[:, :, 0, 0] == float("-inf")).all()
        cpu = ops.conv_pool2d_forward(x, w, b, [1, 1], [0, 0], ACT_CODES[act], SLOPE, [2, 2])
        assert torch.equal(window, cpu[1])
        torch.testing.assert_close(preact, cpu[2])  # same values; the sum order differs in the last bit
        gy = torch.ones_like(pooled)
        args = ([1, 1], [0, 0], ACT_CODES[act], SLOPE, [2, 2], "none", 0.0, 0, 0.0, 1.0, BIG)
        emu = ops.emulate_cuda_conv_pool2d_backward(gy, window, preact, x, w, *args)
        ref = ops.conv_pool2d_backward(gy, cpu[1], cpu[2], x, w, *args[:-1])
        # grad_x: gz = slope (leaky_relu at z = -inf) times the weights. (grad_w multiplies -inf
        # inputs: a dense GEMM, like eager, makes 0 * -inf = NaN where the CPU's sparse gather skips.)
        torch.testing.assert_close(emu[0], ref[0])
        assert emu[0].isfinite().all()


@pytest.mark.parametrize("kind", ["gaussian", "masking", "salt_pepper"])
@pytest.mark.parametrize("case", [0, 1])
def test_encoder_corruption_in_the_load(kind, case):
    """Forward and weight gradient read corrupt(x) from the seed: equal to the clean op on
    aefast.corrupt(x) (same seed), on both the direct and the vendor-conv path."""
    x, w, b, stride, padding, pool = encoder_case(ENCODER_CASES[case], torch.float32, seed=8)
    seed, level = 1234, 0.3
    xc = ops.corrupt(x, seed, kind, level, 0.0, 1.0)
    got = emulate_encoder(x, w, b, stride, padding, pool, "relu", TINY, kind, level, seed)
    want = emulate_encoder(xc, w, b, stride, padding, pool, "relu", BIG)
    torch.testing.assert_close(got[0], want[0], **TOLERANCES[torch.float32])
    assert torch.equal(got[1], want[1])
    y, idx, z = encoder_reference(xc.double(), w.double(), b.double(), stride, padding, pool, "relu")
    torch.testing.assert_close(got[0].double(), y, **TOLERANCES[torch.float32])
    gy = torch.randn(y.shape)
    common = ([stride] * 2, [padding] * 2, ACT_CODES["relu"], SLOPE, pool)
    g_noisy = ops.emulate_cuda_conv_pool2d_backward(gy, got[1], got[2], x, w, *common, kind, level, seed, 0.0, 1.0, TINY)
    g_clean = ops.emulate_cuda_conv_pool2d_backward(gy, want[1], want[2], xc, w, *common, "none", 0.0, 0, 0.0, 1.0, BIG)
    for a, c in zip(g_noisy, g_clean):
        torch.testing.assert_close(a, c, **TOLERANCES[torch.float32])


# ------------------------------------------------------------------ drop-in max_pool2d

POOL_GEOMS = [
    dict(kernel_size=2, stride=2),
    dict(kernel_size=3, stride=2, padding=1),           # overlapping windows: duplicates add up
    dict(kernel_size=3, stride=1, dilation=2, ceil_mode=True),
    dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), ceil_mode=True),
]


def pool_args(geom):
    pair = lambda v: list(v) if isinstance(v, tuple) else [v, v]  # noqa: E731
    k = pair(geom["kernel_size"])
    return (k, pair(geom.get("stride", k)), pair(geom.get("padding", 0)), pair(geom.get("dilation", 1)),
            geom.get("ceil_mode", False))


@pytest.mark.parametrize("geom", POOL_GEOMS)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_max_pool2d_forward(geom, channels_last, dtype):
    x = torch.randn(2, 3, 9, 7).round().to(dtype)  # ties: the first maximum wins
    x[0, 1, 4, 3] = float("nan")  # NaN wins
    x[1, 2] = float("-inf")  # a plane of -inf: the window's first position
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y, idx = ops.emulate_cuda_max_pool2d_forward(x, *pool_args(geom))
    ry, ridx = F.max_pool2d(x, return_indices=True, **geom)
    assert torch.equal(idx, ridx)
    torch.testing.assert_close(y, ry, rtol=0, atol=0, equal_nan=True)
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last


@pytest.mark.parametrize("geom", POOL_GEOMS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_max_pool2d_backward_planes(geom, channels_last):
    x = torch.randn(2, 3, 9, 7, dtype=torch.float64).round()  # ties
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    xr = x.clone().requires_grad_()
    y, idx = F.max_pool2d(xr, return_indices=True, **geom)
    gy = torch.randn(y.shape, dtype=torch.float64)
    y.backward(gy)
    got = ops.emulate_cuda_max_pool2d_backward(gy, idx, x)
    torch.testing.assert_close(got, xr.grad, rtol=1e-12, atol=1e-12)
    assert got.is_contiguous(memory_format=torch.channels_last) == channels_last
    assert torch.equal(got, ops.emulate_cuda_max_pool2d_backward(gy, idx, x))


def test_max_pool2d_backward_rejects_bad_indices_and_shapes():
    x = torch.randn(2, 3, 6, 6)
    y, idx = F.max_pool2d(x, 2, return_indices=True)
    bad = idx.clone()
    bad[1, 2, 0, 0] = 36
    with pytest.raises(RuntimeError, match="outside"):
        ops.emulate_cuda_max_pool2d_backward(torch.ones_like(y), bad, x)
    bad[1, 2, 0, 0] = -1
    with pytest.raises(RuntimeError, match="outside"):
        ops.emulate_cuda_max_pool2d_backward(torch.ones_like(y), bad, x)
    with pytest.raises(RuntimeError, match="batch and channels"):
        ops.emulate_cuda_max_pool2d_backward(torch.ones(2, 2, 3, 3), idx[:, :2], x)


# ------------------------------------------------------------------ on a GPU: the real kernels

@pytest.fixture
def no_tf32():
    """fp32 comparisons with eager-precision results: cuDNN and cuBLAS without TF32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("fmt", ["flat", "window"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", ["leaky_relu", "gelu"])
@pytest.mark.usefixtures("no_tf32")
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA_BACKEND, reason="no CUDA backend here")
def test_cuda_decoder_matches_emulation_and_is_reproducible(fmt, dtype, act):
    z, idx, w, b, unpooled, pool, stride, padding, op = decoder_case(DECODER_CASES[0], dtype, seed=9)
    index = idx if fmt == "flat" else to_window(idx, z.shape[-2:], pool, unpooled[1])
    args = (pool, unpooled, [stride] * 2, [padding] * 2, [op] * 2, act, SLOPE)
    out, pre = ops.emulate_cuda_unpool_conv_transpose2d(z, index, w, b, *args, BIG)
    dev = [t.cuda() for t in (z, index, w, b)]
    out_c, pre_c = ops.unpool_conv_transpose2d(*dev, *args)
    torch.testing.assert_close(out_c.cpu(), out, **TOLERANCES[dtype])
    gy = torch.randn(out.shape).to(dtype).cuda()
    first = ops.unpool_conv_transpose2d_backward(gy, pre_c, dev[0], dev[1], dev[2], *args, [True] * 3)
    again = ops.unpool_conv_transpose2d_backward(gy, pre_c, dev[0], dev[1], dev[2], *args, [True] * 3)
    assert all(torch.equal(a, c) for a, c in zip(first, again))
    emu = ops.emulate_cuda_unpool_conv_transpose2d_backward(gy.cpu(), pre_c.cpu(), z, index, w, *args, [True] * 3, BIG)
    for a, c in zip(first, emu):
        torch.testing.assert_close(a.cpu(), c, **TOLERANCES[dtype])


@pytest.mark.parametrize("case", [0, 1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.usefixtures("no_tf32")
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA_BACKEND, reason="no CUDA backend here")
def test_cuda_encoder_matches_emulation_and_is_reproducible(case, dtype):
    x, w, b, stride, padding, pool = encoder_case(ENCODER_CASES[case], dtype, seed=10)
    common = ([stride] * 2, [padding] * 2, ACT_CODES["relu"], SLOPE, pool)
    emu = emulate_encoder(x, w, b, stride, padding, pool, "relu")
    xc, wc, bc = x.cuda(), w.cuda(), b.cuda()
    got = ops.conv_pool2d_forward(xc, wc, bc, *common, "none", 0.0, 0, 0.0, 1.0)
    torch.testing.assert_close(got[0].cpu(), emu[0], **TOLERANCES[dtype])
    gy = torch.randn(got[0].shape).to(dtype).cuda()
    first = ops.conv_pool2d_backward(gy, got[1], got[2], xc, wc, *common, "masking", 0.2, 3, 0.0, 1.0)
    again = ops.conv_pool2d_backward(gy, got[1], got[2], xc, wc, *common, "masking", 0.2, 3, 0.0, 1.0)
    assert all(torch.equal(a, c) for a, c in zip(first, again))
    ref = ops.emulate_cuda_conv_pool2d_backward(gy.cpu(), got[1].cpu(), got[2].cpu(), x, w, *common, "masking", 0.2, 3,
                                                0.0, 1.0, BIG)
    for a, c in zip(first, ref):
        torch.testing.assert_close(a.cpu(), c, **TOLERANCES[dtype])


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA_BACKEND, reason="no CUDA backend here")
def test_cuda_max_pool2d_backward_is_reproducible():
    x = torch.randn(4, 8, 33, 31, device="cuda")
    y, idx = F.max_pool2d(x, 3, 2, 1, return_indices=True)
    gy = torch.randn_like(y)
    a = ops.max_pool2d_backward(gy, idx, x)
    assert torch.equal(a, ops.max_pool2d_backward(gy, idx, x))
    torch.testing.assert_close(a.cpu(), ops.emulate_cuda_max_pool2d_backward(gy.cpu(), idx.cpu(), x.cpu()))


# ------------------------------------------------------------------ upsampler (conv_transpose_act2d)

UPSAMPLER_CASES = [
    # n, cin, cout, hw, k, stride, padding, output_padding
    (2, 3, 5, (4, 5), 2, 2, 0, 0),
    (1, 17, 3, (3, 3), 3, 2, 1, 1),
    (3, 4, 1, (5, 2), 4, 3, 1, 2),
]


def upsampler_case(case, dtype, seed=0):
    n, cin, cout, hw, k, stride, padding, op = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, *hw, generator=g, dtype=torch.float64)
    w = torch.randn(cin, cout, k, k, generator=g, dtype=torch.float64) * 0.3
    b = torch.randn(cout, generator=g, dtype=torch.float64)
    return x.to(dtype), w.to(dtype), b.to(dtype), [stride] * 2, [padding] * 2, [op] * 2


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("case", range(len(UPSAMPLER_CASES)))
def test_upsampler_forward_and_backward(act, case):
    """conv_transpose_act2d's CUDA host code (vendor conv, bias+act body, gpre body, vendor backward)."""
    x, w, b, s, p, op = upsampler_case(UPSAMPLER_CASES[case], torch.float32, seed=case)
    out, saved = ops.emulate_cuda_conv_transpose_act2d(x, w, b, s, p, op, act, SLOPE)
    xr, wr, br = (t.double().requires_grad_() for t in (x, w, b))
    ref = act_fn(F.conv_transpose2d(xr, wr, br, s, p, op), act)
    torch.testing.assert_close(out.double(), ref.detach(), **TOLERANCES[torch.float32])
    assert saved.numel() == (out.numel() if act in ("leaky_relu", "gelu", "silu") else 0)
    gy = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ref.backward(gy)
    gx, gw, gb = ops.emulate_cuda_conv_transpose_act2d_backward(gy.float(), saved if saved.numel() else out, x, w, s,
                                                                p, op, act, SLOPE, [True, True, True])
    tol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gx.double(), xr.grad, **tol)
    torch.testing.assert_close(gw.double(), wr.grad, **tol)
    torch.testing.assert_close(gb.double(), br.grad, **tol)
    part = ops.emulate_cuda_conv_transpose_act2d_backward(gy.float(), saved if saved.numel() else out, x, w, s, p, op,
                                                          act, SLOPE, [False, True, False])
    torch.testing.assert_close(part[1], gw, rtol=0, atol=0)
    assert not part[0].any() and not part[2].any()


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_upsampler_dtypes_and_no_bias(dtype):
    x, w, b, s, p, op = upsampler_case(UPSAMPLER_CASES[1], dtype, seed=3)
    out, pre = ops.emulate_cuda_conv_transpose_act2d(x, w, None, s, p, op, "gelu", SLOPE)
    ref = act_fn(F.conv_transpose2d(x.double(), w.double(), None, s, p, op), "gelu")
    torch.testing.assert_close(out.double(), ref, **TOLERANCES[dtype])
    # the CPU backend's own kernels agree with the CUDA host code
    out_cpu, pre_cpu = ops.conv_transpose_act2d(x, w, None, s, p, op, "gelu", SLOPE)
    torch.testing.assert_close(out_cpu, out, **TOLERANCES[dtype])
    torch.testing.assert_close(pre_cpu, pre, **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", ["relu", "leaky_relu", "sigmoid"])
@pytest.mark.usefixtures("no_tf32")
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA_BACKEND, reason="no CUDA backend here")
def test_cuda_upsampler_matches_emulation(dtype, act):
    x, w, b, s, p, op = upsampler_case(UPSAMPLER_CASES[1], dtype, seed=9)
    out, saved = ops.emulate_cuda_conv_transpose_act2d(x, w, b, s, p, op, act, SLOPE)
    out_c, saved_c = ops.conv_transpose_act2d(x.cuda(), w.cuda(), b.cuda(), s, p, op, act, SLOPE)
    torch.testing.assert_close(out_c.cpu(), out, **TOLERANCES[dtype])
    a = saved_c if saved_c.numel() else out_c
    gy = torch.randn(out.shape).to(dtype).cuda()
    got = ops.conv_transpose_act2d_backward(gy, a, x.cuda(), w.cuda(), s, p, op, act, SLOPE, [True] * 3)
    emu = ops.emulate_cuda_conv_transpose_act2d_backward(gy.cpu(), a.cpu(), x, w, s, p, op, act, SLOPE, [True] * 3)
    for g, e in zip(got, emu):
        torch.testing.assert_close(g.cpu(), e, **TOLERANCES[dtype])
