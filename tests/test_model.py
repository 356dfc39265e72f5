"""The static performance model's invariants (bench/model): fusedce's bytes per logit in every
mode, no logits-sized PyTorch operation outside the kernels, no host synchronisation, few small
operations per step; and, compiled for sm_90 with the JIT's specialisation, no spills and
full-width loads at the headline shapes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ELEMENT = {"bfloat16": 2, "float32": 4}


def _collect(what: str, tmp_path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRITON_DEFAULT_FP_FUSION="1")
    env.pop("TRITON_INTERPRET", None)
    if what == "traffic":
        env["TRITON_INTERPRET"] = "1"
    out = tmp_path / f"{what}.json"
    done = subprocess.run([sys.executable, "-m", "bench.model.collect", what, str(out)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def traffic(tmp_path_factory):
    return _collect("traffic", tmp_path_factory.mktemp("model"))


def _per_logit(case: dict) -> dict:
    """Bytes per logit and element size of a step, summed over its launches."""
    n = case["rows"] * case["cols"]
    total = {"first": 0, "same_program": 0, "later_launch": 0, "write": 0}
    for launch in case["launches"]:
        for k in ("first", "same_program", "later_launch"):
            total[k] += launch["reads"].get(k, 0)
        total["write"] += sum(v for a, v in launch["stores"].items() if a in launch["big_args"])
    return {k: v / n / ELEMENT[case["dtype"]] for k, v in total.items()}


# Reads and writes of the logits per logit, in elements: (first, same program, later, write).
EXPECTED = {
    "fusedce:fwd": (1, 0, 0, 0),
    "fusedce:fwd_bwd": (1, 1, 0, 1),
    "fusedce:fwd_bwd_scaled": (1, 1, 1, 2),  # the stored backward reads and writes again
    "fusedce:fwd_bwd_scaled_recompute": (1, 0, 1, 1),
    "fusedce:none_bwd": (1, 0, 1, 1),
    "fusedce:inplace": (1, 1, 0, 1),
    "fusedce:few_rows": (1, 0, 1, 1),  # statistics launch, then the gradient launch
    "fusedce:few_rows_invariant": (1, 1, 0, 1),  # one program per row, as with many rows
    "fusedce:stats_grad": (1, 0, 1, 1),  # 6 bytes per bf16 logit with lse and entropy grads
    "fusedce:vocab_parallel": (1, 0, 1, 1),
}


@pytest.mark.parametrize("workload", list(EXPECTED))
def test_bytes_per_logit(traffic, workload):
    for case in (c for c in traffic["cases"] if c["workload"] == workload):
        got = _per_logit(case)
        # The target logit is read once more per row: 1 element in cols.
        tolerance = 2 / case["cols"]
        for key, want in zip(("first", "same_program", "later_launch", "write"),
                             EXPECTED[workload]):
            assert abs(got[key] - want) <= tolerance, (workload, case["dtype"], key, got)


def test_no_torch_traffic_no_sync_few_small_ops(traffic):
    for case in traffic["cases"]:
        if not case["workload"].startswith("fusedce:") or case["workload"].endswith("linear"):
            continue
        assert case["logits_sized_torch_ops"] == [], case["workload"]
        assert case["host_syncs"] == 0, case["workload"]
        if case["workload"] == "fusedce:stats_grad":
            # The caller's objective (products, sums) and the statistics' reductions: all
            # per-token sized (checked above), about twenty small operations.
            assert sum(case["torch_ops"].values()) <= 24, case["torch_ops"]
        elif case["workload"] != "fusedce:vocab_parallel":  # (its merge stands in for torch)
            assert sum(case["torch_ops"].values()) <= 6, (case["workload"], case["torch_ops"])


@pytest.mark.slow
def test_code_at_the_headline_shapes(tmp_path):
    """No spills; every loop that streams the logits loads and stores 16 bytes per thread
    per instruction, except where rows are not 16-byte aligned (50257 classes in 16-bit: an odd
    row stride), where the JIT cannot prove alignment and accesses are element-wise (a known
    cost, shown in bench/results/model)."""
    code = _collect("code", tmp_path)
    fusedce = {k for c in code["cases"] if c["workload"].startswith("fusedce")
               for k in (launch["code"] for launch in c["launches"])}
    for key in fusedce:
        kernel = code["kernels"][key]
        assert kernel["local_bytes"] == 0, (key, kernel["local_bytes"])
    for case in code["cases"]:
        if not case["workload"].startswith("fusedce"):
            continue
        for launch in case["launches"]:
            kernel = code["kernels"][launch["code"]]
            for loop in kernel["loops"]:
                aligned = case["vocab"] % (16 // ELEMENT[case["dtype"]]) == 0
                if loop["load_bytes"] and loop["instructions"] > 2 and aligned:
                    assert set(loop["loads"]) <= {"LDG.E.128"}, (case["workload"], loop)
                    assert set(loop["stores"]) <= {"STG.E.128"}, (case["workload"], loop)
