// Kernels that are wrong on purpose, and their right twin, for tests/test_cuda_emulation.py to
// check that the emulation (cuda_host.h) finds what it promises: a forgotten __syncthreads gives
// a wrong answer and, built with ThreadSanitizer, a data race report; a barrier that not every
// thread reaches aborts, naming it; the right kernel passes clean.
//
//   self_check synced|unsynced|divergent|warp_divergent
//
// Prints, for synced and unsynced, the number of threads (of 2 blocks of 96) whose value read
// from a neighbour's write was wrong.
#include "cuda_host.h"

#include <string>

namespace {

constexpr unsigned kThreads = 96;  // three warps: the last thread's neighbour wraps around

// Each thread writes its slot of shared memory, then reads its neighbour's: right only with the
// barrier between.
template <bool kSynced>
__global__ void neighbour_kernel(unsigned* wrong) {
  __shared__ unsigned slots[kThreads];
  slots[threadIdx.x] = threadIdx.x + 1000 * blockIdx.x;
  if (kSynced) __syncthreads();
  const unsigned neighbour = (threadIdx.x + 1) % kThreads;
  if (slots[neighbour] != neighbour + 1000 * blockIdx.x) {
    __atomic_fetch_add(wrong, 1u, __ATOMIC_RELAXED);
  }
}

__global__ void divergent_kernel() {
  if (threadIdx.x != 5) __syncthreads();
}

__global__ void warp_divergent_kernel() {
  if (threadIdx.x != 40) __syncwarp();
}

}  // namespace

int main(int argc, char** argv) {
  const std::string what = argc > 1 ? argv[1] : "";
  unsigned wrong = 0;
  if (what == "synced") {
    emu::launch(neighbour_kernel<true>, dim3(2), dim3(kThreads), 0, &wrong);
  } else if (what == "unsynced") {
    emu::launch(neighbour_kernel<false>, dim3(2), dim3(kThreads), 0, &wrong);
  } else if (what == "divergent") {
    emu::launch(divergent_kernel, dim3(1), dim3(kThreads), 0);
  } else if (what == "warp_divergent") {
    emu::launch(warp_divergent_kernel, dim3(1), dim3(kThreads), 0);
  } else {
    std::fprintf(stderr, "usage: self_check synced|unsynced|divergent|warp_divergent\n");
    return 2;
  }
  std::printf("wrong=%u\n", wrong);
  return 0;
}
