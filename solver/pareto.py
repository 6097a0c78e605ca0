"""Pareto sweep: the best Omega at N budgets of one resource, from its smallest to its largest
reachable total. The PuLP model is built once; only the swept limit's right-hand side changes
between solves, and each solve starts from the previous (smaller-budget) optimum, which stays
feasible as the budget grows."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from . import bnb, lagrange
from .errors import BadProblemError
from .ilp import (
    SolveConfig,
    _choices_from,
    _groups,
    _Model,
    _prune,
    _scales,
    _sorted_opts,
    objective_of,
    totals_of,
    within,
)
from .problem import RESOURCES, Problem


def _value(picked: list) -> float:
    return math.fsum(o.omega for o in picked)


def within_all(picked: list, limits: dict[str, float], resources: list[str]) -> bool:
    return all(within(math.fsum(o.costs[r] for o in picked), limits[r]) for r in resources)


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
    problem: Problem, resource: str, points: int = 20, cfg: SolveConfig | None = None
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
    groups = _groups(problem)
    lo = math.fsum(min(o.costs[resource] for o in g.options) for g in groups)
    hi = math.fsum(max(o.costs[resource] for o in g.options) for g in groups)
    budgets = [lo + (hi - lo) * i / (points - 1) for i in range(points)]
    budgets[-1] = hi

    limits = {r: problem.limits.get(r) for r in problem.limits.active() if r != resource}
    limits[resource] = hi
    resources = [r for r in RESOURCES if r in limits]
    limits = {r: limits[r] for r in resources}
    if cfg.prune:
        opts = [_prune(g.options, "omega", resources) for g in groups]
    else:
        opts = [_sorted_opts(g.options, "omega", resources) for g in groups]
    best = [g[0] for g in opts]
    best_cost = {r: math.fsum(o.costs[r] for o in best) for r in resources}
    others_fit = all(within(best_cost[r], limits[r]) for r in resources if r != resource)
    model: _Model | None = None
    warm = None
    out = []
    arr = bnb.prune_dominated(opts, "omega", resources) if cfg.presolve else None
    for b in budgets:
        if cfg.shortcut and others_fit and within(best_cost[resource], b):
            status, picked = "optimal", best
        else:
            here = dict(limits, **{resource: b})
            kept, inc = opts, None
            closed = False  # settled without the MILP solver
            if arr is not None:
                # exact presolve + branch-and-bound, seeded with the previous (smaller-budget)
                # optimum, which stays feasible as the budget grows
                res = bnb.solve_arrays(arr, here, node_limit=cfg.bnb_nodes, start=warm)
                kept, inc = res.groups, res.incumbent
                if res.status != "open":
                    status, picked, closed = res.status, res.incumbent, True
            elif cfg.fix and all(within(math.fsum(min(o.costs[r] for o in g) for g in opts),
                                        here[r]) for r in resources):
                kept, inc, _ = lagrange.fix(opts, here)
                if inc is not None and all(len(g) == 1 for g in kept):
                    status, picked, closed = "optimal", inc, True
            if not closed:
                if model is None:
                    base = arr.groups if arr is not None else opts
                    model = _Model(base, "omega", limits, _scales(groups, resources))
                model.set_limit(resource, b)
                model.restrict(kept)
                start = inc
                if warm is not None and within_all(warm, here, resources) and (
                        inc is None or _value(warm) < _value(inc)):
                    start = warm  # the previous optimum is feasible and better here
                if start is not None and not all(
                        any(o is s for o in g) for g, s in zip(kept, start, strict=True)):
                    start = inc
                status, picked = model.run(cfg, warm=start)
                if picked is None and status == "time_limit" and start is not None:
                    picked = start
        if picked is not None:
            warm = picked
            choices = _choices_from(problem, groups, picked)
            out.append(ParetoPoint(b, status, objective_of(problem, choices), choices,
                                   totals_of(problem, choices)))
        else:
            out.append(ParetoPoint(b, status, None, {}, {r: None for r in RESOURCES}))
    return out
