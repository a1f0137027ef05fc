"""Defect-detection metrics: image AUROC, pixel AUROC and AUPRO.

AUPRO (area under the per-region-overlap curve, Bergmann et al., MVTec AD; anomalib's ``AUPRO``)
rewards finding every defect region, small ones included, where pixel AUROC is dominated by the
big ones:

* the regions are the connected components of each ground-truth mask, 8-connected (a diagonal
  scratch is one region), labelled per image with ``scipy.ndimage.label``;
* at a threshold t, a region's overlap is the fraction of its pixels scoring >= t, PRO(t) is the
  mean overlap over all regions of all images, and FPR(t) is the fraction of normal pixels (mask
  0, every image) scoring >= t;
* over all thresholds (every distinct score, so the curve is exact, no binning), PRO is
  integrated over FPR from 0 to ``fpr_limit`` (0.3) with the trapezoid rule, the curve
  interpolated linearly at ``fpr_limit``, and divided by ``fpr_limit`` so that 1 is perfect.

Computing it: sort all pixels by score, highest first. Lowering the threshold past a pixel adds
1/#normal to FPR if it is normal, or 1/(#regions * |its region|) to PRO if it lies in a region,
so both curves are cumulative sums over the sorted pixels, read at the last pixel of each run of
equal scores (ties cross the threshold together). O(P log P) for P pixels.
"""
from __future__ import annotations

import numpy as np

# 8-connectivity: pixels touching at a corner belong to the same region (MVTec's evaluation and
# anomalib's cv2-based labelling do the same).
_EIGHT_CONNECTED = np.ones((3, 3), dtype=int)


def _check_binary(name, labels):
    labels = np.asarray(labels).ravel()
    values = set(np.unique(labels).tolist())
    if not values <= {0, 1, 0.0, 1.0, True, False}:
        raise ValueError(f"aefast.tasks: {name} must be 0/1, found values {sorted(values)[:5]}")
    if len(values) < 2:
        raise ValueError(f"aefast.tasks: {name} hold only one class; AUROC needs normal and anomalous examples")
    return labels.astype(np.int64)


def _maps_and_masks(maps, masks):
    """(N, H, W) float64 maps and int masks; (N, 1, H, W) inputs lose their channel axis."""
    maps = np.asarray(maps, dtype=np.float64)
    masks = np.asarray(masks)
    if maps.size != masks.size:
        raise ValueError(f"aefast.tasks: anomaly maps ({maps.shape}) and masks ({masks.shape}) differ in size")
    if maps.ndim < 2:
        raise ValueError(f"aefast.tasks: anomaly maps must be (N, H, W) images, got shape {maps.shape}")
    h, w = maps.shape[-2:]
    if not np.isfinite(maps).all():
        raise ValueError("aefast.tasks: anomaly maps hold NaN or infinite values")
    masks = _check_binary("masks", masks).reshape(-1, h, w)
    return maps.reshape(-1, h, w), masks


def image_auroc(scores, labels) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(_check_binary("labels", labels), np.asarray(scores, dtype=np.float64).ravel()))


def pixel_auroc(maps, masks) -> float:
    from sklearn.metrics import roc_auc_score

    maps, masks = np.asarray(maps, dtype=np.float64), np.asarray(masks)
    if maps.size != masks.size:
        raise ValueError(f"aefast.tasks: anomaly maps ({maps.shape}) and masks ({masks.shape}) differ in size")
    return float(roc_auc_score(_check_binary("masks", masks), maps.ravel()))


def region_labels(masks):
    """(N, H, W) int array: 0 for normal pixels, 1..R for the 8-connected defect regions, numbered
    across the whole batch (image i's regions after image i-1's); and R."""
    from scipy import ndimage

    masks = np.asarray(masks).astype(bool)
    out = np.zeros(masks.shape, np.int64)
    count = 0
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m, structure=_EIGHT_CONNECTED)
        out[i] = np.where(lab > 0, lab + count, 0)
        count += n
    return out, count


def pro_curve(maps, masks):
    """The exact (fpr, pro) curve: one point per distinct score (highest threshold first), from
    (0, 0) to (1, 1). Arrays of float64."""
    maps, masks = _maps_and_masks(maps, masks)
    regions, n_regions = region_labels(masks)   # _maps_and_masks ensured both classes are present
    scores = maps.ravel()
    regions = regions.ravel()
    normal = regions == 0
    n_normal = int(normal.sum())
    sizes = np.bincount(regions, minlength=n_regions + 1).astype(np.float64)
    pro_step = np.where(normal, 0.0, 1.0 / (n_regions * sizes[regions]))
    order = np.argsort(-scores, kind="stable")
    fpr = np.cumsum(normal[order]) / n_normal   # counts first: the last point is exactly 1
    pro = np.cumsum(pro_step[order])
    sorted_scores = scores[order]
    # the last index of every run of equal scores: all tied pixels pass the threshold together
    last = np.flatnonzero(np.r_[sorted_scores[1:] != sorted_scores[:-1], True])
    return np.r_[0.0, fpr[last]], np.r_[0.0, pro[last]]


def aupro(maps, masks, fpr_limit: float = 0.3) -> float:
    """Area under the per-region-overlap curve up to ``fpr_limit``, normalised to [0, 1] (see the
    module docstring). ``maps`` and ``masks`` are (N, H, W) or (N, 1, H, W)."""
    if not isinstance(fpr_limit, (int, float)) or not 0 < fpr_limit <= 1:
        raise ValueError(f"aefast.tasks: fpr_limit must be in (0, 1], got {fpr_limit!r}")
    fpr, pro = pro_curve(maps, masks)
    # fpr is non-decreasing from 0 to 1 and may stay put while pro rises (region pixels only):
    # the curve reaches the limit at the first point with fpr >= limit, on the segment from the
    # point before it.
    j = min(int(np.searchsorted(fpr, fpr_limit, side="left")), len(fpr) - 1)
    if fpr[j] == fpr_limit:
        pro_at_limit = pro[j]
    else:
        t = (fpr_limit - fpr[j - 1]) / (fpr[j] - fpr[j - 1])
        pro_at_limit = pro[j - 1] + t * (pro[j] - pro[j - 1])
    x = np.r_[fpr[:j], fpr_limit]
    y = np.r_[pro[:j], pro_at_limit]
    area = float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)))
    return area / fpr_limit

__all__ = ["aupro", "image_auroc", "pixel_auroc", "pro_curve", "region_labels"]
