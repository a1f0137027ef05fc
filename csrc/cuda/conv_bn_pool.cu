// CUDA kernels of aefast::conv_bn_pool2d_forward / _backward: conv -> BatchNorm (training mode,
// batch statistics) -> activation -> max-pool, and its backward (formulas in
// aefast/ops/conv_bn_pool.py). cuDNN does the multiply-adds (at::convolution and
// at::convolution_backward, channels-last); aefast's grid-stride kernels do the deterministic
// channel statistics, the normalise -> activate -> pool -> argmax epilogue, the pool-sparse sums of
// BatchNorm's gradient and the dense dL/dy. The host code is aefast/conv_bn_pool_host.h and the
// per-element bodies aefast/conv_bn_pool_body.h, which tests/test_conv_bn_pool.py runs on the CPU
// (torch.ops.aefast.emulate_cuda_conv_bn_pool2d_*) against the reference twin.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "aefast/conv_bn_pool_host.h"
#include "aefast/cuda_exec.cuh"
#include "aefast/torch_utils.h"

namespace aefast {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_pool2d_forward_cuda(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias, c10::IntArrayRef stride,
    c10::IntArrayRef padding, double eps, int64_t activation, double negative_slope, c10::IntArrayRef pool_size,
    c10::IntArrayRef pool_stride, bool ceil_mode) {
  check_same_device("conv_bn_pool2d_forward", {&input, &weight}, bias);
  const c10::cuda::CUDAGuard guard(input.device());
  return conv_bn_pool2d_forward_op<CudaExec>(input, weight, bias, bn_weight, bn_bias, stride, padding, eps, activation,
                                             negative_slope, pool_size, pool_stride, ceil_mode);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_pool2d_backward_cuda(
    const at::Tensor& grad_pooled, const at::Tensor& window, const at::Tensor& conv_out, const at::Tensor& mean,
    const at::Tensor& var, const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, c10::IntArrayRef stride, c10::IntArrayRef padding, double eps,
    int64_t activation, double negative_slope, c10::IntArrayRef pool_size, std::array<bool, 5> output_mask,
    c10::IntArrayRef pool_stride, bool ceil_mode) {
  check_same_device("conv_bn_pool2d_backward", {&grad_pooled, &window, &conv_out, &mean, &var, &input, &weight});
  const c10::cuda::CUDAGuard guard(input.device());
  return conv_bn_pool2d_backward_op<CudaExec>(grad_pooled, window, conv_out, mean, var, input, weight, bn_weight,
                                              bn_bias, stride, padding, eps, activation, negative_slope, pool_size,
                                              output_mask, pool_stride, ceil_mode);
}

}  // namespace

TORCH_LIBRARY_IMPL(aefast, CUDA, m) {
  m.impl("conv_bn_pool2d_forward", &conv_bn_pool2d_forward_cuda);
  m.impl("conv_bn_pool2d_backward", &conv_bn_pool2d_backward_cuda);
}

}  // namespace aefast
