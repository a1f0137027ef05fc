// The per-entry kernels of the fused decoder block, forward (unpool_deconv.cpp has the math and
// picks the family, the notation is in unpool_deconv_cpu.h; the backward is in
// unpool_deconv_entries_backward.cpp). They serve every shape that the window-vector kernels
// (unpool_deconv_window_vectors.cpp) do not: slabs of more than 4 vectors (e.g. 64->32), and small
// slabs with pool windows of more than 4 elements.
//
// Forward (no zero-filled unpooled map; u is never built):
//   1. T[q][k] = sum_{e at q} z_e * Wt[c_e][k] (k < Kp), the tap vector of position q.
//      * large slabs (Kp > 4 vectors, e.g. 64->32: 18 zmm): GATHER, row of pool windows by row.
//        a. row_masks: per position of the row, the bitmask of the channels whose index names
//           it (one 64-bit word per 64 channels), vectorised over 8 windows with AVX-512
//           compares (a masked OR per offset and channel; the portable clones OR bit by bit).
//           Decoding is the validation; a row with a bad index is rescanned for the first one.
//        b. slab_sums: per position, walk the set bits (ascending channel, tzcnt / blsr): a
//           broadcast of z (the row's z copied window-major first) times the weight slab at
//           c*Kp, summed in SIMD registers in column chunks of <= 12 vectors that keep the
//           C_in x chunk weight block within 48 KiB of L1 (9 of 18 for 64->32: ~4% faster
//           than 6 within 32 KiB; 6 of 36 for 128->64, see kForwardChunkBytes); one
//           weight load per FMA, the position's T written once, zeros where it has no entry.
//        These replaced bucketing the entries by position (a counter and two stores per entry,
//        ~30% of the forward's time). The sums are the same, in the same order: the output
//        equals the bucketed version's (torch.equal on the benchmark and W2 shapes; only the
//        sign of an exact zero sum may differ, where a pixel's taps now add +0 slabs).
//      * small slabs (Kp <= 4 vectors, e.g. C_out = 1 or 3: 9 or 27 taps in one or two
//        vectors) with windows of at most 4 elements (2x2, 1x2, 2x1, 1x1): not this layout at
//        all but the window-vector kernels (lanes = pool windows, taps = loop iterations; see
//        unpool_deconv_window_vectors.cpp, with the measurements that led there).
//      * other small slabs (larger windows): a position holds only ~C_in/window entries of one
//        or two vectors, too few to pay for any sorting. The row band of T is zeroed and,
//        channel-major with Wt[c] in registers, each entry adds z * Wt[c] to T[q] (consecutive
//        entries hit different windows, so the adds do not wait on each other).
//   2. per output pixel (oy, ox): pre[co] = b[co] + sum_{taps (kh, kw) with oy = h*sh - padh + kh,
//      ox = w*sw - padw + kw} T[(h, w)][kh][kw][co], vectorised over co, bias fused. T is dense
//      (every position written), so a pixel's tap offsets are its rows' plus its columns' (and
//      an interior pixel's are the previous pixel's plus Kp). channels_last: activation and
//      vector stores per pixel. NCHW: the row goes channels-last into a buffer, L x L blocks of
//      it are transposed in registers and stored along each channel's row, the activation on
//      the transposed vectors (a compile-time constant; relu / leaky_relu, and sigmoid for fp32
//      accumulation, on whole vectors). (Calling ATen's vectorised sigmoid per image from inside
//      the parallel region was tried: with 2 OpenMP threads it cost ~7 ms per call in waits, so
//      the other transcendental activations stay scalar here.) With large slabs T lives in a
//      ring of unpooled rows: steps 1 and 2 run row of windows by row of windows, so T stays in
//      L2 (decoder_ring_rows).
//   Measured (standalone harness, 1 thread, CPU time, medians of interleaved runs against the
//   bucketed version, loaded 2-core Zen 5): 64->32 @14x14 N=256 0.74-0.79x the time with window
//   and flat indices; 128->64 @32x32 and 64->32 @64x64 N=32 0.80-0.91x.
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

#if AEFAST_X86_CLONES
#include <immintrin.h>
#endif

namespace aefast {
namespace unpool_deconv_cpu {
namespace {

// Column chunks of the large-slab sums: C_in x chunk weights within this many bytes of L1.
// 48 KiB (the whole L1D of these Zen 5 cores), not 40: 128->64 (36 vectors) then runs 6 chunks
// of 6 instead of 7 of 5 and one of 1, and each chunk re-walks every position's channel masks
// (tzcnt loop, a mispredicted exit per position); measured 0.92-0.93x the time of 40 KiB on
// 128->64 @32x32 N=32 (standalone harness, 1 thread, CPU time, medians of 15 interleaved runs,
// 3 repeats, loaded 2-core machine). 64->32 keeps 2 chunks of 9 (unchanged). The results do not
// depend on the chunking (each T value is one chunk's sum over the same channels in order).
constexpr int64_t kForwardChunkBytes = 49152;

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


// Step 1a of the large-slab path, one row of pool windows (ph): the channel bitmask of every
// position of the row, masks[(pw * window + o) * words + w], bit c % 64 of word c / 64 set iff
// entry (c, ph, pw) lies at offset o of its window. Returns whether some index of the row is
// invalid (it sets no bit); the caller then finds the first one (first_bad_in_image).
// This replaces bucketing the entries (a counter increment and two stores per entry, ~30% of the
// forward's time): the slab sums walk the set bits instead.
//
// Portable form (baseline and AVX2 clones): entry by entry, channel-major (z and idx read
// contiguously along pw), OR the channel's bit into its position's mask.
template <typename index_t>
AEFAST_ALWAYS_INLINE bool row_masks_scalar(const index_t* __restrict__ idx, const DecoderGeometry& g,
                                           const WindowTable& wtab, int64_t ph, int64_t words,
                                           uint64_t* __restrict__ masks) {
  const int64_t window = wtab.window, pwn = g.pooled_w, plane = g.pooled_h * pwn;
  std::fill(masks, masks + pwn * window * words, uint64_t(0));
  bool bad = false;
  for (int64_t c = 0; c < g.c_in; ++c) {
    const uint64_t bit = uint64_t(1) << (c & 63);
    uint64_t* __restrict__ mw = masks + c / 64;
    for (int64_t pw = 0; pw < pwn; ++pw) {
      const int64_t o = decode_offset(idx, c * plane + ph * pwn + pw, ph * g.pool_h, pw * g.pool_w, g, wtab);
      if (o < 0) {
        bad = true;
        continue;
      }
      mw[(pw * window + o) * words] |= bit;
    }
  }
  return bad;
}

// AVX-512 form: vectorised over 8 windows of the row (one 64-bit lane each). Per channel the
// lanes' indices are compared with the value that names each offset of their window (want, from
// lane_tables) and the channel's bit is ORed into the lanes that match (a compare into a mask
// register and a masked OR per offset: ~2 instructions per entry for 2x2 windows). An index that
// matches no offset inside the plane is invalid. Intrinsics, not GCC vector extensions: GCC 12
// lowered the generic form of these 64-bit compares to lane-by-lane code (slower than the
// portable loop).
// row_masks' per-lane tables of windows ph, pw0 .. pw0 + 7: per offset o, the value an index
// must have to name it (want[o*8 + l]: the window offset, or the flat position; -1 where that
// position is outside the plane, a value only an invalid flat index can have) and whether it is
// inside the plane (inside[o*8 + l]: bit l). Returns the lanes that are windows of the row.
inline uint8_t lane_tables(const DecoderGeometry& g, int64_t ph, int64_t pw0, bool flat, int64_t* __restrict__ want,
                           uint8_t* __restrict__ inside) {
  const int64_t window = g.pool_h * g.pool_w, h0 = ph * g.pool_h;
  uint8_t live = 0;
  for (int64_t l = 0; l < 8; ++l) live |= static_cast<uint8_t>((pw0 + l < g.pooled_w) << l);
  for (int64_t o = 0; o < window; ++o) {
    const int64_t di = o / g.pool_w, dj = o % g.pool_w;
    inside[o] = 0;
    for (int64_t l = 0; l < 8; ++l) {
      const int64_t w = (pw0 + l) * g.pool_w + dj;
      const bool in = pw0 + l < g.pooled_w && h0 + di < g.unpooled_h && w < g.unpooled_w;
      want[o * 8 + l] = !in ? -1 : flat ? (h0 + di) * g.unpooled_w + w : o;
      inside[o] |= static_cast<uint8_t>(in << l);
    }
  }
  return live;
}
#if AEFAST_X86_CLONES
// WIN: the window size when it is a compile-time constant (2x2: accumulators in registers), 0
// for any other (accumulators in acc_mem).
template <int WIN, typename index_t>
AEFAST_TARGET_AVX512 __attribute__((noinline)) bool row_masks_avx512(const index_t* __restrict__ idx, int64_t avail,
                                                                     const DecoderGeometry& g, int64_t ph,
                                                                     int64_t words, uint64_t* __restrict__ masks,
                                                                     int64_t* __restrict__ scratch) {
  constexpr bool flat = std::is_same_v<index_t, int64_t>;
  const int64_t window = WIN ? WIN : g.pool_h * g.pool_w;
  const int64_t pwn = g.pooled_w, plane = g.pooled_h * pwn;
  int64_t* __restrict__ acc_mem = scratch;         // [window][8]
  int64_t* __restrict__ want = scratch + window * 8;  // [window][8]
  uint8_t inside_stack[64];
  std::vector<uint8_t> inside_heap(window > 64 ? window : 0);
  uint8_t* __restrict__ inside = window > 64 ? inside_heap.data() : inside_stack;
  uint8_t bad = 0;
  for (int64_t pw0 = 0; pw0 < pwn; pw0 += 8) {
    const uint8_t live = lane_tables(g, ph, pw0, flat, want, inside);
    bool clipped = live != 0xff;
    for (int64_t o = 0; o < window; ++o) clipped |= inside[o] != live;
    __m512i wv[WIN ? WIN : 1];
    if constexpr (WIN > 0)
      for (int o = 0; o < WIN; ++o) wv[o] = _mm512_loadu_si512(want + o * 8);
    const int64_t nl = std::min<int64_t>(8, pwn - pw0);
    for (int64_t w = 0; w < words; ++w) {
      __m512i acc[WIN ? WIN : 1];
      if constexpr (WIN > 0)
        for (int o = 0; o < WIN; ++o) acc[o] = _mm512_setzero_si512();
      else
        std::fill(acc_mem, acc_mem + window * 8, int64_t(0));
      const int64_t c1 = std::min(g.c_in, 64 * w + 64);
      for (int64_t c = 64 * w; c < c1; ++c) {
        const int64_t k = c * plane + ph * pwn + pw0;
        // Masked loads past the tensor's end (the last row of the last image): they never fault.
        const __mmask8 room = avail - k >= 8 ? __mmask8(0xff) : __mmask8((1u << (avail - k)) - 1);
        __m512i v;
        if constexpr (flat)
          v = _mm512_maskz_loadu_epi64(room, idx + k);
        else
          v = _mm512_cvtepu8_epi64(_mm_maskz_loadu_epi8(room, idx + k));
        const __m512i bit = _mm512_set1_epi64(static_cast<int64_t>(uint64_t(1) << (c & 63)));
        __mmask8 hit = 0;
        if constexpr (WIN > 0) {
          for (int o = 0; o < WIN; ++o) {
            const __mmask8 e = _mm512_cmpeq_epi64_mask(v, wv[o]);
            hit |= e;
            acc[o] = _mm512_mask_or_epi64(acc[o], e, acc[o], bit);
          }
        } else {
          for (int64_t o = 0; o < window; ++o) {
            const __mmask8 e = _mm512_cmpeq_epi64_mask(v, _mm512_loadu_si512(want + o * 8));
            hit |= e;
            const __m512i a = _mm512_loadu_si512(acc_mem + o * 8);
            _mm512_storeu_si512(acc_mem + o * 8, _mm512_mask_or_epi64(a, e, a, bit));
          }
        }
        bad |= live & ~hit;
      }
      if constexpr (WIN > 0)
        for (int o = 0; o < WIN; ++o) _mm512_storeu_si512(acc_mem + o * 8, acc[o]);
      for (int64_t l = 0; l < nl; ++l)
        for (int64_t o = 0; o < window; ++o) {
          const int64_t m = acc_mem[o * 8 + l];
          // A match of want -1 (a flat index -1 where the offset is outside the plane).
          if (clipped && m != 0 && !((inside[o] >> l) & 1)) bad = 1;
          masks[((pw0 + l) * window + o) * words + w] = static_cast<uint64_t>(m);
        }
    }
  }
  return bad != 0;
}
#endif

// The first invalid index of an image (NCHW-linear within the image), INT64_MAX if none: the
// error path only, after row_masks has reported one.
template <typename index_t>
int64_t first_bad_in_image(const index_t* idx, const DecoderGeometry& g, const WindowTable& wtab) {
  const int64_t plane = g.pooled_h * g.pooled_w;
  for (int64_t c = 0; c < g.c_in; ++c)
    for (int64_t ph = 0; ph < g.pooled_h; ++ph)
      for (int64_t pw = 0; pw < g.pooled_w; ++pw) {
        const int64_t k = c * plane + ph * g.pooled_w + pw;
        if (decode_offset(idx, k, ph * g.pool_h, pw * g.pool_w, g, wtab) < 0) return k;
      }
  return std::numeric_limits<int64_t>::max();
}

template <int VB, typename scalar_t, typename acc_t, typename index_t>
AEFAST_ALWAYS_INLINE bool masks_body(const index_t* idx, int64_t avail, const DecoderGeometry& g,
                                     const WindowTable& wtab, int64_t ph, int64_t words, uint64_t* masks,
                                     int64_t* scratch) {
#if AEFAST_X86_CLONES
  if constexpr (VB == 64) {
    if (g.pool_h * g.pool_w == 4) return row_masks_avx512<4, index_t>(idx, avail, g, ph, words, masks, scratch);
    return row_masks_avx512<0, index_t>(idx, avail, g, ph, words, masks, scratch);
  }
#endif
  return row_masks_scalar<index_t>(idx, g, wtab, ph, words, masks);
}
AEFAST_ISA_CLONES_IDX(masks, bool,
                      (const index_t* idx, int64_t avail, const DecoderGeometry& g, const WindowTable& wtab,
                       int64_t ph, int64_t words, uint64_t* masks, int64_t* scratch),
                      (idx, avail, g, wtab, ph, words, masks, scratch))

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
// Step 1b: T[q][k0 : k0 + NV*L] = sum_{c in mask(q)} z[c] * Wt[c][k0 : ...] for every position q
// of a row of windows (channels ascending: the set bits of the mask in order, tzcnt / blsr),
// summed in NV vector registers and stored once; a position without entries gets zeros, so
// every position of the row is written (the epilogue needs no "has entries" test).
template <int VB, int NV, typename acc_t>
AEFAST_ALWAYS_INLINE void slab_sums(const acc_t* __restrict__ wt, const acc_t* __restrict__ zrow, int64_t c_in,
                                    const uint64_t* __restrict__ masks, int64_t words,
                                    const int32_t* __restrict__ ring_of, int64_t pwn, int64_t window,
                                    acc_t* __restrict__ T, int64_t kp) {
  using V = typename VecOf<acc_t, VB>::type;
  constexpr int L = VecOf<acc_t, VB>::L;
  for (int64_t pw = 0; pw < pwn; ++pw) {
    const acc_t* __restrict__ zk = zrow + pw * c_in;
    for (int64_t o = 0; o < window; ++o) {
      const int64_t s = pw * window + o;
      const int32_t rq = ring_of[s];
      if (rq < 0) continue;  // a clipped window's offset outside the plane
      V a[NV];
      for (int j = 0; j < NV; ++j) a[j] = V{};
      for (int64_t w = 0; w < words; ++w) {
        uint64_t m = masks[s * words + w];
        while (m) {
          const int64_t c = 64 * w + __builtin_ctzll(m);
          m &= m - 1;
          const V zb = zk[c] - V{};  // a broadcast (x - +0 is x, -0 included)
          const acc_t* __restrict__ wc = wt + c * kp;
          // Opaque to the optimiser: otherwise GCC folds the chunk offset k0 + j*L into one
          // register per vector (spilled to xmm) instead of the loads' displacements.
          asm("" : "+r"(wc));
          for (int j = 0; j < NV; ++j) a[j] += zb * vload<V>(wc + j * L);
        }
      }
      for (int j = 0; j < NV; ++j) vstore(T + rq * kp + j * L, a[j]);
    }
  }
}

// Step 1b for every column chunk of the slab (nvc vectors each: the C_in x chunk weight block
// stays in L1 while the row's positions are summed).
template <int VB, typename scalar_t, typename acc_t>
AEFAST_ALWAYS_INLINE void slabs_body(const acc_t* wt, const acc_t* zrow, int64_t c_in, const uint64_t* masks,
                                     int64_t words, const int32_t* ring_of, int64_t pwn, int64_t window, acc_t* T,
                                     int64_t kp, int64_t nvc) {
  constexpr int L = VecOf<acc_t, VB>::L;
  for (int64_t k0 = 0; k0 < kp; k0 += nvc * L) {
    const int64_t nv = std::min<int64_t>(nvc, (kp - k0) / L);
    switch (nv) {
#define AEFAST_SLAB_CASE(K)                                                                             \
  case K:                                                                                               \
    slab_sums<VB, K, acc_t>(wt + k0, zrow, c_in, masks, words, ring_of, pwn, window, T + k0, kp); \
    break;
      AEFAST_SLAB_CASE(1) AEFAST_SLAB_CASE(2) AEFAST_SLAB_CASE(3) AEFAST_SLAB_CASE(4)
      AEFAST_SLAB_CASE(5) AEFAST_SLAB_CASE(6) AEFAST_SLAB_CASE(7) AEFAST_SLAB_CASE(8)
      AEFAST_SLAB_CASE(9) AEFAST_SLAB_CASE(10) AEFAST_SLAB_CASE(11) AEFAST_SLAB_CASE(12)
#undef AEFAST_SLAB_CASE
      default: break;
    }
  }
}
AEFAST_ISA_CLONES(slabs,
                  (const acc_t* wt, const acc_t* zrow, int64_t c_in, const uint64_t* masks, int64_t words,
                   const int32_t* ring_of, int64_t pwn, int64_t window, acc_t* T, int64_t kp, int64_t nvc),
                  (wt, zrow, c_in, masks, words, ring_of, pwn, window, T, kp, nvc))

// Column chunks of the slab: at most max_nv vectors, and at most what keeps C_in chunks of
// weights within budget bytes (L1), balanced.
inline int64_t forward_chunk_vectors(int64_t nvt, int64_t c_in, int64_t vbytes, int64_t max_nv, int64_t budget) {
  const int64_t l1 = std::max<int64_t>(1, budget / std::max<int64_t>(1, c_in * vbytes));
  const int64_t cap = std::max<int64_t>(1, std::min({max_nv, nvt, l1}));
  const int64_t chunks = (nvt + cap - 1) / cap;
  return (nvt + chunks - 1) / chunks;
}

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

// Step 2 of the forward: gather the taps of every output pixel, bias, activation, store.
// T is dense (every position written, zeros where no entry), so a pixel's tap list is its
// rows' offsets (tap row r of the call: T row rowq[r], kernel row rt.kk[r]) plus its columns'
// offsets (colpart: ct.x * kp + ct.kk * C_out), in the fixed (kh, kw) order. Output rows
// oy0 .. oy1-1.
// channels_last: a pixel's C_out values are one contiguous run, stored as vectors.
// NCHW: the row's pre-activations go channels-last into rowbuf ([pixel][channel], vectors),
// then L x L blocks of it are transposed in registers (log2 L rounds of interleaves) and stored
// as vectors along each channel's output row, the activation applied to the transposed vectors.
// (Storing lane by lane into per-channel rows and copying those to the planes, as before, was
// one scalar store per value; storing lanes straight into NCHW made C_out lines a plane apart per
// pixel, which with 4 KiB planes share one L1 set: measured, 64->32 at 64x64 ran at half the rate
// of 66x66.)
template <int VB, int NV, typename acc_t>
AEFAST_ALWAYS_INLINE void pixel_sums(const acc_t* __restrict__ T, const int64_t* __restrict__ offs, int32_t nt,
                                     const acc_t* __restrict__ bias, int64_t cb0,
                                     typename VecOf<acc_t, VB>::type (&a)[NV]) {
  using V = typename VecOf<acc_t, VB>::type;
  constexpr int L = VecOf<acc_t, VB>::L;
  for (int j = 0; j < NV; ++j) a[j] = vload<V>(bias + cb0 + j * L);
  for (int32_t t = 0; t < nt; ++t) {
    const acc_t* __restrict__ src = T + offs[t] + cb0;
    for (int j = 0; j < NV; ++j) a[j] += vload<V>(src + j * L);
  }
}

// The activation on a whole vector (relu / leaky_relu, sigmoid for float; NaN propagates:
// x < 0 is false for it), else lane by lane on the first nl lanes.
template <DecoderAct A, typename acc_t, typename V, typename IV>
AEFAST_ALWAYS_INLINE V act_vec(V v, acc_t sl, int64_t nl) {
  if constexpr (A == DecoderAct::None) {
    return v;
  } else if constexpr (A == DecoderAct::Relu) {
    return v < V{} ? V{} : v;
  } else if constexpr (A == DecoderAct::LeakyRelu) {
    return v >= V{} ? v : v * sl;
  } else if constexpr (A == DecoderAct::Sigmoid && std::is_same_v<acc_t, float>) {
    return sigmoid_vec_f32<V, IV>(v);
  } else {
    for (int64_t l = 0; l < nl; ++l) v[l] = act_forward<acc_t>(v[l], A, sl);
    return v;
  }
}

// r[i] = row i of an L x L block -> r[i] = column i: log2 L rounds of interleaving r[i] with
// r[i + L/2] (after round t, lane bits and row bits have rotated by t + 1 places).
template <typename V, int L>
AEFAST_ALWAYS_INLINE void transpose_block(V (&r)[L]) {
  using I = std::conditional_t<sizeof(r[0][0]) == 4, int32_t, int64_t>;
  typedef I M __attribute__((vector_size(sizeof(V))));
  M lo, hi;
  for (int i = 0; i < L / 2; ++i) {
    lo[2 * i] = i;
    lo[2 * i + 1] = L + i;
    hi[2 * i] = L / 2 + i;
    hi[2 * i + 1] = L + L / 2 + i;
  }
  // Fully unrolled, so that r and t stay in registers (a rolled round loop kept them in memory
  // and copied t to r with rep movsq).
#pragma GCC unroll 8
  for (int round = 1; round < L; round *= 2) {
    V t[L];
#pragma GCC unroll 16
    for (int i = 0; i < L / 2; ++i) {
      t[2 * i] = __builtin_shuffle(r[i], r[i + L / 2], lo);
      t[2 * i + 1] = __builtin_shuffle(r[i], r[i + L / 2], hi);
    }
#pragma GCC unroll 16
    for (int i = 0; i < L; ++i) r[i] = t[i];
  }
}

// z of one image, window-major as the slab sums read it: dst[p * C_in + c] = z[c][p] (the
// NCHW planes transposed, in the accumulation type), in L x L register blocks. It replaced a
// scalar copy per row of windows (a strided store per value: ~7% of the 64->32 @14x14 forward,
// 1 thread, perf samples). Half types convert value by value.
template <int VB, typename scalar_t, typename acc_t>
AEFAST_ALWAYS_INLINE void windows_major_body(const scalar_t* __restrict__ src, int64_t c_n, int64_t p_n,
                                             acc_t* __restrict__ dst) {
  using V = typename VecOf<acc_t, VB>::type;
  constexpr int L = VecOf<acc_t, VB>::L;
  int64_t c0 = 0;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    for (; c0 + L <= c_n; c0 += L) {
      int64_t p0 = 0;
      for (; p0 + L <= p_n; p0 += L) {
        V r[L];
        for (int i = 0; i < L; ++i) r[i] = vload<V>(src + (c0 + i) * p_n + p0);
        transpose_block<V, L>(r);
        for (int i = 0; i < L; ++i) vstore(dst + (p0 + i) * c_n + c0, r[i]);
      }
      for (; p0 < p_n; ++p0)
        for (int i = 0; i < L; ++i) dst[p0 * c_n + c0 + i] = src[(c0 + i) * p_n + p0];
    }
  }
  for (; c0 < c_n; ++c0)
    for (int64_t p = 0; p < p_n; ++p) dst[p * c_n + c0] = static_cast<acc_t>(src[c0 * p_n + p]);
}
AEFAST_ISA_CLONES(windows_major, (const scalar_t* src, int64_t c_n, int64_t p_n, acc_t* dst), (src, c_n, p_n, dst))

// The first nl lanes of v to dst, converted to scalar_t: a whole-vector store when nl = L, else
// one masked store (AVX-512), or pieces of 8, 4, 2 and 1 lanes (fixed-size copies, each one
// move; a lane loop compiled to a spill and rep movsq, ~40% of the epilogue for 14-pixel rows).
template <typename scalar_t, typename acc_t, typename V>
AEFAST_ALWAYS_INLINE void store_lanes(scalar_t* __restrict__ dst, const V& v, int64_t nl) {
  constexpr int L = static_cast<int>(sizeof(V) / sizeof(acc_t));
  if constexpr (!std::is_same_v<scalar_t, acc_t>) {
    for (int64_t l = 0; l < nl; ++l) dst[l] = static_cast<scalar_t>(v[l]);
  } else {
    if (nl == L) {
      vstore(dst, v);
      return;
    }
#if AEFAST_X86_CLONES
    if constexpr (sizeof(V) == 64) {  // only in the AVX-512 clones: one masked store
      // ("+m" on the vector's bytes, unaligned: the compiler keeps every other access to them in
      // order; the masked-off lanes are neither read nor written, nor can they fault.)
      struct VectorBytes {
        char b[sizeof(V)];
      };
      VectorBytes& bytes = *reinterpret_cast<VectorBytes*>(dst);
      if constexpr (sizeof(acc_t) == 4) {
        const uint16_t m = static_cast<uint16_t>((1u << nl) - 1);
        asm("vmovups %1, %0%{%2%}" : "+m"(bytes) : "v"(v), "Yk"(m));
      } else {
        const uint8_t m = static_cast<uint8_t>((1u << nl) - 1);
        asm("vmovupd %1, %0%{%2%}" : "+m"(bytes) : "v"(v), "Yk"(m));
      }
      return;
    }
#endif
    acc_t lanes[L];
    __builtin_memcpy(lanes, &v, sizeof(V));
    int64_t l = 0;
    if constexpr (L > 8)
      if (nl & 8) {
        __builtin_memcpy(dst + l, lanes + l, 8 * sizeof(acc_t));
        l += 8;
      }
    if constexpr (L > 4)
      if (nl & 4) {
        __builtin_memcpy(dst + l, lanes + l, 4 * sizeof(acc_t));
        l += 4;
      }
    if constexpr (L > 2)
      if (nl & 2) {
        __builtin_memcpy(dst + l, lanes + l, 2 * sizeof(acc_t));
        l += 2;
      }
    if (nl & 1) dst[l] = lanes[l];
  }
}

template <int VB, DecoderAct A, typename scalar_t, typename acc_t>
AEFAST_ALWAYS_INLINE void epilogue_act(const acc_t* __restrict__ T, const acc_t* __restrict__ bias,
                                       const DecoderGeometry& g, const AxisTaps& rt,
                                       const int64_t* __restrict__ rowq, const AxisTaps& ct,
                                       const int64_t* __restrict__ colpart, const uint8_t* __restrict__ col_shifts,
                                       int64_t kp, acc_t sl, scalar_t* __restrict__ out, scalar_t* __restrict__ pre, int64_t oy0,
                                       int64_t oy1, acc_t* __restrict__ rowbuf, bool cl) {
  using V = typename VecOf<acc_t, VB>::type;
  using IV = typename VecOf<std::conditional_t<sizeof(acc_t) == 4, int32_t, int64_t>, VB>::type;
  constexpr int L = VecOf<acc_t, VB>::L;
  constexpr int64_t kMaxBlock = 8;  // vectors of channels per register block
  const int64_t co_n = g.c_out, hw_out = g.out_h * g.out_w, kw_n = g.kernel_w;
  const int64_t nvt = (co_n + L - 1) / L, cs = nvt * L;  // rowbuf: [pixel][cs]
  int64_t offs_stack[64], rowpart_stack[16];
  std::vector<int64_t> offs_heap(g.kernel_h * g.kernel_w > 64 ? g.kernel_h * g.kernel_w : 0);
  std::vector<int64_t> rowpart_heap(g.kernel_h > 16 ? g.kernel_h : 0);
  int64_t* __restrict__ offs = offs_heap.empty() ? offs_stack : offs_heap.data();
  int64_t* __restrict__ rowpart = rowpart_heap.empty() ? rowpart_stack : rowpart_heap.data();
  for (int64_t oy = oy0; oy < oy1; ++oy) {
    const int32_t r0 = rt.first[oy], nr = rt.first[oy + 1] - r0;
    for (int32_t r = 0; r < nr; ++r) rowpart[r] = rowq[r0 + r] * kp + rt.kk[r0 + r] * kw_n * co_n;
    int32_t nt = 0;
    int64_t shift = 0;  // offs are those of pixel ox - shift / kp, moved right by shift
    for (int64_t ox = 0; ox < g.out_w; ++ox) {
      if (ox > 0 && col_shifts[ox]) {
        shift += kp;
      } else {
        const int32_t c0 = ct.first[ox], nc = ct.first[ox + 1] - c0;
        nt = 0;
        shift = 0;
        for (int32_t r = 0; r < nr; ++r)
          for (int32_t c = 0; c < nc; ++c) offs[nt++] = rowpart[r] + colpart[c0 + c];
      }
      for (int64_t v0 = 0; v0 < nvt; v0 += kMaxBlock) {
        const int64_t cb0 = v0 * L;
        switch (std::min(kMaxBlock, nvt - v0)) {
#define AEFAST_EPI_CASE(K)                                                                        \
  case K: {                                                                                       \
    V a[K];                                                                                       \
    pixel_sums<VB, K, acc_t>(T + shift, offs, nt, bias, cb0, a);                                  \
    if (cl) {                                                                                     \
      scalar_t* o_px = out + (oy * g.out_w + ox) * co_n;                                          \
      scalar_t* p_px = pre ? pre + (oy * g.out_w + ox) * co_n : nullptr;                          \
      for (int j = 0; j < K; ++j) {                                                               \
        const int64_t cb = cb0 + j * L, nl = std::min<int64_t>(L, co_n - cb);                     \
        if (p_px) store_lanes<scalar_t, acc_t>(p_px + cb, a[j], nl);                              \
        store_lanes<scalar_t, acc_t>(o_px + cb, act_vec<A, acc_t, V, IV>(a[j], sl, nl), nl);      \
      }                                                                                           \
    } else {                                                                                      \
      for (int j = 0; j < K; ++j) vstore(rowbuf + ox * cs + cb0 + j * L, a[j]);                   \
    }                                                                                             \
  } break;
          AEFAST_EPI_CASE(1) AEFAST_EPI_CASE(2) AEFAST_EPI_CASE(3) AEFAST_EPI_CASE(4)
          AEFAST_EPI_CASE(5) AEFAST_EPI_CASE(6) AEFAST_EPI_CASE(7) AEFAST_EPI_CASE(8)
#undef AEFAST_EPI_CASE
          default: break;
        }
      }
    }
    if (cl) continue;
    // rowbuf has room for whole blocks of L pixels (the lanes past out_w are never stored).
    for (int64_t ox0 = 0; ox0 < g.out_w; ox0 += L) {
      const int64_t np = std::min<int64_t>(L, g.out_w - ox0);
      for (int64_t cb = 0; cb < co_n; cb += L) {
        V r[L];
        for (int i = 0; i < L; ++i) r[i] = vload<V>(rowbuf + (ox0 + i) * cs + cb);
        transpose_block<V, L>(r);
        const int64_t nch = std::min<int64_t>(L, co_n - cb);
        for (int64_t i = 0; i < nch; ++i) {
          const int64_t at = (cb + i) * hw_out + oy * g.out_w + ox0;
          if (pre) store_lanes<scalar_t, acc_t>(pre + at, r[i], np);
          store_lanes<scalar_t, acc_t>(out + at, act_vec<A, acc_t, V, IV>(r[i], sl, np), np);
        }
      }
    }
  }
}
template <int VB, typename scalar_t, typename acc_t>
AEFAST_ALWAYS_INLINE void epilogue_body(const acc_t* T, const acc_t* bias, const DecoderGeometry& g,
                                        const AxisTaps& rt, const int64_t* rowq, const AxisTaps& ct,
                                        const int64_t* colpart, const uint8_t* col_shifts, int64_t kp, DecoderAct act,
                                        acc_t sl, scalar_t* out, scalar_t* pre, int64_t oy0, int64_t oy1,
                                        acc_t* rowbuf, bool cl) {
#define AEFAST_EPILOGUE(A)                                                                                        \
  epilogue_act<VB, A, scalar_t, acc_t>(T, bias, g, rt, rowq, ct, colpart, col_shifts, kp, sl, out, pre, oy0, oy1, \
                                       rowbuf, cl)
  AEFAST_FOR_DECODER_ACT(act, AEFAST_EPILOGUE)
#undef AEFAST_EPILOGUE
}
AEFAST_ISA_CLONES(epilogue,
                  (const acc_t* T, const acc_t* bias, const DecoderGeometry& g, const AxisTaps& rt,
                   const int64_t* rowq, const AxisTaps& ct, const int64_t* colpart, const uint8_t* col_shifts,
                   int64_t kp, DecoderAct act, acc_t sl, scalar_t* out, scalar_t* pre, int64_t oy0, int64_t oy1,
                   acc_t* rowbuf, bool cl),
                  (T, bias, g, rt, rowq, ct, colpart, col_shifts, kp, act, sl, out, pre, oy0, oy1, rowbuf, cl))

template <typename scalar_t, typename index_t>
void forward_typed(const ForwardCall& call) {
  using acc_t = at::opmath_type<scalar_t>;
  const DecoderGeometry& g = call.g;
  const bool cl = call.cl;
  const DecoderAct act = call.act;
  const ForwardOperands<scalar_t> ops(call.z, call.weight, call.bias, g);
  const Isa isa = ops.isa;
  const int64_t L = ops.L, kp = ops.kp;
  const int64_t nvc = forward_chunk_vectors(kp / L, g.c_in, vec_bytes(isa), 12, kForwardChunkBytes);
  const at::TensorOptions acc_opts = ops.acc_opts;
  const acc_t* wt = ops.wt_t.template const_data_ptr<acc_t>();
  const acc_t* b = ops.b_t.template const_data_ptr<acc_t>();
  const WindowTable wtab(g);
  const int64_t window = wtab.window;
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
  const auto masks_of_row = AEFAST_PICK_IDX(masks, isa);
  const auto windows_major = AEFAST_PICK(windows_major, isa);
  // Small slabs: row bands of dense T (band_sums); larger ones: channel masks (slab_sums).
  const bool small = kp / L <= 4;
  const auto bands = AEFAST_PICK_IDX(bands, isa);
  // The path taken, named in the profiler (bench/bench_kernel_ledger.py reads it).
  RECORD_USER_SCOPE("aefast path: unpool_conv_transpose2d per entry");
  // Large slabs: T in a ring of unpooled rows, each output row's epilogue run as soon as the
  // rows it reads are summed (decoder_ring_rows). The small-slab bands keep the image's T.
  const int64_t ring = small ? g.unpooled_h : decoder_ring_rows(g);
  const int64_t row_pos = small ? g.unpooled_w : decoder_ring_row_positions(g);
  std::vector<int64_t> rowq(rt.x.size()), need_h(static_cast<size_t>(g.out_h), -1), colpart(ct.x.size());
  for (size_t r = 0; r < rt.x.size(); ++r) rowq[r] = (rt.x[r] % ring) * row_pos;
  for (size_t c = 0; c < ct.x.size(); ++c) colpart[c] = ct.x[c] * kp + ct.kk[c] * g.c_out;
  // col_shifts[ox]: pixel ox's column taps are pixel ox-1's, each one position to the right
  // (stride-1 interior pixels), so its tap offsets are the previous ones plus kp.
  std::vector<uint8_t> col_shifts(static_cast<size_t>(g.out_w), 0);
  for (int64_t ox = 1; ox < g.out_w; ++ox) {
    const int32_t c0 = ct.first[ox], c1 = ct.first[ox + 1], p0 = ct.first[ox - 1];
    bool same = c1 - c0 == c0 - p0;
    for (int32_t c = 0; same && c < c1 - c0; ++c) same = ct.kk[c0 + c] == ct.kk[p0 + c] && ct.x[c0 + c] == ct.x[p0 + c] + 1;
    col_shifts[ox] = same;
  }
  // Each slot's position in the row ring, or -1 outside the plane.
  std::vector<int32_t> slot_ring(wtab.slot_q.size());
  for (size_t i = 0; i < slot_ring.size(); ++i) {
    const int32_t q = wtab.slot_q[i];
    slot_ring[i] = q < 0 ? -1 : static_cast<int32_t>((q / g.unpooled_w % ring) * row_pos + q % g.unpooled_w);
  }
  for (int64_t oy = 0; oy < g.out_h; ++oy)  // the last unpooled row output row oy reads
    for (int32_t r = rt.first[oy]; r < rt.first[oy + 1]; ++r) need_h[oy] = std::max<int64_t>(need_h[oy], rt.x[r]);
  const int64_t words = (g.c_in + 63) / 64;
  at::parallel_for(0, g.n, 1, [&](int64_t n0, int64_t n1) {
    // T: one slab per position (of the ring, or of the image for small slabs) plus L values of
    // slack (the epilogue's last vector may run past the last slab). Zeroed once: positions
    // that no row of windows covers (columns past the last window) stay zero.
    at::Tensor T_t = zeros_cpu_cached({(small ? P : ring * row_pos) * kp + L}, acc_opts);
    acc_t* T = T_t.mutable_data_ptr<acc_t>();
    // The NCHW epilogue's channels-last output row, whole blocks of L pixels (zeroed: the lanes
    // past out_w are transposed, never stored).
    std::vector<acc_t> rowbuf((g.out_w + L - 1) / L * L * ((g.c_out + L - 1) / L * L) + L, acc_t(0));
    // The large-slab path: a row's channel masks (row_masks), the generic-window accumulators.
    PaddedVec<uint64_t> masks;
    PaddedVec<int64_t> acc_mem;
    if (!small) {
      masks.resize(g.pooled_w * window * words);
      acc_mem.resize(2 * window * 8);
    }
    // z of the image as the slab sums read it: window-major (zw[(ph * pooled_w + pw) * C_in + c]),
    // in the accumulation type; channels_last fp32 z already is. (Read straight from the NCHW
    // planes, the C_in values of a window lie a plane apart: with planes of a multiple of 1 KiB
    // they share a few L1 sets and evict each other, measured ~10% slower on 128->64 at 32x32.)
    constexpr bool z_is_acc = std::is_same_v<scalar_t, acc_t>;
    std::vector<acc_t> zw(small || (cl && z_is_acc) ? 0 : plane_in);
    std::vector<scalar_t> z_pl(cl && small ? plane_in : 0);
    std::vector<index_t> idx_pl(cl ? plane_in : 0);
    for (int64_t n = n0; n < n1; ++n) {
      const scalar_t* zn = zp + n * plane_in;
      const index_t* in = ip + n * plane_in;
      int64_t avail = (g.n - n) * plane_in;  // index values readable from in (row_masks' loads)
      if (cl) {
        image_to_planar(in, g.c_in, plane, idx_pl.data());
        in = idx_pl.data();
        avail = plane_in;
        if (small) {
          image_to_planar(zn, g.c_in, plane, z_pl.data());
          zn = z_pl.data();
        }
      }
      scalar_t* o = op + n * plane_out;
      scalar_t* p = pp ? pp + n * plane_out : nullptr;
      int64_t bad = std::numeric_limits<int64_t>::max();
      if (small) {
        bad = bands(zn, in, wt, g, wtab, kp, T);
        epilogue(T, b, g, rt, rowq.data(), ct, colpart.data(), col_shifts.data(), kp, act, sl, o, p, 0, g.out_h, rowbuf.data(), cl);
      } else {
        const acc_t* zimg = zw.data();
        if (!cl)
          windows_major(zn, g.c_in, plane, zw.data());
        else if constexpr (z_is_acc)
          zimg = reinterpret_cast<const acc_t*>(zn);
        else
          for (int64_t e = 0; e < plane_in; ++e) zw[e] = static_cast<acc_t>(zn[e]);
        bool any_bad = false;
        int64_t oy_done = 0;  // output rows [0, oy_done) are written
        for (int64_t ph = 0; ph < g.pooled_h; ++ph) {
          // The indices of the next row of windows (or the next image's first) while this one
          // is summed: their reads hop a plane per channel, which the hardware prefetchers do
          // not follow. (z is read whole and in order by windows_major.)
          if (cl)
            ;  // (idx is not planes there)
          else if (ph + 1 < g.pooled_h)
            prefetch_window_row(static_cast<const scalar_t*>(nullptr), in, g, ph + 1, 0, g.pooled_w);
          else if (n + 1 < n1)
            prefetch_window_row(static_cast<const scalar_t*>(nullptr), in + plane_in, g, 0, 0, g.pooled_w);
          any_bad |= masks_of_row(in, avail, g, wtab, ph, words, masks.data(), acc_mem.data());
          slabs(wt, zimg + ph * g.pooled_w * g.c_in, g.c_in, masks.data(), words,
                slot_ring.data() + ph * g.pooled_w * window, g.pooled_w, window, T, kp, nvc);
          const int64_t h_done = std::min(g.unpooled_h, (ph + 1) * g.pool_h);
          int64_t oy1 = oy_done;
          while (oy1 < g.out_h && need_h[oy1] < h_done) ++oy1;
          epilogue(T, b, g, rt, rowq.data(), ct, colpart.data(), col_shifts.data(), kp, act, sl, o, p, oy_done, oy1,
                   rowbuf.data(), cl);
          oy_done = oy1;
        }
        // Unpooled rows below the last row of windows hold no entry; their ring rows may hold
        // another row's sums.
        for (int64_t h = g.pooled_h * g.pool_h; h < g.unpooled_h; ++h)
          std::fill(T + (h % ring) * row_pos * kp, T + (h % ring + 1) * row_pos * kp, acc_t(0));
        epilogue(T, b, g, rt, rowq.data(), ct, colpart.data(), col_shifts.data(), kp, act, sl, o, p, oy_done, g.out_h,
                 rowbuf.data(), cl);
        if (any_bad) bad = first_bad_in_image(in, g, wtab);
      }
      if (bad != std::numeric_limits<int64_t>::max()) atomic_min(first_bad, n * plane_in + bad);
    }
  });
  check_no_bad_index(first_bad.load());
}

}  // namespace

void forward_per_entry(const ForwardCall& call) {
  dispatch_decoder_types(call.z, call.idx, [&]<typename S, typename I>() { forward_typed<S, I>(call); });
}

}  // namespace unpool_deconv_cpu
}  // namespace aefast
