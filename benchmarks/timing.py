"""The one timer the benchmarks share: CUDA events on a GPU, perf_counter on the CPU; and the
CUDA allocator's peak memory of one call."""

from __future__ import annotations

import statistics
import time

import torch


def time_once_ms(fn, device: str) -> float:
    """Milliseconds of one call of fn (synchronised on CUDA)."""
    if device.startswith("cuda"):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - t0)


def cuda_peak_extra_bytes(fn) -> int:
    """The CUDA allocator's peak over one call of fn minus what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def warm_up(fn, device: str) -> None:
    """Calls fn so that what a process pays once counts in no measurement: for a second, at least
    once, and at most 100 times on the CPU, 5 times on CUDA (synchronised after each call). CUDA
    needs it for lazy initialisation; the CPU also for the first fresh huge pages of the large
    gradients: on the project's virtual machine those took up to ~100 ms more per 64 MB for the
    first several calls of a process, over 12 of them once (docs/design.md, section 5)."""
    cuda = device.startswith("cuda")
    start = time.perf_counter()
    for _ in range(5 if cuda else 100):
        fn()
        if cuda:
            torch.cuda.synchronize()
        if time.perf_counter() - start >= 1.0:
            break


def median_ms(fn, device: str, repeats: int, warmup: bool = True) -> float:
    """Median milliseconds of `repeats` calls, after warm_up."""
    if warmup:
        warm_up(fn, device)
    return statistics.median(time_once_ms(fn, device) for _ in range(repeats))
