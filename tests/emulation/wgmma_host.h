// Hopper's wgmma (csrc/cuda/wgmma.cuh) on the CPU, for cuda_host.h.
//
// mma_m64n32k16 and mma_m64n64k16_bt encode their descriptors as the GPU code does, and the
// emulation decodes them the way the PTX ISA describes (start address, leading and stride byte
// offsets, each >> 4 in 14 bits; K-major or MN-major canonical layouts without swizzle), so a
// wrong descriptor or layout gives wrong results here too. Each thread computes the accumulator
// elements that the ISA assigns to it
// (accumulator_row/col). The multiplication is asynchronous as on the GPU: the accumulators change
// only at commit_and_wait, and the operands are read both when a wgmma is issued and when it is
// waited for; the two must agree, since the tensor cores may read them at any moment in between
// (an operand written after the barrier, or refilled before the wait, aborts). A wgmma issued
// without begin() first (wgmma.fence) aborts as well. The tensor cores read through the async
// proxy: at issue the operands must also equal what cuda_host.h's async view of shared memory
// holds, which a __syncthreads updates only when every thread fenced (fence_operands) since the
// barrier before and after its last cp.async landed; a missing fence aborts.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cuda_host.h"
#include "wmma_host.h"
#include "../../csrc/cuda/wgmma.cuh"

namespace fastap {
namespace embedding {
namespace wgmma {
namespace emulated {

constexpr int kMaxAccumulators = 32;
using Products = void (*)(uint64_t a_desc, uint64_t b_desc, float* out);

struct Pending {
  float* d;
  int count;  // accumulators
  uint64_t a_desc;
  uint64_t b_desc;
  Products products;
  float issued[kMaxAccumulators];
};
// This thread's wgmma state: the issued multiplications not yet waited for, and whether a
// wgmma.fence (begin) came since the last wait.
struct ThreadState {
  std::vector<Pending> batch;
  bool begun = false;
};
inline ThreadState& state() { return ::emu::thread_state<ThreadState>(); }

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "emulation: wgmma: %s\n", what);
  std::abort();
}

// The shared address of element (mn, k) of the operand that `desc` describes, K-major or
// (kMnMajor) MN-major.
template <typename T, bool kMnMajor = false>
size_t element_address(uint64_t desc, int mn, int k) {
  const size_t start = (desc & 0x3fffu) << 4;
  const size_t leading = ((desc >> 16) & 0x3fffu) << 4;
  const size_t stride = ((desc >> 32) & 0x3fffu) << 4;
  if ((desc >> 49) != 0) fail("base offset or swizzle bits set in a no-swizzle descriptor");
  return kMnMajor ? start + mn / 8 * stride + mn % 8 * 2 + k / 8 * leading + k % 8 * 16
                  : start + mn / 8 * stride + mn % 8 * 16 + k / 8 * leading + k % 8 * 2;
}
template <typename T>
float element(size_t address) {
  return static_cast<float>(*static_cast<const T*>(__cvta_shared_to_generic(address)));
}

// Calls visit(e, a, b) for each accumulator e of this thread and each k of one m64nNk16, with
// the shared addresses of A[row][k] and of B's element (col, k) (B K-major: stored as B^T's rows;
// kMnMajor: as B's rows), row and col those of e.
template <typename T, int kN, bool kMnMajor, typename Visit>
void for_each_operand_pair(uint64_t a_desc, uint64_t b_desc, Visit&& visit) {
  const int warp = static_cast<int>(threadIdx.x) % kGroupThreads / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  for (int e = 0; e < kN / 2; ++e) {
    const int row = accumulator_row(warp, lane, e);
    const int col = accumulator_col(lane, e);
    for (int k = 0; k < kStep; ++k) {
      visit(e, element_address<T>(a_desc, row, k), element_address<T, kMnMajor>(b_desc, col, k));
    }
  }
}

// This thread's kN / 2 sums over k of A[row][k] B[k][col] for one m64nNk16.
template <typename T, int kN, bool kMnMajor>
void products(uint64_t a_desc, uint64_t b_desc, float* out) {
  for (int e = 0; e < kN / 2; ++e) out[e] = 0.0f;
  for_each_operand_pair<T, kN, kMnMajor>(a_desc, b_desc, [&](int e, size_t a, size_t b) {
    out[e] += element<T>(a) * element<T>(b);
  });
}

// Whether every operand element that this thread's products read holds the same bytes for the
// async proxy (the tensor cores) as for the threads: else a writer did not fence it.
template <typename T, int kN, bool kMnMajor>
bool visible_to_async_proxy(uint64_t a_desc, uint64_t b_desc) {
  const auto same = [](size_t address) {
    return std::memcmp(::emu::async_proxy_pointer(address), __cvta_shared_to_generic(address),
                       sizeof(T)) == 0;
  };
  bool visible = true;
  for_each_operand_pair<T, kN, kMnMajor>(a_desc, b_desc, [&](int, size_t a, size_t b) {
    visible = visible && same(a) && same(b);
  });
  return visible;
}

template <typename T, int kN, bool kMnMajor>
void issue(float* d, uint64_t a_desc, uint64_t b_desc) {
  if (!state().begun) fail("mma_async without wgmma.fence (begin) first");
  Pending p{d, kN / 2, a_desc, b_desc, &products<T, kN, kMnMajor>, {}};
  if (!visible_to_async_proxy<T, kN, kMnMajor>(a_desc, b_desc)) {
    fail("an operand changed without a fence.proxy.async by every thread before the barrier "
         "(the tensor cores would read a stale value)");
  }
  p.products(p.a_desc, p.b_desc, p.issued);
  state().batch.push_back(p);
}

}  // namespace emulated

inline void fence_operands() { ::emu::fence_async_proxy(); }

template <int N>
void begin(float (&)[N]) {
  emulated::state().begun = true;
}

template <typename T>
void mma_m64n32k16(float (&d)[16], const T* a, int a_depth, const T* b, int b_depth) {
  emulated::issue<T, 32, false>(
      d, descriptor(static_cast<uint32_t>(__cvta_generic_to_shared(a)), a_depth),
      descriptor(static_cast<uint32_t>(__cvta_generic_to_shared(b)), b_depth));
}

template <typename T>
void mma_m64n64k16_bt(float (&d)[32], const T* a, int a_depth, const T* b, int b_depth) {
  emulated::issue<T, 64, true>(
      d, descriptor(static_cast<uint32_t>(__cvta_generic_to_shared(a)), a_depth),
      descriptor_mn(static_cast<uint32_t>(__cvta_generic_to_shared(b)), b_depth));
}

template <int N>
void commit_and_wait(float (&)[N]) {
  emulated::ThreadState& state = emulated::state();
  for (emulated::Pending& p : state.batch) {
    float waited[emulated::kMaxAccumulators];
    p.products(p.a_desc, p.b_desc, waited);
    if (std::memcmp(waited, p.issued, p.count * sizeof(float)) != 0) {
      emulated::fail("an operand changed while its wgmma was in flight");
    }
    for (int e = 0; e < p.count; ++e) p.d[e] += waited[e];
  }
  state.batch.clear();
  state.begun = false;
}

}  // namespace wgmma
}  // namespace embedding
}  // namespace fastap
