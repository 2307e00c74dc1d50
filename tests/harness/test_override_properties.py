"""Property-based: random overrides thrown at the recipe configs give a valid config or ONE
line of ConfigError naming the key — never another exception."""

from __future__ import annotations

import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ntkit.errors import ConfigError
from ntkit.recipes import resolve_config

LABELS = ["vanilla", "rand", "multirate", "mat", "snip_50", "mat_prune_50", "new"]
FIELDS = ["alpha", "beta", "num_samples", "start_epoch", "interval", "fraction", "k", "per_layer", "kinds",
          "seed", "protect", "method", "prune_fraction", "kind", "bogus"]
TOP = ["size", "seq_len", "dropout", "kinds", "seeds", "model", "loop.lr", "loop.epochs", "loop.batch_size",
       "loop.betas", "loop.schedule", "loop.budget_fracs", "loop.max_nonfinite", "loop.nope", "nope", "methods"]
VALUES = st.one_of(
    st.sampled_from(["0", "1", "-1", "0.5", "2", "nan", "inf", "-inf", "true", "none", "", "[]", "x", "1,2",
                     "[0.9,0.99]", '{"head": 0.2}', '{"head": "x"}', "{}", "mat", "vanilla,mat", "vanilla,zzz",
                     "head", "1e-3", "1_000", "snip_struct", "mat_prune", "rand", "cosine"]),
    st.text(max_size=6),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-5, 100).map(str),
)
KEYS = st.one_of(
    st.sampled_from(TOP),
    st.tuples(st.sampled_from(LABELS), st.sampled_from(FIELDS)).map(lambda t: f"methods.{t[0]}.{t[1]}"),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(recipe=st.sampled_from(["mat-bert", "mat-prune", "mat-vgg", "mat-switch", "demo"]),
       overrides=st.dictionaries(KEYS, VALUES, max_size=4))
def test_random_overrides_give_a_config_or_a_one_line_error(recipe: str, overrides: dict[str, str]) -> None:
    try:
        cfg = resolve_config(recipe, "ci", overrides)
    except ConfigError as e:
        msg = str(e)
        assert "\n" not in msg and msg.strip(), msg
        head = msg.split("=", 1)[0].split(":", 1)[0]
        assert any(head.startswith(k.split(".")[0]) or k.startswith(head) for k in overrides) or "resume" in msg, (
            msg, overrides)
        return
    assert "vanilla" in cfg.methods  # the baseline survives every accepted override
    for entry in cfg.methods.values():
        for v in vars(entry.config).values():
            assert not (isinstance(v, float) and math.isnan(v)), entry
