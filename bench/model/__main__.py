"""``python -m bench.model [--out DIR]`` (also ``python -m bench --suites model``): collect the
traffic (interpreter) and the code (offline sm_90 compile) in two subprocesses, combine them
into predictions, and write ``model.json``, ``model.md`` and ``model.png`` (default
``bench/results/model/``)."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from . import linear, report
from .hardware import GPUS
from .roofline import ASSUMPTIONS, predictions

DEFAULT_OUT = Path(__file__).resolve().parent.parent / "results" / "model"


def _collect(what: str, path: str) -> dict:
    env = dict(os.environ, TRITON_DEFAULT_FP_FUSION="1")
    env.pop("TRITON_INTERPRET", None)
    if what == "traffic":
        env["TRITON_INTERPRET"] = "1"
    root = Path(__file__).resolve().parent.parent.parent
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    subprocess.run([sys.executable, "-m", "bench.model.collect", what, path], env=env,
                   check=True, cwd=root)
    with open(path) as f:
        return json.load(f)


def run(out: Path) -> dict:
    """The whole model: collect, combine, write; returns what model.json holds."""
    with tempfile.TemporaryDirectory() as tmp:
        traffic = _collect("traffic", os.path.join(tmp, "traffic.json"))
        code = _collect("code", os.path.join(tmp, "code.json"))
    import triton

    data = {
        "meta": {
            "what": "a static performance model, not a GPU measurement",
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "versions": {"torch": torch.__version__, "triton": triton.__version__,
                         "liger-kernel": _version("liger-kernel")},
            "target": "sm_90 (offline compile with the JIT's specialisation)",
            "gpus": [g.__dict__ | {"copy_bytes_per_s": g.copy_bytes_per_s} for g in GPUS],
            "assumptions": ASSUMPTIONS,
            "traffic_shape": {k: traffic[k] for k in ("rows", "few_rows", "cols")},
            "liger_missing": traffic["liger_missing"],
        },
        "predictions": predictions(traffic, code),
        # The LM head as a whole (fused linear cross-entropy), modelled from each contender's
        # operations (bench/model/linear.py), with published measurements beside it.
        "linear": {"assumptions": linear.ASSUMPTIONS, "predictions": linear.predictions(),
                   "published": linear.PUBLISHED,
                   "vocab_parallel": linear.vocab_parallel_predictions()},
        "traffic": traffic["cases"],
        "kernels": code["kernels"],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.json").write_text(json.dumps(data, indent=1) + "\n")
    (out / "model.md").write_text(report.markdown(data))
    report.plot(data, out / "model.png")
    return data


def _version(name: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.model", description=__doc__)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    data = run(args.out)
    print(report.headline_table(data))
    print(f"wrote {args.out / 'model.json'}, {args.out / 'model.md'}, {args.out / 'model.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
