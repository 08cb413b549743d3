// The histogram update of the CUDA forward kernels (soft_histogram_kernel and the fused
// embedding_histogram_kernel): each thread bins its candidates into a private column of two-class
// histograms in shared memory. Device code only, no torch (tests/emulation runs it on the CPU).
#pragma once

#include <cstdint>

#include "../binning.h"

namespace fastap {

// One thread's histograms: bin k of class c (0 negatives, 1 positives) is column[(c * q + k) *
// kStride], where kStride is the number of threads that share the histogram array (laid out
// [class * Q + bin][thread], so that threads never share a bank). add() puts the weight 1 - f of
// a candidate into bin k and f into bin k + 1 of its class, counts the positives exactly, and
// turns `probe` NaN if the score is not finite (0 * inf and 0 * NaN are NaN), which poisons the
// row's result at the end. A candidate that does not count adds weight 0 (exactly nothing)
// rather than branching around the update, so that the inner loops stay straight-line code even
// where the ignore mask differs from thread to thread.
//
// kFewCandidates: the thread bins fewer than 2^32 / (2 Q kStride) candidates (the score-matrix
// forward: at most kForwardChunk / 32 per item), so the positives can be counted as the sum of
// the class offsets already computed for the address, which saves an instruction and a half per
// candidate; otherwise they are counted one by one.
template <typename acc_t, int kStride, bool kFewCandidates>
struct LaneHistograms {
  acc_t* column;
  int class_stride;  // q * kStride
  uint32_t count;    // positives, or with kFewCandidates positives * class_stride
  acc_t probe;

  __device__ __forceinline__ LaneHistograms(acc_t* column_, int q)
      : column(column_), class_stride(q * kStride), count(0), probe(acc_t(0)) {}

  __device__ __forceinline__ void add(const BinGrid<acc_t>& grid, acc_t s, bool counted,
                                      bool positive) {
    const acc_t weight = counted ? acc_t(1) : acc_t(0);
    const int class_offset = positive ? class_stride : 0;
    if (kFewCandidates) {
      count += counted ? class_offset : 0;
    } else {
      count += static_cast<uint32_t>(counted & positive);
    }
    probe = fma(counted ? s : acc_t(0), acc_t(0), probe);
    const BinPosition<acc_t> pos = grid.locate(s);  // in range even for a non-finite s
    acc_t* h = reinterpret_cast<acc_t*>(reinterpret_cast<char*>(column) +
        static_cast<uint32_t>(class_offset + pos.bin * kStride) * sizeof(acc_t));
    h[0] += weight * (acc_t(1) - pos.frac);  // weight 0 or 1: exact either way
    h[kStride] += weight * pos.frac;
  }
  __device__ __forceinline__ uint32_t positives() const {
    return kFewCandidates ? count / class_stride : count;
  }
};

}  // namespace fastap
