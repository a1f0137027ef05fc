// What the encoder's CPU translation units share (csrc/cpu/conv_pool.cpp: the op entry points,
// direct and oneDNN forwards, sparse backward; csrc/cpu/conv_pool_winograd.cpp: the Winograd
// forward): the block's shape, the corruption applied in the input load, THE input load, and
// the per-ISA GEMM and fused epilogue that conv_pool.cpp compiles (pick_gemm, pick_epilogue).
// Notation as in conv_pool.cpp's head comment.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <cstdint>
#include <tuple>

#include "aefast/corruption.h"
#include "aefast/cpu_isa.h"
#include "conv_pool_general.h"

namespace aefast {
namespace encoder_cpu {

struct Shape {
  int64_t N, Cin, H, W, Cout, KH, KW, SH, SW, PH, PW, PKH, PKW;
  int64_t HC, WC;  // conv output
  int64_t HO, WO;  // pooled output
  bool out_cl = false;  // the forward's outputs are channels-last (outputs_channels_last in conv_pool.cpp)
  bool scalar_stores = false;  // AEFAST_ENCODER_STORES=scalar: NCHW outputs stored element by element (A/B)
  int64_t K() const { return Cin * KH * KW; }
  int64_t WU() const { return WO * PKW; }  // conv columns that feed a window
};

// ---- corruption in the input load (corruption=...; aefast/corruption.h)
// The conv reads corrupt(x) instead of x: every input element is corrupted where it is loaded
// (the strip copy of the direct path, the batch chunks of the oneDNN path, the padded image of
// backward_weight), with the same function and element index as aefast::corrupt, so the result
// equals corrupt-then-conv_pool2d and no corrupted copy of the input exists. Padding stays 0.
struct InputCorruption {
  int kind = kNoCorruption;
  int64_t seed = 0;
  double level = 0.0, low = 0.0, high = 1.0;
  bool active() const { return kind != kNoCorruption; }
  template <typename scalar_t, typename acc_t>
  ElementCorruption<scalar_t, acc_t> at_element() const {
    return active() ? ElementCorruption<scalar_t, acc_t>(kind, seed, level, low, high)
                    : ElementCorruption<scalar_t, acc_t>();
  }
};


// The logical (N, C, H, W) flat index of x[n, c, y, x]: the element counter of the noise.
inline uint64_t noise_index(const Shape& s, int64_t n, int64_t c, int64_t y, int64_t x) {
  return static_cast<uint64_t>(((n * s.Cin + c) * s.H + y) * s.W + x);
}

// THE load of the encoder's input: rows [y0, y1) of image n of x (any strides), channels-last
// into dst of type D (widening half types):
//   dst[(y - y0)*ld + xx*Cin + ci] = x[n, ci, y, xx]   for y0 <= y < y1, 0 <= xx < W.
// Every read of input pixels by the direct forward and by backward_weight goes through this one
// function, so that a transform applied while loading (e.g. corruption generated per element
// index) wraps it alone. (The oneDNN forward path, K >= 64, hands the tensor to at::convolution.)
template <typename scalar_t, typename D>
void load_input_rows(const scalar_t* x, const int64_t* xs, const Shape& s, int64_t n, int64_t y0, int64_t y1, D* dst,
                     int64_t ld, const ElementCorruption<scalar_t, at::opmath_type<scalar_t>>& noise) {
  const scalar_t* xn = x + n * xs[0];
  if (noise.active()) {  // corrupt(x) element by element, keyed by the element's logical NCHW index
    for (int64_t ci = 0; ci < s.Cin; ++ci)
      for (int64_t y = y0; y < y1; ++y) {
        const scalar_t* src = xn + ci * xs[1] + y * xs[2];
        D* d = dst + (y - y0) * ld + ci;
        const uint64_t base = noise_index(s, n, ci, y, 0);
        for (int64_t xx = 0; xx < s.W; ++xx)
          d[xx * s.Cin] = static_cast<D>(noise(src[xx * xs[3]], base + static_cast<uint64_t>(xx)));
      }
    return;
  }
  if (xs[1] == 1 && xs[3] == s.Cin) {  // channels-last rows: contiguous runs of W*Cin
    for (int64_t y = y0; y < y1; ++y) {
      const scalar_t* src = xn + y * xs[2];
      D* d = dst + (y - y0) * ld;
      for (int64_t e = 0; e < s.W * s.Cin; ++e) d[e] = static_cast<D>(src[e]);
    }
  } else {  // e.g. NCHW: read each channel row contiguously, write with stride Cin
    for (int64_t ci = 0; ci < s.Cin; ++ci)
      for (int64_t y = y0; y < y1; ++y) {
        const scalar_t* src = xn + ci * xs[1] + y * xs[2];
        D* d = dst + (y - y0) * ld + ci;
        for (int64_t xx = 0; xx < s.W; ++xx) d[xx * s.Cin] = static_cast<D>(src[xx * xs[3]]);
      }
  }
}

template <typename T>
using GemmFn = void (*)(const T*, int64_t, int64_t, const T*, const T*, int64_t, T*);

// The direct GEMM and its column block NR (= 2 vectors: the packing of B depends on it).
template <typename T>
struct Gemm {
  GemmFn<T> fn;
  int64_t nr;
};

// The register-blocked GEMM of this ISA (conv_pool_kernels.inc's gemm_strip), for float or double.
template <typename T>
Gemm<T> pick_gemm(Isa isa);

// The fused bias -> activation -> pool -> argmax epilogue (conv_pool_kernels.inc's
// epilogue_strip) for this activation code and ISA; scalar_t is the tensor type, acc_t its
// accumulation type (float for half types).
template <typename scalar_t, typename acc_t>
using EpilogueFn = void (*)(const acc_t*, int64_t, const acc_t*, const Shape&, int64_t, int64_t, int64_t, acc_t, scalar_t*,
                            uint8_t*, scalar_t*, acc_t*, acc_t*, int32_t*);
template <typename scalar_t, typename acc_t>
EpilogueFn<scalar_t, acc_t> pick_epilogue(int64_t act, Isa isa);

// The Winograd F(2x2, 3x3) forward (conv_pool_winograd.cpp): whether it serves this block, and
// the forward itself, writing the three outputs allocated by the caller.
bool encoder_uses_winograd(const Shape& s, at::ScalarType dtype);
// The CPU's answer of encoder_uses_vendor_conv (aefast/conv_algorithm.h), which
// AEFAST_ENCODER_CONV=vendor|direct overrides (conv_pool_winograd.cpp).
bool encoder_cpu_uses_vendor_conv(int64_t reduction);
void conv_pool2d_forward_winograd(const at::Tensor& input, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias_opt, const Shape& s, int64_t activation,
                                  double negative_slope, const InputCorruption& noise, at::Tensor& pooled,
                                  at::Tensor& window, at::Tensor& preact);


// Host-side helpers of the forward and the backward (defined in conv_pool.cpp).
// The pool of a call: pool_size windows, pool_stride apart (0: = pool_size), ceil_mode.
PoolWindows pool_windows(c10::IntArrayRef pool, c10::IntArrayRef pool_stride, bool ceil_mode);
// Whether the tiling kernels serve the pool (else conv_pool_general.cpp does).
bool tiling_pool(const PoolWindows& p, int64_t H, int64_t W, int64_t KH, int64_t KW, c10::IntArrayRef stride,
                 c10::IntArrayRef padding);
Shape make_shape(int64_t N, int64_t Cin, int64_t H, int64_t W, int64_t Cout, int64_t KH, int64_t KW,
                 c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef pool);
InputCorruption parse_input_corruption(c10::string_view kind, double level, int64_t seed, double low, double high);
void check_activation(int64_t act);
void check_conv_args(const at::Tensor& input, const at::Tensor& weight);
// Channels-last and not also plainly contiguous (the fake functions' test).
bool strides_channels_last(const at::Tensor& t);
// conv_pool_general.cpp's results in the layout of the tiling path's rule.
at::Tensor in_layout(const at::Tensor& t, bool channels_last);
std::tuple<at::Tensor, at::Tensor, at::Tensor> in_layout(std::tuple<at::Tensor, at::Tensor, at::Tensor> t,
                                                         bool channels_last);

// Geometry of the sparse backward (conv_pool_backward.cpp, conv_pool2d_backward_impl): rows of Kp = K rounded up to 64
// bytes, conv positions p = h*WU + w, strips of `rows` pooled rows for the wgrad patches, and
// per window offset k its row di, column dj and position offset offk = di*WU + dj.
struct BwdGeom {
  int64_t Cin, Cout, KH, KW, SH, SW, HO, WO, PKH, PKW;
  int64_t K, Kp, WU, row, run, rows, pkhw, keys;
  int32_t di[256], dj[256], offk[256];
};

}  // namespace encoder_cpu
}  // namespace aefast
