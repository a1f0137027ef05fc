"""The index-validation switch, the trust given to the encoder's own indices, the device checks of
every op's entry points, and the fp16 loss gradient's single rounding."""
import pytest
import torch
import torch.nn.functional as F

import aefast
import aefast.functional as AF
from aefast import validation


def _decoder_case():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=g)
    w = torch.randn(4, 3, 3, 3, generator=g)
    wd = torch.randn(4, 3, 3, 3, generator=g)
    return x, w, wd


# ---------------------------------------------------------------- the switch

def test_validation_is_on_by_default_and_reported(monkeypatch):
    monkeypatch.delenv(validation.ENV_VAR, raising=False)
    assert aefast.index_validation() is True
    assert aefast.info()["index_validation"] is True
    with aefast.set_index_validation(False):
        assert aefast.index_validation() is False
        assert aefast.info()["index_validation"] is False
        from aefast._info import format_info
        assert "index validation of user-passed pooling indices: OFF" in format_info(aefast.info())
    assert aefast.index_validation() is True


def test_environment_variable(monkeypatch):
    monkeypatch.setenv(validation.ENV_VAR, "0")
    assert aefast.index_validation() is False
    with aefast.set_index_validation(True):  # the function overrides the environment
        assert aefast.index_validation() is True
    monkeypatch.setenv(validation.ENV_VAR, "maybe")
    with pytest.raises(ValueError, match="AEFAST_VALIDATE_INDICES must be 1 or 0"):
        aefast.index_validation()
    with pytest.raises(TypeError, match="set_index_validation takes True, False or None"):
        aefast.set_index_validation("no")


def test_the_switch_turns_the_check_of_user_indices_off(index_checks):
    x, _, _ = _decoder_case()
    wd = torch.randn(3, 2, 3, 3)  # 3 pooled channels in, 2 out
    pooled, idx = AF.max_pool2d(x, 2, return_indices=True)
    bad = idx.clone()
    bad[0, 0, 0, 0] = 63  # inside the plane, outside its window
    with aefast.set_backend("reference"):  # (the CPU kernel decodes, and so checks, every index itself)
        with pytest.raises(ValueError, match=r"index 63 at position \(0, 0, 0, 0\) is not inside its own pool"):
            AF.unpool_conv_transpose2d(pooled, bad, wd, None, 2, (8, 8), padding=1)
        with aefast.set_index_validation(False):  # not checked: the user vouches for them
            AF.unpool_conv_transpose2d(pooled, bad, wd, None, 2, (8, 8), padding=1)
    # the one-pass C++ check (max_unpool2d on the cpu backend) runs only when validation is on
    AF.max_unpool2d(pooled, idx.clone(), 2, output_size=(8, 8))
    assert len(index_checks) == 1
    with aefast.set_index_validation(False):
        AF.max_unpool2d(pooled, idx.clone(), 2, output_size=(8, 8))
    assert len(index_checks) == 1


@pytest.mark.parametrize("index_format", ["flat", "window"])
def test_encoder_indices_are_trusted_until_modified(index_checks, index_format):
    """The triton backend runs the one-pass check for a user's indices (the CPU kernel checks
    in its own decode instead), so the count shows what is checked."""
    if not aefast.backend.availability()["triton"][0]:
        pytest.skip("needs the triton backend (the interpreter here)")
    x, w, wd = _decoder_case()
    with aefast.set_backend("triton"):
        pooled, idx = AF.conv_pool2d(x, w, None, padding=1, index_format=index_format)
        assert validation.is_trusted(idx)
        AF.unpool_conv_transpose2d(pooled, idx, wd, None, 2, (8, 8), padding=1, index_format=index_format)
        assert index_checks == []
        assert not validation.is_trusted(idx.clone())  # a copy is a user's tensor
        idx[0, 0, 0, 0] = idx[0, 0, 0, 0]  # so is one written in place (its version moved on)
        assert not validation.is_trusted(idx)
        AF.unpool_conv_transpose2d(pooled, idx, wd, None, 2, (8, 8), padding=1, index_format=index_format)
        assert len(index_checks) == 1


def test_models_never_check_their_own_indices(monkeypatch):
    """The models' encoder -> decoder path (and decoding a bare code, whose indices aefast makes)
    never validates: every must_validate question about their indices is answered False."""
    from aefast.models import ConvAutoencoder, SegNetAutoencoder

    answers = []
    real = validation.must_validate
    monkeypatch.setattr(validation, "must_validate", lambda t: answers.append(real(t)) or answers[-1])
    x = torch.rand(2, 1, 8, 8)
    backends = ["reference", "cpu"] + (["triton"] if aefast.backend.availability()["triton"][0] else [])
    for backend in backends:
        with aefast.set_backend(backend):
            for model in (ConvAutoencoder(1, (4, 8)), SegNetAutoencoder(in_channels=1, channels=(4, 8)),
                          ConvAutoencoder(1, (4, 8), index_format="flat")):
                model(x).sum().backward()
                model.decode(torch.rand(2, 8, 2, 2), input_size=(8, 8))
    assert answers and not any(answers)
    assert real(torch.zeros(2, 2, dtype=torch.uint8))  # a tensor of the user's is checked


# ---------------------------------------------------------------- device checks

def _ops_with_mixed_devices(a, b):
    """(name, call) pairs: every aefast op with its tensors split over the devices of a and b."""
    x, t = torch.rand(2, 3, 4, 4, device=a.device), torch.rand(2, 3, 4, 4, device=b.device)
    idx_a = torch.zeros(2, 3, 4, 4, dtype=torch.int64, device=a.device)
    win_b = torch.zeros(2, 3, 4, 4, dtype=torch.uint8, device=b.device)
    w_b = torch.rand(3, 2, 3, 3, device=b.device)
    ops = torch.ops.aefast
    return [
        ("recon_loss", lambda: ops.recon_loss(x, t, None, None, "mse", "mean", 1.0, True, False)),
        ("recon_loss", lambda: ops.recon_loss(x, x, t, None, "mse", "mean", 1.0, True, False)),
        ("kl_divergence", lambda: ops.kl_divergence(x, t, "mean", True)),
        ("loss_grad_scale", lambda: ops.loss_grad_scale(torch.ones((), device=b.device), x, 1.0)),
        ("reparameterize", lambda: ops.reparameterize(x, t, 1)),
        ("reparameterize_backward", lambda: ops.reparameterize_backward(x, t, 1)),
        ("max_unpool2d", lambda: ops.max_unpool2d(t, idx_a, [8, 8])),
        ("max_unpool2d_backward", lambda: ops.max_unpool2d_backward(t, idx_a)),
        ("unpool_conv_transpose2d", lambda: ops.unpool_conv_transpose2d(x, win_b, w_b, None, [2, 2], [8, 8], [1, 1],
                                                                        [1, 1], [0, 0], None, 0.0)),
        ("conv_pool2d_forward", lambda: ops.conv_pool2d_forward(x, torch.rand(4, 3, 3, 3, device=b.device), None,
                                                                [1, 1], [1, 1], 1, 0.0, [2, 2])),
        ("max_pool2d_backward", lambda: ops.max_pool2d_backward(x[:, :, :2, :2], idx_a[:, :, :2, :2], t)),
    ]


def test_fake_functions_refuse_mixed_devices():
    """A meta tensor among CPU ones dispatches to the fake (meta) function, which checks devices."""
    cases = _ops_with_mixed_devices(torch.empty(0), torch.empty(0, device="meta"))
    for name, call in cases:
        with pytest.raises(RuntimeError, match=f"aefast::{name}: all tensor arguments must be on one device"):
            call()


def test_cpu_kernels_refuse_mixed_devices():
    """The C++ CPU kernels themselves (reached past the dispatcher) check before reading a pointer."""
    cpu_key = torch._C.DispatchKeySet(torch._C.DispatchKey.CPU)
    x, t = torch.rand(2, 3, 4, 4), torch.rand(2, 3, 4, 4, device="meta")
    idx = torch.zeros(2, 3, 4, 4, dtype=torch.int64, device="meta")
    calls = {
        "recon_loss": (torch.ops.aefast.recon_loss.default, (x, t, None, None, "mse", "mean", 1.0, True, False)),
        "kl_divergence": (torch.ops.aefast.kl_divergence.default, (x, t, "mean", True)),
        "loss_grad_scale": (torch.ops.aefast.loss_grad_scale.default, (torch.ones((), device="meta"), x, 1.0)),
        "reparameterize": (torch.ops.aefast.reparameterize.default, (x, t, 1)),
        "max_unpool2d": (torch.ops.aefast.max_unpool2d.default, (x, idx, [8, 8])),
        "max_unpool2d_backward": (torch.ops.aefast.max_unpool2d_backward.default, (x, idx)),
        "max_pool2d_backward": (torch.ops.aefast.max_pool2d_backward.default, (x[:, :, :2, :2], idx[:, :, :2, :2], x)),
    }
    for name, (op, args) in calls.items():
        with pytest.raises(RuntimeError, match=f"aefast::{name}: all tensor arguments must be on one device"):
            op.redispatch(cpu_key, *args)


def test_fake_cuda_and_cpu_mix_raises():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x, t = torch.rand(2, 3, 4, 4, device="cuda"), torch.rand(2, 3, 4, 4)
        with pytest.raises(Exception, match="device"):
            torch.ops.aefast.recon_loss(x, t, None, None, "mse", "mean", 1.0, True, False)


def test_functional_refuses_mixed_devices_clearly():
    x, t = torch.rand(2, 3), torch.rand(2, 3, device="meta")
    with pytest.raises((ValueError, RuntimeError), match="device"):
        AF.reconstruction_loss(x, t)


# ---------------------------------------------------------------- fp16 loss gradient

@pytest.mark.parametrize("reduction", ["mean", "per_sample"])
def test_fp16_loss_gradient_rounds_once_after_the_loss_scale(kernel_backend, reduction):
    """torch computes 2(x-t)/numel * g in fp32 and rounds once. Rounded to fp16 in the forward,
    2(x-t)/numel (~3e-8 here, below fp16's smallest subnormal 6e-8) would underflow, and a
    GradScaler-style g = 2^16 could not bring it back."""
    if kernel_backend == "cuda":
        pytest.skip("CPU test (the CUDA kernel shares the saved-gradient dtype; the GPU check runs it)")
    g = torch.Generator().manual_seed(0)
    n = 1 << 19
    x = (torch.rand(2, n // 2, generator=g) * 0.02).half().requires_grad_()
    t = (torch.rand(2, n // 2, generator=g) * 0.02).half()
    scale = torch.tensor(2.0 ** 14, dtype=torch.float16)
    if reduction == "per_sample":
        scale = scale.expand(2).contiguous()
        ref = F.mse_loss(x.float(), t.float(), reduction="none").mean(1)
    else:
        ref = F.mse_loss(x.float(), t.float())
    expected = torch.autograd.grad(ref, x, scale.float())[0].half()  # fp32 math, one rounding
    loss = AF.reconstruction_loss(x, t, "mse", reduction)
    got = torch.autograd.grad(loss, x, scale)[0]
    assert got.dtype == torch.float16
    assert (expected != 0).float().mean() > 0.9  # the case underflows without a single rounding
    torch.testing.assert_close(got, expected, rtol=2e-3, atol=0)
    assert loss.dtype == torch.float16


def test_fp16_saved_gradient_is_fp32_and_the_scale_returns_fp16():
    x = torch.rand(4, 8, dtype=torch.float16)
    t = torch.rand(4, 8, dtype=torch.float16)
    _, gx, gt = torch.ops.aefast.recon_loss(x, t, None, None, "bce", "mean", 1.0, True, True)
    assert gx.dtype == gt.dtype == torch.float32
    out = torch.ops.aefast.loss_grad_scale(torch.tensor(2.0, dtype=torch.float16), gx, 1.0)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, (gx * 2).half(), rtol=0, atol=0)
    torch.library.opcheck(torch.ops.aefast.recon_loss.default, (x, t, None, None, "mse", "sum", 1.0, True, False))
    torch.library.opcheck(torch.ops.aefast.loss_grad_scale.default, (torch.tensor(2.0, dtype=torch.float16), gx, 1.0))
