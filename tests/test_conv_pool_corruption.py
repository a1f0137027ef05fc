"""conv_pool2d(corruption=...): the denoising corruption generated inside the encoder's input
load. The spec is corrupt-then-conv_pool2d with the same seed: equal outputs and indices, and
equal gradients w.r.t. the clean input (d corrupt / d x is 1 for gaussian and the keep mask for
masking / salt_pepper) and the parameters, on every backend and dtype; gradcheck, opcheck; and
no input-sized buffer: the corrupted input is never materialised (checked per allocation with
the profiler's memory events, which record every c10 CPU allocation, kernel-internal ones too).
"""
import json
import math
import os
import tempfile

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import aefast
import aefast.functional as AF
from aefast.nn import ConvPool2d
from conftest import TOLERANCES, backend_device

KINDS = [("gaussian", 0.3), ("masking", 0.4), ("salt_pepper", 0.3)]


def make(n, cin, cout, h, w, k, dtype, device, seed=0, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=g).to(dtype).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    wt = (torch.randn(cout, cin, k, k, generator=g) / math.sqrt(cin * k * k)).to(dtype).to(device)
    b = torch.randn(cout, generator=g).to(dtype).to(device)
    return x.requires_grad_(), wt.requires_grad_(), b.requires_grad_()


def fused_and_unfused(x, w, b, kind, level, act="relu", padding=1, seed=123, low=0.0, high=1.0, fmt="flat"):
    """(outputs, gradients) of the fused op and of corrupt-then-conv_pool2d, same generator state."""
    results = []
    for fused in (True, False):
        xs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, w, b))
        gen = torch.Generator(device=x.device).manual_seed(seed)
        if fused:
            y, idx = AF.conv_pool2d(xs, ws, bs, 1, padding, act, 2, index_format=fmt,
                                    corruption=(kind, level, low, high), generator=gen)
        else:
            y, idx = AF.conv_pool2d(AF.corrupt(xs, kind, level, gen, low=low, high=high), ws, bs, 1, padding, act, 2,
                                    index_format=fmt)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y.dtype).to(y.device)
        grads = torch.autograd.grad(y, (xs, ws, bs), g)
        results.append((y, idx, grads))
    return results


def assert_same(fused, unfused, dtype):
    (y1, i1, g1), (y2, i2, g2) = fused, unfused
    assert torch.equal(i1, i2)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(y1, y2, **tol)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, **tol)


# ------------------------------------------------------------------ equality with the definition

@pytest.mark.parametrize("kind,level", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_equals_corrupt_then_conv_pool2d(backend, kind, level, dtype):
    """Every backend and dtype; the reference backend takes the definition literally."""
    device = backend_device(backend)
    small = backend == "triton" and device == "cpu"  # the interpreter is slow
    x, w, b = make(2 if small else 3, 3, 4 if small else 6, 8 if small else 11, 8 if small else 10, 3, dtype, device)
    fused, unfused = fused_and_unfused(x, w, b, kind, level)
    assert_same(fused, unfused, dtype)
    # The noise is there: without it the output differs.
    clean, _ = AF.conv_pool2d(x.detach(), w.detach(), b.detach(), 1, 1, "relu", 2)
    assert not torch.equal(clean, fused[0])


@pytest.mark.parametrize("kind,level", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cpu_onednn_path_in_batch_chunks(kind, level, dtype, channels_last):
    """K = Cin*KH*KW >= 64 takes oneDNN's conv on corrupted batch chunks (N >= 4: chunks of at
    most N/4 images, here several chunks with a short last one); channels-last input too."""
    x, w, b = make(9, 8, 16, 12, 10, 3, dtype, "cpu", channels_last=channels_last)
    with aefast.set_backend("cpu"):
        fused, unfused = fused_and_unfused(x, w, b, kind, level, act="tanh")
    assert_same(fused, unfused, dtype)


@pytest.mark.parametrize("n", [1, 3])
def test_cpu_small_batch_with_long_reduction_uses_the_direct_path(n):
    """K >= 64 but N < 4: no chunk smaller than the input exists, so the direct path serves it."""
    x, w, b = make(n, 8, 8, 9, 9, 3, torch.float32, "cpu")
    with aefast.set_backend("cpu"):
        fused, unfused = fused_and_unfused(x, w, b, "masking", 0.5)
    assert_same(fused, unfused, torch.float32)


@pytest.mark.parametrize("channels_last", [False, True])
def test_cpu_channels_last_and_options(channels_last):
    """Channels-last input (the direct path's in-place read is bypassed), salt_pepper with its own
    low/high, no padding, window indices, leaky_relu."""
    x, w, b = make(2, 3, 5, 9, 12, 3, torch.float32, "cpu", channels_last=channels_last)
    with aefast.set_backend("cpu"):
        fused, unfused = fused_and_unfused(x, w, b, "salt_pepper", 0.6, act="leaky_relu", padding=0, low=-2.0,
                                           high=3.0, fmt="window")
    assert_same(fused, unfused, torch.float32)


def test_default_generator_is_drawn_once_like_corrupt():
    x, w, b = make(2, 3, 4, 8, 8, 3, torch.float32, "cpu")
    with aefast.set_backend("cpu"):
        torch.manual_seed(5)
        y1, _ = AF.conv_pool2d(x, w, b, 1, 1, "relu", 2, corruption=("gaussian", 0.2))
        after1 = torch.rand(())
        torch.manual_seed(5)
        y2, _ = AF.conv_pool2d(AF.corrupt(x, "gaussian", 0.2), w, b, 1, 1, "relu", 2)
        after2 = torch.rand(())
    assert torch.equal(y1, y2) and torch.equal(after1, after2)


def test_gradient_wrt_clean_input_is_masked():
    """masking: the clean input's gradient is zero exactly where the element was replaced (the
    corrupted input does not depend on it there), and the corrupted input's gradient elsewhere."""
    x, w, b = make(2, 3, 4, 8, 8, 3, torch.float64, "cpu")
    gen = lambda: torch.Generator().manual_seed(9)  # noqa: E731
    with aefast.set_backend("cpu"):
        y, _ = AF.conv_pool2d(x, w, b, 1, 1, "tanh", 2, corruption=("masking", 0.5), generator=gen())
        gx = torch.autograd.grad(y.sum(), x)[0]
        xc = AF.corrupt(x.detach(), "masking", 0.5, gen()).requires_grad_()
        y2, _ = AF.conv_pool2d(xc, w, b, 1, 1, "tanh", 2)
        gxc = torch.autograd.grad(y2.sum(), xc)[0]
    kept = AF.corrupt(torch.ones_like(x), "masking", 0.5, gen()) != 0
    assert 0.3 < kept.double().mean() < 0.7
    torch.testing.assert_close(gx, torch.where(kept, gxc, torch.zeros_like(gxc)), rtol=0, atol=0)


@pytest.mark.parametrize("kind,level", KINDS)
def test_gradcheck_fp64(kind, level):
    x, w, b = make(2, 2, 3, 7, 6, 3, torch.float64, "cpu")

    def fn(x, w, b):  # the generator is re-seeded per call: the same noise every evaluation
        gen = torch.Generator().manual_seed(3)
        return AF.conv_pool2d(x, w, b, 1, 1, "tanh", 2, corruption=(kind, level), generator=gen)[0]

    with aefast.set_backend("cpu"):
        assert torch.autograd.gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-5)


def _namespaces():
    from aefast import backend as _backend

    out = [pytest.param("aefast", id="aefast")]
    ok, why = _backend.availability()["triton"]
    out.append(pytest.param("aefast_triton", id="aefast_triton", marks=pytest.mark.skipif(not ok, reason=why)))
    return out


@pytest.mark.parametrize("ns", _namespaces())
@pytest.mark.parametrize("kind", ["gaussian", "masking", "salt_pepper"])
def test_opcheck(ns, kind):
    ops = getattr(torch.ops, ns)
    x, w, b = make(2, 3, 4, 9, 8, 3, torch.float32, "cpu", seed=2)
    noise = (kind, 0.3, 1234567, -1.0, 2.0)
    torch.library.opcheck(ops.conv_pool2d_forward.default, (x, w, b, [1, 1], [1, 1], 5, 0.01, [2, 2], *noise))
    pooled, window, preact = ops.conv_pool2d_forward(x.detach(), w.detach(), b.detach(), [1, 1], [1, 1], 5, 0.01,
                                                     [2, 2], *noise)
    grad = torch.randn_like(pooled)
    torch.library.opcheck(ops.conv_pool2d_backward_weight.default,
                          (grad, window, preact, x.detach(), [3, 3], [1, 1], [1, 1], 5, 0.01, [2, 2], *noise))


def test_module_and_denoising_model_use_it():
    """aefast.nn.ConvPool2d takes corruption=; ConvDenoisingAutoencoder corrupts in its first
    encoder block's load, with the same output as corrupt-then-encode under the same seed."""
    from aefast.models import ConvDenoisingAutoencoder

    torch.manual_seed(0)
    block = ConvPool2d(3, 4, 3, padding=1)
    x = torch.rand(2, 3, 8, 8)
    with aefast.set_backend("cpu"):
        torch.manual_seed(1)
        y1, i1 = block(x, corruption=("masking", 0.3))
        torch.manual_seed(1)
        y2, i2 = block(AF.corrupt(x, "masking", 0.3))
        assert torch.equal(y1, y2) and torch.equal(i1, i2)

        model = ConvDenoisingAutoencoder(1, channels=(4, 8), corruption="gaussian", level=0.3).train()
        img = torch.rand(3, 1, 16, 16)
        torch.manual_seed(2)
        out = model(img)
        torch.manual_seed(2)
        ref = model.decode(model.encode(AF.corrupt(img, "gaussian", 0.3)))
        torch.testing.assert_close(out, ref)
        assert not torch.allclose(out, model.eval()(img))


def test_bad_corruption_arguments():
    x, w, b = make(1, 3, 4, 8, 8, 3, torch.float32, "cpu")
    with pytest.raises(ValueError, match="unknown corruption"):
        AF.conv_pool2d(x, w, b, corruption=("blur", 0.1))
    with pytest.raises(ValueError, match="level"):
        AF.conv_pool2d(x, w, b, corruption=("masking", 1.5))
    with pytest.raises(TypeError, match="corruption must be"):
        AF.conv_pool2d(x, w, b, corruption="gaussian")
    with pytest.raises(ValueError, match="generator only together"):
        AF.conv_pool2d(x, w, b, generator=torch.Generator())
    with pytest.raises(RuntimeError, match="unknown corruption"):
        torch.ops.aefast.conv_pool2d_forward(x.detach(), w.detach(), b.detach(), [1, 1], [1, 1], 1, 0.01, [2, 2],
                                             "blur", 0.1, 0, 0.0, 1.0)


# ------------------------------------------------------------------ no input-sized buffer

def _allocations(fn):
    """Sizes of every c10 CPU allocation made while fn() runs (the profiler's memory events,
    one per allocation, kernel-internal ones and oneDNN's scratch through c10 included)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    finally:
        os.unlink(path)
    return [e["args"]["Bytes"] for e in events if e.get("name") == "[memory]" and e.get("args", {}).get("Bytes", 0) > 0]


@pytest.mark.parametrize("cin,cout,channels_last", [(3, 4, False), (3, 4, True), (16, 8, False), (16, 8, True)])
def test_no_input_sized_buffer(cin, cout, channels_last):
    """Forward and backward of the fused op allocate nothing as large as the input except the
    gradient w.r.t. the input itself (which corrupt-then-conv also makes, and which its masking
    replaces once): no corrupted copy. The same check on corrupt-then-conv_pool2d finds the
    copy, so the detector works. Cin=3 (K=27) runs the direct path, Cin=16 (K=144) the oneDNN
    path in batch chunks; fp32 input of 8 images (the oneDNN chunk is 2 images)."""
    x, w, b = make(8, cin, cout, 24, 24, 3, torch.float32, "cpu", channels_last=channels_last)
    nbytes = x.numel() * x.element_size()
    with aefast.set_backend("cpu"):
        # warm-up: one-time allocations (oneDNN primitive caches) out of the measurement
        AF.conv_pool2d(x.detach(), w, b, 1, 1, "relu", 2, corruption=("masking", 0.3))

        def forward_fused():
            AF.conv_pool2d(x.detach(), w.detach(), b.detach(), 1, 1, "relu", 2, corruption=("masking", 0.3))

        def forward_unfused():
            AF.conv_pool2d(AF.corrupt(x.detach(), "masking", 0.3), w.detach(), b.detach(), 1, 1, "relu", 2)

        assert max(_allocations(forward_fused)) < nbytes
        assert max(_allocations(forward_unfused)) >= nbytes

        # Forward + backward w.r.t. the weight and bias only: still nothing input-sized.
        def train_step_params():
            y, _ = AF.conv_pool2d(x.detach(), w, b, 1, 1, "relu", 2, corruption=("gaussian", 0.3))
            torch.autograd.grad(y.sum(), (w, b))

        assert max(_allocations(train_step_params)) < nbytes
        # With the input's gradient: that gradient (and, for masking, its masked replacement) is
        # the only input-sized allocation.
        xs = x.detach().clone().requires_grad_()

        def train_step_all():
            y, _ = AF.conv_pool2d(xs, w, b, 1, 1, "relu", 2, corruption=("gaussian", 0.3))
            torch.autograd.grad(y.sum(), (xs, w, b))

        big = [a for a in _allocations(train_step_all) if a >= nbytes]
        assert len(big) == 1, big
