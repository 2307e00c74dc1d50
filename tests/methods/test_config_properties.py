"""Property-based tests of the method configs and their state round trip.

1. Random field mappings thrown at every registered method give a valid config (which builds the
   method) or ONE line of :class:`ntkit.errors.ConfigError` naming the method and the offending
   field — never a TypeError / KeyError / AttributeError / OverflowError.
2. A method built from a valid config and bound to a tiny model's partition, after a few epochs of
   hooks, saves a JSON-able state that a new instance loads back to the same state.
"""

from __future__ import annotations

import dataclasses
import json
import math
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from method_fakes import ScriptedLambda, run_epochs, tiny_bert

from ntkit.errors import ConfigError
from ntkit.methods import LoopContext, build_method, list_methods, method_config, method_info, scores
from ntkit.methods.masks import SCOPES
from ntkit.methods.ntt import _INIT_MASKS, _TEACHER_INITS, KERNELS
from ntkit.partition import attention_heads
from ntkit.sparse import attach

KINDS = ["head", "expert", "filter"]
WORDS = KINDS + list(SCOPES + _INIT_MASKS + _TEACHER_INITS + KERNELS) + ["", "x", "1", "nan"]
NUMBERS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(0.0, 1.0),
    st.integers(-3, 10),
    st.sampled_from([2**63, 2**64 - 1, 2**64, -(2**63) - 1, 10**400, -(10**400), 1e308, 5e-324, -0.0]),
)
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    NUMBERS,
    st.sampled_from(WORDS),
    st.text(max_size=4),
    st.lists(st.one_of(st.sampled_from(KINDS), st.integers(-1, 3), st.none(), NUMBERS), max_size=3),
    st.tuples(st.sampled_from(KINDS)),
    st.dictionaries(
        st.one_of(st.sampled_from(KINDS), st.integers(0, 2), st.text(max_size=2)),
        st.one_of(NUMBERS, st.booleans(), st.none(), st.sampled_from(WORDS), st.lists(st.integers(), max_size=2)),
        max_size=3,
    ),
    st.frozensets(st.sampled_from(KINDS), max_size=2),
)


def _fields(name: str) -> list[str]:
    return [f.name for f in dataclasses.fields(method_info(name).config_class) if f.init]


@st.composite
def _mappings(draw):
    name = draw(st.sampled_from([m for m in list_methods() if not m.startswith("_")]))
    keys = st.one_of(st.sampled_from(_fields(name) or ["alpha"]), st.sampled_from(["bogus", "Alpha", ""]))
    return name, draw(st.dictionaries(keys, VALUES, max_size=4))


def _is_finite_number(v: object) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return True  # not a number: nothing to check here
    return isinstance(v, int) or math.isfinite(v)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_mappings())
def test_random_fields_give_a_config_or_a_one_line_error_naming_the_field(case) -> None:
    name, fields = case
    try:
        cfg = method_config(name, fields)
    except ConfigError as e:
        msg = str(e)
        assert msg.strip() and "\n" not in msg, (name, fields, msg)
        assert msg.startswith(f"{name}."), (name, fields, msg)
        field = msg[len(name) + 1 :].split("=", 1)[0]
        assert field in fields, (name, fields, msg)  # the offending field, as the user spelled it
        return
    assert isinstance(cfg, method_info(name).config_class)
    for key, value in fields.items():
        assert getattr(cfg, key) is value, (name, key)  # accepted values are kept as given
        vals = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
        assert all(_is_finite_number(v) for v in vals), (name, key, value)
    build_method(name, cfg)  # a valid config always builds its method


# --------------------------------------------------------------------------- state round trip
PROB = st.floats(0.0, 1.0)
SEED = st.integers(0, 2**64 - 1)
KIND_LIST = st.one_of(st.none(), st.lists(st.sampled_from(KINDS), min_size=1, max_size=2, unique=True))
PER_KIND = st.dictionaries(st.sampled_from(KINDS), PROB, min_size=1, max_size=3)
MAT_FIELDS = {
    "alpha": st.one_of(PROB, PER_KIND),
    "beta": st.one_of(st.floats(0.0, 2.0), PER_KIND),
    "num_samples": st.integers(2, 4),
    "start_epoch": st.integers(1, 2),
    "interval": st.integers(1, 2),
    "protect": st.booleans(),
    "seed": SEED,
    "threshold_scope": st.sampled_from(["global", "layer"]),
    "probes": st.sampled_from(["fresh", "fixed"]),
}
_HEADS = ["blocks.0.attn.head0", "blocks.0.attn.head1", "blocks.1.attn.head0", "blocks.1.attn.head1"]
# rand_replay needs MAT's decisions (harness.compare hands them over); drawn here, always present
REQUIRED = {
    "rand_replay": {
        "schedule": st.lists(
            st.fixed_dictionaries(
                {"epoch": st.integers(0, 3), "active": st.lists(st.sampled_from(_HEADS), unique=True)}
            ),
            max_size=3,
        )
    }
}
VALID = {
    "vanilla": {},
    "mat": MAT_FIELDS,
    "mat_prune": {
        **MAT_FIELDS,
        "prune_epoch": st.integers(1, 3),
        "prune_fraction": st.floats(0.0, 0.99),
        "prune_kind": st.sampled_from(KINDS),
    },
    "rand_replay": {"source": st.sampled_from(["mat", "mat2"]), "seed": SEED},
    "rand": {
        "fraction": st.floats(0.0, 1.0, exclude_min=True),
        "kinds": KIND_LIST,
        "per_layer": st.booleans(),
        "protect": st.booleans(),
        "seed": SEED,
    },
    "multirate": {
        "k": st.integers(1, 4),
        "slow_fraction": PROB,
        "kinds": KIND_LIST,
        "per_layer": st.booleans(),
        "protect": st.booleans(),
        "seed": SEED,
        "scale_lr": st.booleans(),
    },
    "snip_struct": {
        "fraction": st.floats(0.0, 0.99),
        "kind": st.sampled_from(KINDS),
        "num_batches": st.integers(1, 3),
        "protect": st.booleans(),
        "batch_size": st.integers(0, 4),
    },
    "structured_prune": {
        "criterion": st.sampled_from(["l1", "l2", "random", "fpgm"]),  # label- and data-free with this _ctx
        "kind": st.sampled_from(KINDS),
        "ratio": st.floats(0.0, 0.99),
        "schedule": st.sampled_from(["oneshot", "linear", "iterative"]),
        "t": st.integers(0, 2),
        "rounds": st.integers(1, 3),
        "surgery": st.just(False),
        "seed": SEED,
    },
    "lth": {
        "kind": st.sampled_from(KINDS),
        "ratio": st.floats(0.0, 0.99),
        "rounds": st.integers(1, 3),
        "t0": st.integers(1, 2),
        "rewind_frac": st.floats(0.0, 0.2),
        "surgery": st.just(False),
    },
    "plreg": {
        "kind": st.sampled_from(KINDS),
        "ratio": st.floats(0.0, 0.99),
        "t": st.integers(1, 3),
        "num_samples": st.integers(2, 4),
        "gate_steps": st.integers(1, 2),
        "relaxation": st.sampled_from(["ste", "sigmoid"]),
        "surgery": st.just(False),
        "track_every": st.just(0),
        "seed": SEED,
    },
    "ntt": {
        "density": st.floats(0.0, 1.0, exclude_min=True),
        "scope": st.sampled_from(SCOPES),
        "steps": st.integers(0, 3),
        "batch_size": st.integers(1, 8).map(lambda n: 2 * n),
        "mask_update_freq": st.integers(0, 5),
    },
}


def test_every_registered_method_has_a_valid_config_strategy():
    assert sorted(VALID) == [m for m in list_methods() if not m.startswith("_")]  # "_x": tests' own methods
    for name, fields in VALID.items():
        assert set(fields) <= set(_fields(name)), name


@st.composite
def _valid(draw):
    name = draw(st.sampled_from(sorted(VALID)))
    return name, draw(st.fixed_dictionaries(REQUIRED.get(name, {}), optional=VALID[name]))


def _bound(name: str, cfg):
    model = tiny_bert()
    part = attention_heads(model)  # 2 layers × 2 heads, kind "head"
    method = build_method(name, cfg)
    method.bind(model, part, attach(model, part))
    return method


def _ctx() -> LoopContext:
    def ntk_batch(s, generator):
        return torch.randint(0, 1000, (s,), generator=generator), None

    return LoopContext(model=torch.nn.Linear(1, 1), ntk_batch=ntk_batch, steps_per_epoch=2)


# bind-time errors of these name the field but not the method (their files are owned elsewhere)
UNPREFIXED_BIND_ERRORS = {"snip_struct", "mat_prune"}
# mat_prune finds a prune_kind absent from the partition only at prune_epoch, not at bind
LATE_KIND_CHECK = {"mat_prune"}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=_valid(), epochs=st.integers(0, 3), load_before_bind=st.booleans())
def test_state_dict_round_trips_through_a_new_instance(case, epochs: int, load_before_bind: bool) -> None:
    name, fields = case
    cfg = method_config(name, fields)  # never raises: the strategy draws valid configs only
    with mock.patch.object(scores, "ntk_lambda_max", ScriptedLambda()):
        try:
            a = _bound(name, cfg)
            # NTT acts only at init (tests/methods/test_ntt.py); plreg measures through the engine on
            # ctx.model, which this scripted context does not have (tests/methods/test_plreg.py runs it)
            if name not in ("ntt", "plreg"):
                try:
                    run_epochs(a, _ctx(), range(epochs))
                except ConfigError:
                    assert name in LATE_KIND_CHECK, name  # the others check their kinds at bind
                    raise
        except ConfigError as e:  # a valid config that does not fit this partition (kinds)
            msg = str(e)
            assert "\n" not in msg, msg
            assert msg.startswith(f"{name}." if name not in UNPREFIXED_BIND_ERRORS else ""), msg
            assert any(k in KINDS for k in msg.split("'")), msg  # it is about the kinds
            return
    state = a.state_dict()
    saved = json.loads(json.dumps(state, allow_nan=False))  # JSON-able, no NaN/Inf
    b = build_method(name, cfg)
    model = tiny_bert()
    part = attention_heads(model)
    if load_before_bind:
        b.load_state_dict(saved)
        b.bind(model, part, attach(model, part))
    else:
        b.bind(model, part, attach(model, part))
        b.load_state_dict(saved)
    assert json.loads(json.dumps(b.state_dict(), allow_nan=False)) == saved
    if getattr(a, "active", None) is not None:
        assert torch.equal(b.active, a.active)


@pytest.mark.parametrize(
    ("name", "fields", "match"),
    [
        ("mat", {"alpha": {"head": "x"}}, r"^mat\.alpha=\{'head': 'x'\}: expected"),
        ("rand", {"kinds": [1]}, r"^rand\.kinds=\[1\]: expected"),
        ("multirate", {"seed": 1.5}, r"^multirate\.seed=1\.5: expected an integer"),
        ("rand", {"fraction": math.nan}, r"^rand\.fraction=nan: expected"),
        ("mat", {"beta": math.inf}, r"^mat\.beta=inf: expected"),
        ("mat", {"beta": {"head": 10**400}}, r"^mat\.beta=\{'head': 1000"),
        ("mat", {"seed": 2**64}, r"^mat\.seed=18446744073709551616: expected an integer in \[0, 2\*\*64 - 1\]"),
        ("rand", {"seed": -1}, r"^rand\.seed=-1: expected"),
    ],
)
def test_examples_the_property_found(name, fields, match):
    with pytest.raises(ConfigError, match=match):
        method_config(name, fields)
