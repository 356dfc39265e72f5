"""Loss diagnostics: the label and loss bugs that cost training runs, reported before they do.

``check_labels`` inspects one batch of token ids and labels (no model needed): padding counted
in the loss, labels shifted twice or never, batches with nothing to learn, an EOS that is always
masked, targets out of the vocabulary, and one id (often the pad id: a model that only writes
"!!!!") dominating the targets.  ``LossMonitor`` watches the loss (and ``CrossEntropyStats``)
step by step: a first loss far from ln V, non-finite values, a log-sum-exp drifting upward,
micro-batches without a counted token, and a logged loss that is a sum over accumulation steps.
Each finding is reported once, with its numbers and the likely cause.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Literal

import torch
from torch import Tensor

Severity = Literal["warning", "error"]
_RANK = {"warning": 0, "error": 1}


class LabelError(ValueError):
    """Raised by ``LabelReport.raise_on`` for findings at or above the asked severity."""


class LossDiagnosticWarning(UserWarning):
    """A diagnostic finding, warned once."""


@dataclasses.dataclass(frozen=True)
class Finding:
    code: str
    severity: Severity
    message: str
    count: int = 0


@dataclasses.dataclass
class LabelReport:
    """What ``check_labels`` found in one batch (``findings`` is empty for a clean batch)."""

    findings: list[Finding]
    counted: int  # targets the loss counts

    @property
    def codes(self) -> set[str]:
        return {f.code for f in self.findings}

    def __bool__(self) -> bool:  # a report is "truthy" when something was found
        return bool(self.findings)

    def __str__(self) -> str:
        if not self.findings:
            return f"labels look right ({self.counted} counted targets)"
        return "\n".join(f"[{f.severity}] {f.code}: {f.message}" for f in self.findings)

    def raise_on(self, severity: Severity = "error") -> LabelReport:
        """Raise ``LabelError`` listing the findings at or above ``severity``; else return
        the report."""
        bad = [f for f in self.findings if _RANK[f.severity] >= _RANK[severity]]
        if bad:
            raise LabelError("\n".join(f"{f.code}: {f.message}" for f in bad))
        return self


def _as_2d(t: Tensor | None, name: str) -> Tensor | None:
    if t is None:
        return None
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    return t.reshape(1, -1) if t.dim() == 1 else t


def check_labels(
    input_ids: Tensor,
    labels: Tensor | None = None,
    attention_mask: Tensor | None = None,
    *,
    vocab_size: int,
    pad_token_id: int | None = None,
    eos_token_id: int | None = None,
    ignore_index: int = -100,
    shift: int = 1,
    dominant_share: float = 0.5,
) -> LabelReport:
    """Cheap checks of one batch's labels, as the loss will use them.

    Args:
        input_ids: (batch, seq) token ids.
        labels: (batch, seq) labels aligned with ``input_ids`` as the model receives them
            (``ignore_index`` where nothing is learned); None: the input ids themselves.
        attention_mask: (batch, seq), 0 at padding.
        vocab_size: the model's vocabulary.
        pad_token_id, eos_token_id: the tokenizer's, when known.
        ignore_index: the label value that counts for nothing.
        shift: how far the loss shifts the labels (1: position t is scored against label t + 1,
            as transformers' causal-LM loss does; 0: the labels are already the targets).
        dominant_share: share of counted targets above which one id is reported.

    Returns:
        A ``LabelReport``; ``report.raise_on("error")`` turns errors into ``LabelError``.
    """
    ids = _as_2d(input_ids, "input_ids")
    lab = _as_2d(labels, "labels") if labels is not None else ids
    mask = _as_2d(attention_mask, "attention_mask")
    if lab.shape != ids.shape or (mask is not None and mask.shape != ids.shape):
        raise ValueError(f"input_ids {tuple(ids.shape)}, labels {tuple(lab.shape)} and "
                         f"attention_mask {None if mask is None else tuple(mask.shape)} differ")
    lab = lab.long()
    used = torch.zeros_like(lab, dtype=torch.bool)  # label positions the loss reads
    used[:, shift:] = True
    counted = used & (lab != ignore_index)
    n_counted = int(counted.sum())
    findings: list[Finding] = []

    def add(code: str, severity: Severity, message: str, count: int = 0) -> None:
        findings.append(Finding(code, severity, message, count))

    bad = counted & ((lab < 0) | (lab >= vocab_size))
    if bad.any():
        add("target_out_of_range", "error",
            f"{int(bad.sum())} counted labels are outside [0, {vocab_size}) (largest "
            f"{int(lab[bad].max())}): the embedding was resized, or the wrong tokenizer is used",
            int(bad.sum()))
    if mask is not None:
        padded = counted & (mask == 0)
        if padded.any():
            add("padding_counted", "error",
                f"{int(padded.sum())} labels at padding positions (attention_mask 0) are "
                f"counted: set them to {ignore_index} (fusedce.integrations.transformers."
                f"build_labels does)", int(padded.sum()))
    empty_rows = int((~counted.any(dim=1)).sum())
    if n_counted == 0:
        add("all_ignored", "error",
            f"no label of the batch is counted (all {ignore_index} or padding): the mean loss "
            f"is 0/0 (NaN in PyTorch, 0 in fusedce) and nothing is learned", lab.shape[0])
    elif empty_rows:
        add("all_ignored", "warning",
            f"{empty_rows} of {lab.shape[0]} rows have no counted label (fully masked "
            f"prompts or padding rows)", empty_rows)
    _check_shift(ids, lab, counted, shift, ignore_index, add)
    if (eos_token_id is not None and pad_token_id is not None
            and eos_token_id == pad_token_id):
        eos_positions = used & (ids == eos_token_id) & (mask != 0 if mask is not None else True)
        if eos_positions.any() and not (counted & (lab == eos_token_id)).any():
            add("eos_masked", "warning",
                f"pad_token_id == eos_token_id ({eos_token_id}) and every EOS label is ignored: "
                f"the model never learns to stop (give padding its own id, or unmask the first "
                f"EOS of each row)", int(eos_positions.sum()))
    if pad_token_id is not None and pad_token_id != eos_token_id:
        pads = counted & (lab == pad_token_id)
        if pads.any():
            add("pad_id_counted", "warning",
                f"the pad id {pad_token_id} is counted as a target {int(pads.sum())} times",
                int(pads.sum()))
    if n_counted >= 16:
        values, counts = torch.unique(lab[counted], return_counts=True)
        top = int(counts.argmax())
        share = float(counts[top]) / n_counted
        if share > dominant_share:
            token = int(values[top])
            why = (" (the pad id: a model trained on it writes only that token, the '!!!!' "
                   "pattern)" if token in (pad_token_id, 0) else "")
            add("dominant_target", "warning",
                f"id {token} is {share:.0%} of the {n_counted} counted targets{why}",
                int(counts[top]))
    return LabelReport(findings, n_counted)


def _check_shift(ids: Tensor, lab: Tensor, counted: Tensor, shift: int, ignore_index: int,
                 add) -> None:
    """Labels shifted by the caller although the loss shifts again, or labels equal to the
    inputs where the loss does not shift."""
    if ids.shape[1] < 3:
        return
    if shift == 1:
        # labels[t] == input_ids[t + 1]: already shifted; the loss will train next-next token.
        pre = counted[:, :-1] & (lab[:, :-1] == ids[:, 1:])
        same = counted & (lab == ids)
        n = int(counted[:, :-1].sum())
        if n >= 8 and int(pre.sum()) >= 0.9 * n and int(same.sum()) < 0.5 * n:
            add("labels_preshifted", "error",
                f"{int(pre.sum())} of {n} counted labels equal the next input id: the labels "
                f"are already shifted and the loss shifts them again (next-next-token "
                f"training); pass labels aligned with input_ids", int(pre.sum()))
    elif shift == 0:
        same = counted & (lab == ids)
        n = int(counted.sum())
        if n >= 8 and int(same.sum()) >= 0.9 * n:
            add("labels_unshifted", "error",
                f"{int(same.sum())} of {n} counted labels equal the input id at the same "
                f"position and the loss does not shift: the model learns to copy its input; "
                f"shift the labels (or use shift=1)", int(same.sum()))


class LossMonitor:
    """Watches each step's loss (and ``CrossEntropyStats``) and reports each finding once.

    Args:
        vocab_size: V, for the ln V a fresh model's loss should start near.
        warn: warn each new finding (``LossDiagnosticWarning``); findings are kept in
            ``self.findings`` either way.
        lse_drift: how far (in units of ln V) the mean log-sum-exp may rise above its first
            value before it is reported.

    ``update(loss, stats=None, *, counted=None)`` reads the values on the host (a
    synchronisation on a GPU: call it every few steps there).
    """

    def __init__(self, vocab_size: int, *, warn: bool = True, lse_drift: float = 1.0):
        self.ln_v = math.log(vocab_size)
        self.warn = warn
        self.lse_drift = lse_drift
        self.findings: list[Finding] = []
        self.steps = 0
        self._first_lse: float | None = None
        self._seen: set[str] = set()

    def _report(self, code: str, severity: Severity, message: str, count: int = 0) -> None:
        if code in self._seen:
            return
        self._seen.add(code)
        finding = Finding(code, severity, message, count)
        self.findings.append(finding)
        if self.warn:
            warnings.warn(f"fusedce [{code}] {message}", LossDiagnosticWarning, stacklevel=3)

    def report_labels(self, report: LabelReport) -> None:
        """Record (and warn, once per code) the findings of a ``check_labels`` report."""
        for finding in report.findings:
            self._report(finding.code, finding.severity, finding.message, finding.count)

    def update(self, loss: Tensor | float, stats=None, *, counted: int | None = None
               ) -> list[Finding]:
        """Check one step; return the findings new at this step."""
        before = len(self.findings)
        lse_sum = bad = 0
        entropy_sum = None
        per_token = isinstance(loss, Tensor) and loss.numel() > 1  # reduction="none"
        if stats is not None:
            # One read from the device for everything this step needs.
            lse = stats.lse.detach().float()
            loss_t = loss.detach().float() if isinstance(loss, Tensor) \
                else torch.tensor(float(loss))
            if per_token:  # the mean over counted tokens (ignored ones are 0)
                loss_t = loss_t.sum() / (lse != 0).sum().clamp_min(1)
            entropy = getattr(stats, "entropy", None)
            has_entropy = entropy is not None and entropy.numel() == lse.numel()
            entropy_t = entropy.detach().float().sum() if has_entropy else lse.new_zeros(())
            value, lse_sum, nonzero, bad, entropy_sum = torch.stack([
                loss_t.mean().to(lse.device), lse.sum(), (lse != 0).sum().float(),
                (~torch.isfinite(lse)).sum().float(), entropy_t.to(lse.device)]).tolist()
            counted = int(nonzero) if counted is None else counted
            bad = int(bad)
            entropy_sum = entropy_sum if has_entropy else None
        else:
            value = float(loss.detach().float().mean()) if isinstance(loss, Tensor) \
                else float(loss)
        if not math.isfinite(value) or bad:
            self._report("non_finite", "error",
                         f"step {self.steps}: loss {value} ({bad} tokens with a non-finite "
                         f"log-sum-exp): overflow in the logits or NaN from masking", bad)
        if counted == 0:
            self._report("empty_micro_batch", "warning",
                         f"step {self.steps}: a micro-batch with no counted token (every label "
                         f"ignored): its loss is 0 and teaches nothing")
        if self.steps == 0 and math.isfinite(value) and counted != 0:
            mean_entropy = entropy_sum / counted if entropy_sum is not None and counted else None
            self._first_step(value, stats, mean_entropy, per_token)
        if stats is not None and counted and not bad:
            mean = lse_sum / counted
            if self._first_lse is None:
                self._first_lse = mean
            elif mean - self._first_lse > self.lse_drift * self.ln_v:
                self._report("lse_drift", "warning",
                             f"step {self.steps}: mean log-sum-exp {mean:.1f}, up from "
                             f"{self._first_lse:.1f}: the logits are growing (a z-loss, "
                             f"lse_square_scale=1e-4, keeps them in check)")
        self.steps += 1
        return self.findings[before:]

    def _first_step(self, value: float, stats, mean_entropy: float | None,
                    per_token: bool) -> None:
        """A first loss several times ln V has two common causes that the loss alone cannot
        tell apart: a logged sum over k accumulation steps of a sane per-token loss (~ln V at
        a fresh initialisation), or a broken initialisation or logit scale (every per-token
        loss large).  The statistics can: a fresh model's predictions are near uniform, so its
        per-token entropy is near ln V and each token's loss near ln V, which a sum over k steps
        only multiplies; logits blown up by a bad scale give peaked predictions (entropy far
        below ln V) that are confidently wrong.  A per-token loss (``reduction="none"``) is
        never a sum over steps."""
        ratio = value / self.ln_v
        k = round(ratio)
        near_multiple = k >= 2 and abs(ratio - k) <= 0.15 * k
        if ratio <= 1.5 and not near_multiple:
            high = False
        elif per_token:
            high, why = True, "each token's loss is itself this high"
        elif mean_entropy is not None:
            share = mean_entropy / self.ln_v
            if near_multiple and share >= 0.5:
                self._report("summed_accumulation", "warning",
                             f"the first loss {value:.2f} is {ratio:.1f} x ln V "
                             f"({self.ln_v:.2f}) while the predictions are near uniform "
                             f"(mean entropy {mean_entropy:.2f}, {share:.0%} of ln V, as at a "
                             f"fresh initialisation): a sum over {k} gradient-accumulation "
                             f"steps, not a mean (divide by the steps, or pass "
                             f"num_items_in_batch)")
                high = False
            else:
                high = ratio > 1.5
                why = (f"the predictions are peaked (mean entropy {mean_entropy:.2f}, "
                       f"{share:.0%} of ln V) and confidently wrong, which a sum over "
                       f"accumulation steps of a sane loss would not make")
        elif near_multiple:
            self._report("summed_accumulation", "warning",
                         f"the first loss {value:.2f} is {ratio:.1f} x ln V ({self.ln_v:.2f}): "
                         f"a sum over {k} gradient-accumulation steps, not a mean (divide by "
                         f"the steps, or pass num_items_in_batch), or else a broken "
                         f"initialisation or logit scale; pass the loss's statistics "
                         f"(return_stats=True) to tell the two apart")
            high = False
        else:
            high = ratio > 2.0
            why = "with no statistics to tell whether the predictions are peaked"
        if high:
            self._report("first_loss_high", "warning",
                         f"the first loss {value:.2f} is {ratio:.1f} x ln V ({self.ln_v:.2f}): "
                         f"a broken initialisation or logit scale ({why})")
        accuracy = float(stats.accuracy) if stats is not None and stats.accuracy.numel() else None
        # (A fine-tuned model starts well below ln V; only a near-zero loss with near-perfect
        # accuracy from the first step says the answer is in the input.)
        if ratio < 0.05 and accuracy is not None and accuracy > 0.9:
            self._report("first_loss_low", "warning",
                         f"the first loss {value:.2f} is far below ln V ({self.ln_v:.2f})"
                         + (f" with accuracy {accuracy:.0%}" if accuracy is not None else "")
                         + ": the labels may leak into the inputs")


__all__ = ["Finding", "LabelError", "LabelReport", "LossDiagnosticWarning", "LossMonitor",
           "check_labels"]
