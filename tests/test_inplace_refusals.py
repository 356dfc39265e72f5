"""In-place paths that span several tensors (multi-token depths, groups of rows read where they
are) check every input before the first write: a refused call leaves every byte of the caller's
storage as it was, and an accepted one gives PyTorch's answer and writes only the caller's
elements."""

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
def test_groups_of_rows_in_place_are_right_and_stay_inside(impl, layout, reduction):
    """``logits[:, :-1]`` and transposed logits with batch > 1 are read as groups of rows
    where they are; in place, the gradient is PyTorch's and every element of the storage
    outside the caller's view is unchanged."""
    labels = _labels()
    base = torch.randn(9, 2, V) if layout == "transposed" else torch.randn(2, 9, V)
    results = []
    go = torch.randn(2, 8) if reduction == "none" else torch.tensor(0.7)
    for inplace in (False, True):
        leaf = base.clone().requires_grad_()
        full = leaf * 1
        x = full.transpose(0, 1)[:, :8] if layout == "transposed" else full[:, :8]
        outside = torch.ones_like(base, dtype=torch.bool)
        (outside.transpose(0, 1) if layout == "transposed" else outside)[:, :8] = False
        before = full.detach()[outside].clone()
        loss = fusedce.shifted_cross_entropy(x, labels, 1, inplace_backward=inplace,
                                             reduction=reduction, impl=impl)
        loss.backward(go)
        assert torch.equal(full.detach()[outside], before)
        results.append((loss.detach(), leaf.grad))
    xr = (base.transpose(0, 1) if layout == "transposed" else base)[:, :8].double()
    xr.requires_grad_()
    ref = F.cross_entropy(xr[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1),
                          reduction=reduction)
    ref.backward(go[:, :-1].reshape(-1).double() if reduction == "none" else go.double())
    want = torch.zeros_like(base, dtype=torch.float64)
    (want.transpose(0, 1) if layout == "transposed" else want)[:, :8] += xr.grad
    for loss, grad in results:
        got = loss[:, :-1].reshape(-1) if reduction == "none" else loss
        assert rel_err(got, ref) < 2e-5 and rel_err(grad, want) < 2e-5


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


def test_groups_of_rows_float64_mean_is_exact():
    """Transposed float64 logits (groups of rows): the mean keeps float64."""
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
