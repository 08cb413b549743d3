#!/usr/bin/env bash
# One call on the GPU machine: build fastap against that machine's torch with the CUDA kernels,
# run the whole test suite (CUDA tests included), compute-sanitizer memcheck and racecheck on a
# small case, and the CUDA benchmarks; logs go to $OUT, a short table is printed last.
#
#   bash benchmarks/gpu_check.sh                 # everything, about 7 minutes on an H200
#   STEPS="tests memcheck" bash benchmarks/gpu_check.sh   # a rerun of some steps (after build)
#
# Every step has its own time limit, so that one hang cannot eat the whole device budget; the
# summary says which steps passed, failed or timed out (exit 124).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=ci PYTHONPATH=$PWD
PY=${PYTHON:-python3}
STEPS=${STEPS:-"build tests memcheck racecheck kernels loss variants embeddings"}
status=()

step() {  # step NAME SECONDS LOG COMMAND...: run if selected, keep the log, note the outcome
  local name=$1 limit=$2 log=$3; shift 3
  [[ " $STEPS " == *" $name "* ]] || return 0
  local start=$SECONDS rc=0
  timeout "$limit" "$@" >"$OUT/$log" 2>&1 || rc=$?
  local result=ok
  (( rc == 124 )) && result="TIMEOUT(${limit}s)"
  (( rc != 0 && rc != 124 )) && result="FAILED($rc)"
  status+=("$name|$result|$((SECONDS - start)) s|$log")
  echo "== $name: $result in $((SECONDS - start)) s"; tail -3 "$OUT/$log"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' |
  tee -a "$OUT/gpu.txt"
step build 300 build.log env FASTAP_CUDA=1 FASTAP_CUDA_ARCH=9.0 MAX_JOBS=16 \
  $PY setup.py build_ext --inplace
# The whole suite but the CPU emulation of the kernels (CI runs that; here the real GPU does).
step tests 300 tests.log $PY -m pytest -q -rf --maxfail=25 -p no:cacheprovider tests \
  --ignore tests/test_cuda_emulation.py
step memcheck 150 memcheck.log compute-sanitizer --tool memcheck --error-exitcode 1 \
  $PY benchmarks/sanitizer_case.py
step racecheck 150 racecheck.log compute-sanitizer --tool racecheck --error-exitcode 1 \
  $PY benchmarks/sanitizer_case.py
step kernels 180 kernels.md $PY benchmarks/bench_kernels.py --device cuda --repeats 20 \
  --shapes 1024x1024 8192x8192 32768x32768 256x1000000 --num-bins 10 20 50 \
  --dtypes float32 bfloat16 --reference-max 67108864
step loss 180 loss.md $PY benchmarks/bench_ap_loss.py --device cuda \
  --sizes 1024 8192 32768 --reference-max 8192 --repeats 20 --reference-repeats 5 \
  --json "$OUT/loss.json"
step variants 60 variants.md $PY benchmarks/bench_variants.py --device cuda --n 8192 --repeats 20
step embeddings 240 embeddings.md bash -c "$PY benchmarks/bench_embeddings.py --device cuda \
  --dtype bfloat16 --dim 256 --sizes 16384 65536 --repeats 5 --json $OUT/embeddings_d256.json && \
  $PY benchmarks/bench_embeddings.py --device cuda --dtype bfloat16 --dim 128 --sizes 262144 \
  --cases blockwise fused --repeats 3 --json $OUT/embeddings_d128.json"

for table in kernels loss variants embeddings; do
  [[ -s $OUT/$table.md ]] && { echo; echo "== $table =="; grep '^[|#]' "$OUT/$table.md"; }
done
echo
echo "== summary =="
printf '%-11s %-14s %-7s %s\n' step result time log
for s in "${status[@]}"; do
  IFS='|' read -r a b c d <<<"$s"; printf '%-11s %-14s %-7s %s\n' "$a" "$b" "$c" "$d"
done
