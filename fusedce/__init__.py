"""fusedce: fused cross-entropy for large-vocabulary language-model training.

``cross_entropy`` and ``CrossEntropyLoss`` mirror PyTorch's function and module; the Triton
kernels (``fusedce.kernels``) run for CUDA tensors, a PyTorch implementation with the same
semantics (``fusedce.torch_impl``) everywhere else; ``fusedce.testing`` holds the float64 oracle
the tests and benchmarks compare both against.
"""

from .autograd import CrossEntropyFunction, LinearCrossEntropyFunction
from .diagnostics import LabelError, LabelReport, LossMonitor, check_labels
from .functional import (
    CrossEntropyStats,
    cross_entropy,
    cross_entropy_dtensor,
    linear_cross_entropy,
    resolve_impl,
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
    "CrossEntropyFunction",
    "CrossEntropyLoss",
    "CrossEntropyStats",
    "LabelError",
    "LabelReport",
    "LossMonitor",
    "LinearCrossEntropyFunction",
    "LinearCrossEntropyLoss",
    "LossSpec",
    "MultiTokenStats",
    "count_targets",
    "shifted_cross_entropy",
    "shifted_linear_cross_entropy",
    "shifted_targets",
    "cross_entropy",
    "cross_entropy_dtensor",
    "linear_cross_entropy",
    "resolve_impl",
    "check_labels",
    "token_logprobs",
    "__version__",
]
