"""Vocabulary-parallel cross-entropy and fused LM head with torchrun, on the CPU (gloo) or GPUs
(NCCL).

    torchrun --nproc-per-node 2 examples/vocab_parallel.py            # CPU, gloo
    torchrun --nproc-per-node 2 examples/vocab_parallel.py --cuda     # one GPU per rank, NCCL

Each rank holds a slice of an LM head (the vocabulary split unevenly, as when it does not divide
by the number of ranks), computes its slice of the logits, and fusedce gives every rank the
loss and its slice's gradient, exchanging a few numbers per token.  Then the same head as a
fused linear loss from the hidden states (no logits at all), and with sequence parallelism (each
rank holding its share of the tokens).  Every rank checks its results against the full,
gathered head.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F

import fusedce


def _grad_hidden(hidden, head, labels):
    """The gradient of the full head's loss with respect to the hidden states."""
    x = hidden.clone().requires_grad_()
    F.cross_entropy(x @ head.t(), labels, label_smoothing=0.1).backward()
    return x.grad


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

    # The fused LM head: this rank's rows of the head, the hidden states of every token.
    x = hidden.clone().requires_grad_()
    w = head[start:start + sizes[rank]].clone().requires_grad_()
    fused = fusedce.linear_cross_entropy(x, w, labels, process_group=dist.group.WORLD,
                                         label_smoothing=0.1)
    fused.backward()
    fused_err = max((w.grad - full.grad[start:start + sizes[rank]]).abs().max().item(),
                    (x.grad - _grad_hidden(hidden, head, labels)).abs().max().item())
    # Sequence parallelism: this rank's share of the tokens, gathered inside.
    share = args.tokens // world
    x_sp = hidden[rank * share:(rank + 1) * share].clone().requires_grad_()
    sp = fusedce.linear_cross_entropy(x_sp, head[start:start + sizes[rank]],
                                      labels[:world * share], process_group=dist.group.WORLD,
                                      sequence_parallel=True, label_smoothing=0.1)
    sp.backward()
    print(f"rank {rank}/{world}: fused linear loss {fused.item():.6f}, max fused gradient "
          f"difference {fused_err:.2e}; sequence-parallel loss {sp.item():.6f}")
    ok = ok and abs(fused.item() - ref.item()) <= 1e-4 * abs(ref.item()) and fused_err <= 1e-5
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
