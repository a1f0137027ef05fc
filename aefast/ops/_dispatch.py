"""Picks the implementation of one call: a compiled backend, or the reference twin."""
from __future__ import annotations

from typing import Callable

import torch

from aefast import backend as _backend
from aefast.ops import _registry


def choose(op_name: str, device: torch.device, unsupported: Callable[[str], str | None] | None = None) -> str:
    """The backend for this call. ``unsupported(backend)`` returns why that backend cannot
    serve these arguments (or None); such calls go to the reference and are counted."""
    name = _backend.resolve(device, _backend.family_of(op_name))
    if name == "reference":
        return name
    reason = unsupported(name) if unsupported is not None else None
    if reason is None and name == "triton" and not _registry.has_triton_kernel(op_name):
        reason = "no Triton kernel for this op"
    if reason is not None:
        _backend.record_fallback(op_name, name, reason)
        return "reference"
    return name
