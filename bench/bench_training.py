"""End-to-end figures: one SGD training step (forward, loss, backward, optimizer.step) and one
inference pass of the conv autoencoders, aefast against its torch.nn reference twin (eager) and
torch.compile of that twin, measured in one run.

    python bench/bench_training.py [--device cuda] [--quick] [--bf16] [--keep-memory-mapped] [--out DIR]

W1: ConvAutoencoder 1x28x28, channels 32/64, batch 256, MSE.
W2: ConvAutoencoder 3x128x128, channels 32/64/128, batch 32, MSE.
Plus ConvDenoisingAutoencoder, SegNetAutoencoder and ConvVAE at the W1 size. GFLOP/s are the
dense FLOPs of the reference step (torch.utils.flop_counter) per second: for aefast that is an
effective rate, since its sparse kernels skip part of that work. The step rows carry no GB/s: a
whole step has no single minimum traffic worth quoting.

Then, per case, a per-kernel breakdown of the aefast and the eager training step (one profiled
step, the median of --breakdown-steps): per op its calls, time and share of the step, the FLOPs
it EXECUTES (aefast's sparse kernels: what they compute, not the dense count), GFLOP/s against
the fp32 GEMM peak and minimum bytes / GB/s against the copy bandwidth, both measured around the
profiled steps, and
which of the two limits binds (bench/_breakdown.py has the formulas and the rules).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.dirname(__file__))
import _breakdown as B  # noqa: E402
import _harness as H  # noqa: E402
import workloads as W  # noqa: E402  (the workloads, shared with the pytest-benchmark suite)

import aefast  # noqa: E402
from aefast.reference import models as ref_models  # noqa: E402


def workloads(quick: bool):
    # One tiny model for the quick run: its torch.compile (inductor) alone takes ~30 s on the
    # 2-core dev machine; the pytest-benchmark suite's smoke run covers the four tiny models.
    return W.MODEL_QUICK_WORKLOADS[:1] if quick else W.MODEL_WORKLOADS


reference_loss, aefast_loss, make_step = W.model_reference_loss, W.model_aefast_loss, W.make_model_step


def run(args) -> tuple[list[H.Row], list[dict]]:
    device = args.device
    dtype = torch.bfloat16 if args.bf16 else None
    rows: list[H.Row] = []
    breakdowns: list[dict] = []
    for case, name, kwargs, shape in workloads(args.quick):
        x, target = W.model_inputs(shape, device)
        reference, fast = W.model_pair(name, kwargs, device)
        variants = {"eager": (reference, reference_loss), "aefast": (fast, aefast_loss)}
        if not args.no_compile:
            mode = "max-autotune" if device == "cuda" else None
            compiled_ref = getattr(ref_models, name)(**kwargs).to(device)
            compiled_ref.load_state_dict(reference.state_dict())
            variants["torch.compile"] = (torch.compile(compiled_ref, mode=mode), reference_loss)
        with FlopCounterMode(display=False) as counter:
            make_step(reference, reference_loss, name, x, target, dtype)[0]()
        step_flops = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            make_step(reference, reference_loss, name, x, target, dtype)[1]()
        infer_flops = counter.get_total_flops()
        # Warm up (and compile) every variant, then time them interleaved, one call each per
        # round, so that load from other processes spreads evenly over the variants.
        timed = []  # (label, variant, fn, flops, model, train)
        for variant, (model, loss_fn) in variants.items():
            step, infer = make_step(model, loss_fn, name, x, target, dtype)
            for what, fn, flops, train in (("train step", step, step_flops, True),
                                           ("inference", infer, infer_flops, False)):
                label = f"{case} {what}"
                model.train(train)
                try:
                    fn()
                    fn()
                    timed.append((label, variant, fn, flops, model, train))
                except Exception as exc:  # noqa: BLE001 - a failure is a figure too
                    reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:200]
                    rows.append(H.Row(label, variant + " FAILED", float("nan"), 0, extra={"error": reason}))
                    print(f"{label} {variant}: FAILED: {reason}", file=sys.stderr)
        samples = {id(t): [] for t in timed}
        faults = dict.fromkeys(samples, 0)
        for _ in range(args.repeats):
            for t in timed:
                t[4].train(t[5])
                before = H.minor_faults()
                samples[id(t)].append(H.median_time(t[2], device, warmup=0, repeats=1))
                faults[id(t)] += H.minor_faults() - before
        for t in timed:
            label, variant, fn, flops, model, train = t
            model.train(train)
            seconds = sorted(samples[id(t)])[len(samples[id(t)]) // 2]
            rows.append(H.Row(label, variant, seconds, H.peak_memory_bytes(fn, device), flops=flops,
                              extra={"minor_faults_per_call": faults[id(t)] / args.repeats}))
        # Per-kernel breakdown of the training step, aefast then eager (after the timing, so that
        # the profiler's overhead never reaches the timed figures).
        for variant in ("aefast", "eager"):
            if not args.breakdown_steps:
                break
            t = next((t for t in timed if t[1] == variant and t[5]), None)
            if t is None:
                continue
            t[4].train(True)
            b = B.profile_breakdown(t[2], steps=args.breakdown_steps, device=device, dtype=dtype, warmup=0)
            breakdowns.append({"case": t[0], "variant": variant, **b.as_dict(),
                               "table": B.breakdown_table(f"{t[0]}, {variant}", b)})
    return rows, breakdowns


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, a few iterations (CI smoke run)")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--out", default=None, help="output directory (default bench/out)")
    H.add_allocator_flag(parser)
    parser.add_argument("--breakdown-steps", type=int, default=3,
                        help="profiled training steps per breakdown (the median one is shown); 0: no breakdown")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 5
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
    allocator = H.apply_allocator_flag(args)
    # The GEMM peak of the step rows is measured in this run, around the timings (the
    # breakdowns measure their own limits around the profiled steps).
    (rows, breakdowns), peak, _, limits_line = H.cpu_limits_around(lambda: run(args), args.device)
    table = H.ratio_table(rows, "eager", peak_gflops=peak)
    if limits_line:
        table = limits_line + "\n\n" + table
    faults = "; ".join(f"{r.case} {r.variant} {r.extra['minor_faults_per_call']:.0f}" for r in rows
                       if "minor_faults_per_call" in r.extra and r.variant in ("eager", "aefast"))
    table = f"{allocator}\nminor page faults per call: {faults}\n\n" + table
    if breakdowns:
        table += ("\n\n## Per-kernel breakdown of the training step\n\n" + B.BREAKDOWN_LEGEND + "\n\n"
                  + "\n\n".join(b["table"] for b in breakdowns))
    name = "training" + ("_bf16" if args.bf16 else "") + ("_" + args.device)
    out = H.write_results(name, rows, args.device, table, args.out,
                          extra={"breakdowns": [{k: v for k, v in b.items() if k != "table"} for b in breakdowns]})
    print(table)
    print(f"results in {out}; aefast backends: {aefast.info()['backends']['cpu']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
