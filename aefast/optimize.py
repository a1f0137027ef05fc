"""aefast.optimize(model): rewrite a plain-PyTorch autoencoder onto the fused ops with torch.fx.

Patterns (each only where every intermediate has a single user, so nothing else reads it):
  Conv2d → [activation] → max-pool (module or functional, with or without indices)
      becomes ``conv_pool2d``;
  max-unpool → ConvTranspose2d → [activation]  becomes ``unpool_conv_transpose2d``;
  F.mse_loss / l1_loss / huber_loss / binary_cross_entropy[_with_logits] (and their nn modules),
      without weights, become ``reconstruction_loss``.
The model object is kept: only its ``forward`` is replaced by the rewritten graph, which reads the
same submodules and parameters. So parameters are shared, not copied, state_dict keys and
optimizer state keep working, and methods such as ``encode`` stay. Patterns that do not match
are left as they are.
"""
from __future__ import annotations

import inspect
import types
import warnings

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from aefast import functional as AF

_ACTIVATION_MODULES = {nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh",
                       nn.GELU: "gelu", nn.SiLU: "silu"}
_ACTIVATION_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.leaky_relu: "leaky_relu", torch.sigmoid: "sigmoid",
                         F.sigmoid: "sigmoid", torch.tanh: "tanh", F.tanh: "tanh", F.gelu: "gelu", F.silu: "silu"}
_ACTIVATION_METHODS = {"relu": "relu", "sigmoid": "sigmoid", "tanh": "tanh"}
_POOL_FUNCTIONS = {F.max_pool2d_with_indices: True, getattr(F, "_max_pool2d", None): False}
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


class _Rewriter:
    def __init__(self, model: nn.Module, graph: fx.Graph):
        self.model, self.graph = model, graph
        self.modules = dict(model.named_modules())
        self.report: list[str] = []

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
            slope = 0.01
            if name == "leaky_relu":
                slope = node.args[1] if len(node.args) > 1 else node.kwargs.get("negative_slope", 0.01)
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

    def params(self, node, mod):
        w = self.graph.get_attr(f"{node.target}.weight")
        b = self.graph.get_attr(f"{node.target}.bias") if mod.bias is not None else None
        return w, b

    def erase(self, *nodes):
        for n in nodes:
            if n is not None and not n.users:
                self.graph.erase_node(n)

    # -- conv → act → pool
    def encoder(self, pool):
        mod = self.module(pool)
        if isinstance(mod, nn.MaxPool2d):
            args = dict(kernel_size=mod.kernel_size, stride=mod.stride, padding=mod.padding, dilation=mod.dilation,
                        ceil_mode=mod.ceil_mode)
            with_indices, src = mod.return_indices, pool.args[0] if pool.args else None
        elif pool.op == "call_function" and pool.target in _POOL_FUNCTIONS:
            args = _bind(pool.target, pool.args, pool.kwargs)
            if args is None:
                return
            with_indices, src = _POOL_FUNCTIONS[pool.target], args["input"]
        else:
            return
        kernel = _pair(args["kernel_size"])
        stride = kernel if args["stride"] in (None, [], ()) else _pair(args["stride"])
        if (stride != kernel or _pair(args["padding"]) != (0, 0) or _pair(args["dilation"]) != (1, 1)
                or args["ceil_mode"] or not isinstance(src, fx.Node) or len(src.users) != 1):
            return
        act = self.activation(src)
        conv_node = act[2] if act else src
        if not isinstance(conv_node, fx.Node) or len(conv_node.users) != 1:
            return
        conv = self.plain_conv(conv_node, nn.Conv2d)
        if conv is None:
            return
        padding = (0, 0) if conv.padding == "valid" else _pair(conv.padding)
        with self.graph.inserting_before(pool):
            w, b = self.params(conv_node, conv)
            fused = self.graph.call_function(
                AF.conv_pool2d, (conv_node.args[0], w, b, _pair(conv.stride), padding, act[0] if act else None, kernel),
                {"return_indices": with_indices, "negative_slope": act[1] if act else 0.01})
        pool.replace_all_uses_with(fused)
        self.erase(pool, src if act else None, conv_node)
        self.report.append(f"conv_pool2d <- {conv_node.target} -> {act[0] if act else 'no activation'} -> "
                           f"max_pool2d{kernel}")

    # -- unpool → conv_transpose → act
    def decoder(self, deconv_node):
        deconv = self.plain_conv(deconv_node, nn.ConvTranspose2d)
        if deconv is None:
            return
        unpool = deconv_node.args[0]
        if not isinstance(unpool, fx.Node) or len(unpool.users) != 1:
            return
        mod = self.module(unpool)
        if isinstance(mod, nn.MaxUnpool2d):
            args = _bind(mod.forward, unpool.args, unpool.kwargs)
            if args is None:
                return
            args.update(kernel_size=mod.kernel_size, stride=mod.stride, padding=mod.padding)
        elif unpool.op == "call_function" and unpool.target is F.max_unpool2d:
            args = _bind(F.max_unpool2d, unpool.args, unpool.kwargs)
            if args is None:
                return
        else:
            return
        kernel = _pair(args["kernel_size"])
        stride = kernel if args["stride"] in (None, [], ()) else _pair(args["stride"])
        if stride != kernel or _pair(args["padding"]) != (0, 0):
            return
        users = list(deconv_node.users)
        act = self.activation(users[0]) if len(users) == 1 else None
        end = users[0] if act else deconv_node
        with self.graph.inserting_before(end):
            w, b = self.params(deconv_node, deconv)
            fused = self.graph.call_function(
                AF.unpool_conv_transpose2d, (args["input"], args["indices"], w, b),
                {"pool_size": kernel, "output_size": args["output_size"], "stride": _pair(deconv.stride),
                 "padding": _pair(deconv.padding), "output_padding": _pair(deconv.output_padding),
                 "activation": act[0] if act else None, "negative_slope": act[1] if act else 0.01})
        end.replace_all_uses_with(fused)
        self.erase(end, deconv_node if act else None, unpool)
        self.report.append(f"unpool_conv_transpose2d <- max_unpool2d{kernel} -> {deconv_node.target} -> "
                           f"{act[0] if act else 'no activation'}")

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

    def run(self):
        for visit in (self.encoder, self.decoder, self.loss):
            for node in list(self.graph.nodes):
                if node.graph is self.graph and node in self.graph.nodes:
                    visit(node)
        self.graph.eliminate_dead_code()
        self.graph.lint()


def optimize(model: nn.Module, *, verbose: bool = True) -> nn.Module:
    """Rewrite ``model`` onto aefast's fused ops in place and return it.

    The list of rewrites is kept in ``model.aefast_rewrites`` (and printed when ``verbose``).
    A model torch.fx cannot trace is returned unchanged, with a warning naming the reason.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"aefast.optimize expects an nn.Module, got {type(model).__name__}")
    try:
        traced = fx.symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure leaves the model as it was
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        warnings.warn(f"aefast.optimize: torch.fx cannot trace {type(model).__name__} ({reason}); the model is "
                      "returned unchanged", stacklevel=2)
        model.aefast_rewrites = []
        return model
    rewriter = _Rewriter(model, traced.graph)
    rewriter.run()
    model.aefast_rewrites = rewriter.report
    if rewriter.report:
        rewritten = fx.GraphModule(model, traced.graph)
        # The generated forward reads self.<submodule> by the same names, so it runs on the
        # original object: parameters, buffers, hooks and other methods stay where they were.
        model.forward = types.MethodType(type(rewritten).forward, model)
    if verbose:
        print(f"aefast.optimize: {type(model).__name__}: {len(rewriter.report)} rewrite(s)")
        for line in rewriter.report:
            print(f"  {line}")
    return model
