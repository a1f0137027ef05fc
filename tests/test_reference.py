"""Every pure-PyTorch twin in aefast.reference.functional against the torch.nn.functional
composition it stands for, with the edge parameters. These twins are the spec the kernels
are held to, so they must themselves be exact."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from aefast.reference import functional as ref


def close(a, b, **kw):
    torch.testing.assert_close(a, b, equal_nan=True, **kw)


def grads(fn, *tensors):
    tensors = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*tensors)
    # The same upstream gradient for both sides of a comparison.
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    out.backward(g)
    return out, [t.grad for t in tensors]


# ---------------------------------------------------------------- max_pool2d

POOL_GRID = [
    dict(kernel_size=k, stride=s, padding=p, dilation=d, ceil_mode=c)
    for k, s, p, d, c in itertools.product([1, 2, 3, (2, 3)], [None, 1, 2, (2, 1)], [0, 1], [1, 2], [False, True])
    if not (p and (k == 1))
]


@pytest.mark.parametrize("kwargs", POOL_GRID, ids=str)
def test_max_pool2d_matches_torch(kwargs):
    g = torch.Generator().manual_seed(0)
    # Few distinct values make ties common; NaN and -inf exercise the special rules.
    x = torch.randint(-2, 3, (2, 3, 9, 8), generator=g).float()
    x[0, 0, 1, 1] = math.nan
    x[0, 1, 2:4, 2:4] = math.nan
    x[1, 2] = -math.inf
    try:
        want = F.max_pool2d(x, return_indices=True, **kwargs)
    except RuntimeError:
        pytest.skip("torch rejects this geometry")
    got = ref.max_pool2d(x, return_indices=True, **kwargs)
    close(got[0], want[0])
    assert torch.equal(got[1], want[1])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16, torch.int64])
def test_max_pool2d_dtypes_and_gradient(dtype):
    x = torch.randn(2, 3, 7, 5).mul(4).to(dtype)
    want = F.max_pool2d(x, 2, 2, 1, ceil_mode=True, return_indices=True)
    got = ref.max_pool2d(x, 2, 2, 1, ceil_mode=True, return_indices=True)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    if dtype == torch.float64:
        _, g_want = grads(lambda t: F.max_pool2d(t, 3, 2, 1), x)
        _, g_got = grads(lambda t: ref.max_pool2d(t, 3, 2, 1), x)
        close(g_got[0], g_want[0])


def test_max_pool2d_channels_last_and_3d():
    x = torch.randn(2, 4, 7, 9).to(memory_format=torch.channels_last)
    want = F.max_pool2d(x, 2, return_indices=True)
    got = ref.max_pool2d(x, 2, return_indices=True)
    assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    assert got[0].is_contiguous(memory_format=torch.channels_last) == want[0].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(ref.max_pool2d(x[0], 3, 1, 1), F.max_pool2d(x[0], 3, 1, 1))


# ---------------------------------------------------------------- max_unpool2d

@pytest.mark.parametrize("k, s, p, give_size", [(2, None, 0, False), (2, 2, 0, True), (3, 2, 1, True),
                                                (3, 3, 0, True), (2, 1, 0, False), ((2, 3), (2, 3), 0, True)])
def test_max_unpool2d_matches_torch(k, s, p, give_size):
    # 11x10 pools to sizes whose default unpooled size differs from 11x10, so output_size matters.
    x = torch.randn(2, 3, 11, 10, dtype=torch.float64)
    y, idx = F.max_pool2d(x, k, s, p, return_indices=True)
    out_size = list(x.shape[-2:]) if give_size else None
    want, gw = grads(lambda t: F.max_unpool2d(t, idx, k, s, p, output_size=out_size), y)
    got, gg = grads(lambda t: ref.max_unpool2d(t, idx, k, s, p, output_size=out_size), y)
    close(got, want)
    # Duplicates (overlapping windows): torch hands the gradient to every duplicate, aefast to
    # the one whose value reaches the output (the last in row-major order).
    flat_idx = idx.flatten(-2)
    order = torch.arange(flat_idx.shape[-1]).expand_as(flat_idx)
    last = torch.full((*flat_idx.shape[:-1], 11 * 10), -1).scatter_reduce(-1, flat_idx, order, "amax")
    winner = (last.gather(-1, flat_idx) == order).view_as(idx)
    close(gg[0], torch.where(winner, gw[0], torch.zeros_like(gw[0])))


def test_max_unpool2d_duplicates_last_wins():
    # Overlapping windows (stride 1) name the same element several times: the last wins.
    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 1, 1] = 5.0
    y, idx = F.max_pool2d(x, 2, 1, return_indices=True)
    y = y + torch.arange(9.0).view(1, 1, 3, 3)
    got = ref.max_unpool2d(y, idx, 2, 1)
    want = F.max_unpool2d(y, idx, 2, 1)  # torch's CPU kernel writes sequentially
    close(got, want)


# ---------------------------------------------------------------- conv_transpose2d

CT_GRID = [
    dict(stride=s, padding=p, output_padding=op, groups=g, dilation=d)
    for s, p, op, g, d in itertools.product([1, 2, 3], [0, 1, 2], [0, 1], [1, 2], [1, 2])
    if op < max(s, d)
]


@pytest.mark.parametrize("kwargs", CT_GRID, ids=str)
def test_conv_transpose2d_matches_torch(kwargs):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 5, 6, generator=g, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 2, generator=g, dtype=torch.float64)
    b = torch.randn(3 * kwargs["groups"], generator=g, dtype=torch.float64)
    try:
        want, gw = grads(lambda *t: F.conv_transpose2d(*t, **kwargs), x, w, b)
    except RuntimeError:
        pytest.skip("torch rejects this geometry")
    got, gg = grads(lambda *t: ref.conv_transpose2d(*t, **kwargs), x, w, b)
    close(got, want)
    for a, e in zip(gg, gw):
        close(a, e)


def test_conv_transpose2d_no_bias_3d_input():
    x, w = torch.randn(4, 5, 5), torch.randn(4, 2, 3, 3)
    close(ref.conv_transpose2d(x, w, None, 2, 1, 1), F.conv_transpose2d(x, w, None, 2, 1, 1))


# ---------------------------------------------------------------- losses

REDUCTIONS = ["none", "mean", "sum"]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", ["mse_loss", "l1_loss", "huber_loss"])
def test_regression_losses(name, reduction):
    x, t = torch.randn(3, 2, 5, dtype=torch.float64), torch.randn(3, 2, 5, dtype=torch.float64)
    t[0, 0, 0] = x[0, 0, 0]  # zero difference: l1's subgradient
    kwargs = dict(reduction=reduction)
    want, gw = grads(lambda a, b: getattr(F, name)(a, b, **kwargs), x, t)
    got, gg = grads(lambda a, b: getattr(ref, name)(a, b, **kwargs), x, t)
    close(got, want)
    for a, e in zip(gg, gw):
        close(a, e)


@pytest.mark.parametrize("delta", [0.3, 1.0, 2.5])
def test_huber_delta_and_weight(delta):
    x, t = torch.randn(40, dtype=torch.float64) * 3, torch.randn(40, dtype=torch.float64)
    close(ref.huber_loss(x, t, delta=delta), F.huber_loss(x, t, delta=delta))
    w = torch.rand(40, dtype=torch.float64)
    if "weight" in F.huber_loss.__code__.co_varnames:
        close(ref.huber_loss(x, t, "sum", delta, w), F.huber_loss(x, t, "sum", delta, weight=w))
    close(ref.huber_loss(x, t, "none", delta, w), F.huber_loss(x, t, "none", delta) * w)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("with_weight", [False, True])
def test_binary_cross_entropy(reduction, with_weight):
    p = torch.rand(4, 6, dtype=torch.float64)
    p[0, :3] = torch.tensor([0.0, 1.0, 0.5], dtype=torch.float64)  # the log is clamped at -100
    t = torch.rand(4, 6, dtype=torch.float64)
    t[0, :2] = torch.tensor([1.0, 0.0], dtype=torch.float64)
    w = torch.rand(6, dtype=torch.float64) if with_weight else None
    want = F.binary_cross_entropy(p, t, w, reduction=reduction)
    got = ref.binary_cross_entropy(p, t, w, reduction=reduction)
    close(got, want)
    inner = slice(1, None)  # gradients away from the clamp
    _, gw = grads(lambda a: F.binary_cross_entropy(a, t[inner], None if w is None else w, reduction=reduction), p[inner])
    _, gg = grads(lambda a: ref.binary_cross_entropy(a, t[inner], None if w is None else w, reduction=reduction), p[inner])
    close(gg[0], gw[0])


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("weight, pos_weight", [(False, False), (True, False), (False, True), (True, True)])
def test_binary_cross_entropy_with_logits(reduction, weight, pos_weight):
    x = torch.randn(5, 7, dtype=torch.float64) * 4
    x[0, :4] = torch.tensor([100.0, -100.0, 40.0, -40.0], dtype=torch.float64)
    t = torch.rand(5, 7, dtype=torch.float64)
    w = torch.rand(7, dtype=torch.float64) if weight else None
    pw = torch.rand(7, dtype=torch.float64) * 3 if pos_weight else None
    want, gw = grads(lambda a, b: F.binary_cross_entropy_with_logits(a, b, w, reduction=reduction, pos_weight=pw), x, t)
    got, gg = grads(lambda a, b: ref.binary_cross_entropy_with_logits(a, b, w, reduction=reduction, pos_weight=pw), x, t)
    close(got, want)
    for a, e in zip(gg, gw):
        close(a, e)


@pytest.mark.parametrize("kind, torch_fn", [("mse", F.mse_loss), ("l1", F.l1_loss), ("huber", F.huber_loss),
                                            ("bce", F.binary_cross_entropy),
                                            ("bce_logits", F.binary_cross_entropy_with_logits)])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum", "per_sample"])
def test_reconstruction_loss(kind, torch_fn, reduction):
    x = torch.rand(3, 2, 4, 5, dtype=torch.float64)
    t = torch.rand(3, 2, 4, 5, dtype=torch.float64)
    got = ref.reconstruction_loss(x, t, kind, reduction)
    if reduction == "per_sample":
        want = torch_fn(x, t, reduction="none").mean(dim=(1, 2, 3))
    else:
        want = torch_fn(x, t, reduction=reduction)
    close(got, want)


# ---------------------------------------------------------------- corruption and VAE terms

def test_corrupt_statistics_and_seeding():
    x = torch.full((1000, 1000), 0.5)
    gen = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    noisy = ref.corrupt(x, "gaussian", 0.2, gen(0))
    d = noisy - x
    assert abs(d.mean().item()) < 3 * 0.2 / 1000 and abs(d.std().item() - 0.2) < 0.002
    masked = ref.corrupt(x, "masking", 0.3, gen(0))
    frac = (masked == 0).double().mean().item()
    assert abs(frac - 0.3) < 3 * math.sqrt(0.3 * 0.7 / 1e6)
    sp = ref.corrupt(x, "salt_pepper", 0.2, gen(0))
    lo, hi = (sp == 0).double().mean().item(), (sp == 1).double().mean().item()
    assert abs(lo - 0.1) < 3 * math.sqrt(0.1 * 0.9 / 1e6) and abs(hi - 0.1) < 3 * math.sqrt(0.1 * 0.9 / 1e6)
    assert torch.equal(ref.corrupt(x, "masking", 0.3, gen(5)), ref.corrupt(x, "masking", 0.3, gen(5)))
    assert not torch.equal(ref.corrupt(x, "masking", 0.3, gen(5)), ref.corrupt(x, "masking", 0.3, gen(6)))


def test_reparameterize_and_kl_match_torch_distributions():
    mu = torch.randn(6, 4, dtype=torch.float64)
    logvar = torch.randn(6, 4, dtype=torch.float64)
    z = ref.reparameterize(mu, logvar, torch.Generator().manual_seed(3))
    eps = torch.randn(6, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float32).double()
    close(z, mu + torch.exp(0.5 * logvar) * eps)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    kl = torch.distributions.kl_divergence(q, p)
    close(ref.kl_divergence(mu, logvar, "none"), kl)
    close(ref.kl_divergence(mu, logvar, "per_sample"), kl.sum(1))
    close(ref.kl_divergence(mu, logvar, "mean"), kl.sum(1).mean())
    close(ref.kl_divergence(mu, logvar, "sum"), kl.sum())


# ---------------------------------------------------------------- fused blocks

ACTIVATIONS = {None: lambda t: t, "relu": F.relu, "leaky_relu": lambda t: F.leaky_relu(t, 0.01),
               "sigmoid": torch.sigmoid, "tanh": torch.tanh, "gelu": F.gelu, "silu": F.silu}


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("stride, padding, pool", [(1, 0, 2), (2, 1, 2), (1, 1, 3)])
def test_conv_pool2d_matches_composition(activation, stride, padding, pool):
    x = torch.randn(2, 3, 11, 9, dtype=torch.float64)
    w = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64)

    def composition(x, w, b):
        return F.max_pool2d(ACTIVATIONS[activation](F.conv2d(x, w, b, stride, padding)), pool, return_indices=True)

    want, want_idx = composition(x, w, b)
    got, got_idx = ref.conv_pool2d(x, w, b, stride, padding, activation, pool)
    close(got, want)
    assert torch.equal(got_idx, want_idx)
    _, window = ref.conv_pool2d(x, w, b, stride, padding, activation, pool, index_format="window")
    conv_hw = F.conv2d(x, w, b, stride, padding).shape[-2:]
    assert torch.equal(ref.window_to_flat(window, conv_hw, pool), want_idx)
    _, gw = grads(lambda *t: composition(*t)[0], x, w, b)
    _, gg = grads(lambda *t: ref.conv_pool2d(*t, stride, padding, activation, pool)[0], x, w, b)
    for a, e in zip(gg, gw):
        close(a, e)


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("index_format", ["flat", "window"])
@pytest.mark.parametrize("stride, padding, output_padding, pool, unpooled", [
    (1, 1, 0, 2, (10, 8)), (2, 1, 1, 2, (11, 9)), (1, 0, 0, 3, (9, 10)), (2, 0, 1, 3, (10, 11))])
def test_unpool_conv_transpose2d_matches_composition(activation, index_format, stride, padding, output_padding,
                                                    pool, unpooled):
    src = torch.randn(2, 4, *unpooled, dtype=torch.float64)
    z, idx = F.max_pool2d(src, pool, return_indices=True)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    b = torch.randn(3, dtype=torch.float64)

    def composition(z, w, b):
        u = F.max_unpool2d(z, idx, pool, output_size=unpooled)
        return ACTIVATIONS[activation](F.conv_transpose2d(u, w, b, stride, padding, output_padding))

    given = idx if index_format == "flat" else ref.flat_to_window(idx, unpooled, pool)
    want, gw = grads(composition, z, w, b)
    got, gg = grads(lambda *t: ref.unpool_conv_transpose2d(t[0], given, t[1], t[2], pool, unpooled, stride, padding,
                                                         output_padding, activation, index_format), z, w, b)
    close(got, want)
    for a, e in zip(gg, gw):
        close(a, e)
