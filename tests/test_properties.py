"""Properties users rely on, for both implementations."""

from __future__ import annotations

import math

import pytest
import torch

import fusedce
from fusedce.testing import make_logits, make_targets, reference_cross_entropy, rel_err


def _loss_and_grad(logits, target, **kwargs):
    logits = logits.detach().clone().requires_grad_()
    loss = fusedce.cross_entropy(logits, target, **kwargs)
    loss.sum().backward()
    return loss.detach(), logits.grad


def test_perfect_predictions_give_zero(impl, device):
    target = make_targets(8, 500, device)
    logits = torch.full((8, 500), -1000.0, device=device)
    logits[torch.arange(8), target] = 1000.0
    loss, grad = _loss_and_grad(logits, target, impl=impl)
    assert 0.0 <= loss.item() < 1e-6
    assert grad.abs().max().item() < 1e-6


@pytest.mark.parametrize("n_cols", [2, 1000, 50257])
def test_uniform_logits_give_log_c(impl, n_cols, device):
    logits = torch.full((3, n_cols), 7.25, device=device)
    target = make_targets(3, n_cols, device)
    loss, _ = _loss_and_grad(logits, target, reduction="none", impl=impl)
    assert torch.allclose(loss, torch.full_like(loss, math.log(n_cols)), rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gradient_rows_sum_to_zero_and_loss_nonnegative(impl, dtype, device):
    logits = make_logits(10, 3000, dtype, device)
    target = make_targets(10, 3000, device, ignore_fraction=0.2)
    weight = torch.rand(3000, device=device)
    loss, grad = _loss_and_grad(logits, target, weight=weight, label_smoothing=0.15,
                                reduction="none", impl=impl)
    assert (loss >= 0).all()
    row_sums = grad.float().sum(dim=1)
    scale = grad.float().abs().sum(dim=1).clamp_min(1e-30)
    assert (row_sums.abs() / scale).max().item() < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_extreme_logits_stay_finite(impl, dtype, device):
    """Logits of +-1000, and as large as the loss stays representable: +-3e4 in float32 and
    float16 (a loss near 6e4; float16 tops out at 65504), +-1e30 in bfloat16."""
    big = {torch.float32: 3e4, torch.float16: 3e4, torch.bfloat16: 1e30}[dtype]
    for magnitude in (1000.0, big):
        sign = torch.randint(0, 2, (6, 700), device=device) * 2 - 1
        logits = (sign * magnitude).to(dtype)
        target = make_targets(6, 700, device)
        loss, grad = _loss_and_grad(logits, target, label_smoothing=0.1, reduction="none",
                                    impl=impl)
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
        ref, _ = reference_cross_entropy(logits, target, reduction="none", label_smoothing=0.1)
        assert rel_err(loss, ref) <= 1e-2


def test_nan_logits_poison_only_their_row(impl, device):
    logits = make_logits(4, 300, torch.float32, device)
    logits[2, 17] = float("nan")
    target = make_targets(4, 300, device)
    loss, _ = _loss_and_grad(logits, target, reduction="none", impl=impl)
    assert torch.isnan(loss[2])
    assert torch.isfinite(loss[[0, 1, 3]]).all()


def test_masked_vocabulary_with_minus_inf(impl, device):
    """-inf logits (e.g. padded vocabulary entries) have zero probability, not NaN."""
    logits = make_logits(5, 600, torch.float32, device)
    logits[:, :256] = float("-inf")  # a whole leading block masked
    logits[:, 400:] = float("-inf")
    target = torch.randint(256, 400, (5,), device=device)
    loss, grad = _loss_and_grad(logits, target, reduction="none", impl=impl)
    ref, ref_grad = reference_cross_entropy(logits, target, reduction="none",
                                            grad_output=torch.ones(5))
    assert rel_err(loss, ref) <= 1e-5
    assert rel_err(grad, ref_grad) <= 1e-5


def test_padding_rows_get_exactly_zero_gradient(impl, device):
    logits = make_logits(12, 800, torch.bfloat16, device)
    logits[3, 5] = float("nan")  # even a broken padding row stays silent
    target = make_targets(12, 800, device)
    target[[1, 3, 4, 11]] = -100
    _, grad = _loss_and_grad(logits, target, label_smoothing=0.2, impl=impl)
    assert torch.all(grad[[1, 3, 4, 11]] == 0)
    assert torch.isfinite(grad).all()


def test_real_token_loss_independent_of_padding(impl, device):
    n_real, n_cols = 6, 400
    real_logits = make_logits(n_real, n_cols, torch.float32, device)
    real_target = make_targets(n_real, n_cols, device)
    per_tokens, means = [], []
    for n_pad in (0, 3, 20):
        pad_logits = make_logits(n_pad, n_cols, torch.float32, device)
        logits = torch.cat([real_logits, pad_logits])
        target = torch.cat([real_target, torch.full((n_pad,), -100, device=device)])
        per_token, _ = _loss_and_grad(logits, target, reduction="none", impl=impl)
        assert torch.all(per_token[n_real:] == 0)
        per_tokens.append(per_token[:n_real])
        means.append(_loss_and_grad(logits, target, impl=impl)[0])
    for per_token, mean in zip(per_tokens[1:], means[1:]):
        assert torch.equal(per_token, per_tokens[0])
        assert torch.allclose(mean, means[0], rtol=1e-6)


def test_micro_batch_sums_give_full_batch_mean(impl, device):
    """Gradient accumulation done right: sum losses, divide by the total number of real tokens."""
    logits = make_logits(24, 300, torch.float32, device)
    target = make_targets(24, 300, device, ignore_fraction=0.4)
    full, full_grad = _loss_and_grad(logits, target, impl=impl)
    n_real = int((target != -100).sum())
    total = torch.zeros((), device=device)
    grads = []
    for rows in (slice(0, 5), slice(5, 17), slice(17, 24)):  # unequal micro-batches
        part, part_grad = _loss_and_grad(logits[rows], target[rows], reduction="sum", impl=impl)
        total += part
        grads.append(part_grad / n_real)
    assert torch.allclose(total / n_real, full, rtol=1e-5)
    assert rel_err(torch.cat(grads), full_grad) <= 1e-5


def test_all_ignored_mean_is_zero_not_nan(impl, device):
    logits = make_logits(5, 100, torch.float32, device)
    target = torch.full((5,), -100, device=device)
    loss, grad = _loss_and_grad(logits, target, impl=impl)
    assert loss.item() == 0.0
    assert torch.all(grad == 0)
