"""The training steps the model analyses: fusedce in every mode, and Liger-Kernel's
cross-entropy (imported from its package) in the modes it has.

A workload builds its inputs for (rows, cols, dtype) and runs one step through the public API,
whatever runs the kernels: Triton's interpreter (traffic), or recorders that only capture the
launches (code).  Logits are activations (the LM head's output), not leaves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

import fusedce
from bench.contenders import _Activation
from fusedce.spec import LossSpec, RowStats, VocabSlice

SCALE = 1.0 / 8  # grad_output of the scaled modes (gradient accumulation over 8 micro-batches)


@dataclasses.dataclass(frozen=True)
class Workload:
    contender: str  # "fusedce" or "liger"
    mode: str
    description: str
    step: Callable[[Tensor, Tensor, Tensor | None], object]  # (logits, target, grad_output)
    go: str | None = None  # grad_output: None (1, made by autograd), "scaled", "per_token"
    few_rows: bool = False  # the headline uses 64 rows (fusedce's split-vocabulary path)
    linear: bool = False  # hidden states and an LM head instead of logits
    distill: bool = False  # (student logits, teacher logits) instead of logits

    @property
    def name(self) -> str:
        return f"{self.contender}:{self.mode}"

    def grad_output(self, rows: int, dtype: torch.dtype) -> Tensor | None:
        """The backward's grad_output, made before the step (not counted as the step's)."""
        if self.go == "scaled":
            return torch.tensor(SCALE, dtype=dtype)
        if self.go == "per_token":
            return torch.linspace(0.5, 1.5, rows, dtype=dtype)
        return None


def _ce(x, t, **kw):
    return fusedce.cross_entropy(_Activation.apply(x), t, impl="triton", **kw)


def _fwd(x, t, go):
    with torch.no_grad():
        fusedce.cross_entropy(x, t, impl="triton")


def _fwd_bwd(**kw):
    def step(x, t, go):
        _ce(x, t, **kw).backward(go)
    return step


def _none_bwd(x, t, go):
    _ce(x, t, reduction="none").backward(go)


def _vocab_parallel(x, t, go):
    """One rank's launches of the vocabulary-parallel loss (the collectives aside): its slice's
    statistics, then its loss and gradient pass from the merged statistics."""
    from fusedce.kernels import ce_fwd, ce_row_stats

    spec = LossSpec(impl="triton")
    stats = ce_row_stats(x, t, None, spec)
    pm, pd, psz, pe = stats.partials
    m = pm.amax(dim=1)
    merged = RowStats(torch.stack([m, (pd * torch.exp(pm - m[:, None])).sum(1), psz.sum(1),
                                   pe.sum(1)]).unsqueeze(2), stats.argmax)
    vocab = VocabSlice(0, 2 * x.shape[1], torch.zeros(x.shape[0]), None)
    grad = torch.empty_like(x)
    ce_fwd(x, t, None, None, torch.ones(1), spec, grad, row_stats=merged, vocab=vocab)


def _stats_grad(x, t, go):
    """Per-token loss, lse and entropy all carrying gradients (an RL objective with an entropy
    bonus): the forward reads the logits, the backward reads them and writes the gradient."""
    loss, stats = _ce(x, t, reduction="none", return_stats=True, differentiable_stats=True)
    (loss * go + 0.01 * stats.entropy + 1e-4 * stats.lse).sum().backward()


def _linear(x, t, go):
    """Hidden states (rows, 256) and an LM head (cols, 256): the chunked pass."""
    hidden, head = x
    loss = fusedce.linear_cross_entropy(hidden, head, t, impl="triton")
    loss.backward()


def _stats(x, t, go):
    """Forward + backward with the statistics (accuracy, entropy, argmax) beside the loss."""
    loss, _ = _ce(x, t, return_stats=True)
    loss.backward(go)


def _distill(divergence: str):
    """Distillation against a teacher given as logits (the Triton kernel): the student's
    logits are an activation, the teacher's a constant."""
    def step(x, t, go):
        student, teacher = x
        loss = fusedce.distillation_loss(_Activation.apply(student), teacher, impl="triton",
                                         divergence=divergence)
        loss.backward()
    return step


def _soft_targets(x, t, go):
    """Cross-entropy against class probabilities of the logits' shape (the Triton kernel):
    the logits are an activation, the probabilities a constant."""
    logits, probs = x
    loss = fusedce.cross_entropy(_Activation.apply(logits), probs, impl="triton")
    loss.backward()


def _liger(backward: bool, reduction: str = "mean", accuracy: bool = False):
    def step(x, t, go):
        from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction

        extra = (None, False, True, True) if accuracy else ()  # softcap, z-loss, accuracy
        if not backward:
            with torch.no_grad():
                LigerCrossEntropyFunction.apply(x.detach(), t, None, -100, 0.0, 0.0, "mean",
                                                *extra)
            return
        logits = _Activation.apply(x)
        loss = LigerCrossEntropyFunction.apply(logits, t, None, -100, 0.0, 0.0, reduction,
                                               *extra)[0]
        loss.backward(go)
    return step


WORKLOADS = [
    Workload("fusedce", "fwd", "forward only", _fwd),
    Workload("fusedce", "fwd_bwd", "forward + backward, grad_output 1", _fwd_bwd()),
    Workload("fusedce", "fwd_bwd_scaled", "grad_output 1/8, stored backward", _fwd_bwd(),
             go="scaled"),
    Workload("fusedce", "fwd_bwd_scaled_recompute", "grad_output 1/8, backward='recompute'",
             _fwd_bwd(backward="recompute"), go="scaled"),
    Workload("fusedce", "none_bwd", "reduction='none', per-token grad_output (recompute)",
             _none_bwd, go="per_token"),
    Workload("fusedce", "inplace", "grad_output 1, inplace_backward=True",
             _fwd_bwd(inplace_backward=True)),
    Workload("fusedce", "few_rows", "64 rows, grad_output 1 (split vocabulary)", _fwd_bwd(),
             few_rows=True),
    Workload("fusedce", "few_rows_invariant", "64 rows, grad_output 1, batch_invariant=True "
             "(no split)", _fwd_bwd(batch_invariant=True), few_rows=True),
    Workload("fusedce", "stats", "grad_output 1, return_stats=True (accuracy, entropy, argmax)",
             _stats),
    Workload("fusedce", "stats_grad", "reduction='none' with differentiable lse and entropy",
             _stats_grad, go="per_token"),
    Workload("fusedce", "vocab_parallel", "one rank of two: statistics, then loss and gradient",
             _vocab_parallel),
    Workload("fusedce", "linear", "fused linear chunks (hidden 256), grad_output 1", _linear,
             linear=True),
    Workload("fusedce", "distill_fkl", "distillation, forward KL against teacher logits, "
             "forward + backward", _distill("forward_kl"), distill=True),
    Workload("fusedce", "distill_jsd", "distillation, generalized JSD (beta 0.5) against "
             "teacher logits, forward + backward", _distill("jsd"), distill=True),
    Workload("fusedce", "soft_targets", "class-probability targets of the logits' shape, "
             "forward + backward", _soft_targets, distill=True),
    Workload("liger", "fwd", "forward only", _liger(False)),
    Workload("liger", "fwd_bwd", "forward + backward, grad_output 1", _liger(True)),
    Workload("liger", "fwd_bwd_scaled", "grad_output 1/8", _liger(True), go="scaled"),
    Workload("liger", "none_bwd", "reduction='none', per-token grad_output",
             _liger(True, "none"), go="per_token"),
    Workload("liger", "stats", "grad_output 1, return_token_accuracy and "
             "return_predicted_tokens (its accuracy variant: no entropy)",
             _liger(True, accuracy=True)),
]


def liger_available() -> str | None:
    try:
        import liger_kernel.ops.cross_entropy  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means "not here"
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    return None


def make_inputs(workload: Workload, rows: int, cols: int, dtype: torch.dtype,
                generator: torch.Generator):
    """(x, target): logits (rows, cols) requiring grad, or (hidden, head) for linear."""
    target = torch.randint(0, cols, (rows,), generator=generator)  # none ignored, as in bench
    if workload.linear:
        hidden = torch.randn(rows, 256, generator=generator).to(dtype).requires_grad_()
        head = (torch.randn(cols, 256, generator=generator) * 0.05).to(dtype).requires_grad_()
        return (hidden, head), target
    x = (torch.randn(rows, cols, generator=generator) * 3).to(dtype)
    if workload.distill:
        teacher = (torch.randn(rows, cols, generator=generator) * 3).to(dtype)
        return (x.requires_grad_(), teacher), target
    if workload.mode != "vocab_parallel":
        x.requires_grad_()
    return x, target
