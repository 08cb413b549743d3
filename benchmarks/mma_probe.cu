// The H200's two matrix paths on the fused kernels' tile shapes: what rate the score product of
// csrc/cuda/embedding_kernels.cuh can reach, before a kernel is written for it.
//
// docs/design.md, section 5, counts the fused kernels as bound by the shared-memory data path
// (128 bytes per cycle per SM): with WMMA (mma.sync) every operand is loaded from shared memory
// into registers (ldmatrix), and a warp's 16 x 32 tile reads 1.5 KB per k of 16, 10.7 flops per
// byte, about 360 TFLOP/s on 132 SMs at 1.98 GHz. It names two ways past: 32 x 32 warp tiles
// (64 x 128 block tiles, 16 flops per byte) and Hopper's wgmma, whose warpgroup of 4 warps reads
// a 64 x 16 slice of A and an N x 16 slice of B from shared memory per instruction (21, 32 and
// 43 flops per byte at N = 32, 64 and 128), and the backward's gradient product with wgmma, its B
// (the stream rows) read transposed from the layout the score product reads. This program
// measures each, with the operands
// resident in shared memory (no global traffic, as in the fused kernels with D <= 256): a block of
// 256 threads multiplies a 64 x D tile by a C x D tile (D = 256), `repeats` times, 2 blocks per SM
// where they fit. Each variant is first checked against the product computed on the host (small
// integers: exact), and the wgmma variants so check our reading of the PTX ISA's shared-memory
// matrix layout and descriptor, which the CPU emulation of the kernels cannot: the m64n32 variant
// runs the fused forward's own wrapper, layout and accumulator map (csrc/cuda/wgmma.cuh), and the
// second gradient variant the fused backward's. A third gradient variant, a diagnostic, reads B
// with its two descriptor offsets swapped: should the kernels' reading be wrong, it is exact and
// the last lines say so, which settles the fix in the same GPU run.
//
// Build and run (benchmarks/gpu_check.sh, step `probe`):
//   nvcc -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a benchmarks/mma_probe.cu -o mma_probe
//   ./mma_probe [repeats]   (./mma_probe --host: the layout check alone, no GPU; CI runs it)
// Prints a Markdown table; exits 1 when a check fails, 2 on a CUDA error.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

// The kernels' own layout and accumulator helpers (csrc/cuda/wgmma.cuh), so that this probe checks
// on the GPU the very functions the fused forward uses.
#include "../csrc/cuda/wgmma.cuh"

namespace {

namespace wgmma = fastap::embedding::wgmma;

constexpr int kDepth = 256;   // D, the k of the score product
constexpr int kRows = 64;     // own rows of a block (kTileRows of the fused kernels)
constexpr int kThreads = 256;

#define PROBE_CHECK(call)                                                                     \
  do {                                                                                        \
    cudaError_t error_ = (call);                                                              \
    if (error_ != cudaSuccess) {                                                              \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call,                      \
                   cudaGetErrorString(error_));                                               \
      std::exit(2);                                                                           \
    }                                                                                         \
  } while (0)

// The test matrices: small integers, so that every product and sum is exact in bf16/fp16 and fp32.
float a_value(int r, int k) { return static_cast<float>((r * 131 + k * 71) % 17 - 8); }
float b_value(int c, int k) { return static_cast<float>((c * 37 + k * 113) % 15 - 7); }

// ---------------------------------------------------------------------------------------------
// WMMA (mma.sync through ldmatrix), fp16 so that nvcc emits ldmatrix from the API (the fused
// kernels spell out the same loads for bf16; fp16 and bf16 run at the same rate). Warps in a
// kWarpRows x (8 / kWarpRows) grid; with C = 64 and 4 warp rows each warp holds a 16 x 32 tile
// (the fused kernels' score product), with C = 128 and 2 warp rows 32 x 32.
template <int kCols, int kWarpRows>
__global__ void __launch_bounds__(kThreads) wmma_product(const __half* a, const __half* b,
                                                        float* out, int repeats) {
  using namespace nvcuda;
  constexpr int kLd = kDepth + 8;  // padded rows: ldmatrix without bank conflicts
  constexpr int kWarpCols = kThreads / 32 / kWarpRows;
  constexpr int kFragRows = kRows / kWarpRows / 16;
  constexpr int kFragCols = kCols / kWarpCols / 16;
  extern __shared__ __align__(128) unsigned char shared[];
  __half* sa = reinterpret_cast<__half*>(shared);
  __half* sb = sa + kRows * kLd;
  for (int e = threadIdx.x; e < kRows * kDepth; e += kThreads) {
    sa[e / kDepth * kLd + e % kDepth] = a[e];
  }
  for (int e = threadIdx.x; e < kCols * kDepth; e += kThreads) {
    sb[e / kDepth * kLd + e % kDepth] = b[e];
  }
  __syncthreads();
  const int warp = threadIdx.x / 32;
  const int row0 = (warp % kWarpRows) * kFragRows * 16;
  const int col0 = (warp / kWarpRows) * kFragCols * 16;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kFragRows][kFragCols];
  for (int i = 0; i < kFragRows; ++i) {
    for (int j = 0; j < kFragCols; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
  }
  for (int repeat = 0; repeat < repeats; ++repeat) {
#pragma unroll 4
    for (int k = 0; k < kDepth; k += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa[kFragRows];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb[kFragCols];
#pragma unroll
      for (int i = 0; i < kFragRows; ++i) {
        wmma::load_matrix_sync(fa[i], sa + (row0 + 16 * i) * kLd + k, kLd);
      }
#pragma unroll
      for (int j = 0; j < kFragCols; ++j) {
        wmma::load_matrix_sync(fb[j], sb + (col0 + 16 * j) * kLd + k, kLd);
      }
#pragma unroll
      for (int i = 0; i < kFragRows; ++i) {
#pragma unroll
        for (int j = 0; j < kFragCols; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
    }
  }
  float* block_out = out + static_cast<size_t>(blockIdx.x) * kRows * kCols;
  for (int i = 0; i < kFragRows; ++i) {
    for (int j = 0; j < kFragCols; ++j) {
      wmma::store_matrix_sync(block_out + (row0 + 16 * i) * kCols + col0 + 16 * j, acc[i][j],
                              kCols, wmma::mem_row_major);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// wgmma (sm_90a): two warpgroups, each multiplying the 64 x D tile A by its own kN x D half of B.
// Both operands K-major in the canonical layout without swizzle: 8 x 8 core matrices of 8 rows of
// 16 bytes, stored contiguously (128 B); the D / 8 core matrices of 8 rows follow one another
// along k (leading-dimension byte offset 128), and groups of 8 rows are D * 16 bytes apart
// (stride-dimension byte offset). Element (r, k) is at byte
//   (r / 8) * D * 16 + (k / 8) * 128 + (r % 8) * 16 + (k % 8) * 2.
__host__ __device__ constexpr int canonical_offset(int r, int k, int depth = kDepth) {
  return 2 * wgmma::canonical_index(r, k, depth);  // bytes of 16-bit elements
}

// What a descriptor holds, before its encoding: the operand's byte offset in its tile, and its
// leading- and stride-dimension byte offsets. One function per operand of each product, used by
// the kernels and by the host emulation (--host), which reads the operands back through the PTX
// ISA's canonical layouts:
//   K-major, no swizzle, element (m, k): offset + (m / 8) stride + (m % 8) 16 + (k / 8) leading
//     + (k % 8) 2 bytes ("((8,m),(T,2k)):((1T,SBO),(1,LBO))");
//   MN-major, no swizzle, element (k, n): offset + (n / 8) stride + (n % 8) 2 + (k / 8) leading
//     + (k % 8) 16 bytes ("((T,1,m),(8,k)):((1,T,SBO),(1T,LBO))").
struct Operand {
  int offset;
  int leading;
  int stride;
};
// The score product at k: A the 64 own rows, B warpgroup g's kN stream rows, both K-major.
__host__ __device__ constexpr Operand score_a(int k) { return {k / 8 * 128, 128, kDepth * 16}; }
__host__ __device__ constexpr Operand score_b(int g, int n, int k) {
  return {canonical_offset(n * g, 0) + k / 8 * 128, 128, kDepth * 16};
}
// The gradient product at stream row s: A = G (64 x 64, K-major), B = the stream rows read
// MN-major from the score product's layout, warpgroup g's 128 columns.
constexpr int kStream = 64;  // stream rows of a step: the k of the gradient product
__host__ __device__ constexpr Operand gradient_a(int s) {
  return {s / 8 * 128, 128, kStream * 16};
}
__host__ __device__ constexpr Operand gradient_b(int g, int s) {
  return {canonical_offset(s, 128 * g), kDepth * 16, 128};
}
// The same operand with its leading and stride byte offsets the other way round: the reading of
// the diagnostic variant (wgmma_gradient_product<kSwappedOffsets>).
__host__ __device__ constexpr Operand swapped_offsets(Operand o) {
  return {o.offset, o.stride, o.leading};
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// The matrix descriptor: start address, leading- and stride-dimension byte offsets (each >> 4),
// base offset 0, no swizzle.
__device__ __forceinline__ uint64_t descriptor(const unsigned char* tile, Operand operand) {
  const auto address = static_cast<uint32_t>(__cvta_generic_to_shared(tile + operand.offset));
  return wgmma::encode(address, operand.leading, operand.stride);
}


#define PROBE_ACC8(i)                                                                         \
  "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
      "+f"(d[i + 6]), "+f"(d[i + 7])
template <int kTransposeB>
__device__ __forceinline__ void wgmma_m64n64k16(float (&d)[32], uint64_t a, uint64_t b,
                                               int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
      "%32, %33, p, 1, 1, 0, %35;\n}\n"
      : PROBE_ACC8(0), PROBE_ACC8(8), PROBE_ACC8(16), PROBE_ACC8(24)
      : "l"(a), "l"(b), "r"(accumulate), "n"(kTransposeB));
}
template <int kTransposeB>
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], uint64_t a, uint64_t b,
                                                int accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "%64, %65, p, 1, 1, 0, %67;\n}\n"
      : PROBE_ACC8(0), PROBE_ACC8(8), PROBE_ACC8(16), PROBE_ACC8(24), PROBE_ACC8(32),
        PROBE_ACC8(40), PROBE_ACC8(48), PROBE_ACC8(56)
      : "l"(a), "l"(b), "r"(accumulate), "n"(kTransposeB));
}
#undef PROBE_ACC8

// Warpgroup `group`'s 64 x kN accumulators into columns [kN group, kN group + kN) of the
// row-major `out` (leading dimension ld), by the fragment layout of wgmma.cuh.
template <int kN>
__device__ void store_accumulators(const float (&d)[kN / 2], float* out, int ld, int group) {
  const int warp = (threadIdx.x % 128) / 32;
  const int lane = threadIdx.x % 32;
  for (int e = 0; e < kN / 2; ++e) {
    const int row = wgmma::accumulator_row(warp, lane, e);
    const int col = kN * group + wgmma::accumulator_col(lane, e);
    out[row * ld + col] = d[e];
  }
}
// D (+)= A B for a 64 x kN x 16 step; the accumulators d[kN / 2] of this thread are, for
// register e, row 16 (warp % 4) + lane / 4 + 8 ((e % 4) / 2), column 8 (e / 4) + 2 (lane % 4) +
// e % 2 of the warpgroup's 64 x kN tile. kTransposeB: B is MN-major (k rows of n contiguous
// elements), else K-major (n rows of k contiguous elements); A is K-major.
template <int kN, int kTransposeB = 0>
__device__ __forceinline__ void wgmma_bf16(float (&d)[kN / 2], uint64_t a, uint64_t b,
                                           int accumulate) {
  static_assert(kN == 64 || kN == 128, "the shapes spelled out above (32: wgmma.cuh's)");
  if constexpr (kN == 64) wgmma_m64n64k16<kTransposeB>(d, a, b, accumulate);
  if constexpr (kN == 128) wgmma_m64n128k16<kTransposeB>(d, a, b, accumulate);
}
#endif  // __CUDA_ARCH_FEAT_SM90_ALL

template <int kN>
__global__ void __launch_bounds__(kThreads) wgmma_product(const __nv_bfloat16* a,
                                                         const __nv_bfloat16* b, float* out,
                                                         int repeats) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int kCols = 2 * kN;
  extern __shared__ __align__(128) unsigned char shared[];
  unsigned char* sa = shared;
  unsigned char* sb = shared + kRows * kDepth * 2;
  for (int e = threadIdx.x; e < kRows * kDepth; e += kThreads) {
    *reinterpret_cast<__nv_bfloat16*>(sa + canonical_offset(e / kDepth, e % kDepth)) = a[e];
  }
  for (int e = threadIdx.x; e < kCols * kDepth; e += kThreads) {
    *reinterpret_cast<__nv_bfloat16*>(sb + canonical_offset(e / kDepth, e % kDepth)) = b[e];
  }
  // Ordinary stores read next by the tensor cores (the async proxy): a proxy fence in every
  // writing thread, then the barrier.
  wgmma::fence_operands();
  __syncthreads();
  const int group = threadIdx.x / 128;  // the warpgroup: columns [kN group, kN group + kN)
  float d[kN / 2];
  for (int e = 0; e < kN / 2; ++e) d[e] = 0.0f;
  for (int repeat = 0; repeat < repeats; ++repeat) {
    wgmma::begin(d);
#pragma unroll
    for (int k = 0; k < kDepth; k += 16) {
      if constexpr (kN == wgmma::kCols) {  // the fused forward's own wrapper (wgmma.cuh)
        using bf16 = __nv_bfloat16;
        wgmma::mma_m64n32k16(d, reinterpret_cast<const bf16*>(sa + score_a(k).offset), kDepth,
                             reinterpret_cast<const bf16*>(sb + score_b(group, kN, k).offset),
                             kDepth);
      } else {
        wgmma_bf16<kN>(d, descriptor(sa, score_a(k)), descriptor(sb, score_b(group, kN, k)), 1);
      }
    }
    wgmma::commit_and_wait(d);
  }
  store_accumulators<kN>(d, out + static_cast<size_t>(blockIdx.x) * kRows * kCols, kCols, group);
#else
  __trap();  // built without sm_90a
#endif
}

// The backward's gradient product, own_grad (64 x D) += G (64 x 64) times the step's 64 stream
// rows (64 x D), with B read MN-major from the very layout that the score product reads K-major
// (the same 128-byte core matrices: 8 stream rows of 8 consecutive elements; the leading offset
// now steps 8 stream rows, D * 16 bytes, and the stride offset 8 columns, 128 bytes), so that one
// shared copy of the stream rows would serve both products. Warpgroup g computes columns
// [128 g, 128 g + 128) of the 64 x 256 result; G is A[r][s] = a[r][s], s < 64. kKernelWrapper:
// as the fused backward does it, two m64n64 halves through its own wrapper
// (wgmma::mma_m64n64k16_bt); the accumulators of columns [64 j, 64 j + 64) of an m64n128 tile
// are registers [32 j, 32 j + 32) of its layout, so the same store serves both.
// kSwappedOffsets: the probe's own descriptors with B's leading and stride byte offsets the
// other way round, a diagnostic: the ISA's canonical table (which descriptor_mn follows) and
// some of its prose word the two offsets of the MN-major layout oppositely, so if the kernels'
// reading is wrong on the GPU, this variant is the right one and says what to change.
enum GradientVariant { kProbeDescriptors, kKernelWrapper, kSwappedOffsets };
template <GradientVariant kVariant>
__global__ void __launch_bounds__(kThreads) wgmma_gradient_product(const __nv_bfloat16* a,
                                                                   const __nv_bfloat16* b,
                                                                   float* out, int repeats) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int kN = 128;
  extern __shared__ __align__(128) unsigned char shared[];
  unsigned char* sg = shared;
  unsigned char* sb = shared + kRows * kStream * 2;
  for (int e = threadIdx.x; e < kRows * kStream; e += kThreads) {
    const int r = e / kStream, s = e % kStream;
    *reinterpret_cast<__nv_bfloat16*>(sg + canonical_offset(r, s, kStream)) = a[r * kDepth + s];
  }
  for (int e = threadIdx.x; e < kStream * kDepth; e += kThreads) {
    *reinterpret_cast<__nv_bfloat16*>(sb + canonical_offset(e / kDepth, e % kDepth)) = b[e];
  }
  wgmma::fence_operands();
  __syncthreads();
  const int group = threadIdx.x / 128;
  float d[kN / 2];
  for (int e = 0; e < kN / 2; ++e) d[e] = 0.0f;
  for (int repeat = 0; repeat < repeats; ++repeat) {
    if constexpr (kVariant == kKernelWrapper) {
      using bf16 = __nv_bfloat16;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        float(&half)[32] = *reinterpret_cast<float(*)[32]>(d + 32 * j);
        wgmma::begin(half);
#pragma unroll
        for (int s = 0; s < kStream; s += 16) {
          wgmma::mma_m64n64k16_bt(half, reinterpret_cast<const bf16*>(sg + gradient_a(s).offset),
                                  kStream,
                                  reinterpret_cast<const bf16*>(
                                      sb + canonical_offset(s, kN * group + 64 * j)),
                                  kDepth);
        }
        wgmma::commit_and_wait(half);
      }
    } else {
      wgmma::begin(d);
#pragma unroll
      for (int s = 0; s < kStream; s += 16) {
        Operand b_operand = gradient_b(group, s);
        if constexpr (kVariant == kSwappedOffsets) b_operand = swapped_offsets(b_operand);
        wgmma_bf16<kN, 1>(d, descriptor(sg, gradient_a(s)), descriptor(sb, b_operand), 1);
      }
      wgmma::commit_and_wait(d);
    }
  }
  store_accumulators<kN>(d, out + static_cast<size_t>(blockIdx.x) * kRows * kDepth, kDepth,
                         group);
#else
  __trap();  // built without sm_90a
#endif
}

// ---------------------------------------------------------------------------------------------
struct Variant {
  const char* name;
  int cols;                 // C: the block tile is 64 x C
  double flops_per_byte;    // operand bytes through the shared-memory path, per the model
  const void* kernel;
  size_t shared_bytes;
  bool bf16;                // else fp16 (the WMMA variants)
  bool gradient = false;    // the gradient product: 64 x D = (64 x 64) (64 x D)
  bool diagnostic = false;  // exact only if another variant's reading is wrong: not a failure
};

template <typename Element>
std::vector<Element> host_matrix(int rows, bool is_a) {
  std::vector<Element> m(static_cast<size_t>(rows) * kDepth);
  for (int r = 0; r < rows; ++r) {
    for (int k = 0; k < kDepth; ++k) {
      const float v = is_a ? a_value(r, k) : b_value(r, k);
      m[static_cast<size_t>(r) * kDepth + k] = Element(v);
    }
  }
  return m;
}

// --host: the wgmma variants emulated on the host, without a GPU: the tiles filled as the kernels
// fill them, every operand of every step read back through its Operand and the canonical layouts
// (the comment above Operand), each product compared with the plain one. This checks the kernels'
// bookkeeping (offsets, steps, the warpgroups' halves) against the PTX ISA's layouts as written
// there; the GPU run checks that reading itself.
class HostTile {
 public:
  explicit HostTile(size_t bytes) : bytes_(bytes) {}
  void put(int offset, float v) {
    const __nv_bfloat16 x(v);
    std::memcpy(&bytes_.at(offset), &x, 2);
  }
  float k_major(const Operand& o, int m, int k) const {  // element (m, k) of the 16-wide step
    return at(o.offset + m / 8 * o.stride + m % 8 * 16 + k / 8 * o.leading + k % 8 * 2);
  }
  float mn_major(const Operand& o, int k, int n) const {  // element (k, n) of the step
    return at(o.offset + n / 8 * o.stride + n % 8 * 2 + k / 8 * o.leading + k % 8 * 16);
  }

 private:
  float at(int offset) const {
    __nv_bfloat16 x;
    std::memcpy(&x, &bytes_.at(offset), 2);
    return __bfloat162float(x);
  }
  std::vector<unsigned char> bytes_;
};

bool encodable(const Operand& o) {  // a descriptor holds each byte offset >> 4 in 14 bits
  const auto fits = [](int bytes) { return bytes >= 0 && bytes % 16 == 0 && bytes < (1 << 18); };
  return fits(o.offset) && fits(o.leading) && fits(o.stride);
}

bool host_check_score(int n) {  // wgmma_product<n>
  HostTile a(kRows * kDepth * 2), b(2 * n * kDepth * 2);
  for (int e = 0; e < kRows * kDepth; ++e) {
    a.put(canonical_offset(e / kDepth, e % kDepth), a_value(e / kDepth, e % kDepth));
  }
  for (int e = 0; e < 2 * n * kDepth; ++e) {
    b.put(canonical_offset(e / kDepth, e % kDepth), b_value(e / kDepth, e % kDepth));
  }
  bool ok = true;
  for (int g = 0; g < 2; ++g) {
    for (int r = 0; r < kRows; ++r) {
      for (int c = 0; c < n; ++c) {
        double got = 0.0, expected = 0.0;
        for (int k = 0; k < kDepth; k += 16) {
          ok = ok && encodable(score_a(k)) && encodable(score_b(g, n, k));
          for (int kk = 0; kk < 16; ++kk) {
            got += a.k_major(score_a(k), r, kk) * b.k_major(score_b(g, n, k), c, kk);
            expected += a_value(r, k + kk) * b_value(n * g + c, k + kk);
          }
        }
        ok = ok && got == expected;
      }
    }
  }
  return ok;
}

bool host_check_gradient() {  // wgmma_gradient_product
  HostTile a(kRows * kStream * 2), b(kStream * kDepth * 2);
  for (int r = 0; r < kRows; ++r) {
    for (int s = 0; s < kStream; ++s) a.put(canonical_offset(r, s, kStream), a_value(r, s));
  }
  for (int e = 0; e < kStream * kDepth; ++e) {
    b.put(canonical_offset(e / kDepth, e % kDepth), b_value(e / kDepth, e % kDepth));
  }
  bool ok = true;
  for (int g = 0; g < 2; ++g) {
    for (int r = 0; r < kRows; ++r) {
      for (int c = 0; c < 128; ++c) {
        double got = 0.0, expected = 0.0;
        for (int s = 0; s < kStream; s += 16) {
          ok = ok && encodable(gradient_a(s)) && encodable(gradient_b(g, s));
          for (int kk = 0; kk < 16; ++kk) {
            got += a.k_major(gradient_a(s), r, kk) * b.mn_major(gradient_b(g, s), kk, c);
            expected += a_value(r, s + kk) * b_value(s + kk, 128 * g + c);
          }
        }
        ok = ok && got == expected;
      }
    }
  }
  return ok;
}

// The diagnostic variant (B's offsets swapped): its reads stay inside the shared memory it is
// given (B's 32 KB and the 64 KB after them; .at() throws otherwise), and its product differs
// from the right one, so that on the GPU exactly one of the two readings can be exact.
bool host_check_swapped() {
  HostTile b(kStream * kDepth * 2 + 65536);
  for (int e = 0; e < kStream * kDepth; ++e) {
    b.put(canonical_offset(e / kDepth, e % kDepth), b_value(e / kDepth, e % kDepth));
  }
  bool differs = false;
  for (int g = 0; g < 2; ++g) {
    for (int c = 0; c < 128; ++c) {
      for (int s = 0; s < kStream; s += 16) {
        const Operand swapped = swapped_offsets(gradient_b(g, s));
        for (int kk = 0; kk < 16; ++kk) {
          const float value = b.mn_major(swapped, kk, c);  // (every read, for the bound)
          differs = differs || value != b_value(s + kk, 128 * g + c);
        }
      }
    }
  }
  return differs;
}

bool host_check() {
  const bool ok = host_check_score(32) && host_check_score(64) && host_check_score(128) &&
                  host_check_gradient() && host_check_swapped();
  std::printf("host emulation of the wgmma variants' layouts: %s\n", ok ? "exact" : "WRONG");
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::strcmp(argv[1], "--host") == 0) return host_check() ? 0 : 1;
  const int repeats = argc > 1 ? std::atoi(argv[1]) : 2000;
  if (!host_check()) return 1;
  int device = 0, sms = 0, clock_khz = 0, major = 0, minor = 0;
  PROBE_CHECK(cudaGetDevice(&device));
  PROBE_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  PROBE_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  PROBE_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  if (cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, device) != cudaSuccess) {
    clock_khz = 1980000;
    (void)cudaGetLastError();
  }
  cudaDeviceProp prop{};
  PROBE_CHECK(cudaGetDeviceProperties(&prop, device));
  const bool hopper = major == 9 && minor == 0;
  const double clock_hz = clock_khz * 1e3;
  std::printf("# mma_probe: %s, %d SMs, %.2f GHz (max clock), D = %d, %d repeats\n", prop.name,
              sms, clock_hz * 1e-9, kDepth, repeats);

  const size_t wmma_ld = kDepth + 8;
  const Variant variants[] = {
      {"WMMA fp16, 16 x 32 warp tiles", 64, 16.0 * 32 * 16 * 2 / (3 * 16 * 16 * 2),
       reinterpret_cast<const void*>(&wmma_product<64, 4>), (64 + 64) * wmma_ld * 2, false},
      {"WMMA fp16, 32 x 32 warp tiles", 128, 32.0 * 32 * 16 * 2 / (4 * 16 * 16 * 2),
       reinterpret_cast<const void*>(&wmma_product<128, 2>), (64 + 128) * wmma_ld * 2, false},
      {"wgmma bf16, m64n32 per warpgroup (the fused forward's)", 64,
       64.0 * 32 * 16 * 2 / ((64 + 32) * 16 * 2),
       reinterpret_cast<const void*>(&wgmma_product<32>), (64 + 64) * kDepth * 2, true},
      {"wgmma bf16, m64n64 per warpgroup", 128, 64.0 * 64 * 16 * 2 / ((64 + 64) * 16 * 2),
       reinterpret_cast<const void*>(&wgmma_product<64>), (64 + 128) * kDepth * 2, true},
      {"wgmma bf16, m64n128 per warpgroup", 256, 64.0 * 128 * 16 * 2 / ((64 + 128) * 16 * 2),
       reinterpret_cast<const void*>(&wgmma_product<128>), (64 + 256) * kDepth * 2, true},
      {"wgmma bf16, gradient product, B transposed", 64,
       64.0 * 128 * 16 * 2 / ((64 + 128) * 16 * 2),
       reinterpret_cast<const void*>(&wgmma_gradient_product<kProbeDescriptors>),
       (64 * 64 + 64 * kDepth) * 2, true, true},
      {"wgmma bf16, gradient product, 2 x m64n64 (the fused backward's)", 64,
       64.0 * 64 * 16 * 2 / ((64 + 64) * 16 * 2),
       reinterpret_cast<const void*>(&wgmma_gradient_product<kKernelWrapper>),
       (64 * 64 + 64 * kDepth) * 2, true, true},
      // (64 KB more shared memory than it writes: read the other way round, B's steps along n
      // are D * 16 bytes, which reach up to 88 KB past B's start; the extra is never written.)
      {"wgmma bf16, gradient product, B's offsets swapped (diagnostic)", 64,
       64.0 * 128 * 16 * 2 / ((64 + 128) * 16 * 2),
       reinterpret_cast<const void*>(&wgmma_gradient_product<kSwappedOffsets>),
       (64 * 64 + 64 * kDepth) * 2 + 65536, true, true, true},
  };

  const int max_cols = 256;
  const auto a16 = host_matrix<__half>(kRows, true);
  const auto b16 = host_matrix<__half>(max_cols, false);
  const auto a_bf = host_matrix<__nv_bfloat16>(kRows, true);
  const auto b_bf = host_matrix<__nv_bfloat16>(max_cols, false);
  void *d_a16, *d_b16, *d_abf, *d_bbf;
  PROBE_CHECK(cudaMalloc(&d_a16, a16.size() * 2));
  PROBE_CHECK(cudaMalloc(&d_b16, b16.size() * 2));
  PROBE_CHECK(cudaMalloc(&d_abf, a_bf.size() * 2));
  PROBE_CHECK(cudaMalloc(&d_bbf, b_bf.size() * 2));
  PROBE_CHECK(cudaMemcpy(d_a16, a16.data(), a16.size() * 2, cudaMemcpyHostToDevice));
  PROBE_CHECK(cudaMemcpy(d_b16, b16.data(), b16.size() * 2, cudaMemcpyHostToDevice));
  PROBE_CHECK(cudaMemcpy(d_abf, a_bf.data(), a_bf.size() * 2, cudaMemcpyHostToDevice));
  PROBE_CHECK(cudaMemcpy(d_bbf, b_bf.data(), b_bf.size() * 2, cudaMemcpyHostToDevice));

  std::printf("\n| variant | block tile | blocks/SM | check | TFLOP/s | shared-path cap |\n");
  std::printf("|---|---|---|---|---|---|\n");
  bool all_ok = true;
  bool swapped_exact = false;
  for (const Variant& v : variants) {
    if (v.bf16 && !hopper) {
      std::printf("| %s | 64 x %d | - | skipped (needs sm_90) | - | - |\n", v.name, v.cols);
      continue;
    }
    PROBE_CHECK(cudaFuncSetAttribute(v.kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     static_cast<int>(v.shared_bytes)));
    int per_sm = 0;
    PROBE_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, v.kernel, kThreads,
                                                              v.shared_bytes));
    per_sm = std::min(per_sm, 2);
    const int blocks = per_sm * sms;
    float* d_out = nullptr;
    const int out_cols = v.gradient ? kDepth : v.cols;  // the gradient product: 64 x D
    const size_t out_count = static_cast<size_t>(blocks) * kRows * out_cols;
    PROBE_CHECK(cudaMalloc(&d_out, out_count * sizeof(float)));
    const void* a = v.bf16 ? d_abf : d_a16;
    const void* b = v.bf16 ? d_bbf : d_b16;
    auto launch = [&](int count, int reps) {
      void* args[] = {const_cast<void**>(&a), const_cast<void**>(&b), &d_out, &reps};
      PROBE_CHECK(cudaLaunchKernel(v.kernel, dim3(count), dim3(kThreads), args, v.shared_bytes,
                                   nullptr));
      PROBE_CHECK(cudaGetLastError());
    };
    // The check: one block, one pass, against the host product.
    launch(1, 1);
    PROBE_CHECK(cudaDeviceSynchronize());
    std::vector<float> got(static_cast<size_t>(kRows) * out_cols);
    PROBE_CHECK(cudaMemcpy(got.data(), d_out, got.size() * sizeof(float), cudaMemcpyDeviceToHost));
    double worst = 0.0;
    bool exact = true;  // (a NaN fails this, where it would leave std::max's worst at 0)
    bool saw_nan = false;
    for (int r = 0; r < kRows; ++r) {
      for (int c = 0; c < out_cols; ++c) {
        double expected = 0.0;
        if (v.gradient) {  // sum over the 64 stream rows s of G[r][s] stream[s][c]
          for (int s = 0; s < v.cols; ++s) expected += a_value(r, s) * b_value(s, c);
        } else {  // sum over k of own[r][k] stream[c][k]
          for (int k = 0; k < kDepth; ++k) expected += a_value(r, k) * b_value(c, k);
        }
        const float value = got[static_cast<size_t>(r) * out_cols + c];
        exact = exact && value == expected;
        saw_nan = saw_nan || std::isnan(value);
        if (!std::isnan(value)) worst = std::max(worst, std::fabs(expected - value));
      }
    }
    const bool ok = exact;
    if (v.diagnostic) {
      swapped_exact = ok;
    } else {
      all_ok = all_ok && ok;
    }
    // The rate: every block, `repeats` passes; the median of 5 after a warm-up.
    launch(blocks, repeats);
    cudaEvent_t start, stop;
    PROBE_CHECK(cudaEventCreate(&start));
    PROBE_CHECK(cudaEventCreate(&stop));
    std::vector<float> ms;
    for (int t = 0; t < 5; ++t) {
      PROBE_CHECK(cudaEventRecord(start));
      launch(blocks, repeats);
      PROBE_CHECK(cudaEventRecord(stop));
      PROBE_CHECK(cudaEventSynchronize(stop));
      float elapsed = 0.0f;
      PROBE_CHECK(cudaEventElapsedTime(&elapsed, start, stop));
      ms.push_back(elapsed);
    }
    std::sort(ms.begin(), ms.end());
    const double flops = 2.0 * kRows * v.cols * kDepth * static_cast<double>(repeats) * blocks;
    const double tflops = flops / (ms[2] * 1e-3) * 1e-12;
    const double cap = v.flops_per_byte * 128.0 * sms * clock_hz * 1e-12;
    char tile[32];
    std::snprintf(tile, sizeof(tile), v.gradient ? "64 x %d, k = %d" : "64 x %d%.0d", out_cols,
                  v.gradient ? v.cols : 0);
    const char* check = ok ? "exact" : (v.diagnostic ? "wrong (as it should be)" : "WRONG");
    std::printf("| %s | %s | %d | %s | %.0f | %.0f (%.1f flop/B) |\n", v.name, tile, per_sm,
                check, tflops, cap, v.flops_per_byte);
    if (!ok && !v.diagnostic) {
      std::printf("  max |error| %.3g%s\n", worst, saw_nan ? ", and NaN entries" : "");
    }
    PROBE_CHECK(cudaEventDestroy(start));
    PROBE_CHECK(cudaEventDestroy(stop));
    PROBE_CHECK(cudaFree(d_out));
  }
  std::printf("\nshared-path cap: 128 B per cycle per SM times the operand bytes per flop of the "
              "variant (docs/design.md, section 5); the tensor cores' own peak is about "
              "%.0f TFLOP/s (4096 bf16 flops per cycle per SM).\n",
              4096.0 * sms * clock_hz * 1e-12);
  if (swapped_exact) {  // (and so the kernels' reading wrong: --host checks the two differ)
    std::printf("mma_probe: the gradient product is exact with B's leading and stride byte "
                "offsets swapped: swap them in csrc/cuda/wgmma.cuh's descriptor_mn (and in this "
                "file's gradient_b)\n");
  }
  std::printf("%s\n", all_ok ? "mma_probe: every check exact" : "mma_probe: a check FAILED");
  return all_ok ? 0 : 1;
}
