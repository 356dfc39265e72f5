"""Peak memory of one call above what is allocated when it starts: the CUDA allocator's peak on
a GPU; on Linux CPUs the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs) over its resident set before the call."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .timing import synchronize


def _proc_status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def cpu_peak_supported() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _proc_status_bytes("VmHWM") is not None


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak memory ``fn()`` needs above what is allocated when it starts (None if unmeasurable)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    if not cpu_peak_supported():
        return None
    # The resident set tracks live tensors only if freed memory leaves it and new memory enters
    # it: give back free heap pages first, and serve every allocation of 64 KiB or more with
    # its own mapping (unmapped when freed) while measuring.
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, 1 << 16)
        libc.malloc_trim(0)
    try:
        base = _proc_status_bytes("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set to the current one
        fn()
        peak = _proc_status_bytes("VmHWM")
    finally:
        if libc is not None:
            libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)  # the ceiling glibc's own threshold reaches
    return max(0, peak - base)


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def _libc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt  # noqa: B018  (glibc only)
        libc.malloc_trim  # noqa: B018
        return libc
    except (OSError, AttributeError):
        return None
