"""A static performance model of fusedce's launches (and Liger-Kernel's, side by side), for
machines without a GPU: traffic counted in Triton's interpreter, code compiled offline for
sm_90 with the JIT's own specialisation, and a roofline from named hardware constants.

``python -m bench --suites model`` (or ``python -m bench.model``) writes
``bench/results/model/``.  Every figure it produces is a model, not a GPU measurement.
"""
