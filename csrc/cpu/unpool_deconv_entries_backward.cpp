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
//
// Determinism: every output element is owned by one thread and summed in a fixed order: the
// forward per image (entries of a position in ascending channel order, the taps of an output
// pixel in (kh, kw) order); grad_z per image (its slab dot in a fixed vector order); grad_W per
// fixed chunk of images (entries in channel / window order, chunks added in chunk order);
// grad_b from per-image partials added in image order. No atomics in the sums; results do not
// depend on the number of threads.
#include "unpool_deconv_cpu.h"

namespace aefast {
namespace unpool_deconv_cpu {
namespace {

// pos_of of one image (channel-major); returns the first invalid k or INT64_MAX.
template <typename index_t>
int64_t positions_of(const index_t* __restrict__ idx, const DecoderGeometry& g, const WindowTable& wtab,
                     int32_t* __restrict__ pos_of) {
  const int64_t plane = g.pooled_h * g.pooled_w;
  int64_t first_bad = std::numeric_limits<int64_t>::max();
  if (g.pooled_h * g.pool_h <= g.unpooled_h && g.pooled_w * g.pool_w <= g.unpooled_w) {
    // No window is clipped: an index is valid iff its offset is below the window (window form)
    // or it names a position of its own window (flat form, where it then IS the position), so
    // no table lookup or division is needed per entry.
    const int64_t uw = g.unpooled_w, pool_h = g.pool_h, pool_w = g.pool_w, window = wtab.window;
    const int64_t* __restrict__ pos = wtab.pos.data();
    for (int64_t c = 0; c < g.c_in; ++c)
      for (int64_t ph = 0; ph < g.pooled_h; ++ph) {
        const int64_t kb = c * plane + ph * g.pooled_w, row = ph * pool_h * uw;
        for (int64_t pw = 0; pw < g.pooled_w; ++pw) {
          const int64_t corner = row + pw * pool_w;
          int64_t q;
          bool ok;
          if constexpr (std::is_same_v<index_t, int64_t>) {
            q = idx[kb + pw];
            const int64_t rel = q - corner;
            int64_t i = 0;
            for (int64_t r = 1; r <= pool_h; ++r) i += rel >= r * uw;
            ok = rel >= 0 && i < pool_h && rel - i * uw < pool_w;
          } else {
            const int64_t o = static_cast<int64_t>(idx[kb + pw]);
            ok = o < window;
            q = corner + pos[ok ? o : 0];
          }
          pos_of[kb + pw] = ok ? static_cast<int32_t>(q) : -1;
          if (!ok) first_bad = std::min(first_bad, kb + pw);
        }
      }
    return first_bad;
  }
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
  const acc_t sl = static_cast<acc_t>(call.slope);
  const at::Tensor wt_t = reorder_weight<scalar_t, acc_t>(call.weight, g, kp);
  const acc_t* wt = wt_t.const_data_ptr<acc_t>();
  const WindowTable wtab(g);
  const int64_t chunk = backward_chunk_items(g.n), chunks = (g.n + chunk - 1) / chunk;
  // Buffers through the c10 allocator (not std::vector) so that memory profilers see them.
  const at::TensorOptions acc_opts = z.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  at::Tensor bias_part_t = empty_cpu_cached({g.n * g.c_out}, acc_opts);
  at::Tensor gwt_t = empty_cpu_cached({mask[1] ? chunks * g.c_in * kp : 0}, acc_opts);
  acc_t* bias_part = bias_part_t.mutable_data_ptr<acc_t>();
  acc_t* gwt = gwt_t.mutable_data_ptr<acc_t>();
  scalar_t* gz = call.grad_z.mutable_data_ptr<scalar_t>();
  const bool need_img = mask[0] || mask[1];
  const auto band_grads_all = AEFAST_PICK_IDX(band_grads_all, isa);
  const auto gpre = AEFAST_PICK(gpre, isa);
  const auto channels = AEFAST_PICK(channels, isa);
  RECORD_USER_SCOPE("aefast path: unpool_conv_transpose2d_backward per entry");
  at::parallel_for(0, chunks, 1, [&](int64_t k0, int64_t k1) {
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
    PaddedVec<int32_t> pos_of;  // [ci*plane + p] -> q, or -1 for an invalid index
    if (need_img && !plan.per_position) pos_of.resize(plane_in);
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
        positions_of(in, g, wtab, pos_of.data());
        if (!plan.direct)  // the image's im2col: nb(q) at q * kp
          for (int64_t q = 0; q < P; ++q)
            for (int64_t r = 0; r < g.kernel_h; ++r)
              std::memcpy(col + q * kp + r * run, gpad + noff[q] + r * row_stride, sizeof(acc_t) * run);
        channels(zn, wt, plan.direct ? gpad : col, plan.direct ? noff.data() : noff.data() + P,
                 pos_of.data(), g, plan, dzv, part, gzn, mask[0], mask[1]);
        if (cl_in && mask[0]) image_to_channels_last(gzn, g.c_in, plane, gz + n * plane_in);
      }
    }
  });
  finish_weight_bias_grads<scalar_t, acc_t>(gwt, chunks, bias_part, g, kp, mask, call.grad_w, call.grad_b);
}

}  // namespace

void backward_per_entry(const BackwardCall& call) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, call.z.scalar_type(), "unpool_conv_transpose2d_bwd_cpu", [&] {
    if (call.idx.scalar_type() == at::kLong)
      backward_typed<scalar_t, int64_t>(call);
    else
      backward_typed<scalar_t, uint8_t>(call);
  });
}

}  // namespace unpool_deconv_cpu
}  // namespace aefast
