"""Bytes communicated per token by vocabulary-parallel fusedce, against gathering the logits.

Measured, not computed: ranks of a gloo group on this machine run fusedce's vocabulary-parallel
forward+backward and, as the alternative, an ``all_gather`` of the logits slices followed by a
local loss, with ``torch.distributed``'s collectives wrapped to add up the bytes of the tensors
handed to them (an all-reduce's tensor, an all-gather's output).  The one-time layout exchange
(cached after the first call) is excluded by measuring a second call.  Bytes per token per rank.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fusedce.testing import free_port


def _count_collectives(counter: dict) -> None:
    real_all_reduce, real_all_gather = dist.all_reduce, dist.all_gather

    def all_reduce(tensor, *args, **kwargs):
        counter["bytes"] += tensor.numel() * tensor.element_size()
        return real_all_reduce(tensor, *args, **kwargs)

    def all_gather(outputs, tensor, *args, **kwargs):
        counter["bytes"] += sum(t.numel() * t.element_size() for t in outputs)
        return real_all_gather(outputs, tensor, *args, **kwargs)

    dist.all_reduce, dist.all_gather = all_reduce, all_gather


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
        sel = sorted((r for r in rows if r["world"] == world and not r["accuracy"]),
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
