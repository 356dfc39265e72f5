"""Cross-entropy against class-probability targets, fused: ``F.cross_entropy``'s semantics for a
floating-point target of the input's shape, in one pass over chunks of rows that also makes the
gradient of the logits, without PyTorch's log-softmax, smoothed-target and product tensors.

Per row, with ``t' = (1 - eps) t + eps / C`` (label smoothing mixes the target, as PyTorch
does for probabilities) and class weights ``w``: ``loss = -sum_c w_c t'_c log softmax(x)_c``
and ``d loss / d x = (sum_c w_c t'_c) softmax(x) - w t'``.  ``mean`` divides the sum by the
number of rows (PyTorch's rule for probabilities: the weights are not in the denominator).
The target gets no gradient here: a target that requires one goes to PyTorch's own
``F.cross_entropy`` (the caller's choice, ``fusedce.functional``).  On the Triton
implementation the same pass is ``fusedce.kernels.soft_ce``: one program per row, or the
vocabulary split across programs for few rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK_ELEMENTS = 1 << 22


def _rows(x: Tensor, t: Tensor, weight: Tensor | None, smoothing: float,
          want_grad: bool) -> tuple[Tensor, Tensor | None]:
    """One chunk: per-row losses and the gradient of ``x``, in float32 (float64 for float64)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    z, tt = x.to(acc), t.to(acc)
    n_classes = z.shape[1]
    if smoothing:
        tt = tt * (1.0 - smoothing) + smoothing / n_classes
    if weight is not None:
        tt = tt * weight.to(acc)
    log_q = torch.log_softmax(z, dim=1)
    loss = -(tt * log_q).sum(dim=1)
    grad = None
    if want_grad:
        grad = tt.sum(dim=1, keepdim=True) * log_q.exp() - tt
    return loss, grad


class SoftTargetFunction(torch.autograd.Function):
    """``apply(input (N, C), target (N, C), weight (C,) or None, smoothing, factor, kernels)``
    returns the per-row losses times ``factor``; the gradient of ``input`` is made in the
    forward and scaled by ``grad_output`` (per row) in the backward.  ``kernels``: run the
    Triton kernels (else PyTorch operations over chunks of rows)."""

    @staticmethod
    def forward(ctx, input, target, weight, smoothing, factor, kernels=False):
        want_grad = ctx.needs_input_grad[0]
        n = input.shape[0]
        acc = torch.float64 if input.dtype == torch.float64 else torch.float32
        grad = torch.empty_like(input) if want_grad else None
        ctx.kernels = kernels
        if kernels:
            from .kernels import soft_ce

            factors = torch.full((n,), float(factor), dtype=torch.float32, device=input.device)
            out = soft_ce(input, target, weight, smoothing, factors, grad)
            ctx.grad = grad
            ctx.set_materialize_grads(False)
            return out
        out = torch.empty(n, dtype=acc, device=input.device)
        rows = max(1, CHUNK_ELEMENTS // max(input.shape[1], 1))
        for r0 in range(0, n, rows):
            r1 = min(r0 + rows, n)
            loss, g = _rows(input[r0:r1], target[r0:r1], weight, smoothing, want_grad)
            out[r0:r1] = loss * factor
            if g is not None:
                grad[r0:r1] = g * factor
        ctx.grad = grad
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    def backward(ctx, grad_rows):
        from . import backends
        from .autograd import refuse_double_backward

        refuse_double_backward("fusedce.cross_entropy (class probabilities)")
        grad, ctx.grad = ctx.grad, None
        if grad is None or grad_rows is None:
            return None, None, None, None, None, None
        backends.get("triton" if ctx.kernels else "torch").ce_bwd(grad, grad_rows)
        return grad, None, None, None, None, None


def soft_cross_entropy(logits: Tensor, target: Tensor, weight: Tensor | None,
                       reduction: str, smoothing: float, kernels: bool = False) -> Tensor:
    """(N, C) logits against (N, C) probabilities (checked by the caller), reduced as PyTorch
    does; the result in the logits' dtype.  ``kernels``: on the Triton kernels."""
    n = logits.shape[0]
    factor = 1.0 / n if reduction == "mean" and n else 1.0
    rows = SoftTargetFunction.apply(logits, target.detach(), weight, float(smoothing), factor,
                                    kernels)
    loss = rows if reduction == "none" else rows.sum()
    if reduction == "mean" and n == 0:
        loss = loss * float("nan")  # PyTorch's 0 / 0 for an empty batch
    return loss.to(logits.dtype)


class LinearSoftTargetFunction(torch.autograd.Function):
    """The same from hidden states and an LM head, in chunks of rows: each chunk's float32
    logits made, its gradient turned at once into ``grad_input`` and added into float32
    weight and bias gradients.  ``apply(input, weight, bias, target, class_weight, smoothing,
    factor, chunk_rows)`` returns the per-row losses times ``factor``; ``grad_output`` must
    be one number for every row here (the caller's reductions), or the gradients are made
    again with it."""

    @staticmethod
    def forward(ctx, input, weight, bias, target, class_weight, smoothing, factor,
                chunk_rows):
        from .linear import _Head

        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                bias is not None and ctx.needs_input_grad[2])
        head = _Head(weight, bias)
        acc = head.acc
        n = input.shape[0]
        out = torch.empty(n, dtype=acc, device=input.device)
        gx = torch.empty_like(input) if need[0] else None
        gw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need[1] else None
        gb = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need[2] else None
        buf = torch.empty(min(chunk_rows, n), weight.shape[0], dtype=acc, device=input.device)
        for r0 in range(0, n, chunk_rows):
            r1 = min(r0 + chunk_rows, n)
            z = head.logits(input[r0:r1], buf[: r1 - r0])
            loss, g = _rows(z, target[r0:r1], class_weight, smoothing, any(need))
            out[r0:r1] = loss * factor
            if g is not None:
                g = g * factor
                if need[0]:
                    gx[r0:r1] = (g @ head.w_acc).to(input.dtype)
                if need[1]:
                    gw.addmm_(g.t(), input[r0:r1].to(acc))
                if need[2]:
                    gb += g.sum(dim=0)
        ctx.grads = (gx, gw.to(weight.dtype) if gw is not None else None,
                     gb.to(bias.dtype) if gb is not None else None)
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    def backward(ctx, grad_rows):
        from .autograd import refuse_double_backward

        refuse_double_backward("fusedce.linear_cross_entropy (class probabilities)")
        grads, ctx.grads = ctx.grads, None
        if grad_rows is None or grad_rows.numel() == 0:
            return (*grads, None, None, None, None, None)
        # The caller reduced the rows with one factor (mean or sum): every row's grad_output
        # is the same number.
        scale = grad_rows.reshape(-1)[:1]
        return (*(g.mul_(scale.to(g.dtype)) if g is not None else None for g in grads),
                None, None, None, None, None)


def soft_linear_cross_entropy(input: Tensor, weight: Tensor, bias: Tensor | None,
                              target: Tensor, class_weight: Tensor | None, reduction: str,
                              smoothing: float, chunk_rows: int) -> Tensor:
    """(N, H) hidden states and a (C, H) head against (N, C) probabilities, chunked; reduced as
    PyTorch does ("none" is not taken here: its per-row grad_output cannot scale a sum over
    rows; the caller sends it unfused)."""
    n = input.shape[0]
    factor = 1.0 / n if reduction == "mean" and n else 1.0
    rows = LinearSoftTargetFunction.apply(input, weight, bias, target.detach(), class_weight,
                                          float(smoothing), factor, chunk_rows)
    return rows.sum().to(input.dtype)


__all__ = ["LinearSoftTargetFunction", "SoftTargetFunction", "soft_cross_entropy",
           "soft_linear_cross_entropy"]
