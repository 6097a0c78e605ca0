"""The one way through the solver: :func:`solve` and :func:`solver.pareto.pareto` both settle
each set of limits with a :class:`Ladder`, which climbs only as far as it must:

1. *shortcut*: infeasible when a limit is below the sum of per-group minima; optimal when each
   group's least-Omega option fits (``SolveConfig.shortcut``);
2. *search*: the exact in-process solve (:func:`solver.presolve.solve_arrays`, with
   ``SolveConfig.presolve``), or with it off Lagrangian reduced-cost fixing
   (:func:`solver.lagrange.fix`, with ``SolveConfig.fix``);
3. *MILP*: what is still open goes to CBC or HiGHS (:mod:`solver.milp`), reduced and
   warm-started with the incumbent.

Exact reductions before that (each keeps the optimum value): tied layers are merged into one
group whose options are the shared tags (solver.groups), so a tie costs no constraint and no
variable; dominated options are dropped (solver.arrays; or, opt-in, ``SolveConfig.prune``
before the MILP solver); groups left with one option become constants. Reported objective and
totals are always recomputed from the chosen options in layer order, never read back from a
solver.

``Solution.solver`` carries ``closed_by`` ("shortcut", "branch-and-bound", "lagrange", "cbc" or
"highs"), ``nodes`` (the search's work, in children evaluated) and, when a MILP solver ran,
``presolve_seconds`` (time spent before it started).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any

from .arrays import Arrays, prune_dominated
from .config import Solution, SolveConfig
from .diagnose import diagnose
from .groups import (
    GOpt,
    Group,
    binding_of,
    choices_of,
    groups_of,
    objective_of,
    prune_options,
    sort_options,
    totals_of,
)
from .lagrange import fix
from .params import PARAMS, SearchParams
from .presolve import solve_arrays
from .problem import FEAS_RTOL, RESOURCES, Problem, within

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """How one set of limits was settled: ``picked`` holds one option per group (None when no
    assignment was found), ``info`` what goes into ``Solution.solver``."""

    status: str
    picked: list[GOpt] | None
    info: dict[str, Any] = field(default_factory=dict)
    variables: int = 0
    constraints: int = 0


class Ladder:
    """Shortcut -> search -> MILP for the groups of one problem under limits on ``resources``
    (a fixed list; only their values change between :meth:`settle` calls). ``sweep``: keep one
    MILP model over all options and only change its right-hand sides and the options allowed
    (a Pareto sweep); else each hand-off builds a model over the reduced groups."""

    def __init__(self, groups: list[Group], resources: list[str], cfg: SolveConfig,
                 params: SearchParams = PARAMS, sweep: bool = False) -> None:
        self.groups, self.resources, self.cfg, self.params = groups, resources, cfg, params
        self.sweep = sweep
        self.arr: Arrays | None = None
        if cfg.prune:
            self.opts = [prune_options(g.options, "omega", resources) for g in groups]
            if cfg.presolve:
                self.arr = prune_dominated(self.opts, "omega", resources)
        elif cfg.presolve:  # sorts and prunes (losslessly) in one vectorised pass
            self.arr = prune_dominated([g.options for g in groups], "omega", resources)
            self.opts = self.arr.groups
        else:
            self.opts = [sort_options(g.options, "omega", resources) for g in groups]
        self.best = [g[0] for g in self.opts]  # minimum-Omega option of each group
        self.model: Any = None  # the sweep's MILP model, built on its first hand-off

    def minima(self) -> dict[str, float]:
        """Each resource's sum of per-group minima (the smallest reachable total)."""
        if self.arr is not None:
            return {r: math.fsum(self.arr.cost[i].min(axis=1).tolist())
                    for i, r in enumerate(self.resources)}
        return {r: math.fsum(min(o.costs[r] for o in g) for g in self.opts)
                for r in self.resources}

    def settle(self, limits: dict[str, float], start: list[GOpt] | None = None,
               t0: float | None = None) -> Outcome:
        """The optimum under ``limits`` (keys: the ladder's resources). ``start``: a candidate
        assignment (e.g. the previous Pareto point) for the search and the MILP solver; ``t0``:
        when the work began (``presolve_seconds`` and the MILP's share of the time limit count
        from it; default now)."""
        t0 = time.perf_counter() if t0 is None else t0
        cfg = self.cfg
        mins = self.minima()
        if any(not within(mins[r], limits[r]) for r in self.resources):
            return Outcome("infeasible", None, {"closed_by": "shortcut"})
        if cfg.shortcut and all(within(math.fsum(o.costs[r] for o in self.best), limits[r])
                                for r in self.resources):
            return Outcome("optimal", self.best, {"closed_by": "shortcut"})
        kept, inc = self.opts, None
        info: dict[str, Any] = {"closed_by": "shortcut"}
        if self.arr is not None:
            # the time limit also caps the search (it then hands over, as on the node budget)
            res = solve_arrays(self.arr, limits, node_limit=cfg.bnb_nodes,
                               time_limit_s=cfg.time_limit_s, start=start, params=self.params)
            info["nodes"] = res.info.get("nodes", 0)
            if res.status != "open":
                info["closed_by"] = res.info.get("closed_by", "branch-and-bound")
                return Outcome(res.status, res.incumbent, info)
            kept, inc = res.groups, res.incumbent
        elif cfg.fix:
            kept, inc, _ = fix(self.opts, limits)
            if inc is not None and all(len(g) == 1 for g in kept):
                info["closed_by"] = "lagrange"  # the bound proves the incumbent optimal
                return Outcome("optimal", inc, info)
        return self._milp(limits, kept, inc, start, t0, info)

    def _milp(self, limits: dict[str, float], kept: list[list[GOpt]], inc: list[GOpt] | None,
              start: list[GOpt] | None, t0: float, info: dict[str, Any]) -> Outcome:
        """Hand ``kept`` to the MILP solver, warm-started with the better of ``inc`` and a
        feasible ``start`` made of kept options."""
        from .milp import Model, scales  # lazily: PuLP loads only when a model is needed

        cfg = self.cfg
        spent = time.perf_counter() - t0
        info["presolve_seconds"] = spent
        if self.sweep:
            if self.model is None:
                base = self.arr.groups if self.arr is not None else self.opts
                self.model = Model(base, "omega", limits, scales(self.groups, self.resources))
            for r in self.resources:
                self.model.set_limit(r, limits[r])
            self.model.restrict(kept)
            model = self.model
        else:
            model = Model(kept, "omega", limits, scales(self.groups, self.resources))
        warm = _warm_start(kept, inc, start, limits)
        run_cfg = cfg
        if cfg.time_limit_s is not None and cfg.presolve:
            # the presolve's time counts against the limit (the solver keeps at least 1 s)
            run_cfg = replace(cfg, time_limit_s=max(1.0, cfg.time_limit_s - spent))
        status, picked = model.run(run_cfg, warm=warm)
        if status == "time_limit" and picked is None and warm is not None:
            picked = warm  # the solver found nothing better in time: keep the incumbent
        info["closed_by"] = cfg.solver
        return Outcome(status, picked, info, model.n_vars, model.n_cons)


def _warm_start(kept: list[list[GOpt]], inc: list[GOpt] | None, start: list[GOpt] | None,
                limits: dict[str, float]) -> list[GOpt] | None:
    """``start`` when it fits ``limits``, beats ``inc`` and is made of kept options; else
    ``inc``."""
    if start is None or not all(within(math.fsum(o.costs[r] for o in start), lim)
                                for r, lim in limits.items()):
        return inc
    if inc is not None and not math.fsum(o.omega for o in start) < \
            math.fsum(o.omega for o in inc):
        return inc
    if not all(any(o is s for o in g) for g, s in zip(kept, start, strict=True)):
        return inc
    return start


def solve(problem: Problem, cfg: SolveConfig | None = None, *,
          params: SearchParams = PARAMS) -> Solution:
    """Choose one option per layer minimising total Omega under every limit of ``problem``.

    Infeasibility is a result (``status="infeasible"`` with a ``diagnosis``), not an exception.
    Raises BadProblemError only for an unusable configuration (e.g. HiGHS asked for but
    highspy missing). ``params``: the search's tuning (tests change it; see solver.params).
    """
    cfg = cfg or SolveConfig()
    t0 = time.perf_counter()
    groups = groups_of(problem)
    limits = {r: problem.limits.get(r) for r in problem.limits.active()}
    out = Ladder(groups, list(limits), cfg, params).settle(limits, t0=t0)
    return _solution(problem, groups, cfg, out, t0)


def _solution(problem: Problem, groups: list[Group], cfg: SolveConfig, out: Outcome,
              t0: float) -> Solution:
    limits = problem.limits.to_dict()
    diagnosis = None
    if out.picked is None:
        choices: dict[str, int] = {}
        objective = None
        totals: dict[str, float | None] = {r: None for r in RESOURCES}
        binding: list[str] = []
        if out.status == "infeasible":
            diagnosis = diagnose(problem, cfg, groups)
    else:
        choices = choices_of(problem, groups, out.picked)
        objective = objective_of(problem, choices)
        totals = totals_of(problem, choices)
        binding = binding_of(problem, totals)
        over = [r for r in problem.limits.active() if not within(totals[r], limits[r])]
        if over:  # a solver accepted a point within its own (looser) feasibility tolerance
            log.warning("solution exceeds %s by more than %g relative", over, FEAS_RTOL)
    return Solution(
        status=out.status,
        objective=objective,
        choices=choices,
        totals=totals,
        limits=limits,
        binding=binding,
        solver={
            "name": cfg.solver,
            "seconds": time.perf_counter() - t0,
            "variables": out.variables,
            "constraints": out.constraints,
            **out.info,
        },
        diagnosis=diagnosis,
    )
