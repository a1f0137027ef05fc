"""What aefast's models and their torch.nn twins share: argument checks, activations, code types.

Nothing here calls a kernel: the twins in aefast.reference.models import these too, so the
checks and the shape bookkeeping exist once and the twins stay torch.nn-only.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = (None, "relu", "leaky_relu", "sigmoid", "tanh", "gelu", "silu")
CORRUPTIONS = ("gaussian", "masking", "salt_pepper")
LOSS_KINDS = ("mse", "l1", "huber", "bce", "bce_logits")


class ConvCode(NamedTuple):
    """What a pooling encoder hands its decoder: the code, and per stage the pool indices and the
    pre-pool (conv output) size, deepest stage last."""
    z: torch.Tensor
    indices: tuple
    sizes: tuple


class FCNFeatures(NamedTuple):
    """FCN's encoding: the pooled feature map of every stage (shallowest first) and the input size."""
    features: tuple
    input_size: tuple


class VAEOutput(NamedTuple):
    recon: torch.Tensor
    mu: torch.Tensor
    logvar: torch.Tensor
    z: torch.Tensor


class Gaussian(NamedTuple):
    mu: torch.Tensor
    logvar: torch.Tensor


def activation(x: torch.Tensor, name: str | None, negative_slope: float = 0.01) -> torch.Tensor:
    """The activations of aefast's fused ops, written with torch.nn.functional."""
    if name is None:
        return x
    if name == "relu":
        return F.relu(x)
    if name == "leaky_relu":
        return F.leaky_relu(x, negative_slope)
    if name == "sigmoid":
        return torch.sigmoid(x)
    if name == "tanh":
        return torch.tanh(x)
    if name == "gelu":
        return F.gelu(x)
    if name == "silu":
        return F.silu(x)
    raise ValueError(f"aefast.models: unknown activation {name!r}; choose one of {ACTIVATIONS}")


# ---------------------------------------------------------------- argument checks

def _where(model):
    return f"aefast.models.{model}"


def check_int(model, name, value, minimum=1):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{_where(model)}: {name} must be an int >= {minimum}, got {value!r}")
    return value


def check_widths(model, name, value, allow_empty=False):
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, (tuple, list)) or (not value and not allow_empty):
        raise ValueError(f"{_where(model)}: {name} must be a {'' if allow_empty else 'non-empty '}tuple of positive "
                         f"ints, got {value!r}")
    for v in value:
        check_int(model, name, v)
    return tuple(value)


def check_activation(model, name, value):
    if value not in ACTIVATIONS:
        raise ValueError(f"{_where(model)}: {name} must be one of {ACTIVATIONS}, got {value!r}")
    return value


def check_corruption(model, kind, level):
    if kind not in CORRUPTIONS:
        raise ValueError(f"{_where(model)}: corruption must be one of {CORRUPTIONS}, got {kind!r}")
    if isinstance(level, bool) or not isinstance(level, (int, float)) or level < 0 or (kind != "gaussian" and level > 1):
        raise ValueError(f"{_where(model)}: level must be {'>= 0' if kind == 'gaussian' else 'in [0, 1]'}, got {level!r}")
    return kind, float(level)


def check_loss(model, kind):
    if kind not in LOSS_KINDS:
        raise ValueError(f"{_where(model)}: loss must be one of {LOSS_KINDS}, got {kind!r}")
    return kind


def check_kernel(model, kernel_size):
    check_int(model, "kernel_size", kernel_size)
    if kernel_size % 2 == 0:
        raise ValueError(f"{_where(model)}: kernel_size must be odd (a 'same' convolution keeps the size the pool "
                         f"indices refer to), got {kernel_size}")
    return kernel_size


def check_flat_input(model, x, in_features):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{_where(model)}: input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2 or math.prod(x.shape[1:]) != in_features:
        raise ValueError(f"{_where(model)}: input must be (N, ...) with {in_features} features per item, got shape "
                         f"{tuple(x.shape)}")
    return x.reshape(x.shape[0], in_features)


def check_image_input(model, x, in_channels, depth, pool_size):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{_where(model)}: input must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != in_channels:
        raise ValueError(f"{_where(model)}: input must be (N, {in_channels}, H, W), got shape {tuple(x.shape)}")
    if min(x.shape[-2:]) < pool_size ** depth:
        raise ValueError(f"{_where(model)}: H and W must be at least pool_size**depth = {pool_size ** depth} for "
                         f"{depth} pooling stages, got {tuple(x.shape[-2:])}")


def check_code(model, code, kind):
    if not isinstance(code, kind):
        raise TypeError(f"{_where(model)}: decode() takes the {kind.__name__} that encode() returns, got "
                        f"{type(code).__name__}")
    return code


def default_indices(z: torch.Tensor, size, pool_size: int, index_format: str = "flat"):
    """Indices for decoding a code that did not come from encode(): each value goes to the top-left
    of its pool window (the usual fixed-position unpooling)."""
    from aefast.validation import mark_trusted

    n, c, h, w = z.shape
    if index_format == "window":
        indices = torch.zeros(z.shape, dtype=torch.uint8, device=z.device)
    else:
        rows = torch.arange(h, device=z.device).view(h, 1) * pool_size
        cols = torch.arange(w, device=z.device).view(1, w) * pool_size
        indices = (rows * size[1] + cols).expand(n, c, h, w).contiguous()
    mark_trusted(indices)  # made here, valid by construction: the decoder need not check them
    return indices


def code_from_tensor(model, z, sizes, pool_size, index_format, channels):
    """A ConvCode for a bare latent map. ``sizes``: the pre-pool size of every stage for this input
    size; ``channels``: every stage's output channels (the decoder stage that undoes stage s takes a
    map of channels[s] channels and stage s's pooled size)."""
    if not isinstance(z, torch.Tensor) or z.dim() != 4 or z.shape[1] != channels[-1]:
        raise ValueError(f"{_where(model)}: a bare code must be (N, {channels[-1]}, h, w), got "
                         f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}")
    pooled = [(h // pool_size, w // pool_size) for h, w in sizes]
    if tuple(z.shape[-2:]) != pooled[-1]:
        raise ValueError(f"{_where(model)}: a code of spatial size {tuple(z.shape[-2:])} does not come from an "
                         f"input of size {sizes[0]} (expected {pooled[-1]})")
    indices = tuple(default_indices(z.new_empty(z.shape[0], c, *p), s, pool_size, index_format)
                    for c, p, s in zip(channels, pooled, sizes))
    return ConvCode(z, indices, tuple(sizes))


INDEX_REUSE = ("all", "deepest", "none")


def check_index_reuse(model, index_reuse, depth):
    """Which decoder stages unpool at the encoder's indices: a tuple of bools, shallowest stage
    first. "all" is SegNet's decoder; "deepest" keeps only the coarsest stage's indices; "none" is
    an index-free decoder. A stage without indices upsamples by nearest neighbour instead."""
    if index_reuse not in INDEX_REUSE:
        raise ValueError(f"{_where(model)}: index_reuse must be one of {INDEX_REUSE}, got {index_reuse!r}")
    return tuple(index_reuse == "all" or (index_reuse == "deepest" and s == depth - 1) for s in range(depth))


def upsample_nearest(x, size):
    """The index-free decoder stage's upsampling: each value repeated over its pool window (floor
    mapping when the pre-pool size was odd), the same in the fused models and their twins."""
    return F.interpolate(x, size=tuple(size), mode="nearest")


def stage_sizes(hw, depth, pool_size):
    """Pre-pool sizes of each stage for a 'same' conv followed by a floor-mode pool."""
    sizes, (h, w) = [], hw
    for _ in range(depth):
        sizes.append((h, w))
        h, w = h // pool_size, w // pool_size
    return tuple(sizes), (h, w)


def mlp_layers(widths, act, last_act=None):
    """Linear layers between consecutive widths, with ``act`` between them and ``last_act`` at the end
    (as a list of modules for nn.Sequential, so that both twins share key names)."""
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        a = act if i < len(widths) - 2 else last_act
        if a is not None:
            layers.append(Activation(a))
    return layers


class Activation(nn.Module):
    """An activation by name, as a parameter-free module (so state_dict keys match across twins)."""

    def __init__(self, name: str | None, negative_slope: float = 0.01):
        super().__init__()
        self.name, self.negative_slope = name, negative_slope

    def forward(self, x):
        return activation(x, self.name, self.negative_slope)

    def extra_repr(self):
        return repr(self.name)
