"""AUPRO (aefast.tasks.aupro) against a case worked by hand and a brute-force computation."""
import numpy as np
import pytest

from aefast.tasks import aupro, pro_curve, region_labels


def test_hand_worked_case():
    # Image A: a 2-pixel region scored 0.9 and 0.2, normal pixels 0.5, 0.1.
    # Image B: a 1-pixel region scored 0.8, normal pixels 0.3, 0.0, 0.05.
    # Thresholds from the top: 0.9 -> PRO 1/2 * 1/2 = 0.25, FPR 0; 0.8 -> PRO 0.75; 0.5 -> FPR 1/5;
    # 0.3 -> FPR 2/5; 0.2 -> PRO 1.0; 0.1, 0.05, 0.0 -> FPR 3/5, 4/5, 1.
    maps = np.array([[[0.9, 0.2, 0.5, 0.1]], [[0.3, 0.0, 0.05, 0.8]]])
    masks = np.array([[[1, 1, 0, 0]], [[0, 0, 0, 1]]])
    fpr, pro = pro_curve(maps, masks)
    np.testing.assert_allclose(fpr, [0, 0, 0, 0.2, 0.4, 0.4, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(pro, [0, 0.25, 0.75, 0.75, 0.75, 1.0, 1.0, 1.0, 1.0])
    # PRO is 0.75 on all of [0, 0.3]: area 0.225, normalised 0.75
    assert aupro(maps, masks) == pytest.approx(0.75, abs=1e-12)
    # up to 0.5: 0.75 * 0.4 + 1.0 * 0.1 = 0.4, normalised 0.8
    assert aupro(maps, masks, fpr_limit=0.5) == pytest.approx(0.8, abs=1e-12)


def test_tied_scores_cross_together_and_the_limit_interpolates():
    # One region pixel and one normal pixel with the same score: the curve jumps from (0, 0) to
    # (1, 1) in one step; at FPR 0.3 it is at PRO 0.3, area 0.045, normalised 0.15.
    maps = np.array([[[0.5, 0.5]]])
    masks = np.array([[[1, 0]]])
    assert aupro(maps, masks) == pytest.approx(0.15, abs=1e-12)


def test_regions_are_8_connected_and_weighted_equally():
    masks = np.zeros((1, 5, 5), int)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 2, 2] = 1     # one diagonal region of 3 pixels
    masks[0, 4, 4] = 1                                        # a separate single pixel
    labels, n = region_labels(masks)
    assert n == 2 and labels[0, 0, 0] == labels[0, 2, 2] != labels[0, 4, 4]
    maps = np.zeros((1, 5, 5))
    maps[0, 4, 4] = 1.0          # only the small region is found: PRO 0.5 from FPR 0 on
    # exactly: curve (0,0) -> (0,0.5) -> (1,1) [all the rest tie at 0]; at 0.3 PRO is 0.65;
    # area 0.3 * (0.5 + 0.65) / 2 = 0.1725, normalised 0.575
    assert aupro(maps, masks) == pytest.approx(0.575, abs=1e-12)


def _brute_regions(mask):
    """8-connected components by flood fill: a list of pixel lists."""
    h, w = mask.shape
    seen = np.zeros_like(mask, bool)
    regions = []
    for y in range(h):
        for x in range(w):
            if mask[y, x] and not seen[y, x]:
                stack, pixels = [(y, x)], []
                seen[y, x] = True
                while stack:
                    cy, cx = stack.pop()
                    pixels.append((cy, cx))
                    for dy in (-1, 0, 1):
                        for dx in (-1, 0, 1):
                            ny, nx = cy + dy, cx + dx
                            if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                                seen[ny, nx] = True
                                stack.append((ny, nx))
                regions.append(pixels)
    return regions


def _brute_aupro(maps, masks, limit):
    regions = [[maps[i][tuple(np.array(r).T)] for r in _brute_regions(masks[i])] for i in range(len(maps))]
    regions = [r for per_image in regions for r in per_image]
    normal = maps[masks == 0]
    points = [(0.0, 0.0)]
    for t in sorted(set(maps.ravel().tolist()), reverse=True):
        fpr = float(np.mean(normal >= t))
        pro = float(np.mean([np.mean(r >= t) for r in regions]))
        points.append((fpr, pro))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        if x0 >= limit:
            break
        if x1 > limit:   # clip the segment at the limit, linearly
            y1 = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
            x1 = limit
        area += 0.5 * (y0 + y1) * (x1 - x0)
    return area / limit


@pytest.mark.parametrize("seed", range(12))
def test_matches_brute_force_on_random_masks(seed):
    rng = np.random.default_rng(seed)
    n, h, w = int(rng.integers(1, 4)), int(rng.integers(3, 9)), int(rng.integers(3, 9))
    masks = (rng.random((n, h, w)) < rng.uniform(0.1, 0.4)).astype(int)
    masks[0, 0, 0], masks[-1, -1, -1] = 1, 0                 # at least one region, one normal pixel
    # coarse scores make many ties, shifted up inside the masks so that the curve is not trivial
    maps = np.round(rng.random((n, h, w)) + 0.5 * masks * rng.random(), 1 if seed % 2 else 3)
    for limit in (0.3, 0.05, 1.0):
        assert aupro(maps, masks, fpr_limit=limit) == pytest.approx(_brute_aupro(maps, masks, limit), abs=1e-6)


def test_perfect_and_channel_axis_and_bad_inputs():
    rng = np.random.default_rng(0)
    masks = np.zeros((2, 1, 6, 6), int)
    masks[0, 0, 2:4, 2:4] = 1
    maps = rng.random((2, 1, 6, 6)) * 0.5 + masks             # every defect pixel above every normal one
    assert aupro(maps, masks) == pytest.approx(1.0)
    assert aupro(maps[:, 0], masks[:, 0]) == aupro(maps, masks)
    with pytest.raises(ValueError, match="one class"):        # no defect region at all
        aupro(maps, np.zeros_like(masks))
    with pytest.raises(ValueError, match="differ in size"):
        aupro(maps[:1], masks)
    with pytest.raises(ValueError, match="0/1"):
        aupro(maps, masks * 2)
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(maps, masks, fpr_limit=0)
    with pytest.raises(ValueError, match="NaN"):
        aupro(np.full_like(maps, np.nan), masks)
