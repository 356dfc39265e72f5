"""``fusedce.CrossEntropyLoss`` and ``fusedce.LinearCrossEntropyLoss``: the module forms of
``fusedce.cross_entropy`` and ``fusedce.linear_cross_entropy``."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from . import options
from .functional import CrossEntropyStats, cross_entropy, linear_cross_entropy


class _KeepsOptions(nn.Module):
    """A loss module that keeps PyTorch's arguments and its keyword options (``fusedce.options``,
    checked and completed at construction) as attributes, the class weights as a buffer (so
    ``.to()`` and ``state_dict`` carry them), and hands them to its function."""

    _ENTRY: str

    def _keep(self, weight: Tensor | None, explicit: dict, keywords: dict) -> None:
        self.register_buffer("weight", weight)
        self.weight: Tensor | None
        kept = dict(explicit, **options.collect(self._ENTRY, keywords))
        self._option_names = list(kept)
        for name, value in kept.items():
            setattr(self, name, value)

    def _options(self) -> dict:
        return {name: getattr(self, name) for name in self._option_names}

    def extra_repr(self) -> str:
        always = ("ignore_index", "reduction", "label_smoothing", "impl")
        defaults = {o.name: o.default for o in options.OPTIONS}
        return ", ".join(f"{k}={v!r}" for k, v in self._options().items()
                         if k in always or k not in defaults or v != defaults[k])


@options.public_class(options.CE_MODULE)
class CrossEntropyLoss(_KeepsOptions):
    """Drop-in for ``torch.nn.CrossEntropyLoss`` backed by ``fusedce.cross_entropy``.

    Shape: ``input`` (N, C), (C,) or (N, C, d1, ...); ``target`` (N,), () or (N, d1, ...).
    ``forward(input, target, num_items_in_batch=None, token_weight=None)`` takes the
    gradient-accumulation denominator and the per-token weights per call, since they change
    with every batch.

    Args:
        weight: (C,) class weights, kept as a buffer (so ``.to()`` and ``state_dict`` carry it).
        ignore_index, reduction, label_smoothing: as in ``torch.nn.CrossEntropyLoss``.
        {options}
    """

    _ENTRY = options.CE_MODULE

    @options.public(options.CE_MODULE)
    def __init__(
        self,
        weight: Tensor | None = None,
        ignore_index: int = -100,
        reduction: Literal["none", "mean", "sum"] = "mean",
        label_smoothing: float = 0.0,
        **keywords,
    ) -> None:
        super().__init__()
        self._keep(weight, dict(ignore_index=ignore_index, reduction=reduction,
                                label_smoothing=label_smoothing), keywords)

    def forward(
        self, input: Tensor, target: Tensor, num_items_in_batch: int | Tensor | None = None,
        token_weight: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, CrossEntropyStats]:
        return cross_entropy(input, target, self.weight, num_items_in_batch=num_items_in_batch,
                             token_weight=token_weight, **self._options())


@options.public_class(options.LINEAR_MODULE)
class LinearCrossEntropyLoss(_KeepsOptions):
    """An LM head and its cross-entropy in one: ``fusedce.linear_cross_entropy`` as a module.

    Holds the projection (``linear_weight`` of shape (C, H), optional ``linear_bias``) as
    parameters, like ``nn.Linear(H, C)``; ``forward(input, target, num_items_in_batch=None,
    token_weight=None)`` returns the loss of ``input @ linear_weight.T + linear_bias`` against
    ``target`` without materialising the logits.

    Args:
        in_features, num_classes: H and C.
        bias: whether the projection has a bias.
        weight: (C,) class weights, kept as a buffer.
        ignore_index, reduction, label_smoothing: as in ``fusedce.linear_cross_entropy``.
        device, dtype: of the parameters.
        {options}
    """

    _ENTRY = options.LINEAR_MODULE

    @options.public(options.LINEAR_MODULE)
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
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        **keywords,
    ) -> None:
        super().__init__()
        proj = nn.Linear(in_features, num_classes, bias=bias, device=device, dtype=dtype)
        self.linear_weight = proj.weight
        self.linear_bias = proj.bias
        self._keep(weight, dict(ignore_index=ignore_index, reduction=reduction,
                                label_smoothing=label_smoothing), keywords)

    def forward(
        self, input: Tensor, target: Tensor, num_items_in_batch: int | Tensor | None = None,
        token_weight: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, CrossEntropyStats]:
        return linear_cross_entropy(input, self.linear_weight, target,
                                    linear_bias=self.linear_bias, weight=self.weight,
                                    num_items_in_batch=num_items_in_batch,
                                    token_weight=token_weight, **self._options())


__all__ = ["CrossEntropyLoss", "LinearCrossEntropyLoss"]
