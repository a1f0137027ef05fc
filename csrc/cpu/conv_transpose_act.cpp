// CPU kernels of aefast::conv_transpose_act2d, the decoder's upsampler without unpool:
//   out = act(conv_transpose2d(input, W, b, stride, padding, output_padding))
// (math and the executor-generic form shared with CUDA: aefast/conv_transpose_act_host.h).
//
// The multiply-adds are oneDNN's (at::convolution / at::convolution_backward, transposed), and the
// bias rides in oneDNN's forward primitive (its epilogue, in registers: no pass of its own, unlike
// on CUDA where ATen adds cuDNN's bias in a separate pass, so the CUDA kernels add it in theirs).
// One memory-bound pass each way around them:
//   forward   out = act(y) on the vendor's output y, by ATen's vectorised activation kernels: in
//             place (relu, sigmoid, tanh), or into a new out with y kept as the saved
//             pre-activation (leaky_relu, gelu, silu); none: no pass;
//   backward  gpre = grad_out * act'(out or pre) and, in the same pass, each (n, c) plane's sum of
//             gpre (grad_b's partials), parallel over planes, the activation a compile-time
//             constant (relu / leaky_relu / sigmoid / tanh derivatives are polynomial and the loop
//             vectorises); gpre then feeds at::convolution_backward for grad_input and grad_W.
//             gelu and silu, whose derivatives need erf / exp (scalar here), take ATen's vectorised
//             gelu_backward / silu_backward instead, and oneDNN's backward sums grad_b.
// grad_b[c] = sum over n of the plane sums in n order, and a plane sum runs in 16 fixed lanes: the
// result depends on the shapes only, never on the number of threads.
// channels_last (the input or the weight, as oneDNN decides): the layout is kept throughout; the
// backward then takes ATen's activation gradients and oneDNN's grad_b (see conv_layout).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "aefast/conv_transpose_act_host.h"
#include "aefast/torch_utils.h"

namespace aefast {
namespace {

constexpr int64_t kEpilogueGrain = 32768;  // elements per parallel task, at least
constexpr int kSumLanes = 16;

// An executor for the shared op (aefast/conv_transpose_act_host.h), used where there is no pass
// of ours to specialise: the backward without activation, or after ATen's gelu / silu gradient.
struct CpuLoopExec {
  template <class Body>
  static void for_each(const Body& body, int64_t n) {
    at::parallel_for(0, n, kEpilogueGrain, [&](int64_t begin, int64_t end) {
      for (int64_t e = begin; e < end; ++e) body(e);
    });
  }
};

// The layout oneDNN itself picks for a convolution (ATen's mkldnn_conv_use_channels_last): channels_last
// when the input or the weight is strictly channels_last (a 1-channel tensor, both at once, does not
// decide). The op keeps it end to end, forward and backward, so a model run in channels_last (aefast.optimize's
// layout pass) pays no reorder here; the fake functions (aefast/ops/conv_transpose_act.py) say the same.
at::MemoryFormat conv_layout(const at::Tensor& input, const at::Tensor& weight) {
  const auto strictly_cl = [](const at::Tensor& t) {
    return t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
  };
  return strictly_cl(input) || strictly_cl(weight) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

int64_t plane_grain(int64_t plane) { return std::max<int64_t>(1, kEpilogueGrain / std::max<int64_t>(plane, 1)); }

// Calls f.template operator()<A>() with the run-time activation as a compile-time constant.
template <class F>
void with_activation(DecoderAct act, F&& f) {
  switch (act) {
    case DecoderAct::None: f.template operator()<DecoderAct::None>(); break;
    case DecoderAct::Relu: f.template operator()<DecoderAct::Relu>(); break;
    case DecoderAct::LeakyRelu: f.template operator()<DecoderAct::LeakyRelu>(); break;
    case DecoderAct::Sigmoid: f.template operator()<DecoderAct::Sigmoid>(); break;
    case DecoderAct::Tanh: f.template operator()<DecoderAct::Tanh>(); break;
    case DecoderAct::Gelu: f.template operator()<DecoderAct::Gelu>(); break;
    case DecoderAct::Silu: f.template operator()<DecoderAct::Silu>(); break;
  }
}

// gpre[i] = round(g[i] * act'(a[i])) over one plane; returns the plane's sum of the rounded gpre,
// in kSumLanes fixed lanes (vectorisable, and a shorter error chain than one running sum).
template <DecoderAct A, typename scalar_t, typename acc_t>
inline acc_t act_grad_plane(const scalar_t* __restrict__ g, const scalar_t* __restrict__ a, scalar_t* __restrict__ gpre,
                            int64_t n, acc_t slope) {
  acc_t lanes[kSumLanes] = {};
  int64_t i = 0;
  for (; i + kSumLanes <= n; i += kSumLanes) {
    for (int l = 0; l < kSumLanes; ++l) {
      const scalar_t r = static_cast<scalar_t>(static_cast<acc_t>(g[i + l]) *
                                               act_derivative<acc_t>(static_cast<acc_t>(a[i + l]), A, slope));
      gpre[i + l] = r;
      lanes[l] += static_cast<acc_t>(r);
    }
  }
  for (int l = 0; i < n; ++i, ++l) {
    const scalar_t r =
        static_cast<scalar_t>(static_cast<acc_t>(g[i]) * act_derivative<acc_t>(static_cast<acc_t>(a[i]), A, slope));
    gpre[i] = r;
    lanes[l] += static_cast<acc_t>(r);
  }
  for (int width = kSumLanes / 2; width > 0; width /= 2)
    for (int l = 0; l < width; ++l) lanes[l] += lanes[l + width];
  return lanes[0];
}

std::tuple<at::Tensor, at::Tensor> conv_transpose_act2d_cpu(const at::Tensor& input, const at::Tensor& weight,
                                                            const std::optional<at::Tensor>& bias,
                                                            c10::IntArrayRef stride, c10::IntArrayRef padding,
                                                            c10::IntArrayRef output_padding,
                                                            std::optional<c10::string_view> activation,
                                                            double negative_slope) {
  check_same_device("conv_transpose_act2d", {&input, &weight}, bias);
  conv_transpose_act_check(input, weight, bias, stride, padding, output_padding);
  const DecoderAct act = conv_transpose_act_parse(activation);
  // The bias goes into oneDNN's primitive (its own epilogue, in registers), so pre = y comes out
  // rounded once, as eager's; then one activation pass, ATen's vectorised kernel: in place, or,
  // when the backward needs pre, from y into a fresh out (y is kept as pre, nothing is copied).
  const std::array<int64_t, 2> dilation{1, 1};
  const std::optional<at::Tensor> b =
      bias.has_value() && bias->defined() ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  const at::MemoryFormat layout = conv_layout(input, weight);
  at::Tensor y = at::convolution(input.contiguous(layout), weight.contiguous(layout), b, stride, padding, dilation,
                                 /*transposed=*/true, output_padding, /*groups=*/1)
                     .contiguous(layout);
  const at::Tensor empty = y.new_empty({0});
  switch (act) {
    case DecoderAct::None: return {y, empty};
    case DecoderAct::Relu: return {at::relu_(y), empty};
    case DecoderAct::Sigmoid: return {at::sigmoid_(y), empty};
    case DecoderAct::Tanh: return {at::tanh_(y), empty};
    case DecoderAct::LeakyRelu: return {at::leaky_relu(y, negative_slope), y};
    case DecoderAct::Gelu: return {at::gelu(y), y};
    case DecoderAct::Silu: return {at::silu(y), y};
  }
  TORCH_CHECK(false, "aefast::conv_transpose_act2d: unhandled activation");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_transpose_act2d_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& act_input, const at::Tensor& input, const at::Tensor& weight,
    c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef output_padding,
    std::optional<c10::string_view> activation, double negative_slope, std::array<bool, 3> output_mask) {
  check_same_device("conv_transpose_act2d_backward", {&grad_out, &act_input, &input, &weight});
  const DecoderAct act = conv_transpose_act_parse(activation);
  const at::MemoryFormat layout = conv_layout(input, weight);
  if (layout == at::MemoryFormat::ChannelsLast) {
    // channels_last: gpre from ATen's vectorised activation gradients, which keep the layout (the
    // plane pass below needs NCHW planes), and grad_b from oneDNN's backward with the others.
    conv_transpose_act_check(input, weight, std::nullopt, stride, padding, output_padding);
    TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == input.size(0) && grad_out.size(1) == weight.size(1) &&
                    (act == DecoderAct::None || act_input.sizes() == grad_out.sizes()),
                "aefast::conv_transpose_act2d_backward: grad_out and act_input must match the forward's output");
    const at::Tensor g = grad_out.contiguous(layout);
    at::Tensor gpre;
    switch (act) {
      case DecoderAct::None: gpre = g; break;
      case DecoderAct::Relu: gpre = at::threshold_backward(g, act_input, 0); break;
      case DecoderAct::LeakyRelu: gpre = at::leaky_relu_backward(g, act_input, negative_slope, false); break;
      case DecoderAct::Sigmoid: gpre = at::sigmoid_backward(g, act_input); break;
      case DecoderAct::Tanh: gpre = at::tanh_backward(g, act_input); break;
      case DecoderAct::Gelu: gpre = at::gelu_backward(g, act_input); break;
      case DecoderAct::Silu: gpre = at::silu_backward(g, act_input); break;
    }
    const std::array<int64_t, 2> dilation{1, 1};
    const std::array<int64_t, 1> bias_sizes{weight.size(1)};
    auto [gi, gw, gb] = at::convolution_backward(gpre.contiguous(layout), input.contiguous(layout),
                                                 weight.contiguous(layout), bias_sizes, stride, padding, dilation,
                                                 /*transposed=*/true, output_padding, /*groups=*/1, output_mask);
    gi = gi.defined() ? gi.contiguous(layout) : at::zeros_like(input, layout);
    gw = gw.defined() ? gw.contiguous(layout) : at::zeros_like(weight, layout);
    gb = gb.defined() ? gb : at::zeros({weight.size(1)}, weight.options());
    return {gi, gw, gb};
  }
  if (act == DecoderAct::None || act == DecoderAct::Gelu || act == DecoderAct::Silu) {
    // No pass of ours (none) or ATen's vectorised one (gelu, silu); the vendor's backward sums grad_b.
    const at::Tensor gpre = act == DecoderAct::None ? grad_out
                            : act == DecoderAct::Gelu ? at::gelu_backward(grad_out, act_input)
                                                      : at::silu_backward(grad_out, act_input);
    return conv_transpose_act2d_backward_op<CpuLoopExec>(gpre, gpre, input, weight, stride, padding, output_padding,
                                                         std::nullopt, 0.0, output_mask);
  }
  conv_transpose_act_check(input, weight, std::nullopt, stride, padding, output_padding);
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == input.size(0) && grad_out.size(1) == weight.size(1) &&
                  act_input.sizes() == grad_out.sizes() && grad_out.scalar_type() == input.scalar_type() &&
                  act_input.scalar_type() == input.scalar_type(),
              "aefast::conv_transpose_act2d_backward: grad_out and act_input must match the forward's output");
  const at::Tensor g = grad_out.contiguous(), a = act_input.contiguous();
  at::Tensor gpre = at::empty_like(g, at::MemoryFormat::Contiguous);
  const int64_t channels = g.size(1), plane = g.size(2) * g.size(3), planes = g.size(0) * channels;
  const auto acc_dtype = at::toOpMathType(g.scalar_type());
  at::Tensor plane_sums = at::empty({planes}, g.options().dtype(acc_dtype));
  at::Tensor gb = at::zeros({channels}, weight.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "conv_transpose_act2d_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t slope = static_cast<acc_t>(negative_slope);
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    scalar_t* dst = gpre.mutable_data_ptr<scalar_t>();
    acc_t* sums = plane_sums.mutable_data_ptr<acc_t>();
    with_activation(act, [&]<DecoderAct A>() {
      at::parallel_for(0, planes, plane_grain(plane), [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p)
          sums[p] = act_grad_plane<A>(gp + p * plane, ap + p * plane, dst + p * plane, plane, slope);
      });
    });
    if (output_mask[2]) {  // grad_b[c] = sum_n plane_sums[n, c], n ascending (a fixed order)
      scalar_t* gbp = gb.mutable_data_ptr<scalar_t>();
      for (int64_t c = 0; c < channels; ++c) {
        acc_t s = 0;
        for (int64_t n = 0; n < g.size(0); ++n) s += sums[n * channels + c];
        gbp[c] = static_cast<scalar_t>(s);
      }
    }
  });
  const std::array<int64_t, 2> dilation{1, 1};
  auto [gi, gw, unused] = at::convolution_backward(gpre, input.contiguous(), weight.contiguous(), std::nullopt, stride,
                                                   padding, dilation, /*transposed=*/true, output_padding,
                                                   /*groups=*/1, {output_mask[0], output_mask[1], false});
  gi = gi.defined() ? gi.contiguous() : at::zeros_like(input, at::MemoryFormat::Contiguous);
  gw = gw.defined() ? gw.contiguous() : at::zeros_like(weight, at::MemoryFormat::Contiguous);
  return {gi, gw, gb};
}

}  // namespace

TORCH_LIBRARY_IMPL(aefast, CPU, m) {
  m.impl("conv_transpose_act2d", &conv_transpose_act2d_cpu);
  m.impl("conv_transpose_act2d_backward", &conv_transpose_act2d_backward_cpu);
}

}  // namespace aefast
