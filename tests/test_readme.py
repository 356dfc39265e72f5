"""The README's code blocks are the contract a new user copies: run every Python block, in
order, in one namespace (later blocks use names the first one defines)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_blocks():
    assert len(python_blocks()) >= 7


def test_readme_python_blocks_run():
    pytest.importorskip("transformers")
    import torch.distributed as dist

    namespace: dict = {"__name__": "readme"}
    torch._dynamo.reset()
    try:
        for i, block in enumerate(python_blocks()):
            try:
                exec(compile(block, f"README.md python block {i}", "exec"), namespace)
            except Exception as exc:  # name the block that broke
                raise AssertionError(f"README python block {i} failed:\n{block}") from exc
    finally:
        from fusedce.integrations import transformers as fce_hf

        fce_hf.revert()
        if dist.is_initialized():
            dist.destroy_process_group()
        torch._dynamo.reset()
    assert torch.isfinite(namespace["loss"]).all()
