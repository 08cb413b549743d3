"""The C++ and CUDA sources include the torch headers they use, never an umbrella header that
declares all of torch: ATen/ATen.h alone was about half of each file's compile time (design.md,
section 6). .ci/compile_cuda.sh also compiles cuda_ops.cpp with torch's macros that make such an
include an error; this covers every source, directly included headers (ours) too."""

import re
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"
UMBRELLAS = ("ATen/ATen.h", "ATen/Functions.h", "torch/extension.h", "torch/torch.h", "torch/all.h")
INCLUDE = re.compile(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', re.MULTILINE)
SOURCES = sorted(p for p in CSRC.rglob("*") if p.suffix in {".h", ".cpp", ".cu", ".cuh"})


def test_the_sources_are_found():
    assert any(p.name == "cuda_ops.cpp" for p in SOURCES), SOURCES


@pytest.mark.parametrize("source", SOURCES, ids=[str(p.relative_to(CSRC)) for p in SOURCES])
def test_no_umbrella_header_of_torch(source):
    included = INCLUDE.findall(source.read_text(encoding="utf-8"))
    assert not set(included) & set(UMBRELLAS), (source, sorted(set(included) & set(UMBRELLAS)))
