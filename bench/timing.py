"""Timing: CUDA events (``triton.testing.do_bench``, median) on a GPU, the median of repeated
wall-clock runs after a warm-up on the CPU; and the device's copy bandwidth measured the same
way."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time_s(fn: Callable[[], object], device: torch.device, *,
                  setup: Callable[[], object] | None = None, cpu_reps: int = 5) -> float:
    """Median seconds of ``fn()``, excluding ``setup()`` (run before each timed call) and warm-up.

    On CUDA without setup: ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls).
    On CUDA with setup: the same method by hand, events around ``fn`` alone.
    On the CPU: wall clock after one warm-up call, at least ``cpu_reps`` calls and more for
    short ones (``CPU_BUDGET_S``).
    """
    if device.type == "cuda":
        import triton.testing

        if setup is None:
            return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median") / 1e3
        for _ in range(3):
            setup()
            fn()
        times = []
        for _ in range(20):
            setup()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)
    times: list[float] = []
    first = True
    while len(times) < cpu_reps or (sum(times) < CPU_BUDGET_S and len(times) < CPU_MAX_REPS):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - t0
        if not first:  # the first call is the warm-up
            times.append(elapsed)
        first = False
    return statistics.median(times)


# On the CPU a call is repeated at least ``cpu_reps`` times, and more (up to CPU_MAX_REPS) until
# the timed calls add up to CPU_BUDGET_S: a shared machine's noise moves the median of five
# millisecond-scale calls by 10-30%, and a longer window is cheap for them.
CPU_BUDGET_S = 0.5
CPU_MAX_REPS = 50


def copy_bandwidth(device: torch.device, n_bytes: int | None = None) -> float:
    """Bytes per second of a large device-memory copy, counting bytes read plus bytes written."""
    if n_bytes is None:
        n_bytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.randn(n_bytes // 4, device=device)
    dst = torch.empty_like(src)
    seconds = median_time_s(lambda: dst.copy_(src), device, cpu_reps=7)
    return 2 * n_bytes / seconds
