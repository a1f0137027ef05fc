"""torch.nn-only twins of every model in aefast.models.

Same class names, constructor arguments, submodule names and parameter shapes, so that
``twin.load_state_dict(model.state_dict(), strict=True)`` works both ways; same encode /
decode / forward / training_loss. Here every block is plain PyTorch: nn.Conv2d + activation +
F.max_pool2d(return_indices=True) for ConvPool2d, F.max_unpool2d + nn.ConvTranspose2d +
activation for UnpoolConvTranspose2d, F.mse_loss & co. for the fused loss, torch.randn / rand
for corruption and reparameterisation. They are the speed baseline of ``aefast demo`` and the
specification the fused models are tested against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aefast.models import mlp as _mlp
from aefast.models._common import (ConvCode, FCNFeatures, Gaussian, VAEOutput, activation, check_activation,
                                   check_code, check_corruption, check_image_input, check_index_reuse, check_int,
                                   check_kernel, check_loss, check_widths, code_from_tensor, stage_sizes,
                                   upsample_nearest)


# ================================================================ torch-only building blocks

def reconstruction_loss(input, target, kind="mse", reduction="mean"):
    if kind == "mse":
        loss = F.mse_loss(input, target, reduction="none")
    elif kind == "l1":
        loss = F.l1_loss(input, target, reduction="none")
    elif kind == "huber":
        loss = F.huber_loss(input, target, reduction="none")
    elif kind == "bce":
        loss = F.binary_cross_entropy(input, target, reduction="none")
    else:
        loss = F.binary_cross_entropy_with_logits(input, target, reduction="none")
    if reduction == "per_sample":
        return loss.flatten(1).mean(1)
    return {"mean": loss.mean, "sum": loss.sum, "none": lambda: loss}[reduction]()


def kl_divergence(mu, logvar):
    return (-0.5 * (1 + logvar - mu * mu - logvar.exp())).flatten(1).sum(1).mean()


class Corruption(nn.Module):
    """Train-mode corruption written with torch's RNG: gaussian (std=level), masking (a fraction
    ``level`` zeroed), salt_pepper (a fraction ``level`` set to 0 or 1 by a fair coin)."""

    def __init__(self, kind="gaussian", level=0.1):
        super().__init__()
        self.kind, self.level = kind, level

    def forward(self, x):
        if not self.training or self.level == 0:
            return x
        if self.kind == "gaussian":
            return x + self.level * torch.randn_like(x)
        u = torch.rand_like(x)
        if self.kind == "masking":
            return torch.where(u < self.level, torch.zeros_like(x), x)
        coin = torch.rand_like(x)
        return torch.where(u < self.level, (coin >= 0.5).to(x.dtype), x)


class ConvPool2d(nn.Conv2d):
    """nn.Conv2d -> activation -> F.max_pool2d(return_indices=True)."""

    def __init__(self, in_channels, out_channels, kernel_size, padding=0, activation="relu", pool_size=2):
        super().__init__(in_channels, out_channels, kernel_size, padding=padding)
        self.activation, self.pool_size = activation, pool_size

    def forward(self, x):
        return F.max_pool2d(activation(super().forward(x), self.activation), self.pool_size, return_indices=True)


class UnpoolConvTranspose2d(nn.ConvTranspose2d):
    """F.max_unpool2d -> nn.ConvTranspose2d -> activation; with ``indices=None``, nearest-neighbour
    upsampling to ``output_size`` instead of the unpool (the index-free decoder stage)."""

    def __init__(self, in_channels, out_channels, kernel_size, padding=0, activation=None, pool_size=2):
        super().__init__(in_channels, out_channels, kernel_size, padding=padding)
        self.activation, self.pool_size = activation, pool_size

    def forward(self, x, indices, output_size=None):  # type: ignore[override]
        if indices is None:
            u = upsample_nearest(x, output_size)
        else:
            u = F.max_unpool2d(x, indices, self.pool_size, output_size=output_size)
        return activation(super().forward(u), self.activation)


def _flat_indices(indices, pool_size, sizes):
    """The fused models may keep uint8 window offsets; the twin's unpool wants torch's flat ones."""
    out = []
    for idx, hw in zip(indices, sizes):
        if idx.dtype == torch.uint8:
            oh = torch.arange(idx.shape[-2], device=idx.device).view(-1, 1)
            ow = torch.arange(idx.shape[-1], device=idx.device).view(1, -1)
            off = idx.long()
            idx = (oh * pool_size + off // pool_size) * hw[1] + ow * pool_size + off % pool_size
        out.append(idx)
    return tuple(out)


# ================================================================ fully connected models
#
# Their layers are torch.nn.Linear already; only losses, corruption and reparameterisation are
# fused. So the twins are aefast's own classes with those swapped for the torch-only versions
# above: same structure and training procedure, written once in aefast/models/mlp.py.

def _reparameterize(mu, logvar):
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


class _TorchOps:
    reconstruction_loss = staticmethod(reconstruction_loss)
    kl_divergence = staticmethod(kl_divergence)
    reparameterize = staticmethod(_reparameterize)
    Corruption = Corruption


class LinearAutoencoder(_mlp.LinearAutoencoder):
    ops = _TorchOps


class DeepAutoencoder(_mlp.DeepAutoencoder):
    ops = _TorchOps


class DenoisingAutoencoder(_mlp.DenoisingAutoencoder):
    ops = _TorchOps


class StackedDenoisingAutoencoder(_mlp.StackedDenoisingAutoencoder):
    ops = _TorchOps


class VAE(_mlp.VAE):
    ops = _TorchOps


# ================================================================ convolutional models

class ConvAutoencoder(nn.Module):
    def __init__(self, in_channels: int = 1, channels=(32, 64), kernel_size: int = 3, activation: str = "relu",
                 out_activation: str | None = "sigmoid", pool_size: int = 2, loss: str = "mse",
                 index_format: str = "flat", index_reuse: str = "all"):
        super().__init__()
        name = type(self).__name__
        self.in_channels = check_int(name, "in_channels", in_channels)
        self.channels = check_widths(name, "channels", channels)
        self.kernel_size = check_kernel(name, kernel_size)
        self.activation = check_activation(name, "activation", activation)
        self.out_activation = check_activation(name, "out_activation", out_activation)
        self.pool_size = check_int(name, "pool_size", pool_size, minimum=2)
        self.loss = check_loss(name, loss)
        self.index_format = index_format
        self.index_reuse = index_reuse
        self.reuses_indices = check_index_reuse(name, index_reuse, len(self.channels))
        p = kernel_size // 2
        widths = (in_channels, *self.channels)
        self.encoder = nn.ModuleList(ConvPool2d(widths[i], widths[i + 1], kernel_size, p, activation, pool_size)
                                     for i in range(len(self.channels)))
        self.decoder = nn.ModuleList(
            UnpoolConvTranspose2d(widths[i + 1], self._decoder_out(widths, i), kernel_size, p,
                                  self.out_activation if i == 0 else activation, pool_size)
            for i in reversed(range(len(self.channels))))

    def _decoder_out(self, widths, i):
        return widths[i]

    def encode(self, x):
        check_image_input(type(self).__name__, x, self.in_channels, len(self.channels), self.pool_size)
        indices, sizes = [], []
        for block in self.encoder:
            sizes.append(tuple(int(s) for s in x.shape[-2:]))
            x, idx = block(x)
            indices.append(idx)
        return ConvCode(x, tuple(indices), tuple(sizes))

    def decode(self, code, input_size=None):
        if isinstance(code, torch.Tensor):
            hw = input_size or tuple(s * self.pool_size ** len(self.channels) for s in code.shape[-2:])
            sizes, _ = stage_sizes(hw, len(self.channels), self.pool_size)
            code = code_from_tensor(type(self).__name__, code, sizes, self.pool_size, "flat",
                                    self.channels)
        check_code(type(self).__name__, code, ConvCode)
        indices = _flat_indices(code.indices, self.pool_size, code.sizes)
        y = code.z
        for i, block in enumerate(self.decoder):
            s = len(self.decoder) - 1 - i
            y = block(y, indices[s] if self.reuses_indices[s] else None, output_size=code.sizes[s])
        return y

    def forward(self, x):
        return self.decode(self.encode(x))

    def training_loss(self, x, target=None):
        return reconstruction_loss(self(x), x if target is None else target, self.loss)

    def anomaly_score(self, x):
        return reconstruction_loss(self(x), x, "mse", "per_sample")


class ConvDenoisingAutoencoder(ConvAutoencoder):
    def __init__(self, in_channels: int = 1, channels=(32, 64), kernel_size: int = 3, activation: str = "relu",
                 out_activation: str | None = "sigmoid", pool_size: int = 2, loss: str = "mse",
                 index_format: str = "flat", corruption: str = "gaussian", level: float = 0.3,
                 index_reuse: str = "all"):
        super().__init__(in_channels, channels, kernel_size, activation, out_activation, pool_size, loss, index_format,
                         index_reuse)
        self.corruption = Corruption(*check_corruption(type(self).__name__, corruption, level))

    def forward(self, x):
        return self.decode(self.encode(self.corruption(x)))


def segmentation_loss(logits, target, num_classes):
    if num_classes == 1:
        return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype))
    return F.cross_entropy(logits, target.reshape(target.shape[0], *target.shape[-2:]).long())


class SegNetAutoencoder(ConvAutoencoder):
    def __init__(self, in_channels: int = 1, num_classes: int = 1, channels=(32, 64), kernel_size: int = 3,
                 activation: str = "relu", pool_size: int = 2, index_format: str = "flat"):
        self.num_classes = check_int(type(self).__name__, "num_classes", num_classes)
        super().__init__(in_channels, channels, kernel_size, activation, activation, pool_size, "bce_logits",
                         index_format)
        self.classifier = nn.Conv2d(self.channels[0], num_classes, 1)

    def _decoder_out(self, widths, i):
        return widths[i] if i > 0 else widths[1]

    def decode(self, code, input_size=None):
        return self.classifier(super().decode(code, input_size))

    def training_loss(self, x, target):
        return segmentation_loss(self(x), target, self.num_classes)


class FCN(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 1, channels=(32, 64, 128), kernel_size: int = 3,
                 activation: str = "relu", pool_size: int = 2):
        super().__init__()
        name = type(self).__name__
        self.in_channels = check_int(name, "in_channels", in_channels)
        self.num_classes = check_int(name, "num_classes", num_classes)
        self.channels = check_widths(name, "channels", channels)
        self.kernel_size = check_kernel(name, kernel_size)
        self.activation = check_activation(name, "activation", activation)
        self.pool_size = check_int(name, "pool_size", pool_size, minimum=2)
        widths = (in_channels, *self.channels)
        self.encoder = nn.ModuleList(ConvPool2d(widths[i], widths[i + 1], kernel_size, kernel_size // 2, activation,
                                                pool_size) for i in range(len(self.channels)))
        self.scores = nn.ModuleList(nn.Conv2d(c, num_classes, 1) for c in self.channels)

    def encode(self, x):
        check_image_input(type(self).__name__, x, self.in_channels, len(self.channels), self.pool_size)
        feats, h = [], x
        for block in self.encoder:
            h, _ = block(h)
            feats.append(h)
        return FCNFeatures(tuple(feats), tuple(int(s) for s in x.shape[-2:]))

    def decode(self, code):
        check_code(type(self).__name__, code, FCNFeatures)
        s = self.scores[-1](code.features[-1])
        for i in reversed(range(len(code.features) - 1)):
            f = code.features[i]
            s = F.interpolate(s, size=f.shape[-2:], mode="bilinear", align_corners=False) + self.scores[i](f)
        return F.interpolate(s, size=code.input_size, mode="bilinear", align_corners=False)

    def forward(self, x):
        return self.decode(self.encode(x))

    def training_loss(self, x, target):
        return segmentation_loss(self(x), target, self.num_classes)


class _ConvTranspose2dAct(nn.ConvTranspose2d):
    def __init__(self, *args, activation=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.activation = activation

    def forward(self, x):  # type: ignore[override]
        return activation(super().forward(x), self.activation)


class ConvVAE(nn.Module):
    def __init__(self, in_channels: int = 1, channels=(32, 64), latent_features: int = 16, input_size=(28, 28),
                 kernel_size: int = 3, activation: str = "relu", out_activation: str | None = "sigmoid",
                 loss: str = "bce", beta: float = 1.0):
        super().__init__()
        name = type(self).__name__
        self.in_channels = check_int(name, "in_channels", in_channels)
        self.channels = check_widths(name, "channels", channels)
        self.latent_features = check_int(name, "latent_features", latent_features)
        self.input_size = tuple(input_size)
        self.kernel_size = check_kernel(name, kernel_size)
        self.activation = check_activation(name, "activation", activation)
        self.out_activation = check_activation(name, "out_activation", out_activation)
        self.loss = check_loss(name, loss)
        self.beta = float(beta)
        depth = len(self.channels)
        self.sizes, self.code_hw = stage_sizes(self.input_size, depth, 2)
        widths = (in_channels, *self.channels)
        self.encoder = nn.ModuleList(ConvPool2d(widths[i], widths[i + 1], kernel_size, kernel_size // 2, activation)
                                     for i in range(depth))
        flat = self.channels[-1] * self.code_hw[0] * self.code_hw[1]
        self.fc_mu = nn.Linear(flat, latent_features)
        self.fc_logvar = nn.Linear(flat, latent_features)
        self.fc_decode = nn.Linear(latent_features, flat)
        blocks = []
        for i in reversed(range(depth)):
            op = (self.sizes[i][0] % 2, self.sizes[i][1] % 2)
            blocks.append(_ConvTranspose2dAct(widths[i + 1], widths[i], 4, stride=2, padding=1, output_padding=op,
                                              activation=out_activation if i == 0 else activation))
        self.decoder = nn.ModuleList(blocks)

    def encode(self, x):
        check_image_input(type(self).__name__, x, self.in_channels, len(self.channels), 2)
        h = x
        for block in self.encoder:
            h, _ = block(h)
        h = h.flatten(1)
        return Gaussian(self.fc_mu(h), self.fc_logvar(h))

    def decode(self, z):
        h = F.relu(self.fc_decode(z)).reshape(z.shape[0], self.channels[-1], *self.code_hw)
        for block in self.decoder:
            h = block(h)
        return h

    def forward(self, x):
        g = self.encode(x)
        z = g.mu + torch.exp(0.5 * g.logvar) * torch.randn_like(g.mu) if self.training else g.mu
        return VAEOutput(self.decode(z), g.mu, g.logvar, z)

    def training_loss(self, x, target=None):
        out = self(x)
        recon = reconstruction_loss(out.recon, x if target is None else target, self.loss, "sum") / x.shape[0]
        return recon + self.beta * kl_divergence(out.mu, out.logvar)

    def anomaly_score(self, x):
        return reconstruction_loss(self(x).recon, x, "mse", "per_sample")


MODELS = {
    "linear": LinearAutoencoder, "deep": DeepAutoencoder, "dae": DenoisingAutoencoder,
    "sdae": StackedDenoisingAutoencoder, "conv": ConvAutoencoder, "conv_dae": ConvDenoisingAutoencoder,
    "segnet": SegNetAutoencoder, "fcn": FCN, "vae": VAE, "conv_vae": ConvVAE,
}
