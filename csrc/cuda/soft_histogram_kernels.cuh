// The CUDA kernels of fastap::soft_histogram and fastap::soft_histogram_backward: device code only
// (no torch, no host API), so that tests/emulation can also run them on the CPU. The launchers are
// in soft_histogram.cu, the work split in launch_plan.h, the binning math in ../binning.h.
#pragma once

#include <cstdint>

#include "../binning.h"
#include "launch_plan.h"

#ifndef FASTAP_DYNAMIC_SHARED
// The kernel's dynamic shared memory as an `unsigned char*` named `name`.
#define FASTAP_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace fastap {

// Forward, one item (query row i, candidates [begin, end)) per warp at a time; see ForwardPlan.
// Each lane bins candidates begin + lane, begin + lane + 32, ... into its own column of the warp's
// histograms, laid out [class * Q + bin][lane] so that the lanes never share a bank. The lanes
// then split the bins: lane k sums bin k over the 32 columns in a fixed order (starting at column
// k, again one bank per lane). No float atomics: bitwise deterministic. The positives are counted
// exactly (integers). A non-finite, non-ignored score makes the item's histograms NaN.
//
// Single-chunk rows write n_out / p_out / positives_out; otherwise the item writes
// partial_hist[item][class][bin] and partial_positives[item] for soft_histogram_finalize_kernel.
// At most 64 registers per thread, so that registers allow four blocks of 8 warps per SM (as
// many as the shared memory allows at Q = 20): this kernel waits on memory and needs the warps.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaxForwardWarps * kWarpSize, 4) soft_histogram_kernel(const scalar_t* __restrict__ scores,
                                      RelevanceArgs relevance, BinGrid<acc_t> grid,
                                      int64_t num_queries, int64_t num_candidates, int64_t chunk,
                                      int64_t chunks_per_row, acc_t* __restrict__ n_out,
                                      acc_t* __restrict__ p_out,
                                      int64_t* __restrict__ positives_out,
                                      acc_t* __restrict__ partial_hist,
                                      int64_t* __restrict__ partial_positives) {
  FASTAP_DYNAMIC_SHARED(shared_memory);
  constexpr int kUnroll = 4;  // independent loads in flight per lane
  const int q = grid.last_bin + 1;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int warps_per_block = static_cast<int>(blockDim.x) / kWarpSize;
  unsigned char* warp_memory =
      shared_memory + warp * forward_shared_per_warp(q, sizeof(acc_t));
  acc_t* hist = reinterpret_cast<acc_t*>(warp_memory);  // [2 * q][32]
  uint32_t* lane_positives = reinterpret_cast<uint32_t*>(hist + 2 * q * kWarpSize);
  int32_t* lane_poisoned = reinterpret_cast<int32_t*>(lane_positives + kWarpSize);
  acc_t* column = hist + lane;
  const int64_t items = num_queries * chunks_per_row;
  const int64_t item_stride = int64_t{gridDim.x} * warps_per_block;

  for (int64_t item = int64_t{blockIdx.x} * warps_per_block + warp; item < items;
       item += item_stride) {
    const int64_t i = item / chunks_per_row;
    const int64_t begin = (item - i * chunks_per_row) * chunk;
    const int64_t end = begin + chunk < num_candidates ? begin + chunk : num_candidates;
    for (int slot = 0; slot < 2 * q; ++slot) column[slot * kWarpSize] = acc_t(0);

    const scalar_t* row_scores = scores + i * num_candidates;
    const RowRelevance row = relevance.row(i, num_candidates);
    uint32_t positives = 0;
    int32_t poisoned = 0;
    for (int64_t first = begin + lane; first < end; first += kUnroll * kWarpSize) {
      acc_t s[kUnroll];
      bool counted[kUnroll];
      bool positive[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {  // all loads first
        const int64_t j = first + u * kWarpSize;
        counted[u] = j < end && !row.ignored(j);
        positive[u] = counted[u] && row.positive(j);
        s[u] = counted[u] ? static_cast<acc_t>(row_scores[j]) : acc_t(0);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (!counted[u]) continue;
        positives += positive[u] ? 1u : 0u;
        if (!is_finite(s[u])) {
          poisoned = 1;
          continue;
        }
        const BinPosition<acc_t> pos = grid.locate(s[u]);
        acc_t* h = column + ((positive[u] ? q : 0) + pos.bin) * kWarpSize;
        h[0] += acc_t(1) - pos.frac;
        h[kWarpSize] += pos.frac;
      }
    }
    lane_positives[lane] = positives;
    lane_poisoned[lane] = poisoned;
    __syncwarp();

    int64_t item_positives = 0;
    int32_t item_poisoned = 0;
    for (int l = 0; l < kWarpSize; ++l) {  // same address for all lanes: a broadcast
      item_positives += lane_positives[l];
      item_poisoned |= lane_poisoned[l];
    }
    const bool single_chunk = chunks_per_row == 1;
    for (int k = lane; k < q; k += kWarpSize) {
      const acc_t* negatives = hist + k * kWarpSize;
      const acc_t* positives_hist = hist + (q + k) * kWarpSize;
      acc_t negative_sum = acc_t(0);
      acc_t positive_sum = acc_t(0);
      for (int l = 0; l < kWarpSize; ++l) {
        const int source = (l + k) & (kWarpSize - 1);
        negative_sum += negatives[source];
        positive_sum += positives_hist[source];
      }
      if (item_poisoned) negative_sum = positive_sum = acc_t(NAN);
      if (single_chunk) {
        n_out[i * q + k] = negative_sum + positive_sum;
        p_out[i * q + k] = positive_sum;
      } else {
        partial_hist[(item * 2) * q + k] = negative_sum;
        partial_hist[(item * 2 + 1) * q + k] = positive_sum;
      }
    }
    if (lane == 0) {
      if (single_chunk) {
        positives_out[i] = item_positives;
      } else {
        partial_positives[item] = item_positives;
      }
    }
    __syncwarp();  // the next item clears the histograms that were just read
  }
}

// Rows of several chunks: thread (i, k) sums bin k of row i's partial histograms in chunk order
// (deterministic); the thread of bin 0 also sums the row's positives.
template <typename acc_t>
__global__ void soft_histogram_finalize_kernel(const acc_t* __restrict__ partial_hist,
                                               const int64_t* __restrict__ partial_positives,
                                               int64_t num_queries, int64_t num_bins,
                                               int64_t chunks_per_row, acc_t* __restrict__ n_out,
                                               acc_t* __restrict__ p_out,
                                               int64_t* __restrict__ positives_out) {
  const int64_t total = num_queries * num_bins;
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  for (int64_t e = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; e < total; e += stride) {
    const int64_t i = e / num_bins;
    const int64_t k = e - i * num_bins;
    const acc_t* partial = partial_hist + (i * chunks_per_row * 2) * num_bins + k;
    acc_t negative_sum = acc_t(0);
    acc_t positive_sum = acc_t(0);
    for (int64_t c = 0; c < chunks_per_row; ++c) {
      negative_sum += partial[(2 * c) * num_bins];
      positive_sum += partial[(2 * c + 1) * num_bins];
    }
    n_out[e] = negative_sum + positive_sum;
    p_out[e] = positive_sum;
    if (k == 0) {
      int64_t positives = 0;
      for (int64_t c = 0; c < chunks_per_row; ++c) {
        positives += partial_positives[i * chunks_per_row + c];
      }
      positives_out[i] = positives;
    }
  }
}

// Backward: see BackwardPlan. Each candidate is one lookup in its row's slope table (see
// backward_slope_table in ../histogram_inputs.h): no accumulation, deterministic.
template <typename scalar_t, typename acc_t>
__global__ void soft_histogram_backward_kernel(const scalar_t* __restrict__ scores,
                                               RelevanceArgs relevance, BinGrid<acc_t> grid,
                                               int64_t num_queries, int64_t num_candidates,
                                               const acc_t* __restrict__ table,
                                               scalar_t* __restrict__ grad_out) {
  const int slopes = grid.last_bin;
  const int64_t tile = int64_t{blockDim.x} * kBackwardColumnsPerThread;
  for (int64_t i = blockIdx.y; i < num_queries; i += gridDim.y) {
    const scalar_t* row_scores = scores + i * num_candidates;
    const acc_t* row_table = table + i * 2 * slopes;
    scalar_t* row_grad = grad_out + i * num_candidates;
    const RowRelevance row = relevance.row(i, num_candidates);
    const int64_t first = int64_t{blockIdx.x} * tile + threadIdx.x;
#pragma unroll
    for (int u = 0; u < kBackwardColumnsPerThread; ++u) {
      const int64_t j = first + int64_t{u} * blockDim.x;
      if (j >= num_candidates) break;
      acc_t g = acc_t(0);
      if (!row.ignored(j)) {
        const acc_t s = static_cast<acc_t>(row_scores[j]);
        if (!is_finite(s)) {
          g = acc_t(NAN);
        } else {
          const BinPosition<acc_t> pos = grid.locate(s);
          if (pos.sloped) g = row_table[(row.positive(j) ? slopes : 0) + pos.bin];
        }
      }
      row_grad[j] = static_cast<scalar_t>(g);
    }
  }
}

}  // namespace fastap
