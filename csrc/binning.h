// The soft histogram binning of fastap: the one definition that the CPU and the CUDA kernels share.
//
// Q bins cover the score range [lo, hi] with spacing delta = (hi - lo) / (Q - 1). Bin k = 0..Q-1 is
// centred at c_k = hi - k * delta, so bin 0 is the top of the ranking. A score s has the position
// t = (hi - s) / delta clamped to [0, Q - 1] (which is the position of s clamped to [lo, hi]); with
// k = floor(t) (at most Q - 2) and f = t - k, it puts the weight 1 - f into bin k and f into bin
// k + 1. That is exactly the triangular assignment w_k(s) = max(0, 1 - |clamp(s) - c_k| / delta)
// of the paper: at most two bins are non-zero and the weights sum to one.
//
// Since dt/ds = -1/delta, d(1 - f)/ds = +1/delta and df/ds = -1/delta, so an upstream gradient
// g (one value per bin) gives dL/ds = (g[k] - g[k + 1]) / delta. It is zero where the loss is
// flat or has a kink: outside the open range (lo, hi) and at an exact bin centre (f == 0).
// Everywhere else this is the derivative of the triangle formula, which the pure-PyTorch reference
// differentiates with autograd; at those kinks autograd takes a one-sided slope instead (clamp
// passes a gradient at lo and hi, and a centre rounded in floating point leaves a sliver).
#pragma once

#include <cstdint>
#include <type_traits>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTAP_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Always inlined on the host too. The CPU row formula runs in functions compiled for AVX2 and
// AVX-512 (target attributes, cpu/ap_formula.cpp), whose `flatten` g++ applies to every call
// down the line but clang (14) only to the calls written in them: built with clang,
// ap_row_backward stayed out of line, compiled for the baseline, and ran 16 lanes as four SSE2
// vectors, the exact tie-aware backward 1.8 times as long (benchmarks/RESULTS.md).
#define FASTAP_HOST_DEVICE __attribute__((always_inline)) inline
#else
#define FASTAP_HOST_DEVICE inline
#endif

namespace fastap {

// The C++ type of the histograms and their gradients for scores of type scalar_t: double for
// double, float for float, c10::Half and c10::BFloat16.
template <typename scalar_t>
using histogram_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Where one score falls: the upper (lower-index) bin `bin` gets 1 - frac, bin + 1 gets frac.
template <typename T>
struct BinPosition {
  int32_t bin;   // k in [0, Q - 2]
  T frac;        // f in [0, 1]
  bool sloped;   // the weights have a non-zero derivative here (lo < s < hi, not on a centre)
};

// The bin grid of one call. T is the compute type (float for fp16/bf16/fp32 scores, double for fp64).
template <typename T>
struct BinGrid {
  T lo;
  T hi;
  T inv_delta;       // (Q - 1) / (hi - lo)
  int32_t last_bin;  // Q - 1

  BinGrid(double lo_, double hi_, int64_t num_bins)
      : lo(static_cast<T>(lo_)),
        hi(static_cast<T>(hi_)),
        inv_delta(static_cast<T>(static_cast<double>(num_bins - 1) / (hi_ - lo_))),
        last_bin(static_cast<int32_t>(num_bins - 1)) {}

  // t in [0, Q - 1]. Clamping the position rather than the score gives the same t for every
  // finite s (for s in [lo, hi] nothing is clamped; beyond, both give 0 or Q - 1, also where
  // (hi - lo) / delta rounds above Q - 1), and it bounds f by 1 with no test of its own. A NaN s
  // is placed like hi (and +-inf like the end it points to), so that a branch-free kernel may
  // bin a non-finite score before it discards the row's result. On the GPU two min/max
  // instructions, not branches.
  // t is the product alone, rounded once on the host and on the device alike (a product and an
  // addition would not be: nvcc contracts them into one fma, the host build does not, and the
  // positions would differ in their last bit). So hi is T(hi), up to half an ulp of hi from the
  // exact one: half the spacing of the scores of type T near it (docs/design.md, section 4).
  FASTAP_HOST_DEVICE T position(T s) const {
    const T t = (hi - s) * inv_delta;
#ifdef __CUDA_ARCH__
    return fmin(fmax(t, T(0)), static_cast<T>(last_bin));  // fmax(NaN, 0) == 0
#else
    const T last = static_cast<T>(last_bin);
    return t > T(0) ? (t < last ? t : last) : T(0);
#endif
  }

  FASTAP_HOST_DEVICE BinPosition<T> locate(T s) const {
    const T t = position(s);
    int32_t k = static_cast<int32_t>(t);  // t >= 0, so truncation is floor
#ifdef __CUDA_ARCH__
    k = min(k, last_bin - 1);  // one instruction
#else
    if (k > last_bin - 1) k = last_bin - 1;
#endif
    BinPosition<T> pos;
    pos.bin = k;
    pos.frac = t - static_cast<T>(k);  // in [0, 1]: t <= Q - 1
    // s < hi needs no test of its own: s >= hi has t = 0 and so f = 0.
    pos.sloped = sloped(s, pos.frac);
    return pos;
  }

  // Whether the weights of score s, whose fraction is frac, have a non-zero derivative.
  FASTAP_HOST_DEVICE bool sloped(T s, T frac) const { return (s > lo) & (frac != T(0)); }

  // dL/ds of a score in bin k from its class's incoming gradients g_k = g[k] and g_next =
  // g[k + 1]: (g[k] - g[k + 1]) / delta, as the difference rounded to T times inv_delta. The
  // backward's slope table holds these (backward_slope_table in histogram_inputs.h builds it
  // with ATen's sub and mul, which round the same way; the CPU backward calls this per row).
  FASTAP_HOST_DEVICE T slope(T g_k, T g_next) const { return (g_k - g_next) * inv_delta; }
};

template <typename T>
FASTAP_HOST_DEVICE bool is_finite(T x) {
  // x - x is 0 for finite x and NaN for NaN or +-inf; avoids std::isfinite on device.
  return (x - x) == T(0);
}

// dL/ds of one score that counts, from its query's slope table `row_table` (2 x (Q - 1) entries:
// negatives, then positives; see backward_slope_table in histogram_inputs.h): the slope of the
// score's bin where the binning has one, else 0; NaN if s is not finite. On the GPU the table is
// read whatever the score (the index is always in range), so that the code needs no branch; the
// CPU skips the read where the slope is not used. (The CPU backward itself takes these decisions
// in a vectorised pass and reads a table extended by a 0 and a NaN per class: ExtendedSlopes in
// cpu/soft_histogram.cpp.)
template <typename T>
FASTAP_HOST_DEVICE T score_gradient(T s, bool positive, const BinGrid<T>& grid,
                                    const T* row_table) {
  const BinPosition<T> pos = grid.locate(s);
  const uint32_t index = static_cast<uint32_t>((positive ? grid.last_bin : 0) + pos.bin);
#ifdef __CUDA_ARCH__
  const T slope = __ldg(row_table + index);  // the read-only data path
  const T g = pos.sloped ? slope : T(0);
#else
  const T g = pos.sloped ? row_table[index] : T(0);
#endif
  return is_finite(s) ? g : s - s;  // s - s: NaN for NaN and +-inf
}

// Which candidates are positives and which are ignored for one query row. Exactly one of
// `dense_relevance` (row of an N x M 0/1 byte matrix) and `ref_labels` (M labels compared with the
// query's label) is set; `ignore_row` (row of an N x M byte matrix) and `self_column` (the
// query's own candidate, or -1) remove candidates from the row entirely.
//
// positive<kDense>: false for a row with labels, true for one with a dense relevance matrix,
// when a kernel is compiled for one form (the CUDA and CPU kernels); without it, decided at run
// time.
// ignored<kCheckSelf>: kCheckSelf = false promises that the candidate asked about is not
// self_column. The index type may be int32 after window().
struct RowRelevance {
  const uint8_t* dense_relevance;
  const int64_t* ref_labels;
  int64_t query_label;
  const uint8_t* ignore_row;
  int64_t self_column;

  FASTAP_HOST_DEVICE bool positive(int64_t j) const {
    return dense_relevance != nullptr ? positive<true>(j) : positive<false>(j);
  }
  template <bool kDense, typename Index>
  FASTAP_HOST_DEVICE bool positive(Index j) const {
    if (kDense) return dense_relevance[j] != 0;
    return ref_labels[j] == query_label;
  }
  template <bool kCheckSelf = true, typename Index = int64_t>
  FASTAP_HOST_DEVICE bool ignored(Index j) const {
    const bool self = kCheckSelf && j == static_cast<Index>(self_column);
    const uint8_t masked = ignore_row != nullptr ? ignore_row[j] : uint8_t{0};
    return self || masked != 0;
  }

  // The same row seen from candidate `begin` on, for the `length` candidates of one chunk: index
  // o = j - begin, which fits in 32 bits. self_column becomes o's, or -1 outside the chunk.
  FASTAP_HOST_DEVICE RowRelevance window(int64_t begin, int64_t length) const {
    RowRelevance w = *this;
    w.dense_relevance = dense_relevance != nullptr ? dense_relevance + begin : nullptr;
    w.ref_labels = ref_labels != nullptr ? ref_labels + begin : nullptr;
    w.ignore_row = ignore_row != nullptr ? ignore_row + begin : nullptr;
    const int64_t self = self_column - begin;
    w.self_column = self_column >= 0 && self >= 0 && self < length ? self : -1;
    return w;
  }
};

// The per-call relevance inputs (contiguous), from which each row's RowRelevance is cut.
struct RelevanceArgs {
  const uint8_t* dense_relevance;  // N x M or nullptr
  const int64_t* labels;           // N or nullptr
  const int64_t* ref_labels;       // M or nullptr
  const uint8_t* ignore;           // N x M or nullptr
  bool exclude_self;               // candidate i + self_offset is query i itself
  int64_t self_offset;

  // Labels and no ignore mask: the case of the fast CUDA kernels.
  FASTAP_HOST_DEVICE bool labels_only() const {
    return dense_relevance == nullptr && ignore == nullptr;
  }

  FASTAP_HOST_DEVICE RowRelevance row(int64_t i, int64_t num_candidates) const {
    RowRelevance r;
    const int64_t offset = i * num_candidates;
    r.dense_relevance = dense_relevance != nullptr ? dense_relevance + offset : nullptr;
    r.ref_labels = ref_labels;
    r.query_label = labels != nullptr ? labels[i] : 0;
    r.ignore_row = ignore != nullptr ? ignore + offset : nullptr;
    r.self_column = exclude_self ? i + self_offset : -1;
    return r;
  }
};

}  // namespace fastap
