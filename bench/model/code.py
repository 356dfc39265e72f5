"""The code of each launch, compiled offline for sm_90 the way Triton's JIT specialises it
(run without TRITON_INTERPRET; no GPU needed).

Launches are captured, not run: each kernel object in its module is replaced by a recorder, the
step runs on real but untouched (``torch.empty``) tensors of the headline shape, and the
recorded arguments go through the JIT's own binder (``create_function_from_signature``: pointer
alignment and integer divisibility by 16 become ``tt.divisibility`` attributes, exactly as at a
launch) and ``triton.compile`` for ``GPUTarget("cuda", 90, 32)``.  ``cuobjdump`` (shipped with
Triton) gives the registers, spills (the STACK frame and LOCAL memory) and shared memory, and
the SASS: every loop's instructions, ``MUFU.EX2``, spill stores and reloads (STL/LDL) and load
and store widths per trip, and the code outside the loops, from which the roofline counts the
whole per-row path (trips x loop bodies + everything outside them, the masked tail included).
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import tempfile

import triton

_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


@dataclasses.dataclass
class Loop:
    start: int
    end: int
    instructions: int  # SASS instructions of one trip (nested loops' own excluded)
    ex2: int
    load_bytes: int  # bytes loaded by one thread per trip (vector loads of the loop)
    loads: list[str]
    stores: list[str]
    predicated: bool = False  # loads under a predicate: a masked loop (runs ceil(n / step))
    local_ops: int = 0  # STL/LDL (spill stores and reloads) per trip
    local_bytes: int = 0  # bytes of those per thread per trip
    inner: bool = True  # innermost; False: an outer loop (its trips multiply its inner ones)


@dataclasses.dataclass
class KernelCode:
    kernel: str
    num_warps: int
    block_size: int | None
    registers: int
    local_bytes: int  # spills: the larger of cuobjdump's LOCAL and STACK frame
    shared_bytes: int
    loops: list[Loop]
    # Code outside every loop, run once per program (straight line: both sides of a branch
    # counted, so the whole-path figures are an upper bound by the branch not taken).
    outside: dict = dataclasses.field(default_factory=dict)
    # ``ptxas -v`` on the same PTX: stack frame, spill stores and spill loads (bytes).
    ptxas: dict = dataclasses.field(default_factory=dict)


def _op(text: str) -> str:
    return text.split()[1] if text.startswith("@") else text.split()[0]


def _summary(body: list[str]) -> dict:
    ops = [_op(t) for t in body]
    local = [op for op in ops if op.startswith(("STL", "LDL"))]
    return {"instructions": len(body), "ex2": sum(op == "MUFU.EX2" for op in ops),
            "local_ops": len(local), "local_bytes": sum(_width(op) for op in local)}


def parse_sass(sass: str) -> tuple[list[Loop], dict]:
    """Every loop (a backward branch and the code it jumps back over), innermost first in
    address order, and the code outside all loops.  A one-instruction self-branch (the trap
    after EXIT) is not a loop and not code."""
    code = [(int(m.group(1), 16), m.group(2)) for m in _INSTRUCTION.finditer(sass)]
    code = [(a, t) for a, t in code if not t.startswith("NOP")]
    spans = []
    for address, text in code:
        branch = re.search(r"\bBRA\s+0x([0-9a-f]+)", text)
        if branch and int(branch.group(1), 16) < address:
            spans.append((int(branch.group(1), 16), address))
    traps = {a for a, t in code if (m := re.search(r"\bBRA\s+0x([0-9a-f]+)", t))
             and int(m.group(1), 16) == a}
    spans = sorted(set(spans))

    def nested(s, o):
        return o != s and s[0] <= o[0] and o[1] <= s[1]

    loops = []
    for span in spans:
        children = [o for o in spans if nested(span, o)]
        own = [text for address, text in code if span[0] <= address <= span[1]
               and not any(c[0] <= address <= c[1] for c in children)]
        ops = [_op(t) for t in own]
        loads = [op for op in ops if op.startswith("LDG")]
        stores = [op for op in ops if op.startswith("STG")]
        predicated = any(t.startswith("@") and _op(t).startswith("LDG") for t in own)
        s = _summary(own)
        loops.append(Loop(span[0], span[1], s["instructions"], s["ex2"],
                          sum(_width(op) for op in loads), loads, stores, predicated,
                          s["local_ops"], s["local_bytes"], inner=not children))
    outside = [text for address, text in code if address not in traps
               and not any(s[0] <= address <= s[1] for s in spans)]
    return loops, _summary(outside)


def _width(op: str) -> int:
    for suffix, size in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1)):
        if suffix in op:
            return size
    return 4


def compile_launch(fn, args: tuple, kwargs: dict, arch: int = 90) -> KernelCode:
    """Compile one recorded launch as the JIT would for ``sm_<arch>``; read its resources."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound,
                                                          specialization, options)
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                            options=options.__dict__)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
        path = f.name
    try:
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True,
                              text=True, check=True).stdout
    finally:
        os.unlink(path)
    code = kernel_code(fn.__name__, options.num_warps, kwargs.get("BLOCK_SIZE"), usage, sass)
    code.ptxas = ptxas_spills(kernel.asm["ptx"], arch)
    return code


_PTXAS_LINE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, "
                         r"(\d+) bytes spill loads")


def ptxas_spills(ptx: str, arch: int = 90) -> dict:
    """``ptxas -v`` of the kernel's PTX (the ptxas Triton ships that reads its PTX version):
    {"stack": bytes, "spill_stores": bytes, "spill_loads": bytes}, or {} if none runs."""
    with tempfile.NamedTemporaryFile(suffix=".ptx", delete=False, mode="w") as f:
        f.write(ptx)
        path = f.name
    try:
        for name in ("ptxas-blackwell", "ptxas"):
            tool = _tool(name)
            if not os.path.exists(tool):
                continue
            done = subprocess.run([tool, "-v", f"--gpu-name=sm_{arch}a", path, "-o", os.devnull],
                                  capture_output=True, text=True)
            found = _PTXAS_LINE.search(done.stdout + done.stderr)
            if done.returncode == 0 and found:
                stack, stores, loads = (int(v) for v in found.groups())
                return {"stack": stack, "spill_stores": stores, "spill_loads": loads}
    finally:
        os.unlink(path)
    return {}


def kernel_code(name: str, num_warps: int, block_size: int | None, usage: str,
                sass: str) -> KernelCode:
    """Resources and code from ``cuobjdump -res-usage`` and ``-sass`` of one kernel.  Triton's
    spills land in the STACK frame (ptxas's "bytes stack frame", "spill stores"), not always
    in LOCAL: both are read, and the SASS's STL/LDL say how often the loops touch it."""
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    loops, outside = parse_sass(sass)
    spill = max(int(fields.get("LOCAL", 0)), int(fields.get("STACK", 0)))
    return KernelCode(name, num_warps, block_size, int(fields.get("REG", 0)), spill,
                      int(fields.get("SHARED", 0)), loops, outside)


class Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` records, runs nothing."""

    def __init__(self, fn, launches: list):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.launches.append((self.fn, tuple(grid) if not callable(grid) else grid, args,
                                  kwargs))
        return record
