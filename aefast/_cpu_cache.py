"""The CPU buffer cache of aefast's kernels (csrc/include/aefast/cpu_buffer_cache.h).

The CPU kernels take their large outputs and scratch buffers (128 KiB and more) from a bounded
cache of freed blocks, so that a training loop does not page-fault on fresh memory every step.
At most ``AEFAST_CPU_CACHE_MB`` MiB (default 256, read once at start; 0 disables it) of freed
blocks is kept; live tensors do not count against it.
"""
from __future__ import annotations

from aefast import _C


def empty_cpu_cache() -> None:
    """Free every block the CPU buffer cache holds (as ``torch.cuda.empty_cache`` does on GPU).

    Tensors that are still alive keep their memory; their blocks return to the cache when they die.
    """
    _C.cpu_buffer_cache_clear()


def cpu_cache_info() -> dict:
    """cached_bytes, cached_blocks, hits, misses and limit_bytes (0: the cache is disabled)."""
    return dict(_C.cpu_buffer_cache_info())
