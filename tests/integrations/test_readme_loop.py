"""The README's "Use it in your own training loop" block runs as written (so it cannot rot)."""

from __future__ import annotations

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## Use it in your own training loop"


def readme_loop_code() -> str:
    """The first ```python block after the section heading."""
    text = README.read_text(encoding="utf-8")
    assert SECTION in text, f"README.md lost its section {SECTION!r}"
    after = text.split(SECTION, 1)[1]
    m = re.search(r"```python\n(.*?)```", after, flags=re.DOTALL)
    assert m is not None, "no python block in the section"
    return m.group(1)


def test_readme_block_wires_the_documented_pieces():
    code = readme_loop_code()
    for piece in ("ntkit.partition.attention_heads(", "ntkit.sparse.attach(", "SlicedAdamW(",
                  'build_method("mat"', "method.bind(", "method.before_step(", "method.on_epoch_end("):
        assert piece in code, piece


def test_readme_loop_runs_and_mat_decides():
    torch.manual_seed(0)
    ns: dict = {"__name__": "readme_loop"}
    exec(compile(readme_loop_code(), str(README) + ":loop", "exec"), ns)  # noqa: S102 — our own README
    method, ctl, partition = ns["method"], ns["ctl"], ns["partition"]
    assert torch.isfinite(ns["loss"]).item()
    assert ns["ctx"].step == 2 * 2  # 2 epochs × 128/64 steps
    evaluations = [r for r in method.history if r.get("event") == "mat"]
    assert len(evaluations) == 2  # start_epoch=1, interval=1: at every epoch end
    active = ctl.active
    assert 0 < int(active.sum()) < len(partition)  # α = 0.5 freezes some heads, protection keeps some
    for idx in partition.groups_by_layer("head").values():
        assert bool(active[idx].any())  # ≥ 1 head per layer (the protecting strategy)
