"""``fusedce.cross_entropy`` and ``fusedce.linear_cross_entropy``: the public functions.

They check their arguments once (``fusedce.checks``), freeze the options into a ``LossSpec``,
bring the logits and targets to the layout every implementation takes ((N, C) logits with a unit
column stride, (N,) int64 targets), and hand over to the autograd Functions.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import checks, distributed, linear
from .autograd import CrossEntropyFunction
from .checks import resolve_impl
from .passes import forward_pass, reduce_rows, reduction_scale, weigh_rows
from .spec import LossSpec

ImplChoice = Literal["auto", "triton", "torch"]


class CrossEntropyStats(NamedTuple):
    """Training statistics computed in the same pass as the loss (float32, or float64 for
    float64 logits; no gradient unless ``differentiable_stats=True``, which gives ``lse`` and
    ``entropy`` theirs).

    ``lse``: the log-sum-exp of each row's transformed logits ``z`` (scaled, capped, divided by
    the temperature), the target's shape, 0 where the target is ignored.  ``z_loss``: the
    z-loss part of the loss, reduced like the loss (0 when ``lse_square_scale`` is 0).
    ``accuracy``: the share of counted targets that are their row's argmax (the first one, on
    ties), a scalar.  ``entropy``: each token's entropy ``H = lse - sum_c p_c z_c`` of
    ``p = softmax(z)``, the target's shape, 0 where ignored.  ``argmax``: each token's
    predicted class (the first argmax of its logits, int64), -1 where ignored.
    """

    lse: Tensor
    z_loss: Tensor
    accuracy: Tensor
    entropy: Tensor
    argmax: Tensor


def _check_probability_call(weight: Tensor | None, n_classes: int, device: torch.device,
                            options: dict) -> None:
    """Class-probability targets take PyTorch's own keywords only."""
    checks.check_keywords(options)
    checks.check_weight(weight, n_classes, device)
    extras = checks.class_only_keywords(options)
    if extras:
        raise ValueError(f"{', '.join(extras)} need class-index targets; got class "
                         f"probabilities")


def _probability_loss(logits: Tensor, target: Tensor, weight: Tensor | None,
                      options: dict) -> Tensor:
    """Class probabilities (checked by ``_check_probability_call``): PyTorch's own
    implementation, with PyTorch's semantics."""
    if weight is not None:
        weight = weight.to(logits.dtype)
    return F.cross_entropy(logits, target, weight, ignore_index=options["ignore_index"],
                           reduction=options["reduction"],
                           label_smoothing=float(options["label_smoothing"]))


def _as_rows(input: Tensor, n_classes: int) -> Tensor:
    """(N, C) logits with a unit column stride: a view of ``input`` where one exists."""
    if input.dim() == 1:
        logits = input.unsqueeze(0)
    elif input.dim() == 2:
        logits = input
    else:
        logits = input.movedim(1, -1).reshape(-1, n_classes)
    return logits if logits.stride(-1) == 1 else logits.contiguous()


def _finish(outputs, spec: LossSpec, shape: torch.Size):
    """Reshape the Function's outputs to the target's shape; build the statistics."""
    loss, lse, z_loss, accuracy, entropy, argmax = outputs
    if spec.reduction == "none":
        loss = loss.reshape(shape)
    if not spec.return_stats:
        return loss
    if not spec.has_z_loss:
        z_loss = torch.zeros(loss.shape, dtype=lse.dtype, device=loss.device)
    elif spec.reduction == "none":
        z_loss = z_loss.reshape(shape)
    return loss, CrossEntropyStats(lse.reshape(shape), z_loss, accuracy, entropy.reshape(shape),
                                   argmax.reshape(shape))


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
    backward: Literal["auto", "stored", "recompute"] = "auto",
    temperature: float = 1.0,
    token_weight: Tensor | None = None,
    differentiable_stats: bool = False,
    batch_invariant: bool = False,
) -> Tensor | tuple[Tensor, CrossEntropyStats]:
    """Cross-entropy between logits and class-index targets, a drop-in for ``F.cross_entropy``.
    (Long for its docstring, the public contract; the work is in ``prepare_cross_entropy``.)

    The loss and the gradient of the logits are computed in one pass over the logits (float32
    arithmetic for 16- and 32-bit logits, float64 for float64); the backward only applies
    ``grad_output`` (for ``reduction="none"`` it makes one more pass that writes the gradient
    with the per-token ``grad_output`` folded in).

    Args:
        input: (N, C) or (C,) logits, float32/bfloat16/float16/float64.  (N, C, d1, ...) is
            accepted too and moved to (N * d1 * ..., C) (a copy).  A row stride other than C
            (a column slice of a wider tensor, a row slice, padded rows) is read in place.
        target: (N,) (or (), or (N, d1, ...)) integer class indices in [0, C) or
            ``ignore_index``, of any integer dtype (compared with ``ignore_index`` as int64).
            Floating-point targets of the input's shape are class probabilities and are handed
            to ``torch.nn.functional.cross_entropy`` unchanged.
        weight: (C,) class weights, or None.  It gets no gradient (must not require grad).
        ignore_index: target value that contributes neither loss nor gradient.  Any int,
            including a class id such as a pad id of 0.
        reduction: ``"none"`` (one loss per target), ``"mean"`` (sum over counted targets
            divided by the sum of their weights) or ``"sum"``.
        label_smoothing: in [0, 1], PyTorch's definition.
        impl: ``"auto"`` (Triton kernels for CUDA tensors, PyTorch otherwise and for float64),
            ``"triton"`` or ``"torch"``.
        inplace_backward: write the gradient into ``input``'s storage, so no logits-sized
            buffer is allocated.  The logits are consumed: after the forward (after the
            backward for ``reduction="none"``) ``input`` holds the gradient.  Refused with an
            error, before anything is written, for a leaf tensor that requires grad or a view of
            one, and for logits whose rows overlap in memory.  Only when a gradient is computed;
            without one ``input`` is left untouched.
        logit_scale: multiply the logits by this (> 0) first (Cohere/Granite-style scaling).
        softcap: then cap them to ``softcap * tanh(logits / softcap)`` (Gemma-2 style), or None.
        lse_square_scale: z-loss: add ``lse_square_scale * lse**2`` per counted target (times
            its class weight), reduced like the loss.
        num_items_in_batch: with ``reduction="mean"``, divide the summed loss by this instead of
            by the number (or weight) of counted targets: the number of real tokens over all
            micro-batches of a gradient-accumulation step, as transformers' Trainer passes it.
            A number or a CPU tensor is checked to be positive; a tensor on the input's device is
            never read on the host (no synchronisation) and so not checked.
        return_stats: also return a ``CrossEntropyStats`` (log-sum-exp, z-loss, token
            accuracy), computed in the same pass over the logits.
        out_dtype: dtype of the returned loss, e.g. ``torch.float32`` for bf16 logits (the loss
            is always computed in float32 or better; the default returns the input's dtype).
        process_group: a ``torch.distributed`` group whose ranks each hold a contiguous slice
            of the vocabulary (in rank order, sizes may differ): ``input`` is this rank's
            slice of the logits, ``target`` the global class ids, ``weight`` the full weight
            vector.  Only per-token numbers are exchanged (see ``fusedce.distributed``); the
            loss is the same on every rank and the gradient is this rank's slice.
        backward: ``"stored"``: the forward writes the gradient and the backward scales it by
            ``grad_output`` (4 bytes per bf16 logit when ``grad_output`` is 1, 8 otherwise);
            ``"recompute"``: the forward keeps per-row statistics and the backward writes the
            gradient with ``grad_output`` folded in (6 bytes per logit whatever
            ``grad_output`` is; the logits stay alive until the backward); ``"auto"``:
            recompute for ``reduction="none"``, stored otherwise.
        temperature: divide the (scaled, capped) logits by this (> 0) last: loss, statistics and
            gradient are those of ``softmax(z / temperature)``, as a sampler at that
            temperature sees it.
        token_weight: the target's shape, floating point: multiplies each counted token's loss
            and z-loss (advantages, masks; may be negative); ``mean`` divides by the sum over
            counted tokens of ``token_weight * class weight`` (or by ``num_items_in_batch``).
            It gets no gradient.
        differentiable_stats: with ``return_stats``, ``stats.lse`` and ``stats.entropy``
            carry gradients (``dlse/dz = p``, ``dH/dz_c = -p_c (z_c - sum p z)``): the
            backward then recomputes the gradient of the logits from the saved logits with
            every incoming gradient folded in (one more read and one write of each logit).
        batch_invariant: each row's loss, statistics and gradient are bitwise the same whatever
            the other rows are and however many there are (for one implementation, device,
            dtype and set of options): the kernels never split a row by the row count, and the
            PyTorch implementation computes fixed-size, padded chunks of rows.  The gradient of
            a ``mean`` still depends on the batch through its denominator (pass
            ``num_items_in_batch`` or use ``sum``/``none`` for invariant gradients).

    Returns:
        The loss in the input's dtype: a scalar for ``mean`` and ``sum``, the target's shape for
        ``none``; with ``return_stats``, ``(loss, stats)``.

    Differences from PyTorch: with ``reduction="mean"`` a batch whose denominator is 0 (no
    target counts, an empty batch, or class weights of the counted targets adding up to 0)
    gives loss 0 and a zero gradient instead of NaN or inf; rows whose target is ignored get an
    exactly zero gradient even when their logits are not finite; no double backward.
    """
    return prepare_cross_entropy(dict(locals()))()


def call_options(function: Callable, *args, **kwargs) -> dict:
    """The keywords of a call of the public ``function`` (``cross_entropy`` or
    ``linear_cross_entropy``) with every default filled in, as its ``locals()`` on entry; an
    unknown keyword is the ``TypeError`` the call itself would raise."""
    bound = inspect.signature(function).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def prepare_cross_entropy(options: dict) -> Callable[[], Tensor | tuple]:
    """Check a ``cross_entropy`` call (its keywords as a dict) and return the call itself, not
    yet run: callers that make several calls (multi-token depths) check them all before any of
    them computes or writes anything."""
    input, target, weight = options["input"], options["target"], options["weight"]
    process_group = options["process_group"]
    n_classes = checks.check_logits(input, sliced=process_group is not None)
    checks.check_tensor("target", target)
    if target.is_floating_point() and target.shape == input.shape:
        _check_probability_call(weight, n_classes, input.device, options)
        return functools.partial(_probability_loss, input, target, weight, options)
    checks.check_class_target(input, target)
    checks.check_weight(weight, None if process_group is not None else n_classes, input.device)
    spec = checks.make_spec(options, resolve_impl(options["impl"], input.device, input.dtype))
    checks.check_token_weight(options["token_weight"], target)
    num_items = checks.check_num_items(options["num_items_in_batch"], spec.reduction,
                                       input.device)
    logits = _as_rows(input, n_classes)
    if spec.inplace_backward and torch.is_grad_enabled() and input.requires_grad:
        checks.check_inplace_target(input, logits)
    return functools.partial(_cross_entropy, input, logits, target, weight, num_items, spec,
                             n_classes, process_group, options["token_weight"])


def _cross_entropy(input: Tensor, logits: Tensor, target: Tensor, weight: Tensor | None,
                   num_items, spec: LossSpec, n_classes: int, process_group,
                   token_weight: Tensor | None = None) -> Tensor | tuple:
    """``cross_entropy`` after its checks: the Function (or a plain pass) on the (N, C) rows
    ``logits`` of ``input``."""
    wants_grad = torch.is_grad_enabled() and input.requires_grad
    flat_target = target.reshape(-1).to(torch.int64)
    math_dtype = spec.math_dtype(logits.dtype)
    if weight is not None:
        weight = weight.detach().to(math_dtype).contiguous()
    if token_weight is not None:
        token_weight = token_weight.detach().reshape(-1).to(math_dtype).contiguous()
    if process_group is not None:
        outputs = distributed.vocab_parallel_cross_entropy(
            logits, flat_target, weight, num_items, spec, process_group, wants_grad,
            token_weight)
    elif wants_grad:
        outputs = CrossEntropyFunction.apply(logits, flat_target, weight, num_items, spec,
                                             token_weight)
    else:
        scale = reduction_scale(flat_target, weight, spec, n_classes, num_items, math_dtype,
                                token_weight)
        rows, _, _ = forward_pass(logits, flat_target, weight, scale, spec, compute_grad=False)
        rows = weigh_rows(rows, flat_target, spec, token_weight)
        outputs = reduce_rows(rows, flat_target, spec, scale, spec.out_dtype or logits.dtype)
    return _finish(outputs, spec, target.shape)


def cross_entropy_dtensor(logits, target: Tensor, **kwargs) -> Tensor:
    """Cross-entropy of a DTensor of logits sharded on the vocabulary (``Shard(-1)`` on a 1-D
    device mesh, as tensor-parallel ``ColwiseParallel`` produces for an LM head).

    ``target`` is a plain tensor of global class ids (the same on every rank).  The result is a
    plain tensor, the same on every rank; the gradient flows back into ``logits`` as a DTensor
    with its placement.  Other keywords are those of ``fusedce.cross_entropy``.
    """
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(logits, DTensor):
        raise TypeError(f"logits must be a DTensor, got {type(logits).__name__}")
    mesh = logits.device_mesh
    placements = logits.placements
    if mesh.ndim != 1 or len(placements) != 1 or not (
        isinstance(placements[0], Shard) and placements[0].dim in (-1, logits.dim() - 1)
    ):
        raise ValueError(
            f"logits must be sharded on their last dimension over a 1-D mesh (Shard(-1)); got "
            f"placements {placements} on a {mesh.ndim}-D mesh"
        )
    return cross_entropy(logits.to_local(), target, process_group=mesh.get_group(), **kwargs)


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
    out_dtype: torch.dtype | None = None,
    chunk_size: int | None = None,
    impl: ImplChoice = "auto",
    backward: Literal["auto", "stored", "recompute"] = "auto",
    temperature: float = 1.0,
    token_weight: Tensor | None = None,
    differentiable_stats: bool = False,
    batch_invariant: bool = False,
) -> Tensor | tuple[Tensor, CrossEntropyStats]:
    """Cross-entropy of ``input @ linear_weight.T + linear_bias`` without materialising the logits.

    The same result as ``fusedce.cross_entropy(F.linear(input, linear_weight, linear_bias),
    target, weight, ...)``, with PyTorch's ``F.linear_cross_entropy`` argument names and order,
    computed more accurately for 16-bit inputs: each chunk's logits are made in float32 (a
    16-bit product with float32 output, the bias added in float32), so no logit is rounded to 16
    bits before the loss.  Tokens are processed ``chunk_size`` rows at a time; the gradients of
    ``input``, ``linear_weight`` (accumulated in float32 for 16-bit weights) and ``linear_bias``
    are made during the forward, and the backward only scales them by ``grad_output``.

    Args:
        input: (N, H) or (..., H) hidden states, float32/bfloat16/float16/float64.
        linear_weight: (C, H) output projection, the input's dtype.
        target: (N,) (or the input's leading shape) integer class indices; or class
            probabilities of shape (..., C), floating point, which are computed unfused by
            ``torch.nn.functional.cross_entropy`` (the targets are as large as the logits).
        linear_bias: (C,) or None.
        weight: (C,) class weights, or None.
        reduction, ignore_index, label_smoothing, logit_scale, softcap, lse_square_scale,
        num_items_in_batch, return_stats, impl: as in ``fusedce.cross_entropy``.
        out_dtype: dtype of the returned loss (default: the input's), e.g. ``torch.float32``.
        chunk_size: rows per chunk; None picks logits about the size of ``input`` (at least
            8 Mi elements, at most 1/8 of free GPU memory).
        backward: ``"stored"``: the gradients are made in the forward and scaled by
            ``grad_output`` in the backward; ``"recompute"``: the backward makes them in one more
            chunked pass with ``grad_output`` folded in (the matrix products run twice);
            ``"auto"``: recompute for ``reduction="none"``, stored otherwise.
        temperature, token_weight: as in ``fusedce.cross_entropy``.
        differentiable_stats: as in ``fusedce.cross_entropy``; the backward recomputes each
            chunk's logits from the hidden states and the weight (the products run again).
        batch_invariant: as in ``fusedce.cross_entropy``; tokens then go through fixed-size
            chunks (``chunk_size``, or a size set by the vocabulary alone), the last one padded,
            so the same matrix-product shape always runs.

    Returns:
        The loss (the target's shape for ``none``); with ``return_stats``,
        ``(loss, CrossEntropyStats)``.
    """
    return prepare_linear_cross_entropy(dict(locals()))()


def _linear_probability_loss(input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None,
                             target: Tensor, weight: Tensor | None, options: dict) -> Tensor:
    loss = _probability_loss(F.linear(input, linear_weight, linear_bias), target, weight,
                             dict(options, out_dtype=None))
    return loss.to(options["out_dtype"]) if options["out_dtype"] is not None else loss


def prepare_linear_cross_entropy(options: dict) -> Callable[[], Tensor | tuple]:
    """Check a ``linear_cross_entropy`` call (its keywords as a dict) and return the call,
    not yet run (see ``prepare_cross_entropy``)."""
    input, linear_weight, target = options["input"], options["linear_weight"], options["target"]
    linear_bias, weight = options["linear_bias"], options["weight"]
    reduction, chunk_size = options["reduction"], options["chunk_size"]
    token_weight = options["token_weight"]
    n_classes = linear.check_linear_inputs(input, linear_weight, linear_bias)
    checks.check_tensor("target", target)
    if target.is_floating_point() and tuple(target.shape) == tuple(input.shape[:-1]) + (
            n_classes,):
        _check_probability_call(weight, n_classes, input.device,
                                dict(options, out_dtype=None))
        return functools.partial(_linear_probability_loss, input, linear_weight, linear_bias,
                                 target, weight, options)
    checks.check_class_target(input, target, class_dim=None)
    checks.check_weight(weight, n_classes, input.device)
    if chunk_size is not None and (not checks.is_int(chunk_size) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    spec = checks.make_spec(options, resolve_impl(options["impl"], input.device, input.dtype))
    checks.check_token_weight(token_weight, target)
    num_items = checks.check_num_items(options["num_items_in_batch"], reduction, input.device)
    return functools.partial(_linear_cross_entropy, input, linear_weight, target, linear_bias,
                             weight, num_items, spec, chunk_size, token_weight)


def _linear_cross_entropy(input: Tensor, linear_weight: Tensor, target: Tensor,
                          linear_bias: Tensor | None, weight: Tensor | None, num_items,
                          spec: LossSpec, chunk_size: int | None,
                          token_weight: Tensor | None) -> Tensor | tuple:
    """``linear_cross_entropy`` after its checks."""
    x = input.reshape(-1, input.shape[-1])
    if x.stride(-1) != 1:
        x = x.contiguous()
    if weight is not None:
        weight = weight.detach().to(spec.math_dtype(x.dtype)).contiguous()
    if token_weight is not None:
        token_weight = token_weight.detach().reshape(-1).to(spec.math_dtype(x.dtype)).contiguous()
    outputs = linear.linear_cross_entropy_outputs(
        x, linear_weight, target.reshape(-1).to(torch.int64), linear_bias, weight, num_items,
        spec, chunk_size, token_weight)
    return _finish(outputs, spec, target.shape)


def token_logprobs(
    logits_or_hidden: Tensor,
    target: Tensor,
    *,
    linear_weight: Tensor | None = None,
    linear_bias: Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    batch_invariant: bool = True,
    ignore_index: int = -100,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    impl: ImplChoice = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Per-token log-probabilities of the targets under ``softmax(z / temperature)``, for RL
    post-training (the policy's and the reference's log-probabilities, PPO/GRPO ratios).

    ``log p(target) = z_t - lse``: ``-cross_entropy(reduction="none")`` without smoothing,
    computed in the same single pass, differentiable, and batch-invariant by default (a token's
    value does not depend on what else is in the batch, so a trainer and a rollout engine that
    batch differently agree bitwise for one implementation and device).

    Args:
        logits_or_hidden: (..., C) logits, or with ``linear_weight`` (..., H) hidden states
            whose logits ``hidden @ linear_weight.T + linear_bias`` are never materialised.
        target: (...) integer token ids; ``ignore_index`` positions give 0 and no gradient.
        linear_weight, linear_bias: the LM head (C, H) and its bias, or None for logits.
        temperature: the sampling temperature (> 0).
        return_entropy: also return each token's entropy (differentiable: an entropy bonus).
        batch_invariant, ignore_index, logit_scale, softcap, chunk_size, impl: as in
            ``fusedce.cross_entropy`` / ``fusedce.linear_cross_entropy``.

    Returns:
        (...) float32 log-probabilities; with ``return_entropy``, ``(logprobs, entropy)``.
    """
    checks.check_tensor("logits_or_hidden", logits_or_hidden)
    checks.check_tensor("target", target)
    common = dict(reduction="none", ignore_index=ignore_index, temperature=temperature,
                  logit_scale=logit_scale, softcap=softcap, batch_invariant=batch_invariant,
                  return_stats=return_entropy, differentiable_stats=return_entropy,
                  out_dtype=torch.float32, impl=impl)
    if linear_weight is not None:
        out = linear_cross_entropy(logits_or_hidden, linear_weight, target,
                                   linear_bias=linear_bias, chunk_size=chunk_size, **common)
    else:
        if linear_bias is not None or chunk_size is not None:
            raise ValueError("linear_bias and chunk_size need linear_weight (hidden states)")
        input = logits_or_hidden
        if input.dim() > 2:  # (..., T, C): classes last, as language models give them
            input = input.reshape(-1, input.shape[-1])
            flat = target.reshape(-1)
        else:
            flat = target
        out = cross_entropy(input, flat, **common)
    loss, stats = out if return_entropy else (out, None)
    logprobs = (0.0 - loss).reshape(target.shape)  # +0 (not -0) for ignored tokens
    if return_entropy:
        return logprobs, stats.entropy.reshape(target.shape)
    return logprobs


__all__ = ["CrossEntropyStats", "cross_entropy", "cross_entropy_dtensor",
           "linear_cross_entropy", "resolve_impl", "token_logprobs"]
