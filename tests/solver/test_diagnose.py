"""Infeasibility diagnosis and the smallest reachable totals, against exhaustive enumeration."""

from __future__ import annotations

import pytest
from bitplan_solver_cases import brute_force, layer_of, problems, two_layer_problem
from hypothesis import given, settings

from solver import Limits, Problem, solve
from solver.diagnose import diagnose, min_reachable
from solver.problem import RESOURCES, LayerOptions, Option


@settings(max_examples=40, deadline=None)
@given(problems(max_layers=5))
def test_min_reachable_matches_brute_force(problem: Problem) -> None:
    """The per-limit smallest reachable value (diagnosis) is the true minimum over
    tie-respecting assignments."""
    for r in RESOURCES:
        swapped = Problem(
            tuple(LayerOptions(la.name, tuple(
                Option(o.w_bits, o.a_bits, o.cost(r), o.size_bytes, o.bops, o.latency_ms, o.tag)
                for o in la.options)) for la in problem.layers),
            Limits(), problem.ties)
        best, _ = brute_force(swapped)
        assert min_reachable(problem, r) == pytest.approx(best)


def test_infeasible_size_alone_has_actionable_message() -> None:
    sol = solve(two_layer_problem(Limits(size_bytes=0.9e6)))
    assert sol.status == "infeasible" and sol.choices == {}
    d = sol.diagnosis["limits"]["size_bytes"]
    assert d == {"limit": 0.9e6, "min_reachable": 1.0e6, "reachable_alone": False}
    msg = sol.diagnosis["message"]
    assert "size limit 0.9 MB is below the smallest reachable 1 MB" in msg
    assert "raise it to at least 1 MB" in msg


def test_infeasible_pair_names_the_conflict() -> None:
    # Each layer: cheap in size but heavy in latency, or the reverse.
    rows = [(4, 1.0, 1.0, 10.0, 5.0), (8, 1.0, 5.0, 10.0, 1.0)]
    p = Problem((layer_of("a", rows), layer_of("b", rows)),
                Limits(size_bytes=3.0, latency_ms=3.0))
    sol = solve(p)
    assert sol.status == "infeasible"
    diag = sol.diagnosis
    assert all(v["reachable_alone"] for v in diag["limits"].values())
    assert diag["conflicts"] == [
        {"limits": ["size_bytes", "latency_ms"], "resource": "size_bytes",
         "min_given_others": 10.0}
    ]
    assert "reachable alone but not together" in diag["message"]
    assert "latency <= 3 ms" in diag["message"]


def test_infeasible_triple_when_every_pair_fits() -> None:
    # Three layers with options that each overuse one resource: any two limits can be met
    # together, all three cannot.
    rows = [(2, 0.0, 2.0, 0.0, 0.0), (4, 0.0, 0.0, 2.0, 0.0), (8, 0.0, 0.0, 0.0, 2.0)]
    layers = (layer_of("a", rows),)
    p = Problem(layers, Limits(size_bytes=1.0, bops=1.0, latency_ms=1.0))
    assert solve(p).status == "infeasible"
    d = diagnose(p)
    assert d["conflicts"][0]["limits"] == ["size_bytes", "bops", "latency_ms"]
