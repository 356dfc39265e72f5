"""z-loss, logit scaling, softcap, num_items_in_batch and the statistics, for both implementations,
against a float64 reference written from the formulas (fusedce.testing.reference_extras)."""

from __future__ import annotations

import pytest
import torch

import fusedce
from fusedce.testing import (
    TOLERANCES,
    make_logits,
    make_targets,
    reference_cross_entropy,
    reference_extras,
    rel_err,
)
from helpers import function_loss, grad_output_for

EXTRAS = {
    "softcap": dict(softcap=15.0),
    "scale": dict(logit_scale=0.37),
    "zloss": dict(lse_square_scale=1e-3),
    "all": dict(logit_scale=1.7, softcap=20.0, lse_square_scale=2e-4),
}


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("extra", list(EXTRAS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_extras_match_reference(impl, dtype, extra, reduction, device, poison):
    n_rows, n_cols = 11, 700
    logits = make_logits(n_rows, n_cols, dtype, device, scale=6.0).requires_grad_()
    target = make_targets(n_rows, n_cols, device, ignore_fraction=0.3)
    weight = torch.rand(n_cols, device=device) + 0.5
    kwargs = dict(EXTRAS[extra], label_smoothing=0.1, reduction=reduction)
    loss, stats = fusedce.cross_entropy(logits, target, weight, impl=impl, return_stats=True,
                                        **kwargs)
    go = grad_output_for(reduction, n_rows, device, 0.8)
    loss.backward(go.to(loss.dtype))
    ref = reference_extras(logits, target, weight, grad_output=go.float(), **kwargs)
    tol = TOLERANCES[dtype]
    assert rel_err(loss, ref["loss"]) <= tol["loss"]
    assert rel_err(logits.grad, ref["grad"]) <= tol["grad"]
    assert stats.lse.dtype == torch.float32 and stats.lse.shape == target.shape
    assert rel_err(stats.lse, ref["lse"]) <= 1e-5
    assert rel_err(stats.z_loss, ref["z_loss"]) <= (1e-4 if extra in ("zloss", "all") else 0)
    assert abs(stats.accuracy.item() - ref["accuracy"].item()) <= 1e-6
    assert not stats.lse.requires_grad and not stats.accuracy.requires_grad


# (n_rows, n_cols, block_size, n_splits): multi-block and split paths with every extra on.
@pytest.mark.parametrize("shape", [(4, 3000, 256, 1), (3, 3000, 256, 4)],
                         ids=["blocks", "split"])
def test_extras_on_kernel_paths(shape, device, poison):
    n_rows, n_cols, block_size, n_splits = shape
    logits = make_logits(n_rows, n_cols, torch.float32, device, scale=6.0).requires_grad_()
    target = make_targets(n_rows, n_cols, device)
    target[1] = -100
    # Make row 0's target its argmax, so accuracy is not trivially 0.
    with torch.no_grad():
        logits[0, target[0]] = 100.0
    weight = torch.rand(n_cols, device=device) + 0.5
    loss, lse, z_loss, accuracy = function_loss(
        logits, target, weight, reduction="sum", label_smoothing=0.2, block_size=block_size,
        n_splits=n_splits, logit_scale=1.3, softcap=25.0, lse_square_scale=1e-3,
        return_stats=True)
    loss.backward()
    ref = reference_extras(logits, target, weight, reduction="sum", label_smoothing=0.2,
                           logit_scale=1.3, softcap=25.0, lse_square_scale=1e-3,
                           grad_output=1.0)
    assert rel_err(loss, ref["loss"]) <= 1e-5
    assert rel_err(logits.grad, ref["grad"]) <= 1e-5
    assert rel_err(lse, ref["lse"]) <= 1e-6
    assert rel_err(z_loss, ref["z_loss"]) <= 1e-5
    assert accuracy.item() == pytest.approx(ref["accuracy"].item())
    assert accuracy.item() > 0


def test_accuracy_takes_the_first_of_tied_maxima(impl, device):
    logits = torch.zeros(3, 10, device=device)
    logits[:, 2] = logits[:, 5] = 1.0  # tie between columns 2 and 5
    target = torch.tensor([2, 5, -100], device=device)
    _, stats = fusedce.cross_entropy(logits, target, impl=impl, return_stats=True)
    assert stats.accuracy.item() == 0.5  # row 0 right, row 1 wrong (argmax is 2), row 2 ignored


@pytest.mark.parametrize("as_tensor", [False, True])
def test_num_items_in_batch(impl, as_tensor, device):
    """Gradient accumulation, transformers' way: sum each micro-batch, divide by the total."""
    logits = make_logits(20, 300, torch.float32, device).requires_grad_()
    target = make_targets(20, 300, device, ignore_fraction=0.3)
    n_items = int((target != -100).sum())
    full = fusedce.cross_entropy(logits, target, impl=impl)
    full.backward()
    full_grad = logits.grad.clone()
    logits.grad = None
    num = torch.tensor(n_items, device=device) if as_tensor else n_items
    total = 0.0
    for rows in (slice(0, 7), slice(7, 20)):
        part = fusedce.cross_entropy(logits[rows], target[rows], impl=impl,
                                     num_items_in_batch=num)
        part.backward()
        total = total + part.detach()
    assert torch.allclose(total, full.detach(), rtol=1e-5)
    assert rel_err(logits.grad, full_grad) <= 1e-5


def test_stats_without_grad_and_for_none(impl, device):
    logits = make_logits(6, 128, torch.bfloat16, device)
    target = make_targets(6, 128, device, ignore_fraction=0.3)
    with torch.no_grad():
        loss, stats = fusedce.cross_entropy(logits, target, reduction="none", impl=impl,
                                            lse_square_scale=1e-2, return_stats=True)
    ref = reference_extras(logits, target, reduction="none", lse_square_scale=1e-2)
    assert stats.z_loss.shape == (6,)
    assert rel_err(stats.z_loss, ref["z_loss"]) <= 1e-5
    assert rel_err(loss, ref["loss"]) <= 1e-2


def test_extras_default_to_plain_cross_entropy(device):
    logits = make_logits(5, 50, torch.float32, device)
    target = make_targets(5, 50, device)
    ref, _ = reference_cross_entropy(logits, target)
    loss = fusedce.cross_entropy(logits, target, logit_scale=1.0, softcap=None,
                                 lse_square_scale=0.0, impl="triton")
    assert rel_err(loss, ref) <= 1e-5


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(logit_scale=0.0), ValueError, "logit_scale must be"),
    (dict(logit_scale=float("inf")), ValueError, "logit_scale must be"),
    (dict(softcap=-1.0), ValueError, "softcap must be"),
    (dict(lse_square_scale=-1e-4), ValueError, "lse_square_scale must be"),
    (dict(num_items_in_batch=0), ValueError, "num_items_in_batch must be positive"),
    (dict(num_items_in_batch=3.5), TypeError, "num_items_in_batch must be an int"),
    (dict(num_items_in_batch=torch.ones(2)), ValueError, "must hold one number"),
    (dict(num_items_in_batch=4, reduction="sum"), ValueError, "replaces the denominator"),
])
def test_extra_argument_errors(kwargs, error, message):
    logits, target = torch.randn(3, 7), torch.tensor([0, 1, 2])
    with pytest.raises(error, match=message):
        fusedce.cross_entropy(logits, target, **kwargs)


def test_module_takes_the_extras(device):
    module = fusedce.CrossEntropyLoss(softcap=10.0, lse_square_scale=1e-3, return_stats=True,
                                      out_dtype=torch.float32, impl="triton")
    assert "softcap=10.0" in repr(module)
    logits = make_logits(6, 90, torch.bfloat16, device)
    target = make_targets(6, 90, device)
    loss, stats = module(logits, target, num_items_in_batch=9)
    expected, expected_stats = fusedce.cross_entropy(
        logits, target, softcap=10.0, lse_square_scale=1e-3, return_stats=True,
        out_dtype=torch.float32, num_items_in_batch=9, impl="triton")
    assert loss.dtype == torch.float32
    assert torch.equal(loss, expected) and torch.equal(stats.lse, expected_stats.lse)
