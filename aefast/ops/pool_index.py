"""pool_index family: aefast::flat_to_window and aefast::window_to_flat.

Integer in, integer out: nothing to differentiate, so only the fake functions and the Triton
twins are registered here.
"""
from __future__ import annotations

import torch

from aefast.ops import _registry


def _triton_flat_to_window(indices, input_size, kernel_size, stride, padding, dilation):
    from aefast.triton import pool_index as kernels

    return kernels.flat_to_window(indices, input_size, kernel_size, stride, padding, dilation)


def _triton_window_to_flat(window, input_size, kernel_size, stride, padding, dilation):
    from aefast.triton import pool_index as kernels

    return kernels.window_to_flat(window, input_size, kernel_size, stride, padding, dilation)


_registry.register_triton("flat_to_window", _triton_flat_to_window)
_registry.register_triton("window_to_flat", _triton_window_to_flat)


def _fake_like(dtype):
    def fake(t, input_size, kernel_size, stride, padding, dilation):
        return torch.empty_like(t, dtype=dtype, memory_format=torch.contiguous_format)

    return fake


_registry.register_fake("flat_to_window", _fake_like(torch.uint8))
_registry.register_fake("window_to_flat", _fake_like(torch.int64))
