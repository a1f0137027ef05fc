"""conv_transpose_act2d: the decoder's upsampler without unpool, act(conv_transpose2d(...)) fused.

Held to the reference twin and to torch's own ConvTranspose2d -> activation on every backend that
runs here (cpu, triton under the interpreter, reference; cuda when present), forward and backward,
fp32/fp16/bf16, output_padding, odd sizes; fp64 gradcheck; opcheck of both ops on both namespaces;
hypothesis fuzz; clear errors for what it refuses (groups, dilation, bad shapes)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import aefast
from aefast import backend as _backend
from aefast import functional as AF
from aefast.ops import _registry
from aefast.reference import functional as ref
from conftest import TOLERANCES, backend_device, backend_grid

ACTS = [None, "relu", "leaky_relu", "sigmoid", "tanh", "gelu", "silu"]


def torch_upsampler(x, w, b, stride, padding, output_padding, act, slope=0.01):
    y = F.conv_transpose2d(x, w, b, stride, padding, output_padding)
    if act is None:
        return y
    if act == "leaky_relu":
        return F.leaky_relu(y, slope)
    return getattr(F, act)(y)


def make(n, ci, co, hw, k, *, bias=True, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    k = (k, k) if isinstance(k, int) else k
    x = torch.randn(n, ci, *hw, generator=g, dtype=torch.float64)
    w = torch.randn(ci, co, *k, generator=g, dtype=torch.float64) / (ci * k[0] * k[1]) ** 0.5
    b = torch.randn(co, generator=g, dtype=torch.float64) if bias else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return cast(x), cast(w), cast(b)


def run_and_grads(fn, x, w, b, seed=1):
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b) if t is not None]
    y = fn(*leaves) if b is not None else fn(*leaves, None)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(y)
    y.backward(g)
    return y.detach(), [t.grad for t in leaves]


def check_against_torch(x, w, b, stride, padding, output_padding, act, tol, slope=0.01):
    got, got_grads = run_and_grads(
        lambda x, w, b: AF.conv_transpose_act2d(x, w, b, stride, padding, output_padding, activation=act,
                                                negative_slope=slope), x, w, b)
    # torch's composition in fp64 on the CPU is the ground truth for every dtype.
    x64, w64, b64 = (None if t is None else t.detach().cpu().double() for t in (x, w, b))
    want, want_grads = run_and_grads(lambda x, w, b: torch_upsampler(x, w, b, stride, padding, output_padding, act,
                                                                     slope), x64, w64, b64)
    torch.testing.assert_close(got.cpu().double(), want, **tol)
    for a, e in zip(got_grads, want_grads):
        scale = max(1.0, e.abs().max().item())
        torch.testing.assert_close(a.cpu().double(), e, rtol=tol["rtol"], atol=tol["atol"] * scale)


# (n, c_in, c_out, hw, k, stride, padding, output_padding)
GRID = [
    (2, 4, 3, (5, 7), 2, 2, 0, 0),        # U-Net / tutorial: 2x2 stride 2, odd sizes
    (1, 3, 17, (4, 5), 3, 2, 1, 1),       # VAE: 3x3 stride 2 padding 1 output_padding 1, batch 1, 17 out
    (2, 17, 3, (3, 3), 4, 2, 0, 0),       # FCN upscore2: 4x4 stride 2
    (1, 3, 2, (3, 4), 16, 8, 0, 0),       # FCN upscore8: 16x16 stride 8
    (2, 5, 4, (1, 1), 3, 2, 0, 1),        # 1x1 input
    (2, 3, 5, (4, 6), (2, 4), (2, 3), (0, 1), (1, 2)),  # rectangular everything
    (3, 2, 3, (5, 5), 3, 1, 1, 0),        # stride 1
]
TRITON_GRID = [GRID[0], GRID[1], GRID[5]]


@pytest.mark.parametrize("case", GRID)
@pytest.mark.parametrize("act", ["relu", "leaky_relu"])
def test_grid_cpu_and_reference(case, act):
    n, ci, co, hw, k, s, p, op = case
    x, w, b = make(n, ci, co, hw, k)
    for name in ("cpu", "reference"):
        with aefast.set_backend(name):
            check_against_torch(x, w, b, s, p, op, act, TOLERANCES[torch.float32], slope=0.2)


# AEFAST_CONV_TRANSPOSE_FORWARD=gather|vendor overrides the forward's C_out rule (use_gather_forward,
# csrc/cpu/conv_transpose_act.cpp) for A/B timing (bench/bench_kernel_ledger.py): each kernel held to
# torch on a C_out the rule gives the other one, and each names itself in the profiler, as the
# rule's pick does.
@pytest.mark.parametrize("case", [GRID[0], GRID[1]], ids=["cout3", "cout17"])
def test_cpu_forward_kernel_switch(case, monkeypatch):
    # oneDNN, not the GEMM + col2im form, for the non-gather path (tests/test_vae_speed_paths.py
    # covers that switch).
    monkeypatch.setenv("AEFAST_CONV_TRANSPOSE_GEMM", "never")
    n, ci, co, hw, k, s, p, op = case
    x, w, b = make(n, ci, co, hw, k, dtype=torch.float32)

    def paths():
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            torch.ops.aefast.conv_transpose_act2d(x, w, b, [s, s], [p, p], [op, op], None, 0.0)
        # (the gather kernel is the decoder's, which names its own path too)
        return {e.name for e in prof.events() if e.name.startswith("aefast path: conv_transpose_act2d")}

    assert paths() == {"aefast path: conv_transpose_act2d " + ("gather" if co <= 4 else "onednn")}
    for kernel, path in (("gather", "gather"), ("vendor", "onednn")):
        monkeypatch.setenv("AEFAST_CONV_TRANSPOSE_FORWARD", kernel)
        with aefast.set_backend("cpu"):
            check_against_torch(x, w, b, s, p, op, "relu", TOLERANCES[torch.float32])
        assert paths() == {f"aefast path: conv_transpose_act2d {path}"}
    monkeypatch.setenv("AEFAST_CONV_TRANSPOSE_FORWARD", "onednn")
    with pytest.raises(RuntimeError, match="AEFAST_CONV_TRANSPOSE_FORWARD"):
        torch.ops.aefast.conv_transpose_act2d(x, w, b, [s, s], [p, p], [op, op], None, 0.0)


@pytest.mark.parametrize("case", TRITON_GRID)
def test_grid_kernel_backends(kernel_backend, case):
    n, ci, co, hw, k, s, p, op = case
    x, w, b = make(n, ci, co, hw, k, device=backend_device(kernel_backend))
    check_against_torch(x, w, b, s, p, op, "relu", TOLERANCES[torch.float32])
    assert not _backend.fallback_counts(), "served by the backend, not the reference fallback"


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("c_out", [4, 5])  # the CPU fp32 forward's two kernels: the gather one for C_out <= 4, oneDNN
def test_activations(kernel_backend, act, c_out):
    x, w, b = make(2, 3, c_out, (3, 5), 3, device=backend_device(kernel_backend), seed=3)
    check_against_torch(x, w, b, 2, 1, 1, act, TOLERANCES[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", [None, "relu", "sigmoid", "silu"])
def test_low_precision(kernel_backend, dtype, act):
    x, w, b = make(2, 5, 3, (5, 6), 3, dtype=dtype, device=backend_device(kernel_backend), seed=4)
    check_against_torch(x, w, b, 2, 1, 1, act, TOLERANCES[dtype])
    got = AF.conv_transpose_act2d(x, w, b, 2, 1, 1, activation=act)
    assert got.dtype == dtype


def test_no_bias_and_partial_grads():
    x, w, _ = make(2, 3, 4, (4, 4), 2, seed=5)
    check_against_torch(x, w, None, 2, 0, 0, "tanh", TOLERANCES[torch.float32])
    # only the weight needs a gradient
    wl = w.clone().requires_grad_()
    AF.conv_transpose_act2d(x, wl, None, 2, activation="gelu").sum().backward()
    wr = w.clone().requires_grad_()
    torch_upsampler(x, wr, None, 2, 0, 0, "gelu").sum().backward()
    torch.testing.assert_close(wl.grad, wr.grad, **TOLERANCES[torch.float32])


def test_channels_last_in_channels_last_out(backend):
    x, w, b = make(2, 4, 3, (5, 5), 3, device=backend_device(backend), seed=6)
    y = AF.conv_transpose_act2d(x.contiguous(memory_format=torch.channels_last), w, b, 2, 1, 1, activation="relu")
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, torch_upsampler(x, w, b, 2, 1, 1, "relu"), **TOLERANCES[torch.float32])


_WHICH = ["input", "weight", "both"]
# The Triton interpreter runs each activation with one of the three layouts, in turn (strides are no
# kernel constexpr: the same specializations as the full product, 7 cases instead of 21).
CL_CASES = [(act, which) for which in _WHICH for act in ACTS]
CL_CASES_INTERPRETED = [(act, _WHICH[i % 3]) for i, act in enumerate(ACTS)]


@pytest.mark.parametrize("kernel_backend,act,which",
                         backend_grid(CL_CASES, CL_CASES_INTERPRETED, lambda c: f"{c[1]}-{c[0]}",
                                      backends=("cpu", "triton", "cuda")),
                         indirect=["kernel_backend"])
def test_channels_last_is_kept_forward_and_backward(kernel_backend, act, which):
    """A model run in channels_last (aefast.optimize's layout pass) pays no reorder here: with a
    channels_last input or weight (oneDNN's own rule) the output and both gradients come back
    channels_last, as torch's ConvTranspose2d gives them, and the values are torch's."""
    x, w, b = make(2, 4, 3, (5, 6), 3, device=backend_device(kernel_backend), seed=13)
    cl = torch.channels_last
    x = x.contiguous(memory_format=cl) if which in ("input", "both") else x
    w = w.contiguous(memory_format=cl) if which in ("weight", "both") else w
    check_against_torch(x, w, b, 2, 1, 1, act, TOLERANCES[torch.float32])
    got = AF.conv_transpose_act2d(x, w, b, 2, 1, 1, activation=act)
    assert got.is_contiguous(memory_format=cl) and got.stride() == torch_upsampler(x, w, b, 2, 1, 1, act).stride()
    if x.device.type == "cpu" and kernel_backend == "cpu":  # the kernels' own gradients, before autograd's copy
        out, pre = torch.ops.aefast.conv_transpose_act2d(x, w, b, [2, 2], [1, 1], [1, 1], act, 0.01)
        gi, gw, _ = torch.ops.aefast.conv_transpose_act2d_backward(
            torch.randn_like(out), pre if pre.numel() else out, x, w, [2, 2], [1, 1], [1, 1], act, 0.01,
            [True, True, True])
        assert gi.is_contiguous(memory_format=cl) and gw.is_contiguous(memory_format=cl)


@pytest.mark.parametrize("act", [None, "relu", "leaky_relu"])
def test_channels_last_gradcheck_and_opcheck(act):
    x, w, b = make(2, 3, 2, (3, 4), 3, dtype=torch.float64, seed=14)
    leaves = [x.contiguous(memory_format=torch.channels_last).requires_grad_(),
              w.contiguous(memory_format=torch.channels_last).requires_grad_(), b.clone().requires_grad_()]

    def fn(x, w, b):
        with aefast.set_backend("cpu"):
            return AF.conv_transpose_act2d(x, w, b, 2, 1, 1, activation=act)

    assert torch.autograd.gradcheck(fn, leaves)
    args = [leaves[0].detach().float().contiguous(memory_format=torch.channels_last).requires_grad_(),
            leaves[1].detach().float().contiguous(memory_format=torch.channels_last).requires_grad_(),
            leaves[2].detach().float().requires_grad_(), [2, 2], [1, 1], [1, 0], act, 0.01]
    torch.library.opcheck(_registry.op("cpu", "conv_transpose_act2d"), args)
    out, pre = _registry.op("cpu", "conv_transpose_act2d")(*(t.detach() if isinstance(t, torch.Tensor) else t
                                                             for t in args))
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(_registry.op("cpu", "conv_transpose_act2d_backward"),
                          [torch.randn_like(out), pre if act == "leaky_relu" else out, args[0].detach(),
                           args[1].detach(), [2, 2], [1, 1], [1, 0], act, 0.01, [True, True, True]])


def test_nan_propagates_through_relu():
    x, w, b = make(1, 2, 2, (3, 3), 2, seed=7)
    x[0, 0, 1, 1] = float("nan")
    y = AF.conv_transpose_act2d(x, w, b, 2, activation="relu")
    assert torch.equal(y.isnan(), torch_upsampler(x, w, b, 2, 0, 0, "relu").isnan())


def test_deterministic_and_thread_independent():
    x, w, b = make(3, 6, 5, (9, 11), 3, seed=8)
    results = []
    threads = torch.get_num_threads()
    try:
        for t in (1, max(2, threads)):
            torch.set_num_threads(t)
            results.append(run_and_grads(lambda x, w, b: AF.conv_transpose_act2d(x, w, b, 2, 1, 1,
                                                                                activation="leaky_relu"), x, w, b))
    finally:
        torch.set_num_threads(threads)
    (y0, g0), (y1, g1) = results
    assert torch.equal(y0, y1)
    # grad_b is ours (fixed-order plane sums in the gpre pass); grad_input / grad_weight are
    # oneDNN's, held to tolerance.
    assert torch.equal(g0[2], g1[2])
    for a, e in zip(g0[:2], g1[:2]):
        torch.testing.assert_close(a, e, **TOLERANCES[torch.float32])


def test_module_matches_conv_transpose_and_state_dict():
    torch.manual_seed(0)
    m = aefast.nn.ConvTransposeAct2d(4, 3, 3, stride=2, padding=1, output_padding=1, activation="leaky_relu",
                                     negative_slope=0.2)
    torch.manual_seed(0)
    twin = torch.nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1)
    assert set(m.state_dict()) == set(twin.state_dict())
    for k, v in twin.state_dict().items():
        assert torch.equal(m.state_dict()[k], v)
    x = torch.randn(2, 4, 5, 6)
    torch.testing.assert_close(m(x), F.leaky_relu(twin(x), 0.2), **TOLERANCES[torch.float32])
    # output_size chooses output_padding as ConvTranspose2d does
    torch.testing.assert_close(m(x, output_size=(9, 11)), F.leaky_relu(twin(x, output_size=(9, 11)), 0.2),
                               **TOLERANCES[torch.float32])
    assert "activation='leaky_relu'" in repr(m)


# ---------------------------------------------------------------- gradcheck and opcheck

@pytest.mark.parametrize("act", [None, "relu", "tanh", "gelu", "leaky_relu", "silu"])
def test_gradcheck_cpu(act):
    x, w, b = make(2, 3, 2, (3, 4), 3, dtype=torch.float64, seed=9)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]

    def fn(x, w, b):
        with aefast.set_backend("cpu"):
            return AF.conv_transpose_act2d(x, w, b, 2, 1, 1, activation=act)

    assert torch.autograd.gradcheck(fn, leaves)


def test_gradient_on_saved_preactivation_is_linear():
    """The backward handles a gradient reaching the op's second output (pre) too."""
    x, w, b = make(2, 3, 2, (3, 3), 2, dtype=torch.float64, seed=10)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]

    def fn(x, w, b):
        out, pre = torch.ops.aefast.conv_transpose_act2d(x, w, b, [2, 2], [0, 0], [0, 0], "gelu", 0.01)
        return out + 0.5 * pre

    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("act", [None, "sigmoid", "leaky_relu"])
def test_eager_calls_take_the_cpp_autograd_node(kernel_backend, act):
    """Eager calls on plain tensors attach the C++ node (csrc/conv_transpose_act_autograd.cpp), whose
    gradients equal the registered formula's (called through torch.ops, the path torch.compile takes)."""
    dev = backend_device(kernel_backend)
    x, w, b = make(2, 3, 4, (3, 5), 3, device=dev, seed=21)
    fused, fused_grads = run_and_grads(lambda x, w, b: AF.conv_transpose_act2d(x, w, b, 2, 1, 1, activation=act),
                                       x, w, b)
    leaves = [t.detach().clone().requires_grad_() for t in (x, w, b)]
    y = AF.conv_transpose_act2d(*leaves, 2, 1, 1, activation=act)
    assert y.grad_fn.name() == "aefast::ConvTransposeAct2DBackward"
    # and so do a module's parameters (nn.Parameter is a plain tensor to the dispatcher)
    params = [torch.nn.Parameter(t.detach().clone()) for t in (x, w, b)]
    y = AF.conv_transpose_act2d(*params, 2, 1, 1, activation=act)
    assert y.grad_fn.name() == "aefast::ConvTransposeAct2DBackward"
    registered, registered_grads = run_and_grads(
        lambda x, w, b: _registry.op(kernel_backend, "conv_transpose_act2d")(x, w, b, [2, 2], [1, 1], [1, 1], act,
                                                                            0.01)[0], x, w, b)
    torch.testing.assert_close(fused, registered, rtol=0, atol=0)
    for got, want in zip(fused_grads, registered_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_eager_node_only_when_a_gradient_is_needed():
    x, w, b = make(2, 3, 4, (3, 3), 2, seed=22)
    assert AF.conv_transpose_act2d(x, w, b, 2, activation="relu").grad_fn is None
    with torch.no_grad():
        assert AF.conv_transpose_act2d(x, w, b.requires_grad_(), 2, activation="relu").grad_fn is None
    # only the bias requires grad: the node gives it alone
    y = AF.conv_transpose_act2d(x, w, b, 2, activation="relu")
    y.sum().backward()
    torch.testing.assert_close(b.grad, (y > 0).sum((0, 2, 3)).to(b.dtype))


def test_eager_node_refuses_what_it_cannot_do():
    x, w, b = make(2, 3, 4, (3, 3), 2, seed=23)
    w.requires_grad_()
    y = AF.conv_transpose_act2d(x, w, b, 2, activation="sigmoid")
    y.mul_(2)  # the saved output was modified in place: autograd's version check must catch it
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()
    y = AF.conv_transpose_act2d(x, w, b, 2, activation="sigmoid")
    (gw,) = torch.autograd.grad(y.sum(), w, retain_graph=True)  # a retained graph runs twice
    torch.testing.assert_close(torch.autograd.grad(y.sum(), w)[0], gw)
    y = AF.conv_transpose_act2d(x, w, b, 2, activation="sigmoid")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y.sum(), w, create_graph=True)


def _namespaces():
    out = [pytest.param("cpu", id="aefast")]
    ok, why = _backend.availability()["triton"]
    out.append(pytest.param("triton", id="aefast_triton", marks=pytest.mark.skipif(not ok, reason=why)))
    return out


def _op_args(device, act):
    x, w, b = make(2, 3, 2, (3, 4), 3, device=device, seed=11)
    return [x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), [2, 2], [1, 1], [1, 0], act, 0.01]


@pytest.mark.parametrize("which", _namespaces())
@pytest.mark.parametrize("act", [None, "relu", "gelu"])
def test_opcheck(which, act):
    dev = backend_device(which)
    args = _op_args(dev, act)
    torch.library.opcheck(_registry.op(which, "conv_transpose_act2d"), args)
    x, w, b = (t.detach() for t in args[:3])
    out, pre = _registry.op(which, "conv_transpose_act2d")(x, w, b, *args[3:])
    saved = pre if act == "gelu" else out
    torch.library.opcheck(_registry.op(which, "conv_transpose_act2d_backward"),
                          [torch.randn_like(out), saved, x, w, [2, 2], [1, 1], [1, 0], act, 0.01, [True, True, True]])
    torch.library.opcheck(_registry.op(which, "conv_transpose_act2d_backward"),
                          [torch.randn_like(out), saved, x, w, [2, 2], [1, 1], [1, 0], act, 0.01, [False, True, False]])


def test_torch_compile_fullgraph():
    x, w, b = make(2, 3, 4, (5, 5), 2, seed=12)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]

    def fn(x, w, b):
        return AF.conv_transpose_act2d(x, w, b, 2, activation="sigmoid").square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    compiled(*leaves).backward()
    ref_leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    torch_upsampler(*ref_leaves, 2, 0, 0, "sigmoid").square().sum().backward()
    for a, e in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad, e.grad, **TOLERANCES[torch.float32])


def test_autocast_runs_in_the_autocast_dtype():
    x, w, b = make(2, 3, 4, (4, 4), 2, seed=13)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = AF.conv_transpose_act2d(x, w, b, 2, activation="relu")
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), torch_upsampler(x, w, b, 2, 0, 0, "relu"), **TOLERANCES[torch.bfloat16])


# ---------------------------------------------------------------- errors

BAD = [
    ("groups", dict(groups=2), ValueError, "groups=1 only"),
    ("dilation", dict(dilation=2), ValueError, "dilation=1 only"),
    ("activation", dict(activation="swish"), ValueError, "unknown activation"),
    ("output_padding", dict(output_padding=2), ValueError, "output_padding"),
    ("stride", dict(stride=0), ValueError, "stride"),
]


@pytest.mark.parametrize("name,kwargs,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_arguments(backend, name, kwargs, exc, match):
    x, w, b = make(2, 4, 4, (3, 3), 3, device=backend_device(backend))
    args = dict(stride=2, padding=0, output_padding=0)
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        AF.conv_transpose_act2d(x, w, b, **args)


def test_bad_tensors():
    x, w, b = make(2, 4, 3, (3, 3), 3)
    with pytest.raises(ValueError, match="input channels"):
        AF.conv_transpose_act2d(x[:, :3], w, b, 2)
    with pytest.raises(ValueError, match="bias must have shape"):
        AF.conv_transpose_act2d(x, w, b[:2], 2)
    with pytest.raises(TypeError, match="dtypes differ"):
        AF.conv_transpose_act2d(x, w.double(), b, 2)
    with pytest.raises(ValueError, match="dimensions|dims|4-D|dim"):
        AF.conv_transpose_act2d(x[0], w, b, 2)
    with pytest.raises(ValueError, match="empty|padding is too large"):
        AF.conv_transpose_act2d(x, w, b, 1, padding=3)
    with pytest.raises(RuntimeError, match="weight .* does not match"):
        torch.ops.aefast.conv_transpose_act2d(x[:, :3], w, b, [2, 2], [0, 0], [0, 0], None, 0.01)
    with pytest.raises(RuntimeError, match="unknown activation"):
        torch.ops.aefast.conv_transpose_act2d(x, w, b, [2, 2], [0, 0], [0, 0], "swish", 0.01)


# ---------------------------------------------------------------- fuzz

@st.composite
def upsampler_cases(draw):
    k = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    s = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    p = (draw(st.integers(0, k[0] - 1)), draw(st.integers(0, k[1] - 1)))
    op = (draw(st.integers(0, s[0] - 1)), draw(st.integers(0, s[1] - 1)))
    hw = (draw(st.integers(1, 6)), draw(st.integers(1, 6)))
    out_hw = [(hw[a] - 1) * s[a] - 2 * p[a] + k[a] + op[a] for a in range(2)]
    if min(out_hw) < 1:
        p = (0, 0)
    return dict(n=draw(st.integers(1, 3)), ci=draw(st.integers(1, 5)), co=draw(st.integers(1, 5)), hw=hw, k=k, s=s,
                p=p, op=op, act=draw(st.sampled_from(ACTS)), bias=draw(st.booleans()), seed=draw(st.integers(0, 99)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(upsampler_cases())
def test_fuzz_cpu_against_reference(c):
    x, w, b = make(c["n"], c["ci"], c["co"], c["hw"], c["k"], bias=c["bias"], seed=c["seed"])
    with aefast.set_backend("cpu"):
        got, got_grads = run_and_grads(lambda x, w, b: AF.conv_transpose_act2d(
            x, w, b, c["s"], c["p"], c["op"], activation=c["act"]), x, w, b)
    want, want_grads = run_and_grads(lambda x, w, b: ref.conv_transpose_act2d(
        x, w, b, c["s"], c["p"], c["op"], c["act"]), x, w, b)
    torch.testing.assert_close(got, want, **TOLERANCES[torch.float32])
    for a, e in zip(got_grads, want_grads):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5 * max(1.0, e.abs().max().item()))


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(upsampler_cases())
def test_fuzz_triton_against_reference(c):
    ok, why = _backend.availability()["triton"]
    if not ok:
        pytest.skip(why)
    dev = backend_device("triton")
    x, w, b = make(c["n"], c["ci"], c["co"], c["hw"], c["k"], bias=c["bias"], seed=c["seed"], device=dev)
    with aefast.set_backend("triton"):
        got, got_grads = run_and_grads(lambda x, w, b: AF.conv_transpose_act2d(
            x, w, b, c["s"], c["p"], c["op"], activation=c["act"]), x, w, b)
    want, want_grads = run_and_grads(lambda x, w, b: ref.conv_transpose_act2d(
        x, w, b, c["s"], c["p"], c["op"], c["act"]), x, w, b)
    torch.testing.assert_close(got, want, **TOLERANCES[torch.float32])
    for a, e in zip(got_grads, want_grads):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5 * max(1.0, e.abs().max().item()))


# ---------------------------------------------------------------- aefast.optimize's upsampler rewrite

class Upsamplers(torch.nn.Module):
    """ConvTranspose2d -> BatchNorm2d -> LeakyReLU, a plain one -> ReLU whose input is also read by
    a residual add (so only the conv is fused), a grouped one and one called with output_size (both
    left), an nn.Upsample (left)."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.up_bn = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.act = nn.LeakyReLU(0.2)
        self.up_shared = nn.ConvTranspose2d(6, 6, 2, stride=2)
        self.up_grouped = nn.ConvTranspose2d(6, 6, 2, stride=2, groups=2)
        self.up_sized = nn.ConvTranspose2d(6, 2, 3, stride=2, padding=1)
        self.resize = nn.Upsample(scale_factor=2)

    def forward(self, x):
        h = self.act(self.bn(self.up_bn(x)))
        u = self.up_shared(h)
        h = torch.relu(u) + 0.5 * u
        h = self.up_grouped(h)
        h = self.up_sized(h, output_size=[2 * h.shape[-2], 2 * h.shape[-1]])
        return self.resize(h)


def test_optimize_fuses_upsamplers_and_reports_the_rest():
    import copy

    torch.manual_seed(0)
    original = Upsamplers()
    with torch.no_grad():
        original.bn.running_mean.uniform_(-0.5, 0.5)
        original.bn.running_var.uniform_(0.5, 2.0)
        original.bn.weight.uniform_(0.5, 1.5)
        original.bn.bias.uniform_(-0.5, 0.5)
    model = aefast.optimize(copy.deepcopy(original), verbose=False)
    train = [r for r in model.aefast_rewrites if not r.startswith("(eval mode)")]
    # In training mode up_bn's BatchNorm normalises with batch statistics: the transposed conv is fused
    # alone (its CPU forward is aefast's GEMM + col2im at small shapes), and the BatchNorm and its
    # activation fuse as batch_norm_act2d.
    assert train == ["conv_transpose_act2d <- up_bn (ConvTranspose2d, stride (2, 2)) -> no activation (bn, "
                     "BatchNorm2d with batch statistics, and what follows it stay in eager)",
                     "conv_transpose_act2d <- up_shared (ConvTranspose2d, stride (2, 2)) -> no activation",
                     "batch_norm_act2d <- bn (BatchNorm2d, batch statistics) -> leaky_relu"]
    assert ("(eval mode) conv_transpose_act2d <- up_bn (ConvTranspose2d, stride (2, 2)) -> bn (BatchNorm2d folded, "
            "eval mode) -> leaky_relu") in model.aefast_rewrites
    unfused = "\n".join(model.aefast_unfused)
    assert len(model.aefast_unfused) == 3, model.aefast_unfused
    assert "upsampler at up_grouped: ConvTranspose2d with groups or dilation != 1" in unfused
    assert "upsampler at up_sized: ConvTranspose2d" in unfused and "output_size" in unfused
    assert "upsampler at resize: nn.Upsample / F.interpolate: no fused form" in unfused
    x = torch.randn(2, 4, 3, 5)
    for training in (True, True, False):
        original.train(training), model.train(training)
        original.zero_grad(), model.zero_grad()
        want, got = original(x), model(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        want.square().sum().backward()
        got.square().sum().backward()
        for (name, p), q in zip(original.named_parameters(), model.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-4, msg=name)
        for (name, b), c in zip(original.named_buffers(), model.buffers()):
            torch.testing.assert_close(c, b, msg=name)
