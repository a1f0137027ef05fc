// CPU kernels of the pool_index family: flat <-> window index conversion.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "aefast/cpu_buffer_cache.h"
#include "aefast/pool_index.h"
#include "aefast/torch_utils.h"

namespace aefast {
namespace {

// Calls body(plane_begin, plane_end, out_h, out_w) over (…, Ho, Wo) planes in parallel.
template <typename Body>
void for_each_plane_range(const at::Tensor& t, Body body) {
  TORCH_CHECK(t.dim() >= 2, "aefast: pooled indices need at least 2 dims, got ", t.dim());
  const int64_t out_h = t.size(-2), out_w = t.size(-1);
  const int64_t plane = out_h * out_w;
  const int64_t planes = plane == 0 ? 0 : t.numel() / plane;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(plane, 1));
  at::parallel_for(0, planes, grain, [&](int64_t begin, int64_t end) { body(begin, end, out_h, out_w); });
}

// Calls element(k, oh, ow) for every pooled position k (flat over the tensor) and its row and
// column in its plane, planes in parallel.
template <typename Element>
void for_each_pooled_position(const at::Tensor& t, Element element) {
  for_each_plane_range(t, [&](int64_t begin, int64_t end, int64_t out_h, int64_t out_w) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t base = p * out_h * out_w;
      for (int64_t oh = 0; oh < out_h; ++oh)
        for (int64_t ow = 0; ow < out_w; ++ow) element(base + oh * out_w + ow, oh, ow);
    }
  });
}

at::Tensor flat_to_window_cpu(const at::Tensor& indices, c10::IntArrayRef input_size, c10::IntArrayRef kernel,
                              c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  check_same_device("flat_to_window", {&indices});
  TORCH_CHECK(indices.scalar_type() == at::kLong, "aefast::flat_to_window: indices must be int64");
  const PoolGeometry g = pool_geometry_from_args(input_size, kernel, stride, padding, dilation);
  const at::Tensor src = contiguous_cpu_cached(indices);
  at::Tensor out = empty_cpu_cached(src.sizes(), src.options().dtype(at::kByte));
  const int64_t* in_ptr = src.const_data_ptr<int64_t>();
  uint8_t* out_ptr = out.mutable_data_ptr<uint8_t>();
  for_each_pooled_position(src, [&](int64_t k, int64_t oh, int64_t ow) {
    out_ptr[k] = window_offset_of_flat(in_ptr[k], oh, ow, g);
  });
  return out;
}

at::Tensor window_to_flat_cpu(const at::Tensor& window, c10::IntArrayRef input_size, c10::IntArrayRef kernel,
                              c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation) {
  check_same_device("window_to_flat", {&window});
  TORCH_CHECK(window.scalar_type() == at::kByte, "aefast::window_to_flat: window offsets must be uint8");
  const PoolGeometry g = pool_geometry_from_args(input_size, kernel, stride, padding, dilation);
  const at::Tensor src = contiguous_cpu_cached(window);
  at::Tensor out = empty_cpu_cached(src.sizes(), src.options().dtype(at::kLong));
  const uint8_t* in_ptr = src.const_data_ptr<uint8_t>();
  int64_t* out_ptr = out.mutable_data_ptr<int64_t>();
  // Every window inside the input (no padding, no window past the edge: the encoders' tiling
  // pools): flat = the window's first element + a table of each offset's displacement (-1 marks
  // an offset outside the window), instead of a division per element, which made this pass as
  // slow as a whole max_pool2d with indices (0.56 ms for 16x8x48x48 offsets, 1 thread).
  const int64_t out_h_all = src.dim() >= 2 ? src.size(-2) : 0, out_w_all = src.dim() >= 2 ? src.size(-1) : 0;
  const bool windows_inside = g.pad_h == 0 && g.pad_w == 0 && out_h_all > 0 && out_w_all > 0 &&
                              (out_h_all - 1) * g.stride_h + (g.kernel_h - 1) * g.dilation_h < g.in_h &&
                              (out_w_all - 1) * g.stride_w + (g.kernel_w - 1) * g.dilation_w < g.in_w;
  if (windows_inside) {
    int64_t displacement[256];
    for (int64_t k = 0; k < 256; ++k)
      displacement[k] = k < g.kernel_h * g.kernel_w
                            ? (k / g.kernel_w) * g.dilation_h * g.in_w + (k % g.kernel_w) * g.dilation_w
                            : -1;
    for_each_plane_range(src, [&](int64_t begin, int64_t end, int64_t out_h, int64_t out_w) {
      for (int64_t p = begin; p < end; ++p)
        for (int64_t oh = 0; oh < out_h; ++oh) {
          const int64_t k0 = (p * out_h + oh) * out_w, row = oh * g.stride_h * g.in_w;
          for (int64_t ow = 0; ow < out_w; ++ow) {
            const int64_t d = displacement[in_ptr[k0 + ow]];
            out_ptr[k0 + ow] = d < 0 ? kInvalidFlatIndex : row + ow * g.stride_w + d;
          }
        }
    });
    return out;
  }
  for_each_pooled_position(src, [&](int64_t k, int64_t oh, int64_t ow) {
    out_ptr[k] = flat_of_window_offset(in_ptr[k], oh, ow, g);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(aefast, CPU, m) {
  m.impl("flat_to_window", &flat_to_window_cpu);
  m.impl("window_to_flat", &window_to_flat_cpu);
}

}  // namespace aefast
