"""``fusedce.CrossEntropyLoss`` and ``fusedce.LinearCrossEntropyLoss``: the module forms of
``fusedce.cross_entropy`` and ``fusedce.linear_cross_entropy``."""

from __future__ import annotations

import inspect
from typing import Literal

import torch
from torch import Tensor, nn

from .functional import CrossEntropyStats, ImplChoice, cross_entropy, linear_cross_entropy


class _KeepsOptions(nn.Module):
    """A loss module that keeps its constructor's keywords as attributes (the class weights as
    a buffer, so ``.to()`` and ``state_dict`` carry them) and hands them to its function."""

    _NOT_OPTIONS = ("self", "__class__", "weight")

    def _keep(self, options: dict, *not_options: str) -> None:
        self.register_buffer("weight", options["weight"])
        self.weight: Tensor | None
        self._option_names = [k for k in options if k not in self._NOT_OPTIONS + not_options]
        for name in self._option_names:
            setattr(self, name, options[name])

    def _options(self) -> dict:
        return {name: getattr(self, name) for name in self._option_names}

    def extra_repr(self) -> str:
        defaults = inspect.signature(type(self).__init__).parameters
        always = ("ignore_index", "reduction", "label_smoothing", "impl")
        return ", ".join(f"{k}={v!r}" for k, v in self._options().items()
                         if k in always or v != defaults[k].default)


class CrossEntropyLoss(_KeepsOptions):
    """Drop-in for ``torch.nn.CrossEntropyLoss`` backed by ``fusedce.cross_entropy``.

    Args:
        weight: (C,) class weights, kept as a buffer (so ``.to()`` and ``state_dict`` carry it).
        ignore_index, reduction, label_smoothing: as in ``torch.nn.CrossEntropyLoss``.
        impl, inplace_backward, logit_scale, softcap, lse_square_scale, return_stats,
        out_dtype, process_group, backward, temperature, differentiable_stats,
        batch_invariant: as in ``fusedce.cross_entropy``.

    Shape: ``input`` (N, C), (C,) or (N, C, d1, ...); ``target`` (N,), () or (N, d1, ...).
    ``forward(input, target, num_items_in_batch=None, token_weight=None)`` takes the
    gradient-accumulation denominator and the per-token weights per call, since they change
    with every batch.
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
        backward: Literal["auto", "stored", "recompute"] = "auto",
        temperature: float = 1.0,
        differentiable_stats: bool = False,
        batch_invariant: bool = False,
    ) -> None:
        super().__init__()
        self._keep(dict(locals()))

    def forward(
        self, input: Tensor, target: Tensor, num_items_in_batch: int | Tensor | None = None,
        token_weight: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, CrossEntropyStats]:
        return cross_entropy(input, target, self.weight, num_items_in_batch=num_items_in_batch,
                             token_weight=token_weight, **self._options())


class LinearCrossEntropyLoss(_KeepsOptions):
    """An LM head and its cross-entropy in one: ``fusedce.linear_cross_entropy`` as a module.

    Holds the projection (``linear_weight`` of shape (C, H), optional ``linear_bias``) as
    parameters, like ``nn.Linear(H, C)``; ``forward(input, target, num_items_in_batch=None)``
    returns the loss of ``input @ linear_weight.T + linear_bias`` against ``target`` without
    materialising the logits.

    Args:
        in_features, num_classes: H and C.
        bias: whether the projection has a bias.
        weight, ignore_index, reduction, label_smoothing, logit_scale, softcap,
        lse_square_scale, return_stats, out_dtype, chunk_size, impl, backward, temperature,
        differentiable_stats, batch_invariant: as in ``fusedce.linear_cross_entropy``;
        ``weight`` (class weights) is kept as a buffer.
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
        backward: Literal["auto", "stored", "recompute"] = "auto",
        temperature: float = 1.0,
        differentiable_stats: bool = False,
        batch_invariant: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        proj = nn.Linear(in_features, num_classes, bias=bias, device=device, dtype=dtype)
        self.linear_weight = proj.weight
        self.linear_bias = proj.bias
        self._keep(dict(locals()), "in_features", "num_classes", "bias", "device", "dtype",
                   "proj")

    def forward(
        self, input: Tensor, target: Tensor, num_items_in_batch: int | Tensor | None = None,
        token_weight: Tensor | None = None,
    ) -> Tensor | tuple[Tensor, CrossEntropyStats]:
        return linear_cross_entropy(input, self.linear_weight, target,
                                    linear_bias=self.linear_bias, weight=self.weight,
                                    num_items_in_batch=num_items_in_batch,
                                    token_weight=token_weight, **self._options())


__all__ = ["CrossEntropyLoss", "LinearCrossEntropyLoss"]
