"""The constraints schema: DESIGN.md's example parses, defaults fill in, JSON round-trips, and
bad documents fail with the field named."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.constraints import Constraints, parse_constraints
from solver.errors import BadConstraintsError

DESIGN_EXAMPLE = {
    "version": 1,
    "limits": {"size_mb": 5.0, "bops_g": None, "latency_ms": None},
    "weight_bits": [4, 8],
    "activation_bits": [8],
    "drq": {"enabled": True, "region_sizes": [2, 4, 8],
            "sensitive_fractions": [0.1, 0.2, 0.3, 0.5]},
    "pin": {"first": 8, "last": 8},
    "hardware": "nvidia-t4",
    "latency_table": None,
    "hessian": {"max_iter": 200, "tol": 0.05, "seed": 0},
}


def test_design_example_and_defaults() -> None:
    c = parse_constraints(json.dumps(DESIGN_EXAMPLE))
    assert c.limits.size_mb == 5.0 and c.hardware == "nvidia-t4"
    minimal = parse_constraints({"limits": {"bops_ratio": 0.5}})
    assert minimal.weight_bits == [4, 8] and minimal.activation_bits == [8]
    assert minimal.pin.first == 8 and minimal.hessian.max_iter == 200
    assert minimal.drq.enabled and not minimal.uses_drq  # no activation below 8 bits
    assert parse_constraints({"limits": {"size_mb": 1}, "activation_bits": [4, 8]}).uses_drq


@given(
    limit=st.floats(1e-6, 1e6),
    wbits=st.sets(st.sampled_from([2, 3, 4, 5, 6, 8]), min_size=1),
    abits=st.sets(st.sampled_from([4, 8]), min_size=1),
    seed=st.integers(0, 2**31 - 1),
)
def test_json_round_trip(limit: float, wbits: set, abits: set, seed: int) -> None:
    c = parse_constraints({"limits": {"size_ratio": limit}, "weight_bits": list(wbits),
                           "activation_bits": list(abits), "hessian": {"seed": seed}})
    again = parse_constraints(json.dumps(c.to_dict()))
    assert again == c and again.weight_bits == sorted(wbits)


@pytest.mark.parametrize(
    "doc,field",
    [
        ({"limits": {"size_mb": 1}, "pin": {"first": 7}}, "pin.first"),
        ({"limits": {"size_mb": 1}, "weight_bits": []}, "weight_bits"),
        ({"limits": {"size_mb": 1}, "weight_bits": [4, 4]}, "weight_bits"),
        ({"limits": {"size_mb": 1}, "drq": {"sensitive_fractions": [1.5]}}, "drq"),
        ({"limits": {"size_mb": 1}, "drq": {"region_sizes": [0]}}, "drq"),
        ({"limits": {"size_mb": 1}, "hessian": {"max_iter": 0}}, "hessian.max_iter"),
        ({"limits": {"size_mb": 1}, "hessian": {"seed": -1}}, "hessian.seed"),
        ({"limits": {"size_mb": 1}, "latency_table": {}}, "latency_table"),
        ({"limits": {"size_mb": 1}, "latency_table": {"fc1": {"w8a8": -1}}}, "latency_table"),
        ({"limits": {"latency_ratio": 0.5}, "hardware": "nvidia-t4",
          "latency_table": {"fc1": {"w8a8": 1}}}, "hardware or latency_table"),
        ({"limits": {"size_mb": 1, "bops_g": 0}}, "limits.bops_g"),
        ({"limits": {"size_mb": "1MB"}}, "limits.size_mb"),
        ({"limits": {"size_mb": 1}, "drq": {"enabled": True, "regions": [2]}}, "drq.regions"),
    ],
)
def test_bad_documents_name_the_field(doc: dict, field: str) -> None:
    with pytest.raises(BadConstraintsError) as info:
        parse_constraints(doc)
    assert field in info.value.message
    assert info.value.detail and all("field" in p for p in info.value.detail)


def test_activation_choices_match_what_the_engine_measures() -> None:
    from sensitivity.engine import ACTIVATION_BITS
    from service.constraints import ACTIVATION_CHOICES

    assert tuple(ACTIVATION_CHOICES) == tuple(ACTIVATION_BITS)
    with pytest.raises(BadConstraintsError, match="activation bits"):
        parse_constraints({"limits": {"size_mb": 1}, "activation_bits": [6, 8]})


def test_schema_is_published() -> None:
    schema = Constraints.model_json_schema()
    assert schema["required"] == ["limits"]
    assert schema["additionalProperties"] is False
    # what it publishes is what the code accepts and does
    assert schema["properties"]["activation_bits"]["items"]["enum"] == [4, 8]
    hessian = schema["$defs"]["Hessian"]
    rule = " ".join(hessian["description"].split())
    assert "relative standard error" in rule and "after the first ``min(10, max_iter)``" in rule
    assert "moves less" not in rule
    assert "stderr / mean" in hessian["properties"]["tol"]["description"]


def test_limits_become_solver_limits_once_at_the_edge() -> None:
    """MB = 1e6 bytes, bops_g = 1e9 bit operations, latency in ms; ratios times the all-INT8
    totals. The solver sees only its own units."""
    ref = {"size_bytes": 4000.0, "bops": 1e10, "latency_ms": 2.0}
    c = parse_constraints({"limits": {"size_ratio": 0.5, "bops_g": 2.0, "latency_ratio": 0.25},
                           "hardware": "nvidia-t4"})
    lim = c.limits.to_solver(ref)
    assert (lim.size_bytes, lim.bops, lim.latency_ms) == (2000.0, 2e9, 0.5)
    lim = parse_constraints({"limits": {"size_mb": 1.5}}).limits.to_solver(ref)
    assert (lim.size_bytes, lim.bops, lim.latency_ms) == (1.5e6, None, None)
    with pytest.raises(BadConstraintsError, match="latency_ratio"):
        c.limits.to_solver({**ref, "latency_ms": None})  # a layer without a latency


@pytest.mark.parametrize(
    "limits,field",
    [({"size_mb": 1, "size_ratio": 0.5}, "not both"), ({"size_gb": 1}, "size_gb"),
     ({"bops_g": 0}, "bops_g"), ({"latency_ms": 1.0}, "latency")],
)
def test_bad_limits_are_refused_before_conversion(limits: dict, field: str) -> None:
    with pytest.raises(BadConstraintsError, match=field):
        parse_constraints({"limits": limits})
