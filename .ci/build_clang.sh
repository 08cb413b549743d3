#!/usr/bin/env bash
# The CPU extension built with clang++ (the compiler of macOS and FreeBSD users; the other CI steps
# build with g++) from the sdist, against the active environment's torch, and the tests of its CPU
# kernels run against that build: the row formula's lanes (GCC vector extensions, which clang
# reads with rules of its own), the binning, the forward and backward ops, their determinism and
# float16 widening; and its results must be the same bits as the g++ build's of the README step
# (tests/native/ops_digest.py). tests/test_native_lanes.py, in the README's suite, builds the
# lanes' native checks with clang++ too.
#
# Env: CXX (clang++), CC (clang).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=.ci/lib.sh
. .ci/lib.sh
export CXX=${CXX:-clang++} CC=${CC:-clang}
"$CXX" --version | head -n 1

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
sdist_tree "$work/src"
checkout=$PWD
cd "$work/src"
if ! FASTAP_CUDA=0 python setup.py -q build_ext --inplace >"$work/build.log" 2>&1; then
  cat "$work/build.log"
  exit 1
fi
# clang's own warnings (-Wall), shown but not fatal, as g++'s are.
grep -A 3 "warning:" "$work/build.log" || echo "(no compiler warnings)"
# The extension these tests load must be this one, and clang's.
python - <<'PY'
import os
import subprocess

import fastap.ops

assert fastap.ops._LOAD_ERROR is None, fastap.ops._LOAD_ERROR
library = fastap.ops._C.__file__
assert library.startswith(os.getcwd() + os.sep), f"loaded {library}, not the clang build"
comment = subprocess.run(["readelf", "-p", ".comment", library], capture_output=True, text=True)
assert "clang version" in comment.stdout, comment.stdout
print("loaded", library)
PY
# The clang build's results and the g++ build's of the README step (in the checkout), bit for bit.
gxx=$(cd "$checkout" && PYTHONPATH=$checkout python tests/native/ops_digest.py | grep '^ops ')
clang=$(PYTHONPATH=$PWD python tests/native/ops_digest.py | grep '^ops ')
echo "g++: $gxx, clang: $clang"
[[ $gxx == "$clang" ]] || { echo "error: the clang build's results differ from g++'s" >&2; exit 1; }
PYTHONPATH=$PWD HYPOTHESIS_PROFILE=ci python -m pytest -q -n 2 -p no:cacheprovider \
  tests/test_ap_formula.py tests/test_forward.py tests/test_backward.py tests/test_determinism.py \
  tests/test_widen.py
