"""PyTorch launch wrappers of the Triton cross-entropy kernels (``cross_entropy_kernels``).

They take and return tensors, know nothing of autograd, and read their options from a
``fusedce.spec.LossSpec``.  The gradient is written by the launch that computes the loss,
already multiplied by a scale read from device memory (no host synchronisation); ``ce_bwd`` only
applies ``grad_output``, and skips rows whose factor is exactly 1.  When there are few rows, each
row's vocabulary is split into contiguous chunks handled by separate programs:
``ce_stats_kernel`` writes each chunk's partial statistics and ``ce_fwd_kernel`` merges a row's
partials before computing the loss and its chunk of gradient.
"""

from __future__ import annotations

import contextlib
import os
from typing import NamedTuple

import torch
import triton

from ..spec import LossSpec, RowResults, RowStats, VocabSlice
from .cross_entropy_kernels import (
    ce_bwd_kernel,
    ce_fwd_kernel,
    ce_reduce_kernel,
    ce_scale_kernel,
    ce_stats_kernel,
)

# The interpreter (TRITON_INTERPRET=1) is chosen by Triton when a kernel is decorated, that is
# when this module is imported; record it so the dispatcher can tell whether CPU tensors can be
# launched on.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class LaunchConfig(NamedTuple):
    """How ``ce_fwd`` tiles the problem."""

    block_size: int  # columns per load
    num_warps: int
    n_splits: int  # programs per row
    cols_per_split: int  # columns per program, a multiple of block_size


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the interpreter: any fixed number keeps launches reproducible


# Rows in flight between a row's two reads, per SM, that keep the second read in L2: half of an
# H100's or H200's 50 MB over its 132 SMs (the static model in ``bench/model`` gives the hit
# rate's curve: ~1 at half the cache, 0.92 at 68%).
_L2_ROW_BYTES_PER_SM = 25_000_000 // 132
_WARPS_PER_SM = 32  # 1024 threads of at most 64 registers: the register file's limit


def launch_config(
    n_rows: int,
    n_cols: int,
    device: torch.device,
    *,
    block_size: int | None = None,
    n_splits: int | None = None,
    batch_invariant: bool = False,
    element_size: int = 4,
    lanes: int = 2,
    rereads: bool = True,
) -> LaunchConfig:
    """Choose block size, warps and vocabulary split for an ``(n_rows, n_cols)`` problem.

    Heuristic: each thread holds 16 columns of a block (8 when the statistics keep more than
    three running vectors, ``lanes``: max and sum, plus the smoothing sum, argmax or entropy;
    16 of each would pass the 64-register cap and spill).  A program that reads its row twice
    (``rereads``: statistics, then the gradient) uses the fewest warps, between 4 and 32, whose
    rows in flight (32 warps per SM divided among the programs, each holding a row of
    ``n_cols * element_size`` bytes) stay within ``_L2_ROW_BYTES_PER_SM``, so the second read
    hits L2: 32 warps (one row per SM) at 128256 classes, 16 at 32000 in bf16.  A program that
    reads its row once uses 4 warps: fewer threads per row spend less on the reductions and the
    masked tail outside the loop.  A block never exceeds the row (rounded up to a power of
    two).  The vocabulary is split across programs only when there are fewer than four rows
    per SM, so that every SM gets work; a chunk is never smaller than four blocks.
    ``block_size`` and ``n_splits`` override the heuristic (tests use them to reach the
    multi-block and split paths at small sizes).  ``batch_invariant`` never splits by the row
    count, and its tiling depends on ``n_cols`` and the dtype (and the overrides) alone, not on
    the mode: a row's results do not depend on how many rows there are, and a forward-only
    call (log-probabilities of a rollout) agrees bitwise with the training pass.
    """
    if batch_invariant:  # one plan per width and dtype, whatever the mode
        lanes, rereads = 4, True
    per_thread = 16 if lanes <= 3 else 8
    if block_size is None:
        warps = _WARPS_PER_SM if rereads else 4
        row_bytes = max(n_cols, 1) * element_size
        while rereads and warps > 4 and \
                _WARPS_PER_SM // (warps // 2) * row_bytes <= _L2_ROW_BYTES_PER_SM:
            warps //= 2
        block_size = min(triton.next_power_of_2(max(n_cols, 1)), warps * 32 * per_thread)
    elif block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    n_blocks = triton.cdiv(max(n_cols, 1), block_size)
    if n_splits is None:
        target_programs = 4 * _num_sms(device)
        n_splits = 1
        if n_rows < target_programs and not batch_invariant:
            n_splits = max(1, min(triton.cdiv(target_programs, max(n_rows, 1)), n_blocks // 4))
    elif n_splits < 1:
        raise ValueError(f"n_splits must be at least 1, got {n_splits}")
    n_splits = min(n_splits, n_blocks)
    # Round the chunk up to whole blocks, then drop splits that would be empty.
    cols_per_split = triton.cdiv(n_blocks, n_splits) * block_size
    n_splits = triton.cdiv(max(n_cols, 1), cols_per_split)
    num_warps = min(32, max(4, block_size // (32 * per_thread)))
    return LaunchConfig(block_size, num_warps, n_splits, cols_per_split)


def _dense(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` laid out densely in row-major order (a copy only when it is not already).

    The kernels index every tensor but the logits and the gradient by a flat element offset
    (``target_ptr + row``, ``weight_ptr + col``, ``partial_ptr + (k * n_rows + row) * P``):
    a strided view (``labels[::2]``, a column ``labels[:, 0]``, an expanded ``grad_output``)
    would be read at the wrong elements.  Each such tensor is O(rows) or O(classes), so the copy
    is negligible beside the logits; the logits and the gradient take their row stride."""
    return t if t is None or t.is_contiguous() else t.contiguous()


class Rows(NamedTuple):
    """How the kernels address the rows of logits (or of their gradient): (N, C), or (G, T, C)
    groups of rows read where they are (``logits[:, :-1]``, transposed (..., T, C) logits)."""

    n_rows: int
    n_cols: int
    stride_row: int
    stride_group: int
    per_group: int  # rows per group (N for one group)


def rows_of(name: str, t: torch.Tensor) -> Rows:
    """The row layout of (N, C) or (G, T, C) ``t``, which needs a unit column stride."""
    if t.dim() not in (2, 3) or (t.shape[-1] > 1 and t.stride(-1) != 1):
        raise ValueError(f"{name} must be (N, C) or (G, T, C) with a unit column stride, got "
                         f"shape {tuple(t.shape)} and strides {t.stride()}")
    if t.dim() == 2:
        return Rows(t.shape[0], t.shape[1], t.stride(0), 0, max(t.shape[0], 1))
    return Rows(t.shape[0] * t.shape[1], t.shape[2], t.stride(1), t.stride(0),
                max(t.shape[1], 1))


def _flags(weight: torch.Tensor | None, spec: LossSpec) -> dict:
    return dict(HAS_WEIGHT=weight is not None, HAS_SMOOTHING=spec.has_smoothing,
                HAS_SCALE=spec.has_scale, HAS_SOFTCAP=spec.has_softcap,
                RETURN_STATS=spec.return_stats, HAS_ENTROPY=spec.has_entropy)


# Forced tiling (None: the heuristic), for tests that reach the multi-block and split-vocabulary
# paths at sizes the interpreter can afford: ``set_tiling`` or ``with tiling(...)``.
_TILING: dict[str, int | None] = {"block_size": None, "n_splits": None}


def set_tiling(block_size: int | None = None, n_splits: int | None = None) -> dict:
    """Force ``block_size`` and ``n_splits`` on every later launch (None: the heuristic);
    returns the previous setting.  Not an option of the loss: a knob for tests."""
    previous = dict(_TILING)
    _TILING.update(block_size=block_size, n_splits=n_splits)
    return previous


@contextlib.contextmanager
def tiling(block_size: int | None = None, n_splits: int | None = None):
    """``set_tiling`` for the launches inside the ``with`` block."""
    previous = set_tiling(block_size, n_splits)
    try:
        yield
    finally:
        _TILING.update(previous)


def _config(logits: torch.Tensor, spec: LossSpec, n_splits: int | None = None, *,
            rereads: bool = False) -> LaunchConfig:
    n_rows, n_cols = rows_of("logits", logits)[:2]
    lanes = 2 + spec.has_smoothing + spec.return_stats + spec.has_entropy
    return launch_config(n_rows, n_cols, logits.device, block_size=_TILING["block_size"],
                         n_splits=n_splits if n_splits is not None else _TILING["n_splits"],
                         batch_invariant=spec.batch_invariant,
                         element_size=logits.element_size(), lanes=lanes, rereads=rereads)


def _options(spec: LossSpec) -> dict:
    return dict(logit_scale=float(spec.logit_scale),
                softcap=float(spec.softcap) if spec.has_softcap else 1.0)


def ce_row_stats(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    spec: LossSpec,
    *,
    n_splits: int | None = None,
) -> RowStats:
    """Partial statistics of each row's (transformed) logits: one pass that reads them once.

    Args:
        logits: (N, C) float32/bfloat16/float16, unit column stride (any row stride), or
            (G, T, C) groups of rows (any group and row strides, see ``Rows``).
        target: (N,) int64 class ids; ignored rows read nothing and give (min, 0, 0).
        weight: (C,) float32 class weights of these columns, or None.
        spec: the options (``set_tiling`` forces the tiling).
        n_splits: overrides ``spec.n_splits`` (1 gives one partial per row).

    Returns:
        ``RowStats`` with one partial per vocabulary chunk; argmax columns local to ``logits``.
    """
    layout = rows_of("logits", logits)
    n_rows, n_cols = layout.n_rows, layout.n_cols
    device = logits.device
    target, weight = _dense(target), _dense(weight)
    cfg = _config(logits, spec, n_splits)
    partials = torch.empty(4, n_rows, cfg.n_splits, dtype=torch.float32, device=device)
    argmax = torch.empty((n_rows, cfg.n_splits) if spec.return_stats else (0,),
                         dtype=torch.int32, device=device)
    if n_rows:
        ce_stats_kernel[(n_rows, cfg.n_splits)](
            logits_ptr=logits,
            target_ptr=target,
            weight_ptr=weight if weight is not None else partials,
            partial_ptr=partials,
            partial_idx_ptr=argmax if spec.return_stats else partials,
            stride_logits_row=layout.stride_row,
            stride_logits_group=layout.stride_group,
            n_rows=n_rows,
            rows_per_group=layout.per_group,
            n_cols=n_cols,
            cols_per_split=cfg.cols_per_split,
            n_splits=cfg.n_splits,
            ignore_index=spec.ignore_index,
            BLOCK_SIZE=cfg.block_size,
            num_warps=cfg.num_warps,
            **_options(spec),
            **_flags(weight, spec),
        )
    return RowStats(partials, argmax)


def _empty_results(n_rows: int, spec: LossSpec, device: torch.device) -> RowResults:
    def f32(n: int) -> torch.Tensor:
        return torch.empty(n, dtype=torch.float32, device=device)

    stats = n_rows if spec.return_stats else 0
    return RowResults(f32(n_rows), f32(n_rows), f32(n_rows if spec.has_z_loss else 0),
                      f32(stats), f32(stats), torch.empty(stats, dtype=torch.int64,
                                                          device=device))


def ce_fwd(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    weight_sum: torch.Tensor | None,
    scale: torch.Tensor | None,
    spec: LossSpec,
    grad: torch.Tensor | None,
    *,
    row_stats: RowStats | None = None,
    vocab: VocabSlice | None = None,
    stats_out: torch.Tensor | None = None,
    stat_grads: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> RowResults:
    """Per-row cross-entropy, its extras, and the gradient of the logits in the same launch.
    (Long because the launch names every kernel argument, one per line.)

    Args:
        logits: (N, C) float32/bfloat16/float16, unit column stride (any row stride), or
            (G, T, C) groups of rows (any group and row strides, see ``Rows``).
        target: (N,) int64 class indices; may hold ``spec.ignore_index`` or, for broken input,
            values outside [0, C), which give NaN for that row and are never used as addresses.
        weight: (C,) float32 class weights (of these columns), or None.
        weight_sum: (1,) float32 sum of all class weights, when ``weight`` is given.
        scale: (1,) float32 factor the gradient is multiplied by (the reduction's
            1/denominator), or (N,) float32 factors, one per row; needed only with ``grad``.
        spec: the options.
        grad: a tensor of the logits' shape and dtype with unit column stride to write the scaled
            gradient into (it may be ``logits`` itself), or None for the loss only, which reads
            the logits once and writes nothing logits-sized.
        row_stats: the rows' statistics, already known (merged in order, in the launch that
            writes the gradient); None computes them here.
        vocab: vocabulary parallelism (``row_stats`` then required, merged over the ranks).
        stats_out: a (4, N, 1) float32 tensor to receive each row's merged statistics (the
            ``row_stats`` a later recomputing pass takes), or None.
        stat_grads: (N,) float32 incoming gradients of each row's lse and entropy, added to
            the gradient (``spec.differentiable_stats``, with ``row_stats`` from a pass that
            tracked the entropy), or None.

    Returns:
        ``RowResults`` in float32.
    """
    layout = rows_of("logits", logits)
    n_rows, n_cols = layout.n_rows, layout.n_cols
    grad_layout = rows_of("grad", grad) if grad is not None else layout
    if grad is not None and grad.shape != logits.shape:
        raise ValueError(f"grad's shape {tuple(grad.shape)} differs from the logits' "
                         f"{tuple(logits.shape)}")
    device = logits.device
    if vocab is not None and row_stats is None:
        raise ValueError("vocabulary-parallel ce_fwd needs the merged row_stats")
    out = _empty_results(n_rows, spec, device)
    if n_rows == 0:
        return out
    target, weight, weight_sum, scale = (_dense(t) for t in (target, weight, weight_sum, scale))
    if row_stats is not None:
        row_stats = RowStats(_dense(row_stats.partials), _dense(row_stats.argmax))
    if vocab is not None:
        vocab = vocab._replace(target_logit=_dense(vocab.target_logit),
                               target_weight=_dense(vocab.target_weight))
    if stat_grads is not None:
        stat_grads = (_dense(stat_grads[0]), _dense(stat_grads[1]))
    if stats_out is not None and not stats_out.is_contiguous():
        raise ValueError("ce_fwd's stats_out must be contiguous (it is written by flat offset)")
    cfg = _config(logits, spec, rereads=grad is not None and row_stats is None)
    if row_stats is None and cfg.n_splits > 1:
        row_stats = ce_row_stats(logits, target, weight, spec, n_splits=cfg.n_splits)
    merge = row_stats is not None
    n_partials = row_stats.partials.shape[2] if merge else 1
    dummy = out.loss  # every pointer argument gets a real address
    compute_grad = grad is not None
    ce_fwd_kernel[(n_rows, cfg.n_splits)](
        logits_ptr=logits,
        target_ptr=target,
        weight_ptr=weight if weight is not None else dummy,
        weight_sum_ptr=weight_sum if weight is not None else dummy,
        scale_ptr=scale if compute_grad else dummy,
        partial_ptr=row_stats.partials if merge else dummy,
        partial_idx_ptr=row_stats.argmax if merge and spec.return_stats else dummy,
        target_logit_ptr=vocab.target_logit if vocab is not None else dummy,
        target_weight_ptr=(vocab.target_weight if vocab is not None
                           and vocab.target_weight is not None else dummy),
        loss_ptr=out.loss,
        lse_ptr=out.lse,
        z_loss_ptr=out.z_loss if spec.has_z_loss else dummy,
        correct_ptr=out.correct if spec.return_stats else dummy,
        entropy_ptr=out.entropy if spec.return_stats else dummy,
        argmax_ptr=out.argmax if spec.return_stats else dummy,
        stats_ptr=stats_out if stats_out is not None else dummy,
        lse_grad_ptr=stat_grads[0] if stat_grads is not None else dummy,
        entropy_grad_ptr=stat_grads[1] if stat_grads is not None else dummy,
        grad_ptr=grad if compute_grad else logits,
        stride_logits_row=layout.stride_row,
        stride_grad_row=grad_layout.stride_row,
        stride_logits_group=layout.stride_group,
        stride_grad_group=grad_layout.stride_group,
        stride_scale=1 if compute_grad and scale.numel() > 1 else 0,
        n_rows=n_rows,
        rows_per_group=layout.per_group,
        n_cols=n_cols,
        n_classes=vocab.n_classes if vocab is not None else n_cols,
        vocab_start=vocab.start if vocab is not None else 0,
        cols_per_split=cfg.cols_per_split,
        n_partials=n_partials,
        ignore_index=spec.ignore_index,
        label_smoothing=float(spec.label_smoothing),
        lse_square_scale=float(spec.lse_square_scale),
        BLOCK_SIZE=cfg.block_size,
        PARTIAL_BLOCK=triton.next_power_of_2(n_partials),
        MERGE=merge,
        VOCAB_PARALLEL=vocab is not None,
        HAS_ZLOSS=spec.has_z_loss,
        STORE_STATS=stats_out is not None,
        COMPUTE_GRAD=compute_grad,
        HAS_STAT_GRADS=stat_grads is not None,
        num_warps=cfg.num_warps,
        **_options(spec),
        **_flags(weight, spec),
    )
    return out


def ce_bwd(grad: torch.Tensor, grad_output: torch.Tensor, *, block_size: int | None = None) -> None:
    """Multiply the stored gradient by ``grad_output`` in place, without a host synchronisation.

    Args:
        grad: (N, C) or (G, T, C) gradient written by ``ce_fwd``, unit column stride.
        grad_output: a scalar (mean/sum reductions) or (N,) per-row factors, any float dtype, on
            the same device.  Rows whose factor is exactly 1 are left untouched, so the common
            ``grad_output == 1`` costs one launch of at most four programs per SM, each reading
            one scalar per row it owns, and no traffic of the gradient.
    """
    layout = rows_of("grad", grad)
    n_rows, n_cols = layout.n_rows, layout.n_cols
    if n_rows == 0 or n_cols == 0:
        return
    if block_size is None:
        block_size = min(triton.next_power_of_2(n_cols), 4096)
    factor = grad_output.reshape(-1)
    stride = 0 if factor.numel() == 1 else factor.stride(0)
    n_programs = min(n_rows, 4 * _num_sms(grad.device))
    ce_bwd_kernel[(n_programs,)](
        grad_ptr=grad,
        grad_output_ptr=factor,
        stride_grad_row=layout.stride_row,
        stride_grad_group=layout.stride_group,
        stride_grad_output=stride,
        n_rows=n_rows,
        rows_per_group=layout.per_group,
        n_cols=n_cols,
        BLOCK_SIZE=block_size,
        num_warps=min(8, max(1, block_size // 512)),
    )


def ce_scale(target: torch.Tensor, weight: torch.Tensor | None,
             token_weight: torch.Tensor | None, items: torch.Tensor | None, spec: LossSpec,
             n_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (1,) float32 scale of a ``mean`` in one launch: 1 / the counted targets' number or
    class weight times token weight (0 when that is 0), or 1 / ``items`` (a one-element
    tensor).  ``dtype``: float32, the kernels' math dtype (the backends' common signature)."""
    if dtype != torch.float32:
        raise ValueError(f"the kernels compute the scale in float32, not {dtype}")
    target, weight, items = _dense(target), _dense(weight), _dense(items)
    token_weight = _dense(token_weight)
    scale = torch.empty(1, dtype=torch.float32, device=target.device)
    ce_scale_kernel[(1,)](
        target_ptr=target,
        weight_ptr=weight if weight is not None else scale,
        token_weight_ptr=token_weight if token_weight is not None else scale,
        items_ptr=items if items is not None else scale,
        scale_ptr=scale,
        n_rows=target.numel(),
        n_cols=n_classes,
        ignore_index=spec.ignore_index,
        BLOCK_SIZE=1024,
        HAS_WEIGHT=weight is not None,
        HAS_TOKEN_WEIGHT=token_weight is not None,
        HAS_ITEMS=items is not None,
        num_warps=4,
    )
    return scale


def ce_reduce(rows: torch.Tensor, scale: torch.Tensor | None, out_dtype: torch.dtype
              ) -> torch.Tensor:
    """sum(rows), times ``scale`` when given (+0 when it is 0), as a scalar of ``out_dtype``,
    in one launch and a fixed order."""
    rows, scale = _dense(rows), _dense(scale)
    out = torch.empty((), dtype=out_dtype, device=rows.device)
    ce_reduce_kernel[(1,)](
        rows_ptr=rows,
        scale_ptr=scale if scale is not None else rows,
        out_ptr=out,
        n_rows=rows.numel(),
        BLOCK_SIZE=1024,
        MEAN=scale is not None,
        num_warps=4,
    )
    return out


__all__ = ["INTERPRETED", "LaunchConfig", "Rows", "ce_bwd", "ce_fwd", "ce_reduce", "ce_row_stats",
           "ce_scale", "launch_config", "rows_of", "set_tiling",
           "tiling"]
