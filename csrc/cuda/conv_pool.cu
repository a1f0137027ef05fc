// CUDA kernels of the conv_pool family: the fused encoder block and the drop-in max_pool2d.
// Same math as csrc/cpu/conv_pool.cpp (derivations there and in aefast/ops/conv_pool.py); the
// algorithms are written once in aefast/gemm_gather_host.h over an executor (here CudaExec,
// aefast/cuda_exec.cuh), and their per-element bodies live in aefast/gemm_gather_body.h, where the
// tests run them on the CPU (csrc/cpu/emulate_cuda_bodies.cpp, tests/test_cuda_bodies.py).
//
// forward      K = Cin*KH*KW >= kVendorConvMinReduction (aefast/conv_algorithm.h, the rule the CPU
//              uses too): cuDNN's conv through at::convolution (bias inside; torch's TF32 flags
//              apply) per L2-sized batch chunk, then the fused epilogue act -> pool -> argmax that
//              writes the pooled map, uint8 window offsets and z at the argmax. Shorter reductions:
//              the direct kernel, one thread per pooled output. Offset 0 seeds every window, so a
//              window of -inf activations stores offset 0's z (as the CPU does).
// backward     gz = grad * act'(z at the argmax); dgrad = the decoder's GEMM + gather-col2im applied
//              to gz; wgrad = (unpool rows of gz)^T @ (im2col rows of x) by cuBLAS; grad_b = sum gz.
//              No atomics: bitwise reproducible run to run.
// corruption   forward and wgrad read corrupt(x) (aefast/corruption.h: the element function of
//              aefast::corrupt, keyed by the logical NCHW index) in place of x; the vendor-conv path
//              builds it per batch chunk, the other paths in their input load.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "aefast/conv_pool.h"
#include "aefast/corruption.h"
#include "aefast/cuda_exec.cuh"
#include "aefast/gemm_gather_host.h"
#include "aefast/torch_utils.h"

namespace aefast {
namespace {

// The CUDA bodies pool with stride = pool (ceil_mode's clipped windows included);
// aefast.functional routes other pool strides to the reference twin, counted as a fallback, so
// reaching this check means the op was called directly.
void check_tiling_pool(const char* op, int64_t H, int64_t W, int64_t KH, int64_t KW, c10::IntArrayRef stride,
                       c10::IntArrayRef padding, c10::IntArrayRef pool, c10::IntArrayRef pool_stride, bool ceil_mode) {
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && pool.size() == 2 && pool_stride.size() == 2 &&
                  stride[0] > 0 && stride[1] > 0, "aefast::", op, ": bad geometry arguments");
  const int64_t sh = pool_stride[0] ? pool_stride[0] : pool[0], sw = pool_stride[1] ? pool_stride[1] : pool[1];
  TORCH_CHECK(sh == pool[0] && sw == pool[1], "aefast::", op, ": the CUDA kernels need pool_stride = pool_size; "
              "aefast.functional.conv_pool2d runs other pool strides on the reference path");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_pool2d_forward_cuda(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias, c10::IntArrayRef stride,
    c10::IntArrayRef padding, int64_t activation, double negative_slope, c10::IntArrayRef pool_size,
    c10::string_view corruption, double corruption_level, int64_t seed, double low, double high,
    c10::IntArrayRef pool_stride, bool ceil_mode) {
  check_same_device("conv_pool2d_forward", {&input, &weight}, bias);
  TORCH_CHECK(input.dim() == 4 && weight.dim() == 4, "aefast::conv_pool2d_forward: input and weight must be 4-D");
  check_tiling_pool("conv_pool2d_forward", input.size(2), input.size(3), weight.size(2), weight.size(3), stride,
                    padding, pool_size, pool_stride, ceil_mode);
  c10::cuda::CUDAGuard guard(input.device());
  return conv_pool2d_forward_op<CudaExec>(input, weight, bias, stride, padding, activation, negative_slope, pool_size,
                                          corruption, corruption_level, seed, low, high, kGemmChunkBytes, ceil_mode);
}

at::Tensor conv_pool2d_backward_input_cuda(const at::Tensor& grad, const at::Tensor& window, const at::Tensor& preact,
                                           const at::Tensor& weight, c10::IntArrayRef input_size,
                                           c10::IntArrayRef stride, c10::IntArrayRef padding, int64_t activation,
                                           double negative_slope, c10::IntArrayRef pool_size,
                                           c10::IntArrayRef pool_stride, bool ceil_mode) {
  check_same_device("conv_pool2d_backward_input", {&grad, &window, &preact, &weight});
  TORCH_CHECK(grad.dim() == 4 && input_size.size() == 2 && weight.dim() == 4,
              "aefast::conv_pool2d_backward_input: bad arguments");
  check_tiling_pool("conv_pool2d_backward_input", input_size[0], input_size[1], weight.size(2), weight.size(3), stride,
                    padding, pool_size, pool_stride, ceil_mode);
  const EncoderGeometry g = encoder_geometry(grad.size(0), weight.size(1), input_size[0], input_size[1],
                                             weight.size(0), weight.size(2), weight.size(3), stride, padding, pool_size,
                                             ceil_mode);
  c10::cuda::CUDAGuard guard(grad.device());
  return std::get<0>(conv_pool2d_backward_op<CudaExec>(grad, window, preact, at::Tensor(), weight, g, activation,
                                                       negative_slope, "none", 0, 0.0, 0.0, 1.0, true, false,
                                                       kGemmChunkBytes));
}

std::tuple<at::Tensor, at::Tensor> conv_pool2d_backward_weight_cuda(
    const at::Tensor& grad, const at::Tensor& window, const at::Tensor& preact, const at::Tensor& input,
    c10::IntArrayRef kernel_size, c10::IntArrayRef stride, c10::IntArrayRef padding, int64_t activation,
    double negative_slope, c10::IntArrayRef pool_size, c10::string_view corruption, double corruption_level,
    int64_t seed, double low, double high, c10::IntArrayRef pool_stride, bool ceil_mode) {
  check_same_device("conv_pool2d_backward_weight", {&grad, &window, &preact, &input});
  TORCH_CHECK(grad.dim() == 4 && kernel_size.size() == 2 && input.dim() == 4,
              "aefast::conv_pool2d_backward_weight: bad arguments");
  check_tiling_pool("conv_pool2d_backward_weight", input.size(2), input.size(3), kernel_size[0], kernel_size[1],
                    stride, padding, pool_size, pool_stride, ceil_mode);
  const EncoderGeometry g = encoder_geometry(input.size(0), input.size(1), input.size(2), input.size(3), grad.size(1),
                                             kernel_size[0], kernel_size[1], stride, padding, pool_size, ceil_mode);
  c10::cuda::CUDAGuard guard(grad.device());
  auto [gx, gw, gb] = conv_pool2d_backward_op<CudaExec>(grad, window, preact, input, at::Tensor(), g, activation,
                                                        negative_slope, corruption, seed, corruption_level, low, high,
                                                        false, true, kGemmChunkBytes);
  return {gw, gb};
}

// ---------------------------------------------------------------- drop-in max_pool2d

std::tuple<at::Tensor, at::Tensor> max_pool2d_forward_cuda(const at::Tensor& input, c10::IntArrayRef kernel,
                                                           c10::IntArrayRef stride, c10::IntArrayRef padding,
                                                           c10::IntArrayRef dilation, bool ceil_mode) {
  check_same_device("max_pool2d_forward", {&input});
  c10::cuda::CUDAGuard guard(input.device());
  return max_pool2d_forward_op<CudaExec>(input, kernel, stride, padding, dilation, ceil_mode);
}

// Deterministic: one thread per (n, c) plane scans its pooled entries in row-major order (the
// CPU's order) into an fp32 plane; an out-of-range index is a device-side assert (no host sync).
at::Tensor max_pool2d_backward_cuda(const at::Tensor& grad_output, const at::Tensor& indices, const at::Tensor& input) {
  check_same_device("max_pool2d_backward", {&grad_output, &indices, &input});
  c10::cuda::CUDAGuard guard(grad_output.device());
  return max_pool2d_backward_planes<CudaExec>(grad_output, indices, input);
}

}  // namespace

// Both gradients in one call: gz is computed once for the two.
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_pool2d_backward_cuda(
    const at::Tensor& grad, const at::Tensor& window, const at::Tensor& preact, const at::Tensor& input,
    const at::Tensor& weight, c10::IntArrayRef stride, c10::IntArrayRef padding, int64_t activation,
    double negative_slope, c10::IntArrayRef pool_size, c10::string_view corruption, double corruption_level,
    int64_t seed, double low, double high, c10::IntArrayRef pool_stride, bool ceil_mode) {
  check_same_device("conv_pool2d_backward", {&grad, &window, &preact, &input, &weight});
  TORCH_CHECK(input.dim() == 4 && weight.dim() == 4 && input.size(1) == weight.size(1),
              "aefast::conv_pool2d_backward: input and weight must be 4-D with matching channels");
  check_tiling_pool("conv_pool2d_backward", input.size(2), input.size(3), weight.size(2), weight.size(3), stride,
                    padding, pool_size, pool_stride, ceil_mode);
  const EncoderGeometry g = encoder_geometry(input.size(0), input.size(1), input.size(2), input.size(3), weight.size(0),
                                             weight.size(2), weight.size(3), stride, padding, pool_size, ceil_mode);
  c10::cuda::CUDAGuard guard(grad.device());
  return conv_pool2d_backward_op<CudaExec>(grad, window, preact, input, weight, g, activation, negative_slope,
                                           corruption, seed, corruption_level, low, high, true, true, kGemmChunkBytes);
}

TORCH_LIBRARY_IMPL(aefast, CUDA, m) {
  m.impl("conv_pool2d_forward", &conv_pool2d_forward_cuda);
  m.impl("conv_pool2d_backward_input", &conv_pool2d_backward_input_cuda);
  m.impl("conv_pool2d_backward_weight", &conv_pool2d_backward_weight_cuda);
  m.impl("conv_pool2d_backward", &conv_pool2d_backward_cuda);
  m.impl("max_pool2d_forward", &max_pool2d_forward_cuda);
  m.impl("max_pool2d_backward", &max_pool2d_backward_cuda);
}

}  // namespace aefast
