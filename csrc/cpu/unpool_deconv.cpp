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

template <typename index_t>
AEFAST_ALWAYS_INLINE void position_of(const index_t* idx, int64_t k, int64_t ph, int64_t pw, const DecoderGeometry& g,
                                      int64_t& h, int64_t& w) {
  if constexpr (std::is_same_v<index_t, int64_t>) {
    unpooled_position_flat(idx[k], g.unpooled_w, h, w);
  } else {
    unpooled_position_window(static_cast<int64_t>(idx[k]), ph, pw, g.pool_h, g.pool_w, h, w);
  }
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

// dst[0 : run] += sum_t vals[t] * base[offs[t] : offs[t] + run] (a gathered-row GEMV).
template <typename T>
AEFAST_ALWAYS_INLINE void axpy_rows(T* __restrict__ dst, const T* __restrict__ base, const int64_t* __restrict__ offs,
                                    const T* __restrict__ vals, int64_t count, int64_t run) {
  constexpr int L = Vec<T>::L;
  int64_t j = 0;
  for (; j + 12 * L <= run; j += 12 * L) axpy_rows_block<12>(dst + j, base + j, offs, vals, count);
  for (; j + 4 * L <= run; j += 4 * L) axpy_rows_block<4>(dst + j, base + j, offs, vals, count);
  for (; j + L <= run; j += L) axpy_rows_block<1>(dst + j, base + j, offs, vals, count);
  for (; j < run; ++j) {
    T s = 0;
    for (int64_t t = 0; t < count; ++t) s += vals[t] * base[offs[t] + j];
    dst[j] += s;
  }
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

// Window offset (i*pool_w + j) of pooled value k at window (ph, pw).
template <typename index_t>
AEFAST_ALWAYS_INLINE int64_t window_offset_of(const index_t* idx, int64_t k, int64_t ph, int64_t pw,
                                              const DecoderGeometry& g) {
  if constexpr (std::is_same_v<index_t, int64_t>) {
    int64_t h, w;
    unpooled_position_flat(idx[k], g.unpooled_w, h, w);
    return (h - ph * g.pool_h) * g.pool_w + (w - pw * g.pool_w);
  } else {
    return static_cast<int64_t>(idx[k]);
  }
}

// Per-thread scratch for grouping the channels of one window by their argmax offset.
template <typename acc_t>
struct GroupScratch {
  std::vector<int64_t> offset_of_ci, count, start, offs;
  std::vector<acc_t> vals;
  GroupScratch(int64_t c_in, int64_t window) : offset_of_ci(c_in), count(window + 1), start(window + 1),
                                               offs(c_in), vals(c_in) {}
};

// ---------------------------------------------------------------- forward scatter (one item)
// For each pool window the input channels are grouped (stable counting sort) by where their
// maximum sits; each group shares one position, so its contribution to a footprint row is the
// gathered-row GEMV sum_ci z[ci] * Wt[ci][kh] computed in registers and added to acc once.
template <typename scalar_t, typename acc_t, typename index_t>
AEFAST_ALWAYS_INLINE void scatter_item_body(const scalar_t* __restrict__ z, const index_t* __restrict__ idx,
                                            const acc_t* __restrict__ wt, acc_t* __restrict__ acc,
                                            const DecoderGeometry& g, int64_t acc_cols, GroupScratch<acc_t>& sc) {
  const int64_t co = g.c_out, run = g.kernel_w * co, row_stride = acc_cols * co, per_ci = g.kernel_h * run;
  const int64_t window = g.pool_h * g.pool_w, plane = g.pooled_h * g.pooled_w;
  for (int64_t ph = 0; ph < g.pooled_h; ++ph) {
    for (int64_t pw = 0; pw < g.pooled_w; ++pw) {
      std::fill(sc.count.begin(), sc.count.end(), int64_t(0));
      for (int64_t ci = 0; ci < g.c_in; ++ci) {
        const int64_t o = window_offset_of(idx, ci * plane + ph * g.pooled_w + pw, ph, pw, g);
        sc.offset_of_ci[ci] = o;
        ++sc.count[o + 1];
      }
      for (int64_t o = 0; o < window; ++o) sc.count[o + 1] += sc.count[o];
      std::copy(sc.count.begin(), sc.count.end(), sc.start.begin());
      for (int64_t ci = 0; ci < g.c_in; ++ci) {
        const int64_t slot = sc.start[sc.offset_of_ci[ci]]++;
        sc.offs[slot] = ci * per_ci;
        sc.vals[slot] = static_cast<acc_t>(z[ci * plane + ph * g.pooled_w + pw]);
      }
      for (int64_t o = 0; o < window; ++o) {
        const int64_t first = sc.count[o], cnt = sc.count[o + 1] - first;
        if (cnt == 0) continue;
        const int64_t h = ph * g.pool_h + o / g.pool_w, w = pw * g.pool_w + o % g.pool_w;
        acc_t* base = acc + (h * g.stride_h) * row_stride + (w * g.stride_w) * co;
        for (int64_t kh = 0; kh < g.kernel_h; ++kh)
          axpy_rows(base + kh * row_stride, wt + kh * run, sc.offs.data() + first, sc.vals.data() + first, cnt, run);
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

// ---------------------------------------------------------------- grad_input gather (one item)
template <typename scalar_t, typename acc_t, typename index_t>
AEFAST_ALWAYS_INLINE void gather_item_body(const index_t* __restrict__ idx, const acc_t* __restrict__ wt,
                                           const acc_t* __restrict__ gpad, scalar_t* __restrict__ grad_z,
                                           const DecoderGeometry& g, int64_t acc_cols) {
  const int64_t co = g.c_out, run = g.kernel_w * co, row_stride = acc_cols * co;
  for (int64_t ci = 0; ci < g.c_in; ++ci) {
    const acc_t* __restrict__ wc = wt + ci * g.kernel_h * run;
    for (int64_t ph = 0; ph < g.pooled_h; ++ph) {
      for (int64_t pw = 0; pw < g.pooled_w; ++pw) {
        const int64_t k = (ci * g.pooled_h + ph) * g.pooled_w + pw;
        int64_t h, w;
        position_of(idx, k, ph, pw, g, h, w);
        const acc_t* __restrict__ base = gpad + (h * g.stride_h) * row_stride + (w * g.stride_w) * co;
        acc_t sum = 0;
        for (int64_t kh = 0; kh < g.kernel_h; ++kh) sum += dot(base + kh * row_stride, wc + kh * run, run);
        grad_z[k] = static_cast<scalar_t>(sum);
      }
    }
  }
}

template <typename scalar_t, typename acc_t, typename index_t>
AEFAST_TARGET_AVX2 void gather_item_avx2(const index_t* idx, const acc_t* wt, const acc_t* gpad, scalar_t* grad_z,
                                         const DecoderGeometry& g, int64_t acc_cols) {
  gather_item_body(idx, wt, gpad, grad_z, g, acc_cols);
}
template <typename scalar_t, typename acc_t, typename index_t>
void gather_item_base(const index_t* idx, const acc_t* wt, const acc_t* gpad, scalar_t* grad_z,
                      const DecoderGeometry& g, int64_t acc_cols) {
  gather_item_body(idx, wt, gpad, grad_z, g, acc_cols);
}

// ---------------------------------------------------------------- grad_weight (items [n0, n1), channels [c0, c1))
// grad_Wt[ci][kh] += sum over the block's pooled values of channel ci of z * gpre row kh at the
// value's footprint: again a gathered-row GEMV, accumulated in registers over the whole block.
template <typename scalar_t, typename acc_t, typename index_t>
AEFAST_ALWAYS_INLINE void wgrad_block_body(const scalar_t* __restrict__ z, const index_t* __restrict__ idx,
                                           const acc_t* __restrict__ gpad, acc_t* __restrict__ gwt,
                                           const DecoderGeometry& g, int64_t acc_cols, int64_t item, int64_t n0,
                                           int64_t n1, int64_t c0, int64_t c1, int64_t* offs, acc_t* vals) {
  const int64_t co = g.c_out, run = g.kernel_w * co, row_stride = acc_cols * co, per_ci = g.kernel_h * run;
  const int64_t plane = g.pooled_h * g.pooled_w, plane_in = g.c_in * plane;
  for (int64_t ci = c0; ci < c1; ++ci) {
    int64_t cnt = 0;
    for (int64_t n = n0; n < n1; ++n) {
      const scalar_t* zn = z + n * plane_in + ci * plane;
      const index_t* in = idx + n * plane_in + ci * plane;
      for (int64_t ph = 0; ph < g.pooled_h; ++ph)
        for (int64_t pw = 0; pw < g.pooled_w; ++pw) {
          int64_t h, w;
          position_of(in, ph * g.pooled_w + pw, ph, pw, g, h, w);
          offs[cnt] = (n - n0) * item + (h * g.stride_h) * row_stride + (w * g.stride_w) * co;
          vals[cnt] = static_cast<acc_t>(zn[ph * g.pooled_w + pw]);
          ++cnt;
        }
    }
    for (int64_t kh = 0; kh < g.kernel_h; ++kh)
      axpy_rows(gwt + ci * per_ci + kh * run, gpad + kh * row_stride, offs, vals, cnt, run);
  }
}

template <typename scalar_t, typename acc_t, typename index_t>
AEFAST_TARGET_AVX2 void wgrad_block_avx2(const scalar_t* z, const index_t* idx, const acc_t* gpad, acc_t* gwt,
                                         const DecoderGeometry& g, int64_t acc_cols, int64_t item, int64_t n0,
                                         int64_t n1, int64_t c0, int64_t c1, int64_t* offs, acc_t* vals) {
  wgrad_block_body(z, idx, gpad, gwt, g, acc_cols, item, n0, n1, c0, c1, offs, vals);
}
template <typename scalar_t, typename acc_t, typename index_t>
void wgrad_block_base(const scalar_t* z, const index_t* idx, const acc_t* gpad, acc_t* gwt, const DecoderGeometry& g,
                      int64_t acc_cols, int64_t item, int64_t n0, int64_t n1, int64_t c0, int64_t c1, int64_t* offs,
                      acc_t* vals) {
  wgrad_block_body(z, idx, gpad, gwt, g, acc_cols, item, n0, n1, c0, c1, offs, vals);
}

// W[ci][co][kh][kw] -> Wt[ci][kh][kw][co] in the accumulation type.
template <typename scalar_t, typename acc_t>
std::vector<acc_t> reorder_weight(const at::Tensor& weight, const DecoderGeometry& g) {
  const scalar_t* w = weight.const_data_ptr<scalar_t>();
  std::vector<acc_t> wt(static_cast<size_t>(g.c_in * g.c_out * g.kernel_h * g.kernel_w));
  for (int64_t ci = 0; ci < g.c_in; ++ci)
    for (int64_t co = 0; co < g.c_out; ++co)
      for (int64_t kh = 0; kh < g.kernel_h; ++kh)
        for (int64_t kw = 0; kw < g.kernel_w; ++kw)
          wt[((ci * g.kernel_h + kh) * g.kernel_w + kw) * g.c_out + co] =
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
    GroupScratch<acc_t> scratch(g.c_in, g.pool_h * g.pool_w);
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

template <typename scalar_t, typename index_t>
void backward_typed(const at::Tensor& grad_out, const at::Tensor& act_in, const at::Tensor& z, const at::Tensor& idx,
                    const at::Tensor& weight, const DecoderGeometry& g, DecoderAct act, double slope,
                    std::array<bool, 3> mask, at::Tensor& grad_z, at::Tensor& grad_w, at::Tensor& grad_b) {
  using acc_t = at::opmath_type<scalar_t>;
  const AccExtent ext = acc_extent(g);
  const int64_t item = ext.rows * ext.cols * g.c_out;
  const int64_t plane_in = g.c_in * g.pooled_h * g.pooled_w, plane_out = g.c_out * g.out_h * g.out_w;
  const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* ap = act_in.const_data_ptr<scalar_t>();
  const scalar_t* zp = z.const_data_ptr<scalar_t>();
  const index_t* ip = idx.const_data_ptr<index_t>();
  const acc_t sl = static_cast<acc_t>(slope);
  const bool avx2 = cpu_has_avx2_fma();
  const std::vector<acc_t> wt = reorder_weight<scalar_t, acc_t>(weight, g);
  // gpre in the padded channels-last layout for every item (read again by the weight gradient),
  // plus one bias partial sum per item.
  // Allocated through the c10 allocator (not std::vector) so that memory profilers see them.
  const at::TensorOptions acc_opts = z.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  at::Tensor gpad_t = at::empty({g.n * item}, acc_opts);
  at::Tensor bias_part_t = at::empty({g.n * g.c_out}, acc_opts);
  acc_t* gpad_p = gpad_t.mutable_data_ptr<acc_t>();
  acc_t* bias_part = bias_part_t.mutable_data_ptr<acc_t>();
  scalar_t* gz = mask[0] ? grad_z.mutable_data_ptr<scalar_t>() : nullptr;
  at::parallel_for(0, g.n, 1, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      acc_t* gn = gpad_p + n * item;
      std::fill(gn, gn + item, acc_t(0));
      const scalar_t* go = gp + n * plane_out;
      const scalar_t* ai = ap + n * plane_out;
      for (int64_t co = 0; co < g.c_out; ++co) {
        acc_t bsum = 0;
        for (int64_t oy = 0; oy < g.out_h; ++oy) {
          acc_t* row = gn + ((oy + g.pad_h) * ext.cols + g.pad_w) * g.c_out + co;
          const int64_t o_base = (co * g.out_h + oy) * g.out_w;
          for (int64_t ox = 0; ox < g.out_w; ++ox) {
            const acc_t d = static_cast<acc_t>(go[o_base + ox]) *
                            act_derivative<acc_t>(static_cast<acc_t>(ai[o_base + ox]), act, sl);
            row[ox * g.c_out] = d;
            bsum += d;
          }
        }
        bias_part[n * g.c_out + co] = bsum;
      }
      if (gz) {
        if (avx2)
          gather_item_avx2<scalar_t, acc_t, index_t>(ip + n * plane_in, wt.data(), gn, gz + n * plane_in, g, ext.cols);
        else
          gather_item_base<scalar_t, acc_t, index_t>(ip + n * plane_in, wt.data(), gn, gz + n * plane_in, g, ext.cols);
      }
    }
  });
  if (mask[1]) {
    const int64_t per_ci = g.kernel_h * g.kernel_w * g.c_out;
    at::Tensor gwt_t = at::zeros({g.c_in * per_ci}, acc_opts);
    acc_t* gwt = gwt_t.mutable_data_ptr<acc_t>();
    // Each thread owns a range of input channels and walks the batch in order, in blocks of
    // items whose gpre fits in L2 (the block is the reduction's only grouping: fixed, thread-free).
    const int64_t block = std::max<int64_t>(1, (256 * 1024) / std::max<int64_t>(1, item * int64_t(sizeof(acc_t))));
    at::parallel_for(0, g.c_in, 1, [&](int64_t c0, int64_t c1) {
      const int64_t cap = block * g.pooled_h * g.pooled_w;
      std::vector<int64_t> offs(static_cast<size_t>(cap));
      std::vector<acc_t> vals(static_cast<size_t>(cap));
      for (int64_t n0 = 0; n0 < g.n; n0 += block) {
        const int64_t n1 = std::min(g.n, n0 + block);
        const acc_t* gblock = gpad_p + n0 * item;
        if (avx2)
          wgrad_block_avx2<scalar_t, acc_t, index_t>(zp, ip, gblock, gwt, g, ext.cols, item, n0, n1, c0, c1,
                                                     offs.data(), vals.data());
        else
          wgrad_block_base<scalar_t, acc_t, index_t>(zp, ip, gblock, gwt, g, ext.cols, item, n0, n1, c0, c1,
                                                     offs.data(), vals.data());
      }
    });
    scalar_t* gw = grad_w.mutable_data_ptr<scalar_t>();
    for (int64_t ci = 0; ci < g.c_in; ++ci)
      for (int64_t co = 0; co < g.c_out; ++co)
        for (int64_t kh = 0; kh < g.kernel_h; ++kh)
          for (int64_t kw = 0; kw < g.kernel_w; ++kw)
            gw[((ci * g.c_out + co) * g.kernel_h + kh) * g.kernel_w + kw] =
                static_cast<scalar_t>(gwt[((ci * g.kernel_h + kh) * g.kernel_w + kw) * g.c_out + co]);
  }
  if (mask[2]) {
    scalar_t* gb = grad_b.mutable_data_ptr<scalar_t>();
    for (int64_t co = 0; co < g.c_out; ++co) {
      acc_t s = 0;
      for (int64_t n = 0; n < g.n; ++n) s += bias_part[n * g.c_out + co];
      gb[co] = static_cast<scalar_t>(s);
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
