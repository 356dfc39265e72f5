"""Launch wrapper of the distillation kernel (``distill_kernels.kd_fwd_kernel``): tensors in,
tensors out; no autograd."""

from __future__ import annotations

import math

import torch
import triton

from .cross_entropy import _TILING, _dense
from .distill_kernels import kd_fwd_kernel, kd_topk_kernel

DIVERGENCE_CODES = {"forward_kl": 0, "reverse_kl": 1, "jsd": 2}


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
    for name, t in (("student", student), ("teacher", teacher), ("grad", grad)):
        if t is not None and n_cols > 1 and t.stride(1) != 1:
            raise ValueError(f"kd_fwd's {name} must have a unit column stride")
    device = student.device
    target, factors = _dense(target), _dense(factors)  # (indexed by a flat row offset)
    loss = torch.empty(n_rows, dtype=torch.float32, device=device)
    div = torch.empty_like(loss)
    entropy = torch.empty(n_rows if stats else 0, dtype=torch.float32, device=device)
    agree = torch.empty_like(entropy)
    if n_rows == 0:
        return loss, div, entropy, agree
    block = _TILING["block_size"] or min(triton.next_power_of_2(max(n_cols, 1)), 4096)
    num_warps = min(16, max(4, block // 256))
    hard = target is not None and hard_weight != 0.0
    log_beta = math.log(beta) if 0.0 < beta else 0.0
    log_1m_beta = math.log1p(-beta) if beta < 1.0 else 0.0
    kd_fwd_kernel[(n_rows,)](
        student_ptr=student,
        teacher_ptr=teacher,
        target_ptr=target if hard else factors,
        factor_ptr=factors,
        loss_ptr=loss,
        div_ptr=div,
        entropy_ptr=entropy if stats else loss,
        agree_ptr=agree if stats else loss,
        grad_ptr=grad if grad is not None else student,
        stride_student_row=student.stride(0),
        stride_teacher_row=teacher.stride(0),
        stride_grad_row=grad.stride(0) if grad is not None else 0,
        n_cols=n_cols,
        inv_t=1.0 / float(temperature),
        beta=float(beta),
        log_beta=log_beta,
        log_1m_beta=log_1m_beta,
        hard_weight=float(hard_weight),
        ignore_index=int(ignore_index),
        BLOCK_SIZE=block,
        DIVERGENCE=DIVERGENCE_CODES[divergence],
        HAS_HARD=hard,
        HARD_LSE=hard and float(temperature) != 1.0,
        STATS=bool(stats),
        COMPUTE_GRAD=grad is not None,
        num_warps=num_warps,
    )
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
    for name, t in (("student", student), ("grad", grad)):
        if t is not None and n_cols > 1 and t.stride(1) != 1:
            raise ValueError(f"kd_topk's {name} must have a unit column stride")
    device = student.device
    target, factors = _dense(target), _dense(factors)  # (indexed by a flat row offset)
    loss = torch.empty(n_rows, dtype=torch.float32, device=device)
    div = torch.empty_like(loss)
    entropy = torch.empty(n_rows if stats else 0, dtype=torch.float32, device=device)
    agree = torch.empty_like(entropy)
    if n_rows == 0:
        return loss, div, entropy, agree
    k = ids.shape[1]
    ids = ids.to(torch.int64).contiguous()
    logprobs = logprobs.to(torch.float32).contiguous()
    block = _TILING["block_size"] or min(triton.next_power_of_2(max(n_cols, 1)), 2048)
    hard = target is not None and hard_weight != 0.0
    kd_topk_kernel[(n_rows,)](
        student_ptr=student,
        ids_ptr=ids,
        logprobs_ptr=logprobs,
        target_ptr=target if hard else ids,
        factor_ptr=factors,
        loss_ptr=loss,
        div_ptr=div,
        entropy_ptr=entropy if stats else loss,
        agree_ptr=agree if stats else loss,
        grad_ptr=grad if grad is not None else student,
        stride_student_row=student.stride(0),
        stride_grad_row=grad.stride(0) if grad is not None else 0,
        n_cols=n_cols,
        k=k,
        inv_t=1.0 / float(temperature),
        beta=float(beta),
        log_beta=math.log(beta) if 0.0 < beta else 0.0,
        log_1m_beta=math.log1p(-beta) if beta < 1.0 else 0.0,
        hard_weight=float(hard_weight),
        ignore_index=int(ignore_index),
        BLOCK_SIZE=block,
        K_BLOCK=max(2, triton.next_power_of_2(k)),
        DIVERGENCE=DIVERGENCE_CODES[divergence],
        RENORMALIZE=tail == "renormalize",
        HAS_HARD=hard,
        HARD_LSE=hard and float(temperature) != 1.0,
        STATS=bool(stats),
        COMPUTE_GRAD=grad is not None,
        num_warps=min(16, max(4, block // 256)),
    )
    return loss, div, entropy, agree


__all__ = ["kd_fwd", "kd_topk"]
