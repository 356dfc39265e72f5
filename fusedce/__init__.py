"""fusedce: fused cross-entropy for large-vocabulary language-model training.

``cross_entropy`` and ``CrossEntropyLoss`` mirror PyTorch's function and module; the Triton
kernels (``fusedce.kernels``) run for CUDA tensors, a PyTorch implementation with the same
semantics (``fusedce.torch_impl``) everywhere else; ``fusedce.testing`` holds the float64 oracle
the tests and benchmarks compare both against.  ``docs/`` has the reference.
"""

from .autograd import CrossEntropyFunction, LinearCrossEntropyFunction
from .checks import resolve_impl
from .diagnostics import LabelError, LabelReport, LossMonitor, check_labels
from .distill import DistillationStats, distillation_loss, linear_distillation_loss
from .functional import (
    CrossEntropyStats,
    cross_entropy,
    cross_entropy_dtensor,
    linear_cross_entropy,
    linear_cross_entropy_dtensor,
    linear_cross_entropy_head,
    token_logprobs,
)
from .module import CrossEntropyLoss, LinearCrossEntropyLoss
from .shifted import (
    MultiTokenStats,
    count_targets,
    shifted_cross_entropy,
    shifted_linear_cross_entropy,
    shifted_targets,
)
from .spec import LossSpec

__version__ = "0.2.0"

__all__ = [
    # The losses: from logits, from hidden states (the LM head fused), and as modules.
    "CrossEntropyLoss",
    "CrossEntropyStats",
    "LinearCrossEntropyLoss",
    "cross_entropy",
    "cross_entropy_dtensor",
    "DistillationStats",
    "distillation_loss",
    "linear_distillation_loss",
    "linear_cross_entropy_dtensor",
    "linear_cross_entropy_head",
    "linear_cross_entropy",
    "token_logprobs",
    # Next-token and multi-token losses that take the labels as they come.
    "MultiTokenStats",
    "count_targets",
    "shifted_cross_entropy",
    "shifted_linear_cross_entropy",
    "shifted_targets",
    # Loss diagnostics: users' common loss bugs, reported before they cost a run.
    "LabelError",
    "LabelReport",
    "LossMonitor",
    "check_labels",
    # For frameworks that call the autograd Functions directly; the choice of implementation.
    "CrossEntropyFunction",
    "LinearCrossEntropyFunction",
    "LossSpec",
    "resolve_impl",
    "__version__",
]
