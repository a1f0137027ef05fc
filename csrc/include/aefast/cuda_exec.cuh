#pragma once
// The CUDA executor of aefast/gemm_gather_host.h: one thread per element of a body's index space
// (grid-stride loop on the current stream), cuBLAS GEMMs through at::mm. Only .cu files include it.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>

#include <algorithm>

namespace aefast {

constexpr int kBodyThreads = 256;

template <class Body>
__global__ void __launch_bounds__(kBodyThreads) for_each_kernel(const Body body, int64_t n) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x)
    body(e);
}

// A body that returns false on an invalid input element: a device-side assert (the error surfaces
// at the next synchronising call, as torch's own index asserts do), never a host sync.
template <class Body>
__global__ void __launch_bounds__(kBodyThreads) for_each_checked_kernel(const Body body, int64_t n) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const bool ok = body(e);
    CUDA_KERNEL_ASSERT(ok && "aefast: index out of range");
  }
}

struct CudaExec {
  static unsigned blocks(int64_t n) {
    return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((n + kBodyThreads - 1) / kBodyThreads, 65535LL * 32)));
  }
  template <class Body>
  static void for_each(const Body& body, int64_t n) {
    if (n <= 0) return;
    for_each_kernel<Body><<<blocks(n), kBodyThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(body, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  template <class Body>
  static void for_each_checked(const Body& body, int64_t n, const char* /*what*/) {
    if (n <= 0) return;
    for_each_checked_kernel<Body><<<blocks(n), kBodyThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(body, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  // cuBLAS through ATen; fp16/bf16 operands accumulate AND return fp32 (aten::mm.dtype), so the
  // gather that follows sums unrounded column entries.
  static at::Tensor mm(const at::Tensor& a, const at::Tensor& b) {
    if (a.scalar_type() == at::kHalf || a.scalar_type() == at::kBFloat16) return at::mm(a, b, at::kFloat);
    return at::mm(a, b);
  }
};

}  // namespace aefast
