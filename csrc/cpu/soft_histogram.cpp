// CPU kernels of fastap::soft_histogram and fastap::soft_histogram_backward.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../binning.h"
#include "../histogram_inputs.h"
#include "huge_pages.h"
#include "widen.h"

namespace fastap {
namespace {

// Candidates of a row are dealt round-robin to this many private sub-histograms, so that
// consecutive candidates falling into the same bin do not wait on each other's additions.
constexpr int64_t kLanes = 4;

// Candidates per block of the two-pass loops: about a KB of positions, which stays in L1
// between the passes.
constexpr int64_t kBlock = 64;

// Candidates per piece of a row: a row longer than this is split into pieces, the parallel
// tasks' unit, so that a call with fewer rows than threads still uses them all (one row of 10^7
// candidates ran on one core). Fixed, so that the pieces, and the order in which the forward adds
// their sums, do not depend on the number of threads.
constexpr int64_t kPiece = 65536;

// The pieces of a call: piece k of a row holds its candidates [k length, min((k + 1) length, M)).
struct RowPieces {
  int64_t num_candidates;
  int64_t length;   // candidates per piece: kPiece, or 64 Q for many bins (a row's pieces' sums,
                    // 2 Q doubles each, then stay below half a byte per candidate)
  int64_t per_row;  // >= 1 (1 for an empty row)

  RowPieces(int64_t num_candidates_, int64_t num_bins)
      : num_candidates(num_candidates_),
        length(std::max<int64_t>(kPiece, 64 * num_bins)),
        per_row(std::max<int64_t>(1, (num_candidates_ + length - 1) / length)) {}
  int64_t begin(int64_t piece) const { return (piece % per_row) * length; }
  int64_t end(int64_t piece) const { return std::min(begin(piece) + length, num_candidates); }
  // Pieces per parallel task: enough candidates that a task is worth scheduling.
  int64_t grain() const {
    return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, std::min(num_candidates, length)));
  }
};

// Calls f(kDense, kIgnore) with the relevance form of the call as compile-time constants
// (std::bool_constant): positives from a dense relevance matrix or from labels; an ignore mask
// or none. The kernels below are compiled once per form, so that a candidate's tests are only
// those its form needs.
template <typename F>
void with_relevance_form(const RelevanceArgs& relevance, F&& f) {
  const bool dense = relevance.dense_relevance != nullptr;
  const bool ignore = relevance.ignore != nullptr;
  if (dense) {
    ignore ? f(std::true_type{}, std::true_type{}) : f(std::true_type{}, std::false_type{});
  } else {
    ignore ? f(std::false_type{}, std::true_type{}) : f(std::false_type{}, std::false_type{});
  }
}

// The query's own candidate (with exclude_self) if it lies in [begin, end) of its row, else end.
int64_t own_column_in(const RowRelevance& row, int64_t begin, int64_t end) {
  return row.self_column >= begin && row.self_column < end ? row.self_column : end;
}

// Calls part(begin, end) for the candidate ranges of [begin, end) of a row without the query's
// own candidate: the kernels then need no per-candidate test for it.
template <typename Part>
void for_row_parts(const RowRelevance& row, int64_t begin, int64_t end, Part&& part) {
  const int64_t self = own_column_in(row, begin, end);
  part(begin, self);
  if (self < end) part(self + 1, end);
}

// Where the candidates of a block fall, from the first pass over it: BinGrid::locate of each,
// with no branch and no store that depends on the data, which the compiler turns into vector
// instructions (it would not with a bool in the loop: the flags are ints).
template <typename scalar_t, typename compute_t>
struct BlockPositions {
  int32_t bins[kBlock];
  compute_t fracs[kBlock];
  int32_t finite[kBlock];  // per candidate: what the forms with an ignore mask need
  int32_t any_non_finite;  // the block at once: all the other forms need (and cheaper to use)

  void locate(const scalar_t* scores, int64_t count, const BinGrid<compute_t>& grid) {
    int32_t non_finite = 0;
    for (int64_t o = 0; o < count; ++o) {
      const compute_t s = widen(scores[o]);
      const BinPosition<compute_t> pos = grid.locate(s);  // places a non-finite s too
      bins[o] = pos.bin;
      fracs[o] = pos.frac;
      finite[o] = is_finite(s);
      non_finite |= !is_finite(s);
    }
    any_non_finite = non_finite;
  }
};

// What one row's pass over its candidates counts besides the sub-histograms.
struct RowTally {
  int64_t positives = 0;
  bool poisoned = false;  // a counted candidate has a non-finite score
};

// Forward of candidates [begin, end) of a row, none of them the query itself, into `acc`
// (kLanes x {non-positive, positive} x q fp64 sums; lane = the candidate's offset in its block
// of kBlock mod kLanes, but lane 0 for the last (length mod kLanes) candidates of a part's last,
// shorter block).
// In blocks of kBlock candidates, two passes: locate (BlockPositions), then add each counted
// candidate's two weights. An ignored candidate's weights go to `discard`, so that the second
// pass has no branch either.
template <bool kDense, bool kIgnore, typename scalar_t, typename compute_t>
void add_row_candidates(const scalar_t* scores, const RowRelevance& row, int64_t begin,
                        int64_t end, const BinGrid<compute_t>& grid, int64_t q, double* acc,
                        RowTally& tally) {
  BlockPositions<scalar_t, compute_t> block;
  double discard[2] = {0.0, 0.0};
  int64_t positives = 0;
  int32_t poisoned = 0;
  for (int64_t start = begin; start < end; start += kBlock) {
    const int64_t count = std::min(kBlock, end - start);
    block.locate(scores + start, count, grid);
    const RowRelevance part = row.window(start, count);  // self_column is outside: not checked
    auto add = [&](int64_t o, double* lane) {
      const bool counted = !(kIgnore && part.ignored<false>(o));
      const bool positive = part.positive<kDense>(o);
      positives += (counted & positive) ? 1 : 0;
      if constexpr (kIgnore) poisoned |= counted & (block.finite[o] == 0);
      double* h = counted ? lane + (positive ? q : 0) + block.bins[o] : discard;  // 2 bins
      const double frac = static_cast<double>(block.fracs[o]);
      h[0] += 1.0 - frac;
      h[1] += frac;
    };
    int64_t o = 0;
    for (; o + kLanes <= count; o += kLanes) {
      for (int64_t lane = 0; lane < kLanes; ++lane) add(o + lane, acc + lane * 2 * q);
    }
    for (; o < count; ++o) add(o, acc);
    if constexpr (!kIgnore) poisoned |= block.any_non_finite;
  }
  tally.positives += positives;
  tally.poisoned |= poisoned != 0;
}

// A row's histograms from the sums of its two classes (sums[c * q + k]) and its tally.
template <typename hist_t>
void write_row_histograms(const double* sums, const RowTally& tally, int64_t q, hist_t* n_row,
                          hist_t* p_row, int64_t* positives) {
  *positives = tally.positives;
  for (int64_t k = 0; k < q; ++k) {
    n_row[k] = tally.poisoned ? std::numeric_limits<hist_t>::quiet_NaN()
                              : static_cast<hist_t>(sums[k] + sums[q + k]);
    p_row[k] = tally.poisoned ? std::numeric_limits<hist_t>::quiet_NaN()
                              : static_cast<hist_t>(sums[q + k]);
  }
}

// Forward: at::parallel_for over the pieces of the rows (RowPieces); each piece is one sequential
// pass over its candidates into fp64 accumulators (kLanes sub-histograms x {non-positive,
// positive} x Q bins), summed in a fixed order at its end, and a row of several pieces adds their
// sums in piece order: deterministic and independent of the number of threads. The row's
// positives are also counted exactly (an integer). A non-finite score that is not ignored makes
// the row's histograms NaN.
template <typename scalar_t, typename hist_t>
void histogram_rows(const HistogramInputs& in, hist_t* n_out, hist_t* p_out,
                    int64_t* positives_out) {
  using compute_t = at::opmath_type<scalar_t>;
  const int64_t num_candidates = in.num_candidates();
  const int64_t q = in.num_bins;
  const BinGrid<compute_t> grid(in.lo, in.hi, q);
  const RelevanceArgs relevance = in.relevance_args();
  const scalar_t* scores = in.scores.const_data_ptr<scalar_t>();
  const RowPieces pieces(num_candidates, q);
  const int64_t num_pieces = in.num_queries() * pieces.per_row;
  // A row of one piece writes its histograms at once (so short rows need no sums, whatever Q);
  // the pieces of longer rows leave their sums (2 Q doubles) and tallies here, added row by row
  // below.
  const bool split = pieces.per_row > 1;
  std::vector<double> piece_sums(split ? num_pieces * 2 * q : 0);
  std::vector<RowTally> piece_tallies(split ? num_pieces : 0);

  with_relevance_form(relevance, [&](auto dense, auto ignore) {
    at::parallel_for(0, num_pieces, pieces.grain(), [&](int64_t first, int64_t last) {
      // acc[(lane * 2 + positive) * q + bin]
      std::vector<double> acc(kLanes * 2 * q);
      std::vector<double> row_sums(split ? 0 : 2 * q);
      for (int64_t piece = first; piece < last; ++piece) {
        std::fill(acc.begin(), acc.end(), 0.0);
        const int64_t i = piece / pieces.per_row;
        const scalar_t* row_scores = scores + i * num_candidates;
        const RowRelevance row = relevance.row(i, num_candidates);
        RowTally tally;
        for_row_parts(row, pieces.begin(piece), pieces.end(piece),
                      [&](int64_t part_begin, int64_t part_end) {
                        add_row_candidates<decltype(dense)::value, decltype(ignore)::value>(
                            row_scores, row, part_begin, part_end, grid, q, acc.data(), tally);
                      });
        double* sums = split ? piece_sums.data() + piece * 2 * q : row_sums.data();
        for (int64_t c = 0; c < 2; ++c) {
          for (int64_t k = 0; k < q; ++k) {
            double sum = 0.0;
            for (int64_t lane = 0; lane < kLanes; ++lane) sum += acc[(lane * 2 + c) * q + k];
            sums[c * q + k] = sum;
          }
        }
        if (split) {
          piece_tallies[piece] = tally;
        } else {
          write_row_histograms(sums, tally, q, n_out + i * q, p_out + i * q, positives_out + i);
        }
      }
    });
  });
  if (!split) return;
  at::parallel_for(0, in.num_queries(), 1, [&](int64_t begin, int64_t end) {
    std::vector<double> row_sums(2 * q);
    for (int64_t i = begin; i < end; ++i) {
      std::fill(row_sums.begin(), row_sums.end(), 0.0);
      RowTally tally;
      for (int64_t piece = i * pieces.per_row; piece < (i + 1) * pieces.per_row; ++piece) {
        const double* sums = piece_sums.data() + piece * 2 * q;
        for (int64_t e = 0; e < 2 * q; ++e) row_sums[e] += sums[e];
        tally.positives += piece_tallies[piece].positives;
        tally.poisoned |= piece_tallies[piece].poisoned;
      }
      write_row_histograms(row_sums.data(), tally, q, n_out + i * q, p_out + i * q,
                           positives_out + i);
    }
  });
}

// One row's slope table for the backward, laid out for row_candidate_gradients: for each class
// (non-positives, then positives) its Q - 1 slopes (see backward_slope_table), then 0 (for a
// candidate off the slopes or not counted) and NaN (for a non-finite score that counts). So
// every candidate's gradient is one entry: where it falls within its class's Q + 1, plus Q + 1
// for a positive. The entries are held in the gradient's dtype (grad_t), rounded once per row
// rather than once per candidate (float16/bfloat16 gradients: 2 (Q + 1) roundings, not M).
template <typename grad_t, typename hist_t>
struct ExtendedSlopes {
  std::vector<grad_t> entries;
  int32_t zero;         // Q - 1, within a class
  int32_t nan;          // Q
  int32_t class_width;  // Q + 1

  explicit ExtendedSlopes(int64_t num_bins)
      : entries(2 * (num_bins + 1)),
        zero(static_cast<int32_t>(num_bins - 1)),
        nan(static_cast<int32_t>(num_bins)),
        class_width(static_cast<int32_t>(num_bins + 1)) {
    for (int32_t c = 0; c < 2; ++c) {
      entries[c * class_width + zero] = static_cast<grad_t>(hist_t(0));
      entries[c * class_width + nan] = static_cast<grad_t>(std::numeric_limits<hist_t>::quiet_NaN());
    }
  }
  // One row's slopes, from its incoming gradients grad_n and grad_p (Q each): those of
  // backward_slope_table, computed here rather than read from an N x 2 x (Q - 1) table, whose
  // four passes over N x Q tensors were most of the backward where M is near Q (N = 10^6,
  // M = 16, Q = 20: 147 ms with the table, 43 ms without; benchmarks/RESULTS.md).
  void load(const hist_t* grad_n, const hist_t* grad_p, const BinGrid<hist_t>& grid) {
    const int32_t num_slopes = class_width - 2;  // Q - 1
    grad_t* negatives = entries.data();
    grad_t* positives = entries.data() + class_width;
    hist_t g_pos = grad_n[0] + grad_p[0];  // a positive's gradient by its bin
    for (int32_t k = 0; k < num_slopes; ++k) {
      const hist_t g_pos_next = grad_n[k + 1] + grad_p[k + 1];
      negatives[k] = static_cast<grad_t>(grid.slope(grad_n[k], grad_n[k + 1]));
      positives[k] = static_cast<grad_t>(grid.slope(g_pos, g_pos_next));
      g_pos = g_pos_next;
    }
  }
};

// dL/ds of candidates [begin, end) of a row, none of them the query itself, into `grad`: in
// blocks of kBlock candidates, two passes. The first decides where each candidate falls within
// its class's part of the extended slope table with no branch, which the compiler turns into
// vector instructions for every dtype (GCC 12: packed compares, subtractions and products, float64
// included); the second adds the class and copies the entry out.
// That is score_gradient (and 0 for an ignored candidate) with its decisions taken out of the
// lookups.
template <bool kDense, bool kIgnore, typename scalar_t, typename hist_t>
void row_candidate_gradients(const scalar_t* scores, const RowRelevance& row, int64_t begin,
                             int64_t end, const BinGrid<hist_t>& grid,
                             const ExtendedSlopes<scalar_t, hist_t>& slopes, scalar_t* grad) {
  int32_t within_class[kBlock];
  const int32_t zero = slopes.zero;
  const int32_t nan = slopes.nan;
  const int32_t class_width = slopes.class_width;
  const scalar_t* table = slopes.entries.data();
  for (int64_t start = begin; start < end; start += kBlock) {
    const int64_t count = std::min(kBlock, end - start);
    const scalar_t* block_scores = scores + start;
    const RowRelevance part = row.window(start, count);
    for (int64_t o = 0; o < count; ++o) {
      const hist_t s = widen(block_scores[o]);
      const BinPosition<hist_t> pos = grid.locate(s);
      // (grid.sloped rather than pos.sloped: GCC does not vectorise the loop with the latter)
      int32_t entry = grid.sloped(s, pos.frac) ? pos.bin : zero;
      entry = is_finite(s) ? entry : nan;
      // (kIgnore: the row has a mask, so its byte is read with no test of the pointer, which
      // GCC would otherwise leave in the float16 loop as a branch that stops vectorisation)
      if constexpr (kIgnore) entry = part.ignore_row[o] != 0 ? zero : entry;
      within_class[o] = entry;
    }
    scalar_t* block_grad = grad + start;
    for (int64_t o = 0; o < count; ++o) {
      const int32_t entry = within_class[o] + (part.positive<kDense>(o) ? class_width : 0);
      block_grad[o] = table[entry];
    }
  }
}

// Backward: at::parallel_for over the pieces of the rows (RowPieces); each candidate is one lookup
// in its row's slopes (ExtendedSlopes, from the row's grad_n and grad_p). No accumulation, so
// trivially deterministic.
template <typename scalar_t, typename hist_t>
void histogram_backward_rows(const HistogramInputs& in, const hist_t* grad_n,
                             const hist_t* grad_p, scalar_t* grad_out) {
  const int64_t num_candidates = in.num_candidates();
  const int64_t q = in.num_bins;
  const BinGrid<hist_t> grid(in.lo, in.hi, q);
  const RelevanceArgs relevance = in.relevance_args();
  const scalar_t* scores = in.scores.const_data_ptr<scalar_t>();
  const RowPieces pieces(num_candidates, q);
  const int64_t num_pieces = in.num_queries() * pieces.per_row;

  with_relevance_form(relevance, [&](auto dense, auto ignore) {
    at::parallel_for(0, num_pieces, pieces.grain(), [&](int64_t first, int64_t last) {
      ExtendedSlopes<scalar_t, hist_t> slopes(in.num_bins);
      int64_t loaded = -1;  // the row whose slopes are loaded
      for (int64_t piece = first; piece < last; ++piece) {
        const int64_t i = piece / pieces.per_row;
        if (i != loaded) slopes.load(grad_n + i * q, grad_p + i * q, grid);
        loaded = i;
        const scalar_t* row_scores = scores + i * num_candidates;
        scalar_t* row_grad = grad_out + i * num_candidates;
        const RowRelevance row = relevance.row(i, num_candidates);
        const int64_t begin = pieces.begin(piece);
        const int64_t end = pieces.end(piece);
        const int64_t own = own_column_in(row, begin, end);
        if (own < end) row_grad[own] = scalar_t(0);
        for_row_parts(row, begin, end, [&](int64_t part_begin, int64_t part_end) {
          row_candidate_gradients<decltype(dense)::value, decltype(ignore)::value>(
              row_scores, row, part_begin, part_end, grid, slopes, row_grad);
        });
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> soft_histogram_cpu(
    const at::Tensor& scores, const std::optional<at::Tensor>& relevance,
    const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& ref_labels,
    const std::optional<at::Tensor>& ignore, bool exclude_self, int64_t num_bins, double lo,
    double hi, int64_t self_offset) {
  const HistogramInputs in = check_histogram_inputs(scores, relevance, labels, ref_labels, ignore,
                                                    exclude_self, num_bins, lo, hi, self_offset);
  at::Tensor n, p, positives;  // (not a structured binding: the lambda below captures them)
  std::tie(n, p, positives) = in.empty_histograms(empty_on_huge_pages);
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
  check_histogram_grads(in.scores, in.num_queries(), in.num_bins, grad_n, grad_p);
  // The rows' slopes are computed from these, in the histogram dtype (ExtendedSlopes::load).
  const at::Tensor g_n = grad_n.to(in.histogram_dtype()).contiguous();
  const at::Tensor g_p = grad_p.to(in.histogram_dtype()).contiguous();
  at::Tensor grad_scores = empty_on_huge_pages(in.scores.sizes(), in.scores.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scores.scalar_type(),
                                  "fastap_soft_histogram_backward_cpu", [&] {
    using hist_t = histogram_t<scalar_t>;
    histogram_backward_rows<scalar_t, hist_t>(in, g_n.const_data_ptr<hist_t>(),
                                              g_p.const_data_ptr<hist_t>(),
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
