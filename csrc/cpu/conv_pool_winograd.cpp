// The Winograd F(2x2, 3x3) forward of the encoder block conv -> bias -> activation -> 2x2
// max-pool with argmax (3x3, stride-1 convs), for fp32 and the half types (computed in fp32).
// The op entry point and its other forward paths are in conv_pool.cpp (the backward in
// conv_pool_backward.cpp); this file reuses its input load, register-blocked GEMM and fused
// epilogue (conv_pool_cpu.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <vector>

#include "aefast/conv_algorithm.h"
#include "aefast/cpu_isa.h"
#include "conv_pool_cpu.h"

namespace aefast {
namespace encoder_cpu {
namespace {

#define AEFAST_PER_ISA_KERNELS "conv_pool_winograd_kernels.inc"
#include "per_isa.inc"

}  // namespace

// ---------------------------------------------------------------- Winograd forward
//
// For the 3x3, stride-1 conv under a 2x2 pool, the conv's 2x2 output tiles ARE the pool windows,
// so the whole block runs tile by tile with Winograd's F(2x2, 3x3) (Lavin & Gray 2016):
//   Z_tile = A^T [ sum_ci (G g[co, ci] G^T) . (B^T d[ci] B) ] A      (d: the tile's 4x4 patch)
// (matrices and transforms in conv_pool_kernels.inc). Per strip of pooled rows of one image:
//   1. load the strip's input rows channels-last into a zero-bordered buffer (load_input_rows:
//      the corruption, if any, is applied there, as in the direct path);
//   2. V[xi] = (B^T d B)[xi] for every tile (16 x tiles x Cin);
//   3. 16 GEMMs Mo[xi] = V[xi] (tiles x Cin) @ U[xi] (Cin x Cout), U = G g G^T transformed once
//      per call, by the register-blocked gemm_strip (the strip's operands stay in L2);
//   4. Z = A^T Mo A into the strip's channels-last conv tile, then the same fused epilogue as
//      every other path (bias, rounding to scalar_t, activation, pool, argmax, z at the argmax).
// 16 multiply-adds per tile, channel pair and output channel instead of 36: 2.25x fewer than the
// direct conv. Numerics: the transforms' adds and the 1/2 factors of G (exact in binary) add
// rounding of the size of the direct sum's own (the F(2,3) transform is the best-conditioned
// Winograd form); fp32 results stay within the tests' 1e-5 relative tolerance of torch's conv,
// and argmax differences only occur at numerical ties, as for any other summation order. Half
// types are widened to fp32 (accumulation in fp32), as on the other paths.
// Measured against oneDNN + epilogue (the path it replaces) in the commit that added it.
bool encoder_uses_winograd(const Shape& s, at::ScalarType dtype) {
  if (!(s.KH == 3 && s.KW == 3 && s.SH == 1 && s.SW == 1 && s.PKH == 2 && s.PKW == 2 && dtype != at::kDouble))
    return false;
  // AEFAST_ENCODER_WINOGRAD=0|1 (read per call) turns it off, or on wherever the geometry fits:
  // for tests and A/B timing.
  if (const char* env = std::getenv("AEFAST_ENCODER_WINOGRAD"); env != nullptr && *env != '\0') {
    const std::string v(env);
    TORCH_CHECK(v == "0" || v == "1", "AEFAST_ENCODER_WINOGRAD must be 0 or 1, got '", v, "'");
    return v == "1";
  }
  // Channels-last outputs with few output channels and a large conv map: oneDNN's channels-last
  // conv + the fused epilogue is faster (measured, bench/bench_encoder_blocks.py's shapes, 1
  // thread, CPU time, interleaved, loaded machine: directions): N16 8->8 96x96 1.13x, 16->16 48x48
  // 1.28x; Winograd stays faster at 16->16 24x24 (0.90x) and 32->32 12x12 (0.82x), and for NCHW.
  if (s.out_cl && s.Cout <= 16 && s.HC * s.WC * s.Cout >= 32768) return false;
  return encoder_cpu_uses_vendor_conv(s.K());
}

// The shared rule (aefast/conv_algorithm.h), unless AEFAST_ENCODER_CONV=vendor|direct (read per
// call) forces one answer: for A/B timing (bench/bench_kernel_ledger.py) and tests. Winograd
// replaces the vendor conv where its geometry fits unless AEFAST_ENCODER_WINOGRAD=0.
bool encoder_cpu_uses_vendor_conv(int64_t reduction) {
  if (const char* env = std::getenv("AEFAST_ENCODER_CONV"); env != nullptr && *env != '\0') {
    const std::string v(env);
    TORCH_CHECK(v == "vendor" || v == "direct", "AEFAST_ENCODER_CONV must be 'vendor' or 'direct', got '", v, "'");
    return v == "vendor";
  }
  return encoder_uses_vendor_conv(reduction);
}

template <typename T>
struct WinogradFns {
  void (*input)(const T*, int64_t, int64_t, int64_t, int64_t, int64_t, T*);
  void (*output)(const T*, int64_t, int64_t, int64_t, int64_t, int64_t, T*);
};

template <typename T>
WinogradFns<T> pick_winograd(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return {&avx512::winograd_input_transform<T>, &avx512::winograd_output_transform<T>};
    case Isa::kAvx2: return {&avx2::winograd_input_transform<T>, &avx2::winograd_output_transform<T>};
    default: return {&generic::winograd_input_transform<T>, &generic::winograd_output_transform<T>};
  }
}

void conv_pool2d_forward_winograd(const at::Tensor& input, const at::Tensor& weight,
                                  const std::optional<at::Tensor>& bias_opt, const Shape& s, int64_t activation,
                                  double negative_slope, const InputCorruption& noise, at::Tensor& pooled,
                                  at::Tensor& window, at::Tensor& preact) {
  const Isa isa = cpu_isa();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "conv_pool2d_forward_winograd", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    const int64_t Cin = s.Cin, Cout = s.Cout, WO = s.WO, WU = s.WU();
    at::Tensor bias_acc = bias_opt.has_value() && bias_opt->defined()
                              ? bias_opt->to(acc_dtype).contiguous()
                              : at::zeros({Cout}, input.options().dtype(acc_dtype));
    const acc_t* bias_ptr = bias_acc.const_data_ptr<acc_t>();
    const auto gemm = pick_gemm<acc_t>(isa);
    const auto wino = pick_winograd<acc_t>(isa);
    const int64_t NR = gemm.nr, nb = Cout / NR;
    // U[xi][ci][co] = (G g G^T)[xi] of g = w[co, ci] (in fp64, rounded once), and its copy packed
    // (nb, Cin, NR) per xi for gemm_strip.
    const at::Tensor w64 = weight.to(at::kDouble).contiguous();
    const double* wp = w64.const_data_ptr<double>();
    std::vector<acc_t> U(16 * Cin * Cout), Up(16 * nb * Cin * NR);
    for (int64_t co = 0; co < Cout; ++co)
      for (int64_t ci = 0; ci < Cin; ++ci) {
        const double* g = wp + (co * Cin + ci) * 9;
        double gg[4][3];  // G g: combinations of g's rows
        for (int j = 0; j < 3; ++j) {
          gg[0][j] = g[j];
          gg[1][j] = 0.5 * (g[j] + g[3 + j] + g[6 + j]);
          gg[2][j] = 0.5 * (g[j] - g[3 + j] + g[6 + j]);
          gg[3][j] = g[6 + j];
        }
        for (int i = 0; i < 4; ++i) {  // (G g) G^T: the same combinations of its columns
          const double u[4] = {gg[i][0], 0.5 * (gg[i][0] + gg[i][1] + gg[i][2]),
                               0.5 * (gg[i][0] - gg[i][1] + gg[i][2]), gg[i][2]};
          for (int j = 0; j < 4; ++j) U[((i * 4 + j) * Cin + ci) * Cout + co] = static_cast<acc_t>(u[j]);
        }
      }
    for (int64_t xi = 0; xi < 16; ++xi)
      for (int64_t cb = 0; cb < nb; ++cb)
        for (int64_t ci = 0; ci < Cin; ++ci)
          for (int64_t c = 0; c < NR; ++c)
            Up[((xi * nb + cb) * Cin + ci) * NR + c] = U[(xi * Cin + ci) * Cout + cb * NR + c];
    // Strips of pooled rows whose V and Mo (16 x tiles x (Cin + Cout)) stay in L2; the tile count
    // is padded to the GEMM's row block (6) with zero rows.
    constexpr int64_t kMR = 6;
    const int64_t per_row = 16 * WO * (Cin + Cout) * static_cast<int64_t>(sizeof(acc_t));
    const int64_t rows = std::clamp<int64_t>((384 << 10) / std::max<int64_t>(per_row, 1), 1, s.HO);
    const int64_t strips = (s.HO + rows - 1) / rows;
    const int64_t mpad_max = (rows * WO + kMR - 1) / kMR * kMR;
    // The zero-bordered input buffer: column b holds input column b - PW, row i input row
    // 2*pr0 - PH + i; tiles read columns [0, 2*WO + 2), the row copy writes [PW, PW + W).
    const int64_t Wb = std::max<int64_t>(2 * WO + 2, s.PW + s.W), ldx = Wb * Cin;
    const scalar_t* xp = input.const_data_ptr<scalar_t>();
    const int64_t xstr[4] = {input.stride(0), input.stride(1), input.stride(2), input.stride(3)};
    scalar_t* pooled_p = pooled.mutable_data_ptr<scalar_t>();
    uint8_t* window_p = window.mutable_data_ptr<uint8_t>();
    scalar_t* preact_p = preact.mutable_data_ptr<scalar_t>();
    const auto epilogue = pick_epilogue<scalar_t, acc_t>(activation, isa);
    const acc_t slope = static_cast<acc_t>(negative_slope);
    const auto corrupt_at = noise.at_element<scalar_t, acc_t>();
    const acc_t* U_p = U.data();
    const acc_t* Up_p = Up.data();
    at::parallel_for(0, s.N * strips, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> xb((2 * rows + 2) * ldx), V(16 * mpad_max * Cin), Mo(16 * mpad_max * Cout),
          tile(2 * rows * WU * Cout), best(Cout), bestz(Cout);
      std::vector<int32_t> bestk(Cout);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / strips, pr0 = (task % strips) * rows;
        const int64_t pr1 = std::min(pr0 + rows, s.HO), nrows = pr1 - pr0;
        const int64_t mpad = (nrows * WO + kMR - 1) / kMR * kMR;
        const int64_t ya = 2 * pr0 - s.PH;
        const int64_t y0 = std::max<int64_t>(0, ya), y1 = std::min<int64_t>(s.H, 2 * pr1 - s.PH + 2);
        std::fill(xb.begin(), xb.begin() + (2 * nrows + 2) * ldx, acc_t(0));
        if (y1 > y0)
          load_input_rows<scalar_t, acc_t>(xp, xstr, s, n, y0, y1, xb.data() + (y0 - ya) * ldx + s.PW * Cin, ldx,
                                           corrupt_at);
        wino.input(xb.data(), ldx, Cin, nrows, WO, mpad, V.data());
        for (int64_t xi = 0; xi < 16; ++xi)
          gemm.fn(V.data() + xi * mpad * Cin, mpad, Cin, Up_p + xi * nb * Cin * NR, U_p + xi * Cin * Cout, Cout,
                  Mo.data() + xi * mpad * Cout);
        wino.output(Mo.data(), mpad, Cout, nrows, WO, WU, tile.data());
        epilogue(tile.data(), WU, bias_ptr, s, n, pr0, pr1, slope, pooled_p, window_p, preact_p, best.data(),
                 bestz.data(), bestk.data());
      }
    });
  });
}

}  // namespace encoder_cpu
}  // namespace aefast
