"""fusedce as the loss of a transformers causal LM: same losses and gradients as transformers'
own loss, over training steps, with padding, and with gradient accumulation through Trainer."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from fusedce.integrations import transformers as fce_hf  # noqa: E402
from fusedce.testing import rel_err  # noqa: E402

VOCAB = 211


def _tiny_model(seed: int = 0):
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).float()


def _batch(batch: int = 3, seq: int = 12, pad_left: bool = False):
    input_ids = torch.randint(0, VOCAB, (batch, seq))
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    lengths = [seq, seq - 4, seq - 7][:batch]
    for row, n in enumerate(lengths):
        if pad_left:
            attention_mask[row, : seq - n] = 0
        else:
            attention_mask[row, n:] = 0
    input_ids[attention_mask == 0] = 0
    return input_ids, attention_mask


def _backward_and_compare(out, ref_out, model, ref_model):
    """Backward through both models: the same loss and the same gradient of every parameter."""
    ref_out.loss.backward()
    out.loss.backward()
    assert rel_err(out.loss, ref_out.loss) <= 1e-5
    for (name, p), p_ref in zip(model.named_parameters(), ref_model.parameters()):
        assert rel_err(p.grad, p_ref.grad) <= 1e-4, name


@pytest.fixture(autouse=True)
def _clean_patch():
    yield
    fce_hf.revert()


def test_causal_lm_loss_matches_transformers():
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits = torch.randn(2, 9, VOCAB, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.randint(0, VOCAB, (2, 9))
    labels[1, 5:] = -100
    for num_items in (None, torch.tensor(11)):
        ours = fce_hf.causal_lm_loss(logits, labels, VOCAB, num_items_in_batch=num_items)
        (g_ours,) = torch.autograd.grad(ours, logits)
        ref = ForCausalLMLoss(logits, labels, VOCAB, num_items_in_batch=num_items)
        (g_ref,) = torch.autograd.grad(ref, logits)
        assert ours.dtype == torch.float32
        assert rel_err(ours, ref) <= 1e-5
        assert rel_err(g_ours, g_ref) <= 1e-2


def test_no_float32_copy_of_the_logits(monkeypatch):
    """bf16 logits are never upcast whole (transformers' loss upcasts them all): the PyTorch
    implementation's eager composition converts one cache-sized chunk at a time.  (Its compiled
    CPU loops, off here, convert nothing: each element goes to float32 in registers.)"""
    from transformers.loss.loss_utils import ForCausalLMLoss

    from fusedce import cpu_fused

    monkeypatch.setitem(cpu_fused._STATE, "enabled", False)

    logits = torch.randn(8, 2000, VOCAB, dtype=torch.bfloat16)  # several chunks
    labels = torch.randint(0, VOCAB, (8, 2000))
    converted = []
    real_float, real_to = torch.Tensor.float, torch.Tensor.to

    def spy_float(self, *a, **k):
        converted.append(self.numel())
        return real_float(self, *a, **k)

    def spy_to(self, *a, **k):
        out = real_to(self, *a, **k)
        if self.dtype == torch.bfloat16 and out.dtype == torch.float32:
            converted.append(self.numel())
        return out

    torch.Tensor.float, torch.Tensor.to = spy_float, spy_to
    try:
        fce_hf.causal_lm_loss(logits, labels, VOCAB)
        ours = max(converted)
        converted.clear()
        ForCausalLMLoss(logits, labels, VOCAB)
        theirs = max(converted)
    finally:
        torch.Tensor.float, torch.Tensor.to = real_float, real_to
    assert theirs == logits.numel()
    assert ours < logits.numel() // 2


@pytest.mark.parametrize("per_model", [True, False])
def test_training_steps_match_transformers(per_model):
    """Several optimizer steps with padding: the same losses and parameter gradients."""
    ref_model = _tiny_model()
    model = copy.deepcopy(ref_model)
    if per_model:
        fce_hf.apply(model)
        assert fce_hf.is_applied(model) and not fce_hf.is_applied(ref_model)
    else:
        fce_hf.apply()
        assert fce_hf.is_applied()
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(3):
        input_ids, attention_mask = _batch(pad_left=step % 2 == 1)
        labels = fce_hf.build_labels(input_ids, attention_mask)
        if not per_model:
            fce_hf.revert()
        ref_out = ref_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        if not per_model:
            fce_hf.apply()
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        _backward_and_compare(out, ref_out, model, ref_model)
        ref_opt.step()
        opt.step()
        ref_opt.zero_grad()
        opt.zero_grad()
    fce_hf.revert(model)
    fce_hf.revert()
    assert not fce_hf.is_applied(model) and not fce_hf.is_applied()


def test_revert_restores_transformers_loss():
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss

    model = _tiny_model()
    fce_hf.apply()
    fce_hf.apply()  # twice is harmless
    assert model.loss_function is fce_hf.causal_lm_loss
    assert LOSS_MAPPING["ForCausalLM"] is ForCausalLMLoss  # Trainer reads the mapping
    fce_hf.revert()
    assert model.loss_function is ForCausalLMLoss
    assert torch.nn.functional.cross_entropy.__module__ == "torch.nn.functional"


def test_build_labels():
    input_ids = torch.tensor([[5, 6, 7, 8, 0, 0], [0, 0, 9, 10, 11, 12]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]])
    labels = fce_hf.build_labels(input_ids, mask)
    assert labels.tolist() == [[5, 6, 7, 8, -100, -100], [-100, -100, 9, 10, 11, 12]]
    completion = fce_hf.build_labels(input_ids, mask, prompt_lengths=[2, 3])
    assert completion.tolist() == [[-100, -100, 7, 8, -100, -100],
                                   [-100, -100, -100, -100, -100, 12]]
    with pytest.raises(ValueError, match="does not match"):
        fce_hf.build_labels(input_ids, mask[:, :3])


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n: int = 8, seq: int = 10, seed: int = 3):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(n):
            ids = torch.randint(1, VOCAB, (seq,), generator=g)
            mask = torch.ones(seq, dtype=torch.long)
            mask[seq - (i % 4) * 2:] = 0  # rows of different real lengths
            ids[mask == 0] = 0
            self.items.append({"input_ids": ids, "attention_mask": mask,
                               "labels": fce_hf.build_labels(ids[None], mask[None])[0]})

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _train(tmp_path, mode: str, monkeypatch=None):
    """Three optimizer steps through Trainer (2 micro-batches each, padded rows) with the stock
    loss, or fusedce applied to the model ("model") or process-wide ("global")."""
    model = _tiny_model(seed=1)
    calls = []
    real_loss = fce_hf.causal_lm_loss

    def counted(*args, **kwargs):
        calls.append(kwargs.get("num_items_in_batch"))
        return real_loss(*args, **kwargs)

    if mode == "model":
        fce_hf.apply(model)
        model.loss_function = counted
    elif mode == "global":
        fce_hf.apply()
        monkeypatch.setattr(fce_hf, "causal_lm_loss", counted)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / mode),
        per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3,
        learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no",
        use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0,
        lr_scheduler_type="constant", disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Rows())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if mode != "stock":
        # Two micro-batches per step, each told the step's total number of counted tokens,
        # counted over the shifted labels as for transformers' own causal-LM loss.
        assert len(calls) == 6 and all(n is not None for n in calls)
        assert getattr(trainer, "_loss_shifts_labels", True)
    return losses, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("mode", ["model", "global"])
def test_trainer_gradient_accumulation(tmp_path, mode, monkeypatch):
    """Trainer passes num_items_in_batch; fusedce, per model or process-wide, must give the
    same logged losses and weights as stock transformers."""
    ref_losses, ref_params = _train(tmp_path, "stock")
    losses, params = _train(tmp_path, mode, monkeypatch)
    assert len(losses) == len(ref_losses) == 3
    for ours, ref in zip(losses, ref_losses):
        assert ours == pytest.approx(ref, rel=1e-4)
    for p, p_ref in zip(params, ref_params):
        assert rel_err(p, p_ref) <= 1e-4


def test_fused_linear_matches_transformers():
    """apply(model, fused_linear=True): no logits, the same loss and parameter gradients."""
    ref_model = _tiny_model()
    model = copy.deepcopy(ref_model)
    fce_hf.apply(model, fused_linear=True)
    input_ids, attention_mask = _batch()
    labels = fce_hf.build_labels(input_ids, attention_mask)
    for num_items in (None, torch.tensor(17)):
        kwargs = {} if num_items is None else {"num_items_in_batch": num_items}
        ref = ref_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                        **kwargs)
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)
        assert out.logits is None
        _backward_and_compare(out, ref, model, ref_model)
        model.zero_grad()
        ref_model.zero_grad()
    # Without labels the model's own forward runs and returns logits.
    assert model(input_ids=input_ids).logits.shape == (3, 12, VOCAB)
    fce_hf.revert(model)
    assert "_fusedce_original_forward" not in model.__dict__
    assert model(input_ids=input_ids, labels=labels).logits is not None


def test_logit_options_from_config():
    config = transformers.PretrainedConfig()
    config.final_logit_softcapping = 30.0
    config.logits_scaling = 4.0
    assert fce_hf._logit_options(config) == {"softcap": 30.0, "logit_scale": 0.25}
    with pytest.raises(ValueError, match="needs a model"):
        fce_hf.apply(fused_linear=True)


def _packed_batch():
    """One packed row of three documents (lengths 5, 1, 10), positions restarting at 0, and
    labels that are the input ids themselves (no -100 separator at document starts)."""
    input_ids = torch.randint(0, VOCAB, (1, 16))
    position_ids = torch.cat([torch.arange(5), torch.arange(1), torch.arange(10)])[None]
    return input_ids, position_ids, input_ids.clone()


def _cross_document_free_loss(logits, labels, position_ids):
    target = torch.full_like(labels, -100)
    same_doc = position_ids[:, 1:] - position_ids[:, :-1] == 1
    target[:, :-1] = torch.where(same_doc, labels[:, 1:], -100)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB).double(),
                                             target.reshape(-1))


def test_packed_batches_never_score_the_next_document():
    """Packed rows (position_ids, no attention mask): the fused-linear forward, and the loss
    function given the positions or flash-attention's cu_seq_lens_q, skip the targets across
    document boundaries; transformers' own loss counts them when the labels carry no
    separator."""
    ref_model = _tiny_model()
    input_ids, position_ids, labels = _packed_batch()
    with torch.no_grad():
        logits = ref_model(input_ids=input_ids, position_ids=position_ids).logits
        stock = ref_model(input_ids=input_ids, position_ids=position_ids, labels=labels).loss
    right = _cross_document_free_loss(logits, labels, position_ids)
    assert abs(float(stock) - float(right)) > 1e-3  # stock scores across documents here

    model = copy.deepcopy(ref_model)
    fce_hf.apply(model, fused_linear=True)
    with torch.no_grad():
        out = model(input_ids=input_ids, position_ids=position_ids, labels=labels)
    assert rel_err(out.loss, right) <= 1e-5
    by_positions = fce_hf.causal_lm_loss(logits, labels, VOCAB, position_ids=position_ids)
    assert rel_err(by_positions, right) <= 1e-5
    cu = torch.tensor([0, 5, 6, 16], dtype=torch.int32)
    assert rel_err(fce_hf.causal_lm_loss(logits, labels, VOCAB, cu_seq_lens_q=cu), right) <= 1e-5
    # shift_labels given: used as they are (shift 0).
    shifted = torch.cat([labels[:, 1:], torch.full((1, 1), -100)], dim=1)
    assert rel_err(fce_hf.causal_lm_loss(logits, None, VOCAB, shift_labels=shifted),
                   torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB).double(),
                                                     shifted.reshape(-1))) <= 1e-5


class _Docs(torch.utils.data.Dataset):
    """Documents of different lengths, to be packed into one row per batch."""

    def __init__(self, n: int = 8, seed: int = 5):
        g = torch.Generator().manual_seed(seed)
        self.items = [{"input_ids": torch.randint(1, VOCAB, (int(n_tok),), generator=g).tolist()}
                      for n_tok in torch.randint(1, 9, (n,), generator=g)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _train_packed(tmp_path, mode: str, separators: bool):
    """Three optimizer steps (2 packed micro-batches each: position_ids, no attention mask)
    with the stock loss or fusedce's fused-linear forward; labels with -100 at each document's
    first token (DataCollatorWithFlattening's default) or without any separator."""
    flatten = transformers.DataCollatorWithFlattening()

    def collate(features):
        batch = flatten(features)
        if not separators:
            batch["labels"] = batch["input_ids"].clone()
        return batch

    model = _tiny_model(seed=2)
    if mode == "fusedce":
        fce_hf.apply(model, fused_linear=True)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / f"{mode}{separators}"), per_device_train_batch_size=2,
        gradient_accumulation_steps=2, max_steps=3, learning_rate=1e-2, logging_steps=1,
        report_to=[], save_strategy="no", use_cpu=True, seed=0, data_seed=0,
        dataloader_num_workers=0, lr_scheduler_type="constant", disable_tqdm=True,
        remove_unused_columns=False)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Docs(),
                                   data_collator=collate)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    fce_hf.revert(model)
    return losses, [p.detach().clone() for p in model.parameters()]


def test_trainer_packed_batches(tmp_path):
    """Packed batches through Trainer with gradient accumulation: fusedce equals stock where
    stock is right (separator labels), and without separators gives the same right answer
    (stock then scores each document's first token from the previous document, and counts it
    in num_items_in_batch)."""
    ref_losses, ref_params = _train_packed(tmp_path, "stock", separators=True)
    for separators in (True, False):
        losses, params = _train_packed(tmp_path, "fusedce", separators)
        assert len(losses) == len(ref_losses) == 3
        for ours, ref in zip(losses, ref_losses):
            assert ours == pytest.approx(ref, rel=1e-4), separators
        for p, p_ref in zip(params, ref_params):
            assert rel_err(p, p_ref) <= 1e-4, separators
    wrong, _ = _train_packed(tmp_path, "stock", separators=False)
    assert wrong[0] != pytest.approx(ref_losses[0], rel=1e-4)  # beyond the equality tolerance
