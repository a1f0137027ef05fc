"""VAE terms: reparameterize (statistics, gradient formula with eps regenerated from the
seed, gradcheck, opcheck) and kl_divergence (every reduction against the closed form, on
each backend and dtype, gradcheck, opcheck), plus bad inputs."""
import math

import pytest
import torch

import aefast
import aefast.functional as AF
from conftest import TOLERANCES, backend_device

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def gen(seed, device="cpu"):
    return torch.Generator(device).manual_seed(seed)


def kl_closed_form(mu, logvar):
    return -0.5 * (1 + logvar - mu**2 - logvar.exp())


def test_reparameterize_statistics():
    n = 1_000_000
    mu = torch.full((n,), 2.0)
    logvar = torch.full((n,), math.log(0.25))  # std 0.5
    with aefast.set_backend("cpu"):
        z = AF.reparameterize(mu, logvar, gen(0)).double()
    eps = (z - 2.0) / 0.5
    assert abs(eps.mean().item()) < 3 / math.sqrt(n)
    assert abs(eps.var().item() - 1) < 3 * math.sqrt(2 / (n - 1))


def test_reparameterize_gradient_formula(backend, device):
    mu = torch.randn(4, 9, device=device, dtype=torch.float64, requires_grad=True)
    logvar = torch.randn(4, 9, device=device, dtype=torch.float64, requires_grad=True)
    z = AF.reparameterize(mu, logvar, gen(3, device))
    g = torch.randn_like(z)
    gmu, glv = torch.autograd.grad(z, (mu, logvar), g)
    torch.testing.assert_close(gmu, g)
    eps = (z - mu) / torch.exp(0.5 * logvar)
    torch.testing.assert_close(glv, g * 0.5 * torch.exp(0.5 * logvar) * eps)


def test_reparameterize_reproducible_and_cross_backend(backend, device):
    mu = torch.randn(3, 20, device=device)
    lv = torch.randn(3, 20, device=device)
    a = AF.reparameterize(mu, lv, gen(5, device))
    assert torch.equal(a, AF.reparameterize(mu, lv, gen(5, device)))
    assert not torch.equal(a, AF.reparameterize(mu, lv, gen(6, device)))


def test_reparameterize_triton_matches_cpu():
    if not aefast.backend.availability()["triton"][0]:
        pytest.skip("triton unavailable")
    mu, lv = torch.randn(3, 50), torch.randn(3, 50)
    out = {}
    for b in ("cpu", "triton"):
        with aefast.set_backend(b):
            mu_ = mu.clone().requires_grad_()
            lv_ = lv.clone().requires_grad_()
            z = AF.reparameterize(mu_, lv_, gen(5))
            z.sum().backward()
            out[b] = (z, lv_.grad)
    for p, q in zip(out["cpu"], out["triton"]):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_reparameterize_dtypes(kernel_backend, dtype):
    device = backend_device(kernel_backend)
    mu = torch.zeros(8, 500, device=device, dtype=dtype)
    z = AF.reparameterize(mu, torch.zeros_like(mu), gen(1, device))
    assert z.dtype == dtype
    assert abs(z.double().std().item() - 1) < 0.05


def test_reparameterize_gradcheck_fp64():
    mu = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    lv = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    with aefast.set_backend("cpu"):
        assert torch.autograd.gradcheck(lambda a, b: AF.reparameterize(a, b, gen(4)), (mu, lv))
        assert torch.autograd.gradgradcheck(lambda a, b: AF.reparameterize(a, b, gen(4)), (mu, lv))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["none", "per_sample", "mean", "sum"])
def test_kl_divergence(backend, device, reduction, dtype):
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(5, 7, generator=g, dtype=torch.float64).to(dtype).to(device)
    lv = torch.randn(5, 7, generator=g, dtype=torch.float64).to(dtype).to(device)
    mu1, lv1 = mu.clone().requires_grad_(), lv.clone().requires_grad_()
    out = AF.kl_divergence(mu1, lv1, reduction)
    mu2, lv2 = mu.double().requires_grad_(), lv.double().requires_grad_()
    kl = kl_closed_form(mu2, lv2)
    expect = {"none": kl, "per_sample": kl.sum(1), "mean": kl.sum(1).mean(), "sum": kl.sum()}[reduction]
    go = torch.randn(expect.shape, generator=g, dtype=torch.float64)
    out.backward(go.to(dtype).to(device))
    expect.backward(go)
    assert out.dtype == dtype and out.shape == expect.shape
    for p, q in ((out, expect), (mu1.grad, mu2.grad), (lv1.grad, lv2.grad)):
        torch.testing.assert_close(p.double().cpu(), q, **TOLERANCES[dtype])


@pytest.mark.parametrize("reduction", ["none", "per_sample", "mean", "sum"])
def test_kl_gradcheck_fp64(reduction):
    mu = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    lv = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    with aefast.set_backend("cpu"):
        assert torch.autograd.gradcheck(lambda a, b: AF.kl_divergence(a, b, reduction), (mu, lv))
    assert not aefast.info()["fallbacks"]


@pytest.mark.parametrize("namespace", ["aefast", "aefast_triton"])
def test_opcheck(namespace):
    if namespace == "aefast_triton" and not aefast.backend.availability()["triton"][0]:
        pytest.skip("triton unavailable")
    ns = getattr(torch.ops, namespace)
    mu = torch.randn(3, 6, requires_grad=True)
    lv = torch.randn(3, 6, requires_grad=True)
    for reduction in ("none", "per_sample", "mean", "sum"):
        torch.library.opcheck(ns.kl_divergence.default, (mu, lv, reduction, True))
    torch.library.opcheck(ns.kl_divergence.default, (mu.detach(), lv.detach(), "mean", False))
    torch.library.opcheck(ns.reparameterize.default, (mu, lv, 987654321))
    torch.library.opcheck(ns.reparameterize_backward.default, (torch.randn(3, 6, requires_grad=True), lv, 42))


def test_bad_inputs():
    mu = torch.randn(3, 4)
    with pytest.raises(ValueError, match="one shape"):
        AF.reparameterize(mu, torch.randn(3, 5))
    with pytest.raises(TypeError, match="dtypes differ"):
        AF.kl_divergence(mu, mu.double())
    with pytest.raises(ValueError, match="reduction"):
        AF.kl_divergence(mu, mu, "batchmean")
    with pytest.raises(ValueError, match="batch dim"):
        AF.kl_divergence(torch.tensor(0.0), torch.tensor(0.0), "per_sample")
    with pytest.raises(TypeError, match="generator"):
        AF.reparameterize(mu, mu, generator="seed")
    with pytest.raises(TypeError, match="dtype"):
        AF.reparameterize(mu.int(), mu.int())
