"""BatchNorm2d -> activation as one fused op (aefast.functional.batch_norm_act2d)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from aefast import functional as AF


# Below this many values the fused op's fixed cost per call (argument checks, dispatch, the
# running-statistics update as small tensor ops) outweighs the passes it saves, and eager
# BatchNorm2d -> activation is faster. Quiet, 2 threads, forward + backward vs eager, with the C++
# autograd entry: N128 C16 4x4 (32k values) 0.82x NCHW / 0.97x channels_last; N128 C8 8x8 (65k)
# 1.18x / 3.09x; N128 C16 8x8 (131k) 1.07x / 1.24x; N16 C32 24x24 (295k) 1.91x / 2.21x.
EAGER_BELOW_NUMEL = 48 * 1024
_EAGER_ACTIVATIONS = {None: lambda x, slope: x, "relu": lambda x, slope: F.relu(x),
                      "leaky_relu": F.leaky_relu, "sigmoid": lambda x, slope: torch.sigmoid(x),
                      "tanh": lambda x, slope: torch.tanh(x), "gelu": lambda x, slope: F.gelu(x),
                      "silu": lambda x, slope: F.silu(x)}


def batch_norm_act_with(bn: nn.BatchNorm2d, x, activation="relu", negative_slope=0.01):
    """aefast.functional.batch_norm_act2d with the BatchNorm arguments read from ``bn`` at call time,
    exactly as nn.BatchNorm2d.forward chooses them: batch statistics in training mode (or without
    running statistics), running statistics updated only in training mode with
    ``track_running_stats``, ``num_batches_tracked`` counted there (``momentum=None``: cumulative
    average). aefast.optimize rewrites BatchNorm2d -> activation sites that no pool follows onto it.
    Tensors under EAGER_BELOW_NUMEL values run nn.BatchNorm2d's own forward and the activation."""
    if x.numel() < EAGER_BELOW_NUMEL and activation in _EAGER_ACTIVATIONS:
        return _EAGER_ACTIVATIONS[activation](nn.BatchNorm2d.forward(bn, x), negative_slope)
    tracking = bn.training and bn.track_running_stats
    use_running = not bn.training or bn.track_running_stats
    return AF.batch_norm_act2d(x, bn.weight, bn.bias, bn.running_mean if use_running else None,
                               bn.running_var if use_running else None,
                               training=bn.training or bn.running_mean is None, momentum=bn.momentum, eps=bn.eps,
                               activation=activation, num_batches_tracked=bn.num_batches_tracked if tracking else None,
                               negative_slope=negative_slope)


class BatchNormAct2d(nn.BatchNorm2d):
    """nn.BatchNorm2d followed by an activation, fused: the parameters, buffers, state_dict and
    train()/eval() behaviour are nn.BatchNorm2d's (a BatchNorm2d's state_dict loads as it is);
    ``forward(x)`` is ``act(batch_norm(x))``, keeping x's memory format."""

    def __init__(self, num_features, activation="relu", eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, negative_slope=0.01, device=None, dtype=None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, device=device, dtype=dtype)
        self.activation = activation
        self.negative_slope = negative_slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return batch_norm_act_with(self, x, self.activation, self.negative_slope)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", activation={self.activation!r}"
