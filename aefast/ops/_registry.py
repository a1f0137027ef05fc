"""Glue between the C++ schemas and the Python-side registrations.

Every schema is defined once, in csrc/ops.cpp (namespace ``aefast``). The Triton kernels are a
second implementation of the same schemas, registered under the twin namespace
``aefast_triton`` (CPU and CUDA dispatch keys) so that a backend choice never changes the
schema, the fake function or the autograd formula.
"""
from __future__ import annotations

import importlib.util
from typing import Callable

import torch

NAMESPACE = "aefast"
TRITON_NAMESPACE = "aefast_triton"
HAS_TRITON = importlib.util.find_spec("triton") is not None

_triton_lib = torch.library.Library(TRITON_NAMESPACE, "DEF") if HAS_TRITON else None
_triton_ops: set[str] = set()


def namespace_name(backend: str) -> str:
    """The operator namespace whose kernels implement ``backend`` ("cpu", "cuda" or "triton")."""
    if backend == "triton":
        return TRITON_NAMESPACE
    if backend in ("cpu", "cuda"):
        return NAMESPACE
    raise ValueError(f"aefast: backend {backend!r} has no compiled operators")


def namespace_for(backend: str):
    """The torch.ops namespace of :func:`namespace_name`."""
    return getattr(torch.ops, namespace_name(backend))


def op(backend: str, name: str):
    return getattr(namespace_for(backend), name).default


def has_triton_kernel(name: str) -> bool:
    return name in _triton_ops


def _schema_without_namespace(name: str) -> str:
    schema = str(getattr(torch.ops.aefast, name).default._schema)
    prefix = f"{NAMESPACE}::"
    assert schema.startswith(prefix), schema
    return schema[len(prefix):]


def register_triton(name: str, impl: Callable) -> None:
    """Register ``impl`` (a Python launcher of Triton kernels) as the Triton twin of aefast::name."""
    if _triton_lib is None:
        return
    _triton_lib.define(_schema_without_namespace(name))

    def checked(*args):  # as the C++ kernels: a clear error for mixed devices, not a Triton fault
        check_same_device(name, args)
        return impl(*args)

    for key in ("CPU", "CUDA"):
        _triton_lib.impl(name, checked, key)
    _triton_ops.add(name)


def _qualified_names(name: str):
    yield f"{NAMESPACE}::{name}"
    if name in _triton_ops:
        yield f"{TRITON_NAMESPACE}::{name}"


def check_same_device(op_name: str, args) -> None:
    """Every tensor argument of an op (lists of tensors included) must be on one device: the
    fake functions' twin of the C++ kernels' aefast::check_same_device. A direct torch.ops call
    mixing devices then raises under tracing (FakeTensorMode, meta tensors) as it does eagerly."""
    first = None
    for arg in args:
        for t in (arg if isinstance(arg, (list, tuple)) else (arg,)):
            if not isinstance(t, torch.Tensor):
                continue
            if first is None:
                first = t.device
            elif t.device != first:
                raise RuntimeError(f"aefast::{op_name}: all tensor arguments must be on one device; "
                                   f"found {first} and {t.device}")


def register_fake(name: str, fake: Callable) -> None:
    """One fake (meta) function for the op and its Triton twin; it checks devices first."""
    def checked(*args, **kwargs):
        check_same_device(name, (*args, *kwargs.values()))
        return fake(*args, **kwargs)

    checked.__name__ = getattr(fake, "__name__", f"fake_{name}")
    for qualname in _qualified_names(name):
        torch.library.register_fake(qualname, checked)


def register_autograd(name: str, make_backward: Callable, setup_context: Callable) -> None:
    """``make_backward(ns)`` returns the backward that calls the backward ops of namespace ``ns``,
    so a forward on one backend is differentiated on the same backend."""
    for qualname in _qualified_names(name):
        ns = getattr(torch.ops, qualname.split("::")[0])
        torch.library.register_autograd(qualname, make_backward(ns), setup_context=setup_context)


# nn.Parameter is a plain tensor to the dispatcher (it disables __torch_function__); other
# subclasses may override ops, so they take the registered formula.
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def eager_autograd_entry_serves(*tensors) -> bool:
    """Plain tensors (None allowed), no tracing, no torch.func transform: an op's C++ autograd entry
    (aefast._C.*_autograd) serves the call instead of the registered Python formula."""
    return (all(t is None or type(t) in _PLAIN for t in tensors) and not torch.compiler.is_compiling()
            and not torch._C._are_functorch_transforms_active())
