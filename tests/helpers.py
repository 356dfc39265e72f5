"""Helpers shared by the test files (imported as ``helpers``: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import torch

import fusedce
from fusedce import CrossEntropyFunction, LossSpec
from fusedce.testing import free_port


def grad_output_for(reduction: str, n_rows: int, device, scalar: float = 0.7) -> torch.Tensor:
    """A random per-row grad_output for ``none``, else the scalar (not 1, so the backward's
    scaling runs)."""
    if reduction == "none":
        return torch.randn(n_rows, device=device)
    return torch.tensor(scalar, device=device)


def set_tiling(block_size=None, n_splits=None) -> None:
    """Force the kernels' tiling for the rest of the test, backward passes included
    (``tests/conftest.py`` resets it after each test)."""
    from fusedce.kernels import set_tiling as force

    force(block_size, n_splits)


def function_loss(logits, target, weight=None, num_items_in_batch=None, block_size=None,
                  n_splits=None, **options):
    """``CrossEntropyFunction.apply`` with a ``LossSpec`` built from keywords; ``block_size``
    and ``n_splits`` force the kernels' tiling for the rest of the test (``set_tiling``);
    returns ``(loss, lse, z_loss, accuracy)`` (the Function's entropy and argmax dropped)."""
    options.setdefault("impl", "triton")
    if options["impl"] == "triton":
        set_tiling(block_size, n_splits)
    spec = LossSpec(**options)
    if weight is not None:
        weight = weight.float().contiguous()
    return CrossEntropyFunction.apply(logits, target.long(), weight, num_items_in_batch, spec)[:4]


__all__ = ["fusedce", "free_port", "function_loss", "grad_output_for", "set_tiling"]


def spawn_ranks(target, world: int, args: tuple, tmp_path, timeout_s: float,
                prefix: str = "rank") -> list:
    """Run ``target(rank, world, port, *args)`` in ``world`` spawned processes and return what
    each saved as ``tmp_path / f"{prefix}{rank}.pt"``.  A worker that fails writes its
    traceback to ``{prefix}{rank}.err``, which fails the test with it; a worker still alive
    after ``timeout_s`` is killed."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, *args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout_s)
    for p in procs:
        if p.is_alive():
            p.kill()
    errors = [f.read_text() for f in tmp_path.glob(f"{prefix}*.err")]
    assert not errors, errors[0]
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return [torch.load(tmp_path / f"{prefix}{r}.pt") for r in range(world)]
