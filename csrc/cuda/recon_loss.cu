// CUDA kernels of the recon_loss family. Math: csrc/include/aefast/recon_loss.h (losses) and
// csrc/include/aefast/philox.h (noise); the plan (rows x cols view, scales) is the CPU one.
//
// Loss, stage 1: each block owns one fixed chunk of one row (kThreads * VEC * kItems
// elements), loads it with 16-byte vector loads when the row and the pointers allow it,
// writes the scaled gradients (and the loss for reduction none) in the same pass, and
// reduces its loss values in registers -> warp shuffles -> shared memory, in a fixed order.
// Blocks walk the chunks grid-stride. Stage 2 sums each row's chunk partials in a fixed
// order. No atomics anywhere, so every result is bit-reproducible run to run.
// The gradients are written in acc_t (fp32 for fp16/bf16 inputs): loss_grad_scale multiplies
// them by grad_output and rounds once (saved_grad_dtype in aefast/recon_loss_host.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "aefast/philox.h"
#include "aefast/recon_loss.h"
#include "aefast/recon_loss_host.h"
#include "aefast/torch_utils.h"

namespace aefast {
namespace {

constexpr int kThreads = 256;
constexpr int kItems = 4;  // vectors per thread per chunk

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

int64_t grid_limit(const at::Tensor& t) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, t.get_device()));
  return static_cast<int64_t>(sms) * 8;  // enough resident blocks to cover memory latency
}

template <typename acc_t>
__device__ acc_t block_sum(acc_t v, acc_t* shared) {
  // Fixed-order tree: shuffles within each warp, then warp 0 folds the warp sums.
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  acc_t s = 0;
  if (warp == 0) {
    s = lane < (kThreads / 32) ? shared[lane] : acc_t(0);
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffffu, s, off);
  }
  __syncthreads();  // shared is reused by the next chunk
  return s;         // valid in thread 0
}

template <typename scalar_t, typename acc_t, int KIND, bool HAS_W>
__device__ __forceinline__ acc_t one_element(const scalar_t* x, const scalar_t* t, const scalar_t* w,
                                             const scalar_t* pw, scalar_t* loss, acc_t* gx, acc_t* gt,
                                             int64_t i, acc_t delta, acc_t gscale) {
  acc_t l, dx, dt;
  const acc_t pwv = pw ? static_cast<acc_t>(pw[i]) : acc_t(1);
  loss_elem<KIND, acc_t>(static_cast<acc_t>(x[i]), static_cast<acc_t>(t[i]), pwv, delta, l, dx, dt);
  if constexpr (HAS_W) {
    const acc_t wv = static_cast<acc_t>(w[i]);
    l *= wv;
    dx *= wv;
    dt *= wv;
  }
  if (gx) gx[i] = dx * gscale;
  if (gt) gt[i] = dt * gscale;
  if (loss) loss[i] = static_cast<scalar_t>(l);
  return l;
}

template <typename scalar_t, typename acc_t, int KIND, bool HAS_W, int VEC>
__global__ void __launch_bounds__(kThreads)
    loss_fwd_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ t, const scalar_t* __restrict__ w,
                    const scalar_t* __restrict__ pw, scalar_t* __restrict__ loss, acc_t* __restrict__ gx,
                    acc_t* __restrict__ gt, acc_t* __restrict__ partial, int64_t rows, int64_t cols,
                    int64_t chunks, acc_t delta, acc_t gscale) {
  using P = Pack<scalar_t, VEC>;
  using G = Pack<acc_t, VEC>;  // VEC gradients: 16 bytes (fp32) or 32 (fp16/bf16 -> fp32, two stores)
  constexpr int64_t kChunk = static_cast<int64_t>(kThreads) * VEC * kItems;
  __shared__ acc_t shared[kThreads / 32];
  for (int64_t id = blockIdx.x; id < rows * chunks; id += gridDim.x) {
    const int64_t r = id / chunks, c = id - r * chunks;
    const int64_t base = r * cols + c * kChunk;
    const int64_t n = min(kChunk, cols - c * kChunk);
    acc_t sum = 0;
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int64_t j = (static_cast<int64_t>(k) * kThreads + threadIdx.x) * VEC;
      if (j + VEC <= n) {
        const int64_t i = base + j;  // VEC-aligned: cols % VEC == 0 and aligned pointers (host checks)
        const P xv = *reinterpret_cast<const P*>(x + i);
        const P tv = *reinterpret_cast<const P*>(t + i);
        P wv, pv, lv;
        G gxv, gtv;
        if constexpr (HAS_W) wv = *reinterpret_cast<const P*>(w + i);
        if (pw) pv = *reinterpret_cast<const P*>(pw + i);
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          acc_t l, dx, dt;
          const acc_t pwe = pw ? static_cast<acc_t>(pv.v[e]) : acc_t(1);
          loss_elem<KIND, acc_t>(static_cast<acc_t>(xv.v[e]), static_cast<acc_t>(tv.v[e]), pwe, delta, l, dx, dt);
          if constexpr (HAS_W) {
            const acc_t we = static_cast<acc_t>(wv.v[e]);
            l *= we;
            dx *= we;
            dt *= we;
          }
          sum += l;
          lv.v[e] = static_cast<scalar_t>(l);
          gxv.v[e] = dx * gscale;
          gtv.v[e] = dt * gscale;
        }
        if (gx) *reinterpret_cast<G*>(gx + i) = gxv;
        if (gt) *reinterpret_cast<G*>(gt + i) = gtv;
        if (loss) *reinterpret_cast<P*>(loss + i) = lv;
      } else {
        for (int64_t jj = j; jj < n && jj < j + VEC; ++jj)
          sum += one_element<scalar_t, acc_t, KIND, HAS_W>(x, t, w, pw, loss, gx, gt, base + jj, delta, gscale);
      }
    }
    if (partial != nullptr) {
      const acc_t s = block_sum(sum, shared);
      if (threadIdx.x == 0) partial[id] = s;
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    row_sum_kernel(const acc_t* __restrict__ partial, scalar_t* __restrict__ out, int64_t chunks, acc_t scale) {
  __shared__ acc_t shared[kThreads / 32];
  const int64_t r = blockIdx.x;
  acc_t s = 0;
  for (int64_t c = threadIdx.x; c < chunks; c += kThreads) s += partial[r * chunks + c];  // fixed order
  s = block_sum(s, shared);
  if (threadIdx.x == 0) out[r] = static_cast<scalar_t>(s * scale);
}

bool aligned16(const void* p) { return p == nullptr || reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename scalar_t, int KIND, bool HAS_W>
void launch_loss(const at::Tensor& ref, const scalar_t* x, const scalar_t* t, const scalar_t* w, const scalar_t* pw,
                 scalar_t* loss, at::opmath_type<scalar_t>* gx, at::opmath_type<scalar_t>* gt, at::Tensor& out,
                 const LossPlan& plan, double delta) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = 16 / sizeof(scalar_t);
  // The gradient packs are V acc_t wide (32 bytes for fp16/bf16): they need that alignment.
  auto aligned_grad = [](const void* p) {
    return p == nullptr || reinterpret_cast<uintptr_t>(p) % (sizeof(acc_t) * V) == 0;
  };
  const bool vec = plan.cols % V == 0 && aligned16(x) && aligned16(t) && aligned16(w) && aligned16(pw) &&
                   aligned16(loss) && aligned_grad(gx) && aligned_grad(gt);
  const int vw = vec ? V : 1;
  const int64_t chunk = static_cast<int64_t>(kThreads) * vw * kItems;
  const int64_t chunks = (plan.cols + chunk - 1) / chunk;
  const int64_t total = plan.rows * chunks;
  const bool none = plan.reduction == kNone;
  at::Tensor partial;
  if (!none) partial = at::empty({std::max<int64_t>(total, 1)}, ref.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* part = none ? nullptr : partial.mutable_data_ptr<acc_t>();
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (total > 0) {
    const int64_t blocks = std::min(total, grid_limit(ref));
    if (vec)
      loss_fwd_kernel<scalar_t, acc_t, KIND, HAS_W, V><<<blocks, kThreads, 0, stream>>>(
          x, t, w, pw, loss, gx, gt, part, plan.rows, plan.cols, chunks, static_cast<acc_t>(delta),
          static_cast<acc_t>(plan.grad_scale));
    else
      loss_fwd_kernel<scalar_t, acc_t, KIND, HAS_W, 1><<<blocks, kThreads, 0, stream>>>(
          x, t, w, pw, loss, gx, gt, part, plan.rows, plan.cols, chunks, static_cast<acc_t>(delta),
          static_cast<acc_t>(plan.grad_scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (none || plan.rows == 0) return;
  if (chunks == 0) {  // empty rows: sum 0, mean 0 * inf = NaN (torch's empty mean)
    out.fill_(0.0 * plan.out_scale);
    return;
  }
  TORCH_CHECK(plan.rows <= 2147483647LL, "aefast: too many rows");
  row_sum_kernel<scalar_t, acc_t><<<plan.rows, kThreads, 0, stream>>>(part, out.mutable_data_ptr<scalar_t>(), chunks,
                                                                       static_cast<acc_t>(plan.out_scale));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void dispatch_loss_kind(int kind, const at::Tensor& ref, const scalar_t* x, const scalar_t* t, const scalar_t* w,
                        const scalar_t* pw, scalar_t* loss, at::opmath_type<scalar_t>* gx,
                        at::opmath_type<scalar_t>* gt, at::Tensor& out, const LossPlan& plan, double delta) {
#define AEFAST_CUDA_LOSS_CASE(K)                                                             \
  case K:                                                                                    \
    if (w) launch_loss<scalar_t, K, true>(ref, x, t, w, pw, loss, gx, gt, out, plan, delta);  \
    else launch_loss<scalar_t, K, false>(ref, x, t, w, pw, loss, gx, gt, out, plan, delta);  \
    break;
  switch (kind) {
    AEFAST_CUDA_LOSS_CASE(kMse)
    AEFAST_CUDA_LOSS_CASE(kL1)
    AEFAST_CUDA_LOSS_CASE(kHuber)
    AEFAST_CUDA_LOSS_CASE(kBce)
    AEFAST_CUDA_LOSS_CASE(kBceLogits)
    AEFAST_CUDA_LOSS_CASE(kKl)
    default:
      TORCH_CHECK(false, "aefast: bad loss kind ", kind);
  }
#undef AEFAST_CUDA_LOSS_CASE
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> loss_forward_cuda(const at::Tensor& input_, const at::Tensor& target_,
                                                                  const std::optional<at::Tensor>& weight_,
                                                                  const std::optional<at::Tensor>& pos_weight_,
                                                                  int kind, int reduction, double delta,
                                                                  bool grad_input, bool grad_target) {
  const c10::cuda::CUDAGuard guard(input_.device());
  LossCall call = prepare_loss_call(input_, target_, weight_, pos_weight_, kind, reduction, grad_input, grad_target);
  const at::Tensor &input = call.input, &target = call.target, &weight = call.weight, &pos_weight = call.pos_weight;
  const LossPlan& plan = call.plan;
  at::Tensor &out = call.out, &gx = call.gx, &gt = call.gt;
  const bool own_gt = call.own_gt;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "aefast_recon_loss_cuda", [&] {
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const scalar_t* t = target.const_data_ptr<scalar_t>();
    const scalar_t* w = weight.defined() ? weight.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* pw = pos_weight.defined() ? pos_weight.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* loss = reduction == kNone ? out.mutable_data_ptr<scalar_t>() : nullptr;
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* gxp = grad_input ? gx.mutable_data_ptr<acc_t>() : nullptr;
    acc_t* gtp = own_gt ? gt.mutable_data_ptr<acc_t>() : nullptr;
    dispatch_loss_kind<scalar_t>(kind, input, x, t, w, pw, loss, gxp, gtp, out, plan, delta);
  });
  return {out, gx, gt};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> recon_loss_cuda(const at::Tensor& input, const at::Tensor& target,
                                                                const std::optional<at::Tensor>& weight,
                                                                const std::optional<at::Tensor>& pos_weight,
                                                                c10::string_view kind, c10::string_view reduction,
                                                                double delta, bool grad_input, bool grad_target) {
  check_same_device("recon_loss", {&input, &target}, weight);
  check_same_device("recon_loss", {&input}, pos_weight);
  return loss_forward_cuda(input, target, weight, pos_weight, parse_loss_kind(kind), parse_reduction(reduction),
                           delta, grad_input, grad_target);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_divergence_cuda(const at::Tensor& mu, const at::Tensor& logvar,
                                                                   c10::string_view reduction, bool grad) {
  check_same_device("kl_divergence", {&mu, &logvar});
  return loss_forward_cuda(mu, logvar, std::nullopt, std::nullopt, kKl, parse_reduction(reduction), 0.0, grad, grad);
}

// out = alpha * saved * g[mode: 0 -> g[0], 1 -> g[i / cols], 2 -> g[i]], rounded once into scalar_t
template <typename scalar_t, typename saved_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    grad_scale_kernel(const scalar_t* __restrict__ g, const saved_t* __restrict__ s, scalar_t* __restrict__ out,
                      int64_t n, int64_t cols, int mode, acc_t alpha) {
  const acc_t g0 = mode == 0 ? static_cast<acc_t>(g[0]) : acc_t(0);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const acc_t gv = mode == 0 ? g0 : static_cast<acc_t>(g[mode == 1 ? i / cols : i]);
    out[i] = static_cast<scalar_t>(alpha * static_cast<acc_t>(s[i]) * gv);
  }
}

at::Tensor loss_grad_scale_cuda(const at::Tensor& grad_output_, const at::Tensor& saved_, double alpha) {
  check_same_device("loss_grad_scale", {&grad_output_, &saved_});
  check_grad_scale_dtypes(grad_output_, saved_);
  const c10::cuda::CUDAGuard guard(saved_.device());
  const int mode = grad_scale_mode(grad_output_, saved_);
  const at::Tensor g = grad_output_.contiguous(), saved = saved_.contiguous();
  at::Tensor out = at::empty(saved.sizes(), g.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t n = saved.numel();
  if (n == 0) return out;
  const int64_t cols = mode == 1 ? n / saved.size(0) : 1;
  const int64_t blocks = std::min((n + kThreads - 1) / kThreads, grid_limit(saved));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "aefast_loss_grad_scale_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto stream = c10::cuda::getCurrentCUDAStream();
    if (saved.scalar_type() == g.scalar_type())
      grad_scale_kernel<scalar_t, scalar_t, acc_t><<<blocks, kThreads, 0, stream>>>(
          g.const_data_ptr<scalar_t>(), saved.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), n, cols,
          mode, static_cast<acc_t>(alpha));
    else
      grad_scale_kernel<scalar_t, acc_t, acc_t><<<blocks, kThreads, 0, stream>>>(
          g.const_data_ptr<scalar_t>(), saved.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>(), n, cols,
          mode, static_cast<acc_t>(alpha));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// ---------------------------------------------------------------- noise (see the CPU file)

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    corrupt_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int64_t n, uint64_t seed, int kind,
                   float level, scalar_t low, scalar_t high, acc_t level_acc) {
  const float half = level * 0.5f;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    if (kind == 0) {
      y[i] = static_cast<scalar_t>(static_cast<acc_t>(x[i]) + level_acc * static_cast<acc_t>(philox_normal_at(seed, i)));
    } else {
      const float u = philox_uniform_at(seed, i);
      y[i] = kind == 1 ? (u < level ? scalar_t(0) : x[i]) : (u < half ? low : (u < level ? high : x[i]));
    }
  }
}

at::Tensor corrupt_cuda(const at::Tensor& input_, int64_t seed, c10::string_view kind_s, double level, double low,
                        double high) {
  check_same_device("corrupt", {&input_});
  const int kind = parse_corruption(kind_s);
  const c10::cuda::CUDAGuard guard(input_.device());
  const at::Tensor input = input_.contiguous();
  at::Tensor out = at::empty(input.sizes(), input.options());
  const int64_t n = input.numel();
  if (n == 0) return out;
  const int64_t blocks = std::min((n + kThreads - 1) / kThreads, grid_limit(input));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "aefast_corrupt_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    corrupt_kernel<scalar_t, acc_t><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        input.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), n, static_cast<uint64_t>(seed), kind,
        static_cast<float>(level), static_cast<scalar_t>(low), static_cast<scalar_t>(high), static_cast<acc_t>(level));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// forward: z = mu + exp(lv/2) eps;  backward: dlv = g exp(lv/2) eps / 2, eps regenerated
template <typename scalar_t, typename acc_t, bool BACKWARD>
__global__ void __launch_bounds__(kThreads)
    reparam_kernel(const scalar_t* __restrict__ other, const scalar_t* __restrict__ lv, scalar_t* __restrict__ out,
                   int64_t n, uint64_t seed) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    const acc_t eps = static_cast<acc_t>(philox_normal_at(seed, i));
    const acc_t std_ = exp(acc_t(0.5) * static_cast<acc_t>(lv[i]));
    const acc_t o = static_cast<acc_t>(other[i]);
    out[i] = static_cast<scalar_t>(BACKWARD ? o * acc_t(0.5) * std_ * eps : o + std_ * eps);
  }
}

template <bool BACKWARD>
at::Tensor reparam_launch(const at::Tensor& other_, const at::Tensor& logvar_, int64_t seed) {
  check_same(logvar_, other_, BACKWARD ? "grad" : "mu");
  const c10::cuda::CUDAGuard guard(logvar_.device());
  const at::Tensor other = other_.contiguous(), logvar = logvar_.contiguous();
  at::Tensor out = at::empty(logvar.sizes(), logvar.options());
  const int64_t n = logvar.numel();
  if (n == 0) return out;
  const int64_t blocks = std::min((n + kThreads - 1) / kThreads, grid_limit(logvar));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logvar.scalar_type(), "aefast_reparam_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    reparam_kernel<scalar_t, acc_t, BACKWARD><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        other.const_data_ptr<scalar_t>(), logvar.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), n,
        static_cast<uint64_t>(seed));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor reparameterize_cuda(const at::Tensor& mu, const at::Tensor& logvar, int64_t seed) {
  check_same_device("reparameterize", {&mu, &logvar});
  return reparam_launch<false>(mu, logvar, seed);
}

at::Tensor reparameterize_backward_cuda(const at::Tensor& grad, const at::Tensor& logvar, int64_t seed) {
  check_same_device("reparameterize_backward", {&grad, &logvar});
  return reparam_launch<true>(grad, logvar, seed);
}

}  // namespace

TORCH_LIBRARY_IMPL(aefast, CUDA, m) {
  m.impl("recon_loss", &recon_loss_cuda);
  m.impl("loss_grad_scale", &loss_grad_scale_cuda);
  m.impl("kl_divergence", &kl_divergence_cuda);
  m.impl("corrupt", &corrupt_cuda);
  m.impl("reparameterize", &reparameterize_cuda);
  m.impl("reparameterize_backward", &reparameterize_backward_cuda);
}

}  // namespace aefast
