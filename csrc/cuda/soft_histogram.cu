// CUDA kernels of fastap::soft_histogram and fastap::soft_histogram_backward.
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

namespace fastap {
namespace {

constexpr int kMaxThreads = 256;
constexpr int kBackwardThreads = 256;
constexpr int kBackwardColumnsPerThread = 4;
constexpr int64_t kMaxGridY = 65535;

// Forward: one block per query row (blocks stride over rows). Threads stride over the row's
// candidates, each accumulating a private two-class histogram in shared memory, laid out
// [class * Q + bin][thread] so that the accumulation has no bank conflicts. At the end of the row,
// thread k sums bin k over the threads in a fixed order (starting at thread k, which spreads the
// reads over the banks): no float atomics, bitwise deterministic. The row's positives are
// counted exactly with one integer shared-memory atomic per thread. A non-finite, non-ignored
// score makes the row's histograms NaN.
template <typename scalar_t, typename acc_t>
__global__ void soft_histogram_kernel(const scalar_t* __restrict__ scores, RelevanceArgs relevance,
                                      BinGrid<acc_t> grid, int64_t num_queries,
                                      int64_t num_candidates, acc_t* __restrict__ n_out,
                                      acc_t* __restrict__ p_out,
                                      int64_t* __restrict__ positives_out) {
  extern __shared__ __align__(16) unsigned char shared_memory[];
  acc_t* hist = reinterpret_cast<acc_t*>(shared_memory);
  __shared__ int poisoned;
  __shared__ unsigned long long positives;
  const int num_threads = blockDim.x;
  const int stride = num_threads;
  const int tid = threadIdx.x;
  const int q = grid.last_bin + 1;

  for (int64_t i = blockIdx.x; i < num_queries; i += gridDim.x) {
    for (int slot = 0; slot < 2 * q; ++slot) hist[slot * stride + tid] = acc_t(0);
    if (tid == 0) {
      poisoned = 0;
      positives = 0;
    }
    __syncthreads();

    const scalar_t* row_scores = scores + i * num_candidates;
    const RowRelevance row = relevance.row(i, num_candidates);
    unsigned long long thread_positives = 0;
    for (int64_t j = tid; j < num_candidates; j += num_threads) {
      if (row.ignored(j)) continue;
      const bool positive = row.positive(j);
      thread_positives += positive ? 1 : 0;
      const acc_t s = static_cast<acc_t>(row_scores[j]);
      if (!is_finite(s)) {
        poisoned = 1;
        continue;
      }
      const BinPosition<acc_t> pos = grid.locate(s);
      acc_t* h = hist + (positive ? q : 0) * stride + tid;
      h[pos.bin * stride] += acc_t(1) - pos.frac;
      h[(pos.bin + 1) * stride] += pos.frac;
    }
    if (thread_positives != 0) atomicAdd(&positives, thread_positives);  // integer: exact
    __syncthreads();
    if (tid == 0) positives_out[i] = static_cast<int64_t>(positives);

    for (int k = tid; k < q; k += num_threads) {
      acc_t by_class[2] = {acc_t(0), acc_t(0)};
      for (int c = 0; c < 2; ++c) {
        const acc_t* h = hist + (c * q + k) * stride;
        for (int t = 0; t < num_threads; ++t) by_class[c] += h[(t + k) % num_threads];
      }
      const acc_t nan = acc_t(NAN);
      n_out[i * q + k] = poisoned ? nan : by_class[0] + by_class[1];
      p_out[i * q + k] = poisoned ? nan : by_class[1];
    }
    __syncthreads();
  }
}

// Backward: a 2-D grid, blockIdx.y strides over query rows and blockIdx.x covers the row's
// candidates in tiles of kBackwardThreads * kBackwardColumnsPerThread. Each candidate is one
// lookup in its row's slope table (see backward_slope_table): no accumulation, deterministic.
template <typename scalar_t, typename acc_t>
__global__ void soft_histogram_backward_kernel(const scalar_t* __restrict__ scores,
                                               RelevanceArgs relevance, BinGrid<acc_t> grid,
                                               int64_t num_queries, int64_t num_candidates,
                                               const acc_t* __restrict__ table,
                                               scalar_t* __restrict__ grad_out) {
  const int slopes = grid.last_bin;
  const int64_t tile = int64_t{blockDim.x} * kBackwardColumnsPerThread;
  for (int64_t i = blockIdx.y; i < num_queries; i += gridDim.y) {
    const scalar_t* row_scores = scores + i * num_candidates;
    const acc_t* row_table = table + i * 2 * slopes;
    scalar_t* row_grad = grad_out + i * num_candidates;
    const RowRelevance row = relevance.row(i, num_candidates);
    const int64_t first = int64_t{blockIdx.x} * tile + threadIdx.x;
    for (int u = 0; u < kBackwardColumnsPerThread; ++u) {
      const int64_t j = first + int64_t{u} * blockDim.x;
      if (j >= num_candidates) break;
      acc_t g = acc_t(0);
      if (!row.ignored(j)) {
        const acc_t s = static_cast<acc_t>(row_scores[j]);
        if (!is_finite(s)) {
          g = acc_t(NAN);
        } else {
          const BinPosition<acc_t> pos = grid.locate(s);
          if (pos.sloped) g = row_table[(row.positive(j) ? slopes : 0) + pos.bin];
        }
      }
      row_grad[j] = static_cast<scalar_t>(g);
    }
  }
}

// Threads per block of the forward: as many as fit the private histograms in shared memory.
template <typename acc_t>
int forward_threads(int64_t num_bins, size_t* shared_bytes) {
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  int max_shared = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_shared, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                        device));
  const size_t per_thread = 2 * static_cast<size_t>(num_bins) * sizeof(acc_t);
  // One column of 2 * Q accumulators per thread; 64 bytes stay free for the `poisoned` flag.
  const size_t budget = static_cast<size_t>(max_shared) - 64;
  int threads = kMaxThreads;
  while (threads > 32 && threads * per_thread > budget) threads -= 32;
  *shared_bytes = threads * per_thread;
  TORCH_CHECK_VALUE(*shared_bytes <= budget, "fastap: num_bins = ", num_bins,
                    " is too large for the CUDA kernel (at most ", budget / (32 * 2 * sizeof(acc_t)),
                    " bins for this dtype on this GPU)");
  return threads;
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
    size_t shared_bytes = 0;
    const int threads = forward_threads<acc_t>(num_bins, &shared_bytes);
    auto kernel = soft_histogram_kernel<scalar_t, acc_t>;
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(shared_bytes)));
    const int64_t blocks = std::min<int64_t>(in.num_queries(), int64_t{1} << 30);
    kernel<<<static_cast<unsigned>(blocks), threads, shared_bytes, stream>>>(
        in.scores.const_data_ptr<scalar_t>(), in.relevance_args(),
        BinGrid<acc_t>(lo, hi, num_bins), in.num_queries(), in.num_candidates(),
        n.data_ptr<acc_t>(), p.data_ptr<acc_t>(), positives.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  const int64_t tile = int64_t{kBackwardThreads} * kBackwardColumnsPerThread;
  const dim3 blocks(static_cast<unsigned>((in.num_candidates() + tile - 1) / tile),
                    static_cast<unsigned>(std::min(in.num_queries(), kMaxGridY)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.scores.scalar_type(),
                                  "fastap_soft_histogram_backward_cuda", [&] {
    using acc_t = histogram_t<scalar_t>;
    soft_histogram_backward_kernel<scalar_t, acc_t><<<blocks, kBackwardThreads, 0, stream>>>(
        in.scores.const_data_ptr<scalar_t>(), in.relevance_args(),
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
