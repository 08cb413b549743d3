// Fibers for the emulation of CUDA on the CPU (cuda_host.h): many threads of control on one
// system thread, each with a stack and a context of its own (ucontext.h), which switch only at
// barriers, to a scheduler that runs the others.
//
// run_fibers(threads, body) runs body(t) for every t, each in its fiber, in turns: a round runs
// every fiber that is not done until it waits at a barrier or ends, in an order shuffled anew for
// each round (the same orders in every run, so that a failure repeats). A Barrier is real: a
// fiber that arrives switches away until every one of its count has arrived. So code that forgets
// a barrier between one thread's write and another's read reads, in some round or other, what
// was there before the write; and ThreadSanitizer, told of the fibers, sees no order between them
// but the barriers' atomics, so it reports the race. A round in which no fiber arrives at a
// barrier or ends aborts, saying where the others wait: a barrier that not every thread reaches
// would otherwise hang. The switches tell AddressSanitizer and ThreadSanitizer of the stacks.
//
// With a system thread for each thread instead (as before), each barrier was a trip through the
// kernel's scheduler for every thread, most of the emulation's time on two cores (docs/design.md).
#pragma once

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <any>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
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

namespace emu {

// One thread of control: its context and stack, switched to by the scheduler.
struct Fiber {
  ucontext_t context;
  unsigned char* stack = nullptr;
  unsigned linear = 0;  // its index among the fibers of run_fibers
  // The barrier it waits at (for the message of one that not every thread reaches), and whether
  // it has run to its end. Atomics (relaxed): the scheduler reads them between the fibers, with
  // which ThreadSanitizer orders it only where it switches to one.
  std::atomic<const char*> waiting_at{nullptr};
  std::atomic<bool> done{false};
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

// The running fiber's own T, for the emulations built on these (wgmma_host.h): made at its first
// use in run_fibers.
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
  // barriers' own atomics order the threads. A finished fiber's work comes before what the
  // scheduler does next, as a joined thread's would, and so before what the fibers still running
  // do after it: nothing, in cuda_host.h, where a fiber's last step is the last block's barrier.
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

// Fiber t, to start in fiber_main. (A function of its own: getcontext returns twice,
// which would leave the variables of a loop around it undefined after a longjmp, GCC warns.)
[[gnu::noinline]] inline std::unique_ptr<Fiber> make_fiber(unsigned t) {
  auto fiber = std::make_unique<Fiber>();
  fiber->linear = t;
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
// the others will not reach: it aborts, saying how many wait at which barrier.
inline void run_fibers(unsigned threads, std::function<void(unsigned)> body) {
  Scheduler s;
  s.body = std::move(body);
  scheduler = &s;
#if defined(FASTAP_EMULATION_TSAN)
  s.tsan_fiber = __tsan_get_current_fiber();
#endif
  for (unsigned t = 0; t < threads; ++t) s.fibers.push_back(make_fiber(t));
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

}  // namespace emu
