"""From counted traffic and compiled code to a predicted time, per workload, shape and GPU.

For each launch of a step at the headline shape (rows x vocab):

* HBM bytes: the step's first reads of logits-sized tensors, writes, the share of re-reads
  that miss L2 (``l2_hit`` below), the small per-row bytes, and spill traffic (below);
* L2: a re-read hits when fewer than ``L2_WAYS`` other lines fell into its cache set since the
  first read.  With ``D`` bytes of other lines touched in between (the rows in flight: resident
  programs x the bytes of the chunk each streams; for a later launch, the whole logits) and an
  address hash that spreads lines evenly over the sets, the lines landing in one set are
  Poisson with mean ``L2_WAYS * D / L2``, so ``hit = P(Poisson(L2_WAYS * D / L2) < L2_WAYS)``:
  the set-conflict model of Agarwal, Horowitz and Hennessy ("An analytical cache model", ACM
  TOCS 7(2), 1989) for an LRU set, with the H100's 50 MB L2 and an assumed 16 ways.  It falls
  smoothly from ~1 at half the cache (0.996) to 0.92 at 68% and 0.47 at 100%;
* issue time: the whole per-row path, from the SASS: each loop's trips x its body (a masked
  loop runs ceil(n / step) trips, an unmasked one floor, its masked tail then being code
  outside the loop) plus every instruction outside the loops once per program, over the warp
  schedulers of the SMs the grid occupies; MUFU (EX2) time likewise over the SFUs;
* spills: each STL/LDL's bytes, summed along the same path, are served by L1 at
  ``L1_BYTES_PER_CLOCK`` per SM (the part of the stack frame beyond what L1 can hold beside
  the resident programs goes to L2 and is charged at HBM rate, an upper bound);
* launch and sync cost: ``LAUNCH_OVERHEAD_S`` per kernel launch and per small PyTorch
  operation, ``SYNC_S`` per host synchronisation, charged apart from the kernels so that a
  difference between contenders says where it comes from.

A launch's kernel time is the longest of its memory, issue, MUFU and spill times; logits-sized
PyTorch operations outside the kernels add their elementwise traffic.  The floor is the fewest
bytes the mode must move (logits read once, gradient written once) at the copy bandwidth; the
predicted share of it is what the benchmark would report as % of copy bandwidth.
"""

from __future__ import annotations

import math

from .hardware import COPY_EFFICIENCY, GPUS, LAUNCH_OVERHEAD_S, SYNC_S, Gpu

L2_WAYS = 16  # assumed associativity of the L2 (not published by NVIDIA)
L1_BYTES_PER_CLOCK = 128  # L1 load/store bandwidth per SM per clock (Hopper tuning guide)
L1_BYTES = 256 * 1024  # L1 + shared memory per SM (H100 whitepaper)
ELEMENT_SIZE = {"bfloat16": 2, "float32": 4}
TOKENS = [8192, 16384]


def l2_hit(distance: float, gpu: Gpu) -> float:
    """Probability that a line re-read after ``distance`` bytes of other lines is still in L2:
    P(Poisson(ways * distance / L2) < ways) (see the module docstring)."""
    mean = L2_WAYS * distance / gpu.l2_bytes
    term = math.exp(-mean)
    total = term
    for k in range(1, L2_WAYS):
        term *= mean / k
        total += term
    return min(1.0, total)


def programs_per_sm(code: dict, gpu: Gpu) -> int:
    """Resident programs per SM, from registers (allocated per warp in units of 256),
    shared memory, threads and the block limit."""
    warps = code["num_warps"]
    regs_per_warp = math.ceil(max(code["registers"], 1) * 32 / 256) * 256
    by_regs = gpu.regs_per_sm // regs_per_warp // warps
    by_smem = gpu.smem_per_sm // code["shared_bytes"] if code["shared_bytes"] else 10**9
    by_threads = gpu.max_threads_per_sm // (32 * warps)
    return max(0, min(by_regs, by_smem, by_threads, gpu.max_blocks_per_sm))


# Workloads that read a second logits-sized tensor beside the logits.
TWO_INPUTS = ("distill", "soft_targets")


def streaming_loops(code: dict, element_size: int, tensors: int = 1) -> list[dict]:
    """The innermost loops that stream a logits-sized row: (elements per thread per trip,
    instructions and EX2 per element of the body, masked or not); ``tensors`` logits-sized
    tensors are read side by side (2 for a distillation's student and teacher)."""
    out = []
    for loop in code["loops"]:
        if not loop.get("inner", True) or loop["instructions"] <= 2 or loop["load_bytes"] == 0:
            continue  # an outer loop, a branch-only loop, or one that only stores zeros
        elements = loop["load_bytes"] / element_size / tensors
        out.append({"elements": elements, "trip_instructions": loop["instructions"],
                    "trip_ex2": loop["ex2"], "trip_local_bytes": loop.get("local_bytes", 0),
                    "masked": loop.get("predicated", False),
                    "instructions": loop["instructions"] / elements,
                    "ex2": loop["ex2"] / elements,
                    "loads": sorted(set(loop["loads"])), "stores": sorted(set(loop["stores"]))})
    return out


def whole_path(code: dict, size: int, cols: int, rows_per_program: float,
               passes: float, tensors: int = 1) -> dict:
    """Per-thread instructions, EX2 and spill bytes of one program along its whole path:
    trips x body of each streaming loop (``passes`` of them run: a launch that skips its
    loop, as the backward's scaling at grad_output 1, runs none), outer loops' own code per
    row, and the code outside all loops once."""
    threads = 32 * code["num_warps"]
    loops = streaming_loops(code, size, tensors)
    running = min(len(loops), round(passes / tensors)) if loops else 0
    total = {"instructions": 0.0, "ex2": 0.0, "local_bytes": 0.0}
    for loop in loops[:running]:
        step = loop["elements"] * threads
        trips = math.ceil(cols / step) if loop["masked"] else cols // step
        total["instructions"] += trips * loop["trip_instructions"] * rows_per_program
        total["ex2"] += trips * loop["trip_ex2"] * rows_per_program
        total["local_bytes"] += trips * loop["trip_local_bytes"] * rows_per_program
    for loop in code["loops"]:
        if not loop.get("inner", True):
            total["instructions"] += loop["instructions"] * rows_per_program
            total["local_bytes"] += loop.get("local_bytes", 0) * rows_per_program
    outside = code.get("outside", {})
    total["instructions"] += outside.get("instructions", 0)
    total["ex2"] += outside.get("ex2", 0)
    total["local_bytes"] += outside.get("local_bytes", 0)
    return total


def predict(traffic: dict, code_case: dict, kernels: dict, tokens: int, gpu: Gpu) -> dict:
    """The prediction of one workload's step at ``tokens`` x ``code_case['vocab']``."""
    dtype, vocab = traffic["dtype"], code_case["vocab"]
    size = ELEMENT_SIZE[dtype]
    cols = vocab // 2 if traffic["workload"].endswith("vocab_parallel") else vocab
    rows = code_case["rows"] if code_case["rows"] < 8192 else tokens
    logits = rows * cols
    small_logits = traffic["rows"] * traffic["cols"]
    total = {"kernel_s": 0.0, "hbm_bytes": 0.0, "instructions": 0.0, "ex2": 0.0,
             "local_bytes": 0.0}
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
        grid = list(c_launch["grid"])
        if grid and grid[0] == code_case["rows"] and rows != code_case["rows"]:
            grid[0] = rows  # one program per row: the grid follows the tokens
        grid_programs = math.prod(grid)
        resident = min(grid_programs, programs_per_sm(code, gpu) * gpu.sms)
        cols_per_program = min(c_launch.get("cols_per_split", cols), cols)
        in_flight = resident * cols_per_program * size
        hit = l2_hit(in_flight, gpu)
        later_hit = l2_hit(logits * size, gpu)
        hbm = logits * (per_logit["first"] + (1 - later_hit) * per_logit["later_launch"]
                        + per_logit["write"] + (1 - hit) * per_logit["same_program"]) \
            + rows * small
        streamed = big_loads / small_logits / size  # passes over the logits this launch made
        tensors = max(1, sum(1 for k in t_launch["big_args"] if t_launch["loads"].get(k)))
        if streamed:
            rows_per_program = rows * cols / cols_per_program / grid_programs
            path = whole_path(code, size, cols_per_program, rows_per_program, streamed,
                              tensors)
            threads = 32 * code["num_warps"]
            instructions = path["instructions"] * threads * grid_programs / logits
            ex2 = path["ex2"] * threads * grid_programs / logits
            local = path["local_bytes"] * threads * grid_programs / logits
        else:  # a per-row kernel (scale, reduce) or one whose loop did not run
            path = whole_path(code, size, 0, 0, 0)
            threads = 32 * code["num_warps"]
            instructions = path["instructions"] * threads * grid_programs / logits
            ex2, local = 0.0, 0.0
        active = min(gpu.sms, grid_programs)
        t_mem = hbm / gpu.copy_bytes_per_s
        t_issue = logits * instructions / 32 / (gpu.issue_per_sm_per_clock * active * gpu.clock_hz)
        t_sfu = logits * ex2 / (gpu.sfu_per_sm_per_clock * active * gpu.clock_hz)
        # Spills: L1 serves the frames of the resident programs that fit beside nothing else.
        frame = code["local_bytes"] * threads * programs_per_sm(code, gpu)
        l1_share = min(1.0, L1_BYTES / frame) if frame else 1.0
        t_local = logits * local * l1_share / (L1_BYTES_PER_CLOCK * active * gpu.clock_hz) \
            + logits * local * (1 - l1_share) / gpu.copy_bytes_per_s
        hbm += logits * local * (1 - l1_share)
        seconds = max(t_mem, t_issue, t_sfu, t_local)
        bound = max((t_mem, "memory"), (t_issue, "issue"), (t_sfu, "mufu"), (t_local, "spills"))
        launches.append({
            "kernel": code["kernel"], "grid": grid, "num_warps": code["num_warps"],
            "registers": code["registers"], "spill_bytes": code["local_bytes"],
            "ptxas_spills": code.get("ptxas", {}),
            "programs_per_sm": programs_per_sm(code, gpu),
            "in_flight_mb": round(in_flight / 1e6, 1), "l2_hit": round(hit, 3),
            "bytes_per_logit": {k: round(v, 3) for k, v in per_logit.items()},
            "hbm_bytes_per_logit": round(hbm / logits, 3),
            "local_bytes_per_logit": round(local, 2),
            "instructions_per_logit": round(instructions, 2), "ex2_per_logit": round(ex2, 2),
            "loops": streaming_loops(code, size, tensors), "bound": bound[1],
            "ms": round(seconds * 1e3, 4),
        })
        total["kernel_s"] += seconds
        total["hbm_bytes"] += hbm
        total["instructions"] += instructions
        total["ex2"] += ex2
        total["local_bytes"] += local
    n_small = sum(traffic["torch_ops"].values()) - len(traffic["logits_sized_torch_ops"])
    big_ops = [op for op in traffic["logits_sized_torch_ops"] if op not in ("mm", "addmm")]
    total["hbm_bytes"] += len(big_ops) * 2 * logits * size  # elementwise: read and write
    total["kernel_s"] += len(big_ops) * 2 * logits * size / gpu.copy_bytes_per_s
    launch_s = (len(launches) + n_small) * LAUNCH_OVERHEAD_S
    sync_s = traffic["host_syncs"] * SYNC_S
    seconds = total["kernel_s"] + launch_s + sync_s
    backward = not traffic["workload"].endswith(":fwd")
    # The fewest bytes: the logits read (and the teacher's logits or the target probabilities
    # beside them), the gradient written.
    reads = 2 if any(f":{name}" in traffic["workload"] for name in TWO_INPUTS) else 1
    floor = (reads + (1 if backward else 0)) * logits * size / gpu.copy_bytes_per_s
    return {
        "workload": traffic["workload"], "dtype": dtype, "tokens": rows, "vocab": vocab,
        "gpu": gpu.name, "launches": launches, "kernel_launches": len(launches),
        "small_torch_ops": n_small, "logits_sized_torch_ops": big_ops,
        "host_syncs": traffic["host_syncs"],
        "hbm_bytes_per_logit": round(total["hbm_bytes"] / logits, 3),
        "instructions_per_logit": round(total["instructions"], 2),
        "ex2_per_logit": round(total["ex2"], 2),
        "local_bytes_per_logit": round(total["local_bytes"], 2),
        "spill_bytes": max(launch["spill_bytes"] for launch in launches) if launches else 0,
        "kernel_ms": round(total["kernel_s"] * 1e3, 4),
        "launch_ms": round(launch_s * 1e3, 4),
        "sync_ms": round(sync_s * 1e3, 4),
        "predicted_ms": round(seconds * 1e3, 4),
        "floor_ms": round(floor * 1e3, 4),
        "pct_of_copy_floor": round(100 * floor / seconds, 1),
        "kernel_pct_of_copy_floor": round(100 * floor / total["kernel_s"], 1),
    }


def predictions(traffic: dict, code: dict) -> list[dict]:
    """Every (workload, dtype, tokens, vocab, GPU) the two collections cover."""
    by_key = {(c["workload"], c["dtype"]): c for c in traffic["cases"]}
    code_cases = {(c["workload"], c["dtype"], c["vocab"]): c for c in code["cases"]}
    out = []
    for (workload, dtype), t_case in by_key.items():
        source = workload
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
               f"L2 re-read hits P(Poisson({L2_WAYS} x bytes in between / L2) < {L2_WAYS}) "
               f"({L2_WAYS}-way sets, Agarwal et al. 1989); whole-path SASS instructions; "
               f"spills served by L1 at {L1_BYTES_PER_CLOCK} B/clock/SM; "
               f"{LAUNCH_OVERHEAD_S * 1e6:.0f} us per kernel launch or small PyTorch operation "
               f"and {SYNC_S * 1e6:.0f} us per host synchronisation, charged apart from the "
               "kernels")
