"""Backend choice: which implementation serves an op for a given tensor.

Order of precedence: :func:`set_backend` (also usable as a context manager), then the
``AEFAST_BACKEND`` environment variable, then the default of the op's family and the tensor's
device (:data:`DEFAULT_BACKENDS`: triton for the conv families on CUDA tensors, cuda for the rest,
cpu on CPU tensors; ``aefast info`` prints it). A named backend that cannot run is an error that says why; an op that a
backend does not cover for some parameter falls back to the reference path, and every such
fallback is counted in :func:`aefast.info`.
"""
from __future__ import annotations

import collections
import importlib.util
import os
import threading

import torch

from aefast._extension import BUILD_INFO

BACKENDS = ("cuda", "triton", "cpu", "reference")
ENV_VAR = "AEFAST_BACKEND"

# The automatic choice, per op family and device type: the one table of defaults. The conv
# families run as tensor-core implicit GEMMs in Triton on CUDA tensors until GPU measurements
# decide otherwise (cuda stays selectable with set_backend / AEFAST_BACKEND); pooling, index
# conversion and the losses are memory-bound and keep their CUDA kernels.
DEFAULT_BACKENDS = {
    "conv_pool": {"cuda": "triton", "cpu": "cpu"},
    "unpool_deconv": {"cuda": "triton", "cpu": "cpu"},
    "pooling": {"cuda": "cuda", "cpu": "cpu"},
    "recon_loss": {"cuda": "cuda", "cpu": "cpu"},
    # BatchNorm -> activation: Triton and CUDA kernels; triton until a GPU measures the two.
    "batch_norm": {"cuda": "triton", "cpu": "cpu"},
}
# Which family each dispatched op belongs to; ops not named here (losses, corruption, VAE terms)
# are in "recon_loss" (see family_of).
OP_FAMILIES = {
    "conv_pool2d_forward": "conv_pool", "conv_pool2d_backward": "conv_pool", "conv_pool2d": "conv_pool",
    "conv_bn_pool2d_forward": "conv_pool", "conv_bn_pool2d_backward": "conv_pool",
    "unpool_conv_transpose2d": "unpool_deconv", "unpool_conv_transpose2d_backward": "unpool_deconv",
    "conv_transpose2d": "unpool_deconv", "conv_transpose_act2d": "unpool_deconv",
    "conv_transpose_act2d_backward": "unpool_deconv",
    "max_pool2d_forward": "pooling", "max_pool2d_backward": "pooling", "max_unpool2d": "pooling",
    "max_unpool2d_backward": "pooling", "flat_to_window": "pooling", "window_to_flat": "pooling",
    "batch_norm_act2d_forward": "batch_norm", "batch_norm_act2d_backward": "batch_norm",
}
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def family_of(op_name: str | None) -> str | None:
    """The op family of a dispatched op name (None: no family, the device's plain default)."""
    if op_name is None:
        return None
    return OP_FAMILIES.get(op_name, "recon_loss")


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here (not built, no device, or wrong device)."""


_override = threading.local()
_fallbacks: collections.Counter = collections.Counter()
_fallback_lock = threading.Lock()


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"aefast: unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def availability() -> dict[str, tuple[bool, str]]:
    """Each backend's (usable, reason) on this machine, for any device it may serve."""
    status = {"reference": (True, "pure PyTorch, always available"), "cpu": (True, "C++ kernels built")}
    if not BUILD_INFO["cuda"]:
        status["cuda"] = (False, "aefast._C was built without CUDA kernels (torch without CUDA or no nvcc at build time)")
    elif not torch.cuda.is_available():
        status["cuda"] = (False, "built with CUDA, but torch.cuda.is_available() is False")
    else:
        status["cuda"] = (True, f"CUDA kernels built for sm {BUILD_INFO['cuda_archs']}")
    if not _TRITON_INSTALLED:  # found once at import: find_spec per call cost ~0.2 ms per set_backend()
        status["triton"] = (False, "the triton package is not installed (pip install triton)")
    elif torch.cuda.is_available():
        status["triton"] = (True, "on CUDA tensors" + (", and CPU tensors under TRITON_INTERPRET=1" if triton_interpreting() else ""))
    elif triton_interpreting():
        status["triton"] = (True, "interpreter on CPU tensors (TRITON_INTERPRET=1)")
    else:
        status["triton"] = (False, "no CUDA device, and TRITON_INTERPRET=1 is not set for the CPU interpreter")
    return status


class _BackendScope:
    """Returned by set_backend; restores the previous choice when used as a context manager."""

    def __init__(self, previous: str | None):
        self._previous = previous

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        _override.name = self._previous
        return False


def set_backend(name: str | None) -> _BackendScope:
    """Force a backend for all aefast ops (None returns to automatic choice).

    ``aefast.set_backend("cpu")`` sets it for this thread; ``with aefast.set_backend("triton"):``
    sets it for the block only.
    """
    if name is not None:
        _check_name(name)
        usable, reason = availability()[name]
        if not usable:
            raise BackendUnavailableError(f"aefast: backend {name!r} is unavailable: {reason}")
    previous = getattr(_override, "name", None)
    _override.name = name
    return _BackendScope(previous)


def get_backend() -> str | None:
    """The forced backend (set_backend, else AEFAST_BACKEND), or None for automatic choice."""
    name = getattr(_override, "name", None)
    if name is not None:
        return name
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        try:
            return _check_name(env)
        except ValueError as exc:
            raise ValueError(f"{exc} (from the environment variable {ENV_VAR})") from None
    return None


def resolve(device: torch.device, family: str | None = None) -> str:
    """The backend that will serve tensors on ``device`` for an op of ``family`` (see
    DEFAULT_BACKENDS; None: the device's compiled backend); raises if the forced one cannot."""
    name = get_backend()
    if name is None:
        return _automatic(device.type == "cpu", device.type == "cuda", family)
    if name == "reference":
        return name
    usable, reason = availability()[name]
    if not usable:
        raise BackendUnavailableError(f"aefast: backend {name!r} is unavailable: {reason}")
    if name == "cpu" and device.type != "cpu":
        raise BackendUnavailableError(f"aefast: backend 'cpu' runs CPU tensors only, got a tensor on {device}")
    if name == "cuda" and device.type != "cuda":
        raise BackendUnavailableError(f"aefast: backend 'cuda' runs CUDA tensors only, got a tensor on {device}")
    if name == "triton" and device.type == "cpu" and not triton_interpreting():
        raise BackendUnavailableError("aefast: backend 'triton' needs TRITON_INTERPRET=1 to run CPU tensors")
    if name == "triton" and device.type not in ("cpu", "cuda"):
        raise BackendUnavailableError(f"aefast: backend 'triton' cannot run tensors on {device}")
    return name


def resolve_tensor(t: torch.Tensor) -> str:
    """resolve(t.device) for a CPU or CUDA tensor in ~0.6 us instead of ~1.6 us: the per-call
    cost of the small ops' fast paths (a 256x1x28x28 loss kernel takes ~7 us)."""
    if getattr(_override, "name", None) is None and not os.environ.get(ENV_VAR, "").strip():
        return _automatic(t.is_cpu, t.is_cuda)
    return resolve(t.device)


def _automatic(is_cpu: bool, is_cuda: bool, family: str | None = None) -> str:
    """The automatic choice: the table's backend for the family on the tensor's device when it can
    run here, else the device's compiled backend, else the reference."""
    if is_cpu:
        return "cpu"
    if not is_cuda:
        return "reference"
    if family is not None and DEFAULT_BACKENDS[family]["cuda"] == "triton" and _TRITON_INSTALLED:
        return "triton"
    return "cuda" if BUILD_INFO["cuda"] else "reference"


def default_table() -> dict[str, dict[str, str]]:
    """DEFAULT_BACKENDS as it resolves on this machine: {family: {device: backend}}."""
    return {family: {"cuda": _automatic(False, True, family), "cpu": "cpu"} for family in DEFAULT_BACKENDS}


def record_fallback(op: str, backend: str, reason: str) -> None:
    if torch.compiler.is_compiling():  # a count at trace time would not count the calls
        return
    with _fallback_lock:
        _fallbacks[(op, backend, reason)] += 1


def fallback_counts() -> dict[str, int]:
    """``{"op[backend]: reason": count}`` for every request a backend handed to the reference."""
    with _fallback_lock:
        return {f"{op}[{backend}]: {reason}": n for (op, backend, reason), n in sorted(_fallbacks.items())}


def reset_fallback_counts() -> None:
    with _fallback_lock:
        _fallbacks.clear()
