"""Vocabulary-parallel cross-entropy over ``torch.distributed``, for tensor-parallel LM heads.

Each rank of the group holds the logits of a contiguous slice ``[vocab_start, vocab_start +
C_local)`` of the vocabulary (slices may differ in size) and the full, global ``target``.  Only
per-token numbers cross ranks, never logits:

1. each rank reads its slice once for the per-row partial statistics (max, sum of exp, sum of
   w*z for smoothing, first argmax for accuracy), and picks out the target logit where it owns
   the target;
2. ``all_reduce(MAX)`` of the row maxima: N floats;
3. ``all_reduce(SUM)`` of (sum of exp rescaled to the global max, sum of w*z, target logit):
   3N floats;
4. only with token accuracy: ``all_reduce(MIN)`` of the candidate argmax columns: N int64;
5. each rank writes the loss and the gradient of its own slice in one more pass, from the merged
   statistics.

So two all-reduces (three with accuracy), 16 bytes of payload per token (24 with accuracy),
where gathering the logits moves ``C * element_size`` bytes per token; no host synchronisation
except once per new layout (see ``vocab_layout``).

``weight`` is the full (C,) class-weight vector on every rank; each rank uses its slice for the
smoothing term and the gradient, and the target's weight wherever the target lives.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import reference
from .autograd import (
    Impl,
    Reduction,
    RowResults,
    _ce_scale_grad_op,
    finish,
    reduction_scale,
)

_INT32_MAX = 2**31 - 1
_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@dataclasses.dataclass(frozen=True)
class VocabLayout:
    """Where this rank's slice sits in the vocabulary."""

    vocab_start: int
    n_local: int
    n_classes: int  # the whole vocabulary
    sizes: tuple[int, ...]  # every rank's slice, in rank order


_LAYOUTS: dict[tuple, VocabLayout] = {}


def vocab_layout(group, n_local: int, n_rows: int, dtype: torch.dtype,
                 device: torch.device) -> VocabLayout:
    """This rank's slice of the vocabulary, learnt with one ``all_gather`` of (slice width,
    number of rows, dtype): the only host read of the vocabulary-parallel path.

    It is cached per (group, slice width), which stay the same for a model's life, so every
    rank makes the same choice between the cache and the exchange (a key that one rank had and
    another had not would leave a collective waiting).  The exchange checks, on every rank with
    the same gathered values and so with the same error, that the ranks hold the same number of
    tokens in the same dtype; later calls are not checked again (a different number of tokens
    per rank then fails, or hangs, in the per-token all-reduces)."""
    key = (id(group), n_local, device.type)
    if key in _LAYOUTS:
        return _LAYOUTS[key]
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    code = _DTYPES.index(dtype) if dtype in _DTYPES else -1
    mine = torch.tensor([n_local, n_rows, code], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    table = torch.stack(gathered).cpu().tolist()
    sizes = tuple(int(r[0]) for r in table)
    if len({r[1] for r in table}) != 1:
        raise ValueError(
            f"vocabulary-parallel cross-entropy: ranks hold different numbers of tokens "
            f"{[r[1] for r in table]}; every rank needs the logits of the same tokens"
        )
    if len({r[2] for r in table}) != 1:
        names = [str(_DTYPES[r[2]]) if r[2] >= 0 else "other" for r in table]
        raise TypeError(f"vocabulary-parallel cross-entropy: logits dtypes differ across "
                        f"ranks: {names}")
    if min(sizes) < 1:
        raise ValueError(f"vocabulary-parallel cross-entropy: a rank holds no classes {sizes}")
    layout = VocabLayout(sum(sizes[:rank]), n_local, sum(sizes), sizes)
    _LAYOUTS[key] = layout
    return layout


def _transform(x: Tensor, logit_scale: float, softcap: float | None) -> Tensor:
    return reference._transformed(x.float(), logit_scale, softcap, None)


def vocab_parallel_forward(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    reduction: Reduction,
    label_smoothing: float,
    impl: Impl,
    group,
    *,
    compute_grad: bool,
    inplace: bool,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    lse_square_scale: float = 0.0,
    num_items_in_batch: Tensor | int | None = None,
    compute_accuracy: bool = False,
    out_dtype: torch.dtype | None = None,
):
    """The module docstring's steps 1-5.  ``input`` is this rank's (N, C_local) slice,
    ``target`` (N,) global ids, ``weight`` the full (C,) float32 weights or None.

    Returns:
        (CrossEntropyOutputs, grad of this rank's slice or None).
    """
    n_rows, n_local = input.shape
    layout = vocab_layout(group, n_local, n_rows, input.dtype, input.device)
    start, n_classes = layout.vocab_start, layout.n_classes
    if weight is not None and weight.shape[0] != n_classes:
        raise ValueError(
            f"weight must hold the whole vocabulary's {n_classes} class weights (the ranks' "
            f"slices {list(layout.sizes)} add up to that), got {weight.shape[0]}"
        )
    w_local = weight[start:start + n_local].contiguous() if weight is not None else None
    if impl == "torch":
        reference.check_targets(target, n_classes, ignore_index)  # the same on every rank
    options = dict(logit_scale=logit_scale, softcap=softcap, compute_accuracy=compute_accuracy)

    # 1. Local partial statistics, merged over this rank's chunks.
    if impl == "triton":
        from .kernels import ce_row_stats

        st = ce_row_stats(input, target, w_local, ignore_index, label_smoothing, **options)
        stats = (st.max, st.sumexp, st.weighted_sum, st.argmax)
    else:
        stats = reference.row_stats_torch(input, target, w_local, ignore_index,
                                          label_smoothing, **options)
    local_max = stats[0].amax(dim=1)
    local_sum = (stats[1] * torch.exp(stats[0] - local_max.unsqueeze(1))).sum(dim=1)
    local_wz = stats[2].sum(dim=1)
    local_t = target.long() - start
    owned = (local_t >= 0) & (local_t < n_local) & (target != ignore_index)
    safe = torch.where(owned, local_t, 0).unsqueeze(1)
    z_t = torch.where(owned, _transform(input.gather(1, safe).squeeze(1), logit_scale, softcap),
                      0.0)

    # 2-4. Per-token collectives.
    row_max = local_max.clone()
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    packed = torch.stack([local_sum * torch.exp(local_max - row_max), local_wz, z_t])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    argmax = None
    if compute_accuracy:
        first_local = torch.where(stats[0] == local_max.unsqueeze(1), stats[3].long(),
                                  _INT32_MAX).amin(dim=1)
        argmax = torch.where((local_max == row_max) & (first_local < _INT32_MAX),
                             first_local + start, _INT32_MAX)
        dist.all_reduce(argmax, op=dist.ReduceOp.MIN, group=group)
        argmax = argmax.unsqueeze(1)
    merged = (row_max.unsqueeze(1), packed[0].unsqueeze(1), packed[1].unsqueeze(1), argmax)

    # 5. Loss and this slice's gradient.
    scale = reduction_scale(target, weight, ignore_index, reduction, n_classes,
                            num_items_in_batch)
    grad = None
    if compute_grad:
        grad = input.detach() if inplace else torch.empty(
            input.shape, dtype=input.dtype, device=input.device)
    vp = dict(vocab_start=start, n_classes=n_classes, target_logit=packed[2].contiguous(),
              target_weight=(weight[target.long().clamp(0, n_classes - 1)].contiguous()
                             if weight is not None else None),
              logit_scale=logit_scale, softcap=softcap, lse_square_scale=lse_square_scale,
              compute_accuracy=compute_accuracy)
    weight_sum = weight.sum().reshape(1) if weight is not None else None
    if impl == "triton":
        from .kernels import RowStats, ce_fwd

        out = ce_fwd(input, target, w_local, weight_sum, scale, ignore_index, label_smoothing,
                     grad, row_stats=RowStats(*merged), **vp)
    else:
        out = reference.ce_fwd_torch(input, target, w_local, weight_sum, scale, ignore_index,
                                     label_smoothing, grad, row_stats=merged, **vp)
    loss, lse, z_rows, correct = out
    rows = RowResults(loss, lse, z_rows if z_rows is not None else loss.new_empty(0),
                      correct if correct is not None else loss.new_empty(0))
    outputs = finish(rows, target, ignore_index, reduction, scale, out_dtype or input.dtype,
                     lse_square_scale != 0.0, compute_accuracy)
    if grad is not None and inplace:
        torch.autograd.graph.increment_version(input)
    return outputs, grad


class VocabParallelCrossEntropyFunction(torch.autograd.Function):
    """Autograd for ``vocab_parallel_forward``: the forward writes this rank's slice of the
    gradient; the backward applies ``grad_output``.  ``apply(input, target, weight,
    ignore_index, reduction, label_smoothing, impl, inplace_backward, group, logit_scale,
    softcap, lse_square_scale, num_items_in_batch, compute_accuracy, out_dtype)`` returns
    ``(loss, lse, z_loss, accuracy)``; only ``loss`` is differentiable."""

    @staticmethod
    def forward(ctx, input, target, weight, ignore_index, reduction, label_smoothing, impl,
                inplace_backward, group, logit_scale, softcap, lse_square_scale,
                num_items_in_batch, compute_accuracy, out_dtype):
        outputs, grad = vocab_parallel_forward(
            input, target, weight, ignore_index, reduction, label_smoothing, impl, group,
            compute_grad=ctx.needs_input_grad[0], inplace=inplace_backward,
            logit_scale=logit_scale, softcap=softcap, lse_square_scale=lse_square_scale,
            num_items_in_batch=num_items_in_batch, compute_accuracy=compute_accuracy,
            out_dtype=out_dtype)
        ctx.mark_non_differentiable(*outputs[1:])
        ctx.grad, ctx.impl = grad, impl  # an attribute: it may alias the input on purpose
        return tuple(outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output, *unused):
        grad = ctx.grad
        if grad is None:
            raise RuntimeError(
                "fusedce's vocabulary-parallel backward ran twice: it scales the stored "
                "gradient in place, so retain_graph=True is not supported"
            )
        ctx.grad = None
        _ce_scale_grad_op(grad, grad_output, ctx.impl)
        return (grad,) + (None,) * 14


def cross_entropy_dtensor(logits, target: Tensor, **kwargs) -> Tensor:
    """Cross-entropy of a DTensor of logits sharded on the vocabulary (``Shard(-1)`` on a 1-D
    device mesh, as tensor-parallel ``ColwiseParallel`` produces for an LM head).

    ``target`` is a plain tensor of global class ids (the same on every rank).  The result is a
    plain tensor, the same on every rank; the gradient flows back into ``logits`` as a DTensor
    with its placement.  Other keywords are those of ``fusedce.cross_entropy``.
    """
    from torch.distributed.tensor import DTensor, Shard

    from .functional import cross_entropy

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
