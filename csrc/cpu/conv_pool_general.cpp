// The encoder block with a general pool (conv_pool_general.h): vendor conv + fused pool epilogue,
// and a gather-free backward through the vendor conv backward.
//
// Forward, with z = conv2d(x, w, b) (N, Cout, HC, WC) by at::convolution (oneDNN; half types
// computed in fp32 as the tiling path does), a = act(z), and pool windows of (PKH, PKW) starting
// at (i*SPH, j*SPW), clipped to the conv output (ceil_mode's last window may hang over the edge;
// torch's size rule guarantees it starts inside):
//   pooled[n,co,i,j] = max over the window's in-bounds (r, c), row-major, of a[n,co,r,c]
//   window[n,co,i,j] = (r - i*SPH)*PKW + (c - j*SPW) of the first maximum (torch's rule:
//                      `v > best || isnan(v)` replaces it), i.e. the row-major offset inside the
//                      FULL (PKH, PKW) window, also for a clipped one
//   preact[n,co,i,j] = z at that position
// z and act(z) are rounded to the tensor dtype before they are compared, as eager rounds them.
// The conv output is a temporary: only pooled-size tensors are returned.
//
// Backward. With gz = grad_pooled * act'(preact) (pooled-size) and pos(n,co,i,j) the conv
// position its window offset names,
//   dL/dz[n,co,r,c] = sum over the windows (i, j) whose argmax is (r, c) of gz[n,co,i,j]
// which is the sum over overlapping windows: one conv position can be the maximum of up to
// ceil(PKH/SPH)*ceil(PKW/SPW) windows. Each (n, co) plane is accumulated by one thread in
// pooled row-major order (in the accumulation type), so the result is deterministic and does not
// depend on the thread count. dL/dz is then handed to at::convolution_backward for grad_x, grad_w
// and grad_b (sum of dL/dz). Unlike the tiling path, dL/dz is materialised at conv resolution.
#include "conv_pool_general.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include "aefast/conv_pool.h"

namespace aefast {

namespace {

struct PlaneGeom {
  int64_t HC, WC, HO, WO;
};

PlaneGeom plane_geometry(int64_t hc, int64_t wc, const PoolWindows& p) {
  TORCH_CHECK(p.kh > 0 && p.kw > 0 && p.sh > 0 && p.sw > 0 && p.kh * p.kw <= 255,
              "aefast::conv_pool2d: pool_size and pool_stride must be positive, at most 255 elements in a window");
  TORCH_CHECK(hc >= p.kh && wc >= p.kw, "aefast::conv_pool2d: the conv output ", hc, "x", wc,
              " is smaller than the pool window");
  return {hc, wc, pool_out_extent(hc, p.kh, p.sh, p.ceil_mode), pool_out_extent(wc, p.kw, p.sw, p.ceil_mode)};
}

int64_t conv_extent(int64_t in, int64_t k, int64_t s, int64_t pad) { return (in + 2 * pad - k) / s + 1; }

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_pool2d_forward_general(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias, c10::IntArrayRef stride,
    c10::IntArrayRef padding, int64_t activation, double negative_slope, const PoolWindows& pool) {
  at::AutoDispatchBelowADInplaceOrView guard;  // the conv is a step of this kernel
  const auto acc_dtype = at::toOpMathType(input.scalar_type());
  std::optional<at::Tensor> bias_acc;
  if (bias.has_value() && bias->defined()) bias_acc = bias->to(acc_dtype);
  const at::Tensor z = at::convolution(input.to(acc_dtype), weight.to(acc_dtype), bias_acc, stride, padding, {1, 1},
                                       false, {0, 0}, 1)
                           .contiguous();
  const int64_t N = z.size(0), C = z.size(1);
  const PlaneGeom g = plane_geometry(z.size(2), z.size(3), pool);
  at::Tensor pooled = at::empty({N, C, g.HO, g.WO}, input.options());
  at::Tensor window = at::empty({N, C, g.HO, g.WO}, input.options().dtype(at::kByte));
  at::Tensor preact = at::empty({N, C, g.HO, g.WO}, input.options());
  if (pooled.numel() == 0) return {pooled, window, preact};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "conv_pool2d_forward_general", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* zp = z.const_data_ptr<acc_t>();
    scalar_t* pp = pooled.mutable_data_ptr<scalar_t>();
    uint8_t* wp = window.mutable_data_ptr<uint8_t>();
    scalar_t* prp = preact.mutable_data_ptr<scalar_t>();
    const acc_t slope = static_cast<acc_t>(negative_slope);
    const int act = static_cast<int>(activation);
    const int64_t plane_in = g.HC * g.WC, plane_out = g.HO * g.WO;
    at::parallel_for(0, N * C, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t plane = p0; plane < p1; ++plane) {
        const acc_t* zc = zp + plane * plane_in;
        for (int64_t i = 0; i < g.HO; ++i) {
          const int64_t r0 = i * pool.sh, r1 = std::min(r0 + pool.kh, g.HC);
          for (int64_t j = 0; j < g.WO; ++j) {
            const int64_t c0 = j * pool.sw, c1 = std::min(c0 + pool.kw, g.WC);
            acc_t best = 0, best_z = 0;
            int off = -1;
            for (int64_t r = r0; r < r1; ++r)
              for (int64_t c = c0; c < c1; ++c) {
                const acc_t zv = static_cast<acc_t>(static_cast<scalar_t>(zc[r * g.WC + c]));
                const acc_t a = static_cast<acc_t>(static_cast<scalar_t>(activate<acc_t>(zv, act, slope)));
                if (off < 0 || pool_takes(a, best)) {
                  best = a;
                  best_z = zv;
                  off = static_cast<int>((r - r0) * pool.kw + (c - c0));
                }
              }
            const int64_t q = plane * plane_out + i * g.WO + j;
            pp[q] = static_cast<scalar_t>(best);
            wp[q] = static_cast<uint8_t>(off);
            prp[q] = static_cast<scalar_t>(best_z);
          }
        }
      }
    });
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
  const PlaneGeom g = plane_geometry(conv_extent(H, KH, stride[0], padding[0]), conv_extent(W, KW, stride[1], padding[1]),
                                     pool);
  TORCH_CHECK(grad_pooled.size(0) == n && grad_pooled.size(2) == g.HO && grad_pooled.size(3) == g.WO,
              "aefast::conv_pool2d backward: grad shape ", grad_pooled.sizes(), " does not match the pool geometry (",
              n, ", ", C, ", ", g.HO, ", ", g.WO, ")");
  const auto acc_dtype = at::toOpMathType(grad_pooled.scalar_type());
  const at::Tensor gr = grad_pooled.contiguous(), win = window.contiguous(), pre = preact.contiguous();
  at::Tensor dz = at::zeros({n, C, g.HC, g.WC}, grad_pooled.options().dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gr.scalar_type(), "conv_pool2d_backward_general", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = gr.const_data_ptr<scalar_t>();
    const scalar_t* zp = pre.const_data_ptr<scalar_t>();
    const uint8_t* wp = win.const_data_ptr<uint8_t>();
    acc_t* dp = dz.mutable_data_ptr<acc_t>();
    const acc_t slope = static_cast<acc_t>(negative_slope);
    const int act = static_cast<int>(activation);
    const int64_t plane_in = g.HC * g.WC, plane_out = g.HO * g.WO;
    at::parallel_for(0, n * C, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t plane = p0; plane < p1; ++plane) {
        acc_t* dc = dp + plane * plane_in;
        for (int64_t i = 0; i < g.HO; ++i)
          for (int64_t j = 0; j < g.WO; ++j) {
            const int64_t q = plane * plane_out + i * g.WO + j;
            const int64_t off = wp[q], r = i * pool.sh + off / pool.kw, c = j * pool.sw + off % pool.kw;
            TORCH_CHECK(off < pool.kh * pool.kw && r < g.HC && c < g.WC,
                        "aefast::conv_pool2d backward: window offset ", off, " at pooled position (", i, ", ", j,
                        ") is outside its window or the conv output");
            // gz rounded to the tensor dtype, as eager rounds the activation's gradient.
            const acc_t gz = static_cast<acc_t>(static_cast<scalar_t>(
                static_cast<acc_t>(gp[q]) * activation_grad<acc_t>(static_cast<acc_t>(zp[q]), act, slope)));
            dc[r * g.WC + c] += gz;
          }
      }
    });
  });
  const at::Tensor x = want_w ? input.to(acc_dtype) : at::empty({n, c_in, H, W}, dz.options());
  const at::Tensor w = want_x ? weight.to(acc_dtype) : at::zeros({C, c_in, KH, KW}, dz.options());
  auto [gx, gw, gb] = at::convolution_backward(dz, x, w, c10::IntArrayRef(C), stride, padding, {1, 1}, false, {0, 0}, 1,
                                               {want_x, want_w, want_w});
  const auto dtype = grad_pooled.scalar_type();
  return {want_x ? gx.to(dtype) : at::Tensor(), want_w ? gw.to(dtype) : at::Tensor(),
          want_w ? gb.to(dtype) : at::Tensor()};
}

}  // namespace aefast
