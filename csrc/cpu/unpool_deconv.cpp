// CPU kernels of the unpool_deconv family: the fused decoder block
//   out = act(conv_transpose2d(max_unpool2d(z, idx, pool), W, b, stride, padding, output_padding))
// and the drop-in max_unpool2d, forward and backward.
//
// Math (dilation 1, groups 1). Let pos(n, ci, ph, pw) = (h, w) be where pooled value
// z[n, ci, ph, pw] sits in the unpooled plane (the map u is z there and 0 elsewhere). Then
//   pre[n, co, oy, ox] = b[co] + sum_{ci, ph, pw, kh, kw : oy = h*sh - padh + kh, ox = w*sw - padw + kw}
//                                z[n, ci, ph, pw] * W[ci, co, kh, kw]
// i.e. every pooled value scatters z * W[ci] over the KH x KW footprint of its one position:
// 1/(pool_h*pool_w) of the MACs of the dense transposed conv over u, and u is never built.
// With gpre = grad_out * act'(.) the gradients are
//   grad_z[n, ci, ph, pw] = sum_{co, kh, kw} gpre[n, co, h*sh - padh + kh, w*sw - padw + kw] * W[ci, co, kh, kw]
//       (the dgrad conv evaluated only at the argmax position of each window: a gather),
//   grad_W[ci, co, kh, kw] = sum_{n, ph, pw} z[n, ci, ph, pw] * gpre[n, co, h*sh - padh + kh, w*sw - padw + kw]
//       (only the nonzero positions of u contribute),
//   grad_b[co] = sum_{n, oy, ox} gpre[n, co, oy, ox].
//
// Layout: accumulation happens in a channels-last fp32 (fp64 for double) buffer acc[a][c][co]
// with a = oy + padh in [0, Ha), c = ox + padw in [0, Wa), large enough for every footprint,
// so the hot loops have no bounds checks. In that layout one kernel row of a footprint
// (kw = 0..KW-1, all co) is ONE contiguous run of KW*C_out values, and so is the matching row of
// the weight reordered to Wt[ci][kh][kw][co]: the inner loop is a contiguous axpy / dot that
// gcc vectorises (compiled twice: baseline and AVX2+FMA, picked at run time).
//
// Determinism: every output element is owned by one thread and accumulated in a fixed order
// (forward and grad_input per batch item; grad_weight per input channel, looping the batch in
// order; grad_bias from per-item partial sums added in item order). No atomics; results do
// not depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "aefast/unpool_deconv.h"
#include "aefast/unpool_deconv_args.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define AEFAST_X86_CLONES 1
#define AEFAST_TARGET_AVX2 __attribute__((target("avx2,fma")))
#else
#define AEFAST_TARGET_AVX2
#endif
#define AEFAST_ALWAYS_INLINE inline __attribute__((always_inline))

namespace aefast {
namespace {

bool cpu_has_avx2_fma() {
#ifdef AEFAST_X86_CLONES
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
#else
  return false;
#endif
}

// Extent of the channels-last accumulation buffer: row a = oy + pad_h covers every footprint
// row h*sh + kh (< (Hu-1)*sh + KH) and every output row (< Ho + pad_h).
struct AccExtent {
  int64_t rows, cols;
};
AccExtent acc_extent(const DecoderGeometry& g) {
  return {std::max((g.unpooled_h - 1) * g.stride_h + g.kernel_h, g.out_h + g.pad_h),
          std::max((g.unpooled_w - 1) * g.stride_w + g.kernel_w, g.out_w + g.pad_w)};
}

// Offset i*pool_w + j of pooled value k inside its window (ph, pw), or -1 if the index does not
// name an element of that window inside the unpooled plane. The Python layer rejects such
// indices before any kernel runs; the kernels still skip them so that a direct torch.ops call
// with bad indices cannot write out of bounds. Flat indices avoid a 64-bit division: inside
// the window, v - start = i*W + j with i < pool_h, so i is found by pool_h comparisons.
template <typename index_t>
AEFAST_ALWAYS_INLINE int64_t window_offset_of(const index_t* idx, int64_t k, int64_t ph, int64_t pw,
                                              const DecoderGeometry& g) {
  int64_t i, j;
  if constexpr (std::is_same_v<index_t, int64_t>) {
    const int64_t rel = idx[k] - (ph * g.pool_h) * g.unpooled_w - pw * g.pool_w;
    if (rel < 0) return -1;
    i = 0;  // branch-free: the argmax row is random, a data-dependent loop would mispredict
    for (int64_t q = 1; q <= g.pool_h; ++q) i += rel >= q * g.unpooled_w;
    j = rel - i * g.unpooled_w;
    if (i >= g.pool_h || j >= g.pool_w) return -1;
  } else {
    const int64_t o = static_cast<int64_t>(idx[k]);
    if (o >= g.pool_h * g.pool_w) return -1;
    i = o / g.pool_w;
    j = o - i * g.pool_w;
  }
  if (ph * g.pool_h + i >= g.unpooled_h || pw * g.pool_w + j >= g.unpooled_w) return -1;
  return i * g.pool_w + j;
}

// Unpooled position (h, w) of pooled value k; false for an invalid index (see above).
template <typename index_t>
AEFAST_ALWAYS_INLINE bool position_of(const index_t* idx, int64_t k, int64_t ph, int64_t pw, const DecoderGeometry& g,
                                      int64_t& h, int64_t& w) {
  const int64_t o = window_offset_of(idx, k, ph, pw, g);
  if (o < 0) return false;
  const int64_t i = o / g.pool_w;
  h = ph * g.pool_h + i;
  w = pw * g.pool_w + (o - i * g.pool_w);
  return true;
}

// ---------------------------------------------------------------- vector helpers
// GCC vector extensions, one AVX register (32 bytes) each: the AVX2+FMA clones compile them to
// ymm FMAs, the baseline clones to pairs of SSE ops.
typedef float v8f __attribute__((vector_size(32)));
typedef double v4d __attribute__((vector_size(32)));
template <typename T>
struct Vec;
template <>
struct Vec<float> {
  using type = v8f;
  static constexpr int L = 8;
};
template <>
struct Vec<double> {
  using type = v4d;
  static constexpr int L = 4;
};
template <typename V, typename T>
AEFAST_ALWAYS_INLINE V vload(const T* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename T>
AEFAST_ALWAYS_INLINE void vstore(T* p, V v) {
  __builtin_memcpy(p, &v, sizeof(V));
}

// dst[0 : NV*L] += sum_t vals[t] * base[offs[t] : offs[t] + NV*L], summed in registers in t order
// and added to dst once: one load per FMA and no store in the loop.
template <int NV, typename T>
AEFAST_ALWAYS_INLINE void axpy_rows_block(T* __restrict__ dst, const T* __restrict__ base,
                                          const int64_t* __restrict__ offs, const T* __restrict__ vals,
                                          int64_t count) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::L;
  V r[NV];
  for (int q = 0; q < NV; ++q) r[q] = V{};
  for (int64_t t = 0; t < count; ++t) {
    const T* s = base + offs[t];
    const V v = V{} + vals[t];
    for (int q = 0; q < NV; ++q) r[q] += v * vload<V>(s + q * L);
  }
  for (int q = 0; q < NV; ++q) vstore(dst + q * L, vload<V>(dst + q * L) + r[q]);
}

// dst[0 : run] += sum_t vals[t] * base[offs[t] : offs[t] + run] (a gathered-row GEMV). Rows of
// up to 12 vectors are done in one pass over the list with exactly as many accumulators; slabs
// are padded to whole vectors, so the scalar tail only serves unpadded callers.
template <typename T>
AEFAST_ALWAYS_INLINE void axpy_rows(T* __restrict__ dst, const T* __restrict__ base, const int64_t* __restrict__ offs,
                                    const T* __restrict__ vals, int64_t count, int64_t run) {
  constexpr int L = Vec<T>::L;
  int64_t j = 0;
  for (; j + 12 * L <= run; j += 12 * L) axpy_rows_block<12>(dst + j, base + j, offs, vals, count);
  const int64_t nv = (run - j) / L;
  switch (nv) {
#define AEFAST_AXPY_CASE(K) \
  case K:                   \
    axpy_rows_block<K>(dst + j, base + j, offs, vals, count); \
    break;
    AEFAST_AXPY_CASE(1) AEFAST_AXPY_CASE(2) AEFAST_AXPY_CASE(3) AEFAST_AXPY_CASE(4) AEFAST_AXPY_CASE(5)
    AEFAST_AXPY_CASE(6) AEFAST_AXPY_CASE(7) AEFAST_AXPY_CASE(8) AEFAST_AXPY_CASE(9) AEFAST_AXPY_CASE(10)
    AEFAST_AXPY_CASE(11)
#undef AEFAST_AXPY_CASE
    default: break;
  }
  j += nv * L;
  for (; j < run; ++j) {
    T s = 0;
    for (int64_t t = 0; t < count; ++t) s += vals[t] * base[offs[t] + j];
    dst[j] += s;
  }
}

// Per-channel slab stride: KH*KW*C_out rounded up to whole vectors (the padding is zero).
template <typename acc_t>
int64_t slab_stride(const DecoderGeometry& g) {
  constexpr int64_t L = Vec<acc_t>::L;
  return (g.kernel_h * g.kernel_w * g.c_out + L - 1) / L * L;
}

// sum_j a[j] * b[j] with vector lanes (a float reduction the compiler would leave scalar).
template <typename T>
AEFAST_ALWAYS_INLINE T dot(const T* __restrict__ a, const T* __restrict__ b, int64_t n) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::L;
  V s0 = V{}, s1 = V{};
  int64_t j = 0;
  for (; j + 2 * L <= n; j += 2 * L) {
    s0 += vload<V>(a + j) * vload<V>(b + j);
    s1 += vload<V>(a + j + L) * vload<V>(b + j + L);
  }
  for (; j + L <= n; j += L) s0 += vload<V>(a + j) * vload<V>(b + j);
  s0 += s1;
  T s = 0;
  for (int l = 0; l < L; ++l) s += s0[l];
  for (; j < n; ++j) s += a[j] * b[j];
  return s;
}

// Per-thread scratch: the channels of every window of one item grouped by argmax offset.
template <typename acc_t>
struct GroupScratch {
  std::vector<int64_t> offset_of_ci, bounds, fill, offs;
  std::vector<acc_t> vals, slab;
  GroupScratch(int64_t c_in, int64_t windows, int64_t window, int64_t slab_len)
      : offset_of_ci(c_in), bounds(windows * (window + 1)), fill(window), offs(windows * c_in),
        vals(windows * c_in), slab(slab_len) {}
};

// Columns of the weight slab handled per pass: 12 vectors, so that the weight block of all
// input channels (C_in x 12 vectors) stays in L1 while every window of the item uses it.
template <typename acc_t>
constexpr int64_t kSlabChunk = 12 * Vec<acc_t>::L;

// ---------------------------------------------------------------- forward scatter (one item)
// For each pool window the input channels are grouped (stable counting sort) by where their
// maximum sits. A group shares one position, so its whole contribution is one gathered-row GEMV
//   slab[kh][kw][co] = sum_{ci in group} z[ci] * Wt[ci][kh][kw][co]
// over the contiguous per-channel weight slab (accumulated in registers), added to the
// footprint rows of acc once. The slab columns are done in chunks (outer loop) so the weight
// block stays in L1 across windows. MACs: one per (pooled value, weight of its channel).
template <typename scalar_t, typename acc_t, typename index_t>
AEFAST_ALWAYS_INLINE void scatter_item_body(const scalar_t* __restrict__ z, const index_t* __restrict__ idx,
                                            const acc_t* __restrict__ wt, acc_t* __restrict__ acc,
                                            const DecoderGeometry& g, int64_t acc_cols, GroupScratch<acc_t>& sc) {
  const int64_t co = g.c_out, run = g.kernel_w * co, row_stride = acc_cols * co, ps = slab_stride<acc_t>(g);
  const int64_t used = g.kernel_h * run;  // slab values before the zero padding
  const int64_t window = g.pool_h * g.pool_w, plane = g.pooled_h * g.pooled_w;
  acc_t* __restrict__ slab = sc.slab.data();
  // Pass 1: group the channels of every window (bounds = group starts, per window).
  for (int64_t p = 0; p < plane; ++p) {
    const int64_t ph = p / g.pooled_w, pw = p - ph * g.pooled_w;
    int64_t* bounds = sc.bounds.data() + p * (window + 1);
    std::fill(bounds, bounds + window + 1, int64_t(0));
    for (int64_t ci = 0; ci < g.c_in; ++ci) {
      const int64_t o = window_offset_of(idx, ci * plane + p, ph, pw, g);
      sc.offset_of_ci[ci] = o;
      if (o >= 0) ++bounds[o + 1];
    }
    for (int64_t o = 0; o < window; ++o) bounds[o + 1] += bounds[o];
    int64_t* fill = sc.fill.data();
    for (int64_t o = 0; o < window; ++o) fill[o] = bounds[o];
    for (int64_t ci = 0; ci < g.c_in; ++ci) {
      const int64_t o = sc.offset_of_ci[ci];
      if (o < 0) continue;
      const int64_t slot = p * g.c_in + fill[o]++;
      sc.offs[slot] = ci * ps;
      sc.vals[slot] = static_cast<acc_t>(z[ci * plane + p]);
    }
  }
  // Pass 2: per chunk of slab columns, every window and group.
  constexpr int64_t CH = kSlabChunk<acc_t>;
  for (int64_t c0 = 0; c0 < used; c0 += CH) {
    const int64_t len = std::min(CH, ps - c0), stop = std::min(used, c0 + CH);
    for (int64_t p = 0; p < plane; ++p) {
      const int64_t ph = p / g.pooled_w, pw = p - ph * g.pooled_w;
      const int64_t* bounds = sc.bounds.data() + p * (window + 1);
      for (int64_t o = 0; o < window; ++o) {
        const int64_t first = bounds[o], cnt = bounds[o + 1] - first;
        if (cnt == 0) continue;
        std::fill(slab, slab + len, acc_t(0));
        axpy_rows(slab, wt + c0, sc.offs.data() + p * g.c_in + first, sc.vals.data() + p * g.c_in + first, cnt, len);
        const int64_t h = ph * g.pool_h + o / g.pool_w, w = pw * g.pool_w + o % g.pool_w;
        acc_t* base = acc + (h * g.stride_h) * row_stride + (w * g.stride_w) * co;
        // Add slab columns [c0, stop) to the footprint, one kernel-row segment at a time.
        for (int64_t e = c0; e < stop;) {
          const int64_t kh = e / run, r = e - kh * run, seg = std::min(stop - e, run - r);
          acc_t* __restrict__ dst = base + kh * row_stride + r;
          const acc_t* __restrict__ src = slab + (e - c0);
          for (int64_t j = 0; j < seg; ++j) dst[j] += src[j];
          e += seg;
        }
      }
    }
  }
}

template <typename scalar_t, typename acc_t, typename index_t>
AEFAST_TARGET_AVX2 void scatter_item_avx2(const scalar_t* z, const index_t* idx, const acc_t* wt, acc_t* acc,
                                          const DecoderGeometry& g, int64_t acc_cols, GroupScratch<acc_t>& sc) {
  scatter_item_body(z, idx, wt, acc, g, acc_cols, sc);
}
template <typename scalar_t, typename acc_t, typename index_t>
void scatter_item_base(const scalar_t* z, const index_t* idx, const acc_t* wt, acc_t* acc, const DecoderGeometry& g,
                       int64_t acc_cols, GroupScratch<acc_t>& sc) {
  scatter_item_body(z, idx, wt, acc, g, acc_cols, sc);
}

// ---------------------------------------------------------------- backward building blocks
// col[h][w][kh][kw][co] = gpre at the footprint of unpooled position (h, w): the im2col of gpre,
// so that every pooled value meets one contiguous slab of KH*KW*C_out values.
template <typename acc_t>
void build_col_rows(const acc_t* __restrict__ gpad, acc_t* __restrict__ col, const DecoderGeometry& g,
                    int64_t acc_cols, int64_t h0, int64_t h1) {
  const int64_t co = g.c_out, run = g.kernel_w * co, row_stride = acc_cols * co, ps = slab_stride<acc_t>(g);
  for (int64_t h = h0; h < h1; ++h)
    for (int64_t w = 0; w < g.unpooled_w; ++w)
      for (int64_t kh = 0; kh < g.kernel_h; ++kh)
        std::memcpy(col + (h * g.unpooled_w + w) * ps + kh * run,
                    gpad + (h * g.stride_h + kh) * row_stride + (w * g.stride_w) * co, sizeof(acc_t) * run);
}

// grad_z of channel ci of one item: a dot of the channel's weight slab with the col slab at the
// value's position (the dgrad conv evaluated at the argmax position only).
template <typename scalar_t, typename acc_t, typename index_t>
AEFAST_ALWAYS_INLINE void gather_channel_body(const index_t* __restrict__ idx, const acc_t* __restrict__ wc,
                                              const acc_t* __restrict__ col, scalar_t* __restrict__ grad_z,
                                              const DecoderGeometry& g) {
  const int64_t ps = slab_stride<acc_t>(g);
  for (int64_t ph = 0; ph < g.pooled_h; ++ph)
    for (int64_t pw = 0; pw < g.pooled_w; ++pw) {
      const int64_t k = ph * g.pooled_w + pw;
      int64_t h, w;
      grad_z[k] = position_of(idx, k, ph, pw, g, h, w)
                      ? static_cast<scalar_t>(dot(col + (h * g.unpooled_w + w) * ps, wc, ps))
                      : scalar_t(0);
    }
}

template <typename scalar_t, typename acc_t, typename index_t>
AEFAST_TARGET_AVX2 void gather_channel_avx2(const index_t* idx, const acc_t* wc, const acc_t* col, scalar_t* grad_z,
                                            const DecoderGeometry& g) {
  gather_channel_body(idx, wc, col, grad_z, g);
}
template <typename scalar_t, typename acc_t, typename index_t>
void gather_channel_base(const index_t* idx, const acc_t* wc, const acc_t* col, scalar_t* grad_z,
                         const DecoderGeometry& g) {
  gather_channel_body(idx, wc, col, grad_z, g);
}

// grad_Wt[ci] += sum over the block's pooled values of channel ci of z * (col slab at the value's
// position): a gathered-row GEMV accumulated in registers over the whole block of items.
template <typename scalar_t, typename acc_t, typename index_t>
AEFAST_ALWAYS_INLINE void wgrad_block_body(const scalar_t* __restrict__ z, const index_t* __restrict__ idx,
                                           const acc_t* __restrict__ col, acc_t* __restrict__ gwt,
                                           const DecoderGeometry& g, int64_t n0, int64_t n1, int64_t c0, int64_t c1,
                                           int64_t* offs, acc_t* vals) {
  const int64_t ps = slab_stride<acc_t>(g), col_item = g.unpooled_h * g.unpooled_w * ps;
  const int64_t plane = g.pooled_h * g.pooled_w, plane_in = g.c_in * plane;
  for (int64_t ci = c0; ci < c1; ++ci) {
    int64_t cnt = 0;
    for (int64_t n = n0; n < n1; ++n) {
      const scalar_t* zn = z + n * plane_in + ci * plane;
      const index_t* in = idx + n * plane_in + ci * plane;
      for (int64_t ph = 0; ph < g.pooled_h; ++ph)
        for (int64_t pw = 0; pw < g.pooled_w; ++pw) {
          int64_t h, w;
          if (!position_of(in, ph * g.pooled_w + pw, ph, pw, g, h, w)) continue;
          offs[cnt] = (n - n0) * col_item + (h * g.unpooled_w + w) * ps;
          vals[cnt] = static_cast<acc_t>(zn[ph * g.pooled_w + pw]);
          ++cnt;
        }
    }
    axpy_rows(gwt + ci * ps, col, offs, vals, cnt, ps);
  }
}

template <typename scalar_t, typename acc_t, typename index_t>
AEFAST_TARGET_AVX2 void wgrad_block_avx2(const scalar_t* z, const index_t* idx, const acc_t* col, acc_t* gwt,
                                         const DecoderGeometry& g, int64_t n0, int64_t n1, int64_t c0, int64_t c1,
                                         int64_t* offs, acc_t* vals) {
  wgrad_block_body(z, idx, col, gwt, g, n0, n1, c0, c1, offs, vals);
}
template <typename scalar_t, typename acc_t, typename index_t>
void wgrad_block_base(const scalar_t* z, const index_t* idx, const acc_t* col, acc_t* gwt, const DecoderGeometry& g,
                      int64_t n0, int64_t n1, int64_t c0, int64_t c1, int64_t* offs, acc_t* vals) {
  wgrad_block_body(z, idx, col, gwt, g, n0, n1, c0, c1, offs, vals);
}

// W[ci][co][kh][kw] -> Wt[ci][kh][kw][co] in the accumulation type, one zero-padded slab of
// slab_stride values per input channel.
template <typename scalar_t, typename acc_t>
std::vector<acc_t> reorder_weight(const at::Tensor& weight, const DecoderGeometry& g) {
  const scalar_t* w = weight.const_data_ptr<scalar_t>();
  const int64_t ps = slab_stride<acc_t>(g);
  std::vector<acc_t> wt(static_cast<size_t>(g.c_in * ps), acc_t(0));
  for (int64_t ci = 0; ci < g.c_in; ++ci)
    for (int64_t co = 0; co < g.c_out; ++co)
      for (int64_t kh = 0; kh < g.kernel_h; ++kh)
        for (int64_t kw = 0; kw < g.kernel_w; ++kw)
          wt[ci * ps + (kh * g.kernel_w + kw) * g.c_out + co] =
              static_cast<acc_t>(w[((ci * g.c_out + co) * g.kernel_h + kh) * g.kernel_w + kw]);
  return wt;
}

template <typename scalar_t, typename index_t>
void forward_typed(const at::Tensor& z, const at::Tensor& idx, const at::Tensor& weight,
                   const std::optional<at::Tensor>& bias, const DecoderGeometry& g, DecoderAct act, double slope,
                   at::Tensor& out, at::Tensor& pre) {
  using acc_t = at::opmath_type<scalar_t>;
  const std::vector<acc_t> wt = reorder_weight<scalar_t, acc_t>(weight, g);
  std::vector<acc_t> b(static_cast<size_t>(g.c_out), acc_t(0));
  if (bias.has_value() && bias->defined()) {
    const at::Tensor bc = bias->contiguous();
    for (int64_t co = 0; co < g.c_out; ++co) b[co] = static_cast<acc_t>(bc.const_data_ptr<scalar_t>()[co]);
  }
  const AccExtent ext = acc_extent(g);
  const scalar_t* zp = z.const_data_ptr<scalar_t>();
  const index_t* ip = idx.const_data_ptr<index_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  scalar_t* pp = pre.numel() ? pre.mutable_data_ptr<scalar_t>() : nullptr;
  const int64_t plane_in = g.c_in * g.pooled_h * g.pooled_w, plane_out = g.c_out * g.out_h * g.out_w;
  const bool avx2 = cpu_has_avx2_fma();
  const acc_t sl = static_cast<acc_t>(slope);
  at::parallel_for(0, g.n, 1, [&](int64_t n0, int64_t n1) {
    std::vector<acc_t> acc(static_cast<size_t>(ext.rows * ext.cols * g.c_out));
    GroupScratch<acc_t> scratch(g.c_in, g.pooled_h * g.pooled_w, g.pool_h * g.pool_w, kSlabChunk<acc_t>);
    for (int64_t n = n0; n < n1; ++n) {
      std::fill(acc.begin(), acc.end(), acc_t(0));
      if (avx2)
        scatter_item_avx2<scalar_t, acc_t, index_t>(zp + n * plane_in, ip + n * plane_in, wt.data(), acc.data(), g,
                                                    ext.cols, scratch);
      else
        scatter_item_base<scalar_t, acc_t, index_t>(zp + n * plane_in, ip + n * plane_in, wt.data(), acc.data(), g,
                                                    ext.cols, scratch);
      // Epilogue: crop the padding, add bias, activate, write NCHW.
      scalar_t* o = op + n * plane_out;
      scalar_t* p = pp ? pp + n * plane_out : nullptr;
      for (int64_t co = 0; co < g.c_out; ++co)
        for (int64_t oy = 0; oy < g.out_h; ++oy) {
          const acc_t* row = acc.data() + ((oy + g.pad_h) * ext.cols + g.pad_w) * g.c_out + co;
          const int64_t o_base = (co * g.out_h + oy) * g.out_w;
          for (int64_t ox = 0; ox < g.out_w; ++ox) {
            const acc_t x = row[ox * g.c_out] + b[co];
            if (p) p[o_base + ox] = static_cast<scalar_t>(x);
            o[o_base + ox] = static_cast<scalar_t>(act_forward<acc_t>(x, act, sl));
          }
        }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> unpool_conv_transpose2d_cpu(
    const at::Tensor& input, const at::Tensor& indices, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    c10::IntArrayRef pool_size, c10::IntArrayRef unpooled_size, c10::IntArrayRef stride, c10::IntArrayRef padding,
    c10::IntArrayRef output_padding, std::optional<c10::string_view> activation, double negative_slope) {
  const DecoderGeometry g =
      decoder_geometry(input, indices, weight, pool_size, unpooled_size, stride, padding, output_padding);
  const DecoderAct act = parse_activation(activation);
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(), "aefast::unpool_conv_transpose2d: dtype mismatch");
  const at::Tensor z = input.contiguous(), idx = indices.contiguous(), w = weight.contiguous();
  at::Tensor out = at::empty({g.n, g.c_out, g.out_h, g.out_w}, input.options());
  at::Tensor pre = act_needs_preactivation(act) ? at::empty_like(out) : at::empty({0}, input.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "unpool_conv_transpose2d_cpu", [&] {
    if (idx.scalar_type() == at::kLong)
      forward_typed<scalar_t, int64_t>(z, idx, w, bias, g, act, negative_slope, out, pre);
    else
      forward_typed<scalar_t, uint8_t>(z, idx, w, bias, g, act, negative_slope, out, pre);
  });
  return {out, pre};
}

// Backward: the batch is cut into at most 16 fixed chunks of consecutive items (their size
// depends on N only, never on the thread count), processed in ONE parallel region (parallel
// regions are costly on a busy machine). Per item, the thread owning its chunk
//   1. writes gpre = grad_out * act'(.) into a padded channels-last buffer (bias partial sums
//      per item and channel on the way),
//   2. builds the im2col of gpre (one slab per unpooled position),
//   3. computes grad_input (a dot per pooled value) and adds the item's grad_weight terms to its
//      chunk's partial sum (gathered-row GEMVs, see wgrad_block_body).
// The chunk partials and the bias partials are then added in chunk / item order.
template <typename scalar_t, typename index_t>
void backward_typed(const at::Tensor& grad_out, const at::Tensor& act_in, const at::Tensor& z, const at::Tensor& idx,
                    const at::Tensor& weight, const DecoderGeometry& g, DecoderAct act, double slope,
                    std::array<bool, 3> mask, at::Tensor& grad_z, at::Tensor& grad_w, at::Tensor& grad_b) {
  using acc_t = at::opmath_type<scalar_t>;
  const AccExtent ext = acc_extent(g);
  const int64_t item = ext.rows * ext.cols * g.c_out;
  const int64_t ps = slab_stride<acc_t>(g), col_item = g.unpooled_h * g.unpooled_w * ps;
  const int64_t plane = g.pooled_h * g.pooled_w, plane_in = g.c_in * plane, plane_out = g.c_out * g.out_h * g.out_w;
  const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* ap = act_in.const_data_ptr<scalar_t>();
  const scalar_t* zp = z.const_data_ptr<scalar_t>();
  const index_t* ip = idx.const_data_ptr<index_t>();
  const acc_t sl = static_cast<acc_t>(slope);
  const bool avx2 = cpu_has_avx2_fma();
  const std::vector<acc_t> wt = reorder_weight<scalar_t, acc_t>(weight, g);
  const int64_t chunk = std::max<int64_t>(1, (g.n + 15) / 16), chunks = (g.n + chunk - 1) / chunk;
  // Buffers through the c10 allocator (not std::vector) so that memory profilers see them.
  const at::TensorOptions acc_opts = z.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  at::Tensor bias_part_t = at::empty({g.n * g.c_out}, acc_opts);
  // Per-chunk partials of grad_Wt; each chunk zeroes its own slice inside the parallel region
  // (it accumulates there), rather than one serial zero pass over all of them up front.
  at::Tensor gwt_t = at::empty({mask[1] ? chunks * g.c_in * ps : 0}, acc_opts);
  acc_t* bias_part = bias_part_t.mutable_data_ptr<acc_t>();
  acc_t* gwt = gwt_t.mutable_data_ptr<acc_t>();
  scalar_t* gz = grad_z.mutable_data_ptr<scalar_t>();
  const bool need_col = mask[0] || mask[1];
  at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
    at::Tensor gpad_t = at::empty({item}, acc_opts);
    at::Tensor col_t = at::empty({need_col ? col_item : 0}, acc_opts);
    acc_t* gpad = gpad_t.mutable_data_ptr<acc_t>();
    acc_t* col = col_t.mutable_data_ptr<acc_t>();
    // gpad: every item writes all of rows [pad_h, pad_h + out_h) x cols [pad_w, pad_w + out_w) x
    // all c_out; only the border around that interior must read as zero, and nothing writes it,
    // so it is zeroed once here instead of filling the whole buffer per item.
    {
      const int64_t cols_c = ext.cols * g.c_out;
      std::fill(gpad, gpad + g.pad_h * cols_c, acc_t(0));
      for (int64_t r = g.pad_h; r < g.pad_h + g.out_h; ++r) {
        std::fill(gpad + r * cols_c, gpad + r * cols_c + g.pad_w * g.c_out, acc_t(0));
        std::fill(gpad + r * cols_c + (g.pad_w + g.out_w) * g.c_out, gpad + (r + 1) * cols_c, acc_t(0));
      }
      std::fill(gpad + (g.pad_h + g.out_h) * cols_c, gpad + item, acc_t(0));
    }
    // col: build_col_rows writes the first KH*KW*c_out values of every slab; only the slab's
    // vector padding (read by dot / axpy_rows) must be zero, and nothing writes it.
    if (need_col) {
      const int64_t used = g.kernel_h * g.kernel_w * g.c_out;
      if (used < ps)
        for (int64_t q = 0; q < g.unpooled_h * g.unpooled_w; ++q) std::fill(col + q * ps + used, col + (q + 1) * ps, acc_t(0));
    }
    std::vector<int64_t> offs(static_cast<size_t>(plane));
    std::vector<acc_t> vals(static_cast<size_t>(plane));
    for (int64_t kc = k0; kc < k1; ++kc) {
      if (mask[1]) std::fill(gwt + kc * g.c_in * ps, gwt + (kc + 1) * g.c_in * ps, acc_t(0));
      for (int64_t n = kc * chunk; n < std::min(g.n, (kc + 1) * chunk); ++n) {
        for (int64_t co = 0; co < g.c_out; ++co) {
          const scalar_t* go = gp + n * plane_out + co * g.out_h * g.out_w;
          const scalar_t* ai = ap + n * plane_out + co * g.out_h * g.out_w;
          acc_t bsum = 0;
          for (int64_t oy = 0; oy < g.out_h; ++oy) {
            acc_t* row = gpad + ((oy + g.pad_h) * ext.cols + g.pad_w) * g.c_out + co;
            for (int64_t ox = 0; ox < g.out_w; ++ox) {
              const int64_t o = oy * g.out_w + ox;
              const acc_t d = static_cast<acc_t>(go[o]) * act_derivative<acc_t>(static_cast<acc_t>(ai[o]), act, sl);
              row[ox * g.c_out] = d;
              bsum += d;
            }
          }
          bias_part[n * g.c_out + co] = bsum;
        }
        if (!need_col) continue;
        build_col_rows(gpad, col, g, ext.cols, 0, g.unpooled_h);
        if (mask[1]) {
          acc_t* part = gwt + kc * g.c_in * ps;
          if (avx2)
            wgrad_block_avx2<scalar_t, acc_t, index_t>(zp, ip, col, part, g, n, n + 1, 0, g.c_in, offs.data(),
                                                       vals.data());
          else
            wgrad_block_base<scalar_t, acc_t, index_t>(zp, ip, col, part, g, n, n + 1, 0, g.c_in, offs.data(),
                                                       vals.data());
        }
        if (mask[0]) {
          for (int64_t ci = 0; ci < g.c_in; ++ci) {
            const int64_t off = n * plane_in + ci * plane;
            if (avx2)
              gather_channel_avx2<scalar_t, acc_t, index_t>(ip + off, wt.data() + ci * ps, col, gz + off, g);
            else
              gather_channel_base<scalar_t, acc_t, index_t>(ip + off, wt.data() + ci * ps, col, gz + off, g);
          }
        }
      }
    }
  });
  if (mask[1]) {
    for (int64_t kc = 1; kc < chunks; ++kc) {
      const acc_t* part = gwt + kc * g.c_in * ps;
      for (int64_t e = 0; e < g.c_in * ps; ++e) gwt[e] += part[e];
    }
    scalar_t* gw = grad_w.mutable_data_ptr<scalar_t>();
    for (int64_t ci = 0; ci < g.c_in; ++ci)
      for (int64_t co = 0; co < g.c_out; ++co)
        for (int64_t kh = 0; kh < g.kernel_h; ++kh)
          for (int64_t kw = 0; kw < g.kernel_w; ++kw)
            gw[((ci * g.c_out + co) * g.kernel_h + kh) * g.kernel_w + kw] =
                static_cast<scalar_t>(gwt[ci * ps + (kh * g.kernel_w + kw) * g.c_out + co]);
  }
  if (mask[2]) {
    scalar_t* gb = grad_b.mutable_data_ptr<scalar_t>();
    for (int64_t co = 0; co < g.c_out; ++co) {
      acc_t sum = 0;
      for (int64_t n = 0; n < g.n; ++n) sum += bias_part[n * g.c_out + co];
      gb[co] = static_cast<scalar_t>(sum);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> unpool_conv_transpose2d_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& act_input, const at::Tensor& input, const at::Tensor& indices,
    const at::Tensor& weight, c10::IntArrayRef pool_size, c10::IntArrayRef unpooled_size, c10::IntArrayRef stride,
    c10::IntArrayRef padding, c10::IntArrayRef output_padding, std::optional<c10::string_view> activation,
    double negative_slope, std::array<bool, 3> output_mask) {
  const DecoderGeometry g =
      decoder_geometry(input, indices, weight, pool_size, unpooled_size, stride, padding, output_padding);
  const DecoderAct act = parse_activation(activation);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({g.n, g.c_out, g.out_h, g.out_w}) &&
                  act_input.sizes() == grad_out.sizes(),
              "aefast::unpool_conv_transpose2d_backward: grad_out / act_input have the wrong shape");
  const at::Tensor go = grad_out.contiguous().to(input.scalar_type()), ai = act_input.contiguous();
  const at::Tensor z = input.contiguous(), idx = indices.contiguous(), w = weight.contiguous();
  at::Tensor grad_z = output_mask[0] ? at::empty_like(z) : at::zeros_like(z);
  at::Tensor grad_w = output_mask[1] ? at::empty_like(w) : at::zeros_like(w);
  at::Tensor grad_b = at::zeros({g.c_out}, input.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "unpool_conv_transpose2d_bwd_cpu", [&] {
    if (idx.scalar_type() == at::kLong)
      backward_typed<scalar_t, int64_t>(go, ai, z, idx, w, g, act, negative_slope, output_mask, grad_z, grad_w, grad_b);
    else
      backward_typed<scalar_t, uint8_t>(go, ai, z, idx, w, g, act, negative_slope, output_mask, grad_z, grad_w, grad_b);
  });
  return {grad_z, grad_w, grad_b};
}

// ---------------------------------------------------------------- drop-in max_unpool2d
// out[plane, idx[plane, p]] = in[plane, p]; with duplicate indices the last p (row-major) wins,
// because each plane is written by one thread in increasing p. Backward: grad_in[p] =
// grad_out[idx[p]] for the winning p of each element and 0 for the positions it overwrote (they
// do not reach the output), found by a reverse scan that marks elements already claimed.
at::Tensor max_unpool2d_cpu(const at::Tensor& input, const at::Tensor& indices, c10::IntArrayRef output_size) {
  TORCH_CHECK(input.dim() >= 2 && indices.sizes() == input.sizes() && indices.scalar_type() == at::kLong &&
                  output_size.size() == 2,
              "aefast::max_unpool2d: indices must be int64 with the input's shape, output_size two ints");
  const at::Tensor x = input.contiguous(), idx = indices.contiguous();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 2);
  shape.push_back(output_size[0]);
  shape.push_back(output_size[1]);
  at::Tensor out = at::zeros(shape, x.options());
  const int64_t plane_in = x.size(-2) * x.size(-1), plane_out = output_size[0] * output_size[1];
  const int64_t planes = plane_in ? x.numel() / plane_in : 0;
  std::atomic<bool> bad{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "max_unpool2d_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const int64_t* ip = idx.const_data_ptr<int64_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, planes, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        for (int64_t p = 0; p < plane_in; ++p) {
          const int64_t t = ip[b * plane_in + p];
          if (t < 0 || t >= plane_out) {
            bad = true;
            continue;
          }
          op[b * plane_out + t] = xp[b * plane_in + p];
        }
    });
  });
  TORCH_CHECK(!bad, "aefast::max_unpool2d: an index is outside the output plane");
  return out;
}

at::Tensor max_unpool2d_backward_cpu(const at::Tensor& grad_out, const at::Tensor& indices) {
  TORCH_CHECK(grad_out.dim() >= 2 && indices.dim() == grad_out.dim() && indices.scalar_type() == at::kLong,
              "aefast::max_unpool2d_backward: bad arguments");
  const at::Tensor g = grad_out.contiguous(), idx = indices.contiguous();
  at::Tensor grad_in = at::empty(idx.sizes(), g.options());
  const int64_t plane_in = idx.size(-2) * idx.size(-1), plane_out = g.size(-2) * g.size(-1);
  const int64_t planes = plane_in ? idx.numel() / plane_in : 0;
  std::atomic<bool> bad{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "max_unpool2d_backward_cpu", [&] {
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const int64_t* ip = idx.const_data_ptr<int64_t>();
    scalar_t* out = grad_in.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, planes, 1, [&](int64_t b0, int64_t b1) {
      std::vector<uint8_t> claimed(static_cast<size_t>(plane_out), 0);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t* ib = ip + b * plane_in;
        for (int64_t p = plane_in - 1; p >= 0; --p) {
          const int64_t t = ib[p];
          if (t < 0 || t >= plane_out) {
            bad = true;
            out[b * plane_in + p] = scalar_t(0);
            continue;
          }
          out[b * plane_in + p] = claimed[t] ? scalar_t(0) : gp[b * plane_out + t];
          claimed[t] = 1;
        }
        for (int64_t p = 0; p < plane_in; ++p) {
          const int64_t t = ib[p];
          if (t >= 0 && t < plane_out) claimed[t] = 0;
        }
      }
    });
  });
  TORCH_CHECK(!bad, "aefast::max_unpool2d_backward: an index is outside the output plane");
  return grad_in;
}

at::Tensor first_bad_unpool_index_cpu(const at::Tensor& indices, c10::IntArrayRef unpooled_size,
                                      c10::IntArrayRef pool_size, bool in_window) {
  TORCH_CHECK(indices.dim() >= 2 && (indices.scalar_type() == at::kLong || indices.scalar_type() == at::kByte) &&
                  unpooled_size.size() == 2 && pool_size.size() == 2 && pool_size[0] > 0 && pool_size[1] > 0,
              "aefast::first_bad_unpool_index: bad arguments");
  const at::Tensor idx = indices.contiguous();
  const int64_t hp = idx.size(-2), wp = idx.size(-1), plane = hp * wp;
  const int64_t planes = plane ? idx.numel() / plane : 0;
  const int64_t uh = unpooled_size[0], uw = unpooled_size[1], kh = pool_size[0], kw = pool_size[1];
  const bool flat = idx.scalar_type() == at::kLong;
  const int64_t none = std::numeric_limits<int64_t>::max();
  // One first-bad slot per plane, combined in plane order: the answer is the minimum position.
  std::vector<int64_t> first(static_cast<size_t>(planes), none);
  const int64_t* flat_ptr = flat ? idx.const_data_ptr<int64_t>() : nullptr;
  const uint8_t* window_ptr = flat ? nullptr : idx.const_data_ptr<uint8_t>();
  at::parallel_for(0, planes, std::max<int64_t>(1, 65536 / std::max<int64_t>(plane, 1)), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t ph = 0; ph < hp; ++ph)
        for (int64_t pw = 0; pw < wp; ++pw) {
          const int64_t k = b * plane + ph * wp + pw;
          const bool ok = flat ? unpool_index_valid_flat(flat_ptr[k], ph, pw, uh, uw, kh, kw, in_window)
                               : unpool_index_valid_window(window_ptr[k], ph, pw, uh, uw, kh, kw);
          if (!ok) {
            first[b] = k;
            ph = hp;  // stop this plane
            break;
          }
        }
    }
  });
  int64_t result = -1;
  for (int64_t b = 0; b < planes; ++b)
    if (first[b] != none) {
      result = first[b];
      break;
    }
  return at::scalar_tensor(result, idx.options().dtype(at::kLong));
}

}  // namespace

TORCH_LIBRARY_IMPL(aefast, CPU, m) {
  m.impl("first_bad_unpool_index", &first_bad_unpool_index_cpu);
  m.impl("unpool_conv_transpose2d", &unpool_conv_transpose2d_cpu);
  m.impl("unpool_conv_transpose2d_backward", &unpool_conv_transpose2d_backward_cpu);
  m.impl("max_unpool2d", &max_unpool2d_cpu);
  m.impl("max_unpool2d_backward", &max_unpool2d_backward_cpu);
}

}  // namespace aefast
