// CUDA kernels of the conv_pool family: the fused encoder block and the drop-in max_pool2d.
// Same math as csrc/cpu/conv_pool.cpp (derivations there and in aefast/ops/conv_pool.py).
//
// forward      one thread per pooled output (n, co, i, j): for each window offset it computes
//              z = b[co] + sum_{ci,ki,kj} w * x directly (accumulation type), rounds z and act(z)
//              to the tensor dtype where eager rounds them, and keeps torch's running max
//              (`v > best || isnan(v)`). Writes the pooled value, the uint8 window offset and z
//              at the argmax: nothing at conv resolution.
// gz           gz = grad_pooled * act'(z_argmax), pooled-size, in the accumulation type.
// dgrad        one thread per pooled element with gz != 0 scatters gz * w[co, :] onto its
//              receptive field (atomicAdd into an accumulation-type buffer): only the argmax
//              positions, 1/(PKH*PKW) of the dense MACs.
// wgrad/bgrad  one block per (co, k): grad_w[co, k] = sum_{n,i,j} gz * x[n, patch(k)], a block
//              reduction over the pooled positions (deterministic, no atomics); one block per co
//              for grad_b = sum gz.
// corruption   forward and wgrad read corrupt(x) (aefast/corruption.h: the element function of
//              aefast::corrupt, keyed by the logical NCHW index) in place of x, so the conv sees
//              the corrupted input and no corrupted copy is stored; padding stays 0.
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

namespace aefast {
namespace {

constexpr int kThreads = 256;

struct Geo {
  int64_t N, Cin, H, W, Cout, KH, KW, SH, SW, PH, PW, PKH, PKW, HO, WO;
};

Geo make_geo(int64_t N, int64_t Cin, int64_t H, int64_t W, int64_t Cout, int64_t KH, int64_t KW,
             c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef pool) {
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && pool.size() == 2,
              "aefast::conv_pool2d: stride, padding and pool_size need two entries each");
  TORCH_CHECK(stride[0] > 0 && stride[1] > 0 && padding[0] >= 0 && padding[1] >= 0 && pool[0] > 0 && pool[1] > 0 &&
                  pool[0] * pool[1] <= 255,
              "aefast::conv_pool2d: invalid stride, padding or pool_size");
  const int64_t HC = (H + 2 * padding[0] - KH) / stride[0] + 1, WC = (W + 2 * padding[1] - KW) / stride[1] + 1;
  TORCH_CHECK(H + 2 * padding[0] >= KH && W + 2 * padding[1] >= KW && HC >= pool[0] && WC >= pool[1],
              "aefast::conv_pool2d: the conv output is empty or smaller than the pool window");
  return Geo{N, Cin, H, W, Cout, KH, KW, stride[0], stride[1], padding[0], padding[1], pool[0], pool[1],
             HC / pool[0], WC / pool[1]};
}

int blocks_for(int64_t n) { return static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 1 << 30)); }

template <typename scalar_t, typename acc_t>
__global__ void conv_pool_forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ w,
                                         const scalar_t* __restrict__ b, Geo g, int act, acc_t slope,
                                         ElementCorruption<scalar_t, acc_t> noise, scalar_t* __restrict__ pooled,
                                         uint8_t* __restrict__ window, scalar_t* __restrict__ preact) {
  const int64_t total = g.N * g.Cout * g.HO * g.WO;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t pc = e % g.WO, pr = (e / g.WO) % g.HO, co = (e / (g.WO * g.HO)) % g.Cout,
                  n = e / (g.WO * g.HO * g.Cout);
    const acc_t bias = b != nullptr ? static_cast<acc_t>(b[co]) : acc_t(0);
    acc_t best = -std::numeric_limits<acc_t>::infinity(), best_z = 0;
    int best_k = 0;
    for (int64_t i = 0; i < g.PKH; ++i) {
      for (int64_t j = 0; j < g.PKW; ++j) {
        const int64_t y0 = (pr * g.PKH + i) * g.SH - g.PH, x0 = (pc * g.PKW + j) * g.SW - g.PW;
        acc_t acc = 0;
        for (int64_t ci = 0; ci < g.Cin; ++ci) {
          const scalar_t* xp = x + (n * g.Cin + ci) * g.H * g.W;
          const scalar_t* wp = w + (co * g.Cin + ci) * g.KH * g.KW;
          for (int64_t ki = 0; ki < g.KH; ++ki) {
            const int64_t y = y0 + ki;
            if (y < 0 || y >= g.H) continue;
            for (int64_t kj = 0; kj < g.KW; ++kj) {
              const int64_t xx = x0 + kj;
              if (xx < 0 || xx >= g.W) continue;
              const int64_t xi = y * g.W + xx;
              const scalar_t xv = noise.active() ? noise(xp[xi], static_cast<uint64_t>((n * g.Cin + ci) * g.H * g.W + xi))
                                                 : xp[xi];
              acc += static_cast<acc_t>(xv) * static_cast<acc_t>(wp[ki * g.KW + kj]);
            }
          }
        }
        const acc_t z = static_cast<acc_t>(static_cast<scalar_t>(acc + bias));
        const acc_t a = static_cast<acc_t>(static_cast<scalar_t>(activate<acc_t>(z, act, slope)));
        if (pool_takes(a, best)) {
          best = a;
          best_z = z;
          best_k = static_cast<int>(i * g.PKW + j);
        }
      }
    }
    pooled[e] = static_cast<scalar_t>(best);
    window[e] = static_cast<uint8_t>(best_k);
    preact[e] = static_cast<scalar_t>(best_z);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void conv_grad_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ preact, int64_t n,
                                 int act, acc_t slope, acc_t* __restrict__ gz) {
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x)
    gz[e] = static_cast<acc_t>(grad[e]) * activation_grad<acc_t>(static_cast<acc_t>(preact[e]), act, slope);
}

template <typename scalar_t, typename acc_t>
__global__ void dgrad_kernel(const acc_t* __restrict__ gz, const uint8_t* __restrict__ window,
                             const scalar_t* __restrict__ w, Geo g, acc_t* __restrict__ gx) {
  const int64_t total = g.N * g.Cout * g.HO * g.WO;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
    const acc_t v = gz[e];
    if (v == acc_t(0)) continue;
    const int64_t pc = e % g.WO, pr = (e / g.WO) % g.HO, co = (e / (g.WO * g.HO)) % g.Cout,
                  n = e / (g.WO * g.HO * g.Cout);
    const int off = window[e];
    const int64_t y0 = (pr * g.PKH + off / g.PKW) * g.SH - g.PH, x0 = (pc * g.PKW + off % g.PKW) * g.SW - g.PW;
    for (int64_t ci = 0; ci < g.Cin; ++ci) {
      acc_t* gp = gx + (n * g.Cin + ci) * g.H * g.W;
      const scalar_t* wp = w + (co * g.Cin + ci) * g.KH * g.KW;
      for (int64_t ki = 0; ki < g.KH; ++ki) {
        const int64_t y = y0 + ki;
        if (y < 0 || y >= g.H) continue;
        for (int64_t kj = 0; kj < g.KW; ++kj) {
          const int64_t xx = x0 + kj;
          if (xx < 0 || xx >= g.W) continue;
          atomicAdd(gp + y * g.W + xx, v * static_cast<acc_t>(wp[ki * g.KW + kj]));
        }
      }
    }
  }
}

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

// blockIdx.x = co * K + k (k = (ci*KH + ki)*KW + kj); blockIdx.x >= Cout*K: the bias of co = that - Cout*K.
template <typename scalar_t, typename acc_t>
__global__ void wgrad_kernel(const acc_t* __restrict__ gz, const uint8_t* __restrict__ window,
                             const scalar_t* __restrict__ x, Geo g, ElementCorruption<scalar_t, acc_t> noise,
                             acc_t* __restrict__ gw, acc_t* __restrict__ gb) {
  const int64_t K = g.Cin * g.KH * g.KW, plane = g.HO * g.WO;
  const int64_t id = blockIdx.x;
  const bool is_bias = id >= g.Cout * K;
  const int64_t co = is_bias ? id - g.Cout * K : id / K, k = is_bias ? 0 : id % K;
  const int64_t kj = k % g.KW, ki = (k / g.KW) % g.KH, ci = k / (g.KW * g.KH);
  acc_t sum = 0;
  for (int64_t t = threadIdx.x; t < g.N * plane; t += blockDim.x) {
    const int64_t n = t / plane, jp = t % plane;
    const int64_t e = (n * g.Cout + co) * plane + jp;
    const acc_t v = gz[e];
    if (is_bias) {
      sum += v;
      continue;
    }
    if (v == acc_t(0)) continue;
    const int off = window[e];
    const int64_t y = ((jp / g.WO) * g.PKH + off / g.PKW) * g.SH - g.PH + ki;
    const int64_t xx = ((jp % g.WO) * g.PKW + off % g.PKW) * g.SW - g.PW + kj;
    if (y < 0 || y >= g.H || xx < 0 || xx >= g.W) continue;
    const int64_t xi = ((n * g.Cin + ci) * g.H + y) * g.W + xx;
    sum += v * static_cast<acc_t>(noise.active() ? noise(x[xi], static_cast<uint64_t>(xi)) : x[xi]);
  }
  const acc_t total = block_sum<acc_t>(sum);
  if (threadIdx.x == 0) {
    if (is_bias)
      gb[co] = total;
    else
      gw[co * K + k] = total;
  }
}

void check_act(int64_t act) {
  TORCH_CHECK(act >= 0 && act < kNumActivations, "aefast::conv_pool2d: unknown activation code ", act);
}

int corruption_code(c10::string_view kind) {
  const int code = corruption_kind_code(std::string_view(kind.data(), kind.size()));
  TORCH_CHECK(code != -2, "aefast::conv_pool2d: unknown corruption '", std::string(kind.data(), kind.size()),
              "' (none, gaussian, masking, salt_pepper)");
  return code;
}

template <typename scalar_t, typename acc_t>
ElementCorruption<scalar_t, acc_t> make_noise(int code, int64_t seed, double level, double low, double high) {
  return code == kNoCorruption ? ElementCorruption<scalar_t, acc_t>()
                               : ElementCorruption<scalar_t, acc_t>(code, seed, level, low, high);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_pool2d_forward_cuda(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias, c10::IntArrayRef stride,
    c10::IntArrayRef padding, int64_t activation, double negative_slope, c10::IntArrayRef pool_size,
    c10::string_view corruption, double corruption_level, int64_t seed, double low, double high) {
  const int noise_code = corruption_code(corruption);
  TORCH_CHECK(input.dim() == 4 && weight.dim() == 4 && input.size(1) == weight.size(1) &&
                  input.scalar_type() == weight.scalar_type(),
              "aefast::conv_pool2d_forward: input/weight shapes or dtypes do not match");
  check_act(activation);
  c10::cuda::CUDAGuard guard(input.device());
  const Geo g = make_geo(input.size(0), input.size(1), input.size(2), input.size(3), weight.size(0), weight.size(2),
                         weight.size(3), stride, padding, pool_size);
  const at::Tensor x = input.contiguous(), w = weight.contiguous();
  const bool has_bias = bias.has_value() && bias->defined();
  const at::Tensor b = has_bias ? bias->contiguous() : at::Tensor();
  at::Tensor pooled = at::empty({g.N, g.Cout, g.HO, g.WO}, input.options());
  at::Tensor window = at::empty({g.N, g.Cout, g.HO, g.WO}, input.options().dtype(at::kByte));
  at::Tensor preact = at::empty({g.N, g.Cout, g.HO, g.WO}, input.options());
  if (pooled.numel() == 0) return {pooled, window, preact};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv_pool2d_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    conv_pool_forward_kernel<scalar_t, acc_t><<<blocks_for(pooled.numel()), kThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(), has_bias ? b.const_data_ptr<scalar_t>() : nullptr,
        g, static_cast<int>(activation), static_cast<acc_t>(negative_slope),
        make_noise<scalar_t, acc_t>(noise_code, seed, corruption_level, low, high), pooled.mutable_data_ptr<scalar_t>(),
        window.mutable_data_ptr<uint8_t>(), preact.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {pooled, window, preact};
}

at::Tensor conv_grad_at_argmax(const at::Tensor& grad, const at::Tensor& preact, int64_t activation,
                               double negative_slope) {
  const at::Tensor gr = grad.contiguous(), z = preact.contiguous();
  const auto acc_type = gr.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor gz = at::empty(gr.sizes(), gr.options().dtype(acc_type));
  if (gz.numel() == 0) return gz;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gr.scalar_type(), "conv_pool2d_grad_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    conv_grad_kernel<scalar_t, acc_t><<<blocks_for(gz.numel()), kThreads, 0, stream>>>(
        gr.const_data_ptr<scalar_t>(), z.const_data_ptr<scalar_t>(), gz.numel(), static_cast<int>(activation),
        static_cast<acc_t>(negative_slope), gz.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return gz;
}

at::Tensor conv_pool2d_backward_input_cuda(const at::Tensor& grad, const at::Tensor& window, const at::Tensor& preact,
                                           const at::Tensor& weight, c10::IntArrayRef input_size,
                                           c10::IntArrayRef stride, c10::IntArrayRef padding, int64_t activation,
                                           double negative_slope, c10::IntArrayRef pool_size) {
  TORCH_CHECK(grad.dim() == 4 && grad.sizes() == window.sizes() && grad.sizes() == preact.sizes() &&
                  window.scalar_type() == at::kByte && input_size.size() == 2 && weight.dim() == 4,
              "aefast::conv_pool2d_backward_input: bad arguments");
  check_act(activation);
  c10::cuda::CUDAGuard guard(grad.device());
  const Geo g = make_geo(grad.size(0), weight.size(1), input_size[0], input_size[1], weight.size(0), weight.size(2),
                         weight.size(3), stride, padding, pool_size);
  TORCH_CHECK(grad.size(1) == g.Cout && grad.size(2) == g.HO && grad.size(3) == g.WO,
              "aefast::conv_pool2d_backward_input: grad shape does not match the conv geometry");
  const at::Tensor gz = conv_grad_at_argmax(grad, preact, activation, negative_slope);
  at::Tensor gx = at::zeros({g.N, g.Cin, g.H, g.W}, gz.options());
  const at::Tensor win = window.contiguous(), w = weight.contiguous();
  if (gz.numel() > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, w.scalar_type(), "conv_pool2d_dgrad_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      dgrad_kernel<scalar_t, acc_t><<<blocks_for(gz.numel()), kThreads, 0, stream>>>(
          gz.const_data_ptr<acc_t>(), win.const_data_ptr<uint8_t>(), w.const_data_ptr<scalar_t>(), g,
          gx.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return gx.to(grad.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> conv_pool2d_backward_weight_cuda(
    const at::Tensor& grad, const at::Tensor& window, const at::Tensor& preact, const at::Tensor& input,
    c10::IntArrayRef kernel_size, c10::IntArrayRef stride, c10::IntArrayRef padding, int64_t activation,
    double negative_slope, c10::IntArrayRef pool_size, c10::string_view corruption, double corruption_level,
    int64_t seed, double low, double high) {
  const int noise_code = corruption_code(corruption);
  TORCH_CHECK(grad.dim() == 4 && grad.sizes() == window.sizes() && grad.sizes() == preact.sizes() &&
                  window.scalar_type() == at::kByte && kernel_size.size() == 2 && input.dim() == 4,
              "aefast::conv_pool2d_backward_weight: bad arguments");
  check_act(activation);
  c10::cuda::CUDAGuard guard(grad.device());
  const Geo g = make_geo(input.size(0), input.size(1), input.size(2), input.size(3), grad.size(1), kernel_size[0],
                         kernel_size[1], stride, padding, pool_size);
  TORCH_CHECK(grad.size(0) == g.N && grad.size(2) == g.HO && grad.size(3) == g.WO,
              "aefast::conv_pool2d_backward_weight: grad shape does not match the conv geometry");
  const at::Tensor gz = conv_grad_at_argmax(grad, preact, activation, negative_slope);
  const int64_t K = g.Cin * g.KH * g.KW;
  at::Tensor gw = at::zeros({g.Cout, g.Cin, g.KH, g.KW}, gz.options());
  at::Tensor gb = at::zeros({g.Cout}, gz.options());
  const at::Tensor win = window.contiguous(), x = input.contiguous();
  if (g.Cout > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv_pool2d_wgrad_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      wgrad_kernel<scalar_t, acc_t><<<static_cast<unsigned>(g.Cout * (K + 1)), kThreads, 0, stream>>>(
          gz.const_data_ptr<acc_t>(), win.const_data_ptr<uint8_t>(), x.const_data_ptr<scalar_t>(), g,
          make_noise<scalar_t, acc_t>(noise_code, seed, corruption_level, low, high), gw.mutable_data_ptr<acc_t>(),
          gb.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {gw.to(grad.scalar_type()), gb.to(grad.scalar_type())};
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

template <typename scalar_t, typename acc_t>
__global__ void max_pool_backward_kernel(const scalar_t* __restrict__ g, const int64_t* __restrict__ idx, PoolArgs a,
                                         acc_t* __restrict__ gx) {
  const int64_t total = a.N * a.C * a.OH * a.OW;
  for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
    const int64_t ow = e % a.OW, oh = (e / a.OW) % a.OH, c = (e / (a.OW * a.OH)) % a.C, n = e / (a.OW * a.OH * a.C);
    const int64_t k = idx[n * a.xs[0] + c * a.xs[1] + oh * a.xs[2] + ow * a.xs[3]];
    if (k < 0 || k >= a.H * a.W) continue;
    atomicAdd(gx + (n * a.C + c) * a.H * a.W + k,
              static_cast<acc_t>(g[n * a.os[0] + c * a.os[1] + oh * a.os[2] + ow * a.os[3]]));
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

at::Tensor max_pool2d_backward_cuda(const at::Tensor& grad_output, const at::Tensor& indices, const at::Tensor& input) {
  TORCH_CHECK(grad_output.dim() == 4 && indices.sizes() == grad_output.sizes() && indices.scalar_type() == at::kLong &&
                  input.dim() == 4,
              "aefast::max_pool2d_backward: bad arguments");
  c10::cuda::CUDAGuard guard(grad_output.device());
  PoolArgs a{input.size(0), input.size(1), input.size(2), input.size(3), grad_output.size(2), grad_output.size(3),
             0, 0, 0, 0, 0, 0, 0, 0, {}, {}};
  for (int d = 0; d < 4; ++d) {
    a.xs[d] = indices.stride(d);  // the backward reads indices through xs and grad_output through os
    a.os[d] = grad_output.stride(d);
  }
  const auto acc_type = grad_output.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor gx = at::zeros({a.N, a.C, a.H, a.W}, grad_output.options().dtype(acc_type));
  if (grad_output.numel() > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(), "max_pool2d_backward_cuda",
                                    [&] {
                                      using acc_t = at::opmath_type<scalar_t>;
                                      max_pool_backward_kernel<scalar_t, acc_t>
                                          <<<blocks_for(grad_output.numel()), kThreads, 0, stream>>>(
                                              grad_output.const_data_ptr<scalar_t>(),
                                              indices.const_data_ptr<int64_t>(), a, gx.mutable_data_ptr<acc_t>());
                                      C10_CUDA_KERNEL_LAUNCH_CHECK();
                                    });
  }
  return gx.to(grad_output.scalar_type()).contiguous(input.suggest_memory_format());
}

}  // namespace

// Both gradients: the two kernels above, one after the other (each computes gz itself; on the
// GPU that pass is cheap next to the launches it would save).
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_pool2d_backward_cuda(
    const at::Tensor& grad, const at::Tensor& window, const at::Tensor& preact, const at::Tensor& input,
    const at::Tensor& weight, c10::IntArrayRef stride, c10::IntArrayRef padding, int64_t activation,
    double negative_slope, c10::IntArrayRef pool_size, c10::string_view corruption, double corruption_level,
    int64_t seed, double low, double high) {
  TORCH_CHECK(input.dim() == 4 && weight.dim() == 4, "aefast::conv_pool2d_backward: input and weight must be 4-D");
  const int64_t input_size[2] = {input.size(2), input.size(3)};
  const int64_t kernel_size[2] = {weight.size(2), weight.size(3)};
  at::Tensor grad_input = conv_pool2d_backward_input_cuda(grad, window, preact, weight, input_size, stride, padding,
                                                          activation, negative_slope, pool_size);
  auto [grad_weight, grad_bias] = conv_pool2d_backward_weight_cuda(grad, window, preact, input, kernel_size, stride,
                                                                   padding, activation, negative_slope, pool_size,
                                                                   corruption, corruption_level, seed, low, high);
  return {grad_input, grad_weight, grad_bias};
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
