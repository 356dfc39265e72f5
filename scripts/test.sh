#!/usr/bin/env bash
# Set up and run the test suite: natively on CUDA when a GPU is present, otherwise with the
# Triton kernels in Triton's interpreter on CPU tensors (tests/conftest.py sets
# TRITON_INTERPRET=1).  Extra arguments go to pytest.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$root/scripts/setup.sh" test
cd "$root"
python -m pytest tests "$@"
