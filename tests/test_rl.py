"""RL post-training outputs: temperature, the entropy statistic and its gradient, the lse's
gradient, per-token weights, the argmax, batch invariance and ``token_logprobs``; both
implementations (the kernels in Triton's interpreter), against float64 formulas."""

from __future__ import annotations

import pytest
import torch

import fusedce
from fusedce import checks
from fusedce.autograd import CrossEntropyFunction
from fusedce.testing import (
    make_logits,
    make_targets,
    reference_extras,
    reference_objective,
    rel_err,
)
from helpers import set_tiling

TOL = 2e-5


def _apply(logits, target, impl, weight=None, token_weight=None, num_items=None,
           block_size=None, n_splits=None, **options):
    """The Function with a spec made as ``cross_entropy`` makes it, plus tiling overrides (to
    reach the multi-block and split-vocabulary paths at small sizes)."""
    keywords = dict(ignore_index=-100, reduction="mean", label_smoothing=0.0, logit_scale=1.0,
                    softcap=None, lse_square_scale=0.0, return_stats=True, out_dtype=None)
    keywords.update(options)
    spec = checks.make_spec(keywords, impl)
    if impl == "triton":
        set_tiling(block_size, n_splits)
    if weight is not None:
        weight = weight.float().contiguous()
    if token_weight is not None:
        token_weight = token_weight.float().contiguous()
    return CrossEntropyFunction.apply(logits, target, weight, num_items, spec, token_weight)


OPTION_SETS = {
    "temperature": dict(temperature=0.7),
    "temperature+softcap+scale": dict(temperature=1.6, softcap=3.0, logit_scale=1.3),
    "temperature+smoothing+z": dict(temperature=0.5, label_smoothing=0.1,
                                    lse_square_scale=1e-3),
    "everything": dict(temperature=1.3, softcap=5.0, logit_scale=0.8, label_smoothing=0.05,
                       lse_square_scale=1e-3),
}
TILINGS = {
    "one_block": dict(),
    "multi_block": dict(block_size=64),  # 300 columns: four full blocks and a tail
    "split": dict(block_size=64, n_splits=3),  # three programs per row, merged
}


@pytest.mark.parametrize("tiling", list(TILINGS))
@pytest.mark.parametrize("options", list(OPTION_SETS))
@pytest.mark.parametrize("weights", ["none", "class+token"])
def test_forward_and_gradient_against_formulas(impl, device, options, tiling, weights, poison):
    if impl == "torch" and tiling != "one_block":
        pytest.skip("tiling is the kernels'")
    n, c = 7, 300
    logits = make_logits(n, c, device=device).requires_grad_()
    target = make_targets(n, c, device, ignore_fraction=0.3)
    weight = torch.rand(c, device=device) + 0.5 if "class" in weights else None
    token_weight = torch.randn(n, device=device) if "token" in weights else None  # signed
    opts = OPTION_SETS[options]
    loss, lse, z_loss, accuracy, entropy, argmax = _apply(
        logits, target, impl, weight, token_weight, **opts, **TILINGS[tiling])
    loss.backward()
    ref = reference_extras(logits, target, weight, grad_output=1.0, token_weight=token_weight,
                           **opts)
    assert rel_err(loss, ref["loss"]) < TOL
    assert rel_err(logits.grad, ref["grad"]) < TOL
    assert rel_err(lse, ref["lse"]) < TOL
    assert rel_err(entropy, ref["entropy"]) < TOL
    assert torch.equal(argmax.cpu(), ref["argmax"])
    assert abs(float(accuracy) - float(ref["accuracy"])) < 1e-6
    ignored = (target == -100).cpu()
    assert torch.all(entropy.cpu()[ignored] == 0) and torch.all(argmax.cpu()[ignored] == -1)
    assert torch.all(logits.grad.cpu()[ignored] == 0)


@pytest.mark.parametrize("tiling", list(TILINGS))
@pytest.mark.parametrize("parts", ["loss+entropy+lse", "entropy", "lse", "loss+entropy"])
def test_differentiable_stats_mixed_gradients(impl, device, tiling, parts, poison):
    """(a * loss + b * entropy + c * lse).sum() with per-token a, b, c, reduction 'none':
    the backward folds every incoming gradient into one pass."""
    if impl == "torch" and tiling != "one_block":
        pytest.skip("tiling is the kernels'")
    n, c = 6, 300
    logits = make_logits(n, c, device=device).requires_grad_()
    target = make_targets(n, c, device, ignore_fraction=0.3)
    opts = dict(temperature=0.8, softcap=4.0, label_smoothing=0.1)
    loss, lse, _, _, entropy, _ = _apply(logits, target, impl, reduction="none",
                                         differentiable_stats=True, **opts, **TILINGS[tiling])
    coefficients = {k: torch.randn(n, device=device) for k in parts.split("+")}
    values = {"loss": loss, "entropy": entropy, "lse": lse}
    objective = sum((coefficients[k] * values[k]).sum() for k in coefficients)
    objective.backward()
    ref = reference_objective(logits, target, coefficients, **opts)
    assert rel_err(logits.grad, ref["grad"]) < TOL
    assert rel_err(entropy, ref["entropy"]) < TOL
    assert torch.all(logits.grad.cpu()[(target == -100).cpu()] == 0)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_differentiable_stats_with_a_reduced_loss(impl, device, reduction):
    n, c = 5, 200
    logits = make_logits(n, c, device=device).requires_grad_()
    target = make_targets(n, c, device, ignore_fraction=0.2)
    loss, stats = fusedce.cross_entropy(logits, target, reduction=reduction, impl=impl,
                                        return_stats=True, differentiable_stats=True,
                                        temperature=1.5)
    (loss - 0.1 * stats.entropy.sum()).backward()
    x = logits.detach().double().cpu().requires_grad_()
    z = x / 1.5
    ref_loss = torch.nn.functional.cross_entropy(z, target.cpu(), reduction=reduction)
    p = torch.softmax(z, -1)
    h = -(p * torch.log_softmax(z, -1)).sum(-1)
    counted = (target != -100).cpu()
    (ref_loss - 0.1 * h[counted].sum()).backward()
    assert rel_err(logits.grad, x.grad) < TOL


def test_differentiable_stats_off_leaves_stats_without_gradient(impl, device):
    logits = make_logits(4, 50, device=device).requires_grad_()
    target = make_targets(4, 50, device)
    _, stats = fusedce.cross_entropy(logits, target, impl=impl, return_stats=True)
    assert not stats.entropy.requires_grad and not stats.lse.requires_grad


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_token_weight_mean_denominator(impl, device, reduction):
    n, c = 9, 40
    logits = make_logits(n, c, device=device).requires_grad_()
    target = make_targets(n, c, device, ignore_fraction=0.3)
    tw = torch.randn(n, device=device)
    weight = torch.rand(c, device=device) + 0.5
    loss = fusedce.cross_entropy(logits, target, weight, reduction=reduction, impl=impl,
                                 token_weight=tw)
    go = torch.randn(n, device=device) if reduction == "none" else None
    loss.backward(go)
    ref = reference_extras(logits, target, weight, reduction=reduction, token_weight=tw,
                           grad_output=go.cpu() if go is not None else 1.0)
    assert rel_err(loss, ref["loss"]) < TOL
    assert rel_err(logits.grad, ref["grad"]) < TOL
    # num_items_in_batch replaces the denominator.
    if reduction == "mean":
        loss = fusedce.cross_entropy(logits.detach(), target, weight, impl=impl,
                                     token_weight=tw, num_items_in_batch=11)
        rows = fusedce.cross_entropy(logits.detach(), target, weight, impl=impl,
                                     token_weight=tw, reduction="none")
        assert torch.allclose(loss, rows.sum() / 11, rtol=1e-6, atol=1e-7)


def test_token_weight_of_ignored_tokens_is_never_read(impl, device):
    logits = make_logits(4, 30, device=device).requires_grad_()
    target = torch.tensor([1, -100, 2, -100], device=device)
    tw = torch.tensor([1.0, float("nan"), 2.0, float("inf")], device=device)
    loss = fusedce.cross_entropy(logits, target, impl=impl, token_weight=tw)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert torch.all(logits.grad[1] == 0) and torch.all(logits.grad[3] == 0)


@pytest.mark.parametrize("case", ["temperature_zero", "temperature_negative", "temperature_inf",
                                  "token_weight_shape", "token_weight_int",
                                  "token_weight_grad", "differentiable_without_stats",
                                  "differentiable_stored"])
def test_rl_option_errors(case):
    logits, target = torch.randn(3, 5), torch.tensor([0, 1, 2])
    kwargs, error, match = {
        "temperature_zero": (dict(temperature=0.0), ValueError, "temperature must be"),
        "temperature_negative": (dict(temperature=-1.0), ValueError, "temperature must be"),
        "temperature_inf": (dict(temperature=float("inf")), ValueError, "temperature must be"),
        "token_weight_shape": (dict(token_weight=torch.ones(4)), ValueError, "target's shape"),
        "token_weight_int": (dict(token_weight=torch.ones(3, dtype=torch.long)), TypeError,
                             "floating point"),
        "token_weight_grad": (dict(token_weight=torch.ones(3, requires_grad=True)), ValueError,
                              "detach"),
        "differentiable_without_stats": (dict(differentiable_stats=True), ValueError,
                                         "return_stats=True"),
        "differentiable_stored": (dict(differentiable_stats=True, return_stats=True,
                                       backward="stored"), ValueError, "recomputes"),
    }[case]
    with pytest.raises(error, match=match):
        fusedce.cross_entropy(logits, target, **kwargs)


def _rows_in_batches(batch_fn, row_logits, row_target, n_cols, device, sizes, dtype):
    """Run ``batch_fn`` on batches of each size holding the row at several positions among
    random and extreme rows; return every result for that row."""
    g = torch.Generator().manual_seed(7)
    results = []
    for size in sizes:
        # (the largest batch at its last position only: the interpreter is slow)
        positions = {0, size // 2, size - 1} if size < 1000 else {size // 2, size - 1}
        for pos in sorted(positions):
            others = (torch.randn(size, n_cols, generator=g) * 4).to(dtype)
            if size > 2:  # extreme content: huge offsets, -inf entries, all-equal rows
                others[1] = others[1] + 1e4
                others[2, ::3] = float("-inf")
            if size > 3:
                others[3] = 0.0
            others[pos] = row_logits
            target = torch.randint(0, n_cols, (size,), generator=g)
            target[pos] = row_target
            if size > 4:
                target[4] = -100
            results.append(batch_fn(others.to(device), target.to(device), pos))
    return results


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=pytest.mark.slow)])
def test_cross_entropy_is_batch_invariant(impl, device, dtype):
    """One row alone and inside batches of 1, 7, 64 and 1000 rows (the kernels' launch plan
    splits the vocabulary below 32 rows on this device model unless batch_invariant), at the
    front, middle and back, among random and extreme rows: every output and gradient of the
    row bitwise equal."""
    n_cols = 600  # (the kernels' case is slow: about a minute in the interpreter)
    row = (torch.randn(n_cols) * 3).to(dtype)
    opts = dict(temperature=0.9, label_smoothing=0.05, softcap=20.0)

    def run(logits, target, pos):
        x = logits.clone().requires_grad_()
        loss, lse, _, acc, entropy, argmax = _apply(
            x, target, impl, reduction="none", batch_invariant=True, block_size=64,
            differentiable_stats=True, **opts)
        (loss * 0.5 + entropy * 0.25 + lse * 0.125).sum().backward()
        return [v[pos].detach().cpu() for v in (loss, lse, entropy, argmax)] + \
            [x.grad[pos].cpu()]

    sizes = [1, 7, 64, 1000] + ([4000] if impl == "torch" else [])  # (4000: whole chunks too)
    results = _rows_in_batches(run, row, 5, n_cols, device, sizes, dtype)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_cross_entropy_is_batch_invariant(impl, device, dtype):
    n_cols, hidden = 300, 32
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(n_cols, hidden, generator=g) * 0.2).to(dtype).to(device)
    row = torch.randn(hidden, generator=g).to(dtype)
    chunk = 16 if impl == "triton" else None  # (the interpreter is slow: small fixed chunks)

    def run(hidden_states, target, pos):
        h = hidden_states.clone().requires_grad_()
        loss, stats = fusedce.linear_cross_entropy(
            h, w, target, reduction="none", impl=impl, batch_invariant=True, temperature=0.7,
            return_stats=True, differentiable_stats=True, chunk_size=chunk)
        (loss + 0.1 * stats.entropy).sum().backward()
        return [v[pos].detach().cpu() for v in (loss, stats.lse, stats.entropy)] + \
            [h.grad[pos].cpu()]

    sizes = [1, 7, 64, 1000] if impl == "torch" else [1, 7, 40]
    results = _rows_in_batches(run, row, 5, hidden, device, sizes, dtype)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_linear_rl_outputs_against_formulas(impl, device):
    n, hidden, c = 11, 16, 90
    x = torch.randn(n, hidden, device=device, requires_grad=True)
    w = (torch.randn(c, hidden, device=device) * 0.3).requires_grad_()
    target = make_targets(n, c, device, ignore_fraction=0.25)
    tw = torch.randn(n, device=device)
    loss, stats = fusedce.linear_cross_entropy(
        x, w, target, reduction="none", impl=impl, temperature=1.4, token_weight=tw,
        return_stats=True, differentiable_stats=True, chunk_size=4)
    coefficients = {"loss": torch.randn(n, device=device),
                    "entropy": torch.randn(n, device=device)}
    ((coefficients["loss"] * loss).sum() + (coefficients["entropy"] * stats.entropy).sum()
     ).backward()
    x64 = x.detach().double().cpu().requires_grad_()
    w64 = w.detach().double().cpu().requires_grad_()
    logits = x64 @ w64.t()
    z = logits / 1.4
    counted = (target != -100).cpu()
    t = torch.where(counted, target.cpu(), 0)
    nll = torch.logsumexp(z, -1) - z.gather(1, t[:, None]).squeeze(1)
    rows = torch.where(counted, nll * tw.cpu().double(), 0.0)
    p = torch.softmax(z, -1)
    h = torch.where(counted, -(p * torch.log_softmax(z, -1)).sum(-1), 0.0)
    ((coefficients["loss"].cpu() * rows).sum() + (coefficients["entropy"].cpu() * h).sum()
     ).backward()
    assert rel_err(loss, rows) < TOL and rel_err(stats.entropy, h) < TOL
    assert rel_err(x.grad, x64.grad) < TOL and rel_err(w.grad, w64.grad) < TOL


@pytest.mark.parametrize("linear", [False, True])
def test_token_logprobs(impl, device, linear):
    n, hidden, c = 8, 16, 70
    target = make_targets(n, c, device, ignore_fraction=0.25)
    if linear:
        h = torch.randn(2, n // 2, hidden, device=device, requires_grad=True)
        w = torch.randn(c, hidden, device=device) * 0.3
        logp, ent = fusedce.token_logprobs(h, target.reshape(2, -1), linear_weight=w,
                                           temperature=0.6, return_entropy=True, impl=impl,
                                           chunk_size=4)
        logits64 = h.detach().double().cpu().reshape(n, hidden) @ w.double().cpu().t()
    else:
        logits = make_logits(n, c, device=device).reshape(2, n // 2, c).requires_grad_()
        logp, ent = fusedce.token_logprobs(logits, target.reshape(2, -1), temperature=0.6,
                                           return_entropy=True, impl=impl)
        logits64 = logits.detach().double().cpu().reshape(n, c)
    assert logp.shape == (2, n // 2) and logp.dtype == torch.float32
    z = logits64 / 0.6
    counted = (target != -100).cpu()
    ref = torch.log_softmax(z, -1).gather(1, torch.where(counted, target.cpu(), 0)[:, None])
    ref = torch.where(counted, ref.squeeze(1), 0.0)
    assert rel_err(logp.reshape(-1), ref) < TOL
    p = torch.softmax(z, -1)
    ref_h = torch.where(counted, -(p * torch.log_softmax(z, -1)).sum(-1), 0.0)
    assert rel_err(ent.reshape(-1), ref_h) < TOL
    assert logp.requires_grad and ent.requires_grad
    assert not torch.signbit(logp.reshape(-1)[~counted.to(logp.device)]).any()


def test_entropy_extremes(impl, device):
    """Uniform rows have entropy log C; one-hot-like rows 0; -inf logits add nothing."""
    c = 64
    logits = torch.zeros(3, c, device=device)
    logits[1, 5] = 1e4
    logits[2, c // 2:] = float("-inf")
    _, stats = fusedce.cross_entropy(logits, torch.tensor([0, 5, 1], device=device), impl=impl,
                                     return_stats=True)
    expected = torch.tensor([torch.log(torch.tensor(c * 1.0)), 0.0,
                             torch.log(torch.tensor(c / 2.0))])
    assert torch.allclose(stats.entropy.cpu(), expected, atol=1e-5)
    assert stats.argmax.tolist() == [0, 5, 0]


def _peak(fn) -> int:
    from bench.memory import cpu_peak_supported, peak_extra_bytes

    if not cpu_peak_supported():
        pytest.skip("no peak resident set on this machine")
    return min(peak_extra_bytes(fn, torch.device("cpu")) for _ in range(3))


def test_differentiable_stats_memory():
    """``differentiable_stats=False`` allocates nothing more than a plain call with statistics;
    with True, no logits-sized buffer beyond the gradient (the PyTorch implementation on the
    CPU; the kernels allocate only per-row vectors either way)."""
    n, c = 256, 32768  # 32 MiB of float32 logits
    logits = make_logits(n, c)
    target = make_targets(n, c)
    logits_bytes = logits.numel() * 4

    def step(**kw):
        def run():
            x = logits.clone().requires_grad_()  # (the clone is the "LM head output")
            loss, stats = fusedce.cross_entropy(x, target, reduction="none", impl="torch",
                                                return_stats=True, **kw)
            objective = loss.sum()
            if kw.get("differentiable_stats"):
                objective = objective + 0.1 * stats.entropy.sum() + 0.01 * stats.lse.sum()
            objective.backward()
        return run

    plain = _peak(step())
    off = _peak(step(differentiable_stats=False))
    on = _peak(step(differentiable_stats=True))
    # The clone and the gradient are two logits-sized tensors; scratch chunks are 4 MiB each.
    assert off <= plain + (8 << 20), (off, plain)
    assert on <= 2 * logits_bytes + (24 << 20), (on, logits_bytes)


@pytest.mark.parametrize("tiling", list(TILINGS))
@pytest.mark.parametrize("parts", ["loss+entropy+lse", "entropy"])
def test_masked_vocabulary_differentiable_stats_gradient(impl, device, tiling, parts):
    """-inf columns (a masked or padded vocabulary, 30% of it), targets reachable: loss, lse,
    entropy and the gradient of ``a * loss + b * entropy + c * lse`` are the formula's, and a
    masked column's gradient is exactly 0 (not the NaN of ``0 * inf`` in the entropy's term)."""
    if impl == "torch" and tiling != "one_block":
        pytest.skip("tiling is the kernels'")
    n, c = 6, 300
    g = torch.Generator().manual_seed(7)
    masked = torch.rand(c, generator=g) < 0.3
    logits = make_logits(n, c, device=device)
    logits[:, masked.to(device)] = float("-inf")
    allowed = torch.nonzero(~masked).squeeze(1)
    target = allowed[torch.randint(0, allowed.numel(), (n,), generator=g)].to(device)
    target[2] = -100
    x = logits.clone().requires_grad_()
    opts = dict(temperature=0.8, logit_scale=1.1)
    loss, lse, _, _, entropy, _ = _apply(x, target, impl, reduction="none",
                                         differentiable_stats=True, **opts, **TILINGS[tiling])
    coefficients = {k: torch.randn(n, device=device) for k in parts.split("+")}
    values = {"loss": loss, "entropy": entropy, "lse": lse}
    sum((coefficients[k] * values[k]).sum() for k in coefficients).backward()
    ref = reference_objective(logits, target, coefficients, **opts)
    assert torch.isfinite(x.grad).all()
    assert torch.all(x.grad[:, masked.to(device)] == 0)
    assert rel_err(x.grad, ref["grad"]) < TOL
    assert rel_err(loss, ref["loss"]) < TOL and rel_err(entropy, ref["entropy"]) < TOL
