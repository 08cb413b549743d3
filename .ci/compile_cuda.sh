#!/usr/bin/env bash
# Compile-only check: every csrc/cuda/*.cu must compile with the local nvcc, and the torch side of
# the CUDA ops (csrc/cuda/*.cpp) with the host compiler and the toolkit's headers, as nvcc passes
# them, on a CPU-only machine (no GPU, CPU build of torch).
#
# Why this exists: the CPU torch wheel ships no CUDA headers that are generated
# at build time (c10/cuda/impl/cuda_cmake_macros.h, ...), so the .cu sources
# cannot be compiled against it. Rather than installing the multi-GB CUDA torch
# and its nvidia-* dependencies, we `pip download` the CUDA torch wheel alone
# (no deps) and unpack only torch/include/** into a cache (~60 MB, one-time).
# The headers our sources use (c10/cuda/*, ATen/core/Tensor.h, ATen/ops/*, ATen/Dispatch.h,
# torch/library.h) need only the toolkit's own headers, not cuBLAS/cuSPARSE.
# Objects are thrown away; nothing is linked or run.
#
# Then the machine code of the kernels' inner loops, score-matrix and fused (.ci/sass_report.py):
# their instructions per candidate, held to SASS_BUDGETS. That needs cuobjdump and nvdisasm, which
# the local toolkit lacks: they come from PyPI's nvidia-cuda-cuobjdump / -nvdisasm wheels (5 MB,
# cached like the headers).
#
# Env: TORCH_VERSION (2.14.1: whose headers), CXX_STD (c++20), CHECK_CPP (0: 1 also checks the
#      C++ sources), PYTHON (python3), NVCC (nvcc), CUDA_ARCH (sm_90), JOBS (nproc),
#      FASTAP_CI_CACHE (~/.cache/fastap-ci), NVCC_EXTRA_FLAGS (none), NO_SPILLS (^soft_histogram:
#      the kernels, as a regex on the names ptxas_report.py prints, that must not spill),
#      SASS_REPORT (auto: skipped with a warning when the tools cannot be had; required; 0),
#      SASS_BUDGETS (REGEX=N items for sass_report.py --budget, separated by ';'; the default
#      holds the fast kernels of the 2- and 4-byte dtypes and the fused forward and backward).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=${PYTHON:-python3}
NVCC=${NVCC:-nvcc}
TORCH_VERSION=${TORCH_VERSION:-2.14.1}
CXX_STD=${CXX_STD:-c++20}
CACHE=${FASTAP_CI_CACHE:-$HOME/.cache/fastap-ci}
INC=$CACHE/torch-$TORCH_VERSION-include
STAMP=$INC/.complete

shopt -s nullglob
files=(csrc/cuda/*.cu)
(( ${#files[@]} )) || { echo "error: no csrc/cuda/*.cu to compile" >&2; exit 1; }
command -v "$NVCC" >/dev/null || { echo "error: nvcc not found ($NVCC)" >&2; exit 1; }

# --- 1. CUDA torch headers (cached; the stamp marks a complete extraction) ---
if [[ ! -f $STAMP ]]; then
  echo "fetching torch $TORCH_VERSION (CUDA build) headers into $INC ..."
  mkdir -p "$CACHE"
  stage=$(mktemp -d "$CACHE/stage.XXXXXX")
  trap 'rm -rf "$stage"' EXIT
  "$PY" -m pip download -q --no-deps --no-cache-dir --only-binary=:all: \
    "torch==$TORCH_VERSION" -d "$stage/dl"
  whl=("$stage"/dl/torch-*.whl)
  "$PY" - "${whl[0]}" "$stage/x" <<'EOF'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith("torch/include/")])
EOF
  [[ -f $stage/x/torch/include/c10/cuda/impl/cuda_cmake_macros.h ]] || {
    echo "error: ${whl[0]##*/} is not a CUDA build of torch" >&2; exit 1; }
  rm -rf "$INC"
  mv "$stage/x/torch/include" "$INC"
  touch "$STAMP"
  rm -rf "$stage"
fi

# --- 1b. cuobjdump and nvdisasm for the SASS report (cached) ---
SASS_REPORT=${SASS_REPORT:-auto}
sass_tools=""
if [[ $SASS_REPORT != 0 ]]; then
  if command -v cuobjdump >/dev/null && command -v nvdisasm >/dev/null; then
    sass_tools=$(dirname "$(command -v cuobjdump)")
  else
    tools=$CACHE/sass-tools
    if [[ ! -f $tools/.complete ]]; then
      rm -rf "$tools"
      mkdir -p "$tools"
      if "$PY" -m pip download -q --no-deps --no-cache-dir --only-binary=:all: \
          nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm -d "$tools/dl" 2>"$tools/log"; then
        "$PY" - "$tools" <<'EOF'
import glob, os, sys, zipfile
for wheel in glob.glob(os.path.join(sys.argv[1], "dl", "*.whl")):
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if "/bin/" in name and not name.endswith("/"):
                target = os.path.join(sys.argv[1], "bin", os.path.basename(name))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with open(target, "wb") as out:
                    out.write(z.read(name))
                os.chmod(target, 0o755)
EOF
        if [[ -x $tools/bin/cuobjdump && -x $tools/bin/nvdisasm ]]; then touch "$tools/.complete"; fi
      fi
    fi
    if [[ -f $tools/.complete ]]; then sass_tools=$tools/bin; fi
  fi
  if [[ -z $sass_tools ]]; then
    if [[ $SASS_REPORT == required ]]; then
      echo "error: no cuobjdump/nvdisasm for the SASS report" >&2
      exit 1
    fi
    echo "warning: no cuobjdump/nvdisasm: the SASS report is skipped" >&2
  fi
fi

# --- 2. compile, flags as torch.utils.cpp_extension passes them for nvcc ---
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
read -ra extra <<<"${NVCC_EXTRA_FLAGS:-}"
python_include=$("$PY" -c 'import sysconfig; print(sysconfig.get_path("include"))')
# (host_flags: what the host compiler gets too; flags: nvcc's for the .cu files)
host_flags=(
  -std="$CXX_STD" -Xcompiler -fPIC
  -I csrc -I "$INC" -I "$INC/torch/csrc/api/include"
  -I "$python_include"
  -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C -D_GLIBCXX_USE_CXX11_ABI=1
  # (with both, an include of ATen/ATen.h or ATen/Functions.h is an error, as in torch's own
  # build: the sources include ATen/core/Tensor.h and ATen/ops/*.h, design.md section 6)
  -DTORCH_ASSERT_ONLY_METHOD_OPERATORS -DAT_PER_OPERATOR_HEADERS
)
flags=(
  "${host_flags[@]}" -arch="${CUDA_ARCH:-sm_90}" -O2
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
  --expt-relaxed-constexpr -Xptxas -v "${extra[@]}"
)

now_ms() { local t=${EPOCHREALTIME//[.,]/}; echo $(( t / 1000 )); }
secs() { printf '%d.%01d' $(( $1 / 1000 )) $(( $1 % 1000 / 100 )); }

compile() {  # $1 = index, $2 = file
  local t0; t0=$(now_ms)
  if "$NVCC" "${flags[@]}" -c "$2" -o "$tmp/$1.o" >"$tmp/$1.log" 2>&1; then
    echo "OK    $2  $(secs $(( $(now_ms) - t0 )))s"
  else
    touch "$tmp/$1.failed"
    echo "FAIL  $2  $(secs $(( $(now_ms) - t0 )))s"
  fi
}

echo "nvcc $("$NVCC" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), torch $TORCH_VERSION headers, ${#files[@]} file(s), ${JOBS:-$(nproc)} job(s)"
start=$(now_ms)
# The fused kernels for sm_90a too (checked below), compiled beside the others.
hopper=()
for flag in "${flags[@]}"; do [[ $flag == -arch=* ]] || hopper+=("$flag"); done
hopper+=(-gencode "arch=compute_90a,code=sm_90a" -DFASTAP_BUILD_WGMMA)
( "$NVCC" "${hopper[@]}" -c csrc/cuda/embedding_histogram.cu -o "$tmp/hopper.obj" \
    >"$tmp/hopper.ptxas" 2>&1 || touch "$tmp/hopper.failed" ) &
for i in "${!files[@]}"; do
  while (( $(jobs -rp | wc -l) >= ${JOBS:-$(nproc)} )); do wait -n || true; done
  compile "$i" "${files[$i]}" &
done
# The torch side (host code: syntax only, through nvcc for the toolkit's include path).
host_files=(csrc/cuda/*.cpp)
for f in "${host_files[@]}"; do
  while (( $(jobs -rp | wc -l) >= ${JOBS:-$(nproc)} )); do wait -n || true; done
  ( t0=$(now_ms)
    if "$NVCC" "${host_flags[@]}" -Xcompiler -fopenmp -Xcompiler -fsyntax-only -c "$f" \
        -o "$tmp/host.o" >"$tmp/host_${f//\//_}.log" 2>&1; then
      echo "OK    $f (host compiler, syntax)  $(secs $(( $(now_ms) - t0 )))s"
    else
      touch "$tmp/host.failed"
      echo "FAIL  $f (host compiler, syntax)"; cat "$tmp/host_${f//\//_}.log"
    fi ) &
done
wait

failed=0  # show nvcc's output (errors, warnings; not ptxas's report) for every file that had any
ptxas_report='^ptxas info|^ +[0-9]+ bytes stack frame'
for i in "${!files[@]}"; do
  [[ -f $tmp/$i.failed ]] && failed=$(( failed + 1 ))
  grep -Evq "$ptxas_report" "$tmp/$i.log" || continue
  echo; echo "===== nvcc output for ${files[$i]} ====="; grep -Ev "$ptxas_report" "$tmp/$i.log"
done
[[ -f $tmp/host.failed ]] && failed=$(( failed + 1 ))
if [[ -f $tmp/hopper.failed ]]; then
  echo "FAIL  csrc/cuda/embedding_histogram.cu (sm_90a)"; cat "$tmp/hopper.ptxas"
  failed=$(( failed + 1 ))
else
  echo "OK    csrc/cuda/embedding_histogram.cu (sm_90a)"
fi
echo "total: ${#files[@]} file(s), the sm_90a fused kernels and ${#host_files[@]} host file(s)," \
  "$failed failed, $(secs $(( $(now_ms) - start )))s"

# The standalone GPU programs of benchmarks/ (no torch), built as gpu_check.sh builds them, then
# run with --host: the part of their checks that needs no GPU (mma_probe.cu: its wgmma layouts).
for f in benchmarks/*.cu; do
  if "$NVCC" -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a "$f" -o "$tmp/standalone" \
      >"$tmp/standalone.log" 2>&1 && "$tmp/standalone" --host >>"$tmp/standalone.log" 2>&1; then
    echo "OK    $f (standalone, sm_90a): $(tail -1 "$tmp/standalone.log")"
  else
    echo "FAIL  $f (standalone, sm_90a)"; cat "$tmp/standalone.log"
    failed=$(( failed + 1 ))
  fi
done

# Registers and spills of every kernel; the score-matrix kernels must not spill (NO_SPILLS).
if (( failed == 0 )); then
  echo
  "$PY" .ci/ptxas_report.py "$tmp"/*.log --no-spills "${NO_SPILLS:-^soft_histogram}" ||
    failed=$(( failed + 1 ))
fi

# The score-matrix kernels' hot paths in SASS: instructions per candidate, 16-byte loads.
if (( failed == 0 )) && [[ -n $sass_tools ]]; then
  echo
  # The fast kernels (template arguments <scalar, acc, fast = true, dense = false>) of the 2- and
  # 4-byte dtypes: a budget each, and 16-byte loads (a pair's labels); and the fused kernels'
  # binning and gradient.
  fast='(float|c10::BFloat16|c10::Half), float, true, false>'
  default_budgets="soft_histogram_kernel<$fast=22;soft_histogram_backward_kernel<$fast=27"
  default_budgets+=";embedding_histogram_kernel<=25;embedding_histogram_backward_kernel<=33"
  IFS=';' read -ra budgets <<<"${SASS_BUDGETS:-$default_budgets}"
  budget_args=(--wide 'soft_histogram(_backward)?_kernel<.*, true, false>')
  budget_args+=(--no-generic-access 'embedding_histogram')
  for b in "${budgets[@]}"; do budget_args+=(--budget "$b"); done
  for o in "$tmp"/*.o; do PATH=$sass_tools:$PATH cuobjdump -sass "$o"; done >"$tmp/sass.txt"
  "$PY" .ci/sass_report.py "$tmp/sass.txt" "${budget_args[@]}" || failed=$(( failed + 1 ))
fi

# The fused kernels for sm_90a (compiled above), where their products may run on wgmma
# (csrc/cuda/wgmma.cuh; benchmarks/gpu_check.sh builds for 9.0a): the wgmma kernels must compile
# without spills and without serialised wgmmas, hold HGMMA, reach shared memory without generic
# accesses, and bin within the budget of their WMMA twins.
if (( failed == 0 )) && [[ -n $sass_tools ]]; then
  echo
  wgmma_kernels='embedding_histogram(_backward)?_kernel<.*, true>'
  "$PY" .ci/ptxas_report.py "$tmp/hopper.ptxas" --no-spills "$wgmma_kernels" |
    grep -E '^kernel|embedding::' || failed=$(( failed + 1 ))
  PATH=$sass_tools:$PATH cuobjdump -sass "$tmp/hopper.obj" >"$tmp/hopper.sass"
  "$PY" .ci/sass_report.py "$tmp/hopper.sass" --budget 'embedding_histogram_kernel<=25' \
    --no-generic-access embedding_histogram \
    --require "$wgmma_kernels=HGMMA" | grep -E '^kernel|, true>' || failed=$(( failed + 1 ))
  # C7519: ptxas made each wgmma wait for the last (a branch or a loop between them)
  if grep -q C7519 "$tmp/hopper.ptxas"; then
    echo "FAIL  ptxas serialised wgmma (C7519):"; grep C7519 "$tmp/hopper.ptxas" | head -3
    failed=$(( failed + 1 ))
  fi
fi

# CHECK_CPP=1: also check that the C++ sources compile against these headers (syntax only; the
# real build against the installed torch compiles them anyway).
if [[ ${CHECK_CPP:-0} == 1 ]]; then
  for f in csrc/*.cpp csrc/cpu/*.cpp; do
    if g++ -std="$CXX_STD" -fsyntax-only -fopenmp -I csrc -I "$INC" \
        -I "$INC/torch/csrc/api/include" \
        -I "$python_include" \
        -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C \
        -DTORCH_ASSERT_ONLY_METHOD_OPERATORS -DAT_PER_OPERATOR_HEADERS "$f"; then
      echo "OK    $f (g++ -std=$CXX_STD, syntax)"
    else
      echo "FAIL  $f (g++ -std=$CXX_STD, syntax)"
      failed=$(( failed + 1 ))
    fi
  done
fi
(( failed == 0 ))
