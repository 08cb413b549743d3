"""fastap's own float log1p (csrc/lane_math.h), which the tie-aware row formula takes as a scalar
(CUDA) and in the 4, 8 and 16 lanes of the CPU op (csrc/cpu/float_lanes.h): within 0.9 ulp of the
exact value, and the same bits in every width and instruction set.

tests/native/lane_math_check.cpp does the work: it compares log1p_float with double-precision
log1p on every 257th float32 bit pattern (16.7 million values, all exponents and signs) and on
edge cases (0, -0, -1, just below -1, the reduction's thresholds, the largest and smallest
floats, infinities, NaN). Run with the argument 1, it checks all 2^32 floats in a few minutes:
0.893 ulp at worst (x = -0x1.2e5c04p-2), on 2026-12-02.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "tests/native/lane_math_check.cpp"
REPORT = re.compile(
    r"worst_ulp=(?P<worst>\S+) worst_x=\S+ checked=(?P<checked>\d+) "
    r"lane_mismatches=(?P<lanes>\d+) special_mismatches=(?P<special>\d+) digest=[0-9a-f]{16}"
)


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    match = re.search(r"^flags\s*:(.*)$", text, re.MULTILINE)
    return set(match.group(1).split()) if match else set()


# (name, g++ flags, the processor flag it needs to run)
BUILDS = [
    ("baseline", [], None),
    ("avx2", ["-mavx2"], "avx2"),
    ("avx512", ["-mavx512f"], "avx512f"),
]


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, str]:
    if shutil.which("g++") is None or not sys.platform.startswith("linux"):
        pytest.skip("needs g++ on Linux")
    out = tmp_path_factory.mktemp("lane_math")
    flags_here = _cpu_flags()
    found = {}
    for name, flags, needs in BUILDS:
        if needs is not None and needs not in flags_here:
            continue
        binary = out / name
        command = [
            "g++", "-std=c++20", "-O2", "-Wall", "-Wextra", "-Werror",
            "-ffp-contract=off", "-Wno-psabi",  # as setup.py builds the extension
            *flags, str(CHECK), "-o", str(binary),
        ]  # fmt: skip
        subprocess.run(command, capture_output=True, text=True, check=True, timeout=300)
        run = subprocess.run([str(binary), "257"], capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr
        found[name] = run.stdout.strip()
    return found


def test_log1p_float_within_a_ulp_and_the_same_in_lanes(reports):
    assert "baseline" in reports
    for name, line in reports.items():
        report = REPORT.fullmatch(line)
        assert report is not None, (name, line)
        assert float(report["worst"]) < 0.9, (name, line)
        assert int(report["checked"]) > 16_000_000, (name, line)
        assert report["lanes"] == "0" and report["special"] == "0", (name, line)


def test_log1p_float_the_same_bits_for_every_instruction_set(reports):
    """Each build prints a digest of all its results' bits (the comparison of its lanes with its
    scalar is inside each build): one line for all builds is one set of results."""
    assert len(set(reports.values())) == 1, reports
