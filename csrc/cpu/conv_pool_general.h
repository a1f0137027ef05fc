#pragma once
// The encoder block conv -> bias -> activation -> max-pool for the pools the tiling kernels of
// conv_pool.cpp do not cover: pool stride != kernel (overlapping or gapped windows) and ceil_mode
// windows clipped at the conv output's edge (aefast::pool_is_tiling is false). The math and the
// outputs (pooled, uint8 window offsets, z at the argmax) are those of conv_pool.cpp; derivation
// in conv_pool_general.cpp.
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace aefast {

struct PoolWindows {
  int64_t kh, kw;  // window
  int64_t sh, sw;  // stride between windows
  bool ceil_mode;
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_pool2d_forward_general(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias, c10::IntArrayRef stride,
    c10::IntArrayRef padding, int64_t activation, double negative_slope, const PoolWindows& pool);

// (grad_input, grad_weight, grad_bias); input (for the weight gradient) or weight (for the input
// gradient) may be undefined, and the matching gradients are then undefined too. input_size and
// kernel_size give the geometry either way.
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_pool2d_backward_general(
    const at::Tensor& grad_pooled, const at::Tensor& window, const at::Tensor& preact, const at::Tensor& input,
    const at::Tensor& weight, int64_t n, int64_t c_in, c10::IntArrayRef input_size, c10::IntArrayRef kernel_size,
    c10::IntArrayRef stride, c10::IntArrayRef padding, int64_t activation, double negative_slope,
    const PoolWindows& pool);

}  // namespace aefast
