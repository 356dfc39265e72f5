"""The autograd Function around the cross-entropy kernels (Triton) and their PyTorch twin.

The forward computes the loss and, when a gradient is needed, the gradient of the logits in the
same pass, already scaled for the reduction; the backward only multiplies it by ``grad_output``.

The passes over the logits are registered as ``torch.library`` custom ops (``fusedce::ce_forward``,
``fusedce::ce_forward_inplace`` with its mutation of the logits declared, and
``fusedce::ce_scale_grad_``), so ``torch.compile`` treats each as one opaque node with a known
output shape: no graph break, whichever implementation runs inside.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import reference

Impl = Literal["triton", "torch"]
Reduction = Literal["none", "mean", "sum"]


class RowResults(NamedTuple):
    """Per-row float32 results of one pass (``z_loss``/``correct`` empty when not asked for)."""

    loss: Tensor
    lse: Tensor
    z_loss: Tensor
    correct: Tensor


def _run_pass(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    scale: Tensor,
    ignore_index: int,
    label_smoothing: float,
    logit_scale: float,
    softcap: float | None,
    lse_square_scale: float,
    compute_accuracy: bool,
    impl: str,
    grad: Tensor | None,
    block_size: int | None,
    n_splits: int | None,
) -> RowResults:
    weight_sum = weight.sum().reshape(1) if weight is not None else None
    extras = dict(logit_scale=logit_scale, softcap=softcap, lse_square_scale=lse_square_scale,
                  compute_accuracy=compute_accuracy)
    if impl == "triton":
        from .kernels import ce_fwd

        out = ce_fwd(logits, target, weight, weight_sum, scale, ignore_index, label_smoothing,
                     grad, block_size=block_size, n_splits=n_splits, **extras)
    else:
        out = reference.ce_fwd_torch(logits, target, weight, weight_sum, scale, ignore_index,
                                     label_smoothing, grad, **extras)
    loss, lse, z_loss, correct = out
    # Distinct empty tensors: a custom op's outputs may not alias one another.
    return RowResults(loss, lse, loss.new_empty(0) if z_loss is None else z_loss,
                      loss.new_empty(0) if correct is None else correct)


def _fake_rows(logits: Tensor, lse_square_scale: float, compute_accuracy: bool) -> RowResults:
    n = logits.shape[0]
    f32 = dict(dtype=torch.float32)
    return RowResults(logits.new_empty(n, **f32), logits.new_empty(n, **f32),
                      logits.new_empty(n if lse_square_scale != 0.0 else 0, **f32),
                      logits.new_empty(n if compute_accuracy else 0, **f32))


@torch.library.custom_op("fusedce::ce_forward", mutates_args=())
def _ce_forward_op(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    scale: Tensor,
    ignore_index: int,
    label_smoothing: float,
    logit_scale: float,
    softcap: float | None,
    lse_square_scale: float,
    compute_accuracy: bool,
    impl: str,
    compute_grad: bool,
    block_size: int | None,
    n_splits: int | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One pass: per-row (loss, lse, z_loss, correct) and a new gradient ((0,) if not asked)."""
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device) if compute_grad \
        else None
    rows = _run_pass(logits, target, weight, scale, ignore_index, label_smoothing, logit_scale,
                     softcap, lse_square_scale, compute_accuracy, impl, grad, block_size,
                     n_splits)
    return (*rows, grad if grad is not None else logits.new_empty(0))


@_ce_forward_op.register_fake
def _(logits, target, weight, scale, ignore_index, label_smoothing, logit_scale, softcap,
      lse_square_scale, compute_accuracy, impl, compute_grad, block_size, n_splits):
    grad = logits.new_empty(logits.shape if compute_grad else (0,))
    return (*_fake_rows(logits, lse_square_scale, compute_accuracy), grad)


@torch.library.custom_op("fusedce::ce_forward_inplace", mutates_args=("logits",))
def _ce_forward_inplace_op(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    scale: Tensor,
    ignore_index: int,
    label_smoothing: float,
    logit_scale: float,
    softcap: float | None,
    lse_square_scale: float,
    compute_accuracy: bool,
    impl: str,
    block_size: int | None,
    n_splits: int | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One pass that overwrites the logits with their scaled gradient."""
    return tuple(_run_pass(logits, target, weight, scale, ignore_index, label_smoothing,
                           logit_scale, softcap, lse_square_scale, compute_accuracy, impl,
                           logits, block_size, n_splits))


@_ce_forward_inplace_op.register_fake
def _(logits, target, weight, scale, ignore_index, label_smoothing, logit_scale, softcap,
      lse_square_scale, compute_accuracy, impl, block_size, n_splits):
    return tuple(_fake_rows(logits, lse_square_scale, compute_accuracy))


@torch.library.custom_op("fusedce::ce_scale_grad_", mutates_args=("grad",))
def _ce_scale_grad_op(grad: Tensor, grad_output: Tensor, impl: str) -> None:
    """grad *= grad_output (a scalar, or one value per row), in place."""
    if impl == "triton":
        from .kernels import ce_bwd

        ce_bwd(grad, grad_output)
    else:
        reference.ce_bwd_torch(grad, grad_output)


@_ce_scale_grad_op.register_fake
def _(grad, grad_output, impl):
    return None


def reduction_scale(
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    reduction: Reduction,
    n_cols: int,
    num_items_in_batch: Tensor | int | None = None,
) -> Tensor:
    """The factor applied to the summed per-row losses: a (1,) float32 device tensor.

    For ``mean`` it is ``1 / sum of the counted targets' weights`` (the count when unweighted),
    as in PyTorch, except that it is 0 when nothing counts, so such a batch gives loss 0 and a
    zero gradient instead of NaN; with ``num_items_in_batch`` it is ``1 / num_items_in_batch``.
    For ``sum`` and ``none`` it is 1.  Computed with device operations, never read on the host.
    """
    device = target.device
    if reduction != "mean":
        return torch.ones(1, dtype=torch.float32, device=device)
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            items = num_items_in_batch.to(device=device, dtype=torch.float32).reshape(1)
            return 1.0 / items
        return torch.full((1,), 1.0 / num_items_in_batch, dtype=torch.float32, device=device)
    counted = target != ignore_index
    if weight is None:
        denom = counted.sum(dtype=torch.float32)
    else:
        w_t = weight[target.clamp(0, max(n_cols - 1, 0)).long()]
        denom = torch.where(counted, w_t, 0.0).sum()
    return torch.where(denom != 0, 1.0 / denom, 0.0).reshape(1)


def _reduce(rows: Tensor, reduction: Reduction, scale: Tensor) -> Tensor:
    if reduction == "none":
        return rows
    total = rows.sum()
    return total * scale[0] if reduction == "mean" else total


class CrossEntropyOutputs(NamedTuple):
    loss: Tensor  # in the logits' dtype: (N,) for "none", a scalar otherwise
    lse: Tensor  # (N,) float32 log-sum-exp of the (transformed) logits; 0 for ignored rows
    z_loss: Tensor  # float32 z-loss part of the loss, reduced like it; empty when not computed
    accuracy: Tensor  # float32 scalar: share of counted rows whose argmax is the target; or empty


def cross_entropy_forward(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    reduction: Reduction,
    label_smoothing: float,
    impl: Impl,
    *,
    compute_grad: bool = False,
    inplace: bool = False,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    lse_square_scale: float = 0.0,
    num_items_in_batch: Tensor | int | None = None,
    compute_accuracy: bool = False,
    out_dtype: torch.dtype | None = None,
    block_size: int | None = None,
    n_splits: int | None = None,
) -> tuple[CrossEntropyOutputs, Tensor | None]:
    """Run one pass and reduce: the outputs, and the scaled gradient when ``compute_grad``.

    Args:
        input: (N, C) logits with a contiguous last dimension.
        target: (N,) contiguous integer class indices.
        weight: (C,) float32 contiguous class weights, or None.
        inplace: write the gradient into ``input`` (returned as the gradient).
        out_dtype: dtype of the returned loss (default: the input's).
    """
    scale = reduction_scale(target, weight, ignore_index, reduction, input.shape[1],
                            num_items_in_batch)
    args = (target, weight, scale, ignore_index, float(label_smoothing), float(logit_scale),
            None if softcap is None else float(softcap), float(lse_square_scale),
            compute_accuracy, impl)
    grad = None
    if compute_grad and inplace:
        rows = RowResults(*_ce_forward_inplace_op(input, *args, block_size, n_splits))
        grad = input
    else:
        *row_list, grad_out = _ce_forward_op(input, *args, compute_grad, block_size, n_splits)
        rows = RowResults(*row_list)
        grad = grad_out if compute_grad else None
    outputs = finish(rows, target, ignore_index, reduction, scale, out_dtype or input.dtype,
                     lse_square_scale != 0.0, compute_accuracy)
    return outputs, grad


def finish(
    rows: RowResults,
    target: Tensor,
    ignore_index: int,
    reduction: Reduction,
    scale: Tensor,
    out_dtype: torch.dtype,
    has_z_loss: bool,
    has_accuracy: bool,
) -> CrossEntropyOutputs:
    """Reduce per-row results: the loss (in ``out_dtype``), z-loss and token accuracy."""
    loss = _reduce(rows.loss, reduction, scale).to(out_dtype)
    z_loss = _reduce(rows.z_loss, reduction, scale) if has_z_loss else rows.z_loss
    accuracy = rows.correct
    if has_accuracy:
        counted = (target != ignore_index).sum(dtype=torch.float32)
        accuracy = torch.where(counted > 0, rows.correct.sum() / counted.clamp_min(1.0), 0.0)
    return CrossEntropyOutputs(loss, rows.lse, z_loss, accuracy)


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
            logit_scale,       # float > 0 (default 1.0)
            softcap,           # float > 0 or None (default None)
            lse_square_scale,  # float >= 0: z-loss coefficient (default 0.0)
            num_items_in_batch,  # int | Tensor | None: the mean's denominator (default None)
            compute_accuracy,  # bool (default False)
            out_dtype,         # torch.dtype | None: the loss's dtype (default: the input's)
        )

    and get ``(loss, lse, z_loss, accuracy)`` (see ``CrossEntropyOutputs``); only ``loss`` is
    differentiable.  Arguments after ``inplace_backward`` may be left out.  Arguments are not
    checked here: ``fusedce.cross_entropy`` does that, reshapes other layouts and skips the
    gradient pass when no gradient is wanted (under ``torch.no_grad`` this Function cannot tell,
    so it writes the gradient whenever ``input`` requires grad).

    With ``inplace_backward=True`` the logits are overwritten by their gradient during the
    forward; that mutation bumps their version counter, so autograd raises an error if anything
    else saved them for its backward, instead of silently using the gradient as logits.  The
    backward runs once (``retain_graph`` is refused) because it scales the stored gradient in
    place.
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
        logit_scale: float = 1.0,
        softcap: float | None = None,
        lse_square_scale: float = 0.0,
        num_items_in_batch: Tensor | int | None = None,
        compute_accuracy: bool = False,
        out_dtype: torch.dtype | None = None,
    ):
        outputs, grad = cross_entropy_forward(
            input, target, weight, ignore_index, reduction, label_smoothing, impl,
            compute_grad=ctx.needs_input_grad[0], inplace=inplace_backward,
            logit_scale=logit_scale, softcap=softcap, lse_square_scale=lse_square_scale,
            num_items_in_batch=num_items_in_batch, compute_accuracy=compute_accuracy,
            out_dtype=out_dtype, block_size=block_size, n_splits=n_splits,
        )
        ctx.mark_non_differentiable(*outputs[1:])
        if grad is not None:
            # Saved after the in-place pass bumped the logits' version, so only a later change
            # of the logits (or a second backward) is an error.
            ctx.save_for_backward(grad)
        ctx.impl = impl
        ctx.consumed = False
        return tuple(outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output: Tensor, *unused):
        if torch.compiler.is_compiling():
            (grad,) = ctx.saved_tensors
            grad = grad * (grad_output.unsqueeze(-1) if grad_output.dim() else grad_output)
        else:
            if ctx.consumed:
                raise RuntimeError(
                    "fusedce.cross_entropy's backward ran twice: its forward stores one gradient "
                    "and the backward scales it in place, so retain_graph=True is not supported"
                )
            ctx.consumed = True
            (grad,) = ctx.saved_tensors
            _ce_scale_grad_op(grad, grad_output, ctx.impl)
            # A fresh alias of the storage: autograd can keep it as the gradient, where the
            # saved tensor object itself (the input, for an in-place pass) would be copied.
            grad = grad.detach()
        return (grad,) + (None,) * 15
