"""csrc/cpu/widen.h: the CPU kernels' own float16 -> float32 conversion, compiled on its own with
g++ and checked against c10::Half's on every one of the 65536 float16 values, with and without
denormals-are-zero (torch.set_flush_denormal); and the CPU op on float16 scores that are
subnormal, the largest finite ones, or NaN where ignored."""

import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.cpp_extension import include_paths

import fastap
from fastap import reference

ROOT = Path(__file__).resolve().parents[1]

PROGRAM = r"""
#include <cmath>
#include <cstdio>
#include <cstring>
#if defined(__x86_64__)
#include <xmmintrin.h>
#endif
#include "cpu/widen.h"

static uint32_t bits_of(float x) { uint32_t b; std::memcpy(&b, &x, 4); return b; }

// The conversion as the kernels run it: a loop that the compiler vectorises (the test checks
// that it reports so), not one value at a time.
__attribute__((noinline)) void widen_all(const uint16_t* __restrict in, float* __restrict out,
                                         int n) {
  for (int i = 0; i < n; ++i) out[i] = fastap::float_from_half_bits(in[i]);
}

static int check_all(const char* mode) {
  static uint16_t halves[65536];
  static float ours_all[65536];
  for (uint32_t h = 0; h < 65536; ++h) halves[h] = static_cast<uint16_t>(h);
  widen_all(halves, ours_all, 65536);
  int bad = 0;
  for (uint32_t h = 0; h < 65536; ++h) {
    const uint16_t half = static_cast<uint16_t>(h);
    const float ours = ours_all[h];
    const float c10 = static_cast<float>(c10::Half(half, c10::Half::from_bits()));
    const bool same = std::isnan(c10) ? std::isnan(ours) && std::signbit(ours) == std::signbit(c10)
                                      : bits_of(ours) == bits_of(c10);
    if (!same && bad++ < 10) {
      std::printf("%s: half 0x%04x: ours %a (0x%08x), c10 %a\n", mode, h, ours, bits_of(ours), c10);
    }
  }
  return bad;
}

int main() {
  int bad = check_all("default");
#if defined(__x86_64__)
  _mm_setcsr(_mm_getcsr() | 0x8040);  // flush to zero and denormals are zero
  bad += check_all("ftz+daz");
#endif
  std::printf("%d mismatches\n", bad);
  return bad != 0;
}
"""


@pytest.mark.skipif(
    shutil.which("g++") is None or not sys.platform.startswith("linux"),
    reason="needs GCC (its -fopt-info reports the vectorised loop)",
)
def test_float_from_half_bits_is_c10s_conversion_on_every_value(tmp_path):
    source = tmp_path / "widen.cpp"
    source.write_text(PROGRAM)
    binary = tmp_path / "widen"
    # -O3 as the extension; the vectorised loop is the one checked
    command = ["g++", "-std=c++20", "-O3", "-fopt-info-vec-optimized", f"-I{ROOT / 'csrc'}"]
    command += [f"-I{p}" for p in include_paths()]
    build = subprocess.run(
        [*command, str(source), "-o", str(binary)], check=True, capture_output=True, text=True
    )
    line = 1 + next(i for i, x in enumerate(PROGRAM.splitlines()) if "out[i] =" in x)
    reports = [x for x in build.stderr.splitlines() if f"widen.cpp:{line}:" in x]
    assert any("loop vectorized" in x for x in reports), build.stderr
    result = subprocess.run([str(binary)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
    assert "0 mismatches" in result.stdout


@pytest.mark.parametrize("flush_denormal", [False, True])
def test_float16_scores_at_the_ends_of_their_range(flush_denormal):
    if flush_denormal and platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("torch.set_flush_denormal works on x86 only")
    g = torch.Generator().manual_seed(7)
    scores = (torch.rand(6, 40, generator=g) * 2 - 1).half()
    # subnormal float16 scores (below 6.1e-5, down to 2^-24) and the largest finite ones
    scores[:, :8] = torch.tensor(
        [2.0**-24, -(2.0**-24), 3e-5, -5e-5, 2.0**-23, 0.0, 65504.0, -65504.0]
    )
    labels = torch.randint(0, 3, (6,), generator=g)
    ref_labels = torch.randint(0, 3, (40,), generator=g)
    ignore = torch.zeros(6, 40, dtype=torch.bool)
    ignore[:, 8] = True
    scores[:, 8] = float("nan")  # ignored: counts nowhere
    kwargs = dict(labels=labels, ref_labels=ref_labels, ignore=ignore, score_range=(-1e-4, 1e-4))
    torch.set_flush_denormal(flush_denormal)
    try:
        leaf = scores.clone().requires_grad_()
        ap = fastap.average_precision(leaf, **kwargs)
        (grad,) = torch.autograd.grad(ap.sum(), leaf)
    finally:
        torch.set_flush_denormal(False)
    exact = scores.double().nan_to_num(0.0).requires_grad_()  # (the reference takes no NaN)
    expected = reference.average_precision(exact, **kwargs)
    (expected_grad,) = torch.autograd.grad(expected.sum(), exact)
    torch.testing.assert_close(ap.double(), expected, rtol=0, atol=1e-6)
    scale = expected_grad.abs().max()
    torch.testing.assert_close(
        grad.double() / scale, expected_grad / scale, rtol=0, atol=2 * torch.finfo(torch.half).eps
    )
    # (five distinct subnormal scores, which a conversion that flushed them to 0 would tie)
    assert len(set(scores[0, :5].tolist())) == 5
