"""In-place paths that span several calls (multi-token depths, sequences read one by one) check
every input before the first write: a refused call leaves every byte of the caller's storage as
it was, and an accepted one gives PyTorch's answer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fusedce
from fusedce.testing import rel_err

V = 37


def _labels(b_n: int = 2, t_n: int = 8) -> torch.Tensor:
    return torch.randint(0, V, (b_n, t_n))


def _reference(logits: torch.Tensor, labels: torch.Tensor, shift: int = 1) -> torch.Tensor:
    x = logits.detach().double()
    t = labels[:, shift:]
    return F.cross_entropy(x[:, : x.shape[1] - shift].reshape(-1, V), t.reshape(-1))


def _refused(call, *storages: torch.Tensor, match: str, error=ValueError) -> None:
    """``call`` raises ``error`` and every storage is bitwise unchanged."""
    before = [s.detach().clone() for s in storages]
    with pytest.raises(error, match=match):
        call()
    for b, s in zip(before, storages):
        assert torch.equal(b, s.detach())


def test_expanded_logits_in_place_refused_out_of_place_right(impl):
    labels = _labels()
    source = torch.randn(1, 8, V, requires_grad=True)
    y = (source * 1).expand(2, 8, V)
    _refused(lambda: fusedce.shifted_cross_entropy(y, labels, 1, inplace_backward=True,
                                                   impl=impl), y, match="overlap")
    loss = fusedce.shifted_cross_entropy(y, labels, 1, impl=impl)
    ref = _reference(y.detach().contiguous(), labels)
    assert rel_err(loss, ref) < 2e-5


@pytest.mark.parametrize("layout", ["sliced", "transposed"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_sequence_by_sequence_in_place_refused_before_writing(impl, layout, reduction):
    """``logits[:, :-1]`` (no common row spacing when in place) and transposed logits with
    batch > 1: refused with a clear error; the logits are untouched and a later out-of-place
    call on them is right."""
    labels = _labels()
    base = torch.randn(9, 2, V) if layout == "transposed" else torch.randn(2, 9, V)
    full = base.clone().requires_grad_() * 1
    x = full.transpose(0, 1)[:, :8] if layout == "transposed" else full[:, :8]
    _refused(lambda: fusedce.shifted_cross_entropy(x, labels, 1, inplace_backward=True,
                                                   reduction=reduction, impl=impl),
             full, match="rows of one view")
    loss = fusedce.shifted_cross_entropy(x, labels, 1, reduction=reduction, impl=impl)
    ref = F.cross_entropy(x.detach().double()[:, :-1].reshape(-1, V),
                          labels[:, 1:].reshape(-1), reduction=reduction)
    if reduction == "none":
        loss = loss[:, :-1].reshape(-1)  # the last position has no target: 0
    assert rel_err(loss, ref) < 2e-5


@pytest.mark.parametrize("case", ["short_depth", "zero_items", "float64_triton",
                                  "shared_storage", "bad_keyword", "list_depth"])
def test_multi_token_in_place_checks_every_depth_first(case):
    labels = _labels()
    x1 = torch.randn(2, 8, V, requires_grad=True) * 1
    x2 = torch.randn(2, 8, V, requires_grad=True) * 1
    kw: dict = dict(inplace_backward=True)
    if case == "short_depth":
        depths, match = (x1, x2[:, :7]), "logits must have shape"
    elif case == "zero_items":
        depths, match = (x1, x2), "num_items_in_batch must be positive"
        kw["num_items_in_batch"] = (5, 0)
    elif case == "float64_triton":
        depths, match = (x1, x2.double()), "float64"
        kw["impl"] = "triton"
    elif case == "shared_storage":
        depths, match = (x1, x1[:, :]), "same memory"
    elif case == "bad_keyword":
        depths, match = (x1, x2), "softcap"
        kw["softcap"] = -1.0
    else:
        depths, match = (x1, [[0.0]]), "must be a torch.Tensor"
    error = TypeError if case == "list_depth" else ValueError
    _refused(lambda: fusedce.shifted_cross_entropy(depths, labels, **kw), x1, x2,
             match=match, error=error)


def test_multi_token_in_place_accepted_is_right():
    labels = _labels()
    a, b = torch.randn(2, 8, V), torch.randn(2, 8, V)
    x1, x2 = (a.clone().requires_grad_() * 1), (b.clone().requires_grad_() * 1)
    loss = fusedce.shifted_cross_entropy((x1, x2), labels, inplace_backward=True)
    ref = _reference(a, labels, 1) + _reference(b, labels, 2)
    assert rel_err(loss, ref) < 2e-5


def test_sequence_by_sequence_float64_mean_is_exact():
    """Transposed float64 logits (read sequence by sequence): the mean keeps float64."""
    b = torch.randn(8, 3, V, dtype=torch.float64)
    labels = _labels(3, 8)
    for reduction in ("mean", "sum"):
        got = fusedce.shifted_cross_entropy(b.transpose(0, 1), labels, 1, reduction=reduction)
        want = fusedce.shifted_cross_entropy(b.transpose(0, 1).contiguous(), labels, 1,
                                             reduction=reduction)
        assert got.dtype == torch.float64
        assert rel_err(got, want) < 1e-13


@pytest.mark.parametrize("function", ["shifted_cross_entropy", "shifted_linear_cross_entropy",
                                      "count_targets", "shifted_targets"])
def test_labels_as_a_list_are_a_clear_type_error(function):
    labels = [[1, 2, 3, 4]]
    if function == "shifted_cross_entropy":
        call = lambda: fusedce.shifted_cross_entropy(torch.randn(1, 4, V), labels)  # noqa: E731
    elif function == "shifted_linear_cross_entropy":
        call = lambda: fusedce.shifted_linear_cross_entropy(  # noqa: E731
            torch.randn(1, 4, 5), torch.randn(V, 5), labels)
    else:
        call = lambda: getattr(fusedce, function)(labels, 1)  # noqa: E731
    with pytest.raises(TypeError, match="labels must be a torch.Tensor"):
        call()


def test_token_logprobs_target_as_a_list_is_a_clear_type_error():
    with pytest.raises(TypeError, match="target must be a torch.Tensor"):
        fusedce.token_logprobs(torch.randn(2, 3, V), [[1, 2, 3], [4, 5, 6]])
