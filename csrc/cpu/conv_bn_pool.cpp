// CPU kernels of the conv_bn_pool family: conv -> BatchNorm (training mode, batch statistics) ->
// activation -> non-overlapping max-pool with argmax, and its backward. The passes and the
// gradient formula are derived in aefast/ops/conv_bn_pool.py; in short, per output channel c,
// with y = conv2d(x, w, b) (N, C, HC, WC), M = N*HC*WC, mean_c, var_c (biased) over (n, h, w):
//   scale_c = gamma_c / sqrt(var_c + eps), shift_c = beta_c - mean_c * scale_c
//   z = scale_c * y + shift_c,  a = act(z),  pooled = max over each window of a (torch's rule).
// Backward, g = grad_pooled * act'(z) at each window's argmax (zero elsewhere), yhat = (y-mean)*invstd:
//   dbeta_c = sum g,  dgamma_c = sum g*yhat   (pool-sparse sums)
//   dy = gamma*invstd*(g - dbeta/M - yhat*dgamma/M) = c0_c + c1_c * (y - mean_c) + gamma_c*invstd_c * g
// which is dense; it is written once and handed to the vendor conv backward
// (at::convolution_backward: oneDNN) for dx, dw and db.
//
// The multiply-adds are the vendor's (at::convolution / at::convolution_backward), in channels-last,
// oneDNN's fast layout (an NCHW input is transposed in, grad_input back out, by a tiled transpose),
// except where the rules of csrc/cpu/conv_direct.cpp (small channel counts: oneDNN's slow shapes) or
// csrc/cpu/conv_transpose_gemm.cpp (grad_input) take the forward, grad_weight or grad_input.
// aefast's part is memory-bound and lives in conv_bn_pool_kernels.inc, built per ISA, vectorised
// over channels: the channel statistics (one pass over y, shifted sums in double), the normalise ->
// activate -> pool -> argmax epilogue (one pass over y, writes only pooled-size tensors) and, in
// the backward, the pool-sparse sums (pooled-size reads plus y at each argmax) and the dense dy (one
// pass). Work is split into rows and every reduction adds the rows' partials in a fixed order, so
// results do not depend on the thread count.
//
// Any pool geometry (EncoderPool, conv_pool_general.h): windows (PKH, PKW) at (i*SPH, j*SPW), clipped
// at the conv output's edge in ceil_mode, overlapping when the pool stride is below the window (a
// conv position may then be the argmax of several windows, and its g is their sum, added in a fixed
// order: scatter_window_grads). The geometry lives in check_geometry (output size), window_offsets /
// window_rows_cols (a window offset's position), and in conv_bn_pool_kernels.inc.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include "conv_pool_general.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <type_traits>
#include <vector>

#include "aefast/conv_pool.h"
#include "aefast/cpu_isa.h"
#include "aefast/conv_transpose_gemm.h"
#include "aefast/conv_direct.h"
#include "aefast/cpu_buffer_cache.h"
#include "aefast/torch_utils.h"

namespace aefast {
namespace {

EncoderPool check_geometry(const at::Tensor& conv_out, c10::IntArrayRef pool, c10::IntArrayRef pool_stride,
                            bool ceil_mode) {
  TORCH_CHECK(pool.size() == 2 && pool[0] > 0 && pool[1] > 0 && pool[0] * pool[1] <= 255,
              "aefast::conv_bn_pool2d: pool_size needs two positive entries with at most 255 elements in a window");
  TORCH_CHECK(pool_stride.size() == 2 && pool_stride[0] >= 0 && pool_stride[1] >= 0,
              "aefast::conv_bn_pool2d: pool_stride needs two non-negative entries (0: pool_size)");
  EncoderPool s{conv_out.size(0), conv_out.size(1), conv_out.size(2), conv_out.size(3), pool[0], pool[1],
                 resolve_pool_stride(pool_stride[0], pool[0]), resolve_pool_stride(pool_stride[1], pool[1]), 0, 0};
  TORCH_CHECK(s.HC >= s.PKH && s.WC >= s.PKW, "aefast::conv_bn_pool2d: the conv output ", s.HC, "x", s.WC,
              " is smaller than the pool window");
  TORCH_CHECK(s.count() > 1, "aefast::conv_bn_pool2d: expected more than 1 value per channel when training");
  s.HO = pool_out_extent(s.HC, s.PKH, s.SPH, ceil_mode);
  s.WO = pool_out_extent(s.WC, s.PKW, s.SPW, ceil_mode);
  return s;
}

// Offset in the channels-last y of window offset k from the window's first value: a table, because
// an integer division by the runtime pool width per element costs more than the pool.
std::vector<int64_t> window_offsets(const EncoderPool& s) {
  std::vector<int64_t> offk(256, 0);
  for (int64_t k = 0; k < s.PKH * s.PKW; ++k) offk[k] = ((k / s.PKW) * s.WC + k % s.PKW) * s.C;
  return offk;
}

#define AEFAST_PER_ISA_KERNELS "conv_bn_pool_kernels.inc"
#include "per_isa.inc"

// The kernels of conv_bn_pool_kernels.inc for one ISA, activation and dtype.
template <typename scalar_t, typename acc_t>
struct BnPoolKernels {
  void (*moments)(const scalar_t*, int64_t, int64_t, const double*, double*, double*);
  void (*pool_row)(const scalar_t*, const EncoderPool&, int64_t, const acc_t*, const acc_t*, acc_t, acc_t*, acc_t*,
                   acc_t*, acc_t*, int32_t*, scalar_t*, uint8_t*, scalar_t*);
  void (*routed)(const scalar_t*, const uint8_t*, const scalar_t*, const int64_t*, const EncoderPool&, int64_t,
                 const acc_t*, const acc_t*, const acc_t*, const acc_t*, acc_t, acc_t*, double*, double*);
  void (*affine)(const scalar_t*, int64_t, int64_t, const acc_t*, const acc_t*, const acc_t*, acc_t*);
  void (*scatter)(const acc_t*, const uint8_t*, const int32_t*, const int32_t*, const EncoderPool&, int64_t, int64_t,
                  const acc_t*, acc_t*);
  void (*round)(const acc_t*, int64_t, scalar_t*);
};

#define AEFAST_BN_POOL_KERNELS(NS, ACT)                                                                          \
  BnPoolKernels<scalar_t, acc_t> {                                                                               \
    &NS::row_moments<scalar_t, acc_t>, &NS::activate_pool_row<ACT, false, scalar_t, scalar_t, acc_t>,            \
        &NS::routed_grad_row<ACT, scalar_t, acc_t>, &NS::affine_rows<scalar_t, acc_t>,                           \
        &NS::scatter_window_grads<acc_t>, &NS::round_rows<scalar_t, acc_t>                                       \
  }

template <typename scalar_t, typename acc_t, int ACT>
BnPoolKernels<scalar_t, acc_t> pick_isa_kernels(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return AEFAST_BN_POOL_KERNELS(avx512, ACT);
    case Isa::kAvx2: return AEFAST_BN_POOL_KERNELS(avx2, ACT);
    default: return AEFAST_BN_POOL_KERNELS(generic, ACT);
  }
}
#undef AEFAST_BN_POOL_KERNELS

template <typename scalar_t, typename acc_t>
BnPoolKernels<scalar_t, acc_t> pick_kernels(int64_t act) {
  const Isa isa = cpu_isa();
  return with_activation(act, [&](auto a) { return pick_isa_kernels<scalar_t, acc_t, decltype(a)::value>(isa); });
}

// mean_c and the biased var_c of the channels-last y over (n, h, w) in one pass: per conv row (in
// parallel) the shifted moments of row_moments, then the rows added in (n, h) order, in double.
template <typename scalar_t>
void channel_stats(const at::Tensor& y, const EncoderPool& s, const BnPoolKernels<scalar_t, at::opmath_type<scalar_t>>& kern,
                   at::Tensor& mean, at::Tensor& var) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* yp = y.const_data_ptr<scalar_t>();
  acc_t* mp = mean.mutable_data_ptr<acc_t>();
  acc_t* vp = var.mutable_data_ptr<acc_t>();
  const int64_t C = s.C, rows = s.N * s.HC;
  std::vector<double> shift(C);
  for (int64_t c = 0; c < C; ++c) shift[c] = static_cast<double>(static_cast<acc_t>(yp[c]));
  at::Tensor partial_t = empty_cpu_cached({rows, 2, C}, y.options().dtype(at::kDouble));
  double* partial = partial_t.mutable_data_ptr<double>();
  at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      kern.moments(yp + r * s.WC * C, s.WC, C, shift.data(), partial + 2 * r * C, partial + (2 * r + 1) * C);
  });
  std::vector<double> s1(C, 0.0), s2(C, 0.0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < C; ++c) {
      s1[c] += partial[2 * r * C + c];
      s2[c] += partial[(2 * r + 1) * C + c];
    }
  const double count = static_cast<double>(s.count());
  for (int64_t c = 0; c < C; ++c) {
    const double d = s1[c] / count;
    mp[c] = static_cast<acc_t>(shift[c] + d);
    vp[c] = static_cast<acc_t>(std::max(s2[c] / count - d * d, 0.0));
  }
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

}  // namespace

// ---- layouts (declared in conv_pool_general.h). The convs run channels-last; an NCHW input is
// converted and grad_input converted back with a tiled transpose (torch's strided copy_ ran at
// ~1 GB/s for 64-channel 64x64 images, where a plane stride of 16 KiB lands every channel of a
// pixel in one L1 set). A channels-last input goes through untouched.
namespace {
// dst[n][c][r] = src[n][r][c] over N blocks of (R, Cc), tiles of kTile x kTile, in parallel.
constexpr int64_t kTile = 16;
template <typename T>
void transpose_images(const T* src, T* dst, int64_t N, int64_t R, int64_t Cc) {
  const int64_t row_tiles = (R + kTile - 1) / kTile;
  at::parallel_for(0, N * row_tiles, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n = b / row_tiles, r0 = (b % row_tiles) * kTile, r1 = std::min(R, r0 + kTile);
      const T* s = src + n * R * Cc;
      T* d = dst + n * R * Cc;
      for (int64_t c0 = 0; c0 < Cc; c0 += kTile) {
        const int64_t c1 = std::min(Cc, c0 + kTile);
        for (int64_t c = c0; c < c1; ++c)
          for (int64_t r = r0; r < r1; ++r) d[c * R + r] = s[r * Cc + c];
      }
    }
  });
}
}  // namespace

// The layouts coincide when C == 1 or H*W == 1: torch would then see NCHW and the conv would
// answer NCHW, so the strides are restated.
at::Tensor as_channels_last(const at::Tensor& t) {
  if (t.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    if (t.suggest_memory_format() == at::MemoryFormat::ChannelsLast) return t;
    return t.as_strided(t.sizes(), c10::get_channels_last_strides_2d(t.sizes()), t.storage_offset());
  }
  const at::Tensor src = t.contiguous();
  // through the buffer cache: a fresh multi-MB buffer page-faults on every call
  at::Tensor out = empty_cpu_cached(t.sizes(), t.options(), at::MemoryFormat::ChannelsLast);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "aefast_channels_last", [&] {
    transpose_images<scalar_t>(src.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), t.size(0), t.size(1),
                               t.size(2) * t.size(3));
  });
  return out;
}

at::Tensor in_memory_format(const at::Tensor& t, at::MemoryFormat format) {
  if (t.is_contiguous(format)) return t;
  if (format != at::MemoryFormat::Contiguous || !t.is_contiguous(at::MemoryFormat::ChannelsLast))
    return t.contiguous(format);
  at::Tensor out = empty_cpu_cached(t.sizes(), t.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "aefast_nchw", [&] {
    transpose_images<scalar_t>(t.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), t.size(0),
                               t.size(2) * t.size(3), t.size(1));
  });
  return out;
}

namespace {

// ---- forward epilogue: per pooled row (n, i), in parallel, activate_pool_row (the pooling loop,
// conv_bn_pool_kernels.inc) over its windows in the channels-last y, then each channel's run of WO
// values out to pooled (input dtype) and window (uint8), NCHW. (Storing NCHW straight from the
// channel loop would store with a stride of a whole plane, often a multiple of 4 KiB: one L1 set.)
template <typename scalar_t>
void normalize_activate_pool(const at::Tensor& y, const EncoderPool& s, const ChannelAffine<at::opmath_type<scalar_t>>& aff,
                             const BnPoolKernels<scalar_t, at::opmath_type<scalar_t>>& kern, double slope,
                             at::Tensor& pooled, at::Tensor& window) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* yp = y.const_data_ptr<scalar_t>();
  scalar_t* pp = pooled.mutable_data_ptr<scalar_t>();
  uint8_t* wp = window.mutable_data_ptr<uint8_t>();
  const acc_t sl = static_cast<acc_t>(slope);
  const int64_t C = s.C, image = s.plane() * C, pooled_hw = s.HO * s.WO;
  at::parallel_for(0, s.N * s.HO, 1, [&](int64_t u0, int64_t u1) {
    std::vector<acc_t> best(C), act(C);
    std::vector<int32_t> off(C);
    std::vector<scalar_t> pbuf(C * s.WO);
    std::vector<uint8_t> wbuf(C * s.WO);
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t n = u / s.HO, i = u % s.HO;
      kern.pool_row(yp + n * image, s, i, aff.scale.data(), aff.shift.data(), sl, best.data(), nullptr, act.data(),
                    nullptr, off.data(), pbuf.data(), wbuf.data(), nullptr);
      for (int64_t c = 0; c < C; ++c) {
        const int64_t dst = (n * C + c) * pooled_hw + i * s.WO;
        std::copy(pbuf.begin() + c * s.WO, pbuf.begin() + (c + 1) * s.WO, pp + dst);
        std::copy(wbuf.begin() + c * s.WO, wbuf.begin() + (c + 1) * s.WO, wp + dst);
      }
    }
  });
}

// ---- 1x1 windows at stride 1 (no pool: conv -> BatchNorm -> act, aefast.optimize's rewrite of a conv
// VAE's stride-2 encoder). The pool is then the identity and the op is the conv followed by
// batch_norm_act2d, whose kernels (csrc/cpu/batch_norm_act.cpp: statistics, normalise -> activate,
// and the two backward passes, vectorised over channels in channels-last, fixed-order sums) are
// the same math without the window bookkeeping: measured fp32, 1 thread, process_time, under load,
// N128 C8 8x8 channels-last, forward epilogue 22 us there vs ~185 us here, backward 33 vs ~200 us.
// The pooled map keeps this op's contract (NCHW-contiguous) and the window offsets are all 0.
bool identity_pool(const EncoderPool& s) { return s.PKH == 1 && s.PKW == 1 && s.SPH == 1 && s.SPW == 1; }
constexpr int64_t kSmallPlane = 64;  // conv output positions per image (see the forward)

using Three = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using BnActForwardSig = Three(const at::Tensor&, const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&,
                              double, int64_t, double);
using BnActBackwardSig = Three(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                               const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, double, int64_t,
                               double, std::array<bool, 3>);

const c10::TypedOperatorHandle<BnActForwardSig>& bn_act_forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("aefast::batch_norm_act2d_forward", "")
                             .typed<BnActForwardSig>();
  return op;
}

const c10::TypedOperatorHandle<BnActBackwardSig>& bn_act_backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("aefast::batch_norm_act2d_backward", "")
                             .typed<BnActBackwardSig>();
  return op;
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
  // The multiply-adds: the vendor conv (oneDNN) in channels-last, its fast layout here (measured
  // 1.7-1.8x faster than NCHW, which oneDNN computes blocked and reorders), for NCHW inputs too.
  TORCH_CHECK(weight.size(3) <= input.size(3) + 2 * padding[1] && stride[1] > 0,
              "aefast::conv_bn_pool2d: the conv output is empty");
  const int64_t conv_w = (input.size(3) + 2 * padding[1] - weight.size(3)) / stride[1] + 1;
  // Except for small conv outputs under 1x1 windows (kSmallPlane, the one place this rule lives),
  // where the input's own layout was measured faster (fp32, 1 thread, process_time, under load:
  // N128 1->8 16x16 -> 8x8 stride 2: 68 us NCHW vs 151 us given channels-last, N128 8->16 8x8 -> 4x4:
  // 63 vs 87), the transposition of y to channels-last included.
  const int64_t conv_h = (input.size(2) + 2 * padding[0] - weight.size(2)) / std::max<int64_t>(stride[0], 1) + 1;
  const bool one_by_one = pool_size.size() == 2 && pool_size[0] == 1 && pool_size[1] == 1 &&
                          pool_stride.size() == 2 && pool_stride[0] <= 1 && pool_stride[1] <= 1;
  // Where oneDNN's forward is the slow one at few channels (conv_forward_direct_serves, the one rule,
  // csrc/cpu/conv_direct.cpp), the conv runs by direct accumulation, straight into channels-last y.
  const at::Tensor y = [&] {
    if (conv_forward_direct_serves(input, weight, stride, padding) && (!bias.has_value() || !bias->defined() ||
                                                      bias->scalar_type() == input.scalar_type()))
      return conv_forward_direct(input, weight, bias, stride, padding);
    const at::Tensor conv_in = one_by_one && conv_h * conv_w <= kSmallPlane ? input : conv_operand(input, conv_w);
    return as_channels_last(at::convolution(conv_in, weight, bias, stride, padding, {1, 1}, false, {0, 0}, 1));
  }();
  const EncoderPool s = check_geometry(y, pool_size, pool_stride, ceil_mode);
  check_bn_params("conv_bn_pool2d_forward", bn_weight, bn_bias, s.C);
  const auto stat_dtype = at::toOpMathType(y.scalar_type());
  at::Tensor mean = at::empty({s.C}, y.options().dtype(stat_dtype));
  at::Tensor var = at::empty({s.C}, y.options().dtype(stat_dtype));
  if (identity_pool(s)) {
    // Below the autograd keys: this runs inside this op's CPU kernel, whose autograd is this op's.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, bn_mean, bn_var] = bn_act_forward_op().call(y, bn_weight, bn_bias, eps, activation, negative_slope);
    return {in_memory_format(out, at::MemoryFormat::Contiguous),
            zeros_cpu_cached({s.N, s.C, s.HO, s.WO}, y.options().dtype(at::kByte)), y.permute({0, 2, 3, 1}), bn_mean,
            bn_var};
  }
  at::Tensor pooled = empty_cpu_cached({s.N, s.C, s.HO, s.WO}, y.options());
  at::Tensor window = empty_cpu_cached({s.N, s.C, s.HO, s.WO}, y.options().dtype(at::kByte));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "conv_bn_pool2d_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto kern = pick_kernels<scalar_t, acc_t>(activation);
    channel_stats<scalar_t>(y, s, kern, mean, var);
    const auto aff = channel_affine<acc_t>(mean, var, bn_weight, bn_bias, eps, s.C);
    normalize_activate_pool<scalar_t>(y, s, aff, kern, negative_slope, pooled, window);
  });
  // conv_out is handed out as (N, HC, WC, C), a plain contiguous tensor: channels-last memory without
  // NCHW strides that torch.compile would have to be told about.
  return {pooled, window, y.permute({0, 2, 3, 1}), mean, var};
}

// ---- backward. Pass 1 (per pooled row, in parallel): g at each argmax into a pooled-size buffer and
// the row's partial sums of g and g*yhat per channel, then the rows added in (n, i) order (double).
// Pass 2 (per band of conv rows, EncoderPool::band_begin, in parallel): dy = c0 + c1*(y - mean)
// everywhere, plus gamma*invstd*g at each argmax (summed over the windows that share it), in acc_t
// and rounded once, written channels-last. Then the vendor conv backward.
template <typename scalar_t>
void bn_input_grad(const at::Tensor& grad, const at::Tensor& window, const at::Tensor& y, const EncoderPool& s,
                   const ChannelAffine<at::opmath_type<scalar_t>>& aff, const at::Tensor& mean,
                   const BnPoolKernels<scalar_t, at::opmath_type<scalar_t>>& kern, double slope, bool want_dy,
                   at::Tensor& dy, at::Tensor& sum_g, at::Tensor& sum_gyhat) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* gp = grad.const_data_ptr<scalar_t>();
  const uint8_t* wp = window.const_data_ptr<uint8_t>();
  const scalar_t* yp = y.const_data_ptr<scalar_t>();
  const at::Tensor m = mean.to(at::CppTypeToScalarType<acc_t>::value).contiguous();
  const acc_t* mp = m.const_data_ptr<acc_t>();
  const acc_t sl = static_cast<acc_t>(slope);
  const int64_t C = s.C, image = s.plane() * C, pooled_hw = s.HO * s.WO, units = s.N * s.HO;
  const std::vector<int64_t> offk = window_offsets(s);
  at::Tensor routed = empty_cpu_cached({s.N * C * pooled_hw}, y.options().dtype(at::CppTypeToScalarType<acc_t>::value));
  acc_t* rp = routed.mutable_data_ptr<acc_t>();
  at::Tensor partial_t = empty_cpu_cached({units, 2, C}, y.options().dtype(at::kDouble));
  double* partial = partial_t.mutable_data_ptr<double>();
  at::parallel_for(0, units, 1, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t n = u / s.HO, i = u % s.HO;
      kern.routed(gp + n * C * pooled_hw, wp + n * C * pooled_hw, yp + n * image, offk.data(), s, i, aff.scale.data(),
                  aff.shift.data(), mp, aff.invstd.data(), sl, rp + n * C * pooled_hw, partial + 2 * u * C,
                  partial + (2 * u + 1) * C);
    }
  });
  double* sg = sum_g.mutable_data_ptr<double>();
  double* sgy = sum_gyhat.mutable_data_ptr<double>();
  for (int64_t c = 0; c < C; ++c) sg[c] = sgy[c] = 0.0;
  for (int64_t u = 0; u < units; ++u)
    for (int64_t c = 0; c < C; ++c) {
      sg[c] += partial[2 * u * C + c];
      sgy[c] += partial[(2 * u + 1) * C + c];
    }
  if (!want_dy) return;
  // dy = k*(g - mean_g - yhat*mean_gyhat), k = gamma*invstd, yhat = (y - mean)*invstd
  //    = k*g + c0 + c1*(y - mean) with c1 = -k*invstd*mean_gyhat, c0 = -k*mean_g.
  const double count = static_cast<double>(s.count());
  std::vector<acc_t> k(C), c0(C), c1(C);
  for (int64_t c = 0; c < C; ++c) {
    k[c] = aff.gamma[c] * aff.invstd[c];
    c1[c] = -k[c] * aff.invstd[c] * static_cast<acc_t>(sgy[c] / count);
    c0[c] = -k[c] * static_cast<acc_t>(sg[c] / count);
  }
  std::array<int32_t, 256> di{}, dj{};
  for (int64_t q = 0; q < s.PKH * s.PKW; ++q) {
    di[q] = static_cast<int32_t>(q / s.PKW);
    dj[q] = static_cast<int32_t>(q % s.PKW);
  }
  scalar_t* dp = dy.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, units, 1, [&](int64_t u0, int64_t u1) {
    std::vector<acc_t> scratch;  // the band in acc_t when dy's type is narrower (one rounding)
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t n = u / s.HO, i = u % s.HO, h0 = s.band_begin(i), h1 = s.band_end(i);
      const int64_t positions = (h1 - h0) * s.WC, first = n * image + h0 * s.WC * C;
      acc_t* band;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        band = dp + first;
      } else {
        scratch.resize(positions * C);
        band = scratch.data();
      }
      kern.affine(yp + first, positions, C, mp, c0.data(), c1.data(), band);
      kern.scatter(rp + n * C * pooled_hw, wp + n * C * pooled_hw, di.data(), dj.data(), s, h0, h1, k.data(), band);
      if constexpr (!std::is_same_v<scalar_t, acc_t>) kern.round(band, positions * C, dp + first);
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
  const at::Tensor y = conv_out.contiguous().permute({0, 3, 1, 2});  // NCHW sizes, channels-last memory
  const EncoderPool s = check_geometry(y, pool_size, pool_stride, ceil_mode);
  TORCH_CHECK(grad_pooled.size(0) == s.N && grad_pooled.size(1) == s.C && grad_pooled.size(2) == s.HO &&
                  grad_pooled.size(3) == s.WO && mean.numel() == s.C && var.numel() == s.C,
              "aefast::conv_bn_pool2d_backward: grad_pooled, mean and var do not match conv_out");
  check_bn_params("conv_bn_pool2d_backward", bn_weight, bn_bias, s.C);
  const at::Tensor grad = grad_pooled.to(y.scalar_type()).contiguous();
  const at::Tensor win = window.contiguous();
  const bool want_conv = output_mask[0] || output_mask[1] || output_mask[2];
  at::Tensor sum_g = at::empty({s.C}, y.options().dtype(at::kDouble));
  at::Tensor sum_gyhat = at::empty({s.C}, y.options().dtype(at::kDouble));
  // dy channels-last, as y (a cached (N, HC, WC, C) buffer seen as NCHW)
  at::Tensor dy = want_conv && !identity_pool(s) ? empty_cpu_cached({s.N, s.HC, s.WC, s.C}, y.options()).permute({0, 3, 1, 2})
                                                 : at::Tensor();
  at::Tensor bn_act_grad_weight, bn_act_grad_bias;  // the 1x1 windows' (identity_pool) BatchNorm gradients
  if (identity_pool(s)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::tie(dy, bn_act_grad_weight, bn_act_grad_bias) =
        bn_act_backward_op().call(grad, y, mean, var, bn_weight, bn_bias, eps, activation, negative_slope,
                                  {want_conv, output_mask[3], output_mask[4]});
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "conv_bn_pool2d_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const auto aff = channel_affine<acc_t>(mean, var, bn_weight, bn_bias, eps, s.C);
      const auto kern = pick_kernels<scalar_t, acc_t>(activation);
      bn_input_grad<scalar_t>(grad, win, y, s, aff, mean, kern, negative_slope, want_conv, dy, sum_g, sum_gyhat);
    });
  }
  at::Tensor grad_input, grad_weight, grad_bias;
  if (want_conv) {
    const int64_t cout = s.C;
    // channels-last like the forward's conv; grad_input back in the input's own layout
    // grad_input is the transposed conv of dy with the conv's weight: where the one rule
    // (conv_transpose_gemm_serves, csrc/cpu/conv_transpose_gemm.cpp) says oneDNN's backward-data
    // primitive is the slow one, it runs as one GEMM plus a col2im, in the input's own layout.
    const bool gemm_grad_input = output_mask[0] && conv_transpose_gemm_serves(dy, weight, stride);
    // grad_weight and grad_bias: by direct accumulation where its rule (conv_weight_grad_direct_serves,
    // csrc/cpu/conv_direct.cpp) says oneDNN's backward-weights primitive is the slow one.
    const bool direct_weight_grad = (output_mask[1] || output_mask[2]) && weight.scalar_type() == dy.scalar_type() &&
                                    conv_weight_grad_direct_serves(dy, input, weight.size(2), weight.size(3));
    const bool vendor_input_grad = output_mask[0] && !gemm_grad_input;
    const bool vendor_weight_grad = (output_mask[1] || output_mask[2]) && !direct_weight_grad;
    std::tuple<at::Tensor, at::Tensor, at::Tensor> grads;
    if (vendor_input_grad || vendor_weight_grad)
      grads = at::convolution_backward(dy, conv_operand(input, s.WC), weight,
                                       c10::IntArrayRef(cout), stride, padding, {1, 1}, false, {0, 0}, 1,
                                       {vendor_input_grad, vendor_weight_grad && output_mask[1],
                                        vendor_weight_grad && output_mask[2]});
    if (direct_weight_grad)
      std::tie(std::get<1>(grads), std::get<2>(grads)) =
          conv_weight_grad_direct(dy, input, weight.size(2), weight.size(3), stride, padding, output_mask[2]);
    grad_input = std::get<0>(grads);
    if (gemm_grad_input)
      grad_input = conv_transpose_gemm(dy, weight, std::nullopt, stride, padding, input.size(2), input.size(3),
                                       input.suggest_memory_format());
    else if (grad_input.defined())
      grad_input = in_memory_format(grad_input, input.suggest_memory_format());
    if (std::get<1>(grads).defined()) std::get<1>(grads) = std::get<1>(grads).contiguous(weight.suggest_memory_format());
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
  if (identity_pool(s))
    return {or_empty(grad_input, output_mask[0]), or_empty(grad_weight, output_mask[1]),
            or_empty(grad_bias, output_mask[2]), or_empty(bn_act_grad_weight, output_mask[3]),
            or_empty(bn_act_grad_bias, output_mask[4])};
  return {or_empty(grad_input, output_mask[0]), or_empty(grad_weight, output_mask[1]),
          or_empty(grad_bias, output_mask[2]), param_grad(sum_gyhat, output_mask[3], bn_weight),
          param_grad(sum_g, output_mask[4], bn_bias)};
}

}  // namespace

TORCH_LIBRARY_IMPL(aefast, CPU, m) {
  m.impl("conv_bn_pool2d_forward", &conv_bn_pool2d_forward_cpu);
  m.impl("conv_bn_pool2d_backward", &conv_bn_pool2d_backward_cpu);
}

}  // namespace aefast
