// CUDA kernels of the pool_index family: flat <-> window index conversion.
// Invalid entries are written as sentinels (255 / -1) and reported by the Python layer, so a
// bad index never device-asserts and never poisons the CUDA context.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include "aefast/pool_index.h"
#include "aefast/torch_utils.h"

namespace aefast {
namespace {

template <typename In, typename Out, typename Convert>
__global__ void convert_indices_kernel(const In* __restrict__ in, Out* __restrict__ out, int64_t n, int64_t out_h,
                                       int64_t out_w, PoolGeometry g, Convert convert) {
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < n;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t ow = k % out_w;
    const int64_t oh = (k / out_w) % out_h;
    out[k] = convert(in[k], oh, ow, g);
  }
}

template <typename In, typename Out, typename Convert>
at::Tensor launch_convert(const at::Tensor& src_in, at::ScalarType out_dtype, const PoolGeometry& g,
                          Convert convert) {
  TORCH_CHECK(src_in.dim() >= 2, "aefast: pooled indices need at least 2 dims, got ", src_in.dim());
  const c10::cuda::CUDAGuard guard(src_in.device());
  const at::Tensor src = src_in.contiguous();
  at::Tensor out = at::empty(src.sizes(), src.options().dtype(out_dtype));
  const int64_t n = src.numel();
  if (n == 0) return out;
  constexpr int threads = 256;
  const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, 65535LL * 8);
  convert_indices_kernel<<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      src.const_data_ptr<In>(), out.mutable_data_ptr<Out>(), n, src.size(-2), src.size(-1), g, convert);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

struct FlatToWindow {
  __device__ uint8_t operator()(int64_t flat, int64_t oh, int64_t ow, const PoolGeometry& g) const {
    return window_offset_of_flat(flat, oh, ow, g);
  }
};
struct WindowToFlat {
  __device__ int64_t operator()(uint8_t offset, int64_t oh, int64_t ow, const PoolGeometry& g) const {
    return flat_of_window_offset(offset, oh, ow, g);
  }
};

at::Tensor flat_to_window_cuda(const at::Tensor& indices, c10::IntArrayRef input_size, c10::IntArrayRef kernel,
                               c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  check_same_device("flat_to_window", {&indices});
  TORCH_CHECK(indices.scalar_type() == at::kLong, "aefast::flat_to_window: indices must be int64");
  const PoolGeometry g = pool_geometry_from_args(input_size, kernel, stride, padding, dilation);
  return launch_convert<int64_t, uint8_t>(indices, at::kByte, g, FlatToWindow{});
}

at::Tensor window_to_flat_cuda(const at::Tensor& window, c10::IntArrayRef input_size, c10::IntArrayRef kernel,
                               c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  check_same_device("window_to_flat", {&window});
  TORCH_CHECK(window.scalar_type() == at::kByte, "aefast::window_to_flat: window offsets must be uint8");
  const PoolGeometry g = pool_geometry_from_args(input_size, kernel, stride, padding, dilation);
  return launch_convert<uint8_t, int64_t>(window, at::kLong, g, WindowToFlat{});
}

}  // namespace

TORCH_LIBRARY_IMPL(aefast, CUDA, m) {
  m.impl("flat_to_window", &flat_to_window_cuda);
  m.impl("window_to_flat", &window_to_flat_cuda);
}

}  // namespace aefast
