"""aefast.optimize(model): rewrite a plain-PyTorch autoencoder onto the fused ops with torch.fx.

Patterns (each only where nothing else reads an intermediate, except for its metadata: ``x.size()``,
``x.shape``, ``x.dim()`` of an intermediate, as SegNets read for the unpool's ``output_size``, are
answered from the input's shape):
  Conv2d → [BatchNorm2d, eval mode] → [activation] → max-pool (module or functional, with or without
      indices; any stride, overlapping windows included, and ceil_mode; not padded or dilated)
      becomes ``conv_pool2d``;
  max-unpool → ConvTranspose2d, or a stride-1 Conv2d (SegNet's decoder), → [BatchNorm2d, eval mode]
      → [activation] becomes ``unpool_conv_transpose2d``. A stride-1 conv with padding p is the
      transposed conv of the weight transposed in (in, out) and flipped in space, with padding K-1-p;
  an upsampler without unpool, ConvTranspose2d with stride > 1 (U-Net, FCN, VAE and tutorial
      decoders), → [BatchNorm2d, eval mode] → [activation] becomes ``conv_transpose_act2d``;
  in both decoder forms, a BatchNorm2d that normalises with batch statistics (training mode) after
      the conv is not folded: the (unpool →) conv before it is fused alone (the unpooled map is still
      never built), and the BatchNorm2d → activation after it is fused as below;
  BatchNorm2d with batch statistics (training mode) → activation, where no pool fuses them (U-Net's
      double convs, decoders, VAEs), becomes ``batch_norm_act2d`` (through ``batch_norm_act_with``);
  Conv2d with stride > 1 → BatchNorm2d with batch statistics (training mode) → activation with no pool
      after it (the conv VAE's stride-2 encoder) becomes ``conv_bn_pool2d`` with 1x1 pool windows;
  where an encoder's indices feed only fused decoders, the two pass aefast's uint8 window offsets
      instead of torch's flat int64 indices (no conversion, the decoder's faster form);
  F.mse_loss / l1_loss / huber_loss / binary_cross_entropy[_with_logits] (and their nn modules),
      without weights, become ``reconstruction_loss``. For a loss in the training loop rather than in
      ``forward``, see :func:`fused_losses`.
In eval mode a BatchNorm2d normalises with its running statistics, an affine map per channel, so it is
folded into the conv's weight and bias (recomputed from the live parameters at each call, so
gradients reach them). In training mode it normalises with batch statistics: with
``batch_norm_training=True`` (the default; False leaves it to eager) a conv →
BatchNorm2d → [activation] → max-pool site then becomes ``conv_bn_pool2d`` (through ``conv_bn_pool_with``, which
reads the BatchNorm's mode, momentum and running statistics at each call as nn.BatchNorm2d does);
a decoder's training-mode BatchNorm stays as it is (in eager, after the fused conv).

The model is traced once per mode (``model.training`` True and False), because tracing evaluates
Python branches on ``self.training`` and would otherwise bake one mode in. The new forward picks the
graph of the current mode; when submodules' modes disagree with the model's (a frozen BatchNorm in
eval mode inside a training model, say) in a way a graph relied on, it runs the original forward.

Layout (``memory_format``, aefast/optimize_layout.py): where it pays, measured on CPU (oneDNN's
convolutions at large spatial size), the model's interior runs in channels_last: its 4-D parameters
are converted in place, each 4-D input once at entry, and the outputs come back contiguous. "auto"
decides at the first call from the input's shape; "channels_last" and "preserve" force it.

The model object is kept: only its ``forward`` is replaced by the rewritten graphs, which read the
same submodules and parameters. So parameters are shared, not copied, state_dict keys and
optimizer state keep working, and methods such as ``encode`` stay. ``model.aefast_rewrites`` lists
what was fused, ``model.aefast_unfused`` every pool, unpool and upsampler site left as it was, with
the reason.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import operator
import threading
import types
import warnings

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from aefast import functional as AF
from aefast.nn.batch_norm_act import batch_norm_act_with
from aefast.nn.conv_bn_pool import conv_bn_pool_with
from aefast.optimize_layout import MEMORY_FORMATS, LayoutPass

_ACTIVATION_MODULES = {nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh",
                       nn.GELU: "gelu", nn.SiLU: "silu"}
_ACTIVATION_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.leaky_relu: "leaky_relu", torch.sigmoid: "sigmoid",
                         F.sigmoid: "sigmoid", torch.tanh: "tanh", F.tanh: "tanh", F.gelu: "gelu", F.silu: "silu"}
_ACTIVATION_METHODS = {"relu": "relu", "sigmoid": "sigmoid", "tanh": "tanh"}
# F.max_pool2d is a boolean dispatcher: fx records it as itself when return_indices is left at its
# default, so its arguments are bound with the signature of the function it dispatches to.
_POOL_FUNCTIONS = {F.max_pool2d_with_indices: F.max_pool2d_with_indices, F._max_pool2d: F._max_pool2d,
                   F.max_pool2d: F._max_pool2d}
_LOSS_FUNCTIONS = {F.mse_loss: "mse", F.l1_loss: "l1", F.huber_loss: "huber", F.binary_cross_entropy: "bce",
                   F.binary_cross_entropy_with_logits: "bce_logits"}
_LOSS_MODULES = {nn.MSELoss: "mse", nn.L1Loss: "l1", nn.HuberLoss: "huber", nn.BCELoss: "bce",
                 nn.BCEWithLogitsLoss: "bce_logits"}
_DROP_IN = {"mse": AF.mse_loss, "l1": AF.l1_loss, "huber": AF.huber_loss, "bce": AF.binary_cross_entropy,
            "bce_logits": AF.binary_cross_entropy_with_logits}


def fused_loss(input, target, kind, reduction, delta=1.0):
    """reconstruction_loss where shapes agree; the drop-in (same semantics as torch) otherwise."""
    if input.shape == target.shape:
        return AF.reconstruction_loss(input, target, kind, reduction, delta=delta)
    if kind == "huber":
        return AF.huber_loss(input, target, reduction, delta)
    return _DROP_IN[kind](input, target, reduction=reduction)


def _bind(fn, args, kwargs):
    try:
        bound = inspect.signature(fn).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    bound.apply_defaults()
    return bound.arguments


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _pool_geometry_note(kernel, stride, ceil_mode):
    """The report's note on a pool that is not the non-overlapping floor-mode one."""
    parts = ([f"stride {stride}"] if stride != kernel else []) + (["ceil_mode"] if ceil_mode else [])
    return f" ({', '.join(parts)})" if parts else ""


_METADATA_METHODS = ("size", "dim", "ndimension")
_METADATA_ATTRIBUTES = ("shape", "ndim")


def conv2d_output_shape(input, out_channels, kernel_size, stride, padding):
    """The shape of Conv2d's output, from the input's: what a metadata read of a fused-away conv,
    BatchNorm or activation output returns."""
    n, _, h, w = input.shape
    return torch.Size([n, out_channels] + [(hw + 2 * p - k) // s + 1
                                           for hw, k, s, p in zip((h, w), kernel_size, stride, padding)])


def fold_batch_norm(weight, bias, bn_weight, bn_bias, running_mean, running_var, eps, out_dim=0):
    """Conv weight and bias with an eval-mode BatchNorm2d folded in.

    BN(y) = (y - mean) * g / sqrt(var + eps) + beta is affine per output channel c:
    scale_c = g_c / sqrt(var_c + eps); W'[c] = W[c] * scale_c; b'_c = (b_c - mean_c) * scale_c + beta_c.
    ``out_dim`` is the output-channel dimension of the weight (0 for Conv2d, 1 for ConvTranspose2d).
    """
    scale = torch.rsqrt(running_var + eps)
    if bn_weight is not None:
        scale = scale * bn_weight
    shape = [1] * weight.dim()
    shape[out_dim] = -1
    folded_bias = -running_mean * scale if bias is None else (bias - running_mean) * scale
    if bn_bias is not None:
        folded_bias = folded_bias + bn_bias
    return weight * scale.to(weight.dtype).reshape(shape), folded_bias.to(weight.dtype)


def conv_weight_as_transposed(weight):
    """Conv2d weight (out, in, kh, kw) -> the ConvTranspose2d weight (in, out, kh, kw) of the same
    stride-1 map: conv2d(x, W, padding=p) == conv_transpose2d(x, W.transpose(0, 1).flip(2, 3),
    padding=K-1-p)."""
    return weight.transpose(0, 1).flip((2, 3))


class _Rewriter:
    def __init__(self, model: nn.Module, graph: fx.Graph, training: bool, batch_norm_training: bool = False):
        self.model, self.graph, self.training = model, graph, training
        self.batch_norm_training = batch_norm_training
        self.modules = dict(model.named_modules())
        self.report: list[str] = []
        self.unfused: dict[fx.Node, str] = {}  # a pool, unpool or upsampler site -> why it stays
        self.folded_batch_norms: list[str] = []

    def module(self, node):
        return self.modules.get(node.target) if node.op == "call_module" else None

    def activation(self, node):
        """(name, negative_slope, input node) if ``node`` is a supported activation."""
        mod = self.module(node)
        if mod is not None and type(mod) in _ACTIVATION_MODULES and node.args:
            if isinstance(mod, nn.GELU) and mod.approximate != "none":
                return None
            return _ACTIVATION_MODULES[type(mod)], getattr(mod, "negative_slope", 0.01), node.args[0]
        if node.op == "call_function" and node.target in _ACTIVATION_FUNCTIONS and node.args:
            name = _ACTIVATION_FUNCTIONS[node.target]
            if name == "gelu" and node.kwargs.get("approximate", "none") != "none":
                return None
            if node.kwargs.get("inplace", False) or (name == "relu" and len(node.args) > 1 and node.args[1]):
                return None
            slope = 0.01
            if name == "leaky_relu":
                slope = node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", 0.01)
                if isinstance(slope, fx.Node):
                    return None
            return name, slope, node.args[0]
        if node.op == "call_method" and node.target in _ACTIVATION_METHODS and len(node.args) == 1:
            return _ACTIVATION_METHODS[node.target], 0.01, node.args[0]
        return None

    def plain_conv(self, node, cls):
        mod = self.module(node)
        if not isinstance(mod, cls) or type(mod) is not cls or len(node.args) != 1 or node.kwargs:
            return None
        if mod.groups != 1 or _pair(mod.dilation) != (1, 1) or mod.padding_mode != "zeros":
            return None
        if isinstance(mod.padding, str) and mod.padding != "valid":
            return None
        return mod

    def eval_batch_norm(self, node):
        """The BatchNorm2d module at ``node`` if it normalises with running statistics in this mode."""
        mod = self.module(node)
        if type(mod) is not nn.BatchNorm2d or len(node.args) != 1 or node.kwargs:
            return None
        if self.training or mod.running_mean is None or mod.running_var is None:
            return None
        return mod

    def params(self, node, mod):
        w = self.graph.get_attr(f"{node.target}.weight")
        b = self.graph.get_attr(f"{node.target}.bias") if mod.bias is not None else None
        return w, b

    def folded_params(self, conv_node, conv, bn_node, bn, out_dim):
        w, b = self.params(conv_node, conv)
        if bn is None:
            return w, b
        bn_attr = lambda name: (self.graph.get_attr(f"{bn_node.target}.{name}")  # noqa: E731
                                if getattr(bn, name) is not None else None)
        folded = self.graph.call_function(
            fold_batch_norm, (w, b, bn_attr("weight"), bn_attr("bias"), bn_attr("running_mean"),
                              bn_attr("running_var"), bn.eps, out_dim))
        self.folded_batch_norms.append(bn_node.target)
        return (self.graph.call_function(operator.getitem, (folded, 0)),
                self.graph.call_function(operator.getitem, (folded, 1)))

    @staticmethod
    def metadata_user(user):
        if user.op == "call_method" and user.target in _METADATA_METHODS:
            return True
        return (user.op == "call_function" and user.target is getattr and len(user.args) == 2
                and user.args[1] in _METADATA_ATTRIBUTES)

    def only_feeds(self, node, consumer):
        """Whether every user of ``node`` other than ``consumer`` only reads its metadata."""
        return isinstance(node, fx.Node) and all(u is consumer or self.metadata_user(u) for u in node.users)

    def answer_metadata(self, nodes, shape_args):
        """Point the metadata users of the fused-away ``nodes`` at the conv's output shape."""
        users = [u for n in nodes for u in list(n.users) if self.metadata_user(u)]
        if not users:
            return
        with self.graph.inserting_before(users[0]):
            shape = self.graph.call_function(conv2d_output_shape, shape_args)
        for u in users:
            with self.graph.inserting_before(u):
                if u.op == "call_function":  # x.shape / x.ndim
                    new = shape if u.args[1] == "shape" else self.graph.call_function(len, (shape,))
                elif u.target == "size":
                    dim = u.args[1] if len(u.args) > 1 else u.kwargs.get("dim")
                    new = shape if dim is None else self.graph.call_function(operator.getitem, (shape, dim))
                else:  # dim() / ndimension()
                    new = self.graph.call_function(len, (shape,))
            u.replace_all_uses_with(new)
            self.graph.erase_node(u)

    def erase(self, *nodes):
        for n in nodes:
            if n is not None and not n.users:
                self.graph.erase_node(n)

    # -- conv → [BN] → act → pool
    def encoder(self, pool):
        mod = self.module(pool)
        if isinstance(mod, nn.MaxPool2d):
            args = dict(kernel_size=mod.kernel_size, stride=mod.stride, padding=mod.padding, dilation=mod.dilation,
                        ceil_mode=mod.ceil_mode)
            with_indices, src = mod.return_indices, pool.args[0] if pool.args else None
        elif pool.op == "call_function" and pool.target in _POOL_FUNCTIONS:
            args = _bind(_POOL_FUNCTIONS[pool.target], pool.args, pool.kwargs)
            if args is None or isinstance(args["return_indices"], fx.Node):
                self.unfused[pool] = "max_pool2d arguments not understood"
                return
            with_indices, src = bool(args["return_indices"]), args["input"]
        else:
            return
        if any(isinstance(args[k], fx.Node) for k in ("kernel_size", "stride", "ceil_mode")):
            self.unfused[pool] = "max_pool2d arguments not understood"
            return
        kernel = _pair(args["kernel_size"])
        stride = kernel if args["stride"] in (None, [], ()) else _pair(args["stride"])
        if _pair(args["padding"]) != (0, 0) or _pair(args["dilation"]) != (1, 1):
            self.unfused[pool] = "padded or dilated pool"
            return
        # pool_stride != kernel (overlapping or gapped windows) and ceil_mode are the fused ops' too.
        geometry = {"pool_stride": None if stride == kernel else stride, "ceil_mode": bool(args["ceil_mode"])}
        if not self.only_feeds(src, pool):
            self.unfused[pool] = "its input has other users that read values"
            return
        act = self.activation(src)
        inner = act[2] if act else src
        if not self.only_feeds(inner, src if act else pool):
            self.unfused[pool] = "the activation's input has other users that read values"
            return
        bn = self.eval_batch_norm(inner) if isinstance(inner, fx.Node) else None
        # A BatchNorm2d that normalises with batch statistics here (training mode, or no running
        # statistics) goes into conv_bn_pool2d, which reads the module's mode and momentum at each call.
        batch_bn = (self.module(inner) if bn is None and isinstance(inner, fx.Node)
                    and type(self.module(inner)) is nn.BatchNorm2d else None)
        if batch_bn is not None and (len(inner.args) != 1 or inner.kwargs):
            self.unfused[pool] = "BatchNorm2d called with extra arguments"
            return
        if batch_bn is not None and not self.batch_norm_training:
            self.unfused[pool] = (f"conv -> {inner.target} (BatchNorm2d with batch statistics, training mode): "
                                  "turned off by optimize(model, batch_norm_training=False); eval mode folds it")
            return
        with_bn = bn is not None or batch_bn is not None
        conv_node = inner.args[0] if with_bn else inner
        if not self.only_feeds(conv_node, inner if with_bn else (src if act else pool)):
            self.unfused[pool] = "the conv output has other users that read values"
            return
        conv = self.plain_conv(conv_node, nn.Conv2d)
        if conv is None:
            self.unfused[pool] = "not fed by a plain Conv2d (groups 1, dilation 1, zero padding) [-> act]"
            return
        padding = (0, 0) if conv.padding == "valid" else _pair(conv.padding)
        chain = [n for n in (conv_node, inner if with_bn else None, src if act else None) if n is not None]
        self.answer_metadata(chain, (conv_node.args[0], conv.out_channels, _pair(conv.kernel_size),
                                     _pair(conv.stride), padding))
        with self.graph.inserting_before(pool):
            if batch_bn is not None:
                w, b = self.params(conv_node, conv)
                fused = self.graph.call_function(
                    conv_bn_pool_with, (self.graph.get_attr(inner.target), conv_node.args[0], w, b, _pair(conv.stride),
                                        padding, act[0] if act else None, kernel),
                    {"return_indices": with_indices, "negative_slope": act[1] if act else 0.01, **geometry})
            else:
                w, b = (self.folded_params(conv_node, conv, inner, bn, 0) if bn is not None
                        else self.params(conv_node, conv))
                fused = self.graph.call_function(
                    AF.conv_pool2d, (conv_node.args[0], w, b, _pair(conv.stride), padding, act[0] if act else None,
                                     kernel),
                    {"return_indices": with_indices, "negative_slope": act[1] if act else 0.01, **geometry})
        pool.replace_all_uses_with(fused)
        self.erase(pool, src if act else None, inner if with_bn else None, conv_node)
        if batch_bn is not None:
            self.report.append(f"conv_bn_pool2d <- {conv_node.target} -> {inner.target} (BatchNorm2d, batch "
                               f"statistics) -> {act[0] if act else 'no activation'} -> max_pool2d{kernel}"
                               + _pool_geometry_note(kernel, stride, geometry["ceil_mode"]))
            return
        self.report.append(f"conv_pool2d <- {conv_node.target} -> "
                           + (f"{inner.target} (BatchNorm2d folded, eval mode) -> " if bn is not None else "")
                           + f"{act[0] if act else 'no activation'} -> max_pool2d{kernel}"
                           + _pool_geometry_note(kernel, stride, geometry["ceil_mode"]))

    def unpool_args(self, unpool):
        """(input, indices, kernel, output_size) of a non-overlapping max-unpool node, or a reason string."""
        mod = self.module(unpool)
        if isinstance(mod, nn.MaxUnpool2d):
            args = _bind(mod.forward, unpool.args, unpool.kwargs)
            if args is None:
                return "max_unpool2d arguments not understood"
            args.update(kernel_size=mod.kernel_size, stride=mod.stride, padding=mod.padding)
        elif unpool.op == "call_function" and unpool.target is F.max_unpool2d:
            args = _bind(F.max_unpool2d, unpool.args, unpool.kwargs)
            if args is None:
                return "max_unpool2d arguments not understood"
        else:
            return None
        kernel = _pair(args["kernel_size"])
        stride = kernel if args["stride"] in (None, [], ()) else _pair(args["stride"])
        if stride != kernel or _pair(args["padding"]) != (0, 0):
            return "unpool stride differs from its kernel, or padded"
        return args["input"], args["indices"], kernel, args["output_size"]

    def is_unpool(self, node):
        return isinstance(self.module(node), nn.MaxUnpool2d) or (node.op == "call_function"
                                                                 and node.target is F.max_unpool2d)

    # -- unpool → conv_transpose / stride-1 conv → [BN] → act
    def decoder(self, conv_node):
        deconv = self.plain_conv(conv_node, nn.ConvTranspose2d)
        conv = None if deconv is not None else self.plain_conv(conv_node, nn.Conv2d)
        if deconv is None and conv is None:
            return
        unpool = conv_node.args[0]
        if not isinstance(unpool, fx.Node) or not self.is_unpool(unpool):
            return
        if len(unpool.users) != 1:
            self.unfused[unpool] = "the unpooled map has other users"
            return
        parsed = self.unpool_args(unpool)
        if isinstance(parsed, str):
            self.unfused[unpool] = parsed
            return
        source, indices, kernel, output_size = parsed
        if conv is not None:
            k, p = _pair(conv.kernel_size), (0, 0) if conv.padding == "valid" else _pair(conv.padding)
            if _pair(conv.stride) != (1, 1) or any(pi > ki - 1 for pi, ki in zip(p, k)):
                self.unfused[unpool] = "followed by a Conv2d with stride > 1 or padding >= kernel"
                return
            stride, padding, output_padding = (1, 1), tuple(ki - 1 - pi for ki, pi in zip(k, p)), (0, 0)
        else:
            stride, padding = _pair(deconv.stride), _pair(deconv.padding)
            output_padding = _pair(deconv.output_padding)
        bn_node, bn, batch_bn, act = self.conv_epilogue(conv_node)
        last = bn_node if bn is not None else conv_node
        end = act[3] if act else last
        with self.graph.inserting_before(end):
            out_dim = 1 if deconv is not None else 0
            if bn is not None:
                w, b = self.folded_params(conv_node, deconv or conv, bn_node, bn, out_dim)
            else:
                w, b = self.params(conv_node, deconv or conv)
            if conv is not None:
                w = self.graph.call_function(conv_weight_as_transposed, (w,))
            fused = self.graph.call_function(
                AF.unpool_conv_transpose2d, (source, indices, w, b),
                {"pool_size": kernel, "output_size": output_size, "stride": stride, "padding": padding,
                 "output_padding": output_padding, "activation": act[0] if act else None,
                 "negative_slope": act[1] if act else 0.01})
        end.replace_all_uses_with(fused)
        self.erase(end, last if act else None, conv_node if bn is not None else None, unpool)
        kind = "ConvTranspose2d" if deconv is not None else "Conv2d as its transposed twin"
        self.report.append(f"unpool_conv_transpose2d <- max_unpool2d{kernel} -> {conv_node.target} ({kind}) -> "
                           + self.epilogue_text(bn_node, bn, batch_bn, act))

    @staticmethod
    def epilogue_text(bn_node, bn, batch_bn, act):
        """The report's words for what a decoder conv fused after it (see conv_epilogue)."""
        return ((f"{bn_node.target} (BatchNorm2d folded, eval mode) -> " if bn is not None else "")
                + f"{act[0] if act else 'no activation'}"
                + (f" ({batch_bn.target}, BatchNorm2d with batch statistics, and what follows it stay in eager)"
                   if batch_bn is not None else ""))

    def conv_epilogue(self, conv_node):
        """What a decoder conv's output feeds, for fusing: (bn_node, eval BN module or None, the
        node of a BatchNorm2d that normalises with batch statistics or None, activation or None);
        the activation is (name, negative_slope, input node, node). An eval-mode BatchNorm2d (folded
        into the conv) and an activation are taken when each is its input's only user. A
        batch-statistics BatchNorm2d (training mode) stays in eager, and so does what follows it:
        the conv alone is fused, so the decoder's input is still never materialised unpooled."""
        users = list(conv_node.users)
        bn_node = users[0] if len(users) == 1 and self.module(users[0]) is not None else None
        bn = self.eval_batch_norm(bn_node) if bn_node is not None else None
        if bn is None and bn_node is not None and type(self.module(bn_node)) is nn.BatchNorm2d:
            return None, None, bn_node, None
        last = bn_node if bn is not None else conv_node
        users = list(last.users)
        act = self.activation(users[0]) if len(users) == 1 else None
        return bn_node if bn is not None else None, bn, None, (*act, users[0]) if act else None

    # -- upsampler: ConvTranspose2d (stride > 1, no unpool) → [BN] → act
    def upsampler(self, conv_node):
        mod = self.module(conv_node)
        if not isinstance(mod, nn.ConvTranspose2d) or _pair(mod.stride) == (1, 1):
            return
        deconv = self.plain_conv(conv_node, nn.ConvTranspose2d)
        if deconv is None:
            self.unfused[conv_node] = ("ConvTranspose2d with groups or dilation != 1, a padding mode other than "
                                       "zeros, a subclass, or called with output_size: conv_transpose_act2d covers "
                                       "groups 1, dilation 1 and a fixed output_padding")
            return
        bn_node, bn, batch_bn, act = self.conv_epilogue(conv_node)
        # A BatchNorm2d with batch statistics after it (training mode) is not folded: the conv is fused
        # alone (with no activation), and the BatchNorm2d -> activation after it fuse as batch_norm_act2d.
        # The conv alone still pays: on CPU conv_transpose_act2d runs small transposed convs as one GEMM
        # plus a col2im where oneDNN's backward-data primitive is slow (csrc/cpu/conv_transpose_gemm.cpp).
        last = bn_node if bn is not None else conv_node
        end = act[3] if act else last
        with self.graph.inserting_before(end):
            w, b = (self.folded_params(conv_node, deconv, bn_node, bn, 1) if bn is not None
                    else self.params(conv_node, deconv))
            fused = self.graph.call_function(
                AF.conv_transpose_act2d, (conv_node.args[0], w, b, _pair(deconv.stride), _pair(deconv.padding),
                                          _pair(deconv.output_padding)),
                {"activation": act[0] if act else None, "negative_slope": act[1] if act else 0.01})
        end.replace_all_uses_with(fused)
        self.erase(end, last if act else None, conv_node if bn is not None else None)
        self.report.append(f"conv_transpose_act2d <- {conv_node.target} (ConvTranspose2d, stride "
                           f"{_pair(deconv.stride)}) -> " + self.epilogue_text(bn_node, bn, batch_bn, act))
        # Its output only cropped (FCN's score maps): the crop becomes padding where it can
        # (AF.conv_transpose_act2d_cropped decides per call), so the map is never made whole.
        crop = next(iter(fused.users)) if len(fused.users) == 1 else None
        index = crop.args[1] if crop is not None and crop.target is operator.getitem else None
        if isinstance(index, tuple) and len(index) == 4 and all(isinstance(i, slice) for i in index) and \
                index[0] == slice(None) and index[1] == slice(None):
            then = next(iter(crop.users)) if len(crop.users) == 1 else None
            nchw = then is not None and then.op == "call_method" and then.target == "contiguous" and \
                len(then.args) == 1 and not then.kwargs
            with self.graph.inserting_before(crop):
                cropped = self.graph.call_function(AF.conv_transpose_act2d_cropped, (*fused.args, index[2], index[3]),
                                                   {**fused.kwargs, "contiguous_output": nchw})
            crop.replace_all_uses_with(cropped)
            self.erase(crop, fused)
            self.report[-1] += " -> crop (as padding where it maps onto one)"

    def batch_statistics_norm_before(self, act_node):
        """(activation, BatchNorm node, BatchNorm2d) when ``act_node`` is an activation of a plain
        BatchNorm2d call that a training-mode rewrite may fuse, else None."""
        act = self.activation(act_node)
        if act is None or not self.training or not self.batch_norm_training:
            return None
        bn_node = act[2]
        bn = self.module(bn_node) if isinstance(bn_node, fx.Node) else None
        if type(bn) is not nn.BatchNorm2d or len(bn_node.args) != 1 or bn_node.kwargs:
            return None
        return act, bn_node, bn

    # -- Conv2d (stride > 1) → BatchNorm2d (batch statistics) → activation with no pool after it (the conv
    #    VAE's and DCGAN-style stride-2 encoders): conv_bn_pool2d with 1x1 windows, so the conv's backward is
    #    aefast's (on CPU, small grad_inputs as one GEMM plus a col2im: csrc/cpu/conv_transpose_gemm.cpp)
    def conv_batch_norm_act(self, act_node):
        found = self.batch_statistics_norm_before(act_node)
        if found is None:
            return
        act, bn_node, bn = found
        conv_node = bn_node.args[0]
        if not self.only_feeds(bn_node, act_node) or not self.only_feeds(conv_node, bn_node):
            return
        conv = self.plain_conv(conv_node, nn.Conv2d) if isinstance(conv_node, fx.Node) else None
        # Downsamplers only (stride > 1), the form measured (the conv VAE's encoder); stride-1 blocks
        # (U-Net's, SegNet's decoder) keep the eager conv and batch_norm_act2d after it.
        if conv is None or _pair(conv.stride) == (1, 1):
            return
        padding = (0, 0) if conv.padding == "valid" else _pair(conv.padding)
        self.answer_metadata([conv_node, bn_node], (conv_node.args[0], conv.out_channels, _pair(conv.kernel_size),
                                                    _pair(conv.stride), padding))
        with self.graph.inserting_before(act_node):
            w, b = self.params(conv_node, conv)
            fused = self.graph.call_function(
                conv_bn_pool_with, (self.graph.get_attr(bn_node.target), conv_node.args[0], w, b, _pair(conv.stride),
                                    padding, act[0], (1, 1)),
                {"return_indices": False, "negative_slope": act[1]})
        act_node.replace_all_uses_with(fused)
        self.erase(act_node, bn_node, conv_node)
        # Not a pool site (bench/architectures.py counts sites from these lines): its own label.
        self.report.append(f"conv_bn_act2d (conv_bn_pool2d with 1x1 windows) <- {conv_node.target} (Conv2d, stride "
                           f"{_pair(conv.stride)}) -> {bn_node.target} (BatchNorm2d, batch statistics) -> {act[0]}")

    # -- BatchNorm2d (batch statistics) → activation, where no pool follows (U-Net's double convs,
    #    decoders, VAEs): batch_norm_act2d keeps only BatchNorm's input and runs two passes each way
    def batch_norm_act(self, act_node):
        found = self.batch_statistics_norm_before(act_node)
        if found is None:
            return
        act, bn_node, bn = found
        if not self.only_feeds(bn_node, act_node):
            return
        with self.graph.inserting_before(act_node):
            fused = self.graph.call_function(batch_norm_act_with, (self.graph.get_attr(bn_node.target),
                                                                   bn_node.args[0], act[0]),
                                             {"negative_slope": act[1]})
        act_node.replace_all_uses_with(fused)
        bn_node.replace_all_uses_with(fused)  # what is left reads only metadata, which is the same
        self.erase(act_node, bn_node)
        self.report.append(f"batch_norm_act2d <- {bn_node.target} (BatchNorm2d, batch statistics) -> {act[0]}")

    # -- losses
    def loss(self, node):
        mod = self.module(node)
        if mod is not None and type(mod) in _LOSS_MODULES and len(node.args) + len(node.kwargs) == 2:
            if getattr(mod, "weight", None) is not None or getattr(mod, "pos_weight", None) is not None:
                return
            kind, reduction, delta = _LOSS_MODULES[type(mod)], mod.reduction, getattr(mod, "delta", 1.0)
            inputs = list(node.args) + list(node.kwargs.values())
        elif node.op == "call_function" and node.target in _LOSS_FUNCTIONS:
            args = _bind(node.target, node.args, node.kwargs)
            if args is None or any(args.get(k) is not None for k in ("weight", "pos_weight", "size_average", "reduce")):
                return
            kind, reduction, delta = _LOSS_FUNCTIONS[node.target], args["reduction"], args.get("delta", 1.0)
            inputs = [args["input"], args["target"]]
        else:
            return
        if reduction not in ("mean", "sum", "none") or isinstance(delta, fx.Node):
            return
        with self.graph.inserting_before(node):
            fused = self.graph.call_function(fused_loss, (inputs[0], inputs[1], kind, reduction, delta))
        node.replace_all_uses_with(fused)
        self.erase(node)
        self.report.append(f"reconstruction_loss(kind={kind!r}, reduction={reduction!r}) <- "
                           f"{node.target if isinstance(node.target, str) else node.target.__name__}")

    def site_kind(self, node):
        """'max_pool2d', 'max_unpool2d' or 'upsampler' for the sites the report accounts for."""
        mod = self.module(node)
        if isinstance(mod, nn.MaxPool2d) or (node.op == "call_function" and node.target in _POOL_FUNCTIONS):
            return "max_pool2d"
        if self.is_unpool(node):
            return "max_unpool2d"
        if isinstance(mod, nn.ConvTranspose2d) and _pair(mod.stride) != (1, 1):
            return "upsampler"
        if isinstance(mod, nn.Upsample) or (node.op == "call_function" and node.target in (F.interpolate,
                                                                                             F.upsample)):
            return "upsampler"
        return None

    def unfused_sites(self):
        lines = []
        for node in self.graph.nodes:
            kind = self.site_kind(node)
            if kind is None:
                continue
            if kind == "upsampler":
                why = self.unfused.get(node, "nn.Upsample / F.interpolate: no fused form")
            elif kind == "max_unpool2d":
                why = self.unfused.get(node, "not followed by a ConvTranspose2d or a stride-1 Conv2d")
            else:
                why = self.unfused.get(node, "not fed by conv [-> act]")
            lines.append(f"{kind} at {node.target if isinstance(node.target, str) else node.name}: {why}")
        return lines

    def window_indices(self):
        """Encoder -> decoder pairs whose indices nothing else reads pass aefast's compact uint8 window
        offsets instead of torch's flat int64 indices: the encoder skips the window_to_flat conversion
        and the decoder reads its faster window form. Only tiling pools (an overlapping encoder's
        offsets are recognised by tensor identity, which a graph does not guarantee; ceil_mode's
        clipped windows keep the flat form) and only when every reader of the indices is a fused
        decoder."""
        encoders = (AF.conv_pool2d, conv_bn_pool_with)
        for node in self.graph.nodes:
            if node.op != "call_function" or node.target not in encoders or not node.kwargs.get("return_indices"):
                continue
            if (node.kwargs.get("pool_stride") is not None or node.kwargs.get("ceil_mode")
                    or node.kwargs.get("index_format", "flat") != "flat"):
                continue
            if not all(u.target is operator.getitem for u in node.users):
                continue
            readers = [u for u in node.users if u.args[1] == 1]
            if len(readers) != 1:
                continue
            decoders = list(readers[0].users)
            if not decoders or not all(
                    d.op == "call_function" and d.target is AF.unpool_conv_transpose2d and d.args[1] is readers[0]
                    and readers[0] not in (*d.args[:1], *d.args[2:], *d.kwargs.values())
                    and d.kwargs.get("pool_stride") is None for d in decoders):
                continue
            node.kwargs = {**node.kwargs, "index_format": "window"}
            for d in decoders:
                d.kwargs = {**d.kwargs, "index_format": "window"}

    def run(self):
        for visit in (self.encoder, self.decoder, self.upsampler, self.conv_batch_norm_act, self.batch_norm_act,
                      self.loss):
            for node in list(self.graph.nodes):
                if node.graph is self.graph and node in self.graph.nodes:
                    visit(node)
        self.window_indices()
        self.graph.eliminate_dead_code()
        self.graph.lint()


def _trace_per_mode(model):
    """{training: GraphModule} traced with every submodule in each mode; modes are restored after."""
    modes = {name: m.training for name, m in model.named_modules()}
    try:
        graphs = {}
        for training in (True, False):
            model.train(training)
            graphs[training] = fx.symbolic_trace(model)
        return graphs
    finally:
        for name, m in model.named_modules():
            m.training = modes[name]


class _OptimizedState:
    """What an optimized model's forward needs, held by the model (``model.aefast_optimized``) with no
    reference back to it: the rewritten graphs' forwards as plain functions of the module, the
    BatchNorms an eval graph folded (by name), the forward before optimize (its function, unbound,
    when it was the model's own method) and the layout state. ``copy.deepcopy`` of the model copies
    this along and rebinds the forward, so a copy runs on its own parameters and modes."""

    def __init__(self, model, rewritten, folded_batch_norms, layout):
        previous = getattr(model, "aefast_optimized", None)
        if isinstance(previous, _OptimizedState):  # optimized again: keep the forward from before the first
            self.bound_original, self.original = previous.bound_original, previous.original
        else:
            original = model.forward
            self.bound_original = not (isinstance(original, types.MethodType) and original.__self__ is model)
            self.original = original if self.bound_original else original.__func__
        self.rewritten, self.folded_batch_norms, self.layout = rewritten, list(folded_batch_norms), layout

    def original_forward(self, model):
        # functools.partial rather than types.MethodType: torch.compile traces the former
        return self.original if self.bound_original else functools.partial(self.original, model)

    def graph_forward(self, model):
        original = self.original_forward(model)
        if self.rewritten is None:
            return original
        if model.training:
            return functools.partial(self.rewritten[True], model)
        # An eval graph that folded a BatchNorm is only right while that BatchNorm is in eval mode.
        if any(model.get_submodule(name).training for name in self.folded_batch_norms):
            return original
        return functools.partial(self.rewritten[False], model)


def _optimized_forward(self, *args, **kwargs):
    state = self.aefast_optimized
    return state.layout(self, state.original_forward(self), state.graph_forward(self), args, kwargs)


def optimize(model: nn.Module, *, verbose: bool = True, batch_norm_training: bool = True,
             memory_format: str = "auto") -> nn.Module:
    """Rewrite ``model`` onto aefast's fused ops in place and return it.

    ``memory_format`` is the layout the model's interior runs in (aefast.optimize_layout):
    "channels_last" converts its 4-D parameters in place and each 4-D input at entry, and returns
    contiguous outputs; "preserve" leaves layouts alone; "auto" (the default) picks one of the two at
    the first call by a measured rule (channels_last on CPU where the convolutions run at large
    enough spatial size). The choice and its reason are in ``model.aefast_memory_format`` and
    ``model.aefast_memory_format_reason``. Under torch.compile, an "auto" not yet decided keeps the
    layout (call the model once in eager first, or pass the layout explicitly).

    ``batch_norm_training=True`` (the default) also fuses conv -> BatchNorm2d (batch statistics) -> act
    -> pool sites in training mode onto ``conv_bn_pool2d``; ``False`` leaves them to eager. Eval mode
    folds BatchNorm into the conv either way.

    The list of rewrites is kept in ``model.aefast_rewrites`` and the sites left unfused, with their
    reasons, in ``model.aefast_unfused`` (both printed when ``verbose``). Rewrites that only hold in
    eval mode are marked "(eval mode)". A model torch.fx cannot trace is returned unchanged, with a
    warning naming the reason.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"aefast.optimize expects an nn.Module, got {type(model).__name__}")
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"aefast.optimize: memory_format must be one of {', '.join(map(repr, MEMORY_FORMATS))}, "
                         f"got {memory_format!r}")
    try:
        traced = _trace_per_mode(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure leaves the model as it was
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        warnings.warn(f"aefast.optimize: torch.fx cannot trace {type(model).__name__} ({reason}); the model is "
                      "returned unchanged", stacklevel=2)
        model.aefast_rewrites, model.aefast_unfused = [], []
        model.aefast_memory_format, model.aefast_memory_format_reason = "preserve", "model returned unchanged"
        return model
    rewriters = {}
    for training, graph_module in traced.items():
        rewriters[training] = _Rewriter(model, graph_module.graph, training, batch_norm_training)
        rewriters[training].run()
    train, evaluate = rewriters[True], rewriters[False]
    model.aefast_rewrites = train.report + [f"(eval mode) {line}" for line in evaluate.report
                                            if line not in train.report]
    model.aefast_unfused = train.unfused_sites()
    rewritten = None
    if train.report or evaluate.report:
        rewritten = {training: type(fx.GraphModule(model, r.graph)).forward for training, r in rewriters.items()}
    model.aefast_optimized = _OptimizedState(model, rewritten, evaluate.folded_batch_norms,
                                             LayoutPass(model, memory_format, verbose))
    model.forward = types.MethodType(_optimized_forward, model)
    if verbose:
        print(f"aefast.optimize: {type(model).__name__}: {len(model.aefast_rewrites)} rewrite(s), "
              f"{len(model.aefast_unfused)} site(s) left unfused, memory format {model.aefast_memory_format} "
              f"({model.aefast_memory_format_reason})")
        for line in model.aefast_rewrites:
            print(f"  {line}")
        for line in model.aefast_unfused:
            print(f"  unfused: {line}")
    return model


# ---------------------------------------------------------------- losses outside forward

_LOSS_FUNCTION_NAMES = {"mse_loss": "mse", "l1_loss": "l1", "huber_loss": "huber",
                        "binary_cross_entropy": "bce", "binary_cross_entropy_with_logits": "bce_logits"}
_patch_lock = threading.Lock()
_patch_depth = 0
_originals: dict[str, object] = {}


@functools.lru_cache(maxsize=64)
def _routed(name, kind, original):
    # Cached per (name, kind, original): inspect.signature of the five losses cost ~45 us each, on
    # every entry of fused_losses(), i.e. ~0.2 ms per training step of a loop that enters it per step.
    signature = inspect.signature(original)

    @functools.wraps(original)
    def loss(*args, **kwargs):
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError:
            return original(*args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        input, target, reduction = a.get("input"), a.get("target"), a.get("reduction", "mean")
        if (any(a.get(k) is not None for k in ("weight", "pos_weight", "size_average", "reduce"))
                or reduction not in ("mean", "sum", "none") or not isinstance(input, torch.Tensor)
                or not isinstance(target, torch.Tensor) or input.shape != target.shape
                or not input.is_floating_point() or input.dtype != target.dtype or input.device != target.device):
            return original(*args, **kwargs)
        return AF.reconstruction_loss(input, target, kind, reduction, delta=a.get("delta", 1.0))

    loss.aefast_routed = True
    return loss


@contextlib.contextmanager
def fused_losses():
    """Route the losses of a training loop onto aefast's fused loss while the block runs.

    ``F.mse_loss``, ``l1_loss``, ``huber_loss``, ``binary_cross_entropy`` and
    ``binary_cross_entropy_with_logits``, and the nn modules that call them (``nn.MSELoss`` ...),
    become :func:`aefast.functional.reconstruction_loss` where it gives torch's result: same-shape
    floating-point input and target, no ``weight``/``pos_weight``, reduction mean, sum or none.
    Anything else goes to torch's own function. The gradient is computed in the forward pass.

        with aefast.fused_losses():
            for x, _ in loader:
                loss = F.mse_loss(model(x), x)
                ...

    It patches ``torch.nn.functional`` for the whole process while the outermost block runs, so other
    threads see the routing too; blocks may nest.
    """
    global _patch_depth
    with _patch_lock:
        if _patch_depth == 0:
            for name, kind in _LOSS_FUNCTION_NAMES.items():
                _originals[name] = getattr(F, name)
                setattr(F, name, _routed(name, kind, _originals[name]))
        _patch_depth += 1
    try:
        yield
    finally:
        with _patch_lock:
            _patch_depth -= 1
            if _patch_depth == 0:
                for name, original in _originals.items():
                    setattr(F, name, original)
                _originals.clear()
