"""The one source of fusedce's keyword options: each option's name, default, type, check and
one-line doc are written here once.

The public functions and modules take PyTorch's own arguments explicitly (``weight``,
``ignore_index``, ``reduction``, ``label_smoothing``, in PyTorch's order) and every other option
through ``**options``; ``public(entry)`` gives each its full signature (``inspect.signature``,
``help()`` and IDEs see every keyword with its default) and fills the ``{options}`` line of its
docstring from this table, and ``collect`` checks the keywords a call was given (an unknown one
is a ``TypeError``, as for any Python function) and fills in the defaults.  A new option is an
entry here, a ``LossSpec`` field when the passes need it, and its math;
``tests/test_options.py`` fails when a public function or module drifts from the table.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import textwrap
from collections.abc import Callable
from typing import Any

import torch

# Entry points (which public function or module takes an option).
CE = "cross_entropy"
LINEAR = "linear_cross_entropy"
CE_MODULE = "CrossEntropyLoss"
LINEAR_MODULE = "LinearCrossEntropyLoss"
FUNCTIONS = frozenset({CE, LINEAR})
MODULES = frozenset({CE_MODULE, LINEAR_MODULE})
EVERYWHERE = FUNCTIONS | MODULES


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive(name: str) -> Callable[[Any], None]:
    def check(value) -> None:
        if not _is_number(value) or not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return check


def _one_of(name: str, values: tuple) -> Callable[[Any], None]:
    def check(value) -> None:
        if value not in values:
            raise ValueError(f"{name} must be one of {values}, got {value!r}")
    return check


def _boolean(name: str) -> Callable[[Any], None]:
    def check(value) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return check


def _check_softcap(value) -> None:
    if value is not None and not (_is_number(value) and math.isfinite(value) and value > 0):
        raise ValueError(f"softcap must be None or a finite number > 0, got {value!r}")


def _check_z_scale(value) -> None:
    if not _is_number(value) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"lse_square_scale must be a finite number >= 0, got {value!r}")


def _check_out_dtype(value) -> None:
    if value is not None and not (isinstance(value, torch.dtype) and value.is_floating_point):
        raise TypeError(f"out_dtype must be a floating-point torch.dtype, got {value!r}")


def _positive_int(name: str):
    def check(value) -> None:
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    return check


_check_chunk_size = _positive_int("chunk_size")


@dataclasses.dataclass(frozen=True)
class Option:
    """One keyword option: ``check`` raises on a bad value (tensors are checked where their
    shapes are known, in ``fusedce.checks``)."""

    name: str
    default: Any
    annotation: str
    doc: str
    where: frozenset[str] = EVERYWHERE
    check: Callable[[Any], None] | None = None


OPTIONS: tuple[Option, ...] = (
    Option("impl", "auto", 'Literal["auto", "triton", "torch"]',
           '"auto" (Triton kernels for CUDA tensors, PyTorch otherwise and for float64), '
           '"triton" or "torch".', check=_one_of("impl", ("auto", "triton", "torch"))),
    Option("inplace_backward", False, "bool",
           "write the gradient into the logits' storage, so no logits-sized buffer is "
           "allocated; the logits are consumed (see docs/reference.md).",
           frozenset({CE, CE_MODULE}), _boolean("inplace_backward")),
    Option("logit_scale", 1.0, "float",
           "multiply the logits by this (> 0) first (Cohere/Granite-style scaling).",
           check=_positive("logit_scale")),
    Option("softcap", None, "float | None",
           "then cap them to softcap * tanh(logits / softcap) (Gemma-2 style), or None.",
           check=_check_softcap),
    Option("lse_square_scale", 0.0, "float",
           "z-loss: add lse_square_scale * lse**2 per counted target (times its class "
           "weight), reduced like the loss.", check=_check_z_scale),
    Option("num_items_in_batch", None, "int | Tensor | None",
           "with reduction='mean', divide the summed loss by this instead (the real tokens "
           "of a whole gradient-accumulation step); a device tensor is never read on the "
           "host.", FUNCTIONS),
    Option("return_stats", False, "bool",
           "also return a CrossEntropyStats (lse, z_loss, accuracy, entropy, argmax), "
           "computed in the same pass.", check=_boolean("return_stats")),
    Option("out_dtype", None, "torch.dtype | None",
           "dtype of the returned loss, e.g. torch.float32 from bf16 logits (the math is "
           "float32 or better either way).", check=_check_out_dtype),
    Option("process_group", None, "ProcessGroup | None",
           "vocabulary parallelism: this rank holds a contiguous slice of the classes (its "
           "logits, or its rows of linear_weight and linear_bias; see docs/distributed.md).",
           frozenset({CE, CE_MODULE, LINEAR})),
    Option("sequence_parallel", False, "bool",
           "with process_group: input holds this rank's contiguous slice of the tokens (rank "
           "order, equal slices) and target every token; the hidden states are gathered inside "
           "and grad_input is this rank's slice (a reduce-scatter), as Megatron's sequence "
           "parallelism expects.", frozenset({LINEAR}), _boolean("sequence_parallel")),
    Option("chunk_size", None, "int | None",
           "rows per chunk (or per block of a vocabulary tile) of the fused linear pass; None "
           "derives it from chunk_bytes.", frozenset({LINEAR, LINEAR_MODULE}), _check_chunk_size),
    Option("chunk_bytes", None, "int | None",
           "bound on the fused linear pass's logits-sized workspace in bytes; None: 1.5 GiB "
           "(at most 1/8 of the free CUDA memory) when the vocabulary is tiled, else chunks "
           "of float32 logits about the size of the hidden states (docs/fused-linear.md).",
           frozenset({LINEAR, LINEAR_MODULE}), _positive_int("chunk_bytes")),
    Option("backward", "auto", 'Literal["auto", "stored", "recompute"]',
           '"stored" (the forward writes the gradient), "recompute" (the backward does, '
           'grad_output folded in) or "auto" (recompute for reduction="none").',
           check=_one_of("backward", ("auto", "stored", "recompute"))),
    Option("temperature", 1.0, "float",
           "divide the (scaled, capped) logits by this (> 0) last: everything is that of "
           "softmax(z / temperature).", check=_positive("temperature")),
    Option("token_weight", None, "Tensor | None",
           "the target's shape: multiplies each counted token's loss (advantages, masks); "
           "mean divides by the counted tokens' weights.", FUNCTIONS),
    Option("differentiable_stats", False, "bool",
           "with return_stats, stats.lse and stats.entropy carry gradients.",
           check=_boolean("differentiable_stats")),
    Option("batch_invariant", False, "bool",
           "each row's results are bitwise independent of the other rows and their number.",
           check=_boolean("batch_invariant")),
    Option("validate_targets", False, "bool",
           "read the targets on the host first and raise ValueError naming the first one "
           "outside [0, C) that is not ignore_index (a synchronisation on CUDA; without it "
           "the kernels give such a row NaN, the PyTorch implementation raises anyway).",
           check=_boolean("validate_targets")),
)
BY_NAME = {o.name: o for o in OPTIONS}


def keyword_options(entry: str) -> list[Option]:
    """The options ``entry`` takes through ``**options``, in the table's order."""
    return [o for o in OPTIONS if entry in o.where]


def docs(entry: str, indent: int = 8) -> str:
    """The Args lines of ``entry``'s options, for its docstring."""
    lines = []
    for o in keyword_options(entry):
        text = f"{o.name}: {o.doc} Default {o.default!r}."
        lines.append(textwrap.fill(text, 96 - indent, initial_indent=" " * indent,
                                   subsequent_indent=" " * (indent + 4)))
    return "\n".join(lines).lstrip()


def public(entry: str):
    """Decorate a public function (or a module's ``__init__``) that takes ``**options``: its
    signature lists every option of ``entry`` as a keyword-only parameter with its default,
    and ``{options}`` in its docstring becomes their docs."""

    def decorate(fn):
        sig = inspect.signature(fn)
        params = [p for p in sig.parameters.values() if p.kind != p.VAR_KEYWORD]
        taken = {p.name for p in params}
        params += [inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=o.default,
                                     annotation=o.annotation)
                   for o in keyword_options(entry) if o.name not in taken]
        fn.__signature__ = sig.replace(parameters=params)
        if fn.__doc__ and "{options}" in fn.__doc__:
            fn.__doc__ = fn.__doc__.replace("{options}", docs(entry))
        fn.__fusedce_entry__ = entry
        return fn

    return decorate


def public_class(entry: str):
    """``public`` for a module class: its ``__init__`` (decorated with ``public``) gives the
    signature, and ``{options}`` in the class docstring becomes the options' docs."""

    def decorate(cls):
        if cls.__doc__ and "{options}" in cls.__doc__:
            cls.__doc__ = cls.__doc__.replace("{options}", docs(entry))
        return cls

    return decorate


_KNOWN: dict[str, dict[str, Option]] = {}


def collect(entry: str, given: dict) -> dict:
    """The options of a call of ``entry`` (the keywords it got through ``**options``), checked
    and with every default filled in: an unknown keyword is the ``TypeError`` Python raises.
    (Defaults are valid: only the given values are checked, which keeps a call's overhead
    small.)"""
    known = _KNOWN.get(entry)
    if known is None:
        known = _KNOWN[entry] = {o.name: o for o in keyword_options(entry)}
    for name in given:
        if name not in known:
            raise TypeError(f"{entry}() got an unexpected keyword argument {name!r}")
    out = {name: o.default for name, o in known.items()}
    for name, value in given.items():
        check = known[name].check
        if check is not None:
            check(value)
        out[name] = value
    return out


__all__ = ["BY_NAME", "OPTIONS", "Option", "collect", "docs", "keyword_options", "public",
           "public_class"]
