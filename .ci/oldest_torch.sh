#!/usr/bin/env bash
# The test suite against the oldest torch and Python fastap supports (torch 2.5.1, Python 3.9),
# CPU kernels only, built with clang (macOS's and FreeBSD's compiler; the other builds of CI use
# g++, and .ci/compile_cuda.sh checks the C++ sources against these headers with g++ too).
#
# torch 2.5.1's Linux wheel on PyPI is a CUDA build (about 5 GB with its nvidia-* wheels); it
# runs on a machine without a GPU, and FASTAP_CUDA=0 keeps the build to the C++ kernels (the CUDA
# sources are compiled against 2.5.1's headers by compile_cuda.sh). The build happens in the
# unpacked sdist (.ci/lib.sh), so the extension built in place for the main torch is left alone.
# The CPU-emulation tests and the native checks of the lanes are left out, as they do not depend
# on the torch version, and so are those of the benchmark scripts and the GPU check (below).
#
# clang reads the row formula's lanes (GCC vector extensions) with rules of its own: its results
# must be the same bits as a g++ build's. The digest of this build's results
# (tests/native/ops_digest.py: every variant, dtype and relevance form, on inputs made from
# integers) is printed, and written to OPS_DIGEST_OUT where set; .ci/run compares it with the
# digest of the README step's g++ build.
#
# Env: TORCH_VERSION (2.5.1), PYTHON (Python 3.9 where found: on PATH or under pyenv; else python3),
#      CXX (clang++), CC (clang), OPS_DIGEST_OUT (none).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=.ci/lib.sh
. .ci/lib.sh
TORCH_VERSION=${TORCH_VERSION:-2.5.1}

python=${PYTHON:-}
if [[ -z $python ]]; then
  for candidate in python3.9 "$(pyenv root 2>/dev/null || echo /nonexistent)"/versions/3.9*/bin/python3.9; do
    if "$candidate" -c '' 2>/dev/null; then python=$candidate; break; fi
  done
  [[ -n $python ]] || { python=python3; echo "note: no Python 3.9 found, using $python"; }
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export CXX=${CXX:-clang++} CC=${CC:-clang}
"$CXX" --version | head -n 1
install_from_sdist "$python" "$work" "$TORCH_VERSION" 0 pytorch-metric-learning
# The compiler's own warnings (-Wall), shown but not fatal.
grep -A 3 "warning:" "$work/build.log" || echo "(no compiler warnings)"
# The extension the tests load must be this one, and built by $CXX.
python - "$CXX" <<'PY'
import os
import subprocess
import sys

import torch

import fastap.ops

print("Python", sys.version.split()[0], "torch", torch.__version__)
assert fastap.ops._LOAD_ERROR is None, fastap.ops._LOAD_ERROR
library = fastap.ops._C.__file__
assert library.startswith(os.getcwd() + os.sep), f"loaded {library}, not the build here"
comment = subprocess.run(["readelf", "-p", ".comment", library], capture_output=True, text=True)
compiler = "clang version" if "clang" in sys.argv[1] else "GCC:"
assert compiler in comment.stdout, f"{library} was not built by {sys.argv[1]}: {comment.stdout}"
print("loaded", library, "built by", sys.argv[1])
PY
digest=$(python tests/native/ops_digest.py | grep '^ops ')
echo "$CXX build: $digest"
if [[ -n ${OPS_DIGEST_OUT:-} ]]; then echo "$digest" >"$OPS_DIGEST_OUT"; fi
# (The tests of the benchmark scripts and of benchmarks/gpu_check.sh run in the main suite: the
# GPU machine they are for has a newer torch and Python, and gpu_check.sh's tests, bash with
# stand-ins, import no torch; they took 38 s, most of it waiting out their timeouts.)
HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci} python -m pytest -q -n 2 -p no:cacheprovider \
  --ignore tests/test_cuda_emulation.py --ignore tests/test_native_lanes.py \
  --ignore tests/test_benchmarks.py --ignore tests/test_gpu_check.py
