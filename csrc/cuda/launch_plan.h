// How the CUDA kernels of the histogram ops split their work: plain host code with no torch and no
// CUDA headers, so that the launchers (soft_histogram.cu) and the host emulation of the kernels
// (tests/emulation) use the same plan.
#pragma once

#include <cstddef>
#include <cstdint>

#include "../binning.h"  // FASTAP_HOST_DEVICE

namespace fastap {

constexpr int kWarpSize = 32;
// The most blocks a launcher puts in grid.x of a kernel that strides over its work (the soft
// histogram forward, the finalize and sum kernels, the AP formula's rows).
constexpr int64_t kMaxBlocks = int64_t{1} << 30;

// Forward. The work is cut into items of one query row and one chunk of at most `chunk`
// consecutive candidates; one warp bins one item at a time into lane-private histograms in shared
// memory (2 classes x (Q + 1) slots x 32 lanes) and reduces them across the lanes in a fixed
// order. A row of a single chunk writes n, p and positives directly; otherwise each item writes a
// partial histogram and a second kernel sums a row's partials in chunk order. The chunk length is a
// constant, not a function of the GPU, so the rounding of the results does not depend on the device.
constexpr int64_t kForwardChunk = 4096;
constexpr int kMaxForwardWarps = 8;
// Shared memory a block aims for: small enough that several blocks share an SM.
constexpr size_t kForwardSharedTarget = 64 * 1024;

struct ForwardPlan {
  int64_t chunk;           // candidates per item
  int64_t chunks_per_row;  // items per query row
  int64_t items;           // num_queries * chunks_per_row
  int warps_per_block;
  int64_t blocks;
  size_t shared_per_warp;  // bytes
  size_t shared_bytes;     // per block
  size_t max_shared;       // the device's opt-in limit per block, which the kernel is allowed
  bool fits;               // false: num_bins is too large for this GPU's shared memory
  int64_t max_bins;        // the largest num_bins that fits (for the error message)
};

// The slots of one thread's private histograms (LaneHistograms in lane_histograms.cuh): per
// class the Q bins and a spare one.
FASTAP_HOST_DEVICE int64_t histogram_class_slots(int64_t num_bins) { return num_bins + 1; }
FASTAP_HOST_DEVICE int64_t histogram_slots(int64_t num_bins) {
  return 2 * histogram_class_slots(num_bins);
}

// Shared memory of one warp: the lane-private histograms, then each lane's positive mass and
// poisoned flag.
FASTAP_HOST_DEVICE size_t forward_shared_per_warp(int64_t num_bins, size_t acc_bytes) {
  return static_cast<size_t>(histogram_slots(num_bins)) * kWarpSize * acc_bytes +
         kWarpSize * (acc_bytes + sizeof(int32_t));
}

// `max_shared`: the opt-in shared memory per block of the device. `chunk` (> 0) overrides
// kForwardChunk (the tests use short chunks to cover the partial-sum path on small inputs); it is
// held to at most kForwardChunk, which the kernel's count of positives from the histogram mass
// relies on (LaneHistograms).
inline ForwardPlan plan_forward(int64_t num_queries, int64_t num_candidates, int64_t num_bins,
                                size_t acc_bytes, size_t max_shared,
                                int64_t chunk = kForwardChunk) {
  if (chunk > kForwardChunk) chunk = kForwardChunk;
  ForwardPlan plan{};
  plan.chunk = chunk;
  plan.chunks_per_row =
      num_candidates <= chunk ? 1 : (num_candidates + chunk - 1) / chunk;
  plan.items = num_queries * plan.chunks_per_row;
  plan.shared_per_warp = forward_shared_per_warp(num_bins, acc_bytes);
  // forward_shared_per_warp is affine in num_bins: solve it for the largest that fits.
  const size_t fixed = forward_shared_per_warp(0, acc_bytes);
  const size_t per_bin = forward_shared_per_warp(1, acc_bytes) - fixed;
  plan.max_bins = max_shared > fixed ? static_cast<int64_t>((max_shared - fixed) / per_bin) : 0;
  plan.max_shared = max_shared;
  plan.fits = plan.shared_per_warp <= max_shared;
  int warps = static_cast<int>(kForwardSharedTarget / plan.shared_per_warp);
  if (warps > kMaxForwardWarps) warps = kMaxForwardWarps;
  if (warps < 1) warps = 1;
  while (warps > 1 && warps * plan.shared_per_warp > max_shared) --warps;
  // Fewer warps than items would leave warps idle (tiny inputs).
  if (plan.items < warps) warps = plan.items < 1 ? 1 : static_cast<int>(plan.items);
  plan.warps_per_block = warps;
  plan.shared_bytes = warps * plan.shared_per_warp;
  const int64_t blocks = (plan.items + warps - 1) / warps;
  plan.blocks = blocks < kMaxBlocks ? blocks : kMaxBlocks;  // (warps stride over the rest)
  return plan;
}

// Finalize (rows of several chunks): one thread per (row, bin).
constexpr int kFinalizeThreads = 256;

// Backward: a 2-D grid; blockIdx.y strides over the query rows and blockIdx.x covers a row's
// candidates in tiles of kBackwardThreads * columns_per_thread (kBackwardColumnsPerThread for the
// general kernel, more for the fast one: backward_columns() in soft_histogram_kernels.cuh).
constexpr int kBackwardThreads = 256;
constexpr int kBackwardColumnsPerThread = 4;
constexpr int64_t kMaxGridY = 65535;

struct BackwardPlan {
  int64_t blocks_x;
  int64_t blocks_y;
};

inline BackwardPlan plan_backward(int64_t num_queries, int64_t num_candidates,
                                  int columns_per_thread = kBackwardColumnsPerThread) {
  const int64_t tile = int64_t{kBackwardThreads} * columns_per_thread;
  BackwardPlan plan{};
  plan.blocks_x = (num_candidates + tile - 1) / tile;
  plan.blocks_y = num_queries < kMaxGridY ? num_queries : kMaxGridY;
  return plan;
}

// Fused from-embeddings kernels (embedding_kernels.cuh): a block owns kTileRows rows of one
// embedding set and walks the other set kTileCols rows per step, kDepthChunk of the embedding
// dimension at a time; the backward accumulates kAccumulatorWidth gradient columns per block.
constexpr int kTileRows = 64;
constexpr int kTileCols = 64;
constexpr int kDepthChunk = 64;  // fewer load round trips per step (4 at D = 256)
constexpr int kEmbeddingThreads = 256;
constexpr int kAccumulatorWidth = 256;
// The widest embeddings the fused kernels take: the backward's grid.z, one block per
// kAccumulatorWidth columns, is at most 65535 (fastap.embeddings.FUSED_MAX_DIM, the same).
constexpr int64_t kMaxEmbeddingDepth = int64_t{65535} * kAccumulatorWidth;
// Fewer blocks than this split the walk over the other set into partial results (summed in a
// fixed order by a second kernel), each at least kMinSplitLength rows long. Constants, not
// functions of the GPU, so that the rounding does not depend on the device.
constexpr int64_t kMinEmbeddingBlocks = 512;
constexpr int64_t kMinSplitLength = 4096;

struct EmbeddingPlan {
  int64_t own_blocks;    // grid.x: ceil(own_count / kTileRows)
  int64_t splits;        // grid.y: parts of the other set
  int64_t split_length;  // rows of the other set per split (a multiple of kTileCols)
  int64_t depth_blocks;  // grid.z (backward): ceil(depth / kAccumulatorWidth)
};

// `min_split_length` overrides kMinSplitLength (the tests split short inputs with it).
inline EmbeddingPlan plan_embedding(int64_t own_count, int64_t stream_count, int64_t depth,
                                    bool backward, int64_t min_split_length = kMinSplitLength) {
  EmbeddingPlan plan{};
  plan.own_blocks = (own_count + kTileRows - 1) / kTileRows;
  plan.depth_blocks = backward ? (depth + kAccumulatorWidth - 1) / kAccumulatorWidth : 1;
  if (plan.depth_blocks < 1) plan.depth_blocks = 1;
  const int64_t blocks = plan.own_blocks * plan.depth_blocks;
  int64_t splits = 1;
  if (blocks > 0 && blocks < kMinEmbeddingBlocks && stream_count > min_split_length) {
    const int64_t wanted = (kMinEmbeddingBlocks + blocks - 1) / blocks;
    const int64_t most = (stream_count + min_split_length - 1) / min_split_length;
    splits = wanted < most ? wanted : most;
  }
  int64_t length = (stream_count + splits - 1) / splits;
  length = (length + kTileCols - 1) / kTileCols * kTileCols;
  if (length < kTileCols) length = kTileCols;
  plan.split_length = length;
  plan.splits = stream_count > 0 ? (stream_count + length - 1) / length : 1;
  return plan;
}

}  // namespace fastap
