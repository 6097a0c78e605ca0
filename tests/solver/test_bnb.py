"""The exact in-process presolve: dominance is lossless, the bound is a bound, the incumbent
polish keeps feasibility, and branch-and-bound equals brute force (also with float costs)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from bitplan_solver_cases import brute_force, problems
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from solver import Limits, Problem, SolveConfig, bnb, solve
from solver.ilp import _groups, _sorted_opts, within
from solver.problem import LayerOptions, Option

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def _arrays(problem: Problem) -> tuple[bnb.Arrays, dict[str, float]]:
    res = problem.limits.active()
    limits = {r: problem.limits.get(r) for r in res}
    opts = [_sorted_opts(g.options, "omega", res) for g in _groups(problem)]
    return bnb.prune_dominated(opts, "omega", res), limits


@SETTINGS
@given(problems(max_layers=6, max_options=4))
def test_dominance_pruning_keeps_an_optimum(problem: Problem) -> None:
    if not problem.limits.active():
        return
    best, _ = brute_force(problem)
    arr, limits = _arrays(problem)
    # enumerate the pruned groups
    found = None
    for combo in itertools.product(*arr.groups):
        if all(within(math.fsum(o.costs[r] for o in combo), limits[r]) for r in limits):
            v = math.fsum(o.omega for o in combo)
            found = v if found is None else min(found, v)
    assert (found is None) == (best is None)
    if best is not None:
        assert found == pytest.approx(best, abs=1e-9)
    for g in arr.groups:  # no kept option dominates another kept one
        for a, b in itertools.permutations(g, 2):
            assert not (a.omega <= b.omega and all(a.costs[r] <= b.costs[r] for r in limits))


@st.composite
def float_problems(draw) -> Problem:
    """Float costs spanning magnitudes, up to three limits, no ties."""
    n = draw(st.integers(1, 6))
    layers = []
    for i in range(n):
        k = draw(st.integers(1, 4))
        scale = 10.0 ** draw(st.integers(0, 6))
        opts = []
        for j in range(k):
            c = [draw(st.floats(0, 1, allow_nan=False)) * scale for _ in range(3)]
            opts.append(Option(2 + j, 8, draw(st.floats(-1, 1, allow_nan=False)),
                               *c, f"t{j}"))
        layers.append(LayerOptions(f"l{i}", tuple(opts)))
    probe = Problem(tuple(layers))
    lim = {}
    for r in ("size_bytes", "bops", "latency_ms"):
        if draw(st.booleans()):
            lo = sum(min(o.cost(r) for o in la.options) for la in probe.layers)
            hi = sum(max(o.cost(r) for o in la.options) for la in probe.layers)
            lim[r] = lo + draw(st.floats(-0.1, 1.0)) * (hi - lo)
            lim[r] = max(lim[r], 0.0)
    return Problem(tuple(layers), Limits(**lim))


@SETTINGS
@given(float_problems())
def test_branch_and_bound_float_costs_match_brute_force(problem: Problem) -> None:
    best, _ = brute_force(problem)
    sol = solve(problem, SolveConfig(bnb_nodes=10**7))
    if best is None:
        assert sol.status == "infeasible"
    else:
        assert sol.status == "optimal"
        assert sol.solver["closed_by"] in ("shortcut", "branch-and-bound")
        assert sol.objective == pytest.approx(best, rel=1e-9, abs=1e-9)


@SETTINGS
@given(problems(max_layers=6, max_options=4))
def test_bound_is_a_bound_and_incumbent_feasible(problem: Problem) -> None:
    if not problem.limits.active():
        return
    best, _ = brute_force(problem)
    arr, limits = _arrays(problem)
    out = bnb.solve_arrays(arr, limits, node_limit=0)
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


def test_pair_improve_makes_a_coordinated_move() -> None:
    # Two groups; moving only one breaks the limit, swapping both lowers Omega.
    om = np.array([[0.0, -1.0], [0.0, 0.5]])
    cn = np.array([[[0.5, 1.0], [0.5, 0.0]]])  # one resource, cap 1
    picks = bnb.pair_improve(om, cn, np.array([1.0]), [2, 2], [0, 0])
    assert picks == [1, 1]
    # already optimal: unchanged
    assert bnb.pair_improve(om, cn, np.array([1.0]), [2, 2], [1, 1]) == [1, 1]


def test_hull_increments_are_convex() -> None:
    start, incs = bnb._hull_increments([(0.0, 5.0), (1.0, 3.0), (2.0, 2.5), (3.0, 0.0),
                                        (1.5, 4.0)])
    assert start == (0.0, 5.0)
    effs = [e for e, _, _ in incs]
    assert effs == sorted(effs, reverse=True) and all(e > 0 for e in effs)
    assert sum(dw for _, dw, _ in incs) == 3.0 and sum(do for _, _, do in incs) == -5.0
