"""The model's two measurements, each in a process of its own (Triton decides at import whether
kernels are interpreted):

    TRITON_INTERPRET=1 python -m bench.model.collect traffic OUT.json
    python -m bench.model.collect code OUT.json

``traffic`` runs every workload at a small shape in the interpreter with the headline's launch
plan (one program per row, or the vocabulary split for few rows) and counts its bytes;
``code`` captures every workload's launches at the headline shapes and compiles them for sm_90.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import torch

from .workloads import WORKLOADS, liger_available, make_inputs

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
VOCABS = [32000, 50257, 128256, 151936, 262144]
SMS = 132  # the H100's and H200's SM count: the launch heuristic plans for it
# Traffic shapes: rows x cols small enough for the interpreter; fusedce's tiling forced to the
# headline's plan (one program per row; three vocabulary chunks for few rows).
TRAFFIC_ROWS, TRAFFIC_FEW_ROWS, TRAFFIC_COLS, TRAFFIC_BLOCK = 7, 3, 12000, 2048


def _workloads():
    missing = liger_available()
    return [w for w in WORKLOADS if w.contender == "fusedce" or missing is None], missing


def _plan_for_headline(force: dict | None):
    """Make fusedce's launch heuristic plan for an H100 (and, with ``force``, use the given
    tiling whatever the shape)."""
    import fusedce.kernels
    import fusedce.kernels.cross_entropy as ce

    fusedce.kernels.INTERPRETED = True  # let impl="triton" take CPU tensors
    ce._num_sms = lambda device: SMS
    real = ce.launch_config.__wrapped__ if hasattr(ce.launch_config, "__wrapped__") \
        else ce.launch_config

    def planned(n_rows, n_cols, device, *, block_size=None, n_splits=None,
                batch_invariant=False, **mode):
        if force:
            block_size = block_size or force["block_size"]
            if not batch_invariant:  # (an invariant plan never splits by the row count)
                n_splits = n_splits or force["n_splits"]
        return real(n_rows, n_cols, device, block_size=block_size, n_splits=n_splits,
                    batch_invariant=batch_invariant, **mode)

    planned.__wrapped__ = real
    ce.launch_config = planned


def collect_traffic() -> dict:
    from .traffic import count_step

    workloads, missing = _workloads()
    out = {"rows": TRAFFIC_ROWS, "few_rows": TRAFFIC_FEW_ROWS, "cols": TRAFFIC_COLS,
           "liger_missing": missing, "cases": []}
    generator = torch.Generator().manual_seed(0)
    for workload in workloads:
        for dtype_name, dtype in DTYPES.items():
            rows = TRAFFIC_FEW_ROWS if workload.few_rows else TRAFFIC_ROWS
            _plan_for_headline({"block_size": TRAFFIC_BLOCK,
                                "n_splits": 3 if workload.few_rows else 1})
            x, target = make_inputs(workload, rows, TRAFFIC_COLS, dtype, generator)
            go = workload.grad_output(rows, dtype)
            probe = count_step(lambda: workload.step(x, target, go), rows * TRAFFIC_COLS // 2)
            out["cases"].append({
                "workload": workload.name, "dtype": dtype_name, "rows": rows,
                "cols": TRAFFIC_COLS,
                "launches": [{"kernel": launch.kernel, "grid": list(launch.grid),
                              "loads": dict(launch.loads), "stores": dict(launch.stores),
                              "reads": dict(launch.reads), "big_args": sorted(launch.big_args)}
                             for launch in probe.launches],
                "torch_ops": dict(probe.ops), "logits_sized_torch_ops": probe.big_ops,
                "host_syncs": probe.syncs,
            })
            print(f"traffic {workload.name:40s} {dtype_name}: {len(probe.launches)} launches",
                  flush=True)
    return out


def _install_recorders(launches: list) -> None:
    import fusedce.kernels.cross_entropy as ce

    from .code import Recorder

    for name in ("ce_fwd_kernel", "ce_stats_kernel", "ce_bwd_kernel", "ce_scale_kernel",
                 "ce_reduce_kernel"):
        setattr(ce, name, Recorder(getattr(ce, name), launches))
    import fusedce.kernels.distill as kd
    import fusedce.kernels.soft as soft

    for module in (kd, soft):
        for name in dir(module):
            if name.endswith("_kernel"):
                setattr(module, name, Recorder(getattr(module, name), launches))
    if liger_available() is None:
        import liger_kernel.ops.cross_entropy as lce

        for name in ("liger_cross_entropy_kernel", "element_mul_kernel"):
            setattr(lce, name, Recorder(getattr(lce, name), launches))


def collect_code() -> dict:
    from .code import compile_launch

    workloads, missing = _workloads()
    launches: list = []
    _install_recorders(launches)
    _plan_for_headline(None)
    compiled: dict[str, dict] = {}
    cases = []
    for workload in workloads:
        if workload.linear:
            continue  # the fused linear loss is modelled from its matrix products
        for dtype_name, dtype in DTYPES.items():
            for vocab in VOCABS:
                rows = 64 if workload.few_rows else 8192
                launches.clear()
                x = torch.empty(rows, vocab, dtype=dtype)
                if workload.distill:
                    x = (x.requires_grad_(), torch.empty(rows, vocab, dtype=dtype))
                elif workload.mode != "vocab_parallel":
                    x.requires_grad_()
                else:
                    x = torch.empty(rows, vocab // 2, dtype=dtype)
                target = torch.zeros(rows, dtype=torch.long)
                workload.step(x, target, workload.grad_output(rows, dtype))
                case = {"workload": workload.name, "dtype": dtype_name, "vocab": vocab,
                        "rows": rows, "launches": []}
                for fn, grid, args, kwargs in launches:
                    key = _key(fn, args, kwargs)
                    if key not in compiled:
                        code = compile_launch(fn, args, kwargs)
                        compiled[key] = dataclasses.asdict(code)
                    case["launches"].append({"kernel": fn.__name__, "grid": list(grid),
                                             "code": key, **_plan(kwargs)})
                cases.append(case)
                print(f"code {workload.name:40s} {dtype_name} {vocab}: "
                      f"{len(case['launches'])} launches", flush=True)
    return {"liger_missing": missing, "cases": cases, "kernels": compiled,
            "triton": triton_version()}


def _plan(kwargs: dict) -> dict:
    """What the roofline needs of a launch's arguments."""
    keep = ("BLOCK_SIZE", "cols_per_split", "n_cols", "n_splits", "num_warps")
    return {k: kwargs[k] for k in keep if k in kwargs and isinstance(kwargs[k], int)}


def _key(fn, args, kwargs) -> str:
    """A launch's compile key: the kernel, its constexprs and options, and the JIT's
    specialisation of every other argument (dtype, 16-byte alignment, divisibility by 16)."""
    parts = [fn.__name__]
    for name, value in sorted(kwargs.items()):
        if isinstance(value, torch.Tensor):
            parts.append(f"{name}:{value.dtype}:{value.data_ptr() % 16 == 0}")
        elif isinstance(value, (bool, str)) or name.isupper() or name == "num_warps":
            parts.append(f"{name}={value}")
        elif isinstance(value, int):
            parts.append(f"{name}:{'d16' if value % 16 == 0 else ('one' if value == 1 else 'i')}")
        else:
            parts.append(f"{name}:{type(value).__name__}")
    parts += [str(type(a).__name__) for a in args]
    return "|".join(parts)


def triton_version() -> str:
    import triton

    return triton.__version__


def main(argv: list[str]) -> int:
    what, path = argv
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    data = collect_traffic() if what == "traffic" else collect_code()
    with open(path, "w") as f:
        json.dump(data, f)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
