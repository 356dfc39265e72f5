"""Loss diagnostics: each seed bug is reported with its code and no other; clean batches and a
clean training run report nothing."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import fusedce
from fusedce.diagnostics import LossDiagnosticWarning

V = 500
PAD = 0


def _batch(batch=4, seq=24, pad_left=False, seed=0):
    """Token ids with real lengths 24, 18, 12, 20 (padded with PAD) and the attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row, n in enumerate([24, 18, 12, 20][:batch]):
        if pad_left:
            mask[row, : seq - n] = 0
        else:
            mask[row, n:] = 0
    return ids.masked_fill(mask == 0, PAD), mask


def _labels(ids, mask):
    return ids.masked_fill(mask == 0, -100)


def _check(ids, labels, mask, **kw):
    kw.setdefault("pad_token_id", PAD)
    return fusedce.check_labels(ids, labels, mask, vocab_size=V, **kw)


@pytest.mark.parametrize("pad_left", [False, True])
def test_clean_batches_have_no_finding(pad_left):
    ids, mask = _batch(pad_left=pad_left)
    assert not _check(ids, _labels(ids, mask), mask, eos_token_id=2)
    # Completion-only labels: the prompt masked too.
    labels = _labels(ids, mask)
    labels[:, :5] = -100
    assert not _check(ids, labels, mask)
    # Packed rows (no padding), labels = input ids.
    packed = torch.randint(3, V, (2, 64))
    assert not _check(packed, None, None)


def test_padding_counted():
    """Seed: the attention mask never reached the loss, padding trained on."""
    ids, mask = _batch()
    report = _check(ids, ids, mask, pad_token_id=None)
    assert report.codes == {"padding_counted"}
    with pytest.raises(fusedce.LabelError, match="padding_counted"):
        report.raise_on("error")


def test_labels_shifted_twice_and_never():
    ids, mask = _batch()
    pre = torch.full_like(ids, -100)  # labels shifted by the caller (padding masked)
    pre[:, :-1] = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    assert _check(ids, pre, mask).codes == {"labels_preshifted"}
    # A loss that does not shift, given labels equal to the inputs: copying.
    assert _check(ids, _labels(ids, mask), mask, shift=0).codes == {"labels_unshifted"}
    # ... and given properly shifted labels: clean.
    assert not _check(ids, pre, mask, shift=0)


def test_all_masked():
    ids, mask = _batch()
    labels = torch.full_like(ids, -100)
    report = _check(ids, labels, mask)
    assert report.codes == {"all_ignored"} and report.findings[0].severity == "error"
    labels = _labels(ids, mask)
    labels[1] = -100
    report = _check(ids, labels, mask)
    assert report.codes == {"all_ignored"} and report.findings[0].severity == "warning"


def test_pad_id_learned_as_target():
    """Seed: a model that only writes '!!!!': the pad id 0 dominates the targets."""
    ids, mask = _batch(seq=64)  # padded to a fixed length: most positions are padding
    report = _check(ids, ids, None)  # no mask: every pad position is a counted target
    assert report.codes == {"dominant_target", "pad_id_counted"}
    assert "'!!!!'" in str(report)


def test_pad_equals_eos():
    ids, mask = _batch()
    eos = 2
    ids = ids.clone()
    for row in range(ids.shape[0]):
        n = int(mask[row].sum())
        ids[row, n - 1] = eos  # each row ends with EOS
    labels = _labels(ids, mask).masked_fill(ids == eos, -100)  # a collator masking the pad id
    assert _check(ids, labels, mask, pad_token_id=eos, eos_token_id=eos).codes == {"eos_masked"}


def test_target_out_of_range():
    ids, mask = _batch()
    labels = _labels(ids, mask)
    labels[0, 3] = V + 7
    assert _check(ids, labels, mask).codes == {"target_out_of_range"}


def test_monitor_seed_scenarios():
    ln_v = math.log(V)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        summed = fusedce.LossMonitor(V)
        summed.update(8 * ln_v * 1.02)  # seed: a logged loss summed over 8 accumulation steps
        summed.update(8 * ln_v)  # warned once only
    assert [f.code for f in summed.findings] == ["summed_accumulation"]
    assert len([w for w in caught if issubclass(w.category, LossDiagnosticWarning)]) == 1

    logits = torch.randn(6, V, requires_grad=True)
    empty = fusedce.LossMonitor(V, warn=False)
    loss, stats = fusedce.cross_entropy(logits, torch.full((6,), -100), return_stats=True)
    empty.update(loss, stats)
    assert [f.code for f in empty.findings] == ["empty_micro_batch"]

    bad = fusedce.LossMonitor(V, warn=False)
    nan_logits = logits.detach().clone()
    nan_logits[2, 5] = float("nan")
    loss, stats = fusedce.cross_entropy(nan_logits, torch.arange(6), return_stats=True)
    bad.update(loss, stats)
    assert {f.code for f in bad.findings} == {"non_finite"}

    drift = fusedce.LossMonitor(V, warn=False)
    target = torch.arange(6)
    for scale in (1.0, 1.0, 400.0):
        loss, stats = fusedce.cross_entropy(logits.detach() * scale, target, return_stats=True)
        drift.update(loss, stats)
    assert "lse_drift" in {f.code for f in drift.findings}


def test_monitor_quiet_on_a_healthy_start():
    monitor = fusedce.LossMonitor(V, warn=False)
    logits = torch.randn(32, V) * 0.02
    target = torch.randint(0, V, (32,))
    for _ in range(3):
        loss, stats = fusedce.cross_entropy(logits, target, return_stats=True)
        monitor.update(loss, stats)
    assert monitor.findings == []


def test_trainer_callback_clean_run_and_bad_labels(tmp_path):
    transformers = pytest.importorskip("transformers")
    from fusedce.integrations import transformers as fce_hf

    config = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, pad_token_id=PAD)

    class Rows(torch.utils.data.Dataset):
        def __init__(self, bad: bool):
            ids, mask = _batch(seq=24, seed=1)
            self.items = [{"input_ids": i, "attention_mask": m,
                           "labels": i if bad else _labels(i[None], m[None])[0]}
                          for i, m in zip(ids, mask)]

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

    def train(bad: bool):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config)
        fce_hf.apply(model, diagnose=True)
        callback = fce_hf.DiagnosticsCallback()
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / str(bad)), per_device_train_batch_size=2, max_steps=2,
            logging_steps=1, report_to=[], save_strategy="no", use_cpu=True,
            disable_tqdm=True)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=Rows(bad),
                                       callbacks=[callback])
        trainer.train()
        return model, callback

    with warnings.catch_warnings():
        warnings.simplefilter("error", LossDiagnosticWarning)
        model, callback = train(bad=False)
    assert callback.reports and not any(callback.reports)
    assert model.fusedce_monitor.steps == 2 and model.fusedce_monitor.findings == []
    with pytest.raises(fusedce.LabelError, match="padding_counted"):
        train(bad=True)


def _first_findings(loss, stats) -> list[str]:
    monitor = fusedce.LossMonitor(V, warn=False)
    monitor.update(loss, stats)
    return [f.code for f in monitor.findings]


@pytest.mark.parametrize("per_token", [False, True])
def test_monitor_tells_a_broken_logit_scale_from_a_summed_loss(per_token):
    """A fresh LM head whose logits are blown up 50x (first loss ~10 ln V) is a broken scale,
    not "a sum over 10 accumulation steps"; a summed mean at a sane initialisation (~k ln V
    with near-uniform predictions) is the summed accumulation.  The statistics tell them apart
    (the per-token entropy); without them the finding names both causes."""
    torch.manual_seed(0)
    hidden = torch.randn(64, 32)
    head = torch.nn.Linear(32, V, bias=False)
    target = torch.randint(0, V, (64,))
    reduction = "none" if per_token else "mean"
    loss, stats = fusedce.cross_entropy(head(hidden) * 50, target, reduction=reduction,
                                        return_stats=True)
    ratio = float(loss.detach().mean()) / math.log(V)
    assert ratio > 3
    assert _first_findings(loss, stats) == ["first_loss_high"]
    if per_token:
        return
    loss, stats = fusedce.cross_entropy(head(hidden) * 0.02, target, return_stats=True)
    summed = sum(loss for _ in range(8))  # a logged sum over 8 accumulation steps
    assert _first_findings(summed, stats) == ["summed_accumulation"]
    # Between the multiples of ln V a high first loss is still reported (any ratio > 2).
    assert _first_findings(loss * 2.5, stats) == ["first_loss_high"]
    monitor = fusedce.LossMonitor(V, warn=False)
    monitor.update(float(summed))
    assert [f.code for f in monitor.findings] == ["summed_accumulation"]
    assert "logit scale" in monitor.findings[0].message  # ambiguous without statistics


def test_apply_diagnose_checks_labels_in_the_forward():
    """fce_hf.apply(model, diagnose=True) without the Trainer callback: the model's forward
    sees input_ids, attention_mask and labels together, and the first batches' labels are
    checked there (counted padding is the most common loss bug)."""
    transformers = pytest.importorskip("transformers")
    from fusedce.integrations import transformers as fce_hf

    config = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, pad_token_id=PAD)
    ids, mask = _batch()
    for fused in (False, True):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config)
        fce_hf.apply(model, diagnose=True, fused_linear=fused)
        with pytest.warns(LossDiagnosticWarning, match="padding_counted"):
            model(input_ids=ids, attention_mask=mask, labels=ids)  # padding counted
        assert "padding_counted" in {f.code for f in model.fusedce_monitor.findings}
        fce_hf.revert(model)
        with warnings.catch_warnings():
            warnings.simplefilter("error", LossDiagnosticWarning)
            model(input_ids=ids, attention_mask=mask, labels=ids)  # reverted: no hook
    # A clean batch: nothing found.
    model = transformers.LlamaForCausalLM(config)
    fce_hf.apply(model, diagnose=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LossDiagnosticWarning)
        model(input_ids=ids, attention_mask=mask, labels=_labels(ids, mask))
    assert not [f for f in model.fusedce_monitor.findings if f.code == "padding_counted"]
    fce_hf.revert(model)
