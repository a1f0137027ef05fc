#pragma once
// A transposed convolution (groups 1, dilation 1) as GEMMs on CPU, in two forms: one GEMM plus a
// col2im gather, and the sub-pixel form (one GEMM whose every entry is one output value, for large
// strides). csrc/cpu/conv_transpose_gemm.cpp has the math and the measurements behind the rule.
//
// It serves the "data-gradient direction" convolutions of aefast's CPU kernels, which oneDNN runs
// as its backward-data primitive, several times slower than its forward at small shapes:
//   * a transposed conv's forward (conv_transpose_act2d's kernel), and at large strides its backward;
//   * a conv's grad_input, which is the transposed conv of grad_output with the conv's own weight
//     (conv_bn_pool2d's backward).
// The rule that picks the form (conv_transpose_form) lives in the .cpp, in one place.
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace aefast {

enum class ConvTransposeForm { Vendor, Col2im, SubPixel };
enum class ConvTransposePass { Forward, Backward };

// The form that computes conv_transpose2d(input, weight, stride) here in that pass (the measured
// rule, or AEFAST_CONV_TRANSPOSE_GEMM=always|subpixel|never, which tests and A/B timings use).
// Backward is never Col2im (that form has no backward of its own).
ConvTransposeForm conv_transpose_form(const at::Tensor& input, const at::Tensor& weight, c10::IntArrayRef stride,
                                      ConvTransposePass pass);
// The profiler's name of a form ("aefast path: <op> <name>").
const char* conv_transpose_form_name(ConvTransposeForm form);

// Whether conv_transpose_gemm (either GEMM form) serves the forward conv_transpose2d(input, weight, stride).
bool conv_transpose_gemm_serves(const at::Tensor& input, const at::Tensor& weight, c10::IntArrayRef stride);

// out (N, Ca, out_h, out_w), in memory format `layout`, with
//   out[n, a, y, x] = bias[a] + sum over b, kh, kw with y = i*stride_h - pad_h + kh, x = j*stride_w - pad_w + kw
//                     of input[n, b, i, j] * weight[b, a, kh, kw]
// i.e. conv_transpose2d(input, weight, bias, stride, padding) with the output size given (the
// output_padding it implies), in the GEMM form the rule picks (col2im unless sub-pixel). input
// (N, Cb, H, W) in any layout; weight (Cb, Ca, KH, KW): a ConvTranspose2d's weight, or a Conv2d's
// (Cout, Cin, KH, KW) for that conv's grad_input. fp32 / fp64.
at::Tensor conv_transpose_gemm(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               c10::IntArrayRef stride, c10::IntArrayRef padding, int64_t out_h, int64_t out_w,
                               at::MemoryFormat layout);

// The sub-pixel form's backward: (grad_input, grad_W) of that map from gpre, the gradient of its
// output (bias excluded: its gradient is gpre's channel sums, the caller's). An output not needed is
// undefined. Both come in memory format `layout`. fp32 / fp64.
std::tuple<at::Tensor, at::Tensor> conv_transpose_subpixel_backward(const at::Tensor& gpre, const at::Tensor& input,
                                                                    const at::Tensor& weight, c10::IntArrayRef stride,
                                                                    c10::IntArrayRef padding, bool need_input,
                                                                    bool need_weight, at::MemoryFormat layout);

}  // namespace aefast
