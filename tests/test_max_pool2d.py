"""The drop-in aefast.functional.max_pool2d against torch.nn.functional.max_pool2d: values,
indices (bit for bit), gradients, NaN propagation, first-max ties, channels_last, dtypes."""
import pytest
import torch
import torch.nn.functional as F

import aefast
import aefast.functional as AF
from aefast import backend as _backend
from conftest import backend_device

GRID = [(k, s, p, d, c)
        for k in (1, 2, 3, (2, 3))
        for s in (None, 1, 2)
        for p in (0, 1)
        for d in (1, 2)
        for c in (False, True)
        if all(pp <= kk // 2 for pp, kk in zip((p, p), (k, k) if isinstance(k, int) else k))]


def _check(x, **kw):
    out, idx = AF.max_pool2d(x, return_indices=True, **kw)
    rout, ridx = F.max_pool2d(x, return_indices=True, **kw)
    assert torch.equal(idx, ridx), f"indices differ at {(idx != ridx).nonzero()[:5].tolist()}"
    torch.testing.assert_close(out, rout, rtol=0, atol=0, equal_nan=True)
    assert out.stride() == rout.stride() and idx.stride() == ridx.stride()
    return out, rout


@pytest.mark.parametrize("kernel,stride,padding,dilation,ceil_mode", GRID)
def test_grid_matches_torch(backend, kernel, stride, padding, dilation, ceil_mode):
    device = backend_device(backend)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 9, 8, generator=g).to(device).requires_grad_()
    kw = dict(kernel_size=kernel, stride=stride, padding=padding, dilation=dilation, ceil_mode=ceil_mode)
    out, rout = _check(x, **kw)
    grad = torch.randn(out.shape, generator=g).to(device)
    got, = torch.autograd.grad(out, x, grad)
    want, = torch.autograd.grad(rout, x, grad)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_nan_and_ties(backend, channels_last):
    device = backend_device(backend)
    g = torch.Generator().manual_seed(1)
    # Small integers: many exact ties (first max wins); NaNs: the last NaN of a window wins.
    x = torch.randint(-2, 3, (2, 4, 7, 9), generator=g).float()
    nan_mask = torch.rand(x.shape, generator=g) < 0.15
    x[nan_mask] = float("nan")
    x[0, 0, :3, :3] = float("-inf")  # an all -inf window reports its first element
    x = x.to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    for kw in (dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
               dict(kernel_size=3, stride=1, dilation=2)):
        _check(x, **kw)


def test_channels_last_output_and_grad(backend):
    device = backend_device(backend)
    x = torch.randn(2, 5, 8, 7, device=device).contiguous(memory_format=torch.channels_last).requires_grad_()
    out, rout = _check(x, kernel_size=2, stride=2)
    assert out.is_contiguous(memory_format=torch.channels_last)
    got, = torch.autograd.grad(out.sum(), x)
    want, = torch.autograd.grad(rout.sum(), x)
    if backend != "reference":  # the reference twin's autograd (pad/unfold) returns an NCHW grad
        assert got.stride() == want.stride()
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.uint8],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_dtypes(backend, dtype):
    device = backend_device(backend)
    x = (torch.randn(2, 3, 7, 6) * 50).to(dtype).to(device)
    _check(x, kernel_size=3, stride=2, padding=1)
    if backend == "triton" and not dtype.is_floating_point:
        assert any("max_pool2d" in k for k in aefast.info()["fallbacks"]), "integer Triton calls must be counted"


def test_three_dim_input(backend):
    x = torch.randn(3, 7, 7, device=backend_device(backend))
    out, idx = AF.max_pool2d(x, 2, return_indices=True)
    rout, ridx = F.max_pool2d(x, 2, return_indices=True)
    assert out.shape == rout.shape == (3, 3, 3)
    assert torch.equal(idx, ridx) and torch.equal(out, rout)
    assert torch.equal(AF.max_pool2d(x, 3, 1, 1), F.max_pool2d(x, 3, 1, 1))


def test_gradcheck_fp64_cpu():
    x = torch.randn(2, 2, 7, 6, dtype=torch.float64, requires_grad=True)
    with aefast.set_backend("cpu"):
        assert torch.autograd.gradcheck(lambda t: AF.max_pool2d(t, 3, 2, 1, 1, True), (x,))
        assert torch.autograd.gradcheck(lambda t: AF.max_pool2d(t, (2, 3), 1, 0, 2), (x,))


def _namespaces():
    out = [pytest.param("aefast", id="aefast")]
    ok, why = _backend.availability()["triton"]
    out.append(pytest.param("aefast_triton", id="aefast_triton", marks=pytest.mark.skipif(not ok, reason=why)))
    return out


@pytest.mark.parametrize("ns", _namespaces())
def test_opcheck(ns):
    ops = getattr(torch.ops, ns)
    x = torch.randn(2, 3, 7, 6, requires_grad=True)
    torch.library.opcheck(ops.max_pool2d_forward.default, (x, [3, 3], [2, 2], [1, 1], [1, 1], True))
    xc = torch.randn(2, 3, 7, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
    torch.library.opcheck(ops.max_pool2d_forward.default, (xc, [2, 2], [2, 2], [0, 0], [1, 1], False))
    out, idx = torch.ops.aefast.max_pool2d_forward(x.detach(), [2, 2], [2, 2], [0, 0], [1, 1], False)
    torch.library.opcheck(ops.max_pool2d_backward.default, (torch.randn_like(out), idx, x.detach()))


def test_bad_inputs():
    x = torch.randn(1, 2, 5, 5)
    with pytest.raises(ValueError, match="padding should be at most half"):
        AF.max_pool2d(x, 2, padding=2)
    with pytest.raises(ValueError, match="too small"):
        AF.max_pool2d(x, 7)
    with pytest.raises(ValueError, match="kernel_size must be >= 1"):
        AF.max_pool2d(x, 0)
    with pytest.raises(TypeError, match="dtype"):
        AF.max_pool2d(x.bool(), 2)
    with pytest.raises(TypeError, match="torch.Tensor"):
        AF.max_pool2d(x.numpy(), 2)
    with pytest.raises(ValueError, match="3-D or 4-D"):
        AF.max_pool2d(x[0, 0], 2)
    with pytest.raises(ValueError, match="non-empty"):
        AF.max_pool2d(torch.randn(1, 0, 5, 5), 2)


def test_torch_compile_fullgraph_cpu():
    x = torch.randn(2, 3, 9, 8, requires_grad=True)
    with aefast.set_backend("cpu"):
        out, idx = torch.compile(lambda t: AF.max_pool2d(t, 3, 2, 1, ceil_mode=True, return_indices=True),
                                 fullgraph=True)(x)
        got, = torch.autograd.grad(out.sum(), x)
    rout, ridx = F.max_pool2d(x, 3, 2, 1, ceil_mode=True, return_indices=True)
    want, = torch.autograd.grad(rout.sum(), x)
    assert torch.equal(idx, ridx) and torch.equal(out, rout)
    torch.testing.assert_close(got, want)
