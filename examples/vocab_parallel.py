"""Vocabulary-parallel cross-entropy with torchrun, on the CPU (gloo) or GPUs (NCCL).

    torchrun --nproc-per-node 2 examples/vocab_parallel.py            # CPU, gloo
    torchrun --nproc-per-node 2 examples/vocab_parallel.py --cuda     # one GPU per rank, NCCL

Each rank holds a slice of an LM head (the vocabulary split unevenly, as when it does not divide
by the number of ranks), computes its slice of the logits, and fusedce gives every rank the
loss and its slice's gradient, exchanging a few numbers per token.  Rank 0 then checks the
result against the loss of the full, gathered logits.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F

import fusedce


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuda", action="store_true")
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args()

    dist.init_process_group("nccl" if args.cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if args.cuda else "cpu"

    # The same data on every rank (same seed); each rank keeps its slice of the head.
    torch.manual_seed(0)
    hidden = torch.randn(args.tokens, 64, device=device)
    head = torch.randn(args.vocab, 64, device=device) * 0.2
    labels = torch.randint(0, args.vocab, (args.tokens,), device=device)
    labels[::7] = -100  # padding
    sizes = [args.vocab // world + (r < args.vocab % world) for r in range(world)]
    start = sum(sizes[:rank])
    local_head = head[start:start + sizes[rank]].clone().requires_grad_()

    local_logits = hidden @ local_head.t()  # (tokens, this rank's slice of the vocabulary)
    loss, stats = fusedce.cross_entropy(local_logits, labels, process_group=dist.group.WORLD,
                                        label_smoothing=0.1, return_stats=True)
    loss.backward()  # local_head.grad: the gradient of this rank's slice of the head

    full = head.clone().requires_grad_()
    ref = F.cross_entropy(hidden @ full.t(), labels, label_smoothing=0.1)
    ref.backward()
    grad_err = (local_head.grad - full.grad[start:start + sizes[rank]]).abs().max().item()
    print(f"rank {rank}/{world}: vocab slice [{start}, {start + sizes[rank]}), loss "
          f"{loss.item():.6f} (gathered logits: {ref.item():.6f}), accuracy "
          f"{stats.accuracy.item():.4f}, max gradient difference {grad_err:.2e}")
    ok = abs(loss.item() - ref.item()) <= 1e-4 * abs(ref.item()) and grad_err <= 1e-5
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
