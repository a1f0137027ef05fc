// CPU kernels of the unpool_deconv family: the fused decoder block
//   out = act(conv_transpose2d(max_unpool2d(z, idx, pool), W, b, stride, padding, output_padding))
// and the drop-in max_unpool2d, forward and backward.
//
// Math (dilation 1, groups 1). Let pos(n, ci, ph, pw) = (h, w) be where pooled value
// z[n, ci, ph, pw] sits in the unpooled plane (the map u is z there and 0 elsewhere). Then
//   pre[n, co, oy, ox] = b[co] + sum_{ci, ph, pw, kh, kw : oy = h*sh - padh + kh, ox = w*sw - padw + kw}
//                                z[n, ci, ph, pw] * W[ci, co, kh, kw]
// 1/(pool_h*pool_w) of the MACs of the dense transposed conv over u, and u is never built.
// With gpre = grad_out * act'(.) the gradients are
//   grad_z[n, ci, ph, pw] = sum_{co, kh, kw} gpre[n, co, h*sh - padh + kh, w*sw - padw + kw] * W[ci, co, kh, kw]
//       (the dgrad conv evaluated only at the argmax position of each window),
//   grad_W[ci, co, kh, kw] = sum_{n, ph, pw} z[n, ci, ph, pw] * gpre[n, co, h*sh - padh + kh, w*sw - padw + kw]
//       (only the nonzero positions of u contribute),
//   grad_b[co] = sum_{n, oy, ox} gpre[n, co, oy, ox].
//
// Notation. Wt[ci][kh][kw][co] is the weight reordered so that the KH*KW*C_out weights of one
// input channel form one contiguous "slab" of K = KH*KW*C_out values (padded with zeros to Kp,
// a whole number of SIMD vectors). An "entry" is one pooled value (ci, z) at its unpooled
// position q = h*W_u + w. Both directions work on one image at a time and on one row of pool
// windows (pool_h unpooled rows) at a time, reading z and idx channel by channel along the
// row (the next row is software-prefetched: the hop from channel to channel defeats the
// hardware prefetchers). Decoding an index IS its validation (see below).
//
// Forward (no zero-filled unpooled map; u is never built):
//   1. T[q][k] = sum_{e at q} z_e * Wt[c_e][k] (k < Kp), the tap vector of position q.
//      * large slabs (Kp > 4 vectors, e.g. 64->32: 18 zmm): GATHER. The entries of a row
//        segment of windows are bucketed by (window, offset) in one pass (each bucket has room
//        for C_in entries, so there are no prefix sums and no serial counter chains; ci stays
//        ascending), then per position the slab is summed in SIMD registers over its entries,
//        in column chunks of <= 8 vectors so that the C_in x chunk weight block stays in L1:
//        one weight load per FMA, nothing stored until the position is done.
//      * small slabs (Kp <= 4 vectors, e.g. C_out = 1 or 3: 9 or 27 taps in one or two
//        vectors) with windows of at most 4 elements (2x2, 1x2, 2x1, 1x1): not this layout at
//        all but the window-vector kernels (lanes = pool windows, taps = loop iterations; see
//        "small slabs: window vectors" below, with the measurements that led there).
//      * other small slabs (larger windows): a position holds only ~C_in/window entries of one
//        or two vectors, too few to pay for any sorting. The row band of T is zeroed and,
//        channel-major with Wt[c] in registers, each entry adds z * Wt[c] to T[q] (consecutive
//        entries hit different windows, so the adds do not wait on each other).
//   2. per output pixel (oy, ox): pre[co] = b[co] + sum_{taps (kh, kw) with oy = h*sh - padh + kh,
//      ox = w*sw - padw + kw} T[(h, w)][kh][kw][co], vectorised over co, bias fused, then the
//      activation at the (NCHW) store (a compile-time constant; relu / leaky_relu, and sigmoid
//      for fp32 accumulation, on whole vectors). (Calling ATen's vectorised sigmoid per image from inside the parallel region
//      was tried: with 2 OpenMP threads it cost ~7 ms per call in waits, so the transcendental
//      activations stay scalar here.) Each output row goes through a per-row channel buffer
//      into NCHW, and with large slabs T lives in a ring of unpooled rows: steps 1 and 2 run
//      row of windows by row of windows, so T stays in L2 (decoder_ring_rows).
// Why not the vendor GEMM (columns = unpooled values x W, then col2im): the argmax is per
// channel, so the channels that meet at one unpooled position differ from window to window; a
// dense GEMM must multiply the zeros of the unpooled map too (pool window x these MACs). Timed
// interleaved on the 2-core EPYC (bench_unpool_deconv's "vendor GEMM form" rows): MKL's GEMMs
// ALONE, on pre-gathered operands, take 1.3-2.8x this whole forward and 3-6.5x this whole
// backward on the benchmark and W2 shapes (and match it even for pool 1, no sparsity at all).
// Backward: gpre = grad_out * act'(.) is written once per image into a zero-bordered
// channels-last buffer gpad (the act a compile-time constant, the grad_b partials summed in
// vector lanes), so that the KH*KW*C_out neighbourhood nb(q) of position q (its footprint in
// gpre) is KH runs of KW*C_out contiguous values. Then
//   grad_z[e] = <Wt[c_e], nb(q_e)>   and   grad_Wt[ci] += sum_{e of ci} z_e * nb(q_e).
//   * large slabs: per channel. For each ci and each chunk of its slab, the weight chunk and the
//     grad_Wt chunk live in registers; every entry of ci loads its nb chunk once and uses it for
//     both the grad_z dot (a partial vector per entry, kept across chunks, reduced once) and the
//     grad_W FMA: two FMAs per load, nothing stored in the loop. When KW*C_out is a whole
//     number of vectors, nb is read straight from gpad (a few KiB, L1); otherwise from a
//     per-image im2col of gpad.
//   * small slabs with windows of at most 4 elements: the window-vector kernels (below).
//   * other small slabs: per row band of windows, nb of every position of the band is copied
//     once into a band im2col; then channel-major with Wt[c] and the grad_Wt[c] sum in
//     registers, each entry costs one nb load, a dot (grad_z) and an FMA (grad_W).
// SIMD: GCC vector extensions, compiled three times: baseline (x86-64 SSE2), AVX2+FMA (32-byte
// vectors) and AVX-512 (64-byte vectors), each hot loop nest a separate target-attributed
// function, picked at run time with __builtin_cpu_supports (never an AVX-512 instruction on a
// CPU without it). AEFAST_CPU_ISA=baseline|avx2|avx512 (read per call) caps the choice, so the
// tests run every variant on one machine; torch.ops.aefast.unpool_deconv_cpu_isa() says which
// one runs.
//
// Index validation: the forward decodes every index anyway, so it also finds the first invalid
// one in row-major order (outside the unpooled plane or outside its own pool window) and the op
// raises after the parallel region (no output is returned). aefast.functional turns that into
// the same ValueError as the separate check (first_bad_unpool_index) that the other backends
// still run first. Invalid entries are skipped by every kernel, so a direct torch.ops call
// with bad indices cannot write out of bounds (the backward skips them silently: grad 0).
// Duplicate positions cannot occur here: the indices must lie in their own (disjoint) windows.
//
// Determinism: every output element is owned by one thread and accumulated in a fixed order
// (forward and grad_input per image; grad_weight per fixed chunk of images, entries in a fixed
// channel / window order, the chunk partials added in chunk order; grad_bias from per-image
// partial sums added in image order). No atomics in the sums; results do not depend on the
// number of threads (the chunks depend on N only).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/library.h>

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

namespace aefast {
namespace {

// ---------------------------------------------------------------- ISA choice (aefast/cpu_isa.h)
Isa decoder_isa() { return cpu_isa(); }

int64_t unpool_deconv_cpu_isa() { return static_cast<int64_t>(decoder_isa()); }

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
// kernels below read and write (z, idx, grad_z; grad_out in the window-vector path). A per-image
// transpose in a per-thread buffer (C*P values, e.g. 64 x 7x7: L1/L2-resident), not a pass over
// the whole tensor; the forward's epilogue and the backward's gpre pass read / write
// channels-last output-sized tensors directly.
template <typename T>
void image_to_planar(const T* __restrict__ src, int64_t c_n, int64_t p_n, T* __restrict__ dst) {
  for (int64_t p = 0; p < p_n; ++p)
    for (int64_t c = 0; c < c_n; ++c) dst[c * p_n + p] = src[p * c_n + c];
}
template <typename T>
void image_to_channels_last(const T* __restrict__ src, int64_t c_n, int64_t p_n, T* __restrict__ dst) {
  for (int64_t p = 0; p < p_n; ++p)
    for (int64_t c = 0; c < c_n; ++c) dst[p * c_n + c] = src[c * p_n + p];
}

// Per-thread scratch: the entries of one segment of a row of pool windows, bucketed by slot
// (b = (pw - pw0) * window + o), each bucket with room for all C_in channels, so that the
// bucketing is a single pass with independent counters (no prefix sums, no serial chains).
template <typename acc_t>
struct ImageScratch {
  int64_t seg = 0;              // windows per segment
  int64_t cap = 0;              // bucket capacity (C_in)
  PaddedVec<int32_t> pos_of;  // [ci*plane + p] -> q, or -1 for an invalid index (per-channel backward)
  PaddedVec<int32_t> cnt;     // [b] entries in bucket b
  PaddedVec<int32_t> bq;      // [b] position of bucket b, -1 outside the plane
  PaddedVec<int32_t> ent_w;   // [b*cap + i] ci * Kp (the entry's weight slab)
  PaddedVec<acc_t> ent_z;     // [b*cap + i] z
  PaddedVec<uint8_t> has;     // [ring q] 1 if position q holds an entry (never set outside windows)
  ImageScratch(const DecoderGeometry& g, bool buckets, bool channels, int64_t ring_positions = 0) {
    const int64_t window = g.pool_h * g.pool_w;
    if (channels) pos_of.resize(g.c_in * g.pooled_h * g.pooled_w);
    if (!buckets) return;
    cap = g.c_in;
    // Segments of at most ~32K entries of room (a few hundred KiB), whole rows when they fit.
    seg = std::max<int64_t>(1, std::min<int64_t>(g.pooled_w, 32768 / std::max<int64_t>(1, window * cap)));
    cnt.resize(seg * window);
    bq.resize(seg * window);
    ent_w.resize(seg * window * cap);
    ent_z.resize(seg * window * cap);
    has.assign(ring_positions, 0);
  }
};

// The forward's tap vectors T of the large-slab path live in a ring of unpooled rows: row h at
// ring row h % rows. The epilogue of output row oy reads the rows h with h*sh - pad_h + kh = oy,
// h >= h_done - ceil((KH-1)/sh) for every row not yet done (h_done: the rows summed so far), and
// the next row of pool windows writes rows h_done .. h_done + pool_h - 1, so ceil((KH-1)/sh) +
// pool_h rows never alias a live row. Summing a row of windows and then running the epilogue of
// every output row it completes keeps T (rows * W_u * Kp values, e.g. 295 KB for 64->32 at 64x64)
// in L2 instead of streaming a whole image's T (4.7 MB there) through memory and back.
// A ring row holds W_u + 1 positions (one unused): with W_u * Kp a multiple of 4 KiB (64 x 288
// or 32 x 576 floats) the taps of vertically adjacent positions otherwise share one L1 set
// (measured: 64->32 unpooled 64x64 ran ~20% below 64x66 per multiply-add, 1 thread).
// AEFAST_DECODER_ROW_RING=0 keeps the whole image's T (the previous layout), for A/B timing.
inline int64_t decoder_ring_row_positions(const DecoderGeometry& g) { return g.unpooled_w + 1; }
inline int64_t decoder_ring_rows(const DecoderGeometry& g) {
  const char* env = std::getenv("AEFAST_DECODER_ROW_RING");
  if (env != nullptr && env[0] == '0' && env[1] == '\0') return g.unpooled_h;
  return std::min(g.unpooled_h, (g.kernel_h - 1 + g.stride_h - 1) / g.stride_h + g.pool_h);
}

// The kernels read a row of pool windows channel by channel: the reads hop by a whole plane
// from channel to channel, which the hardware prefetchers do not follow. So the same windows of
// the next row are fetched (every channel) while this row is processed (measured: without it
// the decoding waited on memory for most of its time).
template <typename scalar_t, typename index_t>
AEFAST_ALWAYS_INLINE void prefetch_window_row(const scalar_t* z, const index_t* idx, const DecoderGeometry& g,
                                              int64_t ph, int64_t pw0, int64_t pw1) {
  if (ph >= g.pooled_h) return;
  constexpr int64_t line = 64;
  const int64_t plane = g.pooled_h * g.pooled_w;
  for (int64_t c = 0; c < g.c_in; ++c) {
    const int64_t k0 = c * plane + ph * g.pooled_w + pw0, k1 = k0 + (pw1 - pw0);
    const char* zb = reinterpret_cast<const char*>(z + k0);
    const char* ze = reinterpret_cast<const char*>(z + k1);
    for (const char* a = zb; a < ze; a += line) __builtin_prefetch(a);
    __builtin_prefetch(ze - 1);
    const char* ib = reinterpret_cast<const char*>(idx + k0);
    const char* ie = reinterpret_cast<const char*>(idx + k1);
    for (const char* a = ib; a < ie; a += line) __builtin_prefetch(a);
    __builtin_prefetch(ie - 1);
  }
}

// Buckets the entries of windows (ph, pw0 .. pw1-1) by slot, ci ascending within a bucket
// (channel-major pass: idx and z are read contiguously along pw), sets has[] of their
// positions, and returns the first invalid k (linear within the image) or INT64_MAX.
template <typename scalar_t, typename acc_t, typename index_t>
__attribute__((noinline)) int64_t bucket_segment(const scalar_t* __restrict__ z, const index_t* __restrict__ idx,
                                                 const DecoderGeometry& g, const WindowTable& wtab, int64_t kp,
                                                 int64_t ph, int64_t pw0, int64_t pw1, int64_t ring_rows,
                                                 int64_t ring_row_pos, ImageScratch<acc_t>& s) {
  const int64_t plane = g.pooled_h * g.pooled_w, window = wtab.window, cap = s.cap, h0 = ph * g.pool_h;
  const int64_t nbk = (pw1 - pw0) * window;
  int32_t* __restrict__ cnt = s.cnt.data();
  int32_t* __restrict__ ent_w = s.ent_w.data();
  acc_t* __restrict__ ent_z = s.ent_z.data();
  int64_t first_bad = std::numeric_limits<int64_t>::max();
  std::fill(cnt, cnt + nbk, 0);
  prefetch_window_row(z, idx, g, ph + 1, pw0, pw1);
  for (int64_t c = 0; c < g.c_in; ++c) {
    const int64_t kb = c * plane + ph * g.pooled_w;
    const int32_t wo = static_cast<int32_t>(c * kp);
    for (int64_t pw = pw0; pw < pw1; ++pw) {
      const int64_t k = kb + pw;
      const int64_t o = decode_offset(idx, k, h0, pw * g.pool_w, g, wtab);
      if (o < 0) {
        first_bad = std::min(first_bad, k);
        continue;
      }
      const int64_t b = (pw - pw0) * window + o;
      const int64_t d = b * cap + cnt[b]++;
      ent_w[d] = wo;
      ent_z[d] = static_cast<acc_t>(z[k]);
    }
  }
  for (int64_t b = 0; b < nbk; ++b) {
    const int64_t pw = pw0 + b / window, o = b % window;
    const int32_t q = wtab.slot_q[(ph * g.pooled_w + pw) * window + o];
    // The position's place in the row ring (see decoder_ring_rows).
    const int32_t rq =
        q < 0 ? -1 : static_cast<int32_t>((q / g.unpooled_w % ring_rows) * ring_row_pos + q % g.unpooled_w);
    s.bq[b] = rq;
    if (rq >= 0) s.has[rq] = cnt[b] > 0;
  }
  return first_bad;
}

// pos_of of one image (channel-major); returns the first invalid k or INT64_MAX.
template <typename index_t>
int64_t positions_of(const index_t* __restrict__ idx, const DecoderGeometry& g, const WindowTable& wtab,
                     int32_t* __restrict__ pos_of) {
  const int64_t plane = g.pooled_h * g.pooled_w;
  int64_t first_bad = std::numeric_limits<int64_t>::max();
  for (int64_t c = 0; c < g.c_in; ++c)
    for (int64_t ph = 0; ph < g.pooled_h; ++ph) {
      const int64_t kb = c * plane + ph * g.pooled_w, h0 = ph * g.pool_h;
      for (int64_t pw = 0; pw < g.pooled_w; ++pw) {
        const int64_t o = decode_offset(idx, kb + pw, h0, pw * g.pool_w, g, wtab);
        if (o < 0) {
          pos_of[kb + pw] = -1;
          first_bad = std::min(first_bad, kb + pw);
        } else {
          pos_of[kb + pw] = static_cast<int32_t>(h0 * g.unpooled_w + pw * g.pool_w + wtab.pos[o]);
        }
      }
    }
  return first_bad;
}

// Output taps along one axis: for output coordinate o, the (kernel offset, input position)
// pairs with o = x*s - pad + kk, 0 <= x < extent. Flattened: first[o] .. first[o + 1].
struct AxisTaps {
  std::vector<int32_t> first, kk, x;
  AxisTaps(int64_t out, int64_t extent, int64_t kernel, int64_t stride, int64_t pad) {
    first.push_back(0);
    for (int64_t o = 0; o < out; ++o) {
      for (int64_t t = 0; t < kernel; ++t) {
        const int64_t num = o + pad - t;
        if (num < 0 || num % stride) continue;
        const int64_t xx = num / stride;
        if (xx >= extent) continue;
        kk.push_back(static_cast<int32_t>(t));
        x.push_back(static_cast<int32_t>(xx));
      }
      first.push_back(static_cast<int32_t>(kk.size()));
    }
  }
};

// ---------------------------------------------------------------- forward
// T[q][k0 : k0 + NV*L] = sum_{e at q} z_e * Wt[c_e][k0 : ...] for every position with entries,
// summed in NV vector registers (entries in CSR order), stored once.
template <int VB, int NV, typename acc_t>
AEFAST_ALWAYS_INLINE void slab_sums(const acc_t* __restrict__ wt, const int32_t* __restrict__ cnt,
                                    const int32_t* __restrict__ bq, const int32_t* __restrict__ ent_w,
                                    const acc_t* __restrict__ ent_z, int64_t cap, acc_t* __restrict__ T, int64_t kp,
                                    int64_t nbk) {
  using V = typename VecOf<acc_t, VB>::type;
  constexpr int L = VecOf<acc_t, VB>::L;
  for (int64_t b = 0; b < nbk; ++b) {
    const int32_t e0 = static_cast<int32_t>(b * cap), e1 = e0 + cnt[b];
    if (e0 == e1) continue;
    const int64_t q = bq[b];
    V a[NV];
    for (int j = 0; j < NV; ++j) a[j] = V{};
    for (int32_t e = e0; e < e1; ++e) {
      const V zb = V{} + ent_z[e];
      const acc_t* __restrict__ w = wt + ent_w[e];
      for (int j = 0; j < NV; ++j) a[j] += zb * vload<V>(w + j * L);
    }
    for (int j = 0; j < NV; ++j) vstore(T + q * kp + j * L, a[j]);
  }
}

// Chunking of a slab of nvt vectors: chunks of at most max_nv vectors, and at most what keeps
// C_in chunks of weights within ~32 KiB (L1), balanced.
inline int64_t chunk_vectors(int64_t nvt, int64_t rows, int64_t vec_bytes_, int64_t max_nv) {
  const int64_t l1 = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, rows * vec_bytes_));
  const int64_t cap = std::max<int64_t>(1, std::min({max_nv, nvt, l1}));
  const int64_t chunks = (nvt + cap - 1) / cap;
  return (nvt + chunks - 1) / chunks;
}

struct ForwardPlan {
  int64_t kp;   // slab stride (whole vectors)
  int64_t nvc;  // vectors per chunk
};

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

// Step 1 of the forward for every chunk of the slab.
template <int VB, typename scalar_t, typename acc_t>
AEFAST_ALWAYS_INLINE void slabs_body(const acc_t* wt, const int32_t* cnt, const int32_t* bq, const int32_t* ent_w,
                                     const acc_t* ent_z, int64_t cap, acc_t* T, int64_t kp, int64_t nvc,
                                     int64_t nbk) {
  constexpr int L = VecOf<acc_t, VB>::L;
  for (int64_t k0 = 0; k0 < kp; k0 += nvc * L) {
    const int64_t nv = std::min<int64_t>(nvc, (kp - k0) / L);
    switch (nv) {
#define AEFAST_SLAB_CASE(K)                                                  \
  case K:                                                                    \
    slab_sums<VB, K, acc_t>(wt + k0, cnt, bq, ent_w, ent_z, cap, T + k0, kp, nbk); \
    break;
      AEFAST_SLAB_CASE(1) AEFAST_SLAB_CASE(2) AEFAST_SLAB_CASE(3) AEFAST_SLAB_CASE(4)
      AEFAST_SLAB_CASE(5) AEFAST_SLAB_CASE(6) AEFAST_SLAB_CASE(7) AEFAST_SLAB_CASE(8)
#undef AEFAST_SLAB_CASE
      default: break;
    }
  }
}
AEFAST_ISA_CLONES(slabs,
                  (const acc_t* wt, const int32_t* cnt, const int32_t* bq, const int32_t* ent_w,
                   const acc_t* ent_z, int64_t cap, acc_t* T, int64_t kp, int64_t nvc, int64_t nbk),
                  (wt, cnt, bq, ent_w, ent_z, cap, T, kp, nvc, nbk))

// Step 1 for small slabs (kp <= 4 vectors, e.g. C_out = 1 or 3), one row of pool windows
// (unpooled rows h0 .. h0 + pool_h - 1): there a position holds about C_in / window entries
// of one or two vectors each, too few to pay for sorting them. Instead T of the row band is
// zeroed and every entry adds z * Wt[c] to T[q] (channel-major: Wt[c] stays in registers, idx
// and z are read contiguously; consecutive entries are different windows, so the adds do not
// wait on each other). Also decodes (checks) the row's indices: returns the first invalid k
// or INT64_MAX.
template <int VB, int NV, typename scalar_t, typename acc_t, typename index_t>
AEFAST_ALWAYS_INLINE int64_t band_sums(const scalar_t* __restrict__ z, const index_t* __restrict__ idx,
                                       const acc_t* __restrict__ wt, const DecoderGeometry& g,
                                       const WindowTable& wtab, int64_t kp, int64_t ph, acc_t* __restrict__ T) {
  using V = typename VecOf<acc_t, VB>::type;
  constexpr int L = VecOf<acc_t, VB>::L;
  const int64_t plane = g.pooled_h * g.pooled_w, h0 = ph * g.pool_h;
  const int64_t h1 = std::min(g.unpooled_h, h0 + g.pool_h);
  std::fill(T + h0 * g.unpooled_w * kp, T + h1 * g.unpooled_w * kp, acc_t(0));
  prefetch_window_row(z, idx, g, ph + 1, 0, g.pooled_w);
  int64_t first_bad = std::numeric_limits<int64_t>::max();
  const int64_t* __restrict__ pos = wtab.pos.data();
  for (int64_t c = 0; c < g.c_in; ++c) {
    V w[NV];
    for (int j = 0; j < NV; ++j) w[j] = vload<V>(wt + c * kp + j * L);
    const int64_t kb = c * plane + ph * g.pooled_w;
    for (int64_t pw = 0; pw < g.pooled_w; ++pw) {
      const int64_t k = kb + pw;
      const int64_t o = decode_offset(idx, k, h0, pw * g.pool_w, g, wtab);
      if (o < 0) {
        first_bad = std::min(first_bad, k);
        continue;
      }
      acc_t* __restrict__ t = T + (h0 * g.unpooled_w + pw * g.pool_w + pos[o]) * kp;
      const V zb = V{} + static_cast<acc_t>(z[k]);
      for (int j = 0; j < NV; ++j) vstore(t + j * L, vload<V>(t + j * L) + zb * w[j]);
    }
  }
  return first_bad;
}
template <int VB, typename scalar_t, typename acc_t, typename index_t>
AEFAST_ALWAYS_INLINE int64_t bands_body(const scalar_t* z, const index_t* idx, const acc_t* wt,
                                        const DecoderGeometry& g, const WindowTable& wtab, int64_t kp, acc_t* T) {
  constexpr int L = VecOf<acc_t, VB>::L;
  int64_t bad = std::numeric_limits<int64_t>::max();
  for (int64_t ph = 0; ph < g.pooled_h; ++ph) {
    int64_t b = bad;
    switch (kp / L) {
#define AEFAST_BAND_CASE(K)                                                                       \
  case K:                                                                                         \
    b = band_sums<VB, K, scalar_t, acc_t, index_t>(z, idx, wt, g, wtab, kp, ph, T); \
    break;
      AEFAST_BAND_CASE(1) AEFAST_BAND_CASE(2) AEFAST_BAND_CASE(3) AEFAST_BAND_CASE(4)
#undef AEFAST_BAND_CASE
      default: break;
    }
    bad = std::min(bad, b);
  }
  return bad;
}
AEFAST_ISA_CLONES_IDX(bands, int64_t,
                      (const scalar_t* z, const index_t* idx, const acc_t* wt, const DecoderGeometry& g,
                       const WindowTable& wtab, int64_t kp, acc_t* T),
                      (z, idx, wt, g, wtab, kp, T))

// Step 2 of the forward: gather the taps of every output pixel, bias, activation, NCHW store.
// The vector over co may run past C_out into the next tap or slab (T has L values of slack at
// its end): those lanes are never stored. has = nullptr: T is dense (zero where no entry).
// Output rows oy0 .. oy1-1; tap r of the rows reads T row rowq[r] (its position offset: ring
// row times the positions of a ring row, see decoder_ring_rows).
// Each output row is first written channel by channel into rowbuf (row stride
// epilogue_row_stride) and then copied to its C_out planes, one contiguous run each. Storing
// the lanes straight into NCHW wrote C_out lines a plane apart for every pixel: with planes of
// a multiple of 4 KiB (64x64 or 32x32 floats) those lines share one L1 set, and the forward of
// 64->32 at 64x64 ran at half the rate of 66x66 (measured, 1 thread, same process).
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

inline int64_t epilogue_row_stride(int64_t out_w) { return (out_w + 15) / 16 * 16 + 16; }

// One pixel's channels cb0 .. cb0 + NV*L - 1: bias + the taps at offs[0 .. nt) (in the
// fixed tap order), then the activation; stored as a channels_last run (cl) or lane by lane
// into the row buffer's channel rows (orow / prow, row stride rs, column ox).
template <int VB, int NV, DecoderAct A, typename scalar_t, typename acc_t>
AEFAST_ALWAYS_INLINE void epilogue_block(const acc_t* __restrict__ T, const int64_t* __restrict__ offs, int32_t nt,
                                         const acc_t* __restrict__ bias, int64_t cb0, int64_t co_n, acc_t sl,
                                         bool cl, scalar_t* __restrict__ out_px, scalar_t* __restrict__ pre_px,
                                         scalar_t* __restrict__ orow, scalar_t* __restrict__ prow, int64_t rs) {
  using V = typename VecOf<acc_t, VB>::type;
  constexpr int L = VecOf<acc_t, VB>::L;
  V a[NV];
  for (int j = 0; j < NV; ++j) a[j] = vload<V>(bias + cb0 + j * L);
  for (int32_t t = 0; t < nt; ++t) {
    const acc_t* __restrict__ src = T + offs[t] + cb0;
    for (int j = 0; j < NV; ++j) a[j] += vload<V>(src + j * L);
  }
  constexpr bool vec_done = A == DecoderAct::None || A == DecoderAct::Relu || A == DecoderAct::LeakyRelu ||
                            (A == DecoderAct::Sigmoid && std::is_same_v<acc_t, float>);
  for (int j = 0; j < NV; ++j) {
    const int64_t cb = cb0 + j * L, nl = std::min<int64_t>(L, co_n - cb);
    V v = a[j];
    if (pre_px) {
      if (cl)
        wv_store<scalar_t, acc_t>(pre_px + cb, v, nl);
      else
        for (int64_t l = 0; l < nl; ++l) prow[(cb + l) * rs] = static_cast<scalar_t>(v[l]);
    }
    // relu / leaky_relu on the whole vector (NaN propagates: x < 0 is false for it).
    if constexpr (A == DecoderAct::Relu) {
      v = v < V{} ? V{} : v;
    } else if constexpr (A == DecoderAct::LeakyRelu) {
      v = v >= V{} ? v : v * sl;
    } else if constexpr (A == DecoderAct::Sigmoid && std::is_same_v<acc_t, float>) {
      v = sigmoid_vec_f32<V, typename VecOf<int32_t, VB>::type>(v);
    }
    if constexpr (!vec_done)
      for (int64_t l = 0; l < nl; ++l) v[l] = act_forward<acc_t>(v[l], A, sl);
    if (cl)
      wv_store<scalar_t, acc_t>(out_px + cb, v, nl);
    else
      for (int64_t l = 0; l < nl; ++l) orow[(cb + l) * rs] = static_cast<scalar_t>(v[l]);
  }
}

// Per output row: for each pixel the T offsets of its taps are listed once (rows r outer,
// columns c inner: the fixed summation order), then its channels are summed in blocks of up to
// 8 vectors held in registers (the tap list and its index tables are read once per pixel, not
// once per channel vector: measured, the per-vector re-walk made this epilogue ~100 cycles a
// pixel for 64->32).
template <int VB, DecoderAct A, typename scalar_t, typename acc_t>
AEFAST_ALWAYS_INLINE void epilogue_act(const acc_t* __restrict__ T, const uint8_t* __restrict__ has,
                                       const acc_t* __restrict__ bias, const DecoderGeometry& g, const AxisTaps& rt,
                                       const int64_t* __restrict__ rowq, const AxisTaps& ct, int64_t kp,
                                       DecoderAct act, acc_t sl, scalar_t* __restrict__ out,
                                       scalar_t* __restrict__ pre, int64_t oy0, int64_t oy1,
                                       scalar_t* __restrict__ rowbuf, bool cl) {
  constexpr int L = VecOf<acc_t, VB>::L;
  constexpr int64_t kMaxBlock = 8;  // vectors of channels per register block
  const int64_t co_n = g.c_out, hw_out = g.out_h * g.out_w, kw_n = g.kernel_w;
  const int64_t rs = epilogue_row_stride(g.out_w), nvt = (co_n + L - 1) / L;
  scalar_t* __restrict__ orow = rowbuf;
  scalar_t* __restrict__ prow = rowbuf + co_n * rs;
  int64_t offs_stack[64];
  std::vector<int64_t> offs_heap(g.kernel_h * g.kernel_w > 64 ? g.kernel_h * g.kernel_w : 0);
  int64_t* __restrict__ offs = offs_heap.empty() ? offs_stack : offs_heap.data();
  for (int64_t oy = oy0; oy < oy1; ++oy) {
    const int32_t r0 = rt.first[oy], r1 = rt.first[oy + 1];
    for (int64_t ox = 0; ox < g.out_w; ++ox) {
      const int32_t c0 = ct.first[ox], c1 = ct.first[ox + 1];
      int32_t nt = 0;
      for (int32_t r = r0; r < r1; ++r) {
        const int64_t qrow = rowq[r], krow = rt.kk[r] * kw_n;
        for (int32_t c = c0; c < c1; ++c) {
          const int64_t q = qrow + ct.x[c];
          if (has && !has[q]) continue;
          offs[nt++] = q * kp + (krow + ct.kk[c]) * co_n;
        }
      }
      // channels_last: the pixel's C_out values are one contiguous run of the output.
      scalar_t* out_px = cl ? out + (oy * g.out_w + ox) * co_n : nullptr;
      scalar_t* pre_px = pre ? (cl ? pre + (oy * g.out_w + ox) * co_n : prow + ox) : nullptr;
      for (int64_t v0 = 0; v0 < nvt; v0 += kMaxBlock) {
        switch (std::min(kMaxBlock, nvt - v0)) {
#define AEFAST_EPI_CASE(K)                                                                                     \
  case K:                                                                                                      \
    epilogue_block<VB, K, A, scalar_t, acc_t>(T, offs, nt, bias, v0 * L, co_n, sl, cl, out_px, pre_px, orow + ox, \
                                              prow + ox, rs);                                                  \
    break;
          AEFAST_EPI_CASE(1) AEFAST_EPI_CASE(2) AEFAST_EPI_CASE(3) AEFAST_EPI_CASE(4)
          AEFAST_EPI_CASE(5) AEFAST_EPI_CASE(6) AEFAST_EPI_CASE(7) AEFAST_EPI_CASE(8)
#undef AEFAST_EPI_CASE
          default: break;
        }
      }
    }
    if (cl) continue;
    for (int64_t co = 0; co < co_n; ++co) {
      std::memcpy(out + co * hw_out + oy * g.out_w, orow + co * rs, sizeof(scalar_t) * g.out_w);
      if (pre) std::memcpy(pre + co * hw_out + oy * g.out_w, prow + co * rs, sizeof(scalar_t) * g.out_w);
    }
  }
}
template <int VB, typename scalar_t, typename acc_t>
AEFAST_ALWAYS_INLINE void epilogue_body(const acc_t* T, const uint8_t* has, const acc_t* bias, const DecoderGeometry& g,
                                        const AxisTaps& rt, const int64_t* rowq, const AxisTaps& ct, int64_t kp,
                                        DecoderAct act, acc_t sl, scalar_t* out, scalar_t* pre, int64_t oy0,
                                        int64_t oy1, scalar_t* rowbuf, bool cl) {
#define AEFAST_EPILOGUE(A) \
  epilogue_act<VB, A, scalar_t, acc_t>(T, has, bias, g, rt, rowq, ct, kp, act, sl, out, pre, oy0, oy1, rowbuf, cl)
  AEFAST_FOR_DECODER_ACT(act, AEFAST_EPILOGUE)
#undef AEFAST_EPILOGUE
}
AEFAST_ISA_CLONES(epilogue,
                  (const acc_t* T, const uint8_t* has, const acc_t* bias, const DecoderGeometry& g,
                   const AxisTaps& rt, const int64_t* rowq, const AxisTaps& ct, int64_t kp, DecoderAct act,
                   acc_t sl, scalar_t* out, scalar_t* pre, int64_t oy0, int64_t oy1, scalar_t* rowbuf, bool cl),
                  (T, has, bias, g, rt, rowq, ct, kp, act, sl, out, pre, oy0, oy1, rowbuf, cl))

// ---------------------------------------------------------------- small slabs: window vectors
// The forward and backward of small slabs (K = KH*KW*C_out taps in at most 4 vectors, e.g.
// C_out = 1 or 3) with pool windows of at most 4 elements (2x2, 1x2, 1x1).
//
// Where the time went in the per-entry kernels above (band_sums + epilogue, band_grads), measured
// on the 2-core EPYC by switching single steps off in one process (1 thread, fp32, window
// indices; 32->1 @28x28 N=256 / 32->3 @128x128 N=32):
//   * forward 7.6 / 23 ms: the epilogue 4.4 / 12.6 ms, i.e. ~80 cycles per output pixel: a
//     16-lane vector per tap of which 1 (C_out = 1) or 3 lanes are used, the tap lists walked
//     through the AxisTaps indirection, tap loads that split cache lines (taps are 1 or 3 values
//     apart), one scalar NCHW store per channel; and band_sums 3.1 / 10.5 ms, ~7-9 cycles per
//     entry (decode with table lookups, then a read-modify-write of T[q] per entry).
//   * backward 5.4 / 17.8 ms: band_grads 4.9 / 15.3 ms (gpre only 0.45 / 2.5 ms): per entry one
//     16-lane horizontal sum to get a single grad_z value, and the band im2col copies K values
//     per position with scalar moves (for C_out = 3, 27 copies per position: more than 6
//     moves per entry).
// So a position-major layout (one vector per position, taps in lanes) wastes most lanes and
// moves when the slab is small. Here the lanes are L consecutive pool WINDOWS of one row of
// windows (vectorised over x), and the taps are loop iterations with a broadcast weight:
//   forward:  A[o][k][pw] = sum_c [off_c(pw) == o] z_c(pw) Wt[c][k]   (o = window offset)
//     i.e. per channel u_o = select(off == o, z, 0) and one FMA per (o, k); the select makes this
//     the dense transposed conv over the unpooled positions of the row (window times the MACs
//     of the sparse sums, no scatter, no decode in the loop: 2 loads + 1 compare per L entries
//     and offset). A is added into a planar, zero-bordered accumulator Acc[co][h*sh + kh]
//     [w*sw + kw] (w = pw*pool_w + dj: pool_w = 2 interleaves two offset planes with a shuffle,
//     pool_w = 1 adds directly; other strides / pools by scalar adds), and the epilogue reads
//     Acc rows with bias and activation, vectorised over ox, straight into NCHW.
//   backward: gpre goes into the same planar zero-bordered layout (gplan); per row of windows
//     Gp[o][k][pw] = gplan[co][h*sh + kh][w*sw + kw] (a de-interleave for pool_w = 2), then per
//     channel s_k = Gp[off(pw)][k][pw] (window selects), grad_z = sum_k Wt[c][k] s_k (one FMA
//     per tap, all lanes useful) and the grad_Wt[c][k] lane partials += z s_k.
// Invalid entries (and the lanes past the row) are packed as offset -1 and z = 0: no select
// picks them, so they add nothing and get grad_z 0 (written with the others). The packing
// decodes (validates) every index, so the forward still names the first bad one. Sum orders
// are fixed (channels ascending, then taps into Acc in (row of windows, offset, tap) order,
// grad_W lanes summed in lane order per batch chunk): results do not depend on the thread
// count.
//
// Where the time goes now (same shapes, 1 thread, rdtsc around each step; shares of the
// kernel): forward 32->1: packing ~40% (reading z + offsets: ~memory bound), FMAs ~35%,
// adds into Acc ~12%, epilogue ~9%; 32->3: FMAs ~60% (at the FMA ports: the dense select
// costs `window` x the sparse MACs), packing ~20%. Backward 32->1: selects + FMAs ~38%, the
// grad_z write ~25% (write-allocate misses), packing ~18%, Gp gather ~15%; 32->3: selects +
// FMAs ~65% (bound by the masked loads: window x K per L entries), packing, gather and the
// grad_z write ~12% each. Tried and dropped: picking each tap from the 16 distinct footprint
// planes of 2x2 windows / 3x3 kernels by two blends (fewer loads, but blends compete with the
// FMAs: 12% slower for 32->3).
struct WvGeom {
  int64_t LW;  // pooled_w rounded up to whole vectors (the lanes of one row of windows)
  int64_t K;   // taps KH*KW*C_out
  int64_t R;   // rows of Acc / gplan: every h*sh + kh and every oy + pad_h
  int64_t C;   // columns: every vector access (w < LW*pool_w) and every ox + pad_w, plus slack
  int64_t RB;  // rows of windows packed at once
  int64_t RBb; // rows of windows per backward block (their footprints Gp within ~32 KiB)
};
inline WvGeom wv_geom(const DecoderGeometry& g, int64_t L, int64_t acc_bytes) {
  WvGeom w;
  w.LW = (g.pooled_w + L - 1) / L * L;
  w.K = g.kernel_h * g.kernel_w * g.c_out;
  w.R = std::max((g.unpooled_h - 1) * g.stride_h + g.kernel_h, g.out_h + g.pad_h);
  w.C = std::max(w.LW * g.pool_w * g.stride_w + g.kernel_w, g.out_w + g.pad_w) + L;
  // ~128 KiB of packed rows (L2): z and idx are read channel by channel in runs of RB rows.
  w.RB = std::max<int64_t>(1, std::min(g.pooled_h, 131072 / std::max<int64_t>(1, 2 * g.c_in * w.LW * acc_bytes)));
  w.RBb = std::max<int64_t>(
      1, std::min(w.RB, 32768 / std::max<int64_t>(1, g.pool_h * g.pool_w * w.K * w.LW * acc_bytes)));
  return w;
}
// Whether the window-vector kernels run (else band_sums / band_grads): small slabs and windows
// of at most 4 elements (the dense select costs `window` FMAs per entry and tap vector).
// AEFAST_DECODER_WINDOW_VECTORS=0 (read per call) turns them off, so that the per-entry band
// kernels they replaced run instead: for A/B timing (bench/bench_kernel_ledger.py) and tests.
inline bool use_window_vectors(const DecoderGeometry& g, int64_t kp, int64_t L) {
  if (const char* env = std::getenv("AEFAST_DECODER_WINDOW_VECTORS"); env != nullptr && *env != '\0') {
    const std::string_view v(env);
    TORCH_CHECK(v == "0" || v == "1", "AEFAST_DECODER_WINDOW_VECTORS must be 0 or 1, got '", v, "'");
    if (v == "0") return false;
  }
  return kp / L <= 4 && g.pool_h * g.pool_w <= 4;
}

// Rows ph0 .. ph1-1 of pool windows of one image into Zb[((ph - ph0)*C_in + c)*LW + pw] (z in
// acc_t; 0 for an invalid entry and the lanes past pooled_w) and Ob (the window offset; -1 for
// those). Channel-major over runs of rows: the reads are long sequential runs (reading one row of
// windows for every channel hops by a plane per channel, and with only a few FMAs per entry
// left, the hardware prefetchers and a one-row software prefetch could not keep up: packing
// row by row took 6 cycles per entry, most of the kernel's time).
// cv: scratch of 2*(RB*pooled_w + L) values. Returns the first invalid k (within the image) or
// INT64_MAX.
template <int VB, typename scalar_t, typename acc_t, typename index_t>
AEFAST_ALWAYS_INLINE int64_t wv_pack(const scalar_t* __restrict__ z, const index_t* __restrict__ idx,
                                     const DecoderGeometry& g, const WindowTable& wtab, int64_t ph0, int64_t ph1,
                                     int64_t LW, acc_t* __restrict__ cv, acc_t* __restrict__ Zb,
                                     acc_t* __restrict__ Ob) {
  using V = typename VecOf<acc_t, VB>::type;
  constexpr int L = VecOf<acc_t, VB>::L;
  const int64_t plane = g.pooled_h * g.pooled_w, pwn = g.pooled_w, window = wtab.window, run = (ph1 - ph0) * pwn;
  // Clipped windows (the plane ends inside a window) need the full decode.
  const bool clipped = ph1 * g.pool_h > g.unpooled_h || pwn * g.pool_w > g.unpooled_w;
  int64_t first_bad = std::numeric_limits<int64_t>::max();
  V lane, badv{};  // badv: lanes that met an offset >= window
  for (int l = 0; l < L; ++l) lane[l] = static_cast<acc_t>(l);
  acc_t* __restrict__ cz = cv;
  acc_t* __restrict__ co = cv + run + L;
  for (int64_t c = 0; c < g.c_in; ++c) {
    const int64_t kc = c * plane + ph0 * pwn;  // the channel's run of rows is contiguous
    bool fast = false;
    if constexpr (std::is_same_v<index_t, uint8_t>) fast = !clipped;
    if (fast) {
      // Every offset < window names a position inside the plane. The run is widened to acc_t by
      // plain loops over the whole run (GCC 12 vectorises those: vpmovzxbd + vcvtdq2ps; it
      // lowered a byte-vector __builtin_convertvector, and fixed 16-element loops, to scalar
      // inserts), then each row is masked in vectors (lanes past the row read the next row or
      // the slack, and are replaced).
      for (int64_t i = 0; i < run; ++i) co[i] = static_cast<acc_t>(idx[kc + i]);
      for (int64_t i = 0; i < run; ++i) cz[i] = static_cast<acc_t>(z[kc + i]);
      for (int64_t ph = ph0; ph < ph1; ++ph) {
        const int64_t r = (ph - ph0) * pwn;
        acc_t* __restrict__ zr = Zb + ((ph - ph0) * g.c_in + c) * LW;
        acc_t* __restrict__ orow = Ob + ((ph - ph0) * g.c_in + c) * LW;
        for (int64_t pw = 0; pw < LW; pw += L) {
          const V ov = vload<V>(co + r + pw), zv = vload<V>(cz + r + pw);
          // Only selects, no logic on masks (GCC 12 lowers & / ~ of AVX-512 compare masks to
          // scalar code): lanes past the row -> -1, offsets >= window -> counted and -1.
          const V ovr = lane < V{} + static_cast<acc_t>(pwn - pw) ? ov : V{} - acc_t(1);
          const auto big = ovr >= V{} + static_cast<acc_t>(window);
          badv += big ? V{} + acc_t(1) : V{};
          const V oo = big ? V{} - acc_t(1) : ovr;
          vstore(orow + pw, oo);
          vstore(zr + pw, oo >= V{} ? zv : V{});
        }
      }
      continue;
    }
    for (int64_t ph = ph0; ph < ph1; ++ph) {
      const int64_t h0 = ph * g.pool_h, kb = c * plane + ph * pwn;
      acc_t* __restrict__ zr = Zb + ((ph - ph0) * g.c_in + c) * LW;
      acc_t* __restrict__ orow = Ob + ((ph - ph0) * g.c_in + c) * LW;
      for (int64_t pw = 0; pw < pwn; ++pw) {
        const int64_t o = decode_offset(idx, kb + pw, h0, pw * g.pool_w, g, wtab);
        if (o < 0) {
          first_bad = std::min(first_bad, kb + pw);
          orow[pw] = acc_t(-1);
          zr[pw] = acc_t(0);
        } else {
          orow[pw] = static_cast<acc_t>(o);
          zr[pw] = static_cast<acc_t>(z[kb + pw]);
        }
      }
      for (int64_t pw = pwn; pw < LW; ++pw) {
        orow[pw] = acc_t(-1);
        zr[pw] = acc_t(0);
      }
    }
  }
  // Vector lanes that met a bad offset: find the first one (the error path only).
  bool vec_bad = false;
  for (int l = 0; l < L; ++l) vec_bad |= badv[l] != acc_t(0);
  if (vec_bad && std::is_same_v<index_t, uint8_t>)
    for (int64_t c = 0; c < g.c_in; ++c)
      for (int64_t ph = ph0; ph < ph1; ++ph)
        for (int64_t pw = 0; pw < pwn; ++pw) {
          const int64_t k = c * plane + ph * pwn + pw;
          if (static_cast<int64_t>(idx[k]) >= window) {
            first_bad = std::min(first_bad, k);
            pw = pwn;
            ph = ph1;
            c = g.c_in;
          }
        }
  return first_bad;
}

// Shuffle masks: interleave two vectors (half 0: lanes 0 .. L/2-1 of both, half 1: the rest),
// and pick the even (odd = 0) or odd lanes of the concatenation of two vectors.
template <typename acc_t, int VB>
struct WvShuffle {
  using I = std::conditional_t<sizeof(acc_t) == 4, int32_t, int64_t>;
  using M = typename VecOf<I, VB>::type;
  static constexpr int L = VecOf<acc_t, VB>::L;
  static AEFAST_ALWAYS_INLINE M interleave(int half) {
    M m;
    for (int l = 0; l < L; ++l) m[l] = static_cast<I>(half * (L / 2) + l / 2 + (l % 2) * L);
    return m;
  }
  static AEFAST_ALWAYS_INLINE M pick(int odd) {
    M m;
    for (int l = 0; l < L; ++l) m[l] = static_cast<I>(2 * l + odd);
    return m;
  }
};

// Forward, one group of G taps of one offset o for L windows: A[g][lane] = sum_c u_c * Wt[c][g]
// with u_c = z_c where the channel's offset is o, else 0. G accumulators in registers.
template <int VB, int G, typename acc_t>
AEFAST_ALWAYS_INLINE void wv_fwd_group(const acc_t* __restrict__ Zb, const acc_t* __restrict__ Ob, int64_t LW,
                                       int64_t c_in, const acc_t* __restrict__ wt, int64_t kp, acc_t oc,
                                       acc_t* __restrict__ A) {
  using V = typename VecOf<acc_t, VB>::type;
  V acc[G];
  for (int j = 0; j < G; ++j) acc[j] = V{};
  const V ocv = V{} + oc;
  for (int64_t c = 0; c < c_in; ++c) {
    const V zv = vload<V>(Zb + c * LW), ov = vload<V>(Ob + c * LW);
    const V u = ov == ocv ? zv : V{};
    const acc_t* __restrict__ w = wt + c * kp;
    for (int j = 0; j < G; ++j) acc[j] += u * w[j];
  }
  for (int j = 0; j < G; ++j) vstore(A + j * VecOf<acc_t, VB>::L, acc[j]);
}

// Forward of one row of windows: A[o][k][pw] for every offset and tap, then added into Acc.
// A and Gp are stored in tiles of L windows: element (o, k, pw) at ((o*NB + pw/L)*K + k)*L + pw%L
// (NB = LW/L), so that the G taps of a group sit at constant offsets from one pointer.
template <int VB, typename acc_t>
AEFAST_ALWAYS_INLINE void wv_fwd_row(const acc_t* Zb, const acc_t* Ob, const acc_t* wt, int64_t kp,
                                     const DecoderGeometry& g, const WvGeom& wg, int64_t ph, acc_t* __restrict__ A,
                                     acc_t* __restrict__ Acc) {
  using V = typename VecOf<acc_t, VB>::type;
  constexpr int L = VecOf<acc_t, VB>::L;
  constexpr int64_t GMAX = VB == 64 ? 16 : 8;  // accumulators + 4 temporaries within the registers
  const int64_t K = wg.K, LW = wg.LW, NB = LW / L, window = g.pool_h * g.pool_w;
  const int64_t ng = (K + GMAX - 1) / GMAX, gs = (K + ng - 1) / ng;
  for (int64_t jb = 0; jb < LW; jb += L)
    for (int64_t o = 0; o < window; ++o)
      for (int64_t k0 = 0; k0 < K; k0 += gs) {
        acc_t* a = A + ((o * NB + jb / L) * K + k0) * L;
        switch (std::min(gs, K - k0)) {
#define AEFAST_WVF_CASE(G_)                                                                                    \
  case G_:                                                                                                     \
    if constexpr (G_ <= GMAX) wv_fwd_group<VB, G_, acc_t>(Zb + jb, Ob + jb, LW, g.c_in, wt + k0, kp, acc_t(o), a); \
    break;
          AEFAST_WVF_CASE(1) AEFAST_WVF_CASE(2) AEFAST_WVF_CASE(3) AEFAST_WVF_CASE(4) AEFAST_WVF_CASE(5)
          AEFAST_WVF_CASE(6) AEFAST_WVF_CASE(7) AEFAST_WVF_CASE(8) AEFAST_WVF_CASE(9) AEFAST_WVF_CASE(10)
          AEFAST_WVF_CASE(11) AEFAST_WVF_CASE(12) AEFAST_WVF_CASE(13) AEFAST_WVF_CASE(14) AEFAST_WVF_CASE(15)
          AEFAST_WVF_CASE(16)
#undef AEFAST_WVF_CASE
          default: break;
        }
      }
  // A into Acc: entry (o = (di, dj), pw) sits at h = h0 + di, w = pw*pool_w + dj; its tap
  // (kh, kw, co) lands on Acc[co][h*sh + kh][w*sw + kw]. Lanes past the row and invalid entries
  // hold 0 in A (vector adds may touch the slack columns).
  using S = WvShuffle<acc_t, VB>;
  const int64_t h0 = ph * g.pool_h;
  for (int64_t di = 0; di < g.pool_h; ++di) {
    const int64_t h = h0 + di;
    if (h >= g.unpooled_h) break;
    for (int64_t kh = 0; kh < g.kernel_h; ++kh)
      for (int64_t kw = 0; kw < g.kernel_w; ++kw)
        for (int64_t co = 0; co < g.c_out; ++co) {
          const int64_t k = (kh * g.kernel_w + kw) * g.c_out + co;
          acc_t* __restrict__ row = Acc + (co * wg.R + h * g.stride_h + kh) * wg.C + kw;
          if (g.pool_w == 1 && g.stride_w == 1) {
            for (int64_t pw = 0; pw < LW; pw += L) {
              const acc_t* a = A + ((di * NB + pw / L) * K + k) * L;
              vstore(row + pw, vload<V>(row + pw) + vload<V>(a));
            }
          } else if (g.pool_w == 2 && g.stride_w == 1) {
            for (int64_t pw = 0; pw < LW; pw += L) {
              const V v0 = vload<V>(A + (((2 * di) * NB + pw / L) * K + k) * L);
              const V v1 = vload<V>(A + (((2 * di + 1) * NB + pw / L) * K + k) * L);
              const V lo = __builtin_shuffle(v0, v1, S::interleave(0));
              const V hi = __builtin_shuffle(v0, v1, S::interleave(1));
              vstore(row + 2 * pw, vload<V>(row + 2 * pw) + lo);
              vstore(row + 2 * pw + L, vload<V>(row + 2 * pw + L) + hi);
            }
          } else {
            for (int64_t dj = 0; dj < g.pool_w; ++dj) {
              const int64_t o = di * g.pool_w + dj;
              for (int64_t pw = 0; pw < g.pooled_w; ++pw) {
                const int64_t w = pw * g.pool_w + dj;
                if (w >= g.unpooled_w) break;
                row[w * g.stride_w] += A[((o * NB + pw / L) * K + k) * L + pw % L];
              }
            }
          }
        }
  }
}

// Epilogue: out[co][oy][ox] = act(Acc[co][oy + pad_h][ox + pad_w] + b[co]), vectorised over ox.
template <int VB, DecoderAct A, typename scalar_t, typename acc_t>
AEFAST_ALWAYS_INLINE void wv_epilogue_act(const acc_t* __restrict__ Acc, const acc_t* __restrict__ bias,
                                          const DecoderGeometry& g, const WvGeom& wg, acc_t sl,
                                          scalar_t* __restrict__ out, scalar_t* __restrict__ pre) {
  using V = typename VecOf<acc_t, VB>::type;
  constexpr int L = VecOf<acc_t, VB>::L;
  constexpr bool vec_act = A == DecoderAct::None || A == DecoderAct::Relu || A == DecoderAct::LeakyRelu ||
                           (A == DecoderAct::Sigmoid && std::is_same_v<acc_t, float>);
  for (int64_t co = 0; co < g.c_out; ++co) {
    const acc_t bc = bias[co];
    for (int64_t oy = 0; oy < g.out_h; ++oy) {
      const acc_t* __restrict__ src = Acc + (co * wg.R + oy + g.pad_h) * wg.C + g.pad_w;
      const int64_t ob = (co * g.out_h + oy) * g.out_w;
      for (int64_t ox = 0; ox < g.out_w; ox += L) {
        const int64_t nl = std::min<int64_t>(L, g.out_w - ox);
        V a;
        if (nl == L) {
          a = vload<V>(src + ox);
        } else {
          a = V{};
          for (int64_t l = 0; l < nl; ++l) a[l] = src[ox + l];
        }
        a += bc;
        if (pre) wv_store<scalar_t, acc_t>(pre + ob + ox, a, nl);
        if constexpr (A == DecoderAct::Relu) {
          a = a < V{} ? V{} : a;  // NaN propagates
        } else if constexpr (A == DecoderAct::LeakyRelu) {
          a = a >= V{} ? a : a * sl;
        } else if constexpr (A == DecoderAct::Sigmoid && std::is_same_v<acc_t, float>) {
          a = sigmoid_vec_f32<V, typename VecOf<int32_t, VB>::type>(a);
        }
        if constexpr (!vec_act)
          for (int64_t l = 0; l < nl; ++l) a[l] = act_forward<acc_t>(a[l], A, sl);
        wv_store<scalar_t, acc_t>(out + ob + ox, a, nl);
      }
    }
  }
}

// Forward of one image: returns the first invalid k (within the image) or INT64_MAX.
template <int VB, typename scalar_t, typename acc_t, typename index_t>
AEFAST_ALWAYS_INLINE int64_t wv_forward_body(const scalar_t* z, const index_t* idx, const acc_t* wt,
                                             const acc_t* bias, const DecoderGeometry& g, const WindowTable& wtab,
                                             const WvGeom& wg, int64_t kp, acc_t* cv, DecoderAct act, acc_t sl,
                                             acc_t* Zb, acc_t* Ob, acc_t* A, acc_t* Acc, scalar_t* out,
                                             scalar_t* pre) {
  std::fill(Acc, Acc + g.c_out * wg.R * wg.C, acc_t(0));
  int64_t bad = std::numeric_limits<int64_t>::max();
  for (int64_t ph0 = 0; ph0 < g.pooled_h; ph0 += wg.RB) {
    const int64_t ph1 = std::min(g.pooled_h, ph0 + wg.RB);
    bad = std::min(bad, wv_pack<VB, scalar_t, acc_t, index_t>(z, idx, g, wtab, ph0, ph1, wg.LW, cv, Zb, Ob));
    for (int64_t ph = ph0; ph < ph1; ++ph) {
      const int64_t r = (ph - ph0) * g.c_in * wg.LW;
      wv_fwd_row<VB, acc_t>(Zb + r, Ob + r, wt, kp, g, wg, ph, A, Acc);
    }
  }
#define AEFAST_WVE_CASE(A) wv_epilogue_act<VB, A, scalar_t, acc_t>(Acc, bias, g, wg, sl, out, pre)
  AEFAST_FOR_DECODER_ACT(act, AEFAST_WVE_CASE)
#undef AEFAST_WVE_CASE
  return bad;
}
AEFAST_ISA_CLONES_IDX(wv_forward, int64_t,
                      (const scalar_t* z, const index_t* idx, const acc_t* wt, const acc_t* bias,
                       const DecoderGeometry& g, const WindowTable& wtab, const WvGeom& wg, int64_t kp,
                       acc_t* cv, DecoderAct act, acc_t sl, acc_t* Zb, acc_t* Ob, acc_t* A, acc_t* Acc,
                       scalar_t* out, scalar_t* pre),
                      (z, idx, wt, bias, g, wtab, wg, kp, cv, act, sl, Zb, Ob, A, Acc, out, pre))

// Backward: gpre = grad_out * act'(.) of one image into the planar zero-bordered gplan
// (interior rows pad_h .., columns pad_w ..; the border is never written), and the per-channel
// sums (grad_b partials) in vector lanes.
template <int VB, DecoderAct A, typename scalar_t, typename acc_t>
AEFAST_ALWAYS_INLINE void wv_gpre_act(const scalar_t* __restrict__ go, const scalar_t* __restrict__ ai,
                                      const DecoderGeometry& g, const WvGeom& wg, acc_t sl, acc_t* __restrict__ gplan,
                                      acc_t* __restrict__ bias_part) {
  using V = typename VecOf<acc_t, VB>::type;
  constexpr int L = VecOf<acc_t, VB>::L;
  for (int64_t co = 0; co < g.c_out; ++co) {
    V vs = V{};
    acc_t tail = 0;
    for (int64_t oy = 0; oy < g.out_h; ++oy) {
      const scalar_t* __restrict__ gr = go + (co * g.out_h + oy) * g.out_w;
      const scalar_t* __restrict__ ar = ai + (co * g.out_h + oy) * g.out_w;
      acc_t* __restrict__ row = gplan + (co * wg.R + oy + g.pad_h) * wg.C + g.pad_w;
      for (int64_t ox = 0; ox < g.out_w; ++ox)
        row[ox] = static_cast<acc_t>(gr[ox]) * act_derivative<acc_t>(static_cast<acc_t>(ar[ox]), A, sl);
      int64_t ox = 0;
      for (; ox + L <= g.out_w; ox += L) vs += vload<V>(row + ox);
      for (; ox < g.out_w; ++ox) tail += row[ox];
    }
    bias_part[co] = hsum<acc_t, VB>(vs) + tail;
  }
}
template <int VB, typename scalar_t, typename acc_t>
AEFAST_ALWAYS_INLINE void wv_gpre_body(const scalar_t* go, const scalar_t* ai, const DecoderGeometry& g,
                                       const WvGeom& wg, DecoderAct act, acc_t sl, acc_t* gplan, acc_t* bias_part) {
#define AEFAST_WVG_CASE(A) wv_gpre_act<VB, A, scalar_t, acc_t>(go, ai, g, wg, sl, gplan, bias_part)
  AEFAST_FOR_DECODER_ACT(act, AEFAST_WVG_CASE)
#undef AEFAST_WVG_CASE
}
AEFAST_ISA_CLONES(wv_gpre,
                  (const scalar_t* go, const scalar_t* ai, const DecoderGeometry& g, const WvGeom& wg,
                   DecoderAct act, acc_t sl, acc_t* gplan, acc_t* bias_part),
                  (go, ai, g, wg, act, sl, gplan, bias_part))

// Gp[o][k][pw] = gplan[co][h*sh + kh][w*sw + kw] for entry (o = (di, dj), pw) of row ph of windows
// (h = h0 + di, w = pw*pool_w + dj): the gpre footprint of every position, planar per tap.
template <int VB, typename acc_t>
AEFAST_ALWAYS_INLINE void wv_gather(const acc_t* __restrict__ gplan, const DecoderGeometry& g, const WvGeom& wg,
                                    int64_t ph, acc_t* __restrict__ Gp) {
  using V = typename VecOf<acc_t, VB>::type;
  constexpr int L = VecOf<acc_t, VB>::L;
  using S = WvShuffle<acc_t, VB>;
  const int64_t K = wg.K, LW = wg.LW, NB = LW / L, h0 = ph * g.pool_h;
  for (int64_t di = 0; di < g.pool_h; ++di) {
    const int64_t h = h0 + di;
    for (int64_t dj = 0; dj < g.pool_w; ++dj) {
      const int64_t o = di * g.pool_w + dj;
      for (int64_t kh = 0; kh < g.kernel_h; ++kh)
        for (int64_t kw = 0; kw < g.kernel_w; ++kw)
          for (int64_t co = 0; co < g.c_out; ++co) {
            const int64_t k = (kh * g.kernel_w + kw) * g.c_out + co;
            const acc_t* __restrict__ src = gplan + (co * wg.R + h * g.stride_h + kh) * wg.C + kw;
            for (int64_t pw = 0; pw < LW; pw += L) {
              acc_t* __restrict__ dst = Gp + ((o * NB + pw / L) * K + k) * L;
              if (h >= g.unpooled_h) {  // no valid entry has this offset: never selected
                vstore(dst, V{});
              } else if (g.pool_w == 1 && g.stride_w == 1) {
                vstore(dst, vload<V>(src + pw));
              } else if (g.pool_w == 2 && g.stride_w == 1) {
                const V v0 = vload<V>(src + 2 * pw), v1 = vload<V>(src + 2 * pw + L);
                vstore(dst, dj ? __builtin_shuffle(v0, v1, S::pick(1)) : __builtin_shuffle(v0, v1, S::pick(0)));
              } else {
                for (int l = 0; l < L; ++l)
                  dst[l] = pw + l < g.pooled_w ? src[((pw + l) * g.pool_w + dj) * g.stride_w] : acc_t(0);
              }
            }
          }
    }
  }
}

// Backward, one channel and one group of G taps over nr rows of windows (row r: packed z / offsets
// and grad_z partials at r*zrs, footprints at Gp + r*gs): per L windows s_j =
// Gp[off][j] (window selects, 0 for invalid lanes), grad_z partial += sum_j Wt[c][j] s_j (kept in
// gzp across the groups), grad_Wt lane partials gw[j] += z s_j in registers over all the rows
// (one read-modify-write of gwv per channel and block, not per row).
template <int VB, int G, typename acc_t>
AEFAST_ALWAYS_INLINE void wv_bwd_group(const acc_t* __restrict__ zc0, const acc_t* __restrict__ oc0, int64_t zrs,
                                       int64_t nr, int64_t LW, int64_t window, int64_t K,
                                       const acc_t* __restrict__ Gp0, int64_t gs, int64_t k0,
                                       const acc_t* __restrict__ w, acc_t* __restrict__ gzp0, bool first, bool last,
                                       acc_t* __restrict__ gwv, bool need_z, bool need_w) {
  using V = typename VecOf<acc_t, VB>::type;
  constexpr int L = VecOf<acc_t, VB>::L;
  V gw[G];
  for (int j = 0; j < G; ++j) gw[j] = V{};
  for (int64_t r = 0; r < nr; ++r)
  for (int64_t jb = 0; jb < LW; jb += L) {
    const acc_t* __restrict__ zc = zc0 + r * zrs;
    const acc_t* __restrict__ oc = oc0 + r * zrs;
    const acc_t* __restrict__ Gp = Gp0 + r * gs;
    acc_t* __restrict__ gzp = gzp0 + r * zrs;
    const V ov = vload<V>(oc + jb);
    V s[G];
    for (int j = 0; j < G; ++j) s[j] = V{};
    for (int64_t o = 0; o < window; ++o) {
      const auto m = ov == V{} + static_cast<acc_t>(o);
      const acc_t* __restrict__ gp = Gp + ((o * (LW / L) + jb / L) * K + k0) * L;
      for (int j = 0; j < G; ++j) s[j] = m ? vload<V>(gp + j * L) : s[j];
    }
    if (need_z) {
      V d0 = first ? V{} : vload<V>(gzp + jb), d1 = V{};  // two chains: the FMA latency
      for (int j = 0; j < G; ++j) {
        if (j % 2) d1 += w[j] * s[j];
        else d0 += w[j] * s[j];
      }
      // invalid entries and lanes past the row: grad 0 (also for non-finite weights)
      vstore(gzp + jb, last ? (ov >= V{} ? d0 + d1 : V{}) : d0 + d1);
    }
    if (need_w) {
      const V zv = vload<V>(zc + jb);
      for (int j = 0; j < G; ++j) gw[j] += zv * s[j];
    }
  }
  if (need_w)
    for (int j = 0; j < G; ++j) vstore(gwv + j * L, vload<V>(gwv + j * L) + gw[j]);
}

// Backward of one image (gplan holds its gpre): grad_z of every valid entry, and the grad_Wt
// lane partials GWv[(c*K + k)*L + lane] accumulated.
// Per packed block of RB rows (channel-major reads, see wv_pack), sub-blocks of RBb rows whose
// footprints Gp stay in L1; grad_z of the block is collected in gzb (laid out like Zb) and written
// channel-major at the end (long sequential runs again: writing each row for every channel
// hopped a plane per channel, and the write misses cost more than the arithmetic).
template <int VB, typename scalar_t, typename acc_t, typename index_t>
AEFAST_ALWAYS_INLINE void wv_backward_body(const scalar_t* z, const index_t* idx, const acc_t* wt,
                                           const DecoderGeometry& g, const WindowTable& wtab, const WvGeom& wg,
                                           int64_t kp, acc_t* cv, const acc_t* gplan, acc_t* Zb, acc_t* Ob, acc_t* Gp,
                                           acc_t* gzb, scalar_t* gz, acc_t* GWv, bool need_z, bool need_w) {
  constexpr int L = VecOf<acc_t, VB>::L;
  constexpr int64_t GMAX = VB == 64 ? 12 : 5;  // s[] and gw[] in registers
  const int64_t K = wg.K, LW = wg.LW, window = wtab.window, plane = g.pooled_h * g.pooled_w;
  const int64_t ng = (K + GMAX - 1) / GMAX, gs = (K + ng - 1) / ng, GS = window * K * LW, zrs = g.c_in * LW;
  for (int64_t pb0 = 0; pb0 < g.pooled_h; pb0 += wg.RB) {
    const int64_t pb1 = std::min(g.pooled_h, pb0 + wg.RB);
    wv_pack<VB, scalar_t, acc_t, index_t>(z, idx, g, wtab, pb0, pb1, LW, cv, Zb, Ob);  // invalid: skipped
    for (int64_t ph0 = pb0; ph0 < pb1; ph0 += wg.RBb) {
      const int64_t ph1 = std::min(pb1, ph0 + wg.RBb), nr = ph1 - ph0, rb = (ph0 - pb0) * zrs;
      for (int64_t r = 0; r < nr; ++r) wv_gather<VB, acc_t>(gplan, g, wg, ph0 + r, Gp + r * GS);
      for (int64_t c = 0; c < g.c_in; ++c) {
        for (int64_t k0 = 0; k0 < K; k0 += gs) {
          switch (std::min(gs, K - k0)) {
#define AEFAST_WVB_CASE(G_)                                                                                     \
  case G_:                                                                                                      \
    if constexpr (G_ <= GMAX)                                                                                   \
      wv_bwd_group<VB, G_, acc_t>(Zb + rb + c * LW, Ob + rb + c * LW, zrs, nr, LW, window, K, Gp, GS, k0,          \
                                  wt + c * kp + k0, gzb + rb + c * LW, k0 == 0, k0 + G_ == K,                   \
                                  need_w ? GWv + (c * K + k0) * L : nullptr, need_z, need_w);                   \
    break;
            AEFAST_WVB_CASE(1) AEFAST_WVB_CASE(2) AEFAST_WVB_CASE(3) AEFAST_WVB_CASE(4) AEFAST_WVB_CASE(5)
            AEFAST_WVB_CASE(6) AEFAST_WVB_CASE(7) AEFAST_WVB_CASE(8) AEFAST_WVB_CASE(9) AEFAST_WVB_CASE(10)
            AEFAST_WVB_CASE(11) AEFAST_WVB_CASE(12)
#undef AEFAST_WVB_CASE
            default: break;
          }
        }
      }
    }
    if (need_z)  // every element, invalid entries 0
      for (int64_t c = 0; c < g.c_in; ++c)
        for (int64_t ph = pb0; ph < pb1; ++ph) {
          scalar_t* __restrict__ gzr = gz + c * plane + ph * g.pooled_w;
          const acc_t* __restrict__ src = gzb + ((ph - pb0) * g.c_in + c) * LW;
          for (int64_t pw = 0; pw < g.pooled_w; ++pw) gzr[pw] = static_cast<scalar_t>(src[pw]);
        }
  }
}
AEFAST_ISA_CLONES_IDX(wv_backward, void,
                      (const scalar_t* z, const index_t* idx, const acc_t* wt, const DecoderGeometry& g,
                       const WindowTable& wtab, const WvGeom& wg, int64_t kp, acc_t* cv, const acc_t* gplan,
                       acc_t* Zb, acc_t* Ob, acc_t* Gp, acc_t* gzp, scalar_t* gz, acc_t* GWv, bool need_z,
                       bool need_w),
                      (z, idx, wt, g, wtab, wg, kp, cv, gplan, Zb, Ob, Gp, gzp, gz, GWv, need_z, need_w))

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
at::Tensor dense_in(const at::Tensor& t, at::MemoryFormat fmt) {
  if (t.is_contiguous(fmt)) return t;
  return fmt == at::MemoryFormat::Contiguous ? contiguous_cpu_cached(t) : t.contiguous(fmt);
}

// Lower the first-bad position to v (min over images, whatever the thread order).
void atomic_min(std::atomic<int64_t>& a, int64_t v) {
  int64_t cur = a.load();
  while (v < cur && !a.compare_exchange_weak(cur, v)) {
  }
}

template <typename scalar_t, typename index_t>
void forward_typed(const at::Tensor& z, const at::Tensor& idx, const at::Tensor& weight,
                   const std::optional<at::Tensor>& bias, const DecoderGeometry& g, DecoderAct act, double slope,
                   bool cl, at::Tensor& out, at::Tensor& pre) {
  using acc_t = at::opmath_type<scalar_t>;
  const Isa isa = decoder_isa();
  const int64_t L = vec_bytes(isa) / static_cast<int64_t>(sizeof(acc_t));
  const int64_t K = g.kernel_h * g.kernel_w * g.c_out, kp = (K + L - 1) / L * L;
  const ForwardPlan plan{kp, chunk_vectors(kp / L, g.c_in, vec_bytes(isa), 8)};
  const at::TensorOptions acc_opts = z.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const at::Tensor wt_t = reorder_weight<scalar_t, acc_t>(weight, g, kp);
  // Bias padded to whole vectors (the epilogue loads it by vector).
  at::Tensor b_t = at::zeros({(g.c_out + L - 1) / L * L}, acc_opts);
  if (bias.has_value() && bias->defined()) b_t.narrow(0, 0, g.c_out).copy_(*bias);
  const acc_t* wt = wt_t.const_data_ptr<acc_t>();
  const acc_t* b = b_t.const_data_ptr<acc_t>();
  const WindowTable wtab(g);
  const AxisTaps rt(g.out_h, g.unpooled_h, g.kernel_h, g.stride_h, g.pad_h);
  const AxisTaps ct(g.out_w, g.unpooled_w, g.kernel_w, g.stride_w, g.pad_w);
  const scalar_t* zp = z.const_data_ptr<scalar_t>();
  const index_t* ip = idx.const_data_ptr<index_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  scalar_t* pp = pre.numel() ? pre.mutable_data_ptr<scalar_t>() : nullptr;
  const int64_t plane_in = g.c_in * g.pooled_h * g.pooled_w, plane_out = g.c_out * g.out_h * g.out_w;
  const int64_t P = g.unpooled_h * g.unpooled_w, plane = g.pooled_h * g.pooled_w, hw_out = g.out_h * g.out_w;
  const acc_t sl = static_cast<acc_t>(slope);
  std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};
  const auto slabs = AEFAST_PICK(slabs, isa);
  const auto epilogue = AEFAST_PICK(epilogue, isa);
  // Small slabs: row bands of dense T (band_sums); larger ones: bucketed entries (slab_sums).
  const bool small = kp / L <= 4;
  const auto bands = AEFAST_PICK_IDX(bands, isa);
  // Small slabs with small windows: the window-vector kernels (wv_forward).
  const bool wv = use_window_vectors(g, kp, L);
  // The path taken, named in the profiler (bench/bench_kernel_ledger.py reads it).
  RECORD_USER_SCOPE(wv ? "aefast path: unpool_conv_transpose2d window vectors"
                       : "aefast path: unpool_conv_transpose2d per entry");
  const WvGeom wg = wv_geom(g, L, sizeof(acc_t));
  const auto wv_forward = AEFAST_PICK_IDX(wv_forward, isa);
  // Large slabs: T in a ring of unpooled rows, each output row's epilogue run as soon as the
  // rows it reads are summed (decoder_ring_rows). The small-slab bands keep the image's T.
  const int64_t ring = small ? g.unpooled_h : decoder_ring_rows(g);
  const int64_t row_pos = small ? g.unpooled_w : decoder_ring_row_positions(g);
  std::vector<int64_t> rowq(rt.x.size()), need_h(static_cast<size_t>(g.out_h), -1);
  for (size_t r = 0; r < rt.x.size(); ++r) rowq[r] = (rt.x[r] % ring) * row_pos;
  for (int64_t oy = 0; oy < g.out_h; ++oy)  // the last unpooled row output row oy reads
    for (int32_t r = rt.first[oy]; r < rt.first[oy + 1]; ++r) need_h[oy] = std::max<int64_t>(need_h[oy], rt.x[r]);
  at::parallel_for(0, g.n, 1, [&](int64_t n0, int64_t n1) {
    ImageScratch<acc_t> scratch(g, !small, false, ring * row_pos);
    // T: one slab per position (of the ring, or of the image for small slabs) plus L values of
    // slack (the epilogue's last vector may run past the last slab). Zeroed once so that no
    // lane is ever uninitialised.
    at::Tensor T_t = zeros_cpu_cached({wv ? 0 : (small ? P : ring * row_pos) * kp + L}, acc_opts);
    // The epilogue's output row (and pre-activation row) of every channel.
    std::vector<scalar_t> rowbuf_v(wv ? 0 : 2 * g.c_out * epilogue_row_stride(g.out_w));
    scalar_t* rowbuf = rowbuf_v.data();
    acc_t* T = T_t.mutable_data_ptr<acc_t>();
    // wv: the packed row of windows (z, offsets), the offset x tap tiles A, the accumulator Acc.
    const int64_t wpk = wv ? wg.RB * g.c_in * wg.LW : 0, wa = wv ? wtab.window * wg.K * wg.LW : 0;
    const int64_t wcv = wv ? 2 * (wg.RB * g.pooled_w + L) : 0;
    at::Tensor wv_t = empty_cpu_cached({wv ? 2 * wpk + wa + g.c_out * wg.R * wg.C + wcv : 0}, acc_opts);
    acc_t* Zb = wv_t.mutable_data_ptr<acc_t>();
    acc_t* Ob = Zb + wpk;
    acc_t* Ab = Ob + wpk;
    acc_t* Acc = Ab + wa;
    acc_t* cv = Acc + (wv ? g.c_out * wg.R * wg.C : 0);
    // channels_last: the image's z and idx in planar order (image_to_planar); the window-vector
    // path also writes planar output (and pre-activation) images, transposed out afterwards.
    std::vector<scalar_t> z_pl(cl ? plane_in : 0), out_pl(cl && wv ? (pp ? 2 : 1) * plane_out : 0);
    std::vector<index_t> idx_pl(cl ? plane_in : 0);
    for (int64_t n = n0; n < n1; ++n) {
      const scalar_t* zn = zp + n * plane_in;
      const index_t* in = ip + n * plane_in;
      if (cl) {
        image_to_planar(zn, g.c_in, plane, z_pl.data());
        image_to_planar(in, g.c_in, plane, idx_pl.data());
        zn = z_pl.data();
        in = idx_pl.data();
      }
      scalar_t* o = op + n * plane_out;
      scalar_t* p = pp ? pp + n * plane_out : nullptr;
      int64_t bad = std::numeric_limits<int64_t>::max();
      if (wv) {
        scalar_t* ow = cl ? out_pl.data() : o;
        scalar_t* pw = p && cl ? out_pl.data() + plane_out : p;
        bad = wv_forward(zn, in, wt, b, g, wtab, wg, kp, cv, act, sl, Zb, Ob, Ab, Acc, ow, pw);
        if (cl) {
          image_to_channels_last(ow, g.c_out, hw_out, o);
          if (p) image_to_channels_last(pw, g.c_out, hw_out, p);
        }
        if (bad != std::numeric_limits<int64_t>::max()) atomic_min(first_bad, n * plane_in + bad);
        continue;
      }
      if (small) {
        bad = bands(zn, in, wt, g, wtab, kp, T);
        epilogue(T, nullptr, b, g, rt, rowq.data(), ct, kp, act, sl, o, p, 0, g.out_h, rowbuf, cl);
      } else {
        uint8_t* has = scratch.has.data();
        int64_t oy_done = 0;  // output rows [0, oy_done) are written
        for (int64_t ph = 0; ph < g.pooled_h; ++ph) {
          for (int64_t pw0 = 0; pw0 < g.pooled_w; pw0 += scratch.seg) {
            const int64_t pw1 = std::min(g.pooled_w, pw0 + scratch.seg);
            bad = std::min(bad, bucket_segment<scalar_t, acc_t, index_t>(zn, in, g, wtab, kp, ph, pw0, pw1, ring,
                                                                         row_pos, scratch));
            slabs(wt, scratch.cnt.data(), scratch.bq.data(), scratch.ent_w.data(), scratch.ent_z.data(),
                  scratch.cap, T, kp, plan.nvc, (pw1 - pw0) * wtab.window);
          }
          const int64_t h_done = std::min(g.unpooled_h, (ph + 1) * g.pool_h);
          int64_t oy1 = oy_done;
          while (oy1 < g.out_h && need_h[oy1] < h_done) ++oy1;
          epilogue(T, has, b, g, rt, rowq.data(), ct, kp, act, sl, o, p, oy_done, oy1, rowbuf, cl);
          oy_done = oy1;
        }
        // Unpooled rows below the last row of windows hold no entry; their ring rows may hold
        // another row's flags.
        for (int64_t h = g.pooled_h * g.pool_h; h < g.unpooled_h; ++h)
          std::fill(has + (h % ring) * row_pos, has + (h % ring + 1) * row_pos, uint8_t(0));
        epilogue(T, has, b, g, rt, rowq.data(), ct, kp, act, sl, o, p, oy_done, g.out_h, rowbuf, cl);
      }
      if (bad != std::numeric_limits<int64_t>::max()) atomic_min(first_bad, n * plane_in + bad);
    }
  });
  const int64_t bad = first_bad.load();
  // aefast.functional parses "invalid index at linear position <k>" into its ValueError.
  TORCH_CHECK(bad == std::numeric_limits<int64_t>::max(),
              "aefast::unpool_conv_transpose2d: invalid index at linear position ", bad,
              " (outside the unpooled plane or outside its own pool window)");
}

// ---------------------------------------------------------------- few input channels: the vendor's conv
// With few input channels (SegNet's and the tutorial AEs' 8- and 16-channel decoders, channels_last)
// the sparse kernels above have little to sum per position (~C_in/window entries of a K =
// KH*KW*C_out slab) and run at ~20 GFLOP/s, while oneDNN's channels-last transposed conv over the
// unpooled map, doing `window` times the MACs, runs at ~100. There the forward scatters the pooled
// values into a zeroed channels-last unpooled map (decoding, i.e. validating, every index on the
// way, as the kernels above do), runs the vendor's transposed conv and applies the activation in
// place; the backward keeps the sparse kernels. Measured (1 thread, CPU time, interleaved, loaded
// machine; forward vendor / sparse): N16 16->16 24->48 1.77 / 2.48 ms, 16->8 48->96 6.06 / 8.24,
// N128 8->8 14->28 2.60 / 4.48, 16->8 4.25 / 5.42, N32 32->16 32->64 11.0 / 15.8; but N256 64->32
// 14->28 64.7 / 30.4 (the W1 decoder), N16 16->5 48->96 5.49 / 3.00 (C_out < 8: the window-vector
// kernels) and N16 8->8 48->96 6.5 / 7.5 (even, fwd+bwd). The rule: channels_last, fp32 (the dtype
// measured), C_in <= 32, C_out >= 8, windows of <= 4 elements. AEFAST_DECODER_FORWARD=vendor|sparse
// (read per call) overrides it, for A/B timing (bench/bench_kernel_ledger.py) and tests.
constexpr int64_t kVendorForwardMaxCin = 32;
constexpr int64_t kVendorForwardMinCout = 8;

bool decoder_forward_uses_vendor(const DecoderGeometry& g, bool cl, at::ScalarType dtype) {
  if (const char* env = std::getenv("AEFAST_DECODER_FORWARD"); env != nullptr && *env != '\0') {
    const std::string v(env);
    TORCH_CHECK(v == "vendor" || v == "sparse", "AEFAST_DECODER_FORWARD must be 'vendor' or 'sparse', got '", v, "'");
    return v == "vendor";
  }
  return cl && dtype == at::kFloat && g.c_in <= kVendorForwardMaxCin && g.c_out >= kVendorForwardMinCout &&
         g.pool_h * g.pool_w <= 4;
}

// u[n, c, h, w] = z at the position each index names, 0 elsewhere (u zeroed by the caller, in z's
// layout). Returns the NCHW-linear position of the first invalid index, or INT64_MAX.
template <typename scalar_t, typename index_t>
int64_t scatter_unpooled(const at::Tensor& z, const at::Tensor& idx, const DecoderGeometry& g, at::Tensor& u) {
  const WindowTable wt(g);
  const int64_t C = g.c_in, HP = g.pooled_h, WP = g.pooled_w;
  // Element strides of z/idx and u (dense in one layout: NCHW or channels-last).
  const int64_t zs_c = z.stride(1), zs_h = z.stride(2), zs_w = z.stride(3), zs_n = z.stride(0);
  const int64_t us_c = u.stride(1), us_h = u.stride(2), us_w = u.stride(3), us_n = u.stride(0);
  const scalar_t* zp = z.const_data_ptr<scalar_t>();
  const index_t* ip = idx.const_data_ptr<index_t>();
  scalar_t* up = u.mutable_data_ptr<scalar_t>();
  std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};
  at::parallel_for(0, g.n * HP, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, WP * C)), [&](int64_t r0, int64_t r1) {
    int64_t bad = std::numeric_limits<int64_t>::max();
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / HP, ph = r % HP;
      for (int64_t pw = 0; pw < WP; ++pw)
        for (int64_t c = 0; c < C; ++c) {
          const int64_t k = n * zs_n + c * zs_c + ph * zs_h + pw * zs_w;
          const int64_t o = decode_offset<index_t>(ip, k, ph * g.pool_h, pw * g.pool_w, g, wt);
          if (o < 0) {
            bad = std::min(bad, ((n * C + c) * HP + ph) * WP + pw);
            continue;
          }
          up[n * us_n + c * us_c + (ph * g.pool_h + wt.di[o]) * us_h + (pw * g.pool_w + wt.dj[o]) * us_w] = zp[k];
        }
    }
    if (bad != std::numeric_limits<int64_t>::max()) atomic_min(first_bad, bad);
  });
  return first_bad.load();
}

void forward_vendor(const at::Tensor& z, const at::Tensor& idx, const at::Tensor& weight,
                    const std::optional<at::Tensor>& bias, const DecoderGeometry& g, c10::IntArrayRef output_padding,
                    DecoderAct act, double slope, at::MemoryFormat fmt, at::Tensor& out, at::Tensor& pre) {
  at::Tensor u = at::empty({g.n, g.c_in, g.unpooled_h, g.unpooled_w}, z.options(), fmt).zero_();
  int64_t bad = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "unpool_conv_transpose2d_vendor", [&] {
    bad = idx.scalar_type() == at::kLong ? scatter_unpooled<scalar_t, int64_t>(z, idx, g, u)
                                         : scatter_unpooled<scalar_t, uint8_t>(z, idx, g, u);
  });
  TORCH_CHECK(bad == std::numeric_limits<int64_t>::max(),
              "aefast::unpool_conv_transpose2d: invalid index at linear position ", bad,
              " (outside the unpooled plane or outside its own pool window)");
  at::Tensor y = at::convolution(u, weight, bias, {g.stride_h, g.stride_w}, {g.pad_h, g.pad_w}, {1, 1}, true,
                                 output_padding, 1);
  if (act_needs_preactivation(act)) pre = y.clone(fmt);
  switch (act) {
    case DecoderAct::None: break;
    case DecoderAct::Relu: y.relu_(); break;
    case DecoderAct::LeakyRelu: at::leaky_relu_(y, slope); break;
    case DecoderAct::Sigmoid: y.sigmoid_(); break;
    case DecoderAct::Tanh: y.tanh_(); break;
    case DecoderAct::Gelu: y = at::gelu(y); break;
    case DecoderAct::Silu: at::silu_(y); break;
  }
  out = y.contiguous(fmt);
}

std::tuple<at::Tensor, at::Tensor> unpool_conv_transpose2d_cpu(
    const at::Tensor& input, const at::Tensor& indices, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    c10::IntArrayRef pool_size, c10::IntArrayRef unpooled_size, c10::IntArrayRef stride, c10::IntArrayRef padding,
    c10::IntArrayRef output_padding, std::optional<c10::string_view> activation, double negative_slope) {
  check_same_device("unpool_conv_transpose2d", {&input, &indices, &weight}, bias);
  const DecoderGeometry g =
      decoder_geometry(input, indices, weight, pool_size, unpooled_size, stride, padding, output_padding);
  const DecoderAct act = parse_activation(activation);
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(), "aefast::unpool_conv_transpose2d: dtype mismatch");
  TORCH_CHECK(g.c_in * g.pooled_h * g.pooled_w < std::numeric_limits<int32_t>::max() &&
                  g.unpooled_h * g.unpooled_w < std::numeric_limits<int32_t>::max(),
              "aefast::unpool_conv_transpose2d: one image is too large for the CPU kernel");
  // channels_last in, channels_last out (eager's rule; the fake function follows it).
  const bool cl = decoder_channels_last(input);
  const at::MemoryFormat fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor z = dense_in(input, fmt), idx = dense_in(indices, fmt);
  if (decoder_forward_uses_vendor(g, cl, input.scalar_type())) {
    RECORD_USER_SCOPE("aefast path: unpool_conv_transpose2d vendor conv");
    at::Tensor out, pre = at::empty({0}, input.options());
    // the weight as it is: oneDNN takes either layout (a channels_last model's needs no NCHW copy)
    forward_vendor(z, idx, weight, bias, g, output_padding, act, negative_slope, fmt, out, pre);
    return {out, pre};
  }
  const at::Tensor w = weight.contiguous();
  // Output-sized buffers through the buffer cache (aefast/cpu_buffer_cache.h).
  at::Tensor out = empty_cpu_cached({g.n, g.c_out, g.out_h, g.out_w}, input.options(), fmt);
  at::Tensor pre = act_needs_preactivation(act) ? empty_cpu_cached(out.sizes(), input.options(), fmt)
                                                : at::empty({0}, input.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "unpool_conv_transpose2d_cpu", [&] {
    if (idx.scalar_type() == at::kLong)
      forward_typed<scalar_t, int64_t>(z, idx, w, bias, g, act, negative_slope, cl, out, pre);
    else
      forward_typed<scalar_t, uint8_t>(z, idx, w, bias, g, act, negative_slope, cl, out, pre);
  });
  return {out, pre};
}

// ---------------------------------------------------------------- backward
// Where the neighbourhood nb(q) of each position lives: in gpad itself (runs of run_len values,
// run r at offset r * run_stride from noff[q]; run_len a whole number of vectors), or in a
// per-image im2col buffer (one run of kp values at noff[q] = q * kp).
struct BackwardPlan {
  int64_t kp;
  bool per_position;  // small slabs: row bands (band_grads), else per channel
  bool direct;        // nb read straight from gpad (else from the im2col buffer)
  int64_t runs, run_len, run_stride;
  int64_t nvc;        // vectors per chunk (per-channel order)
};

// Per channel, for one chunk of nv vectors at slab offset k0 (nb offset nbo of each run):
// registers hold the weight chunk and the grad_Wt chunk; each entry loads its nb chunk once.
// dzv keeps the grad_z partial vector of every entry across the chunks of a channel.
template <int VB, int NV, typename scalar_t, typename acc_t>
AEFAST_ALWAYS_INLINE void channel_chunk(const acc_t* __restrict__ w, const acc_t* __restrict__ nb,
                                        const int32_t* __restrict__ posq, const int64_t* __restrict__ noff,
                                        const scalar_t* __restrict__ zc, int64_t plane, acc_t* __restrict__ dzv,
                                        bool first, acc_t* __restrict__ gw, bool need_z, bool need_w) {
  using V = typename VecOf<acc_t, VB>::type;
  constexpr int L = VecOf<acc_t, VB>::L;
  V wr[NV], ga[NV];
  for (int j = 0; j < NV; ++j) {
    wr[j] = vload<V>(w + j * L);
    ga[j] = V{};
  }
  for (int64_t p = 0; p < plane; ++p) {
    const int32_t q = posq[p];
    if (q < 0) continue;
    const acc_t* __restrict__ x = nb + noff[q];
    if (need_w) {
      const V zb = V{} + static_cast<acc_t>(zc[p]);
      if (need_z) {
        V d = first ? V{} : vload<V>(dzv + p * L);
        for (int j = 0; j < NV; ++j) {
          const V xv = vload<V>(x + j * L);
          d += wr[j] * xv;
          ga[j] += zb * xv;
        }
        vstore(dzv + p * L, d);
      } else {
        for (int j = 0; j < NV; ++j) ga[j] += zb * vload<V>(x + j * L);
      }
    } else {
      V d = first ? V{} : vload<V>(dzv + p * L);
      for (int j = 0; j < NV; ++j) d += wr[j] * vload<V>(x + j * L);
      vstore(dzv + p * L, d);
    }
  }
  if (need_w)
    for (int j = 0; j < NV; ++j) vstore(gw + j * L, vload<V>(gw + j * L) + ga[j]);
}

// Backward for small slabs, one row of pool windows: nb of every position of the row band is
// copied once into col (runs of KW*C_out values packed, zero tail), then channel-major: Wt[c]
// and the grad_Wt[c] sum in registers, per entry one nb load, a dot (grad_z) and an FMA.
template <int VB, int NV, typename scalar_t, typename acc_t, typename index_t>
AEFAST_ALWAYS_INLINE void band_grads(const scalar_t* __restrict__ z, const index_t* __restrict__ idx,
                                     const acc_t* __restrict__ wt, const acc_t* __restrict__ gpad,
                                     const int64_t* __restrict__ noff, int64_t row_stride, const DecoderGeometry& g,
                                     const WindowTable& wtab, int64_t kp, int64_t ph, acc_t* __restrict__ col,
                                     scalar_t* __restrict__ gz, acc_t* __restrict__ gwt, bool need_z, bool need_w) {
  using V = typename VecOf<acc_t, VB>::type;
  constexpr int L = VecOf<acc_t, VB>::L;
  const int64_t plane = g.pooled_h * g.pooled_w, h0 = ph * g.pool_h;
  const int64_t h1 = std::min(g.unpooled_h, h0 + g.pool_h), run = g.kernel_w * g.c_out;
  for (int64_t h = h0; h < h1; ++h)
    for (int64_t w = 0; w < g.unpooled_w; ++w) {
      const acc_t* __restrict__ src = gpad + noff[h * g.unpooled_w + w];
      acc_t* __restrict__ dst = col + ((h - h0) * g.unpooled_w + w) * kp;
      for (int64_t r = 0; r < g.kernel_h; ++r)
        for (int64_t i = 0; i < run; ++i) dst[r * run + i] = src[r * row_stride + i];
    }
  prefetch_window_row(z, idx, g, ph + 1, 0, g.pooled_w);
  const int64_t* __restrict__ pos = wtab.pos.data();
  for (int64_t c = 0; c < g.c_in; ++c) {
    V w[NV], ga[NV];
    for (int j = 0; j < NV; ++j) {
      w[j] = vload<V>(wt + c * kp + j * L);
      ga[j] = V{};
    }
    const int64_t kb = c * plane + ph * g.pooled_w;
    for (int64_t pw = 0; pw < g.pooled_w; ++pw) {
      const int64_t k = kb + pw;
      const int64_t o = decode_offset(idx, k, h0, pw * g.pool_w, g, wtab);
      if (o < 0) continue;  // invalid: grad_z stays 0
      const acc_t* __restrict__ x = col + (pw * g.pool_w + pos[o]) * kp;
      V xv[NV];
      for (int j = 0; j < NV; ++j) xv[j] = vload<V>(x + j * L);
      if (need_z) {
        V d = w[0] * xv[0];
        for (int j = 1; j < NV; ++j) d += w[j] * xv[j];
        gz[k] = static_cast<scalar_t>(hsum<acc_t, VB>(d));
      }
      if (need_w) {
        const V zb = V{} + static_cast<acc_t>(z[k]);
        for (int j = 0; j < NV; ++j) ga[j] += zb * xv[j];
      }
    }
    if (need_w)
      for (int j = 0; j < NV; ++j) vstore(gwt + c * kp + j * L, vload<V>(gwt + c * kp + j * L) + ga[j]);
  }
}
template <int VB, typename scalar_t, typename acc_t, typename index_t>
AEFAST_ALWAYS_INLINE void band_grads_all_body(const scalar_t* z, const index_t* idx, const acc_t* wt, const acc_t* gpad,
                                              const int64_t* noff, int64_t row_stride, const DecoderGeometry& g,
                                              const WindowTable& wtab, int64_t kp, acc_t* col, scalar_t* gz,
                                              acc_t* gwt, bool need_z, bool need_w) {
  constexpr int L = VecOf<acc_t, VB>::L;
  for (int64_t ph = 0; ph < g.pooled_h; ++ph) {
    switch (kp / L) {
#define AEFAST_BANDG_CASE(K)                                                                                  \
  case K:                                                                                                     \
    band_grads<VB, K, scalar_t, acc_t, index_t>(z, idx, wt, gpad, noff, row_stride, g, wtab, kp, ph, col, gz, gwt, \
                                                need_z, need_w);                                              \
    break;
      AEFAST_BANDG_CASE(1) AEFAST_BANDG_CASE(2) AEFAST_BANDG_CASE(3) AEFAST_BANDG_CASE(4)
#undef AEFAST_BANDG_CASE
      default: break;
    }
  }
}
AEFAST_ISA_CLONES_IDX(band_grads_all, void,
                      (const scalar_t* z, const index_t* idx, const acc_t* wt, const acc_t* gpad, const int64_t* noff,
                       int64_t row_stride, const DecoderGeometry& g, const WindowTable& wtab, int64_t kp, acc_t* col,
                       scalar_t* gz, acc_t* gwt, bool need_z, bool need_w),
                      (z, idx, wt, gpad, noff, row_stride, g, wtab, kp, col, gz, gwt, need_z, need_w))

// Per-channel order over one image: every channel, every chunk of its slab; then grad_z from
// the partial vectors. nb: gpad (direct) or the image's im2col, nofs the matching offsets.
template <int VB, typename scalar_t, typename acc_t>
AEFAST_ALWAYS_INLINE void channels_body(const scalar_t* z, const acc_t* wt, const acc_t* nb, const int64_t* nofs,
                                        const int32_t* pos_of, const DecoderGeometry& g, const BackwardPlan& plan,
                                        acc_t* dzv, acc_t* gwt, scalar_t* gz, bool need_z, bool need_w) {
  using V = typename VecOf<acc_t, VB>::type;
  constexpr int L = VecOf<acc_t, VB>::L;
  const int64_t kp = plan.kp, plane = g.pooled_h * g.pooled_w, nvr = plan.run_len / L;
  for (int64_t c = 0; c < g.c_in; ++c) {
    const int32_t* posq = pos_of + c * plane;
    const scalar_t* zc = z + c * plane;
    bool first = true;
    for (int64_t r = 0; r < plan.runs; ++r)
      for (int64_t v0 = 0; v0 < nvr; v0 += plan.nvc) {
        const int64_t nv = std::min(plan.nvc, nvr - v0);
        const int64_t ko = r * plan.run_len + v0 * L;       // slab offset
        const int64_t nbo = r * plan.run_stride + v0 * L;  // offset within nb
        acc_t* gw = need_w ? gwt + c * kp + ko : nullptr;
        switch (nv) {
#define AEFAST_CHAN_CASE(K)                                                                                      \
  case K:                                                                                                        \
    channel_chunk<VB, K, scalar_t, acc_t>(wt + c * kp + ko, nb + nbo, posq, nofs, zc, plane, dzv, first, gw, need_z, \
                                          need_w);                                                               \
    break;
          AEFAST_CHAN_CASE(1) AEFAST_CHAN_CASE(2) AEFAST_CHAN_CASE(3) AEFAST_CHAN_CASE(4)
          AEFAST_CHAN_CASE(5) AEFAST_CHAN_CASE(6) AEFAST_CHAN_CASE(7) AEFAST_CHAN_CASE(8)
#undef AEFAST_CHAN_CASE
          default: break;
        }
        first = false;
      }
    if (need_z)
      for (int64_t p = 0; p < plane; ++p)
        if (posq[p] >= 0) gz[c * plane + p] = static_cast<scalar_t>(hsum<acc_t, VB>(vload<V>(dzv + p * L)));
  }
}
AEFAST_ISA_CLONES(channels,
                  (const scalar_t* z, const acc_t* wt, const acc_t* nb, const int64_t* nofs, const int32_t* pos_of,
                   const DecoderGeometry& g, const BackwardPlan& plan, acc_t* dzv, acc_t* gwt, scalar_t* gz,
                   bool need_z, bool need_w),
                  (z, wt, nb, nofs, pos_of, g, plan, dzv, gwt, gz, need_z, need_w))

// gpre of one image into the zero-bordered channels-last buffer gpad, and its per-channel sums
// (grad_b partials). Per (co, output row): d = grad_out * act'(.) into a row buffer (the act is
// a compile-time constant there, so the loop vectorises), its sum in vector lanes (not one
// serial add chain), then the row is stored with stride C_out.
template <int VB, DecoderAct A, typename scalar_t, typename acc_t>
AEFAST_ALWAYS_INLINE void gpre_act(const scalar_t* __restrict__ go, const scalar_t* __restrict__ ai,
                                   const DecoderGeometry& g, int64_t cols, acc_t sl, acc_t* __restrict__ gpad,
                                   acc_t* __restrict__ bias_part, acc_t* __restrict__ drow, bool cl) {
  using V = typename VecOf<acc_t, VB>::type;
  constexpr int L = VecOf<acc_t, VB>::L;
  const int64_t hw = g.out_h * g.out_w, wo = g.out_w;
  if (cl) {
    // channels_last grad_out / act_in: a pixel's C_out values are contiguous, as in gpad; the
    // grad_b partials are summed per channel in drow (C_out values), pixels in row-major order.
    const int64_t co_n = g.c_out;
    std::fill(drow, drow + co_n, acc_t(0));
    for (int64_t oy = 0; oy < g.out_h; ++oy) {
      const scalar_t* __restrict__ gr = go + oy * wo * co_n;
      const scalar_t* __restrict__ ar = ai + oy * wo * co_n;
      acc_t* __restrict__ row = gpad + ((oy + g.pad_h) * cols + g.pad_w) * co_n;
      for (int64_t i = 0; i < wo * co_n; i += co_n)
        for (int64_t co = 0; co < co_n; ++co) {
          const acc_t d = static_cast<acc_t>(gr[i + co]) * act_derivative<acc_t>(static_cast<acc_t>(ar[i + co]), A, sl);
          row[i + co] = d;
          drow[co] += d;
        }
    }
    for (int64_t co = 0; co < co_n; ++co) bias_part[co] = drow[co];
    return;
  }
  for (int64_t co = 0; co < g.c_out; ++co) {
    const scalar_t* gc = go + co * hw;
    const scalar_t* ac = ai + co * hw;
    V vs = V{};
    acc_t tail = 0;
    for (int64_t oy = 0; oy < g.out_h; ++oy) {
      const scalar_t* gr = gc + oy * wo;
      const scalar_t* ar = ac + oy * wo;
      for (int64_t ox = 0; ox < wo; ++ox)
        drow[ox] = static_cast<acc_t>(gr[ox]) * act_derivative<acc_t>(static_cast<acc_t>(ar[ox]), A, sl);
      int64_t ox = 0;
      for (; ox + L <= wo; ox += L) vs += vload<V>(drow + ox);
      for (; ox < wo; ++ox) tail += drow[ox];
      acc_t* __restrict__ row = gpad + ((oy + g.pad_h) * cols + g.pad_w) * g.c_out + co;
      for (int64_t x = 0; x < wo; ++x) row[x * g.c_out] = drow[x];
    }
    bias_part[co] = hsum<acc_t, VB>(vs) + tail;
  }
}
template <int VB, typename scalar_t, typename acc_t>
AEFAST_ALWAYS_INLINE void gpre_body(const scalar_t* go, const scalar_t* ai, const DecoderGeometry& g, int64_t cols,
                                    DecoderAct act, acc_t sl, acc_t* gpad, acc_t* bias_part, acc_t* drow, bool cl) {
#define AEFAST_GPRE_CASE(A) gpre_act<VB, A, scalar_t, acc_t>(go, ai, g, cols, sl, gpad, bias_part, drow, cl)
  AEFAST_FOR_DECODER_ACT(act, AEFAST_GPRE_CASE)
#undef AEFAST_GPRE_CASE
}
AEFAST_ISA_CLONES(gpre,
                  (const scalar_t* go, const scalar_t* ai, const DecoderGeometry& g, int64_t cols, DecoderAct act,
                   acc_t sl, acc_t* gpad, acc_t* bias_part, acc_t* drow, bool cl),
                  (go, ai, g, cols, act, sl, gpad, bias_part, drow, cl))

// Extent of the channels-last gpre buffer: row a = oy + pad_h covers every footprint row
// h*sh + kh (< (Hu-1)*sh + KH) and every output row (< Ho + pad_h).
struct AccExtent {
  int64_t rows, cols;
};
AccExtent acc_extent(const DecoderGeometry& g) {
  return {std::max((g.unpooled_h - 1) * g.stride_h + g.kernel_h, g.out_h + g.pad_h),
          std::max((g.unpooled_w - 1) * g.stride_w + g.kernel_w, g.out_w + g.pad_w)};
}

// Backward: the batch is cut into at most 16 fixed chunks of consecutive items (their size
// depends on N only, never on the thread count), processed in ONE parallel region (parallel
// regions are costly on a busy machine). Per item, the thread owning its chunk
//   1. writes gpre = grad_out * act'(.) into a zero-bordered channels-last buffer (bias
//      partial sums per item and channel on the way),
//   2. computes grad_input and adds the item's grad_weight terms to its chunk's partial sum
//      (band_grads_all or channels_body).
// The chunk partials and the bias partials are then added in chunk / item order.
template <typename scalar_t, typename index_t>
void backward_typed(const at::Tensor& grad_out, const at::Tensor& act_in, const at::Tensor& z, const at::Tensor& idx,
                    const at::Tensor& weight, const DecoderGeometry& g, DecoderAct act, double slope,
                    std::array<bool, 3> mask, bool cl_in, bool cl_go, at::Tensor& grad_z, at::Tensor& grad_w,
                    at::Tensor& grad_b) {
  using acc_t = at::opmath_type<scalar_t>;
  const Isa isa = decoder_isa();
  const int64_t L = vec_bytes(isa) / static_cast<int64_t>(sizeof(acc_t));
  const int64_t K = g.kernel_h * g.kernel_w * g.c_out, kp = (K + L - 1) / L * L;
  const AccExtent ext = acc_extent(g);
  const int64_t item = ext.rows * ext.cols * g.c_out, row_stride = ext.cols * g.c_out;
  const int64_t plane = g.pooled_h * g.pooled_w, plane_in = g.c_in * plane, plane_out = g.c_out * g.out_h * g.out_w;
  const int64_t P = g.unpooled_h * g.unpooled_w, run = g.kernel_w * g.c_out, hw_out = g.out_h * g.out_w;
  BackwardPlan plan;
  plan.kp = kp;
  plan.per_position = kp / L <= 4;
  plan.direct = !plan.per_position && run % L == 0;
  plan.runs = plan.direct ? g.kernel_h : 1;
  plan.run_len = plan.direct ? run : kp;
  plan.run_stride = plan.direct ? row_stride : kp;
  plan.nvc = plan.per_position ? 0 : chunk_vectors(plan.run_len / L, 1, vec_bytes(isa), isa == Isa::kAvx512 ? 8 : 6);
  if (plan.per_position) {
    plan.runs = g.kernel_h;
    plan.run_stride = row_stride;
  }
  // noff[q]: offset of nb(q)'s first run in gpad; noff[P + q] = q * kp (im2col).
  std::vector<int64_t> noff(static_cast<size_t>(2 * P));
  for (int64_t h = 0; h < g.unpooled_h; ++h)
    for (int64_t w = 0; w < g.unpooled_w; ++w) {
      noff[h * g.unpooled_w + w] = (h * g.stride_h) * row_stride + (w * g.stride_w) * g.c_out;
      noff[P + h * g.unpooled_w + w] = (h * g.unpooled_w + w) * kp;
    }
  const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* ap = act_in.const_data_ptr<scalar_t>();
  const scalar_t* zp = z.const_data_ptr<scalar_t>();
  const index_t* ip = idx.const_data_ptr<index_t>();
  const acc_t sl = static_cast<acc_t>(slope);
  const at::Tensor wt_t = reorder_weight<scalar_t, acc_t>(weight, g, kp);
  const acc_t* wt = wt_t.const_data_ptr<acc_t>();
  const WindowTable wtab(g);
  const int64_t chunk = std::max<int64_t>(1, (g.n + 15) / 16), chunks = (g.n + chunk - 1) / chunk;
  // Buffers through the c10 allocator (not std::vector) so that memory profilers see them.
  const at::TensorOptions acc_opts = z.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  at::Tensor bias_part_t = empty_cpu_cached({g.n * g.c_out}, acc_opts);
  at::Tensor gwt_t = empty_cpu_cached({mask[1] ? chunks * g.c_in * kp : 0}, acc_opts);
  acc_t* bias_part = bias_part_t.mutable_data_ptr<acc_t>();
  acc_t* gwt = gwt_t.mutable_data_ptr<acc_t>();
  scalar_t* gz = grad_z.mutable_data_ptr<scalar_t>();
  const bool need_img = mask[0] || mask[1];
  const auto band_grads_all = AEFAST_PICK_IDX(band_grads_all, isa);
  const auto gpre = AEFAST_PICK(gpre, isa);
  const auto channels = AEFAST_PICK(channels, isa);
  // Small slabs with small windows: the window-vector kernels (wv_gpre, wv_backward).
  const bool wv = use_window_vectors(g, kp, L);
  RECORD_USER_SCOPE(wv ? "aefast path: unpool_conv_transpose2d_backward window vectors"
                       : "aefast path: unpool_conv_transpose2d_backward per entry");
  const WvGeom wg = wv_geom(g, L, sizeof(acc_t));
  const auto wv_gpre = AEFAST_PICK(wv_gpre, isa);
  const auto wv_backward = AEFAST_PICK_IDX(wv_backward, isa);
  at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
    if (wv) {
      // gplan (zeroed once: every image writes the same interior, the border stays 0), the
      // packed row of windows, the gathered footprints Gp, the grad_z row, the grad_Wt lanes.
      const int64_t nplan = g.c_out * wg.R * wg.C, npk = wg.RB * g.c_in * wg.LW;
      const int64_t ngp = wg.RBb * wtab.window * wg.K * wg.LW;
      const int64_t ngw = mask[1] ? g.c_in * wg.K * L : 0;
      at::Tensor plan_t = zeros_cpu_cached({nplan}, acc_opts);
      at::Tensor buf_t =
          empty_cpu_cached({3 * npk + ngp + ngw + 2 * (wg.RB * g.pooled_w + L)}, acc_opts);
      acc_t* gplan = plan_t.mutable_data_ptr<acc_t>();
      acc_t* Zb = buf_t.mutable_data_ptr<acc_t>();
      acc_t* Ob = Zb + npk;
      acc_t* Gp = Ob + npk;
      acc_t* gzp = Gp + ngp;
      acc_t* GWv = gzp + npk;
      acc_t* cv = GWv + ngw;
      // channels_last: per-image planar copies (image_to_planar) of grad_out / act_in and of
      // z / idx, and the planar grad_z image transposed out.
      std::vector<scalar_t> go_pl(cl_go ? 2 * plane_out : 0), z_pl(cl_in ? 2 * plane_in : 0);
      std::vector<index_t> idx_pl(cl_in ? plane_in : 0);
      for (int64_t kc = k0; kc < k1; ++kc) {
        std::fill(GWv, GWv + ngw, acc_t(0));
        for (int64_t n = kc * chunk; n < std::min(g.n, (kc + 1) * chunk); ++n) {
          const scalar_t* gon = gp + n * plane_out;
          const scalar_t* aon = ap + n * plane_out;
          if (cl_go) {
            image_to_planar(gon, g.c_out, hw_out, go_pl.data());
            image_to_planar(aon, g.c_out, hw_out, go_pl.data() + plane_out);
            gon = go_pl.data();
            aon = go_pl.data() + plane_out;
          }
          wv_gpre(gon, aon, g, wg, act, sl, gplan, bias_part + n * g.c_out);
          if (!need_img) continue;
          // wv_backward writes every element of grad_z (0 for invalid entries): no zero fill
          // first (a whole extra write pass over grad_z, ~15% of this backward).
          const scalar_t* zn = zp + n * plane_in;
          const index_t* in = ip + n * plane_in;
          scalar_t* gzn = gz + n * plane_in;
          if (cl_in) {
            image_to_planar(zn, g.c_in, plane, z_pl.data());
            image_to_planar(in, g.c_in, plane, idx_pl.data());
            zn = z_pl.data();
            in = idx_pl.data();
            gzn = z_pl.data() + plane_in;
          }
          wv_backward(zn, in, wt, g, wtab, wg, kp, cv, gplan, Zb, Ob, Gp, gzp, gzn, GWv, mask[0], mask[1]);
          if (cl_in && mask[0]) image_to_channels_last(gzn, g.c_in, plane, gz + n * plane_in);
        }
        if (mask[1]) {  // the chunk's grad_Wt: lanes summed in lane order
          acc_t* part = gwt + kc * g.c_in * kp;
          std::fill(part, part + g.c_in * kp, acc_t(0));
          for (int64_t c = 0; c < g.c_in; ++c)
            for (int64_t k = 0; k < wg.K; ++k) {
              acc_t sum = 0;
              for (int64_t l = 0; l < L; ++l) sum += GWv[(c * wg.K + k) * L + l];
              part[c * kp + k] = sum;
            }
        }
      }
      return;
    }
    at::Tensor gpad_t = empty_cpu_cached({item + L}, acc_opts);
    // im2col: of the whole image (per-channel order without direct runs), or of one row band of
    // pool windows (small slabs); the slab tails stay zero.
    at::Tensor col_t = zeros_cpu_cached({!need_img ? 0 : plan.per_position ? g.pool_h * g.unpooled_w * kp
                                                 : plan.direct ? 0 : P * kp}, acc_opts);
    at::Tensor dzv_t = empty_cpu_cached({need_img && !plan.per_position ? plane * L : 0}, acc_opts);
    acc_t* gpad = gpad_t.mutable_data_ptr<acc_t>();
    acc_t* col = col_t.mutable_data_ptr<acc_t>();
    acc_t* dzv = dzv_t.mutable_data_ptr<acc_t>();
    std::vector<acc_t> drow_v(static_cast<size_t>(std::max(g.out_w, g.c_out) + 64));
    std::vector<scalar_t> z_pl(cl_in ? 2 * plane_in : 0);
    std::vector<index_t> idx_pl(cl_in ? plane_in : 0);
    acc_t* drow = drow_v.data();
    ImageScratch<acc_t> scratch(g, false, need_img && !plan.per_position);
    // gpad: every item writes all of rows [pad_h, pad_h + out_h) x cols [pad_w, pad_w + out_w) x
    // all c_out; only the border around that interior (and the slack at the end) must read as
    // zero, and nothing writes it, so it is zeroed once here.
    {
      const int64_t cols_c = ext.cols * g.c_out;
      std::fill(gpad, gpad + g.pad_h * cols_c, acc_t(0));
      for (int64_t r = g.pad_h; r < g.pad_h + g.out_h; ++r) {
        std::fill(gpad + r * cols_c, gpad + r * cols_c + g.pad_w * g.c_out, acc_t(0));
        std::fill(gpad + r * cols_c + (g.pad_w + g.out_w) * g.c_out, gpad + (r + 1) * cols_c, acc_t(0));
      }
      std::fill(gpad + (g.pad_h + g.out_h) * cols_c, gpad + item + L, acc_t(0));
    }
    for (int64_t kc = k0; kc < k1; ++kc) {
      if (mask[1]) std::fill(gwt + kc * g.c_in * kp, gwt + (kc + 1) * g.c_in * kp, acc_t(0));
      for (int64_t n = kc * chunk; n < std::min(g.n, (kc + 1) * chunk); ++n) {
        gpre(gp + n * plane_out, ap + n * plane_out, g, ext.cols, act, sl, gpad, bias_part + n * g.c_out, drow,
             cl_go);
        if (!need_img) continue;
        const scalar_t* zn = zp + n * plane_in;
        const index_t* in = ip + n * plane_in;
        scalar_t* gzn = gz + n * plane_in;
        if (cl_in) {  // planar copies of the image (image_to_planar); grad_z transposed out below
          image_to_planar(zn, g.c_in, plane, z_pl.data());
          image_to_planar(in, g.c_in, plane, idx_pl.data());
          zn = z_pl.data();
          in = idx_pl.data();
          gzn = z_pl.data() + plane_in;
        }
        acc_t* part = mask[1] ? gwt + kc * g.c_in * kp : nullptr;
        if (mask[0]) std::fill(gzn, gzn + plane_in, scalar_t(0));  // invalid entries keep 0
        if (plan.per_position) {
          band_grads_all(zn, in, wt, gpad, noff.data(), row_stride, g, wtab, kp, col, gzn, part, mask[0], mask[1]);
          if (cl_in && mask[0]) image_to_channels_last(gzn, g.c_in, plane, gz + n * plane_in);
          continue;
        }
        positions_of(in, g, wtab, scratch.pos_of.data());
        if (!plan.direct)  // the image's im2col: nb(q) at q * kp
          for (int64_t q = 0; q < P; ++q)
            for (int64_t r = 0; r < g.kernel_h; ++r)
              std::memcpy(col + q * kp + r * run, gpad + noff[q] + r * row_stride, sizeof(acc_t) * run);
        channels(zn, wt, plan.direct ? gpad : col, plan.direct ? noff.data() : noff.data() + P,
                 scratch.pos_of.data(), g, plan, dzv, part, gzn, mask[0], mask[1]);
        if (cl_in && mask[0]) image_to_channels_last(gzn, g.c_in, plane, gz + n * plane_in);
      }
    }
  });
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

std::tuple<at::Tensor, at::Tensor, at::Tensor> unpool_conv_transpose2d_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& act_input, const at::Tensor& input, const at::Tensor& indices,
    const at::Tensor& weight, c10::IntArrayRef pool_size, c10::IntArrayRef unpooled_size, c10::IntArrayRef stride,
    c10::IntArrayRef padding, c10::IntArrayRef output_padding, std::optional<c10::string_view> activation,
    double negative_slope, std::array<bool, 3> output_mask) {
  check_same_device("unpool_conv_transpose2d_backward", {&grad_out, &act_input, &input, &indices, &weight});
  const DecoderGeometry g =
      decoder_geometry(input, indices, weight, pool_size, unpooled_size, stride, padding, output_padding);
  const DecoderAct act = parse_activation(activation);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({g.n, g.c_out, g.out_h, g.out_w}) &&
                  act_input.sizes() == grad_out.sizes(),
              "aefast::unpool_conv_transpose2d_backward: grad_out / act_input have the wrong shape");
  TORCH_CHECK(g.c_in * g.pooled_h * g.pooled_w < std::numeric_limits<int32_t>::max() &&
                  g.unpooled_h * g.unpooled_w < std::numeric_limits<int32_t>::max(),
              "aefast::unpool_conv_transpose2d_backward: one image is too large for the CPU kernel");
  // channels_last input (z, idx; grad_z in its layout) and channels_last grad_out (act_input
  // then read in the same layout) are each served without a copy (decoder_channels_last).
  const bool cl_in = decoder_channels_last(input), cl_go = decoder_channels_last(grad_out);
  const at::MemoryFormat fmt_in = cl_in ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::MemoryFormat fmt_go = cl_go ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor go = dense_in(grad_out, fmt_go).to(input.scalar_type());
  const at::Tensor ai = dense_in(act_input, fmt_go);
  const at::Tensor z = dense_in(input, fmt_in), idx = dense_in(indices, fmt_in), w = weight.contiguous();
  at::Tensor grad_z = output_mask[0] ? empty_cpu_cached(z.sizes(), z.options(), fmt_in)
                                     : at::zeros(z.sizes(), z.options().memory_format(fmt_in));
  at::Tensor grad_w = output_mask[1] ? at::empty_like(w) : at::zeros_like(w);
  at::Tensor grad_b = at::zeros({g.c_out}, input.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "unpool_conv_transpose2d_bwd_cpu", [&] {
    if (idx.scalar_type() == at::kLong)
      backward_typed<scalar_t, int64_t>(go, ai, z, idx, w, g, act, negative_slope, output_mask, cl_in, cl_go, grad_z,
                                        grad_w, grad_b);
    else
      backward_typed<scalar_t, uint8_t>(go, ai, z, idx, w, g, act, negative_slope, output_mask, cl_in, cl_go, grad_z,
                                        grad_w, grad_b);
  });
  return {grad_z, grad_w, grad_b};
}

// ---------------------------------------------------------------- drop-in max_unpool2d
// out[plane, idx[plane, p]] = in[plane, p]; with duplicate indices the last p (row-major) wins,
// because each plane is written by one thread in increasing p. Backward: grad_in[p] =
// grad_out[idx[p]] for the winning p of each element and 0 for the positions it overwrote (they
// do not reach the output), found by a reverse scan that marks elements already claimed.
at::Tensor max_unpool2d_cpu(const at::Tensor& input, const at::Tensor& indices, c10::IntArrayRef output_size) {
  check_same_device("max_unpool2d", {&input, &indices});
  TORCH_CHECK(input.dim() >= 2 && indices.sizes() == input.sizes() && indices.scalar_type() == at::kLong &&
                  output_size.size() == 2,
              "aefast::max_unpool2d: indices must be int64 with the input's shape, output_size two ints");
  const at::Tensor x = contiguous_cpu_cached(input), idx = contiguous_cpu_cached(indices);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 2);
  shape.push_back(output_size[0]);
  shape.push_back(output_size[1]);
  at::Tensor out = zeros_cpu_cached(shape, x.options());
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
  check_same_device("max_unpool2d_backward", {&grad_out, &indices});
  TORCH_CHECK(grad_out.dim() >= 2 && indices.dim() == grad_out.dim() && indices.scalar_type() == at::kLong,
              "aefast::max_unpool2d_backward: bad arguments");
  const at::Tensor g = contiguous_cpu_cached(grad_out), idx = contiguous_cpu_cached(indices);
  at::Tensor grad_in = empty_cpu_cached(idx.sizes(), g.options());
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
  check_same_device("first_bad_unpool_index", {&indices});
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

TORCH_LIBRARY_IMPL(aefast, CompositeExplicitAutograd, m) {
  m.impl("unpool_deconv_cpu_isa", &unpool_deconv_cpu_isa);
}

TORCH_LIBRARY_IMPL(aefast, CPU, m) {
  m.impl("first_bad_unpool_index", &first_bad_unpool_index_cpu);
  m.impl("unpool_conv_transpose2d", &unpool_conv_transpose2d_cpu);
  m.impl("unpool_conv_transpose2d_backward", &unpool_conv_transpose2d_backward_cpu);
  m.impl("max_unpool2d", &max_unpool2d_cpu);
  m.impl("max_unpool2d_backward", &max_unpool2d_backward_cpu);
}

}  // namespace aefast
