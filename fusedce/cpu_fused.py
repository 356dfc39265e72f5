"""Fused CPU loops for the PyTorch implementation's common case, compiled by Inductor.

Composed of eager operations, a chunk of 16-bit logits is converted to float32, then read again
by the log-softmax and again by the gradient: on a CPU, where the exponentials and those extra
passes cost more than the memory traffic a GPU cares about, that is slower than eager
``F.cross_entropy`` for small vocabularies.  Here each chunk's loss (and gradient) is one
``torch.compile``d function that reads the logits in their own dtype and keeps every
intermediate in float32 registers: max, sum of exponentials, ``nll = (m - z_t) + log d`` (formed
relative to the row max, as everywhere in fusedce), and ``scale * (p - onehot(t))`` written
straight into the gradient's rows.

Without a gradient (evaluation, RL rollouts' ``token_logprobs``), one compiled call also takes a
logit scale (the temperature), the statistics (entropy ``log d - sum_c e_c (z_c - m) / d``, the
first argmax as the least index reaching the max, accuracy) and ``batch_invariant`` (every call
then has one fixed shape of ``INVARIANT_ROWS`` rows, the last padded, so a row's results do not
depend on the batch).  With a gradient it takes the plain loss.  It runs only where it is the
PyTorch implementation's computation (the same formulas, relative to the row max): CPU tensors
of float32, bfloat16 or float16 logits, no class weights, label smoothing, softcap, z-loss or
vocabulary slice (``applies``).  The functions are compiled with
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

# Logits elements per compiled call that writes a gradient: 1 Mi (a 4 MiB float32 temporary),
# large enough that the call's own overhead (~20 us) is small, small enough that the temporary
# the compiled copy goes through stays in the last-level cache and adds at most a quarter of
# 256 x 32000 bf16 logits to the peak.  (Measured on 2 threads, interleaved, fwd+bwd: 1 Mi beat
# 4 Mi and 256 Ki at 256 x 32000 and 2048 x 32000-50257, fp32 and bf16.)
CHUNK_ELEMENTS = 1 << 20
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_STATE = {"enabled": os.environ.get("FUSEDCE_CPU_COMPILE", "1") != "0", "compile_s": 0.0}


def _forward(x: Tensor, t: Tensor, ignore_index: int, scale: Tensor
             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(nll, lse, m, d) of each row of ``z = scale * x`` (classes last) against ``t``, in
    float32; nll and lse 0 where ``t`` is ``ignore_index``."""
    ignored = t == ignore_index
    z = x.float() * scale
    m = z.amax(dim=1, keepdim=True)
    d = torch.exp(z - m).sum(dim=1)
    z_t = z.gather(1, torch.where(ignored, 0, t).unsqueeze(1)).squeeze(1)
    m = m.squeeze(1)
    log_d = torch.log(d)
    return (torch.where(ignored, 0.0, (m - z_t) + log_d), torch.where(ignored, 0.0, m + log_d),
            m, d)


def _forward_stats(x: Tensor, t: Tensor, ignore_index: int, scale: Tensor
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``_forward``'s (nll, lse) and the statistics: (correct, entropy, first argmax); 0 (-1
    for the argmax) where ignored.  The entropy is ``log d - sum_c e_c (z_c - m) / d`` with
    ``e = exp(z - m)`` (a -inf logit adds 0)."""
    ignored = t == ignore_index
    z = x.float() * scale
    m = z.amax(dim=1, keepdim=True)
    zm = z - m
    e = torch.exp(zm)
    d = e.sum(dim=1)
    s = torch.where(e > 0, e * zm, 0.0).sum(dim=1)
    # The first argmax (a NaN's, as torch.argmax), as the least index reaching the max: a
    # min-reduction vectorizes where argmax's does not.
    cols = torch.arange(z.shape[1], device=z.device)
    first = torch.where((z == m) | (z != z), cols, z.shape[1]).amin(dim=1)
    z_t = z.gather(1, torch.where(ignored, 0, t).unsqueeze(1)).squeeze(1)
    m = m.squeeze(1)
    log_d = torch.log(d)
    return (torch.where(ignored, 0.0, (m - z_t) + log_d), torch.where(ignored, 0.0, m + log_d),
            ((first == t) & ~ignored).float(), torch.where(ignored, 0.0, log_d - s / d),
            torch.where(ignored, -1, first))


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
        fn = {"forward": _forward, "forward_stats": _forward_stats, "loss_grad": _loss_grad,
              "grad": _grad_from_stats}[name]
        _COMPILED[name] = torch.compile(fn, dynamic=True)
    return _COMPILED[name]


def applies(logits: Tensor, weight, spec: LossSpec, vocab, stat_grads, grad,
            stats_out=None) -> bool:
    """Whether a pass is a case these loops compute exactly: without a gradient, the loss with
    a logit scale (the temperature), the statistics and batch invariance too; with one, the
    plain loss."""
    if not (_STATE["enabled"] and logits.device.type == "cpu" and logits.dim() == 2
            and logits.dtype in _DTYPES and weight is None and vocab is None
            and stat_grads is None and logits.shape[0] > 0 and logits.shape[1] > 0
            and not (spec.has_smoothing or spec.has_softcap or spec.has_z_loss)
            and not torch.compiler.is_compiling()):
        return False
    if grad is None:
        return (spec.has_entropy == spec.return_stats
                and not (spec.return_stats and stats_out is not None))
    return (grad.dtype == logits.dtype and not (spec.batch_invariant or spec.has_scale
                                                or spec.has_entropy))


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
    if grad is None:
        return _forward_rows(logits, target, spec, stats_out)
    n_rows, n_cols = logits.shape
    aliased = grad.untyped_storage().data_ptr() == logits.untyped_storage().data_ptr()
    # Chunks: the compiled copy into the gradient's rows goes through a temporary of the
    # chunk's size (functionalized), so a whole-tensor call would hold a second gradient and
    # write it twice.
    rows = max(1, CHUNK_ELEMENTS // n_cols)
    ignored_all = target == spec.ignore_index
    safe_all = torch.where(ignored_all, 0, target)
    a_all = torch.where(ignored_all, 0.0, scale.to(torch.float32).expand(n_rows))
    loss = torch.empty(n_rows, dtype=torch.float32)
    lse = torch.empty(n_rows, dtype=torch.float32)
    try:
        for r0 in range(0, n_rows, rows):
            r1 = min(r0 + rows, n_rows)
            x, t, ign = logits[r0:r1], safe_all[r0:r1], ignored_all[r0:r1]
            out = torch.empty_like(x) if aliased else grad[r0:r1]
            if merged is not None:
                m, d = merged[0][r0:r1].float(), merged[1][r0:r1].float()
                log_d = torch.log(d)
                z_t = x.gather(1, t.unsqueeze(1)).squeeze(1).float()
                loss[r0:r1], lse[r0:r1] = (m - z_t) + log_d, m + log_d
                _call("grad", x, t, m, log_d, a_all[r0:r1], ign, out)
            else:
                loss[r0:r1], lse[r0:r1] = _call("loss_grad", x, t, a_all[r0:r1], ign, out)
            if aliased:
                grad[r0:r1].copy_(out)
    except Exception as exc:  # compilation failed: the eager composition is always right
        if r0 != 0:
            raise
        _failed(exc)
        return None
    loss.masked_fill_(ignored_all, 0.0)
    lse.masked_fill_(ignored_all, 0.0)
    return RowResults(loss, lse, *(torch.empty(0, dtype=torch.float32) for _ in range(3)),
                      torch.empty(0, dtype=torch.int64))


def _failed(exc: Exception) -> None:
    _STATE["enabled"] = False
    warnings.warn(f"fusedce: compiling the CPU loss loops failed ({type(exc).__name__}: "
                  f"{exc}); the PyTorch implementation's eager operations run instead",
                  RuntimeWarning, stacklevel=4)


_SCALES: dict[float, Tensor] = {}


def _forward_rows(logits: Tensor, target: Tensor, spec: LossSpec,
                  stats_out: Tensor | None) -> RowResults | None:
    """The forward-only pass: one compiled call over every row (``INVARIANT_ROWS``-row calls
    with ``spec.batch_invariant``), its outputs the results; None when compilation failed."""
    name = "forward_stats" if spec.return_stats else "forward"
    if spec.logit_scale not in _SCALES:  # (a tensor: a new temperature is not a recompile)
        _SCALES[spec.logit_scale] = torch.tensor(spec.logit_scale, dtype=torch.float32)
    args = (spec.ignore_index, _SCALES[spec.logit_scale])
    try:
        if spec.batch_invariant:
            outs = _invariant_calls(name, logits, target, args)
        else:
            outs = _call(name, logits, target, *args)
    except Exception as exc:  # compilation failed: the eager composition is always right
        _failed(exc)
        return None
    def empty() -> Tensor:  # (a custom op's outputs must not alias each other)
        return torch.empty(0, dtype=torch.float32)

    if spec.return_stats:
        nll, lse, correct, entropy, argmax = outs
        return RowResults(nll, lse, empty(), correct, entropy, argmax)
    nll, lse, m, d = outs
    if stats_out is not None:  # the row statistics a recomputing backward takes back
        ignored = target == spec.ignore_index
        stats_out[0, :, 0] = torch.where(ignored, torch.finfo(torch.float32).min, m)
        stats_out[1, :, 0] = torch.where(ignored, 0.0, d)
        stats_out[2:, :, 0] = 0.0
    return RowResults(nll, lse, empty(), empty(), empty(), torch.empty(0, dtype=torch.int64))


# Rows per compiled call with ``batch_invariant``: every call has this shape, so a row's
# result cannot depend on how many rows there are (the last, partial chunk is padded).
INVARIANT_ROWS = 32


def _invariant_calls(name: str, logits: Tensor, target: Tensor, args: tuple) -> tuple:
    """``_call(name, ...)`` over chunks of exactly ``INVARIANT_ROWS`` rows: whole chunks of
    packed rows where they are, others through a padded scratch (padding rows ignored)."""
    n_rows, n_cols = logits.shape
    rows = INVARIANT_ROWS
    packed = logits.stride(0) == n_cols and (n_cols == 1 or logits.stride(1) == 1)
    parts, x_pad, t_pad = [], None, None
    for r0 in range(0, n_rows, rows):
        n = min(rows, n_rows - r0)
        if n == rows and packed:
            parts.append(_call(name, logits[r0:r0 + rows], target[r0:r0 + rows], *args))
            continue
        if x_pad is None:
            x_pad = torch.zeros(rows, n_cols, dtype=logits.dtype)
            t_pad = torch.empty(rows, dtype=torch.int64)
        x_pad[:n].copy_(logits[r0:r0 + n])
        t_pad.fill_(args[0])
        t_pad[:n].copy_(target[r0:r0 + n])
        parts.append(tuple(v[:n] for v in _call(name, x_pad, t_pad, *args)))
    return tuple(torch.cat(vs) for vs in zip(*parts)) if len(parts) > 1 else parts[0]


__all__ = ["CHUNK_ELEMENTS", "INVARIANT_ROWS", "applies", "ce_fwd", "compile_seconds"]
