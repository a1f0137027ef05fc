"""Loads the compiled extension ``aefast._C`` and checks it matches the running torch."""
from __future__ import annotations

import torch

REBUILD_HINT = (
    "Rebuild it against the torch you have, from the aefast source tree:\n"
    "    pip install scikit-build-core pybind11 cmake ninja\n"
    "    pip install --no-build-isolation -e .\n"
    "or run ./dev setup, which does both."
)


def load():
    """Import the extension (registering torch.ops.aefast) and return its build info dict."""
    try:
        from aefast import _C  # noqa: PLC0415 - registration happens on import
    except ImportError as exc:
        raise ImportError(
            f"aefast's compiled extension aefast._C could not be loaded ({exc}). It is either not "
            f"built or was built against a different torch than the installed {torch.__version__}.\n"
            + REBUILD_HINT
        ) from exc
    info = dict(_C.build_info())
    if info["torch_version"] != torch.__version__:
        raise ImportError(
            f"aefast._C was built against torch {info['torch_version']}, but torch "
            f"{torch.__version__} is installed; its kernels would not be ABI compatible.\n" + REBUILD_HINT
        )
    return info


BUILD_INFO = load()
