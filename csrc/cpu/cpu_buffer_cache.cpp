// The bounded CPU buffer cache (see aefast/cpu_buffer_cache.h for why and what it promises).
//
// Blocks: a block is one c10::alloc_cpu allocation (c10's alignment, its THP policy) of a whole
// number of pages. A DataPtr handed out by allocate() carries the block record as its context
// and release_block as its deleter, so whichever thread drops the last reference to the storage
// (autograd's engine thread included) returns the block to this cache.
//
// Bins: freed blocks wait in a bin keyed by their byte size; allocate() takes the most recently
// freed block of the exact size (the one most likely still in cache). Every cached block is also
// in one LRU list in the order it was freed; when the bins hold more than the limit the oldest
// are freed. One mutex guards bins, list and counters; c10::alloc_cpu / free_cpu run outside it.
#include "aefast/cpu_buffer_cache.h"

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/native/TensorFactories.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>

#include <pthread.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <list>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace aefast {
namespace {

constexpr size_t kPage = 4096;
constexpr int64_t kDefaultLimitMb = 256;

// AEFAST_CPU_CACHE_MB: a non-negative whole number of MiB; anything else warns and keeps the default.
size_t limit_from_env() {
  const char* env = std::getenv("AEFAST_CPU_CACHE_MB");
  if (env == nullptr || *env == '\0') return static_cast<size_t>(kDefaultLimitMb) << 20;
  errno = 0;
  char* end = nullptr;
  const long long mb = std::strtoll(env, &end, 10);
  if (errno != 0 || end == env || *end != '\0' || mb < 0 || mb > (1LL << 30)) {
    TORCH_WARN("aefast: AEFAST_CPU_CACHE_MB='", env, "' is not a whole number of MiB (0 disables the cache); using ",
               kDefaultLimitMb);
    return static_cast<size_t>(kDefaultLimitMb) << 20;
  }
  return static_cast<size_t>(mb) << 20;
}

struct Block {
  void* ptr;
  size_t size;    // capacity: the request rounded up to whole pages (the bin key)
  size_t nbytes;  // what the current owner asked for (reported to the profiler)
  std::list<Block*>::iterator lru;  // valid while the block is cached
};

void release_block(void* ctx);

class CpuBufferCache final : public c10::Allocator {
 public:
  CpuBufferCache() : limit_(limit_from_env()) {}

  size_t limit() const { return limit_; }

  c10::DataPtr allocate(size_t n) override {
    // Small requests (e.g. a resize_ of a cached tensor to a few KiB) go to the ordinary CPU
    // allocator; the storage keeps this allocator for its next resize.
    if (n < kCpuCacheMinBytes || limit_ == 0) return c10::GetCPUAllocator()->allocate(n);
    const size_t size = (n + kPage - 1) / kPage * kPage;
    Block* b = nullptr;
    size_t allocated = 0, reserved = 0;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = bins_.find(size);
      if (it != bins_.end()) {
        b = it->second.back();
        it->second.pop_back();
        if (it->second.empty()) bins_.erase(it);
        lru_.erase(b->lru);
        cached_bytes_ -= size;
        ++hits_;
      } else {
        ++misses_;
      }
      if (b != nullptr) {
        allocated_bytes_ += n;
        allocated = allocated_bytes_;
        reserved = allocated_bytes_ + cached_bytes_;
      }
    }
    if (b == nullptr) {
      b = new Block{fresh(size), size, 0, {}};
      std::lock_guard<std::mutex> lock(mu_);
      allocated_bytes_ += n;
      allocated = allocated_bytes_;
      reserved = allocated_bytes_ + cached_bytes_;
    }
    b->nbytes = n;
    if (c10::memoryProfilingEnabled())
      c10::reportMemoryUsageToProfiler(b->ptr, static_cast<int64_t>(n), allocated, reserved,
                                       c10::Device(c10::DeviceType::CPU));
    return {b->ptr, b, &release_block, c10::Device(c10::DeviceType::CPU)};
  }

  // The deleter's half: the block goes back to its bin, or is freed when it alone exceeds the
  // limit; then the oldest cached blocks are freed until the bins fit the limit again.
  void release(Block* b) {
    std::vector<Block*> evicted;
    {
      std::lock_guard<std::mutex> lock(mu_);
      allocated_bytes_ -= b->nbytes;
      // Reported before the block is back in a bin: another thread may take it as soon as it is,
      // and the profiler must see this free before that allocation of the same pointer.
      if (c10::memoryProfilingEnabled())
        c10::reportMemoryUsageToProfiler(b->ptr, -static_cast<int64_t>(b->nbytes), allocated_bytes_,
                                         allocated_bytes_ + cached_bytes_, c10::Device(c10::DeviceType::CPU));
      if (b->size > limit_) {
        evicted.push_back(b);
      } else {
        bins_[b->size].push_back(b);
        b->lru = lru_.insert(lru_.end(), b);
        cached_bytes_ += b->size;
        while (cached_bytes_ > limit_) evicted.push_back(unlink_oldest());
      }
    }
    free_blocks(evicted);
  }

  void clear() {
    std::vector<Block*> all;
    {
      std::lock_guard<std::mutex> lock(mu_);
      while (!lru_.empty()) all.push_back(unlink_oldest());
    }
    free_blocks(all);
  }

  CpuBufferCacheStats stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {static_cast<int64_t>(cached_bytes_), static_cast<int64_t>(lru_.size()), hits_, misses_,
            static_cast<int64_t>(limit_)};
  }

  // Not a plain malloc'ed pointer (the context is the block record): no raw_allocate.
  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // fork() while another thread holds the mutex would leave it locked forever in the child
  // (DataLoader workers fork): hold it across the fork, release it on both sides.
  void lock_for_fork() { mu_.lock(); }
  void unlock_after_fork() { mu_.unlock(); }

 private:
  // Fresh pages; when they are not to be had, the cached blocks are given back and it retries.
  void* fresh(size_t size) {
    try {
      return c10::alloc_cpu(size);
    } catch (const c10::OutOfMemoryError&) {
      clear();
      return c10::alloc_cpu(size);
    }
  }

  // Requires mu_. Removes the least recently cached block from the list and its bin.
  Block* unlink_oldest() {
    Block* o = lru_.front();
    lru_.pop_front();
    auto it = bins_.find(o->size);
    auto& bin = it->second;
    bin.erase(std::find(bin.begin(), bin.end(), o));
    if (bin.empty()) bins_.erase(it);
    cached_bytes_ -= o->size;
    return o;
  }

  static void free_blocks(const std::vector<Block*>& blocks) {
    for (Block* o : blocks) {
      c10::free_cpu(o->ptr);
      delete o;
    }
  }

  const size_t limit_;
  std::mutex mu_;
  std::unordered_map<size_t, std::vector<Block*>> bins_;
  std::list<Block*> lru_;  // cached blocks, least recently freed first
  size_t cached_bytes_ = 0, allocated_bytes_ = 0;
  int64_t hits_ = 0, misses_ = 0;
};

CpuBufferCache& instance() {
  // Leaked on purpose: tensors freed during interpreter exit (after static destructors) still
  // run release_block. The fork handlers are registered once, with the first use.
  static CpuBufferCache* cache = [] {
    auto* c = new CpuBufferCache();
    pthread_atfork([] { instance().lock_for_fork(); }, [] { instance().unlock_after_fork(); },
                   [] { instance().unlock_after_fork(); });
    return c;
  }();
  return *cache;
}

void release_block(void* ctx) { instance().release(static_cast<Block*>(ctx)); }

}  // namespace

at::Tensor empty_cpu_cached(at::IntArrayRef sizes, const at::TensorOptions& opts, at::MemoryFormat format) {
  CpuBufferCache& cache = instance();
  const at::TensorOptions plain = opts.memory_format(format);
  if (cache.limit() == 0 || opts.device().type() != c10::DeviceType::CPU || opts.layout() != at::kStrided ||
      opts.pinned_memory() || opts.requires_grad())
    return at::empty(sizes, plain);
  at::detail::check_size_nonnegative(sizes);
  const size_t nbytes = at::detail::computeStorageNbytesContiguous(sizes, opts.dtype().itemsize());
  if (nbytes < kCpuCacheMinBytes) return at::empty(sizes, plain);
  at::Tensor t = at::detail::empty_generic(sizes, &cache, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                           c10::typeMetaToScalarType(opts.dtype()), format);
  // As at::empty: deterministic mode with fill_uninitialized_memory fills it (NaN / max).
  if (C10_UNLIKELY(at::globalContext().deterministicAlgorithms() &&
                   at::globalContext().deterministicFillUninitializedMemory()))
    at::native::fill_empty_deterministic_(t);
  return t;
}

at::Tensor empty_cpu_cached(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  return empty_cpu_cached(sizes, opts, opts.memory_format_opt().value_or(at::MemoryFormat::Contiguous));
}

at::Tensor zeros_cpu_cached(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  return empty_cpu_cached(sizes, opts).zero_();
}

at::Tensor empty_like_cpu_cached(const at::Tensor& t) {
  return empty_cpu_cached(t.sizes(), t.options(), t.suggest_memory_format());
}

at::Tensor contiguous_cpu_cached(const at::Tensor& t) {
  if (t.is_contiguous()) return t;
  if (!t.is_cpu()) return t.contiguous();
  return empty_cpu_cached(t.sizes(), t.options(), at::MemoryFormat::Contiguous).copy_(t);
}

CpuBufferCacheStats cpu_buffer_cache_stats() { return instance().stats(); }

void cpu_buffer_cache_clear() { instance().clear(); }

}  // namespace aefast
