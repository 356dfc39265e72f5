"""fusedce: fused cross-entropy for large-vocabulary language-model training.

``cross_entropy`` and ``CrossEntropyLoss`` mirror PyTorch's function and module; the Triton
kernels (``fusedce.kernels``) run for CUDA tensors, a PyTorch implementation with the same
semantics (``fusedce.reference``) everywhere else.
"""

from .autograd import CrossEntropyFunction
from .functional import CrossEntropyStats, cross_entropy, linear_cross_entropy, resolve_impl
from .linear import LinearCrossEntropyFunction
from .module import CrossEntropyLoss, LinearCrossEntropyLoss

__version__ = "0.1.0"

__all__ = [
    "CrossEntropyFunction",
    "CrossEntropyLoss",
    "CrossEntropyStats",
    "LinearCrossEntropyFunction",
    "LinearCrossEntropyLoss",
    "cross_entropy",
    "linear_cross_entropy",
    "resolve_impl",
    "__version__",
]
