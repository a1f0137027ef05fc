#pragma once
// Elementwise math of the recon_loss family, shared by the CPU and CUDA kernels (T is the
// accumulation type: float for fp16/bf16/fp32, double for fp64). Free of torch headers.
//
// Each kind gives, for one element with input x and target t, the loss l(x, t) and both
// partial derivatives dl/dx and dl/dt, so ONE pass produces the loss and the gradients
// (Liger-Kernel's trick); the backward is then a scale by grad_output.
//
//   mse        l = (x-t)^2                       dl/dx = 2(x-t)             dl/dt = -dl/dx
//   l1         l = |x-t|                         dl/dx = sign(x-t) (0 at 0 and at NaN, as torch)
//   huber      l = |d|<delta ? d^2/2 : delta(|d|-delta/2),   d = x-t
//              dl/dx = clamp(d, -delta, delta)  (NaN passes through, as torch)
//   bce        l = -(t max(log x, -100) + (1-t) max(log(1-x), -100))        (torch's clamp)
//              dl/dx = (x-t) / max(x(1-x), 1e-12)   (torch's backward formula, also at 0 and 1)
//              dl/dt = log(1-x) - log x  (= -logit(x), UNclamped, as torch's target backward: ±inf at 0 and 1)
//   bce_logits l = (1-t)x - lw log σ(x),  lw = 1 + (pw-1)t,  log σ(x) = min(x,0) - log1p(e^-|x|)
//              (stable for |x| = 100: no exp of a positive number is ever taken)
//              dl/dx = (pw t + 1 - t) σ(x) - pw t   (= σ(x) - t without pos_weight)
//              dl/dt = -x - (pw-1) log σ(x)         (= -x without pos_weight)
//   kl         x = mu, t = logvar: l = -(1 + t - x^2 - e^t)/2,  dl/dx = x,  dl/dt = (e^t - 1)/2
// A per-element weight w multiplies l, dl/dx and dl/dt.
#include <cmath>

#include "aefast/common.h"

namespace aefast {

enum LossKind : int { kMse = 0, kL1 = 1, kHuber = 2, kBce = 3, kBceLogits = 4, kKl = 5 };

// Kinds whose target gradient is not simply -dl/dx (they need their own saved buffer).
constexpr bool loss_kind_has_own_target_grad(int kind) { return kind == kBce || kind == kBceLogits || kind == kKl; }

template <int KIND, typename T>
AEFAST_HD void loss_elem(T x, T t, T pw, T delta, T& l, T& dx, T& dt) {
  using std::abs;
  using std::exp;
  using std::log;
  using std::log1p;
  using std::max;
  using std::min;
  if constexpr (KIND == kMse) {
    const T d = x - t;
    l = d * d;
    dx = T(2) * d;
    dt = -dx;
  } else if constexpr (KIND == kL1) {
    const T d = x - t;
    l = abs(d);
    dx = static_cast<T>((d > T(0)) - (d < T(0)));
    dt = -dx;
  } else if constexpr (KIND == kHuber) {
    const T d = x - t;
    const T a = abs(d);
    l = a < delta ? T(0.5) * d * d : delta * (a - T(0.5) * delta);
    dx = d < -delta ? -delta : (d > delta ? delta : d);
    dt = -dx;
  } else if constexpr (KIND == kBce) {
    // std::max(NaN, -100) would return -100 for a NaN first argument in some orders; write
    // the clamp so that NaN propagates as in torch (comparison false -> keep the value).
    T log_x = log(x), log_1mx = log1p(-x);
    log_x = log_x < T(-100) ? T(-100) : log_x;
    log_1mx = log_1mx < T(-100) ? T(-100) : log_1mx;
    l = (t - T(1)) * log_1mx - t * log_x;
    T denom = (T(1) - x) * x;
    denom = denom < T(1e-12) ? T(1e-12) : denom;
    dx = (x - t) / denom;
    dt = log1p(-x) - log(x);
  } else if constexpr (KIND == kBceLogits) {
    const T e = exp(-abs(x));
    const T log_sig = min(x, T(0)) - log1p(e);
    const T sig = x >= T(0) ? T(1) / (T(1) + e) : e / (T(1) + e);
    const T lw = T(1) + (pw - T(1)) * t;
    l = (T(1) - t) * x - lw * log_sig;
    dx = (pw * t + T(1) - t) * sig - pw * t;
    dt = -x - (pw - T(1)) * log_sig;
  } else {  // kKl
    const T e = exp(t);
    l = T(-0.5) * (T(1) + t - x * x - e);
    dx = x;
    dt = T(0.5) * (e - T(1));
  }
}

}  // namespace aefast
