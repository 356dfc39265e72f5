"""The static performance model's invariants (bench/model): fusedce's bytes per logit in every
mode, no logits-sized PyTorch operation outside the kernels, no host synchronisation, few small
operations per step; the model itself (it sees a spilling kernel, counts the whole per-row path,
its L2 curve); and, compiled for sm_90 with the JIT's specialisation, no spills, full-width
loads and whole-path instructions per logit at or below Liger-Kernel's at the headline
shapes."""

from __future__ import annotations

import json
import math
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
    "fusedce:stats": (1, 1, 0, 1),  # the statistics ride on the same two reads
    "fusedce:stats_grad": (1, 0, 1, 1),  # 6 bytes per bf16 logit with lse and entropy grads
    "fusedce:vocab_parallel": (1, 0, 1, 1),
    # Distillation: the student's and the teacher's logits read (2 elements per logit), read
    # again by the gradient's pass (and by the JSD's second pass), the gradient written.
    "fusedce:distill_fkl": (2, 2, 0, 1),
    "fusedce:distill_jsd": (2, 4, 0, 1),
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
        elif case["workload"] in ("fusedce:stats", "fusedce:distill_fkl",
                                  "fusedce:distill_jsd"):
            # The statistics' per-token reductions (accuracy over the counted tokens), or the
            # distillation's per-row factors: per-token work.
            assert sum(case["torch_ops"].values()) <= 12, case["torch_ops"]
        elif case["workload"] != "fusedce:vocab_parallel":  # (its merge stands in for torch)
            assert sum(case["torch_ops"].values()) <= 6, (case["workload"], case["torch_ops"])


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRITON_DEFAULT_FP_FUSION="1")
    env.pop("TRITON_INTERPRET", None)
    return env


@pytest.fixture(scope="module")
def toy_code():
    """A lean toy kernel and a register-hungry one, compiled for sm_90 as the model does."""
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "spill_probe.py")], env=_env(),
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def _toy_prediction(code: dict) -> dict:
    """The roofline of one launch of a toy kernel over 8192 rows of 65536 bf16 logits, read
    once (traffic as the interpreter would count it at one row)."""
    from bench.model.hardware import H100
    from bench.model.roofline import predict

    row_bytes = 65536 * 2
    traffic = {"dtype": "bfloat16", "workload": "toy:fwd", "rows": 1, "cols": 65536,
               "launches": [{"reads": {"first": row_bytes}, "stores": {},
                             "loads": {"x_ptr": row_bytes}, "big_args": ["x_ptr"]}],
               "torch_ops": {}, "logits_sized_torch_ops": [], "host_syncs": 0}
    case = {"vocab": 65536, "rows": 8192,
            "launches": [{"code": "toy", "grid": [8192], "BLOCK_SIZE": code["block_size"]}]}
    return predict(traffic, case, {"toy": code}, 8192, H100)


def test_model_sees_a_spilling_kernel(toy_code):
    """Spills are read from the stack frame and the SASS's STL/LDL, and cost time."""
    lean, hungry = toy_code["lean"], toy_code["hungry"]
    assert lean["local_bytes"] == 0
    assert all(loop["local_ops"] == 0 for loop in lean["loops"])
    assert hungry["local_bytes"] > 0
    assert max(loop["local_ops"] for loop in hungry["loops"]) > 0
    # ptxas -v on the same PTX agrees (where a ptxas that reads Triton's PTX is shipped).
    if lean["ptxas"]:
        assert lean["ptxas"]["spill_stores"] == 0 and hungry["ptxas"]["spill_stores"] > 0
    fast, slow = _toy_prediction(lean), _toy_prediction(hungry)
    assert fast["local_bytes_per_logit"] == 0 and fast["spill_bytes"] == 0
    assert slow["local_bytes_per_logit"] > 0 and slow["spill_bytes"] > 0
    assert slow["kernel_ms"] > fast["kernel_ms"]
    assert slow["launches"][0]["bound"] in ("spills", "issue")


def test_whole_path_counts_the_tail_and_the_code_outside_loops(toy_code):
    """Instructions per logit over the whole path: loop trips x body plus the code outside the
    loops; a row that ends just past a block pays for the whole masked block."""
    from bench.model.roofline import streaming_loops, whole_path

    code = toy_code["lean"]
    (loop,) = streaming_loops(code, 2)
    threads = 32 * code["num_warps"]
    step = loop["elements"] * threads
    for cols in (int(step) * 16, int(step) * 16 + 8):
        path = whole_path(code, 2, cols, 1, 1)
        trips = math.ceil(cols / step) if loop["masked"] else cols // step
        assert path["instructions"] == trips * loop["trip_instructions"] + \
            code["outside"]["instructions"]
        assert path["instructions"] * threads / cols > loop["instructions"]  # above the body


def test_l2_hit_rate_falls_smoothly():
    from bench.model.hardware import H100
    from bench.model.roofline import l2_hit

    points = [l2_hit(share * H100.l2_bytes, H100) for share in (0.25, 0.5, 0.68, 1.0, 1.5)]
    assert points == sorted(points, reverse=True)
    assert points[0] > 0.999 and 0.85 < points[2] < 0.97 and points[3] < 0.6
    assert H100.l2_bytes == 50_000_000


@pytest.mark.slow
def test_code_at_the_headline_shapes(tmp_path):
    """No spills; every loop that streams the logits loads and stores 16 bytes per thread
    per instruction, except where rows are not 16-byte aligned (50257 classes in 16-bit: an odd
    row stride), where the JIT cannot prove alignment and accesses are element-wise (a known
    cost, shown in bench/results/model)."""
    code = _collect("code", tmp_path)
    _check_whole_path_against_liger(code)
    fusedce = {k for c in code["cases"] if c["workload"].startswith("fusedce")
               for k in (launch["code"] for launch in c["launches"])}
    for key in fusedce:
        kernel = code["kernels"][key]
        assert kernel["local_bytes"] == 0, (key, kernel["local_bytes"])
        assert kernel["ptxas"].get("spill_stores", 0) == 0, (key, kernel["ptxas"])
    for case in code["cases"]:
        if not case["workload"].startswith("fusedce"):
            continue
        for launch in case["launches"]:
            kernel = code["kernels"][launch["code"]]
            for loop in kernel["loops"]:
                aligned = case["vocab"] % (16 // ELEMENT[case["dtype"]]) == 0
                streams = loop.get("inner", True) and loop["load_bytes"] and \
                    loop["instructions"] > 2
                if streams and aligned:
                    assert set(loop["loads"]) <= {"LDG.E.128"}, (case["workload"], loop)
                    assert set(loop["stores"]) <= {"STG.E.128"}, (case["workload"], loop)


# Whole-path instructions per logit of the forward + backward pass, bf16, where fusedce must be
# at or below Liger-Kernel's (grad_output 1; the vocabularies of the headline).
LIGER_BOUND = [("fwd_bwd", 32000), ("fwd_bwd", 50257), ("fwd_bwd", 128256),
               ("fwd_bwd", 151936), ("fwd_bwd", 262144), ("fwd", 32000), ("fwd", 50257)]


def _path_per_logit(code: dict, case: dict, mode_launch: str) -> float:
    """Whole-path thread instructions per logit of the launches of ``mode_launch`` in a case."""
    from bench.model.roofline import streaming_loops, whole_path

    size = ELEMENT[case["dtype"]]
    total = 0.0
    for launch in case["launches"]:
        kernel = code["kernels"][launch["code"]]
        if launch["kernel"] != mode_launch:
            continue
        cols = min(launch.get("cols_per_split", case["vocab"]), case["vocab"])
        path = whole_path(kernel, size, cols, 1, len(streaming_loops(kernel, size)))
        total += path["instructions"] * 32 * kernel["num_warps"] / cols
    return total


def _check_whole_path_against_liger(code: dict) -> None:
    cases = {(c["workload"], c["dtype"], c["vocab"]): c for c in code["cases"]}
    if not any(w.startswith("liger") for w, _, _ in cases):
        return  # Liger-Kernel not installed: nothing to compare with
    for mode, vocab in LIGER_BOUND:
        ours = _path_per_logit(code, cases[(f"fusedce:{mode}", "bfloat16", vocab)],
                               "ce_fwd_kernel")
        theirs = _path_per_logit(code, cases[(f"liger:{mode}", "bfloat16", vocab)],
                                 "liger_cross_entropy_kernel")
        assert 0 < ours <= theirs, (mode, vocab, ours, theirs)


def test_linear_model_rows():
    """The fused-linear rows of the model: every contender at the three shapes on both GPUs,
    each with the fields the benchmark pages read."""
    from bench.model import linear
    from bench.model.hardware import GPUS

    rows = linear.predictions()
    keys = {"workload", "tokens", "hidden", "vocab", "gpu", "predicted_ms", "gemm_floor_ms",
            "peak_extra_gib"}
    assert all(keys <= set(r) for r in rows)
    got = {(r["contender"], r["tokens"], r["hidden"], r["vocab"], r["gpu"]) for r in rows}
    want = {(c.__name__, *shape, g.name) for c in linear.CONTENDERS for shape in linear.SHAPES
            for g in GPUS}
    assert got == want
    assert all(r["predicted_ms"] >= r["gemm_floor_ms"] * 0.999 for r in rows)


@pytest.mark.parametrize("shape", [(8192, 4096, 151936), (16384, 2048, 248320)])
def test_linear_model_of_the_vocab_policy(shape):
    """fusedce's 'vocab' plan: one logits product per tile in pass 1 and one per tile not kept
    in pass 2; each grad_weight slice written once (no accumulating product on it); no
    logits-sized elementwise pass; within 2 GiB of extra memory."""
    from bench.model import linear
    from bench.model.hardware import H100
    from fusedce.linear import MAX_CHUNK_BYTES, vocab_plan

    n, h, v = shape
    tile, rows, kept = vocab_plan(n, v, MAX_CHUNK_BYTES, 2)
    plan = linear.fusedce_vocab(H100, n, h, v)
    gemm_flops = sum(op.flops for op in plan.ops if op.kind == "gemm")
    products = 1 + (v - kept) / v + 2  # logits twice where not kept, grad_input, grad_weight
    assert gemm_flops == pytest.approx(products * 2 * n * h * v, rel=1e-9)
    assert all(op.bytes < n * v * 2 for op in plan.ops if op.kind == "pass")
    assert plan.peak_extra_bytes <= 2 * linear.GIB
    tiles = -(-v // tile)
    grad_weight_products = [op for op in plan.ops if op.kind == "gemm"
                            and op.flops == pytest.approx(2 * tile * h * n)]
    assert len(grad_weight_products) >= tiles - 1  # (the last tile is narrower)


def test_linear_model_reads_liger_chunk_rule():
    """Liger-Kernel's chunk rule in the model is the installed package's."""
    liger = pytest.importorskip("liger_kernel.ops.fused_linear_cross_entropy")
    import inspect

    source = inspect.getsource(liger)
    assert "triton.next_power_of_2(triton.cdiv(BT, inc_factor))" in source
    assert getattr(liger, "_CHUNK_MEM_CONST", 1) == 1
