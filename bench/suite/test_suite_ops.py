"""Per-op benchmarks of the three kernel families, forward / backward / full (forward + backward):
the encoder block conv_pool2d, the decoder block unpool_conv_transpose2d (flat and window
indices) and reconstruction_loss (every kind and reduction, forward + backward), each against its
eager PyTorch composition and torch.compile of that composition. Workloads: bench/workloads.py.

GFLOP/s count the DENSE conv FLOPs for every variant (forward 2*MACs, backward twice that), so
they compare as speeds; aefast's sparse decoder and its encoder backward execute fewer.
GB/s of the loss count the minimum traffic of a fused forward + backward.
"""
from __future__ import annotations

import functools

import torch

import _suite as S
import aefast
import workloads as W

MODES = ("fwd", "bwd", "full")


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _op_workload(f, inputs, leaves, mode, opts, fwd_flops, compare=None, extra=None) -> S.Workload:
    """fwd: no-grad forward; bwd: the backward alone (the forward runs untimed in setup);
    full: forward + backward. The incoming gradient is fixed per workload. ``compare(out)``
    checks an output against eager's; it runs on a call in the mode's own grad mode, so that a
    compiled variant is checked on the very graph that is timed (and never compiles twice)."""
    extra = dict(extra or {}, mode=mode)

    def fwd():
        with torch.no_grad(), opts.amp():
            return f(*inputs)

    def forward():
        with opts.amp():
            return f(*inputs)

    check = None
    if compare is not None:
        def check():
            out = fwd() if mode == "fwd" else tuple(t.detach() for t in _as_tuple(forward()))
            with torch.no_grad():
                compare(out)

    if mode == "fwd":
        return S.Workload(fwd, fwd_flops, check=check, extra=extra)

    y0 = _first(forward())
    grad = torch.randn(y0.shape, generator=torch.Generator().manual_seed(1)).to(y0.device, y0.dtype)
    del y0
    if mode == "bwd":
        return S.Workload(lambda y: torch.autograd.grad(y, leaves, grad), 2 * fwd_flops,
                          setup=lambda: (_first(forward()),), check=check, extra=extra)

    def full():
        return torch.autograd.grad(_first(forward()), leaves, grad)

    return S.Workload(full, 3 * fwd_flops, check=check, extra=extra)


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def _tolerance(opts):
    """(rtol = atol, the fraction of pooling indices allowed to differ) of the checks against
    eager. On CUDA eager's cuDNN convolutions run in TF32 (torch.backends.cudnn.allow_tf32 is on
    by default), ~1e-3 relative, which also flips the argmax of a few near-tied pool windows (their
    pooled values still agree); the tests, not this sanity check, hold the kernels to exactness."""
    return (1e-2, 1e-3) if opts.device == "cuda" else (1e-4, 0.0)


def _variant_fn(variant, opts, eager, fused_for_backend):
    if variant == S.EAGER:
        return eager
    if variant == S.COMPILE:
        return opts.compile(eager)
    return fused_for_backend(variant.removeprefix("aefast-"))


# --- encoder: conv_pool2d ----------------------------------------------------------------------

def _build_conv_pool(shape, mode, variant, opts):
    inputs = W.conv_pool_inputs(shape, opts.device)
    f = _variant_fn(variant, opts, W.conv_pool_eager, W.conv_pool_fused)
    compare = None
    if variant != S.EAGER and opts.autocast is None:  # (fp32 only: under autocast, ties differ)
        def compare(out):
            y, idx = out
            ry, ridx = W.conv_pool_eager(*inputs)
            tol, index_slack = _tolerance(opts)
            differ = (idx != ridx).float().mean().item()
            assert differ <= index_slack, f"{variant}: {100 * differ:.3f}% of the pooling indices differ from eager"
            torch.testing.assert_close(y, ry, rtol=tol, atol=tol)
    return _op_workload(f, inputs, inputs, mode, opts, W.conv_pool_flops(shape), compare)


def conv_pool_cases(opts):
    shapes = W.CONV_POOL_QUICK_SHAPES if opts.quick else W.CONV_POOL_SHAPES
    if opts.device == "cuda" and not opts.quick:
        shapes = shapes + W.CONV_POOL_GPU_SHAPES
    variants = [f"aefast-{b}" for b in opts.aefast_backends()] + [S.EAGER, S.COMPILE]
    return [S.Case("conv_pool", f"conv_pool {W.conv_pool_case(shape)} {mode}", v,
                   functools.partial(_build_conv_pool, shape, mode, v))
            for shape in shapes for mode in MODES for v in variants]


# --- decoder: unpool_conv_transpose2d ----------------------------------------------------------

def _build_unpool(spec, mode, variant, opts):
    _, n, c_in, c_out, hw, act = spec
    z, idx, window, w, b = W.unpool_inputs(n, c_in, c_out, hw, opts.device)
    leaves = [t.clone().requires_grad_() for t in (z, w, b)]

    def eager(zz, ww, bb):
        return W.unpool_eager(zz, idx, ww, bb, act)

    def fused(name):
        backend, _, fmt = name.partition("-")
        return W.unpool_fused(backend, window if fmt == "window" else idx, fmt or "flat", act)

    f = _variant_fn(variant, opts, eager, fused)
    dense, sparse = W.unpool_macs(n, c_in, c_out, hw)
    compare = None
    if variant != S.EAGER and opts.autocast is None:
        def compare(out):
            tol = _tolerance(opts)[0]
            torch.testing.assert_close(_first(out), eager(*leaves), rtol=tol, atol=tol)
    executed = dense if variant in (S.EAGER, S.COMPILE) else sparse
    return _op_workload(f, leaves, leaves, mode, opts, 2.0 * dense, compare,
                        extra={"executed_macs_fwd": executed, "dense_macs_fwd": dense})


def unpool_cases(opts):
    specs = W.UNPOOL_QUICK_SHAPES if opts.quick else W.UNPOOL_SHAPES
    if opts.device == "cuda" and not opts.quick:
        specs = specs + W.UNPOOL_GPU_SHAPES
    variants = [f"aefast-{b}{fmt}" for b in opts.aefast_backends() for fmt in ("", "-window")]
    variants += [S.EAGER, S.COMPILE]
    return [S.Case("unpool_deconv", f"unpool_deconv {spec[0]} {mode}", v,
                   functools.partial(_build_unpool, spec, mode, v))
            for spec in specs for mode in MODES for v in variants]


# --- reconstruction loss -----------------------------------------------------------------------

def _build_loss(kind, reduction, shape, variant, opts):
    x, t = W.loss_inputs(kind, shape, opts.device)

    def fused(backend):
        loss = W.loss_fused(kind, reduction)

        def run(xx, tt):
            with aefast.set_backend(backend):
                return loss(xx, tt)
        return run

    f = _variant_fn(variant, opts, W.loss_eager(kind, reduction), fused)
    with opts.amp():
        ones = torch.ones_like(f(x, t))

    def step():
        with opts.amp():
            loss = f(x, t)
        return torch.autograd.grad(loss, x, ones)

    check = None
    if variant != S.EAGER and opts.autocast is None:
        def check():
            eager = W.loss_eager(kind, reduction)
            torch.testing.assert_close(f(x, t), eager(x, t), rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(step()[0], torch.autograd.grad(eager(x, t), x, ones)[0],
                                       rtol=1e-4, atol=1e-6)
    return S.Workload(step, bytes_moved=W.loss_min_bytes(x, reduction), check=check, extra={"mode": "full"})


def loss_cases(opts):
    shapes = W.LOSS_QUICK_SHAPES[:1] if opts.quick else W.LOSS_SHAPES
    variants = [f"aefast-{b}" for b in opts.aefast_backends()] + [S.EAGER, S.COMPILE]
    return [S.Case("recon_loss", f"recon_loss {W.loss_case(kind, reduction, shape)} fwd+bwd", v,
                   functools.partial(_build_loss, kind, reduction, shape, v))
            for shape in shapes for kind in W.LOSS_KINDS for reduction in W.LOSS_REDUCTIONS for v in variants]


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        opts = metafunc.config.stash[S.OPTS_KEY]
        cases = {"test_conv_pool": conv_pool_cases, "test_unpool_deconv": unpool_cases,
                 "test_recon_loss": loss_cases}[metafunc.function.__name__](opts)
        metafunc.parametrize("case", cases, ids=[c.id for c in cases])


def test_conv_pool(bench, case):
    bench(case)


def test_unpool_deconv(bench, case):
    bench(case)


def test_recon_loss(bench, case):
    bench(case)

