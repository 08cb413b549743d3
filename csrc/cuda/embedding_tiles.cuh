// The step both fused embedding kernels are built on (embedding_kernels.cuh): a block's shared-
// memory layout (SharedLayout, which the launchers compute too), the loads of embedding rows into
// shared-memory tiles (load_tile, and issue_chunk's cp.async pipeline), and score_tile: the
// kTileRows x kTileCols tile of inner products on the matrix unit (WMMA, matrix_unit.cuh), or on
// Hopper's wgmma (score_tile_wgmma, wgmma.cuh). Device code only, so that tests/emulation can run
// it on the CPU.
#pragma once

#include <cstdint>
#include <type_traits>

#include "launch_plan.h"
#include "matrix_unit.cuh"
#include "wgmma.cuh"

#ifndef FASTAP_EMULATION
#include <cuda_pipeline.h>
#endif

namespace fastap {
namespace embedding {

constexpr int kFragment = 16;                       // m = n of every mma
constexpr int kTileWarps = kEmbeddingThreads / kWarpSize;  // 8
constexpr int kRowFragments = kTileRows / kFragment;       // 4
static_assert(kTileRows == 64 && kTileCols == 64 && kEmbeddingThreads == 256,
              "the warp layout below assumes 64 x 64 tiles and 8 warps");

// The shared-memory layout of one block (byte offsets, 128-byte aligned), computed the same way
// by the launchers and the kernels. With D <= kAccumulatorWidth ("resident") the block's own rows
// stay in shared memory for the whole walk (loaded once), and the backward loads each step's
// stream rows once for both of its products; otherwise both sides come kDepthChunk columns at a
// time. Resident, the bytes read from L2 per step are the stream tile's only.
constexpr int kStages = 2;  // chunk slots of the load pipeline

template <typename T>
struct SharedLayout {
  using element = typename MatrixUnit<T>::element;
  static constexpr int kPad = MatrixUnit<T>::kPad;
  static constexpr int kChunkLd = kDepthChunk + kPad;  // chunks of kDepthChunk columns
  // The score tile and G are square (kTileRows = kTileCols), so one leading dimension serves
  // both of their layouts (see score_tile and the backward kernel).
  static constexpr int kScoreLd = kTileRows + 4;       // scores
  static constexpr int kGradLd = kTileCols + kPad;     // G
  // 16-byte rows: the vector loads of load_tile and WMMA's leading-dimension rule.
  static_assert(kChunkLd * sizeof(element) % 16 == 0 && kGradLd * sizeof(element) % 16 == 0 &&
                    kPad * sizeof(element) % 16 == 0 && kScoreLd * sizeof(float) % 16 == 0,
                "tile rows must be multiples of 16 bytes");

  bool resident;         // depth <= kAccumulatorWidth
  // Backward and resident: each step's stream rows are loaded whole. Otherwise the stream side
  // (and, not resident, the own side too) comes in chunks through the cp.async pipeline.
  bool stream_resident;
  int own_cols;      // columns of the own tile: depth rounded up to kDepthChunk, or one chunk
  int own_ld;
  int stream_cols;   // backward stream rows: depth rounded up (resident) or kAccumulatorWidth
  int stream_ld;
  size_t own_slot, stream_slot;  // bytes of one chunk slot
  size_t own, stream_chunk, scores, labels, step_end;  // byte offsets
  size_t grad_tile, stream_rows, staging, own_labels, backward_end;

  static FASTAP_HOST_DEVICE size_t align(size_t bytes) { return (bytes + 127) / 128 * 128; }

  FASTAP_HOST_DEVICE SharedLayout(int64_t depth, bool backward) {
    const int64_t rounded = (depth + kDepthChunk - 1) / kDepthChunk * kDepthChunk;
    const int padded = static_cast<int>(rounded < kDepthChunk ? kDepthChunk : rounded);
    resident = depth <= kAccumulatorWidth;
    own_cols = resident ? padded : kDepthChunk;
    own_ld = own_cols + kPad;
    stream_cols = resident ? padded : kAccumulatorWidth;
    stream_ld = stream_cols + kPad;
    stream_resident = backward && resident;
    own = 0;
    // Chunks come in kStages slots (the next one loads while the current one is multiplied).
    own_slot = static_cast<size_t>(kTileRows) * own_ld * sizeof(element);
    stream_slot = static_cast<size_t>(kTileCols) * kChunkLd * sizeof(element);
    stream_chunk = align(own + (resident ? 1 : kStages) * own_slot);
    scores = align(stream_chunk + (stream_resident ? 0 : kStages * stream_slot));
    labels = align(scores + kTileCols * kScoreLd * sizeof(float));
    step_end = align(labels + kTileCols * sizeof(int64_t));
    grad_tile = step_end;
    stream_rows = align(grad_tile + kTileRows * kGradLd * sizeof(element));
    staging = align(stream_rows + kTileCols * stream_ld * sizeof(element));
    own_labels = align(staging + kTileWarps * kFragment * kFragment * sizeof(float));
    backward_end = own_labels + kTileRows * sizeof(int64_t);
  }
  // Forward: the private histograms [2 * (Q + 1)][threads] (LaneHistograms), then a positive
  // count and a poisoned flag per thread.
  FASTAP_HOST_DEVICE size_t forward_bytes(int64_t num_bins) const {
    return step_end + histogram_slots(num_bins) * kEmbeddingThreads * sizeof(float) +
           kEmbeddingThreads * 2 * sizeof(int32_t);
  }
  // Backward: G, the step's stream rows, one 16 x 16 staging tile per warp for the output, the
  // labels of the block's own rows.
  FASTAP_HOST_DEVICE size_t backward_bytes() const { return backward_end; }
};

// Where element (r, c) of a shared-memory tile lives: row-major with leading dimension ld (WMMA's
// operands, the padding spreads the rows over the banks), or, with canonical = the tile's columns
// (a multiple of 8), in wgmma's canonical K-major layout of 8 x 8 core matrices (wgmma.cuh).
struct TileLayout {
  int ld;
  int canonical = 0;
  __device__ __forceinline__ int index(int r, int c) const {
    return canonical > 0 ? wgmma::canonical_index(r, c, canonical) : r * ld + c;
  }
};

// Copies rows [row0, row0 + rows) x columns [col0, col0 + cols) of the count x depth row-major
// matrix `source` to `tile` (laid out as `layout`), zero outside the matrix. In 16-byte vectors
// when the rows of `source` allow it (depth a multiple of the vector, aligned base; the caller
// keeps col0, cols and ld multiples of it): a vector is then entirely inside or outside, and 8
// consecutive elements of a row are 16 contiguous bytes in either layout. kAsync: the vectors
// are asynchronous copies (cp.async, zero-filled outside; the caller commits and waits), the
// scalar fallback stays synchronous.
template <bool kAsync = false, typename element>
__device__ __forceinline__ void load_tile(element* tile, TileLayout layout, int rows, int cols,
                                          const element* __restrict__ source, int64_t count,
                                          int64_t depth, int64_t row0, int64_t col0,
                                          element zero) {
  constexpr int kVector = 16 / sizeof(element);
  const bool vectors = depth % kVector == 0 && reinterpret_cast<uintptr_t>(source) % 16 == 0;
  if (vectors) {
    const int vector_cols = cols / kVector;
    for (int e = threadIdx.x; e < rows * vector_cols; e += blockDim.x) {
      const int r = e / vector_cols;
      const int c = (e - r * vector_cols) * kVector;
      const int64_t gr = row0 + r;
      const int64_t gc = col0 + c;
      const bool inside = gr < count && gc < depth;
      if (kAsync) {
        __pipeline_memcpy_async(tile + layout.index(r, c),
                                inside ? source + gr * depth + gc : source, 16, inside ? 0 : 16);
        continue;
      }
      uint4 value = make_uint4(0u, 0u, 0u, 0u);
      if (inside) value = *reinterpret_cast<const uint4*>(source + gr * depth + gc);
      *reinterpret_cast<uint4*>(tile + layout.index(r, c)) = value;
    }
    return;
  }
  for (int e = threadIdx.x; e < rows * cols; e += blockDim.x) {
    const int r = e / cols;
    const int c = e - r * cols;
    const int64_t gr = row0 + r;
    const int64_t gc = col0 + c;
    tile[layout.index(r, c)] = (gr < count && gc < depth) ? source[gr * depth + gc] : zero;
  }
}

// Issues the asynchronous loads of chunk `chunk` (columns [64 chunk, 64 chunk + 64)) of the
// sides that come in chunks, into slot chunk % kStages, and commits them as one group. kWgmma:
// the stream chunk in wgmma's canonical layout (the own rows are then resident).
template <typename T, bool kWgmma = false>
__device__ __forceinline__ void issue_chunk(const T* __restrict__ own, int64_t own_count,
                                           int64_t own0, const T* __restrict__ stream,
                                           int64_t stream_count, int64_t stream0, int64_t depth,
                                           unsigned char* shared, const SharedLayout<T>& layout,
                                           int64_t chunk) {
  using element = typename MatrixUnit<T>::element;
  using Layout = SharedLayout<T>;
  const element zero = MatrixUnit<T>::from_float(0.0f);
  const int64_t slot = chunk % kStages;
  const int64_t k0 = chunk * kDepthChunk;
  if (!layout.resident) {
    load_tile<true>(reinterpret_cast<element*>(shared + layout.own + slot * layout.own_slot),
                    {layout.own_ld}, kTileRows, kDepthChunk, own, own_count, depth, own0, k0,
                    zero);
  }
  if (!layout.stream_resident) {
    load_tile<true>(
        reinterpret_cast<element*>(shared + layout.stream_chunk + slot * layout.stream_slot),
        {Layout::kChunkLd, kWgmma ? kDepthChunk : 0}, kTileCols, kDepthChunk, stream,
        stream_count, depth, stream0, k0, zero);
  }
  __pipeline_commit();
}

// scores[c * kScoreLd + r] (kRowMajor: scores[r * kScoreLd + c]) = <own[own0 + r],
// stream[stream0 + c]> (fp32 accumulation), for the kTileRows x kTileCols tile; rows or columns
// outside the matrices are 0. The layout follows the readers: a warp whose lanes take 32 own rows
// of one column reads the column-major tile, one whose lanes take 32 columns of one row the
// row-major tile, each without bank conflicts. Warp w computes the
// 16 x 32 block (row fragment w % 4, column fragments 2 (w / 4) and 2 (w / 4) + 1).
//
// The own rows come from the resident own tile (layout.resident: the caller loaded it) or chunk
// by chunk; the stream rows from the caller's stream_rows (stream_resident, backward) or chunk by
// chunk. Chunks go through a two-slot cp.async pipeline: chunk c + 1 loads while chunk c is
// multiplied, and chunk 0 of the step must already be issued (issue_chunk(..., 0) before the
// first step; this function issues the next step's chunk 0, at next_stream0 >= 0, so that it
// loads while the caller bins). Starts and ends with __syncthreads (the caller's loads are then
// visible, and it may read the scores after).
template <typename T, bool kRowMajor = false>
__device__ void score_tile(const T* __restrict__ own, int64_t own_count, int64_t own0,
                           const T* __restrict__ stream, int64_t stream_count, int64_t stream0,
                           int64_t depth, unsigned char* shared, const SharedLayout<T>& layout,
                           int64_t next_stream0) {
  using Unit = MatrixUnit<T>;
  using Layout = SharedLayout<T>;
  using element = typename Unit::element;
  const element* own_tile = reinterpret_cast<const element*>(shared + layout.own);
  const element* stream_chunks = reinterpret_cast<const element*>(shared + layout.stream_chunk);
  const element* stream_rows = reinterpret_cast<const element*>(shared + layout.stream_rows);
  float* scores = reinterpret_cast<float*>(shared + layout.scores);
  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int row_fragment = warp % kRowFragments;
  const int col_fragment = 2 * (warp / kRowFragments);
  const bool stream_resident = layout.stream_resident;
  const bool chunked = !stream_resident;
  const int b_ld = stream_resident ? layout.stream_ld : Layout::kChunkLd;
  const int64_t chunks = (depth + kDepthChunk - 1) / kDepthChunk;

  wmma::fragment<wmma::accumulator, 16, 16, Unit::kStep, float> acc[2];
  wmma::fill_fragment(acc[0], 0.0f);
  wmma::fill_fragment(acc[1], 0.0f);
  __syncthreads();  // the caller's loads are visible, the previous step's readers are done
  for (int64_t chunk = 0; chunk < chunks; ++chunk) {
    const int64_t slot = chunk % kStages;
    if (chunked) {
      if (chunk + 1 < chunks) {  // into the slot that every warp finished with last iteration
        issue_chunk(own, own_count, own0, stream, stream_count, stream0, depth, shared, layout,
                    chunk + 1);
      } else {
        __pipeline_commit();  // an empty group keeps "all but the newest" meaning chunk `chunk`
      }
      __pipeline_wait_prior(1);  // this thread's copies of chunk `chunk` have landed
      __syncthreads();           // and everyone's
    }
    const int64_t k0 = chunk * kDepthChunk;
    const element* a = layout.resident ? own_tile + k0 : own_tile + slot * layout.own_slot /
                                                                        sizeof(element);
    const element* b = stream_resident ? stream_rows + k0
                                       : stream_chunks + slot * layout.stream_slot / sizeof(element);
    for (int kk = 0; kk < kDepthChunk; kk += Unit::kStep) {
      wmma::fragment<wmma::matrix_a, 16, 16, Unit::kStep, typename Unit::precision,
                     wmma::row_major> a_fragment;
      load_operand(a_fragment, a + row_fragment * kFragment * layout.own_ld + kk,
                             layout.own_ld);
      Unit::round(a_fragment);
#pragma unroll
      for (int f = 0; f < 2; ++f) {
        // B[k][n] = stream[n][k]: the stream rows read column-major.
        wmma::fragment<wmma::matrix_b, 16, 16, Unit::kStep, typename Unit::precision,
                       wmma::col_major> b_fragment;
        load_operand(b_fragment, b + (col_fragment + f) * kFragment * b_ld + kk, b_ld);
        Unit::round(b_fragment);
        wmma::mma_sync(acc[f], a_fragment, b_fragment, acc[f]);
      }
    }
    if (chunked) __syncthreads();  // every warp is done with this slot before it is refilled
  }
  if (chunked && next_stream0 >= 0 && chunks > 0) {  // the next step's first chunk, in slot 0
    issue_chunk(own, own_count, own0, stream, stream_count, next_stream0, depth, shared, layout,
                0);
  }
#pragma unroll
  for (int f = 0; f < 2; ++f) {
    const int row = row_fragment * kFragment;
    const int col = (col_fragment + f) * kFragment;
    if (kRowMajor) {
      store_accumulator(scores + row * Layout::kScoreLd + col, acc[f], Layout::kScoreLd,
                        wmma::mem_row_major);
    } else {
      store_accumulator(scores + col * Layout::kScoreLd + row, acc[f], Layout::kScoreLd,
                        wmma::mem_col_major);
    }
  }
  __syncthreads();
}

// score_tile on Hopper's wgmma (wgmma.cuh): the same tile, contract and pipeline, for bf16/fp16
// with resident own rows (D <= kAccumulatorWidth), both sides in the canonical layout: the stream
// rows chunk by chunk (the forward: issue_chunk<T, true>) or resident (the backward: the caller
// loads them with TileLayout{ld, stream_cols}), the own tile loaded with TileLayout{ld,
// own_cols}. Warpgroup g (threads [128 g, 128 g + 128)) computes columns [32 g, 32 g + 32) of the
// tile, all 64 rows, one wgmma.m64n32k16 per k of 16, and writes its accumulators to the score
// tile. Every writer of an operand fences it for the tensor cores before the barrier that
// precedes their reads, and each chunk's wgmmas have finished before its slot is refilled.
#ifdef FASTAP_HAS_WGMMA
// acc += A B^T over one chunk of kDepthChunk columns: A the 64 own rows at `a` (a canonical tile of
// a_depth columns), B the warpgroup's 32 stream rows at `b` (b_depth columns), as one batch of
// unrolled wgmmas, waited for: a branch or a loop of run-time length between the wgmmas of a
// batch makes ptxas wait for each before the next (C7519).
template <typename element>
__device__ __forceinline__ void score_chunk_wgmma(float (&acc)[16], const element* a, int a_depth,
                                                  const element* b, int b_depth) {
  wgmma::begin(acc);
#pragma unroll
  for (int k = 0; k < kDepthChunk; k += wgmma::kStep) {
    wgmma::mma_m64n32k16(acc, a + wgmma::canonical_index(0, k, a_depth), a_depth,
                         b + wgmma::canonical_index(0, k, b_depth), b_depth);
  }
  wgmma::commit_and_wait(acc);
}
#endif

template <typename T, bool kRowMajor = false>
__device__ void score_tile_wgmma(const T* __restrict__ own, int64_t own_count, int64_t own0,
                                 const T* __restrict__ stream, int64_t stream_count,
                                 int64_t stream0, int64_t depth, unsigned char* shared,
                                 const SharedLayout<T>& layout, int64_t next_stream0) {
#ifdef FASTAP_HAS_WGMMA
  using Layout = SharedLayout<T>;
  using element = typename MatrixUnit<T>::element;
  static_assert(kTileRows == wgmma::kRows && kTileCols == 2 * wgmma::kCols &&
                    kEmbeddingThreads == 2 * wgmma::kGroupThreads,
                "two warpgroups, each a 64 x 32 half of the tile");
  const element* own_tile = reinterpret_cast<const element*>(shared + layout.own);
  const element* stream_chunks = reinterpret_cast<const element*>(shared + layout.stream_chunk);
  float* scores = reinterpret_cast<float*>(shared + layout.scores);
  const int group = static_cast<int>(threadIdx.x) / wgmma::kGroupThreads;
  const int group_warp = static_cast<int>(threadIdx.x) % wgmma::kGroupThreads / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int64_t chunks = (depth + kDepthChunk - 1) / kDepthChunk;

  float acc[wgmma::kRows * wgmma::kCols / wgmma::kGroupThreads];
#pragma unroll
  for (float& a : acc) a = 0.0f;
  wgmma::fence_operands();  // the caller's stores of the own tile (and stream rows)
  __syncthreads();  // the caller's loads are visible, the previous step's readers are done
  if (layout.stream_resident) {  // the backward: the step's stream rows are all of D already
    const element* stream_rows = reinterpret_cast<const element*>(shared + layout.stream_rows);
    const element* b = stream_rows + wgmma::canonical_index(wgmma::kCols * group, 0,
                                                            layout.stream_cols);
    for (int k0 = 0; k0 < layout.own_cols; k0 += kDepthChunk) {
      score_chunk_wgmma(acc, own_tile + wgmma::canonical_index(0, k0, layout.own_cols),
                        layout.own_cols, b + wgmma::canonical_index(0, k0, layout.stream_cols),
                        layout.stream_cols);
    }
  } else {  // the forward: chunk by chunk through the cp.async pipeline
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      const int64_t slot = chunk % kStages;
      if (chunk + 1 < chunks) {  // into the slot that every warp finished with last iteration
        issue_chunk<T, true>(own, own_count, own0, stream, stream_count, stream0, depth, shared,
                             layout, chunk + 1);
      } else {
        __pipeline_commit();  // an empty group keeps "all but the newest" meaning chunk `chunk`
      }
      __pipeline_wait_prior(1);  // this thread's copies of chunk `chunk` have landed
      wgmma::fence_operands();   // and are visible to the tensor cores
      __syncthreads();           // and everyone's
      const element* b = stream_chunks + slot * layout.stream_slot / sizeof(element) +
                         wgmma::canonical_index(wgmma::kCols * group, 0, kDepthChunk);
      score_chunk_wgmma(
          acc, own_tile + wgmma::canonical_index(0, chunk * kDepthChunk, layout.own_cols),
          layout.own_cols, b, kDepthChunk);
      __syncthreads();  // every warpgroup is done with this slot before it is refilled
    }
    if (next_stream0 >= 0 && chunks > 0) {  // the next step's first chunk, in slot 0
      issue_chunk<T, true>(own, own_count, own0, stream, stream_count, next_stream0, depth,
                           shared, layout, 0);
    }
  }
#pragma unroll
  for (int e = 0; e < static_cast<int>(sizeof(acc) / sizeof(acc[0])); ++e) {
    const int row = wgmma::accumulator_row(group_warp, lane, e);
    const int col = wgmma::kCols * group + wgmma::accumulator_col(lane, e);
    // Column-major: no bank conflict; row-major (the dQ pass): 2-way (design.md, section 3b).
    scores[kRowMajor ? row * Layout::kScoreLd + col : col * Layout::kScoreLd + row] = acc[e];
  }
  __syncthreads();
#else
  __trap();  // not built for sm_90a: use_wgmma (cuda_ops.cpp) never asks for it then
#endif
}

}  // namespace embedding
}  // namespace fastap
