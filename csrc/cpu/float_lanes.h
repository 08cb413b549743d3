// FloatLanes<W>: W float32 lanes, one query row each, for the CPU op's row formula (ap_formula.h
// through lane_math.h). Built on GCC's and clang's vector extensions, as wide as one register:
// 4 lanes for the baseline (SSE2 on x86-64, NEON on ARM), 8 in a function compiled for AVX2 and
// 16 in one compiled for AVX-512 (cpu/ap_formula.cpp picks one at run time). Every operation is
// the IEEE operation of each lane, so rows in lanes give the bits that each row gives alone as a
// float, provided that no multiply and add are fused: setup.py builds with -ffp-contract=off,
// since g++ fuses them wherever the target has FMA (AVX-512, and every aarch64) and clang by
// default wherever it has FMA too. tests/test_native_lanes.py checks those bits with g++ and
// clang, on x86-64 and on aarch64. Where there are no vector extensions (MSVC),
// FASTAP_FLOAT_LANES is 0 and the CPU op runs the float rows one at a time.
#pragma once

#if defined(__GNUC__)
#define FASTAP_FLOAT_LANES 1

#include <cstdint>
#include <type_traits>
#include <utility>

namespace fastap {

// The vector types of W float32 or int32 lanes.
template <int W>
struct VectorTypes;
template <>
struct VectorTypes<4> {
  typedef float Float __attribute__((vector_size(16)));
  typedef int32_t Int __attribute__((vector_size(16)));
};
template <>
struct VectorTypes<8> {
  typedef float Float __attribute__((vector_size(32)));
  typedef int32_t Int __attribute__((vector_size(32)));
};
template <>
struct VectorTypes<16> {
  typedef float Float __attribute__((vector_size(64)));
  typedef int32_t Int __attribute__((vector_size(64)));
};

// W lanes of Element (float, or int32_t for log1p_float's bit arithmetic and for a comparison's
// outcome: all ones in a lane where it holds, zero where not). Only the operations that the
// element type has are ever instantiated. (Aligned to its size by hand: without AVX, GCC aligns
// a 32-byte vector to 16 bytes only.)
template <typename Element, int W>
struct alignas(4 * W) Lanes {
  typedef std::conditional_t<std::is_same_v<Element, float>, typename VectorTypes<W>::Float,
                             typename VectorTypes<W>::Int>
      Vector;
  static constexpr int kWidth = W;
  Vector v;

  Lanes() = default;
  explicit Lanes(Element x) : v(Vector{} + x) {}
  static Lanes of(Vector vector) {
    Lanes lanes;
    lanes.v = vector;
    return lanes;
  }
  // base[offsets[0]], ..., base[offsets[W - 1]], built in registers.
  static Lanes gather(const Element* base, const int64_t* offsets) {
    return gather(base, offsets, std::make_integer_sequence<int, W>{});
  }
  template <int... lane>
  static Lanes gather(const Element* base, const int64_t* offsets,
                      std::integer_sequence<int, lane...>) {
    return of(Vector{base[offsets[lane]]...});
  }
  Element operator[](int lane) const { return v[lane]; }
  void set(int lane, Element x) { v[lane] = x; }

  friend Lanes operator+(Lanes a, Lanes b) { return of(a.v + b.v); }
  friend Lanes operator-(Lanes a, Lanes b) { return of(a.v - b.v); }
  friend Lanes operator*(Lanes a, Lanes b) { return of(a.v * b.v); }
  friend Lanes operator/(Lanes a, Lanes b) { return of(a.v / b.v); }
  friend Lanes operator-(Lanes a) { return of(-a.v); }
  friend Lanes operator&(Lanes a, Lanes b) { return of(a.v & b.v); }
  friend Lanes operator|(Lanes a, Lanes b) { return of(a.v | b.v); }
  friend Lanes operator>>(Lanes a, int shift) { return of(a.v >> shift); }
  Lanes& operator+=(Lanes b) { return *this = *this + b; }
  Lanes& operator-=(Lanes b) { return *this = *this - b; }
  Lanes& operator*=(Lanes b) { return *this = *this * b; }
  friend Lanes<int32_t, W> operator>(Lanes a, Lanes b) {
    return Lanes<int32_t, W>::of(a.v > b.v);
  }
  friend Lanes<int32_t, W> operator<(Lanes a, Lanes b) {
    return Lanes<int32_t, W>::of(a.v < b.v);
  }
  friend Lanes<int32_t, W> operator==(Lanes a, Lanes b) {
    return Lanes<int32_t, W>::of(a.v == b.v);
  }
};

template <int W>
using FloatLanes = Lanes<float, W>;
template <int W>
using IntLanes = Lanes<int32_t, W>;

// (A cast between vectors of one size keeps the bits.)
template <int W>
FloatLanes<W> lane_select(IntLanes<W> condition, FloatLanes<W> if_true, FloatLanes<W> if_false) {
  typedef typename IntLanes<W>::Vector Bits;
  const Bits bits = (condition.v & (Bits)if_true.v) | (~condition.v & (Bits)if_false.v);
  return FloatLanes<W>::of((typename FloatLanes<W>::Vector)bits);
}

template <int W>
bool any_lane(IntLanes<W> condition) {
  int32_t any = 0;
  for (int lane = 0; lane < W; ++lane) any |= condition.v[lane];
  return any != 0;
}

template <int W>
IntLanes<W> bits_of(FloatLanes<W> x) {
  return IntLanes<W>::of((typename IntLanes<W>::Vector)x.v);
}

template <int W>
FloatLanes<W> float_of_bits(IntLanes<W> bits) {
  return FloatLanes<W>::of((typename FloatLanes<W>::Vector)bits.v);
}

template <int W>
FloatLanes<W> float_of_int(IntLanes<W> i) {
  return FloatLanes<W>::of(__builtin_convertvector(i.v, typename FloatLanes<W>::Vector));
}

}  // namespace fastap

#include "../lane_math.h"

namespace fastap {

template <int W>
FloatLanes<W> lane_log1p(FloatLanes<W> x) {
  return log1p_float<FloatLanes<W>, IntLanes<W>>(x);
}

}  // namespace fastap

#else
#define FASTAP_FLOAT_LANES 0
#endif
