"""Per-block A/B of the fused CPU encoder blocks on the shapes the real architectures run (issue 16,
acceptance 3): every conv_pool2d / conv_bn_pool2d call that ``aefast.optimize`` makes in one training
forward of SegNet, U-Net and FCN-8s (bench/architectures.py, benchmark input shapes), found by
recording the aefast ops those optimized models dispatch, timed against

* eager channels_last: ``nn.Conv2d -> [nn.BatchNorm2d] -> ReLU -> max_pool2d(return_indices=True)``,
  module and input in channels_last (what the optimized model's layout pass gives eager ops), and
* eager NCHW, the same in the default layout,

forward (with autograd recording, as in training) and forward + backward (gradients of the input and
every parameter), in training mode. Printed as ratios: eager time / fused time (> 1: the fused block is
faster).

    python bench/bench_encoder_blocks.py [--threads 1] [--rounds 15] [--repeats 3] [--quick] [--arch NAME]
                                         [--env VAR=VALUE ...]

Timing is CPU time of this process (time.process_time) with one intra-op thread by default, in
interleaved rounds (each round times every variant once; the figure is the median over rounds): on
the shared 2-core machines wall time is quantised by CFS throttling, and the load hits every variant
of a round alike. Under load the ratios are directions, not measurements. ``--env`` sets an
environment variable of the CPU kernels' A/B switches (e.g. AEFAST_ENCODER_WINOGRAD=0) for the fused
variant only: the variant is then timed twice, without and with it, in the same rounds.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402
import architectures as A  # noqa: E402

import aefast  # noqa: E402
import aefast.functional as AF  # noqa: E402
import aefast.optimize  # noqa: E402,F401  (the module, for architecture_blocks)
from aefast.nn.conv_bn_pool import conv_bn_pool_with  # noqa: E402

ARCHS = ("segnet_functional", "unet", "fcn8s")
def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def architecture_blocks(archs, quick):
    """The distinct fused encoder calls of one optimized training forward of each architecture:
    {(with_bn, N, Cin, H, W, Cout, K, stride, padding, pool, pool_stride, ceil_mode, return_indices,
    index_format): [architectures]}, recorded by wrapping the two functions optimize() rewrites the
    sites onto (aefast.functional.conv_pool2d, conv_bn_pool_with) while the models are optimized and run."""
    found = []
    optimize_module = sys.modules["aefast.optimize"]
    plain, with_bn = AF.conv_pool2d, optimize_module.conv_bn_pool_with

    def record(bn, x, weight, stride, padding, pool_size, kw):
        pool = _pair(pool_size)
        found.append((bn, *x.shape[:2], *x.shape[2:], weight.shape[0], weight.shape[2], _pair(stride), _pair(padding),
                      pool, _pair(kw.get("pool_stride") or pool), bool(kw.get("ceil_mode", False)),
                      bool(kw.get("return_indices", True)), kw.get("index_format", "flat")))

    def plain_recorded(x, weight, bias, stride, padding, activation, pool_size, **kw):
        record(False, x, weight, stride, padding, pool_size, kw)
        return plain(x, weight, bias, stride, padding, activation, pool_size, **kw)

    def bn_recorded(bn, x, weight, bias, stride, padding, activation, pool_size, **kw):
        record(True, x, weight, stride, padding, pool_size, kw)
        return with_bn(bn, x, weight, bias, stride, padding, activation, pool_size, **kw)

    blocks = {}
    try:
        AF.conv_pool2d, optimize_module.conv_bn_pool_with = plain_recorded, bn_recorded
        for arch in archs:
            del found[:]
            model = aefast.optimize(A.build(arch), verbose=False)
            shape = A.ARCHITECTURES[arch][1 if quick else 2]
            model(torch.rand(shape).contiguous(memory_format=torch.channels_last))
            for key in found:
                blocks.setdefault(key, []).append(arch)
    finally:
        AF.conv_pool2d, optimize_module.conv_bn_pool_with = plain, with_bn
    return blocks


class _EagerBlock(nn.Module):
    """conv -> [BN] -> ReLU -> max_pool2d, as the original model runs the site."""

    def __init__(self, conv, bn, pool, pool_stride, ceil, with_indices, index_format):
        super().__init__()
        self.conv, self.bn = conv, bn
        self.pool, self.pool_stride, self.ceil = pool, pool_stride, ceil
        self.with_indices, self.index_format = with_indices, index_format

    def forward(self, x):
        y = self.conv(x)
        if self.bn is not None:
            y = self.bn(y)
        return F.max_pool2d(F.relu(y), self.pool, self.pool_stride, ceil_mode=self.ceil,
                            return_indices=self.with_indices)


class _FusedBlock(nn.Module):
    """The call aefast.optimize makes for the site (conv_bn_pool_with / AF.conv_pool2d)."""

    def __init__(self, conv, bn, pool, pool_stride, ceil):
        super().__init__()
        self.conv, self.bn = conv, bn
        self.pool, self.pool_stride, self.ceil = pool, pool_stride, ceil

    def forward(self, x):
        c = self.conv
        stride = None if self.pool_stride == self.pool else self.pool_stride
        kw = dict(return_indices=self.with_indices, index_format=self.index_format, pool_stride=stride,
                  ceil_mode=self.ceil)
        if self.bn is not None:
            return conv_bn_pool_with(self.bn, x, c.weight, c.bias, c.stride, c.padding, "relu", self.pool, **kw)
        return AF.conv_pool2d(x, c.weight, c.bias, c.stride, c.padding, "relu", self.pool, **kw)


def _variants(key):
    with_bn, n, cin, h, w, cout, k, stride, padding, pool, pool_stride, ceil, with_indices, index_format = key
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding)
    bn = nn.BatchNorm2d(cout) if with_bn else None
    x = torch.randn(n, cin, h, w, generator=torch.Generator().manual_seed(1))
    eager = _EagerBlock(conv, bn, pool, pool_stride, ceil, with_indices, index_format)
    eager_cl = copy.deepcopy(eager).to(memory_format=torch.channels_last)
    fused = copy.deepcopy(eager).to(memory_format=torch.channels_last)
    fused.__class__ = _FusedBlock
    x_cl = x.contiguous(memory_format=torch.channels_last)
    return {"eager_nchw": (eager, x), "eager_cl": (eager_cl, x_cl), "fused_cl": (fused, x_cl)}


def _step_fns(model, x, grad):
    x = x.detach().requires_grad_(True)
    params = list(model.parameters())

    def forward():
        return model(x)

    def full():
        y = _pooled(model(x))
        return torch.autograd.grad(y, [x, *params], grad)

    return forward, full


def _pooled(out):
    return out[0] if isinstance(out, tuple) else out


def _check(variants):
    """The fused block agrees with eager channels_last (indices exact, values to fp32 tolerance)."""
    want, got = [copy.deepcopy(variants[v][0])(variants[v][1]) for v in ("eager_cl", "fused_cl")]
    if not torch.allclose(_pooled(want), _pooled(got), rtol=1e-4, atol=1e-4) or (
            isinstance(want, tuple) and got[0].shape == want[0].shape and want[1].dtype == got[1].dtype
            and not torch.equal(want[1], got[1])):
        raise SystemExit("the fused block disagrees with eager")


class _Env:
    def __init__(self, assignments):
        self.assignments = assignments

    def __enter__(self):
        self.saved = {k: os.environ.get(k) for k in self.assignments}
        os.environ.update(self.assignments)

    def __exit__(self, *exc):
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def time_block(key, rounds, repeats, env):
    variants = _variants(key)
    _check(variants)
    with torch.no_grad():
        y = _pooled(variants["eager_cl"][0](variants["eager_cl"][1]))
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    fns = {}
    for name, (model, x) in variants.items():
        fwd, full = _step_fns(model, x, grad.contiguous(memory_format=torch.channels_last) if name != "eager_nchw"
                              else grad)
        fns[name] = ({}, fwd, full)
    if env:
        model, x = variants["fused_cl"]
        fwd, full = _step_fns(model, x, grad.contiguous(memory_format=torch.channels_last))
        fns["fused_cl+env"] = (env, fwd, full)
    times = {(name, kind): [] for name in fns for kind in ("fwd", "full")}
    for name, (assign, fwd, full) in fns.items():  # warm up (buffer caches, oneDNN primitives)
        with _Env(assign):
            fwd(), full(), full()
    for _ in range(rounds):
        for name, (assign, fwd, full) in fns.items():
            with _Env(assign):
                for kind, fn in (("fwd", fwd), ("full", full)):
                    t0 = time.process_time()
                    for _ in range(repeats):
                        fn()
                    times[(name, kind)].append((time.process_time() - t0) / repeats)
    return {k: statistics.median(v) for k, v in times.items()}


def describe(key):
    with_bn, n, cin, h, w, cout, k, stride, padding, pool, pool_stride, ceil, with_indices, index_format = key
    geo = f"pool{pool[0]}" + (f"/{pool_stride[0]}" if pool_stride != pool else "")
    return (f"{'conv_bn_pool' if with_bn else 'conv_pool   '} N{n} {cin:>2}->{cout:<2} {h}x{w} k{k} {geo}"
            f"{' ceil' if ceil else ''}{' idx:' + index_format if with_indices else ''}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="the architectures' small test shapes, 2 rounds")
    p.add_argument("--arch", action="append", choices=ARCHS)
    p.add_argument("--env", action="append", default=[], help="VAR=VALUE for an extra fused variant")
    H.add_allocator_flag(p)
    args = p.parse_args(argv)
    allocator = H.apply_allocator_flag(args)
    torch.set_num_threads(args.threads)
    env = dict(a.split("=", 1) for a in args.env)
    rounds, repeats = (2, 1) if args.quick else (args.rounds, args.repeats)
    blocks = architecture_blocks(args.arch or ARCHS, args.quick)
    print(f"torch {torch.__version__}, {args.threads} thread(s), CPU time, median of {rounds} interleaved rounds; "
          f"load {os.getloadavg()[0]:.2f}; {allocator}")
    cols = ["fwd cl/fused", "fwd nchw/fused", "full cl/fused", "full nchw/fused"]
    if env:
        cols += ["fwd env speedup", "full env speedup"]
    print(f"{'block':<52} {'archs':<30} fused fwd/full ms  " + "  ".join(cols))
    for key, archs in blocks.items():
        t = time_block(key, rounds, repeats, env)
        row = [t[("eager_cl", "fwd")] / t[("fused_cl", "fwd")], t[("eager_nchw", "fwd")] / t[("fused_cl", "fwd")],
               t[("eager_cl", "full")] / t[("fused_cl", "full")], t[("eager_nchw", "full")] / t[("fused_cl", "full")]]
        if env:
            row += [t[("fused_cl", "fwd")] / t[("fused_cl+env", "fwd")],
                    t[("fused_cl", "full")] / t[("fused_cl+env", "full")]]
        names = ",".join(sorted({a.replace("segnet_functional", "segnet") for a in archs}))
        print(f"{describe(key):<52} {names:<30} {1e3 * t[('fused_cl', 'fwd')]:6.2f}/{1e3 * t[('fused_cl', 'full')]:6.2f}"
              "  " + "  ".join(f"{v:>{len(c)}.2f}" for v, c in zip(row, cols)), flush=True)


if __name__ == "__main__":
    main()
