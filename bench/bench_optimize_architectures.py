"""aefast.optimize on typical real architectures (bench/architectures.py: SegNet in two styles,
U-Net, FCN-8s, a conv VAE, two tutorial conv AEs): one CPU training step (forward, loss, backward,
SGD step) of the original model against the optimized copy (its layout pass on: memory_format="auto")
and against the original converted to channels_last by hand (model and input: how much of the gain is
the layout alone), measured in one run, with the fraction
of pool, unpool and upsampler sites optimize() fused (issue 16, acceptance point 3: >= 1.5x each).

    python bench/bench_optimize_architectures.py [--quick] [--keep-memory-mapped] [--arch NAME] [--out DIR]

Run it once with and once without --keep-memory-mapped (DESIGN.md: CPU ratios in both allocator
settings). The loss is the architectures' usual one, written in the training loop as their code
does, inside aefast.fused_losses() for both variants: MSE for the AEs (BCE-like sigmoid output
regressed to the input), MSE plus KL for the VAE, cross-entropy for the segmentation nets (which
fused_losses leaves to torch). Variants run in interleaved rounds (A B A B ...) so the load of a
shared machine hits both alike; the figure is each variant's best round median.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402
import architectures as A  # noqa: E402

import aefast  # noqa: E402

SEGMENTATION = ("segnet_functional", "segnet_sequential", "unet", "fcn8s")


def loss_of(name, result, x, labels):
    if name in SEGMENTATION:
        return F.cross_entropy(result, labels)
    if name == "conv_vae":
        out, mu, logvar = result
        kl = -0.5 * torch.mean(1 + logvar - mu.pow(2) - logvar.exp())
        return F.mse_loss(out, x) + kl
    return F.mse_loss(result, x)


def bench_architecture(name, shape, rounds, repeats, device):
    original = A.build(name).to(device)
    optimized = aefast.optimize(copy.deepcopy(original), verbose=False)
    counts = A.site_counts([r for r in optimized.aefast_rewrites if not r.startswith("(eval mode)")],
                           optimized.aefast_unfused)
    fused = sum(f for f, _ in counts.values())
    total = sum(t for _, t in counts.values())
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(shape, generator=gen).to(device)
    probe = A.outputs(copy.deepcopy(original).eval()(x))[0]
    labels = torch.randint(0, probe.shape[1], (probe.shape[0], *probe.shape[2:]), generator=gen).to(device)
    # The original with the whole model and its input in channels_last, as a user could do by hand:
    # it shows how much of aefast.optimize's figure is the layout (its own pass, memory_format="auto")
    # and how much the fusion.
    original_cl = copy.deepcopy(original).to(memory_format=torch.channels_last)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    steps = {}
    for variant, model, x_in in (("original (eager)", original, x),
                                 ("original, channels_last (eager)", original_cl, x_cl),
                                 ("aefast.optimize", optimized, x)):
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def train_step(model=model, opt=opt, x_in=x_in):
            opt.zero_grad(set_to_none=True)
            with aefast.fused_losses():
                loss = loss_of(name, model(x_in), x, labels)
            loss.backward()
            opt.step()

        steps[variant] = train_step
    times = {variant: [] for variant in steps}
    for _ in range(rounds):
        for variant, train_step in steps.items():
            times[variant].append(H.median_time(train_step, device, warmup=1, repeats=repeats))
    case = (f"{name} N{shape[0]} {shape[2]}x{shape[3]} ({fused}/{total} sites fused, "
            f"{optimized.aefast_memory_format})")
    return [H.Row(case, variant, min(times[variant]), H.peak_memory_bytes(train_step, device),
                  extra={"round_medians_s": times[variant], "site_counts": counts,
                         "rewrites": getattr(optimized if variant == "aefast.optimize" else original,
                                             "aefast_rewrites", []),
                         "unfused": optimized.aefast_unfused if variant == "aefast.optimize" else [],
                         "memory_format": (f"{optimized.aefast_memory_format}: {optimized.aefast_memory_format_reason}"
                                           if variant == "aefast.optimize" else None)})
            for variant, train_step in steps.items()], (fused, total)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu"], help="CPU only: the acceptance is the CPU step")
    parser.add_argument("--quick", action="store_true", help="tiny shapes (the tests' inputs), one round: a smoke run")
    parser.add_argument("--arch", action="append", choices=list(A.ARCHITECTURES), help="only this one (repeatable)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", default=None)
    H.add_allocator_flag(parser)
    args = parser.parse_args(argv)
    allocator = H.apply_allocator_flag(args)
    repeats = args.repeats or (2 if args.quick else 5)
    rounds = 1 if args.quick else 7
    rows, fused_total = [], [0, 0]
    for name in args.arch or A.ARCHITECTURES:
        _, test_shape, bench_shape = A.ARCHITECTURES[name]
        new_rows, (fused, total) = bench_architecture(name, test_shape if args.quick else bench_shape, rounds,
                                                      repeats, args.device)
        rows += new_rows
        fused_total[0] += fused
        fused_total[1] += total
    fraction = (f"sites fused in training mode, all architectures: {fused_total[0]}/{fused_total[1]}"
                f" = {fused_total[0] / max(fused_total[1], 1):.0%} (issue 16 target: >= 80%)")
    table = allocator + "\n\n" + H.ratio_table(rows, "original (eager)") + "\n\n" + fraction
    suffix = "_keep_mapped" if args.keep_memory_mapped else ""
    out = H.write_results(f"optimize_architectures_{args.device}{suffix}", rows, args.device, table, args.out)
    print(table)
    print(f"results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
