#pragma once
// Per-element bodies of the CUDA backend's conv_bn_pool2d (conv -> BatchNorm with batch statistics
// -> activation -> max-pool; formulas in aefast/ops/conv_bn_pool.py), host-and-device so that
// csrc/cpu/emulate_cuda_bodies.cpp runs the very same code on the CPU in the tests. Free of torch
// headers. Each body is called once per element e of its index space by an executor (one GPU
// thread per element: aefast/cuda_exec.cuh; a CPU loop in the emulation).
//
// Layouts: y is the conv output as an (M, C) matrix, M = N*HC*WC conv positions in (n, h, w) order,
// each row C contiguous channels (channels-last, the vendor conv's output). The pooled map, the
// uint8 window offsets and the routed gradient g are NCHW (N, C, HO, WO). Index spaces that read y
// run channels fastest, so that neighbouring threads read neighbouring addresses.
//
// Determinism: the reductions are split into fixed chunks of rows, one thread per (chunk, channel)
// adds its chunk in row order (in double), and one thread per channel adds the chunks in order. No
// atomics, so the same bits every run, whatever the launch configuration.
#include <cmath>
#include <cstdint>

#include "aefast/common.h"
#include "aefast/conv_pool.h"

namespace aefast {

// The encoder block's geometry: y (N, HC, WC, C), windows (PKH, PKW) at (i*SPH, j*SPW), pooled
// (HO, WO) (clipped at the conv output's edge in ceil_mode; overlapping when SP < PK).
struct BnPoolShape {
  int64_t N, C, HC, WC, HO, WO, PKH, PKW, SPH, SPW;
  AEFAST_HD int64_t count() const { return N * HC * WC; }
  AEFAST_HD int64_t pooled_positions() const { return N * HO * WO; }
};

// Per-channel constants, acc_t, rows of a (kBnParamRows, C) table: written by the combine bodies,
// read by the elementwise ones.
enum BnParam : int { kBnMean = 0, kBnInvstd, kBnGamma, kBnBeta, kBnK, kBnC0, kBnC1, kBnParamRows };

// ---- forward pass 1: shifted moments of chunk s of the rows, e = s*C + c:
//   partial[s][0][c] = sum (y - k_c),  partial[s][1][c] = sum (y - k_c)^2   (double)
// with k_c = y[0, c] (a typical value: the one-pass variance E[(y-k)^2] - E[y-k]^2 then keeps its
// digits, as the CPU op's row_moments).
template <typename scalar_t, typename acc_t>
struct BnMomentsBody {
  const scalar_t* y;
  double* partial;  // (S, 2, C)
  int64_t M, C, chunk;
  AEFAST_HD void operator()(int64_t e) const {
    const int64_t s = e / C, c = e % C;
    const double k = static_cast<double>(static_cast<acc_t>(y[c]));
    const int64_t r1 = (s + 1) * chunk < M ? (s + 1) * chunk : M;
    double s1 = 0.0, s2 = 0.0;
    for (int64_t r = s * chunk; r < r1; ++r) {
      const double d = static_cast<double>(static_cast<acc_t>(y[r * C + c])) - k;
      s1 += d;
      s2 += d * d;
    }
    partial[(2 * s) * C + c] = s1;
    partial[(2 * s + 1) * C + c] = s2;
  }
};

// ---- forward combine, e = c: the S chunks added in order (double); mean = k + s1/M and the
// biased var = s2/M - (s1/M)^2 (clamped at 0), stored in acc_t.
template <typename scalar_t, typename acc_t>
struct BnStatsCombineBody {
  const scalar_t* y;
  const double* partial;
  acc_t* mean;
  acc_t* var;
  int64_t M, C, S;
  AEFAST_HD void operator()(int64_t c) const {
    double s1 = 0.0, s2 = 0.0;
    for (int64_t s = 0; s < S; ++s) {
      s1 += partial[(2 * s) * C + c];
      s2 += partial[(2 * s + 1) * C + c];
    }
    const double d = s1 / static_cast<double>(M);
    const double v = s2 / static_cast<double>(M) - d * d;
    mean[c] = static_cast<acc_t>(static_cast<double>(static_cast<acc_t>(y[c])) + d);
    var[c] = static_cast<acc_t>(v > 0.0 ? v : 0.0);
  }
};

// ---- the channel constants of the epilogue and the backward, e = c, from the statistics (the
// forward's, or the saved ones in the backward): mean, invstd = 1/sqrt(var + eps) (IEEE-rounded
// sqrt and division), gamma (1 when absent), beta (0 when absent).
template <typename acc_t>
struct BnParamsBody {
  const acc_t* mean;
  const acc_t* var;
  const acc_t* gamma;  // nullptr: 1
  const acc_t* beta;   // nullptr: 0
  acc_t* params;       // (kBnParamRows, C)
  int64_t C;
  acc_t eps;
  AEFAST_HD void operator()(int64_t c) const {
    using std::sqrt;
    params[kBnMean * C + c] = mean[c];
    params[kBnInvstd * C + c] = acc_t(1) / sqrt(var[c] + eps);
    params[kBnGamma * C + c] = gamma ? gamma[c] : acc_t(1);
    params[kBnBeta * C + c] = beta ? beta[c] : acc_t(0);
  }
};

// BatchNorm's z in the reference twin's order: ((y - mean) * invstd) * gamma + beta.
template <typename acc_t>
AEFAST_HD acc_t bn_normalize(acc_t y, const acc_t* params, int64_t C, int64_t c) {
  return ((y - params[kBnMean * C + c]) * params[kBnInvstd * C + c]) * params[kBnGamma * C + c] +
         params[kBnBeta * C + c];
}

// ---- forward pass 2, e = ((n*HO + i)*WO + j)*C + c: over the window's in-bounds offsets in
// row-major order, a = act(z) rounded to scalar_t (as the twin rounds the activation before the
// pool), torch's rule (pool_takes: the first maximum wins, a NaN wins); the maximum and its offset
// ki*PKW + kj inside the full window, NCHW.
template <typename scalar_t, typename acc_t>
struct BnActPoolBody {
  const scalar_t* y;
  const acc_t* params;
  scalar_t* pooled;
  uint8_t* window;
  BnPoolShape s;
  int act;
  acc_t slope;
  AEFAST_HD void operator()(int64_t e) const {
    const int64_t c = e % s.C, t = e / s.C, j = t % s.WO, i = (t / s.WO) % s.HO, n = t / (s.WO * s.HO);
    const int64_t r0 = i * s.SPH, q0 = j * s.SPW;
    acc_t best = acc_t(0);
    int k_best = 0;
    for (int64_t ki = 0; ki < s.PKH && r0 + ki < s.HC; ++ki)
      for (int64_t kj = 0; kj < s.PKW && q0 + kj < s.WC; ++kj) {
        const acc_t v = static_cast<acc_t>(y[((n * s.HC + r0 + ki) * s.WC + q0 + kj) * s.C + c]);
        const acc_t a = static_cast<acc_t>(
            static_cast<scalar_t>(activate<acc_t>(bn_normalize<acc_t>(v, params, s.C, c), act, slope)));
        const int k = static_cast<int>(ki * s.PKW + kj);
        if (k == 0 || pool_takes(a, best)) {
          best = a;
          k_best = k;
        }
      }
    const int64_t dst = ((n * s.C + c) * s.HO + i) * s.WO + j;
    pooled[dst] = static_cast<scalar_t>(best);
    window[dst] = static_cast<uint8_t>(k_best);
  }
};

// ---- backward pass 1, e = s*C + c, over chunk s of the pooled positions p = (n, i, j): at each
// window's argmax g = grad * act'(z) (z recomputed from y as the forward did), kept in g (NCHW,
// acc_t) for pass 2, and the chunk's sums of g and g*yhat, yhat = (y - mean)*invstd, in double.
template <typename scalar_t, typename acc_t>
struct BnRoutedSumsBody {
  const scalar_t* grad;  // (N, C, HO, WO)
  const uint8_t* window;
  const scalar_t* y;
  const acc_t* params;
  acc_t* g;
  double* partial;  // (S, 2, C)
  BnPoolShape s;
  int64_t chunk;
  int act;
  acc_t slope;
  AEFAST_HD void operator()(int64_t e) const {
    const int64_t part = e / s.C, c = e % s.C, P = s.pooled_positions();
    const int64_t p1 = (part + 1) * chunk < P ? (part + 1) * chunk : P;
    const acc_t mean = params[kBnMean * s.C + c], invstd = params[kBnInvstd * s.C + c];
    double sg = 0.0, sgy = 0.0;
    for (int64_t p = part * chunk; p < p1; ++p) {
      const int64_t j = p % s.WO, i = (p / s.WO) % s.HO, n = p / (s.WO * s.HO);
      const int64_t q = ((n * s.C + c) * s.HO + i) * s.WO + j;
      const int o = window[q];
      const int64_t r = i * s.SPH + o / s.PKW, col = j * s.SPW + o % s.PKW;
      const acc_t v = static_cast<acc_t>(y[((n * s.HC + r) * s.WC + col) * s.C + c]);
      const acc_t gv =
          static_cast<acc_t>(grad[q]) * activation_grad<acc_t>(bn_normalize<acc_t>(v, params, s.C, c), act, slope);
      g[q] = gv;
      sg += static_cast<double>(gv);
      sgy += static_cast<double>(gv * ((v - mean) * invstd));
    }
    partial[(2 * part) * s.C + c] = sg;
    partial[(2 * part + 1) * s.C + c] = sgy;
  }
};

// ---- backward combine, e = c: grad_beta = sum g and grad_gamma = sum g*yhat (chunks in order,
// double) into sums (2, C), and the dense gradient's constants
//   k = gamma*invstd,  c1 = -k*invstd*grad_gamma/M,  c0 = -k*grad_beta/M.
template <typename acc_t>
struct BnSumsCombineBody {
  const double* partial;
  double* sums;
  acc_t* params;
  int64_t M, C, S;
  AEFAST_HD void operator()(int64_t c) const {
    double sg = 0.0, sgy = 0.0;
    for (int64_t s = 0; s < S; ++s) {
      sg += partial[(2 * s) * C + c];
      sgy += partial[(2 * s + 1) * C + c];
    }
    sums[c] = sg;
    sums[C + c] = sgy;
    const acc_t invstd = params[kBnInvstd * C + c];
    const acc_t k = params[kBnGamma * C + c] * invstd;
    params[kBnK * C + c] = k;
    params[kBnC1 * C + c] = -k * invstd * static_cast<acc_t>(sgy / static_cast<double>(M));
    params[kBnC0 * C + c] = -k * static_cast<acc_t>(sg / static_cast<double>(M));
  }
};

// ---- backward pass 2, e = row*C + c over y: the dense dL/dy, gathered (no scatter, no atomics):
//   dy = c0 + c1*(y - mean) + k * (g of each window (i, j) that contains (r, q) and whose argmax it is)
// the windows in row-major order, i in [ceil((r - PKH + 1)/SPH), r/SPH] within [0, HO), likewise j;
// in acc_t, rounded once to scalar_t, channels-last as y.
template <typename scalar_t, typename acc_t>
struct BnDenseGradBody {
  const scalar_t* y;
  const acc_t* g;
  const uint8_t* window;
  const acc_t* params;
  scalar_t* dy;
  BnPoolShape s;
  AEFAST_HD void operator()(int64_t e) const {
    const int64_t c = e % s.C, row = e / s.C, q = row % s.WC, r = (row / s.WC) % s.HC, n = row / (s.WC * s.HC);
    const acc_t k = params[kBnK * s.C + c];
    acc_t acc = params[kBnC0 * s.C + c] +
                params[kBnC1 * s.C + c] * (static_cast<acc_t>(y[e]) - params[kBnMean * s.C + c]);
    const int64_t i_lo = r >= s.PKH ? (r - s.PKH + s.SPH) / s.SPH : 0;
    const int64_t i_hi = r / s.SPH < s.HO - 1 ? r / s.SPH : s.HO - 1;
    const int64_t j_lo = q >= s.PKW ? (q - s.PKW + s.SPW) / s.SPW : 0;
    const int64_t j_hi = q / s.SPW < s.WO - 1 ? q / s.SPW : s.WO - 1;
    const int64_t plane = (n * s.C + c) * s.HO;
    for (int64_t i = i_lo; i <= i_hi; ++i)
      for (int64_t j = j_lo; j <= j_hi; ++j) {
        const int64_t src = (plane + i) * s.WO + j;
        if (window[src] == (r - i * s.SPH) * s.PKW + (q - j * s.SPW)) acc += k * g[src];
      }
    dy[e] = static_cast<scalar_t>(acc);
  }
};

}  // namespace aefast
