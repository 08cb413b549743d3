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

// Rows per parallel task: enough candidates that a task is worth scheduling.
int64_t row_grain(int64_t num_candidates) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, num_candidates));
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
      bool poisoned = false;
      int64_t positives = 0;
      for (int64_t j = 0; j < num_candidates; ++j) {
        if (row.ignored(j)) continue;
        const bool positive = row.positive(j);
        positives += positive ? 1 : 0;
        const compute_t s = static_cast<compute_t>(row_scores[j]);
        if (!is_finite(s)) {
          poisoned = true;
          continue;
        }
        const BinPosition<compute_t> pos = grid.locate(s);
        double* h = acc.data() + ((j % kLanes) * 2 + (positive ? 1 : 0)) * q;
        h[pos.bin] += static_cast<double>(compute_t(1) - pos.frac);
        h[pos.bin + 1] += static_cast<double>(pos.frac);
      }
      positives_out[i] = positives;
      hist_t* n_row = n_out + i * q;
      hist_t* p_row = p_out + i * q;
      for (int64_t k = 0; k < q; ++k) {
        double by_class[2] = {0.0, 0.0};
        for (int64_t lane = 0; lane < kLanes; ++lane) {
          for (int64_t c = 0; c < 2; ++c) {
            by_class[c] += acc[(lane * 2 + c) * q + k];
          }
        }
        n_row[k] = poisoned ? std::numeric_limits<hist_t>::quiet_NaN()
                            : static_cast<hist_t>(by_class[0] + by_class[1]);
        p_row[k] = poisoned ? std::numeric_limits<hist_t>::quiet_NaN()
                            : static_cast<hist_t>(by_class[1]);
      }
    }
  });
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
