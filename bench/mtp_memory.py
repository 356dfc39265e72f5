"""Peak extra memory of a 3-depth multi-token-prediction loss on the CPU: fusedce's one call
against a loop of ``F.cross_entropy`` over ``logits[:, :-d]`` (what MTP code commonly writes).

    python bench/mtp_memory.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fusedce  # noqa: E402
from bench.memory import peak_extra_bytes  # noqa: E402
from fusedce.testing import make_logits  # noqa: E402

cpu = torch.device("cpu")
B, T, V, D = 4, 256, 16384, 3
logits = [make_logits(B * T, V).reshape(B, T, V) for _ in range(D)]
labels = torch.randint(0, V, (B, T))


def ours():
    xs = tuple(x.detach().requires_grad_() for x in logits)
    fusedce.shifted_cross_entropy(xs, labels, impl="torch").backward()


def loop():
    xs = tuple(x.detach().requires_grad_() for x in logits)
    total = 0
    for d, x in enumerate(xs, start=1):
        w = 1.0 if d == 1 else 1.0 / (D - 1)
        total = total + w * F.cross_entropy(x[:, :-d].reshape(-1, V), labels[:, d:].reshape(-1))
    total.backward()


def mib(b):
    return b / 2**20


one = B * T * V * 4
r = {n: min(peak_extra_bytes(f, cpu) for _ in range(3))
     for n, f in (("fusedce", ours), ("loop", loop))}
print(f"logits per depth {mib(one):.0f} MiB (fp32 {B}x{T}x{V}), {D} depths")
for n, v in r.items():
    print(f"{n}: peak extra {mib(v):.0f} MiB = {v / one:.2f} x one depth's logits")
