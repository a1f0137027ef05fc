"""Anomaly detection by reconstruction error.

An autoencoder trained on normal data reconstructs normal images well and anomalies badly:
* the image score is the fused loss's ``per_sample`` reduction (mean squared error per image);
* the pixel anomaly map is the per-pixel squared error (``reduction="none"``, mean over channels);
* image AUROC ranks the scores against the image labels, pixel AUROC ranks the map against the
  defect masks (scikit-learn's roc_auc_score);
* the decision threshold is the one with the best F1 on a validation split, then applied as is to
  the test split.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from aefast import functional as AF
from aefast.training import batched


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


def _check_binary(name, labels):
    labels = np.asarray(labels).ravel()
    values = set(np.unique(labels).tolist())
    if not values <= {0, 1, 0.0, 1.0, True, False}:
        raise ValueError(f"aefast.tasks: {name} must be 0/1, found values {sorted(values)[:5]}")
    if len(values) < 2:
        raise ValueError(f"aefast.tasks: {name} hold only one class; AUROC needs normal and anomalous examples")
    return labels.astype(np.int64)


def image_auroc(scores, labels) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(_check_binary("labels", labels), np.asarray(scores, dtype=np.float64).ravel()))


def pixel_auroc(maps, masks) -> float:
    from sklearn.metrics import roc_auc_score

    maps, masks = np.asarray(maps, dtype=np.float64), np.asarray(masks)
    if maps.size != masks.size:
        raise ValueError(f"aefast.tasks: anomaly maps ({maps.shape}) and masks ({masks.shape}) differ in size")
    return float(roc_auc_score(_check_binary("masks", masks), maps.ravel()))


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

    def summary(self) -> str:
        pix = "n/a" if self.pixel_auroc is None else f"{self.pixel_auroc:.4f}"
        return (f"image AUROC {self.image_auroc:.4f}  pixel AUROC {pix}  threshold {self.threshold:.5f} "
                f"(val F1 {self.val_f1:.3f})  test F1 {self.test_f1:.3f}  precision {self.test_precision:.3f}  "
                f"recall {self.test_recall:.3f}")


def evaluate_anomaly(model, val, test, batch_size: int = 256, device="cpu") -> AnomalyReport:
    """Scores ``val`` and ``test`` (Splits with labels, masks optional): picks the best-F1 threshold
    on val, reports AUROCs and F1/precision/recall on test at that threshold."""
    val_scores = anomaly_scores(model, val.images, batch_size, device)
    threshold, val_f1 = best_f1_threshold(val_scores, val.labels)
    scores = anomaly_scores(model, test.images, batch_size, device)
    maps = anomaly_maps(model, test.images, batch_size, device)
    labels = _check_binary("labels", test.labels)
    pred = (scores.numpy() >= threshold).astype(np.int64)
    tp = int(((pred == 1) & (labels == 1)).sum())
    precision = tp / max(int(pred.sum()), 1)
    recall = tp / max(int(labels.sum()), 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    pix = None
    if test.masks is not None and test.masks.sum() > 0:
        pix = pixel_auroc(maps, test.masks)
    return AnomalyReport(image_auroc(scores, labels), pix, threshold, val_f1, f1, precision, recall, scores, maps)
