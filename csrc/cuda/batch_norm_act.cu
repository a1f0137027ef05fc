// CUDA kernels of aefast::batch_norm_act2d: BatchNorm with batch statistics -> activation, as the
// per-element bodies of aefast/batch_norm_act_host.h on the grid-stride launcher (no atomics:
// per-(group, channel) partial sums added by a fixed-shape at::sum). tests/test_batch_norm_act.py
// runs the same bodies on the CPU (emulate_cuda_batch_norm_act2d*) against the reference twin.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "aefast/batch_norm_act_host.h"
#include "aefast/cuda_exec.cuh"
#include "aefast/torch_utils.h"

namespace aefast {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act2d_forward_cuda(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    double eps, int64_t activation, double negative_slope) {
  check_same_device("batch_norm_act2d_forward", {&input}, weight);
  check_same_device("batch_norm_act2d_forward", {&input}, bias);
  const c10::cuda::CUDAGuard guard(input.device());
  return batch_norm_act2d_forward_op<CudaExec>(input, weight, bias, eps, activation, negative_slope);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act2d_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps, int64_t activation,
    double negative_slope, std::array<bool, 3> output_mask) {
  check_same_device("batch_norm_act2d_backward", {&grad_out, &input, &mean, &var}, weight);
  check_same_device("batch_norm_act2d_backward", {&input}, bias);
  const c10::cuda::CUDAGuard guard(input.device());
  return batch_norm_act2d_backward_op<CudaExec>(grad_out, input, mean, var, weight, bias, eps, activation,
                                                negative_slope, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(aefast, CUDA, m) {
  m.impl("batch_norm_act2d_forward", &batch_norm_act2d_forward_cuda);
  m.impl("batch_norm_act2d_backward", &batch_norm_act2d_backward_cuda);
}

}  // namespace aefast
