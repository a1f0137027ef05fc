// CPU kernels of batch_norm_act2d: BatchNorm with batch statistics (training mode) followed by an
// activation, in two passes forward and two backward (math in aefast/ops/batch_norm_act.py). The
// hot loops live in batch_norm_act_kernels.inc, built per ISA. Eager runs BatchNorm and the
// activation as four passes forward (two of BatchNorm, one of the activation, plus its saved
// output) and keeps both outputs for the backward; here only the input and per-channel statistics
// are kept, and the backward recomputes z.
//
// Layouts: channels-last input -> channels-last output (rows of C channels, vectorised over C);
// anything else runs on the contiguous NCHW tensor (planes of H*W, vectorised over the plane).
// Work units are fixed (kRows rows, or one plane) and their partial sums are added in order, so
// results are identical for every thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

#include "aefast/conv_pool.h"
#include "aefast/cpu_buffer_cache.h"
#include "aefast/cpu_isa.h"
#include "aefast/torch_utils.h"

namespace aefast {
namespace {

#define AEFAST_PER_ISA_KERNELS "batch_norm_act_kernels.inc"
#include "per_isa.inc"

template <typename scalar_t, typename acc_t>
struct BnActKernels {
  void (*cl_moments)(const scalar_t*, int64_t, int64_t, const double*, double*, double*);
  void (*plane_moments)(const scalar_t*, int64_t, double, double*, double*);
  void (*cl_forward)(const scalar_t*, int64_t, int64_t, const acc_t*, const acc_t*, acc_t, scalar_t*);
  void (*plane_forward)(const scalar_t*, int64_t, acc_t, acc_t, acc_t, scalar_t*);
  void (*cl_grad_sums)(const scalar_t*, const scalar_t*, int64_t, int64_t, const acc_t*, const acc_t*, const acc_t*,
                       acc_t, double*, double*);
  void (*plane_grad_sums)(const scalar_t*, const scalar_t*, int64_t, acc_t, acc_t, acc_t, acc_t, double*, double*);
  void (*cl_grad_input)(const scalar_t*, const scalar_t*, int64_t, int64_t, const acc_t*, const acc_t*, const acc_t*,
                        const acc_t*, const acc_t*, acc_t, scalar_t*);
  void (*plane_grad_input)(const scalar_t*, const scalar_t*, int64_t, acc_t, acc_t, acc_t, acc_t, acc_t, acc_t,
                           scalar_t*);
};

#define AEFAST_BN_ACT_KERNELS(NS, ACT)                                                                           \
  BnActKernels<scalar_t, acc_t> {                                                                                \
    &NS::cl_moments<scalar_t, acc_t>, &NS::plane_moments<scalar_t, acc_t>, &NS::cl_forward<ACT, scalar_t, acc_t>, \
        &NS::plane_forward<ACT, scalar_t, acc_t>, &NS::cl_grad_sums<ACT, scalar_t, acc_t>,                       \
        &NS::plane_grad_sums<ACT, scalar_t, acc_t>, &NS::cl_grad_input<ACT, scalar_t, acc_t>,                    \
        &NS::plane_grad_input<ACT, scalar_t, acc_t>                                                              \
  }

template <typename scalar_t, typename acc_t>
BnActKernels<scalar_t, acc_t> pick_kernels(int64_t act) {
  const Isa isa = cpu_isa();
  return with_activation(act, [&](auto a) {
    constexpr int ACT = decltype(a)::value;
    switch (isa) {
      case Isa::kAvx512: return AEFAST_BN_ACT_KERNELS(avx512, ACT);
      case Isa::kAvx2: return AEFAST_BN_ACT_KERNELS(avx2, ACT);
      default: return AEFAST_BN_ACT_KERNELS(generic, ACT);
    }
  });
}
#undef AEFAST_BN_ACT_KERNELS

// Rows of a channels-last tensor per work unit: ~16 KiB of fp32 at C = 16, and a fixed count so
// that the order of the partial sums never depends on the thread count.
constexpr int64_t kRows = 256;

// The layout a call runs in: channels-last (rows of C) when the input is channels-last
// contiguous and not also NCHW contiguous (C == 1 or 1x1 planes), else contiguous NCHW.
// Channels-last rows are processed R at a time as one "wide row" of P = R*C values with the
// per-channel constants repeated R times: with few channels (C = 8 or 16) a row alone is shorter than
// an AVX-512 loop's step and ran in its scalar remainder. R is the smallest power of two (so it
// divides kRows) with P >= 64; the partial sums of the R copies of a channel are added at the end.
struct Layout {
  bool channels_last;
  int64_t N, C, HW, R;
  int64_t count() const { return N * HW; }
  int64_t P() const { return R * C; }
  int64_t units() const { return channels_last ? (N * HW + kRows - 1) / kRows : N * C; }
  // Partial sums per unit and moment: P (one per copy of each channel) or 1 (an NCHW plane).
  int64_t partial_width() const { return channels_last ? P() : 1; }
  at::MemoryFormat format() const { return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous; }
};

Layout layout_of(const at::Tensor& x) {
  const bool cl = x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous();
  int64_t r = 1;
  while (r * x.size(1) < 64 && r < kRows) r *= 2;
  return Layout{cl, x.size(0), x.size(1), x.size(2) * x.size(3), r};
}

// v (one value per channel) repeated R times: the constants of a wide row.
template <typename T>
std::vector<T> repeated(const std::vector<T>& v, int64_t R) {
  std::vector<T> out;
  out.reserve(v.size() * R);
  for (int64_t r = 0; r < R; ++r) out.insert(out.end(), v.begin(), v.end());
  return out;
}

void check_input(const char* op, const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "aefast::", op, ": input must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "aefast::", op, ": input must be floating point, got ",
              x.scalar_type());
  TORCH_CHECK(x.size(0) * x.size(2) * x.size(3) > 1, "aefast::", op,
              ": expected more than 1 value per channel when training, got input of shape ", x.sizes());
}

void check_param(const char* op, const c10::optional<at::Tensor>& t, int64_t C, const char* name) {
  if (t.has_value() && t->defined())
    TORCH_CHECK(t->dim() == 1 && t->size(0) == C, "aefast::", op, ": ", name, " must have shape (", C, ",), got ",
                t->sizes());
}

// The checks the forward and the backward share: the activation code and the per-channel parameters.
void check_activation_and_params(const char* op, const at::Tensor& input, const c10::optional<at::Tensor>& weight,
                                 const c10::optional<at::Tensor>& bias, int64_t activation) {
  TORCH_CHECK(activation >= 0 && activation < kNumActivations, "aefast::", op, ": unknown activation code ",
              activation);
  check_param(op, weight, input.size(1), "weight");
  check_param(op, bias, input.size(1), "bias");
}

template <typename acc_t>
std::vector<acc_t> param_or(const c10::optional<at::Tensor>& t, int64_t C, acc_t fill) {
  std::vector<acc_t> v(C, fill);
  if (t.has_value() && t->defined()) {
    const at::Tensor c = t->to(at::CppTypeToScalarType<acc_t>::value).contiguous();
    std::copy(c.const_data_ptr<acc_t>(), c.const_data_ptr<acc_t>() + C, v.begin());
  }
  return v;
}

// Per-channel constants of z = scale*x + shift = gamma*(x - mean)*invstd + beta.
template <typename acc_t>
struct Affine {
  std::vector<acc_t> mean, invstd, scale, shift;
};

template <typename acc_t>
Affine<acc_t> affine_of(const at::Tensor& mean, const at::Tensor& var, const c10::optional<at::Tensor>& weight,
                        const c10::optional<at::Tensor>& bias, double eps, int64_t C) {
  Affine<acc_t> a{param_or<acc_t>(mean, C, 0), std::vector<acc_t>(C), std::vector<acc_t>(C), std::vector<acc_t>(C)};
  const std::vector<acc_t> v = param_or<acc_t>(var, C, 0), g = param_or<acc_t>(weight, C, 1),
                           b = param_or<acc_t>(bias, C, 0);
  for (int64_t c = 0; c < C; ++c) {
    a.invstd[c] = acc_t(1) / std::sqrt(v[c] + static_cast<acc_t>(eps));
    a.scale[c] = g[c] * a.invstd[c];
    a.shift[c] = b[c] - a.mean[c] * a.scale[c];
  }
  return a;
}

// Sums per channel of the per-unit partials [unit][2][C] (channels-last) or [n*C + c][2]
// (NCHW), in unit order.
void reduce_partials(const Layout& L, const double* partial, std::vector<double>& s1, std::vector<double>& s2) {
  s1.assign(L.C, 0.0);
  s2.assign(L.C, 0.0);
  if (L.channels_last) {
    const int64_t P = L.P();
    for (int64_t u = 0; u < L.units(); ++u)
      for (int64_t j = 0; j < P; ++j) {
        s1[j % L.C] += partial[(2 * u) * P + j];
        s2[j % L.C] += partial[(2 * u + 1) * P + j];
      }
  } else {
    for (int64_t n = 0; n < L.N; ++n)
      for (int64_t c = 0; c < L.C; ++c) {
        s1[c] += partial[2 * (n * L.C + c)];
        s2[c] += partial[2 * (n * L.C + c) + 1];
      }
  }
}

// Runs f(unit, first, count) over the layout's work units in parallel: channels-last units are
// runs of rows (first row, rows; callers take count / R wide rows, then count % R single rows);
// NCHW units are planes (plane index, HW).
template <typename F>
void for_units(const Layout& L, F&& f) {
  at::parallel_for(0, L.units(), 1, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      if (L.channels_last) {
        const int64_t r0 = u * kRows;
        f(u, r0, std::min(kRows, L.N * L.HW - r0));
      } else {
        f(u, u, L.HW);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_forward_cpu(
    const at::Tensor& input, const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias,
    double eps, int64_t activation, double negative_slope) {
  const char* op = "batch_norm_act2d_forward";
  check_input(op, input);
  check_same_device(op, {&input}, weight);
  check_same_device(op, {&input}, bias);
  check_activation_and_params(op, input, weight, bias, activation);
  const Layout L = layout_of(input);
  const at::Tensor x = input.contiguous(L.format());
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(L.format()));
  const auto stat_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor mean = at::empty({L.C}, x.options().dtype(stat_type));
  at::Tensor var = at::empty({L.C}, x.options().dtype(stat_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "aefast::batch_norm_act2d", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto kern = pick_kernels<scalar_t, acc_t>(activation);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    // A value of each channel as its shift: the first image's first position.
    std::vector<double> shift(L.C);
    for (int64_t c = 0; c < L.C; ++c)
      shift[c] = static_cast<double>(static_cast<acc_t>(xp[L.channels_last ? c : c * L.HW]));
    const int64_t P = L.partial_width();
    at::Tensor partial_t = empty_cpu_cached({L.units() * 2 * P}, x.options().dtype(at::kDouble));
    double* partial = partial_t.mutable_data_ptr<double>();
    const std::vector<double> shift_wide = repeated(shift, L.R);
    for_units(L, [&](int64_t u, int64_t first, int64_t count) {
      if (!L.channels_last) {
        kern.plane_moments(xp + first * L.HW, count, shift[first % L.C], partial + 2 * u, partial + 2 * u + 1);
        return;
      }
      double* s1 = partial + 2 * u * P;
      double* s2 = partial + (2 * u + 1) * P;
      const int64_t wide = count / L.R, rest = count % L.R;
      kern.cl_moments(xp + first * L.C, wide, P, shift_wide.data(), s1, s2);
      if (rest > 0) {  // the last unit's rows past its whole wide rows, into the first copy's sums
        std::vector<double> t1(L.C), t2(L.C);
        kern.cl_moments(xp + (first + wide * L.R) * L.C, rest, L.C, shift.data(), t1.data(), t2.data());
        for (int64_t c = 0; c < L.C; ++c) s1[c] += t1[c], s2[c] += t2[c];
      }
    });
    std::vector<double> s1, s2;
    reduce_partials(L, partial, s1, s2);
    const double m = static_cast<double>(L.count());
    acc_t* mp = mean.mutable_data_ptr<acc_t>();
    acc_t* vp = var.mutable_data_ptr<acc_t>();
    for (int64_t c = 0; c < L.C; ++c) {
      const double d = s1[c] / m;
      mp[c] = static_cast<acc_t>(shift[c] + d);
      vp[c] = static_cast<acc_t>(std::max(s2[c] / m - d * d, 0.0));
    }
    const Affine<acc_t> a = affine_of<acc_t>(mean, var, weight, bias, eps, L.C);
    const acc_t slope = static_cast<acc_t>(negative_slope);
    scalar_t* op_ = out.mutable_data_ptr<scalar_t>();
    const std::vector<acc_t> scale_wide = repeated(a.scale, L.R), shift_c_wide = repeated(a.shift, L.R);
    for_units(L, [&](int64_t, int64_t first, int64_t count) {
      if (!L.channels_last) {
        kern.plane_forward(xp + first * L.HW, count, a.scale[first % L.C], a.shift[first % L.C], slope,
                           op_ + first * L.HW);
        return;
      }
      const int64_t wide = count / L.R, done = first + wide * L.R;
      kern.cl_forward(xp + first * L.C, wide, L.P(), scale_wide.data(), shift_c_wide.data(), slope, op_ + first * L.C);
      kern.cl_forward(xp + done * L.C, count % L.R, L.C, a.scale.data(), a.shift.data(), slope, op_ + done * L.C);
    });
  });
  return {out, mean, var};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var,
    const c10::optional<at::Tensor>& weight, const c10::optional<at::Tensor>& bias, double eps, int64_t activation,
    double negative_slope, std::array<bool, 3> output_mask) {
  const char* op = "batch_norm_act2d_backward";
  check_input(op, input);
  check_same_device(op, {&grad_out, &input, &mean, &var}, weight);
  check_same_device(op, {&input}, bias);
  TORCH_CHECK(grad_out.sizes() == input.sizes(), "aefast::", op, ": grad_out has shape ", grad_out.sizes(),
              ", the input ", input.sizes());
  TORCH_CHECK(mean.numel() == input.size(1) && var.numel() == input.size(1), "aefast::", op,
              ": mean and var must have one entry per channel");
  check_activation_and_params(op, input, weight, bias, activation);
  const Layout L = layout_of(input);
  const at::Tensor x = input.contiguous(L.format());
  const at::Tensor go = grad_out.to(x.scalar_type()).contiguous(L.format());
  const auto stat_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor grad_input, grad_weight, grad_bias;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "aefast::batch_norm_act2d", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto kern = pick_kernels<scalar_t, acc_t>(activation);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = go.const_data_ptr<scalar_t>();
    const Affine<acc_t> a = affine_of<acc_t>(mean, var, weight, bias, eps, L.C);
    const acc_t slope = static_cast<acc_t>(negative_slope);
    const int64_t P = L.partial_width();
    at::Tensor partial_t = empty_cpu_cached({L.units() * 2 * P}, x.options().dtype(at::kDouble));
    double* partial = partial_t.mutable_data_ptr<double>();
    const std::vector<acc_t> scale_wide = repeated(a.scale, L.R), shift_c_wide = repeated(a.shift, L.R),
                             mean_wide = repeated(a.mean, L.R);
    for_units(L, [&](int64_t u, int64_t first, int64_t count) {
      if (!L.channels_last) {
        const int64_t c = first % L.C;
        kern.plane_grad_sums(gp + first * L.HW, xp + first * L.HW, count, a.scale[c], a.shift[c], a.mean[c], slope,
                             partial + 2 * u, partial + 2 * u + 1);
        return;
      }
      double* sg = partial + 2 * u * P;
      double* sgx = partial + (2 * u + 1) * P;
      const int64_t wide = count / L.R, rest = count % L.R, done = first + wide * L.R;
      kern.cl_grad_sums(gp + first * L.C, xp + first * L.C, wide, P, scale_wide.data(), shift_c_wide.data(),
                        mean_wide.data(), slope, sg, sgx);
      if (rest > 0) {
        std::vector<double> t1(L.C), t2(L.C);
        kern.cl_grad_sums(gp + done * L.C, xp + done * L.C, rest, L.C, a.scale.data(), a.shift.data(), a.mean.data(),
                          slope, t1.data(), t2.data());
        for (int64_t c = 0; c < L.C; ++c) sg[c] += t1[c], sgx[c] += t2[c];
      }
    });
    std::vector<double> sum_g, sum_gx;
    reduce_partials(L, partial, sum_g, sum_gx);
    // grad_beta = sum g; grad_gamma = sum g*xhat = invstd * sum g*(x - mean).
    if (output_mask[1] && weight.has_value() && weight->defined()) {
      grad_weight = at::empty({L.C}, x.options().dtype(stat_type));
      for (int64_t c = 0; c < L.C; ++c)
        grad_weight.mutable_data_ptr<acc_t>()[c] = static_cast<acc_t>(sum_gx[c] * static_cast<double>(a.invstd[c]));
      grad_weight = grad_weight.to(weight->scalar_type());
    }
    if (output_mask[2] && bias.has_value() && bias->defined()) {
      grad_bias = at::empty({L.C}, x.options().dtype(stat_type));
      for (int64_t c = 0; c < L.C; ++c) grad_bias.mutable_data_ptr<acc_t>()[c] = static_cast<acc_t>(sum_g[c]);
      grad_bias = grad_bias.to(bias->scalar_type());
    }
    if (output_mask[0]) {
      // dx = k*(g - sum_g/M - xhat*grad_gamma/M) with k = gamma*invstd = scale:
      //    = scale*g + c0 + c1*(x - mean),  c0 = -scale*sum_g/M,  c1 = -scale*invstd^2*sum_gx/M.
      const double m = static_cast<double>(L.count());
      std::vector<acc_t> c0(L.C), c1(L.C);
      for (int64_t c = 0; c < L.C; ++c) {
        const double k = a.scale[c], inv = a.invstd[c];
        c0[c] = static_cast<acc_t>(-k * sum_g[c] / m);
        c1[c] = static_cast<acc_t>(-k * inv * inv * sum_gx[c] / m);
      }
      grad_input = at::empty(x.sizes(), x.options().memory_format(L.format()));
      scalar_t* gx = grad_input.mutable_data_ptr<scalar_t>();
      const std::vector<acc_t> c0_wide = repeated(c0, L.R), c1_wide = repeated(c1, L.R);
      for_units(L, [&](int64_t, int64_t first, int64_t count) {
        if (L.channels_last) {
          const int64_t wide = count / L.R, done = first + wide * L.R;
          kern.cl_grad_input(gp + first * L.C, xp + first * L.C, wide, L.P(), scale_wide.data(), shift_c_wide.data(),
                             mean_wide.data(), c0_wide.data(), c1_wide.data(), slope, gx + first * L.C);
          kern.cl_grad_input(gp + done * L.C, xp + done * L.C, count % L.R, L.C, a.scale.data(), a.shift.data(),
                             a.mean.data(), c0.data(), c1.data(), slope, gx + done * L.C);
        } else {
          const int64_t c = first % L.C;
          kern.plane_grad_input(gp + first * L.HW, xp + first * L.HW, count, a.scale[c], a.shift[c], a.mean[c], c0[c],
                                c1[c], slope, gx + first * L.HW);
        }
      });
    }
  });
  auto or_empty = [&](const at::Tensor& t) { return t.defined() ? t : at::empty({0}, x.options()); };
  return {or_empty(grad_input), or_empty(grad_weight), or_empty(grad_bias)};
}

}  // namespace

TORCH_LIBRARY_IMPL(aefast, CPU, m) {
  m.impl("batch_norm_act2d_forward", &batch_norm_act_forward_cpu);
  m.impl("batch_norm_act2d_backward", &batch_norm_act_backward_cpu);
}

}  // namespace aefast
