"""Launch wrapper of the class-probability cross-entropy kernels (``soft_kernels``): tensors in,
tensors out; no autograd."""

from __future__ import annotations

import torch
import triton

from .cross_entropy import _TILING, _dense, launch_config
from .soft_kernels import soft_ce_kernel, soft_ce_partial_kernel, soft_ce_split_kernel


def soft_ce(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    smoothing: float,
    factors: torch.Tensor,
    grad: torch.Tensor | None,
) -> torch.Tensor:
    """Per-row cross-entropy of (N, C) ``logits`` against (N, C) class probabilities
    ``target`` (label smoothing mixing the target, class weights ``weight`` (C,)), times
    ``factors`` (N,) fp32; with ``grad`` (N, C) (which may be ``logits`` itself), its gradient
    times the same factors.  Returns (N,) fp32."""
    n_rows, n_cols = logits.shape
    if target.shape != logits.shape:
        raise ValueError(f"soft_ce's target must have the logits' shape {tuple(logits.shape)}, "
                         f"got {tuple(target.shape)}")
    for name, t in (("logits", logits), ("grad", grad)):
        if t is not None and n_cols > 1 and t.stride(1) != 1:
            raise ValueError(f"soft_ce's {name} must have a unit column stride")
    if n_cols > 1 and target.stride(1) != 1:
        target = target.contiguous()
    device = logits.device
    factors = _dense(factors.to(torch.float32))
    loss = torch.empty(n_rows, dtype=torch.float32, device=device)
    if n_rows == 0:
        return loss
    has_weight = weight is not None
    weight = _dense(weight.to(torch.float32)) if has_weight else factors
    # The cross-entropy kernels' plan for two tensors read side by side; with a 32-bit tensor at
    # most 16 warps: a thread's columns of both in 32-bit registers beside four running vectors
    # do not fit the 64 registers a thread has at 32 warps (the static model's sm_90 compile
    # spilled), where 16-bit pairs do.
    cfg = launch_config(n_rows, n_cols, device, block_size=_TILING["block_size"],
                        n_splits=_TILING["n_splits"], element_size=logits.element_size()
                        + target.element_size(), lanes=4)
    wide = max(logits.element_size(), target.element_size()) >= 4
    if _TILING["block_size"] is None and cfg.num_warps > 16 and wide:
        cfg = launch_config(n_rows, n_cols, device, block_size=cfg.block_size // 2,
                            n_splits=_TILING["n_splits"], lanes=4)
    args = dict(logits_ptr=logits, target_ptr=target, weight_ptr=weight,
                stride_logits_row=logits.stride(0), stride_target_row=target.stride(0),
                n_cols=n_cols, smooth_keep=1.0 - float(smoothing),
                smooth_add=float(smoothing) / max(n_cols, 1), BLOCK_SIZE=cfg.block_size,
                HAS_WEIGHT=has_weight, num_warps=cfg.num_warps)
    out = dict(factor_ptr=factors, loss_ptr=loss,
               grad_ptr=grad if grad is not None else logits,
               stride_grad_row=grad.stride(0) if grad is not None else 0,
               COMPUTE_GRAD=grad is not None)
    if cfg.n_splits == 1:
        soft_ce_kernel[(n_rows,)](**args, **out)
        return loss
    chunks = dict(n_rows=n_rows, cols_per_split=cfg.cols_per_split, n_splits=cfg.n_splits)
    part = torch.empty(4, n_rows, cfg.n_splits, dtype=torch.float32, device=device)
    soft_ce_partial_kernel[(n_rows, cfg.n_splits)](part_ptr=part, **args, **chunks)
    soft_ce_split_kernel[(n_rows, cfg.n_splits)](
        part_ptr=part, SPLIT_BLOCK=triton.next_power_of_2(cfg.n_splits), **args, **out,
        **chunks)
    return loss


__all__ = ["soft_ce"]
