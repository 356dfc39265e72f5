"""``python -m bench``: fusedce against PyTorch and its peers on whatever device is present.

Writes ``bench/results/<device>/results.json`` (every figure, device and versions),
``results.md`` (the table) and PNG plots, and prints the table at the end.  Run with ``--help``
for the options; the defaults cover real vocabularies at token counts that fit the device (on
the CPU, scaled down so that the whole run takes a few minutes).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import platform
import sys
import time
from pathlib import Path

import torch

import fusedce

from . import report
from .cells import MODES, Cell, Result, run_contender
from .contenders import CONTENDERS, package_version
from .device import device_name, device_slug
from .linear import LINEAR_CONTENDERS, LinearCell, parse_shape, run_linear
from .timing import copy_bandwidth

VOCABS = [32000, 50257, 128256, 151936, 262144]  # Llama-2, GPT-2, Llama-3, Qwen2.5, Gemma-3
GPU_TOKENS = [1024, 4096, 8192, 16384, 32768]
CPU_TOKENS = [256, 2048]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
# Fused linear cross-entropy: TOKENSxHIDDENxVOCAB.
GPU_LINEAR_SHAPES = [f"{n}x{h}x{v}" for n in (4096, 8192, 16384) for h in (2048, 4096)
                     for v in (128256, 262144)]
CPU_LINEAR_SHAPES = ["2048x512x32768"]
RESULTS = Path(__file__).resolve().parent / "results"


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--vocab", type=_ints, default=None, help=f"comma list (default {VOCABS})")
    p.add_argument("--tokens", type=_ints, default=None,
                   help=f"comma list (default GPU {GPU_TOKENS}, CPU {CPU_TOKENS})")
    p.add_argument("--dtypes", type=_names, default=["bf16", "fp32"],
                   help=f"comma list of {list(DTYPES)}")
    p.add_argument("--modes", type=_names, default=list(MODES), help=f"comma list of {list(MODES)}")
    p.add_argument("--contenders", type=_names, default=list(CONTENDERS),
                   help=f"comma list of {list(CONTENDERS)}")
    p.add_argument("--suites", type=_names, default=["ce", "linear", "comm", "model"],
                   help="ce (cross-entropy on logits), linear (fused linear cross-entropy), "
                        "comm (vocabulary-parallel bytes per token, gloo on this machine), "
                        "model (the static GPU performance model: bench/results/model)")
    p.add_argument("--linear-shapes", type=_names, default=None,
                   help="comma list of TOKENSxHIDDENxVOCAB (default GPU "
                        f"{GPU_LINEAR_SHAPES}, CPU {CPU_LINEAR_SHAPES})")
    p.add_argument("--linear-dtypes", type=_names, default=None,
                   help="comma list (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--linear-contenders", type=_names, default=list(LINEAR_CONTENDERS),
                   help=f"comma list of {list(LINEAR_CONTENDERS)}")
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default bench/results/<device>)")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    for name, values, allowed in (("dtypes", args.dtypes, DTYPES), ("modes", args.modes, MODES),
                                  ("contenders", args.contenders, CONTENDERS),
                                  ("suites", args.suites, ("ce", "linear", "comm", "model")),
                                  ("linear-dtypes", args.linear_dtypes or [], DTYPES),
                                  ("linear-contenders", args.linear_contenders,
                                   LINEAR_CONTENDERS)):
        unknown = [v for v in values if v not in allowed]
        if unknown:
            p.error(f"unknown {name}: {unknown}; choose from {list(allowed)}")
    return args


def _relative_to(cell_results: list[Result], baseline: str) -> None:
    """Fill each result's speed-up over the baseline contender of the same cell."""
    base = next((r for r in cell_results if r.contender == baseline and r.ms), None)
    for r in cell_results:
        if base and r.ms:
            r.speedup_vs_eager = base.ms / r.ms


def _set_up(table: dict, names: list[str], device: torch.device, skipped: dict[str, str],
            prefix: str) -> tuple[list[str], dict]:
    """Build the contenders that can run here; record why the others cannot."""
    runnable, fns = [], {}
    for name in names:
        why = table[name].unavailable(device)
        if why is None:
            try:
                fns[name] = table[name].build()
                runnable.append(name)
                continue
            except Exception as exc:
                why = f"failed to set up: {type(exc).__name__}: {exc}".splitlines()[0]
        skipped[prefix + name] = why
    return runnable, fns


def versions(contenders: list[str], linear_contenders: list[str]) -> dict[str, str | None]:
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "fusedce": fusedce.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    for contender in [CONTENDERS[n] for n in contenders] + [LINEAR_CONTENDERS[n]
                                                             for n in linear_contenders]:
        pkg = contender.package
        if pkg and pkg not in out and pkg != "fusedce":
            out[pkg] = package_version(pkg)
    return out


def _run_ce(args, device, tokens, vocabs, runnable, loss_fns, bandwidth, generator
            ) -> list[Result]:
    """The cross-entropy suite: every (dtype, tokens, vocab, mode) cell, every contender."""
    results: list[Result] = []
    for dtype_name, n_tokens, vocab, mode in itertools.product(args.dtypes, tokens, vocabs,
                                                               args.modes):
        try:
            cell = Cell(mode, DTYPES[dtype_name], n_tokens, vocab, device, generator)
        except torch.OutOfMemoryError:
            results += [Result(mode, str(DTYPES[dtype_name])[6:], n_tokens, vocab, name,
                               "oom (inputs)") for name in runnable]
            continue
        cell_results = []
        for name in runnable:
            r = run_contender(cell, CONTENDERS[name], loss_fns[name], bandwidth)
            cell_results.append(r)
            print(f"{mode:15s} {dtype_name} {n_tokens:6d}x{vocab:<7d} {name:16s} "
                  f"{r.status if r.status != 'ok' else f'{r.ms:9.3f} ms'}", flush=True)
        _relative_to(cell_results, "torch-eager")
        results.extend(cell_results)
        del cell
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def _run_linear(args, device, runnable, loss_fns, generator) -> list[Result]:
    """The fused linear suite: every (dtype, shape) cell, every contender."""
    shapes = args.linear_shapes or (GPU_LINEAR_SHAPES if device.type == "cuda"
                                     else CPU_LINEAR_SHAPES)
    dtypes = args.linear_dtypes or (["bf16"] if device.type == "cuda" else ["fp32"])
    results: list[Result] = []
    for dtype_name, shape in itertools.product(dtypes if runnable else [], shapes):
        tokens, hidden, vocab = parse_shape(shape)
        try:
            cell = LinearCell(tokens, hidden, vocab, DTYPES[dtype_name], device, generator)
        except torch.OutOfMemoryError:
            continue
        cell_results = []
        for name in runnable:
            r = run_linear(cell, LINEAR_CONTENDERS[name], loss_fns[name])
            cell_results.append(r)
            print(f"linear {dtype_name} {shape:18s} {name:18s} "
                  f"{r.status if r.status != 'ok' else f'{r.ms:9.1f} ms'}", flush=True)
        _relative_to(cell_results, "unfused")
        results.extend(cell_results)
        del cell
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def _run_comm(vocabs, out: Path | None) -> list[dict]:
    from . import comm

    print("measuring vocabulary-parallel communication (gloo)...", flush=True)
    rows = comm.measure(vocabs, out_dir=out)
    for r in rows:
        if r.get("kind") == "linear":
            print(f"comm world {r['world']} vocab {r['vocab']:7d} fused head "
                  f"{r['fused_bytes_per_token']:8.1f} B/token (sequence-parallel "
                  f"{r['fused-sp_bytes_per_token']:.1f}), gather logits "
                  f"{r['gather-logits_bytes_per_token']:10.1f}, gather weight "
                  f"{r['gather-weight_bytes_per_token']:10.1f} B/token", flush=True)
            continue
        print(f"comm world {r['world']} vocab {r['vocab']:7d} accuracy {r['accuracy']!s:5s} "
              f"fusedce {r['fusedce_bytes_per_token']:8.1f} B/token, gather "
              f"{r['gather_bytes_per_token']:10.1f} B/token", flush=True)
    return rows


def _meta(args, argv, device, bandwidth, started, skipped) -> dict:
    cuda = device.type == "cuda"
    return {
        "device": device_name(device),
        "device_type": device.type,
        "copy_bandwidth_gbps": round(bandwidth / 1e9, 2),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": versions(args.contenders, args.linear_contenders),
        "threads": torch.get_num_threads(),
        "command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "duration_s": round(time.perf_counter() - started, 1),
        "timing": ("CUDA events, median (triton.testing.do_bench)" if cuda
                   else "wall clock after 1 warm-up, median of at least 5 calls (cross-entropy "
                        "cells) or 3 (fused linear cells), repeated up to 50 calls while the "
                        "timed calls add up to under 0.5 s"),
        "memory": ("torch.cuda.max_memory_allocated above the inputs" if cuda
                   else "peak resident set (VmHWM after clear_refs) above the resident set"),
        "skipped": skipped,
        **({} if cuda else {"fusedce_cpu_compile_s": round(_cpu_compile_s(), 1)}),
    }


def _cpu_compile_s() -> float:
    """Seconds fusedce spent compiling its fused CPU loops in this run (once per dtype; the
    warm-up call of each cell pays it, the timed calls do not)."""
    from fusedce import cpu_fused

    return cpu_fused.compile_seconds()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vocabs = args.vocab or VOCABS
    tokens = args.tokens or (GPU_TOKENS if device.type == "cuda" else CPU_TOKENS)
    out = args.out or RESULTS / device_slug(device)
    out.mkdir(parents=True, exist_ok=True)

    skipped: dict[str, str] = {}
    runnable, loss_fns = _set_up(CONTENDERS, args.contenders if "ce" in args.suites else [],
                                 device, skipped, "")
    linear_runnable, linear_fns = _set_up(
        LINEAR_CONTENDERS, args.linear_contenders if "linear" in args.suites else [], device,
        skipped, "linear:")
    for name, why in skipped.items():
        print(f"skipping {name}: {why}", flush=True)

    bandwidth = copy_bandwidth(device)
    print(f"device: {device_name(device)}; copy bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)
    generator = torch.Generator().manual_seed(0)
    started = time.perf_counter()
    results = _run_ce(args, device, tokens, vocabs, runnable, loss_fns, bandwidth, generator)
    results += _run_linear(args, device, linear_runnable, linear_fns, generator)
    comm_rows = _run_comm(vocabs, None if args.no_plots else out) if "comm" in args.suites else []

    if "model" in args.suites:
        from .model.__main__ import DEFAULT_OUT
        from .model.__main__ import run as run_model

        print("static performance model (interpreter traffic, sm_90 code)...", flush=True)
        run_model(DEFAULT_OUT)
        print(f"wrote {DEFAULT_OUT}", flush=True)
    if not {"ce", "linear", "comm"} & set(args.suites):
        return 0
    meta = _meta(args, argv, device, bandwidth, started, skipped)
    report.write_json(out / "results.json", meta, results, comm_rows)
    report.write_markdown(out / "results.md", meta, results, comm_rows)
    plots = [] if args.no_plots else report.write_plots(out, results)
    print()
    print(report.markdown_table(results))
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}"
          + (f" and {len(plots)} plots" if plots else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
