// The window-vector kernels of the fused decoder block (unpool_deconv.cpp has the math, the
// notation is in unpool_deconv_cpu.h; unpool_deconv.cpp's use_window_vectors says when they run).
// The forward and backward of small slabs (K = KH*KW*C_out taps in at most 4 vectors, e.g.
// C_out = 1 or 3) with pool windows of at most 4 elements (2x2, 1x2, 1x1).
//
// Where the time went in the per-entry kernels (unpool_deconv_entries_forward.cpp: band_sums + epilogue,
// band_grads), measured on the 2-core EPYC by switching single steps off in one process (1 thread, fp32, window
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
//
// Determinism: the sums run in a fixed order (see above: channels ascending, then the taps into
// Acc in (row of windows, offset, tap) order; grad_W lanes summed in lane order per fixed batch
// chunk, chunks and per-image bias partials added in order). No atomics; results do not depend
// on the number of threads.
#include "unpool_deconv_cpu.h"

namespace aefast {
namespace unpool_deconv_cpu {
namespace {

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

template <typename scalar_t, typename index_t>
void forward_typed(const ForwardCall& call) {
  using acc_t = at::opmath_type<scalar_t>;
  const DecoderGeometry& g = call.g;
  const bool cl = call.cl;
  const DecoderAct act = call.act;
  const ForwardOperands<scalar_t> ops(call.z, call.weight, call.bias, g);
  const Isa isa = ops.isa;
  const int64_t L = ops.L, kp = ops.kp;
  const at::TensorOptions acc_opts = ops.acc_opts;
  const acc_t* wt = ops.wt_t.template const_data_ptr<acc_t>();
  const acc_t* b = ops.b_t.template const_data_ptr<acc_t>();
  const WindowTable wtab(g);
  const scalar_t* zp = call.z.const_data_ptr<scalar_t>();
  const index_t* ip = call.idx.const_data_ptr<index_t>();
  scalar_t* op = call.out.mutable_data_ptr<scalar_t>();
  scalar_t* pp = call.pre.numel() ? call.pre.mutable_data_ptr<scalar_t>() : nullptr;
  const int64_t plane_in = g.c_in * g.pooled_h * g.pooled_w, plane_out = g.c_out * g.out_h * g.out_w;
  const int64_t plane = g.pooled_h * g.pooled_w, hw_out = g.out_h * g.out_w;
  const acc_t sl = static_cast<acc_t>(call.slope);
  std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};
  // The path taken, named in the profiler (bench/bench_kernel_ledger.py reads it).
  RECORD_USER_SCOPE("aefast path: unpool_conv_transpose2d window vectors");
  const WvGeom wg = wv_geom(g, L, sizeof(acc_t));
  const auto wv_forward = AEFAST_PICK_IDX(wv_forward, isa);
  at::parallel_for(0, g.n, 1, [&](int64_t n0, int64_t n1) {
    // The packed rows of windows (z, offsets), the offset x tap tiles A, the accumulator Acc.
    const int64_t wpk = wg.RB * g.c_in * wg.LW, wa = wtab.window * wg.K * wg.LW;
    const int64_t wcv = 2 * (wg.RB * g.pooled_w + L);
    at::Tensor wv_t = empty_cpu_cached({2 * wpk + wa + g.c_out * wg.R * wg.C + wcv}, acc_opts);
    acc_t* Zb = wv_t.mutable_data_ptr<acc_t>();
    acc_t* Ob = Zb + wpk;
    acc_t* Ab = Ob + wpk;
    acc_t* Acc = Ab + wa;
    acc_t* cv = Acc + g.c_out * wg.R * wg.C;
    // channels_last: the image's z and idx in planar order (image_to_planar); the planar output
    // (and pre-activation) images are transposed out afterwards.
    std::vector<scalar_t> z_pl(cl ? plane_in : 0), out_pl(cl ? (pp ? 2 : 1) * plane_out : 0);
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
      scalar_t* ow = cl ? out_pl.data() : o;
      scalar_t* pw = p && cl ? out_pl.data() + plane_out : p;
      bad = wv_forward(zn, in, wt, b, g, wtab, wg, kp, cv, act, sl, Zb, Ob, Ab, Acc, ow, pw);
      if (cl) {
        image_to_channels_last(ow, g.c_out, hw_out, o);
        if (p) image_to_channels_last(pw, g.c_out, hw_out, p);
      }
      if (bad != std::numeric_limits<int64_t>::max()) atomic_min(first_bad, n * plane_in + bad);
    }
  });
  check_no_bad_index(first_bad.load());
}

template <typename scalar_t, typename index_t>
void backward_typed(const BackwardCall& call) {
  using acc_t = at::opmath_type<scalar_t>;
  const DecoderGeometry& g = call.g;
  const DecoderAct act = call.act;
  const std::array<bool, 3> mask = call.mask;
  const bool cl_in = call.cl_in, cl_go = call.cl_go;
  const Isa isa = decoder_isa();
  const int64_t L = vec_bytes(isa) / static_cast<int64_t>(sizeof(acc_t));
  const int64_t K = g.kernel_h * g.kernel_w * g.c_out, kp = (K + L - 1) / L * L;
  const int64_t plane = g.pooled_h * g.pooled_w, plane_in = g.c_in * plane, plane_out = g.c_out * g.out_h * g.out_w;
  const int64_t hw_out = g.out_h * g.out_w;
  const scalar_t* gp = call.grad_out.const_data_ptr<scalar_t>();
  const scalar_t* ap = call.act_in.const_data_ptr<scalar_t>();
  const scalar_t* zp = call.z.const_data_ptr<scalar_t>();
  const index_t* ip = call.idx.const_data_ptr<index_t>();
  const acc_t sl = static_cast<acc_t>(call.slope);
  const at::Tensor wt_t = reorder_weight<scalar_t, acc_t>(call.weight, g, kp);
  const acc_t* wt = wt_t.const_data_ptr<acc_t>();
  const WindowTable wtab(g);
  const at::TensorOptions acc_opts = call.z.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  const WeightBiasPartials<acc_t> parts(g, kp, mask[1], acc_opts);
  scalar_t* gz = call.grad_z.mutable_data_ptr<scalar_t>();
  const bool need_img = mask[0] || mask[1];
  RECORD_USER_SCOPE("aefast path: unpool_conv_transpose2d_backward window vectors");
  const WvGeom wg = wv_geom(g, L, sizeof(acc_t));
  const auto wv_gpre = AEFAST_PICK(wv_gpre, isa);
  const auto wv_backward = AEFAST_PICK_IDX(wv_backward, isa);
  at::parallel_for(0, parts.chunks, 1, [&](int64_t k0, int64_t k1) {
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
      for (int64_t n = kc * parts.chunk; n < std::min(g.n, (kc + 1) * parts.chunk); ++n) {
        const scalar_t* gon = gp + n * plane_out;
        const scalar_t* aon = ap + n * plane_out;
        if (cl_go) {
          image_to_planar(gon, g.c_out, hw_out, go_pl.data());
          image_to_planar(aon, g.c_out, hw_out, go_pl.data() + plane_out);
          gon = go_pl.data();
          aon = go_pl.data() + plane_out;
        }
        wv_gpre(gon, aon, g, wg, act, sl, gplan, parts.bias_part + n * g.c_out);
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
        acc_t* part = parts.gwt + kc * g.c_in * kp;
        std::fill(part, part + g.c_in * kp, acc_t(0));
        for (int64_t c = 0; c < g.c_in; ++c)
          for (int64_t k = 0; k < wg.K; ++k) {
            acc_t sum = 0;
            for (int64_t l = 0; l < L; ++l) sum += GWv[(c * wg.K + k) * L + l];
            part[c * kp + k] = sum;
          }
      }
    }
  });
  finish_weight_bias_grads<scalar_t, acc_t>(parts.gwt, parts.chunks, parts.bias_part, g, kp, mask, call.grad_w,
                                            call.grad_b);
}

}  // namespace

void forward_window_vectors(const ForwardCall& call) {
  dispatch_decoder_types(call.z, call.idx, [&]<typename S, typename I>() { forward_typed<S, I>(call); });
}

void backward_window_vectors(const BackwardCall& call) {
  dispatch_decoder_types(call.z, call.idx, [&]<typename S, typename I>() { backward_typed<S, I>(call); });
}

}  // namespace unpool_deconv_cpu
}  // namespace aefast
