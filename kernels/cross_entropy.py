"""Triton kernels for cross-entropy over class-index targets, and their launch wrappers.

Math (one row of logits ``x`` of length ``C``, target ``t``, class weights ``w`` (all ones when
absent), ``W = sum_c w_c``, label smoothing ``eps``, z-loss scale ``lam``).  The logits are first
transformed, elementwise::

    z = logit_scale * x                      then, with a softcap c:   z = c * tanh(z / c)

and then, with ``lse = log(sum_c exp(z_c))`` and ``p_c = exp(z_c - lse)``::

    loss = (1 - eps) * w_t * (lse - z_t) + (eps / C) * (W * lse - sum_c w_c * z_c) + lam * w_t * lse^2
    dloss/dz_c = ((1 - eps) * w_t + eps * W / C + 2 * lam * w_t * lse) * p_c
                 - (1 - eps) * w_t * [c == t] - (eps / C) * w_c
    dz_c/dx_c  = logit_scale * (1 - tanh^2(logit_scale * x_c / c))   (logit_scale without softcap)

Without smoothing and z-loss this is ``w_t * (lse - z_t)``; the smoothing term is PyTorch's
``-(eps / C) * sum_c w_c * log_softmax(z)_c``; the z-loss (PaLM's ``lam * lse^2``) is weighted
by the target's class weight like the rest of the row's loss.  A row whose target equals
``ignore_index`` has loss 0 and gradient 0 and its logits are never read.  A target outside
``[0, C)`` that is not ignored is never used as an address: its row gets a NaN loss and a NaN
gradient.

The gradient is written by the same launch that computes the loss, already multiplied by the
reduction's scale (``1 / sum of counted target weights`` for ``mean``, 1 otherwise), which is read
from device memory so that no host synchronisation is needed.  The backward only has to apply
``grad_output`` (``ce_bwd``), and skips even that when it equals 1.

The log-sum-exp is computed online: each lane of a ``BLOCK_SIZE`` vector keeps its own running
max ``m`` and sum ``d`` of ``exp(z - m)`` (and, for token accuracy, the first column reaching its
max); lanes are merged once at the end.  When there are few rows, each row's vocabulary is split
into ``n_splits`` contiguous chunks handled by separate programs: ``_ce_stats_kernel`` writes each
chunk's partials, and ``_ce_fwd_kernel`` merges a row's partials before computing the loss and its
chunk of gradient.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

# The interpreter (TRITON_INTERPRET=1) is chosen by Triton when a kernel is decorated, that is
# when this module is imported; record it so the dispatcher can tell whether CPU tensors can be
# launched on.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

# Running maxima start at the most negative finite float32 rather than -inf, so that a lane which
# has only seen -inf logits (masked vocabulary entries) rescales by exp(0) instead of exp(nan).
_MIN_F32 = tl.constexpr(-3.4028234663852886e38)
_MAX_I32 = tl.constexpr(2147483647)


@triton.jit
def _tanh(u):
    # tanh(u) = 1 - 2 / (exp(2u) + 1): saturates to +-1 without inf/inf for large |u|.
    return 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)


@triton.jit
def _transform(x, logit_scale, softcap, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """z = logit_scale * x, then softcap * tanh(z / softcap); float32 in, float32 out."""
    z = x
    if HAS_SCALE:
        z = z * logit_scale
    if HAS_SOFTCAP:
        z = softcap * _tanh(z / softcap)
    return z


@triton.jit
def _row_chunk_stats(
    row_ptr,  # pointer to column 0 of the row
    weight_ptr,
    col_start,
    col_end,  # exclusive; col_end <= col_start means an empty chunk
    logit_scale,
    softcap,
    BLOCK_SIZE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_ARGMAX: tl.constexpr,
):
    """Online (max, sum exp(z - max), sum w*z, first argmax) over columns [col_start, col_end)."""
    cols = tl.arange(0, BLOCK_SIZE)
    m_vec = tl.full([BLOCK_SIZE], _MIN_F32, tl.float32)
    d_vec = tl.zeros([BLOCK_SIZE], tl.float32)
    sz_vec = tl.zeros([BLOCK_SIZE], tl.float32)
    i_vec = tl.full([BLOCK_SIZE], _MAX_I32, tl.int32)
    for start in range(col_start, col_end, BLOCK_SIZE):
        offs = start + cols
        mask = offs < col_end
        x = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        z = _transform(x, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP)
        z = tl.where(mask, z, -float("inf"))
        m_new = tl.maximum(m_vec, z)
        d_vec = d_vec * tl.exp(m_vec - m_new) + tl.exp(z - m_new)
        if COMPUTE_ARGMAX:
            # Columns grow along a lane, so a strict > keeps each lane's first maximum.
            i_vec = tl.where(z > m_vec, offs.to(tl.int32), i_vec)
        m_vec = m_new
        if HAS_SMOOTHING:
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + offs, mask=mask, other=0.0)
                sz_vec += tl.where(mask, w * z, 0.0)
            else:
                sz_vec += tl.where(mask, z, 0.0)
    m = tl.max(m_vec, axis=0)
    d = tl.sum(d_vec * tl.exp(m_vec - m), axis=0)
    sz = tl.sum(sz_vec, axis=0)
    idx = tl.min(tl.where(m_vec == m, i_vec, _MAX_I32), axis=0)
    return m, d, sz, idx


@triton.jit
def _ce_stats_kernel(
    logits_ptr,
    target_ptr,
    weight_ptr,
    partial_ptr,  # (3, n_rows, n_splits) fp32: chunk max, chunk sum of exp(z - max), sum w*z
    partial_idx_ptr,  # (n_rows, n_splits) int32: chunk's first argmax, when COMPUTE_ARGMAX
    stride_logits_row,
    n_rows,
    n_cols,
    cols_per_split,  # a multiple of BLOCK_SIZE
    n_splits,
    ignore_index,
    logit_scale,
    softcap,
    BLOCK_SIZE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    COMPUTE_ARGMAX: tl.constexpr,
):
    """Phase 1 of the split-vocabulary path: one program per (row, vocabulary chunk)."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    target = tl.load(target_ptr + row).to(tl.int64)
    col_start = split * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, n_cols)
    # Ignored rows read nothing: an empty chunk leaves (m, d, sz) = (min, 0, 0).
    col_end = tl.where(target == ignore_index, col_start, col_end)
    m, d, sz, idx = _row_chunk_stats(
        logits_ptr + row * stride_logits_row,
        weight_ptr,
        col_start,
        col_end,
        logit_scale,
        softcap,
        BLOCK_SIZE=BLOCK_SIZE,
        HAS_WEIGHT=HAS_WEIGHT,
        HAS_SMOOTHING=HAS_SMOOTHING,
        HAS_SCALE=HAS_SCALE,
        HAS_SOFTCAP=HAS_SOFTCAP,
        COMPUTE_ARGMAX=COMPUTE_ARGMAX,
    )
    out = row * n_splits + split
    plane = n_rows * n_splits
    tl.store(partial_ptr + out, m)
    tl.store(partial_ptr + plane + out, d)
    tl.store(partial_ptr + 2 * plane + out, sz)
    if COMPUTE_ARGMAX:
        tl.store(partial_idx_ptr + out, idx)


@triton.jit
def _ce_fwd_kernel(
    logits_ptr,
    target_ptr,
    weight_ptr,  # (n_cols,) fp32 class weights, read only when HAS_WEIGHT
    weight_sum_ptr,  # (1,) fp32 sum of the class weights, read only when HAS_WEIGHT
    scale_ptr,  # (1,) or (n_rows,) fp32 gradient scale, read only when COMPUTE_GRAD
    partial_ptr,  # (3, n_rows, n_partials) fp32 row statistics to merge, read only when MERGE
    partial_idx_ptr,  # (n_rows, n_partials) int32 first argmax (global column), MERGE and ARGMAX
    target_logit_ptr,  # (n_rows,) fp32 transformed target logit, read only when VOCAB_PARALLEL
    target_weight_ptr,  # (n_rows,) fp32 target's class weight, VOCAB_PARALLEL and HAS_WEIGHT
    loss_ptr,  # (n_rows,) fp32, z-loss included
    lse_ptr,  # (n_rows,) fp32; 0 for ignored rows
    z_loss_ptr,  # (n_rows,) fp32 lam * w_t * lse^2, written when HAS_ZLOSS
    correct_ptr,  # (n_rows,) fp32 1.0 where the first argmax is the target, when COMPUTE_ARGMAX
    grad_ptr,  # gradient of the logits, in their dtype, written only when COMPUTE_GRAD
    stride_logits_row,
    stride_grad_row,
    stride_scale,  # 0: one scale for all rows; 1: one per row
    n_rows,
    n_cols,  # columns held here (this rank's slice of the vocabulary when VOCAB_PARALLEL)
    n_classes,  # classes in all (n_cols unless VOCAB_PARALLEL)
    vocab_start,  # global id of column 0 (0 unless VOCAB_PARALLEL)
    cols_per_split,  # a multiple of BLOCK_SIZE
    n_partials,  # statistics per row to merge (MERGE)
    ignore_index,
    label_smoothing,
    logit_scale,
    softcap,
    lse_square_scale,
    BLOCK_SIZE: tl.constexpr,
    PARTIAL_BLOCK: tl.constexpr,  # next power of two >= n_partials
    MERGE: tl.constexpr,  # row statistics come from partial_ptr instead of a pass over the row
    VOCAB_PARALLEL: tl.constexpr,  # the row is a slice; the target logit comes from outside
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ZLOSS: tl.constexpr,
    COMPUTE_ARGMAX: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
):
    """Loss, log-sum-exp, extras and gradient: one program per (row, vocabulary chunk)."""
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    row_ptr = logits_ptr + row * stride_logits_row
    target = tl.load(target_ptr + row).to(tl.int64)  # a global class id
    ignored = target == ignore_index
    valid = (target >= 0) & (target < n_classes)
    local_target = target - vocab_start  # in [0, n_cols) when this slice holds the target
    col_start = split * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, n_cols)

    # 1. The row's log-sum-exp (and sum w*z for smoothing, first argmax for accuracy).
    if MERGE:
        # Merge the partials in a fixed order, so results are bitwise reproducible.
        s = tl.arange(0, PARTIAL_BLOCK)
        smask = s < n_partials
        part = row * n_partials + s
        plane = n_rows * n_partials
        m_part = tl.load(partial_ptr + part, mask=smask, other=_MIN_F32)
        d_part = tl.load(partial_ptr + plane + part, mask=smask, other=0.0)
        m = tl.max(m_part, axis=0)
        d = tl.sum(d_part * tl.exp(m_part - m), axis=0)
        sz = tl.sum(tl.load(partial_ptr + 2 * plane + part, mask=smask, other=0.0), axis=0)
        idx = _MAX_I32
        if COMPUTE_ARGMAX:
            i_part = tl.load(partial_idx_ptr + part, mask=smask, other=_MAX_I32)
            idx = tl.min(tl.where(m_part == m, i_part, _MAX_I32), axis=0)
    else:
        m, d, sz, idx = _row_chunk_stats(
            row_ptr,
            weight_ptr,
            0,
            tl.where(ignored, 0, n_cols),
            logit_scale,
            softcap,
            BLOCK_SIZE=BLOCK_SIZE,
            HAS_WEIGHT=HAS_WEIGHT,
            HAS_SMOOTHING=HAS_SMOOTHING,
            HAS_SCALE=HAS_SCALE,
            HAS_SOFTCAP=HAS_SOFTCAP,
            COMPUTE_ARGMAX=COMPUTE_ARGMAX,
        )
    lse = m + tl.log(d)

    # 2. The loss.  The target logit is one scalar load, masked unless the target is in range.
    read_t = valid & (target != ignore_index)
    if VOCAB_PARALLEL:
        z_t = tl.load(target_logit_ptr + row)
        if HAS_WEIGHT:
            w_t = tl.load(target_weight_ptr + row)
    else:
        safe_target = tl.where(valid, target, 0)
        x_t = tl.load(row_ptr + safe_target, mask=read_t, other=0.0).to(tl.float32)
        z_t = _transform(x_t, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP)
        if HAS_WEIGHT:
            w_t = tl.load(weight_ptr + safe_target, mask=read_t, other=0.0)
    z_t = tl.where(valid, z_t, float("nan"))
    if HAS_WEIGHT:
        w_sum = tl.load(weight_sum_ptr)
    else:
        w_t = 1.0
        w_sum = n_classes * 1.0
    loss = (1.0 - label_smoothing) * w_t * (lse - z_t)
    if HAS_SMOOTHING:
        loss += label_smoothing / n_classes * (w_sum * lse - sz)
    if HAS_ZLOSS:
        z_loss = tl.where(ignored, 0.0, lse_square_scale * w_t * lse * lse)
        loss += z_loss
    loss = tl.where(ignored, 0.0, loss)
    if split == 0:
        tl.store(loss_ptr + row, loss)
        tl.store(lse_ptr + row, tl.where(ignored, 0.0, lse))
        if HAS_ZLOSS:
            tl.store(z_loss_ptr + row, z_loss)
        if COMPUTE_ARGMAX:
            tl.store(correct_ptr + row, tl.where(read_t & (idx == target), 1.0, 0.0))

    # 3. The gradient of this program's chunk:
    #    g_c = scale * (a * p_c - b * [c == t] - s * w_c) * dz_c/dx_c, zero for an ignored row.
    if COMPUTE_GRAD:
        scale = tl.load(scale_ptr + row * stride_scale)
        scale = tl.where(ignored, 0.0, scale)
        scale = tl.where(valid | ignored, scale, float("nan"))
        b = scale * (1.0 - label_smoothing) * w_t
        s = scale * label_smoothing / n_classes
        # An ignored row uses lse = 0 (its lse is -inf) with every load masked off: p = 0 and
        # g = 0 are written without reading the logits.
        lse_g = tl.where(ignored, 0.0, lse)
        a = b + s * w_sum
        if HAS_ZLOSS:
            a += scale * 2.0 * lse_square_scale * w_t * lse_g
        read_end = tl.where(ignored, col_start, col_end)
        cols = tl.arange(0, BLOCK_SIZE)
        grad_row_ptr = grad_ptr + row * stride_grad_row
        for start in range(col_start, col_end, BLOCK_SIZE):
            offs = start + cols
            mask = offs < col_end
            x = tl.load(row_ptr + offs, mask=offs < read_end, other=0.0).to(tl.float32)
            z = _transform(x, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP)
            p = tl.where(offs < read_end, tl.exp(z - lse_g), 0.0)
            g = a * p - tl.where(offs == local_target, b, 0.0)
            if HAS_SMOOTHING:
                if HAS_WEIGHT:
                    g -= s * tl.load(weight_ptr + offs, mask=mask, other=0.0)
                else:
                    g -= s
            if HAS_SOFTCAP:
                th = z / softcap  # tanh(logit_scale * x / softcap)
                g = g * (1.0 - th * th)
            if HAS_SCALE:
                g = g * logit_scale
            tl.store(grad_row_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ce_bwd_kernel(
    grad_ptr,  # gradient of the logits, scaled in place
    grad_output_ptr,  # fp32 scalar (stride 0) or one value per row
    stride_grad_row,
    stride_grad_output,
    n_cols,
    BLOCK_SIZE: tl.constexpr,
):
    """grad[row, :] *= grad_output[row]; a program whose factor is exactly 1 does nothing."""
    row = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1).to(tl.int64)
    factor = tl.load(grad_output_ptr + row * stride_grad_output).to(tl.float32)
    if factor != 1.0:
        offs = block * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = offs < n_cols
        ptr = grad_ptr + row * stride_grad_row + offs
        g = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptr, (g * factor).to(grad_ptr.dtype.element_ty), mask=mask)


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


def launch_config(
    n_rows: int,
    n_cols: int,
    device: torch.device,
    *,
    block_size: int | None = None,
    n_splits: int | None = None,
) -> LaunchConfig:
    """Choose block size, warps and vocabulary split for an ``(n_rows, n_cols)`` problem.

    Heuristic: a block covers up to 8192 columns (32 KiB of fp32 state per lane vector) with one
    warp per 512 columns, between 4 and 16.  The vocabulary is split across programs only when
    there are fewer than four rows per SM, so that every SM gets work; a chunk is never smaller
    than four blocks.  ``block_size`` and ``n_splits`` override the heuristic (tests use them to
    reach the multi-block and split paths at small sizes).
    """
    if block_size is None:
        block_size = min(triton.next_power_of_2(max(n_cols, 1)), 8192)
    elif block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    n_blocks = triton.cdiv(max(n_cols, 1), block_size)
    if n_splits is None:
        target_programs = 4 * _num_sms(device)
        n_splits = 1
        if n_rows < target_programs:
            n_splits = max(1, min(triton.cdiv(target_programs, max(n_rows, 1)), n_blocks // 4))
    elif n_splits < 1:
        raise ValueError(f"n_splits must be at least 1, got {n_splits}")
    n_splits = min(n_splits, n_blocks)
    # Round the chunk up to whole blocks, then drop splits that would be empty.
    cols_per_split = triton.cdiv(n_blocks, n_splits) * block_size
    n_splits = triton.cdiv(max(n_cols, 1), cols_per_split)
    num_warps = min(16, max(4, block_size // 512))
    return LaunchConfig(block_size, num_warps, n_splits, cols_per_split)


class RowOutputs(NamedTuple):
    """Per-row float32 results of ``ce_fwd`` (0 for ignored rows)."""

    loss: torch.Tensor  # (N,) loss, z-loss included, already multiplied by the target's weight
    lse: torch.Tensor  # (N,) log-sum-exp of the transformed logits
    z_loss: torch.Tensor | None  # (N,) lse_square_scale * w_t * lse**2, when lse_square_scale > 0
    correct: torch.Tensor | None  # (N,) 1.0 where the first argmax is the target, when asked


class RowStats(NamedTuple):
    """Statistics of rows of (transformed) logits, in float32 unless said otherwise.

    ``max``/``sumexp``/``weighted_sum`` are (N, P): P partial results per row (chunks of the
    vocabulary, or ranks of a vocabulary-parallel group), each ``max`` of its z, ``sumexp`` the
    sum of exp(z - max), ``weighted_sum`` the sum of w * z (0 without label smoothing).
    ``argmax`` is (N, P) int32, the first column (global id) reaching ``max``, or None.
    """

    max: torch.Tensor
    sumexp: torch.Tensor
    weighted_sum: torch.Tensor
    argmax: torch.Tensor | None


def _flags(weight, label_smoothing, logit_scale, softcap, compute_accuracy) -> dict:
    return dict(
        HAS_WEIGHT=weight is not None,
        HAS_SMOOTHING=label_smoothing > 0.0,
        HAS_SCALE=logit_scale != 1.0,
        HAS_SOFTCAP=softcap is not None,
        COMPUTE_ARGMAX=compute_accuracy,
    )


def ce_row_stats(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    *,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    compute_accuracy: bool = False,
    block_size: int | None = None,
    n_splits: int | None = None,
) -> RowStats:
    """Partial statistics of each row's (transformed) logits: one pass that reads them once.

    Args: as ``ce_fwd`` (``weight`` the (C,) weights of these columns).  Ignored rows read
    nothing and give (min, 0, 0).

    Returns:
        ``RowStats`` with one partial per vocabulary chunk (P = the launch's ``n_splits``);
        ``argmax`` columns are local to ``logits``.
    """
    n_rows, n_cols = logits.shape
    device = logits.device
    cfg = launch_config(n_rows, n_cols, device, block_size=block_size, n_splits=n_splits)
    partial = torch.empty(3, n_rows, cfg.n_splits, dtype=torch.float32, device=device)
    partial_idx = (torch.empty(n_rows, cfg.n_splits, dtype=torch.int32, device=device)
                   if compute_accuracy else None)
    if n_rows:
        _ce_stats_kernel[(n_rows, cfg.n_splits)](
            logits_ptr=logits,
            target_ptr=target,
            weight_ptr=weight if weight is not None else partial,
            partial_ptr=partial,
            partial_idx_ptr=partial_idx if compute_accuracy else partial,
            stride_logits_row=logits.stride(0),
            n_rows=n_rows,
            n_cols=n_cols,
            cols_per_split=cfg.cols_per_split,
            n_splits=cfg.n_splits,
            ignore_index=ignore_index,
            logit_scale=float(logit_scale),
            softcap=float(softcap) if softcap is not None else 1.0,
            BLOCK_SIZE=cfg.block_size,
            num_warps=cfg.num_warps,
            **_flags(weight, label_smoothing, logit_scale, softcap, compute_accuracy),
        )
    return RowStats(partial[0], partial[1], partial[2], partial_idx)


def ce_fwd(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    weight_sum: torch.Tensor | None,
    scale: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    grad: torch.Tensor | None,
    *,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    lse_square_scale: float = 0.0,
    compute_accuracy: bool = False,
    block_size: int | None = None,
    n_splits: int | None = None,
    row_stats: RowStats | None = None,
    vocab_start: int = 0,
    n_classes: int | None = None,
    target_logit: torch.Tensor | None = None,
    target_weight: torch.Tensor | None = None,
) -> RowOutputs:
    """Per-row cross-entropy, its extras, and the gradient of the logits in the same launch.

    Args:
        logits: (N, C) float32/bfloat16/float16, last dimension contiguous (any row stride).
        target: (N,) integer class indices; may hold ``ignore_index`` or, for broken input, values
            outside [0, C), which give NaN for that row and are never used as addresses.
        weight: (C,) float32 class weights, or None.
        weight_sum: (1,) float32 sum of all class weights, when ``weight`` is given.
        scale: (1,) float32 factor the gradient is multiplied by (the reduction's 1/denominator),
            or (N,) float32 factors, one per row; needed only with ``grad``.
        ignore_index: target value whose rows count for nothing.
        label_smoothing: in [0, 1].
        grad: (N, C) tensor of the logits' dtype with a contiguous last dimension to write the
            scaled gradient into (it may alias ``logits``), or None for the loss only, which
            reads the logits once and writes nothing logits-sized.
        logit_scale: the logits are multiplied by it first (positive).
        softcap: then capped to ``softcap * tanh(z / softcap)`` (positive), or None.
        lse_square_scale: z-loss coefficient (``lse_square_scale * lse**2`` added per row).
        compute_accuracy: also report whether each row's first argmax is its target.
        block_size, n_splits: override ``launch_config``'s choice.
        row_stats: the rows' statistics, already known (merged in order, in the launch that
            writes the gradient); None computes them here.
        vocab_start, n_classes, target_logit, target_weight: vocabulary parallelism.  ``logits``
            then holds the global columns ``[vocab_start, vocab_start + C)`` of ``n_classes``;
            ``target`` holds global ids; ``row_stats`` (required) covers the whole vocabulary;
            ``target_logit`` (N,) is each row's transformed target logit, wherever it lives, and
            ``target_weight`` (N,) its class weight (with ``weight``, then this slice's weights).
    """
    n_rows, n_cols = logits.shape
    device = logits.device
    vocab_parallel = target_logit is not None
    if vocab_parallel and row_stats is None:
        raise ValueError("vocabulary-parallel ce_fwd needs the merged row_stats")
    n_classes = n_cols if n_classes is None else n_classes
    has_zloss = lse_square_scale != 0.0
    out = RowOutputs(
        torch.empty(n_rows, dtype=torch.float32, device=device),
        torch.empty(n_rows, dtype=torch.float32, device=device),
        torch.empty(n_rows, dtype=torch.float32, device=device) if has_zloss else None,
        torch.empty(n_rows, dtype=torch.float32, device=device) if compute_accuracy else None,
    )
    if n_rows == 0:
        return out
    cfg = launch_config(n_rows, n_cols, device, block_size=block_size, n_splits=n_splits)
    if row_stats is None and cfg.n_splits > 1:
        row_stats = ce_row_stats(logits, target, weight, ignore_index, label_smoothing,
                                 logit_scale=logit_scale, softcap=softcap,
                                 compute_accuracy=compute_accuracy, block_size=cfg.block_size,
                                 n_splits=cfg.n_splits)
    merge = row_stats is not None
    n_partials = row_stats.max.shape[1] if merge else 1
    dummy = out.loss  # every pointer argument gets a real address
    partial = partial_idx = dummy
    if merge:
        partial = torch.stack([row_stats.max, row_stats.sumexp, row_stats.weighted_sum])
        partial = partial.contiguous()
        if compute_accuracy:
            partial_idx = row_stats.argmax.to(torch.int32).contiguous()
    compute_grad = grad is not None
    _ce_fwd_kernel[(n_rows, cfg.n_splits)](
        logits_ptr=logits,
        target_ptr=target,
        weight_ptr=weight if weight is not None else dummy,
        weight_sum_ptr=weight_sum if weight is not None else dummy,
        scale_ptr=scale if compute_grad else dummy,
        partial_ptr=partial,
        partial_idx_ptr=partial_idx,
        target_logit_ptr=target_logit if vocab_parallel else dummy,
        target_weight_ptr=target_weight if target_weight is not None else dummy,
        loss_ptr=out.loss,
        lse_ptr=out.lse,
        z_loss_ptr=out.z_loss if has_zloss else dummy,
        correct_ptr=out.correct if compute_accuracy else dummy,
        grad_ptr=grad if compute_grad else logits,
        stride_logits_row=logits.stride(0),
        stride_grad_row=grad.stride(0) if compute_grad else 0,
        stride_scale=1 if compute_grad and scale.numel() > 1 else 0,
        n_rows=n_rows,
        n_cols=n_cols,
        n_classes=n_classes,
        vocab_start=vocab_start,
        cols_per_split=cfg.cols_per_split,
        n_partials=n_partials,
        ignore_index=ignore_index,
        label_smoothing=float(label_smoothing),
        logit_scale=float(logit_scale),
        softcap=float(softcap) if softcap is not None else 1.0,
        lse_square_scale=float(lse_square_scale),
        BLOCK_SIZE=cfg.block_size,
        PARTIAL_BLOCK=triton.next_power_of_2(n_partials),
        MERGE=merge,
        VOCAB_PARALLEL=vocab_parallel,
        HAS_ZLOSS=has_zloss,
        COMPUTE_GRAD=compute_grad,
        num_warps=cfg.num_warps,
        **_flags(weight, label_smoothing, logit_scale, softcap, compute_accuracy),
    )
    return out


def ce_bwd(grad: torch.Tensor, grad_output: torch.Tensor, *, block_size: int | None = None) -> None:
    """Multiply the stored gradient by ``grad_output`` in place, without a host synchronisation.

    Args:
        grad: (N, C) gradient written by ``ce_fwd``, last dimension contiguous.
        grad_output: a scalar (mean/sum reductions) or (N,) per-row factors (``none``), any float
            dtype, on the same device.  Rows whose factor is exactly 1 are left untouched, so the
            common ``grad_output == 1`` costs one launch and no memory traffic.
    """
    n_rows, n_cols = grad.shape
    if n_rows == 0 or n_cols == 0:
        return
    if block_size is None:
        block_size = min(triton.next_power_of_2(n_cols), 4096)
    factor = grad_output.reshape(-1)
    stride = 0 if factor.numel() == 1 else factor.stride(0)
    grid = (n_rows, triton.cdiv(n_cols, block_size))
    _ce_bwd_kernel[grid](
        grad_ptr=grad,
        grad_output_ptr=factor,
        stride_grad_row=grad.stride(0),
        stride_grad_output=stride,
        n_cols=n_cols,
        BLOCK_SIZE=block_size,
        num_warps=min(8, max(1, block_size // 512)),
    )


__all__ = [
    "INTERPRETED",
    "LaunchConfig",
    "RowOutputs",
    "RowStats",
    "ce_bwd",
    "ce_fwd",
    "ce_row_stats",
    "launch_config",
]
