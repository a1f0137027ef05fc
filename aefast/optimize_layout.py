"""The layout pass of :func:`aefast.optimize`: run a model's interior in channels_last when it pays.

Why: on CPU, oneDNN's convolutions (the bulk of a conv autoencoder's training step: ~3/4 of a
SegNet's or U-Net's) are 1.5-2.4x faster with channels_last (NHWC) activations than with NCHW for
3x3 convs at large spatial size; measured here, 64->64 3x3 at 96x96, N16: forward 57 vs 32 ms,
backward 107 vs 70 ms. At small spatial size the reorders around each conv cost more than they
save: a conv VAE at N128 16x16 trains at 0.85x in channels_last.

When channels_last is chosen:
- every 4-D floating parameter and buffer of the model is made channels_last in place
  (``p.data = p.data.contiguous(memory_format=torch.channels_last)``, as ``model.to(memory_format=
  ...)`` does): the Parameter objects stay the same, so an optimizer built before or after
  optimize() keeps working, and a state_dict still loads into the original class (load_state_dict
  copies values whatever the strides);
- each 4-D floating tensor argument of ``forward`` is converted once, at entry;
- each 4-D tensor of the result is made ``torch.contiguous_format`` at exit, so the caller gets what
  the original returns (same values, shapes, contiguous).

The rule of ``memory_format="auto"`` (:func:`choose_memory_format`) follows Inductor's
``decide_layout_opt`` (torch/_inductor/graph.py), which picks channels_last whenever oneDNN runs a
graph's convolutions on CPU and refuses it for grouped convs with more than one input channel per
group, and adds a measured floor on the spatial size that Inductor's rule lacks. channels_last iff
  1. the 4-D inputs are CPU tensors and oneDNN (torch.backends.mkldnn) is available and enabled
     (not measured on GPUs: there auto keeps the layout);
  2. the model calls at least one Conv2d or ConvTranspose2d module;
  3. no conv is grouped with more than one input channel per group (Inductor: up to 31x slower);
  4. the multiply-add-weighted mean output area (H*W) of its convs is at least
     ``MIN_MEAN_CONV_AREA`` (see its comment for the measurements behind it).
The conv shapes come from running the original forward once on fake tensors (torch's FakeTensorMode:
shapes only, no arithmetic, parameters and buffers swapped for fake twins so no running statistic
moves). That needs the input's shape, so "auto" decides at the first call and keeps that decision
(the parameters' layout is the model's state); :func:`choose_memory_format` gives the same answer
ahead of time for an example input.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.fx._symbolic_trace import is_fx_symbolic_tracing
from torch.utils import _pytree as pytree

MEMORY_FORMATS = ("auto", "channels_last", "preserve")

# The floor of rule 4, in output pixels (H*W) per image, weighted by each conv's multiply-adds.
# Measured on this project's 2-core AVX-512 CPU (glibc allocator), whole training steps, eager
# NCHW vs the model and input in channels_last: channels_last won at every weighted mean area from
# 313 px up (the indices conv AE at 28x28: 1.84x; the tutorial conv AE, 490 px: 1.54x; SegNet,
# U-Net and FCN-8s at 96x96, thousands of px: 1.37-1.38x) and lost at 64 px (the conv VAE at
# 16x16, whose convs run at 4x4 and 8x8: 0.85x). Single 3x3 convs, forward + backward (one thread's
# CPU time on a loaded machine, so direction only): channels_last gained 1.03-1.12x at 8x8 outputs
# and 1.35-1.41x from 12x12 up (16->16 at N128 12x12: 3.2 vs 2.4 ms). Below that the small gain does
# not pay for the reorders where the layout meets the model's other layers (the VAE's flatten ->
# Linear -> view); 12x12 = 144 px is the floor.
MIN_MEAN_CONV_AREA = 144


@dataclasses.dataclass(frozen=True)
class ConvSite:
    """One conv module call seen on the fake run."""
    name: str
    multiply_adds: int
    out_area: int
    grouped_multi_channel: bool


def _conv_site(name, module, input, output):
    kh, kw = module.kernel_size
    if isinstance(module, nn.ConvTranspose2d):  # every input value meets Cout/groups * K filter taps
        macs = input.numel() * (module.out_channels // module.groups) * kh * kw
    else:  # every output value is a dot product of Cin/groups * K
        macs = output.numel() * (module.in_channels // module.groups) * kh * kw
    grouped = module.groups > 1 and module.in_channels // module.groups > 1
    return ConvSite(name, int(macs), int(output.shape[-2] * output.shape[-1]), grouped)


def conv_sites(model: nn.Module, forward, args, kwargs) -> list[ConvSite]:
    """The Conv2d / ConvTranspose2d calls of ``forward(*args, **kwargs)``, from a run on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    # What torch.func.functional_call does, but calling ``forward`` (an optimized model's original
    # one, whose conv modules are still called) rather than ``model.forward``.
    from torch.nn.utils.stateless import _reparametrize_module

    sites, hooks = [], []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            hooks.append(module.register_forward_hook(
                lambda m, inp, out, name=name: sites.append(_conv_site(name, m, inp[0], out))))
    try:
        with FakeTensorMode() as mode, torch.no_grad():
            state = {k: mode.from_tensor(v) for k, v in (*model.named_parameters(), *model.named_buffers())}
            fake = pytree.tree_map_only(torch.Tensor, mode.from_tensor, (args, kwargs))
            with _reparametrize_module(model, state, tie_weights=True):
                forward(*fake[0], **fake[1])
    finally:
        for h in hooks:
            h.remove()
    return sites


def _four_d_floats(tree):
    return [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor) and t.dim() == 4
            and t.is_floating_point()]


def choose_memory_format(model: nn.Module, *args, forward=None, **kwargs) -> tuple[str, str]:
    """("channels_last" | "preserve", reason) for ``model`` called on ``args``/``kwargs``, by the rule
    in this module's docstring. ``forward`` is the forward to probe (default: the model's own; give
    the original one of an optimized model)."""
    inputs = _four_d_floats((args, kwargs))
    if not inputs:
        return "preserve", "no 4-D floating-point input"
    if any(t.device.type != "cpu" for t in inputs):
        return "preserve", "inputs not on CPU (the rule is measured on CPU only)"
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return "preserve", "oneDNN (torch.backends.mkldnn) not available or disabled"
    try:
        sites = conv_sites(model, forward or model.forward, args, kwargs)
    except Exception as exc:  # noqa: BLE001 - a model fake tensors cannot run keeps its layout
        return "preserve", f"conv shapes not found on fake tensors ({type(exc).__name__}: {exc})".splitlines()[0]
    if not sites:
        return "preserve", "no Conv2d / ConvTranspose2d call"
    grouped = [s.name for s in sites if s.grouped_multi_channel]
    if grouped:
        return "preserve", f"grouped conv with > 1 input channel per group ({', '.join(grouped)})"
    total = sum(s.multiply_adds for s in sites)
    area = sum(s.multiply_adds * s.out_area for s in sites) / max(total, 1)
    verdict = "channels_last" if area >= MIN_MEAN_CONV_AREA else "preserve"
    return verdict, (f"{len(sites)} conv call(s), multiply-add-weighted mean output area {area:.0f} px "
                     f"{'>=' if verdict == 'channels_last' else '<'} {MIN_MEAN_CONV_AREA} px")


def to_channels_last(tree):
    """``tree`` with every 4-D floating tensor made channels_last (a copy only where it is not)."""
    return pytree.tree_map_only(
        torch.Tensor, lambda t: t.contiguous(memory_format=torch.channels_last)
        if t.dim() == 4 and t.is_floating_point() else t, tree)


def to_contiguous(tree):
    """``tree`` with every 4-D tensor in torch.contiguous_format (a copy only where it is not)."""
    return pytree.tree_map_only(torch.Tensor, lambda t: t.contiguous() if t.dim() == 4 else t, tree)


def convert_parameters(model: nn.Module) -> int:
    """Make every 4-D floating parameter and buffer of ``model`` channels_last in place, keeping the
    tensor objects (and their gradients' layout with them); returns how many were converted."""
    count = 0
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            if tensor.dim() == 4 and tensor.is_floating_point():
                tensor.data = tensor.data.contiguous(memory_format=torch.channels_last)
                if tensor.grad is not None:
                    tensor.grad = tensor.grad.contiguous(memory_format=torch.channels_last)
                count += 1
    return count


class LayoutPass:
    """The layout state of one optimized model: "auto" until the first call decides it, then
    "channels_last" or "preserve" (kept, with its reason, in ``model.aefast_memory_format`` and
    ``model.aefast_memory_format_reason``). It holds no reference to the model: the model is passed
    at each call, so a deep copy of the model (which copies this state) acts on the copy."""

    def __init__(self, model: nn.Module, memory_format: str, verbose: bool):
        self.verbose = verbose
        self.pending = memory_format == "auto"
        self.channels_last = False
        if memory_format == "auto":
            self._publish(model, "auto", f"decided at the first call from its input's shape (rule: "
                                         f"aefast.optimize_layout, mean conv output area >= {MIN_MEAN_CONV_AREA} px)")
        else:
            self._apply(model, memory_format, "requested")

    @staticmethod
    def _publish(model, memory_format, reason):
        model.aefast_memory_format = memory_format
        model.aefast_memory_format_reason = reason

    def _apply(self, model, memory_format, reason):
        self.pending = False
        self.channels_last = memory_format == "channels_last"
        if self.channels_last:
            convert_parameters(model)
        self._publish(model, memory_format, reason)

    def decide(self, model, original_forward, args, kwargs):
        """Called by the optimized forward while ``pending`` (never under torch.compile's or torch.fx's
        tracing: shapes are not known there, and parameters must not change)."""
        self.pending = False  # the fake run calls the model again: it must take the plain path
        try:
            memory_format, reason = choose_memory_format(model, *args, forward=original_forward, **kwargs)
        except BaseException:
            self.pending = True
            raise
        self._apply(model, memory_format, reason)
        if self.verbose:
            print(f"aefast.optimize: {type(model).__name__}: memory format {memory_format} ({reason})")

    def __call__(self, model, original_forward, forward, args, kwargs):
        """Run ``forward`` of ``model`` in the chosen layout (``original_forward``: the model's forward
        before optimize, which the first call of "auto" probes)."""
        if self.pending and not torch.compiler.is_compiling() and not is_fx_symbolic_tracing():
            self.decide(model, original_forward, args, kwargs)
        if not self.channels_last:
            return forward(*args, **kwargs)
        if not torch.compiler.is_compiling():
            # Under torch.compile the input is left as it is: Inductor lays out what the convolutions
            # read itself (channels_last on CPU), and an explicit conversion of a graph input there
            # made it hand one of aefast's ops strides its trace did not have (seen: SegNet's
            # conv_bn_pool2d_backward, torch 2.13).
            args, kwargs = to_channels_last((args, kwargs))
        return to_contiguous(forward(*args, **kwargs))
