"""The autograd Function around one cross-entropy pass (Triton kernels or PyTorch).

Two backward designs, chosen by ``LossSpec.recompute_backward``:

* **stored** (``mean``, ``sum``): the forward computes the loss and, when a gradient is needed,
  the gradient of the logits in the same pass, already scaled for the reduction; the backward
  only multiplies it by the scalar ``grad_output`` (and does nothing when it is 1).
* **recomputed** (``none``): the forward reads the logits once for the per-row losses and keeps
  each row's statistics (max, sum of exponentials, smoothing sum); the backward reads the logits
  once more and writes the gradient with the per-token ``grad_output`` folded in before its one
  rounding (one read and one write, where scaling a stored gradient would cost two more).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .passes import forward_pass, reduce_rows, reduction_scale, row_scale, scale_grad_, weigh_rows
from .spec import LossSpec


def refuse_double_backward(name: str) -> None:
    """Raise when a backward runs with ``create_graph=True`` (a gradient penalty, a
    Hessian-vector product): fusedce's backward is first-order only, and silently dropping the
    second-order term would give a wrong answer."""
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(
            f"{name} does not support double backward (create_graph=True, e.g. a gradient "
            "penalty or a Hessian-vector product): its backward is first-order only.  Compute "
            "that loss with torch.nn.functional.cross_entropy instead."
        )


class CrossEntropyFunction(torch.autograd.Function):
    """Cross-entropy whose forward also writes (or prepares) the gradient of the logits.

    Call as::

        CrossEntropyFunction.apply(
            input,               # (N, C) logits, float32/bfloat16/float16 (float64: impl "torch"),
                                 #   unit column stride, any row stride
            target,              # (N,) int64 class indices
            weight,              # (C,) class weights in the math dtype (float32; float64 for
                                 #   float64 logits), contiguous, or None
            num_items_in_batch,  # int | float | Tensor | None: the mean's denominator
            spec,                # fusedce.LossSpec: every other option
            token_weight,        # (N,) per-token weights in the math dtype, or None (optional)
        )

    and get ``(loss, lse, z_loss, accuracy, entropy, argmax)``: ``loss`` reduced as
    ``spec.reduction`` says, in ``spec.out_dtype`` (or the input's dtype), ``lse`` per row,
    ``z_loss`` reduced like the loss, ``accuracy`` a scalar, ``entropy`` and ``argmax`` per row
    (empty unless ``spec.lse_square_scale`` / ``spec.return_stats`` ask for them).  ``loss``
    is differentiable, and so are ``lse`` and ``entropy`` with ``spec.differentiable_stats``.
    Arguments are not checked here: ``fusedce.cross_entropy`` does that, reshapes other
    layouts, and skips the gradient pass when no gradient is wanted (under ``torch.no_grad``
    this Function cannot tell, so it writes the gradient whenever ``input`` requires grad).

    With ``spec.inplace_backward`` the logits are overwritten by their gradient (during the
    forward, or for ``reduction="none"`` during the backward); that mutation bumps their version
    counter, so autograd raises an error if anything else saved them for its backward.  The
    backward runs once (``retain_graph`` is refused) and is first-order only (``create_graph``
    is refused).
    """

    @staticmethod
    def forward(ctx, input: Tensor, target: Tensor, weight: Tensor | None,
                num_items_in_batch, spec: LossSpec, token_weight: Tensor | None = None):
        compute_grad = ctx.needs_input_grad[0]
        dtype = spec.math_dtype(input.dtype)
        scale = reduction_scale(target, weight, spec, input.shape[1], num_items_in_batch, dtype,
                                token_weight)
        grad_scale = row_scale(scale, target, spec, token_weight)
        recompute = compute_grad and spec.recompute_backward
        rows, stats, grad = forward_pass(input, target, weight, grad_scale, spec,
                                         compute_grad=compute_grad and not recompute,
                                         store_stats=recompute)
        rows = weigh_rows(rows, target, spec, token_weight)
        outputs = reduce_rows(rows, target, spec, scale, spec.out_dtype or input.dtype)
        ctx.mark_non_differentiable(*non_differentiable(outputs, spec))
        ctx.set_materialize_grads(False)  # no zero gradients made for the statistics
        ctx.spec, ctx.recompute, ctx.consumed = spec, recompute, False
        if recompute:
            ctx.save_for_backward(input, target, weight, grad_scale, stats)
        elif grad is not None:
            # Saved after the in-place pass bumped the logits' version, so only a later change
            # of the logits (or a second backward) is an error.
            ctx.save_for_backward(grad)
        return outputs

    @staticmethod
    def backward(ctx, grad_output: Tensor | None, grad_lse: Tensor | None, _z,
                 _accuracy, grad_entropy: Tensor | None, _argmax):
        refuse_double_backward("fusedce.cross_entropy")
        if ctx.consumed and not torch.compiler.is_compiling():
            raise RuntimeError(
                "fusedce.cross_entropy's backward ran twice: it consumes what its forward "
                "stored, so retain_graph=True is not supported"
            )
        ctx.consumed = True
        if ctx.recompute:
            grad = _recomputed_grad(ctx, grad_output, grad_lse, grad_entropy)
            return (grad, None, None, None, None, None)
        (grad,) = ctx.saved_tensors
        if torch.compiler.is_compiling():
            # Out of place under compilation (Inductor fuses it).
            return (grad * (grad_output.unsqueeze(-1) if grad_output.dim() else grad_output),
                    None, None, None, None, None)
        scale_grad_(grad, grad_output, ctx.spec)
        # A fresh alias of the storage: autograd can keep it as the gradient, where the saved
        # tensor object itself (the input, for an in-place pass) would be copied.
        return (grad.detach(), None, None, None, None, None)


def non_differentiable(outputs: tuple, spec: LossSpec) -> tuple:
    """The outputs ``(loss, lse, z_loss, accuracy, entropy, argmax)`` that get no gradient:
    all but the loss, and but lse and entropy with ``spec.differentiable_stats``."""
    _, lse, z_loss, accuracy, entropy, argmax = outputs
    if spec.differentiable_stats:
        return z_loss, accuracy, argmax
    return lse, z_loss, accuracy, entropy, argmax


def stat_grads(grad_lse: Tensor | None, grad_entropy: Tensor | None, n_rows: int,
               like: Tensor, spec: LossSpec) -> tuple[Tensor, Tensor] | None:
    """The statistics' incoming gradients as two (N,) tensors of ``like``'s dtype (zeros for
    one that got none), or None when neither got any or ``spec.differentiable_stats`` is off
    (under compilation autograd may hand zeros to non-differentiable outputs)."""
    if not spec.differentiable_stats or (grad_lse is None and grad_entropy is None):
        return None

    def rows(g: Tensor | None) -> Tensor:
        if g is None:
            return torch.zeros(n_rows, dtype=like.dtype, device=like.device)
        return g.reshape(-1).to(like.dtype).contiguous()

    return rows(grad_lse), rows(grad_entropy)


def loss_factors(grad_output: Tensor | None, scale: Tensor) -> Tensor:
    """Each row's gradient factor: ``grad_output`` (a scalar or one per row; None: no gradient
    reached the loss) times the reduction scale."""
    if grad_output is None:
        return torch.zeros_like(scale)
    return (grad_output.reshape(-1).to(scale.dtype) * scale).contiguous()


def _recomputed_grad(ctx, grad_output: Tensor | None, grad_lse: Tensor | None,
                     grad_entropy: Tensor | None) -> Tensor:
    """The recomputing backward: one pass over the saved logits with each row's gradient
    factor (grad_output times the reduction scale) and, with ``spec.differentiable_stats``, the
    statistics' gradients folded in."""
    logits, target, weight, scale, stats = ctx.saved_tensors
    spec = ctx.spec.replace(return_stats=False)
    if torch.compiler.is_compiling():
        spec = spec.replace(inplace_backward=False)
    factors = loss_factors(grad_output, scale)
    _, _, grad = forward_pass(logits, target, weight, factors, spec, compute_grad=True,
                              stats_in=stats,
                              stat_grads=stat_grads(grad_lse, grad_entropy, logits.shape[0],
                                                    scale, spec))
    return grad.detach()


__all__ = ["CrossEntropyFunction", "loss_factors", "non_differentiable",
           "refuse_double_backward", "stat_grads"]
