// CUDA kernels of fastap::ap_from_histograms and fastap::ap_from_histograms_backward: one thread
// per query row applies the row formula of ../ap_formula.h (the same code as the CPU op). The
// work is O(N Q), tiny next to the histogram kernels; the point is one launch instead of the
// thirty small tensor operations that the formula takes in PyTorch. The torch side of the ops is
// in cuda_ops.cpp.
#include <algorithm>
#include <cstdint>

#include "../ap_formula.h"
#include "launch_kernel.cuh"
#include "launchers.h"

namespace fastap {

template <typename T>
__global__ void ap_rows_kernel(const T* __restrict__ n, const T* __restrict__ p,
                               const int64_t* __restrict__ positives, int64_t rows, int64_t q,
                               ApVariant variant, T* __restrict__ ap) {
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < rows; i += stride) {
    ap[i] = ap_row(n + i * q, p + i * q, q, static_cast<T>(positives[i]), variant);
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
    ap_row_backward(grad_ap[i], n + i * q, p + i * q, q, static_cast<T>(positives[i]), variant,
                    grad_n + i * q, grad_p + i * q);
  }
}

namespace {

constexpr int kApThreads = 128;

unsigned row_blocks(int64_t rows) {
  return static_cast<unsigned>(
      std::min<int64_t>((rows + kApThreads - 1) / kApThreads, kMaxBlocks));
}

}  // namespace

template <typename T>
cudaError_t launch_ap_rows(const T* n, const T* p, const int64_t* positives, int64_t rows,
                           int64_t q, ApVariant variant, T* ap, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  return launch_kernel(ap_rows_kernel<T>, row_blocks(rows), kApThreads, 0, stream, n, p,
                       positives, rows, q, variant, ap);
}

template <typename T>
cudaError_t launch_ap_rows_backward(const T* grad_ap, const T* n, const T* p,
                                    const int64_t* positives, int64_t rows, int64_t q,
                                    ApVariant variant, T* grad_n, T* grad_p, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  return launch_kernel(ap_rows_backward_kernel<T>, row_blocks(rows), kApThreads, 0, stream,
                       grad_ap, n, p, positives, rows, q, variant, grad_n, grad_p);
}

template cudaError_t launch_ap_rows<float>(const float*, const float*, const int64_t*, int64_t,
                                           int64_t, ApVariant, float*, cudaStream_t);
template cudaError_t launch_ap_rows<double>(const double*, const double*, const int64_t*, int64_t,
                                            int64_t, ApVariant, double*, cudaStream_t);
template cudaError_t launch_ap_rows_backward<float>(const float*, const float*, const float*,
                                                    const int64_t*, int64_t, int64_t, ApVariant,
                                                    float*, float*, cudaStream_t);
template cudaError_t launch_ap_rows_backward<double>(const double*, const double*, const double*,
                                                     const int64_t*, int64_t, int64_t, ApVariant,
                                                     double*, double*, cudaStream_t);

}  // namespace fastap
