from __future__ import annotations

import torch
from torch import nn

from aefast import functional as AF


class ConvPool2d(nn.Conv2d):
    """conv → bias → activation → max-pool with argmax indices, as one fused op.

    Subclasses nn.Conv2d so that ``weight``/``bias`` have its names, shapes and init, and a
    Conv2d state_dict loads unchanged. ``forward(x) -> (pooled, indices)``.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, activation="relu", pool_size=2,
                 bias=True, index_format="flat", negative_slope=0.01, device=None, dtype=None, pool_stride=None,
                 ceil_mode=False):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias,
                         device=device, dtype=dtype)
        if not isinstance(self.padding, tuple):
            raise ValueError("aefast.nn.ConvPool2d: padding must be an int or a pair, not a string")
        self.activation = activation
        self.pool_size = pool_size
        self.pool_stride = pool_stride  # None: pool_size (the non-overlapping pool)
        self.ceil_mode = ceil_mode
        self.index_format = index_format
        self.negative_slope = negative_slope

    def forward(self, x: torch.Tensor, *, corruption=None, generator=None):
        """``corruption=(kind, level)`` convolves corrupt(x) with the noise made in the kernel's
        input load (see aefast.functional.conv_pool2d)."""
        return AF.conv_pool2d(x, self.weight, self.bias, self.stride, self.padding, self.activation, self.pool_size,
                              return_indices=True, index_format=self.index_format,
                              negative_slope=self.negative_slope, corruption=corruption, generator=generator,
                              pool_stride=self.pool_stride, ceil_mode=self.ceil_mode)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, activation={self.activation!r}, pool_size={self.pool_size}, "
                f"pool_stride={self.pool_stride}, ceil_mode={self.ceil_mode}")
