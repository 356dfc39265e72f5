"""Fused linear cross-entropy: the loss from hidden states and the LM head, never materialising
the logits.  Two policies, chosen per call (``choose_policy``):

``"rows"``: tokens in chunks of rows.  For each chunk the logits are made with one matrix product
into a reused float32 chunk buffer (a 16-bit product with a float32 result, so no logit is
rounded to 16 bits before the loss), the cross-entropy pass (Triton kernel or PyTorch
implementation) turns them into per-row losses and overwrites them with their gradient, and that
gradient immediately gives the chunk's ``grad_input`` (``g @ W``) and is accumulated into
``grad_linear_weight`` (``g^T @ x``) and ``grad_linear_bias``.  Three matrix products, the
fewest there are; but for a 16-bit head the weight gradient needs a float32 (C, H) accumulator
read and written by every chunk.  Used for float32 heads (the accumulator is the gradient
itself), without a weight gradient, and under ``batch_invariant`` (fixed chunk shapes).

``"vocab"``: the vocabulary in tiles, for 16-bit heads whose gradient is wanted, on CUDA.  Pass 1
makes each tile's logits (in row blocks) and keeps only per-row partial statistics (max, sum of
exponentials, smoothing and entropy sums, first argmax, the target logit); they are merged as the
vocabulary-parallel loss merges ranks' (``fusedce.distributed``).  Pass 2 makes each tile's logits
again, writes their gradient from the merged statistics as 16-bit values into one (N, tile)
buffer, then ``grad_linear_weight[tile] = g^T @ x`` in one product over all tokens (float32
accumulation inside the product, written once in the weight's dtype) and ``grad_input += g @
W[tile]`` into a float32 (N, H) accumulator.  Four products instead of three, no (C, H)
accumulator, each gradient slice written once.  The static model (``bench/model/linear.py``)
gives the figures on an H100.

All of this happens in the forward, so the backward only scales the gradients by
``grad_output``.  With ``reduction="none"`` the gradient depends on a per-token ``grad_output``
that the forward does not know, and a sum over tokens (``grad_linear_weight``) cannot be
rescaled afterwards; the forward then computes only the loss, and the backward makes the
gradient pass with the per-token factors fed to the kernel.

The pass is the custom op ``fusedce::linear_ce_pass``, so ``torch.compile`` sees one opaque node
(no graph break, no data-dependent guard).

Workspace: for ``"rows"``, one float32 chunk of logits (``chunk_size`` rows, or ``chunk_bytes``,
default ``default_chunk_size``); for ``"vocab"``, at most ``chunk_bytes`` (default
``default_chunk_bytes``) for the 16-bit gradient of one tile, a block of float32 logits and the
kept tiles, plus a float32 (N, H) ``grad_input`` accumulator; besides the gradients that must
exist anyway.  On the CPU, where PyTorch has no 16-bit product with a float32 result, 16-bit
weights are upcast to float32 once per call.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import Tensor

from . import checks, torch_impl
from .passes import _custom_op, row_stats, run_pass
from .spec import LossSpec, RowResults, RowStats, VocabSlice, accumulation_dtype

# Logits elements per chunk when the hidden states are smaller than this: 8 Mi (32 MiB float32),
# enough rows (256 at a 32768 vocabulary) for efficient matrix products.
MIN_CHUNK_ELEMENTS = 1 << 23
_16_BIT = (torch.bfloat16, torch.float16)


def check_linear_inputs(input, linear_weight, linear_bias) -> int:
    """Check hidden states, LM head and bias; return the number of classes."""
    from torch.distributed.tensor import DTensor

    for name, t in (("input", input), ("linear_weight", linear_weight),
                    ("linear_bias", linear_bias)):
        if isinstance(t, DTensor):
            raise TypeError(
                f"{name} is a DTensor: for a tensor-parallel head (Shard(0) over its mesh) call "
                "fusedce.linear_cross_entropy_dtensor; for a head that is its own FSDP2 "
                "fully_shard unit call fusedce.linear_cross_entropy_head(head, input, target), "
                "which runs inside the head's call so FSDP2 gathers the weight and "
                "reduce-scatters its gradient")
    checks.check_tensor("input", input)
    checks.check_tensor("linear_weight", linear_weight)
    if input.dim() < 1 or not input.is_floating_point():
        raise TypeError(
            f"input must be floating-point hidden states of shape (N, H), got dtype {input.dtype}"
            f" and shape {tuple(input.shape)}"
        )
    if linear_weight.dim() != 2 or linear_weight.shape[1] != input.shape[-1]:
        raise ValueError(
            f"linear_weight must have shape (C, {input.shape[-1]}) for input of shape "
            f"{tuple(input.shape)}, got {tuple(linear_weight.shape)}"
        )
    if linear_weight.dtype != input.dtype:
        raise TypeError(
            f"linear_weight dtype {linear_weight.dtype} differs from input dtype {input.dtype}"
        )
    n_classes = linear_weight.shape[0]
    if n_classes == 0:
        raise ValueError("linear_weight has 0 rows: there are no classes")
    if linear_bias is not None and (
        not isinstance(linear_bias, Tensor) or tuple(linear_bias.shape) != (n_classes,)
        or linear_bias.dtype != input.dtype
    ):
        raise ValueError(
            f"linear_bias must be a ({n_classes},) tensor of dtype {input.dtype}, got "
            f"{getattr(linear_bias, 'shape', linear_bias)!r}"
        )
    for name, t in (("linear_weight", linear_weight), ("linear_bias", linear_bias)):
        if t is not None and t.device != input.device:
            raise ValueError(f"{name} is on {t.device} but input is on {input.device}")
    return n_classes


def default_chunk_size(n_rows: int, n_cols: int, hidden: int, device: torch.device) -> int:
    """Rows per chunk: float32 logits about the size of the hidden states (at least 8 Mi
    elements), so neither many tiny products nor an oversized buffer; on CUDA at most 1/8 of
    free memory.  Multiples of 64 rows keep the matrix products efficient."""
    target = max(n_rows * hidden, MIN_CHUNK_ELEMENTS)
    rows = max(1, target // max(n_cols, 1))
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        rows = min(rows, max(1, free // 8 // max(n_cols * 4, 1)))
    if rows >= 64:
        rows -= rows % 64
    return max(1, min(rows, n_rows))


# The "vocab" policy's shape (``vocab_plan``): tiles of 2048 classes (the weight gradient's
# product per tile, (2048, N) x (N, H), still fills an H100 in whole waves), blocks of float32
# logits of 32 MiB, and what is left of the workspace keeps whole tiles' logits from pass 1 to
# pass 2 (each kept tile spares pass 2 its product).  The static model (bench/model/linear.py)
# chose these; ``chunk_bytes`` bounds the whole.
TILE_COLS = 2048
BLOCK_BYTES = 32 << 20
MAX_CHUNK_BYTES = 3 << 29  # 1.5 GiB
_POLICY: dict[str, str | None] = {"policy": None}


def default_chunk_bytes(device: torch.device) -> int:
    """The ``"vocab"`` policy's workspace bound when ``chunk_bytes`` is None: 1.5 GiB, and on
    CUDA at most 1/8 of the free memory.  Only what the shape needs is allocated (at most the
    float32 logits, when they all fit: then no logits are made twice)."""
    size = MAX_CHUNK_BYTES
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        size = min(size, max(free // 8, 1 << 20))
    return size


@contextlib.contextmanager
def policy(name: str | None):
    """Force the ``"rows"`` or ``"vocab"`` policy inside the ``with`` block (None: the rule of
    ``choose_policy``).  Not an option of the loss: a knob for tests and benchmarks."""
    if name not in (None, "rows", "vocab"):
        raise ValueError(f"policy must be 'rows', 'vocab' or None, got {name!r}")
    previous = _POLICY["policy"]
    _POLICY["policy"] = name
    try:
        yield
    finally:
        _POLICY["policy"] = previous


def choose_policy(w: Tensor, need_w: bool, invariant: bool) -> str:
    """``"vocab"`` for a 16-bit head whose gradient is wanted, on a device with 16-bit products
    that give float32 results (CUDA): no float32 (C, H) accumulator.  Else ``"rows"``: three
    products, the only policy under ``batch_invariant``, and the faster one where 16-bit heads
    are upcast to float32 for the products anyway (the CPU: the tiles' smaller products cost
    more there than the accumulator saves)."""
    if invariant:
        return "rows"
    if _POLICY["policy"] is not None:
        return _POLICY["policy"]
    native = w.dtype in _16_BIT and _has_mm_out_dtype(w.device)
    return "vocab" if need_w and native else "rows"


def vocab_plan(n_rows: int, n_cols: int, chunk_bytes: int,
               element_size: int) -> tuple[int, int, int]:
    """(tile columns, rows per block, columns kept from pass 1) of the ``"vocab"`` policy
    within ``chunk_bytes``: the (N, tile) gradient in the weight's dtype, a float32 block of
    logits, and whole tiles of float32 logits (N, kept) with what is left.  A workspace too
    small for a 2048-class tile gets narrower tiles and blocks, half each (at least one class
    and one row, whatever the bound)."""
    n_rows = max(n_rows, 1)
    tile = min(n_cols, TILE_COLS)
    rows = max(1, BLOCK_BYTES // (tile * 4))
    rows = min(n_rows, rows - rows % 64 if rows >= 128 else rows)
    if n_rows * tile * element_size + rows * tile * 4 > chunk_bytes:
        tile = (chunk_bytes // 2) // (n_rows * element_size)
        tile = min(n_cols, max(tile - tile % 128 if tile >= 256 else tile, 1))
        rows = min(n_rows, max(1, (chunk_bytes // 2) // (tile * 4)))
    left = chunk_bytes - n_rows * tile * element_size - rows * tile * 4
    kept = max(0, left) // (n_rows * 4) // tile * tile
    return tile, rows, min(kept, n_cols)


def invariant_chunk_size(n_cols: int) -> int:
    """Rows per chunk under ``batch_invariant``: set by the vocabulary alone (up to 8 Mi logits
    and 1024 rows), a multiple of the PyTorch implementation's row chunk (or at most one), so
    every product and every reduction runs at one shape whatever the number of tokens (the last
    chunk is padded)."""
    rows = max(1, torch_impl.CHUNK_ELEMENTS // max(n_cols, 1))  # the PyTorch row chunk
    if rows >= _MAX_INVARIANT_ROWS:
        return _MAX_INVARIANT_ROWS
    return rows * max(1, min(MIN_CHUNK_ELEMENTS // torch_impl.CHUNK_ELEMENTS,
                             _MAX_INVARIANT_ROWS // rows))


_MAX_INVARIANT_ROWS = 1024


_MM_OUT_DTYPE: dict[str, bool] = {}


def _has_mm_out_dtype(device: torch.device) -> bool:
    """Whether this PyTorch makes a 16-bit product with a float32 result on ``device``."""
    if device.type not in _MM_OUT_DTYPE:
        a = torch.zeros(2, 2, dtype=torch.bfloat16, device=device)
        try:
            ok = torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
        except (RuntimeError, TypeError, NotImplementedError):
            ok = False
        _MM_OUT_DTYPE[device.type] = ok
    return _MM_OUT_DTYPE[device.type]


class _Head:
    """The LM head as the products need it: the weight in its dtype for ``grad_input``, and
    what makes float32 (or float64) logits."""

    def __init__(self, w: Tensor, b: Tensor | None):
        self.w, self.acc = w, accumulation_dtype(w.dtype)
        self.b = b.to(self.acc) if b is not None else None
        self.native = w.dtype not in _16_BIT or _has_mm_out_dtype(w.device)
        self.w_acc = w if self.native else w.to(self.acc)  # the CPU upcast, once per call

    def logits(self, x_c: Tensor, out: Tensor, v0: int = 0, v1: int | None = None) -> Tensor:
        """``x_c @ W[v0:v1].T + b[v0:v1]`` into ``out`` (contiguous), in the accumulation dtype."""
        v1 = self.w.shape[0] if v1 is None else v1
        if self.w.dtype in _16_BIT and self.native:
            _mm_into(x_c, self.w[v0:v1].t(), out)
        else:
            torch.mm(x_c.to(self.acc), self.w_acc[v0:v1].t(), out=out)
        if self.b is not None:
            out.add_(self.b[v0:v1])
        return out


def _mm_into(a: Tensor, b: Tensor, out: Tensor) -> None:
    """``out = a @ b`` for 16-bit ``a`` and ``b`` with a float32 ``out``, written in place."""
    try:
        torch.mm(a, b, out_dtype=out.dtype, out=out)
    except (RuntimeError, TypeError, NotImplementedError):
        out.copy_(torch.mm(a, b, out_dtype=out.dtype))


def _addmm_into(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b`` with float32 ``acc`` and 16-bit ``a`` and ``b`` (float32 accumulation)."""
    try:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    except (RuntimeError, TypeError, NotImplementedError):
        acc.add_(torch.mm(a, b, out_dtype=acc.dtype))


_INT32_MAX = 2**31 - 1


def _collapse(stats: RowStats, spec: LossSpec) -> tuple[Tensor, ...]:
    """One block's (N, P) partials as one partial per row: (max, sum of exp relative to it,
    smoothing sum, entropy sum relative to the max, first argmax column)."""
    pm, pd, psz, pe = stats.partials
    m = pm.amax(dim=1)
    d = (pd * torch.exp(pm - m.unsqueeze(1))).sum(dim=1)
    sz = psz.sum(dim=1)
    e = torch_impl.merge_entropy_sums(pm, pd, pe, m) if spec.has_entropy else None
    first = None
    if spec.return_stats:
        first = torch.where(pm == m.unsqueeze(1), stats.argmax.long(), _INT32_MAX).amin(dim=1)
    return m, d, sz, e, first


def _vocab_pass(x: Tensor, w: Tensor, b: Tensor | None, target: Tensor, weight: Tensor | None,
                scale: Tensor, stat_grads: tuple[Tensor, Tensor] | None, options: LossSpec,
                budget: int, block_rows: int, need_x: bool, need_w: bool, need_b: bool,
                group=None, start: int = 0, n_classes: int | None = None,
                reduce_input: bool = True) -> tuple[Tensor, ...]:
    """The ``"vocab"`` policy (module docstring): statistics by tiles, merged; then each tile's
    gradient, its weight-gradient slice in one product and its share of ``grad_input``.

    With ``group`` (vocabulary parallelism), ``w`` and ``b`` hold the classes ``[start, start +
    C_local)`` of ``n_classes``, ``target`` global ids and ``weight`` all ``n_classes`` class
    weights: the tiles' statistics are merged over the group too (``all_reduce`` of N maxima,
    of 4N sums and, with statistics, of N argmax columns, as ``fusedce.distributed`` does), and
    ``grad_input`` is summed over the group."""
    head = _Head(w, b)
    acc = head.acc
    n_rows, n_cols = x.shape[0], w.shape[0]
    n_classes = n_cols if n_classes is None else n_classes
    g_dtype = w.dtype if head.native else acc  # the CPU upcast path keeps float32 throughout
    tile, block, kept = vocab_plan(n_rows, n_cols, budget, torch.finfo(g_dtype).bits // 8)
    if block_rows > 0:
        block = min(block_rows, n_rows)
    tiles = [(v0, min(v0 + tile, n_cols)) for v0 in range(0, n_cols, tile)]
    blocks = [(r0, min(r0 + block, n_rows)) for r0 in range(0, n_rows, block)]
    any_grad = need_x or need_w or need_b
    # Pass 1 keeps the first ``kept`` classes' logits (whole tiles, each (N, tile) contiguous)
    # for pass 2, which then needs no product for them; the others go through one block.
    kept = kept if any_grad else 0
    stash = torch.empty(n_rows * kept, dtype=acc, device=x.device)
    buf = torch.empty(min(block, n_rows) * tile if kept < n_cols else 0, dtype=acc,
                      device=x.device)

    def tile_logits(v0: int, v1: int, r0: int, r1: int, fresh: bool) -> Tensor:
        """Rows r0:r1 of tile [v0, v1): from the stash, or made (into the stash in pass 1)."""
        cols = v1 - v0
        if v1 <= kept:
            z = stash[n_rows * v0: n_rows * v1].view(n_rows, cols)[r0:r1]
            return head.logits(x[r0:r1], z, v0, v1) if fresh else z
        return head.logits(x[r0:r1], buf[: (r1 - r0) * cols].view(r1 - r0, cols), v0, v1)

    smoothing = options.has_smoothing

    # Pass 1: each (block, tile)'s statistics, one partial per row and tile.
    n_tiles = len(tiles)
    pm = torch.empty(n_tiles, n_rows, dtype=acc, device=x.device)
    pd, psz, pe = torch.empty_like(pm), torch.zeros_like(pm), torch.zeros_like(pm)
    first = torch.empty(n_tiles, n_rows, dtype=torch.int64, device=x.device) \
        if options.return_stats else None
    ref = torch.zeros_like(pm) if smoothing else None
    z_t = torch.zeros(n_rows, dtype=acc, device=x.device)
    w_totals = []
    for k, (v0, v1) in enumerate(tiles):
        w_tile = weight[start + v0:start + v1] if weight is not None else None
        w_totals.append(w_tile.sum() if w_tile is not None else float(v1 - v0))
        for r0, r1 in blocks:
            z = tile_logits(v0, v1, r0, r1, fresh=True)
            t = target[r0:r1]
            m, d, sz, e, arg = _collapse(row_stats(z, t, w_tile, options), options)
            pm[k, r0:r1], pd[k, r0:r1], psz[k, r0:r1] = m, d, sz
            if e is not None:
                pe[k, r0:r1] = e
            if first is not None:
                first[k, r0:r1] = torch.where(arg < _INT32_MAX, arg + start + v0, _INT32_MAX)
            if smoothing:
                ref[k, r0:r1] = torch_impl.row_anchor(z[:, 0], options)
            local = t - (start + v0)
            owned = (local >= 0) & (local < v1 - v0) & (t != options.ignore_index)
            picked = z.gather(1, torch.where(owned, local, 0).unsqueeze(1)).squeeze(1)
            z_t[r0:r1] += torch.where(owned, torch_impl.transform_logits(picked, options), 0.0)

    # The merge (``fusedce.distributed._merged_stats``, over tiles, then over the group).
    row_max = pm.amax(dim=0)
    if group is not None:
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    total = (pd * torch.exp(pm - row_max)).sum(dim=0)
    wz = torch.zeros_like(row_max)
    if smoothing:
        for k in range(n_tiles):
            wz += psz[k] + w_totals[k] * (ref[k] - row_max)
        wz = torch.where(target != options.ignore_index, wz, 0.0)
    e_sum = torch_impl.merge_entropy_sums(pm.t(), pd.t(), pe.t(), row_max) \
        if options.has_entropy else torch.zeros_like(row_max)
    argmax = torch.empty(0, dtype=torch.int32, device=x.device)
    if first is not None:
        argmax = torch.where(pm == row_max, first, _INT32_MAX).amin(dim=0)
    if group is not None:
        packed = torch.stack([total, wz, z_t, e_sum])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        total, wz, z_t, e_sum = packed.unbind(0)
        z_t = z_t.contiguous()
        if first is not None:
            dist.all_reduce(argmax, op=dist.ReduceOp.MIN, group=group)
    if first is not None:
        argmax = argmax.to(torch.int32).unsqueeze(1)
    merged = torch.stack([row_max, total, wz, e_sum]).unsqueeze(2)
    del pm, pd, psz, pe, first, ref

    # Pass 2: each tile's gradient (16-bit) for all rows, then its products.
    g = torch.empty(n_rows * tile if any_grad else 0, dtype=g_dtype, device=x.device)
    gx = torch.zeros(x.shape if need_x else (0,), dtype=acc, device=x.device)
    grad_w = torch.empty(w.shape if need_w else (0,), dtype=w.dtype, device=w.device)
    grad_b = torch.empty(n_cols if need_b else 0, dtype=acc, device=w.device)
    x_acc = x if head.native else x.to(acc)
    target_weight = weight[target.clamp(0, n_classes - 1)] if weight is not None else None
    weight_sum = weight.sum().reshape(1) if weight is not None else None
    parts = []
    for k, (v0, v1) in enumerate(tiles if any_grad else tiles[:1]):
        cols = v1 - v0
        g_tile = g[: n_rows * cols].view(n_rows, cols) if any_grad else None
        w_tile = weight[start + v0:start + v1] if weight is not None else None
        for r0, r1 in blocks:
            z = tile_logits(v0, v1, r0, r1, fresh=False)
            part = run_pass(
                z, target[r0:r1], w_tile, scale if scale.numel() == 1 else scale[r0:r1],
                options, g_tile[r0:r1] if any_grad else None, weight_sum=weight_sum,
                row_stats=RowStats(merged[:, r0:r1], argmax[r0:r1] if argmax.numel() else argmax),
                vocab=VocabSlice(start + v0, n_classes, z_t[r0:r1],
                                 target_weight[r0:r1] if target_weight is not None else None),
                stat_grads=None if stat_grads is None else (stat_grads[0][r0:r1],
                                                            stat_grads[1][r0:r1]))
            if k == 0:
                parts.append(part)
        if need_w:
            if g_tile.dtype == w.dtype:  # one product over all rows, float32 accumulation
                torch.mm(g_tile.t(), x_acc, out=grad_w[v0:v1])
            else:
                grad_w[v0:v1] = torch.mm(g_tile.t(), x_acc)
        if need_b:
            grad_b[v0:v1] = g_tile.sum(dim=0, dtype=acc)
        if need_x:
            if head.native and g_tile.dtype != acc:
                _addmm_into(gx, g_tile, w[v0:v1])
            else:
                gx.addmm_(g_tile, head.w_acc[v0:v1])
    if group is not None and need_x and reduce_input:
        dist.all_reduce(gx, op=dist.ReduceOp.SUM, group=group)
    rows = RowResults(*(torch.cat([getattr(p, f) for p in parts]) if parts
                        else x.new_empty(0, dtype=acc) for f in RowResults._fields))
    return (*rows, gx.to(x.dtype) if need_x else x.new_empty(0), grad_w,
            grad_b.to(b.dtype if b is not None else w.dtype))


def _linear_ce_pass_impl(
    x: Tensor,
    w: Tensor,
    b: Tensor | None,
    target: Tensor,
    weight: Tensor | None,
    scale: Tensor,
    lse_grad: Tensor | None,
    entropy_grad: Tensor | None,
    spec: str,
    chunk_size: int,
    chunk_bytes: int,
    need_x: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One pass: per-row (loss, lse, z_loss, correct, entropy, argmax) and, as ``need_*``
    ask, the gradients of x, w and b scaled by ``scale`` ((1,) or one factor per row), with the
    statistics' incoming gradients ``lse_grad``/``entropy_grad`` (N,) folded in when given;
    empty tensors for what is not needed.  ``chunk_size`` (rows per chunk or block) and
    ``chunk_bytes`` (the workspace) 0 pick the defaults; the policy is ``choose_policy``'s."""
    options = LossSpec.decode(spec)
    n_rows, n_cols = x.shape[0], w.shape[0]
    invariant = options.batch_invariant
    if n_rows and choose_policy(w, need_w, invariant) == "vocab":
        budget = chunk_bytes if chunk_bytes > 0 else default_chunk_bytes(x.device)
        grads_in = None if lse_grad is None else (lse_grad, entropy_grad)
        return _vocab_pass(x, w, b, target, weight, scale, grads_in, options, budget,
                           chunk_size, need_x, need_w, need_b)
    head = _Head(w, b)
    if chunk_size <= 0:
        if invariant:
            chunk_size = invariant_chunk_size(n_cols)
        elif chunk_bytes > 0:
            chunk_size = max(1, min(n_rows, chunk_bytes // max(n_cols * 4, 1)))
        else:
            chunk_size = default_chunk_size(n_rows, n_cols, x.shape[1], x.device)
    pass_spec = options
    if invariant and options.impl == "torch":
        rows_pt = max(1, torch_impl.CHUNK_ELEMENTS // n_cols)
        if chunk_size <= rows_pt or chunk_size % rows_pt == 0:
            pass_spec = options.replace(batch_invariant=False)  # its row chunks are fixed too
    any_grad = need_x or need_w or need_b
    grad_x = torch.empty_like(x) if need_x else x.new_empty(0)
    acc_w = torch.zeros(w.shape if need_w else (0,), dtype=head.acc, device=w.device)
    acc_b = torch.zeros(n_cols if need_b else 0, dtype=head.acc, device=w.device)
    buf_rows = chunk_size if invariant else min(chunk_size, n_rows)
    buf = torch.empty(buf_rows, n_cols, dtype=head.acc, device=x.device)
    pad = _Padding(buf_rows, options.ignore_index) if invariant else None
    parts = []
    for r0 in range(0, n_rows, chunk_size):
        r1 = min(r0 + chunk_size, n_rows)
        n = r1 - r0

        def rows_of(v: Tensor | None) -> Tensor | None:
            if v is None:
                return v
            return pad.rows(v, r0, r1) if pad is not None else v[r0:r1]

        x_c = rows_of(x)
        logits = head.logits(x_c, buf[: x_c.shape[0]])
        grads_in = None if lse_grad is None else (rows_of(lse_grad), rows_of(entropy_grad))
        part = run_pass(logits, rows_of(target), weight,
                        scale if scale.numel() == 1 else rows_of(scale), pass_spec,
                        logits if any_grad else None, stat_grads=grads_in)
        parts.append(RowResults(*(v[:n] for v in part)))
        # Now ``logits`` holds the gradient of the chunk's logits, in the accumulation dtype
        # (exact zeros in padded rows, whose targets are ignored).
        if need_x and x_c.shape[0] == n:
            torch.mm(logits.to(w.dtype), w, out=grad_x[r0:r1])
        elif need_x:
            grad_x[r0:r1] = torch.mm(logits.to(w.dtype), w)[:n]
        if need_w:
            acc_w.addmm_(logits.t(), x_c.to(head.acc))
        if need_b:
            acc_b += logits.sum(dim=0)
    rows = RowResults(*(torch.cat([getattr(p, f) for p in parts]) if parts
                        else x.new_empty(0, dtype=head.acc) for f in RowResults._fields))
    return (*rows, grad_x, acc_w.to(w.dtype), acc_b.to(b.dtype if b is not None else w.dtype))


def vocab_parallel_linear_pass(x: Tensor, w: Tensor, b: Tensor | None, target: Tensor,
                               weight: Tensor | None, scale: Tensor,
                               lse_grad: Tensor | None, entropy_grad: Tensor | None,
                               options: LossSpec, chunk_size: int, chunk_bytes: int,
                               need_x: bool, need_w: bool, need_b: bool, group,
                               layout, reduce_input: bool = True) -> tuple[Tensor, ...]:
    """``linear_ce_pass`` for this rank's vocabulary slice of the head (``layout``, from
    ``fusedce.distributed.vocab_layout``): always the ``"vocab"`` policy, its merges over the
    group (``grad_input`` summed over it unless ``reduce_input`` is False: sequence
    parallelism's reduce-scatter sums it instead).  Not a custom op (a process group is not an
    op argument)."""
    budget = chunk_bytes if chunk_bytes > 0 else default_chunk_bytes(x.device)
    grads_in = None if lse_grad is None else (lse_grad, entropy_grad)
    return _vocab_pass(x, w, b, target, weight, scale, grads_in, options, budget, chunk_size,
                       need_x, need_w, need_b, group=group, start=layout.vocab_start,
                       n_classes=layout.n_classes, reduce_input=reduce_input)


class _Padding:
    """Fixed-size row chunks for ``batch_invariant``: a chunk of fewer rows is copied into a
    scratch of ``rows`` rows whose extra rows are zeros (targets: ignored)."""

    def __init__(self, rows: int, ignore_index: int):
        self.size, self.ignore_index = rows, ignore_index
        self.scratch: dict[int, Tensor] = {}

    def rows(self, v: Tensor, r0: int, r1: int) -> Tensor:
        n = r1 - r0
        if n == self.size:
            return v[r0:r1]
        key = id(v)  # one scratch per padded tensor (hidden states, targets, factors, ...)
        if key not in self.scratch:
            fill = self.ignore_index if v.dtype == torch.int64 else 0
            self.scratch[key] = torch.full((self.size, *v.shape[1:]), fill, dtype=v.dtype,
                                           device=v.device)
        out = self.scratch[key]
        out[:n] = v[r0:r1]
        return out


# The pass as the custom op ``fusedce::linear_ce_pass`` (what ``torch.compile`` traces), and the
# callable the autograd Function uses (the op while compiling, the function itself in eager).
_linear_ce_pass_op, linear_ce_pass = _custom_op("fusedce::linear_ce_pass", _linear_ce_pass_impl)


@_linear_ce_pass_op.register_fake
def _(x, w, b, target, weight, scale, lse_grad, entropy_grad, spec, chunk_size, chunk_bytes,
      need_x, need_w, need_b):
    options = LossSpec.decode(spec)
    n, acc = x.shape[0], options.math_dtype(x.dtype)
    n_stats = n if options.return_stats else 0
    return (x.new_empty(n, dtype=acc), x.new_empty(n, dtype=acc),
            x.new_empty(n if options.has_z_loss else 0, dtype=acc),
            x.new_empty(n_stats, dtype=acc), x.new_empty(n_stats, dtype=acc),
            x.new_empty(n_stats, dtype=torch.int64),
            x.new_empty(x.shape if need_x else (0,)),
            w.new_empty(w.shape if need_w else (0,)),
            x.new_empty((w.shape[0],) if need_b else (0,)))



def __getattr__(name: str):
    if name in ("LinearCrossEntropyFunction", "linear_cross_entropy_outputs"):
        import warnings

        from . import autograd

        warnings.warn(f"fusedce.linear.{name} moved to fusedce.autograd.{name}",
                      DeprecationWarning, stacklevel=2)
        return getattr(autograd, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["check_linear_inputs", "choose_policy", "default_chunk_bytes", "default_chunk_size",
           "invariant_chunk_size", "linear_ce_pass", "policy", "vocab_parallel_linear_pass",
           "vocab_plan"]
