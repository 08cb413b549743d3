// CPU kernels of fastap::ap_from_histograms and fastap::ap_from_histograms_backward: the row
// formula of ../ap_formula.h over the query rows.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <tuple>

#include "../ap_formula.h"
#include "../ap_inputs.h"
#include "huge_pages.h"

namespace fastap {
namespace {

// Rows per parallel task: a few thousand bins' work.
int64_t rows_grain(int64_t num_bins) {
  return std::max<int64_t>(1, 4096 / std::max<int64_t>(1, num_bins));
}

at::Tensor ap_from_histograms_cpu(const at::Tensor& n, const at::Tensor& p,
                                  const at::Tensor& positives, std::string variant) {
  const ApInputs in = check_ap_inputs(n, p, positives, variant);
  at::Tensor ap = at::empty({in.num_queries()}, in.n.options());
  const int64_t q = in.num_bins();
  AT_DISPATCH_FLOATING_TYPES(in.n.scalar_type(), "fastap_ap_from_histograms_cpu", [&] {
    const scalar_t* n_data = in.n.const_data_ptr<scalar_t>();
    const scalar_t* p_data = in.p.const_data_ptr<scalar_t>();
    const int64_t* counts = in.positives.const_data_ptr<int64_t>();
    scalar_t* out = ap.data_ptr<scalar_t>();
    at::parallel_for(0, in.num_queries(), rows_grain(q), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        out[i] = ap_row(n_data + i * q, p_data + i * q, q, counts[i], in.variant);
      }
    });
  });
  return ap;
}

std::tuple<at::Tensor, at::Tensor> ap_from_histograms_backward_cpu(
    const at::Tensor& grad_ap, const at::Tensor& n, const at::Tensor& p,
    const at::Tensor& positives, std::string variant) {
  const ApInputs in = check_ap_inputs(n, p, positives, variant, grad_ap);
  at::Tensor grad_n = empty_on_huge_pages(in.n.sizes(), in.n.options());
  at::Tensor grad_p = empty_on_huge_pages(in.p.sizes(), in.p.options());
  const int64_t q = in.num_bins();
  AT_DISPATCH_FLOATING_TYPES(in.n.scalar_type(), "fastap_ap_from_histograms_backward_cpu", [&] {
    const scalar_t* n_data = in.n.const_data_ptr<scalar_t>();
    const scalar_t* p_data = in.p.const_data_ptr<scalar_t>();
    const int64_t* counts = in.positives.const_data_ptr<int64_t>();
    const scalar_t* g = in.grad_ap.const_data_ptr<scalar_t>();
    scalar_t* gn = grad_n.data_ptr<scalar_t>();
    scalar_t* gp = grad_p.data_ptr<scalar_t>();
    at::parallel_for(0, in.num_queries(), rows_grain(q), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        ap_row_backward(g[i], n_data + i * q, p_data + i * q, q, counts[i], in.variant,
                        gn + i * q, gp + i * q);
      }
    });
  });
  return {grad_n, grad_p};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastap, CPU, m) {
  m.impl("ap_from_histograms", &ap_from_histograms_cpu);
  m.impl("ap_from_histograms_backward", &ap_from_histograms_backward_cpu);
}

}  // namespace fastap
