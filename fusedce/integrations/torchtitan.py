"""fusedce as a torchtitan loss: the ``BaseLoss`` contract, fused.

torchtitan's losses are ``Configurable`` classes called as
``loss_fn(pred, labels, global_valid_tokens) -> (loss, metrics)``, where ``pred`` is
(batch, seq, vocab) logits (a plain tensor, or a DTensor sharded on the vocabulary under loss
parallelism), ``labels`` (batch, seq) with -100 ignored, and the loss is the sum over tokens
divided by the number of valid tokens of the whole global batch.  ``FusedCrossEntropyLoss`` keeps
that contract: the division happens inside the pass (``num_items_in_batch``, a device tensor
that is never read on the host), so the gradient is written once, already scaled;
``compute_logprobs`` mirrors torchtitan's RL helper (its entropy is a metric, without gradient,
as there).

    from fusedce.integrations.torchtitan import FusedCrossEntropyLoss
    loss_fn = FusedCrossEntropyLoss.Config().build()   # where the trainer builds its loss

Requires ``torchtitan`` (``pip install fusedce[torchtitan]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torchtitan.components.loss import IGNORE_INDEX, BaseLoss

import fusedce


class FusedCrossEntropyLoss(BaseLoss):
    """torchtitan's ``CrossEntropyLoss`` (sum over tokens / global valid tokens), computed by
    ``fusedce.cross_entropy`` in one pass that also writes the gradient."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseLoss.Config):
        global_vocab_size: int | None = None
        """Accepted for torchtitan's configs; the vocabulary is read from the logits."""
        lse_square_scale: float = 0.0
        """z-loss coefficient (PaLM), added per valid token."""
        softcap: float | None = None
        """Gemma-2-style logit soft-capping, or None."""
        inplace_backward: bool = False
        """Write the gradient into the logits' storage (no logits-sized buffer)."""

    def __init__(self, config: Config, *, compile_config=None):
        self.config = config
        self.fn = self._loss  # (torch.compile of the loss: fusedce's passes are custom ops)
        self._maybe_compile(compile_config)

    def _loss(self, pred: Tensor, labels: Tensor, global_valid_tokens: Tensor | None):
        options = dict(ignore_index=IGNORE_INDEX, lse_square_scale=self.config.lse_square_scale,
                       softcap=self.config.softcap, out_dtype=torch.float32)
        if global_valid_tokens is not None:
            options.update(reduction="mean", num_items_in_batch=global_valid_tokens)
        else:
            options.update(reduction="sum")
        from torch.distributed.tensor import DTensor

        if isinstance(pred, DTensor):  # loss parallelism: logits sharded on the vocabulary
            return fusedce.cross_entropy_dtensor(pred.flatten(0, 1), labels.flatten(0, 1),
                                                 **options)
        return fusedce.cross_entropy(pred.flatten(0, 1), labels.flatten(0, 1),
                                     inplace_backward=self.config.inplace_backward, **options)

    def __call__(self, pred: Tensor, labels: Tensor, global_valid_tokens: Tensor | None = None,
                 **kwargs: Any) -> tuple[Tensor, dict[str, Tensor]]:
        del kwargs
        if isinstance(global_valid_tokens, Tensor) and global_valid_tokens.device != pred.device:
            global_valid_tokens = global_valid_tokens.to(pred.device)
        return self.fn(pred, labels, global_valid_tokens), {}


def compute_logprobs(logits: Tensor, labels: Tensor, *, return_entropy: bool = False,
                     temperature: float = 1.0) -> Tensor | tuple[Tensor, Tensor]:
    """torchtitan's ``compute_logprobs`` (per-position log-probabilities, optional entropy as
    a metric without gradient) by ``fusedce.token_logprobs``, batch-invariant."""
    out = fusedce.token_logprobs(logits, labels, temperature=temperature,
                                 return_entropy=return_entropy, ignore_index=IGNORE_INDEX)
    if not return_entropy:
        return out
    logprobs, entropy = out
    return logprobs, entropy.detach()


__all__ = ["FusedCrossEntropyLoss", "compute_logprobs"]
