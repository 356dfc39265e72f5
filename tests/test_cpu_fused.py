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
    for kw in (dict(label_smoothing=0.1), dict(softcap=5.0), dict(weight=torch.rand(50)),
               dict(lse_square_scale=1e-3)):
        fusedce.cross_entropy(x, t, impl="torch", **kw)
    x64 = x.double()
    fusedce.cross_entropy(x64, t)
    # With a gradient: the statistics, batch invariance and a temperature too.
    for kw in (dict(return_stats=True), dict(batch_invariant=True), dict(temperature=0.5)):
        fusedce.cross_entropy(x.clone().requires_grad_(), t, impl="torch", **kw)
    assert not calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_only_statistics_and_temperature(monkeypatch, dtype):
    """Without a gradient, one compiled call gives the loss at a temperature, the entropy, the
    first argmax (ties, a NaN row, an all -inf row) and the accuracy: the eager composition's
    answers and the float64 formulas', with ignored rows exact zeros (argmax -1); and
    token_logprobs (batch-invariant) runs it."""
    x = make_logits(40, 300, dtype)
    t = make_targets(40, 300, ignore_fraction=0.25)
    x[1, [7, 9]] = x[1].max() + 1  # a tie: the first index
    t[1] = 9
    x[2, 11] = float("nan")
    t[2] = -100
    x[3] = float("-inf")
    t[3] = -100
    x[4, :100] = float("-inf")  # masked columns add nothing to the entropy
    t[4] = 200
    calls = []
    real = cpu_fused._call
    monkeypatch.setattr(cpu_fused, "_call", lambda name, *a: calls.append(name) or real(name, *a))
    with torch.no_grad():
        loss, stats = fusedce.cross_entropy(x, t, impl="torch", reduction="none",
                                            temperature=0.7, return_stats=True)
        logp = fusedce.token_logprobs(x, t, impl="torch", temperature=0.7)
    assert calls and set(calls) == {"forward_stats", "forward"}
    monkeypatch.setitem(cpu_fused._STATE, "enabled", False)
    eager_loss, eager_stats = fusedce.cross_entropy(x, t, impl="torch", reduction="none",
                                                    temperature=0.7, return_stats=True)
    counted = t != -100
    z = x.double() / 0.7
    log_q = torch.log_softmax(z, -1)
    safe = torch.where(counted, t, 0)
    ref_loss = torch.where(counted, -log_q.gather(1, safe[:, None]).squeeze(1), 0.0)
    p = log_q.exp()
    ref_h = torch.where(counted, -torch.where(p > 0, p * log_q, 0.0).sum(-1), 0.0)
    ok = counted.clone()
    for ours in (loss, eager_loss):
        assert rel_err(ours[ok], ref_loss[ok]) < TOL[dtype]
        assert torch.all(ours[~counted] == 0)
    assert rel_err(stats.entropy[ok], ref_h[ok]) < TOL[dtype] * 10
    assert rel_err(stats.entropy, eager_stats.entropy) < TOL[dtype] * 10
    assert torch.all(stats.entropy[~counted] == 0)
    assert torch.equal(stats.argmax, eager_stats.argmax)
    assert stats.argmax[1] == 7 and torch.all(stats.argmax[~counted] == -1)
    assert stats.accuracy == eager_stats.accuracy
    assert logp.dtype == torch.float32 and torch.all(logp[~counted] == 0)
    assert rel_err(-logp[ok], ref_loss[ok]) < 1e-5  # (float32 from the same logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_only_batch_invariant(dtype):
    """batch_invariant without a gradient: one row's loss, entropy and argmax bitwise the same
    alone, in batches that fill whole fixed-size calls, and padded into the last one, at the
    front, middle and back, in packed and strided logits."""
    g = torch.Generator().manual_seed(5)
    n_cols = 333
    row = (torch.randn(n_cols, generator=g) * 3).to(dtype)
    results = []
    rows = cpu_fused.INVARIANT_ROWS
    for size in (1, 7, rows, 3 * rows, 3 * rows + 5):
        for pos in {0, size // 2, size - 1}:
            for strided in (False, True):
                wide = (torch.randn(size, n_cols + 8, generator=g) * 3).to(dtype)
                x = wide[:, :n_cols] if strided else wide[:, :n_cols].contiguous()
                x[pos] = row
                t = torch.randint(0, n_cols, (size,), generator=g)
                t[pos] = 17
                with torch.no_grad():
                    loss, stats = fusedce.cross_entropy(
                        x, t, impl="torch", reduction="none", temperature=0.8,
                        batch_invariant=True, return_stats=True)
                results.append((loss[pos], stats.entropy[pos], stats.argmax[pos]))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


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
