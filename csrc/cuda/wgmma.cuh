// Hopper's warpgroup matrix multiply (wgmma, sm_90a) for the fused kernels' score product and
// their backward's gradient product, with bf16/fp16 operands read by the tensor cores straight
// from shared memory.
//
// Why: with WMMA every operand passes through the shared-memory data path into registers (a warp's
// 16 x 32 tile reads 1.5 KB per k of 16), which docs/design.md, section 5, counts as the bound of
// the fused kernels. A warpgroup (4 warps, 128 threads) multiplies a 64 x 16 slice of A by a
// 32 x 16 slice of B per wgmma.mma_async.m64n32k16: 21 flops per byte of operands instead of 10.7.
//
// Operands in shared memory are K-major in the PTX ISA's canonical layout without swizzle: 8 x 8
// core matrices (8 rows of 8 consecutive elements, 16 bytes each, 128 bytes in all), the
// depth / 8 core matrices of a group of 8 rows one after another along k, the groups of 8 rows
// depth * 16 bytes apart (canonical_index). A descriptor names a slice by its first element, the
// leading-dimension byte offset (128: the next core matrix along k) and the stride-dimension byte
// offset (depth * 16: the next 8 rows); the gradient product reads its B, the stream rows, from the
// same tiles MN-major (descriptor_mn, below). The accumulators of a warpgroup's 64 x 32 tile of
// the score product are 16 fp32 registers per thread: register e of lane l in warp w (of the
// warpgroup) holds row 16 w + l / 4 + 8 ((e % 4) / 2), column 8 (e / 4) + 2 (l % 4) + e % 2
// (accumulator_row/col).
//
// benchmarks/mma_probe.cu checks this reading of the layouts on the GPU (and in CI against the
// host); tests/emulation/wgmma_host.h runs these functions on the CPU for the kernels' tests.
#pragma once

#include <cstdint>
#include <type_traits>

// The wgmma path exists where the target is sm_90a (the architecture-specific features) and in
// the CPU emulation; elsewhere the kernels that would use it trap, and use_wgmma (cuda_ops.cpp)
// never picks it.
#if defined(FASTAP_EMULATION) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define FASTAP_HAS_WGMMA 1
#endif

namespace fastap {
namespace embedding {
namespace wgmma {

constexpr int kGroupThreads = 128;  // a warpgroup
constexpr int kRows = 64;           // m of one wgmma: a warpgroup's rows
constexpr int kCols = 32;           // n of the score product's wgmma
constexpr int kGradCols = 64;       // n of the gradient product's wgmma
constexpr int kStep = 16;           // k of one wgmma (16-bit operands)

// Element (row, k) of a canonical K-major tile of `depth` (a multiple of 8) columns, in elements.
__host__ __device__ constexpr int canonical_index(int row, int k, int depth) {
  return (row / 8) * depth * 8 + (k / 8) * 64 + (row % 8) * 8 + k % 8;
}

// The accumulator element that register e of lane `lane` in warp `warp` (of its warpgroup) holds.
__host__ __device__ constexpr int accumulator_row(int warp, int lane, int e) {
  return 16 * warp + lane / 4 + 8 * ((e % 4) / 2);
}
__host__ __device__ constexpr int accumulator_col(int lane, int e) {
  return 8 * (e / 4) + 2 * (lane % 4) + e % 2;
}

// The 64-bit matrix descriptor of an operand slice that starts at the shared-memory byte address
// `address`: start, leading and stride byte offsets (each >> 4, 14 bits), base offset 0, no
// swizzle. K-major (descriptor), in a canonical tile of `depth` columns: the leading offset steps
// to the next core matrix along k (128 bytes), the stride offset to the next 8 rows
// (depth * 16). MN-major (descriptor_mn: B read transposed, its k the tile's rows and its n the
// tile's columns, "((T,1,m),(8,k)):((1,T,SBO),(1T,LBO))" in the ISA), in the same tile: the
// leading offset steps to the next 8 rows (k), the stride offset to the next 8 columns (n).
__host__ __device__ constexpr uint64_t encode(uint32_t address, int leading, int stride) {
  return ((address & 0x3ffffu) >> 4) | (static_cast<uint64_t>(leading >> 4) << 16) |
         (static_cast<uint64_t>(stride >> 4) << 32);
}
__host__ __device__ constexpr uint64_t descriptor(uint32_t address, int depth) {
  return encode(address, 128, depth * 16);
}
__host__ __device__ constexpr uint64_t descriptor_mn(uint32_t address, int depth) {
  return encode(address, depth * 16, 128);
}

#ifndef FASTAP_EMULATION
#ifdef FASTAP_HAS_WGMMA
// Makes this thread's ordinary shared-memory writes (stores, cp.async) visible to the tensor
// cores, which read through the async proxy: each writer, after its writes and before the barrier
// that the readers wait on.
__device__ __forceinline__ void fence_operands() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}
// Pins the accumulators `d` at this point of the program: the fences below name no register, so
// without this the compiler could move an accumulator's plain write (acc = 0) past
// wgmma.fence, or a read of it above wgmma.wait_group. Emits no instruction.
template <int N>
__device__ __forceinline__ void pin_registers(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
// Before the first wgmma of a batch on the accumulators `d`: orders their ordinary writes before
// it.
template <int N>
__device__ __forceinline__ void begin(float (&d)[N]) {
  pin_registers(d);
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
// Ends the batch, then waits until every wgmma of it has finished (the accumulators `d` are
// written and the operands read: shared memory may change after this).
template <int N>
__device__ __forceinline__ void commit_and_wait(float (&d)[N]) {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
  asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
  pin_registers(d);
}

// d += A B^T for one k step: A the 64 x 16 slice at `a` of a canonical tile of a_depth columns,
// B the 32 x 16 slice at `b` of one of b_depth columns (both in shared memory), d this thread's 16
// accumulators. Issued by all 128 threads of the warpgroup; complete after commit_and_wait.
#define FASTAP_WGMMA_M64N32K16(type)                                                          \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"                               \
               "wgmma.mma_async.sync.aligned.m64n32k16.f32." type "." type " "                \
               "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, "     \
               "%16, %17, p, 1, 1, 0, 0;\n}\n"                                                \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]),      \
                 "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]),    \
                 "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])                           \
               : "l"(a_desc), "l"(b_desc), "n"(1))
template <typename T>
__device__ __forceinline__ void mma_m64n32k16(float (&d)[16], const T* a, int a_depth, const T* b,
                                              int b_depth) {
  const uint64_t a_desc =
      descriptor(static_cast<uint32_t>(__cvta_generic_to_shared(a)), a_depth);
  const uint64_t b_desc =
      descriptor(static_cast<uint32_t>(__cvta_generic_to_shared(b)), b_depth);
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    FASTAP_WGMMA_M64N32K16("bf16");
  } else {
    static_assert(std::is_same_v<T, __half>, "wgmma here takes bf16 or fp16");
    FASTAP_WGMMA_M64N32K16("f16");
  }
}
#undef FASTAP_WGMMA_M64N32K16

// d += A B for one k step of the backward's gradient product: A the 64 x 16 slice at `a` of a
// canonical tile of a_depth columns (K-major: G), B the 16 x 64 slice at `b` of a canonical tile
// of b_depth columns read MN-major (16 stream rows, 64 of their columns), d this thread's 32
// accumulators of the 64 x 64 result (accumulator_row/col with e < 32).
#define FASTAP_WGMMA_M64N64K16_BT(type)                                                       \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                               \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." type "." type " "                \
               "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "      \
               "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, "  \
               "%31}, %32, %33, p, 1, 1, 0, 1;\n}\n"                                          \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]),      \
                 "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]),    \
                 "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),             \
                 "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]),             \
                 "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]),             \
                 "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])              \
               : "l"(a_desc), "l"(b_desc), "n"(1))
template <typename T>
__device__ __forceinline__ void mma_m64n64k16_bt(float (&d)[32], const T* a, int a_depth,
                                                 const T* b, int b_depth) {
  const uint64_t a_desc =
      descriptor(static_cast<uint32_t>(__cvta_generic_to_shared(a)), a_depth);
  const uint64_t b_desc =
      descriptor_mn(static_cast<uint32_t>(__cvta_generic_to_shared(b)), b_depth);
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    FASTAP_WGMMA_M64N64K16_BT("bf16");
  } else {
    static_assert(std::is_same_v<T, __half>, "wgmma here takes bf16 or fp16");
    FASTAP_WGMMA_M64N64K16_BT("f16");
  }
}
#undef FASTAP_WGMMA_M64N64K16_BT
#endif  // FASTAP_HAS_WGMMA
#endif  // !FASTAP_EMULATION

}  // namespace wgmma
}  // namespace embedding
}  // namespace fastap
