#pragma once
// aefast::conv_transpose_act2d: the decoder's upsampler without unpool,
//   out = act(conv_transpose2d(input, W, b, stride, padding, output_padding))   (groups 1, dilation 1)
// with the multiply-adds on the vendor's transposed convolution (at::convolution: oneDNN on the
// CPU, cuDNN on the GPU) and aefast's epilogue fused around it.
//
// Forward, with y = conv_transpose2d(input, W) computed without bias by the vendor:
//   pre[n, co, oy, ox] = round(y[n, co, oy, ox] + b[co]),   out = act(pre)
// in ONE pass over y, in place (out is y's storage); pre is stored only for leaky_relu / gelu /
// silu, whose derivative needs it (relu, sigmoid, tanh take it from out). pre is rounded to the
// tensor dtype before the activation, as eager's conv_transpose2d(bias) -> act rounds it.
// Backward, with gpre = grad_out * act'(out or pre) (rounded to the tensor dtype, as eager's
// activation backward):
//   grad_b[co] = sum_{n, oy, ox} gpre[n, co, oy, ox]
//   (grad_input, grad_W) = the transposed convolution's backward of gpre (at::convolution_backward:
//   grad_input is the direct convolution of gpre with W, grad_W the correlation of gpre with input).
// gpre is written once, in one pass, and handed to the vendor's backward.
//
// This header holds what the CPU and CUDA kernels share: the guards of direct torch.ops calls
// and the executor-generic op (Exec = the CUDA grid-stride launcher of aefast/cuda_exec.cuh, or
// the CPU loop of csrc/cpu/emulate_cuda_bodies.cpp, which runs the same bodies in the tests).
// The CPU backend itself (csrc/cpu/conv_transpose_act.cpp) uses plane-wise loops with the
// activation a compile-time constant and the bias gradient summed in the gpre pass.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <array>
#include <optional>
#include <string>
#include <string_view>
#include <tuple>

#include "aefast/gemm_gather_body.h"
#include "aefast/unpool_deconv.h"

namespace aefast {

inline DecoderAct conv_transpose_act_parse(const std::optional<c10::string_view>& name) {
  if (!name.has_value()) return DecoderAct::None;
  bool ok = false;
  const DecoderAct act = decoder_act_from_name(std::string_view(name->data(), name->size()), ok);
  TORCH_CHECK(ok, "aefast::conv_transpose_act2d: unknown activation '", std::string(name->data(), name->size()), "'");
  return act;
}

// Guards for direct torch.ops calls (aefast.functional validates every argument first).
inline void conv_transpose_act_check(const at::Tensor& input, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, c10::IntArrayRef stride,
                                     c10::IntArrayRef padding, c10::IntArrayRef output_padding) {
  TORCH_CHECK(input.dim() == 4 && weight.dim() == 4, "aefast::conv_transpose_act2d: input and weight must be 4-D");
  TORCH_CHECK(weight.size(0) == input.size(1),
              "aefast::conv_transpose_act2d: weight (C_in, C_out, kH, kW) does not match the input's channels");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && output_padding.size() == 2,
              "aefast::conv_transpose_act2d: stride, padding and output_padding need two entries each");
  TORCH_CHECK(input.scalar_type() == weight.scalar_type(),
              "aefast::conv_transpose_act2d: input and weight dtypes differ");
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(1) && bias->scalar_type() == input.scalar_type(),
                "aefast::conv_transpose_act2d: bias must be (C_out,) of the input's dtype");
  }
}

// The vendor's transposed convolution without bias (groups 1, dilation 1). The op works on
// NCHW-contiguous tensors, so the vendor returns NCHW and every output of the op is contiguous,
// as its fake function says (aefast.functional gives channels_last callers a channels_last result).
inline at::Tensor conv_transpose_no_bias(const at::Tensor& input, const at::Tensor& weight, c10::IntArrayRef stride,
                                         c10::IntArrayRef padding, c10::IntArrayRef output_padding) {
  const std::array<int64_t, 2> dilation{1, 1};
  return at::convolution(input.contiguous(), weight.contiguous(), std::nullopt, stride, padding, dilation,
                         /*transposed=*/true, output_padding, /*groups=*/1)
      .contiguous();
}

// out[e] = act(round(out[e] + b[c])) in place, pre[e] = round(out[e] + b[c]) when wanted; e runs
// over the NCHW-contiguous output, c = (e / plane) % C is its channel.
template <typename scalar_t, typename acc_t>
struct BiasActInPlaceBody {
  scalar_t* out;
  scalar_t* pre;         // nullptr unless the activation's backward needs it
  const scalar_t* bias;  // nullptr: none
  int64_t channels, plane;
  DecoderAct act;
  acc_t slope;
  AEFAST_HD void operator()(int64_t e) const {
    acc_t v = static_cast<acc_t>(out[e]);
    if (bias) {
      const int64_t c = (e / plane) % channels;
      v = static_cast<acc_t>(static_cast<scalar_t>(v + static_cast<acc_t>(bias[c])));
    }
    if (pre) pre[e] = static_cast<scalar_t>(v);
    out[e] = static_cast<scalar_t>(act_forward<acc_t>(v, act, slope));
  }
};

template <class Exec>
std::tuple<at::Tensor, at::Tensor> conv_transpose_act2d_op(const at::Tensor& input, const at::Tensor& weight,
                                                           const std::optional<at::Tensor>& bias,
                                                           c10::IntArrayRef stride, c10::IntArrayRef padding,
                                                           c10::IntArrayRef output_padding,
                                                           std::optional<c10::string_view> activation,
                                                           double negative_slope) {
  conv_transpose_act_check(input, weight, bias, stride, padding, output_padding);
  const DecoderAct act = conv_transpose_act_parse(activation);
  at::Tensor out = conv_transpose_no_bias(input, weight, stride, padding, output_padding);
  at::Tensor pre = act_needs_preactivation(act) ? at::empty_like(out) : out.new_empty({0});
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  if (out.numel() == 0 || (act == DecoderAct::None && !b.defined())) return {out, pre};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "conv_transpose_act2d", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    BiasActInPlaceBody<scalar_t, acc_t> body{out.mutable_data_ptr<scalar_t>(),
                                             pre.numel() ? pre.mutable_data_ptr<scalar_t>() : nullptr,
                                             b.defined() ? b.const_data_ptr<scalar_t>() : nullptr,
                                             out.size(1), out.size(2) * out.size(3), act,
                                             static_cast<acc_t>(negative_slope)};
    Exec::for_each(body, out.numel());
  });
  return {out, pre};
}

template <class Exec>
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_transpose_act2d_backward_op(
    const at::Tensor& grad_out, const at::Tensor& act_input, const at::Tensor& input, const at::Tensor& weight,
    c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef output_padding,
    std::optional<c10::string_view> activation, double negative_slope, std::array<bool, 3> output_mask) {
  conv_transpose_act_check(input, weight, std::nullopt, stride, padding, output_padding);
  const DecoderAct act = conv_transpose_act_parse(activation);
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == input.size(0) && grad_out.size(1) == weight.size(1),
              "aefast::conv_transpose_act2d_backward: grad_out does not match the forward's output");
  TORCH_CHECK(act == DecoderAct::None || act_input.sizes() == grad_out.sizes(),
              "aefast::conv_transpose_act2d_backward: act_input must have grad_out's shape");
  at::Tensor gpre;
  if (act == DecoderAct::None) {
    gpre = grad_out;
  } else {
    const at::Tensor g = grad_out.contiguous(), a = act_input.contiguous();
    gpre = at::empty_like(g, at::MemoryFormat::Contiguous);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "conv_transpose_act2d_backward", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      DecoderActGradBody<scalar_t, acc_t, scalar_t> body{g.const_data_ptr<scalar_t>(), a.const_data_ptr<scalar_t>(),
                                                         gpre.mutable_data_ptr<scalar_t>(), act,
                                                         static_cast<acc_t>(negative_slope)};
      Exec::for_each(body, g.numel());
    });
  }
  const std::array<int64_t, 2> dilation{1, 1};
  const std::array<int64_t, 1> bias_sizes{weight.size(1)};
  auto [gi, gw, gb] = at::convolution_backward(gpre.contiguous(), input.contiguous(), weight.contiguous(),
                                               c10::IntArrayRef(bias_sizes), stride, padding, dilation,
                                               /*transposed=*/true, output_padding, /*groups=*/1, output_mask);
  // The schema returns all three; an unrequested one is zeros of its shape.
  gi = gi.defined() ? gi.contiguous() : at::zeros_like(input, at::MemoryFormat::Contiguous);
  gw = gw.defined() ? gw.contiguous() : at::zeros_like(weight, at::MemoryFormat::Contiguous);
  if (!gb.defined()) gb = at::zeros({weight.size(1)}, weight.options());
  return {gi, gw, gb};
}

}  // namespace aefast
