"""Triton kernel for distillation losses against a teacher given as logits.  This module
imports only Triton.

One program per row reads the student's logits ``z`` and the teacher's ``y`` in blocks, with
``v = z / T`` and ``u = y / T`` (``inv_t = 1 / T``), ``q = softmax(v)``, ``p = softmax(u)``:

1. both log-sum-exps online, per lane (the online softmax of Milakov & Gimelshein, "Online
   normalizer calculation for softmax", 2018), and the running sums each divergence needs:
   forward KL ``KL(p || q) = sum p (u - v) - lse_u + lse_v`` from ``A = sum exp(u - m_u) (u -
   v)``; reverse KL from ``B = sum exp(v - m_v) (v - u)``; the student's entropy from ``E =
   sum exp(v - m_v) (v - m_v)`` (``H = log d_v - E / d_v``); each lane's first argmax of ``z``
   and ``y``; with a hard label at ``T != 1``, ``z``'s own log-sum-exp;
2. for the generalized JSD only, ``KL(p || m)`` and ``KL(q || m)`` with ``log m = logaddexp(log
   q + log(1 - beta), log p + log(beta))``, now that both log-sum-exps are known;
3. the gradient of ``z``, times the row's factor: ``(q - p) / T`` (forward KL), ``q ((log q -
   log p) - KL) / T`` (reverse KL), ``(1 - beta) q ((log q - log m) - KL(q || m)) / T`` (JSD),
   plus ``hard_weight * (softmax(z) - onehot(target))``.

A lane's running sums move to a new maximum ``m'`` by ``f = exp(m - m')``: ``d' = f d``,
``A' = f A`` (teacher sums by the teacher's maximum), ``E' = f (E - (m' - m) d)``.  Masked
columns add nothing (their terms are selected out before they can make ``0 * inf``).

Few rows cannot fill the GPU one program per row, so the vocabulary is then split across
programs (the split path): ``*_partial_kernel`` runs pass 1 over one chunk of a row and stores
the chunk's statistics, already merged over its lanes; ``*_merge_kernel`` merges a row's
chunks with the same arithmetic that merges lanes (a chunk's ``(m, d, A, E)`` is a lane's, one
level up) and finishes the row; ``kd_jsd_partial_kernel`` sums the JSD's two terms per chunk;
``*_grad_kernel`` writes each chunk's gradient from the row's finished values.  The one-program
kernels call the same pass functions over the whole row.
"""

from __future__ import annotations

import triton
import triton.language as tl

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)
_MIN_F32 = tl.constexpr(-3.4028234663852886e38)
_MAX_I32 = tl.constexpr(2147483647)


@triton.jit
def _exp(x):
    return tl.math.exp2(x * _LOG2E)


@triton.jit
def _log(x):
    return tl.math.log2(x) * _LN2


@triton.jit
def _lse_step(m, d, x, mask):
    """One block into each lane's running (max, sum of exp): masked columns add nothing."""
    xm = tl.where(mask, x, -float("inf"))
    new = tl.maximum(m, xm)
    return new, d * _exp(m - new) + tl.where(mask, _exp(xm - new), 0.0)


@triton.jit
def _lse_lanes(m, d):
    """The lanes' running (max, sum of exp) merged into the row's log-sum-exp."""
    top = tl.max(m, axis=0)
    return top + _log(tl.sum(d * _exp(m - top), axis=0))


@triton.jit
def _merge_lse(m, d):
    """Running (max, sum of exp) pairs (lanes, or a row's chunks) merged: (max, sum relative
    to it, each pair's factor ``exp(m - max)``)."""
    top = tl.max(m, axis=0)
    s = _exp(m - top)
    return top, tl.sum(d * s, axis=0), s


@triton.jit
def _merge_entropy(m, d, e, top, s):
    """Entropy sums ``E`` (each relative to its own max ``m``) moved to ``top`` and added:
    ``f (E + (m - top) d)``."""
    return tl.sum(tl.where(d > 0.0, s * (e + (m - top) * d), 0.0), axis=0)


@triton.jit
def _merge_argmax(best, idx):
    """The first index of the largest value among (value, first index) pairs."""
    top = tl.max(best, axis=0)
    return top, tl.min(tl.where(best == top, idx, _MAX_I32), axis=0)


@triton.jit
def _label(target_ptr, row, n_cols, ignore_index):
    """A row's hard label and whether it counts (not ignored, in range)."""
    target = tl.load(target_ptr + row)
    return target, (target != ignore_index) & (target >= 0) & (target < n_cols)


@triton.jit
def _hard_label(s_row, target_ptr, row, n_cols, ignore_index, lse_z):
    """The hard label: (cross-entropy at temperature 1, the label, whether it counts); its
    logit is one load, read before any gradient is written."""
    target, here = _label(target_ptr, row, n_cols, ignore_index)
    z_t = tl.load(s_row + tl.where(here, target, 0), mask=here, other=0.0).to(tl.float32)
    return tl.where(here, lse_z - z_t, 0.0), target, here


@triton.jit
def _chunk(n_cols, cols_per_split):
    """This program's columns [c0, c1) of its row (axis 1 of the grid)."""
    c0 = tl.program_id(1) * cols_per_split
    return c0, tl.minimum(c0 + cols_per_split, n_cols)


@triton.jit
def _kd_scan(s_row, t_row, c0, c1, inv_t, BLOCK_SIZE: tl.constexpr, DIVERGENCE: tl.constexpr,
             STATS: tl.constexpr, HARD_LSE: tl.constexpr):
    """Pass 1 over columns [c0, c1): each lane's running sums (module docstring, step 1)."""
    m_v = tl.full([BLOCK_SIZE], _MIN_F32, tl.float32)
    d_v = tl.zeros([BLOCK_SIZE], tl.float32)
    m_u = tl.full([BLOCK_SIZE], _MIN_F32, tl.float32)
    d_u = tl.zeros([BLOCK_SIZE], tl.float32)
    acc = tl.zeros([BLOCK_SIZE], tl.float32)  # A (forward KL) or B (reverse KL)
    e_v = tl.zeros([BLOCK_SIZE], tl.float32)
    m_z = tl.full([BLOCK_SIZE], _MIN_F32, tl.float32)
    d_z = tl.zeros([BLOCK_SIZE], tl.float32)
    top_z = tl.full([BLOCK_SIZE], _MIN_F32, tl.float32)
    top_y = tl.full([BLOCK_SIZE], _MIN_F32, tl.float32)
    idx_z = tl.full([BLOCK_SIZE], _MAX_I32, tl.int32)
    idx_y = tl.full([BLOCK_SIZE], _MAX_I32, tl.int32)
    for start in range(c0, c1, BLOCK_SIZE):
        offs = start + tl.arange(0, BLOCK_SIZE)
        mask = offs < c1
        z = tl.load(s_row + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(t_row + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.where(mask, z * inv_t, -float("inf"))
        u = tl.where(mask, y * inv_t, -float("inf"))
        new_v = tl.maximum(m_v, v)
        f_v = _exp(m_v - new_v)
        t_v = tl.where(mask, _exp(v - new_v), 0.0)
        new_u = tl.maximum(m_u, u)
        f_u = _exp(m_u - new_u)
        t_u = tl.where(mask, _exp(u - new_u), 0.0)
        if DIVERGENCE == 0:
            acc = acc * f_u + tl.where(mask, t_u * (u - v), 0.0)
        if DIVERGENCE == 1:
            acc = acc * f_v + tl.where(mask, t_v * (v - u), 0.0)
        if STATS:
            e_v = f_v * (e_v - (new_v - m_v) * d_v) + tl.where(mask, t_v * (v - new_v), 0.0)
            zm = tl.where(mask, z, -float("inf"))
            ym = tl.where(mask, y, -float("inf"))
            idx_z = tl.where(zm > top_z, offs, idx_z)
            top_z = tl.maximum(top_z, zm)
            idx_y = tl.where(ym > top_y, offs, idx_y)
            top_y = tl.maximum(top_y, ym)
        if HARD_LSE:
            m_z, d_z = _lse_step(m_z, d_z, z, mask)
        d_v = d_v * f_v + t_v
        m_v = new_v
        d_u = d_u * f_u + t_u
        m_u = new_u
    return m_v, d_v, m_u, d_u, acc, e_v, m_z, d_z, top_z, idx_z, top_y, idx_y


@triton.jit
def _kd_merge(m_v, d_v, m_u, d_u, acc, e_v, m_z, d_z, top_z, idx_z, top_y, idx_y,
              DIVERGENCE: tl.constexpr):
    """Lanes' (or a row's chunks') running sums merged: the scalars of ``_kd_scan``'s
    outputs, each sum relative to the merged max of its own distribution."""
    mv, dv, sv = _merge_lse(m_v, d_v)
    mu, du, su = _merge_lse(m_u, d_u)
    if DIVERGENCE == 0:
        acc_s = tl.sum(acc * su, axis=0)
    else:
        acc_s = tl.sum(acc * sv, axis=0)
    e_s = _merge_entropy(m_v, d_v, e_v, mv, sv)
    mz, dz, sz = _merge_lse(m_z, d_z)
    best_z, first_z = _merge_argmax(top_z, idx_z)
    best_y, first_y = _merge_argmax(top_y, idx_y)
    return mv, dv, mu, du, acc_s, e_s, mz, dz, best_z, first_z, best_y, first_y


@triton.jit
def _kd_finish(mv, dv, mu, du, acc_s, DIVERGENCE: tl.constexpr):
    """(log-sum-exp of v, of u, the KL divergence; 0 for the JSD, summed later)."""
    lse_v = mv + _log(dv)
    lse_u = mu + _log(du)
    div = 0.0
    if DIVERGENCE == 0:
        div = acc_s / du - lse_u + lse_v
    if DIVERGENCE == 1:
        div = acc_s / dv - lse_v + lse_u
    return lse_v, lse_u, div


@triton.jit
def _log_mix(log_q, log_p, log_beta, log_1m_beta):
    """log m = logaddexp(log q + log(1 - beta), log p + log(beta))."""
    a = log_q + log_1m_beta
    b = log_p + log_beta
    hi = tl.maximum(a, b)
    return hi + _log(1.0 + _exp(tl.minimum(a, b) - hi))


@triton.jit
def _kd_jsd_sums(s_row, t_row, c0, c1, lse_v, lse_u, inv_t, log_beta, log_1m_beta,
                 BLOCK_SIZE: tl.constexpr):
    """Pass 2 (JSD) over columns [c0, c1): (sum p (log p - log m), sum q (log q - log m))."""
    kl_p_vec = tl.zeros([BLOCK_SIZE], tl.float32)
    kl_q_vec = tl.zeros([BLOCK_SIZE], tl.float32)
    for start in range(c0, c1, BLOCK_SIZE):
        offs = start + tl.arange(0, BLOCK_SIZE)
        mask = offs < c1
        z = tl.load(s_row + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(t_row + offs, mask=mask, other=0.0).to(tl.float32)
        log_q = z * inv_t - lse_v
        log_p = y * inv_t - lse_u
        log_m = _log_mix(log_q, log_p, log_beta, log_1m_beta)
        p = _exp(log_p)
        q = _exp(log_q)
        kl_p_vec += tl.where(mask & (p > 0.0), p * (log_p - log_m), 0.0)
        kl_q_vec += tl.where(mask & (q > 0.0), q * (log_q - log_m), 0.0)
    return tl.sum(kl_p_vec, axis=0), tl.sum(kl_q_vec, axis=0)


@triton.jit
def _kd_grad(s_row, t_row, g_row, c0, c1, lse_v, lse_u, div, kl_q, lse_z, target, here,
             factor, inv_t, beta, log_beta, log_1m_beta, hard_weight,
             BLOCK_SIZE: tl.constexpr, DIVERGENCE: tl.constexpr, HAS_HARD: tl.constexpr):
    """The last pass over columns [c0, c1): the gradient of the student logits times the
    row's factor (module docstring, step 3); each block is read before it is written."""
    for start in range(c0, c1, BLOCK_SIZE):
        offs = start + tl.arange(0, BLOCK_SIZE)
        mask = offs < c1
        z = tl.load(s_row + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(t_row + offs, mask=mask, other=0.0).to(tl.float32)
        log_q = z * inv_t - lse_v
        log_p = y * inv_t - lse_u
        q = _exp(log_q)
        if DIVERGENCE == 0:
            g = q - _exp(log_p)
        elif DIVERGENCE == 1:
            g = tl.where(q > 0.0, q * ((log_q - log_p) - div), 0.0)
        else:
            log_m = _log_mix(log_q, log_p, log_beta, log_1m_beta)
            g = tl.where(q > 0.0, (1.0 - beta) * q * ((log_q - log_m) - kl_q), 0.0)
        g = g * inv_t
        if HAS_HARD:
            s = _exp(z - lse_z)
            g += hard_weight * (s - tl.where((offs == target) & here, 1.0, 0.0))
        g = tl.where(factor != 0.0, g * factor, 0.0)
        tl.store(g_row + offs, g.to(g_row.dtype.element_ty), mask=mask)


@triton.jit
def kd_fwd_kernel(
    student_ptr,  # (N, C) student logits, any float dtype, unit column stride
    teacher_ptr,  # (N, C) teacher logits, any float dtype, unit column stride
    target_ptr,  # (N,) int64 hard labels (read when HAS_HARD)
    factor_ptr,  # (N,) fp32 row factors: counted mask x token weight / the mean's denominator
    loss_ptr,  # (N,) fp32 out: (divergence + hard_weight * cross-entropy) x factor
    div_ptr,  # (N,) fp32 out: the divergence (0 where the factor is 0)
    entropy_ptr,  # (N,) fp32 out: the student's entropy (STATS)
    agree_ptr,  # (N,) fp32 out: 1 where the student's and teacher's argmax agree (STATS)
    grad_ptr,  # (N, C) out: factor x the gradient of the student logits (COMPUTE_GRAD)
    stride_student_row,
    stride_teacher_row,
    stride_grad_row,
    n_cols,
    inv_t,  # 1 / temperature
    beta,  # JSD mixture weight of the teacher
    log_beta,
    log_1m_beta,
    hard_weight,
    ignore_index,
    BLOCK_SIZE: tl.constexpr,
    DIVERGENCE: tl.constexpr,  # 0 forward KL, 1 reverse KL, 2 JSD
    HAS_HARD: tl.constexpr,
    HARD_LSE: tl.constexpr,  # the hard label needs z's own log-sum-exp (temperature != 1)
    STATS: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
):
    """Distillation, one program per row: see the module docstring.  ``grad_ptr`` may alias
    ``student_ptr`` (in-place backward): each block is read in the last pass before it is
    written, and the target's logit is read in pass 1."""
    row = tl.program_id(0).to(tl.int64)
    s_row = student_ptr + row * stride_student_row
    t_row = teacher_ptr + row * stride_teacher_row
    factor = tl.load(factor_ptr + row)

    # 1. Online statistics, per lane, then merged.
    m_v, d_v, m_u, d_u, acc, e_v, m_z, d_z, top_z, idx_z, top_y, idx_y = _kd_scan(
        s_row, t_row, 0, n_cols, inv_t, BLOCK_SIZE, DIVERGENCE, STATS, HARD_LSE)
    mv, dv, mu, du, acc_s, e_s, mz, dz, best_z, first_z, best_y, first_y = _kd_merge(
        m_v, d_v, m_u, d_u, acc, e_v, m_z, d_z, top_z, idx_z, top_y, idx_y, DIVERGENCE)
    lse_v, lse_u, div = _kd_finish(mv, dv, mu, du, acc_s, DIVERGENCE)

    # 2. The generalized JSD's two sums, from the known log-sum-exps.
    kl_q = 0.0
    if DIVERGENCE == 2:
        kl_p, kl_q = _kd_jsd_sums(s_row, t_row, 0, n_cols, lse_v, lse_u, inv_t, log_beta,
                                  log_1m_beta, BLOCK_SIZE)
        div = beta * kl_p + (1.0 - beta) * kl_q

    # The hard label's cross-entropy at temperature 1 (its logit read before any write).
    ce = 0.0
    lse_z = lse_v
    target = 0
    here = False
    if HAS_HARD:
        if HARD_LSE:
            lse_z = mz + _log(dz)
        ce, target, here = _hard_label(s_row, target_ptr, row, n_cols, ignore_index, lse_z)
    tl.store(loss_ptr + row, (div + hard_weight * ce) * factor)
    tl.store(div_ptr + row, tl.where(factor != 0.0, div, 0.0))
    if STATS:
        tl.store(entropy_ptr + row, _log(dv) - e_s / dv)
        tl.store(agree_ptr + row, tl.where(first_z == first_y, 1.0, 0.0))

    # 3. The gradient of the student logits, times the row's factor.
    if COMPUTE_GRAD:
        _kd_grad(s_row, t_row, grad_ptr + row * stride_grad_row, 0, n_cols, lse_v, lse_u, div,
                 kl_q, lse_z, target, here, factor, inv_t, beta, log_beta, log_1m_beta,
                 hard_weight, BLOCK_SIZE, DIVERGENCE, HAS_HARD)


@triton.jit
def kd_partial_kernel(
    student_ptr,  # (N, C) student logits, unit column stride
    teacher_ptr,  # (N, C) teacher logits, unit column stride
    part_ptr,  # (10, N, S) fp32 out: each chunk's mv, dv, mu, du, A or B, E, mz, dz, best z, y
    first_ptr,  # (2, N, S) int32 out: each chunk's first argmax of z and of y (STATS)
    stride_student_row,
    stride_teacher_row,
    n_rows,
    n_cols,
    cols_per_split,
    n_splits,
    inv_t,
    BLOCK_SIZE: tl.constexpr,
    DIVERGENCE: tl.constexpr,
    HARD_LSE: tl.constexpr,
    STATS: tl.constexpr,
):
    """The split path's pass 1: one chunk of a row, its lanes merged (``_kd_merge``)."""
    row = tl.program_id(0).to(tl.int64)
    c0, c1 = _chunk(n_cols, cols_per_split)
    m_v, d_v, m_u, d_u, acc, e_v, m_z, d_z, top_z, idx_z, top_y, idx_y = _kd_scan(
        student_ptr + row * stride_student_row, teacher_ptr + row * stride_teacher_row, c0, c1,
        inv_t, BLOCK_SIZE, DIVERGENCE, STATS, HARD_LSE)
    mv, dv, mu, du, acc_s, e_s, mz, dz, best_z, first_z, best_y, first_y = _kd_merge(
        m_v, d_v, m_u, d_u, acc, e_v, m_z, d_z, top_z, idx_z, top_y, idx_y, DIVERGENCE)
    at = row * n_splits + tl.program_id(1)
    plane = n_rows * n_splits
    tl.store(part_ptr + at, mv)
    tl.store(part_ptr + plane + at, dv)
    tl.store(part_ptr + 2 * plane + at, mu)
    tl.store(part_ptr + 3 * plane + at, du)
    tl.store(part_ptr + 4 * plane + at, acc_s)
    tl.store(part_ptr + 5 * plane + at, e_s)
    tl.store(part_ptr + 6 * plane + at, mz)
    tl.store(part_ptr + 7 * plane + at, dz)
    tl.store(part_ptr + 8 * plane + at, best_z)
    tl.store(part_ptr + 9 * plane + at, best_y)
    tl.store(first_ptr + at, first_z)
    tl.store(first_ptr + plane + at, first_y)


@triton.jit
def kd_merge_kernel(
    student_ptr,  # (N, C) student logits (the hard label's logit)
    part_ptr,  # (10, N, S) fp32 from kd_partial_kernel
    first_ptr,  # (2, N, S) int32 from kd_partial_kernel
    target_ptr,  # (N,) int64 hard labels (HAS_HARD)
    row_ptr,  # (5, N) fp32 out: lse of v, lse of u, lse of z, the KL (0: JSD), hard-label CE
    entropy_ptr,  # (N,) fp32 out (STATS)
    agree_ptr,  # (N,) fp32 out (STATS)
    stride_student_row,
    n_rows,
    n_cols,
    n_splits,
    ignore_index,
    SPLIT_BLOCK: tl.constexpr,  # n_splits rounded up to a power of two
    DIVERGENCE: tl.constexpr,
    HAS_HARD: tl.constexpr,
    HARD_LSE: tl.constexpr,
    STATS: tl.constexpr,
):
    """The split path: a row's chunks merged as lanes are, and the row finished."""
    row = tl.program_id(0).to(tl.int64)
    ss = tl.arange(0, SPLIT_BLOCK)
    live = ss < n_splits
    at = part_ptr + row * n_splits + ss
    plane = n_rows * n_splits
    mv, dv, mu, du, acc_s, e_s, mz, dz, best_z, first_z, best_y, first_y = _kd_merge(
        tl.load(at, mask=live, other=_MIN_F32),
        tl.load(at + plane, mask=live, other=0.0),
        tl.load(at + 2 * plane, mask=live, other=_MIN_F32),
        tl.load(at + 3 * plane, mask=live, other=0.0),
        tl.load(at + 4 * plane, mask=live, other=0.0),
        tl.load(at + 5 * plane, mask=live, other=0.0),
        tl.load(at + 6 * plane, mask=live, other=_MIN_F32),
        tl.load(at + 7 * plane, mask=live, other=0.0),
        tl.load(at + 8 * plane, mask=live, other=_MIN_F32),
        tl.load(first_ptr + row * n_splits + ss, mask=live, other=_MAX_I32),
        tl.load(at + 9 * plane, mask=live, other=_MIN_F32),
        tl.load(first_ptr + plane + row * n_splits + ss, mask=live, other=_MAX_I32),
        DIVERGENCE)
    lse_v, lse_u, div = _kd_finish(mv, dv, mu, du, acc_s, DIVERGENCE)
    ce = 0.0
    lse_z = lse_v
    if HAS_HARD:
        if HARD_LSE:
            lse_z = mz + _log(dz)
        ce, target, here = _hard_label(student_ptr + row * stride_student_row, target_ptr,
                                       row, n_cols, ignore_index, lse_z)
    tl.store(row_ptr + row, lse_v)
    tl.store(row_ptr + n_rows + row, lse_u)
    tl.store(row_ptr + 2 * n_rows + row, lse_z)
    tl.store(row_ptr + 3 * n_rows + row, div)
    tl.store(row_ptr + 4 * n_rows + row, ce)
    if STATS:
        tl.store(entropy_ptr + row, _log(dv) - e_s / dv)
        tl.store(agree_ptr + row, tl.where(first_z == first_y, 1.0, 0.0))


@triton.jit
def kd_jsd_partial_kernel(
    student_ptr,
    teacher_ptr,
    row_ptr,  # (5, N) fp32 from kd_merge_kernel
    part_ptr,  # (2, N, S) fp32 out: each chunk's two JSD sums
    stride_student_row,
    stride_teacher_row,
    n_rows,
    n_cols,
    cols_per_split,
    n_splits,
    inv_t,
    log_beta,
    log_1m_beta,
    BLOCK_SIZE: tl.constexpr,
):
    """The split path's JSD pass over one chunk of a row."""
    row = tl.program_id(0).to(tl.int64)
    c0, c1 = _chunk(n_cols, cols_per_split)
    kl_p, kl_q = _kd_jsd_sums(student_ptr + row * stride_student_row,
                              teacher_ptr + row * stride_teacher_row, c0, c1,
                              tl.load(row_ptr + row), tl.load(row_ptr + n_rows + row), inv_t,
                              log_beta, log_1m_beta, BLOCK_SIZE)
    at = row * n_splits + tl.program_id(1)
    tl.store(part_ptr + at, kl_p)
    tl.store(part_ptr + n_rows * n_splits + at, kl_q)


@triton.jit
def kd_grad_kernel(
    student_ptr,
    teacher_ptr,
    row_ptr,  # (5, N) fp32: kd_merge_kernel's values, the divergence in place of the KL
    kl_q_ptr,  # (N,) fp32 the JSD's KL(q || m) (DIVERGENCE 2)
    target_ptr,  # (N,) int64 (HAS_HARD)
    factor_ptr,  # (N,) fp32
    grad_ptr,  # (N, C) out; may alias student_ptr
    stride_student_row,
    stride_teacher_row,
    stride_grad_row,
    n_rows,
    n_cols,
    cols_per_split,
    inv_t,
    beta,
    log_beta,
    log_1m_beta,
    hard_weight,
    ignore_index,
    BLOCK_SIZE: tl.constexpr,
    DIVERGENCE: tl.constexpr,
    HAS_HARD: tl.constexpr,
):
    """The split path's gradient over one chunk of a row."""
    row = tl.program_id(0).to(tl.int64)
    c0, c1 = _chunk(n_cols, cols_per_split)
    kl_q = 0.0
    if DIVERGENCE == 2:
        kl_q = tl.load(kl_q_ptr + row)
    target = 0
    here = False
    if HAS_HARD:
        target, here = _label(target_ptr, row, n_cols, ignore_index)
    _kd_grad(student_ptr + row * stride_student_row, teacher_ptr + row * stride_teacher_row,
             grad_ptr + row * stride_grad_row, c0, c1, tl.load(row_ptr + row),
             tl.load(row_ptr + n_rows + row), tl.load(row_ptr + 3 * n_rows + row), kl_q,
             tl.load(row_ptr + 2 * n_rows + row), target, here, tl.load(factor_ptr + row),
             inv_t, beta, log_beta, log_1m_beta, hard_weight, BLOCK_SIZE, DIVERGENCE,
             HAS_HARD)


@triton.jit
def _bucket_g(lq, lp, DIVERGENCE: tl.constexpr, beta, log_beta, log_1m_beta):
    """Per-bucket pieces for log-masses ``lq``, ``lp`` (``-inf`` for an empty bucket): the
    divergence's terms, and what ``G`` needs before the row's sums are known."""
    q = _exp(lq)
    p = _exp(lp)
    if DIVERGENCE == 0:
        terms = tl.where(p > 0.0, p * (lp - lq), 0.0)
        g = tl.where(q > 0.0, 1.0 - p / q, 0.0)
        return terms, g, terms * 0.0
    elif DIVERGENCE == 1:
        r = tl.where(q > 0.0, lq - lp, 0.0)
        return q * r, r, q * r
    else:
        lm = _log_mix(lq, lp, log_beta, log_1m_beta)
        kp = tl.where(p > 0.0, p * (lp - lm), 0.0)
        s = tl.where(q > 0.0, lq - lm, 0.0)
        return beta * kp + (1.0 - beta) * q * s, (1.0 - beta) * s, q * s


@triton.jit
def _topk_ids(ids_ptr, logprobs_ptr, row, k, K_BLOCK: tl.constexpr):
    """A row's ids (-1 unused), whether each slot is used, and the teacher's log-probabilities
    (-inf where unused)."""
    kk = tl.arange(0, K_BLOCK)
    ids = tl.load(ids_ptr + row * k + kk, mask=kk < k, other=-1)
    used = ids >= 0
    lp_ids = tl.where(used, tl.load(logprobs_ptr + row * k + kk, mask=kk < k, other=0.0)
                      .to(tl.float32), -float("inf"))
    return kk, ids, used, lp_ids


@triton.jit
def _topk_scan(s_row, c0, c1, ids, inv_t, BLOCK_SIZE: tl.constexpr, STATS: tl.constexpr,
               HARD_LSE: tl.constexpr):
    """Pass 1 over columns [c0, c1): each lane's (m, d) over every column and over the tail
    (the columns outside the ids), the entropy sum, the argmax, z's own (m, d)."""
    m = tl.full([BLOCK_SIZE], _MIN_F32, tl.float32)
    d = tl.zeros([BLOCK_SIZE], tl.float32)
    m_o = tl.full([BLOCK_SIZE], _MIN_F32, tl.float32)
    d_o = tl.zeros([BLOCK_SIZE], tl.float32)
    e = tl.zeros([BLOCK_SIZE], tl.float32)
    m_z = tl.full([BLOCK_SIZE], _MIN_F32, tl.float32)
    d_z = tl.zeros([BLOCK_SIZE], tl.float32)
    top = tl.full([BLOCK_SIZE], _MIN_F32, tl.float32)
    idx = tl.full([BLOCK_SIZE], _MAX_I32, tl.int32)
    for start in range(c0, c1, BLOCK_SIZE):
        offs = start + tl.arange(0, BLOCK_SIZE)
        mask = offs < c1
        z = tl.load(s_row + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.where(mask, z * inv_t, -float("inf"))
        new = tl.maximum(m, v)
        f = _exp(m - new)
        t = tl.where(mask, _exp(v - new), 0.0)
        if STATS:
            e = f * (e - (new - m) * d) + tl.where(mask, t * (v - new), 0.0)
            zm = tl.where(mask, z, -float("inf"))
            idx = tl.where(zm > top, offs, idx)
            top = tl.maximum(top, zm)
        d = d * f + t
        m = new
        member = tl.sum(tl.where(offs[:, None] == ids[None, :], 1, 0), axis=1) > 0
        m_o, d_o = _lse_step(m_o, d_o, v, mask & ~member)
        if HARD_LSE:
            m_z, d_z = _lse_step(m_z, d_z, z, mask)
    return m, d, m_o, d_o, e, m_z, d_z, top, idx


@triton.jit
def _topk_merge(m, d, m_o, d_o, e, m_z, d_z, top, idx):
    """Lanes' (or a row's chunks') running sums merged into scalars."""
    mv, dv, sv = _merge_lse(m, d)
    mo, do, so = _merge_lse(m_o, d_o)
    mz, dz, sz = _merge_lse(m_z, d_z)
    best, first = _merge_argmax(top, idx)
    return mv, dv, mo, do, _merge_entropy(m, d, e, mv, sv), mz, dz, best, first


@triton.jit
def _topk_finish(s_row, row, kk, ids, used, lp_ids, mv, dv, mo, do, e_s, mz, dz, first,
                 target_ptr, factor_ptr, loss_ptr, div_ptr, entropy_ptr, agree_ptr, n_cols,
                 inv_t, beta, log_beta, log_1m_beta, hard_weight, ignore_index,
                 K_BLOCK: tl.constexpr, DIVERGENCE: tl.constexpr, RENORMALIZE: tl.constexpr,
                 HAS_HARD: tl.constexpr, HARD_LSE: tl.constexpr, STATS: tl.constexpr):
    """From the row's merged sums: the buckets' masses, the divergence, the row's outputs
    stored, and what the gradient needs: (log-sum-exp, z's log-sum-exp, each id's
    coefficient (``G`` of its bucket; ``q G`` when renormalised), the tail's ``G``, the label,
    whether it counts)."""
    lse = mv + _log(dv)
    lq_tail = mo + _log(do) - lse  # (-inf when every column is an id)
    # The buckets: the ids' student log-probabilities (one load each) and the tail.
    z_ids = tl.load(s_row + tl.where(used, ids, 0), mask=used, other=0.0).to(tl.float32)
    lq_ids = tl.where(used, z_ids * inv_t - lse, -float("inf"))
    if RENORMALIZE:
        mq = tl.max(lq_ids, axis=0)
        lq_ids = lq_ids - (mq + _log(tl.sum(tl.where(used, _exp(lq_ids - mq), 0.0), axis=0)))
        mp = tl.max(lp_ids, axis=0)
        lp_ids = lp_ids - (mp + _log(tl.sum(tl.where(used, _exp(lp_ids - mp), 0.0), axis=0)))
        terms, g_ids, kl_part = _bucket_g(lq_ids, lp_ids, DIVERGENCE, beta, log_beta,
                                          log_1m_beta)
        div = tl.sum(tl.where(used, terms, 0.0), axis=0)
        kl = tl.sum(tl.where(used, kl_part, 0.0), axis=0)
        g_tail = 0.0
    else:
        p_tail = tl.maximum(1.0 - tl.sum(tl.where(used, _exp(lp_ids), 0.0), axis=0), 0.0)
        lp_tail = tl.where(p_tail > 0.0, _log(p_tail), -float("inf"))
        terms, g_ids, kl_part = _bucket_g(lq_ids, lp_ids, DIVERGENCE, beta, log_beta,
                                          log_1m_beta)
        t_terms, g_tail, t_kl = _bucket_g(lq_tail, lp_tail, DIVERGENCE, beta, log_beta,
                                          log_1m_beta)
        div = tl.sum(tl.where(used, terms, 0.0), axis=0) + t_terms
        kl = tl.sum(tl.where(used, kl_part, 0.0), axis=0) + t_kl
    if DIVERGENCE != 0:  # G = r - KL (reverse) or (1 - beta) (s - KL(q || m)) (JSD)
        scale_kl = 1.0 if DIVERGENCE == 1 else 1.0 - beta
        g_ids = g_ids - scale_kl * kl
        g_tail = g_tail - scale_kl * kl
    if RENORMALIZE:
        g_ids = _exp(lq_ids) * g_ids

    factor = tl.load(factor_ptr + row)
    ce = 0.0
    lse_z = lse
    target = 0
    here = False
    if HAS_HARD:
        if HARD_LSE:
            lse_z = mz + _log(dz)
        ce, target, here = _hard_label(s_row, target_ptr, row, n_cols, ignore_index, lse_z)
    tl.store(loss_ptr + row, (div + hard_weight * ce) * factor)
    tl.store(div_ptr + row, tl.where(factor != 0.0, div, 0.0))
    if STATS:
        tl.store(entropy_ptr + row, _log(dv) - e_s / dv)
        best_lp = tl.max(lp_ids, axis=0)
        teacher_top = tl.min(tl.where(used & (lp_ids == best_lp), kk, K_BLOCK), axis=0)
        top_id = tl.sum(tl.where(kk == teacher_top, ids, 0), axis=0)
        tl.store(agree_ptr + row, tl.where(first == top_id, 1.0, 0.0))
    return lse, lse_z, g_ids, g_tail, target, here, factor


@triton.jit
def _topk_grad(s_row, g_row, c0, c1, ids, coef, g_tail, lse, lse_z, target, here, factor,
               inv_t, hard_weight, BLOCK_SIZE: tl.constexpr, RENORMALIZE: tl.constexpr,
               HAS_HARD: tl.constexpr):
    """The gradient over columns [c0, c1): ``q_c`` times its bucket's ``G`` (renormalised: the
    id's own ``q G``, 0 in the tail), times the row's factor."""
    for start in range(c0, c1, BLOCK_SIZE):
        offs = start + tl.arange(0, BLOCK_SIZE)
        mask = offs < c1
        z = tl.load(s_row + offs, mask=mask, other=0.0).to(tl.float32)
        match = offs[:, None] == ids[None, :]
        g_own = tl.sum(tl.where(match, coef[None, :], 0.0), axis=1)
        if RENORMALIZE:
            g = g_own
        else:
            member = tl.sum(tl.where(match, 1, 0), axis=1) > 0
            g = _exp(z * inv_t - lse) * tl.where(member, g_own, g_tail)
        g = g * inv_t
        if HAS_HARD:
            s = _exp(z - lse_z)
            g += hard_weight * (s - tl.where((offs == target) & here, 1.0, 0.0))
        g = tl.where(factor != 0.0, g * factor, 0.0)
        tl.store(g_row + offs, g.to(g_row.dtype.element_ty), mask=mask)


@triton.jit
def kd_topk_kernel(
    student_ptr,  # (N, C) student logits, any float dtype, unit column stride
    ids_ptr,  # (N, K) int64 teacher top-k ids, -1 unused (contiguous)
    logprobs_ptr,  # (N, K) fp32 the teacher's log-probabilities of those ids
    target_ptr,  # (N,) int64 hard labels (HAS_HARD)
    factor_ptr,  # (N,) fp32 row factors
    loss_ptr,  # (N,) fp32 out: (divergence + hard_weight * cross-entropy) x factor
    div_ptr,  # (N,) fp32 out: the divergence (0 where the factor is 0)
    entropy_ptr,  # (N,) fp32 out (STATS)
    agree_ptr,  # (N,) fp32 out (STATS): the student's argmax is the teacher's top id
    grad_ptr,  # (N, C) out: factor x the gradient of the student logits (COMPUTE_GRAD)
    stride_student_row,
    stride_grad_row,
    n_cols,
    k,
    inv_t,
    beta,
    log_beta,
    log_1m_beta,
    hard_weight,
    ignore_index,
    BLOCK_SIZE: tl.constexpr,
    K_BLOCK: tl.constexpr,  # k rounded up to a power of two
    DIVERGENCE: tl.constexpr,
    RENORMALIZE: tl.constexpr,  # tail="renormalize" (else the k + 1 buckets)
    HAS_HARD: tl.constexpr,
    HARD_LSE: tl.constexpr,
    STATS: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
):
    """Distillation against a top-k teacher (``fusedce.distill``'s module docstring), one
    program per row: pass 1 over the student's logits keeps the log-sum-exp of every column and
    of the columns outside the ids (the tail bucket, exact), the entropy sum and the argmax;
    the epilogue forms the buckets' masses, the divergence and each bucket's ``G``; pass 2
    writes ``q_c * G`` (the tail's, or the id's own) times the row's factor.  A column's
    membership in the ids is one comparison with each of the ``K_BLOCK`` ids."""
    row = tl.program_id(0).to(tl.int64)
    s_row = student_ptr + row * stride_student_row
    kk, ids, used, lp_ids = _topk_ids(ids_ptr, logprobs_ptr, row, k, K_BLOCK)
    m, d, m_o, d_o, e, m_z, d_z, top, idx = _topk_scan(s_row, 0, n_cols, ids, inv_t,
                                                       BLOCK_SIZE, STATS, HARD_LSE)
    mv, dv, mo, do, e_s, mz, dz, best, first = _topk_merge(m, d, m_o, d_o, e, m_z, d_z, top,
                                                           idx)
    lse, lse_z, coef, g_tail, target, here, factor = _topk_finish(
        s_row, row, kk, ids, used, lp_ids, mv, dv, mo, do, e_s, mz, dz, first, target_ptr,
        factor_ptr, loss_ptr, div_ptr, entropy_ptr, agree_ptr, n_cols, inv_t, beta, log_beta,
        log_1m_beta, hard_weight, ignore_index, K_BLOCK, DIVERGENCE, RENORMALIZE, HAS_HARD,
        HARD_LSE, STATS)
    if COMPUTE_GRAD:
        _topk_grad(s_row, grad_ptr + row * stride_grad_row, 0, n_cols, ids, coef, g_tail, lse,
                   lse_z, target, here, factor, inv_t, hard_weight, BLOCK_SIZE, RENORMALIZE,
                   HAS_HARD)


@triton.jit
def kd_topk_partial_kernel(
    student_ptr,
    ids_ptr,  # (N, K) int64 (contiguous)
    part_ptr,  # (8, N, S) fp32 out: each chunk's mv, dv, mo, do, E, mz, dz, best z
    first_ptr,  # (N, S) int32 out: each chunk's first argmax (STATS)
    stride_student_row,
    n_rows,
    n_cols,
    cols_per_split,
    n_splits,
    k,
    inv_t,
    BLOCK_SIZE: tl.constexpr,
    K_BLOCK: tl.constexpr,
    HARD_LSE: tl.constexpr,
    STATS: tl.constexpr,
):
    """The split path's pass 1 against a top-k teacher: one chunk of a row."""
    row = tl.program_id(0).to(tl.int64)
    c0, c1 = _chunk(n_cols, cols_per_split)
    kk = tl.arange(0, K_BLOCK)
    ids = tl.load(ids_ptr + row * k + kk, mask=kk < k, other=-1)
    m, d, m_o, d_o, e, m_z, d_z, top, idx = _topk_scan(
        student_ptr + row * stride_student_row, c0, c1, ids, inv_t, BLOCK_SIZE, STATS,
        HARD_LSE)
    mv, dv, mo, do, e_s, mz, dz, best, first = _topk_merge(m, d, m_o, d_o, e, m_z, d_z, top,
                                                           idx)
    at = row * n_splits + tl.program_id(1)
    plane = n_rows * n_splits
    tl.store(part_ptr + at, mv)
    tl.store(part_ptr + plane + at, dv)
    tl.store(part_ptr + 2 * plane + at, mo)
    tl.store(part_ptr + 3 * plane + at, do)
    tl.store(part_ptr + 4 * plane + at, e_s)
    tl.store(part_ptr + 5 * plane + at, mz)
    tl.store(part_ptr + 6 * plane + at, dz)
    tl.store(part_ptr + 7 * plane + at, best)
    tl.store(first_ptr + at, first)


@triton.jit
def kd_topk_merge_kernel(
    student_ptr,
    ids_ptr,
    logprobs_ptr,
    part_ptr,  # (8, N, S) fp32 from kd_topk_partial_kernel
    first_ptr,  # (N, S) int32
    target_ptr,
    factor_ptr,
    loss_ptr,
    div_ptr,
    entropy_ptr,
    agree_ptr,
    coef_ptr,  # (N, K_BLOCK) fp32 out: each id's gradient coefficient
    row_ptr,  # (3, N) fp32 out: the tail's G, the log-sum-exp, z's log-sum-exp
    stride_student_row,
    n_rows,
    n_cols,
    n_splits,
    k,
    inv_t,
    beta,
    log_beta,
    log_1m_beta,
    hard_weight,
    ignore_index,
    SPLIT_BLOCK: tl.constexpr,
    K_BLOCK: tl.constexpr,
    DIVERGENCE: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    HAS_HARD: tl.constexpr,
    HARD_LSE: tl.constexpr,
    STATS: tl.constexpr,
):
    """The split path against a top-k teacher: a row's chunks merged, the row finished."""
    row = tl.program_id(0).to(tl.int64)
    ss = tl.arange(0, SPLIT_BLOCK)
    live = ss < n_splits
    at = part_ptr + row * n_splits + ss
    plane = n_rows * n_splits
    mv, dv, mo, do, e_s, mz, dz, best, first = _topk_merge(
        tl.load(at, mask=live, other=_MIN_F32),
        tl.load(at + plane, mask=live, other=0.0),
        tl.load(at + 2 * plane, mask=live, other=_MIN_F32),
        tl.load(at + 3 * plane, mask=live, other=0.0),
        tl.load(at + 4 * plane, mask=live, other=0.0),
        tl.load(at + 5 * plane, mask=live, other=_MIN_F32),
        tl.load(at + 6 * plane, mask=live, other=0.0),
        tl.load(at + 7 * plane, mask=live, other=_MIN_F32),
        tl.load(first_ptr + row * n_splits + ss, mask=live, other=_MAX_I32))
    kk, ids, used, lp_ids = _topk_ids(ids_ptr, logprobs_ptr, row, k, K_BLOCK)
    lse, lse_z, coef, g_tail, target, here, factor = _topk_finish(
        student_ptr + row * stride_student_row, row, kk, ids, used, lp_ids, mv, dv, mo, do,
        e_s, mz, dz, first, target_ptr, factor_ptr, loss_ptr, div_ptr, entropy_ptr, agree_ptr,
        n_cols, inv_t, beta, log_beta, log_1m_beta, hard_weight, ignore_index, K_BLOCK,
        DIVERGENCE, RENORMALIZE, HAS_HARD, HARD_LSE, STATS)
    tl.store(coef_ptr + row * K_BLOCK + kk, coef)
    tl.store(row_ptr + row, g_tail)
    tl.store(row_ptr + n_rows + row, lse)
    tl.store(row_ptr + 2 * n_rows + row, lse_z)


@triton.jit
def kd_topk_grad_kernel(
    student_ptr,
    ids_ptr,
    coef_ptr,  # (N, K_BLOCK) fp32 from kd_topk_merge_kernel
    row_ptr,  # (3, N) fp32 from kd_topk_merge_kernel
    target_ptr,
    factor_ptr,
    grad_ptr,  # (N, C) out; may alias student_ptr
    stride_student_row,
    stride_grad_row,
    n_rows,
    n_cols,
    cols_per_split,
    k,
    inv_t,
    hard_weight,
    ignore_index,
    BLOCK_SIZE: tl.constexpr,
    K_BLOCK: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    HAS_HARD: tl.constexpr,
):
    """The split path's gradient against a top-k teacher, over one chunk of a row."""
    row = tl.program_id(0).to(tl.int64)
    c0, c1 = _chunk(n_cols, cols_per_split)
    kk = tl.arange(0, K_BLOCK)
    ids = tl.load(ids_ptr + row * k + kk, mask=kk < k, other=-1)
    target = 0
    here = False
    if HAS_HARD:
        target, here = _label(target_ptr, row, n_cols, ignore_index)
    _topk_grad(student_ptr + row * stride_student_row, grad_ptr + row * stride_grad_row, c0,
               c1, ids, tl.load(coef_ptr + row * K_BLOCK + kk), tl.load(row_ptr + row),
               tl.load(row_ptr + n_rows + row), tl.load(row_ptr + 2 * n_rows + row), target,
               here, tl.load(factor_ptr + row), inv_t, hard_weight, BLOCK_SIZE, RENORMALIZE,
               HAS_HARD)
