"""The one recipe every loss call runs, whatever its entry point (logits, fused linear,
vocabulary-parallel, shifted and multi-token; with or without a gradient): the reduction's
scale, each row's gradient factor, the implementation's pass over the logits, each row weighed
by its token weight, then the reduction.  The autograd Functions (``fusedce.autograd``) run it
in their forward; ``LossTensors`` carries a call's tensors beside its frozen ``LossSpec``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .passes import reduce_rows, reduction_scale, row_scale, weigh_rows
from .spec import LossSpec, RowResults


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


__all__ = ["LossTensors", "run_loss"]
