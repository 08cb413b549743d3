#!/usr/bin/env bash
# Builds the whole extension, CUDA kernels included, against a CUDA build of torch, links it and
# loads it on this GPU-less machine. This catches what compiling alone cannot: an undefined symbol,
# a library missing from the link, an op whose CUDA kernel is not registered. The kernels cannot
# run here: tests/test_cuda_emulation.py runs them on the CPU, benchmarks/gpu_check.sh on a GPU.
#
# torch 2.14.1 (the default) and 2.11.0 (the GPU machine's) are CUDA 13.0 builds on PyPI, like the
# local nvcc. The build happens in the unpacked sdist (.ci/lib.sh), so it also checks that the
# sdist carries every CUDA source and header.
#
# Env: TORCH_VERSION (2.14.1), FASTAP_CUDA_ARCH (9.0a), CUDA_HOME (setup.py's default: the toolkit
#      of the nvcc on PATH), PYTHON (python3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=.ci/lib.sh
. .ci/lib.sh
TORCH_VERSION=${TORCH_VERSION:-2.14.1}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# 9.0a as on the GPU machine (benchmarks/gpu_check.sh): the sm_90a image, with the fused kernels'
# wgmma path (forward and backward), linked and loaded here (.ci/compile_cuda.sh compiles
# embedding_histogram.cu for sm_90a too, the rest for plain sm_90).
export FASTAP_CUDA_ARCH=${FASTAP_CUDA_ARCH:-9.0a} MAX_JOBS=${MAX_JOBS:-2}
install_from_sdist "${PYTHON:-python3}" "$work" "$TORCH_VERSION" 1
python - <<'PY'
import torch

import fastap.ops

print("torch", torch.__version__, "cuda", torch.version.cuda)
if fastap.ops._LOAD_ERROR is not None:
    raise SystemExit(f"fastap._C did not load: {fastap.ops._LOAD_ERROR}")
# Every operator the library defines, each with the kernels it must have: one defined later
# without a line here fails too.
kernels = {
    "soft_histogram": ("CPU", "CUDA"),
    "soft_histogram_backward": ("CPU", "CUDA"),
    "ap_from_histograms": ("CPU", "CUDA"),
    "ap_from_histograms_backward": ("CPU", "CUDA"),
    "embedding_histogram": ("CUDA",),
    "embedding_histogram_backward": ("CUDA",),
    "embedding_histogram_uses_wgmma": ("CUDA",),
}
defined = {
    name.split("::", 1)[1]
    for name in torch._C._dispatch_get_all_op_names()
    if name.startswith("fastap::")
}
if defined != set(kernels):
    raise SystemExit(
        f"operators defined: {sorted(defined)}; the check here knows: {sorted(kernels)}"
    )
missing = [
    f"fastap::{op} ({key})"
    for op, keys in kernels.items()
    for key in keys
    if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fastap::{op}", key)
]
if missing:
    raise SystemExit(f"kernels not registered: {', '.join(missing)}")
assert fastap.ops.HAS_CUDA_KERNELS and fastap.ops.HAS_FUSED_EMBEDDING_KERNELS
print("fastap._C loads with every kernel registered:", ", ".join(kernels))
PY
# The CPU side of the CUDA build: the same C++ kernels, now beside the CUDA ones.
HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci} python -m pytest -q -n 2 -p no:cacheprovider \
  tests/test_forward.py tests/test_compile.py tests/test_errors.py
