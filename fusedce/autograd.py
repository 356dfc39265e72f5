"""The autograd Function around the cross-entropy kernels (Triton) and their PyTorch twin.

The forward computes the loss and, when a gradient is needed, the gradient of the logits in the
same pass, already scaled for the reduction; the backward only multiplies it by ``grad_output``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import reference

Impl = Literal["triton", "torch"]
Reduction = Literal["none", "mean", "sum"]


def reduction_scale(
    target: Tensor, weight: Tensor | None, ignore_index: int, reduction: Reduction, n_cols: int
) -> Tensor:
    """The factor applied to the summed per-row losses: a (1,) float32 device tensor.

    For ``mean`` it is ``1 / sum of the counted targets' weights`` (the count when unweighted),
    as in PyTorch, except that it is 0 when nothing counts, so such a batch gives loss 0 and a
    zero gradient instead of NaN.  For ``sum`` and ``none`` it is 1.  Computed with device
    operations, never read on the host.
    """
    if reduction != "mean":
        return torch.ones(1, dtype=torch.float32, device=target.device)
    counted = target != ignore_index
    if weight is None:
        denom = counted.sum(dtype=torch.float32)
    else:
        w_t = weight[target.clamp(0, max(n_cols - 1, 0)).long()]
        denom = torch.where(counted, w_t, 0.0).sum()
    return torch.where(denom != 0, 1.0 / denom, 0.0).reshape(1)


def ce_forward(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    reduction: Reduction,
    label_smoothing: float,
    impl: Impl,
    grad: Tensor | None,
    block_size: int | None = None,
    n_splits: int | None = None,
) -> Tensor:
    """Run the chosen implementation and reduce; fill ``grad`` (when given) with the scaled
    gradient.

    Args:
        input: (N, C) logits with a contiguous last dimension.
        target: (N,) contiguous integer class indices.
        weight: (C,) float32 contiguous class weights, or None.
        grad: (N, C) destination of the logits' dtype, or None for the loss alone.

    Returns:
        The loss in the logits' dtype: (N,) for ``none``, a scalar otherwise.
    """
    n_cols = input.shape[1]
    weight_sum = weight.sum().reshape(1) if weight is not None else None
    scale = reduction_scale(target, weight, ignore_index, reduction, n_cols)
    if impl == "triton":
        from .kernels import ce_fwd

        loss, _ = ce_fwd(
            input,
            target,
            weight,
            weight_sum,
            scale,
            ignore_index,
            label_smoothing,
            grad,
            block_size=block_size,
            n_splits=n_splits,
        )
    else:
        loss, _ = reference.ce_fwd_torch(
            input, target, weight, weight_sum, scale, ignore_index, label_smoothing, grad
        )
    if reduction == "none":
        return loss.to(input.dtype)
    total = loss.sum()
    if reduction == "mean":
        total = total * scale[0]
    return total.to(input.dtype)


class CrossEntropyFunction(torch.autograd.Function):
    """Cross-entropy whose forward also writes the gradient of the logits.

    Call as::

        CrossEntropyFunction.apply(
            input,             # (N, C) logits, float32/bfloat16/float16, last dim contiguous
            target,            # (N,) contiguous integer class indices
            weight,            # (C,) float32 contiguous class weights, or None
            ignore_index,      # int
            reduction,         # "none" | "mean" | "sum"
            label_smoothing,   # float in [0, 1]
            impl,              # "triton" | "torch"
            inplace_backward,  # bool: write the gradient into input's storage
            block_size,        # int | None: kernel block-size override (None: heuristic)
            n_splits,          # int | None: kernel vocabulary-split override (None: heuristic)
        )

    and get the loss in the input's dtype ((N,) for ``none``, a scalar otherwise).  Arguments are
    not checked here: ``fusedce.cross_entropy`` does that, reshapes other layouts and skips the
    gradient pass when no gradient is wanted (under ``torch.no_grad`` this Function cannot tell,
    so it writes the gradient whenever ``input`` requires grad).

    With ``inplace_backward=True`` the logits are overwritten by their gradient during the
    forward; the logits' version counter is bumped, so autograd raises an error if anything else
    saved them for its backward, instead of silently using the gradient as logits.  The backward
    runs once (``retain_graph`` is refused) because it scales the stored gradient in place.
    """

    @staticmethod
    def forward(
        ctx,
        input: Tensor,
        target: Tensor,
        weight: Tensor | None,
        ignore_index: int,
        reduction: Reduction,
        label_smoothing: float,
        impl: Impl,
        inplace_backward: bool,
        block_size: int | None = None,
        n_splits: int | None = None,
    ) -> Tensor:
        grad = None
        if ctx.needs_input_grad[0]:
            if inplace_backward:
                # A new tensor over the same storage: returned as the gradient, autograd can keep
                # it as is, where the input object itself would be copied.
                grad = input.detach()
            else:
                grad = torch.empty(input.shape, dtype=input.dtype, device=input.device)
        loss = ce_forward(
            input,
            target,
            weight,
            ignore_index,
            reduction,
            label_smoothing,
            impl,
            grad,
            block_size,
            n_splits,
        )
        if grad is not None and inplace_backward:
            torch.autograd.graph.increment_version(input)
        # The gradient is kept as an attribute, not saved with save_for_backward: it may be the
        # input's own storage, whose version counter was just bumped on purpose.
        ctx.grad = grad
        ctx.impl = impl
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor):
        grad = ctx.grad
        if grad is None:
            raise RuntimeError(
                "fusedce.cross_entropy's backward ran twice: its forward stores one gradient and "
                "the backward scales it in place, so retain_graph=True is not supported"
            )
        ctx.grad = None
        if ctx.impl == "triton":
            from .kernels import ce_bwd

            ce_bwd(grad, grad_output)
        else:
            reference.ce_bwd_torch(grad, grad_output)
        return grad, None, None, None, None, None, None, None, None, None
