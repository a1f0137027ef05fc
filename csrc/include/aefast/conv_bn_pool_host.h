#pragma once
// aefast::conv_bn_pool2d_forward / _backward for the CUDA backend, executor-generic: Exec is the
// CUDA grid-stride launcher (aefast/cuda_exec.cuh, csrc/cuda/conv_bn_pool.cu) or the CPU loop of
// csrc/cpu/emulate_cuda_bodies.cpp, which runs the same bodies (aefast/conv_bn_pool_body.h) in the
// tests. The formulas are derived in aefast/ops/conv_bn_pool.py.
//
// The multiply-adds are the vendor's: at::convolution and at::convolution_backward (cuDNN on the
// GPU, TF32 as torch.backends.cudnn.allow_tf32 says), channels-last, so that the conv output y is
// (N, HC, WC, C) in memory: the op's conv_out. aefast's part, all memory-bound, deterministic:
//   forward   BnMomentsBody (chunk x channel shifted sums, double), BnStatsCombineBody (chunks in
//             order: mean, var and the channel constants), BnActPoolBody (normalise -> act ->
//             round -> pool -> argmax, pooled-size writes only);
//   backward  BnRoutedSumsBody (g at each argmax and the chunk sums of g and g*yhat),
//             BnSumsCombineBody (grad_beta, grad_gamma, the dense constants), BnDenseGradBody (the
//             dense dL/dy, gathered, written once), then the vendor conv backward.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <array>
#include <optional>
#include <tuple>

#include "aefast/conv_bn_pool_body.h"
#include "aefast/conv_pool.h"

namespace aefast {

// Threads the reductions aim for (chunks x channels): enough to fill a GPU, while the in-order
// combines over the chunks stay short. The emulation's tests pass smaller counts (longer chunks).
constexpr int64_t kBnReductionThreads = 64 * 1024;

// Rows per chunk of a reduction over `rows` rows for `channels` channels.
inline int64_t bn_chunk(int64_t rows, int64_t channels, int64_t threads) {
  TORCH_CHECK(threads > 0, "aefast::conv_bn_pool2d: reduction_threads must be positive");
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(rows, threads / std::max<int64_t>(channels, 1)));
  return (rows + chunks - 1) / chunks;
}

// The checks of the CPU op (csrc/cpu/conv_bn_pool.cpp), for direct torch.ops calls.
inline BnPoolShape bn_pool_shape(int64_t N, int64_t C, int64_t HC, int64_t WC, c10::IntArrayRef pool,
                                 c10::IntArrayRef pool_stride, bool ceil_mode) {
  TORCH_CHECK(pool.size() == 2 && pool[0] > 0 && pool[1] > 0 && pool[0] * pool[1] <= 255,
              "aefast::conv_bn_pool2d: pool_size needs two positive entries with at most 255 elements in a window");
  TORCH_CHECK(pool_stride.size() == 2 && pool_stride[0] >= 0 && pool_stride[1] >= 0,
              "aefast::conv_bn_pool2d: pool_stride needs two non-negative entries (0: pool_size)");
  BnPoolShape s{N, C, HC, WC, 0, 0, pool[0], pool[1], resolve_pool_stride(pool_stride[0], pool[0]),
                resolve_pool_stride(pool_stride[1], pool[1])};
  TORCH_CHECK(s.HC >= s.PKH && s.WC >= s.PKW, "aefast::conv_bn_pool2d: the conv output ", s.HC, "x", s.WC,
              " is smaller than the pool window");
  TORCH_CHECK(s.count() > 1, "aefast::conv_bn_pool2d: expected more than 1 value per channel when training");
  s.HO = pool_out_extent(s.HC, s.PKH, s.SPH, ceil_mode);
  s.WO = pool_out_extent(s.WC, s.PKW, s.SPW, ceil_mode);
  return s;
}

inline at::Tensor bn_param(const std::optional<at::Tensor>& t, at::ScalarType acc, int64_t C) {
  if (!(t.has_value() && t->defined())) return at::Tensor();
  TORCH_CHECK(t->dim() == 1 && t->size(0) == C, "aefast::conv_bn_pool2d: bn_weight and bn_bias must have shape (", C,
              ",)");
  return t->to(acc).contiguous();
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

template <class Exec>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_pool2d_forward_op(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias, c10::IntArrayRef stride,
    c10::IntArrayRef padding, double eps, int64_t activation, double negative_slope, c10::IntArrayRef pool_size,
    c10::IntArrayRef pool_stride, bool ceil_mode, int64_t reduction_threads = kBnReductionThreads) {
  TORCH_CHECK(input.dim() == 4 && weight.dim() == 4, "aefast::conv_bn_pool2d: input and weight must be 4-D");
  TORCH_CHECK(activation >= 0 && activation < kNumActivations, "aefast::conv_bn_pool2d: unknown activation code ",
              activation);
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2, "aefast::conv_bn_pool2d: stride and padding need two entries");
  const at::Tensor y4 = at::convolution(input.contiguous(at::MemoryFormat::ChannelsLast), weight, bias, stride, padding,
                                        {1, 1}, false, {0, 0}, 1);
  const at::Tensor y = y4.permute({0, 2, 3, 1}).contiguous();  // (N, HC, WC, C); no copy when channels-last
  const BnPoolShape s = bn_pool_shape(y.size(0), y.size(3), y.size(1), y.size(2), pool_size, pool_stride, ceil_mode);
  const auto acc = at::toOpMathType(y.scalar_type());
  const at::Tensor gamma = bn_param(bn_weight, acc, s.C), beta = bn_param(bn_bias, acc, s.C);
  at::Tensor mean = at::empty({s.C}, y.options().dtype(acc));
  at::Tensor var = at::empty({s.C}, y.options().dtype(acc));
  at::Tensor params = at::empty({kBnParamRows, s.C}, y.options().dtype(acc));
  at::Tensor pooled = at::empty({s.N, s.C, s.HO, s.WO}, y.options());
  at::Tensor window = at::empty({s.N, s.C, s.HO, s.WO}, y.options().dtype(at::kByte));
  const int64_t M = s.count(), chunk = bn_chunk(M, s.C, reduction_threads), chunks = (M + chunk - 1) / chunk;
  at::Tensor partial = at::empty({chunks, 2, s.C}, y.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "conv_bn_pool2d_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* yp = y.const_data_ptr<scalar_t>();
    Exec::for_each(BnMomentsBody<scalar_t, acc_t>{yp, partial.mutable_data_ptr<double>(), M, s.C, chunk}, chunks * s.C);
    Exec::for_each(BnStatsCombineBody<scalar_t, acc_t>{yp, partial.const_data_ptr<double>(), mean.mutable_data_ptr<acc_t>(),
                                                       var.mutable_data_ptr<acc_t>(), M, s.C, chunks},
                   s.C);
    Exec::for_each(BnParamsBody<acc_t>{mean.const_data_ptr<acc_t>(), var.const_data_ptr<acc_t>(), ptr_or_null<acc_t>(gamma),
                                       ptr_or_null<acc_t>(beta), params.mutable_data_ptr<acc_t>(), s.C,
                                       static_cast<acc_t>(eps)},
                   s.C);
    Exec::for_each(BnActPoolBody<scalar_t, acc_t>{yp, params.const_data_ptr<acc_t>(), pooled.mutable_data_ptr<scalar_t>(),
                                                  window.mutable_data_ptr<uint8_t>(), s, static_cast<int>(activation),
                                                  static_cast<acc_t>(negative_slope)},
                   s.pooled_positions() * s.C);
  });
  return {pooled, window, y, mean, var};
}

template <class Exec>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_pool2d_backward_op(
    const at::Tensor& grad_pooled, const at::Tensor& window, const at::Tensor& conv_out, const at::Tensor& mean,
    const at::Tensor& var, const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bn_weight,
    const std::optional<at::Tensor>& bn_bias, c10::IntArrayRef stride, c10::IntArrayRef padding, double eps,
    int64_t activation, double negative_slope, c10::IntArrayRef pool_size, std::array<bool, 5> output_mask,
    c10::IntArrayRef pool_stride, bool ceil_mode, int64_t reduction_threads = kBnReductionThreads) {
  TORCH_CHECK(conv_out.dim() == 4 && window.scalar_type() == at::kByte && grad_pooled.sizes() == window.sizes(),
              "aefast::conv_bn_pool2d_backward: grad_pooled and the uint8 window must have the pooled shape");
  TORCH_CHECK(activation >= 0 && activation < kNumActivations,
              "aefast::conv_bn_pool2d_backward: unknown activation code ", activation);
  const at::Tensor y = conv_out.contiguous();  // (N, HC, WC, C)
  const BnPoolShape s = bn_pool_shape(y.size(0), y.size(3), y.size(1), y.size(2), pool_size, pool_stride, ceil_mode);
  TORCH_CHECK(grad_pooled.dim() == 4 && grad_pooled.size(0) == s.N && grad_pooled.size(1) == s.C &&
                  grad_pooled.size(2) == s.HO && grad_pooled.size(3) == s.WO && mean.numel() == s.C &&
                  var.numel() == s.C,
              "aefast::conv_bn_pool2d_backward: grad_pooled, mean and var do not match conv_out");
  const auto acc = at::toOpMathType(y.scalar_type());
  const at::Tensor gamma = bn_param(bn_weight, acc, s.C), beta = bn_param(bn_bias, acc, s.C);
  const at::Tensor grad = grad_pooled.to(y.scalar_type()).contiguous();
  const at::Tensor win = window.contiguous();
  const bool want_conv = output_mask[0] || output_mask[1] || output_mask[2];
  const int64_t M = s.count(), P = s.pooled_positions(), chunk = bn_chunk(P, s.C, reduction_threads), chunks = (P + chunk - 1) / chunk;
  at::Tensor sums = at::empty({2, s.C}, y.options().dtype(at::kDouble));
  at::Tensor partial = at::empty({chunks, 2, s.C}, y.options().dtype(at::kDouble));
  at::Tensor g = at::empty(grad.sizes(), y.options().dtype(acc));
  at::Tensor dy = want_conv ? at::empty_like(y) : at::Tensor();
  const at::Tensor m = mean.to(acc).contiguous(), v = var.to(acc).contiguous();
  at::Tensor params = at::empty({kBnParamRows, s.C}, y.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "conv_bn_pool2d_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Exec::for_each(BnParamsBody<acc_t>{m.const_data_ptr<acc_t>(), v.const_data_ptr<acc_t>(), ptr_or_null<acc_t>(gamma),
                                       ptr_or_null<acc_t>(beta), params.mutable_data_ptr<acc_t>(), s.C,
                                       static_cast<acc_t>(eps)},
                   s.C);
    Exec::for_each(BnRoutedSumsBody<scalar_t, acc_t>{grad.const_data_ptr<scalar_t>(), win.const_data_ptr<uint8_t>(),
                                                     y.const_data_ptr<scalar_t>(), params.const_data_ptr<acc_t>(),
                                                     g.mutable_data_ptr<acc_t>(), partial.mutable_data_ptr<double>(), s,
                                                     chunk, static_cast<int>(activation),
                                                     static_cast<acc_t>(negative_slope)},
                   chunks * s.C);
    Exec::for_each(BnSumsCombineBody<acc_t>{partial.const_data_ptr<double>(), sums.mutable_data_ptr<double>(),
                                            params.mutable_data_ptr<acc_t>(), M, s.C, chunks},
                   s.C);
    if (want_conv)
      Exec::for_each(BnDenseGradBody<scalar_t, acc_t>{y.const_data_ptr<scalar_t>(), g.const_data_ptr<acc_t>(),
                                                      win.const_data_ptr<uint8_t>(), params.const_data_ptr<acc_t>(),
                                                      dy.mutable_data_ptr<scalar_t>(), s},
                     M * s.C);
  });
  at::Tensor grad_input, grad_weight, grad_bias;
  if (want_conv) {
    const std::array<int64_t, 1> bias_sizes{s.C};
    auto grads = at::convolution_backward(dy.permute({0, 3, 1, 2}), input.contiguous(at::MemoryFormat::ChannelsLast),
                                          weight, c10::IntArrayRef(bias_sizes), stride, padding, {1, 1}, false, {0, 0},
                                          1, {output_mask[0], output_mask[1], output_mask[2]});
    // in the layouts of the input and the weight, as the fake function says
    if (std::get<0>(grads).defined()) grad_input = std::get<0>(grads).contiguous(input.suggest_memory_format());
    if (std::get<1>(grads).defined()) grad_weight = std::get<1>(grads).contiguous(weight.suggest_memory_format());
    grad_bias = std::get<2>(grads);
  }
  auto or_empty = [&](const at::Tensor& t, bool wanted) { return wanted && t.defined() ? t : at::empty({0}, y.options()); };
  auto param_grad = [&](int64_t row, bool wanted, const std::optional<at::Tensor>& like) {
    if (!wanted || !(like.has_value() && like->defined())) return at::empty({0}, y.options());
    return sums[row].to(like->scalar_type());
  };
  return {or_empty(grad_input, output_mask[0]), or_empty(grad_weight, output_mask[1]),
          or_empty(grad_bias, output_mask[2]), param_grad(1, output_mask[3], bn_weight),
          param_grad(0, output_mask[4], bn_bias)};
}

}  // namespace aefast
