// What the row formula (ap_formula.h) needs beyond + - * / to be written once for one query row
// (a scalar T: the CUDA kernels, and the CPU op on float64) and for several rows at a time (T a
// vector of lanes, one row each: the CPU op on float32, cpu/float_lanes.h):
// - lane_select(condition, a, b) in place of `condition ? a : b`: a lane vector's comparison is a
//   mask, and both a and b are computed (whatever the lanes that are not selected hold, NaN
//   included, is dropped);
// - any_lane(condition), for an early way out when no lane needs the work;
// - lane_log1p(x): log(1 + x). For float it is fastap's own, log1p_float below, so that one row
//   gives the same bits alone (the CUDA kernel's code) and in lanes (the CPU op), which a
//   library's log1pf would not promise; float64 keeps the standard library's.
// No torch.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "binning.h"  // FASTAP_HOST_DEVICE

namespace fastap {

template <typename T>
FASTAP_HOST_DEVICE T lane_select(bool condition, T if_true, T if_false) {
  return condition ? if_true : if_false;
}

FASTAP_HOST_DEVICE bool any_lane(bool condition) { return condition; }

// A float's bits as an int32 and back, and an int32's value as a float: what log1p_float takes
// apart (cpu/float_lanes.h has the same three for a vector of lanes). memcpy, which nvcc compiles
// to a move in device code too.
template <typename To, typename From>
FASTAP_HOST_DEVICE To same_bits_as(From x) {
  static_assert(sizeof(To) == sizeof(From), "a copy of the bits needs types of one size");
  To y;
  memcpy(&y, &x, sizeof y);
  return y;
}

FASTAP_HOST_DEVICE int32_t bits_of(float x) { return same_bits_as<int32_t>(x); }

FASTAP_HOST_DEVICE float float_of_bits(int32_t bits) { return same_bits_as<float>(bits); }

FASTAP_HOST_DEVICE float float_of_int(int32_t i) { return static_cast<float>(i); }

// log(1 + x) in float, for F = float (I = int32_t) or a vector of float lanes (I: the int32 lanes
// of the same width). Within 0.9 ulp of the exact value for every float x (0.893 at worst, at
// x = -0x1.2e5c04p-2: all 2^32 of them checked against double-precision log1p by
// tests/native/lane_math_check.cpp, of which tests/test_native_lanes.py runs a sample), after the
// scheme of fdlibm's log1pf:
// - u = 1 + x is rounded, and c = (1 + x) - u exactly (Fast2Sum, the larger of 1 and x first);
// - u = 2^k m with m in [sqrt(1/2), sqrt(2)), so log(1 + x) = k log(2) + log(m) + log(1 + c / u),
//   the last term taken as c / u = c 2^-k / m; where k = 0, m is 1 + x and f below is x itself,
//   exact (c / u would be a large part of the result for a tiny x);
// - log(m) = log(1 + f), f = m - 1 (exact), is 2 atanh(s), s = f / (2 + f), |s| <= 0.172: the odd
//   series 2 s + 2 s^3 / 3 + ... to s^9 (the next term is below 1e-9 of the value), which is
//   f - f^2 / 2 + s (f^2 / 2 + R) with R = s^2 (2/3 + 2/5 s^2 + 2/7 s^4 + 2/9 s^6);
// - s and c / u share one division, 1 / (m (2 + f)) with m (2 + f) in [1.2, 3.5]: the rounding of
//   the product does not show, as s enters the result only through a term below 0.03 of it, and
//   c / u (where k is not 0) only below 1.5 of its last bit;
// - the terms are added smallest first and f last, and k log(2) in two parts (the first with 15
//   significant bits, so that k times it is exact) around them;
// - x = -1 gives -infinity, x < -1 NaN, +infinity itself, NaN NaN.
template <typename F, typename I>
FASTAP_HOST_DEVICE F log1p_float(F x) {
  const F one(1.0f);
  const F u = x + one;
  const F c = lane_select(x > one, one - (u - x), x - (u - one));
  const I bits = bits_of(u);
  const I exponent_field = (bits >> 23) & I(0xff);
  F m = float_of_bits((bits & I(0x7fffff)) | I(0x3f800000));  // u's mantissa, in [1, 2)
  F k = float_of_int(exponent_field) - F(127.0f);
  // 2^-k: the float whose exponent field is 254 - exponent_field (0 for u >= 2^127, where c / u
  // is far below the result's last bit; an infinite or NaN u is replaced below).
  F scale = float_of_bits(I(0x7f000000) - (bits & I(0x7f800000)));
  const auto upper = m > F(1.41421356f);
  m = lane_select(upper, m * F(0.5f), m);
  k = lane_select(upper, k + one, k);
  scale = lane_select(upper, scale * F(0.5f), scale);
  const auto unreduced = k == F(0.0f);
  const F f = lane_select(unreduced, x, m - one);
  m = lane_select(unreduced, one, m);
  const F c_scaled = lane_select(unreduced, F(0.0f), c * scale);
  const F two_plus_f = F(2.0f) + f;
  const F inverse = one / (m * two_plus_f);
  const F s = f * (m * inverse);
  const F c_over_u = c_scaled * (two_plus_f * inverse);
  const F z = s * s;
  F r = F(2.0f / 9.0f);
  r = r * z + F(2.0f / 7.0f);
  r = r * z + F(2.0f / 5.0f);
  r = r * z + F(2.0f / 3.0f);
  r = r * z;
  const F half_f_squared = F(0.5f) * f * f;
  const F small = s * (half_f_squared + r) + (k * F(0x1.7f7d1cp-20f) + c_over_u);
  F result = k * F(0x1.62e4p-1f) - ((half_f_squared - small) - f);
  const F infinity = float_of_bits(I(0x7f800000));
  result = lane_select(x < infinity, result, x);  // +infinity and NaN as they are
  return lane_select(x > F(-1.0f), result,
                     lane_select(x == F(-1.0f), -infinity, float_of_bits(I(0x7fc00000))));
}

FASTAP_HOST_DEVICE float lane_log1p(float x) { return log1p_float<float, int32_t>(x); }

FASTAP_HOST_DEVICE double lane_log1p(double x) { return std::log1p(x); }

}  // namespace fastap
