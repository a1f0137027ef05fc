"""Typical real autoencoder-shaped architectures, written from their papers' descriptions in plain
PyTorch, the way their public implementations write them, at small widths.

They are the workloads of aefast.optimize's acceptance (issue 16): tests/test_optimize_architectures.py
checks that optimize() keeps their outputs, gradients and running statistics and counts the pool,
unpool and upsampler sites it fuses; bench/bench_optimize_architectures.py times their training step.
They live in bench/ next to workloads.py (which tests already import the same way) rather than in the
aefast package: they are test and benchmark fixtures, not something a user of aefast imports.

Each entry of ARCHITECTURES maps a name to (constructor, input shape for tests, input shape for
benchmarks); every model takes one image batch and returns a tensor or a tuple of tensors.
Simplifications from the papers, kept deliberately small: fewer stages and narrower channels, no
dropout (FCN's fc6/fc7 dropout would make the eager/optimized comparison depend on RNG order),
FCN's fc6 is a 3x3 conv instead of 7x7 and its first conv is not padded by 100.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def conv_bn_relu(cin, cout):
    """SegNet's and U-Net's layer: 3x3 conv (padding 1) -> BatchNorm -> ReLU."""
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=False)]


class SegNetFunctional(nn.Module):
    """SegNet (Badrinarayanan et al. 2017), functional style: an encoder of conv-BN-ReLU stages
    each closed by a 2x2 max-pool that keeps its indices; a mirrored decoder whose stages open with
    max-unpool (the stored indices, output_size read from the encoder's x.size()) followed by
    conv-BN-ReLU; a final 3x3 conv to class scores."""

    def __init__(self, in_channels=3, num_classes=5, widths=(8, 16, 16)):
        super().__init__()
        self.enc_convs = nn.ModuleList()
        self.enc_bns = nn.ModuleList()
        cin = in_channels
        for w in widths:
            self.enc_convs.append(nn.ModuleList([nn.Conv2d(cin, w, 3, padding=1), nn.Conv2d(w, w, 3, padding=1)]))
            self.enc_bns.append(nn.ModuleList([nn.BatchNorm2d(w), nn.BatchNorm2d(w)]))
            cin = w
        self.dec_convs = nn.ModuleList()
        self.dec_bns = nn.ModuleList()
        outs = list(widths[-2::-1]) + [widths[0]]
        for w, out in zip(widths[::-1], outs):
            self.dec_convs.append(nn.ModuleList([nn.Conv2d(w, w, 3, padding=1), nn.Conv2d(w, out, 3, padding=1)]))
            self.dec_bns.append(nn.ModuleList([nn.BatchNorm2d(w), nn.BatchNorm2d(out)]))
        self.classifier = nn.Conv2d(widths[0], num_classes, 3, padding=1)

    def forward(self, x):
        stack = []
        for convs, bns in zip(self.enc_convs, self.enc_bns):
            x = F.relu(bns[0](convs[0](x)))
            x = F.relu(bns[1](convs[1](x)))
            size = x.size()
            x, indices = F.max_pool2d(x, kernel_size=2, stride=2, return_indices=True)
            stack.append((indices, size))
        for convs, bns in zip(self.dec_convs, self.dec_bns):
            indices, size = stack.pop()
            x = F.max_unpool2d(x, indices, kernel_size=2, stride=2, output_size=size)
            x = F.relu(bns[0](convs[0](x)))
            x = F.relu(bns[1](convs[1](x)))
        return self.classifier(x)


class SegNetSequential(nn.Module):
    """SegNet in the nn.Sequential style: each stage an nn.Sequential of conv-BN-ReLU, shared
    nn.MaxPool2d(2, 2, return_indices=True) / nn.MaxUnpool2d(2, 2) modules, x.size() kept for
    the unpool's output_size."""

    def __init__(self, in_channels=3, num_classes=5, widths=(8, 16, 16)):
        super().__init__()
        cin = in_channels
        self.encoders = nn.ModuleList()
        for w in widths:
            self.encoders.append(nn.Sequential(*conv_bn_relu(cin, w), *conv_bn_relu(w, w)))
            cin = w
        self.decoders = nn.ModuleList()
        outs = list(widths[-2::-1]) + [widths[0]]
        for w, out in zip(widths[::-1], outs):
            self.decoders.append(nn.Sequential(*conv_bn_relu(w, w), *conv_bn_relu(w, out)))
        self.pool = nn.MaxPool2d(2, 2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2, 2)
        self.classifier = nn.Conv2d(widths[0], num_classes, 3, padding=1)

    def forward(self, x):
        e1 = self.encoders[0](x)
        s1 = e1.size()
        x, i1 = self.pool(e1)
        e2 = self.encoders[1](x)
        s2 = e2.size()
        x, i2 = self.pool(e2)
        e3 = self.encoders[2](x)
        s3 = e3.size()
        x, i3 = self.pool(e3)
        x = self.decoders[0](self.unpool(x, i3, output_size=s3))
        x = self.decoders[1](self.unpool(x, i2, output_size=s2))
        x = self.decoders[2](self.unpool(x, i1, output_size=s1))
        return self.classifier(x)


class DoubleConv(nn.Sequential):
    """U-Net's (conv 3x3 -> BN -> ReLU) x 2, padded as the common implementations do."""

    def __init__(self, cin, cout):
        super().__init__(*conv_bn_relu(cin, cout), *conv_bn_relu(cout, cout))


class UNet(nn.Module):
    """U-Net (Ronneberger et al. 2015) with BatchNorm: contracting DoubleConv + 2x2 max-pool
    stages, expanding stages of a 2x2 stride-2 ConvTranspose2d upsampler, concatenation with the
    encoder's skip, DoubleConv; a 1x1 conv to class scores."""

    def __init__(self, in_channels=3, num_classes=2, widths=(8, 16, 32)):
        super().__init__()
        self.downs = nn.ModuleList()
        cin = in_channels
        for w in widths[:-1]:
            self.downs.append(DoubleConv(cin, w))
            cin = w
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = DoubleConv(widths[-2], widths[-1])
        self.ups = nn.ModuleList()
        self.up_convs = nn.ModuleList()
        for w_in, w_out in zip(widths[:0:-1], widths[-2::-1]):
            self.ups.append(nn.ConvTranspose2d(w_in, w_out, 2, stride=2))
            self.up_convs.append(DoubleConv(2 * w_out, w_out))
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x):
        skips = []
        for down in self.downs:
            x = down(x)
            skips.append(x)
            x = self.pool(x)
        x = self.bottleneck(x)
        for up, conv, skip in zip(self.ups, self.up_convs, skips[::-1]):
            x = conv(torch.cat([skip, up(x)], dim=1))
        return self.head(x)


class FCN8s(nn.Module):
    """FCN-8s (Long et al. 2015): a VGG-style encoder of conv-ReLU stages, each closed by
    MaxPool2d(2, 2, ceil_mode=True) (so odd sizes round up); fc6/fc7 as convs; class scores at
    stride 32 upsampled by a stride-2 ConvTranspose2d and added to pool4's scores, again to pool3's,
    then a stride-8 ConvTranspose2d back to the input size; crops align the maps."""

    def __init__(self, in_channels=3, num_classes=4, widths=(8, 16, 16, 32, 32), fc=32):
        super().__init__()
        layers_per_stage = (2, 2, 3, 3, 3)
        self.stages = nn.ModuleList()
        cin = in_channels
        for w, n in zip(widths, layers_per_stage):
            layers = []
            for _ in range(n):
                layers += [nn.Conv2d(cin, w, 3, padding=1), nn.ReLU(inplace=True)]
                cin = w
            layers.append(nn.MaxPool2d(2, stride=2, ceil_mode=True))
            self.stages.append(nn.Sequential(*layers))
        self.fc6 = nn.Conv2d(widths[-1], fc, 3, padding=1)
        self.fc7 = nn.Conv2d(fc, fc, 1)
        self.score_fr = nn.Conv2d(fc, num_classes, 1)
        self.score_pool4 = nn.Conv2d(widths[3], num_classes, 1)
        self.score_pool3 = nn.Conv2d(widths[2], num_classes, 1)
        self.upscore2 = nn.ConvTranspose2d(num_classes, num_classes, 4, stride=2, bias=False)
        self.upscore_pool4 = nn.ConvTranspose2d(num_classes, num_classes, 4, stride=2, bias=False)
        self.upscore8 = nn.ConvTranspose2d(num_classes, num_classes, 16, stride=8, bias=False)

    def forward(self, x):
        h = x
        pools = []
        for stage in self.stages:
            h = stage(h)
            pools.append(h)
        pool3, pool4 = pools[2], pools[3]
        h = F.relu(self.fc6(h))
        h = F.relu(self.fc7(h))
        upscore2 = self.upscore2(self.score_fr(h))  # 2n + 2: crop 1 each side
        score_pool4 = self.score_pool4(pool4)
        h = upscore2[:, :, 1:1 + score_pool4.size(2), 1:1 + score_pool4.size(3)] + score_pool4
        upscore_pool4 = self.upscore_pool4(h)
        score_pool3 = self.score_pool3(pool3)
        h = upscore_pool4[:, :, 1:1 + score_pool3.size(2), 1:1 + score_pool3.size(3)] + score_pool3
        h = self.upscore8(h)  # 8n + 8: crop 4 each side
        return h[:, :, 4:4 + x.size(2), 4:4 + x.size(3)].contiguous()


class ConvVAE(nn.Module):
    """A convolutional VAE (Kingma & Welling 2014, in the DCGAN-style layout its public
    implementations use): stride-2 conv-BN-LeakyReLU down, linear mu/logvar, the reparameterised
    sample, linear up, stride-2 ConvTranspose2d-BN-LeakyReLU, a sigmoid image."""

    def __init__(self, in_channels=1, size=16, widths=(8, 16), latent=8):
        super().__init__()
        layers, cin = [], in_channels
        for w in widths:
            layers += [nn.Conv2d(cin, w, 3, stride=2, padding=1), nn.BatchNorm2d(w), nn.LeakyReLU(0.2)]
            cin = w
        self.encoder = nn.Sequential(*layers)
        self.bottom = (widths[-1], size // 2 ** len(widths), size // 2 ** len(widths))
        flat = widths[-1] * self.bottom[1] * self.bottom[2]
        self.fc_mu = nn.Linear(flat, latent)
        self.fc_logvar = nn.Linear(flat, latent)
        self.fc_up = nn.Linear(latent, flat)
        layers = []
        for w_in, w_out in zip(widths[::-1], list(widths[-2::-1])):
            layers += [nn.ConvTranspose2d(w_in, w_out, 3, stride=2, padding=1, output_padding=1),
                       nn.BatchNorm2d(w_out), nn.LeakyReLU(0.2)]
        layers += [nn.ConvTranspose2d(widths[0], in_channels, 3, stride=2, padding=1, output_padding=1), nn.Sigmoid()]
        self.decoder = nn.Sequential(*layers)

    def forward(self, x):
        h = torch.flatten(self.encoder(x), 1)
        mu, logvar = self.fc_mu(h), self.fc_logvar(h)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        out = self.decoder(self.fc_up(z).view(-1, *self.bottom))
        return out, mu, logvar


class TutorialConvAE(nn.Module):
    """The classic tutorial conv AE: Conv2d-ReLU-MaxPool2d twice, then 2x2 stride-2
    ConvTranspose2d-ReLU and a stride-2 ConvTranspose2d-Sigmoid back to the image."""

    def __init__(self, in_channels=1, widths=(16, 4)):
        super().__init__()
        c1, c2 = widths
        self.encoder = nn.Sequential(nn.Conv2d(in_channels, c1, 3, padding=1), nn.ReLU(True), nn.MaxPool2d(2, 2),
                                     nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(True), nn.MaxPool2d(2, 2))
        self.decoder = nn.Sequential(nn.ConvTranspose2d(c2, c1, 2, stride=2), nn.ReLU(True),
                                     nn.ConvTranspose2d(c1, in_channels, 2, stride=2), nn.Sigmoid())

    def forward(self, x):
        return self.decoder(self.encoder(x))


class IndicesConvAE(nn.Module):
    """A conv AE with pool indices: Conv2d-ReLU-MaxPool2d(return_indices) twice, decoded by
    MaxUnpool2d (output_size from the activation's shape) -> ConvTranspose2d(stride 1)-ReLU, the
    last with a sigmoid."""

    def __init__(self, in_channels=1, widths=(8, 16)):
        super().__init__()
        c1, c2 = widths
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2)
        self.deconv2 = nn.ConvTranspose2d(c2, c1, 3, padding=1)
        self.deconv1 = nn.ConvTranspose2d(c1, in_channels, 3, padding=1)

    def forward(self, x):
        h1 = F.relu(self.conv1(x))
        p1, i1 = self.pool(h1)
        h2 = F.relu(self.conv2(p1))
        p2, i2 = self.pool(h2)
        d2 = F.relu(self.deconv2(self.unpool(p2, i2, output_size=h2.shape[-2:])))
        return torch.sigmoid(self.deconv1(self.unpool(d2, i1, output_size=h1.shape[-2:])))


# name -> (constructor, test input shape, benchmark input shape). Test shapes are odd where the
# architecture allows it (SegNet's unpool output_size, FCN's ceil_mode pools), so size handling is
# exercised; U-Net, the VAE and the tutorial AE need sizes their stride-2 upsamplers can restore.
ARCHITECTURES = {
    "segnet_functional": (SegNetFunctional, (2, 3, 19, 21), (16, 3, 96, 96)),
    "segnet_sequential": (SegNetSequential, (2, 3, 19, 21), (16, 3, 96, 96)),
    "unet": (UNet, (2, 3, 20, 24), (16, 3, 96, 96)),
    "fcn8s": (FCN8s, (2, 3, 36, 38), (16, 3, 96, 96)),
    "conv_vae": (ConvVAE, (4, 1, 16, 16), (128, 1, 16, 16)),
    "tutorial_conv_ae": (TutorialConvAE, (2, 1, 28, 28), (128, 1, 28, 28)),
    "indices_conv_ae": (IndicesConvAE, (2, 1, 13, 15), (128, 1, 28, 28)),
}


def build(name, seed=0):
    """The architecture ``name`` with deterministic initial weights."""
    torch.manual_seed(seed)
    return ARCHITECTURES[name][0]()


def outputs(result):
    """A model's result as a tuple of tensors."""
    return result if isinstance(result, tuple) else (result,)


# ---------------------------------------------------------------- fusion accounting

SITE_KINDS = ("max_pool2d", "max_unpool2d", "upsampler")
# aefast.optimize's report lines -> the kind of site each fused rewrite accounts for. A rewrite line
# of any other op (a new fused form) raises in site_counts, so this table is updated with it.
_FUSED_OPS = {"conv_pool2d": "max_pool2d", "conv_bn_pool2d": "max_pool2d", "unpool_conv_transpose2d": "max_unpool2d",
              "conv_transpose_act2d": "upsampler"}
_NOT_SITES = ("reconstruction_loss", "batch_norm_act2d", "conv_bn_act2d")


def site_counts(rewrites, unfused):
    """{site kind: (fused, total)} from optimize()'s report lines of one mode: ``rewrites`` as in
    ``model.aefast_rewrites`` (without the "(eval mode)" lines), ``unfused`` as in
    ``model.aefast_unfused`` ("<kind> at <site>: <reason>")."""
    fused = dict.fromkeys(SITE_KINDS, 0)
    left = dict.fromkeys(SITE_KINDS, 0)
    for line in rewrites:
        op = line.split(" <- ", 1)[0].split("(", 1)[0].strip()
        if op in _NOT_SITES:
            continue
        if op not in _FUSED_OPS:
            raise ValueError(f"unknown rewrite {line!r}: add its op to architectures._FUSED_OPS")
        fused[_FUSED_OPS[op]] += 1
    for line in unfused:
        left[line.split(" at ", 1)[0]] += 1
    return {kind: (fused[kind], fused[kind] + left[kind]) for kind in SITE_KINDS}


def unfused_reasons(unfused):
    """{(site kind, reason): count} from ``model.aefast_unfused``."""
    reasons = {}
    for line in unfused:
        kind, rest = line.split(" at ", 1)
        key = (kind, rest.split(": ", 1)[1])
        reasons[key] = reasons.get(key, 0) + 1
    return reasons


def mode_reports(model):
    """{training: (rewrites, unfused)} of optimize()'s rewriter in each mode (with
    batch_norm_training=True), for a model that has not been optimized. optimize() publishes the unfused sites of the training-mode graph only, so
    this runs its per-mode tracing and rewriter (aefast.optimize's private helpers) on a copy."""
    import copy
    import importlib

    O = importlib.import_module("aefast.optimize")  # the module: aefast.optimize is the function

    model = copy.deepcopy(model)
    reports = {}
    for training, graph_module in O._trace_per_mode(model).items():
        rewriter = O._Rewriter(model, graph_module.graph, training, batch_norm_training=True)
        rewriter.run()
        reports[training] = (rewriter.report, rewriter.unfused_sites())
    return reports
