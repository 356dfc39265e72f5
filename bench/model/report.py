"""The model's Markdown tables and plot."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

HEADLINE = {"dtype": "bfloat16", "tokens": 8192, "vocab": 128256}


def _rows(data: dict, **match) -> list[dict]:
    return [p for p in data["predictions"] if all(p[k] == v for k, v in match.items())]


def headline_table(data: dict) -> str:
    """Mode x contender at bf16, 8192 x 128256: bytes, instructions and EX2 per logit, the
    predicted time on each GPU and its share of the copy-bandwidth floor."""
    gpus = [g["name"] for g in data["meta"]["gpus"]]
    head = ("| workload | HBM B/logit | SASS instr/logit | EX2/logit | small torch ops | "
            + " | ".join(f"{g} ms (% of copy floor)" for g in gpus) + " |")
    lines = [head, "|" + "---|" * (5 + len(gpus))]
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
            f"{p['ex2_per_logit']:.1f} | {p['small_torch_ops']} | "
            + " | ".join(f"{by_gpu[g]['predicted_ms']:.3f} ({by_gpu[g]['pct_of_copy_floor']:.0f}%)"
                         if g in by_gpu else "—" for g in gpus) + " |")
    return "\n".join(lines) + "\n"


def _table(head: list[str], rows: list[list]) -> str:
    """A Markdown table: one header, one line per row of cells."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _all_shapes_table(data: dict) -> str:
    head = ["workload", "dtype", "tokens", "vocab", "GPU", "HBM B/logit", "instr/logit",
            "EX2/logit", "launches", "small ops", "logits-sized torch ops", "syncs",
            "predicted ms", "% of copy floor"]
    return _table(head, [
        [p["workload"], p["dtype"], p["tokens"], p["vocab"], p["gpu"],
         f"{p['hbm_bytes_per_logit']:.2f}", f"{p['instructions_per_logit']:.1f}",
         f"{p['ex2_per_logit']:.1f}", p["kernel_launches"], p["small_torch_ops"],
         ", ".join(p["logits_sized_torch_ops"]) or "—", p["host_syncs"],
         f"{p['predicted_ms']:.3f}", f"{p['pct_of_copy_floor']:.0f}%"]
        for p in data["predictions"]])


def _code_table(data: dict) -> str:
    """One row per distinct compiled launch at the headline shapes (H100 occupancy)."""
    head = ["workload", "dtype", "vocab", "kernel", "warps", "registers", "spills (B)",
            "programs/SM", "rows in flight (MB)", "L2 hit", "loops: instr/elem, EX2/elem",
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
                         launch["programs_per_sm"], launch["in_flight_mb"], launch["l2_hit"],
                         "; ".join(f"{lp['instructions']:.1f}, {lp['ex2']:.2f}"
                                   for lp in loops) or "—",
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
                     f"{g['hbm_bytes_per_s'] / 1e12:.2f} TB/s HBM, {g['l2_bytes'] >> 20} MB L2"
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
