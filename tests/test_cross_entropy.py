"""Both implementations against F.cross_entropy in float64, over dtypes, options and layouts."""

from __future__ import annotations

import pytest
import torch

import fusedce
from fusedce.testing import (
    TOLERANCES,
    make_logits,
    make_targets,
    reference_cross_entropy,
    rel_err,
)
from helpers import function_loss, grad_output_for

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
REDUCTIONS = ["none", "mean", "sum"]
OPTIONS = {
    "plain": {},
    "smoothing": {"label_smoothing": 0.1},
    "weight": {"weight": True},
    "weight+smoothing": {"weight": True, "label_smoothing": 0.3},
}
IGNORED = {"none": 0.0, "some": 0.3, "all": 1.0}


def _check(loss, grad, logits, target, weight, reduction, smoothing, grad_output, dtype,
           ignore_index=-100):
    ref_loss, ref_grad = reference_cross_entropy(
        logits, target, weight, ignore_index, reduction, smoothing, grad_output.float()
    )
    tol = TOLERANCES[dtype]
    assert loss.dtype == dtype
    assert loss.shape == ref_loss.shape
    assert rel_err(loss, ref_loss) <= tol["loss"], (loss, ref_loss)
    assert grad.dtype == dtype and grad.shape == logits.shape
    assert rel_err(grad, ref_grad) <= tol["grad"]


@pytest.mark.parametrize("ignored", list(IGNORED))
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_pytorch(impl, dtype, reduction, option, ignored, device, poison):
    n_rows, n_cols = 13, 1000  # one block per row with the default heuristic
    opts = OPTIONS[option]
    logits = make_logits(n_rows, n_cols, dtype, device).requires_grad_()
    target = make_targets(n_rows, n_cols, device, ignore_fraction=IGNORED[ignored])
    weight = torch.rand(n_cols, device=device) + 0.5 if opts.get("weight") else None
    smoothing = opts.get("label_smoothing", 0.0)
    loss = fusedce.cross_entropy(
        logits, target, weight, reduction=reduction, label_smoothing=smoothing, impl=impl
    )
    # 1 for mean (the common case the backward skips), 2.5 for sum, random per row for none.
    grad_output = grad_output_for(reduction, n_rows, device, 1.0 if reduction == "mean" else 2.5)
    loss.backward(grad_output.to(loss.dtype))
    _check(loss, logits.grad, logits, target, weight, reduction, smoothing, grad_output, dtype)


# (n_rows, n_cols, block_size, n_splits): the kernel paths at sizes the interpreter can afford.
KERNEL_PATHS = [
    (5, 4099, 256, 1),  # 17 blocks per row, the last a 3-column tail
    (3, 4099, 256, 4),  # vocabulary split in 4 chunks of 5 blocks, the last chunk shorter
    (2, 3000, 128, 7),  # 24 blocks asked to split 7 ways: 6 chunks of 4 blocks
    (4, 2, 128, 1),  # two classes
    (1, 20000, 512, 16),  # one row, many programs
]


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", KERNEL_PATHS, ids=lambda s: "x".join(map(str, s)))
def test_kernel_paths(shape, dtype, reduction, device, poison):
    n_rows, n_cols, block_size, n_splits = shape
    logits = make_logits(n_rows, n_cols, dtype, device).requires_grad_()
    target = make_targets(n_rows, n_cols, device, ignore_fraction=0.25)
    target[0] = n_cols - 1  # the last column, in the tail block
    weight = torch.rand(n_cols, device=device) + 0.5
    loss = function_loss(logits, target, weight, reduction=reduction, label_smoothing=0.2,
                         block_size=block_size, n_splits=n_splits)[0]
    # A non-unit grad_output exercises the backward's scaling kernel.
    grad_output = torch.randn(n_rows, device=device) if reduction == "none" else torch.tensor(
        0.7, device=device
    )
    loss.backward(grad_output.to(loss.dtype))
    _check(loss, logits.grad, logits, target, weight, reduction, 0.2, grad_output, dtype)


def test_mean_with_non_unit_grad_output(impl, device):
    logits = make_logits(6, 300, torch.float32, device).requires_grad_()
    target = make_targets(6, 300, device, ignore_fraction=0.3)
    loss = fusedce.cross_entropy(logits, target, impl=impl)
    (loss * -3.5).backward()
    _check(loss, logits.grad, logits, target, None, "mean", 0.0, torch.tensor(-3.5),
           torch.float32)


@pytest.mark.parametrize("ignore_index", [0, -1, 7, 123456])
def test_any_ignore_index(impl, ignore_index, device):
    """A pad id inside [0, C) (0, 7), negatives other than -100, and values beyond C."""
    n_rows, n_cols = 11, 257
    logits = make_logits(n_rows, n_cols, torch.float32, device).requires_grad_()
    target = make_targets(n_rows, n_cols, device, ignore_fraction=0.4, ignore_index=ignore_index)
    loss = fusedce.cross_entropy(
        logits, target, ignore_index=ignore_index, label_smoothing=0.1, impl=impl
    )
    loss.backward()
    _check(loss, logits.grad, logits, target, None, "mean", 0.1, torch.tensor(1.0),
           torch.float32, ignore_index=ignore_index)


@pytest.mark.parametrize("inplace", [False, True])
def test_strided_rows_read_in_place(impl, inplace, device):
    """A column slice of a wider tensor: rows with a stride of 160 but 150 columns."""
    wide = make_logits(9, 160, torch.bfloat16, device)
    hidden = wide.clone().requires_grad_()
    logits = hidden * 1.0  # non-leaf, so the gradient reaches `hidden` through autograd
    view = logits[:, :150]
    assert view.stride() == (160, 1)
    target = make_targets(9, 150, device, ignore_fraction=0.2)
    loss = fusedce.cross_entropy(view, target, impl=impl, inplace_backward=inplace)
    if inplace:
        # The gradient went into the strided view's own storage: no contiguous copy was made.
        ref_loss, ref_grad = reference_cross_entropy(wide[:, :150], target, grad_output=1.0)
        assert rel_err(logits.detach()[:, :150], ref_grad) <= 1e-2
        assert torch.equal(logits.detach()[:, 150:], wide[:, 150:])  # padding untouched
    loss.backward()
    ref_loss, ref_grad = reference_cross_entropy(wide[:, :150], target, grad_output=1.0)
    assert rel_err(loss, ref_loss) <= 1e-2
    assert rel_err(hidden.grad[:, :150], ref_grad) <= 1e-2
    assert torch.all(hidden.grad[:, 150:] == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inplace_backward(impl, dtype, device):
    hidden = make_logits(7, 600, dtype, device).requires_grad_()
    logits = hidden * 1.0
    target = make_targets(7, 600, device, ignore_fraction=0.2)
    storage = logits.data_ptr()
    loss = fusedce.cross_entropy(logits, target, label_smoothing=0.05, impl=impl,
                                 inplace_backward=True)
    (loss * 2.0).backward()
    ref_loss, ref_grad = reference_cross_entropy(hidden, target, label_smoothing=0.05,
                                                 grad_output=2.0)
    tol = TOLERANCES[dtype]
    assert rel_err(loss, ref_loss) <= tol["loss"]
    assert rel_err(hidden.grad, ref_grad) <= tol["grad"]
    assert logits.data_ptr() == storage
    assert rel_err(logits.detach(), ref_grad) <= tol["grad"]  # the logits now hold the gradient


def test_inplace_backward_refuses_logits_saved_elsewhere(impl, device):
    """exp saves its output for backward; overwriting it must be an error, not a wrong gradient."""
    hidden = make_logits(4, 50, torch.float32, device, scale=0.5).requires_grad_()
    logits = hidden.exp()
    target = make_targets(4, 50, device)
    loss = fusedce.cross_entropy(logits, target, impl=impl, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_no_grad_reads_only(impl, device):
    """Without a gradient wanted, nothing is written: inplace_backward leaves the logits alone."""
    logits = make_logits(5, 300, torch.float32, device).requires_grad_()
    before = logits.detach().clone()
    target = make_targets(5, 300, device)
    with torch.no_grad():
        loss = fusedce.cross_entropy(logits, target, impl=impl, inplace_backward=True)
    assert torch.equal(logits.detach(), before)
    assert not loss.requires_grad
    ref_loss, _ = reference_cross_entropy(logits, target)
    assert rel_err(loss, ref_loss) <= 1e-5


def test_deterministic(impl, device):
    logits = make_logits(3, 5000, torch.bfloat16, device).requires_grad_()
    target = make_targets(3, 5000, device)
    results = []
    for _ in range(2):
        tiling = dict(block_size=512, n_splits=4) if impl == "triton" else {}
        loss = function_loss(logits, target, reduction="sum", label_smoothing=0.1, impl=impl,
                             **tiling)[0]
        loss.backward()
        results.append((loss.detach().clone(), logits.grad.clone()))
        logits.grad = None
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])


def test_one_dimensional_input(impl, device):
    logits = make_logits(1, 77, torch.float32, device)[0].requires_grad_()
    target = torch.tensor(5, device=device)
    for reduction in REDUCTIONS:
        loss = fusedce.cross_entropy(logits, target, reduction=reduction, impl=impl)
        ref_loss, ref_grad = reference_cross_entropy(logits, target, reduction=reduction,
                                                     grad_output=1.0)
        assert loss.shape == ref_loss.shape == ()
        loss.backward()
        assert rel_err(loss, ref_loss) <= 1e-5
        assert rel_err(logits.grad, ref_grad) <= 1e-5
        logits.grad = None


def test_k_dimensional_input(impl, device):
    """(N, C, d1, d2) logits, as for segmentation: the same answer as PyTorch."""
    logits = torch.randn(2, 11, 3, 4, device=device).requires_grad_()
    target = torch.randint(0, 11, (2, 3, 4), device=device)
    target[0, 1, 2] = -100
    weight = torch.rand(11, device=device)
    for reduction in REDUCTIONS:
        loss = fusedce.cross_entropy(logits, target, weight, reduction=reduction,
                                     label_smoothing=0.2, impl=impl)
        grad_output = torch.randn_like(loss)
        loss.backward(grad_output)
        ref_loss, ref_grad = reference_cross_entropy(logits, target, weight,
                                                     reduction=reduction, label_smoothing=0.2,
                                                     grad_output=grad_output)
        assert loss.shape == ref_loss.shape
        assert rel_err(loss, ref_loss) <= 1e-5
        assert rel_err(logits.grad, ref_grad) <= 1e-5
        logits.grad = None


def test_probability_targets_follow_pytorch(impl, device):
    logits = torch.randn(5, 9, device=device, requires_grad=True)
    probs = torch.softmax(torch.randn(5, 9, device=device), dim=1)
    loss = fusedce.cross_entropy(logits, probs, label_smoothing=0.1, impl=impl)
    ref = torch.nn.functional.cross_entropy(logits, probs, label_smoothing=0.1)
    assert torch.allclose(loss, ref)


def test_int32_targets(impl, device):
    logits = make_logits(6, 40, torch.float32, device).requires_grad_()
    target = make_targets(6, 40, device, ignore_fraction=0.3)
    loss = fusedce.cross_entropy(logits, target.int(), impl=impl)
    loss.backward()
    _check(loss, logits.grad, logits, target, None, "mean", 0.0, torch.tensor(1.0),
           torch.float32)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batch(impl, reduction, device):
    logits = torch.randn(0, 10, device=device, requires_grad=True)
    target = torch.zeros(0, dtype=torch.long, device=device)
    loss = fusedce.cross_entropy(logits, target, reduction=reduction, impl=impl)
    assert loss.shape == ((0,) if reduction == "none" else ())
    if reduction != "none":
        assert loss.item() == 0.0  # PyTorch: NaN for mean
    loss.sum().backward()
    assert logits.grad.shape == (0, 10)


def test_second_backward_is_refused(impl, device):
    logits = make_logits(3, 20, torch.float32, device).requires_grad_()
    loss = fusedce.cross_entropy(logits, make_targets(3, 20, device), impl=impl)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()


def test_module_matches_function(device):
    weight = torch.rand(30, device=device)
    module = fusedce.CrossEntropyLoss(weight, ignore_index=3, reduction="sum",
                                      label_smoothing=0.2, impl="triton")
    assert "weight" in dict(module.named_buffers())
    assert torch.equal(module.state_dict()["weight"], weight)
    logits = make_logits(8, 30, torch.float32, device)
    target = make_targets(8, 30, device, ignore_fraction=0.3, ignore_index=3)
    expected = fusedce.cross_entropy(logits, target, weight, ignore_index=3, reduction="sum",
                                     label_smoothing=0.2, impl="triton")
    assert torch.equal(module(logits, target), expected)
    assert "label_smoothing=0.2" in repr(module)


def test_module_defaults_match_pytorch():
    ours, theirs = fusedce.CrossEntropyLoss(), torch.nn.CrossEntropyLoss()
    for name in ("ignore_index", "reduction", "label_smoothing"):
        assert getattr(ours, name) == getattr(theirs, name)
    assert ours.weight is None


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backward", ["stored", "recompute"])
def test_backward_choice(impl, backward, reduction, inplace, device, poison):
    """Both backward designs give the same answer, for every reduction, in place or not."""
    hidden = make_logits(9, 700, torch.bfloat16, device).requires_grad_()
    logits = hidden * 1.0
    target = make_targets(9, 700, device, ignore_fraction=0.2)
    weight = torch.rand(700, device=device) + 0.5
    loss = fusedce.cross_entropy(logits, target, weight, reduction=reduction,
                                 label_smoothing=0.1, impl=impl, backward=backward,
                                 inplace_backward=inplace)
    go = grad_output_for(reduction, 9, device, 0.3)
    loss.backward(go.to(loss.dtype))
    _check(loss, hidden.grad, hidden, target, weight, reduction, 0.1, go, torch.bfloat16)


def test_backward_choice_errors(device):
    x, t = make_logits(3, 10, torch.float32, device), make_targets(3, 10, device)
    with pytest.raises(ValueError, match="backward must be one of"):
        fusedce.cross_entropy(x, t, backward="lazy")


@pytest.mark.parametrize("path", ["torch", "kernel", "kernel-split"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_probability_targets_fused(dtype, weighted, smoothing, reduction, path, monkeypatch,
                                   poison):
    """Class-probability targets of the input's shape: one fused pass, PyTorch's semantics
    (weights, smoothing mixing the target, mean over the rows), against F.cross_entropy in
    float64.  The PyTorch implementation over several chunks of rows; the Triton kernels with
    8-column blocks (several per row and a masked tail), one program per row or the vocabulary
    split across three; the target a column-strided view, left as it was.  A target that
    requires grad gets its gradient from PyTorch's own implementation."""
    from fusedce import soft
    from fusedce.kernels import tiling
    from fusedce.testing import rel_err

    monkeypatch.setattr(soft, "CHUNK_ELEMENTS", 3 * 37)
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(10, 37, generator=g) * 2).to(dtype)
    t_wide = torch.softmax(torch.randn(10, 74, generator=g), -1) * 2
    t = t_wide[:, ::2]
    before = t_wide.clone()
    w = torch.rand(37, generator=g) + 0.5 if weighted else None
    xi = x.clone().requires_grad_()
    impl = "torch" if path == "torch" else "triton"
    with tiling(block_size=8, n_splits=3 if path == "kernel-split" else 1):
        loss = fusedce.cross_entropy(xi, t, weight=w, reduction=reduction,
                                     label_smoothing=smoothing, impl=impl)
        go = torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape)
        (grad,) = torch.autograd.grad(loss, xi, go.to(loss.dtype))
    ref_x = x.double().requires_grad_()
    ref = torch.nn.functional.cross_entropy(
        ref_x, t.double(), weight=w.double() if w is not None else None, reduction=reduction,
        label_smoothing=smoothing)
    (ref_grad,) = torch.autograd.grad(ref, ref_x, go.double())
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert loss.dtype == dtype
    assert rel_err(loss.float(), ref) <= tol
    assert rel_err(grad.float(), ref_grad) <= tol
    assert torch.equal(t_wide, before)
    if path != "torch":
        return
    tt = t.clone().requires_grad_()
    loss = fusedce.cross_entropy(x.float(), tt, weight=w, reduction=reduction,
                                 label_smoothing=smoothing)
    (g_t,) = torch.autograd.grad(loss.sum(), tt)
    (ref_t,) = torch.autograd.grad(torch.nn.functional.cross_entropy(
        x.float(), tt, weight=w, reduction=reduction, label_smoothing=smoothing).sum(), tt)
    assert rel_err(g_t, ref_t) <= 1e-5


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_linear_probability_targets_chunked(reduction):
    """linear_cross_entropy with class probabilities: chunks of rows (never the logits) for
    mean and sum, the gradients of the hidden states, head and bias as PyTorch's."""
    from fusedce.testing import rel_err

    g = torch.Generator().manual_seed(4)
    h = torch.randn(2, 5, 8, generator=g)
    w = torch.randn(23, 8, generator=g) * 0.5
    b = torch.randn(23, generator=g) * 0.1
    t = torch.softmax(torch.randn(2, 5, 23, generator=g), -1)
    cw = torch.rand(23, generator=g) + 0.5
    results = []
    for fused in (True, False):
        hh, ww, bb = (v.clone().requires_grad_() for v in (h, w, b))
        if fused:
            loss = fusedce.linear_cross_entropy(hh, ww, t, linear_bias=bb, weight=cw,
                                                reduction=reduction, label_smoothing=0.1,
                                                chunk_size=3)
        else:
            loss = torch.nn.functional.cross_entropy(
                torch.nn.functional.linear(hh, ww, bb).reshape(-1, 23), t.reshape(-1, 23),
                weight=cw, reduction=reduction, label_smoothing=0.1)
            loss = loss.reshape(2, 5) if reduction == "none" else loss
        go = torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape)
        results.append((loss.detach(), *torch.autograd.grad(loss, (hh, ww, bb), go)))
    for a, c in zip(*results):
        assert rel_err(a, c) <= 1e-5
