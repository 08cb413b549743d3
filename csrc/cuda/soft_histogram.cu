// CUDA launchers of fastap::soft_histogram and fastap::soft_histogram_backward (the kernels are in
// soft_histogram_kernels.cuh, the work split in launch_plan.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cuda_runtime.h>

#include "../binning.h"
#include "../histogram_inputs.h"
#include "launch_plan.h"
#include "soft_histogram_kernels.cuh"

namespace fastap {
namespace {

// The launch parameters of the forward on the current device (see ForwardPlan).
template <typename acc_t>
ForwardPlan forward_plan(const HistogramInputs& in) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  int max_shared = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_shared, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                        device));
  const ForwardPlan plan = plan_forward(in.num_queries(), in.num_candidates(), in.num_bins,
                                        sizeof(acc_t), static_cast<size_t>(max_shared));
  TORCH_CHECK_VALUE(plan.fits, "fastap: num_bins = ", in.num_bins,
                    " is too large for the CUDA kernel (at most ", plan.max_bins,
                    " bins for this dtype on this GPU)");
  return plan;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> soft_histogram_cuda(
    const at::Tensor& scores, const std::optional<at::Tensor>& relevance,
    const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& ref_labels,
    const std::optional<at::Tensor>& ignore, bool exclude_self, int64_t num_bins, double lo,
    double hi, int64_t self_offset) {
  const HistogramInputs in = check_histogram_inputs(scores, relevance, labels, ref_labels, ignore,
                                                    exclude_self, num_bins, lo, hi, self_offset);
  const c10::cuda::CUDAGuard device_guard(in.scores.device());
  const auto options = in.scores.options().dtype(in.histogram_dtype());
  at::Tensor n = at::empty({in.num_queries(), num_bins}, options);
  at::Tensor p = at::empty({in.num_queries(), num_bins}, options);
  at::Tensor positives = at::empty({in.num_queries()}, options.dtype(at::kLong));
  if (in.num_queries() == 0) return {n, p, positives};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scores.scalar_type(),
                                  "fastap_soft_histogram_cuda", [&] {
    using acc_t = histogram_t<scalar_t>;
    const ForwardPlan plan = forward_plan<acc_t>(in);
    // Rows of several chunks go through partial histograms (allocated on the current stream).
    at::Tensor partial_hist, partial_positives;
    if (plan.chunks_per_row > 1) {
      partial_hist = at::empty({plan.items, 2, num_bins}, options);
      partial_positives = at::empty({plan.items}, options.dtype(at::kLong));
    }
    const RelevanceArgs relevance = in.relevance_args();
    const bool fast = fast_path_applies(relevance, in.scores.const_data_ptr<scalar_t>(),
                                        in.num_candidates(), plan.chunk);
    auto kernel = forward_kernel<scalar_t, acc_t>(fast, relevance);
    // The device's whole opt-in limit, the same value on every call: a host thread launching
    // with a larger num_bins cannot be cut short by another that just set a smaller limit.
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(plan.max_shared)));
    kernel<<<static_cast<unsigned>(plan.blocks), plan.warps_per_block * kWarpSize,
             plan.shared_bytes, stream>>>(
        in.scores.const_data_ptr<scalar_t>(), relevance,
        BinGrid<acc_t>(lo, hi, num_bins), in.num_queries(), in.num_candidates(), plan.chunk,
        plan.chunks_per_row, n.data_ptr<acc_t>(), p.data_ptr<acc_t>(),
        positives.data_ptr<int64_t>(),
        partial_hist.defined() ? partial_hist.data_ptr<acc_t>() : nullptr,
        partial_positives.defined() ? partial_positives.data_ptr<int64_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (plan.chunks_per_row > 1) {
      const int64_t total = in.num_queries() * num_bins;
      const int64_t blocks =
          std::min<int64_t>((total + kFinalizeThreads - 1) / kFinalizeThreads, int64_t{1} << 30);
      soft_histogram_finalize_kernel<acc_t>
          <<<static_cast<unsigned>(blocks), kFinalizeThreads, 0, stream>>>(
              partial_hist.const_data_ptr<acc_t>(), partial_positives.const_data_ptr<int64_t>(),
              in.num_queries(), num_bins, plan.chunks_per_row, n.data_ptr<acc_t>(),
              p.data_ptr<acc_t>(), positives.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {n, p, positives};
}

at::Tensor soft_histogram_backward_cuda(
    const at::Tensor& grad_n, const at::Tensor& grad_p, const at::Tensor& scores,
    const std::optional<at::Tensor>& relevance, const std::optional<at::Tensor>& labels,
    const std::optional<at::Tensor>& ref_labels, const std::optional<at::Tensor>& ignore,
    bool exclude_self, int64_t num_bins, double lo, double hi, int64_t self_offset) {
  const HistogramInputs in = check_histogram_inputs(scores, relevance, labels, ref_labels, ignore,
                                                    exclude_self, num_bins, lo, hi, self_offset);
  const c10::cuda::CUDAGuard device_guard(in.scores.device());
  const at::Tensor table = backward_slope_table(in, grad_n, grad_p);
  at::Tensor grad_scores = at::empty_like(in.scores);
  if (in.scores.numel() == 0) return grad_scores;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scores.scalar_type(),
                                  "fastap_soft_histogram_backward_cuda", [&] {
    using acc_t = histogram_t<scalar_t>;
    const RelevanceArgs relevance = in.relevance_args();
    const bool fast = fast_path_applies(relevance, in.scores.const_data_ptr<scalar_t>(),
                                        in.num_candidates(), /*chunk=*/0);
    const BackwardPlan plan = plan_backward(in.num_queries(), in.num_candidates(),
                                            backward_columns<scalar_t>(fast));
    const dim3 blocks(static_cast<unsigned>(plan.blocks_x), static_cast<unsigned>(plan.blocks_y));
    backward_kernel<scalar_t, acc_t>(fast, relevance)<<<blocks, kBackwardThreads, 0, stream>>>(
        in.scores.const_data_ptr<scalar_t>(), relevance,
        BinGrid<acc_t>(lo, hi, num_bins), in.num_queries(), in.num_candidates(),
        table.const_data_ptr<acc_t>(), grad_scores.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_scores;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastap, CUDA, m) {
  m.impl("soft_histogram", &soft_histogram_cuda);
  m.impl("soft_histogram_backward", &soft_histogram_backward_cuda);
}

}  // namespace fastap
