#pragma once
// A transposed convolution (groups 1, dilation 1) as one GEMM plus a col2im gather, on CPU
// (csrc/cpu/conv_transpose_gemm.cpp has the math and the measurements behind the rule).
//
// It serves the two "data-gradient direction" convolutions of aefast's CPU kernels, which oneDNN
// runs as its backward-data primitive, several times slower than its forward at small shapes:
//   * a transposed conv's forward (conv_transpose_act2d's kernel);
//   * a conv's grad_input, which is the transposed conv of grad_output with the conv's own weight
//     (conv_bn_pool2d's backward).
// The rule that picks it (conv_transpose_gemm_serves) lives in the .cpp, in one place.
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>
#include <optional>

namespace aefast {

// Whether conv_transpose_gemm serves conv_transpose2d(input, weight) here (the measured rule, or
// AEFAST_CONV_TRANSPOSE_GEMM=always|never, which tests and A/B timings use).
bool conv_transpose_gemm_serves(const at::Tensor& input, const at::Tensor& weight);

// out (N, Ca, out_h, out_w), in memory format `layout`, with
//   out[n, a, y, x] = bias[a] + sum over b, kh, kw with y = i*stride_h - pad_h + kh, x = j*stride_w - pad_w + kw
//                     of input[n, b, i, j] * weight[b, a, kh, kw]
// i.e. conv_transpose2d(input, weight, bias, stride, padding) with the output size given (the
// output_padding it implies). input (N, Cb, H, W) in any layout; weight (Cb, Ca, KH, KW): a
// ConvTranspose2d's weight, or a Conv2d's (Cout, Cin, KH, KW) for that conv's grad_input.
at::Tensor conv_transpose_gemm(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               c10::IntArrayRef stride, c10::IntArrayRef padding, int64_t out_h, int64_t out_w,
                               at::MemoryFormat layout);

}  // namespace aefast
