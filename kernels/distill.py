"""Launch wrapper of the distillation kernel (``distill_kernels.kd_fwd_kernel``): tensors in,
tensors out; no autograd."""

from __future__ import annotations

import math

import torch
import triton

from .cross_entropy import _TILING, _dense, launch_config
from .distill_kernels import (
    kd_fwd_kernel,
    kd_grad_kernel,
    kd_jsd_partial_kernel,
    kd_merge_kernel,
    kd_partial_kernel,
    kd_topk_grad_kernel,
    kd_topk_kernel,
    kd_topk_merge_kernel,
    kd_topk_partial_kernel,
)

DIVERGENCE_CODES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}


def _splits(n_rows: int, n_cols: int, block: int, device: torch.device) -> tuple[int, int]:
    """(programs per row, columns per program): the cross-entropy kernels' rule (split the
    vocabulary only when there are too few rows to fill the device), for this block size."""
    cfg = launch_config(n_rows, n_cols, device, block_size=block,
                        n_splits=_TILING["n_splits"])
    return cfg.n_splits, cfg.cols_per_split


def _prologue(name: str, wide: dict, target, factors, stats: bool):
    """The wrappers' shared start: the (N, C) tensors' unit column stride checked, the per-row
    inputs made dense (the kernels index them by a flat row offset), and the per-row outputs
    (loss, divergence, entropy, agreement; the last two empty without ``stats``)."""
    student = wide["student"]
    n_rows, n_cols = student.shape
    for arg, t in wide.items():
        if t is not None and n_cols > 1 and t.stride(1) != 1:
            raise ValueError(f"{name}'s {arg} must have a unit column stride")
    loss = torch.empty(n_rows, dtype=torch.float32, device=student.device)
    entropy = torch.empty(n_rows if stats else 0, dtype=torch.float32, device=student.device)
    return (_dense(target), _dense(factors),
            (loss, torch.empty_like(loss), entropy, torch.empty_like(entropy)))


def _logs(beta: float) -> tuple[float, float]:
    """(log beta, log(1 - beta)), 0 where undefined (the JSD's ends never read them)."""
    return (math.log(beta) if 0.0 < beta else 0.0,
            math.log1p(-beta) if beta < 1.0 else 0.0)


def kd_fwd(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor | None,
    factors: torch.Tensor,
    divergence: str,
    beta: float,
    temperature: float,
    hard_weight: float,
    ignore_index: int,
    stats: bool,
    grad: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row distillation of (N, C) student logits against (N, C) teacher logits, and with
    ``grad`` (N, C) (which may be ``student`` itself) the gradient of the student logits times
    ``factors`` (N,) fp32.

    Args:
        student, teacher: (N, C), any float dtypes, unit column stride.
        target: (N,) int64 hard labels, or None (``hard_weight`` 0).
        factors: (N,) fp32 per-row factors of the loss and the gradient.
        divergence: "forward_kl", "reverse_kl" or "jsd" (``beta`` 0 and 1 given as the KLs).
        stats: also the student's entropy and the argmax agreement.

    Returns:
        (loss x factor, divergence, entropy, agreement), each (N,) fp32 (the last two empty
        without ``stats``).
    """
    n_rows, n_cols = student.shape
    device = student.device
    target, factors, (loss, div, entropy, agree) = _prologue(
        "kd_fwd", dict(student=student, teacher=teacher, grad=grad), target, factors, stats)
    if n_rows == 0:
        return loss, div, entropy, agree
    block = _TILING["block_size"] or min(triton.next_power_of_2(max(n_cols, 1)), 4096)
    num_warps = min(16, max(4, block // 256))
    hard = target is not None and hard_weight != 0.0
    log_beta, log_1m_beta = _logs(beta)
    n_splits, cols_per_split = _splits(n_rows, n_cols, block, device)
    common = dict(inv_t=1.0 / float(temperature), BLOCK_SIZE=block, num_warps=num_warps)
    flags = dict(DIVERGENCE=DIVERGENCE_CODES[divergence], HAS_HARD=hard,
                 HARD_LSE=hard and float(temperature) != 1.0, STATS=bool(stats))
    if n_splits == 1:
        kd_fwd_kernel[(n_rows,)](
            student_ptr=student, teacher_ptr=teacher,
            target_ptr=target if hard else factors, factor_ptr=factors, loss_ptr=loss,
            div_ptr=div, entropy_ptr=entropy if stats else loss,
            agree_ptr=agree if stats else loss,
            grad_ptr=grad if grad is not None else student,
            stride_student_row=student.stride(0), stride_teacher_row=teacher.stride(0),
            stride_grad_row=grad.stride(0) if grad is not None else 0, n_cols=n_cols,
            beta=float(beta), log_beta=log_beta, log_1m_beta=log_1m_beta,
            hard_weight=float(hard_weight), ignore_index=int(ignore_index),
            COMPUTE_GRAD=grad is not None, **flags, **common)
        return loss, div, entropy, agree
    # The split path: chunk statistics, merged per row; the JSD's sums; the gradient.
    part = torch.empty(10, n_rows, n_splits, dtype=torch.float32, device=device)
    first = torch.empty(2, n_rows, n_splits, dtype=torch.int32, device=device)
    grid = (n_rows, n_splits)
    strides = dict(stride_student_row=student.stride(0), stride_teacher_row=teacher.stride(0))
    kd_partial_kernel[grid](
        student_ptr=student, teacher_ptr=teacher, part_ptr=part, first_ptr=first,
        n_rows=n_rows, n_cols=n_cols, cols_per_split=cols_per_split, n_splits=n_splits,
        DIVERGENCE=flags["DIVERGENCE"], HARD_LSE=flags["HARD_LSE"], STATS=flags["STATS"],
        **strides, **common)
    rows = torch.empty(5, n_rows, dtype=torch.float32, device=device)
    kd_merge_kernel[(n_rows,)](
        student_ptr=student, part_ptr=part, first_ptr=first,
        target_ptr=target if hard else factors, row_ptr=rows,
        entropy_ptr=entropy if stats else loss, agree_ptr=agree if stats else loss,
        stride_student_row=student.stride(0), n_rows=n_rows, n_cols=n_cols,
        n_splits=n_splits, ignore_index=int(ignore_index),
        SPLIT_BLOCK=triton.next_power_of_2(n_splits), **flags)
    kl_q = rows[3]  # (read only for the JSD)
    if divergence == "jsd":
        sums = torch.empty(2, n_rows, n_splits, dtype=torch.float32, device=device)
        kd_jsd_partial_kernel[grid](
            student_ptr=student, teacher_ptr=teacher, row_ptr=rows, part_ptr=sums,
            n_rows=n_rows, n_cols=n_cols, cols_per_split=cols_per_split, n_splits=n_splits,
            log_beta=log_beta, log_1m_beta=log_1m_beta, **strides, **common)
        kl_p, kl_q = sums.sum(dim=2)
        rows[3] = beta * kl_p + (1.0 - beta) * kl_q
    torch.mul(rows[3] + float(hard_weight) * rows[4], factors, out=loss)
    div.copy_(torch.where(factors != 0.0, rows[3], 0.0))
    if grad is not None:
        kd_grad_kernel[grid](
            student_ptr=student, teacher_ptr=teacher, row_ptr=rows, kl_q_ptr=kl_q,
            target_ptr=target if hard else factors, factor_ptr=factors, grad_ptr=grad,
            stride_grad_row=grad.stride(0), n_rows=n_rows, n_cols=n_cols,
            cols_per_split=cols_per_split, beta=float(beta), log_beta=log_beta,
            log_1m_beta=log_1m_beta, hard_weight=float(hard_weight),
            ignore_index=int(ignore_index), DIVERGENCE=flags["DIVERGENCE"], HAS_HARD=hard,
            **strides, **common)
    return loss, div, entropy, agree


def kd_topk(
    student: torch.Tensor,
    ids: torch.Tensor,
    logprobs: torch.Tensor,
    target: torch.Tensor | None,
    factors: torch.Tensor,
    divergence: str,
    beta: float,
    temperature: float,
    tail: str,
    hard_weight: float,
    ignore_index: int,
    stats: bool,
    grad: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``kd_fwd`` against a top-k teacher: ``ids`` (N, k) int64 (-1: an unused slot; checked
    by the caller: in range, no duplicates) and ``logprobs`` (N, k) the teacher's
    full-vocabulary log-probabilities; ``tail`` "bucket" or "renormalize"."""
    n_rows, n_cols = student.shape
    device = student.device
    target, factors, (loss, div, entropy, agree) = _prologue(
        "kd_topk", dict(student=student, grad=grad), target, factors, stats)
    if n_rows == 0:
        return loss, div, entropy, agree
    k = ids.shape[1]
    ids = ids.to(torch.int64).contiguous()
    logprobs = logprobs.to(torch.float32).contiguous()
    block = _TILING["block_size"] or min(triton.next_power_of_2(max(n_cols, 1)), 2048)
    hard = target is not None and hard_weight != 0.0
    log_beta, log_1m_beta = _logs(beta)
    k_block = max(2, triton.next_power_of_2(k))
    n_splits, cols_per_split = _splits(n_rows, n_cols, block, device)
    common = dict(inv_t=1.0 / float(temperature), K_BLOCK=k_block)
    warps = min(16, max(4, block // 256))
    outs = dict(target_ptr=target if hard else ids, factor_ptr=factors, loss_ptr=loss,
                div_ptr=div, entropy_ptr=entropy if stats else loss,
                agree_ptr=agree if stats else loss)
    scalars = dict(beta=float(beta), log_beta=log_beta, log_1m_beta=log_1m_beta,
                   hard_weight=float(hard_weight), ignore_index=int(ignore_index),
                   DIVERGENCE=DIVERGENCE_CODES[divergence], RENORMALIZE=tail == "renormalize",
                   HAS_HARD=hard, HARD_LSE=hard and float(temperature) != 1.0,
                   STATS=bool(stats))
    if n_splits == 1:
        kd_topk_kernel[(n_rows,)](
            student_ptr=student, ids_ptr=ids, logprobs_ptr=logprobs,
            grad_ptr=grad if grad is not None else student,
            stride_student_row=student.stride(0),
            stride_grad_row=grad.stride(0) if grad is not None else 0, n_cols=n_cols, k=k,
            BLOCK_SIZE=block, COMPUTE_GRAD=grad is not None, num_warps=warps, **outs,
            **scalars, **common)
        return loss, div, entropy, agree
    # The split path: chunk statistics; each row merged and finished; the gradient.
    part = torch.empty(8, n_rows, n_splits, dtype=torch.float32, device=device)
    first = torch.empty(n_rows, n_splits, dtype=torch.int32, device=device)
    grid = (n_rows, n_splits)
    kd_topk_partial_kernel[grid](
        student_ptr=student, ids_ptr=ids, part_ptr=part, first_ptr=first,
        stride_student_row=student.stride(0), n_rows=n_rows, n_cols=n_cols,
        cols_per_split=cols_per_split, n_splits=n_splits, k=k, BLOCK_SIZE=block,
        HARD_LSE=scalars["HARD_LSE"], STATS=scalars["STATS"], num_warps=warps, **common)
    coef = torch.empty(n_rows, k_block, dtype=torch.float32, device=device)
    rows = torch.empty(3, n_rows, dtype=torch.float32, device=device)
    kd_topk_merge_kernel[(n_rows,)](
        student_ptr=student, ids_ptr=ids, logprobs_ptr=logprobs, part_ptr=part,
        first_ptr=first, coef_ptr=coef, row_ptr=rows, stride_student_row=student.stride(0),
        n_rows=n_rows, n_cols=n_cols, n_splits=n_splits, k=k,
        SPLIT_BLOCK=triton.next_power_of_2(n_splits), **outs, **scalars, **common)
    if grad is not None:
        kd_topk_grad_kernel[grid](
            student_ptr=student, ids_ptr=ids, coef_ptr=coef, row_ptr=rows,
            target_ptr=outs["target_ptr"], factor_ptr=factors, grad_ptr=grad,
            stride_student_row=student.stride(0), stride_grad_row=grad.stride(0),
            n_rows=n_rows, n_cols=n_cols, cols_per_split=cols_per_split, k=k,
            hard_weight=float(hard_weight), ignore_index=int(ignore_index), BLOCK_SIZE=block,
            RENORMALIZE=scalars["RENORMALIZE"], HAS_HARD=hard, num_warps=warps, **common)
    return loss, div, entropy, agree


__all__ = ["kd_fwd", "kd_topk"]
