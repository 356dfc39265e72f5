"""Hugging Face transformers: fusedce as the loss of causal language models.

``causal_lm_loss`` has the signature of transformers' ``ForCausalLMLoss`` and its semantics
(labels shifted left by one, ``num_items_in_batch`` for gradient accumulation), computed as
``fusedce.shifted_cross_entropy`` does (its targets, then one pass over the logits where they
are): the shift is an argument of the loss, so neither the labels nor the logits are padded,
shifted or copied, ``shift_labels`` (already aligned) are honoured,
and packed batches (``position_ids`` restarting at 0, no attention mask, as
``DataCollatorWithFlattening`` makes them) never score a token of the next document; and it
never makes a float32 copy of bf16/fp16 logits (transformers' loss does, doubling the largest
activation; fusedce computes in float32 internally and still returns a float32 loss).

Use it per model, or for every causal-LM model of the process::

    from fusedce.integrations import transformers as fce_hf

    fce_hf.apply(model)      # this model only
    fce_hf.apply(model, fused_linear=True)   # ... and no logits at all: loss from hidden states
    fce_hf.apply()           # every model whose loss_type is causal-LM
    fce_hf.revert()          # undo (fce_hf.revert(model) for one model)

Neither touches ``torch.nn.functional.cross_entropy``: other code keeps PyTorch's loss.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import Tensor

from ..functional import prepare_classes_last
from ..shifted import shifted_targets


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
        **kwargs: other keywords models pass along (ignored, except ``position_ids`` of a
            packed batch without ``attention_mask``), plus fusedce's own
            ``label_smoothing``, ``logit_scale``, ``softcap``, ``lse_square_scale``, ``impl``
            and ``inplace_backward`` when given.

    Returns:
        A float32 scalar loss.
    """
    # Position i is scored against labels[i + 1] (or shift_labels[i], already aligned).
    aligned, shift = (labels, 1) if shift_labels is None else (shift_labels, 0)
    aligned = aligned.to(logits.device)
    if tuple(logits.shape[:-1]) != tuple(aligned.shape):
        logits = logits.reshape(*aligned.shape, vocab_size)  # (tokens, V) of (B, T) labels
    options = {k: kwargs[k] for k in ("label_smoothing", "logit_scale", "softcap",
                                      "lse_square_scale", "impl", "inplace_backward")
               if k in kwargs}
    monitor = kwargs.get("_monitor")
    cu_seqlens = kwargs.get("cu_seq_lens_q")  # padding-free flash-attention batches
    target = shifted_targets(
        aligned, shift,
        position_ids=packed_positions(kwargs.get("position_ids"), kwargs.get("attention_mask"),
                                      aligned),
        cu_seqlens=cu_seqlens if cu_seqlens is not None and aligned.dim() == 2
        and aligned.shape[0] == 1 else None,
        ignore_index=ignore_index)
    # The logits as they are, (batch, seq, vocab) in any layout: one pass, no copy.
    out = prepare_classes_last(logits, target, ignore_index=ignore_index,
                               num_items_in_batch=num_items_in_batch, out_dtype=torch.float32,
                               return_stats=monitor is not None, **options)()
    if monitor is None:
        return out
    loss, stats = out
    monitor.update(loss, stats)
    return loss


def packed_positions(position_ids: Tensor | None, attention_mask: Tensor | None,
                     labels: Tensor) -> Tensor | None:
    """``position_ids`` when they describe packed documents (given without an attention mask,
    the padding-free convention of ``DataCollatorWithFlattening``), else None: a padded batch's
    positions (which skip the padding) keep transformers' semantics."""
    if position_ids is None or attention_mask is not None:
        return None
    if tuple(position_ids.shape) != tuple(labels.shape):
        return None
    return position_ids.to(labels.device)


def _logit_options(config: Any) -> dict[str, Any]:
    """fusedce options for a model's own logit transforms, read from its config: Gemma-2's
    ``final_logit_softcapping``, Cohere's ``logit_scale`` (a product), Granite's
    ``logits_scaling`` (a divisor)."""
    options: dict[str, Any] = {}
    if getattr(config, "final_logit_softcapping", None):
        options["softcap"] = float(config.final_logit_softcapping)
    scale = 1.0
    if getattr(config, "logit_scale", None):
        scale *= float(config.logit_scale)
    if getattr(config, "logits_scaling", None):
        scale /= float(config.logits_scaling)
    if scale != 1.0:
        options["logit_scale"] = scale
    return options


def fused_head_loss(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor | None,
                    shift_labels: Tensor | None, config: Any, *,
                    position_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                    **kwargs: Any):
    """The loss of a causal LM's head from its last hidden states, shared by the fused heads of
    every integration (transformers' ``apply(model, fused_linear=True)``, TRL's
    ``add_fused_lm_head``): next-token targets from ``labels`` (or ``shift_labels``, already
    aligned), packed documents from ``position_ids`` without an attention mask, the model's own
    logit transforms from its config, and ``kwargs`` (``reduction``, ``temperature``,
    statistics, ...) for ``fusedce.shifted_linear_cross_entropy``."""
    from ..shifted import shifted_linear_cross_entropy

    aligned, shift = (labels, 1) if shift_labels is None else (shift_labels, 0)
    aligned = aligned.to(weight.device)
    hidden = hidden.to(weight.device).reshape(*aligned.shape, hidden.shape[-1])
    positions = packed_positions(position_ids, attention_mask, aligned)
    return shifted_linear_cross_entropy(hidden, weight, aligned, shift, position_ids=positions,
                                        linear_bias=bias, **_logit_options(config), **kwargs)


def _fused_forward(self, input_ids=None, attention_mask=None, position_ids=None,
                   past_key_values=None, inputs_embeds=None, labels=None, use_cache=None,
                   logits_to_keep=0, shift_labels=None, **kwargs):
    """A causal LM's forward whose loss comes from the hidden states and the LM head through
    fusedce.linear_cross_entropy: with labels, no logits are made (``logits`` is None)."""
    if labels is None and shift_labels is None:
        return self._fusedce_original_forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
            logits_to_keep=logits_to_keep, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, past_key_values=past_key_values,
                         inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
    # Inside the head's call: a head wrapped on its own (FSDP2's fully_shard) is gathered for
    # it and its gradient reduce-scattered, as for any other layer.
    from ..functional import call_in_module

    loss = call_in_module(
        self.lm_head, lambda head, hidden: fused_head_loss(
            hidden, head.weight, head.bias, labels, shift_labels, self.config,
            position_ids=position_ids, attention_mask=attention_mask,
            num_items_in_batch=kwargs.get("num_items_in_batch")),
        outputs.last_hidden_state).float()
    return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=outputs.past_key_values,
                                  hidden_states=outputs.hidden_states,
                                  attentions=outputs.attentions)


_ORIGINAL_PROPERTY: list[property] = []  # PreTrainedModel.loss_function before apply()


def _label_checker(monitor: Any, config: Any, n_batches: int = 2):
    """A forward pre-hook that runs ``fusedce.check_labels`` on the first ``n_batches``
    batches carrying labels (the model's forward sees ``input_ids``, ``attention_mask`` and
    ``labels`` together; its loss sees only the labels) and reports the findings through
    ``monitor`` (warned once per code): counted padding, labels shifted twice, targets out of
    the vocabulary, ..."""
    from ..diagnostics import check_labels

    def token_id(name: str) -> int | None:
        value = getattr(config, name, None)
        return value if isinstance(value, int) else None

    seen = [0]

    def hook(module, args, kwargs):
        labels, shift = kwargs.get("labels"), 1
        if labels is None and kwargs.get("shift_labels") is not None:
            labels, shift = kwargs["shift_labels"], 0
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if seen[0] >= n_batches or labels is None or not isinstance(input_ids, Tensor) \
                or tuple(input_ids.shape) != tuple(labels.shape):
            return None
        seen[0] += 1
        monitor.report_labels(check_labels(
            input_ids.detach(), labels.detach(), kwargs.get("attention_mask"),
            vocab_size=config.vocab_size, pad_token_id=token_id("pad_token_id"),
            eos_token_id=token_id("eos_token_id"), shift=shift))
        return None

    return hook


def _is_causal_lm_loss(fn: Any) -> bool:
    from transformers.loss import loss_utils

    return fn is loss_utils.ForCausalLMLoss


def _patched_loss_function(original: property) -> property:
    """``PreTrainedModel.loss_function`` that answers ``causal_lm_loss`` wherever transformers'
    own answer is its causal-LM loss; a loss set on a model, and every other loss, unchanged."""

    def getter(self):
        fn = original.fget(self)
        return causal_lm_loss if _is_causal_lm_loss(fn) else fn

    return property(getter, original.fset, original.fdel, original.__doc__)


def apply(model: Any | None = None, *, fused_linear: bool = False,
          diagnose: bool = False) -> None:
    """Make causal-LM models use ``causal_lm_loss``.

    Args:
        model: a ``transformers.PreTrainedModel``: only that model (its ``loss_function``) is
            changed.  None: every model of the process whose loss is transformers' causal-LM
            loss (``ForCausalLM`` and the loss types that share it), now and later, through the
            ``loss_function`` property of ``PreTrainedModel``.  transformers' ``LOSS_MAPPING``
            is left as it is, because ``Trainer`` consults it to count the tokens of
            ``num_items_in_batch`` over the shifted labels.
        fused_linear: (with a model) also replace its forward so that, when labels are given,
            the loss comes from the hidden states and the LM head through
            ``fusedce.linear_cross_entropy`` and no logits are materialised (the output's
            ``logits`` is then None; without labels the model's own forward runs).  The model
            needs a decoder ``model.model`` and a linear ``model.lm_head``.
        diagnose: (with a model) check the labels of the first two batches the model's forward
            receives with ``fusedce.check_labels`` (counted padding, labels shifted twice,
            targets out of the vocabulary, ...) and feed every loss the model computes, with
            its statistics, to a ``fusedce.LossMonitor`` kept as ``model.fusedce_monitor``
            (non-finite values, a first loss far from ln V, a drifting log-sum-exp, empty
            micro-batches, a summed accumulation), each finding warned once and kept in
            ``model.fusedce_monitor.findings``.  It reads the loss on the host each step.
    """
    _patch_trainer_count()
    if model is not None:
        model.loss_function = causal_lm_loss
        if diagnose:
            from ..diagnostics import LossMonitor

            monitor = LossMonitor(model.config.vocab_size)
            model.fusedce_monitor = monitor

            def monitored(logits, labels, vocab_size, **kwargs):
                return causal_lm_loss(logits, labels, vocab_size, _monitor=monitor, **kwargs)

            monitored.fusedce = True
            model.loss_function = monitored
            if "_fusedce_label_hook" not in model.__dict__:
                model._fusedce_label_hook = model.register_forward_pre_hook(
                    _label_checker(monitor, model.config), with_kwargs=True)
        if fused_linear:
            if not (hasattr(model, "model") and isinstance(
                    getattr(model, "lm_head", None), torch.nn.Linear)):
                raise ValueError(
                    f"fused_linear needs a causal LM with .model and a linear .lm_head; "
                    f"{type(model).__name__} has not"
                )
            if "_fusedce_original_forward" not in model.__dict__:
                model._fusedce_original_forward = model.forward
                model.forward = types.MethodType(_fused_forward, model)
        return
    if fused_linear:
        raise ValueError("fused_linear=True needs a model: apply(model, fused_linear=True)")
    if _ORIGINAL_PROPERTY:
        return  # already applied
    from transformers import PreTrainedModel

    original = PreTrainedModel.__dict__["loss_function"]
    _ORIGINAL_PROPERTY.append(original)
    PreTrainedModel.loss_function = _patched_loss_function(original)


_ORIGINAL_COUNT: list[Any] = []  # Trainer._get_num_items_in_batch before apply()


def batch_targets(batch: dict, model: Any) -> Tensor | None:
    """The targets fusedce's loss will score in a Trainer batch (None without labels): the
    labels shifted by one (or ``shift_labels`` as given), cut at packed documents' boundaries
    where the loss sees them (``position_ids`` of a fused-linear model, or ``cu_seq_lens_q``)."""
    labels, shift = (batch.get("labels"), 1) if "shift_labels" not in batch else (
        batch["shift_labels"], 0)
    if not isinstance(labels, Tensor):
        return None
    from ..shifted import shifted_targets

    positions = packed_positions(batch.get("position_ids"), batch.get("attention_mask"),
                                 labels) if "_fusedce_original_forward" in model.__dict__ else None
    cu_seqlens = batch.get("cu_seq_lens_q")
    if cu_seqlens is not None and not (labels.dim() == 2 and labels.shape[0] == 1):
        cu_seqlens = None
    return shifted_targets(labels, shift, position_ids=positions, cu_seqlens=cu_seqlens)


def _patch_trainer_count() -> None:
    """Make ``Trainer`` count ``num_items_in_batch`` as fusedce's loss counts (the same as
    transformers' count except in packed batches, where fusedce does not score the next
    document's first token), for models fusedce is applied to."""
    if _ORIGINAL_COUNT:
        return
    try:
        from transformers import Trainer
    except ImportError:  # transformers without Trainer's dependencies
        return
    original = Trainer._get_num_items_in_batch
    _ORIGINAL_COUNT.append(original)

    def count(self, batch_samples, device):
        model = getattr(self.model, "module", self.model)
        if not is_applied(model):
            return original(self, batch_samples, device)
        proxies = []
        for batch in batch_samples:
            targets = batch_targets(batch, model) if isinstance(batch, dict) else None
            proxies.append(batch if targets is None else {**batch, "shift_labels": targets})
        return original(self, proxies, device)

    Trainer._get_num_items_in_batch = count


def revert(model: Any | None = None) -> None:
    """Undo ``apply`` (for one model, or the process-wide patch)."""
    if model is not None:
        fn = model.__dict__.get("_loss_function")
        if fn is causal_lm_loss or getattr(fn, "fusedce", False):
            del model._loss_function
        model.__dict__.pop("fusedce_monitor", None)
        hook = model.__dict__.pop("_fusedce_label_hook", None)
        if hook is not None:
            hook.remove()
        if "_fusedce_original_forward" in model.__dict__:
            model.forward = model.__dict__.pop("_fusedce_original_forward")
        return
    if _ORIGINAL_PROPERTY:
        from transformers import PreTrainedModel

        PreTrainedModel.loss_function = _ORIGINAL_PROPERTY.pop()
    if _ORIGINAL_COUNT:
        from transformers import Trainer

        Trainer._get_num_items_in_batch = _ORIGINAL_COUNT.pop()


def is_applied(model: Any | None = None) -> bool:
    """Whether ``apply`` is in effect (for this model, or process-wide)."""
    if model is not None:
        fn = model.loss_function
        return fn is causal_lm_loss or getattr(fn, "fusedce", False)
    return bool(_ORIGINAL_PROPERTY)


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


def _callback_base():
    try:
        from transformers import TrainerCallback
    except ImportError:  # transformers missing: the class still imports, unusable
        return object
    return TrainerCallback


class DiagnosticsCallback(_callback_base()):
    """A ``transformers.TrainerCallback`` that checks the labels of the first batches with
    ``fusedce.check_labels`` when training starts, and the logged loss of every step with a
    ``fusedce.LossMonitor``.

    Args:
        n_batches: how many batches of the training data loader to check.
        raise_on: ``"error"`` (default) raises ``fusedce.LabelError`` for label errors before
            the first step; ``"warning"`` raises for warnings too; None only warns.
        tokenizer: gives ``pad_token_id`` and ``eos_token_id`` (else the model's config does).
    """

    def __init__(self, n_batches: int = 2, raise_on: str | None = "error", tokenizer=None):
        self.n_batches, self.raise_on, self.tokenizer = n_batches, raise_on, tokenizer
        self.reports: list = []
        self.monitor = None

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kw):
        import warnings

        from ..diagnostics import LossDiagnosticWarning, LossMonitor, check_labels

        config = model.config
        ids = {name: getattr(self.tokenizer, name, None) if self.tokenizer is not None
               else getattr(config, name, None) for name in ("pad_token_id", "eos_token_id")}
        self.monitor = LossMonitor(config.vocab_size)
        for i, batch in enumerate(train_dataloader or []):
            if i >= self.n_batches:
                break
            report = check_labels(batch["input_ids"], batch.get("labels"),
                                  batch.get("attention_mask"), vocab_size=config.vocab_size,
                                  **ids)
            self.reports.append(report)
            if self.raise_on is not None:
                report.raise_on(self.raise_on)
            for finding in report.findings:
                warnings.warn(f"fusedce [{finding.code}] {finding.message}",
                              LossDiagnosticWarning, stacklevel=2)
        return control

    def on_log(self, args, state, control, logs=None, **kw):
        if self.monitor is not None and logs and "loss" in logs:
            self.monitor.update(float(logs["loss"]))
        return control


__all__ = ["DiagnosticsCallback", "apply", "build_labels", "causal_lm_loss", "is_applied",
           "revert"]
