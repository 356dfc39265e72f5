"""``fusedce.cross_entropy``: argument checking, layout handling and the choice of implementation."""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .autograd import CrossEntropyFunction, cross_entropy_forward

ImplChoice = Literal["auto", "triton", "torch"]


class CrossEntropyStats(NamedTuple):
    """Training statistics computed in the same pass as the loss (float32, no gradient).

    ``lse``: the log-sum-exp of each row's (scaled, capped) logits, the target's shape, 0 where
    the target is ignored.  ``z_loss``: the z-loss part of the loss, reduced like the loss (0 when
    ``lse_square_scale`` is 0).  ``accuracy``: the share of counted targets that are their row's
    argmax (the first one, on ties), a scalar.
    """

    lse: Tensor
    z_loss: Tensor
    accuracy: Tensor
_REDUCTIONS = ("none", "mean", "sum")
_IMPLS = ("auto", "triton", "torch")


def _kernels_runnable_on(device: torch.device) -> tuple[bool, str]:
    """Whether the Triton kernels can run on tensors of ``device``, and if not, why."""
    try:
        from .kernels import INTERPRETED
    except ImportError as exc:  # Triton missing or broken
        return False, f"Triton could not be imported ({exc})"
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu" and INTERPRETED:
        return True, ""
    if device.type == "cpu":
        return False, (
            "the tensors are on the CPU; set TRITON_INTERPRET=1 before fusedce.kernels is "
            "imported to run the kernels in Triton's interpreter, or use impl='torch'"
        )
    return False, f"the Triton kernels do not run on {device.type} tensors"


def resolve_impl(impl: ImplChoice, device: torch.device) -> Literal["triton", "torch"]:
    """Map ``impl`` to the implementation that will run on tensors of ``device``.

    ``"auto"`` runs the Triton kernels for CUDA tensors (when Triton imports) and PyTorch
    otherwise; ``"triton"`` insists on the kernels; ``"torch"`` forces the PyTorch fallback.
    """
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    if impl == "torch":
        return "torch"
    runnable, why = _kernels_runnable_on(device)
    if impl == "triton":
        if not runnable:
            raise RuntimeError(f"impl='triton' cannot run: {why}")
        return "triton"
    return "triton" if device.type == "cuda" and runnable else "torch"


def _check_common(
    input: Tensor, weight: Tensor | None, reduction: str, label_smoothing: float,
    sliced: bool = False,
) -> None:
    """``sliced``: the input holds a slice of the vocabulary, so ``weight`` (the whole
    vocabulary's) is checked against the ranks' slices later."""
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(input).__name__}")
    if not input.is_floating_point():
        raise TypeError(f"input must hold floating-point logits, got dtype {input.dtype}")
    if input.dim() == 0:
        raise ValueError("input must have shape (C,), (N, C) or (N, C, d1, ...), got a scalar")
    n_classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    _check_loss_options(None if sliced else n_classes, input.device, weight, reduction,
                        label_smoothing)


def _check_loss_options(
    n_classes: int | None, device: torch.device, weight: Tensor | None, reduction: str,
    label_smoothing: float,
) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    if not isinstance(label_smoothing, (int, float)) or isinstance(label_smoothing, bool):
        raise TypeError(f"label_smoothing must be a float, got {type(label_smoothing).__name__}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if weight is not None:
        if not isinstance(weight, Tensor):
            raise TypeError(f"weight must be a torch.Tensor or None, got {type(weight).__name__}")
        if weight.dim() != 1 or (n_classes is not None and weight.shape[0] != n_classes):
            raise ValueError(
                f"weight must have shape ({n_classes},), one value per class, "
                f"got {tuple(weight.shape)}"
            )
        if not weight.is_floating_point():
            raise TypeError(f"weight must be floating-point, got dtype {weight.dtype}")
        if weight.device != device:
            raise ValueError(f"weight is on {weight.device} but input is on {device}")


def _check_class_target(input: Tensor, target: Tensor, ignore_index: int) -> None:
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(
            f"target must hold integer class indices, got dtype {target.dtype} with shape "
            f"{tuple(target.shape)} (class probabilities must have the input's shape "
            f"{tuple(input.shape)})"
        )
    if input.dim() == 1:
        expected = ()
    else:
        expected = (input.shape[0],) + tuple(input.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match input shape "
            f"{tuple(input.shape)}: expected {expected}"
        )
    if target.device != input.device:
        raise ValueError(f"target is on {target.device} but input is on {input.device}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")


def cross_entropy(
    input: Tensor,
    target: Tensor,
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
    num_items_in_batch: int | Tensor | None = None,
    return_stats: bool = False,
    out_dtype: torch.dtype | None = None,
    process_group: object | None = None,
) -> Tensor | tuple[Tensor, CrossEntropyStats]:
    """Cross-entropy between logits and class-index targets, a drop-in for ``F.cross_entropy``.

    The loss and the gradient of the logits are computed in one pass over the logits (float32
    arithmetic for every input dtype); the backward only applies ``grad_output``.

    Args:
        input: (N, C) or (C,) logits, float32/bfloat16/float16.  (N, C, d1, ...) is accepted too
            and moved to (N * d1 * ..., C) (a copy).  A row stride other than C (a column slice of
            a wider tensor, padded rows) is read in place.
        target: (N,) (or (), or (N, d1, ...)) integer class indices in [0, C) or
            ``ignore_index``.  Floating-point targets of the input's shape are class
            probabilities and are handed to ``torch.nn.functional.cross_entropy`` unchanged.
        weight: (C,) class weights, or None.
        ignore_index: target value that contributes neither loss nor gradient.  Any int,
            including a class id such as a pad id of 0.
        reduction: ``"none"`` (one loss per target), ``"mean"`` (sum over counted targets
            divided by the sum of their weights) or ``"sum"``.
        label_smoothing: in [0, 1], PyTorch's definition.
        impl: ``"auto"`` (Triton kernels for CUDA tensors, PyTorch otherwise), ``"triton"`` or
            ``"torch"``.
        inplace_backward: write the gradient into ``input``'s storage during the forward, so no
            logits-sized buffer is allocated.  The logits are consumed: after the call ``input``
            holds the gradient (before ``grad_output`` is applied), and reading it as logits is
            an error autograd reports if another operation saved it.  Only when a gradient is
            computed; without one ``input`` is left untouched.
        logit_scale: multiply the logits by this (> 0) first (Cohere/Granite-style scaling).
        softcap: then cap them to ``softcap * tanh(logits / softcap)`` (Gemma-2 style), or None.
        lse_square_scale: z-loss: add ``lse_square_scale * lse**2`` per counted target (times
            its class weight), reduced like the loss.
        num_items_in_batch: with ``reduction="mean"``, divide the summed loss by this instead of
            by the number (or weight) of counted targets: the number of real tokens over all
            micro-batches of a gradient-accumulation step, as transformers' Trainer passes it.
            A tensor stays on its device (no host synchronisation).
        return_stats: also return a ``CrossEntropyStats`` (log-sum-exp, z-loss, token
            accuracy), computed in the same pass over the logits.
        out_dtype: dtype of the returned loss, e.g. ``torch.float32`` for bf16 logits (the loss
            is always computed in float32; the default returns the input's dtype, as PyTorch).
        process_group: a ``torch.distributed`` group whose ranks each hold a contiguous slice
            of the vocabulary (in rank order, sizes may differ): ``input`` is this rank's
            slice of the logits, ``target`` the global class ids, ``weight`` the full weight
            vector.  Only per-token numbers are exchanged (see ``fusedce.distributed``); the
            loss is the same on every rank and the gradient is this rank's slice.

    Returns:
        The loss in the input's dtype: a scalar for ``mean`` and ``sum``, the target's shape for
        ``none``; with ``return_stats``, ``(loss, stats)``.

    Differences from PyTorch: with ``reduction="mean"`` a batch in which no target counts (all
    ignored, or empty) gives loss 0 and a zero gradient instead of NaN; rows whose target is
    ignored get an exactly zero gradient even when their logits are not finite.
    """
    _check_common(input, weight, reduction, label_smoothing, sliced=process_group is not None)
    _check_extras(reduction, logit_scale, softcap, lse_square_scale, num_items_in_batch,
                  out_dtype)
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    extras_used = (logit_scale != 1.0 or softcap is not None or lse_square_scale != 0.0
                   or num_items_in_batch is not None or return_stats or out_dtype is not None
                   or process_group is not None)
    if target.is_floating_point() and target.shape == input.shape:
        if extras_used:
            raise ValueError(
                "logit_scale, softcap, lse_square_scale, num_items_in_batch, return_stats, "
                "out_dtype and process_group need class-index targets; got class probabilities"
            )
        # Class probabilities: PyTorch's own implementation, with PyTorch's semantics.
        if weight is not None:
            weight = weight.to(input.dtype)
        return F.cross_entropy(
            input,
            target,
            weight,
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=float(label_smoothing),
        )
    _check_class_target(input, target, ignore_index)
    chosen = resolve_impl(impl, input.device)

    out_shape = target.shape
    n_classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    if input.dim() == 1:
        logits = input.unsqueeze(0)
    elif input.dim() == 2:
        logits = input
    else:
        logits = input.movedim(1, -1).reshape(-1, n_classes)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    flat_target = target.reshape(-1).contiguous()
    if weight is not None:
        weight = weight.to(torch.float32).contiguous()

    extras = (float(logit_scale), None if softcap is None else float(softcap),
              float(lse_square_scale), num_items_in_batch, bool(return_stats), out_dtype)
    if process_group is not None:
        from .distributed import VocabParallelCrossEntropyFunction, vocab_parallel_forward

        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise RuntimeError("process_group given but torch.distributed is not initialized")
        if torch.is_grad_enabled() and input.requires_grad:
            loss, lse, z_loss, accuracy = VocabParallelCrossEntropyFunction.apply(
                logits, flat_target, weight, ignore_index, reduction, float(label_smoothing),
                chosen, bool(inplace_backward), process_group, *extras[:4], extras[4],
                out_dtype)
        else:
            (loss, lse, z_loss, accuracy), _ = vocab_parallel_forward(
                logits, flat_target, weight, ignore_index, reduction, float(label_smoothing),
                chosen, process_group, compute_grad=False, inplace=False,
                logit_scale=extras[0], softcap=extras[1], lse_square_scale=extras[2],
                num_items_in_batch=extras[3], compute_accuracy=extras[4], out_dtype=out_dtype)
    elif torch.is_grad_enabled() and input.requires_grad:
        loss, lse, z_loss, accuracy = CrossEntropyFunction.apply(
            logits, flat_target, weight, ignore_index, reduction, float(label_smoothing), chosen,
            bool(inplace_backward), None, None, *extras,
        )
    else:
        (loss, lse, z_loss, accuracy), _ = cross_entropy_forward(
            logits, flat_target, weight, ignore_index, reduction, float(label_smoothing), chosen,
            logit_scale=extras[0], softcap=extras[1], lse_square_scale=extras[2],
            num_items_in_batch=extras[3], compute_accuracy=extras[4], out_dtype=out_dtype,
        )
    if reduction == "none":
        loss = loss.reshape(out_shape)
    if not return_stats:
        return loss
    if lse_square_scale == 0.0:
        z_loss = torch.zeros(loss.shape, dtype=torch.float32, device=loss.device)
    elif reduction == "none":
        z_loss = z_loss.reshape(out_shape)
    return loss, CrossEntropyStats(lse.reshape(out_shape), z_loss, accuracy)


def _check_extras(
    reduction: str,
    logit_scale: float,
    softcap: float | None,
    lse_square_scale: float,
    num_items_in_batch: int | Tensor | None,
    out_dtype: torch.dtype | None,
) -> None:
    if out_dtype is not None and not (isinstance(out_dtype, torch.dtype)
                                      and out_dtype.is_floating_point):
        raise TypeError(f"out_dtype must be a floating-point torch.dtype, got {out_dtype!r}")
    if not isinstance(logit_scale, (int, float)) or not (
        math.isfinite(logit_scale) and logit_scale > 0
    ):
        raise ValueError(f"logit_scale must be a finite number > 0, got {logit_scale!r}")
    if softcap is not None and not (
        isinstance(softcap, (int, float)) and math.isfinite(softcap) and softcap > 0
    ):
        raise ValueError(f"softcap must be None or a finite number > 0, got {softcap!r}")
    if not isinstance(lse_square_scale, (int, float)) or not (
        math.isfinite(lse_square_scale) and lse_square_scale >= 0
    ):
        raise ValueError(f"lse_square_scale must be a finite number >= 0, got {lse_square_scale!r}")
    if num_items_in_batch is not None:
        if reduction != "mean":
            raise ValueError(
                "num_items_in_batch replaces the denominator of reduction='mean'; got "
                f"reduction={reduction!r}"
            )
        if isinstance(num_items_in_batch, Tensor):
            if num_items_in_batch.numel() != 1:
                raise ValueError(
                    "num_items_in_batch must hold one number, got shape "
                    f"{tuple(num_items_in_batch.shape)}"
                )
        elif isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, int):
            raise TypeError(
                "num_items_in_batch must be an int, a one-element tensor or None, got "
                f"{type(num_items_in_batch).__name__}"
            )
        elif num_items_in_batch <= 0:
            raise ValueError(f"num_items_in_batch must be positive, got {num_items_in_batch}")


def linear_cross_entropy(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    *,
    linear_bias: Tensor | None = None,
    weight: Tensor | None = None,
    reduction: Literal["none", "mean", "sum"] = "mean",
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    lse_square_scale: float = 0.0,
    num_items_in_batch: int | Tensor | None = None,
    return_stats: bool = False,
    chunk_size: int | None = None,
    impl: ImplChoice = "auto",
) -> Tensor | tuple[Tensor, CrossEntropyStats]:
    """Cross-entropy of ``input @ linear_weight.T + linear_bias`` without materialising the logits.

    The same result as ``fusedce.cross_entropy(F.linear(input, linear_weight, linear_bias),
    target, weight, ...)``, with PyTorch's ``F.linear_cross_entropy`` argument names and order.
    Tokens are processed ``chunk_size`` rows at a time; the gradients of ``input``,
    ``linear_weight`` (accumulated in float32 for 16-bit weights) and ``linear_bias`` are made
    during the forward, and the backward only scales them by ``grad_output``.

    Args:
        input: (N, H) or (..., H) hidden states, float32/bfloat16/float16.
        linear_weight: (C, H) output projection, the input's dtype.
        target: (N,) (or the input's leading shape) integer class indices.
        linear_bias: (C,) or None.
        weight: (C,) class weights, or None.
        reduction, ignore_index, label_smoothing, logit_scale, softcap, lse_square_scale,
        num_items_in_batch, return_stats, impl: as in ``fusedce.cross_entropy``.
        chunk_size: rows per chunk; None picks logits about the size of ``input`` (at least
            8 Mi elements, at most 1/8 of free GPU memory).

    Returns:
        The loss in the input's dtype (the target's shape for ``none``); with ``return_stats``,
        ``(loss, CrossEntropyStats)``.
    """
    from .linear import default_chunk_size, linear_cross_entropy_outputs

    for name, t in (("input", input), ("linear_weight", linear_weight), ("target", target)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if input.dim() < 1 or not input.is_floating_point():
        raise TypeError(
            f"input must be floating-point hidden states of shape (N, H), got dtype {input.dtype}"
            f" and shape {tuple(input.shape)}"
        )
    if linear_weight.dim() != 2 or linear_weight.shape[1] != input.shape[-1]:
        raise ValueError(
            f"linear_weight must have shape (C, {input.shape[-1]}) for input of shape "
            f"{tuple(input.shape)}, got {tuple(linear_weight.shape)}"
        )
    if linear_weight.dtype != input.dtype:
        raise TypeError(
            f"linear_weight dtype {linear_weight.dtype} differs from input dtype {input.dtype}"
        )
    n_classes = linear_weight.shape[0]
    if linear_bias is not None and (
        not isinstance(linear_bias, Tensor) or tuple(linear_bias.shape) != (n_classes,)
        or linear_bias.dtype != input.dtype
    ):
        raise ValueError(
            f"linear_bias must be a ({n_classes},) tensor of dtype {input.dtype}, got "
            f"{getattr(linear_bias, 'shape', linear_bias)!r}"
        )
    for name, t in (("linear_weight", linear_weight), ("target", target),
                    ("linear_bias", linear_bias), ("weight", weight)):
        if t is not None and isinstance(t, Tensor) and t.device != input.device:
            raise ValueError(f"{name} is on {t.device} but input is on {input.device}")
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target must hold integer class indices, got dtype {target.dtype}")
    if tuple(target.shape) != tuple(input.shape[:-1]):
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match input shape "
            f"{tuple(input.shape)}: expected {tuple(input.shape[:-1])}"
        )
    _check_loss_options(n_classes, input.device, weight, reduction, label_smoothing)
    _check_extras(reduction, logit_scale, softcap, lse_square_scale, num_items_in_batch, None)
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    chosen = resolve_impl(impl, input.device)

    x = input.reshape(-1, input.shape[-1])
    if x.stride(-1) != 1:
        x = x.contiguous()
    flat_target = target.reshape(-1).contiguous()
    if weight is not None:
        weight = weight.to(torch.float32).contiguous()
    if chunk_size is None:
        chunk_size = default_chunk_size(x.shape[0], n_classes, x.shape[1], x.element_size(),
                                        x.device)
    loss, lse, z_loss, accuracy = linear_cross_entropy_outputs(
        x, linear_weight, flat_target, linear_bias, weight, ignore_index, reduction,
        float(label_smoothing), float(logit_scale), None if softcap is None else float(softcap),
        float(lse_square_scale), num_items_in_batch, bool(return_stats), chunk_size, chosen,
    )
    if reduction == "none":
        loss = loss.reshape(target.shape)
    if not return_stats:
        return loss
    if lse_square_scale == 0.0:
        z_loss = torch.zeros(loss.shape, dtype=torch.float32, device=loss.device)
    elif reduction == "none":
        z_loss = z_loss.reshape(target.shape)
    return loss, CrossEntropyStats(lse.reshape(target.shape), z_loss, accuracy)
