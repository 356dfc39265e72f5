"""The options table (``fusedce.options``) is the one source of every keyword option: each
public function and module takes exactly its entry point's options, with the table's defaults,
checks and docs, and nothing drifts from it."""

from __future__ import annotations

import inspect

import pytest
import torch

import fusedce
from fusedce import options
from fusedce.spec import FIELD_NAMES

PUBLIC = {
    options.CE: fusedce.cross_entropy,
    options.LINEAR: fusedce.linear_cross_entropy,
    options.CE_MODULE: fusedce.CrossEntropyLoss,
    options.LINEAR_MODULE: fusedce.LinearCrossEntropyLoss,
}
# PyTorch's own arguments, explicit in every signature, with PyTorch's defaults.
PYTORCH = {"weight": None, "ignore_index": -100, "reduction": "mean", "label_smoothing": 0.0}


@pytest.mark.parametrize("entry", list(PUBLIC))
def test_signature_and_docs_follow_the_table(entry):
    public = PUBLIC[entry]
    params = inspect.signature(public).parameters
    for o in options.keyword_options(entry):
        assert o.name in params, f"{entry} lacks option {o.name}"
        assert params[o.name].kind == inspect.Parameter.KEYWORD_ONLY
        assert params[o.name].default == o.default or (
            o.default is None and params[o.name].default is None)
        assert o.name in public.__doc__ and o.doc.split()[0] in public.__doc__
    for name, default in PYTORCH.items():
        assert params[name].default == default
    table = {o.name for o in options.OPTIONS}
    for name in params:
        # nothing outside the table and PyTorch's arguments (and the modules' own arguments)
        assert name in table or name in PYTORCH or name in (
            "input", "target", "linear_weight", "linear_bias", "self", "in_features",
            "num_classes", "bias", "device", "dtype"), f"{entry}: {name} is not in the table"
    others = {o.name for o in options.OPTIONS} - {o.name for o in options.keyword_options(entry)}
    for name in others:
        assert name not in params
    assert "{options}" not in public.__doc__


def test_unknown_and_bad_keywords_are_refused_before_anything_runs():
    x, t = torch.randn(3, 5), torch.tensor([0, 1, 2])
    with pytest.raises(TypeError, match="unexpected keyword argument 'softcapp'"):
        fusedce.cross_entropy(x, t, softcapp=3.0)
    with pytest.raises(TypeError, match="unexpected keyword argument 'inplace_backward'"):
        fusedce.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), t,
                                     inplace_backward=True)
    with pytest.raises(TypeError, match="unexpected keyword argument 'chunk_size'"):
        fusedce.CrossEntropyLoss(chunk_size=4)
    for o in options.OPTIONS:
        if o.check is None:
            continue
        bad = "not a valid value" if not isinstance(o.default, str) else "nonsense"
        with pytest.raises((TypeError, ValueError), match=o.name):
            o.check(bad)
        o.check(o.default)  # (a call checks only the values it was given: defaults are valid)
    given = {"softcap": 5.0, "temperature": 0.5}
    out = options.collect(options.CE, given)
    assert {k: out[k] for k in given} == given
    assert all(out[o.name] == o.default for o in options.keyword_options(options.CE)
               if o.name not in given)


def test_every_spec_field_is_an_option_or_pytorchs():
    """The spec holds options only (no test-only tiling knobs: ``fusedce.kernels.tiling``)."""
    names = {o.name for o in options.OPTIONS} | set(PYTORCH)
    for field in FIELD_NAMES:
        assert field in names, field
    assert "block_size" not in FIELD_NAMES and "n_splits" not in FIELD_NAMES


def test_modules_keep_and_repr_their_options():
    loss = fusedce.CrossEntropyLoss(label_smoothing=0.1, softcap=30.0, temperature=0.7)
    assert loss.softcap == 30.0 and loss.temperature == 0.7 and loss.lse_square_scale == 0.0
    assert "softcap=30.0" in repr(loss) and "lse_square_scale" not in repr(loss)
    with pytest.raises(ValueError, match="temperature"):
        fusedce.CrossEntropyLoss(temperature=0.0)


@pytest.mark.parametrize("entry", ["logits", "linear", "shifted"])
def test_validate_targets_raises_before_the_kernels_give_nan(impl, device, entry):
    """``validate_targets=True``: an out-of-range target is a clear error for both
    implementations (without it the kernels give that row NaN), raised before any write."""
    x = torch.randn(4, 7, device=device)
    t = torch.tensor([0, 9, -100, 2], device=device)
    kw = dict(impl=impl, validate_targets=True)
    if entry == "logits":
        y = x.clone().requires_grad_() * 1
        before = y.detach().clone()
        with pytest.raises(ValueError, match=r"target\[1\] = 9"):
            fusedce.cross_entropy(y, t, inplace_backward=True, **kw)
        assert torch.equal(y.detach(), before)
    elif entry == "linear":
        with pytest.raises(ValueError, match=r"target\[1\] = 9"):
            fusedce.linear_cross_entropy(torch.randn(4, 3, device=device),
                                         torch.randn(7, 3, device=device), t, **kw)
    else:
        with pytest.raises(ValueError, match="is outside the class range"):
            fusedce.shifted_cross_entropy(x.reshape(1, 4, 7), torch.tensor([[0, 1, 9, 2]]),
                                          1, **kw)
    if impl == "triton":
        assert torch.isnan(fusedce.cross_entropy(x, t, impl=impl, reduction="none")[1])
