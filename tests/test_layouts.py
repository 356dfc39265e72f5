"""Every way a user can hand over logits and targets: the result equals PyTorch's, or a clear
error is raised before anything is written, and no element outside the caller's tensor ever
changes (in-place paths included)."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

import fusedce
from fusedce.testing import TOLERANCES, make_logits, rel_err

PAD = 5  # guard elements around every strided layout

# Layouts of (n, c) logits: how the leaf that receives the gradient becomes the logits.
#   leaf, view_of_leaf: the logits are (a view of) a leaf that requires grad;
#   the others are views of a non-leaf ``full = leaf * 1`` whose other elements are guards.
LAYOUTS = ["contiguous", "column_slice", "row_slice", "transposed", "expanded", "overlapping",
           "leaf", "view_of_leaf", "shared_non_leaf"]
REFUSED_IN_PLACE = {"expanded", "overlapping", "leaf", "view_of_leaf"}


def _leaf_shape(kind: str, n: int, c: int) -> tuple[int, ...]:
    return {
        "contiguous": (n * c + 2 * PAD,),
        "column_slice": (n * (c + PAD) + 2 * PAD,),
        "row_slice": (2 * n * c + 2 * PAD,),
        "transposed": (n * c + 2 * PAD,),
        "expanded": (c,),
        "overlapping": (n * c + 2 * PAD,),
        "leaf": (n, c),
        "view_of_leaf": (n, c + PAD),
        "shared_non_leaf": (n, c),
    }[kind]


def _build(kind: str, leaf: torch.Tensor, n: int, c: int):
    """(full, x, other): ``x`` the logits to hand over, ``full`` the tensor whose elements
    outside ``x`` must stay untouched, ``other`` a second user of the logits (or None)."""
    if kind == "leaf":
        return leaf, leaf, None
    if kind == "view_of_leaf":
        return leaf, leaf[:, :c], None
    full = leaf * 1.0
    if kind == "shared_non_leaf":
        return full, full, full * 2.0  # computed before the loss: it must see the logits
    if kind == "expanded":
        return full, full.unsqueeze(0).expand(n, c), None
    strides = {
        "contiguous": (c, 1),
        "column_slice": (c + PAD, 1),
        "row_slice": (2 * c, 1),
        "transposed": (1, n),
        "overlapping": (max(1, c // 2), 1),
    }[kind]
    return full, full.as_strided((n, c), strides, PAD), None


def _footprint(full: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Boolean mask over ``full``'s storage elements that ``x`` covers."""
    covered = torch.zeros(full.untyped_storage().nbytes() // full.element_size(),
                          dtype=torch.bool)
    idx = torch.arange(covered.numel()).as_strided(x.shape, x.stride(), x.storage_offset())
    covered[idx.reshape(-1)] = True
    return covered


def _storage_bits(t: torch.Tensor) -> torch.Tensor:
    flat = t.detach().as_strided((t.untyped_storage().nbytes() // t.element_size(),), (1,), 0)
    return flat.view(torch.int16 if t.element_size() == 2 else torch.int32).cpu().clone()


def _case(kind, inplace, impl, dtype, reduction, n, c, device):
    leaf = make_logits(1, int(torch.Size(_leaf_shape(kind, n, c)).numel()), dtype, device)
    leaf = leaf.reshape(_leaf_shape(kind, n, c)).requires_grad_()
    target = torch.randint(0, c, (n,), device=device)
    target[torch.rand(n, device=device) < 0.2] = -100
    full, x, other = _build(kind, leaf, n, c)
    before = _storage_bits(full)
    outside = ~_footprint(full, x)

    # The reference: the same construction in float64, through PyTorch.
    leaf64 = leaf.detach().double().requires_grad_()
    _, x64, other64 = _build(kind, leaf64, n, c)
    ref = F.cross_entropy(x64, target, reduction=reduction, label_smoothing=0.1)
    if reduction == "mean" and not (target != -100).any():
        ref = (x64 * 0.0).sum()  # all ignored: fusedce's documented 0 (PyTorch: NaN)
    go = torch.rand(ref.shape, dtype=torch.float64, device=device) + 0.5
    total64 = (ref * go).sum() + (other64.sum() if other is not None else 0.0)
    total64.backward()

    error = ValueError if kind in ("expanded", "overlapping") else RuntimeError
    refused = kind in REFUSED_IN_PLACE and (n > 1 or kind in ("leaf", "view_of_leaf"))
    if inplace and refused:
        with pytest.raises(error, match="inplace_backward"):
            fusedce.cross_entropy(x, target, reduction=reduction, label_smoothing=0.1,
                                  impl=impl, inplace_backward=True)
        assert torch.equal(_storage_bits(full), before), "written before the error"
        return
    loss = fusedce.cross_entropy(x, target, reduction=reduction, label_smoothing=0.1, impl=impl,
                                 inplace_backward=inplace)
    total = (loss.float() * go.float()).sum() + (other.float().sum() if other is not None
                                                 else 0.0)
    total.backward()
    tol = TOLERANCES[dtype]
    assert rel_err(loss, ref) <= tol["loss"], (kind, inplace, impl)
    assert rel_err(leaf.grad, leaf64.grad) <= tol["grad"], (kind, inplace, impl)
    after = _storage_bits(full)
    assert torch.equal(after[outside], before[outside]), f"{kind}: wrote outside the logits"
    if not inplace:
        assert torch.equal(after, before), f"{kind}: the logits changed without inplace_backward"


@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "in-place"])
@pytest.mark.parametrize("kind", LAYOUTS)
def test_every_layout(kind, inplace, impl, device):
    """One case per layout at a fixed size, float32 and mean (fast, always run)."""
    _case(kind, inplace, impl, torch.float32, "mean", 5, 37, device)


@pytest.mark.slow
def test_layout_property(impl, device):
    """Random shapes, dtypes, reductions and layouts, with and without inplace_backward."""
    rng = random.Random(20261123)
    for _ in range(40):
        kind = rng.choice(LAYOUTS)
        inplace = rng.random() < 0.5
        dtype = rng.choice([torch.float32, torch.bfloat16, torch.float16])
        reduction = rng.choice(["mean", "sum", "none"])
        n, c = rng.randint(1, 9), rng.randint(2, 300)
        _case(kind, inplace, impl, dtype, reduction, n, c, device)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32,
                                   torch.int64], ids=str)
def test_target_dtypes_and_ignore_index(dtype, impl, device):
    """Targets of every integer dtype are compared with ignore_index as int64 values: a uint8
    target of 156 is class 156, not -100 wrapped around."""
    info = torch.iinfo(dtype)
    n_cols = min(info.max, 300)
    logits = make_logits(12, n_cols, torch.float32, device)
    for ignore_index in (-100, -1, 0, 7, 156, 2**40):
        values = torch.randint(max(info.min, 0), n_cols, (12,))
        values[:4] = torch.tensor([156 % n_cols, 0, 7, n_cols - 1])
        if -100 >= info.min:
            values[5] = -100
        if ignore_index < n_cols and info.min <= ignore_index:
            values[6] = ignore_index
        target = values.to(dtype).to(device)
        as_long = target.long()
        if ((as_long < 0) | (as_long >= n_cols))[as_long != ignore_index].any():
            continue  # a target PyTorch would reject: not this test's business
        x = logits.clone().requires_grad_()
        loss = fusedce.cross_entropy(x, target, ignore_index=ignore_index, impl=impl)
        loss.backward()
        x64 = logits.double().requires_grad_()
        ref = F.cross_entropy(x64, as_long, ignore_index=ignore_index)
        if not torch.isfinite(ref):
            ref = (x64 * 0).sum()  # all ignored: fusedce's documented 0
        ref.backward()
        assert rel_err(loss, ref) <= 1e-5, (dtype, ignore_index)
        assert rel_err(x.grad, x64.grad) <= 1e-5, (dtype, ignore_index)
