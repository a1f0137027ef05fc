// CPU kernels of the conv_pool family: the fused encoder block conv -> bias -> activation ->
// non-overlapping max-pool with argmax (its sparse backward is in conv_pool_backward.cpp), and the
// drop-in max_pool2d.
//
// Notation: x (N, Cin, H, W) input, w (Cout, Cin, KH, KW) weight, b bias, stride (SH, SW),
// padding (PH, PW), pool (PKH, PKW) with stride = pool and floor mode. K = Cin*KH*KW. Other pools
// (pool stride != pool, ceil_mode windows clipped at the edge) take conv_pool_general.cpp's path:
// every entry point below routes them there (aefast::pool_is_tiling, aefast/conv_pool.h).
//   z[n,co,r,c]  = b[co] + sum_{ci,ki,kj} w[co,ci,ki,kj] * x[n,ci, r*SH-PH+ki, c*SW-PW+kj]  (0 outside)
//   a            = act(z)
//   p[n,co,i,j]  = max over the window (i*PKH.., j*PKW..) of a; o = row-major offset of the
//                  first maximum (torch's rule: `val > max || isnan(val)` replaces it).
// Only conv rows < HU = HO*PKH and cols < WU = WO*PKW feed a window, so only those are computed.
// Layout everywhere inside: channels-last (the Cin values of a pixel contiguous), receptive
// fields and weight rows ordered k = (ki*KW + kj)*Cin + ci, so one kernel row of a receptive
// field is one contiguous run of KW*Cin values.
//
// Forward. A 3x3, stride-1 conv under a 2x2 pool with K >= 64 (not fp64): Winograd F(2x2, 3x3)
// strip by strip, its 2x2 output tiles being the pool windows (conv_pool_winograd.cpp).
// Other K >= 64 (and not fp64): oneDNN's conv (at::convolution, channels-last) and the fused
// epilogue over its output. K < 64: every strip of pooled rows is a GEMM colsT (positions, K) @
// w^T (K, Cout), by the register-blocked kernel in conv_pool_kernels.inc (at::mm called from inside
// at::parallel_for was measured 5x slower on the 2-core machines), followed in the same strip by
// the fused epilogue (bias + activation + pool + argmax) over the (positions, Cout) tile,
// vectorised over Cout. Nothing at conv resolution leaves the strip: the op writes the pooled
// map, the uint8 window offsets and z at the argmax (pooled size), which is all the backward needs.
//
// Backward: conv_pool_backward.cpp (the sparse GATHER form, about a quarter of the dense
// backward's multiply-adds).
//
// Instruction sets: the hot loops (conv_pool_kernels.inc) are built three times, AVX-512
// (512-bit vectors), AVX2+FMA and the baseline, and picked at run time (cpu_isa(): the best the
// CPU has, capped by AEFAST_CPU_ISA=baseline|avx2|avx512 so tests can run every variant); no
// -march=native is needed.
//
// Input loads: load_input_rows is the one place that reads input pixels (direct forward and
// backward_weight), so that a transform applied on load (e.g. corruption per element) wraps it.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <limits>
#include <vector>

#include "aefast/conv_algorithm.h"
#include "aefast/conv_pool.h"
#include "aefast/cpu_isa.h"
#include "aefast/corruption.h"
#include "aefast/cpu_buffer_cache.h"
#include "aefast/torch_utils.h"
#include "conv_pool_cpu.h"
#include "conv_pool_general.h"

namespace aefast {

// Host-side helpers shared with the backward (conv_pool_backward.cpp; declared in conv_pool_cpu.h).
namespace encoder_cpu {

// The pool of a call: pool_size windows, pool_stride apart (0: = pool_size), ceil_mode.
PoolWindows pool_windows(c10::IntArrayRef pool, c10::IntArrayRef pool_stride, bool ceil_mode) {
  TORCH_CHECK(pool.size() == 2 && pool_stride.size() == 2, "aefast::conv_pool2d: pool_size and pool_stride need two entries");
  TORCH_CHECK(pool_stride[0] >= 0 && pool_stride[1] >= 0, "aefast::conv_pool2d: pool_stride must be positive (0: pool_size)");
  return {pool[0], pool[1], resolve_pool_stride(pool_stride[0], pool[0]), resolve_pool_stride(pool_stride[1], pool[1]),
          ceil_mode};
}

// Whether the tiling kernels of this file serve the pool (else conv_pool_general.cpp does).
bool tiling_pool(const PoolWindows& p, int64_t H, int64_t W, int64_t KH, int64_t KW, c10::IntArrayRef stride,
                 c10::IntArrayRef padding) {
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && stride[0] > 0 && stride[1] > 0,
              "aefast::conv_pool2d: stride and padding need two entries, stride positive");
  if (H + 2 * padding[0] < KH || W + 2 * padding[1] < KW) return true;  // make_shape reports it
  const int64_t hc = (H + 2 * padding[0] - KH) / stride[0] + 1, wc = (W + 2 * padding[1] - KW) / stride[1] + 1;
  return pool_is_tiling(hc, wc, p.kh, p.kw, p.sh, p.sw, p.ceil_mode);
}

Shape make_shape(int64_t N, int64_t Cin, int64_t H, int64_t W, int64_t Cout, int64_t KH, int64_t KW,
                 c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef pool) {
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && pool.size() == 2,
              "aefast::conv_pool2d: stride, padding and pool_size need two entries each");
  TORCH_CHECK(stride[0] > 0 && stride[1] > 0 && padding[0] >= 0 && padding[1] >= 0 && pool[0] > 0 && pool[1] > 0,
              "aefast::conv_pool2d: stride and pool_size must be positive and padding non-negative");
  TORCH_CHECK(pool[0] * pool[1] <= 255, "aefast::conv_pool2d: a pool window may hold at most 255 elements");
  Shape s{N, Cin, H, W, Cout, KH, KW, stride[0], stride[1], padding[0], padding[1], pool[0], pool[1], 0, 0, 0, 0};
  s.HC = (H + 2 * s.PH - KH) / s.SH + 1;
  s.WC = (W + 2 * s.PW - KW) / s.SW + 1;
  TORCH_CHECK(H + 2 * s.PH >= KH && W + 2 * s.PW >= KW && s.HC >= s.PKH && s.WC >= s.PKW,
              "aefast::conv_pool2d: the conv output is empty or smaller than the pool window");
  s.HO = s.HC / s.PKH;
  s.WO = s.WC / s.PKW;
  return s;
}

InputCorruption parse_input_corruption(c10::string_view kind, double level, int64_t seed, double low, double high) {
  const int code = corruption_kind_code(std::string_view(kind.data(), kind.size()));
  TORCH_CHECK(code != -2, "aefast::conv_pool2d: unknown corruption '", std::string(kind.data(), kind.size()),
              "' (none, gaussian, masking, salt_pepper)");
  return InputCorruption{code, seed, level, low, high};
}

void check_activation(int64_t act) {
  TORCH_CHECK(act >= 0 && act < kNumActivations, "aefast::conv_pool2d: unknown activation code ", act);
}

void check_conv_args(const at::Tensor& input, const at::Tensor& weight) {
  TORCH_CHECK(input.dim() == 4 && weight.dim() == 4, "aefast::conv_pool2d: input and weight must be 4-D");
  TORCH_CHECK(input.size(1) == weight.size(1), "aefast::conv_pool2d: input has ", input.size(1),
              " channels but weight expects ", weight.size(1));
  TORCH_CHECK(input.scalar_type() == weight.scalar_type(), "aefast::conv_pool2d: input and weight dtypes differ");
}

// Whether t is channels-last and not also plainly contiguous (aefast/ops/conv_pool.py's
// _memory_format: the fake functions use the same test, so real and fake strides agree).
bool strides_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous();
}

// conv_pool_general.cpp's activation-sized results in the layout the rule above gives (its
// oneDNN backward answers by its own rule): a copy only where the two rules differ, on the
// general pool path only. The fake functions (aefast/ops/conv_pool.py) state this one rule.
at::Tensor in_layout(const at::Tensor& t, bool channels_last) {
  if (!t.defined()) return t;
  return t.contiguous(channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
}
std::tuple<at::Tensor, at::Tensor, at::Tensor> in_layout(std::tuple<at::Tensor, at::Tensor, at::Tensor> t,
                                                         bool channels_last) {
  return {in_layout(std::get<0>(t), channels_last), in_layout(std::get<1>(t), channels_last),
          in_layout(std::get<2>(t), channels_last)};
}

}  // namespace encoder_cpu

namespace {

using encoder_cpu::EpilogueFn;
using encoder_cpu::Gemm;
using encoder_cpu::InputCorruption;
using encoder_cpu::Shape;
using encoder_cpu::load_input_rows;
using encoder_cpu::noise_index;
using encoder_cpu::encoder_uses_winograd;
using encoder_cpu::encoder_cpu_uses_vendor_conv;
using encoder_cpu::conv_pool2d_forward_winograd;
using encoder_cpu::check_activation;
using encoder_cpu::check_conv_args;
using encoder_cpu::in_layout;
using encoder_cpu::make_shape;
using encoder_cpu::parse_input_corruption;
using encoder_cpu::pool_windows;
using encoder_cpu::strides_channels_last;
using encoder_cpu::tiling_pool;
using encoder_cpu::BwdGeom;  // for conv_pool_kernels.inc's backward loops (used in conv_pool_backward.cpp)




#define AEFAST_PER_ISA_KERNELS "conv_pool_kernels.inc"
#include "per_isa.inc"


// The kernels read the input channels-last: the Cin values of one pixel are contiguous, so one
// kernel row of a receptive field, x[n, y, x0:x0+KW, :], is one contiguous run of KW*Cin values.
// Patches and weight rows are ordered k = (ki*KW + kj)*Cin + ci to match.
//
// colsT[(r - r0)*WU + c][k] = x[n, ci, r*SH-PH+ki, c*SW-PW+kj] (0 outside), for the conv rows r in
// [r0, r1) and the conv cols c in [0, WU) of a strip. xl holds the image's rows from y_base on
// (the whole image, or just the rows a strip reads).
// (no-tree-loop-distribute-patterns: with small Cin the runs are a few values, for which a
// memset/memcpy call per run cost more than the copy: ~30% of the 1->32 forward.)
//
// Per (conv row, kernel row) the columns split into the interior, whose whole kernel row lies in
// the image (x0 = c*SW - PW in [0, W - KW]: one unclipped run), and the few clipped edge
// columns. The interior copies its runs with no bounds arithmetic, and with the run length a
// compile-time constant for the common first layers (KW*Cin = 3: 1 channel, 9: 3 channels), so
// the copy is a few moves per position (per position and kernel row, the clipping arithmetic
// and three fills cost several times the 3-value copy in the 1->32 forward).
template <int64_t RUN, typename scalar_t, typename acc_t>
inline void copy_runs(const scalar_t* __restrict src, int64_t src_step, int64_t count, int64_t run, acc_t* __restrict dst,
                      int64_t dst_step) {
  for (int64_t c = 0; c < count; ++c) {
    const scalar_t* __restrict sp = src + c * src_step;
    acc_t* __restrict dp = dst + c * dst_step;
    if constexpr (RUN > 0) {
#pragma GCC unroll 16
      for (int64_t e = 0; e < RUN; ++e) dp[e] = static_cast<acc_t>(sp[e]);
    } else {
      for (int64_t e = 0; e < run; ++e) dp[e] = static_cast<acc_t>(sp[e]);
    }
  }
}

template <typename scalar_t, typename acc_t>
__attribute__((optimize("no-tree-loop-distribute-patterns"))) void im2col_strip(const scalar_t* xl, int64_t y_base, const Shape& s, int64_t r0, int64_t r1, acc_t* colsT) {
  const int64_t K = s.K(), WU = s.WU(), run = s.KW * s.Cin;
  // Interior columns [c_lo, c_hi): c*SW >= PW and c*SW - PW + KW <= W.
  const int64_t c_lo = std::min<int64_t>(WU, (s.PW + s.SW - 1) / s.SW);
  const int64_t last = s.W - s.KW + s.PW;  // the largest c*SW of an interior column
  const int64_t c_hi = last < 0 ? c_lo : std::clamp<int64_t>(last / s.SW + 1, c_lo, WU);
  // One clipped column c of kernel row ki (input row y inside the image).
  auto edge = [&](const scalar_t* src_row, acc_t* dst, int64_t c) {
    const int64_t x0 = c * s.SW - s.PW;
    const int64_t kj0 = std::max<int64_t>(0, -x0), kj1 = std::min<int64_t>(s.KW, s.W - x0);
    if (kj1 <= kj0) {
      std::fill(dst, dst + run, acc_t(0));
      return;
    }
    std::fill(dst, dst + kj0 * s.Cin, acc_t(0));
    const scalar_t* src = src_row + (x0 + kj0) * s.Cin;
    const int64_t len = (kj1 - kj0) * s.Cin;
    for (int64_t e = 0; e < len; ++e) dst[kj0 * s.Cin + e] = static_cast<acc_t>(src[e]);
    std::fill(dst + kj1 * s.Cin, dst + run, acc_t(0));
  };
  for (int64_t r = r0; r < r1; ++r) {
    acc_t* rows = colsT + (r - r0) * WU * K;
    for (int64_t ki = 0; ki < s.KH; ++ki) {
      acc_t* dst = rows + ki * run;  // column c's run starts at dst + c*K
      const int64_t y = r * s.SH - s.PH + ki;
      if (y < 0 || y >= s.H) {
        for (int64_t c = 0; c < WU; ++c) std::fill(dst + c * K, dst + c * K + run, acc_t(0));
        continue;
      }
      const scalar_t* src_row = xl + (y - y_base) * s.W * s.Cin;
      for (int64_t c = 0; c < c_lo; ++c) edge(src_row, dst + c * K, c);
      const scalar_t* src = src_row + (c_lo * s.SW - s.PW) * s.Cin;
      const int64_t count = c_hi - c_lo, step = s.SW * s.Cin;
      if (run == 3)
        copy_runs<3>(src, step, count, run, dst + c_lo * K, K);
      else if (run == 9)
        copy_runs<9>(src, step, count, run, dst + c_lo * K, K);
      else
        copy_runs<0>(src, step, count, run, dst + c_lo * K, K);
      for (int64_t c = c_hi; c < WU; ++c) edge(src_row, dst + c * K, c);
    }
  }
}

typedef float f32x8 __attribute__((vector_size(32)));
typedef double f64x4 __attribute__((vector_size(32)));
typedef float f32x16 __attribute__((vector_size(64)));
typedef double f64x8 __attribute__((vector_size(64)));

template <typename T>
Gemm<T> pick_gemm(Isa isa) {
  if constexpr (std::is_same_v<T, float>) {
    switch (isa) {
      case Isa::kAvx512: return {&avx512::gemm_strip<float, f32x16>, 32};
      case Isa::kAvx2: return {&avx2::gemm_strip<float, f32x8>, 16};
      default: return {&generic::gemm_strip<float, f32x8>, 16};
    }
  } else {
    switch (isa) {
      case Isa::kAvx512: return {&avx512::gemm_strip<double, f64x8>, 16};
      case Isa::kAvx2: return {&avx2::gemm_strip<double, f64x4>, 8};
      default: return {&generic::gemm_strip<double, f64x4>, 8};
    }
  }
}


template <typename scalar_t, typename acc_t, int ACT>
EpilogueFn<scalar_t, acc_t> pick_isa(Isa isa, bool loops) {
  switch (isa) {
    case Isa::kAvx512:
      return loops ? &avx512::epilogue_strip_loops<ACT, scalar_t, acc_t> : &avx512::epilogue_strip<ACT, scalar_t, acc_t>;
    case Isa::kAvx2:
      return loops ? &avx2::epilogue_strip_loops<ACT, scalar_t, acc_t> : &avx2::epilogue_strip<ACT, scalar_t, acc_t>;
    default:
      return loops ? &generic::epilogue_strip_loops<ACT, scalar_t, acc_t> : &generic::epilogue_strip<ACT, scalar_t, acc_t>;
  }
}

template <typename scalar_t, typename acc_t>
EpilogueFn<scalar_t, acc_t> pick_epilogue(int64_t act, Isa isa) {
  // AEFAST_ENCODER_EPILOGUE=loops (read per call) forces the per-element-buffer form everywhere
  // (epilogue_strip_loops), for A/B timing against the register form.
  const char* env = std::getenv("AEFAST_ENCODER_EPILOGUE");
  const bool loops = env != nullptr && std::string(env) == "loops";
  return with_activation(act, [&](auto a) { return pick_isa<scalar_t, acc_t, decltype(a)::value>(isa, loops); });
}



// The conv by ATen (oneDNN underneath), then the same fused epilogue over its output.
//
// On the 2-core machines oneDNN's convolution runs at 80-185 GFLOP/s where the register-blocked
// GEMM above does not keep up, so for the types oneDNN covers (fp32, and fp16/bf16 computed in
// fp32) the conv itself is left to at::convolution, without bias: z - b = conv(x, w). It is asked
// for a channels-last output (input and weight passed channels-last), so that the pooled rows of
// one image form a (positions, Cout) tile with WC positions per conv row: exactly what
// epilogue_strip reads with ldr = WC. The epilogue then adds the bias, rounds z and act(z) to
// scalar_t as before, pools, and writes only the pooled map, the uint8 window offsets and z at
// the argmax, so the outputs mean exactly what the direct path's do. The full-resolution conv
// output is a temporary freed on return: nothing at conv resolution is saved for backward.
// Half types are widened to fp32 for the conv (accumulate in fp32, as the direct path does).
//
// With a corruption, the conv cannot read the clean input: the corrupted operand is built in
// batch chunks of at most N/4 images (and about kNoiseChunkBytes with the chunk's conv output),
// each convolved and pooled before the next is built, so no input-sized buffer exists.
constexpr int64_t kNoiseChunkBytes = 8 << 20;
// Conv output per oneDNN call on the clean-input path: a few MiB stays in L2/L3 for the epilogue.
constexpr int64_t kConvChunkBytes = 4 << 20;

void conv_pool2d_forward_aten(const at::Tensor& input, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias_opt, const Shape& s, int64_t activation,
                              double negative_slope, const InputCorruption& noise, at::Tensor& pooled,
                              at::Tensor& window, at::Tensor& preact) {
  // The conv is a step of this kernel, not an op autograd should see.
  at::AutoDispatchBelowADInplaceOrView guard;
  const Isa isa = cpu_isa();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "conv_pool2d_forward_aten", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    // Channels-last operands in the accumulation type. A tensor that already has channels-last
    // strides is used as is; otherwise one copy (which also widens half types). The copy goes
    // through at::empty(ChannelsLast) so that a 1-channel input gets the strides that make
    // oneDNN pick the channels-last output too.
    auto to_cl = [&](const at::Tensor& t) {
      if (t.scalar_type() == acc_dtype && t.size(1) > 1 && t.is_contiguous(at::MemoryFormat::ChannelsLast)) return t;
      return empty_cpu_cached(t.sizes(), t.options().dtype(acc_dtype), at::MemoryFormat::ChannelsLast).copy_(t);
    };
    const at::Tensor weight_cl = to_cl(weight);
    at::Tensor bias_acc = bias_opt.has_value() && bias_opt->defined()
                              ? bias_opt->to(acc_dtype).contiguous()
                              : at::zeros({s.Cout}, input.options().dtype(acc_dtype));
    const acc_t* bias_ptr = bias_acc.const_data_ptr<acc_t>();
    scalar_t* pooled_p = pooled.mutable_data_ptr<scalar_t>();
    uint8_t* window_p = window.mutable_data_ptr<uint8_t>();
    scalar_t* preact_p = preact.mutable_data_ptr<scalar_t>();
    const auto epilogue = pick_epilogue<scalar_t, acc_t>(activation, isa);
    const acc_t slope = static_cast<acc_t>(negative_slope);
    const int64_t img = s.HC * s.WC * s.Cout, prow = s.PKH * s.WC * s.Cout;
    // conv + epilogue of the images [n0, n0 + count), whose channels-last operand is x_cl.
    auto conv_pool_images = [&](const at::Tensor& x_cl, int64_t n0, int64_t count) {
      at::Tensor conv = at::convolution(x_cl, weight_cl, /*bias=*/{}, {s.SH, s.SW}, {s.PH, s.PW},
                                        /*dilation=*/{1, 1}, /*transposed=*/false, /*output_padding=*/{0, 0},
                                        /*groups=*/1);
      TORCH_CHECK(conv.size(2) == s.HC && conv.size(3) == s.WC, "aefast::conv_pool2d: unexpected conv output shape");
      if (!conv.is_contiguous(at::MemoryFormat::ChannelsLast) || conv.stride(1) != 1)
        conv = conv.contiguous(at::MemoryFormat::ChannelsLast);
      const acc_t* conv_p = conv.const_data_ptr<acc_t>();
      // One task per (image, pooled row): each reads PKH conv rows once, in order.
      at::parallel_for(0, count * s.HO, std::max<int64_t>(1, 16384 / std::max<int64_t>(prow, 1)),
                       [&](int64_t begin, int64_t end) {
        std::vector<acc_t> best(s.Cout), bestz(s.Cout);
        std::vector<int32_t> bestk(s.Cout);
        for (int64_t task = begin; task < end; ++task) {
          const int64_t i = task / s.HO, pr = task % s.HO;
          epilogue(conv_p + i * img + pr * prow, s.WC, bias_ptr, s, n0 + i, pr, pr + 1, slope, pooled_p, window_p,
                   preact_p, best.data(), bestz.data(), bestk.data());
        }
      });
    };
    if (!noise.active()) {
      // Batch chunks whose conv output (~kConvChunkBytes) stays in cache between oneDNN's write
      // and the epilogue's read, and is one reused block instead of an N-image temporary.
      const at::Tensor x_cl = to_cl(input);
      const int64_t chunk = std::max<int64_t>(1, kConvChunkBytes / std::max<int64_t>(img * sizeof(acc_t), 1));
      for (int64_t n0 = 0; n0 < s.N; n0 += chunk)
        conv_pool_images(x_cl.narrow(0, n0, std::min(chunk, s.N - n0)), n0, std::min(chunk, s.N - n0));
      return;
    }
    const auto corrupt_at = noise.at_element<scalar_t, acc_t>();
    const int64_t per_image = (s.Cin * s.H * s.W + img) * static_cast<int64_t>(sizeof(acc_t));
    const int64_t chunk = std::clamp<int64_t>(kNoiseChunkBytes / std::max<int64_t>(per_image, 1), 1,
                                              std::max<int64_t>(1, s.N / 4));
    at::Tensor xc = empty_cpu_cached({chunk, s.Cin, s.H, s.W}, input.options().dtype(acc_dtype),
                                     at::MemoryFormat::ChannelsLast);
    const scalar_t* xp = input.const_data_ptr<scalar_t>();
    const int64_t xsN = input.stride(0), xsC = input.stride(1), xsH = input.stride(2), xsW = input.stride(3);
    for (int64_t n0 = 0; n0 < s.N; n0 += chunk) {
      const int64_t count = std::min(chunk, s.N - n0);
      acc_t* dst = xc.mutable_data_ptr<acc_t>();  // (count, H, W, Cin): channels-last
      at::parallel_for(0, count * s.H, 16, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t i = r / s.H, y = r % s.H, n = n0 + i;
          acc_t* d = dst + r * s.W * s.Cin;
          for (int64_t ci = 0; ci < s.Cin; ++ci) {
            const scalar_t* src = xp + n * xsN + ci * xsC + y * xsH;
            const uint64_t base = noise_index(s, n, ci, y, 0);
            for (int64_t x = 0; x < s.W; ++x)
              d[x * s.Cin + ci] = static_cast<acc_t>(corrupt_at(src[x * xsW], base + static_cast<uint64_t>(x)));
          }
        }
      });
      conv_pool_images(xc.narrow(0, 0, count), n0, count);
    }
  });
}


// The layout of the forward's outputs: channels-last where eager's conv2d gives a channels-last
// output (the input or the weight is channels-last, ATen's rule for oneDNN), so that a
// channels-last model stays channels-last through the fused block with no NCHW round trip.
// The input gradient follows the pooled gradient, the input or the weight the same way.
bool outputs_channels_last(const at::Tensor& input, const at::Tensor& weight) {
  return strides_channels_last(input) || strides_channels_last(weight);
}


std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_pool2d_forward_cpu(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias_opt,
    c10::IntArrayRef stride, c10::IntArrayRef padding, int64_t activation, double negative_slope,
    c10::IntArrayRef pool_size, c10::string_view corruption, double corruption_level, int64_t seed, double low,
    double high, c10::IntArrayRef pool_stride, bool ceil_mode) {
  check_same_device("conv_pool2d_forward", {&input, &weight}, bias_opt);
  check_conv_args(input, weight);
  check_activation(activation);
  const InputCorruption noise = parse_input_corruption(corruption, corruption_level, seed, low, high);
  const PoolWindows pool = pool_windows(pool_size, pool_stride, ceil_mode);
  if (!tiling_pool(pool, input.size(2), input.size(3), weight.size(2), weight.size(3), stride, padding)) {
    TORCH_CHECK(!noise.active(), "aefast::conv_pool2d_forward: corruption in the load needs pool_stride = pool_size "
                "without clipped ceil_mode windows; corrupt the input first (aefast.functional does)");
    auto out = conv_pool2d_forward_general(input, weight, bias_opt, stride, padding, activation, negative_slope, pool);
    return in_layout(std::move(out), outputs_channels_last(input, weight));
  }
  // Activation-sized outputs through the buffer cache (aefast/cpu_buffer_cache.h), channels-last
  // where eager's conv output would be (the epilogue writes either layout directly).
  Shape s = make_shape(input.size(0), input.size(1), input.size(2), input.size(3), weight.size(0),
                       weight.size(2), weight.size(3), stride, padding, pool_size);
  s.out_cl = outputs_channels_last(input, weight);
  // AEFAST_ENCODER_STORES=scalar (read per call): the epilogue's NCHW stores element by element,
  // as before the transposed stores, for A/B timing only.
  if (const char* env = std::getenv("AEFAST_ENCODER_STORES"); env != nullptr && *env != '\0') {
    TORCH_CHECK(std::string(env) == "scalar" || std::string(env) == "transposed",
                "AEFAST_ENCODER_STORES must be 'scalar' or 'transposed', got '", env, "'");
    s.scalar_stores = std::string(env) == "scalar";
  }
  const auto fmt = s.out_cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor pooled = empty_cpu_cached({s.N, s.Cout, s.HO, s.WO}, input.options(), fmt);
  at::Tensor window = empty_cpu_cached({s.N, s.Cout, s.HO, s.WO}, input.options().dtype(at::kByte), fmt);
  at::Tensor preact = empty_cpu_cached({s.N, s.Cout, s.HO, s.WO}, input.options(), fmt);
  if (s.N == 0 || s.Cout == 0) return {pooled, window, preact};
  // oneDNN's conv + the fused epilogue (see above) for fp32 and the half types when the reduction
  // is long enough (encoder_uses_vendor_conv, aefast/conv_algorithm.h: K = Cin*KH*KW >= 64) for the conv's FLOPs to outweigh the epilogue's pass over
  // the full-resolution output. Measured on the 2-core machines, same process, interleaved:
  // 32->64 3x3 (K = 288) 2.3x faster than the direct path; 1->32 and 3->32 3x3 (K = 9, 27) 0.82x
  // and 0.85x, so short reductions keep the direct path, whose conv tile never leaves the cache.
  // fp64, which oneDNN does not cover (ATen would use its slow reference conv), also keeps it.
  // A corrupted input takes that path in chunks of at most N/4 images, so only from N = 4 on.
  // The path taken is named in the profiler (RECORD_USER_SCOPE "aefast path: ..."), so that a
  // profile, and bench/bench_kernel_ledger.py, can tell which one the rule took.
  if (encoder_uses_winograd(s, input.scalar_type())) {
    RECORD_USER_SCOPE("aefast path: conv_pool2d_forward winograd");
    conv_pool2d_forward_winograd(input, weight, bias_opt, s, activation, negative_slope, noise, pooled, window,
                                 preact);
    return {pooled, window, preact};
  }
  if (input.scalar_type() != at::kDouble && encoder_cpu_uses_vendor_conv(s.K()) && (!noise.active() || s.N >= 4)) {
    RECORD_USER_SCOPE("aefast path: conv_pool2d_forward onednn");
    conv_pool2d_forward_aten(input, weight, bias_opt, s, activation, negative_slope, noise, pooled, window, preact);
    return {pooled, window, preact};
  }
  // The direct path: each strip's input rows are loaded channels-last (load_input_rows) into a
  // cache-sized buffer inside the parallel loop, not by a whole-tensor channels-last copy.
  RECORD_USER_SCOPE("aefast path: conv_pool2d_forward direct");
  const Isa isa = cpu_isa();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "conv_pool2d_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    const int64_t K = s.K();
    at::Tensor bias_acc = bias_opt.has_value() && bias_opt->defined()
                              ? bias_opt->to(acc_dtype).contiguous()
                              : at::zeros({s.Cout}, input.options().dtype(acc_dtype));
    const acc_t* bias_ptr = bias_acc.const_data_ptr<acc_t>();
    // B = w^T (K, Cout) and its packed copy (Cout / NR, K, NR) for the register-blocked GEMM.
    const auto gemm = pick_gemm<acc_t>(isa);
    const int64_t NR = gemm.nr;
    // w (Cout, Cin, KH, KW) -> B (K, Cout), k = (ki*KW + kj)*Cin + ci, in ONE copy.
    const at::Tensor B = weight.permute({2, 3, 1, 0}).to(acc_dtype).contiguous().view({K, s.Cout});
    const int64_t nb = s.Cout / NR;
    const at::Tensor Bp = B.narrow(1, 0, nb * NR).reshape({K, nb, NR}).permute({1, 0, 2}).contiguous();
    const acc_t* B_p = B.const_data_ptr<acc_t>();
    const acc_t* Bp_p = Bp.const_data_ptr<acc_t>();
    // One task per (image, strip of pooled rows), each strip's patches and conv tile sized for
    // L2; the GEMM is our own (calling BLAS from inside at::parallel_for was measured 5x slower).
    const int64_t per_row = s.PKH * s.WU() * (K + s.Cout) * static_cast<int64_t>(sizeof(acc_t));
    const int64_t rows = std::clamp<int64_t>((256 << 10) / std::max<int64_t>(per_row, 1), 1, s.HO);
    const int64_t strips = (s.HO + rows - 1) / rows;
    const int64_t max_pos = rows * s.PKH * s.WU();
    const scalar_t* xp = input.const_data_ptr<scalar_t>();
    const int64_t xstr[4] = {input.stride(0), input.stride(1), input.stride(2), input.stride(3)};
    // Input rows one strip reads: conv rows [r0, r0 + rows*PKH) need y in [r0*SH - PH, .. + KH).
    const int64_t max_in_rows = std::min<int64_t>(s.H, (rows * s.PKH - 1) * s.SH + s.KH);
    scalar_t* pooled_p = pooled.mutable_data_ptr<scalar_t>();
    uint8_t* window_p = window.mutable_data_ptr<uint8_t>();
    scalar_t* preact_p = preact.mutable_data_ptr<scalar_t>();
    const auto epilogue = pick_epilogue<scalar_t, acc_t>(activation, isa);
    const acc_t slope = static_cast<acc_t>(negative_slope);
    const auto corrupt_at = noise.at_element<scalar_t, acc_t>();
    at::parallel_for(0, s.N * strips, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> cols(max_pos * K), tile(max_pos * s.Cout), best(s.Cout), bestz(s.Cout);
      std::vector<int32_t> bestk(s.Cout);
      std::vector<scalar_t> xs(max_in_rows * s.W * s.Cin);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t n = task / strips, pr0 = (task % strips) * rows;
        const int64_t pr1 = std::min(pr0 + rows, s.HO);
        const int64_t npos = (pr1 - pr0) * s.PKH * s.WU();
        const int64_t y0 = std::max<int64_t>(0, pr0 * s.PKH * s.SH - s.PH);
        const int64_t y1 = std::min<int64_t>(s.H, (pr1 * s.PKH - 1) * s.SH - s.PH + s.KH);
        load_input_rows<scalar_t, scalar_t>(xp, xstr, s, n, y0, y1, xs.data(), s.W * s.Cin, corrupt_at);
        im2col_strip<scalar_t, acc_t>(xs.data(), y0, s, pr0 * s.PKH, pr1 * s.PKH, cols.data());
        gemm.fn(cols.data(), npos, K, Bp_p, B_p, s.Cout, tile.data());
        epilogue(tile.data(), s.WU(), bias_ptr, s, n, pr0, pr1, slope, pooled_p, window_p, preact_p, best.data(),
                 bestz.data(), bestk.data());
      }
    });
  });
  return {pooled, window, preact};
}

// ---------------------------------------------------------------- drop-in max_pool2d
//
// out[n,c,oh,ow] = max over the window {(oh*SH - PH + i*DH, ow*SW - PW + j*DW)} ∩ input of x,
// scanned row-major with torch's rule (`val > max || isnan(val)`), starting from the window's
// first in-bounds element with max = -inf (so an all -inf window reports that element).
// Backward: grad_x[n,c,idx] += grad_out[n,c,oh,ow] (windows may overlap, so it accumulates).
// Both run over any strides, so channels_last input gives channels_last output, as in torch.

int64_t pool_out_size(int64_t size, int64_t k, int64_t s, int64_t p, int64_t d, bool ceil_mode) {
  const int64_t span = d * (k - 1) + 1;
  const int64_t num = size + 2 * p - span + (ceil_mode ? s - 1 : 0);
  int64_t out = (num >= 0 ? num / s : -((-num + s - 1) / s)) + 1;
  if (ceil_mode && (out - 1) * s >= size + p) --out;
  return out;
}

std::tuple<at::Tensor, at::Tensor> max_pool2d_forward_cpu(const at::Tensor& input, c10::IntArrayRef kernel,
                                                          c10::IntArrayRef stride, c10::IntArrayRef padding,
                                                          c10::IntArrayRef dilation, bool ceil_mode) {
  check_same_device("max_pool2d_forward", {&input});
  TORCH_CHECK(input.dim() == 4, "aefast::max_pool2d_forward: input must be 4-D");
  TORCH_CHECK(kernel.size() == 2 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "aefast::max_pool2d_forward: geometry arguments need two entries each");
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const int64_t KH = kernel[0], KW = kernel[1], SH = stride[0], SW = stride[1];
  const int64_t PH = padding[0], PW = padding[1], DH = dilation[0], DW = dilation[1];
  TORCH_CHECK(KH > 0 && KW > 0 && SH > 0 && SW > 0 && DH > 0 && DW > 0 && PH >= 0 && PW >= 0 && PH <= KH / 2 &&
                  PW <= KW / 2,
              "aefast::max_pool2d_forward: invalid pooling geometry");
  const int64_t OH = pool_out_size(H, KH, SH, PH, DH, ceil_mode), OW = pool_out_size(W, KW, SW, PW, DW, ceil_mode);
  TORCH_CHECK(OH > 0 && OW > 0, "aefast::max_pool2d_forward: output would be empty");
  const auto fmt = input.suggest_memory_format();
  at::Tensor out = empty_cpu_cached({N, C, OH, OW}, input.options(), fmt);
  at::Tensor idx = empty_cpu_cached({N, C, OH, OW}, input.options().dtype(at::kLong), fmt);
  if (out.numel() == 0) return {out, idx};
  const int64_t xs[4] = {input.stride(0), input.stride(1), input.stride(2), input.stride(3)};
  const int64_t os[4] = {out.stride(0), out.stride(1), out.stride(2), out.stride(3)};
  AT_DISPATCH_ALL_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "max_pool2d_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = input.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    int64_t* ip = idx.mutable_data_ptr<int64_t>();
    constexpr acc_t lowest = std::numeric_limits<acc_t>::has_infinity ? -std::numeric_limits<acc_t>::infinity()
                                                                        : std::numeric_limits<acc_t>::lowest();
    at::parallel_for(0, N * C, std::max<int64_t>(1, 4096 / (OH * OW)), [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t n = p / C, c = p % C;
        const scalar_t* plane = xp + n * xs[0] + c * xs[1];
        for (int64_t oh = 0; oh < OH; ++oh) {
          int64_t h0 = oh * SH - PH;
          const int64_t h1 = std::min(h0 + (KH - 1) * DH + 1, H);
          while (h0 < 0) h0 += DH;
          for (int64_t ow = 0; ow < OW; ++ow) {
            int64_t w0 = ow * SW - PW;
            const int64_t w1 = std::min(w0 + (KW - 1) * DW + 1, W);
            while (w0 < 0) w0 += DW;
            int64_t best_i = h0 * W + w0;
            acc_t best = lowest;
            for (int64_t h = h0; h < h1; h += DH)
              for (int64_t w = w0; w < w1; w += DW) {
                const acc_t v = static_cast<acc_t>(plane[h * xs[2] + w * xs[3]]);
                if (pool_takes(v, best)) {
                  best = v;
                  best_i = h * W + w;
                }
              }
            const int64_t o = n * os[0] + c * os[1] + oh * os[2] + ow * os[3];
            op[o] = static_cast<scalar_t>(best);
            ip[o] = best_i;
          }
        }
      }
    });
  });
  return {out, idx};
}

at::Tensor max_pool2d_backward_cpu(const at::Tensor& grad_output, const at::Tensor& indices, const at::Tensor& input) {
  check_same_device("max_pool2d_backward", {&grad_output, &indices, &input});
  TORCH_CHECK(grad_output.dim() == 4 && indices.sizes() == grad_output.sizes() && input.dim() == 4,
              "aefast::max_pool2d_backward: grad_output and indices must share one 4-D shape");
  TORCH_CHECK(indices.scalar_type() == at::kLong, "aefast::max_pool2d_backward: indices must be int64");
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const int64_t OH = grad_output.size(2), OW = grad_output.size(3);
  at::Tensor grad_input = empty_cpu_cached(input.sizes(), grad_output.options(), input.suggest_memory_format());
  if (grad_input.numel() == 0) return grad_input;
  const int64_t gs[4] = {grad_output.stride(0), grad_output.stride(1), grad_output.stride(2), grad_output.stride(3)};
  const int64_t is[4] = {indices.stride(0), indices.stride(1), indices.stride(2), indices.stride(3)};
  const int64_t xs[4] = {grad_input.stride(0), grad_input.stride(1), grad_input.stride(2), grad_input.stride(3)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(), "max_pool2d_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = grad_output.const_data_ptr<scalar_t>();
    const int64_t* ip = indices.const_data_ptr<int64_t>();
    scalar_t* xp = grad_input.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N * C, std::max<int64_t>(1, 4096 / (H * W)), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(H * W);
      for (int64_t p = begin; p < end; ++p) {
        const int64_t n = p / C, c = p % C;
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t oh = 0; oh < OH; ++oh)
          for (int64_t ow = 0; ow < OW; ++ow) {
            const int64_t k = ip[n * is[0] + c * is[1] + oh * is[2] + ow * is[3]];
            TORCH_CHECK(k >= 0 && k < H * W, "aefast::max_pool2d_backward: index ", k, " out of range");
            acc[k] += static_cast<acc_t>(gp[n * gs[0] + c * gs[1] + oh * gs[2] + ow * gs[3]]);
          }
        scalar_t* dst = xp + n * xs[0] + c * xs[1];
        for (int64_t h = 0; h < H; ++h)
          for (int64_t w = 0; w < W; ++w) dst[h * xs[2] + w * xs[3]] = static_cast<scalar_t>(acc[h * W + w]);
      }
    });
  });
  return grad_input;
}

}  // namespace

// The GEMM and epilogue above, for conv_pool_winograd.cpp (declared in conv_pool_cpu.h).
namespace encoder_cpu {
template <typename T>
Gemm<T> pick_gemm(Isa isa) {
  return aefast::pick_gemm<T>(isa);
}
template <typename scalar_t, typename acc_t>
EpilogueFn<scalar_t, acc_t> pick_epilogue(int64_t act, Isa isa) {
  return aefast::pick_epilogue<scalar_t, acc_t>(act, isa);
}
template Gemm<float> pick_gemm<float>(Isa);
template Gemm<double> pick_gemm<double>(Isa);
template EpilogueFn<float, float> pick_epilogue<float, float>(int64_t, Isa);
template EpilogueFn<double, double> pick_epilogue<double, double>(int64_t, Isa);
template EpilogueFn<at::Half, float> pick_epilogue<at::Half, float>(int64_t, Isa);
template EpilogueFn<at::BFloat16, float> pick_epilogue<at::BFloat16, float>(int64_t, Isa);
}  // namespace encoder_cpu

TORCH_LIBRARY_IMPL(aefast, CPU, m) {
  m.impl("conv_pool2d_forward", &conv_pool2d_forward_cpu);
  m.impl("max_pool2d_forward", &max_pool2d_forward_cpu);
  m.impl("max_pool2d_backward", &max_pool2d_backward_cpu);
}

}  // namespace aefast
