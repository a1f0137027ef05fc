"""A LinearAutoencoder trained with MSE on digits spans the top principal subspace (Baldi & Hornik 1989)."""
import numpy as np
import pytest
import torch

import aefast
from aefast.data import load_digits
from aefast.models import LinearAutoencoder
from aefast.tasks import compare_with_pca, fit_linear_autoencoder, principal_angles


@pytest.fixture(scope="module")
def digits():
    return load_digits(seed=0)


@pytest.mark.parametrize("latent", [4, 10])
def test_linear_autoencoder_spans_pca_subspace(digits, latent):
    torch.manual_seed(0)
    model = LinearAutoencoder(64, latent)
    before = compare_with_pca(model, digits.train.images, digits.test.images)
    assert before.max_angle > 30          # a random decoder is far from the PCA subspace
    with aefast.set_backend("cpu"):
        fit_linear_autoencoder(model, digits.train.images)
    after = compare_with_pca(model, digits.train.images, digits.test.images)
    assert after.angles_deg.shape == (latent,)
    assert after.max_angle < 2.0, after.summary()
    # and it reconstructs held-out digits as well as PCA does
    assert after.ae_mse == pytest.approx(after.pca_mse, rel=0.02)


def test_principal_angles_known_cases():
    e = np.eye(4)
    assert principal_angles(e[:, :2], e[:, :2]).max() == pytest.approx(0, abs=1e-6)
    assert principal_angles(e[:, :2], e[:, 2:]).min() == pytest.approx(90)
    rot = np.array([[1, 0], [0, np.cos(0.1)], [0, np.sin(0.1)], [0, 0]])
    assert principal_angles(e[:, :2], rot).max() == pytest.approx(np.degrees(0.1))
