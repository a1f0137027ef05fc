"""batch_norm_act2d: BatchNorm2d -> activation against PyTorch's modules.

The spec is ``nn.Sequential(nn.BatchNorm2d, act)`` in training mode (batch statistics, running
statistics and num_batches_tracked updated) and in eval mode: values, every gradient and the running
statistics within the per-dtype tolerance. The reference twin (aefast.reference.functional
.batch_norm_act2d) is held to the same spec, and the fuzz holds every backend to the twin.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import aefast
import aefast.functional as AF
from aefast import backend as _backend
from aefast.nn import batch_norm_act as bna_module
from aefast.ops.conv_pool import ACTIVATION_CODES
from aefast.reference import functional as ref
from conftest import CPU_ISAS, TOLERANCES, TRITON_INTERPRETED, backend_device

ACT_MODULES = {None: nn.Identity, "relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.2), "sigmoid": nn.Sigmoid,
               "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU}
BACKENDS_HERE = ["cpu", "reference"] + (["triton"] if _backend.availability()["triton"][0] else [])
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


@pytest.fixture(autouse=True)
def _always_fused(monkeypatch):
    """The tests' tensors are small: hold the fused kernels (not the eager path that
    batch_norm_act_with takes below EAGER_BELOW_NUMEL) to the spec."""
    monkeypatch.setattr(bna_module, "EAGER_BELOW_NUMEL", 0)


def make_pair(channels, act="relu", momentum=0.1, affine=True, track_running_stats=True, dtype=torch.float32, seed=0):
    """(torch spec, aefast BatchNormAct2d) with the same, randomised, parameters and buffers."""
    torch.manual_seed(seed)
    spec = nn.Sequential(nn.BatchNorm2d(channels, momentum=momentum, affine=affine,
                                        track_running_stats=track_running_stats), ACT_MODULES[act]()).to(dtype)
    with torch.no_grad():
        bn = spec[0]
        if track_running_stats:
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
        if affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
    fused = aefast.nn.BatchNormAct2d(channels, act, momentum=momentum, affine=affine,
                                     track_running_stats=track_running_stats, dtype=dtype,
                                     negative_slope=0.2)
    fused.load_state_dict({k.replace("0.", "", 1): v for k, v in spec.state_dict().items()})
    return spec, fused


def run_step(model, x):
    x = x.detach().clone().requires_grad_()
    out = model(x)
    # drawn in fp32 (fp64 for fp64 runs), then rounded: the spec and fused runs of another dtype get the same
    # gradient (torch 2.11 draws a different fp16 sequence from the same seed than its fp32 one)
    draw = torch.float64 if out.dtype == torch.float64 else torch.float32
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(0), dtype=draw).to(out.dtype).to(out.device)
    (out * grad).sum().backward()
    grads = {"x": x.grad}
    grads.update({name.replace("0.", "", 1): p.grad for name, p in model.named_parameters()})
    return out, grads


def assert_same_step(spec, fused, x, *, tol):
    want, want_grads = run_step(spec, x)
    got, got_grads = run_step(fused, x)
    torch.testing.assert_close(got, want, **tol)
    assert got.is_contiguous(memory_format=torch.channels_last) == want.is_contiguous(memory_format=torch.channels_last)
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, **tol, msg=name)
    buffers = dict(fused.named_buffers())
    for name, b in spec.named_buffers():  # running statistics and num_batches_tracked
        torch.testing.assert_close(buffers[name.replace("0.", "", 1)], b, **tol, msg=name)
    spec.zero_grad(), fused.zero_grad()


@pytest.mark.parametrize("backend_name", BACKENDS_HERE)
@pytest.mark.parametrize("act", list(ACT_MODULES))
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_matches_torch_modules_in_train_then_eval(backend_name, act, momentum, layout):
    dtype = torch.float64
    spec, fused = make_pair(5, act=act, momentum=momentum, dtype=dtype)
    x = (torch.randn(3, 5, 9, 7, dtype=dtype) * 2 + 0.5).contiguous(memory_format=LAYOUTS[layout])
    with aefast.set_backend(backend_name):
        for step in range(3):  # running statistics accumulate; momentum=None averages over the steps
            assert_same_step(spec, fused, x + step, tol=TOLERANCES[dtype])
        assert fused.num_batches_tracked.item() == 3
        spec.eval(), fused.eval()
        assert_same_step(spec, fused, x, tol=TOLERANCES[dtype])
        assert fused.num_batches_tracked.item() == 3


@pytest.mark.parametrize("shape", [(1, 17, 1, 2), (2, 1, 3, 3), (1, 3, 5, 1), (7, 3, 1, 1), (1, 2, 33, 31),
                                   (2, 16, 24, 23), (2, 8, 1, 5), (3, 5, 7, 3), (5, 3, 13, 11)])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_odd_shapes(shape, layout):
    """Batch 1, 1 channel, 1x1 planes (channels-last and NCHW coincide), rows past one work unit, and
    channels-last rows that end in a partial wide row (C = 8: 8 rows a wide row, 10 rows; C = 5: 16,
    63; C = 3: 32, 715 over three units)."""
    spec, fused = make_pair(shape[1], act="leaky_relu", dtype=torch.float64)
    x = torch.randn(shape, dtype=torch.float64).contiguous(memory_format=LAYOUTS[layout])
    assert_same_step(spec, fused, x, tol=TOLERANCES[torch.float64])


def test_float32_and_non_contiguous_input():
    spec, fused = make_pair(6, act="relu")
    x = torch.randn(4, 6, 20, 18)[:, :, 1:-1, ::2]  # neither layout: runs on its NCHW copy
    assert_same_step(spec, fused, x, tol=dict(rtol=1e-4, atol=1e-5))
    assert_same_step(spec, fused, x.contiguous(memory_format=torch.channels_last), tol=dict(rtol=1e-4, atol=1e-5))


def test_no_affine_and_no_running_stats():
    spec, fused = make_pair(4, affine=False, dtype=torch.float64)
    assert_same_step(spec, fused, torch.randn(2, 4, 6, 6, dtype=torch.float64), tol=TOLERANCES[torch.float64])
    spec, fused = make_pair(4, track_running_stats=False, dtype=torch.float64)
    spec.eval(), fused.eval()  # no running statistics: batch statistics in eval mode too
    assert_same_step(spec, fused, torch.randn(2, 4, 6, 5, dtype=torch.float64), tol=TOLERANCES[torch.float64])


@pytest.mark.parametrize("dtype, rel", [(torch.float16, 1e-2), (torch.bfloat16, 4e-2)])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_low_precision_against_fp32(dtype, rel, layout):
    """fp16/bf16: statistics, normalisation and activation in fp32, the output rounded once to the
    input dtype. Tolerance, stated: outputs and running statistics within ``rel`` (relative to the
    largest value) of the fp32 spec on the same rounded input; gradients within ``rel`` in relative
    L2 norm."""
    spec, fused = make_pair(8, act="silu")
    fused = fused.to(dtype)
    x = torch.randn(4, 8, 11, 10).to(dtype).contiguous(memory_format=LAYOUTS[layout])
    want, want_grads = run_step(spec, x.float())
    got, got_grads = run_step(fused, x)
    assert got.dtype == dtype
    scale = want.abs().max().item()
    torch.testing.assert_close(got.float(), want.detach(), rtol=0, atol=rel * scale)
    for name, g in want_grads.items():
        err = (got_grads[name].float() - g).norm() / g.norm()
        assert err < rel, (name, err)
    torch.testing.assert_close(fused.running_mean.float(), spec[0].running_mean, rtol=rel, atol=rel)
    torch.testing.assert_close(fused.running_var.float(), spec[0].running_var, rtol=rel, atol=rel)


def test_large_mean_has_no_cancellation():
    """Values ~1e4 with unit spread: the shifted one-pass moments keep the variance exact to fp32."""
    x = torch.randn(4, 3, 16, 16) + 1e4
    out, mean, var = torch.ops.aefast.batch_norm_act2d_forward(x, None, None, 1e-5, 0, 0.01)
    torch.testing.assert_close(var, x.double().var(dim=(0, 2, 3), unbiased=False).float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mean, x.double().mean(dim=(0, 2, 3)).float(), rtol=1e-7, atol=1e-3)


# ------------------------------------------------------------------ gradcheck, opcheck

ACTS_GRADCHECK = ["relu", "leaky_relu", "tanh", "gelu", "sigmoid", "silu"]


@pytest.mark.parametrize("act", ACTS_GRADCHECK)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gradcheck_fp64(act, layout):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64).contiguous(memory_format=LAYOUTS[layout])
    x.requires_grad_()
    gamma = (torch.rand(3, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
    beta = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)

    def f(x, gamma, beta):  # no running statistics: no side effects between gradcheck's calls
        return AF.batch_norm_act2d(x, gamma, beta, None, None, True, 0.1, 1e-5, act)

    # cpu, and triton where it runs; the Triton interpreter (a gradcheck is ~250 launches, seconds each
    # case) checks each activation in one layout, the layouts alternating (both layouts, every activation
    # is compared with torch, gradients included, in test_matches_torch_modules_in_train_then_eval)
    triton_in_other_layout = TRITON_INTERPRETED and (list(LAYOUTS).index(layout) + ACTS_GRADCHECK.index(act)) % 2
    for backend_name in BACKENDS_HERE[:1] + ([] if triton_in_other_layout else BACKENDS_HERE[2:]):
        with aefast.set_backend(backend_name):
            assert torch.autograd.gradcheck(f, (x, gamma, beta), eps=1e-6, atol=1e-6)


def test_gradcheck_fp64_with_running_statistics_updated_as_side_effect():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 2, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    running_mean, running_var = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    calls = torch.zeros((), dtype=torch.int64)

    def f(x):
        return AF.batch_norm_act2d(x, None, None, running_mean, running_var, True, None, 1e-5, "silu",
                                   num_batches_tracked=calls)

    with aefast.set_backend("cpu"):
        assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6)
        assert int(calls) > 1
        running_mean.zero_(), running_var.fill_(1.0), calls.zero_()
        for _ in range(2):  # momentum=None: the cumulative average of identical batches is that batch's stats
            f(x)
    torch.testing.assert_close(running_mean, x.detach().mean((0, 2, 3)), **TOLERANCES[torch.float64])
    torch.testing.assert_close(running_var, x.detach().var((0, 2, 3), unbiased=True), **TOLERANCES[torch.float64])
    assert not running_mean.requires_grad and int(calls) == 2


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_opcheck(layout):
    ops = torch.ops.aefast
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, 9, 8, generator=g).contiguous(memory_format=LAYOUTS[layout]).requires_grad_()
    gamma = torch.rand(4, generator=g, requires_grad=True)
    beta = torch.randn(4, generator=g, requires_grad=True)
    torch.library.opcheck(ops.batch_norm_act2d_forward.default, (x, gamma, beta, 1e-5, ACTIVATION_CODES["relu"], 0.01))
    torch.library.opcheck(ops.batch_norm_act2d_forward.default, (x, None, None, 1e-3, ACTIVATION_CODES["gelu"], 0.01))
    out, mean, var = ops.batch_norm_act2d_forward(x.detach(), gamma.detach(), beta.detach(), 1e-5, 2, 0.2)
    grad = torch.randn_like(out)
    for mask in ([True] * 3, [False, True, False], [True, False, True]):
        torch.library.opcheck(ops.batch_norm_act2d_backward.default,
                              (grad, x.detach(), mean, var, gamma.detach(), beta.detach(), 1e-5, 2, 0.2, mask))


def test_results_do_not_depend_on_the_thread_count():
    g = torch.Generator().manual_seed(8)
    threads = torch.get_num_threads()
    for layout in LAYOUTS.values():
        x = torch.randn(3, 16, 40, 37, generator=g).contiguous(memory_format=layout)
        grad = torch.randn(x.shape, generator=g).contiguous(memory_format=layout)
        gamma, beta = torch.rand(16, generator=g), torch.randn(16, generator=g)
        results = []
        try:
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                out, mean, var = torch.ops.aefast.batch_norm_act2d_forward(x, gamma, beta, 1e-5, 1, 0.01)
                grads = torch.ops.aefast.batch_norm_act2d_backward(grad, x, mean, var, gamma, beta, 1e-5, 1, 0.01,
                                                                   [True, True, True])
                results.append((out, mean, var, *grads))
        finally:
            torch.set_num_threads(threads)
        for other in results[1:]:
            assert all(torch.equal(a, b) for a, b in zip(results[0], other))


# ------------------------------------------------------------------ fuzz against the twin

@st.composite
def cases(draw):
    return dict(n=draw(st.integers(1, 3)), c=draw(st.integers(1, 20)), h=draw(st.integers(1, 9)),
                w=draw(st.integers(1, 9)), act=draw(st.sampled_from(list(ACT_MODULES))),
                slope=draw(st.sampled_from([0.01, 0.2])), affine=draw(st.booleans()),
                momentum=draw(st.sampled_from([0.1, 0.5, None])), layout=draw(st.sampled_from(list(LAYOUTS))),
                dtype=draw(st.sampled_from([torch.float32, torch.float64])), seed=draw(st.integers(0, 2**16)))


def _fuzz_step(c, backend_name):
    if c["n"] * c["h"] * c["w"] <= 1:
        c = dict(c, h=2)
    g = torch.Generator().manual_seed(c["seed"])
    dt = c["dtype"]
    x = (torch.randn(c["n"], c["c"], c["h"], c["w"], generator=g, dtype=dt) * 3 + 1).contiguous(
        memory_format=LAYOUTS[c["layout"]])
    gamma = torch.rand(c["c"], generator=g, dtype=dt) + 0.5 if c["affine"] else None
    beta = torch.randn(c["c"], generator=g, dtype=dt) if c["affine"] else None
    stats = (torch.randn(c["c"], generator=g, dtype=dt), torch.rand(c["c"], generator=g, dtype=dt) + 0.5,
             torch.tensor(4))

    def run(fn):
        run_stats = [s.clone() for s in stats]
        ins = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, gamma, beta)]
        out = fn(ins[0], ins[1], ins[2], run_stats[0], run_stats[1], True, c["momentum"], 1e-5, c["act"],
                 run_stats[2], negative_slope=c["slope"])
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=dt).view_as(out))
        return out, [t.grad for t in ins if t is not None], run_stats

    with aefast.set_backend(backend_name):
        got = run(AF.batch_norm_act2d)
    want = run(ref.batch_norm_act2d)
    tol = TOLERANCES[dt] if dt == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[0], want[0], **tol)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, **tol)
    for a, b in zip(got[2], want[2]):
        torch.testing.assert_close(a, b, **tol)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_fuzz_cpu_against_twin(case):
    _fuzz_step(case, "cpu")


@pytest.mark.skipif(not _backend.availability()["triton"][0], reason="triton unavailable here")
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases())
def test_fuzz_triton_against_twin(case):
    _backend.reset_fallback_counts()
    _fuzz_step(case, "triton")
    assert _backend.fallback_counts() == {}


# ------------------------------------------------------------------ bad inputs

def test_bad_inputs():
    x = torch.randn(2, 4, 5, 5)
    rm, rv = torch.zeros(4), torch.ones(4)

    def call(**kwargs):
        base = dict(input=x, bn_weight=torch.ones(4), bn_bias=torch.zeros(4), running_mean=rm, running_var=rv)
        base.update(kwargs)
        return AF.batch_norm_act2d(**base)

    with pytest.raises(ValueError, match=r"bn_weight must have shape \(4,\)"):
        call(bn_weight=torch.ones(3))
    with pytest.raises(ValueError, match=r"running_var must have shape \(4,\)"):
        call(running_var=torch.ones(5))
    with pytest.raises(ValueError, match="both running_mean and running_var"):
        call(running_var=None)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        call(input=torch.randn(1, 4, 1, 1))
    with pytest.raises(TypeError, match="momentum must be a number or None"):
        call(momentum="0.1")
    with pytest.raises(ValueError, match="eps must be a non-negative number"):
        call(eps=-1.0)
    with pytest.raises(ValueError, match="unknown activation"):
        call(activation="swish")
    with pytest.raises(ValueError, match="4-D|dims|dimensions"):
        call(input=torch.randn(2, 4, 5))
    with pytest.raises(TypeError, match="dtype"):
        call(input=torch.ones(2, 4, 3, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="running_mean is on meta"):
        call(running_mean=torch.zeros(4, device="meta"))
    with pytest.raises(RuntimeError, match="weight must have shape"):  # a direct op call is checked in C++
        torch.ops.aefast.batch_norm_act2d_forward(x, torch.ones(3), None, 1e-5, 1, 0.01)
    with pytest.raises(RuntimeError, match="unknown activation code"):
        torch.ops.aefast.batch_norm_act2d_forward(x, None, None, 1e-5, 9, 0.01)


def test_torch_compile_fullgraph_of_the_module():
    spec, fused = make_pair(4, act="relu")
    x = torch.randn(2, 4, 6, 6)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    want, want_grads = run_step(spec, x)
    got, got_grads = run_step(compiled, x)
    got_grads.update(weight=fused.weight.grad, bias=fused.bias.grad)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused.running_mean, spec[0].running_mean, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ the CUDA backend's bodies, run on the CPU

@pytest.mark.parametrize("act", list(ACT_MODULES))
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("shape", [(3, 5, 9, 7), (1, 17, 1, 2), (2, 3, 23, 19), (600, 2, 1, 1)])
def test_cuda_bodies_emulated_against_twin(act, layout, shape):
    """aefast/batch_norm_act_host.h's bodies (the CUDA kernels) over their index spaces on the CPU:
    groups of runs of rows (channels-last) or of planes (NCHW), more than one group per channel in
    the larger shapes, partials added by a fixed-shape sum."""
    ops = torch.ops.aefast
    g = torch.Generator().manual_seed(9)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 3).contiguous(memory_format=LAYOUTS[layout])
    gamma = torch.rand(shape[1], generator=g, dtype=torch.float64) + 0.5
    beta = torch.randn(shape[1], generator=g, dtype=torch.float64)
    code = ACTIVATION_CODES[act]
    out, mean, var = ops.emulate_cuda_batch_norm_act2d_forward(x, gamma, beta, 1e-5, code, 0.2)
    want = ref.batch_norm_act2d(x, gamma, beta, None, None, True, 0.1, 1e-5, act, negative_slope=0.2)
    torch.testing.assert_close(out, want, **TOLERANCES[torch.float64])
    assert out.stride() == want.contiguous(memory_format=LAYOUTS[layout]).stride()
    torch.testing.assert_close(mean, x.mean((0, 2, 3)), **TOLERANCES[torch.float64])
    torch.testing.assert_close(var, x.var((0, 2, 3), unbiased=False), **TOLERANCES[torch.float64])
    grad = torch.randn(shape, generator=g, dtype=torch.float64)
    leaves = [t.detach().clone().requires_grad_() for t in (x, gamma, beta)]
    ref.batch_norm_act2d(*leaves, None, None, True, 0.1, 1e-5, act, negative_slope=0.2).backward(grad)
    got = ops.emulate_cuda_batch_norm_act2d_backward(grad, x, mean, var, gamma, beta, 1e-5, code, 0.2, [True] * 3)
    for a, leaf in zip(got, leaves):
        torch.testing.assert_close(a, leaf.grad, **TOLERANCES[torch.float64])
    # and in float32, against the CPU backend's kernels
    xf, gf, bf = x.float(), gamma.float(), beta.float()
    cpu = ops.batch_norm_act2d_forward(xf, gf, bf, 1e-5, code, 0.2)
    emu = ops.emulate_cuda_batch_norm_act2d_forward(xf, gf, bf, 1e-5, code, 0.2)
    for a, b in zip(emu, cpu):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_kernel_backend_on_its_device_matches_the_modules(kernel_backend, layout, dtype):
    """On a GPU this runs the cuda and triton kernels on CUDA tensors (TF32 is irrelevant: no matmul)."""
    device = backend_device(kernel_backend)
    spec, fused = make_pair(6, act="leaky_relu", dtype=dtype)
    spec, fused = spec.to(device), fused.to(device)
    x = (torch.randn(4, 6, 13, 11, dtype=dtype) * 2 + 1).to(device).contiguous(memory_format=LAYOUTS[layout])
    tol = TOLERANCES[dtype] if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    _backend.reset_fallback_counts()
    assert_same_step(spec, fused, x, tol=tol)
    assert _backend.fallback_counts() == {}


def test_small_tensors_take_eager_batch_norm_with_the_same_results(monkeypatch):
    """Below EAGER_BELOW_NUMEL values batch_norm_act_with runs nn.BatchNorm2d's forward and the
    activation (no aefast op is called); above it, the fused op. Both match the spec."""
    spec, fused = make_pair(4, act="leaky_relu")
    x = torch.randn(2, 4, 6, 6)
    for threshold, fused_op_called in ((x.numel() + 1, False), (x.numel(), True)):
        monkeypatch.setattr(bna_module, "EAGER_BELOW_NUMEL", threshold)
        with torch.profiler.profile() as prof:
            assert_same_step(spec, fused, x, tol=dict(rtol=1e-5, atol=1e-6))
        called = any("batch_norm_act2d" in e.key for e in prof.key_averages())
        assert called == fused_op_called


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("channels", [1, 8, 16, 17, 70])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_instruction_set_matches_the_modules(monkeypatch, isa, channels, layout):
    """The kernels of csrc/cpu/batch_norm_act_kernels.inc as each SIMD variant compiles them: wide
    channels-last rows (R = 64, 8, 4, 4, 1 rows for these channel counts) with a partial last one,
    and NCHW planes with a vector tail."""
    monkeypatch.setenv("AEFAST_CPU_ISA", isa)
    spec, fused = make_pair(channels, act="relu")
    x = torch.randn(3, channels, 7, 5).contiguous(memory_format=LAYOUTS[layout])
    with aefast.set_backend("cpu"):
        assert_same_step(spec, fused, x, tol=dict(rtol=1e-4, atol=1e-5))


def test_eager_calls_take_the_cpp_autograd_node_with_the_registered_formula_results():
    """Plain tensors in eager mode go through aefast._C.batch_norm_act2d_autograd (a C++ backward node);
    its results equal the registered torch.library formula's exactly; no node without a gradient;
    double backward is refused."""
    spec, fused = make_pair(5, act="silu", dtype=torch.float64)
    x = torch.randn(2, 5, 7, 6, dtype=torch.float64, requires_grad=True)
    out = fused(x)
    assert out.grad_fn.name() == "aefast::BatchNormAct2DBackward"
    grads = torch.autograd.grad(out.sum(), (x, fused.weight, fused.bias))
    xs = x.detach().clone().requires_grad_()
    w, b = fused.weight.detach().clone().requires_grad_(), fused.bias.detach().clone().requires_grad_()
    formula, _, _ = torch.ops.aefast.batch_norm_act2d_forward(xs, w, b, 1e-5, ACTIVATION_CODES["silu"], 0.2)
    assert "AutogradFunction" not in formula.grad_fn.name() and formula.grad_fn.name() != out.grad_fn.name()
    for a, b_ in zip(grads, torch.autograd.grad(formula.sum(), (xs, w, b))):
        assert torch.equal(a, b_)
    with torch.no_grad():
        assert fused(x).grad_fn is None
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(fused(x).square().sum(), x, create_graph=True)


@pytest.mark.skipif(not _backend.availability()["triton"][0], reason="triton unavailable here")
@pytest.mark.parametrize("act", list(ACT_MODULES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_triton_every_activation_and_dtype(act, dtype):
    """Every (activation, dtype) specialization of the Triton kernels launches here, so the CI's AOT
    gate compiles each of them for sm_80/sm_90 whatever the fuzz draws; values against the twin."""
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(2, 40, 3, 5, generator=g) * 2 + 1).to(dtype).requires_grad_()
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    gamma = (torch.rand(40, generator=g) + 0.5).to(stat).requires_grad_()
    beta = torch.randn(40, generator=g).to(stat).requires_grad_()
    with aefast.set_backend("triton"):
        out = AF.batch_norm_act2d(x, gamma, beta, None, None, True, 0.1, 1e-5, act, negative_slope=0.2)
    grads = torch.autograd.grad(out.float().sum(), (x, gamma, beta))
    leaves = [t.detach().clone().requires_grad_() for t in (x, gamma, beta)]
    want = ref.batch_norm_act2d(*leaves, None, None, True, 0.1, 1e-5, act, negative_slope=0.2)
    want_grads = torch.autograd.grad(want.float().sum(), leaves)
    tol = TOLERANCES[dtype] if dtype != torch.float32 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out, want, **tol)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b.to(a.dtype), **tol)
