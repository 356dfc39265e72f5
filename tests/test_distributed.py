"""Vocabulary-parallel cross-entropy over gloo, in separate processes with a timeout.

Each case gives every rank its (unequal) slice of the same logits; the loss and the gradients,
concatenated over ranks, must equal the single-process float64 reference.  The Triton path runs
in the interpreter (the workers inherit TRITON_INTERPRET=1) or natively on CUDA tensors.
"""

from __future__ import annotations

import os
import traceback

import pytest
import torch
import torch.distributed as dist

from fusedce.testing import make_logits, make_targets, reference_extras, rel_err
from helpers import spawn_ranks

TIMEOUT_S = 240


CASES = [
    # (name, impl, dtype, kwargs for fusedce.cross_entropy)
    ("plain-torch", "torch", torch.float32, dict()),
    ("plain-triton", "triton", torch.float32, dict()),
    ("weighted-smooth-torch", "torch", torch.float32,
     dict(weight=True, label_smoothing=0.2, reduction="sum")),
    ("weighted-smooth-triton", "triton", torch.float32,
     dict(weight=True, label_smoothing=0.2, reduction="none")),
    ("extras-triton", "triton", torch.bfloat16,
     dict(softcap=12.0, lse_square_scale=1e-3, logit_scale=1.3, return_stats=True)),
    ("extras-torch", "torch", torch.float32,
     dict(softcap=12.0, lse_square_scale=1e-3, return_stats=True, num_items_in_batch=9)),
    ("rl-triton", "triton", torch.float32,
     dict(temperature=0.7, token_weight=True, return_stats=True, label_smoothing=0.1)),
    ("rl-torch", "torch", torch.float32,
     dict(temperature=1.3, token_weight=True, return_stats=True, reduction="none")),
]


def _token_weight(n_rows: int) -> torch.Tensor:
    return torch.linspace(-1.0, 2.0, n_rows)  # signed, as advantages are


def _case_inputs(sizes, dtype):
    g = torch.Generator().manual_seed(7)
    n_rows, n_classes = 10, sum(sizes)
    logits = make_logits(n_rows, n_classes, dtype, generator=g)
    target = make_targets(n_rows, n_classes, ignore_fraction=0.2, generator=g)
    target[0] = n_classes - 1  # on the last rank
    target[1] = 0  # on the first rank
    # Rows whose target is the argmax (on different ranks), so accuracy is not trivially 0.
    logits[0, n_classes - 1] = logits[1, 0] = 20.0
    weight = torch.rand(n_classes, generator=g) + 0.5
    return logits, target, weight


def _worker(rank, world, port, sizes, out_dir, backend):
    import fusedce

    try:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=__import__("datetime").timedelta(seconds=60))
        device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
        start = sum(sizes[:rank])
        results = {}
        for name, impl, dtype, kwargs in CASES:
            logits, target, weight = _case_inputs(sizes, dtype)
            kwargs = dict(kwargs)
            if kwargs.pop("weight", False):
                kwargs["weight"] = weight.to(device)
            if kwargs.pop("token_weight", False):
                kwargs["token_weight"] = _token_weight(logits.shape[0]).to(device)
            local = logits[:, start:start + sizes[rank]].to(device).requires_grad_()
            out = fusedce.cross_entropy(local, target.to(device), impl=impl,
                                        process_group=dist.group.WORLD, **kwargs)
            loss, stats = out if kwargs.get("return_stats") else (out, None)
            go = torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape).to(device)
            loss.backward(go.to(loss.dtype))
            results[name] = {"loss": loss.detach().cpu(), "grad": local.grad.cpu(),
                             "stats": None if stats is None else
                             {k: v.cpu() for k, v in stats._asdict().items()}}
        # Bad use: a target outside the global vocabulary, the same on every rank.
        logits, target, _ = _case_inputs(sizes, torch.float32)
        target[3] = sum(sizes) + 5
        local = logits[:, start:start + sizes[rank]].to(device)
        try:
            fusedce.cross_entropy(local, target.to(device), impl="torch",
                                  process_group=dist.group.WORLD)
            results["bad-target"] = "no error"
        except ValueError as exc:
            results["bad-target"] = str(exc)
        # Bad use: a weight vector that is not the whole vocabulary's.
        try:
            fusedce.cross_entropy(local, target.clamp(max=0).to(device), impl="torch",
                                  weight=torch.ones(sizes[rank], device=device),
                                  process_group=dist.group.WORLD)
            results["bad-weight"] = "no error"
        except ValueError as exc:
            results["bad-weight"] = str(exc)
        # Bad use: different logits dtypes across ranks, caught by the layout exchange of a
        # group not seen before (same error on every rank, no hang).
        fresh = dist.new_group(list(range(world)))
        try:
            fusedce.cross_entropy(local.to(torch.bfloat16 if rank == 1 else torch.float32),
                                  target.clamp(max=0).to(device), process_group=fresh)
            results["bad-dtype"] = "no error"
        except TypeError as exc:
            results["bad-dtype"] = str(exc)
        # A DTensor sharded on the vocabulary (even split, as distribute_tensor makes it).
        if backend == "gloo":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.tensor import Shard, distribute_tensor

            from fusedce import cross_entropy_dtensor

            mesh = init_device_mesh("cpu", (world,))
            logits, target, _ = _case_inputs(sizes, torch.float32)
            dt = distribute_tensor(logits, mesh, [Shard(1)]).requires_grad_()
            loss = cross_entropy_dtensor(dt, target, label_smoothing=0.1)
            loss.backward()
            results["dtensor"] = {"loss": loss.detach(), "grad": dt.grad.full_tensor()}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
        dist.destroy_process_group()
    except Exception:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def _run(sizes, tmp_path, backend="gloo"):
    return spawn_ranks(_worker, len(sizes), (sizes, str(tmp_path), backend), tmp_path,
                       TIMEOUT_S)


@pytest.mark.parametrize("sizes", [(70, 57), (40, 61, 26)], ids=["2-ranks", "3-ranks"])
def test_vocab_parallel_matches_single_device(sizes, tmp_path):
    per_rank = _run(sizes, tmp_path)
    for name, impl, dtype, kwargs in CASES:
        logits, target, weight = _case_inputs(sizes, dtype)
        kwargs = dict(kwargs)
        if kwargs.pop("weight", False):
            kwargs["weight"] = weight
        if kwargs.pop("token_weight", False):
            kwargs["token_weight"] = _token_weight(logits.shape[0])
        kwargs.pop("return_stats", None)
        reduction = kwargs.get("reduction", "mean")
        n = logits.shape[0] if reduction == "none" else 1
        go = torch.linspace(0.5, 1.5, n).reshape(() if reduction != "none" else (n,))
        ref = reference_extras(logits, target, grad_output=go, **kwargs)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        for rank_result in per_rank:
            assert rel_err(rank_result[name]["loss"], ref["loss"]) <= tol, name
        grad = torch.cat([r[name]["grad"] for r in per_rank], dim=1)
        assert rel_err(grad, ref["grad"]) <= tol, name
        stats = per_rank[0][name]["stats"]
        if stats is not None:
            assert rel_err(stats["lse"], ref["lse"]) <= 1e-5, name
            assert rel_err(stats["z_loss"], ref["z_loss"]) <= 1e-4, name
            assert stats["accuracy"].item() == pytest.approx(ref["accuracy"].item()), name
            assert rel_err(stats["entropy"], ref["entropy"]) <= 1e-5, name
            assert torch.equal(stats["argmax"], ref["argmax"]), name
    logits, target, _ = _case_inputs(sizes, torch.float32)
    ref = reference_extras(logits, target, label_smoothing=0.1, grad_output=1.0)
    for rank_result in per_rank:
        assert rel_err(rank_result["dtensor"]["loss"], ref["loss"]) <= 1e-5
        assert rel_err(rank_result["dtensor"]["grad"], ref["grad"]) <= 1e-5
    for rank_result in per_rank:
        assert "outside the class range" in rank_result["bad-target"]
        assert "whole vocabulary" in rank_result["bad-weight"]
        assert "dtypes differ across ranks" in rank_result["bad-dtype"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs two GPUs")
def test_vocab_parallel_nccl(tmp_path):
    per_rank = _run((70, 57), tmp_path, backend="nccl")
    assert len(per_rank) == 2
