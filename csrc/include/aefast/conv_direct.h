#pragma once
// A convolution's weight gradient (groups 1, dilation 1) by direct accumulation on CPU, for the
// small-channel layers where oneDNN's backward-weights primitive is slow (csrc/cpu/conv_direct.cpp
// has the math, the measurements and the rule).
//
// The one formula serves both directions of aefast's CPU kernels:
//   * a Conv2d's grad_weight (Cout, Cin, KH, KW): grad = grad_output (N, Cout, HO, WO), x = the conv's input;
//   * a ConvTranspose2d's grad_weight (Cin, Cout, KH, KW): grad = the transposed conv's input
//     (N, Cin, H, W), x = its grad_output, the geometry that of the conv of grad_output back to H x W.
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace aefast {

// Whether conv_weight_grad_direct serves the weight gradient of a conv with this grad (N, Cg, HG, WG),
// x (N, Cx, HX, WX) and kernel size here (the measured rule, or AEFAST_CONV_DIRECT=always|never,
// which tests and A/B timings use).
bool conv_weight_grad_direct_serves(const at::Tensor& grad, const at::Tensor& x, int64_t kh, int64_t kw);

// (grad_weight (Cg, Cx, KH, KW) contiguous, grad_bias (Cg,) or undefined unless want_bias), with
//   grad_weight[g, c, kh, kw] = sum over n, i, j of grad[n, g, i, j] * x[n, c, i*sh - ph + kh, j*sw - pw + kw]
//                               (x zero outside its H x W)
//   grad_bias[g] = sum over n, i, j of grad[n, g, i, j]
// grad and x in any layout; fp32 or fp64, both of one dtype.
std::tuple<at::Tensor, at::Tensor> conv_weight_grad_direct(const at::Tensor& grad, const at::Tensor& x, int64_t kh,
                                                           int64_t kw, c10::IntArrayRef stride,
                                                           c10::IntArrayRef padding, bool want_bias);

// The forward of the same direct form: conv2d(x, weight, bias, stride, padding) (groups 1, dilation
// 1) as an (N, Cg, HO, WO) tensor with channels-last memory (a permuted (N, HO, WO, Cg) buffer),
// x in any layout, fp32 or fp64; conv_forward_direct_serves is its rule (the same environment switch).
bool conv_forward_direct_serves(const at::Tensor& x, const at::Tensor& weight, c10::IntArrayRef stride,
                                c10::IntArrayRef padding);
at::Tensor conv_forward_direct(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               c10::IntArrayRef stride, c10::IntArrayRef padding);

}  // namespace aefast
