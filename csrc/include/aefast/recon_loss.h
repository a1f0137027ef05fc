#pragma once
// Elementwise math of the recon_loss family, shared by the CPU and CUDA kernels (T is the
// accumulation type: float for fp16/bf16/fp32, double for fp64). Free of torch headers.
//
// Each kind gives, for one element with input x and target t, the loss l(x, t) and both
// partial derivatives dl/dx and dl/dt, so ONE pass produces the loss and the gradients
// (Liger-Kernel's trick); the backward is then a scale by grad_output.
//
//   mse        l = (x-t)^2                       dl/dx = 2(x-t)             dl/dt = -dl/dx
//   l1         l = |x-t|                         dl/dx = sign(x-t) (0 at 0 and at NaN, as torch)
//   huber      l = |d|<delta ? d^2/2 : delta(|d|-delta/2),   d = x-t
//              dl/dx = clamp(d, -delta, delta)  (NaN passes through, as torch)
//   bce        l = -(t max(log x, -100) + (1-t) max(log(1-x), -100))        (torch's clamp)
//              dl/dx = (x-t) / max(x(1-x), 1e-12)   (torch's backward formula, also at 0 and 1)
//              dl/dt = log(1-x) - log x  (= -logit(x), UNclamped, as torch's target backward: ±inf at 0 and 1)
//   bce_logits l = (1-t)x - lw log σ(x),  lw = 1 + (pw-1)t,  log σ(x) = min(x,0) - log1p(e^-|x|)
//              (stable for |x| = 100: no exp of a positive number is ever taken)
//              dl/dx = (pw t + 1 - t) σ(x) - pw t   (= σ(x) - t without pos_weight)
//              dl/dt = -x - (pw-1) log σ(x)         (= -x without pos_weight)
//   kl         x = mu, t = logvar: l = -(1 + t - x^2 - e^t)/2,  dl/dx = x,  dl/dt = (e^t - 1)/2
// A per-element weight w multiplies l, dl/dx and dl/dt.
#include <cmath>
#include <cstdint>

#include "aefast/common.h"

namespace aefast {

// ---- float exp/log that gcc auto-vectorises (CPU). glibc's expf/logf are scalar calls that
// block vectorisation and cost ~20 ns each; these are the Cephes single-precision
// approximations (about 1 ulp), written branch-free with bit casts so that a loop over them
// becomes SIMD code. CUDA uses its own intrinsics (the std:: calls below), as does fp64.
namespace fastmath {

#if defined(__CUDACC__)
#define AEFAST_FM AEFAST_HD
#else
#define AEFAST_FM inline __attribute__((always_inline))  // must inline into the loop to vectorise
#endif

AEFAST_FM float bits_to_float(int32_t i) {
  float f;
  __builtin_memcpy(&f, &i, sizeof f);
  return f;
}
AEFAST_FM int32_t float_to_bits(float f) {
  int32_t i;
  __builtin_memcpy(&i, &f, sizeof i);
  return i;
}
// c ? a : b as integer bit operations. A float select whose arm is only needed on one side is
// turned into a branch by gcc (it will not speculate float operations that might trap, under
// the default -ftrapping-math), which blocks vectorisation; masks keep it straight-line code.
AEFAST_FM float select(bool c, float a, float b) {
  const int32_t m = -static_cast<int32_t>(c);
  return bits_to_float((float_to_bits(a) & m) | (float_to_bits(b) & ~m));
}

// e^x for x <= 0 (NaN propagates). Below -87.3 the result is clamped at ~1.2e-38 instead of
// underflowing further: an absolute error under 1.2e-38. Every select picks between values
// already computed (no conditional arithmetic), so gcc if-converts and vectorises loops.
AEFAST_FM float exp_nonpos(float x) {
  const float xc = x < -87.3f ? -87.3f : x;
  const float fx = xc * 1.44269504088896341f;
  // Round to nearest for fx <= 0 by truncating fx - 1/2 toward zero (cvttps2dq: SSE2 and
  // vectorisable; floorf would be a library call without SSE4.1).
  const int32_t n = static_cast<int32_t>(fx - 0.5f);
  const float nf = static_cast<float>(n);
  const float r = xc - nf * 0.693359375f + nf * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  // A NaN x flows through xc into y, and NaN times any power of two is NaN: no check needed.
  return y * bits_to_float((n + 127) << 23);
}

// log(m0 * 2^e0) for a mantissa m0 in [0.5, 1) and its exponent e0 (Cephes logf's reduction to
// [sqrt(1/2), sqrt(2)) and its polynomial); no special cases: the callers below add them.
AEFAST_FM float log_of_mantissa_exponent(float e0, float m0) {
  const float e_small = e0 - 1.0f, m_small = m0 + m0 - 1.0f, m_big = m0 - 1.0f;
  const float e = select(m0 < 0.707106781186547524f, e_small, e0);
  const float m = select(m0 < 0.707106781186547524f, m_small, m_big);
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y += -2.12194440e-4f * e;
  y += -0.5f * z;
  return m + y + 0.693359375f * e;
}

// natural log for every float: log(0) = -inf, log(<0) = NaN, log(inf) = inf, subnormals scaled.
AEFAST_FM float log(float x) {
  const float scaled = x * 8388608.0f;  // 2^23 brings subnormals into the normal range
  const float xs = select(x < 1.17549435e-38f, scaled, x);
  const int32_t bits = float_to_bits(xs);
  const float shift = x < 1.17549435e-38f ? 23.0f : 0.0f;
  const float e0 = static_cast<float>(((bits >> 23) & 0xff) - 126) - shift;
  const float m0 = bits_to_float((bits & 0x807fffff) | 0x3f000000);  // mantissa in [0.5, 1)
  float out = log_of_mantissa_exponent(e0, m0);
  const float inf = __builtin_inff(), nan = __builtin_nanf("");
  out = select(x == 0.0f, -inf, out);
  out = select(x == inf, inf, out);
  return select((x < 0.0f) | (x != x), nan, out);
}

// log(w) for w in [1, 2] with no special cases (callers guarantee the range; a NaN w gives a
// garbage finite value, so callers must propagate NaN through another term).
AEFAST_FM float log_1_2(float w) {
  const int32_t bits = float_to_bits(w);
  const float e0 = static_cast<float>(((bits >> 23) & 0xff) - 126);
  const float m0 = bits_to_float((bits & 0x807fffff) | 0x3f000000);
  return log_of_mantissa_exponent(e0, m0);
}

// log(1 + u) without cancellation: log(w) * u / (w - 1) with w = 1 + u corrects the rounding of w.
AEFAST_FM float log1p(float u) {
  // Both arms are computed and then selected (no conditional division), so gcc if-converts
  // the loop without -fno-trapping-math.
  const float w = 1.0f + u;
  const float d = w - 1.0f;
  const float safe_d = select(d == 0.0f, 1.0f, d);
  const float corrected = fastmath::log(w) * (u / safe_d);
  return select(d == 0.0f, u, corrected);
}

}  // namespace fastmath

#if defined(__CUDA_ARCH__)
#define AEFAST_FAST_FLOAT_MATH 0
#else
#define AEFAST_FAST_FLOAT_MATH 1
#endif

template <typename T>
AEFAST_HD T loss_exp_nonpos(T x) {
  if constexpr (AEFAST_FAST_FLOAT_MATH && sizeof(T) == 4) return fastmath::exp_nonpos(x);
  else return std::exp(x);
}
template <typename T>
AEFAST_HD T loss_log(T x) {
  if constexpr (AEFAST_FAST_FLOAT_MATH && sizeof(T) == 4) return fastmath::log(x);
  else return std::log(x);
}
template <typename T>
AEFAST_HD T loss_log1p(T x) {
  if constexpr (AEFAST_FAST_FLOAT_MATH && sizeof(T) == 4) return fastmath::log1p(x);
  else return std::log1p(x);
}

// log(1 + e) for e in [0, 1], given inv = 1 / (1 + e): the rounding of w = 1 + e is corrected
// to first order, log(1+e) = log(w) - ((w - 1) - e) / w, reusing the sigmoid's division.
template <typename T>
AEFAST_HD T loss_log1p_unit(T e, T inv) {
  if constexpr (AEFAST_FAST_FLOAT_MATH && sizeof(T) == 4) {
    const float w = 1.0f + e;
    return fastmath::log_1_2(w) - ((w - 1.0f) - e) * inv;
  } else {
    return std::log1p(e);
  }
}

template <typename T>
AEFAST_HD T loss_select(bool c, T a, T b) {
  if constexpr (AEFAST_FAST_FLOAT_MATH && sizeof(T) == 4) return fastmath::select(c, a, b);
  else return c ? a : b;
}

enum LossKind : int { kMse = 0, kL1 = 1, kHuber = 2, kBce = 3, kBceLogits = 4, kKl = 5 };

// Kinds whose target gradient is not simply -dl/dx (they need their own saved buffer).
constexpr bool loss_kind_has_own_target_grad(int kind) { return kind == kBce || kind == kBceLogits || kind == kKl; }

template <int KIND, typename T>
AEFAST_HD void loss_elem(T x, T t, T pw, T delta, T& l, T& dx, T& dt) {
  using std::abs;
  using std::exp;
  if constexpr (KIND == kMse) {
    const T d = x - t;
    l = d * d;
    dx = T(2) * d;
    dt = -dx;
  } else if constexpr (KIND == kL1) {
    const T d = x - t;
    l = abs(d);
    dx = static_cast<T>((d > T(0)) - (d < T(0)));
    dt = -dx;
  } else if constexpr (KIND == kHuber) {
    // Branch-free (vectorises): with c = min(|d|, delta), l = c (|d| - c/2) is both branches;
    // the selects are ordered so that a NaN d gives NaN loss and NaN gradient, as torch.
    const T d = x - t;
    const T a = abs(d);
    const T c = delta < a ? delta : a;
    l = c * (a - T(0.5) * c);
    const T hi = delta < d ? delta : d;
    dx = hi < -delta ? -delta : hi;
    dt = -dx;
  } else if constexpr (KIND == kBce) {
    // std::max(NaN, -100) would return -100 for a NaN first argument in some orders; write
    // the clamp so that NaN propagates as in torch (comparison false -> keep the value).
    const T raw_log_x = loss_log(x), raw_log_1mx = loss_log1p(-x);
    dt = raw_log_1mx - raw_log_x;  // unclamped, as torch's target gradient -logit(x)
    const T log_x = raw_log_x < T(-100) ? T(-100) : raw_log_x;
    const T log_1mx = raw_log_1mx < T(-100) ? T(-100) : raw_log_1mx;
    l = (t - T(1)) * log_1mx - t * log_x;
    T denom = (T(1) - x) * x;
    denom = denom < T(1e-12) ? T(1e-12) : denom;
    dx = (x - t) / denom;
  } else if constexpr (KIND == kBceLogits) {
    const T e = loss_exp_nonpos(-abs(x));
    const T inv = T(1) / (T(1) + e);
    const T log_sig = loss_select(x < T(0), x, T(0)) - loss_log1p_unit(e, inv);
    const T sig = loss_select(x >= T(0), inv, e * inv);
    const T lw = T(1) + (pw - T(1)) * t;
    l = (T(1) - t) * x - lw * log_sig;
    dx = (pw * t + T(1) - t) * sig - pw * t;
    dt = -x - (pw - T(1)) * log_sig;
  } else {  // kKl
    const T e = exp(t);
    l = T(-0.5) * (T(1) + t - x * x - e);
    dx = x;
    dt = T(0.5) * (e - T(1));
  }
}

}  // namespace aefast
