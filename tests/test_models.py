"""Every aefast model against its torch.nn-only twin in aefast.reference.models.

Same state_dict (strict, both ways), same input: the forward output and EVERY parameter's
gradient must agree within fp32 tolerance on the cpu backend; a few small cases run under the
Triton backend (interpreter on CPU); under the reference backend even the train-mode
randomness (corruption, VAE sampling) matches the twin's draw for draw.
"""
import pytest
import torch

import aefast
from aefast import models as M
from aefast.models import ConvCode, FCNFeatures, VAEOutput
from aefast.reference import models as R

TOL = dict(rtol=1e-5, atol=1e-5)

# name -> (constructor kwargs, input shape); odd sizes and channels 3 on purpose.
CASES = {
    "linear": (dict(in_features=64, latent_features=5), (4, 1, 8, 8)),
    "deep": (dict(in_features=64, hidden=(32, 16), latent_features=4, activation="gelu"), (4, 1, 8, 8)),
    "dae": (dict(in_features=48, hidden=(24,), latent_features=8, activation="leaky_relu"), (3, 3, 4, 4)),
    "sdae": (dict(in_features=64, hidden=(32, 16, 8)), (4, 64)),
    "conv": (dict(in_channels=1, channels=(4, 6), activation="silu"), (2, 1, 13, 11)),
    "conv_dae": (dict(in_channels=3, channels=(5,), kernel_size=5, activation="tanh"), (2, 3, 9, 8)),
    "segnet": (dict(in_channels=1, num_classes=1, channels=(4, 6)), (2, 1, 12, 15)),
    "fcn": (dict(in_channels=3, num_classes=2, channels=(4, 6, 8)), (2, 3, 17, 16)),
    "vae": (dict(in_features=64, hidden=(32, 16), latent_features=4), (3, 1, 8, 8)),
    "conv_vae": (dict(in_channels=1, channels=(4, 6), latent_features=3, input_size=(13, 14)), (2, 1, 13, 14)),
}


def _pair(name, seed=0):
    kwargs, shape = CASES[name]
    torch.manual_seed(seed)
    model = M.MODELS[name](**kwargs)
    twin = R.MODELS[name](**kwargs)
    twin.load_state_dict(model.state_dict(), strict=True)
    torch.manual_seed(seed + 1)
    x = torch.rand(shape)
    return model, twin, x


def _output(out):
    return out.recon if isinstance(out, VAEOutput) else out


def _objective(out, weights):
    """A loss that touches every output (and mu, logvar for VAEs), with fixed random weights."""
    if isinstance(out, VAEOutput):
        return sum((t * w).sum() for t, w in zip((out.recon, out.mu, out.logvar), weights))
    return (out * weights[0]).sum()


def _check_against_twin(model, twin, x):
    model.eval()
    twin.eval()
    out_m, out_t = model(x), twin(x)
    torch.testing.assert_close(_output(out_m), _output(out_t), **TOL)
    assert _output(out_m).shape == (x.shape if not hasattr(model, "num_classes")
                                    else (x.shape[0], model.num_classes, *x.shape[-2:]))
    torch.manual_seed(7)
    parts = out_m if isinstance(out_m, VAEOutput) else (out_m,)
    weights = [torch.randn_like(t) for t in parts]
    _objective(out_m, weights).backward()
    _objective(out_t, weights).backward()
    grads_t = dict(twin.named_parameters())
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        torch.testing.assert_close(p.grad, grads_t[pname].grad, **TOL, msg=lambda m: f"{pname}: {m}")


@pytest.mark.parametrize("name", list(CASES))
def test_model_matches_twin_cpu(name):
    model, twin, x = _pair(name)
    with aefast.set_backend("cpu"):
        _check_against_twin(model, twin, x)


@pytest.mark.parametrize("name", list(CASES))
def test_model_matches_twin_triton(name):
    from aefast import backend

    ok, why = backend.availability()["triton"]
    if not ok:
        pytest.skip(why)
    kwargs, _ = CASES[name]
    torch.manual_seed(0)
    # Every model, at sizes the Triton interpreter runs in a second or so.
    small, shape = {
        "linear": (dict(in_features=16, latent_features=3), (2, 1, 4, 4)),
        "deep": (dict(in_features=16, hidden=(8,), latent_features=3, activation="gelu"), (2, 1, 4, 4)),
        "dae": (dict(in_features=16, hidden=(8,), latent_features=4, activation="leaky_relu"), (2, 1, 4, 4)),
        "sdae": (dict(in_features=16, hidden=(8, 4)), (2, 16)),
        "conv": (dict(in_channels=1, channels=(3,)), (1, 1, 6, 5)),
        "conv_dae": (dict(in_channels=1, channels=(3,), activation="tanh"), (1, 1, 6, 5)),
        "segnet": (dict(in_channels=1, channels=(2, 3)), (2, 1, 8, 8)),
        "fcn": (dict(in_channels=1, num_classes=2, channels=(2, 3, 4)), (1, 1, 8, 8)),
        "vae": (dict(in_features=16, hidden=(8,), latent_features=2), (2, 16)),
        "conv_vae": (dict(in_channels=1, channels=(2,), latent_features=2, input_size=(6, 6)), (1, 1, 6, 6)),
    }[name]
    model, twin = M.MODELS[name](**small), R.MODELS[name](**small)
    twin.load_state_dict(model.state_dict(), strict=True)
    x = torch.rand(shape)
    with aefast.set_backend("triton"):
        _check_against_twin(model, twin, x)


@pytest.mark.parametrize("name", list(CASES))
def test_state_dict_moves_both_ways(name):
    kwargs, _ = CASES[name]
    model, twin = M.MODELS[name](**kwargs), R.MODELS[name](**kwargs)
    assert list(model.state_dict()) == list(twin.state_dict())
    model.load_state_dict(twin.state_dict(), strict=True)
    for (k, a), (_, b) in zip(model.state_dict().items(), twin.state_dict().items()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("name", ["dae", "sdae", "conv_dae", "vae", "conv_vae"])
def test_train_mode_randomness_matches_twin_under_reference(name):
    """Corruption noise and VAE sampling: with the reference backend and one seed, the fused
    model draws exactly what its twin draws, so train-mode outputs and the training loss agree."""
    model, twin, x = _pair(name)
    model.train()
    twin.train()
    with aefast.set_backend("reference"):
        torch.manual_seed(3)
        out_m = model(x)
        torch.manual_seed(3)
        out_t = twin(x)
        torch.manual_seed(4)
        loss_m = model.training_loss(x)
        torch.manual_seed(4)
        loss_t = twin.training_loss(x)
    torch.testing.assert_close(_output(out_m), _output(out_t), **TOL)
    torch.testing.assert_close(loss_m, loss_t, **TOL)
    # and train mode is really random: the eval output differs
    model.eval()
    assert not torch.allclose(_output(model(x)), _output(out_m))


@pytest.mark.parametrize("name", list(CASES))
def test_training_loss_matches_twin(name):
    model, twin, x = _pair(name)
    model.eval()
    twin.eval()
    if name in ("segnet", "fcn"):
        target = (torch.rand(x.shape[0], 1, *x.shape[-2:]) > 0.5).float()
        if name == "fcn":  # two classes: integer masks, cross-entropy
            target = target.long()
        a, b = model.training_loss(x, target), twin.training_loss(x, target)
    else:
        a, b = model.training_loss(x), twin.training_loss(x)
    torch.testing.assert_close(a, b, **TOL)


def test_conv_encode_decode_api():
    model, twin, x = _pair("conv")
    model.eval()
    twin.eval()
    code = model.encode(x)
    assert isinstance(code, ConvCode)
    assert code.sizes == ((13, 11), (6, 5))             # pre-pool sizes: odd sizes round down when pooled
    assert code.z.shape == (2, 6, 3, 2)
    torch.testing.assert_close(model.decode(code), model(x))
    # a bare code decodes with fixed (top-left) unpooling, like its twin's
    bare_m = model.decode(code.z, input_size=(13, 11))
    bare_t = twin.decode(code.z, input_size=(13, 11))
    assert bare_m.shape == x.shape
    torch.testing.assert_close(bare_m, bare_t, **TOL)


def test_window_indices_give_same_model():
    """index_format='window' (uint8 offsets between the fused blocks) changes nothing visible."""
    kwargs, shape = CASES["segnet"]
    torch.manual_seed(0)
    flat = M.SegNetAutoencoder(**kwargs)
    window = M.SegNetAutoencoder(**kwargs, index_format="window")
    window.load_state_dict(flat.state_dict())
    twin = R.SegNetAutoencoder(**kwargs)
    twin.load_state_dict(flat.state_dict())
    x = torch.rand(shape)
    code = window.encode(x)
    assert all(i.dtype == torch.uint8 for i in code.indices)
    torch.testing.assert_close(window(x), flat(x), **TOL)
    torch.testing.assert_close(twin.decode(code), flat(x), **TOL)   # the twin converts window offsets


def test_fcn_encode_decode_and_vae_outputs():
    model, _, x = _pair("fcn")
    feats = model.encode(x)
    assert isinstance(feats, FCNFeatures) and len(feats.features) == 3 and feats.input_size == (17, 16)
    assert model.decode(feats).shape == (2, 2, 17, 16)
    vae, _, xv = _pair("vae")
    vae.eval()
    out = vae(xv)
    assert isinstance(out, VAEOutput) and out[0] is out.recon and out.recon.shape == xv.shape
    assert out.mu.shape == out.logvar.shape == (3, 4)
    torch.testing.assert_close(out.z, out.mu)            # eval mode decodes the mean
    vae.train()
    torch.manual_seed(0)
    assert not torch.allclose(vae(xv).z, out.mu)


def test_depth_width_latent_are_configurable():
    deep = M.DeepAutoencoder(100, hidden=(50, 40, 30), latent_features=7)
    assert deep.encode(torch.rand(2, 100)).shape == (2, 7)
    assert sum(isinstance(m, torch.nn.Linear) for m in deep.encoder) == 4
    conv = M.ConvAutoencoder(2, channels=(3, 4, 5, 6), kernel_size=3)
    assert conv.encode(torch.rand(1, 2, 32, 32)).z.shape == (1, 6, 2, 2)
    assert conv(torch.rand(1, 2, 33, 35)).shape == (1, 2, 33, 35)
    sdae = M.StackedDenoisingAutoencoder(20, hidden=(10, 6, 3))
    assert sdae.encode(torch.rand(5, 20)).shape == (5, 3) and sdae.depth == 3
    cvae = M.ConvVAE(3, channels=(4,), latent_features=9, input_size=(9, 7))
    cvae.eval()
    out = cvae(torch.rand(2, 3, 9, 7))
    assert out.recon.shape == (2, 3, 9, 7) and out.mu.shape == (2, 9)
    assert cvae.decode(torch.randn(4, 9)).shape == (4, 3, 9, 7)   # generation from the prior


@pytest.mark.parametrize("ctor, match", [
    (lambda: M.LinearAutoencoder(0, 3), "in_features"),
    (lambda: M.DeepAutoencoder(10, hidden=(5, -1)), "hidden"),
    (lambda: M.DeepAutoencoder(10, activation="swish"), "activation"),
    (lambda: M.DenoisingAutoencoder(10, corruption="blur"), "corruption"),
    (lambda: M.DenoisingAutoencoder(10, corruption="masking", level=1.5), "level"),
    (lambda: M.ConvAutoencoder(1, channels=()), "channels"),
    (lambda: M.ConvAutoencoder(1, kernel_size=4), "odd"),
    (lambda: M.ConvAutoencoder(1, loss="ssim"), "loss"),
    (lambda: M.ConvAutoencoder(1, index_format="packed"), "index_format"),
    (lambda: M.SegNetAutoencoder(1, num_classes=0), "num_classes"),
    (lambda: M.ConvVAE(1, input_size=(28,)), "input_size"),
    (lambda: M.ConvVAE(1, channels=(4, 4, 4), input_size=(6, 6)), "too small"),
])
def test_bad_constructor_arguments(ctor, match):
    with pytest.raises(ValueError, match=match):
        ctor()


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="64 features"):
        M.LinearAutoencoder(64, 4)(torch.rand(2, 65))
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        M.ConvAutoencoder(1)(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match="at least"):
        M.ConvAutoencoder(1, channels=(2, 2, 2))(torch.rand(1, 1, 6, 6))
    with pytest.raises(TypeError, match="ConvCode"):
        M.SegNetAutoencoder(1).decode((torch.rand(1, 64, 2, 2),))
    with pytest.raises(ValueError, match="input_size"):
        M.ConvVAE(1, input_size=(28, 28)).encode(torch.rand(1, 1, 32, 32))
    with pytest.raises(TypeError, match="Tensor"):
        M.ConvAutoencoder(1)([1, 2, 3])


from hypothesis import assume, given, settings, strategies as st  # noqa: E402


@settings(max_examples=15, deadline=None)
@given(h=st.integers(4, 17), w=st.integers(4, 17), c_in=st.integers(1, 3),
       widths=st.lists(st.integers(1, 5), min_size=1, max_size=2), k=st.sampled_from([1, 3, 5]),
       n=st.integers(1, 3), segnet=st.booleans())
def test_conv_models_match_twin_fuzz(h, w, c_in, widths, k, n, segnet):
    """Random sizes (odd ones, batch 1), widths and kernels: same outputs and grads as the twin."""
    assume(min(h, w) >= 2 ** len(widths))
    torch.manual_seed(0)
    kw = dict(in_channels=c_in, channels=tuple(widths), kernel_size=k)
    name = "segnet" if segnet else "conv"
    model, twin = M.MODELS[name](**kw), R.MODELS[name](**kw)
    twin.load_state_dict(model.state_dict(), strict=True)
    with aefast.set_backend("cpu"):
        _check_against_twin(model, twin, torch.rand(n, c_in, h, w))


def test_vae_decoder_block_fuses_its_activation_and_keeps_torch_semantics():
    """ConvVAE's decoder block (aefast.models.conv.ConvTranspose2d) is one fused conv_transpose_act2d
    for groups 1 / dilation 1, and the separate conv_transpose2d -> activation otherwise; both equal
    nn.ConvTranspose2d -> activation, forward and backward."""
    from aefast.models.conv import ConvTranspose2d

    torch.manual_seed(0)
    for kwargs, fused in ((dict(stride=2, padding=1, output_padding=1), True),
                          (dict(stride=2, padding=1, groups=2), False)):
        block = ConvTranspose2d(4, 6, 3, activation="sigmoid", **kwargs)
        twin = torch.nn.ConvTranspose2d(4, 6, 3, **kwargs)
        twin.load_state_dict(block.state_dict())
        x = torch.randn(2, 4, 5, 5)
        y = block(x)
        assert (y.grad_fn.name() == "aefast::ConvTransposeAct2DBackward") == fused
        want = torch.sigmoid(twin(x))
        torch.testing.assert_close(y, want)
        y.square().sum().backward()
        want.square().sum().backward()
        for p, q in zip(block.parameters(), twin.parameters()):
            torch.testing.assert_close(p.grad, q.grad)
