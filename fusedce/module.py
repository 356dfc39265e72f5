"""``fusedce.CrossEntropyLoss``: the module form of ``fusedce.cross_entropy``."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from .functional import CrossEntropyStats, ImplChoice, cross_entropy, linear_cross_entropy


class CrossEntropyLoss(nn.Module):
    """Drop-in for ``torch.nn.CrossEntropyLoss`` backed by ``fusedce.cross_entropy``.

    Args:
        weight: (C,) class weights, kept as a buffer (so ``.to()`` and ``state_dict`` carry it).
        ignore_index, reduction, label_smoothing: as in ``torch.nn.CrossEntropyLoss``.
        impl, inplace_backward, logit_scale, softcap, lse_square_scale, return_stats,
        out_dtype, process_group: as in ``fusedce.cross_entropy``.

    Shape: ``input`` (N, C), (C,) or (N, C, d1, ...); ``target`` (N,), () or (N, d1, ...).
    ``forward(input, target, num_items_in_batch=None)`` takes the gradient-accumulation
    denominator per call, since it changes with every batch.
    """

    def __init__(
        self,
        weight: Tensor | None = None,
        ignore_index: int = -100,
        reduction: Literal["none", "mean", "sum"] = "mean",
        label_smoothing: float = 0.0,
        *,
        impl: ImplChoice = "auto",
        inplace_backward: bool = False,
        logit_scale: float = 1.0,
        softcap: float | None = None,
        lse_square_scale: float = 0.0,
        return_stats: bool = False,
        out_dtype: torch.dtype | None = None,
        process_group: object | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.weight: Tensor | None
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.impl = impl
        self.inplace_backward = inplace_backward
        self.logit_scale = logit_scale
        self.softcap = softcap
        self.lse_square_scale = lse_square_scale
        self.return_stats = return_stats
        self.out_dtype = out_dtype
        self.process_group = process_group

    def forward(
        self, input: Tensor, target: Tensor, num_items_in_batch: int | Tensor | None = None
    ) -> Tensor | tuple[Tensor, CrossEntropyStats]:
        return cross_entropy(
            input,
            target,
            self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            impl=self.impl,
            inplace_backward=self.inplace_backward,
            logit_scale=self.logit_scale,
            softcap=self.softcap,
            lse_square_scale=self.lse_square_scale,
            num_items_in_batch=num_items_in_batch,
            return_stats=self.return_stats,
            out_dtype=self.out_dtype,
            process_group=self.process_group,
        )

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}, impl={self.impl!r}, "
            f"inplace_backward={self.inplace_backward}"
            + "".join(f", {k}={getattr(self, k)!r}" for k, default in
                      (("logit_scale", 1.0), ("softcap", None), ("lse_square_scale", 0.0),
                       ("return_stats", False), ("out_dtype", None))
                      if getattr(self, k) != default)
        )


class LinearCrossEntropyLoss(nn.Module):
    """An LM head and its cross-entropy in one: ``fusedce.linear_cross_entropy`` as a module.

    Holds the projection (``linear_weight`` of shape (C, H), optional ``linear_bias``) as
    parameters, like ``nn.Linear(H, C)``; ``forward(input, target, num_items_in_batch=None)``
    returns the loss of ``input @ linear_weight.T + linear_bias`` against ``target`` without
    materialising the logits.

    Args:
        in_features, num_classes: H and C.
        bias: whether the projection has a bias.
        weight, ignore_index, reduction, label_smoothing, logit_scale, softcap,
        lse_square_scale, return_stats, out_dtype, chunk_size, impl: as in
        ``fusedce.linear_cross_entropy``; ``weight`` (class weights) is kept as a buffer.
        device, dtype: of the parameters.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        bias: bool = False,
        *,
        weight: Tensor | None = None,
        ignore_index: int = -100,
        reduction: Literal["none", "mean", "sum"] = "mean",
        label_smoothing: float = 0.0,
        logit_scale: float = 1.0,
        softcap: float | None = None,
        lse_square_scale: float = 0.0,
        return_stats: bool = False,
        out_dtype: torch.dtype | None = None,
        chunk_size: int | None = None,
        impl: ImplChoice = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        proj = nn.Linear(in_features, num_classes, bias=bias, device=device, dtype=dtype)
        self.linear_weight = proj.weight
        self.linear_bias = proj.bias
        self.register_buffer("weight", weight)
        self.weight: Tensor | None
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.logit_scale = logit_scale
        self.softcap = softcap
        self.lse_square_scale = lse_square_scale
        self.return_stats = return_stats
        self.out_dtype = out_dtype
        self.chunk_size = chunk_size
        self.impl = impl

    def forward(
        self, input: Tensor, target: Tensor, num_items_in_batch: int | Tensor | None = None
    ) -> Tensor | tuple[Tensor, CrossEntropyStats]:
        return linear_cross_entropy(
            input,
            self.linear_weight,
            target,
            linear_bias=self.linear_bias,
            weight=self.weight,
            reduction=self.reduction,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            logit_scale=self.logit_scale,
            softcap=self.softcap,
            lse_square_scale=self.lse_square_scale,
            num_items_in_batch=num_items_in_batch,
            return_stats=self.return_stats,
            out_dtype=self.out_dtype,
            chunk_size=self.chunk_size,
            impl=self.impl,
        )


__all__ = ["CrossEntropyLoss", "LinearCrossEntropyLoss"]
