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

constexpr int kThreads = 256;

int blocks_for(int64_t n) { return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 1 << 30)); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_pool2d_forward_cuda(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias, c10::IntArrayRef stride,
    c10::IntArrayRef padding, int64_t activation, double negative_slope, c10::IntArrayRef pool_size,
    c10::string_view corruption, double corruption_level, int64_t seed, double low, double high) {
  check_same_device("conv_pool2d_forward", {&input, &weight}, bias);
  c10::cuda::CUDAGuard guard(input.device());
  return conv_pool2d_forward_op<CudaExec>(input, weight, bias, stride, padding, activation, negative_slope, pool_size,
                                          corruption, corruption_level, seed, low, high, kGemmChunkBytes);
}

at::Tensor conv_pool2d_backward_input_cuda(const at::Tensor& grad, const at::Tensor& window, const at::Tensor& preact,
                                           const at::Tensor& weight, c10::IntArrayRef input_size,
                                           c10::IntArrayRef stride, c10::IntArrayRef padding, int64_t activation,
                                           double negative_slope, c10::IntArrayRef pool_size) {
  check_same_device("conv_pool2d_backward_input", {&grad, &window, &preact, &weight});
  TORCH_CHECK(grad.dim() == 4 && input_size.size() == 2 && weight.dim() == 4,
              "aefast::conv_pool2d_backward_input: bad arguments");
  const EncoderGeometry g = encoder_geometry(grad.size(0), weight.size(1), input_size[0], input_size[1],
                                             weight.size(0), weight.size(2), weight.size(3), stride, padding, pool_size);
  c10::cuda::CUDAGuard guard(grad.device());
  return std::get<0>(conv_pool2d_backward_op<CudaExec>(grad, window, preact, at::Tensor(), weight, g, activation,
                                                       negative_slope, "none", 0, 0.0, 0.0, 1.0, true, false,
                                                       kGemmChunkBytes));
}

std::tuple<at::Tensor, at::Tensor> conv_pool2d_backward_weight_cuda(
    const at::Tensor& grad, const at::Tensor& window, const at::Tensor& preact, const at::Tensor& input,
    c10::IntArrayRef kernel_size, c10::IntArrayRef stride, c10::IntArrayRef padding, int64_t activation,
    double negative_slope, c10::IntArrayRef pool_size, c10::string_view corruption, double corruption_level,
    int64_t seed, double low, double high) {
  check_same_device("conv_pool2d_backward_weight", {&grad, &window, &preact, &input});
  TORCH_CHECK(grad.dim() == 4 && kernel_size.size() == 2 && input.dim() == 4,
              "aefast::conv_pool2d_backward_weight: bad arguments");
  const EncoderGeometry g = encoder_geometry(input.size(0), input.size(1), input.size(2), input.size(3), grad.size(1),
                                             kernel_size[0], kernel_size[1], stride, padding, pool_size);
  c10::cuda::CUDAGuard guard(grad.device());
  auto [gx, gw, gb] = conv_pool2d_backward_op<CudaExec>(grad, window, preact, input, at::Tensor(), g, activation,
                                                        negative_slope, corruption, seed, corruption_level, low, high,
                                                        false, true, kGemmChunkBytes);
  return {gw, gb};
}

// ---------------------------------------------------------------- drop-in max_pool2d

struct PoolArgs {
  int64_t N, C, H, W, OH, OW, KH, KW, SH, SW, PH, PW, DH, DW;
  int64_t xs[4], os[4];
};

template <typename scalar_t, typename acc_t>
__global__ void max_pool_forward_kernel(const scalar_t* __restrict__ x, PoolArgs a, scalar_t* __restrict__ out,
                                        int64_t* __restrict__ idx) {
  const int64_t total = a.N * a.C * a.OH * a.OW;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t ow = e % a.OW, oh = (e / a.OW) % a.OH, c = (e / (a.OW * a.OH)) % a.C, n = e / (a.OW * a.OH * a.C);
    int64_t h0 = oh * a.SH - a.PH, w0 = ow * a.SW - a.PW;
    const int64_t h1 = min(h0 + (a.KH - 1) * a.DH + 1, a.H), w1 = min(w0 + (a.KW - 1) * a.DW + 1, a.W);
    while (h0 < 0) h0 += a.DH;
    while (w0 < 0) w0 += a.DW;
    const scalar_t* plane = x + n * a.xs[0] + c * a.xs[1];
    acc_t best = -std::numeric_limits<acc_t>::infinity();
    int64_t best_i = h0 * a.W + w0;
    for (int64_t h = h0; h < h1; h += a.DH)
      for (int64_t w = w0; w < w1; w += a.DW) {
        const acc_t v = static_cast<acc_t>(plane[h * a.xs[2] + w * a.xs[3]]);
        if (pool_takes(v, best)) {
          best = v;
          best_i = h * a.W + w;
        }
      }
    const int64_t o = n * a.os[0] + c * a.os[1] + oh * a.os[2] + ow * a.os[3];
    out[o] = static_cast<scalar_t>(best);
    idx[o] = best_i;
  }
}

int64_t pool_out(int64_t size, int64_t k, int64_t s, int64_t p, int64_t d, bool ceil_mode) {
  const int64_t num = size + 2 * p - (d * (k - 1) + 1) + (ceil_mode ? s - 1 : 0);
  int64_t out = (num >= 0 ? num / s : -((-num + s - 1) / s)) + 1;
  if (ceil_mode && (out - 1) * s >= size + p) --out;
  return out;
}

std::tuple<at::Tensor, at::Tensor> max_pool2d_forward_cuda(const at::Tensor& input, c10::IntArrayRef kernel,
                                                           c10::IntArrayRef stride, c10::IntArrayRef padding,
                                                           c10::IntArrayRef dilation, bool ceil_mode) {
  TORCH_CHECK(input.dim() == 4 && kernel.size() == 2 && stride.size() == 2 && padding.size() == 2 &&
                  dilation.size() == 2,
              "aefast::max_pool2d_forward: bad arguments");
  check_same_device("max_pool2d_forward", {&input});
  c10::cuda::CUDAGuard guard(input.device());
  PoolArgs a{input.size(0), input.size(1), input.size(2), input.size(3), 0, 0, kernel[0], kernel[1], stride[0],
             stride[1], padding[0], padding[1], dilation[0], dilation[1], {}, {}};
  TORCH_CHECK(a.KH > 0 && a.KW > 0 && a.SH > 0 && a.SW > 0 && a.DH > 0 && a.DW > 0 && a.PH >= 0 && a.PW >= 0 &&
                  a.PH <= a.KH / 2 && a.PW <= a.KW / 2,
              "aefast::max_pool2d_forward: invalid pooling geometry");
  a.OH = pool_out(a.H, a.KH, a.SH, a.PH, a.DH, ceil_mode);
  a.OW = pool_out(a.W, a.KW, a.SW, a.PW, a.DW, ceil_mode);
  TORCH_CHECK(a.OH > 0 && a.OW > 0, "aefast::max_pool2d_forward: output would be empty");
  const auto fmt = input.suggest_memory_format();
  at::Tensor out = at::empty({a.N, a.C, a.OH, a.OW}, input.options().memory_format(fmt));
  at::Tensor idx = at::empty({a.N, a.C, a.OH, a.OW}, input.options().dtype(at::kLong).memory_format(fmt));
  if (out.numel() == 0) return {out, idx};
  for (int d = 0; d < 4; ++d) {
    a.xs[d] = input.stride(d);
    a.os[d] = out.stride(d);
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "max_pool2d_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    max_pool_forward_kernel<scalar_t, acc_t><<<blocks_for(out.numel()), kThreads, 0, stream>>>(
        input.const_data_ptr<scalar_t>(), a, out.mutable_data_ptr<scalar_t>(), idx.mutable_data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, idx};
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
    int64_t seed, double low, double high) {
  check_same_device("conv_pool2d_backward", {&grad, &window, &preact, &input, &weight});
  TORCH_CHECK(input.dim() == 4 && weight.dim() == 4 && input.size(1) == weight.size(1),
              "aefast::conv_pool2d_backward: input and weight must be 4-D with matching channels");
  const EncoderGeometry g = encoder_geometry(input.size(0), input.size(1), input.size(2), input.size(3), weight.size(0),
                                             weight.size(2), weight.size(3), stride, padding, pool_size);
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
