// The AP row formula (csrc/ap_formula.h) on float32 rows, forward (ap_row) and backward
// (ap_row_backward), for the three variants: each row alone, as a float, and in the 4, 8 and 16
// lanes of csrc/cpu/float_lanes.h, one row a lane, as the CPU op runs it. Prints how many results
// differ in any bit between the lanes and the row alone (must be 0), how many are not finite (must
// be 0: the histograms here are all valid), how many rows it ran, and a digest of all results'
// bits (FNV-1a). The inputs are made from integers by exact operations, so they are the same bits
// everywhere, and so must the digest be, whatever the compiler, instruction set or architecture:
// tests/test_native_lanes.py builds it several ways and compares the digests.
#include <cinttypes>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "../../csrc/ap_formula.h"
#include "../../csrc/cpu/float_lanes.h"

namespace {

using fastap::ApVariant;

// splitmix64: a fixed stream of integers, the same on every platform.
struct Integers {
  uint64_t state;
  uint64_t next() {
    uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  uint32_t below(uint32_t bound) { return static_cast<uint32_t>(next() % bound); }
};

// A row's inputs: soft counts n (all candidates counted) and p (the positives, p <= n) in q bins,
// the exact count of positives, and the upstream gradient g.
struct Row {
  std::vector<float> n, p;
  float positives, g;
};

// A soft count, exact in float32: a multiple of 2^-12 (most), a whole number (ties: every score
// of the bin on one bin centre), 0, or large (long rankings), by `kind`.
float soft_count(Integers& integers, uint32_t kind) {
  switch (kind) {
    case 0: return 0.0f;
    case 1: return static_cast<float>(integers.below(4));                    // whole, ties
    case 2: return std::ldexp(static_cast<float>(integers.below(1u << 16)), -12);  // up to 16
    default: return std::ldexp(static_cast<float>(integers.below(1u << 22)), -2);  // up to 1e6
  }
}

Row make_row(Integers& integers, int64_t q) {
  Row row{std::vector<float>(q), std::vector<float>(q), 0.0f, 0.0f};
  const uint32_t kind = integers.below(4);
  float sum_p = 0.0f;
  for (int64_t k = 0; k < q; ++k) {
    // Mostly of the row's kind, some bins of any kind (a few empty ones in long rows).
    const uint32_t bin_kind = integers.below(4) == 0 ? integers.below(4) : kind;
    const float n = soft_count(integers, bin_kind);
    // p = n * j / 4, j in 0..4 (the positives' share of the bin; 1 and 0 exact).
    const float p = n * std::ldexp(static_cast<float>(integers.below(5)), -2);
    row.n[k] = n;
    row.p[k] = p;
    sum_p += p;
  }
  // The exact count: about the mass of p (the histograms spread each positive over its bins),
  // 0 for some rows (no positives: no AP, no gradient).
  row.positives = integers.below(8) == 0 ? 0.0f : std::ceil(sum_p) + 1.0f;
  row.g = std::ldexp(static_cast<float>(static_cast<int32_t>(integers.below(2049)) - 1024), -10);
  return row;
}

bool same_bits(float a, float b) { return std::memcmp(&a, &b, sizeof a) == 0; }

struct Tally {
  uint64_t rows = 0, lane_mismatches = 0, not_finite = 0;
  uint64_t digest = 14695981039346656037ull;

  void add(float x) {
    uint32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    digest = (digest ^ bits) * 1099511628211ull;
    if (!std::isfinite(x)) ++not_finite;
  }
  void compare(float alone, float in_lanes) {
    if (!same_bits(alone, in_lanes)) ++lane_mismatches;
  }
};

// One row alone: its AP and its gradients, in that order.
std::vector<float> row_alone(const Row& row, ApVariant variant) {
  const int64_t q = static_cast<int64_t>(row.n.size());
  std::vector<float> results(1 + 2 * q);
  results[0] = fastap::ap_row<float>(row.n.data(), row.p.data(), q, row.positives, variant);
  fastap::ap_row_backward<float>(row.g, row.n.data(), row.p.data(), q, row.positives, variant,
                                 results.data() + 1, results.data() + 1 + q);
  return results;
}

// W rows in lanes, compared with each row alone (`alone`, as row_alone gives them).
template <int W>
void compare_in_lanes(const std::vector<Row>& rows, const std::vector<std::vector<float>>& alone,
                      ApVariant variant, Tally& tally) {
  using L = fastap::FloatLanes<W>;
  const int64_t q = static_cast<int64_t>(rows[0].n.size());
  std::vector<L> n(q), p(q), grad_n(q), grad_p(q);
  for (size_t first = 0; first + W <= rows.size(); first += W) {
    L positives(0.0f), g(0.0f);
    for (int lane = 0; lane < W; ++lane) {
      const Row& row = rows[first + lane];
      for (int64_t k = 0; k < q; ++k) {
        n[k].set(lane, row.n[k]);
        p[k].set(lane, row.p[k]);
      }
      positives.set(lane, row.positives);
      g.set(lane, row.g);
    }
    const L ap = fastap::ap_row<L>(n.data(), p.data(), q, positives, variant);
    fastap::ap_row_backward<L>(g, n.data(), p.data(), q, positives, variant, grad_n.data(),
                               grad_p.data());
    for (int lane = 0; lane < W; ++lane) {
      const std::vector<float>& expected = alone[first + lane];
      tally.compare(expected[0], ap[lane]);
      for (int64_t k = 0; k < q; ++k) {
        tally.compare(expected[1 + k], grad_n[k][lane]);
        tally.compare(expected[1 + q + k], grad_p[k][lane]);
      }
    }
  }
}

}  // namespace

int main() {
  Integers integers{20261202};
  Tally tally;
  const ApVariant variants[] = {ApVariant::kQuantized, ApVariant::kTieAware,
                                ApVariant::kTieAwareSimplified};
  for (const int64_t q : {2, 3, 7, 20, 33, 100}) {
    std::vector<Row> rows;
    for (int i = 0; i < 4096; ++i) rows.push_back(make_row(integers, q));  // a multiple of 16
    for (const ApVariant variant : variants) {
      std::vector<std::vector<float>> alone;
      for (const Row& row : rows) {
        alone.push_back(row_alone(row, variant));
        for (const float x : alone.back()) tally.add(x);
      }
      tally.rows += rows.size();
      compare_in_lanes<4>(rows, alone, variant, tally);
      compare_in_lanes<8>(rows, alone, variant, tally);
      compare_in_lanes<16>(rows, alone, variant, tally);
    }
  }
  std::printf("rows=%" PRIu64 " lane_mismatches=%" PRIu64 " not_finite=%" PRIu64
              " digest=%016" PRIx64 "\n",
              tally.rows, tally.lane_mismatches, tally.not_finite, tally.digest);
  return 0;
}
