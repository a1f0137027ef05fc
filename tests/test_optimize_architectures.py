"""aefast.optimize on typical real architectures (bench/architectures.py: SegNet in two styles,
U-Net, FCN-8s, a conv VAE, two tutorial conv AEs), issue 16's acceptance point 2:
- outputs, parameter gradients and running statistics of the optimized copy equal the original's
  within fp32 tolerance, in training and in eval mode;
- torch.compile(fullgraph=True) of the optimized model runs and agrees (two architectures: slow on CPU);
- the pool, unpool and upsampler sites it fuses, counted exactly per architecture and mode, so that
  any change shows. The acceptance target is >= 80% of all sites; it is not met yet (stride-2
  ConvTranspose2d upsamplers, ceil_mode pools and U-Net's skip-read pools have no fused form), and
  test_overall_fused_fraction records the current figure rather than asserting the target.
"""
import copy
import sys
from pathlib import Path

import pytest
import torch

import aefast

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import architectures as A  # noqa: E402

NAMES = list(A.ARCHITECTURES)


def optimized_pair(name):
    original = A.build(name)
    return original, aefast.optimize(copy.deepcopy(original), verbose=False)  # training-mode BN fused by default


def step(model, x, training, output_weights):
    """Forward in ``training`` mode (the VAE's noise from a fixed seed), a weighted sum of every
    output as the loss, backward; returns the outputs and {parameter name: gradient}."""
    model.train(training)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(123)
    outs = A.outputs(model(x))
    sum((o * w).sum() for o, w in zip(outs, output_weights)).backward()
    return [o.detach() for o in outs], {n: p.grad for n, p in model.named_parameters()}


def assert_close(actual, expected, what, scale=None):
    """fp32 tolerance; ``scale``, the largest gradient entry of the whole model, bounds the absolute
    error of gradients: a gradient several BatchNorm layers deep is a sum of many terms summed in a
    different order by the fused kernels, so it differs from eager by ~1e-7 of the model's gradient
    scale, not of its own entry's size. (A conv bias feeding a training-mode BatchNorm has an exactly
    zero gradient: both sides hold rounding noise only.)"""
    atol = 1e-5 * max(1.0, scale or 0.0)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=atol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("name", NAMES)
def test_optimized_matches_original_in_train_and_eval(name):
    original, optimized = optimized_pair(name)
    shape = A.ARCHITECTURES[name][1]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        probe = A.outputs(copy.deepcopy(original).eval()(x))
    gen = torch.Generator().manual_seed(2)
    weights = [torch.randn(o.shape, generator=gen) for o in probe]
    # Training mode twice (running statistics advance twice, the second step normalises with
    # batch statistics again), then eval mode, which reads the running statistics both updated.
    for training in (True, True, False):
        mode = "train" if training else "eval"
        ref_outs, ref_grads = step(original, x, training, weights)
        outs, grads = step(optimized, x, training, weights)
        for i, (o, r) in enumerate(zip(outs, ref_outs)):
            assert_close(o, r, f"{name} {mode} output {i}")
        assert ref_grads.keys() == grads.keys()
        assert all(g is not None for g in (*grads.values(), *ref_grads.values())), f"{name} {mode}: no gradient"
        scale = max(g.abs().max().item() for g in ref_grads.values())
        for n, g in grads.items():
            assert_close(g, ref_grads[n], f"{name} {mode} grad {n}", scale)
        ref_buffers = dict(original.named_buffers())
        for n, b in optimized.named_buffers():
            if b.is_floating_point():
                assert_close(b, ref_buffers[n], f"{name} {mode} buffer {n}")
            else:
                assert torch.equal(b, ref_buffers[n]), f"{name} {mode} buffer {n}"


@pytest.mark.parametrize("name", ["segnet_sequential", "tutorial_conv_ae"])
def test_torch_compile_fullgraph_of_optimized(name):
    """Inductor, the default backend, in training mode (then gradients and running statistics are
    compared) and in eval mode; two architectures only, as each compilation takes a while on CPU."""
    torch._dynamo.reset()
    original, optimized = optimized_pair(name)
    compiled = torch.compile(optimized, fullgraph=True)
    x = torch.randn(A.ARCHITECTURES[name][1], generator=torch.Generator().manual_seed(3))
    for training in (True, False):
        original.train(training)
        optimized.train(training)
        expected, actual = original(x), compiled(x)
        assert_close(actual, expected, f"{name} compiled, training={training}")
        if training:
            expected.square().mean().backward()
            actual.square().mean().backward()
            scale = max(p.grad.abs().max().item() for p in original.parameters())
            for n, p in original.named_parameters():
                assert_close(optimized.get_parameter(n).grad, p.grad, f"{name} compiled grad {n}", scale)
            for n, b in original.named_buffers():
                assert_close(optimized.get_buffer(n), b, f"{name} compiled buffer {n}")


# Exact (fused, total) sites per architecture and mode, from optimize()'s own report. When a
# rewrite is added, these change on purpose: update them together with the reasons in the docstring.
# Why each is short of all-fused (the reasons optimize() reports):
#   SegNet (both): in training mode the decoder's unpool -> conv -> BatchNorm2d (batch statistics)
#     has no fused form (eval mode folds the BN and fuses all three);
#   U-Net: each pool's input is also the skip connection (a value read), and its two upsamplers are
#     stride-2 ConvTranspose2d without unpool;
#   FCN-8s: five ceil_mode=True pools and three stride-2/8 ConvTranspose2d upsamplers;
#   conv VAE: no pools; two stride-2 ConvTranspose2d upsamplers;
#   tutorial conv AE: two stride-2 ConvTranspose2d upsamplers.
def _sites(pools, unpools, upsamplers):
    return {"max_pool2d": pools, "max_unpool2d": unpools, "upsampler": upsamplers}


EXPECTED_SITES = {  # name: {training: {kind: (fused, total)}}
    "segnet_functional": {True: _sites((3, 3), (0, 3), (0, 0)), False: _sites((3, 3), (3, 3), (0, 0))},
    "segnet_sequential": {True: _sites((3, 3), (0, 3), (0, 0)), False: _sites((3, 3), (3, 3), (0, 0))},
    "unet": {True: _sites((0, 2), (0, 0), (0, 2)), False: _sites((0, 2), (0, 0), (0, 2))},
    "fcn8s": {True: _sites((0, 5), (0, 0), (0, 3)), False: _sites((0, 5), (0, 0), (0, 3))},
    "conv_vae": {True: _sites((0, 0), (0, 0), (0, 2)), False: _sites((0, 0), (0, 0), (0, 2))},
    "tutorial_conv_ae": {True: _sites((2, 2), (0, 0), (0, 2)), False: _sites((2, 2), (0, 0), (0, 2))},
    "indices_conv_ae": {True: _sites((2, 2), (2, 2), (0, 0)), False: _sites((2, 2), (2, 2), (0, 0))},
}


def counts(name):
    reports = A.mode_reports(A.build(name))
    return {training: A.site_counts(*reports[training]) for training in (True, False)}, reports


@pytest.mark.parametrize("name", NAMES)
def test_site_counts(name):
    found, reports = counts(name)
    # The training-mode accounting is what optimize() publishes on the model.
    _, optimized = optimized_pair(name)
    assert sorted(optimized.aefast_unfused) == sorted(reports[True][1])
    assert sorted(line for line in optimized.aefast_rewrites if not line.startswith("(eval mode)")) \
        == sorted(reports[True][0])
    assert found == EXPECTED_SITES[name]


def test_overall_fused_fraction():
    """Prints the per-architecture and overall fused fraction (pytest -s shows it); asserts the
    exact current overall figure, which is below issue 16's 80% target."""
    totals = {True: [0, 0], False: [0, 0]}
    lines = []
    for name in NAMES:
        found, _ = counts(name)
        for training in (True, False):
            fused = sum(f for f, _ in found[training].values())
            total = sum(t for _, t in found[training].values())
            totals[training][0] += fused
            totals[training][1] += total
            lines.append(f"{name:>18} {'train' if training else 'eval ':5}: {fused}/{total} sites fused "
                         + ", ".join(f"{k} {f}/{t}" for k, (f, t) in found[training].items()))
    for training, (fused, total) in totals.items():
        lines.append(f"overall {'train' if training else 'eval'}: {fused}/{total} = {fused / total:.0%} "
                     "(issue 16 target: >= 80%)")
    print("\n".join(lines))
    assert {t: tuple(v) for t, v in totals.items()} == EXPECTED_OVERALL


# training mode 12/34 = 35%, eval mode 18/34 = 53%: issue 16's 80% is not met yet.
EXPECTED_OVERALL = {True: (12, 34), False: (18, 34)}
