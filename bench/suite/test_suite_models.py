"""End-to-end benchmarks: one SGD training step (zero_grad, forward, loss, backward, step) and one
no-grad inference pass of ConvAutoencoder, ConvDenoisingAutoencoder, SegNetAutoencoder and
ConvVAE: the aefast model against its torch.nn reference twin (aefast/reference/models.py, same
weights) run eagerly and under torch.compile. Workloads: bench/workloads.py (MODEL_WORKLOADS; on --device cuda also GPU_MODEL_WORKLOADS, G1 and G2).

GFLOP/s are the dense FLOPs of the reference twin's step (torch.utils.flop_counter) per second,
for every variant: an effective rate for aefast, whose sparse kernels skip part of that work.
"""
from __future__ import annotations

import functools

from torch.utils.flop_counter import FlopCounterMode

import _suite as S
import workloads as W

MODES = ("train step", "inference")


def _build_model(spec, mode, variant, opts):
    _, name, kwargs, shape = spec
    x, target = W.model_inputs(shape, opts.device)
    reference, fast = W.model_pair(name, kwargs, opts.device)
    train = mode == "train step"
    dtype = opts.autocast_dtype
    with FlopCounterMode(display=False) as counter:  # the reference's dense FLOPs, every variant alike
        reference.train(train)
        step, infer = W.make_model_step(reference, W.model_reference_loss, name, x, target, dtype)
        (step if train else infer)()
    flops = counter.get_total_flops()
    if variant == S.EAGER:
        model, loss_fn = reference, W.model_reference_loss
    elif variant == S.COMPILE:
        model, loss_fn = opts.compile(reference), W.model_reference_loss
    else:
        model, loss_fn = fast, W.model_aefast_loss
    model.train(train)
    step, infer = W.make_model_step(model, loss_fn, name, x, target, dtype)
    return S.Workload(step if train else infer, flops, extra={"mode": mode, "model": name,
                                                               "input_shape": list(shape)})


def model_cases(opts):
    specs = W.MODEL_QUICK_WORKLOADS if opts.quick else W.MODEL_WORKLOADS
    if opts.device == "cuda" and not opts.quick:
        specs = specs + W.GPU_MODEL_WORKLOADS
    return [S.Case("model", f"model {spec[0]} {spec[1]} {mode}", v, functools.partial(_build_model, spec, mode, v))
            for spec in specs for mode in MODES for v in ("aefast", S.EAGER, S.COMPILE)]


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = model_cases(metafunc.config.stash[S.OPTS_KEY])
        metafunc.parametrize("case", cases, ids=[c.id for c in cases])


def test_model(bench, case):
    bench(case)
