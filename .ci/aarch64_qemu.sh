#!/usr/bin/env bash
# The CPU extension on aarch64 (ARM servers, NVIDIA Grace), under emulation: fastap's C++ sources
# cross-compiled with g++ for aarch64 against torch's aarch64 wheel, and tests of the CPU kernels
# run by Debian's aarch64 CPython under qemu-aarch64. Not part of .ci/run: emulation makes the
# tests about 20 times slower (tests/test_native_lanes.py, in every CI run, checks the lanes'
# arithmetic for aarch64 the same way in seconds). Needs root (apt-get), Debian's package lists
# and PyPI, and fastap built in this checkout for this machine (README): the results of both
# must be the same bits. About 10 minutes on 2 cores (2026-12-02).
#
#   bash .ci/aarch64_qemu.sh [TEST ...]   # default: the tests of the CPU kernels below
#
# Env: TORCH_VERSION (2.9.1: the newest torch whose aarch64 wheel on PyPI is a CPU build; newer
#      ones need CUDA's aarch64 libraries), WORK (a fresh temporary folder), PYTHON (python3: the
#      environment of this machine's fastap build, whose pip fetches the aarch64 wheels).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
TORCH_VERSION=${TORCH_VERSION:-2.9.1}
PY=${PYTHON:-python3}
tests=("$@")
if (( ${#tests[@]} == 0 )); then
  tests=(tests/test_ap_formula.py tests/test_forward.py tests/test_backward.py
         tests/test_determinism.py tests/test_widen.py tests/test_variants.py)
fi
work=${WORK:-$(mktemp -d)}
mkdir -p "$work"
root=$work/root site=$work/site tree=$work/tree

# The cross compiler and qemu; Debian's aarch64 CPython and the libraries it loads, unpacked
# into $root (qemu-aarch64 -L $root), not installed.
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q --no-install-recommends g++-aarch64-linux-gnu qemu-user >/dev/null
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  dpkg --add-architecture arm64
fi
apt-get update -q >/dev/null
libraries=(libc6 libgcc-s1 libstdc++6 libgomp1 python3.11-minimal libpython3.11-minimal
           libpython3.11-stdlib libpython3.11 libpython3.11-dev libexpat1 zlib1g libffi8 libssl3
           libbz2-1.0 liblzma5 libsqlite3-0 libncursesw6 libtinfo6 libreadline8 libuuid1 libcrypt1)
mkdir -p "$work/debs" "$root"
(cd "$work/debs" && apt-get download -q "${libraries[@]/%/:arm64}" >/dev/null 2>&1)
for deb in "$work"/debs/*.deb; do dpkg -x "$deb" "$root"; done
python=("qemu-aarch64" -L "$root" "$root/usr/bin/python3.11")

# torch's aarch64 wheel and the tests' packages, for CPython 3.11 on aarch64. (pip judges the
# wheels' environment markers by this machine, so torch's own dependencies are named here.)
"$PY" -m pip install -q --no-deps --only-binary=:all: --target "$site" --python-version 3.11 \
  --implementation cp --abi cp311 --platform manylinux_2_28_aarch64 \
  --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 \
  "torch==$TORCH_VERSION" numpy filelock typing-extensions sympy mpmath networkx jinja2 \
  markupsafe fsspec setuptools pytest iniconfig packaging pluggy pygments hypothesis attrs \
  sortedcontainers

# The tree (what git tracks) with fastap._C built for aarch64: setup.py's host flags, OpenMP as
# torch's backend, one object per source.
mkdir -p "$tree/obj"
git archive HEAD | tar -x -C "$tree"
checkout=$PWD
cd "$tree"
include=$site/torch/include
flags=(-std=c++20 -O3 -fPIC -Wall -fwrapv -ffp-contract=off -Wno-psabi -fopenmp -DNDEBUG
       -Icsrc "-I$include" "-I$include/torch/csrc/api/include" "-I$root/usr/include"
       "-I$root/usr/include/python3.11" -DTORCH_API_INCLUDE_EXTENSION_H
       -DTORCH_EXTENSION_NAME=_C -D_GLIBCXX_USE_CXX11_ABI=1)
pids=()
for source in csrc/*.cpp csrc/cpu/*.cpp; do
  aarch64-linux-gnu-g++ "${flags[@]}" -c "$source" -o "obj/$(basename "$source" .cpp).o" &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
aarch64-linux-gnu-g++ -shared -fopenmp -o fastap/_C.cpython-311-aarch64-linux-gnu.so obj/*.o \
  "-L$site/torch/lib" -lc10 -ltorch -ltorch_cpu -ltorch_python "-Wl,-rpath,$site/torch/lib"
export PYTHONPATH=$site:$tree HYPOTHESIS_PROFILE=ci

"${python[@]}" -c 'import platform, torch, fastap.ops
assert fastap.ops._LOAD_ERROR is None, fastap.ops._LOAD_ERROR
print(platform.machine(), "torch", torch.__version__, fastap.ops._C.__file__)'
# fastap's results on aarch64 and on this machine, bit for bit (tests/native/ops_digest.py; the
# line of torch's own arithmetic, `loss`, may differ).
here=$(cd "$checkout" && PYTHONPATH=$checkout "$PY" tests/native/ops_digest.py | grep '^ops ')
there=$("${python[@]}" tests/native/ops_digest.py | grep '^ops ')
echo "x86-64: $here, aarch64: $there"
[[ $here == "$there" ]] || { echo "error: fastap's results differ on aarch64" >&2; exit 1; }
"${python[@]}" -m pytest -q -p no:cacheprovider "${tests[@]}"
