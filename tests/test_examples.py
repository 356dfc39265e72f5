"""The example scripts run and do what they say."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("transformers")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_finetune_tiny_lm(capsys):
    spec = importlib.util.spec_from_file_location("finetune", EXAMPLES / "finetune_tiny_lm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--steps", "4"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert len(rows) == 4
    for _, ours, theirs in rows:
        assert abs(float(ours) - float(theirs)) <= 1e-3 * float(theirs)


def test_vocab_parallel_torchrun():
    import subprocess
    import sys

    from helpers import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(port),
           str(EXAMPLES / "vocab_parallel.py"), "--tokens", "64", "--vocab", "1001"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("max gradient difference") == 2
    assert done.stdout.count("max fused gradient difference") == 2


def test_grpo_tiny(capsys):
    """The GRPO example learns (mean reward rises) and its rollout log-probabilities, computed
    in batches of 3, equal the trainer's, computed all at once, bitwise."""
    spec = importlib.util.spec_from_file_location("grpo", EXAMPLES / "grpo_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--steps", "30"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert len(rows) == 30
    rewards = [float(r[1]) for r in rows]
    assert sum(rewards[-5:]) > 3 * sum(rewards[:5])
    assert all(float(r[2]) == 0.0 for r in rows)
