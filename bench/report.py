"""Writing benchmark results: JSON with every figure, a Markdown table, PNG plots."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from .cells import MODES, Result


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def markdown_table(results: list[Result]) -> str:
    """One row per (cell, contender), cells in run order; linear workloads in a table of their
    own."""
    linear = [r for r in results if r.hidden is not None]
    plain = [r for r in results if r.hidden is None]
    text = _ce_table(plain) if plain else ""
    if linear:
        text += ("\n" if text else "") + _linear_table(linear)
    return text


def _linear_table(results: list[Result]) -> str:
    head = ("| tokens | hidden | vocab | dtype | contender | ms | TFLOP/s | peak extra MiB | "
            "vs unfused | loss err | grad err | note |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        note = "" if r.status == "ok" else r.status
        lines.append(
            f"| {r.tokens} | {r.hidden} | {r.vocab} | {r.dtype} | {r.contender} | "
            f"{_fmt(r.ms, '.1f')} | {_fmt(r.tflops, '.2f')} | {_fmt(r.peak_extra_mib, '.0f')} | "
            f"{_fmt(r.speedup_vs_eager, '.2f')}{'' if r.speedup_vs_eager is None else '×'} | "
            f"{_fmt(r.loss_err, '.1e')} | {_fmt(r.grad_err, '.1e')} | {note} |"
        )
    return "\n".join(lines) + "\n"


def _ce_table(results: list[Result]) -> str:
    head = ("| mode | dtype | tokens | vocab | contender | ms | GB/s | % copy BW | "
            "peak extra MiB | % of logits | vs eager | loss err | grad err | note |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        note = "" if r.status == "ok" else r.status
        if r.compile_s is not None and r.compile_s >= 0.05:  # 0: no recompilation was needed
            note = (note + " " if note else "") + f"compile {r.compile_s:.1f} s"
        lines.append(
            f"| {r.mode} | {r.dtype} | {r.tokens} | {r.vocab} | {r.contender} | "
            f"{_fmt(r.ms, '.3f')} | {_fmt(r.gbps, '.1f')} | {_fmt(r.pct_copy_bw, '.1f')} | "
            f"{_fmt(r.peak_extra_mib, '.0f')} | {_fmt(r.peak_extra_pct_logits, '.1f')} | "
            f"{_fmt(r.speedup_vs_eager, '.2f')}{'' if r.speedup_vs_eager is None else '×'} | "
            f"{_fmt(r.loss_err, '.1e')} | {_fmt(r.grad_err, '.1e')} | {note} |"
        )
    return "\n".join(lines) + "\n"


def write_json(path: Path, meta: dict, results: list[Result], comm: list[dict]) -> None:
    payload = {"meta": meta, "results": [r.__dict__ for r in results], "comm": comm}
    path.write_text(json.dumps(payload, indent=1) + "\n")


def comm_table(comm: list[dict]) -> str:
    head = ("| ranks | vocab | accuracy | fusedce bytes/token | gather-logits bytes/token | "
            "ratio |")
    lines = [head, "|---|---|---|---|---|---|"]
    linear = [r for r in comm if r.get("kind") == "linear"]
    for r in (r for r in comm if r.get("kind") != "linear"):
        ratio = r["gather_bytes_per_token"] / max(r["fusedce_bytes_per_token"], 1e-9)
        lines.append(f"| {r['world']} | {r['vocab']} | {r['accuracy']} | "
                     f"{r['fusedce_bytes_per_token']:.0f} | {r['gather_bytes_per_token']:.0f} | "
                     f"{ratio:.0f}× |")
    if linear:
        lines += ["", "Fused LM head (hidden size and tokens per row; bf16; per rank):", "",
                  "| ranks | vocab | hidden | tokens | fusedce vocab-parallel | fusedce "
                  "sequence-parallel | gather logits | gather weight |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in linear:
            lines.append(
                f"| {r['world']} | {r['vocab']} | {r['hidden']} | {r['tokens']} | "
                f"{r['fused_bytes_per_token']:.0f} | {r['fused-sp_bytes_per_token']:.0f} | "
                f"{r['gather-logits_bytes_per_token']:.0f} | "
                f"{r['gather-weight_bytes_per_token']:.0f} |")
    return "\n".join(lines) + "\n"


def worst_ratios(results: list[Result]) -> list[str]:
    """Per mode and dtype, fusedce's worst speed against eager ``F.cross_entropy`` (time of
    eager / time of fusedce, over tokens and vocabularies) and against ``torch.compile``, with
    the cell where it happens."""
    times = {(r.mode, r.dtype, r.tokens, r.vocab, r.contender): r.ms for r in results
             if r.status == "ok" and r.hidden is None and r.ms}
    rows = []
    for mode, dtype in sorted({(k[0], k[1]) for k in times}):
        cells = [(k[2], k[3]) for k in times if k[:2] == (mode, dtype) and k[4] == "fusedce"]
        parts = []
        for rival in ("torch-eager", "torch-compile"):
            ratios = [(times[(mode, dtype, t, v, rival)] / times[(mode, dtype, t, v, "fusedce")],
                       t, v) for t, v in cells if (mode, dtype, t, v, rival) in times]
            if ratios:
                ratio, t, v = min(ratios)
                parts.append(f"{ratio:.2f}x ({t} x {v})")
            else:
                parts.append("—")
        if cells:
            rows.append(f"| {mode} | {dtype} | {parts[0]} | {parts[1]} |")
    if not rows:
        return []
    return ["fusedce's worst speed against each rival (its time / fusedce's; above 1 is "
            "faster), per mode and dtype, and the cell (tokens x vocab):", "",
            "| mode | dtype | vs eager | vs torch.compile |", "|---|---|---|---|", *rows, ""]


def write_markdown(path: Path, meta: dict, results: list[Result], comm: list[dict]) -> None:
    lines = [f"# fusedce benchmark: {meta['device']}", ""]
    lines += [f"- {key}: {value}" for key, value in meta.items() if key != "skipped"]
    if meta.get("skipped"):
        lines += ["- skipped contenders:"]
        lines += [f"  - {name}: {why}" for name, why in meta["skipped"].items()]
    lines += ["", "Modes: " + "; ".join(f"`{k}` {v}" for k, v in MODES.items()), ""]
    lines += worst_ratios(results)
    lines += [markdown_table(results)]
    if comm:
        lines += ["Vocabulary-parallel communication (bf16 logits, forward + backward, measured "
                  "payload handed to collectives, per token per rank):", "", comm_table(comm)]
    path.write_text("\n".join(lines))


def write_plots(folder: Path, results: list[Result]) -> list[Path]:
    """Time and peak memory against vocabulary size, one line per contender.

    One PNG per (dtype, tokens), a row of two panels per mode.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    groups: dict[tuple[str, int], list[Result]] = defaultdict(list)
    for r in results:
        if r.status == "ok" and r.hidden is None:
            groups[(r.dtype, r.tokens)].append(r)
    # One colour per contender in every panel of every plot of the run.
    names = sorted({r.contender for rows in groups.values() for r in rows})
    colors = {name: f"C{i % 10}" for i, name in enumerate(names)}
    written = []
    for (dtype, tokens), rows in sorted(groups.items()):
        modes = [m for m in MODES if any(r.mode == m for r in rows)]
        fig, axes = plt.subplots(len(modes), 2, figsize=(11, 3.2 * len(modes)), squeeze=False)
        for i, mode in enumerate(modes):
            by_contender: dict[str, list[Result]] = defaultdict(list)
            for r in rows:
                if r.mode == mode:
                    by_contender[r.contender].append(r)
            for name, points in sorted(by_contender.items()):
                points.sort(key=lambda r: r.vocab)
                vocab = [r.vocab for r in points]
                axes[i][0].plot(vocab, [r.ms for r in points], marker="o", label=name,
                                color=colors[name])
                if all(r.peak_extra_mib is not None for r in points):
                    axes[i][1].plot(vocab, [r.peak_extra_mib for r in points], marker="o",
                                    label=name, color=colors[name])
            axes[i][0].set_title(f"{mode}: time")
            axes[i][0].set_ylabel("ms (median)")
            axes[i][1].set_title(f"{mode}: peak memory above inputs")
            axes[i][1].set_ylabel("MiB")
            for ax in axes[i]:
                ax.set_xlabel("vocabulary size")
                ax.grid(alpha=0.3)
            axes[i][0].legend(fontsize=7)
        fig.suptitle(f"{dtype}, {tokens} tokens")
        fig.tight_layout()
        path = folder / f"{dtype}_{tokens}tok.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written
