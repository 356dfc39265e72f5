"""``fusedce.CrossEntropyLoss``: the module form of ``fusedce.cross_entropy``."""

from __future__ import annotations

from typing import Literal

from torch import Tensor, nn

from .functional import ImplChoice, cross_entropy


class CrossEntropyLoss(nn.Module):
    """Drop-in for ``torch.nn.CrossEntropyLoss`` backed by ``fusedce.cross_entropy``.

    Args:
        weight: (C,) class weights, kept as a buffer (so ``.to()`` and ``state_dict`` carry it).
        ignore_index, reduction, label_smoothing: as in ``torch.nn.CrossEntropyLoss``.
        impl, inplace_backward: as in ``fusedce.cross_entropy``.

    Shape: ``input`` (N, C), (C,) or (N, C, d1, ...); ``target`` (N,), () or (N, d1, ...).
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
    ) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.weight: Tensor | None
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing
        self.impl = impl
        self.inplace_backward = inplace_backward

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return cross_entropy(
            input,
            target,
            self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            impl=self.impl,
            inplace_backward=self.inplace_backward,
        )

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}, impl={self.impl!r}, "
            f"inplace_backward={self.inplace_backward}"
        )


__all__ = ["CrossEntropyLoss"]
