#!/usr/bin/env bash
# One call on the GPU machine: build fastap against that machine's torch with the CUDA kernels,
# run the whole test suite (CUDA tests included), compute-sanitizer memcheck and racecheck on a
# small case, and the CUDA benchmark; logs go to $OUT, a short table is printed last.
#   run: bash benchmarks/gpu_check.sh          (about 6 minutes on an H200)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=ci PYTHONPATH=$PWD
PY=${PYTHON:-python3}
status=()
step() {  # step NAME LOG COMMAND...: run, keep the log, remember pass/fail and the time taken
  local name=$1 log=$2; shift 2
  local start=$SECONDS
  if "$@" >"$OUT/$log" 2>&1; then status+=("$name|ok|$((SECONDS - start)) s|$log")
  else status+=("$name|FAILED|$((SECONDS - start)) s|$log"); fi
  tail -3 "$OUT/$log"
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' | tee -a "$OUT/gpu.txt"
step build build.log env FASTAP_CUDA=1 FASTAP_CUDA_ARCH=9.0 MAX_JOBS=16 \
  $PY setup.py build_ext --inplace
step tests tests.log $PY -m pytest -q -x tests -p no:cacheprovider
step memcheck memcheck.log compute-sanitizer --tool memcheck --error-exitcode 1 \
  $PY benchmarks/sanitizer_case.py
step racecheck racecheck.log compute-sanitizer --tool racecheck --error-exitcode 1 \
  $PY benchmarks/sanitizer_case.py
step bench_fp32 bench_fp32.md $PY benchmarks/bench_ap_loss.py --device cuda \
  --sizes 1024 4096 8192 16384 32768 --reference-max 8192 --repeats 20 --reference-repeats 5 \
  --json "$OUT/bench_fp32.json"
step bench_bf16 bench_bf16.md $PY benchmarks/bench_ap_loss.py --device cuda --dtype bfloat16 \
  --sizes 8192 32768 --reference-max 0 --repeats 20 --json "$OUT/bench_bf16.json"
step kernels kernels.md $PY benchmarks/bench_kernels.py --device cuda --repeats 20 \
  --shapes 1024x1024 8192x8192 32768x32768 256x1000000 --num-bins 10 20 50 \
  --dtypes float32 bfloat16 --reference-max 67108864
step variants variants.md $PY benchmarks/bench_variants.py --device cuda --n 8192 --repeats 20
step embeddings embeddings.md $PY benchmarks/bench_embeddings.py --device cuda --sizes 8192 32768 \
  --repeats 10

echo
echo "== kernels =="; cat "$OUT/kernels.md"
echo "== variants (fp32, N = 8192) =="; cat "$OUT/variants.md"
echo "== from embeddings (fp32, D = 128) =="; cat "$OUT/embeddings.md"
echo "== benchmark (fp32, Q = 20) =="; cat "$OUT/bench_fp32.md"
echo "== benchmark (bf16, Q = 20) =="; cat "$OUT/bench_bf16.md"
echo "== summary =="
printf '%-10s %-7s %-7s %s\n' step result time log
for s in "${status[@]}"; do IFS='|' read -r a b c d <<<"$s"; printf '%-10s %-7s %-7s %s\n' "$a" "$b" "$c" "$d"; done
