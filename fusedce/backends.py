"""The implementations a loss pass runs on, chosen once per call behind one interface.

A backend is a module with five functions, each taking and returning tensors (see
``fusedce.kernels`` for the full contracts):

* ``ce_fwd(logits, target, weight, weight_sum, scale, spec, grad, *, row_stats, vocab,
  stats_out, stat_grads) -> RowResults``: per-row losses and statistics, and the scaled
  gradient written into ``grad`` in the same pass;
* ``ce_row_stats(logits, target, weight, spec) -> RowStats``: partial statistics of each row;
* ``ce_bwd(grad, grad_output)``: ``grad *= grad_output`` in place;
* ``ce_scale(target, weight, token_weight, items, spec, n_classes, dtype) -> (1,)``: the mean's
  factor;
* ``ce_reduce(rows, scale, out_dtype) -> ()``: the sum of per-row values, times ``scale``.

``"triton"`` is ``fusedce.kernels`` (the Triton kernels), ``"torch"`` is ``fusedce.torch_impl``
(PyTorch operations, the CPU fallback).  Adding a backend means adding a module with these
functions and naming it here; ``fusedce.checks.resolve_impl`` decides which one a call runs on.
"""

from __future__ import annotations

import importlib
from types import ModuleType

_MODULES = {"triton": "fusedce.kernels", "torch": "fusedce.torch_impl"}


_LOADED: dict[str, ModuleType] = {}


def get(impl: str) -> ModuleType:
    """The backend module of a resolved ``impl`` (imported on first use: Triton only when the
    kernels run)."""
    module = _LOADED.get(impl)
    if module is None:
        module = _LOADED[impl] = importlib.import_module(_MODULES[impl])
    return module


__all__ = ["get"]
