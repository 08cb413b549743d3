"""The row formula's float32 lanes (csrc/cpu/float_lanes.h) give the bits of a row alone, whatever
the compiler, instruction set or architecture: two native programs, built several ways.

- tests/native/lane_math_check.cpp: fastap's own float log1p (csrc/lane_math.h), which the
  tie-aware formula takes as a scalar (CUDA) and in 4, 8 and 16 lanes (CPU), against
  double-precision log1p on every 257th float32 bit pattern (16.7 million values, all exponents
  and signs; every 1799th, 2.4 million, in the build run under qemu) and on edge cases (0, -0,
  -1, just below -1, the reduction's thresholds, the largest and smallest floats, infinities,
  NaN): within 0.9 ulp, and the same bits in lanes. Run with the argument 1, it checks all 2^32
  floats in a few minutes: 0.893 ulp at worst (x = -0x1.2e5c04p-2), on 2026-12-02.
- tests/native/ap_formula_check.cpp: the AP row formula (csrc/ap_formula.h), forward and
  backward, all three variants, Q from 2 to 100, on 73728 rows of inputs made exactly from
  integers (ties, empty bins, rows without positives, counts up to 1e6): each row alone and in
  4, 8 and 16 lanes, the same bits; all results finite.

Each program prints a digest of all its results' bits, and every build must print the same one:
g++ for the baseline (SSE2), AVX2 and AVX-512 (where this CPU runs them); clang++ the same way
(where it is installed: Apple's and FreeBSD's compiler); and g++ for aarch64 (NEON, the baseline
of ARM servers and Apple's CPUs) run under qemu-aarch64 (where both are installed). All with
setup.py's -ffp-contract=off: without it, g++ on AVX-512 and on aarch64 and clang wherever the
target has FMA fuse multiplies and additions, and the lanes' bits differ from a row's alone.
A toolchain that is missing is left out with a warning, or is an error where
FASTAP_TEST_TOOLCHAINS=required (CI installs them all: .ci/run).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NATIVE = ROOT / "tests/native"
# as setup.py builds the extension (host_compiler_flags)
FLAGS = ["-std=c++20", "-O2", "-Wall", "-Wextra", "-Werror", "-ffp-contract=off", "-Wno-psabi"]

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="builds native programs with Linux toolchains"
)


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    match = re.search(r"^flags\s*:(.*)$", text, re.MULTILINE)
    return set(match.group(1).split()) if match else set()


def _clang() -> str | None:
    """clang++, or the newest versioned clang++-N on the PATH (Debian installs only those)."""
    if shutil.which("clang++"):
        return "clang++"
    versioned = []
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        for path in Path(folder).glob("clang++-*") if Path(folder).is_dir() else ():
            suffix = path.name.removeprefix("clang++-")
            if suffix.isdigit():
                versioned.append((int(suffix), path.name))
    return max(versioned)[1] if versioned else None


AARCH64 = "aarch64 g++ (qemu)"  # the build run under emulation


@dataclass(frozen=True)
class Build:
    name: str
    compile: list[str]  # the compiler and its flags
    run: list[str]  # what runs the program (before its path)


def builds() -> tuple[list[Build], list[str]]:
    """The builds this machine can make and run, and the toolchains it lacks."""
    found: list[Build] = []
    missing: list[str] = []
    x86 = _cpu_flags()
    clang = _clang()
    for compiler, label in (("g++", "g++"), (clang, "clang++")):
        if compiler is None or shutil.which(compiler) is None:
            missing.append(label)
            continue
        found.append(Build(f"{label} baseline", [compiler, *FLAGS], []))
        for isa, cpu_flag in (("avx2", "avx2"), ("avx512f", "avx512f")):
            if cpu_flag in x86:
                found.append(Build(f"{label} -m{isa}", [compiler, *FLAGS, f"-m{isa}"], []))
    if shutil.which("aarch64-linux-gnu-g++") and shutil.which("qemu-aarch64"):
        found.append(Build(AARCH64, ["aarch64-linux-gnu-g++", *FLAGS, "-static"], ["qemu-aarch64"]))
    else:
        missing.append("aarch64-linux-gnu-g++ with qemu-aarch64")
    return found, missing


def run_everywhere(
    program: str,
    arguments: list[str],
    tmp_path: Path,
    emulated_arguments: list[str] | None = None,
) -> dict[str, str]:
    """{build name: the line the program printed} for every build of tests/native/<program>.cpp.
    `emulated_arguments`: what a build run under emulation (qemu, 20 to 30 times slower) gets
    instead, for a lighter check; the first build runs with them too, as "<its name> (as
    emulated)", for the emulated build's line to be compared with."""
    found, missing = builds()
    if missing:
        message = f"left out, not installed: {', '.join(missing)}"
        if os.environ.get("FASTAP_TEST_TOOLCHAINS") == "required":
            pytest.fail(f"FASTAP_TEST_TOOLCHAINS=required, but {message}")
        warnings.warn(message, stacklevel=2)
    lines = {}
    for i, build in enumerate(found):
        binary = tmp_path / f"{program}_{i}"
        compiled = subprocess.run(
            [*build.compile, str(NATIVE / f"{program}.cpp"), "-o", str(binary)],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert compiled.returncode == 0, (build.name, compiled.stderr)
        runs = {build.name: arguments}
        if emulated_arguments is not None:
            if build.run:
                runs = {build.name: emulated_arguments}
            elif i == 0:
                runs[f"{build.name} (as emulated)"] = emulated_arguments
        for name, args in runs.items():
            ran = subprocess.run(
                [*build.run, str(binary), *args], capture_output=True, text=True, timeout=300
            )
            assert ran.returncode == 0, (name, ran.stderr)
            lines[name] = ran.stdout.strip()
    if not lines:
        pytest.skip("no C++ toolchain found")
    return lines


LOG1P_REPORT = re.compile(
    r"worst_ulp=(?P<worst>\S+) worst_x=\S+ checked=(?P<checked>\d+) "
    r"lane_mismatches=(?P<lanes>\d+) special_mismatches=(?P<special>\d+) "
    r"digest=(?P<digest>[0-9a-f]{16})"
)
FORMULA_REPORT = re.compile(
    r"rows=(?P<rows>\d+) lane_mismatches=(?P<lanes>\d+) not_finite=(?P<not_finite>\d+) "
    r"digest=(?P<digest>[0-9a-f]{16})"
)


def test_log1p_float_within_a_ulp_and_the_same_bits_in_every_build(tmp_path):
    # Every 257th float natively (16.7 million), every 1799th (7 x 257: 2.4 million, all
    # exponents and signs still) under qemu, where the 16.7 million took 28 of the test's 37 s.
    lines = run_everywhere("lane_math_check", ["257"], tmp_path, emulated_arguments=["1799"])
    digests: dict[bool, set[str]] = {False: set(), True: set()}  # by lighter check or not
    for name, line in lines.items():
        report = LOG1P_REPORT.fullmatch(line)
        assert report is not None, (name, line)
        assert float(report["worst"]) < 0.9, (name, line)
        lighter = name == AARCH64 or name.endswith("(as emulated)")
        assert int(report["checked"]) > (2_300_000 if lighter else 16_000_000), (name, line)
        assert report["lanes"] == "0" and report["special"] == "0", (name, line)
        digests[lighter].add(report["digest"])
    assert len(digests[False]) == 1, lines
    # (the emulated build's, against a native build's on the same floats)
    assert len(digests[True]) == (1 if AARCH64 in lines else 0), lines


def test_ap_row_formula_the_same_bits_in_lanes_and_in_every_build(tmp_path):
    lines = run_everywhere("ap_formula_check", [], tmp_path)
    digests = set()
    for name, line in lines.items():
        report = FORMULA_REPORT.fullmatch(line)
        assert report is not None, (name, line)
        assert int(report["rows"]) == 3 * 6 * 4096, (name, line)
        assert report["lanes"] == "0" and report["not_finite"] == "0", (name, line)
        digests.add(report["digest"])
    assert len(digests) == 1, lines
