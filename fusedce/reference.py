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
    chunk_elements: int = CHUNK_ELEMENTS,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Per-row cross-entropy, its extras, and the scaled gradient of the logits, with PyTorch.

    Arguments and results are those of ``fusedce.kernels.ce_fwd`` (``weight`` float32 of shape
    (C,), ``weight_sum`` and ``scale`` float32 of shape (1,), ``grad`` the destination or None;
    results ``(loss, lse, z_loss, correct)``, each (N,) float32 or None), except that a target
    outside ``[0, C)`` that is not ``ignore_index`` raises ``ValueError``.
    """
    n_rows, n_cols = logits.shape
    check_targets(target, n_cols, ignore_index)
    device = logits.device
    has_zloss = lse_square_scale != 0.0
    loss = torch.empty(n_rows, dtype=torch.float32, device=device)
    lse = torch.empty(n_rows, dtype=torch.float32, device=device)
    z_loss = torch.empty(n_rows, dtype=torch.float32, device=device) if has_zloss else None
    correct = torch.empty(n_rows, dtype=torch.float32, device=device) if compute_accuracy else None
    if n_rows == 0:
        return loss, lse, z_loss, correct
    eps = float(label_smoothing)
    transformed = logit_scale != 1.0 or softcap is not None
    rows_per_chunk = max(1, chunk_elements // max(n_cols, 1))
    chunk_shape = (min(rows_per_chunk, n_rows), n_cols)
    # A float32 gradient is built in its destination; any other dtype in a scratch chunk.
    in_place_f32 = grad is not None and grad.dtype == torch.float32
    scratch = None if in_place_f32 else torch.empty(chunk_shape, device=device)
    z_scratch = torch.empty(chunk_shape, device=device) if transformed else None
    w_sum = weight_sum if weight is not None else float(n_cols)
    for r0 in range(0, n_rows, rows_per_chunk):
        r1 = min(r0 + rows_per_chunk, n_rows)
        x = logits[r0:r1].float()  # a view for float32 logits, a copy into cache otherwise
        t = target[r0:r1]
        ignored = t == ignore_index
        t_safe = torch.where(ignored, 0, t).long().unsqueeze(1)
        buf = grad[r0:r1] if in_place_f32 else scratch[: r1 - r0]

        # 1. The transformed logits z, and what is needed of them before buf (which may be x
        #    itself) is overwritten.
        z = x
        if transformed:
            z = torch.mul(x, logit_scale, out=z_scratch[: r1 - r0])
            if softcap is not None:
                z.div_(softcap).tanh_().mul_(softcap)
        m = z.amax(dim=1)
        z_t = z.gather(1, t_safe).squeeze(1)
        if eps > 0.0:
            sz = z @ weight if weight is not None else z.sum(dim=1)
        if compute_accuracy:
            hit = (z.argmax(dim=1) == t) & ~ignored
            correct[r0:r1] = hit.float()

        # 2. Softmax (one fused, vectorised pass), then the log-sum-exp from the largest
        #    probability: p_max = exp(m - lse) lies in [1/C, 1], so lse = m - log(p_max) is exact
        #    to rounding, unlike z_t - log(p_t), which underflows for an unlikely target.
        torch._softmax(z, 1, False, out=buf)
        row_lse = m - buf.amax(dim=1).log()

        # 3. The loss.
        w_t = weight[t_safe.squeeze(1)] if weight is not None else 1.0
        row_loss = (1.0 - eps) * w_t * (row_lse - z_t)
        if eps > 0.0:
            row_loss = row_loss + eps / n_cols * (w_sum * row_lse - sz)
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
        s = row_scale * (eps / n_cols)
        a = b + s * w_sum
        if has_zloss:
            a = a + row_scale * 2.0 * lse_square_scale * w_t * row_lse
        buf.mul_(a.unsqueeze(1))
        buf.scatter_add_(1, t_safe, -b.unsqueeze(1))
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
