// log1p_float (csrc/lane_math.h) checked against double-precision log1p, as a scalar and in the
// 4, 8 and 16 lanes of csrc/cpu/float_lanes.h, over the floats whose bit patterns are multiples of
// `stride` (the first argument; 1 checks all 2^32 of them, in a few minutes) and a list of edge
// cases. Prints the largest error in ulp of the exact value, where it was, how many values it
// checked, how many times the lanes and the scalar disagreed in any bit, or the result disagreed
// with the exact one on being infinite or NaN (both counts must be 0), and a digest of all the
// results' bits (FNV-1a), for comparing builds.
// tests/test_native_lanes.py builds it with each compiler, instruction set and architecture found.
#include <cinttypes>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "../../csrc/cpu/float_lanes.h"

namespace {

float float_from(uint32_t bits) {
  float x;
  std::memcpy(&x, &bits, sizeof x);
  return x;
}

bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof a) == 0; }

struct Tally {
  double worst_ulp = 0.0;
  float worst_x = 0.0f;
  uint64_t checked = 0, lane_mismatches = 0, special_mismatches = 0;
  uint64_t digest = 14695981039346656037ull;

  void add(float x, float scalar, float four_lanes, float eight_lanes, float sixteen_lanes) {
    ++checked;
    uint32_t bits;
    std::memcpy(&bits, &scalar, sizeof bits);
    digest = (digest ^ bits) * 1099511628211ull;
    if (!same_bits(scalar, four_lanes) || !same_bits(scalar, eight_lanes) ||
        !same_bits(scalar, sixteen_lanes)) {
      ++lane_mismatches;
    }
    const double exact = std::log1p(static_cast<double>(x));
    if (std::isnan(exact) || std::isnan(scalar) || std::isinf(exact) || std::isinf(scalar)) {
      const bool agree = std::isnan(exact) ? std::isnan(scalar) : exact == scalar;
      if (!agree) ++special_mismatches;
      return;
    }
    // One ulp of the exact value: the gap between the floats around it.
    const float rounded = static_cast<float>(exact);
    const float magnitude = std::fabs(rounded);
    const double ulp = static_cast<double>(std::nextafter(magnitude, INFINITY)) - magnitude;
    const double error = std::fabs(static_cast<double>(scalar) - exact) / ulp;
    if (error > worst_ulp) {
      worst_ulp = error;
      worst_x = x;
    }
  }
};

}  // namespace

int main(int argc, char** argv) {
  const uint64_t stride = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 4099;
  if (stride == 0) return 2;
  std::vector<float> xs = {0.0f, -0.0f, 1.0f, -1.0f, -0.5f, 0.5f, 1e-30f, -1e-30f, 0x1p-24f,
                           0x1p-23f, 0x1.6a09e6p-1f, 0x1.6a09e6p+0f, 0x1.6a09e8p-2f,
                           std::numeric_limits<float>::max(), std::numeric_limits<float>::min(),
                           std::numeric_limits<float>::denorm_min(), -0x1.fffffep-1f,
                           std::nextafter(-1.0f, -2.0f), INFINITY, -INFINITY, NAN};
  for (uint64_t bits = 0; bits < (uint64_t{1} << 32); bits += stride) {
    xs.push_back(float_from(static_cast<uint32_t>(bits)));
  }
  // log1p of xs[first], ..., in W lanes (the last block padded with zeros).
  auto in_lanes = [&xs](auto lanes, size_t first) {
    constexpr int kWidth = decltype(lanes)::kWidth;
    for (int lane = 0; lane < kWidth; ++lane) {
      lanes.set(lane, first + lane < xs.size() ? xs[first + lane] : 0.0f);
    }
    return fastap::lane_log1p(lanes);
  };
  Tally tally;
  for (size_t first = 0; first < xs.size(); first += 16) {
    fastap::FloatLanes<4> four[4];
    fastap::FloatLanes<8> eight[2];
    for (int part = 0; part < 4; ++part) {
      four[part] = in_lanes(fastap::FloatLanes<4>(0.0f), first + 4 * part);
    }
    for (int part = 0; part < 2; ++part) {
      eight[part] = in_lanes(fastap::FloatLanes<8>(0.0f), first + 8 * part);
    }
    const fastap::FloatLanes<16> sixteen = in_lanes(fastap::FloatLanes<16>(0.0f), first);
    for (int lane = 0; lane < 16 && first + lane < xs.size(); ++lane) {
      const float x = xs[first + lane];
      tally.add(x, fastap::lane_log1p(x), four[lane / 4][lane % 4], eight[lane / 8][lane % 8],
                sixteen[lane]);
    }
  }
  std::printf("worst_ulp=%.6f worst_x=%a checked=%" PRIu64 " lane_mismatches=%" PRIu64
              " special_mismatches=%" PRIu64 " digest=%016" PRIx64 "\n",
              tally.worst_ulp, static_cast<double>(tally.worst_x), tally.checked,
              tally.lane_mismatches, tally.special_mismatches, tally.digest);
  return 0;
}
