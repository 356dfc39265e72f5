"""fusedce for TRL's GRPO/PPO log-probability helpers.

TRL's trainers compute the policy's per-token log-probabilities with
``trl.trainer.utils.selective_log_softmax(logits, index, temperature)`` and its entropy with
``entropy_from_logits(logits)``.  These drop-ins take the same arguments and give the same
values from one fused pass (``fusedce.token_logprobs``): differentiable, batch-invariant (the
trainer's recomputation equals the rollout's bitwise for one implementation and device), and
without a float32 copy of the logits::

    from fusedce.integrations import trl as fce_trl
    logps = fce_trl.selective_log_softmax(logits, completion_ids, temperature=0.9)

Requires ``trl`` only for comparison (``pip install fusedce[trl]``); the functions themselves
need only fusedce.
"""

from __future__ import annotations

import torch
from torch import Tensor

import fusedce


def selective_log_softmax(logits: Tensor, index: Tensor, temperature: float = 1.0,
                          row_mask: Tensor | None = None) -> Tensor:
    """``log_softmax(logits / temperature).gather(-1, index)`` for (..., C) logits and (...)
    integer ``index``, in float32; rows where ``row_mask`` is False give 0 and no gradient."""
    if index.dim() == logits.dim():
        raise ValueError("fusedce's selective_log_softmax gathers one class per position: "
                         "index must have the logits' shape without the class dimension")
    target = index if row_mask is None else torch.where(row_mask.bool(), index, -100)
    return fusedce.token_logprobs(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                  temperature=temperature).reshape(index.shape)


def entropy_from_logits(logits: Tensor, chunk_size: int = 128) -> Tensor:
    """Each row's Shannon entropy (nats), shape ``logits.shape[:-1]``, float32; differentiable.
    (``chunk_size`` is accepted for TRL's signature; fusedce chunks on its own.)"""
    del chunk_size
    flat = logits.reshape(-1, logits.shape[-1])
    dummy = torch.zeros(flat.shape[0], dtype=torch.int64, device=flat.device)
    _, entropy = fusedce.token_logprobs(flat, dummy, return_entropy=True)
    return entropy.reshape(logits.shape[:-1])


__all__ = ["entropy_from_logits", "selective_log_softmax"]
