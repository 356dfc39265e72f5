"""Timing, memory and accuracy measurement for one benchmark cell.

A cell is (mode, dtype, tokens, vocab).  For each contender the harness measures:

* time: on CUDA the median of CUDA-event timings (``triton.testing.do_bench``); on the CPU the
  median of repeated wall-clock runs after a warm-up.  Compilation is reported apart.
* bandwidth: the fewest bytes the mode must move (``min_bytes``) over the time, and that as a
  percentage of the device's copy bandwidth measured in the same run.
* peak memory above the inputs: ``torch.cuda.max_memory_allocated`` on CUDA; on Linux CPUs the
  process's peak resident set (VmHWM, reset through /proc/self/clear_refs) over its resident set
  before the step.
* error: the loss against a float64 reference, and the gradient on a sample of rows.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from fusedce.testing import make_logits, make_targets, reference_cross_entropy, rel_err

from .contenders import Contender

MODES = {
    "fwd": "forward only, no gradient",
    "fwd_bwd": "forward + backward, mean, grad_output = 1",
    "fwd_bwd_scaled": "forward + backward, mean, grad_output = 1/8 (gradient accumulation)",
    "none_bwd": "forward + backward, reduction='none', random per-token grad_output",
}
ACCUMULATION_SCALE = 1.0 / 8


def min_bytes(mode: str, n_rows: int, n_cols: int, dtype: torch.dtype) -> int:
    """The fewest bytes a mode must move through memory.

    I/O: forward only reads the logits once; with a backward, the logits are read once and their
    gradient written once.  Targets and per-row outputs are negligible and not counted.
    """
    logits_bytes = n_rows * n_cols * torch.empty((), dtype=dtype).element_size()
    return logits_bytes if mode == "fwd" else 2 * logits_bytes


# ----------------------------------------------------------------------------------------------
# Device facts


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "cpu"


def device_slug(device: torch.device) -> str:
    """A folder name for the device: lower case, words joined by '-'."""
    name = device_name(device).lower()
    if device.type == "cpu" and not name.startswith("cpu"):
        name = "cpu " + name
    for noise in ("(r)", "(tm)", "cpu @", "@"):
        name = name.replace(noise, " ")
    words = "".join(ch if ch.isalnum() or ch == "." else " " for ch in name).split()
    return "-".join(words)[:60]


def cache_bytes(device: torch.device) -> int:
    """The last-level cache a repeated run could be served from."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    best = 32 << 20
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            with open(os.path.join(base, entry, "size")) as f:
                text = f.read().strip()
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
            size = int(text.rstrip("KMG")) * scale
            best = max(best, size) if size > (1 << 20) else best
    except (OSError, ValueError):
        pass
    return best


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time_s(fn: Callable[[], object], device: torch.device, *,
                  setup: Callable[[], object] | None = None, cpu_reps: int = 5) -> float:
    """Median seconds of ``fn()``, excluding ``setup()`` (run before each timed call) and warm-up.

    On CUDA without setup: ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls).
    On CUDA with setup: the same method by hand, events around ``fn`` alone.
    On the CPU: wall clock after one warm-up call.
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
    times = []
    for i in range(cpu_reps + 1):
        if setup is not None:
            setup()
        t0 = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - t0
        if i > 0:  # the first call is the warm-up
            times.append(elapsed)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, n_bytes: int | None = None) -> float:
    """Bytes per second of a large device-memory copy, counting bytes read plus bytes written."""
    if n_bytes is None:
        n_bytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.randn(n_bytes // 4, device=device)
    dst = torch.empty_like(src)
    seconds = median_time_s(lambda: dst.copy_(src), device, cpu_reps=7)
    return 2 * n_bytes / seconds


# ----------------------------------------------------------------------------------------------
# Memory


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


# ----------------------------------------------------------------------------------------------
# One cell


@dataclasses.dataclass
class Result:
    mode: str
    dtype: str
    tokens: int
    vocab: int
    contender: str
    status: str  # "ok", "skipped: why", "oom", "error: what"
    ms: float | None = None
    gbps: float | None = None
    pct_copy_bw: float | None = None
    peak_extra_mib: float | None = None
    peak_extra_pct_logits: float | None = None
    compile_s: float | None = None
    loss_err: float | None = None
    grad_err: float | None = None
    speedup_vs_eager: float | None = None  # linear workloads: against the unfused path
    input_sets: int = 1
    hidden: int | None = None  # linear workloads only
    tflops: float | None = None  # linear workloads only


class Cell:
    """Inputs and the float64 reference of one (mode, dtype, tokens, vocab)."""

    def __init__(self, mode: str, dtype: torch.dtype, n_rows: int, n_cols: int,
                 device: torch.device, generator: torch.Generator):
        self.mode, self.dtype, self.n_rows, self.n_cols, self.device = (
            mode, dtype, n_rows, n_cols, device)
        logits_bytes = n_rows * n_cols * torch.empty((), dtype=dtype).element_size()
        # Rotate several input sets when one would fit in the cache, so runs are not served
        # from it.
        self.n_sets = max(1, min(8, math.ceil(4 * cache_bytes(device) / logits_bytes)))
        self.logits = [make_logits(n_rows, n_cols, dtype, device, generator=generator)
                       for _ in range(self.n_sets)]
        self.targets = [make_targets(n_rows, n_cols, device, generator=generator)
                        for _ in range(self.n_sets)]
        self.grad_output = None
        if mode == "none_bwd":
            self.grad_output = torch.rand(n_rows, generator=generator).to(device, dtype)
        elif mode == "fwd_bwd_scaled":
            self.grad_output = torch.tensor(ACCUMULATION_SCALE, device=device, dtype=dtype)
        self.reduction = "none" if mode == "none_bwd" else "mean"
        self.sample_rows = torch.linspace(0, n_rows - 1, min(n_rows, 32)).long().unique()
        self._reference = None

    @property
    def logits_bytes(self) -> int:
        return self.logits[0].numel() * self.logits[0].element_size()

    def reference(self) -> tuple[Tensor, Tensor | None]:
        """float64 loss of set 0 (over all rows) and the gradient of the sampled rows."""
        if self._reference is None:
            x, t = self.logits[0], self.targets[0]
            # Per-row losses in float64 on the device, a slice of rows at a time.
            per_row = torch.empty(self.n_rows, dtype=torch.float64, device=self.device)
            step = max(1, (1 << 24) // self.n_cols)
            for r0 in range(0, self.n_rows, step):
                per_row[r0:r0 + step] = F.cross_entropy(
                    x[r0:r0 + step].double(), t[r0:r0 + step], reduction="none")
            loss = per_row if self.reduction == "none" else per_row.mean()
            grad = None
            if self.mode != "fwd":
                rows = self.sample_rows
                if self.mode == "none_bwd":
                    go = self.grad_output[rows].double().cpu()
                else:
                    go = 1.0 if self.grad_output is None else float(self.grad_output)
                    go = torch.tensor(go / self.n_rows, dtype=torch.float64)
                _, grad = reference_cross_entropy(
                    x[rows], t[rows], reduction="none" if go.dim() else "sum", grad_output=go)
            self._reference = (loss, grad)
        return self._reference


def run_contender(cell: Cell, contender: Contender, loss_fn, bandwidth: float) -> Result:
    """Measure one contender on one cell (inputs restored between calls when consumed)."""
    res = Result(cell.mode, str(cell.dtype).replace("torch.", ""), cell.n_rows, cell.n_cols,
                 contender.name, "ok", input_sets=cell.n_sets)
    backward = cell.mode != "fwd"
    if contender.inplace and not backward:
        res.status = "skipped: in-place backward needs a backward"
        return res
    # Contenders that consume their logits get copies; the others share the cell's storage.
    leaves = [(x.detach().clone() if contender.inplace else x.detach()).requires_grad_(backward)
              for x in cell.logits]
    pristine = cell.logits if contender.inplace else None
    state = {"i": 0}

    def step(index: int | None = None) -> Tensor:
        i = state["i"] if index is None else index
        state["i"] = (i + 1) % cell.n_sets
        leaf, target = leaves[i], cell.targets[i]
        if not backward:
            with torch.no_grad():
                return loss_fn(leaf, target, cell.reduction)
        leaf.grad = None
        loss = loss_fn(leaf, target, cell.reduction)
        loss.backward(cell.grad_output)
        return loss

    def restore() -> None:
        i = state["i"]
        with torch.no_grad():
            leaves[i].copy_(pristine[i])

    setup = restore if contender.inplace else None
    try:
        # 1. First call: compilation (if any), and the outputs for the error check.
        state["i"] = 0
        if setup:
            setup()
        synchronize(cell.device)
        t0 = time.perf_counter()
        loss = step(0)
        synchronize(cell.device)
        first_s = time.perf_counter() - t0
        ref_loss, ref_grad = cell.reference()
        res.loss_err = rel_err(loss.float(), ref_loss)
        if backward:
            res.grad_err = rel_err(leaves[0].grad[cell.sample_rows].float(), ref_grad)
        del loss
        # 2. Peak memory of a warmed-up call (first calls also pay one-time set-up costs).
        state["i"] = 0
        if setup:
            setup()
        if backward:
            leaves[0].grad = None
        peak = peak_extra_bytes(lambda: step(0), cell.device)
        if peak is not None:
            res.peak_extra_mib = peak / 2**20
            res.peak_extra_pct_logits = 100.0 * peak / cell.logits_bytes
        # 2. Steady-state timing.
        state["i"] = 0
        seconds = median_time_s(step, cell.device, setup=setup)
        if contender.compiled:
            res.compile_s = max(0.0, first_s - seconds)
        res.ms = seconds * 1e3
        res.gbps = min_bytes(cell.mode, cell.n_rows, cell.n_cols, cell.dtype) / seconds / 1e9
        res.pct_copy_bw = 100.0 * res.gbps * 1e9 / bandwidth
    except torch.OutOfMemoryError:
        res = dataclasses.replace(res, status="oom", ms=None, gbps=None, pct_copy_bw=None)
    except Exception as exc:  # a peer failing on a shape is a result, not a crash
        res.status = f"error: {type(exc).__name__}: {exc}".splitlines()[0][:200]
        res.ms = res.gbps = res.pct_copy_bw = None
    finally:
        del leaves
        if cell.device.type == "cuda":
            torch.cuda.empty_cache()
    return res
