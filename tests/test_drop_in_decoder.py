"""Drop-ins of the decoder family: aefast.functional.max_unpool2d and conv_transpose2d must
match torch.nn.functional over their parameter grids, on every backend."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import aefast
from aefast import backend as _backend
from aefast import functional as AF
from conftest import TOLERANCES, backend_device


@pytest.fixture(autouse=True)
def _ieee_fp32():
    """fp32 convs on a GPU follow torch.backends.cudnn.allow_tf32 (on by default, ~1e-3 error), in
    aefast's Triton kernels as in cuDNN; the fp32 tolerances here are IEEE ones."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = saved


def _unique_per_plane(idx):
    flat = idx.reshape(-1, idx.shape[-2] * idx.shape[-1])
    return all(torch.unique(row).numel() == row.numel() for row in flat)


# (input hw, kernel, stride, padding, give output_size, 3-D)
UNPOOL_GRID = [
    ((6, 6), 2, None, 0, False, False),
    ((7, 9), 2, None, 0, True, False),   # odd sizes through output_size
    ((7, 7), 3, 2, 1, True, False),      # overlapping windows (duplicates possible), padding
    ((8, 5), (2, 3), (1, 2), (1, 1), True, False),
    ((5, 5), 3, 1, 0, True, True),       # stride 1 < kernel, 3-D input
    ((9, 9), 3, 3, 0, False, False),
]


@pytest.mark.parametrize("case", UNPOOL_GRID)
def test_max_unpool2d_matches_torch(backend, case):
    hw, k, s, p, give_size, three_d = case
    dev = backend_device(backend)
    x = torch.randn(2, 3, *hw, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    pooled, idx = F.max_pool2d(x, k, s, p, return_indices=True)
    if three_d:
        pooled, idx = pooled[0], idx[0]
    size = tuple(hw) if give_size else None
    want = F.max_unpool2d(pooled, idx, k, s, p, output_size=size)
    leaf = pooled.clone().to(dev).requires_grad_()
    with aefast.set_backend(backend):
        got = AF.max_unpool2d(leaf, idx.to(dev), k, s, p, output_size=size)
    assert got.shape == want.shape
    torch.testing.assert_close(got.cpu(), want, rtol=0, atol=0)
    g = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (grad,) = torch.autograd.grad(got, leaf, g.to(dev))
    if _unique_per_plane(idx):
        ref_leaf = pooled.clone().requires_grad_()
        (want_grad,) = torch.autograd.grad(F.max_unpool2d(ref_leaf, idx, k, s, p, output_size=size), ref_leaf, g)
    else:
        # torch hands the gradient to every duplicate; the last-wins semantics gives it to the
        # winner only (the overwritten values never reach the output): the reference twin.
        ref_leaf = pooled.clone().requires_grad_()
        with aefast.set_backend("reference"):
            (want_grad,) = torch.autograd.grad(AF.max_unpool2d(ref_leaf, idx, k, s, p, output_size=size), ref_leaf, g)
    torch.testing.assert_close(grad.cpu(), want_grad, rtol=0, atol=0)


def test_max_unpool2d_duplicates_last_wins_everywhere():
    """pytorch#80204: several pooled positions naming one element. Documented behaviour: the
    last one in row-major order wins (value), and only it receives the gradient."""
    x = torch.arange(1.0, 9.0, dtype=torch.float64).reshape(1, 2, 2, 2)
    idx = torch.tensor([[[[5, 0], [5, 5]], [[3, 3], [1, 3]]]])
    want = torch.zeros(1, 2, 9, dtype=torch.float64)
    for c in range(2):
        for p in range(4):  # row-major, later positions overwrite
            want[0, c, idx.view(1, 2, 4)[0, c, p]] = x.view(1, 2, 4)[0, c, p]
    want = want.view(1, 2, 3, 3)
    assert want[0, 0].flatten()[5] == 4.0 and want[0, 1].flatten()[3] == 8.0
    results = {}
    available = [b for b in ("cpu", "triton", "reference", "cuda") if _backend.availability()[b][0]]
    for b in available:
        dev = backend_device(b)
        leaf = x.clone().to(dev).requires_grad_()
        with aefast.set_backend(b):
            y = AF.max_unpool2d(leaf, idx.to(dev), 2, 1, output_size=(3, 3))
        (g,) = torch.autograd.grad(y, leaf, torch.arange(1.0, 19.0, dtype=torch.float64, device=dev).view(1, 2, 3, 3))
        results[b] = (y.cpu(), g.cpu())
        assert torch.equal(y.cpu(), want), b
    grad_want = torch.tensor([[[[0.0, 1.0], [0.0, 6.0]], [[0.0, 0.0], [11.0, 13.0]]]], dtype=torch.float64)
    for b, (_, g) in results.items():
        assert torch.equal(g, grad_want), b


def test_max_unpool2d_bad_inputs(backend):
    dev = backend_device(backend)
    x = torch.randn(1, 1, 2, 2, device=dev)
    idx = torch.zeros(1, 1, 2, 2, dtype=torch.int64, device=dev)
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        AF.max_unpool2d(x, idx + 16, 2)
    with pytest.raises(TypeError, match="indices must have dtype int64"):
        AF.max_unpool2d(x, idx.int(), 2)
    with pytest.raises(ValueError, match="output_size"):
        AF.max_unpool2d(x, idx, 2, output_size=(9, 9))
    with pytest.raises(ValueError, match="indices must have the input"):
        AF.max_unpool2d(x, idx[..., :1], 2)


# (n, c_in, c_out, hw, k, stride, padding, output_padding, groups, dilation, bias, 3-D)
CONVT_GRID = [
    (2, 3, 4, (5, 6), 3, 1, 0, 0, 1, 1, True, False),
    (1, 4, 2, (4, 4), 3, 2, 1, 1, 1, 1, False, False),
    (2, 3, 5, (3, 5), (2, 4), (2, 1), (1, 0), (1, 0), 1, 1, True, False),
    (1, 3, 17, (4, 3), 1, 3, 0, 2, 1, 1, True, True),
    (2, 4, 6, (4, 4), 3, 2, 1, 1, 2, 1, True, False),   # groups: reference path, counted
    (1, 2, 3, (4, 5), 3, 1, 1, 0, 1, 2, True, False),   # dilation: reference path, counted
]


@pytest.mark.parametrize("case", CONVT_GRID)
def test_conv_transpose2d_matches_torch(backend, case):
    n, ci, co, hw, k, s, p, op, groups, d, has_bias, three_d = case
    dev = backend_device(backend)
    gen = torch.Generator().manual_seed(2)
    kk = (k, k) if isinstance(k, int) else k
    x = torch.randn(n, ci, *hw, generator=gen)
    w = torch.randn(ci, co // groups, *kk, generator=gen)
    b = torch.randn(co, generator=gen) if has_bias else None
    if three_d:
        x = x[0]
    leaves = [t.clone().to(dev).requires_grad_() for t in (x, w) + ((b,) if has_bias else ())]
    with aefast.set_backend(backend):
        y = AF.conv_transpose2d(leaves[0], leaves[1], leaves[2] if has_bias else None, s, p, op, groups, d)
    ref_leaves = [t.clone().requires_grad_() for t in (x, w) + ((b,) if has_bias else ())]
    want = F.conv_transpose2d(ref_leaves[0], ref_leaves[1], ref_leaves[2] if has_bias else None, s, p, op, groups, d)
    torch.testing.assert_close(y.cpu(), want, **TOLERANCES[torch.float32])
    g = torch.randn(want.shape, generator=gen)
    got_grads = torch.autograd.grad(y, leaves, g.to(dev))
    want_grads = torch.autograd.grad(want, ref_leaves, g)
    for a, c in zip(got_grads, want_grads):
        torch.testing.assert_close(a.cpu(), c, **TOLERANCES[torch.float32])
    counts = _backend.fallback_counts()
    fell_back = any(key.startswith("conv_transpose2d[") for key in counts)
    assert fell_back == (backend != "reference" and (groups != 1 or d != 1)), counts
    if fell_back:
        reason = "groups != 1" if groups != 1 else "dilation != 1"
        assert any(reason in key for key in counts), counts


def test_conv_transpose2d_fallback_visible_in_info():
    x, w = torch.randn(1, 4, 3, 3), torch.randn(4, 1, 3, 3)
    with aefast.set_backend("cpu"):
        AF.conv_transpose2d(x, w, groups=4)
    assert any("conv_transpose2d[cpu]: groups != 1" in k for k in aefast.info()["fallbacks"]), aefast.info()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_conv_transpose2d_dtypes_cpu(dtype):
    gen = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(2, 5, 4, 6, generator=gen), torch.randn(5, 3, 3, 3, generator=gen), torch.randn(3, generator=gen)
    with aefast.set_backend("cpu"):
        y = AF.conv_transpose2d(x.to(dtype), w.to(dtype), b.to(dtype), 2, 1, 1)
    want = F.conv_transpose2d(x.to(dtype).double(), w.to(dtype).double(), b.to(dtype).double(), 2, 1, 1)
    assert y.dtype == dtype
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(y.double(), want, rtol=tol["rtol"] * 2, atol=tol["atol"] * 2)


def test_conv_transpose2d_parameter_sweep_cpu():
    """Every combination of stride, padding and output_padding on a small odd input."""
    gen = torch.Generator().manual_seed(4)
    x, w, b = torch.randn(1, 3, 5, 4, generator=gen), torch.randn(3, 2, 3, 2, generator=gen), torch.randn(2, generator=gen)
    with aefast.set_backend("cpu"):
        for s, p, op in itertools.product([1, 2, 3], [0, 1, 2], [0, 1, 2]):
            if op >= s:
                continue
            torch.testing.assert_close(AF.conv_transpose2d(x, w, b, s, p, op),
                                       F.conv_transpose2d(x, w, b, s, p, op), **TOLERANCES[torch.float32])


def test_channels_last_in_channels_last_out(backend):
    dev = backend_device(backend)
    x = torch.randn(2, 3, 4, 4, device=dev).contiguous(memory_format=torch.channels_last)
    w = torch.randn(3, 2, 3, 3, device=dev)
    with aefast.set_backend(backend):
        y = AF.conv_transpose2d(x, w, None, 2, 1, 1)
        _, idx = F.max_pool2d(torch.randn(2, 3, 8, 8), 2, return_indices=True)
        u = AF.max_unpool2d(x, idx.to(dev).contiguous(memory_format=torch.channels_last), 2)
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert u.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.cpu(), F.conv_transpose2d(x.cpu(), w.cpu(), None, 2, 1, 1), **TOLERANCES[torch.float32])
    torch.testing.assert_close(u.cpu(), F.max_unpool2d(x.cpu(), idx, 2))


def test_gradcheck_drop_ins_cpu():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(1, 2, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, 2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    _, idx = F.max_pool2d(torch.randn(1, 2, 7, 8, generator=gen), 2, return_indices=True, ceil_mode=True)
    with aefast.set_backend("cpu"):
        assert torch.autograd.gradcheck(lambda x, w, b: AF.conv_transpose2d(x, w, b, 2, 1, 1), (x, w, b))
        xu = torch.randn(1, 2, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x: AF.max_unpool2d(x, idx, 2, output_size=(7, 8)), (xu,))
