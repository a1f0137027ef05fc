"""Anomaly (defect) detection by reconstruction error.

An autoencoder trained on normal data reconstructs normal images well and defects badly, so the
reconstruction error points at them:

* the pixel anomaly map is the per-pixel squared error (mean over channels), optionally smoothed
  by a Gaussian, or one minus the local SSIM (:class:`AnomalyMap`);
* the image score is the mean of the map, or the mean of its top ``top_fraction`` pixels, which a
  small defect moves far more than the mean;
* image AUROC ranks the scores against the image labels, pixel AUROC and AUPRO rank the map
  against the defect masks (:mod:`aefast.tasks.metrics`);
* the decision threshold is the one with the best F1 on a validation split, then applied as is
  to the test split.

Whether the defect gets redrawn decides everything, and two things do:

* **pool indices** (``ConvAutoencoder(index_reuse=...)``): a decoder that unpools at the
  encoder's argmax positions is told, at full resolution, where the input's brightest pixels
  were; a bright scratch wins its pool windows, so its strokes come back in the reconstruction
  and its error shrinks. Reusing only the deepest stage's indices passes positions at 1/2 the
  resolution only; an index-free decoder passes none, but also loses the detail that keeps
  normal reconstructions sharp.
* **the training corruption** (:func:`training_corruption`): a model trained to map a corrupted
  input back to the clean image learns to *not* copy what does not belong. In-painting (random
  rectangles filled with a random grey) and DRAEM-like synthetic anomalies (irregular blobs and
  thin level-set curves of smooth noise, blended in at a random opacity; a generator different
  from the painter of the test defects in :mod:`aefast.data`) teach exactly that.

``bench/detection_variants.py`` measures these choices; :data:`BEST_DIGITS` is its best variant
on the validation split, which ``aefast demo`` and ``aefast detect`` use.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from aefast import functional as AF
from aefast.tasks.metrics import _check_binary, aupro, image_auroc, pixel_auroc
from aefast.training import batched

TRAINING_CORRUPTIONS = ("none", "gaussian", "masking", "salt_pepper", "inpaint", "synthetic")
MAP_KINDS = ("mse", "ssim")


def _recon(model, x):
    out = model(x)
    return out[0] if isinstance(out, tuple) else out


def reconstruct(model, images, batch_size: int = 256, device="cpu"):
    """Eval-mode reconstructions (no corruption, VAEs decode the mean), on the CPU."""
    model.eval()
    return batched(lambda x: _recon(model, x), images, batch_size, device)


def anomaly_scores(model, images, batch_size: int = 256, device="cpu"):
    """One score per image: the per-sample mean squared reconstruction error."""
    model.eval()
    return batched(lambda x: AF.reconstruction_loss(_recon(model, x), x, "mse", "per_sample"), images, batch_size,
                   device)


def anomaly_maps(model, images, batch_size: int = 256, device="cpu"):
    """(N, H, W) per-pixel squared reconstruction error, averaged over channels."""
    model.eval()
    return batched(lambda x: AF.reconstruction_loss(_recon(model, x), x, "mse", "none").mean(1), images, batch_size,
                   device)


# ================================================================ maps and scores

def gaussian_kernel(sigma: float) -> torch.Tensor:
    """A normalised (1, 1, k, k) Gaussian, k = 2 * ceil(3 sigma) + 1."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    g = torch.exp(-(t * t) / (2 * sigma * sigma))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


class AnomalyMap(nn.Module):
    """``forward(x, recon) -> (map (N, H, W), score (N,))``, written with torch ops only so that it
    exports (``aefast export``) with the model.

    * ``kind="mse"``: squared error averaged over channels, then (``sigma > 0``) smoothed by a
      Gaussian of that std (reflect padding keeps the size), which joins a defect's pixels and
      damps the speckle of single badly drawn pixels;
    * ``kind="ssim"``: 1 - SSIM of the two images in a Gaussian window (std 1.5, as Wang et al.),
      averaged over channels;
    * score: the map's mean (``top_fraction=None``) or the mean of its ``top_fraction`` largest
      pixels.
    """

    def __init__(self, kind: str = "mse", sigma: float = 0.0, top_fraction: float | None = None):
        super().__init__()
        if kind not in MAP_KINDS:
            raise ValueError(f"aefast.tasks.AnomalyMap: kind must be one of {MAP_KINDS}, got {kind!r}")
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma >= 0:
            raise ValueError(f"aefast.tasks.AnomalyMap: sigma must be a number >= 0, got {sigma!r}")
        if top_fraction is not None and not (isinstance(top_fraction, (int, float)) and 0 < top_fraction <= 1):
            raise ValueError(f"aefast.tasks.AnomalyMap: top_fraction must be in (0, 1] or None, got {top_fraction!r}")
        self.kind, self.sigma, self.top_fraction = kind, float(sigma), top_fraction
        smooth = gaussian_kernel(self.sigma) if self.sigma > 0 else torch.ones(1, 1, 1, 1)
        self.register_buffer("smooth", smooth, persistent=False)
        self.register_buffer("ssim_window", gaussian_kernel(1.5), persistent=False)

    @staticmethod
    def _filter(x, kernel):
        pad = kernel.shape[-1] // 2
        if pad == 0:
            return x
        c = x.shape[1]
        # reflect needs pad < size; replicate always works and only differs at the border
        x = F.pad(x, (pad, pad, pad, pad), mode="replicate")
        return F.conv2d(x, kernel.expand(c, 1, -1, -1), groups=c)

    def _ssim_error(self, x, y):
        c1, c2 = 0.01 ** 2, 0.03 ** 2
        w = self.ssim_window
        mx, my = self._filter(x, w), self._filter(y, w)
        vx = self._filter(x * x, w) - mx * mx
        vy = self._filter(y * y, w) - my * my
        cxy = self._filter(x * y, w) - mx * my
        ssim = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        return (1 - ssim).mean(1)

    def forward(self, x, recon):
        if self.kind == "ssim":
            amap = self._ssim_error(x, recon)
        else:
            amap = ((recon - x) ** 2).mean(1)
        amap = self._filter(amap[:, None], self.smooth)[:, 0]
        flat = amap.flatten(1)
        if self.top_fraction is None:
            score = flat.mean(1)
        else:
            # int(): a plain number even under torch.jit.trace (the image size is fixed there)
            k = max(1, int(round(self.top_fraction * int(flat.shape[1]))))
            score = flat.topk(k, dim=1).values.mean(1)
        return amap, score

    def extra_repr(self):
        return f"kind={self.kind!r}, sigma={self.sigma}, top_fraction={self.top_fraction}"


class Detection(NamedTuple):
    reconstruction: torch.Tensor   # (N, C, H, W)
    anomaly_map: torch.Tensor      # (N, H, W)
    score: torch.Tensor            # (N,)


class Detector(nn.Module):
    """A reconstruction model and its :class:`AnomalyMap`: ``forward(x) -> Detection(reconstruction,
    anomaly_map, score)``."""

    def __init__(self, model: nn.Module, scorer: AnomalyMap | None = None):
        super().__init__()
        self.model = model
        self.scorer = scorer if scorer is not None else AnomalyMap()

    def forward(self, x):
        recon = _recon(self.model, x)
        amap, score = self.scorer(x, recon)
        return Detection(recon, amap, score)


# ================================================================ training corruptions

def _smooth_noise(n, size, cells, device, dtype):
    """(n, 1, H, W) value noise: a random (cells+1)^2 grid per image, bilinearly upsampled."""
    coarse = torch.rand(n, 1, cells + 1, cells + 1, device=device, dtype=dtype)
    return F.interpolate(coarse, size=size, mode="bilinear", align_corners=True)


def _synthetic_anomaly_masks(n, size, device, dtype):
    """DRAEM-like anomaly shapes from smooth noise, not from aefast.data's painter (which draws
    straight scratches, discs and random-walk cracks): half blobs (the noise above a high
    threshold), half thin curves (a narrow band around a level set of the noise)."""
    cells = torch.randint(3, 7, (1,)).item()
    noise = _smooth_noise(n, size, cells, device, dtype)
    level = torch.rand(n, 1, 1, 1, device=device, dtype=dtype)
    blob = noise > (0.75 + 0.15 * level)
    band = (noise - (0.3 + 0.4 * level)).abs() < (0.012 + 0.02 * torch.rand(n, 1, 1, 1, device=device, dtype=dtype))
    # keep a band only inside a random window, so that a curve is a piece, not a whole contour map
    window = _smooth_noise(n, size, 2, device, dtype) > 0.6
    kind = torch.rand(n, 1, 1, 1, device=device) < 0.5
    return torch.where(kind, blob, band & window).to(dtype)


def training_corruption(x: torch.Tensor, kind: str, level: float = 0.0) -> torch.Tensor:
    """The input a restoration-trained detector sees (its target is the clean ``x``), drawn from
    torch's global RNG (so aefast.training.fit's checkpoints resume it exactly):

    * ``gaussian`` (std ``level``), ``masking`` (a fraction ``level`` of pixels zeroed),
      ``salt_pepper`` (a fraction ``level`` set to 0 or 1): aefast.functional.corrupt;
    * ``inpaint``: 1-3 random rectangles per image (sides 1/8 to 1/3 of the image) filled with a
      random grey, so the model learns to fill them from their surroundings;
    * ``synthetic``: on a fraction ``level`` of the images (all if 0), a DRAEM-like anomaly (see
      :func:`_synthetic_anomaly_masks`) blended in with opacity 0.5-1 and a random grey or the
      texture of another image of the batch.
    """
    if kind not in TRAINING_CORRUPTIONS:
        raise ValueError(f"aefast.tasks: training corruption must be one of {TRAINING_CORRUPTIONS}, got {kind!r}")
    if kind == "none" or (kind in ("gaussian", "masking", "salt_pepper") and level == 0):
        return x
    if kind in ("gaussian", "masking", "salt_pepper"):
        return AF.corrupt(x, kind, level)
    n, c, h, w = x.shape
    dev, dt = x.device, x.dtype
    yy = torch.arange(h, device=dev).view(1, h, 1)
    xx = torch.arange(w, device=dev).view(1, 1, w)
    if kind == "inpaint":
        out = x.clone()
        for _ in range(3):
            use = torch.rand(n, device=dev) < 0.6
            rh = torch.randint(max(1, h // 8), max(2, h // 3) + 1, (n,), device=dev)
            rw = torch.randint(max(1, w // 8), max(2, w // 3) + 1, (n,), device=dev)
            top = (torch.rand(n, device=dev) * (h - rh + 1)).long()
            left = (torch.rand(n, device=dev) * (w - rw + 1)).long()
            box = ((yy >= top.view(-1, 1, 1)) & (yy < (top + rh).view(-1, 1, 1))
                   & (xx >= left.view(-1, 1, 1)) & (xx < (left + rw).view(-1, 1, 1)) & use.view(-1, 1, 1))
            grey = torch.rand(n, 1, 1, 1, device=dev, dtype=dt).expand(n, c, h, w)
            out = torch.where(box[:, None], grey, out)
        return out
    mask = _synthetic_anomaly_masks(n, (h, w), dev, dt)
    if level > 0:
        mask = mask * (torch.rand(n, 1, 1, 1, device=dev) < level).to(dt)
    opacity = 0.5 + 0.5 * torch.rand(n, 1, 1, 1, device=dev, dtype=dt)
    grey = torch.rand(n, 1, 1, 1, device=dev, dtype=dt).expand(n, c, h, w)
    other = x[torch.randperm(n, device=dev)]
    source = torch.where(torch.rand(n, 1, 1, 1, device=dev) < 0.5, grey, 1 - other)
    return x + opacity * mask * (source - x)


class RestorationObjective(nn.Module):
    """What aefast.training.fit trains for a restoration-trained detector: ``training_loss(x)`` is
    the model's loss from the corrupted ``x`` back to the clean ``x``."""

    def __init__(self, model: nn.Module, corruption: str = "none", level: float = 0.0):
        super().__init__()
        if corruption not in TRAINING_CORRUPTIONS:
            raise ValueError(f"aefast.tasks: corruption must be one of {TRAINING_CORRUPTIONS}, got {corruption!r}")
        self.model, self.corruption, self.level = model, corruption, float(level)

    def forward(self, x):
        return self.model(x)

    def training_loss(self, x):
        if self.corruption == "none":
            return self.model.training_loss(x)
        return self.model.training_loss(training_corruption(x, self.corruption, self.level), x)


# ================================================================ variants

@dataclass(frozen=True)
class DetectorVariant:
    """One row of the variant table: a ConvAutoencoder, how it is trained and how it scores."""
    channels: tuple = (32, 64)
    index_reuse: str = "all"            # ConvAutoencoder(index_reuse=...): all | deepest | none
    corruption: str = "none"            # training_corruption kind
    level: float = 0.0
    map: str = "mse"                    # AnomalyMap kind
    sigma: float = 0.0                  # Gaussian smoothing of the map
    top_fraction: float | None = None   # image score: mean of the map's top fraction (None: mean)
    epochs: int = 6
    batch_size: int = 64
    lr: float = 3e-3

    def describe_model(self) -> str:
        """The trained model: decoder, training corruption, size."""
        plain = self.corruption in ("none", "inpaint") or (self.corruption == "synthetic" and self.level == 0)
        train = self.corruption if plain else f"{self.corruption} {self.level:g}"
        batch = "" if self.batch_size == 64 else f", batch {self.batch_size}"
        return (f"indices {self.index_reuse}, train {train}, channels {','.join(map(str, self.channels))}, "
                f"{self.epochs} epochs{batch}")

    def describe(self) -> str:
        score = "mean" if self.top_fraction is None else f"top {100 * self.top_fraction:g}%"
        smooth = f" smoothed (sigma {self.sigma:g})" if self.sigma else ""
        return f"{self.describe_model()}, map {self.map}{smooth}, image score {score}"

    def as_dict(self):
        return asdict(self)

    def replace(self, **kw):
        return replace(self, **kw)

    def model(self, in_channels: int = 1):
        from aefast.models import ConvAutoencoder

        return ConvAutoencoder(in_channels, channels=self.channels, index_reuse=self.index_reuse)

    def scorer(self) -> AnomalyMap:
        return AnomalyMap(self.map, self.sigma, self.top_fraction)

    def train(self, images, seed: int = 0, device="cpu", progress: bool = False, desc: str = "detector",
              checkpoint=None, resume=False, max_steps=None, config=None):
        """A fresh model, trained on ``images`` (defect-free) with seed ``seed``; returns
        (Detector, FitResult)."""
        from aefast.training import fit

        torch.manual_seed(seed)
        model = self.model(images.shape[1])
        objective = RestorationObjective(model, self.corruption, self.level)
        res = fit(objective, images, epochs=self.epochs, batch_size=self.batch_size, lr=self.lr, seed=seed,
                  device=device, progress=progress, desc=desc, checkpoint=checkpoint, resume=resume,
                  max_steps=max_steps, config=config)
        model.eval()
        return Detector(model, self.scorer()), res


# The variant table's best on the digit-defect validation split (bench/results/detection_variants_*.md).
BEST_DIGITS = DetectorVariant(channels=(32, 64), index_reuse="deepest", corruption="synthetic", level=0.0,
                              map="mse", sigma=2.0, top_fraction=0.03, epochs=6, batch_size=32)


# ================================================================ evaluation

def detect(detector: Detector, images, batch_size: int = 256, device="cpu"):
    """(recon, maps (N, H, W), scores (N,)) of a Detector, in eval mode, on the CPU."""
    detector.eval()
    return batched(detector, images, batch_size, device)


def best_f1_threshold(scores, labels):
    """(threshold, f1): the score threshold (predict anomalous when score >= threshold) with the best
    F1 on these labels."""
    from sklearn.metrics import precision_recall_curve

    labels = _check_binary("labels", labels)
    precision, recall, thresholds = precision_recall_curve(labels, np.asarray(scores, dtype=np.float64).ravel())
    f1 = 2 * precision * recall / np.maximum(precision + recall, 1e-12)
    best = int(np.argmax(f1[:-1]))  # the last point (recall 0) has no threshold
    return float(thresholds[best]), float(f1[best])


class AnomalyReport(NamedTuple):
    image_auroc: float
    pixel_auroc: float | None
    threshold: float        # chosen by best F1 on the validation split
    val_f1: float
    test_f1: float
    test_precision: float
    test_recall: float
    scores: torch.Tensor    # test image scores
    maps: torch.Tensor      # test pixel maps (N, H, W)
    aupro: float | None = None

    def summary(self) -> str:
        pix = "n/a" if self.pixel_auroc is None else f"{self.pixel_auroc:.4f}"
        pro = "n/a" if self.aupro is None else f"{self.aupro:.4f}"
        return (f"image AUROC {self.image_auroc:.4f}  pixel AUROC {pix}  AUPRO {pro}  threshold {self.threshold:.5f} "
                f"(val F1 {self.val_f1:.3f})  test F1 {self.test_f1:.3f}  precision {self.test_precision:.3f}  "
                f"recall {self.test_recall:.3f}")


def _as_detector(model_or_detector, scorer=None):
    if isinstance(model_or_detector, Detector):
        return model_or_detector if scorer is None else Detector(model_or_detector.model, scorer)
    return Detector(model_or_detector, scorer)


def evaluate_anomaly(model, val, test, batch_size: int = 256, device="cpu", scorer: AnomalyMap | None = None
                     ) -> AnomalyReport:
    """Scores ``val`` and ``test`` (Splits with labels, masks optional) with ``model`` (a
    reconstruction model or a :class:`Detector`; ``scorer`` defaults to the plain squared error and
    its mean): picks the best-F1 threshold on val, reports image AUROC, pixel AUROC, AUPRO and
    F1/precision/recall on test at that threshold."""
    detector = _as_detector(model, scorer)
    _, _, val_scores = detect(detector, val.images, batch_size, device)
    threshold, val_f1 = best_f1_threshold(val_scores, val.labels)
    _, maps, scores = detect(detector, test.images, batch_size, device)
    labels = _check_binary("labels", test.labels)
    pred = (scores.numpy() >= threshold).astype(np.int64)
    tp = int(((pred == 1) & (labels == 1)).sum())
    precision = tp / max(int(pred.sum()), 1)
    recall = tp / max(int(labels.sum()), 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    pix = pro = None
    if test.masks is not None and test.masks.sum() > 0:
        pix = pixel_auroc(maps, test.masks)
        pro = aupro(maps, test.masks)
    return AnomalyReport(image_auroc(scores, labels), pix, threshold, val_f1, f1, precision, recall, scores, maps,
                         pro)


def split_metrics(detector: Detector, split, batch_size: int = 256, device="cpu") -> dict:
    """image_auroc, pixel_auroc, aupro of ``detector`` on one labelled, masked split."""
    _, maps, scores = detect(detector, split.images, batch_size, device)
    return {"image_auroc": image_auroc(scores, split.labels), "pixel_auroc": pixel_auroc(maps, split.masks),
            "aupro": aupro(maps, split.masks)}


@dataclass
class SeedSummary:
    """Per-metric mean and spread over seeds (the sample standard deviation, and min / max)."""
    values: dict = field(default_factory=dict)   # metric -> list over seeds

    def add(self, metrics: dict):
        for k, v in metrics.items():
            self.values.setdefault(k, []).append(float(v))

    def mean(self, key):
        return float(np.mean(self.values[key]))

    def std(self, key):
        v = self.values[key]
        return float(np.std(v, ddof=1)) if len(v) > 1 else 0.0

    def format(self, key, digits=3):
        v = self.values[key]
        return f"{self.mean(key):.{digits}f} ± {self.std(key):.{digits}f} (min {min(v):.{digits}f}, max {max(v):.{digits}f})"

    def as_dict(self):
        return {k: {"mean": self.mean(k), "std": self.std(k), "per_seed": list(v)} for k, v in self.values.items()}
