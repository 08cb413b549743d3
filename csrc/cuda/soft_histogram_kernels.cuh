// The CUDA kernels of fastap::soft_histogram and fastap::soft_histogram_backward: device code only
// (no ATen, no host API; of torch only c10's bf16 type), so that tests/emulation can also run them
// on the CPU. The launchers are in soft_histogram.cu, the work split in launch_plan.h, the binning
// math in ../binning.h.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../binning.h"
#include "dynamic_shared.cuh"
#include "lane_histograms.cuh"
#include "launch_plan.h"
#include "pin.cuh"

namespace fastap {

// Two kernels of each op, for each dtype (the launchers pick one with forward_kernel() and
// backward_kernel(), as tests/emulation does):
//   fast:    relevance from labels and no ignore mask, and rows of whole units
//            (fast_path_applies(): pairs of candidates in the forward, 16-byte vectors of scores
//            in the backward): each thread loads a unit's scores and labels in as few loads as
//            they fit, and the kernel holds no test of the other relevance forms;
//   general: any relevance form, one score per load; compiled once for labels and once for a
//            dense relevance matrix (kDense), the ignore mask tested at run time.
// Both are branch-free in their inner loops: the loads of a step are issued before the first use,
// a candidate that does not count adds weight 0 (LaneHistograms) or gets a zero gradient, and a
// non-finite score is binned like any other (locate() keeps it in range) but turns the row's
// `probe` to NaN, which poisons its result. .ci/sass_report.py counts what that costs per
// candidate in the compiled code (docs/design.md, section 5).

// The raw bits of kBytes bytes, loaded in one instruction (4, 8 or 16 bytes).
template <int kBytes>
struct RawBits;
template <>
struct RawBits<4> {
  using type = uint32_t;
  static __device__ __forceinline__ type zero() { return 0u; }
};
template <>
struct RawBits<8> {
  using type = uint2;
  static __device__ __forceinline__ type zero() { return make_uint2(0u, 0u); }
};
template <>
struct RawBits<16> {
  using type = uint4;
  static __device__ __forceinline__ type zero() { return make_uint4(0u, 0u, 0u, 0u); }
};

// The fast kernels' unit: kCandidates consecutive candidates, whose scores a thread loads in one
// instruction (Raw) and whose int64 labels in kCandidates / 2 16-byte loads.
//   The forward's unit is a pair (ForwardUnit): 8 bytes of scores in fp32, 4 in fp16/bf16, 16 in
//   fp64, and its two labels in one load. Lane l of a warp takes pair l of each run of 32, so that
//   every load of a warp is contiguous. With a wider unit per lane (16 bytes of scores: 4 fp32 or
//   8 bf16 candidates, until 2026-12-04) the lanes read their labels 32 or 64 bytes apart, at
//   twice or four times the L1 traffic of their bytes, on the data path that bounds the forward:
//   pairs took the H200's forward from 0.104 to 0.094 ms in fp32 and from 0.128 to 0.086 ms in
//   bf16 (8192^2, Q = 20; docs/design.md, section 5). It bins kForwardUnits pairs per lane and
//   step: 32 bytes of scores in flight per lane whatever the dtype, since streaming at the
//   memory's rate takes as many bytes in flight in bf16 as in fp32 (within the 64 registers the
//   forward is held to).
//   The backward's unit is a 16-byte vector of scores (BackwardUnit), and a thread takes
//   kBackwardCandidates = 16 candidates in such vectors (which spreads its per-row work thinner).
//   The backward is not bound by L1, and there the same pairs cost 3 to 13% in bf16 on the H200
//   (twice the load and store instructions of 16-byte vectors for the same bytes), 0 to 3.4% in
//   fp32.
template <typename scalar_t, int kCandidates>
struct ScoreUnit {
  using Bits = RawBits<kCandidates * static_cast<int>(sizeof(scalar_t))>;
  using Raw = typename Bits::type;
  static_assert(kCandidates % 2 == 0, "labels are loaded two at a time");
  static constexpr int kSize = kCandidates;

  // The raw scores of unit x (scores aligned to a unit), or zeros where !inside (nothing read).
  static __device__ __forceinline__ Raw load(const scalar_t* __restrict__ scores, int x,
                                             bool inside) {
    return inside ? *reinterpret_cast<const Raw*>(scores + kCandidates * x) : Bits::zero();
  }
  static __device__ __forceinline__ void store(scalar_t* __restrict__ scores, int x,
                                               const Raw& raw) {
    *reinterpret_cast<Raw*>(scores + kCandidates * x) = raw;
  }

  // Score e of a unit loaded as raw bits.
  template <typename acc_t>
  static __device__ __forceinline__ acc_t score(const Raw& raw, int e) {
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      // A bf16 is the upper half of a float: one shift or one mask of its 32-bit word (the
      // generic conversion spends two instructions on the upper element of a word).
      uint32_t word;
      memcpy(&word, reinterpret_cast<const unsigned char*>(&raw) + (e / 2) * 4, sizeof(word));
      const uint32_t bits = e % 2 == 0 ? word << 16 : word & 0xffff0000u;
      float value;
      memcpy(&value, &bits, sizeof(value));
      return static_cast<acc_t>(value);
    }
    scalar_t value;
    memcpy(&value, reinterpret_cast<const unsigned char*>(&raw) + e * sizeof(scalar_t),
           sizeof(scalar_t));
    return static_cast<acc_t>(value);
  }

  // The labels of unit x (labels 16-byte aligned), two per 16-byte load, into
  // label[0 .. kCandidates); zeros where !inside (nothing is read).
  static __device__ __forceinline__ void load_labels(const int64_t* __restrict__ labels, int x,
                                                     bool inside, int64_t* label) {
#pragma unroll
    for (int e = 0; e < kCandidates; e += 2) {
      const uint4 pair = inside ? *reinterpret_cast<const uint4*>(labels + kCandidates * x + e)
                                : make_uint4(0u, 0u, 0u, 0u);
      memcpy(label + e, &pair, sizeof(pair));
    }
  }
};

template <typename scalar_t>
using ForwardUnit = ScoreUnit<scalar_t, 2>;
template <typename scalar_t>
using BackwardUnit = ScoreUnit<scalar_t, 16 / static_cast<int>(sizeof(scalar_t))>;
// The forward's pairs per lane and step: 32 bytes of scores in flight (4 pairs in fp32, 8 in bf16).
template <typename scalar_t>
constexpr int kForwardUnits =
    32 / (ForwardUnit<scalar_t>::kSize * static_cast<int>(sizeof(scalar_t)));
constexpr int kBackwardCandidates = 16;  // per thread

// Whether the fast kernels apply: labels without an ignore mask, every row (and every chunk of
// `chunk` candidates: the forward plan's; 0 for the backward) holds whole units of `unit`
// candidates (2 in the forward, BackwardUnit's in the backward), the scores (and, in the
// backward, the gradient's rows: grad_scores; the forward passes null) start on a unit's boundary
// and the candidate labels on a 16-byte one.
template <typename scalar_t>
inline bool fast_path_applies(const RelevanceArgs& relevance, const scalar_t* scores,
                              int64_t num_candidates, int64_t unit, int64_t chunk,
                              const scalar_t* grad_scores = nullptr) {
  const uintptr_t unit_bytes = static_cast<uintptr_t>(unit) * sizeof(scalar_t);
  return relevance.labels_only() && reinterpret_cast<uintptr_t>(scores) % unit_bytes == 0 &&
         reinterpret_cast<uintptr_t>(relevance.ref_labels) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(grad_scores) % unit_bytes == 0 &&
         num_candidates % unit == 0 && chunk % unit == 0;
}

// The forward takes an item's positive count from its positive histogram's mass, which is exact
// for items of at most 4096 candidates (LaneHistograms).
static_assert(kForwardChunk <= 4096, "the positive mass of an item must round to its count");

// The forward's lane histograms: positives counted from the mass.
template <typename acc_t>
using WarpHistograms = LaneHistograms<acc_t, kWarpSize, false>;

// General path: bins the candidates o = group + lane + 32 u (u < kBinUnroll) of one item (`scores`
// and `row` start at the item's first candidate). The warp's group is one call for all its lanes:
// kEdge (warp-uniform) says that it may reach past `length` or hold the row's own column, which
// are then tested candidate by candidate; inner groups skip both tests.
constexpr int kBinUnroll = 4;  // independent loads in flight per lane
constexpr int kBinGroup = kBinUnroll * kWarpSize;

template <bool kEdge, bool kDense, typename scalar_t, typename acc_t>
__device__ __forceinline__ void bin_group(const scalar_t* __restrict__ scores,
                                          const RowRelevance& row, int group, int length,
                                          const BinGrid<acc_t>& grid,
                                          WarpHistograms<acc_t>& histograms) {
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  acc_t s[kBinUnroll];
  bool counted[kBinUnroll];
  bool positive[kBinUnroll];
#pragma unroll
  for (int u = 0; u < kBinUnroll; ++u) {  // all loads first
    const int o = group + lane + u * kWarpSize;
    const bool inside = !kEdge || o < length;
    counted[u] = inside && !row.template ignored<kEdge>(o);
    positive[u] = inside && row.template positive<kDense>(o);
    s[u] = inside ? static_cast<acc_t>(scores[o]) : acc_t(0);
  }
#pragma unroll
  for (int u = 0; u < kBinUnroll; ++u) histograms.add(grid, s[u], counted[u], positive[u]);
}

// Fast path: bins the 2 kForwardUnits candidates of the lane's pairs v = 0 .. kForwardUnits - 1
// of a group, the pair at `scores + 64 v` with its labels at `labels + 64 v` (the caller points
// both at the lane's first pair of the group: pair p of an item is candidates 2 p and 2 p + 1, and
// lane l takes pair l of each run of 32). kEdge as above: then only the pairs with 32 v <
// `remaining` are inside, and the candidate 64 v + e == `self` (relative to the lane's first
// candidate) is the row's own column.
template <bool kEdge, typename scalar_t, typename acc_t>
__device__ __forceinline__ void bin_pair_group(const scalar_t* __restrict__ scores,
                                               const int64_t* __restrict__ labels,
                                               int64_t query_label, int remaining, int self,
                                               const BinGrid<acc_t>& grid,
                                               WarpHistograms<acc_t>& histograms) {
  using Pair = ForwardUnit<scalar_t>;
  constexpr int kPairs = kForwardUnits<scalar_t>;
  typename Pair::Raw raw[kPairs];
  int64_t label[2 * kPairs];
#pragma unroll
  for (int v = 0; v < kPairs; ++v) {  // all loads first
    const bool inside = !kEdge || v * kWarpSize < remaining;
    raw[v] = Pair::load(scores, v * kWarpSize, inside);
    Pair::load_labels(labels, v * kWarpSize, inside, label + 2 * v);
  }
#pragma unroll
  for (int v = 0; v < kPairs; ++v) {
    const bool inside = !kEdge || v * kWarpSize < remaining;
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const bool counted = inside && !(kEdge && v * kWarpSize * 2 + e == self);
      const bool positive = label[2 * v + e] == query_label;
      histograms.add(grid, Pair::template score<acc_t>(raw[v], e), counted, positive);
    }
  }
}

// Forward, one item (query row i, candidates [begin, end)) per warp at a time; see ForwardPlan.
// Each lane bins candidates begin + lane, begin + lane + 32, ... into its own column of the warp's
// histograms, laid out [class * (Q + 1) + bin][lane] so that the lanes never share a bank. The
// lanes then split the bins: lane k sums bin k over the 32 columns in a fixed order (starting at
// column k, again one bank per lane). No float atomics: bitwise deterministic. The positives are
// counted exactly: the item's positive mass, summed in a fixed order, rounded to the nearest
// integer (LaneHistograms says why that is exact). A non-finite, non-ignored score makes the
// item's histograms NaN.
//
// Single-chunk rows write n_out / p_out / positives_out; otherwise the item writes
// partial_hist[item][class][bin] and partial_positives[item] for soft_histogram_finalize_kernel.
// kFast: the fast path (see the top of this file).
// At most 64 registers per thread in the fast kernel, so that registers allow four blocks of 8
// warps per SM (as many as the shared memory allows at Q = 20), and 80 in the general one (three
// blocks): this kernel waits on memory and needs the warps.
template <typename scalar_t, typename acc_t, bool kFast, bool kDense>
__global__ void __launch_bounds__(kMaxForwardWarps * kWarpSize, kFast ? 4 : 3) soft_histogram_kernel(const scalar_t* __restrict__ scores,
                                      RelevanceArgs relevance, BinGrid<acc_t> grid,
                                      int64_t num_queries, int64_t num_candidates, int64_t chunk,
                                      int64_t chunks_per_row, acc_t* __restrict__ n_out,
                                      acc_t* __restrict__ p_out,
                                      int64_t* __restrict__ positives_out,
                                      acc_t* __restrict__ partial_hist,
                                      int64_t* __restrict__ partial_positives) {
  FASTAP_DYNAMIC_SHARED(shared_memory);
  const int q = grid.last_bin + 1;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int warps_per_block = static_cast<int>(blockDim.x) / kWarpSize;
  unsigned char* warp_memory =
      shared_memory + warp * forward_shared_per_warp(q, sizeof(acc_t));
  const int slots = static_cast<int>(histogram_slots(q));
  const int class_slots = static_cast<int>(histogram_class_slots(q));
  acc_t* hist = reinterpret_cast<acc_t*>(warp_memory);  // [slots][32]
  acc_t* lane_mass = hist + slots * kWarpSize;           // each lane's share of the positive mass
  int32_t* lane_poisoned = reinterpret_cast<int32_t*>(lane_mass + kWarpSize);
  acc_t* column = hist + lane;
  const int64_t items = num_queries * chunks_per_row;
  const int64_t item_stride = int64_t{gridDim.x} * warps_per_block;

  for (int64_t item = int64_t{blockIdx.x} * warps_per_block + warp; item < items;
       item += item_stride) {
    const int64_t i = item / chunks_per_row;
    const int64_t begin = (item - i * chunks_per_row) * chunk;
    const int64_t end = begin + chunk < num_candidates ? begin + chunk : num_candidates;
    const int length = static_cast<int>(end - begin);  // <= chunk <= kForwardChunk
    for (int slot = 0; slot < slots; ++slot) column[slot * kWarpSize] = acc_t(0);

    const scalar_t* item_scores = scores + i * num_candidates + begin;
    RowRelevance row = relevance.row(i, num_candidates).window(begin, length);
    if (!kFast) {  // computed once per item, not again for every load
      pin(item_scores);
      if (kDense) {
        pin(row.dense_relevance);
      } else {
        pin(row.ref_labels);
      }
      pin(row.ignore_row);
    }
    WarpHistograms<acc_t> histograms(column, q);
    if (kFast) {  // the item holds whole pairs (fast_path_applies)
      constexpr int kStep = kForwardUnits<scalar_t> * kWarpSize;  // pairs per group
      const int pairs = length / 2;
      const int self_pair = row.self_column < 0 ? -1 : static_cast<int>(row.self_column) / 2;
      const scalar_t* lane_scores = item_scores + 2 * lane;
      const int64_t* lane_labels = row.ref_labels + 2 * lane;
      for (int group = 0; group < pairs; group += kStep) {
        const bool edge = group + kStep > pairs ||
                          static_cast<unsigned>(self_pair - group) < static_cast<unsigned>(kStep);
        if (edge) {
          const int first = group + lane;  // the lane's first pair
          bin_pair_group<true>(lane_scores, lane_labels, row.query_label, pairs - first,
                               static_cast<int>(row.self_column) - first * 2, grid, histograms);
        } else {
          bin_pair_group<false>(lane_scores, lane_labels, row.query_label, 0, 0, grid,
                                histograms);
        }
        lane_scores += 2 * kStep;
        lane_labels += 2 * kStep;
      }
    } else {
      for (int group = 0; group < length; group += kBinGroup) {
        const bool edge = group + kBinGroup > length ||
                          static_cast<uint64_t>(row.self_column - group) < kBinGroup;
        if (edge) {
          bin_group<true, kDense>(item_scores, row, group, length, grid, histograms);
        } else {
          bin_group<false, kDense>(item_scores, row, group, length, grid, histograms);
        }
      }
    }
    lane_poisoned[lane] = is_finite(histograms.probe) ? 0 : 1;
    __syncwarp();

    int32_t item_poisoned = 0;
    for (int l = 0; l < kWarpSize; ++l) item_poisoned |= lane_poisoned[l];  // a broadcast
    const bool single_chunk = chunks_per_row == 1;
    acc_t mass = acc_t(0);  // the positive mass of this lane's bins
    for (int k = lane; k < q; k += kWarpSize) {
      const acc_t* negatives = hist + k * kWarpSize;
      const acc_t* positives_hist = hist + (class_slots + k) * kWarpSize;
      acc_t negative_sum = acc_t(0);
      acc_t positive_sum = acc_t(0);
      for (int l = 0; l < kWarpSize; ++l) {
        const int source = (l + k) & (kWarpSize - 1);
        negative_sum += negatives[source];
        positive_sum += positives_hist[source];
      }
      mass += positive_sum;
      if (item_poisoned) negative_sum = positive_sum = acc_t(NAN);
      if (single_chunk) {
        n_out[i * q + k] = negative_sum + positive_sum;
        p_out[i * q + k] = positive_sum;
      } else {
        partial_hist[(item * 2) * q + k] = negative_sum;
        partial_hist[(item * 2 + 1) * q + k] = positive_sum;
      }
    }
    lane_mass[lane] = mass;
    __syncwarp();
    if (lane == 0) {
      acc_t item_mass = acc_t(0);
      for (int l = 0; l < kWarpSize; ++l) item_mass += lane_mass[l];
      // Within 0.1 of the count (LaneHistograms), and never negative: round to nearest.
      const int64_t item_positives = static_cast<int64_t>(item_mass + acc_t(0.5));
      if (single_chunk) {
        positives_out[i] = item_positives;
      } else {
        partial_positives[item] = item_positives;
      }
    }
    // (Not needed as the item is written: its last reads of the histograms end before the barrier
    // after lane_mass, and lane 0's read of lane_mass before the next item's first barrier. Kept
    // so that the next item's clearing does not rest on that order.)
    __syncwarp();
  }
}

// Rows of several chunks: thread (i, k) sums bin k of row i's partial histograms in chunk order
// (deterministic), in fp64 whatever acc_t, rounded once: a row of 2^18 chunks whose partials
// repeat would drift by about 1e-3 of the sum in fp32. The thread of bin 0 also sums the row's
// positives.
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
    double negative_sum = 0.0;
    double positive_sum = 0.0;
    for (int64_t c = 0; c < chunks_per_row; ++c) {
      negative_sum += static_cast<double>(partial[(2 * c) * num_bins]);
      positive_sum += static_cast<double>(partial[(2 * c + 1) * num_bins]);
    }
    n_out[e] = static_cast<acc_t>(negative_sum + positive_sum);
    p_out[e] = static_cast<acc_t>(positive_sum);
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
// backward_slope_table in ../histogram_inputs.h): no accumulation, deterministic. A thread takes
// backward_columns(kFast) candidates of a row: the general kernel kBackwardColumnsPerThread single
// scores kBackwardThreads apart, the fast one kBackwardCandidates in 16-byte vectors
// (BackwardUnit) kBackwardThreads vectors apart (stored as vectors too). It looks up every
// candidate (the index is always inside the table) and masks the result. Launched with
// kBackwardThreads threads per block.
constexpr int backward_columns(bool fast) {
  return fast ? kBackwardCandidates : kBackwardColumnsPerThread;
}

// The fast backward for the candidates [tile_begin, tile_begin + 16 kBackwardThreads ...) of one
// row (`vectors` vectors): thread t takes vectors t + kBackwardThreads v. kSelf (block-uniform):
// the tile holds the row's own column, `self` (relative to the tile), tested candidate by
// candidate.
template <bool kSelf, typename scalar_t, typename acc_t>
__device__ __forceinline__ void backward_vectors(const scalar_t* __restrict__ tile_scores,
                                                 const int64_t* __restrict__ tile_labels,
                                                 int64_t query_label, int self, int vectors,
                                                 const BinGrid<acc_t>& grid,
                                                 const acc_t* __restrict__ row_table,
                                                 scalar_t* __restrict__ tile_grad) {
  using Vector = BackwardUnit<scalar_t>;
  constexpr int kScores = Vector::kSize;
  constexpr int kVectors = kBackwardCandidates / kScores;
  const int t = static_cast<int>(threadIdx.x);
  typename Vector::Raw raw[kVectors];
  int64_t label[kBackwardCandidates];
#pragma unroll
  for (int v = 0; v < kVectors; ++v) {  // all loads first
    const int x = t + v * kBackwardThreads;
    const bool inside = x < vectors;
    raw[v] = Vector::load(tile_scores, x, inside);
    Vector::load_labels(tile_labels, x, inside, label + v * kScores);
  }
#pragma unroll
  for (int v = 0; v < kVectors; ++v) {
    const int x = t + v * kBackwardThreads;
    typename Vector::Raw out;
#pragma unroll
    for (int e = 0; e < kScores; ++e) {
      const bool counted = !(kSelf && x * kScores + e == self);
      const acc_t s = Vector::template score<acc_t>(raw[v], e);
      const bool positive = label[v * kScores + e] == query_label;
      const scalar_t g =
          static_cast<scalar_t>(counted ? score_gradient(s, positive, grid, row_table) : acc_t(0));
      memcpy(reinterpret_cast<unsigned char*>(&out) + e * sizeof(scalar_t), &g, sizeof(scalar_t));
    }
    if (x < vectors) Vector::store(tile_grad, x, out);
  }
}

template <typename scalar_t, typename acc_t, bool kFast, bool kDense>
__global__ void __launch_bounds__(kBackwardThreads)
    soft_histogram_backward_kernel(const scalar_t* __restrict__ scores, RelevanceArgs relevance,
                                   BinGrid<acc_t> grid, int64_t num_queries,
                                   int64_t num_candidates, const acc_t* __restrict__ table,
                                   scalar_t* __restrict__ grad_out) {
  constexpr int kColumns = backward_columns(kFast);
  const int64_t tile_begin = int64_t{blockIdx.x} * kBackwardThreads * kColumns;
  const int64_t tile_length = num_candidates - tile_begin < kBackwardThreads * kColumns
                                  ? num_candidates - tile_begin
                                  : kBackwardThreads * kColumns;
  const int length = static_cast<int>(tile_length);
  const int t = static_cast<int>(threadIdx.x);
  for (int64_t i = blockIdx.y; i < num_queries; i += gridDim.y) {
    const int64_t offset = i * num_candidates + tile_begin;
    const scalar_t* tile_scores = scores + offset;
    scalar_t* tile_grad = grad_out + offset;
    const acc_t* row_table = table + i * 2 * grid.last_bin;
    pin(row_table);  // each lookup one multiply-add on it, not the row offset added again
    const RowRelevance row = relevance.row(i, num_candidates).window(tile_begin, length);
    if (kFast) {  // whole vectors (fast_path_applies); labels, no ignore mask
      const int vectors = length / BackwardUnit<scalar_t>::kSize;
      const int self = static_cast<int>(row.self_column);  // -1: not in this tile
      if (self >= 0) {
        backward_vectors<true>(tile_scores, row.ref_labels, row.query_label, self, vectors, grid,
                               row_table, tile_grad);
      } else {
        backward_vectors<false>(tile_scores, row.ref_labels, row.query_label, -1, vectors, grid,
                                row_table, tile_grad);
      }
    } else {
      acc_t s[kColumns];
      bool counted[kColumns];
      bool positive[kColumns];
#pragma unroll
      for (int u = 0; u < kColumns; ++u) {  // all loads first
        const int o = t + u * kBackwardThreads;
        const bool inside = o < length;
        counted[u] = inside && !row.ignored(o);
        positive[u] = inside && row.template positive<kDense>(o);
        s[u] = inside ? static_cast<acc_t>(tile_scores[o]) : acc_t(0);
      }
#pragma unroll
      for (int u = 0; u < kColumns; ++u) {
        const int o = t + u * kBackwardThreads;
        const acc_t g =
            counted[u] ? score_gradient(s[u], positive[u], grid, row_table) : acc_t(0);
        if (o < length) tile_grad[o] = static_cast<scalar_t>(g);
      }
    }
  }
}

// The kernel of each op for one call: `fast` from fast_path_applies(), else the general kernel
// of the call's relevance form.
template <typename scalar_t, typename acc_t>
auto forward_kernel(bool fast, const RelevanceArgs& relevance) {
  return fast                                    ? soft_histogram_kernel<scalar_t, acc_t, true, false>
         : relevance.dense_relevance != nullptr ? soft_histogram_kernel<scalar_t, acc_t, false, true>
                                                 : soft_histogram_kernel<scalar_t, acc_t, false, false>;
}
template <typename scalar_t, typename acc_t>
auto backward_kernel(bool fast, const RelevanceArgs& relevance) {
  return fast ? soft_histogram_backward_kernel<scalar_t, acc_t, true, false>
         : relevance.dense_relevance != nullptr
             ? soft_histogram_backward_kernel<scalar_t, acc_t, false, true>
             : soft_histogram_backward_kernel<scalar_t, acc_t, false, false>;
}

}  // namespace fastap
