"""Bad input gets a clear error before anything runs; bad targets never cause a stray access."""

from __future__ import annotations

import pytest
import torch

import fusedce
from fusedce import functional


def _inputs(device, n_rows=4, n_cols=10):
    return torch.randn(n_rows, n_cols, device=device), torch.randint(0, n_cols, (n_rows,),
                                                                      device=device)


def test_argument_errors(impl, device):
    x, t = _inputs(device)
    cases = [
        (dict(input=x, target=t[:3]), ValueError, r"target shape \(3,\) does not match"),
        (dict(input=x, target=t.float()), TypeError, "integer class indices"),
        (dict(input=x, target=t.bool()), TypeError, "integer class indices"),
        (dict(input=x.long(), target=t), TypeError, "floating-point logits"),
        (dict(input=x[0, 0], target=t), ValueError, "got a scalar"),
        (dict(input=x, target=t, weight=torch.ones(9, device=device)), ValueError,
         r"weight must have shape \(10,\)"),
        (dict(input=x, target=t, weight=torch.ones(10, dtype=torch.long, device=device)),
         TypeError, "weight must be floating-point"),
        (dict(input=x, target=t, reduction="avg"), ValueError, "reduction must be"),
        (dict(input=x, target=t, label_smoothing=1.5), ValueError, r"label_smoothing must be in"),
        (dict(input=x, target=t, label_smoothing=-0.1), ValueError, r"label_smoothing must be in"),
        (dict(input=x, target=t, ignore_index=1.0), TypeError, "ignore_index must be an int"),
        (dict(input=x.tolist(), target=t), TypeError, "input must be a torch.Tensor"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            fusedce.cross_entropy(**kwargs, impl=impl)


def test_unknown_impl(device):
    x, t = _inputs(device)
    with pytest.raises(ValueError, match="impl must be one of"):
        fusedce.cross_entropy(x, t, impl="cuda")


def test_triton_on_cpu_without_interpreter(monkeypatch):
    import fusedce.kernels

    monkeypatch.setattr(fusedce.kernels, "INTERPRETED", False)
    x, t = _inputs("cpu")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fusedce.cross_entropy(x, t, impl="triton")
    assert functional.resolve_impl("auto", torch.device("cpu")) == "torch"


def test_auto_picks_the_fallback_on_cpu():
    assert functional.resolve_impl("auto", torch.device("cpu")) == "torch"
    assert functional.resolve_impl("torch", torch.device("cpu")) == "torch"


@pytest.mark.parametrize("bad", [10, 11, -1, -101, 2**40])
def test_fallback_names_out_of_range_target(bad, device):
    x, t = _inputs(device)
    t[2] = bad
    with pytest.raises(ValueError, match=rf"target\[2\] = {bad} is outside the class range"):
        fusedce.cross_entropy(x, t, impl="torch")


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_kernel_gives_nan_for_out_of_range_target(reduction, device, poison):
    """Targets far outside [0, C) are never used as addresses; their rows come out NaN."""
    x, t = _inputs(device, n_rows=6, n_cols=300)
    x.requires_grad_()
    t[1] = 2**40
    t[4] = -(2**40)
    loss = fusedce.cross_entropy(x, t, reduction=reduction, label_smoothing=0.1, impl="triton")
    loss.sum().backward()
    if reduction == "none":
        assert torch.isnan(loss[[1, 4]]).all()
        assert torch.isfinite(loss[[0, 2, 3, 5]]).all()
    else:
        assert torch.isnan(loss)
    assert torch.isnan(x.grad[[1, 4]]).all()
    assert torch.isfinite(x.grad[[0, 2, 3, 5]]).all()


def test_auto_on_cuda_without_kernels_warns_once(monkeypatch):
    """A CUDA tensor with impl='auto' when fusedce.kernels cannot be imported (Triton missing,
    or a checkout without an install): one loud warning naming the fix, then PyTorch."""
    from fusedce import checks

    monkeypatch.setattr(checks, "kernels_importable", lambda: (False, "ImportError: test"))
    monkeypatch.setattr(checks, "_WARNED", set())
    cuda = torch.device("cuda")
    with pytest.warns(RuntimeWarning, match=r"pip install -e \."):
        assert functional.resolve_impl("auto", cuda) == "torch"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert functional.resolve_impl("auto", cuda) == "torch"  # once only
    with pytest.raises(RuntimeError, match="failed to import"):
        functional.resolve_impl("triton", cuda)
