"""The two CPU speed paths FCN-8s' optimized training step takes (issue 16, acceptance 3):

* conv_pool2d's eager autograd entry (csrc/conv_pool_autograd.cpp): the C++ backward node gives the
  registered formula's gradients (every needed-gradient subset, every activation, pools with stride
  != size and ceil_mode, channels-last), refuses double backward and in-place changes of the saved
  window offsets, leaves the formula to torch.compile, and builds no graph when nothing needs a
  gradient;
* conv_transpose_act2d's sub-pixel GEMM form for large-stride upsamplers, inside the op's CPU kernels
  (csrc/cpu/conv_transpose_gemm.cpp, rule conv_transpose_form): torch's ConvTranspose2d -> act in
  values and all gradients (padding, output_padding, kernels not a multiple of the stride,
  rectangular, odd sizes, batch 1, 1/3/17 channels, both layouts, fp32/fp64, fp64 gradcheck; fp16/bf16
  on oneDNN against the reference twin), opcheck, torch.compile(fullgraph=True), the rule and its
  switch, and the same entry serving conv_bn_pool2d's grad_input.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import aefast
from aefast import functional as AF
from conftest import TOLERANCES, formula_path

ACTS = [None, "relu", "leaky_relu", "sigmoid", "tanh", "gelu", "silu"]


# ------------------------------------------------------------------ conv_pool2d's C++ autograd entry

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
        want, want_idx, want_grads, y_formula = formula_path(lambda: _encoder_grads(x, w, b, needs, kwargs))
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
SUBPIXEL_GRID = [
    (2, 4, 4, (12, 12), 16, 8, 0, 0),             # FCN-8s' upscore8
    (2, 4, 4, (12, 12), 16, 8, 4, 0),             # ... with its crop as padding
    (1, 17, 3, (3, 5), 32, 16, 8, 0),             # FCN-32s-like, padded, batch 1, 17 channels
    (2, 3, 2, (4, 3), 12, 8, 2, 3),               # kernel not a multiple of the stride, output_padding
    (2, 2, 3, (1, 1), 8, 8, 0, 0),                # 1x1 input, one tap per phase
    (1, 3, 2, (3, 4), (17, 20), (8, 9), (1, 2), (1, 0)),  # rectangular everything, odd sizes
    (2, 1, 1, (5, 7), 16, 8, 3, 7),               # 1 channel; output_padding past the taps (more phase rows)
    (3, 17, 1, (3, 3), 4, 2, 1, 1),               # stride 2 (FCN's upscore2 kind), 17 -> 1
    (2, 3, 17, (5, 4), 3, 2, 1, 1),               # k3 s2 p1 op1 (the VAE's), taps padded to 4
    (1, 3, 5, (4, 5), 3, 1, 1, 0),                # stride 1: the plain im2col GEMM
]


def _paths(fn):
    """The "aefast path: conv_transpose_act2d..." labels fn's op calls name in the profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name[len("aefast path: "):] for e in prof.events()
            if e.name.startswith("aefast path: conv_transpose_act2d")}


def _upsampler_case(case, dtype, seed=11):
    n, ci, co, hw, k, s, p, op = case
    g = torch.Generator().manual_seed(seed)
    k2 = (k, k) if isinstance(k, int) else k
    x = torch.randn(n, ci, *hw, generator=g, dtype=torch.float64)
    w = torch.randn(ci, co, *k2, generator=g, dtype=torch.float64) / (ci * k2[0] * k2[1]) ** 0.5
    b = torch.randn(co, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (x, w, b)], (s, p, op)


@pytest.mark.parametrize("case", SUBPIXEL_GRID)
@pytest.mark.parametrize("act", ["relu", None, "gelu"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_subpixel_form_matches_torch(case, act, channels_last, dtype, monkeypatch):
    """The sub-pixel GEMM form (csrc/cpu/conv_transpose_gemm.cpp), forced, forward and backward:
    torch's ConvTranspose2d -> act in values and all three gradients, the layout kept."""
    monkeypatch.setenv("AEFAST_CONV_TRANSPOSE_GEMM", "subpixel")
    monkeypatch.setenv("AEFAST_CONV_TRANSPOSE_FORWARD", "vendor")  # not the gather kernel for C_out <= 4
    (x, w, b), (s, p, op) = _upsampler_case(case, torch.float64)
    want = _torch_upsampler(x, w, b, s, p, op, act)
    grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    refs = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    _torch_upsampler(*refs, s, p, op, act).backward(grad)
    leaves = [t.to(dtype).requires_grad_() for t in (x, w, b)]
    xin = leaves[0].contiguous(memory_format=torch.channels_last) if channels_last else leaves[0]
    got = []

    def run():
        with aefast.set_backend("cpu"):
            got.append(AF.conv_transpose_act2d(xin, leaves[1], leaves[2], s, p, op, activation=act))
        got[0].backward(grad.to(dtype))

    assert _paths(run) == {"conv_transpose_act2d sub-pixel gemm", "conv_transpose_act2d_backward sub-pixel gemm"}
    tol = TOLERANCES[dtype]
    assert got[0].shape == want.shape
    # channels-last in, channels-last out (a tensor that is both layouts at once is taken as NCHW)
    assert (got[0].stride(1) == 1 and got[0].shape[1] > 1) == (channels_last and x.shape[1] > 1 and
                                                               x.shape[2] * x.shape[3] > 1 and got[0].shape[1] > 1)
    torch.testing.assert_close(got[0].double(), want, **tol)
    for a, e in zip(leaves, refs):
        scale = max(1.0, e.grad.abs().max().item())
        torch.testing.assert_close(a.grad.double(), e.grad, rtol=tol["rtol"], atol=tol["atol"] * scale)


def test_subpixel_form_gradcheck_fp64(monkeypatch):
    monkeypatch.setenv("AEFAST_CONV_TRANSPOSE_FORWARD", "vendor")
    g = torch.Generator().manual_seed(12)
    x = torch.randn(1, 2, 3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, 10, 9, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    fn = lambda x, w, b: AF.conv_transpose_act2d(x, w, b, 8, (1, 0), (0, 1), activation="tanh")  # noqa: E731
    with aefast.set_backend("cpu"):
        assert _paths(lambda: fn(x, w, b).sum().backward()) == {
            "conv_transpose_act2d sub-pixel gemm", "conv_transpose_act2d_backward sub-pixel gemm"}
        assert torch.autograd.gradcheck(fn, (x, w, b))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [SUBPIXEL_GRID[1], SUBPIXEL_GRID[6]])
def test_large_stride_low_precision(dtype, case):
    """fp16 / bf16 stay on oneDNN (the rule serves fp32 / fp64): the op against the reference twin."""
    (x, w, b), (s, p, op) = _upsampler_case(case, dtype, seed=13)
    with aefast.set_backend("cpu"):
        got = AF.conv_transpose_act2d(x, w, b, s, p, op, activation="sigmoid")
        assert "conv_transpose_act2d onednn" in _paths(lambda: AF.conv_transpose_act2d(x, w, b, s, p, op))
    with aefast.set_backend("reference"):
        want = AF.conv_transpose_act2d(x.double(), w.double(), b.double(), s, p, op, activation="sigmoid")
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), want, **TOLERANCES[dtype])


def test_large_stride_rule():
    """The one rule (conv_transpose_form): fp32 strides >= 4 take the sub-pixel form both ways, the
    FCN's stride-2 upsamplers the col2im form forward; AEFAST_CONV_TRANSPOSE_GEMM forces a form."""
    x, w = torch.randn(2, 4, 12, 12), torch.randn(4, 4, 16, 16)
    ops = torch.ops.aefast

    def both(x, w, s):
        out, _ = ops.conv_transpose_act2d(x, w, None, [s, s], [0, 0], [0, 0], None, 0.0)
        ops.conv_transpose_act2d_backward(torch.randn(out.shape, dtype=out.dtype), out, x, w, [s, s], [0, 0], [0, 0],
                                          None, 0.0, [True, True, False])

    assert _paths(lambda: both(x, w, 8)) == {"conv_transpose_act2d sub-pixel gemm",
                                             "conv_transpose_act2d_backward sub-pixel gemm"}
    assert _paths(lambda: both(x.double(), w.double(), 8)) == {"conv_transpose_act2d sub-pixel gemm",
                                                               "conv_transpose_act2d_backward sub-pixel gemm"}
    assert _paths(lambda: both(x.bfloat16(), w.bfloat16(), 8)) == {"conv_transpose_act2d onednn",
                                                                   "conv_transpose_act2d_backward onednn"}
    x2, w2 = torch.randn(16, 8, 6, 6), torch.randn(8, 8, 4, 4)
    assert _paths(lambda: both(x2, w2, 2)) == {"conv_transpose_act2d gemm + col2im",
                                               "conv_transpose_act2d_backward onednn"}


def test_gemm_form_switch(monkeypatch):
    x, w = torch.randn(2, 4, 6, 6), torch.randn(4, 8, 4, 4)
    ops = torch.ops.aefast
    run = lambda: ops.conv_transpose_act2d(x, w, None, [2, 2], [1, 1], [0, 0], None, 0.0)  # noqa: E731
    want = F.conv_transpose2d(x, w, None, 2, 1)
    for mode, path in (("subpixel", "sub-pixel gemm"), ("always", "gemm + col2im"), ("never", "onednn")):
        monkeypatch.setenv("AEFAST_CONV_TRANSPOSE_GEMM", mode)
        assert _paths(run) == {f"conv_transpose_act2d {path}"}
        torch.testing.assert_close(run()[0], want, **TOLERANCES[torch.float32])
    monkeypatch.setenv("AEFAST_CONV_TRANSPOSE_GEMM", "sometimes")
    with pytest.raises(RuntimeError, match="AEFAST_CONV_TRANSPOSE_GEMM must be"):
        run()


@pytest.mark.parametrize("mode", ["subpixel", "auto"])
def test_subpixel_opcheck(mode, monkeypatch):
    monkeypatch.setenv("AEFAST_CONV_TRANSPOSE_GEMM", mode)
    g = torch.Generator().manual_seed(15)
    x = torch.randn(2, 3, 5, 4, generator=g, requires_grad=True)
    w = torch.randn(3, 2, 16, 16, generator=g, requires_grad=True)
    b = torch.randn(2, generator=g, requires_grad=True)
    for xin in (x, x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()):
        torch.library.opcheck(torch.ops.aefast.conv_transpose_act2d.default,
                              (xin, w, b, [8, 8], [4, 4], [1, 0], "leaky_relu", 0.2))


def test_subpixel_serves_conv_grad_input(monkeypatch):
    """The same entry (conv_transpose_gemm) makes conv_bn_pool2d's grad_input: forced to the
    sub-pixel form, a stride-1 and a stride-2 conv's input gradient is still torch's."""
    monkeypatch.setenv("AEFAST_CONV_TRANSPOSE_GEMM", "subpixel")
    g = torch.Generator().manual_seed(16)
    for stride in (1, 2):
        x = torch.randn(2, 3, 9, 7, generator=g, dtype=torch.float64, requires_grad=True)
        w = torch.randn(5, 3, 3, 3, generator=g, dtype=torch.float64)
        gamma, beta = torch.rand(5, generator=g, dtype=torch.float64) + 0.5, torch.randn(5, generator=g,
                                                                                          dtype=torch.float64)
        with aefast.set_backend("cpu"):
            y = AF.conv_bn_pool2d(x, w, None, gamma, beta, None, None, stride=stride, padding=1, pool_size=2)[0]
        (gx,) = torch.autograd.grad(y.sum(), x)
        xr = x.detach().clone().requires_grad_()
        with aefast.set_backend("reference"):
            yr = AF.conv_bn_pool2d(xr, w, None, gamma, beta, None, None, stride=stride, padding=1, pool_size=2)[0]
        (gxr,) = torch.autograd.grad(yr.sum(), xr)
        torch.testing.assert_close(y, yr, **TOLERANCES[torch.float64])
        torch.testing.assert_close(gx, gxr, **TOLERANCES[torch.float64])


def test_large_stride_compiles_fullgraph():
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


# ------------------------------------------------------------------ an upsampler's crop as padding

# (input hw, kernel, stride, padding, output_padding, rows, cols, folds)
CROPS = [
    ((12, 12), 16, 8, 0, 0, slice(4, 100), slice(4, 100), True),     # FCN-8s' upscore8 crop
    ((3, 3), 4, 2, 0, 0, slice(1, 7), slice(1, 7), True),            # upscore2's
    ((5, 7), 16, 8, 1, 0, slice(3, 44), slice(2, None), True),        # asymmetric: output_padding 1 / 2
    ((5, 4), 3, 2, 1, 1, slice(1, -1), slice(None, -1), True),        # open and negative ends
    ((5, 4), 3, 2, 0, 0, slice(0, 5), slice(None), False),           # would need output_padding >= stride
    ((4, 4), 4, 2, 0, 0, slice(1, 9, 2), slice(1, 9), False),         # a step
    ((4, 4), 4, 2, 0, 0, slice(5, 3), slice(1, 9), False),            # empty
]


@pytest.mark.parametrize("case", CROPS)
def test_cropped_upsampler_equals_op_then_slice(case):
    hw, k, s, p, op, rows, cols, folds = case
    g = torch.Generator().manual_seed(17)
    x = torch.randn(2, 3, *hw, generator=g, dtype=torch.float64)
    w = torch.randn(3, 5, k, k, generator=g, dtype=torch.float64) / (3 * k * k) ** 0.5
    b = torch.randn(5, generator=g, dtype=torch.float64)
    leaves = [[t.clone().requires_grad_() for t in (x, w, b)] for _ in range(2)]
    with aefast.set_backend("cpu"):
        got = AF.conv_transpose_act2d_cropped(*leaves[0], s, p, op, rows, cols, "leaky_relu", 0.2)
        want = AF.conv_transpose_act2d(*leaves[1], s, p, op, activation="leaky_relu",
                                       negative_slope=0.2)[:, :, rows, cols]
    assert got.shape == want.shape
    # folded: the op's own output (no slice after it, so no zero-filled full map in the backward)
    assert (got.grad_fn.name() == "aefast::ConvTransposeAct2DBackward") == folds
    torch.testing.assert_close(got, want, **TOLERANCES[torch.float64])
    if got.numel():
        grad = torch.randn(got.shape, generator=g, dtype=torch.float64)
        got.backward(grad)
        want.backward(grad)
        for a, e in zip(*leaves):
            torch.testing.assert_close(a.grad, e.grad, **TOLERANCES[torch.float64])


def test_optimize_folds_an_upsamplers_crop(monkeypatch):
    class Upscore(torch.nn.Module):  # FCN's last layer: stride-8 ConvTranspose2d, cropped to the input size
        def __init__(self):
            super().__init__()
            self.score = torch.nn.Conv2d(3, 4, 1)
            self.up = torch.nn.ConvTranspose2d(4, 4, 16, stride=8, bias=False)

        def forward(self, x):
            h = self.up(self.score(torch.nn.functional.max_pool2d(x, 8, ceil_mode=True)))
            return h[:, :, 4:4 + x.size(2), 4:4 + x.size(3)].contiguous()

    model = Upscore()
    calls, original = [], AF.conv_transpose_act2d_cropped
    monkeypatch.setattr(AF, "conv_transpose_act2d_cropped", lambda *a, **k: calls.append(k) or original(*a, **k))
    opt = aefast.optimize(Upscore(), verbose=False)
    opt.load_state_dict(model.state_dict())
    assert any("conv_transpose_act2d <- up" in r and "crop" in r for r in opt.aefast_rewrites)

    x = torch.rand(2, 3, 40, 37)
    y, y_opt = model(x), opt(x)
    assert calls and all(k["contiguous_output"] for k in calls)  # .contiguous() follows the crop
    torch.testing.assert_close(y_opt, y, **TOLERANCES[torch.float32])
    y.square().sum().backward()
    y_opt.square().sum().backward()
    for a, e in zip(opt.parameters(), model.parameters()):
        torch.testing.assert_close(a.grad, e.grad, rtol=1e-4, atol=1e-5)
    assert torch.compile(opt, fullgraph=True, backend="aot_eager")(x).shape == y.shape


@pytest.mark.parametrize("case", [CROPS[0], CROPS[4]])
def test_cropped_upsampler_contiguous_output(case):
    """contiguous_output (optimize: the crop is then made .contiguous()): channels-last operands are
    taken as NCHW, so a folded crop comes out contiguous; values and gradients unchanged."""
    hw, k, s, p, op, rows, cols, folds = case
    g = torch.Generator().manual_seed(18)
    x = torch.randn(2, 4, *hw, generator=g).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(4, 4, k, k, generator=g) / (4 * k * k) ** 0.5).contiguous(memory_format=torch.channels_last)
    leaves = [[t.clone().requires_grad_() for t in (x, w)] for _ in range(2)]
    with aefast.set_backend("cpu"):
        got = AF.conv_transpose_act2d_cropped(*leaves[0], None, s, p, op, rows, cols, contiguous_output=True)
        want = AF.conv_transpose_act2d(*leaves[1], None, s, p, op)[:, :, rows, cols].contiguous()
    # folded: the op's own NCHW output; else a slice of it (the caller's .contiguous() copies the crop)
    assert got.is_contiguous() if folds else got.stride(3) == 1
    torch.testing.assert_close(got, want, **TOLERANCES[torch.float32])
    grad = torch.randn(got.shape, generator=g)
    got.backward(grad)
    want.backward(grad)
    for a, e in zip(*leaves):
        torch.testing.assert_close(a.grad, e.grad, rtol=1e-4, atol=1e-5)
