"""Forward+backward time and peak extra memory of the AP loss, fastap against the pure-PyTorch
reference (the authors' N x Q x M formulation) and, when installed, pytorch-metric-learning's
FastAPLoss, all measured in the same run.

Two kinds of rows:
  scores      loss on a given N x N score matrix (labels, exclude_self): fastap.ap_loss vs
              fastap.reference.ap_loss. The op itself.
  embeddings  loss on N x D embeddings (D = 128), the way pytorch-metric-learning losses are
              called: fastap.FastAPLoss vs PML's FastAPLoss, same num_bins (both compute the
              distances themselves).

Each case runs in a fresh process. Time: median of --repeats runs after a warm-up
(timing.warm_up; CUDA: CUDA events). Peak extra memory: the peak over one more forward+backward
minus what was allocated before it. CUDA: torch.cuda.max_memory_allocated, reset after the
timing runs, in the same process; CPU: the peak resident set, reset through
/proc/self/clear_refs, in a process of its own with glibc told to map each large allocation on
its own.

    python benchmarks/bench_ap_loss.py --device cpu --sizes 512 1024 2048 4096
    python benchmarks/bench_ap_loss.py --device cuda --sizes 1024 4096 8192 16384 32768
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time

import torch
from timing import cpu_peak_extra_bytes, cuda_peak_extra_bytes, time_once_ms, warm_up

# The dimension of the embedding cases (bench_embeddings.py sets it for its child processes).
EMBEDDING_DIM = int(os.environ.get("FASTAP_BENCH_DIM", "128"))


def _make_case(name: str, n: int, num_bins: int, dtype: torch.dtype, device: str):
    """Inputs and a function running one forward+backward of case `name`."""
    import fastap

    g = torch.Generator(device="cpu").manual_seed(0)
    labels = torch.randint(0, max(2, n // 8), (n,), generator=g).to(device)
    if name in ("fastap", "reference"):
        # (On the device: on the CPU a 32768^2 matrix took seconds to draw and copy, in each of
        # the processes that measure it.)
        on_device = torch.Generator(device=device).manual_seed(0)
        scores = torch.rand(n, n, generator=on_device, device=device).mul_(2).sub_(1).to(dtype)
        scores.requires_grad_()
        loss_fn = fastap.ap_loss if name == "fastap" else fastap.reference.ap_loss

        def run():
            loss = loss_fn(scores, labels=labels, num_bins=num_bins, exclude_self=True)
            return torch.autograd.grad(loss, scores)[0]

        return run
    embeddings = torch.randn(n, EMBEDDING_DIM, generator=g).to(device=device, dtype=dtype)
    if name == "gemm_floor":
        # The four N x N x D products of a from-embeddings forward+backward (scores twice, dQ,
        # dDB) with torch's matmul (cuBLAS), on an N x N buffer: the matrix-unit floor.
        other = torch.randn_like(embeddings)
        buffer = torch.empty(n, n, device=device, dtype=dtype)

        def run():
            torch.matmul(embeddings, other.T, out=buffer)
            torch.matmul(embeddings, other.T, out=buffer)
            torch.matmul(buffer, other)
            return torch.matmul(buffer.T, embeddings)

        return run
    embeddings.requires_grad_()
    if name == "fastap_emb":
        loss_fn = fastap.FastAPLoss(num_bins=num_bins)
    elif name == "fastap_aploss_emb":
        # The score-matrix path at every N (by default APLoss leaves it above 1 GiB of scores).
        loss_fn = fastap.APLoss(num_bins=num_bins, score_matrix_limit=2**62)
    elif name == "reference_emb":

        def loss_fn(embeddings, labels):
            unit = torch.nn.functional.normalize(embeddings, dim=1)
            scores = unit @ unit.T  # as fastap.APLoss computes them
            return fastap.reference.ap_loss(
                scores, labels=labels, num_bins=num_bins, exclude_self=True
            )
    elif name in ("fastap_blocked_emb", "fastap_fused_emb"):
        backend = "fused" if name == "fastap_fused_emb" else "blockwise"

        def loss_fn(embeddings, labels):
            return fastap.ap_loss_from_embeddings(
                embeddings, labels=labels, num_bins=num_bins, backend=backend
            )

    else:
        from pytorch_metric_learning.losses import FastAPLoss

        loss_fn = FastAPLoss(num_bins=num_bins)

    def run():
        return torch.autograd.grad(loss_fn(embeddings, labels), embeddings)[0]

    return run


def _measure(name, n, num_bins, dtype_name, device, repeats, modes, queue):
    """In a fresh process, after a warm-up: "time" in `modes` gives the median and min of
    `repeats` runs, "memory" the peak extra bytes of one more run."""
    result = {}
    try:
        torch.manual_seed(0)
        run = _make_case(name, n, num_bins, getattr(torch, dtype_name), device)
        cuda = device.startswith("cuda")
        warm_up(run, device)  # what a process pays once counts neither as time nor as memory
        if "time" in modes:
            times = [time_once_ms(run, device) for _ in range(repeats)]
            result.update(ms=statistics.median(times), min_ms=min(times))
        if "memory" in modes and cuda:
            result["peak_bytes"] = cuda_peak_extra_bytes(run)
        elif "memory" in modes:
            result["peak_bytes"] = cpu_peak_extra_bytes(run)
    except torch.OutOfMemoryError:
        result["error" if "ms" not in result else "memory_error"] = "out of memory"
    except Exception as error:  # reported in the table, never hidden
        message = f"{type(error).__name__}: {error}"[:80]
        result["error" if "ms" not in result else "memory_error"] = message
    queue.put(result)


def _in_child(args, timeout, env):
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        context = multiprocessing.get_context("spawn")
        queue = context.Queue()
        process = context.Process(target=_measure, args=(*args, queue))
        process.start()
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    # Polled, so that a child that dies without a word (a segfault, an abort, the OOM killer)
    # costs a second, not the whole timeout.
    result = None
    deadline = time.monotonic() + timeout
    while result is None and time.monotonic() < deadline:
        try:
            result = queue.get(timeout=1)
        except Exception:  # queue.Empty
            if not process.is_alive():
                try:
                    result = queue.get_nowait()
                except Exception:
                    result = {"error": f"the measuring process died (exit code {process.exitcode})"}
    if result is None:
        result = {"error": f"no result within {timeout:.0f} s"}
    process.join(5)
    if process.is_alive():
        process.kill()
    return result


def measure(name, n, num_bins, dtype_name, device, repeats, timeout):
    """Time and peak memory of one case, from a fresh process: on CUDA the same one (the
    allocator's peak is reset between them), on the CPU two, because the resident set of the
    timing runs would stay in the memory run's."""
    common = (name, n, num_bins, dtype_name, device, repeats)
    if device.startswith("cuda"):
        return _in_child((*common, ("time", "memory")), timeout, {})
    timing = _in_child((*common, ("time",)), timeout, {})
    if "error" in timing:
        return timing
    # For the memory run, every allocation of 64 KiB or more gets its own mapping, returned on
    # free, so that the resident set follows the live tensors instead of glibc's reused heap.
    memory = _in_child((*common, ("memory",)), timeout, {"MALLOC_MMAP_THRESHOLD_": str(64 * 1024)})
    if "error" in memory:
        return {**timing, "memory_error": memory["error"]}
    return {**timing, **memory}


def have_pml() -> bool:
    try:
        import pytorch_metric_learning  # noqa: F401
    except ImportError:
        return False
    return True


def fmt(result) -> str:
    if "error" in result:
        return result["error"]
    memory = result.get("peak_bytes")
    shown = f"memory: {result['memory_error']}" if memory is None else f"{memory / 2**20:.0f} MB"
    return f"{result['ms']:.3g} ms, {shown}"


def ratio(slow, fast) -> str:
    if "error" in slow or "error" in fast:
        return "-"
    return f"{slow['ms'] / fast['ms']:.0f}x"


def write_json(path: str, data: dict) -> None:
    """Writes `data` to `path` whole or not at all (through a temporary file), so that a run cut
    short leaves the previous complete file, which a later run may add to."""
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(path + ".tmp", path)


def environment(device: str) -> dict:
    # FASTAP_COMMIT names the commit where the tree has no git (the GPU machine gets a copy of
    # the working tree, without .git, and may have no git at all: benchmarks/gpu_check.sh).
    commit = os.environ.get("FASTAP_COMMIT", "")
    if not commit:
        try:
            commit = subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                check=False,
            ).stdout.strip()  # fmt: skip
        except OSError:
            commit = ""
    return {
        "date": time.strftime("%Y-%m-%d"),
        "device": torch.cuda.get_device_name()
        if device.startswith("cuda")
        else f"CPU, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "commit": commit or "unknown",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--num-bins", type=int, default=20)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--reference-repeats", type=int, default=1)
    parser.add_argument(
        "--reference-max",
        type=int,
        default=4096,
        help="largest N for the reference and PML (they need O(N*Q*N) memory)",
    )
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()

    env = environment(args.device)
    pml = have_pml()
    print(
        f"# {env['date']}, {env['device']}, torch {env['torch']}, commit {env['commit']}, "
        f"{args.dtype}, Q = {args.num_bins}, fwd+bwd"
    )
    header = "| N | fastap.ap_loss | reference.ap_loss | speed-up |"
    if pml:
        header += " fastap.FastAPLoss (emb) | PML FastAPLoss (emb) | speed-up |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    rows = []
    for n in args.sizes:
        common = (n, args.num_bins, args.dtype, args.device)
        ours = measure("fastap", *common, args.repeats, args.timeout)
        small = n <= args.reference_max
        skipped = {"error": "skipped (--reference-max)"}
        ref = (
            measure("reference", *common, args.reference_repeats, args.timeout)
            if small
            else skipped
        )
        row = {"n": n, "fastap": ours, "reference": ref}
        line = f"| {n} | {fmt(ours)} | {fmt(ref)} | {ratio(ref, ours)} |"
        if pml:
            ours_emb = measure("fastap_emb", *common, args.repeats, args.timeout)
            theirs = (
                measure("pml", *common, args.reference_repeats, args.timeout) if small else skipped
            )
            row.update({"fastap_emb": ours_emb, "pml": theirs})
            line += f" {fmt(ours_emb)} | {fmt(theirs)} | {ratio(theirs, ours_emb)} |"
        print(line, flush=True)
        rows.append(row)
        if args.json:  # after every row, so that a later row's hang or fault loses only itself
            write_json(args.json, {"env": env, "args": vars(args), "rows": rows})


if __name__ == "__main__":
    sys.exit(main())
