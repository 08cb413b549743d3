// CUDA launchers of fastap::embedding_histogram and fastap::embedding_histogram_backward (the
// kernels are in embedding_kernels.cuh, the work split in launch_plan.h, the torch side in
// cuda_ops.cpp).
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../binning.h"
#include "embedding_kernels.cuh"
#include "launch_kernel.cuh"
#include "launch_plan.h"
#include "launchers.h"
#include "soft_histogram_kernels.cuh"  // soft_histogram_finalize_kernel

namespace fastap {
namespace {

using embedding::SharedLayout;

// The CUDA type of the kernels for an embedding type of the interface (the same layout).
template <typename scalar_t>
struct MatrixType {
  using type = float;
};
template <>
struct MatrixType<c10::BFloat16> {
  using type = __nv_bfloat16;
};
template <>
struct MatrixType<c10::Half> {
  using type = __half;
};

// The kernel of each op for one call: the wgmma one where asked (wgmma_can_serve), else WMMA.
template <typename T>
auto embedding_forward_kernel(bool wgmma) {
#ifdef FASTAP_BUILD_WGMMA
  if constexpr (!std::is_same_v<T, float>) {
    if (wgmma) return embedding::embedding_histogram_kernel<T, true>;
  }
#endif
  (void)wgmma;
  return embedding::embedding_histogram_kernel<T>;
}
template <typename T>
auto embedding_backward_kernel(bool own_is_query, bool wgmma) {
#ifdef FASTAP_BUILD_WGMMA
  if constexpr (!std::is_same_v<T, float>) {
    if (wgmma) {
      return own_is_query ? embedding::embedding_histogram_backward_kernel<T, true, true>
                          : embedding::embedding_histogram_backward_kernel<T, false, true>;
    }
  }
#endif
  (void)wgmma;
  return own_is_query ? embedding::embedding_histogram_backward_kernel<T, true>
                      : embedding::embedding_histogram_backward_kernel<T, false>;
}

template <typename T, typename scalar_t>
const T* as_matrix(const scalar_t* data) {
  static_assert(sizeof(T) == sizeof(scalar_t), "the kernels' type has the layout of the dtype");
  return reinterpret_cast<const T*>(data);
}

}  // namespace

// The wgmma kernels (score_tile_wgmma) are compiled only into builds whose architectures include
// 9.0a (setup.py then defines FASTAP_BUILD_WGMMA); every other build is as if they did not exist.
bool built_with_wgmma() {
#ifdef FASTAP_BUILD_WGMMA
  return true;
#else
  return false;
#endif
}

#ifndef FASTAP_HOST_EMULATION
#ifdef FASTAP_BUILD_WGMMA
// 1 in a kernel image built for sm_90a (wgmma.cuh's FASTAP_HAS_WGMMA), 0 in any other: read from
// the image that the device loaded, which is the one its kernels run.
#ifdef FASTAP_HAS_WGMMA
__device__ int image_has_wgmma = 1;
#else
__device__ int image_has_wgmma = 0;
#endif
#endif

cudaError_t copy_image_has_wgmma(int* has_wgmma, cudaStream_t stream) {
#ifdef FASTAP_BUILD_WGMMA
  return cudaMemcpyFromSymbolAsync(has_wgmma, image_has_wgmma, sizeof(int), 0,
                                   cudaMemcpyDeviceToHost, stream);
#else
  (void)stream;
  *has_wgmma = 0;
  return cudaSuccess;
#endif
}
#endif

template <typename scalar_t>
size_t embedding_shared_bytes(int64_t depth, bool backward, int64_t num_bins) {
  const SharedLayout<typename MatrixType<scalar_t>::type> layout(depth, backward);
  return backward ? layout.backward_bytes() : layout.forward_bytes(num_bins);
}

template <typename scalar_t>
cudaError_t launch_embedding_histogram(const scalar_t* queries, const scalar_t* database,
                                       const int64_t* labels, const int64_t* ref_labels,
                                       int64_t num_queries, int64_t num_database, int64_t depth,
                                       bool exclude_self, int64_t self_offset,
                                       const BinGrid<float>& grid, const EmbeddingPlan& plan,
                                       bool wgmma, int max_shared, float* n, float* p,
                                       int64_t* positives, float* partial_hist,
                                       int64_t* partial_positives, cudaStream_t stream) {
  using T = typename MatrixType<scalar_t>::type;
  if (wgmma && !wgmma_can_serve(!std::is_same_v<T, float>, depth)) return cudaErrorInvalidValue;
  if (num_queries == 0) return cudaSuccess;
  const int64_t num_bins = int64_t{grid.last_bin} + 1;
  const auto kernel = embedding_forward_kernel<T>(wgmma);
  cudaError_t error =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, max_shared);
  if (error != cudaSuccess) return error;
  const bool partial = plan.splits > 1;
  error = launch_kernel(
      kernel, dim3(static_cast<unsigned>(plan.own_blocks), static_cast<unsigned>(plan.splits)),
      dim3(kEmbeddingThreads), embedding_shared_bytes<scalar_t>(depth, false, num_bins), stream,
      as_matrix<T>(queries), as_matrix<T>(database), labels, ref_labels, num_queries,
      num_database, depth, exclude_self, self_offset, grid, plan.split_length, n, p, positives,
      partial ? partial_hist : nullptr, partial ? partial_positives : nullptr);
  if (error != cudaSuccess || !partial) return error;
  // Each query's partial histograms, summed in split order.
  const int64_t blocks = (num_queries * num_bins + kFinalizeThreads - 1) / kFinalizeThreads;
  return launch_kernel(soft_histogram_finalize_kernel<float>,
                       dim3(static_cast<unsigned>(std::min(blocks, kMaxBlocks))),
                       dim3(kFinalizeThreads), 0, stream, static_cast<const float*>(partial_hist),
                       static_cast<const int64_t*>(partial_positives), num_queries, num_bins,
                       plan.splits, n, p, positives);
}

template <typename scalar_t>
cudaError_t launch_embedding_histogram_backward(
    bool own_is_query, const scalar_t* own, int64_t own_count, const scalar_t* other,
    int64_t other_count, int64_t depth, const int64_t* own_labels, const int64_t* other_labels,
    bool exclude_self, int64_t self_offset, const BinGrid<float>& grid, const float* table,
    const EmbeddingPlan& plan, bool wgmma, int max_shared, scalar_t* grad, float* partial,
    cudaStream_t stream) {
  using T = typename MatrixType<scalar_t>::type;
  if (wgmma && !wgmma_can_serve(!std::is_same_v<T, float>, depth)) return cudaErrorInvalidValue;
  if (own_count == 0 || depth == 0) return cudaSuccess;
  const auto kernel = embedding_backward_kernel<T>(own_is_query, wgmma);
  cudaError_t error =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, max_shared);
  if (error != cudaSuccess) return error;
  const bool partials = plan.splits > 1;
  T* const grad_out = reinterpret_cast<T*>(grad);
  error = launch_kernel(
      kernel,
      dim3(static_cast<unsigned>(plan.own_blocks), static_cast<unsigned>(plan.splits),
           static_cast<unsigned>(plan.depth_blocks)),
      dim3(kEmbeddingThreads), embedding_shared_bytes<scalar_t>(depth, true, 0), stream,
      as_matrix<T>(own), own_count, as_matrix<T>(other), other_count, depth, own_labels,
      other_labels, exclude_self, self_offset, grid, table, plan.split_length, grad_out,
      partials ? partial : nullptr);
  if (error != cudaSuccess || !partials) return error;
  // The partial gradients, summed in split order.
  const int64_t count = own_count * depth;
  const int64_t blocks = (count + 255) / 256;
  return launch_kernel(embedding::sum_partials_kernel<T>,
                       dim3(static_cast<unsigned>(std::min(blocks, kMaxBlocks))), dim3(256), 0,
                       stream, static_cast<const float*>(partial), plan.splits, count, grad_out);
}

#define FASTAP_INSTANTIATE(scalar_t)                                                             \
  template size_t embedding_shared_bytes<scalar_t>(int64_t, bool, int64_t);                     \
  template cudaError_t launch_embedding_histogram<scalar_t>(                                     \
      const scalar_t*, const scalar_t*, const int64_t*, const int64_t*, int64_t, int64_t,       \
      int64_t, bool, int64_t, const BinGrid<float>&, const EmbeddingPlan&, bool, int, float*,   \
      float*, int64_t*, float*, int64_t*, cudaStream_t);                                         \
  template cudaError_t launch_embedding_histogram_backward<scalar_t>(                            \
      bool, const scalar_t*, int64_t, const scalar_t*, int64_t, int64_t, const int64_t*,        \
      const int64_t*, bool, int64_t, const BinGrid<float>&, const float*, const EmbeddingPlan&, \
      bool, int, scalar_t*, float*, cudaStream_t);
FASTAP_INSTANTIATE(float)
FASTAP_INSTANTIATE(c10::BFloat16)
FASTAP_INSTANTIATE(c10::Half)
#undef FASTAP_INSTANTIATE

}  // namespace fastap
