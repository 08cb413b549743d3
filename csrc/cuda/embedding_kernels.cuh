// The fused CUDA kernels of fastap::embedding_histogram and fastap::embedding_histogram_backward:
// the soft histograms of the cosine scores queries @ database^T, and the gradients with respect to
// both embedding sets, computed tile by tile on the tensor cores without ever storing a score.
// Device code only (no torch, no host API), so that tests/emulation can run it on the CPU; the
// launchers are in embedding_histogram.cu, the work split in launch_plan.h, the binning math in
// ../binning.h.
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
#include "lane_histograms.cuh"
#include "launch_plan.h"
#include "pin.cuh"
#include "wgmma.cuh"

#ifndef FASTAP_EMULATION
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline.h>
#include <mma.h>
#endif

// WMMA with bf16 and TF32 needs sm_80; for older architectures the kernels compile to a trap (the
// launchers refuse such GPUs with a clear error first).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define FASTAP_MMA_UNSUPPORTED 1
#endif

#ifndef FASTAP_DYNAMIC_SHARED
#define FASTAP_DYNAMIC_SHARED(name) extern __shared__ __align__(16) unsigned char name[]
#endif

namespace fastap {
namespace embedding {

namespace wmma = nvcuda::wmma;

// What the matrix unit takes for each input type: the element type of the shared-memory tiles,
// the WMMA precision tag, the k of one mma (m = n = 16) and the row padding of the tiles (which
// keeps every fragment 32-byte aligned and spreads rows over the banks).
template <typename T>
struct MatrixUnit;

// bf16 and fp16: the tiles hold the input type, which the matrix unit takes as it is.
template <typename T>
struct SixteenBitUnit {
  using element = T;
  using precision = T;
  static constexpr int kStep = 16;
  static constexpr int kPad = 8;
  template <typename Fragment>
  static __device__ __forceinline__ void round(Fragment&) {}
};

template <>
struct MatrixUnit<__nv_bfloat16> : SixteenBitUnit<__nv_bfloat16> {
  static __device__ __forceinline__ element from_float(float x) { return __float2bfloat16(x); }
};

template <>
struct MatrixUnit<__half> : SixteenBitUnit<__half> {
  static __device__ __forceinline__ element from_float(float x) { return __float2half(x); }
};

template <>
struct MatrixUnit<float> {  // TF32: fp32 in memory, rounded to 10 mantissa bits in the fragments
  using element = float;
#ifdef FASTAP_MMA_UNSUPPORTED
  using precision = float;  // never used: the kernels trap before sm_80, which has no TF32
#else
  using precision = wmma::precision::tf32;
#endif
  static constexpr int kStep = 8;
  static constexpr int kPad = 4;
  static __device__ __forceinline__ element from_float(float x) { return x; }
  template <typename Fragment>
  static __device__ __forceinline__ void round(Fragment& f) {
#ifndef FASTAP_MMA_UNSUPPORTED
    for (int e = 0; e < f.num_elements; ++e) f.x[e] = wmma::__float_to_tf32(f.x[e]);
#endif
  }
};

// wmma::load_matrix_sync of an operand tile that lies in shared memory. For bf16 and TF32 the
// load is spelled out in PTX with the .shared state space: nvcc infers that space for fp16 (and
// emits ldmatrix) but not for bf16 and TF32, whose API loads go through generic addressing (for
// bf16 four 32-bit generic loads where ldmatrix takes one). Same instruction, shape, layout and
// destination registers (the fragment's four 32-bit words) as the API's own load; in the SASS
// the bf16 kernels' ldmatrix forms (LDSM.16.M88 / MT88) per HMMA are those that nvcc derives
// from the API for fp16. -DFASTAP_WMMA_API_ACCESS builds the API's loads and stores instead
// (FASTAP_NVCC_FLAGS, setup.py): the fallback of benchmarks/gpu_check.sh, which tells on the GPU
// whether a wrong fused result comes from this spelling.
#if defined(__CUDA_ARCH__) && !defined(FASTAP_MMA_UNSUPPORTED) && !defined(FASTAP_WMMA_API_ACCESS)
#define FASTAP_WMMA_SHARED_PTX 1
#endif
#ifdef FASTAP_WMMA_SHARED_PTX
#define FASTAP_WMMA_LOAD_SHARED(instruction)                                              \
  asm volatile(instruction " {%0, %1, %2, %3}, [%4], %5;"                                 \
               : "=r"(word[0]), "=r"(word[1]), "=r"(word[2]), "=r"(word[3])                  \
               : "r"(address), "r"(ld)                                                     \
               : "memory")
#endif
template <typename Use, int K, typename Precision, typename Layout, typename P>
__device__ __forceinline__ void load_operand(wmma::fragment<Use, 16, 16, K, Precision, Layout>& f,
                                             const P* pointer, unsigned ld) {
#ifdef FASTAP_WMMA_SHARED_PTX
  constexpr bool kBf16 = std::is_same_v<Precision, __nv_bfloat16>;
  constexpr bool kTf32 = std::is_same_v<Precision, wmma::precision::tf32>;
  if constexpr (kBf16 || kTf32) {
    static_assert(sizeof(f.x) == 4 * sizeof(uint32_t), "four 32-bit registers per lane");
    static_assert(std::is_same_v<Use, wmma::matrix_a> || std::is_same_v<Use, wmma::matrix_b>);
    constexpr bool kA = std::is_same_v<Use, wmma::matrix_a>;
    constexpr bool kRow = std::is_same_v<Layout, wmma::row_major>;
    uint32_t* word = reinterpret_cast<uint32_t*>(&f.x[0]);
    const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
    if constexpr (kBf16 && kA && kRow) {
      FASTAP_WMMA_LOAD_SHARED("wmma.load.a.sync.aligned.row.m16n16k16.shared.bf16");
    } else if constexpr (kBf16 && kA) {
      FASTAP_WMMA_LOAD_SHARED("wmma.load.a.sync.aligned.col.m16n16k16.shared.bf16");
    } else if constexpr (kBf16 && kRow) {
      FASTAP_WMMA_LOAD_SHARED("wmma.load.b.sync.aligned.row.m16n16k16.shared.bf16");
    } else if constexpr (kBf16) {
      FASTAP_WMMA_LOAD_SHARED("wmma.load.b.sync.aligned.col.m16n16k16.shared.bf16");
    } else if constexpr (kA && kRow) {
      FASTAP_WMMA_LOAD_SHARED("wmma.load.a.sync.aligned.row.m16n16k8.shared.tf32");
    } else if constexpr (kA) {
      FASTAP_WMMA_LOAD_SHARED("wmma.load.a.sync.aligned.col.m16n16k8.shared.tf32");
    } else if constexpr (kRow) {
      FASTAP_WMMA_LOAD_SHARED("wmma.load.b.sync.aligned.row.m16n16k8.shared.tf32");
    } else {
      FASTAP_WMMA_LOAD_SHARED("wmma.load.b.sync.aligned.col.m16n16k8.shared.tf32");
    }
    return;
  }
#endif
  wmma::load_matrix_sync(f, pointer, ld);
}
#undef FASTAP_WMMA_LOAD_SHARED

// wmma::store_matrix_sync of an fp32 accumulator into shared memory. For the TF32 shape
// (m16n16k8) the store is spelled out with the .shared state space, which nvcc infers for
// m16n16k16 but not for it (generic stores otherwise); same instruction as the API's.
#ifdef FASTAP_WMMA_SHARED_PTX
#define FASTAP_WMMA_STORE_SHARED(instruction)                                             \
  asm volatile(instruction " [%0], {%1, %2, %3, %4, %5, %6, %7, %8}, %9;"                 \
               :                                                                         \
               : "r"(address), "f"(f.x[0]), "f"(f.x[1]), "f"(f.x[2]), "f"(f.x[3]),         \
                 "f"(f.x[4]), "f"(f.x[5]), "f"(f.x[6]), "f"(f.x[7]), "r"(ld)               \
               : "memory")
#endif
template <int K>
__device__ __forceinline__ void store_accumulator(
    float* pointer, const wmma::fragment<wmma::accumulator, 16, 16, K, float>& f, unsigned ld,
    wmma::layout_t layout) {
#ifdef FASTAP_WMMA_SHARED_PTX
  if constexpr (K == 8) {
    static_assert(sizeof(f.x) == 8 * sizeof(float), "eight fp32 registers per lane");
    const uint32_t address = static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
    if (layout == wmma::mem_row_major) {
      FASTAP_WMMA_STORE_SHARED("wmma.store.d.sync.aligned.row.m16n16k8.shared.f32");
    } else {
      FASTAP_WMMA_STORE_SHARED("wmma.store.d.sync.aligned.col.m16n16k8.shared.f32");
    }
    return;
  }
#endif
  wmma::store_matrix_sync(pointer, f, ld, layout);
}
#undef FASTAP_WMMA_STORE_SHARED

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
  __trap();  // not built for sm_90a: the launchers never choose this path then
#endif
}

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
  if (kWgmma && !layout.resident) __trap();  // the launchers never ask for this
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
  if (kWgmma && !layout.resident) __trap();  // the launchers never ask for this
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
      __trap();  // not built for sm_90a: the launchers never choose this path then
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
