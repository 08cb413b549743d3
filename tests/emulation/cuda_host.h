// Runs fastap's CUDA kernels on the CPU, for the tests of a machine without a GPU.
//
// A launch runs the blocks one after another; each thread of a block is a fiber of its own (a
// stack and a context, ucontext.h), all of them on one system thread, so that __syncthreads and
// __syncwarp are real barriers: a thread that reaches one switches to the next thread that can
// run, and goes on once every thread of its block or warp has arrived. Between barriers the
// threads run one after another, in an order shuffled anew for each round over them (the same
// orders in every run), so that a kernel that forgets a barrier between a write and another
// thread's read reads, in some block or other, stale data or garbage;
// and ThreadSanitizer, told of the fibers (no order between them but the barriers' atomics),
// reports the race. (Real threads did the same at 20 to 100 times the cost: a switch through the
// kernel's scheduler for every thread at every barrier, on two cores.) Shared memory is per block:
// static __shared__ variables become function statics (one block at a time uses them) and dynamic
// shared memory is a heap buffer of exactly the launch's size, refilled with garbage before each
// block, so that AddressSanitizer catches an overflow and a read before write gives a wrong
// answer. A barrier that not every thread of its block or warp reaches aborts at once, naming the
// barrier, instead of hanging. A launch beyond
// sm_90's limits (grid, block or dynamic shared memory size, or an empty grid) aborts, as it
// fails on a GPU.
//
// It covers what fastap's kernels use: threadIdx/blockIdx/blockDim/gridDim, __syncthreads, __ldg,
// __fadd_rd and __dadd_rd, __syncwarp (full mask), static and dynamic shared memory (and addresses
// in it: __cvta_generic_to_shared, __cvta_shared_to_generic), and cp.async
// through the cuda_pipeline.h primitives (deferred until waited for), and the async proxy's view
// of shared memory that wgmma reads (wgmma_host.h); and, of the runtime, what the launchers of
// csrc/cuda/*.cu call (their launches, and cudaFuncSetAttribute's shared memory limit). It is not
// otherwise a model of the GPU's memory ordering, nor of its performance.
#pragma once

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <any>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <random>
#include <string>
#include <typeindex>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#define FASTAP_EMULATION_ASAN 1
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif
#if defined(__SANITIZE_THREAD__)
#define FASTAP_EMULATION_TSAN 1
#include <sanitizer/tsan_interface.h>
#endif

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

struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

namespace emu {

// --- the fibers: one per thread of the block, run in turn on this system thread ---

struct Barrier;
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

// One thread of the block (one for every block of the launch: it runs them in turn).
struct Fiber {
  ucontext_t context;
  unsigned char* stack = nullptr;
  dim3 index;
  unsigned linear = 0;  // x + blockDim.x * (y + blockDim.y * z)
  Barrier* warp_barrier = nullptr;
  // The barrier it waits at (for the message of one that not every thread reaches), and whether
  // it has run its last block. Atomics (relaxed): the scheduler reads them between the fibers,
  // with which ThreadSanitizer orders it only where the fiber is switched to.
  std::atomic<const char*> waiting_at{nullptr};
  std::atomic<bool> done{false};
  // Asynchronous copies (cp.async): issued, not yet committed; committed, not yet waited for.
  std::vector<AsyncCopy> open_group;
  std::vector<std::vector<AsyncCopy>> committed_groups;
  // The async proxy (see Launch::async_view): this thread's fence.proxy.async since the last
  // __syncthreads, and whether a cp.async of its landed after its last fence.
  bool fenced_for_async_proxy = false;
  bool copied_since_fence = false;
  std::map<std::type_index, std::any> states;  // thread_state<T>()
#if defined(FASTAP_EMULATION_TSAN)
  void* tsan_fiber = nullptr;
#endif
};

// 1 MiB a thread, reserved but not committed (MAP_NORESERVE): pages are taken as they are touched.
// Kept for the next launch's fibers (mapped afresh, each launch faulted its pages in again).
constexpr size_t kStackBytes = size_t{1} << 20;
inline std::vector<void*> spare_stacks;

struct Scheduler {
  ucontext_t context;
  std::vector<std::unique_ptr<Fiber>> fibers;
  std::atomic<Fiber*> running{nullptr};  // relaxed: see Fiber::done
  std::atomic<uint64_t> arrivals{0};      // barrier arrivals so far: progress
  std::function<void(unsigned)> body;  // what each fiber runs, given its linear index
#if defined(FASTAP_EMULATION_ASAN)
  const void* stack_bottom = nullptr;  // the system thread's stack, learnt at the first switch
  size_t stack_size = 0;
#endif
#if defined(FASTAP_EMULATION_TSAN)
  void* tsan_fiber = nullptr;
#endif
};
inline Scheduler* scheduler = nullptr;  // the launch's; one launch at a time

inline Fiber& self() { return *scheduler->running.load(std::memory_order_relaxed); }

// Per-thread state of the emulations built on this one (wgmma_host.h): this thread's own T,
// made at its first use in the launch.
template <typename T>
T& thread_state() {
  std::any& slot = self().states[std::type_index(typeid(T))];
  if (!slot.has_value()) slot.emplace<T>();
  return std::any_cast<T&>(slot);
}

// From the running fiber to the scheduler: the fiber waits at a barrier (it goes on when
// switched to again) or has finished (`finished`: it is never switched to again).
inline void switch_to_scheduler(bool finished) {
  Fiber& fiber = self();
#if defined(FASTAP_EMULATION_TSAN)
  // No order from a waiting fiber to the scheduler, so none through it to the next fiber: the
  // barriers' own atomics order the threads, as on the GPU. A finished fiber's work comes before
  // what the launch's caller does next, as a joined thread's would (every fiber has passed the
  // last block's barrier by then: no kernel code is left to run).
  __tsan_switch_to_fiber(scheduler->tsan_fiber, finished ? 0 : __tsan_switch_to_fiber_no_sync);
#endif
#if defined(FASTAP_EMULATION_ASAN)
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(finished ? nullptr : &fake_stack, scheduler->stack_bottom,
                                 scheduler->stack_size);
#endif
  swapcontext(&fiber.context, &scheduler->context);
#if defined(FASTAP_EMULATION_ASAN)
  __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#endif
  (void)finished;
}

// What each fiber's context starts in.
inline void fiber_main() {
#if defined(FASTAP_EMULATION_ASAN)
  __sanitizer_finish_switch_fiber(nullptr, &scheduler->stack_bottom, &scheduler->stack_size);
#endif
  Fiber& fiber = self();
  scheduler->body(fiber.linear);
  fiber.done.store(true, std::memory_order_relaxed);
  switch_to_scheduler(/*finished=*/true);
  std::abort();  // never switched to again
}

// From the scheduler to `fiber`, until it waits at a barrier or finishes.
inline void run_fiber(Fiber& fiber) {
  scheduler->running.store(&fiber, std::memory_order_relaxed);
#if defined(FASTAP_EMULATION_TSAN)
  // (In this direction with order: what the scheduler wrote, the fiber's setup, comes first.)
  __tsan_switch_to_fiber(fiber.tsan_fiber, 0);
#endif
#if defined(FASTAP_EMULATION_ASAN)
  void* fake_stack = nullptr;
  __sanitizer_start_switch_fiber(&fake_stack, fiber.stack, kStackBytes);
#endif
  swapcontext(&scheduler->context, &fiber.context);
#if defined(FASTAP_EMULATION_ASAN)
  __sanitizer_finish_switch_fiber(fake_stack, nullptr, nullptr);
#endif
}

// A reusable barrier for `count` threads. The arrivals count on an atomic and the last to arrive
// starts the next generation; the acquire-release atomics are what orders the threads' memory
// (for ThreadSanitizer, which knows no other order between the fibers). A thread that waits
// switches to the scheduler, which runs the others; so does the last to arrive, so that all of
// them go on in the shuffled order of the scheduler's next round. Arrivals of one generation by different
// names (__syncthreads and "block end": a thread that skipped a __syncthreads) abort.
struct Barrier {
  explicit Barrier(unsigned count, void (*completion)() = nullptr)
      : count_(count), completion_(completion) {}
  void arrive_and_wait(const char* what) {
    const uint32_t generation = generation_.load(std::memory_order_acquire);
    scheduler->arrivals.fetch_add(1, std::memory_order_relaxed);
    const char* first = nullptr;
    if (!first_what_.compare_exchange_strong(first, what, std::memory_order_relaxed) &&
        std::strcmp(first, what) != 0) {
      std::fprintf(stderr, "emulation: one barrier reached as %s by some threads and as %s by "
                   "others (divergent barrier)\n", first, what);
      std::abort();
    }
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) + 1 == count_) {
      if (completion_ != nullptr) completion_();  // every other thread is waiting
      arrived_.store(0, std::memory_order_relaxed);
      first_what_.store(nullptr, std::memory_order_relaxed);
      generation_.store(generation + 1, std::memory_order_release);
      switch_to_scheduler(/*finished=*/false);
      return;
    }
    Fiber& fiber = self();
    fiber.waiting_at.store(what, std::memory_order_relaxed);
    while (generation_.load(std::memory_order_acquire) == generation) {
      switch_to_scheduler(/*finished=*/false);
    }
    fiber.waiting_at.store(nullptr, std::memory_order_relaxed);
  }

 private:
  const unsigned count_;
  void (*const completion_)();
  std::atomic<unsigned> arrived_{0};
  std::atomic<uint32_t> generation_{0};
  std::atomic<const char*> first_what_{nullptr};  // the name of this generation's first arrival
};

// Thread t's fiber, to start in fiber_main. (A function of its own: getcontext returns twice,
// which would leave the variables of a loop around it undefined after a longjmp, GCC warns.)
[[gnu::noinline]] inline std::unique_ptr<Fiber> make_fiber(unsigned t, const dim3& block) {
  auto fiber = std::make_unique<Fiber>();
  fiber->linear = t;
  fiber->index = dim3(t % block.x, t / block.x % block.y, t / (block.x * block.y));
  void* stack = nullptr;
  if (!spare_stacks.empty()) {
    stack = spare_stacks.back();
    spare_stacks.pop_back();
  } else {
    stack = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | MAP_STACK, -1, 0);
    if (stack == MAP_FAILED) {
      std::fprintf(stderr, "emulation: no memory for the stack of thread %u\n", t);
      std::abort();
    }
  }
  fiber->stack = static_cast<unsigned char*>(stack);
  getcontext(&fiber->context);
  fiber->context.uc_stack.ss_sp = stack;
  fiber->context.uc_stack.ss_size = kStackBytes;
  fiber->context.uc_link = nullptr;
  makecontext(&fiber->context, fiber_main, 0);
  // The stack is in the context's registers now. Left in uc_stack, AddressSanitizer's
  // swapcontext would clear the whole stack's shadow at every switch to the fiber (a release of
  // its pages to the system and their faults again: most of the emulation's time); the switches
  // tell it of the stacks instead (__sanitizer_start_switch_fiber).
  fiber->context.uc_stack.ss_sp = nullptr;
  fiber->context.uc_stack.ss_size = 0;
#if defined(FASTAP_EMULATION_TSAN)
  fiber->tsan_fiber = __tsan_create_fiber(0);
#endif
  return fiber;
}

// Runs body(t) for t in [0, threads), each in a fiber of its own, to the end of every one; a
// round in which no fiber reaches a barrier or its end means that some wait at a barrier that
// the others will not reach: it aborts, naming that barrier.
inline void run_fibers(unsigned threads, std::function<void(unsigned)> body, const dim3& block) {
  Scheduler s;
  s.body = std::move(body);
  scheduler = &s;
#if defined(FASTAP_EMULATION_TSAN)
  s.tsan_fiber = __tsan_get_current_fiber();
#endif
  for (unsigned t = 0; t < threads; ++t) s.fibers.push_back(make_fiber(t, block));
  unsigned live = threads;
  std::vector<unsigned> order(threads);
  for (unsigned t = 0; t < threads; ++t) order[t] = t;
  std::mt19937 shuffler(20261202);  // the same orders in every run: a failure repeats
  while (live > 0) {
    const uint64_t before = s.arrivals.load(std::memory_order_relaxed);
    unsigned finished = 0;
    std::shuffle(order.begin(), order.end(), shuffler);
    for (const unsigned t : order) {
      Fiber& fiber = *s.fibers[t];
      if (fiber.done.load(std::memory_order_relaxed)) continue;
      run_fiber(fiber);
      if (fiber.done.load(std::memory_order_relaxed)) ++finished;
    }
    live -= finished;
    if (live > 0 && finished == 0 && s.arrivals.load(std::memory_order_relaxed) == before) {
      std::map<std::string, unsigned> waiting;  // threads by the barrier they wait at
      for (const auto& fiber : s.fibers) {
        if (const char* what = fiber->waiting_at.load(std::memory_order_relaxed)) ++waiting[what];
      }
      std::string list;
      for (const auto& [what, count] : waiting) {
        list += (list.empty() ? "" : ", ") + std::to_string(count) + " at " + what;
      }
      std::fprintf(stderr, "emulation: a barrier not reached by every thread (divergent barrier): "
                   "of %u threads, %u finished, the others wait: %s\n", threads,
                   threads - live, list.c_str());
      std::abort();
    }
  }
  for (auto& fiber : s.fibers) {
#if defined(FASTAP_EMULATION_TSAN)
    __tsan_destroy_fiber(fiber->tsan_fiber);
#endif
#if defined(FASTAP_EMULATION_ASAN)
    ASAN_UNPOISON_MEMORY_REGION(fiber->stack, kStackBytes);  // for the fiber that takes it next
#endif
    spare_stacks.push_back(fiber->stack);
  }
  scheduler = nullptr;
}

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
};

inline dim3 block_index;
inline Launch* current = nullptr;

inline void fence_async_proxy() {
  Fiber& fiber = self();
  fiber.fenced_for_async_proxy = true;
  fiber.copied_since_fence = false;
}
inline void arrive_for_async_proxy() {
  Fiber& fiber = self();
  if (fiber.fenced_for_async_proxy && !fiber.copied_since_fence) {
    current->fenced_threads.fetch_add(1);
  }
  fiber.fenced_for_async_proxy = false;
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
  current = &l;
  const uint64_t blocks = uint64_t{grid.x} * grid.y * grid.z;
  run_fibers(threads, [&](unsigned t) {
    Fiber& fiber = self();
    fiber.warp_barrier = l.warp_barriers[t / 32].get();
    for (uint64_t b = 0; b < blocks; ++b) {
      fiber.fenced_for_async_proxy = fiber.copied_since_fence = false;
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
      for (const auto& group : fiber.committed_groups) {
        if (!group.empty() || !fiber.open_group.empty()) {
          std::fprintf(stderr, "emulation: asynchronous copies never waited for at block end\n");
          std::abort();
        }
      }
      fiber.committed_groups.clear();
      l.block_barrier->arrive_and_wait("block end");
    }
  }, block);
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

#define threadIdx (::emu::self().index)
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
  ::emu::self().warp_barrier->arrive_and_wait("__syncwarp");
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
  ::emu::self().open_group.push_back({destination, source, size - zero_fill, zero_fill});
}
inline void __pipeline_commit() {
  ::emu::Fiber& fiber = ::emu::self();
  fiber.committed_groups.push_back(std::move(fiber.open_group));
  fiber.open_group.clear();
}
inline void __pipeline_wait_prior(size_t pending) {
  ::emu::Fiber& fiber = ::emu::self();
  auto& groups = fiber.committed_groups;
  while (groups.size() > pending) {
    for (const auto& copy : groups.front()) {
      unsigned char* destination = static_cast<unsigned char*>(copy.destination);
      std::memcpy(destination, copy.source, copy.bytes);
      std::memset(destination + copy.bytes, 0, copy.zeros);
      fiber.copied_since_fence = true;
    }
    groups.erase(groups.begin());
  }
}
