// launch_kernel(kernel, grid, block, shared_bytes, stream, args...): one kernel launch, and the
// CUDA error it raised. The launchers (*.cu) launch through it and nothing else: under nvcc it is
// the launch itself; on the host, tests/emulation/cuda_host.h defines it to run the launch's
// blocks on the CPU, so that the emulation runs the launchers as they are.
#pragma once

#ifndef FASTAP_HOST_EMULATION

#include <cuda_runtime.h>

#include <cstddef>

namespace fastap {

template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes,
                          cudaStream_t stream, const Args&... args) {
  kernel<<<grid, block, shared_bytes, stream>>>(args...);
  return cudaGetLastError();
}

}  // namespace fastap

#endif
