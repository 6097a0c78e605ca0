"""Pareto sweeps: monotone, and each point equal to a separate solve at its budget."""

from __future__ import annotations

import dataclasses

import pytest
from bitplan_solver_cases import brute_force, problems
from hypothesis import HealthCheck, given, settings

from solver import Limits, Problem, pareto, solve
from solver.diagnose import min_reachable
from solver.errors import BadProblemError


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(max_layers=5, max_options=3))
def test_points_monotone_and_match_brute_force(problem: Problem) -> None:
    pts = pareto(problem, "size_bytes", 5)
    assert len(pts) == 5
    assert pts[0].budget == pytest.approx(min_reachable(problem, "size_bytes"))
    budgets = [p.budget for p in pts]
    assert budgets == sorted(budgets)
    prev = None
    for p in pts:
        limits = dataclasses.replace(problem.limits, size_bytes=p.budget)
        best, _ = brute_force(problem, limits)
        if best is None:
            assert p.status == "infeasible" and p.objective is None
            continue
        assert p.status == "optimal"
        assert p.objective == pytest.approx(best, rel=1e-9, abs=1e-9)
        assert p.totals["size_bytes"] <= p.budget * (1 + 1e-9)
        if prev is not None:
            assert p.objective <= prev + 1e-9
        prev = p.objective


def test_hawq_sweep_matches_single_solves() -> None:
    from test_hawq import DATA

    problem = Problem.from_json((DATA / "resnet18_modelsize_0.5.json").read_text())
    pts = pareto(problem, "size_bytes", 6)
    assert pts[0].budget == 5578752 and pts[-1].budget == 11157504
    for p in pts:
        single = solve(dataclasses.replace(problem, limits=Limits(size_bytes=p.budget)))
        assert p.status == single.status
        assert p.objective == pytest.approx(single.objective, rel=1e-12)
    objs = [p.objective for p in pts]
    assert objs == sorted(objs, reverse=True)


def test_bad_arguments() -> None:
    from test_hawq import DATA

    problem = Problem.from_json((DATA / "resnet18_bops_0.5.json").read_text())
    with pytest.raises(BadProblemError, match="unknown resource"):
        pareto(problem, "energy", 5)
    with pytest.raises(BadProblemError, match="at least 2"):
        pareto(problem, "bops", 1)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems(max_layers=5, max_options=3))
def test_sweep_engines_agree(problem: Problem) -> None:
    """The in-process branch-and-bound, the MILP fallback (node budget 0) and the old path
    (presolve off) give the same sweep."""
    from solver import SolveConfig

    runs = [pareto(problem, "bops", 4, cfg) for cfg in (
        SolveConfig(), SolveConfig(bnb_nodes=0), SolveConfig(presolve=False))]
    for pts in zip(*runs, strict=True):
        assert len({p.status for p in pts}) == 1
        if pts[0].objective is not None:
            assert all(p.objective == pytest.approx(pts[0].objective, rel=1e-9, abs=1e-9)
                       for p in pts)
