"""Index validation: the one switch, the trust given to aefast's own indices, and checks that
never stall a CUDA stream.

Pooling indices decide where the decoder and ``max_unpool2d`` write, so an index a user passes
is checked (range, and for the decoder: inside its own pool window) before any kernel reads it.

* **The switch.** ``aefast.set_index_validation(False)`` (or ``AEFAST_VALIDATE_INDICES=0`` in
  the environment) turns the check of user-passed indices off; ``aefast.info()`` reports it.
  Turn it off only for indices you trust: a bad index then reads or writes out of bounds.
* **Trusted indices.** Indices that aefast's own encoder (``conv_pool2d``) returned are
  recorded as trusted, with the tensor's version counter at that time. Passed on unchanged
  (the models' encoder -> decoder path, an ``nn.ConvPool2d`` feeding an
  ``nn.UnpoolConvTranspose2d``), they are never checked; modified in place (the version moves
  on), or copied, they are a user's indices again.
* **No host sync.** On CPU a bad index raises ValueError at once, naming its position. On
  CUDA the check runs on the device and asserts there (``torch._assert_async``, as torch's own
  index kernels assert): nothing waits for the GPU, and a bad index surfaces as "device-side
  assert triggered" at the next synchronisation. Rerun on CPU tensors to see the position.
"""
from __future__ import annotations

import os
import threading
import weakref

import torch

ENV_VAR = "AEFAST_VALIDATE_INDICES"

_state = threading.local()
_trusted: dict[int, tuple[weakref.ref, int]] = {}


class _ValidationScope:
    """Returned by set_index_validation; restores the previous setting when used as a context manager."""

    def __init__(self, previous):
        self._previous = previous

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        _state.enabled = self._previous
        return False


def set_index_validation(enabled: bool | None) -> _ValidationScope:
    """Turn the validation of user-passed pooling indices on or off for this thread (None: back
    to the environment's setting, ``AEFAST_VALIDATE_INDICES``, default on). Also a context manager."""
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"aefast: set_index_validation takes True, False or None, got {enabled!r}")
    previous = getattr(_state, "enabled", None)
    _state.enabled = enabled
    return _ValidationScope(previous)


def index_validation() -> bool:
    """Whether user-passed pooling indices are validated (see the module docstring)."""
    enabled = getattr(_state, "enabled", None)
    if enabled is not None:
        return enabled
    value = os.environ.get(ENV_VAR, "1").strip().lower()
    if value in ("1", "true", "yes", "on", ""):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"aefast: {ENV_VAR} must be 1 or 0, got {value!r}")


def mark_trusted(*tensors) -> None:
    """Record index tensors that aefast's encoder just produced (at their current version)."""
    if torch.compiler.is_compiling():
        return
    for t in tensors:
        key = id(t)
        _trusted[key] = (weakref.ref(t, lambda _, key=key: _trusted.pop(key, None)), t._version)


def is_trusted(t) -> bool:
    """``t`` is an index tensor of aefast's encoder, not modified since."""
    entry = _trusted.get(id(t))
    return entry is not None and entry[0]() is t and entry[1] == t._version


def must_validate(indices) -> bool:
    """Whether user-facing code must check these indices' values."""
    return index_validation() and not is_trusted(indices)


def reports_on_host(t) -> bool:
    """Checks on CPU tensors raise at once (reading host memory is no sync); on other devices
    they assert on the device (:func:`assert_on_device`)."""
    return t.device.type == "cpu"


def assert_on_device(ok: torch.Tensor, message: str) -> None:
    """Asserts a 0-dim bool tensor on its device without waiting for it (no host sync)."""
    torch._assert_async(ok, f"aefast: {message} (checked on the device; rerun on CPU tensors for the position)")
