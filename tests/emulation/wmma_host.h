// The part of CUDA's WMMA API (mma.h) and of its bf16/fp16 types that fastap's fused kernels use,
// on the CPU, for cuda_host.h.
//
// A fragment holds its whole 16 x 16 (or 16 x k) tile in every lane (the real layout across lanes
// is unspecified, and the kernels only touch fragments through the API and element-wise
// operations). Loads check the documented requirements (a 32-byte aligned pointer, a leading
// dimension that is a multiple of 16 bytes) and abort if they are broken; mma_sync multiplies in
// fp32 (exact products of bf16/fp16/TF32 inputs, k in order); store_matrix_sync is written by lane
// 0 only, so that a reader that forgets to synchronise with the warp races (ThreadSanitizer).
// The kernels never read accumulator elements directly, so lane 0 alone does the arithmetic.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "cuda_host.h"

#define FASTAP_EMULATION 1

using __nv_bfloat16 = c10::BFloat16;
using __half = c10::Half;
inline __nv_bfloat16 __float2bfloat16(float x) { return __nv_bfloat16(x); }  // round to nearest even
inline __half __float2half(float x) { return __half(x); }
inline void __trap() { std::abort(); }

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };

// cvt.rna.tf32.f32: keep 10 mantissa bits, rounding to nearest with ties away from zero.
inline float __float_to_tf32(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  if ((bits & 0x7f800000u) != 0x7f800000u) bits = (bits + 0x1000u) & 0xffffe000u;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = rows * cols;
  using element_type = std::conditional_t<std::is_same_v<T, precision::tf32>, float, T>;
  element_type x[num_elements];  // logical row-major
  element_type& at(int r, int c) { return x[r * cols + c]; }
  const element_type& at(int r, int c) const { return x[r * cols + c]; }
};

inline void check_operand(const void* pointer, unsigned ldm, size_t element_bytes) {
  if (reinterpret_cast<uintptr_t>(pointer) % 32 != 0) {
    std::fprintf(stderr, "emulation: WMMA pointer %p is not 32-byte aligned\n", pointer);
    std::abort();
  }
  if ((ldm * element_bytes) % 16 != 0) {
    std::fprintf(stderr, "emulation: WMMA ldm %u is not a multiple of 16 bytes\n", ldm);
    std::abort();
  }
}

template <typename Use, int M, int N, int K, typename T, typename Layout, typename P>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const P* pointer, unsigned ldm) {
  static_assert(!std::is_same_v<Use, accumulator>, "accumulator loads need a layout");
  check_operand(pointer, ldm, sizeof(P));
  constexpr bool by_rows = std::is_same_v<Layout, row_major>;
  for (int r = 0; r < f.rows; ++r) {
    for (int c = 0; c < f.cols; ++c) f.at(r, c) = by_rows ? pointer[r * ldm + c] : pointer[r + c * ldm];
  }
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, T value) {
  for (auto& e : f.x) e = value;
}

template <int M, int N, int K, typename TA, typename TB, typename LA, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
              const fragment<matrix_b, M, N, K, TB, LB>& b,
              const fragment<accumulator, M, N, K, float>& c) {
  // Only lane 0's accumulator is ever stored (store_matrix_sync), so only lane 0 multiplies;
  // the other lanes' accumulators are left as they were.
  if (threadIdx.x % 32 != 0) return;
  fragment<accumulator, M, N, K, float> out;
  for (int i = 0; i < M; ++i) {
    for (int j = 0; j < N; ++j) {
      float sum = c.at(i, j);
      for (int k = 0; k < K; ++k) {
        sum += static_cast<float>(a.at(i, k)) * static_cast<float>(b.at(k, j));
      }
      out.at(i, j) = sum;
    }
  }
  d = out;
}

template <int M, int N, int K>
void store_matrix_sync(float* pointer, const fragment<accumulator, M, N, K, float>& f,
                       unsigned ldm, layout_t layout) {
  check_operand(pointer, ldm, sizeof(float));
  if (threadIdx.x % 32 != 0) return;
  for (int r = 0; r < M; ++r) {
    for (int c = 0; c < N; ++c) {
      pointer[layout == mem_row_major ? r * ldm + c : r + c * ldm] = f.at(r, c);
    }
  }
}

}  // namespace wmma
}  // namespace nvcuda
