// The device branches of csrc/binning.h (#ifdef __CUDA_ARCH__: fmin/fmax in position, min in
// locate, __ldg in score_gradient), which the emulation of the kernels never compiles, built for
// the host. tests/test_cuda_emulation.py compiles this file twice, with and without
// -D__CUDA_ARCH__=900, runs both and asks for the same output, bit for bit: where each score falls
// (bin, fraction, slope) and its gradient, for scores at and beside the ends and the bin centres,
// beyond the range, non-finite, and spread over it, in float and double, on several grids.
#include <math.h>

#include <algorithm>
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <vector>

#ifdef __CUDA_ARCH__
// The device functions that the branches call, as the host has them.
using std::min;
template <typename T>
T __ldg(const T* pointer) {
  return *pointer;
}
#endif

#include "../../csrc/binning.h"

namespace {

template <typename T>
uint64_t bits(T x) {
  uint64_t out = 0;
  std::memcpy(&out, &x, sizeof(T));
  return out;
}

template <typename T>
std::vector<T> scores_for(const fastap::BinGrid<T>& grid, double lo, double hi) {
  const T inf = std::numeric_limits<T>::infinity();
  std::vector<T> scores = {std::numeric_limits<T>::quiet_NaN(), inf, -inf, T(0), T(-0.0)};
  const double delta = (hi - lo) / grid.last_bin;
  // Centres (about 40 of them, the first and the last two among them) and one beyond each end.
  const int step = std::max(1, (grid.last_bin + 2) / 40);
  std::vector<int> ks = {grid.last_bin - 1, grid.last_bin, grid.last_bin + 1};
  for (int k = -1; k < grid.last_bin - 1; k += step) ks.push_back(k);
  for (const int k : ks) {
    const T centre = static_cast<T>(hi - k * delta);
    scores.insert(scores.end(), {centre, std::nextafter(centre, inf), std::nextafter(centre, -inf)});
  }
  uint64_t state = 12345;  // and a spread over the range and a little beyond (an LCG)
  for (int i = 0; i < 200; ++i) {
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    const double u = static_cast<double>(state >> 11) / 9007199254740992.0;  // [0, 1)
    scores.push_back(static_cast<T>(lo - 0.1 * (hi - lo) + 1.2 * (hi - lo) * u));
  }
  return scores;
}

template <typename T>
void print_grid(const char* type, double lo, double hi, int64_t num_bins) {
  const fastap::BinGrid<T> grid(lo, hi, num_bins);
  std::vector<T> table(2 * grid.last_bin);  // negatives, then positives: distinct slopes
  for (size_t i = 0; i < table.size(); ++i) table[i] = static_cast<T>(1.0 + 0.25 * i);
  for (const T s : scores_for(grid, lo, hi)) {
    const fastap::BinPosition<T> pos = grid.locate(s);
    std::printf("%s %g %g %" PRId64 " %016" PRIx64 ": %d %016" PRIx64 " %d %016" PRIx64
                " %016" PRIx64 "\n",
                type, lo, hi, num_bins, bits(s), pos.bin, bits(pos.frac), int(pos.sloped),
                bits(fastap::score_gradient(s, false, grid, table.data())),
                bits(fastap::score_gradient(s, true, grid, table.data())));
  }
}

}  // namespace

int main() {
#ifdef __CUDA_ARCH__
  std::printf("branches: device\n");
#else
  std::printf("branches: host\n");
#endif
  const struct {
    double lo, hi;
    int64_t num_bins;
  } grids[] = {{-1, 1, 20}, {0, 1, 3}, {-1, 1, 2}, {0.25, 0.75, 7}, {-3, 5, 100}, {-1, 1, 1 << 20}};
  for (const auto& g : grids) {
    print_grid<float>("f32", g.lo, g.hi, g.num_bins);
    print_grid<double>("f64", g.lo, g.hi, g.num_bins);
  }
  return 0;
}
