#include "histogram_inputs.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/sub.h>

#include <array>
#include <cmath>
#include <iomanip>
#include <limits>
#include <sstream>
#include <string>

namespace fastap {
namespace {

// The score range as "(lo, hi)" with every digit a double needs (the default six would print a
// range whose ends round to one float32 as (1, 1)): every message of check_bins.
std::string range_text(double lo, double hi) {
  std::ostringstream text;
  text << std::setprecision(17) << "(" << lo << ", " << hi << ")";
  return text.str();
}

bool is_byte_mask(const at::Tensor& t) {
  return t.scalar_type() == at::kBool || t.scalar_type() == at::kByte;
}


void check_matrix_mask(const at::Tensor& t, const at::Tensor& scores, const char* name) {
  check_same_device(t, name, scores, "scores");
  TORCH_CHECK_TYPE(is_byte_mask(t), "fastap: ", name, " must be bool or uint8, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == scores.sizes(), "fastap: ", name, " must have the shape of scores ",
                    scores.sizes(), ", got ", t.sizes());
}

void check_label_vector(const at::Tensor& t, const at::Tensor& scores, const char* name,
                        int64_t expected) {
  check_same_device(t, name, scores, "scores");
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, "fastap: ", name, " must be int64, got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == expected, "fastap: ", name,
                    " must be 1-D with ", expected, " entries, got shape ", t.sizes());
}

}  // namespace

void check_defined(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.defined(), "fastap: ", name, " must be a tensor, got None");
}

void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& like,
                       const char* like_name) {
  TORCH_CHECK_VALUE(t.device() == like.device(), "fastap: ", name, " is on ", t.device(), " but ",
                    like_name, " is on ", like.device());
}

void check_bins(int64_t num_bins, double lo, double hi, bool float_grid) {
  TORCH_CHECK_VALUE(num_bins >= 2, "fastap: num_bins must be at least 2, got ", num_bins);
  TORCH_CHECK_VALUE(num_bins <= (int64_t{1} << 20), "fastap: num_bins must be at most 2^20, got ",
                    num_bins);
  TORCH_CHECK_VALUE(std::isfinite(lo) && std::isfinite(hi) && lo < hi,
                    "fastap: score_range must be finite with lo < hi, got ", range_text(lo, hi));
  const double most = std::numeric_limits<float>::max();
  TORCH_CHECK_VALUE(!float_grid || (std::abs(lo) <= most && std::abs(hi) <= most &&
                                    hi - lo <= most && (num_bins - 1) / (hi - lo) <= most),
                    "fastap: score_range ", range_text(lo, hi), " with ", num_bins,
                    " bins does not fit float32, in which float32, float16 and bfloat16 scores "
                    "are binned: |lo|, |hi|, hi - lo and (num_bins - 1) / (hi - lo) must be at "
                    "most 3.4e38 (float64 scores are binned in float64)");
  // The grid of BinGrid (binning.h): the ends in the compute type, and the spacing's inverse.
  TORCH_CHECK_VALUE(!float_grid || static_cast<float>(lo) < static_cast<float>(hi),
                    "fastap: score_range ", range_text(lo, hi), " has ends that round to the same "
                    "float32, in which float32, float16 and bfloat16 scores are binned");
  TORCH_CHECK_VALUE(float_grid || (std::isfinite(hi - lo) && std::isfinite((num_bins - 1) /
                                                                            (hi - lo))),
                    "fastap: score_range ", range_text(lo, hi), " with ", num_bins,
                    " bins does not fit float64: hi - lo and (num_bins - 1) / (hi - lo) must be "
                    "finite");
}

void check_self_column(bool exclude_self, int64_t self_offset, int64_t num_queries,
                       int64_t num_candidates) {
  TORCH_CHECK_VALUE(self_offset >= 0, "fastap: self_offset must be >= 0, got ", self_offset);
  // Compared without a sum that could overflow (self_offset comes from Python, up to 2^63 - 1).
  TORCH_CHECK_VALUE(!exclude_self || (num_queries <= num_candidates &&
                                      self_offset <= num_candidates - num_queries),
                    "fastap: exclude_self needs candidate i + self_offset for every query i: ",
                    num_queries, " queries + offset ", self_offset, " > ", num_candidates,
                    " candidates");
}

at::ScalarType HistogramInputs::histogram_dtype() const {
  return scores.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor plain_empty(at::IntArrayRef sizes, at::TensorOptions options) {
  return at::empty(sizes, options);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> HistogramInputs::empty_histograms(
    EmptyTensor empty) const {
  const auto options = scores.options().dtype(histogram_dtype());
  const std::array<int64_t, 2> sizes{num_queries(), num_bins};
  return {empty(sizes, options), empty(sizes, options),
          at::empty({num_queries()}, options.dtype(at::kLong))};
}

RelevanceArgs HistogramInputs::relevance_args() const {
  RelevanceArgs args;
  args.dense_relevance =
      relevance.defined() ? static_cast<const uint8_t*>(relevance.const_data_ptr()) : nullptr;
  args.labels = labels.defined() ? labels.const_data_ptr<int64_t>() : nullptr;
  args.ref_labels = ref_labels.defined() ? ref_labels.const_data_ptr<int64_t>() : nullptr;
  args.ignore = ignore.defined() ? static_cast<const uint8_t*>(ignore.const_data_ptr()) : nullptr;
  args.exclude_self = exclude_self;
  args.self_offset = self_offset;
  return args;
}

HistogramInputs check_histogram_inputs(const at::Tensor& scores,
                                       const std::optional<at::Tensor>& relevance,
                                       const std::optional<at::Tensor>& labels,
                                       const std::optional<at::Tensor>& ref_labels,
                                       const std::optional<at::Tensor>& ignore, bool exclude_self,
                                       int64_t num_bins, double lo, double hi,
                                       int64_t self_offset) {
  check_defined(scores, "scores");
  TORCH_CHECK_VALUE(scores.dim() == 2, "fastap: scores must be 2-D (queries x candidates), got shape ",
                    scores.sizes());
  const auto dtype = scores.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                       dtype == at::kBFloat16,
                   "fastap: scores must be float32, float64, float16 or bfloat16, got ", dtype);
  check_bins(num_bins, lo, hi, /*float_grid=*/dtype != at::kDouble);

  HistogramInputs in;
  in.scores = scores.contiguous();
  in.exclude_self = exclude_self;
  in.self_offset = self_offset;
  in.num_bins = num_bins;
  in.lo = lo;
  in.hi = hi;
  const int64_t n = scores.size(0);
  const int64_t m = scores.size(1);

  const bool has_relevance = relevance.has_value() && relevance->defined();
  const bool has_labels = labels.has_value() && labels->defined();
  const bool has_ref_labels = ref_labels.has_value() && ref_labels->defined();
  TORCH_CHECK_VALUE(has_relevance != has_labels,
                    "fastap: give exactly one of relevance (N x M) and labels (N), got ",
                    has_relevance ? "both" : "neither");
  if (has_relevance) {
    TORCH_CHECK_VALUE(!has_ref_labels, "fastap: ref_labels needs labels, not relevance");
    check_matrix_mask(*relevance, scores, "relevance");
    in.relevance = relevance->contiguous();
  } else {
    check_label_vector(*labels, scores, "labels", n);
    in.labels = labels->contiguous();
    if (has_ref_labels) {
      check_label_vector(*ref_labels, scores, "ref_labels", m);
      in.ref_labels = ref_labels->contiguous();
    } else {
      TORCH_CHECK_VALUE(n == m, "fastap: labels without ref_labels needs a square scores matrix "
                        "(the candidates are the queries), got shape ", scores.sizes());
      in.ref_labels = in.labels;
    }
  }
  if (ignore.has_value() && ignore->defined()) {
    check_matrix_mask(*ignore, scores, "ignore");
    in.ignore = ignore->contiguous();
  }
  check_self_column(exclude_self, self_offset, n, m);
  return in;
}

void check_histogram_grads(const at::Tensor& like, int64_t num_queries, int64_t num_bins,
                           const at::Tensor& grad_n, const at::Tensor& grad_p) {
  for (const auto* g : {&grad_n, &grad_p}) {
    const char* name = g == &grad_n ? "grad_n" : "grad_p";
    check_defined(*g, name);
    check_same_device(*g, name, like, "scores");
    TORCH_CHECK_VALUE(g->dim() == 2 && g->size(0) == num_queries && g->size(1) == num_bins,
                      "fastap: ", name, " must have shape [", num_queries, ", ", num_bins,
                      "], got ", g->sizes());
    // (It is converted to the histogram dtype; an integer or complex one would be truncated.)
    TORCH_CHECK_TYPE(at::isFloatingType(g->scalar_type()), "fastap: ", name,
                     " must be a floating-point tensor, got ", g->scalar_type());
  }
}

at::Tensor backward_slope_table(const at::Tensor& like, int64_t num_queries, int64_t num_bins,
                                double lo, double hi, at::ScalarType dtype,
                                const at::Tensor& grad_n, const at::Tensor& grad_p) {
  const int64_t q = num_bins;
  check_histogram_grads(like, num_queries, q, grad_n, grad_p);
  // The roundings of BinGrid::slope (binning.h), which the CPU backward applies row by row: the
  // sum g_n + g_p and the difference in the histogram dtype, times the bin scale rounded to it.
  // (Strided incoming gradients are read as they are: the ATen operations take any strides.)
  const at::Tensor g_neg = grad_n.to(dtype);
  const at::Tensor g_pos = g_neg.add(grad_p.to(dtype));
  // Each class's differences are written into its half of the table, which is then scaled in
  // place: the same roundings as sub and mul on their own, without an N x 2 x Q stack and two
  // N x 2 x (Q - 1) temporaries (as large as dS itself where Q approaches M).
  at::Tensor table = at::empty({num_queries, 2, q - 1}, g_neg.options());
  for (int64_t c = 0; c < 2; ++c) {
    const at::Tensor& g = c == 0 ? g_neg : g_pos;
    at::Tensor half = table.select(1, c);
    at::sub_out(half, g.narrow(1, 0, q - 1), g.narrow(1, 1, q - 1));
  }
  return table.mul_(static_cast<double>(q - 1) / (hi - lo));
}

at::Tensor backward_slope_table(const HistogramInputs& in, const at::Tensor& grad_n,
                                const at::Tensor& grad_p) {
  return backward_slope_table(in.scores, in.num_queries(), in.num_bins, in.lo, in.hi,
                              in.histogram_dtype(), grad_n, grad_p);
}

}  // namespace fastap
