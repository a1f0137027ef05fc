"""Fully connected autoencoders: linear (PCA), deep, denoising, stacked denoising, variational.

Their losses, corruption and reparameterisation go through aefast.functional (fused kernels
when present); the layers are torch.nn.Linear, so their twins in aefast.reference.models load
the same state_dict.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from aefast import functional as AF
from aefast.models._common import (Activation, Gaussian, VAEOutput, check_activation, check_corruption,
                                   check_flat_input, check_int, check_loss, check_widths, mlp_layers)
from aefast.nn import Corruption


class FusedOps:
    """The only places where the fully connected models leave torch.nn: their losses, corruption
    and reparameterisation. The twins in aefast.reference.models are these same classes with
    ``ops`` swapped for torch-only versions, so structure and training procedure exist once."""

    reconstruction_loss = staticmethod(AF.reconstruction_loss)
    reparameterize = staticmethod(AF.reparameterize)
    Corruption = Corruption

    @staticmethod
    def kl_divergence(mu, logvar):
        return AF.kl_divergence(mu, logvar, "mean")


class _FlatAutoencoder(nn.Module):
    """forward(x) = decode(encode(x)) reshaped like x; inputs are (N, ...) with in_features per item."""

    ops = FusedOps

    def _flat(self, x):
        return check_flat_input(type(self).__name__, x, self.in_features)

    def forward(self, x):
        return self.decode(self.encode(x)).reshape(x.shape)

    def training_loss(self, x, target=None):
        """The reconstruction loss of a batch (denoising models corrupt their own input)."""
        target = x if target is None else target
        return self.ops.reconstruction_loss(self(x), target, self.loss)

    def anomaly_score(self, x):
        """Per-item reconstruction error (the fused loss's ``per_sample`` reduction)."""
        return self.ops.reconstruction_loss(self(x), x, "mse", "per_sample")


class LinearAutoencoder(_FlatAutoencoder):
    """x -> W_e x + b_e -> W_d h + b_d. With MSE its optimum spans the top ``latent_features``
    principal subspace of the data (Baldi & Hornik 1989), which tests/test_linear_pca.py checks."""

    def __init__(self, in_features: int, latent_features: int, loss: str = "mse"):
        super().__init__()
        name = type(self).__name__
        self.in_features = check_int(name, "in_features", in_features)
        self.latent_features = check_int(name, "latent_features", latent_features)
        self.loss = check_loss(name, loss)
        self.encoder = nn.Linear(in_features, latent_features)
        self.decoder = nn.Linear(latent_features, in_features)

    def encode(self, x):
        return self.encoder(self._flat(x))

    def decode(self, code):
        return self.decoder(code)


class DeepAutoencoder(_FlatAutoencoder):
    """MLP encoder in_features -> hidden... -> latent (linear code) and its mirror decoder."""

    def __init__(self, in_features: int, hidden=(256, 64), latent_features: int = 16, activation: str = "relu",
                 out_activation: str | None = "sigmoid", loss: str = "mse"):
        super().__init__()
        name = type(self).__name__
        self.in_features = check_int(name, "in_features", in_features)
        self.hidden = check_widths(name, "hidden", hidden, allow_empty=True)
        self.latent_features = check_int(name, "latent_features", latent_features)
        self.activation = check_activation(name, "activation", activation)
        self.out_activation = check_activation(name, "out_activation", out_activation)
        self.loss = check_loss(name, loss)
        widths = (in_features, *self.hidden, latent_features)
        self.encoder = nn.Sequential(*mlp_layers(widths, activation, None))
        self.decoder = nn.Sequential(*mlp_layers(widths[::-1], activation, out_activation))

    def encode(self, x):
        return self.encoder(self._flat(x))

    def decode(self, code):
        return self.decoder(code)


class DenoisingAutoencoder(DeepAutoencoder):
    """A DeepAutoencoder trained to undo ``corruption`` (Vincent et al. 2008); the corruption is
    applied in train mode only, so eval-mode forward is the plain reconstruction."""

    def __init__(self, in_features: int, hidden=(256,), latent_features: int = 64, activation: str = "relu",
                 out_activation: str | None = "sigmoid", loss: str = "mse", corruption: str = "masking",
                 level: float = 0.3):
        super().__init__(in_features, hidden, latent_features, activation, out_activation, loss)
        kind, level = check_corruption(type(self).__name__, corruption, level)
        self.corruption = self.ops.Corruption(kind, level)

    def forward(self, x):
        return self.decode(self.encode(self.corruption(x))).reshape(x.shape)


class StackedDenoisingAutoencoder(_FlatAutoencoder):
    """Stacked denoising autoencoder (Vincent et al. 2010).

    Layer k is a one-hidden-layer DAE: encoder ``encoders[k]`` (d_k -> d_{k+1}, ``activation``)
    and decoder ``decoders[k]`` (d_{k+1} -> d_k; ``out_activation`` for k = 0, else ``activation``).
    :meth:`pretrain` trains them greedily, bottom-up: layer k learns to reconstruct the CLEAN codes
    of the (frozen) layers below from a corruption of those codes, applied by ``corruptions[k]``
    to its own input only. The whole stack is then fine-tuned as one deep DAE (``forward`` corrupts
    the input with ``corruptions[0]`` in train mode).
    """

    def __init__(self, in_features: int, hidden=(256, 64), activation: str = "sigmoid",
                 out_activation: str | None = "sigmoid", loss: str = "mse", corruption: str = "masking",
                 level: float = 0.3):
        super().__init__()
        name = type(self).__name__
        self.in_features = check_int(name, "in_features", in_features)
        self.hidden = check_widths(name, "hidden", hidden)
        self.latent_features = self.hidden[-1]
        self.activation = check_activation(name, "activation", activation)
        self.out_activation = check_activation(name, "out_activation", out_activation)
        self.loss = check_loss(name, loss)
        kind, level = check_corruption(name, corruption, level)
        widths = (in_features, *self.hidden)
        self.encoders = nn.ModuleList(nn.Linear(widths[k], widths[k + 1]) for k in range(len(self.hidden)))
        self.decoders = nn.ModuleList(nn.Linear(widths[k + 1], widths[k]) for k in range(len(self.hidden)))
        self.encoder_acts = nn.ModuleList(Activation(activation) for _ in self.hidden)
        self.decoder_acts = nn.ModuleList(Activation(out_activation if k == 0 else activation)
                                          for k in range(len(self.hidden)))
        self.corruptions = nn.ModuleList(self.ops.Corruption(kind, level) for _ in self.hidden)

    @property
    def depth(self) -> int:
        return len(self.hidden)

    def encode_layer(self, h, k):
        return self.encoder_acts[k](self.encoders[k](h))

    def decode_layer(self, z, k):
        return self.decoder_acts[k](self.decoders[k](z))

    def encode(self, x, depth: int | None = None):
        """Clean codes after ``depth`` layers (all by default); no corruption."""
        h = self._flat(x)
        for k in range(self.depth if depth is None else depth):
            h = self.encode_layer(h, k)
        return h

    def decode(self, code):
        for k in reversed(range(self.depth)):
            code = self.decode_layer(code, k)
        return code

    def forward(self, x):
        h = self.corruptions[0](self._flat(x))
        for k in range(self.depth):
            h = self.encode_layer(h, k)
        return self.decode(h).reshape(x.shape)

    def layer_loss(self, h, k):
        """Layer k's denoising loss on a batch of its clean inputs ``h``: corrupt, encode, decode,
        compare with the clean ``h``."""
        return self.ops.reconstruction_loss(self.decode_layer(self.encode_layer(self.corruptions[k](h), k), k), h, self.loss)

    def pretrain(self, x, epochs: int = 5, batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
                 progress: bool = False, layers=None):
        """Greedy layer-wise pretraining. Returns ``history[k]``: layer k's mean denoising loss per epoch,
        plus, at index 0 of each list, its loss before training (evaluated with the same corruption).

        The lower layers are frozen: their clean codes of the whole set are computed once under
        no_grad, so layer k never sees a corrupted code from below; only layer k's parameters are
        in its optimizer.
        """
        from aefast.training import progress_bar

        check_int(type(self).__name__, "epochs", epochs, minimum=0)
        check_int(type(self).__name__, "batch_size", batch_size)
        data = self._flat(x).detach()
        history = []
        was_training = self.training
        for k in (range(self.depth) if layers is None else layers):
            with torch.no_grad():
                self.eval()
                clean = self.encode(data, depth=k)       # the clean codes of the layers below
            self.train()
            params = [*self.encoders[k].parameters(), *self.decoders[k].parameters()]
            opt = torch.optim.Adam(params, lr=lr)
            losses = []
            with torch.no_grad():
                losses.append(float(self.layer_loss(clean, k)))
            bar = progress_bar(range(epochs), desc=f"pretrain layer {k + 1}/{self.depth}", disable=not progress)
            for epoch in bar:
                order = torch.from_numpy(np.random.default_rng([seed, k, epoch]).permutation(len(clean)))
                total = 0.0
                for start in range(0, len(clean), batch_size):
                    h = clean[order[start:start + batch_size]]
                    loss = self.layer_loss(h, k)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += float(loss.detach()) * len(h)
                losses.append(total / len(clean))
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
            history.append(losses)
        self.train(was_training)
        return history


class VAE(nn.Module):
    """Variational autoencoder (Kingma & Welling 2014) with MLP encoder/decoder.

    ``forward(x) -> VAEOutput(recon, mu, logvar, z)``; z is sampled (fused reparameterisation) in
    train mode and is ``mu`` in eval mode. The loss is the per-item summed reconstruction loss
    (``bce`` on sigmoid outputs by default) plus ``beta`` times the KL term, averaged over the batch.
    """

    ops = FusedOps

    def __init__(self, in_features: int, hidden=(256,), latent_features: int = 16, activation: str = "relu",
                 out_activation: str | None = "sigmoid", loss: str = "bce", beta: float = 1.0):
        super().__init__()
        name = type(self).__name__
        self.in_features = check_int(name, "in_features", in_features)
        self.hidden = check_widths(name, "hidden", hidden, allow_empty=True)
        self.latent_features = check_int(name, "latent_features", latent_features)
        self.activation = check_activation(name, "activation", activation)
        self.out_activation = check_activation(name, "out_activation", out_activation)
        self.loss = check_loss(name, loss)
        self.beta = float(beta)
        widths = (in_features, *self.hidden)
        self.encoder = nn.Sequential(*mlp_layers(widths, activation, activation))
        self.fc_mu = nn.Linear(widths[-1], latent_features)
        self.fc_logvar = nn.Linear(widths[-1], latent_features)
        self.decoder = nn.Sequential(*mlp_layers((latent_features, *widths[::-1]), activation, out_activation))

    def encode(self, x) -> Gaussian:
        h = self.encoder(check_flat_input(type(self).__name__, x, self.in_features))
        return Gaussian(self.fc_mu(h), self.fc_logvar(h))

    def decode(self, z):
        return self.decoder(z)

    def sample_latent(self, g: Gaussian):
        return self.ops.reparameterize(g.mu, g.logvar) if self.training else g.mu

    def forward(self, x) -> VAEOutput:
        g = self.encode(x)
        z = self.sample_latent(g)
        return VAEOutput(self.decode(z).reshape(x.shape), g.mu, g.logvar, z)

    def training_loss(self, x, target=None):
        out = self(x)
        target = x if target is None else target
        recon = self.ops.reconstruction_loss(out.recon, target, self.loss, "sum") / x.shape[0]
        return recon + self.beta * self.ops.kl_divergence(out.mu, out.logvar)

    def anomaly_score(self, x):
        return self.ops.reconstruction_loss(self(x).recon, x, "mse", "per_sample")
