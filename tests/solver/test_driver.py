"""solve() through the one ladder (shortcut -> search or Lagrangian fixing -> MILP) against
exhaustive enumeration: reductions, ties, binding limits, closed_by, HiGHS and CBC."""

from __future__ import annotations

import math
import warnings

import pytest
from bitplan_solver_cases import (
    SETTINGS,
    brute_force,
    layer_of,
    mid_instance,
    problems,
    two_layer_problem,
)
from hypothesis import HealthCheck, given, settings

from solver import Limits, Problem, Solution, SolveConfig, solve
from solver.errors import BadProblemError
from solver.groups import totals_of
from solver.problem import LayerOptions, Option, within


def _check_valid(problem: Problem, sol: Solution) -> None:
    index = {la.name: la for la in problem.layers}
    for a, b in problem.ties:  # ties hold
        assert index[a].options[sol.choices[a]].tag == index[b].options[sol.choices[b]].tag
    for r in problem.limits.active():
        assert within(sol.totals[r], problem.limits.get(r))


@SETTINGS
@given(problems())
def test_matches_brute_force(problem: Problem) -> None:
    _check_against_brute_force(problem, solve(problem))


def _check_against_brute_force(problem: Problem, sol: Solution) -> None:
    best, _ = brute_force(problem)
    if best is None:
        assert sol.status == "infeasible" and sol.choices == {} and sol.objective is None
        assert sol.diagnosis is not None and sol.diagnosis["message"]
    else:
        assert sol.status == "optimal"
        assert sol.objective == pytest.approx(best, rel=1e-9, abs=1e-9)
        _check_valid(problem, sol)
        assert sol.totals == totals_of(problem, sol.choices)


@SETTINGS
@given(problems(max_layers=7, max_options=4))
def test_branch_and_bound_alone_matches_brute_force(problem: Problem) -> None:
    """Without the minimum-Omega shortcut and with a generous node budget, every instance is
    settled in process (no MILP solver) and equals brute force."""
    sol = solve(problem, SolveConfig(shortcut=False, bnb_nodes=10**7))
    _check_against_brute_force(problem, sol)
    assert sol.solver["closed_by"] in ("shortcut", "branch-and-bound")
    assert sol.solver["variables"] == 0


@SETTINGS
@given(problems(max_layers=6, max_options=4))
def test_milp_fallback_after_presolve_matches_brute_force(problem: Problem) -> None:
    """A node budget of 0 hands every open instance, reduced by the presolve and warm-started
    with its incumbent, to CBC; still exact."""
    sol = solve(problem, SolveConfig(shortcut=False, bnb_nodes=0))
    _check_against_brute_force(problem, sol)
    assert sol.solver["closed_by"] in ("shortcut", "branch-and-bound", "cbc")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_reductions_never_change_the_optimum(problem: Problem) -> None:
    plain = solve(problem, SolveConfig(prune=False, shortcut=False, fix=False, presolve=False))
    fast = solve(problem, SolveConfig(prune=True, shortcut=True, fix=True))
    assert plain.status == fast.status
    if fast.objective is not None:
        assert plain.objective == pytest.approx(fast.objective, rel=1e-9, abs=1e-9)
        _check_valid(problem, plain)


def test_ties_merge_and_bind() -> None:
    # Alone, 'a' would take w8 and 'b' w4; tied they must agree.
    a = layer_of("a", [(4, 10.0, 1.0, 1.0, 1.0), (8, 0.0, 2.0, 1.0, 1.0)])
    b = layer_of("b", [(4, 0.0, 1.0, 1.0, 1.0), (8, 1.0, 2.0, 1.0, 1.0)])
    free = solve(Problem((a, b), Limits(size_bytes=10.0)))
    assert free.choices == {"a": 1, "b": 0}
    tied = solve(Problem((a, b), Limits(size_bytes=10.0), (("a", "b"),)))
    assert tied.choices == {"a": 1, "b": 1} and tied.objective == 1.0


def test_binding_limits_reported() -> None:
    sol = solve(two_layer_problem(Limits(size_bytes=1.5e6, bops=1e9)))
    assert sol.status == "optimal" and sol.totals["size_bytes"] == 1.5e6
    assert sol.binding == ["size_bytes"]
    assert sol.solver["name"] == "cbc"


def test_unconstrained_takes_the_shortcut() -> None:
    sol = solve(two_layer_problem(Limits()))
    assert sol.objective == pytest.approx(0.2) and sol.solver["variables"] == 0


def test_deterministic() -> None:
    p = two_layer_problem(Limits(size_bytes=1.5e6))
    a, b = solve(p), solve(p)
    assert a.choices == b.choices and a.objective == b.objective


@pytest.mark.parametrize("limits", [Limits(size_bytes=1.5e6), Limits(size_bytes=1.0)])
def test_highs_agrees_with_cbc(limits: Limits) -> None:
    pytest.importorskip("highspy")
    p = two_layer_problem(limits)
    h = solve(p, SolveConfig(solver="highs", shortcut=False, presolve=False))
    c = solve(p, SolveConfig(shortcut=False, presolve=False))
    assert h.solver["name"] == "highs"
    assert (h.status, h.objective) == (c.status, c.objective)  # choices may differ (a tie)


@settings(max_examples=15, deadline=None)
@given(problems(max_layers=5))
def test_highs_matches_brute_force(problem: Problem) -> None:
    pytest.importorskip("highspy")
    best, _ = brute_force(problem)
    sol = solve(problem, SolveConfig(solver="highs", shortcut=False, presolve=False))
    if best is None:
        assert sol.status == "infeasible"
    else:
        assert math.isclose(sol.objective, best, rel_tol=1e-9, abs_tol=1e-9)


def test_closed_by_reports_the_engine() -> None:
    p = two_layer_problem(Limits(size_bytes=1.5e6))
    assert solve(p).solver["closed_by"] == "branch-and-bound"
    assert solve(two_layer_problem(Limits())).solver["closed_by"] == "shortcut"
    forced = solve(p, SolveConfig(bnb_nodes=0))
    assert forced.solver["closed_by"] == "cbc" and forced.solver["variables"] > 0
    assert (forced.status, forced.objective) == ("optimal", solve(p).objective)
    old = solve(p, SolveConfig(presolve=False, fix=False))
    assert old.solver["closed_by"] == "cbc" and old.objective == forced.objective
    with pytest.raises(BadProblemError, match="bnb_nodes"):
        SolveConfig(bnb_nodes=-1)


@pytest.mark.parametrize("cfg", [SolveConfig(), SolveConfig(presolve=False),
                                 SolveConfig(shortcut=False, bnb_nodes=0)])
def test_degenerate_numbers_solve_without_warnings(cfg: SolveConfig) -> None:
    """A limit of 5e-297 (normalised costs would overflow) and subnormal Omegas (the objective
    scale would underflow to 0): same answers as brute force, no RuntimeWarning."""
    options = (Option(2, 8, 0.0, 0.0, 1.0, 0.0, "t0"), Option(4, 8, 1.0, 1.0, 0.0, 0.0, "t2"),
               Option(5, 8, 2.0, 0.0, 0.0, 0.0, "t3"))
    tiny = Problem((LayerOptions("l0", options), LayerOptions("l1", options[:2])),
                   Limits(size_bytes=0.0, bops=5e-297))  # infeasible: l1 breaks a limit
    tiny_ok = Problem((LayerOptions("l0", options),), Limits(size_bytes=0.0, bops=5e-297))
    subnormal = Problem((LayerOptions("l0", (
        Option(2, 8, 1e-6, 1e-9, 0.0, 0.0, "t0"), Option(3, 8, 0.0, 9.7e5, 0.0, 0.0, "t1"),
        Option(4, 8, 5e-324, 2.5e5, 0.0, 0.0, "t2"))),), Limits(size_bytes=7.8e5))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for problem in (tiny, tiny_ok, subnormal):
            sol = solve(problem, cfg)
            best, _ = brute_force(problem)
            if best is None:
                assert sol.status == "infeasible"
            else:
                assert sol.status == "optimal"
                assert sol.objective == pytest.approx(best, abs=1e-300)


def test_a_sweep_ladder_reuses_one_model_and_agrees_with_fresh_ones() -> None:
    """The ladder pareto uses (one MILP model, only right-hand sides and allowed options
    changed, each budget warm-started from the last) settles every budget at the optimum a
    fresh ladder finds (the one solve uses), building its model once."""
    from solver.driver import Ladder
    from solver.groups import groups_of

    problem = mid_instance({"size_bytes": 0.5, "bops": 0.3}, n=12)
    groups = groups_of(problem)
    resources = ["size_bytes", "bops"]
    cfg = SolveConfig(presolve=False, fix=False, shortcut=False)
    sweep = Ladder(groups, resources, cfg, sweep=True)
    models, start = set(), None
    for f in (0.3, 0.5, 0.8):
        limits = {"size_bytes": problem.limits.get("size_bytes") * f / 0.5,
                  "bops": problem.limits.get("bops")}
        swept = sweep.settle(limits, start=start)
        fresh = Ladder(groups, resources, cfg).settle(limits)
        models.add(id(sweep.model))
        assert (swept.status, fresh.status) == ("optimal", "optimal")
        assert swept.info["closed_by"] == fresh.info["closed_by"] == "cbc"
        assert math.fsum(o.omega for o in swept.picked) == pytest.approx(
            math.fsum(o.omega for o in fresh.picked), rel=1e-9)
        start = swept.picked
    assert len(models) == 1
