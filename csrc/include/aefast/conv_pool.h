#pragma once
// What the CPU and CUDA encoder kernels share: the activation enum, each activation and its
// derivative (in the accumulation type), and torch's max-pool comparison rule.
// Free of torch headers so that it compiles quickly under nvcc.
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "aefast/common.h"

namespace aefast {

// The codes passed through the op schemas (`int activation`); aefast/ops/conv_pool.py holds
// the same table (ACTIVATION_CODES).
enum class Activation : int { kNone = 0, kRelu = 1, kLeakyRelu = 2, kSigmoid = 3, kTanh = 4, kGelu = 5, kSilu = 6 };
constexpr int kNumActivations = 7;

// Calls f(std::integral_constant<int, ACT>{}) for the activation code act, so that a kernel
// templated on its activation (activate_ct) is picked once per call; codes past the table are
// SiLU's, as callers have checked the code already. Host only: the CPU kernel pickers share it.
template <typename F>
decltype(auto) with_activation(int64_t act, F&& f) {
  switch (act) {
    case 0: return f(std::integral_constant<int, 0>{});
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    case 5: return f(std::integral_constant<int, 5>{});
    default: return f(std::integral_constant<int, 6>{});
  }
}

// act(z). leaky_relu is z >= 0 ? z : slope*z, as the reference twin writes it; gelu is the
// exact erf form (torch's default), silu is z*sigmoid(z).
template <typename T>
AEFAST_HD T activate(T z, int act, T slope) {
  using std::erf; using std::exp; using std::tanh;
  switch (act) {
    case 1: return z < T(0) ? T(0) : z;  // NaN passes through, as torch.relu
    case 2: return z >= T(0) ? z : z * slope;
    case 3: return T(1) / (T(1) + exp(-z));
    case 4: return tanh(z);
    case 5: return T(0.5) * z * (T(1) + erf(z * T(0.70710678118654752440)));
    case 6: return z / (T(1) + exp(-z));
    default: return z;
  }
}

// activate() with the activation fixed at compile time, so that the fused epilogue loops inline
// it and vectorise (a runtime switch around erf/exp/tanh blocks both).
template <int ACT, typename T>
AEFAST_HD T activate_ct(T z, T slope) {
  using std::erf; using std::exp; using std::tanh;
  if constexpr (ACT == 1) {
    return z < T(0) ? T(0) : z;  // NaN passes through, as torch.relu
  } else if constexpr (ACT == 2) {
    return z >= T(0) ? z : z * slope;
  } else if constexpr (ACT == 3) {
    return T(1) / (T(1) + exp(-z));
  } else if constexpr (ACT == 4) {
    return tanh(z);
  } else if constexpr (ACT == 5) {
    return T(0.5) * z * (T(1) + erf(z * T(0.70710678118654752440)));
  } else if constexpr (ACT == 6) {
    return z / (T(1) + exp(-z));
  } else {
    return z;
  }
}

// d act / dz at z. relu's is 0 at z == 0 (torch's threshold_backward); leaky_relu's is 1 at
// z == 0 (the derivative of the `where(z >= 0, z, slope*z)` branch that is taken).
//   sigmoid: s(1-s);  tanh: 1-t^2;  gelu: Phi(z) + z*phi(z);  silu: s*(1 + z*(1-s)).
template <typename T>
AEFAST_HD T activation_grad(T z, int act, T slope) {
  using std::erf; using std::exp; using std::tanh;
  switch (act) {
    case 1: return z > T(0) ? T(1) : T(0);
    case 2: return z >= T(0) ? T(1) : slope;
    case 3: {
      const T s = T(1) / (T(1) + exp(-z));
      return s * (T(1) - s);
    }
    case 4: {
      const T t = tanh(z);
      return T(1) - t * t;
    }
    case 5: {
      const T cdf = T(0.5) * (T(1) + erf(z * T(0.70710678118654752440)));
      const T pdf = exp(T(-0.5) * z * z) * T(0.39894228040143267794);
      return cdf + z * pdf;
    }
    case 6: {
      const T s = T(1) / (T(1) + exp(-z));
      return s * (T(1) + z * (T(1) - s));
    }
    default: return T(1);
  }
}

// activation_grad() with the activation fixed at compile time.
template <int ACT, typename T>
AEFAST_HD T activation_grad_ct(T z, T slope) {
  using std::erf; using std::exp; using std::tanh;
  if constexpr (ACT == 0) {
    return T(1);
  } else if constexpr (ACT == 1) {
    return z > T(0) ? T(1) : T(0);
  } else if constexpr (ACT == 2) {
    return z >= T(0) ? T(1) : slope;
  } else {
    return activation_grad<T>(z, ACT, slope);
  }
}

// torch's max-pool update rule: a strictly larger value or any NaN replaces the running
// maximum, so the first maximum wins and the last NaN of a window gives the index.
template <typename T>
AEFAST_HD bool pool_takes(T val, T best) {
  return val > best || val != val;
}

// ---- pool geometry of the encoder blocks (conv_pool2d, conv_bn_pool2d): no padding, dilation 1.
// torch's pooling_output_shape: out = floor_or_ceil((conv - k) / s) + 1, and in ceil_mode the last
// window must start inside the conv output ((out - 1) * s < conv), else it is dropped.
AEFAST_HD int64_t pool_out_extent(int64_t conv, int64_t k, int64_t s, bool ceil_mode) {
  int64_t out = (conv - k + (ceil_mode ? s - 1 : 0)) / s + 1;
  if (ceil_mode && (out - 1) * s >= conv) --out;
  return out;
}

// A pool stride of 0 means "the pool size" (the schemas' default, torch's stride=None): resolved
// here only, for every entry point of the encoder blocks.
AEFAST_HD constexpr int64_t resolve_pool_stride(int64_t pool_stride, int64_t pool_size) {
  return pool_stride != 0 ? pool_stride : pool_size;
}

// The non-overlapping floor-mode pool the fast kernels were written for: stride = kernel and
// every window whole (ceil_mode adds no clipped window). Anything else is the "general" pool.
AEFAST_HD bool pool_is_tiling(int64_t conv_h, int64_t conv_w, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                                     bool ceil_mode) {
  return sh == kh && sw == kw &&
         (!ceil_mode || (pool_out_extent(conv_h, kh, sh, true) == conv_h / kh &&
                         pool_out_extent(conv_w, kw, sw, true) == conv_w / kw));
}

}  // namespace aefast
