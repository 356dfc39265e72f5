"""Fused linear cross-entropy: the loss from hidden states and the LM head, never materialising
the logits.

Tokens are processed in chunks.  For each chunk the logits are made with one matrix product into
a reused float32 chunk buffer (a 16-bit product with a float32 result, so no logit is rounded to
16 bits before the loss), the cross-entropy pass (Triton kernel or PyTorch implementation) turns
them into per-row losses and overwrites them with their gradient, and that gradient immediately
gives the chunk's ``grad_input`` (``g @ W``, in the weight's dtype) and is accumulated into
``grad_linear_weight`` (``g^T @ x``, in float32 for 16-bit weights) and ``grad_linear_bias``.
All of this happens in the forward, so the backward only scales those small tensors by
``grad_output``.

With ``reduction="none"`` the gradient depends on a per-token ``grad_output`` that the forward
does not know, and a sum over tokens (``grad_linear_weight``) cannot be rescaled afterwards; the
forward then computes only the loss, and the backward makes one more chunked pass with the
per-token factors fed to the kernel.

The chunked pass is the custom op ``fusedce::linear_ce_pass``, so ``torch.compile`` sees one
opaque node (no graph break, no data-dependent guard).

Peak extra memory: one float32 chunk of logits (plus a 16-bit copy of the chunk's gradient for
the ``grad_input`` product), besides the gradients that must exist anyway and the float32
weight-gradient accumulator.  On the CPU, where PyTorch has no 16-bit product with a float32
result, 16-bit weights are upcast to float32 once per call.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import checks, torch_impl
from .passes import run_pass
from .spec import LossSpec, RowResults, accumulation_dtype

# Logits elements per chunk when the hidden states are smaller than this: 8 Mi (32 MiB float32),
# enough rows (256 at a 32768 vocabulary) for efficient matrix products.
MIN_CHUNK_ELEMENTS = 1 << 23
_16_BIT = (torch.bfloat16, torch.float16)


def check_linear_inputs(input, linear_weight, linear_bias) -> int:
    """Check hidden states, LM head and bias; return the number of classes."""
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
    """The LM head as the chunk products need it: the weight in its dtype for ``grad_input``,
    and what makes float32 (or float64) chunk logits."""

    def __init__(self, w: Tensor, b: Tensor | None):
        self.w, self.acc = w, accumulation_dtype(w.dtype)
        self.b = b.to(self.acc) if b is not None else None
        self.native = w.dtype not in _16_BIT or _has_mm_out_dtype(w.device)
        self.w_acc = w if self.native else w.to(self.acc)  # the CPU upcast, once per call

    def logits(self, x_c: Tensor, out: Tensor) -> Tensor:
        if self.w.dtype in _16_BIT and self.native:
            out.copy_(torch.mm(x_c, self.w.t(), out_dtype=self.acc))
        else:
            torch.mm(x_c.to(self.acc), self.w_acc.t(), out=out)
        if self.b is not None:
            out.add_(self.b)
        return out


@torch.library.custom_op("fusedce::linear_ce_pass", mutates_args=())
def _linear_ce_pass_op(
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
    need_x: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One chunked pass: per-row (loss, lse, z_loss, correct, entropy, argmax) and, as
    ``need_*`` ask, the gradients of x, w and b scaled by ``scale`` ((1,) or one factor per
    row), with the statistics' incoming gradients ``lse_grad``/``entropy_grad`` (N,) folded in
    when given; empty tensors for what is not needed.  ``chunk_size`` 0 picks the default."""
    options = LossSpec.decode(spec)
    n_rows, n_cols = x.shape[0], w.shape[0]
    head = _Head(w, b)
    invariant = options.batch_invariant
    if chunk_size <= 0:
        chunk_size = invariant_chunk_size(n_cols) if invariant else \
            default_chunk_size(n_rows, n_cols, x.shape[1], x.device)
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


@_linear_ce_pass_op.register_fake
def _(x, w, b, target, weight, scale, lse_grad, entropy_grad, spec, chunk_size, need_x, need_w,
      need_b):
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


# The chunked pass under the name the autograd Function calls it by.
linear_ce_pass = _linear_ce_pass_op


def __getattr__(name: str):
    if name in ("LinearCrossEntropyFunction", "linear_cross_entropy_outputs"):
        import warnings

        from . import autograd

        warnings.warn(f"fusedce.linear.{name} moved to fusedce.autograd.{name}",
                      DeprecationWarning, stacklevel=2)
        return getattr(autograd, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["check_linear_inputs", "default_chunk_size", "invariant_chunk_size",
           "linear_ce_pass"]
