"""The MILP hand-off: what the in-process search does not close goes to CBC or HiGHS through
PuLP (imported on first use: most problems never get here).

Limit rows are scaled to O(1) (each by the resource's largest reachable total), which keeps
the solvers' absolute tolerances meaningful for byte counts around 1e7 and BOPs around 1e11;
the objective is scaled so its largest coefficient is OBJ_MAX, and CBC's cutoff increment is
set to ~0 so that it keeps every strictly better incumbent. Exact (gap 0) solves of random
multi-limit instances with many near-equivalent options can take CBC seconds or more; the time
limit then returns ``status="time_limit"`` with the best assignment found.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import TYPE_CHECKING

from .config import SolveConfig
from .errors import BadProblemError
from .groups import GOpt, Group
from .highs import load_highspy
from .problem import FEAS_RTOL, within

if TYPE_CHECKING:
    import pulp

log = logging.getLogger(__name__)

# The objective is scaled so its largest coefficient is this: solvers prune with absolute
# tolerances around 1e-6, which lose optima when the scaled objective is O(1e-2) in total.
OBJ_MAX = 1e3


class Model:
    """A PuLP model over (pruned) groups minimising ``key`` under limits on ``resources``."""

    def __init__(
        self,
        groups: list[list[GOpt]],
        key: str,
        limits: dict[str, float],
        scale: dict[str, float],
    ) -> None:
        # PuLP 3.x warns about its 4.0 API on every variable; the 3.x API is what we pin.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import pulp  # lazily: ~0.1 s, and most solves never build a model

            self.groups = groups
            self.key = key
            self.resources = list(limits)
            self.scale = scale
            self.prob = pulp.LpProblem("bitplan", pulp.LpMinimize)
            self.vars: list[list[pulp.LpVariable] | None] = []
            self.const = {r: 0.0 for r in self.resources}
            top = max((abs(o.value(key)) for g in groups for o in g), default=1.0) or 1.0
            objscale = top / OBJ_MAX or 1.0  # (a subnormal top would underflow to 0)
            obj: dict[pulp.LpVariable, float] = {}
            rows: dict[str, dict[pulp.LpVariable, float]] = {r: {} for r in self.resources}
            n_cons = 0
            for gi, opts in enumerate(groups):
                if len(opts) == 1:
                    for r in self.resources:
                        self.const[r] += opts[0].costs[r]
                    self.vars.append(None)
                    continue
                vs = [pulp.LpVariable(f"x{gi}_{k}", cat=pulp.LpBinary) for k in range(len(opts))]
                self.vars.append(vs)
                self.prob.addConstraint(
                    pulp.LpConstraint(
                        pulp.LpAffineExpression({v: 1 for v in vs}), pulp.LpConstraintEQ, rhs=1
                    ),
                    name=f"one{gi}",
                )
                n_cons += 1
                for v, o in zip(vs, opts, strict=True):
                    obj[v] = o.value(key) / objscale
                    for r in self.resources:
                        c = o.costs[r]
                        if c:
                            rows[r][v] = c / scale[r]
            self.prob.setObjective(pulp.LpAffineExpression(obj))
            self.rows: dict[str, pulp.LpConstraint] = {}
            for r in self.resources:
                con = pulp.LpConstraint(pulp.LpAffineExpression(rows[r]), pulp.LpConstraintLE,
                                        rhs=0)
                self.prob.addConstraint(con, name=f"lim_{r}")
                self.rows[r] = self.prob.constraints[f"lim_{r}"]
                n_cons += 1
            self.n_vars = sum(len(v) for v in self.vars if v)
            self.n_cons = n_cons
            self.limits: dict[str, float] = {}
            for r, lim in limits.items():
                self.set_limit(r, lim)

    def restrict(self, kept: list[list[GOpt]]) -> None:
        """Allow only the options in ``kept`` (per group, a subset of the model's options);
        the others get an upper bound of 0. Used to reuse one model across Pareto budgets."""
        for vs, opts, keep in zip(self.vars, self.groups, kept, strict=True):
            if vs:
                ids = {id(o) for o in keep}
                for v, o in zip(vs, opts, strict=True):
                    v.upBound = 1 if id(o) in ids else 0

    def set_limit(self, resource: str, limit: float) -> None:
        self.limits[resource] = limit
        # LpConstraint stores "expr + constant <= 0"; constant = -rhs. The FEAS_RTOL cushion is
        # the tolerance within() grants, so a total exactly at the limit is never cut off by
        # rounding in the scaled row.
        rhs = limit + FEAS_RTOL * abs(limit) - self.const[resource]
        self.rows[resource].constant = -rhs / self.scale[resource]

    def run(self, cfg: SolveConfig, warm: list[GOpt] | None = None) -> tuple[str, list | None]:
        """Solve; returns (status, picked options per group or None)."""
        import pulp

        if self.n_vars == 0:  # every group fixed: only the limits can still fail
            ok = all(within(self.const[r], lim) for r, lim in self.limits.items())
            return ("optimal", [g[0] for g in self.groups]) if ok else ("infeasible", None)
        if warm is not None:
            for vs, opts, w in zip(self.vars, self.groups, warm, strict=True):
                if vs:
                    for v, o in zip(vs, opts, strict=True):
                        v.setInitialValue(1 if o is w else 0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            self.prob.solve(solver_cmd(cfg, warm is not None))
        status = self.prob.status
        sol_status = getattr(self.prob, "sol_status", None)
        if status == pulp.LpStatusInfeasible:
            return "infeasible", None
        if status == pulp.LpStatusOptimal:
            picked = []
            for vs, opts in zip(self.vars, self.groups, strict=True):
                if not vs:
                    picked.append(opts[0])
                    continue
                vals = [v.varValue or 0.0 for v in vs]
                picked.append(opts[max(range(len(vals)), key=vals.__getitem__)])
            if sol_status == pulp.LpSolutionIntegerFeasible:
                return "time_limit", picked
            return "optimal", picked
        if status == pulp.LpStatusNotSolved:
            return "time_limit", None
        # Undefined / unbounded cannot happen for a bounded 0-1 model unless the solver gave up.
        log.warning("solver returned status %s; reporting as time_limit", status)
        return "time_limit", None


def solver_cmd(cfg: SolveConfig, warm: bool) -> pulp.LpSolver:
    """The PuLP solver command for ``cfg`` (exact tolerances; ``warm``: start from the
    variables' initial values)."""
    import pulp

    if cfg.solver == "highs":
        # load_highspy spends HiGHS's one-off banner quietly (PuLP's msg=False cannot)
        if load_highspy() is None or not pulp.HiGHS().available():
            raise BadProblemError(
                "solver 'highs' needs the highspy package: pip install highspy "
                "(or install bitplan[highs]), or use --solver cbc"
            )
        return pulp.HiGHS(
            msg=False, timeLimit=cfg.time_limit_s, gapRel=cfg.gap_rel, gapAbs=0.0,
            threads=cfg.threads, random_seed=0,
            # The default MIP tolerance (1e-6) accepted a point ~1e-6 over a limit.
            mip_feasibility_tolerance=1e-9, primal_feasibility_tolerance=1e-9,
        )
    return pulp.PULP_CBC_CMD(
        msg=False, timeLimit=cfg.time_limit_s, gapRel=cfg.gap_rel, gapAbs=0.0,
        threads=cfg.threads, warmStart=warm,
        # CBC only accepts incumbents better by its cutoff increment (default 1e-4 absolute),
        # which silently loses optima on a small objective; ask for any strict improvement.
        # Its default integrality / primal tolerances (1e-6 / 1e-7) let it stop ~3e-6 (relative)
        # above the optimum on a 1000-layer instance with near-ties; 1e-9 closes that (limit
        # rows carry a FEAS_RTOL cushion so that optima exactly at a limit stay feasible).
        options=["increment 1e-12", "integerT 1e-9", "primalT 1e-9"],
    )


def scales(groups: list[Group], resources: list[str]) -> dict[str, float]:
    """Each limit row's scale: the resource's largest reachable total (1 when that is 0)."""
    out = {}
    for r in resources:
        top = math.fsum(max(o.costs[r] for o in g.options) for g in groups)
        out[r] = top if top > 0 else 1.0
    return out
