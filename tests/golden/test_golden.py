"""Golden numbers: every recipe re-run at tier ``ci`` reproduces ``ci_golden.json``.

Per (method label, seed) record: test_loss, test_acc, best_val_loss and the curve's val_loss list
within rtol 1e-5; train_flops and overhead_flops exactly. The reference script is
``tests/golden/make_golden.py``; when a change of the code moves the numbers on purpose, regenerate
(``python tests/golden/make_golden.py [recipe …]``) and explain the change in the commit message.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import pytest

_HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("ntkit_make_golden", _HERE / "make_golden.py")
assert _spec is not None and _spec.loader is not None
mg = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mg)

RTOL = 1e-5
#: Recipes whose ci run is far the slowest (mat-switch: ~22 s vs 1.5–4 s for the others on 2 shared
#: CPU cores); run them with ``-m slow``.
SLOW = {"pl-switch", "pl-vgg"}  # ~100–140 s at ci (plreg diagnostics: Hutchinson Tr(H) + mNTK per epoch); the rest take seconds


def _golden() -> dict[str, Any]:
    return json.loads(mg.GOLDEN.read_text())["recipes"] if mg.GOLDEN.is_file() else {}


def _params() -> list[Any]:
    names = sorted(set(_golden()) | set(mg.ntkit_recipes()))
    return [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in names]


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=RTOL, abs_tol=1e-12)
    return a == b  # None, "nan", "inf"


def diff_metrics(name: str, golden: dict[str, dict], now: dict[str, dict]) -> list[str]:
    """Human-readable differences between two ``extract`` results of recipe ``name``."""
    out = []
    for key in sorted(set(golden) ^ set(now)):
        out.append(f"{key}: {'missing now' if key in golden else 'new record (not in the golden file)'}")
    for key in [k for k in golden if k in now]:
        g, n = golden[key], now[key]
        for m in mg.EXACT_KEYS:
            if g.get(m) != n.get(m):
                out.append(f"{key} {m}: golden {g.get(m)!r}, now {n.get(m)!r} (compared exactly)")
        for m in [k for k in {**g, **n} if k != "val_loss" and k not in mg.EXACT_KEYS]:  # scalars, any recipe
            if not _close(g.get(m), n.get(m)):
                out.append(f"{key} {m}: golden {g.get(m)!r}, now {n.get(m)!r} (rtol {RTOL})")
        gv, nv = g.get("val_loss") or [], n.get("val_loss") or []
        if len(gv) != len(nv):
            out.append(f"{key} val_loss: golden {len(gv)} evaluations, now {len(nv)}")
        else:
            bad = [i for i, (a, b) in enumerate(zip(gv, nv)) if not _close(a, b)]
            if bad:
                i = bad[0]
                out.append(f"{key} val_loss[{i}] (first of {len(bad)}): golden {gv[i]!r}, now {nv[i]!r}")
    return out


@pytest.mark.parametrize("name", _params())
def test_ci_numbers_match_golden(name: str, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NTKIT_DATA_DIR", str(data_dir))
    now, _ = mg.run_ci(name)
    golden = _golden()
    how = (
        f"If the change is intended, regenerate with `{mg.REGENERATE} {name}` (or `{mg.REGENERATE}` for all "
        "recipes) and explain in the commit message which change moved the numbers and why the new ones are right."
    )
    assert name in golden, f"recipe {name!r} has no golden numbers in {mg.GOLDEN.name}. {how}"
    problems = diff_metrics(name, golden[name], now)
    assert not problems, (
        f"golden numbers of recipe {name!r} (tier ci) changed:\n  " + "\n  ".join(problems[:20]) + f"\n{how}"
    )


def test_diff_metrics_flags_each_kind_of_change() -> None:
    g = {"m/seed0": {"test_loss": 1.0, "test_acc": None, "best_val_loss": 2.0, "train_flops": 10,
                     "overhead_flops": 0, "val_loss": [3.0, 2.0]}}
    assert diff_metrics("r", g, json.loads(json.dumps(g))) == []
    near = {"m/seed0": {**g["m/seed0"], "test_loss": 1.0 + 5e-6}}
    assert diff_metrics("r", g, near) == []
    moved = {"m/seed0": {**g["m/seed0"], "test_loss": 1.0 + 2e-5, "train_flops": 11, "val_loss": [3.0, 2.1]},
             "n/seed0": g["m/seed0"]}
    problems = diff_metrics("r", g, moved)
    assert len(problems) == 4
    assert any("train_flops: golden 10, now 11" in p for p in problems)
    assert any("val_loss[1]" in p for p in problems) and any("new record" in p for p in problems)
    assert diff_metrics("r", g, {}) == ["m/seed0: missing now"]
