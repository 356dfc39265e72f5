"""Input factories, the float64 reference and tolerances shared by the tests and the benchmarks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Relative-norm tolerances ||out - ref|| / ||ref|| against the float64 reference, by input dtype.
# The loss of a 16-bit input is returned in that dtype (as PyTorch does), hence the loss entries.
TOLERANCES: dict[torch.dtype, dict[str, float]] = {
    torch.float32: {"loss": 1e-5, "grad": 1e-5},
    torch.bfloat16: {"loss": 1e-2, "grad": 1e-2},
    torch.float16: {"loss": 2e-3, "grad": 2e-3},
}


def make_logits(
    n_rows: int,
    n_cols: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    *,
    scale: float = 4.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Random logits ``scale * N(0, 1)``: spread enough that the softmax is far from uniform."""
    x = torch.randn(n_rows, n_cols, generator=generator, dtype=torch.float32)
    return (x * scale).to(device=device, dtype=dtype)


def make_targets(
    n_rows: int,
    n_cols: int,
    device: torch.device | str = "cpu",
    *,
    ignore_fraction: float = 0.0,
    ignore_index: int = -100,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Random class indices with about ``ignore_fraction`` of them set to ``ignore_index``.

    Targets that would collide with an in-range ``ignore_index`` are moved to another class, so
    the fraction of ignored rows is what was asked for.
    """
    target = torch.randint(0, n_cols, (n_rows,), generator=generator)
    if 0 <= ignore_index < n_cols and n_cols > 1:
        target = torch.where(target == ignore_index, (target + 1) % n_cols, target)
    if ignore_fraction > 0.0:
        drop = torch.rand(n_rows, generator=generator) < ignore_fraction
        if ignore_fraction >= 1.0:
            drop[:] = True
        target = torch.where(drop, torch.full_like(target, ignore_index), target)
    return target.to(device)


def reference_cross_entropy(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    grad_output: Tensor | float | None = None,
) -> tuple[Tensor, Tensor | None]:
    """``F.cross_entropy`` in float64 on the CPU, with fusedce's convention that a ``mean`` over
    no counted target is 0 (PyTorch: NaN).

    Returns:
        (loss, grad): the float64 loss and, when ``grad_output`` is given, the float64 gradient of
        the logits for that ``grad_output``.
    """
    x = logits.detach().to("cpu", torch.float64).requires_grad_(grad_output is not None)
    t = target.detach().to("cpu").long()
    w = weight.detach().to("cpu", torch.float64) if weight is not None else None
    loss = F.cross_entropy(
        x, t, w, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing
    )
    if reduction == "mean":
        counted = t != ignore_index
        denom = counted.sum() if w is None else w[t.clamp(0, x.shape[-1] - 1)][counted].sum()
        if denom == 0:
            loss = (x * 0.0).sum()  # zero, still attached to x
    grad = None
    if grad_output is not None:
        go = torch.as_tensor(grad_output, dtype=torch.float64).to("cpu")
        loss.backward(go.expand_as(loss) if go.dim() == 0 else go)
        grad = x.grad
    return loss.detach(), grad


def rel_err(out: Tensor, ref: Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (absolute error when ``ref`` is all zeros)."""
    out = out.detach().to("cpu", torch.float64)
    ref = ref.detach().to("cpu", torch.float64)
    diff = (out - ref).norm().item()
    scale = ref.norm().item()
    return diff / scale if scale > 0 else diff
