"""Adapters for the frameworks people train with: each gives the framework's own answer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fusedce.testing import make_targets, rel_err


def test_torchtitan_loss_contract():
    loss_mod = pytest.importorskip("torchtitan.components.loss")
    from fusedce.integrations.torchtitan import FusedCrossEntropyLoss

    theirs = loss_mod.CrossEntropyLoss.Config().build()
    ours = FusedCrossEntropyLoss.Config().build()
    assert isinstance(ours, loss_mod.BaseLoss)
    b, s, v = 3, 7, 101
    logits = torch.randn(b, s, v) * 3
    labels = make_targets(b * s, v, ignore_fraction=0.3).reshape(b, s)
    for tokens in (None, torch.tensor(40.0)):  # alone, and normalised by a global count
        x1, x2 = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        loss1, metrics1 = theirs(x1, labels, tokens)
        loss2, metrics2 = ours(x2, labels, tokens)
        loss1.backward()
        loss2.backward()
        assert metrics2 == metrics1 == {}
        assert rel_err(loss2, loss1) < 1e-6 and rel_err(x2.grad, x1.grad) < 1e-6


def test_torchtitan_compute_logprobs():
    loss_mod = pytest.importorskip("torchtitan.components.loss")
    from fusedce.integrations.torchtitan import compute_logprobs

    logits = torch.randn(2, 9, 50) * 2
    labels = make_targets(18, 50, ignore_fraction=0.2).reshape(2, 9)
    lp1, h1 = loss_mod.compute_logprobs(logits, labels, return_entropy=True)
    lp2, h2 = compute_logprobs(logits, labels, return_entropy=True)
    assert rel_err(lp2, lp1) < 1e-6
    counted = labels != -100
    assert rel_err(h2[counted], h1[counted]) < 1e-5 and not h2.requires_grad


def test_torchtitan_training_step_matches():
    """One optimiser step of a tiny LM with torchtitan's loss and with fusedce's adapter."""
    loss_mod = pytest.importorskip("torchtitan.components.loss")
    from fusedce.integrations.torchtitan import FusedCrossEntropyLoss

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(64, 32), nn.Linear(32, 64))
    tokens = torch.randint(0, 64, (4, 12))
    labels = torch.roll(tokens, -1, 1)
    labels[:, -1] = -100
    results = []
    for loss_fn in (loss_mod.CrossEntropyLoss.Config().build(),
                    FusedCrossEntropyLoss.Config().build()):
        m = nn.Sequential(*[layer for layer in __import__("copy").deepcopy(model)])
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        loss, _ = loss_fn(m(tokens), labels, (labels != -100).sum())
        loss.backward()
        opt.step()
        results.append([p.detach().clone() for p in m.parameters()])
    for a, b in zip(*results):
        assert torch.allclose(a, b, atol=1e-6)


def _lightning_run(loss_kind: str, steps: int = 3, accumulate: int = 2, scale: float = 1024.0):
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.plugins.precision import Precision

    from fusedce.integrations import lightning as fce_pl

    class ScalingPrecision(Precision):
        """Multiplies the loss before its backward and divides the gradients before the step,
        as a loss-scaling plugin does (grad_output != 1 reaches the loss)."""

        def pre_backward(self, tensor, module):
            return super().pre_backward(tensor * scale, module)

        def optimizer_step(self, optimizer, model, closure, **kwargs):
            def unscaled_closure():
                out = closure()
                for group in optimizer.param_groups:
                    for p in group["params"]:
                        if p.grad is not None:
                            p.grad.div_(scale)
                return out
            return super().optimizer_step(optimizer, model, unscaled_closure, **kwargs)

    class TinyLM(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.embed = nn.Embedding(80, 24)
            self.head = nn.Linear(24, 80)

        def training_step(self, batch, batch_idx):
            tokens, labels = batch
            logits = self.head(self.embed(tokens)).flatten(0, 1)
            if loss_kind == "fusedce":
                loss = fce_pl.cross_entropy(self, logits, labels.flatten())
            else:
                loss = F.cross_entropy(logits, labels.flatten())
            self.log("train_loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.3)

    g = torch.Generator().manual_seed(1)
    data = []
    for _ in range(steps * accumulate):
        tokens = torch.randint(0, 80, (3, 10), generator=g)
        labels = torch.roll(tokens, -1, 1)
        labels[:, -1] = -100
        labels[0, :4] = -100
        data.append((tokens, labels))
    module = TinyLM()
    trainer = pl.Trainer(max_steps=steps, accumulate_grad_batches=accumulate,
                         plugins=[ScalingPrecision()], accelerator="cpu", devices=1,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(
        data, batch_size=None, shuffle=False))
    assert trainer.global_step == steps
    return module, fce_pl.loss_is_scaled(module)


def test_lightning_accumulation_and_loss_scaling():
    """accumulate_grad_batches=2 and a loss-scaling precision plugin, 3 optimiser steps:
    fusedce's adapter (which then recomputes its gradient with grad_output folded in) ends with
    the weights of plain F.cross_entropy."""
    ours, scaled = _lightning_run("fusedce")
    theirs, _ = _lightning_run("torch")
    assert scaled
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_trl_logprob_helpers_equal_trl(dtype):
    """The GRPO helpers give TRL's own values (TRL computes in float32 from the given dtype)."""
    utils = pytest.importorskip("trl.trainer.utils")
    from fusedce.integrations import trl as fce_trl

    logits = (torch.randn(3, 8, 120) * 3).to(dtype)
    ids = torch.randint(0, 120, (3, 8))
    theirs = utils.selective_log_softmax(logits.float(), ids, temperature=0.7)
    x = logits.clone().requires_grad_()
    ours = fce_trl.selective_log_softmax(x, ids, temperature=0.7)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(ours, theirs) < tol
    ours.sum().backward()  # differentiable
    mask = torch.rand(3, 8) > 0.3
    masked = fce_trl.selective_log_softmax(logits, ids, temperature=0.7, row_mask=mask)
    assert torch.all(masked[~mask] == 0)
    assert rel_err(masked[mask], theirs[mask]) < tol
    h_theirs = utils.entropy_from_logits(logits.float())
    assert rel_err(fce_trl.entropy_from_logits(logits), h_theirs) < tol


def _sft_run(fused: bool, packed: bool, steps: int = 3):
    """SFTTrainer on a tiny Llama (fp32, SGD, gradient accumulation 2), padded or packed
    (padding-free, position_ids) data; returns the logged (loss, entropy, accuracy) per step
    and the final weights."""
    transformers = pytest.importorskip("transformers")
    datasets = pytest.importorskip("datasets")
    trl = pytest.importorskip("trl")
    from tokenizers import Tokenizer, models

    from fusedce.integrations import trl as fce_trl

    vocab = 64
    words = {**{f"t{i}": i for i in range(vocab - 2)}, "<pad>": vocab - 2, "<eos>": vocab - 1}
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="<pad>")),
        pad_token="<pad>", eos_token="<eos>")
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(12):
        n = int(torch.randint(4, 14, (1,), generator=g))
        start = int(torch.randint(0, vocab - 2, (1,), generator=g))
        rows.append({"input_ids": [(start + k) % (vocab - 2) for k in range(n)]})
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False, pad_token_id=vocab - 2, eos_token_id=vocab - 1)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    extra = dict(packing=True, max_length=32) if packed else {}
    args = trl.SFTConfig(
        output_dir=None, max_steps=steps, per_device_train_batch_size=2,
        gradient_accumulation_steps=2, logging_steps=1, report_to=[], save_strategy="no",
        learning_rate=0.1, optim="sgd", use_cpu=True, bf16=False, seed=0, data_seed=0,
        disable_tqdm=True, **extra)
    if fused:
        fce_trl.apply()
    try:
        trainer = trl.SFTTrainer(model=model, args=args,
                                 train_dataset=datasets.Dataset.from_list(rows),
                                 processing_class=tokenizer)
        trainer.train()
    finally:
        fce_trl.revert()
    logs = [(h["loss"], h["entropy"], h["mean_token_accuracy"])
            for h in trainer.state.log_history if "loss" in h]
    return logs, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_trl_sft_trainer_matches_stock(packed, tmp_path, monkeypatch):
    """fce_trl.apply(): SFTTrainer's fused LM head is fusedce's; 3 steps with gradient
    accumulation give TRL's logged losses, entropy, token accuracy and final weights."""
    monkeypatch.chdir(tmp_path)
    stock, w_stock = _sft_run(False, packed)
    ours, w_ours = _sft_run(True, packed)
    assert len(ours) == len(stock) == 3
    for (l1, h1, a1), (l2, h2, a2) in zip(stock, ours):
        assert abs(l1 - l2) <= 1e-5 * abs(l1) and abs(h1 - h2) <= 1e-5 * abs(h1)
        assert a1 == pytest.approx(a2, abs=1e-6)
    for a, b in zip(w_stock, w_ours):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def _tiny_llama(transformers):
    """A one-layer Llama over a 50-token vocabulary, seeded."""
    config = transformers.LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def test_trl_fused_head_outputs_and_errors():
    transformers = pytest.importorskip("transformers")
    utils = pytest.importorskip("trl.trainer.utils")
    import copy

    from fusedce.integrations import trl as fce_trl

    theirs = _tiny_llama(transformers)
    ours = copy.deepcopy(theirs)
    outputs = ("log_probs", "entropy", "is_top1")
    utils.add_fused_lm_head(theirs, temperature=0.7, outputs=outputs)
    fce_trl.add_fused_lm_head(ours, temperature=0.7, outputs=outputs)
    ids = torch.randint(0, 50, (2, 9))
    labels = ids.clone()
    labels[1, :3] = -100
    for kw in (dict(labels=labels), dict(shift_labels=labels)):
        a = theirs(input_ids=ids, fused_lm_head=True, **kw)
        b = ours(input_ids=ids, fused_lm_head=True, **kw)
        for name in ("log_probs", "entropy"):
            assert getattr(b, name).shape == getattr(a, name).shape
            assert rel_err(getattr(b, name), getattr(a, name)) < 1e-5, name
        assert torch.equal(a.is_top1.bool(), b.is_top1) and torch.equal(a.label_mask,
                                                                        b.label_mask)
        assert rel_err(b.loss, a.loss) < 1e-5
        (b.log_probs.sum() + b.entropy.sum()).backward()  # both differentiable, as TRL's
    assert ours(input_ids=ids).logits.shape == (2, 9, 50)  # without fused_lm_head: unchanged
    with pytest.raises(ValueError, match="mean_logits"):
        fce_trl.add_fused_lm_head(copy.deepcopy(theirs), outputs=("log_probs", "mean_logits"))
    # Through apply(), a trainer asking for such outputs keeps TRL's head.
    kto = pytest.importorskip("trl.trainer.kto_trainer")
    fce_trl.apply()
    try:
        model = copy.deepcopy(ours)
        kto.add_fused_lm_head(model, outputs=("log_probs", "entropy", "mean_logits"))
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        assert out.mean_logits is not None
    finally:
        fce_trl.revert()
    assert kto.add_fused_lm_head is utils.add_fused_lm_head


def test_torchtitan_debugmodel_loss():
    """torchtitan's smallest model (llama3 "debugmodel", 6 layers, vocabulary 2048): its logits
    give the same loss and logits gradient with fusedce's loss as with torchtitan's.  (A full
    training step cannot run on a CPU: FlexAttention has no CPU backward, and torchtitan 0.3
    dropped SDPA for language models.)"""
    loss_mod = pytest.importorskip("torchtitan.components.loss")
    llama3 = pytest.importorskip("torchtitan.models.llama3")
    from fusedce.integrations.torchtitan import FusedCrossEntropyLoss

    torch.manual_seed(0)
    model = llama3.model_registry("debugmodel", attn_backend="flex").model.build()
    model.init_weights()  # built on uninitialised memory: without this the logits may be NaN
    with torch.no_grad():
        assert all(torch.isfinite(p).all() for p in model.parameters())
    tokens = torch.randint(0, 2048, (2, 24))
    positions = torch.arange(24).expand(2, 24)
    with torch.no_grad():
        logits = model(tokens, positions, model.get_attention_masks(positions))
    assert torch.isfinite(logits).all()
    labels = torch.roll(tokens, -1, 1)
    labels[:, -1] = -100
    valid = (labels != -100).sum()
    grads = []
    for loss_fn in (loss_mod.CrossEntropyLoss.Config().build(),
                    FusedCrossEntropyLoss.Config().build()):
        x = logits.clone().requires_grad_()
        loss, _ = loss_fn(x, labels, valid)
        loss.backward()
        grads.append((loss.detach(), x.grad))
    assert rel_err(grads[1][0], grads[0][0]) < 1e-6 and rel_err(grads[1][1], grads[0][1]) < 1e-5


@pytest.mark.parametrize("trainer", ["dpo_trainer", "kto_trainer", "grpo_trainer"])
def test_trl_policy_and_reference_share_one_head(trainer):
    """Through apply(), a trainer's reference model gets the head its policy got (DPO's and
    KTO's policies need TRL's, GRPO's gets fusedce's): for equal models the log-ratio is
    exactly 0, never a rounding difference between two heads."""
    transformers = pytest.importorskip("transformers")
    module = pytest.importorskip(f"trl.trainer.{trainer}")
    import copy

    from fusedce.integrations import trl as fce_trl

    policy = _tiny_llama(transformers)
    reference = copy.deepcopy(policy)
    outputs = {"dpo_trainer": ("log_probs", "entropy", "mean_logits", "is_top1"),
               "kto_trainer": ("log_probs", "entropy", "mean_logits"),
               "grpo_trainer": ("log_probs", "entropy")}[trainer]
    ids = torch.randint(0, 50, (2, 9))
    fce_trl.apply()
    try:
        module.add_fused_lm_head(policy, outputs=outputs)  # the order of the trainers' __init__
        module.add_fused_lm_head(reference)
        with torch.no_grad():
            a = policy(input_ids=ids, labels=ids, fused_lm_head=True).log_probs
            b = reference(input_ids=ids, labels=ids, fused_lm_head=True).log_probs
        assert torch.equal(a, b)
    finally:
        fce_trl.revert()


def _gkd_run(fused: bool):
    """GKDTrainer (off-policy: lmbda 0, no sequence KD) distilling one tiny Llama into another,
    3 SGD steps, stock or with fce_trl.apply(); the logged losses and the final weights."""
    import warnings

    transformers = pytest.importorskip("transformers")
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("trl")
    from tokenizers import Tokenizer, models

    from fusedce.integrations import trl as fce_trl

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from trl.experimental.gkd import GKDConfig, GKDTrainer
        except ImportError:
            pytest.skip("this TRL has no GKDTrainer")
    vocab = 64
    words = {**{f"t{i}": i for i in range(vocab - 2)}, "<pad>": vocab - 2, "<eos>": vocab - 1}
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="<pad>")),
        pad_token="<pad>", eos_token="<eos>")

    def llama(seed):
        config = transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            tie_word_embeddings=False, pad_token_id=vocab - 2, eos_token_id=vocab - 1)
        torch.manual_seed(seed)
        return transformers.LlamaForCausalLM(config)

    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(8):
        n = int(torch.randint(6, 12, (1,), generator=g))
        start = int(torch.randint(0, vocab - 2, (1,), generator=g))
        rows.append({"input_ids": [(start + k) % (vocab - 2) for k in range(n)]})

    def collate(batch):  # the first 3 tokens are the prompt: not counted
        width = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), width), vocab - 2)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for i, b in enumerate(batch):
            n = len(b["input_ids"])
            ids[i, :n] = torch.tensor(b["input_ids"])
            mask[i, :n] = 1
            labels[i, 3:n] = ids[i, 3:n]
        return {"input_ids": ids, "attention_mask": mask, "labels": labels,
                "prompts": ids[:, :3], "prompt_attention_mask": mask[:, :3]}

    student, teacher = llama(0), llama(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = GKDConfig(output_dir=None, max_steps=3, per_device_train_batch_size=2,
                         logging_steps=1, report_to=[], save_strategy="no", learning_rate=0.1,
                         optim="sgd", use_cpu=True, bf16=False, seed=0, data_seed=0,
                         disable_tqdm=True, lmbda=0.0, seq_kd=False, beta=0.3, max_length=32)
        if fused:
            fce_trl.apply()
        try:
            trainer = GKDTrainer(model=student, teacher_model=teacher, args=args,
                                 data_collator=collate,
                                 train_dataset=datasets.Dataset.from_list(rows),
                                 processing_class=tokenizer)
            trainer.train()
        finally:
            fce_trl.revert()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return losses, [p.detach().clone() for p in student.parameters()]


def test_trl_gkd_trainer_matches_stock(tmp_path, monkeypatch):
    """fce_trl.apply(): GKDTrainer's generalized JSD is fusedce's; 3 steps give TRL's logged
    losses and final student weights."""
    from fusedce.integrations import trl as fce_trl

    monkeypatch.chdir(tmp_path)
    calls = []
    ours_fn = fce_trl.generalized_jsd_loss

    def counted(*args, **kwargs):
        calls.append(1)
        return ours_fn(*args, **kwargs)

    stock, w_stock = _gkd_run(False)
    assert not calls
    monkeypatch.setattr(fce_trl, "generalized_jsd_loss", counted)
    ours, w_ours = _gkd_run(True)
    assert len(calls) == 3  # one loss per step, fusedce's
    assert len(ours) == len(stock) == 3
    for a, b in zip(stock, ours):
        assert a == pytest.approx(b, rel=1e-5)
    for a, b in zip(w_stock, w_ours):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)
