#pragma once
// Counter-based Philox4x32-10, bit-identical to Triton's tl.randint4x / tl.rand / tl.randn
// (triton/language/random.py), so that the CPU, CUDA and Triton backends draw THE SAME
// uniform numbers for the same (seed, element index):
//   key     = (seed_lo32, seed_hi32)
//   counter = (index_lo32, index_hi32, 0, 0)
//   uniform = int32(bits) mapped to [0, 1): x < 0 ? ~x : x, times 4.6566127342e-10f
//   normal  = Box-Muller on the first two words, cos branch (Triton's randn).
// No state is carried between elements: any element's noise can be regenerated from the
// seed alone (the backward of reparameterize and of masking corruption does exactly that).
// Free of torch headers so that it compiles quickly under nvcc.
#include <cmath>
#include <cstdint>

#include "aefast/common.h"

namespace aefast {

struct Philox4 {
  uint32_t c0, c1, c2, c3;
};

AEFAST_HD uint32_t philox_mulhi(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * static_cast<uint64_t>(b)) >> 32);
}

AEFAST_HD Philox4 philox4x32_10(uint64_t seed, uint64_t index) {
  uint32_t c0 = static_cast<uint32_t>(index), c1 = static_cast<uint32_t>(index >> 32), c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
  constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t p0 = c0, p2 = c2;
    c0 = philox_mulhi(kRoundB, p2) ^ c1 ^ k0;
    c2 = philox_mulhi(kRoundA, p0) ^ c3 ^ k1;
    c1 = kRoundB * p2;
    c3 = kRoundA * p0;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  return Philox4{c0, c1, c2, c3};
}

// Triton's uint_to_uniform_float for 32-bit words: a value in [0, 1) (never 1 after rounding).
AEFAST_HD float philox_uniform(uint32_t bits) {
  int32_t x = static_cast<int32_t>(bits);
  x = x < 0 ? ~x : x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

AEFAST_HD float philox_uniform_at(uint64_t seed, uint64_t index) {
  return philox_uniform(philox4x32_10(seed, index).c0);
}

// Triton's randn: Box-Muller on words 0 and 1, u1 clamped at 1e-7 so log stays finite.
AEFAST_HD float philox_normal_at(uint64_t seed, uint64_t index) {
  const Philox4 r = philox4x32_10(seed, index);
  float u1 = philox_uniform(r.c0);
  const float u2 = philox_uniform(r.c1);
  u1 = u1 > 1.0e-7f ? u1 : 1.0e-7f;
  const float th = 6.283185307179586f * u2;
  const float rad = sqrtf(-2.0f * logf(u1));
  return rad * cosf(th);
}

}  // namespace aefast
