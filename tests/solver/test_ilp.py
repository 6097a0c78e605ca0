"""The ILP against exhaustive enumeration, its reductions, diagnosis and solver choice."""

from __future__ import annotations

import math
import warnings

import pytest
from bitplan_solver_cases import brute_force, problems
from hypothesis import HealthCheck, given, settings

from solver import Limits, Problem, Solution, SolveConfig, solve
from solver.diagnose import diagnose, min_reachable
from solver.errors import BadProblemError
from solver.groups import totals_of
from solver.problem import RESOURCES, LayerOptions, Option, within

FAST = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


def _check_valid(problem: Problem, sol: Solution) -> None:
    index = {la.name: la for la in problem.layers}
    for a, b in problem.ties:  # ties hold
        assert index[a].options[sol.choices[a]].tag == index[b].options[sol.choices[b]].tag
    for r in problem.limits.active():
        assert within(sol.totals[r], problem.limits.get(r))


@FAST
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


@FAST
@given(problems(max_layers=7, max_options=4))
def test_branch_and_bound_alone_matches_brute_force(problem: Problem) -> None:
    """Without the minimum-Omega shortcut and with a generous node budget, every instance is
    settled in process (no MILP solver) and equals brute force."""
    sol = solve(problem, SolveConfig(shortcut=False, bnb_nodes=10**7))
    _check_against_brute_force(problem, sol)
    assert sol.solver["closed_by"] in ("shortcut", "branch-and-bound")
    assert sol.solver["variables"] == 0


@FAST
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


def _layer(name, rows):
    return LayerOptions(name, tuple(
        Option(w, w, om, s, b, lat, f"w{w}a{w}") for w, om, s, b, lat in rows))


def _two_layer(limits: Limits) -> Problem:
    rows = [(4, 1.0, 0.5e6, 10.0, 1.0), (8, 0.1, 1.0e6, 40.0, 2.0)]
    return Problem((_layer("a", rows), _layer("b", rows)), limits)


def test_infeasible_size_alone_has_actionable_message() -> None:
    sol = solve(_two_layer(Limits(size_bytes=0.9e6)))
    assert sol.status == "infeasible" and sol.choices == {}
    d = sol.diagnosis["limits"]["size_bytes"]
    assert d == {"limit": 0.9e6, "min_reachable": 1.0e6, "reachable_alone": False}
    msg = sol.diagnosis["message"]
    assert "size limit 0.9 MB is below the smallest reachable 1 MB" in msg
    assert "raise it to at least 1 MB" in msg


def test_infeasible_pair_names_the_conflict() -> None:
    # Each layer: cheap in size but heavy in latency, or the reverse.
    rows = [(4, 1.0, 1.0, 10.0, 5.0), (8, 1.0, 5.0, 10.0, 1.0)]
    p = Problem((_layer("a", rows), _layer("b", rows)),
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
    layers = (_layer("a", rows),)
    p = Problem(layers, Limits(size_bytes=1.0, bops=1.0, latency_ms=1.0))
    assert solve(p).status == "infeasible"
    d = diagnose(p)
    assert d["conflicts"][0]["limits"] == ["size_bytes", "bops", "latency_ms"]


def test_ties_merge_and_bind() -> None:
    # Alone, 'a' would take w8 and 'b' w4; tied they must agree.
    a = _layer("a", [(4, 10.0, 1.0, 1.0, 1.0), (8, 0.0, 2.0, 1.0, 1.0)])
    b = _layer("b", [(4, 0.0, 1.0, 1.0, 1.0), (8, 1.0, 2.0, 1.0, 1.0)])
    free = solve(Problem((a, b), Limits(size_bytes=10.0)))
    assert free.choices == {"a": 1, "b": 0}
    tied = solve(Problem((a, b), Limits(size_bytes=10.0), (("a", "b"),)))
    assert tied.choices == {"a": 1, "b": 1} and tied.objective == 1.0


def test_binding_limits_reported() -> None:
    sol = solve(_two_layer(Limits(size_bytes=1.5e6, bops=1e9)))
    assert sol.status == "optimal" and sol.totals["size_bytes"] == 1.5e6
    assert sol.binding == ["size_bytes"]
    assert sol.solver["name"] == "cbc"


def test_unconstrained_takes_the_shortcut() -> None:
    sol = solve(_two_layer(Limits()))
    assert sol.objective == pytest.approx(0.2) and sol.solver["variables"] == 0


def test_deterministic() -> None:
    p = _two_layer(Limits(size_bytes=1.5e6))
    a, b = solve(p), solve(p)
    assert a.choices == b.choices and a.objective == b.objective


def test_solution_json_round_trip() -> None:
    for lim in (Limits(size_bytes=1.5e6), Limits(size_bytes=1.0)):
        sol = solve(_two_layer(lim))
        back = Solution.from_json(sol.to_json())
        assert back == sol


def test_solution_from_json_rejects_bad_input() -> None:
    with pytest.raises(BadProblemError):
        Solution.from_json("{")
    obj = solve(_two_layer(Limits())).to_dict()
    obj["extra"] = 1
    with pytest.raises(BadProblemError, match="solution keys"):
        Solution.from_dict(obj)


def test_solve_config_validation_and_round_trip() -> None:
    cfg = SolveConfig(solver="highs", time_limit_s=5.0, gap_rel=0.0)
    assert SolveConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(BadProblemError, match="unknown solver"):
        SolveConfig(solver="gurobi")
    with pytest.raises(BadProblemError, match="time_limit_s"):
        SolveConfig(time_limit_s=0)
    with pytest.raises(BadProblemError, match="unknown keys"):
        SolveConfig.from_dict({"bogus": 1})


@pytest.mark.parametrize("limits", [Limits(size_bytes=1.5e6), Limits(size_bytes=1.0)])
def test_highs_agrees_with_cbc(limits: Limits) -> None:
    pytest.importorskip("highspy")
    p = _two_layer(limits)
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
    p = _two_layer(Limits(size_bytes=1.5e6))
    assert solve(p).solver["closed_by"] == "branch-and-bound"
    assert solve(_two_layer(Limits())).solver["closed_by"] == "shortcut"
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
