"""Golden numbers: architecture + deterministic init of every zoo model, recorded by
``tests/models/make_golden_zoo.py`` (re-run it after a deliberate change)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from ntkit.models import list_models

_SCRIPT = Path(__file__).with_name("make_golden_zoo.py")
_spec = importlib.util.spec_from_file_location("_make_golden_zoo", _SCRIPT)
assert _spec is not None and _spec.loader is not None
golden_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(golden_script)

GOLDEN = json.loads(golden_script.GOLDEN.read_text())


def test_golden_file_covers_every_registered_model():
    assert sorted(GOLDEN) == list_models() == sorted(golden_script.SPECS)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_model_matches_golden_numbers(name):
    got = golden_script.compute(name)
    want = GOLDEN[name]
    assert got["num_params"] == want["num_params"]
    for key in ("param_sum", "param_abs_sum", "logit_sum", "logit_sq_sum"):
        assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-9), key
    assert got["first_logits"] == pytest.approx(want["first_logits"], rel=1e-6, abs=1e-9)
