// The encoder block with a general pool (conv_pool_general.h): vendor conv in channels-last + the
// vectorised pool epilogue, and a backward that scatters the pool-sparse gradient straight into the
// channels-last buffer the vendor conv backward takes.
//
// Forward, with z = conv2d(x, w) + b (N, Cout, HC, WC), the conv by at::convolution (oneDNN, in
// channels-last, its fast layout here: 1.5-2.4x NCHW; half types computed in fp32 as the tiling
// path does), a = act(z), and pool windows of (PKH, PKW) starting at (i*SPH, j*SPW), clipped to the
// conv output (ceil_mode's last window may hang over the edge; torch's size rule guarantees it
// starts inside):
//   pooled[n,co,i,j] = max over the window's in-bounds (r, c), row-major, of a[n,co,r,c]
//   window[n,co,i,j] = (r - i*SPH)*PKW + (c - j*SPW) of the first maximum (torch's rule:
//                      `v > best || isnan(v)` replaces it), i.e. the row-major offset inside the
//                      FULL (PKH, PKW) window, also for a clipped one
//   preact[n,co,i,j] = z at that position
// z and act(z) are rounded to the tensor dtype before they are compared, as eager rounds them.
// The conv runs over batch chunks of about kConvChunkBytes of output, each pooled by the epilogue
// (activate_pool_row, conv_bn_pool_kernels.inc: vectorised over Cout, per ISA) while it is still in
// cache; only pooled-size tensors are returned.
//
// Backward. With gz = grad_pooled * act'(preact) (pooled-size, rounded to the dtype as eager
// rounds the activation's gradient) and pos(n,co,i,j) the conv position its window offset names,
//   dL/dz[n,co,r,c] = sum over the windows (i, j) whose argmax is (r, c) of gz[n,co,i,j]
// which is the sum over overlapping windows: one conv position can be the maximum of up to
// ceil(PKH/SPH)*ceil(PKW/SPW) windows. dL/dz is built channels-last in the accumulation type, per
// band of conv rows (EncoderPool::band_begin) in parallel: zeros, then every window's gz added at
// its argmax in pooled row-major order (scatter_window_grads), so the result is deterministic and
// does not depend on the thread count. It is then handed to at::convolution_backward for grad_x,
// grad_w and grad_b (the sum of dL/dz), channels-last like the forward's conv; grad_x comes back in
// the input's layout.
#include "conv_pool_general.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <array>
#include <type_traits>
#include <vector>

#include "aefast/conv_pool.h"
#include "aefast/cpu_buffer_cache.h"
#include "aefast/cpu_isa.h"

namespace aefast {

namespace {

EncoderPool plane_geometry(int64_t n, int64_t c, int64_t hc, int64_t wc, const PoolWindows& p) {
  TORCH_CHECK(p.kh > 0 && p.kw > 0 && p.sh > 0 && p.sw > 0 && p.kh * p.kw <= 255,
              "aefast::conv_pool2d: pool_size and pool_stride must be positive, at most 255 elements in a window");
  TORCH_CHECK(hc >= p.kh && wc >= p.kw, "aefast::conv_pool2d: the conv output ", hc, "x", wc,
              " is smaller than the pool window");
  return {n,    c,    hc,   wc,   p.kh, p.kw, p.sh, p.sw, pool_out_extent(hc, p.kh, p.sh, p.ceil_mode),
          pool_out_extent(wc, p.kw, p.sw, p.ceil_mode)};
}

int64_t conv_extent(int64_t in, int64_t k, int64_t s, int64_t pad) { return (in + 2 * pad - k) / s + 1; }

#define AEFAST_PER_ISA_KERNELS "conv_bn_pool_kernels.inc"
#include "per_isa.inc"

// The kernels of conv_bn_pool_kernels.inc this file runs, for one ISA, activation and dtype: the
// conv output is acc_t (fp32 for the half types), the op's tensors scalar_t.
template <typename scalar_t, typename acc_t>
struct GeneralPoolKernels {
  void (*pool_row)(const acc_t*, const EncoderPool&, int64_t, const acc_t*, const acc_t*, acc_t, acc_t*, acc_t*,
                   acc_t*, acc_t*, int32_t*, scalar_t*, uint8_t*, scalar_t*);
  void (*window_grads)(const scalar_t*, const scalar_t*, int64_t, acc_t, acc_t*);
  void (*scatter)(const acc_t*, const uint8_t*, const int32_t*, const int32_t*, const EncoderPool&, int64_t, int64_t,
                  const acc_t*, acc_t*);
};

#define AEFAST_GENERAL_POOL_KERNELS(NS, ACT)                                                     \
  GeneralPoolKernels<scalar_t, acc_t> {                                                          \
    &NS::activate_pool_row<ACT, true, acc_t, scalar_t, acc_t>, &NS::window_grads<ACT, scalar_t, acc_t>, \
        &NS::scatter_window_grads<acc_t>                                                         \
  }

template <typename scalar_t, typename acc_t, int ACT>
GeneralPoolKernels<scalar_t, acc_t> pick_isa_kernels(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return AEFAST_GENERAL_POOL_KERNELS(avx512, ACT);
    case Isa::kAvx2: return AEFAST_GENERAL_POOL_KERNELS(avx2, ACT);
    default: return AEFAST_GENERAL_POOL_KERNELS(generic, ACT);
  }
}
#undef AEFAST_GENERAL_POOL_KERNELS

template <typename scalar_t, typename acc_t>
GeneralPoolKernels<scalar_t, acc_t> pick_kernels(int64_t act) {
  const Isa isa = cpu_isa();
  return with_activation(act, [&](auto a) { return pick_isa_kernels<scalar_t, acc_t, decltype(a)::value>(isa); });
}

// Conv output per oneDNN call: a few MiB stays in L2/L3 between its write and the epilogue's read.
constexpr int64_t kConvChunkBytes = 4 << 20;

// A window offset must name a position inside its window and inside the conv output. Only the
// last pooled row and column can be clipped, so only those are checked beyond the offset's range.
void check_window_offsets(const uint8_t* win, const EncoderPool& s, int64_t planes) {
  const int64_t pooled_hw = s.HO * s.WO, window = s.PKH * s.PKW;
  at::parallel_for(0, planes, 16, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const uint8_t* w = win + p * pooled_hw;
      uint8_t most = 0;
      for (int64_t q = 0; q < pooled_hw; ++q) most = std::max(most, w[q]);
      bool inside = most < window;
      for (int64_t i = 0; i < s.HO; ++i) inside &= (s.WO - 1) * s.SPW + w[i * s.WO + s.WO - 1] % s.PKW < s.WC;
      for (int64_t j = 0; j < s.WO; ++j) inside &= (s.HO - 1) * s.SPH + w[(s.HO - 1) * s.WO + j] / s.PKW < s.HC;
      TORCH_CHECK(inside, "aefast::conv_pool2d backward: a window offset lies outside its window or the conv output");
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_pool2d_forward_general(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias, c10::IntArrayRef stride,
    c10::IntArrayRef padding, int64_t activation, double negative_slope, const PoolWindows& pool) {
  at::AutoDispatchBelowADInplaceOrView guard;  // the conv is a step of this kernel
  const auto acc_dtype = at::toOpMathType(input.scalar_type());
  const int64_t N = input.size(0), C = weight.size(0);
  const EncoderPool s =
      plane_geometry(N, C, conv_extent(input.size(2), weight.size(2), stride[0], padding[0]),
                     conv_extent(input.size(3), weight.size(3), stride[1], padding[1]), pool);
  at::Tensor pooled = empty_cpu_cached({N, C, s.HO, s.WO}, input.options());
  at::Tensor window = empty_cpu_cached({N, C, s.HO, s.WO}, input.options().dtype(at::kByte));
  at::Tensor preact = empty_cpu_cached({N, C, s.HO, s.WO}, input.options());
  if (pooled.numel() == 0) return {pooled, window, preact};
  // Channels-last operands in the accumulation type: a channels-last input is used as it is.
  const at::Tensor x = conv_operand(input.to(acc_dtype), s.WC);
  const at::Tensor w = weight.to(acc_dtype);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "conv_pool2d_forward_general", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto kern = pick_kernels<scalar_t, acc_t>(activation);
    // z = 1 * conv + b: the bias joins in the epilogue (the affine of activate_pool_row).
    std::vector<acc_t> ones(C, acc_t(1)), bias_acc(C, acc_t(0));
    if (bias.has_value() && bias->defined()) {
      const at::Tensor b = bias->to(acc_dtype).contiguous();
      std::copy(b.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>() + C, bias_acc.begin());
    }
    scalar_t* pp = pooled.mutable_data_ptr<scalar_t>();
    uint8_t* wp = window.mutable_data_ptr<uint8_t>();
    scalar_t* zp = preact.mutable_data_ptr<scalar_t>();
    const acc_t slope = static_cast<acc_t>(negative_slope);
    const int64_t image = s.plane() * C, pooled_hw = s.HO * s.WO;
    const int64_t chunk = std::max<int64_t>(1, kConvChunkBytes / std::max<int64_t>(image * sizeof(acc_t), 1));
    for (int64_t n0 = 0; n0 < N; n0 += chunk) {
      const int64_t count = std::min(chunk, N - n0);
      const at::Tensor conv = as_channels_last(
          at::convolution(x.narrow(0, n0, count), w, /*bias=*/{}, stride, padding, {1, 1}, false, {0, 0}, 1));
      TORCH_CHECK(conv.size(2) == s.HC && conv.size(3) == s.WC, "aefast::conv_pool2d: unexpected conv output shape");
      const acc_t* cp = conv.const_data_ptr<acc_t>();
      at::parallel_for(0, count * s.HO, 1, [&](int64_t u0, int64_t u1) {
        std::vector<acc_t> best(C), bestz(C), act(C), z(C);
        std::vector<int32_t> off(C);
        std::vector<scalar_t> pbuf(C * s.WO), zbuf(C * s.WO);
        std::vector<uint8_t> wbuf(C * s.WO);
        for (int64_t u = u0; u < u1; ++u) {
          const int64_t n = u / s.HO, i = u % s.HO;
          kern.pool_row(cp + n * image, s, i, ones.data(), bias_acc.data(), slope, best.data(), bestz.data(),
                        act.data(), z.data(), off.data(), pbuf.data(), wbuf.data(), zbuf.data());
          // each channel's run of WO values out, NCHW
          for (int64_t c = 0; c < C; ++c) {
            const int64_t dst = ((n0 + n) * C + c) * pooled_hw + i * s.WO;
            std::copy(pbuf.begin() + c * s.WO, pbuf.begin() + (c + 1) * s.WO, pp + dst);
            std::copy(wbuf.begin() + c * s.WO, wbuf.begin() + (c + 1) * s.WO, wp + dst);
            std::copy(zbuf.begin() + c * s.WO, zbuf.begin() + (c + 1) * s.WO, zp + dst);
          }
        }
      });
    }
  });
  return {pooled, window, preact};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_pool2d_backward_general(
    const at::Tensor& grad_pooled, const at::Tensor& window, const at::Tensor& preact, const at::Tensor& input,
    const at::Tensor& weight, int64_t n, int64_t c_in, c10::IntArrayRef input_size, c10::IntArrayRef kernel_size,
    c10::IntArrayRef stride, c10::IntArrayRef padding, int64_t activation, double negative_slope,
    const PoolWindows& pool) {
  at::AutoDispatchBelowADInplaceOrView guard;
  const bool want_x = weight.defined(), want_w = input.defined();
  const int64_t C = grad_pooled.size(1), H = input_size[0], W = input_size[1], KH = kernel_size[0],
                KW = kernel_size[1];
  const EncoderPool s = plane_geometry(n, C, conv_extent(H, KH, stride[0], padding[0]),
                                        conv_extent(W, KW, stride[1], padding[1]), pool);
  TORCH_CHECK(grad_pooled.size(0) == n && grad_pooled.size(2) == s.HO && grad_pooled.size(3) == s.WO,
              "aefast::conv_pool2d backward: grad shape ", grad_pooled.sizes(), " does not match the pool geometry (",
              n, ", ", C, ", ", s.HO, ", ", s.WO, ")");
  const auto acc_dtype = at::toOpMathType(grad_pooled.scalar_type());
  const at::Tensor gr = grad_pooled.contiguous(), win = window.contiguous(), pre = preact.contiguous();
  check_window_offsets(win.const_data_ptr<uint8_t>(), s, n * C);
  // dL/dz channels-last: a cached (N, HC, WC, C) buffer seen as NCHW
  const at::Tensor dz = empty_cpu_cached({n, s.HC, s.WC, C}, grad_pooled.options().dtype(acc_dtype)).permute({0, 3, 1, 2});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gr.scalar_type(), "conv_pool2d_backward_general", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto kern = pick_kernels<scalar_t, acc_t>(activation);
    const acc_t slope = static_cast<acc_t>(negative_slope);
    const int64_t pooled_hw = s.HO * s.WO, image = s.plane() * C;
    at::Tensor gz_t = empty_cpu_cached({n * C * pooled_hw}, grad_pooled.options().dtype(acc_dtype));
    acc_t* gz = gz_t.mutable_data_ptr<acc_t>();
    const scalar_t* gp = gr.const_data_ptr<scalar_t>();
    const scalar_t* zp = pre.const_data_ptr<scalar_t>();
    at::parallel_for(0, n * C, 16, [&](int64_t p0, int64_t p1) {
      kern.window_grads(gp + p0 * pooled_hw, zp + p0 * pooled_hw, (p1 - p0) * pooled_hw, slope, gz + p0 * pooled_hw);
    });
    std::array<int32_t, 256> di{}, dj{};
    for (int64_t k = 0; k < s.PKH * s.PKW; ++k) {
      di[k] = static_cast<int32_t>(k / s.PKW);
      dj[k] = static_cast<int32_t>(k % s.PKW);
    }
    const uint8_t* wp = win.const_data_ptr<uint8_t>();
    acc_t* dp = dz.mutable_data_ptr<acc_t>();
    at::parallel_for(0, n * s.HO, 1, [&](int64_t u0, int64_t u1) {
      for (int64_t u = u0; u < u1; ++u) {
        const int64_t b = u / s.HO, i = u % s.HO, h0 = s.band_begin(i), h1 = s.band_end(i);
        acc_t* band = dp + b * image + h0 * s.WC * C;
        std::fill(band, band + (h1 - h0) * s.WC * C, acc_t(0));
        kern.scatter(gz + b * C * pooled_hw, wp + b * C * pooled_hw, di.data(), dj.data(), s, h0, h1, nullptr, band);
      }
    });
  });
  const at::Tensor x = want_w ? conv_operand(input.to(acc_dtype), s.WC)
                              : at::empty({n, c_in, H, W}, dz.options().memory_format(
                                                               conv_runs_channels_last(c_in, s.WC)
                                                                   ? at::MemoryFormat::ChannelsLast
                                                                   : at::MemoryFormat::Contiguous));
  const at::Tensor w = want_x ? weight.to(acc_dtype) : at::zeros({C, c_in, KH, KW}, dz.options());
  auto [gx, gw, gb] = at::convolution_backward(dz, x, w, c10::IntArrayRef(C), stride, padding, {1, 1}, false, {0, 0}, 1,
                                               {want_x, want_w, want_w});
  const auto dtype = grad_pooled.scalar_type();
  // grad_x in the input's layout (NCHW when only the weight, not the input, was given)
  const auto x_format = want_w ? input.suggest_memory_format() : at::MemoryFormat::Contiguous;
  return {want_x ? in_memory_format(gx.to(dtype), x_format) : at::Tensor(),
          want_w ? gw.to(dtype).contiguous() : at::Tensor(), want_w ? gb.to(dtype) : at::Tensor()};
}

}  // namespace aefast
