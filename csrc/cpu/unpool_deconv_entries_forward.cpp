// The per-entry kernels of the fused decoder block, forward (unpool_deconv.cpp has the math and
// picks the family, the notation is in unpool_deconv_cpu.h; the backward is in
// unpool_deconv_entries_backward.cpp). They serve every shape that the window-vector kernels
// (unpool_deconv_window_vectors.cpp) do not: slabs of more than 4 vectors (e.g. 64->32), and small
// slabs with pool windows of more than 4 elements.
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
//        unpool_deconv_window_vectors.cpp, with the measurements that led there).
//      * other small slabs (larger windows): a position holds only ~C_in/window entries of one
//        or two vectors, too few to pay for any sorting. The row band of T is zeroed and,
//        channel-major with Wt[c] in registers, each entry adds z * Wt[c] to T[q] (consecutive
//        entries hit different windows, so the adds do not wait on each other).
//   2. per output pixel (oy, ox): pre[co] = b[co] + sum_{taps (kh, kw) with oy = h*sh - padh + kh,
//      ox = w*sw - padw + kw} T[(h, w)][kh][kw][co], vectorised over co, bias fused, then the
//      activation at the (NCHW) store (a compile-time constant; relu / leaky_relu, and sigmoid
//      for fp32 accumulation, on whole vectors). (Calling ATen's vectorised sigmoid per image from
//      inside the parallel region was tried: with 2 OpenMP threads it cost ~7 ms per call in waits, so the transcendental
//      activations stay scalar here.) Each output row goes through a per-row channel buffer
//      into NCHW, and with large slabs T lives in a ring of unpooled rows: steps 1 and 2 run
//      row of windows by row of windows, so T stays in L2 (decoder_ring_rows).
// Why not the vendor GEMM (columns = unpooled values x W, then col2im): the argmax is per
// channel, so the channels that meet at one unpooled position differ from window to window; a
// dense GEMM must multiply the zeros of the unpooled map too (pool window x these MACs). Timed
// interleaved on the 2-core EPYC (bench_unpool_deconv's "vendor GEMM form" rows): MKL's GEMMs
// ALONE, on pre-gathered operands, take 1.3-2.8x this whole forward and 3-6.5x this whole
// backward on the benchmark and W2 shapes (and match it even for pool 1, no sparsity at all).
//
// Determinism: every output element is owned by one thread and summed in a fixed order, per image
// (entries of a position in ascending channel order, the taps of an output pixel in (kh, kw) order).
// No atomics; results do not depend on the number of threads.
#include "unpool_deconv_cpu.h"

namespace aefast {
namespace unpool_deconv_cpu {
namespace {

// Per-thread scratch: the entries of one segment of a row of pool windows, bucketed by slot
// (b = (pw - pw0) * window + o), each bucket with room for all C_in channels, so that the
// bucketing is a single pass with independent counters (no prefix sums, no serial chains).
template <typename acc_t>
struct ImageScratch {
  int64_t seg = 0;              // windows per segment
  int64_t cap = 0;              // bucket capacity (C_in)
  PaddedVec<int32_t> cnt;     // [b] entries in bucket b
  PaddedVec<int32_t> bq;      // [b] position of bucket b, -1 outside the plane
  PaddedVec<int32_t> ent_w;   // [b*cap + i] ci * Kp (the entry's weight slab)
  PaddedVec<acc_t> ent_z;     // [b*cap + i] z
  PaddedVec<uint8_t> has;     // [ring q] 1 if position q holds an entry (never set outside windows)
  ImageScratch(const DecoderGeometry& g, bool buckets, int64_t ring_positions) {
    const int64_t window = g.pool_h * g.pool_w;
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

// Buckets the entries of windows (ph, pw0 .. pw1-1) by slot, ci ascending within a bucket
// (channel-major pass: idx and z are read contiguously along pw), sets has[] of their
// positions, and returns the first invalid k (linear within the image) or INT64_MAX.
template <typename scalar_t, typename acc_t, typename index_t>
__attribute__((noinline)) int64_t bucket_segment(const scalar_t* __restrict__ z, const index_t* __restrict__ idx,
                                                 const DecoderGeometry& g, const WindowTable& wtab, int64_t kp,
                                                 int64_t ph, int64_t pw0, int64_t pw1, const int32_t* slot_ring,
                                                 ImageScratch<acc_t>& s) {
  const int64_t plane = g.pooled_h * g.pooled_w, window = wtab.window, cap = s.cap, h0 = ph * g.pool_h;
  const int64_t nbk = (pw1 - pw0) * window;
  int32_t* __restrict__ cnt = s.cnt.data();
  int32_t* __restrict__ ent_w = s.ent_w.data();
  acc_t* __restrict__ ent_z = s.ent_z.data();
  int64_t first_bad = std::numeric_limits<int64_t>::max();
  prefetch_window_row(z, idx, g, ph + 1, pw0, pw1);
  bool checked = false;  // set when the fast pass has bucketed every entry
  if (h0 + g.pool_h <= g.unpooled_h && pw1 * g.pool_w <= g.unpooled_w) {
    // Fast pass: every window of the segment lies inside the plane, so an index is valid iff
    // its offset is below the window (window form) or it names a position of its own window
    // (flat form), and no table lookup is needed. cnt[b] holds bucket b's next free slot
    // during the pass. A bad index is bucketed at an in-bounds slot and flagged; the segment is
    // then redone by the checking pass below (the error path only). The buckets come out as
    // before (channels ascending), so no sum changes. Measured with the tabled ring slots
    // below (1 thread, CPU time, interleaved A/B on a loaded machine; 64->32 @14x14 N=256,
    // window indices): the forward went from 7.6-8.4 to 6.7-7.4 ms.
    const int64_t uw = g.unpooled_w, pool_h = g.pool_h, pool_w = g.pool_w;
    const bool pool2x2 = pool_h == 2 && pool_w == 2;
    for (int64_t b = 0; b < nbk; ++b) cnt[b] = static_cast<int32_t>(b * cap);
    bool bad = false;
    for (int64_t c = 0; c < g.c_in; ++c) {
      const int64_t kb = c * plane + ph * g.pooled_w;
      const index_t* __restrict__ ir = idx + kb;
      const scalar_t* __restrict__ zr = z + kb;
      const int32_t wo = static_cast<int32_t>(c * kp);
      int64_t b0 = 0;
      for (int64_t pw = pw0; pw < pw1; ++pw, b0 += window) {
        int64_t o;
        if constexpr (std::is_same_v<index_t, int64_t>) {
          const int64_t rel = ir[pw] - (h0 * uw + pw * pool_w);
          int64_t i, j;
          if (pool2x2) {  // the common window, without the counting loop
            i = rel >= uw;
            j = rel - (i ? uw : 0);
          } else {
            i = 0;
            for (int64_t r = 1; r <= pool_h; ++r) i += rel >= r * uw;
            j = rel - i * uw;
          }
          const bool ok = rel >= 0 && i < pool_h && j < pool_w;
          bad |= !ok;
          o = ok ? i * pool_w + j : 0;
        } else {
          o = static_cast<int64_t>(ir[pw]);
          bad |= o >= window;
          o = o < window ? o : 0;
        }
        const int32_t d = cnt[b0 + o]++;
        ent_w[d] = wo;
        ent_z[d] = static_cast<acc_t>(zr[pw]);
      }
    }
    checked = !bad;
    if (checked)
      for (int64_t b = 0; b < nbk; ++b) cnt[b] -= static_cast<int32_t>(b * cap);
  }
  if (!checked) std::fill(cnt, cnt + nbk, 0);
  for (int64_t c = 0; c < g.c_in && !checked; ++c) {
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
  // The positions' places in the row ring (slot_ring, see decoder_ring_rows): slot
  // (ph * pooled_w + pw) * window + o is bucket b = (pw - pw0) * window + o. Tabled once per call:
  // computed here, they cost four integer divisions per bucket and row.
  const int32_t* __restrict__ ring_of = slot_ring + (ph * g.pooled_w + pw0) * window;
  for (int64_t b = 0; b < nbk; ++b) {
    const int32_t rq = ring_of[b];
    s.bq[b] = rq;
    if (rq >= 0) s.has[rq] = cnt[b] > 0;
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

struct ForwardPlan {
  int64_t kp;   // slab stride (whole vectors)
  int64_t nvc;  // vectors per chunk
};

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

template <typename scalar_t, typename index_t>
void forward_typed(const ForwardCall& call) {
  using acc_t = at::opmath_type<scalar_t>;
  const DecoderGeometry& g = call.g;
  const bool cl = call.cl;
  const DecoderAct act = call.act;
  const ForwardOperands<scalar_t> ops(call.z, call.weight, call.bias, g);
  const Isa isa = ops.isa;
  const int64_t L = ops.L, kp = ops.kp;
  const ForwardPlan plan{kp, chunk_vectors(kp / L, g.c_in, vec_bytes(isa), 8)};
  const at::TensorOptions acc_opts = ops.acc_opts;
  const acc_t* wt = ops.wt_t.template const_data_ptr<acc_t>();
  const acc_t* b = ops.b_t.template const_data_ptr<acc_t>();
  const WindowTable wtab(g);
  const AxisTaps rt(g.out_h, g.unpooled_h, g.kernel_h, g.stride_h, g.pad_h);
  const AxisTaps ct(g.out_w, g.unpooled_w, g.kernel_w, g.stride_w, g.pad_w);
  const scalar_t* zp = call.z.const_data_ptr<scalar_t>();
  const index_t* ip = call.idx.const_data_ptr<index_t>();
  scalar_t* op = call.out.mutable_data_ptr<scalar_t>();
  scalar_t* pp = call.pre.numel() ? call.pre.mutable_data_ptr<scalar_t>() : nullptr;
  const int64_t plane_in = g.c_in * g.pooled_h * g.pooled_w, plane_out = g.c_out * g.out_h * g.out_w;
  const int64_t P = g.unpooled_h * g.unpooled_w, plane = g.pooled_h * g.pooled_w;
  const acc_t sl = static_cast<acc_t>(call.slope);
  std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};
  const auto slabs = AEFAST_PICK(slabs, isa);
  const auto epilogue = AEFAST_PICK(epilogue, isa);
  // Small slabs: row bands of dense T (band_sums); larger ones: bucketed entries (slab_sums).
  const bool small = kp / L <= 4;
  const auto bands = AEFAST_PICK_IDX(bands, isa);
  // The path taken, named in the profiler (bench/bench_kernel_ledger.py reads it).
  RECORD_USER_SCOPE("aefast path: unpool_conv_transpose2d per entry");
  // Large slabs: T in a ring of unpooled rows, each output row's epilogue run as soon as the
  // rows it reads are summed (decoder_ring_rows). The small-slab bands keep the image's T.
  const int64_t ring = small ? g.unpooled_h : decoder_ring_rows(g);
  const int64_t row_pos = small ? g.unpooled_w : decoder_ring_row_positions(g);
  std::vector<int64_t> rowq(rt.x.size()), need_h(static_cast<size_t>(g.out_h), -1);
  for (size_t r = 0; r < rt.x.size(); ++r) rowq[r] = (rt.x[r] % ring) * row_pos;
  // Each slot's position in the row ring, or -1 outside the plane (bucket_segment).
  std::vector<int32_t> slot_ring(wtab.slot_q.size());
  for (size_t i = 0; i < slot_ring.size(); ++i) {
    const int32_t q = wtab.slot_q[i];
    slot_ring[i] = q < 0 ? -1 : static_cast<int32_t>((q / g.unpooled_w % ring) * row_pos + q % g.unpooled_w);
  }
  for (int64_t oy = 0; oy < g.out_h; ++oy)  // the last unpooled row output row oy reads
    for (int32_t r = rt.first[oy]; r < rt.first[oy + 1]; ++r) need_h[oy] = std::max<int64_t>(need_h[oy], rt.x[r]);
  at::parallel_for(0, g.n, 1, [&](int64_t n0, int64_t n1) {
    ImageScratch<acc_t> scratch(g, !small, ring * row_pos);
    // T: one slab per position (of the ring, or of the image for small slabs) plus L values of
    // slack (the epilogue's last vector may run past the last slab). Zeroed once so that no
    // lane is ever uninitialised.
    at::Tensor T_t = zeros_cpu_cached({(small ? P : ring * row_pos) * kp + L}, acc_opts);
    // The epilogue's output row (and pre-activation row) of every channel.
    std::vector<scalar_t> rowbuf_v(2 * g.c_out * epilogue_row_stride(g.out_w));
    scalar_t* rowbuf = rowbuf_v.data();
    acc_t* T = T_t.mutable_data_ptr<acc_t>();
    // channels_last: the image's z and idx in planar order (image_to_planar).
    std::vector<scalar_t> z_pl(cl ? plane_in : 0);
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
      if (small) {
        bad = bands(zn, in, wt, g, wtab, kp, T);
        epilogue(T, nullptr, b, g, rt, rowq.data(), ct, kp, act, sl, o, p, 0, g.out_h, rowbuf, cl);
      } else {
        uint8_t* has = scratch.has.data();
        int64_t oy_done = 0;  // output rows [0, oy_done) are written
        for (int64_t ph = 0; ph < g.pooled_h; ++ph) {
          for (int64_t pw0 = 0; pw0 < g.pooled_w; pw0 += scratch.seg) {
            const int64_t pw1 = std::min(g.pooled_w, pw0 + scratch.seg);
            bad = std::min(bad, bucket_segment<scalar_t, acc_t, index_t>(zn, in, g, wtab, kp, ph, pw0, pw1,
                                                                         slot_ring.data(), scratch));
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
  check_no_bad_index(first_bad.load());
}

}  // namespace

void forward_per_entry(const ForwardCall& call) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, call.z.scalar_type(), "unpool_conv_transpose2d_cpu", [&] {
    if (call.idx.scalar_type() == at::kLong)
      forward_typed<scalar_t, int64_t>(call);
    else
      forward_typed<scalar_t, uint8_t>(call);
  });
}

}  // namespace unpool_deconv_cpu
}  // namespace aefast
