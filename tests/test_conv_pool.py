"""conv_pool2d: the fused encoder block against PyTorch's eager composition.

The spec is ``F.max_pool2d(act(F.conv2d(x, w, b, stride, padding)), pool, return_indices=True)``
with torch's own activation functions: indices must be equal bit for bit, values and every
gradient within the per-dtype tolerance.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import aefast
import aefast.functional as AF
from aefast import backend as _backend
from aefast.ops.conv_pool import ACTIVATION_CODES
from conftest import CPU_ISAS, TOLERANCES, backend_device, backend_grid

ACTS = [None, "relu", "leaky_relu", "sigmoid", "tanh", "gelu", "silu"]


def torch_act(name, slope=0.01):
    return {
        None: lambda z: z,
        "relu": F.relu,
        "leaky_relu": lambda z: F.leaky_relu(z, slope),
        "sigmoid": torch.sigmoid,
        "tanh": torch.tanh,
        "gelu": F.gelu,
        "silu": F.silu,
    }[name]


def eager(x, w, b, stride, padding, act, pool, slope=0.01):
    return F.max_pool2d(torch_act(act, slope)(F.conv2d(x, w, b, stride, padding)), pool, return_indices=True)


def routed_grads(x, w, b, stride, padding, act, idx, grad, slope=0.01):
    """The exact (fp64) gradients of the pooled values selected by ``idx``: the conv output
    differentiated at those positions only."""
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if b is not None else None
    a = torch_act(act, slope)(F.conv2d(x64, w64, b64, stride, padding))
    pooled = a.flatten(2).gather(2, idx.flatten(2)).view(idx.shape)
    inputs = [x64, w64] + ([b64] if b is not None else [])
    return torch.autograd.grad(pooled, inputs, grad.double())


def make(n, cin, cout, h, w, k, dtype, device, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    kh, kw = (k, k) if isinstance(k, int) else k
    x = torch.randn(n, cin, h, w, generator=g).to(dtype).to(device).requires_grad_()
    wt = (torch.randn(cout, cin, kh, kw, generator=g) / math.sqrt(cin * kh * kw)).to(dtype).to(device).requires_grad_()
    b = torch.randn(cout, generator=g).to(dtype).to(device).requires_grad_() if bias else None
    return x, wt, b


# Two window elements whose activated values agree to within the conv's rounding (different
# summation orders give values 1-2 ulp apart) form a numerical tie that no implementation can
# resolve like torch's oneDNN/MKL kernels without copying their summation order. Such indices
# are accepted when the two values agree to NEAR_TIE (relative); every other index must be
# equal bit for bit. Exact ties (integer data below) are resolved by the first-max rule.
NEAR_TIE = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def check_indices(idx, ridx, x, w, b, stride, padding, act, slope):
    differ = idx != ridx
    if not differ.any():
        return
    with torch.no_grad():
        a = torch_act(act, slope)(F.conv2d(x, w, b, stride, padding)).flatten(2)
        ours = a.gather(2, idx.flatten(2))[differ.flatten(2)].double()
        theirs = a.gather(2, ridx.flatten(2))[differ.flatten(2)].double()
    gap = (ours - theirs).abs() / theirs.abs().clamp_min(1.0)
    assert gap.max() <= NEAR_TIE[x.dtype], (
        f"indices differ at {differ.nonzero()[:5].tolist()} with value gaps {gap[:5].tolist()}")


def check_case(x, w, b, stride, padding, act, pool, *, slope=0.01, grad_tol=None):
    """Forward values and indices against eager, gradients against the routed fp64 reference."""
    y, idx = AF.conv_pool2d(x, w, b, stride, padding, act, pool, negative_slope=slope)
    ry, ridx = eager(x, w, b, stride, padding, act, pool, slope)
    tol = TOLERANCES[x.dtype]
    assert idx.dtype == torch.int64 and idx.shape == ridx.shape
    check_indices(idx, ridx, x, w, b, stride, padding, act, slope)
    torch.testing.assert_close(y, ry, **tol)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype).to(y.device)
    inputs = [x, w] + ([b] if b is not None else [])
    got = torch.autograd.grad(y, inputs, grad)
    want = routed_grads(x, w, b, stride, padding, act, idx, grad, slope)
    gtol = grad_tol or tol
    for name, g_, r_ in zip(("input", "weight", "bias"), got, want):
        scale = max(1.0, r_.abs().max().item())
        torch.testing.assert_close(g_.double(), r_, rtol=gtol["rtol"], atol=gtol["atol"] * scale,
                                   msg=lambda m: f"grad_{name}: {m}")


# ------------------------------------------------------------------ the acceptance grid

# Every activation x pool x stride x padding; the channel pair alternates between 3->17 and
# 17->3 so both channel counts meet every other parameter value (and the Triton interpreter
# stays within the CI budget).
GRID = [(act, pool, stride, padding, ((3, 17), (17, 3))[(i + pool + stride + padding) % 2])
        for i, act in enumerate(ACTS) for pool in (2, 3) for stride in (1, 2) for padding in (0, 1)]
# The interpreter's covering subset (14 of 56): every activation with both pools (the kernels'
# constexprs, so the same specializations), each pool with all four stride x padding pairs, and each
# activation with both strides and both paddings (pool 3 takes the complement of pool 2's pair).
_PAIRS = [(1, 0), (1, 1), (2, 0), (2, 1)]
GRID_INTERPRETED = [g for g in GRID for i in [ACTS.index(g[0])]
                    if (g[2], g[3]) == _PAIRS[i % 4 if g[1] == 2 else 3 - i % 4]]


@pytest.mark.parametrize("backend,act,pool,stride,padding,chans",
                         backend_grid(GRID, GRID_INTERPRETED, lambda g: "{}-p{}-s{}-pad{}-{}to{}".format(*g[:4], *g[4])),
                         indirect=["backend"])
def test_grid_matches_torch(backend, act, pool, stride, padding, chans):
    cin, cout = chans
    # odd H/W, batch 1; a 3x3 conv
    x, w, b = make(1, cin, cout, 13, 11, 3, torch.float32, backend_device(backend), seed=hash((act, pool)) % 1000)
    check_case(x, w, b, stride, padding, act, pool)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16],
                         ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("act", ACTS, ids=str)
def test_dtypes(kernel_backend, dtype, act):
    device = backend_device(kernel_backend)
    if device == "cpu" and kernel_backend == "cuda":
        pytest.skip("cuda backend needs CUDA tensors")
    x, w, b = make(2, 3, 5, 9, 8, 3, dtype, device, seed=7)
    grad_tol = {torch.float16: dict(rtol=2e-2, atol=2e-2), torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}.get(dtype)
    check_case(x, w, b, 1, 1, act, 2, grad_tol=grad_tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_oneDNN_path_in_several_batch_chunks(dtype):
    """K = Cin*KH*KW >= 64 takes oneDNN's conv plus the fused epilogue, run in batch chunks of
    about 4 MiB of conv output (csrc/cpu/conv_pool.cpp, kConvChunkBytes): 2.4 MB per image here,
    so each of the 3 images is its own chunk, and the last pooled row/column is cut (odd size)."""
    x, w, b = make(3, 32, 64, 97, 95, 3, dtype, "cpu", seed=11)
    grad_tol = {torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}.get(dtype)
    with aefast.set_backend("cpu"):
        check_case(x, w, b, 1, 1, "relu", 2, grad_tol=grad_tol)


def test_no_bias_rect_kernel_and_pool(backend):
    x, w, _ = make(2, 4, 6, 12, 10, (3, 2), torch.float32, backend_device(backend))
    check_case(x, w, None, (1, 2), (1, 0), "relu", (2, 3))


def test_leaky_slope_and_batch(backend):
    x, w, b = make(3, 2, 4, 8, 8, 3, torch.float32, backend_device(backend), seed=3)
    check_case(x, w, b, 1, 1, "leaky_relu", 2, slope=0.2)


def test_ties_and_relu_zeros_give_first_index(backend):
    # Integer data: exact conv sums, many exact ties (and all-negative windows under relu),
    # where only torch's first-max rule decides the index.
    device = backend_device(backend)
    g = torch.Generator().manual_seed(5)
    x = torch.randint(-2, 3, (2, 3, 9, 9), generator=g).float().to(device).requires_grad_()
    w = torch.randint(-1, 2, (4, 3, 3, 3), generator=g).float().to(device).requires_grad_()
    b = torch.zeros(4, device=device, requires_grad=True)
    for act in (None, "relu"):
        check_case(x, w, b, 1, 1, act, 2)


def test_index_formats_and_return_indices(backend):
    device = backend_device(backend)
    x, w, b = make(2, 3, 4, 11, 9, 3, torch.float32, device)
    y, flat = AF.conv_pool2d(x, w, b, 1, 0, "relu", 2)
    y2, win = AF.conv_pool2d(x, w, b, 1, 0, "relu", 2, index_format="window")
    only = AF.conv_pool2d(x, w, b, 1, 0, "relu", 2, return_indices=False)
    assert win.dtype == torch.uint8 and win.shape == flat.shape
    conv_hw = (9, 7)
    assert torch.equal(AF.window_to_flat(win, conv_hw, 2), flat)
    assert torch.equal(AF.flat_to_window(flat, conv_hw, 2), win)
    torch.testing.assert_close(y2, y, rtol=0, atol=0)
    assert isinstance(only, torch.Tensor)
    torch.testing.assert_close(only, y, rtol=0, atol=0)


def test_only_pooled_size_tensors_are_saved():
    # The forward op's extra outputs are pooled-size; nothing at conv resolution exists afterwards.
    x, w, b = make(2, 3, 8, 16, 16, 3, torch.float32, "cpu")
    pooled, window, preact = torch.ops.aefast.conv_pool2d_forward(x, w, b, [1, 1], [1, 1], 1, 0.01, [2, 2])
    assert pooled.shape == window.shape == preact.shape == (2, 8, 8, 8)
    assert window.dtype == torch.uint8 and window.max() < 4
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with aefast.set_backend("cpu"):
            AF.conv_pool2d(x, w, b, 1, 1, "gelu", 2)
    conv_numel = 2 * 8 * 16 * 16
    big = [tuple(t.shape) for t in saved if t.numel() >= conv_numel and t is not x]
    assert not big, f"full-resolution tensors saved for backward: {big}"


@pytest.mark.parametrize("act", ACTS, ids=str)
def test_gradcheck_fp64_cpu(act):
    x, w, b = make(2, 3, 4, 9, 8, 3, torch.float64, "cpu", seed=11)
    with aefast.set_backend("cpu"):
        assert torch.autograd.gradcheck(lambda x, w, b: AF.conv_pool2d(x, w, b, (1, 2), 1, act, 2)[0], (x, w, b))
        assert torch.autograd.gradcheck(lambda x, w: AF.conv_pool2d(x, w, None, 2, 0, act, 3)[0], (x, w))


def test_only_needed_grads():
    x, w, b = make(2, 3, 4, 9, 8, 3, torch.float32, "cpu")
    x.requires_grad_(False)
    with aefast.set_backend("cpu"):
        y, _ = AF.conv_pool2d(x, w, b, 1, 1, "relu", 2)
        gw, gb = torch.autograd.grad(y.sum(), (w, b))
    ry, _ = eager(x, w, b, 1, 1, "relu", 2)
    rw, rb = torch.autograd.grad(ry.sum(), (w, b))
    torch.testing.assert_close(gw, rw, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gb, rb, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ opcheck on every op

def _op_args(device="cpu", dtype=torch.float32):
    x, w, b = make(2, 3, 4, 9, 8, 3, dtype, device, seed=2)
    pooled, window, preact = torch.ops.aefast.conv_pool2d_forward(x.detach(), w.detach(), b.detach(), [1, 1], [1, 1],
                                                                  5, 0.01, [2, 2])
    grad = torch.randn_like(pooled)
    return x, w, b, grad, window, preact


def _namespaces():
    out = [pytest.param("aefast", id="aefast")]
    ok, why = _backend.availability()["triton"]
    out.append(pytest.param("aefast_triton", id="aefast_triton", marks=pytest.mark.skipif(not ok, reason=why)))
    return out


@pytest.mark.parametrize("ns", _namespaces())
def test_opcheck_all_ops(ns):
    ops = getattr(torch.ops, ns)
    x, w, b, grad, window, preact = _op_args()
    torch.library.opcheck(ops.conv_pool2d_forward.default, (x, w, b, [1, 1], [1, 1], 5, 0.01, [2, 2]))
    torch.library.opcheck(ops.conv_pool2d_forward.default, (x, w, None, [2, 1], [0, 1], 1, 0.01, [2, 3]))
    torch.library.opcheck(ops.conv_pool2d_backward_input.default,
                          (grad, window, preact, w.detach(), [9, 8], [1, 1], [1, 1], 5, 0.01, [2, 2]))
    torch.library.opcheck(ops.conv_pool2d_backward_weight.default,
                          (grad, window, preact, x.detach(), [3, 3], [1, 1], [1, 1], 5, 0.01, [2, 2]))
    torch.library.opcheck(ops.conv_pool2d_backward.default,
                          (grad, window, preact, x.detach(), w.detach(), [1, 1], [1, 1], 5, 0.01, [2, 2]))


# ------------------------------------------------------------------ hypothesis fuzz (cpu)

@st.composite
def conv_pool_cases(draw):
    n = draw(st.integers(1, 2))
    cin = draw(st.integers(1, 4))
    cout = draw(st.integers(1, 5))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    sh, sw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    ph, pw = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    pool = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    h, w = draw(st.integers(1, 10)), draw(st.integers(1, 10))
    hc, wc = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    assume(h + 2 * ph >= kh and w + 2 * pw >= kw and hc >= pool[0] and wc >= pool[1])
    act = draw(st.sampled_from(ACTS))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    bias = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    return n, cin, cout, h, w, (kh, kw), (sh, sw), (ph, pw), pool, act, dtype, bias, seed


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(conv_pool_cases())
def test_fuzz_cpu(case):
    n, cin, cout, h, w, k, s, p, pool, act, dtype, bias, seed = case
    x, wt, b = make(n, cin, cout, h, w, k, dtype, "cpu", bias=bias, seed=seed)
    with aefast.set_backend("cpu"):
        check_case(x, wt, b, s, p, act, pool)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(conv_pool_cases(), st.booleans())
def test_fuzz_triton(case, channels_last):
    # The interpreter is slow: fewer examples than the cpu fuzz, each also in channels_last.
    _triton_kernels()
    n, cin, cout, h, w, k, s, p, pool, act, dtype, bias, seed = case
    x, wt, b = make(n, cin, cout, h, w, k, dtype, backend_device("triton"), bias=bias, seed=seed)
    if channels_last:
        x = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    with aefast.set_backend("triton"):
        check_case(x, wt, b, s, p, act, pool)


# ------------------------------------------------------------------ bad inputs

def test_bad_inputs():
    x, w, b = make(1, 3, 4, 8, 8, 3, torch.float32, "cpu")
    with pytest.raises(ValueError, match="channels"):
        AF.conv_pool2d(x, torch.randn(4, 2, 3, 3), b)
    with pytest.raises(ValueError, match="pool_size"):
        AF.conv_pool2d(x, w, b, 1, 0, "relu", 7)  # conv output is 6x6
    with pytest.raises(ValueError, match="larger than the padded input"):
        AF.conv_pool2d(torch.randn(1, 3, 2, 2), w, b)
    with pytest.raises(TypeError, match="dtype"):
        AF.conv_pool2d(x.detach().to(torch.int64), w.detach().to(torch.int64))
    with pytest.raises(TypeError, match="dtypes differ"):
        AF.conv_pool2d(x, w.double(), b)
    with pytest.raises(TypeError, match="dtypes differ"):
        AF.conv_pool2d(x, w, b.double())
    with pytest.raises(ValueError, match="one device"):
        AF.conv_pool2d(x, w.detach().to("meta"), b)
    with pytest.raises(ValueError, match="bias must have shape"):
        AF.conv_pool2d(x, w, torch.randn(3))
    with pytest.raises(ValueError, match="unknown activation"):
        AF.conv_pool2d(x, w, b, activation="swish")
    with pytest.raises(ValueError, match="index_format"):
        AF.conv_pool2d(x, w, b, index_format="int32")
    with pytest.raises(ValueError, match="4-D"):
        AF.conv_pool2d(x[0], w, b)
    with pytest.raises(TypeError, match="torch.Tensor"):
        AF.conv_pool2d(x.tolist(), w, b)
    with pytest.raises(ValueError, match="stride"):
        AF.conv_pool2d(x, w, b, stride=0)
    with pytest.raises(ValueError, match="padding"):
        AF.conv_pool2d(x, w, b, padding=-1)
    with pytest.raises(TypeError, match="negative_slope"):
        AF.conv_pool2d(x, w, b, activation="leaky_relu", negative_slope="0.1")


def test_activation_codes_match_header():
    header = open(__file__.replace("tests/test_conv_pool.py", "csrc/include/aefast/conv_pool.h")).read()
    for name, code in ACTIVATION_CODES.items():
        enum = {None: "kNone", "relu": "kRelu", "leaky_relu": "kLeakyRelu", "sigmoid": "kSigmoid", "tanh": "kTanh",
                "gelu": "kGelu", "silu": "kSilu"}[name]
        assert f"{enum} = {code}" in header


# ------------------------------------------------------------------ nn.ConvPool2d

def test_module_matches_conv2d_init_and_state_dict(backend):
    device = backend_device(backend)
    torch.manual_seed(123)
    ours = aefast.nn.ConvPool2d(3, 8, 3, stride=1, padding=1, activation="relu", pool_size=2).to(device)
    torch.manual_seed(123)
    ref = torch.nn.Conv2d(3, 8, 3, stride=1, padding=1).to(device)
    assert ours.weight.shape == ref.weight.shape == (8, 3, 3, 3) and ours.bias.shape == (8,)
    torch.testing.assert_close(ours.weight, ref.weight, rtol=0, atol=0)
    torch.testing.assert_close(ours.bias, ref.bias, rtol=0, atol=0)
    assert list(ours.state_dict().keys()) == list(ref.state_dict().keys())
    fresh = aefast.nn.ConvPool2d(3, 8, 3, padding=1).to(device)
    fresh.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 10, 10, device=device)
    y, idx = fresh(x)
    ry, ridx = F.max_pool2d(F.relu(ref(x)), 2, return_indices=True)
    assert torch.equal(idx, ridx)
    torch.testing.assert_close(y, ry, **TOLERANCES[torch.float32])
    y.sum().backward()
    ry.sum().backward()
    torch.testing.assert_close(fresh.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-5)


def test_torch_compile_fullgraph_cpu():
    x, w, b = make(2, 3, 4, 9, 8, 3, torch.float32, "cpu", seed=4)

    def block(x, w, b):
        return AF.conv_pool2d(x, w, b, 1, 1, "silu", 2)

    with aefast.set_backend("cpu"):
        y, idx = torch.compile(block, fullgraph=True)(x, w, b)
        gx, gw, gb = torch.autograd.grad(y.sum(), (x, w, b))
    ry, ridx = eager(x, w, b, 1, 1, "silu", 2)
    rgx, rgw, rgb = torch.autograd.grad(ry.sum(), (x, w, b))
    assert torch.equal(idx, ridx)
    torch.testing.assert_close(y, ry, **TOLERANCES[torch.float32])
    for got, want in ((gx, rgx), (gw, rgw), (gb, rgb)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ CPU ISA variants and paths
#
# The CPU kernels are built for three instruction sets (baseline, AVX2+FMA, AVX-512) and pick
# the best the CPU has; AEFAST_CPU_ISA caps the choice per call, so that every variant is held
# to the reference on a machine that has them all. The cases below cover each new code path:
# the direct forward (K < 64) and the oneDNN forward (K >= 64), the backward's weighted row sums
# for one vector (K = 9), a few, and more than one chunk of 8 vectors (K = 80*9 = 720), Cout
# with leftover GEMM columns (33), strides, padding, rectangular kernels and pools, channels-last
# input, and the input-needs-no-grad path (backward_weight alone, as in a first layer).

# n, cin, cout, h, w, kernel, stride, padding, pool, act, dtype
ISA_CASES = [
    (2, 1, 32, 28, 28, 3, 1, 1, 2, "relu", torch.float32),        # first layer: K = 9, one vector
    (2, 32, 64, 14, 14, 3, 1, 1, 2, "relu", torch.float32),       # K = 288: oneDNN forward, 18 vectors
    (1, 3, 33, 17, 19, 3, 2, 1, 3, "gelu", torch.float32),        # K = 27, leftover GEMM columns
    (2, 80, 9, 9, 8, 3, 1, 1, 2, "leaky_relu", torch.float32),    # K = 720: several chunks of 8 vectors
    (1, 16, 5, 13, 11, 3, 2, 1, 3, "relu", torch.float32),       # runs of 48: wgrad reads the image, stride 2, 3x3 pool
    (1, 16, 3, 24, 100, 3, 1, 1, 2, "relu", torch.float32),      # ... in bands of 10 pooled rows (128 KiB), then 2
    (1, 17, 5, 11, 9, (5, 3), (1, 2), (2, 1), (2, 3), "tanh", torch.float32),
    (2, 3, 7, 10, 9, 1, 1, 0, 2, None, torch.float32),            # 1x1 kernel, K = 3
    (1, 5, 6, 9, 9, 3, 1, 2, 2, "sigmoid", torch.float64),        # fp64: 8-wide rows
    (1, 40, 12, 8, 8, 3, 1, 1, 2, "silu", torch.float64),         # fp64, K = 360
    (2, 3, 16, 12, 12, 3, 1, 1, 2, "relu", torch.bfloat16),
    (2, 8, 24, 10, 10, 3, 1, 1, 2, "relu", torch.float16),        # K = 72: oneDNN forward in fp32
    # pooled planes of >= 2 KiB: the epilogue's channels-last row buffer (smaller ones store directly)
    (1, 3, 8, 48, 47, 3, 1, 1, 2, "relu", torch.float32),         # direct forward, 24x23 pooled
    (1, 8, 6, 47, 48, 3, 1, 1, 2, "gelu", torch.float32),         # oneDNN forward (K = 72), 23x24 pooled
    (1, 2, 5, 34, 35, 3, 1, 1, 2, "relu", torch.float64),         # fp64, 17x17 pooled
    # Cout below / between the GEMM's 2-vector column blocks: the 1-, 1/2- and 1/4-vector column
    # tails (tutorial_conv_ae's 1->16 and 16->4 blocks; 28 = 16 + 8 + 4 under AVX-512)
    (2, 1, 16, 28, 28, 3, 1, 1, 2, "relu", torch.float32),        # direct forward
    (2, 16, 4, 14, 14, 3, 1, 1, 2, "relu", torch.float32),        # Winograd forward (K = 144)
    (1, 5, 28, 11, 10, 3, 1, 1, 2, "leaky_relu", torch.float32),  # direct, 3 column tails
    (1, 9, 12, 10, 9, 3, 1, 1, 2, "relu", torch.float64),         # fp64 Winograd off, direct: 8 + 4
    (2, 16, 8, 14, 14, 3, 1, 1, 2, "relu", torch.float32),        # Winograd, Cout a half vector
    # im2col: no interior column (every kernel row clipped), and a 2-wide image under padding 2
    (1, 1, 3, 6, 1, (3, 5), 1, (1, 3), 2, None, torch.float32),
    (1, 1, 5, 4, 2, 3, 1, 2, 2, "relu", torch.float32),
    (1, 3, 6, 9, 11, 3, 2, 2, 2, "relu", torch.float32),          # run of 9, stride 2, padding 2
]
ISA_CASE_IDS = [f"{c[1]}to{c[2]}-k{c[5]}-s{c[6]}-{c[9]}-{str(c[10])[6:]}" for c in ISA_CASES]
HALF_GRAD_TOL = {torch.float16: dict(rtol=2e-2, atol=2e-2), torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("case", ISA_CASES, ids=ISA_CASE_IDS)
def test_cpu_isa_variants(monkeypatch, isa, case):
    n, cin, cout, h, w, k, s, p, pool, act, dtype = case
    monkeypatch.setenv("AEFAST_CPU_ISA", isa)
    x, wt, b = make(n, cin, cout, h, w, k, dtype, "cpu", seed=cin * 100 + cout)
    with aefast.set_backend("cpu"):
        check_case(x, wt, b, s, p, act, pool, grad_tol=HALF_GRAD_TOL.get(dtype))
        # channels-last input (the input loader's other branch), and an input that needs no
        # grad (backward_weight alone)
        xc = x.detach().to(memory_format=torch.channels_last).requires_grad_()
        check_case(xc, wt, b, s, p, act, pool, grad_tol=HALF_GRAD_TOL.get(dtype))
        y, idx = AF.conv_pool2d(x.detach(), wt, b, s, p, act, pool)
        grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
        gw, gb = torch.autograd.grad(y, (wt, b), grad)
        _, rw, rb = routed_grads(x, wt, b, s, p, act, idx, grad)
        tol = HALF_GRAD_TOL.get(dtype, TOLERANCES[dtype])
        for g_, r_ in ((gw, rw), (gb, rb)):
            torch.testing.assert_close(g_.double(), r_, rtol=tol["rtol"], atol=tol["atol"] * max(1.0, r_.abs().max().item()))


@pytest.mark.parametrize("isa", CPU_ISAS)
def test_cpu_isa_variants_fuzz(monkeypatch, isa):
    # A smaller version of test_fuzz_cpu for each forced ISA (the full fuzz runs the default).
    monkeypatch.setenv("AEFAST_CPU_ISA", isa)

    @settings(max_examples=120, deadline=None,
              suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
    @given(conv_pool_cases())
    def run(case):
        n, cin, cout, h, w, k, s, p, pool, act, dtype, bias, seed = case
        x, wt, b = make(n, cin, cout, h, w, k, dtype, "cpu", bias=bias, seed=seed)
        with aefast.set_backend("cpu"):
            check_case(x, wt, b, s, p, act, pool)

    run()


def test_cpu_isa_env_rejects_unknown_value(monkeypatch):
    x, w, b = make(1, 3, 4, 8, 8, 3, torch.float32, "cpu")
    monkeypatch.setenv("AEFAST_CPU_ISA", "sse9")
    with aefast.set_backend("cpu"), pytest.raises(RuntimeError, match="AEFAST_CPU_ISA"):
        AF.conv_pool2d(x, w, b, 1, 1, "relu", 2)


# The forward of a 3x3, stride-1 conv under a 2x2 pool runs Winograd F(2x2, 3x3) where the vendor
# conv would otherwise run (K >= 64; csrc/cpu/conv_pool.cpp, encoder_uses_winograd).
# AEFAST_ENCODER_WINOGRAD=1 forces it wherever the geometry fits (so also for K < 64 here), =0
# turns it off; both are held to torch, on every ISA, with odd sizes, paddings 0..2, the half
# types and a corrupted input.
WINOGRAD_CASES = [  # n, cin, cout, h, w, padding, act, dtype
    (2, 32, 64, 14, 14, 1, "relu", torch.float32),
    (1, 3, 33, 17, 19, 1, "gelu", torch.float32),       # Cout past the GEMM's column blocks
    (2, 9, 7, 11, 13, 0, "leaky_relu", torch.float32),  # odd conv output: last row/column unpooled
    (1, 16, 17, 9, 8, 2, "tanh", torch.float32),
    (3, 1, 8, 12, 10, 1, None, torch.float32),         # K = 9: one input channel
    (2, 8, 24, 10, 10, 1, "relu", torch.float16),
    (2, 12, 16, 12, 12, 1, "silu", torch.bfloat16),
    (1, 8, 6, 47, 48, 1, "sigmoid", torch.float32),     # pooled planes >= 2 KiB: the epilogue's row buffer
]


@pytest.mark.parametrize("winograd", ["0", "1"])
@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("case", WINOGRAD_CASES, ids=[f"{c[1]}to{c[2]}-{c[3]}x{c[4]}-p{c[5]}-{c[6]}-{str(c[7])[6:]}"
                                                      for c in WINOGRAD_CASES])
def test_cpu_winograd_forward(monkeypatch, winograd, isa, case):
    n, cin, cout, h, w, p, act, dtype = case
    monkeypatch.setenv("AEFAST_CPU_ISA", isa)
    monkeypatch.setenv("AEFAST_ENCODER_WINOGRAD", winograd)
    x, wt, b = make(n, cin, cout, h, w, 3, dtype, "cpu", seed=cin * 10 + cout)
    with aefast.set_backend("cpu"):
        check_case(x, wt, b, 1, p, act, 2, grad_tol=HALF_GRAD_TOL.get(dtype))
        xc = x.detach().to(memory_format=torch.channels_last).requires_grad_()
        check_case(xc, wt, b, 1, p, act, 2, grad_tol=HALF_GRAD_TOL.get(dtype))


@pytest.mark.parametrize("kind", ["gaussian", "masking"])
def test_cpu_winograd_forward_with_corruption(monkeypatch, kind):
    # corrupt-then-conv_pool2d, with the noise applied in Winograd's input load
    x, w, b = make(5, 16, 24, 13, 12, 3, torch.float32, "cpu", seed=9)
    noise = (kind, 0.3, 99, 0.0, 1.0)
    xc = torch.ops.aefast.corrupt(x.detach(), 99, kind, 0.3, 0.0, 1.0)
    monkeypatch.setenv("AEFAST_ENCODER_WINOGRAD", "1")
    got = torch.ops.aefast.conv_pool2d_forward(x.detach(), w.detach(), b.detach(), [1, 1], [1, 1], 1, 0.01, [2, 2],
                                               *noise)
    ry, ridx = eager(xc, w.detach(), b.detach(), 1, 1, "relu", 2)
    torch.testing.assert_close(got[0], ry, rtol=1e-5, atol=1e-5)
    check_indices(AF.window_to_flat(got[1], (13, 12), 2), ridx, xc, w.detach(), b.detach(), 1, 1, "relu", 0.01)


def test_cpu_winograd_env_rejects_unknown_value(monkeypatch):
    x, w, b = make(1, 8, 4, 8, 8, 3, torch.float32, "cpu")
    monkeypatch.setenv("AEFAST_ENCODER_WINOGRAD", "yes")
    with aefast.set_backend("cpu"), pytest.raises(RuntimeError, match="AEFAST_ENCODER_WINOGRAD"):
        AF.conv_pool2d(x, w, b, 1, 1, "relu", 2)


def cpu_paths_taken(fn):
    """The paths the CPU kernels that fn() runs name in the profiler ("aefast path: ...")."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("aefast path: ")}


# AEFAST_ENCODER_CONV=vendor|direct overrides the forward's vendor-conv rule (aefast/conv_algorithm.h,
# K = Cin*KH*KW >= 64) for A/B timing (bench/bench_kernel_ledger.py); with Winograd off, both paths
# are held to torch on a long and a short reduction, and each names itself in the profiler, as the
# rule's picks do (Winograd for the long reduction, direct for the short one).
@pytest.mark.parametrize("case", [WINOGRAD_CASES[0], WINOGRAD_CASES[4]], ids=["K288", "K9"])
def test_cpu_encoder_conv_switch(monkeypatch, case):
    n, cin, cout, h, w, p, act, dtype = case
    x, wt, b = make(n, cin, cout, h, w, 3, dtype, "cpu", seed=cin * 10 + cout)

    def forward():
        return torch.ops.aefast.conv_pool2d_forward(x.detach(), wt.detach(), b.detach(), [1, 1], [p, p],
                                                    ACTIVATION_CODES[act], 0.01, [2, 2])

    rule = "winograd" if cin * 9 >= 64 else "direct"
    assert cpu_paths_taken(forward) == {f"aefast path: conv_pool2d_forward {rule}"}
    monkeypatch.setenv("AEFAST_ENCODER_WINOGRAD", "0")
    for conv, path in (("vendor", "onednn"), ("direct", "direct")):
        monkeypatch.setenv("AEFAST_ENCODER_CONV", conv)
        with aefast.set_backend("cpu"):
            check_case(x, wt, b, 1, p, act, 2)
        assert cpu_paths_taken(forward) == {f"aefast path: conv_pool2d_forward {path}"}


def test_cpu_encoder_conv_switch_rejects_unknown_value(monkeypatch):
    x, w, b = make(1, 8, 4, 8, 8, 3, torch.float32, "cpu")
    monkeypatch.setenv("AEFAST_ENCODER_WINOGRAD", "0")
    monkeypatch.setenv("AEFAST_ENCODER_CONV", "onednn")
    with aefast.set_backend("cpu"), pytest.raises(RuntimeError, match="AEFAST_ENCODER_CONV"):
        AF.conv_pool2d(x, w, b, 1, 1, "relu", 2)


# The fused epilogue has a register form (fp32/fp64 with none/relu/leaky_relu: each window
# compared in vector registers) and the per-element-buffer loops (every other case);
# AEFAST_ENCODER_EPILOGUE=loops forces the loops. Both do the same arithmetic in the same order,
# so their outputs must agree bit for bit, on every forward path (direct, Winograd, oneDNN) and
# for pooled planes stored directly (< 2 KiB) and through the row buffer.
@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("case", [
    (2, 1, 32, 28, 28, 3, 1, 1, 2, "relu", torch.float32),       # direct path
    (2, 16, 33, 14, 15, 3, 1, 1, 2, "leaky_relu", torch.float32),  # Winograd, Cout tail
    (1, 8, 6, 47, 48, 3, 1, 1, 2, None, torch.float32),          # Winograd, row buffer
    (2, 8, 9, 12, 11, 3, 2, 1, 2, "relu", torch.float32),        # stride 2: oneDNN
    (1, 3, 5, 13, 12, 3, 1, 1, (3, 2), "relu", torch.float64),   # fp64, 3x2 pool
], ids=["direct", "winograd", "row-buffer", "onednn", "fp64-pool3x2"])
def test_cpu_epilogue_forms_agree(monkeypatch, isa, case):
    n, cin, cout, h, w, k, s, p, pool, act, dtype = case
    monkeypatch.setenv("AEFAST_CPU_ISA", isa)
    x, wt, b = make(n, cin, cout, h, w, k, dtype, "cpu", seed=11)
    x = x.detach()
    x[0, 0, :2] = float("nan")  # NaN windows take the NaN, in both forms
    code = ACTIVATION_CODES[act]
    pools = list(pool) if isinstance(pool, tuple) else [pool, pool]
    args = (x, wt.detach(), b.detach(), [s, s], [p, p], code, 0.05, pools)
    registers = torch.ops.aefast.conv_pool2d_forward(*args)
    monkeypatch.setenv("AEFAST_ENCODER_EPILOGUE", "loops")
    loops = torch.ops.aefast.conv_pool2d_forward(*args)
    for a, c in zip(registers, loops):
        assert torch.equal(a, c) or torch.equal(a.isnan(), c.isnan()) and torch.equal(a.nan_to_num(), c.nan_to_num())


# The weight gradient has two forms (csrc/cpu/conv_pool_backward.cpp, wgrad_uses_positions): per entry
# (long reductions) and by conv position with the output channels in vector lanes (short ones,
# e.g. the first layer's K = 9 or 27). AEFAST_ENCODER_WGRAD forces one; both are held to the
# reference on every case above (the default picks one of them per case) and to each other with
# a corrupted input. The per-entry form reads the patches in the padded image when their KW*Cin
# runs are whole vectors of the ISA (32->64, 16->5, 80->9 under AVX-512, 40->12 fp64), else copies
# them first (17->5, 3->33, 8->24 fp16 under AVX-512).
@pytest.mark.parametrize("form", ["entries", "positions"])
@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("case", ISA_CASES, ids=ISA_CASE_IDS)
def test_cpu_weight_gradient_forms(monkeypatch, form, isa, case):
    n, cin, cout, h, w, k, s, p, pool, act, dtype = case
    monkeypatch.setenv("AEFAST_CPU_ISA", isa)
    monkeypatch.setenv("AEFAST_ENCODER_WGRAD", form)
    x, wt, b = make(n, cin, cout, h, w, k, dtype, "cpu", seed=cin * 100 + cout + 1)
    tol = HALF_GRAD_TOL.get(dtype, TOLERANCES[dtype])
    with aefast.set_backend("cpu"):
        for xin in (x.detach(), x.detach().to(memory_format=torch.channels_last)):
            y, idx = AF.conv_pool2d(xin, wt, b, s, p, act, pool)
            grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
            gw, gb = torch.autograd.grad(y, (wt, b), grad)
            _, rw, rb = routed_grads(x, wt, b, s, p, act, idx, grad)
            for g_, r_ in ((gw, rw), (gb, rb)):
                torch.testing.assert_close(g_.double(), r_, rtol=tol["rtol"],
                                           atol=tol["atol"] * max(1.0, r_.abs().max().item()))


@pytest.mark.parametrize("kind", ["gaussian", "masking"])
def test_cpu_weight_gradient_forms_agree_with_corruption(monkeypatch, kind):
    ops = torch.ops.aefast
    x, w, b = make(5, 3, 17, 13, 11, 3, torch.float32, "cpu", seed=7)
    noise = (kind, 0.3, 1234, 0.0, 1.0)
    pooled, window, preact = ops.conv_pool2d_forward(x.detach(), w.detach(), b.detach(), [1, 1], [1, 1], 1, 0.01,
                                                     [2, 2], *noise)
    grad = torch.randn(pooled.shape, generator=torch.Generator().manual_seed(6))
    got = {}
    for form in ("entries", "positions"):
        monkeypatch.setenv("AEFAST_ENCODER_WGRAD", form)
        got[form] = ops.conv_pool2d_backward_weight(grad, window, preact, x.detach(), [3, 3], [1, 1], [1, 1], 1, 0.01,
                                                    [2, 2], *noise)
    for a, c in zip(got["entries"], got["positions"]):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5 * max(1.0, a.abs().max().item()))


def test_cpu_weight_gradient_form_env_rejects_unknown_value(monkeypatch):
    x, w, b = make(1, 3, 4, 8, 8, 3, torch.float32, "cpu")
    monkeypatch.setenv("AEFAST_ENCODER_WGRAD", "dense")
    with aefast.set_backend("cpu"):
        y, _ = AF.conv_pool2d(x.detach(), w, b, 1, 1, "relu", 2)
        with pytest.raises(RuntimeError, match="AEFAST_ENCODER_WGRAD"):
            y.sum().backward()


# The input gradient has two forms (csrc/cpu/conv_pool_backward.cpp, dgrad_uses_decoder_forward): the
# decoder's forward kernels applied to gz (unpool_conv_transpose2d's math with z = gz, the window
# offsets as indices and the encoder's weight as the transposed conv's) and the per-position
# buckets (dgrad_image). AEFAST_ENCODER_DGRAD forces one; both are held to the reference on every
# case above, through the input-only op and the fused one, for NCHW, a channels-last input and a
# channels-last weight (grad_input channels-last in the last two). The cases reach both decoder
# families: the window-vector kernels (Cin 1 or 3 taps in <= 4 vectors, <= 4-element windows) and
# the per-entry ones (larger slabs, 3x3 and 2x3 pools).
@pytest.mark.parametrize("form", ["decoder", "buckets"])
@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("case", ISA_CASES, ids=ISA_CASE_IDS)
def test_cpu_input_gradient_forms(monkeypatch, form, isa, case):
    n, cin, cout, h, w, k, s, p, pool, act, dtype = case
    monkeypatch.setenv("AEFAST_CPU_ISA", isa)
    monkeypatch.setenv("AEFAST_ENCODER_DGRAD", form)
    x, wt, b = make(n, cin, cout, h, w, k, dtype, "cpu", seed=cin * 100 + cout + 2)
    tol = HALF_GRAD_TOL.get(dtype, TOLERANCES[dtype])
    cl = torch.channels_last
    with aefast.set_backend("cpu"):
        for xin, win in ((x.detach(), wt.detach()), (x.detach().to(memory_format=cl), wt.detach()),
                         (x.detach(), wt.detach().to(memory_format=cl))):
            xin, win = xin.requires_grad_(), win.requires_grad_()
            y, idx = AF.conv_pool2d(xin, win, b, s, p, act, pool)
            grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
            rx, rw, rb = routed_grads(x, wt, b, s, p, act, idx, grad)
            (gx_alone,) = torch.autograd.grad(y, (xin,), grad, retain_graph=True)  # backward_input
            gx, gw, gb = torch.autograd.grad(y, (xin, win, b), grad, retain_graph=True)  # the fused backward
            for g_, r_ in ((gx_alone, rx), (gx, rx), (gw, rw), (gb, rb)):
                torch.testing.assert_close(g_.double(), r_, rtol=tol["rtol"],
                                           atol=tol["atol"] * max(1.0, r_.abs().max().item()))
            # Either form gives grad_input the same dtype and layout (the rule is the op's).
            monkeypatch.setenv("AEFAST_ENCODER_DGRAD", "buckets")
            (bx_alone,) = torch.autograd.grad(y, (xin,), grad, retain_graph=True)
            (bx,) = torch.autograd.grad(y, (xin,), grad)
            monkeypatch.setenv("AEFAST_ENCODER_DGRAD", form)
            for g_, b_ in ((gx_alone, bx_alone), (gx, bx)):
                assert g_.dtype == dtype and g_.shape == x.shape and g_.stride() == b_.stride()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_cpu_input_gradient_forms_agree(monkeypatch, dtype):
    # The raw ops, with the pooled gradient channels-last while window and preact are NCHW (the
    # decoder form then runs in NCHW and copies into the channels-last grad_input), and the fused
    # op with a corrupted input (its weight gradient reads the gz the decoder form computed for
    # the whole batch first). The two forms sum the same products in different orders.
    ops = torch.ops.aefast
    x, w, b = make(5, 6, 17, 13, 11, 3, dtype, "cpu", seed=9)
    x, w, b = x.detach(), w.detach(), b.detach()
    noise = ("gaussian", 0.3, 1234, 0.0, 1.0)
    pooled, window, preact = ops.conv_pool2d_forward(x, w, b, [1, 1], [1, 1], 5, 0.01, [2, 2], *noise)
    grad = torch.randn(pooled.shape, generator=torch.Generator().manual_seed(6)).to(dtype)
    grad_cl = grad.to(memory_format=torch.channels_last)
    got = {}
    for form in ("decoder", "buckets"):
        monkeypatch.setenv("AEFAST_ENCODER_DGRAD", form)
        alone = ops.conv_pool2d_backward_input(grad_cl, window, preact, w, [13, 11], [1, 1], [1, 1], 5, 0.01, [2, 2])
        assert alone.is_contiguous(memory_format=torch.channels_last) and not alone.is_contiguous()
        got[form] = (alone,) + tuple(ops.conv_pool2d_backward(grad, window, preact, x, w, [1, 1], [1, 1], 5, 0.01,
                                                              [2, 2], *noise))
    tol = HALF_GRAD_TOL.get(dtype, dict(rtol=1e-5, atol=1e-5))
    for a, c in zip(got["decoder"], got["buckets"]):
        torch.testing.assert_close(a.double(), c.double(), rtol=tol["rtol"],
                                   atol=tol["atol"] * max(1.0, c.abs().max().item()))
    # The weight and bias gradients do not depend on the input gradient's form: bit for bit.
    assert torch.equal(got["decoder"][2], got["buckets"][2]) and torch.equal(got["decoder"][3], got["buckets"][3])


# The rule (conv_pool_backward.cpp, dgrad_uses_decoder_forward), as each ISA variant applies it: the
# decoder form for few input channels (3x3 taps of one channel: one vector, or two of 8 lanes) on
# every ISA; the buckets for 16->4 and 32->64. The path names itself in the profiler; the fused op
# runs the same rule.
@pytest.mark.parametrize("isa", CPU_ISAS)
def test_cpu_input_gradient_form_rule(monkeypatch, isa):
    monkeypatch.setenv("AEFAST_CPU_ISA", isa)
    monkeypatch.delenv("AEFAST_ENCODER_DGRAD", raising=False)
    ops = torch.ops.aefast
    for cin, cout, want in ((1, 16, True), (16, 4, False), (32, 64, False)):
        x, w, b = make(2, cin, cout, 10, 10, 3, torch.float32, "cpu", seed=cin)
        pooled, window, preact = ops.conv_pool2d_forward(x.detach(), w.detach(), b.detach(), [1, 1], [1, 1], 1, 0.01,
                                                         [2, 2])
        for run in (lambda: ops.conv_pool2d_backward_input(pooled, window, preact, w.detach(), [10, 10], [1, 1],
                                                           [1, 1], 1, 0.01, [2, 2]),
                    lambda: ops.conv_pool2d_backward(pooled, window, preact, x.detach(), w.detach(), [1, 1], [1, 1],
                                                     1, 0.01, [2, 2])):
            taken = "aefast path: conv_pool2d_backward dgrad by decoder forward" in cpu_paths_taken(run)
            assert taken == want, (cin, cout, isa)


def test_cpu_input_gradient_form_env_rejects_unknown_value(monkeypatch):
    x, w, b = make(1, 3, 4, 8, 8, 3, torch.float32, "cpu")
    monkeypatch.setenv("AEFAST_ENCODER_DGRAD", "dense")
    with aefast.set_backend("cpu"):
        y, _ = AF.conv_pool2d(x, w, b, 1, 1, "relu", 2)
        with pytest.raises(RuntimeError, match="AEFAST_ENCODER_DGRAD"):
            y.sum().backward()


def test_cpu_decoder_form_input_gradient_rejects_bad_window_offsets(monkeypatch):
    # The decoder's forward decodes (validates) every index: a window offset outside the 2x2
    # window, which only a direct op call can pass, raises instead of being used.
    monkeypatch.setenv("AEFAST_ENCODER_DGRAD", "decoder")
    ops = torch.ops.aefast
    x, w, b = make(2, 4, 8, 8, 8, 3, torch.float32, "cpu")
    pooled, window, preact = ops.conv_pool2d_forward(x.detach(), w.detach(), b.detach(), [1, 1], [1, 1], 1, 0.01,
                                                     [2, 2])
    window = window.clone()
    window[1, 3, 2, 1] = 4
    with pytest.raises(RuntimeError, match="invalid index"):
        ops.conv_pool2d_backward_input(torch.ones_like(pooled), window, preact, w.detach(), [8, 8], [1, 1], [1, 1], 1,
                                       0.01, [2, 2])


@pytest.mark.parametrize("form", ["decoder", "buckets"])
@pytest.mark.parametrize("isa", CPU_ISAS)
def test_cpu_backward_independent_of_thread_count(monkeypatch, isa, form):
    # Weight/bias partials belong to fixed chunks of images and are summed in chunk order; each
    # image's input gradient is computed by one thread (both forms): bitwise the same for 1, 2
    # and 3 threads.
    monkeypatch.setenv("AEFAST_CPU_ISA", isa)
    monkeypatch.setenv("AEFAST_ENCODER_DGRAD", form)
    ops = torch.ops.aefast
    for cin, cout in ((1, 32), (32, 64)):
        x, w, b = make(37, cin, cout, 12, 12, 3, torch.float32, "cpu", seed=cin)
        pooled, window, preact = ops.conv_pool2d_forward(x.detach(), w.detach(), b.detach(), [1, 1], [1, 1], 1, 0.01,
                                                         [2, 2])
        grad = torch.randn(pooled.shape, generator=torch.Generator().manual_seed(4))
        before = torch.get_num_threads()
        results = []
        try:
            for threads in (1, 2, 3):
                torch.set_num_threads(threads)
                gx = ops.conv_pool2d_backward_input(grad, window, preact, w.detach(), [12, 12], [1, 1], [1, 1], 1, 0.01,
                                                    [2, 2])
                gw, gb = ops.conv_pool2d_backward_weight(grad, window, preact, x.detach(), [3, 3], [1, 1], [1, 1], 1,
                                                         0.01, [2, 2])
                fused = ops.conv_pool2d_backward(grad, window, preact, x.detach(), w.detach(), [1, 1], [1, 1], 1, 0.01,
                                                 [2, 2])
                results.append((gx, gw, gb) + tuple(fused))
        finally:
            torch.set_num_threads(before)
        for other in results[1:]:
            for a, r in zip(results[0], other):
                assert torch.equal(a, r)


@pytest.mark.parametrize("ns", _namespaces())
def test_fused_backward_equals_the_two_ops(ns):
    # conv_pool2d_backward (both gradients, gz computed once) against backward_input and
    # backward_weight called separately: the same math, so the same numbers.
    ops = getattr(torch.ops, ns)
    for stride, padding, pool, act in (((1, 1), (1, 1), (2, 2), 1), ((2, 1), (0, 2), (3, 2), 5)):
        x, w, b = make(2, 3, 5, 11, 10, 3, torch.float32, "cpu", seed=8)
        pooled, window, preact = ops.conv_pool2d_forward(x.detach(), w.detach(), b.detach(), list(stride), list(padding),
                                                         act, 0.01, list(pool))
        grad = torch.randn(pooled.shape, generator=torch.Generator().manual_seed(6))
        gx, gw, gb = ops.conv_pool2d_backward(grad, window, preact, x.detach(), w.detach(), list(stride), list(padding),
                                              act, 0.01, list(pool))
        rx = ops.conv_pool2d_backward_input(grad, window, preact, w.detach(), [11, 10], list(stride), list(padding), act,
                                            0.01, list(pool))
        rw, rb = ops.conv_pool2d_backward_weight(grad, window, preact, x.detach(), [3, 3], list(stride), list(padding),
                                                 act, 0.01, list(pool))
        torch.testing.assert_close(gx, rx, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(gw, rw, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(gb, rb, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("needs", [(True, False, True), (False, False, True), (True, True, False)],
                             ids=["input+bias", "bias-only", "input+weight"])
def test_partial_grads(needs):
    # Every combination autograd may ask for goes through the right op (fused or single) and
    # returns the routed gradients; a frozen weight with a trainable bias included.
    x, w, b = make(2, 3, 4, 9, 8, 3, torch.float32, "cpu", seed=9)
    for t, need in zip((x, w, b), needs):
        t.requires_grad_(need)
    with aefast.set_backend("cpu"):
        y, idx = AF.conv_pool2d(x, w, b, 1, 1, "relu", 2)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    wanted = [t for t, need in zip((x, w, b), needs) if need]
    got = torch.autograd.grad(y, wanted, grad)
    ref = [r for r, need in zip(routed_grads(x, w, b, 1, 1, "relu", idx, grad), needs) if need]
    for g_, r_ in zip(got, ref):
        torch.testing.assert_close(g_.double(), r_, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ layouts, NaN, determinism

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_channels_last_input(backend, dtype):
    """A channels_last input (the Triton kernels' fast layout, K ordered channel-innermost) gives
    the same indices and values as eager, and the same gradients."""
    x, w, b = make(2, 5, 6, 10, 9, 3, dtype, backend_device(backend), seed=13)
    xc = x.detach().to(memory_format=torch.channels_last).requires_grad_()
    assert not xc.is_contiguous()
    grad_tol = {torch.float16: dict(rtol=2e-2, atol=2e-2), torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}.get(dtype)
    check_case(xc, w, b, 1, 1, "relu", 2, grad_tol=grad_tol)


def test_nan_and_tie_argmax_follow_torch_scan(backend):
    """A 1x1 identity conv makes the conv output the input itself, so the windows hold chosen
    values: exact ties (first wins), one NaN (wins), two NaNs (torch's scan takes the last), -inf."""
    device = backend_device(backend)
    nan, inf = float("nan"), float("inf")
    plane = torch.tensor([[1.0, 1.0, nan, 0.5, 2.0, -inf],
                          [0.0, 1.0, 3.0, nan, 2.0, -inf],
                          [nan, 4.0, 5.0, 5.0, -inf, -inf],
                          [2.0, nan, 5.0, 5.0, -inf, -inf]])
    x = plane.expand(1, 2, 4, 6).clone().to(device)
    w = torch.eye(2).view(2, 2, 1, 1).to(device)
    for act in (None, "relu"):
        y, idx = AF.conv_pool2d(x, w, None, 1, 0, act, 2)
        ry, ridx = eager(x, w, None, 1, 0, act, 2)
        assert torch.equal(idx, ridx), (idx, ridx)
        torch.testing.assert_close(y, ry, equal_nan=True, rtol=0, atol=0)


def _triton_kernels():
    ok, why = _backend.availability()["triton"]
    if not ok:
        pytest.skip(why)
    from aefast.triton import conv_pool as kernels
    return kernels


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_triton_weight_gradient_split_k_is_deterministic(channels_last):
    """Split-K with per-split buffers and an in-order second stage: the same bits on every run
    for a given split count, and every split count gives the same sums to rounding."""
    kernels = _triton_kernels()
    x, w, b = make(3, 4, 6, 12, 11, 3, torch.float32, backend_device("triton"), seed=21)
    x = x.detach()
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    pooled, window, preact = kernels.conv_pool2d_forward(x, w.detach(), b.detach(), [1, 1], [1, 1], 5, 0.01, [2, 2])
    grad = torch.randn(pooled.shape, generator=torch.Generator().manual_seed(3)).to(x.device)
    args = (grad, window, preact, x, [3, 3], [1, 1], [1, 1], 5, 0.01, [2, 2])
    runs = {s: [kernels.conv_pool2d_backward_weight(*args, splits=s) for _ in range(2)] for s in (1, 2, 5)}
    for s, (first, second) in runs.items():
        assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1]), f"splits={s} not bitwise"
    for s in (2, 5):
        torch.testing.assert_close(runs[s][0][0], runs[1][0][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(runs[s][0][1], runs[1][0][1], rtol=1e-5, atol=1e-5)
    idx = AF.window_to_flat(window, (12, 11), 2)
    want = routed_grads(x, w, b, 1, 1, "gelu", idx, grad)
    torch.testing.assert_close(runs[2][0][0].double(), want[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(runs[2][0][1].double(), want[2], rtol=1e-5, atol=1e-5)


def test_triton_input_gradient_covers_rows_past_the_pool():
    """A 9x8 conv output pooled by 2 leaves the last conv row unpooled, and stride 2 with
    H + 2P - K odd needs the decoder's output_padding: the input gradient still has the input's
    size and is the routed gradient (zero where no pooled maximum reaches)."""
    kernels = _triton_kernels()
    x, w, b = make(2, 3, 4, 18, 15, 3, torch.float32, backend_device("triton"), seed=8)
    pooled, window, preact = kernels.conv_pool2d_forward(x.detach(), w.detach(), b.detach(), [2, 2], [1, 1], 1, 0.01,
                                                         [2, 2])
    grad = torch.randn(pooled.shape, generator=torch.Generator().manual_seed(4))
    gx = kernels.conv_pool2d_backward_input(grad, window, preact, w.detach(), [18, 15], [2, 2], [1, 1], 1, 0.01, [2, 2])
    hc, wc = (18 + 2 - 3) // 2 + 1, (15 + 2 - 3) // 2 + 1
    assert (hc, wc) == (9, 8)
    idx = AF.window_to_flat(window, (hc, wc), 2)
    want = routed_grads(x, w, b, 2, 1, "relu", idx, grad)[0]
    assert gx.shape == x.shape
    torch.testing.assert_close(gx.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_triton_max_pool2d_backward_overlapping_windows(deterministic):
    """3x3 windows at stride 1: an element can be the maximum of up to nine windows. The atomic
    scatter and, under torch.use_deterministic_algorithms, torch's sorted index_put_ both give
    eager's gradient; the deterministic one the same bits twice."""
    _triton_kernels()
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 3, (2, 3, 7, 6), generator=g).float().requires_grad_()  # many shared maxima
    grad = torch.randn(2, 3, 5, 4, generator=g)
    want, = torch.autograd.grad(F.max_pool2d(x, 3, 1), x, grad)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        with aefast.set_backend("triton"):
            runs = [torch.autograd.grad(AF.max_pool2d(x, 3, 1), x, grad)[0] for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(previous)
    torch.testing.assert_close(runs[0], want, rtol=1e-6, atol=1e-6)
    if deterministic:
        assert torch.equal(runs[0], runs[1])


# ------------------------------------------------------------------ channels_last layout (cpu)
#
# A channels_last input (or weight) gives channels_last outputs, as eager's conv2d does, and the
# input gradient follows; channels_last pooled gradients are read as they are. The kernels do
# the same arithmetic in the same order in both layouts, so every output must equal the NCHW
# run's bit for bit, on every forward path, and the fake functions must give the same strides.
LAYOUT_CASES = [  # n, cin, cout, h, w, kernel, stride, padding, pool, pool_stride, act, dtype
    (2, 1, 16, 28, 28, 3, 1, 1, 2, 0, "relu", torch.float32),       # direct (K = 9)
    (2, 16, 20, 14, 13, 3, 1, 1, 2, 0, "relu", torch.float32),      # Winograd
    (2, 8, 9, 12, 11, 3, 2, 1, 2, 0, "leaky_relu", torch.float32),  # stride 2: oneDNN
    (1, 3, 17, 13, 12, 3, 1, 1, 2, 0, "gelu", torch.bfloat16),      # direct, half type
    (1, 4, 6, 11, 10, 3, 1, 1, 3, 2, "relu", torch.float32),        # overlapping pool: general path
]


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("case", LAYOUT_CASES, ids=["direct", "winograd", "onednn", "bf16", "general"])
def test_cpu_channels_last_in_channels_last_out(monkeypatch, isa, case):
    n, cin, cout, h, w, k, s, p, pool, pool_stride, act, dtype = case
    monkeypatch.setenv("AEFAST_CPU_ISA", isa)
    # aefast's sparse backward in both layouts (the same sums: equal bit for bit); the vendor route
    # (AEFAST_ENCODER_BACKWARD=vendor) is held to it in test_cpu_backward_routes_agree.
    monkeypatch.setenv("AEFAST_ENCODER_BACKWARD", "sparse")
    ops = torch.ops.aefast
    x, wt, b = make(n, cin, cout, h, w, k, dtype, "cpu", seed=cin + cout)
    x, wt, b = x.detach(), wt.detach(), b.detach()
    code = ACTIVATION_CODES[act]
    geo = ([s, s], [p, p], code, 0.01, [pool, pool])
    tail = dict(pool_stride=[pool_stride, pool_stride])
    ref = ops.conv_pool2d_forward(x, wt, b, *geo, **tail)
    cl = torch.channels_last

    def same(got, want):
        if pool_stride == 0:  # aefast's tiling kernels: the same sums in either layout
            assert torch.equal(got, want)
        else:  # the general path's conv is oneDNN's, whose summation order follows the layout
            torch.testing.assert_close(got.double(), want.double(), rtol=1e-5, atol=1e-5)

    for xin, win in ((x.contiguous(memory_format=cl), wt), (x, wt.contiguous(memory_format=cl))):
        if cin == 1 and win is wt:
            continue  # a 1-channel input is both layouts at once: it says nothing
        got = ops.conv_pool2d_forward(xin, win, b, *geo, **tail)
        for g_, r_ in zip(got, ref):
            assert g_.is_contiguous(memory_format=cl) and (cout == 1 or not g_.is_contiguous())
            same(g_, r_)
    # Backward from channels_last pooled tensors (as the forward above returns them) and from
    # NCHW ones: the same gradients, the input gradient channels_last.
    pooled, window, preact = ref
    grad = torch.randn(pooled.shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    bgeo = ([s, s], [p, p], code, 0.01, [pool, pool])
    want = ops.conv_pool2d_backward(grad, window, preact, x, wt, *bgeo, **tail)
    as_cl = [t.contiguous(memory_format=cl) for t in (grad, window, preact)]
    got = ops.conv_pool2d_backward(*as_cl, x.contiguous(memory_format=cl), wt, *bgeo, **tail)
    assert got[0].is_contiguous(memory_format=cl) and (cin == 1 or not got[0].is_contiguous())
    for g_, r_ in zip(got, want):
        same(g_, r_)
    gx = ops.conv_pool2d_backward_input(*as_cl, wt, [h, w], *bgeo, **tail)
    assert gx.is_contiguous(memory_format=cl)
    same(gx, want[0])
    gw, gb = ops.conv_pool2d_backward_weight(*as_cl, x, [k, k], *bgeo, **tail)
    same(gw, want[1])
    same(gb, want[2])


# A tiling pool's backward has two routes (csrc/cpu/conv_pool_backward.cpp, backward_uses_vendor): aefast's
# sparse kernels (the default, measured faster), and gz scattered into a dense channels-last dL/dz
# handed to oneDNN's convolution_backward (the general pool's route), kept as an A/B switch. Both against the exact
# routed gradients and each other, in both layouts, the layouts of their results equal; ceil_mode
# with even and odd maps (tiling either way), odd maps whose last row/column feed no window.
ROUTE_CASES = [  # n, cin, cout, h, w, k, stride, padding, pool, ceil_mode, act, dtype
    (2, 8, 8, 12, 14, 3, 1, 1, 2, False, "relu", torch.float32),
    (3, 16, 16, 9, 11, 3, 1, 1, 2, True, "relu", torch.float32),    # odd map, ceil_mode: tiling still
    (2, 3, 17, 10, 9, 3, 2, 1, 2, False, "leaky_relu", torch.float32),
    (1, 5, 6, 11, 10, (3, 1), 1, (1, 0), (3, 2), False, "gelu", torch.float32),
    (2, 8, 16, 10, 10, 3, 1, 1, 2, False, "relu", torch.bfloat16),
    (1, 4, 5, 7, 9, 3, 1, 1, 2, False, None, torch.float64),
]


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("case", ROUTE_CASES, ids=[f"{c[1]}to{c[2]}-{c[10]}-{str(c[11])[6:]}" for c in ROUTE_CASES])
def test_cpu_backward_routes_agree(monkeypatch, isa, case):
    n, cin, cout, h, w, k, s, p, pool, ceil, act, dtype = case
    monkeypatch.setenv("AEFAST_CPU_ISA", isa)
    x, wt, b = make(n, cin, cout, h, w, k, dtype, "cpu", seed=cin * 10 + cout)
    tol = HALF_GRAD_TOL.get(dtype, TOLERANCES[dtype])
    cl = torch.channels_last
    got = {}
    with aefast.set_backend("cpu"):
        for route in ("sparse", "vendor"):
            monkeypatch.setenv("AEFAST_ENCODER_BACKWARD", route)
            for layout in (torch.contiguous_format, cl):
                xin = x.detach().contiguous(memory_format=layout).requires_grad_()
                win = wt.detach().contiguous(memory_format=layout).requires_grad_()
                bin_ = b.detach().requires_grad_()
                y, idx = AF.conv_pool2d(xin, win, bin_, s, p, act, pool, ceil_mode=ceil)
                grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
                gx, gw, gb = torch.autograd.grad(y, (xin, win, bin_), grad)
                assert gx.is_contiguous(memory_format=layout)
                got[route, layout] = (gx, gw, gb)
                want = routed_grads(x, wt, b, s, p, act, idx, grad)
                for g_, r_ in zip((gx, gw, gb), want):
                    torch.testing.assert_close(g_.double(), r_, rtol=tol["rtol"],
                                               atol=tol["atol"] * max(1.0, r_.abs().max().item()))
    for layout in (torch.contiguous_format, cl):
        for a, c in zip(got["sparse", layout], got["vendor", layout]):
            assert a.shape == c.shape and a.stride() == c.stride()


def test_cpu_backward_route_env_rejects_unknown_value(monkeypatch):
    x, w, b = make(1, 3, 4, 8, 8, 3, torch.float32, "cpu")
    monkeypatch.setenv("AEFAST_ENCODER_BACKWARD", "dense")
    with aefast.set_backend("cpu"):
        y, _ = AF.conv_pool2d(x.detach(), w, b, 1, 1, "relu", 2)
        with pytest.raises(RuntimeError, match="AEFAST_ENCODER_BACKWARD"):
            y.sum().backward()


def test_cpu_channels_last_narrow_large_map_forward():
    """Channels-last 8/16-channel blocks on maps of >= 32768 conv values per image take oneDNN's
    conv + the fused epilogue instead of Winograd (csrc/cpu/conv_pool_winograd.cpp,
    encoder_uses_winograd): the same outputs as the NCHW (Winograd) forward, indices exact."""
    ops = torch.ops.aefast
    for cin, cout, hw in ((8, 8, 64), (16, 16, 46)):
        x, w, b = make(2, cin, cout, hw, hw, 3, torch.float32, "cpu", seed=cout)
        x, w, b = x.detach(), w.detach(), b.detach()
        want = ops.conv_pool2d_forward(x, w, b, [1, 1], [1, 1], 1, 0.01, [2, 2])
        got = ops.conv_pool2d_forward(x.contiguous(memory_format=torch.channels_last), w, b, [1, 1], [1, 1], 1, 0.01,
                                      [2, 2])
        torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-5)
        assert torch.equal(got[1], want[1])
        _, idx = eager(x, w, b, 1, 1, "relu", 2)
        assert torch.equal(AF.window_to_flat(got[1], (hw, hw), 2), idx)


def test_cpu_channels_last_fake_strides_match():
    """The fake functions give the CPU kernels' layout, so torch.compile's stride asserts hold."""
    ops = torch.ops.aefast
    x, w, b, grad, window, preact = _op_args()
    cl = torch.channels_last
    xc = x.detach().contiguous(memory_format=cl)
    torch.library.opcheck(ops.conv_pool2d_forward.default, (xc, w, b, [1, 1], [1, 1], 5, 0.01, [2, 2]))
    gc, wc, pc = (t.contiguous(memory_format=cl) for t in (grad, window, preact))
    torch.library.opcheck(ops.conv_pool2d_backward_input.default,
                          (gc, wc, pc, w.detach(), [9, 8], [1, 1], [1, 1], 5, 0.01, [2, 2]))
    torch.library.opcheck(ops.conv_pool2d_backward.default,
                          (gc, wc, pc, xc, w.detach(), [1, 1], [1, 1], 5, 0.01, [2, 2]))
    from torch._subclasses.fake_tensor import FakeTensorMode
    w, b = w.detach(), b.detach()
    mode = FakeTensorMode()
    fx, fw, fb = mode.from_tensor(xc), mode.from_tensor(w), mode.from_tensor(b)
    with mode:
        fake = ops.conv_pool2d_forward(fx, fw, fb, [1, 1], [1, 1], 5, 0.01, [2, 2])
    real = ops.conv_pool2d_forward(xc, w, b, [1, 1], [1, 1], 5, 0.01, [2, 2])
    for f_, r_ in zip(fake, real):
        assert f_.stride() == r_.stride()


# The epilogue writes NCHW outputs by in-register transposes (conv_pool_kernels.inc,
# store_transposed); AEFAST_ENCODER_STORES=scalar keeps the former element-by-element stores for
# A/B timing. Both store the same values: the outputs must agree bit for bit.
@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("case", [
    (3, 1, 32, 28, 28, 3, 1, 1, 2, "relu", torch.float32),        # direct, 14x14 planes
    (2, 32, 64, 14, 14, 3, 1, 1, 2, "relu", torch.float32),       # Winograd, 7x7 planes
    (1, 5, 28, 11, 10, 3, 1, 1, 2, "leaky_relu", torch.float64),  # fp64, odd plane 5x5
    (2, 3, 17, 13, 12, 3, 1, 1, 2, "gelu", torch.bfloat16),       # half type: the loops epilogue
], ids=["direct", "winograd", "fp64", "bf16"])
def test_cpu_epilogue_store_forms_agree(monkeypatch, isa, case):
    n, cin, cout, h, w, k, s, p, pool, act, dtype = case
    monkeypatch.setenv("AEFAST_CPU_ISA", isa)
    x, wt, b = make(n, cin, cout, h, w, k, dtype, "cpu", seed=cout)
    args = (x.detach(), wt.detach(), b.detach(), [s, s], [p, p], ACTIVATION_CODES[act], 0.01, [pool, pool])
    got = {}
    for form in ("scalar", "transposed"):
        monkeypatch.setenv("AEFAST_ENCODER_STORES", form)
        got[form] = torch.ops.aefast.conv_pool2d_forward(*args)
    for a, c in zip(got["scalar"], got["transposed"]):
        assert torch.equal(a, c)
    monkeypatch.setenv("AEFAST_ENCODER_STORES", "strided")
    with pytest.raises(RuntimeError, match="AEFAST_ENCODER_STORES"):
        torch.ops.aefast.conv_pool2d_forward(*args)


@pytest.mark.parametrize("kernel, stride, dilation, in_hw", [((2, 2), (2, 2), (1, 1), (12, 10)),
                                                             ((3, 2), (2, 3), (1, 1), (9, 11)),
                                                             ((2, 3), (1, 2), (2, 1), (8, 9))])
def test_cpu_window_to_flat_for_windows_inside_the_input(kernel, stride, dilation, in_hw):
    """The encoders' indices: csrc/cpu/pool_index.cpp converts window offsets of windows that all lie
    inside the input by a displacement table; against the definition (offset r*kw + c -> flat
    (oh*sh + r*dh)*W + ow*sw + c*dw), offsets past the window (255 included) giving -1."""
    h_out = (in_hw[0] - (kernel[0] - 1) * dilation[0] - 1) // stride[0] + 1
    w_out = (in_hw[1] - (kernel[1] - 1) * dilation[1] - 1) // stride[1] + 1
    g = torch.Generator().manual_seed(0)
    window = torch.randint(0, kernel[0] * kernel[1], (2, 3, h_out, w_out), generator=g, dtype=torch.uint8)
    window[0, 0, 0, 0], window[1, 2, -1, -1] = 255, kernel[0] * kernel[1]
    got = torch.ops.aefast.window_to_flat(window, list(in_hw), list(kernel), list(stride), [0, 0], list(dilation))
    oh = torch.arange(h_out).view(-1, 1)
    ow = torch.arange(w_out).view(1, -1)
    r, c = window.long() // kernel[1], window.long() % kernel[1]
    want = (oh * stride[0] + r * dilation[0]) * in_hw[1] + ow * stride[1] + c * dilation[1]
    want[window.long() >= kernel[0] * kernel[1]] = -1
    assert torch.equal(got, want)
