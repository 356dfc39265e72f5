"""Inputs that once gave a silent wrong answer, an unclear error or a crash: each now gives
PyTorch's answer, a documented deviation, or a clear error before anything is computed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fusedce
from fusedce.testing import make_logits, make_targets, reference_linear, rel_err

# ---------------------------------------------------------------------------------------------
# Double backward


def _penalty_case(device):
    h = torch.randn(6, 8, device=device, requires_grad=True)
    w = torch.randn(30, 8, device=device, requires_grad=True)
    target = make_targets(6, 30, device)
    return h, w, target


def test_double_backward_is_refused_clearly(impl, device):
    """A gradient penalty needs the second-order term; fusedce's backward is first-order only,
    so create_graph=True raises an error naming fusedce instead of dropping that term."""
    h, w, target = _penalty_case(device)
    loss = fusedce.cross_entropy(h @ w.t(), target, impl=impl)
    with pytest.raises(RuntimeError, match="fusedce.cross_entropy does not support double"):
        torch.autograd.grad(loss, h, create_graph=True)


def test_hessian_vector_product_is_refused_clearly(impl, device):
    h, w, target = _penalty_case(device)
    loss = fusedce.cross_entropy(h @ w.t(), target, reduction="none", impl=impl).sum()
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.functional.hvp(lambda x: fusedce.cross_entropy(
            x @ w.detach().t(), target, impl=impl), h.detach(), torch.ones_like(h))
    del loss


def test_linear_double_backward_is_refused(impl, device):
    h, w, target = _penalty_case(device)
    loss = fusedce.linear_cross_entropy(h, w, target, impl=impl)
    with pytest.raises(RuntimeError, match="fusedce.linear_cross_entropy does not support"):
        torch.autograd.grad(loss, h, create_graph=True)


# ---------------------------------------------------------------------------------------------
# Numerics: everything relative to the row max; float64 in float64


@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.2, "weight": True}],
                         ids=["plain", "smoothing+weight"])
def test_large_offsets_keep_full_precision(impl, options, device):
    """Logits near 1e4 in float32: the loss is as exact as PyTorch's (the old lse - z_t form
    lost 3e-5 relative)."""
    logits = (make_logits(9, 700, torch.float32, device) + 1e4).requires_grad_()
    target = make_targets(9, 700, device, ignore_fraction=0.2)
    weight = torch.rand(700, device=device) + 0.5 if options.get("weight") else None
    eps = options.get("label_smoothing", 0.0)
    loss = fusedce.cross_entropy(logits, target, weight, reduction="none", label_smoothing=eps,
                                 impl=impl)
    loss.sum().backward()
    x64 = logits.detach().double().requires_grad_()
    ref = F.cross_entropy(x64, target, weight.double() if weight is not None else None,
                          reduction="none", label_smoothing=eps)
    ref.sum().backward()
    assert rel_err(loss, ref) <= 2e-6
    assert rel_err(logits.grad, x64.grad) <= 2e-6


def test_tied_huge_maxima_share_the_probability(impl, device):
    """bf16 logits near 1e37 with two tied maxima: each gets probability 1/2, as in PyTorch."""
    logits = torch.full((3, 50), -1e37, device=device).to(torch.bfloat16)
    logits[:, 7] = logits[:, 19] = 1e37
    logits.requires_grad_()
    target = torch.tensor([7, 19, 3], device=device)
    loss = fusedce.cross_entropy(logits, target, reduction="none", impl=impl)
    loss.sum().backward()
    assert torch.allclose(loss[:2].float(), torch.full((2,), 0.6931, device=device), rtol=1e-2)
    g = logits.grad.float()
    assert torch.allclose(g[0, [7, 19]], torch.tensor([-0.5, 0.5], device=device))
    assert torch.allclose(g[1, [7, 19]], torch.tensor([0.5, -0.5], device=device))


def test_float64_is_computed_in_float64(device):
    """The PyTorch implementation is what GPU results are checked against: float64 logits give
    float64-exact answers (impl='auto' picks it for float64 on any device)."""
    logits = (make_logits(7, 300, torch.float64, device) * 3).requires_grad_()
    target = make_targets(7, 300, device, ignore_fraction=0.2)
    weight = torch.rand(300, dtype=torch.float64, device=device)
    for reduction in ("none", "mean"):
        loss = fusedce.cross_entropy(logits, target, weight, reduction=reduction,
                                     label_smoothing=0.1, softcap=20.0)
        loss.sum().backward()
        x = logits.detach().clone().requires_grad_()
        ref = F.cross_entropy(20.0 * torch.tanh(x / 20.0), target, weight, reduction=reduction,
                              label_smoothing=0.1)
        ref.sum().backward()
        assert loss.dtype == torch.float64
        assert rel_err(loss, ref) <= 1e-13
        assert rel_err(logits.grad, x.grad) <= 1e-13
        logits.grad = None
    with pytest.raises(ValueError, match="cannot run float64"):
        fusedce.cross_entropy(logits, target, impl="triton")


# ---------------------------------------------------------------------------------------------
# Clear errors and chosen behaviours


@pytest.mark.parametrize("case", ["no_classes", "num_items_meta", "num_items_zero_int",
                                  "num_items_negative_cpu_tensor", "weight_requires_grad",
                                  "int_target_shaped_like_input"])
def test_clear_errors(case, impl, device):
    x = make_logits(4, 10, torch.float32, device).requires_grad_()
    t = make_targets(4, 10, device)
    kwargs, error, message = {
        "no_classes": (dict(input=torch.randn(4, 0, device=device)), ValueError,
                       "input has 0 classes"),
        "num_items_meta": (dict(num_items_in_batch=torch.tensor(3, device="meta")), ValueError,
                           "num_items_in_batch is on meta"),
        "num_items_zero_int": (dict(num_items_in_batch=0), ValueError, "must be positive"),
        "num_items_negative_cpu_tensor": (dict(num_items_in_batch=torch.tensor(-2)),
                                          ValueError, "must be positive"),
        "weight_requires_grad": (dict(weight=torch.rand(10, device=device,
                                                        requires_grad=True)),
                                 ValueError, "weight requires grad"),
        "int_target_shaped_like_input": (dict(target=torch.zeros(4, 10, dtype=torch.long,
                                                                 device=device)),
                                         ValueError, "without the class dimension"),
    }[case]
    args = dict(input=x, target=t)
    args.update(kwargs)
    before = x.detach().clone()
    with pytest.raises(error, match=message):
        fusedce.cross_entropy(**args, impl=impl, inplace_backward=False)
    assert torch.equal(x.detach(), before)


def test_zero_weight_sum_gives_zero(impl, device):
    """Class weights adding up to 0 over the counted targets: loss +0 and a zero gradient, like
    a batch with no counted target (PyTorch: NaN or inf)."""
    logits = make_logits(4, 6, torch.float32, device).requires_grad_()
    weight = torch.tensor([1.0, -1.0, 0.0, 2.0, 0.0, 0.0], device=device)
    for target in ([0, 1, -100, -100], [2, 4, 5, -100]):
        t = torch.tensor(target, device=device)
        loss = fusedce.cross_entropy(logits, t, weight, impl=impl)
        loss.backward()
        assert loss.item() == 0.0 and not torch.signbit(loss).item()
        assert torch.all(logits.grad == 0)
        logits.grad = None


def test_independent_of_the_default_dtype(impl, device):
    torch.set_default_dtype(torch.float64)
    try:
        for dtype in (torch.float32, torch.bfloat16):
            logits = make_logits(5, 200, dtype, device)
            target = make_targets(5, 200, device)
            x = logits.clone().requires_grad_()
            loss = fusedce.cross_entropy(x, target, label_smoothing=0.1, impl=impl)
            loss.backward()
            with torch.no_grad():
                fusedce.cross_entropy(logits, target, impl=impl)
            assert loss.dtype == dtype and x.grad.dtype == dtype
    finally:
        torch.set_default_dtype(torch.float32)


def test_per_token_grad_output_is_rounded_once(impl, device):
    """reduction='none' with a per-token grad_output on bf16 logits: the gradient is formed in
    float32 with grad_output folded in and rounded to bf16 once, bit for bit."""
    logits = make_logits(6, 500, torch.bfloat16, device)
    target = make_targets(6, 500, device, ignore_fraction=0.2)
    go = torch.randn(6, device=device)
    x16 = logits.clone().requires_grad_()
    fusedce.cross_entropy(x16, target, reduction="none", impl=impl).backward(go.bfloat16())
    x32 = logits.float().requires_grad_()
    fusedce.cross_entropy(x32, target, reduction="none", impl=impl).backward(
        go.bfloat16().float())
    assert torch.equal(x16.grad, _round_like(impl, x32.grad))


def _round_like(impl: str, g: torch.Tensor) -> torch.Tensor:
    """float32 -> bf16 as the implementation's one rounding does it: round to nearest even,
    except in Triton's interpreter, whose float32 -> bf16 conversion truncates."""
    if impl == "triton" and g.device.type == "cpu":
        return (g.view(torch.int32) & -65536).view(torch.float32).bfloat16()
    return g.bfloat16()


# ---------------------------------------------------------------------------------------------
# Fused linear cross-entropy


def test_linear_keeps_chunk_logits_in_float32(impl, device):
    """bf16 hidden states and head: every row's lse is at least as accurate as the 16-bit
    PyTorch path's (logits rounded to bf16, then logsumexp), and float32 losses on request."""
    x = torch.randn(40, 32, device=device).bfloat16()
    w = (torch.randn(500, 32, device=device) * 0.5).bfloat16()
    b = torch.randn(500, device=device).bfloat16()
    target = make_targets(40, 500, device)
    loss, stats = fusedce.linear_cross_entropy(x, w, target, linear_bias=b, reduction="none",
                                               return_stats=True, out_dtype=torch.float32,
                                               chunk_size=16, impl=impl)
    assert loss.dtype == torch.float32
    exact = torch.logsumexp(x.double() @ w.double().t() + b.double(), dim=1)
    ours = (stats.lse.double() - exact).abs()
    bf16_path = (torch.logsumexp(F.linear(x, w, b).float(), dim=1).double() - exact).abs()
    assert torch.all(ours <= bf16_path + 1e-5 * exact.abs())
    assert ours.max() < bf16_path.max() / 4


def test_linear_probability_targets(device):
    x = torch.randn(7, 12, device=device, requires_grad=True)
    w = torch.randn(20, 12, device=device, requires_grad=True)
    probs = torch.softmax(torch.randn(7, 20, device=device), dim=1)
    loss = fusedce.linear_cross_entropy(x, w, probs, label_smoothing=0.1)
    ref = F.cross_entropy(x @ w.t(), probs, label_smoothing=0.1)
    assert torch.allclose(loss, ref)
    gx, gw = torch.autograd.grad(loss, (x, w))
    rx, rw = torch.autograd.grad(ref, (x, w))
    assert torch.allclose(gx, rx) and torch.allclose(gw, rw)


def test_linear_float64(device):
    x = torch.randn(9, 6, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.randn(40, 6, dtype=torch.float64, device=device, requires_grad=True)
    target = make_targets(9, 40, device)
    loss = fusedce.linear_cross_entropy(x, w, target, chunk_size=4)
    gx, gw = torch.autograd.grad(loss, (x, w))
    ref = reference_linear(x, w, target)
    assert rel_err(loss, ref["loss"]) <= 1e-13
    assert rel_err(gx, ref["grad_input"]) <= 1e-13 and rel_err(gw, ref["grad_weight"]) <= 1e-13
