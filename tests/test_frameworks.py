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
