"""The conv VAE's CPU speed paths (issue 16, acceptance 3 for the conv VAE).

* conv_transpose_gemm (csrc/cpu/conv_transpose_gemm.cpp): a transposed conv as one GEMM plus a
  col2im, which serves conv_transpose_act2d's forward and conv_bn_pool2d's grad_input where oneDNN's
  backward-data primitive is slow. AEFAST_CONV_TRANSPOSE_GEMM=always forces it (so odd shapes,
  layouts, strides and paddings are tested whatever the size rule says), never turns it off; both
  are held to torch's ConvTranspose2d / Conv2d -> BatchNorm2d -> act in fp32 and fp64 (gradcheck),
  forward and backward, and to results independent of the thread count. fp16/bf16 are not served
  (oneDNN keeps them) and still match.
* conv_direct (csrc/cpu/conv_direct.cpp): a small-channel conv's forward and weight gradient by
  direct accumulation (register tiles, the im2col read in place), which serve conv_bn_pool2d where
  oneDNN is slow (the conv VAE's encoder). AEFAST_CONV_DIRECT=always|never|auto as above; both
  kernels are held to torch on every ISA in fp32 and fp64 (gradcheck), the weight gradient also in its
  ConvTranspose2d form, and to results independent of the thread count.
* the running-statistics update in C++ (aefast._C.update_running_stats), the one implementation the
  fused BatchNorm ops call, held bit for bit to the reference twin's update.
* aefast.optimize's rewrites for the conv VAE's layout: a stride-2 Conv2d -> BatchNorm2d (batch
  statistics) -> act with no pool becomes conv_bn_pool2d with 1x1 windows (stride-1 ones stay); a stride-2 ConvTranspose2d before a
  batch-statistics BatchNorm2d becomes conv_transpose_act2d (the BatchNorm2d -> act after it
  batch_norm_act2d). Outputs, gradients and running statistics equal the original's, train and eval.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import aefast
from aefast import functional as AF
from conftest import CPU_ISAS, TOLERANCES

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import architectures as A  # noqa: E402

MODES = ["always", "never", "auto"]
ACTS = [None, "relu", "leaky_relu", "sigmoid", "tanh", "gelu", "silu"]


def _act(y, act, slope=0.01):
    if act is None:
        return y
    if act == "leaky_relu":
        return F.leaky_relu(y, slope)
    return getattr(F, act)(y)


def _leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_() for t in ts]


def _grads(out, leaves, seed=3):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out)
    out.backward(g)
    return [None if t is None else t.grad for t in leaves]


# ---------------------------------------------------------------- conv_transpose_act2d's forward

UPSAMPLERS = [  # (n, cin, cout, (h, w), (kh, kw), stride, padding, output_padding)
    (128, 16, 8, (4, 4), (3, 3), (2, 2), (1, 1), (1, 1)),  # the conv VAE's decoder
    (2, 3, 17, (5, 7), (3, 3), (2, 2), (1, 1), (1, 0)),
    (1, 17, 3, (1, 1), (3, 3), (2, 2), (0, 0), (0, 0)),
    (3, 5, 6, (6, 5), (4, 2), (3, 2), (2, 1), (2, 1)),
    (2, 4, 5, (7, 9), (2, 2), (2, 2), (0, 0), (0, 0)),
    (2, 6, 7, (3, 4), (5, 5), (1, 1), (2, 2), (0, 0)),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", UPSAMPLERS)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_conv_transpose_act_forward_and_grads_match_torch(monkeypatch, mode, shape, layout):
    monkeypatch.setenv("AEFAST_CONV_TRANSPOSE_GEMM", mode)
    n, ci, co, hw, k, s, p, op = shape
    g = torch.Generator().manual_seed(sum(hw) + ci)
    x = torch.randn(n, ci, *hw, generator=g).contiguous(memory_format=layout)
    w = torch.randn(ci, co, *k, generator=g) / (ci * k[0] * k[1]) ** 0.5
    b = torch.randn(co, generator=g)
    for act in ("leaky_relu", "sigmoid", None):
        got_leaves, want_leaves = _leaves(x, w, b), _leaves(x, w, b)
        got = AF.conv_transpose_act2d(*got_leaves, s, p, op, activation=act, negative_slope=0.2)
        want = _act(F.conv_transpose2d(*want_leaves, s, p, op), act, 0.2)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, **TOLERANCES[torch.float32])
        got_grads, want_grads = _grads(got, got_leaves), _grads(want, want_leaves)
        # grad_W sums N*H*W products per entry (2048 at the VAE's shape), in another order than
        # oneDNN's where the direct weight grad serves (conv_direct.cpp): bound by the largest entry
        scale = max(1.0, max(float(g.abs().max()) for g in want_grads))
        for got_g, want_g in zip(got_grads, want_grads):
            torch.testing.assert_close(got_g, want_g, rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("act", ACTS)
def test_conv_transpose_act_every_activation_through_the_gemm(monkeypatch, act):
    monkeypatch.setenv("AEFAST_CONV_TRANSPOSE_GEMM", "always")
    g = torch.Generator().manual_seed(5)
    x, w, b = torch.randn(3, 6, 5, 3, generator=g), torch.randn(6, 4, 3, 3, generator=g) / 4, torch.randn(4, generator=g)
    got = AF.conv_transpose_act2d(x, w, b, (2, 2), (1, 1), (1, 1), activation=act)
    torch.testing.assert_close(got, _act(F.conv_transpose2d(x, w, b, 2, 1, 1), act), **TOLERANCES[torch.float32])


def test_conv_transpose_act_fp64_gradcheck_through_the_gemm(monkeypatch):
    monkeypatch.setenv("AEFAST_CONV_TRANSPOSE_GEMM", "always")
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: AF.conv_transpose_act2d(x, w, b, (2, 2), (1, 1), (1, 1), activation="tanh"), (x, w, b))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types_are_left_to_onednn_and_still_match(monkeypatch, dtype):
    monkeypatch.setenv("AEFAST_CONV_TRANSPOSE_GEMM", "always")
    g = torch.Generator().manual_seed(7)
    x, w, b = torch.randn(4, 8, 4, 4, generator=g), torch.randn(8, 4, 3, 3, generator=g) / 5, torch.randn(4, generator=g)
    got = AF.conv_transpose_act2d(x.to(dtype), w.to(dtype), b.to(dtype), (2, 2), (1, 1), (1, 1), activation="relu")
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), F.relu(F.conv_transpose2d(x, w, b, 2, 1, 1)), **TOLERANCES[dtype])


def test_conv_transpose_gemm_results_do_not_depend_on_the_thread_count(monkeypatch):
    monkeypatch.setenv("AEFAST_CONV_TRANSPOSE_GEMM", "always")
    g = torch.Generator().manual_seed(8)
    x, w, b = torch.randn(9, 16, 4, 5, generator=g), torch.randn(16, 8, 3, 3, generator=g), torch.randn(8, generator=g)
    threads = torch.get_num_threads()
    outs = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append(AF.conv_transpose_act2d(x, w, b, (2, 2), (1, 1), (1, 1), activation="leaky_relu"))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(o, outs[0]) for o in outs[1:])


def test_bad_mode_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("AEFAST_CONV_TRANSPOSE_GEMM", "sometimes")
    x, w = torch.randn(2, 4, 3, 3), torch.randn(4, 8, 3, 3)  # 8 output channels: not the gather kernel's
    with pytest.raises(RuntimeError, match="AEFAST_CONV_TRANSPOSE_GEMM must be auto, always or never"):
        AF.conv_transpose_act2d(x, w, None, (2, 2), (1, 1), (1, 1))


# ---------------------------------------------------------------- conv_bn_pool2d's grad_input

ENCODERS = [  # (n, cin, cout, (h, w), k, stride, padding, pool)
    (128, 8, 16, (8, 8), 3, 2, 1, 1),  # the conv VAE's second encoder stage
    (2, 3, 17, (9, 7), 3, 2, 1, 1),
    (1, 17, 3, (5, 6), 3, 1, 1, 2),
    (3, 5, 4, (10, 9), (4, 2), (3, 2), (2, 1), 1),
    (2, 4, 6, (6, 6), 1, 1, 0, 2),
]


def _encoder_reference(x, w, b, gamma, beta, stride, padding, act, pool, slope):
    y = F.batch_norm(F.conv2d(x, w, b, stride, padding), None, None, gamma, beta, True, 0.1, 1e-5)
    y = _act(y, act, slope)
    return F.max_pool2d(y, pool) if pool > 1 else y


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", ENCODERS)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_conv_bn_pool_grads_match_torch(monkeypatch, mode, shape, layout):
    monkeypatch.setenv("AEFAST_CONV_TRANSPOSE_GEMM", mode)
    n, ci, co, hw, k, s, p, pool = shape
    k = (k, k) if isinstance(k, int) else k
    g = torch.Generator().manual_seed(ci * 7 + co)
    x = torch.randn(n, ci, *hw, generator=g).contiguous(memory_format=layout)
    w = torch.randn(co, ci, *k, generator=g) / (ci * k[0] * k[1]) ** 0.5
    b, gamma, beta = torch.randn(co, generator=g), torch.rand(co, generator=g) + 0.5, torch.randn(co, generator=g)
    got_leaves, want_leaves = _leaves(x, w, b, gamma, beta), _leaves(x, w, b, gamma, beta)
    got = AF.conv_bn_pool2d(*got_leaves, None, None, True, stride=s, padding=p, activation="leaky_relu",
                            pool_size=pool, return_indices=False, negative_slope=0.2)
    want = _encoder_reference(*want_leaves, s, p, "leaky_relu", pool, 0.2)
    torch.testing.assert_close(got, want, **TOLERANCES[torch.float32])
    got_grads = _grads(got, got_leaves)
    # fp64 torch is the ground truth (fp32 torch is off by as much as aefast at N128: sums of 2048 terms)
    leaves64 = _leaves(*(t.double() for t in (x, w, b, gamma, beta)))
    want_grads = _grads(_encoder_reference(*leaves64, s, p, "leaky_relu", pool, 0.2), leaves64)
    scale = max(1.0, max(float(g.abs().max()) for g in want_grads))
    for name, got_g, want_g in zip(("x", "w", "b", "gamma", "beta"), got_grads, want_grads):
        # grad_b is BatchNorm's sum of a zero-mean gradient: zero up to rounding, so every gradient is
        # held to the largest one's scale
        torch.testing.assert_close(got_g.double(), want_g, rtol=1e-4, atol=1e-5 * scale, msg=name)
    assert got_grads[0].is_contiguous(memory_format=layout)


def test_conv_bn_pool_fp64_gradcheck_through_the_gemm(monkeypatch):
    monkeypatch.setenv("AEFAST_CONV_TRANSPOSE_GEMM", "always")
    g = torch.Generator().manual_seed(9)
    args = [torch.randn(3, 2, 5, 5, generator=g, dtype=torch.float64), torch.randn(3, 2, 3, 3, generator=g, dtype=torch.float64),
            torch.randn(3, generator=g, dtype=torch.float64), torch.rand(3, generator=g, dtype=torch.float64) + 0.5,
            torch.randn(3, generator=g, dtype=torch.float64)]
    args = [a.requires_grad_() for a in args]

    def fn(x, w, b, gamma, beta):
        return AF.conv_bn_pool2d(x, w, b, gamma, beta, None, None, True, stride=2, padding=1, activation="tanh",
                                 pool_size=1, return_indices=False)

    assert torch.autograd.gradcheck(fn, args)


def test_conv_bn_pool_grad_input_does_not_depend_on_the_thread_count(monkeypatch):
    monkeypatch.setenv("AEFAST_CONV_TRANSPOSE_GEMM", "always")
    g = torch.Generator().manual_seed(10)
    x = torch.randn(7, 8, 8, 9, generator=g)
    w, b = torch.randn(16, 8, 3, 3, generator=g), torch.randn(16, generator=g)
    threads = torch.get_num_threads()
    grads = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            xx = x.clone().requires_grad_()
            out = AF.conv_bn_pool2d(xx, w, b, None, None, None, None, True, stride=2, padding=1,
                                    activation="relu", pool_size=1, return_indices=False)
            _grads(out, [xx])
            grads.append(xx.grad)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(gr, grads[0]) for gr in grads[1:])


def test_ops_pass_opcheck_on_the_gemm_paths(monkeypatch):
    monkeypatch.setenv("AEFAST_CONV_TRANSPOSE_GEMM", "always")
    g = torch.Generator().manual_seed(11)
    x, w, b = torch.randn(2, 4, 3, 5, generator=g), torch.randn(4, 3, 3, 3, generator=g), torch.randn(3, generator=g)
    torch.library.opcheck(torch.ops.aefast.conv_transpose_act2d.default,
                          (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), [2, 2], [1, 1], [1, 1],
                           "leaky_relu", 0.2))
    xe = torch.randn(2, 3, 7, 6, generator=g, requires_grad=True)
    we, be = torch.randn(5, 3, 3, 3, generator=g, requires_grad=True), torch.randn(5, generator=g, requires_grad=True)
    gamma, beta = torch.rand(5, generator=g) + 0.5, torch.randn(5, generator=g)
    torch.library.opcheck(torch.ops.aefast.conv_bn_pool2d_forward.default,
                          (xe, we, be, gamma.requires_grad_(), beta.requires_grad_(), [2, 2], [1, 1], 1e-5, 2, 0.2,
                           [1, 1], [0, 0], False))


# ---------------------------------------------------------------- aefast.optimize on the conv VAE

class _Encoderish(nn.Module):
    """conv -> BN -> act without a pool, with x.size() of the conv output read on the way."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.act = nn.LeakyReLU(0.2)
        self.up = nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, output_padding=1)
        self.bn_up = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        n = y.size(0)
        h = self.act(self.bn(y))
        return F.relu(self.bn_up(self.up(h))).reshape(n, -1)


def _train_step(model, x):
    model.zero_grad()
    out = A.outputs(model(x))
    gen = torch.Generator().manual_seed(2)
    loss = sum((o * torch.randn(o.shape, generator=gen)).sum() for o in out)
    loss.backward()
    return [o.detach() for o in out]


@pytest.mark.parametrize("factory", [lambda: A.build("conv_vae"), _Encoderish])
def test_optimize_fuses_the_vae_layout_and_keeps_results(factory):
    torch.manual_seed(0)
    original = factory()
    model = aefast.optimize(copy.deepcopy(original), verbose=False)
    train = [r for r in model.aefast_rewrites if not r.startswith("(eval mode)")]
    assert any(r.startswith("conv_bn_act2d (conv_bn_pool2d with 1x1 windows) <- ") for r in train), train
    assert any(r.startswith("conv_transpose_act2d <- ") and "batch statistics" in r for r in train), train
    assert not any(u.startswith("upsampler") for u in model.aefast_unfused), model.aefast_unfused
    x = torch.rand(4, *(1, 16, 16) if factory is not _Encoderish else (3, 9, 8))
    for training in (True, True, False):
        original.train(training), model.train(training)
        torch.manual_seed(1)  # the VAE's reparameterisation noise
        want = _train_step(original, x)
        torch.manual_seed(1)
        got = _train_step(model, x)
        for w, gt in zip(want, got):
            torch.testing.assert_close(gt, w, rtol=1e-5, atol=1e-5)
        # a conv bias before a batch-statistics BatchNorm2d has a zero gradient up to rounding: every
        # gradient is held to the largest one's scale
        scale = max(1.0, max(float(p.grad.abs().max()) for p in original.parameters()))
        for (name, p), q in zip(original.named_parameters(), model.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5 * scale, msg=name)
        for (name, b), c in zip(original.named_buffers(), model.buffers()):
            torch.testing.assert_close(c, b, msg=name)


def test_optimized_vae_compiles_fullgraph():
    torch.manual_seed(0)
    model = aefast.optimize(A.build("conv_vae"), verbose=False, memory_format="preserve")
    model.train()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.rand(4, 1, 16, 16)
    torch.manual_seed(2)
    eager_out = model(x)[0]
    torch.manual_seed(2)
    compiled_out = compiled(x)[0]
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-5, atol=1e-5)
    compiled_out.sum().backward()


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cout", [8, 16, 12, 3])
def test_col2im_every_isa_and_channel_block(monkeypatch, isa, dtype, cout):
    """The col2im's per-ISA loops (csrc/cpu/conv_transpose_gemm_kernels.inc): whole 32-byte channel
    vectors (8 fp32 / 4 fp64), a vector plus a tail (12), tails only (3), into NCHW and channels-last."""
    monkeypatch.setenv("AEFAST_CONV_TRANSPOSE_GEMM", "always")
    monkeypatch.setenv("AEFAST_CPU_ISA", isa)
    g = torch.Generator().manual_seed(cout)
    x = torch.randn(3, 5, 4, 5, generator=g, dtype=dtype)
    w = torch.randn(5, cout, 3, 3, generator=g, dtype=dtype)
    b = torch.randn(cout, generator=g, dtype=dtype)
    for layout in (torch.contiguous_format, torch.channels_last):
        xl = x.contiguous(memory_format=layout)
        got = AF.conv_transpose_act2d(xl, w, b, (2, 2), (1, 1), (1, 0), activation=None)
        want = F.conv_transpose2d(x, w, b, 2, 1, (1, 0))
        assert got.is_contiguous(memory_format=layout)
        torch.testing.assert_close(got, want, **TOLERANCES[dtype])


@pytest.mark.parametrize("backend_name", ["cpu", "triton"])
def test_one_by_one_windows_match_the_reference_twin_on_every_backend(backend_name):
    """aefast.optimize's conv_bn_act2d rewrite runs conv_bn_pool2d with 1x1 windows on any device:
    every backend that runs here holds it to the reference twin (triton under the interpreter)."""
    from aefast import backend as _backend

    if not _backend.availability()[backend_name][0]:
        pytest.skip(f"{backend_name} unavailable here")
    g = torch.Generator().manual_seed(12)
    args = [torch.randn(2, 3, 7, 6, generator=g), torch.randn(5, 3, 3, 3, generator=g), torch.randn(5, generator=g),
            torch.rand(5, generator=g) + 0.5, torch.randn(5, generator=g)]
    results = {}
    for name in (backend_name, "reference"):
        leaves = _leaves(*args)
        with aefast.set_backend(name):
            out = AF.conv_bn_pool2d(*leaves, None, None, True, stride=2, padding=1, activation="leaky_relu",
                                    pool_size=1, return_indices=False, negative_slope=0.2)
            results[name] = [out.detach()] + _grads(out, leaves)
    for got, want in zip(results[backend_name], results["reference"]):
        torch.testing.assert_close(got, want, **TOLERANCES[torch.float32])



# ---------------------------------------------------------------- conv weight gradient by direct accumulation

WGRAD_MODES = ["always", "never", "auto"]
WEIGHT_GRADS = [  # (n, cx, cg, (hx, wx), (kh, kw), stride, padding): grad (n, cg, ...) against x (n, cx, hx, wx)
    (128, 1, 8, (16, 16), (3, 3), (2, 2), (1, 1)),  # the conv VAE's first encoder stage
    (128, 8, 16, (8, 8), (3, 3), (2, 2), (1, 1)),  # its second
    (2, 3, 17, (9, 7), (3, 3), (2, 2), (1, 1)),  # a tail-only vector (17 = 2*8 + 1 fp32 channels)
    (3, 5, 12, (10, 9), (4, 2), (3, 2), (2, 1)),
    (1, 17, 3, (5, 6), (3, 3), (1, 1), (1, 1)),
    (2, 4, 32, (6, 6), (1, 1), (1, 1), (0, 0)),
    (2, 2, 24, (1, 1), (3, 3), (2, 2), (1, 1)),
    (4, 6, 8, (7, 11), (5, 3), (1, 2), (0, 2)),
]


def _conv_weight_grad_torch(grad, x, kh, kw, stride, padding):
    """torch's (grad_weight, grad_bias) of conv2d(x, W) given grad_output ``grad``, in fp64."""
    w = torch.zeros(grad.shape[1], x.shape[1], kh, kw, dtype=torch.float64)
    _, gw, gb = torch.ops.aten.convolution_backward(grad.double(), x.double(), w, [grad.shape[1]], list(stride),
                                                    list(padding), [1, 1], False, [0, 0], 1, [False, True, True])
    return gw, gb


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", WEIGHT_GRADS)
def test_weight_grad_direct_matches_torch_every_isa(monkeypatch, isa, dtype, shape):
    """csrc/cpu/conv_direct.cpp against torch's conv backward: every tap-block size (taps 9, 72,
    27, 40, 153, 4, 18, 90), whole channel vectors, tails (17, 12, 3, 24 fp64), strides, paddings, and
    grad / x in both layouts."""
    monkeypatch.setenv("AEFAST_CPU_ISA", isa)
    n, cx, cg, hw, (kh, kw), s, p = shape
    gen = torch.Generator().manual_seed(cx * 31 + cg)
    x = torch.randn(n, cx, *hw, generator=gen, dtype=dtype)
    ho, wo = ((hw[a] + 2 * p[a] - (kh, kw)[a]) // s[a] + 1 for a in range(2))
    grad = torch.randn(n, cg, ho, wo, generator=gen, dtype=dtype)
    if cg > 32 // x.element_size() * 4:  # past its register tile (32 fp32 / 16 fp64 channels): refused
        with pytest.raises(RuntimeError, match="conv_weight_grad_direct"):
            aefast._C.conv_weight_grad_direct(grad, x, kh, kw, list(s), list(p), True)
        return
    want_w, want_b = _conv_weight_grad_torch(grad, x, kh, kw, s, p)
    tol = dict(rtol=1e-4, atol=1e-4 * max(1.0, float(want_w.abs().max()))) if dtype == torch.float32 else \
        dict(rtol=1e-10, atol=1e-10)
    for layout in (torch.contiguous_format, torch.channels_last):
        gw, gb = aefast._C.conv_weight_grad_direct(grad.contiguous(memory_format=layout),
                                                   x.contiguous(memory_format=layout), kh, kw, list(s), list(p), True)
        assert gw.shape == (cg, cx, kh, kw) and gw.dtype == dtype and gw.is_contiguous()
        torch.testing.assert_close(gw.double(), want_w, **tol)
        torch.testing.assert_close(gb.double(), want_b, **tol)
    gw_only, gb_none = aefast._C.conv_weight_grad_direct(grad, x, kh, kw, list(s), list(p), False)
    assert gb_none is None  # an undefined tensor: no bias gradient asked for
    torch.testing.assert_close(gw_only.double(), want_w, **tol)


@pytest.mark.parametrize("shape", [(128, 16, 8, (4, 4), (3, 3), (2, 2), (1, 1), (1, 1)),  # the conv VAE's decoder
                                   (128, 8, 1, (8, 8), (3, 3), (2, 2), (1, 1), (1, 1)),
                                   (2, 5, 3, (3, 4), (4, 2), (3, 2), (2, 1), (1, 0))])
def test_weight_grad_direct_is_a_transposed_convs_weight_grad(shape):
    """The same kernel gives a ConvTranspose2d's grad_weight with grad = its input and x = its
    grad_output (the formula in aefast/conv_direct.h), for its callers in the decoder."""
    n, ci, co, hw, (kh, kw), s, p, op = shape
    gen = torch.Generator().manual_seed(ci + co)
    x = torch.randn(n, ci, *hw, generator=gen, dtype=torch.float64)
    w = torch.randn(ci, co, kh, kw, generator=gen, dtype=torch.float64, requires_grad=True)
    out = F.conv_transpose2d(x, w, None, s, p, op)
    gy = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    out.backward(gy)
    gw, _ = aefast._C.conv_weight_grad_direct(x, gy, kh, kw, list(s), list(p), False)
    torch.testing.assert_close(gw, w.grad, rtol=1e-10, atol=1e-10)


def test_weight_grad_direct_does_not_depend_on_the_thread_count():
    g = torch.Generator().manual_seed(13)
    x, grad = torch.randn(37, 8, 8, 8, generator=g), torch.randn(37, 16, 4, 4, generator=g)
    threads = torch.get_num_threads()
    results = []
    try:
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            results.append(aefast._C.conv_weight_grad_direct(grad, x, 3, 3, [2, 2], [1, 1], True))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(r[0], results[0][0]) and torch.equal(r[1], results[0][1]) for r in results[1:])


def test_weight_grad_direct_rejects_what_it_does_not_serve():
    x = torch.randn(2, 3, 5, 5)
    with pytest.raises(RuntimeError, match="conv_weight_grad_direct"):
        aefast._C.conv_weight_grad_direct(torch.randn(2, 33, 3, 3), x, 3, 3, [2, 2], [1, 1], True)  # 33 > 32 channels
    with pytest.raises(RuntimeError, match="conv_weight_grad_direct"):
        aefast._C.conv_weight_grad_direct(torch.randn(2, 4, 3, 3).half(), x.half(), 3, 3, [2, 2], [1, 1], True)
    with pytest.raises(RuntimeError, match="conv_weight_grad_direct"):
        aefast._C.conv_weight_grad_direct(torch.randn(2, 4, 3, 3), x, 3, 3, [0, 2], [1, 1], True)


@pytest.mark.parametrize("mode", WGRAD_MODES)
@pytest.mark.parametrize("shape", ENCODERS)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_conv_bn_pool_grads_match_torch_with_the_direct_weight_grad(monkeypatch, mode, shape, layout):
    """conv_bn_pool2d's grad_weight and grad_bias from conv_weight_grad_direct (always), oneDNN (never)
    or the rule (auto), against fp64 torch; the input needing no gradient too (the first layer)."""
    monkeypatch.setenv("AEFAST_CONV_DIRECT", mode)
    n, ci, co, hw, k, s, p, pool = shape
    k = (k, k) if isinstance(k, int) else k
    g = torch.Generator().manual_seed(ci * 5 + co)
    x = torch.randn(n, ci, *hw, generator=g).contiguous(memory_format=layout)
    w = torch.randn(co, ci, *k, generator=g) / (ci * k[0] * k[1]) ** 0.5
    b, gamma, beta = torch.randn(co, generator=g), torch.rand(co, generator=g) + 0.5, torch.randn(co, generator=g)
    for x_needs_grad in (True, False):
        got_leaves = _leaves(x, w, b, gamma, beta)
        got_leaves[0].requires_grad_(x_needs_grad)
        got = AF.conv_bn_pool2d(*got_leaves, None, None, True, stride=s, padding=p, activation="leaky_relu",
                                pool_size=pool, return_indices=False, negative_slope=0.2)
        got_grads = _grads(got, got_leaves)
        leaves64 = _leaves(*(t.double() for t in (x, w, b, gamma, beta)))
        want_grads = _grads(_encoder_reference(*leaves64, s, p, "leaky_relu", pool, 0.2), leaves64)
        scale = max(1.0, max(float(g.abs().max()) for g in want_grads))
        for name, got_g, want_g in zip(("x", "w", "b", "gamma", "beta"), got_grads, want_grads):
            if name == "x" and not x_needs_grad:
                assert got_g is None
                continue
            torch.testing.assert_close(got_g.double(), want_g, rtol=1e-4, atol=1e-5 * scale, msg=name)
        assert got_grads[1].is_contiguous()


def test_conv_bn_pool_fp64_gradcheck_through_the_direct_weight_grad(monkeypatch):
    monkeypatch.setenv("AEFAST_CONV_DIRECT", "always")
    g = torch.Generator().manual_seed(14)
    args = [torch.randn(3, 2, 5, 5, generator=g, dtype=torch.float64), torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64),
            torch.randn(5, generator=g, dtype=torch.float64), torch.rand(5, generator=g, dtype=torch.float64) + 0.5,
            torch.randn(5, generator=g, dtype=torch.float64)]
    args = [a.requires_grad_() for a in args]
    for pool in (1, 2):
        def fn(x, w, b, gamma, beta):
            return AF.conv_bn_pool2d(x, w, b, gamma, beta, None, None, True, stride=1 if pool == 2 else 2, padding=1,
                                     activation="tanh", pool_size=pool, return_indices=False)

        assert torch.autograd.gradcheck(fn, args)


def test_conv_bn_pool_opcheck_through_the_direct_weight_grad(monkeypatch):
    monkeypatch.setenv("AEFAST_CONV_DIRECT", "always")
    g = torch.Generator().manual_seed(15)
    xe = torch.randn(2, 3, 7, 6, generator=g, requires_grad=True)
    we, be = torch.randn(8, 3, 3, 3, generator=g, requires_grad=True), torch.randn(8, generator=g, requires_grad=True)
    gamma, beta = torch.rand(8, generator=g) + 0.5, torch.randn(8, generator=g)
    torch.library.opcheck(torch.ops.aefast.conv_bn_pool2d_forward.default,
                          (xe, we, be, gamma.requires_grad_(), beta.requires_grad_(), [2, 2], [1, 1], 1e-5, 2, 0.2,
                           [1, 1], [0, 0], False))


def test_bad_direct_conv_mode_is_a_clear_error(monkeypatch):
    x, w = torch.randn(2, 3, 6, 6), torch.randn(8, 3, 3, 3, requires_grad=True)
    out = AF.conv_bn_pool2d(x, w, None, None, None, None, None, True, stride=2, padding=1, pool_size=1,
                            return_indices=False)
    monkeypatch.setenv("AEFAST_CONV_DIRECT", "sometimes")
    with pytest.raises(RuntimeError, match="AEFAST_CONV_DIRECT must be auto, always or never"):
        out.sum().backward()
    with pytest.raises(RuntimeError, match="AEFAST_CONV_DIRECT must be auto, always or never"):
        AF.conv_bn_pool2d(x, w, None, None, None, None, None, True, stride=2, padding=1, pool_size=1,
                          return_indices=False)


# ---------------------------------------------------------------- running statistics in C++

@pytest.mark.parametrize("momentum", [0.1, None, 0.0, 1.0, 0.37])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("tracked", [True, False])
def test_update_running_stats_is_the_reference(momentum, dtype, tracked):
    """aefast._C.update_running_stats (the one implementation the fused BatchNorm ops call) equals the
    reference twin's update over several steps: bit for bit on CPU fp32/fp64 (its loop), to fp16
    tolerance for fp16 running statistics (its tensor ops); momentum=None's cumulative average included."""
    from aefast.reference import functional as ref

    gen = torch.Generator().manual_seed(16)
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    ours = [torch.randn(7, generator=gen).to(dtype), (torch.rand(7, generator=gen) + 0.5).to(dtype),
            torch.tensor(3, dtype=torch.int64) if tracked else None]
    theirs = [None if t is None else t.clone() for t in ours]
    for step in range(4):
        mean, var = torch.randn(7, generator=gen, dtype=stat), torch.rand(7, generator=gen, dtype=stat)
        count = 5 + 100 * step
        aefast._C.update_running_stats(*ours, momentum, mean, var, count)
        ref.update_running_stats(*theirs, momentum, mean, var, count)
        for a, b in zip(ours, theirs):
            if a is None or dtype != torch.float16:
                assert (a is None and b is None) or torch.equal(a, b)
            else:  # the tensor-op path rounds to fp16 once more or less than the reference here and there
                torch.testing.assert_close(a, b, rtol=2e-3, atol=1e-3)
    if not tracked and momentum is None:
        assert torch.equal(ours[0], theirs[0])  # torch's factor 0: nothing moves


def test_update_running_stats_without_running_stats_counts_batches():
    n = torch.tensor(0, dtype=torch.int64)
    aefast._C.update_running_stats(None, None, n, 0.1, torch.zeros(3), torch.ones(3), 10)
    assert int(n) == 1


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("op", ["conv_bn_pool2d", "batch_norm_act2d"])
def test_fused_ops_update_running_stats_as_batchnorm2d(momentum, op):
    """Through the fused ops' eager path (the C++ update), against nn.BatchNorm2d over three steps."""
    gen = torch.Generator().manual_seed(17)
    conv = nn.Conv2d(3, 8, 3, 2, 1)
    bn = nn.BatchNorm2d(8, momentum=momentum)
    ours = copy.deepcopy(bn)
    for _ in range(3):
        x = torch.randn(4, 3, 9, 10, generator=gen)
        with torch.no_grad():
            want = F.leaky_relu(bn(conv(x)), 0.2)
        if op == "conv_bn_pool2d":
            got = AF.conv_bn_pool2d(x, conv.weight, conv.bias, ours.weight, ours.bias, ours.running_mean,
                                    ours.running_var, True, momentum, ours.eps, stride=2, padding=1,
                                    activation="leaky_relu", pool_size=1, return_indices=False,
                                    num_batches_tracked=ours.num_batches_tracked, negative_slope=0.2)
        else:
            got = AF.batch_norm_act2d(conv(x), ours.weight, ours.bias, ours.running_mean, ours.running_var, True,
                                      momentum, ours.eps, "leaky_relu", ours.num_batches_tracked, negative_slope=0.2)
        torch.testing.assert_close(got, want, **TOLERANCES[torch.float32])
    torch.testing.assert_close(ours.running_mean, bn.running_mean, **TOLERANCES[torch.float32])
    torch.testing.assert_close(ours.running_var, bn.running_var, **TOLERANCES[torch.float32])
    assert int(ours.num_batches_tracked) == int(bn.num_batches_tracked) == 3


@pytest.mark.parametrize("isa", CPU_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", WEIGHT_GRADS)
def test_conv_forward_direct_matches_torch_every_isa(monkeypatch, isa, dtype, shape):
    """The forward of csrc/cpu/conv_direct.cpp against F.conv2d: every position-block size (rows 8,
    4, 5, 2, 6, 1, 4 wide), whole channel vectors and tails, strides, paddings, both input layouts;
    the result is channels-last (the layout conv_bn_pool2d keeps its conv output in)."""
    monkeypatch.setenv("AEFAST_CPU_ISA", isa)
    n, cx, cg, hw, (kh, kw), s, p = shape
    gen = torch.Generator().manual_seed(cx * 13 + cg)
    x = torch.randn(n, cx, *hw, generator=gen, dtype=dtype)
    w = torch.randn(cg, cx, kh, kw, generator=gen, dtype=dtype)
    b = torch.randn(cg, generator=gen, dtype=dtype)
    if cg > 32 // x.element_size() * 4:
        with pytest.raises(RuntimeError, match="conv_forward_direct"):
            aefast._C.conv_forward_direct(x, w, b, list(s), list(p))
        return
    want = F.conv2d(x.double(), w.double(), b.double(), s, p)
    for layout in (torch.contiguous_format, torch.channels_last):
        for bias in (b, None):
            got = aefast._C.conv_forward_direct(x.contiguous(memory_format=layout), w, bias, list(s), list(p))
            assert got.shape == want.shape and got.dtype == dtype
            assert got.is_contiguous(memory_format=torch.channels_last) or cg == 1
            expected = want if bias is not None else want - b.double().view(1, -1, 1, 1)
            torch.testing.assert_close(got.double(), expected, **TOLERANCES[dtype])


def test_conv_forward_direct_rejects_what_it_does_not_serve():
    x = torch.randn(2, 3, 5, 5)
    with pytest.raises(RuntimeError, match="conv_forward_direct"):
        aefast._C.conv_forward_direct(x, torch.randn(33, 3, 3, 3), None, [1, 1], [1, 1])
    with pytest.raises(RuntimeError, match="conv_forward_direct"):
        aefast._C.conv_forward_direct(x, torch.randn(8, 3, 7, 7), None, [1, 1], [0, 0])
    with pytest.raises(RuntimeError, match="conv_forward_direct"):
        aefast._C.conv_forward_direct(x, torch.randn(8, 3, 3, 3), None, [1, 0], [0, 0])


@pytest.mark.parametrize("mode", WGRAD_MODES)
@pytest.mark.parametrize("shape", ENCODERS + [(128, 1, 8, (16, 16), 3, 2, 1, 1), (3, 1, 16, (9, 8), 3, 2, 1, 2)])
def test_conv_bn_pool_forward_through_the_direct_conv(monkeypatch, mode, shape):
    """conv_bn_pool2d's outputs, indices and running statistics with its conv run by the direct kernel
    (always), oneDNN (never) or the rule (auto: the conv VAE's 1 -> 8 first stage), against torch."""
    monkeypatch.setenv("AEFAST_CONV_DIRECT", mode)
    n, ci, co, hw, k, s, p, pool = shape
    k = (k, k) if isinstance(k, int) else k
    g = torch.Generator().manual_seed(ci * 3 + co)
    x = torch.randn(n, ci, *hw, generator=g)
    conv = nn.Conv2d(ci, co, k, s, p)
    bn = nn.BatchNorm2d(co)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / (ci * k[0] * k[1]) ** 0.5)
    ours = copy.deepcopy(bn)
    want, want_idx = F.max_pool2d(F.leaky_relu(bn(conv(x)), 0.2), pool, return_indices=True)
    got, got_idx = AF.conv_bn_pool2d(x, conv.weight, conv.bias, ours.weight, ours.bias, ours.running_mean,
                                     ours.running_var, True, ours.momentum, ours.eps, stride=s, padding=p,
                                     activation="leaky_relu", pool_size=pool, num_batches_tracked=ours.num_batches_tracked,
                                     negative_slope=0.2)
    torch.testing.assert_close(got, want.detach(), **TOLERANCES[torch.float32])
    if pool > 1:
        assert torch.equal(got_idx, want_idx)
    torch.testing.assert_close(ours.running_mean, bn.running_mean, **TOLERANCES[torch.float32])
    torch.testing.assert_close(ours.running_var, bn.running_var, **TOLERANCES[torch.float32])


# ---------------------------------------------------------------- conv_transpose_act2d's direct weight grad

DIRECT_UPSAMPLERS = [  # (n, cin, cout, (h, w), (kh, kw), stride, padding, output_padding): cin 8 or 16 (the rule)
    (128, 16, 8, (4, 4), (3, 3), (2, 2), (1, 1), (1, 1)),  # the conv VAE's decoder
    (128, 8, 1, (8, 8), (3, 3), (2, 2), (1, 1), (1, 1)),
    (3, 8, 5, (5, 7), (3, 3), (2, 2), (1, 1), (1, 0)),
    (2, 16, 3, (3, 6), (2, 4), (3, 2), (0, 1), (2, 1)),
    (1, 8, 7, (1, 1), (3, 3), (1, 1), (0, 0), (0, 0)),
]


@pytest.mark.parametrize("mode", WGRAD_MODES)
@pytest.mark.parametrize("shape", DIRECT_UPSAMPLERS)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_conv_transpose_act_grads_match_torch_with_the_direct_weight_grad(monkeypatch, mode, shape, layout):
    """conv_transpose_act2d's grad_W from conv_weight_grad_direct (always), oneDNN (never) or the
    rule (auto), in the weight's layout, against fp64 torch; with and without an activation, and
    with the input needing no gradient (grad_W alone)."""
    monkeypatch.setenv("AEFAST_CONV_DIRECT", mode)
    n, ci, co, hw, k, s, p, op = shape
    g = torch.Generator().manual_seed(ci * 7 + co)
    x = torch.randn(n, ci, *hw, generator=g).contiguous(memory_format=layout)
    w = (torch.randn(ci, co, *k, generator=g) / (ci * k[0] * k[1]) ** 0.5).contiguous(memory_format=layout)
    b = torch.randn(co, generator=g)
    for act, x_needs_grad in (("leaky_relu", True), (None, True), ("sigmoid", False)):
        got_leaves, want_leaves = _leaves(x, w, b), _leaves(*(t.double() for t in (x, w, b)))
        got_leaves[0].requires_grad_(x_needs_grad)
        want_leaves[0].requires_grad_(x_needs_grad)
        got = AF.conv_transpose_act2d(*got_leaves, s, p, op, activation=act, negative_slope=0.2)
        want = _act(F.conv_transpose2d(*want_leaves, s, p, op), act, 0.2)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        got_grads, want_grads = _grads(got, got_leaves), _grads(want, want_leaves)
        # fp32 sums of up to n*h*w terms: the error bound scales with the largest gradient entry
        scale = max(1.0, max(float(g.abs().max()) for g in want_grads if g is not None))
        for name, got_g, want_g in zip(("x", "w", "b"), got_grads, want_grads):
            if name == "x" and not x_needs_grad:
                assert got_g is None
                continue
            torch.testing.assert_close(got_g.double(), want_g, rtol=1e-4, atol=1e-5 * scale, msg=name)
            assert got_g.shape == want_g.shape


def test_conv_transpose_act_fp64_gradcheck_through_the_direct_weight_grad(monkeypatch):
    monkeypatch.setenv("AEFAST_CONV_DIRECT", "always")
    g = torch.Generator().manual_seed(16)
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 8, 3, 4, generator=g, dtype=torch.float64).contiguous(memory_format=layout)
        w = torch.randn(8, 3, 3, 3, generator=g, dtype=torch.float64)
        b = torch.randn(3, generator=g, dtype=torch.float64)
        args = [t.requires_grad_() for t in (x, w, b)]
        assert torch.autograd.gradcheck(
            lambda x, w, b: AF.conv_transpose_act2d(x, w, b, 2, 1, 1, activation="tanh"), args)


@pytest.mark.parametrize("mode, taken", [("auto", True), ("always", True), ("never", False)])
def test_conv_transpose_act_direct_weight_grad_is_the_rules_pick_at_the_vae_decoder(monkeypatch, mode, taken):
    """At the conv VAE's decoder shape (N128 16->8 4x4 s2, channels_last and NCHW) the rule takes the
    direct weight grad; AEFAST_CONV_DIRECT=never keeps oneDNN's."""
    monkeypatch.setenv("AEFAST_CONV_DIRECT", mode)
    n, ci, co, hw, k, s, p, op = DIRECT_UPSAMPLERS[0]
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(n, ci, *hw).contiguous(memory_format=layout).requires_grad_()
        w = torch.randn(ci, co, *k).contiguous(memory_format=layout).requires_grad_()
        y = AF.conv_transpose_act2d(x, w, None, s, p, op, activation="leaky_relu")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            y.sum().backward()
        paths = {e.name for e in prof.events() if e.name.startswith("aefast path: ")}
        assert ("aefast path: conv_transpose_act2d_backward direct weight grad" in paths) == taken, paths
