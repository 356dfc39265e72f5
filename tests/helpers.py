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
