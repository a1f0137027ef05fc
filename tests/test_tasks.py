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


# ---------------------------------------------------------------- detection variants

from aefast.models import ConvAutoencoder  # noqa: E402
from aefast.reference import models as R  # noqa: E402
from aefast.tasks import (BEST_DIGITS, AnomalyMap, Detector, DetectorVariant, RestorationObjective,  # noqa: E402
                          SeedSummary, aupro, detect, split_metrics, training_corruption)


@pytest.mark.parametrize("index_reuse", ["all", "deepest", "none"])
def test_index_reuse_variants_match_their_twin(index_reuse):
    torch.manual_seed(0)
    model = ConvAutoencoder(1, channels=(4, 6), activation="silu", index_reuse=index_reuse)
    twin = R.ConvAutoencoder(1, channels=(4, 6), activation="silu", index_reuse=index_reuse)
    twin.load_state_dict(model.state_dict(), strict=True)
    x = torch.rand(2, 1, 13, 11)                         # odd sizes: the floor-mode pool and nearest upsampling
    out_m, out_t = model(x), twin(x)
    torch.testing.assert_close(out_m, out_t, rtol=1e-5, atol=1e-5)
    w = torch.randn_like(out_m)
    (out_m * w).sum().backward()
    (out_t * w).sum().backward()
    grads = dict(twin.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-5, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_index_free_decoder_ignores_the_indices_and_deepest_keeps_only_its_own():
    torch.manual_seed(0)
    x = torch.rand(3, 1, 8, 8)
    for reuse, used in (("none", ()), ("deepest", (1,)), ("all", (0, 1))):
        model = ConvAutoencoder(1, channels=(3, 4), index_reuse=reuse).eval()
        code = model.encode(x)
        base = model.decode(code)
        for stage in range(2):   # scramble one stage's indices: only a stage that reuses them notices
            scrambled = list(code.indices)
            scrambled[stage] = (scrambled[stage].long() + 1).remainder(4).to(scrambled[stage].dtype)
            changed = not torch.equal(model.decode(code._replace(indices=tuple(scrambled))), base)
            assert changed == (stage in used), (reuse, stage)
    with pytest.raises(ValueError, match="index_reuse"):
        ConvAutoencoder(1, index_reuse="some")
    # same parameters whatever the decoder: a state_dict moves between the variants
    a, b = ConvAutoencoder(1, (3, 4), index_reuse="all"), ConvAutoencoder(1, (3, 4), index_reuse="none")
    b.load_state_dict(a.state_dict(), strict=True)


def test_anomaly_map_kinds_and_scores():
    x = torch.zeros(2, 1, 16, 16)
    recon = x.clone()
    recon[0, 0, 5, 7] = 1.0                                   # one wrong pixel in image 0
    amap, score = AnomalyMap("mse")(x, recon)
    assert amap.shape == (2, 16, 16) and float(amap[0, 5, 7]) == 1.0 and float(amap[1].abs().max()) == 0
    torch.testing.assert_close(score, amap.flatten(1).mean(1))
    smooth, _ = AnomalyMap("mse", sigma=1.0)(x, recon)
    assert abs(float(smooth[0].sum()) - 1.0) < 1e-5           # a normalised blur keeps the mass (away from borders)
    assert int(smooth[0].argmax()) == 5 * 16 + 7 and float(smooth[0, 5, 7]) < 0.2
    _, top = AnomalyMap("mse", top_fraction=1 / 256)(x, recon)   # the top 1 pixel
    torch.testing.assert_close(top, torch.tensor([1.0, 0.0]))
    ssim_map, ssim_score = AnomalyMap("ssim")(torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16))
    same_map, _ = AnomalyMap("ssim")(recon, recon)
    assert float(same_map.abs().max()) < 1e-5 and float(ssim_map.mean()) > 0.5
    for bad in (dict(kind="l1"), dict(sigma=-1), dict(top_fraction=0)):
        with pytest.raises(ValueError):
            AnomalyMap(**bad)


@pytest.mark.parametrize("kind", ["gaussian", "masking", "salt_pepper", "inpaint", "synthetic"])
def test_training_corruptions_change_the_input_and_follow_the_seed(kind):
    x = data.load_mnist(seed=0, limit=32).train.images
    torch.manual_seed(3)
    a = training_corruption(x, kind, 0.3 if kind != "synthetic" else 0.0)
    torch.manual_seed(3)
    b = training_corruption(x, kind, 0.3 if kind != "synthetic" else 0.0)
    assert torch.equal(a, b) and a.shape == x.shape
    changed = (a != x).flatten(1).any(1)
    assert changed.float().mean() > 0.5, kind                 # most images are corrupted
    if kind in ("inpaint", "synthetic"):
        assert 0 <= float(a.min()) and float(a.max()) <= 1   # greys and other images stay in range
        frac = (a != x).float().mean()
        assert 0.005 < float(frac) < 0.5                      # local, not the whole image
    assert torch.equal(training_corruption(x, "none"), x)
    with pytest.raises(ValueError, match="corruption"):
        training_corruption(x, "cutout")


def test_restoration_objective_targets_the_clean_image():
    torch.manual_seed(0)
    model = ConvAutoencoder(1, channels=(4,))
    x = torch.rand(4, 1, 8, 8)
    obj = RestorationObjective(model, "inpaint")
    torch.manual_seed(5)
    loss = obj.training_loss(x)
    torch.manual_seed(5)
    want = ((model(training_corruption(x, "inpaint")) - x) ** 2).mean()
    torch.testing.assert_close(loss, want)


def test_synthetic_anomaly_training_finds_painted_defects_better_than_plain():
    """The point of the variant table at small scale: on digits, a model trained to remove synthetic
    anomalies (a generator unlike the test painter) with only the deepest stage's indices beats the
    plain index-reusing autoencoder on test AUPRO, the same splits and seed."""
    from aefast.data import defect_splits

    s = defect_splits("mnist", seed=0, limit=1200)
    plain = DetectorVariant(channels=(8, 16), epochs=3, index_reuse="all", corruption="none",
                            sigma=BEST_DIGITS.sigma, top_fraction=BEST_DIGITS.top_fraction)
    best = plain.replace(index_reuse=BEST_DIGITS.index_reuse, corruption=BEST_DIGITS.corruption,
                         level=BEST_DIGITS.level)
    scores = {}
    for name, v in (("plain", plain), ("best", best)):
        detector, res = v.train(s.train, seed=0)
        assert res.history[-1] < res.history[0]
        scores[name] = split_metrics(detector, s.test)
    assert scores["best"]["aupro"] > scores["plain"]["aupro"] + 0.05, scores
    # measured here: best 0.83 / 0.93 / 0.78, plain 0.77 / 0.91 / 0.71 (image / pixel AUROC / AUPRO)
    assert scores["best"]["image_auroc"] > max(0.8, scores["plain"]["image_auroc"]), scores
    assert scores["best"]["pixel_auroc"] > max(0.9, scores["plain"]["pixel_auroc"]), scores


def test_evaluate_anomaly_reports_aupro_and_detect_outputs():
    torch.manual_seed(0)
    model = ConvAutoencoder(1, channels=(4,))
    s = data.defect_splits("mnist", seed=0, limit=80)
    det = Detector(model, AnomalyMap("mse", sigma=1.0, top_fraction=0.05))
    report = evaluate_anomaly(det, s.val, s.test)
    recon, maps, scores = detect(det, s.test.images)
    assert recon.shape == s.test.images.shape and maps.shape == (len(s.test), 28, 28)
    torch.testing.assert_close(report.scores, scores)
    assert report.aupro == pytest.approx(aupro(maps, s.test.masks))
    assert "AUPRO" in report.summary()
    summary = SeedSummary()
    summary.add({"aupro": 0.5})
    summary.add({"aupro": 0.7})
    assert summary.mean("aupro") == pytest.approx(0.6) and summary.std("aupro") == pytest.approx(0.1414, abs=1e-3)
    assert "±" in summary.format("aupro")
