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


def median_ms(fn, device: str, repeats: int, warmup: bool = True) -> float:
    """Median milliseconds of `repeats` calls, after one warm-up call."""
    if warmup:
        fn()
    return statistics.median(time_once_ms(fn, device) for _ in range(repeats))
