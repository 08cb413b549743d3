// The matrix unit (WMMA) for the fused embedding kernels: per input type, what the tensor cores
// take (MatrixUnit: bf16 and fp16 natively, fp32 as TF32), and the loads and stores of fragments
// from and to shared memory (load_operand, store_accumulator). Device code only; on the host
// (tests/emulation) nvcuda::wmma is tests/emulation/wmma_host.h.
#pragma once

#ifndef FASTAP_EMULATION
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#endif

// WMMA with bf16 and TF32 needs sm_80; for older architectures the kernels compile to a trap (the
// op refuses such GPUs with a clear error first: check_embedding_inputs in cuda_ops.cpp).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define FASTAP_MMA_UNSUPPORTED 1
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

}  // namespace embedding
}  // namespace fastap
