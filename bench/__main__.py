"""``python -m bench``: fusedce against PyTorch and its peers on whatever device is present.

Writes ``bench/results/<device>/results.json`` (every figure, device and versions),
``results.md`` (the table) and PNG plots, and prints the table at the end.  Run with ``--help``
for the options; the defaults cover real vocabularies at token counts that fit the device (on
the CPU, scaled down so that the whole run takes a few minutes).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import torch

import fusedce

from . import report
from .contenders import CONTENDERS, package_version
from .harness import MODES, Cell, Result, copy_bandwidth, device_name, device_slug, run_contender

VOCABS = [32000, 50257, 128256, 151936, 262144]  # Llama-2, GPT-2, Llama-3, Qwen2.5, Gemma-3
GPU_TOKENS = [1024, 4096, 8192, 16384, 32768]
CPU_TOKENS = [256]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
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
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default bench/results/<device>)")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    for name, values, allowed in (("dtypes", args.dtypes, DTYPES), ("modes", args.modes, MODES),
                                  ("contenders", args.contenders, CONTENDERS)):
        unknown = [v for v in values if v not in allowed]
        if unknown:
            p.error(f"unknown {name}: {unknown}; choose from {list(allowed)}")
    return args


def versions(contenders: list[str]) -> dict[str, str | None]:
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "fusedce": fusedce.__version__}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    if torch.version.cuda:
        out["cuda"] = torch.version.cuda
    for name in contenders:
        pkg = CONTENDERS[name].package
        if pkg and pkg not in out and pkg != "fusedce":
            out[pkg] = package_version(pkg)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    vocabs = args.vocab or VOCABS
    tokens = args.tokens or (GPU_TOKENS if device.type == "cuda" else CPU_TOKENS)
    out = args.out or RESULTS / device_slug(device)
    out.mkdir(parents=True, exist_ok=True)

    runnable, skipped, loss_fns = [], {}, {}
    for name in args.contenders:
        why = CONTENDERS[name].unavailable(device)
        if why is None:
            try:
                loss_fns[name] = CONTENDERS[name].build()
                runnable.append(name)
                continue
            except Exception as exc:
                why = f"failed to set up: {type(exc).__name__}: {exc}".splitlines()[0]
        skipped[name] = why
    for name, why in skipped.items():
        print(f"skipping {name}: {why}", flush=True)

    bandwidth = copy_bandwidth(device)
    print(f"device: {device_name(device)}; copy bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)
    generator = torch.Generator().manual_seed(0)
    results: list[Result] = []
    started = time.perf_counter()
    for dtype_name in args.dtypes:
        for n_tokens in tokens:
            for vocab in vocabs:
                for mode in args.modes:
                    try:
                        cell = Cell(mode, DTYPES[dtype_name], n_tokens, vocab, device, generator)
                    except torch.OutOfMemoryError:
                        for name in runnable:
                            results.append(Result(mode, str(DTYPES[dtype_name])[6:], n_tokens,
                                                  vocab, name, "oom (inputs)"))
                        continue
                    cell_results = []
                    for name in runnable:
                        r = run_contender(cell, CONTENDERS[name], loss_fns[name], bandwidth)
                        cell_results.append(r)
                        print(f"{mode:15s} {dtype_name} {n_tokens:6d}x{vocab:<7d} {name:16s} "
                              f"{r.status if r.status != 'ok' else f'{r.ms:9.3f} ms'}",
                              flush=True)
                    eager = next((r for r in cell_results
                                  if r.contender == "torch-eager" and r.ms), None)
                    for r in cell_results:
                        if eager and r.ms:
                            r.speedup_vs_eager = eager.ms / r.ms
                    results.extend(cell_results)
                    del cell
                    if device.type == "cuda":
                        torch.cuda.empty_cache()

    meta = {
        "device": device_name(device),
        "device_type": device.type,
        "copy_bandwidth_gbps": round(bandwidth / 1e9, 2),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": versions(args.contenders),
        "threads": torch.get_num_threads(),
        "command": "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "duration_s": round(time.perf_counter() - started, 1),
        "timing": ("CUDA events, median (triton.testing.do_bench)" if device.type == "cuda"
                   else "wall clock, median of 5 after 1 warm-up"),
        "memory": ("torch.cuda.max_memory_allocated above the inputs" if device.type == "cuda"
                   else "peak resident set (VmHWM after clear_refs) above the resident set"),
        "skipped": skipped,
    }
    report.write_json(out / "results.json", meta, results)
    report.write_markdown(out / "results.md", meta, results)
    plots = [] if args.no_plots else report.write_plots(out, results)
    print()
    print(report.markdown_table(results))
    print(f"wrote {out / 'results.json'}, {out / 'results.md'}"
          + (f" and {len(plots)} plots" if plots else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
