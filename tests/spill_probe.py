"""Compile two toy kernels for sm_90 as the static model does (``bench.model.code``) and print
what the model reads of them, as JSON: one that keeps a few running vectors, one that keeps
so many (eight vectors of 64 columns per thread) that it must spill.  Run without
TRITON_INTERPRET (``tests/test_model.py`` calls it in a subprocess)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.model.code import compile_launch  # noqa: E402


@triton.jit
def _toy_kernel(x_ptr, out_ptr, n_cols, BLOCK_SIZE: tl.constexpr, LANES: tl.constexpr):
    """Running sums of x, x^2, ... x^LANES per lane over a row, kept until the end."""
    row = tl.program_id(0).to(tl.int64)
    a0 = tl.zeros([BLOCK_SIZE], tl.float32)
    a1 = tl.zeros([BLOCK_SIZE], tl.float32)
    a2 = tl.zeros([BLOCK_SIZE], tl.float32)
    a3 = tl.zeros([BLOCK_SIZE], tl.float32)
    a4 = tl.zeros([BLOCK_SIZE], tl.float32)
    a5 = tl.zeros([BLOCK_SIZE], tl.float32)
    a6 = tl.zeros([BLOCK_SIZE], tl.float32)
    a7 = tl.zeros([BLOCK_SIZE], tl.float32)
    for start in range(0, n_cols, BLOCK_SIZE):
        x = tl.load(x_ptr + row * n_cols + start + tl.arange(0, BLOCK_SIZE)).to(tl.float32)
        a0 += tl.exp(x)
        a1 += x * x
        if LANES > 2:
            a2 = tl.maximum(a2, x)
            a3 += tl.sqrt(tl.abs(x) + a2)
            a4 += x * a1
            a5 = tl.minimum(a5, x - a0)
            a6 += tl.exp(a3 - x)
            a7 += a4 * a6
    total = tl.sum(a0 + a1 + a2 + a3 + a4 + a5 + a6 + a7, axis=0)
    tl.store(out_ptr + row, total)


def main() -> None:
    x = torch.empty(64, 65536, dtype=torch.bfloat16)
    out = torch.empty(64, dtype=torch.float32)
    result = {}
    for name, lanes, block in (("lean", 2, 4096), ("hungry", 8, 16384)):
        code = compile_launch(_toy_kernel, (), dict(x_ptr=x, out_ptr=out, n_cols=65536,
                                                     BLOCK_SIZE=block, LANES=lanes,
                                                     num_warps=8))
        result[name] = dataclasses.asdict(code)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
