#!/usr/bin/env bash
# Create (or reuse) the virtual environment .venv and install fusedce into it in editable mode
# with the extra named by $1 ("test" or "bench").  Packages the machine already has are reused
# (--system-site-packages), so on a GPU image its CUDA build of torch and its Triton are kept;
# elsewhere torch==2.13.0 is installed (a CPU build where the machine provides one).
set -euo pipefail
extra=${1:-test}
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${FUSEDCE_VENV:-$root/.venv}
py=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
    "$py" -m venv --system-site-packages "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
pip_quiet=(pip install --quiet --disable-pip-version-check)
python -c "import torch" 2>/dev/null || "${pip_quiet[@]}" "torch==2.13.0"
# The test extra installs the framework versions the suite is tested with
# (scripts/test-constraints.txt); with a CPU build of torch, Triton (whose interpreter runs the
# kernels in the tests) is pinned too.  A CUDA build of torch keeps the Triton it requires.
constraints=()
if [ "$extra" = test ]; then
    constraints=(-c "$root/scripts/test-constraints.txt")
    if python -c "import sys, torch; sys.exit(torch.version.cuda is not None)" 2>/dev/null; then
        constraints+=(-c "$root/scripts/test-constraints-cpu.txt")
    fi
fi
# An offline machine (no index) that already has the dependencies still gets an editable install.
"${pip_quiet[@]}" "${constraints[@]}" -e "$root[$extra]" \
    || "${pip_quiet[@]}" --no-deps --no-build-isolation -e "$root"
