#pragma once
// aefast::batch_norm_act2d on the CUDA backend: BatchNorm with batch statistics -> activation, the
// passes of aefast/ops/batch_norm_act.py as per-element bodies over fixed index spaces, no atomics:
//   moments   one body per (group, channel): the shifted sums of a run of kRun positions, in double;
//             the groups of a channel are then added by at::sum over a fixed shape (deterministic);
//   forward   one body per element: out = act(scale_c * x + shift_c);
//   grad sums one body per (group, channel): sum g and sum g*(x - mean_c), g = grad_out * act'(z);
//   grad_input one body per element: scale_c*g + c0_c + c1_c*(x - mean_c).
// Channels-last tensors are (M, C) rows: body (group, c) walks rows of one channel, and adjacent
// threads take adjacent channels (coalesced). NCHW tensors are planes: body (c, group) walks a run
// of one plane. The per-channel constants are computed by tensor ops on the device (no host sync).
//
// Exec is the CUDA grid-stride launcher (aefast/cuda_exec.cuh) or the CPU loop of
// csrc/cpu/emulate_cuda_bodies.cpp, which runs these bodies in the tests (the CPU backend itself is
// csrc/cpu/batch_norm_act.cpp, vectorised per ISA).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <array>
#include <optional>
#include <tuple>

#include "aefast/conv_pool.h"

namespace aefast {

constexpr int64_t kBnActRun = 256;  // positions per moments / grad-sums body

struct BnActShape {
  bool channels_last;
  int64_t N, C, HW;
  int64_t M() const { return N * HW; }
  // Groups per channel: runs of rows (channels-last) or runs within each plane (NCHW).
  int64_t runs_per_plane() const { return (HW + kBnActRun - 1) / kBnActRun; }
  int64_t groups() const { return channels_last ? (M() + kBnActRun - 1) / kBnActRun : N * runs_per_plane(); }
  at::MemoryFormat format() const {
    return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  }
};

inline BnActShape bn_act_shape(const at::Tensor& x) {
  return BnActShape{x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous(), x.size(0), x.size(1),
                    x.size(2) * x.size(3)};
}

// The element offsets of (group g, channel c): first offset, count, step.
struct BnActRun {
  int64_t first, count, step;
};

AEFAST_HD BnActRun bn_act_run(bool channels_last, int64_t N, int64_t C, int64_t HW, int64_t g, int64_t c) {
  if (channels_last) {
    const int64_t r0 = g * kBnActRun, M = N * HW;
    const int64_t n = M - r0 < kBnActRun ? M - r0 : kBnActRun;
    return BnActRun{r0 * C + c, n, C};
  }
  const int64_t per_plane = (HW + kBnActRun - 1) / kBnActRun;
  const int64_t n_img = g / per_plane, p0 = (g % per_plane) * kBnActRun;
  const int64_t n = HW - p0 < kBnActRun ? HW - p0 : kBnActRun;
  return BnActRun{(n_img * C + c) * HW + p0, n, 1};
}

// Body index e -> (group, channel): adjacent e take adjacent channels in channels-last, adjacent
// groups of one channel in NCHW (so that the partials' layout (groups, C) is the same for both).
AEFAST_HD void bn_act_group_channel(bool channels_last, int64_t C, int64_t G, int64_t e, int64_t& g,
                                           int64_t& c) {
  if (channels_last) {
    g = e / C;
    c = e % C;
  } else {
    c = e / G;
    g = e % G;
  }
}

template <typename scalar_t, typename acc_t>
struct BnActMomentsBody {
  const scalar_t* x;
  const double* shift;  // k_c
  double* s1;           // (G, C)
  double* s2;
  bool channels_last;
  int64_t N, C, HW, G;
  AEFAST_HD void operator()(int64_t e) const {
    int64_t g, c;
    bn_act_group_channel(channels_last, C, G, e, g, c);
    const BnActRun run = bn_act_run(channels_last, N, C, HW, g, c);
    double a1 = 0.0, a2 = 0.0;
    for (int64_t i = 0; i < run.count; ++i) {
      const double d = static_cast<double>(static_cast<acc_t>(x[run.first + i * run.step])) - shift[c];
      a1 += d;
      a2 += d * d;
    }
    s1[g * C + c] = a1;
    s2[g * C + c] = a2;
  }
};

template <int ACT, typename scalar_t, typename acc_t>
struct BnActForwardBody {
  const scalar_t* x;
  const acc_t* scale;
  const acc_t* shift;
  scalar_t* out;
  acc_t slope;
  bool channels_last;
  int64_t C, HW;
  AEFAST_HD void operator()(int64_t e) const {
    const int64_t c = channels_last ? e % C : (e / HW) % C;
    out[e] = static_cast<scalar_t>(activate_ct<ACT, acc_t>(scale[c] * static_cast<acc_t>(x[e]) + shift[c], slope));
  }
};

template <int ACT, typename scalar_t, typename acc_t>
struct BnActGradSumsBody {
  const scalar_t* go;
  const scalar_t* x;
  const acc_t* scale;
  const acc_t* shift;
  const acc_t* mean;
  double* sg;  // (G, C)
  double* sgx;
  acc_t slope;
  bool channels_last;
  int64_t N, C, HW, G;
  AEFAST_HD void operator()(int64_t e) const {
    int64_t g, c;
    bn_act_group_channel(channels_last, C, G, e, g, c);
    const BnActRun run = bn_act_run(channels_last, N, C, HW, g, c);
    double a1 = 0.0, a2 = 0.0;
    for (int64_t i = 0; i < run.count; ++i) {
      const int64_t o = run.first + i * run.step;
      const acc_t xv = static_cast<acc_t>(x[o]);
      const acc_t gv = static_cast<acc_t>(go[o]) * activation_grad_ct<ACT, acc_t>(scale[c] * xv + shift[c], slope);
      a1 += static_cast<double>(gv);
      a2 += static_cast<double>(gv * (xv - mean[c]));
    }
    sg[g * C + c] = a1;
    sgx[g * C + c] = a2;
  }
};

template <int ACT, typename scalar_t, typename acc_t>
struct BnActGradInputBody {
  const scalar_t* go;
  const scalar_t* x;
  const acc_t* scale;
  const acc_t* shift;
  const acc_t* mean;
  const acc_t* c0;
  const acc_t* c1;
  scalar_t* gx;
  acc_t slope;
  bool channels_last;
  int64_t C, HW;
  AEFAST_HD void operator()(int64_t e) const {
    const int64_t c = channels_last ? e % C : (e / HW) % C;
    const acc_t xv = static_cast<acc_t>(x[e]);
    const acc_t gv = static_cast<acc_t>(go[e]) * activation_grad_ct<ACT, acc_t>(scale[c] * xv + shift[c], slope);
    gx[e] = static_cast<scalar_t>(scale[c] * gv + c0[c] + c1[c] * (xv - mean[c]));
  }
};

// Guards for direct torch.ops calls (aefast.functional validates every argument first).
inline void bn_act_check(const char* op, const at::Tensor& x, const std::optional<at::Tensor>& weight,
                         const std::optional<at::Tensor>& bias, int64_t activation) {
  TORCH_CHECK(x.dim() == 4, "aefast::", op, ": input must be 4-D (N, C, H, W), got ", x.dim(), "-D");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "aefast::", op, ": input must be floating point");
  TORCH_CHECK(x.size(0) * x.size(2) * x.size(3) > 1, "aefast::", op,
              ": expected more than 1 value per channel when training, got input of shape ", x.sizes());
  TORCH_CHECK(activation >= 0 && activation < kNumActivations, "aefast::", op, ": unknown activation code ",
              activation);
  for (const auto* t : {&weight, &bias})
    if (t->has_value() && (*t)->defined())
      TORCH_CHECK((*t)->dim() == 1 && (*t)->size(0) == x.size(1), "aefast::", op, ": weight must have shape (",
                  x.size(1), ",), got ", (*t)->sizes());
}

// Per-channel (scale, shift, invstd) of z = scale*x + shift, by tensor ops in the statistics' dtype.
inline std::array<at::Tensor, 3> bn_act_affine(const at::Tensor& mean, const at::Tensor& var,
                                               const std::optional<at::Tensor>& weight,
                                               const std::optional<at::Tensor>& bias, double eps) {
  const at::Tensor invstd = at::rsqrt(var + eps);
  const at::Tensor scale =
      weight.has_value() && weight->defined() ? weight->to(var.scalar_type()) * invstd : invstd.clone();
  const at::Tensor shift = bias.has_value() && bias->defined() ? bias->to(var.scalar_type()) - mean * scale
                                                               : -mean * scale;
  return {scale.contiguous(), shift.contiguous(), invstd};
}

template <class Exec>
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act2d_forward_op(
    const at::Tensor& input, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
    double eps, int64_t activation, double negative_slope) {
  bn_act_check("batch_norm_act2d_forward", input, weight, bias, activation);
  const BnActShape s = bn_act_shape(input);
  const at::Tensor x = input.contiguous(s.format());
  const auto stat_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t G = s.groups();
  at::Tensor shift_k = x.select(0, 0).select(1, 0).select(1, 0).to(at::kDouble).contiguous();  // x[0, :, 0, 0]
  at::Tensor part = at::empty({2, G, s.C}, x.options().dtype(at::kDouble));
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(s.format()));
  at::Tensor mean, var;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "aefast::batch_norm_act2d", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Exec::for_each(BnActMomentsBody<scalar_t, acc_t>{x.const_data_ptr<scalar_t>(), shift_k.const_data_ptr<double>(),
                                                     part.mutable_data_ptr<double>(),
                                                     part.mutable_data_ptr<double>() + G * s.C, s.channels_last, s.N,
                                                     s.C, s.HW, G},
                   G * s.C);
    const at::Tensor sums = part.sum(1);  // (2, C): a fixed-shape reduction over the groups
    const double m = static_cast<double>(s.M());
    const at::Tensor d = sums[0] / m;
    mean = (shift_k + d).to(stat_type);
    var = (sums[1] / m - d * d).clamp_min(0).to(stat_type);
    const std::array<at::Tensor, 3> affine = bn_act_affine(mean, var, weight, bias, eps);
    const at::Tensor& scale = affine[0];
    const at::Tensor& shift = affine[1];
    with_activation(activation, [&](auto a) {
      constexpr int ACT = decltype(a)::value;
      Exec::for_each(BnActForwardBody<ACT, scalar_t, acc_t>{x.const_data_ptr<scalar_t>(), scale.const_data_ptr<acc_t>(),
                                                            shift.const_data_ptr<acc_t>(),
                                                            out.mutable_data_ptr<scalar_t>(),
                                                            static_cast<acc_t>(negative_slope), s.channels_last, s.C,
                                                            s.HW},
                     x.numel());
    });
  });
  return {out, mean, var};
}

template <class Exec>
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act2d_backward_op(
    const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& mean, const at::Tensor& var,
    const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps, int64_t activation,
    double negative_slope, std::array<bool, 3> output_mask) {
  bn_act_check("batch_norm_act2d_backward", input, weight, bias, activation);
  TORCH_CHECK(grad_out.sizes() == input.sizes(), "aefast::batch_norm_act2d_backward: grad_out has shape ",
              grad_out.sizes(), ", the input ", input.sizes());
  TORCH_CHECK(mean.numel() == input.size(1) && var.numel() == input.size(1),
              "aefast::batch_norm_act2d_backward: mean and var must have one entry per channel");
  const BnActShape s = bn_act_shape(input);
  const at::Tensor x = input.contiguous(s.format());
  const at::Tensor go = grad_out.to(x.scalar_type()).contiguous(s.format());
  const auto stat_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor mean_c = mean.to(stat_type).contiguous();
  const std::array<at::Tensor, 3> affine = bn_act_affine(mean_c, var.to(stat_type), weight, bias, eps);
  const at::Tensor& scale = affine[0];
  const at::Tensor& shift = affine[1];
  const at::Tensor& invstd = affine[2];
  const int64_t G = s.groups();
  at::Tensor part = at::empty({2, G, s.C}, x.options().dtype(at::kDouble));
  at::Tensor grad_input, grad_weight, grad_bias;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "aefast::batch_norm_act2d", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t slope = static_cast<acc_t>(negative_slope);
    with_activation(activation, [&](auto a) {
      constexpr int ACT = decltype(a)::value;
      Exec::for_each(BnActGradSumsBody<ACT, scalar_t, acc_t>{go.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(),
                                                             scale.const_data_ptr<acc_t>(), shift.const_data_ptr<acc_t>(),
                                                             mean_c.const_data_ptr<acc_t>(),
                                                             part.mutable_data_ptr<double>(),
                                                             part.mutable_data_ptr<double>() + G * s.C, slope,
                                                             s.channels_last, s.N, s.C, s.HW, G},
                     G * s.C);
    });
    const at::Tensor sums = part.sum(1);  // (2, C): sum g, sum g*(x - mean)
    if (output_mask[1] && weight.has_value() && weight->defined())
      grad_weight = (sums[1] * invstd.to(at::kDouble)).to(weight->scalar_type());
    if (output_mask[2] && bias.has_value() && bias->defined()) grad_bias = sums[0].to(bias->scalar_type());
    if (output_mask[0]) {
      const double m = static_cast<double>(s.M());
      const at::Tensor k = scale.to(at::kDouble), inv = invstd.to(at::kDouble);
      const at::Tensor c0 = (-k * sums[0] / m).to(stat_type).contiguous();
      const at::Tensor c1 = (-k * inv * inv * sums[1] / m).to(stat_type).contiguous();
      grad_input = at::empty(x.sizes(), x.options().memory_format(s.format()));
      with_activation(activation, [&](auto a) {
        constexpr int ACT = decltype(a)::value;
        Exec::for_each(BnActGradInputBody<ACT, scalar_t, acc_t>{go.const_data_ptr<scalar_t>(),
                                                                x.const_data_ptr<scalar_t>(),
                                                                scale.const_data_ptr<acc_t>(),
                                                                shift.const_data_ptr<acc_t>(),
                                                                mean_c.const_data_ptr<acc_t>(), c0.const_data_ptr<acc_t>(),
                                                                c1.const_data_ptr<acc_t>(),
                                                                grad_input.mutable_data_ptr<scalar_t>(), slope,
                                                                s.channels_last, s.C, s.HW},
                       x.numel());
      });
    }
  });
  auto or_empty = [&](const at::Tensor& t) { return t.defined() ? t : at::empty({0}, x.options()); };
  return {or_empty(grad_input), or_empty(grad_weight), or_empty(grad_bias)};
}

}  // namespace aefast
