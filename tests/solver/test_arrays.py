"""Dominance pruning of the option arrays is lossless."""

from __future__ import annotations

import itertools
import math

import pytest
from bitplan_solver_cases import (
    SETTINGS,
    arrays_of,
    brute_force,
    problems,
)
from hypothesis import given

from solver import Problem
from solver.problem import within


@SETTINGS
@given(problems(max_layers=6, max_options=4))
def test_dominance_pruning_keeps_an_optimum(problem: Problem) -> None:
    if not problem.limits.active():
        return
    best, _ = brute_force(problem)
    arr, limits = arrays_of(problem)
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
