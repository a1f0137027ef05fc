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


@pytest.mark.parametrize("style, n_rewrites", [(SequentialAE, 2), (FunctionalAE, 4), (DictIndicesAE, 5)])
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
