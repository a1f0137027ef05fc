#pragma once
// The SIMD variant the CPU kernels run, shared by every kernel family.
//
// Hot loops are compiled several times (baseline, AVX2+FMA, AVX-512) and one is picked at run
// time: the best the CPU has (decided once), capped by AEFAST_CPU_ISA=baseline|avx2|avx512
// (read per call, so that tests can hold every variant to the reference on a machine that has
// them all). A cap never raises the CPU's own limit, so an AVX-512 loop never runs on a CPU
// without AVX-512, and no -march=native is needed.
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string_view>

namespace aefast {

// The CPU backward passes that sweep an image once per channel (the decoder's per-channel
// backward, the encoder's weight gradient reading the image in place) walk it in bands of rows
// whose bytes fit in kL2BandBytes, so that every channel's pass over a band reads it from L2,
// not the whole image from L3 or memory. 128 KiB measured no worse than 256 KiB or 1 MiB (Xeon,
// 2 MiB L2 per core) and leaves room in a Zen 5 core's 1 MiB L2.
constexpr int64_t kL2BandBytes = int64_t(128) << 10;

// Rows of row_bytes each per band: as many as fit in kL2BandBytes, at least 1, at most rows.
inline int64_t rows_per_l2_band(int64_t row_bytes, int64_t rows) {
  return std::clamp<int64_t>(kL2BandBytes / std::max<int64_t>(1, row_bytes), 1, std::max<int64_t>(rows, 1));
}

enum class Isa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

inline Isa cpu_best_isa() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  static const Isa best = [] {
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
    return avx512 ? Isa::kAvx512 : avx2 ? Isa::kAvx2 : Isa::kBaseline;
  }();
  return best;
#else
  return Isa::kBaseline;
#endif
}

inline Isa cpu_isa() {
  Isa cap = Isa::kAvx512;
  if (const char* env = std::getenv("AEFAST_CPU_ISA"); env != nullptr && *env != '\0') {
    const std::string_view v(env);
    if (v == "baseline" || v == "generic")
      cap = Isa::kBaseline;
    else if (v == "avx2")
      cap = Isa::kAvx2;
    else
      TORCH_CHECK(v == "avx512", "AEFAST_CPU_ISA must be baseline, avx2 or avx512, not '", std::string(v), "'");
  }
  return static_cast<Isa>(std::min(static_cast<int>(cpu_best_isa()), static_cast<int>(cap)));
}

}  // namespace aefast
