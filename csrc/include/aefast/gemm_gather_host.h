#pragma once
// The CUDA backend's conv-family algorithms, written once over an executor `Exec`:
//   Exec::for_each(body, n)      runs body(e) for e in [0, n)  (CUDA: a grid-stride kernel,
//                                csrc/include/aefast/cuda_exec.cuh; tests: a CPU loop,
//                                csrc/cpu/emulate_cuda_bodies.cpp)
//   Exec::for_each_checked(b, n, msg)  the same for a body returning false on a bad input
//                                (CUDA: device-side assert, no host sync; CPU: an error)
//   Exec::mm(a, b)               a @ b with the result in the accumulation type (CUDA: cuBLAS
//                                through at::mm, fp32 output for fp16/bf16 operands)
// so the tests run, on the CPU, the very index arithmetic and GEMM sequence the GPU runs.
// Per-element bodies and the window-major row layout: aefast/gemm_gather_body.h.
//
// Decoder forward   out = act(conv_transpose2d(unpool(z, idx), W, b)):
//   per batch chunk: At = unpool rows of z (Cin, rows); colsT = W2d^T @ At (Cout*KH*KW, rows);
//   DecoderCol2imBody gathers, per output, the column entries of its taps + bias, act.
// Decoder backward  gpre = grad_out * act'; per chunk: G = im2col rows of gpre (rows, Cout*KK);
//   grad_z = select(W2d @ G^T) at each argmax; grad_W2d += At @ G (chunks summed in order);
//   grad_b = sum of gpre over (N, H, W) (at::sum).
// Encoder forward   K >= kVendorConvMinReduction: per chunk at::convolution (cuDNN, honours the
//   TF32 flags; bias inside, so z is the conv output eager computes) on x or corrupt(x), then
//   EncoderEpilogueBody (act -> pool -> argmax); else EncoderDirectBody.
// Encoder backward  gz = grad * act'(z at the argmax); dgrad = the decoder forward on gz (weight
//   (Cout, Cin, KH, KW) read as a transposed-conv weight Cout -> Cin, no bias, no act);
//   wgrad += At(gz) @ (im2col rows of x, corrupted as in the forward); grad_b = sum gz.
// Every reduction is either inside a GEMM or a per-output loop of fixed order: no float atomics,
// so every backward is bitwise reproducible run to run (cuBLAS GEMMs are, for a fixed config).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <array>
#include <type_traits>
#include <optional>
#include <tuple>

#include "aefast/conv_algorithm.h"
#include "aefast/unpool_deconv_args.h"
#include "aefast/gemm_gather_body.h"

namespace aefast {

// The dims a bias gradient sums over (N, H, W of an NCHW tensor).
inline constexpr int64_t kBatchAndPlaneDims[3] = {0, 2, 3};

// L2-sized batch chunks on the GPU (H100: 50 MiB L2): a chunk's GEMM operands and result.
constexpr int64_t kGemmChunkBytes = 24 << 20;

inline WindowRows window_rows_of(const DecoderGeometry& g, int64_t channels) {
  return WindowRows{channels, g.pooled_h, g.pooled_w, g.pool_h, g.pool_w, g.unpooled_h, g.unpooled_w};
}

template <typename scalar_t>
inline at::ScalarType acc_dtype_of() {
  return c10::CppTypeToScalarType<at::opmath_type<scalar_t>>::value;
}

// out / pre (pre may be undefined) are preallocated (N, Cout, OH, OW); z, idx, w contiguous.
template <class Exec>
void decoder_forward_gemm(const at::Tensor& z, const at::Tensor& idx, const at::Tensor& w, const at::Tensor& bias,
                          const DecoderGeometry& g, DecoderAct act, double slope, int64_t budget, at::Tensor& out,
                          at::Tensor& pre) {
  if (out.numel() == 0) return;
  const bool flat = idx.scalar_type() == at::kLong;
  const WindowRows rows = window_rows_of(g, g.c_in);
  const int64_t ncols = g.c_out * g.kernel_h * g.kernel_w, rpi = rows.rows_per_image();
  const at::Tensor w2d = w.reshape({g.c_in, ncols});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "aefast_decoder_forward_gemm", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t per_image = rpi * (g.c_in * (int64_t)sizeof(scalar_t) + ncols * (int64_t)sizeof(acc_t));
    const int64_t chunk = images_per_chunk(per_image, g.n, budget);
    at::Tensor a = at::empty({chunk * rpi * g.c_in}, z.options());
    for (int64_t n0 = 0; n0 < g.n; n0 += chunk) {
      const int64_t count = std::min(chunk, g.n - n0), nrows = count * rpi;
      at::Tensor a_t = a.narrow(0, 0, nrows * g.c_in).view({g.c_in, nrows});
      auto fill = [&](auto index_ptr) {
        using index_t = std::remove_const_t<std::remove_pointer_t<decltype(index_ptr)>>;
        Exec::for_each(UnpoolRowsBody<scalar_t, index_t, scalar_t>{z.const_data_ptr<scalar_t>(), index_ptr,
                                                                   a_t.mutable_data_ptr<scalar_t>(), rows, nrows, n0,
                                                                   flat},
                       a_t.numel());
      };
      if (flat) fill(idx.const_data_ptr<int64_t>()); else fill(idx.const_data_ptr<uint8_t>());
      const at::Tensor cols_t = Exec::mm(w2d.t(), a_t).contiguous();
      Exec::for_each(DecoderCol2imBody<scalar_t, acc_t>{cols_t.const_data_ptr<acc_t>(), nrows,
                                                        bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
                                                        out.mutable_data_ptr<scalar_t>(),
                                                        pre.defined() && pre.numel() ? pre.mutable_data_ptr<scalar_t>()
                                                                                     : nullptr,
                                                        rows, g, n0, act, static_cast<acc_t>(slope)},
                     count * g.c_out * g.out_h * g.out_w);
    }
  });
}

// grad_z / grad_w / grad_b are preallocated with the shapes of z, w and (Cout); only the masked
// ones are written.
template <class Exec>
void decoder_backward_gemm(const at::Tensor& grad_out, const at::Tensor& act_input, const at::Tensor& z,
                           const at::Tensor& idx, const at::Tensor& w, const DecoderGeometry& g, DecoderAct act,
                           double slope, std::array<bool, 3> mask, int64_t budget, at::Tensor& grad_z,
                           at::Tensor& grad_w, at::Tensor& grad_b) {
  const bool flat = idx.scalar_type() == at::kLong;
  const WindowRows rows = window_rows_of(g, g.c_in);
  const int64_t ncols = g.c_out * g.kernel_h * g.kernel_w, rpi = rows.rows_per_image();
  const at::Tensor w2d = w.reshape({g.c_in, ncols});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "aefast_decoder_backward_gemm", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor gpre = at::empty(grad_out.sizes(), grad_out.options());
    if (gpre.numel())
      Exec::for_each(DecoderActGradBody<scalar_t, acc_t, scalar_t>{grad_out.const_data_ptr<scalar_t>(),
                                                                   act_input.const_data_ptr<scalar_t>(),
                                                                   gpre.mutable_data_ptr<scalar_t>(), act,
                                                                   static_cast<acc_t>(slope)},
                     gpre.numel());
    if (mask[2]) grad_b.copy_(gpre.sum(at::IntArrayRef(kBatchAndPlaneDims), /*keepdim=*/false, acc_dtype_of<scalar_t>()));
    if (!(mask[0] || mask[1]) || g.n == 0) {
      if (mask[1]) grad_w.zero_();
      return;
    }
    const int64_t per_image = rpi * ((g.c_in + ncols) * (int64_t)sizeof(scalar_t) + g.c_in * (int64_t)sizeof(acc_t));
    const int64_t chunk = images_per_chunk(per_image, g.n, budget);
    at::Tensor gcols = at::empty({chunk * rpi, ncols}, z.options());
    at::Tensor a = mask[1] ? at::empty({chunk * rpi * g.c_in}, z.options()) : at::Tensor();
    at::Tensor gw_acc = mask[1] ? at::zeros({g.c_in, ncols}, z.options().dtype(acc_dtype_of<scalar_t>())) : at::Tensor();
    for (int64_t n0 = 0; n0 < g.n; n0 += chunk) {
      const int64_t count = std::min(chunk, g.n - n0), nrows = count * rpi;
      at::Tensor g_c = gcols.narrow(0, 0, nrows);
      Exec::for_each(Im2colRowsBody<scalar_t, acc_t, scalar_t>{gpre.const_data_ptr<scalar_t>(),
                                                               g_c.mutable_data_ptr<scalar_t>(), rows, g.c_out,
                                                               g.out_h, g.out_w, g.kernel_h, g.kernel_w, g.stride_h,
                                                               g.stride_w, g.pad_h, g.pad_w, n0, {}},
                     g_c.numel());
      auto with_index = [&](auto index_ptr) {
        using index_t = std::remove_const_t<std::remove_pointer_t<decltype(index_ptr)>>;
        if (mask[0]) {
          const at::Tensor r_t = Exec::mm(w2d, g_c.t()).contiguous();
          Exec::for_each(SelectRowsBody<acc_t, index_t, scalar_t>{r_t.const_data_ptr<acc_t>(), nrows, index_ptr,
                                                                  grad_z.mutable_data_ptr<scalar_t>(), rows, n0, flat},
                         count * g.c_in * g.pooled_h * g.pooled_w);
        }
        if (mask[1]) {
          at::Tensor a_t = a.narrow(0, 0, nrows * g.c_in).view({g.c_in, nrows});
          Exec::for_each(UnpoolRowsBody<scalar_t, index_t, scalar_t>{z.const_data_ptr<scalar_t>(), index_ptr,
                                                                     a_t.mutable_data_ptr<scalar_t>(), rows, nrows, n0,
                                                                     flat},
                         a_t.numel());
          gw_acc.add_(Exec::mm(a_t, g_c));
        }
      };
      if (flat) with_index(idx.const_data_ptr<int64_t>()); else with_index(idx.const_data_ptr<uint8_t>());
    }
    if (mask[1]) grad_w.copy_(gw_acc.view(grad_w.sizes()));
  });
}

// Pools of stride = pool_size; ceil_mode adds the windows clipped at the conv output's edge
// (pool_window skips their positions past it; the backward's unpool never names them).
inline EncoderGeometry encoder_geometry(int64_t N, int64_t Cin, int64_t H, int64_t W, int64_t Cout, int64_t KH,
                                        int64_t KW, c10::IntArrayRef stride, c10::IntArrayRef padding,
                                        c10::IntArrayRef pool, bool ceil_mode = false) {
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && pool.size() == 2,
              "aefast::conv_pool2d: stride, padding and pool_size need two entries each");
  TORCH_CHECK(stride[0] > 0 && stride[1] > 0 && padding[0] >= 0 && padding[1] >= 0 && pool[0] > 0 && pool[1] > 0 &&
                  pool[0] * pool[1] <= 255,
              "aefast::conv_pool2d: invalid stride, padding or pool_size");
  TORCH_CHECK(H + 2 * padding[0] >= KH && W + 2 * padding[1] >= KW, "aefast::conv_pool2d: the conv output is empty");
  const int64_t HC = (H + 2 * padding[0] - KH) / stride[0] + 1, WC = (W + 2 * padding[1] - KW) / stride[1] + 1;
  TORCH_CHECK(HC >= pool[0] && WC >= pool[1], "aefast::conv_pool2d: the conv output is smaller than the pool window");
  return EncoderGeometry{N,         Cin,       H,       W,       Cout,    KH,           KW,           stride[0], stride[1],
                         padding[0], padding[1], pool[0], pool[1], HC, WC, pool_out_extent(HC, pool[0], pool[0], ceil_mode),
                         pool_out_extent(WC, pool[1], pool[1], ceil_mode)};
}

template <typename scalar_t, typename acc_t>
ElementCorruption<scalar_t, acc_t> make_corruption(int code, int64_t seed, double level, double low, double high) {
  return code == kNoCorruption ? ElementCorruption<scalar_t, acc_t>()
                               : ElementCorruption<scalar_t, acc_t>(code, seed, level, low, high);
}

// x, w contiguous; bias undefined or contiguous; outputs preallocated (N, Cout, HO, WO).
template <class Exec>
void encoder_forward_gemm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& bias, const EncoderGeometry& g,
                          int act, double slope, int noise_code, int64_t seed, double level, double low, double high,
                          int64_t budget, at::Tensor& pooled, at::Tensor& window, at::Tensor& preact) {
  if (pooled.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "aefast_encoder_forward_gemm", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto noise = make_corruption<scalar_t, acc_t>(noise_code, seed, level, low, high);
    scalar_t* pp = pooled.mutable_data_ptr<scalar_t>();
    uint8_t* wp = window.mutable_data_ptr<uint8_t>();
    scalar_t* zp = preact.mutable_data_ptr<scalar_t>();
    if (!encoder_uses_vendor_conv(g.Cin * g.KH * g.KW)) {
      Exec::for_each(EncoderDirectBody<scalar_t, acc_t>{x.const_data_ptr<scalar_t>(), w.const_data_ptr<scalar_t>(),
                                                        bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr, g,
                                                        act, static_cast<acc_t>(slope), noise, pp, wp, zp},
                     pooled.numel());
      return;
    }
    const int64_t image = g.Cin * g.H * g.W;
    const int64_t per_image = (g.Cout * g.HC * g.WC + (noise.active() ? image : 0)) * (int64_t)sizeof(scalar_t);
    const int64_t chunk = images_per_chunk(per_image, g.N, budget);
    at::Tensor noisy = noise.active() ? at::empty({chunk, g.Cin, g.H, g.W}, x.options()) : at::Tensor();
    for (int64_t n0 = 0; n0 < g.N; n0 += chunk) {
      const int64_t count = std::min(chunk, g.N - n0);
      at::Tensor operand = x.narrow(0, n0, count);
      if (noise.active()) {
        operand = noisy.narrow(0, 0, count);
        Exec::for_each(CorruptChunkBody<scalar_t, acc_t>{x.const_data_ptr<scalar_t>(),
                                                         operand.mutable_data_ptr<scalar_t>(), n0 * image, noise},
                       count * image);
      }
      const at::Tensor conv = at::convolution(operand, w, bias.defined() ? std::optional<at::Tensor>(bias) : std::nullopt,
                                              {g.SH, g.SW}, {g.PH, g.PW}, {1, 1}, false, {0, 0}, 1);
      TORCH_CHECK(conv.size(2) == g.HC && conv.size(3) == g.WC, "aefast::conv_pool2d: unexpected conv output shape");
      EncoderEpilogueBody<scalar_t, acc_t> body{conv.const_data_ptr<scalar_t>(), {conv.stride(0), conv.stride(1),
                                                conv.stride(2), conv.stride(3)}, g, act, static_cast<acc_t>(slope),
                                                pp, wp, zp, n0};
      Exec::for_each(body, count * g.Cout * g.HO * g.WO);
    }
  });
}

// grad, window, preact (N, Cout, HO, WO) contiguous; x, w contiguous. Writes the requested ones
// of grad_x (N, Cin, H, W), grad_w (Cout, Cin, KH, KW), grad_b (Cout), all preallocated.
template <class Exec>
void encoder_backward_gemm(const at::Tensor& grad, const at::Tensor& window, const at::Tensor& preact,
                           const at::Tensor& x, const at::Tensor& w, const EncoderGeometry& g, int act, double slope,
                           int noise_code, int64_t seed, double level, double low, double high, bool want_input,
                           bool want_weight, int64_t budget, at::Tensor& grad_x, at::Tensor& grad_w,
                           at::Tensor& grad_b) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "aefast_encoder_backward_gemm", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor gz = at::empty(grad.sizes(), grad.options());
    if (gz.numel())
      Exec::for_each(EncoderActGradBody<scalar_t, acc_t, scalar_t>{grad.const_data_ptr<scalar_t>(),
                                                                   preact.const_data_ptr<scalar_t>(),
                                                                   gz.mutable_data_ptr<scalar_t>(), act,
                                                                   static_cast<acc_t>(slope)},
                     gz.numel());
    // The encoder's argmax map read as a decoder: pooled (HO, WO), windows (PKH, PKW), unpooled =
    // the conv output (HC, WC), transposed conv back onto the input plane (H, W).
    DecoderGeometry d;
    d.n = g.N; d.c_in = g.Cout; d.c_out = g.Cin; d.pooled_h = g.HO; d.pooled_w = g.WO; d.pool_h = g.PKH;
    d.pool_w = g.PKW; d.unpooled_h = g.HC; d.unpooled_w = g.WC; d.kernel_h = g.KH; d.kernel_w = g.KW;
    d.stride_h = g.SH; d.stride_w = g.SW; d.pad_h = g.PH; d.pad_w = g.PW; d.out_h = g.H; d.out_w = g.W;
    if (want_input) {
      at::Tensor no_pre;
      decoder_forward_gemm<Exec>(gz, window, w, at::Tensor(), d, DecoderAct::None, 0.0, budget, grad_x, no_pre);
    }
    if (!want_weight) return;
    grad_b.copy_(gz.sum(at::IntArrayRef(kBatchAndPlaneDims), /*keepdim=*/false, acc_dtype_of<scalar_t>()));
    const WindowRows rows = window_rows_of(d, g.Cout);
    const int64_t K = g.Cin * g.KH * g.KW, rpi = rows.rows_per_image();
    if (g.N == 0) {
      grad_w.zero_();
      return;
    }
    const auto noise = make_corruption<scalar_t, acc_t>(noise_code, seed, level, low, high);
    const int64_t per_image = rpi * (g.Cout + K) * (int64_t)sizeof(scalar_t);
    const int64_t chunk = images_per_chunk(per_image, g.N, budget);
    at::Tensor a = at::empty({chunk * rpi * g.Cout}, grad.options());
    at::Tensor cols = at::empty({chunk * rpi, K}, grad.options());
    at::Tensor gw_acc = at::zeros({g.Cout, K}, grad.options().dtype(acc_dtype_of<scalar_t>()));
    for (int64_t n0 = 0; n0 < g.N; n0 += chunk) {
      const int64_t count = std::min(chunk, g.N - n0), nrows = count * rpi;
      at::Tensor a_t = a.narrow(0, 0, nrows * g.Cout).view({g.Cout, nrows}), x_c = cols.narrow(0, 0, nrows);
      Exec::for_each(UnpoolRowsBody<scalar_t, uint8_t, scalar_t>{gz.const_data_ptr<scalar_t>(),
                                                                 window.const_data_ptr<uint8_t>(),
                                                                 a_t.mutable_data_ptr<scalar_t>(), rows, nrows, n0,
                                                                 false},
                     a_t.numel());
      Exec::for_each(Im2colRowsBody<scalar_t, acc_t, scalar_t>{x.const_data_ptr<scalar_t>(),
                                                               x_c.mutable_data_ptr<scalar_t>(), rows, g.Cin, g.H, g.W,
                                                               g.KH, g.KW, g.SH, g.SW, g.PH, g.PW, n0, noise},
                     x_c.numel());
      gw_acc.add_(Exec::mm(a_t, x_c));
    }
    grad_w.copy_(gw_acc.view(grad_w.sizes()));
  });
}

inline int64_t max_pool_output_size(int64_t size, int64_t k, int64_t s, int64_t p, int64_t d, bool ceil_mode) {
  const int64_t num = size + 2 * p - (d * (k - 1) + 1) + (ceil_mode ? s - 1 : 0);
  int64_t out = (num >= 0 ? num / s : -((-num + s - 1) / s)) + 1;
  if (ceil_mode && (out - 1) * s >= size + p) --out;
  return out;
}

// The drop-in max_pool2d forward: outputs in the input's memory format.
template <class Exec>
std::tuple<at::Tensor, at::Tensor> max_pool2d_forward_op(const at::Tensor& input, c10::IntArrayRef kernel,
                                                         c10::IntArrayRef stride, c10::IntArrayRef padding,
                                                         c10::IntArrayRef dilation, bool ceil_mode) {
  TORCH_CHECK(input.dim() == 4 && kernel.size() == 2 && stride.size() == 2 && padding.size() == 2 &&
                  dilation.size() == 2,
              "aefast::max_pool2d_forward: bad arguments");
  MaxPoolArgs a{input.size(0), input.size(1), input.size(2), input.size(3), 0, 0, kernel[0], kernel[1], stride[0],
                stride[1], padding[0], padding[1], dilation[0], dilation[1], {}, {}};
  TORCH_CHECK(a.KH > 0 && a.KW > 0 && a.SH > 0 && a.SW > 0 && a.DH > 0 && a.DW > 0 && a.PH >= 0 && a.PW >= 0 &&
                  a.PH <= a.KH / 2 && a.PW <= a.KW / 2,
              "aefast::max_pool2d_forward: invalid pooling geometry");
  a.OH = max_pool_output_size(a.H, a.KH, a.SH, a.PH, a.DH, ceil_mode);
  a.OW = max_pool_output_size(a.W, a.KW, a.SW, a.PW, a.DW, ceil_mode);
  TORCH_CHECK(a.OH > 0 && a.OW > 0, "aefast::max_pool2d_forward: output would be empty");
  const auto fmt = input.suggest_memory_format();
  at::Tensor out = at::empty({a.N, a.C, a.OH, a.OW}, input.options().memory_format(fmt));
  at::Tensor idx = at::empty({a.N, a.C, a.OH, a.OW}, input.options().dtype(at::kLong).memory_format(fmt));
  if (out.numel() == 0) return {out, idx};
  for (int d = 0; d < 4; ++d) {
    a.xs[d] = input.stride(d);
    a.os[d] = out.stride(d);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "aefast_max_pool2d_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    Exec::for_each(MaxPoolForwardBody<scalar_t, acc_t>{input.const_data_ptr<scalar_t>(), a,
                                                       out.mutable_data_ptr<scalar_t>(), idx.mutable_data_ptr<int64_t>()},
                   out.numel());
  });
  return {out, idx};
}

// The drop-in max_pool2d backward: grad_input in the input's memory format.
template <class Exec>
at::Tensor max_pool2d_backward_planes(const at::Tensor& grad_output, const at::Tensor& indices, const at::Tensor& input) {
  const at::AutoDispatchBelowADInplaceOrView no_autograd;
  TORCH_CHECK(grad_output.dim() == 4 && indices.sizes() == grad_output.sizes() && indices.scalar_type() == at::kLong &&
                  input.dim() == 4,
              "aefast::max_pool2d_backward: grad_output and indices must share one 4-D shape, indices int64");
  TORCH_CHECK(grad_output.size(0) == input.size(0) && grad_output.size(1) == input.size(1),
              "aefast::max_pool2d_backward: grad_output's batch and channels ", grad_output.sizes(),
              " do not match the input's ", input.sizes());
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const auto acc_type = grad_output.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // A scatter into each plane: the accumulation planes must start at zero.
  at::Tensor gx = at::zeros({N, C, H, W}, grad_output.options().dtype(acc_type));
  if (grad_output.numel() > 0 && gx.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(), "aefast_max_pool2d_backward",
                                    [&] {
      using acc_t = at::opmath_type<scalar_t>;
      MaxPoolBackwardPlaneBody<scalar_t, acc_t> body{grad_output.const_data_ptr<scalar_t>(),
                                                     indices.const_data_ptr<int64_t>(),
                                                     {grad_output.stride(0), grad_output.stride(1),
                                                      grad_output.stride(2), grad_output.stride(3)},
                                                     {indices.stride(0), indices.stride(1), indices.stride(2),
                                                      indices.stride(3)},
                                                     C, grad_output.size(2), grad_output.size(3), H, W,
                                                     gx.mutable_data_ptr<acc_t>()};
      Exec::for_each_checked(body, N * C, "aefast::max_pool2d_backward: an index is outside [0, H*W) of its plane");
    });
  }
  return gx.to(grad_output.scalar_type()).contiguous(input.suggest_memory_format());
}


// ------------------------------------------------------------------ the ops, over an executor
// (argument checks and allocation included, so the CPU emulation runs the entry points too)

template <class Exec>
std::tuple<at::Tensor, at::Tensor> unpool_conv_transpose2d_op(
    const at::Tensor& input, const at::Tensor& indices, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    c10::IntArrayRef pool_size, c10::IntArrayRef unpooled_size, c10::IntArrayRef stride, c10::IntArrayRef padding,
    c10::IntArrayRef output_padding, std::optional<c10::string_view> activation, double negative_slope,
    int64_t budget) {
  const at::AutoDispatchBelowADInplaceOrView no_autograd;  // at::mm / at::convolution are steps, not graph ops
  const DecoderGeometry g =
      decoder_geometry(input, indices, weight, pool_size, unpooled_size, stride, padding, output_padding);
  const DecoderAct act = parse_activation(activation);
  TORCH_CHECK(weight.scalar_type() == input.scalar_type() &&
                  (!bias.has_value() || !bias->defined() || bias->scalar_type() == input.scalar_type()),
              "aefast::unpool_conv_transpose2d: dtype mismatch");
  const at::Tensor z = input.contiguous(), idx = indices.contiguous(), w = weight.contiguous();
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  at::Tensor out = at::empty({g.n, g.c_out, g.out_h, g.out_w}, input.options());
  at::Tensor pre = act_needs_preactivation(act) ? at::empty_like(out) : at::empty({0}, input.options());
  decoder_forward_gemm<Exec>(z, idx, w, b, g, act, negative_slope, budget, out, pre);
  if (decoder_channels_last(input))  // the layout rule of every backend (unpool_deconv_args.h)
    return {out.contiguous(at::MemoryFormat::ChannelsLast), pre.numel() ? pre.contiguous(at::MemoryFormat::ChannelsLast) : pre};
  return {out, pre};
}

template <class Exec>
std::tuple<at::Tensor, at::Tensor, at::Tensor> unpool_conv_transpose2d_backward_op(
    const at::Tensor& grad_out, const at::Tensor& act_input, const at::Tensor& input, const at::Tensor& indices,
    const at::Tensor& weight, c10::IntArrayRef pool_size, c10::IntArrayRef unpooled_size, c10::IntArrayRef stride,
    c10::IntArrayRef padding, c10::IntArrayRef output_padding, std::optional<c10::string_view> activation,
    double negative_slope, std::array<bool, 3> output_mask, int64_t budget) {
  const at::AutoDispatchBelowADInplaceOrView no_autograd;  // at::mm / at::convolution are steps, not graph ops
  const DecoderGeometry g =
      decoder_geometry(input, indices, weight, pool_size, unpooled_size, stride, padding, output_padding);
  const DecoderAct act = parse_activation(activation);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({g.n, g.c_out, g.out_h, g.out_w}) &&
                  act_input.sizes() == grad_out.sizes(),
              "aefast::unpool_conv_transpose2d_backward: grad_out / act_input have the wrong shape");
  TORCH_CHECK(weight.scalar_type() == input.scalar_type() && act_input.scalar_type() == input.scalar_type(),
              "aefast::unpool_conv_transpose2d_backward: dtype mismatch");
  const at::Tensor go = grad_out.contiguous().to(input.scalar_type()), ai = act_input.contiguous();
  const at::Tensor z = input.contiguous(), idx = indices.contiguous(), w = weight.contiguous();
  // Requested gradients are fully written; unrequested ones keep their shape, as zeros.
  at::Tensor grad_z = output_mask[0] ? at::empty_like(z) : at::zeros_like(z);
  at::Tensor grad_w = output_mask[1] ? at::empty_like(w) : at::zeros_like(w);
  at::Tensor grad_b = output_mask[2] ? at::empty({g.c_out}, input.options()) : at::zeros({g.c_out}, input.options());
  decoder_backward_gemm<Exec>(go, ai, z, idx, w, g, act, negative_slope, output_mask, budget, grad_z, grad_w, grad_b);
  if (decoder_channels_last(input)) grad_z = grad_z.contiguous(at::MemoryFormat::ChannelsLast);
  return {grad_z, grad_w, grad_b};
}

inline void check_encoder_activation(int64_t act) {
  TORCH_CHECK(act >= 0 && act < kNumActivations, "aefast::conv_pool2d: unknown activation code ", act);
}

inline int encoder_corruption_code(c10::string_view kind) {
  const int code = corruption_kind_code(std::string_view(kind.data(), kind.size()));
  TORCH_CHECK(code != -2, "aefast::conv_pool2d: unknown corruption '", std::string(kind.data(), kind.size()),
              "' (none, gaussian, masking, salt_pepper)");
  return code;
}

template <class Exec>
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_pool2d_forward_op(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias, c10::IntArrayRef stride,
    c10::IntArrayRef padding, int64_t activation, double negative_slope, c10::IntArrayRef pool_size,
    c10::string_view corruption, double corruption_level, int64_t seed, double low, double high, int64_t budget,
    bool ceil_mode = false) {
  const at::AutoDispatchBelowADInplaceOrView no_autograd;  // at::mm / at::convolution are steps, not graph ops
  const int noise_code = encoder_corruption_code(corruption);
  TORCH_CHECK(input.dim() == 4 && weight.dim() == 4 && input.size(1) == weight.size(1) &&
                  input.scalar_type() == weight.scalar_type() &&
                  (!bias.has_value() || !bias->defined() || bias->scalar_type() == input.scalar_type()),
              "aefast::conv_pool2d_forward: input/weight/bias shapes or dtypes do not match");
  check_encoder_activation(activation);
  const EncoderGeometry g = encoder_geometry(input.size(0), input.size(1), input.size(2), input.size(3), weight.size(0),
                                             weight.size(2), weight.size(3), stride, padding, pool_size, ceil_mode);
  const at::Tensor x = input.contiguous(), w = weight.contiguous();
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  at::Tensor pooled = at::empty({g.N, g.Cout, g.HO, g.WO}, input.options());
  at::Tensor window = at::empty({g.N, g.Cout, g.HO, g.WO}, input.options().dtype(at::kByte));
  at::Tensor preact = at::empty({g.N, g.Cout, g.HO, g.WO}, input.options());
  encoder_forward_gemm<Exec>(x, w, b, g, static_cast<int>(activation), negative_slope, noise_code, seed,
                             corruption_level, low, high, budget, pooled, window, preact);
  return {pooled, window, preact};
}

// The three backward ops: input (N, Cin, H, W) or weight may be undefined when not needed.
template <class Exec>
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_pool2d_backward_op(
    const at::Tensor& grad, const at::Tensor& window, const at::Tensor& preact, const at::Tensor& input,
    const at::Tensor& weight, const EncoderGeometry& g, int64_t activation, double negative_slope,
    c10::string_view corruption, int64_t seed, double level, double low, double high, bool want_input,
    bool want_weight, int64_t budget) {
  const at::AutoDispatchBelowADInplaceOrView no_autograd;  // at::mm / at::convolution are steps, not graph ops
  const int noise_code = encoder_corruption_code(corruption);
  TORCH_CHECK(grad.dim() == 4 && grad.sizes() == window.sizes() && grad.sizes() == preact.sizes() &&
                  window.scalar_type() == at::kByte && preact.scalar_type() == grad.scalar_type(),
              "aefast::conv_pool2d_backward: grad, window (uint8) and preact must share one 4-D shape");
  TORCH_CHECK(grad.size(0) == g.N && grad.size(1) == g.Cout && grad.size(2) == g.HO && grad.size(3) == g.WO,
              "aefast::conv_pool2d_backward: grad shape does not match the conv geometry");
  check_encoder_activation(activation);
  const at::Tensor gr = grad.contiguous(), win = window.contiguous(), z = preact.contiguous();
  const at::Tensor x = input.defined() ? input.contiguous().to(grad.scalar_type()) : at::Tensor();
  const at::Tensor w = weight.defined() ? weight.contiguous().to(grad.scalar_type()) : at::Tensor();
  at::Tensor grad_x = want_input ? at::empty({g.N, g.Cin, g.H, g.W}, grad.options()) : at::Tensor();
  at::Tensor grad_w = want_weight ? at::empty({g.Cout, g.Cin, g.KH, g.KW}, grad.options()) : at::Tensor();
  at::Tensor grad_b = want_weight ? at::empty({g.Cout}, grad.options()) : at::Tensor();
  encoder_backward_gemm<Exec>(gr, win, z, x, w, g, static_cast<int>(activation), negative_slope, noise_code, seed, level,
                              low, high, want_input, want_weight, budget, grad_x, grad_w, grad_b);
  return {grad_x, grad_w, grad_b};
}

}  // namespace aefast
