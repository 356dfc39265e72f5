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

from . import distributed, linear
from .passes import LossTensors, forward_pass, n_rows, run_loss, scale_grad_
from .spec import LossSpec, RowResults


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
                                 #   unit column stride, any row stride; or (G, T, C) groups
                                 #   of rows, any group and row strides
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
        recompute = compute_grad and spec.recompute_backward

        def row_pass(grad_scale: Tensor):
            rows, stats, grad = forward_pass(input, target, weight, grad_scale, spec,
                                             compute_grad=compute_grad and not recompute,
                                             store_stats=recompute)
            return rows, (stats, grad)

        outputs, grad_scale, (stats, grad) = run_loss(
            LossTensors(target, weight, token_weight, num_items_in_batch), spec,
            input.shape[-1], input.dtype, row_pass)
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
                              stat_grads=stat_grads(grad_lse, grad_entropy, n_rows(logits),
                                                    scale, spec))
    return grad.detach()


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Cross-entropy of ``input @ linear_weight.T + linear_bias`` without the logits tensor.

    Call as::

        LinearCrossEntropyFunction.apply(
            input,               # (N, H) hidden states, unit column stride
            linear_weight,       # (C, H) LM head
            linear_bias,         # (C,) or None
            target,              # (N,) int64 class indices
            weight,              # (C,) class weights in the math dtype, contiguous, or None
            num_items_in_batch,  # int | float | Tensor | None
            spec,                # fusedce.LossSpec (inplace_backward is not used)
            chunk_size,          # int: rows per chunk or block, or 0 for the default
            token_weight,        # (N,) per-token weights in the math dtype, or None (optional)
            chunk_bytes,         # int: the workspace bound in bytes, or 0 (optional)
            process_group,       # vocabulary parallelism: this rank's slice of the head, or
                                 # None (optional)
            reduce_input,        # with process_group: sum grad_input over the group (False:
                                 # the caller reduce-scatters it, sequence parallelism)
        )

    and get ``(loss, lse, z_loss, accuracy, entropy, argmax)`` as ``CrossEntropyFunction``
    does, with the same differentiable outputs.  The forward runs the recipe with the chunked
    pass of ``fusedce.linear`` (making the gradients of the input, weight and bias, scaled, in
    the same pass; with a recomputing backward, none); the backward scales them by
    ``grad_output`` or makes them in one more chunked pass.  Arguments are checked by
    ``fusedce.linear_cross_entropy``, not here.
    """

    @staticmethod
    def forward(ctx, input, linear_weight, linear_bias, target, weight, num_items_in_batch,
                spec, chunk_size, token_weight=None, chunk_bytes=0, process_group=None,
                reduce_input=True):
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                linear_bias is not None and ctx.needs_input_grad[2])
        deferred = spec.recompute_backward and any(need)
        n_classes, layout = linear_weight.shape[0], None
        if process_group is not None:
            layout = distributed.vocab_layout(process_group, linear_weight.shape[0],
                                              input.shape[0], input.dtype, input.device,
                                              hidden=input.shape[1])
            n_classes = layout.n_classes
            if weight is not None and weight.shape[0] != n_classes:
                raise ValueError(
                    f"weight must hold the whole vocabulary's {n_classes} class weights (the "
                    f"ranks' slices {list(layout.sizes)} add up to that), got {weight.shape[0]}")
        ctx.group, ctx.layout, ctx.reduce_input = process_group, layout, reduce_input

        def row_pass(grad_scale: Tensor):
            *rows, gx, gw, gb = _linear_pass(
                ctx, input, linear_weight, linear_bias, target, weight, grad_scale, None, None,
                spec, chunk_size, chunk_bytes, *((False,) * 3 if deferred else need))
            return RowResults(*rows), (gx, gw, gb)

        outputs, grad_scale, grads = run_loss(
            LossTensors(target, weight, token_weight, num_items_in_batch), spec,
            n_classes, input.dtype, row_pass)
        ctx.mark_non_differentiable(*non_differentiable(outputs, spec))
        ctx.set_materialize_grads(False)  # no zero gradients made for the statistics
        ctx.deferred, ctx.need, ctx.consumed = deferred, need, False
        ctx.spec, ctx.chunk_size, ctx.chunk_bytes = spec, chunk_size, chunk_bytes
        if deferred:
            ctx.save_for_backward(input, linear_weight, linear_bias, target, weight, grad_scale)
        else:
            ctx.save_for_backward(*(g if n else None for g, n in zip(grads, need)))
        return outputs

    @staticmethod
    def backward(ctx, grad_output, grad_lse, _z, _accuracy, grad_entropy, _argmax):
        refuse_double_backward("fusedce.linear_cross_entropy")
        compiling = torch.compiler.is_compiling()
        if ctx.consumed and not compiling:
            raise RuntimeError(
                "fusedce.linear_cross_entropy's backward ran twice: it scales the gradients "
                "made in the forward in place, so retain_graph=True is not supported"
            )
        ctx.consumed = True
        if ctx.deferred:
            x, w, b, target, weight, scale = ctx.saved_tensors
            # The per-token factors (and the statistics' gradients) go to the kernel per row.
            grads_in = stat_grads(grad_lse, grad_entropy, x.shape[0], scale, ctx.spec)
            *_, gx, gw, gb = _linear_pass(
                ctx, x, w, b, target, weight, loss_factors(grad_output, scale),
                *(grads_in if grads_in is not None else (None, None)),
                ctx.spec.replace(return_stats=False), ctx.chunk_size, ctx.chunk_bytes,
                *ctx.need)
            grads = [g if n else None for g, n in zip((gx, gw, gb), ctx.need)]
        else:
            grads = list(ctx.saved_tensors)
            if compiling:
                grads = [g * grad_output.to(g.dtype) if g is not None else None for g in grads]
            else:
                for g in grads:
                    if g is not None:
                        g.mul_(grad_output.to(g.dtype))  # small tensors: (N, H), (C, H), (C,)
        return (*grads, None, None, None, None, None, None, None, None, None)


def _linear_pass(ctx, x, w, b, target, weight, scale, lse_grad, entropy_grad, spec, chunk_size,
                 chunk_bytes, need_x, need_w, need_b):
    """The fused linear pass: the custom op, or this rank's vocabulary slice over its group."""
    if ctx.group is None:
        return linear.linear_ce_pass(x, w, b, target, weight, scale, lse_grad, entropy_grad,
                                     spec.encode(), chunk_size, chunk_bytes, need_x, need_w,
                                     need_b)
    return linear.vocab_parallel_linear_pass(x, w, b, target, weight, scale, lse_grad,
                                             entropy_grad, spec, chunk_size, chunk_bytes,
                                             need_x, need_w, need_b, ctx.group, ctx.layout,
                                             reduce_input=ctx.reduce_input)


class VocabParallelCrossEntropyFunction(torch.autograd.Function):
    """Cross-entropy of this rank's vocabulary slice of the logits
    (``fusedce.distributed.vocab_parallel_forward``: the row statistics merged over the group,
    then the recipe with a pass that writes this rank's slice of the gradient); the backward
    applies ``grad_output``.  ``apply(input, target, weight, num_items_in_batch, spec, group,
    token_weight)`` returns ``(loss, lse, z_loss, accuracy, entropy, argmax)``; only ``loss``
    is differentiable."""

    @staticmethod
    def forward(ctx, input, target, weight, num_items_in_batch, spec, group, token_weight=None):
        outputs, grad = distributed.vocab_parallel_forward(
            input, target, weight, num_items_in_batch, spec, group,
            compute_grad=ctx.needs_input_grad[0], token_weight=token_weight)
        ctx.mark_non_differentiable(*outputs[1:])
        ctx.set_materialize_grads(False)  # no zero gradients made for the statistics
        ctx.grad, ctx.spec = grad, spec  # an attribute: it may alias the input on purpose
        return outputs

    @staticmethod
    def backward(ctx, grad_output, *unused):
        refuse_double_backward("fusedce.cross_entropy (vocabulary-parallel)")
        grad = ctx.grad
        if grad is None:
            raise RuntimeError(
                "fusedce's vocabulary-parallel backward ran twice: it scales the stored "
                "gradient in place, so retain_graph=True is not supported"
            )
        ctx.grad = None
        scale_grad_(grad, grad_output, ctx.spec)
        return (grad, None, None, None, None, None, None)


def _maybe_detached(wants_grad: bool, *tensors: Tensor | None) -> tuple:
    """The Functions' differentiable inputs, detached when no gradient is wanted: the same
    recipe then runs without a gradient pass (a Function cannot tell ``torch.no_grad`` apart)."""
    return tensors if wants_grad else tuple(t.detach() if t is not None else None
                                            for t in tensors)


def cross_entropy_outputs(logits: Tensor, target: Tensor, weight: Tensor | None,
                          num_items_in_batch, spec: LossSpec, token_weight: Tensor | None,
                          wants_grad: bool, process_group=None) -> tuple[Tensor, ...]:
    """A logits-level loss through its Function (vocabulary-parallel with ``process_group``)."""
    (logits,) = _maybe_detached(wants_grad, logits)
    if process_group is not None:
        distributed.check_initialized()
        return VocabParallelCrossEntropyFunction.apply(logits, target, weight,
                                                       num_items_in_batch, spec, process_group,
                                                       token_weight)
    return CrossEntropyFunction.apply(logits, target, weight, num_items_in_batch, spec,
                                      token_weight)


def linear_cross_entropy_outputs(input: Tensor, linear_weight: Tensor, target: Tensor,
                                 linear_bias: Tensor | None, weight: Tensor | None,
                                 num_items_in_batch, spec: LossSpec,
                                 chunk_size: int | tuple[int, int] | None,
                                 token_weight: Tensor | None = None,
                                 process_group=None,
                                 reduce_input: bool = True) -> tuple[Tensor, ...]:
    """A fused linear loss through its Function."""
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, linear_weight, linear_bias))
    input, linear_weight, linear_bias = _maybe_detached(wants_grad, input, linear_weight,
                                                        linear_bias)
    rows, size = chunk_size if isinstance(chunk_size, tuple) else (chunk_size or 0, 0)
    return LinearCrossEntropyFunction.apply(input, linear_weight, linear_bias, target, weight,
                                            num_items_in_batch, spec, rows, token_weight, size,
                                            process_group, reduce_input)


__all__ = ["CrossEntropyFunction", "LinearCrossEntropyFunction",
           "VocabParallelCrossEntropyFunction", "cross_entropy_outputs",
           "linear_cross_entropy_outputs", "loss_factors", "non_differentiable",
           "refuse_double_backward", "stat_grads"]
