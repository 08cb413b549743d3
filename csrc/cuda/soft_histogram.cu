// CUDA launchers of fastap::soft_histogram and fastap::soft_histogram_backward (the kernels are in
// soft_histogram_kernels.cuh, the work split in launch_plan.h, the torch side in cuda_ops.cpp).
#include <algorithm>
#include <cstdint>

#include "../binning.h"
#include "launch_kernel.cuh"
#include "launch_plan.h"
#include "launchers.h"
#include "soft_histogram_kernels.cuh"

namespace fastap {

template <typename scalar_t>
cudaError_t launch_soft_histogram(const scalar_t* scores, const RelevanceArgs& relevance,
                                  const BinGrid<histogram_t<scalar_t>>& grid, int64_t num_queries,
                                  int64_t num_candidates, const ForwardPlan& plan,
                                  histogram_t<scalar_t>* n, histogram_t<scalar_t>* p,
                                  int64_t* positives, histogram_t<scalar_t>* partial_hist,
                                  int64_t* partial_positives, cudaStream_t stream,
                                  int64_t max_blocks) {
  using acc_t = histogram_t<scalar_t>;
  if (num_queries == 0) return cudaSuccess;
  const bool fast = fast_path_applies(relevance, scores, num_candidates,
                                      ForwardUnit<scalar_t>::kSize, plan.chunk);
  auto kernel = forward_kernel<scalar_t, acc_t>(fast, relevance);
  // The device's whole opt-in limit, the same value on every call: a host thread launching with a
  // larger num_bins cannot be cut short by another that just set a smaller limit.
  cudaError_t error = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(plan.max_shared));
  if (error != cudaSuccess) return error;
  const bool partial = plan.chunks_per_row > 1;
  error = launch_kernel(kernel, dim3(static_cast<unsigned>(std::min(plan.blocks, max_blocks))),
                        dim3(plan.warps_per_block * kWarpSize), plan.shared_bytes, stream, scores,
                        relevance, grid, num_queries, num_candidates, plan.chunk,
                        plan.chunks_per_row, n, p, positives, partial ? partial_hist : nullptr,
                        partial ? partial_positives : nullptr);
  if (error != cudaSuccess || !partial) return error;
  // Each row's partial histograms, summed in chunk order.
  const int64_t num_bins = int64_t{grid.last_bin} + 1;
  const int64_t total = num_queries * num_bins;
  const int64_t blocks = (total + kFinalizeThreads - 1) / kFinalizeThreads;
  return launch_kernel(soft_histogram_finalize_kernel<acc_t>,
                       dim3(static_cast<unsigned>(std::min(blocks, max_blocks))),
                       dim3(kFinalizeThreads), 0, stream,
                       static_cast<const acc_t*>(partial_hist),
                       static_cast<const int64_t*>(partial_positives), num_queries, num_bins,
                       plan.chunks_per_row, n, p, positives);
}

template <typename scalar_t>
cudaError_t launch_soft_histogram_backward(const scalar_t* scores, const RelevanceArgs& relevance,
                                           const BinGrid<histogram_t<scalar_t>>& grid,
                                           int64_t num_queries, int64_t num_candidates,
                                           const histogram_t<scalar_t>* table,
                                           scalar_t* grad_scores, cudaStream_t stream,
                                           int64_t max_rows_blocks) {
  using acc_t = histogram_t<scalar_t>;
  if (num_queries == 0 || num_candidates == 0) return cudaSuccess;  // (an empty grid fails)
  const bool fast = fast_path_applies(relevance, scores, num_candidates,
                                      BackwardUnit<scalar_t>::kSize, /*chunk=*/0, grad_scores);
  const BackwardPlan plan =
      plan_backward(num_queries, num_candidates, backward_columns(fast));
  const dim3 blocks(static_cast<unsigned>(plan.blocks_x),
                    static_cast<unsigned>(std::min(plan.blocks_y, max_rows_blocks)));
  return launch_kernel(backward_kernel<scalar_t, acc_t>(fast, relevance), blocks,
                       dim3(kBackwardThreads), 0, stream, scores, relevance, grid, num_queries,
                       num_candidates, table, grad_scores);
}

#define FASTAP_INSTANTIATE(scalar_t)                                                            \
  template cudaError_t launch_soft_histogram<scalar_t>(                                         \
      const scalar_t*, const RelevanceArgs&, const BinGrid<histogram_t<scalar_t>>&, int64_t,  \
      int64_t, const ForwardPlan&, histogram_t<scalar_t>*, histogram_t<scalar_t>*, int64_t*,  \
      histogram_t<scalar_t>*, int64_t*, cudaStream_t, int64_t);                                \
  template cudaError_t launch_soft_histogram_backward<scalar_t>(                                \
      const scalar_t*, const RelevanceArgs&, const BinGrid<histogram_t<scalar_t>>&, int64_t,  \
      int64_t, const histogram_t<scalar_t>*, scalar_t*, cudaStream_t, int64_t);
FASTAP_INSTANTIATE(double)
FASTAP_INSTANTIATE(float)
FASTAP_INSTANTIATE(c10::Half)
FASTAP_INSTANTIATE(c10::BFloat16)
#undef FASTAP_INSTANTIATE

}  // namespace fastap
