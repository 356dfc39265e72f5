"""One pass over the logits, whichever implementation runs it, the reduction of its rows, and
the one recipe around them that every loss call runs (``LossTensors``, ``run_loss``).

The passes are registered as ``torch.library`` custom ops (``fusedce::ce_forward``,
``fusedce::ce_forward_inplace`` with its mutation of the logits declared, and
``fusedce::ce_scale_grad_``), so ``torch.compile`` treats each as one opaque node with a known
output shape: no graph break, whichever implementation runs inside.  Their options travel as one
string, ``LossSpec.encode()``: the one place the spec is flattened.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from . import backends
from .spec import LossSpec, RowResults, RowStats


def n_rows(logits: Tensor) -> int:
    """The rows of (N, C) logits or of (G, T, C) groups of rows (``fusedce.kernels.Rows``)."""
    return logits.numel() // logits.shape[-1] if logits.shape[-1] else 0


def run_pass(logits: Tensor, target: Tensor, weight: Tensor | None, scale: Tensor | None,
             spec: LossSpec, grad: Tensor | None, *, weight_sum: Tensor | None = None,
             **placement) -> RowResults:
    """``ce_fwd`` of the backend ``spec.impl``: ``placement`` is its ``row_stats``, ``vocab``
    and ``stats_out`` (see ``fusedce.kernels.ce_fwd``); ``weight_sum`` defaults to the sum of
    ``weight`` (a vocabulary slice passes the whole vocabulary's)."""
    if weight is not None and weight_sum is None:
        weight_sum = weight.sum().reshape(1)
    return backends.get(spec.impl).ce_fwd(logits, target, weight, weight_sum, scale, spec, grad,
                                          **placement)


def row_stats(logits: Tensor, target: Tensor, weight: Tensor | None, spec: LossSpec) -> RowStats:
    """Partial statistics of each row (see ``fusedce.kernels.ce_row_stats``)."""
    return backends.get(spec.impl).ce_row_stats(logits, target, weight, spec)


def _custom_op(name: str, impl, mutates_args: tuple = ()):
    """``impl`` as the ``torch.library`` custom op ``name`` (one opaque node for
    ``torch.compile``), and a callable that goes through the op only while ``torch.compile``
    traces: in eager mode the dispatcher's hops around an op cost tens of microseconds per call,
    several times per loss, and buy nothing (a mutated argument's version is bumped by hand)."""
    op = torch.library.custom_op(name, impl, mutates_args=mutates_args)

    def call(*args):
        if torch.compiler.is_compiling():
            return op(*args)
        out = impl(*args)
        if mutates_args:  # (each of these ops mutates its first argument)
            torch.autograd.graph.increment_version(args[0])
        return out

    return op, call


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0, dtype=torch.float32)


def _ce_forward_impl(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    scale: Tensor,
    stats_in: Tensor | None,
    lse_grad: Tensor | None,
    entropy_grad: Tensor | None,
    spec: str,
    compute_grad: bool,
    store_stats: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One pass: per-row (loss, lse, z_loss, correct, entropy, argmax), each row's statistics
    (4, N, 1) when ``store_stats``, and a new gradient when ``compute_grad`` (empty tensors
    otherwise); ``lse_grad``/``entropy_grad``: the statistics' incoming gradients, or None."""
    options = LossSpec.decode(spec)
    acc = options.math_dtype(logits.dtype)
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device) \
        if compute_grad else None
    stats_out = torch.empty(4, n_rows(logits), 1, dtype=acc, device=logits.device) \
        if store_stats else None
    rows = run_pass(logits, target, weight, scale, options, grad,
                    row_stats=RowStats(stats_in, _empty(logits)) if stats_in is not None
                    else None, stats_out=stats_out,
                    stat_grads=(lse_grad, entropy_grad) if lse_grad is not None else None)
    return (*rows, stats_out if stats_out is not None else _empty(logits),
            grad if grad is not None else logits.new_empty(0))


def _fake_rows(logits: Tensor, spec: LossSpec) -> list[Tensor]:
    n = n_rows(logits)
    acc = spec.math_dtype(logits.dtype)
    n_stats = n if spec.return_stats else 0
    return [logits.new_empty(n, dtype=acc), logits.new_empty(n, dtype=acc),
            logits.new_empty(n if spec.has_z_loss else 0, dtype=acc),
            logits.new_empty(n_stats, dtype=acc), logits.new_empty(n_stats, dtype=acc),
            logits.new_empty(n_stats, dtype=torch.int64)]


_ce_forward_op, _ce_forward = _custom_op("fusedce::ce_forward", _ce_forward_impl, ())


@_ce_forward_op.register_fake
def _(logits, target, weight, scale, stats_in, lse_grad, entropy_grad, spec, compute_grad,
      store_stats):
    options = LossSpec.decode(spec)
    rows = _fake_rows(logits, options)
    stats = logits.new_empty((4, n_rows(logits), 1) if store_stats else (0,),
                             dtype=rows[0].dtype)
    return (*rows, stats, logits.new_empty(logits.shape if compute_grad else (0,)))


def _ce_forward_inplace_impl(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    scale: Tensor,
    stats_in: Tensor | None,
    lse_grad: Tensor | None,
    entropy_grad: Tensor | None,
    spec: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One pass that overwrites the logits with their scaled gradient."""
    rows = run_pass(logits, target, weight, scale, LossSpec.decode(spec), logits,
                    row_stats=RowStats(stats_in, _empty(logits)) if stats_in is not None
                    else None,
                    stat_grads=(lse_grad, entropy_grad) if lse_grad is not None else None)
    return tuple(rows)


_ce_forward_inplace_op, _ce_forward_inplace = _custom_op(
    "fusedce::ce_forward_inplace", _ce_forward_inplace_impl, ("logits",))


@_ce_forward_inplace_op.register_fake
def _(logits, target, weight, scale, stats_in, lse_grad, entropy_grad, spec):
    return tuple(_fake_rows(logits, LossSpec.decode(spec)))


def _ce_scale_grad_impl(grad: Tensor, grad_output: Tensor, spec: str) -> None:
    """grad *= grad_output (a scalar, or one value per row), in place."""
    backends.get(LossSpec.decode(spec).impl).ce_bwd(grad, grad_output)


_ce_scale_grad_op, _ce_scale_grad = _custom_op("fusedce::ce_scale_grad_", _ce_scale_grad_impl,
                                               ("grad",))


@_ce_scale_grad_op.register_fake
def _(grad, grad_output, spec):
    return None


def forward_pass(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    scale: Tensor,
    spec: LossSpec,
    *,
    compute_grad: bool,
    stats_in: Tensor | None = None,
    store_stats: bool = False,
    stat_grads: tuple[Tensor, Tensor] | None = None,
) -> tuple[RowResults, Tensor | None, Tensor | None]:
    """One pass through the custom ops: (rows, each row's statistics when ``store_stats``, the
    scaled gradient when ``compute_grad``, written into ``logits`` with
    ``spec.inplace_backward``); ``stat_grads``: (N,) gradients of the rows' lse and entropy to
    fold into the gradient (with ``stats_in`` of a pass that tracked the entropy)."""
    g_lse, g_h = stat_grads if stat_grads is not None else (None, None)
    if compute_grad and spec.inplace_backward:
        rows = RowResults(*_ce_forward_inplace(logits, target, weight, scale, stats_in,
                                                  g_lse, g_h, spec.encode()))
        return rows, None, logits
    *rows, stats, grad = _ce_forward(logits, target, weight, scale, stats_in, g_lse, g_h,
                                        spec.encode(), compute_grad, store_stats)
    return (RowResults(*rows), stats if store_stats else None,
            grad if compute_grad else None)


def scale_grad_(grad: Tensor, grad_output: Tensor, spec: LossSpec) -> None:
    """``grad *= grad_output`` in place (a scalar, or one value per row)."""
    _ce_scale_grad(grad, grad_output, spec.encode())


def _ce_scale_impl(target: Tensor, weight: Tensor | None, token_weight: Tensor | None,
                 items: Tensor | None, spec: str, n_classes: int, dtype: torch.dtype) -> Tensor:
    """The backend's reduction scale (see ``reduction_scale``)."""
    return backends.get(LossSpec.decode(spec).impl).ce_scale(
        target, weight, token_weight, items, LossSpec.decode(spec), n_classes, dtype)


_ce_scale_op, _ce_scale = _custom_op("fusedce::ce_scale", _ce_scale_impl, ())


@_ce_scale_op.register_fake
def _(target, weight, token_weight, items, spec, n_classes, dtype):
    return target.new_empty(1, dtype=dtype)


def _ce_reduce_impl(rows: Tensor, scale: Tensor | None, spec: str, out_dtype: torch.dtype
                  ) -> Tensor:
    """The backend's reduction: sum(rows), times ``scale`` when given."""
    if rows.numel() == 0:
        return torch.zeros((), dtype=out_dtype, device=rows.device)
    return backends.get(LossSpec.decode(spec).impl).ce_reduce(rows, scale, out_dtype)


_ce_reduce_op, _ce_reduce = _custom_op("fusedce::ce_reduce", _ce_reduce_impl, ())


@_ce_reduce_op.register_fake
def _(rows, scale, spec, out_dtype):
    return rows.new_empty((), dtype=out_dtype)


def reduction_scale(
    target: Tensor,
    weight: Tensor | None,
    spec: LossSpec,
    n_classes: int,
    num_items_in_batch: Tensor | float | None,
    dtype: torch.dtype,
    token_weight: Tensor | None = None,
) -> Tensor:
    """The factor applied to the summed per-row losses: a (1,) device tensor of ``dtype``.

    For ``mean`` it is ``1 / sum of the counted targets' weights`` (the count when unweighted),
    as in PyTorch, except that it is 0 when that sum is 0 (nothing counts, or the counted
    targets' weights add up to 0), so such a batch gives loss 0 and a zero gradient instead of
    NaN or inf; with ``token_weight`` (N,) each counted target's weight is multiplied by its
    token weight; with ``num_items_in_batch`` it is ``1 / num_items_in_batch``.  For ``sum`` and
    ``none`` it is 1.  Computed on the device by the backend, never read on the host.
    """
    device = target.device
    if spec.reduction != "mean":
        return torch.ones(1, dtype=dtype, device=device)
    if num_items_in_batch is not None and not isinstance(num_items_in_batch, Tensor):
        return torch.full((1,), 1.0 / num_items_in_batch, dtype=dtype, device=device)
    items = num_items_in_batch.to(device).reshape(1) if num_items_in_batch is not None \
        else None
    return _ce_scale(target, weight, token_weight, items, spec.encode(), n_classes, dtype)


def row_scale(scale: Tensor, target: Tensor, spec: LossSpec,
              token_weight: Tensor | None) -> Tensor:
    """The gradient's factor per row: the reduction scale, times each token's weight (0 for an
    ignored token, whatever its weight)."""
    if token_weight is None:
        return scale
    counted = target != spec.ignore_index
    return torch.where(counted, scale * token_weight.to(scale.dtype), 0.0).contiguous()


def weigh_rows(rows: RowResults, target: Tensor, spec: LossSpec,
               token_weight: Tensor | None) -> RowResults:
    """Multiply each counted row's loss and z-loss by its token weight (ignored rows stay 0)."""
    if token_weight is None:
        return rows
    counted = target != spec.ignore_index
    tw = token_weight.to(rows.loss.dtype)
    z_loss = torch.where(counted, rows.z_loss * tw, 0.0) if rows.z_loss.numel() else rows.z_loss
    return rows._replace(loss=torch.where(counted, rows.loss * tw, 0.0), z_loss=z_loss)


def reduce_rows(
    rows: RowResults,
    target: Tensor,
    spec: LossSpec,
    scale: Tensor,
    out_dtype: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Reduce per-row results: ``(loss in out_dtype, lse, z_loss, accuracy, entropy, argmax)``,
    with ``z_loss`` reduced like the loss, ``accuracy`` a scalar and the other statistics per
    row (empty tensors when not computed)."""

    def reduce(v: Tensor, dtype: torch.dtype) -> Tensor:
        if spec.reduction == "none":
            return v.to(dtype)
        return _ce_reduce(v, scale if spec.reduction == "mean" else None, spec.encode(),
                             dtype)

    loss = reduce(rows.loss, out_dtype)
    z_loss = reduce(rows.z_loss, rows.z_loss.dtype) if spec.has_z_loss else rows.z_loss
    accuracy = rows.correct
    if spec.return_stats:
        counted = (target != spec.ignore_index).sum(dtype=rows.correct.dtype)
        accuracy = torch.where(counted > 0, rows.correct.sum() / counted.clamp_min(1.0), 0.0)
    return loss, rows.lse, z_loss, accuracy, rows.entropy, rows.argmax


# The one recipe every loss call runs, whatever its entry point (logits, fused linear,
# vocabulary-parallel, shifted and multi-token; with or without a gradient), in the forward of
# its autograd Function (``fusedce.autograd``).


@dataclasses.dataclass(frozen=True)
class LossTensors:
    """The per-call tensors of one loss, beside its frozen ``LossSpec``: what changes with
    every batch (the options do not)."""

    target: Tensor  # (N,) int64 class ids (global ones under vocabulary parallelism)
    weight: Tensor | None = None  # (C,) class weights in the math dtype, contiguous
    token_weight: Tensor | None = None  # (N,) per-token weights in the math dtype
    num_items: float | Tensor | None = None  # the mean's denominator, if given


def run_loss(tensors: LossTensors, spec: LossSpec, n_classes: int, logits_dtype: torch.dtype,
             row_pass: Callable[[Tensor], tuple[RowResults, Any]]) -> tuple[tuple, Tensor, Any]:
    """The one recipe of every loss call (logits, fused linear, vocabulary-parallel; with or
    without a gradient): the reduction's scale, each row's gradient factor, ``row_pass`` (the
    implementation's pass over the logits, given those factors: per-row results and whatever
    the pass keeps for the backward), each row weighed by its token weight, then the reduction.

    Returns:
        ``((loss, lse, z_loss, accuracy, entropy, argmax), the rows' factors, what row_pass
        kept)``.
    """
    scale = reduction_scale(tensors.target, tensors.weight, spec, n_classes, tensors.num_items,
                            spec.math_dtype(logits_dtype), tensors.token_weight)
    grad_scale = row_scale(scale, tensors.target, spec, tensors.token_weight)
    rows, kept = row_pass(grad_scale)
    rows = weigh_rows(rows, tensors.target, spec, tensors.token_weight)
    outputs = reduce_rows(rows, tensors.target, spec, scale, spec.out_dtype or logits_dtype)
    return outputs, grad_scale, kept


__all__ = ["LossTensors", "forward_pass", "n_rows", "reduce_rows", "reduction_scale", "row_scale",
           "row_stats", "run_loss", "run_pass", "scale_grad_", "weigh_rows"]
