"""fusedce.distillation_loss against float64 formulas written from the definitions (and against
TRL's generalized_jsd_loss where TRL defines it): every divergence, teacher form, tail mode,
temperature, beta and reduction, with ignored rows, token weights and a hard loss; extreme
teachers; bad inputs refused before anything is written."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import fusedce
from fusedce import distill
from fusedce.testing import rel_err

N, C, K = 9, 13, 4
PAIRS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.0), ("jsd", 0.3), ("jsd", 1.0)]


def _divergence(log_q, log_p, divergence, beta):
    """Per-row divergence between bucket distributions (R, B) in float64."""
    q, p = log_q.exp(), log_p.exp()

    def kl(a, log_a, log_b):  # (the where inside the product keeps empty buckets' grads finite)
        return (a * torch.where(a > 0, log_a - log_b, torch.zeros_like(a))).sum(-1)

    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0):
        return kl(p, log_p, log_q)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1):
        return kl(q, log_q, log_p)
    m = beta * p + (1 - beta) * q
    log_m = torch.where(m > 0, m, torch.ones_like(m)).log()  # (an empty bucket: unused)
    return beta * kl(p, log_p, log_m) + (1 - beta) * kl(q, log_q, log_m)


def _reference(x, teacher, ids, logprobs, target, divergence, beta, temperature, tail,
               hard, token_weight, reduction):
    """Loss and gradient of ``x`` from the definitions, in float64."""
    x = x.detach().double().requires_grad_()
    log_q = torch.log_softmax(x / temperature, -1)
    if teacher is not None:
        rows = _divergence(log_q, torch.log_softmax(teacher.double() / temperature, -1),
                           divergence, beta)
    else:
        valid = ids >= 0
        safe = ids.clamp(min=0)
        lq = torch.where(valid, log_q.gather(1, safe), -math.inf)
        lp = torch.where(valid, logprobs.double(), -math.inf)
        if tail == "bucket":
            q_tail = 1 - lq.exp().sum(1, keepdim=True)
            p_tail = (1 - lp.exp().sum(1, keepdim=True)).clamp(min=0)
            lq = torch.cat([lq, q_tail.log()], 1)
            lp = torch.cat([lp, p_tail.log()], 1)
        else:
            lq = lq - torch.logsumexp(lq, 1, keepdim=True)
            lp = lp - torch.logsumexp(lp, 1, keepdim=True)
        rows = _divergence(lq, lp, divergence, beta)
    counted = torch.ones(N, dtype=torch.bool) if target is None else target != -100
    if hard:
        ce = torch.nn.functional.cross_entropy(x, target.clamp(min=0), reduction="none")
        rows = rows + hard * ce
    rows = torch.where(counted, rows, torch.zeros_like(rows))
    if token_weight is not None:
        rows = rows * token_weight.double()
    if reduction == "none":
        loss = rows
    elif reduction == "sum":
        loss = rows.sum()
    else:
        loss = rows.sum() / counted.sum().clamp(min=1)
    go = torch.linspace(0.5, 1.5, N, dtype=torch.float64) if reduction == "none" else \
        torch.tensor(1.0, dtype=torch.float64)
    (grad,) = torch.autograd.grad((loss * go).sum(), x)
    return loss.detach(), grad, go


def _teacher_forms(generator):
    teacher = torch.randn(N, C, generator=generator) * 2
    log_p = torch.log_softmax(teacher.double(), -1)
    ids = log_p.topk(K, dim=1).indices
    ids[2, -1] = -1  # an unused slot
    logprobs = log_p.gather(1, ids.clamp(min=0)).float()
    return teacher, ids, logprobs


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("form", ["logits", "bucket", "renormalize"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("divergence, beta", PAIRS, ids=[f"{d}-{b}" for d, b in PAIRS])
def test_matches_the_definitions(divergence, beta, temperature, form, reduction, monkeypatch):
    monkeypatch.setattr(distill, "CHUNK_ELEMENTS", 4 * C)  # several chunks of rows
    g = torch.Generator().manual_seed(hash((divergence, beta, temperature, form)) % 1000)
    x = torch.randn(N, C, generator=g) * 2
    teacher, ids, logprobs = _teacher_forms(g)
    target = torch.randint(0, C, (N,), generator=g)
    target[[1, 5]] = -100
    token_weight = torch.rand(N, generator=g) + 0.5
    hard = 0.5 if form != "renormalize" else 0.0
    kwargs = dict(teacher_logits=teacher) if form == "logits" else dict(
        teacher_topk_ids=ids, teacher_topk_logprobs=logprobs, tail=form)
    xi = x.clone().requires_grad_()
    loss = fusedce.distillation_loss(xi, target=target, divergence=divergence, beta=beta,
                                     temperature=temperature, hard_loss_weight=hard,
                                     token_weight=token_weight, reduction=reduction, **kwargs)
    ref, ref_grad, go = _reference(x, teacher if form == "logits" else None, ids, logprobs,
                                   target, divergence, beta, temperature, form, hard,
                                   token_weight, reduction)
    (grad,) = torch.autograd.grad(loss, xi, go.float() if reduction == "none" else None)
    assert rel_err(loss, ref) <= 1e-5
    assert rel_err(grad, ref_grad) <= 1e-5
    assert torch.all(grad[[1, 5]] == 0)  # ignored rows: no gradient


def test_matches_trl_generalized_jsd():
    pytest.importorskip("trl")
    import warnings

    from fusedce.integrations import trl as fce_trl

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gkd = fce_trl._gkd_trainer()
    if gkd is None:
        pytest.skip("this TRL has no GKDTrainer")
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 5, 17, generator=g).requires_grad_()
    t = torch.randn(2, 5, 17, generator=g)
    labels = torch.randint(0, 17, (2, 5), generator=g)
    labels[0, :2] = -100
    for beta in (0.0, 0.3, 1.0):
        for reduction, items in [("batchmean", None), ("sum", None), ("mean", None),
                                 ("batchmean", 7), ("none", None)]:
            theirs = gkd.generalized_jsd_loss(s, t, labels, beta=beta, temperature=1.5,
                                              reduction=reduction, num_items_in_batch=items)
            ours = fce_trl.generalized_jsd_loss(s, t, labels, beta=beta, temperature=1.5,
                                                reduction=reduction, num_items_in_batch=items)
            assert rel_err(ours, theirs) <= 1e-5, (beta, reduction)
            (g_theirs,) = torch.autograd.grad(theirs.sum(), s)
            (g_ours,) = torch.autograd.grad(ours.sum(), s)
            assert rel_err(g_ours, g_theirs) <= 1e-5, (beta, reduction)
    fce_trl.apply()
    try:
        assert gkd.generalized_jsd_loss is fce_trl.generalized_jsd_loss
    finally:
        fce_trl.revert()
    assert gkd.generalized_jsd_loss is not fce_trl.generalized_jsd_loss


@pytest.mark.parametrize("divergence, beta", PAIRS, ids=[f"{d}-{b}" for d, b in PAIRS])
def test_extreme_teachers(divergence, beta):
    """A teacher equal to the student gives 0 and no gradient; a one-hot teacher and -inf
    columns stay finite where the divergence is."""
    x = torch.randn(4, 7, requires_grad=True)
    loss = fusedce.distillation_loss(x, x.detach().clone(), divergence=divergence, beta=beta)
    (grad,) = torch.autograd.grad(loss, x)
    assert abs(loss.item()) < 1e-6 and grad.abs().max().item() < 1e-6
    one_hot = torch.full((4, 7), -math.inf)
    one_hot[:, 2] = 0.0
    loss = fusedce.distillation_loss(x, one_hot, divergence=divergence, beta=beta)
    (grad,) = torch.autograd.grad(loss, x)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1.0):
        assert loss.item() == math.inf  # KL(q || p) with p = 0 where q > 0
    else:
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        ref, ref_grad, _ = _reference_small(x, one_hot, divergence, beta)
        assert rel_err(loss, ref) <= 1e-5 and rel_err(grad, ref_grad) <= 1e-5


def _reference_small(x, teacher, divergence, beta):
    xd = x.detach().double().requires_grad_()
    rows = _divergence(torch.log_softmax(xd, -1), torch.log_softmax(teacher.double(), -1),
                       divergence, beta)
    loss = rows.mean()
    return loss.detach(), torch.autograd.grad(loss, xd)[0], None


def test_statistics_and_inplace_backward():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(N, C, generator=g)
    teacher = torch.randn(N, C, generator=g)
    teacher[0] = x[0] * 3  # the same argmax on row 0
    target = torch.randint(0, C, (N,), generator=g)
    target[4] = -100
    xi = x.clone().requires_grad_()
    loss, stats = fusedce.distillation_loss(xi, teacher, target, temperature=2.0,
                                            return_stats=True)
    (grad,) = torch.autograd.grad(loss, xi)
    log_q = torch.log_softmax(x.double() / 2, -1)
    entropy = -(log_q.exp() * log_q).sum(-1)
    assert rel_err(stats.entropy, entropy) <= 1e-5
    div = _divergence(log_q, torch.log_softmax(teacher.double() / 2, -1), "forward_kl", 0.5)
    div[4] = 0
    assert rel_err(stats.divergence, div) <= 1e-5
    agree = (x.argmax(1) == teacher.argmax(1)) & (target != -100)
    assert stats.agreement.item() == pytest.approx(agree.sum().item() / 8)
    # The gradient written into the input's storage: the same values.
    h = x.clone().requires_grad_()
    logits = h * 1.0  # an activation, as the LM head's output is
    loss2 = fusedce.distillation_loss(logits, teacher, target, temperature=2.0,
                                      inplace_backward=True)
    loss2.backward()
    assert torch.equal(loss2, loss)
    assert rel_err(h.grad, grad) <= 1e-6


def test_16_bit_students_and_teachers():
    g = torch.Generator().manual_seed(9)
    x = (torch.randn(N, C, generator=g) * 2).to(torch.bfloat16)
    teacher = (torch.randn(N, C, generator=g) * 2).to(torch.float16)
    xi = x.clone().requires_grad_()
    loss = fusedce.distillation_loss(xi, teacher, divergence="jsd", beta=0.3)
    (grad,) = torch.autograd.grad(loss, xi)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    ref, ref_grad, _ = _reference(x.float(), teacher.float(), None, None, None, "jsd", 0.3,
                                  1.0, "bucket", 0.0, None, "mean")
    assert rel_err(loss, ref) <= 1e-5
    assert rel_err(grad, ref_grad) <= 1e-2


@pytest.mark.parametrize("case, error, message", [
    ("k_too_large", ValueError, "more than the"),
    ("duplicate", ValueError, "duplicate id"),
    ("out_of_range", ValueError, "outside"),
    ("shapes", ValueError, "must both have shape"),
    ("teacher_grad", ValueError, "require grad"),
    ("teacher_shape", ValueError, "input's shape"),
    ("both_teachers", ValueError, "one of the two"),
    ("divergence", ValueError, "divergence must be"),
    ("beta", ValueError, "beta must be"),
    ("impl", ValueError, "impl must be"),
])
def test_bad_inputs_fail_before_anything_is_written(case, error, message):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, C, generator=g)
    before = x.clone()
    teacher, ids, logprobs = _teacher_forms(g)
    kwargs = dict(teacher_topk_ids=ids, teacher_topk_logprobs=logprobs)
    if case == "k_too_large":
        kwargs = dict(teacher_topk_ids=torch.zeros(N, C + 1, dtype=torch.long),
                      teacher_topk_logprobs=torch.zeros(N, C + 1))
    elif case == "duplicate":
        ids = ids.clone()
        ids[3, 1] = ids[3, 0]
        kwargs["teacher_topk_ids"] = ids
    elif case == "out_of_range":
        ids = ids.clone()
        ids[0, 0] = C
        kwargs["teacher_topk_ids"] = ids
    elif case == "shapes":
        kwargs["teacher_topk_logprobs"] = logprobs[:, :2]
    elif case == "teacher_grad":
        kwargs = dict(teacher_logits=teacher.requires_grad_())
    elif case == "teacher_shape":
        kwargs = dict(teacher_logits=teacher[:, :3])
    elif case == "both_teachers":
        kwargs["teacher_logits"] = teacher
    elif case == "divergence":
        kwargs["divergence"] = "kl"
    elif case == "beta":
        kwargs.update(divergence="jsd", beta=1.5)
    elif case == "impl":
        kwargs["impl"] = "cuda"
    logits = x.requires_grad_() * 1.0
    with pytest.raises(error, match=message):
        fusedce.distillation_loss(logits, inplace_backward=True, **kwargs)
    assert torch.equal(logits.detach(), before)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("form", ["logits", "hidden", "bucket"])
@pytest.mark.parametrize("divergence, beta", PAIRS[:2] + PAIRS[3:4],
                         ids=["forward_kl", "reverse_kl", "jsd-0.3"])
def test_linear_distillation_matches_the_logits_loss(divergence, beta, form, reduction):
    """From hidden states and heads, in chunks of 5 rows: the loss and the gradients of the
    hidden states, the head and its bias equal those of the logits-level loss on the made
    logits, the teacher given as logits, as its own hidden states and head, or as top-k."""
    g = torch.Generator().manual_seed(21)
    b_n, t_n, h_n, v_n = 2, 6, 8, 23
    h = torch.randn(b_n, t_n, h_n, generator=g)
    w = torch.randn(v_n, h_n, generator=g) * 0.5
    bias = torch.randn(v_n, generator=g) * 0.1
    ht, wt = torch.randn(b_n, t_n, 5, generator=g), torch.randn(v_n, 5, generator=g) * 0.5
    teacher = ht @ wt.t()
    logprobs, ids = torch.log_softmax(teacher, -1).topk(4, dim=-1)
    labels = torch.randint(0, v_n, (b_n, t_n), generator=g)
    labels[0, 0] = -100
    common = dict(divergence=divergence, beta=beta, temperature=1.7, hard_loss_weight=0.3,
                  reduction=reduction, shift=1)
    teacher_kw = {"logits": dict(teacher_logits=teacher),
                  "hidden": dict(teacher_input=ht, teacher_linear_weight=wt),
                  "bucket": dict(teacher_topk_ids=ids, teacher_topk_logprobs=logprobs)}[form]
    results = []
    for fused in (True, False):
        hh, ww, bb = (t.clone().requires_grad_() for t in (h, w, bias))
        if fused:
            loss = fusedce.linear_distillation_loss(hh, ww, target=labels, linear_bias=bb,
                                                    chunk_size=5, **teacher_kw, **common)
        else:
            logit_kw = dict(teacher_kw) if form != "hidden" else dict(teacher_logits=teacher)
            loss = fusedce.distillation_loss(hh @ ww.t() + bb, target=labels, **logit_kw,
                                             **common)
        go = torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape)
        results.append((loss.detach(), *torch.autograd.grad(loss, (hh, ww, bb), go)))
    for a, b in zip(*results):
        assert rel_err(a, b) <= 1e-5


def test_shift_equals_sliced_positions():
    """shift=1 on (B, T, C): position t against label t + 1, the last position not counted;
    the same as slicing logits[:, :-1] and labels[:, 1:]."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(3, 7, 11, generator=g)
    teacher = torch.randn(3, 7, 11, generator=g)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[1, 4] = -100
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    a = fusedce.distillation_loss(xa, teacher, labels, shift=1, hard_loss_weight=0.2)
    b = fusedce.distillation_loss(xb[:, :-1], teacher[:, :-1], labels[:, 1:],
                                  hard_loss_weight=0.2)
    (ga,) = torch.autograd.grad(a, xa)
    (gb,) = torch.autograd.grad(b, xb)
    assert rel_err(a, b) <= 1e-6 and rel_err(ga, gb) <= 1e-6
    assert torch.all(ga[:, -1] == 0)


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("temperature", [0.5, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("divergence, beta", PAIRS, ids=[f"{d}-{b}" for d, b in PAIRS])
def test_kernel_matches_the_definitions(divergence, beta, dtype, temperature, reduction,
                                        device, poison):
    """The Triton kernel (16-column blocks: several per row, and a masked tail), with ignored
    rows, token weights, a hard loss and the statistics, against the float64 formulas."""
    from fusedce.kernels import tiling

    g = torch.Generator().manual_seed(31)
    x = (torch.randn(N, C + 24, generator=g) * 2).to(dtype)
    teacher = (torch.randn(N, C + 24, generator=g) * 2).to(dtype)
    teacher[0] = x[0]
    target = torch.randint(0, C + 24, (N,), generator=g)
    target[[1, 5]] = -100
    token_weight = torch.rand(N, generator=g) + 0.5
    xi = x.to(device).requires_grad_()
    with tiling(block_size=16):
        loss, stats = fusedce.distillation_loss(
            xi, teacher.to(device), target.to(device), divergence=divergence, beta=beta,
            temperature=temperature, hard_loss_weight=0.5, token_weight=token_weight.to(device),
            reduction=reduction, impl="triton", return_stats=True)
        go = torch.linspace(0.5, 1.5, N) if reduction == "none" else None
        (grad,) = torch.autograd.grad(loss, xi, go.to(device) if go is not None else None)
    ref_loss, ref_grad = _reference_wide(x.float(), teacher.float(), target, divergence, beta,
                                         temperature, token_weight, reduction)
    assert rel_err(loss.cpu(), ref_loss) <= 1e-5
    assert rel_err(grad.float().cpu(), ref_grad) <= (1e-5 if dtype == torch.float32 else 1e-2)
    log_q = torch.log_softmax(x.double() / temperature, -1)
    assert rel_err(stats.entropy.cpu(), -(log_q.exp() * log_q).sum(-1)) <= 1e-5
    agree = ((x.float().argmax(1) == teacher.float().argmax(1)) & (target != -100)).sum()
    assert stats.agreement.item() == pytest.approx(agree.item() / 7)


def _reference_wide(x, teacher, target, divergence, beta, temperature, token_weight, reduction):
    xd = x.double().requires_grad_()
    rows = _divergence(torch.log_softmax(xd / temperature, -1),
                       torch.log_softmax(teacher.double() / temperature, -1), divergence, beta)
    rows = rows + 0.5 * torch.nn.functional.cross_entropy(xd, target.clamp(min=0),
                                                          reduction="none")
    counted = target != -100
    rows = torch.where(counted, rows, torch.zeros_like(rows)) * token_weight.double()
    loss = rows if reduction == "none" else rows.sum() / counted.sum()
    go = torch.linspace(0.5, 1.5, x.shape[0], dtype=torch.float64) if reduction == "none" \
        else torch.tensor(1.0, dtype=torch.float64)
    return loss.detach(), torch.autograd.grad((loss * go).sum(), xd)[0]


def test_kernel_inplace_backward(device):
    from fusedce.kernels import tiling

    g = torch.Generator().manual_seed(2)
    x = torch.randn(N, 40, generator=g).to(device)
    teacher = torch.randn(N, 40, generator=g).to(device)
    with tiling(block_size=16):
        a = x.clone().requires_grad_()
        loss = fusedce.distillation_loss(a, teacher, divergence="jsd", impl="triton")
        (want,) = torch.autograd.grad(loss, a)
        h = x.clone().requires_grad_()
        logits = h * 1.0
        loss2 = fusedce.distillation_loss(logits, teacher, divergence="jsd", impl="triton",
                                          inplace_backward=True)
        loss2.backward()
    assert torch.equal(loss, loss2)
    assert rel_err(h.grad, want) <= 1e-6


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("temperature", [0.5, 2.0])
@pytest.mark.parametrize("divergence, beta", PAIRS, ids=[f"{d}-{b}" for d, b in PAIRS])
def test_topk_kernel_matches_the_definitions(divergence, beta, temperature, tail, reduction,
                                             device, poison):
    """The top-k Triton kernel (4-column blocks: several per row, and a masked tail; an unused
    slot), with ignored rows, token weights and a hard loss, against the float64 formulas."""
    from fusedce.kernels import tiling

    g = torch.Generator().manual_seed(41)
    x = torch.randn(N, C, generator=g) * 2
    teacher, ids, logprobs = _teacher_forms(g)
    target = torch.randint(0, C, (N,), generator=g)
    target[[1, 5]] = -100
    token_weight = torch.rand(N, generator=g) + 0.5
    hard = 0.5 if tail == "bucket" else 0.0
    xi = x.to(device).requires_grad_()
    with tiling(block_size=4):
        loss, stats = fusedce.distillation_loss(
            xi, target=target.to(device), teacher_topk_ids=ids.to(device),
            teacher_topk_logprobs=logprobs.to(device), tail=tail, divergence=divergence,
            beta=beta, temperature=temperature, hard_loss_weight=hard,
            token_weight=token_weight.to(device), reduction=reduction, impl="triton",
            return_stats=True)
        go = torch.linspace(0.5, 1.5, N, dtype=torch.float64) if reduction == "none" else None
        (grad,) = torch.autograd.grad(loss, xi, go.float().to(device) if go is not None
                                      else None)
    ref, ref_grad, _ = _reference(x, None, ids, logprobs, target, divergence, beta,
                                  temperature, tail, hard, token_weight, reduction)
    assert rel_err(loss.cpu(), ref) <= 1e-5
    assert rel_err(grad.cpu(), ref_grad) <= 1e-5
    torch_loss, torch_stats = fusedce.distillation_loss(
        x, target=target, teacher_topk_ids=ids, teacher_topk_logprobs=logprobs, tail=tail,
        divergence=divergence, beta=beta, temperature=temperature, hard_loss_weight=hard,
        token_weight=token_weight, reduction=reduction, impl="torch", return_stats=True)
    for ours, theirs in zip(stats, torch_stats):
        assert rel_err(ours.cpu(), theirs) <= 1e-5


@pytest.mark.parametrize("form", ["logits", "bucket", "renormalize"])
@pytest.mark.parametrize("divergence, beta", PAIRS, ids=[f"{d}-{b}" for d, b in PAIRS])
def test_kernels_split_path(divergence, beta, form, device, poison, monkeypatch):
    """Few rows: the vocabulary split across programs (4-column blocks, 3 chunks of 48, 48 and
    a masked 24 columns per row), chunks merged per row, then the gradient per chunk, in
    place and out of place, with ignored rows, token weights, a hard loss at temperature 2,
    and the statistics, against the float64 formulas and the PyTorch implementation; the
    split kernels are the ones that ran."""
    from fusedce.kernels import distill as kd
    from fusedce.kernels import tiling

    launched = []
    for name in ("kd_partial_kernel", "kd_topk_partial_kernel", "kd_fwd_kernel",
                 "kd_topk_kernel"):
        kernel = getattr(kd, name)
        monkeypatch.setattr(kd, name, _Spy(kernel, name, launched))
    g = torch.Generator().manual_seed(hash((divergence, beta, form)) % 1000)
    x = (torch.randn(N, 120, generator=g) * 2).to(torch.bfloat16)
    teacher = torch.randn(N, 120, generator=g) * 2
    log_p = torch.log_softmax(teacher.double() / 2.0, -1)
    ids = log_p.topk(K, dim=1).indices
    ids[2, -1] = -1
    logprobs = torch.log_softmax(teacher.double(), -1).gather(1, ids.clamp(min=0)).float()
    target = torch.randint(0, 120, (N,), generator=g)
    target[[1, 5]] = -100
    token_weight = torch.rand(N, generator=g) + 0.5
    if form == "logits":
        kwargs, ref_args = dict(teacher_logits=teacher.to(device)), (teacher, None, None)
        tail = "bucket"
    else:
        kwargs = dict(teacher_topk_ids=ids.to(device), teacher_topk_logprobs=logprobs.to(device),
                      tail=form)
        ref_args, tail = (None, ids, logprobs), form
    common = dict(target=target.to(device), divergence=divergence, beta=beta, temperature=2.0,
                  hard_loss_weight=0.5, token_weight=token_weight.to(device), reduction="none")
    go = torch.linspace(0.5, 1.5, N)
    with tiling(block_size=4, n_splits=3):
        xi = x.to(device).requires_grad_()
        loss, stats = fusedce.distillation_loss(xi, **kwargs, **common, impl="triton",
                                                return_stats=True)
        (grad,) = torch.autograd.grad(loss, xi, go.to(device))
        h = x.to(device).requires_grad_()
        logits = h * 1.0
        loss2 = fusedce.distillation_loss(logits, **kwargs, **common, impl="triton",
                                          inplace_backward=True)
        loss2.backward(go.to(device))
    assert {"kd_fwd_kernel", "kd_topk_kernel"}.isdisjoint(launched) and launched
    ref, ref_grad, ref_go = _reference(x.float(), *ref_args, target, divergence, beta, 2.0,
                                       tail, 0.5, token_weight, "none")
    assert torch.equal(ref_go.float(), go)
    assert rel_err(loss.cpu(), ref) <= 1e-5
    assert rel_err(grad.float().cpu(), ref_grad) <= 1e-2
    assert torch.equal(loss2, loss) and torch.equal(h.grad, grad)
    torch_loss, torch_stats = fusedce.distillation_loss(x.float(), **{
        k: v.cpu() if torch.is_tensor(v) else v for k, v in kwargs.items()}, **{
        k: v.cpu() if torch.is_tensor(v) else v for k, v in common.items()}, impl="torch",
        return_stats=True)
    for ours, theirs in zip(stats, torch_stats):
        assert rel_err(ours.cpu(), theirs) <= 1e-5


class _Spy:
    """A kernel whose launches are recorded by name."""

    def __init__(self, kernel, name, launched):
        self.kernel, self.name, self.launched = kernel, name, launched

    def __getitem__(self, grid):
        self.launched.append(self.name)
        return self.kernel[grid]


def test_every_input_layout(impl, device, poison):
    """Strided, offset and expanded views and narrow dtypes of every tensor a user hands over
    (logits with a row stride, teacher logits, labels, token weights, top-k ids and
    log-probabilities) give the contiguous inputs' answer, and leave the caller's tensors
    bitwise as they were."""
    from fusedce.kernels import tiling

    g = torch.Generator().manual_seed(12)
    n, c = 6, 20
    wide = torch.randn(n, c + 7, generator=g).to(device)
    x = wide[:, 3:3 + c]  # offset rows with a row stride
    t_wide = torch.randn(n, 2 * c, generator=g).to(device)
    teacher = t_wide[:, ::2]  # a column stride
    labels_wide = torch.randint(0, c, (2 * n,), generator=g).to(device)
    labels_wide[2] = -100
    labels = labels_wide[::2]  # strided (and narrow below)
    weights = torch.tensor(0.7, device=device).expand(n)  # expanded
    lp, ids = torch.log_softmax(torch.randn(n, c, generator=g).to(device), -1).topk(4, -1)
    ids_t, lp_t = ids.t().contiguous().t(), lp.t().contiguous().t()  # column-major
    before = [v.clone() for v in (wide, t_wide, labels_wide, ids_t, lp_t)]
    common = dict(hard_loss_weight=0.5, impl=impl, reduction="none")
    for n_splits, (kwargs, dense) in itertools.product((1, 2), [
            (dict(teacher_logits=teacher, target=labels, token_weight=weights),
             dict(teacher_logits=teacher.contiguous(), target=labels.contiguous(),
                  token_weight=weights.contiguous())),
            (dict(target=labels.to(torch.int32), teacher_topk_ids=ids_t,
                  teacher_topk_logprobs=lp_t),
             dict(target=labels.contiguous(), teacher_topk_ids=ids, teacher_topk_logprobs=lp)),
    ]):
        # (the kernels: one program per row, and the vocabulary split in two)
        with tiling(block_size=8, n_splits=n_splits):
            xi = x.detach().requires_grad_()
            got = fusedce.distillation_loss(xi, **kwargs, **common)
            (g_got,) = torch.autograd.grad(got.sum(), xi)
            xd = x.contiguous().requires_grad_()
            want = fusedce.distillation_loss(xd, **dense, **common)
            (g_want,) = torch.autograd.grad(want.sum(), xd)
        assert rel_err(got, want) <= 1e-6 and rel_err(g_got, g_want) <= 1e-6
    for a, b in zip(before, (wide, t_wide, labels_wide, ids_t, lp_t)):
        assert torch.equal(a, b)
