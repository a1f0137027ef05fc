"""aefast.info(): what was built, what can run here, and what fell back."""
from __future__ import annotations

import importlib.metadata
import platform

import torch

from aefast import backend as _backend
from aefast import validation as _validation
from aefast._cpu_cache import cpu_cache_info
from aefast._extension import BUILD_INFO


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def info() -> dict:
    """Version, build, backends (usable and why), CUDA archs, Triton version, fallback counters, and the
    CPU buffer cache's counters (``cpu_buffer_cache``: cached_bytes, cached_blocks, hits, misses, limit_bytes)."""
    import aefast

    return {
        "version": aefast.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "build": dict(BUILD_INFO),
        "cuda_archs": BUILD_INFO["cuda_archs"].split(",") if BUILD_INFO["cuda_archs"] else [],
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "triton": _version("triton"),
        "backends": {name: {"usable": ok, "why": why} for name, (ok, why) in _backend.availability().items()},
        "backend_forced": _backend.get_backend(),
        "default_backends": {"table": _backend.DEFAULT_BACKENDS, "here": _backend.default_table()},
        "fallbacks": _backend.fallback_counts(),
        "index_validation": _validation.index_validation(),
        "cpu_buffer_cache": cpu_cache_info(),
    }


def format_info(data: dict) -> str:
    lines = [f"aefast {data['version']}  (torch {data['torch']}, python {data['python']})"]
    b = data["build"]
    lines.append(f"built against torch {b['torch_version']} with {b['compiler']}; CUDA kernels: "
                 + (f"yes, archs {', '.join(data['cuda_archs'])}" if b["cuda"] else "no"))
    lines.append(f"CUDA device: {data['cuda_device'] or 'none'};  Triton: {data['triton'] or 'not installed'}")
    lines.append("backends:")
    for name, st in data["backends"].items():
        lines.append(f"  {name:<10} {'usable' if st['usable'] else 'unavailable':<12} {st['why']}")
    table = data.get("default_backends")
    if table is not None:
        lines.append("default backends (op family: CUDA tensors / CPU tensors; as they resolve here):")
        for family, row in table["table"].items():
            here = table["here"][family]["cuda"]
            note = "" if here == row["cuda"] else f"  (here: {here})"
            lines.append(f"  {family:<14} {row['cuda']} / {row['cpu']}{note}")
    lines.append(f"forced backend: {data['backend_forced'] or 'none (the default backends above)'}")
    if "index_validation" in data:
        lines.append("index validation of user-passed pooling indices: "
                     + ("on (aefast.set_index_validation(False) or AEFAST_VALIDATE_INDICES=0 turns it off)"
                        if data["index_validation"] else "OFF (aefast.set_index_validation / AEFAST_VALIDATE_INDICES)"))
    c = data.get("cpu_buffer_cache")
    if c is not None:
        if c["limit_bytes"]:
            lines.append(f"CPU buffer cache: {c['cached_bytes'] / 2**20:.1f} of {c['limit_bytes'] / 2**20:.0f} MiB held "
                         f"in {c['cached_blocks']} blocks; {c['hits']} hits, {c['misses']} misses")
        else:
            lines.append("CPU buffer cache: disabled (AEFAST_CPU_CACHE_MB=0)")
    if data["fallbacks"]:
        lines.append("fallbacks to the reference path:")
        lines.extend(f"  {k}: {n}" for k, n in data["fallbacks"].items())
    return "\n".join(lines)
