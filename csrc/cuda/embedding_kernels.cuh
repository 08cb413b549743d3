// The fused CUDA kernels of fastap::embedding_histogram and fastap::embedding_histogram_backward:
// the soft histograms of the cosine scores queries @ database^T, and the gradients with respect to
// both embedding sets, computed tile by tile on the tensor cores without ever storing a score.
// Device code only (no torch, no host API), so that tests/emulation can run it on the CPU; the
// launchers are in embedding_histogram.cu, the work split in launch_plan.h, the binning math in
// ../binning.h, the shared step (score_tile and its tiles) in embedding_tiles.cuh, the matrix
// unit's loads and stores in matrix_unit.cuh.
//
// Both kernels are built on one step, score_tile: a block owns kTileRows rows of one embedding set
// ("own") and walks a range of the other set ("stream") kTileCols rows at a time; for each step it
// computes the kTileRows x kTileCols tile of inner products with WMMA (bf16/fp16 inputs natively,
// fp32 inputs as TF32) into shared memory. Then
//   forward:  each thread bins the scores of one own row (a quarter of the step's columns) into
//             its private histogram in shared memory, reduced in a fixed order at the end;
//   backward: each score becomes its gradient G (one lookup in the query's slope table, as in
//             soft_histogram_backward_kernel), stored as a matrix-unit tile, and the block
//             accumulates own_grad += G @ stream (dQ = G DB for own = queries, dDB = G^T Q for
//             own = database) in WMMA accumulators, kAccumulatorWidth columns of D per block.
// No atomics anywhere: every sum has a fixed order, so results are bitwise reproducible.
#pragma once

#include <cstdint>
#include <type_traits>

#include "../binning.h"
#include "dynamic_shared.cuh"
#include "embedding_tiles.cuh"
#include "lane_histograms.cuh"
#include "pin.cuh"

namespace fastap {
namespace embedding {

// The stream rows [first, last) of split blockIdx.y (see EmbeddingPlan).
struct StreamRange {
  int64_t first;
  int64_t last;
};
__device__ __forceinline__ StreamRange stream_range(int64_t stream_count, int64_t split_length) {
  const int64_t first = int64_t{blockIdx.y} * split_length;
  const int64_t last = first + split_length < stream_count ? first + split_length : stream_count;
  return {first, last};
}

// Which of a step's kTileCols stream columns count for one thread's own row: those below
// `length` (the end of the walk), but `self`, the column that pairs the row with itself (-1:
// none in this step). `edge` is the same for the whole block: false when no row of the block
// meets either in this step, so that only edge steps test the columns one by one.
// With exclude_self, `self_first` is the stream row that pairs with the block's first own row
// (own row o pairs with o + self_offset when own = queries, o - self_offset when own = database;
// it may be negative), and own row r pairs with self_first + r.
struct StepColumns {
  int length;
  int self;
  bool edge;
};
__device__ __forceinline__ StepColumns step_columns(int64_t stream0, int64_t last,
                                                    bool exclude_self, int64_t self_first,
                                                    int r) {
  StepColumns step;
  step.length = static_cast<int>(last - stream0 < kTileCols ? last - stream0 : kTileCols);
  const int64_t self = self_first + r - stream0;
  step.self = exclude_self && self >= 0 && self < kTileCols ? static_cast<int>(self) : -1;
  const bool meets_self = exclude_self && self_first < stream0 + kTileCols &&
                          self_first + kTileRows > stream0;
  step.edge = step.length < kTileCols || meets_self;
  return step;
}

// Forward: bins the thread's kTileCols / 4 scores of one step (columns [16 part, 16 part + 16)
// of own row r). kEdge: test each column against `step` (StepColumns); else all count.
template <bool kEdge, typename T>
__device__ __forceinline__ void bin_step(const float* __restrict__ scores,
                                         const int64_t* __restrict__ step_labels, int64_t label,
                                         int part, int r, const StepColumns& step,
                                         const BinGrid<float>& grid,
                                         LaneHistograms<float, kEmbeddingThreads, true>& histograms) {
  using Layout = SharedLayout<T>;
  constexpr int kPartColumns = kTileCols / (kEmbeddingThreads / kTileRows);
#pragma unroll
  for (int u = 0; u < kPartColumns; ++u) {
    const int c = part * kPartColumns + u;
    const bool counted = !kEdge || (c < step.length && c != step.self);
    histograms.add(grid, scores[c * Layout::kScoreLd + r], counted, step_labels[c] == label);
  }
}

// Forward. Block (x, y) owns queries [64 x, 64 x + 64) and the database rows of split y. Thread t
// bins the scores of query row t % 64 against columns [16 (t / 64), 16 (t / 64) + 16) of every
// step. With one split, writes n/p/positives; else partial_hist[(i * splits + y)][class][bin] and
// partial_positives[i * splits + y] for soft_histogram_finalize_kernel. kWgmma: the scores from
// score_tile_wgmma (bf16/fp16, D <= kAccumulatorWidth, built for sm_90a; else a trap).
template <typename T, bool kWgmma = false>
__global__ void __launch_bounds__(kEmbeddingThreads)
    embedding_histogram_kernel(const T* __restrict__ queries, const T* __restrict__ database,
                               const int64_t* __restrict__ labels,
                               const int64_t* __restrict__ ref_labels, int64_t num_queries,
                               int64_t num_database, int64_t depth, bool exclude_self,
                               int64_t self_offset, BinGrid<float> grid, int64_t split_length,
                               float* __restrict__ n_out, float* __restrict__ p_out,
                               int64_t* __restrict__ positives_out,
                               float* __restrict__ partial_hist,
                               int64_t* __restrict__ partial_positives) {
#ifdef FASTAP_MMA_UNSUPPORTED
  __trap();
#else
  using Layout = SharedLayout<T>;
  FASTAP_DYNAMIC_SHARED(shared);
  const Layout layout(depth, /*backward=*/false);
  const float* scores = reinterpret_cast<const float*>(shared + layout.scores);
  int64_t* step_labels = reinterpret_cast<int64_t*>(shared + layout.labels);
  float* hist = reinterpret_cast<float*>(shared + layout.step_end);
  const int q = grid.last_bin + 1;
  const int slots = static_cast<int>(histogram_slots(q));
  const int class_slots = static_cast<int>(histogram_class_slots(q));
  uint32_t* thread_positives = reinterpret_cast<uint32_t*>(hist + slots * kEmbeddingThreads);
  int32_t* thread_poisoned = reinterpret_cast<int32_t*>(thread_positives + kEmbeddingThreads);
  const int t = static_cast<int>(threadIdx.x);
  const int r = t % kTileRows;
  const int part = t / kTileRows;  // 0..3: columns [16 part, 16 part + 16) of each step
  const int64_t own0 = int64_t{blockIdx.x} * kTileRows;
  const int64_t i = own0 + r;
  const bool valid_row = i < num_queries;
  const int64_t label = valid_row ? labels[i] : 0;
  const int64_t self_first = own0 + self_offset;  // the stream row of own row 0 (exclude_self)
  const StreamRange range = stream_range(num_database, split_length);

  for (int slot = 0; slot < slots; ++slot) hist[slot * kEmbeddingThreads + t] = 0.0f;
  if (kWgmma && !layout.resident) __trap();  // the launchers refuse such a request
  if (layout.resident) {  // the block's queries, once for the whole walk
    load_tile(reinterpret_cast<typename MatrixUnit<T>::element*>(shared + layout.own),
              {layout.own_ld, kWgmma ? layout.own_cols : 0}, kTileRows, layout.own_cols, queries,
              num_queries, depth, own0, 0, MatrixUnit<T>::from_float(0.0f));
  }
  LaneHistograms<float, kEmbeddingThreads, true> histograms(hist + t, q);
  if (!layout.stream_resident && range.first < range.last && depth > 0) {  // first chunk
    issue_chunk<T, kWgmma>(queries, num_queries, own0, database, num_database, range.first, depth,
                           shared, layout, 0);
  }
  for (int64_t stream0 = range.first; stream0 < range.last; stream0 += kTileCols) {
    __syncthreads();  // the previous step's labels and scores are no longer read
    if (t < kTileCols) step_labels[t] = stream0 + t < num_database ? ref_labels[stream0 + t] : 0;
    const int64_t next = stream0 + kTileCols < range.last ? stream0 + kTileCols : -1;
    if constexpr (kWgmma) {
      score_tile_wgmma(queries, num_queries, own0, database, num_database, stream0, depth, shared,
                       layout, next);
    } else {
      score_tile(queries, num_queries, own0, database, num_database, stream0, depth, shared,
                 layout, next);
    }
    if (!valid_row) continue;  // the block's last rows past the queries (nothing to bin)
    const StepColumns step = step_columns(stream0, range.last, exclude_self, self_first, r);
    if (step.edge) {
      bin_step<true, T>(scores, step_labels, label, part, r, step, grid, histograms);
    } else {
      bin_step<false, T>(scores, step_labels, label, part, r, step, grid, histograms);
    }
  }
  thread_positives[t] = histograms.positives();
  thread_poisoned[t] = is_finite(histograms.probe) ? 0 : 1;
  __syncthreads();

  // Thread (r, part) sums bins part, part + 4, ... of row r over the four parts, in part order.
  if (!valid_row) return;
  constexpr int kParts = kEmbeddingThreads / kTileRows;
  int32_t row_poisoned = 0;
  int64_t row_positives = 0;
  for (int p = 0; p < kParts; ++p) {
    row_poisoned |= thread_poisoned[p * kTileRows + r];
    row_positives += thread_positives[p * kTileRows + r];
  }
  const int64_t splits = gridDim.y;
  for (int k = part; k < q; k += kParts) {
    float negative_sum = 0.0f;
    float positive_sum = 0.0f;
    for (int p = 0; p < kParts; ++p) {
      negative_sum += hist[k * kEmbeddingThreads + p * kTileRows + r];
      positive_sum += hist[(class_slots + k) * kEmbeddingThreads + p * kTileRows + r];
    }
    if (row_poisoned) negative_sum = positive_sum = NAN;
    if (splits == 1) {
      n_out[i * q + k] = negative_sum + positive_sum;
      p_out[i * q + k] = positive_sum;
    } else {
      const int64_t item = i * splits + blockIdx.y;
      partial_hist[(item * 2) * q + k] = negative_sum;
      partial_hist[(item * 2 + 1) * q + k] = positive_sum;
    }
  }
  if (part == 0) {
    if (splits == 1) {
      positives_out[i] = row_positives;
    } else {
      partial_positives[i * splits + blockIdx.y] = row_positives;
    }
  }
#endif
}

// Backward: the gradient G of every score of one step, into the step's G tile, with G = 0 for
// the scores that do not count (kEdge as in bin_step; own rows past the own set). Each score
// costs one lookup in its query's slope table, a load from global memory (L1), and a warp's
// lookup is served one cache line at a time: so the 32 lanes of a warp take 32 scores of one
// query, whose table spans a few lines, and never 32 queries, whose tables would be 32 lines
// (the first version, own = queries: up to 32 times the L1 wavefronts of this mapping).
//
// Own = queries (dQ = G DB): the query is the own row. Warp w takes own rows
// [8 w, 8 w + 8), lane l columns l and l + 32 of each: the scores are read from the row-major
// tile (score_tile<T, true>) and G is written row-major, both 32 consecutive words per warp.
// kCanonicalG (wgmma): G goes to the canonical layout instead, where a warp's 64 bytes of one row
// fall in 4 banks, a 4-way conflict (docs/design.md, section 3b).
template <bool kEdge, typename T, bool kCanonicalG = false>
__device__ __forceinline__ void query_rows_gradient_step(
    const float* __restrict__ scores, const int64_t* __restrict__ step_labels,
    const int64_t* __restrict__ own_labels, int own_rows, int64_t stream0, int64_t last,
    bool exclude_self, int64_t self_first, const BinGrid<float>& grid,
    const float* __restrict__ block_table,
    typename MatrixUnit<T>::element* __restrict__ grad_tile) {
  using Layout = SharedLayout<T>;
  constexpr int kRowsPerWarp = kTileRows / kTileWarps;
  constexpr int kLaneColumns = kTileCols / kWarpSize;
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  int64_t column_label[kLaneColumns];
#pragma unroll
  for (int v = 0; v < kLaneColumns; ++v) column_label[v] = step_labels[lane + v * kWarpSize];
#pragma unroll
  for (int j = 0; j < kRowsPerWarp; ++j) {
    const int r = warp * kRowsPerWarp + j;  // the same for the whole warp
    const bool valid_row = r < own_rows;
    const int64_t label = own_labels[r];  // shared memory, one broadcast
    // A row past the own set reads the block's first table (which exists) and writes 0.
    const float* row_table = block_table + (valid_row ? r : 0) * 2 * grid.last_bin;
    pin(row_table);  // each lookup one multiply-add on it
    const StepColumns step = step_columns(stream0, last, exclude_self, self_first, r);
#pragma unroll
    for (int v = 0; v < kLaneColumns; ++v) {
      const int c = lane + v * kWarpSize;
      const bool counted = valid_row && (!kEdge || (c < step.length && c != step.self));
      const float s = scores[r * Layout::kScoreLd + c];
      const float g = score_gradient(s, column_label[v] == label, grid, row_table);
      const int index = kCanonicalG ? wgmma::canonical_index(r, c, kTileCols)
                                    : r * Layout::kGradLd + c;
      grad_tile[index] = MatrixUnit<T>::from_float(counted ? g : 0.0f);
    }
  }
}

// Own = database (dDB = G^T Q): the query is the stream row. Thread t takes own row r = t % 64
// and columns [16 part, 16 part + 16), part = t / 64, so a warp's lanes share each column (one
// query); the scores are read from the column-major tile and G is written column-major
// (grad_tile[c * kGradLd + r]), both 32 consecutive elements per warp. kCanonicalG (wgmma): the
// canonical layout instead, where a warp's 32 rows of one column are a 4-way conflict (rows r,
// r + 8, r + 16 and r + 24 share a bank; docs/design.md, section 3b).
template <bool kEdge, typename T, bool kCanonicalG = false>
__device__ __forceinline__ void database_rows_gradient_step(
    const float* __restrict__ scores, const int64_t* __restrict__ step_labels, int64_t own_label,
    bool valid_row, int part, int r, const StepColumns& step, const BinGrid<float>& grid,
    const float* __restrict__ step_table, typename MatrixUnit<T>::element* __restrict__ grad_tile) {
  using Layout = SharedLayout<T>;
  constexpr int kPartColumns = kTileCols / (kEmbeddingThreads / kTileRows);
  const int table_stride = 2 * grid.last_bin;
  // The table of column c, stepped by one table per column: an address that depends on the step,
  // where c * table_stride alone would be hoisted out of the walk as 16 registers (and spilled).
  const float* column_table = step_table + part * kPartColumns * table_stride;
  pin(column_table);
#pragma unroll
  for (int u = 0; u < kPartColumns; ++u, column_table += table_stride) {
    const int c = part * kPartColumns + u;
    const bool counted = valid_row && (!kEdge || (c < step.length && c != step.self));
    // Past the walk's end a column has no table: it reads the step's first one (which always
    // exists), so every load is valid and none needs a branch around it.
    const float* row_table = kEdge && c >= step.length ? step_table : column_table;
    const float s = scores[c * Layout::kScoreLd + r];
    const float g = score_gradient(s, step_labels[c] == own_label, grid, row_table);
    const int index = kCanonicalG ? wgmma::canonical_index(r, c, kTileCols)
                                  : c * Layout::kGradLd + r;
    grad_tile[index] = MatrixUnit<T>::from_float(counted ? g : 0.0f);
  }
}

// Backward. Block (x, y, z) owns rows [64 x, 64 x + 64) of `own` and columns
// [kAccumulatorWidth z, ...) of its gradient, and walks the stream rows of split y. kOwnIsQuery:
// own = queries (grad = dQ = G DB), else own = database (grad = dDB = G^T Q; the query of a
// score is then its stream row). `table` is the N x 2 x (Q - 1) slope table of
// backward_slope_table. With one split, writes grad_out (the input dtype); else
// partial_grad[y][row][d] (fp32) for sum_partials_kernel.
// Two blocks per SM (their shared memory allows it for bf16/fp16 with D <= 256): at most 128
// registers per thread. kWgmma (bf16/fp16, D <= kAccumulatorWidth, built for sm_90a; else a
// trap): both products on wgmma, from one canonical copy of the step's stream rows (K-major for
// the scores, MN-major for the gradient product) and G in the canonical layout; warpgroup g
// accumulates gradient columns [128 g, 128 g + 128) as two 64-column halves in registers.
template <typename T, bool kOwnIsQuery, bool kWgmma = false>
__global__ void __launch_bounds__(kEmbeddingThreads, 2)
    embedding_histogram_backward_kernel(const T* __restrict__ own, int64_t own_count,
                                        const T* __restrict__ stream, int64_t stream_count,
                                        int64_t depth, const int64_t* __restrict__ own_labels,
                                        const int64_t* __restrict__ stream_labels,
                                        bool exclude_self, int64_t self_offset,
                                        BinGrid<float> grid, const float* __restrict__ table,
                                        int64_t split_length, T* __restrict__ grad_out,
                                        float* __restrict__ partial_grad) {
#ifdef FASTAP_MMA_UNSUPPORTED
  __trap();
#else
  using Unit = MatrixUnit<T>;
  using Layout = SharedLayout<T>;
  using element = typename Unit::element;
  FASTAP_DYNAMIC_SHARED(shared);
  const Layout layout(depth, /*backward=*/true);
  const float* scores = reinterpret_cast<const float*>(shared + layout.scores);
  int64_t* step_labels = reinterpret_cast<int64_t*>(shared + layout.labels);
  element* grad_tile = reinterpret_cast<element*>(shared + layout.grad_tile);
  element* stream_rows = reinterpret_cast<element*>(shared + layout.stream_rows);
  float* staging = reinterpret_cast<float*>(shared + layout.staging);
  const int t = static_cast<int>(threadIdx.x);
  const int warp = t / kWarpSize;
  const int lane = t % kWarpSize;
  const int r = t % kTileRows;  // own = database: the thread's own row (see the gradient steps)
  const int part = t / kTileRows;
  const int64_t own0 = int64_t{blockIdx.x} * kTileRows;
  const int64_t d0 = int64_t{blockIdx.z} * kAccumulatorWidth;
  const int64_t own_row = own0 + r;
  const bool valid_row = own_row < own_count;
  const int64_t own_label = valid_row ? own_labels[own_row] : 0;
  int64_t* block_labels = reinterpret_cast<int64_t*>(shared + layout.own_labels);
  if (kOwnIsQuery && t < kTileRows) block_labels[t] = own_label;  // read by every lane of a row
  // Own = queries: the slope tables of the block's rows start at the first one's.
  const float* block_table = table + (kOwnIsQuery ? own0 : 0) * 2 * int64_t{grid.last_bin};
  const int own_rows =
      static_cast<int>(own_count - own0 < kTileRows ? own_count - own0 : kTileRows);
  // The stream row that pairs with own row 0 (exclude_self).
  const int64_t self_first = kOwnIsQuery ? own0 + self_offset : own0 - self_offset;
  const element zero = Unit::from_float(0.0f);
  const StreamRange range = stream_range(stream_count, split_length);

  // Warp w accumulates the own rows of row fragments 2 (w % 2) and 2 (w % 2) + 1 (32 rows) times
  // the accumulator column fragments w / 2 + 4 f (16 columns each, f < kWarpColFragments): per k
  // of a step it loads 2 fragments of G and up to 4 of the stream rows for up to 8 products, 21
  // flops per byte of shared memory (a 16-row warp tile: 1 and 8 for 8, 14 flops per byte).
  // The columns interleave so that all eight warps have work for any D of at least 64.
  constexpr int kWarpRowFragments = 2;
  constexpr int kRowGroups = kRowFragments / kWarpRowFragments;             // 2
  constexpr int kColGroups = kTileWarps / kRowGroups;                       // 4
  constexpr int kWarpColFragments = kAccumulatorWidth / kFragment / kColGroups;  // 4
  const int first_row_fragment = kWarpRowFragments * (warp % kRowGroups);
  const int first_col_fragment = warp / kRowGroups;
  wmma::fragment<wmma::accumulator, 16, 16, Unit::kStep, float>
      acc[kWarpRowFragments][kWarpColFragments];
#pragma unroll
  for (int i = 0; i < kWarpRowFragments; ++i) {
#pragma unroll
    for (int f = 0; f < kWarpColFragments; ++f) wmma::fill_fragment(acc[i][f], 0.0f);
  }
  // kWgmma: warpgroup g's accumulators of gradient columns [128 g + 64 j, 128 g + 64 j + 64).
  constexpr int kHalves = kAccumulatorWidth / 2 / wgmma::kGradCols;  // 2
  float grad_acc[kWgmma ? kHalves : 1][kWgmma ? wgmma::kGradCols / 2 : 1];
#pragma unroll
  for (auto& half : grad_acc) {
#pragma unroll
    for (float& a : half) a = 0.0f;
  }
  const int group = t / wgmma::kGroupThreads;
  if (kWgmma && !layout.resident) __trap();  // the launchers refuse such a request
  if (layout.resident) {  // the block's own rows, once for the whole walk
    load_tile(reinterpret_cast<element*>(shared + layout.own),
              {layout.own_ld, kWgmma ? layout.own_cols : 0}, kTileRows, layout.own_cols, own,
              own_count, depth, own0, 0, zero);
  }

  if (!layout.stream_resident && range.first < range.last && depth > 0) {  // first chunk
    issue_chunk(own, own_count, own0, stream, stream_count, range.first, depth, shared, layout, 0);
  }
  for (int64_t stream0 = range.first; stream0 < range.last; stream0 += kTileCols) {
    __syncthreads();  // the previous step's G and stream rows are no longer read
    if (t < kTileCols) step_labels[t] = stream0 + t < stream_count ? stream_labels[stream0 + t] : 0;
    // The step's stream rows, columns [d0, d0 + stream_cols): all of D when resident, so the
    // scores come from them too.
    load_tile(stream_rows, {layout.stream_ld, kWgmma ? layout.stream_cols : 0}, kTileCols,
              layout.stream_cols, stream, stream_count, depth, stream0, d0, zero);
    const int64_t next = stream0 + kTileCols < range.last ? stream0 + kTileCols : -1;
    if constexpr (kWgmma) {
      score_tile_wgmma<T, kOwnIsQuery>(own, own_count, own0, stream, stream_count, stream0,
                                       depth, shared, layout, next);
    } else {
      score_tile<T, kOwnIsQuery>(own, own_count, own0, stream, stream_count, stream0, depth,
                                 shared, layout, next);
    }
    const StepColumns step = step_columns(stream0, range.last, exclude_self, self_first, r);
    if constexpr (kOwnIsQuery) {
      if (step.edge) {  // block-uniform
        query_rows_gradient_step<true, T, kWgmma>(scores, step_labels, block_labels, own_rows,
                                                  stream0, range.last, exclude_self, self_first,
                                                  grid, block_table, grad_tile);
      } else {
        query_rows_gradient_step<false, T, kWgmma>(scores, step_labels, block_labels, own_rows,
                                                   stream0, range.last, exclude_self, self_first,
                                                   grid, block_table, grad_tile);
      }
    } else {
      const float* step_table = table + stream0 * 2 * int64_t{grid.last_bin};
      pin(step_table);  // each lookup one multiply-add on it
      if (step.edge) {
        database_rows_gradient_step<true, T, kWgmma>(scores, step_labels, own_label, valid_row,
                                                     part, r, step, grid, step_table, grad_tile);
      } else {
        database_rows_gradient_step<false, T, kWgmma>(scores, step_labels, own_label, valid_row,
                                                      part, r, step, grid, step_table,
                                                      grad_tile);
      }
    }
    if constexpr (kWgmma) {
#ifdef FASTAP_HAS_WGMMA
      wgmma::fence_operands();  // G, for the tensor cores
      __syncthreads();
      // own_grad[r][d] += sum over the step's stream rows s of G[r][s] stream[s][d]: G K-major
      // (64 x 64), the stream rows MN-major, 64 columns per wgmma, skipping the halves past the
      // tile's columns (warpgroup-uniform).
#pragma unroll
      for (int j = 0; j < kHalves; ++j) {
        const int col0 = (kHalves * group + j) * wgmma::kGradCols;
        if (col0 >= layout.stream_cols) continue;
        wgmma::begin(grad_acc[j]);
#pragma unroll
        for (int s = 0; s < kTileCols; s += wgmma::kStep) {
          const element* g = grad_tile + wgmma::canonical_index(0, s, kTileCols);
          const element* b = stream_rows + wgmma::canonical_index(s, col0, layout.stream_cols);
          wgmma::mma_m64n64k16_bt(grad_acc[j], g, kTileCols, b, layout.stream_cols);
        }
        wgmma::commit_and_wait(grad_acc[j]);
      }
#else
      __trap();  // not built for sm_90a: use_wgmma (cuda_ops.cpp) never asks for it then
#endif
      continue;  // the next step's barrier orders the reuse of G and the stream rows
    }
    __syncthreads();
    // G is row-major for own = queries, column-major for own = database (the gradient steps).
    using GradLayout = std::conditional_t<kOwnIsQuery, wmma::row_major, wmma::col_major>;
    for (int kk = 0; kk < kTileCols; kk += Unit::kStep) {
      wmma::fragment<wmma::matrix_a, 16, 16, Unit::kStep, typename Unit::precision, GradLayout>
          a[kWarpRowFragments];
#pragma unroll
      for (int i = 0; i < kWarpRowFragments; ++i) {
        const int a_row = (first_row_fragment + i) * kFragment;
        load_operand(a[i],
                     kOwnIsQuery ? grad_tile + a_row * Layout::kGradLd + kk
                                 : grad_tile + kk * Layout::kGradLd + a_row,
                     Layout::kGradLd);
        Unit::round(a[i]);
      }
#pragma unroll
      for (int f = 0; f < kWarpColFragments; ++f) {  // unrolled: acc stays in registers
        const int col = (first_col_fragment + kColGroups * f) * kFragment;
        if (d0 + col < depth) {  // the same for the whole warp
          wmma::fragment<wmma::matrix_b, 16, 16, Unit::kStep, typename Unit::precision,
                         wmma::row_major> b;
          load_operand(b, stream_rows + kk * layout.stream_ld + col, layout.stream_ld);
          Unit::round(b);
#pragma unroll
          for (int i = 0; i < kWarpRowFragments; ++i) wmma::mma_sync(acc[i][f], a[i], b, acc[i][f]);
        }
      }
    }
  }

  const int64_t splits = gridDim.y;
  if constexpr (kWgmma) {  // each thread writes its accumulators (once per block: not coalesced)
    const int group_warp = warp % (wgmma::kGroupThreads / kWarpSize);
#pragma unroll
    for (int j = 0; j < kHalves; ++j) {
      const int col0 = (kHalves * group + j) * wgmma::kGradCols;
#pragma unroll
      for (int e = 0; e < wgmma::kGradCols / 2; ++e) {
        const int64_t row = own0 + wgmma::accumulator_row(group_warp, lane, e);
        const int64_t d = d0 + col0 + wgmma::accumulator_col(lane, e);
        if (row >= own_count || d >= depth) continue;
        if (splits == 1) {
          grad_out[row * depth + d] = Unit::from_float(grad_acc[j][e]);
        } else {
          partial_grad[(int64_t{blockIdx.y} * own_count + row) * depth + d] = grad_acc[j][e];
        }
      }
    }
    return;
  }
  // Each warp writes its fragments through its 16 x 16 staging tile, skipping rows and columns
  // outside the gradient.
  float* warp_staging = staging + warp * kFragment * kFragment;
#pragma unroll
  for (int fragment = 0; fragment < kWarpRowFragments * kWarpColFragments; ++fragment) {
    const int i = fragment / kWarpColFragments;
    const int f = fragment % kWarpColFragments;
    const int col = (first_col_fragment + kColGroups * f) * kFragment;
    if (d0 + col >= depth) continue;
    store_accumulator(warp_staging, acc[i][f], kFragment, wmma::mem_row_major);
    __syncwarp();
    for (int e = lane; e < kFragment * kFragment; e += kWarpSize) {
      const int64_t row = own0 + (first_row_fragment + i) * kFragment + e / kFragment;
      const int64_t d = d0 + col + e % kFragment;
      if (row >= own_count || d >= depth) continue;
      if (splits == 1) {
        grad_out[row * depth + d] = Unit::from_float(warp_staging[e]);
      } else {
        partial_grad[(int64_t{blockIdx.y} * own_count + row) * depth + d] = warp_staging[e];
      }
    }
    __syncwarp();  // the staging tile is reused by the next fragment
  }
#endif
}

// out[e] = sum over the splits s (in order) of partial[s][e], for e < count.
template <typename T>
__global__ void sum_partials_kernel(const float* __restrict__ partial, int64_t splits,
                                    int64_t count, T* __restrict__ out) {
  const int64_t stride = int64_t{gridDim.x} * blockDim.x;
  for (int64_t e = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; e < count; e += stride) {
    float sum = 0.0f;
    for (int64_t s = 0; s < splits; ++s) sum += partial[s * count + e];
    out[e] = MatrixUnit<T>::from_float(sum);
  }
}

}  // namespace embedding
}  // namespace fastap
