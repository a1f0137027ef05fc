"""The embedded data sets: shapes, ranges, seeds, splits, defects and masks; nothing downloaded."""
import hashlib
from importlib import resources

import numpy as np
import pytest
import torch

from aefast import data


def _rows(t):
    return {hashlib.sha1(r.numpy().tobytes()).hexdigest() for r in t.flatten(1)}


def test_mnist_is_package_data_and_splits_cleanly():
    f = resources.files("aefast.data").joinpath("mnist_5k.csv.gz")
    assert f.is_file()
    assert resources.files("aefast.data").joinpath("LICENSE-mnist_5k.txt").is_file()
    d = data.load_mnist(seed=0)
    assert d.train.images.shape == (4000, 1, 28, 28) and d.test.images.shape == (1000, 1, 28, 28)
    assert d.train.images.dtype == torch.float32
    assert 0 <= float(d.train.images.min()) and float(d.train.images.max()) <= 1
    assert torch.bincount(d.test.labels).tolist() == [100] * 10      # stratified: 20% of every class
    assert not _rows(d.train.images) & _rows(d.test.images)            # disjoint splits
    assert len(set(d.train.labels[:50].tolist())) > 5                  # shuffled, not sorted by label


def test_mnist_seeds_and_limit():
    a, b, c = data.load_mnist(seed=1), data.load_mnist(seed=1), data.load_mnist(seed=2)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert not torch.equal(a.train.images, c.train.images)
    small = data.load_mnist(seed=0, limit=100)
    assert len(small.train) == 100 and len(small.test) == 25


def test_sklearn_digits():
    d = data.load_digits(seed=0)
    assert d.train.images.shape[1:] == (1, 8, 8) and len(d.train) + len(d.test) == 1797
    assert float(d.train.images.max()) == 1.0 and float(d.train.images.min()) == 0.0
    from sklearn.datasets import load_digits as sk

    # the two splits together are exactly scikit-learn's set (as a multiset of images)
    ours = sorted(hashlib.sha1(r.numpy().tobytes()).hexdigest()
                  for r in torch.cat([d.train.images, d.test.images]).flatten(1))
    theirs = sorted(hashlib.sha1((r.astype(np.float32) / 16).tobytes()).hexdigest() for r in sk().data)
    assert ours == theirs


def test_textures_defects_and_masks():
    d = data.make_textures(n_train=20, n_test=30, size=32, defect_fraction=0.5, seed=3)
    assert d.train.images.shape == (20, 1, 32, 32) and d.train.labels.sum() == 0
    assert d.train.masks.sum() == 0                                   # training surfaces are defect-free
    t = d.test
    assert int(t.labels.sum()) == 15
    per_image = t.masks.flatten(1).sum(1)
    assert (per_image[t.labels == 1] > 0).all() and (per_image[t.labels == 0] == 0).all()
    assert 0 <= float(t.images.min()) and float(t.images.max()) <= 1
    e = data.make_textures(n_train=20, n_test=30, size=32, seed=3)
    assert torch.equal(e.test.images, t.images) and torch.equal(e.test.masks, t.masks)


@pytest.mark.parametrize("kind", data.DEFECT_KINDS)
def test_add_defects_changes_only_masked_pixels(kind):
    clean = data.make_textures(n_train=1, n_test=1, seed=0).train.images.repeat(6, 1, 1, 1)
    out, labels, masks = data.add_defects(clean, fraction=1.0, kinds=(kind,), seed=1)
    assert labels.tolist() == [1] * 6
    changed = (out != clean)
    assert not changed[masks == 0].any()                              # nothing outside the mask
    assert changed.flatten(1).sum(1).min() > 0                        # every defect is visible
    # and the defect contrasts with the surface: at least 0.2 mean absolute change inside the mask
    assert float((out - clean).abs()[masks == 1].mean()) > 0.2


def test_add_defects_on_digits_are_bright_on_background():
    x = data.load_mnist(seed=0, limit=40).train.images
    out, labels, masks = data.add_defects(x, 0.5, kinds=("scratch", "spot"), seed=0)
    assert int(labels.sum()) == 20
    assert float(out[masks == 1].mean()) > 0.5


def test_shapes_masks_match_images():
    d = data.make_shapes(n_train=30, n_test=10, size=32, seed=0)
    assert d.train.images.shape == d.train.masks.shape == (30, 1, 32, 32)
    assert set(np.unique(d.train.masks.numpy()).tolist()) <= {0.0, 1.0}
    fg = d.train.images[d.train.masks == 1].mean()
    bg = d.train.images[d.train.masks == 0].mean()
    assert float(fg) > float(bg) + 0.15
    assert ((d.train.labels >= 1) & (d.train.labels <= 3)).all()
    assert not torch.equal(data.make_shapes(5, 5, seed=1).train.images, data.make_shapes(5, 5, seed=2).train.images)


def test_load_by_name_and_bad_arguments():
    assert data.load("digits", seed=0).name == "digits"
    with pytest.raises(ValueError, match="unknown data set"):
        data.load("cifar")
    with pytest.raises(ValueError, match="seed"):
        data.load_mnist(seed=-1)
    with pytest.raises(ValueError, match="test_fraction"):
        data.load_digits(test_fraction=1.5)
    with pytest.raises(ValueError, match="n_train"):
        data.make_shapes(n_train=0)
    with pytest.raises(ValueError, match="kinds"):
        data.add_defects(torch.rand(2, 1, 8, 8), kinds=("dent",))
    with pytest.raises(ValueError, match=r"\(N, 1, S, S\)"):
        data.add_defects(torch.rand(2, 3, 8, 8))


# ---------------------------------------------------------------- the harder defect set

from aefast.data import surfaces  # noqa: E402


def test_hard_textures_families_defects_and_masks():
    d = data.make_hard_textures(n_train=30, n_test=60, size=32, seed=4)
    assert d.name == "textures_hard" and d.train.images.shape == (30, 1, 32, 32)
    assert d.train.masks.sum() == 0 and d.train.labels.sum() == 0
    t = d.test
    assert int(t.labels.sum()) == 30
    area = t.masks.flatten(1).sum(1)
    assert (area[t.labels == 1] > 0).all() and (area[t.labels == 0] == 0).all()
    assert 0 <= float(t.images.min()) and float(t.images.max()) <= 1
    assert int(area[t.labels == 1].min()) <= 12                      # some defects are only a few pixels
    e = data.make_hard_textures(n_train=30, n_test=60, size=32, seed=4)
    assert torch.equal(e.test.images, t.images) and torch.equal(e.test.masks, t.masks)
    assert data.load("textures_hard", n_train=5, n_test=4).name == "textures_hard"


@pytest.mark.parametrize("family", surfaces.SURFACE_FAMILIES)
@pytest.mark.parametrize("kind", surfaces.SUBTLE_DEFECT_KINDS)
def test_subtle_defects_are_local_and_low_contrast(family, kind):
    rng = np.random.default_rng([surfaces.SURFACE_FAMILIES.index(family), surfaces.SUBTLE_DEFECT_KINDS.index(kind)])
    clean = surfaces.surface(rng, 32, family)
    spread = float(clean.std())
    assert 0.04 < spread < 0.2                                      # a real texture, of moderate contrast
    img = clean.copy()
    mask = surfaces.paint_subtle_defect(rng, img, family, kind)
    assert mask.any() and not (img != clean)[~mask].any()           # only the masked pixels change
    change = np.abs(img - clean)[mask].mean()
    assert change < 4.5 * spread                                    # subtle: a few texture std at most
    if kind != "texture_patch":
        assert change > 0.5 * spread                                 # but there
    if kind in ("thin_scratch", "hairline_crack"):
        assert mask.sum() < 0.1 * mask.size                          # thin


def test_defect_splits_are_fixed_and_disjoint():
    a, b = data.defect_splits("mnist", seed=0, limit=200), data.defect_splits("mnist", seed=0, limit=200)
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.test.masks, b.test.masks)
    assert not _rows(a.val.images) & _rows(a.test.images)
    assert len(a.train) == 200 and len(a.val) == len(a.test) == 500
    assert not _rows(a.train) & _rows(a.test.images)
    for s in (a.val, a.test):
        assert set(s.labels.tolist()) == {0, 1}
        assert (s.masks.flatten(1).sum(1) > 0).long().tolist() == s.labels.tolist()
    h = data.defect_splits("textures_hard", seed=0, limit=40)
    assert len(h.train) == 40 and len(h.val) + len(h.test) == 40
    with pytest.raises(ValueError, match="no defects"):
        data.defect_splits("shapes")
    with pytest.raises(ValueError, match="families"):
        data.make_hard_textures(n_train=2, n_test=2, families=("marble",))
