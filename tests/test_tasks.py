"""Quality on the embedded data at reduced size (the commands print the full-size figures), and
the task metrics on cases whose answer is known."""
import numpy as np
import pytest
import torch

import aefast
from aefast import data
from aefast.data import Split
from aefast.models import ConvDenoisingAutoencoder, LinearAutoencoder, SegNetAutoencoder
from aefast.tasks import (anomaly_maps, anomaly_scores, best_f1_threshold, codes, compare_with_pca, dice,
                          evaluate_anomaly, evaluate_segmentation, image_auroc, iou, pixel_auroc, reconstruct)
from aefast.training import fit


@pytest.fixture(autouse=True)
def _cpu_backend():
    with aefast.set_backend("cpu"):
        yield


def test_conv_denoising_autoencoder_beats_identity_baseline_3x():
    d = data.load_mnist(seed=0, limit=1000)
    torch.manual_seed(0)
    model = ConvDenoisingAutoencoder(1, channels=(8, 16), corruption="gaussian", level=0.3)
    res = fit(model, d.train.images, epochs=3, batch_size=32, lr=3e-3, progress=False)
    assert res.history[-1] < res.history[0]
    x = d.test.images
    noisy = x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    mse_model = float(((reconstruct(model, noisy) - x) ** 2).mean())
    mse_identity = float(((noisy - x) ** 2).mean())
    assert mse_identity / mse_model >= 3.0, (mse_model, mse_identity)


def test_texture_defect_detection_auroc():
    tx = data.make_textures(n_train=300, n_test=200, seed=0)
    torch.manual_seed(0)
    model = ConvDenoisingAutoencoder(1, channels=(8, 16), level=0.1)
    fit(model, tx.train.images, epochs=4, batch_size=32, lr=3e-3, progress=False)
    t = tx.test
    val, test = Split(t.images[:100], t.labels[:100], t.masks[:100]), Split(t.images[100:], t.labels[100:], t.masks[100:])
    report = evaluate_anomaly(model, val, test)
    assert report.image_auroc >= 0.95, report.summary()
    assert report.pixel_auroc >= 0.9, report.summary()
    assert report.test_f1 >= 0.8, report.summary()
    assert report.scores.shape == (100,) and report.maps.shape == (100, 32, 32)


def test_shapes_segmentation_mean_iou():
    sh = data.make_shapes(n_train=300, n_test=100, size=24, seed=0)
    torch.manual_seed(0)
    model = SegNetAutoencoder(1, num_classes=1, channels=(8, 16))
    fit(model, sh.train.images, sh.train.masks, epochs=8, batch_size=16, lr=1e-2, progress=False)
    report = evaluate_segmentation(model, sh.test)
    assert report.mean_iou >= 0.85, report.summary()
    assert report.iou[1] >= 0.7, report.summary()        # the shapes themselves, not just the background


# ---------------------------------------------------------------- metrics on known answers

def test_iou_and_dice_known_values():
    pred = torch.tensor([[[1, 1, 0, 0]]])
    target = torch.tensor([[[1, 0, 0, 0]]])
    assert iou(pred, target) == pytest.approx([2 / 3, 1 / 2])
    assert dice(pred, target) == pytest.approx([0.8, 2 / 3])
    assert iou(target, target) == [1.0, 1.0]
    with pytest.raises(ValueError, match="differ"):
        iou(pred, target[..., :2])


def test_auroc_and_best_f1_threshold_known_values():
    assert image_auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert image_auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0
    thr, f1 = best_f1_threshold([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1])
    assert f1 == 1.0 and 0.2 < thr <= 0.8
    maps = np.zeros((2, 4, 4))
    masks = np.zeros((2, 4, 4))
    maps[0, 1, 1] = masks[0, 1, 1] = 1
    assert pixel_auroc(maps, masks) == 1.0
    with pytest.raises(ValueError, match="one class"):
        image_auroc([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match="0/1"):
        image_auroc([0.1, 0.2], [0, 2])


def test_anomaly_scores_are_the_per_sample_loss():
    torch.manual_seed(0)
    model = ConvDenoisingAutoencoder(1, channels=(4,))
    x = torch.rand(5, 1, 8, 8)
    model.eval()
    with torch.no_grad():
        r = model(x)
    torch.testing.assert_close(anomaly_scores(model, x), ((r - x) ** 2).flatten(1).mean(1))
    torch.testing.assert_close(anomaly_maps(model, x), ((r - x) ** 2)[:, 0])


def test_codes_and_pca_comparison_shapes():
    d = data.load_digits(seed=0, limit=200)
    model = LinearAutoencoder(64, 3)
    assert codes(model, d.test.images).shape == (len(d.test), 3)
    cmp = compare_with_pca(model, d.train.images, d.test.images)
    assert cmp.n_components == 3 and cmp.angles_deg.shape == (3,)
    assert cmp.pca_mse < cmp.ae_mse          # an untrained AE is worse than PCA
