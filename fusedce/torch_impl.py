"""The PyTorch implementation (``impl="torch"``): the CPU fallback, with the kernels' contract.

``ce_fwd``, ``ce_row_stats``, ``ce_bwd``, ``ce_scale`` and ``ce_reduce`` take and return what
``fusedce.kernels``' wrappers of the same names do: the two are the backends of
``fusedce.backends``, and the layers above use either through it.  They walk the rows in
chunks small enough to stay in cache, compute in float32 (float64 for float64 logits), form
every quantity relative to the row max as the kernels do, and write the scaled gradient
straight into its destination (which may be the logits themselves).  The extra memory is one
chunk of scratch, beside the gradient that must exist anyway; eager ``F.cross_entropy``
forward+backward holds about three float32 copies of the logits.  Every allocation names its
dtype: the default dtype never matters.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import cpu_fused
from .spec import LossSpec, RowResults, RowStats, VocabSlice, accumulation_dtype

# Elements per chunk: 1 Mi float32 = 4 MiB of scratch.  Smaller chunks pay Python's per-chunk
# overhead (measured at 2048 x 128256 on a 2-core x86 machine: 2**16 and 2**18 slower than 2**20,
# 2**22 no better).
CHUNK_ELEMENTS = 1 << 20
_INT32_MAX = 2**31 - 1


def check_targets(target: Tensor, n_classes: int, ignore_index: int) -> None:
    """Raise ``ValueError`` naming the first target outside ``[0, n_classes)`` that is not
    ignored.  This reads the targets on the host (a synchronisation on CUDA)."""
    bad = (target < 0) | (target >= n_classes)
    bad &= target != ignore_index
    if bool(bad.any()):
        index = int(bad.nonzero()[0, 0])
        value = int(target[index])
        raise ValueError(
            f"target[{index}] = {value} is outside the class range [0, {n_classes}) "
            f"and is not ignore_index ({ignore_index})"
        )


def transform_logits(x: Tensor, spec: LossSpec, out: Tensor | None = None) -> Tensor:
    """z = softcap * tanh(logit_scale * x / softcap), into ``out`` when there is a transform."""
    if not (spec.has_scale or spec.has_softcap):
        return x
    z = torch.mul(x, spec.logit_scale, out=out)
    if spec.has_softcap:
        z.div_(spec.softcap).tanh_().mul_(spec.softcap)
    return z


def row_anchor(x0: Tensor, spec: LossSpec) -> Tensor:
    """Each row's anchor logit for the smoothing sum: its first transformed logit when
    finite, else 0 (the kernels' ``_row_anchor``)."""
    z0 = transform_logits(x0, spec, None)
    return torch.where(torch.isfinite(z0), z0, 0.0)


def _chunks(n_rows: int, n_cols: int, chunk_elements: int):
    rows = max(1, chunk_elements // max(n_cols, 1))
    for r0 in range(0, n_rows, rows):
        yield r0, min(r0 + rows, n_rows)


def _weighted_row_sum(v: Tensor, weight: Tensor | None) -> Tensor:
    return v @ weight if weight is not None else v.sum(dim=1)


def _groups(logits: Tensor):
    """(G, T, C) logits (groups of rows read where they are, as the kernels' ``Rows``): each
    group's (T, C) view with the slice of the (G * T) rows it holds."""
    per = logits.shape[1]
    for g in range(logits.shape[0]):
        yield logits[g], slice(g * per, (g + 1) * per)


def _part(v: Tensor | None, rows: slice, dim: int = 0) -> Tensor | None:
    """Rows ``rows`` of a per-row tensor (along ``dim``); a scalar, None or an empty tensor (a
    result not asked for) as it is."""
    if v is None or v.dim() == 0 or v.numel() <= 1 and dim == 0 or v.numel() == 0:
        return v
    return v.narrow(dim, rows.start, rows.stop - rows.start)


def _cat_results(parts: list[RowResults]) -> RowResults:
    return RowResults(*(torch.cat([getattr(p, f) for p in parts]) for f in RowResults._fields))


def ce_row_stats(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    spec: LossSpec,
    *,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> RowStats:
    """``fusedce.kernels.ce_row_stats`` with PyTorch: one partial per row (P = 1)."""
    if logits.dim() == 3 and logits.shape[0] * logits.shape[1]:
        parts = [ce_row_stats(x, target[rows], weight, spec, chunk_elements=chunk_elements)
                 for x, rows in _groups(logits)]
        return RowStats(torch.cat([p.partials for p in parts], dim=1),
                        torch.cat([p.argmax for p in parts]))
    logits = logits.reshape(-1, logits.shape[-1])  # (an empty (G, T, C): no rows)
    n_rows, n_cols = logits.shape
    device = logits.device
    acc = accumulation_dtype(logits.dtype)
    partials = torch.empty(4, n_rows, 1, dtype=acc, device=device)
    argmax = torch.empty((n_rows, 1) if spec.return_stats else (0,), dtype=torch.int32,
                         device=device)
    rows = min(max(1, chunk_elements // max(n_cols, 1)), n_rows)
    scratch = torch.empty(rows, n_cols, dtype=acc, device=device)
    z_scratch = (torch.empty(rows, n_cols, dtype=acc, device=device)
                 if spec.has_scale or spec.has_softcap else None)
    for r0, r1 in _chunks(n_rows, n_cols, chunk_elements):
        ignored = target[r0:r1] == spec.ignore_index
        x = logits[r0:r1].to(acc)
        z = transform_logits(x, spec, z_scratch[: r1 - r0] if z_scratch is not None else None)
        buf = scratch[: r1 - r0]
        m = z.amax(dim=1)
        if spec.return_stats:
            argmax[r0:r1, 0] = torch.where(ignored, _INT32_MAX, z.argmax(dim=1).to(torch.int32))
        sz = torch.zeros_like(m)
        if spec.has_smoothing:
            ref = row_anchor(x[:, 0], spec)
            sz = _weighted_row_sum(torch.sub(z, ref.unsqueeze(1), out=buf), weight)
        zm = torch.sub(z, m.unsqueeze(1), out=buf)
        e = torch.zeros_like(m)
        if spec.has_entropy:
            zm = zm.clone()
            e = (torch.exp(zm) * zm).nan_to_num_(0.0, 0.0, 0.0).sum(dim=1)  # -inf logits add 0
        d = zm.exp_().sum(dim=1)
        partials[0, r0:r1, 0] = torch.where(ignored, torch.finfo(torch.float32).min, m)
        partials[1, r0:r1, 0] = torch.where(ignored, 0.0, d)
        partials[2, r0:r1, 0] = torch.where(ignored, 0.0, sz)
        partials[3, r0:r1, 0] = torch.where(ignored, 0.0, e)
    return RowStats(partials, argmax)


def merge_entropy_sums(pm: Tensor, pd: Tensor, pe: Tensor, m: Tensor) -> Tensor:
    """Partials' entropy sums ``sum exp(z - m_k) * (z - m_k)`` (N, P), moved to the max ``m``
    (N,) and added: ``sum_k f_k * (e_k + (m_k - m) * d_k)``, ``f_k = exp(m_k - m)``."""
    f = torch.exp(pm - m.unsqueeze(1))
    moved = f * (pe + (pm - m.unsqueeze(1)) * pd)
    return torch.where(pd > 0, moved, 0.0).sum(dim=1)


def _merge(stats: RowStats) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor]:
    """(N, P) partials -> per row (max m, sum exp(z - m), weighted sum, first argmax, entropy
    sum)."""
    pm, pd, psz, pe = stats.partials
    m = pm.amax(dim=1)
    d = (pd * torch.exp(pm - m.unsqueeze(1))).sum(dim=1)
    first = None
    if stats.argmax.numel():
        first = torch.where(pm == m.unsqueeze(1), stats.argmax.long(),
                            torch.iinfo(torch.int64).max).amin(dim=1)
    return m, d, psz.sum(dim=1), first, merge_entropy_sums(pm, pd, pe, m)


def ce_fwd(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    weight_sum: Tensor | None,
    scale: Tensor | None,
    spec: LossSpec,
    grad: Tensor | None,
    *,
    row_stats: RowStats | None = None,
    vocab: VocabSlice | None = None,
    stats_out: Tensor | None = None,
    stat_grads: tuple[Tensor, Tensor] | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> RowResults:
    """Per-row cross-entropy, its extras, and the scaled gradient of the logits, with PyTorch.

    Arguments and results are those of ``fusedce.kernels.ce_fwd`` (``weight``, ``weight_sum``
    and ``scale`` in the accumulation dtype), except that a target outside ``[0, n_classes)``
    that is not ``spec.ignore_index`` raises ``ValueError`` and that float64 logits are computed
    in float64.  With ``spec.batch_invariant`` every chunk of rows is computed at one fixed
    shape (``_invariant_chunks``).
    """
    if logits.dim() == 3 and logits.shape[0] * logits.shape[1]:
        # Groups of rows (the kernels' ``Rows``): each group's (T, C) view, read in place.
        return _cat_results([ce_fwd(
            x, target[rows], weight, weight_sum, _part(scale, rows), spec,
            grad[rows.start // x.shape[0]] if grad is not None else None,
            row_stats=None if row_stats is None else RowStats(
                _part(row_stats.partials, rows, 1), _part(row_stats.argmax, rows)),
            vocab=vocab, stats_out=_part(stats_out, rows, 1),
            stat_grads=None if stat_grads is None else (_part(stat_grads[0], rows),
                                                        _part(stat_grads[1], rows)),
            chunk_elements=chunk_elements) for x, rows in _groups(logits)])
    logits = logits.reshape(-1, logits.shape[-1])  # (an empty (G, T, C): no rows)
    if grad is not None:
        grad = grad.reshape(logits.shape)
    n_rows, n_cols = logits.shape
    check_targets(target, vocab.n_classes if vocab is not None else n_cols, spec.ignore_index)
    if cpu_fused.applies(logits, weight, spec, vocab, stat_grads, grad, stats_out) and (
            row_stats is None or grad is not None):
        # The common case as fused, compiled loops (None if they could not be compiled).
        merged = _merge(row_stats)[:2] if row_stats is not None else None
        out = cpu_fused.ce_fwd(logits, target, scale, spec, grad, merged, stats_out)
        if out is not None:
            return out
    args = (weight, weight_sum, scale, spec)
    extra = dict(row_stats=row_stats, vocab=vocab, stats_out=stats_out, stat_grads=stat_grads)
    if spec.batch_invariant and n_rows:
        return _invariant_chunks(logits, target, grad, args, extra, chunk_elements)
    return _ce_fwd_rows(logits, target, *args, grad, chunk_elements=chunk_elements, **extra)


def _invariant_chunks(logits: Tensor, target: Tensor, grad: Tensor | None, args: tuple,
                      extra: dict, chunk_elements: int) -> RowResults:
    """``spec.batch_invariant``: the rows in chunks of one fixed number of rows (set by the
    number of columns alone), so that every PyTorch reduction runs at the same shape and layout
    whatever the batch (a reduction over one row alone is split across threads, over many rows
    it is not: the sums differ in their last bits).  Whole chunks are computed where they are
    when their float32 rows are packed as the scratch's are (16-bit logits are converted to a
    packed chunk anyway) and the gradient does not alias the logits; the last, partial chunk
    (or every chunk otherwise) is copied into a fixed scratch padded with ignored rows.  Results
    are then bitwise the same for a row wherever it is."""
    weight, weight_sum, scale, spec = args
    n_rows, n_cols = logits.shape
    acc = accumulation_dtype(logits.dtype)
    rows = max(1, chunk_elements // max(n_cols, 1))
    device = logits.device
    aliased = grad is not None and \
        grad.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr()
    packed = logits.dtype != acc or logits.stride(0) == n_cols
    n_direct = n_rows // rows * rows if packed and not aliased else 0
    outs = []
    if n_direct:
        def head(v: Tensor | None, dim: int = 0) -> Tensor | None:
            return v if v is None or v.numel() <= 1 else v.narrow(dim, 0, n_direct)

        stats_in, grads_in = extra["row_stats"], extra["stat_grads"]
        outs.append(_ce_fwd_rows(
            logits[:n_direct], target[:n_direct], weight, weight_sum, head(scale), spec,
            head(grad), row_stats=None if stats_in is None else RowStats(
                head(stats_in.partials, 1), head(stats_in.argmax)),
            vocab=None, stats_out=head(extra["stats_out"], 1),
            stat_grads=None if grads_in is None else (head(grads_in[0]), head(grads_in[1])),
            chunk_elements=rows * max(n_cols, 1)))
        if n_direct == n_rows:
            return outs[0]
    x_pad = torch.zeros(rows, n_cols, dtype=logits.dtype, device=device)
    t_pad = torch.full((rows,), spec.ignore_index, dtype=torch.int64, device=device)
    g_pad = torch.empty(rows, n_cols, dtype=grad.dtype, device=device) \
        if grad is not None else None
    stats_out = extra["stats_out"]
    s_pad = torch.empty(4, rows, 1, dtype=acc, device=device) if stats_out is not None else None
    cache: dict = {}  # (the scratch chunks, reused by every chunk)
    for r0 in range(n_direct, n_rows, rows):
        r1 = min(r0 + rows, n_rows)
        n = r1 - r0
        x_pad[:n].copy_(logits[r0:r1])
        t_pad[:n].copy_(target[r0:r1])
        t_pad[n:].fill_(spec.ignore_index)

        def pad(v: Tensor | None, dim: int = 0, fill: float = 0.0) -> Tensor | None:
            if v is None or v.numel() <= 1:
                return v
            shape = list(v.shape)
            shape[dim] = rows
            out = torch.full(shape, fill, dtype=v.dtype, device=device)
            out.narrow(dim, 0, n).copy_(v.narrow(dim, r0, n))
            return out

        stats_in = extra["row_stats"]
        if stats_in is not None:
            stats_in = RowStats(pad(stats_in.partials, 1), pad(stats_in.argmax))
        grads_in = extra["stat_grads"]
        if grads_in is not None:
            grads_in = (pad(grads_in[0]), pad(grads_in[1]))
        out = _ce_fwd_rows(x_pad, t_pad, weight, weight_sum, pad(scale), spec, g_pad,
                           row_stats=stats_in, vocab=None, stats_out=s_pad,
                           stat_grads=grads_in, chunk_elements=rows * max(n_cols, 1),
                           cache=cache)
        outs.append(RowResults(*(v[:n] for v in out)))
        if grad is not None:
            grad[r0:r1].copy_(g_pad[:n])
        if stats_out is not None:
            stats_out[:, r0:r1].copy_(s_pad[:, :n])
    return RowResults(*(torch.cat([getattr(o, f) for o in outs]) for f in RowResults._fields))


def _ce_fwd_rows(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    weight_sum: Tensor | None,
    scale: Tensor | None,
    spec: LossSpec,
    grad: Tensor | None,
    *,
    row_stats: RowStats | None,
    vocab: VocabSlice | None,
    stats_out: Tensor | None,
    stat_grads: tuple[Tensor, Tensor] | None,
    chunk_elements: int,
    cache: dict | None = None,
) -> RowResults:
    """``ce_fwd`` over row chunks (``cache``: a dict that keeps the scratch chunks for the next
    call of the same shape).  (Longer than most functions here: one loop over row chunks in four
    commented phases.)"""
    n_rows, n_cols = logits.shape
    n_classes = vocab.n_classes if vocab is not None else n_cols
    device = logits.device
    acc = accumulation_dtype(logits.dtype)
    n_stats = n_rows if spec.return_stats else 0
    out = RowResults(*(torch.empty(n, dtype=acc, device=device) for n in (
        n_rows, n_rows, n_rows if spec.has_z_loss else 0, n_stats, n_stats)),
        torch.empty(n_stats, dtype=torch.int64, device=device))
    if n_rows == 0:
        return out
    merged = _merge(row_stats) if row_stats is not None else None
    eps = float(spec.label_smoothing)
    if cache is not None and "buffers" in cache:
        in_place, scratch, z_scratch, zm_scratch = cache["buffers"]
    else:
        in_place, scratch, z_scratch = _buffers(grad, spec, acc, n_rows, n_cols,
                                               chunk_elements, device)
        zm_scratch = (torch.empty_like(scratch if scratch is not None else grad, dtype=acc)
                      if spec.has_entropy and grad is not None else None)
        if cache is not None:
            cache["buffers"] = in_place, scratch, z_scratch, zm_scratch
    w_sum = weight_sum if weight is not None else float(n_classes)
    # Per-row target facts, once for all rows (few operations per chunk keep small shapes fast):
    # the target's column here (0 where this slice does not hold it), as a (rows, 1) index.
    ignored_all = target == spec.ignore_index
    local_all = torch.where(ignored_all, 0, target - (vocab.start if vocab is not None else 0))
    owned_all = (local_all >= 0) & (local_all < n_cols) & ~ignored_all
    local_all = torch.where(owned_all, local_all, 0).unsqueeze(1)
    for r0, r1 in _chunks(n_rows, n_cols, chunk_elements):
        x = logits[r0:r1].to(acc)  # a view in the accumulation dtype, a cache-sized copy else
        t, ignored = target[r0:r1], ignored_all[r0:r1]
        local, owned = local_all[r0:r1], owned_all[r0:r1]
        buf = grad[r0:r1] if in_place else scratch[: r1 - r0]
        zm = zm_scratch[: r1 - r0] if zm_scratch is not None else None

        # 1. What is needed of the logits before buf (which may be x itself) is overwritten: the
        #    target logit and the anchor logit (transformed alone), the transformed chunk z,
        #    its max m, first argmax.
        z_t = (vocab.target_logit[r0:r1].to(acc) if vocab is not None
               else transform_logits(x.gather(1, local).squeeze(1), spec, None))
        ref = row_anchor(x[:, 0], spec) if spec.has_smoothing and vocab is None else None
        z = transform_logits(x, spec, z_scratch[: r1 - r0] if z_scratch is not None else None)

        # 2. nll = lse - z_t and lse (relative to the row max), the smoothing sum, the entropy
        #    sum, and the probabilities into buf.
        if merged is None:
            nll, lse, m, log_d, sz, smooth, first, e_over_d = _statistics(
                z, z_t, local, ref, buf, zm, spec, weight, w_sum, grad is not None,
                stats_out is not None)
        else:
            # Row statistics merged elsewhere (vocabulary parallelism, recomputing backward).
            m, d, sz, first, e = (v[r0:r1] if v is not None else None for v in merged)
            log_d = d.log()
            e_over_d = e / d if spec.has_entropy else None
            if vocab is not None:
                ref = m  # the merged weighted sum is relative to the merged max
            smooth = w_sum * (log_d + (m - ref)) - sz if eps > 0.0 else None
            nll, lse = (m - z_t) + log_d, m + log_d
            if zm is not None:
                torch.sub(z, m.unsqueeze(1), out=zm)  # before buf (maybe z) is overwritten
            if grad is not None and vocab is None:
                torch._softmax(z, 1, False, out=buf)  # p, in one fused pass (whole rows here)
            elif grad is not None:
                torch.sub(z, m.unsqueeze(1), out=buf).sub_(log_d.unsqueeze(1)).exp_()  # p
        if stats_out is not None:
            _store_stats(stats_out, r0, r1, ignored, m, log_d, sz, e_over_d)
        if spec.return_stats:
            out.correct[r0:r1] = ((first == t) & ~ignored).to(acc)
            out.entropy[r0:r1] = log_d - e_over_d
            out.argmax[r0:r1] = torch.where(ignored, -1, first)

        # 3. The loss, relative to the row max.
        w_t = 1.0 if weight is None else (vocab.target_weight[r0:r1].to(acc) if vocab is not None
                                          else weight[local.squeeze(1)])
        _store_loss(out, r0, r1, spec, w_t, nll, lse, smooth, n_classes)

        # 4. The gradient: scale * (a * p - b * onehot(t) - s * w) * dz/dx, zero when ignored.
        if grad is None:
            continue
        entropy_part = None
        if stat_grads is not None:
            entropy_part = (zm, e_over_d, stat_grads[0][r0:r1], stat_grads[1][r0:r1])
        _gradient_chunk(buf, z, spec, ignored, owned, local, w_t, weight, w_sum, n_classes,
                        scale if scale.numel() == 1 else scale[r0:r1], lse, entropy_part)
        if not in_place:
            grad[r0:r1].copy_(buf)
    for rows in (out.loss, out.lse, out.z_loss, out.entropy):
        if rows.numel():
            rows.masked_fill_(ignored_all, 0.0)  # exact zeros for ignored rows, even for NaN
    return out


def _buffers(grad: Tensor | None, spec: LossSpec, acc: torch.dtype, n_rows: int, n_cols: int,
             chunk_elements: int, device: torch.device
             ) -> tuple[bool, Tensor | None, Tensor | None]:
    """(in_place, scratch, z_scratch): a gradient in the accumulation dtype with packed rows is
    built in its destination; any other in a scratch chunk, then copied (only into the
    destination's own elements).  Transformed logits get a chunk of their own."""
    rows = min(max(1, chunk_elements // max(n_cols, 1)), n_rows)
    in_place = grad is not None and grad.dtype == acc and grad.is_contiguous()

    def chunk() -> Tensor:
        return torch.empty(rows, n_cols, dtype=acc, device=device)

    return (in_place, None if in_place else chunk(),
            chunk() if spec.has_scale or spec.has_softcap else None)


def _statistics(z: Tensor, z_t: Tensor, local: Tensor, ref: Tensor | None, buf: Tensor,
                zm: Tensor | None, spec: LossSpec, weight: Tensor | None, w_sum,
                compute_grad: bool, need_max: bool):
    """(nll, lse, m, log d, smoothing sum relative to ``ref``, smoothing term, first argmax,
    e / d = sum_c p_c (z_c - m)) of a chunk of transformed logits ``z``, with ``nll = lse - z_t``
    formed relative to the row max; with ``compute_grad`` the probabilities are left in ``buf``
    (and ``z - m`` in ``zm`` when the entropy is tracked).  ``m`` and ``log d`` (and the
    smoothing sum) are None in the loss-only pass unless ``need_max``; ``e / d`` is None unless
    the entropy is tracked."""
    first = z.argmax(dim=1) if spec.return_stats else None
    m = log_d = sz = smooth = e_over_d = None
    if not compute_grad:
        # The loss alone: one fused log-softmax pass (computed relative to the max by PyTorch):
        # nll = -log_softmax(z)_t exactly, and the smoothing term -sum_c w_c log_softmax(z)_c.
        torch._log_softmax(z, 1, False, out=buf)
        nll = -buf.gather(1, local).squeeze(1)
        if spec.has_smoothing:
            smooth = -_weighted_row_sum(buf, weight)  # sum_c w_c * (lse - z_c)
        if need_max or spec.has_entropy:
            m, log_d = z.amax(dim=1), -buf.amax(dim=1)
            if spec.has_smoothing:
                sz = w_sum * (log_d + (m - ref)) - smooth
        if spec.has_entropy:
            # H = -sum p log p with log p = log_softmax(z); e / d = log d - H.
            p_log_p = torch.exp(buf).mul_(buf).nan_to_num_(0.0, 0.0, 0.0)  # -inf logits add 0
            e_over_d = log_d + p_log_p.sum(dim=1)
        return nll, z_t + nll, m, log_d, sz, smooth, first, e_over_d
    m = z.amax(dim=1)
    if zm is not None:
        torch.sub(z, m.unsqueeze(1), out=zm)  # before buf (maybe z itself) is overwritten
    z_soft = z
    if spec.has_smoothing:
        sz = _weighted_row_sum(torch.sub(z, ref.unsqueeze(1), out=buf), weight)
        z_soft = buf  # softmax is shift-invariant: softmax(z - ref) = softmax(z)
    # Softmax in one fused pass; its largest entry 1/d gives log d exactly.
    torch._softmax(z_soft, 1, False, out=buf)
    log_d = -buf.amax(dim=1).log()
    if zm is not None:
        e_over_d = torch.where(buf > 0, buf * zm, 0.0).sum(dim=1)  # -inf logits add 0
    if spec.has_smoothing:
        smooth = w_sum * (log_d + (m - ref)) - sz
    return (m - z_t) + log_d, m + log_d, m, log_d, sz, smooth, first, e_over_d


def _store_stats(stats_out: Tensor, r0: int, r1: int, ignored: Tensor, m, log_d,
                 sz: Tensor | None, e_over_d: Tensor | None) -> None:
    """Rows r0:r1 of the per-row statistics a recomputing pass takes back (``RowStats``)."""
    d = log_d.exp()
    stats_out[0, r0:r1, 0] = torch.where(ignored, torch.finfo(torch.float32).min, m)
    stats_out[1, r0:r1, 0] = torch.where(ignored, 0.0, d)
    stats_out[2, r0:r1, 0] = torch.where(ignored, 0.0, sz) if sz is not None else 0.0
    stats_out[3, r0:r1, 0] = torch.where(ignored, 0.0, e_over_d * d) \
        if e_over_d is not None else 0.0


def _store_loss(out: RowResults, r0: int, r1: int, spec: LossSpec, w_t, nll, lse, smooth,
                n_classes: int) -> None:
    """Rows r0:r1 of the loss (from ``nll = lse - z_t``), z-loss and lse."""
    eps = float(spec.label_smoothing)
    row_loss = nll if eps == 0.0 and not isinstance(w_t, Tensor) else (1.0 - eps) * w_t * nll
    if smooth is not None:
        row_loss = row_loss + eps / n_classes * smooth
    if spec.has_z_loss:
        row_z = spec.lse_square_scale * w_t * lse * lse
        out.z_loss[r0:r1] = row_z
        row_loss = row_loss + row_z
    out.loss[r0:r1] = row_loss  # ignored rows are zeroed once, after the last chunk
    out.lse[r0:r1] = lse


def _gradient_chunk(buf: Tensor, z: Tensor, spec: LossSpec, ignored: Tensor, owned: Tensor,
                    local: Tensor, w_t, weight: Tensor | None, w_sum, n_classes: int,
                    scale: Tensor, lse: Tensor, entropy_part) -> None:
    """Turn the probabilities in ``buf`` into the scaled gradient of the logits, in place.
    ``entropy_part``: None, or ``(z - m, e / d, lse gradient, entropy gradient)`` of the rows,
    whose terms ``g_lse * p_c - g_H * p_c * (z_c - mu)`` are added."""
    eps = float(spec.label_smoothing)
    row_scale = torch.where(ignored, 0.0, scale)
    b = row_scale * (1.0 - eps) * w_t
    s = row_scale * (eps / n_classes)
    a = b + s * w_sum
    if spec.has_z_loss:
        a = a + row_scale * 2.0 * spec.lse_square_scale * w_t * torch.where(ignored, 0.0, lse)
    if entropy_part is None:
        buf.mul_(a.unsqueeze(1))
    else:
        zm, e_over_d, g_lse, g_h = entropy_part
        # p * (a + g_lse - g_H * ((z - m) - e / d)), built in zm.
        zm.sub_(e_over_d.unsqueeze(1)).mul_(-g_h.unsqueeze(1)).add_((a + g_lse).unsqueeze(1))
        # A masked column (z = -inf) has p = 0 and an exactly zero gradient, where its factor
        # is infinite (or NaN for g_H = 0): 0 * inf would be NaN.
        zm.masked_fill_(buf == 0, 0.0)
        buf.mul_(zm)
    buf.scatter_add_(1, local, torch.where(owned, -b, 0.0).unsqueeze(1).to(buf.dtype))
    if eps > 0.0:
        if weight is not None:
            buf.addr_(s, weight, alpha=-1.0)
        else:
            buf.sub_(s.unsqueeze(1))
    if spec.has_softcap:
        buf.mul_(z.div_(spec.softcap).square_().neg_().add_(1.0))  # 1 - tanh^2
    if spec.has_scale:
        buf.mul_(spec.logit_scale)
    if bool(ignored.any()):
        buf.masked_fill_(ignored.unsqueeze(1), 0.0)  # exact zeros even for non-finite logits


def ce_scale(target: Tensor, weight: Tensor | None, token_weight: Tensor | None,
             items: Tensor | None, spec: LossSpec, n_classes: int, dtype: torch.dtype) -> Tensor:
    """The (1,) scale of a ``mean`` in ``dtype`` (``fusedce.kernels.ce_scale``): 1 / the
    counted targets' class weight times token weight (their number when unweighted; 0 when
    that is 0), or 1 / ``items``.  A few operations on the device, never read on the host."""
    if items is not None:
        return 1.0 / items.to(device=target.device, dtype=dtype).reshape(1)
    counted = target != spec.ignore_index
    if weight is None and token_weight is None:
        denom = counted.sum(dtype=dtype)
    else:
        w_t = weight[target.clamp(0, max(n_classes - 1, 0))].to(dtype) if weight is not None \
            else torch.ones((), dtype=dtype, device=target.device)
        if token_weight is not None:
            w_t = w_t * token_weight.to(dtype)
        denom = torch.where(counted, w_t, 0.0).sum()
    return torch.where(denom != 0, 1.0 / denom, 0.0).reshape(1)


def ce_reduce(rows: Tensor, scale: Tensor | None, out_dtype: torch.dtype) -> Tensor:
    """sum(rows), times ``scale`` when given (+0 when it is 0, never -0), as a scalar of
    ``out_dtype`` (``fusedce.kernels.ce_reduce``)."""
    total = rows.sum()
    if scale is None:
        return total.to(out_dtype)
    return torch.where(scale[0] != 0, total * scale[0], 0.0).to(out_dtype)


def ce_bwd(grad: Tensor, grad_output: Tensor) -> None:
    """Multiply the stored gradient by ``grad_output`` (a scalar or one value per row) in place."""
    factor = grad_output.reshape(*grad.shape[:-1], 1) if grad_output.numel() > 1 \
        else grad_output.reshape(())
    if factor.device.type == "cpu" and factor.numel() == 1 and float(factor) == 1.0:
        return  # free to check on the host, and the common case
    grad.mul_(factor)


__all__ = ["CHUNK_ELEMENTS", "ce_bwd", "ce_fwd", "ce_reduce", "ce_row_stats", "ce_scale",
           "check_targets", "merge_entropy_sums", "row_anchor", "transform_logits"]
