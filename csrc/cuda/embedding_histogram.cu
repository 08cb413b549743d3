// CUDA launchers of fastap::embedding_histogram and fastap::embedding_histogram_backward (the
// kernels are in embedding_kernels.cuh, the work split in launch_plan.h).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <cuda_runtime.h>

#include "../binning.h"
#include "../histogram_inputs.h"
#include "embedding_kernels.cuh"
#include "launch_plan.h"
#include "soft_histogram_kernels.cuh"

namespace fastap {
namespace {

using embedding::SharedLayout;

// The wgmma forward (score_tile_wgmma) is compiled only into builds whose architectures include
// 9.0a (setup.py then defines FASTAP_BUILD_WGMMA); every other build is as if it did not exist.
#ifdef FASTAP_BUILD_WGMMA
// 1 in a kernel image built for sm_90a (wgmma.cuh's FASTAP_HAS_WGMMA), 0 in any other: read from
// the image that the device loaded, which is the one its kernels run.
#ifdef FASTAP_HAS_WGMMA
__device__ int image_has_wgmma = 1;
#else
__device__ int image_has_wgmma = 0;
#endif
#endif

// Whether the fused kernels compute their products with wgmma (score_tile_wgmma, and the
// backward's gradient product) rather than WMMA:
// only on request (FASTAP_WGMMA=1: the path has not been measured on a GPU yet), for bf16/fp16
// with D <= kAccumulatorWidth, where the current device's kernel image was built for sm_90a
// (FASTAP_CUDA_ARCH=9.0a); otherwise WMMA, as without the request. Asking the image costs one
// copy, once per device and process (the caller holds a guard of `device`). That first call may
// come while a CUDA graph is being captured (torch.compile's "reduce-overhead" mode), where a
// synchronous copy on the legacy stream would break the capture: the copy goes on a stream of its
// own, outside the capture, with this thread's capture mode relaxed for it, as torch's caching
// allocator does for its cudaMalloc.
bool use_wgmma(at::ScalarType dtype, int64_t depth, int device) {
#ifndef FASTAP_BUILD_WGMMA
  return false;
#else
  const char* request = std::getenv("FASTAP_WGMMA");
  if (request == nullptr || std::strcmp(request, "1") != 0) return false;
  if (dtype == at::kFloat || depth > kAccumulatorWidth) return false;
  static std::mutex mutex;
  static int known[64];  // 0 unknown, 1 no, 2 yes
  const std::lock_guard<std::mutex> lock(mutex);
  if (device < 0 || device >= 64) return false;
  if (known[device] == 0) {
    const c10::cuda::CUDAStreamCaptureModeGuard relaxed(cudaStreamCaptureModeRelaxed);
    cudaStream_t probe = nullptr;
    C10_CUDA_CHECK(cudaStreamCreateWithFlags(&probe, cudaStreamNonBlocking));
    int value = 0;
    const cudaError_t copied = cudaMemcpyFromSymbolAsync(&value, image_has_wgmma, sizeof(value),
                                                         0, cudaMemcpyDeviceToHost, probe);
    const cudaError_t synced = cudaStreamSynchronize(probe);
    C10_CUDA_CHECK(cudaStreamDestroy(probe));
    C10_CUDA_CHECK(copied);
    C10_CUDA_CHECK(synced);
    known[device] = value != 0 ? 2 : 1;
  }
  return known[device] == 2;
#endif
}

struct EmbeddingInputs {
  at::Tensor queries;     // N x D, contiguous
  at::Tensor database;    // M x D, contiguous, dtype of queries
  at::Tensor labels;      // N int64
  at::Tensor ref_labels;  // M int64
  int64_t depth;
};

EmbeddingInputs check_embedding_inputs(const at::Tensor& queries, const at::Tensor& database,
                                       const at::Tensor& labels, const at::Tensor& ref_labels,
                                       bool exclude_self, int64_t self_offset, int64_t num_bins,
                                       double lo, double hi) {
  TORCH_CHECK_VALUE(queries.dim() == 2 && database.dim() == 2,
                    "fastap: queries and database must be 2-D, got shapes ", queries.sizes(),
                    " and ", database.sizes());
  TORCH_CHECK_VALUE(queries.size(1) == database.size(1),
                    "fastap: queries and database must have the same dimension, got ",
                    queries.sizes(), " and ", database.sizes());
  const auto dtype = queries.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                   "fastap: the fused embedding kernel takes float32, bfloat16 or float16, got ",
                   dtype);
  TORCH_CHECK_TYPE(database.scalar_type() == dtype, "fastap: database must have the dtype of "
                   "queries (", dtype, "), got ", database.scalar_type());
  for (const auto* t : {&database, &labels, &ref_labels}) {
    TORCH_CHECK_VALUE(t->device() == queries.device(), "fastap: every input must be on ",
                      queries.device(), ", got one on ", t->device());
  }
  TORCH_CHECK_TYPE(labels.scalar_type() == at::kLong && ref_labels.scalar_type() == at::kLong,
                   "fastap: labels and ref_labels must be int64");
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == queries.size(0),
                    "fastap: labels must have one entry per query, got shape ", labels.sizes());
  TORCH_CHECK_VALUE(ref_labels.dim() == 1 && ref_labels.size(0) == database.size(0),
                    "fastap: ref_labels must have one entry per database row, got shape ",
                    ref_labels.sizes());
  check_bins(num_bins, lo, hi, /*float_grid=*/true);
  check_self_column(exclude_self, self_offset, queries.size(0), database.size(0));
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor,
                                        queries.get_device()));
  TORCH_CHECK_VALUE(major >= 8, "fastap: the fused embedding kernel needs a GPU of compute "
                    "capability 8.0 or newer (bf16 / TF32 tensor cores), got ", major, ".x");
  return {queries.contiguous(), database.contiguous(), labels.contiguous(),
          ref_labels.contiguous(), queries.size(1)};
}

// Allows `kernel` the device's whole opt-in dynamic shared memory (the same value on every call,
// so that concurrent host threads with other sizes cannot undercut each other), or says that the
// `bytes` it needs for num_bins are too many.
template <typename Kernel>
void allow_shared(Kernel kernel, size_t bytes, int64_t num_bins) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  int max_shared = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_shared, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                        device));
  TORCH_CHECK_VALUE(bytes <= static_cast<size_t>(max_shared), "fastap: num_bins = ", num_bins,
                    " is too large for the fused embedding kernel on this GPU (it needs ", bytes,
                    " bytes of shared memory per block, the GPU has ", max_shared, ")");
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      max_shared));
}

// The CUDA type of the kernels for a torch dtype (same layout as c10's).
template <typename F>
void dispatch_matrix_type(at::ScalarType dtype, F&& f) {
  if (dtype == at::kFloat) {
    f(float{});
  } else if (dtype == at::kBFloat16) {
    f(__nv_bfloat16{});
  } else {
    f(__half{});
  }
}

template <typename T>
const T* data_of(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> embedding_histogram_cuda(
    const at::Tensor& queries, const at::Tensor& database, const at::Tensor& labels,
    const at::Tensor& ref_labels, bool exclude_self, int64_t self_offset, int64_t num_bins,
    double lo, double hi) {
  const c10::cuda::CUDAGuard device_guard(queries.device());
  const EmbeddingInputs in = check_embedding_inputs(queries, database, labels, ref_labels,
                                                    exclude_self, self_offset, num_bins, lo, hi);
  const int64_t n = in.queries.size(0);
  const int64_t m = in.database.size(0);
  const auto options = in.queries.options().dtype(at::kFloat);
  at::Tensor n_out = at::empty({n, num_bins}, options);
  at::Tensor p_out = at::empty({n, num_bins}, options);
  at::Tensor positives = at::empty({n}, options.dtype(at::kLong));
  if (n == 0) return {n_out, p_out, positives};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const EmbeddingPlan plan = plan_embedding(n, m, in.depth, /*backward=*/false);
  at::Tensor partial_hist, partial_positives;
  if (plan.splits > 1) {
    partial_hist = at::empty({n * plan.splits, 2, num_bins}, options);
    partial_positives = at::empty({n * plan.splits}, options.dtype(at::kLong));
  }
  const bool wgmma = use_wgmma(in.queries.scalar_type(), in.depth, queries.get_device());
  dispatch_matrix_type(in.queries.scalar_type(), [&](auto zero) {
    using T = decltype(zero);
    auto kernel = embedding::embedding_histogram_kernel<T>;
#ifdef FASTAP_BUILD_WGMMA
    if constexpr (!std::is_same_v<T, float>) {
      if (wgmma) kernel = embedding::embedding_histogram_kernel<T, true>;
    }
#endif
    const size_t shared = SharedLayout<T>(in.depth, /*backward=*/false).forward_bytes(num_bins);
    allow_shared(kernel, shared, num_bins);
    const dim3 grid(static_cast<unsigned>(plan.own_blocks), static_cast<unsigned>(plan.splits));
    kernel<<<grid, kEmbeddingThreads, shared, stream>>>(
        data_of<T>(in.queries), data_of<T>(in.database), in.labels.const_data_ptr<int64_t>(),
        in.ref_labels.const_data_ptr<int64_t>(), n, m, in.depth, exclude_self, self_offset,
        BinGrid<float>(lo, hi, num_bins), plan.split_length, n_out.data_ptr<float>(),
        p_out.data_ptr<float>(), positives.data_ptr<int64_t>(),
        partial_hist.defined() ? partial_hist.data_ptr<float>() : nullptr,
        partial_positives.defined() ? partial_positives.data_ptr<int64_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  if (plan.splits > 1) {
    const int64_t total = n * num_bins;
    const int64_t blocks =
        std::min<int64_t>((total + kFinalizeThreads - 1) / kFinalizeThreads, int64_t{1} << 30);
    soft_histogram_finalize_kernel<float>
        <<<static_cast<unsigned>(blocks), kFinalizeThreads, 0, stream>>>(
            partial_hist.const_data_ptr<float>(), partial_positives.const_data_ptr<int64_t>(), n,
            num_bins, plan.splits, n_out.data_ptr<float>(), p_out.data_ptr<float>(),
            positives.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {n_out, p_out, positives};
}

// The gradient of one embedding set (own) against the other (stream).
template <typename T, bool kOwnIsQuery>
void launch_backward(const at::Tensor& own, const at::Tensor& stream, const at::Tensor& own_labels,
                     const at::Tensor& stream_labels, bool exclude_self, int64_t self_offset,
                     const BinGrid<float>& grid, const at::Tensor& table, int64_t num_bins,
                     const at::Tensor& grad, cudaStream_t cuda_stream) {
  const int64_t own_count = own.size(0);
  const int64_t stream_count = stream.size(0);
  const int64_t depth = own.size(1);
  if (own_count == 0 || depth == 0) return;
  const EmbeddingPlan plan = plan_embedding(own_count, stream_count, depth, /*backward=*/true);
  at::Tensor partial;
  if (plan.splits > 1) {
    partial = at::empty({plan.splits, own_count, depth}, own.options().dtype(at::kFloat));
  }
  auto kernel = embedding::embedding_histogram_backward_kernel<T, kOwnIsQuery>;
#ifdef FASTAP_BUILD_WGMMA
  if constexpr (!std::is_same_v<T, float>) {
    if (use_wgmma(own.scalar_type(), depth, own.get_device())) {
      kernel = embedding::embedding_histogram_backward_kernel<T, kOwnIsQuery, true>;
    }
  }
#endif
  const size_t shared = SharedLayout<T>(depth, /*backward=*/true).backward_bytes();
  allow_shared(kernel, shared, num_bins);
  const dim3 blocks(static_cast<unsigned>(plan.own_blocks), static_cast<unsigned>(plan.splits),
                    static_cast<unsigned>(plan.depth_blocks));
  kernel<<<blocks, kEmbeddingThreads, shared, cuda_stream>>>(
      data_of<T>(own), own_count, data_of<T>(stream), stream_count, depth,
      own_labels.const_data_ptr<int64_t>(), stream_labels.const_data_ptr<int64_t>(), exclude_self,
      self_offset, grid, table.const_data_ptr<float>(), plan.split_length,
      reinterpret_cast<T*>(grad.data_ptr()),
      partial.defined() ? partial.data_ptr<float>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (plan.splits > 1) {
    const int64_t count = own_count * depth;
    const int64_t sum_blocks = std::min<int64_t>((count + 255) / 256, int64_t{1} << 30);
    embedding::sum_partials_kernel<T><<<static_cast<unsigned>(sum_blocks), 256, 0, cuda_stream>>>(
        partial.const_data_ptr<float>(), plan.splits, count, reinterpret_cast<T*>(grad.data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::tuple<at::Tensor, at::Tensor> embedding_histogram_backward_cuda(
    const at::Tensor& grad_n, const at::Tensor& grad_p, const at::Tensor& queries,
    const at::Tensor& database, const at::Tensor& labels, const at::Tensor& ref_labels,
    bool exclude_self, int64_t self_offset, int64_t num_bins, double lo, double hi) {
  const c10::cuda::CUDAGuard device_guard(queries.device());
  const EmbeddingInputs in = check_embedding_inputs(queries, database, labels, ref_labels,
                                                    exclude_self, self_offset, num_bins, lo, hi);
  const at::Tensor table = backward_slope_table(in.queries, in.queries.size(0), num_bins, lo, hi,
                                                at::kFloat, grad_n, grad_p);
  at::Tensor grad_queries = at::empty_like(in.queries);
  at::Tensor grad_database = at::empty_like(in.database);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (in.queries.size(0) == 0 || in.database.size(0) == 0) {
    grad_queries.zero_();
    grad_database.zero_();
    return {grad_queries, grad_database};
  }
  const BinGrid<float> grid(lo, hi, num_bins);
  dispatch_matrix_type(in.queries.scalar_type(), [&](auto zero) {
    using T = decltype(zero);
    launch_backward<T, true>(in.queries, in.database, in.labels, in.ref_labels, exclude_self,
                             self_offset, grid, table, num_bins, grad_queries, stream);
    launch_backward<T, false>(in.database, in.queries, in.ref_labels, in.labels, exclude_self,
                              self_offset, grid, table, num_bins, grad_database, stream);
  });
  return {grad_queries, grad_database};
}

bool embedding_histogram_uses_wgmma_cuda(const at::Tensor& queries) {
  TORCH_CHECK_VALUE(queries.dim() == 2, "fastap: queries must be 2-D, got shape ",
                    queries.sizes());
  const c10::cuda::CUDAGuard device_guard(queries.device());
  return use_wgmma(queries.scalar_type(), queries.size(1), queries.get_device());
}

}  // namespace

TORCH_LIBRARY_IMPL(fastap, CUDA, m) {
  m.impl("embedding_histogram", &embedding_histogram_cuda);
  m.impl("embedding_histogram_backward", &embedding_histogram_backward_cuda);
  m.impl("embedding_histogram_uses_wgmma", &embedding_histogram_uses_wgmma_cuda);
}

}  // namespace fastap
