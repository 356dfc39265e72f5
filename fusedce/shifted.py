"""Next-token (and multi-token) losses that take the labels as they come: ``input_ids`` (or
labels aligned with them), a shift, and where sequences and documents end.

``shifted_cross_entropy(logits, labels, shift)`` scores position ``t`` of a sequence against
``labels[..., t + shift]``; a position is not counted when ``t + shift`` leaves the sequence,
crosses a document boundary (``cu_seqlens`` or restarting ``position_ids`` of packed rows),
falls on a masked position (``attention_mask`` 0) or on ``ignore_index``.  The logits are read
where they are, in one pass: a (..., T, V) tensor whose rows form a view as (N, V) rows, any
other layout (``logits[:, :-1]``, transposed logits) as (B, T, V) groups of rows, which the
core reads by their group and row strides (``fusedce.kernels.Rows``), in place too.  The only
per-token array made is the targets themselves: one int64 per position, built on the device in
one expression (8 bytes per token beside the logits' ``2 * V``), so the shift and the masks
cannot drift apart and no label has to be prepared with -100 by hand.

Multi-token prediction (DeepSeek-V3 style) is one call: a tuple of logits (one per depth) with a
tuple of shifts, weighted by ``depth_weights``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import checks
from .functional import (
    CrossEntropyStats,
    linear_options,
    prepare_classes_last,
    prepare_linear_cross_entropy,
)


class MultiTokenStats(NamedTuple):
    """Per-depth statistics of a multi-token-prediction loss (``return_stats=True``).

    ``loss``: (D,) each depth's loss, reduced as asked (before ``depth_weights``; for
    ``reduction="none"``, each depth's sum).  ``accuracy``: (D,) each depth's token accuracy
    (the acceptance proxy of speculative decoding).  ``count``: (D,) int64 counted positions.
    ``depths``: each depth's ``CrossEntropyStats``.
    """

    loss: Tensor
    accuracy: Tensor
    count: Tensor
    depths: tuple[CrossEntropyStats, ...]


def _check_shift(shift) -> int:
    if not checks.is_int(shift) or shift < 0:
        raise ValueError(f"shift must be an int >= 0, got {shift!r}")
    return int(shift)


def _check_alignment(labels: Tensor, attention_mask, cu_seqlens, position_ids) -> None:
    checks.check_tensor("labels", labels)
    if labels.dim() == 0 or labels.is_floating_point() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer token ids of shape (..., T), got dtype "
                        f"{labels.dtype} and shape {tuple(labels.shape)}")
    for name, t in (("attention_mask", attention_mask), ("position_ids", position_ids)):
        if t is None:
            continue
        checks.check_tensor(name, t)
        if tuple(t.shape) != tuple(labels.shape):
            raise ValueError(f"{name} must have the labels' shape {tuple(labels.shape)}, got "
                             f"{tuple(t.shape)}")
        if t.device != labels.device:
            raise ValueError(f"{name} is on {t.device} but labels are on {labels.device}")
    if cu_seqlens is not None:
        checks.check_tensor("cu_seqlens", cu_seqlens)
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.is_floating_point():
            raise ValueError("cu_seqlens must be a 1-D integer tensor of cumulative document "
                             f"lengths (0, l1, l1 + l2, ...), got {tuple(cu_seqlens.shape)} "
                             f"{cu_seqlens.dtype}")
        if cu_seqlens.device.type == "cpu":  # free to check; a device tensor is not read
            first, last = int(cu_seqlens[0]), int(cu_seqlens[-1])
            if first != 0 or last != labels.numel() or bool((cu_seqlens.diff() < 0).any()):
                raise ValueError(
                    f"cu_seqlens must rise from 0 to the number of tokens ({labels.numel()}), "
                    f"got {cu_seqlens.tolist()[:8]}{'...' if cu_seqlens.numel() > 8 else ''}")


def shifted_targets(
    labels: Tensor,
    shift: int = 1,
    *,
    attention_mask: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    position_ids: Tensor | None = None,
    ignore_index: int = -100,
) -> Tensor:
    """The target of every position, int64, the labels' shape: ``labels[..., t + shift]``, or
    ``ignore_index`` where that position is not counted (see the module docstring).  Built on
    the labels' device without a host synchronisation."""
    shift = _check_shift(shift)
    _check_alignment(labels, attention_mask, cu_seqlens, position_ids)
    n_pos = labels.shape[-1]
    lab = labels.to(torch.int64)
    if shift:
        lab = F.pad(lab, (0, shift), value=ignore_index)[..., shift:]
    counted = lab != ignore_index
    if shift:
        # positions whose target lies past the end of the sequence (the pad above) count for
        # nothing even when ignore_index is a real id
        counted &= torch.arange(n_pos, device=labels.device) < n_pos - shift
    if attention_mask is not None:
        mask = attention_mask if not shift else F.pad(attention_mask, (0, shift))[..., shift:]
        counted &= mask != 0
    if position_ids is not None and shift:
        # Positions restart at 0 with each document: the target is in the same document iff its
        # position is exactly `shift` further.
        pos = position_ids.to(torch.int64)
        ahead = F.pad(pos, (0, shift), value=-1)[..., shift:]
        counted &= ahead - pos == shift
    if cu_seqlens is not None and shift:
        flat = torch.arange(labels.numel(), device=labels.device)
        cu = cu_seqlens.to(device=labels.device, dtype=torch.int64)
        doc = torch.searchsorted(cu, flat, right=True).clamp_max(cu.numel() - 1)
        counted &= (flat + shift < cu[doc]).reshape(labels.shape)
    return torch.where(counted, lab, ignore_index)


def count_targets(
    labels: Tensor,
    shift: int = 1,
    attention_mask: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    position_ids: Tensor | None = None,
    ignore_index: int = -100,
) -> Tensor:
    """The number of positions ``shifted_cross_entropy`` counts, as a 0-d int64 tensor on the
    labels' device (no host synchronisation): the ``num_items_in_batch`` of gradient
    accumulation and data-parallel averaging (sum it over micro-batches and ranks)."""
    target = shifted_targets(labels, shift, attention_mask=attention_mask,
                             cu_seqlens=cu_seqlens, position_ids=position_ids,
                             ignore_index=ignore_index)
    return (target != ignore_index).sum()


def _depths(logits, shift) -> tuple[tuple[Tensor, ...], tuple[int, ...], bool]:
    """(tensors, shifts, multi): one depth per tensor of a tuple (multi-token prediction)."""
    if isinstance(logits, (tuple, list)):
        tensors = tuple(logits)
        if not tensors:
            raise ValueError("logits is an empty tuple: give one tensor per depth")
        shifts = tuple(range(1, len(tensors) + 1)) if shift == 1 or shift is None else shift
        if isinstance(shifts, int) or len(shifts) != len(tensors):
            raise ValueError(f"shift must be a tuple of {len(tensors)} shifts (one per depth), "
                             f"got {shift!r}")
        return tensors, tuple(_check_shift(s) for s in shifts), True
    if isinstance(shift, (tuple, list)):
        raise ValueError("a tuple of shifts needs a tuple of logits (one per depth)")
    return (logits,), (_check_shift(shift),), False


def _depth_weights(depth_weights, n: int) -> tuple[float, ...]:
    if depth_weights is None:
        # The next token weighs 1; the further depths share a weight of 1 (DeepSeek-V3's
        # main loss plus the mean of its MTP losses, lambda = 1).
        return (1.0,) + (1.0 / (n - 1),) * (n - 1) if n > 1 else (1.0,)
    weights = tuple(float(w) for w in depth_weights)
    if len(weights) != n:
        raise ValueError(f"depth_weights must hold {n} weights, got {len(weights)}")
    return weights


def _prepare_depth(logits: Tensor, target: Tensor, weight, kwargs: dict, linear_weight):
    """Check one depth's call and return it, not yet run (a callable)."""
    if kwargs.get("token_weight") is not None:
        checks.check_tensor("token_weight", kwargs["token_weight"])
        if tuple(kwargs["token_weight"].shape) != tuple(target.shape):
            raise ValueError(f"token_weight must have the labels' shape {tuple(target.shape)},"
                             f" got {tuple(kwargs['token_weight'].shape)}")
        kwargs["token_weight"] = kwargs["token_weight"].reshape(-1)

    def back_to_labels(v: Tensor) -> Tensor:
        return v.reshape(target.shape)

    if linear_weight is not None:
        hidden = logits.reshape(-1, logits.shape[-1])
        call = prepare_linear_cross_entropy(linear_options(
            hidden, linear_weight, target.reshape(-1), weight=weight, **kwargs))
        return lambda: _per_row(call(), kwargs, back_to_labels)
    if logits.dim() < 2 or tuple(logits.shape[:-1]) != tuple(target.shape):
        raise ValueError(f"logits must have shape labels.shape + (V,) = "
                         f"{tuple(target.shape)} + (V,), got {tuple(logits.shape)}")
    call = prepare_classes_last(logits, target, weight, **kwargs)
    return lambda: _per_row(call(), kwargs, back_to_labels)


def _per_row(out, kwargs: dict, rows):
    """Apply ``rows`` (back to the labels' shape) to every per-row output of a call: the loss
    of ``reduction="none"`` and the per-row statistics."""
    per_row = kwargs.get("reduction", "mean") == "none"
    if not kwargs.get("return_stats"):
        return rows(out) if per_row else out
    loss, stats = out
    return (rows(loss) if per_row else loss), CrossEntropyStats(
        rows(stats.lse), rows(stats.z_loss) if per_row else stats.z_loss, stats.accuracy,
        rows(stats.entropy), rows(stats.argmax))


def _shifted(logits, labels, shift, attention_mask, cu_seqlens, position_ids, depth_weights,
             kwargs: dict, linear_weight=None):
    checks.check_tensor("labels", labels)
    tensors, shifts, multi = _depths(logits, shift)
    name = "logits" if linear_weight is None else "hidden"
    for x in tensors:
        checks.check_tensor(name, x)
    weights = _depth_weights(depth_weights, len(tensors))
    ignore_index = kwargs.get("ignore_index", -100)
    weight = kwargs.pop("weight", None)
    num_items = kwargs.pop("num_items_in_batch", None)
    if multi and isinstance(num_items, (tuple, list)):
        if len(num_items) != len(tensors):
            raise ValueError(f"num_items_in_batch must hold {len(tensors)} counts (one per "
                             f"depth), got {len(num_items)}")
        items = tuple(num_items)
    else:
        items = (num_items,) * len(tensors)
    if kwargs.get("inplace_backward") is True:
        # The whole call's storage: no depth overlaps itself or another depth.
        checks.check_inplace_storage(tensors)
    # Every depth is checked before any depth computes (or, in place, writes) anything.
    calls, targets = [], []
    for x, s, n_items in zip(tensors, shifts, items):
        target = shifted_targets(labels.to(x.device), s, attention_mask=attention_mask,
                                 cu_seqlens=cu_seqlens, position_ids=position_ids,
                                 ignore_index=ignore_index)
        targets.append(target)
        calls.append(_prepare_depth(x, target, weight, dict(kwargs, num_items_in_batch=n_items),
                                    linear_weight))
    results = [call() for call in calls]
    if not multi:
        return results[0]
    stats_wanted = kwargs.get("return_stats", False)
    losses = [r[0] if stats_wanted else r for r in results]
    total = sum(w * loss for w, loss in zip(weights, losses))
    if not stats_wanted:
        return total
    depth_stats = tuple(r[1] for r in results)
    return total, MultiTokenStats(
        torch.stack([loss.detach().sum() for loss in losses]),
        torch.stack([s.accuracy for s in depth_stats]),
        torch.stack([(t != ignore_index).sum() for t in targets]),
        depth_stats)


def shifted_cross_entropy(
    logits: Tensor | Sequence[Tensor],
    labels: Tensor,
    shift: int | Sequence[int] = 1,
    *,
    attention_mask: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    position_ids: Tensor | None = None,
    depth_weights: Sequence[float] | None = None,
    **kwargs,
):
    """Cross-entropy of position ``t`` against ``labels[..., t + shift]``: next-token loss
    from ``input_ids`` with no label preparation.

    Args:
        logits: (..., T, V) logits, read where they are (``logits[:, :-1]`` and transposed
            logits included, never copied); or a tuple with one such tensor per depth of
            multi-token prediction.
        labels: (..., T) integer ids: ``input_ids`` themselves, or labels with ``ignore_index``
            where no loss is wanted (a prompt).
        shift: how far ahead the target is (1: next token; 0: labels already aligned, e.g.
            transformers' ``shift_labels``); a tuple (default ``(1, ..., D)``) for a tuple of
            logits.
        attention_mask: (..., T); a position whose target position is 0 here is not counted.
        cu_seqlens: packed documents, flash-attn's varlen convention: (D + 1,) int32 cumulative
            lengths over the flattened tokens; a target in another document is not counted.
        position_ids: (..., T) positions that restart at 0 at each document (packed rows, as
            ``DataCollatorWithFlattening`` makes them); likewise.
        depth_weights: multi-token prediction: each depth's weight (default 1 for the first
            depth and ``1 / (D - 1)`` for each further one).
        **kwargs: every keyword of ``fusedce.cross_entropy`` (``weight``, ``ignore_index``,
            ``reduction``, ``label_smoothing``, extras, ``return_stats``,
            ``num_items_in_batch`` (a tuple of one count per depth is accepted),
            ``inplace_backward``, ...), with the same meaning.  Uncounted positions get loss 0
            and an exactly zero gradient.  Every depth's call is checked before any depth is
            computed; with ``inplace_backward=True`` no element of the logits may overlap
            another and depths must not share memory, else an error is raised before anything
            is written.

    Returns:
        As ``fusedce.cross_entropy`` (``reduction="none"``: the labels' shape).  With a tuple
        of logits: the weighted sum of the depths' losses, and with ``return_stats`` a
        ``MultiTokenStats``.
    """
    return _shifted(logits, labels, shift, attention_mask, cu_seqlens, position_ids,
                    depth_weights, dict(kwargs))


def shifted_linear_cross_entropy(
    hidden: Tensor | Sequence[Tensor],
    linear_weight: Tensor,
    labels: Tensor,
    shift: int | Sequence[int] = 1,
    *,
    attention_mask: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    position_ids: Tensor | None = None,
    depth_weights: Sequence[float] | None = None,
    **kwargs,
):
    """``shifted_cross_entropy`` of ``hidden @ linear_weight.T`` (plus ``linear_bias``) from
    (..., T, H) hidden states (or a tuple, one per depth), never holding the logits; keywords
    as ``fusedce.linear_cross_entropy``'s (``process_group`` for a vocabulary-parallel head;
    ``sequence_parallel`` is not taken: the shift needs each sequence whole)."""
    if kwargs.get("sequence_parallel"):
        raise ValueError("shifted_linear_cross_entropy does not take sequence_parallel: shift "
                         "the labels (fusedce.shifted_targets) and call linear_cross_entropy")
    checks.check_tensor("labels", labels)
    if isinstance(hidden, (tuple, list)):
        for h in hidden:
            checks.check_tensor("hidden", h)
            if tuple(h.shape[:-1]) != tuple(labels.shape):
                raise ValueError(f"hidden states must have shape labels.shape + (H,), got "
                                 f"{tuple(h.shape)} for labels {tuple(labels.shape)}")
    elif checks.check_tensor("hidden", hidden) or tuple(hidden.shape[:-1]) != tuple(
            labels.shape):
        raise ValueError(f"hidden must have shape labels.shape + (H,) = {tuple(labels.shape)} "
                         f"+ (H,), got {tuple(hidden.shape)}")
    return _shifted(hidden, labels, shift, attention_mask, cu_seqlens, position_ids,
                    depth_weights, dict(kwargs), linear_weight=linear_weight)


__all__ = ["MultiTokenStats", "count_targets", "shifted_cross_entropy",
           "shifted_linear_cross_entropy", "shifted_targets"]
