from __future__ import annotations

import torch
from torch import nn

from aefast import functional as AF


class UnpoolConvTranspose2d(nn.ConvTranspose2d):
    """max-unpool at the encoder's indices → transposed conv → bias → activation, fused.

    Subclasses nn.ConvTranspose2d so that ``weight``/``bias`` match it exactly.
    ``forward(x, indices, output_size=None) -> y``; ``output_size`` is the unpooled size.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, output_padding=0,
                 activation=None, pool_size=2, bias=True, index_format="flat", negative_slope=0.01, device=None,
                 dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         output_padding=output_padding, bias=bias, device=device, dtype=dtype)
        self.activation = activation
        self.pool_size = pool_size
        self.index_format = index_format
        self.negative_slope = negative_slope

    def forward(self, x: torch.Tensor, indices: torch.Tensor, output_size=None):  # type: ignore[override]
        return AF.unpool_conv_transpose2d(x, indices, self.weight, self.bias, self.pool_size, output_size,
                                          self.stride, self.padding, self.output_padding, self.activation,
                                          self.index_format, negative_slope=self.negative_slope)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}, pool_size={self.pool_size}"


class ConvTransposeAct2d(nn.ConvTranspose2d):
    """Transposed conv → bias → activation, fused: the decoder's upsampler without unpool (a
    U-Net's, VAE's or tutorial AE's stride-2 ConvTranspose2d → ReLU / LeakyReLU / Sigmoid).

    Subclasses nn.ConvTranspose2d (groups 1, dilation 1), so ``weight``/``bias`` and the state_dict
    match it exactly. ``forward(x, output_size=None) -> y``, ``output_size`` as ConvTranspose2d's.
    Its reference twin is ``nn.Sequential(nn.ConvTranspose2d(...), <activation>)``.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, output_padding=0,
                 activation=None, bias=True, negative_slope=0.01, device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         output_padding=output_padding, bias=bias, device=device, dtype=dtype)
        self.activation = activation
        self.negative_slope = negative_slope

    def forward(self, x: torch.Tensor, output_size=None):  # type: ignore[override]
        output_padding = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size, 2,
                                              self.dilation)
        return AF.conv_transpose_act2d(x, self.weight, self.bias, self.stride, self.padding, output_padding,
                                       activation=self.activation, negative_slope=self.negative_slope)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, activation={self.activation!r}"
