"""Reference script for the golden numbers of the ``ci`` tier (torchtune style).

Runs every recipe registered by ntkit at tier ``ci`` and writes ``tests/golden/ci_golden.json``:
per recipe, per (method label, seed) record of ``results["records"]``, the deterministic metrics
(:data:`SCALAR_KEYS`, :data:`EXACT_KEYS`, the curve's ``val_loss`` list) — never wall-clock.
``tests/golden/test_golden.py`` re-runs each recipe and compares (rtol 1e-5; FLOP counts exactly).

Regenerate (one command, from the repository root)::

    python tests/golden/make_golden.py              # every recipe
    python tests/golden/make_golden.py mat-vgg      # only these (the others are kept)

``NTKIT_DATA_DIR`` picks the data (default ``../shared/data`` next to the repository). The text
recipes' tokenizers ship with ntkit (``ntkit/data/_embedded/tokenizers``), so the numbers do not
depend on a machine's tokenizer cache. The convolution kernel is pinned to ``native`` (the default
``tune`` times kernels, which would make the numbers machine-dependent), and ATen's CPU kernels to
the AVX2 level (``ATEN_CPU_CAPABILITY=avx2``: its AVX-512 kernels round differently). A change of the
golden numbers must be explained in the commit message (which change of the code moved them, and why
the new numbers are right). The wall-clock and CPU seconds each recipe took are printed, not stored.
"""

from __future__ import annotations

import os

os.environ.setdefault("ATEN_CPU_CAPABILITY", "avx2")  # before torch loads, as tests/conftest.py sets it

import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).resolve().parent / "ci_golden.json"
TIER = "ci"
#: Float metrics per record, compared with a relative tolerance.
SCALAR_KEYS = ("test_loss", "test_acc", "best_val_loss")
#: FLOP counts per record, compared exactly (the counter is exact; see docs/results.md).
EXACT_KEYS = ("train_flops", "overhead_flops")
REGENERATE = "python tests/golden/make_golden.py"


def data_dir() -> Path:
    """``NTKIT_DATA_DIR``, default ``<repo>/../shared/data``."""
    return Path(os.environ.get("NTKIT_DATA_DIR", REPO.parent / "shared" / "data")).resolve()


def ntkit_recipes() -> list[str]:
    """Names of the recipes ntkit itself registers (not ones a test or a user package added)."""
    from ntkit.recipes import get_recipe, list_recipes

    return [n for n in list_recipes() if get_recipe(n).fn.__module__.startswith("ntkit.")]


def _num(v: Any) -> Any:
    """A metric as stored: float/int, None when absent; non-finite floats as the strings "nan"/"inf"
    (strict JSON has no NaN)."""
    if v is None or isinstance(v, bool):
        return v
    if isinstance(v, int):
        return v
    v = float(v)
    return v if math.isfinite(v) else repr(v)


def extract(doc: dict) -> dict[str, dict]:
    """``{"<method>/seed<k>": {metric: value, "val_loss": [..]}}`` from a ``run_recipe`` document."""
    out: dict[str, dict] = {}
    if "records" not in doc["results"]:  # the NTT sweeps: one run per (method, density, seed)
        for r in doc["results"]["runs"]:
            key = f"{r['method']}@{r['density']:.6g}/seed{r['seed']}"
            if key in out:
                raise ValueError(f"recipe {doc['recipe']!r}: two runs share {key!r}")
            out[key] = {k: _num(r.get(k)) for k in ("test_last", "test_best_val", "val_best")}
        return out
    for r in doc["results"]["records"]:
        key = f"{r['method']}/seed{r['seed']}"
        if key in out:
            raise ValueError(f"recipe {doc['recipe']!r}: two records share method/seed {key!r}")
        m = {k: _num(r.get(k)) for k in SCALAR_KEYS + EXACT_KEYS}
        m["val_loss"] = [_num(p.get("val_loss")) for p in r.get("curve") or []]
        out[key] = m
    return out


def run_ci(name: str) -> tuple[dict[str, dict], tuple[float, float]]:
    """Run recipe ``name`` at tier ci in a temporary directory; return (metrics, (wall s, CPU s of
    this process, all threads))."""
    from ntkit.recipes import run_recipe

    os.environ.setdefault("NTKIT_PROGRESS", "0")
    os.environ.setdefault("NTKIT_CONV_WGRAD", "native")  # deterministic, as tests/conftest.py pins it
    with tempfile.TemporaryDirectory(prefix=f"golden-{name}-") as tmp:
        t0, c0 = time.perf_counter(), time.process_time()
        doc = run_recipe(name, TIER, tmp, data_dir())
        secs = (time.perf_counter() - t0, time.process_time() - c0)
    return extract(doc), secs


def main(argv: list[str]) -> int:
    names = argv or ntkit_recipes()
    known = ntkit_recipes()
    unknown = [n for n in names if n not in known]
    if unknown:
        print(f"unknown recipe(s) {unknown}; registered: {known}", file=sys.stderr)
        return 2
    old = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() and argv else {"recipes": {}}
    recipes = {k: v for k, v in old.get("recipes", {}).items() if k in known}
    failed = []
    for name in names:
        try:
            metrics, secs = run_ci(name)
        except Exception as e:  # noqa: BLE001 — report every broken recipe, keep going; no golden entry
            recipes.pop(name, None)
            failed.append(name)
            print(f"{name}: FAILED ({type(e).__name__}: {' '.join(str(e).split())[:300]})", flush=True)
            continue
        recipes[name] = metrics
        print(f"{name}: {len(metrics)} records, {secs[0]:.1f} s wall, {secs[1]:.1f} s CPU", flush=True)
    doc = {
        "about": f"Golden numbers of the {TIER} tier; regenerate with `{REGENERATE}` and explain the change.",
        "tier": TIER,
        "recipes": dict(sorted(recipes.items())),
    }
    GOLDEN.write_text(json.dumps(doc, indent=1, sort_keys=False) + "\n")
    print(f"wrote {GOLDEN.relative_to(REPO)}" + (f"; no golden numbers for failed {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
