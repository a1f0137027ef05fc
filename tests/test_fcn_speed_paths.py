"""The two CPU speed paths FCN-8s' optimized training step takes (issue 16, acceptance 3):

* conv_pool2d's eager autograd entry (csrc/conv_pool_autograd.cpp): the C++ backward node gives the
  registered formula's gradients (every needed-gradient subset, every activation, pools with stride
  != size and ceil_mode, channels-last), refuses double backward and in-place changes of the saved
  window offsets, leaves the formula to torch.compile, and builds no graph when nothing needs a
  gradient;
* conv_transpose_act2d's GEMM route for large-stride upsamplers (aefast.functional,
  upsampler_runs_as_gemm / _conv_transpose_as_gemm): torch's ConvTranspose2d -> act in values and
  gradients (padding, output_padding, kernels not a multiple of the stride, rectangular, odd sizes,
  batch 1, 3 and 17 channels, both layouts, fp64 gradcheck, fp16/bf16), torch.compile(fullgraph=True),
  and the rule that picks it (cpu backend only).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import aefast
from aefast import functional as AF
from conftest import TOLERANCES

ACTS = [None, "relu", "leaky_relu", "sigmoid", "tanh", "gelu", "silu"]


# ------------------------------------------------------------------ conv_pool2d's C++ autograd entry

def _formula_path(fn):
    """Run ``fn`` with the registered (Python) formula: the entry serves only plain eager calls."""
    from aefast.ops import _registry

    original = _registry.eager_autograd_entry_serves
    _registry.eager_autograd_entry_serves = lambda *tensors: False
    try:
        return fn()
    finally:
        _registry.eager_autograd_entry_serves = original


def _encoder_case(seed, cin=3, cout=17, hw=(9, 11), k=3, channels_last=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cin, *hw, generator=g, dtype=dtype)
    w = torch.randn(cout, cin, k, k, generator=g, dtype=dtype) / (cin * k * k) ** 0.5
    b = torch.randn(cout, generator=g, dtype=dtype)
    if channels_last:
        x, w = (t.contiguous(memory_format=torch.channels_last) for t in (x, w))
    return x, w, b


def _encoder_grads(x, w, b, needs, kwargs, seed=7):
    leaves = [t.detach().clone().requires_grad_(need) for t, need in zip((x, w, b), needs)]
    y, idx = AF.conv_pool2d(leaves[0], leaves[1], leaves[2], **kwargs)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    y.backward(g)
    return y.detach(), idx, [t.grad for t in leaves], y


ENCODER_KWARGS = [
    dict(stride=1, padding=1, activation="relu", pool_size=2),
    dict(stride=(1, 2), padding=(0, 1), activation="leaky_relu", pool_size=(2, 3), negative_slope=0.2),
    dict(stride=1, padding=1, activation="gelu", pool_size=3, pool_stride=2),  # overlapping windows
    dict(stride=1, padding=1, activation="relu", pool_size=2, ceil_mode=True),  # 9x11: clipped windows
    dict(stride=1, padding=1, activation="silu", pool_size=2, index_format="window"),
]


@pytest.mark.parametrize("kwargs", ENCODER_KWARGS)
@pytest.mark.parametrize("needs", [(True, True, True), (True, False, False), (False, True, False),
                                   (False, False, True), (True, False, True)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_conv_pool_entry_matches_formula(kwargs, needs, channels_last):
    x, w, b = _encoder_case(1, channels_last=channels_last)
    with aefast.set_backend("cpu"):
        got, got_idx, got_grads, y = _encoder_grads(x, w, b, needs, kwargs)
        want, want_idx, want_grads, y_formula = _formula_path(lambda: _encoder_grads(x, w, b, needs, kwargs))
    assert y.grad_fn.name() == "aefast::ConvPool2DBackward"
    assert y_formula.grad_fn.name() != "aefast::ConvPool2DBackward"
    assert torch.equal(got_idx, want_idx)
    assert torch.equal(got, want)  # the same forward kernel
    assert got.stride() == want.stride()
    for a, e, need in zip(got_grads, want_grads, needs):
        assert (a is None) == (not need)
        if need:
            torch.testing.assert_close(a, e, rtol=0, atol=0)  # the same backward kernels


@pytest.mark.parametrize("act", ACTS)
def test_conv_pool_entry_matches_torch(act):
    """Against torch's conv -> act -> max_pool2d, values, indices and all three gradients."""
    x, w, b = _encoder_case(2, cin=3, cout=4, hw=(8, 7))
    with aefast.set_backend("cpu"):
        got, idx, grads, _ = _encoder_grads(x, w, b, (True, True, True),
                                            dict(stride=1, padding=1, activation=act, pool_size=2))
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    z = F.conv2d(leaves[0], leaves[1], leaves[2], 1, 1)
    a = {None: lambda t: t, "leaky_relu": lambda t: F.leaky_relu(t, 0.01)}.get(act, getattr(F, act or "relu"))(z)
    want, want_idx = F.max_pool2d(a, 2, return_indices=True)
    want.backward(torch.randn(want.shape, generator=torch.Generator().manual_seed(7)))
    assert torch.equal(idx, want_idx)
    torch.testing.assert_close(got, want.detach(), **TOLERANCES[torch.float32])
    for g, leaf in zip(grads, leaves):
        torch.testing.assert_close(g, leaf.grad, **TOLERANCES[torch.float32])


def test_conv_pool_entry_gradcheck_fp64():
    x, w, b = (t.double().requires_grad_() for t in _encoder_case(3, cin=2, cout=3, hw=(6, 5)))
    with aefast.set_backend("cpu"):
        fn = lambda x, w, b: AF.conv_pool2d(x, w, b, 1, 1, "tanh", 2, ceil_mode=True)[0]  # noqa: E731
        assert fn(x, w, b).grad_fn.name() == "aefast::ConvPool2DBackward"
        assert torch.autograd.gradcheck(fn, (x, w, b))


def test_conv_pool_entry_no_graph_without_grad_and_refusals():
    x, w, b = _encoder_case(4)
    with aefast.set_backend("cpu"):
        y, idx = AF.conv_pool2d(x, w, b, 1, 1)
        assert y.grad_fn is None and not y.requires_grad and not idx.requires_grad
        wl = w.clone().requires_grad_()
        y, idx = AF.conv_pool2d(x, wl, b, 1, 1)
        assert y.requires_grad and not idx.requires_grad
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(y.sum(), wl, create_graph=True)
        with torch.no_grad():
            assert AF.conv_pool2d(x, wl, b, 1, 1)[0].grad_fn is None
        # The window offsets are saved for the backward: changing them in place is caught.
        y, win = AF.conv_pool2d(x, wl, b, 1, 1, index_format="window")
        win.zero_()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()


def test_conv_pool_entry_leaves_torch_compile_to_the_formula():
    """Under torch.compile the registered formula serves (the entry is eager-only); same gradients."""
    x, w, b = _encoder_case(5, cin=2, cout=3, hw=(6, 6))

    def loss(w):
        return AF.conv_pool2d(x, w, b, 1, 1, "relu", 2, return_indices=False).square().sum()

    with aefast.set_backend("cpu"):
        wc = w.clone().requires_grad_()
        torch.compile(loss, fullgraph=True, backend="aot_eager")(wc).backward()
        we = w.clone().requires_grad_()
        loss(we).backward()
    torch.testing.assert_close(wc.grad, we.grad, **TOLERANCES[torch.float32])


# ------------------------------------------------------------------ conv_transpose_act2d's GEMM route

def _torch_upsampler(x, w, b, stride, padding, output_padding, act, slope=0.01):
    y = F.conv_transpose2d(x, w, b, stride, padding, output_padding)
    if act is None:
        return y
    return F.leaky_relu(y, slope) if act == "leaky_relu" else getattr(F, act)(y)


# (n, c_in, c_out, hw, kernel, stride, padding, output_padding)
GEMM_GRID = [
    (2, 4, 4, (12, 12), 16, 8, 0, 0),             # FCN-8s' upscore8
    (1, 17, 3, (3, 5), 32, 16, 8, 0),             # FCN-32s-like, padded, batch 1, 17 channels
    (2, 3, 2, (4, 3), 12, 8, 2, 3),               # kernel not a multiple of the stride, output_padding
    (2, 2, 3, (1, 1), 8, 8, 0, 0),                # 1x1 input, one tap per phase
    (1, 3, 2, (3, 4), (17, 20), (8, 9), (1, 2), (1, 0)),  # rectangular everything, odd sizes
]


@pytest.mark.parametrize("case", GEMM_GRID)
@pytest.mark.parametrize("act", ["relu", None])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gemm_upsampler_matches_torch(case, act, channels_last):
    n, ci, co, hw, k, s, p, op = case
    g = torch.Generator().manual_seed(11)
    k2, s2, p2, op2 = ((v, v) if isinstance(v, int) else v for v in (k, s, p, op))
    x = torch.randn(n, ci, *hw, generator=g, dtype=torch.float64)
    w = torch.randn(ci, co, *k2, generator=g, dtype=torch.float64) / (ci * k2[0] * k2[1]) ** 0.5
    b = torch.randn(co, generator=g, dtype=torch.float64)
    assert AF.upsampler_runs_as_gemm(x, w, s2, p2, op2)
    want = _torch_upsampler(x, w, b, s, p, op, act)
    leaves = [t.float().requires_grad_() for t in (x, w, b)]
    xin = leaves[0].contiguous(memory_format=torch.channels_last) if channels_last else leaves[0]
    with aefast.set_backend("cpu"):
        got = AF.conv_transpose_act2d(xin, leaves[1], leaves[2], s, p, op, activation=act)
    assert got.shape == want.shape
    # channels-last in, channels-last out (a 1x1 input is both layouts at once, taken as NCHW)
    assert (got.stride(1) == 1) == (channels_last and hw != (1, 1))
    torch.testing.assert_close(got.double(), want, **TOLERANCES[torch.float32])
    grad = torch.randn(want.shape, generator=g, dtype=torch.float64)
    got.backward(grad.float())
    refs = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    _torch_upsampler(*refs, s, p, op, act).backward(grad)
    for a, e in zip(leaves, refs):
        scale = max(1.0, e.grad.abs().max().item())
        torch.testing.assert_close(a.grad.double(), e.grad, rtol=1e-5, atol=1e-5 * scale)


def test_gemm_upsampler_gradcheck_fp64():
    g = torch.Generator().manual_seed(12)
    x = torch.randn(1, 2, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, 10, 9, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    assert AF.upsampler_runs_as_gemm(x, w, (8, 8), (1, 0), (0, 1))
    with aefast.set_backend("cpu"):
        assert torch.autograd.gradcheck(
            lambda x, w, b: AF.conv_transpose_act2d(x, w, b, 8, (1, 0), (0, 1), activation="tanh"), (x, w, b))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gemm_upsampler_low_precision(dtype):
    g = torch.Generator().manual_seed(13)
    x = torch.randn(2, 3, 3, 4, generator=g)
    w = torch.randn(3, 2, 16, 16, generator=g) / 24
    with aefast.set_backend("cpu"):
        got = AF.conv_transpose_act2d(x.to(dtype), w.to(dtype), None, 8, activation="sigmoid")
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), _torch_upsampler(x.double(), w.double(), None, 8, 0, 0, "sigmoid"),
                               **TOLERANCES[dtype])


def test_gemm_upsampler_rule():
    x, w = torch.randn(1, 4, 6, 6), torch.randn(4, 4, 16, 16)
    assert AF.upsampler_runs_as_gemm(x, w, (8, 8), (0, 0), (0, 0))
    assert not AF.upsampler_runs_as_gemm(x, torch.randn(4, 4, 8, 8), (4, 4), (0, 0), (0, 0))  # small stride
    assert not AF.upsampler_runs_as_gemm(x, w, (8, 4), (0, 0), (0, 0))
    # kernel 16 + output_padding 7 - padding 0 > 16: the uncropped map would be too short
    assert not AF.upsampler_runs_as_gemm(x, torch.randn(4, 4, 16, 16), (8, 8), (0, 0), (7, 7))
    with aefast.set_backend("cpu"):  # ... so that call takes the op, and is still torch's result
        got = AF.conv_transpose_act2d(x, w, None, 8, 0, 7)
    torch.testing.assert_close(got, F.conv_transpose2d(x, w, None, 8, 0, 7), **TOLERANCES[torch.float32])


def test_gemm_upsampler_compiles_fullgraph():
    g = torch.Generator().manual_seed(14)
    x = torch.randn(2, 4, 5, 5, generator=g)
    w = torch.randn(4, 3, 16, 16, generator=g, requires_grad=True)

    def fn(x, w):
        return AF.conv_transpose_act2d(x, w, None, 8, 0, 0, activation="relu")[:, :, 4:-4, 4:-4].sum()

    with aefast.set_backend("cpu"):
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
        got = compiled(x, w)
        (gw,) = torch.autograd.grad(got, w)
        want = fn(x, w)
        (ww,) = torch.autograd.grad(want, w)
    torch.testing.assert_close(got, want, **TOLERANCES[torch.float32])
    torch.testing.assert_close(gw, ww, **TOLERANCES[torch.float32])


def test_gemm_upsampler_is_the_cpu_backends_only():
    """Other backends run their own kernels for every stride (the rule is about oneDNN's)."""
    x, w = torch.randn(1, 2, 3, 3), torch.randn(2, 2, 16, 16)
    calls = []
    original = AF._conv_transpose_as_gemm
    AF._conv_transpose_as_gemm = lambda *a: calls.append(a) or original(*a)
    try:
        with aefast.set_backend("reference"):
            want = AF.conv_transpose_act2d(x, w, None, 8)
        assert not calls
        with aefast.set_backend("cpu"):
            got = AF.conv_transpose_act2d(x, w, None, 8)
        assert len(calls) == 1
    finally:
        AF._conv_transpose_as_gemm = original
    torch.testing.assert_close(got, want, **TOLERANCES[torch.float32])
