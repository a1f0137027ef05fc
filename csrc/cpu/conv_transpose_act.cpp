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
//   backward  gpre = grad_out * act'(out or pre) by ATen's vectorised activation gradients (the
//             kernels eager's autograd runs: the hand-written pass this file had took ~5 ms for
//             relu on a 256x32x14x14 gradient, ATen's 0.4 ms) into a cached buffer (a fresh
//             multi-MB one page-faults every step); grad_b from gpre's (n, c)
//             plane sums; gpre then feeds at::convolution_backward for grad_input and grad_W.
// grad_b[c] = sum over n of the plane sums in n order, and a plane sum runs in 16 fixed lanes: the
// result depends on the shapes only, never on the number of threads.
// channels_last (the input or the weight, as oneDNN decides): the layout is kept throughout; the
// backward then takes ATen's activation gradients and oneDNN's grad_b (see conv_layout).
//
// Except where the forward's rule below (use_gather_forward, the one place it lives) picks aefast's
// decoder kernel instead: oneDNN runs a transposed conv's forward as its backward-data primitive,
// which is slow when C_out is tiny (an image decoder's last layer); the fused decoder
// (aefast::unpool_conv_transpose2d, csrc/cpu/unpool_deconv.cpp) with 1x1 pool windows, every input
// value its own window's maximum at offset 0, is the same transposed conv computed as
// columns = input (Npos x C_in) . W (C_in x C_out*kH*kW) then col2im, with bias and activation in its
// epilogue. Its outputs follow this op's contract (out, and pre for leaky_relu / gelu / silu).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

#include "aefast/conv_direct.h"
#include "aefast/conv_transpose_act_host.h"
#include "aefast/conv_transpose_gemm.h"
#include "aefast/cpu_buffer_cache.h"
#include "aefast/torch_utils.h"

namespace aefast {
namespace {

constexpr int64_t kEpilogueGrain = 32768;  // elements per parallel task, at least
constexpr int kSumLanes = 16;

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

// Which kernel runs the forward: the one rule (see the top of the file). Measured fp32, 1 thread,
// process_time, interleaved, freed memory kept mapped (2-core dev machine under load, Dec 2026):
// eager's conv_transpose2d -> sigmoid (oneDNN) / the gather kernel, stride 2, in us:
//   C_out 1:  N128 8->1 k3 8->16  754 / 200;  N256 32->1 k4 14->28  8177 / 2473;
//             N128 4->1 k2 14->28  869 / 307;  N128 16->1 k3 14->28  1758 / 605
//   C_out 3:  N32 64->3 k4 64->128  28624 / 14804
//   C_out 4:  N128 16->4 k2 7->14  572 / 467
//   C_out 8+: mixed (glibc's default allocator): N128 16->8 k3 4->8  492 / 294, N128 8->8 k3 14->28
//             2130 / 2395, N128 32->16 k3 8->16  1404 / 1791, N32 128->64 k4 16->32  26672 / 56386
// so the gather kernel for C_out <= 4 only. The backward stays on oneDNN, the call eager makes:
// the gather kernel's backward won some shapes and lost others with no rule in sight (glibc's
// default allocator, this op / gather: N128 4->1 k2 229 / 157, N256 64->32 k4 14149 / 10058,
// N32 128->64 k4 27102 / 41210, N128 16->8 k3 204 / 192).
// fp32 only (the dtype measured), NCHW only (the gather kernel's layout), non-empty.
// AEFAST_CONV_TRANSPOSE_FORWARD=gather|vendor (read per call) overrides the C_out rule wherever the
// gather kernel can run, for A/B timing (bench/bench_kernel_ledger.py) and tests.
constexpr int64_t kGatherForwardMaxCout = 4;

// Large strides take the sub-pixel GEMM instead (conv_transpose_form's rule, csrc/cpu/conv_transpose_gemm.cpp:
// FCN-8s' upscore8, N16 4->4 k16 s8 12x12 NCHW: gather 2806 us, sub-pixel 657 us).
bool use_gather_forward(const at::Tensor& input, const at::Tensor& weight, at::MemoryFormat layout,
                        ConvTransposeForm form) {
  if (!(layout == at::MemoryFormat::Contiguous && input.scalar_type() == at::kFloat && input.numel() > 0)) return false;
  if (const char* env = std::getenv("AEFAST_CONV_TRANSPOSE_FORWARD"); env != nullptr && *env != '\0') {
    const std::string v(env);
    TORCH_CHECK(v == "gather" || v == "vendor", "AEFAST_CONV_TRANSPOSE_FORWARD must be 'gather' or 'vendor', got '",
                v, "'");
    return v == "gather";
  }
  return form != ConvTransposeForm::SubPixel && weight.size(1) <= kGatherForwardMaxCout;
}

// Window offsets of 1x1 windows: all 0 (uint8, window format). The kernel only reads them, so
// one zeroed buffer, grown on demand and capped, serves every call: a fresh zeroed tensor cost a
// pass over a quarter of the input's fp32 bytes each step (1.6 MB on ConvVAE-W1's last layer).
constexpr int64_t kSharedZeroOffsetsMax = int64_t(8) << 20;

at::Tensor zero_offsets(at::IntArrayRef sizes) {
  const int64_t numel = c10::multiply_integers(sizes);
  const auto opts = at::TensorOptions().dtype(at::kByte);
  if (numel > kSharedZeroOffsetsMax) return at::zeros(sizes, opts);
  static std::mutex mutex;
  static auto* shared = new at::Tensor();  // leaked: used at exit
  std::lock_guard<std::mutex> lock(mutex);
  if (!shared->defined() || shared->numel() < numel) *shared = at::zeros({numel}, opts);
  return shared->narrow(0, 0, numel).view(sizes);  // a view keeps its storage even if the buffer grows
}

using GatherForwardSig = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, c10::IntArrayRef,
    c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef, std::optional<c10::string_view>, double);

// act(conv_transpose2d(...)) on aefast::unpool_conv_transpose2d's CPU kernel with 1x1 windows.
std::tuple<at::Tensor, at::Tensor> gather_forward(const at::Tensor& input, const at::Tensor& weight,
                                                  const std::optional<at::Tensor>& bias, c10::IntArrayRef stride,
                                                  c10::IntArrayRef padding, c10::IntArrayRef output_padding,
                                                  std::optional<c10::string_view> activation, double negative_slope) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("aefast::unpool_conv_transpose2d", "")
                             .typed<GatherForwardSig>();
  const at::Tensor offsets = zero_offsets(input.sizes());
  const std::array<int64_t, 2> window{1, 1}, in_hw{input.size(2), input.size(3)};
  // Below the autograd keys: this runs inside this op's CPU kernel, whose autograd is this op's.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  return op.call(input.contiguous(), offsets, weight.contiguous(), bias, window, in_hw, stride, padding,
                 output_padding, activation, negative_slope);
}

int64_t plane_grain(int64_t plane) { return std::max<int64_t>(1, kEpilogueGrain / std::max<int64_t>(plane, 1)); }

// gpre = grad_out * act'(act_input), by ATen's vectorised (per-ISA) activation gradients, the ones
// eager's autograd runs, into `into` (any layout ATen keeps; `into` undefined: a fresh tensor).
// act_input is the output for relu / sigmoid / tanh, the pre-activation for the others.
at::Tensor activation_grad(const at::Tensor& g, const at::Tensor& act_input, DecoderAct act, double negative_slope,
                           at::Tensor into) {
  if (!into.defined()) into = at::empty_like(g);
  switch (act) {
    case DecoderAct::None: return g;
    case DecoderAct::Relu: return at::threshold_backward_out(into, g, act_input, 0);
    case DecoderAct::LeakyRelu: return at::leaky_relu_backward_out(into, g, act_input, negative_slope, false);
    case DecoderAct::Sigmoid: return at::sigmoid_backward_out(into, g, act_input);
    case DecoderAct::Tanh: return at::tanh_backward_out(into, g, act_input);
    case DecoderAct::Gelu: return at::gelu_backward_out(into, g, act_input);
    case DecoderAct::Silu: return at::silu_backward_out(into, g, act_input);
  }
  TORCH_CHECK(false, "aefast::conv_transpose_act2d_backward: unhandled activation");
}

// The sum of one plane in kSumLanes fixed lanes (vectorisable, and a shorter error chain than one
// running sum): the result depends on the plane's length only.
template <typename scalar_t, typename acc_t>
inline acc_t plane_sum(const scalar_t* __restrict__ x, int64_t n) {
  acc_t lanes[kSumLanes] = {};
  int64_t i = 0;
  for (; i + kSumLanes <= n; i += kSumLanes)
    for (int l = 0; l < kSumLanes; ++l) lanes[l] += static_cast<acc_t>(x[i + l]);
  for (int l = 0; i < n; ++i, ++l) lanes[l] += static_cast<acc_t>(x[i]);
  for (int width = kSumLanes / 2; width > 0; width /= 2)
    for (int l = 0; l < width; ++l) lanes[l] += lanes[l + width];
  return lanes[0];
}

// grad_b[c] = sum over n of the (n, c) plane sums of the NCHW-contiguous gpre, n ascending: a fixed
// order, so the result never depends on the number of threads.
at::Tensor bias_grad(const at::Tensor& gpre, const at::Tensor& weight) {
  const int64_t batch = gpre.size(0), channels = gpre.size(1), plane = gpre.size(2) * gpre.size(3);
  at::Tensor gb = at::empty({channels}, weight.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gpre.scalar_type(), "conv_transpose_act2d_bias_grad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t> sums(static_cast<size_t>(batch * channels));
    const scalar_t* gp = gpre.const_data_ptr<scalar_t>();
    at::parallel_for(0, batch * channels, plane_grain(plane), [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p)
        sums[static_cast<size_t>(p)] = plane_sum<scalar_t, acc_t>(gp + p * plane, plane);
    });
    scalar_t* gbp = gb.mutable_data_ptr<scalar_t>();
    for (int64_t c = 0; c < channels; ++c) {
      acc_t total = 0;
      for (int64_t n = 0; n < batch; ++n) total += sums[static_cast<size_t>(n * channels + c)];
      gbp[c] = static_cast<scalar_t>(total);
    }
  });
  return gb;
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
  // The kernel taken, named in the profiler (bench/bench_kernel_ledger.py reads it).
  const ConvTransposeForm form = conv_transpose_form(input, weight, stride, ConvTransposePass::Forward);
  if (use_gather_forward(input, weight, layout, form)) {
    RECORD_USER_SCOPE("aefast path: conv_transpose_act2d gather");
    return gather_forward(input, weight, b, stride, padding, output_padding, activation, negative_slope);
  }
  // Otherwise oneDNN's transposed conv, or one of the GEMM forms where the one rule
  // (conv_transpose_form, csrc/cpu/conv_transpose_gemm.cpp) says oneDNN's backward-data primitive
  // is the slow one: one GEMM plus a col2im, or the sub-pixel GEMM at large strides (bias
  // included), in the same layout.
  at::Tensor y;
  if (form != ConvTransposeForm::Vendor) {
    RECORD_USER_SCOPE(form == ConvTransposeForm::SubPixel ? "aefast path: conv_transpose_act2d sub-pixel gemm"
                                                          : "aefast path: conv_transpose_act2d gemm + col2im");
    const int64_t out_h = (input.size(2) - 1) * stride[0] - 2 * padding[0] + weight.size(2) + output_padding[0];
    const int64_t out_w = (input.size(3) - 1) * stride[1] - 2 * padding[1] + weight.size(3) + output_padding[1];
    y = conv_transpose_gemm(input, weight, b, stride, padding, out_h, out_w, layout);
  } else {
    RECORD_USER_SCOPE("aefast path: conv_transpose_act2d onednn");
    y = at::convolution(input.contiguous(layout), weight.contiguous(layout), b, stride, padding, dilation,
                        /*transposed=*/true, output_padding, /*groups=*/1)
            .contiguous(layout);
  }
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

// A transposed conv's grad_W[ci, co, kh, kw] = sum over n, i, j of input[n, ci, i, j] *
// gpre[n, co, i*s - p + kh, j*s - p + kw]: the weight gradient of the conv of gpre back to the input's
// size, with the input in the role of that conv's grad_output (csrc/include/aefast/conv_direct.h).
// At the few channels where conv_weight_grad_direct_serves measured oneDNN's backward-weights
// primitive slow (the conv VAE's decoder: 130 -> 37 and 83 -> 52 us per call), it computes it.
bool direct_weight_grad_serves(const at::Tensor& input, const at::Tensor& gpre, const at::Tensor& weight) {
  return weight.scalar_type() == input.scalar_type() &&
         conv_weight_grad_direct_serves(input, gpre, weight.size(2), weight.size(3));
}

at::Tensor transposed_weight_grad_direct(const at::Tensor& input, const at::Tensor& gpre, const at::Tensor& weight,
                                         c10::IntArrayRef stride, c10::IntArrayRef padding) {
  RECORD_USER_SCOPE("aefast path: conv_transpose_act2d_backward direct weight grad");
  return std::get<0>(conv_weight_grad_direct(input, gpre, weight.size(2), weight.size(3), stride, padding,
                                             /*want_bias=*/false));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_transpose_act2d_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& act_input, const at::Tensor& input, const at::Tensor& weight,
    c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef output_padding,
    std::optional<c10::string_view> activation, double negative_slope, std::array<bool, 3> output_mask) {
  check_same_device("conv_transpose_act2d_backward", {&grad_out, &act_input, &input, &weight});
  const DecoderAct act = conv_transpose_act_parse(activation);
  conv_transpose_act_check(input, weight, std::nullopt, stride, padding, output_padding);
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == input.size(0) && grad_out.size(1) == weight.size(1) &&
                  (act == DecoderAct::None || act_input.sizes() == grad_out.sizes()) &&
                  grad_out.scalar_type() == input.scalar_type() &&
                  (act == DecoderAct::None || act_input.scalar_type() == input.scalar_type()),
              "aefast::conv_transpose_act2d_backward: grad_out and act_input must match the forward's output");
  const std::array<int64_t, 2> dilation{1, 1};
  const at::MemoryFormat layout = conv_layout(input, weight);
  if (conv_transpose_form(input, weight, stride, ConvTransposePass::Backward) == ConvTransposeForm::SubPixel) {
    // Large strides: the sub-pixel form's GEMMs (csrc/cpu/conv_transpose_gemm.cpp) for grad_input
    // and grad_W, grad_b from gpre as below (its fixed-order plane sums when NCHW).
    RECORD_USER_SCOPE("aefast path: conv_transpose_act2d_backward sub-pixel gemm");
    const at::Tensor g = grad_out.contiguous(layout);
    const at::Tensor gpre =
        act == DecoderAct::None
            ? g
            : activation_grad(g, act_input.contiguous(layout), act, negative_slope, empty_like_cpu_cached(g));
    at::Tensor gb = !output_mask[2]                           ? at::zeros({weight.size(1)}, weight.options())
                    : layout == at::MemoryFormat::Contiguous ? bias_grad(gpre, weight)
                                                              : gpre.sum({0, 2, 3}).to(weight.scalar_type());
    auto [gi, gw] = conv_transpose_subpixel_backward(gpre, input, weight, stride, padding, output_mask[0],
                                                     output_mask[1], layout);
    gi = gi.defined() ? gi : at::zeros_like(input, layout);
    gw = gw.defined() ? gw : at::zeros_like(weight, layout);
    return {gi, gw, gb};
  }
  RECORD_USER_SCOPE("aefast path: conv_transpose_act2d_backward onednn");
  if (layout == at::MemoryFormat::ChannelsLast) {
    // channels_last: ATen's activation gradients keep the layout, and oneDNN's backward sums grad_b
    // with the others (the plane sums below need NCHW planes).
    const at::Tensor gpre = activation_grad(grad_out.contiguous(layout), act_input, act, negative_slope, {});
    const std::array<int64_t, 1> bias_sizes{weight.size(1)};
    const bool direct_weight_grad = output_mask[1] && direct_weight_grad_serves(input, gpre, weight);
    auto [gi, gw, gb] = at::convolution_backward(gpre.contiguous(layout), input.contiguous(layout),
                                                 weight.contiguous(layout), bias_sizes, stride, padding, dilation,
                                                 /*transposed=*/true, output_padding, /*groups=*/1,
                                                 {output_mask[0], output_mask[1] && !direct_weight_grad,
                                                  output_mask[2]});
    if (direct_weight_grad) gw = transposed_weight_grad_direct(input, gpre, weight, stride, padding);
    gi = gi.defined() ? gi.contiguous(layout) : at::zeros_like(input, layout);
    gw = gw.defined() ? gw.contiguous(layout) : at::zeros_like(weight, layout);
    gb = gb.defined() ? gb : at::zeros({weight.size(1)}, weight.options());
    return {gi, gw, gb};
  }
  // NCHW: gpre in a cached buffer (aefast/cpu_buffer_cache.h: a fresh multi-MB buffer would
  // page-fault on every step, ~3 us a page under load), grad_b from its fixed-order plane sums,
  // then oneDNN's backward for grad_input and grad_W.
  const at::Tensor g = grad_out.contiguous();
  const at::Tensor gpre = act == DecoderAct::None
                              ? g
                              : activation_grad(g, act_input.contiguous(), act, negative_slope,
                                                empty_like_cpu_cached(g));
  at::Tensor gb = output_mask[2] ? bias_grad(gpre, weight) : at::zeros({weight.size(1)}, weight.options());
  at::Tensor gi, gw;
  const bool direct_weight_grad = output_mask[1] && direct_weight_grad_serves(input, gpre, weight);
  if (output_mask[0] || (output_mask[1] && !direct_weight_grad)) {
    std::tie(gi, gw, std::ignore) = at::convolution_backward(
        gpre, input.contiguous(), weight.contiguous(), std::nullopt, stride, padding, dilation, /*transposed=*/true,
        output_padding, /*groups=*/1, {output_mask[0], output_mask[1] && !direct_weight_grad, false});
  }
  if (direct_weight_grad) gw = transposed_weight_grad_direct(input, gpre, weight, stride, padding);
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
