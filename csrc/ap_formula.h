// The AP of one query row from its soft histograms, and its gradient: the O(Q) formula that every
// loss variant applies after the O(M) binning, written once for the CPU op and the CUDA kernel
// (csrc/cpu/ap_formula.cpp, csrc/cuda/ap_formula.cu). T is a scalar (one row: CUDA, and float64
// on the CPU) or a vector of lanes holding one row each (float32 on the CPU, cpu/float_lanes.h),
// which is why a condition on a value is a lane_select (lane_math.h). No torch.
//
// Row inputs: n[k] (soft count of the counted candidates in bin k, bin 0 the top of the ranking),
// p[k] (of the positives), `positives` (the exact count). With N_k = n[0] + ... + n[k] and
// P_k = p[0] + ... + p[k] (N_{-1} = P_{-1} = 0):
//   quantized (AP_Q):          sum_k (P_k / N_k) p[k] / P_{Q-1}
//   tie-aware simplified:      sum_k p[k] (P_{k-1} + P_k + 1) / (N_{k-1} + N_k + 1) / positives
//   tie-aware (AP_T, exact):   sum_k p[k] (n[k] r_k + (P_{k-1} + 1 - r_k (N_{k-1} + 1))
//                                  log((N_k + 1) / (N_{k-1} + 1))) / (n[k] + eps) / positives,
//                              r_k = relu(p[k] - 1) / (relu(n[k] - 1) + eps), eps = 1e-8,
// and 0 for a row without positives (which then gets no gradient). A denominator N_k or P_{Q-1}
// that is 0 is taken as 1 (its bins hold nothing, so the term is 0 and stays differentiable).
// These are the formulas of fastap.reference.ap_from_histograms, whose autograd gradient the
// backward below reproduces (relu: no gradient at 0); tests/test_ap_formula.py compares both.
// (Histograms that contradict their count, P_{Q-1} = 0 with positives > 0, which the histogram
// op never returns, get 0 here where the reference divides by 0.)
#pragma once

#include <cstdint>

#include "binning.h"  // FASTAP_HOST_DEVICE
#include "lane_math.h"

namespace fastap {

enum class ApVariant : int32_t { kQuantized = 0, kTieAware = 1, kTieAwareSimplified = 2 };

constexpr double kTieAwareEps = 1e-8;  // as in the authors' code

template <typename T>
FASTAP_HOST_DEVICE T positive_or_one(T x) {
  return lane_select(x > T(0), x, T(1));
}

// The AP formula's divisor: P_{Q-1} for AP_Q, the exact count of positives for the tie-aware
// variants (as 1 where it is 0). `positives`: the count, in T.
template <typename T>
FASTAP_HOST_DEVICE T ap_denominator(ApVariant variant, T last_cum_p, T positives) {
  return positive_or_one(variant == ApVariant::kQuantized ? last_cum_p : positives);
}

// Bin k's term of the sum, from p[k], n[k], P_{k-1}, P_k, N_{k-1} and N_k, and its partial
// derivatives by each of them (the backward needs them; the forward only the value, and the
// compiler drops the rest there).
template <typename T>
struct BinTerm {
  T value, d_p, d_n, d_prev_p, d_cum_p, d_prev_n, d_cum_n;

  FASTAP_HOST_DEVICE BinTerm(ApVariant variant, T p, T n, T prev_p, T cum_p, T prev_n, T cum_n) {
    d_n = d_prev_p = d_prev_n = T(0);
    if (variant == ApVariant::kQuantized) {  // (P_k / N_k) p[k]
      const T safe_n = positive_or_one(cum_n);
      value = cum_p / safe_n * p;
      d_p = cum_p / safe_n;
      d_cum_p = p / safe_n;
      d_cum_n = lane_select(cum_n > T(0), -cum_p * p / (safe_n * safe_n), T(0));
      return;
    }
    if (variant == ApVariant::kTieAwareSimplified) {
      const T a = prev_p + cum_p + T(1);
      const T b = prev_n + cum_n + T(1);
      value = p * a / b;
      d_p = a / b;
      d_prev_p = d_cum_p = p / b;
      d_prev_n = d_cum_n = -p * a / (b * b);
      return;
    }
    const T eps = static_cast<T>(kTieAwareEps);
    const T above = lane_select(p - T(1) > T(0), p - T(1), T(0));
    const T below = lane_select(n - T(1) > T(0), n - T(1), T(0)) + eps;
    const T ratio = above / below;
    const T within = n * ratio;  // the bin's own ties
    const T start = prev_p + T(1) - ratio * (prev_n + T(1));
    // log((N_k + 1) / (N_{k-1} + 1)) as log1p(gain), gain = n[k] / (N_{k-1} + 1): down a long
    // ranking the ratio is close to 1, and the logarithm of its rounded value kept only a few
    // digits (float32, a row of 1e6 candidates over 100 bins: the AP to 2e-6 and dAP/dn to 1e-4
    // of its largest entry, against 3e-7 and 3e-6 this way). N_k is then read only through
    // N_{k-1} + n[k], so cum_n has no derivative of its own here.
    const T base = prev_n + T(1);
    const T gain = n / base;
    const T log_growth = lane_log1p(gain);
    const T spread = start * log_growth;
    const T u = within + spread;
    const T norm = n + eps;
    value = p * u / norm;
    // Backward through the same expressions.
    const T d_u = p / norm;
    d_p = u / norm;
    d_n = -p * u / (norm * norm) + d_u * ratio;
    T d_ratio = d_u * n;
    const T d_start = d_u * log_growth;
    const T d_gain = d_u * start / (T(1) + gain);
    d_prev_p = d_start;
    d_ratio -= d_start * base;
    d_n += d_gain / base;
    d_cum_n = T(0);
    d_prev_n = -d_start * ratio - d_gain * gain / base;
    d_cum_p = T(0);
    d_p = lane_select(p - T(1) > T(0), d_p + d_ratio / below, d_p);
    d_n = lane_select(n - T(1) > T(0), d_n - d_ratio * above / (below * below), d_n);
  }
};

// AP of one row (n and p: q bins each; `positives`: the exact count, in T). Accumulates in T.
template <typename T>
FASTAP_HOST_DEVICE T ap_row(const T* n, const T* p, int64_t q, T positives, ApVariant variant) {
  if (!any_lane(positives > T(0))) return T(0);
  T cum_n = T(0), cum_p = T(0), total = T(0);
  for (int64_t k = 0; k < q; ++k) {
    const T prev_n = cum_n, prev_p = cum_p;
    cum_n += n[k];
    cum_p += p[k];
    total += BinTerm<T>(variant, p[k], n[k], prev_p, cum_p, prev_n, cum_n).value;
  }
  return lane_select(positives > T(0), total / ap_denominator(variant, cum_p, positives), T(0));
}

// grad_n[k] = g dAP/dn[k] and grad_p[k] = g dAP/dp[k] of one row; zero without positives. The
// output arrays first hold N_k and P_k (computed forward), which the reverse sweep then replaces
// by the gradients (bin k reads N_k and N_{k-1} before it writes bin k).
template <typename T>
FASTAP_HOST_DEVICE void ap_row_backward(T g, const T* n, const T* p, int64_t q, T positives,
                                        ApVariant variant, T* grad_n, T* grad_p) {
  g = lane_select(positives > T(0), g, T(0));
  const bool quantized = variant == ApVariant::kQuantized;
  T cum_n = T(0), cum_p = T(0), total = T(0);
  for (int64_t k = 0; k < q; ++k) {
    const T prev_n = cum_n, prev_p = cum_p;
    cum_n += n[k];
    cum_p += p[k];
    grad_n[k] = cum_n;
    grad_p[k] = cum_p;
    // Only AP_Q's divisor depends on the histograms, and so needs the sum.
    if (quantized) total += BinTerm<T>(variant, p[k], n[k], prev_p, cum_p, prev_n, cum_n).value;
  }
  const T d_total = g / ap_denominator(variant, cum_p, positives);
  const T d_last_cum_p =
      quantized ? lane_select(cum_p > T(0), -g * total / (cum_p * cum_p), T(0)) : T(0);
  T sum_n = T(0), sum_p = T(0);      // sum over j >= k of dAP/dN_j, dAP/dP_j
  T carry_n = T(0), carry_p = T(0);  // bin k + 1's derivative by N_k, P_k (its "previous")
  for (int64_t k = q - 1; k >= 0; --k) {
    const T cn = grad_n[k], cp = grad_p[k];
    const T prev_n = k > 0 ? grad_n[k - 1] : T(0);
    const T prev_p = k > 0 ? grad_p[k - 1] : T(0);
    const BinTerm<T> term(variant, p[k], n[k], prev_p, cp, prev_n, cn);
    sum_n += d_total * term.d_cum_n + carry_n;
    sum_p += d_total * term.d_cum_p + carry_p + (k == q - 1 ? d_last_cum_p : T(0));
    carry_n = d_total * term.d_prev_n;
    carry_p = d_total * term.d_prev_p;
    grad_n[k] = sum_n + d_total * term.d_n;
    grad_p[k] = sum_p + d_total * term.d_p;
  }
}

}  // namespace fastap
