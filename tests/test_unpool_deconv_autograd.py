"""The decoder's eager autograd entry (csrc/unpool_deconv_autograd.cpp, aefast._C.unpool_conv_transpose2d_autograd).

Eager calls on plain tensors take a C++ backward node instead of the registered Python formula
(aefast/ops/unpool_deconv.py). The node must give the formula's gradients bit for bit (the same
backward kernels): every needed-gradient subset, every activation, both index formats and layouts,
clipped windows, every kernel family of the CPU forward and backward, fp16/bf16, and non-dense
incoming gradients. It refuses double backward and in-place changes of what it saved, builds no graph
when nothing needs a gradient, leaves torch.compile to the formula, serves the Triton twins too, and
the bad-index ValueError still comes through it.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import aefast
from aefast import functional as AF
from conftest import TOLERANCES, formula_path

ACTS = [None, "relu", "leaky_relu", "sigmoid", "tanh", "gelu", "silu"]
ENTRY = "aefast::UnpoolConvTranspose2DBackward"

# (n, c_in, c_out, unpooled hw, pool, kernel, stride, padding, output_padding): the CPU kernel
# families (per-entry large slabs, window vectors for C_out 1 / 3, per-entry bands for 3x3 windows),
# clipped windows (odd unpooled sizes), strided upsampling with output_padding.
CASES = [
    (2, 5, 32, (8, 10), 2, 3, 1, 1, 0),    # large slabs (9 * 32 taps)
    (2, 17, 3, (9, 11), 2, 3, 1, 1, 0),    # window vectors, clipped windows
    (1, 4, 1, (7, 7), 2, 3, 1, 0, 0),      # one output channel, no padding
    (2, 3, 8, (9, 9), 3, 3, 1, 1, 0),      # 3x3 pool windows: the bands
    (2, 6, 5, (6, 7), 2, 3, 2, 1, 1),      # stride 2, output_padding
]


def _case(shape, seed=0, dtype=torch.float32, channels_last=False):
    n, cin, cout, hw, pool, k, stride, padding, output_padding = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, *hw, generator=g)
    z, idx = F.max_pool2d(x, pool, return_indices=True)
    w = torch.randn(cin, cout, k, k, generator=g) / (cin * k * k) ** 0.5
    b = torch.randn(cout, generator=g)
    window = AF.flat_to_window(idx, hw, pool)
    z, w, b = (t.to(dtype) for t in (z, w, b))
    if channels_last:
        z, idx, window = (t.contiguous(memory_format=torch.channels_last) for t in (z, idx, window))
    kwargs = dict(pool_size=pool, output_size=hw, stride=stride, padding=padding, output_padding=output_padding)
    return z, idx, window, w, b, kwargs


def _run(z, indices, w, b, kwargs, fmt, act, needs=(True, True, True), grad_of=None, seed=7):
    leaves = [t.detach().clone().requires_grad_(need) for t, need in zip((z, w, b), needs)]
    y = AF.unpool_conv_transpose2d(leaves[0], indices, leaves[1], leaves[2], activation=act, index_format=fmt,
                                   negative_slope=0.2, **kwargs)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype)
    y.backward(grad_of(g) if grad_of is not None else g)
    return y, [t.grad for t in leaves]


def _assert_same(entry, formula, needs=(True, True, True)):
    (y, grads), (y_formula, grads_formula) = entry, formula
    assert y.grad_fn.name() == ENTRY
    assert y_formula.grad_fn.name() != ENTRY
    assert torch.equal(y.detach(), y_formula.detach())  # the same forward kernel
    assert y.stride() == y_formula.stride()
    for got, want, need in zip(grads, grads_formula, needs):
        assert (got is None) == (not need)
        if need:
            assert got.stride() == want.stride()
            torch.testing.assert_close(got, want, rtol=0, atol=0)  # the same backward kernels


@pytest.mark.parametrize("shape", CASES)
@pytest.mark.parametrize("fmt", ["flat", "window"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("act", ["relu", "gelu"])  # act' from the output / from the saved pre-activation
def test_entry_matches_formula(shape, fmt, channels_last, act):
    z, idx, window, w, b, kwargs = _case(shape, channels_last=channels_last)
    indices = idx if fmt == "flat" else window
    with aefast.set_backend("cpu"):
        entry = _run(z, indices, w, b, kwargs, fmt, act)
        formula = formula_path(lambda: _run(z, indices, w, b, kwargs, fmt, act))
    _assert_same(entry, formula)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True),
                                   (True, False, True), (False, True, True)])
def test_entry_every_activation_and_gradient_subset(act, needs):
    z, idx, _, w, b, kwargs = _case(CASES[0], seed=1)
    with aefast.set_backend("cpu"):
        entry = _run(z, idx, w, b, kwargs, "flat", act, needs)
        formula = formula_path(lambda: _run(z, idx, w, b, kwargs, "flat", act, needs))
    _assert_same(entry, formula, needs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_entry_other_dtypes(dtype):
    z, idx, window, w, b, kwargs = _case(CASES[1], seed=2, dtype=dtype)
    with aefast.set_backend("cpu"):
        entry = _run(z, window, w, b, kwargs, "window", "silu")
        formula = formula_path(lambda: _run(z, window, w, b, kwargs, "window", "silu"))
    _assert_same(entry, formula)


@pytest.mark.parametrize("layout", ["strided", "channels_last"])
def test_entry_reads_a_non_dense_or_channels_last_gradient_as_the_formula_does(layout):
    z, idx, _, w, b, kwargs = _case(CASES[0], seed=3)

    def grad_of(g):
        if layout == "channels_last":
            return g.contiguous(memory_format=torch.channels_last)
        return torch.cat([g, g], dim=3)[..., ::2]  # dense in no layout: the kernels get a copy

    with aefast.set_backend("cpu"):
        entry = _run(z, idx, w, b, kwargs, "flat", "leaky_relu", grad_of=grad_of)
        formula = formula_path(lambda: _run(z, idx, w, b, kwargs, "flat", "leaky_relu", grad_of=grad_of))
    _assert_same(entry, formula)


@pytest.mark.parametrize("act", ACTS)
def test_entry_matches_torch(act):
    """Against torch's max_unpool2d -> conv_transpose2d -> act: values and all three gradients."""
    z, idx, _, w, b, kwargs = _case(CASES[1], seed=4)
    with aefast.set_backend("cpu"):
        y, grads = _run(z, idx, w, b, kwargs, "flat", act)
    leaves = [t.detach().clone().requires_grad_() for t in (z, w, b)]
    u = F.max_unpool2d(leaves[0], idx, kwargs["pool_size"], output_size=kwargs["output_size"])
    pre = F.conv_transpose2d(u, leaves[1], leaves[2], kwargs["stride"], kwargs["padding"], kwargs["output_padding"])
    acts = {None: lambda t: t, "leaky_relu": lambda t: F.leaky_relu(t, 0.2)}
    want = acts.get(act, getattr(F, act or "relu"))(pre)
    want.backward(torch.randn(want.shape, generator=torch.Generator().manual_seed(7)))
    torch.testing.assert_close(y.detach(), want.detach(), **TOLERANCES[torch.float32])
    for got, leaf in zip(grads, leaves):
        torch.testing.assert_close(got, leaf.grad, **TOLERANCES[torch.float32])


def test_entry_gradcheck_fp64():
    z, idx, window, w, b, kwargs = _case(CASES[4], seed=5, dtype=torch.float64)
    z, w, b = (t.requires_grad_() for t in (z, w, b))
    with aefast.set_backend("cpu"):
        def fn(z, w, b):
            return AF.unpool_conv_transpose2d(z, window, w, b, activation="tanh", index_format="window", **kwargs)

        assert fn(z, w, b).grad_fn.name() == ENTRY
        assert torch.autograd.gradcheck(fn, (z, w, b))


def test_entry_builds_no_graph_without_grad_and_refuses_what_it_cannot_do():
    z, idx, _, w, b, kwargs = _case(CASES[0], seed=6)
    with aefast.set_backend("cpu"):
        y = AF.unpool_conv_transpose2d(z, idx, w, b, activation="relu", **kwargs)
        assert y.grad_fn is None and not y.requires_grad
        wl = w.clone().requires_grad_()
        with torch.no_grad():
            assert AF.unpool_conv_transpose2d(z, idx, wl, b, activation="relu", **kwargs).grad_fn is None
        y = AF.unpool_conv_transpose2d(z, idx, wl, b, activation="relu", **kwargs)
        assert y.grad_fn.name() == ENTRY
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(y.sum(), wl, create_graph=True)
        # relu's derivative is read from the output, which the node saved: changing it is caught,
        y = AF.unpool_conv_transpose2d(z, idx, wl, b, activation="relu", **kwargs)
        y.mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()
        # and so is changing the saved indices.
        own = idx.clone()
        y = AF.unpool_conv_transpose2d(z, own, wl, b, activation="relu", **kwargs)
        own.add_(0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()


# Forward-mode AD: the eager entries have no jvp formula, so a tangent on any differentiable
# argument (the bias too) is a clear error, never silently dropped.
@pytest.mark.parametrize("dual_arg", [0, 1, 2])
@pytest.mark.parametrize("block", ["unpool_conv_transpose2d", "conv_transpose_act2d", "conv_pool2d"])
def test_entries_refuse_a_tangent_on_any_argument(dual_arg, block):
    import torch.autograd.forward_ad as fwAD

    z, idx, _, w, b, kwargs = _case(CASES[0], seed=11)
    calls = {
        "unpool_conv_transpose2d": lambda z, w, b: AF.unpool_conv_transpose2d(z, idx, w, b, activation="relu", **kwargs),
        "conv_transpose_act2d": lambda z, w, b: AF.conv_transpose_act2d(z, w, b, 1, 1, activation="relu"),
        "conv_pool2d": lambda z, w, b: AF.conv_pool2d(z, w.transpose(0, 1).contiguous(), b, 1, 1, "relu", 2)[0],
    }
    args = [z, w, b]
    with aefast.set_backend("cpu"), fwAD.dual_level():
        args[dual_arg] = fwAD.make_dual(args[dual_arg], torch.ones_like(args[dual_arg]))
        with pytest.raises(RuntimeError, match="forward-mode AD"):
            calls[block](*args)


def test_entry_reports_bad_indices_as_the_formula_does():
    z, idx, _, w, b, kwargs = _case(CASES[0], seed=8)
    bad = idx.clone()
    bad[1, 2, 1, 3] = bad[1, 2, 1, 2]  # the neighbouring window's argmax: not in its own window
    wl = w.clone().requires_grad_()
    with aefast.set_backend("cpu"):
        with pytest.raises(ValueError, match=r"position \(1, 2, 1, 3\)") as entry:
            AF.unpool_conv_transpose2d(z, bad, wl, b, activation="relu", **kwargs)
        with pytest.raises(ValueError) as formula:
            formula_path(lambda: AF.unpool_conv_transpose2d(z, bad, wl, b, activation="relu", **kwargs))
    assert str(entry.value) == str(formula.value)


def test_entry_leaves_torch_compile_to_the_formula():
    z, idx, _, w, b, kwargs = _case(CASES[1], seed=9)

    def loss(w):
        return AF.unpool_conv_transpose2d(z, idx, w, b, activation="sigmoid", **kwargs).square().sum()

    with aefast.set_backend("cpu"):
        wc = w.clone().requires_grad_()
        torch.compile(loss, fullgraph=True, backend="aot_eager")(wc).backward()
        we = w.clone().requires_grad_()
        loss(we).backward()
    torch.testing.assert_close(wc.grad, we.grad, **TOLERANCES[torch.float32])


def test_entry_serves_the_triton_twins():
    pytest.importorskip("triton")
    z, idx, window, w, b, kwargs = _case((1, 3, 4, (6, 5), 2, 3, 1, 1, 0), seed=10)
    with aefast.set_backend("triton"):
        entry = _run(z, window, w, b, kwargs, "window", "leaky_relu")
        formula = formula_path(lambda: _run(z, window, w, b, kwargs, "window", "leaky_relu"))
    _assert_same(entry, formula)
