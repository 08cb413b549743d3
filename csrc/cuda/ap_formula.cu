// CUDA kernels of fastap::ap_from_histograms and fastap::ap_from_histograms_backward: one thread
// per query row applies the row formula of ../ap_formula.h (the same code as the CPU op). The
// work is O(N Q), tiny next to the histogram kernels; the point is one launch instead of the
// thirty small tensor operations that the formula takes in PyTorch.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <tuple>

#include "../ap_formula.h"
#include "../ap_inputs.h"

namespace fastap {

template <typename T>
__global__ void ap_rows_kernel(const T* __restrict__ n, const T* __restrict__ p,
                               const int64_t* __restrict__ positives, int64_t rows, int64_t q,
                               ApVariant variant, T* __restrict__ ap) {
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < rows; i += stride) {
    ap[i] = ap_row(n + i * q, p + i * q, q, positives[i], variant);
  }
}

template <typename T>
__global__ void ap_rows_backward_kernel(const T* __restrict__ grad_ap, const T* __restrict__ n,
                                        const T* __restrict__ p,
                                        const int64_t* __restrict__ positives, int64_t rows,
                                        int64_t q, ApVariant variant, T* __restrict__ grad_n,
                                        T* __restrict__ grad_p) {
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < rows; i += stride) {
    ap_row_backward(grad_ap[i], n + i * q, p + i * q, q, positives[i], variant, grad_n + i * q,
                    grad_p + i * q);
  }
}

namespace {

constexpr int kApThreads = 128;

unsigned row_blocks(int64_t rows) {
  return static_cast<unsigned>(
      std::min<int64_t>((rows + kApThreads - 1) / kApThreads, int64_t{1} << 30));
}

at::Tensor ap_from_histograms_cuda(const at::Tensor& n, const at::Tensor& p,
                                   const at::Tensor& positives, std::string variant) {
  const ApInputs in = check_ap_inputs(n, p, positives, variant);
  const c10::cuda::CUDAGuard device_guard(in.n.device());
  at::Tensor ap = at::empty({in.num_queries()}, in.n.options());
  if (in.num_queries() == 0) return ap;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(in.n.scalar_type(), "fastap_ap_from_histograms_cuda", [&] {
    ap_rows_kernel<scalar_t><<<row_blocks(in.num_queries()), kApThreads, 0, stream>>>(
        in.n.const_data_ptr<scalar_t>(), in.p.const_data_ptr<scalar_t>(),
        in.positives.const_data_ptr<int64_t>(), in.num_queries(), in.num_bins(), in.variant,
        ap.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return ap;
}

std::tuple<at::Tensor, at::Tensor> ap_from_histograms_backward_cuda(
    const at::Tensor& grad_ap, const at::Tensor& n, const at::Tensor& p,
    const at::Tensor& positives, std::string variant) {
  const ApInputs in = check_ap_inputs(n, p, positives, variant, grad_ap);
  const c10::cuda::CUDAGuard device_guard(in.n.device());
  at::Tensor grad_n = at::empty_like(in.n);
  at::Tensor grad_p = at::empty_like(in.p);
  if (in.num_queries() == 0) return {grad_n, grad_p};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(in.n.scalar_type(), "fastap_ap_from_histograms_backward_cuda", [&] {
    ap_rows_backward_kernel<scalar_t><<<row_blocks(in.num_queries()), kApThreads, 0, stream>>>(
        in.grad_ap.const_data_ptr<scalar_t>(), in.n.const_data_ptr<scalar_t>(),
        in.p.const_data_ptr<scalar_t>(), in.positives.const_data_ptr<int64_t>(),
        in.num_queries(), in.num_bins(), in.variant, grad_n.data_ptr<scalar_t>(),
        grad_p.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_n, grad_p};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastap, CUDA, m) {
  m.impl("ap_from_histograms", &ap_from_histograms_cuda);
  m.impl("ap_from_histograms_backward", &ap_from_histograms_backward_cuda);
}

}  // namespace fastap
