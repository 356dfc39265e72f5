"""Fused linear cross-entropy workloads: loss of ``x @ W.T`` from hidden states ``x`` (N, H) and
an LM head ``W`` (C, H), forward + backward (mean, grad_output = 1).

Contenders: fusedce.linear_cross_entropy (its default policy, and each policy forced); the
unfused path (``x @ W.T`` then
``F.cross_entropy``); PyTorch's chunked ``F.linear_cross_entropy`` (with
``LinearCrossEntropyOptions()``, where this PyTorch has it); and, when installed, Liger-Kernel's
fused linear cross-entropy and Apple's Cut Cross-Entropy (its Triton kernels on CUDA; its
``torch_compile`` path wherever it runs, the CPU included).  Peak memory is above the inputs
(x, W, targets); the gradients of x and W, which every contender must produce, are counted.
Errors: the loss, and the gradient of x on a sample of rows, against float64.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor

import fusedce
from fusedce.testing import make_targets, rel_err

from .cells import Result, measure
from .contenders import Contender, _always, _cuda_only, _needs


def _fusedce(policy: str | None = None):
    from fusedce import linear

    def loss(x, w, t):
        with linear.policy(policy):
            return fusedce.linear_cross_entropy(x, w, t)

    return lambda: loss


def _unfused():
    return lambda x, w, t: F.cross_entropy(x @ w.t(), t)


def _torch_chunked():
    options = torch.nn.LinearCrossEntropyOptions()
    return lambda x, w, t: F.linear_cross_entropy(x, w, t, options=options)


def _has_torch_chunked(device: torch.device) -> str | None:
    ok = hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")
    return None if ok else f"not in torch {torch.__version__}"


def _liger():
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss()
    return lambda x, w, t: loss(w, x, t)


def _cce():
    from cut_cross_entropy import linear_cross_entropy

    return lambda x, w, t: linear_cross_entropy(x, w, t)


def _cce_torch():
    from cut_cross_entropy import linear_cross_entropy

    return lambda x, w, t: linear_cross_entropy(x, w, t, impl="torch_compile")


LINEAR_CONTENDERS: dict[str, Contender] = {
    c.name: c
    for c in [
        Contender("fusedce", "fusedce.linear_cross_entropy (its default policy)", _fusedce(),
                  _always, package="fusedce"),
        Contender("fusedce-rows", "fusedce.linear_cross_entropy, 'rows' policy forced",
                  _fusedce("rows"), _always, package="fusedce"),
        Contender("fusedce-vocab", "fusedce.linear_cross_entropy, 'vocab' policy forced",
                  _fusedce("vocab"), _always, package="fusedce"),
        Contender("unfused", "F.cross_entropy(x @ W.T, t)", _unfused, _always, package="torch"),
        Contender("torch-chunked",
                  "F.linear_cross_entropy(..., options=LinearCrossEntropyOptions())",
                  _torch_chunked, _has_torch_chunked, package="torch"),
        Contender("liger-flce", "liger_kernel LigerFusedLinearCrossEntropyLoss", _liger,
                  _needs("liger_kernel", _cuda_only), package="liger-kernel"),
        Contender("cut-cross-entropy", "cut_cross_entropy.linear_cross_entropy", _cce,
                  _needs("cut_cross_entropy", _cuda_only), package="cut-cross-entropy"),
        Contender("cut-cross-entropy-torch",
                  "cut_cross_entropy.linear_cross_entropy(impl='torch_compile'): its "
                  "torch.compile'd path (not its Triton kernels), the one that runs on a CPU",
                  _cce_torch, _needs("cut_cross_entropy"), package="cut-cross-entropy",
                  compiled=True),
    ]
}


def parse_shape(text: str) -> tuple[int, int, int]:
    """'TOKENSxHIDDENxVOCAB' -> (tokens, hidden, vocab)."""
    parts = [int(p) for p in text.lower().split("x")]
    if len(parts) != 3:
        raise ValueError(f"linear shape must be TOKENSxHIDDENxVOCAB, got {text!r}")
    return parts[0], parts[1], parts[2]


@dataclasses.dataclass
class LinearCell:
    tokens: int
    hidden: int
    vocab: int
    dtype: torch.dtype
    device: torch.device
    generator: torch.Generator

    def __post_init__(self):
        g = self.generator
        self.x = (torch.randn(self.tokens, self.hidden, generator=g)).to(self.device, self.dtype)
        self.w = (torch.randn(self.vocab, self.hidden, generator=g) * self.hidden**-0.5 * 4
                  ).to(self.device, self.dtype)
        self.target = make_targets(self.tokens, self.vocab, self.device, generator=g)
        self.rows = torch.linspace(0, self.tokens - 1, min(self.tokens, 16)).long().unique()

    def reference(self) -> tuple[Tensor, Tensor]:
        """float64 mean loss (in slices of rows) and the gradient of the sampled rows of x."""
        w64 = self.w.double()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        step = max(1, (1 << 24) // self.vocab)
        for r0 in range(0, self.tokens, step):
            logits = self.x[r0:r0 + step].double() @ w64.t()
            total += F.cross_entropy(logits, self.target[r0:r0 + step], reduction="sum")
        logits = self.x[self.rows].double() @ w64.t()
        p = torch.softmax(logits, dim=1)
        p[torch.arange(len(self.rows)), self.target[self.rows]] -= 1
        return total / self.tokens, (p @ w64) / self.tokens


def run_linear(cell: LinearCell, contender: Contender, loss_fn) -> Result:
    res = Result("linear_fwd_bwd", str(cell.dtype).replace("torch.", ""), cell.tokens,
                 cell.vocab, contender.name, "ok", hidden=cell.hidden)
    x = cell.x.detach().requires_grad_()
    w = cell.w.detach().requires_grad_()

    def step() -> Tensor:
        x.grad = w.grad = None
        loss = loss_fn(x, w, cell.target)
        loss.backward()
        return loss

    def prepare() -> None:
        x.grad = w.grad = None

    def check(loss: Tensor) -> None:
        ref_loss, ref_grad = cell.reference()
        res.loss_err = rel_err(loss.float(), ref_loss)
        res.grad_err = rel_err(x.grad[cell.rows].float(), ref_grad)

    seconds = measure(res, step, cell.device, prepare=prepare, check=check,
                      compiled=contender.compiled, cpu_reps=3)
    if seconds is not None:
        # 3 matrix products of 2*N*H*C flops each: logits, grad_input, grad_weight.
        res.tflops = 6 * cell.tokens * cell.hidden * cell.vocab / seconds / 1e12
    x.grad = w.grad = None
    if cell.device.type == "cuda":
        torch.cuda.empty_cache()
    return res


__all__ = ["LINEAR_CONTENDERS", "LinearCell", "parse_shape", "run_linear"]
