"""From counted traffic and compiled code to a predicted time, per workload, shape and GPU.

For each launch of a step at the headline shape (rows x vocab):

* HBM bytes: the step's first reads of logits-sized tensors, reads in a later launch (served
  by L2 only when all the logits fit in ``L2_SHARE`` of it), writes, and the share of
  same-program re-reads (a row's second pass) that misses L2, plus the small per-row bytes.
  A second pass hits L2 when the rows in flight (resident programs x the bytes of the chunk
  each streams) fit in ``L2_SHARE`` of the L2; beyond, the hit share falls as
  ``L2_SHARE * L2 / in flight`` (an assumption, named in every report);
* issue time: SASS instructions of each loop per element times the elements it covers, over
  the warp schedulers of the SMs the grid occupies; MUFU time likewise over the SFUs;
* launch cost: ``LAUNCH_OVERHEAD_S`` per kernel launch and per small PyTorch operation.

A launch takes the longest of its memory, issue and MUFU times, plus its launch cost;
logits-sized PyTorch operations outside the kernels add their elementwise traffic.  The floor
is the fewest bytes the mode must move (logits read once, gradient written once) at the copy
bandwidth; the predicted share of it is what the benchmark would report as % of copy bandwidth.
"""

from __future__ import annotations

import math

from .hardware import COPY_EFFICIENCY, GPUS, LAUNCH_OVERHEAD_S, Gpu

L2_SHARE = 0.75  # assumed share of the L2 that can hold rows between their two reads
ELEMENT_SIZE = {"bfloat16": 2, "float32": 4}
TOKENS = [8192, 16384]


def programs_per_sm(code: dict, gpu: Gpu) -> int:
    """Resident programs per SM, from registers (allocated per warp in units of 256),
    shared memory, threads and the block limit."""
    warps = code["num_warps"]
    regs_per_warp = math.ceil(max(code["registers"], 1) * 32 / 256) * 256
    by_regs = gpu.regs_per_sm // regs_per_warp // warps
    by_smem = gpu.smem_per_sm // code["shared_bytes"] if code["shared_bytes"] else 10**9
    by_threads = gpu.max_threads_per_sm // (32 * warps)
    return max(0, min(by_regs, by_smem, by_threads, gpu.max_blocks_per_sm))


def loop_costs(code: dict, element_size: int) -> list[dict]:
    """Per-element instructions and EX2 of each loop that streams the logits."""
    out = []
    for loop in code["loops"]:
        if loop["instructions"] <= 2 or loop["load_bytes"] == 0:
            continue  # a branch-only loop, or one that only stores (zeros of ignored rows)
        elements = loop["load_bytes"] / element_size
        out.append({"instructions": loop["instructions"] / elements,
                    "ex2": loop["ex2"] / elements,
                    "loads": sorted(set(loop["loads"])), "stores": sorted(set(loop["stores"]))})
    return out


def predict(traffic: dict, code_case: dict, kernels: dict, tokens: int, gpu: Gpu) -> dict:
    """The prediction of one workload's step at ``tokens`` x ``code_case['vocab']``."""
    dtype, vocab = traffic["dtype"], code_case["vocab"]
    size = ELEMENT_SIZE[dtype]
    cols = vocab // 2 if traffic["workload"].endswith("vocab_parallel") else vocab
    rows = code_case["rows"] if code_case["rows"] < 8192 else tokens
    logits = rows * cols
    small_logits = traffic["rows"] * traffic["cols"]
    total = {"seconds": 0.0, "hbm_bytes": 0.0, "instructions": 0.0, "ex2": 0.0}
    launches = []
    for t_launch, c_launch in zip(traffic["launches"], code_case["launches"]):
        code = kernels[c_launch["code"]]
        reads = t_launch["reads"]
        big_stores = sum(v for k, v in t_launch["stores"].items() if k in t_launch["big_args"])
        big_loads = sum(v for k, v in t_launch["loads"].items() if k in t_launch["big_args"])
        small = (sum(t_launch["loads"].values()) + sum(t_launch["stores"].values())
                 - big_loads - big_stores) / traffic["rows"]
        per_logit = {k: reads.get(k, 0) / small_logits for k in
                     ("first", "same_program", "later_launch")}
        per_logit["write"] = big_stores / small_logits
        grid_programs = math.prod(c_launch["grid"])
        resident = min(grid_programs, programs_per_sm(code, gpu) * gpu.sms)
        chunk = c_launch.get("cols_per_split", c_launch.get("n_cols", cols)) * size
        in_flight = resident * chunk
        hit = 1.0 if in_flight <= L2_SHARE * gpu.l2_bytes else L2_SHARE * gpu.l2_bytes / in_flight
        # A later launch's re-read hits L2 only when all the logits fit there (few rows).
        later_hit = 1.0 if logits * size <= L2_SHARE * gpu.l2_bytes else 0.0
        hbm = logits * (per_logit["first"] + (1 - later_hit) * per_logit["later_launch"]
                        + per_logit["write"] + (1 - hit) * per_logit["same_program"]) \
            + rows * small
        loops = loop_costs(code, size)
        streamed = big_loads / small_logits / size  # passes over the logits this launch made
        per_loop = streamed / len(loops) if loops else 0.0
        instructions = sum(lp["instructions"] for lp in loops) * per_loop
        ex2 = sum(lp["ex2"] for lp in loops) * per_loop
        active = min(gpu.sms, grid_programs)
        t_mem = hbm / gpu.copy_bytes_per_s
        t_issue = logits * instructions / 32 / (gpu.issue_per_sm_per_clock * active * gpu.clock_hz)
        t_sfu = logits * ex2 / (gpu.sfu_per_sm_per_clock * active * gpu.clock_hz)
        seconds = max(t_mem, t_issue, t_sfu) + LAUNCH_OVERHEAD_S
        launches.append({
            "kernel": code["kernel"], "grid": c_launch["grid"], "num_warps": code["num_warps"],
            "registers": code["registers"], "spill_bytes": code["local_bytes"],
            "programs_per_sm": programs_per_sm(code, gpu),
            "in_flight_mb": round(in_flight / 1e6, 1), "l2_hit": round(hit, 3),
            "bytes_per_logit": {k: round(v, 3) for k, v in per_logit.items()},
            "hbm_bytes_per_logit": round(hbm / logits, 3),
            "instructions_per_logit": round(instructions, 2), "ex2_per_logit": round(ex2, 2),
            "loops": loops, "bound": max((t_mem, "memory"), (t_issue, "issue"),
                                         (t_sfu, "mufu"))[1],
            "ms": round(seconds * 1e3, 4),
        })
        total["seconds"] += seconds
        total["hbm_bytes"] += hbm
        total["instructions"] += instructions
        total["ex2"] += ex2
    n_small = sum(traffic["torch_ops"].values()) - len(traffic["logits_sized_torch_ops"])
    total["seconds"] += n_small * LAUNCH_OVERHEAD_S
    big_ops = [op for op in traffic["logits_sized_torch_ops"] if op not in ("mm", "addmm")]
    total["hbm_bytes"] += len(big_ops) * 2 * logits * size  # elementwise: read and write
    total["seconds"] += len(big_ops) * 2 * logits * size / gpu.copy_bytes_per_s
    backward = not traffic["workload"].endswith(":fwd")
    floor = (2 if backward else 1) * logits * size / gpu.copy_bytes_per_s
    return {
        "workload": traffic["workload"], "dtype": dtype, "tokens": rows, "vocab": vocab,
        "gpu": gpu.name, "launches": launches, "kernel_launches": len(launches),
        "small_torch_ops": n_small, "logits_sized_torch_ops": big_ops,
        "host_syncs": traffic["host_syncs"],
        "hbm_bytes_per_logit": round(total["hbm_bytes"] / logits, 3),
        "instructions_per_logit": round(total["instructions"], 2),
        "ex2_per_logit": round(total["ex2"], 2),
        "predicted_ms": round(total["seconds"] * 1e3, 4),
        "floor_ms": round(floor * 1e3, 4),
        "pct_of_copy_floor": round(100 * floor / total["seconds"], 1),
    }


def predictions(traffic: dict, code: dict) -> list[dict]:
    """Every (workload, dtype, tokens, vocab, GPU) the two collections cover."""
    by_key = {(c["workload"], c["dtype"]): c for c in traffic["cases"]}
    code_cases = {(c["workload"], c["dtype"], c["vocab"]): c for c in code["cases"]}
    out = []
    for (workload, dtype), t_case in by_key.items():
        source = workload
        if workload == "liger:none_bwd":
            source = "liger:fwd_bwd"  # the same kernel; the per-token scaling is a torch op
        if workload.endswith(":linear"):
            continue  # reported from its traffic alone (its matrix products dominate)
        for vocab in sorted({c["vocab"] for c in code["cases"]}):
            c_case = code_cases.get((source, dtype, vocab))
            if c_case is None:
                continue
            for gpu in GPUS:
                for tokens in ([c_case["rows"]] if c_case["rows"] < 8192 else TOKENS):
                    out.append(predict(t_case, c_case, code["kernels"], tokens, gpu))
    return out


ASSUMPTIONS = (f"copy bandwidth = {COPY_EFFICIENCY:.0%} of datasheet HBM bandwidth; "
               f"re-reads hit L2 while rows in flight fit in {L2_SHARE:.0%} of it; "
               f"{LAUNCH_OVERHEAD_S * 1e6:.0f} us per kernel launch or small PyTorch operation")
