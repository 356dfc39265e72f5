"""Distillation losses from student logits: forward KL, reverse KL and TRL's generalized
Jensen-Shannon divergence against a teacher given as logits or as its top-k log-probabilities,
with the gradient of the student logits made in the same pass.

Per counted row, with the student ``q = softmax(input / T)`` and the teacher ``p``
(``softmax(teacher_logits / T)``, or the top-k teacher below):

* ``forward_kl``: ``KL(p || q) = sum p (log p - log q)``; its gradient with respect to
  ``v = input / T`` is ``q - p``;
* ``reverse_kl``: ``KL(q || p)``; gradient ``q * ((log q - log p) - KL(q || p))``;
* ``jsd``: ``beta * KL(p || m) + (1 - beta) * KL(q || m)`` with ``m = beta * p + (1 - beta) *
  q`` (Agarwal et al., "On-Policy Distillation of Language Models", 2024, eq. 1, as
  ``trl.GKDTrainer.generalized_jsd_loss`` computes it, ``beta = 0`` and ``beta = 1`` being
  forward and reverse KL); gradient ``(1 - beta) * q * ((log q - log m) - KL(q || m))`` (the
  teacher's term has none: ``sum_k dm_k = 0``).

The gradient with respect to ``input`` is that divided by ``T`` (no ``T^2`` factor: TRL's
convention).  With a top-k teacher (``teacher_topk_ids`` (N, k), ``teacher_topk_logprobs``
(N, k): the teacher's full-vocabulary log-probabilities of those ids, as vLLM returns them; id
-1 marks an unused slot) the distributions are over buckets: with ``tail="bucket"`` the k ids
and one tail bucket holding the rest of each distribution's mass (a true divergence between
two (k+1)-bucket distributions; the student's tail mass is computed from its other columns,
not as ``1 - sum``); with ``tail="renormalize"`` both renormalised over the k ids.  For a
bucket ``b`` holding column ``c`` the gradient is ``q_c * G_b``, ``G_b`` being the formula
above with bucket masses (``1 - p_b / q_b`` for forward KL).  The top-k log-probabilities are
taken as the teacher's distribution as it was sampled: ``temperature`` divides the student's
logits only.

``hard_loss_weight = a`` adds ``a`` times the cross-entropy of ``input`` (at temperature 1)
against ``target``.  Rows whose ``target`` is ``ignore_index`` are not counted (no loss, no
gradient); ``mean`` divides by the counted rows (or ``num_items_in_batch``); ``token_weight``
multiplies each row.

The pass runs over chunks of rows in float32 (``CHUNK_ELEMENTS`` logits at a time), so the
extra memory is a few float32 chunks besides the gradient (or none with
``inplace_backward``); the logits of the student and the teacher are read once.  This is the
PyTorch implementation; ``fusedce.kernels.kd_fwd`` is the Triton kernel for a teacher given
as logits (one program per row, three passes for the JSD, two for the KLs), which ``"auto"``
takes on CUDA.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from . import checks

CHUNK_ELEMENTS = 1 << 22
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
TAILS = ("bucket", "renormalize")


class DistillationStats(NamedTuple):
    """``return_stats=True``: per-row divergence (0 for rows not counted), the student's
    entropy (of ``softmax(input / T)``), and the share of counted rows whose student argmax is
    the teacher's (its argmax column, or its most probable top-k id)."""

    divergence: Tensor
    entropy: Tensor
    agreement: Tensor


class _Teacher(NamedTuple):
    logits: Tensor | None  # (N, C)
    ids: Tensor | None  # (N, k) int64, -1 unused
    logprobs: Tensor | None  # (N, k) float32


class _Options(NamedTuple):
    divergence: str
    beta: float
    temperature: float
    tail: str
    hard_loss_weight: float
    ignore_index: int
    deferred: bool = False  # (fused linear) gradients made in the backward
    stats: bool = True  # compute the entropy and the argmax agreement


def _log_mixture(log_q: Tensor, log_p: Tensor, beta: float) -> Tensor:
    """log(beta * p + (1 - beta) * q), stably."""
    return torch.logaddexp(log_q + math.log1p(-beta), log_p + math.log(beta))


class _Local:
    """Row reductions over the classes this process holds: all of them."""

    start = 0

    def max(self, t: Tensor) -> Tensor:
        return t

    def sum(self, t: Tensor) -> Tensor:
        return t

    def min(self, t: Tensor) -> Tensor:
        return t


class _Group(_Local):
    """Vocabulary parallelism: row reductions completed over the group (``all_reduce`` of one
    value per row), this rank's classes starting at ``start``."""

    def __init__(self, group, start: int):
        self.group, self.start = group, start

    def _all(self, t: Tensor, op) -> Tensor:
        import torch.distributed as dist

        t = t.contiguous().clone()
        dist.all_reduce(t, op=op, group=self.group)
        return t

    def max(self, t: Tensor) -> Tensor:
        import torch.distributed as dist

        return self._all(t, dist.ReduceOp.MAX)

    def sum(self, t: Tensor) -> Tensor:
        import torch.distributed as dist

        return self._all(t, dist.ReduceOp.SUM)

    def min(self, t: Tensor) -> Tensor:
        import torch.distributed as dist

        return self._all(t, dist.ReduceOp.MIN)


_LOCAL = _Local()
_BIG = 2**62


def _lse(v: Tensor, red: _Local) -> Tensor:
    """Each row's log-sum-exp over all classes (this process's, merged over the group)."""
    m = red.max(v.amax(dim=1))
    safe = torch.where(torch.isfinite(m), m, 0.0)
    return safe + red.sum(torch.exp(v - safe[:, None]).sum(dim=1)).log()


def _argmax(z: Tensor, red: _Local) -> Tensor:
    """Each row's first argmax column over all classes (global ids)."""
    local = z.amax(dim=1)
    best = red.max(local)
    idx = torch.where(local == best, z.argmax(dim=1) + red.start, _BIG)
    return red.min(idx)


def _bucket_terms(log_q: Tensor, log_p: Tensor, opts: _Options,
                  red: _Local = _LOCAL) -> tuple[Tensor, Tensor]:
    """(divergence per row, G per bucket) for bucket log-masses ``log_q``, ``log_p`` (R, B)
    (``-inf`` for an empty bucket; the buckets spread over the group when ``red`` is one);
    the student's gradient at a column of bucket ``b`` is ``q_c * G_b``."""
    q, p = log_q.exp(), log_p.exp()
    divergence, beta = opts.divergence, opts.beta
    if divergence == "jsd" and beta == 0.0:
        divergence = "forward_kl"
    elif divergence == "jsd" and beta == 1.0:
        divergence = "reverse_kl"
    if divergence == "forward_kl":
        terms = torch.where(p > 0, p * (log_p - log_q), 0.0)
        g = torch.where(q > 0, 1.0 - p / q, 0.0)
        return red.sum(terms.sum(dim=1)), g
    if divergence == "reverse_kl":
        r = torch.where(q > 0, log_q - log_p, 0.0)
        kl = red.sum((q * r).sum(dim=1))
        return kl, r - kl.unsqueeze(1)
    log_m = _log_mixture(log_q, log_p, beta)
    kl_p = torch.where(p > 0, p * (log_p - log_m), 0.0).sum(dim=1)
    s = torch.where(q > 0, log_q - log_m, 0.0)
    kl_p, kl_q = red.sum(torch.stack([kl_p, (q * s).sum(dim=1)])).unbind(0)
    return beta * kl_p + (1 - beta) * kl_q, (1 - beta) * (s - kl_q.unsqueeze(1))


def _chunk(x: Tensor, teacher: _Teacher, target: Tensor | None, opts: _Options,
           want_grad: bool, red: _Local = _LOCAL) -> tuple[Tensor, Tensor | None, Tensor,
                                                             Tensor, Tensor]:
    """One chunk of rows: (divergence + hard loss per row, gradient of the logits or None,
    divergence per row, student entropy per row, agreement per row), in float32 (float64 for
    float64 logits).  With a group (``red``), ``x`` and ``teacher.logits`` hold this rank's
    classes and every row sum is completed over the group."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    z = x.to(acc)
    t = opts.temperature
    v = z / t if t != 1.0 else z
    lse_s = _lse(v, red)
    log_q = v - lse_s[:, None]
    q = log_q.exp()
    zero = torch.zeros(z.shape[0], dtype=acc, device=z.device)
    entropy = red.sum(-(q * torch.where(q > 0, log_q, 0.0)).sum(dim=1)) if opts.stats else zero
    student_top = _argmax(z, red) if opts.stats else None
    n_local = z.shape[1]
    if teacher.logits is not None:
        u = teacher.logits.to(acc)
        u = u / t if t != 1.0 else u
        log_p = u - _lse(u, red)[:, None]
        div, g_bucket = _bucket_terms(log_q, log_p, opts, red)
        grad = q * g_bucket if want_grad else None
        teacher_top = _argmax(u, red) if opts.stats else None
    else:
        valid = teacher.ids >= 0
        local = teacher.ids - red.start
        owned = valid & (local >= 0) & (local < n_local)
        safe = torch.where(owned, local, 0)
        rows = torch.arange(z.shape[0], device=z.device).unsqueeze(1).expand_as(safe)
        # The student's log-probabilities of the ids (from the rank holding each).
        lq_ids = red.sum(torch.where(owned, log_q.gather(1, safe), 0.0))
        lq_ids = torch.where(valid, lq_ids, -math.inf)
        lp_ids = torch.where(valid, teacher.logprobs.to(acc), -math.inf)
        if opts.tail == "bucket":
            # The tail masses: the student's from its other columns (exact), the teacher's
            # from what its k log-probabilities leave (clamped at 0).
            others = v.clone()
            others[rows[owned], safe[owned]] = -math.inf
            lq_tail = _lse(others, red) - lse_s
            p_tail = (1.0 - lp_ids.exp().sum(dim=1)).clamp(min=0.0)
            lp_tail = torch.where(p_tail > 0, p_tail.log(), -math.inf)
            div, g_bucket = _bucket_terms(torch.cat([lq_ids, lq_tail[:, None]], dim=1),
                                          torch.cat([lp_ids, lp_tail[:, None]], dim=1), opts)
            grad = None
            if want_grad:  # the tail's G everywhere, then each owned id's own
                grad = q * g_bucket[:, -1:]
                grad[rows[owned], safe[owned]] = (q.gather(1, safe) * g_bucket[:, :-1])[owned]
        else:
            lq = lq_ids - torch.logsumexp(lq_ids, dim=1, keepdim=True)
            lp = lp_ids - torch.logsumexp(lp_ids, dim=1, keepdim=True)
            div, g_bucket = _bucket_terms(lq, lp, opts)
            grad = None
            if want_grad:  # zero outside the ids (an unused slot writes nothing)
                grad = torch.zeros_like(z)
                grad[rows[owned], safe[owned]] = (lq.exp() * g_bucket)[owned]
        teacher_top = None
        if opts.stats:
            best = torch.where(valid, teacher.logprobs.to(acc), -math.inf).argmax(dim=1)
            teacher_top = teacher.ids.gather(1, best[:, None]).squeeze(1)
    if grad is not None and t != 1.0:
        grad = grad / t
    loss = div
    if opts.hard_loss_weight and target is not None:
        log_s = z - _lse(z, red)[:, None] if t != 1.0 else log_q
        local_t = target - red.start
        here = (target != opts.ignore_index) & (local_t >= 0) & (local_t < n_local)
        safe_t = torch.where(here, local_t, 0)
        ce = -red.sum(torch.where(here, log_s.gather(1, safe_t[:, None]).squeeze(1), 0.0))
        loss = loss + opts.hard_loss_weight * ce
        if grad is not None:
            g_ce = log_s.exp()
            g_ce.scatter_add_(1, safe_t[:, None], -here.to(acc)[:, None])
            grad = grad + opts.hard_loss_weight * g_ce
    agree = (student_top == teacher_top).to(acc) if opts.stats else zero
    return loss, grad, div, entropy, agree


class DistillationFunction(torch.autograd.Function):
    """The distillation pass: ``apply(input, teacher_logits, ids, logprobs, target, factors,
    opts, inplace)`` returns (per-row loss times ``factors``, divergence, entropy,
    agreement); the gradient of ``input`` is made in the forward (per-row, times ``factors``)
    and scaled by ``grad_output`` in the backward."""

    @staticmethod
    def forward(ctx, input, teacher_logits, ids, logprobs, target, factors, opts, inplace,
                red=_LOCAL, n_classes=None, kernels=False):
        want_grad = ctx.needs_input_grad[0]
        n = input.shape[0]
        grad = None
        if want_grad:
            grad = input.detach() if inplace else torch.empty_like(input)
        ctx.kernels = kernels
        if kernels:  # the Triton kernel: one launch, every row
            from .kernels import kd_fwd

            divergence = opts.divergence
            if divergence == "jsd" and opts.beta in (0.0, 1.0):
                divergence = "forward_kl" if opts.beta == 0.0 else "reverse_kl"
            if teacher_logits is not None:
                loss, div, ent, agree = kd_fwd(
                    input, teacher_logits, target, factors, divergence, opts.beta,
                    opts.temperature, opts.hard_loss_weight, opts.ignore_index, opts.stats,
                    grad)
            else:
                from .kernels import kd_topk

                loss, div, ent, agree = kd_topk(
                    input, ids, logprobs, target, factors, divergence, opts.beta,
                    opts.temperature, opts.tail, opts.hard_loss_weight, opts.ignore_index,
                    opts.stats, grad)
            zeros = torch.zeros_like(loss)
            outs = [loss, div, ent if opts.stats else zeros, agree if opts.stats else zeros]
            if grad is not None and inplace:
                torch.autograd.graph.increment_version(input)
            ctx.grad = grad
            ctx.mark_non_differentiable(*outs[1:])
            ctx.set_materialize_grads(False)
            return tuple(outs)
        # (Under a group every rank must cut the same chunks: sized by the whole vocabulary.)
        rows = max(1, CHUNK_ELEMENTS // max(n_classes or input.shape[1], 1))
        acc = torch.float64 if input.dtype == torch.float64 else torch.float32
        outs = [torch.empty(n, dtype=acc, device=input.device) for _ in range(4)]
        teacher = _Teacher(teacher_logits, ids, logprobs)
        for r0 in range(0, n, rows):
            r1 = min(r0 + rows, n)
            part = _Teacher(*(t[r0:r1] if t is not None else None for t in teacher))
            loss, g, div, ent, agree = _chunk(input[r0:r1], part,
                                              target[r0:r1] if target is not None else None,
                                              opts, want_grad, red)
            f = factors[r0:r1]
            outs[0][r0:r1] = loss * f
            outs[1][r0:r1] = torch.where(f != 0, div, 0.0)
            outs[2][r0:r1] = ent
            outs[3][r0:r1] = agree
            if g is not None:
                grad[r0:r1] = g * f[:, None]
        if grad is not None and inplace:
            torch.autograd.graph.increment_version(input)
        ctx.grad = grad
        ctx.mark_non_differentiable(*outs[1:])
        ctx.set_materialize_grads(False)
        return tuple(outs)

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        from .autograd import refuse_double_backward

        refuse_double_backward("fusedce.distillation_loss")
        grad, ctx.grad = ctx.grad, None
        if grad is None or grad_loss is None:
            return (None,) * 11
        # grad *= grad_output per row, rows whose factor is exactly 1 untouched (no traffic of
        # the gradient for the usual grad_output of 1, and no host synchronisation).
        from . import backends

        backends.get("triton" if ctx.kernels else "torch").ce_bwd(grad, grad_loss)
        return grad, None, None, None, None, None, None, None, None, None, None


def _check_topk(ids: Tensor, logprobs: Tensor, n_classes: int) -> None:
    """Top-k teacher inputs as (rows, k) (``_topk_rows``), read on the host: dtypes, k, ids
    in range, no duplicates, log-probabilities at most 0."""
    if ids.is_floating_point() or not logprobs.is_floating_point():
        raise TypeError("teacher_topk_ids must hold integer ids and teacher_topk_logprobs "
                        "floating-point log-probabilities")
    if ids.shape[1] > n_classes:
        raise ValueError(f"teacher_topk_ids has k = {ids.shape[1]} columns, more than the "
                         f"{n_classes} classes")
    host = ids.detach().cpu()
    bad = (host < -1) | (host >= n_classes)
    if bad.any():
        row, col = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"teacher_topk_ids[{row}, {col}] = {int(host[row, col])} is outside "
                         f"[0, {n_classes}) and is not -1 (an unused slot)")
    used = torch.where(host >= 0, host, -torch.arange(1, host.shape[1] + 1).expand_as(host))
    ordered = used.sort(dim=1).values
    dup = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    if dup.any():
        row = int(dup.nonzero()[0, 0])
        raise ValueError(f"teacher_topk_ids row {row} holds a duplicate id")
    if bool((logprobs.detach() > 1e-6).any()):
        raise ValueError("teacher_topk_logprobs must be log-probabilities (at most 0)")


def _row_factors(lead: tuple, n_classes: int, device: torch.device, target: Tensor | None,
                 token_weight: Tensor | None, reduction: str, num_items_in_batch,
                 ignore_index: int, hard_loss_weight: float, shift: int):
    """(flat targets or None, counted rows, per-row factors of the loss and its gradient):
    the mask of counted rows, times the token weights, over the mean's denominator.  With
    ``shift`` the targets move ``shift`` positions left along the sequence (dimension -1 of
    ``lead``) and each sequence's last ``shift`` positions are not counted."""
    if hard_loss_weight and target is None:
        raise ValueError("hard_loss_weight needs target (the hard labels)")
    if shift < 0 or (shift and len(lead) < 1):
        raise ValueError(f"shift must be a non-negative int over (..., T) positions, got {shift}")
    flat_target = None
    if target is not None:
        checks.check_tensor("target", target)
        if tuple(target.shape) != lead or target.is_floating_point():
            raise ValueError(f"target must hold integer labels of shape {lead}, got "
                             f"{target.dtype} {tuple(target.shape)}")
        if target.device != device:
            raise ValueError(f"target is on {target.device} but input is on {device}")
        target = target.to(torch.int64)
        if shift:
            pad = target.new_full((*lead[:-1], min(shift, lead[-1])), ignore_index)
            target = torch.cat([target[..., shift:], pad], dim=-1)
        flat_target = target.reshape(-1)
        bad = (flat_target != ignore_index) & ((flat_target < 0) | (flat_target >= n_classes))
        if hard_loss_weight and bool(bad.any()):
            raise ValueError(f"target holds ids outside [0, {n_classes}) that are not "
                             f"ignore_index={ignore_index}")
    if token_weight is not None:
        checks.check_tensor("token_weight", token_weight)
        if tuple(token_weight.shape) != lead or not token_weight.is_floating_point():
            raise ValueError(f"token_weight must be floating point of shape {lead}, got "
                             f"{tuple(token_weight.shape)}")
        if token_weight.requires_grad:
            raise ValueError("token_weight must not require grad")
    if flat_target is not None:
        counted = flat_target != ignore_index
    else:
        counted = torch.ones(lead, dtype=torch.bool, device=device)
        if shift:
            counted[..., max(lead[-1] - shift, 0):] = False
        counted = counted.reshape(-1)
    factors = counted.float()
    if token_weight is not None:
        factors = factors * token_weight.reshape(-1).float()
    n_counted = counted.sum()
    if reduction == "mean":
        if num_items_in_batch is None:
            factors = factors / n_counted.clamp(min=1)
        else:
            factors = factors / torch.as_tensor(num_items_in_batch, dtype=torch.float32,
                                                device=device)
    return flat_target, counted, factors


def _check_options(divergence: str, tail: str, reduction: str, beta, temperature,
                   impl: str) -> None:
    """The keywords both distillation losses take, checked before anything runs."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    if not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta!r}")
    if not float(temperature) > 0.0:
        raise ValueError(f"temperature must be positive, got {temperature!r}")
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"impl must be 'auto', 'torch' or 'triton', got {impl!r}")


def _topk_rows(ids: Tensor, logprobs: Tensor, lead: tuple) -> tuple[Tensor, Tensor]:
    """A top-k teacher's (..., k) ids and log-probabilities as (rows, k), their shapes checked
    against the positions ``lead`` (the ids' values by ``_check_topk``)."""
    checks.check_tensor("teacher_topk_ids", ids)
    checks.check_tensor("teacher_topk_logprobs", logprobs)
    if logprobs.requires_grad:
        raise ValueError("teacher_topk_logprobs require grad: the teacher gets no gradient")
    if (ids.dim() != len(lead) + 1 or tuple(ids.shape[:-1]) != lead
            or tuple(logprobs.shape) != tuple(ids.shape)):
        raise ValueError(f"teacher_topk_ids and teacher_topk_logprobs must both have shape "
                         f"{lead} + (k,), got {tuple(ids.shape)} and {tuple(logprobs.shape)}")
    k = ids.shape[-1]
    return ids.reshape(-1, k), logprobs.reshape(-1, k)


def _finish(outputs: tuple, counted: Tensor, lead: tuple, reduction: str,
            dtype: torch.dtype, return_stats: bool):
    """The per-row results reduced (per token the factors were the mask and the token weights,
    no mean's denominator), in float32 for 16-bit inputs; with ``return_stats`` the stats."""
    loss_rows, div, entropy, agree = outputs
    out_dtype = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype
    loss = (loss_rows.reshape(lead) if reduction == "none" else loss_rows.sum()).to(out_dtype)
    if not return_stats:
        return loss
    agreement = (agree * counted).sum() / counted.sum().clamp(min=1)
    return loss, DistillationStats(div.reshape(lead), entropy.reshape(lead), agreement)


def distillation_loss(
    input: Tensor,
    teacher_logits: Tensor | None = None,
    target: Tensor | None = None,
    *,
    teacher_topk_ids: Tensor | None = None,
    teacher_topk_logprobs: Tensor | None = None,
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    tail: Literal["bucket", "renormalize"] = "bucket",
    hard_loss_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: Literal["none", "mean", "sum"] = "mean",
    num_items_in_batch: int | float | Tensor | None = None,
    token_weight: Tensor | None = None,
    impl: Literal["auto", "torch", "triton"] = "auto",
    inplace_backward: bool = False,
    return_stats: bool = False,
    shift: int = 0,
    process_group=None,
) -> Tensor | tuple[Tensor, DistillationStats]:
    """The divergence of the student ``softmax(input / temperature)`` from a teacher (module
    docstring), per token, with the gradient of ``input`` made in the same pass.

    Args:
        input: (..., C) student logits, any float dtype.
        teacher_logits: (..., C) teacher logits (no gradient: an error if they require one),
            or None with the top-k teacher.
        target: (...) hard labels, or None: rows whose label is ``ignore_index`` are not
            counted; with ``hard_loss_weight`` their cross-entropy is added.
        teacher_topk_ids, teacher_topk_logprobs: (..., k) the teacher's top-k ids (-1: unused)
            and their full-vocabulary log-probabilities.
        divergence: "forward_kl" (KL(p || q)), "reverse_kl" (KL(q || p)) or "jsd" (with
            ``beta``).
        tail: for a top-k teacher, "bucket" (the rest of the mass as one bucket) or
            "renormalize" (both renormalised over the k ids).
        reduction: "none" (per token, (...)), "mean" (over the counted tokens, or
            ``num_items_in_batch``) or "sum".
        token_weight: (...) per-token weights multiplying each token's loss.
        impl: "auto" (the Triton kernels on CUDA without a process group; the PyTorch
            implementation otherwise), "triton" or "torch".
        inplace_backward: write the gradient into ``input``'s storage (its values are gone
            after the call).
        return_stats: also return a ``DistillationStats``.
        shift: for (..., T, C) inputs, compare position t with the label at t + ``shift``
            (next-token labels: 1); each sequence's last ``shift`` positions are not counted
            (they stay in the output, 0).  The teacher is aligned with the student.
        process_group: vocabulary parallelism: ``input`` and ``teacher_logits`` hold this
            rank's contiguous slice of the classes (ranks in order, sizes may differ),
            ``target`` and ``teacher_topk_ids`` global ids; each row's sums are completed
            with all-reduces of a few numbers per row (never the logits), and the gradient is
            this rank's slice.

    Returns:
        The loss (float32 for 16-bit inputs, else the input's dtype), and with ``return_stats``
        the statistics.
    """
    checks.check_tensor("input", input)
    if input.dim() < 1 or not input.is_floating_point() or input.shape[-1] == 0:
        raise ValueError(f"input must be floating-point (..., C) student logits, got dtype "
                         f"{input.dtype} and shape {tuple(input.shape)}")
    _check_options(divergence, tail, reduction, beta, temperature, impl)
    kernels = False
    if process_group is None:
        from .checks import resolve_impl

        kernels = resolve_impl(impl, input.device, input.dtype) == "triton"
    elif impl == "triton":
        raise NotImplementedError("distillation_loss's Triton kernels run without "
                                  "process_group; vocabulary parallelism runs in the PyTorch "
                                  "implementation (impl='torch' or 'auto')")
    n_local = n_classes = input.shape[-1]
    lead = tuple(input.shape[:-1])
    x = input.reshape(-1, n_local)
    n = x.shape[0]
    red = _LOCAL
    if process_group is not None:
        from . import distributed

        distributed.check_initialized()
        layout = distributed.vocab_layout(process_group, n_local, n, input.dtype,
                                          input.device)
        n_classes, red = layout.n_classes, _Group(process_group, layout.vocab_start)
    ids = logprobs = teacher = None
    if (teacher_logits is None) == (teacher_topk_ids is None):
        raise ValueError("give the teacher as teacher_logits, or as teacher_topk_ids with "
                         "teacher_topk_logprobs (one of the two)")
    if teacher_logits is not None:
        checks.check_tensor("teacher_logits", teacher_logits)
        if tuple(teacher_logits.shape) != tuple(input.shape):
            raise ValueError(f"teacher_logits must have the input's shape {tuple(input.shape)}, "
                             f"got {tuple(teacher_logits.shape)}")
        if teacher_logits.requires_grad:
            raise ValueError("teacher_logits require grad: the teacher gets no gradient; pass "
                             "teacher_logits.detach() (or compute them under torch.no_grad())")
        if not teacher_logits.is_floating_point():
            raise TypeError(f"teacher_logits must be floating point, got {teacher_logits.dtype}")
        teacher = teacher_logits.reshape(-1, n_local)
    else:
        if teacher_topk_logprobs is None:
            raise ValueError("teacher_topk_ids needs teacher_topk_logprobs")
        ids, logprobs = _topk_rows(teacher_topk_ids, teacher_topk_logprobs, lead)
        _check_topk(ids, logprobs, n_classes)
        ids = ids.to(torch.int64)
    for name, t in (("teacher_logits", teacher), ("teacher_topk_ids", ids),
                    ("teacher_topk_logprobs", logprobs)):
        if t is not None and t.device != input.device:
            raise ValueError(f"{name} is on {t.device} but input is on {input.device}")
    if inplace_backward and (input.requires_grad and input.is_leaf):
        raise ValueError("inplace_backward=True overwrites input: it cannot be a leaf that "
                         "requires grad")
    flat_target, counted, factors = _row_factors(
        lead, n_classes, input.device, target, token_weight, reduction, num_items_in_batch,
        ignore_index, hard_loss_weight, shift)
    opts = _Options(divergence, float(beta), float(temperature), tail, float(hard_loss_weight),
                    int(ignore_index), stats=bool(return_stats))
    if kernels and x.stride(-1) != 1:
        if inplace_backward:
            raise ValueError("inplace_backward=True needs logits with a unit column stride")
        x = x.contiguous()
    if kernels and teacher is not None and teacher.stride(-1) != 1:
        teacher = teacher.contiguous()
    loss_rows, div, entropy, agree = DistillationFunction.apply(
        x, teacher, ids, logprobs, flat_target, factors, opts, bool(inplace_backward), red,
        n_classes, kernels)
    return _finish((loss_rows, div, entropy, agree), counted, lead, reduction, input.dtype,
                   return_stats)


class LinearDistillationFunction(torch.autograd.Function):
    """The distillation pass from the student's hidden states and LM head (and the teacher's,
    or its logits, or its top-k), over chunks of rows: each chunk's float32 student (and
    teacher) logits are made, the divergence and its gradient computed, and the gradient turned
    at once into the chunk's ``grad_input`` and added into float32 ``grad_linear_weight`` and
    ``grad_linear_bias`` accumulators; no logits tensor of either model is held.
    ``apply(input, weight, bias, teacher, target, factors, opts, chunk_rows)`` with ``teacher``
    a ``_TeacherSource``; returns (per-row loss times ``factors``, divergence, entropy,
    agreement).  With per-row ``grad_output`` (``reduction="none"``) the gradients are made in
    the backward, by one more pass."""

    @staticmethod
    def forward(ctx, input, weight, bias, teacher, target, factors, opts, chunk_rows,
                red=_LOCAL):
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                bias is not None and ctx.needs_input_grad[2])
        ctx.deferred = opts.deferred and any(need)
        outs, grads = _linear_pass(input, weight, bias, teacher, target, factors, opts,
                                   chunk_rows, () if ctx.deferred else need, red)
        ctx.need, ctx.opts, ctx.chunk_rows, ctx.teacher = need, opts, chunk_rows, teacher
        ctx.red = red
        if ctx.deferred:
            ctx.save_for_backward(input, weight, bias, target, factors)
        else:
            ctx.grads = grads
        ctx.mark_non_differentiable(*outs[1:])
        ctx.set_materialize_grads(False)
        return tuple(outs)

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        from .autograd import refuse_double_backward

        refuse_double_backward("fusedce.linear_distillation_loss")
        if grad_loss is None:
            return (None,) * 9
        if ctx.deferred:
            input, weight, bias, target, factors = ctx.saved_tensors
            _, grads = _linear_pass(input, weight, bias, ctx.teacher, target,
                                    factors * grad_loss.float(), ctx.opts, ctx.chunk_rows,
                                    ctx.need, ctx.red)
        else:
            grads = ctx.grads
            ctx.grads = None
            grads = [g.mul_(grad_loss[0].to(g.dtype)) if g is not None else None
                     for g in grads]
        return (*grads, None, None, None, None, None, None)


class _TeacherSource(NamedTuple):
    """The teacher of the fused linear distillation: logits, top-k, or hidden states and head."""

    logits: Tensor | None
    ids: Tensor | None
    logprobs: Tensor | None
    input: Tensor | None
    weight: Tensor | None
    bias: Tensor | None

    def rows(self, r0: int, r1: int) -> _Teacher:
        if self.input is not None:
            from .linear import _Head

            head = _Head(self.weight, self.bias)
            out = torch.empty(r1 - r0, self.weight.shape[0], dtype=head.acc,
                              device=self.weight.device)
            return _Teacher(head.logits(self.input[r0:r1], out), None, None)
        return _Teacher(*(t[r0:r1] if t is not None else None
                          for t in (self.logits, self.ids, self.logprobs)))


def _linear_pass(x, w, b, teacher, target, factors, opts, chunk_rows, need, red=_LOCAL):
    """Chunks of rows: losses and statistics, and the gradients ``need`` asks for (x, w, b);
    with a group (``red``), ``w`` and ``b`` are this rank's rows and ``grad_input`` is summed
    over the group."""
    from .linear import _Head

    need = tuple(need) + (False,) * (3 - len(need))
    head = _Head(w, b)
    n = x.shape[0]
    acc = head.acc
    outs = [torch.empty(n, dtype=acc, device=x.device) for _ in range(4)]
    gx = None
    if need[0]:  # (under a group, float32 partial sums until they are added over it)
        gx = torch.empty(x.shape, dtype=acc if isinstance(red, _Group) else x.dtype,
                         device=x.device)
    gw = torch.zeros(w.shape, dtype=acc, device=w.device) if need[1] else None
    gb = torch.zeros(w.shape[0], dtype=acc, device=w.device) if need[2] else None
    buf = torch.empty(min(chunk_rows, n), w.shape[0], dtype=acc, device=x.device)
    for r0 in range(0, n, chunk_rows):
        r1 = min(r0 + chunk_rows, n)
        z = head.logits(x[r0:r1], buf[: r1 - r0])
        loss, g, div, ent, agree = _chunk(z, teacher.rows(r0, r1),
                                          target[r0:r1] if target is not None else None,
                                          opts, any(need), red)
        f = factors[r0:r1]
        outs[0][r0:r1] = loss * f
        outs[1][r0:r1] = torch.where(f != 0, div, 0.0)
        outs[2][r0:r1] = ent
        outs[3][r0:r1] = agree
        if g is not None:
            g = g * f[:, None]
            if need[0]:
                gx[r0:r1] = (g @ head.w_acc).to(gx.dtype)
            if need[1]:
                gw.addmm_(g.t(), x[r0:r1].to(acc))
            if need[2]:
                gb += g.sum(dim=0)
    if gx is not None and isinstance(red, _Group):
        import torch.distributed as dist

        total = gx.float()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=red.group)
        gx = total.to(x.dtype)
    grads = (gx, gw.to(w.dtype) if gw is not None else None,
             gb.to(b.dtype) if gb is not None else None)
    return outs, grads


def linear_distillation_loss(
    input: Tensor,
    linear_weight: Tensor,
    teacher_logits: Tensor | None = None,
    target: Tensor | None = None,
    *,
    linear_bias: Tensor | None = None,
    teacher_input: Tensor | None = None,
    teacher_linear_weight: Tensor | None = None,
    teacher_linear_bias: Tensor | None = None,
    teacher_topk_ids: Tensor | None = None,
    teacher_topk_logprobs: Tensor | None = None,
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    tail: Literal["bucket", "renormalize"] = "bucket",
    hard_loss_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: Literal["none", "mean", "sum"] = "mean",
    num_items_in_batch: int | float | Tensor | None = None,
    token_weight: Tensor | None = None,
    chunk_size: int | None = None,
    impl: Literal["auto", "torch", "triton"] = "auto",
    return_stats: bool = False,
    shift: int = 0,
    process_group=None,
) -> Tensor | tuple[Tensor, DistillationStats]:
    """``distillation_loss`` of the student logits ``input @ linear_weight.T + linear_bias``
    without holding them: rows in chunks of ``chunk_size`` (default: float32 logits about the
    size of the hidden states), each chunk's logits made in float32, its gradient turned into
    ``grad_input`` and added into float32 weight and bias gradients at once.  The teacher is
    given as logits, as top-k, or as its own hidden states ``teacher_input`` and head
    ``teacher_linear_weight`` (``teacher_linear_bias``): then its logits are made chunk by
    chunk too, an exact full-vocabulary divergence with neither logits tensor ever held.
    Other arguments as ``distillation_loss``'s.

    Args:
        input: (..., H) the student's hidden states.
        linear_weight: (C, H) the student's LM head (``linear_bias`` (C,) or None).
        teacher_input, teacher_linear_weight: (..., H_t) and (C, H_t): the teacher's hidden
            states and head (no gradient), or None.
        process_group: vocabulary parallelism: ``linear_weight`` (and ``linear_bias``, and
            the teacher's head or logits) hold this rank's contiguous rows of the classes,
            the hidden states every token; ``grad_input`` is summed over the group.
    """
    from .linear import check_linear_inputs, default_chunk_size

    n_classes = check_linear_inputs(input, linear_weight, linear_bias)
    _check_options(divergence, tail, reduction, beta, temperature, impl)
    if impl == "triton":
        raise NotImplementedError("linear_distillation_loss has no Triton kernels yet: use "
                                  "impl='torch' or 'auto' (the PyTorch implementation)")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    lead = tuple(input.shape[:-1])
    x = input.reshape(-1, input.shape[-1])
    n = x.shape[0]
    forms = [teacher_logits is not None, teacher_input is not None,
             teacher_topk_ids is not None]
    if sum(forms) != 1:
        raise ValueError("give the teacher as teacher_logits, as teacher_input with "
                         "teacher_linear_weight, or as teacher_topk_ids with "
                         "teacher_topk_logprobs (one of them)")
    source = None
    if teacher_logits is not None:
        if tuple(teacher_logits.shape) != lead + (n_classes,):
            raise ValueError(f"teacher_logits must have shape {lead + (n_classes,)}, got "
                             f"{tuple(teacher_logits.shape)}")
        if teacher_logits.requires_grad:
            raise ValueError("teacher_logits require grad: the teacher gets no gradient")
        source = _TeacherSource(teacher_logits.reshape(n, n_classes), None, None, None, None,
                                None)
    elif teacher_input is not None:
        if teacher_linear_weight is None:
            raise ValueError("teacher_input needs teacher_linear_weight")
        t_classes = check_linear_inputs(teacher_input, teacher_linear_weight,
                                        teacher_linear_bias)
        if t_classes != n_classes or tuple(teacher_input.shape[:-1]) != lead:
            raise ValueError(f"the teacher's head must give {n_classes} classes for the same "
                             f"{lead} positions, got {t_classes} classes for "
                             f"{tuple(teacher_input.shape[:-1])}")
        for name, t in (("teacher_input", teacher_input),
                        ("teacher_linear_weight", teacher_linear_weight),
                        ("teacher_linear_bias", teacher_linear_bias)):
            if t is not None and t.requires_grad:
                raise ValueError(f"{name} requires grad: the teacher gets no gradient")
        source = _TeacherSource(None, None, None,
                                teacher_input.reshape(n, teacher_input.shape[-1]),
                                teacher_linear_weight, teacher_linear_bias)
    else:
        if teacher_topk_logprobs is None:
            raise ValueError("teacher_topk_ids needs teacher_topk_logprobs")
        ids, logprobs = _topk_rows(teacher_topk_ids, teacher_topk_logprobs, lead)
        if process_group is None:  # (under a group, checked with the global classes)
            _check_topk(ids, logprobs, n_classes)
        source = _TeacherSource(None, ids.to(torch.int64), logprobs, None, None, None)
    red, n_local = _LOCAL, n_classes
    if process_group is not None:
        from . import distributed

        distributed.check_initialized()
        layout = distributed.vocab_layout(process_group, n_local, n, input.dtype,
                                          input.device, hidden=x.shape[1])
        n_classes, red = layout.n_classes, _Group(process_group, layout.vocab_start)
        if source.ids is not None:
            _check_topk(source.ids, source.logprobs, n_classes)
    flat_target, counted, factors = _row_factors(
        lead, n_classes, input.device, target, token_weight, reduction, num_items_in_batch,
        ignore_index, hard_loss_weight, shift)
    opts = _Options(divergence, float(beta), float(temperature), tail, float(hard_loss_weight),
                    int(ignore_index), deferred=reduction == "none", stats=bool(return_stats))
    if chunk_size:
        rows = chunk_size
    elif process_group is not None:  # every rank the same chunks (no free-memory term)
        rows = max(1, min(n, max(n * x.shape[1], 1 << 23) // n_classes))
    else:
        rows = default_chunk_size(n, n_classes, x.shape[1], x.device)
    if x.stride(-1) != 1:
        x = x.contiguous()
    loss_rows, div, entropy, agree = LinearDistillationFunction.apply(
        x, linear_weight, linear_bias, source, flat_target, factors, opts, rows, red)
    return _finish((loss_rows, div, entropy, agree), counted, lead, reduction, input.dtype,
                   return_stats)


__all__ = ["DistillationFunction", "DistillationStats", "LinearDistillationFunction",
           "distillation_loss", "linear_distillation_loss"]
