"""Vocabulary-parallel fused linear cross-entropy over gloo, in separate processes.

Each rank holds its (unequal) slice of the LM head's rows and bias and the same hidden states;
the loss, ``grad_input`` on every rank, and the head's gradient concatenated over ranks must
equal the single-process ``fusedce.linear_cross_entropy`` on the whole head (and the float64
reference).  Small tiles and blocks force the tiled pass's every part on each rank.  The Triton
path runs in the interpreter (the workers inherit TRITON_INTERPRET=1).
"""

from __future__ import annotations

import os
import traceback

import pytest
import torch
import torch.distributed as dist

from fusedce.testing import make_targets, reference_linear, rel_err
from helpers import spawn_ranks

TIMEOUT_S = 300
N_ROWS, HIDDEN = 10, 12

CASES = [
    # (name, impl, dtype, kwargs for fusedce.linear_cross_entropy)
    ("plain-torch", "torch", torch.float32, dict()),
    ("weighted-smooth-triton", "triton", torch.float32,
     dict(weight=True, label_smoothing=0.2, reduction="sum")),
    ("extras-triton-bf16", "triton", torch.bfloat16,
     dict(softcap=12.0, lse_square_scale=1e-3, logit_scale=1.3, return_stats=True)),
    ("rl-torch", "torch", torch.float32,
     dict(temperature=0.7, token_weight=True, return_stats=True, reduction="none",
          label_smoothing=0.1)),
    ("items-torch-bf16", "torch", torch.bfloat16,
     dict(num_items_in_batch=7, weight=True)),
]


def _inputs(sizes, dtype):
    g = torch.Generator().manual_seed(11)
    n_classes = sum(sizes)
    x = torch.randn(N_ROWS, HIDDEN, generator=g).to(dtype)
    w = (torch.randn(n_classes, HIDDEN, generator=g) * 0.6).to(dtype)
    b = (torch.randn(n_classes, generator=g) * 0.3).to(dtype)
    target = make_targets(N_ROWS, n_classes, ignore_fraction=0.2, generator=g)
    target[0], target[1] = n_classes - 1, 0  # on the last and the first rank
    weight = torch.rand(n_classes, generator=g) + 0.5
    return x, w, b, target, weight


def _options(kwargs, weight):
    kwargs = dict(kwargs)
    if kwargs.pop("weight", False):
        kwargs["weight"] = weight
    if kwargs.pop("token_weight", False):
        kwargs["token_weight"] = torch.linspace(-1.0, 2.0, N_ROWS)
    return kwargs


def _grad_output(loss):
    return torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape).to(loss.dtype)


def _run_case(sizes, impl, dtype, kwargs, rank=None, group=None):
    """One call and its backward: on this rank's slice (``rank``) or on the whole head."""
    import fusedce

    x, w, b, target, weight = _inputs(sizes, dtype)
    if rank is not None:
        start = sum(sizes[:rank])
        w, b = w[start:start + sizes[rank]], b[start:start + sizes[rank]]
    x, w, b = (t.clone().requires_grad_() for t in (x, w, b))
    out = fusedce.linear_cross_entropy(x, w, target, linear_bias=b, impl=impl,
                                       chunk_bytes=4096, process_group=group,
                                       **_options(kwargs, weight))
    loss, stats = out if kwargs.get("return_stats") else (out, None)
    loss.backward(_grad_output(loss))
    return {"loss": loss.detach(), "grad_input": x.grad, "grad_weight": w.grad,
            "grad_bias": b.grad,
            "stats": None if stats is None else {k: v.detach() for k, v in
                                                  stats._asdict().items()}}


def _worker(rank, world, port, sizes, out_dir):
    import fusedce
    from fusedce import linear

    try:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=__import__("datetime").timedelta(seconds=60))
        linear.TILE_COLS, linear.BLOCK_BYTES = 16, 4 * 16 * 4  # tiles of 16, blocks of 4 rows
        results = {name: _run_case(sizes, impl, dtype, kwargs, rank, dist.group.WORLD)
                   for name, impl, dtype, kwargs in CASES}
        # Shifted (next-token) labels through shifted_linear_cross_entropy.
        x, w, b, target, _ = _inputs(sizes, torch.float32)
        start = sum(sizes[:rank])
        h = x.reshape(2, 5, HIDDEN).clone().requires_grad_()
        w_local = w[start:start + sizes[rank]].clone().requires_grad_()
        loss = fusedce.shifted_linear_cross_entropy(h, w_local, target.reshape(2, 5).clamp(0),
                                                    process_group=dist.group.WORLD)
        loss.backward()
        results["shifted"] = {"loss": loss.detach(), "grad_input": h.grad,
                              "grad_weight": w_local.grad}
        # Multi-token prediction: two depths' hidden states, shifts (1, 2), one call.
        h2 = (x.reshape(2, 5, HIDDEN) * 0.5).clone().requires_grad_()
        h.grad = w_local.grad = None
        loss = fusedce.shifted_linear_cross_entropy((h, h2), w_local,
                                                    target.reshape(2, 5).clamp(0), (1, 2),
                                                    process_group=dist.group.WORLD)
        loss.backward()
        results["mtp"] = {"loss": loss.detach(), "grad_input": h.grad, "grad_h2": h2.grad,
                          "grad_weight": w_local.grad}
        # Sequence parallelism: this rank's equal slice of 12 tokens, every token's target.
        g = torch.Generator().manual_seed(5)
        x12 = torch.randn(12, HIDDEN, generator=g)
        t12 = make_targets(12, sum(sizes), ignore_fraction=0.2, generator=g)
        share = 12 // world
        x_local = x12[rank * share:(rank + 1) * share].clone().requires_grad_()
        w_local = w[start:start + sizes[rank]].clone().requires_grad_()
        for reduction in ("mean", "none"):
            x_local.grad = w_local.grad = None
            loss = fusedce.linear_cross_entropy(x_local, w_local, t12, reduction=reduction,
                                                process_group=dist.group.WORLD,
                                                sequence_parallel=True, label_smoothing=0.1)
            loss.backward(_grad_output(loss))
            results[f"sp-{reduction}"] = {"loss": loss.detach(),
                                          "grad_input": x_local.grad.clone(),
                                          "grad_weight": w_local.grad.clone()}
        try:
            fusedce.linear_cross_entropy(x12[: share + (rank == 0)], w_local, t12,
                                         process_group=dist.group.WORLD, sequence_parallel=True)
            results["bad-sp"] = "no error"
        except ValueError as exc:
            results["bad-sp"] = str(exc)
        # Bad use, the same error on every rank before any per-token collective: hidden
        # sizes that differ across ranks, found by the layout exchange of a new group.
        fresh = dist.new_group(list(range(world)))
        hidden = HIDDEN + rank
        try:
            fusedce.linear_cross_entropy(torch.randn(N_ROWS, hidden),
                                         torch.randn(sizes[rank], hidden),
                                         target.clamp(0), process_group=fresh)
            results["bad-hidden"] = "no error"
        except ValueError as exc:
            results["bad-hidden"] = str(exc)
        try:
            fusedce.linear_cross_entropy(x, w[start:start + sizes[rank]], target,
                                         weight=torch.ones(sizes[rank]),
                                         process_group=dist.group.WORLD)
            results["bad-weight"] = "no error"
        except ValueError as exc:
            results["bad-weight"] = str(exc)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
        dist.destroy_process_group()
    except Exception:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def _spawn(sizes, tmp_path):
    return spawn_ranks(_worker, len(sizes), (sizes, str(tmp_path)), tmp_path, TIMEOUT_S)


@pytest.mark.parametrize("sizes", [(70, 57), (40, 61, 26)], ids=["2-ranks", "3-ranks"])
def test_vocab_parallel_linear_matches_single_device(sizes, tmp_path):
    per_rank = _spawn(sizes, tmp_path)
    for name, impl, dtype, kwargs in CASES:
        whole = _run_case(sizes, impl, dtype, kwargs)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        for r in per_rank:
            assert rel_err(r[name]["loss"], whole["loss"]) <= tol, name
            assert rel_err(r[name]["grad_input"], whole["grad_input"]) <= tol, name
        for key in ("grad_weight", "grad_bias"):
            got = torch.cat([r[name][key] for r in per_rank])
            assert rel_err(got, whole[key]) <= tol, (name, key)
        if whole["stats"] is not None:
            for r in per_rank:
                stats = r[name]["stats"]
                assert torch.equal(stats["argmax"], whole["stats"]["argmax"]), name
                assert stats["accuracy"].item() == pytest.approx(
                    whole["stats"]["accuracy"].item()), name
                assert rel_err(stats["entropy"], whole["stats"]["entropy"]) <= tol, name
                assert rel_err(stats["lse"], whole["stats"]["lse"]) <= tol, name
        if dtype == torch.float32 and not kwargs.get("token_weight"):
            x, w, b, target, weight = _inputs(sizes, dtype)
            opts = _options(kwargs, weight)
            opts.pop("return_stats", None)
            ref = reference_linear(x, w, target, b, _grad_output(whole["loss"]).float(),
                                   **opts)
            assert rel_err(whole["loss"], ref["loss"]) <= 1e-5, name
            assert rel_err(whole["grad_input"], ref["grad_input"]) <= 1e-5, name
    import fusedce

    x, w, _, target, _ = _inputs(sizes, torch.float32)
    h = x.reshape(2, 5, HIDDEN).clone().requires_grad_()
    w = w.clone().requires_grad_()
    loss = fusedce.shifted_linear_cross_entropy(h, w, target.reshape(2, 5).clamp(0))
    loss.backward()
    for r in per_rank:
        assert rel_err(r["shifted"]["loss"], loss.detach()) <= 1e-5
        assert rel_err(r["shifted"]["grad_input"], h.grad) <= 1e-5
    assert rel_err(torch.cat([r["shifted"]["grad_weight"] for r in per_rank]), w.grad) <= 1e-5
    h.grad = w.grad = None
    h2 = (x.reshape(2, 5, HIDDEN) * 0.5).clone().requires_grad_()
    loss = fusedce.shifted_linear_cross_entropy((h, h2), w, target.reshape(2, 5).clamp(0),
                                                (1, 2))
    loss.backward()
    for r in per_rank:
        assert rel_err(r["mtp"]["loss"], loss.detach()) <= 1e-5
        assert rel_err(r["mtp"]["grad_input"], h.grad) <= 1e-5
        assert rel_err(r["mtp"]["grad_h2"], h2.grad) <= 1e-5
    assert rel_err(torch.cat([r["mtp"]["grad_weight"] for r in per_rank]), w.grad) <= 1e-5
    g = torch.Generator().manual_seed(5)
    x12 = torch.randn(12, HIDDEN, generator=g)
    t12 = make_targets(12, sum(sizes), ignore_fraction=0.2, generator=g)
    for reduction in ("mean", "none"):
        x_all = x12.clone().requires_grad_()
        w_all = _inputs(sizes, torch.float32)[1].clone().requires_grad_()
        loss = fusedce.linear_cross_entropy(x_all, w_all, t12, reduction=reduction,
                                            label_smoothing=0.1)
        loss.backward(_grad_output(loss))
        for r in per_rank:
            assert rel_err(r[f"sp-{reduction}"]["loss"], loss.detach()) <= 1e-5
        got_x = torch.cat([r[f"sp-{reduction}"]["grad_input"] for r in per_rank])
        assert rel_err(got_x, x_all.grad) <= 1e-5, reduction
        got_w = torch.cat([r[f"sp-{reduction}"]["grad_weight"] for r in per_rank])
        assert rel_err(got_w, w_all.grad) <= 1e-5, reduction
    for r in per_rank:
        assert "ranks hold different numbers of tokens" in r["bad-sp"]
        assert "hidden sizes differ across ranks" in r["bad-hidden"]
        assert "whole vocabulary" in r["bad-weight"]
