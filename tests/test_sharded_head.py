"""A tiny causal LM trained three SGD steps with its LM head sharded, over gloo in spawned
processes, against the same model trained unsharded: FSDP2 with the head as its own
``fully_shard`` unit (data parallel, each rank its half of the batch), and a tensor-parallel
head (``ColwiseParallel``, the vocabulary split over the ranks).  Losses and final weights must
equal the unsharded run's."""

from __future__ import annotations

import os
import traceback

import pytest
import torch
import torch.distributed as dist

from helpers import spawn_ranks

TIMEOUT_S = 300
VOCAB, HIDDEN, STEPS, LR = 50, 16, 3, 0.5


class TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, HIDDEN)
        self.block = torch.nn.Linear(HIDDEN, HIDDEN)
        self.head = torch.nn.Linear(HIDDEN, VOCAB, bias=False)

    def forward(self, tokens, labels, head_loss):
        """``head_loss(self, hidden (N, H), labels (N,))``: the root's forward runs, so a
        wrapper's hooks (FSDP2's gathers) run around the whole model."""
        hidden = torch.tanh(self.block(self.embed(tokens)))
        return head_loss(self, hidden.reshape(-1, HIDDEN), labels.reshape(-1))


def _model():
    torch.manual_seed(0)
    return TinyLM()


def _batch():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (4, 9), generator=g)
    return tokens[:, :-1], tokens[:, 1:]  # inputs, next-token labels (none ignored)


def _train(model, loss_of, tokens, labels):
    """Three SGD steps; the losses and the final (full) weights."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = model(tokens, labels, loss_of)
        loss.backward()
        opt.step()
        losses.append(loss.detach().clone())
    weights = {}
    for name, p in model.named_parameters():
        p = p.detach()
        weights[name] = p.full_tensor() if hasattr(p, "full_tensor") else p
    return torch.stack(losses), weights


def _unsharded():
    import fusedce

    tokens, labels = _batch()

    def loss_of(model, h, y):
        return fusedce.linear_cross_entropy(h, model.head.weight, y)

    return _train(_model(), loss_of, tokens, labels)


def _worker(rank, world, port, out_dir):
    import fusedce

    try:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=__import__("datetime").timedelta(seconds=60))
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

        mesh = init_device_mesh("cpu", (world,))
        tokens, labels = _batch()
        results = {}

        # FSDP2: the head its own unit, the root the rest; each rank half of the batch (the
        # gradients averaged over the ranks, as FSDP2 does, give the whole batch's mean).
        model = _model()
        fully_shard(model.head, mesh=mesh)
        fully_shard(model, mesh=mesh)
        share = tokens.shape[0] // world
        mine = slice(rank * share, (rank + 1) * share)

        def fsdp_loss(m, h, y):
            return fusedce.linear_cross_entropy_head(m.head, h, y)

        losses, weights = _train(model, fsdp_loss, tokens[mine], labels[mine])
        gathered = [torch.empty_like(losses) for _ in range(world)]
        dist.all_gather(gathered, losses)
        results["fsdp2"] = (torch.stack(gathered).mean(0), weights)

        # The weight read directly from a sharded head: a clear error, not a wrong answer.
        try:
            fusedce.linear_cross_entropy(torch.randn(3, HIDDEN), model.head.weight,
                                         torch.zeros(3, dtype=torch.long))
            results["direct"] = "no error"
        except TypeError as exc:
            results["direct"] = str(exc)

        # Tensor parallelism: the head's rows split over the ranks, the rest replicated.
        model = _model()
        parallelize_module(model, mesh, {"head": ColwiseParallel()})

        def tp_loss(m, h, y):
            return fusedce.linear_cross_entropy_dtensor(h, m.head.weight, y)

        results["tp"] = _train(model, tp_loss, tokens, labels)

        # The same through the head's call (as the integrations do).
        model = _model()
        parallelize_module(model, mesh, {"head": ColwiseParallel()})

        def tp_head_loss(m, h, y):
            return fusedce.linear_cross_entropy_head(m.head, h, y)

        results["tp-head"] = _train(model, tp_head_loss, tokens, labels)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
        dist.destroy_process_group()
    except Exception:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def test_sharded_heads_train_like_the_unsharded_one(tmp_path):
    per_rank = spawn_ranks(_worker, 2, (str(tmp_path),), tmp_path, TIMEOUT_S)
    ref_losses, ref_weights = _unsharded()
    assert ref_losses[-1] < ref_losses[0]  # it learns
    for result in per_rank:
        assert "linear_cross_entropy_head" in result["direct"]
        for way in ("fsdp2", "tp", "tp-head"):
            losses, weights = result[way]
            torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6, msg=way)
            for name, w in ref_weights.items():
                torch.testing.assert_close(weights[name], w, rtol=1e-5, atol=1e-6,
                                           msg=f"{way} {name}")


def _hf_model():
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).float()


def _hf_batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 97, (4, 10), generator=g)
    return ids, ids.clone()


def _hf_train(model, ids, labels, **call):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(2):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=labels, **call).loss
        loss.backward()
        opt.step()
        losses.append(loss.detach().clone())
    weight = model.lm_head.weight.detach()
    return torch.stack(losses), weight.full_tensor() if hasattr(weight, "full_tensor") else weight


def _hf_worker(rank, world, port, out_dir):
    try:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=__import__("datetime").timedelta(seconds=60))
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        from fusedce.integrations import transformers as fce_hf
        from fusedce.integrations import trl as fce_trl

        mesh = init_device_mesh("cpu", (world,))
        ids, labels = _hf_batch()
        share = ids.shape[0] // world
        mine = slice(rank * share, (rank + 1) * share)
        saved = {}
        for way in ("transformers", "trl"):
            model = _hf_model()
            if way == "transformers":
                fce_hf.apply(model, fused_linear=True)
                call = {}
            else:  # TRL's fused head (its loss: the mean negative log-probability)
                fce_trl.add_fused_lm_head(model)
                call = {"fused_lm_head": True}
            fully_shard(model.lm_head, mesh=mesh)
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            losses, weight = _hf_train(model, ids[mine], labels[mine], **call)
            gathered = [torch.empty_like(losses) for _ in range(world)]
            dist.all_gather(gathered, losses)
            saved[way] = {"losses": torch.stack(gathered), "weight": weight}
        torch.save(saved, os.path.join(out_dir, f"hf{rank}.pt"))
        dist.barrier()
        dist.destroy_process_group()
    except Exception:
        with open(os.path.join(out_dir, f"hf{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def test_transformers_and_trl_fused_heads_under_fsdp2(tmp_path):
    """apply(model, fused_linear=True) and TRL's fused head on a Llama whose lm_head is its
    own fully_shard unit: two steps over two ranks (half the batch each, equal token counts)
    give each half's loss of the unsharded model and its final head weight."""
    pytest.importorskip("transformers")
    pytest.importorskip("trl")
    per_rank = spawn_ranks(_hf_worker, 2, (str(tmp_path),), tmp_path, TIMEOUT_S,
                           prefix="hf")

    from fusedce.integrations import transformers as fce_hf
    from fusedce.integrations import trl as fce_trl

    ids, labels = _hf_batch()
    for way in ("transformers", "trl"):
        model = _hf_model()
        if way == "transformers":
            fce_hf.apply(model, fused_linear=True)
            call = {}
        else:
            fce_trl.add_fused_lm_head(model)
            call = {"fused_lm_head": True}
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        halves = []
        for _ in range(2):  # the mean of the two halves' losses: the data-parallel objective
            opt.zero_grad()
            parts = [model(input_ids=ids[s], labels=labels[s], **call).loss
                     for s in (slice(0, 2), slice(2, 4))]
            (sum(parts) / 2).backward()
            opt.step()
            halves.append(torch.stack([p.detach() for p in parts]))
        ref_losses = torch.stack(halves).t()  # (rank, step)
        for result in per_rank:
            torch.testing.assert_close(result[way]["losses"], ref_losses, rtol=1e-5,
                                       atol=1e-6, msg=way)
            torch.testing.assert_close(result[way]["weight"], model.lm_head.weight.detach(),
                                       rtol=1e-5, atol=1e-6, msg=way)
