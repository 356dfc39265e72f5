#!/usr/bin/env bash
# Set up and run the benchmark against PyTorch (and any installed peers) on whatever device is
# present; results go to bench/results/<device>/.  Extra arguments go to `python -m bench`.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$root/scripts/setup.sh" bench
cd "$root"
python -m bench "$@"
