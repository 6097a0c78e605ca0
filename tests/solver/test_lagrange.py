"""Lagrangian reduced-cost fixing: every optimum survives, the bound is a bound."""

from __future__ import annotations

import math

from bitplan_solver_cases import brute_force, problems
from hypothesis import given, settings

from solver import Problem, lagrange
from solver.groups import groups_of


@settings(max_examples=60, deadline=None)
@given(problems(max_layers=6, max_options=4))
def test_lagrangian_fixing_keeps_every_optimum(problem: Problem) -> None:
    """Reduced-cost fixing must keep every optimal assignment, not just one."""
    best, optima = brute_force(problem)
    limits = {r: problem.limits.get(r) for r in problem.limits.active()}
    if best is None or not limits:
        return
    groups = groups_of(problem)
    kept, incumbent, info = lagrange.fix([list(g.options) for g in groups], limits)
    if incumbent is None:
        return
    assert info["bound"] <= best + 1e-9 * max(1.0, abs(best))
    assert math.fsum(o.omega for o in incumbent) >= best - 1e-9 * max(1.0, abs(best))
    for combo in optima:
        for g, opts in zip(groups, kept, strict=True):
            k = combo[g.members[0]]
            tag = problem.layers[g.members[0]].options[k].tag
            assert tag in {o.tag for o in opts}
