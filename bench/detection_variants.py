"""The detection variant table: decoders, training corruptions, scores, width/depth/epochs.

Every variant is trained with each seed on the same defect-free training images and scored on the
same validation and test splits (aefast.data.defect_splits); the models are selected on the
validation columns only. Each trained model is scored by every scorer in SCORERS (they need no
retraining), so one training gives several rows.

    nice python bench/detection_variants.py --data mnist --out bench/results/detection_variants_mnist.json
    nice python bench/detection_variants.py --data textures_hard --group core

Writes JSON (every seed's numbers) and a markdown table beside it; rows print as they finish, and
the JSON is rewritten after each training, so an interrupted run keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from aefast.data import defect_splits
from aefast.tasks import AnomalyMap, DetectorVariant, SeedSummary, split_metrics

SCORERS = {
    "mse mean": AnomalyMap("mse"),
    "mse smoothed, top 2%": AnomalyMap("mse", sigma=1.0, top_fraction=0.02),
    "ssim, top 2%": AnomalyMap("ssim", top_fraction=0.02),
}
# scorers added after the first runs; --extra-scorers scores with them too (rows only where measured)
EXTRA_SCORERS = {"mse smoothed (sigma 2), top 1%": AnomalyMap("mse", sigma=2.0, top_fraction=0.01)}
# a finer scorer sweep on one model (--scorer-sweep)
SWEEP_SCORERS = {
    "mse smoothed (sigma 2), top 1%": AnomalyMap("mse", sigma=2.0, top_fraction=0.01),
    "mse smoothed (sigma 2), max": AnomalyMap("mse", sigma=2.0, top_fraction=1e-9),
    "mse smoothed (sigma 2), top 0.5%": AnomalyMap("mse", sigma=2.0, top_fraction=0.005),
    "mse smoothed (sigma 3), top 1%": AnomalyMap("mse", sigma=3.0, top_fraction=0.01),
    "mse smoothed (sigma 1.5), top 1%": AnomalyMap("mse", sigma=1.5, top_fraction=0.01),
    "mse smoothed (sigma 2), top 3%": AnomalyMap("mse", sigma=2.0, top_fraction=0.03),
}
SCORERS_FINAL = {k: SWEEP_SCORERS[k] for k in ("mse smoothed (sigma 2), top 1%", "mse smoothed (sigma 2), top 3%")}

BASE = DetectorVariant(channels=(16, 32), epochs=3)

GROUPS = {
    # decoders x the training corruptions that matter most
    "core": [BASE.replace(index_reuse=r, corruption=c) for r in ("all", "deepest", "none")
             for c in ("none", "inpaint", "synthetic")],
    # the per-pixel corruptions of denoising autoencoders, with the deepest-indices decoder
    "noise": [BASE.replace(index_reuse="deepest", corruption=c, level=lv)
              for c, lv in (("gaussian", 0.3), ("masking", 0.3), ("salt_pepper", 0.2))],
    # width, depth and epochs around the synthetic-anomaly, deepest-indices model
    "size": [BASE.replace(index_reuse="deepest", corruption="synthetic", **kw)
             for kw in (dict(channels=(32, 64)), dict(channels=(16, 32, 32)), dict(epochs=6))],
    # the demo's budget (about 25 s a seed on 2 quiet cores): twice the width and epochs of BASE
    "wide": [BASE.replace(channels=(32, 64), epochs=6, index_reuse=r, corruption="synthetic")
             for r in ("deepest", "all", "none")],
    "best": [BASE.replace(channels=(32, 64), epochs=6, index_reuse="deepest", corruption="synthetic")],
    "best_batch32": [BASE.replace(channels=(32, 64), epochs=6, index_reuse="deepest", corruption="synthetic",
                                  batch_size=32)],
    "wide_level": [BASE.replace(channels=(32, 64), epochs=6, index_reuse="deepest", corruption="synthetic", level=0.5)],
    "wide_deepest_3": [BASE.replace(channels=(32, 64), epochs=3, index_reuse="deepest", corruption="synthetic")],
    # the smaller grid run on textures_hard
    "decoders": [BASE.replace(index_reuse=r, corruption=c) for r in ("all", "deepest", "none")
                 for c in ("none", "synthetic")],
}


def run(variants, data, seeds, limit, out, threads):
    if threads:
        torch.set_num_threads(threads)
    splits = defect_splits(data, seed=0, limit=limit)
    rows = json.load(open(out)) if os.path.exists(out) else []
    done = {(json.dumps(r["variant"], sort_keys=True), r["scorer"]) for r in rows}
    print(f"{data}: {len(splits.train)} training images, {len(splits.val)} validation / {len(splits.test)} test "
          f"({int(splits.test.labels.sum())} defective), seeds {seeds}, torch threads {torch.get_num_threads()}, "
          f"load {os.getloadavg()[0]:.1f}", flush=True)
    for v in variants:
        key = json.dumps(v.as_dict(), sort_keys=True)
        if all((key, s) in done for s in SCORERS):
            continue
        summaries = {s: (SeedSummary(), SeedSummary()) for s in SCORERS}
        seconds = []
        for seed in seeds:
            t0 = time.perf_counter()
            detector, _ = v.train(splits.train, seed=seed)
            seconds.append(time.perf_counter() - t0)
            for name, scorer in SCORERS.items():
                detector.scorer = scorer
                summaries[name][0].add(split_metrics(detector, splits.val))
                summaries[name][1].add(split_metrics(detector, splits.test))
        for name, (val, test) in summaries.items():
            rows.append({"variant": v.as_dict(), "describe": v.describe_model(), "scorer": name, "val": val.as_dict(),
                         "test": test.as_dict(), "train_seconds": seconds, "load": os.getloadavg()[0]})
            print(f"{v.describe_model():60s} | {name:22s} | val {val.mean('image_auroc'):.3f} {val.mean('pixel_auroc'):.3f} "
                  f"{val.mean('aupro'):.3f} | test {test.mean('image_auroc'):.3f} {test.mean('pixel_auroc'):.3f} "
                  f"{test.mean('aupro'):.3f} | {sum(seconds) / len(seconds):.0f} s/seed", flush=True)
        with open(out, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


def selection_score(row):
    """What the table selects on: the mean of the three validation metrics over seeds."""
    return sum(row["val"][k]["mean"] for k in ("image_auroc", "pixel_auroc", "aupro")) / 3


def _variant(row):
    v = dict(row["variant"])
    v["channels"] = tuple(v["channels"])
    return DetectorVariant(**v)


def markdown(rows, data):
    best = max(rows, key=selection_score)
    lines = [f"Defect detection variants on `{data}` (validation selects; test is reported). Mean ± sample std "
             "over the seeds; 'sel' = mean of the three validation metrics. Best on validation marked **best**.", "",
             "| variant | score | val image AUROC | val pixel AUROC | val AUPRO | sel | test image AUROC | "
             "test pixel AUROC | test AUPRO | train s/seed (load) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def cell(split, k):
            return f"{r[split][k]['mean']:.3f} ± {r[split][k]['std']:.3f}"
        mark = " **best**" if r is best else ""
        secs = sum(r["train_seconds"]) / len(r["train_seconds"])
        lines.append(f"| {_variant(r).describe_model()}{mark} | {r['scorer']} | {cell('val', 'image_auroc')} | "
                     f"{cell('val', 'pixel_auroc')} | {cell('val', 'aupro')} | {selection_score(r):.3f} | "
                     f"{cell('test', 'image_auroc')} | {cell('test', 'pixel_auroc')} | {cell('test', 'aupro')} | "
                     f"{secs:.0f} ({r['load']:.0f}) |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="mnist", choices=("mnist", "textures_hard", "textures"))
    p.add_argument("--group", action="append", choices=sorted(GROUPS), help="variant groups (default: all)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--limit", type=int, default=2000, help="training images (default 2000, as aefast demo)")
    p.add_argument("--epochs", type=int, default=None, help="override every variant's epochs (smoke runs)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--extra-scorers", action="store_true", help="also score with EXTRA_SCORERS")
    p.add_argument("--scorer-sweep", action="store_true", help="score with SWEEP_SCORERS only")
    p.add_argument("--final-scorers", action="store_true", help="score with the sweep's two best only")
    p.add_argument("--table", nargs="+", default=None, metavar="JSON",
                   help="only write the markdown table of these result files (merged) to --out")
    args = p.parse_args(argv)
    if args.table:
        rows, seen = [], set()
        for path in args.table:            # the same variant and scorer measured twice: keep the first
            for r in json.load(open(path)):
                key = (json.dumps(r["variant"], sort_keys=True), r["scorer"])
                if key not in seen:
                    seen.add(key)
                    rows.append(r)
        with open(args.out, "w") as f:
            f.write(markdown(rows, args.data))
        print(f"wrote {args.out}: best on validation: {_variant(max(rows, key=selection_score)).describe_model()}, "
              f"score {max(rows, key=selection_score)['scorer']}")
        return
    out = args.out or f"bench/out/detection_variants_{args.data}.json"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    if args.extra_scorers:
        SCORERS.update(EXTRA_SCORERS)
    if args.scorer_sweep:
        SCORERS.clear()
        SCORERS.update(SWEEP_SCORERS)
    if args.final_scorers:
        SCORERS.clear()
        SCORERS.update(SCORERS_FINAL)
    variants = []
    for g in args.group or ("core", "noise", "size"):
        variants += [v for v in GROUPS[g] if v not in variants]
    if args.epochs:
        variants = [v.replace(epochs=args.epochs) for v in variants]
    rows = run(variants, args.data, list(range(args.seeds)), args.limit, out, args.threads)
    md = out.rsplit(".", 1)[0] + ".md"
    with open(md, "w") as f:
        f.write(markdown(rows, args.data))
    print(f"wrote {out}, {md}")


if __name__ == "__main__":
    main()
