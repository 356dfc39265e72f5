"""The code of each launch, compiled offline for sm_90 the way Triton's JIT specialises it
(run without TRITON_INTERPRET; no GPU needed).

Launches are captured, not run: each kernel object in its module is replaced by a recorder, the
step runs on real but untouched (``torch.empty``) tensors of the headline shape, and the
recorded arguments go through the JIT's own binder (``create_function_from_signature``: pointer
alignment and integer divisibility by 16 become ``tt.divisibility`` attributes, exactly as at a
launch) and ``triton.compile`` for ``GPUTarget("cuda", 90, 32)``.  ``cuobjdump`` (shipped with
Triton) gives the registers, spills (local memory) and shared memory, and the SASS, whose
innermost loops give the instructions, ``MUFU.EX2`` and load and store widths per element.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import tempfile

import triton

_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA\s+(?:`\(\.L_x_\d+\)|0x([0-9a-f]+))")


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


@dataclasses.dataclass
class Loop:
    start: int
    end: int
    instructions: int
    ex2: int
    load_bytes: int  # bytes loaded by one thread per trip (vector loads of the loop)
    loads: list[str]
    stores: list[str]


@dataclasses.dataclass
class KernelCode:
    kernel: str
    num_warps: int
    block_size: int | None
    registers: int
    local_bytes: int  # spills
    shared_bytes: int
    loops: list[Loop]


def parse_sass(sass: str) -> list[Loop]:
    """The innermost loops (a backward branch and the code it jumps back over)."""
    code = [(int(m.group(1), 16), m.group(2)) for m in _INSTRUCTION.finditer(sass)]
    spans = []
    for address, text in code:
        branch = re.search(r"\bBRA\s+0x([0-9a-f]+)", text)
        if branch and int(branch.group(1), 16) <= address:
            spans.append((int(branch.group(1), 16), address))
    innermost = [s for s in spans if not any(o != s and s[0] <= o[0] and o[1] <= s[1]
                                             for o in spans)]
    loops = []
    for start, end in sorted(innermost):
        body = [text for address, text in code if start <= address <= end
                and not text.startswith("NOP")]
        ops = [t.split()[1] if t.startswith("@") else t.split()[0] for t in body]
        loads = [op for op in ops if op.startswith("LDG")]
        stores = [op for op in ops if op.startswith("STG")]
        loops.append(Loop(start, end, len(body), sum(op == "MUFU.EX2" for op in ops),
                          sum(_width(op) for op in loads), loads, stores))
    return loops


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
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    return KernelCode(fn.__name__, options.num_warps, kwargs.get("BLOCK_SIZE"),
                      int(fields.get("REG", 0)), int(fields.get("LOCAL", 0)),
                      int(fields.get("SHARED", 0)), parse_sass(sass))


class Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](...)`` records, runs nothing."""

    def __init__(self, fn, launches: list):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        def record(*args, **kwargs):
            self.launches.append((self.fn, tuple(grid) if not callable(grid) else grid, args,
                                  kwargs))
        return record
