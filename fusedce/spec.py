"""The options of one loss call and the per-row results of one pass: the two types every layer
below the public functions shares (the kernels' launch wrappers, the PyTorch implementation,
autograd, fused linear and vocabulary-parallel code).

``LossSpec`` is checked once by ``fusedce.cross_entropy`` (or ``linear_cross_entropy``) and then
travels unchanged; ``LossSpec.encode``/``LossSpec.decode`` are the one place where it is
flattened, into the string argument that ``torch.library`` custom ops take.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal, NamedTuple

import torch
from torch import Tensor

Impl = Literal["triton", "torch"]
Reduction = Literal["none", "mean", "sum"]
Backward = Literal["auto", "stored", "recompute"]


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """Per-call options of a cross-entropy computation (all plain Python values).

    Attributes:
        ignore_index: target value that counts for nothing.
        reduction: ``"none"``, ``"mean"`` or ``"sum"``.
        label_smoothing: in [0, 1], PyTorch's definition.
        logit_scale: the logits are multiplied by it first (> 0).
        softcap: then capped to ``softcap * tanh(z / softcap)``, or None.  A sampling
            temperature ``T`` is already folded into both (``fusedce.checks.make_spec``):
            ``softcap(s * x) / T`` is the transform with scale ``s / T`` and cap ``c / T``.
        lse_square_scale: z-loss coefficient (PaLM's ``lam * lse**2`` per counted row).
        return_stats: also compute the statistics that need more than the loss (each row's
            first argmax, token accuracy, entropy).
        differentiable_stats: the rows' lse and entropy carry gradients (the backward then
            recomputes the gradient of the logits with their incoming gradients folded in).
        batch_invariant: each row's results are bitwise independent of the other rows and their
            number (a fixed vocabulary tiling; fixed, padded row chunks for PyTorch).
        impl: ``"triton"`` or ``"torch"`` (already resolved).
        inplace_backward: write the gradient into the logits' storage.
        out_dtype: the loss's dtype, or None for the input's.
        backward: ``"stored"`` (the forward writes the gradient, the backward scales it),
            ``"recompute"`` (the forward keeps per-row statistics, the backward writes the
            gradient with ``grad_output`` folded in) or ``"auto"`` (recompute for
            ``reduction="none"``, stored otherwise); see ``recompute_backward``.
    """

    ignore_index: int = -100
    reduction: Reduction = "mean"
    label_smoothing: float = 0.0
    logit_scale: float = 1.0
    softcap: float | None = None
    lse_square_scale: float = 0.0
    return_stats: bool = False
    differentiable_stats: bool = False
    batch_invariant: bool = False
    impl: Impl = "torch"
    inplace_backward: bool = False
    out_dtype: torch.dtype | None = None
    backward: Backward = "auto"
    # Deprecated: the kernels' tiling is not an option of the loss (``fusedce.kernels.tiling``).
    block_size: dataclasses.InitVar[int | None] = None
    n_splits: dataclasses.InitVar[int | None] = None

    def __post_init__(self, block_size: int | None, n_splits: int | None) -> None:
        if block_size is not None or n_splits is not None:
            import warnings

            warnings.warn("LossSpec(block_size=..., n_splits=...) is deprecated: the tiling "
                          "is not an option of the loss; use fusedce.kernels.tiling(...) (it "
                          "is forced now for every later launch)", DeprecationWarning,
                          stacklevel=3)
            from .kernels import set_tiling

            set_tiling(block_size, n_splits)

    # Flags derived from the options: one name each, used by every layer.
    @property
    def has_smoothing(self) -> bool:
        return self.label_smoothing > 0.0

    @property
    def has_scale(self) -> bool:
        return self.logit_scale != 1.0

    @property
    def has_softcap(self) -> bool:
        return self.softcap is not None

    @property
    def has_z_loss(self) -> bool:
        return self.lse_square_scale != 0.0

    @property
    def has_entropy(self) -> bool:
        """Whether a pass tracks the entropy sum ``sum exp(z - m) * (z - m)``."""
        return self.return_stats or self.differentiable_stats

    @property
    def recompute_backward(self) -> bool:
        """Whether the backward recomputes the gradient from the saved logits and per-row
        statistics instead of scaling a gradient the forward stored.

        Traffic per logit (bf16, the forward's second read of a row served by L2): stored costs
        4 bytes when ``grad_output`` is 1 (read, write) and 8 otherwise (the backward reads and
        writes the gradient again, rounding it twice); recompute costs 6 bytes whatever
        ``grad_output`` is (forward: read; backward: read, write).  ``"auto"`` recomputes for
        ``reduction="none"``, whose per-token ``grad_output`` is never all ones, and stores
        otherwise (``grad_output`` 1 is the common case of a mean); pass
        ``backward="recompute"`` when the loss will be scaled (fp16 loss scaling, a division by
        the accumulation steps).  Recompute keeps the logits alive until the backward.
        """
        if self.differentiable_stats:
            return True  # the statistics' gradients are known only in the backward
        if self.backward == "auto":
            return self.reduction == "none"
        return self.backward == "recompute"

    def math_dtype(self, logits_dtype: torch.dtype) -> torch.dtype:
        """The dtype of the per-row results and the reduction scale for logits of
        ``logits_dtype``: ``accumulation_dtype`` (float32; float64 for float64 logits, which
        only the PyTorch implementation takes)."""
        return accumulation_dtype(logits_dtype)

    def replace(self, **changes) -> LossSpec:
        return dataclasses.replace(self, **changes)

    def encode(self) -> str:
        """The spec as one string: the custom ops' single options argument.  Plain string
        operations on constants, so ``torch.compile`` folds it while tracing (eager calls
        reuse the string of an equal spec)."""
        if torch.compiler.is_compiling():
            return _encode(self)
        return _encode_cached(self)

    @staticmethod
    @functools.lru_cache(maxsize=256)
    def decode(text: str) -> LossSpec:
        return LossSpec(**{f.name: _parse(value, f.type)
                           for f, value in zip(_FIELDS, text.split(";"))})


def _parse(value: str, kind: str):
    """A field's value back from ``str`` (the dataclass's annotations are strings here)."""
    if value == "None":
        return None
    if kind == "bool":
        return value == "True"
    if kind == "int":
        return int(value)
    if kind.startswith("float"):
        return float(value)
    if kind.startswith("torch.dtype"):
        return getattr(torch, value)
    return value  # the Literal fields: strings


_DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64", torch.float16: "float16",
                torch.bfloat16: "bfloat16"}


_FIELDS = dataclasses.fields(LossSpec)
FIELD_NAMES = tuple(f.name for f in _FIELDS)  # (constants: torch.compile folds encode())


def _encode(spec: LossSpec) -> str:
    return ";".join(_DTYPE_NAMES[v] if isinstance(v, torch.dtype) else str(v)
                    for v in (getattr(spec, name) for name in FIELD_NAMES))


_encode_cached = functools.lru_cache(maxsize=256)(_encode)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the math runs in for logits of ``dtype``: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class RowResults(NamedTuple):
    """Per-row results of one pass over the logits, in the accumulation dtype (float32; float64
    for float64 logits in the PyTorch implementation), 0 for ignored rows.  A result that was not
    asked for is an empty (0,) tensor (custom ops cannot return None, nor aliases)."""

    loss: Tensor  # (N,) loss, z-loss included, already multiplied by the target's class weight
    lse: Tensor  # (N,) log-sum-exp of the transformed logits
    z_loss: Tensor  # (N,) lse_square_scale * w_t * lse**2, or empty without z-loss
    correct: Tensor  # (N,) 1.0 where the first argmax is the target, or empty without stats
    entropy: Tensor  # (N,) entropy of softmax(z), or empty without stats
    argmax: Tensor  # (N,) int64 first argmax (-1 where ignored), or empty without stats


class RowStats(NamedTuple):
    """Partial statistics of rows of transformed logits ``z``, P partials per row (chunks of the
    vocabulary, or ranks of a vocabulary-parallel group).

    ``partials`` is (4, N, P) in the accumulation dtype: each partial's max ``m_k``, its sum of
    ``exp(z - m_k)``, with label smoothing its sum of ``w * (z - ref)`` where ``ref`` is the
    row's anchor logit (``torch_impl.row_anchor``), so that partials of large logits add up without
    cancellation, and with the entropy (``LossSpec.has_entropy``) its sum of
    ``exp(z - m_k) * (z - m_k)`` (else 0).  Ignored rows give (most negative finite, 0, 0, 0).
    ``argmax`` is (N, P) int32, the first column (global id) reaching ``m_k``, or an empty tensor
    without statistics.
    """

    partials: Tensor
    argmax: Tensor


class VocabSlice(NamedTuple):
    """Vocabulary parallelism: the logits hold global columns ``[start, start + C_local)`` of
    ``n_classes``; ``target_logit`` (N,) is each row's transformed target logit wherever it lives,
    ``target_weight`` (N,) its class weight (or None without weights).  The merged ``RowStats``
    then carry their weighted sums relative to the merged row max."""

    start: int
    n_classes: int
    target_logit: Tensor
    target_weight: Tensor | None


__all__ = ["Backward", "Impl", "LossSpec", "Reduction", "RowResults", "RowStats", "VocabSlice",
           "accumulation_dtype"]
