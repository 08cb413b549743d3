// Host-side argument handling shared by the CPU and CUDA implementations of the fastap ops:
// checks (so that a direct torch.ops.fastap call fails with a clear message, not a crash), the
// contiguous copies the kernels read, and the per-row slope table of the CUDA backward.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

#include "binning.h"  // BinGrid, RelevanceArgs, histogram_t

namespace fastap {

// A function that makes an uninitialised contiguous tensor, and at::empty as one.
using EmptyTensor = at::Tensor (*)(at::IntArrayRef sizes, at::TensorOptions options);
at::Tensor plain_empty(at::IntArrayRef sizes, at::TensorOptions options);

// One call's inputs, checked and contiguous.
struct HistogramInputs {
  at::Tensor scores;      // N x M floating point, contiguous
  at::Tensor relevance;   // N x M bool/uint8, or undefined
  at::Tensor labels;      // N int64, or undefined
  at::Tensor ref_labels;  // M int64, or undefined
  at::Tensor ignore;      // N x M bool/uint8, or undefined
  bool exclude_self;
  int64_t self_offset;  // with exclude_self, candidate i + self_offset is query i itself
  int64_t num_bins;
  double lo;
  double hi;

  int64_t num_queries() const { return scores.size(0); }
  int64_t num_candidates() const { return scores.size(1); }
  // The dtype of the histograms and their gradients: fp64 for fp64 scores, fp32 otherwise.
  at::ScalarType histogram_dtype() const;
  // Raw pointers for the kernels (valid while this object lives).
  RelevanceArgs relevance_args() const;
  // The op's outputs, uninitialised, on the scores' device: n and p (N x Q, histogram_dtype; from
  // `empty`) and positives (N, int64).
  std::tuple<at::Tensor, at::Tensor, at::Tensor> empty_histograms(
      EmptyTensor empty = plain_empty) const;
};

// t is a tensor: a None given for a required tensor of a direct op call arrives undefined.
void check_defined(const at::Tensor& t, const char* name);
// t on the device of `like` (the message names both).
void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& like,
                       const char* like_name);
// num_bins in [2, 2^20] and a finite score range with lo < hi. float_grid: the scores are binned
// in float32 (float32, float16 and bfloat16 scores; the fused kernels): lo, hi, hi - lo and the
// bin scale (Q - 1) / (hi - lo) must then be finite in float32 too, or the binning would meet
// infinities where the reference (float64) does not.
void check_bins(int64_t num_bins, double lo, double hi, bool float_grid);
// self_offset >= 0 and, with exclude_self, a candidate i + self_offset for every query i.
void check_self_column(bool exclude_self, int64_t self_offset, int64_t num_queries,
                       int64_t num_candidates);

// Checks every argument (TORCH_CHECK_VALUE / TORCH_CHECK_TYPE name the argument) and makes the
// tensors contiguous. `labels` without `ref_labels` means the candidates are the queries (N == M).
HistogramInputs check_histogram_inputs(const at::Tensor& scores,
                                       const std::optional<at::Tensor>& relevance,
                                       const std::optional<at::Tensor>& labels,
                                       const std::optional<at::Tensor>& ref_labels,
                                       const std::optional<at::Tensor>& ignore, bool exclude_self,
                                       int64_t num_bins, double lo, double hi,
                                       int64_t self_offset);

// Checks grad_n / grad_p (the backward's incoming gradients) against the inputs: num_queries x
// num_bins each, on the device of `like` (TORCH_CHECK_VALUE names the argument).
void check_histogram_grads(const at::Tensor& like, int64_t num_queries, int64_t num_bins,
                           const at::Tensor& grad_n, const at::Tensor& grad_p);

// Checks grad_n / grad_p against the inputs and returns the backward's per-row slope table,
// N x 2 x (Q - 1) in the histogram dtype: table[i][c][k] = (g_c[k] - g_c[k + 1]) / delta with
// g_0 = grad_n (candidates that are not positives) and g_1 = grad_n + grad_p (positives), rounded
// as BinGrid::slope (binning.h) rounds them. dL/ds_ij is then table[i][positive(i, j)][bin(s_ij)]
// where the binning has a slope, else 0. (The CUDA ops build it; the CPU backward computes each
// row's slopes where it uses them.)
at::Tensor backward_slope_table(const HistogramInputs& in, const at::Tensor& grad_n,
                                const at::Tensor& grad_p);
// The same for num_queries rows of num_bins bins on [lo, hi], in `dtype`, on the device of `like`.
at::Tensor backward_slope_table(const at::Tensor& like, int64_t num_queries, int64_t num_bins,
                                double lo, double hi, at::ScalarType dtype,
                                const at::Tensor& grad_n, const at::Tensor& grad_p);

}  // namespace fastap
