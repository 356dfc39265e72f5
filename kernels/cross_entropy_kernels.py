"""Triton kernels for cross-entropy over class-index targets.  This module imports only Triton:
any Triton host (PyTorch through ``fusedce.kernels.cross_entropy``, JAX through jax-triton, ...)
can launch the same kernels with its own arrays.

Math (one row of logits ``x`` of length ``C``, target ``t``, class weights ``w`` (all ones when
absent), ``W = sum_c w_c``, label smoothing ``eps``, z-loss scale ``lam``).  The logits are first
transformed, elementwise::

    z = logit_scale * x                      then, with a softcap c:   z = c * tanh(z / c)

Everything is formed relative to the row max ``m``, with ``d = sum_c exp(z_c - m)`` (so that a
large common offset of the logits costs no precision, and ties stay ties)::

    lse  = m + log d
    loss = (1 - eps) * w_t * ((m - z_t) + log d)
           + (eps / C) * (W * (log d + m - ref) - sum_c w_c * (z_c - ref))      (ref: see below)
           + lam * w_t * lse^2
    p_c  = exp((z_c - m) - log d)
    dloss/dz_c = ((1 - eps) * w_t + eps * W / C + 2 * lam * w_t * lse) * p_c
                 - (1 - eps) * w_t * [c == t] - (eps / C) * w_c
    dz_c/dx_c  = logit_scale * (1 - tanh^2(logit_scale * x_c / c))   (logit_scale without softcap)

(A sampling temperature ``T`` is folded into these by the host: ``softcap(s * x) / T`` is
the transform with scale ``s / T`` and cap ``c / T``.)  With the statistics, each row's entropy
``H = lse - sum_c p_c z_c = log d - e / d`` comes from one more running sum
``e = sum_c exp(z_c - m) * (z_c - m)``; its gradient, and the log-sum-exp's, are
``dH/dz_c = -p_c * (z_c - mu)`` with ``mu = sum_c p_c z_c = m + e / d``, and ``dlse/dz_c = p_c``.

Without smoothing and z-loss this is ``w_t * (lse - z_t)``; the smoothing term is PyTorch's
``-(eps / C) * sum_c w_c * log_softmax(z)_c``, its sum taken relative to the row's anchor
logit ``ref`` (its first transformed logit when finite, else 0) so that it adds up without
cancellation for large logits; the z-loss is PaLM's ``lam * lse^2`` (Chowdhery et al. 2022,
section 5), weighted by the target's class weight like the rest of the row's loss.

The log-sum-exp is computed online (Milakov & Gimelshein 2018, "Online normalizer calculation
for softmax"): each lane of a ``BLOCK_SIZE`` vector keeps its own running max and sum of
``exp(z - max)``, rescaled when its max grows, with one exponential per element
(``exp(-|z - max|)`` serves as the new term or as the rescaling factor); lanes are merged once
at the end.

A row whose target equals ``ignore_index`` has loss 0 and gradient 0 and its logits are never
read.  A target outside ``[0, C)`` that is not ignored is never used as an address: its row gets a
NaN loss and a NaN gradient.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Running maxima start at the most negative finite float32 rather than -inf, so that a lane which
# has only seen -inf logits (masked vocabulary entries) rescales by exp(0) instead of exp(nan).
_MIN_F32 = tl.constexpr(-3.4028234663852886e38)
_MAX_I32 = tl.constexpr(2147483647)
# Exponentials are exp2 of arguments scaled by log2(e): exp2 compiles to one MUFU.EX2 (tl.exp
# adds a range check and two multiplies for denormal results, which a softmax can flush to 0).
_LOG2E = tl.constexpr(1.4426950408889634)
_NEG_LOG2E = tl.constexpr(-1.4426950408889634)
_TWO_LOG2E = tl.constexpr(2.8853900817779268)


@triton.jit
def _row_offset(row, rows_per_group, stride_group, stride_row):
    """Element offset of row ``row`` (int64) of logits laid out as groups of ``rows_per_group``
    rows, (G, T, C) with strides (stride_group, stride_row, 1): ``logits[:, :-1]`` or transposed
    (..., T, C) logits are read where they are.  An (N, C) tensor is one group."""
    return (row // rows_per_group) * stride_group + (row % rows_per_group) * stride_row


@triton.jit
def _tanh(u):
    # tanh(u) = 1 - 2 / (exp(2u) + 1): saturates to +-1 without inf/inf for large |u|.
    return 1.0 - 2.0 / (tl.math.exp2(u * _TWO_LOG2E) + 1.0)


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
def _row_anchor(row_ptr, read, logit_scale, softcap, HAS_SCALE: tl.constexpr,
                   HAS_SOFTCAP: tl.constexpr):
    """The row's anchor logit for the smoothing sum: its first transformed logit if finite
    (and ``read``), else 0."""
    x0 = tl.load(row_ptr, mask=read, other=0.0).to(tl.float32)
    z0 = _transform(x0, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP)
    return tl.where(tl.abs(z0) < float("inf"), z0, 0.0)


@triton.jit
def _stats_step(row_ptr, weight_ptr, start, col_end, ref, m_vec, d_vec, sz_vec, i_vec, e_vec,
                logit_scale, softcap, BLOCK_SIZE: tl.constexpr, MASKED: tl.constexpr,
                HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SCALE: tl.constexpr,
                HAS_SOFTCAP: tl.constexpr, RETURN_STATS: tl.constexpr,
                HAS_ENTROPY: tl.constexpr):
    """One block of the online statistics: columns [start, start + BLOCK_SIZE), masked at
    ``col_end`` only for the tail block (full blocks load without predicates)."""
    offs = start + tl.arange(0, BLOCK_SIZE)
    if MASKED:
        mask = offs < col_end
        x = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        x = tl.load(row_ptr + offs).to(tl.float32)
    z = _transform(x, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP)
    if MASKED:
        z = tl.where(mask, z, -float("inf"))
    # One exponential per element: exp(-|z - m|) is the new element's term when z does not
    # raise the lane's max, and the old sum's rescaling factor when it does.
    t = tl.math.exp2(tl.abs(z - m_vec) * _NEG_LOG2E)
    grow = z > m_vec
    if HAS_ENTROPY:
        # e = sum exp(z - m) * (z - m): a growing max moves the old sum to the new max,
        # e' = t * (e - delta * d) (the new element adds 0); otherwise the element adds
        # t * delta (0 for a -inf or masked logit, whose t is 0).
        delta = z - m_vec
        moved = t * (e_vec - tl.where(d_vec > 0.0, delta * d_vec, 0.0))
        e_vec = tl.where(grow, moved, e_vec + tl.where(t > 0.0, t * delta, 0.0))
    d_vec = tl.where(grow, d_vec * t + 1.0, d_vec + t)
    if RETURN_STATS:
        # Columns grow along a lane, so a strict > keeps each lane's first maximum.
        i_vec = tl.where(grow, offs, i_vec)
    m_vec = tl.where(grow, z, m_vec)
    if HAS_SMOOTHING:
        zr = z - ref
        if MASKED:
            zr = tl.where(mask, zr, 0.0)
        if HAS_WEIGHT:
            if MASKED:
                zr *= tl.load(weight_ptr + offs, mask=mask, other=0.0)
            else:
                zr *= tl.load(weight_ptr + offs)
        sz_vec += zr
    return m_vec, d_vec, sz_vec, i_vec, e_vec


@triton.jit
def _lane_entropy_sum(m_vec, d_vec, e_vec, m):
    """Lanes' (or partials') sums e_k relative to their own max m_k, moved to the max m."""
    f = tl.math.exp2((m_vec - m) * _LOG2E)
    return tl.sum(tl.where(d_vec > 0.0, f * (e_vec + (m_vec - m) * d_vec), 0.0), axis=0)


@triton.jit
def _row_chunk_stats(
    row_ptr,  # pointer to column 0 of the row
    weight_ptr,
    col_start,  # int32, a multiple of BLOCK_SIZE
    col_end,  # int32, exclusive; col_end <= col_start means an empty chunk
    ref,  # the row's anchor logit (smoothing only)
    logit_scale,
    softcap,
    BLOCK_SIZE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    RETURN_STATS: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
):
    """Online (max m, sum exp(z - m), sum w*(z - ref), first argmax, sum exp(z - m)*(z - m))
    over [col_start, col_end): full blocks unmasked, then the tail block masked."""
    m_vec = tl.full([BLOCK_SIZE], _MIN_F32, tl.float32)
    d_vec = tl.zeros([BLOCK_SIZE], tl.float32)
    sz_vec = tl.zeros([BLOCK_SIZE], tl.float32)
    i_vec = tl.full([BLOCK_SIZE], _MAX_I32, tl.int32)
    e_vec = tl.zeros([BLOCK_SIZE], tl.float32)
    full_end = col_start + tl.maximum(col_end - col_start, 0) // BLOCK_SIZE * BLOCK_SIZE
    for start in range(col_start, full_end, BLOCK_SIZE):
        m_vec, d_vec, sz_vec, i_vec, e_vec = _stats_step(
            row_ptr, weight_ptr, start, col_end, ref, m_vec, d_vec, sz_vec, i_vec, e_vec,
            logit_scale, softcap, BLOCK_SIZE=BLOCK_SIZE, MASKED=False, HAS_WEIGHT=HAS_WEIGHT,
            HAS_SMOOTHING=HAS_SMOOTHING, HAS_SCALE=HAS_SCALE, HAS_SOFTCAP=HAS_SOFTCAP,
            RETURN_STATS=RETURN_STATS, HAS_ENTROPY=HAS_ENTROPY)
    if full_end < col_end:
        m_vec, d_vec, sz_vec, i_vec, e_vec = _stats_step(
            row_ptr, weight_ptr, full_end, col_end, ref, m_vec, d_vec, sz_vec, i_vec, e_vec,
            logit_scale, softcap, BLOCK_SIZE=BLOCK_SIZE, MASKED=True, HAS_WEIGHT=HAS_WEIGHT,
            HAS_SMOOTHING=HAS_SMOOTHING, HAS_SCALE=HAS_SCALE, HAS_SOFTCAP=HAS_SOFTCAP,
            RETURN_STATS=RETURN_STATS, HAS_ENTROPY=HAS_ENTROPY)
    m = tl.max(m_vec, axis=0)
    d = tl.sum(d_vec * tl.math.exp2((m_vec - m) * _LOG2E), axis=0)
    sz = tl.sum(sz_vec, axis=0)
    idx = tl.min(tl.where(m_vec == m, i_vec, _MAX_I32), axis=0)
    e = 0.0
    if HAS_ENTROPY:
        e = _lane_entropy_sum(m_vec, d_vec, e_vec, m)
    return m, d, sz, idx, e


@triton.jit
def _merge_partials(partial_ptr, partial_idx_ptr, row, n_rows, n_partials,
                    PARTIAL_BLOCK: tl.constexpr, RETURN_STATS: tl.constexpr,
                    HAS_ENTROPY: tl.constexpr):
    """Merge a row's partial (max, sum exp, weighted sum, argmax, entropy sum), always in the
    same order, so results are bitwise reproducible."""
    s = tl.arange(0, PARTIAL_BLOCK)
    smask = s < n_partials
    part = row * n_partials + s
    plane = n_rows * n_partials
    m_part = tl.load(partial_ptr + part, mask=smask, other=_MIN_F32)
    d_part = tl.load(partial_ptr + plane + part, mask=smask, other=0.0)
    m = tl.max(m_part, axis=0)
    d = tl.sum(d_part * tl.math.exp2((m_part - m) * _LOG2E), axis=0)
    sz = tl.sum(tl.load(partial_ptr + 2 * plane + part, mask=smask, other=0.0), axis=0)
    idx = _MAX_I32
    if RETURN_STATS:
        i_part = tl.load(partial_idx_ptr + part, mask=smask, other=_MAX_I32)
        idx = tl.min(tl.where(m_part == m, i_part, _MAX_I32), axis=0)
    e = 0.0
    if HAS_ENTROPY:
        e_part = tl.load(partial_ptr + 3 * plane + part, mask=smask, other=0.0)
        e = _lane_entropy_sum(m_part, d_part, e_part, m)
    return m, d, sz, idx, e


@triton.jit
def _target_terms(row_ptr, weight_ptr, weight_sum_ptr, target_logit_ptr, target_weight_ptr,
                  row, target, valid, read_t, n_classes, logit_scale, softcap,
                  VOCAB_PARALLEL: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                  HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """(z_t, w_t, W): the transformed target logit (NaN for a target outside the classes), its
    class weight and the sum of all class weights.  The target logit is one scalar load, masked
    unless the target is in range, or comes from outside under vocabulary parallelism."""
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
    return z_t, w_t, w_sum


@triton.jit
def _grad_values(x, m, log_d, a, s, w, beta, e_over_d, logit_scale, softcap,
                 HAS_SMOOTHING: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                 HAS_STAT_GRADS: tl.constexpr):
    """(a * p - s * w) * dz/dx with p = exp((z - m) - log d): the gradient of every column
    but the target's, which also gets -b * dz/dx.  With the statistics' gradients ``a`` becomes
    ``a + beta * (z - mu)``, ``z - mu = (z - m) - e / d`` (the entropy's term)."""
    z = _transform(x, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP)
    p = tl.math.exp2((z - m) * _LOG2E - log_d * _LOG2E)
    if HAS_STAT_GRADS:
        # A masked column (z = -inf) has p = 0 and an exactly zero gradient; the entropy's
        # factor (z - m) is -inf there, and 0 * inf would be NaN.
        g = tl.where(p > 0.0, (a + beta * ((z - m) - e_over_d)) * p, 0.0)
    else:
        g = a * p
    if HAS_SMOOTHING:
        g -= s * w
    return _chain(g, z, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP)


@triton.jit
def _chain(g, z, logit_scale, softcap, HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """g * dz/dx: softcap's 1 - tanh^2 (tanh = z / softcap), then logit_scale."""
    if HAS_SOFTCAP:
        th = z / softcap
        g = g * (1.0 - th * th)
    if HAS_SCALE:
        g = g * logit_scale
    return g


@triton.jit
def _grad_step(row_ptr, grad_row_ptr, weight_ptr, start, col_end, m, log_d, a, s, beta,
               e_over_d, logit_scale, softcap, BLOCK_SIZE: tl.constexpr, MASKED: tl.constexpr,
               HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr, HAS_SCALE: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, HAS_STAT_GRADS: tl.constexpr):
    """One block of the gradient: columns [start, start + BLOCK_SIZE), masked at ``col_end``
    only for the tail block."""
    offs = start + tl.arange(0, BLOCK_SIZE)
    mask = offs < col_end
    if MASKED:
        x = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        x = tl.load(row_ptr + offs).to(tl.float32)
    w = 1.0
    if HAS_SMOOTHING and HAS_WEIGHT:
        if MASKED:
            w = tl.load(weight_ptr + offs, mask=mask, other=0.0)
        else:
            w = tl.load(weight_ptr + offs)
    g = _grad_values(x, m, log_d, a, s, w, beta, e_over_d, logit_scale, softcap,
                     HAS_SMOOTHING=HAS_SMOOTHING, HAS_SCALE=HAS_SCALE, HAS_SOFTCAP=HAS_SOFTCAP,
                     HAS_STAT_GRADS=HAS_STAT_GRADS)
    if MASKED:
        tl.store(grad_row_ptr + offs, g.to(grad_row_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(grad_row_ptr + offs, g.to(grad_row_ptr.dtype.element_ty))


@triton.jit
def _write_grad_chunk(row_ptr, grad_row_ptr, weight_ptr, col_start, col_end, m, log_d, a, s,
                      beta, e_over_d, logit_scale, softcap, BLOCK_SIZE: tl.constexpr,
                      HAS_WEIGHT: tl.constexpr, HAS_SMOOTHING: tl.constexpr,
                      HAS_SCALE: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                      HAS_STAT_GRADS: tl.constexpr):
    """Write (a * p_c - s * w_c) * dz_c/dx_c over [col_start, col_end): full blocks unmasked,
    then the tail block masked.  (The target column's -b term is written afterwards.)"""
    full_end = col_start + (col_end - col_start) // BLOCK_SIZE * BLOCK_SIZE
    for start in range(col_start, full_end, BLOCK_SIZE):
        _grad_step(row_ptr, grad_row_ptr, weight_ptr, start, col_end, m, log_d, a, s, beta,
                   e_over_d, logit_scale, softcap, BLOCK_SIZE=BLOCK_SIZE, MASKED=False,
                   HAS_WEIGHT=HAS_WEIGHT, HAS_SMOOTHING=HAS_SMOOTHING, HAS_SCALE=HAS_SCALE,
                   HAS_SOFTCAP=HAS_SOFTCAP, HAS_STAT_GRADS=HAS_STAT_GRADS)
    if full_end < col_end:
        _grad_step(row_ptr, grad_row_ptr, weight_ptr, full_end, col_end, m, log_d, a, s, beta,
                   e_over_d, logit_scale, softcap, BLOCK_SIZE=BLOCK_SIZE, MASKED=True,
                   HAS_WEIGHT=HAS_WEIGHT, HAS_SMOOTHING=HAS_SMOOTHING, HAS_SCALE=HAS_SCALE,
                   HAS_SOFTCAP=HAS_SOFTCAP, HAS_STAT_GRADS=HAS_STAT_GRADS)


@triton.jit
def _zero_chunk(grad_row_ptr, col_start, col_end, BLOCK_SIZE: tl.constexpr):
    """An ignored row's gradient: zeros, without reading its logits."""
    zeros = tl.zeros([BLOCK_SIZE], tl.float32).to(grad_row_ptr.dtype.element_ty)
    for start in range(col_start, col_end, BLOCK_SIZE):
        offs = start + tl.arange(0, BLOCK_SIZE)
        tl.store(grad_row_ptr + offs, zeros, mask=offs < col_end)


@triton.jit
def ce_stats_kernel(
    logits_ptr,
    target_ptr,
    weight_ptr,
    partial_ptr,
    partial_idx_ptr,
    stride_logits_row,
    stride_logits_group,
    n_rows,
    rows_per_group,
    n_cols,
    cols_per_split,
    n_splits,
    ignore_index,
    logit_scale,
    softcap,
    BLOCK_SIZE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    RETURN_STATS: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
):
    """Partial statistics of each row, one program per (row, vocabulary chunk); reads each
    counted row's logits once and writes nothing logits-sized.

    Args:
        logits_ptr: (n_rows, n_cols) fp32/bf16/fp16 logits, unit column stride.
        target_ptr: (n_rows,) int64 class ids (global ids under vocabulary parallelism).
        weight_ptr: (n_cols,) fp32 class weights of these columns, read when HAS_WEIGHT.
        partial_ptr: (4, n_rows, n_splits) fp32 out: chunk max m_k, sum exp(z - m_k), sum
            w * (z - ref) (0 without smoothing; ref: ``_row_anchor`` of this row), and sum
            exp(z - m_k) * (z - m_k) (0 without HAS_ENTROPY).
        partial_idx_ptr: (n_rows, n_splits) int32 out: the chunk's first argmax (column of these
            logits), written when RETURN_STATS.
        stride_logits_row: elements between rows; stride_logits_group, rows_per_group: rows
            come in groups of rows_per_group, stride_logits_group elements apart (``_row_offset``).
        cols_per_split: columns per chunk, a multiple of BLOCK_SIZE.
        ignore_index: target value of rows that read nothing; they give (min, 0, 0).
        logit_scale, softcap: the transform (see the module docstring); flags say which apply.
        BLOCK_SIZE: columns per load, a power of two.
        HAS_WEIGHT, HAS_SMOOTHING, HAS_SCALE, HAS_SOFTCAP: which options are on.
        RETURN_STATS: also find each chunk's first argmax (token accuracy).
        HAS_ENTROPY: also sum exp(z - m_k) * (z - m_k) (the entropy).
    """
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)  # columns are int32 offsets from the row's 64-bit start
    row_ptr = logits_ptr + _row_offset(row, rows_per_group, stride_logits_group,
                                       stride_logits_row)
    ignored = tl.load(target_ptr + row).to(tl.int64) == ignore_index
    col_start = split * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, n_cols)
    # 1. Ignored rows read nothing: an empty chunk leaves (m, d, sz, e) = (min, 0, 0, 0).
    col_end = tl.where(ignored, col_start, col_end)
    ref = 0.0
    if HAS_SMOOTHING:
        ref = _row_anchor(row_ptr, (n_cols > 0) & (~ignored), logit_scale, softcap,
                          HAS_SCALE, HAS_SOFTCAP)
    # 2. One pass over the chunk.
    m, d, sz, idx, e = _row_chunk_stats(
        row_ptr, weight_ptr, col_start, col_end, ref, logit_scale, softcap,
        BLOCK_SIZE=BLOCK_SIZE, HAS_WEIGHT=HAS_WEIGHT, HAS_SMOOTHING=HAS_SMOOTHING,
        HAS_SCALE=HAS_SCALE, HAS_SOFTCAP=HAS_SOFTCAP, RETURN_STATS=RETURN_STATS,
        HAS_ENTROPY=HAS_ENTROPY,
    )
    # 3. The partials, plane by plane.
    out = row * n_splits + split
    plane = n_rows * n_splits
    tl.store(partial_ptr + out, m)
    tl.store(partial_ptr + plane + out, d)
    tl.store(partial_ptr + 2 * plane + out, sz)
    tl.store(partial_ptr + 3 * plane + out, e)
    if RETURN_STATS:
        tl.store(partial_idx_ptr + out, idx)


@triton.jit
def ce_fwd_kernel(
    logits_ptr,
    target_ptr,
    weight_ptr,
    weight_sum_ptr,
    scale_ptr,
    partial_ptr,
    partial_idx_ptr,
    target_logit_ptr,
    target_weight_ptr,
    loss_ptr,
    lse_ptr,
    z_loss_ptr,
    correct_ptr,
    entropy_ptr,
    argmax_ptr,
    stats_ptr,
    lse_grad_ptr,
    entropy_grad_ptr,
    grad_ptr,
    stride_logits_row,
    stride_grad_row,
    stride_logits_group,
    stride_grad_group,
    stride_scale,
    n_rows,
    rows_per_group,
    n_cols,
    n_classes,
    vocab_start,
    cols_per_split,
    n_partials,
    ignore_index,
    label_smoothing,
    logit_scale,
    softcap,
    lse_square_scale,
    BLOCK_SIZE: tl.constexpr,
    PARTIAL_BLOCK: tl.constexpr,
    MERGE: tl.constexpr,
    VOCAB_PARALLEL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_ZLOSS: tl.constexpr,
    RETURN_STATS: tl.constexpr,
    STORE_STATS: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
    HAS_STAT_GRADS: tl.constexpr,
):
    """Loss, log-sum-exp, extras and the gradient of the logits in one launch: one program per
    (row, vocabulary chunk).  (Long for its argument list, one per line, and this Args block;
    the body is three phases of about 20 lines each.)

    Args:
        logits_ptr: (n_rows, n_cols) fp32/bf16/fp16 logits, unit column stride.
        target_ptr: (n_rows,) int64 class ids (global under VOCAB_PARALLEL).
        weight_ptr: (n_cols,) fp32 class weights of these columns, read when HAS_WEIGHT.
        weight_sum_ptr: (1,) fp32 sum of all n_classes class weights, read when HAS_WEIGHT.
        scale_ptr: (1,) or (n_rows,) fp32 factor of the gradient (the reduction's 1/denominator,
            times a per-row grad_output for a recomputing backward), read when COMPUTE_GRAD.
        partial_ptr, partial_idx_ptr: (4, n_rows, n_partials) fp32 and (n_rows, n_partials)
            int32 row statistics (``ce_stats_kernel``'s layout) read instead of a pass over the
            row when MERGE.  Under VOCAB_PARALLEL their weighted sums are relative to the merged
            max instead of the row's anchor.
        target_logit_ptr: (n_rows,) fp32 transformed target logit, read when VOCAB_PARALLEL.
        target_weight_ptr: (n_rows,) fp32 target's class weight, VOCAB_PARALLEL and HAS_WEIGHT.
        loss_ptr: (n_rows,) fp32 out, z-loss included; lse_ptr: (n_rows,) fp32 out.
        z_loss_ptr: (n_rows,) fp32 out lam * w_t * lse^2, written when HAS_ZLOSS.
        correct_ptr: (n_rows,) fp32 out, 1.0 where the first argmax is the target, RETURN_STATS.
        entropy_ptr: (n_rows,) fp32 out, the entropy of softmax(z), 0 where ignored, and
        argmax_ptr: (n_rows,) int64 out, the first argmax (-1 where ignored): RETURN_STATS.
        stats_ptr: (4, n_rows, 1) fp32 out, each row's merged (m, d, weighted sum, entropy sum)
            in ``ce_stats_kernel``'s layout, written when STORE_STATS (for a recomputing
            backward, which passes them back with MERGE).
        lse_grad_ptr, entropy_grad_ptr: (n_rows,) fp32 incoming gradients of each row's lse and
            entropy, added to the gradient when HAS_STAT_GRADS (MERGE with HAS_ENTROPY).
        grad_ptr: (n_rows, n_cols) out, the logits' dtype, unit column stride, may alias
            logits_ptr (each element is read before the same program writes it); COMPUTE_GRAD.
        stride_logits_group, stride_grad_group, rows_per_group: rows come in groups of
            rows_per_group (``_row_offset``), for the logits and the gradient alike.
        stride_scale: 0 for one scale, 1 for one per row.
        n_cols: columns held here; n_classes: classes in all (n_cols unless VOCAB_PARALLEL);
            vocab_start: global id of column 0.
        cols_per_split: columns per program along the row, a multiple of BLOCK_SIZE.
        n_partials: statistics per row to merge (MERGE); PARTIAL_BLOCK: its next power of two.
        ignore_index, label_smoothing, logit_scale, softcap, lse_square_scale: the options.
        HAS_*, RETURN_STATS: which options are on; STORE_STATS: write stats_ptr;
        COMPUTE_GRAD: write the gradient.
        HAS_ENTROPY: track the entropy sum; HAS_STAT_GRADS: add the statistics' gradients.
    """
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)  # columns are int32 offsets from the row's 64-bit start
    row_ptr = logits_ptr + _row_offset(row, rows_per_group, stride_logits_group,
                                       stride_logits_row)
    target = tl.load(target_ptr + row).to(tl.int64)
    ignored = target == ignore_index
    valid = (target >= 0) & (target < n_classes)
    read_t = valid & (~ignored)
    col_start = split * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, n_cols)

    # 1. The row's statistics: max m, d = sum exp(z - m), weighted sum, first argmax, entropy
    #    sum e = sum exp(z - m) * (z - m).
    ref = 0.0
    if HAS_SMOOTHING and not VOCAB_PARALLEL:
        ref = _row_anchor(row_ptr, (n_cols > 0) & (~ignored), logit_scale, softcap,
                          HAS_SCALE, HAS_SOFTCAP)
    if MERGE:
        m, d, sz, idx, e = _merge_partials(partial_ptr, partial_idx_ptr, row, n_rows,
                                           n_partials, PARTIAL_BLOCK=PARTIAL_BLOCK,
                                           RETURN_STATS=RETURN_STATS, HAS_ENTROPY=HAS_ENTROPY)
        if VOCAB_PARALLEL:
            ref = m  # the merged weighted sum is relative to the merged max
    else:
        m, d, sz, idx, e = _row_chunk_stats(
            row_ptr, weight_ptr, 0, tl.where(ignored, 0, n_cols), ref, logit_scale, softcap,
            BLOCK_SIZE=BLOCK_SIZE, HAS_WEIGHT=HAS_WEIGHT, HAS_SMOOTHING=HAS_SMOOTHING,
            HAS_SCALE=HAS_SCALE, HAS_SOFTCAP=HAS_SOFTCAP, RETURN_STATS=RETURN_STATS,
            HAS_ENTROPY=HAS_ENTROPY,
        )
    log_d = tl.log(d)
    lse = m + log_d
    e_over_d = 0.0
    if HAS_ENTROPY:
        e_over_d = tl.where(ignored, 0.0, e / d)  # sum_c p_c * (z_c - m)

    # 2. The loss, relative to the row max.  The target logit is one scalar load, masked unless
    #    the target is in range.
    z_t, w_t, w_sum = _target_terms(
        row_ptr, weight_ptr, weight_sum_ptr, target_logit_ptr, target_weight_ptr, row, target,
        valid, read_t, n_classes, logit_scale, softcap, VOCAB_PARALLEL=VOCAB_PARALLEL,
        HAS_WEIGHT=HAS_WEIGHT, HAS_SCALE=HAS_SCALE, HAS_SOFTCAP=HAS_SOFTCAP,
    )
    loss = (1.0 - label_smoothing) * w_t * ((m - z_t) + log_d)
    if HAS_SMOOTHING:
        loss += label_smoothing / n_classes * (w_sum * (log_d + (m - ref)) - sz)
    if HAS_ZLOSS:
        z_loss = tl.where(ignored, 0.0, lse_square_scale * w_t * lse * lse)
        loss += z_loss
    loss = tl.where(ignored, 0.0, loss)
    if split == 0:
        tl.store(loss_ptr + row, loss)
        tl.store(lse_ptr + row, tl.where(ignored, 0.0, lse))
        if HAS_ZLOSS:
            tl.store(z_loss_ptr + row, z_loss)
        if RETURN_STATS:
            tl.store(correct_ptr + row, tl.where(read_t & (idx == target), 1.0, 0.0))
            tl.store(entropy_ptr + row, tl.where(ignored, 0.0, log_d - e_over_d))
            tl.store(argmax_ptr + row, tl.where(ignored, -1, idx.to(tl.int64)))
        if STORE_STATS:
            tl.store(stats_ptr + row, m)
            tl.store(stats_ptr + n_rows + row, d)
            tl.store(stats_ptr + 2 * n_rows + row, sz)
            tl.store(stats_ptr + 3 * n_rows + row, e)

    # 3. The gradient of this program's chunk:
    #    g_c = scale * (a * p_c - b * [c == t] - s * w_c) * dz_c/dx_c, zero for an ignored row;
    #    with the statistics' gradients g_lse and g_H, a += g_lse and every p_c is also
    #    multiplied by beta * (z_c - mu), beta = -g_H (dH/dz_c = -p_c (z_c - mu)).
    if COMPUTE_GRAD:
        scale = tl.load(scale_ptr + row * stride_scale)
        scale = tl.where(valid | ignored, scale, float("nan"))
        b = scale * (1.0 - label_smoothing) * w_t
        s = scale * label_smoothing / n_classes
        a = b + s * w_sum
        if HAS_ZLOSS:
            a += scale * 2.0 * lse_square_scale * w_t * lse
        beta = 0.0
        if HAS_STAT_GRADS:
            a += tl.load(lse_grad_ptr + row)
            beta = -tl.load(entropy_grad_ptr + row)
        grad_row_ptr = grad_ptr + _row_offset(row, rows_per_group, stride_grad_group,
                                              stride_grad_row)
        if ignored:
            _zero_chunk(grad_row_ptr, col_start, col_end, BLOCK_SIZE=BLOCK_SIZE)
        else:
            _write_grad_chunk(
                row_ptr, grad_row_ptr, weight_ptr, col_start, col_end, m, log_d, a, s, beta,
                e_over_d, logit_scale, softcap, BLOCK_SIZE=BLOCK_SIZE, HAS_WEIGHT=HAS_WEIGHT,
                HAS_SMOOTHING=HAS_SMOOTHING, HAS_SCALE=HAS_SCALE, HAS_SOFTCAP=HAS_SOFTCAP,
                HAS_STAT_GRADS=HAS_STAT_GRADS,
            )
            # The target column, if this chunk holds it, gets -b more: written again once every
            # thread's store of the chunk is done, from z_t (read before anything was written,
            # so also right when the gradient overwrites the logits).
            local_target = target - vocab_start
            here = read_t & (local_target >= col_start) & (local_target < col_end)
            p_t = tl.math.exp2((z_t - m) * _LOG2E - log_d * _LOG2E)
            if HAS_STAT_GRADS:
                g_t = (a + beta * ((z_t - m) - e_over_d)) * p_t - b
            else:
                g_t = a * p_t - b
            if HAS_SMOOTHING:
                g_t -= s * w_t
            g_t = _chain(g_t, z_t, logit_scale, softcap, HAS_SCALE, HAS_SOFTCAP)
            tl.debug_barrier()
            tl.store(grad_row_ptr + tl.where(here, local_target, 0),
                     g_t.to(grad_ptr.dtype.element_ty), mask=here)


@triton.jit
def ce_bwd_kernel(
    grad_ptr,
    grad_output_ptr,
    stride_grad_row,
    stride_grad_group,
    stride_grad_output,
    n_rows,
    rows_per_group,
    n_cols,
    BLOCK_SIZE: tl.constexpr,
):
    """grad[row, :] *= grad_output[row], rows strided over the programs; a row whose factor is
    exactly 1 is not touched, so grad_output == 1 costs each program one scalar load.

    Args:
        grad_ptr: (n_rows, n_cols) gradient of the logits, unit column stride, scaled in place.
        grad_output_ptr: fp32 scalar (stride_grad_output 0) or one factor per row.
        stride_grad_group, rows_per_group: rows in groups (``_row_offset``).
        BLOCK_SIZE: columns per load.
    """
    first_row = tl.program_id(0).to(tl.int64)  # 64-bit row offsets
    for row in range(first_row, n_rows, tl.num_programs(0)):
        factor = tl.load(grad_output_ptr + row * stride_grad_output).to(tl.float32)
        if factor != 1.0:
            row_ptr = grad_ptr + _row_offset(row, rows_per_group, stride_grad_group,
                                             stride_grad_row)
            for start in range(0, n_cols, BLOCK_SIZE):
                offs = start + tl.arange(0, BLOCK_SIZE)
                mask = offs < n_cols
                g = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                tl.store(row_ptr + offs, (g * factor).to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def ce_scale_kernel(
    target_ptr,
    weight_ptr,
    token_weight_ptr,
    items_ptr,
    scale_ptr,
    n_rows,
    n_cols,
    ignore_index,
    BLOCK_SIZE: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_TOKEN_WEIGHT: tl.constexpr,
    HAS_ITEMS: tl.constexpr,
):
    """The reduction scale of ``mean`` in one program: 1 / (the number, or the class weight
    times the token weight, of the counted targets), 0 when that is 0; or 1 /
    num_items_in_batch.

    Args:
        target_ptr: (n_rows,) int64 class ids.
        weight_ptr: (n_cols,) fp32 class weights, read when HAS_WEIGHT.
        token_weight_ptr: (n_rows,) fp32 token weights, read (for counted rows only) when
            HAS_TOKEN_WEIGHT.
        items_ptr: one number of any dtype (num_items_in_batch), read when HAS_ITEMS.
        scale_ptr: (1,) fp32 out.
        BLOCK_SIZE: rows per load; the sum runs in a fixed order (bitwise reproducible).
    """
    if HAS_ITEMS:
        tl.store(scale_ptr, 1.0 / tl.load(items_ptr).to(tl.float32))
    else:
        acc = tl.zeros([BLOCK_SIZE], tl.float32)
        for start in range(0, n_rows, BLOCK_SIZE):
            offs = start + tl.arange(0, BLOCK_SIZE)
            t = tl.load(target_ptr + offs, mask=offs < n_rows, other=ignore_index).to(tl.int64)
            counted = t != ignore_index
            w = tl.where(counted, 1.0, 0.0)
            if HAS_WEIGHT:
                safe = tl.minimum(tl.maximum(t, 0), n_cols - 1)
                w = tl.where(counted, tl.load(weight_ptr + safe, mask=counted, other=0.0), 0.0)
            if HAS_TOKEN_WEIGHT:
                w = tl.where(counted, w * tl.load(token_weight_ptr + offs, mask=counted,
                                                  other=0.0), 0.0)
            acc += w
        denom = tl.sum(acc, axis=0)
        tl.store(scale_ptr, tl.where(denom != 0.0, 1.0 / denom, 0.0))


@triton.jit
def ce_reduce_kernel(
    rows_ptr,
    scale_ptr,
    out_ptr,
    n_rows,
    BLOCK_SIZE: tl.constexpr,
    MEAN: tl.constexpr,
):
    """out = sum(rows) (times the scale for ``mean``, +0 when the scale is 0), in out's dtype,
    in one program and a fixed order (bitwise reproducible).

    Args:
        rows_ptr: (n_rows,) fp32 per-row values; scale_ptr: (1,) fp32, read when MEAN;
        out_ptr: () the reduced value, any float dtype.
    """
    acc = tl.zeros([BLOCK_SIZE], tl.float32)
    for start in range(0, n_rows, BLOCK_SIZE):
        offs = start + tl.arange(0, BLOCK_SIZE)
        acc += tl.load(rows_ptr + offs, mask=offs < n_rows, other=0.0)
    total = tl.sum(acc, axis=0)
    if MEAN:
        scale = tl.load(scale_ptr)
        total = tl.where(scale != 0.0, total * scale, 0.0)
    tl.store(out_ptr, total.to(out_ptr.dtype.element_ty))
