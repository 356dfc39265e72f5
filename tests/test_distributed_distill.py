"""Vocabulary-parallel distillation over gloo, in separate processes: each rank holds its
(unequal) slice of the student's and the teacher's logits (or of both LM heads, for the fused
linear form); the loss, the statistics and the gradients (concatenated over ranks where each
holds a slice) must equal the single-process loss on the whole logits or heads."""

from __future__ import annotations

import os
import traceback

import pytest
import torch
import torch.distributed as dist

from fusedce.testing import rel_err
from helpers import spawn_ranks

TIMEOUT_S = 240
N_ROWS = 7

CASES = [
    # (name, kwargs of fusedce.distillation_loss; "topk" marks a top-k teacher)
    ("forward", dict(divergence="forward_kl", temperature=1.7, hard_loss_weight=0.3)),
    ("reverse-none", dict(divergence="reverse_kl", reduction="none", token_weight=True)),
    ("jsd-stats", dict(divergence="jsd", beta=0.3, return_stats=True, temperature=0.5)),
    ("topk-bucket", dict(topk=True, divergence="jsd", beta=0.3, hard_loss_weight=0.2)),
    ("topk-renormalize", dict(topk=True, tail="renormalize", divergence="reverse_kl",
                              return_stats=True)),
]


def _inputs(sizes):
    g = torch.Generator().manual_seed(4)
    n_classes = sum(sizes)
    x = torch.randn(N_ROWS, n_classes, generator=g) * 2
    teacher = torch.randn(N_ROWS, n_classes, generator=g) * 2
    teacher[0] = x[0]  # the same argmax on row 0
    target = torch.randint(0, n_classes, (N_ROWS,), generator=g)
    target[2] = -100
    target[3] = n_classes - 1  # on the last rank
    logprobs, ids = torch.log_softmax(teacher, -1).topk(5, dim=-1)
    ids[1, -1] = -1
    return x, teacher, target, ids, logprobs


def _call(x, teacher, target, ids, logprobs, kwargs, group=None):
    import fusedce

    kwargs = dict(kwargs)
    if kwargs.pop("topk", False):
        kwargs.update(teacher_topk_ids=ids, teacher_topk_logprobs=logprobs)
        teacher = None
    if kwargs.pop("token_weight", False):
        kwargs["token_weight"] = torch.linspace(0.5, 2.0, N_ROWS)
    x = x.clone().requires_grad_()
    out = fusedce.distillation_loss(x, teacher, target, process_group=group, **kwargs)
    loss, stats = out if kwargs.get("return_stats") else (out, None)
    loss.backward(torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape))
    return {"loss": loss.detach(), "grad": x.grad,
            "stats": None if stats is None else [s.detach() for s in stats]}


LINEAR_CASES = [
    ("linear-hidden", dict(divergence="jsd", beta=0.3, hard_loss_weight=0.2)),
    ("linear-topk", dict(topk=True, divergence="reverse_kl", reduction="none")),
]


def _linear_inputs(sizes):
    g = torch.Generator().manual_seed(6)
    n_classes = sum(sizes)
    return (torch.randn(N_ROWS, 12, generator=g), torch.randn(n_classes, 12, generator=g) * 0.5,
            torch.randn(N_ROWS, 9, generator=g), torch.randn(n_classes, 9, generator=g) * 0.5)


def _linear_call(h, w, ht, wt, target, ids, logprobs, kwargs, group=None):
    import fusedce

    kwargs = dict(kwargs)
    if kwargs.pop("topk", False):
        kwargs.update(teacher_topk_ids=ids, teacher_topk_logprobs=logprobs)
    else:
        kwargs.update(teacher_input=ht, teacher_linear_weight=wt)
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = fusedce.linear_distillation_loss(h, w, target=target, chunk_size=3,
                                            process_group=group, **kwargs)
    loss.backward(torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape))
    return {"loss": loss.detach(), "grad_input": h.grad, "grad_weight": w.grad}


def _worker(rank, world, port, sizes, out_dir):
    try:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=__import__("datetime").timedelta(seconds=60))
        from fusedce import distill

        distill.CHUNK_ELEMENTS = 3 * sum(sizes)  # several chunks of rows
        x, teacher, target, ids, logprobs = _inputs(sizes)
        start = sum(sizes[:rank])
        mine = slice(start, start + sizes[rank])
        results = {name: _call(x[:, mine], teacher[:, mine], target, ids, logprobs, kwargs,
                               dist.group.WORLD) for name, kwargs in CASES}
        # The fused linear form: this rank's rows of both heads, every token's hidden states.
        h, w, ht, wt = _linear_inputs(sizes)
        for name, kwargs in LINEAR_CASES:
            results[name] = _linear_call(h, w[mine], ht, wt[mine], target, ids, logprobs,
                                         kwargs, dist.group.WORLD)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
        dist.destroy_process_group()
    except Exception:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


@pytest.mark.parametrize("sizes", [(30, 23), (20, 17, 19)], ids=["2-ranks", "3-ranks"])
def test_vocab_parallel_distillation_matches_single_device(sizes, tmp_path):
    per_rank = spawn_ranks(_worker, len(sizes), (sizes, str(tmp_path)), tmp_path,
                           TIMEOUT_S)
    x, teacher, target, ids, logprobs = _inputs(sizes)
    for name, kwargs in CASES:
        whole = _call(x, teacher, target, ids, logprobs, kwargs)
        for r in per_rank:
            assert rel_err(r[name]["loss"], whole["loss"]) <= 1e-5, name
            if whole["stats"] is not None:
                for got, want in zip(r[name]["stats"], whole["stats"]):
                    assert rel_err(got, want) <= 1e-5, name
        grad = torch.cat([r[name]["grad"] for r in per_rank], dim=1)
        assert rel_err(grad, whole["grad"]) <= 1e-5, name
    h, w, ht, wt = _linear_inputs(sizes)
    for name, kwargs in LINEAR_CASES:
        whole = _linear_call(h, w, ht, wt, target, ids, logprobs, kwargs)
        for r in per_rank:
            assert rel_err(r[name]["loss"], whole["loss"]) <= 1e-5, name
            assert rel_err(r[name]["grad_input"], whole["grad_input"]) <= 1e-5, name
        got = torch.cat([r[name]["grad_weight"] for r in per_rank])
        assert rel_err(got, whole["grad_weight"]) <= 1e-5, name
