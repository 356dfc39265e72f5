"""The static model of the LM head as a whole: fused linear cross-entropy (loss and the gradients
of the hidden states, the head's weight and its bias) from hidden states (N, H) and a head (V, H)
in bf16, on an H100 or H200.  A model, not a measurement.

Each contender is written as the sequence of operations it launches at a shape, read from its
code (fusedce's ``fusedce/linear.py``; Liger-Kernel's ``liger_kernel/ops/
fused_linear_cross_entropy.py``, its chunk rule and accumulation dtype read from the installed
package; PyTorch's ``F.linear_cross_entropy`` with ``LinearCrossEntropyOptions()``, whose
``"auto"`` choice on CUDA bf16 is read from ``torch.nn.modules.linear_cross_entropy_options.
_AUTO_DEFAULTS``; Cut Cross-Entropy from its paper, Wijmans et al., "Cut Your Losses in
Large-Vocabulary Language Models", ICLR 2025: a forward kernel that keeps only the log-sum-exp
and a backward kernel that recomputes the logits tile by tile, both on chip):

* a matrix product ``(M, K) x (K, N)`` costs ``2 M N K`` FLOPs at the tensor cores' dense bf16
  peak (989 TFLOP/s on both GPUs, H100 SXM datasheet; float32 operands without TF32, PyTorch's
  default, run at the 67 TFLOP/s FP32 peak) times ``GEMM_EFFICIENCY`` times the wave
  quantisation of 128 x 256 output tiles over the SMs, or its bytes (operands read once, the
  output written, an accumulated output also read) at the copy bandwidth, whichever is longer;
* ``GEMM_EFFICIENCY`` = 0.74: TRL's maintainers measured the three products of this head at
  8192 x 4096 x 151936 on one H100 at 42 ms (huggingface/trl#7244), 30.6 TFLOP at 729 TFLOP/s;
* an elementwise pass (a cross-entropy kernel over a chunk of logits, a dtype conversion) moves
  its bytes at the copy bandwidth; a buffer written by one operation and read by the next hits
  L2 with the curve of ``roofline.l2_hit`` (its size as the distance);
* each operation costs at least ``LAUNCH_OVERHEAD_S`` (a launch is hidden behind a longer
  operation on the stream, exposed for a shorter one); host synchronisations ``SYNC_S`` each;
* peak extra memory: the largest set of buffers alive at once beyond the inputs, the weight and
  the gradients that must exist (grad_input, grad_weight in the weight's dtype).

The GEMM floor is the three products (logits, grad_input, grad_weight) at the same efficiency.
"""

from __future__ import annotations

import dataclasses
import math

from .hardware import GPUS, LAUNCH_OVERHEAD_S, Gpu
from .roofline import l2_hit

BF16_PEAK = 989.4e12  # dense bf16 tensor-core FLOP/s, H100 SXM and H200 (datasheets)
FP32_PEAK = 66.9e12  # FP32 (non-tensor) FLOP/s, H100 SXM datasheet
GEMM_EFFICIENCY = 0.74  # measured share of the bf16 peak on this head's products (trl#7244)
TILE_M, TILE_N = 128, 256  # output tile of a Hopper bf16 GEMM (wave quantisation)
SHAPES = [(8192, 4096, 151936), (8192, 4096, 128256), (16384, 2048, 248320)]
GIB = 1 << 30


@dataclasses.dataclass
class Op:
    kind: str  # "gemm" or "pass"
    seconds: float
    flops: float = 0.0
    bytes: float = 0.0


@dataclasses.dataclass
class Plan:
    """A contender's operations at one shape, and its peak extra memory."""

    contender: str
    description: str
    ops: list[Op]
    peak_extra_bytes: float
    notes: str = ""
    syncs: int = 0


class Builder:
    """Collects a contender's operations, each costed on ``gpu``."""

    def __init__(self, gpu: Gpu):
        self.gpu, self.ops = gpu, []

    def gemm(self, m: int, n: int, k: int, a_bytes: int = 2, b_bytes: int = 2,
             out_bytes: int = 2, accumulate: bool = False, fp32_math: bool = False,
             count: int = 1, l2_a: float = 0.0) -> None:
        """``count`` products (M, K) x (K, N) -> (M, N); ``accumulate``: the output is also
        read (C += A B); ``l2_a``: the share of A already in L2 (written just before)."""
        flops = 2.0 * m * n * k
        tiles = math.ceil(m / TILE_M) * math.ceil(n / TILE_N)
        waves = math.ceil(tiles / self.gpu.sms)
        quantisation = tiles / (waves * self.gpu.sms)
        peak = (FP32_PEAK if fp32_math else BF16_PEAK) * GEMM_EFFICIENCY * quantisation
        moved = m * k * a_bytes * (1 - l2_a) + k * n * b_bytes \
            + m * n * out_bytes * (2 if accumulate else 1)
        seconds = max(flops / peak, moved / self.gpu.copy_bytes_per_s, LAUNCH_OVERHEAD_S)
        self.ops += [Op("gemm", seconds, flops, moved)] * count

    def elementwise(self, moved: float, count: int = 1, resident: float = 0.0) -> None:
        """``count`` passes moving ``moved`` bytes each; ``resident``: bytes of it that were
        written by the operation before and may still be in L2."""
        hbm = moved - resident * l2_hit(resident, self.gpu) if resident else moved
        seconds = max(hbm / self.gpu.copy_bytes_per_s, LAUNCH_OVERHEAD_S)
        self.ops += [Op("pass", seconds, 0.0, hbm)] * count


def gemm_floor(gpu: Gpu, n: int, h: int, v: int) -> float:
    """The three products at the same efficiency (no quantisation loss, no traffic bound)."""
    return 3 * 2.0 * n * h * v / (BF16_PEAK * GEMM_EFFICIENCY)


def _chunks(total: int, size: int) -> list[int]:
    return [min(size, total - s) for s in range(0, total, size)]


def unfused(gpu: Gpu, n: int, h: int, v: int) -> Plan:
    """``F.cross_entropy(x @ W.T, y)`` in bf16: logits, log-probabilities, two logits-sized
    gradients (nll's, log_softmax's); PyTorch's kernels read and write each."""
    b = Builder(gpu)
    logits = n * v * 2
    b.gemm(n, v, h)                                   # logits (bf16)
    b.elementwise(2 * logits)                         # log_softmax: read, write
    b.elementwise(logits)                             # nll backward: zero-filled gradient
    b.elementwise(3 * logits)                         # log_softmax backward: 2 reads, 1 write
    b.gemm(n, h, v)                                   # grad_input = g @ W
    b.gemm(v, h, n)                                   # grad_weight = g.T @ x
    return Plan("unfused", "PyTorch eager: logits, F.cross_entropy, autograd", b.ops,
                4 * logits, "logits, log-probabilities and two gradients alive at the peak")


def torch_chunked(gpu: Gpu, n: int, h: int, v: int) -> Plan:
    """``F.linear_cross_entropy(..., options=LinearCrossEntropyOptions())`` on CUDA bf16: the
    "auto" choice is acc_policy "compact" with chunking "aspect_ratio:2": chunks of
    next_pow2(ceil(N / ceil(V / H))) / 2 rows; float32 logits per chunk, the gradient in bf16,
    grad_weight accumulated by ``addmm_`` into the bf16 gradient (read and written per chunk)."""
    rows = max(1, 2 ** math.ceil(math.log2(math.ceil(n / math.ceil(v / h))))) // 2
    b = Builder(gpu)
    for r in _chunks(n, rows):
        chunk = r * v
        b.gemm(r, v, h, out_bytes=4)                  # float32 logits of the chunk
        b.elementwise(chunk * (4 + 2), resident=chunk * 4)  # softmax - onehot -> bf16 grad
        b.gemm(r, h, v, l2_a=l2_hit(chunk * 2, gpu))  # grad_input rows
        b.gemm(v, h, r, accumulate=True, l2_a=l2_hit(chunk * 2, gpu))  # grad_weight += g.T x
    return Plan("torch_chunked", f"F.linear_cross_entropy, {rows}-row chunks (auto: compact, "
                "aspect_ratio:2), bf16 weight-gradient accumulation", b.ops, rows * v * 6,
                "accumulates grad_weight in bf16")


def liger(gpu: Gpu, n: int, h: int, v: int) -> Plan:
    """Liger-Kernel's fused linear cross-entropy (0.8.x): chunks of
    next_pow2(ceil(N / ceil(V / H))) rows, bf16 logits per chunk (``torch.mm`` into a reused
    buffer), its cross-entropy kernel writing the gradient in place, ``grad_input`` by
    ``torch.mm`` and ``grad_weight`` by ``addmm(out=grad_weight)`` in bf16 (accum_dtype None)."""
    rows = min(n, 2 ** math.ceil(math.log2(math.ceil(n / math.ceil(v / h)))))
    b = Builder(gpu)
    for r in _chunks(n, rows):
        chunk = r * v * 2
        b.gemm(r, v, h)                               # bf16 logits into the buffer
        b.elementwise(2 * chunk, resident=chunk)      # its kernel: read, gradient in place
        b.gemm(r, h, v, l2_a=l2_hit(chunk, gpu))      # grad_input rows
        b.gemm(v, h, r, accumulate=True, l2_a=l2_hit(chunk, gpu))  # grad_weight (bf16) +=
    return Plan("liger", f"Liger-Kernel fused linear CE, {rows}-row chunks, bf16 logits and "
                "bf16 weight-gradient accumulation", b.ops, rows * v * 2,
                "accumulates grad_weight in bf16", syncs=1)


def cce(gpu: Gpu, n: int, h: int, v: int) -> Plan:
    """Cut Cross-Entropy 25.1 (``cut_cross_entropy/cce_lse_forward.py``, ``cce_backward.py``):
    the forward's fused product keeps only the log-sum-exp; the backward kernel recomputes each
    (128-row, 128-class) logits tile on chip and adds its two products into ``grad_input`` and
    ``grad_weight``, both held in bf16 (``zeros_like(e)``, ``zeros_like(c, dtype=e.dtype)``) and
    updated under locks: every tile pair reads its operands and reads and writes a 128-row
    slice of each gradient.  Its gradient filtering (``filter_eps="high"``: tiles whose
    gradient is below bf16 resolution are skipped, not exact) skips most pairs once a model is
    trained; at initialisation (near-uniform softmax) it skips none: the figure here, an upper
    bound on its time."""
    b = Builder(gpu)
    b.gemm(n, v, h, out_bytes=0)                      # forward: logits tiles on chip, lse only
    pairs = math.ceil(n / 128) * math.ceil(v / 128)
    moved = pairs * (128 + 128) * h * 2 * 3           # operands; both gradient slices RMW
    flops = 3 * 2.0 * n * v * h                       # recompute, grad_input, grad_weight
    seconds = max(flops / (BF16_PEAK * GEMM_EFFICIENCY), moved / gpu.copy_bytes_per_s)
    b.ops.append(Op("gemm", seconds, flops, moved))
    return Plan("cce", "Cut Cross-Entropy (its kernels' algorithm; no tile filtered, as at "
                "initialisation)", b.ops, n * 4 + n * 2 * 4,
                "accumulates both gradients in bf16 (locked read-modify-write per tile)")


def fusedce_rows(gpu: Gpu, n: int, h: int, v: int) -> Plan:
    """fusedce's ``"rows"`` policy (the default before the vocabulary tiles, and today's for
    float32 heads and ``batch_invariant``): chunks of ``default_chunk_size`` rows, float32
    logits, ``grad_weight`` accumulated by a float32 x float32 ``addmm_`` (the FP32 path)
    into a float32 (V, H) accumulator."""
    rows = max(n * h, 1 << 23) // v
    rows = rows - rows % 64 if rows >= 64 else max(rows, 1)
    b = Builder(gpu)
    for r in _chunks(n, rows):
        chunk = r * v
        b.gemm(r, v, h, out_bytes=4)                  # float32 logits
        b.elementwise(chunk * 8, resident=chunk * 4)  # cross-entropy pass, gradient in place
        b.elementwise(chunk * 6, resident=chunk * 4)  # float32 gradient -> bf16 copy
        b.gemm(r, h, v, l2_a=l2_hit(chunk * 2, gpu))  # grad_input rows
        b.elementwise(r * h * 6)                      # hidden chunk -> float32 copy
        b.gemm(v, h, r, a_bytes=4, b_bytes=4, out_bytes=4, accumulate=True, fp32_math=True)
    b.elementwise(v * h * 6)                          # accumulator -> bf16 gradient
    return Plan("fusedce_rows", f"fusedce 'rows' policy, {rows}-row chunks, float32 x float32 "
                "weight-gradient products", b.ops, rows * v * 6 + v * h * 4,
                "float32 (V, H) accumulator")


def fusedce_vocab_all(gpu: Gpu, n: int, h: int, v: int) -> Plan:
    """The ``"vocab"`` policy with ``chunk_bytes`` large enough to keep every tile's float32
    logits from pass 1 (the fewest products, the most memory)."""
    plan = fusedce_vocab(gpu, n, h, v, budget=n * v * 4 + n * 2048 * 2 + (32 << 20))
    plan.contender = "fusedce_vocab_all"
    return plan


def fusedce_vocab(gpu: Gpu, n: int, h: int, v: int, budget: int | None = None) -> Plan:
    """fusedce's ``"vocab"`` policy (``fusedce/linear.py``, the default for 16-bit heads whose
    gradient is wanted), with ``default_chunk_bytes`` and ``vocab_plan``: pass 1 makes each
    tile's float32 logits block by block (kept whole for the first tiles, as the workspace
    allows) and reads them for the statistics; pass 2 makes the other tiles' logits again,
    writes the bf16 gradient of the tile for all rows, then one product over all rows for the
    tile's grad_weight slice (written once) and one into the float32 grad_input."""
    from fusedce.linear import MAX_CHUNK_BYTES, vocab_plan

    if budget is None:
        budget = MAX_CHUNK_BYTES  # default_chunk_bytes on a GPU with more than 12 GiB free
    tile, rows, kept = vocab_plan(n, v, budget, 2)
    b = Builder(gpu)
    for v0 in range(0, v, tile):
        cols = min(tile, v - v0)
        for r in _chunks(n, rows):                    # pass 1: statistics
            block = r * cols * 4
            b.gemm(r, cols, h, out_bytes=4)
            b.elementwise(block, resident=0 if v0 < kept else block)
    b.elementwise(n * 20 * math.ceil(v / tile) * 2)   # per-tile partials written, merged
    for v0 in range(0, v, tile):                      # pass 2: gradient of the tile
        cols = min(tile, v - v0)
        for r in _chunks(n, rows):
            block = r * cols * 4
            if v0 + cols <= kept:                     # kept from pass 1: read back
                b.elementwise(block + r * cols * 2)
            else:
                b.gemm(r, cols, h, out_bytes=4)
                b.elementwise(block + r * cols * 2, resident=block)
        b.gemm(cols, h, n)                            # grad_weight[tile] = g.T x, written once
        b.gemm(n, h, cols, out_bytes=4, accumulate=True)  # grad_input += g W[tile] (float32)
    b.elementwise(n * h * 6)                          # float32 grad_input -> bf16
    peak = n * tile * 2 + rows * tile * 4 * (kept < v) + n * kept * 4 + n * h * 4
    return Plan("fusedce_vocab", f"fusedce 'vocab' policy: {tile}-class tiles, {rows}-row "
                f"blocks, {kept} classes' logits kept from pass 1 ({budget >> 20} MiB "
                "workspace), float32 accumulation of both gradients", b.ops, peak,
                f"{1 + (v - kept) / v:.2f} logits products instead of 1")


CONTENDERS = [unfused, torch_chunked, liger, cce, fusedce_rows, fusedce_vocab,
              fusedce_vocab_all]

# Published measurements on one H100, for calibration (the model is not fitted to them).
PUBLISHED = [
    {"contender": "liger", "tokens": 8192, "hidden": 4096, "vocab": 151936, "ms": 192.0,
     "gib": 6.1, "source": "huggingface/trl#7244"},
    {"contender": "three products alone", "tokens": 8192, "hidden": 4096, "vocab": 151936,
     "ms": 42.0, "gib": None, "source": "huggingface/trl#7244"},
    {"contender": "cce", "tokens": 16384, "hidden": 2048, "vocab": 248320, "ms": 92.6,
     "gib": 3.1, "source": "huggingface/trl#6858 (through TRL)"},
    {"contender": "liger", "tokens": 16384, "hidden": 2048, "vocab": 248320, "ms": 321.0,
     "gib": 6.05, "source": "huggingface/trl#6858 (through TRL)"},
]


def predictions() -> list[dict]:
    """Every contender at every shape on every GPU: the rows ``model.json`` carries."""
    from .hardware import SYNC_S

    out = []
    for gpu in GPUS:
        for n, h, v in SHAPES:
            floor = gemm_floor(gpu, n, h, v)
            for contender in CONTENDERS:
                plan = contender(gpu, n, h, v)
                gemm_s = sum(op.seconds for op in plan.ops if op.kind == "gemm")
                pass_s = sum(op.seconds for op in plan.ops if op.kind == "pass")
                seconds = gemm_s + pass_s + plan.syncs * SYNC_S
                out.append({
                    "workload": f"linear:{plan.contender}", "contender": plan.contender,
                    "description": plan.description, "tokens": n, "hidden": h, "vocab": v,
                    "gpu": gpu.name, "predicted_ms": round(seconds * 1e3, 2),
                    "gemm_ms": round(gemm_s * 1e3, 2), "elementwise_ms": round(pass_s * 1e3, 2),
                    "gemm_floor_ms": round(floor * 1e3, 2),
                    "ratio_to_floor": round(seconds / floor, 3),
                    "launches": len(plan.ops), "host_syncs": plan.syncs,
                    "hbm_gb": round(sum(op.bytes for op in plan.ops) / 1e9, 1),
                    "tflop": round(sum(op.flops for op in plan.ops) / 1e12, 1),
                    "peak_extra_gib": round(plan.peak_extra_bytes / GIB, 2),
                    "notes": plan.notes,
                })
    return out


NVLINK_BYTES_PER_S = 450e9  # H100/H200 SXM NVLink 4: 900 GB/s both ways, 450 GB/s each way
COLLECTIVE_LATENCY_S = 10e-6  # assumed fixed cost of one collective on a node


def _ring(bytes_: float, world: int, kind: str) -> float:
    """A ring collective's time: all-reduce moves 2 (w-1)/w of the buffer each way, all-gather
    and reduce-scatter (w-1)/w."""
    share = 2 * (world - 1) / world if kind == "all_reduce" else (world - 1) / world
    return COLLECTIVE_LATENCY_S + bytes_ * share / NVLINK_BYTES_PER_S


def vocab_parallel_predictions(shape=(8192, 4096, 151936), worlds=(2, 4, 8)) -> list[dict]:
    """The vocabulary-parallel fused head per rank (its 1/world of the classes), with and
    without sequence parallelism: the rank's tiled pass (``fusedce_vocab`` at V / world), the
    statistics' all-reduces (N maxima, 4N sums) and ``grad_input``'s float32 all-reduce, or the
    hidden states' all-gather and the gradient's reduce-scatter in bf16; bytes each rank sends
    per token beside."""
    n, h, v = shape
    out = []
    for gpu in GPUS:
        for world in worlds:
            local = fusedce_vocab(gpu, n, h, -(-v // world))
            compute = sum(op.seconds for op in local.ops)
            stats = _ring(n * 4, world, "all_reduce") + _ring(n * 16, world, "all_reduce")
            for sequence_parallel in (False, True):
                if sequence_parallel:
                    comm = stats + _ring(n * h * 2, world, "all_gather") + \
                        _ring(n * h * 2, world, "reduce_scatter")
                    sent = 20 + 2 * h * 2 * (world - 1) / world
                else:
                    comm = stats + _ring(n * h * 4, world, "all_reduce")
                    sent = 20 + h * 4 * 2 * (world - 1) / world
                out.append({
                    "workload": "linear:fusedce_vocab_parallel" + ("_sp" if sequence_parallel
                                                                   else ""),
                    "gpu": gpu.name, "ranks": world, "tokens": n, "hidden": h, "vocab": v,
                    "sequence_parallel": sequence_parallel,
                    "compute_ms": round(compute * 1e3, 2), "comm_ms": round(comm * 1e3, 2),
                    "predicted_ms": round((compute + comm) * 1e3, 2),
                    "single_gpu_floor_ms": round(gemm_floor(gpu, n, h, v) * 1e3, 2),
                    "ring_bytes_sent_per_token": round(sent, 1),
                    "peak_extra_gib": round(local.peak_extra_bytes / GIB, 2),
                })
    return out


ASSUMPTIONS = (f"bf16 products at {GEMM_EFFICIENCY:.0%} of the {BF16_PEAK / 1e12:.0f} TFLOP/s "
               "dense peak (TRL's measured 42 ms for this head's three products, trl#7244), "
               f"float32 products at the {FP32_PEAK / 1e12:.0f} TFLOP/s FP32 peak, wave "
               f"quantisation of {TILE_M}x{TILE_N} tiles; elementwise passes at the copy "
               "bandwidth with the L2 curve for a buffer just written; each operation at least "
               f"one launch ({LAUNCH_OVERHEAD_S * 1e6:.0f} us)")
