// The histogram update of the CUDA forward kernels (soft_histogram_kernel and the fused
// embedding_histogram_kernel): each thread bins its candidates into a private column of two-class
// histograms in shared memory. Device code only, no torch (tests/emulation runs it on the CPU).
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../binning.h"
#include "launch_plan.h"  // histogram_class_slots

namespace fastap {

// floor(t) for 0 <= t < 2^23 (float) or 2^52 (double) without a float-to-integer conversion:
// rounded down, magic + t is magic + floor(t) exactly when magic is an integer in [2^23, 2^24)
// (2^52 .. 2^53 for double), where the spacing of the floats is 1; so its low word is the low word
// of `magic` plus floor(t), and (magic + t) - magic is floor(t) as a float. One addition, on the
// FMA pipe, instead of F2I and I2F on the slower conversion pipe.
template <typename T>
struct MagicFloor {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, double>, "float or double");
  using Bits = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  static constexpr T kMagic = sizeof(T) == 4 ? T(8388608.0) : T(4503599627370496.0);  // 2^23, 2^52

  static __device__ __forceinline__ T add_down(T t, T magic) {
    if constexpr (sizeof(T) == 4) {
      return __fadd_rd(t, magic);
    } else {
      return __dadd_rd(t, magic);
    }
  }
  static __device__ __forceinline__ uint32_t low_word(T x) {
    Bits bits;
    memcpy(&bits, &x, sizeof(bits));
    return static_cast<uint32_t>(bits);
  }
};

// One thread's histograms: bin k of class c (0 negatives, 1 positives) is column[(c * (Q + 1) +
// k) * kStride], where kStride is the number of threads that share the histogram array (laid out
// [class * (Q + 1) + bin][thread], so that threads never share a bank). Each class has a spare
// bin Q: a score at the bottom of the range (t = Q - 1, f = 0) puts its 1 into bin Q - 1 and its
// 0 into bin Q, which saves clamping k to Q - 2 (the shared math clamps k and gets f = 1 there:
// the same weights). The reductions read bins 0 .. Q - 1 only.
//
// add() puts the weight 1 - f of a candidate into bin k and f into bin k + 1 of its class, with
// k = floor(t) and its class found together by MagicFloor: magic + c (Q + 1) + t rounded down.
// It turns `probe` NaN if the score is not finite (0 * inf and 0 * NaN are NaN), which poisons
// the row's result at the end. A candidate that does not count adds weight 0 (exactly nothing)
// rather than branching around the update, so that the inner loops stay straight-line code even
// where the ignore mask differs from thread to thread.
//
// kCountPositives: count the positives one by one (positives()). Without it the caller takes the
// count from the positive histogram's mass, which saves an instruction per candidate: each
// counted candidate adds 1 - f and f, so the mass of a thread's item is its positive count up
// to rounding. For an item of at most 4096 candidates over 32 lanes in float that rounding is
// below 0.1 (each of at most 8192 lane additions is off by at most half an ulp of 128, each of
// the reduction's by half an ulp of its sum, together at most 4096 * 2^-24 * 64), so rounding
// the mass to the nearest integer gives the count exactly (see soft_histogram_kernel).
template <typename acc_t, int kStride, bool kCountPositives>
struct LaneHistograms {
  using Floor = MagicFloor<acc_t>;
  static constexpr uint32_t kSlotBytes = kStride * sizeof(acc_t);
  // The shared memory address of the thread's column less low_word(kMagic) slots (modulo 2^32),
  // so that slot k lies low_word(kMagic + k) slots from it: one multiply-add per candidate.
  uint32_t biased_address;
  acc_t negative_magic;  // kMagic: class 0 starts at slot 0
  acc_t positive_magic;  // kMagic + Q + 1: class 1 starts at slot Q + 1
  uint32_t count;        // positives (kCountPositives)
  acc_t probe;

  __device__ __forceinline__ LaneHistograms(acc_t* column, int q)
      : biased_address(static_cast<uint32_t>(__cvta_generic_to_shared(column)) -
                       Floor::low_word(Floor::kMagic) * kSlotBytes),
        negative_magic(Floor::kMagic),
        positive_magic(Floor::kMagic + static_cast<acc_t>(histogram_class_slots(q))),
        count(0),
        probe(acc_t(0)) {}

  __device__ __forceinline__ void add(const BinGrid<acc_t>& grid, acc_t s, bool counted,
                                      bool positive) {
    const acc_t weight = counted ? acc_t(1) : acc_t(0);
    if (kCountPositives) count += static_cast<uint32_t>(counted & positive);
    probe = fma(counted ? s : acc_t(0), acc_t(0), probe);
    const acc_t t = grid.position(s);  // in [0, Q - 1] even for a non-finite s
    const acc_t magic = positive ? positive_magic : negative_magic;
    const acc_t above = Floor::add_down(t, magic);  // magic + slot, slot = c (Q + 1) + floor(t)
    const acc_t frac = t - (above - magic);         // both differences exact
    const uint32_t address = Floor::low_word(above) * kSlotBytes + biased_address;
    acc_t* h = static_cast<acc_t*>(__cvta_shared_to_generic(address));
    h[0] += weight * (acc_t(1) - frac);  // weight 0 or 1: exact either way
    h[kStride] += weight * frac;
  }
  __device__ __forceinline__ uint32_t positives() const { return count; }
};

}  // namespace fastap
