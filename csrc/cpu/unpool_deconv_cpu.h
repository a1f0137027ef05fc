// Internals shared by the two CPU kernel families of the unpool_deconv ops (the fused decoder
// block, csrc/cpu/unpool_deconv.cpp): the per-entry kernels (unpool_deconv_entries_forward.cpp,
// unpool_deconv_entries_backward.cpp) and the window-vector kernels
// (unpool_deconv_window_vectors.cpp). Here: the SIMD vectors and the ISA clones, index decoding
// (which is the validation), the weight reorder, and the entry points of each family, which
// unpool_deconv.cpp calls after checking the arguments and picking one.
//
// Notation. Wt[ci][kh][kw][co] is the weight reordered so that the KH*KW*C_out weights of one
// input channel form one contiguous "slab" of K = KH*KW*C_out values (padded with zeros to Kp,
// a whole number of SIMD vectors). An "entry" is one pooled value (ci, z) at its unpooled
// position q = h*W_u + w. Both families work on one image at a time and on rows of pool windows
// (pool_h unpooled rows), reading z and idx channel by channel along the row. Decoding an index
// IS its validation (see below).
//
// SIMD: GCC vector extensions, compiled three times: baseline (x86-64 SSE2), AVX2+FMA (32-byte
// vectors) and AVX-512 (64-byte vectors), each hot loop nest a separate target-attributed
// function (AEFAST_ISA_CLONES), picked at run time with __builtin_cpu_supports (never an AVX-512
// instruction on a CPU without it). AEFAST_CPU_ISA=baseline|avx2|avx512 (read per call) caps the
// choice, so the tests run every variant on one machine; torch.ops.aefast.unpool_deconv_cpu_isa()
// says which one runs.
//
// Index validation: the forward decodes every index anyway, so it also finds the first invalid
// one in row-major order (outside the unpooled plane or outside its own pool window) and the op
// raises after the parallel region (no output is returned). aefast.functional turns that into
// the same ValueError as the separate check (first_bad_unpool_index) that the other backends
// still run first. Invalid entries are skipped by every kernel, so a direct torch.ops call
// with bad indices cannot write out of bounds (the backward skips them silently: grad 0).
// Duplicate positions cannot occur here: the indices must lie in their own (disjoint) windows.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "aefast/cpu_buffer_cache.h"
#include "aefast/cpu_isa.h"
#include "aefast/torch_utils.h"
#include "aefast/unpool_deconv.h"
#include "aefast/unpool_deconv_args.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define AEFAST_X86_CLONES 1
#define AEFAST_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define AEFAST_TARGET_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")))
#else
#define AEFAST_TARGET_AVX2
#define AEFAST_TARGET_AVX512
#endif
#define AEFAST_ALWAYS_INLINE inline __attribute__((always_inline))

// Clones of a body template: NAME_avx512 / NAME_avx2 / NAME_base, each a separate (noinline)
// function compiled for its ISA, so that each hot loop nest gets its own register allocation.
// One switch from the run-time activation to the kernels templated on it: CALL(A) is expanded
// once per activation, A the compile-time DecoderAct. A macro, not a generic lambda: the ISA
// clones' target attributes do not reach into a lambda, and the always_inline kernels need them.
#define AEFAST_FOR_DECODER_ACT(act, CALL)                           \
  switch (act) {                                                    \
    case DecoderAct::Relu: CALL(DecoderAct::Relu); break;           \
    case DecoderAct::LeakyRelu: CALL(DecoderAct::LeakyRelu); break; \
    case DecoderAct::Sigmoid: CALL(DecoderAct::Sigmoid); break;     \
    case DecoderAct::Tanh: CALL(DecoderAct::Tanh); break;           \
    case DecoderAct::Gelu: CALL(DecoderAct::Gelu); break;           \
    case DecoderAct::Silu: CALL(DecoderAct::Silu); break;           \
    default: CALL(DecoderAct::None); break;                         \
  }
#define AEFAST_ISA_CLONES(NAME, PARAMS, ARGS)                                                       \
  template <typename scalar_t, typename acc_t>                                                      \
  AEFAST_TARGET_AVX512 __attribute__((noinline)) void NAME##_avx512 PARAMS {                        \
    NAME##_body<64, scalar_t, acc_t> ARGS;                                                          \
  }                                                                                                 \
  template <typename scalar_t, typename acc_t>                                                      \
  AEFAST_TARGET_AVX2 __attribute__((noinline)) void NAME##_avx2 PARAMS {                            \
    NAME##_body<32, scalar_t, acc_t> ARGS;                                                          \
  }                                                                                                 \
  template <typename scalar_t, typename acc_t>                                                      \
  __attribute__((noinline)) void NAME##_base PARAMS {                                               \
    NAME##_body<32, scalar_t, acc_t> ARGS;                                                          \
  }
// The same for bodies templated on the index type too.
#define AEFAST_ISA_CLONES_IDX(NAME, RET, PARAMS, ARGS)                                              \
  template <typename scalar_t, typename acc_t, typename index_t>                                    \
  AEFAST_TARGET_AVX512 __attribute__((noinline)) RET NAME##_avx512 PARAMS {                         \
    return NAME##_body<64, scalar_t, acc_t, index_t> ARGS;                                          \
  }                                                                                                 \
  template <typename scalar_t, typename acc_t, typename index_t>                                    \
  AEFAST_TARGET_AVX2 __attribute__((noinline)) RET NAME##_avx2 PARAMS {                             \
    return NAME##_body<32, scalar_t, acc_t, index_t> ARGS;                                          \
  }                                                                                                 \
  template <typename scalar_t, typename acc_t, typename index_t>                                    \
  __attribute__((noinline)) RET NAME##_base PARAMS {                                                \
    return NAME##_body<32, scalar_t, acc_t, index_t> ARGS;                                          \
  }
#define AEFAST_PICK_IDX(NAME, isa)                                                                    \
  ((isa) == Isa::kAvx512 ? &NAME##_avx512<scalar_t, acc_t, index_t>                                    \
                        : (isa) == Isa::kAvx2 ? &NAME##_avx2<scalar_t, acc_t, index_t> : &NAME##_base<scalar_t, acc_t, index_t>)
// The clone of NAME<scalar_t, acc_t> for isa.
#define AEFAST_PICK(NAME, isa) \
  ((isa) == Isa::kAvx512 ? &NAME##_avx512<scalar_t, acc_t> : (isa) == Isa::kAvx2 ? &NAME##_avx2<scalar_t, acc_t> : &NAME##_base<scalar_t, acc_t>)


namespace aefast {
namespace unpool_deconv_cpu {

// ---------------------------------------------------------------- ISA choice (aefast/cpu_isa.h)
inline Isa decoder_isa() { return cpu_isa(); }

// ---------------------------------------------------------------- vectors
// VecOf<T, B>: B bytes of T (GCC vector extension). B = 64 in the AVX-512 clones, 32 in the
// AVX2 and baseline ones (the baseline compiles them to pairs of SSE ops).
template <typename T, int B>
struct VecOf {
  typedef T type __attribute__((vector_size(B)));
  static constexpr int L = B / static_cast<int>(sizeof(T));
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
// Sum of the lanes, by halving (extract + add), not lane by lane.
template <typename T, int B>
AEFAST_ALWAYS_INLINE T hsum(typename VecOf<T, B>::type v) {
  if constexpr (B > 16) {
    using H = typename VecOf<T, B / 2>::type;
    H lo, hi;
    __builtin_memcpy(&lo, &v, B / 2);
    __builtin_memcpy(&hi, reinterpret_cast<const char*>(&v) + B / 2, B / 2);
    return hsum<T, B / 2>(lo + hi);
  } else {
    T s = 0;
    for (int l = 0; l < VecOf<T, B>::L; ++l) s += v[l];
    return s;
  }
}

// Vector width in bytes of each variant.
constexpr int vec_bytes(Isa isa) { return isa == Isa::kAvx512 ? 64 : 32; }

// ---------------------------------------------------------------- index decoding
// Per-call tables of the pool window: pos[o] = (o / pool_w) * W_u + o % pool_w (the position
// offset of window offset o from the window's corner), di/dj its row and column; and per
// "slot" s = p * window + o (window p, offset o) its unpooled position slot_q[s], or -1 where a
// clipped window reaches past the plane. Windows do not overlap, so slots name positions once.
struct WindowTable {
  int64_t window;
  std::vector<int64_t> pos, di, dj;
  std::vector<int32_t> slot_q;
  explicit WindowTable(const DecoderGeometry& g) : window(g.pool_h * g.pool_w) {
    pos.resize(window);
    di.resize(window);
    dj.resize(window);
    for (int64_t o = 0; o < window; ++o) {
      di[o] = o / g.pool_w;
      dj[o] = o % g.pool_w;
      pos[o] = di[o] * g.unpooled_w + dj[o];
    }
    slot_q.resize(g.pooled_h * g.pooled_w * window);
    for (int64_t ph = 0; ph < g.pooled_h; ++ph)
      for (int64_t pw = 0; pw < g.pooled_w; ++pw)
        for (int64_t o = 0; o < window; ++o) {
          const int64_t h = ph * g.pool_h + di[o], w = pw * g.pool_w + dj[o];
          slot_q[(ph * g.pooled_w + pw) * window + o] =
              h < g.unpooled_h && w < g.unpooled_w ? static_cast<int32_t>(h * g.unpooled_w + w) : -1;
        }
  }
};

// Offset o inside window (ph, pw) (corner (h0, w0)) named by index k, or -1 if the index does
// not name an element of that window inside the unpooled plane. Flat indices avoid a 64-bit
// division: inside the window, v - corner = i*W_u + j with i < pool_h, so i is counted by
// pool_h comparisons (branch-free: the argmax row is random).
template <typename index_t>
AEFAST_ALWAYS_INLINE int64_t decode_offset(const index_t* idx, int64_t k, int64_t h0, int64_t w0,
                                           const DecoderGeometry& g, const WindowTable& wt) {
  if constexpr (std::is_same_v<index_t, int64_t>) {
    const int64_t rel = idx[k] - (h0 * g.unpooled_w + w0);
    if (rel < 0) return -1;
    int64_t i = 0;
    for (int64_t q = 1; q <= g.pool_h; ++q) i += rel >= q * g.unpooled_w;
    const int64_t j = rel - i * g.unpooled_w;
    if (i >= g.pool_h || j >= g.pool_w || h0 + i >= g.unpooled_h || w0 + j >= g.unpooled_w) return -1;
    return i * g.pool_w + j;
  } else {
    const int64_t o = static_cast<int64_t>(idx[k]);
    if (o >= wt.window) return -1;
    if (h0 + wt.di[o] >= g.unpooled_h || w0 + wt.dj[o] >= g.unpooled_w) return -1;
    return o;
  }
}

// A per-thread scratch array with 64+ bytes of slack on both sides, so that its data never
// shares a cache line with another thread's allocation (measured: without the slack the
// bucket counters of two threads false-shared and 2 threads ran the forward 2x slower than 1).
template <typename T>
struct PaddedVec {
  static constexpr size_t kPad = 64 / sizeof(T) + 1;
  std::vector<T> v;
  void resize(size_t n) { v.resize(n + 2 * kPad); }
  void assign(size_t n, T x) { v.assign(n + 2 * kPad, x); }
  T* data() { return v.data() + kPad; }
  const T* data() const { return v.data() + kPad; }
  T& operator[](size_t i) { return v[i + kPad]; }
};

// channels_last images: one image's [P][C] block <-> the planar [C][P] layout that the
// kernels read and write (z, idx, grad_z; grad_out in the window-vector path). A per-image
// transpose in a per-thread buffer (C*P values, e.g. 64 x 7x7: L1/L2-resident), not a pass over
// the whole tensor; the forward's epilogue and the backward's gpre pass read / write
// channels-last output-sized tensors directly.
template <typename T>
inline void image_to_planar(const T* __restrict__ src, int64_t c_n, int64_t p_n, T* __restrict__ dst) {
  for (int64_t p = 0; p < p_n; ++p)
    for (int64_t c = 0; c < c_n; ++c) dst[c * p_n + p] = src[p * c_n + c];
}
template <typename T>
inline void image_to_channels_last(const T* __restrict__ src, int64_t c_n, int64_t p_n, T* __restrict__ dst) {
  for (int64_t p = 0; p < p_n; ++p)
    for (int64_t c = 0; c < c_n; ++c) dst[p * c_n + c] = src[c * p_n + p];
}

// The kernels read a row of pool windows channel by channel: the reads hop by a whole plane
// from channel to channel, which the hardware prefetchers do not follow. So the same windows of
// the next row are fetched (every channel) while this row is processed (measured: without it
// the decoding waited on memory for most of its time). z = nullptr: the indices alone.
template <typename scalar_t, typename index_t>
AEFAST_ALWAYS_INLINE void prefetch_window_row(const scalar_t* z, const index_t* idx, const DecoderGeometry& g,
                                              int64_t ph, int64_t pw0, int64_t pw1) {
  if (ph >= g.pooled_h) return;
  constexpr int64_t line = 64;
  const int64_t plane = g.pooled_h * g.pooled_w;
  for (int64_t c = 0; c < g.c_in; ++c) {
    const int64_t k0 = c * plane + ph * g.pooled_w + pw0, k1 = k0 + (pw1 - pw0);
    if (z != nullptr) {
      const char* zb = reinterpret_cast<const char*>(z + k0);
      const char* ze = reinterpret_cast<const char*>(z + k1);
      for (const char* a = zb; a < ze; a += line) __builtin_prefetch(a);
      __builtin_prefetch(ze - 1);
    }
    const char* ib = reinterpret_cast<const char*>(idx + k0);
    const char* ie = reinterpret_cast<const char*>(idx + k1);
    for (const char* a = ib; a < ie; a += line) __builtin_prefetch(a);
    __builtin_prefetch(ie - 1);
  }
}

// sigmoid on a whole float vector: 1 / (1 + exp(-x)) with exp by range reduction
// (x = n ln2 + r, |r| <= ln2/2) and the Cephes expf polynomial (about 1 ulp), 2^n through the
// exponent bits. x is clamped to [-88, 88] first (the result is then 0 or 1 to float precision
// anyway); NaN fails both comparisons of the clamp and propagates.
template <typename V, typename IV>
AEFAST_ALWAYS_INLINE V sigmoid_vec_f32(V x) {
  V t = -x;
  t = t > V{} + 88.0f ? V{} + 88.0f : t;
  t = t < V{} - 88.0f ? V{} - 88.0f : t;
  const V magic = V{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const V kf = (t * 1.44269504088896341f + magic) - magic;
  V r = t - kf * 0.693359375f;
  r = r - kf * -2.12194440e-4f;
  V p = V{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const IV ki = __builtin_convertvector(kf, IV);
  const IV bits = (ki + 127) << 23;
  V scale;
  __builtin_memcpy(&scale, &bits, sizeof(V));
  return 1.0f / (1.0f + p * scale);
}

// nl lanes of a into dst (a whole vector store when the types match).
template <typename scalar_t, typename acc_t, typename V>
AEFAST_ALWAYS_INLINE void wv_store(scalar_t* __restrict__ dst, const V& a, int64_t nl) {
  constexpr int L = static_cast<int>(sizeof(V) / sizeof(acc_t));
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (nl == L) {
      vstore(dst, a);
      return;
    }
  }
  for (int64_t l = 0; l < nl; ++l) dst[l] = static_cast<scalar_t>(a[l]);
}

// W[ci][co][kh][kw] -> Wt[ci][kh][kw][co] in the accumulation type, one zero-padded slab of kp
// values per input channel.
template <typename scalar_t, typename acc_t>
at::Tensor reorder_weight(const at::Tensor& weight, const DecoderGeometry& g, int64_t kp) {
  const scalar_t* w = weight.const_data_ptr<scalar_t>();
  at::Tensor wt_t = at::zeros({g.c_in * kp}, weight.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  acc_t* wt = wt_t.mutable_data_ptr<acc_t>();
  for (int64_t ci = 0; ci < g.c_in; ++ci)
    for (int64_t co = 0; co < g.c_out; ++co)
      for (int64_t kh = 0; kh < g.kernel_h; ++kh)
        for (int64_t kw = 0; kw < g.kernel_w; ++kw)
          wt[ci * kp + (kh * g.kernel_w + kw) * g.c_out + co] =
              static_cast<acc_t>(w[((ci * g.c_out + co) * g.kernel_h + kh) * g.kernel_w + kw]);
  return wt_t;
}

// t dense in fmt: itself when it already is, else a copy (cached buffer for the contiguous one).
inline at::Tensor dense_in(const at::Tensor& t, at::MemoryFormat fmt) {
  if (t.is_contiguous(fmt)) return t;
  return fmt == at::MemoryFormat::Contiguous ? contiguous_cpu_cached(t) : t.contiguous(fmt);
}

// Lower the first-bad position to v (min over images, whatever the thread order).
inline void atomic_min(std::atomic<int64_t>& a, int64_t v) {
  int64_t cur = a.load();
  while (v < cur && !a.compare_exchange_weak(cur, v)) {
  }
}

// The forward's error for an invalid index (aefast.functional parses "invalid index at linear
// position <k>" into its ValueError). bad: the first bad NCHW-linear position, INT64_MAX for none.
inline void check_no_bad_index(int64_t bad) {
  TORCH_CHECK(bad == std::numeric_limits<int64_t>::max(),
              "aefast::unpool_conv_transpose2d: invalid index at linear position ", bad,
              " (outside the unpooled plane or outside its own pool window)");
}

// Lanes of one vector of the accumulation type of dtype (double accumulates doubles, every other
// dtype floats) on isa.
inline int64_t decoder_lanes(Isa isa, at::ScalarType dtype) {
  return vec_bytes(isa) / (dtype == at::kDouble ? 8 : 4);
}

// What each forward derives from its call: the ISA, the lanes L, the slab length K and stride kp,
// the weight reordered into slabs and the bias padded to whole vectors (the epilogues load it by
// vector), both in the accumulation type.
template <typename scalar_t>
struct ForwardOperands {
  using acc_t = at::opmath_type<scalar_t>;
  Isa isa;
  int64_t L, K, kp;
  at::TensorOptions acc_opts;
  at::Tensor wt_t, b_t;
  ForwardOperands(const at::Tensor& z, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                  const DecoderGeometry& g)
      : isa(decoder_isa()),
        L(vec_bytes(isa) / static_cast<int64_t>(sizeof(acc_t))),
        K(g.kernel_h * g.kernel_w * g.c_out),
        kp((K + L - 1) / L * L),
        acc_opts(z.options().dtype(c10::CppTypeToScalarType<acc_t>::value)) {
    wt_t = reorder_weight<scalar_t, acc_t>(weight, g, kp);
    b_t = at::zeros({(g.c_out + L - 1) / L * L}, acc_opts);
    if (bias.has_value() && bias->defined()) b_t.narrow(0, 0, g.c_out).copy_(*bias);
  }
};

// Chunking of a slab of nvt vectors: chunks of at most max_nv vectors, and at most what keeps
// C_in chunks of weights within ~32 KiB (L1), balanced.
inline int64_t chunk_vectors(int64_t nvt, int64_t rows, int64_t vec_bytes_, int64_t max_nv) {
  const int64_t l1 = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, rows * vec_bytes_));
  const int64_t cap = std::max<int64_t>(1, std::min({max_nv, nvt, l1}));
  const int64_t chunks = (nvt + cap - 1) / cap;
  return (nvt + chunks - 1) / chunks;
}

// The backward's batch chunks: at most 16 of consecutive items, their size a function of N only
// (never of the thread count), so that the grad_weight partial sums, added in chunk order, do not
// depend on the number of threads.
inline int64_t backward_chunk_items(int64_t n) { return std::max<int64_t>(1, (n + 15) / 16); }

// The end of both families' backward: the chunk partials of grad_Wt (gwt: [chunk][ci][kp]) added
// in chunk order into grad_weight (W's layout), and the per-item bias partials (bias_part:
// [n][co]) in item order into grad_bias.
template <typename scalar_t, typename acc_t>
void finish_weight_bias_grads(acc_t* gwt, int64_t chunks, const acc_t* bias_part, const DecoderGeometry& g,
                              int64_t kp, std::array<bool, 3> mask, at::Tensor& grad_w, at::Tensor& grad_b) {
  if (mask[1]) {
    for (int64_t kc = 1; kc < chunks; ++kc) {
      const acc_t* part = gwt + kc * g.c_in * kp;
      for (int64_t e = 0; e < g.c_in * kp; ++e) gwt[e] += part[e];
    }
    scalar_t* gw = grad_w.mutable_data_ptr<scalar_t>();
    for (int64_t ci = 0; ci < g.c_in; ++ci)
      for (int64_t co = 0; co < g.c_out; ++co)
        for (int64_t kh = 0; kh < g.kernel_h; ++kh)
          for (int64_t kw = 0; kw < g.kernel_w; ++kw)
            gw[((ci * g.c_out + co) * g.kernel_h + kh) * g.kernel_w + kw] =
                static_cast<scalar_t>(gwt[ci * kp + (kh * g.kernel_w + kw) * g.c_out + co]);
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

// The backward's partial sums, through the c10 allocator (not std::vector) so that memory profilers
// see them: grad_b per item (bias_part[n][co]) and grad_Wt per fixed chunk of items (gwt[k][ci][kp],
// chunks of backward_chunk_items(N)); finish_weight_bias_grads adds them in item / chunk order.
template <typename acc_t>
struct WeightBiasPartials {
  int64_t chunk, chunks;
  at::Tensor bias_part_t, gwt_t;
  acc_t* bias_part;
  acc_t* gwt;
  WeightBiasPartials(const DecoderGeometry& g, int64_t kp, bool need_w, const at::TensorOptions& acc_opts)
      : chunk(backward_chunk_items(g.n)),
        chunks((g.n + chunk - 1) / chunk),
        bias_part_t(empty_cpu_cached({g.n * g.c_out}, acc_opts)),
        gwt_t(empty_cpu_cached({need_w ? chunks * g.c_in * kp : 0}, acc_opts)),
        bias_part(bias_part_t.mutable_data_ptr<acc_t>()),
        gwt(gwt_t.mutable_data_ptr<acc_t>()) {}
};

// One forward call, its arguments checked and laid out (dense in fmt) by unpool_conv_transpose2d_cpu.
struct ForwardCall {
  const at::Tensor& z;
  const at::Tensor& idx;
  const at::Tensor& weight;
  const std::optional<at::Tensor>& bias;
  const DecoderGeometry& g;
  DecoderAct act;
  double slope;
  bool cl;  // z, idx, out and pre channels_last
  at::Tensor& out;
  at::Tensor& pre;  // numel 0 when the activation needs no pre-activation
};
// One backward call (unpool_conv_transpose2d_backward_cpu).
struct BackwardCall {
  const at::Tensor& grad_out;
  const at::Tensor& act_in;
  const at::Tensor& z;
  const at::Tensor& idx;
  const at::Tensor& weight;
  const DecoderGeometry& g;
  DecoderAct act;
  double slope;
  std::array<bool, 3> mask;
  bool cl_in, cl_go;  // z / idx / grad_z, and grad_out / act_in, channels_last
  at::Tensor& grad_z;
  at::Tensor& grad_w;
  at::Tensor& grad_b;
};

// The dtype / index-type dispatch of every family entry: run.template operator()<scalar_t, index_t>()
// for z's dtype and idx's index form (int64 flat indices or uint8 window offsets).
template <typename F>
void dispatch_decoder_types(const at::Tensor& z, const at::Tensor& idx, const F& run) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "unpool_conv_transpose2d_cpu", [&] {
    if (idx.scalar_type() == at::kLong)
      run.template operator()<scalar_t, int64_t>();
    else
      run.template operator()<scalar_t, uint8_t>();
  });
}

// The families (each dispatches through dispatch_decoder_types).
void forward_per_entry(const ForwardCall& call);        // unpool_deconv_entries_forward.cpp
void backward_per_entry(const BackwardCall& call);      // unpool_deconv_entries_backward.cpp
void forward_window_vectors(const ForwardCall& call);   // unpool_deconv_window_vectors.cpp
void backward_window_vectors(const BackwardCall& call); // unpool_deconv_window_vectors.cpp
// The sparse forward of the family that serves call.g (unpool_deconv.cpp: the window-vector
// kernels where use_window_vectors says so, else the per-entry ones). Also the CPU encoder's
// input gradient (conv_pool_backward.cpp, dgrad_uses_decoder_forward), which is this forward applied to gz.
void forward_sparse(const ForwardCall& call);           // unpool_deconv.cpp

}  // namespace unpool_deconv_cpu
}  // namespace aefast
