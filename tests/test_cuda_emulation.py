"""The CUDA kernels of csrc/cuda, run on the CPU by tests/emulation against the CPU op.

The kernels, their launchers (csrc/cuda/*.cu) and launch plan are compiled with g++ for the host
(tests/emulation/cuda_host.h turns each thread of a block into a fiber, run in shuffled turns
between real barriers), once under AddressSanitizer and UndefinedBehaviorSanitizer (out-of-bounds
reads and writes, shared memory included) and once under ThreadSanitizer (a missing
__syncthreads/__syncwarp is a data race; test_the_emulation_finds_... checks that it says so). This
checks the kernels' indexing, chunking, reductions, edge cases and launch sequences on every CI
run; the real GPU run is
tests/test_cuda.py (benchmarks/gpu_check.sh).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.cpp_extension import include_paths

import fastap
from fastap.testing import (
    RELEVANCE_FORMS,
    exact_embeddings,
    random_problem,
    round_like_matrix_unit,
)

from problem_strategies import kernel_problems

ROOT = Path(__file__).resolve().parents[1]
# The program first, then every file it may include (their bytes name the binary): the launchers
# of csrc/cuda/*.cu among them.
SOURCES = [
    ROOT / "tests/emulation/run_kernels.cpp",
    *sorted((ROOT / "tests/emulation").glob("*.h")),
    *sorted((ROOT / "csrc").rglob("*.h")),
    *sorted((ROOT / "csrc").rglob("*.cuh")),
    *sorted((ROOT / "csrc").rglob("*.cu")),
]
SANITIZERS = {"address": "address,undefined", "thread": "thread"}
DTYPE_CODES = {
    torch.float64: "f64",
    torch.float32: "f32",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
}

pytestmark = pytest.mark.skipif(
    shutil.which("g++") is None or not sys.platform.startswith("linux"),
    reason="the emulation needs g++ and Linux (its fibers: ucontext.h, mmap)",
)


def build_command(source: Path, binary: Path, sanitizer: str) -> list[str]:
    """The g++ command that builds an emulation program with one of SANITIZERS. (-g1: the line
    tables, for the file and line of each frame in a sanitizer's report; full -g took half as
    long again to build, 60 s against 36 s with ASan and UBSan.)"""
    return [
        "g++", "-std=c++20", "-O1", "-g1", "-pthread", "-Wall", "-Wextra", "-Werror",
        "-fno-strict-aliasing",  # the kernels read 16-byte vectors of bf16 / float
        "-Wno-unknown-pragmas", f"-fsanitize={SANITIZERS[sanitizer]}",
        "-fno-sanitize-recover=all", *(f"-I{p}" for p in include_paths()),
        str(source), "-o", str(binary),
    ]  # fmt: skip


@pytest.fixture(scope="session")
def emulators(tmp_path_factory) -> dict[str, Path]:
    """The emulation program, built once per test run for each sanitizer (the builds in
    parallel). Under pytest-xdist the workers share one build, in the parent of their temporary
    folders: the first to take the lock builds, the others wait for it and use its binaries."""
    import fcntl  # (Linux only, as the emulation)

    digest = hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES)).hexdigest()[:12]
    base = tmp_path_factory.getbasetemp()
    out = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "emulation"
    out.mkdir(exist_ok=True)
    binaries = {name: out / f"run_kernels_{name}_{digest}" for name in SANITIZERS}
    with open(out / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        builds = {}
        for name, binary in binaries.items():
            if binary.exists():
                continue
            command = build_command(SOURCES[0], Path(f"{binary}.partial"), name)
            builds[name] = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
        for name, build in builds.items():
            _, stderr = build.communicate()
            assert build.returncode == 0, stderr
            # Complete binaries only get the name that the other workers look for.
            os.replace(f"{binaries[name]}.partial", binaries[name])
    return binaries


def test_the_emulation_finds_a_forgotten_barrier_and_one_not_every_thread_reaches(tmp_path):
    """The emulation's own promises (tests/emulation/self_check.cpp), with each sanitizer: a
    kernel that forgets the __syncthreads between a write and another thread's read of it reads
    wrong values (the threads run in turn between barriers, in shuffled orders: about half of
    them read their neighbour's slot before the neighbour wrote it), and
    ThreadSanitizer reports the race; with the barrier, right values and no report; a
    __syncthreads or __syncwarp that one thread skips aborts at once, naming it."""
    source = ROOT / "tests/emulation/self_check.cpp"
    builds = {}
    for name in SANITIZERS:
        binary = tmp_path / f"self_check_{name}"
        command = build_command(source, binary, name)
        builds[name] = (binary, subprocess.Popen(command, stderr=subprocess.PIPE, text=True))
    for name, (binary, build) in builds.items():
        _, stderr = build.communicate()
        assert build.returncode == 0, stderr

        def run(kernel, binary=binary):
            return subprocess.run([str(binary), kernel], capture_output=True, text=True, timeout=60)

        synced = run("synced")
        assert synced.returncode == 0 and synced.stdout == "wrong=0\n", (name, synced)
        # (no report; AddressSanitizer's general warning about swapcontext is no report)
        assert "Sanitizer:" not in synced.stderr, (name, synced.stderr)
        unsynced = run("unsynced")
        assert int(unsynced.stdout.removeprefix("wrong=")) > 2 * 96 // 4, (name, unsynced)
        if name == "thread":
            assert unsynced.returncode != 0, (name, unsynced)
            assert "ThreadSanitizer: data race" in unsynced.stderr, (name, unsynced.stderr)
        else:
            assert unsynced.returncode == 0, (name, unsynced)
        for kernel, message in DIVERGENT_BARRIERS.items():
            done = run(kernel)
            assert done.returncode != 0 and message in done.stderr, (name, kernel, done)


# self_check.cpp's kernels that skip a barrier in one thread, and what the emulation says.
DIVERGENT_BARRIERS = {
    # Thread 5 skips the __syncthreads: its "block end" meets the others' __syncthreads.
    "divergent": "emulation: one barrier reached as __syncthreads by some threads and as block end "
    "by others (divergent barrier)",
    # Thread 40 skips the __syncwarp: the rest of its warp waits there, the other warps at the
    # block's end.
    "warp_divergent": "emulation: a barrier not reached by every thread (divergent barrier): of 96 "
    "threads, 0 finished, the others wait: 31 at __syncwarp, 65 at block end",
}


def _write(path: Path, tensor: torch.Tensor) -> str:
    path.write_bytes(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return str(path)


def _read(path: Path, dtype: torch.dtype, shape) -> torch.Tensor:
    data = path.read_bytes()
    if not data:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)


def emulate(binary, tmp_path, problem, op, *, table=None, fast=None, **options):
    """Runs one kernel op of the emulation on `problem`; returns its outputs as tensors. `fast`
    (True/False): check that the launch picked the fast / the general kernel."""
    scores = problem.scores
    n, m = scores.shape
    lo, hi = problem.score_range
    args = {
        "op": op,
        "dtype": DTYPE_CODES[scores.dtype],
        "n": n,
        "m": m,
        "q": problem.num_bins,
        "lo": repr(float(lo)),
        "hi": repr(float(hi)),
        "scores": _write(tmp_path / "scores", scores),
        "exclude_self": int(problem.exclude_self),
        "self_offset": 0,
        "out": str(tmp_path / "out"),
        **options,
    }
    if problem.relevance is not None:
        args["relevance"] = _write(tmp_path / "relevance", problem.relevance.to(torch.uint8))
    else:
        ref_labels = problem.labels if problem.ref_labels is None else problem.ref_labels
        args["labels"] = _write(tmp_path / "labels", problem.labels.to(torch.int64))
        args["ref_labels"] = _write(tmp_path / "ref_labels", ref_labels.to(torch.int64))
    if problem.ignore is not None:
        args["ignore"] = _write(tmp_path / "ignore", problem.ignore.to(torch.uint8))
    if table is not None:
        args["table"] = _write(tmp_path / "table", table)
    command = [str(binary), *(f"{k}={v}" for k, v in args.items())]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    if fast is not None:
        assert f"fast={int(fast)}" in result.stdout.split(), result.stdout
    hist_dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    out = tmp_path / "out"
    if op == "forward":
        q = problem.num_bins
        return (
            _read(out.with_suffix(".n"), hist_dtype, (n, q)),
            _read(out.with_suffix(".p"), hist_dtype, (n, q)),
            _read(out.with_suffix(".positives"), torch.int64, (n,)),
        )
    return _read(out.with_suffix(".grad"), scores.dtype, (n, m))


def op_args(problem):
    lo, hi = problem.score_range
    return (
        problem.relevance,
        problem.labels,
        problem.ref_labels,
        problem.ignore,
        problem.exclude_self,
        problem.num_bins,
        lo,
        hi,
    )


def slope_table(problem, grad_n, grad_p):
    """The backward's N x 2 x (Q - 1) table, as csrc/histogram_inputs.cpp computes it."""
    q = problem.num_bins
    lo, hi = problem.score_range
    dtype = torch.float64 if problem.scores.dtype == torch.float64 else torch.float32
    g_neg = grad_n.to(dtype)
    g = torch.stack([g_neg, g_neg + grad_p.to(dtype)], 1)
    return ((g[..., :-1] - g[..., 1:]) * ((q - 1) / (hi - lo))).contiguous()


def check_forward(emulated, expected, dtype):
    n, p, positives = emulated
    n_cpu, p_cpu, positives_cpu = expected
    assert torch.equal(positives, positives_cpu)
    # The CPU op accumulates in fp64; the kernels in the histogram dtype, in another order.
    tol = dict(rtol=1e-12, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(n.double(), n_cpu.double(), equal_nan=True, **tol)
    torch.testing.assert_close(p.double(), p_cpu.double(), equal_nan=True, **tol)


def check_both(
    binary, tmp_path, problem, seed=0, *, fast=None, backward_fast=None, self_offset=0, **options
):
    """Both kernels against the CPU op. `fast` / `backward_fast` (default: `fast`): the kernel
    each launch must pick (None: either); `self_offset`: query i's own candidate is i + it."""
    args = (*op_args(problem), self_offset)
    expected = torch.ops.fastap.soft_histogram(problem.scores, *args)
    emulated = emulate(binary, tmp_path, problem, "forward", fast=fast, self_offset=self_offset,
                       **options)  # fmt: skip
    check_forward(emulated, expected, problem.scores.dtype)
    g = torch.Generator().manual_seed(seed)
    grad_n, grad_p = torch.randn((2, *expected[0].shape), generator=g, dtype=expected[0].dtype)
    grad_cpu = torch.ops.fastap.soft_histogram_backward(grad_n, grad_p, problem.scores, *args)
    grad = emulate(
        binary, tmp_path, problem, "backward", table=slope_table(problem, grad_n, grad_p),
        fast=fast if backward_fast is None else backward_fast, self_offset=self_offset, **options,
    )  # fmt: skip
    # The same table lookup in the same precision: bitwise equal (NaN where the CPU has NaN).
    assert torch.equal(grad.isnan(), grad_cpu.isnan())
    assert torch.equal(grad.nan_to_num(), grad_cpu.nan_to_num())
    return grad


SHAPES = [  # (N, M, Q, options): chunk / max_blocks force the partial and grid-stride paths
    (1, 1, 2, {}),
    (3, 0, 5, {}),
    (37, 1000, 20, {}),
    (37, 1000, 20, {"chunk": 96}),
    (33, 33, 7, {"chunk": 5, "max_blocks": 2}),
    (300, 301, 100, {"max_blocks": 3}),
    (3, 9000, 10, {}),
]


@pytest.mark.parametrize("form", RELEVANCE_FORMS)
@pytest.mark.parametrize("dtype", list(DTYPE_CODES))
@pytest.mark.parametrize("n,m,q,options", SHAPES)
def test_kernels_equal_cpu_op(emulators, tmp_path, form, dtype, n, m, q, options):
    problem = random_problem(
        n, m, num_bins=q, relevance_form=form, with_ignore=True, exclude_self=n == m,
        dtype=dtype, seed=n + m,
    )  # fmt: skip
    check_both(emulators["address"], tmp_path, problem, **options)


# Labels without an ignore mask, and rows of whole units, take the fast kernels (a unit's scores
# in one load, its labels two per load, no run-time relevance tests); anything else, the general
# ones. The forward's unit is a pair of candidates (and its chunks must hold whole pairs too), the
# backward's a 16-byte vector: 8 scores of bf16 / fp16, 4 of fp32, 2 of fp64. (N, M, Q, chunk)
FAST_SHAPES = [
    (1000, 1000, 20, None),  # fast; self exclusion in inner and edge groups
    (33, 1000, 20, 96),  # fast; several chunks per row: partial histograms
    (3, 9000, 10, None),  # fast
    (7, 8, 2, None),  # fast; 4 pairs per row: every group is an edge
    (34, 34, 5, None),  # forward fast, 17 pairs with self in the last; backward fast in fp64 only
    (12, 1030, 20, 514),  # forward fast, a group of one pair at a chunk's end; backward as above
    (40, 1001, 20, None),  # general: rows not of whole pairs
    (33, 1000, 20, 35),  # forward general (chunks not of whole pairs), backward fast
]


@pytest.mark.parametrize("dtype", list(DTYPE_CODES))
@pytest.mark.parametrize("n,m,q,chunk", FAST_SHAPES)
def test_fast_kernels_equal_cpu_op(emulators, tmp_path, dtype, n, m, q, chunk):
    problem = random_problem(
        n, m, num_bins=q, relevance_form="labels", exclude_self=n == m, dtype=dtype, seed=n + m
    )
    forward_fast = m % 2 == 0 and (chunk or 4096) % 2 == 0
    backward_fast = m % (16 // dtype.itemsize) == 0
    check_both(emulators["address"], tmp_path, problem, seed=n, fast=forward_fast,
               backward_fast=backward_fast, **({"chunk": chunk} if chunk else {}))  # fmt: skip


# The fast backward stores whole 16-byte vectors of the gradient: a gradient buffer off that
# alignment (another allocator's) takes the general kernel, with the same result. (grad_offset:
# the emulation writes the gradient that many elements into its buffer; forward unaffected.)
@pytest.mark.parametrize("dtype", list(DTYPE_CODES))
def test_misaligned_gradient_takes_the_general_backward(emulators, tmp_path, dtype):
    problem = random_problem(9, 64, num_bins=10, relevance_form="labels", dtype=dtype, seed=5)
    check_both(emulators["address"], tmp_path, problem, fast=True, backward_fast=False,
               grad_offset=1)  # fmt: skip


# Scores off their unit's alignment or candidate labels off 16 bytes (a view with a storage
# offset, which .contiguous() keeps as it is): both ops take the general kernels, with the same
# results. The emulation builds its uint2 and uint4 with alignas(8) and alignas(16), so a unit's
# load from such a pointer is reported by UndefinedBehaviorSanitizer (-fsanitize=alignment), as it
# would fault on a GPU (cudaErrorMisalignedAddress). (KEY_offset: the emulation places the input
# that many elements into its buffer.)
@pytest.mark.parametrize("dtype", list(DTYPE_CODES))
@pytest.mark.parametrize("misaligned", ["scores_offset", "ref_labels_offset"])
def test_misaligned_inputs_take_the_general_kernels(emulators, tmp_path, dtype, misaligned):
    problem = random_problem(9, 64, num_bins=10, relevance_form="labels", dtype=dtype, seed=6)
    check_both(emulators["address"], tmp_path, problem, fast=False, **{misaligned: 1})


# The forward counts an item's positives by rounding the mass of its positive histograms to the
# nearest integer (LaneHistograms in csrc/cuda/lane_histograms.cuh), which is exact while an item
# holds at most 4096 candidates. Its worst case: full chunks of positives only, piled into few
# bins (Q = 2) or spread thin (Q = 100), in the fast kernel (labels) and the general one (dense).
@pytest.mark.parametrize("form", ["labels", "dense"])
@pytest.mark.parametrize("q", [2, 100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_positive_count_from_the_histogram_mass_is_exact(emulators, tmp_path, dtype, q, form):
    problem = random_problem(
        2, 2 * 4096 + 8, num_bins=q, relevance_form=form, num_classes=1, dtype=dtype, seed=q
    )
    check_both(emulators["address"], tmp_path, problem, fast=form == "labels")


@pytest.mark.parametrize("form", ["dense", "labels"])
@pytest.mark.parametrize("self_offset", [0, 300])
def test_general_kernels_exclude_self_in_inner_groups(emulators, tmp_path, form, self_offset):
    # soft_histogram_kernel (general path) bins a row in groups of 128 candidates; a group that
    # holds the row's own column must take the edge path, which tests it. With M >= 256 and an
    # ignore mask the general kernel runs and most rows' own column lies in an inner group.
    n, m = (300, 300) if self_offset == 0 else (5, 1040)
    problem = random_problem(n, m, num_bins=20, relevance_form=form, with_ignore=True,
                             dtype=torch.float32, seed=7)  # fmt: skip
    problem.exclude_self = True
    check_both(emulators["address"], tmp_path, problem, fast=False, self_offset=self_offset)


# A row of many chunks whose partial histograms are all alike: added one by one in fp32, each
# addition would round the same way once the sum is large, and the error would grow with the
# number of chunks (6e-5 to 9e-5 of the sum here, against the comparison's 1e-5). The finalize
# kernel adds them in fp64.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_many_alike_chunks_sum_without_drift(emulators, tmp_path, dtype):
    chunks, chunk = 8192, 64
    problem = random_problem(1, chunk, num_bins=3, relevance_form="labels", dtype=dtype, seed=4)
    problem = problem.with_scores(problem.scores.repeat(1, chunks))
    problem.ref_labels = problem.ref_labels.repeat(chunks)
    check_both(emulators["address"], tmp_path, problem, fast=True, chunk=chunk)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("self_offset,chunk", [(30, None), (1000, 256), (3, 8)])
def test_fast_kernels_exclude_self_with_offset(emulators, tmp_path, dtype, self_offset, chunk):
    # Query i's own candidate is i + self_offset (a block of queries against all candidates):
    # it lands in inner and edge groups, other chunks and other backward tiles than column i.
    problem = random_problem(5, 1040, relevance_form="labels", dtype=dtype, seed=self_offset)
    problem.exclude_self = True
    grad = check_both(emulators["address"], tmp_path, problem, seed=1, fast=True,
                      self_offset=self_offset, **({"chunk": chunk} if chunk else {}))  # fmt: skip
    rows = torch.arange(5)
    assert (grad[rows, rows + self_offset] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_kernels_poison_rows_with_non_finite_scores(emulators, tmp_path, dtype):
    problem = random_problem(6, 328, relevance_form="labels", dtype=dtype, seed=9)
    problem.exclude_self = True  # query i is candidate i
    scores = problem.scores.clone()
    scores[1, 7] = float("nan")
    scores[3, 300] = float("inf")
    scores[4, 4] = float("nan")  # its own column, excluded: no poison
    scores[5, 327] = -float("inf")  # the last vector of the row
    problem = problem.with_scores(scores)
    check_both(emulators["address"], tmp_path, problem, fast=True, chunk=64)
    n, p, _ = emulate(emulators["address"], tmp_path, problem, "forward", fast=True)
    assert n[[1, 3, 5]].isnan().all() and p[[1, 3, 5]].isnan().all()
    assert n[[0, 2, 4]].isfinite().all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ties_bin_centres_and_range_ends(emulators, tmp_path, dtype):
    problem = random_problem(41, 517, num_bins=9, ties=True, dtype=dtype, seed=3)
    lo, hi = problem.score_range
    centres = torch.linspace(hi, lo, problem.num_bins, dtype=torch.float64)
    scores = problem.scores.clone()
    scores[:, :9] = centres.to(dtype)  # exactly on the bin centres, both ends included
    scores[:, 9] = lo - 5.0
    scores[:, 10] = hi + 5.0
    check_both(emulators["address"], tmp_path, problem.with_scores(scores), chunk=64)


@pytest.mark.parametrize("chunk", [4096, 50])
def test_non_finite_scores_poison_their_row(emulators, tmp_path, chunk):
    problem = random_problem(6, 333, relevance_form="dense", with_ignore=True, seed=5)
    scores = problem.scores.clone()
    scores[1, 7] = float("nan")
    scores[3, 300] = float("inf")
    scores[4, 0] = -float("inf")
    ignore = problem.ignore.clone()
    ignore[1, 7] = ignore[3, 300] = False
    ignore[4, 0] = True  # ignored: accepted, no poison
    problem = problem.with_scores(scores)
    problem.ignore = ignore
    check_both(emulators["address"], tmp_path, problem, chunk=chunk)
    n, p, _ = emulate(emulators["address"], tmp_path, problem, "forward", chunk=chunk)
    assert n[[1, 3]].isnan().all() and p[[1, 3]].isnan().all()
    assert n[[0, 2, 4, 5]].isfinite().all()


def test_num_bins_beyond_shared_memory_is_refused(emulators, tmp_path):
    problem = random_problem(2, 3, num_bins=1000, dtype=torch.float64)
    with pytest.raises(AssertionError, match="num_bins too large"):
        emulate(emulators["address"], tmp_path, problem, "forward")


@pytest.mark.parametrize("options", [{}, {"chunk": 40, "max_blocks": 2}])
def test_kernels_have_no_data_races(emulators, tmp_path, options):
    problem = random_problem(19, 301, num_bins=13, relevance_form="labels", with_ignore=True,
                             dtype=torch.float32, seed=11)  # fmt: skip
    check_both(emulators["thread"], tmp_path, problem, fast=False, **options)
    fast_problem = random_problem(19, 304, num_bins=13, dtype=torch.float32, seed=11)
    check_both(emulators["thread"], tmp_path, fast_problem, fast=True, **options)


# --- random problems (hypothesis): shapes, options and inputs the fixed cases above do not pick ---

# Each example runs the emulation twice (0.1 to 1 s): a third of the profile's examples, 20 in CI's
# (HYPOTHESIS_PROFILE=dev or search, tests/conftest.py, for a longer search).
RANDOM_EXAMPLES = max(5, settings().max_examples // 3)


@st.composite
def score_kernel_cases(draw):
    """(problem, self_offset, launch options): problem_strategies.kernel_problems with forced
    chunks and grid strides, and misaligned inputs."""
    problem, self_offset = draw(kernel_problems())
    options = {}
    if draw(st.booleans()):
        options["chunk"] = draw(st.sampled_from([1, 5, 8, 33, 64, 96, 256]))
    if draw(st.booleans()):
        options["max_blocks"] = draw(st.integers(1, 5))
    if draw(st.booleans()):  # an input or the gradient off the 16-byte alignment
        misaligned = ["scores_offset", "grad_offset"]
        if problem.relevance is None:
            misaligned.append("ref_labels_offset")
        options[draw(st.sampled_from(misaligned))] = draw(st.integers(1, 7))
    return problem, self_offset, options


@settings(max_examples=RANDOM_EXAMPLES)
@given(score_kernel_cases(), st.integers(0, 2**31 - 1))
def test_kernels_equal_cpu_op_on_random_problems(emulators, case, seed):
    problem, self_offset, options = case
    with tempfile.TemporaryDirectory() as tmp:
        check_both(emulators["address"], Path(tmp), problem, seed=seed, self_offset=self_offset,
                   **options)  # fmt: skip


# --- the device branches of the shared binning (csrc/binning.h) ---


def test_binning_device_branches_equal_the_host_ones(tmp_path):
    """binning.h's #ifdef __CUDA_ARCH__ branches, which the emulation above never compiles (it
    has no __CUDA_ARCH__), built for the host with the device functions they call: the same
    bins, fractions, slopes and gradients as the host branches, bit for bit
    (tests/emulation/binning_branches.cpp)."""
    outputs = {}
    for branches, flags in (("host", []), ("device", ["-D__CUDA_ARCH__=900"])):
        binary = tmp_path / f"binning_{branches}"
        command = [
            "g++", "-std=c++20", "-O1", "-Wall", "-Wextra", "-Werror", *flags,
            str(ROOT / "tests/emulation/binning_branches.cpp"), "-o", str(binary),
        ]  # fmt: skip
        subprocess.run(command, capture_output=True, text=True, check=True, timeout=300)
        result = subprocess.run([str(binary)], capture_output=True, text=True, check=True)
        marker, *lines = result.stdout.splitlines()
        assert marker == f"branches: {branches}"
        outputs[branches] = lines
    assert len(outputs["host"]) > 3000
    assert outputs["device"] == outputs["host"]


# --- the AP formula's launchers (csrc/cuda/ap_formula.cu) ---


@pytest.mark.parametrize("rows", [300, 5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("variant", fastap.VARIANTS)
def test_ap_formula_kernels_equal_cpu_op(emulators, tmp_path, variant, dtype, rows):
    """fastap::ap_from_histograms and its backward on the emulated GPU equal the CPU op, bit for
    bit (the same row code, ap_formula.h, one thread per row): rows with and without positives,
    empty bins, and more rows than one block (300) or fewer (5: the grid still has a block)."""
    g = torch.Generator().manual_seed(3)
    q = 13
    p = torch.rand(rows, q, generator=g, dtype=dtype) * (torch.rand(rows, q, generator=g) < 0.5)
    n = torch.rand(rows, q, generator=g, dtype=dtype) * (torch.rand(rows, q, generator=g) < 0.7)
    p[::7] = 0  # queries without a positive
    positives = p.sum(1).ceil().long()
    grad_ap = torch.randn(rows, generator=g, dtype=dtype)
    args = {
        "dtype": DTYPE_CODES[dtype],
        "n": rows,
        "q": q,
        "variant": fastap.VARIANTS.index(variant),
        "n_hist": _write(tmp_path / "n_hist", n),
        "p_hist": _write(tmp_path / "p_hist", p),
        "positives": _write(tmp_path / "positives", positives),
        "grad_ap": _write(tmp_path / "grad_ap", grad_ap),
        "out": str(tmp_path / "out"),
    }
    out = tmp_path / "out"
    for op in ("ap_rows", "ap_rows_backward"):
        command = [str(emulators["address"]), f"op={op}", *(f"{k}={v}" for k, v in args.items())]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-4000:]
        assert "launches=1" in result.stdout.split()
    ap = torch.ops.fastap.ap_from_histograms(n, p, positives, variant)
    grad_n, grad_p = torch.ops.fastap.ap_from_histograms_backward(grad_ap, n, p, positives, variant)
    assert ap.isfinite().all() and grad_n.abs().sum() > 0
    assert torch.equal(_read(out.with_suffix(".ap"), dtype, (rows,)), ap)
    assert torch.equal(_read(out.with_suffix(".grad_n"), dtype, (rows, q)), grad_n)
    assert torch.equal(_read(out.with_suffix(".grad_p"), dtype, (rows, q)), grad_p)


# --- the fused from-embeddings kernels (csrc/cuda/embedding_kernels.cuh) ---


def emulate_embedding(binary, tmp_path, queries, database, labels, ref_labels, op, *, table=None,
                      exclude_self=False, self_offset=0, num_bins=20, score_range=(-1.0, 1.0),
                      **options):  # fmt: skip
    n, d = queries.shape
    m = database.shape[0]
    args = {
        "op": op,
        "dtype": DTYPE_CODES[queries.dtype],
        "n": n,
        "m": m,
        "d": d,
        "q": num_bins,
        "lo": repr(float(score_range[0])),
        "hi": repr(float(score_range[1])),
        "queries": _write(tmp_path / "queries", queries),
        "database": _write(tmp_path / "database", database),
        "labels": _write(tmp_path / "labels", labels),
        "ref_labels": _write(tmp_path / "ref_labels", ref_labels),
        "exclude_self": int(exclude_self),
        "self_offset": self_offset,
        "out": str(tmp_path / "out"),
        **options,
    }
    if table is not None:
        args["table"] = _write(tmp_path / "table", table)
    command = [str(binary), *(f"{k}={v}" for k, v in args.items())]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    out = tmp_path / "out"
    if op == "embedding_forward":
        return (
            _read(out.with_suffix(".n"), torch.float32, (n, num_bins)),
            _read(out.with_suffix(".p"), torch.float32, (n, num_bins)),
            _read(out.with_suffix(".positives"), torch.int64, (n,)),
        )
    return (
        _read(out.with_suffix(".grad_queries"), queries.dtype, (n, d)),
        _read(out.with_suffix(".grad_database"), database.dtype, (m, d)),
    )


def check_embedding_kernels(binary, tmp_path, n, m, d, dtype, *, same_set=False, self_offset=0,
                            num_bins=20, seed=0, non_finite_queries=(), **options):  # fmt: skip
    """The fused kernels against the score-matrix op on the same scores. `non_finite_queries`:
    queries whose first entry becomes NaN, +inf, NaN, ... (their scores are not finite)."""
    g = torch.Generator().manual_seed(seed)
    database = exact_embeddings(m, d, dtype, g)
    ref_labels = torch.randint(0, 3, (m,), generator=g)
    if same_set:  # the queries are database rows self_offset ... self_offset + n - 1
        queries = database[self_offset : self_offset + n]
        labels = ref_labels[self_offset : self_offset + n]
    else:
        queries = exact_embeddings(n, d, dtype, g)
        labels = torch.randint(0, 3, (n,), generator=g)
    if non_finite_queries:
        queries = queries.clone()
        for k, row in enumerate(non_finite_queries):
            queries[row, 0] = float("nan") if k % 2 == 0 else float("inf")
    common = dict(exclude_self=same_set, self_offset=self_offset, num_bins=num_bins)

    # Exact in fp64, and exactly representable in fp32: the fp32 scores are the kernels' scores,
    # binned by the CPU op in the same precision (and its backward uses the same fp32 table).
    scores = (queries.double() @ database.double().T).float()
    op_args = (None, labels, ref_labels, None, same_set, num_bins, -1.0, 1.0, self_offset)
    expected = torch.ops.fastap.soft_histogram(scores, *op_args)
    poisoned = torch.zeros(n, dtype=torch.bool)
    poisoned[list(non_finite_queries)] = True
    assert torch.equal(expected[0].isnan().any(1), poisoned)  # those rows only, all bins
    got = emulate_embedding(
        binary, tmp_path, queries, database, labels, ref_labels, "embedding_forward",
        **common, **options,
    )  # fmt: skip
    check_forward(got, expected, torch.float32)

    grad_n, grad_p = torch.randn((2, n, num_bins), generator=g)
    problem = random_problem(1, 2, num_bins=num_bins, dtype=torch.float32)  # bins, range, dtype
    table = slope_table(problem, grad_n, grad_p)
    grad_scores = torch.ops.fastap.soft_histogram_backward(grad_n, grad_p, scores, *op_args)
    grad_scores = round_like_matrix_unit(grad_scores.double(), dtype)  # G as the kernels store it
    expected_q = grad_scores @ database.double()
    expected_db = grad_scores.T @ queries.double()
    grad_q, grad_db = emulate_embedding(
        binary, tmp_path, queries, database, labels, ref_labels, "embedding_backward",
        table=table, **common, **options,
    )  # fmt: skip
    # fp32 accumulation, then one rounding to the output dtype.
    for got, want in ((grad_q, expected_q), (grad_db, expected_db)):
        scale = want.nan_to_num(posinf=0, neginf=0).abs().max().clamp_min(1e-30)
        tol = 1e-5 if dtype == torch.float32 else torch.finfo(dtype).eps
        torch.testing.assert_close(got.double() / scale, want / scale, rtol=0, atol=tol,
                                   equal_nan=True)  # fmt: skip


EMBEDDING_SHAPES = [  # (N, M, D, options)
    (1, 1, 1, {}),
    (70, 133, 40, {}),
    (70, 133, 13, {"min_split": 64}),
    (33, 70, 256, {"min_split": 64}),  # the largest D whose own rows stay in shared memory
    (65, 300, 300, {"min_split": 100}),  # D > kAccumulatorWidth: chunks, two column blocks
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,m,d,options", EMBEDDING_SHAPES)
def test_embedding_kernels_equal_the_score_matrix_op(emulators, tmp_path, dtype, n, m, d, options):
    check_embedding_kernels(emulators["address"], tmp_path, n, m, d, dtype, seed=n + d, **options)


# Embeddings off the 16-byte alignment (a view with a storage offset): the tiles are loaded one
# element at a time (load_tile), never in 16-byte vectors or cp.async (which the emulation checks
# for alignment, as a GPU faults on them), with the same results, WMMA and wgmma alike.
@pytest.mark.parametrize("wgmma", [0, 1])
@pytest.mark.parametrize("misaligned", ["queries_offset", "database_offset"])
def test_embedding_kernels_take_misaligned_embeddings(emulators, tmp_path, misaligned, wgmma):
    check_embedding_kernels(emulators["address"], tmp_path, 70, 133, 40, torch.bfloat16,
                            min_split=64, wgmma=wgmma, **{misaligned: 1})  # fmt: skip


# A block's own rows meet their own columns in a step when the two ranges overlap, by as little as
# one pair: with self_offset = 1 own row 63 pairs with the next step's column 0 (queries as own
# rows) and own row 0 with the previous step's column 63 (database as own rows); 63 the other way.
@pytest.mark.parametrize(
    "self_offset,options", [(9, {}), (9, {"min_split": 64}), (1, {}), (63, {"min_split": 64})]
)
def test_embedding_kernels_exclude_self_with_offset(emulators, tmp_path, self_offset, options):
    check_embedding_kernels(emulators["address"], tmp_path, 77, 150, 24, torch.bfloat16,
                            same_set=True, self_offset=self_offset, num_bins=7,
                            **options)  # fmt: skip


# A query with a non-finite embedding has non-finite scores: its histograms are NaN, as the
# score-matrix op's (the other rows' stay finite), and so are its gradients.
@pytest.mark.parametrize("wgmma", [0, 1])
def test_embedding_kernels_poison_rows_with_non_finite_embeddings(emulators, tmp_path, wgmma):
    check_embedding_kernels(emulators["address"], tmp_path, 70, 133, 24, torch.bfloat16,
                            non_finite_queries=(1, 66), wgmma=wgmma)  # fmt: skip


@pytest.mark.parametrize(
    "n,m,d,dtype,options",
    [
        (70, 133, 20, torch.bfloat16, {"min_split": 64}),  # splits, one chunk per step
        (70, 200, 152, torch.bfloat16, {}),  # several chunks and steps: the cp.async pipeline
        (65, 130, 300, torch.float32, {}),  # D > 256: own rows in chunks too
    ],
)
def test_embedding_kernels_have_no_data_races(emulators, tmp_path, n, m, d, dtype, options):
    check_embedding_kernels(emulators["thread"], tmp_path, n, m, d, dtype, num_bins=5, **options)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,m,d,options", [s for s in EMBEDDING_SHAPES if s[2] <= 256])
def test_embedding_kernels_on_wgmma_equal_the_score_matrix_op(emulators, tmp_path, dtype, n, m,
                                                              d, options):  # fmt: skip
    """Both kernels with their products on wgmma (score_tile_wgmma and the backward's gradient
    product, emulated by tests/emulation/wgmma_host.h: descriptors decoded as the PTX ISA
    describes them, operands read when issued and again when waited for)."""
    check_embedding_kernels(emulators["address"], tmp_path, n, m, d, dtype, seed=n + d, wgmma=1,
                            **options)  # fmt: skip


@pytest.mark.parametrize("options", [{}, {"min_split": 64}])
def test_embedding_kernels_on_wgmma_exclude_self_and_races(emulators, tmp_path, options):
    check_embedding_kernels(emulators["thread"], tmp_path, 70, 200, 152, torch.bfloat16,
                            same_set=True, self_offset=9, num_bins=5, wgmma=1,
                            **options)  # fmt: skip


@st.composite
def embedding_kernel_cases(draw):
    """Keyword arguments of check_embedding_kernels: any sizes (D past the accumulator's 256
    columns too), dtype and bins; WMMA or wgmma products; forced splits; the queries a slice of
    the database (self exclusion at any offset); queries with non-finite embeddings; misaligned
    embeddings."""
    n, m = draw(st.integers(1, 130)), draw(st.integers(1, 300))
    d = draw(st.integers(1, 300) | st.sampled_from([8, 16, 64, 128, 256, 257]))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
    case = dict(n=n, m=m, d=d, dtype=dtype, num_bins=draw(st.integers(2, 40)),
                seed=draw(st.integers(0, 2**31 - 1)))  # fmt: skip
    if dtype != torch.float32 and d <= 256 and draw(st.booleans()):
        case["wgmma"] = 1
    if draw(st.booleans()):
        case["min_split"] = draw(st.sampled_from([16, 64, 100]))
    if draw(st.booleans()):
        case.update(n=min(n, m), same_set=True)
        case["self_offset"] = draw(st.integers(0, m - case["n"]))
    if case["n"] > 1 and draw(st.booleans()):
        case["non_finite_queries"] = (0, case["n"] - 1)
    if draw(st.booleans()):  # embeddings off the 16-byte alignment
        case[draw(st.sampled_from(["queries_offset", "database_offset"]))] = draw(st.integers(1, 7))
    return case


@settings(max_examples=RANDOM_EXAMPLES)
@given(embedding_kernel_cases())
def test_embedding_kernels_equal_the_score_matrix_op_on_random_problems(emulators, case):
    with tempfile.TemporaryDirectory() as tmp:
        check_embedding_kernels(emulators["address"], Path(tmp), **case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_python_knows_the_shared_memory_of_the_fused_kernels(emulators, dtype):
    """fastap.embeddings.fused_embedding_shared_bytes (which decides whether the fused path fits
    a GPU) is the formula of SharedLayout in the kernels."""
    for num_bins, depth in ((2, 1), (20, 128), (20, 256), (95, 257), (7, 1000)):
        command = [str(emulators["address"]), "op=embedding_layout", f"dtype={DTYPE_CODES[dtype]}",
                   f"q={num_bins}", f"d={depth}"]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, check=True)
        forward, backward = map(int, result.stdout.split())
        python_formula = fastap.embeddings.fused_embedding_shared_bytes(num_bins, dtype, depth)
        assert python_formula == (forward, backward)


def test_python_knows_the_widest_embeddings_of_the_fused_kernels(emulators):
    """fastap.embeddings.FUSED_MAX_DIM is the kernels' bound, the widest D whose backward grid
    (one block per 256 columns in z) fits CUDA's 65535."""
    command = [str(emulators["address"]), "op=embedding_limits", "dtype=f32"]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    widest, blocks_at_widest, blocks_beyond = map(int, result.stdout.split())
    assert widest == fastap.embeddings.FUSED_MAX_DIM
    assert blocks_at_widest == 65535 and blocks_beyond == 65536
