#pragma once
// Per-element bodies of the CUDA backend's "vendor GEMM + aefast gather" algorithm
// (csrc/include/aefast/gemm_gather_host.h drives them; csrc/cuda/*.cu launch them, one thread per
// element; csrc/cpu/emulate_cuda_bodies.cpp runs the very same bodies on the CPU for the tests).
// Free of torch headers: each body is a small struct whose AEFAST_HD operator()(e) handles
// element e of its index space, so the same code is a __device__ function under nvcc and an
// inline host function elsewhere.
//
// Window-major rows. A pool-sparse map (one nonzero per pool window and channel, at the argmax)
// is never stored as an unpooled (N, C, UH, UW) tensor. Instead the GEMM operands are indexed by
// rows r = ((n*HP + ph)*WP + pw)*P + o, one row per window (ph, pw) and window offset
// o = i*pool_w + j (P = pool_h*pool_w), i.e. the unpooled position (ph*pool_h + i, pw*pool_w + j):
//   unpool rows  A[r, c] = z[n, c, ph, pw] if channel c's argmax in window (ph, pw) is o, else 0,
//                stored transposed, At (C, rows), so that consecutive threads read one z value
//                P times and write consecutive rows
//   im2col rows  G[r, (c, kh, kw)] = src[n, c, h*S - pad + kh, w*S - pad + kw] (0 outside),
//                (h, w) the unpooled position of row r
// GEMM results are asked for with rows as the contiguous dimension (cols^T = W2d^T @ At, R^T =
// W2d @ G^T), so the gathers below read consecutive rows for consecutive output columns.
// Why offsets are rows and not one row per window: the argmax differs per channel, so the
// channel sum sum_c z[c] * W[c, :] of one window mixes values that sit at P different unpooled
// positions. Splitting the rows by offset is what makes the product a plain GEMM; the GEMM's
// FLOPs are then those of the dense transposed conv on the unpooled map (P times the pool-sparse
// ones), spent on tensor cores instead of a scalar gather over the nonzeros.
#include <cmath>
#include <cstdint>

#include "aefast/common.h"
#include "aefast/conv_pool.h"
#include "aefast/corruption.h"
#include "aefast/unpool_deconv.h"

namespace aefast {

// ------------------------------------------------------------------ shared geometry

struct WindowRows {
  int64_t channels;            // C of the pooled tensor
  int64_t pooled_h, pooled_w;  // HP, WP
  int64_t pool_h, pool_w;      // window = stride
  int64_t unpooled_h, unpooled_w;
  AEFAST_HD int64_t offsets() const { return pool_h * pool_w; }
  AEFAST_HD int64_t rows_per_image() const { return pooled_h * pooled_w * pool_h * pool_w; }
  // Row r (counted from the first image of a chunk) -> image in chunk, window and offset.
  AEFAST_HD void decode(int64_t r, int64_t& n, int64_t& ph, int64_t& pw, int64_t& o) const {
    const int64_t P = offsets();
    o = r % P;
    const int64_t win = r / P;
    pw = win % pooled_w;
    ph = (win / pooled_w) % pooled_h;
    n = win / (pooled_w * pooled_h);
  }
  AEFAST_HD int64_t row(int64_t n, int64_t ph, int64_t pw, int64_t o) const {
    return ((n * pooled_h + ph) * pooled_w + pw) * offsets() + o;
  }
};

// The window offset an index names, or -1 when it names no position of window (ph, pw) inside
// the unpooled plane (such an entry contributes nothing, as in the fused kernels before).
//   window format: the uint8 offset itself;  flat format: h*UW + w in the unpooled plane.
AEFAST_HD int64_t window_offset_of(int64_t raw, bool flat, int64_t ph, int64_t pw, const WindowRows& g) {
  int64_t i, j;
  if (flat) {
    if (raw < 0 || raw >= g.unpooled_h * g.unpooled_w) return -1;
    i = raw / g.unpooled_w - ph * g.pool_h;
    j = raw % g.unpooled_w - pw * g.pool_w;
    if (i < 0 || i >= g.pool_h || j < 0 || j >= g.pool_w) return -1;
  } else {
    if (raw < 0 || raw >= g.offsets()) return -1;
    i = raw / g.pool_w;
    j = raw - i * g.pool_w;
    if (ph * g.pool_h + i >= g.unpooled_h || pw * g.pool_w + j >= g.unpooled_w) return -1;
  }
  return i * g.pool_w + j;
}

// Batch chunking, the one rule every GEMM-form path uses: as many images as keep the chunk's
// per-image bytes (its GEMM operands and result) under `budget` (about the L2 on the GPU), at least one.
inline int64_t images_per_chunk(int64_t bytes_per_image, int64_t n, int64_t budget) {
  const int64_t per = bytes_per_image > 0 ? bytes_per_image : 1;
  int64_t c = budget / per;
  if (c < 1) c = 1;
  return c < n ? c : (n > 0 ? n : 1);
}

// ------------------------------------------------------------------ GEMM operand builders

// At = unpool rows of z for chunk images [n0, n0 + count), transposed: (C, rows), e = c*rows + r.
template <typename src_t, typename index_t, typename dst_t>
struct UnpoolRowsBody {
  const src_t* z;        // (N, C, HP, WP) contiguous
  const index_t* index;  // same shape: uint8 window offsets or int64 flat positions
  dst_t* out;            // (C, rows), rows = count*rows_per_image
  WindowRows g;
  int64_t rows;
  int64_t n0;
  bool flat;
  AEFAST_HD void operator()(int64_t e) const {
    const int64_t r = e % rows, c = e / rows;
    int64_t n, ph, pw, o;
    g.decode(r, n, ph, pw, o);
    const int64_t k = (((n0 + n) * g.channels + c) * g.pooled_h + ph) * g.pooled_w + pw;
    const bool hit = window_offset_of(static_cast<int64_t>(index[k]), flat, ph, pw, g) == o;
    out[e] = hit ? static_cast<dst_t>(z[k]) : dst_t(0);
  }
};

// G = im2col rows of src at each unpooled position (transposed-conv output / conv input
// position h*stride - pad + k); e = r*(C*KH*KW) + (c*KH + kh)*KW + kw. `noise`, when active,
// corrupts each src element as it is read (the encoder's denoising input; key = its logical
// NCHW index, so the values equal those the forward convolved).
template <typename src_t, typename acc_t, typename dst_t>
struct Im2colRowsBody {
  const src_t* src;  // (N, C, SH, SW) contiguous
  dst_t* out;
  WindowRows g;      // g.channels unused here
  int64_t src_c, src_h, src_w;
  int64_t kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w;
  int64_t n0;
  ElementCorruption<src_t, acc_t> noise;
  AEFAST_HD void operator()(int64_t e) const {
    const int64_t cols = src_c * kernel_h * kernel_w;
    const int64_t col = e % cols, r = e / cols;
    const int64_t kw = col % kernel_w, kh = (col / kernel_w) % kernel_h, c = col / (kernel_w * kernel_h);
    int64_t n, ph, pw, o;
    g.decode(r, n, ph, pw, o);
    const int64_t h = ph * g.pool_h + o / g.pool_w, w = pw * g.pool_w + o % g.pool_w;
    const int64_t y = h * stride_h - pad_h + kh, x = w * stride_w - pad_w + kw;
    dst_t v = dst_t(0);
    if (y >= 0 && y < src_h && x >= 0 && x < src_w) {
      const int64_t i = (((n0 + n) * src_c + c) * src_h + y) * src_w + x;
      v = static_cast<dst_t>(noise.active() ? noise(src[i], static_cast<uint64_t>(i)) : src[i]);
    }
    out[e] = v;
  }
};

// ------------------------------------------------------------------ decoder

// Forward epilogue (gather-col2im): colsT = W2d^T @ At, (Cout*KH*KW, rows) for the chunk. Output
// (n, co, oy, ox) sums, in tap order (kh, kw), the column entry of the one unpooled position each
// tap reaches: h = (oy + pad - kh) / stride when divisible, inside the plane and a pooled window
// (rows past HP*pool_h feed nothing, as max_unpool2d never writes them). Then bias and act.
// No atomics: each output has one owner thread and a fixed summation order.
template <typename scalar_t, typename acc_t>
struct DecoderCol2imBody {
  const acc_t* cols;      // (Cout*KH*KW, rows): entry (col, row) at col*rows_ld + row
  int64_t rows_ld;
  const scalar_t* bias;  // nullptr: none
  scalar_t* out;         // whole (N, Cout, OH, OW)
  scalar_t* pre;         // nullptr unless the activation's backward needs it
  WindowRows rows;
  DecoderGeometry g;
  int64_t n0;
  DecoderAct act;
  acc_t slope;
  AEFAST_HD void operator()(int64_t e) const {
    const int64_t ox = e % g.out_w, oy = (e / g.out_w) % g.out_h, co = (e / (g.out_w * g.out_h)) % g.c_out,
                  n = e / (g.out_w * g.out_h * g.c_out);
    acc_t acc = bias ? static_cast<acc_t>(bias[co]) : acc_t(0);
    for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
      const int64_t hn = oy + g.pad_h - kh;
      if (hn < 0 || hn % g.stride_h) continue;
      const int64_t h = hn / g.stride_h, ph = h / g.pool_h;
      if (h >= g.unpooled_h || ph >= g.pooled_h) continue;
      for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
        const int64_t wn = ox + g.pad_w - kw;
        if (wn < 0 || wn % g.stride_w) continue;
        const int64_t w = wn / g.stride_w, pw = w / g.pool_w;
        if (w >= g.unpooled_w || pw >= g.pooled_w) continue;
        const int64_t o = (h - ph * g.pool_h) * g.pool_w + (w - pw * g.pool_w);
        acc += cols[((co * g.kernel_h + kh) * g.kernel_w + kw) * rows_ld + rows.row(n, ph, pw, o)];
      }
    }
    const int64_t dst = e + n0 * g.c_out * g.out_h * g.out_w;
    if (pre) pre[dst] = static_cast<scalar_t>(acc);
    out[dst] = static_cast<scalar_t>(act_forward<acc_t>(acc, act, slope));
  }
};

// Backward: gpre = grad_out * act'(act_input), rounded to dst_t (the GEMM operand type; eager's
// activation backward rounds there too).
template <typename scalar_t, typename acc_t, typename dst_t>
struct DecoderActGradBody {
  const scalar_t* grad_out;
  const scalar_t* act_input;
  dst_t* gpre;
  DecoderAct act;
  acc_t slope;
  AEFAST_HD void operator()(int64_t e) const {
    gpre[e] = static_cast<dst_t>(static_cast<acc_t>(grad_out[e]) *
                                 act_derivative<acc_t>(static_cast<acc_t>(act_input[e]), act, slope));
  }
};

// grad_z[n, c, ph, pw] = R[row of its argmax, c], R^T = W2d @ G^T (Cin, rows) for the chunk; an
// entry whose index names no position of its window gets 0 (it contributed nothing forward).
template <typename acc_t, typename index_t, typename scalar_t>
struct SelectRowsBody {
  const acc_t* r_mat;  // (C, rows): entry (c, row) at c*rows_ld + row
  int64_t rows_ld;
  const index_t* index;
  scalar_t* grad;  // whole (N, C, HP, WP)
  WindowRows g;
  int64_t n0;
  bool flat;
  AEFAST_HD void operator()(int64_t e) const {
    const int64_t pw = e % g.pooled_w, ph = (e / g.pooled_w) % g.pooled_h, c = (e / (g.pooled_w * g.pooled_h)) % g.channels,
                  n = e / (g.pooled_w * g.pooled_h * g.channels);
    const int64_t dst = e + n0 * g.channels * g.pooled_h * g.pooled_w;
    const int64_t o = window_offset_of(static_cast<int64_t>(index[dst]), flat, ph, pw, g);
    grad[dst] = o < 0 ? scalar_t(0) : static_cast<scalar_t>(r_mat[c * rows_ld + g.row(n, ph, pw, o)]);
  }
};

// ------------------------------------------------------------------ encoder

struct EncoderGeometry {
  int64_t N, Cin, H, W, Cout, KH, KW, SH, SW, PH, PW, PKH, PKW, HC, WC, HO, WO;
};

// The pooling rule over the P window offsets of window (pr, pc), given z at offset k: a = act(z)
// rounded to scalar_t where eager rounds it (z is already the scalar_t conv output); offset 0
// always seeds the running maximum (so a window whose activations are all -inf stores offset 0's
// z, as the CPU does), then torch's rule `a > best || isnan(a)`: the first maximum wins, a NaN
// wins. Offsets past the conv output (a ceil_mode window clipped at its edge) are skipped; offset
// 0 always lies inside (torch's rule: the last window starts inside).
template <typename scalar_t, typename acc_t, typename ZAt>
AEFAST_HD void pool_window(const EncoderGeometry& g, int64_t pr, int64_t pc, const ZAt& z_at, int act, acc_t slope,
                           acc_t& best, acc_t& best_z, int& best_k) {
  const int P = static_cast<int>(g.PKH * g.PKW);
  for (int k = 0; k < P; ++k) {
    if (pr * g.PKH + k / g.PKW >= g.HC || pc * g.PKW + k % g.PKW >= g.WC) continue;
    const acc_t z = z_at(k / g.PKW, k % g.PKW);
    const acc_t a = static_cast<acc_t>(static_cast<scalar_t>(activate<acc_t>(z, act, slope)));
    if (k == 0 || pool_takes(a, best)) {
      best = a;
      best_z = z;
      best_k = k;
    }
  }
}

// Fused epilogue after the vendor conv (bias included by the conv): one pooled output per element.
template <typename scalar_t, typename acc_t>
struct EncoderEpilogueBody {
  const scalar_t* conv;  // (N, Cout, HC, WC) with strides cs (any memory format)
  int64_t cs[4];
  EncoderGeometry g;
  int act;
  acc_t slope;
  scalar_t* pooled;
  uint8_t* window;
  scalar_t* preact;
  int64_t n0;  // the conv holds images [n0, n0 + chunk); outputs are whole tensors
  AEFAST_HD void operator()(int64_t e) const {
    const int64_t pc = e % g.WO, pr = (e / g.WO) % g.HO, co = (e / (g.WO * g.HO)) % g.Cout,
                  n = e / (g.WO * g.HO * g.Cout);
    const scalar_t* base = conv + n * cs[0] + co * cs[1];
    const auto z_at = [&](int64_t i, int64_t j) {
      return static_cast<acc_t>(base[(pr * g.PKH + i) * cs[2] + (pc * g.PKW + j) * cs[3]]);
    };
    acc_t best = 0, best_z = 0;
    int best_k = 0;
    pool_window<scalar_t, acc_t>(g, pr, pc, z_at, act, slope, best, best_z, best_k);
    const int64_t dst = e + n0 * g.Cout * g.HO * g.WO;
    pooled[dst] = static_cast<scalar_t>(best);
    window[dst] = static_cast<uint8_t>(best_k);
    preact[dst] = static_cast<scalar_t>(best_z);
  }
};

// Direct conv + epilogue for short reductions (K = Cin*KH*KW below encoder_uses_vendor_conv's
// threshold): z = round(b + sum_{ci,ki,kj} w * x) per window offset, in the accumulation type.
template <typename scalar_t, typename acc_t>
struct EncoderDirectBody {
  const scalar_t* x;  // (N, Cin, H, W) contiguous
  const scalar_t* w;  // (Cout, Cin, KH, KW) contiguous
  const scalar_t* b;  // nullptr: none
  EncoderGeometry g;
  int act;
  acc_t slope;
  ElementCorruption<scalar_t, acc_t> noise;
  scalar_t* pooled;
  uint8_t* window;
  scalar_t* preact;
  AEFAST_HD void operator()(int64_t e) const {
    const int64_t pc = e % g.WO, pr = (e / g.WO) % g.HO, co = (e / (g.WO * g.HO)) % g.Cout,
                  n = e / (g.WO * g.HO * g.Cout);
    const acc_t bias = b != nullptr ? static_cast<acc_t>(b[co]) : acc_t(0);
    const auto z_at = [&](int64_t i, int64_t j) {
      const int64_t y0 = (pr * g.PKH + i) * g.SH - g.PH, x0 = (pc * g.PKW + j) * g.SW - g.PW;
      acc_t acc = 0;
      for (int64_t ci = 0; ci < g.Cin; ++ci) {
        const int64_t plane = (n * g.Cin + ci) * g.H * g.W;
        const scalar_t* wp = w + (co * g.Cin + ci) * g.KH * g.KW;
        for (int64_t ki = 0; ki < g.KH; ++ki) {
          const int64_t y = y0 + ki;
          if (y < 0 || y >= g.H) continue;
          for (int64_t kj = 0; kj < g.KW; ++kj) {
            const int64_t xx = x0 + kj;
            if (xx < 0 || xx >= g.W) continue;
            const int64_t xi = plane + y * g.W + xx;
            const scalar_t xv = noise.active() ? noise(x[xi], static_cast<uint64_t>(xi)) : x[xi];
            acc += static_cast<acc_t>(xv) * static_cast<acc_t>(wp[ki * g.KW + kj]);
          }
        }
      }
      return static_cast<acc_t>(static_cast<scalar_t>(acc + bias));
    };
    acc_t best = 0, best_z = 0;
    int best_k = 0;
    pool_window<scalar_t, acc_t>(g, pr, pc, z_at, act, slope, best, best_z, best_k);
    pooled[e] = static_cast<scalar_t>(best);
    window[e] = static_cast<uint8_t>(best_k);
    preact[e] = static_cast<scalar_t>(best_z);
  }
};

// corrupt(x) for the images of one chunk (the vendor conv's operand when denoising): element e of
// the chunk is logical element e + offset of x.
template <typename scalar_t, typename acc_t>
struct CorruptChunkBody {
  const scalar_t* x;
  scalar_t* out;
  int64_t offset;
  ElementCorruption<scalar_t, acc_t> noise;
  AEFAST_HD void operator()(int64_t e) const {
    const int64_t i = e + offset;
    out[e] = noise(x[i], static_cast<uint64_t>(i));
  }
};

// gz = grad_pooled * act'(z at the argmax), rounded to dst_t (eager rounds the activation's
// backward there before the conv backward).
template <typename scalar_t, typename acc_t, typename dst_t>
struct EncoderActGradBody {
  const scalar_t* grad;
  const scalar_t* preact;
  dst_t* gz;
  int act;
  acc_t slope;
  AEFAST_HD void operator()(int64_t e) const {
    gz[e] = static_cast<dst_t>(static_cast<acc_t>(grad[e]) *
                               activation_grad<acc_t>(static_cast<acc_t>(preact[e]), act, slope));
  }
};

// ------------------------------------------------------------------ drop-in max_pool2d

struct MaxPoolArgs {
  int64_t N, C, H, W, OH, OW, KH, KW, SH, SW, PH, PW, DH, DW;
  int64_t xs[4], os[4];  // input and output strides (any memory format)
};

// One pooled output per element: torch's scan of the (dilated, padded) window, row-major, with
// `v > best || isnan(v)`, the running maximum seeded with -inf at the window's first in-plane
// position (as torch's kernels), flat index h*W + w of the unpadded plane.
template <typename scalar_t, typename acc_t>
struct MaxPoolForwardBody {
  const scalar_t* x;
  MaxPoolArgs a;
  scalar_t* out;
  int64_t* idx;
  AEFAST_HD void operator()(int64_t e) const {
    const int64_t ow = e % a.OW, oh = (e / a.OW) % a.OH, c = (e / (a.OW * a.OH)) % a.C, n = e / (a.OW * a.OH * a.C);
    int64_t h0 = oh * a.SH - a.PH, w0 = ow * a.SW - a.PW;
    const int64_t h_end = h0 + (a.KH - 1) * a.DH + 1, w_end = w0 + (a.KW - 1) * a.DW + 1;
    const int64_t h1 = h_end < a.H ? h_end : a.H, w1 = w_end < a.W ? w_end : a.W;
    while (h0 < 0) h0 += a.DH;
    while (w0 < 0) w0 += a.DW;
    const scalar_t* plane = x + n * a.xs[0] + c * a.xs[1];
    acc_t best = -static_cast<acc_t>(INFINITY);
    int64_t best_i = h0 * a.W + w0;
    for (int64_t h = h0; h < h1; h += a.DH)
      for (int64_t w = w0; w < w1; w += a.DW) {
        const acc_t v = static_cast<acc_t>(plane[h * a.xs[2] + w * a.xs[3]]);
        if (pool_takes(v, best)) {
          best = v;
          best_i = h * a.W + w;
        }
      }
    const int64_t o = n * a.os[0] + c * a.os[1] + oh * a.os[2] + ow * a.os[3];
    out[o] = static_cast<scalar_t>(best);
    idx[o] = best_i;
  }
};

// One (n, c) plane per element, scanned in pooled row-major order into an accumulation-type
// plane (zeroed by the caller): the same order as the CPU kernel, so the result is bitwise
// reproducible and independent of whether windows overlap (max_pool2d_backward is not given the
// window geometry, so a gather over candidate windows is not possible). Returns false when an
// index is outside [0, H*W) (the caller asserts; such an entry is not added).
template <typename scalar_t, typename acc_t>
struct MaxPoolBackwardPlaneBody {
  const scalar_t* grad;  // (N, C, OH, OW) with strides gs
  const int64_t* index;  // with strides is
  int64_t gs[4], is[4];
  int64_t C, OH, OW, H, W;
  acc_t* gx;  // (N*C, H*W) accumulation planes
  AEFAST_HD bool operator()(int64_t plane) const {
    const int64_t n = plane / C, c = plane % C;
    acc_t* dst = gx + plane * H * W;
    bool ok = true;
    for (int64_t oh = 0; oh < OH; ++oh)
      for (int64_t ow = 0; ow < OW; ++ow) {
        const int64_t k = index[n * is[0] + c * is[1] + oh * is[2] + ow * is[3]];
        if (k < 0 || k >= H * W) {
          ok = false;
          continue;
        }
        dst[k] += static_cast<acc_t>(grad[n * gs[0] + c * gs[1] + oh * gs[2] + ow * gs[3]]);
      }
    return ok;
  }
};

}  // namespace aefast
