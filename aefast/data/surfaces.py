"""The harder defect set (``textures_hard``): five procedural surface families and subtle defects.

``make_textures`` paints full-contrast scratches, spots and cracks on one woven family, and a
plain conv autoencoder finds all of them (image and pixel AUROC 1.0). Here:

* every surface is drawn from one of :data:`SURFACE_FAMILIES` (woven gratings, mottled stone,
  wood rings, a perforated dot lattice, brushed metal), so the model has to reconstruct several
  kinds of structure;
* defects are subtle (:data:`SUBTLE_DEFECT_KINDS`): 1-pixel scratches and hairline cracks of low
  contrast, spots of a few pixels, faint stains, and patches where the texture itself is wrong
  (another surface of the same family pasted in, the mean brightness unchanged); their contrast
  is a fraction of the texture's own, additive and of random sign.

Everything is numpy, seeded, and made on the fly: nothing is downloaded.
"""
from __future__ import annotations

import numpy as np

SURFACE_FAMILIES = ("woven", "stone", "wood", "dots", "brushed")
SUBTLE_DEFECT_KINDS = ("thin_scratch", "small_spot", "faint_stain", "hairline_crack", "texture_patch")


def _grid(size):
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _value_noise(rng, size, cells):
    """Value noise: a coarse random grid of (cells+1)^2 values, bilinearly upsampled to size x size
    (a cheap, seedable texture)."""
    coarse = rng.random((cells + 1, cells + 1)).astype(np.float32)
    t = np.linspace(0, cells, size, dtype=np.float32)
    i0 = np.minimum(t.astype(int), cells - 1)
    f = t - i0
    rows = coarse[i0] * (1 - f)[:, None] + coarse[i0 + 1] * f[:, None]
    return rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]


def _normalise(img, rng, contrast):
    """Centre near 0.5 with a given std-like spread, plus fine sensor noise."""
    img = (img - img.mean()) / max(float(img.std()), 1e-6)
    return 0.5 + rng.uniform(-0.05, 0.05) + contrast * img + rng.normal(0, 0.015, img.shape)


def surface(rng, size, family):
    """One (size, size) float32 surface of ``family``, roughly in [0.1, 0.9]."""
    yy, xx = _grid(size)
    if family == "woven":
        a = rng.uniform(0, np.pi)
        img = np.zeros((size, size), np.float32)
        for k in range(2):
            ang = a + k * np.pi / 2
            img += np.sin(rng.uniform(0.55, 0.8) * (xx * np.cos(ang) + yy * np.sin(ang)) + rng.uniform(0, 2 * np.pi))
        img += 0.6 * _value_noise(rng, size, 4)
    elif family == "stone":
        img = sum(w * _value_noise(rng, size, c) for w, c in ((1.0, 3), (0.6, 6), (0.35, 12)))
    elif family == "wood":
        cy, cx = rng.uniform(-1.5, 2.5, 2) * size
        warp = 3.0 * _value_noise(rng, size, 3)
        img = np.sin(rng.uniform(0.7, 1.1) * (np.hypot(yy - cy, xx - cx) + warp))
        img += 0.3 * _value_noise(rng, size, 8)
    elif family == "dots":
        pitch = rng.uniform(4.5, 6.5)
        a = rng.uniform(-0.3, 0.3)
        u = (xx * np.cos(a) + yy * np.sin(a)) / pitch + rng.uniform(0, 1)
        v = (-xx * np.sin(a) + yy * np.cos(a)) / pitch + rng.uniform(0, 1)
        d = np.hypot(u - np.round(u), v - np.round(v))
        img = -np.exp(-(d / 0.22) ** 2) + 0.3 * _value_noise(rng, size, 4)
    elif family == "brushed":
        a = rng.uniform(0, np.pi)
        # noise that varies fast across the brushing direction and slowly along it
        across = (xx * np.cos(a) + yy * np.sin(a))
        along = (-xx * np.sin(a) + yy * np.cos(a))
        freqs = rng.uniform(0.4, 2.0, 8)
        phases = rng.uniform(0, 2 * np.pi, 8)
        img = sum(np.sin(f * across + 0.05 * f * along + p) / f for f, p in zip(freqs, phases))
        img = img + 0.3 * _value_noise(rng, size, 5)
    else:
        raise ValueError(f"aefast.data: unknown surface family {family!r}; choose from {SURFACE_FAMILIES}")
    return _normalise(img.astype(np.float32), rng, rng.uniform(0.08, 0.12)).astype(np.float32)


def _segment_distance(yy, xx, p0, p1):
    d = np.subtract(p1, p0, dtype=np.float32)
    t = np.clip(((yy - p0[0]) * d[0] + (xx - p0[1]) * d[1]) / max(float(d @ d), 1e-6), 0, 1)
    return np.hypot(yy - (p0[0] + t * d[0]), xx - (p0[1] + t * d[1]))


def _subtle_mask(rng, size, kind):
    yy, xx = _grid(size)
    if kind == "thin_scratch":      # one pixel wide, a third to two thirds of the image long
        ang = rng.uniform(0, np.pi)
        length = rng.uniform(0.3, 0.65) * size
        c = rng.uniform(0.25, 0.75, 2) * size
        half = 0.5 * length * np.array([np.sin(ang), np.cos(ang)])
        return _segment_distance(yy, xx, c - half, c + half) < 0.55
    if kind == "small_spot":        # 3 to ~20 pixels
        c = rng.uniform(0.15, 0.85, 2) * size
        return np.hypot(yy - c[0], xx - c[1]) < rng.uniform(1.0, 2.5)
    if kind == "faint_stain":       # an irregular blob of ~20-80 pixels
        c = rng.uniform(0.25, 0.75, 2) * size
        r = rng.uniform(2.5, 5.0) * (0.75 + 0.5 * _value_noise(rng, size, 4))
        return np.hypot(yy - c[0], xx - c[1]) < r
    if kind == "hairline_crack":    # a short jagged walk, under a pixel wide
        p = rng.uniform(0.25, 0.75, 2) * size
        ang = rng.uniform(0, 2 * np.pi)
        mask = np.zeros((size, size), bool)
        for _ in range(int(rng.integers(3, 6))):
            ang += rng.normal(0, 0.8)
            q = p + rng.uniform(0.06, 0.12) * size * np.array([np.sin(ang), np.cos(ang)])
            mask |= _segment_distance(yy, xx, p, q) < 0.5
            p = q
        return mask
    if kind == "texture_patch":     # a square of 5-9 pixels
        side = int(rng.integers(5, 10))
        top, left = rng.integers(0, size - side + 1, 2)
        mask = np.zeros((size, size), bool)
        mask[top:top + side, left:left + side] = True
        return mask
    raise ValueError(f"aefast.data: unknown defect kind {kind!r}; choose from {SUBTLE_DEFECT_KINDS}")


def paint_subtle_defect(rng, img, family, kind):
    """Paints one subtle defect on a (H, W) surface in place; returns its mask (never empty)."""
    size = img.shape[-1]
    mask = _subtle_mask(rng, size, kind)
    if not mask.any():   # a spot placed between pixel centres: keep the nearest pixel
        mask[size // 2, size // 2] = True
    spread = float(img.std())
    if kind == "texture_patch":
        other = surface(rng, size, family)
        img[mask] = other[mask] - other[mask].mean() + img[mask].mean()
        return mask
    # in units of the surface's own std: visible to an eye that knows the texture, never glaring
    amplitude = {"thin_scratch": (2.0, 3.5), "small_spot": (2.5, 4.0), "faint_stain": (1.0, 2.0),
                 "hairline_crack": (2.0, 3.5)}[kind]
    img[mask] += rng.choice((-1.0, 1.0)) * rng.uniform(*amplitude) * spread
    return mask


def make_subtle_surfaces(rng, n, size, defect_fraction, families=SURFACE_FAMILIES, kinds=SUBTLE_DEFECT_KINDS):
    """(images (n, 1, S, S), labels (n,), masks (n, 1, S, S), family index (n,)) as numpy arrays."""
    images = np.empty((n, 1, size, size), np.float32)
    masks = np.zeros((n, 1, size, size), np.float32)
    fam = rng.integers(len(families), size=n)
    labels = np.zeros(n, np.int64)
    labels[rng.permutation(n)[: int(round(defect_fraction * n))]] = 1
    for i in range(n):
        img = surface(rng, size, families[fam[i]])
        if labels[i]:
            masks[i, 0] = paint_subtle_defect(rng, img, families[fam[i]], kinds[int(rng.integers(len(kinds)))])
        images[i, 0] = img.clip(0, 1)
    return images, labels, masks, fam
