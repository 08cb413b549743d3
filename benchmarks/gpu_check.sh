#!/usr/bin/env bash
# The GPU check: build fastap against the GPU machine's torch with the CUDA kernels, run the CUDA
# tests, compute-sanitizer memcheck and racecheck on a small case, and the CUDA benchmarks; logs
# and JSON go to $OUT (the logs as one archive), a short table is printed last.
#
# A session has 15 minutes of GPU time in all (900 s: the machine's start and every idle second
# while it is held included), at most 10 minutes a call, and a machine stays warm only 30 s after
# a call. The first GPU run (2026-12-04) measured the steps: build 20 s, smoke 4, smoke_wgmma 4,
# tests 45, tests_wgmma 17, kernels 48, variants 15, embeddings 102, memcheck 9, racecheck 48,
# sass 3, probe 5, profile 30, loss 90, example 12 (452 s in all; api_access, when it runs, 34
# more), and the machine's start and the transfers about 30 s. The second (c40c8c4, one call of
# every step): 493 s of steps (build 29, racecheck 50, tests 45, kernels 47, embeddings 101,
# loss 103), 503 s for the command, 533 s of device time with the start. So every step fits one
# call (BUDGET 570 s, timeout_s=600), which leaves about 360 s of the session for a second call
# on what failed: a call on the warm machine right away, or a fresh machine, which starts only
# with 240 s left. The two-call form stays for a session with less time. This script's own logic
# (steps, order, budget, the hand-overs below) runs in CI with stand-ins for the GPU machine's
# programs: tests/test_gpu_check.py.
#
#   FASTAP_COMMIT=<sha> bash benchmarks/gpu_check.sh       # every step: device run, timeout_s=600
#   FASTAP_COMMIT=<sha> bash benchmarks/gpu_check.sh 1   # device run, timeout_s=540: BUDGET 510 s
#   FASTAP_COMMIT=<sha> WGMMA=<call 1's smoke_wgmma> bash benchmarks/gpu_check.sh 2 \
#     <budget_left_s - 60>                          # device run, timeout_s=<budget_left_s - 40>
#
# FASTAP_COMMIT (git rev-parse --short HEAD, here): the commit the JSON results name; the GPU
# machine gets a copy of the working tree without .git. Call 2 must be sent within the 30 s a
# machine stays warm (have its command ready before call 1 returns). The machine keeps build/
# between calls, and the extension built into fastap/.
#
# Before the first call, here: bash benchmarks/gpu_wheels.sh (the peer pytorch-metric-learning, as
# a wheel in .whl/, which every call carries: carry [".whl"]).
#
# Call 1: build, smoke, smoke_wgmma, tests, tests_wgmma, kernels, variants, embeddings; call 2:
# build (nothing to do on the warm machine), memcheck, racecheck, sass, probe, profile, loss,
# example. STEPS (names, in any order) picks steps by hand; they always run in this file's order.
# A step gets at most what is left of BUDGET, so the steps that do not fit are skipped, last
# first, and those of call 1 go on to call 2 (CARRIED below), where they run after the
# sanitizers; summary.md and logs.tar.gz are rewritten after every step.
#
# The tests step runs the tests that touch CUDA (test_cuda*.py and every [cuda] parameter; the
# wgmma path's in tests_wgmma); CI runs the rest on the CPU; when a fused test fails (not by a
# crash of its process), the api_access step rebuilds with WMMA's own operand loads and reruns the
# fused tests (see below). A test or smoke process that crashes writes its native frames to its
# log (benchmarks/crash_backtrace.c).
# Every step has its own time limit, so that one hang cannot eat the budget; the summary says
# which steps passed, failed, timed out or were skipped for want of time. A step of several
# benchmark commands runs them all even when one fails. The fused kernels' wgmma path (first run
# on a GPU on 2026-12-04) is tried first in a step of its own (smoke_wgmma); if it faults or hangs
# there, the steps after it leave it out (see below). WGMMA=ok|failed|off hands that step's
# outcome from call 1 to call 2, which then does not try it again.
# ($PY, and $NCU_SECTIONS below, are split into words on purpose: PYTHON may carry options.)
# shellcheck disable=SC2086
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
# The device tool brings back at most 8 files from $OUT: the logs go to $LOGS and come back as one
# archive, $OUT/logs.tar.gz, beside the JSON results and summary.md (the tables and the summary).
# $LOGS, the carried wheels' site and the example's output lie in one directory of this run's,
# removed when the script exits (TMPDIR: where it is made).
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 2
trap 'rm -rf "$SCRATCH"' EXIT
LOGS=$SCRATCH/logs
mkdir "$LOGS"
export PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=ci PYTHONPATH=$PWD
PY=${PYTHON:-python3}
CALL=${1:-all}
case $CALL in
  1) STEPS=${STEPS:-"build smoke tests kernels variants embeddings"}
     BUDGET=${BUDGET:-510} ;;
  2) STEPS=${STEPS:-"build memcheck racecheck sass probe profile loss example"}
     BUDGET=${2:-${BUDGET:-300}} ;;
  all) STEPS=${STEPS:-"build smoke memcheck racecheck tests kernels variants embeddings sass \
probe profile loss example"}
       BUDGET=${BUDGET:-570} ;;  # run it with the device tool's timeout_s=600
  *) echo "usage: $0 [1 | 2 [BUDGET] | all]" >&2; exit 2 ;;
esac
[[ $BUDGET =~ ^[0-9]+$ ]] || { echo "error: BUDGET must be whole seconds, not '$BUDGET'" >&2; exit 2; }
case ${WGMMA:=unknown} in
  unknown | ok | failed | off) ;;
  *) echo "error: WGMMA must be ok, failed or off (smoke_wgmma's outcome), not '$WGMMA'" >&2; exit 2 ;;
esac
# The steps of call 1 that did not run to their end (no time left for them, or the call was
# ended from outside) go on to call 2, which runs them among its own in this file's order: after
# the sanitizers, before the SASS, probe and profiles. Call 1 writes the list after every step
# into build/, which the machine keeps between calls (as it keeps the build); call 2 reads it
# (the wgmma steps only with the outcome that added them in call 1).
CARRIED=build/.gpu_check_carried
if [[ $CALL == 1 ]]; then
  rm -f "$CARRIED"
elif [[ $CALL == 2 && -s $CARRIED ]]; then
  carried=""
  for name in $(<"$CARRIED"); do
    [[ $name == tests_wgmma && $WGMMA != ok ]] && continue
    [[ $name == memcheck_wgmma && $WGMMA != failed ]] && continue
    carried+=" $name"
  done
  if [[ -n $carried ]]; then
    STEPS="$STEPS$carried"
    echo "gpu_check: carried from call 1:$carried"
  fi
fi
echo "gpu_check: call $CALL, steps: $STEPS; budget $BUDGET s"
status=()

# report: the tables and the summary into $OUT/summary.md, the logs into $OUT/logs.tar.gz; after
# every step, so that what was measured comes back even if the device tool ends the call.
report() {
  {
  [[ -s $LOGS/gpu.txt ]] && cat "$LOGS/gpu.txt"  # the GPU, its runtime, torch, the wheels
  for table in kernels variants embeddings loss example probe profile; do
    [[ -s $LOGS/$table.md ]] && { echo; echo "== $table =="; grep '^[|#]' "$LOGS/$table.md"; }
  done
  echo
  local api=""
  [[ -e ${API_ACCESS_MARKER:-} ]] && api="; extension built with -DFASTAP_WMMA_API_ACCESS"
  echo "== summary (call $CALL; wgmma path: ${WGMMA:-unknown}$api) =="
  printf '%-15s %-16s %-7s %s\n' step result time log
  local s a b c d
  for s in "${status[@]}"; do
    IFS='|' read -r a b c d <<<"$s"; printf '%-15s %-16s %-7s %s\n' "$a" "$b" "$c" "$d"
  done
  } >"$OUT/summary.md"
  if [[ $CALL == 1 ]]; then  # what call 2 is to run of call 1's steps (CARRIED, above)
    local each pending=()
    for each in $STEPS; do  # (a step ran to its end: ok, FAILED(n) or TIMEOUT(s))
      [[ " ${status[*]} " =~ \ $each\|(ok|FAILED|TIMEOUT) ]] || pending+=("$each")
    done
    mkdir -p "$(dirname "$CARRIED")" && echo "${pending[*]}" >"$CARRIED"
  fi
  # (Written aside, then renamed: a call ended during tar leaves the previous archive whole.)
  tar -czf "$LOGS.tar.gz" -C "$LOGS" --exclude mma_probe . && mv "$LOGS.tar.gz" "$OUT/logs.tar.gz"
}

last_status() {  # the last step's status entry, or nothing before the first step
  (( ${#status[@]} )) && echo "${status[-1]}"
}
selected() {  # selected NAME...: whether any of these steps is in STEPS
  local name
  for name in "$@"; do [[ " $STEPS " == *" $name "* ]] && return 0; done
  return 1
}
step() {  # step NAME SECONDS LOG COMMAND...: run_step if selected
  selected "$1" || return 0
  run_step "$@"
}
run_step() {  # run_step NAME SECONDS LOG COMMAND...: run, keep the log, note the outcome
  local name=$1 limit=$2 log=$3; shift 3
  # Never past the call's budget: a step gets at most what is left of it less 15 s (its kill
  # comes 10 s after its limit), and none is started with under 25 s left, so that the summary
  # is printed before the device tool's limit.
  local left=$((BUDGET - SECONDS))
  if (( left < 25 )); then
    status+=("$name|SKIPPED(budget)|0 s|$log")
    echo "== $name: skipped, ${left} s of the ${BUDGET} s budget left"
    return 0
  fi
  (( limit > left - 15 )) && limit=$((left - 15))
  local start=$SECONDS rc=0
  # Through bash, so that a command may be one of the functions exported below; -k: a step that
  # ignores the TERM at its limit is killed 10 s later. In the background, waited for, so that
  # the trap below can stop it at once.
  timeout -k 10 "$limit" bash -c '"$@"' "$name" "$@" >"$LOGS/$log" 2>&1 &
  step_pid=$! step_name=$name step_log=$log step_start=$start
  wait "$step_pid" || rc=$?
  step_pid=
  local result=ok
  (( rc == 124 || rc == 137 )) && result="TIMEOUT(${limit}s)"
  (( rc != 0 && rc != 124 && rc != 137 )) && result="FAILED($rc)"
  status+=("$name|$result|$((SECONDS - start)) s|$log")
  echo "== $name: $result in $((SECONDS - start)) s"; tail -3 "$LOGS/$log"
  report
}
# every COMMAND...: run each (a string for bash), all of them even when one fails; fails if any
# did, so that one case's failure does not cost the other cases their figures.
every() {
  local command rc=0
  for command in "$@"; do bash -c "$command" || rc=1; done
  return $rc
}
# The sanitizers see every allocation only without torch's caching allocator (which would hide an
# overrun that stays inside one of its pooled blocks).
# --report-api-errors no: torch's own CUDA API calls that return an error it expects and handles
# (a query of a stream not yet done, say) would otherwise count as errors of the run.
sanitize() {
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --error-exitcode 1 --report-api-errors no "$@"
}
# The tests that touch CUDA (test_cuda*.py and every [cuda] parameter; CI runs the rest on the
# CPU). A test still running after FASTAP_TEST_TIMEOUT seconds ends the run with every thread's
# stack, which names it (tests/conftest.py; --capture=sys lets that reach the log). -v: each
# test's outcome is in the log as it ends, so a step cut short by its limit still tells which
# tests passed and failed.
pytest_cuda() {
  # (4 threads per process, and 4 for Inductor's compile workers, whose pool is otherwise one per
  # core in each process: with -n 4 that is the machine's 16 cores, not 4 x 16.)
  LD_PRELOAD=$CRASH_BACKTRACE OMP_NUM_THREADS=4 TORCHINDUCTOR_COMPILE_THREADS=4 \
    FASTAP_TEST_TIMEOUT=90 $PY -m pytest -v -rf --maxfail=25 --capture=sys -p no:cacheprovider \
    tests --ignore tests/test_cuda_emulation.py "$@"
}
export -f every sanitize pytest_cuda
export PY
# A process of the tests or the smoke step that crashes writes its native frames to its log
# (benchmarks/crash_backtrace.c, preloaded; faulthandler writes the Python ones): the machine has
# no gdb. Not under the sanitizers or ncu, which handle the process's signals themselves.
CRASH_BACKTRACE=""
if [[ -f benchmarks/crash_backtrace.c ]] && gcc -O1 -shared -fPIC \
  -o "$SCRATCH/crash_backtrace.so" benchmarks/crash_backtrace.c -ldl 2>"$LOGS/crash_backtrace.log"
then
  CRASH_BACKTRACE=$SCRATCH/crash_backtrace.so
fi
export CRASH_BACKTRACE
# Ended from outside (the device tool's limit, say): stop the step, say so, keep what was measured.
interrupted() {
  if [[ -n ${step_pid:-} ]]; then
    kill -TERM "$step_pid" 2>/dev/null
    status+=("$step_name|INTERRUPTED|$((SECONDS - step_start)) s|$step_log")
  fi
  report
  exit 143
}
step_pid=
trap interrupted TERM INT

# The wgmma path (FASTAP_WGMMA=1 on the sm_90a build) alone, once, before any step that would run
# it: WGMMA becomes ok, failed (an error or a fault: memcheck_wgmma then names it) or off (a hang,
# or no time left), and only with ok do the later steps run it. A hang costs this step's limit
# instead of every step's that runs the fused kernels on wgmma.
wgmma_check() {
  [[ $WGMMA == unknown ]] || return 0
  run_step smoke_wgmma 60 smoke_wgmma.log $PY benchmarks/sanitizer_case.py --wgmma only
  # FAILED(3): no wgmma path in this build or on this GPU (sanitizer_case.py's WGMMA_ABSENT).
  case $(last_status) in
    smoke_wgmma\|ok\|*) WGMMA=ok ;;
    smoke_wgmma\|FAILED\(3\)*) WGMMA=off ;;
    smoke_wgmma\|FAILED*) WGMMA=failed ;;
    *) WGMMA=off ;;
  esac
  [[ $WGMMA == ok ]] || echo "== wgmma path: $WGMMA; the steps after this leave it out"
}
wgmma_runs() { [[ $WGMMA == ok ]] && echo with || echo without; }  # sanitizer_case.py --wgmma

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$LOGS/gpu.txt"
# The runtime: under gVisor (kernel 4.4.0) compute-sanitizer refuses the device and ncu reads no
# counters (the device tool's KINDS.md), so memcheck, racecheck and profile fail there for that.
kernel=$(uname -r)
[[ $kernel == 4.4.0 ]] && kernel="$kernel (gVisor: no compute-sanitizer, no ncu counters)"
echo "kernel $kernel" | tee -a "$LOGS/gpu.txt"
# The wheels that benchmarks/gpu_wheels.sh downloaded here and the device call carried (.whl/):
# installed beside the machine's packages, never over them (--no-deps).
if compgen -G ".whl/*.whl" >/dev/null; then
  site=$SCRATCH/site
  $PY -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl &&
    export PYTHONPATH=$PYTHONPATH:$site && echo "carried wheels: $(cd .whl && echo *.whl)" |
    tee -a "$LOGS/gpu.txt"
else
  echo "no carried wheels (.whl/): the peers' rows and tests are skipped" | tee -a "$LOGS/gpu.txt"
fi
$PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)' |
  tee -a "$LOGS/gpu.txt"
# A build that call 1's api_access step made with WMMA's own loads stays so in call 2 (the
# machine keeps build/ between calls, and so the marker): rebuilding without the flag would cost
# a full build and measure another extension.
API_ACCESS_MARKER=build/.fastap_wmma_api_access
build_flags=()
if [[ -e $API_ACCESS_MARKER ]]; then
  build_flags=(FASTAP_NVCC_FLAGS=-DFASTAP_WMMA_API_ACCESS)
  echo "build: with -DFASTAP_WMMA_API_ACCESS (call 1's api_access step)" | tee -a "$LOGS/gpu.txt"
fi
step build 240 build.log env ${build_flags[@]+"${build_flags[@]}"} FASTAP_CUDA=1 \
  FASTAP_CUDA_ARCH=9.0a MAX_JOBS=16 $PY setup.py build_ext --inplace
# smoke: the small passes of every kernel, alone. A kernel that faults poisons the CUDA context of
# every test after it, so when this fails memcheck runs at once (it names the kernel and the
# address), before the tests.
step smoke 90 smoke.log env LD_PRELOAD="$CRASH_BACKTRACE" \
  $PY benchmarks/sanitizer_case.py --wgmma without
# (On a hang, memcheck would only hang too; the log ends with the stacks of the pass it hung in.)
[[ $(last_status) != smoke\|FAILED* ]] || STEPS="$STEPS memcheck"
if selected smoke memcheck tests profile embeddings racecheck; then wgmma_check; fi
# memcheck_wgmma names the fault of a smoke_wgmma that failed in this call (not again in call 2,
# which is handed WGMMA=failed).
[[ $WGMMA != failed || ${status[*]} != *smoke_wgmma* ]] || STEPS="$STEPS memcheck_wgmma"
step memcheck 120 memcheck.log sanitize --tool memcheck \
  $PY benchmarks/sanitizer_case.py --wgmma "$(wgmma_runs)"
step memcheck_wgmma 90 memcheck_wgmma.log sanitize --tool memcheck \
  $PY benchmarks/sanitizer_case.py --wgmma only
step racecheck 120 racecheck.log sanitize --tool racecheck \
  $PY benchmarks/sanitizer_case.py --wgmma "$(wgmma_runs)"
# tests: every test that touches CUDA; the wgmma path's in a process of their own after the
# others (tests_wgmma), so that a fault there cannot fail the rest.
# With pytest-xdist (the GPU machine has it), in 4 processes that share the GPU: a test that hangs
# or faults then costs its process (xdist reports it and starts another), not the rest of the run.
xdist=()
$PY -c 'import xdist' 2>/dev/null && xdist=(-n 4)
step tests 240 tests.log pytest_cuda ${xdist[@]+"${xdist[@]}"} -k "cuda and not wgmma"
if selected tests && [[ $WGMMA == ok ]]; then STEPS="$STEPS tests_wgmma"; fi
step tests_wgmma 90 tests_wgmma.log pytest_cuda -k "cuda and wgmma"
# api_access: only when a fused test failed. The fused kernels load their bf16 and TF32 operands
# with a PTX spelling of WMMA's loads (csrc/cuda/matrix_unit.cuh, load_operand), the one
# part of them that the CPU emulation cannot run; this rebuilds with the API's own loads and
# reruns the fused tests, so that one call tells whether that spelling is at fault. The steps
# after it then measure the rebuilt extension (the summary says so).
# fused_failures: the tests of test_cuda_embeddings.py that failed in the tests step, less those
# whose process crashed. A crash is a fault of host code (on 2026-12-04, the formatting of an
# error message), never of the operands' loads, which fail a test's comparison or raise a CUDA
# error: for it the rebuild would only have the later steps measure another extension.
fused_failures() {
  local log=$LOGS/tests.log
  [[ -s $log ]] || return 0
  grep -Eo 'FAILED tests/test_cuda_embeddings\.py::[^ ]+|test_cuda_embeddings\.py::[^ ]+ FAILED' \
    "$log" | grep -Eo 'test_cuda_embeddings\.py::[^ ]+' | sort -u |
    grep -vxF -f <(grep -Eo "crashed while running 'tests/[^']+'" "$log" |
      sed -E "s/.*'tests\/(.*)'/\1/")
}
if selected tests && [[ -n $(fused_failures) ]]; then
  STEPS="$STEPS api_access"
fi
step api_access 200 api_access.log bash -c "FASTAP_NVCC_FLAGS=-DFASTAP_WMMA_API_ACCESS \
  FASTAP_CUDA=1 FASTAP_CUDA_ARCH=9.0a MAX_JOBS=16 $PY setup.py build_ext --inplace && \
  { grep -rqs -- -DFASTAP_WMMA_API_ACCESS build || { echo 'rebuilt without the flag'; exit 1; }; } \
  && touch $API_ACCESS_MARKER && LD_PRELOAD=$CRASH_BACKTRACE FASTAP_TEST_TIMEOUT=90 \
  $PY -m pytest -q -rf --capture=sys -p no:cacheprovider tests/test_cuda_embeddings.py -k 'not wgmma'"
# kernels: Q = 10 / 20 / 50 and both dtypes at 8192^2 (the targets); N = M = 1024 ... 32768 and
# 256 x 1,000,000 at Q = 20, with the reference (fp32) tried up to 32768^2, where it runs out of
# memory; dense relevance at 8192^2. Each command adds its rows to kernels.json, and runs even if
# one before it failed.
kernels="$PY benchmarks/bench_kernels.py --device cuda --repeats 20 --json $OUT/kernels.json"
step kernels 150 kernels.md every \
  "$kernels --shapes 8192x8192 --num-bins 10 20 50 --dtypes float32 bfloat16 \
    --reference-max 1073741824" \
  "$kernels --shapes 1024x1024 4096x4096 16384x16384 32768x32768 256x1000000 --num-bins 20 \
    --dtypes float32 bfloat16 --reference-max 1073741824" \
  "$kernels --shapes 8192x8192 --num-bins 20 --dtypes float32 bfloat16 --relevance dense \
    --reference-max 0"
step variants 90 variants.md every \
  "$PY benchmarks/bench_variants.py --device cuda --n 8192 --repeats 20" \
  "$PY benchmarks/bench_ap_formula.py --device cuda --rows 8192 65536"
# embeddings: the fused kernels against the score-matrix path, blockwise, the four products'
# floor and the peers at D = 256, the peers at 16384 alone (the loss step measures where they
# run out of memory; pytorch-metric-learning's FastAPLoss at 65536 would first spend its time
# building N x N masks on the CPU), then the 262144 target at D = 128; wgmma last in each row.
# Each row is in the JSON once measured.
fused_cases="matrix blockwise fused floor reference pml fused_wgmma"
[[ $WGMMA == ok ]] || fused_cases="matrix blockwise fused floor reference pml"
step embeddings 240 embeddings.md every \
  "$PY benchmarks/bench_embeddings.py --device cuda --dtype bfloat16 --dim 256 --timeout 90 \
    --sizes 16384 65536 --peer-max 16384 --cases $fused_cases --repeats 5 \
    --json $OUT/embeddings_d256.json" \
  "$PY benchmarks/bench_embeddings.py --device cuda --dtype bfloat16 --dim 128 --timeout 90 \
    --sizes 262144 --cases fused blockwise --repeats 3 --json $OUT/embeddings_d128.json"
# sass: the score-matrix kernels' instructions per candidate in the extension just built (the
# figures CI takes from its own compile, here from this machine's build).
step sass 30 sass.log bash -c "for f in fastap/_C*.so; do cuobjdump -sass \"\$f\"; done \
  >\"$LOGS/sass.txt\" && $PY .ci/sass_report.py \"$LOGS/sass.txt\""
# probe: the matrix paths on the fused kernels' tile shapes (benchmarks/mma_probe.cu): WMMA
# against wgmma, each checked exactly and timed, against the shared-memory count of design.md §5.
step probe 60 probe.md bash -c "nvcc -O3 -std=c++17 -gencode arch=compute_90a,code=sm_90a \
  benchmarks/mma_probe.cu -o $LOGS/mma_probe && $LOGS/mma_probe"
# profile: Nsight Compute over the four fast kernels of the 8192^2 case (forward and backward,
# fp32 then bf16), then the three fused kernels at 16384^2, D = 256, bf16
# (benchmarks/profile_case.py), then those on wgmma: which of issue, shared/L1 and DRAM binds,
# against the model of docs/design.md, sections 3b and 5. --clock-control none leaves the GPU's
# clocks alone.
NCU_SECTIONS="--section SpeedOfLight --section ComputeWorkloadAnalysis \
  --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
  --section InstructionStats --section WarpStateStats --csv --page details"
# profile_run CSV KERNELS LAUNCHES TITLE [CANDIDATES [CASE_ARG]]: ncu over the kernels matching
# the regex KERNELS of benchmarks/profile_case.py (LAUNCHES skipped, then LAUNCHES profiled) into
# $LOGS/CSV, then its table (CANDIDATES: the candidates per launch, where not the 8192^2 case's)
# added to profile.md; pipefail, so that a table that fails is a failure and not tee's success.
profile_run() {
  set -o pipefail
  ncu --clock-control none --print-kernel-base demangled --kernel-name "regex:$2" \
    --launch-skip "$3" --launch-count "$3" $NCU_SECTIONS --log-file "$LOGS/$1" \
    $PY benchmarks/profile_case.py ${6:-} &&
    $PY benchmarks/profile_table.py "$LOGS/$1" ${5:+--candidates "$5"} --title "$4" |
    tee -a "$LOGS/profile.md"
}
export -f profile_run
export NCU_SECTIONS LOGS
# Each run is a command of its own (every): one that fails leaves the others' tables.
fused_kernels="'embedding_histogram(_backward)?_kernel'"
fused_title="'fused from embeddings, 16384^2, D = 256, bf16, Q = 20'"
profile_runs=(
  "profile_run profile.csv 'soft_histogram(_backward)?_kernel' 4 'score-matrix op, 8192^2, Q = 20'"
  "profile_run profile_fused.csv $fused_kernels 3 $fused_title 268435456 --embeddings"
)
[[ $WGMMA == ok ]] && profile_runs+=(
  "FASTAP_WGMMA=1 profile_run profile_wgmma.csv $fused_kernels 3 \
    'the same on wgmma (FASTAP_WGMMA=1)' 268435456 --embeddings"
)
step profile 240 profile.log every "${profile_runs[@]}"

# loss: fastap against the reference and pytorch-metric-learning's FastAPLoss (carried wheel),
# tried at every N, so that where each runs out of memory is measured.
step loss 150 loss.md $PY benchmarks/bench_ap_loss.py --device cuda \
  --sizes 1024 8192 16384 32768 --reference-max 32768 --repeats 20 --reference-repeats 3 \
  --timeout 90 --json "$OUT/loss.json"
# example: the reference training example end to end on the GPU, 5 epochs of each fastap loss
# (APLoss, its tie-aware variant, cross-batch memory; multi-stage backward), its report last.
step example 90 example.md $PY examples/train.py --device cuda --epochs 5 \
  --loss fastap,tie_aware,fastap_xbm --out "$SCRATCH/train"
report
cat "$OUT/summary.md"
