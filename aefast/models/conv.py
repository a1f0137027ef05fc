"""Convolutional autoencoders on aefast's fused blocks.

Encoder stages are :class:`aefast.nn.ConvPool2d` (conv -> bias -> activation -> max-pool with
argmax indices, one fused op); decoder stages are :class:`aefast.nn.UnpoolConvTranspose2d`
(max-unpool at the encoder's indices -> transposed conv -> bias -> activation, one fused op),
which reuse the encoder's indices as SegNet does. Convolutions are 'same' (odd kernel,
padding k // 2), so stage s's unpool restores exactly the size its encoder pooled.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aefast import functional as AF
from aefast.models._common import (ConvCode, FCNFeatures, Gaussian, VAEOutput, activation, check_activation,
                                   check_code, check_corruption, check_image_input, check_index_reuse, check_int,
                                   check_kernel, check_loss, check_widths, code_from_tensor, stage_sizes,
                                   upsample_nearest)
from aefast.nn import ConvPool2d, Corruption, UnpoolConvTranspose2d


class _PoolingEncoderMixin:
    def _encode(self, x, noise=None) -> ConvCode:
        """``noise``: conv_pool2d's corruption keywords for the first block (the input corrupted
        in that block's load, see ConvDenoisingAutoencoder)."""
        check_image_input(type(self).__name__, x, self.in_channels, len(self.channels), self.pool_size)
        indices, sizes = [], []
        for i, block in enumerate(self.encoder):
            sizes.append(tuple(int(s) for s in x.shape[-2:]))  # 'same' conv: pre-pool size = input size
            x, idx = block(x, **noise) if i == 0 and noise else block(x)
            indices.append(idx)
        return ConvCode(x, tuple(indices), tuple(sizes))

    def _as_code(self, code, input_size=None):
        if isinstance(code, torch.Tensor):
            hw = input_size or tuple(s * self.pool_size ** len(self.channels) for s in code.shape[-2:])
            sizes, _ = stage_sizes(hw, len(self.channels), self.pool_size)
            return code_from_tensor(type(self).__name__, code, sizes, self.pool_size, self.index_format,
                                    self.channels)
        return check_code(type(self).__name__, code, ConvCode)

    def _unpool_decode(self, code: ConvCode):
        y = code.z
        for i, block in enumerate(self.decoder):
            s = len(self.decoder) - 1 - i
            if self.reuses_indices[s]:
                y = block(y, code.indices[s], output_size=code.sizes[s])
            else:
                # index-free stage: the same parameters, applied to a nearest-neighbour upsampling
                y = AF.conv_transpose2d(upsample_nearest(y, code.sizes[s]), block.weight, block.bias,
                                        padding=block.padding)
                y = activation(y, block.activation, block.negative_slope)
        return y


class ConvAutoencoder(_PoolingEncoderMixin, nn.Module):
    """Conv AE: ``len(channels)`` ConvPool2d stages, then as many UnpoolConvTranspose2d stages that
    reuse the encoder's pool indices. The code is the last stage's map (``channels[-1]`` channels,
    H / pool_size**depth); :meth:`encode` returns a :class:`ConvCode` holding the indices too, and
    :meth:`decode` also takes a bare code tensor (values then unpool to the window's top-left).

    ``index_reuse``: "all" (every decoder stage unpools at its encoder stage's indices), "deepest"
    (only the coarsest stage does) or "none" (index-free). A stage that does not reuse indices
    upsamples by nearest neighbour and then applies the same transposed conv, so the parameters
    and the state_dict are the same for all three. Indices carry where the input's maxima were,
    defects included, so a decoder that reuses them redraws a defect's strokes; see
    aefast.tasks.anomaly for what that does to defect detection."""

    def __init__(self, in_channels: int = 1, channels=(32, 64), kernel_size: int = 3, activation: str = "relu",
                 out_activation: str | None = "sigmoid", pool_size: int = 2, loss: str = "mse",
                 index_format: str = "window", index_reuse: str = "all"):
        super().__init__()
        name = type(self).__name__
        self.in_channels = check_int(name, "in_channels", in_channels)
        self.channels = check_widths(name, "channels", channels)
        self.kernel_size = check_kernel(name, kernel_size)
        self.activation = check_activation(name, "activation", activation)
        self.out_activation = check_activation(name, "out_activation", out_activation)
        self.pool_size = check_int(name, "pool_size", pool_size, minimum=2)
        self.loss = check_loss(name, loss)
        if index_format not in AF.INDEX_FORMATS:
            raise ValueError(f"aefast.models.{name}: index_format must be one of {AF.INDEX_FORMATS}, got {index_format!r}")
        self.index_format = index_format
        self.index_reuse = index_reuse
        self.reuses_indices = check_index_reuse(name, index_reuse, len(self.channels))
        p = kernel_size // 2
        widths = (in_channels, *self.channels)
        self.encoder = nn.ModuleList(
            ConvPool2d(widths[i], widths[i + 1], kernel_size, padding=p, activation=activation, pool_size=pool_size,
                       index_format=index_format) for i in range(len(self.channels)))
        self.decoder = nn.ModuleList(
            UnpoolConvTranspose2d(widths[i + 1], self._decoder_out(widths, i), kernel_size, padding=p,
                                  activation=self._decoder_act(i), pool_size=pool_size, index_format=index_format)
            for i in reversed(range(len(self.channels))))

    def _decoder_out(self, widths, i):
        return widths[i]

    def _decoder_act(self, i):
        return self.out_activation if i == 0 else self.activation

    def encode(self, x) -> ConvCode:
        return self._encode(x)

    def decode(self, code, input_size=None):
        return self._unpool_decode(self._as_code(code, input_size))

    def forward(self, x):
        return self.decode(self.encode(x))

    def training_loss(self, x, target=None):
        return AF.reconstruction_loss(self(x), x if target is None else target, self.loss)

    def anomaly_score(self, x):
        return AF.reconstruction_loss(self(x), x, "mse", "per_sample")


class ConvDenoisingAutoencoder(ConvAutoencoder):
    """A ConvAutoencoder that corrupts its input in train mode (gaussian noise by default) and is
    trained to reconstruct the clean image."""

    def __init__(self, in_channels: int = 1, channels=(32, 64), kernel_size: int = 3, activation: str = "relu",
                 out_activation: str | None = "sigmoid", pool_size: int = 2, loss: str = "mse",
                 index_format: str = "window", corruption: str = "gaussian", level: float = 0.3,
                 index_reuse: str = "all"):
        super().__init__(in_channels, channels, kernel_size, activation, out_activation, pool_size, loss, index_format,
                         index_reuse)
        kind, level = check_corruption(type(self).__name__, corruption, level)
        self.corruption = Corruption(kind, level)

    def forward(self, x):
        c = self.corruption
        if not c.training or c.level == 0:
            return self.decode(self.encode(x))
        # decode(encode(corruption(x))) with the noise generated in the first encoder block's
        # input load (conv_pool2d's corruption=): the same noise from the same generator draw,
        # and no corrupted copy of the batch is made or kept for the backward.
        noise = {"corruption": (c.kind, c.level, c.low, c.high), "generator": c.generator}
        return self.decode(self._encode(x, noise))


class SegNetAutoencoder(ConvAutoencoder):
    """SegNet (Badrinarayanan et al. 2017): the decoder upsamples with the encoder's max-pool
    indices; a 1x1 conv maps the last decoder stage to ``num_classes`` mask logits (one channel of
    binary logits when num_classes == 1, trained with BCE-with-logits; otherwise per-class logits
    trained with cross-entropy on integer masks)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 1, channels=(32, 64), kernel_size: int = 3,
                 activation: str = "relu", pool_size: int = 2, index_format: str = "window"):
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


def segmentation_loss(logits, target, num_classes):
    if num_classes == 1:
        return AF.reconstruction_loss(logits, target.to(logits.dtype), "bce_logits")
    return F.cross_entropy(logits, target.reshape(target.shape[0], *target.shape[-2:]).long())


class FCN(nn.Module):
    """Fully convolutional network with skip fusion (Long et al. 2015, FCN-8s style): every
    ConvPool2d stage has a 1x1 score head; from the deepest up, scores are bilinearly upsampled
    to the next shallower stage's size and added to its scores, then upsampled to the input size.
    ``encode`` returns every stage's features (FCNFeatures); ``decode`` fuses them into mask logits."""

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
        self.encoder = nn.ModuleList(
            ConvPool2d(widths[i], widths[i + 1], kernel_size, padding=kernel_size // 2, activation=activation,
                       pool_size=pool_size) for i in range(len(self.channels)))
        self.scores = nn.ModuleList(nn.Conv2d(c, num_classes, 1) for c in self.channels)

    def encode(self, x) -> FCNFeatures:
        check_image_input(type(self).__name__, x, self.in_channels, len(self.channels), self.pool_size)
        feats = []
        h = x
        for block in self.encoder:
            h, _ = block(h)
            feats.append(h)
        return FCNFeatures(tuple(feats), tuple(int(s) for s in x.shape[-2:]))

    def decode(self, code: FCNFeatures):
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


class ConvTranspose2d(nn.ConvTranspose2d):
    """nn.ConvTranspose2d (same parameters) followed by an activation, as one fused op:
    aefast.functional.conv_transpose_act2d (groups 1, dilation 1; other settings take
    aefast.functional.conv_transpose2d and the activation separately).

    Fused, the activation costs no pass of its own, and the conv's output is not kept beside the
    activation's (ConvVAE-W1's training step: peak memory 0.54x -> 0.45x eager's, step 1.8x -> 2.1x,
    measured under load, 1 thread, process_time)."""

    def __init__(self, *args, activation=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.activation = activation

    def forward(self, x):  # type: ignore[override]
        if self.groups == 1 and tuple(self.dilation) == (1, 1):
            return AF.conv_transpose_act2d(x, self.weight, self.bias, self.stride, self.padding, self.output_padding,
                                           activation=self.activation)
        y = AF.conv_transpose2d(x, self.weight, self.bias, self.stride, self.padding, self.output_padding,
                                self.groups, self.dilation)
        return activation(y, self.activation)


class ConvVAE(nn.Module):
    """Convolutional VAE: ConvPool2d stages -> linear mu / logvar; the decoder (which has no pool
    indices when it generates) maps z linearly to the deepest map and upsamples with stride-2
    transposed convs (kernel 4, padding 1, output_padding so that each stage restores its size).
    ``input_size`` (H, W) fixes the geometry. ``forward(x) -> VAEOutput``."""

    def __init__(self, in_channels: int = 1, channels=(32, 64), latent_features: int = 16, input_size=(28, 28),
                 kernel_size: int = 3, activation: str = "relu", out_activation: str | None = "sigmoid",
                 loss: str = "bce", beta: float = 1.0):
        super().__init__()
        name = type(self).__name__
        self.in_channels = check_int(name, "in_channels", in_channels)
        self.channels = check_widths(name, "channels", channels)
        self.latent_features = check_int(name, "latent_features", latent_features)
        if (not isinstance(input_size, (tuple, list)) or len(input_size) != 2
                or any(isinstance(v, bool) or not isinstance(v, int) for v in input_size)):
            raise ValueError(f"aefast.models.{name}: input_size must be a pair of ints (H, W), got {input_size!r}")
        self.input_size = tuple(input_size)
        self.kernel_size = check_kernel(name, kernel_size)
        self.activation = check_activation(name, "activation", activation)
        self.out_activation = check_activation(name, "out_activation", out_activation)
        self.loss = check_loss(name, loss)
        self.beta = float(beta)
        self.pool_size = 2
        depth = len(self.channels)
        if min(self.input_size) < 2 ** depth:
            raise ValueError(f"aefast.models.{name}: input_size {self.input_size} is too small for {depth} pooling stages")
        self.sizes, self.code_hw = stage_sizes(self.input_size, depth, 2)
        widths = (in_channels, *self.channels)
        # The VAE drops the pool indices: uint8 window offsets are what the kernel writes anyway,
        # flat int64 ones would cost a conversion pass (~5% of a W1 step) for nothing.
        self.encoder = nn.ModuleList(
            ConvPool2d(widths[i], widths[i + 1], kernel_size, padding=kernel_size // 2, activation=activation,
                       index_format="window")
            for i in range(depth))
        flat = self.channels[-1] * self.code_hw[0] * self.code_hw[1]
        self.fc_mu = nn.Linear(flat, latent_features)
        self.fc_logvar = nn.Linear(flat, latent_features)
        self.fc_decode = nn.Linear(latent_features, flat)
        blocks = []
        for i in reversed(range(depth)):
            pooled = (self.sizes[i][0] // 2, self.sizes[i][1] // 2)
            op = (self.sizes[i][0] - 2 * pooled[0], self.sizes[i][1] - 2 * pooled[1])
            blocks.append(ConvTranspose2d(widths[i + 1], widths[i], 4, stride=2, padding=1, output_padding=op,
                                          activation=out_activation if i == 0 else activation))
        self.decoder = nn.ModuleList(blocks)

    def encode(self, x) -> Gaussian:
        check_image_input(type(self).__name__, x, self.in_channels, len(self.channels), 2)
        if tuple(x.shape[-2:]) != self.input_size:
            raise ValueError(f"aefast.models.ConvVAE: built for input_size {self.input_size}, got {tuple(x.shape[-2:])}")
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

    def forward(self, x) -> VAEOutput:
        g = self.encode(x)
        z = AF.reparameterize(g.mu, g.logvar) if self.training else g.mu
        return VAEOutput(self.decode(z), g.mu, g.logvar, z)

    def training_loss(self, x, target=None):
        out = self(x)
        target = x if target is None else target
        recon = AF.reconstruction_loss(out.recon, target, self.loss, "sum") / x.shape[0]
        return recon + self.beta * AF.kl_divergence(out.mu, out.logvar, "mean")

    def anomaly_score(self, x):
        return AF.reconstruction_loss(self(x).recon, x, "mse", "per_sample")
