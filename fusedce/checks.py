"""Argument checks of the public functions: every bad input gets a clear error naming the value,
before anything is computed or written."""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from . import options as _options
from .spec import FIELD_NAMES, Impl, LossSpec

REDUCTIONS = ("none", "mean", "sum")
IMPLS = ("auto", "triton", "torch")
_INT64 = (-(2**63), 2**63 - 1)


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_tensor(name: str, value) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")


def check_logits(input, *, sliced: bool = False) -> int:
    """Check the logits of ``cross_entropy``; return the number of classes (columns)."""
    check_tensor("input", input)
    if not input.is_floating_point():
        raise TypeError(f"input must hold floating-point logits, got dtype {input.dtype}")
    if input.dim() == 0:
        raise ValueError("input must have shape (C,), (N, C) or (N, C, d1, ...), got a scalar")
    n_classes = input.shape[0] if input.dim() == 1 else input.shape[1]
    if n_classes == 0:
        what = "this rank's vocabulary slice" if sliced else "the class dimension"
        raise ValueError(f"input has 0 classes ({what} of shape {tuple(input.shape)} is empty)")
    return n_classes


def check_class_target(input: Tensor, target, class_dim: int | None = 1) -> None:
    """Class-index targets: integers, the input's shape without the class dimension
    (``class_dim``; None for hidden states whose last dimension is not the classes)."""
    check_tensor("target", target)
    if input.dim() == 1:
        expected = ()
    elif class_dim is None:
        expected = tuple(input.shape[:-1])
    else:
        expected = (input.shape[0],) + tuple(input.shape[2:])
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(
            f"target must hold integer class indices of shape {expected}, got dtype "
            f"{target.dtype} and shape {tuple(target.shape)} (class probabilities must be "
            f"floating point with the logits' shape)"
        )
    if tuple(target.shape) != expected:
        if class_dim is not None and tuple(target.shape) == tuple(input.shape):
            raise ValueError(
                f"target has the input's shape {tuple(input.shape)} but holds integers "
                f"({target.dtype}): class-index targets must have the input's shape without the "
                f"class dimension, {expected}; class probabilities must be floating point"
            )
        raise ValueError(
            f"target shape {tuple(target.shape)} does not match input shape "
            f"{tuple(input.shape)}: class-index targets must have shape {expected}"
        )
    if target.device != input.device:
        raise ValueError(f"target is on {target.device} but input is on {input.device}")


def check_class_rows(rows: Tensor, target) -> int:
    """Logits with the classes last, (N, C) or (G, T, C) groups of rows, and one integer
    target per row (flat); return the number of classes."""
    check_tensor("input", rows)
    if not rows.is_floating_point() or rows.dim() not in (2, 3) or rows.shape[-1] == 0:
        raise ValueError(f"logits must be floating point of shape (N, C) or (G, T, C) with "
                         f"C > 0, got dtype {rows.dtype} and shape {tuple(rows.shape)}")
    check_tensor("target", target)
    n_rows = rows.numel() // rows.shape[-1]
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool \
            or tuple(target.shape) != (n_rows,):
        raise ValueError(f"target must hold {n_rows} integer class ids (one per row of logits "
                         f"of shape {tuple(rows.shape)}), got dtype {target.dtype} and shape "
                         f"{tuple(target.shape)}")
    if target.device != rows.device:
        raise ValueError(f"target is on {target.device} but input is on {rows.device}")
    return rows.shape[-1]


def check_weight(weight, n_classes: int | None, device: torch.device) -> None:
    if weight is None:
        return
    check_tensor("weight", weight)
    if weight.dim() != 1 or (n_classes is not None and weight.shape[0] != n_classes):
        raise ValueError(
            f"weight must have shape ({n_classes},), one value per class, "
            f"got {tuple(weight.shape)}"
        )
    if not weight.is_floating_point():
        raise TypeError(f"weight must be floating-point, got dtype {weight.dtype}")
    if weight.device != device:
        raise ValueError(f"weight is on {weight.device} but input is on {device}")
    if weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "weight requires grad, but the class weights get no gradient (as in "
            "torch.nn.functional.cross_entropy): pass weight.detach()"
        )


def check_num_items(num_items_in_batch, reduction: str, device: torch.device):
    """Return ``num_items_in_batch`` ready to use: a Python number when it could be read for
    free (a number, or a CPU tensor), a one-element tensor on ``device`` otherwise (never read
    on the host)."""
    if num_items_in_batch is None:
        return None
    if reduction != "mean":
        raise ValueError(
            "num_items_in_batch replaces the denominator of reduction='mean'; got "
            f"reduction={reduction!r}"
        )
    if isinstance(num_items_in_batch, Tensor):
        if num_items_in_batch.numel() != 1:
            raise ValueError(
                "num_items_in_batch must hold one number, got shape "
                f"{tuple(num_items_in_batch.shape)}"
            )
        if num_items_in_batch.is_complex() or num_items_in_batch.dtype == torch.bool:
            raise TypeError(f"num_items_in_batch must be a real number, got dtype "
                            f"{num_items_in_batch.dtype}")
        if num_items_in_batch.device.type == "cpu" and not torch.compiler.is_compiling():
            value = num_items_in_batch.item()
        elif num_items_in_batch.device.type == "cpu":
            return num_items_in_batch.detach()  # under compilation: not read while tracing
        elif num_items_in_batch.device != device:
            raise ValueError(
                f"num_items_in_batch is on {num_items_in_batch.device} but input is on "
                f"{device}: pass it on the input's device (it is not read on the host), on the "
                f"CPU, or as a number"
            )
        else:
            return num_items_in_batch.detach()
    elif _is_number(num_items_in_batch):
        value = num_items_in_batch
    else:
        raise TypeError(
            "num_items_in_batch must be an int, a one-element tensor or None, got "
            f"{type(num_items_in_batch).__name__}"
        )
    if isinstance(value, float) and not float(value).is_integer() \
            and not isinstance(num_items_in_batch, Tensor):
        raise TypeError(f"num_items_in_batch must be an int, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"num_items_in_batch must be positive, got {value}")
    return value


def check_options(*, reduction: str, label_smoothing, ignore_index) -> None:
    """PyTorch's own arguments (the keyword options are checked by ``fusedce.options``)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    if not _is_number(label_smoothing):
        raise TypeError(f"label_smoothing must be a float, got {type(label_smoothing).__name__}")
    if not 0.0 <= float(label_smoothing) <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if not is_int(ignore_index):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not _INT64[0] <= ignore_index <= _INT64[1]:
        raise ValueError(f"ignore_index must fit in int64, got {ignore_index}")


def check_keywords(options: dict) -> None:
    """Check PyTorch's arguments of a public call (its keywords as a dict; the options were
    checked when ``fusedce.options.collect`` completed them)."""
    check_options(**{k: options[k] for k in ("reduction", "label_smoothing", "ignore_index")})


# Options that keep their meaning for class probabilities (handed to F.cross_entropy).
_PROBABILITY_OK = ("impl", "chunk_size")


def class_only_keywords(options: dict) -> list[str]:
    """The options given (not at their default) that need class-index targets."""
    return [o.name for o in _options.OPTIONS if o.name in options
            and o.name not in _PROBABILITY_OK and not _is_default(options[o.name], o.default)]


def _is_default(value, default) -> bool:
    return value is None if default is None else (value is not None and value == default)


def make_spec(options: dict, impl: Impl) -> LossSpec:
    """Freeze a public call's arguments (its keywords as a dict, options already completed by
    ``fusedce.options.collect``), with the resolved ``impl``, into a ``LossSpec``: the one place
    the flat public keywords become the spec.  Fields named like an option take its value;
    the temperature folds into the transform."""
    check_keywords(options)
    backward = options.get("backward", "auto")
    if backward == "recompute" and options.get("process_group") is not None:
        raise ValueError("backward='recompute' is not available with process_group (the "
                         "vocabulary-parallel backward scales the stored gradient)")
    differentiable = options.get("differentiable_stats", False)
    invariant = options.get("batch_invariant", False)
    if differentiable and not options["return_stats"]:
        raise ValueError("differentiable_stats=True gives stats.lse and stats.entropy "
                         "gradients: pass return_stats=True too")
    if (differentiable or invariant) and options.get("process_group") is not None:
        raise ValueError("differentiable_stats and batch_invariant are not available with "
                         "process_group")
    if differentiable and backward == "stored":
        raise ValueError("differentiable_stats=True recomputes the gradient in the backward: "
                         "backward='stored' cannot hold it")
    values = {k: v for k, v in options.items() if k in FIELD_NAMES}
    # The temperature folds into the transform exactly: softcap(s * x) / T = c/T *
    # tanh((s/T) * x / (c/T)), the transform with scale s / T and cap c / T.
    temperature = float(options.get("temperature", 1.0))
    softcap = options.get("softcap")
    values.update(
        impl=impl, label_smoothing=float(options["label_smoothing"]),
        ignore_index=int(options["ignore_index"]),
        logit_scale=float(options.get("logit_scale", 1.0)) / temperature,
        softcap=None if softcap is None else float(softcap) / temperature,
        lse_square_scale=float(options.get("lse_square_scale", 0.0)))
    return LossSpec(**values)


def check_token_weight(token_weight, target: Tensor) -> None:
    """Per-token weights: floating point, the target's shape and device, no gradient."""
    if token_weight is None:
        return
    check_tensor("token_weight", token_weight)
    if not token_weight.is_floating_point():
        raise TypeError(f"token_weight must be floating point, got dtype {token_weight.dtype}")
    if tuple(token_weight.shape) != tuple(target.shape):
        raise ValueError(f"token_weight must have the target's shape {tuple(target.shape)}, got "
                         f"{tuple(token_weight.shape)}")
    if token_weight.device != target.device:
        raise ValueError(f"token_weight is on {token_weight.device} but target is on "
                         f"{target.device}")
    if token_weight.requires_grad and torch.is_grad_enabled():
        raise ValueError("token_weight requires grad, but it gets no gradient (it weighs the "
                         "loss as advantages or masks do): pass token_weight.detach()")


def check_inplace_target(input: Tensor, logits: Tensor) -> None:
    """``inplace_backward=True`` writes the gradient into ``logits`` (the caller's ``input`` or
    a view of it): refuse, before anything is written, every layout where that would be wrong.

    * elements that overlap (an ``expand``ed or ``as_strided`` tensor): one storage element
      would have to hold several rows' gradients;
    * a leaf that requires grad, or a view of one: its values would be overwritten and its
      ``.grad`` would alias them (PyTorch refuses in-place operations there too).
    """
    if may_overlap(logits):
        raise ValueError(
            f"inplace_backward=True needs logits whose rows do not overlap in memory; got "
            f"shape {tuple(logits.shape)} with strides {logits.stride()} (an expanded or "
            f"as_strided tensor): pass inplace_backward=False, or a contiguous copy"
        )
    if input.is_leaf and input.requires_grad:
        what = "a leaf tensor that requires grad"
    elif _is_view_of_grad_leaf(input):
        what = "a view of a leaf tensor that requires grad"
    else:
        return
    raise RuntimeError(
        f"inplace_backward=True would overwrite {what} (a parameter or an input, whose "
        f"values autograd still needs); PyTorch refuses in-place operations there too.  "
        f"Pass inplace_backward=False, or logits computed from it (e.g. hidden @ W.T)"
    )


def may_overlap(t: Tensor) -> bool:
    """Whether two elements of ``t`` may share a storage element: its dimensions (size > 1),
    sorted by stride, each step past everything the smaller ones span, or it may overlap
    (``expand``, ``as_strided``; conservative for exotic interleaved layouts)."""
    span = 0
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1):
        if stride <= span:
            return True
        span += stride * (size - 1)
    return False


def _storage_span(t: Tensor) -> tuple[int, int, int]:
    """(storage address, first byte, one past the last byte) ``t`` can touch."""
    if t.numel() == 0:
        return t.untyped_storage().data_ptr(), 0, 0
    size = t.element_size()
    first = t.storage_offset() * size
    last = first + sum(st * (sz - 1) for st, sz in zip(t.stride(), t.shape)) * size + size
    return t.untyped_storage().data_ptr(), first, last


def check_inplace_storage(tensors) -> None:
    """``inplace_backward=True`` over several logits tensors of one call (multi-token depths,
    or groups of rows read where they are): refuse, before anything is written, a tensor
    whose elements may overlap and tensors that share storage bytes."""
    spans = []
    for i, t in enumerate(tensors):
        if may_overlap(t):
            raise ValueError(
                f"inplace_backward=True needs logits whose elements do not overlap in memory; "
                f"got shape {tuple(t.shape)} with strides {t.stride()}"
                f"{f' (depth {i + 1})' if len(tensors) > 1 else ''} (an expanded or "
                f"as_strided tensor): pass inplace_backward=False, or a contiguous copy")
        spans.append(_storage_span(t))
    for i, (ptr_i, lo_i, hi_i) in enumerate(spans):
        for j in range(i):
            ptr_j, lo_j, hi_j = spans[j]
            if ptr_i == ptr_j and lo_i < hi_j and lo_j < hi_i:
                raise ValueError(
                    f"inplace_backward=True would write depths {j + 1} and {i + 1} into the "
                    f"same memory (their logits share a storage): pass inplace_backward=False, "
                    f"or separate tensors")


def _is_view_of_grad_leaf(t: Tensor) -> bool:
    """Whether ``t`` is a view (through any chain of view operations) of a leaf that requires
    grad: its autograd history is view nodes down to the leaf's accumulator."""
    if torch.compiler.is_compiling() or not (t.requires_grad and t._is_view()):
        return False  # (autograd history is not inspected while tracing)
    node = t.grad_fn
    while node is not None and type(node).__name__ in _VIEW_NODES:
        node = node.next_functions[0][0]
    return node is not None and type(node).__name__ == "AccumulateGrad"


_VIEW_NODES = {f"{name}Backward0" for name in (
    "View", "Slice", "Select", "AsStrided", "Expand", "T", "Transpose", "Permute", "Unsqueeze",
    "Squeeze", "Alias", "UnsafeView", "Diagonal", "Unfold", "SplitWithSizes", "Split", "Unbind",
    "Narrow", "Unflatten", "Movedim", "ReshapeAlias", "ViewAs")} | {"SqueezeBackward1",
                                                                    "SqueezeBackward2"}


_WARNED: set[str] = set()


def kernels_importable() -> tuple[bool, str]:
    try:
        from . import kernels  # noqa: F401
    except ImportError as exc:  # Triton missing or broken, or fusedce not installed
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


def resolve_impl(impl: str, device: torch.device, dtype: torch.dtype | None = None) -> Impl:
    """Map ``impl`` to the implementation that will run on tensors of ``device`` and ``dtype``.

    ``"auto"`` runs the Triton kernels for CUDA tensors and PyTorch otherwise (and for float64
    logits, which the kernels do not compute in); when the kernels cannot be imported for a
    CUDA tensor it warns once, naming the fix, and runs PyTorch.  ``"triton"`` insists on the
    kernels (an error says why they cannot run); ``"torch"`` forces the PyTorch implementation.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "torch":
        return "torch"
    if dtype == torch.float64:
        if impl == "triton":
            raise ValueError(
                "impl='triton' cannot run float64 logits: the kernels compute in float32; use "
                "impl='torch' (or 'auto'), which computes float64 in float64"
            )
        return "torch"
    importable, why = kernels_importable()
    if impl == "triton":
        if not importable:
            raise RuntimeError(f"impl='triton' cannot run: fusedce.kernels failed to import "
                               f"({why}); install Triton and fusedce (pip install -e .)")
        from .kernels import INTERPRETED

        if device.type == "cuda" or (device.type == "cpu" and INTERPRETED):
            return "triton"
        if device.type == "cpu":
            raise RuntimeError(
                "impl='triton' cannot run: the tensors are on the CPU; set TRITON_INTERPRET=1 "
                "before fusedce.kernels is imported to run the kernels in Triton's "
                "interpreter, or use impl='torch'"
            )
        raise RuntimeError(f"impl='triton' cannot run: the Triton kernels do not run on "
                           f"{device.type} tensors")
    if device.type != "cuda":
        return "torch"
    if not importable:
        if why not in _WARNED:
            _WARNED.add(why)
            warnings.warn(
                f"fusedce: the Triton kernels could not be imported ({why}), so CUDA tensors "
                f"run the slower PyTorch implementation.  Install Triton, and install fusedce "
                f"(pip install -e .) rather than running it from a checkout, to get them.",
                RuntimeWarning, stacklevel=3)
        return "torch"
    return "triton"
