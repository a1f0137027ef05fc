#pragma once
// What the CPU and CUDA kernels of the unpool_deconv family share: the geometry of the fused
// unpool -> transposed conv, the position of each pooled value in the unpooled plane (for both
// index formats), and the activations with their derivatives. Free of torch headers.
#include <cmath>
#include <string_view>

#include "aefast/common.h"

namespace aefast {

enum class DecoderAct : int { None = 0, Relu, LeakyRelu, Sigmoid, Tanh, Gelu, Silu };

// Host side: the activation named by the op's `str? activation` argument; ok=false if unknown.
inline DecoderAct decoder_act_from_name(std::string_view s, bool& ok) {
  ok = true;
  if (s == "relu") return DecoderAct::Relu;
  if (s == "leaky_relu") return DecoderAct::LeakyRelu;
  if (s == "sigmoid") return DecoderAct::Sigmoid;
  if (s == "tanh") return DecoderAct::Tanh;
  if (s == "gelu") return DecoderAct::Gelu;
  if (s == "silu") return DecoderAct::Silu;
  ok = false;
  return DecoderAct::None;
}

// Activations whose derivative needs the pre-activation; the others use the output y.
AEFAST_HD bool act_needs_preactivation(DecoderAct a) {
  return a == DecoderAct::LeakyRelu || a == DecoderAct::Gelu || a == DecoderAct::Silu;
}

struct DecoderGeometry {
  int64_t n, c_in, c_out;
  int64_t pooled_h, pooled_w;  // input (pooled) plane
  int64_t pool_h, pool_w;      // pool window = pool stride
  int64_t unpooled_h, unpooled_w;
  int64_t kernel_h, kernel_w;
  int64_t stride_h, stride_w;
  int64_t pad_h, pad_w;
  int64_t out_h, out_w;
};

// Where pooled value (ph, pw) sits in the unpooled plane. Flat indices are h*W + w; window
// offsets are i*pool_w + j inside window (ph, pw). The Python layer has validated both, so the
// position is inside the unpooled plane and inside its own window.
AEFAST_HD void unpooled_position_flat(int64_t flat, int64_t unpooled_w, int64_t& h, int64_t& w) {
  h = flat / unpooled_w;
  w = flat - h * unpooled_w;
}
AEFAST_HD void unpooled_position_window(int64_t offset, int64_t ph, int64_t pw, int64_t pool_h, int64_t pool_w,
                                        int64_t& h, int64_t& w) {
  const int64_t i = offset / pool_w;
  h = ph * pool_h + i;
  w = pw * pool_w + (offset - i * pool_w);
}

// Whether index value v of pooled position (ph, pw) is valid (see first_bad_unpool_index).
AEFAST_HD bool unpool_index_valid_flat(int64_t v, int64_t ph, int64_t pw, int64_t unpooled_h, int64_t unpooled_w,
                                       int64_t pool_h, int64_t pool_w, bool in_window) {
  if (v < 0 || v >= unpooled_h * unpooled_w) return false;
  if (!in_window) return true;
  const int64_t h = v / unpooled_w, w = v - h * unpooled_w;
  return h / pool_h == ph && w / pool_w == pw;
}
AEFAST_HD bool unpool_index_valid_window(int64_t v, int64_t ph, int64_t pw, int64_t unpooled_h, int64_t unpooled_w,
                                         int64_t pool_h, int64_t pool_w) {
  if (v < 0 || v >= pool_h * pool_w) return false;
  const int64_t i = v / pool_w;
  return ph * pool_h + i < unpooled_h && pw * pool_w + (v - i * pool_w) < unpooled_w;
}

// Forward activation (float or double math). torch.where(x >= 0, x, slope*x) for leaky_relu,
// the exact erf GELU, x*sigmoid(x) for SiLU.
template <typename T>
AEFAST_HD T act_forward(T x, DecoderAct a, T slope) {
  switch (a) {
    case DecoderAct::Relu: return x < T(0) ? T(0) : x;  // NaN propagates
    case DecoderAct::LeakyRelu: return x >= T(0) ? x : x * slope;
    case DecoderAct::Sigmoid: return T(1) / (T(1) + exp(-x));
    case DecoderAct::Tanh: return tanh(x);
    case DecoderAct::Gelu: return T(0.5) * x * (T(1) + erf(x * T(0.70710678118654752440)));
    case DecoderAct::Silu: return x / (T(1) + exp(-x));
    default: return x;
  }
}

// d act / d x, from the output y (relu, sigmoid, tanh, none) or the pre-activation x (the rest):
//   relu: [y > 0]; sigmoid: y(1-y); tanh: 1-y^2; leaky: [x >= 0] + slope [x < 0];
//   gelu: Phi(x) + x phi(x); silu: s(1 + x(1-s)) with s = sigmoid(x).
template <typename T>
AEFAST_HD T act_derivative(T v, DecoderAct a, T slope) {
  switch (a) {
    case DecoderAct::Relu: return v > T(0) ? T(1) : T(0);
    case DecoderAct::LeakyRelu: return v >= T(0) ? T(1) : slope;
    case DecoderAct::Sigmoid: return v * (T(1) - v);
    case DecoderAct::Tanh: return T(1) - v * v;
    case DecoderAct::Gelu:
      return T(0.5) * (T(1) + erf(v * T(0.70710678118654752440))) +
             v * T(0.39894228040143267794) * exp(T(-0.5) * v * v);
    case DecoderAct::Silu: {
      const T s = T(1) / (T(1) + exp(-v));
      return s * (T(1) + v * (T(1) - s));
    }
    default: return T(1);
  }
}

}  // namespace aefast
