"""The PyTorch implementation's compiled CPU loops (``fusedce.cpu_fused``): used exactly where
they apply, the same answers as the eager composition and the float64 formula, and a failed
compilation falls back to the eager composition with a warning, never a wrong or refused call."""

from __future__ import annotations

import pytest
import torch

import fusedce
from fusedce import cpu_fused
from fusedce.testing import make_logits, make_targets, reference_extras, rel_err

TOL = {torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _run(x, t, **kw):
    y = x.clone().requires_grad_()
    loss = fusedce.cross_entropy(y, t, impl="torch", **kw)
    go = torch.randn(loss.shape, generator=torch.Generator().manual_seed(1)) \
        if loss.dim() else torch.tensor(0.7)
    loss.backward(go.to(loss.dtype))
    return loss.detach(), y.grad, go


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_compiled_loops_match_eager_and_the_formula(monkeypatch, dtype, reduction):
    x = make_logits(70, 1000, dtype)  # several compiled chunks with a small chunk size
    t = make_targets(70, 1000, ignore_fraction=0.3)
    x[3, 5] = float("nan")
    t[3] = -100  # an ignored row with a NaN logit: loss 0, gradient exactly 0
    monkeypatch.setattr(cpu_fused, "CHUNK_ELEMENTS", 16 * 1000)
    calls = []
    real = cpu_fused.ce_fwd
    monkeypatch.setattr(cpu_fused, "ce_fwd", lambda *a: calls.append(1) or real(*a))
    fused = _run(x, t, reduction=reduction)
    assert calls, "the compiled loops did not run"
    monkeypatch.setitem(cpu_fused._STATE, "enabled", False)
    calls.clear()
    eager = _run(x, t, reduction=reduction)
    assert not calls
    ref = reference_extras(x, t, reduction=reduction, grad_output=fused[2])
    ok = ~torch.isnan(ref["grad"]).any(dim=1)
    for loss, grad, _ in (fused, eager):
        if reduction == "none":
            assert rel_err(loss[ok], ref["loss"][ok]) < TOL[dtype]
            assert loss[3] == 0
        else:
            assert rel_err(loss, ref["loss"]) < TOL[dtype]
        assert rel_err(grad[ok], ref["grad"][ok]) < TOL[dtype]
        assert torch.all(grad[3] == 0)
    assert rel_err(fused[1], eager[1]) < TOL[dtype]


def test_options_outside_the_common_case_take_the_eager_composition(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_fused, "ce_fwd", lambda *a: calls.append(1))
    x, t = make_logits(8, 50, torch.float32), make_targets(8, 50)
    for kw in (dict(label_smoothing=0.1), dict(softcap=5.0), dict(return_stats=True),
               dict(weight=torch.rand(50)), dict(lse_square_scale=1e-3),
               dict(batch_invariant=True), dict(temperature=0.5)):
        fusedce.cross_entropy(x, t, impl="torch", **kw)
    x64 = x.double()
    fusedce.cross_entropy(x64, t)
    assert not calls


def test_a_failed_compilation_falls_back_with_a_warning(monkeypatch):
    def broken(fn, **kw):
        def run(*args):
            raise RuntimeError("no C++ compiler here")
        return run

    monkeypatch.setattr(cpu_fused, "_COMPILED", {})
    monkeypatch.setitem(cpu_fused._STATE, "enabled", True)
    monkeypatch.setattr(torch, "compile", broken)
    x, t = make_logits(6, 40, torch.bfloat16), make_targets(6, 40)
    y = x.clone().requires_grad_() * 1
    with pytest.warns(RuntimeWarning, match="no C.. compiler here"):
        loss = fusedce.cross_entropy(y, t, impl="torch", inplace_backward=True)
    assert not cpu_fused._STATE["enabled"]
    ref = reference_extras(x, t)
    assert rel_err(loss, ref["loss"]) < 1e-2
