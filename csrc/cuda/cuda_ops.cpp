// The CUDA implementations of the fastap ops as torch sees them: checks, outputs and scratch
// buffers, the device, stream and launch plan, then the launchers of launchers.h (compiled by nvcc
// from the .cu files beside this one, which include no torch header). Compiled by the host
// compiler, like the C++ sources, in CUDA builds only.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <mutex>
#include <string>
#include <tuple>

#include "../ap_inputs.h"
#include "../binning.h"
#include "../environment.h"
#include "../histogram_inputs.h"
#include "launch_plan.h"
#include "launchers.h"

namespace fastap {
namespace {

// The current device's opt-in limit of dynamic shared memory per block.
int max_shared_per_block() {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  int max_shared = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_shared, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                        device));
  return max_shared;
}

// C10_CUDA_CHECK of a launcher's error (its exception type, its note on errors of earlier
// kernels that surface late, the error cleared), with a line of context that names the op and
// the sizes (and plan) it launched with: the check alone says only "invalid argument" and a line
// of this file.
template <typename... Details>
void check_launch(cudaError_t error, const char* op, const Details&... details) {
  if (error == cudaSuccess) return;
  try {
    C10_CUDA_CHECK(error);
  } catch (c10::Error& e) {
    e.add_context(c10::str("fastap: while launching ", op, ": ", details...));
    throw;
  }
}

// --- ap_from_histograms ---

at::Tensor ap_from_histograms_cuda(const at::Tensor& n, const at::Tensor& p,
                                   const at::Tensor& positives, std::string variant) {
  const ApInputs in = check_ap_inputs(n, p, positives, variant);
  const c10::cuda::CUDAGuard device_guard(in.n.device());
  at::Tensor ap = at::empty({in.num_queries()}, in.n.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(in.n.scalar_type(), "fastap_ap_from_histograms_cuda", [&] {
    check_launch(launch_ap_rows(in.n.const_data_ptr<scalar_t>(), in.p.const_data_ptr<scalar_t>(),
                                in.positives.const_data_ptr<int64_t>(), in.num_queries(),
                                in.num_bins(), in.variant, ap.data_ptr<scalar_t>(), stream),
                 "ap_from_histograms", "N = ", in.num_queries(), ", Q = ", in.num_bins(), ", ",
                 in.n.scalar_type());
  });
  return ap;
}

std::tuple<at::Tensor, at::Tensor> ap_from_histograms_backward_cuda(
    const at::Tensor& grad_ap, const at::Tensor& n, const at::Tensor& p,
    const at::Tensor& positives, std::string variant) {
  const ApInputs in = check_ap_backward_inputs(grad_ap, n, p, positives, variant);
  const c10::cuda::CUDAGuard device_guard(in.n.device());
  at::Tensor grad_n = at::empty_like(in.n);
  at::Tensor grad_p = at::empty_like(in.p);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(in.n.scalar_type(), "fastap_ap_from_histograms_backward_cuda", [&] {
    check_launch(launch_ap_rows_backward(
                     in.grad_ap.const_data_ptr<scalar_t>(), in.n.const_data_ptr<scalar_t>(),
                     in.p.const_data_ptr<scalar_t>(), in.positives.const_data_ptr<int64_t>(),
                     in.num_queries(), in.num_bins(), in.variant, grad_n.data_ptr<scalar_t>(),
                     grad_p.data_ptr<scalar_t>(), stream),
                 "ap_from_histograms_backward", "N = ", in.num_queries(), ", Q = ",
                 in.num_bins(), ", ", in.n.scalar_type());
  });
  return {grad_n, grad_p};
}

// --- soft_histogram ---

std::tuple<at::Tensor, at::Tensor, at::Tensor> soft_histogram_cuda(
    const at::Tensor& scores, const std::optional<at::Tensor>& relevance,
    const std::optional<at::Tensor>& labels, const std::optional<at::Tensor>& ref_labels,
    const std::optional<at::Tensor>& ignore, bool exclude_self, int64_t num_bins, double lo,
    double hi, int64_t self_offset) {
  const HistogramInputs in = check_histogram_inputs(scores, relevance, labels, ref_labels, ignore,
                                                    exclude_self, num_bins, lo, hi, self_offset);
  const c10::cuda::CUDAGuard device_guard(in.scores.device());
  at::Tensor n, p, positives;  // (not a structured binding: the lambda below captures them)
  std::tie(n, p, positives) = in.empty_histograms();
  if (in.num_queries() == 0) return {n, p, positives};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scores.scalar_type(),
                                  "fastap_soft_histogram_cuda", [&] {
    using acc_t = histogram_t<scalar_t>;
    const ForwardPlan plan =
        plan_forward(in.num_queries(), in.num_candidates(), num_bins, sizeof(acc_t),
                     static_cast<size_t>(max_shared_per_block()));
    TORCH_CHECK_VALUE(plan.fits, "fastap: num_bins = ", num_bins,
                      " is too large for the CUDA kernel (at most ", plan.max_bins,
                      " bins for this dtype on this GPU)");
    // Rows of several chunks go through partial histograms (allocated on the current stream).
    at::Tensor partial_hist, partial_positives;
    if (plan.chunks_per_row > 1) {
      partial_hist = at::empty({plan.items, 2, num_bins}, n.options());
      partial_positives = at::empty({plan.items}, positives.options());
    }
    check_launch(
        launch_soft_histogram(
            in.scores.const_data_ptr<scalar_t>(), in.relevance_args(),
            BinGrid<acc_t>(lo, hi, num_bins), in.num_queries(), in.num_candidates(), plan,
            n.data_ptr<acc_t>(), p.data_ptr<acc_t>(), positives.data_ptr<int64_t>(),
            partial_hist.defined() ? partial_hist.data_ptr<acc_t>() : nullptr,
            partial_positives.defined() ? partial_positives.data_ptr<int64_t>() : nullptr, stream),
        "soft_histogram", "N = ", in.num_queries(), ", M = ", in.num_candidates(), ", Q = ",
        num_bins, ", ", in.scores.scalar_type(), "; ", plan.blocks, " blocks of ",
        plan.warps_per_block, " warps, ", plan.shared_bytes, " B of shared memory (at most ",
        plan.max_shared, "), ", plan.chunks_per_row, " chunk(s) per row");
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
  // (the table's checks first: a CPU tensor here must get fastap's message, not CUDAGuard's)
  const at::Tensor table = backward_slope_table(in, grad_n, grad_p);
  const c10::cuda::CUDAGuard device_guard(in.scores.device());
  at::Tensor grad_scores = at::empty_like(in.scores);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scores.scalar_type(),
                                  "fastap_soft_histogram_backward_cuda", [&] {
    using acc_t = histogram_t<scalar_t>;
    check_launch(launch_soft_histogram_backward(
                     in.scores.const_data_ptr<scalar_t>(), in.relevance_args(),
                     BinGrid<acc_t>(lo, hi, num_bins), in.num_queries(), in.num_candidates(),
                     table.const_data_ptr<acc_t>(), grad_scores.data_ptr<scalar_t>(), stream),
                 "soft_histogram_backward", "N = ", in.num_queries(), ", M = ",
                 in.num_candidates(), ", Q = ", num_bins, ", ", in.scores.scalar_type());
  });
  return grad_scores;
}

// --- embedding_histogram ---

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
  const bool requested = environment_switch("FASTAP_WGMMA");  // (checked whatever the dtype)
  if (!requested || !wgmma_can_serve(dtype == at::kBFloat16 || dtype == at::kHalf, depth)) {
    return false;
  }
  static std::mutex mutex;
  static int known[64];  // 0 unknown, 1 no, 2 yes
  const std::lock_guard<std::mutex> lock(mutex);
  if (device < 0 || device >= 64) return false;
  if (known[device] == 0) {
    const c10::cuda::CUDAStreamCaptureModeGuard relaxed(cudaStreamCaptureModeRelaxed);
    cudaStream_t probe = nullptr;
    C10_CUDA_CHECK(cudaStreamCreateWithFlags(&probe, cudaStreamNonBlocking));
    int value = 0;
    const cudaError_t copied = copy_image_has_wgmma(&value, probe);
    const cudaError_t synced = cudaStreamSynchronize(probe);
    C10_CUDA_CHECK(cudaStreamDestroy(probe));
    C10_CUDA_CHECK(copied);
    C10_CUDA_CHECK(synced);
    known[device] = value != 0 ? 2 : 1;
  }
  return known[device] == 2;
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
  check_defined(queries, "queries");
  check_defined(database, "database");
  check_defined(labels, "labels");
  check_defined(ref_labels, "ref_labels");
  TORCH_CHECK_VALUE(queries.dim() == 2 && database.dim() == 2,
                    "fastap: queries and database must be 2-D, got shapes ", queries.sizes(),
                    " and ", database.sizes());
  TORCH_CHECK_VALUE(queries.size(1) == database.size(1),
                    "fastap: queries and database must have the same dimension, got ",
                    queries.sizes(), " and ", database.sizes());
  TORCH_CHECK_VALUE(queries.size(1) <= kMaxEmbeddingDepth, "fastap: the fused embedding "
                    "kernel takes embeddings of dimension up to ", kMaxEmbeddingDepth, ", got ",
                    queries.size(1));
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

// The device's opt-in limit of shared memory per block, which a fused kernel needing `bytes` for
// num_bins bins must fit in.
int shared_limit_for(size_t bytes, int64_t num_bins) {
  const int max_shared = max_shared_per_block();
  TORCH_CHECK_VALUE(bytes <= static_cast<size_t>(max_shared), "fastap: num_bins = ", num_bins,
                    " is too large for the fused embedding kernel on this GPU (it needs ", bytes,
                    " bytes of shared memory per block, the GPU has ", max_shared, ")");
  return max_shared;
}

// f(scalar_t{}) for the embeddings' dtype (float32, bfloat16 or float16: checked before).
template <typename F>
void dispatch_embedding_type(at::ScalarType dtype, F&& f) {
  if (dtype == at::kFloat) {
    f(float{});
  } else if (dtype == at::kBFloat16) {
    f(c10::BFloat16{});
  } else {
    f(c10::Half{});
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> embedding_histogram_cuda(
    const at::Tensor& queries, const at::Tensor& database, const at::Tensor& labels,
    const at::Tensor& ref_labels, bool exclude_self, int64_t self_offset, int64_t num_bins,
    double lo, double hi) {
  const EmbeddingInputs in = check_embedding_inputs(queries, database, labels, ref_labels,
                                                    exclude_self, self_offset, num_bins, lo, hi);
  const c10::cuda::CUDAGuard device_guard(queries.device());
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
  dispatch_embedding_type(in.queries.scalar_type(), [&](auto zero) {
    using scalar_t = decltype(zero);
    const size_t shared_bytes =
        embedding_shared_bytes<scalar_t>(in.depth, /*backward=*/false, num_bins);
    const int max_shared = shared_limit_for(shared_bytes, num_bins);
    check_launch(
        launch_embedding_histogram(
            in.queries.const_data_ptr<scalar_t>(), in.database.const_data_ptr<scalar_t>(),
            in.labels.const_data_ptr<int64_t>(), in.ref_labels.const_data_ptr<int64_t>(), n, m,
            in.depth, exclude_self, self_offset, BinGrid<float>(lo, hi, num_bins), plan, wgmma,
            max_shared, n_out.data_ptr<float>(), p_out.data_ptr<float>(),
            positives.data_ptr<int64_t>(),
            partial_hist.defined() ? partial_hist.data_ptr<float>() : nullptr,
            partial_positives.defined() ? partial_positives.data_ptr<int64_t>() : nullptr,
            stream),
        "embedding_histogram", "N = ", n, ", M = ", m, ", D = ", in.depth, ", Q = ", num_bins,
        ", ", in.queries.scalar_type(), wgmma ? " on wgmma; " : " on WMMA; ", plan.own_blocks,
        " x ", plan.splits, " blocks, ", shared_bytes, " B of shared memory (at most ",
        max_shared, ")");
  });
  return {n_out, p_out, positives};
}

// The gradient of one embedding set (own) against the other.
template <typename scalar_t>
void embedding_gradient(bool own_is_query, const at::Tensor& own, const at::Tensor& other,
                        const at::Tensor& own_labels, const at::Tensor& other_labels,
                        bool exclude_self, int64_t self_offset, const BinGrid<float>& grid,
                        const at::Tensor& table, int64_t num_bins, const at::Tensor& grad,
                        cudaStream_t stream) {
  const int64_t own_count = own.size(0);
  const int64_t depth = own.size(1);
  if (own_count == 0 || depth == 0) return;
  const EmbeddingPlan plan = plan_embedding(own_count, other.size(0), depth, /*backward=*/true);
  at::Tensor partial;
  if (plan.splits > 1) {
    partial = at::empty({plan.splits, own_count, depth}, own.options().dtype(at::kFloat));
  }
  const size_t shared_bytes = embedding_shared_bytes<scalar_t>(depth, /*backward=*/true, num_bins);
  const int max_shared = shared_limit_for(shared_bytes, num_bins);
  const bool wgmma = use_wgmma(own.scalar_type(), depth, own.get_device());
  check_launch(
      launch_embedding_histogram_backward(
          own_is_query, own.const_data_ptr<scalar_t>(), own_count,
          other.const_data_ptr<scalar_t>(), other.size(0), depth,
          own_labels.const_data_ptr<int64_t>(), other_labels.const_data_ptr<int64_t>(),
          exclude_self, self_offset, grid, table.const_data_ptr<float>(), plan, wgmma,
          max_shared, grad.data_ptr<scalar_t>(),
          partial.defined() ? partial.data_ptr<float>() : nullptr, stream),
      "embedding_histogram_backward", own_is_query ? "(dQ) " : "(dDB) ", "own rows = ",
      own_count, ", other rows = ", other.size(0), ", D = ", depth, ", Q = ", num_bins, ", ",
      own.scalar_type(), wgmma ? " on wgmma; " : " on WMMA; ", plan.own_blocks, " x ",
      plan.splits, " x ", plan.depth_blocks, " blocks, ", shared_bytes,
      " B of shared memory (at most ", max_shared, ")");
}

std::tuple<at::Tensor, at::Tensor> embedding_histogram_backward_cuda(
    const at::Tensor& grad_n, const at::Tensor& grad_p, const at::Tensor& queries,
    const at::Tensor& database, const at::Tensor& labels, const at::Tensor& ref_labels,
    bool exclude_self, int64_t self_offset, int64_t num_bins, double lo, double hi) {
  const EmbeddingInputs in = check_embedding_inputs(queries, database, labels, ref_labels,
                                                    exclude_self, self_offset, num_bins, lo, hi);
  const c10::cuda::CUDAGuard device_guard(queries.device());
  const at::Tensor table = backward_slope_table(in.queries, in.queries.size(0), num_bins, lo, hi,
                                                at::kFloat, grad_n, grad_p);
  at::Tensor grad_queries = at::empty_like(in.queries);
  at::Tensor grad_database = at::empty_like(in.database);
  if (in.queries.size(0) == 0 || in.database.size(0) == 0) {
    grad_queries.zero_();
    grad_database.zero_();
    return {grad_queries, grad_database};
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const BinGrid<float> grid(lo, hi, num_bins);
  dispatch_embedding_type(in.queries.scalar_type(), [&](auto zero) {
    using scalar_t = decltype(zero);
    embedding_gradient<scalar_t>(true, in.queries, in.database, in.labels, in.ref_labels,
                                 exclude_self, self_offset, grid, table, num_bins, grad_queries,
                                 stream);
    embedding_gradient<scalar_t>(false, in.database, in.queries, in.ref_labels, in.labels,
                                 exclude_self, self_offset, grid, table, num_bins, grad_database,
                                 stream);
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
  m.impl("ap_from_histograms", &ap_from_histograms_cuda);
  m.impl("ap_from_histograms_backward", &ap_from_histograms_backward_cuda);
  m.impl("soft_histogram", &soft_histogram_cuda);
  m.impl("soft_histogram_backward", &soft_histogram_backward_cuda);
  m.impl("embedding_histogram", &embedding_histogram_cuda);
  m.impl("embedding_histogram_backward", &embedding_histogram_backward_cuda);
  m.impl("embedding_histogram_uses_wgmma", &embedding_histogram_uses_wgmma_cuda);
}

}  // namespace fastap
