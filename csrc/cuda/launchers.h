// The CUDA side of the fastap ops as their torch side (cuda_ops.cpp) calls it: pointers, sizes and
// launch plans in, the CUDA error of the launches out. Neither this header nor the .cu files that
// define these functions include a torch header (but c10's Half and BFloat16, the score types):
// under nvcc, torch's headers cost about 30 s per file, the kernels a few seconds.
//
// The .cu files make their launches through launch_kernel (launch_kernel.cuh), so that
// tests/emulation compiles all three for the CPU too: the launch sequences it runs (kernel choice,
// grid, shared memory, partial results and their sums) are the ones a GPU gets.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstddef>
#include <cstdint>

#ifndef FASTAP_HOST_EMULATION  // (tests/emulation/cuda_host.h has the types of the runtime)
#include <cuda_runtime_api.h>
#endif

#include "../ap_formula.h"  // ApVariant
#include "../binning.h"     // BinGrid, RelevanceArgs, histogram_t
#include "launch_plan.h"

namespace fastap {

// --- ap_formula.cu: the row formula of ../ap_formula.h, one thread per query row ---
// T is float or double; n and p are rows x q, positives and ap rows long.
template <typename T>
cudaError_t launch_ap_rows(const T* n, const T* p, const int64_t* positives, int64_t rows,
                           int64_t q, ApVariant variant, T* ap, cudaStream_t stream);
template <typename T>
cudaError_t launch_ap_rows_backward(const T* grad_ap, const T* n, const T* p,
                                    const int64_t* positives, int64_t rows, int64_t q,
                                    ApVariant variant, T* grad_n, T* grad_p, cudaStream_t stream);

// --- soft_histogram.cu: scores of type double, float, c10::Half or c10::BFloat16 ---
// The histograms of a num_queries x num_candidates score matrix, by `plan` (plan_forward for the
// device's opt-in shared memory, plan.max_shared): n and p (N x Q) and positives (N). Where
// plan.chunks_per_row > 1, through partial_hist (plan.items x 2 x Q) and partial_positives
// (plan.items); else these may be null. A launch has at most max_blocks blocks (the kernels
// stride over the rest; the emulation's tests take fewer).
template <typename scalar_t>
cudaError_t launch_soft_histogram(const scalar_t* scores, const RelevanceArgs& relevance,
                                  const BinGrid<histogram_t<scalar_t>>& grid, int64_t num_queries,
                                  int64_t num_candidates, const ForwardPlan& plan,
                                  histogram_t<scalar_t>* n, histogram_t<scalar_t>* p,
                                  int64_t* positives, histogram_t<scalar_t>* partial_hist,
                                  int64_t* partial_positives, cudaStream_t stream,
                                  int64_t max_blocks = kMaxBlocks);
// The gradient of the scores (N x M, every entry written) from the backward's slope table
// (backward_slope_table: N x 2 x (Q - 1)). At most max_rows_blocks blocks along the rows.
template <typename scalar_t>
cudaError_t launch_soft_histogram_backward(const scalar_t* scores, const RelevanceArgs& relevance,
                                           const BinGrid<histogram_t<scalar_t>>& grid,
                                           int64_t num_queries, int64_t num_candidates,
                                           const histogram_t<scalar_t>* table,
                                           scalar_t* grad_scores, cudaStream_t stream,
                                           int64_t max_rows_blocks = kMaxGridY);

// --- embedding_histogram.cu: embeddings of type float, c10::BFloat16 or c10::Half ---
// Whether this build holds the wgmma kernels (its architectures include 9.0a: setup.py then
// defines FASTAP_BUILD_WGMMA for nvcc).
bool built_with_wgmma();
// Whether the wgmma kernels can serve embeddings of this type and width in this build: bf16 or
// fp16 (sixteen_bit; not float32, nor any other type) with D <= kAccumulatorWidth (the rows held
// resident in shared memory). The device's kernel image must also be sm_90a
// (copy_image_has_wgmma), else they trap.
inline bool wgmma_can_serve(bool sixteen_bit, int64_t depth) {
  return built_with_wgmma() && sixteen_bit && depth <= kAccumulatorWidth;
}
// Copies into *has_wgmma (on `stream`; read it after synchronizing) whether the kernel image that
// the current device loaded was built for sm_90a. Only where built_with_wgmma().
cudaError_t copy_image_has_wgmma(int* has_wgmma, cudaStream_t stream);
// The dynamic shared memory of a fused kernel's block: the forward's for num_bins bins, or the
// backward's.
template <typename scalar_t>
size_t embedding_shared_bytes(int64_t depth, bool backward, int64_t num_bins);
// The histograms of the queries (N x D) against the database (M x D), by `plan`
// (plan_embedding(N, M, D, false)): n and p (N x Q, float32) and positives (N). Where
// plan.splits > 1, through partial_hist (N * splits x 2 x Q) and partial_positives (N * splits);
// else these may be null. wgmma: the products on wgmma, where wgmma_can_serve (else
// cudaErrorInvalidValue), and only where the device's kernel image is sm_90a (the caller's to
// check: copy_image_has_wgmma). max_shared: the device's opt-in limit, which the kernel
// is allowed (the same value on every call, so that concurrent host threads launching other sizes
// cannot undercut each other); its embedding_shared_bytes must fit in it.
template <typename scalar_t>
cudaError_t launch_embedding_histogram(const scalar_t* queries, const scalar_t* database,
                                       const int64_t* labels, const int64_t* ref_labels,
                                       int64_t num_queries, int64_t num_database, int64_t depth,
                                       bool exclude_self, int64_t self_offset,
                                       const BinGrid<float>& grid, const EmbeddingPlan& plan,
                                       bool wgmma, int max_shared, float* n, float* p,
                                       int64_t* positives, float* partial_hist,
                                       int64_t* partial_positives, cudaStream_t stream);
// The gradient of one embedding set, `own` (own_count x D: the queries where own_is_query, else
// the database), against the other (other_count x D), from the slope table (N x 2 x (Q - 1),
// float32), by `plan` (plan_embedding(own_count, other_count, D, true)): grad (own_count x D,
// every entry written), through `partial` (splits x own_count x D, float32) where
// plan.splits > 1, else null. wgmma and max_shared as for the forward.
template <typename scalar_t>
cudaError_t launch_embedding_histogram_backward(
    bool own_is_query, const scalar_t* own, int64_t own_count, const scalar_t* other,
    int64_t other_count, int64_t depth, const int64_t* own_labels, const int64_t* other_labels,
    bool exclude_self, int64_t self_offset, const BinGrid<float>& grid, const float* table,
    const EmbeddingPlan& plan, bool wgmma, int max_shared, scalar_t* grad, float* partial,
    cudaStream_t stream);

}  // namespace fastap
