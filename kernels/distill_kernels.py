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
def _hard_label(s_row, target_ptr, row, n_cols, ignore_index, lse_z):
    """The hard label: (cross-entropy at temperature 1, the label, whether it counts); its
    logit is one load, read before any gradient is written."""
    target = tl.load(target_ptr + row)
    here = (target != ignore_index) & (target >= 0) & (target < n_cols)
    z_t = tl.load(s_row + tl.where(here, target, 0), mask=here, other=0.0).to(tl.float32)
    return tl.where(here, lse_z - z_t, 0.0), target, here


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
    """Distillation per row: see the module docstring.  ``grad_ptr`` may alias
    ``student_ptr`` (in-place backward): each block is read in the last pass before it is
    written, and the target's logit is read in pass 1."""
    row = tl.program_id(0).to(tl.int64)
    s_row = student_ptr + row * stride_student_row
    t_row = teacher_ptr + row * stride_teacher_row
    factor = tl.load(factor_ptr + row)

    # 1. Online statistics, per lane.
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
    for start in range(0, n_cols, BLOCK_SIZE):
        offs = start + tl.arange(0, BLOCK_SIZE)
        mask = offs < n_cols
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

    # Lanes merged.
    mv = tl.max(m_v, axis=0)
    sv = _exp(m_v - mv)
    dv = tl.sum(d_v * sv, axis=0)
    mu = tl.max(m_u, axis=0)
    su = _exp(m_u - mu)
    du = tl.sum(d_u * su, axis=0)
    lse_v = mv + _log(dv)
    lse_u = mu + _log(du)
    div = 0.0
    if DIVERGENCE == 0:
        div = tl.sum(acc * su, axis=0) / du - lse_u + lse_v
    if DIVERGENCE == 1:
        div = tl.sum(acc * sv, axis=0) / dv - lse_v + lse_u

    # 2. The generalized JSD's two sums, from the known log-sum-exps.
    kl_q = 0.0
    if DIVERGENCE == 2:
        kl_p_vec = tl.zeros([BLOCK_SIZE], tl.float32)
        kl_q_vec = tl.zeros([BLOCK_SIZE], tl.float32)
        for start in range(0, n_cols, BLOCK_SIZE):
            offs = start + tl.arange(0, BLOCK_SIZE)
            mask = offs < n_cols
            z = tl.load(s_row + offs, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(t_row + offs, mask=mask, other=0.0).to(tl.float32)
            log_q = z * inv_t - lse_v
            log_p = y * inv_t - lse_u
            a = log_q + log_1m_beta
            b = log_p + log_beta
            hi = tl.maximum(a, b)
            log_m = hi + _log(1.0 + _exp(tl.minimum(a, b) - hi))
            p = _exp(log_p)
            q = _exp(log_q)
            kl_p_vec += tl.where(mask & (p > 0.0), p * (log_p - log_m), 0.0)
            kl_q_vec += tl.where(mask & (q > 0.0), q * (log_q - log_m), 0.0)
        kl_q = tl.sum(kl_q_vec, axis=0)
        div = beta * tl.sum(kl_p_vec, axis=0) + (1.0 - beta) * kl_q

    # The hard label's cross-entropy at temperature 1 (its logit read before any write).
    ce = 0.0
    lse_z = lse_v
    target = 0
    if HAS_HARD:
        if HARD_LSE:
            lse_z = _lse_lanes(m_z, d_z)
        ce, target, here = _hard_label(s_row, target_ptr, row, n_cols, ignore_index, lse_z)
    tl.store(loss_ptr + row, (div + hard_weight * ce) * factor)
    tl.store(div_ptr + row, tl.where(factor != 0.0, div, 0.0))
    if STATS:
        # Each lane's entropy sum moved to the row's maximum: f (E + (m - mv) d).
        e_row = tl.sum(tl.where(d_v > 0.0, sv * (e_v + (m_v - mv) * d_v), 0.0), axis=0)
        tl.store(entropy_ptr + row, _log(dv) - e_row / dv)
        best_z = tl.max(top_z, axis=0)
        best_y = tl.max(top_y, axis=0)
        first_z = tl.min(tl.where(top_z == best_z, idx_z, _MAX_I32), axis=0)
        first_y = tl.min(tl.where(top_y == best_y, idx_y, _MAX_I32), axis=0)
        tl.store(agree_ptr + row, tl.where(first_z == first_y, 1.0, 0.0))

    # 3. The gradient of the student logits, times the row's factor.
    if COMPUTE_GRAD:
        g_row = grad_ptr + row * stride_grad_row
        for start in range(0, n_cols, BLOCK_SIZE):
            offs = start + tl.arange(0, BLOCK_SIZE)
            mask = offs < n_cols
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
                a = log_q + log_1m_beta
                b = log_p + log_beta
                hi = tl.maximum(a, b)
                log_m = hi + _log(1.0 + _exp(tl.minimum(a, b) - hi))
                g = tl.where(q > 0.0, (1.0 - beta) * q * ((log_q - log_m) - kl_q), 0.0)
            g = g * inv_t
            if HAS_HARD:
                s = _exp(z - lse_z)
                g += hard_weight * (s - tl.where((offs == target) & here, 1.0, 0.0))
            g = tl.where(factor != 0.0, g * factor, 0.0)
            tl.store(g_row + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)


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
        a = lq + log_1m_beta
        b = lp + log_beta
        hi = tl.maximum(a, b)
        lm = hi + _log(1.0 + _exp(tl.minimum(a, b) - hi))
        kp = tl.where(p > 0.0, p * (lp - lm), 0.0)
        s = tl.where(q > 0.0, lq - lm, 0.0)
        return beta * kp + (1.0 - beta) * q * s, (1.0 - beta) * s, q * s


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
    factor = tl.load(factor_ptr + row)
    kk = tl.arange(0, K_BLOCK)
    ids = tl.load(ids_ptr + row * k + kk, mask=kk < k, other=-1)
    used = ids >= 0
    lp_ids = tl.where(used, tl.load(logprobs_ptr + row * k + kk, mask=kk < k, other=0.0)
                      .to(tl.float32), -float("inf"))

    # 1. Online: all columns (m, d), the tail (m_o, d_o), the entropy sum, the argmax.
    m = tl.full([BLOCK_SIZE], _MIN_F32, tl.float32)
    d = tl.zeros([BLOCK_SIZE], tl.float32)
    m_o = tl.full([BLOCK_SIZE], _MIN_F32, tl.float32)
    d_o = tl.zeros([BLOCK_SIZE], tl.float32)
    e = tl.zeros([BLOCK_SIZE], tl.float32)
    m_z = tl.full([BLOCK_SIZE], _MIN_F32, tl.float32)
    d_z = tl.zeros([BLOCK_SIZE], tl.float32)
    top = tl.full([BLOCK_SIZE], _MIN_F32, tl.float32)
    idx = tl.full([BLOCK_SIZE], _MAX_I32, tl.int32)
    for start in range(0, n_cols, BLOCK_SIZE):
        offs = start + tl.arange(0, BLOCK_SIZE)
        mask = offs < n_cols
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
    mv = tl.max(m, axis=0)
    sv = _exp(m - mv)
    dv = tl.sum(d * sv, axis=0)
    lse = mv + _log(dv)
    lq_tail = _lse_lanes(m_o, d_o) - lse  # (-inf when every column is an id)

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

    ce = 0.0
    lse_z = lse
    target = 0
    if HAS_HARD:
        if HARD_LSE:
            lse_z = _lse_lanes(m_z, d_z)
        ce, target, here = _hard_label(s_row, target_ptr, row, n_cols, ignore_index, lse_z)
    tl.store(loss_ptr + row, (div + hard_weight * ce) * factor)
    tl.store(div_ptr + row, tl.where(factor != 0.0, div, 0.0))
    if STATS:
        e_row = tl.sum(tl.where(d > 0.0, sv * (e + (m - mv) * d), 0.0), axis=0)
        tl.store(entropy_ptr + row, _log(dv) - e_row / dv)
        best = tl.max(top, axis=0)
        first = tl.min(tl.where(top == best, idx, _MAX_I32), axis=0)
        best_lp = tl.max(lp_ids, axis=0)
        teacher_top = tl.min(tl.where(used & (lp_ids == best_lp), kk, K_BLOCK), axis=0)
        top_id = tl.sum(tl.where(kk == teacher_top, ids, 0), axis=0)
        tl.store(agree_ptr + row, tl.where(first == top_id, 1.0, 0.0))

    # 2. The gradient: q_c times its bucket's G, times the row's factor.
    if COMPUTE_GRAD:
        g_row = grad_ptr + row * stride_grad_row
        if RENORMALIZE:
            q_ids = _exp(lq_ids)
        for start in range(0, n_cols, BLOCK_SIZE):
            offs = start + tl.arange(0, BLOCK_SIZE)
            mask = offs < n_cols
            z = tl.load(s_row + offs, mask=mask, other=0.0).to(tl.float32)
            match = offs[:, None] == ids[None, :]
            member = tl.sum(tl.where(match, 1, 0), axis=1) > 0
            g_own = tl.sum(tl.where(match, g_ids[None, :], 0.0), axis=1)
            if RENORMALIZE:
                g = tl.sum(tl.where(match, (q_ids * g_ids)[None, :], 0.0), axis=1)
            else:
                q = _exp(z * inv_t - lse)
                g = q * tl.where(member, g_own, g_tail)
            g = g * inv_t
            if HAS_HARD:
                s = _exp(z - lse_z)
                g += hard_weight * (s - tl.where((offs == target) & here, 1.0, 0.0))
            g = tl.where(factor != 0.0, g * factor, 0.0)
            tl.store(g_row + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)
