// CUDA kernels of the unpool_deconv family: the fused decoder
//   out = act(conv_transpose2d(max_unpool2d(z, idx, pool), W, b, stride, padding, output_padding))
// and the drop-in max_unpool2d, forward and backward.
//
// The decoder is the GEMM form of aefast/gemm_gather_host.h (derivation there and in
// aefast/gemm_gather_body.h): per batch chunk, cuBLAS multiplies the window-major unpool rows of z
// by the weight, and one gather-col2im kernel sums each output's taps in a fixed order, adds the
// bias and applies the activation. The backward is two more GEMMs over the im2col rows of the
// activation's gradient. No float atomics: every result is bitwise reproducible run to run.
// max_unpool2d: an integer atomicMax elects the last pooled position naming each element
// (the max is order-free), and only that position writes / receives the gradient.
// Indices are validated in Python before launch (range and own window); an index naming no
// position of its window contributes nothing (window_offset_of), it never traps.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <optional>

#include "aefast/cuda_exec.cuh"
#include "aefast/gemm_gather_host.h"
#include "aefast/torch_utils.h"
#include "aefast/unpool_deconv.h"
#include "aefast/unpool_deconv_args.h"

namespace aefast {
namespace {

constexpr int kThreads = 256;

int64_t blocks_for(int64_t total) {
  return std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads, 65535LL * 16));
}

std::tuple<at::Tensor, at::Tensor> unpool_conv_transpose2d_cuda(
    const at::Tensor& input, const at::Tensor& indices, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    c10::IntArrayRef pool_size, c10::IntArrayRef unpooled_size, c10::IntArrayRef stride, c10::IntArrayRef padding,
    c10::IntArrayRef output_padding, std::optional<c10::string_view> activation, double negative_slope) {
  check_same_device("unpool_conv_transpose2d", {&input, &indices, &weight}, bias);
  const c10::cuda::CUDAGuard guard(input.device());
  return unpool_conv_transpose2d_op<CudaExec>(input, indices, weight, bias, pool_size, unpooled_size, stride, padding,
                                              output_padding, activation, negative_slope, kGemmChunkBytes);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> unpool_conv_transpose2d_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& act_input, const at::Tensor& input, const at::Tensor& indices,
    const at::Tensor& weight, c10::IntArrayRef pool_size, c10::IntArrayRef unpooled_size, c10::IntArrayRef stride,
    c10::IntArrayRef padding, c10::IntArrayRef output_padding, std::optional<c10::string_view> activation,
    double negative_slope, std::array<bool, 3> output_mask) {
  check_same_device("unpool_conv_transpose2d_backward", {&grad_out, &act_input, &input, &indices, &weight});
  const c10::cuda::CUDAGuard guard(input.device());
  return unpool_conv_transpose2d_backward_op<CudaExec>(grad_out, act_input, input, indices, weight, pool_size,
                                                       unpooled_size, stride, padding, output_padding, activation,
                                                       negative_slope, output_mask, kGemmChunkBytes);
}

// ---------------------------------------------------------------- drop-in max_unpool2d
__global__ void claim_kernel(const int64_t* __restrict__ idx, int* __restrict__ winner, int64_t total,
                             int64_t plane_in, int64_t plane_out) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t plane = e / plane_in, p = e - plane * plane_in, t = idx[e];
    if (t < 0 || t >= plane_out) continue;  // validated in Python; never trap
    atomicMax(winner + plane * plane_out + t, static_cast<int>(p));
  }
}

template <typename scalar_t>
__global__ void unpool_write_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ idx,
                                    const int* __restrict__ winner, scalar_t* __restrict__ out, int64_t total,
                                    int64_t plane_in, int64_t plane_out) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t plane = e / plane_in, p = e - plane * plane_in, t = idx[e];
    if (t < 0 || t >= plane_out) continue;
    const int64_t dst = plane * plane_out + t;
    if (winner[dst] == static_cast<int>(p)) out[dst] = x[e];
  }
}

template <typename scalar_t>
__global__ void unpool_grad_kernel(const scalar_t* __restrict__ g, const int64_t* __restrict__ idx,
                                   const int* __restrict__ winner, scalar_t* __restrict__ grad_in, int64_t total,
                                   int64_t plane_in, int64_t plane_out) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t plane = e / plane_in, p = e - plane * plane_in, t = idx[e];
    const bool ok = t >= 0 && t < plane_out && winner[plane * plane_out + t] == static_cast<int>(p);
    grad_in[e] = ok ? g[plane * plane_out + t] : scalar_t(0);
  }
}

at::Tensor winners(const at::Tensor& idx, int64_t planes, int64_t plane_in, int64_t plane_out) {
  TORCH_CHECK(plane_in < (int64_t(1) << 31), "aefast::max_unpool2d: planes of 2^31 elements or more are not supported");
  at::Tensor winner = at::full({planes * plane_out}, -1, idx.options().dtype(at::kInt));
  const int64_t total = idx.numel();
  if (total) {
    claim_kernel<<<blocks_for(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        idx.const_data_ptr<int64_t>(), winner.mutable_data_ptr<int>(), total, plane_in, plane_out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return winner;
}

at::Tensor max_unpool2d_cuda(const at::Tensor& input, const at::Tensor& indices, c10::IntArrayRef output_size) {
  TORCH_CHECK(input.dim() >= 2 && indices.sizes() == input.sizes() && indices.scalar_type() == at::kLong &&
                  output_size.size() == 2,
              "aefast::max_unpool2d: indices must be int64 with the input's shape, output_size two ints");
  check_same_device("max_unpool2d", {&input, &indices});
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.contiguous(), idx = indices.contiguous();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 2);
  shape.push_back(output_size[0]);
  shape.push_back(output_size[1]);
  at::Tensor out = at::zeros(shape, x.options());
  const int64_t plane_in = x.size(-2) * x.size(-1), plane_out = output_size[0] * output_size[1];
  const int64_t planes = plane_in ? x.numel() / plane_in : 0, total = x.numel();
  if (total == 0) return out;
  const at::Tensor winner = winners(idx, planes, plane_in, plane_out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "max_unpool2d_cuda", [&] {
    unpool_write_kernel<scalar_t><<<blocks_for(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(), winner.const_data_ptr<int>(),
        out.mutable_data_ptr<scalar_t>(), total, plane_in, plane_out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor max_unpool2d_backward_cuda(const at::Tensor& grad_out, const at::Tensor& indices) {
  TORCH_CHECK(grad_out.dim() >= 2 && indices.dim() == grad_out.dim() && indices.scalar_type() == at::kLong,
              "aefast::max_unpool2d_backward: bad arguments");
  check_same_device("max_unpool2d_backward", {&grad_out, &indices});
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const at::Tensor g = grad_out.contiguous(), idx = indices.contiguous();
  at::Tensor grad_in = at::empty(idx.sizes(), g.options());
  const int64_t plane_in = idx.size(-2) * idx.size(-1), plane_out = g.size(-2) * g.size(-1);
  const int64_t planes = plane_in ? idx.numel() / plane_in : 0, total = idx.numel();
  if (total == 0) return grad_in;
  const at::Tensor winner = winners(idx, planes, plane_in, plane_out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "max_unpool2d_backward_cuda", [&] {
    unpool_grad_kernel<scalar_t><<<blocks_for(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        g.const_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(), winner.const_data_ptr<int>(),
        grad_in.mutable_data_ptr<scalar_t>(), total, plane_in, plane_out);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_in;
}

// first_bad_unpool_index: atomicMin of the positions of invalid entries (an integer minimum,
// independent of the order of the atomics).
template <typename index_t>
__global__ void first_bad_kernel(const index_t* __restrict__ idx, unsigned long long* __restrict__ first,
                                 int64_t total, int64_t hp, int64_t wp, int64_t uh, int64_t uw, int64_t kh,
                                 int64_t kw, bool in_window) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t pw = e % wp, ph = (e / wp) % hp;
    bool ok;
    if constexpr (std::is_same_v<index_t, int64_t>)
      ok = unpool_index_valid_flat(idx[e], ph, pw, uh, uw, kh, kw, in_window);
    else
      ok = unpool_index_valid_window(static_cast<int64_t>(idx[e]), ph, pw, uh, uw, kh, kw);
    if (!ok) atomicMin(first, static_cast<unsigned long long>(e));
  }
}

at::Tensor first_bad_unpool_index_cuda(const at::Tensor& indices, c10::IntArrayRef unpooled_size,
                                       c10::IntArrayRef pool_size, bool in_window) {
  TORCH_CHECK(indices.dim() >= 2 && (indices.scalar_type() == at::kLong || indices.scalar_type() == at::kByte) &&
                  unpooled_size.size() == 2 && pool_size.size() == 2 && pool_size[0] > 0 && pool_size[1] > 0,
              "aefast::first_bad_unpool_index: bad arguments");
  check_same_device("first_bad_unpool_index", {&indices});
  const c10::cuda::CUDAGuard guard(indices.device());
  const at::Tensor idx = indices.contiguous();
  const int64_t none = std::numeric_limits<int64_t>::max();
  at::Tensor first = at::full({}, none, idx.options().dtype(at::kLong));
  const int64_t total = idx.numel();
  if (total) {
    auto* fp = reinterpret_cast<unsigned long long*>(first.mutable_data_ptr<int64_t>());
    auto stream = c10::cuda::getCurrentCUDAStream();
    if (idx.scalar_type() == at::kLong)
      first_bad_kernel<int64_t><<<blocks_for(total), kThreads, 0, stream>>>(
          idx.const_data_ptr<int64_t>(), fp, total, idx.size(-2), idx.size(-1), unpooled_size[0], unpooled_size[1],
          pool_size[0], pool_size[1], in_window);
    else
      first_bad_kernel<uint8_t><<<blocks_for(total), kThreads, 0, stream>>>(
          idx.const_data_ptr<uint8_t>(), fp, total, idx.size(-2), idx.size(-1), unpooled_size[0], unpooled_size[1],
          pool_size[0], pool_size[1], in_window);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return at::where(first == none, at::full({}, -1, first.options()), first);
}

}  // namespace

TORCH_LIBRARY_IMPL(aefast, CUDA, m) {
  m.impl("first_bad_unpool_index", &first_bad_unpool_index_cuda);
  m.impl("unpool_conv_transpose2d", &unpool_conv_transpose2d_cuda);
  m.impl("unpool_conv_transpose2d_backward", &unpool_conv_transpose2d_backward_cuda);
  m.impl("max_unpool2d", &max_unpool2d_cuda);
  m.impl("max_unpool2d_backward", &max_unpool2d_backward_cuda);
}

}  // namespace aefast
