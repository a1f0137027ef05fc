"""Argument validation and shape math, shared by every backend (it exists once, here).

Every public function validates its arguments here, before any kernel runs, and raises
ValueError / TypeError with a message that names the argument.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def pair(value, name: str, *, minimum: int | None = None) -> tuple[int, int]:
    if isinstance(value, torch.SymInt) or isinstance(value, int) and not isinstance(value, bool):
        out = (value, value)
    elif isinstance(value, (tuple, list, torch.Size)) and len(value) == 1:
        out = (value[0], value[0])
    elif isinstance(value, (tuple, list, torch.Size)) and len(value) == 2:
        out = (value[0], value[1])
    else:
        raise TypeError(f"aefast: {name} must be an int or a pair of ints, got {value!r}")
    for v in out:
        if isinstance(v, bool) or not isinstance(v, (int, torch.SymInt)):
            raise TypeError(f"aefast: {name} must be an int or a pair of ints, got {value!r}")
        if minimum is not None and v < minimum:
            raise ValueError(f"aefast: {name} must be >= {minimum}, got {value!r}")
    return (int(out[0]), int(out[1]))


def check_tensor(t, name: str, *, dtypes: Sequence[torch.dtype] | None = None,
                 dims: Sequence[int] | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"aefast: {name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"aefast: {name} must have dtype {allowed}; got {str(t.dtype).replace('torch.', '')}")
    if dims is not None and t.dim() not in dims:
        raise ValueError(f"aefast: {name} must be {' or '.join(f'{d}-D' for d in dims)}, got shape {tuple(t.shape)}")


def check_same_device(**tensors) -> torch.device:
    present = {k: v for k, v in tensors.items() if v is not None}
    devices = {v.device for v in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{k} on {v.device}" for k, v in present.items())
        raise ValueError(f"aefast: all tensors must be on one device, got {where}")
    return next(iter(devices))


def pooling_output_size(size: int, kernel: int, stride: int, pad: int, dilation: int, ceil_mode: bool) -> int:
    """torch's pooling_output_shape: with ceil_mode the last window must start inside the
    input or the left padding."""
    span = dilation * (kernel - 1) + 1
    numerator = size + 2 * pad - span + ((stride - 1) if ceil_mode else 0)
    out = numerator // stride + 1
    if ceil_mode and (out - 1) * stride >= size + pad:
        out -= 1
    return out


@dataclass(frozen=True)
class PoolGeometry:
    """Where each pooling window of an (in_h, in_w) plane lies; the same struct as the C++ one."""

    input_size: tuple[int, int]
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    output_size: tuple[int, int]

    @property
    def window_elements(self) -> int:
        return self.kernel_size[0] * self.kernel_size[1]

    def op_args(self):
        return (list(self.input_size), list(self.kernel_size), list(self.stride), list(self.padding),
                list(self.dilation))


def pool_geometry(input_size, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False) -> PoolGeometry:
    """Validate max_pool2d-style arguments exactly as torch does and compute the output size."""
    in_hw = pair(tuple(input_size)[-2:] if isinstance(input_size, (tuple, list, torch.Size)) else input_size,
                 "input_size", minimum=1)
    k = pair(kernel_size, "kernel_size", minimum=1)
    s = k if stride is None or (isinstance(stride, (tuple, list)) and len(stride) == 0) else pair(stride, "stride", minimum=1)
    p = pair(padding, "padding", minimum=0)
    d = pair(dilation, "dilation", minimum=1)
    for axis in range(2):
        if p[axis] > k[axis] // 2:
            raise ValueError(f"aefast: padding should be at most half of the kernel size, got padding={p} "
                             f"and kernel_size={k}")
    out = tuple(pooling_output_size(in_hw[a], k[a], s[a], p[a], d[a], bool(ceil_mode)) for a in range(2))
    if out[0] < 1 or out[1] < 1:
        raise ValueError(f"aefast: pooling input of size {in_hw} with kernel_size={k}, stride={s}, padding={p}, "
                         f"dilation={d} gives an empty output {out}; the input is too small")
    return PoolGeometry(in_hw, k, s, p, d, out)


def unpool_output_size(in_hw: tuple[int, int], kernel, stride, padding, output_size) -> tuple[int, int]:
    """torch's max_unpool default size, or the validated ``output_size`` (which may be larger by
    up to stride-1 per side, as F.max_unpool2d allows)."""
    default = tuple((in_hw[a] - 1) * stride[a] - 2 * padding[a] + kernel[a] for a in range(2))
    if output_size is None:
        return default
    size = tuple(int(v) for v in output_size)
    if len(size) > 2:
        size = size[-2:]
    if len(size) != 2:
        raise ValueError(f"aefast: output_size must have 2 (or 4) entries, got {tuple(output_size)!r}")
    for a in range(2):
        if not default[a] - stride[a] < size[a] < default[a] + stride[a]:
            raise ValueError(f"aefast: invalid output_size {tuple(output_size)}: each spatial size must lie "
                             f"strictly between {tuple(d - s for d, s in zip(default, stride))} and "
                             f"{tuple(d + s for d, s in zip(default, stride))}")
    return size


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype active for ``device``'s type, or None outside autocast."""
    kind = device.type if device.type in ("cpu", "cuda") else None
    if kind is None or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


def autocast_cast(dtype: torch.dtype | None, *tensors):
    """Casts the floating tensors to ``dtype`` (None: unchanged), as autocast does for an op on
    its lower-precision or fp32 list."""
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype else t
                 for t in tensors)
