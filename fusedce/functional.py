"""``fusedce.cross_entropy`` and ``fusedce.linear_cross_entropy``: the public functions.

They check their arguments once (``fusedce.checks``), freeze the options into a ``LossSpec``,
bring the logits and targets to the layout every implementation takes ((N, C) logits with a unit
column stride, (N,) int64 targets), and hand over to the autograd Functions.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import autograd, checks, distributed, linear, options, torch_impl
from .checks import resolve_impl
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
    """Class probabilities (checked by ``_check_probability_call``), with PyTorch's semantics:
    (N, C) logits in one fused pass (``fusedce.soft``, on the Triton kernels or PyTorch as
    ``impl`` resolves); other layouts, and a target that requires a gradient, by PyTorch's
    own implementation."""
    from . import soft

    impl = checks.resolve_impl(options["impl"], logits.device, logits.dtype)
    if logits.dim() == 2 and not target.requires_grad:
        return soft.soft_cross_entropy(logits, target, weight, options["reduction"],
                                       float(options["label_smoothing"]),
                                       kernels=impl == "triton")
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


def _class_rows(logits: Tensor) -> Tensor:
    """(..., T, C) logits with the classes last as the rows the core reads in place: an
    (N, C) view where the positions form one, else (G, T, C) groups of rows
    (``logits[:, :-1]``, transposed logits; ``fusedce.kernels.Rows``); a copy only when the
    leading dimensions cannot be merged into a view."""
    if logits.dim() < 2:
        return logits.reshape(-1, logits.shape[-1]) if logits.dim() == 1 else logits
    try:
        return logits.view(-1, logits.shape[-1])
    except RuntimeError:
        return logits.reshape(-1, *logits.shape[-2:])


def prepare_classes_last(logits: Tensor, target: Tensor, weight: Tensor | None = None,
                         **kwargs) -> Callable[[], Tensor | tuple]:
    """A checked ``cross_entropy`` call, not yet run, on (..., C) logits with the classes last
    (language models' (batch, tokens, vocab), in any layout, read where they are) and (...)
    targets; its per-row outputs are flat (one per position).  ``kwargs``: the keywords of
    ``cross_entropy``."""
    checks.check_tensor("input", logits)
    checks.check_tensor("target", target)
    if logits.dim() < 1 or tuple(logits.shape[:-1]) != tuple(target.shape):
        raise ValueError(f"logits must have shape target.shape + (C,) = {tuple(target.shape)} "
                         f"+ (C,), got {tuple(logits.shape)}")
    return prepare_cross_entropy(ce_options(logits, target.reshape(-1), weight, **kwargs),
                                 rows=_class_rows(logits))


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


def ce_options(input: Tensor, target: Tensor, weight: Tensor | None = None,
               ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
               **keywords) -> dict:
    """A ``cross_entropy`` call's arguments as one dict, its options checked and completed
    (``fusedce.options.collect``)."""
    return dict(input=input, target=target, weight=weight, ignore_index=ignore_index,
                reduction=reduction, label_smoothing=label_smoothing,
                **options.collect(options.CE, keywords))


@options.public(options.CE)
def cross_entropy(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: Literal["none", "mean", "sum"] = "mean",
    label_smoothing: float = 0.0,
    **keywords,
) -> Tensor | tuple[Tensor, CrossEntropyStats]:
    """Cross-entropy between logits and class-index targets, a drop-in for ``F.cross_entropy``.

    The loss and the gradient of the logits are computed in one pass over the logits (float32
    arithmetic for 16- and 32-bit logits, float64 for float64); the backward only applies
    ``grad_output`` (for ``reduction="none"`` it makes one more pass that writes the gradient
    with the per-token ``grad_output`` folded in).  Each keyword option is documented once, in
    ``fusedce.options``; ``docs/reference.md`` is the full reference.

    Args:
        input: (N, C) or (C,) logits, float32/bfloat16/float16/float64.  (N, C, d1, ...) is
            accepted too and moved to (N * d1 * ..., C) (a copy).  A row stride other than C
            (a column slice of a wider tensor, a row slice, padded rows) is read in place.
        target: (N,) (or (), or (N, d1, ...)) integer class indices in [0, C) or
            ``ignore_index``, of any integer dtype (compared with ``ignore_index`` as int64).
            Floating-point targets of the input's shape are class probabilities and are handed
            to ``torch.nn.functional.cross_entropy`` unchanged.
        weight: (C,) class weights, or None.  It gets no gradient (must not require grad).
        ignore_index: target value that contributes neither loss nor gradient (any int,
            including a class id such as a pad id of 0).
        reduction: ``"none"`` (one loss per target), ``"mean"`` (sum over counted targets
            divided by the sum of their weights) or ``"sum"``.
        label_smoothing: in [0, 1], PyTorch's definition.
        {options}

    Returns:
        The loss in the input's dtype (or ``out_dtype``): a scalar for ``mean`` and ``sum``, the
        target's shape for ``none``; with ``return_stats``, ``(loss, stats)``.

    Differences from PyTorch: with ``reduction="mean"`` a batch whose denominator is 0 (no
    target counts, an empty batch, or class weights of the counted targets adding up to 0)
    gives loss 0 and a zero gradient instead of NaN or inf; rows whose target is ignored get an
    exactly zero gradient even when their logits are not finite; no double backward.
    """
    return prepare_cross_entropy(ce_options(input, target, weight, ignore_index, reduction,
                                            label_smoothing, **keywords))()


def prepare_cross_entropy(options: dict, rows: Tensor | None = None
                          ) -> Callable[[], Tensor | tuple]:
    """Check a ``cross_entropy`` call (its keywords as a dict) and return the call itself, not
    yet run: callers that make several calls (multi-token depths) check them all before any of
    them computes or writes anything.

    ``rows``: instead of ``input``'s class-dimension-1 layout, logits with the classes last
    that are (a view of) ``input``: (N, C), or (G, T, C) groups of rows read where they are
    (``logits[:, :-1]``, transposed logits); ``target`` then holds one id per row, flat."""
    input, target, weight = options["input"], options["target"], options["weight"]
    process_group = options["process_group"]
    if rows is None:
        n_classes = checks.check_logits(input, sliced=process_group is not None)
        checks.check_tensor("target", target)
        if target.is_floating_point() and target.shape == input.shape:
            _check_probability_call(weight, n_classes, input.device, options)
            return functools.partial(_probability_loss, input, target, weight, options)
        checks.check_class_target(input, target)
    else:
        n_classes = checks.check_class_rows(rows, target)
    checks.check_weight(weight, None if process_group is not None else n_classes, input.device)
    spec = checks.make_spec(options, resolve_impl(options["impl"], input.device, input.dtype))
    checks.check_token_weight(options["token_weight"], target)
    num_items = checks.check_num_items(options["num_items_in_batch"], spec.reduction,
                                       input.device)
    if options["validate_targets"] and process_group is None:
        torch_impl.check_targets(target.reshape(-1), n_classes, spec.ignore_index)
    logits = _as_rows(input, n_classes) if rows is None else rows
    if logits.stride(-1) != 1 and n_classes > 1:
        logits = logits.contiguous()  # the kernels read the classes with a unit stride
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
    outputs = autograd.cross_entropy_outputs(logits, flat_target, weight, num_items, spec,
                                             token_weight, wants_grad, process_group)
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


def linear_cross_entropy_dtensor(input, linear_weight, target: Tensor, *, linear_bias=None,
                                 **kwargs) -> Tensor | tuple:
    """Fused linear cross-entropy of a tensor-parallel LM head: ``linear_weight`` (and
    ``linear_bias``) a DTensor sharded on the vocabulary (``Shard(0)`` over a 1-D mesh, as
    ``ColwiseParallel`` makes the output projection; slices may be uneven).

    ``input`` is a plain tensor or a DTensor on the same mesh: replicated (every rank holds
    every token) or sharded on the tokens (``Shard(0)``: sequence parallelism, each rank's
    slice gathered inside and its gradient reduce-scattered back).  ``target`` is a plain tensor
    of global class ids for every token.  The loss is a plain tensor, the same on every rank;
    the gradients flow back into the DTensors with their placements.  Other keywords are those
    of ``fusedce.linear_cross_entropy`` (``process_group`` and ``sequence_parallel`` are set
    from the mesh and the placements).
    """
    from torch.distributed.tensor import DTensor, Replicate, Shard

    if not isinstance(linear_weight, DTensor):
        raise TypeError(f"linear_weight must be a DTensor, got {type(linear_weight).__name__}")
    mesh = linear_weight.device_mesh
    if mesh.ndim != 1 or list(linear_weight.placements) != [Shard(0)]:
        raise ValueError(f"linear_weight must be sharded on its rows (Shard(0)) over a 1-D "
                         f"mesh; got placements {linear_weight.placements} on a "
                         f"{mesh.ndim}-D mesh")
    for name in ("process_group", "sequence_parallel"):
        if name in kwargs:
            raise TypeError(f"linear_cross_entropy_dtensor sets {name} itself")
    bias = linear_bias
    if isinstance(bias, DTensor):
        if bias.device_mesh != mesh or list(bias.placements) != [Shard(0)]:
            raise ValueError("linear_bias must be sharded like linear_weight (Shard(0), same "
                             "mesh)")
        bias = bias.to_local()
    sequence_parallel = False
    if isinstance(input, DTensor):
        if input.device_mesh != mesh:
            raise ValueError("input and linear_weight must live on the same device mesh")
        placement = input.placements[0]
        if placement == Replicate():
            pass
        elif isinstance(placement, Shard) and placement.dim == 0:
            sequence_parallel = True
        else:
            raise ValueError(f"input must be replicated or sharded on its tokens (Shard(0)), "
                             f"got {input.placements}")
        input = input.to_local()
    return linear_cross_entropy(input, linear_weight.to_local(), target, linear_bias=bias,
                                process_group=mesh.get_group(),
                                sequence_parallel=sequence_parallel, **kwargs)


def call_in_module(module: torch.nn.Module, fn: Callable, *args, **kwargs):
    """``fn(module, *args, **kwargs)`` run as ``module``'s forward, through ``module(...)``: the
    hooks of whatever wraps the module run around it.  For an LM head that is its own
    ``fully_shard`` unit, FSDP2 gathers the weight once (in its mixed-precision dtype) before
    the call, frees it after, and reduce-scatters its gradient in the backward like any other
    parameter's; the fused loss then reads ``module.weight`` as a plain tensor.  A module
    without forward hooks (nor global ones) is not called: ``fn`` runs directly."""
    hooked = (module._forward_pre_hooks or module._forward_hooks
              or torch.nn.modules.module._global_forward_pre_hooks
              or torch.nn.modules.module._global_forward_hooks)
    if not hooked:  # nothing wraps the call: the same, without swapping the forward
        return fn(module, *args, **kwargs)
    saved = module.__dict__.get("forward")
    module.forward = lambda *a, **k: fn(module, *a, **k)
    try:
        return module(*args, **kwargs)
    finally:
        if saved is None:
            del module.forward
        else:
            module.forward = saved


def linear_cross_entropy_head(head: torch.nn.Module, input: Tensor, target: Tensor,
                              **kwargs) -> Tensor | tuple:
    """``linear_cross_entropy(input, head.weight, target, linear_bias=head.bias, **kwargs)``
    computed inside ``head``'s call (``call_in_module``), so that a head wrapped by FSDP2's
    ``fully_shard`` (or any wrapper that gathers parameters in forward hooks) gives the
    unwrapped head's answer and gradients.  ``head`` is an ``nn.Linear``-like module (its
    ``weight`` (C, H) and ``bias`` (C,) or None); a weight that is a DTensor sharded on the
    vocabulary inside the call (tensor parallelism, alone or under FSDP2 on a 2-D mesh) goes
    to ``linear_cross_entropy_dtensor``."""
    if "linear_bias" in kwargs:
        raise TypeError("linear_cross_entropy_head takes the bias from head.bias")

    def loss(module, hidden, labels):
        from torch.distributed.tensor import DTensor

        bias = getattr(module, "bias", None)
        if isinstance(module.weight, DTensor):  # tensor parallel (also inside FSDP2 x TP)
            return linear_cross_entropy_dtensor(hidden, module.weight, labels,
                                                linear_bias=bias, **kwargs)
        return linear_cross_entropy(hidden, module.weight, labels, linear_bias=bias, **kwargs)

    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    if isinstance(head.weight, DTensor) and not isinstance(head, FSDPModule):
        # A tensor-parallel head (ColwiseParallel): its own hooks would redistribute the call's
        # inputs and output; its weight is read as the DTensor it is.
        return loss(head, input, target)
    return call_in_module(head, loss, input, target)


def linear_options(input: Tensor, linear_weight: Tensor, target: Tensor, *,
                   linear_bias: Tensor | None = None, weight: Tensor | None = None,
                   reduction: str = "mean", ignore_index: int = -100,
                   label_smoothing: float = 0.0, **keywords) -> dict:
    """A ``linear_cross_entropy`` call's arguments as one dict, its options checked and
    completed (``fusedce.options.collect``)."""
    return dict(input=input, linear_weight=linear_weight, target=target,
                linear_bias=linear_bias, weight=weight, reduction=reduction,
                ignore_index=ignore_index, label_smoothing=label_smoothing,
                **options.collect(options.LINEAR, keywords))


@options.public(options.LINEAR)
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
    **keywords,
) -> Tensor | tuple[Tensor, CrossEntropyStats]:
    """Cross-entropy of ``input @ linear_weight.T + linear_bias`` without materialising the logits.

    The same result as ``fusedce.cross_entropy(F.linear(input, linear_weight, linear_bias),
    target, weight, ...)``, with PyTorch's ``F.linear_cross_entropy`` argument names and order,
    computed more accurately for 16-bit inputs: each chunk's logits are made in float32 (a
    16-bit product with float32 output, the bias added in float32), so no logit is rounded to 16
    bits before the loss.  Tokens are processed in chunks; the gradients of ``input``,
    ``linear_weight`` (accumulated in float32 for 16-bit weights) and ``linear_bias`` are made
    during the forward, and the backward only scales them by ``grad_output`` (a recomputing
    backward makes them in one more chunked pass, the products run again).

    Args:
        input: (N, H) or (..., H) hidden states, float32/bfloat16/float16/float64.
        linear_weight: (C, H) output projection, the input's dtype.
        target: (N,) (or the input's leading shape) integer class indices; or class
            probabilities of shape (..., C), floating point, which are computed unfused by
            ``torch.nn.functional.cross_entropy`` (the targets are as large as the logits).
        linear_bias: (C,) or None.
        weight, reduction, ignore_index, label_smoothing: as in ``fusedce.cross_entropy``.
        {options}

    Returns:
        The loss (the target's shape for ``none``); with ``return_stats``,
        ``(loss, CrossEntropyStats)``.
    """
    return prepare_linear_cross_entropy(linear_options(
        input, linear_weight, target, linear_bias=linear_bias, weight=weight,
        reduction=reduction, ignore_index=ignore_index, label_smoothing=label_smoothing,
        **keywords))()


def _linear_probability_loss(input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None,
                             target: Tensor, weight: Tensor | None, options: dict) -> Tensor:
    """Class probabilities from hidden states: chunks of rows (``fusedce.soft``), never the
    logits, for ``mean`` and ``sum`` with a target that needs no gradient; otherwise the
    logits and PyTorch's own implementation."""
    from . import soft

    if options["reduction"] != "none" and not target.requires_grad:
        x = input.reshape(-1, input.shape[-1])
        t = target.reshape(-1, target.shape[-1])
        rows = options["chunk_size"] or linear.default_chunk_size(
            x.shape[0], linear_weight.shape[0], x.shape[1], x.device)
        loss = soft.soft_linear_cross_entropy(
            x if x.stride(-1) == 1 else x.contiguous(), linear_weight, linear_bias, t,
            weight, options["reduction"], float(options["label_smoothing"]), rows)
    else:  # (hidden states (..., H): the classes of the logits are last, rows flattened)
        n_classes = linear_weight.shape[0]
        logits = F.linear(input, linear_weight, linear_bias).reshape(-1, n_classes)
        loss = _probability_loss(logits, target.reshape(-1, n_classes), weight,
                                 dict(options, out_dtype=None, impl="torch"))
        if options["reduction"] == "none":
            loss = loss.reshape(input.shape[:-1])
    return loss.to(options["out_dtype"]) if options["out_dtype"] is not None else loss


def prepare_linear_cross_entropy(options: dict) -> Callable[[], Tensor | tuple]:
    """Check a ``linear_cross_entropy`` call (its keywords as a dict) and return the call,
    not yet run (see ``prepare_cross_entropy``)."""
    input, linear_weight, target = options["input"], options["linear_weight"], options["target"]
    linear_bias, weight = options["linear_bias"], options["weight"]
    reduction = options["reduction"]
    chunk_size = (options["chunk_size"] or 0, options["chunk_bytes"] or 0)
    token_weight = options["token_weight"]
    n_classes = linear.check_linear_inputs(input, linear_weight, linear_bias)
    checks.check_tensor("target", target)
    if target.is_floating_point() and tuple(target.shape) == tuple(input.shape[:-1]) + (
            n_classes,):
        _check_probability_call(weight, n_classes, input.device,
                                dict(options, out_dtype=None))
        return functools.partial(_linear_probability_loss, input, linear_weight, linear_bias,
                                 target, weight, options)
    group = options["process_group"]
    # Sequence parallelism: the targets of every rank's tokens (their count checked across
    # ranks before the hidden states are gathered).
    checks.check_class_target(input if not options["sequence_parallel"] else
                              input.new_zeros(()).expand(*target.shape, input.shape[-1]),
                              target,
                              class_dim=None)
    checks.check_weight(weight, None if group is not None else n_classes, input.device)
    spec = checks.make_spec(options, resolve_impl(options["impl"], input.device, input.dtype))
    checks.check_token_weight(token_weight, target)
    num_items = checks.check_num_items(options["num_items_in_batch"], reduction, input.device)
    if options["validate_targets"] and group is None:
        torch_impl.check_targets(target.reshape(-1), n_classes, spec.ignore_index)
    if group is not None:
        distributed.check_initialized()
    elif options["sequence_parallel"]:
        raise ValueError("sequence_parallel=True needs process_group (the tensor-parallel group "
                         "over which the tokens are split)")
    return functools.partial(_linear_cross_entropy, input, linear_weight, target, linear_bias,
                             weight, num_items, spec, chunk_size, token_weight, group,
                             options["sequence_parallel"])


def _linear_cross_entropy(input: Tensor, linear_weight: Tensor, target: Tensor,
                          linear_bias: Tensor | None, weight: Tensor | None, num_items,
                          spec: LossSpec, chunk_size: tuple[int, int],
                          token_weight: Tensor | None, group=None,
                          sequence_parallel: bool = False) -> Tensor | tuple:
    """``linear_cross_entropy`` after its checks."""
    x = input.reshape(-1, input.shape[-1])
    if x.stride(-1) != 1:
        x = x.contiguous()
    if sequence_parallel:
        distributed.check_token_slices(x, target, group)
        x = distributed.GatherTokens.apply(x, group)
    if weight is not None:
        weight = weight.detach().to(spec.math_dtype(x.dtype)).contiguous()
    if token_weight is not None:
        token_weight = token_weight.detach().reshape(-1).to(spec.math_dtype(x.dtype)).contiguous()
    outputs = autograd.linear_cross_entropy_outputs(
        x, linear_weight, target.reshape(-1).to(torch.int64), linear_bias, weight, num_items,
        spec, chunk_size, token_weight, group, reduce_input=not sequence_parallel)
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
