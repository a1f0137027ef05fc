"""aefast.optimize on autoencoders written the ways PyTorch tutorials write them."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import aefast


class SequentialAE(nn.Module):
    """Everything in nn.Sequential; the pool keeps no indices."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                     nn.Conv2d(8, 16, 3, padding=1), nn.LeakyReLU(0.2), nn.MaxPool2d(2))
        self.decoder = nn.Sequential(nn.ConvTranspose2d(16, 8, 2, stride=2), nn.ReLU(),
                                     nn.ConvTranspose2d(8, 1, 2, stride=2), nn.Sigmoid())

    def forward(self, x):
        return self.decoder(self.encoder(x))


class FunctionalAE(nn.Module):
    """Modules for the weights, functionals for the rest, indices passed by hand."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.deconv2 = nn.ConvTranspose2d(16, 8, 3, padding=1)
        self.deconv1 = nn.ConvTranspose2d(8, 1, 3, padding=1)

    def encode(self, x):
        h, i1 = F.max_pool2d(F.relu(self.conv1(x)), 2, return_indices=True)
        h, i2 = F.max_pool2d(torch.tanh(self.conv2(h)), 2, return_indices=True)
        return h, (i1, i2)

    def forward(self, x):
        h, (i1, i2) = self.encode(x)
        h = F.relu(self.deconv2(F.max_unpool2d(h, i2, 2, output_size=(x.shape[-2] // 2, x.shape[-1] // 2))))
        return torch.sigmoid(self.deconv1(F.max_unpool2d(h, i1, 2, output_size=x.shape[-2:])))


class DictIndicesAE(nn.Module):
    """Indices kept in a dict by layer name; nn.MaxPool2d/MaxUnpool2d modules; loss inside forward."""

    def __init__(self):
        super().__init__()
        self.enc = nn.ModuleDict({"a": nn.Conv2d(3, 6, 3, padding=1), "b": nn.Conv2d(6, 12, 3, padding=1)})
        self.act = nn.SiLU()
        self.act2 = nn.GELU()
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.pool2 = nn.MaxPool2d(2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2)
        self.unpool2 = nn.MaxUnpool2d(2)
        self.dec = nn.ModuleDict({"b": nn.ConvTranspose2d(12, 6, 3, padding=1), "a": nn.ConvTranspose2d(6, 3, 3, padding=1)})

    def forward(self, x):
        indices = {}
        h, indices["a"] = self.pool(self.act(self.enc["a"](x)))
        h, indices["b"] = self.pool2(self.act2(self.enc["b"](h)))
        h = torch.relu(self.dec["b"](self.unpool(h, indices["b"])))
        out = self.dec["a"](self.unpool2(h, indices["a"]))
        return out, F.mse_loss(out, x)


def _outputs_and_grads(model, x):
    out = model(x)
    loss = out[1] if isinstance(out, tuple) else F.binary_cross_entropy(out, x.clamp(0, 1))
    loss.backward()
    return out, {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("style, n_rewrites", [(SequentialAE, 4), (FunctionalAE, 4), (DictIndicesAE, 5)])
def test_optimize_keeps_outputs_and_gradients(style, n_rewrites, capsys):
    torch.manual_seed(0)
    original = style()
    model = copy.deepcopy(original)
    params_before = {k: id(p) for k, p in model.named_parameters()}
    keys_before = list(model.state_dict())
    optimized = aefast.optimize(model)
    assert optimized is model
    assert len(model.aefast_rewrites) == n_rewrites, model.aefast_rewrites
    printed = capsys.readouterr().out
    for line in model.aefast_rewrites:
        assert line in printed
    # shared, not copied: the same Parameter objects, the same state_dict keys
    assert {k: id(p) for k, p in model.named_parameters()} == params_before
    assert list(model.state_dict()) == keys_before
    in_ch = 3 if style is DictIndicesAE else 1
    x = torch.rand(2, in_ch, 12, 8)
    want, want_grads = _outputs_and_grads(original, x)
    got, got_grads = _outputs_and_grads(model, x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for k in want_grads:
        torch.testing.assert_close(got_grads[k], want_grads[k], rtol=1e-4, atol=1e-5)


def test_other_methods_survive_and_optimizer_state_keeps_working():
    model = FunctionalAE()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(2, 1, 8, 8)
    F.mse_loss(model(x), x).backward()
    opt.step()
    aefast.optimize(model, verbose=False)
    h, _ = model.encode(x)  # methods other than forward are untouched
    assert h.shape == (2, 16, 2, 2)
    opt.zero_grad()
    F.mse_loss(model(x), x).backward()
    opt.step()  # the optimizer's state is keyed by the same Parameter objects
    assert all(p.grad is not None for p in model.parameters())


def test_unmatched_patterns_are_left_alone():
    class Overlapping(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, dilation=2)
            self.conv2 = nn.Conv2d(1, 2, 3)

        def forward(self, x):
            a = F.max_pool2d(F.relu(self.conv(x)), 2)  # dilated conv: not fused
            c = F.relu(self.conv2(x))
            b = F.max_pool2d(c, 3, stride=1)  # overlapping pool: not fused
            return a.sum() + b.sum() + c.sum()

    model = aefast.optimize(Overlapping(), verbose=False)
    assert model.aefast_rewrites == []


def test_untraceable_model_is_returned_unchanged_with_reason():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, x):
            if x.sum() > 0:
                return self.conv(x)
            return x

    model = DataDependent()
    forward = model.forward
    with pytest.warns(UserWarning, match=r"cannot trace DataDependent \(TraceError: symbolically traced variables"):
        out = aefast.optimize(model)
    assert out is model and model.forward == forward and model.aefast_rewrites == []


def test_rejects_non_modules():
    with pytest.raises(TypeError, match="expects an nn.Module"):
        aefast.optimize(lambda x: x)


# ---------------------------------------------------------------- real architectures: BatchNorm, SegNet decoders

def _conv_bn_relu(cin, cout):
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]


class SegNetBN(nn.Module):
    """SegNet as its paper draws it: conv-BN-ReLU stages, pool indices reused by unpool -> conv-BN-ReLU,
    with the unpool's output_size read from the pre-pool activation by x.size()."""

    def __init__(self, classes=3):
        super().__init__()
        self.enc1 = nn.Sequential(*_conv_bn_relu(3, 8))
        self.enc2 = nn.Sequential(*_conv_bn_relu(8, 16))
        self.pool = nn.MaxPool2d(2, return_indices=True)
        self.unpool = nn.MaxUnpool2d(2)
        self.dec2 = nn.Sequential(*_conv_bn_relu(16, 8))
        self.dec1 = nn.Sequential(nn.Conv2d(8, classes, 3, padding=1))

    def forward(self, x):
        x = self.enc1(x)
        size1 = x.size()
        x, i1 = self.pool(x)
        x = self.enc2(x)
        size2 = x.size()
        x, i2 = self.pool(x)
        x = self.dec2(self.unpool(x, i2, output_size=size2))
        return self.dec1(self.unpool(x, i1, output_size=size1))


class SegNetFunctionalBN(nn.Module):
    """The functional style: modules for weights, F.* for the rest, BN then leaky_relu."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.d1, self.e1 = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.out = nn.Conv2d(6, 1, 1)

    def forward(self, x):
        h = F.leaky_relu(self.b1(self.c1(x)), 0.1)
        h, idx = F.max_pool2d(h, 2, return_indices=True)
        h = F.max_unpool2d(h, idx, 2, output_size=x.shape[-2:])
        h = F.leaky_relu(self.e1(self.d1(h)), 0.1)
        return self.out(h)


def _randomize_bn(model):
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)


def _check_same(original, optimized, x, *, training):
    original.train(training)
    optimized.train(training)
    out_a, out_b = original(x), optimized(x)
    torch.testing.assert_close(out_b, out_a, rtol=1e-5, atol=1e-5)
    out_a.square().mean().backward()
    out_b.square().mean().backward()
    grads_b = dict(optimized.named_parameters())
    for name, p in original.named_parameters():
        torch.testing.assert_close(grads_b[name].grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    buffers_b = dict(optimized.named_buffers())
    for name, b in original.named_buffers():
        torch.testing.assert_close(buffers_b[name], b, msg=name)  # running statistics, num_batches_tracked


@pytest.mark.parametrize("style, in_ch", [(SegNetBN, 3), (SegNetFunctionalBN, 1)])
def test_batch_norm_models_fuse_in_eval_and_match_in_both_modes(style, in_ch):
    torch.manual_seed(0)
    original = style()
    _randomize_bn(original)
    model = aefast.optimize(copy.deepcopy(original), verbose=False, batch_norm_training=False)
    eval_rewrites = [r for r in model.aefast_rewrites if r.startswith("(eval mode)")]
    assert any("BatchNorm2d folded" in r and r.split(") ", 1)[1].startswith("conv_pool2d") for r in eval_rewrites)
    assert any("BatchNorm2d folded" in r and "unpool_conv_transpose2d" in r for r in eval_rewrites)
    # with batch_norm_training=False the encoders' training-mode BatchNorm sites are reported, not fused;
    # the decoders' unpool -> conv is fused without the BN, which stays in eager after it
    assert any("batch_norm_training=False" in line for line in model.aefast_unfused), model.aefast_unfused
    assert any("BatchNorm2d" in line and "training mode" in line for line in model.aefast_unfused)
    assert not any(line.startswith("max_unpool2d") for line in model.aefast_unfused), model.aefast_unfused
    assert any(r.startswith("unpool_conv_transpose2d") and "batch statistics" in r for r in model.aefast_rewrites)
    assert not any(r.startswith("conv_bn_pool2d") for r in model.aefast_rewrites)
    x = torch.randn(2, in_ch, 12, 10)
    for training in (True, False, True):
        _check_same(original, model, x, training=training)


def test_frozen_batch_norm_in_eval_model_still_matches():
    original = SegNetFunctionalBN()
    _randomize_bn(original)
    model = aefast.optimize(copy.deepcopy(original), verbose=False)
    original.eval(), model.eval()
    original.b1.train(), model.b1.train()  # a BatchNorm the eval graph folded is put back in training mode
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(model(x), original(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.b1.running_mean, original.b1.running_mean)


def test_metadata_reads_of_the_activation_do_not_block_fusion():
    class SizeForUnpool(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1, stride=1)
            self.deconv = nn.ConvTranspose2d(4, 1, 3, padding=1)

        def forward(self, x):
            h = torch.relu(self.conv(x))
            size, rows, ndim = h.size(), h.shape[2], h.dim()
            p, i = F.max_pool2d(h, 2, return_indices=True)
            out = self.deconv(F.max_unpool2d(p, i, 2, output_size=size))
            return out * (rows + ndim)

    original = SizeForUnpool()
    model = aefast.optimize(copy.deepcopy(original), verbose=False)
    assert any(r.startswith("conv_pool2d") for r in model.aefast_rewrites)
    assert any(r.startswith("unpool_conv_transpose2d") for r in model.aefast_rewrites)
    x = torch.randn(2, 1, 9, 7)  # odd sizes: the conv output is larger than the pooled region
    _check_same(original, model, x, training=True)


def test_unpool_then_stride1_conv_maps_onto_the_fused_decoder():
    class UnpoolConv(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(5, 3, (3, 5), padding=(1, 1))

        def forward(self, x, idx):
            return torch.sigmoid(self.conv(F.max_unpool2d(x, idx, 2, output_size=(8, 10))))

    original = UnpoolConv()
    model = aefast.optimize(copy.deepcopy(original), verbose=False)
    assert model.aefast_rewrites == ["unpool_conv_transpose2d <- max_unpool2d(2, 2) -> conv (Conv2d as its "
                                     "transposed twin) -> sigmoid"]
    _, idx = F.max_pool2d(torch.randn(2, 5, 8, 10), 2, return_indices=True)
    z = torch.randn(2, 5, 4, 5, requires_grad=True)
    z2 = z.detach().clone().requires_grad_()
    torch.testing.assert_close(model(z2, idx), original(z, idx), rtol=1e-5, atol=1e-6)
    original(z, idx).sum().backward()
    model(z2, idx).sum().backward()
    torch.testing.assert_close(z2.grad, z.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.conv.weight.grad, original.conv.weight.grad, rtol=1e-5, atol=1e-5)


def test_training_branches_are_traced_per_mode():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)

        def forward(self, x):
            if self.training:  # a Python branch: tracing once would bake one mode in
                x = x * 2
            return F.max_pool2d(torch.relu(self.conv(x)), 2)

    original = Branchy()
    model = aefast.optimize(copy.deepcopy(original), verbose=False)
    x = torch.randn(1, 1, 6, 6)
    for training in (True, False):
        original.train(training), model.train(training)
        torch.testing.assert_close(model(x), original(x))


def test_unfused_sites_are_reported_with_reasons(capsys):
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
            self.pool = nn.MaxPool2d(2, ceil_mode=True)
            self.up = nn.Upsample(scale_factor=2)  # (a stride-2 ConvTranspose2d would fuse)

        def forward(self, x):
            h = self.pool(torch.relu(self.conv(x)))  # ceil_mode: fused
            h = F.max_pool2d(torch.relu(self.conv2(h)), 3, stride=2, padding=1)  # padded: not fused
            return self.up(h)

    aefast.optimize(Mixed())
    printed = capsys.readouterr().out
    model = Mixed()
    aefast.optimize(model, verbose=False)
    reasons = "\n".join(model.aefast_unfused)
    assert "padded or dilated pool" in reasons and "upsampler" in reasons
    assert len(model.aefast_unfused) == 2
    assert any("max_pool2d(2, 2) (ceil_mode)" in line for line in model.aefast_rewrites)
    assert "unfused: upsampler at up" in printed


# ---------------------------------------------------------------- losses in the training loop

def test_fused_losses_routes_training_loop_losses():
    import aefast.functional as AF

    calls = []
    real = AF.reconstruction_loss

    def counting(*args, **kwargs):
        calls.append(args[2] if len(args) > 2 else kwargs.get("kind"))
        return real(*args, **kwargs)

    x = torch.rand(4, 1, 6, 6)
    y = torch.rand(4, 1, 6, 6, requires_grad=True)
    y2 = y.detach().clone().requires_grad_()
    cases = [lambda a, b: F.mse_loss(a, b), lambda a, b: nn.L1Loss(reduction="sum")(a, b),
             lambda a, b: F.huber_loss(a, b, delta=0.3), lambda a, b: nn.BCELoss()(a.clamp(0.01, 0.99), b),
             lambda a, b: F.binary_cross_entropy_with_logits(a, b, reduction="none")]
    original_mse = F.mse_loss
    try:
        AF.reconstruction_loss = counting
        for case in cases:
            want = case(y, x)
            with aefast.fused_losses():
                with aefast.fused_losses():  # nesting keeps the routing until the outermost block ends
                    pass
                got = case(y2, x)
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
            want.sum().backward()
            got.sum().backward()
            torch.testing.assert_close(y2.grad, y.grad, rtol=1e-6, atol=1e-7)
        assert calls == ["mse", "l1", "huber", "bce", "bce_logits"]
        with aefast.fused_losses():  # what the fused loss does not serve goes to torch, unchanged
            F.binary_cross_entropy_with_logits(y, x, pos_weight=torch.rand(6))
            with pytest.warns(UserWarning, match="target size"):
                broadcast = F.mse_loss(y, x[:1])
        assert calls == ["mse", "l1", "huber", "bce", "bce_logits"]
        torch.testing.assert_close(broadcast, original_mse(y, x[:1].expand_as(y)))
    finally:
        AF.reconstruction_loss = real
    assert F.mse_loss is original_mse and not hasattr(F.mse_loss, "aefast_routed")


def test_optimized_batch_norm_model_compiles_fullgraph():
    torch._dynamo.reset()
    original = SegNetFunctionalBN()
    _randomize_bn(original)
    model = aefast.optimize(copy.deepcopy(original), verbose=False).eval()
    original.eval()
    x = torch.randn(2, 1, 8, 8)
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), original(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- training-mode BatchNorm: conv_bn_pool2d

class ConvVAEBN(nn.Module):
    """A conv VAE in the common style: a conv-BN-LeakyReLU-pool stage, then a stride-2 conv-BN-LeakyReLU
    (no pool: it stays unfused), a linear bottleneck, and a transposed-conv decoder. The noise is a
    fixed buffer so that two models can be compared."""

    def __init__(self, latent=4):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 4, stride=2, padding=1), nn.BatchNorm2d(16)
        self.pool = nn.MaxPool2d(2)
        self.mu, self.logvar = nn.Linear(16 * 2 * 2, latent), nn.Linear(16 * 2 * 2, latent)
        self.fc = nn.Linear(latent, 16 * 2 * 2)
        self.up1 = nn.ConvTranspose2d(16, 8, 4, stride=2, padding=1)
        self.up2 = nn.ConvTranspose2d(8, 1, 2, stride=2)
        self.register_buffer("noise", torch.linspace(-1, 1, latent))

    def forward(self, x):
        h = self.pool(F.leaky_relu(self.bn1(self.conv1(x)), 0.2))
        h = F.leaky_relu(self.bn2(self.conv2(h)), 0.2).flatten(1)
        z = self.mu(h) + torch.exp(0.5 * self.logvar(h)) * self.noise
        h = self.fc(z).view(-1, 16, 2, 2)
        return torch.sigmoid(self.up2(F.relu(self.up1(h))))


@pytest.mark.parametrize("style, in_ch, n_fused", [(SegNetBN, 3, 2), (SegNetFunctionalBN, 1, 1), (ConvVAEBN, 1, 1)])
def test_training_mode_batch_norm_pool_sites_fuse_onto_conv_bn_pool2d(style, in_ch, n_fused):
    torch.manual_seed(0)
    original = style()
    _randomize_bn(original)
    model = aefast.optimize(copy.deepcopy(original), verbose=False)  # the default fuses them
    train_rewrites = [r for r in model.aefast_rewrites if not r.startswith("(eval mode)")]
    assert sum(r.startswith("conv_bn_pool2d") and "BatchNorm2d, batch statistics" in r
               for r in train_rewrites) == n_fused, train_rewrites
    assert not any(line.startswith("max_pool2d") for line in model.aefast_unfused), model.aefast_unfused
    x = torch.randn(2, in_ch, 8, 8) if style is ConvVAEBN else torch.randn(2, in_ch, 12, 10)
    for training in (True, True, False, True):  # running statistics and num_batches_tracked follow along
        _check_same(original, model, x, training=training)
        original.zero_grad(), model.zero_grad()


def test_momentum_none_and_frozen_batch_norm_in_a_training_model():
    original = SegNetBN()
    _randomize_bn(original)
    original.enc1[1].momentum = None  # cumulative average over num_batches_tracked
    model = aefast.optimize(copy.deepcopy(original), verbose=False, batch_norm_training=True)
    x = torch.randn(2, 3, 8, 8)
    for _ in range(2):
        _check_same(original, model, x, training=True)
        original.zero_grad(), model.zero_grad()
    original.enc2[1].eval(), model.enc2[1].eval()  # frozen inside a training model: running statistics
    out_a, out_b = original(x), model(x)
    torch.testing.assert_close(out_b, out_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.enc2[1].running_mean, original.enc2[1].running_mean)
    assert model.enc2[1].num_batches_tracked.item() == original.enc2[1].num_batches_tracked.item() == 2


def test_optimized_training_mode_batch_norm_model_compiles_fullgraph():
    torch._dynamo.reset()
    original = SegNetFunctionalBN()
    _randomize_bn(original)
    model = aefast.optimize(copy.deepcopy(original), verbose=False, batch_norm_training=True).train()
    original.train()
    assert any(r.startswith("conv_bn_pool2d") for r in model.aefast_rewrites)
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 1, 8, 8)
    out_a, out_b = original(x), compiled(x)
    torch.testing.assert_close(out_b, out_a, rtol=1e-5, atol=1e-5)
    out_a.square().mean().backward()
    out_b.square().mean().backward()
    for name, p in original.named_parameters():
        torch.testing.assert_close(model.get_parameter(name).grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
    for name, b in original.named_buffers():
        torch.testing.assert_close(model.get_buffer(name), b, msg=name)


# ---------------------------------------------------------------- the layout pass (memory_format)

def _tiny_conv_ae():
    torch.manual_seed(0)
    return SequentialAE()


def test_memory_format_rejects_bad_values():
    for bad in ("nhwc", "channels_first", None, torch.channels_last):
        with pytest.raises(ValueError, match="memory_format must be one of 'auto', 'channels_last', 'preserve'"):
            aefast.optimize(_tiny_conv_ae(), verbose=False, memory_format=bad)


def test_channels_last_keeps_parameters_optimizer_and_state_dict():
    """The 4-D parameters are converted in place: the same Parameter objects, so an optimizer built
    before optimize() still steps them; the caller's input is untouched and the outputs are
    contiguous; the state_dict loads into the original class and gives the same outputs."""
    original = _tiny_conv_ae()
    model = copy.deepcopy(original)
    params_before = list(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    aefast.optimize(model, verbose=False, memory_format="channels_last")
    assert model.aefast_memory_format == "channels_last" and model.aefast_memory_format_reason == "requested"
    assert [id(p) for p in model.parameters()] == [id(p) for p in params_before]
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in model.parameters() if p.dim() == 4)
    x = torch.rand(3, 1, 12, 16)
    x_before = x.clone()
    out = model(x)
    assert out.is_contiguous() and out.shape == original(x).shape
    torch.testing.assert_close(out, original(x), rtol=1e-5, atol=1e-6)
    assert torch.equal(x, x_before) and x.is_contiguous()
    opt_ref = torch.optim.SGD(original.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        for m, o in ((model, opt), (original, opt_ref)):
            o.zero_grad()
            F.mse_loss(m(x), x).backward()
            o.step()
    for (n, p), q in zip(original.named_parameters(), model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=n)
    fresh = SequentialAE()
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(x), model(x), rtol=1e-5, atol=1e-6)


def test_preserve_leaves_layouts_alone():
    model = aefast.optimize(_tiny_conv_ae(), verbose=False, memory_format="preserve")
    assert model.aefast_memory_format == "preserve"
    model(torch.rand(2, 1, 8, 8))
    assert all(p.is_contiguous() for p in model.parameters())


def test_auto_decides_at_the_first_call_and_keeps_it(capsys):
    from aefast.optimize_layout import MIN_MEAN_CONV_AREA, choose_memory_format

    model = aefast.optimize(_tiny_conv_ae(), memory_format="auto")
    assert model.aefast_memory_format == "auto"
    assert "memory format auto (decided at the first call" in capsys.readouterr().out
    big, small = torch.rand(2, 1, 48, 48), torch.rand(2, 1, 8, 8)
    assert choose_memory_format(_tiny_conv_ae(), big)[0] == "channels_last"
    decision, reason = choose_memory_format(_tiny_conv_ae(), small)
    assert decision == "preserve" and f"< {MIN_MEAN_CONV_AREA} px" in reason
    model(big)
    assert model.aefast_memory_format == "channels_last"
    assert f"memory format channels_last (4 conv call(s)" in capsys.readouterr().out
    out = model(small)  # a later, smaller input does not flip the parameters' layout back
    assert model.aefast_memory_format == "channels_last" and out.is_contiguous()
    assert choose_memory_format(nn.Linear(3, 3), torch.rand(2, 3))[0] == "preserve"
    assert choose_memory_format(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), torch.rand(1, 4, 64, 64)) == \
        ("preserve", "grouped conv with > 1 input channel per group (0)")


def test_auto_not_yet_decided_under_torch_compile_keeps_the_layout():
    """torch.compile traces the optimized forward; an undecided "auto" cannot change parameters
    there, so it keeps the layout (and decides at the first eager call)."""
    torch._dynamo.reset()
    original = _tiny_conv_ae()
    model = aefast.optimize(copy.deepcopy(original), verbose=False)
    x = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), original(x), rtol=1e-5, atol=1e-6)
    assert model.aefast_memory_format == "auto"
    assert all(p.is_contiguous() for p in model.parameters())


class IndicesReturnedAE(FunctionalAE):
    """FunctionalAE that also hands its first pool's indices to the caller."""

    def forward(self, x):
        h, (i1, i2) = self.encode(x)
        h = F.relu(self.deconv2(F.max_unpool2d(h, i2, 2, output_size=(x.shape[-2] // 2, x.shape[-1] // 2))))
        return torch.sigmoid(self.deconv1(F.max_unpool2d(h, i1, 2, output_size=x.shape[-2:]))), i1


def _aefast_ops_called(model, x):
    with torch.profiler.profile() as prof:
        model(x)
    return {e.key for e in prof.key_averages() if e.key.startswith("aefast::")}


@pytest.mark.parametrize("style", ["functional", "segnet_bn"])
def test_indices_read_only_by_fused_decoders_travel_as_window_offsets(style):
    torch.manual_seed(0)
    original = FunctionalAE() if style == "functional" else SegNetBN()
    x = torch.randn(2, 1 if style == "functional" else 3, 12, 10)
    optimized = aefast.optimize(copy.deepcopy(original), verbose=False, memory_format="preserve")
    ops = _aefast_ops_called(optimized, x)
    assert not any("window_to_flat" in op for op in ops), ops
    assert any("unpool_conv_transpose2d" in op for op in ops), ops
    torch.testing.assert_close(optimized(x), original(x), rtol=1e-5, atol=1e-5)


def test_indices_the_caller_reads_stay_torch_flat_indices():
    torch.manual_seed(0)
    original, x = IndicesReturnedAE(), torch.randn(2, 1, 12, 10)
    optimized = aefast.optimize(copy.deepcopy(original), verbose=False, memory_format="preserve")
    (out, i1), (ref_out, ref_i1) = optimized(x), original(x)
    assert i1.dtype == torch.int64
    torch.testing.assert_close(i1, ref_i1, rtol=0, atol=0)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)


class DoubleConvNet(nn.Module):
    """U-Net's double conv (conv-BN-ReLU twice, the output read by a skip) and a decoder conv-BN-LeakyReLU."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(*_conv_bn_relu(3, 6), *_conv_bn_relu(6, 6))
        self.up = nn.ConvTranspose2d(6, 4, 2, stride=2)
        self.bn, self.out = nn.BatchNorm2d(4), nn.Conv2d(4 + 3, 2, 1)

    def forward(self, x):
        skip = self.block(x)
        h = F.max_pool2d(skip, 2)
        h = F.leaky_relu(self.bn(self.up(h)), 0.2)
        return self.out(torch.cat([h + skip[:, :4], x], dim=1))


def test_batch_norm_then_activation_fuses_where_no_pool_follows():
    torch.manual_seed(0)
    original = DoubleConvNet()
    _randomize_bn(original)
    optimized = aefast.optimize(copy.deepcopy(original), verbose=False)
    train = [r for r in optimized.aefast_rewrites if not r.startswith("(eval mode)")]
    assert sum(r.startswith("batch_norm_act2d") for r in train) == 3, train
    assert not any(r.startswith("(eval mode) batch_norm_act2d") for r in optimized.aefast_rewrites)
    x = torch.randn(2, 3, 10, 12)
    _check_same(original, optimized, x, training=True)
    _check_same(original, optimized, x, training=False)
