"""Pareto sweep: the best Omega at N budgets of one resource, from its smallest to its largest
reachable total. Each budget is settled by the same ladder as :func:`solver.solve`
(solver.driver); the MILP model, when one is needed, is built once and only its right-hand
sides and allowed options change between budgets, and each budget starts from the previous
(smaller-budget) optimum, which stays feasible as the budget grows."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .config import SolveConfig
from .driver import Ladder
from .errors import BadProblemError
from .groups import choices_of, groups_of, objective_of, totals_of
from .params import PARAMS, SearchParams
from .problem import RESOURCES, Problem


@dataclass
class ParetoPoint:
    """One budget of the sweep and the optimum under it (and the problem's other limits)."""

    budget: float
    status: str
    objective: float | None
    choices: dict[str, int]
    totals: dict[str, float | None]

    def to_dict(self) -> dict[str, Any]:
        return {"budget": self.budget, "status": self.status, "objective": self.objective,
                "choices": dict(self.choices), "totals": dict(self.totals)}


def pareto(
    problem: Problem, resource: str, points: int = 20, cfg: SolveConfig | None = None, *,
    params: SearchParams = PARAMS,
) -> list[ParetoPoint]:
    """Solve at ``points`` evenly spaced budgets of ``resource`` between its minimum and
    maximum reachable totals (ties and pins respected; the problem's other limits stay).
    Raises BadProblemError for an unknown resource, fewer than 2 points, or a resource some
    option has no cost for."""
    cfg = cfg or SolveConfig()
    if resource not in RESOURCES:
        raise BadProblemError(f"unknown resource {resource!r}; use one of {list(RESOURCES)}")
    if isinstance(points, bool) or not isinstance(points, int) or points < 2:
        raise BadProblemError(f"a Pareto sweep needs at least 2 points, got {points!r}")
    for la in problem.layers:
        for o in la.options:
            if o.cost(resource) is None:
                raise BadProblemError(
                    f"layer {la.name!r} option {o.tag!r} has no {resource}; cannot sweep it"
                )
    groups = groups_of(problem)
    lo = math.fsum(min(o.costs[resource] for o in g.options) for g in groups)
    hi = math.fsum(max(o.costs[resource] for o in g.options) for g in groups)
    budgets = [lo + (hi - lo) * i / (points - 1) for i in range(points)]
    budgets[-1] = hi
    limits = {r: problem.limits.get(r) for r in problem.limits.active() if r != resource}
    limits[resource] = hi
    resources = [r for r in RESOURCES if r in limits]
    ladder = Ladder(groups, resources, cfg, params, sweep=True)
    warm = None  # the previous (smaller-budget) optimum: still feasible as the budget grows
    out = []
    for b in budgets:
        here = {r: b if r == resource else limits[r] for r in resources}
        settled = ladder.settle(here, start=warm)
        if settled.picked is not None:
            warm = settled.picked
            choices = choices_of(problem, groups, settled.picked)
            out.append(ParetoPoint(b, settled.status, objective_of(problem, choices), choices,
                                   totals_of(problem, choices)))
        else:
            out.append(ParetoPoint(b, settled.status, None, {}, {r: None for r in RESOURCES}))
    return out
