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


def warm_up(fn, calls: int = 5, seconds: float = 1.0) -> None:
    """Calls fn until it has run `calls` times or for `seconds`, at least once, so that what a
    process pays once counts in no measurement: lazy initialisation, and on the CPU the first fresh
    huge pages of a large output, which on a virtual machine took up to a few slow calls
    (docs/design.md, section 5)."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
        if time.perf_counter() - start >= seconds:
            break


def median_ms(fn, device: str, repeats: int, warmup: bool = True) -> float:
    """Median milliseconds of `repeats` calls, after warm_up."""
    if warmup:
        warm_up(fn)
    return statistics.median(time_once_ms(fn, device) for _ in range(repeats))
