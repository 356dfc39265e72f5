"""One benchmark cell and the measurement sequence every cell shares.

A cross-entropy cell is (mode, dtype, tokens, vocab).  For each contender ``measure`` takes:

* the first call (compilation, if any, reported apart) and its outputs for the error check: the
  loss against a float64 reference, and the gradient on a sample of rows;
* peak memory above the inputs of a warmed-up call (``bench.memory``);
* steady-state time (``bench.timing``): the fewest bytes the mode must move (``min_bytes``) over
  it, and that as a percentage of the device's copy bandwidth measured in the same run.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from fusedce.testing import make_logits, make_targets, reference_cross_entropy, rel_err

from .contenders import Contender
from .device import cache_bytes
from .memory import peak_extra_bytes
from .timing import median_time_s, synchronize

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


def measure(res: Result, step: Callable[[], Tensor], device: torch.device, *,
            prepare: Callable[[], None], check: Callable[[Tensor], None],
            setup: Callable[[], None] | None = None, compiled: bool = False,
            cpu_reps: int = 5) -> float | None:
    """Measure ``step`` into ``res``: first call and ``check`` of its output, peak memory of a
    warmed-up call, steady-state median time (returned, in seconds; None on failure).

    ``prepare`` runs before each phase (it resets input rotation and restores consumed
    inputs); ``setup`` before each timed call, outside the timing.  A contender failing on a
    shape is a result (its status says why), not a crash.
    """
    try:
        prepare()
        synchronize(device)
        t0 = time.perf_counter()
        out = step()
        synchronize(device)
        first_s = time.perf_counter() - t0
        check(out)
        del out
        prepare()
        peak = peak_extra_bytes(step, device)
        if peak is not None:
            res.peak_extra_mib = peak / 2**20
        prepare()
        seconds = median_time_s(step, device, setup=setup, cpu_reps=cpu_reps)
        res.ms = seconds * 1e3
        if compiled:
            res.compile_s = max(0.0, first_s - seconds)
        return seconds
    except torch.OutOfMemoryError:
        res.status = "oom"
    except Exception as exc:
        res.status = f"error: {type(exc).__name__}: {exc}".splitlines()[0][:200]
    res.ms = None
    return None


def run_contender(cell: Cell, contender: Contender, loss_fn, bandwidth: float) -> Result:
    """Measure one contender on one cross-entropy cell (inputs restored between calls when
    consumed)."""
    res = Result(cell.mode, str(cell.dtype).replace("torch.", ""), cell.n_rows, cell.n_cols,
                 contender.name, "ok", input_sets=cell.n_sets)
    backward = cell.mode != "fwd"
    if contender.inplace and not backward:
        res.status = "skipped: in-place backward needs a backward"
        return res
    # Contenders that consume their logits get copies; the others share the cell's storage.
    leaves = [(x.detach().clone() if contender.inplace else x.detach()).requires_grad_(backward)
              for x in cell.logits]
    state = {"i": 0}

    def step() -> Tensor:
        i = state["i"]
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
        if contender.inplace:
            with torch.no_grad():
                leaves[state["i"]].copy_(cell.logits[state["i"]])

    def prepare() -> None:
        state["i"] = 0
        restore()
        leaves[0].grad = None

    def check(loss: Tensor) -> None:
        ref_loss, ref_grad = cell.reference()
        res.loss_err = rel_err(loss.float(), ref_loss)
        if backward:
            res.grad_err = rel_err(leaves[0].grad[cell.sample_rows].float(), ref_grad)

    seconds = measure(res, step, cell.device, prepare=prepare, check=check,
                      setup=restore if contender.inplace else None, compiled=contender.compiled)
    if seconds is not None:
        res.gbps = min_bytes(cell.mode, cell.n_rows, cell.n_cols, cell.dtype) / seconds / 1e9
        res.pct_copy_bw = 100.0 * res.gbps * 1e9 / bandwidth
        if res.peak_extra_mib is not None:
            res.peak_extra_pct_logits = 100.0 * res.peak_extra_mib * 2**20 / cell.logits_bytes
    leaves.clear()
    if cell.device.type == "cuda":
        torch.cuda.empty_cache()
    return res
