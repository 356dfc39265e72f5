"""fusedce's Triton kernels (installed as ``fusedce.kernels``).

``cross_entropy_kernels``, ``distill_kernels`` and ``soft_kernels`` hold the ``@triton.jit``
code and import only Triton, so any Triton host can launch it; ``cross_entropy``, ``distill``
and ``soft`` hold the PyTorch launch wrappers, which take and return tensors and know nothing
of autograd or ``nn``.
"""

if __name__ == "kernels":
    # Imported as a top-level package, because a checkout's root is on sys.path (``python -m``
    # from it).  That import name belongs to PyPI's ``kernels``, which libraries such as
    # transformers probe for by importing it: look like an empty namespace package to them (no
    # file, no version) rather than like that package, and import nothing.
    __file__ = None
    __all__ = []
else:
    from .cross_entropy import (
        INTERPRETED,
        LaunchConfig,
        Rows,
        ce_bwd,
        ce_fwd,
        ce_reduce,
        ce_row_stats,
        ce_scale,
        launch_config,
        rows_of,
        set_tiling,
        tiling,
    )
    from .distill import kd_fwd, kd_topk
    from .soft import soft_ce

    __all__ = [
        "INTERPRETED",
        "LaunchConfig",
        "Rows",
        "ce_bwd",
        "ce_fwd",
        "ce_reduce",
        "ce_row_stats",
        "ce_scale",
        "kd_fwd",
        "kd_topk",
        "launch_config",
        "rows_of",
        "set_tiling",
        "soft_ce",
        "tiling",
    ]
