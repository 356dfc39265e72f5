"""The cross-entropy implementations the benchmark compares, each behind one signature.

A contender is a function ``loss(logits, target, reduction) -> Tensor`` plus a check that says
whether it can run on a device (and why not).  Peers are imported only when asked for, so a
missing package is reported as skipped with its reason, never silently dropped.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

import fusedce

LossFn = Callable[[Tensor, Tensor, str], Tensor]


@dataclasses.dataclass
class Contender:
    name: str
    description: str
    build: Callable[[], LossFn]  # called once per run; may import a peer package
    unavailable: Callable[[torch.device], str | None]  # None when it can run, else why not
    package: str | None = None  # distribution whose version is recorded
    inplace: bool = False  # consumes its logits: the harness restores them outside the timing
    compiled: bool = False  # first call includes compilation, reported separately


def _always(device: torch.device) -> str | None:
    return None


def _cuda_only(device: torch.device) -> str | None:
    return None if device.type == "cuda" else "Triton kernels for CUDA only"


def _needs(module: str, also: Callable[[torch.device], str | None] = _always):
    def check(device: torch.device) -> str | None:
        try:
            importlib.import_module(module)
        except Exception as exc:  # ImportError, or a broken install that raises otherwise
            return f"not installed ({type(exc).__name__}: {exc})".splitlines()[0][:160]
        return also(device)

    return check


def _fusedce() -> LossFn:
    return lambda x, t, r: fusedce.cross_entropy(x, t, reduction=r)


class _Activation(torch.autograd.Function):
    """The benchmark's logits as an activation (like the LM head's output), not a leaf: an
    alias of the leaf's storage with an identity backward.  In-place use of a leaf is refused,
    as PyTorch refuses it."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.detach()

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return grad


def _fusedce_inplace() -> LossFn:
    return lambda x, t, r: fusedce.cross_entropy(_Activation.apply(x), t, reduction=r,
                                                 inplace_backward=True)


def _eager() -> LossFn:
    return lambda x, t, r: F.cross_entropy(x, t, reduction=r)


def _compiled() -> LossFn:
    # Default dynamic-shape policy, as a user gets it: recompiles when shapes change.
    compiled = torch.compile(F.cross_entropy)
    return lambda x, t, r: compiled(x, t, reduction=r)


def _hf_upcast() -> LossFn:
    # What transformers' ForCausalLMLoss does: upcast the logits to float32 first.
    return lambda x, t, r: F.cross_entropy(x.float(), t, reduction=r)


def _liger() -> LossFn:
    from liger_kernel.transformers import LigerCrossEntropyLoss

    modules = {r: LigerCrossEntropyLoss(reduction=r) for r in ("mean", "sum", "none")}
    return lambda x, t, r: modules[r](x, t)


def _flash_attn() -> LossFn:
    from flash_attn.ops.triton.cross_entropy import cross_entropy_loss

    def loss(x: Tensor, t: Tensor, r: str) -> Tensor:
        per_row = cross_entropy_loss(x, t)[0]
        if r == "none":
            return per_row
        return per_row.sum() / t.numel() if r == "mean" else per_row.sum()

    return loss


def _no_logits_api(device: torch.device) -> str | None:
    return "no logits-input API (its entry point fuses the LM-head matmul)"


CONTENDERS: dict[str, Contender] = {
    c.name: c
    for c in [
        Contender("fusedce", "fusedce.cross_entropy (Triton on GPU, PyTorch fallback on CPU)",
                  _fusedce, _always, package="fusedce"),
        Contender("fusedce-inplace", "fusedce.cross_entropy(..., inplace_backward=True)",
                  _fusedce_inplace, _always, package="fusedce", inplace=True),
        Contender("torch-eager", "F.cross_entropy", _eager, _always, package="torch"),
        Contender("torch-compile", "torch.compile(F.cross_entropy)", _compiled, _always,
                  package="torch", compiled=True),
        Contender("hf-upcast", "F.cross_entropy(logits.float(), ...) as transformers does",
                  _hf_upcast, _always, package="torch"),
        Contender("liger", "liger_kernel LigerCrossEntropyLoss", _liger,
                  _needs("liger_kernel", _cuda_only), package="liger-kernel"),
        Contender("flash-attn", "flash_attn.ops.triton.cross_entropy", _flash_attn,
                  _needs("flash_attn.ops.triton.cross_entropy", _cuda_only),
                  package="flash-attn"),
        Contender("cut-cross-entropy", "cut_cross_entropy (linear + cross-entropy only)",
                  lambda: None, _no_logits_api, package="cut-cross-entropy"),
    ]
}


def package_version(name: str | None) -> str | None:
    if name is None:
        return None
    if name == "fusedce":
        return fusedce.__version__
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
