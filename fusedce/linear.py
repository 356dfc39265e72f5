"""Fused linear cross-entropy: the loss from hidden states and the LM head, never materialising
the logits.

Tokens are processed in chunks.  For each chunk the logits are made with one matrix product into
a reused chunk buffer, the cross-entropy pass (Triton kernel or PyTorch implementation) turns
them into per-row losses and overwrites them with their gradient, and that gradient immediately
gives the chunk's ``grad_input`` (``g @ W``) and is accumulated into ``grad_linear_weight``
(``g^T @ x``, in float32 for 16-bit weights) and ``grad_linear_bias``.  All of this happens in
the forward, so the backward only scales those small tensors by ``grad_output``.

With ``reduction="none"`` the gradient depends on a per-token ``grad_output`` that the forward
does not know, and a sum over tokens (``grad_linear_weight``) cannot be rescaled afterwards; the
forward then computes only the loss, and the backward makes one more chunked pass with the
per-token factors fed to the kernel.

Peak extra memory: one chunk of logits (plus, for 16-bit weights, a float32 copy of the chunk's
gradient and inputs for the float32 weight-gradient product), besides the gradients that must
exist anyway and the float32 weight-gradient accumulator.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .autograd import (
    CrossEntropyOutputs,
    Impl,
    Reduction,
    RowResults,
    _run_pass,
    finish,
    reduction_scale,
)

# Logits elements per chunk when the hidden states are smaller than this: 8 Mi (16 MiB bf16),
# enough rows (256 at a 32768 vocabulary) for efficient matrix products.
MIN_CHUNK_ELEMENTS = 1 << 23


def default_chunk_size(n_rows: int, n_cols: int, hidden: int, element_size: int,
                       device: torch.device) -> int:
    """Rows per chunk: logits about the size of the hidden states (at least 8 Mi elements), so
    neither many tiny products nor an oversized buffer; on CUDA at most 1/8 of free memory.
    Multiples of 64 rows keep the matrix products efficient."""
    target = max(n_rows * hidden, MIN_CHUNK_ELEMENTS)
    rows = max(1, target // max(n_cols, 1))
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        rows = min(rows, max(1, free // 8 // max(n_cols * element_size, 1)))
    if rows >= 64:
        rows -= rows % 64
    return max(1, min(rows, n_rows))


def _chunks(n_rows: int, chunk_size: int):
    for r0 in range(0, n_rows, chunk_size):
        yield r0, min(r0 + chunk_size, n_rows)


def _logits_chunk(x_c: Tensor, w: Tensor, b: Tensor | None, out: Tensor) -> Tensor:
    if b is None:
        return torch.mm(x_c, w.t(), out=out)
    return torch.addmm(b, x_c, w.t(), out=out)


def chunked_pass(
    x: Tensor,
    w: Tensor,
    b: Tensor | None,
    target: Tensor,
    weight: Tensor | None,
    scale: Tensor,
    ignore_index: int,
    label_smoothing: float,
    logit_scale: float,
    softcap: float | None,
    lse_square_scale: float,
    compute_accuracy: bool,
    impl: Impl,
    chunk_size: int,
    need: tuple[bool, bool, bool],
) -> tuple[RowResults, Tensor | None, Tensor | None, Tensor | None]:
    """One chunked pass: per-row results and, as ``need`` asks, the gradients of ``x``, ``w``
    and ``b`` scaled by ``scale`` ((1,) or one factor per row)."""
    n_rows, n_cols = x.shape[0], w.shape[0]
    any_grad = any(need)
    grad_x = torch.empty_like(x) if need[0] else None
    acc_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need[1] else None
    acc_b = torch.zeros(n_cols, dtype=torch.float32, device=w.device) if need[2] else None
    buf = torch.empty(min(chunk_size, n_rows), n_cols, dtype=x.dtype, device=x.device)
    parts = []
    for r0, r1 in _chunks(n_rows, chunk_size):
        x_c = x[r0:r1]
        logits = _logits_chunk(x_c, w, b, buf[: r1 - r0])
        rows = _run_pass(logits, target[r0:r1], weight, scale if scale.numel() == 1
                         else scale[r0:r1], ignore_index, label_smoothing, logit_scale, softcap,
                         lse_square_scale, compute_accuracy, impl,
                         logits if any_grad else None, None, None)
        parts.append(rows)
        if not any_grad:
            continue
        g = logits  # now the gradient of the chunk's logits
        if grad_x is not None:
            torch.mm(g, w, out=grad_x[r0:r1])
        if acc_w is not None:
            if g.dtype == torch.float32:
                acc_w.addmm_(g.t(), x_c)
            else:  # float32 accumulation of 16-bit products
                acc_w.addmm_(g.t().float(), x_c.float())
        if acc_b is not None:
            acc_b += g.sum(dim=0, dtype=torch.float32)
    rows = RowResults(*(torch.cat([getattr(p, f) for p in parts]) if parts
                        else x.new_empty(0, dtype=torch.float32) for f in RowResults._fields))
    grad_w = acc_w if acc_w is None or w.dtype == torch.float32 else acc_w.to(w.dtype)
    grad_b = acc_b if acc_b is None or b.dtype == torch.float32 else acc_b.to(b.dtype)
    return rows, grad_x, grad_w, grad_b


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Cross-entropy of ``input @ linear_weight.T + linear_bias`` without the logits tensor.

    Call as::

        LinearCrossEntropyFunction.apply(
            input,             # (N, H) hidden states
            linear_weight,     # (C, H) LM head
            linear_bias,       # (C,) or None
            target,            # (N,) contiguous integer class indices
            weight,            # (C,) float32 contiguous class weights, or None
            ignore_index, reduction, label_smoothing,
            logit_scale, softcap, lse_square_scale,
            num_items_in_batch,  # int | Tensor | None
            compute_accuracy,  # bool
            chunk_size,        # int: rows per chunk
            impl,              # "triton" | "torch"
        )

    and get ``(loss, lse, z_loss, accuracy)``; only ``loss`` is differentiable.  Arguments are
    checked by ``fusedce.linear_cross_entropy``, not here.
    """

    @staticmethod
    def forward(ctx, input, linear_weight, linear_bias, target, weight, ignore_index, reduction,
                label_smoothing, logit_scale, softcap, lse_square_scale, num_items_in_batch,
                compute_accuracy, chunk_size, impl):
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                linear_bias is not None and ctx.needs_input_grad[2])
        scale = reduction_scale(target, weight, ignore_index, reduction, linear_weight.shape[0],
                                num_items_in_batch)
        options = (ignore_index, label_smoothing, logit_scale, softcap, lse_square_scale)
        deferred = reduction == "none" and any(need)
        rows, *grads = chunked_pass(
            input, linear_weight, linear_bias, target, weight, scale, *options,
            compute_accuracy, impl, chunk_size, (False,) * 3 if deferred else need)
        outputs = finish(rows, target, ignore_index, reduction, scale, input.dtype,
                         lse_square_scale != 0.0, compute_accuracy)
        ctx.mark_non_differentiable(*outputs[1:])
        ctx.deferred, ctx.need, ctx.consumed = deferred, need, False
        if deferred:
            ctx.save_for_backward(input, linear_weight, linear_bias, target, weight)
            ctx.options, ctx.chunk_size, ctx.impl = options, chunk_size, impl
        else:
            ctx.save_for_backward(*(g if g is not None else None for g in grads))
        return tuple(outputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output, *unused):
        if ctx.deferred:
            x, w, b, target, weight = ctx.saved_tensors
            # The per-token factors go to the kernel as per-row gradient scales.
            _, *grads = chunked_pass(x, w, b, target, weight, grad_output.float().contiguous(),
                                     *ctx.options, False, ctx.impl, ctx.chunk_size, ctx.need)
        else:
            if ctx.consumed:
                raise RuntimeError(
                    "fusedce.linear_cross_entropy's backward ran twice: it scales the gradients "
                    "made in the forward in place, so retain_graph=True is not supported"
                )
            ctx.consumed = True
            grads = list(ctx.saved_tensors)
            unit = grad_output.device.type == "cpu" and float(grad_output) == 1.0
            for g in grads:
                if g is not None and not unit:
                    g.mul_(grad_output.to(g.dtype))  # small tensors: (N, H), (C, H), (C,)
        return (*grads, None, None, None, None, None, None, None, None, None, None, None, None)


def linear_cross_entropy_outputs(
    input: Tensor,
    linear_weight: Tensor,
    target: Tensor,
    linear_bias: Tensor | None,
    weight: Tensor | None,
    ignore_index: int,
    reduction: Reduction,
    label_smoothing: float,
    logit_scale: float,
    softcap: float | None,
    lse_square_scale: float,
    num_items_in_batch: Tensor | int | None,
    compute_accuracy: bool,
    chunk_size: int,
    impl: Impl,
) -> CrossEntropyOutputs:
    """Through autograd when a gradient is wanted, else a plain chunked pass."""
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (input, linear_weight, linear_bias))
    if wants_grad:
        return CrossEntropyOutputs(*LinearCrossEntropyFunction.apply(
            input, linear_weight, linear_bias, target, weight, ignore_index, reduction,
            label_smoothing, logit_scale, softcap, lse_square_scale, num_items_in_batch,
            compute_accuracy, chunk_size, impl))
    scale = reduction_scale(target, weight, ignore_index, reduction, linear_weight.shape[0],
                            num_items_in_batch)
    rows, *_ = chunked_pass(input, linear_weight, linear_bias, target, weight, scale,
                            ignore_index, label_smoothing, logit_scale, softcap,
                            lse_square_scale, compute_accuracy, impl, chunk_size, (False,) * 3)
    return finish(rows, target, ignore_index, reduction, scale, input.dtype,
                  lse_square_scale != 0.0, compute_accuracy)
