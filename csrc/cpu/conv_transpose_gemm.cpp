// A transposed convolution (groups 1, dilation 1) as one GEMM plus a col2im gather (declared in
// aefast/conv_transpose_gemm.h). With input (N, Cb, H, W), weight (Cb, Ca, KH, KW), K = KH*KW*Ca:
//
//   rows  = input as (N*H*W, Cb), channels-last                  (a view, or one transposing copy)
//   W2    = weight permuted to (Cb, KH, KW, Ca), as (Cb, K)
//   cols  = rows @ W2                     (N*H*W, K): cols[(n,i,j), (kh,kw,a)] = sum_b input[n,b,i,j] w[b,a,kh,kw]
//   out[n, a, y, x] = bias[a] + sum over the (i, j, kh, kw) with y = i*sh - ph + kh, x = j*sw - pw + kw
//                     of cols[(n,i,j), (kh,kw,a)]                  (col2im: a gather of KH*KW-long sums)
//
// which is conv_transpose2d's definition with the sum over b done by the GEMM. A conv's grad_input
// is the same map applied to grad_output with the conv's own (Cout, Cin, KH, KW) weight (Cb = Cout,
// Ca = Cin) and the conv's input size as the output size.
//
// Why: oneDNN computes both of these with its backward-data primitive, which at small shapes is
// several times slower than its forward of the same multiply-adds. Measured fp32, 1 thread,
// process_time, best of 5 x 200, on the 2-core dev machine under load (Dec 2026), in us:
//   conv 8->16 3x3 s2 p1, N128 8x8 (the conv VAE's encoder): oneDNN forward 89, grad_input 335
//     (channels_last; 214 on a quiet machine); this GEMM alone 50.
//   ConvTranspose2d 16->8 3x3 s2 p1 op1, N128 4x4 -> 8x8 (its decoder): oneDNN forward 408 (NCHW) /
//     358 (channels_last); this GEMM alone 53.
// (the rows of the rule below: conv_transpose_gemm_serves).
//
// Order of the sums: the GEMM's reduction is over Cb only; each output value then adds its
// KH*KW-or-fewer terms in a fixed (i, kh, j, kw) order, image by image, so the result does not
// depend on the number of threads. The col2im runs per image into the output itself when it is
// channels-last, else into a per-thread image buffer that is then written with the output's strides.
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

// The rule (fp32 and fp64: the dtypes measured; fp16/bf16 stay on oneDNN, whose reductions are
// fp32 throughout). The GEMM's output, cols, is KH*KW times the output's channels per input
// position: past kMaxColsBytes it no longer stays in cache, and the oneDNN forms measured on
// larger shapes were not slow; so the bound (a fixed size, the same for every thread count).
constexpr int64_t kMaxColsBytes = int64_t(8) << 20;

enum class GemmMode { Auto, Always, Never };

GemmMode mode_from_env() {
  // Read at each call: tests flip it with monkeypatch; a getenv is ~100 ns.
  const char* v = std::getenv("AEFAST_CONV_TRANSPOSE_GEMM");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return GemmMode::Auto;
  if (std::strcmp(v, "always") == 0) return GemmMode::Always;
  if (std::strcmp(v, "never") == 0) return GemmMode::Never;
  TORCH_CHECK(false, "AEFAST_CONV_TRANSPOSE_GEMM must be auto, always or never, got '", v, "'");
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

}  // namespace

bool conv_transpose_gemm_serves(const at::Tensor& input, const at::Tensor& weight) {
  const GemmMode mode = mode_from_env();
  if (mode == GemmMode::Never) return false;
  const bool supported = input.device().is_cpu() && input.dim() == 4 && weight.dim() == 4 && input.numel() > 0 &&
                         weight.numel() > 0 && input.size(1) == weight.size(0) &&
                         input.scalar_type() == weight.scalar_type() &&
                         (input.scalar_type() == at::kFloat || input.scalar_type() == at::kDouble);
  if (!supported) return false;
  if (mode == GemmMode::Always) return true;
  const int64_t positions = input.size(0) * input.size(2) * input.size(3);
  const int64_t k = weight.size(1) * weight.size(2) * weight.size(3);
  return positions * k * static_cast<int64_t>(input.element_size()) <= kMaxColsBytes;
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
  const int64_t N = input.size(0), Cb = input.size(1), H = input.size(2), W = input.size(3);
  const int64_t Ca = weight.size(1), KH = weight.size(2), KW = weight.size(3), K = KH * KW * Ca;
  const at::Tensor rows =
      input.contiguous(at::MemoryFormat::ChannelsLast).permute({0, 2, 3, 1}).reshape({N * H * W, Cb});
  const at::Tensor w2 = weight.to(input.scalar_type()).permute({0, 2, 3, 1}).reshape({Cb, K});
  at::Tensor cols = empty_cpu_cached({N * H * W, K}, input.options());
  at::mm_out(cols, rows, w2);
  at::Tensor out = empty_cpu_cached({N, Ca, out_h, out_w}, input.options(), layout);
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->to(input.scalar_type()).contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "conv_transpose_gemm", [&] {
    col2im_images<scalar_t>(cols.const_data_ptr<scalar_t>(), N, H, W, KH, KW, Ca, stride[0], stride[1], padding[0],
                            padding[1], out_h, out_w, b.defined() ? b.const_data_ptr<scalar_t>() : nullptr, out);
  });
  return out;
}

}  // namespace aefast
