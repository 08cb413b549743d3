// CPU kernels of fastap::soft_histogram and fastap::soft_histogram_backward.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>
#include <vector>

#include "../binning.h"
#include "../histogram_inputs.h"

namespace fastap {
namespace {

// Candidates of a row are dealt round-robin to this many private sub-histograms, so that
// consecutive candidates falling into the same bin do not wait on each other's additions.
constexpr int64_t kLanes = 4;

// Candidates per block of the two-pass loops of the labels-only rows: a few KB of positions that
// stay in L1 between the passes.
constexpr int64_t kBlock = 64;

// Rows per parallel task: enough candidates that a task is worth scheduling.
int64_t row_grain(int64_t num_candidates) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, num_candidates));
}

// One candidate of a row into its lane's pair of sub-histograms (`lane`: non-positives, then
// positives, q bins each).
template <typename compute_t>
inline void add_candidate(compute_t s, bool positive, const BinGrid<compute_t>& grid, int64_t q,
                          double* lane) {
  const BinPosition<compute_t> pos = grid.locate(s);
  double* h = lane + (positive ? q : 0) + pos.bin;  // bins pos.bin and pos.bin + 1
  const double frac = static_cast<double>(pos.frac);
  h[0] += 1.0 - frac;
  h[1] += frac;
}

// What one row's pass over its candidates counts besides the sub-histograms.
struct RowTally {
  int64_t positives = 0;
  bool poisoned = false;  // a counted candidate has a non-finite score
};

// Candidates [begin, end) of a row with labels and no ignore mask (the common case), none of
// them the query itself. Blocks of kBlock candidates in two passes: the first finds each one's
// bin and fraction with no branch and no store that depends on the data (the compiler turns it
// into vector instructions), the second adds them into the sub-histograms, lane = candidate mod
// kLanes. A non-finite score is binned like any other (BinGrid::position places it) and poisons
// the row.
template <typename scalar_t, typename compute_t>
void add_label_candidates(const scalar_t* scores, const int64_t* ref_labels, int64_t label,
                          int64_t begin, int64_t end, const BinGrid<compute_t>& grid, int64_t q,
                          double* acc, RowTally& tally) {
  int32_t bins[kBlock];
  compute_t fracs[kBlock];
  int64_t positives = 0;
  int32_t nonfinite = 0;  // an int, not a bool: the compiler vectorizes the loop then
  for (int64_t start = begin; start < end; start += kBlock) {
    const int64_t count = std::min(kBlock, end - start);
    const scalar_t* block_scores = scores + start;
    for (int64_t o = 0; o < count; ++o) {
      const compute_t s = static_cast<compute_t>(block_scores[o]);
      nonfinite |= !is_finite(s);
      const BinPosition<compute_t> pos = grid.locate(s);
      bins[o] = pos.bin;
      fracs[o] = pos.frac;
    }
    const int64_t* block_labels = ref_labels + start;
    auto add = [&](int64_t o, double* lane) {
      const bool positive = block_labels[o] == label;
      positives += positive ? 1 : 0;
      double* h = lane + (positive ? q : 0) + bins[o];  // bins[o] and bins[o] + 1
      const double frac = static_cast<double>(fracs[o]);
      h[0] += 1.0 - frac;
      h[1] += frac;
    };
    int64_t o = 0;
    for (; o + kLanes <= count; o += kLanes) {
      for (int64_t lane = 0; lane < kLanes; ++lane) add(o + lane, acc + lane * 2 * q);
    }
    for (; o < count; ++o) add(o, acc);
  }
  tally.positives += positives;
  tally.poisoned |= nonfinite != 0;
}

// Candidates [0, M) of a row in the general case: dense relevance or an ignore mask.
template <typename scalar_t, typename compute_t>
void add_masked_candidates(const scalar_t* scores, const RowRelevance& row, int64_t num_candidates,
                           const BinGrid<compute_t>& grid, int64_t q, double* acc,
                           RowTally& tally) {
  for (int64_t j = 0; j < num_candidates; ++j) {
    if (row.ignored(j)) continue;
    const bool positive = row.positive(j);
    tally.positives += positive ? 1 : 0;
    const compute_t s = static_cast<compute_t>(scores[j]);
    if (!is_finite(s)) {
      tally.poisoned = true;
      continue;
    }
    add_candidate(s, positive, grid, q, acc + (j % kLanes) * 2 * q);
  }
}

// Forward: at::parallel_for over query rows; each row is one sequential pass over its candidates
// into fp64 accumulators (kLanes sub-histograms x {non-positive, positive} x Q bins), summed in a
// fixed order at the end of the row: deterministic and independent of the number of threads.
// The row's positives are also counted exactly (an integer). A non-finite score that is not
// ignored makes the row's histograms NaN.
template <typename scalar_t, typename hist_t>
void histogram_rows(const HistogramInputs& in, hist_t* n_out, hist_t* p_out,
                    int64_t* positives_out) {
  using compute_t = at::opmath_type<scalar_t>;
  const int64_t num_candidates = in.num_candidates();
  const int64_t q = in.num_bins;
  const BinGrid<compute_t> grid(in.lo, in.hi, q);
  const RelevanceArgs relevance = in.relevance_args();
  const scalar_t* scores = in.scores.const_data_ptr<scalar_t>();

  at::parallel_for(0, in.num_queries(), row_grain(num_candidates), [&](int64_t begin, int64_t end) {
    // acc[(lane * 2 + positive) * q + bin]
    std::vector<double> acc(kLanes * 2 * q);
    for (int64_t i = begin; i < end; ++i) {
      std::fill(acc.begin(), acc.end(), 0.0);
      const scalar_t* row_scores = scores + i * num_candidates;
      const RowRelevance row = relevance.row(i, num_candidates);
      RowTally tally;
      if (relevance.labels_only()) {
        // The query's own candidate, if any, splits the row in two.
        const int64_t self = row.self_column >= 0 ? row.self_column : num_candidates;
        add_label_candidates(row_scores, row.ref_labels, row.query_label, 0, self, grid, q,
                             acc.data(), tally);
        add_label_candidates(row_scores, row.ref_labels, row.query_label, self + 1,
                             num_candidates, grid, q, acc.data(), tally);
      } else {
        add_masked_candidates(row_scores, row, num_candidates, grid, q, acc.data(), tally);
      }
      positives_out[i] = tally.positives;
      hist_t* n_row = n_out + i * q;
      hist_t* p_row = p_out + i * q;
      for (int64_t k = 0; k < q; ++k) {
        double by_class[2] = {0.0, 0.0};
        for (int64_t lane = 0; lane < kLanes; ++lane) {
          for (int64_t c = 0; c < 2; ++c) {
            by_class[c] += acc[(lane * 2 + c) * q + k];
          }
        }
        n_row[k] = tally.poisoned ? std::numeric_limits<hist_t>::quiet_NaN()
                                  : static_cast<hist_t>(by_class[0] + by_class[1]);
        p_row[k] = tally.poisoned ? std::numeric_limits<hist_t>::quiet_NaN()
                                  : static_cast<hist_t>(by_class[1]);
      }
    }
  });
}

// dL/ds of candidates [begin, end) of a row with labels and no ignore mask, none of them the
// query itself, in blocks of two passes as add_label_candidates: locate (vectorized), then look
// up each one's slope.
template <typename scalar_t, typename hist_t>
void label_candidate_gradients(const scalar_t* scores, const int64_t* ref_labels, int64_t label,
                               int64_t begin, int64_t end, const BinGrid<hist_t>& grid,
                               const hist_t* row_table, scalar_t* grad) {
  int32_t bins[kBlock];
  hist_t fracs[kBlock];
  for (int64_t start = begin; start < end; start += kBlock) {
    const int64_t count = std::min(kBlock, end - start);
    const scalar_t* block_scores = scores + start;
    for (int64_t o = 0; o < count; ++o) {
      const BinPosition<hist_t> pos = grid.locate(static_cast<hist_t>(block_scores[o]));
      bins[o] = pos.bin;
      fracs[o] = pos.frac;
    }
    const int64_t* block_labels = ref_labels + start;
    scalar_t* block_grad = grad + start;
    for (int64_t o = 0; o < count; ++o) {
      const hist_t s = static_cast<hist_t>(block_scores[o]);
      const BinPosition<hist_t> pos{bins[o], fracs[o], grid.sloped(s, fracs[o])};
      const hist_t g = located_slope(pos, block_labels[o] == label, grid, row_table);
      block_grad[o] = static_cast<scalar_t>(is_finite(s) ? g : s - s);  // as score_gradient
    }
  }
}

// Backward: at::parallel_for over query rows; each candidate is one lookup in its row's slope
// table (see backward_slope_table). No accumulation, so trivially deterministic.
template <typename scalar_t, typename hist_t>
void histogram_backward_rows(const HistogramInputs& in, const hist_t* table, scalar_t* grad_out) {
  using compute_t = at::opmath_type<scalar_t>;
  const int64_t num_candidates = in.num_candidates();
  const int64_t slopes = in.num_bins - 1;
  const BinGrid<compute_t> grid(in.lo, in.hi, in.num_bins);
  const RelevanceArgs relevance = in.relevance_args();
  const scalar_t* scores = in.scores.const_data_ptr<scalar_t>();

  at::parallel_for(0, in.num_queries(), row_grain(num_candidates), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* row_scores = scores + i * num_candidates;
      const hist_t* row_table = table + i * 2 * slopes;
      scalar_t* row_grad = grad_out + i * num_candidates;
      const RowRelevance row = relevance.row(i, num_candidates);
      if (relevance.labels_only()) {
        // The query's own candidate, if any, splits the row in two; its gradient is 0.
        const int64_t self = row.self_column >= 0 ? row.self_column : num_candidates;
        label_candidate_gradients(row_scores, row.ref_labels, row.query_label, 0, self, grid,
                                  row_table, row_grad);
        if (self < num_candidates) row_grad[self] = scalar_t(0);
        label_candidate_gradients(row_scores, row.ref_labels, row.query_label, self + 1,
                                  num_candidates, grid, row_table, row_grad);
        continue;
      }
      for (int64_t j = 0; j < num_candidates; ++j) {
        const compute_t s = static_cast<compute_t>(row_scores[j]);
        const hist_t g =
            row.ignored(j) ? hist_t(0) : score_gradient(s, row.positive(j), grid, row_table);
        row_grad[j] = static_cast<scalar_t>(g);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> soft_histogram_cpu(
    const at::Tensor& scores, const std::optional<at::Tensor>& relevance,
    const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& ref_labels,
    const std::optional<at::Tensor>& ignore, bool exclude_self, int64_t num_bins, double lo,
    double hi, int64_t self_offset) {
  const HistogramInputs in = check_histogram_inputs(scores, relevance, labels, ref_labels, ignore,
                                                    exclude_self, num_bins, lo, hi, self_offset);
  const auto options = in.scores.options().dtype(in.histogram_dtype());
  at::Tensor n = at::empty({in.num_queries(), num_bins}, options);
  at::Tensor p = at::empty({in.num_queries(), num_bins}, options);
  at::Tensor positives = at::empty({in.num_queries()}, options.dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scores.scalar_type(),
                                  "fastap_soft_histogram_cpu", [&] {
    using hist_t = histogram_t<scalar_t>;
    histogram_rows<scalar_t, hist_t>(in, n.data_ptr<hist_t>(), p.data_ptr<hist_t>(),
                                     positives.data_ptr<int64_t>());
  });
  return {n, p, positives};
}

at::Tensor soft_histogram_backward_cpu(
    const at::Tensor& grad_n, const at::Tensor& grad_p, const at::Tensor& scores,
    const std::optional<at::Tensor>& relevance, const std::optional<at::Tensor>& labels,
    const std::optional<at::Tensor>& ref_labels, const std::optional<at::Tensor>& ignore,
    bool exclude_self, int64_t num_bins, double lo, double hi, int64_t self_offset) {
  const HistogramInputs in = check_histogram_inputs(scores, relevance, labels, ref_labels, ignore,
                                                    exclude_self, num_bins, lo, hi, self_offset);
  const at::Tensor table = backward_slope_table(in, grad_n, grad_p);
  at::Tensor grad_scores = at::empty_like(in.scores);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scores.scalar_type(),
                                  "fastap_soft_histogram_backward_cpu", [&] {
    using hist_t = histogram_t<scalar_t>;
    histogram_backward_rows<scalar_t, hist_t>(in, table.const_data_ptr<hist_t>(),
                                              grad_scores.data_ptr<scalar_t>());
  });
  return grad_scores;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastap, CPU, m) {
  m.impl("soft_histogram", &soft_histogram_cpu);
  m.impl("soft_histogram_backward", &soft_histogram_backward_cpu);
}

}  // namespace fastap
