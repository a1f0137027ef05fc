"""conv_bn_pool2d: conv -> BatchNorm2d -> activation -> max-pool against PyTorch's modules.

The spec is ``nn.Sequential(nn.Conv2d, nn.BatchNorm2d, act, nn.MaxPool2d(return_indices=True))`` in
training mode (batch statistics, running statistics and num_batches_tracked updated) and in eval
mode: indices equal bit for bit (fp32/fp64), values, every gradient and the running statistics
within the per-dtype tolerance. The reference twin (aefast.reference.functional.conv_bn_pool2d) is
held to the same spec, and the fuzz holds every backend to the twin. The triton backend (Triton
kernels around the vendor conv; CPU tensors under TRITON_INTERPRET=1 here, tiny shapes because the
interpreter is slow) runs the same contract as cpu, with no fallback counted.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import aefast
import aefast.functional as AF
from aefast import backend as _backend
from aefast.ops import _registry
from aefast.ops.conv_pool import ACTIVATION_CODES
from aefast.reference import functional as ref
from conftest import CPU_ISAS, TOLERANCES

ACT_MODULES = {None: nn.Identity, "relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.01), "sigmoid": nn.Sigmoid,
               "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU}
HAS_TRITON = _backend.availability()["triton"][0]
BACKENDS_HERE = ["cpu", "reference"] + (["triton"] if HAS_TRITON else [])
KERNELS_HERE = ["cpu"] + (["triton"] if HAS_TRITON else [])
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton unavailable here")


def make_pair(cin, cout, k, stride=1, padding=0, pool=2, act="relu", momentum=0.1, bias=True, affine=True,
              dtype=torch.float32, seed=0):
    """(torch spec, aefast ConvBNPool2d) with the same, randomised, parameters and buffers."""
    torch.manual_seed(seed)
    spec = nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding, bias=bias),
                         nn.BatchNorm2d(cout, momentum=momentum, affine=affine), ACT_MODULES[act](),
                         nn.MaxPool2d(pool, return_indices=True)).to(dtype)
    with torch.no_grad():
        bn = spec[1]
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        if affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
    fused = aefast.nn.ConvBNPool2d(cin, cout, k, stride, padding, act, pool, bias=bias, momentum=momentum,
                                   affine=affine, dtype=dtype)
    fused.load_state_dict({k.replace("0.", "conv.", 1).replace("1.", "bn.", 1): v
                           for k, v in spec.state_dict().items()})
    return spec, fused


def run_step(model, x, grad=None):
    """One forward and backward; ``grad`` (the pooled map's gradient) defaults to a fixed random one."""
    x = x.detach().clone().requires_grad_()
    pooled, idx = model(x)
    if grad is None:
        grad = torch.randn(pooled.shape, generator=torch.Generator().manual_seed(0), dtype=pooled.dtype)
    (pooled * grad).sum().backward()
    grads = {"x": x.grad}
    grads.update({name.replace("0.", "conv.", 1).replace("1.", "bn.", 1): p.grad
                  for name, p in model.named_parameters()})
    return pooled, idx, grads


def assert_same_step(spec, fused, x, *, tol, exact_indices=True):
    want, want_idx, want_grads = run_step(spec, x)
    got, got_idx, got_grads = run_step(fused, x)
    torch.testing.assert_close(got, want, **tol)
    if exact_indices:
        assert torch.equal(got_idx, want_idx)
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, **tol)
    buffers = dict(fused.named_buffers())
    for name, b in spec.named_buffers():  # running statistics and num_batches_tracked
        torch.testing.assert_close(buffers[name.replace("1.", "bn.", 1)], b, **tol, msg=name)
    spec.zero_grad(), fused.zero_grad()


@pytest.mark.parametrize("backend_name", BACKENDS_HERE)
@pytest.mark.parametrize("act", ["relu", "leaky_relu", "tanh", "silu", None])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_torch_modules_in_train_then_eval(backend_name, act, momentum, dtype):
    spec, fused = make_pair(3, 5, 3, padding=1, act=act, momentum=momentum, dtype=dtype)
    x = torch.randn(2, 3, 9, 7, dtype=dtype)  # odd H/W: the last conv row and column feed no window
    tol = TOLERANCES[dtype] if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    with aefast.set_backend(backend_name):
        for step in range(3):  # running statistics accumulate; momentum=None averages over the steps
            assert_same_step(spec, fused, x + step, tol=tol)
        assert fused.bn.num_batches_tracked.item() == 3
        spec.eval(), fused.eval()  # eval: the running statistics, folded into the conv
        assert_same_step(spec, fused, x, tol=tol)
        assert fused.bn.num_batches_tracked.item() == 3


@pytest.mark.parametrize("n, cin, cout, h, w, k, stride, padding, pool", [
    (1, 3, 17, 7, 9, 3, 1, 1, 2),           # batch 1, channels 3 -> 17, odd H/W
    (2, 17, 3, 11, 6, (3, 1), (2, 1), (1, 0), 3),
    (1, 1, 3, 5, 5, 3, 1, 0, (1, 3)),       # a 3x3 conv output pooled to 3x1
    (1, 2, 4, 2, 2, 1, 1, 0, 2),            # batch 1, a 2x2 conv output, a 1x1 pooled map
    (3, 2, 3, 4, 4, 4, 1, 0, 1),            # a 1x1 conv output over a batch of 3; 1x1 pool
])
@pytest.mark.parametrize("backend_name", BACKENDS_HERE)
def test_odd_shapes(n, cin, cout, h, w, k, stride, padding, pool, backend_name):
    spec, fused = make_pair(cin, cout, k, stride, padding, pool, act="relu", dtype=torch.float64)
    x = torch.randn(n, cin, h, w, dtype=torch.float64)
    with aefast.set_backend(backend_name):
        assert_same_step(spec, fused, x, tol=TOLERANCES[torch.float64])
        spec.eval(), fused.eval()
        assert_same_step(spec, fused, x, tol=TOLERANCES[torch.float64])


def test_no_bias_no_affine_and_no_running_stats():
    spec, fused = make_pair(2, 4, 3, padding=1, bias=False, affine=False, dtype=torch.float64)
    assert_same_step(spec, fused, torch.randn(2, 2, 6, 6, dtype=torch.float64), tol=TOLERANCES[torch.float64])
    # track_running_stats=False: batch statistics in eval mode too, nothing is updated
    torch.manual_seed(3)
    spec = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
                         nn.MaxPool2d(2, return_indices=True)).double().eval()
    fused = aefast.nn.ConvBNPool2d(2, 4, 3, track_running_stats=False, dtype=torch.float64).eval()
    fused.load_state_dict({k.replace("0.", "conv.", 1).replace("1.", "bn.", 1): v
                           for k, v in spec.state_dict().items()})
    assert_same_step(spec, fused, torch.randn(2, 2, 8, 7, dtype=torch.float64), tol=TOLERANCES[torch.float64])


# The fp32/fp64 forward kernels (csrc/cpu/conv_bn_pool_kernels.inc: row_moments, activate_pool_row
# for the select activations) work on channel blocks of whole, half and quarter vectors and single
# values: 8 and 16 channels (the narrow layers of SegNet and U-Net; one half or one whole AVX-512
# fp32 vector) and 9 (a block and a tail), held to torch's modules on every instruction set, in
# both layouts, on odd maps (the last conv row and column feed no window).
@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("cout", [8, 16, 9])
@pytest.mark.parametrize("act", ["relu", "leaky_relu", None])
@pytest.mark.parametrize("channels_last", [False, True])
def test_channel_blocks_match_torch(monkeypatch, isa, cout, act, channels_last):
    monkeypatch.setenv("AEFAST_CPU_ISA", isa)
    spec, fused = make_pair(3, cout, 3, padding=1, act=act, seed=cout)
    x = torch.randn(3, 3, 13, 11, generator=torch.Generator().manual_seed(cout))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        spec, fused = spec.to(memory_format=torch.channels_last), fused.to(memory_format=torch.channels_last)
    tol = dict(rtol=1e-4, atol=1e-5)
    with aefast.set_backend("cpu"):
        for step in range(2):
            want, want_idx, want_grads = run_step(spec, x + step)
            got, got_idx, got_grads = run_step(fused, x + step)
            torch.testing.assert_close(got, want, **tol)
            assert torch.equal(got_idx, want_idx)
            for name, g in want_grads.items():
                if name == "conv.bias":  # zero up to fp32 rounding (BatchNorm removes the mean): a bound
                    assert got_grads[name].abs().max() < 1e-4 * want_grads["bn.bias"].abs().max()
                    continue
                # absolute error in units of the gradient's scale (|conv.weight grad| ~ 50 here)
                torch.testing.assert_close(got_grads[name], g, rtol=tol["rtol"],
                                           atol=tol["atol"] * max(1.0, g.abs().max().item()), msg=name)
            buffers = dict(fused.named_buffers())
            for name, b in spec.named_buffers():
                torch.testing.assert_close(buffers[name.replace("1.", "bn.", 1)], b, **tol, msg=name)
            spec.zero_grad(), fused.zero_grad()


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype, rel", [(torch.bfloat16, 4e-2), (torch.float16, 1e-2)])
def test_channel_blocks_half_types(monkeypatch, isa, dtype, rel):
    """16 channels with half-type tensors (the rounding loops; values widened to fp32 inside): against
    the fp32 spec on the same rounded inputs, as test_low_precision_against_fp32 states."""
    monkeypatch.setenv("AEFAST_CPU_ISA", isa)
    spec, fused = make_pair(4, 16, 3, padding=1, act="relu", seed=2)
    fused = fused.to(dtype)
    fused.bn.float()
    x = torch.randn(2, 4, 12, 10).to(dtype).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(2, 16, 6, 5).to(dtype)
    want, _, want_grads = run_step(spec, x.float(), grad.float())
    with aefast.set_backend("cpu"):
        got, _, got_grads = run_step(fused, x, grad)
    torch.testing.assert_close(got.float(), want, rtol=rel, atol=rel)
    for name, g in want_grads.items():
        if name == "conv.bias":
            continue  # zero up to rounding (test_low_precision_against_fp32 bounds it)
        assert (got_grads[name].float() - g).norm() / g.norm() < rel, name
    torch.testing.assert_close(fused.bn.running_var, spec[1].running_var, rtol=rel, atol=rel)


@pytest.mark.parametrize("backend_name", KERNELS_HERE)
@pytest.mark.parametrize("dtype, rel", [(torch.float16, 1e-2), (torch.bfloat16, 4e-2)])
def test_low_precision_against_fp32(dtype, rel, backend_name):
    """fp16/bf16: the conv runs in the input dtype, statistics, normalisation and activation in
    fp32. Tolerance, stated: pooled values and running statistics within ``rel`` of the fp32 spec
    run on the same (rounded) inputs; gradients within ``rel`` in relative L2 norm (a near-tie that
    rounding decides differently moves one routed gradient, so indices are not compared)."""
    spec, fused = make_pair(4, 6, 3, padding=1, act="relu", dtype=torch.float32, seed=4)
    fused = fused.to(dtype)
    fused.bn.float()  # BatchNorm parameters and statistics stay fp32, as under autocast
    x = torch.randn(2, 4, 10, 9).to(dtype)
    grad = torch.randn(2, 6, 5, 4).to(dtype)
    want, _, want_grads = run_step(spec, x.float(), grad.float())
    with aefast.set_backend(backend_name):
        got, idx, got_grads = run_step(fused, x, grad)
    assert got.dtype == dtype and idx.dtype == torch.int64
    torch.testing.assert_close(got.float(), want, rtol=rel, atol=rel)
    for name, g in want_grads.items():
        if name == "conv.bias":  # zero up to rounding (BatchNorm removes the mean): an absolute bound
            assert got_grads[name].abs().max() < rel * want_grads["bn.bias"].abs().max()
            continue
        err = (got_grads[name].float() - g).norm() / g.norm()
        assert err < rel, (name, err.item())
    torch.testing.assert_close(fused.bn.running_mean, spec[1].running_mean, rtol=rel, atol=rel)
    torch.testing.assert_close(fused.bn.running_var, spec[1].running_var, rtol=rel, atol=rel)


def test_window_indices_and_channels_last():
    spec, fused = make_pair(3, 4, 3, padding=1, pool=(2, 3), dtype=torch.float64)
    fused.index_format = "window"
    x = torch.randn(2, 3, 8, 9, dtype=torch.float64)
    want, want_idx = copy.deepcopy(spec)(x)
    got, window = copy.deepcopy(fused)(x.contiguous(memory_format=torch.channels_last))
    assert window.dtype == torch.uint8
    torch.testing.assert_close(got, want, **TOLERANCES[torch.float64])
    assert torch.equal(AF.window_to_flat(window, (8, 9), (2, 3)), want_idx)
    assert got.is_contiguous(memory_format=torch.channels_last)


def test_nan_wins_and_first_maximum_wins():
    """torch's pool rules over the activated values: a NaN gives the index; with ReLU a window of
    non-positive values reports its first element."""
    x = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    x[0, 0, 2, 3] = float("nan")
    w = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    for backend_name in BACKENDS_HERE:
        with aefast.set_backend(backend_name):
            got, idx = AF.conv_bn_pool2d(x[1:], w, None, None, None, None, None, True, 0.1, 1e-5, 1, 0, "relu", 2)
            want, want_idx = F.max_pool2d(F.relu(F.batch_norm(x[1:], None, None, training=True)), 2,
                                          return_indices=True)
            assert torch.equal(idx, want_idx)
            nan_out, nan_idx = AF.conv_bn_pool2d(x, w, None, None, None, None, None, True, 0.1, 1e-5, 1, 0, "relu", 2)
            assert torch.isnan(nan_out).all()  # the NaN spoils the batch statistics of the channel
            assert torch.equal(nan_idx, F.max_pool2d(torch.full_like(x, float("nan")), 2, return_indices=True)[1])


# ------------------------------------------------------------------ pool geometries and dtypes against the twin

POOL_GEOMETRIES = [  # (pool_size, pool_stride, ceil_mode), every geometry the ops take
    ((2, 2), None, False),
    ((3, 2), (2, 1), True),   # overlapping windows; ceil_mode clips the last row of windows
    ((2, 3), (3, 3), False),  # gaps between windows: some conv positions feed no window
    ((2, 2), (1, 1), True),   # every interior position lies in four windows
]


def _against_twin(backend_name, dtype, act, pool, pool_stride, ceil_mode, seed=0, shape=(2, 3, 9, 8), cout=5,
                  fused=AF.conv_bn_pool2d):
    """One forward and backward through ``fused`` on the backend and through the twin from the same
    inputs: (got, want), each (pooled, window indices, [grad x, w, b, gamma, beta], running_mean,
    running_var)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g).to(dtype)
    w = (torch.randn(cout, shape[1], 3, 3, generator=g) / 3).to(dtype)
    b, gamma, beta = torch.randn(cout, generator=g), torch.rand(cout, generator=g) + 0.5, torch.randn(cout, generator=g)
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    outs = []
    for fn in (fused, ref.conv_bn_pool2d):
        ins = [t.detach().clone().to(dtype).requires_grad_() for t in (x, w, b)]
        ins += [t.detach().clone().to(stat).requires_grad_() for t in (gamma, beta)]
        rm, rv = torch.zeros(cout, dtype=stat), torch.ones(cout, dtype=stat)
        with aefast.set_backend(backend_name):
            pooled, idx = fn(*ins, rm, rv, True, 0.1, 1e-5, 1, 1, act, pool, True, "window", pool_stride=pool_stride,
                             ceil_mode=ceil_mode)
        pooled.backward(torch.linspace(-1, 1, pooled.numel()).view_as(pooled).to(dtype))
        outs.append((pooled, idx, [t.grad for t in ins], rm, rv))
    return outs


@needs_triton
@pytest.mark.parametrize("pool, pool_stride, ceil_mode", POOL_GEOMETRIES)
@pytest.mark.parametrize("act", list(ACT_MODULES))
def test_triton_every_pool_geometry_and_activation_against_twin(pool, pool_stride, ceil_mode, act):
    """fp32: values and gradients within 1e-4, running statistics within 1e-5, window offsets bit for bit."""
    _backend.reset_fallback_counts()
    got, want = _against_twin("triton", torch.float32, act, pool, pool_stride, ceil_mode)
    assert _backend.fallback_counts() == {}
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-5)
    assert got[1].dtype == torch.uint8 and torch.equal(got[1], want[1])
    for name, a, b_ in zip(("x", "w", "b", "gamma", "beta"), got[2], want[2]):
        # the conv bias's gradient is zero up to rounding (BatchNorm removes the mean): absolute
        torch.testing.assert_close(a, b_, rtol=1e-4, atol=1e-4 if name == "b" else 1e-5, msg=name)
    for a, b_ in zip(got[3:], want[3:]):
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2), (torch.float64, 1e-10)])
@pytest.mark.parametrize("pool, pool_stride, ceil_mode", POOL_GEOMETRIES[:2])
def test_triton_dtypes_against_twin(dtype, tol, pool, pool_stride, ceil_mode):
    """fp16/bf16 run the conv in the tensor dtype and the statistics, normalisation and activation in
    fp32, rounding the activation before the pool as the twin does, so the window offsets are equal
    bit for bit on these inputs too. Tolerances, stated: pooled values within one rounding of the
    dtype (``tol``); input and weight gradients within ``4 * tol`` relative L2 norm (the twin's max-pool
    backward adds overlapping windows' gradients in the dtype); fp64 within 1e-10."""
    got, want = _against_twin("triton", dtype, "silu", pool, pool_stride, ceil_mode, seed=1)
    assert got[0].dtype == dtype and got[3].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(got[0], want[0], rtol=tol, atol=tol)
    assert torch.equal(got[1], want[1])
    for name, a, b_ in zip(("x", "w", "b", "gamma", "beta"), got[2], want[2]):
        if name == "b":  # zero up to rounding: bounded by the scale of grad_beta
            assert a.double().abs().max() <= 4 * tol * want[2][4].double().abs().max() + 1e-12
            continue
        err = ((a.double() - b_.double()).norm() / b_.double().norm()).item()
        assert err <= 4 * tol, (name, err)
    for a, b_ in zip(got[3:], want[3:]):
        torch.testing.assert_close(a, b_, rtol=tol, atol=tol)


@needs_triton
def test_triton_statistics_keep_their_digits_and_are_deterministic():
    """mean/std up to 1e5: a one-pass fp32 sum of squares loses the variance entirely (E[y^2] ~ 1e8
    in fp32 has ulp 8); the tile-wise corrected two-pass sums merged with Chan's update keep it to a
    few 1e-5 (the means' fp32 rounding is the floor). Many tiles and several chunks: the combine
    runs. Two runs give the same bits."""
    from aefast.triton import conv_bn_pool as kernels

    g = torch.Generator().manual_seed(8)
    y = (1e4 + torch.randn(20000, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 0.1, 3.0],
                                                                                   dtype=torch.float64))
    mean, var = kernels.channel_stats(y.float())
    y32 = y.float().double()
    torch.testing.assert_close(mean.double(), y32.mean(0), rtol=1e-7, atol=0)
    torch.testing.assert_close(var.double(), y32.var(0, unbiased=False), rtol=5e-5, atol=0)
    again = kernels.channel_stats(y.float())
    assert torch.equal(mean, again[0]) and torch.equal(var, again[1])


@needs_triton
def test_triton_op_outputs_and_layouts_match_the_cpu_op():
    """The same schema and outputs as the CPU op: conv_out (N, HC, WC, C) contiguous (channels-last
    memory), per-channel mean/var in fp32, and the gradients in the input's and weight's layouts."""
    x, w, b, gamma, beta = (t.detach() for t in _op_args())
    x = x.contiguous(memory_format=torch.channels_last)
    args = (x, w, b, gamma, beta, [1, 1], [1, 1], 1e-5, ACTIVATION_CODES["relu"], 0.01, [2, 3], [1, 2], True)
    got = torch.ops.aefast_triton.conv_bn_pool2d_forward(*args)
    want = torch.ops.aefast.conv_bn_pool2d_forward(*args)
    for a, b_ in zip(got, want):
        assert a.shape == b_.shape and a.dtype == b_.dtype and a.is_contiguous()
    torch.testing.assert_close(got[2], F.conv2d(x, w, b, padding=1).permute(0, 2, 3, 1))
    assert torch.equal(got[1], want[1])
    grad = torch.randn_like(got[0])
    bwd = [grad, got[1], got[2], got[3], got[4], x, w, gamma, beta, [1, 1], [1, 1], 1e-5, 1, 0.01, [2, 3],
           [True] * 5, [1, 2], True]
    grads = torch.ops.aefast_triton.conv_bn_pool2d_backward(*bwd)
    want_grads = torch.ops.aefast.conv_bn_pool2d_backward(*bwd)
    assert grads[0].is_contiguous(memory_format=torch.channels_last)
    for a, b_ in zip(grads, want_grads):
        torch.testing.assert_close(a, b_, rtol=1e-4, atol=1e-4)


@needs_triton
def test_triton_fake_strides_match_the_kernels():
    """The shared fake functions describe the Triton twins' outputs (shapes, dtypes, strides) for every
    mix of NCHW and channels_last operands and pool geometry (CrossRefFakeMode runs each
    aefast_triton op on fake tensors too), so torch.compile's stride asserts hold on this backend."""
    from torch._subclasses.fake_utils import CrossRefFakeMode

    formats = (torch.contiguous_format, torch.channels_last)
    geometries = [(8, (2, 2), None, False), (9, (2, 2), None, True), (9, (3, 3), (2, 2), False)]
    for hw, pool, pool_stride, ceil_mode in geometries:
        for fx in formats:
            for fw in formats:
                gen = torch.Generator().manual_seed(hw)
                x = torch.randn(2, 16, hw, hw, generator=gen).contiguous(memory_format=fx).requires_grad_()
                w = torch.randn(8, 16, 3, 3, generator=gen).contiguous(memory_format=fw).requires_grad_()
                checked = []

                def triton_only(func):
                    if func.namespace != "aefast_triton":
                        return True
                    checked.append(func.name())
                    return False

                with aefast.set_backend("triton"), CrossRefFakeMode(ignore_op_fn=triton_only, check_strides=True,
                                                                    only_check_ops_with_meta=False):
                    y = AF.conv_bn_pool2d(x, w, torch.randn(8, generator=gen), torch.ones(8), torch.zeros(8),
                                          torch.zeros(8), torch.ones(8), True, padding=1, pool_size=pool,
                                          pool_stride=pool_stride, ceil_mode=ceil_mode, return_indices=False)
                    y.backward(torch.randn(y.shape, generator=gen))
                assert checked == ["aefast_triton::conv_bn_pool2d_forward", "aefast_triton::conv_bn_pool2d_backward"]


# ------------------------------------------------------------------ the CUDA backend's bodies, run on the CPU

HAS_CUDA_EMULATION = hasattr(torch.ops.aefast, "emulate_cuda_conv_bn_pool2d_forward")


class _EmulatedCuda(torch.autograd.Function):
    """The CUDA backend's host code and per-element bodies (aefast/conv_bn_pool_host.h) with the
    CPU executor (torch.ops.aefast.emulate_cuda_conv_bn_pool2d_*), differentiable."""

    @staticmethod
    def forward(ctx, x, w, b, gamma, beta, args):
        pooled, window, conv_out, mean, var = torch.ops.aefast.emulate_cuda_conv_bn_pool2d_forward(
            x, w, b, gamma, beta, *args)
        ctx.save_for_backward(window, conv_out, mean, var, x, w, gamma, beta)
        ctx.args = args
        ctx.mark_non_differentiable(window, mean, var)
        return pooled, window, mean, var

    @staticmethod
    def backward(ctx, grad, *unused):
        window, conv_out, mean, var, x, w, gamma, beta = ctx.saved_tensors
        stride, padding, eps, act, slope, pool, pool_stride, ceil_mode, threads = ctx.args
        grads = torch.ops.aefast.emulate_cuda_conv_bn_pool2d_backward(
            grad.contiguous(), window, conv_out, mean, var, x, w, gamma, beta, stride, padding, eps, act, slope, pool,
            [True] * 5, pool_stride, ceil_mode, threads)
        return (*grads, None)


def _emulated_cuda(threads):
    """aefast.functional.conv_bn_pool2d's training-mode path (window indices) on the emulated CUDA op."""
    def fn(x, w, b, gamma, beta, rm, rv, training, momentum, eps, stride, padding, act, pool, return_indices,
           index_format, *, pool_stride=None, ceil_mode=False):
        s = [stride] * 2 if isinstance(stride, int) else list(stride)
        p = [padding] * 2 if isinstance(padding, int) else list(padding)
        pool_stride = [0, 0] if pool_stride is None else list(pool_stride)
        args = (s, p, eps, ACTIVATION_CODES[act], 0.01, list(pool), pool_stride, ceil_mode, threads)
        pooled, window, mean, var = _EmulatedCuda.apply(x, w, b, gamma, beta, args)
        y = F.conv2d(x.detach(), w.detach(), stride=s, padding=p)
        ref.update_running_stats(rm, rv, None, momentum, mean, var, y.numel() // y.shape[1])
        return pooled, window

    return fn


@pytest.mark.skipif(not HAS_CUDA_EMULATION, reason="extension built without the CUDA-body emulation ops")
@pytest.mark.parametrize("threads", [1, 8, 1 << 16])  # one chunk; chunks of many rows; one row per chunk
@pytest.mark.parametrize("pool, pool_stride, ceil_mode", POOL_GEOMETRIES)
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.float64, 1e-10), (torch.float16, 2e-3),
                                        (torch.bfloat16, 1e-2)])
def test_cuda_bodies_emulated_against_twin(dtype, tol, pool, pool_stride, ceil_mode, threads):
    """The CUDA op's algorithm, index math and reductions held to the twin: window offsets bit for bit,
    values and running statistics within ``tol`` (fp16/bf16: one rounding of the dtype), gradients
    within 4 * tol relative L2 norm (the conv bias's, zero up to rounding, in absolute terms)."""
    act = ["relu", "silu", "tanh", "gelu"][POOL_GEOMETRIES.index((pool, pool_stride, ceil_mode))]
    got, want = _against_twin("cpu", dtype, act, pool, pool_stride, ceil_mode, seed=2, fused=_emulated_cuda(threads))
    torch.testing.assert_close(got[0], want[0], rtol=tol, atol=tol)
    assert got[1].dtype == torch.uint8 and torch.equal(got[1], want[1])
    for name, a, b_ in zip(("x", "w", "b", "gamma", "beta"), got[2], want[2]):
        if name == "b":
            assert a.double().abs().max() <= 4 * tol * want[2][4].double().abs().max() + 1e-12
            continue
        err = ((a.double() - b_.double()).norm() / b_.double().norm()).item()
        assert err <= 4 * tol, (name, err)
    for a, b_ in zip(got[3:], want[3:]):
        torch.testing.assert_close(a, b_, rtol=tol, atol=tol)


@pytest.mark.skipif(not HAS_CUDA_EMULATION, reason="extension built without the CUDA-body emulation ops")
def test_cuda_bodies_emulated_outputs_and_layouts_match_the_cpu_op():
    """The CUDA op's outputs have the CPU op's shapes, dtypes and layouts (what the shared fake
    function says): conv_out (N, HC, WC, C) contiguous, fp32 statistics, grad_input in a channels_last
    input's layout; and the bn gradients only where asked (empty otherwise)."""
    x, w, b, gamma, beta = (t.detach() for t in _op_args())
    x = x.contiguous(memory_format=torch.channels_last)
    geo = ([1, 1], [1, 1], 1e-5, ACTIVATION_CODES["relu"], 0.01, [2, 3])
    got = torch.ops.aefast.emulate_cuda_conv_bn_pool2d_forward(x, w, b, gamma, beta, *geo, [1, 2], True, 3)
    want = torch.ops.aefast.conv_bn_pool2d_forward(x, w, b, gamma, beta, *geo, [1, 2], True)
    for a, b_ in zip(got, want):
        assert a.shape == b_.shape and a.dtype == b_.dtype and a.stride() == b_.stride()
        if a.dtype == torch.uint8:
            assert torch.equal(a, b_)
        else:
            torch.testing.assert_close(a, b_)
    grad = torch.randn_like(got[0])
    for mask in ([True] * 5, [False, True, False, True, False]):
        args = (grad, got[1], got[2], got[3], got[4], x, w, gamma, beta, *geo[:5], [2, 3], mask, [1, 2], True)
        grads = torch.ops.aefast.emulate_cuda_conv_bn_pool2d_backward(*args, 3)
        want_grads = torch.ops.aefast.conv_bn_pool2d_backward(*args)
        for a, b_ in zip(grads, want_grads):
            assert a.shape == b_.shape and a.dtype == b_.dtype and a.stride() == b_.stride()
            torch.testing.assert_close(a, b_, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not HAS_CUDA_EMULATION, reason="extension built without the CUDA-body emulation ops")
@pytest.mark.parametrize("act", list(ACT_MODULES))
def test_cuda_bodies_emulated_every_activation_fp64(act):
    """Every activation's forward and derivative in the CUDA bodies against the twin, in fp64."""
    got, want = _against_twin("cpu", torch.float64, act, (2, 2), None, False, seed=3, fused=_emulated_cuda(5))
    torch.testing.assert_close(got[0], want[0], **TOLERANCES[torch.float64])
    assert torch.equal(got[1], want[1])
    for a, b_ in zip(got[2], want[2]):
        torch.testing.assert_close(a, b_, rtol=1e-9, atol=1e-9)
    for a, b_ in zip(got[3:], want[3:]):
        torch.testing.assert_close(a, b_, **TOLERANCES[torch.float64])


# ------------------------------------------------------------------ gradcheck, opcheck

@pytest.mark.parametrize("backend_name", KERNELS_HERE)
@pytest.mark.parametrize("act", ["relu", "leaky_relu", "tanh", "gelu", "sigmoid"])
def test_gradcheck_fp64(act, backend_name):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 7, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)
    gamma = (torch.rand(4, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    beta = torch.randn(4, generator=g, dtype=torch.float64, requires_grad=True)

    def f(x, w, b, gamma, beta):  # no running statistics: no side effects between gradcheck's calls
        return AF.conv_bn_pool2d(x, w, b, gamma, beta, None, None, True, 0.1, 1e-5, 1, 1, act, 2)[0]

    with aefast.set_backend(backend_name):  # the interpreter is slow: triton checks random projections
        assert torch.autograd.gradcheck(f, (x, w, b, gamma, beta), eps=1e-6, atol=1e-6,
                                        fast_mode=backend_name == "triton")


@pytest.mark.parametrize("backend_name", KERNELS_HERE)
def test_gradcheck_fp64_with_running_statistics_updated_as_side_effect(backend_name):
    """The gradient is the same whether or not running statistics are tracked; the statistics are
    updated once per call, with the batch's mean and unbiased variance, and carry no gradient."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 2, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    running_mean, running_var = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    calls = torch.zeros((), dtype=torch.int64)

    def f(x, w):
        return AF.conv_bn_pool2d(x, w, None, None, None, running_mean, running_var, True, None, 1e-5, 1, 0, "silu",
                                 2, num_batches_tracked=calls)[0]

    with aefast.set_backend(backend_name):
        assert torch.autograd.gradcheck(f, (x, w), eps=1e-6, atol=1e-6, fast_mode=backend_name == "triton")
        n_calls = int(calls)
        assert n_calls > 1
        running_mean.zero_(), running_var.fill_(1.0), calls.zero_()
        for _ in range(2):  # momentum=None: the cumulative average of identical batches is that batch's stats
            f(x, w)
    y = F.conv2d(x.detach(), w.detach())
    torch.testing.assert_close(running_mean, y.mean((0, 2, 3)), **TOLERANCES[torch.float64])
    torch.testing.assert_close(running_var, y.var((0, 2, 3), unbiased=True), **TOLERANCES[torch.float64])
    assert not running_mean.requires_grad and int(calls) == 2


def _op_args(dtype=torch.float32):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 9, 8, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, generator=g, dtype=dtype, requires_grad=True)
    b = torch.randn(4, generator=g, dtype=dtype, requires_grad=True)
    gamma = torch.rand(4, generator=g, dtype=dtype, requires_grad=True)
    beta = torch.randn(4, generator=g, dtype=dtype, requires_grad=True)
    return x, w, b, gamma, beta


@pytest.mark.parametrize("backend_name", KERNELS_HERE)
def test_opcheck(backend_name):
    ops = _registry.namespace_for(backend_name)
    x, w, b, gamma, beta = _op_args()
    torch.library.opcheck(ops.conv_bn_pool2d_forward.default,
                          (x, w, b, gamma, beta, [1, 1], [1, 1], 1e-5, ACTIVATION_CODES["relu"], 0.01, [2, 2]))
    torch.library.opcheck(ops.conv_bn_pool2d_forward.default,
                          (x, w, None, None, None, [2, 1], [0, 1], 1e-3, ACTIVATION_CODES["gelu"], 0.01, [2, 3]))
    torch.library.opcheck(ops.conv_bn_pool2d_forward.default,
                          (x, w, b, gamma, beta, [1, 1], [1, 1], 1e-5, ACTIVATION_CODES["tanh"], 0.01, [3, 2], [2, 1],
                           True))
    pooled, window, conv_out, mean, var = ops.conv_bn_pool2d_forward(
        x.detach(), w.detach(), b.detach(), gamma.detach(), beta.detach(), [1, 1], [1, 1], 1e-5, 1, 0.01, [2, 2])
    grad = torch.randn_like(pooled)
    for mask in ([True] * 5, [False, True, False, True, False]):
        torch.library.opcheck(ops.conv_bn_pool2d_backward.default,
                              (grad, window, conv_out, mean, var, x.detach(), w.detach(), gamma.detach(),
                               beta.detach(), [1, 1], [1, 1], 1e-5, 1, 0.01, [2, 2], mask))


def test_results_do_not_depend_on_the_thread_count():
    x, w, b, gamma, beta = _op_args()
    threads = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            pooled, window, conv_out, mean, var = torch.ops.aefast.conv_bn_pool2d_forward(
                x, w, b, gamma, beta, [1, 1], [1, 1], 1e-5, 1, 0.01, [2, 2])
            grads = torch.ops.aefast.conv_bn_pool2d_backward(
                torch.ones_like(pooled), window, conv_out, mean, var, x.detach(), w.detach(), gamma.detach(),
                beta.detach(), [1, 1], [1, 1], 1e-5, 1, 0.01, [2, 2], [False, False, False, True, True])
            outs.append((pooled, window, mean, var, *grads[3:]))
    finally:
        torch.set_num_threads(threads)
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other))


# ------------------------------------------------------------------ hypothesis fuzz against the twin

@st.composite
def cases(draw, general_pool=False):
    """A fuzz case; general_pool also draws a pool stride (overlapping windows or gaps) and ceil_mode."""
    n = draw(st.integers(1, 3))
    cin, cout = draw(st.integers(1, 4)), draw(st.integers(1, 5))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    sh, sw = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    ph, pw = draw(st.integers(0, 1)), draw(st.integers(0, 1))
    pool = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    pool_stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3))) if general_pool else None
    ceil_mode = draw(st.booleans()) if general_pool else False
    h, w = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    hc, wc = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    assume(h + 2 * ph >= kh and w + 2 * pw >= kw and hc >= pool[0] and wc >= pool[1] and n * hc * wc > 1)
    return dict(n=n, cin=cin, cout=cout, h=h, w=w, k=(kh, kw), stride=(sh, sw), padding=(ph, pw), pool=pool,
                pool_stride=pool_stride, ceil_mode=ceil_mode,
                act=draw(st.sampled_from(list(ACT_MODULES))), momentum=draw(st.sampled_from([0.1, 0.5, None])),
                dtype=draw(st.sampled_from([torch.float32, torch.float64])), bias=draw(st.booleans()),
                affine=draw(st.booleans()), index_format=draw(st.sampled_from(["flat", "window"])),
                seed=draw(st.integers(0, 2**16)))


def _fp64_leaves(x, w, b, gamma, beta, c, stats):
    """The fuzz step's backward through the reference twin in fp64 from the same inputs: its leaves."""
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (x, w, b, gamma, beta)]
    run_stats = [s.clone().double() if s.is_floating_point() else s.clone() for s in stats]
    pooled, _ = ref.conv_bn_pool2d(*leaves, run_stats[0], run_stats[1], True, c["momentum"], 1e-5, c["stride"],
                                   c["padding"], c["act"], c["pool"], True, c["index_format"], run_stats[2],
                                   pool_stride=c["pool_stride"], ceil_mode=c["ceil_mode"])
    pooled.backward(torch.linspace(-1, 1, pooled.numel(), dtype=torch.float64).view_as(pooled))
    return [t for t in leaves if t is not None]


def _fuzz_step(c, backend_name):
    g = torch.Generator().manual_seed(c["seed"])
    dt = c["dtype"]
    x = torch.randn(c["n"], c["cin"], c["h"], c["w"], generator=g, dtype=dt)
    w = torch.randn(c["cout"], c["cin"], *c["k"], generator=g, dtype=dt) / math.sqrt(c["cin"] * c["k"][0] * c["k"][1])
    b = torch.randn(c["cout"], generator=g, dtype=dt) if c["bias"] else None
    gamma = torch.rand(c["cout"], generator=g, dtype=dt) + 0.5 if c["affine"] else None
    beta = torch.randn(c["cout"], generator=g, dtype=dt) if c["affine"] else None
    stats = (torch.randn(c["cout"], generator=g, dtype=dt), torch.rand(c["cout"], generator=g, dtype=dt) + 0.5,
             torch.tensor(4))
    leaves = [t.requires_grad_() for t in (x, w, b, gamma, beta) if t is not None]

    def run(fn):
        run_stats = [s.clone() for s in stats]
        ins = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b, gamma, beta)]
        pooled, idx = fn(*ins, run_stats[0], run_stats[1], True, c["momentum"], 1e-5, c["stride"], c["padding"],
                         c["act"], c["pool"], True, c["index_format"], run_stats[2], pool_stride=c["pool_stride"],
                         ceil_mode=c["ceil_mode"])
        pooled.backward(torch.linspace(-1, 1, pooled.numel(), dtype=dt).view_as(pooled))
        return pooled, idx, [t.grad for t in ins if t is not None], run_stats

    with aefast.set_backend(backend_name):
        got = run(AF.conv_bn_pool2d)
    want = run(ref.conv_bn_pool2d)
    tol = TOLERANCES[dt] if dt == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[0], want[0], **tol)
    assert torch.equal(got[1], want[1])
    if dt == torch.float32:
        # The conv-parameter gradients of a channel whose output varies little against its mean
        # (e.g. weight 0.01, bias 1.5: mean/std ~100) are ill-conditioned: any fp32 evaluation
        # order, eager's included, lands ~1e-2 off the exact value (seen: exact -3.0997, the twin
        # -3.0844, eager's native BatchNorm and aefast -3.1093). So fp32 gradients are held to the
        # exact (fp64 from the same fp32 inputs) value, allowed twice the twin's own fp32 error plus
        # the rounding floor of sums over M conv positions of dL/dy ~ |grad| * gamma * invstd (a few
        # fp32 ulps of each term; grad_pooled is in [-1, 1]).
        exact = [t.grad for t in _fp64_leaves(x, w, b, gamma, beta, c, stats)]
        y64 = torch.nn.functional.conv2d(x.detach().double(), w.detach().double(), stride=c["stride"],
                                         padding=c["padding"])
        m = y64.numel() // y64.shape[1]
        gain = (y64.var(dim=(0, 2, 3), unbiased=False) + 1e-5).rsqrt()
        if gamma is not None:
            gain = gain * gamma.detach().double()
        floor = 2e-7 * m * gain.max().item() * max(1.0, x.detach().abs().max().item())
        for a, b_, e in zip(got[2], want[2], exact):
            slack = 2 * (b_.double() - e).abs() + tol["atol"] + tol["rtol"] * e.abs() + floor
            assert bool(((a.double() - e).abs() <= slack).all()), (a, b_, e)
    else:
        for a, b_ in zip(got[2], want[2]):
            torch.testing.assert_close(a, b_, **tol)
    for a, b_ in zip(got[3], want[3]):
        torch.testing.assert_close(a, b_, **tol)
    assert len(leaves) == len(got[2])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(cases())
def test_fuzz_cpu_against_twin(case):
    _fuzz_step(case, "cpu")


@needs_triton
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(cases(general_pool=True))
def test_fuzz_triton_against_twin_without_fallback(case):
    """The Triton kernels serve every case (any pool stride, ceil_mode): nothing is counted."""
    _backend.reset_fallback_counts()
    _fuzz_step(case, "triton")
    assert _backend.fallback_counts() == {}


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(cases(general_pool=True))
def test_fuzz_reference(case):
    _fuzz_step(case, "reference")


# ------------------------------------------------------------------ bad inputs

def test_bad_inputs():
    x, w, b, gamma, beta = (t.detach() for t in _op_args())
    rm, rv = torch.zeros(4), torch.ones(4)

    def call(*args, **kwargs):
        base = dict(input=x, weight=w, bias=b, bn_weight=gamma, bn_bias=beta, running_mean=rm, running_var=rv)
        base.update(kwargs)
        return AF.conv_bn_pool2d(**base)

    with pytest.raises(ValueError, match=r"bn_weight must have shape \(4,\)"):
        call(bn_weight=torch.ones(3))
    with pytest.raises(ValueError, match=r"running_var must have shape \(4,\)"):
        call(running_var=torch.ones(5))
    with pytest.raises(ValueError, match="both running_mean and running_var"):
        call(running_var=None)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        call(input=torch.randn(1, 3, 3, 3), pool_size=1)
    with pytest.raises(TypeError, match="momentum must be a number or None"):
        call(momentum="0.1")
    with pytest.raises(ValueError, match="eps must be a non-negative number"):
        call(eps=-1.0)
    with pytest.raises(TypeError, match="num_batches_tracked must have dtype int64"):
        call(num_batches_tracked=torch.tensor(0.0))
    with pytest.raises(ValueError, match="running_mean is on meta"):
        call(running_mean=torch.zeros(4, device="meta"))
    with pytest.raises(ValueError, match="channels"):
        call(weight=torch.randn(4, 2, 3, 3))
    with pytest.raises(ValueError, match="pool_size"):
        call(pool_size=10)
    with pytest.raises(ValueError, match="unknown activation"):
        call(activation="swish")
    with pytest.raises(TypeError, match="dtype"):
        call(bn_weight=torch.ones(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="padding must be an int or a pair"):
        aefast.nn.ConvBNPool2d(3, 4, 3, padding="same")


def test_encoder_block_bench_quick_run():
    """bench/bench_encoder_blocks.py (the per-block A/B of the fused encoder blocks on the shapes the
    real architectures run) does not rot: a --quick run finds SegNet's conv_bn_pool2d sites and
    FCN-8s's ceil_mode conv_pool2d sites and prints a ratio row for each (speed is not asserted)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "bench" / "bench_encoder_blocks.py"), "--quick"],
                          capture_output=True, text=True, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("conv_bn_pool ", "conv_pool "))]
    assert any("segnet" in r and r.startswith("conv_bn_pool") for r in rows)
    assert any("fcn8s" in r and "ceil" in r for r in rows)
    assert all(len(r.split()) >= 10 for r in rows)
