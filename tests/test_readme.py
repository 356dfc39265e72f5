"""The README and the docs are the contract a new user copies: every Python block runs (the
README's first, then each page's, in one namespace: later blocks use names the first one
defines), every relative link and image resolves, and the README stays a front door."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# The pages in the order their blocks build on each other.
PAGES = [README] + [ROOT / "docs" / f"{name}.md" for name in (
    "reference", "shifts", "rl", "integrations", "fused-linear", "distributed", "diagnostics",
    "distillation")]
ALL_PAGES = sorted({README, *(ROOT / "docs").glob("*.md")})


def python_blocks(page: Path = README) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


def test_readme_is_a_front_door():
    text = README.read_text()
    assert len(text.splitlines()) <= 150
    assert "```bash\nbash scripts/bench.sh" in text and "bash scripts/test.sh" in text
    assert len(python_blocks()) == 1
    assert set(ALL_PAGES) >= set(PAGES)


def test_every_page_with_code_runs_in_the_test():
    for page in ALL_PAGES:
        assert page in PAGES or not python_blocks(page), f"{page.name}'s code is not run"


def test_python_blocks_run():
    pytest.importorskip("transformers")
    import torch.distributed as dist

    namespace: dict = {"__name__": "readme"}
    torch._dynamo.reset()
    try:
        for page in PAGES:
            for i, block in enumerate(python_blocks(page)):
                try:
                    exec(compile(block, f"{page.name} python block {i}", "exec"), namespace)
                except Exception as exc:  # name the block that broke
                    raise AssertionError(f"{page.name} python block {i} failed:\n{block}") \
                        from exc
    finally:
        from fusedce.integrations import transformers as fce_hf

        fce_hf.revert()
        if dist.is_initialized():
            dist.destroy_process_group()
        torch._dynamo.reset()
    assert torch.isfinite(namespace["loss"]).all()


@pytest.mark.parametrize("page", ALL_PAGES, ids=lambda p: p.name)
def test_relative_links_and_images_resolve(page):
    for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if re.match(r"[a-z]+://|#|mailto:", target):
            continue
        path = (page.parent / target.split("#")[0]).resolve()
        assert path.exists(), f"{page.name} links to {target}, which does not exist"


def test_each_contender_keeps_one_colour_in_every_panel(tmp_path, monkeypatch):
    """The benchmark's plots: a contender missing from one panel does not shift the others'
    colours."""
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from matplotlib.axes import Axes

    from bench.cells import Result
    from bench.report import write_plots

    seen: dict[str, set] = {}
    real = Axes.plot

    def spy(self, *args, **kwargs):
        seen.setdefault(kwargs.get("label"), set()).add(kwargs.get("color"))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", spy)
    results = [Result(mode, dtype, 256, vocab, name, "ok", ms=1.0, peak_extra_mib=1.0)
               for dtype, names in (("float32", ("a", "b", "c")), ("bfloat16", ("b", "c")))
               for mode in ("fwd", "fwd_bwd") for name in names for vocab in (100, 200)
               if not (mode == "fwd" and name == "b")]
    assert write_plots(tmp_path, results)
    assert set(seen) == {"a", "b", "c"}
    assert all(len(colours) == 1 and None not in colours for colours in seen.values())
    assert len({next(iter(c)) for c in seen.values()}) == 3
