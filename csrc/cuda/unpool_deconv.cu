// CUDA kernels of the unpool_deconv family: the fused decoder
//   out = act(conv_transpose2d(max_unpool2d(z, idx, pool), W, b, stride, padding, output_padding))
// and the drop-in max_unpool2d, forward and backward. Formulas: csrc/cpu/unpool_deconv.cpp.
//
// Every kernel is a gather in which one thread (or one block, for reductions) owns each output
// and sums in a fixed order, so results are bitwise reproducible without a deterministic mode:
// * forward, one thread per output (n, co, oy, ox): for each tap (kh, kw) the only unpooled
//   position reaching it is h = (oy + padh - kh) / sh (if divisible), w likewise; channel ci
//   contributes z * W[ci, co, kh, kw] iff its argmax in window (h / pool_h, w / pool_w) is (h, w);
// * grad_input, one thread per pooled value: gpre gathered over the footprint of its position;
// * grad_weight, one block per weight element, grad_bias one block per channel: per-thread
//   strided sums then a fixed shared-memory tree (same blockDim every launch);
// * max_unpool2d: an integer atomicMax elects the last pooled position naming each element
//   (the max is order-free), and only that position writes / receives the gradient.
// Indices are validated in Python before launch (range and own window), so kernels never
// assert; a stray index is clamped away by the bounds masks below rather than trapping.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>
#include <optional>

#include "aefast/unpool_deconv.h"
#include "aefast/unpool_deconv_args.h"

namespace aefast {
namespace {

constexpr int kThreads = 256;

int64_t blocks_for(int64_t total) {
  return std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads, 65535LL * 16));
}

template <typename index_t>
__device__ __forceinline__ int64_t expected_index(int64_t h, int64_t w, int64_t ph, int64_t pw,
                                                  const DecoderGeometry& g) {
  if constexpr (std::is_same_v<index_t, int64_t>) {
    return h * g.unpooled_w + w;
  } else {
    return (h - ph * g.pool_h) * g.pool_w + (w - pw * g.pool_w);
  }
}

template <typename index_t>
__device__ __forceinline__ void position_of(index_t raw, int64_t ph, int64_t pw, const DecoderGeometry& g, int64_t& h,
                                            int64_t& w) {
  if constexpr (std::is_same_v<index_t, int64_t>) {
    unpooled_position_flat(raw, g.unpooled_w, h, w);
  } else {
    unpooled_position_window(static_cast<int64_t>(raw), ph, pw, g.pool_h, g.pool_w, h, w);
  }
}

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void forward_kernel(const scalar_t* __restrict__ z, const index_t* __restrict__ idx,
                               const scalar_t* __restrict__ weight, const scalar_t* __restrict__ bias,
                               scalar_t* __restrict__ out, scalar_t* __restrict__ pre, int64_t total,
                               DecoderGeometry g, DecoderAct act, acc_t slope) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t ox = e % g.out_w;
    const int64_t oy = (e / g.out_w) % g.out_h;
    const int64_t co = (e / (g.out_w * g.out_h)) % g.c_out;
    const int64_t n = e / (g.out_w * g.out_h * g.c_out);
    acc_t acc = bias ? static_cast<acc_t>(bias[co]) : acc_t(0);
    for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
      const int64_t hn = oy + g.pad_h - kh;
      if (hn < 0 || hn % g.stride_h) continue;
      const int64_t h = hn / g.stride_h, ph = h / g.pool_h;
      if (h >= g.unpooled_h || ph >= g.pooled_h) continue;
      for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
        const int64_t wn = ox + g.pad_w - kw;
        if (wn < 0 || wn % g.stride_w) continue;
        const int64_t w = wn / g.stride_w, pw = w / g.pool_w;
        if (w >= g.unpooled_w || pw >= g.pooled_w) continue;
        const int64_t want = expected_index<index_t>(h, w, ph, pw, g);
        for (int64_t ci = 0; ci < g.c_in; ++ci) {
          const int64_t k = ((n * g.c_in + ci) * g.pooled_h + ph) * g.pooled_w + pw;
          if (static_cast<int64_t>(idx[k]) == want)
            acc += static_cast<acc_t>(z[k]) *
                   static_cast<acc_t>(weight[((ci * g.c_out + co) * g.kernel_h + kh) * g.kernel_w + kw]);
        }
      }
    }
    if (pre) pre[e] = static_cast<scalar_t>(acc);
    out[e] = static_cast<scalar_t>(act_forward<acc_t>(acc, act, slope));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void gpre_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ act_in,
                            acc_t* __restrict__ gpre, int64_t total, DecoderAct act, acc_t slope) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x)
    gpre[e] = static_cast<acc_t>(grad_out[e]) * act_derivative<acc_t>(static_cast<acc_t>(act_in[e]), act, slope);
}

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void grad_input_kernel(const acc_t* __restrict__ gpre, const index_t* __restrict__ idx,
                                  const scalar_t* __restrict__ weight, scalar_t* __restrict__ grad_z, int64_t total,
                                  DecoderGeometry g) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t pw = e % g.pooled_w;
    const int64_t ph = (e / g.pooled_w) % g.pooled_h;
    const int64_t ci = (e / (g.pooled_w * g.pooled_h)) % g.c_in;
    const int64_t n = e / (g.pooled_w * g.pooled_h * g.c_in);
    int64_t h, w;
    position_of<index_t>(idx[e], ph, pw, g, h, w);
    acc_t acc = 0;
    for (int64_t co = 0; co < g.c_out; ++co)
      for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
        const int64_t oy = h * g.stride_h - g.pad_h + kh;
        if (oy < 0 || oy >= g.out_h) continue;
        for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
          const int64_t ox = w * g.stride_w - g.pad_w + kw;
          if (ox < 0 || ox >= g.out_w) continue;
          acc += gpre[((n * g.c_out + co) * g.out_h + oy) * g.out_w + ox] *
                 static_cast<acc_t>(weight[((ci * g.c_out + co) * g.kernel_h + kh) * g.kernel_w + kw]);
        }
      }
    grad_z[e] = static_cast<scalar_t>(acc);
  }
}

// Fixed-shape tree reduction of one value per thread (blockDim.x == kThreads).
template <typename acc_t>
__device__ acc_t block_sum(acc_t v) {
  __shared__ acc_t buf[kThreads];
  buf[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) buf[threadIdx.x] += buf[threadIdx.x + s];
    __syncthreads();
  }
  return buf[0];
}

template <typename scalar_t, typename acc_t, typename index_t>
__global__ void grad_weight_kernel(const acc_t* __restrict__ gpre, const index_t* __restrict__ idx,
                                   const scalar_t* __restrict__ z, scalar_t* __restrict__ grad_w, DecoderGeometry g) {
  const int64_t widx = blockIdx.x;
  const int64_t kw = widx % g.kernel_w;
  const int64_t kh = (widx / g.kernel_w) % g.kernel_h;
  const int64_t co = (widx / (g.kernel_w * g.kernel_h)) % g.c_out;
  const int64_t ci = widx / (g.kernel_w * g.kernel_h * g.c_out);
  const int64_t plane = g.pooled_h * g.pooled_w, count = g.n * plane;
  acc_t acc = 0;
  for (int64_t r = threadIdx.x; r < count; r += blockDim.x) {
    const int64_t n = r / plane, p = r - n * plane;
    const int64_t ph = p / g.pooled_w, pw = p - ph * g.pooled_w;
    const int64_t k = (n * g.c_in + ci) * plane + p;
    int64_t h, w;
    position_of<index_t>(idx[k], ph, pw, g, h, w);
    const int64_t oy = h * g.stride_h - g.pad_h + kh, ox = w * g.stride_w - g.pad_w + kw;
    if (oy < 0 || oy >= g.out_h || ox < 0 || ox >= g.out_w) continue;
    acc += static_cast<acc_t>(z[k]) * gpre[((n * g.c_out + co) * g.out_h + oy) * g.out_w + ox];
  }
  const acc_t total = block_sum(acc);
  if (threadIdx.x == 0) grad_w[widx] = static_cast<scalar_t>(total);
}

template <typename scalar_t, typename acc_t>
__global__ void grad_bias_kernel(const acc_t* __restrict__ gpre, scalar_t* __restrict__ grad_b, DecoderGeometry g) {
  const int64_t co = blockIdx.x, plane = g.out_h * g.out_w, count = g.n * plane;
  acc_t acc = 0;
  for (int64_t r = threadIdx.x; r < count; r += blockDim.x) {
    const int64_t n = r / plane, p = r - n * plane;
    acc += gpre[(n * g.c_out + co) * plane + p];
  }
  const acc_t total = block_sum(acc);
  if (threadIdx.x == 0) grad_b[co] = static_cast<scalar_t>(total);
}

std::tuple<at::Tensor, at::Tensor> unpool_conv_transpose2d_cuda(
    const at::Tensor& input, const at::Tensor& indices, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    c10::IntArrayRef pool_size, c10::IntArrayRef unpooled_size, c10::IntArrayRef stride, c10::IntArrayRef padding,
    c10::IntArrayRef output_padding, std::optional<c10::string_view> activation, double negative_slope) {
  const DecoderGeometry g =
      decoder_geometry(input, indices, weight, pool_size, unpooled_size, stride, padding, output_padding);
  const DecoderAct act = parse_activation(activation);
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(), "aefast::unpool_conv_transpose2d: dtype mismatch");
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor z = input.contiguous(), idx = indices.contiguous(), w = weight.contiguous();
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  at::Tensor out = at::empty({g.n, g.c_out, g.out_h, g.out_w}, input.options());
  at::Tensor pre = act_needs_preactivation(act) ? at::empty_like(out) : at::empty({0}, input.options());
  const int64_t total = out.numel();
  if (total == 0) return {out, pre};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "unpool_conv_transpose2d_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* bp = has_bias ? b.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* pp = pre.numel() ? pre.mutable_data_ptr<scalar_t>() : nullptr;
    if (idx.scalar_type() == at::kLong)
      forward_kernel<scalar_t, acc_t, int64_t><<<blocks_for(total), kThreads, 0, stream>>>(
          z.const_data_ptr<scalar_t>(), idx.const_data_ptr<int64_t>(), w.const_data_ptr<scalar_t>(), bp,
          out.mutable_data_ptr<scalar_t>(), pp, total, g, act, static_cast<acc_t>(negative_slope));
    else
      forward_kernel<scalar_t, acc_t, uint8_t><<<blocks_for(total), kThreads, 0, stream>>>(
          z.const_data_ptr<scalar_t>(), idx.const_data_ptr<uint8_t>(), w.const_data_ptr<scalar_t>(), bp,
          out.mutable_data_ptr<scalar_t>(), pp, total, g, act, static_cast<acc_t>(negative_slope));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, pre};
}

template <typename scalar_t, typename index_t>
void backward_launch(const at::Tensor& gpre, const at::Tensor& z, const at::Tensor& idx, const at::Tensor& w,
                     const DecoderGeometry& g, std::array<bool, 3> mask, at::Tensor& grad_z, at::Tensor& grad_w,
                     at::Tensor& grad_b) {
  using acc_t = at::opmath_type<scalar_t>;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const acc_t* gp = gpre.const_data_ptr<acc_t>();
  if (mask[0] && z.numel()) {
    grad_input_kernel<scalar_t, acc_t, index_t><<<blocks_for(z.numel()), kThreads, 0, stream>>>(
        gp, idx.const_data_ptr<index_t>(), w.const_data_ptr<scalar_t>(), grad_z.mutable_data_ptr<scalar_t>(),
        z.numel(), g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (mask[1] && w.numel()) {
    grad_weight_kernel<scalar_t, acc_t, index_t><<<w.numel(), kThreads, 0, stream>>>(
        gp, idx.const_data_ptr<index_t>(), z.const_data_ptr<scalar_t>(), grad_w.mutable_data_ptr<scalar_t>(), g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (mask[2] && g.c_out) {
    grad_bias_kernel<scalar_t, acc_t><<<g.c_out, kThreads, 0, stream>>>(gp, grad_b.mutable_data_ptr<scalar_t>(), g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> unpool_conv_transpose2d_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& act_input, const at::Tensor& input, const at::Tensor& indices,
    const at::Tensor& weight, c10::IntArrayRef pool_size, c10::IntArrayRef unpooled_size, c10::IntArrayRef stride,
    c10::IntArrayRef padding, c10::IntArrayRef output_padding, std::optional<c10::string_view> activation,
    double negative_slope, std::array<bool, 3> output_mask) {
  const DecoderGeometry g =
      decoder_geometry(input, indices, weight, pool_size, unpooled_size, stride, padding, output_padding);
  const DecoderAct act = parse_activation(activation);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({g.n, g.c_out, g.out_h, g.out_w}) &&
                  act_input.sizes() == grad_out.sizes(),
              "aefast::unpool_conv_transpose2d_backward: grad_out / act_input have the wrong shape");
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor go = grad_out.contiguous().to(input.scalar_type()), ai = act_input.contiguous();
  const at::Tensor z = input.contiguous(), idx = indices.contiguous(), w = weight.contiguous();
  at::Tensor grad_z = at::zeros_like(z), grad_w = at::zeros_like(w);
  at::Tensor grad_b = at::zeros({g.c_out}, input.options());
  const at::ScalarType acc_type = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor gpre = at::empty(go.sizes(), input.options().dtype(acc_type));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "unpool_conv_transpose2d_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t total = go.numel();
    if (total) {
      gpre_kernel<scalar_t, acc_t><<<blocks_for(total), kThreads, 0, stream>>>(
          go.const_data_ptr<scalar_t>(), ai.const_data_ptr<scalar_t>(), gpre.mutable_data_ptr<acc_t>(), total, act,
          static_cast<acc_t>(negative_slope));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (idx.scalar_type() == at::kLong)
      backward_launch<scalar_t, int64_t>(gpre, z, idx, w, g, output_mask, grad_z, grad_w, grad_b);
    else
      backward_launch<scalar_t, uint8_t>(gpre, z, idx, w, g, output_mask, grad_z, grad_w, grad_b);
  });
  return {grad_z, grad_w, grad_b};
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
