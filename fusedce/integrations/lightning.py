"""fusedce in a Lightning ``training_step``.

Lightning has no loss hook: the loss is whatever ``training_step`` returns.  What it does to
that loss matters for a fused backward, though: with ``accumulate_grad_batches=k`` it divides
the loss by ``k``, and a loss-scaling precision plugin (``precision="16-mixed"``) multiplies it,
so ``grad_output`` is not 1 and a gradient stored by the forward would be read and written once
more to scale it.  ``cross_entropy(self, logits, labels, ...)`` picks ``backward="recompute"``
then (the gradient is written once, with ``grad_output`` folded in) and otherwise calls
``fusedce.cross_entropy`` unchanged::

    from fusedce.integrations import lightning as fce_pl

    def training_step(self, batch, batch_idx):
        logits = self.model(batch["input_ids"])
        return fce_pl.cross_entropy(self, logits.flatten(0, 1), batch["labels"].flatten())

Requires ``lightning`` (``pip install fusedce[lightning]``).
"""

from __future__ import annotations

from torch import Tensor

import fusedce


def loss_is_scaled(module) -> bool:
    """Whether Lightning will hand the loss's backward a ``grad_output`` other than 1: gradient
    accumulation, or a precision plugin that scales the loss (a gradient scaler)."""
    trainer = getattr(module, "_trainer", None)
    if trainer is None:
        return False
    if getattr(trainer, "accumulate_grad_batches", 1) > 1:
        return True
    plugin = getattr(trainer, "precision_plugin", None)
    return getattr(plugin, "scaler", None) is not None


def cross_entropy(module, input: Tensor, target: Tensor, **kwargs):
    """``fusedce.cross_entropy(input, target, **kwargs)`` from a ``LightningModule``
    ``module``, with ``backward="recompute"`` when Lightning scales the loss (unless
    ``backward`` is given)."""
    if "backward" not in kwargs and loss_is_scaled(module):
        kwargs["backward"] = "recompute"
    return fusedce.cross_entropy(input, target, **kwargs)


__all__ = ["cross_entropy", "loss_is_scaled"]
