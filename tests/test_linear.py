"""Fused linear cross-entropy against the unfused float64 reference (fusedce.testing)."""

from __future__ import annotations

import pytest
import torch

import fusedce
from fusedce.testing import TOLERANCES, make_targets, reference_linear, rel_err

OPTIONS = {
    "plain": {},
    "weight+smoothing": {"weight": True, "label_smoothing": 0.2},
    "softcap+zloss": {"softcap": 8.0, "lse_square_scale": 1e-3, "logit_scale": 1.5},
}


def _inputs(n_rows, hidden, n_cols, dtype, device, bias=True, ignore_fraction=0.25):
    x = (torch.randn(n_rows, hidden) * 1.0).to(device, dtype).requires_grad_()
    w = (torch.randn(n_cols, hidden) / hidden**0.5 * 3).to(device, dtype).requires_grad_()
    b = (torch.randn(n_cols) * 0.5).to(device, dtype).requires_grad_() if bias else None
    target = make_targets(n_rows, n_cols, device, ignore_fraction=ignore_fraction)
    return x, w, b, target


def _check(out, grads, ref, dtype):
    tol = TOLERANCES[dtype]
    assert rel_err(out, ref["loss"]) <= tol["loss"]
    for name, g in zip(("grad_input", "grad_weight", "grad_bias"), grads):
        if ref[name] is not None:
            assert g.dtype == dtype
            assert rel_err(g, ref[name]) <= tol["grad"], name


@pytest.mark.parametrize("chunk_size", [7, 16, 64])  # 7 does not divide 30
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_unfused_reference(impl, dtype, option, reduction, chunk_size, device, poison):
    x, w, b, target = _inputs(30, 24, 130, dtype, device)
    opts = dict(OPTIONS[option])
    if opts.pop("weight", False):
        opts["weight"] = torch.rand(130, device=device) + 0.5
    loss = fusedce.linear_cross_entropy(x, w, target, linear_bias=b, reduction=reduction,
                                        chunk_size=chunk_size, impl=impl, **opts)
    go = torch.randn(30, device=device) if reduction == "none" else torch.tensor(
        0.6, device=device)
    grads = torch.autograd.grad(loss, (x, w, b), go.to(loss.dtype))
    ref = reference_linear(x, w, target, b, go.float(), reduction=reduction, **opts)
    _check(loss, grads, ref, dtype)


def test_all_ignored_and_no_bias(impl, device):
    x, w, _, _ = _inputs(9, 16, 40, torch.float32, device, bias=False)
    target = torch.full((9,), -100, device=device)
    loss = fusedce.linear_cross_entropy(x, w, target, chunk_size=4, impl=impl)
    gx, gw = torch.autograd.grad(loss, (x, w))
    assert loss.item() == 0.0
    assert torch.all(gx == 0) and torch.all(gw == 0)


def test_stats_and_num_items(impl, device):
    x, w, b, target = _inputs(20, 16, 60, torch.float32, device)
    loss, stats = fusedce.linear_cross_entropy(
        x, w, target, linear_bias=b, lse_square_scale=1e-2, num_items_in_batch=40,
        return_stats=True, chunk_size=6, impl=impl)
    gx, gw, gb = torch.autograd.grad(loss, (x, w, b))
    ref = reference_linear(x, w, target, b, lse_square_scale=1e-2, num_items_in_batch=40)
    _check(loss, (gx, gw, gb), ref, torch.float32)
    assert rel_err(stats.lse, ref["lse"]) <= 1e-5
    assert rel_err(stats.z_loss, ref["z_loss"]) <= 1e-5
    assert stats.accuracy.item() == pytest.approx(ref["accuracy"].item())


def test_leading_dimensions_and_module(impl, device):
    """(batch, seq, H) hidden states with (batch, seq) labels, through the module."""
    module = fusedce.LinearCrossEntropyLoss(12, 50, bias=True, reduction="none", chunk_size=5,
                                            impl=impl, device=device)
    hidden = torch.randn(2, 7, 12, device=device, requires_grad=True)
    labels = make_targets(14, 50, device, ignore_fraction=0.2).reshape(2, 7)
    loss = module(hidden, labels)
    assert loss.shape == (2, 7)
    loss.sum().backward()
    ref = reference_linear(hidden.reshape(14, 12), module.linear_weight, labels.reshape(-1),
                           module.linear_bias, torch.ones(14), reduction="none")
    assert rel_err(loss.reshape(-1), ref["loss"]) <= 1e-5
    assert rel_err(hidden.grad.reshape(14, 12), ref["grad_input"]) <= 1e-5
    assert rel_err(module.linear_weight.grad, ref["grad_weight"]) <= 1e-5


@pytest.mark.parametrize("policy", ["rows", "vocab"])
def test_weight_gradient_accumulates_in_float32(device, policy):
    """Many chunks (row blocks) of bf16 products: float32 accumulation stays near the float64
    answer, where accumulating in bf16 drifts."""
    from fusedce import linear

    x, w, _, target = _inputs(256, 32, 64, torch.bfloat16, device, bias=False,
                              ignore_fraction=0.0)
    with linear.policy(policy):
        loss = fusedce.linear_cross_entropy(x, w, target, reduction="sum", chunk_size=4)
        _, gw = torch.autograd.grad(loss, (x, w))
    ref = reference_linear(x, w, target, reduction="sum")
    # The same chunked products summed in bf16, as an accumulator of the weight's dtype does.
    acc = torch.zeros_like(w)
    for r0 in range(0, 256, 4):
        logits = x[r0:r0 + 4].detach() @ w.detach().t()
        g = torch.softmax(logits.float(), dim=1)
        g[torch.arange(4), target[r0:r0 + 4]] -= 1
        acc += g.to(torch.bfloat16).t() @ x[r0:r0 + 4].detach()
    ours, bf16_acc = rel_err(gw, ref["grad_weight"]), rel_err(acc, ref["grad_weight"])
    assert ours <= 1e-2
    assert ours < bf16_acc / 2


def test_no_grad_forward_only(device):
    x, w, b, target = _inputs(10, 8, 30, torch.float32, device)
    with torch.no_grad():
        loss = fusedce.linear_cross_entropy(x, w, target, linear_bias=b, chunk_size=3)
    assert not loss.requires_grad
    assert rel_err(loss, reference_linear(x, w, target, b)["loss"]) <= 1e-5


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(w_shape=(30, 9)), ValueError, r"linear_weight must have shape \(C, 8\)"),
    (dict(w_dtype=torch.float64), TypeError, "differs from input dtype"),
    (dict(bias_shape=(29,)), ValueError, "linear_bias must be a"),
    (dict(target_shape=(9,)), ValueError, "does not match input shape"),
    (dict(chunk_size=0), ValueError, "chunk_size must be a positive int"),
    (dict(reduction="avg"), ValueError, "reduction must be"),
])
def test_argument_errors(kwargs, error, message):
    x = torch.randn(10, 8)
    w = torch.randn(*kwargs.pop("w_shape", (30, 8)), dtype=kwargs.pop("w_dtype", torch.float32))
    b = torch.randn(*kwargs.pop("bias_shape", (30,)))
    target = torch.randint(0, 30, kwargs.pop("target_shape", (10,)))
    with pytest.raises(error, match=message):
        fusedce.linear_cross_entropy(x, w, target, linear_bias=b, **kwargs)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_recompute_backward(impl, reduction, device):
    """backward='recompute': the gradients made in the backward, grad_output folded in."""
    x, w, b, target = _inputs(20, 16, 90, torch.float32, device)
    loss = fusedce.linear_cross_entropy(x, w, target, linear_bias=b, reduction=reduction,
                                        chunk_size=7, impl=impl, backward="recompute")
    go = torch.tensor(0.37, device=device)
    grads = torch.autograd.grad(loss, (x, w, b), go)
    _check(loss, grads, reference_linear(x, w, target, b, go, reduction=reduction),
           torch.float32)


# The "vocab" policy (vocabulary tiles, statistics merged, gradients per tile), at shapes that
# reach every part of it: 32-class tiles over 130 classes (a 2-class last tile), 8-row blocks
# over 30 rows, and a workspace that keeps two tiles' logits from pass 1, none, or all.
VOCAB_LAYOUTS = {"kept_some": 10624, "kept_none": 3000, "kept_all": 1 << 20}


@pytest.fixture
def small_tiles(monkeypatch):
    from fusedce import linear

    monkeypatch.setattr(linear, "TILE_COLS", 32)
    monkeypatch.setattr(linear, "BLOCK_BYTES", 8 * 32 * 4)


def test_vocab_plan_layouts(small_tiles):
    from fusedce.linear import vocab_plan

    assert vocab_plan(30, 130, VOCAB_LAYOUTS["kept_some"], 2) == (32, 8, 64)
    assert vocab_plan(30, 130, VOCAB_LAYOUTS["kept_none"], 2) == (32, 8, 0)
    assert vocab_plan(30, 130, VOCAB_LAYOUTS["kept_all"], 2)[2] == 130
    tile, rows, kept = vocab_plan(30, 130, 1000, 2)  # too small for a 32-class tile
    assert tile < 32 and 30 * tile * 2 + rows * tile * 4 <= 1000 and kept == 0


def test_vocab_plan_at_the_headline_shape():
    """8192 x 4096 x 151936 in bf16 with the default workspace: 2048-class tiles, 32 MiB
    blocks, whole tiles kept, everything within the bound."""
    from fusedce.linear import MAX_CHUNK_BYTES, vocab_plan

    tile, rows, kept = vocab_plan(8192, 151936, MAX_CHUNK_BYTES, 2)
    assert (tile, rows) == (2048, 4096) and kept % tile == 0 and kept > 0
    assert 8192 * tile * 2 + rows * tile * 4 + 8192 * kept * 4 <= MAX_CHUNK_BYTES


def _vocab_case(impl, dtype, option, reduction, layout, device):
    from fusedce import linear

    x, w, b, target = _inputs(30, 24, 130, dtype, device)
    opts = dict(OPTIONS[option]) if option in OPTIONS else dict(return_stats=True)
    if opts.pop("weight", False):
        opts["weight"] = torch.rand(130, device=device) + 0.5
    go = torch.randn(30, device=device) if reduction == "none" else torch.tensor(
        0.6, device=device)
    with linear.policy("vocab"):
        out = fusedce.linear_cross_entropy(x, w, target, linear_bias=b, reduction=reduction,
                                           chunk_bytes=VOCAB_LAYOUTS[layout], impl=impl, **opts)
        loss = out[0] if isinstance(out, tuple) else out
        grads = torch.autograd.grad(loss, (x, w, b), go.to(loss.dtype))
    opts.pop("return_stats", None)
    ref = reference_linear(x, w, target, b, go.float(), reduction=reduction, **opts)
    return out, loss, grads, ref


@pytest.mark.parametrize("layout", list(VOCAB_LAYOUTS))
@pytest.mark.parametrize("option", [*OPTIONS, "stats"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_vocab_policy_matches_unfused_reference(impl, dtype, option, layout, device,
                                                small_tiles, poison):
    out, loss, grads, ref = _vocab_case(impl, dtype, option, "mean", layout, device)
    _check(loss, grads, ref, dtype)
    if option == "stats":
        stats = out[1]
        assert rel_err(stats.lse, ref["lse"]) <= 1e-5
        assert stats.accuracy.item() == pytest.approx(ref["accuracy"].item())


@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_vocab_policy_reductions(impl, dtype, reduction, device, small_tiles, poison):
    _, loss, grads, ref = _vocab_case(impl, dtype, "weight+smoothing", reduction, "kept_some",
                                      device)
    _check(loss, grads, ref, dtype)


def test_vocab_policy_statistics_match_the_rows_policy(impl, device, small_tiles):
    """Argmax, entropy and their gradients (an entropy bonus) agree between the policies."""
    from fusedce import linear

    x, w, b, target = _inputs(30, 24, 130, torch.float32, device)
    results = {}
    for name in ("rows", "vocab"):
        with linear.policy(name):
            loss, stats = fusedce.linear_cross_entropy(
                x, w, target, linear_bias=b, reduction="none", return_stats=True,
                differentiable_stats=True, chunk_bytes=VOCAB_LAYOUTS["kept_some"], impl=impl)
            objective = loss.sum() - 0.1 * stats.entropy.sum() + 0.01 * stats.lse.sum()
            results[name] = (stats, torch.autograd.grad(objective, (x, w, b)))
    (s_rows, g_rows), (s_vocab, g_vocab) = results["rows"], results["vocab"]
    assert torch.equal(s_rows.argmax, s_vocab.argmax)
    assert rel_err(s_vocab.entropy, s_rows.entropy) <= 1e-5
    for a, b_ in zip(g_rows, g_vocab):
        assert rel_err(b_, a) <= 1e-5


def test_default_policy(monkeypatch):
    from fusedce import linear
    from fusedce.linear import choose_policy, policy

    w16, w32 = torch.zeros(4, 2, dtype=torch.bfloat16), torch.zeros(4, 2)
    # Where 16-bit products give float32 results (CUDA), a 16-bit head's gradient is tiled.
    monkeypatch.setattr(linear, "_has_mm_out_dtype", lambda device: True)
    assert choose_policy(w16, need_w=True, invariant=False) == "vocab"
    assert choose_policy(w16, need_w=False, invariant=False) == "rows"
    assert choose_policy(w32, need_w=True, invariant=False) == "rows"
    assert choose_policy(w16, need_w=True, invariant=True) == "rows"
    # Where they do not (the CPU: 16-bit heads upcast), rows.
    monkeypatch.setattr(linear, "_has_mm_out_dtype", lambda device: False)
    assert choose_policy(w16, need_w=True, invariant=False) == "rows"
    with policy("vocab"):
        assert choose_policy(w32, need_w=False, invariant=False) == "vocab"
        assert choose_policy(w32, need_w=True, invariant=True) == "rows"
    with pytest.raises(ValueError, match="policy must be"):
        with policy("columns"):
            pass


class _Allocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Every new storage an operation returns: (bytes, dtype, shape)."""

    def __init__(self):
        super().__init__()
        self.seen, self.new = set(), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                key = t.untyped_storage().data_ptr()
                if key not in self.seen:
                    self.seen.add(key)
                    self.new.append((t.untyped_storage().nbytes(), t.dtype, tuple(t.shape)))
        return out


@pytest.mark.parametrize("layout", ["kept_some", "kept_none"])
def test_vocab_policy_workspace(layout, small_tiles):
    """No logits-sized buffer, no float32 (C, H) accumulator (the CPU's one upcast copy of the
    16-bit weight aside; the "rows" policy makes a second one); every buffer within the bound
    (or one of the float32 grad_input and upcast weight); grad_weight in the weight's dtype."""
    from fusedce import linear

    x, w, b, target = _inputs(30, 24, 130, torch.bfloat16, "cpu")
    budget = VOCAB_LAYOUTS[layout]
    must_exist = {30 * 24 * 4, 130 * 24 * 4}
    counts = {}
    for name in ("vocab", "rows"):
        with linear.policy(name), _Allocations() as seen:
            loss = fusedce.linear_cross_entropy(x, w, target, linear_bias=b, chunk_bytes=budget,
                                                impl="torch")
        gx, gw, gb = torch.autograd.grad(loss, (x, w, b))
        assert gw.dtype == torch.bfloat16
        counts[name] = sum(1 for _, dtype, shape in seen.new
                           if dtype == torch.float32 and shape == (130, 24))
        if name == "vocab":
            for nbytes, dtype, shape in seen.new:
                assert nbytes // dtype.itemsize < 30 * 130 or nbytes in must_exist, shape
                assert nbytes <= max(budget, *must_exist), (nbytes, dtype, shape)
    assert counts == {"vocab": 1, "rows": 2}


def test_chunk_bytes_argument():
    x, w, target = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match="chunk_bytes must be a positive int"):
        fusedce.linear_cross_entropy(x, w, target, chunk_bytes=0)
    a = fusedce.linear_cross_entropy(x, w, target, chunk_bytes=64)
    assert torch.allclose(a, fusedce.linear_cross_entropy(x, w, target))
