"""Segmentation metrics: intersection over union and Dice, per class and averaged over classes.

Counts are summed over the whole set before dividing (the usual dataset-level IoU), and the mean
IoU averages the classes (background and foreground for binary masks).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from aefast.training import batched


def predict_masks(model, images, batch_size: int = 256, device="cpu"):
    """Class map (N, H, W) int64: logit > 0 for one-channel (binary) models, else the argmax."""
    model.eval()

    def pred(x):
        logits = model(x)
        return (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1)

    return batched(pred, images, batch_size, device)


def _as_classes(t):
    t = torch.as_tensor(t)
    if t.dim() == 4:
        if t.shape[1] != 1:
            raise ValueError(f"aefast.tasks: masks must be (N, H, W) or (N, 1, H, W), got {tuple(t.shape)}")
        t = t[:, 0]
    return t.long()


def _counts(pred, target, num_classes):
    pred, target = _as_classes(pred), _as_classes(target)
    if pred.shape != target.shape:
        raise ValueError(f"aefast.tasks: prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    inter, p_sum, t_sum = [], [], []
    for c in range(num_classes):
        p, t = pred == c, target == c
        inter.append(int((p & t).sum()))
        p_sum.append(int(p.sum()))
        t_sum.append(int(t.sum()))
    return inter, p_sum, t_sum


def iou(pred, target, num_classes: int = 2):
    """Per-class IoU list (a class absent from both prediction and target counts as 1.0)."""
    inter, p, t = _counts(pred, target, num_classes)
    return [i / (a + b - i) if a + b - i else 1.0 for i, a, b in zip(inter, p, t)]


def dice(pred, target, num_classes: int = 2):
    """Per-class Dice (F1) list."""
    inter, p, t = _counts(pred, target, num_classes)
    return [2 * i / (a + b) if a + b else 1.0 for i, a, b in zip(inter, p, t)]


class SegmentationReport(NamedTuple):
    mean_iou: float
    iou: list
    mean_dice: float
    dice: list
    pixel_accuracy: float

    def summary(self) -> str:
        per = ", ".join(f"{v:.4f}" for v in self.iou)
        return (f"mean IoU {self.mean_iou:.4f} (per class {per})  mean Dice {self.mean_dice:.4f}  "
                f"pixel accuracy {self.pixel_accuracy:.4f}")


def evaluate_segmentation(model, split, num_classes: int | None = None, batch_size: int = 256,
                          device="cpu") -> SegmentationReport:
    num_classes = num_classes or max(2, getattr(model, "num_classes", 1))
    pred = predict_masks(model, split.images, batch_size, device)
    target = _as_classes(split.masks)
    ious, dices = iou(pred, target, num_classes), dice(pred, target, num_classes)
    acc = float((pred == target).float().mean())
    return SegmentationReport(sum(ious) / len(ious), ious, sum(dices) / len(dices), dices, acc)
