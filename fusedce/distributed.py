"""Vocabulary-parallel cross-entropy over ``torch.distributed``, for tensor-parallel LM heads.

Each rank of the group holds the logits of a contiguous slice ``[vocab_start, vocab_start +
C_local)`` of the vocabulary (slices may differ in size) and the full, global ``target``.  Only
per-token numbers cross ranks, never logits:

1. each rank reads its slice once for the per-row partial statistics (max, sum of exp, sum of
   w*z for smoothing, first argmax for accuracy), and picks out the target logit where it owns
   the target;
2. ``all_reduce(MAX)`` of the row maxima: N floats;
3. ``all_reduce(SUM)`` of (sum of exp rescaled to the global max, sum of w*z, target logit, and
   with the statistics the entropy sum ``sum exp(z - m) * (z - m)`` moved to the global max):
   3N floats (4N with statistics);
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

from . import torch_impl
from .passes import LossTensors, row_stats, run_loss, run_pass
from .spec import LossSpec, RowStats, VocabSlice

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
                 device: torch.device, hidden: int = 0) -> VocabLayout:
    """This rank's slice of the vocabulary, learnt with one ``all_gather`` of (slice width,
    number of rows, dtype): the only host read of the vocabulary-parallel path.

    It is cached per (group, slice width), which stay the same for a model's life, so every
    rank makes the same choice between the cache and the exchange (a key that one rank had and
    another had not would leave a collective waiting).  The exchange checks, on every rank with
    the same gathered values and so with the same error, that the ranks hold the same number of
    tokens in the same dtype (and, for the fused linear loss, the same ``hidden`` size); later
    calls are not checked again (a different number of tokens per rank then fails, or hangs, in
    the per-token all-reduces)."""
    key = (id(group), n_local, device.type, hidden)
    if key in _LAYOUTS:
        return _LAYOUTS[key]
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    code = _DTYPES.index(dtype) if dtype in _DTYPES else -1
    mine = torch.tensor([n_local, n_rows, code, hidden], dtype=torch.int64, device=device)
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
    if len({r[3] for r in table}) != 1:
        raise ValueError(f"vocabulary-parallel linear cross-entropy: hidden sizes differ across "
                         f"ranks: {[r[3] for r in table]}")
    if min(sizes) < 1:
        raise ValueError(f"vocabulary-parallel cross-entropy: a rank holds no classes {sizes}")
    layout = VocabLayout(sum(sizes[:rank]), n_local, sum(sizes), sizes)
    _LAYOUTS[key] = layout
    return layout


def _transform(x: Tensor, spec: LossSpec) -> Tensor:
    return torch_impl.transform_logits(x.to(spec.math_dtype(x.dtype)), spec)


def _merged_stats(input: Tensor, target: Tensor, w_local: Tensor | None, spec: LossSpec,
                  layout: VocabLayout, group) -> tuple[RowStats, Tensor]:
    """Steps 1-4: this rank's partials, merged over the group.  Returns the merged statistics
    (their weighted sums relative to the merged max) and each row's transformed target logit."""
    start, n_local = layout.vocab_start, layout.n_local
    stats = row_stats(input, target, w_local, spec)
    pm, pd, psz, pe = stats.partials
    local_max = pm.amax(dim=1)
    local_sum = (pd * torch.exp(pm - local_max.unsqueeze(1))).sum(dim=1)
    local_wz = psz.sum(dim=1)
    if spec.has_smoothing:
        # The partials' weighted sums are relative to this rank's anchor logit (its first
        # column, when finite); move them to the global max once it is known (below).
        ref = torch_impl.row_anchor(input[:, 0].to(spec.math_dtype(input.dtype)), spec)
        w_total = w_local.sum() if w_local is not None else float(n_local)
    local_t = target - start
    owned = (local_t >= 0) & (local_t < n_local) & (target != spec.ignore_index)
    safe = torch.where(owned, local_t, 0).unsqueeze(1)
    z_t = torch.where(owned, _transform(input.gather(1, safe).squeeze(1), spec), 0.0)

    # 2-4. Per-token collectives.
    row_max = local_max.clone()
    dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    if spec.has_smoothing:
        counted = target != spec.ignore_index
        local_wz = torch.where(counted, local_wz + w_total * (ref - row_max), 0.0)
    parts = [local_sum * torch.exp(local_max - row_max), local_wz, z_t.to(local_sum.dtype)]
    if spec.has_entropy:
        parts.append(torch_impl.merge_entropy_sums(pm, pd, pe, row_max))
    packed = torch.stack(parts)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    argmax = torch.empty(0, dtype=torch.int32, device=input.device)
    if spec.return_stats:
        first_local = torch.where(pm == local_max.unsqueeze(1), stats.argmax.long(),
                                  _INT32_MAX).amin(dim=1)
        first = torch.where((local_max == row_max) & (first_local < _INT32_MAX),
                            first_local + start, _INT32_MAX)
        dist.all_reduce(first, op=dist.ReduceOp.MIN, group=group)
        argmax = first.to(torch.int32).unsqueeze(1)
    e = packed[3] if spec.has_entropy else torch.zeros_like(row_max)
    merged = torch.stack([row_max, packed[0], packed[1], e]).unsqueeze(2).contiguous()
    return RowStats(merged, argmax), packed[2].contiguous()


def vocab_parallel_forward(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    num_items_in_batch,
    spec: LossSpec,
    group,
    *,
    compute_grad: bool,
    token_weight: Tensor | None = None,
) -> tuple[tuple[Tensor, ...], Tensor | None]:
    """The module docstring's steps 1-5.  ``input`` is this rank's (N, C_local) slice,
    ``target`` (N,) int64 global ids, ``weight`` the full (C,) weights (math dtype) or None.

    Returns:
        ((loss, lse, z_loss, accuracy, entropy, argmax), grad of this rank's slice or None).
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
    if spec.impl == "torch":
        torch_impl.check_targets(target, n_classes, spec.ignore_index)  # the same on every rank

    merged, target_logit = _merged_stats(input, target, w_local, spec, layout, group)

    # 5. Loss and this slice's gradient: the recipe, with a pass from the merged statistics.
    grad = None
    if compute_grad:
        grad = input.detach() if spec.inplace_backward else torch.empty(
            input.shape, dtype=input.dtype, device=input.device)
    vocab = VocabSlice(start, n_classes, target_logit,
                       weight[target.clamp(0, n_classes - 1)].contiguous()
                       if weight is not None else None)

    def row_pass(grad_scale: Tensor):
        return run_pass(input, target, w_local, grad_scale, spec, grad, row_stats=merged,
                        vocab=vocab,
                        weight_sum=weight.sum().reshape(1) if weight is not None else None), None

    outputs, _, _ = run_loss(LossTensors(target, weight, token_weight, num_items_in_batch), spec,
                             n_classes, input.dtype, row_pass)
    if grad is not None and spec.inplace_backward:
        torch.autograd.graph.increment_version(input)
    return outputs, grad


def _all_gather_single(out: Tensor, x: Tensor, group) -> None:
    """``all_gather_single`` (``all_gather_into_tensor`` before PyTorch 2.13)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, x, group=group)


def _reduce_scatter_single(out: Tensor, x: Tensor, op, group) -> None:
    """``reduce_scatter_single`` (``reduce_scatter_tensor`` before PyTorch 2.13)."""
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    scatter(out, x, op=op, group=group)


class GatherTokens(torch.autograd.Function):
    """Sequence parallelism: this rank's (n, H) slice of the tokens gathered into the group's
    (world * n, H) in rank order; the backward reduce-scatters (sums over ranks the partial
    gradients each rank made from its vocabulary slice, and keeps this rank's rows)."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        out = torch.empty((world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        _all_gather_single(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        world = dist.get_world_size(ctx.group)
        out = torch.empty((grad.shape[0] // world, *grad.shape[1:]), dtype=grad.dtype,
                          device=grad.device)
        _reduce_scatter_single(out, grad.contiguous(), op=dist.ReduceOp.SUM, group=ctx.group)
        return out, None


def check_token_slices(x: Tensor, target: Tensor, group) -> None:
    """Sequence parallelism's shapes, checked with one small ``all_gather`` of every rank's
    token count (the same error on every rank, before the hidden states are gathered): equal
    slices, and ``target`` holding all of them."""
    world = dist.get_world_size(group)
    mine = torch.tensor([x.shape[0], target.numel()], dtype=torch.int64, device=x.device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    counts = [int(g[0]) for g in gathered]
    if len(set(counts)) != 1:
        raise ValueError(f"sequence_parallel: ranks hold different numbers of tokens {counts}; "
                         "each rank needs an equal, contiguous slice")
    if any(int(g[1]) != world * counts[0] for g in gathered):
        raise ValueError(f"sequence_parallel: target must hold every rank's tokens "
                         f"({world} x {counts[0]}), got {[int(g[1]) for g in gathered]}")


def check_initialized() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("process_group given but torch.distributed is not initialized")


def __getattr__(name: str):
    if name == "VocabParallelCrossEntropyFunction":
        import warnings

        from . import autograd

        warnings.warn(f"fusedce.distributed.{name} moved to fusedce.autograd",
                      DeprecationWarning, stacklevel=2)
        return getattr(autograd, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
