#pragma once
// What the CPU and CUDA kernels share: host/device qualifiers and geometry structs.
// Free of torch headers so that kernel headers compile quickly under nvcc.
#include <cstdint>

#if defined(__CUDACC__)
#define AEFAST_HD __host__ __device__ __forceinline__
#else
#define AEFAST_HD inline
#endif

namespace aefast {

// One pooling window geometry: where window (oh, ow) of an (in_h, in_w) plane lies.
struct PoolGeometry {
  int64_t in_h, in_w;
  int64_t kernel_h, kernel_w;
  int64_t stride_h, stride_w;
  int64_t pad_h, pad_w;
  int64_t dilation_h, dilation_w;
};

}  // namespace aefast
