"""aefast's public functions: validate every argument, pick a backend, call the op.

Validation lives here, once, for every backend: a bad argument raises TypeError/ValueError
before any kernel runs. Backends that have no kernel for a call (yet, or for some parameter)
take the reference twin, and the fallback is counted in ``aefast.info()``.
"""
from __future__ import annotations

import warnings

import torch

from aefast import _checks
from aefast import backend as _backend_module
from aefast import validation as _validation
from aefast._checks import FLOAT_DTYPES, check_same_device, check_tensor, pair
from aefast.ops import _registry
from aefast.ops import batch_norm_act as _batch_norm_act_ops
from aefast.ops import conv_bn_pool as _conv_bn_pool_ops
from aefast.ops import conv_transpose_act as _conv_transpose_act
from aefast.ops import unpool_deconv as _unpool_deconv
from aefast.ops import recon_loss as _recon_loss_ops
from aefast.ops._dispatch import choose
from aefast.reference import functional as ref

ACTIVATIONS = ref.ACTIVATIONS
LOSS_KINDS = ref.LOSS_KINDS
CORRUPTIONS = ref.CORRUPTIONS
INDEX_FORMATS = ("flat", "window")
REAL_DTYPES = FLOAT_DTYPES + (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)



def _compiling() -> bool:
    """Checks that read tensor values (index ranges, probability ranges) need a device sync and
    break torch.compile graphs; under compile they are skipped and the kernels' own guards hold."""
    return torch.compiler.is_compiling()


# Autocast policy (per op, as torch's own lists): the conv blocks (conv_pool2d,
# unpool_conv_transpose2d, conv_transpose2d) run in the autocast dtype, like conv2d; the losses
# and kl_divergence run in fp32, like mse_loss; pooling, unpooling, corrupt and reparameterize
# keep their input dtype.
def _autocast_lower(*tensors):
    device = next((t.device for t in tensors if isinstance(t, torch.Tensor)), None)
    return _checks.autocast_cast(_checks.autocast_dtype(device), *tensors) if device is not None else tensors


def _autocast_fp32(*tensors):
    device = next((t.device for t in tensors if isinstance(t, torch.Tensor)), None)
    if device is None or _checks.autocast_dtype(device) is None:
        return tensors
    return _checks.autocast_cast(torch.float32, *tensors)


def _channels_last_like(out, input):
    """torch's convolutions give channels_last outputs for channels_last inputs; so do ours."""
    if input.dim() == 4 and ref._memory_format(input) == torch.channels_last:
        return out.contiguous(memory_format=torch.channels_last)
    return out


# ================================================================ index formats

def _index_geometry(t, input_size, kernel_size, stride, padding, dilation):
    if isinstance(input_size, torch.Tensor):
        raise TypeError("aefast: input_size must be a tuple of ints such as x.shape[-2:], not a tensor")
    geo = _checks.pool_geometry(input_size, kernel_size, stride, padding, dilation)
    if geo.window_elements > 255:
        raise ValueError(f"aefast: window indices are uint8, so a window may hold at most 255 elements; "
                         f"kernel_size={geo.kernel_size} holds {geo.window_elements}")
    return geo


def _check_value(check, t) -> bool:
    """``check=None`` follows the index-validation switch (aefast.set_index_validation)."""
    checking = _validation.must_validate(t) if check is None else bool(check)
    return checking and t.numel() > 0 and not _compiling()


def flat_to_window(indices, input_size, kernel_size, stride=None, padding=0, dilation=1, *, check=None):
    """PyTorch's int64 pooling indices -> aefast's uint8 offsets inside each pool window.

    ``input_size`` is the pooled input's (H, W) (or its full shape); the pooling arguments are
    those given to ``max_pool2d``. With ``check`` (default: aefast.set_index_validation's
    setting) an index that is out of range or outside its own window raises ValueError on CPU,
    and asserts on the device on CUDA (no host sync; see aefast.validation).
    """
    check_tensor(indices, "indices", dtypes=(torch.int64,))
    if indices.dim() < 2:
        raise ValueError(f"aefast: indices must have at least 2 dims (…, H_out, W_out), got shape {tuple(indices.shape)}")
    geo = _index_geometry(indices, input_size, kernel_size, stride, padding, dilation)
    plane = geo.input_size[0] * geo.input_size[1]
    check = _check_value(check, indices)
    if check:
        lo, hi = torch.aminmax(indices)
        range_msg = f"indices must lie in [0, {plane}) for an input of size {geo.input_size}"
        if not _validation.reports_on_host(indices):
            _validation.assert_on_device((lo >= 0) & (hi < plane), range_msg)
        elif lo.item() < 0 or hi.item() >= plane:
            raise ValueError(f"aefast: {range_msg}; found values in [{lo.item()}, {hi.item()}]")
    backend = choose("flat_to_window", indices.device)
    if backend == "reference":
        out = ref.flat_to_window(indices, geo.input_size, geo.kernel_size, geo.stride, geo.padding, geo.dilation)
    else:
        out = _registry.op(backend, "flat_to_window")(indices, *geo.op_args())
    if check:
        bad = out == 255
        window_msg = (f"is not inside its own pooling window (kernel_size={geo.kernel_size}, stride={geo.stride}, "
                      f"padding={geo.padding}, dilation={geo.dilation})")
        if not _validation.reports_on_host(indices):
            _validation.assert_on_device(~bad.any(), "an index " + window_msg)
        elif bad.any():
            pos = tuple(int(v) for v in bad.nonzero()[0])
            raise ValueError(f"aefast: index {indices[pos].item()} at position {pos} {window_msg}")
    return out


def window_to_flat(window, input_size, kernel_size, stride=None, padding=0, dilation=1, *, check=None):
    """aefast's uint8 window offsets -> PyTorch's int64 flat pooling indices (``check`` as in
    flat_to_window)."""
    check_tensor(window, "window", dtypes=(torch.uint8,))
    if window.dim() < 2:
        raise ValueError(f"aefast: window indices must have at least 2 dims (…, H_out, W_out), got shape {tuple(window.shape)}")
    geo = _index_geometry(window, input_size, kernel_size, stride, padding, dilation)
    check = _check_value(check, window)
    if check:
        hi = window.max()
        range_msg = f"window offsets must lie in [0, {geo.window_elements}) for kernel_size={geo.kernel_size}"
        if not _validation.reports_on_host(window):
            _validation.assert_on_device(hi < geo.window_elements, range_msg)
        elif hi.item() >= geo.window_elements:
            raise ValueError(f"aefast: {range_msg}; found {hi.item()}")
    backend = choose("window_to_flat", window.device)
    if backend == "reference":
        out = ref.window_to_flat(window, geo.input_size, geo.kernel_size, geo.stride, geo.padding, geo.dilation)
    else:
        out = _registry.op(backend, "window_to_flat")(window, *geo.op_args())
    if check:
        bad = out < 0
        if not _validation.reports_on_host(window):
            _validation.assert_on_device(~bad.any(), "a window offset points into the padding, not at an input element")
        elif bad.any():
            pos = tuple(int(v) for v in bad.nonzero()[0])
            raise ValueError(f"aefast: window offset {window[pos].item()} at position {pos} points into the padding, "
                             f"not at an input element")
    return out


# ================================================================ shared validation

def _check_activation(activation, negative_slope):
    if activation not in ACTIVATIONS:
        raise ValueError(f"aefast: unknown activation {activation!r}; choose one of {ACTIVATIONS}")
    if not isinstance(negative_slope, (int, float)):
        raise TypeError(f"aefast: negative_slope must be a number, got {negative_slope!r}")


def _check_float_inputs(**tensors):
    present = {k: v for k, v in tensors.items() if v is not None}
    for name, t in present.items():
        check_tensor(t, name, dtypes=FLOAT_DTYPES)
    dtypes = {t.dtype for t in present.values()}
    if len(dtypes) > 1:
        raise TypeError("aefast: dtypes differ: " + ", ".join(f"{k} is {str(v.dtype).replace('torch.', '')}"
                                                          for k, v in present.items()))
    return check_same_device(**present)


def _check_index_format(index_format):
    if index_format not in INDEX_FORMATS:
        raise ValueError(f"aefast: index_format must be one of {INDEX_FORMATS}, got {index_format!r}")


def _check_unpool_indices(input, indices, index_format, out_hw, window_elements, *, values=True):
    _check_index_format(index_format)
    want = torch.int64 if index_format == "flat" else torch.uint8
    check_tensor(indices, "indices", dtypes=(want,))
    if indices.shape != input.shape:
        raise ValueError(f"aefast: indices must have the input's shape {tuple(input.shape)}, got {tuple(indices.shape)}")
    check_same_device(input=input, indices=indices)
    if not indices.numel() or not values or _compiling() or not _validation.must_validate(indices):
        return
    limit = out_hw[0] * out_hw[1] if index_format == "flat" else window_elements
    lo, hi = torch.aminmax(indices)
    what = f"flat indices into an output of size {tuple(out_hw)}" if index_format == "flat" else "window offsets"
    if not _validation.reports_on_host(indices):
        _validation.assert_on_device((lo >= 0) & (hi < limit), f"{what} must lie in [0, {limit})")
    elif lo.item() < 0 or hi.item() >= limit:
        raise ValueError(f"aefast: {what} must lie in [0, {limit}); found values in [{lo.item()}, {hi.item()}]")


# ================================================================ pooling

def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """Drop-in for torch.nn.functional.max_pool2d (same arguments, values and indices)."""
    check_tensor(input, "input", dtypes=REAL_DTYPES, dims=(3, 4))
    if any(s == 0 for s in input.shape[-3:]):
        raise ValueError(f"aefast: max_pool2d needs non-empty channel and spatial dims, got shape {tuple(input.shape)}")
    geo = _checks.pool_geometry(input.shape[-2:], kernel_size, stride, padding, dilation, ceil_mode)
    backend = choose("max_pool2d_forward", input.device, lambda b: _max_pool2d_unsupported(b, input))
    if backend == "reference":
        return ref.max_pool2d(input, kernel_size, stride, padding, dilation, ceil_mode, return_indices)
    squeeze = input.dim() == 3
    x = input.unsqueeze(0) if squeeze else input
    out, idx = _registry.op(backend, "max_pool2d_forward")(x, list(geo.kernel_size), list(geo.stride),
                                                           list(geo.padding), list(geo.dilation), bool(ceil_mode))
    if squeeze:
        out, idx = out.squeeze(0), idx.squeeze(0)
    return (out, idx) if return_indices else out


def _max_pool2d_unsupported(backend, input):
    if backend != "cpu" and not input.dtype.is_floating_point:  # the CPU kernel covers every real dtype
        return f"{backend} max_pool2d kernels cover floating dtypes only, got {str(input.dtype).replace('torch.', '')}"
    return None


def max_unpool2d(input, indices, kernel_size, stride=None, padding=0, output_size=None):
    """Drop-in for torch.nn.functional.max_unpool2d. Duplicate indices: the last pooled
    position (row-major) naming an element wins, on every backend."""
    check_tensor(input, "input", dtypes=FLOAT_DTYPES, dims=(3, 4))
    k = pair(kernel_size, "kernel_size", minimum=1)
    s = k if stride is None else pair(stride, "stride", minimum=1)
    p = pair(padding, "padding", minimum=0)
    out_hw = _checks.unpool_output_size(tuple(input.shape[-2:]), k, s, p, output_size)
    compiled_check = _backend_name(input.device) != "reference" and _compiled_check_available(input.device)
    _check_unpool_indices(input, indices, "flat", out_hw, None, values=not compiled_check)
    if compiled_check and indices.numel() and not _compiling() and _validation.must_validate(indices):
        _check_first_bad_index(indices, "flat", out_hw, (1, 1), False)
    backend = choose("max_unpool2d", input.device)
    if backend == "reference":
        return ref.max_unpool2d(input, indices, k, s, p, out_hw)
    out = _unpool_deconv.max_unpool2d(backend, input, indices, out_hw)
    return out.contiguous(memory_format=ref._memory_format(input))  # channels_last in, channels_last out


# ================================================================ transposed convolution

def _check_conv_transpose(input, weight, bias, stride, padding, output_padding, groups, dilation, in_hw=None):
    """``in_hw`` overrides the input's spatial size (the decoder convolves the unpooled map)."""
    device = _check_float_inputs(input=input, weight=weight, bias=bias)
    check_tensor(input, "input", dims=(3, 4))
    check_tensor(weight, "weight", dims=(4,))
    s, p = pair(stride, "stride", minimum=1), pair(padding, "padding", minimum=0)
    op, d = pair(output_padding, "output_padding", minimum=0), pair(dilation, "dilation", minimum=1)
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"aefast: groups must be a positive int, got {groups!r}")
    c_in = input.shape[-3]
    if weight.shape[0] != c_in:
        raise ValueError(f"aefast: weight of shape {tuple(weight.shape)} expects {weight.shape[0]} input channels "
                         f"(weight is (C_in, C_out/groups, kH, kW)), but input has {c_in}")
    if c_in % groups:
        raise ValueError(f"aefast: input channels {c_in} are not divisible by groups={groups}")
    c_out = weight.shape[1] * groups
    if bias is not None and tuple(bias.shape) != (c_out,):
        raise ValueError(f"aefast: bias must have shape ({c_out},), got {tuple(bias.shape)}")
    for a in range(2):
        if op[a] >= s[a] and op[a] >= d[a]:
            raise ValueError(f"aefast: output_padding {op} must be smaller than either stride {s} or dilation {d}")
    in_hw = tuple(input.shape[-2:]) if in_hw is None else in_hw
    out_hw = [(in_hw[a] - 1) * s[a] - 2 * p[a] + d[a] * (weight.shape[2 + a] - 1) + op[a] + 1 for a in range(2)]
    if min(out_hw) < 1:
        raise ValueError(f"aefast: conv_transpose2d output would be empty ({tuple(out_hw)}); padding is too large")
    return device, (s, p, op, d), tuple(out_hw)


def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):
    """Drop-in for torch.nn.functional.conv_transpose2d."""
    input, weight, bias = _autocast_lower(input, weight, bias)
    device, (s, p, op, d), _ = _check_conv_transpose(input, weight, bias, stride, padding, output_padding, groups, dilation)

    def unsupported(b):
        if groups != 1:
            return "groups != 1"
        if d != (1, 1):
            return "dilation != 1"
        return None

    backend = choose("conv_transpose2d", device, unsupported)
    if backend == "reference":
        return ref.conv_transpose2d(input, weight, bias, s, p, op, groups, d)
    # A transposed conv is the fused decoder with 1x1 pool windows: every input value is its own
    # window's maximum (window offset 0), so the same kernels serve it, forward and backward.
    x = input if input.dim() == 4 else input.unsqueeze(0)
    offsets = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    y = _unpool_deconv.unpool_conv_transpose2d(backend, x, offsets, weight, bias, (1, 1), tuple(x.shape[-2:]), s, p,
                                               op, None, 0.01)
    return y.contiguous(memory_format=ref._memory_format(input)) if input.dim() == 4 else y.squeeze(0)


def conv_transpose_act2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1,
                         activation=None, *, negative_slope=0.01):
    """act(conv_transpose2d(input, weight, bias, stride, padding, output_padding)), fused: the
    decoder's upsampler without unpool (a U-Net's or VAE's stride-2 ConvTranspose2d -> act).

    The transposed conv runs on the vendor's kernels (oneDNN on CPU, cuDNN on CUDA) and bias ->
    activation on its output in one pass; the backward makes the activation's gradient in one pass
    and hands it to the vendor's convolution backward. On CPU the op's kernel runs it as GEMMs
    instead where oneDNN is slow (one rule, conv_transpose_form in csrc/cpu/conv_transpose_gemm.cpp:
    the sub-pixel GEMM at large strides, e.g. FCN's score upsamplers, a GEMM + col2im for small
    forwards). ``groups`` and ``dilation`` are accepted for
    torch's signature and must be 1. Input is (N, C_in, H, W), weight (C_in, C_out, kH, kW) as
    ConvTranspose2d's; a BatchNorm2d in eval mode is folded into weight and bias by the caller
    (aefast.optimize does)."""
    input, weight, bias = _autocast_lower(input, weight, bias)
    check_tensor(input, "input", dims=(4,))
    _check_activation(activation, negative_slope)
    if groups != 1:  # before the shape checks, which would name a grouped weight's channels
        raise ValueError(f"aefast: conv_transpose_act2d supports groups=1 only, got groups={groups!r}; use "
                         "torch.nn.functional.conv_transpose2d and the activation for grouped transposed convs")
    device, (s, p, op, d), _ = _check_conv_transpose(input, weight, bias, stride, padding, output_padding, groups,
                                                     dilation)
    if d != (1, 1):
        raise ValueError(f"aefast: conv_transpose_act2d supports dilation=1 only, got dilation={d}; use "
                         "torch.nn.functional.conv_transpose2d and the activation for dilated transposed convs")
    backend = choose("conv_transpose_act2d", device)
    if backend == "reference":
        return ref.conv_transpose_act2d(input, weight, bias, s, p, op, activation, negative_slope=negative_slope)
    out = _conv_transpose_act.conv_transpose_act2d(backend, input, weight, bias, s, p, op, activation, negative_slope)
    return _channels_last_like(out, input)


def _slice_indices(crop: slice, length):
    """crop.indices(length), in Python: torch 2.11's dynamo cannot trace the builtin (a graph break)."""
    step = 1 if crop.step is None else crop.step
    if step == 0:
        raise ValueError("slice step cannot be zero")
    lower, upper = (0, length) if step > 0 else (-1, length - 1)

    def bound(value, default):
        if value is None:
            return default
        if value < 0:
            return max(value + length, lower)
        return min(value, upper)

    return (bound(crop.start, lower if step > 0 else upper), bound(crop.stop, upper if step > 0 else lower), step)


def conv_transpose_act2d_cropped(input, weight, bias, stride, padding, output_padding, rows, cols, activation=None,
                                 negative_slope=0.01, contiguous_output=False):
    """conv_transpose_act2d(input, weight, bias, stride, padding, output_padding, activation=...)[:, :, rows, cols]
    (``rows``, ``cols``: slices), as aefast.optimize rewrites an upsampler whose output is only
    cropped (FCN's score upsamplers: upscore2[:, :, 1:1 + h, 1:1 + w], upscore8[:, :, 4:4 + H, 4:4 + W]).

    Per axis, with L the full output length, keeping [c0, c1) is the same transposed conv with
    padding p + c0 (which drops c0 positions at both ends) and output_padding op + c0 + c1 - L
    (which puts back the end's), when that lies in [0, stride): then the op computes and stores only
    the kept map, and its backward reads only it (a slice's backward zero-fills the full map and
    copies into it). Otherwise, and for a step other than 1, the op then the slice, as written.

    ``contiguous_output``: the caller makes the result NCHW-contiguous anyway (FCN's last crop, then
    ``.contiguous()``): the op then runs on NCHW operands, whose layout it keeps, so neither the
    output nor its gradient is converted (two copies of the full-resolution map per step) and the
    sub-pixel form takes its NCHW kernels (measured faster at FCN's upscore8: see conv_transpose_gemm.cpp)."""
    if contiguous_output:
        input, weight = input.contiguous(), weight.contiguous()
    s, p, op = pair(stride, "stride", minimum=1), pair(padding, "padding", minimum=0), \
        pair(output_padding, "output_padding", minimum=0)
    full = [(input.shape[-2 + a] - 1) * s[a] - 2 * p[a] + weight.shape[2 + a] + op[a] for a in range(2)]
    folded = []
    for a, crop in enumerate((rows, cols)):
        c0, c1, step = _slice_indices(crop, full[a]) if isinstance(crop, slice) else (0, 0, 0)
        extra = op[a] + c0 + c1 - full[a]
        folded.append((p[a] + c0, extra) if step == 1 and c1 > c0 and 0 <= extra < s[a] else None)
    if None in folded:
        out = conv_transpose_act2d(input, weight, bias, s, p, op, activation=activation, negative_slope=negative_slope)
        return out[:, :, rows, cols]
    return conv_transpose_act2d(input, weight, bias, s, tuple(f[0] for f in folded), tuple(f[1] for f in folded),
                                activation=activation, negative_slope=negative_slope)


# ================================================================ fused blocks

def _conv_out_hw(hw, k, s, p):
    return tuple((hw[a] + 2 * p[a] - k[a]) // s[a] + 1 for a in range(2))


def _check_corruption_arg(corruption):
    """``corruption=(kind, level)`` or ``(kind, level, low, high)`` -> (kind, level, low, high),
    validated as corrupt() validates its arguments."""
    if not isinstance(corruption, (tuple, list)) or len(corruption) not in (2, 4):
        raise TypeError(f"aefast: corruption must be (kind, level) or (kind, level, low, high), got {corruption!r}")
    kind, level, low, high = (*corruption, 0.0, 1.0) if len(corruption) == 2 else corruption
    return _check_corruption_values(kind, level, low, high)


def _check_corruption_values(kind, level, low, high):
    """One validation of a corruption's kind, level and salt/pepper values (corrupt() and the
    encoder's corruption= argument alike) -> (kind, level, low, high) as floats."""
    if kind not in CORRUPTIONS:
        raise ValueError(f"aefast: unknown corruption {kind!r}; choose one of {CORRUPTIONS}")
    if isinstance(level, bool) or not isinstance(level, (int, float)) or not level >= 0 or \
            (kind != "gaussian" and level > 1) or level == float("inf"):
        raise ValueError(f"aefast: corruption level must be {'>= 0' if kind == 'gaussian' else 'in [0, 1]'}, got {level!r}")
    for name, v in (("low", low), ("high", high)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"aefast: corruption {name} must be a number, got {v!r}")
    return kind, float(level), float(low), float(high)


def _check_conv_pool_args(input, weight, bias, stride, padding, pool_size, activation, negative_slope,
                          index_format, pool_stride=None, ceil_mode=False):
    """The checks every conv -> [BN] -> act -> pool block shares; (stride, padding, pool, pool stride,
    conv output hw). The pool is max_pool2d's with no padding and dilation 1 (pool_stride None:
    pool_size)."""
    _check_activation(activation, negative_slope)
    _check_index_format(index_format)
    s, p = pair(stride, "stride", minimum=1), pair(padding, "padding", minimum=0)
    k_pool = pair(pool_size, "pool_size", minimum=1)
    s_pool = k_pool if pool_stride is None else pair(pool_stride, "pool_stride", minimum=1)
    if not isinstance(ceil_mode, bool):
        raise TypeError(f"aefast: ceil_mode must be a bool, got {ceil_mode!r}")
    if input.shape[1] != weight.shape[1]:
        raise ValueError(f"aefast: input has {input.shape[1]} channels but weight of shape {tuple(weight.shape)} "
                         f"expects {weight.shape[1]} (weight is (C_out, C_in, kH, kW))")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"aefast: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    conv_hw = _conv_out_hw(input.shape[-2:], weight.shape[-2:], s, p)
    if min(conv_hw) < 1:
        raise ValueError(f"aefast: the conv kernel {tuple(weight.shape[-2:])} is larger than the padded input "
                         f"{tuple(input.shape[-2:])} (padding={p})")
    if conv_hw[0] < k_pool[0] or conv_hw[1] < k_pool[1]:
        raise ValueError(f"aefast: pool_size {k_pool} is larger than the conv output {conv_hw}")
    if index_format == "window" and k_pool[0] * k_pool[1] > 255:
        raise ValueError(f"aefast: window indices hold at most 255 offsets; pool_size {k_pool} has more")
    return s, p, k_pool, s_pool, conv_hw


def _general_pool_unsupported(conv_hw, k_pool, s_pool, ceil_mode):
    """The fallback rule of the encoder blocks: the cpu and triton backends have kernels for every
    pool; the cuda one for pool stride = pool size (ceil_mode included) and runs the reference twin
    for other strides, counted in aefast.info()."""
    if tuple(s_pool) == tuple(k_pool):
        return lambda backend: None
    return lambda backend: (None if backend in ("cpu", "triton") else
                            f"no {backend} kernel for pool_stride != pool_size yet")


def _tiling_pool_or_unknown(input, weight, stride, padding, pool_size, pool_stride, ceil_mode):
    """is_tiling_pool before validation (True where the arguments are malformed: the checks after
    report those)."""
    from aefast.ops.conv_pool import is_tiling_pool

    try:
        k_pool = pair(pool_size, "pool_size", minimum=1)
        s_pool = k_pool if pool_stride is None else pair(pool_stride, "pool_stride", minimum=1)
        conv_hw = _conv_out_hw(input.shape[-2:], weight.shape[-2:], pair(stride, "stride", minimum=1),
                               pair(padding, "padding", minimum=0))
        return min(conv_hw) < 1 or is_tiling_pool(conv_hw, k_pool, s_pool, bool(ceil_mode))
    except (TypeError, ValueError, AttributeError, IndexError):
        return True


# Window offsets from an encoder whose pool stride differs from its pool size mean offsets inside
# windows that stride apart; the decoder must be told (its pool_stride=), else it reads them as
# offsets inside non-overlapping windows. Such tensors are remembered here (by identity, weakly)
# so that the decoder refuses them with a clear error instead of a silent wrong result.
_WINDOW_STRIDES: dict[int, tuple] = {}


def _remember_window_stride(window, s_pool):
    """Eager only, like validation.mark_trusted: under torch.compile the traced tensors have no lasting
    identity (and torch 2.11's dynamo cannot trace id() of one: a graph break, which fullgraph refuses)."""
    import weakref

    if _compiling():
        return
    key = id(window)
    _WINDOW_STRIDES[key] = (weakref.ref(window, lambda _, key=key: _WINDOW_STRIDES.pop(key, None)), tuple(s_pool))


def _window_stride_of(indices):
    if _compiling():
        return None
    entry = _WINDOW_STRIDES.get(id(indices))
    return entry[1] if entry is not None and entry[0]() is indices else None


def conv_pool2d(input, weight, bias=None, stride=1, padding=0, activation="relu", pool_size=2,
                return_indices=True, index_format="flat", *, negative_slope=0.01, corruption=None, generator=None,
                pool_stride=None, ceil_mode=False):
    """max_pool2d(act(conv2d(input, weight, bias, stride, padding)), pool_size, pool_stride,
    ceil_mode=ceil_mode, return_indices=True) in one pass; indices are torch's flat int64 ones or
    aefast's uint8 ``window`` offsets.

    ``pool_stride`` (default: pool_size) and ``ceil_mode`` are max_pool2d's, output size rule
    included. A window offset is ``r*pool_w + c`` inside the window that starts at
    ``(i*pool_stride_h, j*pool_stride_w)`` of the activation, also for a ceil_mode window clipped at
    the edge. With pool_stride != pool_size (overlapping windows) one position can be the maximum
    of several windows: flat indices then repeat it, as max_pool2d's do, and the gradient sums over
    those windows. Give the decoder the same ``pool_stride=`` to unpool such indices; window offsets
    from such a pool are refused by a decoder that is not told. The cpu backend has kernels for every
    pool; triton and cuda run pools other than pool_stride = pool_size without a clipped ceil_mode
    window on the reference twin, each call counted in ``aefast.info()``'s fallbacks.

    ``corruption=(kind, level)`` (or ``(kind, level, low, high)``; kind gaussian | masking |
    salt_pepper) convolves ``corrupt(input, kind, level, generator, low=low, high=high)`` instead
    of ``input``: the noise is drawn with the same seed from ``generator`` (the default generator
    when None) and the same per-element Philox stream as corrupt(), so the result equals
    corrupt-then-conv_pool2d, but it is generated in the kernel's input load and regenerated in
    the weight gradient's: no corrupted copy of the input is made or kept for the backward. The
    gradient w.r.t. ``input`` is that of the corrupted input times d corrupt / d input (1 for
    gaussian, 0 where an element was masked or salted)."""
    noise = None
    if corruption is not None:
        check_tensor(input, "input", dtypes=FLOAT_DTYPES)
        noise = _check_corruption_arg(corruption)
        _check_generator(generator, input.device, "input")
        kind, level, low, high = noise
        lowered = _autocast_lower(input)[0]
        # The definition, taken literally, where the noise cannot be generated in the load: the
        # reference backend, tracing (corrupt() traces the reference there), and autocast, which
        # would otherwise corrupt the lowered-precision copy instead of the input itself.
        if (_compiling() or lowered.dtype != input.dtype
                or not _tiling_pool_or_unknown(input, weight, stride, padding, pool_size, pool_stride, ceil_mode)
                or choose("conv_pool2d_forward", input.device) == "reference"):
            input, noise = corrupt(input, kind, level, generator, low=low, high=high), None
    elif generator is not None:
        raise ValueError("aefast: conv_pool2d takes a generator only together with corruption=")
    input, weight, bias = _autocast_lower(input, weight, bias)
    _check_float_inputs(input=input, weight=weight, bias=bias)
    check_tensor(input, "input", dims=(4,))
    check_tensor(weight, "weight", dims=(4,))
    s, p, k_pool, s_pool, conv_hw = _check_conv_pool_args(input, weight, bias, stride, padding, pool_size, activation,
                                                          negative_slope, index_format, pool_stride, ceil_mode)
    backend = choose("conv_pool2d_forward", input.device, _general_pool_unsupported(conv_hw, k_pool, s_pool, ceil_mode))
    if backend == "reference":
        out = ref.conv_pool2d(input, weight, bias, s, p, activation, k_pool, return_indices, index_format,
                              negative_slope=negative_slope, pool_stride=s_pool, ceil_mode=ceil_mode)
        if return_indices:
            _mark_encoder_indices(out[1], index_format, k_pool, s_pool)
        return out
    from aefast.ops import conv_pool as _conv_pool_ops

    if noise is None:
        pooled, window = _conv_pool_ops.conv_pool2d(backend, input, weight, bias, s, p, activation,
                                                    negative_slope, k_pool, s_pool, ceil_mode)
    else:
        kind, level, low, high = noise
        pooled, window, _ = _registry.op(backend, "conv_pool2d_forward")(
            input, weight, bias, list(s), list(p), _conv_pool_ops.ACTIVATION_CODES[activation],
            float(negative_slope), list(k_pool), kind, level, _draw_seed(generator, input.device), low, high,
            pool_stride=list(s_pool), ceil_mode=bool(ceil_mode))
    return _encoder_outputs(backend, pooled, window, input, return_indices, index_format, conv_hw, k_pool, s_pool)


def _mark_encoder_indices(indices, index_format, k_pool, s_pool):
    """The encoder's indices need no check in the decoder when each lies in its own window of a
    non-overlapping pool (which is what the decoder checks). Overlapping pools' indices are left to
    the decoder's checks, and their window offsets remember the stride (_WINDOW_STRIDES)."""
    if tuple(s_pool) == tuple(k_pool):
        _validation.mark_trusted(indices)
    elif index_format == "window":
        _remember_window_stride(indices, s_pool)


def _encoder_outputs(backend, pooled, window, input, return_indices, index_format, conv_hw, k_pool, s_pool):
    pooled = _channels_last_like(pooled, input)
    if not return_indices:
        return pooled
    if index_format == "window":
        _mark_encoder_indices(window, index_format, k_pool, s_pool)
        return pooled, window
    # The kernels write compact window offsets; torch's flat indices follow from the geometry.
    flat = _registry.op(backend, "window_to_flat")(window, list(conv_hw), list(k_pool), list(s_pool), [0, 0], [1, 1])
    _mark_encoder_indices(flat, index_format, k_pool, s_pool)
    return pooled, flat


def _backend_name(device):
    from aefast import backend as _backend

    return _backend.resolve(device)


def _compiled_check_available(device):
    """aefast::first_bad_unpool_index has CPU kernels, and CUDA ones in a CUDA build."""
    from aefast._extension import BUILD_INFO

    return device.type == "cpu" or (device.type == "cuda" and BUILD_INFO["cuda"])


def _raise_bad_index(indices, linear, index_format, unpooled_hw, k_pool):
    pos = tuple(int(v) for v in torch.unravel_index(torch.tensor(linear), tuple(indices.shape)))
    value = indices[pos].item()
    if index_format == "flat":
        limit = unpooled_hw[0] * unpooled_hw[1]
        if not 0 <= value < limit:
            raise ValueError(f"aefast: flat indices into an output of size {tuple(unpooled_hw)} must lie in "
                             f"[0, {limit}); found {value} at position {pos}")
    elif value >= k_pool[0] * k_pool[1]:
        raise ValueError(f"aefast: window offsets must lie in [0, {k_pool[0] * k_pool[1]}); found {value} at "
                         f"position {pos}")
    what = "index" if index_format == "flat" else "window offset"
    raise ValueError(f"aefast: {what} {value} at position {pos} is not inside its own pool window "
                     f"(pool_size={tuple(k_pool)}, unpooled size {tuple(unpooled_hw)})")


def _check_first_bad_index(indices, index_format, unpooled_hw, k_pool, in_window):
    """The one-pass C++ index check: on CPU a ValueError naming the first bad index, on CUDA a
    device-side assert (the position stays on the device: no host sync)."""
    bad = _unpool_deconv.first_bad_index(indices, unpooled_hw, k_pool, in_window)
    if not _validation.reports_on_host(indices):
        what = "an index" if index_format == "flat" else "a window offset"
        where = f"inside its own pool window (pool_size={tuple(k_pool)}) and " if in_window else ""
        _validation.assert_on_device(bad < 0, f"{what} is not {where}inside the unpooled plane {tuple(unpooled_hw)}")
        return
    position = int(bad)
    if position >= 0:
        _raise_bad_index(indices, position, index_format, unpooled_hw, k_pool)


def _check_indices_in_window(backend, indices, index_format, unpooled_hw, k_pool):
    """Each index must name an element of its own pool window (stride = pool_size) inside the
    unpooled plane; anything else is a ValueError (CPU) or a device-side assert (CUDA) here, so
    no kernel reads out of bounds. Skipped for the encoder's own indices and when validation is
    off (aefast.validation)."""
    if not indices.numel() or _compiling() or not _validation.must_validate(indices):
        return
    if backend != "reference" and _compiled_check_available(indices.device):
        _check_first_bad_index(indices, index_format, unpooled_hw, k_pool, True)
        return
    hp, wp = indices.shape[-2:]
    if index_format == "flat":
        if backend != "reference":
            # The index-conversion kernel marks an index outside its window with 255.
            offsets = _registry.op(backend, "flat_to_window")(indices, list(unpooled_hw), list(k_pool), list(k_pool),
                                                             [0, 0], [1, 1])
            bad = offsets == 255
            if _validation.reports_on_host(indices) and bad.any():
                pos = tuple(int(v) for v in bad.nonzero()[0])
                value, limit = indices[pos].item(), unpooled_hw[0] * unpooled_hw[1]
                if not 0 <= value < limit:
                    raise ValueError(f"aefast: flat indices into an output of size {tuple(unpooled_hw)} must lie in "
                                     f"[0, {limit}); found {value} at position {pos}")
        else:
            oh = torch.arange(hp, device=indices.device).view(hp, 1)
            ow = torch.arange(wp, device=indices.device).view(1, wp)
            h = torch.div(indices, unpooled_hw[1], rounding_mode="floor")
            w = indices - h * unpooled_hw[1]
            bad = (torch.div(h, k_pool[0], rounding_mode="floor") != oh) | (torch.div(w, k_pool[1], rounding_mode="floor") != ow)
    else:
        if hp * k_pool[0] <= unpooled_hw[0] and wp * k_pool[1] <= unpooled_hw[1]:
            return  # every offset < pool_h*pool_w (checked) lands inside the plane
        oh = torch.arange(hp, device=indices.device).view(hp, 1)
        ow = torch.arange(wp, device=indices.device).view(1, wp)
        off = indices.to(torch.int64)
        h = oh * k_pool[0] + torch.div(off, k_pool[1], rounding_mode="floor")
        w = ow * k_pool[1] + torch.remainder(off, k_pool[1])
        bad = (h >= unpooled_hw[0]) | (w >= unpooled_hw[1])
    what = "index" if index_format == "flat" else "window offset"
    if not _validation.reports_on_host(indices):
        _validation.assert_on_device(~bad.any(), f"a {what} is not inside its own pool window "
                                                 f"(pool_size={tuple(k_pool)}, unpooled size {tuple(unpooled_hw)})")
    elif bad.any():
        pos = tuple(int(v) for v in bad.nonzero()[0])
        raise ValueError(f"aefast: {what} {indices[pos].item()} at position {pos} is not inside its own pool window "
                         f"(pool_size={tuple(k_pool)}, unpooled size {tuple(unpooled_hw)})")


def unpool_conv_transpose2d(input, indices, weight, bias=None, pool_size=2, output_size=None, stride=1,
                            padding=0, output_padding=0, activation=None, index_format="flat", *,
                            negative_slope=0.01, pool_stride=None):
    """act(conv_transpose2d(max_unpool2d(input, indices, pool_size, pool_stride, output_size=output_size),
    weight, bias, stride, padding, output_padding)) without building the unpooled map.

    ``pool_stride`` (default pool_size) is the encoder pool's stride. The fused kernels serve
    pool_stride = pool_size; another stride (the indices of an overlapping pool, where a position
    may be named twice: the last one in row-major order wins, as max_unpool2d) runs the reference
    twin, counted in ``aefast.info()``'s fallbacks. Window offsets are read as offsets inside windows
    pool_stride apart; offsets from an aefast encoder with another pool stride are refused."""
    input, weight, bias = _autocast_lower(input, weight, bias)
    check_tensor(input, "input", dims=(4,))
    k_pool = pair(pool_size, "pool_size", minimum=1)
    s_pool = k_pool if pool_stride is None else pair(pool_stride, "pool_stride", minimum=1)
    encoder_stride = _window_stride_of(indices) if index_format == "window" else None
    if encoder_stride is not None and encoder_stride != tuple(s_pool):
        raise ValueError(f"aefast: these window offsets come from a pool with stride {encoder_stride} but the decoder "
                         f"reads them with pool_stride={tuple(s_pool)}; pass pool_stride={encoder_stride}")
    if s_pool != k_pool:
        return _unpool_conv_transpose2d_strided(input, indices, weight, bias, k_pool, s_pool, output_size, stride,
                                                padding, output_padding, activation, index_format, negative_slope)
    unpooled_hw = _checks.unpool_output_size(tuple(input.shape[-2:]), k_pool, k_pool, (0, 0), output_size)
    # Kernel backends check range and window of the index values in one pass, below.
    _check_unpool_indices(input, indices, index_format, unpooled_hw, k_pool[0] * k_pool[1],
                          values=_backend_name(input.device) == "reference"
                          or not _compiled_check_available(input.device))
    _check_activation(activation, negative_slope)
    device, (s, p, op, _), _ = _check_conv_transpose(input, weight, bias, stride, padding, output_padding, 1, 1,
                                                     in_hw=unpooled_hw)
    backend = choose("unpool_conv_transpose2d", device)
    # The CPU kernel decodes (and so checks) every index itself and names the first bad one;
    # the other backends run the separate one-pass check first.
    kernel_checks = backend == "cpu" and device.type == "cpu"
    if not kernel_checks:
        _check_indices_in_window(backend, indices, index_format, unpooled_hw, k_pool)
    if backend != "reference":
        try:
            out = _unpool_deconv.unpool_conv_transpose2d(backend, input, indices, weight, bias, k_pool, unpooled_hw,
                                                         s, p, op, activation, negative_slope)
        except RuntimeError as err:
            bad = _unpool_deconv.bad_index_position(err) if kernel_checks else None
            if bad is None:
                raise
        else:
            return _channels_last_like(out, input)
        _raise_bad_index(indices, bad, index_format, unpooled_hw, k_pool)
    return ref.unpool_conv_transpose2d(input, indices, weight, bias, k_pool, unpooled_hw, s, p, op, activation,
                                       index_format, negative_slope=negative_slope)


def _unpool_conv_transpose2d_strided(input, indices, weight, bias, k_pool, s_pool, output_size, stride, padding,
                                     output_padding, activation, index_format, negative_slope):
    """The decoder for an encoder pool with pool_stride != pool_size: no fused kernel, the reference
    twin (counted), after the same checks (window offsets are converted, and so checked, first)."""
    unpooled_hw = _checks.unpool_output_size(tuple(input.shape[-2:]), k_pool, s_pool, (0, 0), output_size)
    _check_unpool_indices(input, indices, index_format, unpooled_hw, k_pool[0] * k_pool[1])
    _check_activation(activation, negative_slope)
    device, (s, p, op, _), _ = _check_conv_transpose(input, weight, bias, stride, padding, output_padding, 1, 1,
                                                     in_hw=unpooled_hw)
    choose("unpool_conv_transpose2d", device,
           lambda backend: f"no {backend} kernel for pool_stride != pool_size (overlapping pool windows) yet")
    if index_format == "window":
        indices, index_format = window_to_flat(indices, unpooled_hw, k_pool, s_pool), "flat"
    return ref.unpool_conv_transpose2d(input, indices, weight, bias, k_pool, unpooled_hw, s, p, op, activation,
                                       index_format, negative_slope=negative_slope, pool_stride=s_pool)


# ================================================================ losses

def _reduction(reduction, size_average=None, reduce=None, allowed=("none", "mean", "sum")):
    if size_average is not None or reduce is not None:
        from torch.nn import _reduction as legacy

        reduction = legacy.legacy_get_string(size_average, reduce)
    if reduction not in allowed:
        raise ValueError(f"aefast: reduction must be one of {allowed}, got {reduction!r}")
    return reduction


def _check_loss_pair(input, target, *, same_shape, op_name, weight=None, extra=None):
    tensors = {"input": input, "target": target, "weight": weight}
    if extra:
        tensors.update(extra)
    _check_float_inputs(**tensors)
    if input.shape != target.shape:
        if same_shape:
            raise ValueError(f"aefast: {op_name}: target size {tuple(target.shape)} must equal input size "
                             f"{tuple(input.shape)}")
        try:
            torch.broadcast_shapes(input.shape, target.shape)
        except RuntimeError:
            raise ValueError(f"aefast: {op_name}: target size {tuple(target.shape)} does not broadcast to input "
                             f"size {tuple(input.shape)}") from None
        warnings.warn(f"Using a target size ({target.shape}) that is different to the input size ({input.shape}). "
                      "This will likely lead to incorrect results due to broadcasting. Please ensure they have the "
                      "same size.", stacklevel=3)


_OWN_TARGET_GRAD = ("bce", "bce_logits")


def _needs_grad(t) -> bool:
    return t is not None and t.requires_grad and torch.is_grad_enabled()


def _fused_loss(op_name, kind, input, target, reduction, reference, *, weight=None, pos_weight=None, delta=1.0):
    """Routes one validated loss call to the fused recon_loss op, or to ``reference()`` with a
    counted reason when a parameter is outside what the kernels take."""

    def unsupported(backend):
        if input.shape != target.shape:
            return f"{op_name}: target broadcasts to the input (the kernels take equal shapes)"
        for name, t in (("weight", weight), ("pos_weight", pos_weight)):
            if t is not None and t.shape != input.shape:
                return f"{op_name}: {name} broadcasts (the kernels take a {name} of the input's shape)"
            if _needs_grad(t):
                return f"{op_name}: {name} requires grad (the kernels differentiate input and target only)"
        return None

    # Every loss is the one recon_loss op; the public name goes into the fallback reason.
    backend = choose("recon_loss", input.device, unsupported)
    if backend == "reference":
        return reference()
    need_x, need_t = _needs_grad(input), _needs_grad(target)
    own_t = kind in _OWN_TARGET_GRAD
    grad_input = need_x or (need_t and not own_t)
    grad_target = need_t and own_t
    # torch's weighted mse_loss / l1_loss normalise the mean by sum(weight): the kernel sums,
    # and autograd carries the division into the (scaling) backward.
    by_weight_sum = weight is not None and reduction == "mean" and kind in ("mse", "l1")
    out = _recon_loss_ops.recon_loss(backend, input, target, weight, pos_weight, kind,
                                     "sum" if by_weight_sum else reduction, float(delta), grad_input, grad_target)
    return out / weight.sum() if by_weight_sum else out


_FAST_LOSS_DEVICES = ("cpu", "cuda")


def _fast_loss(kind, input, target, reduction, allowed, delta=1.0):
    """The loss of the common eager call, or None when the full path must run.

    The common call is two plain tensors of one float dtype, shape and CPU/CUDA device, no
    weight, a valid reduction, no autocast and no tracing: every check of the full path
    passes on it unchanged and the backend resolves to a kernel backend (the kernels take
    equal shapes). Testing that directly costs ~1.5 us; the general validation (autocast
    casts, the pairwise dtype/device/shape checks, the fallback predicate) costs ~6 us more,
    and on a 256x1x28x28 batch the whole fused kernel takes ~7 us. Anything else returns None
    and takes the general path, so the errors and fallbacks stay where they are."""
    if (type(input) is not torch.Tensor or type(target) is not torch.Tensor or input.dtype != target.dtype
            or input.dtype not in FLOAT_DTYPES or reduction not in allowed or input.shape != target.shape
            or (reduction == "per_sample" and input.dim() < 1)):
        return None
    if input.is_cpu:
        if not target.is_cpu:
            return None
    elif not input.is_cuda or target.device != input.device:
        return None
    # Any autocast region (even another device's) takes the general path, which knows the policy.
    if (torch._C._is_any_autocast_enabled() or torch.compiler.is_compiling()
            or torch._C._are_functorch_transforms_active()):
        return None
    backend = _backend_module.resolve_tensor(input)
    if backend == "reference":
        return None
    return _recon_loss_ops.eager_recon_loss(backend, input, target, None, None, kind, reduction, float(delta))


def _check_same_size_weight(input, weight):
    """torch's mse_loss, l1_loss and huber_loss take a weight of exactly the input's size."""
    if weight is not None and weight.shape != input.shape:
        raise ValueError(f"aefast: weight of shape {tuple(weight.shape)} must have the input's size "
                         f"{tuple(input.shape)} (torch: 'Weights and input must have the same size.')")


def _check_probabilities(input, what):
    """torch raises for p outside [0, 1] and for NaN; one min/max pass (aminmax) finds both.
    On CUDA the check asserts on the device, as torch's own BCE kernel does (no host sync)."""
    if input.numel() and not _compiling():
        lo, hi = torch.aminmax(input.detach())
        if not _validation.reports_on_host(input):
            _validation.assert_on_device((lo >= 0) & (hi <= 1), f"{what}: all elements of input should be between 0 and 1")
        elif not (lo.item() >= 0 and hi.item() <= 1):
            raise ValueError(f"aefast: {what}: all elements of input should be between 0 and 1 (found values in "
                             f"[{lo.item()}, {hi.item()}])")


def mse_loss(input, target, size_average=None, reduce=None, reduction="mean", weight=None):
    """Drop-in for torch.nn.functional.mse_loss."""
    if weight is None and size_average is None and reduce is None:
        out = _fast_loss("mse", input, target, reduction, ("none", "mean", "sum"))
        if out is not None:
            return out
    input, target, weight = _autocast_fp32(input, target, weight)
    reduction = _reduction(reduction, size_average, reduce)
    _check_loss_pair(input, target, same_shape=False, op_name="mse_loss", weight=weight)
    _check_same_size_weight(input, weight)
    return _fused_loss("mse_loss", "mse", input, target, reduction,
                       lambda: ref.mse_loss(input, target, reduction=reduction, weight=weight), weight=weight)


def l1_loss(input, target, size_average=None, reduce=None, reduction="mean", weight=None):
    """Drop-in for torch.nn.functional.l1_loss."""
    if weight is None and size_average is None and reduce is None:
        out = _fast_loss("l1", input, target, reduction, ("none", "mean", "sum"))
        if out is not None:
            return out
    input, target, weight = _autocast_fp32(input, target, weight)
    reduction = _reduction(reduction, size_average, reduce)
    _check_loss_pair(input, target, same_shape=False, op_name="l1_loss", weight=weight)
    _check_same_size_weight(input, weight)
    return _fused_loss("l1_loss", "l1", input, target, reduction,
                       lambda: ref.l1_loss(input, target, reduction=reduction, weight=weight), weight=weight)


def huber_loss(input, target, reduction="mean", delta=1.0, weight=None):
    """Drop-in for torch.nn.functional.huber_loss."""
    if weight is None and type(delta) in (int, float) and delta > 0:
        out = _fast_loss("huber", input, target, reduction, ("none", "mean", "sum"), delta)
        if out is not None:
            return out
    input, target, weight = _autocast_fp32(input, target, weight)
    reduction = _reduction(reduction)
    if not isinstance(delta, (int, float)) or isinstance(delta, bool):
        raise TypeError(f"aefast: huber_loss delta must be a number, got {delta!r}")
    if not delta > 0:
        raise ValueError(f"aefast: huber_loss delta must be positive, got {delta}")
    _check_loss_pair(input, target, same_shape=False, op_name="huber_loss", weight=weight)
    _check_same_size_weight(input, weight)
    return _fused_loss("huber_loss", "huber", input, target, reduction,
                       lambda: ref.huber_loss(input, target, reduction=reduction, delta=delta, weight=weight),
                       weight=weight, delta=delta)


def binary_cross_entropy(input, target, weight=None, size_average=None, reduce=None, reduction="mean"):
    """Drop-in for torch.nn.functional.binary_cross_entropy (each log clamped at -100)."""
    input, target, weight = _autocast_fp32(input, target, weight)
    reduction = _reduction(reduction, size_average, reduce)
    _check_loss_pair(input, target, same_shape=True, op_name="binary_cross_entropy")
    if weight is not None:
        _check_float_inputs(input=input, weight=weight)
        try:
            torch.broadcast_shapes(weight.shape, input.shape)
        except RuntimeError:
            raise ValueError(f"aefast: weight of shape {tuple(weight.shape)} does not broadcast to the input's "
                             f"{tuple(input.shape)}") from None
    _check_probabilities(input, "binary_cross_entropy")
    return _fused_loss("binary_cross_entropy", "bce", input, target, reduction,
                       lambda: ref.binary_cross_entropy(input, target, weight, reduction=reduction), weight=weight)


def binary_cross_entropy_with_logits(input, target, weight=None, size_average=None, reduce=None,
                                     reduction="mean", pos_weight=None):
    """Drop-in for torch.nn.functional.binary_cross_entropy_with_logits."""
    input, target, weight, pos_weight = _autocast_fp32(input, target, weight, pos_weight)
    reduction = _reduction(reduction, size_average, reduce)
    _check_loss_pair(input, target, same_shape=True, op_name="binary_cross_entropy_with_logits",
                     extra={"weight": weight, "pos_weight": pos_weight})
    for name, t in (("weight", weight), ("pos_weight", pos_weight)):
        if t is not None:
            try:
                torch.broadcast_shapes(t.shape, input.shape)
            except RuntimeError:
                raise ValueError(f"aefast: {name} of shape {tuple(t.shape)} does not broadcast to the input's "
                                 f"{tuple(input.shape)}") from None
    return _fused_loss("binary_cross_entropy_with_logits", "bce_logits", input, target, reduction,
                       lambda: ref.binary_cross_entropy_with_logits(input, target, weight, reduction=reduction,
                                                                    pos_weight=pos_weight),
                       weight=weight, pos_weight=pos_weight)


def reconstruction_loss(input, target, kind="mse", reduction="mean", *, delta=1.0):
    """One reconstruction loss; ``reduction="per_sample"`` gives one value per batch item (the
    mean over the other dims), the anomaly score. The gradient is computed in the forward
    pass (only for tensors that require grad), so the backward is a scale by grad_output.
    ``kind="bce_logits"`` fuses the decoder's final sigmoid."""
    if kind in ("mse", "l1", "bce_logits") or (kind == "huber" and type(delta) in (int, float) and delta > 0):
        # bce is left to the general path: its probability range check reads the data.
        out = _fast_loss(kind, input, target, reduction, ref.REDUCTIONS, delta)
        if out is not None:
            return out
    input, target = _autocast_fp32(input, target)
    if kind not in LOSS_KINDS:
        raise ValueError(f"aefast: unknown loss kind {kind!r}; choose one of {LOSS_KINDS}")
    reduction = _reduction(reduction, allowed=ref.REDUCTIONS)
    if kind == "huber" and (isinstance(delta, bool) or not isinstance(delta, (int, float)) or not delta > 0):
        raise ValueError(f"aefast: huber delta must be a positive number, got {delta!r}")
    _check_loss_pair(input, target, same_shape=True, op_name="reconstruction_loss")
    if reduction == "per_sample" and input.dim() < 1:
        raise ValueError("aefast: reduction='per_sample' needs a batch dim")
    if kind == "bce":
        _check_probabilities(input, "reconstruction_loss(kind='bce') (use kind='bce_logits' for logits)")
    return _fused_loss("reconstruction_loss", kind, input, target, reduction,
                       lambda: ref.reconstruction_loss(input, target, kind, reduction, delta=delta), delta=delta)


# ================================================================ corruption and VAE terms

def _draw_seed(generator, device) -> int:
    """A 63-bit Philox key drawn from ``generator`` (or the device's default generator), so that
    torch.manual_seed / a seeded Generator makes the noise reproducible on every backend.

    A CPU generator draws it directly. A CUDA generator is never asked for a number on the device
    (reading one back would stall the stream): the key is mixed from the generator's seed and
    Philox offset, and the offset moves on by one Philox block, as if a few numbers had been drawn."""
    where = torch.device(generator.device if generator is not None else device)
    if where.type == "cpu":
        return int(torch.randint(0, 2**63 - 1, (), generator=generator).item())
    gen = generator if generator is not None else _cuda_generator(where)
    seed, offset = gen.initial_seed(), gen.get_offset()
    gen.set_offset(offset + 4)  # CUDA Philox offsets move in steps of 4
    return _mix64(seed, offset) & (2**63 - 1)


def _cuda_generator(device):
    import torch.cuda

    return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]


def _mix64(seed: int, offset: int) -> int:
    """splitmix64 of (seed, offset): distinct offsets give unrelated keys."""
    mask = 2**64 - 1
    z = (seed * 0x9E3779B97F4A7C15 + offset + 0x632BE59BD9B4E019) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def _check_generator(generator, device, name):
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"aefast: generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != device.type:
            raise ValueError(f"aefast: generator is on {generator.device} but {name} is on {device}")


def corrupt(input, kind="gaussian", level=0.1, generator=None, *, low=0.0, high=1.0):
    """Denoising-AE input corruption: gaussian (std=level), masking (fraction ``level`` zeroed)
    or salt_pepper (fraction ``level`` set to ``low``/``high`` by a fair coin).

    The kernels draw counter-based Philox noise keyed by one seed taken from ``generator``:
    the same generator state gives the same noise; element i always uses counter i."""
    check_tensor(input, "input", dtypes=FLOAT_DTYPES)
    _check_corruption_values(kind, level, low, high)
    _check_generator(generator, input.device, "input")
    backend = choose("corrupt", input.device)
    # Under torch.compile the seed cannot be read back without a graph break; the reference's
    # torch.rand/randn trace, and inductor fuses them with the rest.
    if backend == "reference" or _compiling():
        return ref.corrupt(input, kind, level, generator, low=low, high=high)
    seed = _draw_seed(generator, input.device)
    return _registry.op(backend, "corrupt")(input, seed, kind, float(level), float(low), float(high))


def _check_mu_logvar(mu, logvar):
    _check_float_inputs(mu=mu, logvar=logvar)
    if mu.shape != logvar.shape:
        raise ValueError(f"aefast: mu {tuple(mu.shape)} and logvar {tuple(logvar.shape)} must have one shape")


def reparameterize(mu, logvar, generator=None):
    """z = mu + exp(logvar / 2) * eps, eps ~ N(0, 1), in one pass; the backward regenerates eps
    from the seed instead of storing it."""
    _check_mu_logvar(mu, logvar)
    _check_generator(generator, mu.device, "mu")
    backend = choose("reparameterize", mu.device)
    if backend == "reference" or _compiling():  # as in corrupt()
        return ref.reparameterize(mu, logvar, generator)
    return _registry.op(backend, "reparameterize")(mu, logvar, _draw_seed(generator, mu.device))


def kl_divergence(mu, logvar, reduction="mean"):
    """KL(N(mu, exp(logvar)) || N(0, I)); ``mean`` sums latent dims and averages the batch."""
    mu, logvar = _autocast_fp32(mu, logvar)
    _check_mu_logvar(mu, logvar)
    reduction = _reduction(reduction, allowed=ref.REDUCTIONS)
    if reduction != "none" and mu.dim() < 1:
        raise ValueError("aefast: kl_divergence needs a batch dim")
    backend = choose("kl_divergence", mu.device)
    if backend == "reference":
        return ref.kl_divergence(mu, logvar, reduction)
    grad = _needs_grad(mu) or _needs_grad(logvar)
    return _registry.op(backend, "kl_divergence")(mu, logvar, reduction, grad)[0]


# ---------------------------------------------------------------- conv -> BatchNorm -> act -> pool

def _check_batch_norm_args(channels, bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, momentum,
                           eps, device):
    for name, t in (("bn_weight", bn_weight), ("bn_bias", bn_bias), ("running_mean", running_mean),
                    ("running_var", running_var)):
        if t is None:
            continue
        check_tensor(t, name, dtypes=FLOAT_DTYPES)
        if tuple(t.shape) != (channels,):
            raise ValueError(f"aefast: {name} must have shape ({channels},) (one value per conv output channel), "
                             f"got {tuple(t.shape)}")
        if t.device != device:
            raise ValueError(f"aefast: {name} is on {t.device} but input is on {device}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("aefast: give both running_mean and running_var, or neither")
    if num_batches_tracked is not None:
        check_tensor(num_batches_tracked, "num_batches_tracked", dtypes=(torch.int64,))
        if num_batches_tracked.numel() != 1:
            raise ValueError("aefast: num_batches_tracked must hold one value")
    if momentum is not None and (isinstance(momentum, bool) or not isinstance(momentum, (int, float))):
        raise TypeError(f"aefast: momentum must be a number or None, got {momentum!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"aefast: eps must be a non-negative number, got {eps!r}")


def batch_norm_act2d(input, bn_weight, bn_bias, running_mean, running_var, training=True, momentum=0.1, eps=1e-5,
                     activation="relu", num_batches_tracked=None, *, negative_slope=0.01):
    """act(batch_norm(input, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)),
    fused: BatchNorm2d followed by its activation, as in conv -> BN -> act blocks whose output is
    not pooled (U-Net's double convs, decoders, VAEs).

    Training mode (or no running statistics): normalise with the batch statistics of ``input`` and,
    when running statistics are given in training mode, update them in place exactly as
    nn.BatchNorm2d does (unbiased variance; ``momentum=None`` is the cumulative average over
    ``num_batches_tracked``, which is incremented when given). Only the input and per-channel
    statistics are kept for the backward (aefast/ops/batch_norm_act.py has the formulas). Eval mode
    is BatchNorm's affine map per channel followed by the activation, in eager PyTorch (a conv
    before it can fold it: :func:`aefast.optimize` does). The result keeps the input's memory format.

    Every backend runs its own kernels (cpu: C++ per ISA; triton; cuda: the bodies of
    csrc/include/aefast/batch_norm_act_host.h). On CUDA tensors triton is the default.
    """
    (input,) = _autocast_lower(input)
    _check_float_inputs(input=input)
    check_tensor(input, "input", dims=(4,))
    _check_activation(activation, negative_slope)
    _check_batch_norm_args(input.shape[1], bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
                           momentum, eps, input.device)
    if not (bool(training) or running_mean is None):
        return ref.batch_norm_act2d(input, bn_weight, bn_bias, running_mean, running_var, False, momentum, eps,
                                    activation, num_batches_tracked, negative_slope=negative_slope)
    count = input.shape[0] * input.shape[2] * input.shape[3]
    if count <= 1:
        raise ValueError(f"aefast: expected more than 1 value per channel when training, got input of shape "
                         f"{tuple(input.shape)}")
    backend = choose("batch_norm_act2d_forward", input.device)
    if backend == "reference":
        return ref.batch_norm_act2d(input, bn_weight, bn_bias, running_mean, running_var, bool(training), momentum,
                                    eps, activation, num_batches_tracked, negative_slope=negative_slope)
    from aefast.ops.conv_pool import ACTIVATION_CODES

    stat_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    gamma = None if bn_weight is None else bn_weight.to(stat_dtype)
    beta = None if bn_bias is None else bn_bias.to(stat_dtype)
    out, mean, var = _batch_norm_act_ops.batch_norm_act2d(backend, input, gamma, beta, eps,
                                                          ACTIVATION_CODES[activation], negative_slope)
    if training:
        _batch_norm_act_ops.update_running_stats(running_mean, running_var, num_batches_tracked, momentum, mean, var,
                                                 count)
    return out


def conv_bn_pool2d(input, weight, bias, bn_weight, bn_bias, running_mean, running_var, training=True, momentum=0.1,
                   eps=1e-5, stride=1, padding=0, activation="relu", pool_size=2, return_indices=True,
                   index_format="flat", num_batches_tracked=None, *, negative_slope=0.01, pool_stride=None,
                   ceil_mode=False):
    """max_pool2d(act(batch_norm(conv2d(input, weight, bias, stride, padding), running_mean, running_var,
    bn_weight, bn_bias, training, momentum, eps)), pool_size, pool_stride, ceil_mode=ceil_mode,
    return_indices=True), fused; the pool and its indices as :func:`conv_pool2d`'s.

    Training mode (or no running statistics): normalise with the batch statistics of the conv output
    and, when running statistics are given in training mode, update them in place exactly as
    nn.BatchNorm2d does (unbiased variance; ``momentum=None`` is the cumulative average over
    ``num_batches_tracked``, which is incremented when given). Only the pooled map, the window
    offsets, the conv output and per-channel statistics are kept for the backward
    (aefast/ops/conv_bn_pool.py has the formulas). Eval mode folds the running statistics into the
    conv's weight and bias and runs :func:`conv_pool2d`. Indices as :func:`conv_pool2d`.

    Every backend runs its own kernels around the vendor conv: cpu (C++, oneDNN), triton (the
    default on CUDA tensors, as for conv_pool2d) and cuda (cuDNN plus aefast's CUDA kernels).
    """
    input, weight, bias = _autocast_lower(input, weight, bias)
    _check_float_inputs(input=input, weight=weight, bias=bias)
    check_tensor(input, "input", dims=(4,))
    check_tensor(weight, "weight", dims=(4,))
    _check_batch_norm_args(weight.shape[0], bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
                           momentum, eps, input.device)
    use_batch_stats = bool(training) or running_mean is None
    if not use_batch_stats:
        from aefast.optimize import fold_batch_norm

        w, b = fold_batch_norm(weight, bias, bn_weight, bn_bias, running_mean, running_var, eps)
        return conv_pool2d(input, w, b, stride, padding, activation, pool_size, return_indices, index_format,
                           negative_slope=negative_slope, pool_stride=pool_stride, ceil_mode=ceil_mode)
    s, p, k_pool, s_pool, conv_hw = _check_conv_pool_args(input, weight, bias, stride, padding, pool_size, activation,
                                                          negative_slope, index_format, pool_stride, ceil_mode)
    count = input.shape[0] * conv_hw[0] * conv_hw[1]
    if count <= 1:
        raise ValueError(f"aefast: expected more than 1 value per channel when training, got conv output of shape "
                         f"{(input.shape[0], weight.shape[0], *conv_hw)}")
    backend = choose("conv_bn_pool2d_forward", input.device)
    if backend == "reference":
        return ref.conv_bn_pool2d(input, weight, bias, bn_weight, bn_bias, running_mean, running_var, bool(training),
                                  momentum, eps, s, p, activation, k_pool, return_indices, index_format, num_batches_tracked,
                                  negative_slope=negative_slope, pool_stride=s_pool, ceil_mode=ceil_mode)
    from aefast.ops.conv_pool import ACTIVATION_CODES

    stat_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    gamma = None if bn_weight is None else bn_weight.to(stat_dtype)
    beta = None if bn_bias is None else bn_bias.to(stat_dtype)
    pooled, window, _, mean, var = _conv_bn_pool_ops.conv_bn_pool2d_forward(
        backend, input, weight, bias, gamma, beta, s, p, eps, ACTIVATION_CODES[activation], negative_slope, k_pool,
        s_pool, ceil_mode)
    if training:
        _batch_norm_act_ops.update_running_stats(running_mean, running_var, num_batches_tracked, momentum, mean, var,
                                                 count)
    return _encoder_outputs(backend, pooled, window, input, return_indices, index_format, conv_hw, k_pool, s_pool)
