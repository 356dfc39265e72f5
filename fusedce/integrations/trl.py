"""fusedce for TRL: its fused LM head and its GRPO/PPO log-probability helpers.

TRL's trainers (``SFTTrainer``, ``GRPOTrainer``, ``RLOOTrainer``, ...) never ask the model for
logits: they patch it with ``trl.trainer.utils.add_fused_lm_head`` and call
``model(..., labels=labels, fused_lm_head=True)``, which returns per-token ``log_probs`` (and
``entropy``, ``is_top1``) of the next-token labels.  That patch is TRL's extension point for the
loss, so ``apply()`` makes the trainers patch their models with ``add_fused_lm_head`` below: the
same signature and outputs, computed by ``fusedce.shifted_linear_cross_entropy`` from the hidden
states (no logits, no shifted copy of the labels; packed rows never score the next document).
``revert()`` restores TRL's own::

    from fusedce.integrations import trl as fce_trl
    fce_trl.apply()                       # before the trainer is built
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset)

``selective_log_softmax`` and ``entropy_from_logits`` are drop-ins for TRL's helpers of the same
names (from logits), fused, differentiable and batch-invariant.

Requires ``trl`` (``pip install fusedce[trl]``) for ``apply``.
"""

from __future__ import annotations

import functools
import importlib
import types

import torch
from torch import Tensor

import fusedce

from ..functional import call_in_module
from ..shifted import shifted_targets
from .transformers import fused_head_loss, packed_positions

_SUPPORTED_OUTPUTS = ("log_probs", "entropy", "is_top1")
_TRAINER_MODULES = ("sft_trainer", "grpo_trainer", "rloo_trainer", "kto_trainer", "dpo_trainer")
_ORIGINALS: dict[str, object] = {}


def add_fused_lm_head(model, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                      outputs: tuple[str, ...] = ("log_probs",)) -> None:
    """TRL's ``add_fused_lm_head``, computed by fusedce: ``model(..., labels=labels,
    fused_lm_head=True)`` returns TRL's ``FusedCausalLMOutput`` (``loss``, ``log_probs``,
    ``entropy``, ``is_top1``, ``label_mask``; every per-token field 0 where the label is
    ignored, (batch, seq_len - 1) or, with ``shift_labels``, (batch, seq_len)).  Without
    ``fused_lm_head`` the model's own forward runs.  ``log_sum_sq_probs`` and ``mean_logits``
    are not computed (a clear error if asked for); the entropy carries its gradient, as
    TRL's does."""
    from trl.trainer.utils import FusedCausalLMOutput

    unsupported = [name for name in outputs if name not in _SUPPORTED_OUTPUTS]
    if unsupported:
        raise ValueError(f"fusedce's fused LM head computes {_SUPPORTED_OUTPUTS}, not "
                         f"{unsupported}; use TRL's add_fused_lm_head for those")
    original_forward = model.forward
    config = model.config.get_text_config()
    with_stats = "entropy" in outputs or "is_top1" in outputs

    @functools.wraps(type(model).forward)
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None,
                num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            for name, value in (("labels", labels), ("shift_labels", shift_labels),
                                ("num_items_in_batch", num_items_in_batch)):
                if value is not None:
                    kwargs[name] = value
            return original_forward(*args, **kwargs)
        kwargs["use_cache"] = False
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        def head_loss(head, hidden):
            # Inside the head's call: a head wrapped on its own (FSDP2's fully_shard) is
            # gathered for it and its gradient reduce-scattered, as for any other layer.
            weight, bias = head.weight, head.bias
            if cast_lm_head_to_fp32:
                hidden, weight = hidden.float(), weight.float()
                bias = bias.float() if bias is not None else None
            return fused_head_loss(
                hidden, weight, bias, labels, shift_labels, config,
                position_ids=kwargs.get("position_ids"),
                attention_mask=kwargs.get("attention_mask"), reduction="none",
                temperature=temperature, return_stats=with_stats,
                differentiable_stats="entropy" in outputs, out_dtype=torch.float32)

        head = self.get_output_embeddings()
        out = call_in_module(head, head_loss, hidden)
        nll, stats = out if with_stats else (out, None)
        aligned, shift = (labels, 1) if shift_labels is None else (shift_labels, 0)
        aligned = aligned.to(hidden.device)
        positions = packed_positions(kwargs.get("position_ids"), kwargs.get("attention_mask"),
                                     aligned)
        mask = shifted_targets(aligned, shift, position_ids=positions) != -100
        keep = slice(None, -1) if shift else slice(None)  # (batch, seq_len - 1) when shifting
        log_probs = (0.0 - nll)[:, keep]
        mask = mask[:, keep]
        entropy = is_top1 = None
        if stats is not None and "entropy" in outputs:
            entropy = stats.entropy[:, keep]
        if stats is not None and "is_top1" in outputs:
            target = aligned[:, 1:] if shift else aligned
            is_top1 = (stats.argmax[:, keep] == target) & mask
        denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(loss=-log_probs.sum() / denom, log_probs=log_probs,
                                   entropy=entropy, is_top1=is_top1, label_mask=mask)

    model.forward = types.MethodType(forward, model)


def generalized_jsd_loss(student_logits: Tensor, teacher_logits: Tensor,
                         labels: Tensor | None = None, beta: float = 0.5,
                         temperature: float = 1.0, reduction: str = "batchmean",
                         num_items_in_batch=None) -> Tensor:
    """``trl.GKDTrainer.generalized_jsd_loss``'s signature and results, computed by
    ``fusedce.distillation_loss(divergence="jsd")`` in one pass over the logits (no
    log-probability, mixture or per-element KL tensors).  Positions whose label is -100 are
    left out; ``num_items_in_batch`` divides the sum; otherwise ``"batchmean"`` divides it by
    the counted positions (by the first dimension without labels), ``"sum"`` does not, and
    ``"mean"`` divides by the counted positions times the vocabulary (TRL's mean over
    elements).  ``"none"`` returns TRL's per-element divergences of the counted positions,
    computed unfused (a logits-sized result).  The teacher gets no gradient."""
    from ..distill import distillation_loss

    teacher_logits = teacher_logits.detach()
    if reduction == "none":
        return _jsd_per_element(student_logits, teacher_logits, labels, beta, temperature)
    total = distillation_loss(student_logits, teacher_logits, labels, divergence="jsd",
                              beta=beta, temperature=temperature, reduction="sum")
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return total / num_items_in_batch
    counted = (labels != -100).sum() if labels is not None else None
    if reduction == "batchmean":
        denom = counted.clamp(min=1) if counted is not None else max(student_logits.shape[0], 1)
        return total / denom
    if reduction == "sum":
        return total
    if reduction == "mean":
        cells = (counted if counted is not None else student_logits.numel()
                 // student_logits.shape[-1]) * student_logits.shape[-1]
        return total / cells
    raise ValueError(f"reduction must be 'batchmean', 'sum', 'mean' or 'none', got "
                     f"{reduction!r}")


def _jsd_per_element(student: Tensor, teacher: Tensor, labels: Tensor | None, beta: float,
                     temperature: float) -> Tensor:
    """Per-element generalized JSD terms of the counted positions (written from the
    definition: beta * p (log p - log m) + (1 - beta) * q (log q - log m))."""
    import math

    log_q = torch.log_softmax(student / temperature, dim=-1)
    log_p = torch.log_softmax(teacher / temperature, dim=-1)
    if beta == 0:
        out = log_p.exp() * (log_p - log_q)
    elif beta == 1:
        out = log_q.exp() * (log_q - log_p)
    else:
        log_m = torch.logaddexp(log_q + math.log1p(-beta), log_p + math.log(beta))
        out = beta * log_p.exp() * (log_p - log_m) + (1 - beta) * log_q.exp() * (log_q - log_m)
    return out[labels != -100] if labels is not None else out


def apply() -> None:
    """Make TRL's trainers patch their models with fusedce's ``add_fused_lm_head``, and
    ``GKDTrainer`` compute its loss with fusedce's ``generalized_jsd_loss``; a trainer
    that asks for outputs fusedce does not compute (KTO's and DPO's ``mean_logits``,
    ``log_sum_sq_probs``) keeps TRL's own head, for its reference model too.

    A trainer patches its policy first and then its reference model (with the default
    outputs), and compares their log-probabilities (DPO's and KTO's log-ratios, GRPO's KL): both
    sides of a ratio must come from the same head, or the ratio of two equal models is a
    rounding difference instead of exactly 0.  So a call with the default outputs takes the
    head that the trainer's previous call chose."""
    for name in _TRAINER_MODULES:
        try:
            module = importlib.import_module(f"trl.trainer.{name}")
        except ImportError:
            continue
        if hasattr(module, "add_fused_lm_head") and name not in _ORIGINALS:
            original = _ORIGINALS[name] = module.add_fused_lm_head
            module.add_fused_lm_head = _dispatcher(original)
    gkd = _gkd_trainer()
    if gkd is not None and "gkd" not in _ORIGINALS:
        _ORIGINALS["gkd"] = gkd.__dict__["generalized_jsd_loss"]
        gkd.generalized_jsd_loss = staticmethod(generalized_jsd_loss)


def _gkd_trainer():
    """TRL's ``GKDTrainer`` class (under ``trl.experimental`` in recent TRL), or None."""
    import warnings

    for path in ("trl.experimental.gkd.gkd_trainer", "trl.trainer.gkd_trainer"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return importlib.import_module(path).GKDTrainer
        except (ImportError, AttributeError):
            continue
    return None


def _dispatcher(original):
    """TRL's ``add_fused_lm_head`` signature, choosing fusedce's head or TRL's (``original``)
    per trainer: by the outputs asked for, the reference model's call by its policy's."""
    chosen = [None]  # the head of the trainer's last policy call

    def dispatch(model, temperature=1.0, cast_lm_head_to_fp32=False, outputs=("log_probs",)):
        if tuple(outputs) == ("log_probs",) and chosen[0] is not None:
            head = chosen[0]  # a reference model: its policy's head
        else:
            head = add_fused_lm_head if all(o in _SUPPORTED_OUTPUTS for o in outputs) \
                else original
            chosen[0] = head
        head(model, temperature=temperature, cast_lm_head_to_fp32=cast_lm_head_to_fp32,
             outputs=outputs)

    return dispatch


def revert() -> None:
    """Give TRL's trainers back TRL's own fused LM head."""
    for name, original in list(_ORIGINALS.items()):
        if name == "gkd":
            _gkd_trainer().generalized_jsd_loss = original
        else:
            importlib.import_module(f"trl.trainer.{name}").add_fused_lm_head = original
        del _ORIGINALS[name]


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


__all__ = ["add_fused_lm_head", "apply", "entropy_from_logits", "revert",
           "selective_log_softmax"]
