// conv_bn_pool for the pools the tiling kernels of conv_bn_pool.cpp do not cover (pool stride !=
// pool size, ceil_mode windows clipped at the edge: aefast::pool_is_tiling is false). NCHW scalar
// passes; conv_out is handed over as (N, HC, WC, C) like the tiling path's, at the cost of a copy.
// conv -> BatchNorm (training mode, batch statistics) -> activation -> max-pool with argmax (windows (PKH, PKW) starting at (i*SPH, j*SPW) of the conv
// output, clipped at its edge in ceil_mode; torch's max_pool2d geometry), and its backward. The passes and the
// gradient formula are derived in aefast/ops/conv_bn_pool.py; in short, per output channel c,
// with y = conv2d(x, w, b) (N, C, HC, WC), M = N*HC*WC, mean_c, var_c (biased) over (n, h, w):
//   scale_c = gamma_c / sqrt(var_c + eps), shift_c = beta_c - mean_c * scale_c
//   z = scale_c * y + shift_c,  a = act(z),  pooled = max over each window of a (torch's rule).
// Backward, g = grad_pooled * act'(z) at each window's argmax (zero elsewhere), yhat = (y-mean)*invstd:
//   dbeta_c = sum g,  dgamma_c = sum g*yhat   (pool-sparse sums)
//   dy = gamma*invstd*(g - dbeta/M - yhat*dgamma/M) = c0_c + c1_c * y + gamma_c*invstd_c * g
// where g at a conv position is the sum of the g of every window whose argmax it is (overlapping
// windows, pool stride < pool size, can share one; summed per plane in pooled row-major order)
// which is dense; it is written once and handed to the vendor conv backward
// (at::convolution_backward: oneDNN) for dx, dw and db.
//
// The multiply-adds are the vendor's (at::convolution / at::convolution_backward). aefast's part is
// memory-bound: the channel statistics (two passes over y), the normalise -> activate -> pool ->
// argmax epilogue (one pass over y, writes only pooled-size tensors) and, in the backward, the
// sparse sums and the dense dy (one pass each). Every reduction runs in a fixed order per channel
// (lanes of a fixed width, then planes in order), so results do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include "conv_bn_pool_general.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

#include "aefast/conv_pool.h"
#include "aefast/cpu_buffer_cache.h"
#include "aefast/torch_utils.h"

namespace aefast {
namespace {

struct BnPoolShape {
  int64_t N, C, HC, WC, PKH, PKW, HO, WO;
  int64_t SPH, SPW;  // pool stride
  bool overlapping() const { return SPH < PKH || SPW < PKW; }
  int64_t plane() const { return HC * WC; }
  int64_t count() const { return N * HC * WC; }
};

BnPoolShape check_geometry(const at::Tensor& conv_out, c10::IntArrayRef pool, c10::IntArrayRef pool_stride,
                           bool ceil_mode) {
  TORCH_CHECK(pool.size() == 2 && pool[0] > 0 && pool[1] > 0 && pool[0] * pool[1] <= 255,
              "aefast::conv_bn_pool2d: pool_size needs two positive entries with at most 255 elements in a window");
  TORCH_CHECK(pool_stride.size() == 2 && pool_stride[0] >= 0 && pool_stride[1] >= 0,
              "aefast::conv_bn_pool2d: pool_stride needs two non-negative entries (0: pool_size)");
  BnPoolShape s{conv_out.size(0), conv_out.size(1), conv_out.size(2), conv_out.size(3), pool[0], pool[1], 0, 0,
                pool_stride[0] ? pool_stride[0] : pool[0], pool_stride[1] ? pool_stride[1] : pool[1]};
  TORCH_CHECK(s.HC >= s.PKH && s.WC >= s.PKW, "aefast::conv_bn_pool2d: the conv output ", s.HC, "x", s.WC,
              " is smaller than the pool window");
  TORCH_CHECK(s.count() > 1, "aefast::conv_bn_pool2d: expected more than 1 value per channel when training");
  s.HO = pool_out_extent(s.HC, s.PKH, s.SPH, ceil_mode);
  s.WO = pool_out_extent(s.WC, s.PKW, s.SPW, ceil_mode);
  return s;
}

// Sum of f(v) over one contiguous plane in kLanes independent accumulators (vectorisable, fixed
// order), the lanes then added in double.
constexpr int kLanes = 16;
template <typename scalar_t, typename acc_t, typename F>
double plane_sum(const scalar_t* p, int64_t n, F f) {
  std::array<acc_t, kLanes> lane{};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) lane[l] += f(static_cast<acc_t>(p[i + l]));
  double total = 0.0;
  for (int l = 0; l < kLanes; ++l) total += static_cast<double>(lane[l]);
  for (; i < n; ++i) total += static_cast<double>(f(static_cast<acc_t>(p[i])));
  return total;
}

// mean_c and the biased var_c of y over (n, h, w), two-pass (centred) for accuracy.
template <typename scalar_t>
void channel_stats(const at::Tensor& y, const BnPoolShape& s, at::Tensor& mean, at::Tensor& var) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* yp = y.const_data_ptr<scalar_t>();
  acc_t* mp = mean.mutable_data_ptr<acc_t>();
  acc_t* vp = var.mutable_data_ptr<acc_t>();
  const int64_t hw = s.plane();
  at::parallel_for(0, s.C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double sum = 0.0;
      for (int64_t n = 0; n < s.N; ++n)
        sum += plane_sum<scalar_t, acc_t>(yp + (n * s.C + c) * hw, hw, [](acc_t v) { return v; });
      const double m = sum / static_cast<double>(s.count());
      const acc_t mc = static_cast<acc_t>(m);
      double sq = 0.0;
      for (int64_t n = 0; n < s.N; ++n)
        sq += plane_sum<scalar_t, acc_t>(yp + (n * s.C + c) * hw, hw, [mc](acc_t v) { return (v - mc) * (v - mc); });
      mp[c] = mc;
      vp[c] = static_cast<acc_t>(sq / static_cast<double>(s.count()));
    }
  });
}

template <typename acc_t>
struct ChannelAffine {  // z = scale * y + shift, and what the backward needs per channel
  std::vector<acc_t> scale, shift, invstd, gamma;
};

template <typename acc_t>
ChannelAffine<acc_t> channel_affine(const at::Tensor& mean, const at::Tensor& var, const c10::optional<at::Tensor>& bn_w,
                                    const c10::optional<at::Tensor>& bn_b, double eps, int64_t C) {
  ChannelAffine<acc_t> a{std::vector<acc_t>(C), std::vector<acc_t>(C), std::vector<acc_t>(C), std::vector<acc_t>(C)};
  const at::Tensor m = mean.to(at::CppTypeToScalarType<acc_t>::value).contiguous();
  const at::Tensor v = var.to(at::CppTypeToScalarType<acc_t>::value).contiguous();
  at::Tensor gw, gb;
  if (bn_w.has_value() && bn_w->defined()) gw = bn_w->to(at::CppTypeToScalarType<acc_t>::value).contiguous();
  if (bn_b.has_value() && bn_b->defined()) gb = bn_b->to(at::CppTypeToScalarType<acc_t>::value).contiguous();
  for (int64_t c = 0; c < C; ++c) {
    const acc_t invstd = acc_t(1) / std::sqrt(v.const_data_ptr<acc_t>()[c] + static_cast<acc_t>(eps));
    const acc_t gamma = gw.defined() ? gw.const_data_ptr<acc_t>()[c] : acc_t(1);
    const acc_t beta = gb.defined() ? gb.const_data_ptr<acc_t>()[c] : acc_t(0);
    a.invstd[c] = invstd;
    a.gamma[c] = gamma;
    a.scale[c] = gamma * invstd;
    a.shift[c] = beta - m.const_data_ptr<acc_t>()[c] * gamma * invstd;
  }
  return a;
}

void check_bn_params(const char* op, const c10::optional<at::Tensor>& bn_w, const c10::optional<at::Tensor>& bn_b,
                     int64_t C) {
  for (const auto* t : {&bn_w, &bn_b})
    if (t->has_value() && (*t)->defined())
      TORCH_CHECK((*t)->dim() == 1 && (*t)->size(0) == C, "aefast::", op, ": bn_weight and bn_bias must have shape (",
                  C, ",)");
}

// ---- forward epilogue: per (n, c) plane, each pooled (i, j): the first maximum of act(scale*y + shift)
// over the window's in-bounds part, its row-major offset inside the full window, written as pooled
// (input dtype) and window (uint8).
template <typename scalar_t>
void normalize_activate_pool(const at::Tensor& y, const BnPoolShape& s, const ChannelAffine<at::opmath_type<scalar_t>>& aff,
                             int64_t act, double slope, at::Tensor& pooled, at::Tensor& window) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* yp = y.const_data_ptr<scalar_t>();
  scalar_t* pp = pooled.mutable_data_ptr<scalar_t>();
  uint8_t* wp = window.mutable_data_ptr<uint8_t>();
  const acc_t sl = static_cast<acc_t>(slope);
  const int a = static_cast<int>(act);
  at::parallel_for(0, s.N * s.C, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t plane = p0; plane < p1; ++plane) {
      const int64_t c = plane % s.C;
      const acc_t scale = aff.scale[c], shift = aff.shift[c];
      const scalar_t* yc = yp + plane * s.plane();
      scalar_t* out = pp + plane * s.HO * s.WO;
      uint8_t* win = wp + plane * s.HO * s.WO;
      for (int64_t i = 0; i < s.HO; ++i)
        for (int64_t j = 0; j < s.WO; ++j) {
          acc_t best = 0;
          int off = -1;
          const int64_t rows = std::min(s.PKH, s.HC - i * s.SPH), cols = std::min(s.PKW, s.WC - j * s.SPW);
          for (int64_t ki = 0; ki < rows; ++ki) {
            const scalar_t* row = yc + (i * s.SPH + ki) * s.WC + j * s.SPW;
            for (int64_t kj = 0; kj < cols; ++kj) {
              const acc_t v = activate<acc_t>(scale * static_cast<acc_t>(row[kj]) + shift, a, sl);
              if (off < 0 || pool_takes(v, best)) {
                best = v;
                off = static_cast<int>(ki * s.PKW + kj);
              }
            }
          }
          out[i * s.WO + j] = static_cast<scalar_t>(best);
          win[i * s.WO + j] = static_cast<uint8_t>(off);
        }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_pool2d_forward_cpu(
    const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& bn_weight, const c10::optional<at::Tensor>& bn_bias, c10::IntArrayRef stride,
    c10::IntArrayRef padding, double eps, int64_t activation, double negative_slope, c10::IntArrayRef pool_size,
    c10::IntArrayRef pool_stride, bool ceil_mode) {
  check_same_device("conv_bn_pool2d_forward", {&input, &weight}, bias);
  TORCH_CHECK(input.dim() == 4 && weight.dim() == 4, "aefast::conv_bn_pool2d: input and weight must be 4-D");
  TORCH_CHECK(activation >= 0 && activation < kNumActivations, "aefast::conv_bn_pool2d: unknown activation code ",
              activation);
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2, "aefast::conv_bn_pool2d: stride and padding need two entries");
  // The multiply-adds: the vendor conv (oneDNN), then NCHW so that a channel's plane is contiguous.
  const at::Tensor y = at::convolution(input, weight, bias, stride, padding, {1, 1}, false, {0, 0}, 1).contiguous(
      at::MemoryFormat::Contiguous);
  const BnPoolShape s = check_geometry(y, pool_size, pool_stride, ceil_mode);
  check_bn_params("conv_bn_pool2d_forward", bn_weight, bn_bias, s.C);
  const auto stat_dtype = at::toOpMathType(y.scalar_type());
  at::Tensor mean = at::empty({s.C}, y.options().dtype(stat_dtype));
  at::Tensor var = at::empty({s.C}, y.options().dtype(stat_dtype));
  at::Tensor pooled = empty_cpu_cached({s.N, s.C, s.HO, s.WO}, y.options());
  at::Tensor window = empty_cpu_cached({s.N, s.C, s.HO, s.WO}, y.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "conv_bn_pool2d_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    channel_stats<scalar_t>(y, s, mean, var);
    const auto aff = channel_affine<acc_t>(mean, var, bn_weight, bn_bias, eps, s.C);
    normalize_activate_pool<scalar_t>(y, s, aff, activation, negative_slope, pooled, window);
  });
  // conv_out travels as (N, HC, WC, C), the layout of the tiling path (conv_bn_pool.cpp).
  return {pooled, window, y.permute({0, 2, 3, 1}).contiguous(), mean, var};
}

// ---- backward. Pass 1 (per channel): the pool-sparse sums sum g and sum g*yhat. Pass 2 (per plane):
// dy = c0 + c1*y everywhere, plus gamma*invstd*g at each argmax. Then the vendor conv backward.
template <typename scalar_t>
void bn_input_grad(const at::Tensor& grad, const at::Tensor& window, const at::Tensor& y, const BnPoolShape& s,
                   const ChannelAffine<at::opmath_type<scalar_t>>& aff, const at::Tensor& mean, int64_t act,
                   double slope, bool want_dy, at::Tensor& dy, at::Tensor& sum_g, at::Tensor& sum_gyhat) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* gp = grad.const_data_ptr<scalar_t>();
  const uint8_t* wp = window.const_data_ptr<uint8_t>();
  const scalar_t* yp = y.const_data_ptr<scalar_t>();
  const at::Tensor m = mean.to(at::CppTypeToScalarType<acc_t>::value).contiguous();
  const acc_t* mp = m.const_data_ptr<acc_t>();
  const acc_t sl = static_cast<acc_t>(slope);
  const int a = static_cast<int>(act);
  const int64_t hw = s.plane(), pooled_hw = s.HO * s.WO;
  // g at pooled position q of plane `plane`, and the conv position of its argmax.
  auto routed = [&](int64_t plane, int64_t q, int64_t& pos) -> acc_t {
    const int64_t c = plane % s.C, i = q / s.WO, j = q % s.WO;
    const int off = wp[plane * pooled_hw + q];
    pos = (i * s.SPH + off / s.PKW) * s.WC + j * s.SPW + off % s.PKW;
    const acc_t z = aff.scale[c] * static_cast<acc_t>(yp[plane * hw + pos]) + aff.shift[c];
    return static_cast<acc_t>(gp[plane * pooled_hw + q]) * activation_grad<acc_t>(z, a, sl);
  };
  double* sg = sum_g.mutable_data_ptr<double>();
  double* sgy = sum_gyhat.mutable_data_ptr<double>();
  at::parallel_for(0, s.C, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      double total_g = 0.0, total_gy = 0.0;
      for (int64_t n = 0; n < s.N; ++n) {
        const int64_t plane = n * s.C + c;
        for (int64_t q = 0; q < pooled_hw; ++q) {
          int64_t pos;
          const acc_t g = routed(plane, q, pos);
          const acc_t yhat = (static_cast<acc_t>(yp[plane * hw + pos]) - mp[c]) * aff.invstd[c];
          total_g += static_cast<double>(g);
          total_gy += static_cast<double>(g * yhat);
        }
      }
      sg[c] = total_g;
      sgy[c] = total_gy;
    }
  });
  if (!want_dy) return;
  scalar_t* dp = dy.mutable_data_ptr<scalar_t>();
  const double count = static_cast<double>(s.count());
  at::parallel_for(0, s.N * s.C, 1, [&](int64_t p0, int64_t p1) {
    std::vector<acc_t> kg(s.overlapping() ? hw : 0);  // k * (sum of g) per conv position
    for (int64_t plane = p0; plane < p1; ++plane) {
      const int64_t c = plane % s.C;
      // dy = k*(g - mean_g - yhat*mean_gyhat), k = gamma*invstd, yhat = (y - mean)*invstd
      //    = k*g + c0 + c1*y with c1 = -k*invstd*mean_gyhat, c0 = -k*mean_g - c1*mean.
      const acc_t k = aff.gamma[c] * aff.invstd[c];
      const acc_t mean_g = static_cast<acc_t>(sg[c] / count), mean_gy = static_cast<acc_t>(sgy[c] / count);
      const acc_t cf1 = -k * aff.invstd[c] * mean_gy;
      const acc_t cf0 = -k * mean_g - cf1 * mp[c];
      const scalar_t* yc = yp + plane * hw;
      scalar_t* dc = dp + plane * hw;
      // The dense part in acc_t for the argmax positions, so that k*g is added before rounding.
      for (int64_t e = 0; e < hw; ++e) dc[e] = static_cast<scalar_t>(cf0 + cf1 * static_cast<acc_t>(yc[e]));
      if (!s.overlapping()) {  // each conv position is the argmax of at most one window
        for (int64_t q = 0; q < pooled_hw; ++q) {
          int64_t pos;
          const acc_t g = routed(plane, q, pos);
          dc[pos] = static_cast<scalar_t>(cf0 + cf1 * static_cast<acc_t>(yc[pos]) + k * g);
        }
        continue;
      }
      std::fill(kg.begin(), kg.end(), acc_t(0));
      for (int64_t q = 0; q < pooled_hw; ++q) {
        int64_t pos;
        const acc_t g = routed(plane, q, pos);
        kg[pos] += k * g;
      }
      for (int64_t e = 0; e < hw; ++e)
        if (kg[e] != acc_t(0) || kg[e] != kg[e]) dc[e] = static_cast<scalar_t>(cf0 + cf1 * static_cast<acc_t>(yc[e]) + kg[e]);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_pool2d_backward_cpu(
    const at::Tensor& grad_pooled, const at::Tensor& window, const at::Tensor& conv_out, const at::Tensor& mean,
    const at::Tensor& var, const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bn_weight,
    const c10::optional<at::Tensor>& bn_bias, c10::IntArrayRef stride, c10::IntArrayRef padding, double eps,
    int64_t activation, double negative_slope, c10::IntArrayRef pool_size, std::array<bool, 5> output_mask,
    c10::IntArrayRef pool_stride, bool ceil_mode) {
  check_same_device("conv_bn_pool2d_backward", {&grad_pooled, &window, &conv_out, &mean, &var, &input, &weight});
  TORCH_CHECK(conv_out.dim() == 4 && window.scalar_type() == at::kByte && grad_pooled.sizes() == window.sizes(),
              "aefast::conv_bn_pool2d_backward: grad_pooled and the uint8 window must have the pooled shape");
  TORCH_CHECK(activation >= 0 && activation < kNumActivations,
              "aefast::conv_bn_pool2d_backward: unknown activation code ", activation);
  TORCH_CHECK(conv_out.dim() == 4, "aefast::conv_bn_pool2d_backward: conv_out must be (N, HC, WC, C)");
  const at::Tensor y = conv_out.permute({0, 3, 1, 2}).contiguous();
  const BnPoolShape s = check_geometry(y, pool_size, pool_stride, ceil_mode);
  TORCH_CHECK(grad_pooled.size(0) == s.N && grad_pooled.size(1) == s.C && grad_pooled.size(2) == s.HO &&
                  grad_pooled.size(3) == s.WO && mean.numel() == s.C && var.numel() == s.C,
              "aefast::conv_bn_pool2d_backward: grad_pooled, mean and var do not match conv_out");
  check_bn_params("conv_bn_pool2d_backward", bn_weight, bn_bias, s.C);
  const at::Tensor grad = grad_pooled.to(y.scalar_type()).contiguous();
  const at::Tensor win = window.contiguous();
  const bool want_conv = output_mask[0] || output_mask[1] || output_mask[2];
  at::Tensor sum_g = at::empty({s.C}, y.options().dtype(at::kDouble));
  at::Tensor sum_gyhat = at::empty({s.C}, y.options().dtype(at::kDouble));
  at::Tensor dy = want_conv ? empty_cpu_cached(y.sizes(), y.options()) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "conv_bn_pool2d_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto aff = channel_affine<acc_t>(mean, var, bn_weight, bn_bias, eps, s.C);
    bn_input_grad<scalar_t>(grad, win, y, s, aff, mean, activation, negative_slope, want_conv, dy, sum_g, sum_gyhat);
  });
  at::Tensor grad_input, grad_weight, grad_bias;
  if (want_conv) {
    const int64_t cout = s.C;
    auto grads = at::convolution_backward(dy, input, weight, c10::IntArrayRef(cout), stride, padding, {1, 1}, false,
                                          {0, 0}, 1, {output_mask[0], output_mask[1], output_mask[2]});
    grad_input = std::get<0>(grads);
    grad_weight = std::get<1>(grads);
    grad_bias = std::get<2>(grads);
  }
  // An output the mask leaves out is an empty tensor (the fake function says the same).
  auto or_empty = [&](const at::Tensor& t, bool wanted) {
    return wanted && t.defined() ? t : at::empty({0}, y.options());
  };
  auto param_grad = [&](const at::Tensor& sums, bool wanted, const c10::optional<at::Tensor>& like) {
    if (!wanted || !(like.has_value() && like->defined())) return at::empty({0}, y.options());
    return sums.to(like->scalar_type());
  };
  return {or_empty(grad_input, output_mask[0]), or_empty(grad_weight, output_mask[1]),
          or_empty(grad_bias, output_mask[2]), param_grad(sum_gyhat, output_mask[3], bn_weight),
          param_grad(sum_g, output_mask[4], bn_bias)};
}

}  // namespace

// The entry points conv_bn_pool.cpp routes the non-tiling pools to (conv_bn_pool_general.h).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_pool2d_forward_general(
    const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& bn_weight, const c10::optional<at::Tensor>& bn_bias, c10::IntArrayRef stride,
    c10::IntArrayRef padding, double eps, int64_t activation, double negative_slope, c10::IntArrayRef pool_size,
    c10::IntArrayRef pool_stride, bool ceil_mode) {
  return conv_bn_pool2d_forward_cpu(input, weight, bias, bn_weight, bn_bias, stride, padding, eps, activation,
                                    negative_slope, pool_size, pool_stride, ceil_mode);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_pool2d_backward_general(
    const at::Tensor& grad_pooled, const at::Tensor& window, const at::Tensor& conv_out, const at::Tensor& mean,
    const at::Tensor& var, const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bn_weight,
    const c10::optional<at::Tensor>& bn_bias, c10::IntArrayRef stride, c10::IntArrayRef padding, double eps,
    int64_t activation, double negative_slope, c10::IntArrayRef pool_size, std::array<bool, 5> output_mask,
    c10::IntArrayRef pool_stride, bool ceil_mode) {
  return conv_bn_pool2d_backward_cpu(grad_pooled, window, conv_out, mean, var, input, weight, bn_weight, bn_bias,
                                     stride, padding, eps, activation, negative_slope, pool_size, output_mask,
                                     pool_stride, ceil_mode);
}

}  // namespace aefast
