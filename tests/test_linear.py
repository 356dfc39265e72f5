"""Fused linear cross-entropy against the unfused float64 reference (fusedce.testing)."""

from __future__ import annotations

import pytest
import torch

import fusedce
from fusedce.testing import TOLERANCES, make_targets, reference_linear, rel_err

OPTIONS = {
    "plain": {},
    "weight+smoothing": {"weight": True, "label_smoothing": 0.2},
    "softcap+zloss": {"softcap": 8.0, "lse_square_scale": 1e-3, "logit_scale": 1.5},
}


def _inputs(n_rows, hidden, n_cols, dtype, device, bias=True, ignore_fraction=0.25):
    x = (torch.randn(n_rows, hidden) * 1.0).to(device, dtype).requires_grad_()
    w = (torch.randn(n_cols, hidden) / hidden**0.5 * 3).to(device, dtype).requires_grad_()
    b = (torch.randn(n_cols) * 0.5).to(device, dtype).requires_grad_() if bias else None
    target = make_targets(n_rows, n_cols, device, ignore_fraction=ignore_fraction)
    return x, w, b, target


def _check(out, grads, ref, dtype):
    tol = TOLERANCES[dtype]
    assert rel_err(out, ref["loss"]) <= tol["loss"]
    for name, g in zip(("grad_input", "grad_weight", "grad_bias"), grads):
        if ref[name] is not None:
            assert g.dtype == dtype
            assert rel_err(g, ref[name]) <= tol["grad"], name


@pytest.mark.parametrize("chunk_size", [7, 16, 64])  # 7 does not divide 30
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_unfused_reference(impl, dtype, option, reduction, chunk_size, device, poison):
    x, w, b, target = _inputs(30, 24, 130, dtype, device)
    opts = dict(OPTIONS[option])
    if opts.pop("weight", False):
        opts["weight"] = torch.rand(130, device=device) + 0.5
    loss = fusedce.linear_cross_entropy(x, w, target, linear_bias=b, reduction=reduction,
                                        chunk_size=chunk_size, impl=impl, **opts)
    go = torch.randn(30, device=device) if reduction == "none" else torch.tensor(
        0.6, device=device)
    grads = torch.autograd.grad(loss, (x, w, b), go.to(loss.dtype))
    ref = reference_linear(x, w, target, b, go.float(), reduction=reduction, **opts)
    _check(loss, grads, ref, dtype)


def test_all_ignored_and_no_bias(impl, device):
    x, w, _, _ = _inputs(9, 16, 40, torch.float32, device, bias=False)
    target = torch.full((9,), -100, device=device)
    loss = fusedce.linear_cross_entropy(x, w, target, chunk_size=4, impl=impl)
    gx, gw = torch.autograd.grad(loss, (x, w))
    assert loss.item() == 0.0
    assert torch.all(gx == 0) and torch.all(gw == 0)


def test_stats_and_num_items(impl, device):
    x, w, b, target = _inputs(20, 16, 60, torch.float32, device)
    loss, stats = fusedce.linear_cross_entropy(
        x, w, target, linear_bias=b, lse_square_scale=1e-2, num_items_in_batch=40,
        return_stats=True, chunk_size=6, impl=impl)
    gx, gw, gb = torch.autograd.grad(loss, (x, w, b))
    ref = reference_linear(x, w, target, b, lse_square_scale=1e-2, num_items_in_batch=40)
    _check(loss, (gx, gw, gb), ref, torch.float32)
    assert rel_err(stats.lse, ref["lse"]) <= 1e-5
    assert rel_err(stats.z_loss, ref["z_loss"]) <= 1e-5
    assert stats.accuracy.item() == pytest.approx(ref["accuracy"].item())


def test_leading_dimensions_and_module(impl, device):
    """(batch, seq, H) hidden states with (batch, seq) labels, through the module."""
    module = fusedce.LinearCrossEntropyLoss(12, 50, bias=True, reduction="none", chunk_size=5,
                                            impl=impl, device=device)
    hidden = torch.randn(2, 7, 12, device=device, requires_grad=True)
    labels = make_targets(14, 50, device, ignore_fraction=0.2).reshape(2, 7)
    loss = module(hidden, labels)
    assert loss.shape == (2, 7)
    loss.sum().backward()
    ref = reference_linear(hidden.reshape(14, 12), module.linear_weight, labels.reshape(-1),
                           module.linear_bias, torch.ones(14), reduction="none")
    assert rel_err(loss.reshape(-1), ref["loss"]) <= 1e-5
    assert rel_err(hidden.grad.reshape(14, 12), ref["grad_input"]) <= 1e-5
    assert rel_err(module.linear_weight.grad, ref["grad_weight"]) <= 1e-5


def test_weight_gradient_accumulates_in_float32(device):
    """Many chunks of bf16 products: float32 accumulation stays near the float64 answer, where
    accumulating in bf16 drifts."""
    x, w, _, target = _inputs(256, 32, 64, torch.bfloat16, device, bias=False,
                              ignore_fraction=0.0)
    loss = fusedce.linear_cross_entropy(x, w, target, reduction="sum", chunk_size=4)
    _, gw = torch.autograd.grad(loss, (x, w))
    ref = reference_linear(x, w, target, reduction="sum")
    # The same chunked products summed in bf16, as an accumulator of the weight's dtype does.
    acc = torch.zeros_like(w)
    for r0 in range(0, 256, 4):
        logits = x[r0:r0 + 4].detach() @ w.detach().t()
        g = torch.softmax(logits.float(), dim=1)
        g[torch.arange(4), target[r0:r0 + 4]] -= 1
        acc += g.to(torch.bfloat16).t() @ x[r0:r0 + 4].detach()
    ours, bf16_acc = rel_err(gw, ref["grad_weight"]), rel_err(acc, ref["grad_weight"])
    assert ours <= 1e-2
    assert ours < bf16_acc / 2


def test_no_grad_forward_only(device):
    x, w, b, target = _inputs(10, 8, 30, torch.float32, device)
    with torch.no_grad():
        loss = fusedce.linear_cross_entropy(x, w, target, linear_bias=b, chunk_size=3)
    assert not loss.requires_grad
    assert rel_err(loss, reference_linear(x, w, target, b)["loss"]) <= 1e-5


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(w_shape=(30, 9)), ValueError, r"linear_weight must have shape \(C, 8\)"),
    (dict(w_dtype=torch.float64), TypeError, "differs from input dtype"),
    (dict(bias_shape=(29,)), ValueError, "linear_bias must be a"),
    (dict(target_shape=(9,)), ValueError, "does not match input shape"),
    (dict(chunk_size=0), ValueError, "chunk_size must be a positive int"),
    (dict(reduction="avg"), ValueError, "reduction must be"),
])
def test_argument_errors(kwargs, error, message):
    x = torch.randn(10, 8)
    w = torch.randn(*kwargs.pop("w_shape", (30, 8)), dtype=kwargs.pop("w_dtype", torch.float32))
    b = torch.randn(*kwargs.pop("bias_shape", (30,)))
    target = torch.randint(0, 30, kwargs.pop("target_shape", (10,)))
    with pytest.raises(error, match=message):
        fusedce.linear_cross_entropy(x, w, target, linear_bias=b, **kwargs)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_recompute_backward(impl, reduction, device):
    """backward='recompute': the gradients made in the backward, grad_output folded in."""
    x, w, b, target = _inputs(20, 16, 90, torch.float32, device)
    loss = fusedce.linear_cross_entropy(x, w, target, linear_bias=b, reduction=reduction,
                                        chunk_size=7, impl=impl, backward="recompute")
    go = torch.tensor(0.37, device=device)
    grads = torch.autograd.grad(loss, (x, w, b), go)
    _check(loss, grads, reference_linear(x, w, target, b, go, reduction=reduction),
           torch.float32)
