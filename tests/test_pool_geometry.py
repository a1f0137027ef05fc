"""The encoder blocks' pool beyond the non-overlapping floor-mode tiling: ``ceil_mode`` and
``pool_stride != pool_size`` (overlapping or gapped windows), for conv_pool2d and conv_bn_pool2d.

The spec is torch's ``F.max_pool2d(act(conv), pool_size, pool_stride, ceil_mode=...)`` on the
activation of the conv output: output size (with the "last window starts inside" rule), values,
indices (first maximum in row-major order, NaN wins), and the true derivative, which sums the
gradient of every window whose maximum a position is.
"""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import aefast
import aefast.functional as AF
import aefast.reference.functional as RF
from aefast import backend as _backend
from aefast.ops.conv_pool import is_tiling_pool, pooled_size
from conftest import TOLERANCES, TRITON_INTERPRETED, aefast_strides_cross_checked, backend_device, backend_grid
from test_conv_pool import ACTS, NEAR_TIE, make, torch_act

# (pool, pool_stride, ceil_mode): FCN-8s's 2/2 ceil pools, AlexNet-style 3/2, gapped 2/3.
GEOMETRIES = [((2, 2), (2, 2), True), ((3, 3), (2, 2), False), ((3, 3), (2, 2), True), ((2, 2), (1, 1), False),
              ((3, 2), (2, 3), True), ((2, 2), (3, 3), False)]
GEO_IDS = [f"k{k[0]}x{k[1]}-s{s[0]}x{s[1]}-{'ceil' if c else 'floor'}" for k, s, c in GEOMETRIES]


def eager(x, w, b, stride, padding, act, pool, pool_stride, ceil_mode, slope=0.01):
    a = torch_act(act, slope)(F.conv2d(x, w, b, stride, padding))
    return F.max_pool2d(a, pool, pool_stride, ceil_mode=ceil_mode, return_indices=True)


def check_indices(idx, ridx, a):
    differ = idx != ridx
    if not differ.any():
        return
    a = a.flatten(2)
    ours = a.gather(2, idx.flatten(2))[differ.flatten(2)].double()
    theirs = a.gather(2, ridx.flatten(2))[differ.flatten(2)].double()
    gap = (ours - theirs).abs() / theirs.abs().clamp_min(1.0)
    assert gap.max() <= NEAR_TIE[a.dtype], f"indices differ at {differ.nonzero()[:5].tolist()}"


def routed_grads(x, w, b, stride, padding, act, idx, grad, slope=0.01):
    """fp64 gradients of the pooled values selected by ``idx`` (gather's backward sums positions
    named by several windows: the true derivative with overlapping windows)."""
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if b is not None else None
    a = torch_act(act, slope)(F.conv2d(x64, w64, b64, stride, padding))
    pooled = a.flatten(2).gather(2, idx.flatten(2)).view(idx.shape)
    return torch.autograd.grad(pooled, [x64, w64] + ([b64] if b is not None else []), grad.double())


def check_case(x, w, b, stride, padding, act, pool, pool_stride, ceil_mode, *, slope=0.01, grad_tol=None):
    y, idx = AF.conv_pool2d(x, w, b, stride, padding, act, pool, negative_slope=slope, pool_stride=pool_stride,
                            ceil_mode=ceil_mode)
    ry, ridx = eager(x, w, b, stride, padding, act, pool, pool_stride, ceil_mode, slope)
    assert idx.dtype == torch.int64 and idx.shape == ridx.shape and y.shape == ry.shape
    with torch.no_grad():
        check_indices(idx, ridx, torch_act(act, slope)(F.conv2d(x, w, b, stride, padding)))
    tol = TOLERANCES[x.dtype]
    torch.testing.assert_close(y, ry, **tol)
    # window offsets are the same maxima, inside windows pool_stride apart
    _, win = AF.conv_pool2d(x, w, b, stride, padding, act, pool, index_format="window", negative_slope=slope,
                            pool_stride=pool_stride, ceil_mode=ceil_mode)
    conv_hw = F.conv2d(x.detach(), w.detach(), None, stride, padding).shape[-2:]
    assert torch.equal(AF.window_to_flat(win, conv_hw, pool, pool_stride), idx)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype).to(y.device)
    inputs = [x, w] + ([b] if b is not None else [])
    got = torch.autograd.grad(y, inputs, grad)
    want = routed_grads(x, w, b, stride, padding, act, idx, grad, slope)
    gtol = grad_tol or tol
    for name, g_, r_ in zip(("input", "weight", "bias"), got, want):
        scale = max(1.0, r_.abs().max().item())
        torch.testing.assert_close(g_.double(), r_, rtol=gtol["rtol"], atol=gtol["atol"] * scale,
                                   msg=lambda m: f"grad_{name}: {m}")


def test_pooled_size_is_torchs_rule():
    for conv in range(3, 15):
        for k in (2, 3):
            for s in (1, 2, 3):
                for ceil in (False, True):
                    want = F.max_pool2d(torch.zeros(1, 1, conv, conv), k, s, ceil_mode=ceil).shape[-1]
                    assert pooled_size((conv, conv), (k, k), (s, s), ceil) == (want, want)
    # 7 -> ceil(5/2)+1 = 4 windows, the last clipped: not the tiling; 8 gives no clipped window.
    assert not is_tiling_pool((7, 7), (2, 2), (2, 2), True) and is_tiling_pool((8, 8), (2, 2), (2, 2), True)
    assert not is_tiling_pool((8, 8), (3, 3), (2, 2), False)


# The Triton interpreter (~10-30 s a case) runs each geometry at one of the two sizes: the ceil and
# the floor geometries each meet both sizes (the size is no kernel constexpr: the same specializations).
_HWS = [(7, 7), (13, 9)]
MATCH_CASES = [(hw, *geo) for hw in _HWS for geo in GEOMETRIES]
MATCH_CASES_INTERPRETED = [(_HWS[(i // 2) % 2], *geo) for i, geo in enumerate(GEOMETRIES)]


@pytest.mark.parametrize("backend,hw,pool,pool_stride,ceil_mode",
                         backend_grid(MATCH_CASES, MATCH_CASES_INTERPRETED,
                                      lambda c: f"{c[0][0]}x{c[0][1]}-" + GEO_IDS[GEOMETRIES.index(c[1:])]),
                         indirect=["backend"])
def test_matches_torch(backend, pool, pool_stride, ceil_mode, hw):
    # odd H/W where ceil_mode adds a clipped window; channels 3 -> 17, batch 1; 3x3 conv, pad 1
    x, w, b = make(1, 3, 17, *hw, 3, torch.float32, backend_device(backend), seed=sum(hw) + pool[0])
    check_case(x, w, b, 1, 1, "relu", pool, pool_stride, ceil_mode)


# The Triton interpreter (~15 s a case) runs three activations (piecewise-linear with ties, with a slope,
# smooth); every activation's kernels (the same specializations: pool 3, stride-independent) run under it
# in test_conv_pool.py's grid, and the pool geometry's in test_matches_torch.
ACT_CASES_INTERPRETED = [(act,) for act in ("relu", "leaky_relu", "gelu")]


@pytest.mark.parametrize("backend,act", backend_grid([(a,) for a in ACTS], ACT_CASES_INTERPRETED, lambda c: str(c[0])),
                         indirect=["backend"])
def test_activations_overlap_and_ceil(backend, act):
    x, w, b = make(2, 17, 3, 9, 11, 3, torch.float32, backend_device(backend), seed=3)
    check_case(x, w, b, (1, 2), 0, act, 3, 2, True)


DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_dtypes_and_layouts(backend, dtype, channels_last):
    x, w, b = make(2, 3, 5, 13, 9, 3, dtype, backend_device(backend), seed=7)
    if channels_last:
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    grad_tol = {torch.float16: dict(rtol=2e-2, atol=2e-2), torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}.get(dtype)
    geometries = [((2, 2), (2, 2), True), ((3, 3), (2, 2), False)]
    if backend == "triton" and TRITON_INTERPRETED and (DTYPES.index(dtype) + channels_last) % 2:
        # The interpreter (~8 s a geometry) runs the ceil geometry in every dtype with one layout, the
        # layouts alternating; the specializations skipped here (pool 2 with fp32/fp16 channels_last,
        # fp64/bf16 NCHW) are launched by test_conv_pool.py's test_dtypes and test_channels_last_input.
        geometries = geometries[1:]
    for pool, pool_stride, ceil_mode in geometries:
        check_case(x, w, b, 1, 1, "relu", pool, pool_stride, ceil_mode, grad_tol=grad_tol)
    y = AF.conv_pool2d(x, w, b, 1, 1, "relu", 3, False, pool_stride=2, ceil_mode=True)
    assert y.is_contiguous(memory_format=torch.channels_last) == channels_last


def test_overlap_gradient_sums_over_windows_and_nan_propagates():
    # A 1x1 identity conv makes the activation the input: the center of a 3x3 input is the max of
    # all four overlapping 2x2 windows (stride 1), so it receives the sum of their gradients.
    x = torch.tensor([[[[0.0, 1.0, 0.0], [1.0, 9.0, 1.0], [0.0, 1.0, 0.0]]]], requires_grad=True)
    w = torch.ones(1, 1, 1, 1)
    for name in ("cpu", "reference"):
        with aefast.set_backend(name):
            y, idx = AF.conv_pool2d(x, w, None, 1, 0, None, 2, pool_stride=1)
            assert idx.flatten().tolist() == [4, 4, 4, 4]
            (gx,) = torch.autograd.grad(y, x, torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]]))
            assert gx[0, 0, 1, 1].item() == 10.0 and gx.sum().item() == 10.0
            xn = x.detach().clone()
            xn[0, 0, 2, 2] = float("nan")
            yn, idxn = AF.conv_pool2d(xn, w, None, 1, 0, None, 2, pool_stride=1, ceil_mode=True)
            ry, ridx = F.max_pool2d(xn, 2, 1, ceil_mode=True, return_indices=True)
            assert torch.equal(idxn, ridx) and torch.equal(yn.isnan(), ry.isnan())


def test_gradcheck_fp64_cpu():
    x, w, b = make(2, 3, 4, 7, 9, 3, torch.float64, "cpu", seed=5)
    with aefast.set_backend("cpu"):
        for pool, pool_stride, ceil_mode in GEOMETRIES:
            assert torch.autograd.gradcheck(
                lambda x, w, b: AF.conv_pool2d(x, w, b, 1, 1, "tanh", pool, negative_slope=0.01,
                                               pool_stride=pool_stride, ceil_mode=ceil_mode)[0], (x, w, b))


def test_backward_is_deterministic():
    # Run to run at one thread count: the sum over overlapping windows is in a fixed order per
    # plane; the conv backward is the vendor's (oneDNN), whose reduction order may follow the
    # thread count, so bitwise equality ACROSS thread counts is not promised for these pools.
    x, w, b = make(2, 4, 6, 15, 13, 3, torch.float32, "cpu", seed=11)
    with aefast.set_backend("cpu"):
        runs = []
        for _ in range(3):
            y, _ = AF.conv_pool2d(x, w, b, 1, 1, "relu", 3, pool_stride=1, ceil_mode=True)
            runs.append(torch.autograd.grad(y, (x, w, b), torch.ones_like(y)))
    for other in runs[1:]:
        assert all(torch.equal(a, c) for a, c in zip(runs[0], other))


def test_opcheck_general_pool():
    x, w, b = make(2, 3, 4, 9, 8, 3, torch.float32, "cpu", seed=2)
    x, w, b = x.detach(), w.detach(), b.detach()
    ops = torch.ops.aefast
    for pool_stride, ceil_mode in (([2, 2], True), ([1, 1], False), ([1, 2], True)):
        geo = dict(pool_stride=pool_stride, ceil_mode=ceil_mode)
        fwd = (x, w, b, [1, 1], [0, 0], 5, 0.01, [2, 3])
        torch.library.opcheck(ops.conv_pool2d_forward.default, fwd, geo)
        pooled, window, preact = ops.conv_pool2d_forward(*fwd, **geo)
        grad = torch.randn_like(pooled)
        torch.library.opcheck(ops.conv_pool2d_backward_input.default,
                              (grad, window, preact, w, [9, 8], [1, 1], [0, 0], 5, 0.01, [2, 3]), geo)
        torch.library.opcheck(ops.conv_pool2d_backward_weight.default,
                              (grad, window, preact, x, [3, 3], [1, 1], [0, 0], 5, 0.01, [2, 3]), geo)
        torch.library.opcheck(ops.conv_pool2d_backward.default,
                              (grad, window, preact, x, w, [1, 1], [0, 0], 5, 0.01, [2, 3]), geo)


def test_triton_serves_the_general_pool_and_cuda_falls_back_counted():
    # triton has kernels for every pool: no fallback
    ok, why = _backend.availability()["triton"]
    if ok:
        x, w, b = make(1, 3, 4, 7, 7, 3, torch.float32, backend_device("triton"), seed=1)
        with aefast.set_backend("triton"):
            _backend.reset_fallback_counts()
            AF.conv_pool2d(x, w, b, 1, 0, "relu", 2, ceil_mode=True)  # 5x5 conv: a clipped window
            AF.conv_pool2d(x, w, b, 1, 1, "relu", 3, pool_stride=2)
            assert _backend.fallback_counts() == {}
    # the cuda backend's rule (it cannot run here; its bodies are emulated below): stride = pool
    # (ceil_mode included) is its own, other strides fall back
    ceil = AF._general_pool_unsupported((7, 7), (2, 2), (2, 2), True)
    overlap = AF._general_pool_unsupported((8, 8), (3, 3), (2, 2), False)
    assert ceil("cuda") is None and overlap("cpu") is None and overlap("triton") is None
    assert overlap("cuda") == "no cuda kernel for pool_stride != pool_size yet"


def test_bad_pool_arguments():
    x, w, b = make(1, 3, 4, 7, 7, 3, torch.float32, "cpu", seed=1)
    with pytest.raises(ValueError, match="pool_stride"):
        AF.conv_pool2d(x, w, b, 1, 1, "relu", 2, pool_stride=0)
    with pytest.raises(TypeError, match="ceil_mode"):
        AF.conv_pool2d(x, w, b, 1, 1, "relu", 2, ceil_mode="yes")
    with pytest.raises(ValueError, match="larger than the conv output"):
        AF.conv_pool2d(x, w, b, 1, 0, "relu", 6, pool_stride=1, ceil_mode=True)


# ------------------------------------------------------------------ the decoder and these indices

def test_decoder_takes_the_pool_stride_or_refuses():
    x, w, b = make(1, 3, 4, 9, 9, 3, torch.float32, "cpu", seed=4)
    wd = torch.randn(4, 2, 3, 3)
    with aefast.set_backend("cpu"):
        y, flat = AF.conv_pool2d(x, w, b, 1, 1, "relu", 3, pool_stride=2)
        _, win = AF.conv_pool2d(x, w, b, 1, 1, "relu", 3, index_format="window", pool_stride=2)
        # the same result from either index format, told the stride; = the reference composition
        want = F.conv_transpose2d(F.max_unpool2d(y, flat, 3, 2, output_size=(9, 9)), wd, None, 1, 1)
        for idx, fmt in ((flat, "flat"), (win, "window")):
            got = AF.unpool_conv_transpose2d(y, idx, wd, None, 3, (9, 9), 1, 1, index_format=fmt, pool_stride=2)
            torch.testing.assert_close(got, want)
        # not told: window offsets of an overlapping pool are refused; flat ones do not fit a
        # non-overlapping pool's plane (9x9 is no 3/3 unpool size of 4x4) or its windows
        with pytest.raises(ValueError, match="pool_stride=\\(2, 2\\)"):
            AF.unpool_conv_transpose2d(y, win, wd, None, 3, (9, 9), 1, 1, index_format="window")
        with pytest.raises(ValueError, match="output_size"):
            AF.unpool_conv_transpose2d(y, flat, wd, None, 3, (9, 9), 1, 1)
        with pytest.raises(ValueError, match="not inside its own pool window"):
            AF.unpool_conv_transpose2d(y, flat, wd, None, 3, None, 1, 1)
        # ceil_mode with stride = pool: the fused decoder takes the encoder's indices as they are
        yc, ic = AF.conv_pool2d(x, w, b, 1, 1, "relu", 2, index_format="window", ceil_mode=True)
        assert yc.shape[-2:] == (5, 5)
        got = AF.unpool_conv_transpose2d(yc, ic, wd, None, 2, (9, 9), 1, 1, index_format="window")
        ref_flat = AF.window_to_flat(ic, (9, 9), 2)
        want = F.conv_transpose2d(F.max_unpool2d(yc, ref_flat, 2, output_size=(9, 9)), wd, None, 1, 1)
        torch.testing.assert_close(got, want)


# ------------------------------------------------------------------ conv_bn_pool2d

def _bn_case(backend, dtype, pool, pool_stride, ceil_mode, channels_last=False, hw=(13, 9)):
    device = backend_device(backend)
    x, w, b = make(2, 3, 5, *hw, 3, dtype, device, seed=9)
    if channels_last:
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    gamma = (torch.rand(5, generator=torch.Generator().manual_seed(2)) + 0.5).to(dtype).to(device).requires_grad_()
    beta = torch.randn(5, generator=torch.Generator().manual_seed(3)).to(dtype).to(device).requires_grad_()
    rm, rv = torch.zeros(5, dtype=dtype, device=device), torch.ones(5, dtype=dtype, device=device)
    rm2, rv2 = rm.clone(), rv.clone()
    y, idx = AF.conv_bn_pool2d(x, w, b, gamma, beta, rm, rv, True, 0.1, 1e-5, 1, 1, "relu", pool,
                               pool_stride=pool_stride, ceil_mode=ceil_mode)
    ry, ridx = RF.conv_bn_pool2d(x, w, b, gamma, beta, rm2, rv2, True, 0.1, 1e-5, 1, 1, "relu", pool,
                                 pool_stride=pool_stride, ceil_mode=ceil_mode)
    # the reference twin itself is torch's max_pool2d of BN(conv) -> relu
    bn = F.batch_norm(F.conv2d(x, w, b, 1, 1), None, None, gamma, beta, True, 0.1, 1e-5)
    ey, eidx = F.max_pool2d(F.relu(bn), pool, pool_stride, ceil_mode=ceil_mode, return_indices=True)
    tol = TOLERANCES[dtype]
    assert y.shape == ry.shape == ey.shape
    torch.testing.assert_close(y, ry, **tol)
    if dtype in (torch.float32, torch.float64):
        assert torch.equal(idx, ridx)
        torch.testing.assert_close(ry, ey, **tol)
    torch.testing.assert_close(rm, rm2, **tol)
    torch.testing.assert_close(rv, rv2, **tol)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(4)).to(dtype).to(device)
    got = torch.autograd.grad(y, (x, w, b, gamma, beta), grad)
    want = torch.autograd.grad(ry, (x, w, b, gamma, beta), grad)
    gtol = {torch.float16: dict(rtol=5e-2, atol=5e-2), torch.bfloat16: dict(rtol=1e-1, atol=1e-1)}.get(dtype, tol)
    for name, g_, r_ in zip(("x", "w", "b", "gamma", "beta"), got, want):
        scale = max(1.0, r_.abs().max().item())
        torch.testing.assert_close(g_.double(), r_.double(), rtol=gtol["rtol"], atol=gtol["atol"] * scale,
                                   msg=lambda m: f"grad_{name}: {m}")


@pytest.mark.parametrize("pool,pool_stride,ceil_mode", GEOMETRIES, ids=GEO_IDS)
def test_conv_bn_pool_matches_reference(backend, pool, pool_stride, ceil_mode):
    _bn_case(backend, torch.float32, pool, pool_stride, ceil_mode, hw=(7, 7))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_conv_bn_pool_dtypes_layouts(dtype, channels_last):
    with aefast.set_backend("cpu"):
        _bn_case("cpu", dtype, (3, 3), (2, 2), True, channels_last)
        _bn_case("cpu", dtype, (2, 2), (2, 2), True, channels_last)


def test_conv_bn_pool_gradcheck_and_opcheck():
    x, w, b = make(2, 3, 4, 7, 6, 3, torch.float64, "cpu", seed=5)
    gamma = torch.rand(4, dtype=torch.float64, requires_grad=True)
    beta = torch.randn(4, dtype=torch.float64, requires_grad=True)
    with aefast.set_backend("cpu"):
        for pool, pool_stride, ceil_mode in ((2, 2, True), (3, 2, False), (2, 1, True)):
            assert torch.autograd.gradcheck(
                lambda x, w, b, g, be: AF.conv_bn_pool2d(x, w, b, g, be, None, None, True, 0.1, 1e-5, 1, 1, "tanh",
                                                         pool, pool_stride=pool_stride, ceil_mode=ceil_mode)[0],
                (x, w, b, gamma, beta))
    xd, wd, bd = x.detach(), w.detach(), b.detach()
    geo = dict(pool_stride=[1, 2], ceil_mode=True)
    fwd = (xd, wd, bd, gamma.detach(), beta.detach(), [1, 1], [1, 1], 1e-5, 1, 0.01, [2, 2])
    torch.library.opcheck(torch.ops.aefast.conv_bn_pool2d_forward.default, fwd, geo)
    pooled, window, conv_out, mean, var = torch.ops.aefast.conv_bn_pool2d_forward(*fwd, **geo)
    torch.library.opcheck(torch.ops.aefast.conv_bn_pool2d_backward.default,
                          (torch.randn_like(pooled), window, conv_out, mean, var, xd, wd, gamma.detach(),
                           beta.detach(), [1, 1], [1, 1], 1e-5, 1, 0.01, [2, 2], [True] * 5), geo)


def test_modules_take_the_pool_geometry():
    torch.manual_seed(0)
    m = aefast.nn.ConvPool2d(3, 4, 3, padding=1, pool_size=3, pool_stride=2, ceil_mode=True)
    x = torch.randn(1, 3, 8, 8)
    y, idx = m(x)
    ry, ridx = F.max_pool2d(F.relu(F.conv2d(x, m.weight, m.bias, 1, 1)), 3, 2, ceil_mode=True, return_indices=True)
    torch.testing.assert_close(y, ry)
    assert torch.equal(idx, ridx)
    bn = aefast.nn.ConvBNPool2d(3, 4, 3, padding=1, pool_size=2, ceil_mode=True)
    assert bn(torch.randn(2, 3, 7, 7))[0].shape == (2, 4, 4, 4)


# ------------------------------------------------------------------ the vectorised CPU kernels per ISA

# The general pools run oneDNN's channels-last conv and the epilogue / scatter kernels of
# csrc/cpu/conv_bn_pool_kernels.inc, built per ISA and picked at run time (AEFAST_CPU_ISA caps the
# choice per call). Channels 64 fill whole vectors; 17 leaves a remainder.
ISAS = ["baseline", "avx2", "avx512"]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("cout", [17, 64], ids=lambda c: f"cout{c}")
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_cpu_isa_variants_general_pool(monkeypatch, isa, cout, channels_last):
    monkeypatch.setenv("AEFAST_CPU_ISA", isa)
    x, w, b = make(2, 5, cout, 11, 10, 3, torch.float32, "cpu", seed=cout)
    if channels_last:
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    with aefast.set_backend("cpu"):
        for pool, pool_stride, ceil_mode in (((2, 2), (2, 2), True), ((3, 3), (2, 2), True), ((2, 3), (1, 2), False)):
            check_case(x, w, b, 1, 1, "silu", pool, pool_stride, ceil_mode)
        for dtype in (torch.float16, torch.bfloat16):
            xh, wh, bh = (t.detach().to(dtype).requires_grad_() for t in (x, w, b))
            check_case(xh, wh, bh, 1, 1, "relu", (3, 3), (2, 2), True, grad_tol=dict(rtol=5e-2, atol=5e-2))
            _bn_case("cpu", dtype, (3, 3), (2, 2), True, channels_last)
        _bn_case("cpu", torch.float32, (3, 3), (1, 2), True, channels_last)


@pytest.mark.parametrize("isa", ISAS)
def test_overlapping_windows_with_ties(monkeypatch, isa):
    # A 1x1 identity conv makes the activation the input. Integer values in {-1, 0, 1, 2} give
    # ties inside every window, and relu ties every non-positive value at 0: the first maximum in
    # row-major order of the FULL window must win, in every overlapping window (3x3 stride 1 and
    # 3x3 stride 2, clipped in ceil_mode), and a position shared by several windows must receive
    # the sum of their gradients.
    monkeypatch.setenv("AEFAST_CPU_ISA", isa)
    g = torch.Generator().manual_seed(4)
    for channels in (1, 19):
        x = torch.randint(-1, 3, (2, channels, 9, 8), generator=g).float()
        w = torch.eye(channels).view(channels, channels, 1, 1)
        for act in ("relu", None):
            for pool_stride, ceil_mode in ((1, False), (2, True), (1, True)):
                xr = x.clone().requires_grad_()
                with aefast.set_backend("cpu"):
                    y, idx = AF.conv_pool2d(xr, w, None, 1, 0, act, 3, pool_stride=pool_stride, ceil_mode=ceil_mode)
                a = F.relu(x) if act == "relu" else x
                ry, ridx = F.max_pool2d(a, 3, pool_stride, ceil_mode=ceil_mode, return_indices=True)
                assert torch.equal(idx, ridx) and torch.equal(y.detach(), ry)
                grad = torch.randn(y.shape, generator=g)
                (gx,) = torch.autograd.grad(y, xr, grad)
                routed = torch.zeros(x.flatten(2).shape).scatter_add_(2, ridx.flatten(2), grad.flatten(2))
                if act == "relu":
                    routed = routed * (x.flatten(2) > 0)
                torch.testing.assert_close(gx, routed.view_as(x), rtol=1e-6, atol=1e-6)


def test_one_channel_input_under_a_one_wide_conv_output():
    # oneDNN's channels-last conv of a 1-channel input gives wrong values when the conv output is
    # 1 wide (torch 2.13: stride (1, 2), width 4, kernel width 3); the general path then runs NCHW.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 1, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    with aefast.set_backend("cpu"):
        check_case(x, w, b, (1, 2), 0, None, (1, 1), (1, 2), False)
        check_case(x, w, b, (1, 2), 0, "relu", (2, 1), (1, 1), True)
        gamma, beta = torch.ones(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
        y, idx = AF.conv_bn_pool2d(x, w, b, gamma, beta, None, None, True, 0.1, 1e-5, (1, 2), 0, None, (2, 1),
                                   pool_stride=(1, 1), ceil_mode=True)
        ry, ridx = RF.conv_bn_pool2d(x, w, b, gamma, beta, None, None, True, 0.1, 1e-5, (1, 2), 0, None, (2, 1),
                                     pool_stride=(1, 1), ceil_mode=True)
    assert torch.equal(idx, ridx)
    torch.testing.assert_close(y, ry)


def test_general_pool_backward_does_not_depend_on_the_thread_count():
    # aefast's own part (the scatter of the pool-sparse gradient, the BatchNorm sums) is in a fixed
    # order: with the conv backward's weight gradient left out, grad_input of the vendor dgrad is
    # compared at 1 and 2 threads on a shared-argmax-heavy pool (3x3 stride 1).
    x, w, b = make(3, 4, 16, 12, 11, 3, torch.float32, "cpu", seed=21)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with aefast.set_backend("cpu"):
                y, _ = AF.conv_pool2d(x, w, b, 1, 1, "relu", 3, pool_stride=1, ceil_mode=True)
                outs.append((y.detach(), torch.autograd.grad(y, x, torch.ones_like(y))[0]))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ hypothesis fuzz

@st.composite
def geometry_cases(draw):
    n, cin, cout = draw(st.integers(1, 2)), draw(st.integers(1, 4)), draw(st.integers(1, 5))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    sh, sw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    ph, pw = draw(st.integers(0, 1)), draw(st.integers(0, 1))
    pool = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    pool_stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    ceil_mode = draw(st.booleans())
    h, w = draw(st.integers(1, 11)), draw(st.integers(1, 11))
    hc, wc = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    assume(h + 2 * ph >= kh and w + 2 * pw >= kw and hc >= pool[0] and wc >= pool[1])
    act = draw(st.sampled_from(ACTS))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return (n, cin, cout, h, w, (kh, kw), (sh, sw), (ph, pw), pool, pool_stride, ceil_mode, act, dtype,
            draw(st.booleans()), draw(st.integers(0, 2**16)))


def _fuzz_one(case, backend_name, channels_last=False):
    n, cin, cout, h, w, k, s, p, pool, pool_stride, ceil_mode, act, dtype, bias, seed = case
    x, wt, b = make(n, cin, cout, h, w, k, dtype, backend_device(backend_name), bias=bias, seed=seed)
    if channels_last:
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    with aefast.set_backend(backend_name):
        check_case(x, wt, b, s, p, act, pool, pool_stride, ceil_mode)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(geometry_cases())
def test_fuzz_cpu(case):
    _fuzz_one(case, "cpu")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(geometry_cases())
def test_fuzz_reference(case):
    _fuzz_one(case, "reference")


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(geometry_cases(), st.booleans())
def test_fuzz_triton(case, channels_last):
    ok, why = _backend.availability()["triton"]
    if not ok:
        pytest.skip(why)
    _fuzz_one(case, "triton", channels_last)


# ------------------------------------------------------------------ aefast.optimize

def test_optimize_fuses_ceil_mode_and_overlapping_pools():
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 4, 3)
            self.bn = nn.BatchNorm2d(8)
            self.pool = nn.MaxPool2d(2, 2, ceil_mode=True)  # FCN-8s's pool

        def forward(self, x):
            h = self.pool(torch.relu(self.c1(x)))
            h = F.max_pool2d(torch.relu(self.bn(self.c2(h))), 3, 2, ceil_mode=True)  # AlexNet-style, with BN
            return F.max_pool2d(torch.tanh(self.c3(h)), 2, stride=1)  # overlapping

    torch.manual_seed(0)
    original = Net()
    model = aefast.optimize(Net(), verbose=False, batch_norm_training=True)
    model.load_state_dict(original.state_dict())
    assert not [r for r in model.aefast_unfused if "max_pool2d" in r or "pool" in r.split(":")[0]], \
        model.aefast_unfused
    assert sum("conv_pool2d" in r or "conv_bn_pool2d" in r for r in model.aefast_rewrites) >= 3
    x = torch.randn(2, 3, 27, 25)
    for training in (True, False):
        original.train(training), model.train(training)
        want, got = original(x), model(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        if training:
            want.square().sum().backward()
            got.square().sum().backward()
            for (name, p), q in zip(original.named_parameters(), model.parameters()):
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
            torch.testing.assert_close(model.bn.running_mean, original.bn.running_mean)
            torch.testing.assert_close(model.bn.running_var, original.bn.running_var)


# ------------------------------------------------------------------ the CUDA bodies, emulated on the CPU

@pytest.mark.parametrize("act", ["relu", "leaky_relu", None, "silu"], ids=str)
@pytest.mark.parametrize("cin", [3, 17, 64], ids=lambda c: f"cin{c}")  # direct body / vendor conv + epilogue
@pytest.mark.parametrize("chunk", [1 << 30, 256], ids=["one_chunk", "tiny_chunks"])
def test_cuda_bodies_ceil_mode(act, cin, chunk):
    """The CUDA encoder bodies with ceil_mode (stride = pool), run on the CPU by the test-only
    emulate ops: values, indices and all three gradients against torch, fp64."""
    x, w, b = make(2, cin, 5, 9, 7, 3, torch.float64, "cpu", seed=cin)
    codes = {None: 0, "relu": 1, "leaky_relu": 2, "silu": 6}
    for pool, stride, padding in (([2, 2], 1, 1), ([3, 2], 1, 0), ([2, 3], 2, 1)):
        out = torch.ops.aefast.emulate_cuda_conv_pool2d_forward(
            x.detach(), w.detach(), b.detach(), [stride] * 2, [padding] * 2, codes[act], 0.01, pool, "none", 0.0, 0,
            0.0, 1.0, chunk, ceil_mode=True)
        pooled, window, preact = out
        xr, wr, br = (t.detach().clone().requires_grad_() for t in (x, w, b))
        y, idx = eager(xr, wr, br, stride, padding, act, pool, pool, True)
        conv_hw = F.conv2d(x.detach(), w.detach(), None, stride, padding).shape[-2:]
        assert pooled.shape == y.shape and not is_tiling_pool(conv_hw, pool, pool, True)  # clipped windows
        assert torch.equal(AF.window_to_flat(window, conv_hw, pool), idx)
        torch.testing.assert_close(pooled, y.detach(), **TOLERANCES[torch.float64])
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        y.backward(gy)
        gx, gw, gb = torch.ops.aefast.emulate_cuda_conv_pool2d_backward(
            gy, window, preact, x.detach(), w.detach(), [stride] * 2, [padding] * 2, codes[act], 0.01, pool, "none",
            0.0, 0, 0.0, 1.0, chunk, ceil_mode=True)
        for got, want in ((gx, xr.grad), (gw, wr.grad), (gb, br.grad)):
            torch.testing.assert_close(got, want, **TOLERANCES[torch.float64])


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(geometry_cases(), st.sampled_from([1 << 30, 512]))
def test_fuzz_cuda_bodies_ceil_mode(case, chunk):
    """The emulated CUDA bodies serve pool stride = pool with either ceil_mode (other strides run
    the reference on the cuda backend): fuzzed against torch."""
    n, cin, cout, h, w, k, s, p, pool, _, ceil_mode, act, dtype, bias, seed = case
    x, wt, b = make(n, cin, cout, h, w, k, torch.float64, "cpu", bias=bias, seed=seed)
    codes = {None: 0, "relu": 1, "leaky_relu": 2, "sigmoid": 3, "tanh": 4, "gelu": 5, "silu": 6}
    pooled, window, preact = torch.ops.aefast.emulate_cuda_conv_pool2d_forward(
        x.detach(), wt.detach(), None if b is None else b.detach(), list(s), list(p), codes[act], 0.01, list(pool),
        "none", 0.0, 0, 0.0, 1.0, chunk, ceil_mode=ceil_mode)
    y, idx = eager(x, wt, b, s, p, act, pool, pool, ceil_mode)
    conv_hw = F.conv2d(x.detach(), wt.detach(), None, s, p).shape[-2:]
    assert torch.equal(AF.window_to_flat(window, conv_hw, pool), idx)
    torch.testing.assert_close(pooled, y.detach(), **TOLERANCES[torch.float64])
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    inputs = [x, wt] + ([b] if b is not None else [])
    want = torch.autograd.grad(y, inputs, gy)
    got = torch.ops.aefast.emulate_cuda_conv_pool2d_backward(
        gy, window, preact, x.detach(), wt.detach(), list(s), list(p), codes[act], 0.01, list(pool), "none", 0.0, 0,
        0.0, 1.0, chunk, ceil_mode=ceil_mode)
    for g_, r_ in zip(got, want):
        torch.testing.assert_close(g_, r_, **TOLERANCES[torch.float64])


# The fake functions must give the CPU kernels' real strides on every pool path (tiling, clipped,
# overlapping) and for every mix of channels_last and NCHW operands, or torch.compile of a model
# run in channels_last (aefast.optimize's layout pass) fails Inductor's stride asserts.
# CrossRefFakeMode runs each aefast op of the forward and the backward on fake tensors too and
# compares shapes, dtypes and strides with the real kernel's outputs.
@pytest.mark.parametrize("op", ["conv_pool2d", "conv_bn_pool2d"])
@pytest.mark.parametrize("geometry", [(8, (2, 2), None, False), (9, (2, 2), None, True), (9, (3, 3), (2, 2), False)],
                         ids=["tiling", "ceil-clipped", "overlapping"])
@pytest.mark.parametrize("layouts", [("nchw", "nchw"), ("nchw", "cl"), ("cl", "nchw"), ("cl", "cl")],
                         ids=lambda l: "x-%s_w-%s" % l)
def test_cpu_fake_strides_match_the_kernels(op, geometry, layouts):
    hw, pool, pool_stride, ceil_mode = geometry
    to = {"nchw": torch.contiguous_format, "cl": torch.channels_last}
    gen = torch.Generator().manual_seed(hw)
    x = torch.randn(2, 16, hw, hw, generator=gen).contiguous(memory_format=to[layouts[0]]).requires_grad_()
    w = torch.randn(8, 16, 3, 3, generator=gen).contiguous(memory_format=to[layouts[1]]).requires_grad_()
    b = torch.randn(8, generator=gen)
    with aefast_strides_cross_checked() as checked:
        if op == "conv_pool2d":
            y = AF.conv_pool2d(x, w, b, padding=1, activation="relu", pool_size=pool, pool_stride=pool_stride,
                               ceil_mode=ceil_mode, return_indices=False)
        else:
            y = AF.conv_bn_pool2d(x, w, b, torch.ones(8), torch.zeros(8), torch.zeros(8), torch.ones(8), True,
                                  padding=1, activation="relu", pool_size=pool, pool_stride=pool_stride,
                                  ceil_mode=ceil_mode, return_indices=False)
        y.backward(torch.randn(y.shape, generator=gen))
    assert any("forward" in name for name in checked) and any("backward" in name for name in checked), checked
