// Scores widened to the CPU kernels' compute type (float for float16 and bfloat16 scores), in a
// form the compiler turns into vector instructions.
//
// c10::Half's own conversion to float is not vectorised in an extension built for the baseline
// x86-64 (no F16C): it made the CPU op on float16 scores more than twice as slow as on float32.
// float_from_half_bits is branch-free integer arithmetic and one int-to-float conversion, exact
// for every input:
// - a normal half (exponent field 1..30) has the float bits (h << 13) + (112 << 23): mantissa
//   shifted into place, exponent rebiased from 15 to 127;
// - a subnormal half (or zero) is its 10-bit mantissa times 2^-24: exact as an int-to-float
//   conversion and a multiplication by a power of two whose result is a normal float, so it holds
//   with denormals-are-zero set too (torch.set_flush_denormal), where no subnormal float appears;
// - infinity and NaN keep their mantissa under an all-ones exponent (a signalling NaN stays
//   signalling: only a NaN's being NaN matters to the kernels).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

namespace fastap {

inline float float_from_half_bits(uint16_t half) {
  const uint32_t sign = static_cast<uint32_t>(half & 0x8000u) << 16;
  const uint32_t magnitude = half & 0x7fffu;
  const float subnormal = static_cast<float>(static_cast<int32_t>(magnitude)) * 0x1p-24f;
  uint32_t subnormal_bits;
  std::memcpy(&subnormal_bits, &subnormal, sizeof(float));
  const uint32_t normal_bits = (magnitude << 13) + (112u << 23);
  const uint32_t special_bits = (magnitude << 13) | 0x7f800000u;
  // Selected by masks: GCC leaves nested conditionals here as branches, which stop vectorisation.
  const uint32_t is_subnormal = 0u - static_cast<uint32_t>(magnitude < 0x0400u);
  const uint32_t is_special = 0u - static_cast<uint32_t>(magnitude >= 0x7c00u);
  const uint32_t bits = sign | (subnormal_bits & is_subnormal) | (special_bits & is_special) |
                        (normal_bits & ~(is_subnormal | is_special));
  float value;
  std::memcpy(&value, &bits, sizeof(float));
  return value;
}

// widen(score): the score in the compute type of the CPU kernels (at::opmath_type).
inline float widen(c10::Half score) { return float_from_half_bits(score.x); }
inline float widen(c10::BFloat16 score) { return static_cast<float>(score); }  // a shift
inline float widen(float score) { return score; }
inline double widen(double score) { return score; }

}  // namespace fastap
