"""Bytes communicated per token by vocabulary-parallel fusedce, against gathering the logits (or,
for the fused LM head, the head's weight).

Measured, not computed: ranks of a gloo group on this machine run fusedce's vocabulary-parallel
forward+backward and, as the alternative, an ``all_gather`` of the logits slices followed by a
local loss, with ``torch.distributed``'s collectives wrapped to add up the bytes of the tensors
handed to them (an all-reduce's tensor, an all-gather's output).  The one-time layout exchange
(cached after the first call) is excluded by measuring a second call.  Bytes per token per rank.

The fused LM head (``linear_cross_entropy(..., process_group=)``) adds the all-reduce of
``grad_input`` (float32, hidden size x 4 bytes per token); with ``sequence_parallel=True`` the
hidden states are gathered and ``grad_input`` reduce-scattered instead (hidden size x element
size each way); gathering the head's weight costs its whole size per step, whatever the tokens.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fusedce.testing import free_port


def _count_collectives(counter: dict) -> None:
    names = ["all_gather_single", "reduce_scatter_single"]
    if not all(hasattr(dist, n) for n in names):  # (PyTorch before 2.13)
        names = ["all_gather_into_tensor", "reduce_scatter_tensor"]
    real = (dist.all_reduce, dist.all_gather, getattr(dist, names[0]), getattr(dist, names[1]))

    def all_reduce(tensor, *args, **kwargs):
        counter["bytes"] += tensor.numel() * tensor.element_size()
        return real[0](tensor, *args, **kwargs)

    def all_gather(outputs, tensor, *args, **kwargs):
        counter["bytes"] += sum(t.numel() * t.element_size() for t in outputs)
        return real[1](outputs, tensor, *args, **kwargs)

    def all_gather_into_tensor(output, tensor, *args, **kwargs):
        counter["bytes"] += output.numel() * output.element_size()
        return real[2](output, tensor, *args, **kwargs)

    def reduce_scatter_tensor(output, tensor, *args, **kwargs):
        counter["bytes"] += tensor.numel() * tensor.element_size()
        return real[3](output, tensor, *args, **kwargs)

    dist.all_reduce, dist.all_gather = all_reduce, all_gather
    setattr(dist, names[0], all_gather_into_tensor)
    setattr(dist, names[1], reduce_scatter_tensor)


LINEAR_HIDDEN = 256


def _linear_rows(rank, world, vocabs, tokens, counter) -> list[dict]:
    """The fused LM head's bytes per token: vocabulary-parallel, sequence-parallel, and the
    alternatives (gather the logits, gather the weight), forward + backward in bf16."""
    import fusedce

    rows = []
    for vocab in vocabs:
        sizes = [vocab // world + (r < vocab % world) for r in range(world)]
        start = sum(sizes[:rank])
        g = torch.Generator().manual_seed(0)
        x = torch.randn(tokens, LINEAR_HIDDEN, generator=g).to(torch.bfloat16)
        w = (torch.randn(vocab, LINEAR_HIDDEN, generator=g) * 0.05).to(torch.bfloat16)
        target = torch.randint(0, vocab, (tokens,), generator=g)
        w_local = w[start:start + sizes[rank]].contiguous()
        share = tokens // world
        measured = {}
        for name in ("fused", "fused-sp", "gather-logits", "gather-weight"):
            for _ in range(2):  # the second call, after the layout is cached
                counter["bytes"] = 0
                h = (x[rank * share:(rank + 1) * share] if name == "fused-sp" else x).clone()
                h.requires_grad_()
                wl = w_local.clone().requires_grad_()
                if name.startswith("fused"):
                    loss = fusedce.linear_cross_entropy(
                        h, wl, target, process_group=dist.group.WORLD,
                        sequence_parallel=name == "fused-sp")
                else:
                    width = max(sizes)
                    if name == "gather-logits":
                        local = h @ wl.t()
                        padded = local.new_zeros(tokens, width)
                        padded[:, : sizes[rank]] = local.detach()
                        parts = [torch.empty_like(padded) for _ in sizes]
                        dist.all_gather(parts, padded)
                        parts = [p[:, :s] for p, s in zip(parts, sizes)]
                        parts[rank] = local
                        logits = torch.cat(parts, 1)
                    else:
                        padded = wl.new_zeros(width, LINEAR_HIDDEN)
                        padded[: sizes[rank]] = wl.detach()
                        parts = [torch.empty_like(padded) for _ in sizes]
                        dist.all_gather(parts, padded)
                        parts = [p[:s] for p, s in zip(parts, sizes)]
                        parts[rank] = wl
                        logits = h @ torch.cat(parts).t()
                    loss = torch.nn.functional.cross_entropy(logits.float(), target)
                loss.backward()
            measured[name] = counter["bytes"] / tokens
        rows.append({"kind": "linear", "world": world, "vocab": vocab, "hidden": LINEAR_HIDDEN,
                     "tokens": tokens, "dtype": "bfloat16",
                     **{f"{k}_bytes_per_token": v for k, v in measured.items()}})
    return rows


def _worker(rank, world, port, vocabs, tokens, out_file):
    import fusedce

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    counter = {"bytes": 0}
    _count_collectives(counter)
    rows = []
    for accuracy, vocab in [(a, v) for a in (False, True) for v in vocabs]:
        sizes = [vocab // world + (r < vocab % world) for r in range(world)]
        start = sum(sizes[:rank])
        g = torch.Generator().manual_seed(0)
        logits = torch.randn(tokens, vocab, generator=g).to(torch.bfloat16)
        target = torch.randint(0, vocab, (tokens,), generator=g)
        local = logits[:, start:start + sizes[rank]].contiguous()
        measured = {}
        for name in ("fusedce", "gather-logits"):
            for attempt in range(2):  # the second call, after the layout is cached
                counter["bytes"] = 0
                x = local.clone().requires_grad_()
                if name == "fusedce":
                    out = fusedce.cross_entropy(x, target, process_group=dist.group.WORLD,
                                                return_stats=accuracy)
                    loss = out[0] if accuracy else out
                else:
                    # all_gather needs equal shapes: slices padded to the widest, then trimmed.
                    width = max(sizes)
                    padded = torch.zeros(tokens, width, dtype=x.dtype)
                    padded[:, : sizes[rank]] = x.detach()
                    parts = [torch.empty(tokens, width, dtype=x.dtype) for _ in sizes]
                    dist.all_gather(parts, padded)
                    parts = [p[:, :s] for p, s in zip(parts, sizes)]
                    # Every rank computes the same full loss, so its own slice's gradient needs
                    # no further communication: keep that slice attached to x.
                    parts[rank] = x
                    loss = torch.nn.functional.cross_entropy(torch.cat(parts, 1).float(), target)
                loss.backward()
            measured[name] = counter["bytes"] / tokens
        rows.append({"world": world, "vocab": vocab, "dtype": "bfloat16", "accuracy": accuracy,
                     "fusedce_bytes_per_token": measured["fusedce"],
                     "gather_bytes_per_token": measured["gather-logits"]})
    rows += _linear_rows(rank, world, vocabs, tokens, counter)
    if rank == 0:
        torch.save(rows, out_file)
    dist.destroy_process_group()


def measure(vocabs: list[int], worlds=(2, 4), tokens: int = 64, out_dir: Path | None = None,
            timeout_s: float = 300) -> list[dict]:
    """Rows of measured bytes per token, for each world size, vocabulary and accuracy on/off."""
    import tempfile

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in worlds:
            out_file = os.path.join(tmp, f"comm{world}.pt")
            ctx = mp.get_context("spawn")
            port = free_port()
            procs = [ctx.Process(target=_worker, args=(r, world, port, vocabs, tokens, out_file))
                     for r in range(world)]
            for p in procs:
                p.start()
            for p in procs:
                p.join(timeout_s)
                if p.is_alive():
                    p.kill()
            if not os.path.exists(out_file):
                raise RuntimeError(f"communication measurement failed (world {world})")
            results.extend(torch.load(out_file))
    if out_dir is not None:
        plot(results, out_dir / "comm_bytes_per_token.png")
    return results


def plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for world in sorted({r["world"] for r in rows}):
        sel = sorted((r for r in rows if r["world"] == world and r.get("kind") != "linear"
                      and not r["accuracy"]),
                     key=lambda r: r["vocab"])
        ax.plot([r["vocab"] for r in sel], [r["gather_bytes_per_token"] for r in sel],
                marker="o", label=f"gather logits, {world} ranks")
        ax.plot([r["vocab"] for r in sel], [r["fusedce_bytes_per_token"] for r in sel],
                marker="s", label=f"fusedce vocab-parallel, {world} ranks")
    ax.set_yscale("log")
    ax.set_xlabel("vocabulary size")
    ax.set_ylabel("bytes per token per rank (measured)")
    ax.set_title("Collective payload, bf16 logits, forward + backward")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
