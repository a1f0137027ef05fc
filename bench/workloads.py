"""The benchmark workloads, defined in one place.

The ratio-table scripts (bench/bench_*.py) and the pytest-benchmark suite (bench/suite/) both
import their shapes, eager PyTorch references and aefast calls from here, so that the two always
time the same thing. Each family has a full list (the sizes the figures are quoted at) and a
quick list (tiny shapes for the CI smoke runs).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

import aefast
import aefast.functional as AF

# ---------------------------------------------------------------------------------------------
# Encoder block: conv 3x3 (stride 1, padding 1) -> bias -> relu -> 2x2 max-pool with indices.
CONV_POOL_SHAPES = [  # N, Cin, Cout, H, W
    (256, 1, 32, 28, 28),
    (256, 32, 64, 14, 14),
    (32, 3, 32, 128, 128),
]
CONV_POOL_QUICK_SHAPES = [(4, 1, 8, 12, 12), (2, 8, 16, 10, 10)]


def conv_pool_eager(x, w, b):
    return F.max_pool2d(F.relu(F.conv2d(x, w, b, 1, 1)), 2, return_indices=True)


def conv_pool_fused(backend):
    def fused(x, w, b):
        with aefast.set_backend(backend):
            return AF.conv_pool2d(x, w, b, 1, 1, "relu", 2)
    return fused


def conv_pool_inputs(shape, device):
    """(x, w, b), all requiring grad (so the backward computes dgrad too), seeded."""
    n, cin, cout, h, w = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, cin, h, w, generator=g).to(device).requires_grad_()
    wt = (torch.randn(cout, cin, 3, 3, generator=g) / (3 * cin ** 0.5)).to(device).requires_grad_()
    b = torch.randn(cout, generator=g).to(device).requires_grad_()
    return x, wt, b


def conv_pool_case(shape) -> str:
    n, cin, cout, h, w = shape
    return f"N{n} {cin}->{cout} {h}x{w}"


def conv_pool_flops(shape) -> float:
    """The DENSE conv's forward FLOPs (backward: twice that), for every variant alike."""
    n, cin, cout, h, w = shape
    return 2.0 * n * cout * h * w * cin * 9


# ---------------------------------------------------------------------------------------------
# Decoder block: max-unpool 2x2 -> conv_transpose 3x3 (stride 1, padding 1) -> bias -> act.
UNPOOL_SHAPES = [  # name, N, C_in, C_out, unpooled H=W, activation
    ("64->32 @14x14 N=256", 256, 64, 32, 14, "relu"),
    ("32->1 @28x28 N=256", 256, 32, 1, 28, "sigmoid"),
    ("32->3 @128x128 N=32", 32, 32, 3, 128, "sigmoid"),
]
UNPOOL_QUICK_SHAPES = [
    ("quick 8->4 @8x8 N=2", 2, 8, 4, 8, "relu"),
    ("quick 4->1 @6x6 N=1", 1, 4, 1, 6, "sigmoid"),
]
UNPOOL_KERNEL, UNPOOL_STRIDE, UNPOOL_PADDING, UNPOOL_POOL = 3, 1, 1, 2


def unpool_eager(z, idx, w, b, act):
    y = F.conv_transpose2d(F.max_unpool2d(z, idx, UNPOOL_POOL), w, b, UNPOOL_STRIDE, UNPOOL_PADDING)
    return torch.relu(y) if act == "relu" else torch.sigmoid(y)


def unpool_fused(backend, indices, index_format, act):
    def fused(z, w, b):
        with aefast.set_backend(backend):
            return AF.unpool_conv_transpose2d(z, indices, w, b, UNPOOL_POOL, None, UNPOOL_STRIDE, UNPOOL_PADDING,
                                              0, act, index_format)
    return fused


def unpool_inputs(n, c_in, c_out, hw, device, seed=0):
    """[z, flat idx, window idx, w, b]: z and its indices come from a real max-pool."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, hw, hw, generator=gen)
    z, idx = F.max_pool2d(x, UNPOOL_POOL, return_indices=True)
    w = torch.randn(c_in, c_out, UNPOOL_KERNEL, UNPOOL_KERNEL, generator=gen) / (c_in * UNPOOL_KERNEL ** 2) ** 0.5
    b = torch.randn(c_out, generator=gen)
    window = AF.flat_to_window(idx, (hw, hw), UNPOOL_POOL)
    return [t.to(device) for t in (z, idx, window, w, b)]


def unpool_macs(n, c_in, c_out, hw):
    """(dense, sparse) forward MACs: the transposed conv over the unpooled map, and over the
    pooled values only (what aefast executes)."""
    dense = n * c_in * hw * hw * c_out * UNPOOL_KERNEL ** 2
    sparse = n * c_in * (hw // UNPOOL_POOL) ** 2 * c_out * UNPOOL_KERNEL ** 2
    return dense, sparse


def gemm_form_steps(rows, c_in, k, device="cpu"):
    """The GEMMs a vendor-GEMM decoder would run (torch.mm: MKL on CPU, cuBLAS on CUDA), on random
    operands of their shapes: rows = every unpooled position (the argmax is per channel, so a dense
    GEMM cannot skip the unpooled map's zeros), K = C_out*KH*KW. {"cols": columns (rows x C_in) @
    W (C_in x K) -- the decoder forward, and the encoder's dgrad with C_in = its C_out;
    "dgrad": (rows x K) @ W^T -- the decoder's grad of the pooled values; "wgrad": (C_in x rows) @
    (rows x K) -- either block's weight gradient}. Timed alone, on pre-gathered operands, they are
    a lower bound on that form (its gathers, col2im and epilogue come on top)."""
    gen = torch.Generator().manual_seed(0)
    u, cols = torch.randn(rows, c_in, generator=gen).to(device), torch.randn(rows, k, generator=gen).to(device)
    w, wt = torch.randn(c_in, k, generator=gen).to(device), torch.randn(k, c_in, generator=gen).to(device)
    out_cols, out_gz, out_gw = torch.empty_like(cols), torch.empty_like(u), torch.empty_like(w)
    return {"cols": lambda: torch.mm(u, w, out=out_cols),
            "dgrad": lambda: torch.mm(cols, wt, out=out_gz),
            "wgrad": lambda: torch.mm(u.t(), cols, out=out_gw)}


# ---------------------------------------------------------------------------------------------
# Reconstruction loss forward + backward, every kind and reduction.
LOSS_KINDS = ("mse", "l1", "huber", "bce", "bce_logits")
LOSS_REDUCTIONS = ("mean", "sum", "none", "per_sample")
LOSS_SHAPES = [(256, 1, 28, 28), (32, 3, 128, 128)]
LOSS_QUICK_SHAPES = [(4, 1, 8, 8), (2, 3, 16, 16)]
TORCH_LOSS = {"mse": F.mse_loss, "l1": F.l1_loss, "huber": F.huber_loss, "bce": F.binary_cross_entropy,
              "bce_logits": F.binary_cross_entropy_with_logits}


def loss_eager(kind, reduction):
    fn = TORCH_LOSS[kind]

    def loss(x, t):
        if reduction == "per_sample":
            return fn(x, t, reduction="none").reshape(x.shape[0], -1).mean(1)
        return fn(x, t, reduction=reduction)

    return loss


def loss_fused(kind, reduction):
    return lambda x, t: AF.reconstruction_loss(x, t, kind, reduction)


def loss_inputs(kind, shape, device, dtype=torch.float32):
    """(input requiring grad, target) in the kind's domain (probabilities for bce)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    if kind == "bce":
        x = torch.rand(shape, generator=g) * 0.98 + 0.01
        t = torch.rand(shape, generator=g)
    elif kind == "bce_logits":
        x = torch.randn(shape, generator=g) * 3
        t = torch.rand(shape, generator=g)
    else:
        x, t = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    return x.to(device, dtype).requires_grad_(), t.to(device, dtype)


def loss_min_bytes(x, reduction) -> int:
    """Minimum traffic of a fused forward+backward: read input and target, write the input
    gradient (3 tensor sizes). Reduction none moves 7: its forward cannot know the incoming
    gradient, so it writes the loss (3), and the backward reads the incoming gradient, writes
    the input gradient and needs dl/dx again (2 either way)."""
    n = x.numel() * x.element_size()
    return 7 * n if reduction == "none" else 3 * n


def loss_case(kind, reduction, shape) -> str:
    return f"{kind}/{reduction} {'x'.join(map(str, shape))}"


# ---------------------------------------------------------------------------------------------
# End-to-end models: one SGD training step and one inference pass, aefast.models against the
# torch.nn twin in aefast.reference.models.
MODEL_WORKLOADS = [  # case, model class name, constructor kwargs, input shape
    ("W1", "ConvAutoencoder", dict(in_channels=1, channels=(32, 64)), (256, 1, 28, 28)),
    ("W2", "ConvAutoencoder", dict(in_channels=3, channels=(32, 64, 128)), (32, 3, 128, 128)),
    ("ConvDAE-W1", "ConvDenoisingAutoencoder", dict(in_channels=1, channels=(32, 64)), (256, 1, 28, 28)),
    ("SegNet-W1", "SegNetAutoencoder", dict(in_channels=1, channels=(32, 64)), (256, 1, 28, 28)),
    ("ConvVAE-W1", "ConvVAE", dict(in_channels=1, channels=(32, 64), input_size=(28, 28)), (256, 1, 28, 28)),
]
# GPU workloads: W1 and W2 are launch-bound on an H100, these are not. The suite runs them with
# --device cuda only (a CPU step of G1 takes minutes); --autocast bf16 gives their bf16 rows.
GPU_MODEL_WORKLOADS = [
    # G1: an MVTec-sized defect detector.
    ("G1", "ConvAutoencoder", dict(in_channels=3, channels=(64, 128, 256)), (64, 3, 256, 256)),
    ("G2", "SegNetAutoencoder", dict(in_channels=3, channels=(64, 128, 256, 512)), (16, 3, 256, 256)),
]
MODEL_QUICK_WORKLOADS = [
    ("W1-tiny", "ConvAutoencoder", dict(in_channels=1, channels=(4, 8)), (4, 1, 12, 12)),
    ("ConvDAE-tiny", "ConvDenoisingAutoencoder", dict(in_channels=1, channels=(4, 8)), (4, 1, 12, 12)),
    ("SegNet-tiny", "SegNetAutoencoder", dict(in_channels=1, channels=(4, 8)), (4, 1, 12, 12)),
    ("ConvVAE-tiny", "ConvVAE", dict(in_channels=1, channels=(4, 8), input_size=(12, 12)), (4, 1, 12, 12)),
]


def model_reference_loss(name, out, x, target):
    if name == "SegNetAutoencoder":
        return F.binary_cross_entropy_with_logits(out, target)
    if name == "ConvVAE":
        recon, mu, logvar = out[0], out[1], out[2]
        kl = (-0.5 * (1 + logvar - mu * mu - logvar.exp())).sum(1).mean()
        return F.binary_cross_entropy(recon, x, reduction="sum") / x.shape[0] + kl
    return F.mse_loss(out, x)


def model_aefast_loss(name, out, x, target):
    if name == "SegNetAutoencoder":
        return AF.reconstruction_loss(out, target, "bce_logits")
    if name == "ConvVAE":
        return AF.reconstruction_loss(out[0], x, "bce", "sum") / x.shape[0] + AF.kl_divergence(out[1], out[2])
    return AF.reconstruction_loss(out, x, "mse")


def model_inputs(shape, device):
    """(x in [0, 1), a binary target for the segmentation model), seeded."""
    torch.manual_seed(0)
    x = torch.rand(shape, device=device)
    target = (torch.rand(shape, device=device) > 0.5).float()
    return x, target


def model_pair(name, kwargs, device):
    """(reference twin, aefast model) with the same weights."""
    from aefast import models as fast_models
    from aefast.reference import models as ref_models

    torch.manual_seed(0)
    reference = getattr(ref_models, name)(**kwargs).to(device)
    fast = getattr(fast_models, name)(**kwargs).to(device)
    fast.load_state_dict(reference.state_dict())
    return reference, fast


def make_model_step(model, loss_fn, name, x, target, autocast_dtype=None):
    """(train step, inference pass) closures: zero_grad, forward + loss under autocast, backward,
    SGD step; and a no-grad forward."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    amp = (lambda: torch.autocast(x.device.type, dtype=autocast_dtype)) if autocast_dtype else contextlib.nullcontext

    def step():
        opt.zero_grad(set_to_none=True)
        with amp():
            loss = loss_fn(name, model(x), x, target)
        loss.backward()
        opt.step()
        return loss

    def infer():
        with torch.no_grad(), amp():
            return model(x)

    return step, infer


# ---------------------------------------------------------------------------------------------
# Per-layer shapes of a model workload (the encoder and decoder blocks it runs), derived from the
# model's structure (aefast/models/conv.py): ConvPool2d(k=3, padding 1, pool 2) stages, then
# UnpoolConvTranspose2d(k=3, padding 1) stages that reuse the encoder's indices.

def model_layers(name, kwargs, shape):
    """(encoder shapes as CONV_POOL_SHAPES rows, decoder specs as UNPOOL_SHAPES rows) of a
    ConvAutoencoder or SegNetAutoencoder workload."""
    if name not in ("ConvAutoencoder", "SegNetAutoencoder"):
        raise ValueError(f"model_layers: no layer table for {name}")
    n, c, h, w = shape
    widths = (kwargs.get("in_channels", c), *kwargs["channels"])
    encoder, sizes = [], []
    for i in range(len(widths) - 1):
        encoder.append((n, widths[i], widths[i + 1], h, w))
        sizes.append(h)
        h, w = h // 2, w // 2
    decoder = []
    for i in reversed(range(len(widths) - 1)):
        c_out = widths[1] if (name == "SegNetAutoencoder" and i == 0) else widths[i]
        act = "sigmoid" if (name == "ConvAutoencoder" and i == 0) else "relu"
        decoder.append((f"{widths[i + 1]}->{c_out} @{sizes[i]}x{sizes[i]} N={n}", n, widths[i + 1], c_out, sizes[i],
                        act))
    return encoder, decoder


def _gpu_layer_shapes():
    enc, dec = [], []
    for _, name, kwargs, shape in GPU_MODEL_WORKLOADS:
        e, d = model_layers(name, kwargs, shape)
        enc += [x for x in e if x not in enc]
        dec += [x for x in d if x not in dec]
    return enc, dec


# The G1/G2 layers as per-op workloads (the suite adds them to the lists above on --device cuda).
CONV_POOL_GPU_SHAPES, UNPOOL_GPU_SHAPES = _gpu_layer_shapes()
