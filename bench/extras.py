"""CPU measurements of two features' costs, written to ``bench/results/<device>/extras.md``:

* multi-token prediction: peak extra memory of a 3-depth loss, fusedce's one call against a loop
  of ``F.cross_entropy`` over ``logits[:, :-d]`` (what MTP code commonly writes);
* ``batch_invariant=True``: time of the PyTorch implementation against the default;
* forward-only entry points (RL rollouts, evaluation): ``token_logprobs`` and ``return_stats``
  under ``torch.no_grad()`` against the eager operations they replace, interleaved;
* distillation: time, peak extra memory and error of ``fusedce.distillation_loss`` (and of the
  fused linear form from hidden states) against the unfused formula (log-softmax of both,
  ``F.kl_div``; TRL's generalized JSD), forward + backward.

    python -m bench.extras
"""

from __future__ import annotations

import datetime
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import fusedce
from bench.device import device_name, device_slug
from bench.memory import peak_extra_bytes
from fusedce.testing import make_logits, make_targets

CPU = torch.device("cpu")
RESULTS = Path(__file__).resolve().parent / "results"


def mtp_memory(b_n: int = 4, t_n: int = 256, vocab: int = 16384, depths: int = 3) -> list[str]:
    logits = [make_logits(b_n * t_n, vocab).reshape(b_n, t_n, vocab) for _ in range(depths)]
    labels = torch.randint(0, vocab, (b_n, t_n))

    def fused():
        xs = tuple(x.detach().requires_grad_() for x in logits)
        fusedce.shifted_cross_entropy(xs, labels, impl="torch").backward()

    def loop():
        total = 0.0
        for d, x in enumerate(logits, start=1):
            x = x.detach().requires_grad_()
            w = 1.0 if d == 1 else 1.0 / (depths - 1)
            total = total + w * F.cross_entropy(x[:, :-d].reshape(-1, vocab),
                                                labels[:, d:].reshape(-1))
        total.backward()

    one = b_n * t_n * vocab * 4
    lines = [f"## Multi-token prediction: {depths} depths of float32 ({b_n}, {t_n}, {vocab}) "
             f"logits ({one >> 20} MiB each), forward + backward", "",
             "| computation | peak extra MiB (min of 3) | x one depth's logits |", "|---|---|---|"]
    for name, fn in (("fusedce.shifted_cross_entropy(tuple)", fused),
                     ("loop of F.cross_entropy(logits[:, :-d])", loop)):
        peak = min(peak_extra_bytes(fn, CPU) for _ in range(3))
        lines.append(f"| {name} | {peak / 2**20:.0f} | {peak / one:.2f} |")
    return lines


def _median_ms(fn, repeats: int = 9) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[repeats // 2] * 1e3


def invariance_cost() -> list[str]:
    lines = ["## batch_invariant=True, PyTorch implementation (median of 9)", "",
             "| dtype | shape | fwd+bwd ms (off -> on) | forward ms (off -> on) |",
             "|---|---|---|---|"]
    for dtype in (torch.float32, torch.bfloat16):
        for n, c in ((2048, 32768), (64, 131072)):
            x, t = make_logits(n, c, dtype), make_targets(n, c)
            cells = []
            for grad in (True, False):
                ms = []
                for invariant in (False, True):
                    def step(invariant=invariant, grad=grad):
                        with torch.set_grad_enabled(grad):
                            logits = x.clone().requires_grad_() if grad else x
                            loss = fusedce.cross_entropy(logits, t, impl="torch",
                                                         batch_invariant=invariant)
                            if grad:
                                loss.backward()
                    ms.append(_median_ms(step))
                cells.append(f"{ms[0]:.1f} -> {ms[1]:.1f} ({ms[1] / ms[0]:.2f}x)")
            lines.append(f"| {str(dtype)[6:]} | {n} x {c} | {cells[0]} | {cells[1]} |")
    return lines


def _interleaved_ms(fns: dict, repeats: int) -> dict:
    """Median ms of each function, called in turn (one warm-up each), so that a shared
    machine's slow spells fall on all of them alike."""
    for fn in fns.values():
        fn()
    times: dict = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: sorted(v)[repeats // 2] * 1e3 for name, v in times.items()}


def _eager_stats(x, t):
    """The loss, entropy and accuracy with eager operations, as evaluation code writes them."""
    log_q = F.log_softmax(x.float(), -1)
    loss = F.nll_loss(log_q, t)
    entropy = -(log_q.exp() * log_q).sum(-1)
    counted = t != -100
    accuracy = ((x.argmax(-1) == t) & counted).sum() / counted.sum()
    return loss, entropy, accuracy


def forward_entry_points() -> list[str]:
    lines = ["## Forward-only entry points, PyTorch implementation, no gradient (interleaved "
             "medians of 25 at 256 tokens, 9 at 2048)", "",
             "| dtype | shape | token_logprobs (batch-invariant) | -F.cross_entropy(none) | "
             "log_softmax + gather | cross_entropy(return_stats=True) | eager loss + entropy "
             "+ accuracy |", "|---|---|---|---|---|---|---|"]
    for dtype in (torch.float32, torch.bfloat16):
        for n, c in ((256, 32000), (2048, 32000), (256, 128256)):
            xs = [make_logits(n, c, dtype) for _ in range(4)]
            t = make_targets(n, c)
            state = {"i": 0}

            def x():  # (rotating inputs: not served from the cache)
                state["i"] = (state["i"] + 1) % len(xs)
                return xs[state["i"]]
            with torch.no_grad():
                ms = _interleaved_ms({
                    "logprobs": lambda: fusedce.token_logprobs(x(), t, impl="torch"),
                    "ce_none": lambda: -F.cross_entropy(x(), t, reduction="none"),
                    "gather": lambda: torch.log_softmax(x().float(), -1).gather(
                        1, t.clamp(min=0)[:, None]),
                    "stats": lambda: fusedce.cross_entropy(x(), t, impl="torch",
                                                           return_stats=True),
                    "eager_stats": lambda: _eager_stats(x(), t),
                }, 25 if n <= 256 else 9)
            lines.append(f"| {str(dtype)[6:]} | {n} x {c} | {ms['logprobs']:.2f} | "
                         f"{ms['ce_none']:.2f} | {ms['gather']:.2f} | {ms['stats']:.2f} | "
                         f"{ms['eager_stats']:.2f} |")
    return lines


def _unfused_divergence(x, teacher, divergence, temperature=1.0, beta=0.5):
    """The unfused formula, as training code writes it: log-softmax of both, F.kl_div."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    log_q = F.log_softmax(x.to(acc) / temperature, -1)
    log_p = F.log_softmax(teacher.to(acc) / temperature, -1)
    if divergence == "forward_kl":
        return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)
    log_m = torch.logsumexp(torch.stack([log_q + math.log1p(-beta),
                                         log_p + math.log(beta)]), dim=0)
    return (beta * F.kl_div(log_m, log_p, reduction="batchmean", log_target=True)
            + (1 - beta) * F.kl_div(log_m, log_q, reduction="batchmean", log_target=True))


def distillation_cost(n: int = 2048, vocab: int = 32768, hidden: int = 512) -> list[str]:
    lines = [f"## Distillation, {n} tokens x {vocab} classes, forward + backward (median of 5; "
             "peak extra memory above the inputs, min of 3; error of the loss and the student "
             "gradient against float64)", "",
             "| dtype | divergence | computation | ms | peak extra MiB | x one logits tensor | "
             "loss err | grad err |", "|---|---|---|---|---|---|---|---|"]
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(n, vocab, generator=g) * 2).to(dtype)
        teacher = (torch.randn(n, vocab, generator=g) * 2).to(dtype)
        one = x.numel() * x.element_size()
        for divergence in ("forward_kl", "jsd"):
            ref_x = x.double().requires_grad_()
            ref = _unfused_divergence(ref_x, teacher.double(), divergence).double()
            (ref_grad,) = torch.autograd.grad(ref, ref_x)

            def fused(divergence=divergence):
                xi = x.clone().requires_grad_()
                loss = fusedce.distillation_loss(xi, teacher, divergence=divergence)
                loss.backward()
                return loss, xi.grad

            def unfused(divergence=divergence):
                xi = x.clone().requires_grad_()
                loss = _unfused_divergence(xi, teacher, divergence)
                loss.backward()
                return loss, xi.grad

            for name, fn in (("fusedce.distillation_loss", fused),
                             ("unfused (log_softmax, F.kl_div)", unfused)):
                ms = _median_ms(fn, repeats=5)
                peak = min(peak_extra_bytes(fn, CPU) for _ in range(3))
                loss, grad = fn()
                lines.append(
                    f"| {str(dtype)[6:]} | {divergence} | {name} | {ms:.0f} | "
                    f"{peak / 2**20:.0f} | {peak / one:.2f} | "
                    f"{abs(loss.double() - ref).item() / abs(ref).item():.1e} | "
                    f"{((grad.double() - ref_grad).norm() / ref_grad.norm()).item():.1e} |")
    # From hidden states: the student's head and the teacher's, never holding either logits.
    h = torch.randn(n, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) * hidden ** -0.5 * 3
    ht = torch.randn(n, hidden, generator=g)
    wt = torch.randn(vocab, hidden, generator=g) * hidden ** -0.5 * 3
    one = n * vocab * 4
    lines += ["", f"From hidden states ({n} x {hidden}, float32, both heads {vocab} x {hidden}), "
              "forward KL, forward + backward:", "",
              "| computation | ms | peak extra MiB | x one logits tensor |", "|---|---|---|---|"]

    def fused_linear():
        hi, wi = h.clone().requires_grad_(), w.clone().requires_grad_()
        fusedce.linear_distillation_loss(hi, wi, teacher_input=ht,
                                         teacher_linear_weight=wt).backward()

    def unfused_linear():
        hi, wi = h.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.no_grad():
            teacher_logits = ht @ wt.t()
        _unfused_divergence(hi @ wi.t(), teacher_logits, "forward_kl").backward()

    for name, fn in (("fusedce.linear_distillation_loss", fused_linear),
                     ("unfused (both logits, log_softmax, F.kl_div)", unfused_linear)):
        ms = _median_ms(fn, repeats=3)
        peak = min(peak_extra_bytes(fn, CPU) for _ in range(3))
        lines.append(f"| {name} | {ms:.0f} | {peak / 2**20:.0f} | {peak / one:.2f} |")
    return lines


def main() -> int:
    torch.manual_seed(0)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    import triton

    header = [f"# fusedce feature costs on {device_name(CPU)}", "",
              f"Generated {stamp} by `python -m bench.extras` (torch {torch.__version__}, "
              f"triton {triton.__version__}, {torch.get_num_threads()} threads); CPU timings on "
              "a shared machine vary between runs.", ""]
    body = (mtp_memory() + [""] + invariance_cost() + [""] + forward_entry_points() + [""]
            + distillation_cost())
    out = RESULTS / device_slug(CPU) / "extras.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(header + body) + "\n")
    print("\n".join(body))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
