// CPU kernels of the recon_loss family: fused losses (value + gradient in one pass), the
// backward scale, KL divergence, denoising corruption and the VAE reparameterisation.
//
// Determinism: every reduction is blocked on FIXED chunk boundaries (kChunk elements of one
// row), each chunk is summed into 8 lanes in a fixed order and folded by a fixed tree, and
// the chunk partials are summed serially in chunk order. The result therefore does not
// depend on the number of threads or on how at::parallel_for splits the range.
// Vectorisation: the hot loops are plain loops over contiguous arrays with the kind and the
// weight/gradient switches as template parameters, so gcc -O3 vectorises mse/l1/huber (AVX2
// when built for it; SSE2 baseline otherwise). Half types are widened to float per element.
// Before every include, so that all inline functions of this file share the flag (gcc does
// not inline across different optimize options): the loss loops select between computed
// values (clamps, NaN and zero cases), and gcc if-converts and vectorises such selects only
// when it may assume that float operations do not trap. Nothing reads the FP exception flags.
#pragma GCC optimize("no-trapping-math")
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <vector>

#include "aefast/cpu_isa.h"
#include "aefast/corruption.h"
#include "aefast/cpu_buffer_cache.h"
#include "aefast/philox.h"
#include "aefast/recon_loss.h"
#include "aefast/recon_loss_host.h"
#include "aefast/torch_utils.h"

namespace aefast {
namespace {

constexpr int64_t kGrainElems = 32768;     // below this, one thread (parallel overhead dominates)

struct LossPointers {
  const void *x, *t, *w, *pw;
  void *loss, *gx, *gt;
};

}  // namespace

// The loss kernels are compiled twice from one source: for the portable baseline (SSE2) and
// for AVX2+FMA, chosen at run time by what the CPU supports (no -march=native, no AVX-512).
namespace base {
#include "recon_loss_kernels.inc"
}  // namespace base
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "recon_loss_kernels.inc"
}  // namespace avx2
#pragma GCC pop_options

namespace {

// AVX2 unless the CPU lacks it or AEFAST_CPU_ISA=baseline caps it (aefast/cpu_isa.h).
bool cpu_has_avx2() { return cpu_isa() >= Isa::kAvx2; }

std::tuple<at::Tensor, at::Tensor, at::Tensor> loss_forward(const at::Tensor& input_, const at::Tensor& target_,
                                                             const std::optional<at::Tensor>& weight_,
                                                             const std::optional<at::Tensor>& pos_weight_, int kind,
                                                             int reduction, double delta, bool grad_input,
                                                             bool grad_target) {
  LossCall call = prepare_loss_call(input_, target_, weight_, pos_weight_, kind, reduction, grad_input, grad_target);
  const at::Tensor &input = call.input, &target = call.target, &weight = call.weight, &pos_weight = call.pos_weight;
  const LossPlan& plan = call.plan;
  at::Tensor &out = call.out, &gx = call.gx, &gt = call.gt;
  const bool own_gt = call.own_gt;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "aefast_recon_loss_cpu", [&] {
    LossPointers ptr{input.const_data_ptr(),
                     target.const_data_ptr(),
                     weight.defined() ? weight.const_data_ptr() : nullptr,
                     pos_weight.defined() ? pos_weight.const_data_ptr() : nullptr,
                     reduction == kNone ? out.mutable_data_ptr() : nullptr,
                     grad_input ? gx.mutable_data_ptr() : nullptr,
                     own_gt ? gt.mutable_data_ptr() : nullptr};
    if (cpu_has_avx2())
      avx2::dispatch_loss<scalar_t>(kind, weight.defined(), grad_input, ptr, plan, delta, out);
    else
      base::dispatch_loss<scalar_t>(kind, weight.defined(), grad_input, ptr, plan, delta, out);
  });
  return {out, gx, gt};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> recon_loss_cpu(const at::Tensor& input, const at::Tensor& target,
                                                               const std::optional<at::Tensor>& weight,
                                                               const std::optional<at::Tensor>& pos_weight,
                                                               c10::string_view kind, c10::string_view reduction,
                                                               double delta, bool grad_input, bool grad_target) {
  check_same_device("recon_loss", {&input, &target}, weight);
  check_same_device("recon_loss", {&input}, pos_weight);
  return loss_forward(input, target, weight, pos_weight, parse_loss_kind(kind), parse_reduction(reduction), delta,
                      grad_input, grad_target);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kl_divergence_cpu(const at::Tensor& mu, const at::Tensor& logvar,
                                                                  c10::string_view reduction, bool grad) {
  check_same_device("kl_divergence", {&mu, &logvar});
  return loss_forward(mu, logvar, std::nullopt, std::nullopt, kKl, parse_reduction(reduction), 0.0, grad, grad);
}

// out = alpha * saved * g in acc_t, rounded once into scalar_t (saved_t: scalar_t or acc_t).
template <typename scalar_t, typename saved_t, typename acc_t>
void scale_saved(const scalar_t* gp, const saved_t* s, scalar_t* o, int64_t numel, int64_t cols, int mode,
                 acc_t a) {
  at::parallel_for(0, numel, kGrainElems, [&](int64_t b, int64_t e) {
    if (mode == 2) {
      for (int64_t i = b; i < e; ++i)
        o[i] = static_cast<scalar_t>(a * static_cast<acc_t>(s[i]) * static_cast<acc_t>(gp[i]));
      return;
    }
    // Walk [b, e) row by row so the inner loop has a constant factor (vectorises).
    for (int64_t i = b; i < e;) {
      const int64_t r = i / cols;
      const int64_t stop = std::min(e, (r + 1) * cols);
      const acc_t f = a * static_cast<acc_t>(gp[mode == 1 ? r : 0]);
      for (int64_t k = i; k < stop; ++k) o[k] = static_cast<scalar_t>(f * static_cast<acc_t>(s[k]));
      i = stop;
    }
  });
}

// Backward of every loss op: grad = alpha * saved * grad_output, grad_output broadcast as a
// scalar (mean/sum), per row (per_sample) or elementwise (none); in grad_output's dtype.
at::Tensor loss_grad_scale_cpu(const at::Tensor& grad_output_, const at::Tensor& saved_, double alpha) {
  check_same_device("loss_grad_scale", {&grad_output_, &saved_});
  check_grad_scale_dtypes(grad_output_, saved_);
  const int mode = grad_scale_mode(grad_output_, saved_);
  const at::Tensor g = contiguous_cpu_cached(grad_output_), saved = contiguous_cpu_cached(saved_);
  at::Tensor out = empty_cpu_cached(saved.sizes(), g.options());
  const int64_t numel = saved.numel();
  if (numel == 0) return out;
  const int64_t rows = mode == 1 ? saved.size(0) : 1;
  const int64_t cols = numel / rows;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "aefast_loss_grad_scale_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    const acc_t a = static_cast<acc_t>(alpha);
    if (saved.scalar_type() == g.scalar_type())
      scale_saved(gp, saved.const_data_ptr<scalar_t>(), o, numel, cols, mode, a);
    else
      scale_saved(gp, saved.const_data_ptr<acc_t>(), o, numel, cols, mode, a);
  });
  return out;
}

// ---------------------------------------------------------------- noise
// Element i of a call draws Philox(seed, counter = i) (aefast/philox.h), the same stream as
// the Triton kernels' tl.rand / tl.randn(seed, i): uniforms agree bit for bit across
// backends, normals up to the last bits of logf/cosf.
//   gaussian:    y = x + level * n_i
//   masking:     y = u_i < level ? 0 : x
//   salt_pepper: y = u_i < level/2 ? low : (u_i < level ? high : x)   (given u < level, u/level
//                is uniform, so "below half of it" is a fair coin; one draw per element)
// The backward of masking and salt_pepper is masking of the gradient with the same seed.

at::Tensor corrupt_cpu(const at::Tensor& input_, int64_t seed, c10::string_view kind_s, double level, double low,
                       double high) {
  check_same_device("corrupt", {&input_});
  const int kind = parse_corruption(kind_s);
  const at::Tensor input = contiguous_cpu_cached(input_);
  at::Tensor out = empty_cpu_cached(input.sizes(), input.options());
  const int64_t numel = input.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "aefast_corrupt_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    scalar_t* y = out.mutable_data_ptr<scalar_t>();
    // The same element function as the encoder's corrupted input load (aefast/corruption.h).
    const ElementCorruption<scalar_t, acc_t> corrupt_at(kind, seed, level, low, high);
    at::parallel_for(0, numel, kGrainElems / 4, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) y[i] = corrupt_at(x[i], static_cast<uint64_t>(i));
    });
  });
  return out;
}

// z = mu + exp(logvar / 2) * eps_i,   eps_i = normal(seed, i)
at::Tensor reparameterize_cpu(const at::Tensor& mu_, const at::Tensor& logvar_, int64_t seed) {
  check_same_device("reparameterize", {&mu_, &logvar_});
  check_same(mu_, logvar_, "logvar");
  const at::Tensor mu = contiguous_cpu_cached(mu_), logvar = contiguous_cpu_cached(logvar_);
  at::Tensor z = empty_cpu_cached(mu.sizes(), mu.options());
  const uint64_t key = static_cast<uint64_t>(seed);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, mu.scalar_type(), "aefast_reparameterize_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* m = mu.const_data_ptr<scalar_t>();
    const scalar_t* lv = logvar.const_data_ptr<scalar_t>();
    scalar_t* o = z.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, mu.numel(), kGrainElems / 4, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const acc_t eps = static_cast<acc_t>(philox_normal_at(key, i));
        o[i] = static_cast<scalar_t>(static_cast<acc_t>(m[i]) + std::exp(acc_t(0.5) * static_cast<acc_t>(lv[i])) * eps);
      }
    });
  });
  return z;
}

// d z / d logvar = exp(logvar / 2) * eps / 2, with eps regenerated from the seed (nothing saved).
at::Tensor reparameterize_backward_cpu(const at::Tensor& grad_, const at::Tensor& logvar_, int64_t seed) {
  check_same_device("reparameterize_backward", {&grad_, &logvar_});
  check_same(logvar_, grad_, "grad");
  const at::Tensor grad = contiguous_cpu_cached(grad_), logvar = contiguous_cpu_cached(logvar_);
  at::Tensor out = empty_cpu_cached(logvar.sizes(), logvar.options());
  const uint64_t key = static_cast<uint64_t>(seed);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logvar.scalar_type(), "aefast_reparam_bwd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    const scalar_t* lv = logvar.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, logvar.numel(), kGrainElems / 4, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) {
        const acc_t eps = static_cast<acc_t>(philox_normal_at(key, i));
        o[i] = static_cast<scalar_t>(static_cast<acc_t>(g[i]) * acc_t(0.5) *
                                     std::exp(acc_t(0.5) * static_cast<acc_t>(lv[i])) * eps);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(aefast, CPU, m) {
  m.impl("recon_loss", &recon_loss_cpu);
  m.impl("loss_grad_scale", &loss_grad_scale_cpu);
  m.impl("kl_divergence", &kl_divergence_cpu);
  m.impl("corrupt", &corrupt_cpu);
  m.impl("reparameterize", &reparameterize_cpu);
  m.impl("reparameterize_backward", &reparameterize_backward_cpu);
}

}  // namespace aefast
