from __future__ import annotations

import torch
from torch import nn

from aefast import functional as AF


def conv_bn_pool_with(bn: nn.BatchNorm2d, x, weight, bias, stride, padding, activation, pool_size, *,
                      return_indices=True, index_format="flat", negative_slope=0.01, pool_stride=None, ceil_mode=False):
    """aefast.functional.conv_bn_pool2d with the BatchNorm arguments read from ``bn`` at call time,
    exactly as nn.BatchNorm2d.forward chooses them: batch statistics in training mode (or without
    running statistics), running statistics updated only in training mode with
    ``track_running_stats``, ``num_batches_tracked`` counted there (``momentum=None``: cumulative
    average). aefast.optimize rewrites conv -> BatchNorm2d -> act -> pool sites onto this call, so a
    BatchNorm put in eval mode inside a training model still normalises as it would alone."""
    tracking = bn.training and bn.track_running_stats
    use_running = not bn.training or bn.track_running_stats
    return AF.conv_bn_pool2d(x, weight, bias, bn.weight, bn.bias,
                             bn.running_mean if use_running else None, bn.running_var if use_running else None,
                             training=bn.training or bn.running_mean is None, momentum=bn.momentum, eps=bn.eps,
                             stride=stride, padding=padding, activation=activation, pool_size=pool_size,
                             return_indices=return_indices, index_format=index_format,
                             num_batches_tracked=bn.num_batches_tracked if tracking else None,
                             negative_slope=negative_slope, pool_stride=pool_stride, ceil_mode=ceil_mode)


class ConvBNPool2d(nn.Module):
    """conv -> BatchNorm2d -> activation -> max-pool with argmax indices, as one fused op.

    Holds ``conv`` (an nn.Conv2d) and ``bn`` (an nn.BatchNorm2d), so the state_dict of an
    ``nn.Sequential(Conv2d, BatchNorm2d, ...)`` loads after renaming ``0.`` -> ``conv.`` and ``1.``
    -> ``bn.``; ``train()``/``eval()`` switch BatchNorm between batch and running statistics as
    usual. ``forward(x) -> (pooled, indices)`` (or only pooled with ``return_indices=False``).
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, activation="relu", pool_size=2,
                 bias=True, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, index_format="flat",
                 negative_slope=0.01, return_indices=True, device=None, dtype=None, pool_stride=None, ceil_mode=False):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias,
                              device=device, dtype=dtype)
        if not isinstance(self.conv.padding, tuple):
            raise ValueError("aefast.nn.ConvBNPool2d: padding must be an int or a pair, not a string")
        self.bn = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum, affine=affine,
                                 track_running_stats=track_running_stats, device=device, dtype=dtype)
        self.activation = activation
        self.pool_size = pool_size
        self.pool_stride = pool_stride
        self.ceil_mode = ceil_mode
        self.index_format = index_format
        self.negative_slope = negative_slope
        self.return_indices = return_indices

    def forward(self, x: torch.Tensor):
        return conv_bn_pool_with(self.bn, x, self.conv.weight, self.conv.bias, self.conv.stride, self.conv.padding,
                                 self.activation, self.pool_size, return_indices=self.return_indices,
                                 index_format=self.index_format, negative_slope=self.negative_slope,
                                 pool_stride=self.pool_stride, ceil_mode=self.ceil_mode)

    def extra_repr(self) -> str:
        return (f"activation={self.activation!r}, pool_size={self.pool_size}, pool_stride={self.pool_stride}, "
                f"ceil_mode={self.ceil_mode}")
