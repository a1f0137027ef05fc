// CPU kernels of the conv_pool family, backward: the encoder block's sparse backward
// (conv_pool2d_backward_input / _weight / the fused conv_pool2d_backward). The forward, the
// notation and the drop-in max_pool2d are in conv_pool.cpp; the hot loops of both in
// conv_pool_kernels.inc (compiled per ISA through per_isa.inc in each file); the host-side
// helpers they share (shape, pool, layout and argument checks) in conv_pool_cpu.h.
//
// Backward (sparse, GATHER form; derivation below). Per image: gz = grad * act'(z at the argmax),
// once for both gradients (the fused op conv_pool2d_backward serves autograd when both are
// needed). Every gradient is then a weighted sum of rows of length Kp (K rounded up to 64 bytes)
// with the Kp-long accumulator in vector registers while the rows stream through (wsum): wgrad
// sums, per output channel, the input patches at its argmax positions; dgrad sums, per conv
// position, the weight rows of the channels routed there (bucketed per pooled row) and adds that
// receptive-field gradient onto the padded input gradient once per position; or, where
// dgrad_uses_decoder_forward says so, dgrad is the decoder's forward (unpool_deconv.cpp's kernels)
// applied to gz, the window offsets and w. About a quarter of the dense backward's multiply-adds,
// no im2col of the whole image, no stores in the inner loop. Weight partials per fixed chunk of
// images, summed in chunk order: results do not depend on the thread count. Pools other than the
// tiling ones (and AEFAST_ENCODER_BACKWARD=vendor) take conv_pool_general.cpp's backward.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include "aefast/conv_algorithm.h"
#include "aefast/conv_pool.h"
#include "aefast/corruption.h"
#include "aefast/cpu_buffer_cache.h"
#include "aefast/cpu_isa.h"
#include "aefast/torch_utils.h"
#include "conv_pool_cpu.h"
#include "conv_pool_general.h"
#include "unpool_deconv_cpu.h"

namespace aefast {
namespace {

using encoder_cpu::BwdGeom;
using encoder_cpu::InputCorruption;
using encoder_cpu::Shape;
using encoder_cpu::check_activation;
using encoder_cpu::check_conv_args;
using encoder_cpu::in_layout;
using encoder_cpu::load_input_rows;
using encoder_cpu::make_shape;
using encoder_cpu::noise_index;
using encoder_cpu::parse_input_corruption;
using encoder_cpu::pool_windows;
using encoder_cpu::strides_channels_last;
using encoder_cpu::tiling_pool;

#define AEFAST_PER_ISA_KERNELS "conv_pool_kernels.inc"
#include "per_isa.inc"

// Whether a tiling pool's backward takes the vendor route of the general pool
// (conv_pool2d_backward_general: gz scattered into a channels-last dL/dz, then oneDNN's
// convolution_backward) instead of this file's sparse kernels. By default it does not: the sparse
// backward was measured faster for the channels-last narrow blocks where the vendor route was
// the candidate (the raw backward op on the FCN-8s shapes bench/bench_encoder_blocks.py finds,
// channels-last, N16, 1 thread, CPU time, interleaved, loaded machine: directions; that script's
// --env AEFAST_ENCODER_BACKWARD=vendor repeats it in context): sparse / vendor / eager backward,
// ms: 8->8 96x96 5.0 / 5.4 / 5.9, 16->16 48x48 2.3 / 2.5 / 2.6, 16->16 24x24 0.59 / 0.59 / 0.71,
// 32->32 12x12 0.41 / 0.50 / 0.55. AEFAST_ENCODER_BACKWARD=sparse|vendor (read per call) forces
// one route, for tests and A/B timing. Corruption in the load and empty tensors have only the
// sparse route (the general path takes no corruption).
bool backward_uses_vendor(int64_t n, int64_t c_in, int64_t c_out, const InputCorruption& noise) {
  if (noise.active() || n == 0 || c_in == 0 || c_out == 0) return false;
  if (const char* env = std::getenv("AEFAST_ENCODER_BACKWARD"); env != nullptr && *env != '\0') {
    const std::string v(env);
    TORCH_CHECK(v == "sparse" || v == "vendor", "AEFAST_ENCODER_BACKWARD must be 'sparse' or 'vendor', got '", v, "'");
    return v == "vendor";
  }
  return false;
}

// ---------------------------------------------------------------- sparse backward
//
// The conv output's gradient at the argmax of pooled element j = (n, co, i, j'):
//   gz[j] = grad_pooled[j] * act'(z[j]),   and 0 at every other conv position,
// computed ONCE per image for both gradients. With (h, w) the conv position of that argmax
// (h < HU = HO*PKH, w < WU = WO*PKW) and p = h*WU + w:
//   grad_b[co]                 = sum_{n,i,j'} gz
//   grad_w[co, k]              = sum_{n, entries j of co} gz[j] * patch_n[p_j, k]
//   dcol_n[p, k]               = sum_{entries j at position p} gz[j] * w[co_j, k]
//   grad_x                     = col2im(dcol)
// with k = (ki*KW + kj)*Cin + ci, patch_n[p, k] = xpad_n[h*SH + ki, w*SW + kj, ci] (xpad the
// zero-padded channels-last image) and col2im adding dcol[p, ki*KW*Cin : (ki+1)*KW*Cin) onto
// the run gxpad[h*SH + ki, w*SW : w*SW + KW, :]. Only the nonzero gz enter (about a quarter of
// the dense backward's multiply-adds: one conv position in PKH*PKW per channel, fewer where
// relu zeroes gz).
//
// Both sums are weighted sums of rows of length Kp = K rounded up to 64 bytes (zero padding),
// done by wsum (conv_pool_kernels.inc) with the Kp-long accumulator chunk in vector registers
// while the rows stream through, so nothing is stored inside the loop:
//   wgrad (GATHER over the channel's entries): the rows are the patches at its argmax positions;
//          patches of a strip of pooled rows are built once (cache-sized) and shared by all co.
//   dgrad (GATHER over the position's entries): per image the nonzero entries are bucketed by
//          conv position (CSR, in co order), and each position's dcol row is summed from the
//          weight rows of its entries (W is (Cout, Kp), L1/L2-resident), then added into the
//          padded gradient image once per position (KH runs of KW*Cin), not once per entry.
//          Or (dgrad_uses_decoder_forward) grad_x = conv_transpose2d(max_unpool2d(gz), w), which
//          is the decoder block's forward: its kernels (dgrad_by_decoder_forward) run on gz.
// Small Cin (1, 3: K = 9, 27) vectorises over k the same way: K pads to 16 or 32 floats.
//
// Determinism: each image is done by one thread in a fixed order; weight/bias partials live per
// fixed chunk of images (the chunking depends on N only) and are summed in chunk order, so the
// result is bitwise independent of the thread count.
template <typename T>
struct BwdKernels {
  void (*wgrad)(const BwdGeom&, const T*, const T*, const uint8_t*, T*, int32_t*, T*, T*, T*);
  void (*dgrad)(const BwdGeom&, const T*, const uint8_t*, const T*, int32_t*, int32_t*, T*, T*, T*);
  // The weight gradient by conv position (short reductions; see wgrad_uses_positions) and the
  // channel block of its register tile (G's row length is Cout rounded up to it).
  void (*wgrad_by_position)(const BwdGeom&, const T*, const T*, const uint8_t*, const int32_t*, const int32_t*,
                            int64_t, T*, T*, T*);
  int64_t position_cols;
  // Whether wgrad reads the patches in place from the padded image (it needs no patch buffer).
  bool (*wgrad_reads_image)(const BwdGeom&);
};

template <typename T>
BwdKernels<T> pick_bwd(Isa isa) {
  switch (isa) {
    case Isa::kAvx512:
      return {&avx512::wgrad_image<T>, &avx512::dgrad_image<T>, &avx512::wgrad_image_by_position<T>,
              avx512::wgrad_position_cols<T>(), &avx512::wgrad_reads_image<T>};
    case Isa::kAvx2:
      return {&avx2::wgrad_image<T>, &avx2::dgrad_image<T>, &avx2::wgrad_image_by_position<T>,
              avx2::wgrad_position_cols<T>(), &avx2::wgrad_reads_image<T>};
    default:
      return {&generic::wgrad_image<T>, &generic::dgrad_image<T>, &generic::wgrad_image_by_position<T>,
              generic::wgrad_position_cols<T>(), &generic::wgrad_reads_image<T>};
  }
}

// Which weight-gradient form the sparse backward uses. By conv position (output channels in the
// vector lanes, wgrad_image_by_position) for short reductions, where the per-entry form's
// bookkeeping outweighs its FLOP saving; per entry (wgrad_image) otherwise. It runs pool_h*pool_w
// times the per-entry form's multiply-adds (the dense count), so the rule caps that product.
// AEFAST_ENCODER_WGRAD=entries|positions (read per call) forces one form, for tests and A/B timing.
// Measured (bench/bench_conv_pool.py's backward_weight rows, interleaved; see the commit):
// 1->32 3x3 at 28x28 (K = 9) and 3->32 3x3 at 128x128 (K = 27), both pool 2x2.
constexpr int64_t kPositionWgradMaxDenseK = 128;  // pool_h*pool_w*K

bool wgrad_uses_positions(const Shape& s) {
  if (const char* env = std::getenv("AEFAST_ENCODER_WGRAD"); env != nullptr && *env != '\0') {
    const std::string v(env);
    if (v == "positions") return true;
    if (v == "entries") return false;
    TORCH_CHECK(false, "AEFAST_ENCODER_WGRAD must be 'entries' or 'positions', got '", v, "'");
  }
  return s.PKH * s.PKW * s.K() <= kPositionWgradMaxDenseK;
}

// Which input-gradient form the sparse backward uses: the decoder's forward kernels applied to
// gz (dgrad_by_decoder_forward) or the per-position buckets of this file (dgrad_image). Both
// serve every pool this file's backward sees (tiling pools: pool stride = pool size, no clipped
// ceil_mode window; overlapping pools and clipped windows never reach it, they take
// conv_pool_general.cpp's path), so the rule is about speed only:
//   * few input channels, whose KH*KW*Cin taps fit in <= 3 vectors of the ISA, with windows of
//     <= 4 elements: the decoder's window-vector kernels (lanes = pool windows) against buckets
//     whose rows use 1-3 lanes in 16: the decoder form, on every ISA;
//   * Cin >= 32 and Cout >= 16 (the decoder's per-entry kernels with many entries per window):
//     the buckets. The 1-thread A/B below had the decoder form win or tie under AVX-512 (its AVX2
//     clones lost on every such shape), but with the training steps' 2 threads it lost or tied
//     (fused backward via autograd.grad of AF.conv_pool2d, AEFAST_ENCODER_DGRAD alternated,
//     wall-clock medians of 15, two runs on a slow host, decoder / buckets: W1 32->64 14x14 N256 1.14 / 1.03, W2 32->64 64x64
//     N32 1.09 / 1.08, W2 64->128 32x32 N32 1.01 / 1.00), so the rule leaves them on the buckets;
//   * otherwise (Cin 7 to 16, or Cout < 16: few entries per position; not profiled, presumably
//     the decoder's dense T stores and per-pixel tap sums outweigh its sums there) the buckets.
// Measured: a standalone A/B script (/tmp, not committed) timing the raw ops in one process,
// AEFAST_ENCODER_DGRAD alternated per round, 1 thread, CPU time, medians of 15-31 rounds, 3x3
// conv padding 1, 2x2 pool, relu, fp32, NCHW unless "cl", AVX-512 Zen 5 under load 2-5
// (directions only; the ratios moved by up to ~0.1 between runs). Ratio decoder / buckets for the
// input gradient alone (conv_pool2d_backward_input), then for the fused backward (both gradients):
//   W1 1->32 28x28 N256       0.42-0.45, fused 0.55-0.58 (2.5-2.8 against 5.9-6.1 ms)
//   W1 32->64 14x14 N256      0.92-1.08, fused 1.01-1.03 (a tie: ~6 ms each); cl 0.95-0.98, 1.02
//   W2 3->32 128x128 N32      0.49-0.54, fused 0.78 (9.5 against 18 ms)
//   W2 32->64 64x64 N32       0.86-0.92, fused 0.93-0.96 (15 against 17 ms)
//   W2 64->128 32x32 N32      0.87-0.88, fused 0.95
//   N128 64->64 14x14 0.83-0.85, fused 0.91; N64 128->64 14x14 0.73-0.76, fused 0.87;
//   N64 28x28 32->32 0.95-1.04 and 32->16 0.91-1.05 (ties), fused 1.00-1.07
//   tutorial 1->16 28x28 N128 0.29-0.32, fused 0.45; N64 5->16 0.57-0.59; but 7->32 1.02-1.09
//   (4 vectors): buckets. Losses of the decoder form, kept on buckets: tutorial 16->4 14x14 N128
//   1.27-1.48, SegNet-like N16 8->16 48x48 cl 1.19-1.25, 16->16 24x24 cl 0.98-1.07 (NCHW
//   1.04-1.16), N64 28x28 8->32 1.21-1.28, 16->32 0.99-1.12, 16->64 0.97-1.02, N128 64->8 1.09-1.15.
// Other geometries in the Cin >= 32 branch, ties: 3x3 pool 32->64 21x21 N128 1.04-1.05, stride-2
// 32->64 28x28 N256 1.03, and 32->64 14x14 N64 fp64 0.91, bf16 1.01-1.05 (fused 0.99-1.04).
// With AEFAST_CPU_ISA=avx2: 1->32 / 1->16 0.71 / 0.58 (K = 9: 2 vectors of 8), 3->32 0.97 (4
// vectors), every Cin >= 5 shape above 1.06-1.65. SegNetAutoencoder at W1 has W1's encoder shapes.
// AEFAST_ENCODER_DGRAD=decoder|buckets (read per call) forces one form, for tests and A/B timing.
constexpr int64_t kDecoderDgradMaxSlabVectors = 3;

bool dgrad_uses_decoder_forward(const Shape& s, at::ScalarType dtype) {
  if (const char* env = std::getenv("AEFAST_ENCODER_DGRAD"); env != nullptr && *env != '\0') {
    const std::string v(env);
    if (v == "decoder") return true;
    if (v == "buckets") return false;
    TORCH_CHECK(false, "AEFAST_ENCODER_DGRAD must be 'decoder' or 'buckets', got '", v, "'");
  }
  const Isa isa = cpu_isa();
  const int64_t lanes = unpool_deconv_cpu::decoder_lanes(isa, dtype);  // the accumulation type's
  const int64_t slab_vectors = (s.KH * s.KW * s.Cin + lanes - 1) / lanes;
  return s.PKH * s.PKW <= 4 && slab_vectors <= kDecoderDgradMaxSlabVectors;
}

// The input gradient as the decoder's forward (unpool_deconv.cpp; the derivation above
// conv_pool2d_backward_impl): grad_x = conv_transpose2d(max_unpool2d(gz, window offsets), w,
// stride, padding) cut to the input's H x W, i.e. unpool_conv_transpose2d with z = gz, indices =
// the window offsets, the encoder's weight (Cout, Cin, KH, KW) read as the transposed conv's
// (C_in = Cout, C_out = Cin), no bias, no activation. The unpooled plane is the part of the conv
// output that the windows cover (HO*PKH x WO*PKW: no entry lies beyond it) and the output size is
// the input's (AxisTaps gives the rows / columns no conv window reads no tap: zeros).
// gz (N, Cout, HO, WO) is in the accumulation type and dense in the layout cl says, as the window
// offsets are; half types run the decoder in fp32 on gz and a widened weight and are rounded once
// into grad_input. The decoder writes grad_input itself where the types and the layout agree,
// else a temporary that is copied (half types; grad_input channels-last with NCHW pooled tensors).
// The decoder forward is deterministic per image, so the result is thread-count independent.
template <typename scalar_t>
void dgrad_by_decoder_forward(const at::Tensor& gz, const at::Tensor& window, const at::Tensor& weight, const Shape& s,
                              bool cl, at::Tensor& grad_input) {
  using acc_t = at::opmath_type<scalar_t>;
  namespace dec = unpool_deconv_cpu;
  const DecoderGeometry g{s.N, s.Cout, s.Cin, s.HO, s.WO, s.PKH, s.PKW, s.HO * s.PKH, s.WU(),
                          s.KH, s.KW, s.SH, s.SW, s.PH, s.PW, s.H, s.W};
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor w = weight.to(gz.scalar_type()).contiguous();
  const bool direct = std::is_same_v<scalar_t, acc_t> && grad_input.is_contiguous(fmt);
  at::Tensor out = direct ? grad_input : empty_cpu_cached(grad_input.sizes(), gz.options(), fmt);
  at::Tensor pre = at::empty({0}, gz.options());
  const std::optional<at::Tensor> no_bias;
  dec::forward_sparse(dec::ForwardCall{gz, window, w, no_bias, g, DecoderAct::None, 0.0, cl, out, pre});
  if (!direct) grad_input.copy_(out);
}

template <typename scalar_t, typename acc_t>
using GzFn = void (*)(const scalar_t*, const scalar_t*, int64_t, acc_t, acc_t*);

template <typename scalar_t, typename acc_t, int ACT>
GzFn<scalar_t, acc_t> pick_gz_isa(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return &avx512::conv_grad_at_argmax<ACT, scalar_t, acc_t>;
    case Isa::kAvx2: return &avx2::conv_grad_at_argmax<ACT, scalar_t, acc_t>;
    default: return &generic::conv_grad_at_argmax<ACT, scalar_t, acc_t>;
  }
}

template <typename scalar_t, typename acc_t>
GzFn<scalar_t, acc_t> pick_gz(int64_t act, Isa isa) {
  return with_activation(act, [&](auto a) { return pick_gz_isa<scalar_t, acc_t, decltype(a)::value>(isa); });
}

template <typename T>
using TransposeFn = void (*)(const T*, int64_t, int64_t, T*, int64_t);

template <typename T>
TransposeFn<T> pick_transpose(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return &avx512::store_transposed<T, T>;
    case Isa::kAvx2: return &avx2::store_transposed<T, T>;
    default: return &generic::store_transposed<T, T>;
  }
}

void check_backward_args(const at::Tensor& grad, const at::Tensor& window, const at::Tensor& preact) {
  TORCH_CHECK(grad.dim() == 4 && grad.sizes() == window.sizes() && grad.sizes() == preact.sizes(),
              "aefast::conv_pool2d backward: grad, window and preact must share one 4-D shape");
  TORCH_CHECK(window.scalar_type() == at::kByte, "aefast::conv_pool2d backward: window must be uint8");
  TORCH_CHECK(grad.scalar_type() == preact.scalar_type(), "aefast::conv_pool2d backward: grad and preact dtypes differ");
}

// Both gradients of the encoder block, from one gz per image. `input` is needed for the weight
// gradient (and gives N, H, W), `weight` for the input gradient; either output may be skipped.
// Returns (grad_input or undefined, grad_weight or undefined, grad_bias or undefined).
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_pool2d_backward_impl(
    const at::Tensor& grad_pooled, const at::Tensor& window, const at::Tensor& preact, const at::Tensor* input,
    const at::Tensor* weight, const Shape& s, int64_t activation, double negative_slope,
    const InputCorruption& noise) {
  const bool need_x = weight != nullptr, need_w = input != nullptr;
  // The input gradient's form (dgrad_uses_decoder_forward): the decoder's forward over gz, or
  // the per-position buckets (dgrad_image) inside the per-image loop below.
  const bool dgrad_decoder = need_x && dgrad_uses_decoder_forward(s, grad_pooled.scalar_type());
  const bool dgrad_buckets = need_x && !dgrad_decoder;
  // Channels-last pooled tensors (the forward's outputs for a channels-last input) are read as
  // they are: each image's gz and window offsets are transposed to the kernels' (Cout, plane)
  // order in a per-thread buffer, instead of an NCHW copy of the three tensors.
  const bool cl_grads = strides_channels_last(grad_pooled) && window.is_contiguous(at::MemoryFormat::ChannelsLast) &&
                        preact.is_contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor g = cl_grads ? grad_pooled : contiguous_cpu_cached(grad_pooled),
                   win = cl_grads ? window : contiguous_cpu_cached(window),
                   z = cl_grads ? preact : contiguous_cpu_cached(preact);
  // The input gradient channels-last when the pooled gradient or the input or weight is (the
  // forward's rule, outputs_channels_last): written from the padded channels-last gradient
  // image in runs of W*Cin.
  const bool in_cl = strides_channels_last(grad_pooled) || (input != nullptr && strides_channels_last(*input)) ||
                     (weight != nullptr && strides_channels_last(*weight));
  at::Tensor grad_input, grad_weight, grad_bias;
  if (need_x)
    grad_input = empty_cpu_cached({s.N, s.Cin, s.H, s.W}, g.options(),
                                  in_cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  if (need_w) {
    grad_weight = at::empty({s.Cout, s.Cin, s.KH, s.KW}, g.options());
    grad_bias = at::empty({s.Cout}, g.options());
  }
  const Isa isa = cpu_isa();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "conv_pool2d_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
    constexpr int64_t kPad = 64 / sizeof(acc_t);
    const int64_t K = s.K(), Kp = (K + kPad - 1) / kPad * kPad, plane = s.HO * s.WO, E = s.Cout * plane;
    const int64_t WU = s.WU();
    const int64_t Hp = s.H + 2 * s.PH, Wp = s.W + 2 * s.PW, row = Wp * s.Cin, run = s.KW * s.Cin;
    TORCH_CHECK(E < (int64_t(1) << 31) && s.Cout * Kp < (int64_t(1) << 31) && s.WO * 256 * s.Cout < (int64_t(1) << 31),
                "aefast::conv_pool2d backward: an image is too large for the CPU kernel");
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const uint8_t* kp = win.const_data_ptr<uint8_t>();
    const acc_t slope = static_cast<acc_t>(negative_slope);
    const int64_t pkhw = s.PKH * s.PKW, keys = s.WO * pkhw;
    const auto gzfn = pick_gz<scalar_t, acc_t>(activation, isa);
    const auto transpose = pick_transpose<acc_t>(isa);
    // Weight rows (Cout, Kp), k = (ki*KW + kj)*Cin + ci, zero-padded, for the dgrad.
    at::Tensor wr;
    if (dgrad_buckets) {
      wr = at::zeros({s.Cout, Kp}, g.options().dtype(acc_dtype));
      wr.narrow(1, 0, K).copy_(weight->permute({0, 2, 3, 1}).reshape({s.Cout, K}));
    }
    const acc_t* wrp = dgrad_buckets ? wr.const_data_ptr<acc_t>() : nullptr;
    const scalar_t* xp = need_w ? input->const_data_ptr<scalar_t>() : nullptr;
    const int64_t xstr[4] = {need_w ? input->stride(0) : 0, need_w ? input->stride(1) : 0,
                             need_w ? input->stride(2) : 0, need_w ? input->stride(3) : 0};
    scalar_t* gxo = need_x ? grad_input.mutable_data_ptr<scalar_t>() : nullptr;
    // wgrad: patches of a strip of pooled rows, about 128 KiB (all rows when they fit). Measured
    // (single thread, CPU time, interleaved, loaded machine: directions) against the former
    // 512 KiB: W1's 32->64 14x14 backward_weight 9.2 -> 6.7 ms, W2's 32->64 64x64 26.5 -> 19.2
    // ms, 64->128 32x32 unchanged; 32, 96 and 256 KiB were no better. The patch rows each
    // channel's entries gather then stay nearer (L2 beside the weight partial and gz).
    const int64_t rows = std::clamp<int64_t>((128 << 10) / std::max<int64_t>(s.PKH * WU * Kp * sizeof(acc_t), 1), 1,
                                             s.HO);
    const int64_t max_pos = rows * s.PKH * WU;
    BwdGeom geo{s.Cin, s.Cout, s.KH, s.KW, s.SH, s.SW, s.HO, s.WO, s.PKH, s.PKW, K, Kp, WU, row, run, rows, pkhw, keys,
                {}, {}, {}};
    // Row and column of each window offset inside its window, and its conv position relative
    // to the window's first one (tables: a division by the runtime pool width per entry costs
    // more than the entry's work when Cin is small).
    for (int64_t k = 0; k < pkhw; ++k) {
      geo.di[k] = static_cast<int32_t>(k / s.PKW);
      geo.dj[k] = static_cast<int32_t>(k % s.PKW);
      geo.offk[k] = static_cast<int32_t>(geo.di[k] * WU + geo.dj[k]);
    }
    const auto kern = pick_bwd<acc_t>(isa);
    // The input gradient by the decoder's forward (dgrad_uses_decoder_forward) runs over the
    // whole batch's gz (gz_all, in the layout of the pooled tensors): with the weight gradient,
    // the loop below writes each image's gz there as it computes it for the weight gradient, and
    // the decoder runs after the loop; alone, a pass computes gz_all first. (Tried: per chunk of
    // images inside the loop, the decoder on the chunk's gz while it is in cache. It gained on
    // W2's 3->32 128x128, 16 MB of gz (fused ratio 0.74 against 0.82), but the per-call set-up of
    // the decoder, up to 16 calls, cost more on every other shape: W1 32->64 fused 1.07 against
    // 1.03-1.05, N16 16->16 24x24 1.30 against 1.0.)
    const at::Tensor gz_all =
        dgrad_decoder ? empty_cpu_cached({s.N, s.Cout, s.HO, s.WO}, g.options().dtype(acc_dtype),
                                         cl_grads ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous)
                      : at::Tensor();
    acc_t* gz_of_images = dgrad_decoder ? gz_all.mutable_data_ptr<acc_t>() : nullptr;
    if (dgrad_decoder && !need_w)
      at::parallel_for(0, s.N, std::max<int64_t>(1, 65536 / std::max<int64_t>(E, 1)), [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; ++n) gzfn(gp + n * E, zp + n * E, E, slope, gz_of_images + n * E);
      });
    // The weight gradient by conv position (wgrad_uses_positions): G strips of pooled rows sized
    // for L1/L2, the patch offsets of every conv position and of every k, partials (K, ldg).
    const bool by_position = need_w && wgrad_uses_positions(s);
    RECORD_USER_SCOPE(!need_w ? "aefast path: conv_pool2d_backward sparse"
                      : by_position ? "aefast path: conv_pool2d_backward sparse, wgrad by position"
                                    : "aefast path: conv_pool2d_backward sparse, wgrad per entry");
    const int64_t ldg = (s.Cout + kern.position_cols - 1) / kern.position_cols * kern.position_cols;
    BwdGeom geo_pos = geo;
    geo_pos.rows = std::clamp<int64_t>((64 << 10) / std::max<int64_t>(s.PKH * WU * ldg * sizeof(acc_t), 1), 1, s.HO);
    std::vector<int32_t> pbase(by_position ? s.HO * s.PKH * WU : 0), koff(by_position ? K : 0);
    if (by_position) {
      TORCH_CHECK(Hp * row < (int64_t(1) << 31), "aefast::conv_pool2d backward: the image is too large");
      for (int64_t h = 0; h < s.HO * s.PKH; ++h)
        for (int64_t w = 0; w < WU; ++w) pbase[h * WU + w] = static_cast<int32_t>((h * s.SH) * row + (w * s.SW) * s.Cin);
      for (int64_t k = 0; k < K; ++k) {  // k = (ki*KW + kj)*Cin + ci
        const int64_t ki = k / run, e = k % run;
        koff[k] = static_cast<int32_t>(ki * row + e);
      }
    }
    const int64_t part_len = by_position ? K * ldg : s.Cout * Kp;  // one chunk's weight partial
    // The forward's corruption, regenerated element by element in the image load.
    const auto corrupt_at = noise.at_element<scalar_t, acc_t>();
    TORCH_CHECK(max_pos * Kp < (int64_t(1) << 31) && (!need_w || Hp * row < (int64_t(1) << 31)),
                "aefast::conv_pool2d backward: the image is too wide");
    // Fixed chunks of images (a function of N and the sizes only) own the weight/bias partials.
    // (Nothing is left for the loop when the decoder has done the only gradient asked for.)
    const int64_t chunks =
        need_w ? std::clamp<int64_t>((int64_t(16) << 20) / std::max<int64_t>(s.Cout * Kp, 1), 1, std::min<int64_t>(s.N, 16))
               : dgrad_buckets ? s.N : 0;
    // Image- and weight-sized scratch through the buffer cache (aefast/cpu_buffer_cache.h): a
    // fresh buffer of a few MB page-faults on every call. Each chunk zeroes its own part_w slice.
    const at::TensorOptions acc_opts = g.options().dtype(acc_dtype);
    const at::Tensor part_w_t = empty_cpu_cached({need_w ? chunks * part_len : 0}, acc_opts);
    acc_t* part_w = part_w_t.mutable_data_ptr<acc_t>();
    std::vector<acc_t> part_b(need_w ? chunks * s.Cout : 0);

    at::parallel_for(0, chunks, 1, [&](int64_t cbegin, int64_t cend) {
      // gz is written whole per image, gx zeroed per image; xpad's border must read as zero.
      const at::Tensor gz_t = empty_cpu_cached({E}, acc_opts);
      const at::Tensor xpad_t = zeros_cpu_cached({need_w ? Hp * row : 0}, acc_opts);
      acc_t* gz = gz_t.mutable_data_ptr<acc_t>();
      acc_t* xpad = xpad_t.mutable_data_ptr<acc_t>();
      const bool by_entry = need_w && !by_position;
      std::vector<acc_t> gg(by_entry ? plane : 0),
          patches(by_entry && !kern.wgrad_reads_image(geo) ? max_pos * Kp : 0);
      std::vector<acc_t> gpos(by_position ? geo_pos.rows * s.PKH * WU * ldg : 0);
      std::vector<int32_t> off(by_entry ? plane : 0), fill(dgrad_buckets ? keys : 0),
          bo(dgrad_buckets ? keys * s.Cout : 0);
      const at::Tensor gx_t = empty_cpu_cached({dgrad_buckets ? Hp * row : 0}, acc_opts);
      acc_t* gx = gx_t.mutable_data_ptr<acc_t>();
      std::vector<acc_t> bg(dgrad_buckets ? keys * s.Cout : 0), dcol(dgrad_buckets ? Kp : 0);
      std::vector<acc_t> gz_cl(cl_grads && !dgrad_decoder ? E : 0);
      std::vector<uint8_t> kn_nchw(cl_grads ? E : 0);
      for (int64_t c = cbegin; c < cend; ++c) {
        const int64_t n0 = c * s.N / chunks, n1 = (c + 1) * s.N / chunks;
        acc_t* gw = need_w ? part_w + c * part_len : nullptr;
        acc_t* gb = need_w ? part_b.data() + c * s.Cout : nullptr;
        if (need_w) {
          std::fill(gw, gw + part_len, acc_t(0));
          std::fill(gb, gb + s.Cout, acc_t(0));
        }
        for (int64_t n = n0; n < n1; ++n) {
          const uint8_t* kn = kp + n * E;
          // The image's gz, into gz_all's slot for the decoder-form dgrad; the kernels below
          // read it in (Cout, plane) order (gzn).
          const acc_t* gzn = gz;
          if (cl_grads) {  // (plane, Cout) -> (Cout, plane)
            acc_t* gz_pc = dgrad_decoder ? gz_of_images + n * E : gz_cl.data();
            gzfn(gp + n * E, zp + n * E, E, slope, gz_pc);
            transpose(gz_pc, plane, s.Cout, gz, plane);
            for (int64_t co = 0; co < s.Cout; ++co)
              for (int64_t q = 0; q < plane; ++q) kn_nchw[co * plane + q] = kn[q * s.Cout + co];
            kn = kn_nchw.data();
          } else if (dgrad_decoder) {
            gzfn(gp + n * E, zp + n * E, E, slope, gz_of_images + n * E);
            gzn = gz_of_images + n * E;
          } else {
            gzfn(gp + n * E, zp + n * E, E, slope, gz);
          }
          if (need_w) {
            // The padded channels-last image (its border stays zero across images).
            load_input_rows<scalar_t, acc_t>(xp, xstr, s, n, 0, s.H, xpad + s.PH * row + s.PW * s.Cin, row,
                                             corrupt_at);
            if (by_position)
              kern.wgrad_by_position(geo_pos, xpad, gzn, kn, pbase.data(), koff.data(), ldg, gpos.data(), gw, gb);
            else
              kern.wgrad(geo, xpad, gzn, kn, patches.data(), off.data(), gg.data(), gw, gb);
          }
          if (dgrad_buckets) {
            std::fill(gx, gx + Hp * row, acc_t(0));
            kern.dgrad(geo, gzn, kn, wrp, fill.data(), bo.data(), bg.data(), dcol.data(), gx);
            // The interior of the padded gradient image, to channels-last or NCHW.
            scalar_t* dst = gxo + n * s.Cin * s.H * s.W;
            if (in_cl) {
              for (int64_t y = 0; y < s.H; ++y) {
                const acc_t* src = gx + (y + s.PH) * row + s.PW * s.Cin;
                scalar_t* d = dst + y * s.W * s.Cin;
                for (int64_t e = 0; e < s.W * s.Cin; ++e) d[e] = static_cast<scalar_t>(src[e]);
              }
              continue;
            }
            for (int64_t ci = 0; ci < s.Cin; ++ci)
              for (int64_t y = 0; y < s.H; ++y) {
                const acc_t* src = gx + (y + s.PH) * row + s.PW * s.Cin + ci;
                scalar_t* d = dst + (ci * s.H + y) * s.W;
                for (int64_t xx = 0; xx < s.W; ++xx) d[xx] = static_cast<scalar_t>(src[xx * s.Cin]);
              }
          }
        }
      }
    });
    if (dgrad_decoder) {
      RECORD_USER_SCOPE("aefast path: conv_pool2d_backward dgrad by decoder forward");
      dgrad_by_decoder_forward<scalar_t>(gz_all, win, *weight, s, cl_grads, grad_input);
    }
    if (need_w) {
      // Sum the chunk partials in chunk order straight into the outputs, permuting
      // (Cout, KH, KW, Cin) -> (Cout, Cin, KH, KW) on the way.
      scalar_t* gwo = grad_weight.mutable_data_ptr<scalar_t>();
      scalar_t* gbo = grad_bias.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, s.Cout, 1, [&](int64_t begin, int64_t end) {
        for (int64_t co = begin; co < end; ++co) {
          acc_t b = 0;
          for (int64_t c = 0; c < chunks; ++c) b += part_b[c * s.Cout + co];
          gbo[co] = static_cast<scalar_t>(b);
          for (int64_t k = 0; k < K; ++k) {  // k = (ki*KW + kj)*Cin + ci
            acc_t v = 0;
            for (int64_t c = 0; c < chunks; ++c)
              v += by_position ? part_w[c * part_len + k * ldg + co] : part_w[(c * s.Cout + co) * Kp + k];
            const int64_t ci = k % s.Cin, kk = k / s.Cin;
            gwo[(co * s.Cin + ci) * s.KH * s.KW + kk] = static_cast<scalar_t>(v);
          }
        }
      });
    }
  });
  return {grad_input, grad_weight, grad_bias};
}

at::Tensor conv_pool2d_backward_input_cpu(const at::Tensor& grad_pooled, const at::Tensor& window,
                                          const at::Tensor& preact, const at::Tensor& weight,
                                          c10::IntArrayRef input_size, c10::IntArrayRef stride,
                                          c10::IntArrayRef padding, int64_t activation, double negative_slope,
                                          c10::IntArrayRef pool_size, c10::IntArrayRef pool_stride,
                                          bool ceil_mode) {
  check_same_device("conv_pool2d_backward_input", {&grad_pooled, &window, &preact, &weight});
  check_backward_args(grad_pooled, window, preact);
  check_activation(activation);
  TORCH_CHECK(input_size.size() == 2 && weight.dim() == 4, "aefast::conv_pool2d_backward_input: bad arguments");
  TORCH_CHECK(weight.scalar_type() == grad_pooled.scalar_type(), "aefast::conv_pool2d_backward_input: dtypes differ");
  const PoolWindows pool = pool_windows(pool_size, pool_stride, ceil_mode);
  if (!tiling_pool(pool, input_size[0], input_size[1], weight.size(2), weight.size(3), stride, padding) ||
      backward_uses_vendor(grad_pooled.size(0), weight.size(1), weight.size(0), InputCorruption{})) {
    TORCH_CHECK(grad_pooled.size(1) == weight.size(0), "aefast::conv_pool2d_backward_input: grad has ",
                grad_pooled.size(1), " channels, the weight ", weight.size(0));
    const bool cl = strides_channels_last(grad_pooled) || strides_channels_last(weight);
    return in_layout(std::get<0>(conv_pool2d_backward_general(grad_pooled, window, preact, at::Tensor(), weight,
                                                    grad_pooled.size(0), weight.size(1), input_size,
                                                    weight.sizes().slice(2), stride, padding, activation,
                                                    negative_slope, pool)), cl);
  }
  const Shape s = make_shape(grad_pooled.size(0), weight.size(1), input_size[0], input_size[1], weight.size(0),
                             weight.size(2), weight.size(3), stride, padding, pool_size);
  TORCH_CHECK(grad_pooled.size(1) == s.Cout && grad_pooled.size(2) == s.HO && grad_pooled.size(3) == s.WO,
              "aefast::conv_pool2d_backward_input: grad shape does not match the conv geometry");
  if (s.N == 0 || s.Cin == 0 || s.H * s.W == 0) return at::zeros({s.N, s.Cin, s.H, s.W}, grad_pooled.options());
  return std::get<0>(conv_pool2d_backward_impl(grad_pooled, window, preact, nullptr, &weight, s, activation,
                                               negative_slope, InputCorruption{}));
}

std::tuple<at::Tensor, at::Tensor> conv_pool2d_backward_weight_cpu(
    const at::Tensor& grad_pooled, const at::Tensor& window, const at::Tensor& preact, const at::Tensor& input,
    c10::IntArrayRef kernel_size, c10::IntArrayRef stride, c10::IntArrayRef padding, int64_t activation,
    double negative_slope, c10::IntArrayRef pool_size, c10::string_view corruption, double corruption_level,
    int64_t seed, double low, double high, c10::IntArrayRef pool_stride, bool ceil_mode) {
  check_same_device("conv_pool2d_backward_weight", {&grad_pooled, &window, &preact, &input});
  check_backward_args(grad_pooled, window, preact);
  check_activation(activation);
  const InputCorruption noise = parse_input_corruption(corruption, corruption_level, seed, low, high);
  TORCH_CHECK(input.dim() == 4 && kernel_size.size() == 2, "aefast::conv_pool2d_backward_weight: bad arguments");
  TORCH_CHECK(input.scalar_type() == grad_pooled.scalar_type(), "aefast::conv_pool2d_backward_weight: dtypes differ");
  const PoolWindows pool = pool_windows(pool_size, pool_stride, ceil_mode);
  if (!tiling_pool(pool, input.size(2), input.size(3), kernel_size[0], kernel_size[1], stride, padding) ||
      backward_uses_vendor(input.size(0), input.size(1), grad_pooled.size(1), noise)) {
    TORCH_CHECK(!noise.active(), "aefast::conv_pool2d_backward_weight: corruption in the load needs a tiling pool");
    auto out = conv_pool2d_backward_general(grad_pooled, window, preact, input, at::Tensor(), input.size(0),
                                            input.size(1), input.sizes().slice(2), kernel_size, stride, padding,
                                            activation, negative_slope, pool);
    // The weight gradient is contiguous on every path (the tiling kernels write it so).
    return {std::get<1>(out).contiguous(), std::get<2>(out)};
  }
  const Shape s = make_shape(input.size(0), input.size(1), input.size(2), input.size(3), grad_pooled.size(1),
                             kernel_size[0], kernel_size[1], stride, padding, pool_size);
  TORCH_CHECK(grad_pooled.size(0) == s.N && grad_pooled.size(2) == s.HO && grad_pooled.size(3) == s.WO,
              "aefast::conv_pool2d_backward_weight: grad shape does not match the conv geometry");
  if (s.N == 0 || s.Cout == 0 || s.K() == 0)
    return {at::zeros({s.Cout, s.Cin, s.KH, s.KW}, grad_pooled.options()), at::zeros({s.Cout}, grad_pooled.options())};
  auto out = conv_pool2d_backward_impl(grad_pooled, window, preact, &input, nullptr, s, activation, negative_slope,
                                       noise);
  return {std::get<1>(out), std::get<2>(out)};
}

// Both gradients from one pass over gz (see conv_pool2d_backward_impl).
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_pool2d_backward_cpu(
    const at::Tensor& grad_pooled, const at::Tensor& window, const at::Tensor& preact, const at::Tensor& input,
    const at::Tensor& weight, c10::IntArrayRef stride, c10::IntArrayRef padding, int64_t activation,
    double negative_slope, c10::IntArrayRef pool_size, c10::string_view corruption, double corruption_level,
    int64_t seed, double low, double high, c10::IntArrayRef pool_stride, bool ceil_mode) {
  check_same_device("conv_pool2d_backward", {&grad_pooled, &window, &preact, &input, &weight});
  check_backward_args(grad_pooled, window, preact);
  check_activation(activation);
  check_conv_args(input, weight);
  const InputCorruption noise = parse_input_corruption(corruption, corruption_level, seed, low, high);
  TORCH_CHECK(input.scalar_type() == grad_pooled.scalar_type(), "aefast::conv_pool2d_backward: dtypes differ");
  const PoolWindows pool = pool_windows(pool_size, pool_stride, ceil_mode);
  if (!tiling_pool(pool, input.size(2), input.size(3), weight.size(2), weight.size(3), stride, padding) ||
      backward_uses_vendor(input.size(0), input.size(1), weight.size(0), noise)) {
    RECORD_USER_SCOPE("aefast path: conv_pool2d_backward scatter + onednn");
    TORCH_CHECK(!noise.active(), "aefast::conv_pool2d_backward: corruption in the load needs a tiling pool");
    TORCH_CHECK(grad_pooled.size(1) == weight.size(0), "aefast::conv_pool2d_backward: grad has ",
                grad_pooled.size(1), " channels, the weight ", weight.size(0));
    auto out = conv_pool2d_backward_general(grad_pooled, window, preact, input, weight, input.size(0), input.size(1),
                                            input.sizes().slice(2), weight.sizes().slice(2), stride, padding,
                                            activation, negative_slope, pool);
    std::get<0>(out) = in_layout(std::get<0>(out), strides_channels_last(grad_pooled) ||
                                                       strides_channels_last(input) || strides_channels_last(weight));
    std::get<1>(out) = std::get<1>(out).contiguous();
    return out;
  }
  const Shape s = make_shape(input.size(0), input.size(1), input.size(2), input.size(3), weight.size(0),
                             weight.size(2), weight.size(3), stride, padding, pool_size);
  TORCH_CHECK(grad_pooled.size(0) == s.N && grad_pooled.size(1) == s.Cout && grad_pooled.size(2) == s.HO &&
                  grad_pooled.size(3) == s.WO,
              "aefast::conv_pool2d_backward: grad shape does not match the conv geometry");
  if (s.N == 0 || s.Cout == 0 || s.K() == 0)
    return {at::zeros({s.N, s.Cin, s.H, s.W}, grad_pooled.options()),
            at::zeros({s.Cout, s.Cin, s.KH, s.KW}, grad_pooled.options()), at::zeros({s.Cout}, grad_pooled.options())};
  return conv_pool2d_backward_impl(grad_pooled, window, preact, &input, &weight, s, activation, negative_slope, noise);
}

}  // namespace

TORCH_LIBRARY_IMPL(aefast, CPU, m) {
  m.impl("conv_pool2d_backward_input", &conv_pool2d_backward_input_cpu);
  m.impl("conv_pool2d_backward_weight", &conv_pool2d_backward_weight_cpu);
  m.impl("conv_pool2d_backward", &conv_pool2d_backward_cpu);
}

}  // namespace aefast
