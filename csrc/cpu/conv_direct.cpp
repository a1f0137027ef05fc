// A convolution's weight gradient by direct accumulation (declared in aefast/conv_direct.h).
// With grad (N, Cg, HG, WG), x (N, Cx, HX, WX), a KH x KW kernel, stride (sh, sw), padding (ph, pw):
//
//   grad_weight[g, c, kh, kw] = sum over p = (n, i, j) of grad[n, g, i, j] * x[n, c, i*sh - ph + kh, j*sw - pw + kw]
//
// (x zero outside its H x W), i.e. the GEMM  grad^T (Cg x P) @ im2col(x) (P x Cx*KH*KW)  over the
// P = N*HG*WG grad positions. Here it runs without writing im2col(x): x is copied once into xpad,
// channels-last and zero-padded (HP = (HG-1)*sh + KH rows, WP = (WG-1)*sw + KW columns, so every
// tap of every position lands inside it), and tap t = (kh, kw, c) of position p is
// xpad[base(p) + off[t]] with base(p) = ((n*HP + i*sh)*WP + j*sw)*Cx, off[t] = (kh*WP + kw)*Cx + c.
// The kernel (conv_direct_kernels.inc) keeps a register tile of TB taps x Cg channels and, per
// position, loads the channels-last grad row once and multiply-adds it with TB broadcast x values.
//
// The same formula is a ConvTranspose2d's weight gradient (Cin, Cout, KH, KW): out[n, a, i*s - p + kh,
// ...] += x[n, b, i, j] * w[b, a, kh, kw] gives dW[b, a, kh, kw] = sum x[n, b, i, j] * grad_out[n, a,
// i*s - p + kh, ...], so grad = the transposed conv's input and x = its grad_output.
//
// Why: oneDNN's backward-weights primitive is slow at the small channel counts of a conv VAE or a
// DCGAN-style encoder, and im2col + GEMM is no better there (MKL's sgemm on 8 x 8192 x 9 ran at
// ~17 GFLOP/s, and torch's unfold costs more than the GEMM). The measurements behind the rule are
// in conv_weight_grad_direct_serves below.
//
// Order of the sums: the positions are cut into chunks of whole grad rows (kChunkPositions, a
// fixed size), each chunk's sums run in position order, and the chunks' partial sums are added in
// chunk order: the result does not depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "aefast/conv_direct.h"
#include "aefast/cpu_buffer_cache.h"
#include "aefast/cpu_isa.h"

namespace aefast {
namespace {

#define AEFAST_PER_ISA_KERNELS "conv_direct_kernels.inc"
#include "per_isa.inc"

enum class DirectMode { Auto, Always, Never };

DirectMode mode_from_env() {
  // Read at each call: tests flip it with monkeypatch; a getenv is ~100 ns.
  const char* v = std::getenv("AEFAST_CONV_DIRECT");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return DirectMode::Auto;
  if (std::strcmp(v, "always") == 0) return DirectMode::Always;
  if (std::strcmp(v, "never") == 0) return DirectMode::Never;
  TORCH_CHECK(false, "AEFAST_CONV_DIRECT must be auto, always or never, got '", v, "'");
}

// grad's channels in 32-byte vectors: at most kMaxVectors of them (32 fp32 / 16 fp64 channels), the
// register tile's width.
constexpr int64_t kMaxVectors = 4;
// Grad positions per chunk of the sum (whole rows): ~32 KiB of an 8-channel fp32 grad.
constexpr int64_t kChunkPositions = 1024;

template <typename T>
using TapBlockFn = void (*)(const T*, const T*, const int64_t*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                            int64_t, int64_t, int64_t, T*);
template <typename T>
using RowSumsFn = void (*)(const T*, int64_t, int64_t, int64_t, T*);

// The tap-block sizes tried, largest first; a block holds TB*CV accumulator vectors, at most the
// ISA's register budget (32 AVX-512 registers, 16 AVX2 ones, 16 SSE ones holding half a vector each).
constexpr int kTapBlocks[] = {24, 12, 6, 3, 1};

int register_budget(Isa isa) { return isa == Isa::kAvx512 ? 24 : isa == Isa::kAvx2 ? 12 : 6; }

#define AEFAST_TAP_BLOCK_PICKER(NS)                                       \
  template <typename T, int CV>                                           \
  TapBlockFn<T> NS##_tap_block(int tb) {                                  \
    if constexpr (CV == 1)                                                \
      if (tb == 24) return &NS::tap_block<T, CV, 24>;                     \
    if constexpr (CV <= 2)                                                \
      if (tb == 12) return &NS::tap_block<T, CV, 12>;                     \
    if (tb == 6) return &NS::tap_block<T, CV, 6>;                         \
    if (tb == 3) return &NS::tap_block<T, CV, 3>;                         \
    return &NS::tap_block<T, CV, 1>;                                      \
  }
AEFAST_TAP_BLOCK_PICKER(generic)
AEFAST_TAP_BLOCK_PICKER(avx2)
AEFAST_TAP_BLOCK_PICKER(avx512)
#undef AEFAST_TAP_BLOCK_PICKER

template <typename T, int CV>
TapBlockFn<T> tap_block_for(Isa isa, int tb) {
  switch (isa) {
    case Isa::kAvx512: return avx512_tap_block<T, CV>(tb);
    case Isa::kAvx2: return avx2_tap_block<T, CV>(tb);
    default: return generic_tap_block<T, CV>(tb);
  }
}

template <typename T, int CV>
RowSumsFn<T> row_sums_for(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return &avx512::row_sums<T, CV>;
    case Isa::kAvx2: return &avx2::row_sums<T, CV>;
    default: return &generic::row_sums<T, CV>;
  }
}

// The blocks of taps [0, taps) and their kernels: greedy, largest block first.
template <typename T, int CV>
std::vector<std::pair<int64_t, TapBlockFn<T>>> tap_blocks(Isa isa, int64_t taps, std::vector<int>* sizes) {
  std::vector<std::pair<int64_t, TapBlockFn<T>>> blocks;
  const int budget = register_budget(isa);
  for (int64_t t0 = 0; t0 < taps;) {
    int tb = 1;
    for (int b : kTapBlocks)
      if (b * CV <= budget && b <= taps - t0) {
        tb = b;
        break;
      }
    blocks.emplace_back(t0, tap_block_for<T, CV>(isa, tb));
    sizes->push_back(tb);
    t0 += tb;
  }
  return blocks;
}

// xpad (N, HP, WP, Cx): xpad[n, h, w, c] = x[n, c, h - ph, w - pw], zero outside x; a row's valid
// columns are one memcpy when x is channels-last (or has one channel), else a transposing loop.
template <typename T>
at::Tensor padded_channels_last(const at::Tensor& x, int64_t HP, int64_t WP, int64_t ph, int64_t pw) {
  const int64_t N = x.size(0), Cx = x.size(1), HX = x.size(2), WX = x.size(3);
  at::Tensor xpad_t = empty_cpu_cached({N, HP, WP, Cx}, x.options());
  const T* xp = x.const_data_ptr<T>();
  T* dp = xpad_t.mutable_data_ptr<T>();
  const int64_t sN = x.stride(0), sC = x.stride(1), sH = x.stride(2), sW = x.stride(3);
  const bool rows_contiguous = (WX == 1 || sW == Cx) && (Cx == 1 || sC == 1);
  const int64_t left = std::min(pw, WP), valid = std::max<int64_t>(0, std::min(WP - pw, WX));
  at::parallel_for(0, N * HP, 64, [&](int64_t u0, int64_t u1) {
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t n = u / HP, h = u % HP - ph;
      T* d = dp + u * WP * Cx;
      if (h < 0 || h >= HX || valid == 0) {
        std::fill(d, d + WP * Cx, T(0));
        continue;
      }
      std::fill(d, d + left * Cx, T(0));
      std::fill(d + (left + valid) * Cx, d + WP * Cx, T(0));
      const T* src = xp + n * sN + h * sH;
      T* dv = d + left * Cx;
      if (rows_contiguous) {
        std::memcpy(dv, src, valid * Cx * sizeof(T));
      } else {
        for (int64_t c = 0; c < Cx; ++c)
          for (int64_t w = 0; w < valid; ++w) dv[w * Cx + c] = src[w * sW + c * sC];
      }
    }
  });
  return xpad_t;
}

// off[t] for the taps t = (kh, kw, c) of a KH x KW kernel over Cx channels in an xpad WP wide.
std::vector<int64_t> tap_offsets(int64_t KH, int64_t KW, int64_t Cx, int64_t WP) {
  std::vector<int64_t> off(KH * KW * Cx);
  for (int64_t kh = 0; kh < KH; ++kh)
    for (int64_t kw = 0; kw < KW; ++kw)
      for (int64_t c = 0; c < Cx; ++c) off[(kh * KW + kw) * Cx + c] = (kh * WP + kw) * Cx + c;
  return off;
}

template <typename T, int CV>
void weight_grad(const at::Tensor& grad, const at::Tensor& x, int64_t KH, int64_t KW, int64_t sh, int64_t sw,
                 int64_t ph, int64_t pw, bool want_bias, at::Tensor& grad_weight, at::Tensor& grad_bias) {
  constexpr int64_t VL = 32 / sizeof(T);
  constexpr int64_t Cgp = CV * VL;
  const int64_t N = grad.size(0), Cg = grad.size(1), HG = grad.size(2), WG = grad.size(3);
  const int64_t Cx = x.size(1);
  const int64_t HP = (HG - 1) * sh + KH, WP = (WG - 1) * sw + KW, rows = N * HG;
  // grad as channels-last rows of Cgp channels: itself, or a copy padded with zero channels.
  at::Tensor g_rows;
  if (Cg == Cgp && grad.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    g_rows = grad;
  } else {
    g_rows = empty_cpu_cached({N, HG, WG, Cgp}, grad.options());
    g_rows.narrow(3, Cg, Cgp - Cg).zero_();
    g_rows.narrow(3, 0, Cg).copy_(grad.permute({0, 2, 3, 1}));
  }
  const at::Tensor xpad_t = padded_channels_last<T>(x, HP, WP, ph, pw);
  const int64_t taps = Cx * KH * KW;
  const std::vector<int64_t> off = tap_offsets(KH, KW, Cx, WP);
  const Isa isa = cpu_isa();
  std::vector<int> sizes;
  const auto blocks = tap_blocks<T, CV>(isa, taps, &sizes);
  const RowSumsFn<T> sums = row_sums_for<T, CV>(isa);
  const int64_t rows_per_chunk = std::max<int64_t>(1, kChunkPositions / WG);
  const int64_t chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
  const int64_t width = (taps + (want_bias ? 1 : 0)) * Cgp;  // per chunk: taps x Cgp, then the bias row
  at::Tensor partial_t = empty_cpu_cached({chunks, width}, grad.options());
  T* partial = partial_t.mutable_data_ptr<T>();
  const T* gp = g_rows.const_data_ptr<T>();
  const T* xp = xpad_t.const_data_ptr<T>();
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t r0 = c * rows_per_chunk, r1 = std::min(rows, r0 + rows_per_chunk);
      T* acc = partial + c * width;
      for (const auto& [t0, fn] : blocks)
        fn(gp, xp, off.data() + t0, r0, r1, HG, WG, HP, WP, Cx, sh, sw, acc + t0 * Cgp);
      if (want_bias) sums(gp, r0, r1, WG, acc + taps * Cgp);
    }
  });
  // The chunks added in order, then grad_weight[g, c, kh, kw] from the tap row (kh, kw, c).
  std::vector<T> total(width, T(0));
  for (int64_t c = 0; c < chunks; ++c)
    for (int64_t k = 0; k < width; ++k) total[k] += partial[c * width + k];
  grad_weight = at::empty({Cg, Cx, KH, KW}, grad.options());
  T* wp = grad_weight.mutable_data_ptr<T>();
  for (int64_t g = 0; g < Cg; ++g)
    for (int64_t c = 0; c < Cx; ++c)
      for (int64_t kh = 0; kh < KH; ++kh)
        for (int64_t kw = 0; kw < KW; ++kw)
          wp[((g * Cx + c) * KH + kh) * KW + kw] = total[((kh * KW + kw) * Cx + c) * Cgp + g];
  if (want_bias) {
    grad_bias = at::empty({Cg}, grad.options());
    std::copy(total.begin() + taps * Cgp, total.begin() + taps * Cgp + Cg, grad_bias.mutable_data_ptr<T>());
  }
}

template <typename T>
using ConvPositionsFn = void (*)(const T*, const T*, const T*, const int64_t*, int64_t, int64_t, int64_t, int64_t,
                                 int64_t, T*);

// Positions per block of the forward, largest first: PB*CV accumulator vectors, within the budget.
constexpr int kPositionBlocks[] = {8, 4, 2, 1};

#define AEFAST_CONV_POSITIONS_PICKER(NS)                                  \
  template <typename T, int CV>                                           \
  ConvPositionsFn<T> NS##_conv_positions(int pb) {                        \
    if (pb == 8) return &NS::conv_positions<T, CV, 8>;                    \
    if (pb == 4) return &NS::conv_positions<T, CV, 4>;                    \
    if (pb == 2) return &NS::conv_positions<T, CV, 2>;                    \
    return &NS::conv_positions<T, CV, 1>;                                 \
  }
AEFAST_CONV_POSITIONS_PICKER(generic)
AEFAST_CONV_POSITIONS_PICKER(avx2)
AEFAST_CONV_POSITIONS_PICKER(avx512)
#undef AEFAST_CONV_POSITIONS_PICKER

template <typename T, int CV>
ConvPositionsFn<T> conv_positions_for(Isa isa, int pb) {
  switch (isa) {
    case Isa::kAvx512: return avx512_conv_positions<T, CV>(pb);
    case Isa::kAvx2: return avx2_conv_positions<T, CV>(pb);
    default: return generic_conv_positions<T, CV>(pb);
  }
}

// out (N, HO, WO, Cg) channels-last: the conv of x with weight (Cg, Cx, KH, KW) and bias, per output
// row (in parallel; no sums across rows, so nothing depends on the thread count).
template <typename T, int CV>
void conv_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, int64_t sh, int64_t sw,
                  int64_t ph, int64_t pw, int64_t HO, int64_t WO, at::Tensor& out) {
  constexpr int64_t VL = 32 / sizeof(T);
  constexpr int64_t Cgp = CV * VL;
  const int64_t N = x.size(0), Cx = x.size(1), Cg = weight.size(0), KH = weight.size(2), KW = weight.size(3);
  const int64_t HP = (HO - 1) * sh + KH, WP = (WO - 1) * sw + KW, taps = Cx * KH * KW;
  const at::Tensor xpad_t = padded_channels_last<T>(x, HP, WP, ph, pw);
  const std::vector<int64_t> off = tap_offsets(KH, KW, Cx, WP);
  // wt[t, g] = weight[g, c, kh, kw] for t = (kh, kw, c), zero for the padding channels g >= Cg
  std::vector<T> wt(taps * Cgp, T(0)), b(Cgp, T(0));
  const at::Tensor w = weight.contiguous();
  const T* wp = w.const_data_ptr<T>();
  for (int64_t g = 0; g < Cg; ++g)
    for (int64_t c = 0; c < Cx; ++c)
      for (int64_t kh = 0; kh < KH; ++kh)
        for (int64_t kw = 0; kw < KW; ++kw)
          wt[((kh * KW + kw) * Cx + c) * Cgp + g] = wp[((g * Cx + c) * KH + kh) * KW + kw];
  if (bias.defined()) {
    const at::Tensor bc = bias.contiguous();
    std::copy(bc.const_data_ptr<T>(), bc.const_data_ptr<T>() + Cg, b.begin());
  }
  const Isa isa = cpu_isa();
  const int budget = register_budget(isa) / 3;  // the accumulators, and room for the weights of a tap
  std::vector<std::pair<int64_t, ConvPositionsFn<T>>> blocks;  // (first position, kernel) along a row
  for (int64_t j0 = 0; j0 < WO;) {
    int pb = 1;
    for (int b : kPositionBlocks)
      if (b * CV <= std::max(budget, CV) && b <= WO - j0) {
        pb = b;
        break;
      }
    blocks.emplace_back(j0, conv_positions_for<T, CV>(isa, pb));
    j0 += pb;
  }
  const T* xp = xpad_t.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  at::parallel_for(0, N * HO, std::max<int64_t>(1, 256 / WO), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / HO, i = r % HO;
      const T* xrow = xp + (n * HP + i * sh) * WP * Cx;
      for (const auto& [j0, fn] : blocks) fn(xrow, wt.data(), b.data(), off.data(), taps, j0, sw, Cx, Cg, op + r * WO * Cg);
    }
  });
}

bool supported(const at::Tensor& grad, const at::Tensor& x, int64_t kh, int64_t kw) {
  if (!(grad.device().is_cpu() && x.device().is_cpu() && grad.dim() == 4 && x.dim() == 4 && kh > 0 && kw > 0 &&
        grad.size(0) == x.size(0) && grad.numel() > 0 && x.numel() > 0 && grad.scalar_type() == x.scalar_type() &&
        (grad.scalar_type() == at::kFloat || grad.scalar_type() == at::kDouble)))
    return false;
  const int64_t vl = 32 / static_cast<int64_t>(grad.element_size());
  return (grad.size(1) + vl - 1) / vl <= kMaxVectors;
}

}  // namespace

// The bounds of both rules (their measurements are in conv_weight_grad_direct_serves and
// conv_forward_direct_serves).
constexpr int64_t kMaxTaps = 8 * 9;
constexpr int64_t kMaxPositions = 8192;

bool conv_weight_grad_direct_serves(const at::Tensor& grad, const at::Tensor& x, int64_t kh, int64_t kw) {
  const DirectMode mode = mode_from_env();
  if (mode == DirectMode::Never || !supported(grad, x, kh, kw)) return false;
  if (mode == DirectMode::Always) return true;
  // The rule, the shapes where it was measured faster than oneDNN (fp32, 1 thread, process_time,
  // median of 9 x 30, loaded 2-core AVX-512 machine, Dec 2026; channels-last grad and x, 3x3), in us:
  //   N128 1->8 16x16 s2 (the conv VAE's first stage; its decoder's ConvTranspose2d 8->1 8x8 s2 is
  //   the same sum): oneDNN 133, direct 36 (130 vs 37 as the transposed conv's weight grad);
  //   N128 8->16 8x8 s2 (its second stage; the decoder's 16->8 the same way): 78 vs 50 (83 vs 52).
  // and where it lost or tied (so left out; measured before the xpad copy became row copies, which
  // took enc1 from 71 to 36 us, so worth measuring again): N16 16->32 48x48 s2: oneDNN 465 vs 738;
  // N16 3->16 96x96 s1: 1100 vs 1466; N16 32->32 24x24: 261 vs 367; N16 8->8 96x96 s1: 2142 vs 2087.
  // So: fp32 (fp64 is the tests' dtype; half types stay on oneDNN), grad channels one or two whole
  // 8-wide vectors (no padded copy), at most kMaxTaps taps and kMaxPositions grad positions.
  const int64_t cg = grad.size(1);
  return grad.scalar_type() == at::kFloat && (cg == 8 || cg == 16) && x.size(1) * kh * kw <= kMaxTaps &&
         grad.size(0) * grad.size(2) * grad.size(3) <= kMaxPositions;
}

std::tuple<at::Tensor, at::Tensor> conv_weight_grad_direct(const at::Tensor& grad, const at::Tensor& x, int64_t kh,
                                                           int64_t kw, c10::IntArrayRef stride,
                                                           c10::IntArrayRef padding, bool want_bias) {
  TORCH_CHECK(supported(grad, x, kh, kw),
              "aefast: conv_weight_grad_direct needs CPU grad (N, Cg, HG, WG) and x (N, Cx, HX, WX) of one dtype "
              "(fp32 or fp64), a positive kernel size and at most ",
              kMaxVectors * 32 / 4, " fp32 (", kMaxVectors * 32 / 8, " fp64) grad channels");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && stride[0] > 0 && stride[1] > 0 && padding[0] >= 0 &&
                  padding[1] >= 0,
              "aefast: conv_weight_grad_direct needs two positive strides and two non-negative paddings");
  at::Tensor grad_weight, grad_bias;
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "conv_weight_grad_direct", [&] {
    const int64_t vl = 32 / static_cast<int64_t>(sizeof(scalar_t));
    switch ((grad.size(1) + vl - 1) / vl) {
      case 1:
        weight_grad<scalar_t, 1>(grad, x, kh, kw, stride[0], stride[1], padding[0], padding[1], want_bias, grad_weight,
                                 grad_bias);
        break;
      case 2:
        weight_grad<scalar_t, 2>(grad, x, kh, kw, stride[0], stride[1], padding[0], padding[1], want_bias, grad_weight,
                                 grad_bias);
        break;
      default:  // 3 and 4 vectors: the 4-vector tile, the fourth padded with zero channels when needed
        weight_grad<scalar_t, 4>(grad, x, kh, kw, stride[0], stride[1], padding[0], padding[1], want_bias, grad_weight,
                                 grad_bias);
    }
  });
  return {grad_weight, grad_bias};
}

bool conv_forward_direct_serves(const at::Tensor& x, const at::Tensor& weight, c10::IntArrayRef stride,
                                c10::IntArrayRef padding) {
  const DirectMode mode = mode_from_env();
  if (mode == DirectMode::Never || weight.dim() != 4 || weight.scalar_type() != x.scalar_type()) return false;
  // the forward's output channels play the weight gradient's grad channels: the same limits
  if (!(x.device().is_cpu() && x.dim() == 4 && x.numel() > 0 && x.size(1) == weight.size(1) &&
        (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble) &&
        (weight.size(0) + 32 / x.element_size() - 1) / (32 / x.element_size()) <= kMaxVectors))
    return false;
  if (mode == DirectMode::Always) return true;
  // The rule (fp32, 1 thread, process_time, loaded machine, us; oneDNN on the NCHW input plus the
  // channels-last copy of its output, which is what the encoder otherwise does at small planes / oneDNN
  // given channels-last / direct): N128 1->8 16x16 s2 (the conv VAE's first stage) 97 / 73 / 34;
  // N128 8->16 8x8 s2 (its second stage) 86 / 104 / 70; N16 3->16 96x96 s2 3009 / 351 / 503 loses
  // (36864 positions). So: fp32, 8 or 16 output channels, at most kMaxTaps taps (the weight
  // gradient's bound) and kMaxPositions output positions, as the weight gradient's rule.
  if (stride.size() != 2 || padding.size() != 2 || stride[0] <= 0 || stride[1] <= 0 ||
      x.size(2) + 2 * padding[0] < weight.size(2) || x.size(3) + 2 * padding[1] < weight.size(3))
    return false;  // malformed: the vendor conv reports it
  const int64_t cg = weight.size(0);
  const int64_t positions = x.size(0) * ((x.size(2) + 2 * padding[0] - weight.size(2)) / stride[0] + 1) *
                            ((x.size(3) + 2 * padding[1] - weight.size(3)) / stride[1] + 1);
  return x.scalar_type() == at::kFloat && (cg == 8 || cg == 16) &&
         weight.size(1) * weight.size(2) * weight.size(3) <= kMaxTaps && positions <= kMaxPositions;
}

at::Tensor conv_forward_direct(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               c10::IntArrayRef stride, c10::IntArrayRef padding) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4 && weight.dim() == 4 && x.size(1) == weight.size(1) &&
                  x.scalar_type() == weight.scalar_type() &&
                  (x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble) &&
                  (weight.size(0) + 32 / x.element_size() - 1) / (32 / x.element_size()) <= kMaxVectors,
              "aefast: conv_forward_direct needs CPU x (N, Cx, H, W) and weight (Cg, Cx, KH, KW) of one dtype (fp32 or "
              "fp64) with at most ", kMaxVectors * 8, " fp32 (", kMaxVectors * 4, " fp64) output channels");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && stride[0] > 0 && stride[1] > 0 && padding[0] >= 0 &&
                  padding[1] >= 0,
              "aefast: conv_forward_direct needs two positive strides and two non-negative paddings");
  const int64_t HO = (x.size(2) + 2 * padding[0] - weight.size(2)) / stride[0] + 1;
  const int64_t WO = (x.size(3) + 2 * padding[1] - weight.size(3)) / stride[1] + 1;
  TORCH_CHECK(x.size(2) + 2 * padding[0] >= weight.size(2) && x.size(3) + 2 * padding[1] >= weight.size(3),
              "aefast: conv_forward_direct: the kernel is larger than the padded input");
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->to(x.scalar_type()) : at::Tensor();
  at::Tensor out = empty_cpu_cached({x.size(0), HO, WO, weight.size(0)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_forward_direct", [&] {
    const int64_t vl = 32 / static_cast<int64_t>(sizeof(scalar_t));
    switch ((weight.size(0) + vl - 1) / vl) {
      case 1: conv_forward<scalar_t, 1>(x, weight, b, stride[0], stride[1], padding[0], padding[1], HO, WO, out); break;
      case 2: conv_forward<scalar_t, 2>(x, weight, b, stride[0], stride[1], padding[0], padding[1], HO, WO, out); break;
      default: conv_forward<scalar_t, 4>(x, weight, b, stride[0], stride[1], padding[0], padding[1], HO, WO, out);
    }
  });
  return out.permute({0, 3, 1, 2});
}

}  // namespace aefast
