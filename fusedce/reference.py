"""The PyTorch implementation: fusedce's CPU fallback, with the kernels' exact contract.

``ce_fwd_torch`` takes and returns what ``fusedce.kernels.ce_fwd`` does, so the autograd layer
can use either.  It walks the rows in chunks small enough to stay in cache, computes the loss in
float32, and writes the scaled gradient straight into its destination (which may be the logits
themselves).  Its extra memory is one float32 chunk, beside the gradient that must exist anyway;
eager ``F.cross_entropy`` forward+backward holds about three float32 copies of the logits.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Elements per chunk: 1 Mi float32 = 4 MiB of scratch.  Smaller chunks pay Python's per-chunk
# overhead (measured at 2048 x 128256 on a 2-core x86 machine: 2**16 and 2**18 slower than 2**20,
# 2**22 no better).
CHUNK_ELEMENTS = 1 << 20


def check_targets(target: Tensor, n_cols: int, ignore_index: int) -> None:
    """Raise ``ValueError`` naming the first target outside ``[0, n_cols)`` that is not ignored.

    This reads the targets on the host (a synchronisation on CUDA).
    """
    bad = (target < 0) | (target >= n_cols)
    bad &= target != ignore_index
    if bool(bad.any()):
        index = int(bad.nonzero()[0, 0])
        value = int(target[index])
        raise ValueError(
            f"target[{index}] = {value} is outside the class range [0, {n_cols}) "
            f"and is not ignore_index ({ignore_index})"
        )


def _transformed(x: Tensor, logit_scale: float, softcap: float | None, out: Tensor | None):
    """z = softcap * tanh(logit_scale * x / softcap) (float32), into ``out`` when transformed."""
    if logit_scale == 1.0 and softcap is None:
        return x
    z = torch.mul(x, logit_scale, out=out)
    if softcap is not None:
        z.div_(softcap).tanh_().mul_(softcap)
    return z


def row_stats_torch(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    *,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    compute_accuracy: bool = False,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """``fusedce.kernels.ce_row_stats`` with PyTorch: (max, sumexp, weighted_sum, argmax), each
    (N, 1) (argmax int64, local columns, or None); ignored rows give (min, 0, 0, int32 max)."""
    n_rows, n_cols = logits.shape
    device = logits.device
    stats = torch.empty(3, n_rows, 1, dtype=torch.float32, device=device)
    argmax = (torch.empty(n_rows, 1, dtype=torch.int64, device=device)
              if compute_accuracy else None)
    rows_per_chunk = max(1, chunk_elements // max(n_cols, 1))
    scratch = torch.empty(min(rows_per_chunk, n_rows), n_cols, device=device)
    for r0 in range(0, n_rows, rows_per_chunk):
        r1 = min(r0 + rows_per_chunk, n_rows)
        ignored = (target[r0:r1] == ignore_index).unsqueeze(1)
        z = _transformed(logits[r0:r1].float(), logit_scale, softcap, scratch[: r1 - r0])
        m = z.amax(dim=1, keepdim=True)
        if compute_accuracy:
            argmax[r0:r1] = torch.where(ignored, torch.iinfo(torch.int32).max,
                                        z.argmax(dim=1, keepdim=True))
        if label_smoothing > 0.0:
            sz = (z @ weight).unsqueeze(1) if weight is not None else z.sum(1, keepdim=True)
        else:
            sz = torch.zeros_like(m)
        d = torch.exp(z - m).sum(dim=1, keepdim=True)
        stats[0, r0:r1] = torch.where(ignored, torch.finfo(torch.float32).min, m)
        stats[1, r0:r1] = torch.where(ignored, 0.0, d)
        stats[2, r0:r1] = torch.where(ignored, 0.0, sz)
    return stats[0], stats[1], stats[2], argmax


def merge_row_stats(row_max: Tensor, sumexp: Tensor, weighted_sum: Tensor,
                    argmax: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Merge (N, P) partial statistics into one per row: (lse, sum w*z, first argmax)."""
    m = row_max.amax(dim=1, keepdim=True)
    d = (sumexp * torch.exp(row_max - m)).sum(dim=1)
    lse = m.squeeze(1) + d.log()
    first = None
    if argmax is not None:
        big = torch.iinfo(torch.int64).max
        first = torch.where(row_max == m, argmax.long(), big).amin(dim=1)
    return lse, m.squeeze(1), weighted_sum.sum(dim=1), first


def ce_fwd_torch(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    weight_sum: Tensor | None,
    scale: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    grad: Tensor | None,
    *,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    lse_square_scale: float = 0.0,
    compute_accuracy: bool = False,
    row_stats: tuple | None = None,
    vocab_start: int = 0,
    n_classes: int | None = None,
    target_logit: Tensor | None = None,
    target_weight: Tensor | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Per-row cross-entropy, its extras, and the scaled gradient of the logits, with PyTorch.

    Arguments and results are those of ``fusedce.kernels.ce_fwd`` (``weight`` float32 of shape
    (C,), ``weight_sum`` and ``scale`` float32 of shape (1,) (``scale`` may be (N,)), ``grad`` the
    destination or None, ``row_stats`` a (max, sumexp, weighted_sum, argmax) tuple of (N, P)
    partials; results ``(loss, lse, z_loss, correct)``, each (N,) float32 or None), except that
    a target outside ``[0, n_classes)`` that is not ``ignore_index`` raises ``ValueError``.
    """
    n_rows, n_cols = logits.shape
    n_classes = n_cols if n_classes is None else n_classes
    check_targets(target, n_classes, ignore_index)
    vocab_parallel = target_logit is not None
    device = logits.device
    has_zloss = lse_square_scale != 0.0
    loss = torch.empty(n_rows, dtype=torch.float32, device=device)
    lse = torch.empty(n_rows, dtype=torch.float32, device=device)
    z_loss = torch.empty(n_rows, dtype=torch.float32, device=device) if has_zloss else None
    correct = torch.empty(n_rows, dtype=torch.float32, device=device) if compute_accuracy else None
    if n_rows == 0:
        return loss, lse, z_loss, correct
    merged = merge_row_stats(*row_stats) if row_stats is not None else None
    eps = float(label_smoothing)
    transformed = logit_scale != 1.0 or softcap is not None
    rows_per_chunk = max(1, chunk_elements // max(n_cols, 1))
    chunk_shape = (min(rows_per_chunk, n_rows), n_cols)
    # A float32 gradient is built in its destination; any other dtype in a scratch chunk.
    in_place_f32 = grad is not None and grad.dtype == torch.float32
    scratch = None if in_place_f32 else torch.empty(chunk_shape, device=device)
    z_scratch = torch.empty(chunk_shape, device=device) if transformed else None
    w_sum = weight_sum if weight is not None else float(n_classes)
    for r0 in range(0, n_rows, rows_per_chunk):
        r1 = min(r0 + rows_per_chunk, n_rows)
        x = logits[r0:r1].float()  # a view for float32 logits, a copy into cache otherwise
        t = target[r0:r1]
        ignored = t == ignore_index
        local = torch.where(ignored, 0, t - vocab_start).long()
        owned = (local >= 0) & (local < n_cols) & ~ignored
        local = torch.where(owned, local, 0).unsqueeze(1)
        buf = grad[r0:r1] if in_place_f32 else scratch[: r1 - r0]

        # 1. The transformed logits z, and what is needed of them before buf (which may be x
        #    itself) is overwritten.
        z = _transformed(x, logit_scale, softcap, z_scratch[: r1 - r0] if transformed else None)
        if merged is None:
            z_t = z.gather(1, local).squeeze(1)
            if eps > 0.0:
                sz = z @ weight if weight is not None else z.sum(dim=1)
            if compute_accuracy:
                first = z.argmax(dim=1)
        if merged is None and grad is None:
            # 2a. The loss alone: one fused log-softmax pass; lse = z_t - log p_t, both exact to
            #     rounding (log_softmax is computed stably, not as the log of a probability).
            torch._log_softmax(z, 1, False, out=buf)
            row_lse = z_t - buf.gather(1, local).squeeze(1)
        elif merged is None:
            # 2b. Softmax (one fused, vectorised pass), then the log-sum-exp from the largest
            #     probability: p_max = exp(m - lse) lies in [1/C, 1], so lse = m - log(p_max) is
            #     exact to rounding, unlike z_t - log(p_t), which underflows for an unlikely
            #     target.  m is taken before buf (which may be z itself) is overwritten.
            m = z.amax(dim=1)
            torch._softmax(z, 1, False, out=buf)
            row_lse = m - buf.amax(dim=1).log()
        else:
            # 2c. Row statistics merged elsewhere (vocabulary parallelism): p = exp(z - lse).
            row_lse, _, sz, first = (v[r0:r1] if v is not None else None for v in merged)
            z_t = (target_logit[r0:r1] if vocab_parallel
                   else z.gather(1, local).squeeze(1))
            torch.sub(z, row_lse.unsqueeze(1), out=buf).exp_()  # p
        if compute_accuracy:
            correct[r0:r1] = ((first == t) & ~ignored).float()

        # 3. The loss.
        if weight is None:
            w_t = 1.0
        elif vocab_parallel:
            w_t = target_weight[r0:r1]
        else:
            w_t = weight[local.squeeze(1)]
        row_loss = (1.0 - eps) * w_t * (row_lse - z_t)
        if eps > 0.0:
            row_loss = row_loss + eps / n_classes * (w_sum * row_lse - sz)
        if has_zloss:
            row_z = torch.where(ignored, 0.0, lse_square_scale * w_t * row_lse * row_lse)
            z_loss[r0:r1] = row_z
            row_loss = row_loss + row_z
        loss[r0:r1] = torch.where(ignored, 0.0, row_loss)
        lse[r0:r1] = torch.where(ignored, 0.0, row_lse)

        # 4. The gradient: scale * (a * p - b * onehot(t) - s * w) * dz/dx, zero when ignored.
        if grad is None:
            continue
        row_scale = torch.where(ignored, 0.0, scale if scale.numel() == 1 else scale[r0:r1])
        b = row_scale * (1.0 - eps) * w_t
        s = row_scale * (eps / n_classes)
        a = b + s * w_sum
        if has_zloss:
            a = a + row_scale * 2.0 * lse_square_scale * w_t * torch.where(ignored, 0.0, row_lse)
        buf.mul_(a.unsqueeze(1))
        buf.scatter_add_(1, local, torch.where(owned, -b, 0.0).unsqueeze(1))
        if eps > 0.0:
            if weight is not None:
                buf.addr_(s, weight, alpha=-1.0)
            else:
                buf.sub_(s.unsqueeze(1))
        if softcap is not None:
            buf.mul_(z.div_(softcap).square_().neg_().add_(1.0))  # 1 - tanh^2
        if logit_scale != 1.0:
            buf.mul_(logit_scale)
        if bool(ignored.any()):
            buf.masked_fill_(ignored.unsqueeze(1), 0.0)  # exact zeros even for non-finite logits
        if not in_place_f32:
            grad[r0:r1].copy_(buf)
    return loss, lse, z_loss, correct


def ce_bwd_torch(grad: Tensor, grad_output: Tensor) -> None:
    """Multiply the stored gradient by ``grad_output`` (a scalar or one value per row) in place."""
    factor = grad_output.reshape(-1, 1) if grad_output.dim() > 0 else grad_output
    if factor.device.type == "cpu" and factor.numel() == 1 and float(factor) == 1.0:
        return  # free to check on the host, and the common case
    grad.mul_(factor)
