"""Dimensionality reduction: an autoencoder's codes, and how they compare with PCA.

For a LinearAutoencoder trained with MSE the decoder's columns span the top principal
subspace (Baldi & Hornik 1989); :func:`principal_angles` measures how close (scipy's
subspace_angles, in degrees). For every model, :func:`compare_with_pca` also compares the test
reconstruction error with PCA's at the same number of components.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from aefast.training import batched


def codes(model, images, batch_size: int = 256, device="cpu"):
    """(N, latent) codes: the encoder output flattened (the mean for VAEs, the deepest map for conv AEs)."""
    model.eval()

    def enc(x):
        c = model.encode(x)
        c = c[0] if isinstance(c, tuple) else c
        return c.flatten(1)

    return batched(enc, images, batch_size, device)


def fit_linear_autoencoder(model, images, max_iter: int = 2000) -> float:
    """Trains a LinearAutoencoder (or any model with ``training_loss``) by full-batch L-BFGS on its
    fused MSE and returns the final training loss. L-BFGS converges onto the principal subspace far
    more tightly than minibatch Adam, whose gradient noise leaves the directions with a small
    eigengap unresolved for thousands of steps."""
    x = images.flatten(1) if getattr(model, "in_features", None) else images
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=max_iter, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-10, tolerance_change=1e-14)

    def closure():
        opt.zero_grad()
        loss = model.training_loss(x)
        loss.backward()
        return loss

    model.train()
    opt.step(closure)
    model.eval()
    with torch.no_grad():
        return float(model.training_loss(x))


def decoder_subspace(model) -> np.ndarray:
    """(in_features, latent) basis of the subspace a linear decoder maps onto."""
    weight = getattr(getattr(model, "decoder", None), "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError("aefast.tasks: principal angles need a linear decoder (a LinearAutoencoder)")
    return weight.detach().cpu().double().numpy()


def principal_angles(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Principal angles (degrees, largest first) between the column spans of a and b."""
    from scipy.linalg import subspace_angles

    return np.degrees(subspace_angles(np.asarray(a, np.float64), np.asarray(b, np.float64)))


class PCAComparison(NamedTuple):
    n_components: int
    ae_mse: float              # test reconstruction MSE of the autoencoder
    pca_mse: float             # test reconstruction MSE of PCA with the same number of components
    angles_deg: np.ndarray | None   # principal angles to the PCA subspace (linear decoders only)
    explained_variance: float  # PCA's explained variance ratio at n_components

    @property
    def max_angle(self) -> float | None:
        return None if self.angles_deg is None else float(self.angles_deg.max())

    def summary(self) -> str:
        angles = "" if self.angles_deg is None else f"  largest principal angle to PCA {self.max_angle:.3f} deg"
        return (f"{self.n_components} components: AE test MSE {self.ae_mse:.5f}  PCA test MSE {self.pca_mse:.5f} "
                f"(PCA explains {100 * self.explained_variance:.1f}% of the variance){angles}")


def compare_with_pca(model, train_images, test_images, n_components: int | None = None, batch_size: int = 256,
                     device="cpu") -> PCAComparison:
    from sklearn.decomposition import PCA

    n_components = n_components or int(getattr(model, "latent_features"))
    train = train_images.flatten(1).double().numpy()
    test = test_images.flatten(1).double().numpy()
    pca = PCA(n_components=n_components).fit(train)
    pca_mse = float(((pca.inverse_transform(pca.transform(test)) - test) ** 2).mean())
    model.eval()

    def recon(x):
        out = model(x)
        return out[0] if isinstance(out, tuple) else out

    ae = batched(recon, test_images, batch_size, device).flatten(1).double().numpy()
    ae_mse = float(((ae - test) ** 2).mean())
    angles = None
    if type(model).__name__ == "LinearAutoencoder":
        angles = principal_angles(decoder_subspace(model), pca.components_.T)
    return PCAComparison(n_components, ae_mse, pca_mse, angles, float(pca.explained_variance_ratio_.sum()))
