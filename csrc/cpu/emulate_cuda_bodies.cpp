// Test-only: the CUDA backend's algorithms (aefast/gemm_gather_host.h) run on the CPU with a CPU
// executor: the SAME per-element bodies (aefast/gemm_gather_body.h) over the same index spaces,
// and the same GEMM sequence through at::mm (fp16/bf16 operands widened to fp32, exact, with an
// fp32 result as aten::mm.dtype gives on the GPU). tests/test_cuda_bodies.py holds these ops to the
// reference twin, so the suite executes the index arithmetic the GPU runs. chunk_bytes replaces
// the GPU's L2-sized chunk budget so that the tests can force many batch chunks.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>

#include "aefast/batch_norm_act_host.h"
#include "aefast/conv_bn_pool_host.h"
#include "aefast/conv_transpose_act_host.h"
#include "aefast/gemm_gather_host.h"
#include "aefast/torch_utils.h"

namespace aefast {
namespace {

struct CpuExec {
  template <class Body>
  static void for_each(const Body& body, int64_t n) {
    at::parallel_for(0, n, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) body(e);
    });
  }
  template <class Body>
  static void for_each_checked(const Body& body, int64_t n, const char* what) {
    std::atomic<bool> bad{false};
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e)
        if (!body(e)) bad.store(true);
    });
    TORCH_CHECK(!bad.load(), what);
  }
  static at::Tensor mm(const at::Tensor& a, const at::Tensor& b) {
    if (a.scalar_type() == at::kHalf || a.scalar_type() == at::kBFloat16)
      return at::mm(a.to(at::kFloat), b.to(at::kFloat));
    return at::mm(a, b);
  }
};

std::tuple<at::Tensor, at::Tensor> emulate_decoder_forward(
    const at::Tensor& input, const at::Tensor& indices, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    c10::IntArrayRef pool_size, c10::IntArrayRef unpooled_size, c10::IntArrayRef stride, c10::IntArrayRef padding,
    c10::IntArrayRef output_padding, std::optional<c10::string_view> activation, double negative_slope,
    int64_t chunk_bytes) {
  check_same_device("emulate_cuda_unpool_conv_transpose2d", {&input, &indices, &weight}, bias);
  return unpool_conv_transpose2d_op<CpuExec>(input, indices, weight, bias, pool_size, unpooled_size, stride, padding,
                                             output_padding, activation, negative_slope, chunk_bytes);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> emulate_decoder_backward(
    const at::Tensor& grad_out, const at::Tensor& act_input, const at::Tensor& input, const at::Tensor& indices,
    const at::Tensor& weight, c10::IntArrayRef pool_size, c10::IntArrayRef unpooled_size, c10::IntArrayRef stride,
    c10::IntArrayRef padding, c10::IntArrayRef output_padding, std::optional<c10::string_view> activation,
    double negative_slope, std::array<bool, 3> output_mask, int64_t chunk_bytes) {
  check_same_device("emulate_cuda_unpool_conv_transpose2d_backward", {&grad_out, &act_input, &input, &indices, &weight});
  return unpool_conv_transpose2d_backward_op<CpuExec>(grad_out, act_input, input, indices, weight, pool_size,
                                                      unpooled_size, stride, padding, output_padding, activation,
                                                      negative_slope, output_mask, chunk_bytes);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> emulate_encoder_forward(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias, c10::IntArrayRef stride,
    c10::IntArrayRef padding, int64_t activation, double negative_slope, c10::IntArrayRef pool_size,
    c10::string_view corruption, double corruption_level, int64_t seed, double low, double high, int64_t chunk_bytes,
    bool ceil_mode) {
  check_same_device("emulate_cuda_conv_pool2d_forward", {&input, &weight}, bias);
  return conv_pool2d_forward_op<CpuExec>(input, weight, bias, stride, padding, activation, negative_slope, pool_size,
                                         corruption, corruption_level, seed, low, high, chunk_bytes, ceil_mode);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> emulate_encoder_backward(
    const at::Tensor& grad, const at::Tensor& window, const at::Tensor& preact, const at::Tensor& input,
    const at::Tensor& weight, c10::IntArrayRef stride, c10::IntArrayRef padding, int64_t activation,
    double negative_slope, c10::IntArrayRef pool_size, c10::string_view corruption, double corruption_level,
    int64_t seed, double low, double high, int64_t chunk_bytes, bool ceil_mode) {
  check_same_device("emulate_cuda_conv_pool2d_backward", {&grad, &window, &preact, &input, &weight});
  TORCH_CHECK(input.dim() == 4 && weight.dim() == 4 && input.size(1) == weight.size(1),
              "aefast::conv_pool2d_backward: input and weight must be 4-D with matching channels");
  const EncoderGeometry g = encoder_geometry(input.size(0), input.size(1), input.size(2), input.size(3), weight.size(0),
                                             weight.size(2), weight.size(3), stride, padding, pool_size, ceil_mode);
  return conv_pool2d_backward_op<CpuExec>(grad, window, preact, input, weight, g, activation, negative_slope,
                                          corruption, seed, corruption_level, low, high, true, true, chunk_bytes);
}

at::Tensor emulate_max_pool2d_backward(const at::Tensor& grad_output, const at::Tensor& indices,
                                       const at::Tensor& input) {
  check_same_device("emulate_cuda_max_pool2d_backward", {&grad_output, &indices, &input});
  return max_pool2d_backward_planes<CpuExec>(grad_output, indices, input);
}

std::tuple<at::Tensor, at::Tensor> emulate_max_pool2d_forward(const at::Tensor& input, c10::IntArrayRef kernel,
                                                              c10::IntArrayRef stride, c10::IntArrayRef padding,
                                                              c10::IntArrayRef dilation, bool ceil_mode) {
  return max_pool2d_forward_op<CpuExec>(input, kernel, stride, padding, dilation, ceil_mode);
}

std::tuple<at::Tensor, at::Tensor> emulate_conv_transpose_act2d(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias, c10::IntArrayRef stride,
    c10::IntArrayRef padding, c10::IntArrayRef output_padding, std::optional<c10::string_view> activation,
    double negative_slope) {
  check_same_device("emulate_cuda_conv_transpose_act2d", {&input, &weight}, bias);
  return conv_transpose_act2d_op<CpuExec>(input, weight, bias, stride, padding, output_padding, activation,
                                          negative_slope);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> emulate_conv_transpose_act2d_backward(
    const at::Tensor& grad_out, const at::Tensor& act_input, const at::Tensor& input, const at::Tensor& weight,
    c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef output_padding,
    std::optional<c10::string_view> activation, double negative_slope, std::array<bool, 3> output_mask) {
  check_same_device("emulate_cuda_conv_transpose_act2d_backward", {&grad_out, &act_input, &input, &weight});
  return conv_transpose_act2d_backward_op<CpuExec>(grad_out, act_input, input, weight, stride, padding, output_padding,
                                                   activation, negative_slope, output_mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> emulate_batch_norm_act2d_forward(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    double eps, int64_t activation, double negative_slope) {
  check_same_device("emulate_cuda_batch_norm_act2d_forward", {&input}, weight);
  return batch_norm_act2d_forward_op<CpuExec>(input, weight, bias, eps, activation, negative_slope);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> emulate_batch_norm_act2d_backward(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps, int64_t activation,
    double negative_slope, std::array<bool, 3> output_mask) {
  check_same_device("emulate_cuda_batch_norm_act2d_backward", {&grad_out, &input, &mean, &var}, weight);
  return batch_norm_act2d_backward_op<CpuExec>(grad_out, input, mean, var, weight, bias, eps, activation,
                                               negative_slope, output_mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> emulate_conv_bn_pool2d_forward(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias, c10::IntArrayRef stride,
    c10::IntArrayRef padding, double eps, int64_t activation, double negative_slope, c10::IntArrayRef pool_size,
    c10::IntArrayRef pool_stride, bool ceil_mode, int64_t reduction_threads) {
  check_same_device("emulate_cuda_conv_bn_pool2d_forward", {&input, &weight}, bias);
  return conv_bn_pool2d_forward_op<CpuExec>(input, weight, bias, bn_weight, bn_bias, stride, padding, eps, activation,
                                            negative_slope, pool_size, pool_stride, ceil_mode, reduction_threads);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> emulate_conv_bn_pool2d_backward(
    const at::Tensor& grad_pooled, const at::Tensor& window, const at::Tensor& conv_out, const at::Tensor& mean,
    const at::Tensor& var, const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, c10::IntArrayRef stride, c10::IntArrayRef padding, double eps,
    int64_t activation, double negative_slope, c10::IntArrayRef pool_size, std::array<bool, 5> output_mask,
    c10::IntArrayRef pool_stride, bool ceil_mode, int64_t reduction_threads) {
  check_same_device("emulate_cuda_conv_bn_pool2d_backward", {&grad_pooled, &window, &conv_out, &mean, &var, &input, &weight});
  return conv_bn_pool2d_backward_op<CpuExec>(grad_pooled, window, conv_out, mean, var, input, weight, bn_weight, bn_bias,
                                             stride, padding, eps, activation, negative_slope, pool_size, output_mask,
                                             pool_stride, ceil_mode, reduction_threads);
}

}  // namespace

TORCH_LIBRARY_IMPL(aefast, CPU, m) {
  m.impl("emulate_cuda_batch_norm_act2d_forward", &emulate_batch_norm_act2d_forward);
  m.impl("emulate_cuda_batch_norm_act2d_backward", &emulate_batch_norm_act2d_backward);
  m.impl("emulate_cuda_conv_bn_pool2d_forward", &emulate_conv_bn_pool2d_forward);
  m.impl("emulate_cuda_conv_bn_pool2d_backward", &emulate_conv_bn_pool2d_backward);
  m.impl("emulate_cuda_conv_transpose_act2d", &emulate_conv_transpose_act2d);
  m.impl("emulate_cuda_conv_transpose_act2d_backward", &emulate_conv_transpose_act2d_backward);
  m.impl("emulate_cuda_unpool_conv_transpose2d", &emulate_decoder_forward);
  m.impl("emulate_cuda_unpool_conv_transpose2d_backward", &emulate_decoder_backward);
  m.impl("emulate_cuda_conv_pool2d_forward", &emulate_encoder_forward);
  m.impl("emulate_cuda_conv_pool2d_backward", &emulate_encoder_backward);
  m.impl("emulate_cuda_max_pool2d_forward", &emulate_max_pool2d_forward);
  m.impl("emulate_cuda_max_pool2d_backward", &emulate_max_pool2d_backward);
}

}  // namespace aefast
