"""Fused CPU loops for the PyTorch implementation's common case, compiled by Inductor.

Composed of eager operations, a chunk of 16-bit logits is converted to float32, then read again
by the log-softmax and again by the gradient: on a CPU, where the exponentials and those extra
passes cost more than the memory traffic a GPU cares about, that is slower than eager
``F.cross_entropy`` for small vocabularies.  Here each chunk's loss (and gradient) is one
``torch.compile``d function that reads the logits in their own dtype and keeps every
intermediate in float32 registers: max, sum of exponentials, ``nll = (m - z_t) + log d`` (formed
relative to the row max, as everywhere in fusedce), and ``scale * (p - onehot(t))`` written
straight into the gradient's rows.

It runs only where it is exactly the PyTorch implementation's computation: CPU tensors of
float32, bfloat16 or float16 logits, no class weights, label smoothing, logit transform, z-loss,
statistics, vocabulary slice or batch invariance (``applies``).  The functions are compiled with
dynamic shapes on first use (once per dtype and process: about 1-5 s on two cores, reported by
``python -m bench``); if compilation fails (no C++ compiler, an unsupported platform) a warning
says so once and the eager composition runs, so a first call is never wrong or refused.
``FUSEDCE_CPU_COMPILE=0`` turns the path off.
"""

from __future__ import annotations

import os
import time
import warnings

import torch
from torch import Tensor

from .spec import LossSpec, RowResults

# Logits elements per compiled call that writes a gradient: 4 Mi (8 MiB of bf16), large enough
# that the call's own overhead is small, small enough that the chunk-sized temporary the
# compiled copy goes through stays in the last-level cache.
CHUNK_ELEMENTS = 1 << 22
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_STATE = {"enabled": os.environ.get("FUSEDCE_CPU_COMPILE", "1") != "0", "compile_s": 0.0}


def _loss(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(nll, lse, m, d) of each row of x (classes last) against t, in float32."""
    xf = x.float()
    m = xf.amax(dim=1, keepdim=True)
    d = torch.exp(xf - m).sum(dim=1)
    z_t = xf.gather(1, t.unsqueeze(1)).squeeze(1)
    m = m.squeeze(1)
    log_d = torch.log(d)
    return (m - z_t) + log_d, m + log_d, m, d


def _loss_grad(x: Tensor, t: Tensor, a: Tensor, ignored: Tensor, out: Tensor
               ) -> tuple[Tensor, Tensor]:
    """(nll, lse), and out = a * (softmax(x) - onehot(t)) in out's dtype; 0 for ignored rows."""
    xf = x.float()
    m = xf.amax(dim=1, keepdim=True)
    e = torch.exp(xf - m)
    d = e.sum(dim=1, keepdim=True)
    cols = torch.arange(x.shape[1], device=x.device)
    g = (e / d - (cols.unsqueeze(0) == t.unsqueeze(1)).float()) * a.unsqueeze(1)
    out.copy_(torch.where(ignored.unsqueeze(1), 0.0, g))
    z_t = xf.gather(1, t.unsqueeze(1)).squeeze(1)
    m, log_d = m.squeeze(1), torch.log(d.squeeze(1))
    return (m - z_t) + log_d, m + log_d


def _grad_from_stats(x: Tensor, t: Tensor, m: Tensor, log_d: Tensor, a: Tensor,
                     ignored: Tensor, out: Tensor) -> None:
    """out = a * (exp(x - m - log d) - onehot(t)) from known row statistics; 0 when ignored."""
    p = torch.exp((x.float() - m.unsqueeze(1)) - log_d.unsqueeze(1))  # relative to the max
    cols = torch.arange(x.shape[1], device=x.device)
    g = (p - (cols.unsqueeze(0) == t.unsqueeze(1)).float()) * a.unsqueeze(1)
    out.copy_(torch.where(ignored.unsqueeze(1), 0.0, g))


_COMPILED: dict[str, object] = {}


def _compiled(name: str):
    if name not in _COMPILED:
        fn = {"loss": _loss, "loss_grad": _loss_grad, "grad": _grad_from_stats}[name]
        _COMPILED[name] = torch.compile(fn, dynamic=True)
    return _COMPILED[name]


def applies(logits: Tensor, weight, spec: LossSpec, vocab, stat_grads, grad) -> bool:
    """Whether a pass is the common case these loops compute exactly."""
    return (_STATE["enabled"] and logits.device.type == "cpu" and logits.dim() == 2
            and logits.dtype in _DTYPES and weight is None and vocab is None
            and stat_grads is None and not spec.batch_invariant
            and not (spec.has_smoothing or spec.has_scale or spec.has_softcap
                     or spec.has_z_loss or spec.return_stats or spec.has_entropy)
            and logits.shape[0] > 0 and logits.shape[1] > 0
            and (grad is None or grad.dtype == logits.dtype)
            and not torch.compiler.is_compiling())


def compile_seconds() -> float:
    """Seconds spent compiling the loops so far in this process."""
    return _STATE["compile_s"]


_SEEN: set[tuple[str, torch.dtype]] = set()


def _call(name: str, *args):
    """A compiled loop; its first call for a dtype is timed as compilation."""
    start = time.perf_counter()
    key = (name, args[0].dtype)
    with torch.no_grad():
        out = _compiled(name)(*args)
    if key not in _SEEN:
        _SEEN.add(key)
        _STATE["compile_s"] += time.perf_counter() - start
    return out


def ce_fwd(logits: Tensor, target: Tensor, scale: Tensor | None, spec: LossSpec,
           grad: Tensor | None, merged: tuple[Tensor, Tensor] | None,
           stats_out: Tensor | None) -> RowResults | None:
    """The PyTorch implementation's ``ce_fwd`` for the common case (see ``applies``), or None
    when compilation failed (the caller then runs its eager composition).  ``merged``: known
    (m, d) of each row (a recomputing backward)."""
    n_rows, n_cols = logits.shape
    aliased = grad is not None and grad.untyped_storage().data_ptr() == \
        logits.untyped_storage().data_ptr()
    # The loss alone: one call for all rows.  With a gradient, chunks: the compiled copy into
    # the gradient's rows goes through a temporary of the chunk's size (functionalized), so a
    # whole-tensor call would hold a second gradient and write it twice.
    rows = n_rows if grad is None else max(1, CHUNK_ELEMENTS // n_cols)
    ignored_all = target == spec.ignore_index
    safe_all = torch.where(ignored_all, 0, target)
    if grad is not None:
        a_all = torch.where(ignored_all, 0.0, scale.to(torch.float32).expand(n_rows))
    loss = torch.empty(n_rows, dtype=torch.float32)
    lse = torch.empty(n_rows, dtype=torch.float32)
    try:
        for r0 in range(0, n_rows, rows):
            r1 = min(r0 + rows, n_rows)
            x, t, ign = logits[r0:r1], safe_all[r0:r1], ignored_all[r0:r1]
            out = None
            if grad is not None:
                out = torch.empty_like(x) if aliased else grad[r0:r1]
            if merged is not None:
                m, d = merged[0][r0:r1].float(), merged[1][r0:r1].float()
                log_d = torch.log(d)
                z_t = x.gather(1, t.unsqueeze(1)).squeeze(1).float()
                loss[r0:r1], lse[r0:r1] = (m - z_t) + log_d, m + log_d
                _call("grad", x, t, m, log_d, a_all[r0:r1], ign, out)
            elif grad is not None:
                loss[r0:r1], lse[r0:r1] = _call("loss_grad", x, t, a_all[r0:r1], ign, out)
            else:
                nll, row_lse, m, d = _call("loss", x, t)
                loss[r0:r1], lse[r0:r1] = nll, row_lse
                if stats_out is not None:
                    stats_out[0, r0:r1, 0] = torch.where(ign, torch.finfo(torch.float32).min,
                                                         m)
                    stats_out[1, r0:r1, 0] = torch.where(ign, 0.0, d)
                    stats_out[2:, r0:r1, 0] = 0.0
            if aliased:
                grad[r0:r1].copy_(out)
    except Exception as exc:  # compilation failed: the eager composition is always right
        if r0 != 0:
            raise
        _STATE["enabled"] = False
        warnings.warn(f"fusedce: compiling the CPU loss loops failed ({type(exc).__name__}: "
                      f"{exc}); the PyTorch implementation's eager operations run instead",
                      RuntimeWarning, stacklevel=3)
        return None
    loss.masked_fill_(ignored_all, 0.0)
    lse.masked_fill_(ignored_all, 0.0)
    return RowResults(loss, lse, *(torch.empty(0, dtype=torch.float32) for _ in range(3)),
                      torch.empty(0, dtype=torch.int64))


__all__ = ["CHUNK_ELEMENTS", "applies", "ce_fwd", "compile_seconds"]
