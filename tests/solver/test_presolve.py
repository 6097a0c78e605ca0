"""The exact in-process solve: the bound is a bound, the incumbent is feasible, and every
combination of probe, beams, neighbourhood, fronts and exact search equals brute force (also
with float costs) or CBC on mid-size instances."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from bitplan_solver_cases import (
    SETTINGS,
    arrays_of,
    assert_closed_in_process,
    brute_force,
    float_problems,
    lp_relaxation,
    mid_instance,
    problems,
    search_params,
)
from hypothesis import given
from hypothesis import strategies as st

from solver import Problem, SolveConfig, presolve, solve
from solver.arrays import Arrays
from solver.lp import lp_duals
from solver.problem import within
from solver.search import Search


@SETTINGS
@given(float_problems())
def test_branch_and_bound_float_costs_match_brute_force(problem: Problem) -> None:
    best, _ = brute_force(problem)
    sol = solve(problem, SolveConfig(bnb_nodes=10**7))
    assert_closed_in_process(sol, best)


@SETTINGS
@given(problems(max_layers=6, max_options=4))
def test_bound_is_a_bound_and_incumbent_feasible(problem: Problem) -> None:
    if not problem.limits.active():
        return
    best, _ = brute_force(problem)
    arr, limits = arrays_of(problem)
    out = presolve.solve_arrays(arr, limits, node_limit=0)
    if out.info.get("closed_by") == "shortcut":
        return
    if best is None:
        assert out.status in ("infeasible", "open") and out.incumbent is None
        return
    assert out.info["bound"] <= best + 1e-9 * max(1.0, abs(best))
    if out.incumbent is not None:
        assert math.fsum(o.omega for o in out.incumbent) >= best - 1e-9
        for r in limits:
            assert within(math.fsum(o.costs[r] for o in out.incumbent), limits[r])
    # an open result keeps an optimum among its reduced options
    found = None
    for combo in itertools.product(*out.groups):
        if all(within(math.fsum(o.costs[r] for o in combo), limits[r]) for r in limits):
            v = math.fsum(o.omega for o in combo)
            found = v if found is None else min(found, v)
    assert found == pytest.approx(best, abs=1e-9)


@SETTINGS
@given(float_problems(), st.sampled_from([2, 1500]))
def test_exact_search_with_fronts_matches_brute_force(problem: Problem,
                                                      front_max: int) -> None:
    """Fronts built from the first layer of every exact run (whole, or cut short at two
    points so that the early depths keep the LP curves): still brute force's optimum."""
    best, _ = brute_force(problem)
    sol = solve(problem, SolveConfig(shortcut=False, bnb_nodes=10**7),
                params=search_params(front_trigger=-1, front_max=front_max, beam_width=1,
                                     probe_states=0))
    assert_closed_in_process(sol, best)


@SETTINGS
@given(problems(max_layers=7, max_options=4))
def test_neighbourhood_search_keeps_the_optimum(problem: Problem) -> None:
    """The neighbourhood search after each beam only sets incumbents: forced on every tree,
    with one-state beams, the answer is still brute force's."""
    best, _ = brute_force(problem)
    sol = solve(problem, SolveConfig(shortcut=False, bnb_nodes=10**7),
                params=search_params(lns_min_free=-1, beam_width=1, probe_states=0))
    assert_closed_in_process(sol, best)


def test_neighbourhood_search_runs_on_the_disagreeing_groups(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On a 30-layer instance with three limits the search runs on a tree that leaves only
    some groups free (the neighbourhood), and the answer still equals CBC's."""
    problem = mid_instance({"size_bytes": 0.6, "bops": 0.45, "latency_ms": 0.5})
    free_counts = []
    init = Search.__init__

    def spy(self, arr, keep, *args, **kwargs):
        free_counts.append(sum(len(k) > 1 for k in keep))
        init(self, arr, keep, *args, **kwargs)

    monkeypatch.setattr(Search, "__init__", spy)
    ours = solve(problem, params=search_params(lns_min_free=-1, beam_width=2, probe_states=0))
    reference = solve(problem, SolveConfig(presolve=False, fix=False, shortcut=False))
    assert ours.objective == pytest.approx(reference.objective, rel=1e-9)
    assert len(free_counts) >= 2 and min(free_counts[1:]) < free_counts[0]


@pytest.mark.parametrize("limits", [{"a": 2.5}, {"a": 2.5, "b": 2.5}])
def test_padding_is_never_picked(limits: dict[str, float]) -> None:
    """The rectangle's padding copies a real option, but a matrix product may round a copy a
    unit lower than the original (seen on random problems: a padding index came back and the
    caller's lookup failed). With every padding value one unit below the option it copies,
    the answer still holds real options only, and is the optimum."""
    groups = [["g0o0"], ["g1o0", "g1o1"], ["g2o0", "g2o1", "g2o2"]]
    om = np.array([[1.0, 1.0, 1.0], [2.0, 0.0, 2.0], [3.5, 1.0, 0.0]])
    om[0, 1:] = np.nextafter(1.0, -math.inf)
    om[1, 2] = np.nextafter(2.0, -math.inf)
    use = np.array([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
    arr = Arrays(groups, "omega", list(limits), om, np.array([use] * len(limits)),
                     [1, 2, 3])
    res = presolve.solve_arrays(arr, limits)
    assert res.status == "optimal"
    assert res.incumbent == ["g0o0", "g1o0", "g2o1"]  # 1 + 2 + 1 at a use of 1 + 0 + 1 (the


@SETTINGS
@given(float_problems())
def test_exact_search_without_the_curve_cache_matches_brute_force(problem: Problem) -> None:
    best, _ = brute_force(problem)
    sol = solve(problem, SolveConfig(shortcut=False, bnb_nodes=10**7),
                params=search_params(curve_cache_max=-1, beam_width=1, probe_states=0))
    assert_closed_in_process(sol, best)


@SETTINGS
@given(problems(max_layers=7, max_options=4))
def test_exact_search_alone_matches_brute_force(problem: Problem) -> None:
    """With a beam of one state and no probe, optimality rests on the exact layered search."""
    best, _ = brute_force(problem)
    sol = solve(problem, SolveConfig(shortcut=False, bnb_nodes=10**7),
                params=search_params(beam_width=1, probe_states=0))
    assert_closed_in_process(sol, best)


def test_layered_search_matches_cbc_on_a_mid_size_instance() -> None:
    """30 layers x 12 options, two limits: far beyond brute force, so CBC alone is the
    reference; the in-process search must close it and agree."""
    problem = mid_instance({"size_bytes": 0.5, "bops": 0.3})
    ours = solve(problem)
    reference = solve(problem, SolveConfig(presolve=False, fix=False, shortcut=False))
    assert ours.solver["closed_by"] == "branch-and-bound"
    assert (ours.status, reference.status) == ("optimal", "optimal")
    assert ours.objective == pytest.approx(reference.objective, rel=1e-9)


def test_a_greedy_beam_is_not_taken_for_the_exact_search(monkeypatch: pytest.MonkeyPatch) -> None:
    """A beam of width one (greedy) drops children, so its best completion is only an
    incumbent: the exact search must still run and reach CBC's optimum. Here the beams improve
    the incumbent (the repaired seeds are switched off, so the first incumbent is weak), so the
    exact search runs on a tree rebuilt with the options the better incumbent still allows
    (fails when that rebuild fixes too much)."""
    monkeypatch.setattr(presolve, "repair", lambda *args: None)
    trees = []
    build = Search.__init__

    def spy(self: Search, *args: object) -> None:
        build(self, *args)
        trees.append(sum(len(ks) for members in self.members for _, ks in members))

    monkeypatch.setattr(Search, "__init__", spy)
    problem = mid_instance({"size_bytes": 0.6, "bops": 0.45, "latency_ms": 0.5})
    ours = solve(problem, params=search_params(beam_width=1, beam_growth=1, probe_states=0))
    reference = solve(problem, SolveConfig(presolve=False, fix=False, shortcut=False))
    assert len(trees) == 2 and trees[1] < trees[0]  # rebuilt, and smaller
    assert ours.solver["closed_by"] == "branch-and-bound"
    assert ours.objective == pytest.approx(reference.objective, rel=1e-9)


@pytest.mark.parametrize("work", [0, 1, 1000])
def test_exact_attempts_between_beams_keep_the_optimum(work: int,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Exact tries between widening beams (failing on a tiny budget, or finishing) either
    close the problem at CBC's optimum or leave it to the later beams and the exact search.
    (The repaired seeds are switched off, so that the beams improve a weak first incumbent.)"""
    monkeypatch.setattr(presolve, "repair", lambda *args: None)
    runs = []
    run = Search.run

    def spy(self: Search, ub: float, max_states: int, **kw: object) -> tuple[int, bool]:
        out = run(self, ub, max_states, **kw)
        runs.append((kw.get("beam_width"), out[1]))
        return out

    monkeypatch.setattr(Search, "run", spy)
    problem = mid_instance({"size_bytes": 0.5, "bops": 0.5, "latency_ms": 0.5})
    ours = solve(problem, params=search_params(beam_width=1, probe_states=0, attempt_width=1,
                                         attempt_work=work))
    reference = solve(problem, SolveConfig(presolve=False, fix=False, shortcut=False))
    assert ours.solver["closed_by"] == "branch-and-bound"
    assert ours.objective == pytest.approx(reference.objective, rel=1e-9)
    # the exact runs that follow a beam: the tries (and, after the last beam, the search)
    tries = [done for (before, _), (width, done) in zip(runs, runs[1:], strict=False)
             if before is not None and width is None]
    assert tries
    if work == 0:  # every try fails at once; a beam that dropped nothing closed it
        assert not any(tries) and runs[-1][0] is not None
    else:  # a try closed it
        assert tries[-1] and runs[-1] == (None, True)
    if work == 1000:  # ... the first one
        assert len(tries) == 1


@pytest.mark.parametrize("backend", ["highspy", "scipy"])
@pytest.mark.parametrize("fractions", [{"size_bytes": 0.5, "bops": 0.3},
                                       {"size_bytes": 0.6, "bops": 0.45, "latency_ms": 0.5}])
def test_root_bound_is_the_lp_relaxation(fractions: dict[str, float], backend: str,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """With several limits the multipliers come from the LP's duals (HiGHS directly, or
    through scipy), so the Lagrangian bound reaches the LP relaxation's optimum (the best any
    multipliers can give)."""
    if backend == "highspy":
        pytest.importorskip("highspy")
    monkeypatch.setattr(presolve, "lp_duals", lambda *a: lp_duals(*a, backend=backend))
    problem = mid_instance(fractions)
    arr, limits = arrays_of(problem)
    out = presolve.solve_arrays(arr, limits, node_limit=0)
    assert out.info["lp_duals"]
    assert out.info["bound"] == pytest.approx(lp_relaxation(problem), rel=1e-7)


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.8])
def test_single_limit_bound_is_the_lp_relaxation(fraction: float,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """With one limit the multiplier comes straight from the hulls (no scalar search), and
    its Lagrangian bound is the LP relaxation's optimum."""
    def no_search(*args: object, **kwargs: object) -> None:
        raise AssertionError("the scalar search ran")

    monkeypatch.setattr(presolve, "smallest_fitting", no_search)
    problem = mid_instance({"size_bytes": fraction})
    arr, limits = arrays_of(problem)
    out = presolve.solve_arrays(arr, limits, node_limit=0)
    assert out.info["bound"] == pytest.approx(lp_relaxation(problem), rel=1e-9)


def test_search_stays_exact_when_the_lp_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """No LP duals (solver failure): the line searches set the multipliers; weaker bounds,
    the same optimum."""
    problem = mid_instance({"size_bytes": 0.6, "bops": 0.45, "latency_ms": 0.5}, n=16)
    with_lp = solve(problem)
    monkeypatch.setattr(presolve, "lp_duals", lambda *a: None)
    arr, limits = arrays_of(problem)
    assert "lp_duals" not in presolve.solve_arrays(arr, limits, node_limit=0).info
    without = solve(problem)
    assert (with_lp.status, without.status) == ("optimal", "optimal")
    assert without.objective == pytest.approx(with_lp.objective, rel=1e-9)
