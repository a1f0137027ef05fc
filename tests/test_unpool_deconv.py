"""The fused decoder block aefast.functional.unpool_conv_transpose2d on every backend.

Spec: act(F.conv_transpose2d(F.max_unpool2d(z, idx, pool, output_size=...), w, b, stride,
padding, output_padding)), values and the gradients of z, w and b.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import aefast
from aefast import backend as _backend
from aefast import functional as AF
from aefast.reference import functional as ref
from conftest import TOLERANCES, backend_device


@pytest.fixture(autouse=True)
def _ieee_fp32():
    """fp32 convs on a GPU follow torch.backends.cudnn.allow_tf32 (on by default, ~1e-3 error), in
    aefast's Triton kernels as in cuDNN; the fp32 tolerances here are IEEE ones."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = saved

ACTS = [None, "relu", "leaky_relu", "sigmoid", "tanh", "gelu", "silu"]


def torch_decoder(z, idx, w, b, pool, output_size, stride, padding, output_padding, act, slope=0.01):
    """The composition the fused op must equal, from torch.nn.functional alone."""
    u = F.max_unpool2d(z, idx, pool, output_size=output_size)
    y = F.conv_transpose2d(u, w, b, stride, padding, output_padding)
    if act is None:
        return y
    if act == "leaky_relu":
        return F.leaky_relu(y, slope)
    return getattr(F, act)(y)


def make_case(n, c_in, c_out, hw, pool, k, *, dtype=torch.float32, device="cpu", ceil_mode=False, seed=0,
              bias=True):
    """Pooled input + flat indices from a real max-pool of an (hw)-sized map, and the unpooled size."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, *hw, generator=g, dtype=torch.float64)
    z, idx = F.max_pool2d(x, pool, return_indices=True, ceil_mode=ceil_mode)
    kk = (k, k) if isinstance(k, int) else k
    w = torch.randn(c_in, c_out, *kk, generator=g, dtype=torch.float64) / (c_in * kk[0] * kk[1]) ** 0.5
    b = torch.randn(c_out, generator=g, dtype=torch.float64) if bias else None
    cast = lambda t: None if t is None else t.to(dtype=dtype, device=device)  # noqa: E731
    return cast(z), idx.to(device), cast(w), cast(b), tuple(hw)


def run_both(backend, z, idx, w, b, pool, out_hw, stride, padding, output_padding, act, fmt, grad_seed=1):
    """Outputs and gradients of the fused op on ``backend`` and of the torch composition (fp64)."""
    flat_idx = idx
    if fmt == "window":
        idx = AF.flat_to_window(idx, out_hw, pool)
    leaves = [t.detach().clone().requires_grad_() for t in (z, w) + ((b,) if b is not None else ())]
    with aefast.set_backend(backend):
        y = AF.unpool_conv_transpose2d(leaves[0], idx, leaves[1], leaves[2] if b is not None else None, pool,
                                       out_hw, stride, padding, output_padding, act, fmt)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    grads = torch.autograd.grad(y, leaves, g.to(y.dtype).to(y.device))
    ref_leaves = [t.detach().cpu().double().requires_grad_() for t in leaves]
    yr = torch_decoder(ref_leaves[0], flat_idx.cpu(), ref_leaves[1], ref_leaves[2] if b is not None else None,
                       pool, out_hw, stride, padding, output_padding, act)
    grads_r = torch.autograd.grad(yr, ref_leaves, g)
    return (y,) + tuple(grads), (yr,) + tuple(grads_r)


def assert_close_all(got, want, dtype, scale=1.0):
    tol = TOLERANCES[dtype]
    for a, b in zip(got, want):
        assert a.dtype == dtype
        torch.testing.assert_close(a.cpu().double(), b, rtol=tol["rtol"] * scale, atol=tol["atol"] * scale)


# (n, c_in, c_out, unpooled hw, pool, k, stride, padding, output_padding, ceil_mode)
GRID = [
    (1, 3, 17, (7, 9), 2, 3, 1, 1, 0, False),     # batch 1, odd sizes (output_size), 17 out channels
    (2, 17, 3, (9, 9), 3, 3, 2, 1, 1, False),     # pool 3, stride 2, output_padding
    (2, 3, 3, (7, 7), 2, 3, 2, 0, 1, True),       # ceil_mode windows, odd size
    (1, 4, 5, (8, 6), 2, (2, 4), 2, (0, 1), (1, 0), False),  # rectangular kernel, asymmetric args
    (2, 5, 2, (6, 6), 3, 1, 1, 0, 0, False),      # 1x1 kernel
    (1, 2, 3, (5, 7), (1, 2), 3, 3, 2, 2, False),  # rectangular pool, stride 3
    (3, 3, 4, (8, 8), 2, 5, 1, 2, 0, False),      # kernel larger than the window
]
TRITON_GRID = [GRID[0], GRID[1], GRID[2]]


@pytest.mark.parametrize("case", GRID)
@pytest.mark.parametrize("fmt", ["flat", "window"])
def test_grid_cpu(case, fmt):
    n, ci, co, hw, pool, k, s, p, op, ceil = case
    z, idx, w, b, out_hw = make_case(n, ci, co, hw, pool, k, ceil_mode=ceil)
    got, want = run_both("cpu", z, idx, w, b, pool, out_hw, s, p, op, "relu", fmt)
    assert_close_all(got, want, torch.float32)


@pytest.mark.parametrize("case", TRITON_GRID)
@pytest.mark.parametrize("fmt", ["flat", "window"])
def test_grid_kernel_backends(kernel_backend, case, fmt):
    n, ci, co, hw, pool, k, s, p, op, ceil = case
    dev = backend_device(kernel_backend)
    z, idx, w, b, out_hw = make_case(n, ci, co, hw, pool, k, ceil_mode=ceil, device=dev)
    got, want = run_both(kernel_backend, z, idx, w, b, pool, out_hw, s, p, op, "tanh", fmt)
    assert_close_all(got, want, torch.float32)


@pytest.mark.parametrize("act", ACTS)
def test_activations(kernel_backend, act):
    dev = backend_device(kernel_backend)
    z, idx, w, b, out_hw = make_case(2, 3, 4, (6, 6), 2, 3, device=dev, seed=3)
    got, want = run_both(kernel_backend, z, idx, w, b, 2, out_hw, 1, 1, 0, act, "window")
    assert_close_all(got, want, torch.float32)


def test_leaky_relu_slope():
    z, idx, w, b, out_hw = make_case(2, 3, 4, (6, 6), 2, 3, seed=4)
    with aefast.set_backend("cpu"):
        y = AF.unpool_conv_transpose2d(z, idx, w, b, 2, out_hw, 1, 1, 0, "leaky_relu", negative_slope=0.3)
    want = torch_decoder(z, idx, w, b, 2, out_hw, 1, 1, 0, "leaky_relu", slope=0.3)
    torch.testing.assert_close(y, want, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_dtypes_cpu(dtype):
    z, idx, w, b, out_hw = make_case(2, 17, 3, (7, 9), 2, 3, dtype=dtype, seed=5)
    got, want = run_both("cpu", z, idx, w, b, 2, out_hw, 2, 1, 1, "gelu", "flat")
    # Half-precision inputs and outputs, fp32 accumulation: compare to the fp64 composition of
    # the same (rounded) inputs; gradients sum over many terms, hence the scaled tolerance.
    assert_close_all(got, want, dtype, scale=1.0 if dtype == torch.float64 else 2.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_dtypes_triton(dtype):
    if not _backend.availability()["triton"][0]:
        pytest.skip("triton unavailable")
    dev = backend_device("triton")
    z, idx, w, b, out_hw = make_case(1, 3, 2, (5, 5), 2, 3, dtype=dtype, device=dev, seed=6)
    got, want = run_both("triton", z, idx, w, b, 2, out_hw, 1, 1, 0, "silu", "window")
    assert_close_all(got, want, dtype, scale=1.0 if dtype == torch.float64 else 2.0)


def test_no_bias_and_partial_grads():
    z, idx, w, _, out_hw = make_case(2, 3, 4, (6, 6), 2, 3, bias=False, seed=7)
    w = w.clone().requires_grad_()
    with aefast.set_backend("cpu"):
        y = AF.unpool_conv_transpose2d(z, idx, w, None, 2, out_hw, 1, 1, 0, "sigmoid")
    (gw,) = torch.autograd.grad(y.sum(), [w])
    wr = w.detach().clone().requires_grad_()
    (gwr,) = torch.autograd.grad(torch_decoder(z, idx, wr, None, 2, out_hw, 1, 1, 0, "sigmoid").sum(), [wr])
    torch.testing.assert_close(gw, gwr, **TOLERANCES[torch.float32])


def test_default_output_size_and_module():
    z, idx, w, b, _ = make_case(2, 3, 4, (8, 8), 2, 3, seed=8)
    with aefast.set_backend("cpu"):
        y = AF.unpool_conv_transpose2d(z, idx, w, b, activation="relu")
    torch.testing.assert_close(y, torch_decoder(z, idx, w, b, 2, None, 1, 0, 0, "relu"), **TOLERANCES[torch.float32])


# ---------------------------------------------------------------- gradcheck and opcheck

@pytest.mark.parametrize("act", [None, "tanh", "gelu", "leaky_relu"])
@pytest.mark.parametrize("fmt", ["flat", "window"])
def test_gradcheck_cpu(act, fmt):
    z, idx, w, b, out_hw = make_case(2, 3, 2, (5, 7), 2, 3, dtype=torch.float64, seed=9)
    if fmt == "window":
        idx = AF.flat_to_window(idx, out_hw, 2)
    leaves = [t.clone().requires_grad_() for t in (z, w, b)]

    def fn(z, w, b):
        with aefast.set_backend("cpu"):
            return AF.unpool_conv_transpose2d(z, idx, w, b, 2, out_hw, 2, 1, 1, act, fmt)

    assert torch.autograd.gradcheck(fn, leaves)


def _op_args(device="cpu", fmt="flat", act="gelu", dtype=torch.float32):
    z, idx, w, b, out_hw = make_case(2, 3, 2, (5, 6), 2, 3, device=device, dtype=dtype, seed=10)
    if fmt == "window":
        idx = AF.flat_to_window(idx, out_hw, 2)
    return [z.requires_grad_(), idx, w.requires_grad_(), b.requires_grad_(), [2, 2], list(out_hw), [2, 2], [1, 1],
            [1, 0], act, 0.01]


def _namespaces():
    out = [pytest.param("cpu", id="aefast")]
    ok, why = _backend.availability()["triton"]
    out.append(pytest.param("triton", id="aefast_triton", marks=pytest.mark.skipif(not ok, reason=why)))
    return out


@pytest.mark.parametrize("which", _namespaces())
@pytest.mark.parametrize("fmt,act", [("flat", "gelu"), ("window", "relu")])
def test_opcheck_forward(which, fmt, act):
    from aefast.ops import _registry

    dev = backend_device(which)
    args = _op_args(dev, fmt, act)
    torch.library.opcheck(_registry.op(which, "unpool_conv_transpose2d"), args)


@pytest.mark.parametrize("which", _namespaces())
def test_opcheck_backward_and_unpool(which):
    from aefast.ops import _registry

    dev = backend_device(which)
    args = _op_args(dev)
    z, idx, w, b, geo = args[0].detach(), args[1], args[2].detach(), args[3], args[4:]
    out, pre = _registry.op(which, "unpool_conv_transpose2d")(z, idx, w, b.detach(), *geo)
    g = torch.randn_like(out)
    torch.library.opcheck(_registry.op(which, "unpool_conv_transpose2d_backward"),
                          [g, pre, z, idx, w, *geo[:-2], "gelu", 0.01, [True, True, True]])
    x = torch.randn(2, 3, 4, 4, device=dev, requires_grad=True)
    _, flat = F.max_pool2d(torch.randn(2, 3, 8, 8), 2, return_indices=True)
    torch.library.opcheck(_registry.op(which, "max_unpool2d"), [x, flat.to(dev), [8, 8]])
    torch.library.opcheck(_registry.op(which, "max_unpool2d_backward"),
                          [torch.randn(2, 3, 8, 8, device=dev), flat.to(dev)])


def test_torch_compile_fullgraph():
    """The op (validation excluded: it reads index values) compiles without graph breaks."""
    z, idx, w, b, out_hw = make_case(2, 3, 2, (6, 6), 2, 3, seed=11)
    op = torch.ops.aefast.unpool_conv_transpose2d

    def fn(z, w, b):
        return op(z, idx, w, b, [2, 2], list(out_hw), [1, 1], [1, 1], [0, 0], "relu", 0.01)[0]

    leaves = [t.clone().requires_grad_() for t in (z, w, b)]
    want = fn(*leaves)
    got = torch.compile(fn, fullgraph=True, backend="aot_eager")(*leaves)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), leaves), torch.autograd.grad(want.sum(), leaves))


# ---------------------------------------------------------------- determinism

@pytest.mark.parametrize("fmt", ["flat", "window"])
def test_deterministic(kernel_backend, fmt):
    dev = backend_device(kernel_backend)
    z, idx, w, b, out_hw = make_case(3, 5, 4, (7, 8), 2, 3, device=dev, seed=12)
    runs = [run_both(kernel_backend, z, idx, w, b, 2, out_hw, 2, 1, 1, "gelu", fmt)[0] for _ in range(2)]
    for a, c in zip(*runs):
        assert torch.equal(a, c)


def test_cpu_result_independent_of_thread_count():
    z, idx, w, b, out_hw = make_case(6, 9, 5, (10, 10), 2, 3, seed=13)
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            results.append(run_both("cpu", z, idx, w, b, 2, out_hw, 1, 1, 0, "silu", "flat")[0])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, c in zip(results[0], other):
            assert torch.equal(a, c)


# ---------------------------------------------------------------- no unpooled map

class _RecordShapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numels.append((str(func), t.numel()))
        return out


@pytest.mark.parametrize("which", ["cpu", "reference"])
def test_no_unpooled_map_is_allocated(which):
    """No op of the fused path (forward and backward) makes a tensor as large as the unpooled map
    N*C_in*H_u*W_u; the reference path does (the check detects it)."""
    z, idx, w, b, out_hw = make_case(2, 16, 2, (12, 12), 2, 3, seed=14)
    unpooled = z.shape[0] * z.shape[1] * out_hw[0] * out_hw[1]
    leaves = [t.clone().requires_grad_() for t in (z, w, b)]
    rec = _RecordShapes()
    with aefast.set_backend(which), rec:
        y = AF.unpool_conv_transpose2d(leaves[0], idx, leaves[1], leaves[2], 2, out_hw, 1, 1, 0, "relu")
        y.sum().backward()
    big = [(f, n) for f, n in rec.numels if n >= unpooled]
    if which == "reference":
        assert big
    else:
        assert not big, big


def test_peak_memory_below_unpooled_map():
    """The profiler sees every c10 allocation, kernel-internal buffers included."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench._harness import peak_memory_bytes

    z, idx, w, b, out_hw = make_case(4, 64, 2, (16, 16), 2, 3, seed=15)
    unpooled_bytes = z.shape[0] * z.shape[1] * out_hw[0] * out_hw[1] * 4
    leaves = [t.clone().requires_grad_() for t in (z, w, b)]

    def step():
        y = AF.unpool_conv_transpose2d(leaves[0], idx, leaves[1], leaves[2], 2, out_hw, 1, 1, 0, "relu")
        y.sum().backward()

    with aefast.set_backend("cpu"):
        fused = peak_memory_bytes(step)
    with aefast.set_backend("reference"):
        reference = peak_memory_bytes(step)
    assert fused < unpooled_bytes <= reference


# ---------------------------------------------------------------- bad inputs

def _good(device="cpu"):
    z, idx, w, b, out_hw = make_case(1, 2, 3, (4, 4), 2, 3, device=device, seed=16)
    return dict(input=z, indices=idx, weight=w, bias=b, pool_size=2, output_size=out_hw, stride=1, padding=1)


def _call(**kw):
    return AF.unpool_conv_transpose2d(**kw)


BAD = [
    ("indices int32", lambda a: a.update(indices=a["indices"].int()), TypeError, "indices must have dtype"),
    ("indices shape", lambda a: a.update(indices=a["indices"][..., :1]), ValueError, "indices must have the input"),
    ("index too large", lambda a: a["indices"].view(-1).__setitem__(0, 16), ValueError, r"\[0, 16\)"),
    ("index negative", lambda a: a["indices"].view(-1).__setitem__(0, -1), ValueError, r"\[0, 16\)"),
    ("index outside its window", lambda a: a["indices"].view(-1).__setitem__(0, 15), ValueError, "own pool window"),
    ("window offset too large", lambda a: a.update(indices=torch.full_like(a["indices"], 4, dtype=torch.uint8)),
     ValueError, "window offsets"),
    ("weight channels", lambda a: a.update(weight=a["weight"][:1]), ValueError, "input channels"),
    ("bias shape", lambda a: a.update(bias=a["bias"][:2]), ValueError, "bias must have shape"),
    ("dtype mismatch", lambda a: a.update(weight=a["weight"].double()), TypeError, "dtypes differ"),
    ("3-D input", lambda a: a.update(input=a["input"][0], indices=a["indices"][0]), ValueError, "4-D"),
    ("output_padding", lambda a: a.update(output_padding=1), ValueError, "output_padding"),
    ("activation", lambda a: a.update(activation="swish"), ValueError, "unknown activation"),
    ("index_format", lambda a: a.update(index_format="csr"), ValueError, "index_format"),
    ("output_size", lambda a: a.update(output_size=(9, 9)), ValueError, "output_size"),
    ("pool_size", lambda a: a.update(pool_size=0), ValueError, "pool_size"),
    ("stride", lambda a: a.update(stride=(1, 0)), ValueError, "stride"),
    ("padding too large", lambda a: a.update(padding=5), ValueError, "empty"),
]


@pytest.mark.parametrize("name,mutate,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs(backend, name, mutate, exc, match):
    args = _good(backend_device(backend))
    if name.startswith("window offset"):
        args["index_format"] = "window"
    mutate(args)
    with pytest.raises(exc, match=match):
        _call(**args)


def test_window_offset_outside_plane(backend):
    """A window offset of a clipped last window (output_size smaller than pool * pooled) that
    points past the unpooled plane is an error on every backend."""
    dev = backend_device(backend)
    z = torch.randn(1, 1, 2, 2, device=dev)
    w = torch.randn(1, 1, 3, 3, device=dev)
    idx = torch.zeros(1, 1, 2, 2, dtype=torch.uint8, device=dev)
    idx[0, 0, 1, 1] = 3  # row 3, col 3 of a 3x3 plane
    with pytest.raises(ValueError, match="own pool window"):
        AF.unpool_conv_transpose2d(z, idx, w, None, 2, (3, 3), index_format="window")
    idx[0, 0, 1, 1] = 0
    AF.unpool_conv_transpose2d(z, idx, w, None, 2, (3, 3), index_format="window")


# ---------------------------------------------------------------- module

def test_module_matches_conv_transpose_init_and_state_dict():
    torch.manual_seed(0)
    ours = aefast.nn.UnpoolConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1, activation="relu")
    torch.manual_seed(0)
    theirs = torch.nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1)
    assert ours.weight.shape == theirs.weight.shape == (4, 3, 3, 3)
    assert torch.equal(ours.weight, theirs.weight) and torch.equal(ours.bias, theirs.bias)
    assert set(ours.state_dict()) == set(theirs.state_dict())
    theirs2 = torch.nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1)
    ours.load_state_dict(theirs2.state_dict())
    x = torch.randn(2, 4, 8, 8)
    z, idx = F.max_pool2d(x, 2, return_indices=True)
    with aefast.set_backend("cpu"):
        y = ours(z, idx)
    want = torch.relu(theirs2(F.max_unpool2d(z, idx, 2)))
    torch.testing.assert_close(y, want, **TOLERANCES[torch.float32])
    y.sum().backward()
    assert ours.weight.grad is not None and ours.bias.grad is not None


# ---------------------------------------------------------------- fuzz

@st.composite
def decoder_cases(draw):
    pool = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    hp, wp = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    extra = (draw(st.integers(0, pool[0] - 1)), draw(st.integers(0, pool[1] - 1)))
    out_hw = (hp * pool[0] + extra[0], wp * pool[1] + extra[1])
    k = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    s = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    p = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    op = (draw(st.integers(0, s[0] - 1)), draw(st.integers(0, s[1] - 1)))
    for a in range(2):
        assume((out_hw[a] - 1) * s[a] - 2 * p[a] + k[a] + op[a] >= 1)
    return dict(n=draw(st.integers(1, 2)), ci=draw(st.integers(1, 4)), co=draw(st.integers(1, 4)), pool=pool,
                out_hw=out_hw, k=k, s=s, p=p, op=op, act=draw(st.sampled_from(ACTS)),
                fmt=draw(st.sampled_from(["flat", "window"])), bias=draw(st.booleans()),
                seed=draw(st.integers(0, 2**16)))


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(decoder_cases())
def test_fuzz_cpu(c):
    z, idx, w, b, out_hw = make_case(c["n"], c["ci"], c["co"], c["out_hw"], c["pool"], c["k"], dtype=torch.float64,
                                     seed=c["seed"], bias=c["bias"])
    got, want = run_both("cpu", z, idx, w, b, c["pool"], out_hw, c["s"], c["p"], c["op"], c["act"], c["fmt"])
    assert_close_all(got, want, torch.float64)


def test_first_bad_unpool_index_op():
    op = torch.ops.aefast.first_bad_unpool_index
    _, idx = F.max_pool2d(torch.randn(2, 3, 6, 6), 2, return_indices=True)
    assert int(op(idx, [6, 6], [2, 2], True)) == -1
    bad = idx.clone()
    bad[1, 2, 0, 1] = 0     # element (0, 0) belongs to window (0, 0), not (0, 1)
    bad[1, 2, 2, 2] = 36    # out of range, later position
    assert int(op(bad, [6, 6], [2, 2], True)) == (1 * 3 + 2) * 9 + 1
    assert int(op(bad, [6, 6], [2, 2], False)) == (1 * 3 + 2) * 9 + 8  # range only
    win = AF.flat_to_window(idx, (6, 6), 2)
    assert int(op(win, [6, 6], [2, 2], True)) == -1
    clipped = torch.zeros(1, 1, 3, 3, dtype=torch.uint8)
    assert int(op(clipped, [5, 5], [2, 2], True)) == -1
    clipped[0, 0, 2, 2] = 3
    assert int(op(clipped, [5, 5], [2, 2], True)) == 8  # row 5 of a 5-row plane
    clipped[0, 0, 0, 0] = 4
    assert int(op(clipped, [5, 5], [2, 2], True)) == 0  # offset beyond the window
    torch.library.opcheck(op, [bad, [6, 6], [2, 2], True])


# ---------------------------------------------------------------- CPU kernel variants and paths

_BEST_ISA = torch.ops.aefast.unpool_deconv_cpu_isa()
ISAS = {"baseline": 0, "avx2": 1, "avx512": 2}

# Cases that reach each loop order of the CPU kernels, for every vector width:
#   small slabs (C_out 1 and 3, K <= 4 vectors) -> per-position backward;
#   K*C_out a whole number of vectors (C_out 16, 3x3: runs of 48) -> per-channel, nb read from gpad;
#   C_out 17 -> per-channel through the im2col; C_in 64 x C_out 32 -> several weight chunks;
#   pool 1 (every position full), pool 3 with a clipped last window, stride 2, 1x1 kernel.
# (n, c_in, c_out, unpooled hw, pool, k, stride, padding, output_padding, act)
PATH_CASES = [
    (3, 32, 1, (12, 12), 2, 3, 1, 1, 0, "sigmoid"),
    (2, 32, 3, (16, 14), 2, 3, 1, 1, 0, "sigmoid"),
    (2, 8, 16, (8, 8), 2, 3, 1, 1, 0, "relu"),
    (2, 6, 17, (7, 9), 2, 3, 2, 1, 1, "gelu"),
    (2, 64, 32, (6, 6), 2, 3, 1, 1, 0, "relu"),
    (2, 5, 4, (5, 5), 1, 3, 1, 1, 0, "tanh"),
    (2, 4, 6, (8, 7), 3, 2, 2, 0, 1, "silu"),
    (1, 3, 40, (6, 6), 2, 1, 1, 0, 0, "leaky_relu"),
]


@pytest.fixture(params=list(ISAS))
def cpu_isa(request, monkeypatch):
    """Runs the test with the CPU decoder kernels capped to one SIMD variant (AEFAST_CPU_ISA is
    read per call); a variant above what this CPU has is skipped."""
    if ISAS[request.param] > _BEST_ISA:
        pytest.skip(f"this CPU lacks {request.param}")
    monkeypatch.setenv("AEFAST_CPU_ISA", request.param)
    assert torch.ops.aefast.unpool_deconv_cpu_isa() == ISAS[request.param]
    return request.param


def test_isa_cap_environment(monkeypatch):
    monkeypatch.setenv("AEFAST_CPU_ISA", "baseline")
    assert torch.ops.aefast.unpool_deconv_cpu_isa() == 0
    monkeypatch.setenv("AEFAST_CPU_ISA", "avx512")
    assert torch.ops.aefast.unpool_deconv_cpu_isa() == _BEST_ISA  # a cap never raises the CPU's limit
    monkeypatch.setenv("AEFAST_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="AEFAST_CPU_ISA"):
        torch.ops.aefast.unpool_deconv_cpu_isa()


@pytest.mark.parametrize("case", PATH_CASES, ids=[f"{c[1]}to{c[2]}_pool{c[4]}_k{c[5]}_s{c[6]}" for c in PATH_CASES])
@pytest.mark.parametrize("fmt", ["flat", "window"])
def test_cpu_paths_per_isa(cpu_isa, case, fmt):
    n, ci, co, hw, pool, k, s, p, op, act = case
    z, idx, w, b, out_hw = make_case(n, ci, co, hw, pool, k, seed=21, ceil_mode=True)
    got, want = run_both("cpu", z, idx, w, b, pool, out_hw, s, p, op, act, fmt)
    assert_close_all(got, want, torch.float32, scale=2.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("case", [PATH_CASES[1], PATH_CASES[3], PATH_CASES[4]], ids=["small", "im2col", "chunks"])
def test_cpu_paths_dtypes_per_isa(cpu_isa, case, dtype):
    n, ci, co, hw, pool, k, s, p, op, act = case
    z, idx, w, b, out_hw = make_case(n, ci, co, hw, pool, k, dtype=dtype, seed=22)
    got, want = run_both("cpu", z, idx, w, b, pool, out_hw, s, p, op, act, "window")
    assert_close_all(got, want, dtype, scale=1.0 if dtype == torch.float64 else 4.0)


def assert_partial_gradients_equal_full(z, idx, w, b, pool, out_hw, s, p, op, act):
    """fp64: the input-only and the weight-only backward equal those of the full backward."""
    full = run_both("cpu", z, idx, w, b, pool, out_hw, s, p, op, act, "flat")[0]
    for which in (0, 1):
        leaves = [z.clone().requires_grad_(which == 0), w.clone().requires_grad_(which == 1)]
        y = AF.unpool_conv_transpose2d(leaves[0], idx, leaves[1], b, pool, out_hw, s, p, op, act)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        (grad,) = torch.autograd.grad(y, [leaves[which]], g)
        torch.testing.assert_close(grad, full[1 + which], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", [PATH_CASES[0], PATH_CASES[3], PATH_CASES[4]], ids=["small", "im2col", "chunks"])
def test_cpu_partial_gradients_per_isa(cpu_isa, case):
    """output_mask with one gradient only: each loop order has input-only and weight-only modes."""
    n, ci, co, hw, pool, k, s, p, op, act = case
    z, idx, w, b, out_hw = make_case(n, ci, co, hw, pool, k, dtype=torch.float64, seed=23)
    assert_partial_gradients_equal_full(z, idx, w, b, pool, out_hw, s, p, op, act)


@pytest.mark.parametrize("case", [PATH_CASES[0], PATH_CASES[3], PATH_CASES[4]], ids=["small", "im2col", "chunks"])
def test_cpu_paths_independent_of_thread_count(cpu_isa, case):
    n, ci, co, hw, pool, k, s, p, op, act = case
    z, idx, w, b, out_hw = make_case(5, ci, co, hw, pool, k, seed=24)
    assert_same_bits_for_1_2_3_threads(z, idx, w, b, pool, out_hw, s, p, op, act)


# The per-entry backward writes gpre (grad_out * act') through a planar buffer of ~8192 values per
# band of output rows (C_out x rows x W_out), transposed into its channels-last buffer by L x L
# register tiles when C_out is a whole number of vectors, else by strided stores. Wide outputs cut
# the image into several bands (the last one partial) and each row into several tiles (the last
# one partial). (n, c_in, c_out, unpooled hw, pool, k, stride, padding, output_padding, act)
GPRE_BAND_CASES = [
    (1, 3, 32, (7, 100), 2, 3, 1, 1, 0, "relu"),      # 3200 per row: bands of 2 rows, then 1
    (2, 2, 64, (5, 130), 2, 3, 1, 1, 0, "sigmoid"),   # 8320 per row: one row per band
    (1, 2, 36, (4, 230), 2, 3, 1, 1, 0, "tanh"),      # C_out 36: strided stores, one row per band
]


@pytest.mark.parametrize("case", GPRE_BAND_CASES, ids=[f"{c[2]}x{c[3][1]}" for c in GPRE_BAND_CASES])
@pytest.mark.parametrize("fmt", ["flat", "window"])
def test_cpu_backward_gpre_bands_per_isa(cpu_isa, case, fmt):
    n, ci, co, hw, pool, k, s, p, op, act = case
    z, idx, w, b, out_hw = make_case(n, ci, co, hw, pool, k, seed=28)
    got, want = run_both("cpu", z, idx, w, b, pool, out_hw, s, p, op, act, fmt)
    assert_close_all(got, want, torch.float32)


# The per-channel backward walks each channel's entries band by band: whole rows of pool windows
# whose neighbourhoods fit in 128 KiB of gpad (nb read in place) or of the im2col (kL2BandBytes in
# csrc/include/aefast/cpu_isa.h). These images span several bands with a partial last
# one: C_out 32 rows of 10.6 KB (6 pool rows a band, 10 rows), C_out 17 through a 1.6 MB im2col
# (one row a band), pool 3 with clipped last windows and stride 2.
# (n, c_in, c_out, unpooled hw, pool, k, stride, padding, output_padding, act)
CHANNEL_BAND_CASES = [
    (2, 5, 32, (20, 80), 2, 3, 1, 1, 0, "relu"),
    (1, 3, 17, (9, 70), 2, 3, 1, 1, 0, "gelu"),
    (2, 4, 32, (17, 40), 3, 3, 2, 1, 1, "leaky_relu"),
]
CHANNEL_BAND_IDS = [f"{c[2]}x{c[3][0]}x{c[3][1]}_pool{c[4]}_s{c[6]}" for c in CHANNEL_BAND_CASES]


@pytest.mark.parametrize("case", CHANNEL_BAND_CASES, ids=CHANNEL_BAND_IDS)
@pytest.mark.parametrize("fmt", ["flat", "window"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_cpu_backward_channel_bands_per_isa(cpu_isa, case, fmt, layout):
    n, ci, co, hw, pool, k, s, p, op, act = case
    # fp64 to its own tolerance (a wrong band bound shows as a large error); fp32 with 10x the
    # usual tolerance: grad_W and grad_b reach ~100 here, sums of up to 1600 entries.
    for dtype, scale in ((torch.float64, 1.0), (torch.float32, 10.0)):
        z, idx, w, b, out_hw = make_case(n, ci, co, hw, pool, k, seed=31, dtype=dtype)
        if layout == "channels_last":
            z, idx = z.contiguous(memory_format=torch.channels_last), idx.contiguous(memory_format=torch.channels_last)
        got, want = run_both("cpu", z, idx, w, b, pool, out_hw, s, p, op, act, fmt)
        assert_close_all(got, want, dtype, scale=scale)


@pytest.mark.parametrize("case", CHANNEL_BAND_CASES[:2], ids=CHANNEL_BAND_IDS[:2])
def test_cpu_backward_channel_bands_partial_grads_and_threads(case):
    n, ci, co, hw, pool, k, s, p, op, act = case
    z, idx, w, b, out_hw = make_case(n, ci, co, hw, pool, k, dtype=torch.float64, seed=32)
    assert_partial_gradients_equal_full(z, idx, w, b, pool, out_hw, s, p, op, act)
    z, idx, w, b, out_hw = make_case(3, ci, co, hw, pool, k, seed=33)
    assert_same_bits_for_1_2_3_threads(z, idx, w, b, pool, out_hw, s, p, op, act)


# AEFAST_DECODER_WINDOW_VECTORS=0 turns the window-vector kernels off (small slabs, windows of at
# most 4), so that the per-entry band kernels they replaced run, for A/B timing
# (bench/bench_kernel_ledger.py): both held to torch, and the kernels name the path they took in
# the profiler ("aefast path: ..."), forward and backward.
@pytest.mark.parametrize("case", PATH_CASES[:2], ids=["32to1", "32to3"])
def test_cpu_window_vector_switch(case, monkeypatch):
    n, ci, co, hw, pool, k, s, p, op, act = case
    z, idx, w, b, out_hw = make_case(n, ci, co, hw, pool, k, seed=27)
    for flag, path in (("1", "window vectors"), ("0", "per entry")):
        monkeypatch.setenv("AEFAST_DECODER_WINDOW_VECTORS", flag)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            got, want = run_both("cpu", z, idx, w, b, pool, out_hw, s, p, op, act, "window")
        assert_close_all(got, want, torch.float32, scale=2.0)
        assert {e.name for e in prof.events() if e.name.startswith("aefast path: ")} == {
            f"aefast path: unpool_conv_transpose2d {path}", f"aefast path: unpool_conv_transpose2d_backward {path}"}
    monkeypatch.setenv("AEFAST_DECODER_WINDOW_VECTORS", "off")
    with pytest.raises(RuntimeError, match="AEFAST_DECODER_WINDOW_VECTORS"):
        run_both("cpu", z, idx, w, b, pool, out_hw, s, p, op, act, "window")


# Large-slab cases whose tap vectors live in a ring of unpooled rows smaller than the plane
# (rows = ceil((KH-1)/SH) + pool_h): rows below the last window row (unpooled 9 from pooled 4),
# stride 2, a 5x5 kernel, pool 3, several weight chunks; K*C_out past 4 vectors in every variant.
# (n, c_in, c_out, unpooled hw, pool, k, stride, padding, output_padding, act)
RING_CASES = [
    (2, 64, 32, (12, 10), 2, 3, 1, 1, 0, "relu"),
    (2, 3, 17, (9, 11), 2, 3, 1, 1, 0, "gelu"),
    (2, 6, 17, (9, 8), 2, 3, 2, 1, 1, "silu"),
    (1, 5, 20, (13, 7), 2, 5, 1, 2, 0, "leaky_relu"),
    (2, 4, 24, (11, 10), 3, 3, 1, 1, 0, "tanh"),
]


@pytest.mark.parametrize("case", RING_CASES, ids=[f"{c[1]}to{c[2]}_{c[3][0]}x{c[3][1]}_pool{c[4]}_k{c[5]}_s{c[6]}"
                                                  for c in RING_CASES])
@pytest.mark.parametrize("fmt", ["flat", "window"])
def test_cpu_row_ring_matches_whole_image(cpu_isa, case, fmt, monkeypatch):
    """The forward's row ring (AEFAST_DECODER_ROW_RING, on by default) gives the bits of the
    whole-image tap buffer, and both match the torch composition; a pooled map smaller than the
    unpooled plane (floor pooling) leaves rows and columns outside every window."""
    n, ci, co, hw, pool, k, s, p, op, act = case
    z, idx, w, b, out_hw = make_case(n, ci, co, hw, pool, k, seed=25)
    got, want = run_both("cpu", z, idx, w, b, pool, out_hw, s, p, op, act, fmt)
    assert_close_all(got, want, torch.float32, scale=2.0)
    monkeypatch.setenv("AEFAST_DECODER_ROW_RING", "0")
    whole, _ = run_both("cpu", z, idx, w, b, pool, out_hw, s, p, op, act, fmt)
    for a, c in zip(got, whole):
        assert torch.equal(a, c)


@pytest.mark.parametrize("case", RING_CASES[:2], ids=["chunks", "tail"])
def test_cpu_row_ring_independent_of_thread_count(case):
    n, ci, co, hw, pool, k, s, p, op, act = case
    z, idx, w, b, out_hw = make_case(5, ci, co, hw, pool, k, seed=26)
    assert_same_bits_for_1_2_3_threads(z, idx, w, b, pool, out_hw, s, p, op, act)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_cpu_row_ring_dtypes(dtype):
    n, ci, co, hw, pool, k, s, p, op, act = RING_CASES[1]
    z, idx, w, b, out_hw = make_case(n, ci, co, hw, pool, k, dtype=dtype, seed=27)
    got, want = run_both("cpu", z, idx, w, b, pool, out_hw, s, p, op, act, "window")
    assert_close_all(got, want, dtype, scale=1.0 if dtype == torch.float64 else 4.0)


def assert_same_bits_for_1_2_3_threads(z, idx, w, b, pool, out_hw, s, p, op, act):
    """The cpu backend's forward and gradients are bitwise equal on 1, 2 and 3 threads."""
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            results.append(run_both("cpu", z, idx, w, b, pool, out_hw, s, p, op, act, "window")[0])
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, c in zip(results[0], other):
            assert torch.equal(a, c)


# ---------------------------------------------------------------- index check inside the CPU kernel

@pytest.mark.parametrize("c_out", [2, 16], ids=["small_slab", "large_slab"])
@pytest.mark.parametrize("fmt", ["flat", "window"])
def test_cpu_kernel_finds_the_first_bad_index(fmt, c_out, monkeypatch):
    """The CPU forward checks the indices itself (no separate pass runs) and names the first bad
    one in row-major order, across images, as first_bad_unpool_index does. C_out 16 runs the
    per-entry kernels, whose channel-mask pass only flags a row with a bad index; the image is
    then rescanned with the checking decode."""
    z, idx, w, b, out_hw = make_case(3, 4, c_out, (6, 6), 2, 3, seed=25)
    if fmt == "window":
        idx = AF.flat_to_window(idx, out_hw, 2)
    bad = idx.clone()
    if fmt == "flat":
        bad[2, 1, 0, 1] = 0    # element (0, 0) belongs to window (0, 0), not (0, 1)
        bad[1, 3, 2, 2] = 36   # out of range, earlier image: this one is first
    else:
        bad[2, 1, 0, 1] = 4
        bad[1, 3, 2, 2] = 7
    first = int(torch.ops.aefast.first_bad_unpool_index(bad, list(out_hw), [2, 2], True))
    assert first == (1 * 4 + 3) * 9 + 2 * 3 + 2
    with pytest.raises(RuntimeError, match=f"invalid index at linear position {first}"):
        torch.ops.aefast.unpool_conv_transpose2d(z, bad, w, b, [2, 2], list(out_hw), [1, 1], [1, 1], [0, 0], None, 0.0)
    from aefast.ops import unpool_deconv as ops

    def no_separate_pass(*a, **k):
        raise AssertionError("the CPU path ran the separate index check")

    monkeypatch.setattr(ops, "first_bad_index", no_separate_pass)
    with aefast.set_backend("cpu"):
        with pytest.raises(ValueError, match=r"at position \(1, 3, 2, 2\)"):
            AF.unpool_conv_transpose2d(z, bad, w, b, 2, out_hw, 1, 1, index_format=fmt)
        y = AF.unpool_conv_transpose2d(z, idx, w, b, 2, out_hw, 1, 1, index_format=fmt)  # good ones pass
    assert y.shape == (3, c_out, 6, 6)


@pytest.mark.parametrize("bad_value", [2, 12, 3, -1, 36],
                         ids=["past_window_col", "row_below", "next_window", "negative", "past_plane"])
def test_cpu_per_entry_kernel_rejects_each_kind_of_bad_flat_index(bad_value):
    """Flat indices that the per-entry fast decode must reject: the column just past the window,
    the row below it, a neighbour window's element, a negative one (window (0, 0) of a 6x6 plane
    with 2x2 windows holds 0, 1, 6, 7)."""
    z, idx, w, b, out_hw = make_case(2, 3, 16, (6, 6), 2, 3, seed=26)
    bad = idx.clone()
    bad[1, 2, 0, 0] = bad_value
    with pytest.raises(RuntimeError, match=f"invalid index at linear position {(1 * 3 + 2) * 9}"):
        torch.ops.aefast.unpool_conv_transpose2d(z, bad, w, b, [2, 2], list(out_hw), [1, 1], [1, 1], [0, 0], None, 0.0)


@pytest.mark.parametrize("fmt", ["flat", "window"])
def test_cpu_per_entry_backward_skips_bad_indices(fmt):
    """A direct torch.ops backward call with a bad index (C_out 16: the per-entry kernels, whose
    unclipped planes are decoded without table lookups) skips that entry: grad 0 there, and the
    other gradients as if its value were 0."""
    z, idx, w, b, out_hw = make_case(2, 4, 16, (8, 8), 2, 3, seed=27)
    if fmt == "window":
        idx = AF.flat_to_window(idx, out_hw, 2)
    bad = idx.clone()
    bad[1, 2, 1, 3] = 9 if fmt == "window" else 0
    z_zeroed = z.clone()
    z_zeroed[1, 2, 1, 3] = 0
    gy = torch.randn(2, 16, *out_hw, generator=torch.Generator().manual_seed(3))
    args = ([2, 2], list(out_hw), [1, 1], [1, 1], [0, 0], None, 0.0, [True, True, True])
    gz, gw, gb = torch.ops.aefast.unpool_conv_transpose2d_backward(gy, gy, z, bad, w, *args)
    gz_ref, gw_ref, gb_ref = torch.ops.aefast.unpool_conv_transpose2d_backward(gy, gy, z_zeroed, idx, w, *args)
    assert gz[1, 2, 1, 3] == 0
    gz_ref[1, 2, 1, 3] = 0
    torch.testing.assert_close(gz, gz_ref)
    torch.testing.assert_close(gw, gw_ref)
    torch.testing.assert_close(gb, gb_ref)


def test_cpu_vector_sigmoid_accuracy(cpu_isa):
    """The fp32 epilogue computes sigmoid on whole vectors (own exp): within a few ulp of
    torch.sigmoid over the whole range, saturating at +-inf, NaN propagating."""
    t = torch.cat([torch.linspace(-95, 95, 40001), torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0])])
    t = t.view(1, 1, 1, -1)
    idx = torch.zeros_like(t, dtype=torch.uint8)
    w = torch.ones(1, 1, 1, 1)
    with aefast.set_backend("cpu"):
        y = AF.unpool_conv_transpose2d(t, idx, w, None, 1, None, 1, 0, 0, "sigmoid", index_format="window")
    torch.testing.assert_close(y, torch.sigmoid(t), rtol=8 * 2**-24, atol=1e-30, equal_nan=True)


# ---------------------------------------------------------------- window-vector kernels (small slabs)
# Small slabs (K = KH*KW*C_out taps in at most 4 vectors) with pool windows of at most 4 elements
# run the window-vector kernels (lanes = pool windows; csrc/cpu/unpool_deconv_window_vectors.cpp).
# The cases reach each of their branches, for every vector width:
#   pool 2 wide with stride_w 1 (shuffle interleave / de-interleave), pool 1 (direct adds,
#   the dense transposed conv), other pools or stride_w > 1 (scalar scatter / gather); windows
#   clipped by the plane (full decode) and rows / columns past the last window; rows of windows
#   shorter and longer than a vector (several vector tiles per row); several packed row blocks
#   (64 channels x 50 windows); tap groups (C_out 7 with 3x3: 63 taps, 4 groups on AVX-512).
# (n, c_in, c_out, unpooled hw, pool, k, stride, padding, output_padding, act, ceil_mode)
WV_CASES = [
    (2, 32, 1, (28, 28), 2, 3, 1, 1, 0, "sigmoid", False),
    (2, 5, 3, (9, 37), 2, 3, 1, 1, 0, "relu", True),           # clipped last windows, 19 windows a row
    (1, 3, 2, (7, 9), 2, 3, 1, 1, 0, "tanh", False),           # a row and a column past the windows
    (2, 4, 3, (8, 10), (1, 2), 3, 2, 1, 1, "leaky_relu", False),  # 1x2 windows, stride 2
    (2, 3, 2, (10, 8), (2, 1), (2, 3), (1, 2), (0, 1), (0, 1), "silu", False),  # 2x1 windows: scalar paths
    (2, 6, 1, (9, 11), 1, 3, 1, 1, 0, "gelu", False),          # 1x1 windows: the dense transposed conv
    (1, 64, 1, (20, 100), 2, 3, 1, 1, 0, None, False),         # several packed row blocks
    (2, 4, 7, (6, 6), 2, 3, 1, 1, 0, "sigmoid", False),        # 63 taps: several tap groups (AVX-512)
    (1, 3, 1, (5, 5), 2, 5, 1, 2, 0, "relu", True),            # kernel larger than the window, clipped
]
WV_IDS = [f"{c[1]}to{c[2]}_{c[3][0]}x{c[3][1]}_pool{c[4]}_s{c[6]}" for c in WV_CASES]


@pytest.mark.parametrize("case", WV_CASES, ids=WV_IDS)
@pytest.mark.parametrize("fmt", ["flat", "window"])
def test_cpu_window_vectors_per_isa(cpu_isa, case, fmt):
    n, ci, co, hw, pool, k, s, p, op, act, ceil = case
    z, idx, w, b, out_hw = make_case(n, ci, co, hw, pool, k, seed=31, ceil_mode=ceil)
    got, want = run_both("cpu", z, idx, w, b, pool, out_hw, s, p, op, act, fmt)
    assert_close_all(got, want, torch.float32, scale=2.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [WV_CASES[1], WV_CASES[3], WV_CASES[5]], ids=["pool2", "pool1x2", "pool1"])
def test_cpu_window_vectors_dtypes_per_isa(cpu_isa, case, dtype):
    n, ci, co, hw, pool, k, s, p, op, act, ceil = case
    z, idx, w, b, out_hw = make_case(n, ci, co, hw, pool, k, dtype=dtype, seed=32, ceil_mode=ceil)
    got, want = run_both("cpu", z, idx, w, b, pool, out_hw, s, p, op, act, "window")
    assert_close_all(got, want, dtype, scale=1.0 if dtype == torch.float64 else 4.0)


@pytest.mark.parametrize("case", [WV_CASES[1], WV_CASES[7]], ids=["clipped", "groups"])
def test_cpu_window_vectors_partial_gradients_and_threads(cpu_isa, case):
    """Input-only and weight-only backward equal the full one; 1/2/3 threads give the same bits."""
    n, ci, co, hw, pool, k, s, p, op, act, ceil = case
    z, idx, w, b, out_hw = make_case(5, ci, co, hw, pool, k, dtype=torch.float64, seed=33, ceil_mode=ceil)
    assert_partial_gradients_equal_full(z, idx, w, b, pool, out_hw, s, p, op, act)
    assert_same_bits_for_1_2_3_threads(z.float(), idx, w.float(), b.float(), pool, out_hw, s, p, op, act)


@pytest.mark.parametrize("fmt", ["flat", "window"])
@pytest.mark.parametrize("case", [WV_CASES[0], WV_CASES[1], WV_CASES[6]], ids=["vectors", "clipped", "blocks"])
def test_cpu_window_vectors_find_the_first_bad_index(cpu_isa, case, fmt):
    """Bad indices anywhere (vector lanes, row tails, later row blocks, later images) are found by
    the packing, and the first one in row-major order is named, as first_bad_unpool_index does."""
    n, ci, co, hw, pool, k, s, p, op, act, ceil = case
    z, idx, w, b, out_hw = make_case(n, ci, co, hw, pool, k, seed=34, ceil_mode=ceil)
    pool2 = (pool, pool) if isinstance(pool, int) else pool
    window = pool2[0] * pool2[1]
    if fmt == "window":
        idx = AF.flat_to_window(idx, out_hw, pool)
    gen = torch.Generator().manual_seed(35)
    for trial in range(4):
        bad = idx.clone()
        flat_view = bad.view(-1)
        for pos in torch.randint(0, bad.numel(), (2,), generator=gen).tolist():
            if fmt == "flat":
                flat_view[pos] = -1 if trial % 2 else out_hw[0] * out_hw[1]  # outside the plane
            else:
                flat_view[pos] = window + trial  # outside the window
        first = int(torch.ops.aefast.first_bad_unpool_index(bad, list(out_hw), list(pool2), True))
        assert first >= 0
        with pytest.raises(RuntimeError, match=f"invalid index at linear position {first}\\b"):
            torch.ops.aefast.unpool_conv_transpose2d(z, bad, w, b, list(pool2), list(out_hw), [s, s], [p, p], [op, op],
                                                     act, 0.01)
    if ceil and fmt == "window":
        # an in-window offset whose element lies outside the plane (a clipped window)
        bad = idx.clone()
        bad[-1, -1, -1, -1] = window - 1
        first = int(torch.ops.aefast.first_bad_unpool_index(bad, list(out_hw), list(pool2), True))
        assert first == bad.numel() - 1
        with pytest.raises(RuntimeError, match=f"invalid index at linear position {first}\\b"):
            torch.ops.aefast.unpool_conv_transpose2d(z, bad, w, b, list(pool2), list(out_hw), [s, s], [p, p], [op, op],
                                                     act, 0.01)


# ---------------------------------------------------------------- Triton implicit-GEMM kernels

def _triton_or_skip():
    ok, why = _backend.availability()["triton"]
    if not ok:
        pytest.skip(why)
    return backend_device("triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["flat", "window"])
def test_triton_channels_last(fmt, dtype):
    """channels_last pooled values and indices go to the kernels as they are (strided loads);
    values and gradients match the composition, and the output keeps the input's layout."""
    dev = _triton_or_skip()
    # 17 and 16 channels: both kernels loop over taps, then channels (the unpacked K).
    z, idx, w, b, out_hw = make_case(2, 17, 16, (8, 10), 2, 3, dtype=dtype, device=dev, seed=21)
    flat_idx = idx
    if fmt == "window":
        idx = AF.flat_to_window(idx, out_hw, 2)
    z_cl = z.contiguous(memory_format=torch.channels_last).requires_grad_()
    idx_cl = idx.contiguous(memory_format=torch.channels_last)
    leaves = [z_cl, w.clone().requires_grad_(), b.clone().requires_grad_()]
    with aefast.set_backend("triton"):
        y = AF.unpool_conv_transpose2d(z_cl, idx_cl, leaves[1], leaves[2], 2, out_hw, 1, 1, 0, "gelu", fmt)
    assert y.is_contiguous(memory_format=torch.channels_last)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grads = torch.autograd.grad(y, leaves, g.to(dtype).to(dev))
    ref_leaves = [t.detach().cpu().double().requires_grad_() for t in leaves]
    yr = torch_decoder(ref_leaves[0], flat_idx.cpu(), ref_leaves[1], ref_leaves[2], 2, out_hw, 1, 1, 0, "gelu")
    grads_r = torch.autograd.grad(yr, ref_leaves, g)
    assert_close_all((y,) + grads, (yr,) + grads_r, dtype, scale=1.0 if dtype == torch.float32 else 2.0)


def test_triton_backward_bitwise_deterministic_with_split_k():
    """The weight gradient's position chunks (split-K) are summed in a fixed order and no kernel
    uses float atomics: three runs give the same bits, with more than one chunk in play."""
    dev = _triton_or_skip()
    from aefast.triton import unpool_deconv as kernels

    z, idx, w, b, out_hw = make_case(2, 6, 5, (12, 10), 2, 3, device=dev, seed=22)
    assert kernels._wgrad_split(2 * 12 * 10, 1) > 1
    runs = [run_both("triton", z, idx, w, b, 2, out_hw, 1, 1, 0, "leaky_relu", "window")[0] for _ in range(3)]
    for other in runs[1:]:
        for a, c in zip(runs[0], other):
            assert torch.equal(a, c)
    got, want = run_both("triton", z, idx, w, b, 2, out_hw, 1, 1, 0, "leaky_relu", "window")
    assert_close_all(got, want, torch.float32)


def test_triton_fp32_precision_follows_cudnn_tf32_flag():
    """fp32 operands run as TF32 exactly when cuDNN's convolutions would; other dtypes never."""
    _triton_or_skip()
    from aefast.triton import unpool_deconv as kernels

    saved = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = True
        assert kernels._precision(torch.float32) == "tf32"
        torch.backends.cudnn.allow_tf32 = False
        assert kernels._precision(torch.float32) == "ieee"
        assert kernels._precision(torch.bfloat16) == "ieee" and kernels._precision(torch.float64) == "ieee"
    finally:
        torch.backends.cudnn.allow_tf32 = saved


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(decoder_cases())
def test_fuzz_triton(c):
    dev = _triton_or_skip()
    z, idx, w, b, out_hw = make_case(c["n"], c["ci"], c["co"], c["out_hw"], c["pool"], c["k"], dtype=torch.float64,
                                     device=dev, seed=c["seed"], bias=c["bias"])
    got, want = run_both("triton", z, idx, w, b, c["pool"], out_hw, c["s"], c["p"], c["op"], c["act"], c["fmt"])
    assert_close_all(got, want, torch.float64)


def test_roofline_model_uses_the_kernels_tile_list():
    """bench/roofline_h100.py predicts with the decoder kernels' GPU autotune list (inlined there
    so that it runs without triton); the two must not drift apart."""
    _triton_or_skip()
    import importlib.util
    import pathlib
    import sys

    from aefast.triton import unpool_deconv as kernels

    path = pathlib.Path(__file__).resolve().parents[1] / "bench" / "roofline_h100.py"
    spec = importlib.util.spec_from_file_location("roofline_h100", path)
    roofline = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = roofline  # (dataclasses look their module up)
    try:
        spec.loader.exec_module(roofline)
    finally:
        del sys.modules[spec.name]
    for kernel in ("fwd", "dgrad", "wgrad"):
        gpu = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)
               for c in kernels._gemm_configs(False, kernel)]
        assert roofline.GPU_CONFIGS[kernel] == gpu == kernels.TILES[kernel]
    assert roofline.PACK_K_BELOW == kernels.PACK_K_BELOW
    assert roofline.WGRAD_TARGET_PROGRAMS == kernels.WGRAD_TARGET_PROGRAMS
    assert roofline.WGRAD_MIN_CHUNK == kernels.WGRAD_MIN_CHUNK


# (n, c_in, c_out, unpooled hw, pool, ceil_mode): per-entry large-slab shapes whose rows of windows
# cover the channel-mask builder's cases: clipped last windows (ceil_mode, odd sizes) and a row
# tail of lanes; more than one 64-channel word; two 8-window lane groups; a 3x3 (generic) window.
MASK_CASES = [
    (3, 5, 16, (7, 9), 2, True),
    (2, 70, 16, (6, 6), 2, False),
    (2, 6, 16, (9, 19), 2, True),
    (2, 6, 16, (8, 11), 3, True),
]


@pytest.mark.parametrize("fmt", ["flat", "window"])
@pytest.mark.parametrize("case", MASK_CASES, ids=["clipped", "two_words", "two_lane_groups", "pool3"])
def test_cpu_per_entry_masks_find_the_first_bad_index(cpu_isa, case, fmt):
    """The large-slab forward builds channel masks per row of windows (AVX-512: compares against
    the value that names each offset, -1 for an offset outside the plane). Every kind of bad
    index, placed anywhere and in particular in clipped windows (a flat -1 there equals that
    marker), raises with the first one in row-major order; the good indices match the reference."""
    n, ci, co, hw, pool, ceil = case
    z, idx, w, b, out_hw = make_case(n, ci, co, hw, pool, 3, seed=36, ceil_mode=ceil)
    window = pool * pool
    got, want = run_both("cpu", z, idx, w, b, pool, out_hw, 1, 1, 0, "relu", fmt)
    assert_close_all(got, want, torch.float32)
    if fmt == "window":
        idx = AF.flat_to_window(idx, out_hw, pool)
    gen = torch.Generator().manual_seed(37)
    ph_n, pw_n = idx.shape[2], idx.shape[3]
    spots = [(n - 1, ci - 1, ph_n - 1, pw_n - 1), (0, ci // 2, ph_n - 1, 0), (n - 1, 0, 0, pw_n - 1)]
    for trial in range(6):
        bad = idx.clone()
        if trial < len(spots):
            positions = [((spots[trial][0] * ci + spots[trial][1]) * ph_n + spots[trial][2]) * pw_n + spots[trial][3]]
        else:
            positions = torch.randint(0, bad.numel(), (2,), generator=gen).tolist()
        for pos in positions:
            if fmt == "flat":
                bad.view(-1)[pos] = -1 if trial % 2 == 0 else out_hw[0] * out_hw[1]
            else:
                bad.view(-1)[pos] = window - 1 if (ceil and trial < len(spots)) else window + trial
        first = int(torch.ops.aefast.first_bad_unpool_index(bad, list(out_hw), [pool, pool], True))
        if first < 0:  # an in-window offset that names a plane element: still valid
            continue
        with pytest.raises(RuntimeError, match=f"invalid index at linear position {first}\\b"):
            torch.ops.aefast.unpool_conv_transpose2d(z, bad, w, b, [pool, pool], list(out_hw), [1, 1], [1, 1], [0, 0],
                                                     "relu", 0.0)
