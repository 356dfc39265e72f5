#!/usr/bin/env bash
# Validate and benchmark on a CUDA machine in one go (no network needed: uses the machine's own
# torch, Triton and packages; peers such as liger-kernel or cut-cross-entropy are used when
# importable, e.g. from wheels unpacked on PYTHONPATH).  Logs and results go to $OUT (or
# ./gpu-out): the test log, then the headline benchmark cells.
#
#   bash scripts/gpu_validate.sh            # tests + headline benchmark
#   bash scripts/gpu_validate.sh --full     # tests + the whole default GPU benchmark
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${OUT:-$root/gpu-out}
mkdir -p "$out"
cd "$root"
export PYTHONUNBUFFERED=1
# An editable install (offline: no dependencies, no build isolation) maps kernels/ to
# fusedce.kernels, as on any other machine.
python3 -m pip install -q --no-deps --no-build-isolation -e "$root" || exit 1
python3 - <<'PY' | tee "$out/versions.txt"
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.version.cuda)
print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0))
PY
# The tests, natively on CUDA (tests/conftest.py leaves TRITON_INTERPRET unset when CUDA exists).
python3 -m pytest tests -q -x -p no:cacheprovider 2>&1 | tee "$out/tests.log"
if [ "${1:-}" = "--full" ]; then
    python3 -m bench --out "$out/bench" 2>&1 | tee "$out/bench.log"
else
    python3 -m bench --suites ce,linear --tokens 8192,16384 --vocab 128256,262144 \
        --dtypes bf16 --modes fwd,fwd_bwd,fwd_bwd_scaled \
        --linear-shapes 8192x4096x128256,8192x4096x262144 --out "$out/bench" \
        2>&1 | tee "$out/bench.log"
fi
