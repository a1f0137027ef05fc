#pragma once
// A bounded caching allocator for the CPU kernels' large outputs and scratch buffers.
//
// Why: glibc hands big freed blocks back to the OS (munmap, or trimming the heap top), so every
// fresh multi-MB tensor page-faults once per 4 KiB page on first touch. For a memory-bound
// kernel that doubles its time (recon_loss on 32x3x128x128 fp32: a 6.3 MB gradient buffer, 1536
// pages, ~95 us of work and as much again in faults). Like PyTorch's CUDA caching allocator,
// this keeps freed blocks of at least kCpuCacheMinBytes in exact-size bins (sizes rounded up to
// whole pages) and hands them out again, already mapped.
//
// Bounded: at most the limit (AEFAST_CPU_CACHE_MB, default 256; read once; 0 disables the cache
// entirely) of freed blocks is kept; beyond it the least recently cached blocks are freed, and
// a block larger than the limit is never cached. Live tensors do not count against the limit.
//
// Tensors from empty_cpu_cached are ordinary resizable CPU tensors: resize_, torch.save, .numpy(),
// share_memory_() and in-place ops behave as usual (resize_ asks this allocator for the new
// storage). Allocations and frees are reported to the profiler as c10's CPU allocator does, so
// profile_memory and the benchmarks' peak-memory figures see live tensors, not cached blocks.
//
// The c10::Allocator subclass and its bins live in csrc/cpu/cpu_buffer_cache.cpp; the kernels use
// the functions below. Host code shared with the CUDA entry points may call empty_cpu_cached: for anything but a CPU
// tensor it is plain at::empty (the definitions live in csrc/cpu/cpu_buffer_cache.cpp, always built).
#include <ATen/core/Tensor.h>
#include <c10/core/TensorOptions.h>
#include <c10/util/ArrayRef.h>

#include <cstddef>
#include <cstdint>

namespace aefast {

// Below this a buffer is left to the ordinary CPU allocator. 128 KiB is glibc's initial mmap
// threshold: every block above it may be mapped fresh (and so fault) on each allocation. A
// 256x1x28x28 fp32 gradient (0.8 MB) was seen to fault on every call in some processes and not
// in others (26 us vs 90 us for the whole loss step), depending on glibc's adaptive threshold.
constexpr size_t kCpuCacheMinBytes = size_t(128) << 10;

// A tensor like at::empty(sizes, opts) (opts' memory format is honoured; contiguous when it has
// none), whose storage comes from the cache when it is a dense CPU tensor of at least
// kCpuCacheMinBytes and the cache is enabled; otherwise exactly at::empty(sizes, opts).
at::Tensor empty_cpu_cached(at::IntArrayRef sizes, const at::TensorOptions& opts);
// The same with an explicit memory format (overrides the one in opts).
at::Tensor empty_cpu_cached(at::IntArrayRef sizes, const at::TensorOptions& opts, at::MemoryFormat format);
// empty_cpu_cached(...).zero_(); at::zeros below the threshold or off the CPU.
at::Tensor zeros_cpu_cached(at::IntArrayRef sizes, const at::TensorOptions& opts);
// empty_cpu_cached with t's sizes, options and suggested memory format (at::empty_like for the
// contiguous and channels-last layouts the kernels produce).
at::Tensor empty_like_cpu_cached(const at::Tensor& t);

// t itself when it is contiguous, else a contiguous copy in a cached buffer (t.contiguous() off the CPU).
at::Tensor contiguous_cpu_cached(const at::Tensor& t);

struct CpuBufferCacheStats {
  int64_t cached_bytes;   // bytes held in the bins (freed by their tensors, not yet reused)
  int64_t cached_blocks;  // how many blocks that is
  int64_t hits;           // large allocations served from the bins
  int64_t misses;         // large allocations that needed fresh memory
  int64_t limit_bytes;    // the bound on cached_bytes (0: the cache is disabled)
};
CpuBufferCacheStats cpu_buffer_cache_stats();
// Frees every cached block (live tensors are untouched; their blocks return to the bins later).
void cpu_buffer_cache_clear();

}  // namespace aefast
