// The per-entry kernels of the fused decoder block, backward (the forward and the shapes they
// serve: unpool_deconv_entries_forward.cpp; the notation: unpool_deconv_cpu.h).
//
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
//   * small slabs with windows of at most 4 elements: the window-vector kernels.
//   * other small slabs: per row band of windows, nb of every position of the band is copied
//     once into a band im2col; then channel-major with Wt[c] and the grad_Wt[c] sum in
//     registers, each entry costs one nb load, a dot (grad_z) and an FMA (grad_W).
//
// Measured on 64->32 @14x14 N=256 (one Zen 5 core, CPU time, interleaved medians on a busy
// machine; window / flat indices: 8.3 / 9.2 ms before this design, 4.9-5.2 / 5.0-5.5 ms with it;
// W2's 128->64 @32x32 and 64->32 @64x64, N=32: 1.3x and 1.35x faster), what each part of the
// per-channel path owes its form:
//   * gpre from NCHW grad_out goes through a planar band buffer and L x L register-tile
//     transposes (was: per output row, a serial sum of the row's tail and strided scalar stores;
//     2.5 cycles per value, a quarter of the time);
//   * the index decode is branch-free over a channel's plane (vectorised; was ~5 cycles per flat
//     index) and yields each entry's nb offset directly (no position -> offset lookup per entry
//     and chunk: -7%);
//   * the next image's grad_out, act_in, z and indices are prefetched a slice per channel during
//     the channel loop (gpre and the decode were waiting on memory: -5% with flat indices);
//   * the channel loop is specialised on the gradients needed and on the first chunk, its dot
//     runs on two accumulators, and L entries' partial vectors are reduced together (lane_sums);
//     with AVX-512 a chunk holds up to 12 vectors (a C_out = 64 run in one pass).
// The channel loop is then bound by its nb loads (one per two FMAs, from L1 at random offsets:
// ~1.2 loads per cycle measured in isolation), not by the FMAs; tried and dropped, as slower or
// no faster: chunks of 9 vectors spanning two runs (fewer partial-vector round trips, +7%: the
// larger live set), per-vector offsets read from a table (+11%), two grad_Wt accumulator sets
// (no change: FMA latency does not bound the loop), other prefetch hints (no change).
//
// Determinism: every output element is owned by one thread and summed in a fixed order: the
// forward per image (entries of a position in ascending channel order, the taps of an output
// pixel in (kh, kw) order); grad_z per image (its slab dot in a fixed vector order); grad_W per
// fixed chunk of images (entries in channel / window order, chunks added in chunk order);
// grad_b from per-image partials added in image order. No atomics in the sums; results do not
// depend on the number of threads.
#include <utility>

#include "unpool_deconv_cpu.h"

namespace aefast {
namespace unpool_deconv_cpu {
namespace {

// nb_of of one image (channel-major): for every entry, the offset of its neighbourhood nb(q) in
// the nb buffer (gpad, or the image's im2col), or -1 for an invalid index (the backward skips
// those: grad 0; the forward has already raised on them). The channel loop then reads nb at
// nb + nb_of[e] with no position -> offset lookup per entry and chunk (measured: -7%).
// The offset of position (h, w) is h * row_step + w * col_step; corner[p] / corner_off[p]: the
// position of pool window p's corner and its offset; woff[o]: the offset of window offset o from
// the corner; nofs[q]: the offset of position q (the clipped windows' path).
template <int VB, typename scalar_t, typename acc_t, typename index_t>
AEFAST_ALWAYS_INLINE void positions_of_body(const index_t* __restrict__ idx, const DecoderGeometry& g,
                                            const WindowTable& wtab, const int64_t* __restrict__ corner,
                                            const int64_t* __restrict__ corner_off, const int64_t* __restrict__ woff,
                                            int64_t row_step, int64_t col_step, const int64_t* __restrict__ nofs,
                                            int32_t* __restrict__ nb_of) {
  const int64_t plane = g.pooled_h * g.pooled_w;
  if (g.pooled_h * g.pool_h <= g.unpooled_h && g.pooled_w * g.pool_w <= g.unpooled_w && g.pool_h <= 4) {
    // No window is clipped: an index is valid iff its offset is below the window (window form)
    // or it names a position of its own window (flat form), so no table lookup or division is
    // needed per entry. Branch-free loops over a channel's plane (the row inside the window
    // counted by at most 4 comparisons, masked by pool_h), which the compiler vectorises
    // (measured: the scalar per-entry decode of flat indices cost ~5 cycles per entry, 13% of
    // this backward).
    const int64_t uw = g.unpooled_w, pool_h = g.pool_h, pool_w = g.pool_w, window = wtab.window;
    for (int64_t c = 0; c < g.c_in; ++c) {
      const index_t* __restrict__ ic = idx + c * plane;
      int32_t* __restrict__ oc = nb_of + c * plane;
      for (int64_t p = 0; p < plane; ++p) {
        if constexpr (std::is_same_v<index_t, int64_t>) {
          const int64_t rel = ic[p] - corner[p];
          int64_t i = 0;
          for (int64_t r = 1; r <= 4; ++r) i += (r <= pool_h) & (rel >= r * uw);
          const int64_t j = rel - i * uw;
          const bool ok = (rel >= 0) & (i < pool_h) & (j < pool_w);
          oc[p] = ok ? static_cast<int32_t>(corner_off[p] + i * row_step + j * col_step) : -1;
        } else {
          const int64_t o = static_cast<int64_t>(ic[p]);
          oc[p] = o < window ? static_cast<int32_t>(corner_off[p] + woff[o < window ? o : 0]) : -1;
        }
      }
    }
    return;
  }
  for (int64_t c = 0; c < g.c_in; ++c)
    for (int64_t ph = 0; ph < g.pooled_h; ++ph) {
      const int64_t kb = c * plane + ph * g.pooled_w, h0 = ph * g.pool_h;
      for (int64_t pw = 0; pw < g.pooled_w; ++pw) {
        const int64_t o = decode_offset(idx, kb + pw, h0, pw * g.pool_w, g, wtab);
        nb_of[kb + pw] = o < 0 ? -1 : static_cast<int32_t>(nofs[h0 * g.unpooled_w + pw * g.pool_w + wtab.pos[o]]);
      }
    }
}
AEFAST_ISA_CLONES_IDX(positions_of, void,
                      (const index_t* idx, const DecoderGeometry& g, const WindowTable& wtab, const int64_t* corner,
                       const int64_t* corner_off, const int64_t* woff, int64_t row_step, int64_t col_step,
                       const int64_t* nofs, int32_t* nb_of),
                      (idx, g, wtab, corner, corner_off, woff, row_step, col_step, nofs, nb_of))

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
  int64_t band;       // pooled positions per band of whole rows of pool windows (per-channel order)
};

// Per channel, for one chunk of NV vectors at slab offset k0 (nb offset nbo of each run):
// registers hold the weight chunk and the grad_Wt chunk; each entry loads its nb chunk once.
// dzv keeps the grad_z partial vector of every entry of the band across the chunks of a channel
// (FIRST: the channel's first chunk starts it). The dot runs on two accumulators (even and odd vectors), so
// an entry's chain is NV/2 FMAs long; the loop is specialised on what is needed (NZ: grad_z,
// NW: grad_W), with no test left in it.
template <int VB, int NV, bool NZ, bool NW, bool FIRST, typename scalar_t, typename acc_t>
AEFAST_ALWAYS_INLINE void chunk_entry(const typename VecOf<acc_t, VB>::type* wr, const acc_t* __restrict__ x,
                                      acc_t zp, acc_t* __restrict__ dz, typename VecOf<acc_t, VB>::type* ga) {
  using V = typename VecOf<acc_t, VB>::type;
  constexpr int L = VecOf<acc_t, VB>::L;
  V xv[NV];
  for (int j = 0; j < NV; ++j) xv[j] = vload<V>(x + j * L);
  if constexpr (NZ) {
    V d0 = FIRST ? V{} : vload<V>(dz), d1 = V{};
    for (int j = 0; j < NV; j += 2) {
      d0 += wr[j] * xv[j];
      if (j + 1 < NV) d1 += wr[j + 1] * xv[j + 1];
    }
    vstore(dz, d0 + d1);
  }
  if constexpr (NW) {
    const V zb = zp - V{};  // broadcast (x - 0 is x, -0 included)
    for (int j = 0; j < NV; ++j) ga[j] += zb * xv[j];
  }
}
template <int VB, int NV, bool NZ, bool NW, bool FIRST, typename scalar_t, typename acc_t>
AEFAST_ALWAYS_INLINE void channel_chunk(const acc_t* __restrict__ w, const acc_t* __restrict__ nb,
                                        const int32_t* __restrict__ offq, const scalar_t* __restrict__ zc,
                                        int64_t plane, acc_t* __restrict__ dzv, acc_t* __restrict__ gw) {
  using V = typename VecOf<acc_t, VB>::type;
  constexpr int L = VecOf<acc_t, VB>::L;
  V wr[NV], ga[NV];
  for (int j = 0; j < NV; ++j) {
    if constexpr (NZ) wr[j] = vload<V>(w + j * L);
    ga[j] = V{};
  }
  for (int64_t p = 0; p < plane; ++p) {
    const int32_t o = offq[p];
    if (o >= 0)
      chunk_entry<VB, NV, NZ, NW, FIRST, scalar_t, acc_t>(wr, nb + o, static_cast<acc_t>(zc[p]), dzv + p * L, ga);
  }
  if constexpr (NW)
    for (int j = 0; j < NV; ++j) vstore(gw + j * L, vload<V>(gw + j * L) + ga[j]);
}

// Sums of the lanes of L consecutive vectors v[0..L) (one per entry) into one vector, entry e's
// sum in lane e: log2(L) levels; level W pairs v[i] with v[i + n/2] (n vectors left) into one
// vector whose lanes with bit W clear hold v[i]'s partial sums and the others v[i + n/2]'s:
// blend(a, b) + swap(a, b), the blend free of shuffles. L - 1 pairs in all, one shuffle, one
// blend and one add each (measured: L separate lane sums, log2(L) extract + add steps each,
// cost ~10% of the channel loop).
template <int W, int L, typename V, int... I>
AEFAST_ALWAYS_INLINE V fold_pair(V a, V b, std::integer_sequence<int, I...>) {
  const V keep = __builtin_shufflevector(a, b, ((I & W) ? L + I : I)...);
  const V swap = __builtin_shufflevector(a, b, ((I & W) ? L + I - W : I + W)...);
  return keep + swap;
}
template <int W, int L, typename V>
AEFAST_ALWAYS_INLINE void fold_level(V* v, int n) {
  for (int i = 0; i < n / 2; ++i) v[i] = fold_pair<W, L>(v[i], v[i + n / 2], std::make_integer_sequence<int, L>{});
  if constexpr (W > 1) fold_level<W / 2, L>(v, n / 2);
}
template <int L, typename V>
AEFAST_ALWAYS_INLINE V lane_sums(V* v) {
  fold_level<L / 2, L>(v, L);
  return v[0];
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

// The next image's inputs (grad_out, act_in, z, idx: up to 4 byte ranges), fetched into the
// cache a slice per channel while this image's channel loop (FMA-bound) runs: gpre and the index
// decode of the next image then read them from L2 instead of waiting on memory (measured: both
// were memory-bound; the hardware prefetchers do not run that far ahead).
struct NextImage {
  const char* base[4] = {nullptr, nullptr, nullptr, nullptr};
  int64_t bytes[4] = {0, 0, 0, 0};
};
AEFAST_ALWAYS_INLINE void prefetch_slice(const NextImage& nx, int64_t part, int64_t parts) {
  constexpr int64_t line = 64;
  for (int i = 0; i < 4; ++i) {
    if (nx.base[i] == nullptr) continue;
    const int64_t b0 = nx.bytes[i] * part / parts / line * line, b1 = nx.bytes[i] * (part + 1) / parts;
    for (int64_t o = b0; o < b1; o += line) __builtin_prefetch(nx.base[i] + o, 0, 2);
  }
}

// Per-channel order over one image: every channel, every chunk of its slab; then grad_z from
// the partial vectors (L entries at a time by lane_sums; invalid entries get 0). nb: gpad
// (direct) or the image's im2col, nb_of the entries' offsets in it.
template <int VB, bool NZ, bool NW, typename scalar_t, typename acc_t>
AEFAST_ALWAYS_INLINE void channels_loop(const scalar_t* z, const acc_t* wt, const acc_t* nb, const int32_t* nb_of,
                                        const DecoderGeometry& g, const BackwardPlan& plan,
                                        acc_t* dzv, acc_t* gwt, scalar_t* gz, const NextImage& next) {
  using V = typename VecOf<acc_t, VB>::type;
  constexpr int L = VecOf<acc_t, VB>::L;
  const int64_t kp = plan.kp, plane = g.pooled_h * g.pooled_w, nvr = plan.run_len / L;
  const int64_t bands = (plane + plan.band - 1) / plan.band;
  for (int64_t p0 = 0; p0 < plane; p0 += plan.band) {
    const int64_t np = std::min(plan.band, plane - p0);
    for (int64_t c = 0; c < g.c_in; ++c) {
      prefetch_slice(next, p0 / plan.band * g.c_in + c, bands * g.c_in);
      const int32_t* offq = nb_of + c * plane + p0;
      const scalar_t* zc = z + c * plane + p0;
      for (int64_t r = 0; r < plan.runs; ++r)
        for (int64_t v0 = 0; v0 < nvr; v0 += plan.nvc) {
          const int64_t nv = std::min(plan.nvc, nvr - v0);
          const int64_t ko = r * plan.run_len + v0 * L;       // slab offset
          const int64_t nbo = r * plan.run_stride + v0 * L;  // offset within nb
          acc_t* gw = NW ? gwt + c * kp + ko : nullptr;
          const acc_t* w = wt + c * kp + ko;
          const bool first = ko == 0;
          switch (nv) {
#define AEFAST_CHAN_CASE_BODY(K)                                                                 \
  if (first)                                                                                     \
    channel_chunk<VB, K, NZ, NW, true, scalar_t, acc_t>(w, nb + nbo, offq, zc, np, dzv, gw);    \
  else                                                                                           \
    channel_chunk<VB, K, NZ, NW, false, scalar_t, acc_t>(w, nb + nbo, offq, zc, np, dzv, gw);
#define AEFAST_CHAN_CASE(K)  \
  case K:                    \
    AEFAST_CHAN_CASE_BODY(K) \
    break;
            AEFAST_CHAN_CASE(1) AEFAST_CHAN_CASE(2) AEFAST_CHAN_CASE(3) AEFAST_CHAN_CASE(4)
            AEFAST_CHAN_CASE(5) AEFAST_CHAN_CASE(6) AEFAST_CHAN_CASE(7) AEFAST_CHAN_CASE(8)
#define AEFAST_CHAN_CASE_WIDE(K) \
  case K:                        \
    if constexpr (VB == 64) {    \
      AEFAST_CHAN_CASE_BODY(K)   \
    }                            \
    break;
            AEFAST_CHAN_CASE_WIDE(9) AEFAST_CHAN_CASE_WIDE(10) AEFAST_CHAN_CASE_WIDE(11) AEFAST_CHAN_CASE_WIDE(12)
#undef AEFAST_CHAN_CASE_WIDE
#undef AEFAST_CHAN_CASE_BODY
#undef AEFAST_CHAN_CASE
            default: break;
          }
        }
      if constexpr (NZ) {
        scalar_t* gzc = gz + c * plane + p0;
        int64_t p = 0;
        for (; p + L <= np; p += L) {
          V v[L];
          for (int e = 0; e < L; ++e) v[e] = vload<V>(dzv + (p + e) * L);
          const V s = lane_sums<L>(v);
          // invalid entries (q < 0) get 0: a lane select on the sign of q
          using QV = typename VecOf<int32_t, L * 4>::type;
          using MV = typename VecOf<std::conditional_t<sizeof(acc_t) == 4, int32_t, int64_t>, VB>::type;
          const MV valid = __builtin_convertvector(vload<QV>(offq + p) >= 0, MV);
          const V r = valid ? s : V{};
          if constexpr (std::is_same_v<scalar_t, acc_t>)
            vstore(gzc + p, r);
          else
            for (int e = 0; e < L; ++e) gzc[p + e] = static_cast<scalar_t>(r[e]);
        }
        for (; p < np; ++p)
          gzc[p] = offq[p] >= 0 ? static_cast<scalar_t>(hsum<acc_t, VB>(vload<V>(dzv + p * L))) : scalar_t(0);
      }
    }
  }
}
template <int VB, typename scalar_t, typename acc_t>
AEFAST_ALWAYS_INLINE void channels_body(const scalar_t* z, const acc_t* wt, const acc_t* nb, const int32_t* nb_of,
                                        const DecoderGeometry& g, const BackwardPlan& plan,
                                        acc_t* dzv, acc_t* gwt, scalar_t* gz, bool need_z, bool need_w,
                                        const NextImage& next) {
  if (need_z && need_w)
    channels_loop<VB, true, true>(z, wt, nb, nb_of, g, plan, dzv, gwt, gz, next);
  else if (need_z)
    channels_loop<VB, true, false>(z, wt, nb, nb_of, g, plan, dzv, gwt, gz, next);
  else
    channels_loop<VB, false, true>(z, wt, nb, nb_of, g, plan, dzv, gwt, gz, next);
}
AEFAST_ISA_CLONES(channels,
                  (const scalar_t* z, const acc_t* wt, const acc_t* nb, const int32_t* nb_of,
                   const DecoderGeometry& g, const BackwardPlan& plan, acc_t* dzv, acc_t* gwt, scalar_t* gz,
                   bool need_z, bool need_w, const NextImage& next),
                  (z, wt, nb, nb_of, g, plan, dzv, gwt, gz, need_z, need_w, next))

// Transpose of an L x L tile held in L vectors (r[i] = row i), in place: log2(L) stages, each
// swapping the off-diagonal h x h blocks of every 2h x 2h block (h = L/2, ..., 1) with two
// two-source shuffles per pair of rows; L log2(L) shuffles in all (64 for 16 floats).
template <int H, int L, typename V, int... I>
AEFAST_ALWAYS_INLINE void swap_blocks(V& a, V& b, std::integer_sequence<int, I...>) {
  const V lo = __builtin_shufflevector(a, b, ((I & H) ? L + I - H : I)...);
  const V hi = __builtin_shufflevector(a, b, ((I & H) ? L + I : I + H)...);
  a = lo;
  b = hi;
}
template <int H, int L, typename V>
AEFAST_ALWAYS_INLINE void transpose_stage(V* r) {
  if constexpr (H >= 1) {
    for (int i = 0; i < L; ++i)
      if ((i & H) == 0) swap_blocks<H, L>(r[i], r[i + H], std::make_integer_sequence<int, L>{});
    transpose_stage<H / 2, L>(r);
  }
}
template <int L, typename V>
AEFAST_ALWAYS_INLINE void transpose_tile(V* r) {
  transpose_stage<L / 2, L>(r);
}

// gpre of one image into the zero-bordered channels-last buffer gpad, and its per-channel sums
// (grad_b partials).
//   * channels_last grad_out: a pixel's C_out values are contiguous, as in gpad: one pass.
//   * NCHW grad_out, by bands of output rows (the whole image when C_out * band fits ~32 KiB):
//     per channel, d = grad_out * act'(.) over the band's contiguous values into a planar buffer
//     buf[co][.] (the act a compile-time constant, so the loop vectorises; measured: the former
//     per-row loop of W_out values summed a 14-long tail serially and cost 2.5 cycles per value),
//     its sum in vector lanes (the band's tail lanes zero); then buf is transposed into gpad's
//     pixel-major rows by L x L register tiles (L channels x L pixels) when C_out is a whole
//     number of vectors (else by strided scalar stores). Stores past a row's last pixel are
//     skipped (they would land on the zero border).
template <int VB, DecoderAct A, typename scalar_t, typename acc_t>
AEFAST_ALWAYS_INLINE void gpre_act(const scalar_t* __restrict__ go, const scalar_t* __restrict__ ai,
                                   const DecoderGeometry& g, int64_t cols, acc_t sl, acc_t* __restrict__ gpad,
                                   acc_t* __restrict__ bias_part, acc_t* __restrict__ buf, int64_t band_rows,
                                   bool cl) {
  using V = typename VecOf<acc_t, VB>::type;
  constexpr int L = VecOf<acc_t, VB>::L;
  const int64_t hw = g.out_h * g.out_w, wo = g.out_w, co_n = g.c_out;
  if (cl) {
    // grad_b partials summed per channel in buf (C_out values), pixels in row-major order.
    std::fill(buf, buf + co_n, acc_t(0));
    for (int64_t oy = 0; oy < g.out_h; ++oy) {
      const scalar_t* __restrict__ gr = go + oy * wo * co_n;
      const scalar_t* __restrict__ ar = ai + oy * wo * co_n;
      acc_t* __restrict__ row = gpad + ((oy + g.pad_h) * cols + g.pad_w) * co_n;
      for (int64_t i = 0; i < wo * co_n; i += co_n)
        for (int64_t co = 0; co < co_n; ++co) {
          const acc_t d = static_cast<acc_t>(gr[i + co]) * act_derivative<acc_t>(static_cast<acc_t>(ar[i + co]), A, sl);
          row[i + co] = d;
          buf[co] += d;
        }
    }
    for (int64_t co = 0; co < co_n; ++co) bias_part[co] = buf[co];
    return;
  }
  // buf: [co][bp] band values (bp = band_rows * W_out rounded up to L), then C_out sum vectors.
  const int64_t bp = (band_rows * wo + L - 1) / L * L;
  acc_t* __restrict__ sums = buf + co_n * bp + L;
  for (int64_t co = 0; co < co_n; ++co) vstore(sums + co * L, V{});
  const bool tiles = co_n % L == 0;
  for (int64_t oy0 = 0; oy0 < g.out_h; oy0 += band_rows) {
    const int64_t rows = std::min(band_rows, g.out_h - oy0), len = rows * wo, lenv = (len + L - 1) / L * L;
    for (int64_t co = 0; co < co_n; ++co) {
      const scalar_t* __restrict__ gc = go + co * hw + oy0 * wo;
      const scalar_t* __restrict__ ac = ai + co * hw + oy0 * wo;
      acc_t* __restrict__ bc = buf + co * bp;
      for (int64_t i = 0; i < len; ++i)
        bc[i] = static_cast<acc_t>(gc[i]) * act_derivative<acc_t>(static_cast<acc_t>(ac[i]), A, sl);
      for (int64_t i = len; i < lenv; ++i) bc[i] = acc_t(0);
      V vs = vload<V>(sums + co * L);
      for (int64_t i = 0; i < lenv; i += L) vs += vload<V>(bc + i);
      vstore(sums + co * L, vs);
    }
    for (int64_t r = 0; r < rows; ++r) {
      acc_t* __restrict__ row = gpad + ((oy0 + r + g.pad_h) * cols + g.pad_w) * co_n;
      const acc_t* __restrict__ src = buf + r * wo;
      if (tiles) {
        for (int64_t x0 = 0; x0 < wo; x0 += L) {
          const int64_t nx = std::min<int64_t>(L, wo - x0);
          for (int64_t c0 = 0; c0 < co_n; c0 += L) {
            V t[L];
            for (int j = 0; j < L; ++j) t[j] = vload<V>(src + (c0 + j) * bp + x0);
            transpose_tile<L>(t);
            for (int64_t x = 0; x < nx; ++x) vstore(row + (x0 + x) * co_n + c0, t[x]);
          }
        }
      } else {
        for (int64_t co = 0; co < co_n; ++co)
          for (int64_t x = 0; x < wo; ++x) row[x * co_n + co] = src[co * bp + x];
      }
    }
  }
  for (int64_t co = 0; co < co_n; ++co) bias_part[co] = hsum<acc_t, VB>(vload<V>(sums + co * L));
}
template <int VB, typename scalar_t, typename acc_t>
AEFAST_ALWAYS_INLINE void gpre_body(const scalar_t* go, const scalar_t* ai, const DecoderGeometry& g, int64_t cols,
                                    DecoderAct act, acc_t sl, acc_t* gpad, acc_t* bias_part, acc_t* buf,
                                    int64_t band_rows, bool cl) {
#define AEFAST_GPRE_CASE(A) gpre_act<VB, A, scalar_t, acc_t>(go, ai, g, cols, sl, gpad, bias_part, buf, band_rows, cl)
  AEFAST_FOR_DECODER_ACT(act, AEFAST_GPRE_CASE)
#undef AEFAST_GPRE_CASE
}
AEFAST_ISA_CLONES(gpre,
                  (const scalar_t* go, const scalar_t* ai, const DecoderGeometry& g, int64_t cols, DecoderAct act,
                   acc_t sl, acc_t* gpad, acc_t* bias_part, acc_t* buf, int64_t band_rows, bool cl),
                  (go, ai, g, cols, act, sl, gpad, bias_part, buf, band_rows, cl))

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
void backward_typed(const BackwardCall& call) {
  const at::Tensor &grad_out = call.grad_out, &act_in = call.act_in, &z = call.z, &idx = call.idx;
  const DecoderGeometry& g = call.g;
  const DecoderAct act = call.act;
  const std::array<bool, 3> mask = call.mask;
  const bool cl_in = call.cl_in, cl_go = call.cl_go;
  using acc_t = at::opmath_type<scalar_t>;
  const Isa isa = decoder_isa();
  const int64_t L = vec_bytes(isa) / static_cast<int64_t>(sizeof(acc_t));
  const int64_t K = g.kernel_h * g.kernel_w * g.c_out, kp = (K + L - 1) / L * L;
  const AccExtent ext = acc_extent(g);
  const int64_t item = ext.rows * ext.cols * g.c_out, row_stride = ext.cols * g.c_out;
  const int64_t plane = g.pooled_h * g.pooled_w, plane_in = g.c_in * plane, plane_out = g.c_out * g.out_h * g.out_w;
  const int64_t P = g.unpooled_h * g.unpooled_w, run = g.kernel_w * g.c_out;
  BackwardPlan plan;
  plan.kp = kp;
  plan.per_position = kp / L <= 4;
  plan.direct = !plan.per_position && run % L == 0;
  plan.runs = plan.direct ? g.kernel_h : 1;
  plan.run_len = plan.direct ? run : kp;
  plan.run_stride = plan.direct ? row_stride : kp;
  // Chunks of at most 12 vectors with AVX-512 (weights and grad_Wt: 24 of the 32 registers;
  // measured on 128->64 @32x32: runs of 12 in one chunk instead of two of 6, -9%), 6 below.
  plan.nvc = plan.per_position ? 0 : chunk_vectors(plan.run_len / L, 1, vec_bytes(isa), isa == Isa::kAvx512 ? 12 : 6);
  // Bands of whole rows of pool windows whose neighbourhoods (the nb rows they read, in gpad or
  // the im2col) fit in L2 (rows_per_l2_band): one pass per channel over the whole image streamed
  // an image-sized nb from L3 or memory C_in times (measured, 2 threads, interleaved, Xeon host:
  // backward of N16 64->64 at 96x96 unpooled 79 -> 41-45 ms, N32 64->32 at 128x128 153 -> 82 ms;
  // 64->32 @14x14 N=256, one band, unchanged).
  {
    const int64_t row_step_bytes =
        (plan.direct ? g.stride_h * row_stride : g.unpooled_w * kp) * static_cast<int64_t>(sizeof(acc_t));
    plan.band = std::max<int64_t>(1, rows_per_l2_band(g.pool_h * row_step_bytes, g.pooled_h) * g.pooled_w);
  }
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
  const acc_t sl = static_cast<acc_t>(call.slope);
  const at::Tensor wt_t = reorder_weight<scalar_t, acc_t>(call.weight, g, kp);
  const acc_t* wt = wt_t.const_data_ptr<acc_t>();
  const WindowTable wtab(g);
  // The entries' nb offsets (positions_of): position (h, w) at h * row_step + w * col_step in gpad
  // (direct: noff) or in the image's im2col (q * kp); per pool window p its corner position and
  // that corner's offset, per window offset o its offset from the corner. int32 offsets: the
  // largest is below the buffer's size (the per-position path does not use them).
  const int64_t row_step = plan.direct ? g.stride_h * row_stride : g.unpooled_w * kp;
  const int64_t col_step = plan.direct ? g.stride_w * g.c_out : kp;
  const int64_t* nofs = plan.direct ? noff.data() : noff.data() + P;
  TORCH_CHECK(plan.per_position || (plan.direct ? item : P * kp) < std::numeric_limits<int32_t>::max(),
              "aefast::unpool_conv_transpose2d_backward: one image is too large for the CPU kernel");
  std::vector<int64_t> corner(static_cast<size_t>(plane)), corner_off(static_cast<size_t>(plane)), woff(wtab.window);
  for (int64_t ph = 0; ph < g.pooled_h; ++ph)
    for (int64_t pw = 0; pw < g.pooled_w; ++pw) {
      corner[ph * g.pooled_w + pw] = ph * g.pool_h * g.unpooled_w + pw * g.pool_w;
      corner_off[ph * g.pooled_w + pw] = ph * g.pool_h * row_step + pw * g.pool_w * col_step;
    }
  for (int64_t o = 0; o < wtab.window; ++o) woff[o] = wtab.di[o] * row_step + wtab.dj[o] * col_step;
  const at::TensorOptions acc_opts = z.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const WeightBiasPartials<acc_t> parts(g, kp, mask[1], acc_opts);
  scalar_t* gz = call.grad_z.mutable_data_ptr<scalar_t>();
  const bool need_img = mask[0] || mask[1];
  const auto band_grads_all = AEFAST_PICK_IDX(band_grads_all, isa);
  const auto positions_of = AEFAST_PICK_IDX(positions_of, isa);
  const auto gpre = AEFAST_PICK(gpre, isa);
  const auto channels = AEFAST_PICK(channels, isa);
  RECORD_USER_SCOPE("aefast path: unpool_conv_transpose2d_backward per entry");
  at::parallel_for(0, parts.chunks, 1, [&](int64_t k0, int64_t k1) {
    at::Tensor gpad_t = empty_cpu_cached({item + L}, acc_opts);
    // im2col: of the whole image (per-channel order without direct runs), or of one row band of
    // pool windows (small slabs); the slab tails stay zero.
    at::Tensor col_t = zeros_cpu_cached({!need_img ? 0 : plan.per_position ? g.pool_h * g.unpooled_w * kp
                                                 : plan.direct ? 0 : P * kp}, acc_opts);
    at::Tensor dzv_t = empty_cpu_cached({need_img && !plan.per_position ? plan.band * L : 0}, acc_opts);
    acc_t* gpad = gpad_t.mutable_data_ptr<acc_t>();
    acc_t* col = col_t.mutable_data_ptr<acc_t>();
    acc_t* dzv = dzv_t.mutable_data_ptr<acc_t>();
    // gpre's planar band buffer: C_out rows of band_rows * W_out values (rounded up to L), L of
    // slack (the last tile's reads past the band), C_out sum vectors.
    const int64_t band_rows = std::clamp<int64_t>(8192 / std::max<int64_t>(1, g.c_out * g.out_w), 1, g.out_h);
    const int64_t band_len = (band_rows * g.out_w + L - 1) / L * L;
    std::vector<acc_t> gbuf_v(static_cast<size_t>(g.c_out * band_len + L + g.c_out * L));
    std::vector<scalar_t> z_pl(cl_in ? 2 * plane_in : 0);
    std::vector<index_t> idx_pl(cl_in ? plane_in : 0);
    acc_t* gbuf = gbuf_v.data();
    PaddedVec<int32_t> nb_of;  // [ci*plane + p] -> offset of nb(q) in gpad / col, or -1 (invalid index)
    if (need_img && !plan.per_position) nb_of.resize(plane_in);
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
      if (mask[1]) std::fill(parts.gwt + kc * g.c_in * kp, parts.gwt + (kc + 1) * g.c_in * kp, acc_t(0));
      for (int64_t n = kc * parts.chunk; n < std::min(g.n, (kc + 1) * parts.chunk); ++n) {
        gpre(gp + n * plane_out, ap + n * plane_out, g, ext.cols, act, sl, gpad, parts.bias_part + n * g.c_out,
             gbuf, band_rows, cl_go);
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
        acc_t* part = mask[1] ? parts.gwt + kc * g.c_in * kp : nullptr;
        if (plan.per_position) {
          if (mask[0]) std::fill(gzn, gzn + plane_in, scalar_t(0));  // invalid entries keep 0
          band_grads_all(zn, in, wt, gpad, noff.data(), row_stride, g, wtab, kp, col, gzn, part, mask[0], mask[1]);
          if (cl_in && mask[0]) image_to_channels_last(gzn, g.c_in, plane, gz + n * plane_in);
          continue;
        }
        positions_of(in, g, wtab, corner.data(), corner_off.data(), woff.data(), row_step, col_step, nofs, nb_of.data());
        if (!plan.direct)  // the image's im2col: nb(q) at q * kp
          for (int64_t q = 0; q < P; ++q)
            for (int64_t r = 0; r < g.kernel_h; ++r)
              std::memcpy(col + q * kp + r * run, gpad + noff[q] + r * row_stride, sizeof(acc_t) * run);
        NextImage next;
        if (n + 1 < g.n) {
          const int64_t sb = sizeof(scalar_t), ib = sizeof(index_t);
          next.base[0] = reinterpret_cast<const char*>(gp + (n + 1) * plane_out);
          next.base[1] = reinterpret_cast<const char*>(ap + (n + 1) * plane_out);
          next.base[2] = reinterpret_cast<const char*>(zp + (n + 1) * plane_in);
          next.base[3] = reinterpret_cast<const char*>(ip + (n + 1) * plane_in);
          next.bytes[0] = next.bytes[1] = plane_out * sb;
          next.bytes[2] = plane_in * sb;
          next.bytes[3] = plane_in * ib;
        }
        channels(zn, wt, plan.direct ? gpad : col, nb_of.data(), g, plan, dzv, part, gzn, mask[0], mask[1], next);
        if (cl_in && mask[0]) image_to_channels_last(gzn, g.c_in, plane, gz + n * plane_in);
      }
    }
  });
  finish_weight_bias_grads<scalar_t, acc_t>(parts.gwt, parts.chunks, parts.bias_part, g, kp, mask, call.grad_w,
                                            call.grad_b);
}

}  // namespace

void backward_per_entry(const BackwardCall& call) {
  dispatch_decoder_types(call.z, call.idx, [&]<typename S, typename I>() { backward_typed<S, I>(call); });
}

}  // namespace unpool_deconv_cpu
}  // namespace aefast
