"""Triton kernels for cross-entropy against class-probability targets.  This module imports only
Triton.

Per row, with logits ``x``, target probabilities ``t``, smoothed ``t' = (1 - eps) t + eps / C``
(PyTorch mixes probabilities so) and class weights ``w``: ``loss = S1 lse(x) - S2`` with
``S1 = sum_c w_c t'_c`` and ``S2 = sum_c w_c t'_c x_c``, and ``d loss / d x = S1 softmax(x) -
w t'``.  Pass 1 keeps each lane's online ``(max, sum of exp)`` (Milakov & Gimelshein, 2018) and
the two plain sums ``S1``, ``S2``; pass 2 writes the gradient times the row's factor.  One
program reads a row twice (the second read from L2); with few rows the vocabulary is split
across programs (``soft_ce_partial_kernel`` stores each chunk's four sums, and each program of
``soft_ce_split_kernel`` merges its row's chunks before writing its own chunk's gradient).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .distill_kernels import _MIN_F32, _chunk, _exp, _log, _merge_lse


@triton.jit
def _soft_scan(x_row, t_row, weight_ptr, c0, c1, smooth_keep, smooth_add,
               BLOCK_SIZE: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    """Pass 1 over columns [c0, c1): each lane's (m, d) of x, and S1, S2."""
    m = tl.full([BLOCK_SIZE], _MIN_F32, tl.float32)
    d = tl.zeros([BLOCK_SIZE], tl.float32)
    s1 = tl.zeros([BLOCK_SIZE], tl.float32)
    s2 = tl.zeros([BLOCK_SIZE], tl.float32)
    for start in range(c0, c1, BLOCK_SIZE):
        offs = start + tl.arange(0, BLOCK_SIZE)
        mask = offs < c1
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(t_row + offs, mask=mask, other=0.0).to(tl.float32)
        wt = tl.where(mask, t * smooth_keep + smooth_add, 0.0)
        if HAS_WEIGHT:
            wt = wt * tl.load(weight_ptr + offs, mask=mask, other=0.0)
        xm = tl.where(mask, x, -float("inf"))
        new = tl.maximum(m, xm)
        d = d * _exp(m - new) + tl.where(mask, _exp(xm - new), 0.0)
        m = new
        s1 += wt
        s2 += tl.where(wt != 0.0, wt * x, 0.0)  # (a -inf logit with no target mass adds 0)
    return m, d, s1, s2


@triton.jit
def _soft_grad(x_row, t_row, g_row, weight_ptr, c0, c1, lse, s1, factor, smooth_keep,
               smooth_add, BLOCK_SIZE: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    """The gradient over columns [c0, c1), times the row's factor; each block is read before
    it is written (``g_row`` may be ``x_row``)."""
    for start in range(c0, c1, BLOCK_SIZE):
        offs = start + tl.arange(0, BLOCK_SIZE)
        mask = offs < c1
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(t_row + offs, mask=mask, other=0.0).to(tl.float32)
        wt = t * smooth_keep + smooth_add
        if HAS_WEIGHT:
            wt = wt * tl.load(weight_ptr + offs, mask=mask, other=0.0)
        g = (s1 * _exp(x - lse) - wt) * factor
        tl.store(g_row + offs, g.to(g_row.dtype.element_ty), mask=mask)


@triton.jit
def soft_ce_kernel(
    logits_ptr,  # (N, C) any float dtype, unit column stride
    target_ptr,  # (N, C) probabilities, any float dtype, unit column stride
    weight_ptr,  # (C,) fp32 class weights (HAS_WEIGHT)
    factor_ptr,  # (N,) fp32 row factors (the mean's 1 / N, or 1)
    loss_ptr,  # (N,) fp32 out: the row's loss x factor
    grad_ptr,  # (N, C) out (COMPUTE_GRAD); may alias logits_ptr
    stride_logits_row,
    stride_target_row,
    stride_grad_row,
    n_cols,
    smooth_keep,  # 1 - eps
    smooth_add,  # eps / C
    BLOCK_SIZE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
):
    """One program per row: both passes (see the module docstring)."""
    row = tl.program_id(0).to(tl.int64)
    x_row = logits_ptr + row * stride_logits_row
    t_row = target_ptr + row * stride_target_row
    m, d, s1, s2 = _soft_scan(x_row, t_row, weight_ptr, 0, n_cols, smooth_keep, smooth_add,
                              BLOCK_SIZE, HAS_WEIGHT)
    top, total, scale = _merge_lse(m, d)
    lse = top + _log(total)
    s1_row = tl.sum(s1, axis=0)
    factor = tl.load(factor_ptr + row)
    tl.store(loss_ptr + row, (s1_row * lse - tl.sum(s2, axis=0)) * factor)
    if COMPUTE_GRAD:
        _soft_grad(x_row, t_row, grad_ptr + row * stride_grad_row, weight_ptr, 0, n_cols, lse,
                   s1_row, factor, smooth_keep, smooth_add, BLOCK_SIZE, HAS_WEIGHT)


@triton.jit
def soft_ce_partial_kernel(
    logits_ptr,
    target_ptr,
    weight_ptr,
    part_ptr,  # (4, N, S) fp32 out: each chunk's max, sum of exp, S1, S2
    stride_logits_row,
    stride_target_row,
    n_rows,
    n_cols,
    cols_per_split,
    n_splits,
    smooth_keep,
    smooth_add,
    BLOCK_SIZE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
):
    """The split path's pass 1: one chunk of a row, its lanes merged."""
    row = tl.program_id(0).to(tl.int64)
    c0, c1 = _chunk(n_cols, cols_per_split)
    m, d, s1, s2 = _soft_scan(logits_ptr + row * stride_logits_row,
                              target_ptr + row * stride_target_row, weight_ptr, c0, c1,
                              smooth_keep, smooth_add, BLOCK_SIZE, HAS_WEIGHT)
    top, total, scale = _merge_lse(m, d)
    at = row * n_splits + tl.program_id(1)
    plane = n_rows * n_splits
    tl.store(part_ptr + at, top)
    tl.store(part_ptr + plane + at, total)
    tl.store(part_ptr + 2 * plane + at, tl.sum(s1, axis=0))
    tl.store(part_ptr + 3 * plane + at, tl.sum(s2, axis=0))


@triton.jit
def soft_ce_split_kernel(
    logits_ptr,
    target_ptr,
    weight_ptr,
    part_ptr,  # (4, N, S) fp32 from soft_ce_partial_kernel
    factor_ptr,
    loss_ptr,
    grad_ptr,  # may alias logits_ptr
    stride_logits_row,
    stride_target_row,
    stride_grad_row,
    n_rows,
    n_cols,
    cols_per_split,
    n_splits,
    smooth_keep,
    smooth_add,
    BLOCK_SIZE: tl.constexpr,
    SPLIT_BLOCK: tl.constexpr,  # n_splits rounded up to a power of two
    HAS_WEIGHT: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
):
    """The split path: the row's chunks merged (the first chunk's program stores the loss),
    then this chunk's gradient."""
    row = tl.program_id(0).to(tl.int64)
    ss = tl.arange(0, SPLIT_BLOCK)
    live = ss < n_splits
    at = part_ptr + row * n_splits + ss
    plane = n_rows * n_splits
    top, total, scale = _merge_lse(tl.load(at, mask=live, other=_MIN_F32),
                                   tl.load(at + plane, mask=live, other=0.0))
    lse = top + _log(total)
    s1 = tl.sum(tl.load(at + 2 * plane, mask=live, other=0.0), axis=0)
    s2 = tl.sum(tl.load(at + 3 * plane, mask=live, other=0.0), axis=0)
    factor = tl.load(factor_ptr + row)
    if tl.program_id(1) == 0:
        tl.store(loss_ptr + row, (s1 * lse - s2) * factor)
    if COMPUTE_GRAD:
        c0, c1 = _chunk(n_cols, cols_per_split)
        _soft_grad(logits_ptr + row * stride_logits_row, target_ptr + row * stride_target_row,
                   grad_ptr + row * stride_grad_row, weight_ptr, c0, c1, lse, s1, factor,
                   smooth_keep, smooth_add, BLOCK_SIZE, HAS_WEIGHT)
