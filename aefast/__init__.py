"""aefast: fused CUDA, Triton and CPU kernels for autoencoders in PyTorch."""
from __future__ import annotations

__version__ = "0.1.0"

import torch  # noqa: F401  (the extension's operators need torch loaded first)

from aefast._extension import BUILD_INFO  # noqa: E402  raises a clear ImportError when unbuilt
from aefast import ops  # noqa: E402,F401  registers fake functions, autograd and Triton twins
from aefast import functional, nn, reference  # noqa: E402,F401
from aefast.backend import BACKENDS, BackendUnavailableError, get_backend, set_backend  # noqa: E402
from aefast.validation import index_validation, set_index_validation  # noqa: E402
from aefast._info import info  # noqa: E402
from aefast._cpu_cache import empty_cpu_cache  # noqa: E402
from aefast.optimize import fused_losses, optimize  # noqa: E402


def __getattr__(name):
    """aefast.models, .data, .tasks and .training load on first use (they pull in scikit-learn)."""
    if name in ("models", "data", "tasks", "training"):
        import importlib

        return importlib.import_module(f"aefast.{name}")
    raise AttributeError(f"module 'aefast' has no attribute {name!r}")


__all__ = ["BACKENDS", "BackendUnavailableError", "empty_cpu_cache", "functional", "fused_losses", "get_backend",
           "index_validation", "info", "nn", "optimize", "reference", "set_backend", "set_index_validation"]
