// Host-side argument handling of fastap::ap_from_histograms and its backward, shared by the CPU
// and CUDA implementations: checks that name the argument, and the contiguous copies the kernels
// read. The formula itself is in ap_formula.h.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

#include "ap_formula.h"

namespace fastap {

// One call's inputs, checked: n and p [N, Q] contiguous float32/float64 of one dtype and device;
// positives [N] int64 (as the histogram ops give them: no conversion then; floating counts are
// rounded); grad_ap [N] in the dtype of n (backward only).
struct ApInputs {
  at::Tensor n;
  at::Tensor p;
  at::Tensor positives;
  at::Tensor grad_ap;
  ApVariant variant;

  int64_t num_queries() const { return n.size(0); }
  int64_t num_bins() const { return n.size(1); }
};

ApVariant parse_ap_variant(const std::string& variant);

ApInputs check_ap_inputs(const at::Tensor& n, const at::Tensor& p, const at::Tensor& positives,
                         const std::string& variant);
// The backward's: the forward's and grad_ap [N].
ApInputs check_ap_backward_inputs(const at::Tensor& grad_ap, const at::Tensor& n,
                                  const at::Tensor& p, const at::Tensor& positives,
                                  const std::string& variant);

}  // namespace fastap
