"""The shared binning math of csrc/binning.h, compiled on its own with g++: the promises its
callers (the CPU op and the CUDA kernels, which write bins k and k + 1) rely on."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_locate_keeps_every_score_within_the_bins(tmp_path):
    # binning.h BinGrid::locate promises k in [0, Q - 2] and f in [0, 1] for every score (the
    # kernels write bins k and k + 1, and bin non-finite scores before discarding the row): at
    # and below lo, k = Q - 2 and f = 1; at and above hi, and NaN, k = 0 and f = 0.
    program = tmp_path / "locate.cpp"
    program.write_text(
        r"""
#include <cmath>
#include <cstdio>
#include <initializer_list>
#include <limits>
#include "binning.h"
template <typename T> int check(double lo, double hi, int q) {
  fastap::BinGrid<T> grid(lo, hi, q);
  const T inf = std::numeric_limits<T>::infinity();
  // At and below lo: the last pair of bins, all the weight on the lower one (f = 1).
  const T below[] = {T(lo), std::nextafter(T(lo), T(-1e30)), T(lo) - T(1), -inf};
  // At and above hi, and NaN (placed like hi): the first pair, all the weight on bin 0.
  const T above[] = {T(hi), std::nextafter(T(hi), T(1e30)), T(hi) + T(1), inf,
                     std::numeric_limits<T>::quiet_NaN()};
  int bad = 0;
  for (T s : below) {
    const auto pos = grid.locate(s);
    if (pos.bin != q - 2 || pos.frac != T(1) || pos.sloped) {
      std::printf("q=%d s=%g bin=%d frac=%g\n", q, double(s), pos.bin, double(pos.frac));
      ++bad;
    }
  }
  for (T s : above) {
    const auto pos = grid.locate(s);
    if (pos.bin != 0 || pos.frac != T(0) || pos.sloped) {
      std::printf("q=%d s=%g bin=%d frac=%g\n", q, double(s), pos.bin, double(pos.frac));
      ++bad;
    }
  }
  // Inside: k in [0, Q - 2] and f in [0, 1] on a fine sweep.
  for (int i = 1; i < 1000; ++i) {
    const T s = T(lo + (hi - lo) * i / 1000.0);
    const auto pos = grid.locate(s);
    if (pos.bin < 0 || pos.bin > q - 2 || !(pos.frac >= T(0) && pos.frac <= T(1))) {
      std::printf("q=%d s=%g bin=%d frac=%g\n", q, double(s), pos.bin, double(pos.frac));
      ++bad;
    }
  }
  return bad;
}
int main() {
  int bad = 0;
  for (int q : {2, 5, 20, 25}) {
    bad += check<float>(-1.0, 1.0, q) + check<double>(-1.0, 1.0, q);
    bad += check<float>(0.0, 1.0, q) + check<double>(-0.3, 1.7, q);
  }
  return bad != 0;
}
"""
    )
    binary = tmp_path / "locate"
    subprocess.run(
        ["g++", "-std=c++20", "-O1", f"-I{ROOT / 'csrc'}", str(program), "-o", str(binary)],
        check=True,
    )
    result = subprocess.run([str(binary)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
