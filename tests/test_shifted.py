"""Shifted, packed and multi-token losses: against a float64 reference that rolls and masks the
labels explicitly, position by position; both implementations."""

from __future__ import annotations

import pytest
import torch

import fusedce
from fusedce.testing import make_logits, reference_extras, rel_err

TOL = 2e-5
IGNORE = -100


def _reference_targets(labels, shift, attention_mask=None, cu_seqlens=None, position_ids=None):
    """Position by position, in plain Python: the target of (b, t), or IGNORE."""
    b_n, t_n = labels.shape
    out = torch.full((b_n, t_n), IGNORE, dtype=torch.long)
    docs = None
    if cu_seqlens is not None:
        docs = torch.zeros(b_n * t_n, dtype=torch.long)
        for k in range(len(cu_seqlens) - 1):
            docs[int(cu_seqlens[k]):int(cu_seqlens[k + 1])] = k
        docs = docs.reshape(b_n, t_n)
    for b in range(b_n):
        for t in range(t_n):
            src = t + shift
            if src >= t_n:
                continue
            if attention_mask is not None and attention_mask[b, src] == 0:
                continue
            if docs is not None and docs[b, src] != docs[b, t]:
                continue
            if position_ids is not None and shift and \
                    position_ids[b, src] - position_ids[b, t] != shift:
                continue
            out[b, t] = labels[b, src]
    return out


def _case(kind: str, b_n: int = 3, t_n: int = 11, vocab: int = 37):
    g = torch.Generator().manual_seed(hash(kind) % 1000)
    labels = torch.randint(0, vocab, (b_n, t_n), generator=g)
    extra = {}
    if kind == "pad_right":
        lengths = torch.tensor([t_n, 7, 1])
        extra["attention_mask"] = (torch.arange(t_n) < lengths[:, None]).long()
    elif kind == "pad_left":
        lengths = torch.tensor([t_n, 5, 2])
        extra["attention_mask"] = (torch.arange(t_n) >= t_n - lengths[:, None]).long()
    elif kind == "mask_holes":
        extra["attention_mask"] = (torch.rand(b_n, t_n, generator=g) > 0.3).long()
    elif kind == "prompt_ignored":
        labels[:, :4] = IGNORE
    elif kind == "cu_seqlens":
        # one row of 3 * 11 tokens: documents of 1, 10, 11 (ending at a row end), 1, 10
        labels = labels.reshape(1, -1)
        extra["cu_seqlens"] = torch.tensor([0, 1, 11, 22, 23, 33], dtype=torch.int32)
    elif kind == "position_ids":
        starts = [[0, 1, 6], [0, 11], [0, 4, 5, 9]]  # length-1 documents, one filling the row
        pos = torch.zeros(b_n, t_n, dtype=torch.long)
        for b, s in enumerate(starts):
            bounds = s + [t_n]
            for k in range(len(s)):
                pos[b, bounds[k]:bounds[k + 1]] = torch.arange(bounds[k + 1] - bounds[k])
        extra["position_ids"] = pos
    elif kind == "all_masked":
        extra["attention_mask"] = torch.zeros(b_n, t_n, dtype=torch.long)
    return labels, extra, vocab


KINDS = ["plain", "pad_right", "pad_left", "mask_holes", "prompt_ignored", "cu_seqlens",
         "position_ids", "all_masked"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shift", [0, 1, 2, 4])
def test_shifted_targets_match_explicit_rolling(kind, shift):
    labels, extra, _ = _case(kind)
    got = fusedce.shifted_targets(labels, shift, **extra)
    assert torch.equal(got, _reference_targets(labels, shift, **extra))
    assert int(fusedce.count_targets(labels, shift, **extra)) == int((got != IGNORE).sum())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shift", [0, 1, 3])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_shifted_cross_entropy_against_reference(impl, device, kind, shift, reduction):
    labels, extra, vocab = _case(kind)
    logits = make_logits(labels.numel(), vocab).reshape(*labels.shape, vocab).to(device)
    logits.requires_grad_()
    options = dict(label_smoothing=0.1, logit_scale=1.2, softcap=20.0, lse_square_scale=1e-3)
    weight = torch.rand(vocab) + 0.5
    loss = fusedce.shifted_cross_entropy(
        logits, labels.to(device), shift, weight=weight.to(device), reduction=reduction,
        impl=impl, **{k: v.to(device) for k, v in extra.items()}, **options)
    go = torch.randn(labels.shape) if reduction == "none" else torch.tensor(1.0)
    loss.backward(go.to(device))
    target = _reference_targets(labels, shift, **extra)
    ref = reference_extras(logits.reshape(-1, vocab), target.reshape(-1), weight,
                           reduction=reduction, grad_output=go.reshape(-1) if
                           reduction == "none" else 1.0, **options)
    assert loss.shape == (labels.shape if reduction == "none" else ())
    assert rel_err(loss.reshape(-1) if reduction == "none" else loss, ref["loss"]) < TOL
    assert rel_err(logits.grad.reshape(-1, vocab), ref["grad"]) < TOL
    uncounted = (target == IGNORE).to(device)
    assert torch.all(logits.grad[uncounted] == 0)


def test_strided_logits_are_read_in_place(impl, device):
    """logits[:, :-1] with labels[:, 1:] and shift 0: the same loss and gradient as the
    contiguous logits, and the view is never made contiguous."""
    labels, _, vocab = _case("plain")
    full = make_logits(labels.numel(), vocab).reshape(*labels.shape, vocab).to(device)
    view = full.clone().requires_grad_()
    sliced = view[:, :-1]
    assert not sliced.is_contiguous()
    calls = []
    real = torch.Tensor.contiguous

    def spy(self, *a, **k):
        if self.data_ptr() == sliced.data_ptr() and self.shape == sliced.shape:
            calls.append(self.shape)
        return real(self, *a, **k)

    torch.Tensor.contiguous = spy
    try:
        loss, stats = fusedce.shifted_cross_entropy(sliced, labels[:, 1:].to(device), 0,
                                                    impl=impl, return_stats=True)
    finally:
        torch.Tensor.contiguous = real
    loss.backward()
    assert not calls
    ref_logits = full.clone().requires_grad_()
    ref = fusedce.shifted_cross_entropy(ref_logits, labels.to(device), 1, impl=impl)
    ref.backward()
    assert rel_err(loss, ref) < 1e-6
    assert rel_err(view.grad[:, :-1], ref_logits.grad[:, :-1]) < 1e-6
    assert torch.all(view.grad[:, -1] == 0)
    assert stats.lse.shape == sliced.shape[:-1]


def test_multi_token_prediction(impl, device):
    """Three depths in one call equal three separate reference losses, weighted; per-depth
    statistics; the logits are not modified."""
    labels, extra, vocab = _case("pad_right")
    depths = [make_logits(labels.numel(), vocab).reshape(*labels.shape, vocab).to(device)
              .requires_grad_() for _ in range(3)]
    before = [d.detach().clone() for d in depths]
    loss, stats = fusedce.shifted_cross_entropy(
        tuple(depths), labels.to(device), impl=impl, return_stats=True,
        attention_mask=extra["attention_mask"].to(device), label_smoothing=0.05)
    loss.backward()
    weights = (1.0, 0.5, 0.5)
    total = 0.0
    for d, (x, w) in enumerate(zip(depths, weights)):
        target = _reference_targets(labels, d + 1, **extra)
        ref = reference_extras(x.reshape(-1, vocab), target.reshape(-1), label_smoothing=0.05,
                               grad_output=w)
        total += w * float(ref["loss"])
        assert rel_err(x.grad.reshape(-1, vocab), ref["grad"]) < TOL
        assert rel_err(stats.loss[d], ref["loss"]) < TOL
        assert abs(float(stats.accuracy[d]) - float(ref["accuracy"])) < 1e-6
        assert int(stats.count[d]) == int((target != IGNORE).sum())
        assert torch.equal(x.detach(), before[d])  # not mutated (inplace_backward is off)
    assert abs(float(loss) - total) < 1e-5 * abs(total)


def test_shifted_linear_cross_entropy(impl, device):
    labels, extra, vocab = _case("position_ids")
    hidden = torch.randn(*labels.shape, 16, device=device, requires_grad=True)
    w = (torch.randn(vocab, 16, device=device) * 0.3).requires_grad_()
    loss = fusedce.shifted_linear_cross_entropy(hidden, w, labels.to(device), impl=impl,
                                                position_ids=extra["position_ids"].to(device),
                                                chunk_size=8)
    loss.backward()
    h64 = hidden.detach().double().cpu().requires_grad_()
    w64 = w.detach().double().cpu().requires_grad_()
    target = _reference_targets(labels, 1, **extra).reshape(-1)
    ref = torch.nn.functional.cross_entropy((h64 @ w64.t()).reshape(-1, vocab), target)
    ref.backward()
    assert rel_err(loss, ref) < TOL
    assert rel_err(hidden.grad, h64.grad) < TOL and rel_err(w.grad, w64.grad) < TOL


def test_shifted_memory_no_copies():
    """Peak memory of the shifted loss on (B, T, V) logits equals that of cross_entropy on the
    already-flattened logits with already-shifted labels (PyTorch implementation, CPU)."""
    from bench.memory import cpu_peak_supported, peak_extra_bytes

    if not cpu_peak_supported():
        pytest.skip("no peak resident set on this machine")
    b_n, t_n, vocab = 4, 256, 16384  # 64 MiB of float32 logits
    logits = make_logits(b_n * t_n, vocab).reshape(b_n, t_n, vocab)
    labels = torch.randint(0, vocab, (b_n, t_n))
    target = fusedce.shifted_targets(labels, 1).reshape(-1)
    cpu = torch.device("cpu")

    def shifted():
        x = logits.detach().requires_grad_()
        fusedce.shifted_cross_entropy(x, labels, impl="torch").backward()

    def flat():
        x = logits.detach().requires_grad_()
        fusedce.cross_entropy(x.view(-1, vocab), target, impl="torch").backward()

    def strided():
        x = logits.detach().requires_grad_()
        fusedce.shifted_cross_entropy(x[:, :-1], labels[:, 1:], 0, impl="torch").backward()

    peaks = {name: min(peak_extra_bytes(fn, cpu) for _ in range(3))
             for name, fn in (("flat", flat), ("shifted", shifted), ("strided", strided))}
    grad_bytes = logits.numel() * 4
    assert abs(peaks["shifted"] - peaks["flat"]) <= (1 << 20), peaks
    # The slice's own backward (autograd's, for x[:, :-1]) makes a gradient of x's shape
    # beside the loss's: two gradients and scratch, no copy of the logits.
    assert peaks["strided"] <= 2 * grad_bytes + (16 << 20), peaks


@pytest.mark.parametrize("case", ["negative_shift", "mask_shape", "cu_bad", "shift_tuple"])
def test_shifted_errors(case):
    labels = torch.randint(0, 10, (2, 5))
    logits = torch.randn(2, 5, 10)
    kwargs, error, match = {
        "negative_shift": (dict(shift=-1), ValueError, "shift must be an int >= 0"),
        "mask_shape": (dict(attention_mask=torch.ones(2, 4)), ValueError, "labels' shape"),
        "cu_bad": (dict(cu_seqlens=torch.tensor([0, 3, 7])), ValueError, "rise from 0"),
        "shift_tuple": (dict(shift=(1, 2)), ValueError, "tuple of logits"),
    }[case]
    with pytest.raises(error, match=match):
        fusedce.shifted_cross_entropy(logits, labels, **kwargs)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_other_layouts_are_read_as_groups_of_rows(impl, device, reduction):
    """Logits whose sequences are not rows of one view (a transposed (T, B, V) tensor seen as
    (B, T, V)) are read in place as groups of rows, and give the same answers, statistics
    included."""
    labels, extra, vocab = _case("pad_right")
    base = make_logits(labels.numel(), vocab).reshape(labels.shape[1], labels.shape[0], vocab)
    x = base.to(device).requires_grad_()
    logits = x.transpose(0, 1)  # (B, T, V), sequences interleaved in memory
    weight = torch.rand(vocab) + 0.5
    tw = torch.rand(labels.shape) + 0.5
    loss, stats = fusedce.shifted_cross_entropy(
        logits, labels.to(device), 2, weight=weight.to(device), token_weight=tw.to(device),
        reduction=reduction, impl=impl, return_stats=True, lse_square_scale=1e-3,
        attention_mask=extra["attention_mask"].to(device))
    go = torch.randn(labels.shape) if reduction == "none" else torch.tensor(1.0)
    loss.backward(go.to(device))
    target = _reference_targets(labels, 2, **extra)
    flat = logits.detach().reshape(-1, vocab)
    ref = reference_extras(flat, target.reshape(-1), weight, reduction=reduction,
                           token_weight=tw.reshape(-1), lse_square_scale=1e-3,
                           grad_output=go.reshape(-1) if reduction == "none" else 1.0)
    assert rel_err(loss.reshape(-1) if reduction == "none" else loss, ref["loss"]) < TOL
    assert rel_err(x.grad.transpose(0, 1).reshape(-1, vocab), ref["grad"]) < TOL
    assert abs(float(stats.accuracy) - float(ref["accuracy"])) < 1e-6
    assert rel_err(stats.entropy.reshape(-1), ref["entropy"]) < TOL
    assert rel_err(stats.z_loss.reshape(-1) if reduction == "none" else stats.z_loss,
                   ref["z_loss"]) < 1e-4


@pytest.mark.parametrize("tiling", ["multi_block", "split"])
def test_kernels_read_groups_of_rows(device, tiling):
    """The kernels' group addressing (``fusedce.kernels.Rows``) on the multi-block and
    split-vocabulary paths: a (G, T, V) view of sliced logits, in place and not, against the
    contiguous rows."""
    from fusedce import CrossEntropyFunction, LossSpec

    g_n, t_n, vocab = 3, 5, 300
    base = make_logits(g_n * (t_n + 2), vocab).reshape(g_n, t_n + 2, vocab).to(device)
    target = torch.randint(0, vocab, (g_n * t_n,), device=device)
    target[3] = IGNORE
    from helpers import set_tiling

    set_tiling(64, 3 if tiling == "split" else 1)
    spec = LossSpec(impl="triton", reduction="none", label_smoothing=0.1, return_stats=True)
    ref = reference_extras(base[:, 1:-1].reshape(-1, vocab), target, reduction="none",
                           label_smoothing=0.1, grad_output=torch.ones(g_n * t_n))
    for inplace in (False, True):
        full = base.clone().requires_grad_()
        x = full * 1
        view = x[:, 1:-1]  # (G, T, V) with a group stride of (T + 2) * V
        outside = x.detach()[:, [0, -1]].clone()
        loss, lse, *_ = CrossEntropyFunction.apply(view, target, None, None,
                                                   spec.replace(inplace_backward=inplace))
        loss.sum().backward()
        assert rel_err(loss, ref["loss"]) < TOL and rel_err(lse, ref["lse"]) < TOL
        assert rel_err(full.grad[:, 1:-1].reshape(-1, vocab), ref["grad"]) < TOL
        assert torch.all(full.grad[:, [0, -1]] == 0)
        assert torch.equal(x.detach()[:, [0, -1]], outside)
