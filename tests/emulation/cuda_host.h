// Runs fastap's CUDA kernels on the CPU, for the tests of a machine without a GPU.
//
// A launch runs the blocks one after another; each thread of the block is a fiber of its own
// (fibers.h) that runs every block in turn, all of them on one system thread, so that
// __syncthreads and __syncwarp are real barriers: between them the threads run one after another,
// in shuffled orders, so that a kernel that forgets a barrier reads stale data or garbage, and
// ThreadSanitizer reports the race. Shared memory is per block: static __shared__ variables become
// function statics (one block at a time uses them) and dynamic shared memory is a heap buffer of
// exactly the launch's size, refilled with garbage before each block, so that AddressSanitizer
// catches an overflow and a read before write gives a wrong answer. A barrier that not every
// thread of its block or warp reaches aborts at once, naming it, instead of hanging. A launch
// beyond sm_90's limits (grid, block or dynamic shared memory size, or an empty grid) aborts, as
// it fails on a GPU.
//
// It covers what fastap's kernels use: threadIdx/blockIdx/blockDim/gridDim, __syncthreads, __ldg,
// __fadd_rd and __dadd_rd, __syncwarp (full mask), static and dynamic shared memory (and addresses
// in it: __cvta_generic_to_shared, __cvta_shared_to_generic), and cp.async
// through the cuda_pipeline.h primitives (deferred until waited for), and the async proxy's view
// of shared memory that wgmma reads (wgmma_host.h); and, of the runtime, what the launchers of
// csrc/cuda/*.cu call (their launches, and cudaFuncSetAttribute's shared memory limit). It is not
// otherwise a model of the GPU's memory ordering, nor of its performance.
#pragma once

#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <vector>

#include "fibers.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)
#define FASTAP_DYNAMIC_SHARED(name) unsigned char* name = ::emu::dynamic_shared_memory()

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

struct alignas(8) uint2 {
  unsigned x, y;
};
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

namespace emu {

// Asynchronous copies (cp.async through cuda_pipeline.h): the destination turns to garbage when
// the copy is issued and gets the data only when __pipeline_wait_prior lets the copy complete, so
// a kernel that reads before it waits reads garbage, and one that refills a buffer that another
// thread still reads races (ThreadSanitizer), as either could on a GPU.
struct AsyncCopy {
  void* destination;
  const void* source;
  size_t bytes;   // copied from source
  size_t zeros;   // then zero-filled
};

// The CUDA state of one thread of the block: its fiber's (fibers.h) for the whole launch.
struct CudaThread {
  dim3 index;
  Barrier* warp_barrier = nullptr;
  // Asynchronous copies (cp.async): issued, not yet committed; committed, not yet waited for.
  std::vector<AsyncCopy> open_group;
  std::vector<std::vector<AsyncCopy>> committed_groups;
  // The async proxy (see Launch::async_view): this thread's fence.proxy.async since the last
  // __syncthreads, and whether a cp.async of its landed after its last fence.
  bool fenced_for_async_proxy = false;
  bool copied_since_fence = false;
};

struct AlignedDelete {
  void operator()(unsigned char* p) const { ::operator delete[](p, std::align_val_t(128)); }
};

struct Launch {
  dim3 grid, block;
  std::unique_ptr<unsigned char[], AlignedDelete> shared;  // 128-byte aligned, as on a GPU
  size_t shared_bytes = 0;
  // What the async proxy (wgmma's operand reads) sees of shared memory: a copy that
  // __syncthreads brings up to date only when every thread of the block has fenced
  // (fence.proxy.async) since the barrier before, with no cp.async landed after its fence.
  std::unique_ptr<unsigned char[]> async_view;
  std::atomic<unsigned> fenced_threads{0};
  std::unique_ptr<Barrier> block_barrier;
  std::vector<std::unique_ptr<Barrier>> warp_barriers;
  std::vector<CudaThread> threads;  // by linear index, x + blockDim.x * (y + blockDim.y * z)
};

inline dim3 block_index;
inline Launch* current = nullptr;

inline CudaThread& cuda_thread() { return current->threads[self().linear]; }

inline void fence_async_proxy() {
  CudaThread& thread = cuda_thread();
  thread.fenced_for_async_proxy = true;
  thread.copied_since_fence = false;
}
inline void arrive_for_async_proxy() {
  CudaThread& thread = cuda_thread();
  if (thread.fenced_for_async_proxy && !thread.copied_since_fence) {
    current->fenced_threads.fetch_add(1);
  }
  thread.fenced_for_async_proxy = false;
}
inline void publish_to_async_proxy() {  // a block barrier's completion
  Launch& l = *current;
  if (l.fenced_threads.load() == l.block.x * l.block.y * l.block.z) {
    std::memcpy(l.async_view.get(), l.shared.get(), l.shared_bytes);
  }
  l.fenced_threads.store(0);
}

inline unsigned char* dynamic_shared_memory() { return current->shared.get(); }

// Shared memory addresses (__cvta_generic_to_shared): the dynamic shared memory's offsets plus a
// reserved first KB, as on a GPU; an address outside the launch's shared memory aborts.
constexpr size_t kSharedReserved = 1024;
inline size_t shared_address(const void* pointer) {
  const unsigned char* byte = static_cast<const unsigned char*>(pointer);
  const unsigned char* base = dynamic_shared_memory();
  if (byte < base || byte > base + current->shared_bytes) {
    std::fprintf(stderr, "emulation: __cvta_generic_to_shared of a pointer outside shared memory\n");
    std::abort();
  }
  return kSharedReserved + static_cast<size_t>(byte - base);
}
inline void* shared_pointer(size_t address) {
  if (address < kSharedReserved || address - kSharedReserved >= current->shared_bytes) {
    std::fprintf(stderr, "emulation: shared address %zu outside the launch's %zu bytes\n", address,
                 current->shared_bytes);
    std::abort();
  }
  return dynamic_shared_memory() + (address - kSharedReserved);
}
// The byte at a shared address as the async proxy sees it.
inline const unsigned char* async_proxy_pointer(size_t address) {
  const unsigned char* generic = static_cast<const unsigned char*>(shared_pointer(address));
  return current->async_view.get() + (generic - dynamic_shared_memory());
}

// The launch limits of sm_90 (the CUDA C++ Programming Guide's table of compute capabilities): a
// launch beyond one fails on the GPU ("invalid configuration argument"), so it aborts here too.
constexpr uint64_t kMaxGridX = (uint64_t{1} << 31) - 1;
constexpr unsigned kMaxGridYZ = 65535;
constexpr unsigned kMaxBlockThreads = 1024;
constexpr size_t kMaxDynamicShared = 227 * 1024;  // per block, opted in

inline void check_launch(dim3 grid, dim3 block, size_t shared_bytes) {
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  const char* problem =
      grid.x == 0 || grid.y == 0 || grid.z == 0 ? "an empty grid"
      : grid.x > kMaxGridX                       ? "gridDim.x above 2^31 - 1"
      : grid.y > kMaxGridYZ || grid.z > kMaxGridYZ ? "gridDim.y or .z above 65535"
      : threads == 0 || threads > kMaxBlockThreads ? "a block of 0 or more than 1024 threads"
      : block.z > 64                              ? "blockDim.z above 64"
      : shared_bytes > kMaxDynamicShared          ? "more than 227 KB of dynamic shared memory"
                                                  : nullptr;
  if (problem != nullptr) {
    std::fprintf(stderr, "emulation: launch with %s (grid %u x %u x %u, block %u x %u x %u, "
                 "%zu bytes of shared memory)\n", problem, grid.x, grid.y, grid.z, block.x,
                 block.y, block.z, shared_bytes);
    std::abort();
  }
}

// Launches kernel<<<grid, block, shared_bytes>>>(args...) and returns when it has finished.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes,
            Args... args) {
  check_launch(grid, block, shared_bytes);
  Launch l;
  l.grid = grid;
  l.block = block;
  l.shared_bytes = shared_bytes;
  l.shared.reset(static_cast<unsigned char*>(
      ::operator new[](shared_bytes > 0 ? shared_bytes : 1, std::align_val_t(128))));
  l.async_view.reset(new unsigned char[shared_bytes > 0 ? shared_bytes : 1]);
  std::memset(l.async_view.get(), 0x5A, shared_bytes);  // unlike the generic garbage (0xFF, 0x7F)
  const unsigned threads = block.x * block.y * block.z;
  l.block_barrier = std::make_unique<Barrier>(threads, &publish_to_async_proxy);
  for (unsigned first = 0; first < threads; first += 32) {
    l.warp_barriers.push_back(std::make_unique<Barrier>(threads - first < 32 ? threads - first : 32));
  }
  l.threads.resize(threads);
  for (unsigned t = 0; t < threads; ++t) {
    l.threads[t].index = dim3(t % block.x, t / block.x % block.y, t / (block.x * block.y));
    l.threads[t].warp_barrier = l.warp_barriers[t / 32].get();
  }
  current = &l;
  const uint64_t blocks = uint64_t{grid.x} * grid.y * grid.z;
  run_fibers(threads, [&](unsigned t) {
    CudaThread& thread = l.threads[t];
    for (uint64_t b = 0; b < blocks; ++b) {
      thread.fenced_for_async_proxy = thread.copied_since_fence = false;
      if (t == 0) {
        block_index = dim3(static_cast<unsigned>(b % l.grid.x),
                           static_cast<unsigned>(b / l.grid.x % l.grid.y),
                           static_cast<unsigned>(b / (uint64_t{l.grid.x} * l.grid.y)));
        // Garbage, as on a GPU: NaN (0xFF) in every float width, or 0x7F, block by block: huge
        // finite fp32, bf16 and fp64 values (NaN in fp16), so that a read of shared memory the
        // kernel never wrote shows even where the right value is zero (with a small garbage it
        // would pass the tolerance), NaN-aware code or not.
        std::memset(l.shared.get(), b % 2 ? 0x7F : 0xFF, l.shared_bytes);
      }
      l.block_barrier->arrive_and_wait("block start");
      kernel(args...);
      for (const auto& group : thread.committed_groups) {
        if (!group.empty() || !thread.open_group.empty()) {
          std::fprintf(stderr, "emulation: asynchronous copies never waited for at block end\n");
          std::abort();
        }
      }
      thread.committed_groups.clear();
      l.block_barrier->arrive_and_wait("block end");
    }
  });
  current = nullptr;
}

}  // namespace emu

// The CUDA runtime, as far as the launchers (csrc/cuda/*.cu) use it. Their launches go through
// fastap::launch_kernel (csrc/cuda/launch_kernel.cuh, which leaves it to this file where
// FASTAP_HOST_EMULATION is defined): here, emu::launch. As on a GPU, a launch with more than
// 48 KB of dynamic shared memory fails unless cudaFuncSetAttribute allowed its kernel as much.
#define FASTAP_HOST_EMULATION 1
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
using cudaStream_t = struct CUstream_st*;
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

namespace emu {
constexpr size_t kDefaultDynamicShared = 48 * 1024;
inline std::mutex allowed_shared_mutex;
inline std::map<const void*, size_t> allowed_shared;  // by kernel, from cudaFuncSetAttribute
// Every launch made through fastap::launch_kernel, in order: what the launchers chose.
struct Launched {
  const void* kernel;
  dim3 grid;
};
inline std::vector<Launched> launched;
}  // namespace emu

template <typename... Params>
cudaError_t cudaFuncSetAttribute(void (*kernel)(Params...), cudaFuncAttribute attribute,
                                 int value) {
  if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      static_cast<size_t>(value) > ::emu::kMaxDynamicShared) {
    std::fprintf(stderr, "emulation: cudaFuncSetAttribute(%d, %d) is not valid on sm_90\n",
                 static_cast<int>(attribute), value);
    std::abort();
  }
  const std::lock_guard<std::mutex> lock(::emu::allowed_shared_mutex);
  ::emu::allowed_shared[reinterpret_cast<const void*>(kernel)] = static_cast<size_t>(value);
  return cudaSuccess;
}

namespace fastap {

template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes,
                          cudaStream_t /*stream*/, const Args&... args) {
  if (shared_bytes > ::emu::kDefaultDynamicShared) {
    const std::lock_guard<std::mutex> lock(::emu::allowed_shared_mutex);
    const auto allowed = ::emu::allowed_shared.find(reinterpret_cast<const void*>(kernel));
    if (allowed == ::emu::allowed_shared.end() || allowed->second < shared_bytes) {
      std::fprintf(stderr, "emulation: a launch with %zu bytes of dynamic shared memory, more "
                   "than cudaFuncSetAttribute allowed its kernel\n", shared_bytes);
      std::abort();
    }
  }
  ::emu::launched.push_back({reinterpret_cast<const void*>(kernel), grid});
  ::emu::launch(kernel, grid, block, shared_bytes, args...);
  return cudaSuccess;
}

}  // namespace fastap

#define threadIdx (::emu::cuda_thread().index)
#define blockIdx (::emu::block_index)
#define blockDim (::emu::current->block)
#define gridDim (::emu::current->grid)

template <typename T>
inline T __ldg(const T* p) {  // the read-only data path: a plain load here
  return *p;
}
// a + b rounded toward -inf (the GPU's add.rm): the sum rounded to nearest, stepped down one ulp
// where that rounded up, which the exact error of the sum (TwoSum) tells.
template <typename T>
inline T add_round_down(T a, T b) {
  const T sum = a + b;
  const T b_part = sum - a;
  const T error = (a - (sum - b_part)) + (b - b_part);  // a + b == sum + error exactly
  return error < T(0) ? std::nextafter(sum, -INFINITY) : sum;
}
inline size_t __cvta_generic_to_shared(const void* pointer) { return ::emu::shared_address(pointer); }
inline void* __cvta_shared_to_generic(size_t address) { return ::emu::shared_pointer(address); }
inline float __fadd_rd(float a, float b) { return add_round_down(a, b); }
inline double __dadd_rd(double a, double b) { return add_round_down(a, b); }

inline void __syncthreads() {
  ::emu::arrive_for_async_proxy();
  ::emu::current->block_barrier->arrive_and_wait("__syncthreads");
}
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) {
    std::fprintf(stderr, "emulation: __syncwarp with a partial mask is not emulated\n");
    std::abort();
  }
  ::emu::cuda_thread().warp_barrier->arrive_and_wait("__syncwarp");
}

inline void __pipeline_memcpy_async(void* destination, const void* source, size_t size,
                                    size_t zero_fill = 0) {
  if (size != 4 && size != 8 && size != 16) {
    std::fprintf(stderr, "emulation: cp.async of %zu bytes\n", size);
    std::abort();
  }
  if (reinterpret_cast<uintptr_t>(destination) % size != 0 ||
      reinterpret_cast<uintptr_t>(source) % size != 0 || zero_fill > size) {
    std::fprintf(stderr, "emulation: misaligned cp.async or zero fill beyond its size\n");
    std::abort();
  }
  // The destination is undefined from the issue on: garbage now (a reader that has not finished
  // with it races, ThreadSanitizer says), the data when waited for.
  std::memset(destination, 0xFF, size);
  ::emu::cuda_thread().open_group.push_back({destination, source, size - zero_fill, zero_fill});
}
inline void __pipeline_commit() {
  ::emu::CudaThread& thread = ::emu::cuda_thread();
  thread.committed_groups.push_back(std::move(thread.open_group));
  thread.open_group.clear();
}
inline void __pipeline_wait_prior(size_t pending) {
  ::emu::CudaThread& thread = ::emu::cuda_thread();
  auto& groups = thread.committed_groups;
  while (groups.size() > pending) {
    for (const auto& copy : groups.front()) {
      unsigned char* destination = static_cast<unsigned char*>(copy.destination);
      std::memcpy(destination, copy.source, copy.bytes);
      std::memset(destination + copy.bytes, 0, copy.zeros);
      thread.copied_since_fence = true;
    }
    groups.erase(groups.begin());
  }
}
