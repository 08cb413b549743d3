"""The one timer the benchmarks share: CUDA events on a GPU, perf_counter on the CPU; and the
peak memory of one call (the CUDA allocator's, or the CPU process's resident set)."""

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


def _status_bytes(field: str) -> int:
    """A size field of /proc/self/status (VmRSS, VmHWM), in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def cpu_peak_extra_bytes(fn) -> int:
    """The rise of this process's peak resident set over one call of fn (Linux): the peak is
    reset to the current resident set through /proc/self/clear_refs first. What fn leaves
    resident when it returns counts too."""
    before = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset the peak resident set size
    fn()
    return _status_bytes("VmHWM") - before


def warm_up(fn, device: str) -> None:
    """Calls fn so that what a process pays once counts in no measurement. On the CPU for a
    second, at least once and at most 100 times: the first fresh huge pages of the large gradients
    took up to ~100 ms more per 64 MB for the first several calls of a process on the project's
    virtual machine, over 12 of them once (docs/design.md, section 5). On CUDA for 0.2 s of calls,
    each synchronised, at least one and at most 10,000: lazy initialisation, and an idle GPU's
    clocks (345 MHz seen on the H200 at rest) rising before the timed calls, which a few calls of
    a kernel of microseconds would not bring about."""
    cuda = device.startswith("cuda")
    seconds, most = (0.2, 10_000) if cuda else (1.0, 100)
    start = time.perf_counter()
    for _ in range(most):
        fn()
        if cuda:
            torch.cuda.synchronize()
        if time.perf_counter() - start >= seconds:
            break


def median_ms(fn, device: str, repeats: int, warmup: bool = True) -> float:
    """Median milliseconds of `repeats` calls, after warm_up."""
    if warmup:
        warm_up(fn, device)
    return statistics.median(time_once_ms(fn, device) for _ in range(repeats))
