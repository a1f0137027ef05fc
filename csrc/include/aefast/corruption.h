#pragma once
// Denoising corruption of ONE element, shared by aefast::corrupt (CPU, CUDA) and the encoder's
// input load (conv_pool2d_forward / _backward_weight with corruption=...), so that both give the
// same value for the same (seed, element) and "corrupt, then conv_pool2d" equals the fused op.
//
// Element i is the flat index of x[n, c, h, w] in the LOGICAL (N, C, H, W) order, whatever the
// memory layout: i = ((n*C + c)*H + h)*W + w. It draws Philox(seed, counter = i) (philox.h):
//   gaussian:    y = x + level * normal_i           (in the accumulation type, rounded to scalar_t)
//   masking:     y = u_i < level ? 0 : x
//   salt_pepper: y = u_i < level/2 ? low : (u_i < level ? high : x)
// u_i is a float uniform compared with float(level). The derivative dy/dx is 1 (gaussian) or
// the keep mask u_i >= level (masking, salt_pepper): the backward of both is "masking of the
// gradient with the same seed". Free of torch headers except the scalar types' conversions.
#include <cstdint>
#include <string_view>

#include "aefast/common.h"
#include "aefast/philox.h"

namespace aefast {

enum CorruptionKind : int { kNoCorruption = -1, kGaussianNoise = 0, kMaskingNoise = 1, kSaltPepperNoise = 2 };

// "none" -> -1, the corrupt() kinds -> 0..2, anything else -> -2 (the caller raises).
inline int corruption_kind_code(std::string_view kind) {
  if (kind == "none") return kNoCorruption;
  if (kind == "gaussian") return kGaussianNoise;
  if (kind == "masking") return kMaskingNoise;
  if (kind == "salt_pepper") return kSaltPepperNoise;
  return -2;
}

template <typename scalar_t, typename acc_t>
struct ElementCorruption {
  int kind = kNoCorruption;
  uint64_t key = 0;
  float level = 0.f, half = 0.f;  // the uniform thresholds, in float as the kernels compare them
  acc_t scale = acc_t(0);         // gaussian: level in the accumulation type
  scalar_t low, high;

  ElementCorruption() = default;
  ElementCorruption(int kind_, int64_t seed, double level_, double low_, double high_)
      : kind(kind_),
        key(static_cast<uint64_t>(seed)),
        level(static_cast<float>(level_)),
        half(static_cast<float>(level_ * 0.5)),
        scale(static_cast<acc_t>(level_)),
        low(static_cast<scalar_t>(low_)),
        high(static_cast<scalar_t>(high_)) {}

  AEFAST_HD bool active() const { return kind != kNoCorruption; }

  // The corrupted value of element `index` whose clean value is x (kind must be active).
  AEFAST_HD scalar_t operator()(scalar_t x, uint64_t index) const {
    if (kind == kGaussianNoise)
      return static_cast<scalar_t>(static_cast<acc_t>(x) + scale * static_cast<acc_t>(philox_normal_at(key, index)));
    const float u = philox_uniform_at(key, index);
    if (kind == kMaskingNoise) return u < level ? scalar_t(0) : x;
    return u < half ? low : (u < level ? high : x);
  }
};

}  // namespace aefast
