"""channels_last on the CPU decoder kernels (aefast::unpool_conv_transpose2d and its backward).

The layout rule, as torch's convolutions: a channels_last input (pooled map + indices) gives a
channels_last output (and pre-activation), grad_input comes back in the input's layout, and a
channels_last grad_out is read as it is. The kernels run the same sums in the same order in
both layouts (a channels_last image is transposed into the planar order per image), so the
output, grad_input and grad_weight are bitwise those of the NCHW run; grad_bias sums the
pixels per channel in another order there (equal to rounding). The fake functions must give
the kernels' strides (Inductor checks them).
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import aefast
from aefast import functional as AF
from conftest import aefast_strides_cross_checked
from test_unpool_deconv import make_case, torch_decoder

CL = torch.channels_last
ISAS = {"baseline": 0, "avx2": 1, "avx512": 2}
_BEST_ISA = torch.ops.aefast.unpool_deconv_cpu_isa()

# One case per CPU loop order (see tests/test_unpool_deconv.py PATH_CASES / WV_CASES):
# (n, c_in, c_out, unpooled hw, pool, k, stride, padding, output_padding, act, ceil_mode)
CASES = [
    (3, 32, 1, (12, 12), 2, 3, 1, 1, 0, "sigmoid", False),     # window vectors, C_out 1
    (2, 5, 3, (9, 37), 2, 3, 1, 1, 0, "leaky_relu", True),     # window vectors, clipped, pre saved
    (2, 8, 16, (8, 8), 2, 3, 1, 1, 0, "relu", False),          # per channel, nb read from gpad
    (2, 6, 17, (7, 9), 2, 3, 2, 1, 1, "gelu", False),          # per channel through the im2col
    (2, 64, 32, (6, 6), 2, 3, 1, 1, 0, "relu", False),         # several weight chunks, row ring
    (2, 4, 6, (8, 7), 3, 2, 2, 0, 1, "silu", True),            # small slabs, 3x3 windows (bands)
    (1, 3, 40, (6, 6), 2, 1, 1, 0, 0, "tanh", False),          # 1x1 kernel
]
IDS = [f"{c[1]}to{c[2]}_{c[3][0]}x{c[3][1]}_pool{c[4]}_{c[9]}" for c in CASES]


def _grad(case, seed, dtype=torch.float32):
    """A random grad_out of the case's output shape."""
    n, ci, co, hw, pool, k, s, p, op, act, _ = case
    kk = (k, k) if isinstance(k, int) else k
    shape = (n, co) + tuple((hw[a] - 1) * s - 2 * p + kk[a] + op for a in range(2))
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def _run(z, idx, w, b, case, fmt, z_layout, g_layout, grad):
    n, ci, co, hw, pool, k, s, p, op, act, _ = case
    if fmt == "window":
        idx = AF.flat_to_window(idx, hw, pool)
    zl = z.contiguous(memory_format=z_layout).requires_grad_()
    il = idx.contiguous(memory_format=z_layout)
    leaves = [zl, w.clone().requires_grad_(), b.clone().requires_grad_()]
    with aefast.set_backend("cpu"):
        y = AF.unpool_conv_transpose2d(zl, il, leaves[1], leaves[2], pool, hw, s, p, op, act, fmt)
    grads = torch.autograd.grad(y, leaves, grad.contiguous(memory_format=g_layout))
    return (y,) + grads


@pytest.fixture(params=list(ISAS))
def cpu_isa(request, monkeypatch):
    if ISAS[request.param] > _BEST_ISA:
        pytest.skip(f"this CPU lacks {request.param}")
    monkeypatch.setenv("AEFAST_CPU_ISA", request.param)
    return request.param


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("fmt", ["flat", "window"])
def test_channels_last_matches_nchw_bitwise_per_isa(cpu_isa, case, fmt, monkeypatch):
    # The sparse kernels in both layouts (small-C_in channels_last forwards default to the vendor's
    # conv: test_vendor_forward_* below).
    monkeypatch.setenv("AEFAST_DECODER_FORWARD", "sparse")
    n, ci, co, hw, pool, k, s, p, op, act, ceil_mode = case
    z, idx, w, b, _ = make_case(n, ci, co, hw, pool, k, seed=31, ceil_mode=ceil_mode)
    grad = _grad(case, 5)
    want = _run(z, idx, w, b, case, fmt, torch.contiguous_format, torch.contiguous_format, grad)
    got = _run(z, idx, w, b, case, fmt, CL, CL, grad)
    y, gz, gw, gb = got
    assert y.is_contiguous(memory_format=CL) and (co == 1 or not y.is_contiguous())  # C_out 1: both layouts
    assert gz.is_contiguous(memory_format=CL) and not gz.is_contiguous()
    assert gw.is_contiguous()
    torch.testing.assert_close(y, want[0], rtol=0, atol=0)
    torch.testing.assert_close(gz, want[1], rtol=0, atol=0)
    torch.testing.assert_close(gw, want[2], rtol=0, atol=0)
    torch.testing.assert_close(gb, want[3], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", [CASES[1], CASES[4], CASES[5]], ids=["window_vectors", "chunks", "bands"])
@pytest.mark.parametrize("layouts", [("cl", "nchw"), ("nchw", "cl")], ids=["input-cl", "grad-cl"])
def test_mixed_layouts_match_the_composition(case, layouts):
    """Input and grad_out in different layouts: grad_input follows the input, values follow eager."""
    to = {"nchw": torch.contiguous_format, "cl": CL}
    n, ci, co, hw, pool, k, s, p, op, act, ceil_mode = case
    z, idx, w, b, _ = make_case(n, ci, co, hw, pool, k, dtype=torch.float64, seed=32, ceil_mode=ceil_mode)
    grad = _grad(case, 6, torch.float64)
    y, gz, gw, gb = _run(z, idx, w, b, case, "flat", to[layouts[0]], to[layouts[1]], grad)
    assert y.is_contiguous(memory_format=to[layouts[0]]) and gz.is_contiguous(memory_format=to[layouts[0]])
    leaves = [t.clone().requires_grad_() for t in (z, w, b)]
    yr = torch_decoder(leaves[0], idx, leaves[1], leaves[2], pool, hw, s, p, op, act)
    want = (yr,) + torch.autograd.grad(yr, leaves, grad)
    for a, r in zip((y, gz, gw, gb), want):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_channels_last_low_precision(dtype):
    case = CASES[4]
    n, ci, co, hw, pool, k, s, p, op, act, _ = case
    z, idx, w, b, _ = make_case(n, ci, co, hw, pool, k, dtype=dtype, seed=33)
    grad = _grad(case, 7, dtype)
    got = _run(z, idx, w, b, case, "window", CL, CL, grad)
    want = _run(z, idx, w, b, case, "window", torch.contiguous_format, torch.contiguous_format, grad)
    assert all(t.dtype == dtype for t in got)
    for a, r in zip(got[:3], want[:3]):
        torch.testing.assert_close(a, r, rtol=0, atol=0)
    torch.testing.assert_close(got[3], want[3], rtol=1e-2, atol=1e-2)


class _AtenCalls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


def test_channels_last_step_makes_no_layout_copies():
    """A channels_last forward + backward dispatches no copy (clone / _to_copy / copy_) around the
    kernels: the pooled map, the indices and grad_out go to them as they are."""
    case = CASES[4]
    n, ci, co, hw, pool, k, s, p, op, act, _ = case
    z, idx, w, b, _ = make_case(n, ci, co, hw, pool, k, seed=34)
    zl = z.contiguous(memory_format=CL).requires_grad_()
    il = AF.flat_to_window(idx, hw, pool).contiguous(memory_format=CL)
    w, b = w.requires_grad_(), b.requires_grad_()
    with aefast.set_backend("cpu"):
        y = AF.unpool_conv_transpose2d(zl, il, w, b, pool, hw, s, p, op, act, "window")
    grad = torch.randn(y.shape).contiguous(memory_format=CL)
    with _AtenCalls() as calls:
        with aefast.set_backend("cpu"):
            y = AF.unpool_conv_transpose2d(zl, il, w, b, pool, hw, s, p, op, act, "window")
        torch.autograd.grad(y, (zl, w, b), grad)
    copies = [c for c in calls.names if any(x in c for x in ("clone", "_to_copy", "copy_", "contiguous"))]
    assert copies == [], calls.names
    assert any("unpool_conv_transpose2d_backward" in c for c in calls.names), calls.names


@pytest.mark.parametrize("act", ["relu", "gelu"])
@pytest.mark.parametrize("case", [CASES[1], CASES[4]], ids=["window_vectors", "chunks"])
@pytest.mark.parametrize("layouts", [("nchw", "nchw"), ("nchw", "cl"), ("cl", "nchw"), ("cl", "cl")],
                         ids=lambda l: "x-%s_grad-%s" % l)
def test_cpu_fake_strides_match_the_kernels(act, case, layouts):
    """torch's CrossRefFakeMode runs each aefast op's fake (meta) function beside the kernel and
    compares shapes and strides (as Inductor does), forward and backward, in every layout mix."""
    to = {"nchw": torch.contiguous_format, "cl": CL}
    n, ci, co, hw, pool, k, s, p, op, _, ceil_mode = case
    z, idx, w, b, _ = make_case(n, ci, co, hw, pool, k, seed=35, ceil_mode=ceil_mode)
    zl = z.contiguous(memory_format=to[layouts[0]]).requires_grad_()
    il = idx.contiguous(memory_format=to[layouts[0]])
    w, b = w.requires_grad_(), b.requires_grad_()
    with aefast_strides_cross_checked() as checked:
        with aefast.set_backend("cpu"):
            y = AF.unpool_conv_transpose2d(zl, il, w, b, pool, hw, s, p, op, act, "flat")
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(8)).contiguous(memory_format=to[layouts[1]])
        y.backward(g)
    assert "aefast::unpool_conv_transpose2d" in checked and "aefast::unpool_conv_transpose2d_backward" in checked, \
        checked


# ---------------------------------------------------------------- the vendor-conv forward
# Channels-last decoders with few input channels run the forward as scatter + oneDNN's transposed
# conv (csrc/cpu/unpool_deconv.cpp decoder_forward_uses_vendor); the backward stays sparse.
VENDOR_CASES = [CASES[2], CASES[3], CASES[4], CASES[5], (2, 16, 8, (11, 13), 2, 3, 1, 1, 0, "leaky_relu", True)]


@pytest.mark.parametrize("case", VENDOR_CASES, ids=[f"{c[1]}to{c[2]}_{c[3][0]}x{c[3][1]}_pool{c[4]}_{c[9]}"
                                                    for c in VENDOR_CASES])
@pytest.mark.parametrize("fmt", ["flat", "window"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_vendor_forward_matches_the_composition(case, fmt, dtype, monkeypatch):
    """Forced onto the vendor path (any dtype, either layout), outputs and gradients equal eager's
    unpool -> conv_transpose2d -> act; the path named in the profiler is the forced one."""
    monkeypatch.setenv("AEFAST_DECODER_FORWARD", "vendor")
    n, ci, co, hw, pool, k, s, p, op, act, ceil_mode = case
    z, idx, w, b, _ = make_case(n, ci, co, hw, pool, k, dtype=torch.float64, seed=41, ceil_mode=ceil_mode)
    grad = _grad(case, 8, torch.float64)
    cast = [t.to(dtype) for t in (z, w, b, grad)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        y, gz, gw, gb = _run(cast[0], idx, cast[1], cast[2], case, fmt, CL, CL, cast[3])
    assert "aefast path: unpool_conv_transpose2d vendor conv" in {e.name for e in prof.events()}
    assert y.is_contiguous(memory_format=CL) and y.dtype == dtype
    # The reference in fp64 from the same (rounded) operands.
    leaves = [t.double().requires_grad_() for t in cast[:3]]
    yr = torch_decoder(leaves[0], idx, leaves[1], leaves[2], pool, hw, s, p, op, act)
    want = (yr,) + torch.autograd.grad(yr, leaves, cast[3].double())
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 3e-2}[dtype]
    for name, a, r in zip(("out", "grad_z", "grad_w", "grad_b"), (y, gz, gw, gb), want):
        torch.testing.assert_close(a.double(), r, rtol=tol, atol=tol * max(1.0, r.abs().max().item()),
                                   msg=lambda m: f"{name}: {m}")


def test_vendor_forward_rejects_bad_indices_like_the_sparse_kernels(monkeypatch):
    """An index outside its own pool window: the same ValueError (naming the same first position)
    from the vendor path as from the sparse kernels."""
    n, ci, co, hw, pool, k, s, p, op, act, _ = VENDOR_CASES[0]
    z, idx, w, b, _ = make_case(n, ci, co, hw, pool, k, seed=42)
    idx = idx.clone()
    idx[1, 3, 2, 1] = 0  # window (2, 1) starts at row 4: position 0 is outside it
    idx[1, 5, 3, 0] = 0
    messages = {}
    for mode in ("vendor", "sparse"):
        monkeypatch.setenv("AEFAST_DECODER_FORWARD", mode)
        with pytest.raises(ValueError) as err:
            with aefast.set_backend("cpu"):
                AF.unpool_conv_transpose2d(z.contiguous(memory_format=CL), idx.contiguous(memory_format=CL), w, b,
                                           pool, hw, s, p, op, act, "flat")
        messages[mode] = str(err.value)
    assert messages["vendor"] == messages["sparse"]


def test_vendor_forward_rule_and_switch(monkeypatch):
    """The rule takes the vendor conv for a channels-last fp32 decoder with few input channels and
    keeps the sparse kernels for NCHW, fp64, many input channels and C_out < 8; a bad switch value
    raises."""
    def path(n, ci, co, hw, layout, dtype=torch.float32):
        z, idx, w, b, _ = make_case(n, ci, co, hw, 2, 3, dtype=dtype, seed=43)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            with aefast.set_backend("cpu"):
                AF.unpool_conv_transpose2d(z.contiguous(memory_format=layout), idx.contiguous(memory_format=layout),
                                           w, b, 2, hw, 1, 1, 0, "relu", "flat")
        return {e.name for e in prof.events()} & {"aefast path: unpool_conv_transpose2d vendor conv"}
    monkeypatch.delenv("AEFAST_DECODER_FORWARD", raising=False)
    assert path(2, 16, 16, (8, 8), CL)
    assert not path(2, 16, 16, (8, 8), torch.contiguous_format)
    assert not path(2, 16, 16, (8, 8), CL, torch.float64)
    assert not path(2, 64, 32, (8, 8), CL)
    assert not path(2, 16, 3, (8, 8), CL)
    monkeypatch.setenv("AEFAST_DECODER_FORWARD", "dense")
    with pytest.raises(RuntimeError, match="AEFAST_DECODER_FORWARD"):
        path(2, 16, 16, (8, 8), CL)
