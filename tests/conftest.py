"""Test configuration: CUDA when present, otherwise the Triton interpreter on CPU tensors."""

from __future__ import annotations

import os
import sys

import pytest
import torch

# The interpreter must be chosen before Triton decorates the kernels, i.e. before
# fusedce.kernels is first imported.  torch.cuda.is_available() does not initialise CUDA.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> torch.device:
    """Where the Triton-path tests run: the GPU, or the CPU through the interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(params=["torch", "triton"])
def impl(request) -> str:
    """Both implementations: the PyTorch one and the Triton kernels."""
    return request.param


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(1234)


@pytest.fixture(autouse=True)
def _heuristic_tiling():
    """A test that forces the kernels' tiling (``helpers.set_tiling``) forces it for itself."""
    yield
    kernels = sys.modules.get("fusedce.kernels")
    if kernels is not None and hasattr(kernels, "set_tiling"):
        kernels.set_tiling(None, None)


@pytest.fixture
def poison(monkeypatch):
    """Make every ``torch.empty``/``empty_like`` called from Python return poisoned memory
    (NaN for floats, a large value for integers), so an element a kernel forgets to write shows.
    """
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def _fill(t):
        if t.is_floating_point():
            return t.fill_(float("nan"))
        if t.dtype != torch.bool:
            return t.fill_(torch.iinfo(t.dtype).max // 2)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: _fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _fill(real_empty_like(*a, **k)))
