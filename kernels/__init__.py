"""fusedce's Triton kernels and their launch wrappers (installed as ``fusedce.kernels``).

This package knows nothing of autograd or ``nn``: its wrappers take and return tensors.
"""

from .cross_entropy import (
    INTERPRETED,
    LaunchConfig,
    RowOutputs,
    RowStats,
    ce_bwd,
    ce_fwd,
    ce_row_stats,
    launch_config,
)

__all__ = [
    "INTERPRETED",
    "LaunchConfig",
    "RowOutputs",
    "RowStats",
    "ce_bwd",
    "ce_fwd",
    "ce_row_stats",
    "launch_config",
]
