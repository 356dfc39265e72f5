"""Hugging Face transformers: fusedce as the loss of causal language models.

``causal_lm_loss`` has the signature of transformers' ``ForCausalLMLoss`` and its semantics
(labels shifted left by one, ``num_items_in_batch`` for gradient accumulation), with two
differences that matter for memory: it shifts the labels, never the logits, so the logits are
not copied; and it never makes a float32 copy of bf16/fp16 logits (transformers' loss does,
doubling the largest activation; fusedce computes in float32 internally and still returns a
float32 loss).

Use it per model, or for every causal-LM model of the process::

    from fusedce.integrations import transformers as fce_hf

    fce_hf.apply(model)      # this model only
    fce_hf.apply()           # every model whose loss_type is causal-LM
    fce_hf.revert()          # undo (fce_hf.revert(model) for one model)

Neither touches ``torch.nn.functional.cross_entropy``: other code keeps PyTorch's loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..functional import cross_entropy

# Loss-mapping entries that transformers points at ForCausalLMLoss, with what was there before.
_PATCHED: dict[str, Any] = {}


def causal_lm_loss(
    logits: Tensor,
    labels: Tensor,
    vocab_size: int,
    num_items_in_batch: Tensor | int | None = None,
    ignore_index: int = -100,
    shift_labels: Tensor | None = None,
    **kwargs: Any,
) -> Tensor:
    """Next-token cross-entropy, drop-in for transformers' ``ForCausalLMLoss``.

    Args:
        logits: (batch, seq, vocab_size) or (tokens, vocab_size), any float dtype; read in place.
        labels: (batch, seq) token ids aligned with the inputs (position i is predicted by the
            logits at i - 1), ``ignore_index`` where no loss is wanted (padding, prompt).
        vocab_size: the logits' last dimension.
        num_items_in_batch: total number of counted tokens over all micro-batches of a gradient-
            accumulation step (transformers' Trainer passes it); the loss is then the sum over
            this micro-batch divided by it.  Without it, the mean over counted tokens.
        ignore_index: label value that counts for nothing.
        shift_labels: labels already shifted (then ``labels`` is not used).
        **kwargs: other keywords models pass along (ignored), plus fusedce's own
            ``label_smoothing``, ``logit_scale``, ``softcap``, ``lse_square_scale``, ``impl``
            and ``inplace_backward`` when given.

    Returns:
        A float32 scalar loss.
    """
    if shift_labels is None:
        # The label of position i moves to i - 1; the last position gets ignore_index.  A copy
        # of the labels (small), never of the logits.
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    target = shift_labels.reshape(-1).to(logits.device)
    options = {k: kwargs[k] for k in ("label_smoothing", "logit_scale", "softcap",
                                      "lse_square_scale", "impl", "inplace_backward")
               if k in kwargs}
    return cross_entropy(
        logits.reshape(-1, vocab_size),  # a view for contiguous logits
        target,
        ignore_index=ignore_index,
        num_items_in_batch=num_items_in_batch,
        out_dtype=torch.float32,
        **options,
    )


def _loss_mapping() -> dict[str, Any]:
    from transformers.loss import loss_utils

    return loss_utils.LOSS_MAPPING


def apply(model: Any | None = None) -> None:
    """Make causal-LM models use ``causal_lm_loss``.

    Args:
        model: a ``transformers.PreTrainedModel``: only that model (its ``loss_function``) is
            changed.  None: every entry of transformers' loss mapping that uses its causal-LM
            loss (``ForCausalLM`` and the loss types that share it) is pointed at fusedce, for
            all models of the process, now and later.
    """
    if model is not None:
        model.loss_function = causal_lm_loss
        return
    from transformers.loss import loss_utils

    mapping = _loss_mapping()
    for name, fn in list(mapping.items()):
        if fn is loss_utils.ForCausalLMLoss and name not in _PATCHED:
            _PATCHED[name] = fn
            mapping[name] = causal_lm_loss


def revert(model: Any | None = None) -> None:
    """Undo ``apply`` (for one model, or the process-wide patch)."""
    if model is not None:
        if getattr(model, "_loss_function", None) is causal_lm_loss:
            del model._loss_function
        return
    mapping = _loss_mapping()
    for name, fn in _PATCHED.items():
        if mapping.get(name) is causal_lm_loss:
            mapping[name] = fn
    _PATCHED.clear()


def is_applied(model: Any | None = None) -> bool:
    """Whether ``apply`` is in effect (for this model, or process-wide)."""
    if model is not None:
        return model.loss_function is causal_lm_loss
    return bool(_PATCHED) and _loss_mapping().get("ForCausalLM") is causal_lm_loss


def build_labels(
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    prompt_lengths: Tensor | list[int] | None = None,
    ignore_index: int = -100,
) -> Tensor:
    """Labels for causal-LM training from the inputs: padding (and optionally the prompt) masked.

    Args:
        input_ids: (batch, seq) token ids.
        attention_mask: (batch, seq), 0 at padding (left or right); those positions get
            ``ignore_index``, so padding never counts in the loss.
        prompt_lengths: (batch,) number of prompt tokens at the start of each row's real tokens
            (after any left padding); those positions get ``ignore_index`` too, for a loss on
            the completion only.
        ignore_index: the value used for masked positions.

    Returns:
        (batch, seq) labels aligned with ``input_ids`` (the model shifts them).
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape (batch, seq), got {tuple(input_ids.shape)}")
    labels = input_ids.clone()
    keep = torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids "
                f"shape {tuple(input_ids.shape)}"
            )
        keep &= attention_mask.bool()
    if prompt_lengths is not None:
        lengths = torch.as_tensor(prompt_lengths, device=input_ids.device).reshape(-1, 1)
        if lengths.shape[0] != input_ids.shape[0]:
            raise ValueError(
                f"prompt_lengths has {lengths.shape[0]} entries for {input_ids.shape[0]} rows"
            )
        # Position among the row's real tokens: 0 for the first non-padding token.
        rank = torch.cumsum(keep.long(), dim=1) - 1
        keep &= rank >= lengths
    labels[~keep] = ignore_index
    return labels


__all__ = ["apply", "build_labels", "causal_lm_loss", "is_applied", "revert"]
