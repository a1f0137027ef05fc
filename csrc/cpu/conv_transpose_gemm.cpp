// A transposed convolution (groups 1, dilation 1) as GEMMs on CPU, in two forms (declared in
// aefast/conv_transpose_gemm.h), and the one rule that picks between them and oneDNN
// (conv_transpose_form, below). With input (N, Cb, H, W), weight (Cb, Ca, KH, KW):
//
// 1. col2im form: one GEMM plus a col2im gather. K = KH*KW*Ca:
//   rows  = input as (N*H*W, Cb), channels-last                  (a view, or one transposing copy)
//   W2    = weight permuted to (Cb, KH, KW, Ca), as (Cb, K)
//   cols  = rows @ W2                     (N*H*W, K): cols[(n,i,j), (kh,kw,a)] = sum_b input[n,b,i,j] w[b,a,kh,kw]
//   out[n, a, y, x] = bias[a] + sum over the (i, j, kh, kw) with y = i*sh - ph + kh, x = j*sw - pw + kw
//                     of cols[(n,i,j), (kh,kw,a)]                  (col2im: a gather of KH*KW-long sums)
// which is conv_transpose2d's definition with the sum over b done by the GEMM. A conv's grad_input
// is the same map applied to grad_output with the conv's own (Cout, Cin, KH, KW) weight (Cb = Cout,
// Ca = Cin) and the conv's input size as the output size.
//
// 2. sub-pixel form: one GEMM whose every output entry is one output value (no col2im sums), for
// large strides, where cols above would be (K/s)^2 times the output. Per axis, write the uncropped
// output row o' = y + p as o' = q*s + a with the phase a in [0, s). Input row i reaches o' through
// kernel row u = o' - i*s = (q - i)*s + a, so with d = q - i, D = ceil(K / s) and w zero-padded to
// D*s rows:
//     y'[q*s + a] = sum_{d < D} x[q - d] * w[d*s + a]        (per axis; summed over Cb)
// for q in [0, Q), Q = max(H + D - 1, ceil((p + out) / s)) (x is 0 outside [0, H)). With t = D-1-d,
//   cols   (N*Q*R, Cb*DH*DW):  cols[(n,q,r), (b,th,tw)] = x[n, b, q - (DH-1) + th, r - (DW-1) + tw]
//   taps   (Cb*DH*DW, Ca*SH*SW): taps[(b,th,tw), (a_h,a_w,c)] = w[b, c, (DH-1-th)*SH + a_h, (DW-1-tw)*SW + a_w]
//   phases = cols @ taps,   out[n, c, q*SH + a_h - ph, r*SW + a_w - pw] = bias[c] + phases[(n,q,r), (a_h,a_w,c)]
// (column order (a_h, a_w, c) for a channels-last output, (c, a_h, a_w) for NCHW, so that the one
// pass that interleaves the phases copies runs). It multiplies (D*s/K)^2 times the dense MACs (the
// zero-padded taps: 1 for FCN's k = 2s upsamplers, 16/9 for k3 s2).
// Its backward, with gpre the gradient of out and gph its phases (the inverse pass, 0 outside the
// output):
//   grad_input[n,b,i,j] = sum_{th,tw} (gph @ taps^T)[(n, i+DH-1-th, j+DW-1-tw), (b,th,tw)]
//   grad_W              = cols^T @ gph, its (b,th,tw) x (a_h,a_w,c) entries put back at (b,c,kh,kw)
// and grad_b (the caller's) from gpre.
//
// Why: oneDNN computes a transposed conv with its backward-data primitive, which at small shapes is
// several times slower than its forward of the same multiply-adds. Measured fp32, 1 thread,
// process_time, best of 5 x 200, on the 2-core dev machine under load (Dec 2026), in us:
//   conv 8->16 3x3 s2 p1, N128 8x8 (the conv VAE's encoder): oneDNN forward 89, grad_input 335
//     (channels_last; 214 on a quiet machine); the col2im form alone 50.
//   ConvTranspose2d 16->8 3x3 s2 p1 op1, N128 4x4 -> 8x8 (its decoder): oneDNN forward 408 (NCHW) /
//     358 (channels_last); the col2im form alone 53.
// The sub-pixel form's figures are at its rule (conv_transpose_form).
//
// Order of the sums:
//   col2im form: the GEMM's reduction is over Cb only (MKL's order); each output value then adds its
//     KH*KW-or-fewer terms in a fixed (i, kh, j, kw) order, image by image, onto the bias, so the
//     result does not depend on the number of threads. The col2im runs per image into the output
//     itself when it is channels-last, else into a per-thread image buffer then written with the
//     output's strides.
//   sub-pixel form: each output value is ONE entry of the GEMM, a dot of Cb*DH*DW terms (the padded
//     taps add exact zeros) in MKL's order, plus the bias once; grad_input adds its DH*DW GEMM
//     entries in (th, tw) order; grad_W is one GEMM entry over the N*Q*R positions.
//   oneDNN: its own blocked order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>

#include <cstdlib>
#include <cstring>
#include <vector>

#include "aefast/conv_transpose_gemm.h"
#include "aefast/cpu_buffer_cache.h"
#include "aefast/cpu_isa.h"

namespace aefast {
namespace {

enum class GemmMode { Auto, Col2im, SubPixel, Never };

GemmMode mode_from_env() {
  // Read at each call: tests flip it with monkeypatch; a getenv is ~100 ns.
  const char* v = std::getenv("AEFAST_CONV_TRANSPOSE_GEMM");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return GemmMode::Auto;
  if (std::strcmp(v, "always") == 0) return GemmMode::Col2im;
  if (std::strcmp(v, "subpixel") == 0) return GemmMode::SubPixel;
  if (std::strcmp(v, "never") == 0) return GemmMode::Never;
  TORCH_CHECK(false, "AEFAST_CONV_TRANSPOSE_GEMM must be auto, always or never (always: the col2im form), or "
              "subpixel, got '", v, "'");
}

#define AEFAST_PER_ISA_KERNELS "conv_transpose_gemm_kernels.inc"
#include "per_isa.inc"

template <typename T>
struct Col2imKernels {
  void (*col2im)(const T*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                 int64_t, T*);
  void (*fill)(T*, int64_t, int64_t, const T*);
  void (*planes)(const T*, int64_t, int64_t, T*);
};

template <typename T>
Col2imKernels<T> pick_kernels() {
  switch (cpu_isa()) {
    case Isa::kAvx512: return {avx512::col2im_image<T>, avx512::fill_bias<T>, avx512::to_planes<T>};
    case Isa::kAvx2: return {avx2::col2im_image<T>, avx2::fill_bias<T>, avx2::to_planes<T>};
    default: return {generic::col2im_image<T>, generic::fill_bias<T>, generic::to_planes<T>};
  }
}

// col2im image by image (in parallel; each image's sums in a fixed order): into the output itself
// when it is channels-last, else into a per-thread channels-last image written out as NCHW planes
// (or, for any other strides, element by element).
template <typename scalar_t>
void col2im_images(const scalar_t* __restrict cols, int64_t N, int64_t H, int64_t W, int64_t KH, int64_t KW,
                   int64_t Ca, int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t out_h, int64_t out_w,
                   const scalar_t* __restrict bias, const at::Tensor& out) {
  const Col2imKernels<scalar_t> kern = pick_kernels<scalar_t>();
  const int64_t K = KH * KW * Ca, plane = out_h * out_w, image = plane * Ca;
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  const int64_t sN = out.stride(0), sC = out.stride(1), sH = out.stride(2), sW = out.stride(3);
  const bool channels_last = (Ca == 1 || sC == 1) && (out_w == 1 || sW == Ca) && (out_h == 1 || sH == out_w * Ca);
  const bool nchw = !channels_last && (out_w == 1 || sW == 1) && (out_h == 1 || sH == out_w) && (Ca == 1 || sC == plane);
  const int64_t work = std::max<int64_t>(1, H * W * K);
  at::parallel_for(0, N, std::max<int64_t>(1, 32768 / work), [&](int64_t n0, int64_t n1) {
    std::vector<scalar_t> scratch(channels_last ? 0 : image);
    for (int64_t n = n0; n < n1; ++n) {
      scalar_t* img = channels_last ? op + n * sN : scratch.data();
      kern.fill(img, plane, Ca, bias);
      kern.col2im(cols + n * H * W * K, H, W, KH, KW, Ca, sh, sw, ph, pw, out_h, out_w, img);
      if (nchw) {
        kern.planes(img, plane, Ca, op + n * sN);
      } else if (!channels_last) {
        scalar_t* o = op + n * sN;
        for (int64_t a = 0; a < Ca; ++a)
          for (int64_t y = 0; y < out_h; ++y)
            for (int64_t x = 0; x < out_w; ++x) o[a * sC + y * sH + x * sW] = img[(y * out_w + x) * Ca + a];
      }
    }
  });
}


// ---------------------------------------------------------------- the sub-pixel form

// The shapes of the sub-pixel form (the top of the file): per axis D = ceil(K / s) taps per
// phase and Q phase rows, enough for y' to hold p + out rows.
struct SubPixel {
  int64_t N, Cb, H, W, Ca, KH, KW, sh, sw, ph, pw, out_h, out_w;
  int64_t DH, DW, Q, R;
  int64_t Kc() const { return Cb * DH * DW; }  // the GEMM's reduction
  int64_t Nc() const { return Ca * sh * sw; }  // its columns: every phase of every output channel

  SubPixel(const at::Tensor& input, const at::Tensor& weight, c10::IntArrayRef stride, c10::IntArrayRef padding,
           int64_t out_h_, int64_t out_w_)
      : N(input.size(0)), Cb(input.size(1)), H(input.size(2)), W(input.size(3)), Ca(weight.size(1)),
        KH(weight.size(2)), KW(weight.size(3)), sh(stride[0]), sw(stride[1]), ph(padding[0]), pw(padding[1]),
        out_h(out_h_), out_w(out_w_) {
    DH = (KH + sh - 1) / sh;
    DW = (KW + sw - 1) / sw;
    Q = std::max(H + DH - 1, (ph + out_h + sh - 1) / sh);
    R = std::max(W + DW - 1, (pw + out_w + sw - 1) / sw);
  }
};

// cols (N*Q*R, Cb*DH*DW): cols[(n,q,r), (b,th,tw)] = x[n, b, q-(DH-1)+th, r-(DW-1)+tw], 0 outside
// (the input is small: the large-stride upsamplers' inputs are s^2 times smaller than their outputs).
template <typename T>
at::Tensor subpixel_cols(const at::Tensor& input, const SubPixel& g) {
  at::Tensor cols = empty_cpu_cached({g.N * g.Q * g.R, g.Kc()}, input.options());
  const T* x = input.const_data_ptr<T>();
  T* c = cols.mutable_data_ptr<T>();
  const int64_t sN = input.stride(0), sC = input.stride(1), sH = input.stride(2), sW = input.stride(3);
  const int64_t Kc = g.Kc();
  at::parallel_for(0, g.N * g.Q, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, g.R * Kc)), [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t n = p / g.Q, q = p % g.Q;
      for (int64_t r = 0; r < g.R; ++r) {
        T* row = c + (p * g.R + r) * Kc;
        for (int64_t b = 0; b < g.Cb; ++b)
          for (int64_t th = 0; th < g.DH; ++th) {
            const int64_t i = q - (g.DH - 1) + th;
            for (int64_t tw = 0; tw < g.DW; ++tw) {
              const int64_t j = r - (g.DW - 1) + tw;
              row[(b * g.DH + th) * g.DW + tw] =
                  (i < 0 || i >= g.H || j < 0 || j >= g.W) ? T(0) : x[n * sN + b * sC + i * sH + j * sW];
            }
          }
      }
    }
  });
  return cols;
}

// taps (Cb*DH*DW, Ca*SH*SW) from the weight: rows (b, th, tw), columns (a_h, a_w, c) when
// channels_last, else (c, a_h, a_w); the taps past K are zeros.
at::Tensor subpixel_taps(const at::Tensor& weight, const SubPixel& g, at::ScalarType dtype, bool channels_last) {
  const at::Tensor padded = at::constant_pad_nd(weight.to(dtype), {0, g.DW * g.sw - g.KW, 0, g.DH * g.sh - g.KH})
                                .reshape({g.Cb, g.Ca, g.DH, g.sh, g.DW, g.sw})
                                .flip({2, 4});  // d -> t = D-1-d
  return (channels_last ? padded.permute({0, 2, 4, 3, 5, 1}) : padded.permute({0, 2, 4, 1, 3, 5}))
      .reshape({g.Kc(), g.Nc()});
}

// grad_W (Cb, Ca, KH, KW) from gtaps (Cb*DH*DW, Ca*SH*SW), as subpixel_taps laid it out.
at::Tensor subpixel_weight_grad(const at::Tensor& gtaps, const SubPixel& g, bool channels_last) {
  const at::Tensor t = channels_last ? gtaps.view({g.Cb, g.DH, g.DW, g.sh, g.sw, g.Ca}).permute({0, 5, 1, 3, 2, 4})
                                     : gtaps.view({g.Cb, g.DH, g.DW, g.Ca, g.sh, g.sw}).permute({0, 3, 1, 4, 2, 5});
  return t.flip({2, 4}).reshape({g.Cb, g.Ca, g.DH * g.sh, g.DW * g.sw}).narrow(2, 0, g.KH).narrow(3, 0, g.KW);
}

template <typename T>
struct SubPixelKernels {
  void (*to_row_cl)(const T*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, const T*, T*);
  void (*to_row_nchw)(const T*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, const T*, int64_t, T*);
  void (*from_row_cl)(const T*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                      int64_t, T*);
  void (*from_row_nchw)(const T*, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                        int64_t, T*);
};

template <typename T>
SubPixelKernels<T> pick_subpixel_kernels() {
  switch (cpu_isa()) {
    case Isa::kAvx512:
      return {avx512::phases_to_row_cl<T>, avx512::phases_to_row_nchw<T>, avx512::row_to_phases_cl<T>,
              avx512::row_to_phases_nchw<T>};
    case Isa::kAvx2:
      return {avx2::phases_to_row_cl<T>, avx2::phases_to_row_nchw<T>, avx2::row_to_phases_cl<T>,
              avx2::row_to_phases_nchw<T>};
    default:
      return {generic::phases_to_row_cl<T>, generic::phases_to_row_nchw<T>, generic::row_to_phases_cl<T>,
              generic::row_to_phases_nchw<T>};
  }
}

bool is_channels_last(at::MemoryFormat layout) { return layout == at::MemoryFormat::ChannelsLast; }

// The forward: cols @ taps, then one pass writing every output row from its phase row (+ bias).
at::Tensor subpixel_forward(const at::Tensor& input, const at::Tensor& weight, const at::Tensor& bias,
                            const SubPixel& g, at::MemoryFormat layout) {
  const bool cl = is_channels_last(layout);
  at::Tensor out = empty_cpu_cached({g.N, g.Ca, g.out_h, g.out_w}, input.options(), layout);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv_transpose_subpixel", [&] {
    const at::Tensor cols = subpixel_cols<scalar_t>(input, g);
    at::Tensor phases = empty_cpu_cached({g.N * g.Q * g.R, g.Nc()}, input.options());
    at::mm_out(phases, cols, subpixel_taps(weight, g, input.scalar_type(), cl));
    const SubPixelKernels<scalar_t> kern = pick_subpixel_kernels<scalar_t>();
    const scalar_t* pp = phases.const_data_ptr<scalar_t>();
    const scalar_t* bp = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const int64_t Nc = g.Nc(), plane = g.out_h * g.out_w;
    at::parallel_for(0, g.N * g.out_h, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, g.out_w * g.Ca)),
                     [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t n = p / g.out_h, y = p % g.out_h;
        const int64_t q = (y + g.ph) / g.sh, a = (y + g.ph) % g.sh;
        const scalar_t* ph_row = pp + (n * g.Q + q) * g.R * Nc;
        if (cl)
          kern.to_row_cl(ph_row, Nc, a, g.sw, g.pw, g.out_w, g.Ca, bp, op + (n * plane + y * g.out_w) * g.Ca);
        else
          kern.to_row_nchw(ph_row, Nc, a, g.sh, g.sw, g.pw, g.out_w, g.Ca, bp, plane, op + n * g.Ca * plane + y * g.out_w);
      }
    });
  });
  return out;
}

}  // namespace

// ---------------------------------------------------------------- the rule

// Which form computes a transposed conv here: the one rule, for the forward of conv_transpose_act2d
// and conv_bn_pool2d's grad_input (pass Forward), and for conv_transpose_act2d's backward (pass
// Backward: SubPixel or Vendor, the col2im form has no backward of its own).
// fp32 and fp64 only (the dtypes measured; fp16/bf16 stay on oneDNN, whose reductions are fp32
// throughout).
//   SubPixel: both strides >= kSubPixelMinStride, forward and backward. Measured fp32, 1 thread,
//     process_time, median of 5 interleaved rounds, on the 2-core machine under load (Dec 2026), in
//     us, oneDNN / col2im / sub-pixel (the Python torch-ops form it replaces):
//       FCN-8s upscore8 N16 4->4 k16 s8 12x12 NCHW: forward 5086 / 3355 / 628 (1330; the gather
//         kernel 2806), backward 2268 / - / 1494 (py fwd+bwd 3913); channels-last: forward 4453 /
//         3061 / 864 (888), backward 4564 / - / 1773; with its crop as padding 4: 4855 / 3342 / 696.
//     At stride 2 it lost where it matters (the Python form lost too): U-Net N16 32->16 k2 24x24
//     forward 1360 / 991 / 2117, backward 925 / - / 3710; conv VAE N128 16->8 k3 4x4 forward 410 /
//     119 / 575, backward 191 / - / 909; it won only on FCN's tiny k4 s2 score upsamplers (N16 4->4
//     3x3: backward 87 / - / 39, forward 99 / 20 / 30), tens of us, so no clause for them.
//   Col2im (forward only): the GEMM's output, cols, is KH*KW times the output's channels per input
//     position: past kMaxColsBytes it no longer stays in cache, and the oneDNN forms measured on
//     larger shapes were not slow; so the bound (a fixed size, the same for every thread count).
//   Vendor: the rest.
// AEFAST_CONV_TRANSPOSE_GEMM (read per call) forces a form wherever it can run, for tests and the
// ledger's A/B (bench/bench_kernel_ledger.py): always = col2im (forward; backward on oneDNN),
// subpixel (both passes), never = oneDNN (both).
constexpr int64_t kMaxColsBytes = int64_t(8) << 20;
constexpr int64_t kSubPixelMinStride = 4;

ConvTransposeForm conv_transpose_form(const at::Tensor& input, const at::Tensor& weight, c10::IntArrayRef stride,
                                      ConvTransposePass pass) {
  const GemmMode mode = mode_from_env();
  if (mode == GemmMode::Never) return ConvTransposeForm::Vendor;
  const bool supported = input.device().is_cpu() && input.dim() == 4 && weight.dim() == 4 && input.numel() > 0 &&
                         weight.numel() > 0 && input.size(1) == weight.size(0) && stride.size() == 2 &&
                         input.scalar_type() == weight.scalar_type() &&
                         (input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble);
  if (!supported) return ConvTransposeForm::Vendor;
  const bool backward = pass == ConvTransposePass::Backward;
  switch (mode) {
    case GemmMode::SubPixel: return ConvTransposeForm::SubPixel;
    case GemmMode::Col2im: return backward ? ConvTransposeForm::Vendor : ConvTransposeForm::Col2im;
    default: break;
  }
  if (std::min(stride[0], stride[1]) >= kSubPixelMinStride) return ConvTransposeForm::SubPixel;
  if (backward) return ConvTransposeForm::Vendor;
  const int64_t positions = input.size(0) * input.size(2) * input.size(3);
  const int64_t k = weight.size(1) * weight.size(2) * weight.size(3);
  return positions * k * static_cast<int64_t>(input.element_size()) <= kMaxColsBytes ? ConvTransposeForm::Col2im
                                                                                        : ConvTransposeForm::Vendor;
}

bool conv_transpose_gemm_serves(const at::Tensor& input, const at::Tensor& weight, c10::IntArrayRef stride) {
  return conv_transpose_form(input, weight, stride, ConvTransposePass::Forward) != ConvTransposeForm::Vendor;
}

const char* conv_transpose_form_name(ConvTransposeForm form) {
  switch (form) {
    case ConvTransposeForm::Col2im: return "gemm + col2im";
    case ConvTransposeForm::SubPixel: return "sub-pixel gemm";
    case ConvTransposeForm::Vendor: break;
  }
  return "onednn";
}

at::Tensor conv_transpose_gemm(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               c10::IntArrayRef stride, c10::IntArrayRef padding, int64_t out_h, int64_t out_w,
                               at::MemoryFormat layout) {
  TORCH_CHECK(input.dim() == 4 && weight.dim() == 4 && input.size(1) == weight.size(0) && stride.size() == 2 &&
                  padding.size() == 2 && stride[0] > 0 && stride[1] > 0 && out_h > 0 && out_w > 0,
              "aefast: conv_transpose_gemm needs input (N, Cb, H, W), weight (Cb, Ca, KH, KW), two strides, two "
              "paddings and a positive output size");
  TORCH_CHECK(input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble,
              "aefast: conv_transpose_gemm serves fp32 and fp64 only");
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->to(input.scalar_type()).contiguous() : at::Tensor();
  if (conv_transpose_form(input, weight, stride, ConvTransposePass::Forward) == ConvTransposeForm::SubPixel)
    return subpixel_forward(input, weight, b, SubPixel(input, weight, stride, padding, out_h, out_w), layout);
  const int64_t N = input.size(0), Cb = input.size(1), H = input.size(2), W = input.size(3);
  const int64_t Ca = weight.size(1), KH = weight.size(2), KW = weight.size(3), K = KH * KW * Ca;
  const at::Tensor rows =
      input.contiguous(at::MemoryFormat::ChannelsLast).permute({0, 2, 3, 1}).reshape({N * H * W, Cb});
  const at::Tensor w2 = weight.to(input.scalar_type()).permute({0, 2, 3, 1}).reshape({Cb, K});
  at::Tensor cols = empty_cpu_cached({N * H * W, K}, input.options());
  at::mm_out(cols, rows, w2);
  at::Tensor out = empty_cpu_cached({N, Ca, out_h, out_w}, input.options(), layout);
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv_transpose_gemm", [&] {
    col2im_images<scalar_t>(cols.const_data_ptr<scalar_t>(), N, H, W, KH, KW, Ca, stride[0], stride[1], padding[0],
                            padding[1], out_h, out_w, b.defined() ? b.const_data_ptr<scalar_t>() : nullptr, out);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> conv_transpose_subpixel_backward(const at::Tensor& gpre, const at::Tensor& input,
                                                                    const at::Tensor& weight, c10::IntArrayRef stride,
                                                                    c10::IntArrayRef padding, bool need_input,
                                                                    bool need_weight, at::MemoryFormat layout) {
  TORCH_CHECK(gpre.dim() == 4 && input.dim() == 4 && weight.dim() == 4 && input.size(1) == weight.size(0) &&
                  gpre.size(0) == input.size(0) && gpre.size(1) == weight.size(1) && stride.size() == 2 &&
                  padding.size() == 2 && gpre.scalar_type() == input.scalar_type() &&
                  (input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble),
              "aefast: conv_transpose_subpixel_backward needs gpre (N, Ca, out_h, out_w), input (N, Cb, H, W), "
              "weight (Cb, Ca, KH, KW), fp32 or fp64");
  const SubPixel g(input, weight, stride, padding, gpre.size(2), gpre.size(3));
  const bool cl = is_channels_last(layout);
  at::Tensor grad_input, grad_weight;
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv_transpose_subpixel_backward", [&] {
    // gph: the phases of gpre (the forward's last pass, inverted; 0 outside the output).
    const at::Tensor go = gpre.contiguous(layout);
    at::Tensor gph = empty_cpu_cached({g.N * g.Q * g.R, g.Nc()}, input.options());
    const SubPixelKernels<scalar_t> kern = pick_subpixel_kernels<scalar_t>();
    const scalar_t* gp = go.const_data_ptr<scalar_t>();
    scalar_t* php = gph.mutable_data_ptr<scalar_t>();
    const int64_t Nc = g.Nc(), image = g.Ca * g.out_h * g.out_w;
    at::parallel_for(0, g.N * g.Q, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, g.R * Nc)),
                     [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t n = p / g.Q, q = p % g.Q;
        (cl ? kern.from_row_cl : kern.from_row_nchw)(gp + n * image, q, g.R, Nc, g.sh, g.sw, g.ph, g.pw, g.out_h,
                                                     g.out_w, g.Ca, php + p * g.R * Nc);
      }
    });
    const at::Tensor taps = subpixel_taps(weight, g, input.scalar_type(), cl);
    if (need_input) {
      // gcols = gph @ taps^T, then each input value sums its DH*DW entries in (th, tw) order.
      at::Tensor gcols = empty_cpu_cached({g.N * g.Q * g.R, g.Kc()}, input.options());
      at::mm_out(gcols, gph, taps.t());
      grad_input = empty_cpu_cached(input.sizes(), input.options(), layout);
      const scalar_t* gc = gcols.const_data_ptr<scalar_t>();
      scalar_t* gi = grad_input.mutable_data_ptr<scalar_t>();
      const int64_t sN = grad_input.stride(0), sC = grad_input.stride(1), sH = grad_input.stride(2),
                    sW = grad_input.stride(3), Kc = g.Kc();
      at::parallel_for(0, g.N * g.H, std::max<int64_t>(1, 8192 / std::max<int64_t>(1, g.W * Kc)),
                       [&](int64_t p0, int64_t p1) {
        for (int64_t p = p0; p < p1; ++p) {
          const int64_t n = p / g.H, i = p % g.H;
          for (int64_t j = 0; j < g.W; ++j)
            for (int64_t b = 0; b < g.Cb; ++b) {
              scalar_t acc = 0;
              for (int64_t th = 0; th < g.DH; ++th)
                for (int64_t tw = 0; tw < g.DW; ++tw)
                  acc += gc[((n * g.Q + i + g.DH - 1 - th) * g.R + j + g.DW - 1 - tw) * Kc + (b * g.DH + th) * g.DW + tw];
              gi[n * sN + b * sC + i * sH + j * sW] = acc;
            }
        }
      });
    }
    if (need_weight) {
      // grad_W = cols^T @ gph (cols recomputed: the input is small).
      const at::Tensor cols = subpixel_cols<scalar_t>(input, g);
      const at::Tensor gtaps = at::mm(cols.t(), gph);
      grad_weight = subpixel_weight_grad(gtaps, g, cl).contiguous(layout).to(weight.scalar_type());
    }
  });
  return {grad_input, grad_weight};
}

}  // namespace aefast
