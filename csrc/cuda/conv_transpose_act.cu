// CUDA kernels of aefast::conv_transpose_act2d, the decoder's upsampler without unpool:
//   out = act(conv_transpose2d(input, W, b, stride, padding, output_padding))
// cuDNN's transposed convolution (at::convolution) does the multiply-adds; one grid-stride kernel
// adds the bias and applies the activation in place on its output, and the backward's gpre kernel
// feeds at::convolution_backward (which also sums grad_b). The host code and the per-element
// bodies are aefast/conv_transpose_act_host.h, run on the CPU by tests/test_cuda_bodies.py.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "aefast/conv_transpose_act_host.h"
#include "aefast/cuda_exec.cuh"
#include "aefast/torch_utils.h"

namespace aefast {
namespace {

std::tuple<at::Tensor, at::Tensor> conv_transpose_act2d_cuda(const at::Tensor& input, const at::Tensor& weight,
                                                             const std::optional<at::Tensor>& bias,
                                                             c10::IntArrayRef stride, c10::IntArrayRef padding,
                                                             c10::IntArrayRef output_padding,
                                                             std::optional<c10::string_view> activation,
                                                             double negative_slope) {
  check_same_device("conv_transpose_act2d", {&input, &weight}, bias);
  const c10::cuda::CUDAGuard guard(input.device());
  return conv_transpose_act2d_op<CudaExec>(input, weight, bias, stride, padding, output_padding, activation,
                                           negative_slope);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_transpose_act2d_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& act_input, const at::Tensor& input, const at::Tensor& weight,
    c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef output_padding,
    std::optional<c10::string_view> activation, double negative_slope, std::array<bool, 3> output_mask) {
  check_same_device("conv_transpose_act2d_backward", {&grad_out, &act_input, &input, &weight});
  const c10::cuda::CUDAGuard guard(input.device());
  return conv_transpose_act2d_backward_op<CudaExec>(grad_out, act_input, input, weight, stride, padding,
                                                    output_padding, activation, negative_slope, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(aefast, CUDA, m) {
  m.impl("conv_transpose_act2d", &conv_transpose_act2d_cuda);
  m.impl("conv_transpose_act2d_backward", &conv_transpose_act2d_backward_cuda);
}

}  // namespace aefast
