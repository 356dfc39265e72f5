"""The float64 oracle, input factories and tolerances shared by the tests and the benchmarks."""

from __future__ import annotations

import socket

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


def _extras_core(x: Tensor, target: Tensor, weight: Tensor | None = None,
                 ignore_index: int = -100, reduction: str = "mean",
                 label_smoothing: float = 0.0, logit_scale: float = 1.0,
                 softcap: float | None = None, lse_square_scale: float = 0.0,
                 num_items_in_batch: float | None = None, temperature: float = 1.0,
                 token_weight: Tensor | None = None) -> dict[str, Tensor]:
    """fusedce's loss in float64 from the formulas, on a float64 CPU tensor ``x`` of logits
    (still attached to its graph), with fusedce's options and defaults."""
    t = target.detach().to("cpu").long()
    n_cols = x.shape[-1]
    w = (weight.detach().to("cpu", torch.float64) if weight is not None
         else torch.ones(n_cols, dtype=torch.float64))
    counted = t != ignore_index
    t_safe = torch.where(counted, t, 0)
    z = x * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    lse = torch.logsumexp(z, dim=-1)
    p = torch.softmax(z, dim=-1)
    entropy = lse - (p * torch.where(p > 0, z, 0.0)).sum(-1)
    z_t = z.gather(-1, t_safe.unsqueeze(-1)).squeeze(-1)
    w_t = w[t_safe]
    eps = label_smoothing
    rows = (1 - eps) * w_t * (lse - z_t)
    if eps:  # (a -inf logit's smoothing term is +inf: only with smoothing)
        rows = rows + eps / n_cols * ((lse.unsqueeze(-1) - z) * w).sum(-1)
    z_rows = torch.where(counted, lse_square_scale * w_t * lse**2, 0.0)
    rows = torch.where(counted, rows, 0.0) + z_rows
    if token_weight is not None:
        tw = token_weight.detach().to("cpu", torch.float64)
        rows, z_rows, w_t = rows * tw, z_rows * tw, w_t * tw
    if reduction == "none":
        loss, z_loss = rows, z_rows
    elif reduction == "sum":
        loss, z_loss = rows.sum(), z_rows.sum()
    else:
        denom = (float(num_items_in_batch) if num_items_in_batch is not None
                 else float(torch.where(counted, w_t, 0.0).sum()))
        inv = 1.0 / denom if denom else 0.0
        loss, z_loss = rows.sum() * inv, z_rows.sum() * inv
    n_counted = int(counted.sum())
    hits = ((z.argmax(-1) == t) & counted).sum().double()
    accuracy = hits / n_counted if n_counted else torch.tensor(0.0, dtype=torch.float64)
    return {"loss": loss, "lse": torch.where(counted, lse, 0.0).detach(),
            "z_loss": z_loss.detach(), "accuracy": accuracy,
            "lse_rows": torch.where(counted, lse, 0.0),
            "entropy": torch.where(counted, entropy, 0.0),
            "argmax": torch.where(counted, z.argmax(-1), -1)}


def _backward(loss: Tensor, inputs: list[Tensor], grad_output) -> tuple[Tensor, ...]:
    go = torch.as_tensor(grad_output, dtype=torch.float64)
    return torch.autograd.grad(loss, inputs, go.expand_as(loss) if go.dim() == 0 else go)


def reference_extras(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    grad_output: Tensor | float | None = None,
    **extras,
) -> dict[str, Tensor | None]:
    """The loss with fusedce's extras in float64 on the CPU, written from the formulas.

    ``z = softcap * tanh(logit_scale * x / softcap)``, ``lse = logsumexp(z)``, per counted row
    ``w_t * (1 - eps) * (lse - z_t) + eps / C * sum_c w_c * (lse - z_c) + lam * w_t * lse**2``,
    reduced by the sum of counted ``w_t`` (or ``num_items_in_batch``) for ``mean``.
    ``extras``: ``logit_scale``, ``softcap``, ``lse_square_scale``, ``num_items_in_batch``,
    ``temperature`` (``z`` is then divided by it) and ``token_weight`` (each row's loss and
    z-loss times it, and the mean's denominator the sum of ``w_t * token_weight``).

    Returns:
        A dict with ``loss``, ``lse`` (per row, 0 where ignored), ``z_loss`` (reduced like the
        loss), ``accuracy``, ``entropy`` (per row, ``lse - sum p z``, 0 where ignored),
        ``argmax`` (-1 where ignored), ``lse_rows`` and ``entropy`` still attached to the
        graph of a float64 copy of ``logits`` (see ``reference_objective``), and ``grad``
        (when ``grad_output`` is given).
    """
    x = logits.detach().to("cpu", torch.float64).requires_grad_(grad_output is not None)
    out = _extras_core(x, target, weight, ignore_index, reduction, label_smoothing, **extras)
    out["grad"] = _backward(out["loss"], [x], grad_output)[0] if grad_output is not None else None
    out["loss"] = out["loss"].detach()
    return out


def reference_objective(logits: Tensor, target: Tensor, coefficients: dict[str, Tensor],
                        **options) -> dict[str, Tensor]:
    """The gradient of ``sum(a * loss + b * entropy + c * lse)`` (per-token coefficients
    ``coefficients = {"loss": a, "entropy": b, "lse": c}``, reduction ``"none"``) in float64,
    with the rows' loss, lse and entropy (``options`` as in ``reference_extras``)."""
    x = logits.detach().to("cpu", torch.float64).requires_grad_()
    out = _extras_core(x, target, reduction="none", **options)
    objective = sum((coefficients[k].detach().to("cpu", torch.float64) * out[key]).sum()
                    for k, key in (("loss", "loss"), ("entropy", "entropy"), ("lse", "lse_rows"))
                    if k in coefficients)
    (grad,) = torch.autograd.grad(objective, [x])
    return {"loss": out["loss"].detach(), "lse": out["lse"], "entropy": out["entropy"].detach(),
            "grad": grad}


def reference_linear(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    linear_bias: Tensor | None = None,
    grad_output: Tensor | float = 1.0,
    **options,
) -> dict[str, Tensor | None]:
    """The unfused loss of ``input @ linear_weight.T + linear_bias`` in float64 (as
    ``reference_extras``; ``options``: weight, ignore_index, reduction, label_smoothing and the
    extras), with the gradients of the
    input, the weight and the bias."""
    params = [t.detach().to("cpu", torch.float64).requires_grad_() if t is not None else None
              for t in (input, linear_weight, linear_bias)]
    logits = F.linear(*params)
    out = _extras_core(logits, target, **options)
    grads = _backward(out["loss"], [p for p in params if p is not None], grad_output)
    out.update(loss=out["loss"].detach(), grad_input=grads[0], grad_weight=grads[1],
               grad_bias=grads[2] if linear_bias is not None else None)
    return out


def free_port() -> int:
    """A free TCP port on the loopback interface, for process groups of tests and benchmarks."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
