"""Every tensor input of every entry point, in every layout a user can hand over: the result
equals the float64 formula, and no element of the caller's tensors (nor of the storage they are
views of) changes.  ``test_layouts.py`` covers the logits; this file covers the rest: targets,
class and token weights, ``grad_output``, ``num_items_in_batch``, the statistics' incoming
gradients, hidden states and LM-head weights and biases of the fused linear loss, and the labels,
masks, ``cu_seqlens`` and ``position_ids`` of the shifted losses.

A strided or offset layout is a view of a larger buffer whose other elements are junk (NaN for
floating point, other valid class ids for integers), so an input read by the wrong offsets gives
a wrong answer, never a lucky one.
"""

from __future__ import annotations

import pytest
import torch

import fusedce
from fusedce.testing import make_logits, reference_extras, reference_linear, rel_err
from helpers import function_loss

N, C, H = 6, 50, 8
IGNORE = -100
TOL = 2e-5

LAYOUTS = ["contiguous", "strided", "offset", "column", "expanded"]


def _junk(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point():
        return torch.full_like(t, float("nan"))
    return torch.where(t == IGNORE, 1, (t + 7) % C)  # other valid classes


def as_layout(t: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, base): ``t``'s values as ``layout``, and the tensor that owns the storage (to compare
    bitwise after the call).  ``expanded`` changes the values (every element is the first)."""
    if layout == "contiguous":
        x = t.clone()
        return x, x
    if layout == "strided":  # every other element of a buffer twice as long
        base = torch.stack([t, _junk(t)], dim=-1)
        return base[..., 0], base
    if layout == "offset":  # a view three elements into its storage
        base = torch.cat([_junk(t).reshape(-1)[:3].reshape(-1), t.reshape(-1)])
        if base.numel() < t.numel() + 3:
            base = torch.cat([_junk(t).reshape(-1).repeat(3)[:3], t.reshape(-1)])
        return base[3:].view(t.shape), base
    if layout == "column":  # a column of a (numel, 3) buffer
        base = torch.stack([_junk(t).reshape(-1), t.reshape(-1), _junk(t).reshape(-1)], dim=1)
        return base[:, 1].view(t.shape) if t.dim() <= 1 else base[:, 1].reshape(t.shape), base
    if layout == "expanded":
        base = t.reshape(-1)[:1].clone()
        return base.expand(t.shape), base
    raise ValueError(layout)


def _targets(n: int = N, c: int = C) -> torch.Tensor:
    t = torch.randint(0, c, (n,))
    t[1] = IGNORE
    return t


def _check_same(before: list[torch.Tensor], after: list[torch.Tensor]) -> None:
    for b, a in zip(before, after):
        assert torch.equal(b.view(torch.uint8) if b.dtype == torch.bool else b, a) or (
            b.is_floating_point() and torch.equal(b.isnan(), a.isnan())
            and torch.equal(torch.nan_to_num(b), torch.nan_to_num(a))), "caller's tensor changed"


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.uint8])
def test_target_layouts(impl, device, layout, dtype):
    """Targets: strided, offset, column and expanded views of every integer dtype; the loss,
    per-row loss and gradient are the formula's, in both implementations."""
    logits = make_logits(N, C, torch.float32, device=device)
    target = _targets()
    if dtype == torch.uint8:
        target[1] = 0
        ignore = 255
        target[2] = ignore
    else:
        ignore = IGNORE
    target = target.to(dtype).to(device)
    t, base = as_layout(target, layout)
    saved = base.clone()
    for reduction in ("mean", "none"):
        x = logits.clone().requires_grad_()
        go = torch.randn(N, device=device) if reduction == "none" else torch.tensor(0.7)
        loss = fusedce.cross_entropy(x, t, ignore_index=ignore, reduction=reduction,
                                     label_smoothing=0.1, impl=impl)
        loss.backward(go.to(loss.dtype) if reduction == "none" else go)
        ref = reference_extras(logits, t.long(), ignore_index=ignore, reduction=reduction,
                               label_smoothing=0.1, grad_output=go)
        assert rel_err(loss, ref["loss"]) < TOL and rel_err(x.grad, ref["grad"]) < TOL
    assert torch.equal(base, saved)


@pytest.mark.parametrize("layout", LAYOUTS + ["bfloat16", "float16"])
@pytest.mark.parametrize("which", ["weight", "token_weight", "grad_output", "lse_grad",
                                   "entropy_grad"])
def test_per_row_and_per_class_inputs(impl, device, layout, which):
    """Class weights (C,), token weights (N,), a per-token ``grad_output`` (N,) and the
    statistics' incoming gradients (N,) in every layout and narrow dtype."""
    logits = make_logits(N, C, torch.float32, device=device)
    target = _targets().to(device)
    size = C if which == "weight" else N
    values = torch.rand(size, device=device) + 0.5
    if layout in ("bfloat16", "float16"):
        v, base = values.to(getattr(torch, layout)), None
    else:
        v, base = as_layout(values, layout)
    saved = base.clone() if base is not None else None
    exact = v.double()  # the values as handed over (rounded, or all equal when expanded)
    kw = dict(reduction="none", label_smoothing=0.1, impl=impl)
    x = logits.clone().requires_grad_()
    coef = {}
    if which == "weight":
        kw["weight"] = v
    elif which == "token_weight":
        kw["token_weight"] = v
    if which in ("lse_grad", "entropy_grad"):
        loss, stats = fusedce.cross_entropy(x, target, return_stats=True,
                                            differentiable_stats=True, **kw)
        stat = stats.lse if which == "lse_grad" else stats.entropy
        # The statistic's incoming gradient is ``v`` itself, in its layout.
        torch.autograd.backward([loss, stat], [torch.ones_like(loss), v.to(stat.dtype)])
        coef = {"loss": torch.ones(N), which.split("_")[0]: exact.cpu()}
        from fusedce.testing import reference_objective

        ref = reference_objective(logits, target, coef, label_smoothing=0.1)
        assert rel_err(x.grad, ref["grad"]) < TOL
    else:
        loss = fusedce.cross_entropy(x, target, **kw)
        go = v if which == "grad_output" else torch.ones(N, device=device)
        loss.backward(go.to(loss.dtype))
        ref = reference_extras(
            logits, target, exact.cpu() if which == "weight" else None, reduction="none",
            label_smoothing=0.1, grad_output=go.double().cpu(),
            token_weight=exact.cpu() if which == "token_weight" else None)
        assert rel_err(loss, ref["loss"]) < TOL and rel_err(x.grad, ref["grad"]) < TOL
    if base is not None:
        _check_same([saved], [base])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_mean_with_weights_and_token_weights(impl, device, layout):
    """The mean's denominator reads the targets and both weights: strided ones included."""
    logits = make_logits(N, C, torch.float32, device=device)
    target, _ = as_layout(_targets().to(device), layout)
    weight, _ = as_layout(torch.rand(C, device=device) + 0.5, layout)
    token_weight, _ = as_layout(torch.rand(N, device=device) + 0.5, layout)
    for kw in (dict(weight=weight), dict(token_weight=token_weight),
               dict(weight=weight, token_weight=token_weight)):
        x = logits.clone().requires_grad_()
        loss = fusedce.cross_entropy(x, target, impl=impl, **kw)
        loss.backward()
        ref = reference_extras(logits, target.cpu(), kw.get("weight"), grad_output=1.0,
                               token_weight=kw.get("token_weight"))
        assert rel_err(loss, ref["loss"]) < TOL and rel_err(x.grad, ref["grad"]) < TOL


@pytest.mark.parametrize("items", ["int", "float", "0-d int32", "(1,) float64", "offset",
                                   "bfloat16"])
def test_num_items_in_batch_forms(impl, device, items):
    logits = make_logits(N, C, torch.float32, device=device)
    target = _targets().to(device)
    value = {"int": 9, "float": 9.0, "0-d int32": torch.tensor(9, dtype=torch.int32),
             "(1,) float64": torch.tensor([9.0], dtype=torch.float64),
             "offset": torch.tensor([1.0, 9.0])[1:], "bfloat16": torch.tensor(9.0,
                                                                             dtype=torch.bfloat16)
             }[items]
    x = logits.clone().requires_grad_()
    loss = fusedce.cross_entropy(x, target, num_items_in_batch=value, impl=impl)
    loss.backward()
    ref = reference_extras(logits, target, grad_output=1.0, num_items_in_batch=9)
    assert rel_err(loss, ref["loss"]) < TOL and rel_err(x.grad, ref["grad"]) < TOL


def test_kernels_split_path_with_strided_per_row_inputs(device):
    """The kernels' multi-block and split-vocabulary paths read strided targets and token
    weights by their layout too (the Function, tiny blocks)."""
    logits = make_logits(5, 300, torch.float32, device=device)
    target, _ = as_layout(_targets(5, 300).to(device), "strided")
    for n_splits in (1, 3):
        x = logits.clone().requires_grad_()
        loss, *_ = function_loss(x, target, reduction="sum", label_smoothing=0.1,
                                 block_size=16, n_splits=n_splits)
        loss.backward()
        ref = reference_extras(logits, target.cpu(), reduction="sum", label_smoothing=0.1,
                               grad_output=1.0)
        assert rel_err(loss, ref["loss"]) < TOL and rel_err(x.grad, ref["grad"]) < TOL


@pytest.mark.parametrize("which", ["input", "linear_weight", "linear_bias", "target", "weight",
                                   "token_weight"])
@pytest.mark.parametrize("layout", ["strided", "offset", "column", "expanded"])
def test_linear_inputs_layouts(impl, device, which, layout):
    """Fused linear: hidden states, the LM head's weight and bias, targets and both weights in
    every layout (the targets are what the kernels read by offset)."""
    args = dict(input=torch.randn(N, H, device=device), linear_weight=torch.randn(C, H,
                                                                                  device=device),
                linear_bias=torch.randn(C, device=device), target=_targets().to(device),
                weight=torch.rand(C, device=device) + 0.5,
                token_weight=torch.rand(N, device=device) + 0.5)
    if which in ("input", "linear_weight") and layout == "column":
        layout = "strided"
    args[which], base = as_layout(args[which], layout)
    saved = base.clone()
    for k in ("input", "linear_weight", "linear_bias"):
        args[k].requires_grad_()  # a leaf (a view of a buffer that needs no gradient)
    loss = fusedce.linear_cross_entropy(
        args["input"], args["linear_weight"], args["target"], linear_bias=args["linear_bias"],
        weight=args["weight"], token_weight=args["token_weight"], label_smoothing=0.1,
        impl=impl)
    loss.backward()
    ref = reference_linear(args["input"], args["linear_weight"], args["target"].cpu(),
                           args["linear_bias"], weight=args["weight"].cpu(),
                           token_weight=args["token_weight"].cpu(), label_smoothing=0.1)
    assert rel_err(loss, ref["loss"]) < TOL
    for k, g in (("input", "grad_input"), ("linear_weight", "grad_weight"),
                 ("linear_bias", "grad_bias")):
        # (an expanded LM head makes every logit equal: gradients that cancel to ~0)
        got, want = args[k].grad.double().cpu(), ref[g]
        assert rel_err(got, want) < TOL or (got - want).norm() < 1e-6, k
    _check_same([saved], [base.detach()])


@pytest.mark.parametrize("layout", ["strided", "offset", "column", "expanded"])
@pytest.mark.parametrize("which", ["labels", "attention_mask", "position_ids"])
def test_shifted_alignment_inputs_layouts(impl, device, which, layout):
    """The shifted loss's labels, attention mask and position ids in every layout and narrow
    dtype give the targets the explicit rolling gives."""
    b_n, t_n = 2, 7
    labels = torch.randint(0, C, (b_n, t_n), device=device)
    extra = {"attention_mask": (torch.rand(b_n, t_n, device=device) > 0.3).long(),
             "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2, 3], [0, 1, 0, 1, 2, 3, 4]],
                                          device=device)}
    given = {"labels": labels, which: extra[which]} if which != "labels" else {"labels": labels}
    given[which], base = as_layout(given[which], layout)
    saved = base.clone()
    if which == "attention_mask":
        given[which] = given[which].to(torch.uint8)  # a narrow dtype as well
    logits = make_logits(b_n * t_n, C, torch.float32, device=device).reshape(b_n, t_n, C)
    x = logits.clone().requires_grad_()
    kw = {k: v for k, v in given.items() if k != "labels"}
    loss = fusedce.shifted_cross_entropy(x, given["labels"], 1, impl=impl, **kw)
    loss.backward()
    # The reference: explicit targets from contiguous copies of the same values.
    target = given["labels"].clone().long()
    rolled = torch.full_like(target, IGNORE)
    rolled[:, :-1] = target[:, 1:]
    if "attention_mask" in kw:
        m = kw["attention_mask"].clone()
        rolled[:, :-1] = torch.where(m[:, 1:] != 0, rolled[:, :-1], IGNORE)
    if "position_ids" in kw:
        p = kw["position_ids"].clone().long()
        rolled[:, :-1] = torch.where(p[:, 1:] - p[:, :-1] == 1, rolled[:, :-1], IGNORE)
    ref = reference_extras(logits.reshape(-1, C), rolled.reshape(-1).cpu(), grad_output=1.0)
    assert rel_err(loss, ref["loss"]) < TOL
    assert rel_err(x.grad.reshape(-1, C), ref["grad"]) < TOL
    _check_same([saved], [base])


@pytest.mark.parametrize("layout", ["strided", "offset", "int64"])
def test_cu_seqlens_layouts(device, layout):
    labels = torch.randint(0, C, (1, 10), device=device)
    cu = torch.tensor([0, 3, 7, 10], dtype=torch.int32, device=device)
    if layout == "int64":
        cu_given = cu.long()
    else:
        cu_given, _ = as_layout(cu, layout)
    got = fusedce.shifted_targets(labels, 1, cu_seqlens=cu_given)
    want = fusedce.shifted_targets(labels, 1, cu_seqlens=cu.clone())
    assert torch.equal(got, want)
    assert got[0, 2] == IGNORE and got[0, 6] == IGNORE and got[0, 9] == IGNORE
