"""The ``aefast`` command line (also ``python -m aefast``).

    aefast demo                 the main job: denoising conv AE on the embedded digits, defect
                                detection, speed against the torch.nn twin, PNGs (about 2 min on 2 cores)
    aefast train   --model M --data D     train any model; checkpoints, --resume
    aefast detect  --model M --data D     defect detection: image/pixel AUROC, AUPRO, best-F1 threshold
    aefast export  --weights model.pt     the model's torch.nn twin as ONNX / torch.export / TorchScript
    aefast segment --model M --data D     segmentation: IoU, Dice
    aefast reduce  --model M --data D     dimensionality reduction, compared with PCA
    aefast info                 build and backends

Bad arguments and files exit with status 2 and one clear message, never a traceback.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time

MODEL_NAMES = ("linear", "deep", "dae", "sdae", "conv", "conv_dae", "segnet", "fcn", "vae", "conv_vae")
SEGMENTATION_MODELS = ("segnet", "fcn")
DATA_NAMES = ("mnist", "digits", "textures", "textures_hard", "shapes")
DETECT_DATA = ("textures", "textures_hard", "mnist", "digits")
INPUT_SHAPES = {"mnist": (1, 28, 28), "digits": (1, 8, 8), "textures": (1, 32, 32), "textures_hard": (1, 32, 32),
                "shapes": (1, 32, 32)}


class UsageError(ValueError):
    """A problem with what the user asked for (reported with exit status 2)."""


# ================================================================ argument types

def _number_type(parse, accepts, expected):
    """An argparse type: ``parse(text)`` (int or float), kept if ``accepts(value)``, else the error
    'expected <expected>, got <text>'."""
    def convert(text):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not accepts(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value
    return convert


_positive_int = _number_type(int, lambda v: v >= 1, "a positive integer")
_nonneg_int = _number_type(int, lambda v: v >= 0, "a non-negative integer")
# NaN fails both comparisons, so it is refused with the others.
_positive_float = _number_type(float, lambda v: v > 0 and v != float("inf"), "a positive number")
_level = _number_type(float, lambda v: v >= 0, "a number >= 0")


def _widths(text):
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers such as 16,32, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers such as 16,32, got {text!r}")
    return values


# ================================================================ shared setup

def _setup(args):
    import torch

    import aefast

    if args.backend != "auto":
        aefast.set_backend(args.backend)  # BackendUnavailableError says why it cannot run
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: torch.cuda.is_available() is False on this machine")
    if args.threads:
        torch.set_num_threads(args.threads)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out!r} exists and is not a directory")
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)


def _load_data(args, name=None):
    from aefast import data

    name = name or args.data
    limit = getattr(args, "limit", None)
    if name == "mnist":
        return data.load_mnist(seed=args.seed, limit=limit)
    if name == "digits":
        return data.load_digits(seed=args.seed, limit=limit)
    n_train = limit or 800
    # textures: half the test surfaces carry a defect, and the test split is halved again into
    # validation (threshold) and test, so it is kept larger than the shapes' test split
    n_test = max(40, n_train // 2) if name.startswith("textures") else max(20, n_train // 4)
    if name == "textures":
        return data.make_textures(n_train=n_train, n_test=n_test, seed=args.seed)
    if name == "textures_hard":
        return data.make_hard_textures(n_train=n_train, n_test=n_test, seed=args.seed)
    return data.make_shapes(n_train=n_train, n_test=n_test, seed=args.seed)


def _model_kwargs(name, ds, args):
    c, h, w = ds.train.images.shape[1:]
    features = c * h * w
    latent = getattr(args, "latent", None)
    hidden = getattr(args, "hidden", None)
    channels = getattr(args, "channels", None)
    noise = {}
    if getattr(args, "corruption", None):
        noise["corruption"] = args.corruption
    if getattr(args, "level", None) is not None:
        noise["level"] = args.level
    if name == "linear":
        return dict(in_features=features, latent_features=latent or 8)
    if name == "deep":
        return dict(in_features=features, hidden=hidden or (128,), latent_features=latent or 16)
    if name == "dae":
        return dict(in_features=features, hidden=hidden or (256,), latent_features=latent or 64, **noise)
    if name == "sdae":
        hid = hidden or (128, 32)
        if latent:
            hid = (*hid[:-1], latent)
        return dict(in_features=features, hidden=hid, **noise)
    if name in ("conv", "conv_dae"):
        kw = dict(in_channels=c, channels=channels or (16, 32))
        if getattr(args, "index_reuse", None):
            kw["index_reuse"] = args.index_reuse
        return dict(kw, **noise) if name == "conv_dae" else kw
    if name == "segnet":
        return dict(in_channels=c, num_classes=1, channels=channels or (16, 32))
    if name == "fcn":
        return dict(in_channels=c, num_classes=1, channels=channels or (16, 32, 64))
    if name == "vae":
        return dict(in_features=features, hidden=hidden or (256,), latent_features=latent or 16)
    return dict(in_channels=c, channels=channels or (16, 32), latent_features=latent or 16, input_size=(h, w))


def _build_model(name, ds, args, kwargs=None):
    import torch

    from aefast.models import MODELS

    if name in SEGMENTATION_MODELS and ds.train.masks is None:
        raise UsageError(f"--model {name} segments and needs masks: use --data shapes")
    kwargs = kwargs or _model_kwargs(name, ds, args)
    depth = len(kwargs.get("channels", ()))
    if depth and min(ds.train.images.shape[-2:]) < 2 ** depth:
        raise UsageError(f"--channels {kwargs['channels']}: {depth} pooling stages need images of at least "
                         f"{2 ** depth}x{2 ** depth}; {args.data} images are {tuple(ds.train.images.shape[-2:])}")
    torch.manual_seed(args.seed)
    return MODELS[name](**kwargs), kwargs


def _save_model(path, name, kwargs, data_name, model, **extra):
    from aefast.training import save_checkpoint

    save_checkpoint(path, {"aefast_model": 1, "name": name, "kwargs": kwargs, "data": data_name,
                           "state_dict": model.state_dict(), **extra})


def _load_model(path, args):
    import torch

    from aefast.models import MODELS

    if not os.path.isfile(path):
        raise UsageError(f"--weights {path!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise UsageError(f"--weights {path!r} is not a readable model file ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("aefast_model") != 1 or state.get("name") not in MODELS:
        raise UsageError(f"--weights {path!r} is not a model.pt written by `aefast train`")
    if state["name"] != args.model:
        raise UsageError(f"--weights {path!r} holds a {state['name']!r} model, but --model is {args.model!r}")
    model = MODELS[state["name"]](**state["kwargs"])
    try:
        model.load_state_dict(state["state_dict"])
    except RuntimeError as exc:
        raise UsageError(f"--weights {path!r} does not fit the model: {exc}") from None
    return model, state


def _train(args, ds, model, kwargs, targets=None, tag="train"):
    """fit() with the run's checkpoint in --out; returns the FitResult."""
    from aefast.training import fit

    config = {"model": args.model, "data": args.data, "limit": getattr(args, "limit", None), "kwargs": repr(kwargs),
              "command": args.command}
    return fit(model, ds.train.images, targets, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
               seed=args.seed, device=args.device, checkpoint=os.path.join(args.out, "checkpoint.pt"),
               resume=getattr(args, "resume", False), checkpoint_every=getattr(args, "checkpoint_every", 0),
               max_steps=getattr(args, "max_steps", None), progress=not args.no_progress, desc=tag, config=config)


def _stopped(res, args):
    print(f"stopped after {res.steps} steps (--max-steps); checkpoint {os.path.join(args.out, 'checkpoint.pt')}; "
          f"continue with the same command and --resume")
    return 0


def _test_mse(model, images, device):
    from aefast.tasks import anomaly_scores

    return float(anomaly_scores(model, images, device=device).mean())


# ================================================================ train

def _cmd_train(args) -> int:
    import torch

    from aefast import _plots
    from aefast.tasks import evaluate_segmentation

    _setup(args)
    ds = _load_data(args)
    model, kwargs = _build_model(args.model, ds, args)
    seg = args.model in SEGMENTATION_MODELS
    print(f"aefast train: {args.model} {kwargs} on {args.data} ({len(ds.train)} train / {len(ds.test)} test), "
          f"{args.epochs} epochs, batch {args.batch_size}, lr {args.lr}, seed {args.seed}")
    curves = {}
    if args.model == "sdae" and not args.resume:
        hist = model.pretrain(ds.train.images, epochs=args.pretrain_epochs, batch_size=args.batch_size, lr=args.lr,
                              seed=args.seed, progress=not args.no_progress)
        for k, losses in enumerate(hist):
            print(f"  pretraining layer {k + 1}: denoising loss {losses[0]:.5f} (init) -> {losses[-1]:.5f} "
                  f"after {args.pretrain_epochs} epochs")
            curves[f"pretrain layer {k + 1}"] = losses[1:]
    res = _train(args, ds, model, kwargs, ds.train.masks if seg else None)
    if not res.finished:
        return _stopped(res, args)
    curves["fine-tune" if args.model == "sdae" else args.model] = res.history
    step_curves = {"fine-tune" if args.model == "sdae" else args.model: res.step_losses}
    _save_model(os.path.join(args.out, "model.pt"), args.model, kwargs, args.data, model)
    print(f"final train loss {res.history[-1]:.6f} after {res.steps} steps")
    if seg:
        print("test " + evaluate_segmentation(model, ds.test, device=args.device).summary())
    else:
        print(f"test reconstruction MSE {_test_mse(model, ds.test.images, args.device):.6f}")
    if args.model == "sdae":
        mse_pre = _test_mse(model, ds.test.images, args.device)
        base, _ = _build_model("sdae", ds, args, kwargs)
        from aefast.training import fit

        torch.manual_seed(args.seed)
        base_res = fit(base, ds.train.images, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                       seed=args.seed, device=args.device, progress=not args.no_progress, desc="no-pretraining")
        curves["fine-tune, no pretraining"] = base_res.history
        mse_base = _test_mse(base, ds.test.images, args.device)
        print(f"fine-tuned test MSE with layer-wise pretraining {mse_pre:.6f}, without pretraining {mse_base:.6f}")
    path = _plots.loss_curve(curves, os.path.join(args.out, "loss_curve.png"), f"aefast train {args.model} on {args.data}",
                             steps=step_curves)
    print(f"wrote {os.path.join(args.out, 'model.pt')}, {path}")
    return 0


# ================================================================ detect

def _anomaly_png(detector, split, path, n=8, device="cpu", title=None):
    """Defective test images (and two defect-free ones) with their masks, reconstructions and maps."""
    import torch

    from aefast import _plots
    from aefast.tasks import detect

    bad = torch.nonzero(split.labels == 1).flatten()[: n - 2]
    good = torch.nonzero(split.labels == 0).flatten()[:2]
    idx = torch.cat([bad, good])
    recon, maps, scores = detect(detector, split.images[idx], device=device)
    rows = {"input": split.images[idx], "defect mask": split.masks[idx], "reconstruction": recon.clamp(0, 1),
            "anomaly map": maps}
    title = title or "anomaly maps (last two are defect-free)"
    title += "; image scores " + " ".join(f"{v:.3g}" for v in scores.tolist())
    return _plots.image_rows(rows, path, title, vmax=float(maps.max()))


def _scorer_args(args):
    from aefast.tasks import AnomalyMap

    top = None if args.top_fraction == 0 else args.top_fraction
    return AnomalyMap(args.map, args.sigma, top), {"kind": args.map, "sigma": args.sigma, "top_fraction": top}


def _cmd_detect(args) -> int:
    from aefast import _plots
    from aefast.data import defect_splits
    from aefast.tasks import Detector, RestorationObjective, evaluate_anomaly

    _setup(args)
    if args.model in SEGMENTATION_MODELS:
        raise UsageError(f"--model {args.model} segments; detect needs a reconstruction model")
    if args.data == "shapes":
        raise UsageError("--data shapes has no defects; use textures, textures_hard, mnist or digits")
    splits = defect_splits(args.data, seed=args.seed, limit=args.limit)
    ds = _Train(splits.train)
    scorer, scorer_config = _scorer_args(args)
    if args.weights:
        model, _ = _load_model(args.weights, args)
        print(f"aefast detect: {args.model} from {args.weights}")
    else:
        model, kwargs = _build_model(args.model, ds, args)
        train = args.train_corruption
        print(f"aefast detect: training {args.model} {kwargs} on defect-free {args.data} ({len(splits.train)} images), "
              f"training corruption {train}" + (f" {args.train_level}" if args.train_level else ""))
        objective = RestorationObjective(model, train, args.train_level or 0.0)
        res = _train(args, ds, objective, kwargs)
        if not res.finished:
            return _stopped(res, args)
        print(f"final train loss {res.history[-1]:.6f}")
        _plots.loss_curve({args.model: res.history}, os.path.join(args.out, "loss_curve.png"))
        _save_model(os.path.join(args.out, "detector.pt"), args.model, kwargs, args.data, model,
                    scorer=scorer_config, input_shape=tuple(splits.train.shape[1:]))
    detector = Detector(model, scorer)
    report = evaluate_anomaly(detector, splits.val, splits.test, device=args.device)
    print(f"defect detection on {len(splits.test)} test images ({int(splits.test.labels.sum())} defective), "
          f"{scorer.extra_repr()}, threshold from {len(splits.val)} validation images:")
    print("  " + report.summary())
    path = _anomaly_png(detector, splits.test, os.path.join(args.out, "anomaly_maps.png"), device=args.device)
    print(f"wrote {path}" + ("" if args.weights else f", {os.path.join(args.out, 'detector.pt')} (aefast export "
                                                        f"--weights {os.path.join(args.out, 'detector.pt')})"))
    return 0


class _Train:
    """What _build_model and _train read from a data set: ``train.images`` (and ``train.masks``)."""

    def __init__(self, images):
        from aefast.data import Split

        self.train = Split(images, None, None)


# ================================================================ export

def _cmd_export(args) -> int:
    import torch

    from aefast.export import FILE_NAMES, export_detector, twin_detector
    from aefast.models import MODELS
    from aefast.tasks import AnomalyMap, Detector

    if not os.path.isfile(args.weights):
        raise UsageError(f"--weights {args.weights!r} does not exist")
    try:
        state = torch.load(args.weights, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise UsageError(f"--weights {args.weights!r} is not a readable model file ({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("aefast_model") != 1 or state.get("name") not in MODELS:
        raise UsageError(f"--weights {args.weights!r} is not a model file written by `aefast train` or `aefast detect`")
    name, kwargs = state["name"], state["kwargs"]
    if args.input_size:
        shape = (kwargs.get("in_channels", 1), *args.input_size)
    elif state.get("input_shape"):
        shape = tuple(state["input_shape"])
    elif state.get("data") in INPUT_SHAPES:
        shape = INPUT_SHAPES[state["data"]]
    else:
        raise UsageError("--input-size H,W is needed: the model file does not say its image size")
    if args.map is not None:
        scorer = AnomalyMap(args.map, args.sigma or 0.0, args.top_fraction or None)
    else:
        scorer = AnomalyMap(**state.get("scorer", {}))
    exported = twin_detector(name, kwargs, state["state_dict"], scorer)
    g = torch.Generator().manual_seed(0)
    example = torch.rand((4, *shape), generator=g)
    formats = tuple(dict.fromkeys(args.format or ("onnx", "torch_export")))
    os.makedirs(args.out, exist_ok=True)
    paths = export_detector(exported, example, args.out, formats)
    print(f"aefast export: {name} {kwargs}, the torch.nn twin with {scorer.extra_repr()}, input (N, {', '.join(map(str, shape))})")
    # Round trip: the exported files against aefast's fused model on the same images.
    fused = MODELS[name](**kwargs)
    fused.load_state_dict(state["state_dict"])
    reference = Detector(fused, scorer).eval()
    with torch.no_grad():
        want = [t.numpy() for t in reference(example)]
    for fmt, path in paths.items():
        got = _run_exported(fmt, path, example)
        if got is None:
            print(f"  {fmt:12s} {path}  (onnxruntime is not installed: not checked)")
            continue
        diff = max(float(abs(g_ - w_).max()) for g_, w_ in zip(got, want))
        print(f"  {fmt:12s} {path}  max |exported - aefast| over reconstruction, map, score = {diff:.2e}")
    print(f"files: {', '.join(FILE_NAMES[f] for f in formats)}; outputs (reconstruction, anomaly_map, score)")
    return 0


def _run_exported(fmt, path, example):
    import torch

    if fmt == "onnx":
        try:
            import onnxruntime
        except ImportError:
            return None
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: example.numpy()})
    module = torch.export.load(path).module() if fmt == "torch_export" else torch.jit.load(path)
    with torch.no_grad():
        return [t.numpy() for t in module(example)]


# ================================================================ segment

def _cmd_segment(args) -> int:
    from aefast import _plots
    from aefast.tasks import evaluate_segmentation, predict_masks

    _setup(args)
    if args.model not in SEGMENTATION_MODELS:
        raise UsageError(f"--model must be one of {SEGMENTATION_MODELS} for segment, got {args.model!r}")
    ds = _load_data(args)
    if args.weights:
        model, _ = _load_model(args.weights, args)
    else:
        model, kwargs = _build_model(args.model, ds, args)
        print(f"aefast segment: training {args.model} {kwargs} on {args.data} ({len(ds.train)} images)")
        res = _train(args, ds, model, kwargs, ds.train.masks)
        if not res.finished:
            return _stopped(res, args)
        print(f"final train loss {res.history[-1]:.6f}")
        _plots.loss_curve({args.model: res.history}, os.path.join(args.out, "loss_curve.png"))
    report = evaluate_segmentation(model, ds.test, device=args.device)
    print(f"segmentation of {len(ds.test)} test images: " + report.summary())
    pred = predict_masks(model, ds.test.images[:8], device=args.device)
    path = _plots.image_rows({"input": ds.test.images[:8], "true mask": ds.test.masks[:8],
                              "predicted mask": pred.float()}, os.path.join(args.out, "segmentation.png"),
                             f"{args.model}: mean IoU {report.mean_iou:.3f}")
    print(f"wrote {path}")
    return 0


# ================================================================ reduce

def _cmd_reduce(args) -> int:
    import numpy as np

    from aefast import _plots
    from aefast.tasks import codes, compare_with_pca, fit_linear_autoencoder

    _setup(args)
    if args.model in SEGMENTATION_MODELS:
        raise UsageError(f"--model {args.model} segments; reduce needs an autoencoder")
    ds = _load_data(args)
    if args.weights:
        model, _ = _load_model(args.weights, args)
    else:
        model, kwargs = _build_model(args.model, ds, args)
        print(f"aefast reduce: {args.model} {kwargs} on {args.data} ({len(ds.train)} train images)")
        if args.model == "linear":
            loss = fit_linear_autoencoder(model, ds.train.images.to(args.device))
            print(f"full-batch L-BFGS: train MSE {loss:.6f}")
        else:
            res = _train(args, ds, model, kwargs)
            if not res.finished:
                return _stopped(res, args)
            print(f"final train loss {res.history[-1]:.6f}")
    cmp = compare_with_pca(model, ds.train.images, ds.test.images, device=args.device) \
        if getattr(model, "latent_features", None) else None
    if cmp is not None:
        print(cmp.summary())
        if cmp.angles_deg is not None:
            print("principal angles to PCA (deg): " + " ".join(f"{a:.3f}" for a in cmp.angles_deg))
    z = codes(model, ds.test.images, device=args.device).numpy()
    np.savez(os.path.join(args.out, "codes.npz"), codes=z, labels=ds.test.labels.numpy())
    print(f"codes: {z.shape[0]} test items x {z.shape[1]} dims -> {os.path.join(args.out, 'codes.npz')}")
    if z.shape[1] >= 2:
        path = _plots.scatter_codes(z[:, :2], ds.test.labels.numpy(), os.path.join(args.out, "codes.png"),
                                    f"{args.model} codes, first two dims, coloured by label")
        print(f"wrote {path}")
    return 0


# ================================================================ demo

def _interleaved_step_times(models, batch, steps, seed, warmup=2):
    """Median seconds of one training step (forward, fused loss, backward, Adam) for each model.
    The models' steps alternate (A, B, A, B, ...) so that both see the same machine load, which
    on a shared machine moves far more than the difference being measured."""
    import torch

    opts = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in models]
    times = [[] for _ in models]
    for m in models:
        m.train()
    for i in range(warmup + steps):
        for j, (m, opt) in enumerate(zip(models, opts)):
            torch.manual_seed(seed + i)
            t0 = time.perf_counter()
            loss = m.training_loss(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if i >= warmup:
                times[j].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


DEMO_TRAIN_DIGITS = 2000   # the variant table's training set (bench/detection_variants.py --limit)


def _cmd_demo(args) -> int:
    import torch

    import aefast
    from aefast import _plots, backend as _backend
    from aefast.data import defect_splits
    from aefast.reference import models as ref_models
    from aefast.tasks import BEST_DIGITS, SeedSummary, evaluate_anomaly, reconstruct, split_metrics

    t_start = time.perf_counter()
    _setup(args)
    args.data, args.model = "mnist", "conv"
    limit = 400 if args.quick else (args.limit or DEMO_TRAIN_DIGITS)
    splits = defect_splits("mnist", seed=args.seed, limit=limit)
    variant = BEST_DIGITS.replace(epochs=1 if args.quick else args.epochs, batch_size=args.batch_size, lr=args.lr,
                                  **({"channels": args.channels} if args.channels else {}))
    seeds = [args.seed + k for k in range(args.seeds)]
    resolved = _backend.resolve(torch.device(args.device))
    print(f"aefast demo: defect detection on the embedded MNIST digits ({len(splits.train)} defect-free training "
          f"digits; {len(splits.val)} validation / {len(splits.test)} test digits, half of them with a painted "
          f"scratch, spot or crack). Detector: ConvAutoencoder, {variant.describe()} (the best of "
          f"bench/results/detection_variants on validation); backend {resolved}, device {args.device}, "
          f"{torch.get_num_threads()} threads")

    # 1. The fused model and its torch.nn twin agree (same weights, same input, eval mode).
    torch.manual_seed(args.seed)
    model = variant.model()
    kwargs = dict(in_channels=1, channels=variant.channels, index_reuse=variant.index_reuse)
    twin = ref_models.ConvAutoencoder(**kwargs)
    twin.load_state_dict(model.state_dict(), strict=True)
    probe = splits.test.images[:16].to(args.device)
    model.to(args.device).eval()
    twin.to(args.device).eval()
    with torch.no_grad():
        diff = float((model(probe) - twin(probe)).abs().max())
    print(f"check: max |aefast - torch.nn twin| on 16 test digits = {diff:.2e}")

    # 2. Speed: the same training step, fused model vs twin, interleaved in this run.
    batch = splits.train[: args.batch_size].to(args.device)
    _backend.reset_fallback_counts()
    steps = 3 if args.quick else args.speed_steps
    t_fused, t_twin = _interleaved_step_times([copy.deepcopy(model), copy.deepcopy(twin)], batch, steps, args.seed)
    fallbacks = _backend.fallback_counts()
    print(f"speed: one training step on a batch of {len(batch)} (median of {steps}, steps interleaved): aefast "
          f"{1e3 * t_fused:.1f} ms, torch.nn twin {1e3 * t_twin:.1f} ms -> aefast is {t_twin / t_fused:.2f}x the "
          f"twin's speed")
    if fallbacks:
        print("  (calls that took the reference path instead of a fused kernel: "
              + "; ".join(f"{k} x{n}" for k, n in fallbacks.items()) + ")")

    # 3. Train one detector per seed on defect-free digits; score the test split.
    test_summary, val_summary, detectors, histories = SeedSummary(), SeedSummary(), [], {}
    for seed in seeds:
        detector, res = variant.train(splits.train, seed=seed, device=args.device, progress=not args.no_progress,
                                      desc=f"demo seed {seed}")
        detectors.append(detector)
        histories[f"seed {seed}"] = res
        val_summary.add(split_metrics(detector, splits.val, device=args.device))
        metrics = split_metrics(detector, splits.test, device=args.device)
        test_summary.add(metrics)
        print(f"seed {seed}: training loss per epoch " + " ".join(f"{v:.5f}" for v in res.history)
              + f"; test image AUROC {metrics['image_auroc']:.4f}, pixel AUROC {metrics['pixel_auroc']:.4f}, "
              f"AUPRO {metrics['aupro']:.4f}")

    # 4. What the detector does to gaussian noise (it was trained to remove anomalies, not noise).
    x = splits.test.images[splits.test.labels == 0]
    g = torch.Generator().manual_seed(args.seed + 2)
    noisy = x + args.level * torch.randn(x.shape, generator=g)
    denoised = reconstruct(detectors[0].model, noisy, device=args.device)
    mse_model = float(((denoised - x) ** 2).mean())
    mse_identity = float(((noisy - x) ** 2).mean())
    print(f"denoising, defect-free held-out digits (noise std {args.level}): MSE {mse_model:.5f} vs identity-noise "
          f"baseline {mse_identity:.5f} ({mse_identity / mse_model:.1f}x lower)")

    # 5. Defect detection, mean over the seeds, and the best-F1 threshold of the first seed.
    report = evaluate_anomaly(detectors[0], splits.val, splits.test, device=args.device)
    print(f"defect detection ({len(splits.test)} test digits, {int(splits.test.labels.sum())} with defects), mean ± "
          f"std over {len(seeds)} seeds {seeds}:")
    for key, label in (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("aupro", "AUPRO (FPR<=0.3)")):
        print(f"  {label:17s} {test_summary.format(key, 4)}")
    print(f"  seed {seeds[0]} at the best-F1 threshold of the validation split: test F1 {report.test_f1:.3f}, "
          f"precision {report.test_precision:.3f}, recall {report.test_recall:.3f}")

    # 6. Figures.
    n = 10
    grid = _plots.image_rows({"clean": x[:n], "noisy input": noisy[:n].clamp(0, 1), "aefast output": denoised[:n]},
                             os.path.join(args.out, "reconstructions.png"),
                             f"gaussian noise: MSE {mse_model:.4f} vs identity {mse_identity:.4f}")
    amap = _anomaly_png(detectors[0], splits.test, os.path.join(args.out, "anomaly_maps.png"), device=args.device,
                        title=f"seed {seeds[0]}: anomaly maps (last two defect-free)")
    curve = _plots.loss_curve({k: r.history for k, r in histories.items()}, os.path.join(args.out, "loss_curve.png"),
                              "aefast demo: training loss (fused MSE, corrupted input -> clean target)",
                              steps={k: r.step_losses for k, r in histories.items()})
    summary = {"image_auroc": test_summary.mean("image_auroc"), "pixel_auroc": test_summary.mean("pixel_auroc"),
               "aupro": test_summary.mean("aupro"), "seeds": seeds, "test": test_summary.as_dict(),
               "validation": val_summary.as_dict(), "variant": variant.as_dict(),
               "train_loss": histories[f"seed {seeds[0]}"].history, "denoise_mse": mse_model,
               "identity_mse": mse_identity, "test_f1": report.test_f1, "threshold": report.threshold,
               "step_ms_aefast": 1e3 * t_fused, "step_ms_twin": 1e3 * t_twin, "speed_ratio": t_twin / t_fused,
               "backend": resolved, "fallbacks": fallbacks, "twin_max_abs_diff": diff,
               "seconds": time.perf_counter() - t_start, "load_average": os.getloadavg(), "aefast": aefast.__version__}
    with open(os.path.join(args.out, "demo.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"wrote {grid}, {amap}, {curve}, {os.path.join(args.out, 'demo.json')}")
    print(f"demo finished in {time.perf_counter() - t_start:.0f} s (load average {os.getloadavg()[0]:.1f})")
    return 0


# ================================================================ info

def _cmd_info(args) -> int:
    from aefast._info import format_info, info

    data = info()
    print(json.dumps(data, indent=2) if args.json else format_info(data))
    return 0


# ================================================================ parser

def _add_common(p, *, data, data_default, epochs, batch_size, lr, out):
    from aefast.backend import BACKENDS

    p.add_argument("--data", choices=data, default=data_default, help=f"embedded data set (default {data_default})")
    p.add_argument("--epochs", type=_positive_int, default=epochs, help=f"training epochs (default {epochs})")
    p.add_argument("--batch-size", type=_positive_int, default=batch_size, help=f"batch size (default {batch_size})")
    p.add_argument("--lr", type=_positive_float, default=lr, help=f"Adam learning rate (default {lr})")
    p.add_argument("--backend", choices=("auto", *BACKENDS), default="auto",
                   help="aefast backend (default: the per-family table that `aefast info` prints)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device (default cpu)")
    p.add_argument("--seed", type=_nonneg_int, default=0, help="seed for data, init, noise and order (default 0)")
    p.add_argument("--out", default=out, help=f"output directory (default {out})")
    p.add_argument("--limit", type=_positive_int, default=None, help="use at most this many training images")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_model_shape(p):
    p.add_argument("--latent", type=_positive_int, default=None, help="latent size (MLP models, VAEs)")
    p.add_argument("--hidden", type=_widths, default=None, help="MLP hidden widths, e.g. 256,64")
    p.add_argument("--channels", type=_widths, default=None, help="conv stage widths, e.g. 16,32")
    p.add_argument("--corruption", choices=("gaussian", "masking", "salt_pepper"), default=None,
                   help="denoising corruption (dae, sdae, conv_dae)")
    p.add_argument("--level", type=_level, default=None, help="corruption level")


def _add_detector(p):
    from aefast.tasks import BEST_DIGITS
    from aefast.tasks.anomaly import TRAINING_CORRUPTIONS

    b = BEST_DIGITS
    p.add_argument("--index-reuse", choices=("all", "deepest", "none"), default=b.index_reuse,
                   help=f"conv models: decoder stages that unpool at the encoder's indices (default {b.index_reuse})")
    p.add_argument("--train-corruption", choices=TRAINING_CORRUPTIONS, default=b.corruption,
                   help=f"what the input gets in training, the target staying clean (default {b.corruption})")
    p.add_argument("--train-level", type=_level, default=b.level, help="level of --train-corruption")
    p.add_argument("--map", choices=("mse", "ssim"), default=b.map, help=f"anomaly map (default {b.map})")
    p.add_argument("--sigma", type=_level, default=b.sigma, help=f"Gaussian smoothing of the map (default {b.sigma})")
    p.add_argument("--top-fraction", type=_level, default=b.top_fraction or 0,
                   help=f"image score: mean of the map's top fraction, 0 = mean (default {b.top_fraction})")


def _add_resume(p):
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt exactly")
    p.add_argument("--checkpoint-every", type=_nonneg_int, default=0,
                   help="also checkpoint every N steps (always at each epoch end)")
    p.add_argument("--max-steps", type=_positive_int, default=None,
                   help="stop after N optimizer steps in total, checkpointing there (resume later)")


BENCH_SUITES = ("conv_pool", "conv_bn_pool", "batch_norm_act", "unpool_deconv", "conv_transpose_act", "recon_loss", "optimize",
                "optimize_architectures", "training", "kernel_ledger")


def _cmd_bench(args) -> int:
    """Runs the benchmark scripts of the source tree's bench/ folder, each in its own process
    (`./dev bench --scripts`). The pytest-benchmark suite over the same workloads
    (bench/workloads.py) is `python -m pytest bench/suite` (`./dev bench`)."""
    import subprocess
    from pathlib import Path

    bench_dir = Path(__file__).resolve().parents[1] / "bench"
    if not (bench_dir / "_harness.py").exists():
        raise FileNotFoundError(f"the benchmark suite lives in the aefast source tree (bench/), not found at "
                                f"{bench_dir}; run from a source checkout (./dev bench)")
    status = 0
    for suite in args.suite or BENCH_SUITES:
        cmd = [sys.executable, str(bench_dir / f"bench_{suite}.py"), "--device", args.device]
        if args.quick:
            cmd.append("--quick")
        if args.out:
            cmd += ["--out", args.out]
        print(f"aefast bench: {suite}", flush=True)
        rc = subprocess.call(cmd)
        if rc:
            print(f"aefast bench: {suite} failed with exit status {rc}", file=sys.stderr)
            status = 1
    return status


def build_parser() -> argparse.ArgumentParser:
    from aefast.tasks import BEST_DIGITS

    parser = argparse.ArgumentParser(prog="aefast", description="Fast autoencoders: fused kernels, models and tasks.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="THE MAIN JOB: defect detection on embedded digits (3 seeds: image/pixel AUROC, "
                                     "AUPRO), the fused model against its torch.nn twin, speed, PNGs")
    _add_common(p, data=("mnist",), data_default="mnist", epochs=BEST_DIGITS.epochs, batch_size=BEST_DIGITS.batch_size,
                lr=BEST_DIGITS.lr, out="aefast-demo")
    p.add_argument("--channels", type=_widths, default=None, help="conv stage widths (default: the best variant's)")
    p.add_argument("--seeds", type=_positive_int, default=3, help="detectors trained, seeds --seed, --seed+1, ... "
                                                                    "(default 3); metrics are their mean")
    p.add_argument("--level", type=_level, default=0.3, help="gaussian noise std of the denoising check (default 0.3)")
    p.add_argument("--speed-steps", type=_positive_int, default=15, help="timed training steps per model")
    p.add_argument("--quick", action="store_true", help="tiny run (400 digits, 1 epoch) for smoke tests")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("train", help="train a model on an embedded data set (checkpoints, --resume)")
    p.add_argument("--model", choices=MODEL_NAMES, default="conv_dae", help="model (default conv_dae)")
    _add_common(p, data=DATA_NAMES, data_default="mnist", epochs=5, batch_size=64, lr=1e-3, out="aefast-train")
    _add_model_shape(p)
    _add_resume(p)
    p.add_argument("--pretrain-epochs", type=_nonneg_int, default=3, help="sdae: epochs of pretraining per layer")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("detect", help="defect detection: image and pixel AUROC, AUPRO, best-F1 threshold")
    p.add_argument("--model", choices=MODEL_NAMES, default="conv", help="model (default conv: ConvAutoencoder)")
    _add_common(p, data=DETECT_DATA, data_default="textures", epochs=BEST_DIGITS.epochs, batch_size=32, lr=3e-3,
                out="aefast-detect")
    _add_model_shape(p)
    _add_detector(p)
    _add_resume(p)
    p.add_argument("--weights", default=None, help="model.pt from `aefast train` instead of training")
    p.set_defaults(func=_cmd_detect)

    p = sub.add_parser(
        "export", help="a trained model's torch.nn twin with its anomaly map, for deployment (ONNX, torch.export, "
                       "TorchScript)", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Writes the torch.nn-only twin of a trained model (aefast.reference.models, loaded with the same "
                    "state_dict), wrapped with its anomaly map, so that it runs without aefast:\n"
                    "  forward(images (N, C, H, W)) -> (reconstruction, anomaly_map (N, H, W), score (N,))\n\n"
                    "formats (--format, repeatable; default onnx and torch_export):\n"
                    "  onnx          detector.onnx: torch.onnx.export(dynamo=True) (needs onnxscript), dynamic batch;\n"
                    "                run it with onnxruntime.InferenceSession(path).run(None, {'images': x})\n"
                    "  torch_export  detector.pt2: torch.export.save; torch.export.load(path).module()(x), dynamic batch\n"
                    "  torchscript   detector.ts: torch.jit.trace + torch.jit.save (torch deprecates TorchScript for\n"
                    "                torch.export); torch.jit.load(path)(x), traced at batch 4\n\n"
                    "The image size is fixed (the model file's, or --input-size). After writing, every file is run on\n"
                    "the same images as aefast's fused model and the largest difference is printed.")
    p.add_argument("--weights", required=True, help="model file from `aefast detect` (detector.pt) or `aefast train` "
                                                    "(model.pt)")
    p.add_argument("--format", action="append", choices=("onnx", "torch_export", "torchscript"), default=None,
                   help="output format (repeatable; default onnx and torch_export)")
    p.add_argument("--out", default="aefast-export", help="output directory (default aefast-export)")
    p.add_argument("--input-size", type=_widths, default=None, help="H,W of the images (default: the model file's)")
    p.add_argument("--map", choices=("mse", "ssim"), default=None,
                   help="anomaly map (default: the one stored by `aefast detect`, else plain squared error)")
    p.add_argument("--sigma", type=_level, default=None, help="Gaussian smoothing of the map (with --map)")
    p.add_argument("--top-fraction", type=_level, default=None, help="image score: mean of the map's top fraction "
                                                                     "(with --map; 0 = the mean)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("segment", help="segmentation: IoU and Dice")
    p.add_argument("--model", choices=SEGMENTATION_MODELS, default="segnet", help="model (default segnet)")
    _add_common(p, data=("shapes",), data_default="shapes", epochs=10, batch_size=16, lr=1e-2, out="aefast-segment")
    _add_model_shape(p)
    _add_resume(p)
    p.add_argument("--weights", default=None, help="model.pt from `aefast train` instead of training")
    p.set_defaults(func=_cmd_segment)

    p = sub.add_parser("reduce", help="dimensionality reduction, compared with PCA")
    p.add_argument("--model", choices=MODEL_NAMES, default="linear", help="model (default linear)")
    _add_common(p, data=("digits", "mnist"), data_default="digits", epochs=10, batch_size=64, lr=1e-3,
                out="aefast-reduce")
    _add_model_shape(p)
    _add_resume(p)
    p.add_argument("--weights", default=None, help="model.pt from `aefast train` instead of training")
    p.set_defaults(func=_cmd_reduce)

    p = sub.add_parser("bench", help="benchmark scripts: each kernel family and the end-to-end training steps "
                                      "against eager PyTorch and torch.compile, as ratios measured in one run "
                                      "(the pytest-benchmark suite of the same workloads: ./dev bench)")
    p.add_argument("--suite", action="append", choices=BENCH_SUITES, help="run only this suite (repeatable)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="tiny shapes, a few iterations (a smoke run)")
    p.add_argument("--out", default=None, help="output directory for JSON, markdown and PNG (default bench/out)")
    p.set_defaults(func=_cmd_bench)

    p_info = sub.add_parser("info", help="version, built and usable backends, CUDA archs, Triton version")
    p_info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p_info.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # bad arguments: argparse prints usage + the error, exit status 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"aefast {args.command}: interrupted; checkpoints written so far are intact (use --resume)",
              file=sys.stderr)
        return 130
    except (ValueError, TypeError, FileNotFoundError, RuntimeError, OSError) as exc:
        print(f"aefast {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
