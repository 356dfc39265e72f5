"""The model's Markdown tables and plot."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

HEADLINE = {"dtype": "bfloat16", "tokens": 8192, "vocab": 128256}


def _rows(data: dict, **match) -> list[dict]:
    return [p for p in data["predictions"] if all(p[k] == v for k, v in match.items())]


def headline_table(data: dict) -> str:
    """Mode x contender at bf16, 8192 x 128256: bytes, whole-path instructions and EX2 per
    logit, spills, launches, and the predicted time on each GPU split into the kernels' part
    and the launches' and host syncs' part, with its share of the copy-bandwidth floor."""
    gpus = [g["name"] for g in data["meta"]["gpus"]]
    head = ("| workload | HBM B/logit | SASS instr/logit | EX2/logit | spills (B) | "
            "launches + small ops + syncs | "
            + " | ".join(f"{g} kernels + launches/syncs = ms (% of copy floor)" for g in gpus)
            + " |")
    lines = [head, "|" + "---|" * (6 + len(gpus))]
    names = list(dict.fromkeys(p["workload"] for p in data["predictions"]))
    for name in names:
        by_gpu = {p["gpu"]: p for p in _rows(data, workload=name, **HEADLINE)}
        if not by_gpu:
            few = [p for p in _rows(data, workload=name, dtype="bfloat16", vocab=128256)]
            by_gpu = {p["gpu"]: p for p in few}
        if not by_gpu:
            continue
        p = next(iter(by_gpu.values()))
        lines.append(
            f"| {name}{' (64 tokens)' if p['tokens'] == 64 else ''} | "
            f"{p['hbm_bytes_per_logit']:.2f} | {p['instructions_per_logit']:.1f} | "
            f"{p['ex2_per_logit']:.2f} | {p['spill_bytes']} | "
            f"{p['kernel_launches']} + {p['small_torch_ops']} + {p['host_syncs']} | "
            + " | ".join(_split_time(by_gpu[g]) if g in by_gpu else "—" for g in gpus) + " |")
    return "\n".join(lines) + "\n"


LINEAR_NAMES = {"unfused": "unfused (PyTorch eager)",
                "torch_chunked": "PyTorch chunked F.linear_cross_entropy",
                "liger": "Liger-Kernel fused linear CE", "cce": "Cut Cross-Entropy",
                "fusedce_rows": "fusedce, 'rows' policy (float32 heads)",
                "fusedce_vocab": "fusedce, 'vocab' policy (default for 16-bit heads)",
                "fusedce_vocab_all": "fusedce, 'vocab' policy, chunk_bytes keeping all logits"}


def linear_table(data: dict, shapes: list[tuple[int, int, int]] | None = None,
                 gpus: list[str] | None = None) -> str:
    """The fused linear loss (forward + backward, bf16) per contender: predicted time, its ratio
    to the GEMM floor, peak extra memory; published measurements beside where they exist."""
    if "linear" not in data:
        return ""
    rows = []
    published = {(m["contender"], m["tokens"], m["hidden"], m["vocab"]): m
                 for m in data["linear"]["published"]}
    for p in data["linear"]["predictions"]:
        shape = (p["tokens"], p["hidden"], p["vocab"])
        if (shapes and shape not in shapes) or (gpus and p["gpu"] not in gpus):
            continue
        m = published.get((p["contender"], *shape)) if p["gpu"].startswith("H100") else None
        rows.append([f"{p['tokens']} x {p['hidden']} x {p['vocab']}", p["gpu"],
                     LINEAR_NAMES.get(p["contender"], p["contender"]),
                     f"{p['predicted_ms']:.1f}", f"{p['gemm_floor_ms']:.1f}",
                     f"{p['ratio_to_floor']:.2f}x", f"{p['peak_extra_gib']:.2f}",
                     f"{m['ms']:.0f} ms, {m['gib']} GiB ({m['source']})" if m else "—"])
    return _table(["tokens x hidden x vocab", "GPU", "contender", "predicted ms (model)",
                   "GEMM floor ms", "ratio to floor", "peak extra GiB (model)",
                   "published measurement"], rows)


def vocab_parallel_table(data: dict) -> str:
    """The vocabulary-parallel fused head per rank (model)."""
    rows = [[p["ranks"], p["gpu"], "yes" if p["sequence_parallel"] else "no",
             f"{p['compute_ms']:.1f}", f"{p['comm_ms']:.2f}", f"{p['predicted_ms']:.1f}",
             f"{p['single_gpu_floor_ms']:.1f}", f"{p['ring_bytes_sent_per_token']:.0f}",
             f"{p['peak_extra_gib']:.2f}"]
            for p in data.get("linear", {}).get("vocab_parallel", [])]
    if not rows:
        return ""
    return _table(["ranks", "GPU", "sequence parallel", "compute ms", "collectives ms",
                   "predicted ms per rank", "one-GPU GEMM floor ms", "bytes sent per token",
                   "peak extra GiB"], rows)


def _split_time(p: dict) -> str:
    overhead = p["launch_ms"] + p["sync_ms"]
    return (f"{p['kernel_ms']:.3f} + {overhead:.3f} = {p['predicted_ms']:.3f} "
            f"({p['pct_of_copy_floor']:.0f}%)")


def lead(data: dict, ours: str, theirs: str, **match) -> dict:
    """Where one contender's predicted lead over another comes from: the kernels' part and
    the launches' and syncs' part, in ms (positive: ``ours`` is faster)."""
    a = _rows(data, workload=ours, **match)[0]
    b = _rows(data, workload=theirs, **match)[0]
    return {"kernels_ms": round(b["kernel_ms"] - a["kernel_ms"], 4),
            "launches_syncs_ms": round(b["launch_ms"] + b["sync_ms"] - a["launch_ms"]
                                       - a["sync_ms"], 4)}


def _table(head: list[str], rows: list[list]) -> str:
    """A Markdown table: one header, one line per row of cells."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _all_shapes_table(data: dict) -> str:
    head = ["workload", "dtype", "tokens", "vocab", "GPU", "HBM B/logit", "instr/logit",
            "EX2/logit", "spill B/logit", "launches", "small ops", "logits-sized torch ops",
            "syncs", "kernels ms", "launches + syncs ms", "predicted ms", "% of copy floor"]
    return _table(head, [
        [p["workload"], p["dtype"], p["tokens"], p["vocab"], p["gpu"],
         f"{p['hbm_bytes_per_logit']:.2f}", f"{p['instructions_per_logit']:.1f}",
         f"{p['ex2_per_logit']:.2f}", f"{p['local_bytes_per_logit']:.1f}",
         p["kernel_launches"], p["small_torch_ops"],
         ", ".join(p["logits_sized_torch_ops"]) or "—", p["host_syncs"],
         f"{p['kernel_ms']:.3f}", f"{p['launch_ms'] + p['sync_ms']:.3f}",
         f"{p['predicted_ms']:.3f}", f"{p['pct_of_copy_floor']:.0f}%"]
        for p in data["predictions"]])


def _code_table(data: dict) -> str:
    """One row per distinct compiled launch at the headline shapes (H100 occupancy)."""
    head = ["workload", "dtype", "vocab", "kernel", "warps", "registers", "spills (B)",
            "ptxas stack / spill stores / loads (B)",
            "programs/SM", "rows in flight (MB)", "L2 hit", "loop bodies: instr/elem, EX2/elem",
            "whole path: instr/logit, EX2/logit, spill B/logit", "bound",
            "loads", "stores"]
    rows, seen = [], set()
    for p in data["predictions"]:
        if p["gpu"] != data["meta"]["gpus"][0]["name"] or p["tokens"] not in (64, 8192):
            continue
        for launch in p["launches"]:
            key = (p["workload"], p["dtype"], p["vocab"], launch["kernel"], str(launch["loops"]))
            if key in seen:
                continue
            seen.add(key)
            loops = launch["loops"]
            rows.append([p["workload"], p["dtype"], p["vocab"], launch["kernel"],
                         launch["num_warps"], launch["registers"], launch["spill_bytes"],
                         "/".join(str(launch.get("ptxas_spills", {}).get(k, "—"))
                                  for k in ("stack", "spill_stores", "spill_loads")),
                         launch["programs_per_sm"], launch["in_flight_mb"], launch["l2_hit"],
                         "; ".join(f"{lp['instructions']:.1f}, {lp['ex2']:.2f}"
                                   for lp in loops) or "—",
                         f"{launch['instructions_per_logit']:.1f}, {launch['ex2_per_logit']:.2f}, "
                         f"{launch['local_bytes_per_logit']:.1f}", launch["bound"],
                         ", ".join(sorted({w for lp in loops for w in lp["loads"]})) or "—",
                         ", ".join(sorted({w for lp in loops for w in lp["stores"]})) or "—"])
    return _table(head, rows)


def _traffic_table(data: dict) -> str:
    """Bytes per logit counted in the interpreter, by launch and class."""
    head = ["workload", "dtype", "launch", "first read", "same-program re-read",
            "later-launch re-read", "write", "small bytes/row"]
    rows = []
    for case in data["traffic"]:
        n = case["rows"] * case["cols"]
        for launch in case["launches"]:
            big = set(launch["big_args"])
            stores = sum(v for k, v in launch["stores"].items() if k in big)
            small = (sum(launch["loads"].values()) + sum(launch["stores"].values())
                     - sum(v for k, v in launch["loads"].items() if k in big) - stores)
            r = launch["reads"]
            rows.append([case["workload"], case["dtype"], launch["kernel"],
                         f"{r.get('first', 0) / n:.2f}", f"{r.get('same_program', 0) / n:.2f}",
                         f"{r.get('later_launch', 0) / n:.2f}", f"{stores / n:.2f}",
                         f"{small / case['rows']:.0f}"])
    return _table(head, rows)


def markdown(data: dict) -> str:
    meta = data["meta"]
    gpus = "; ".join(f"{g['name']}: {g['sms']} SMs, {g['clock_hz'] / 1e9:.2f} GHz, "
                     f"{g['hbm_bytes_per_s'] / 1e12:.2f} TB/s HBM, {g['l2_bytes'] / 1e6:.0f} MB L2"
                     for g in meta["gpus"])
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items() if v)
    parts = [
        "# fusedce static performance model",
        "",
        f"**{meta['what']}.** Generated {meta['date']} by `python -m bench --suites model` "
        f"({versions}); code compiled for {meta['target']}. Hardware ({gpus}) from the "
        "datasheets and the Hopper whitepaper (`bench/model/hardware.py`); assumptions: "
        f"{meta['assumptions']}. Traffic counted in Triton's interpreter at "
        f"{meta['traffic_shape']['rows']} x {meta['traffic_shape']['cols']} "
        f"({meta['traffic_shape']['few_rows']} rows for the split path) with the headline's "
        "launch plan, per logit.",
        "",
        "## Headline: bf16, 8192 tokens x 128256 classes",
        "",
        headline_table(data),
        "## The LM head: fused linear cross-entropy, forward + backward, bf16 (model)",
        "",
        "Each contender's operations at each shape (`bench/model/linear.py`): "
        + (data["linear"]["assumptions"] if "linear" in data else "") + ".",
        "",
        linear_table(data),
        "### Vocabulary-parallel fused head, 8192 x 4096 x 151936, per rank (model)",
        "",
        "Each rank's tiled pass over its share of the classes, the statistics' all-reduces and "
        "grad_input's float32 all-reduce (or, with sequence parallelism, the hidden states' "
        "all-gather and the gradient's reduce-scatter in bf16), ring collectives over NVLink 4 "
        "(450 GB/s each way) with 10 us each; the bytes a rank sends per token (ring).",
        "",
        vocab_parallel_table(data),
        "## Every shape",
        "",
        _all_shapes_table(data),
        "## Code of each launch (sm_90, H100 occupancy, 8192 tokens; 64 for few rows)",
        "",
        _code_table(data),
        "## Traffic per logit, counted in the interpreter",
        "",
        _traffic_table(data),
    ]
    if meta.get("liger_missing"):
        parts += [f"Liger-Kernel not analysed: {meta['liger_missing']}.", ""]
    return "\n".join(parts)


def plot(data: dict, path: Path) -> None:
    """Predicted share of the copy floor against vocabulary, forward + backward, bf16,
    8192 tokens, one line per workload and GPU."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    series = defaultdict(list)
    for p in data["predictions"]:
        if p["dtype"] == "bfloat16" and p["tokens"] == 8192 and p["workload"].split(":")[1] in (
                "fwd_bwd", "fwd", "fwd_bwd_scaled", "fwd_bwd_scaled_recompute"):
            series[(p["workload"], p["gpu"])].append((p["vocab"], p["pct_of_copy_floor"]))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for (workload, gpu), points in sorted(series.items()):
        points.sort()
        style = "-" if workload.startswith("fusedce") else "--"
        ax.plot([v for v, _ in points], [pct for _, pct in points], style, marker="o",
                label=f"{workload} ({gpu})")
    ax.set_xlabel("vocabulary size")
    ax.set_ylabel("predicted % of copy-bandwidth floor")
    ax.set_title("Static model (not a measurement): bf16, 8192 tokens")
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
