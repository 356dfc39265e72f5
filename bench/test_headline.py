"""pytest-benchmark entries for the headline cells: ``pytest bench --benchmark-only``.

Headline: forward+backward (mean, grad_output = 1), bf16 logits of 8192 tokens x 128256 classes
(Llama-3) on a GPU; float32 256 x 128256 on the CPU, where the fallback runs.  Timing here is
pytest-benchmark's wall clock around a synchronised step; ``python -m bench`` is the instrument
with CUDA events, bandwidth and memory.  Compare runs with ``--benchmark-compare``.
"""

from __future__ import annotations

import pytest
import torch

from bench.cells import Cell
from bench.contenders import CONTENDERS
from bench.timing import synchronize

HEADLINE_CONTENDERS = ["fusedce", "fusedce-inplace", "torch-eager", "torch-compile", "hf-upcast",
                       "liger"]


@pytest.fixture(scope="module")
def cell() -> Cell:
    if torch.cuda.is_available():
        shape, dtype, device = (8192, 128256), torch.bfloat16, torch.device("cuda")
    else:
        shape, dtype, device = (256, 128256), torch.float32, torch.device("cpu")
    return Cell("fwd_bwd", dtype, *shape, device, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", HEADLINE_CONTENDERS)
def test_fwd_bwd(benchmark, cell, name):
    contender = CONTENDERS[name]
    why = contender.unavailable(cell.device)
    if why:
        pytest.skip(why)
    loss_fn = contender.build()
    logits = cell.logits[0].detach().clone().requires_grad_()
    target = cell.targets[0]

    def setup():
        logits.grad = None
        if contender.inplace:
            with torch.no_grad():
                logits.copy_(cell.logits[0])
        synchronize(cell.device)

    def step():
        loss_fn(logits, target, "mean").backward()
        synchronize(cell.device)

    benchmark.extra_info.update(tokens=cell.n_rows, vocab=cell.n_cols, dtype=str(cell.dtype),
                                device=cell.device.type)
    benchmark.pedantic(step, setup=setup, rounds=5, warmup_rounds=1, iterations=1)
