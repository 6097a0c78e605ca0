"""The bit-allocation ILP: one option per layer, minimum total Omega under every given limit.

Formulation (DESIGN.md, "ILP"): binary x[g, k] per layer group g and option k, sum_k x[g, k] = 1,
minimise sum Omega x subject to sum cost_r x <= limit_r for each limited resource r.

Exact reductions applied before the solver runs (each keeps the optimum value unchanged):

- tied layers are merged into one group whose options are the shared tags (joint costs and
  Omega are the members' sums), so a tie costs no constraint and no variable;
- (opt-in, ``SolveConfig.prune``) an option is dropped when another option of the same
  group is no worse in Omega and in every *limited* resource (costs nobody limits cannot
  make a choice infeasible); among exact duplicates the first in (Omega, costs, tag order) survives;
- groups left with one option become constants;
- if the per-group minimum-Omega choice fits every limit it is optimal and no solver runs;
- if some limit is below the sum of its per-group minima the problem is infeasible, also
  without a solver;
- the exact in-process presolve (``SolveConfig.presolve``, on by default; solver.bnb): lossless
  dominance pruning over the limited resources, a Lagrangian bound, a repaired and pair-move
  polished incumbent, reduced-cost fixing, then a breadth-first branch-and-bound with LP
  bounds of single-constraint knapsacks (per-group convex hulls), dominance between partial
  assignments and a beam search for the incumbent. When the search finishes within
  ``SolveConfig.bnb_nodes`` it is the answer (``solver["closed_by"] == "branch-and-bound"``) and
  no MILP solver runs, and no PuLP model is built; otherwise the reduced groups go to the MILP
  solver, warm-started with the incumbent (``closed_by`` is then the solver's name);
- with the presolve off, Lagrangian reduced-cost fixing (solver.lagrange): with a feasible
  incumbent of value UB and any multipliers lam >= 0, options whose reduced cost exceeds
  UB - L(lam) cannot be in any optimum and are dropped; the incumbent warm-starts the solver,
  and when one option per group is left it is optimal without one.

``solver`` in the Solution also carries ``closed_by`` ("shortcut", "branch-and-bound",
"lagrange", "cbc" or "highs"), ``nodes`` (the branch-and-bound's work, in nodes) and, when a MILP
solver ran, ``presolve_seconds`` (time spent before it started).

Limit rows are scaled to O(1) (each by the resource's largest reachable total), which keeps
the solvers' absolute tolerances meaningful for byte counts around 1e7 and BOPs around 1e11;
the objective is scaled so its largest coefficient is OBJ_MAX (see there), and CBC's cutoff
increment is set to ~0 so that it keeps every strictly better incumbent. Reported objective
and totals are always recomputed from the chosen options in layer order, never read back from
the solver.

Exact (gap 0) solves of random multi-limit instances with many near-equivalent options can take
CBC seconds or more (bench/solver.py); the time limit then returns ``status="time_limit"`` with
the best assignment found, and HiGHS (``solver="highs"``) is often faster there.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import pulp

from . import bnb, lagrange
from .errors import BadProblemError
from .highs import load_highspy
from .problem import FEAS_RTOL, RESOURCES, Problem, within

log = logging.getLogger(__name__)

VERSION = 1
SOLVERS = ("cbc", "highs")
STATUSES = ("optimal", "infeasible", "time_limit")
# The objective is scaled so its largest coefficient is this: solvers prune with absolute
# tolerances around 1e-6, which lose optima when the scaled objective is O(1e-2) in total.
OBJ_MAX = 1e3


@dataclass(frozen=True)
class SolveConfig:
    """How to solve. ``solver``: ``"cbc"`` (bundled with PuLP) or ``"highs"`` (needs highspy);
    ``time_limit_s``: wall-clock limit per solver call (None = none); ``gap_rel``: relative
    optimality gap at which the solver may stop (0 = exact); ``prune``: drop dominated options
    before the solver (exact, but measured slower with CBC, hence off); ``shortcut``: skip the
    solver when the minimum-Omega choice fits or a limit is unreachable (exact); ``fix``:
    Lagrangian reduced-cost fixing with a heuristic incumbent (exact, solver.lagrange)."""

    solver: str = "cbc"
    time_limit_s: float | None = 60.0
    gap_rel: float = 0.0
    threads: int = 1
    # Measured (bench/solver.py): handing CBC the dominated options too is usually faster than
    # pruning them, although pruning is exact; so pruning is opt-in.
    prune: bool = False
    shortcut: bool = True
    fix: bool = True
    # The exact in-process presolve and branch-and-bound (solver.bnb); the MILP solver only
    # sees what it does not close within ``bnb_nodes`` search nodes (children evaluated: a budget
    # of work rather than of time keeps results deterministic; 0 = always hand over after the
    # presolve). 8M children is ~1 s of search on 1000x12 (0.1-0.15 us a child); a search
    # projected to need far more gives up early (bnb.PROJECTION_MAX). Measured: 8M takes
    # 1000x12 size+bops+latency (seed 0) in process in 1.36 s, where 2M handed it to CBC
    # (1.66 s in all); the other bench instances are unchanged.
    presolve: bool = True
    bnb_nodes: int = 8_000_000
    version: int = VERSION

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise BadProblemError(f"unknown solver {self.solver!r}; use one of {list(SOLVERS)}")
        if self.time_limit_s is not None and not (
            isinstance(self.time_limit_s, int | float) and self.time_limit_s > 0
        ):
            raise BadProblemError(f"time_limit_s must be > 0 or null, got {self.time_limit_s!r}")
        if not (isinstance(self.gap_rel, int | float) and 0 <= self.gap_rel < 1):
            raise BadProblemError(f"gap_rel must be in [0, 1), got {self.gap_rel!r}")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1:
            raise BadProblemError(f"threads must be an int >= 1, got {self.threads!r}")
        if isinstance(self.bnb_nodes, bool) or not isinstance(self.bnb_nodes, int) \
                or self.bnb_nodes < 0:
            raise BadProblemError(f"bnb_nodes must be an int >= 0, got {self.bnb_nodes!r}")
        if self.version != VERSION:
            raise BadProblemError(f"SolveConfig version {self.version!r} is not supported")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> SolveConfig:
        unknown = sorted(set(obj) - set(cls.__dataclass_fields__))
        if unknown:
            raise BadProblemError(f"SolveConfig has unknown keys {unknown}")
        return cls(**obj)


@dataclass
class Solution:
    """The answer (``bitplan solve`` output, ``version: 1``). ``choices`` maps each layer to the
    index of its chosen option in the problem; empty when no assignment was found
    (infeasible, or a time limit hit before the first feasible one)."""

    status: str
    objective: float | None
    choices: dict[str, int]
    totals: dict[str, float | None]
    limits: dict[str, float | None]
    binding: list[str]
    solver: dict[str, Any]
    diagnosis: dict[str, Any] | None = None
    version: int = VERSION

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise BadProblemError(f"solution status {self.status!r} is not one of {STATUSES}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "status": self.status,
            "objective": self.objective,
            "choices": dict(self.choices),
            "totals": dict(self.totals),
            "limits": dict(self.limits),
            "binding": list(self.binding),
            "solver": dict(self.solver),
            "diagnosis": self.diagnosis,
        }

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, obj: Any) -> Solution:
        keys = {"version", "status", "objective", "choices", "totals", "limits", "binding",
                "solver", "diagnosis"}
        if not isinstance(obj, dict):
            raise BadProblemError("a solution must be a JSON object")
        # `bitplan solve --pareto` adds its sweep beside the solution; it is not part of it.
        obj = {k: v for k, v in obj.items() if k != "pareto"}
        if set(obj) != keys:
            raise BadProblemError(
                f"solution keys must be {sorted(keys)}; got {sorted(obj)}"
            )
        if obj["version"] != VERSION:
            raise BadProblemError(f"solution version {obj['version']!r} is not supported")
        return cls(
            status=obj["status"],
            objective=obj["objective"],
            choices={str(k): int(v) for k, v in obj["choices"].items()},
            totals=dict(obj["totals"]),
            limits=dict(obj["limits"]),
            binding=list(obj["binding"]),
            solver=dict(obj["solver"]),
            diagnosis=obj["diagnosis"],
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Solution:
        try:
            obj = json.loads(text)
        except (ValueError, TypeError) as exc:
            raise BadProblemError(f"solution is not valid JSON: {exc}") from exc
        return cls.from_dict(obj)


# ---------------------------------------------------------------------------------------------
# Groups: tied layers merged, options keyed by tag.


@dataclass(slots=True)
class _GOpt:
    tag: str
    picks: tuple[int, ...]  # option index in each member layer
    omega: float
    costs: dict[str, float | None]

    def value(self, key: str) -> float:
        return self.omega if key == "omega" else self.costs[key]  # type: ignore[return-value]


@dataclass
class _Group:
    members: list[int]  # layer indices
    options: list[_GOpt] = field(default_factory=list)


def _groups(problem: Problem) -> list[_Group]:
    index = {la.name: i for i, la in enumerate(problem.layers)}
    out = []
    for names in problem.tie_groups():
        members = [index[n] for n in names]
        first = problem.layers[members[0]]
        g = _Group(members)
        if len(members) == 1:  # the common case: no sums needed
            g.options = [
                _GOpt(o.tag, (k,), o.omega, {"size_bytes": o.size_bytes, "bops": o.bops,
                                              "latency_ms": o.latency_ms})
                for k, o in enumerate(first.options)
            ]
            out.append(g)
            continue
        tag_pos = [{o.tag: k for k, o in enumerate(problem.layers[m].options)} for m in members]
        for opt in first.options:
            picks = tuple(tp[opt.tag] for tp in tag_pos)
            chosen = [problem.layers[m].options[p] for m, p in zip(members, picks, strict=True)]
            costs: dict[str, float | None] = {}
            for r in RESOURCES:
                vals = [getattr(o, r) for o in chosen]
                costs[r] = None if any(v is None for v in vals) else math.fsum(vals)
            g.options.append(_GOpt(opt.tag, picks, math.fsum(o.omega for o in chosen), costs))
        out.append(g)
    return out


def _prune(opts: list[_GOpt], key: str, resources: list[str]) -> list[_GOpt]:
    """Drop options dominated in ``key`` and every resource in ``resources`` (lossless)."""
    order = sorted(
        range(len(opts)),
        key=lambda k: (opts[k].value(key), *(opts[k].costs[r] for r in resources), k),
    )
    kept: list[_GOpt] = []
    for k in order:
        o = opts[k]
        vals = [o.costs[r] for r in resources]
        dominated = False
        for q in kept:  # every kept q has q.key <= o.key (sorted)
            if all(q.costs[r] <= v for r, v in zip(resources, vals, strict=True)):
                dominated = True
                break
        if not dominated:
            kept.append(o)
    return kept


def _sorted_opts(opts: list[_GOpt], key: str, resources: list[str]) -> list[_GOpt]:
    return sorted(opts, key=lambda o: (o.value(key), *(o.costs[r] for r in resources)))


# ---------------------------------------------------------------------------------------------
# Totals and bookkeeping on full choices.


def totals_of(problem: Problem, choices: dict[str, int]) -> dict[str, float | None]:
    """Sum of each resource over the chosen options (latency None if any option lacks it)."""
    out: dict[str, float | None] = {}
    for r in RESOURCES:
        vals = [getattr(la.options[choices[la.name]], r) for la in problem.layers]
        out[r] = None if any(v is None for v in vals) else math.fsum(vals)
    return out


def objective_of(problem: Problem, choices: dict[str, int]) -> float:
    return math.fsum(la.options[choices[la.name]].omega for la in problem.layers)


def binding_of(problem: Problem, totals: dict[str, float | None]) -> list[str]:
    """Limits with no slack: total >= limit up to :data:`FEAS_RTOL` relative."""
    out = []
    for r in problem.limits.active():
        lim = problem.limits.get(r)
        t = totals[r]
        if t is not None and t >= lim - FEAS_RTOL * max(abs(lim), 1e-300):
            out.append(r)
    return out


def _choices_from(problem: Problem, groups: list[_Group], picked: list[_GOpt]) -> dict[str, int]:
    choices: dict[str, int] = {}
    for g, o in zip(groups, picked, strict=True):
        for m, p in zip(g.members, o.picks, strict=True):
            choices[problem.layers[m].name] = p
    return {la.name: choices[la.name] for la in problem.layers}


# ---------------------------------------------------------------------------------------------
# The PuLP model: built once, limit right-hand sides changeable (Pareto sweeps reuse it).


class _Model:
    """A PuLP model over (pruned) groups minimising ``key`` under limits on ``resources``."""

    def __init__(
        self,
        groups: list[list[_GOpt]],
        key: str,
        limits: dict[str, float],
        scale: dict[str, float],
    ) -> None:
        # PuLP 3.x warns about its 4.0 API on every variable; the 3.x API is what we pin.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            self._build(groups, key, limits, scale)

    def _build(
        self,
        groups: list[list[_GOpt]],
        key: str,
        limits: dict[str, float],
        scale: dict[str, float],
    ) -> None:
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
            con = pulp.LpConstraint(pulp.LpAffineExpression(rows[r]), pulp.LpConstraintLE, rhs=0)
            self.prob.addConstraint(con, name=f"lim_{r}")
            self.rows[r] = self.prob.constraints[f"lim_{r}"]
            n_cons += 1
        self.n_vars = sum(len(v) for v in self.vars if v)
        self.n_cons = n_cons
        self.limits: dict[str, float] = {}
        for r, lim in limits.items():
            self.set_limit(r, lim)

    def restrict(self, kept: list[list[_GOpt]]) -> None:
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

    def run(self, cfg: SolveConfig, warm: list[_GOpt] | None = None) -> tuple[str, list | None]:
        """Solve; returns (status, picked options per group or None)."""
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
            self.prob.solve(_solver_cmd(cfg, warm is not None))
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


def _solver_cmd(cfg: SolveConfig, warm: bool) -> pulp.LpSolver:
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


def _scales(groups: list[_Group], resources: list[str]) -> dict[str, float]:
    out = {}
    for r in resources:
        top = math.fsum(max(o.costs[r] for o in g.options) for g in groups)
        out[r] = top if top > 0 else 1.0
    return out


# ---------------------------------------------------------------------------------------------
# Public entry point.


def solve(problem: Problem, cfg: SolveConfig | None = None) -> Solution:
    """Choose one option per layer minimising total Omega under every limit of ``problem``.

    Infeasibility is a result (``status="infeasible"`` with a ``diagnosis``), not an exception.
    Raises BadProblemError only for an unusable configuration (e.g. HiGHS asked for but
    highspy missing).
    """
    cfg = cfg or SolveConfig()
    t0 = time.perf_counter()
    groups = _groups(problem)
    limits = {r: problem.limits.get(r) for r in problem.limits.active()}
    resources = list(limits)
    arr = None
    if cfg.prune:
        opts = [_prune(g.options, "omega", resources) for g in groups]
    elif cfg.presolve:  # the presolve sorts and prunes (losslessly) in one vectorised pass
        arr = bnb.prune_dominated([g.options for g in groups], "omega", resources)
        opts = arr.groups
    else:
        opts = [_sorted_opts(g.options, "omega", resources) for g in groups]
    n_vars = n_cons = 0
    status: str
    picked: list[_GOpt] | None
    # closed_by: which engine settled the answer ("shortcut", "branch-and-bound", "lagrange",
    # or the MILP solver's name).
    extra: dict[str, Any] = {"closed_by": "shortcut"}

    if arr is not None:
        mins = {r: math.fsum(arr.cost[i].min(axis=1).tolist()) for i, r in enumerate(resources)}
    else:
        mins = {r: math.fsum(min(o.costs[r] for o in g) for g in opts) for r in resources}
    best = [g[0] for g in opts]  # minimum-Omega option of each group
    if any(not within(mins[r], limits[r]) for r in resources):
        status, picked = "infeasible", None
    elif cfg.shortcut and all(
        within(math.fsum(o.costs[r] for o in best), limits[r]) for r in resources
    ):
        status, picked = "optimal", best
    else:
        warm = None
        closed_by = None
        if cfg.presolve:
            if arr is None:
                arr = bnb.prune_dominated(opts, "omega", resources)
            # the time limit also caps the search (it then hands over, as on the node budget)
            res = bnb.solve_arrays(arr, limits, node_limit=cfg.bnb_nodes,
                                   time_limit_s=cfg.time_limit_s)
            extra["nodes"] = res.info.get("nodes", 0)
            if res.status != "open":
                status, picked = res.status, res.incumbent
                closed_by = res.info.get("closed_by", "branch-and-bound")
            else:
                opts, warm = res.groups, res.incumbent
        elif cfg.fix:
            opts, warm, _ = lagrange.fix(opts, limits)
            if warm is not None and all(len(g) == 1 for g in opts):
                status, picked = "optimal", warm  # the bound proves the incumbent optimal
                closed_by = "lagrange"
        if closed_by is not None:
            extra["closed_by"] = closed_by
        else:
            spent = time.perf_counter() - t0
            extra["presolve_seconds"] = spent
            model = _Model(opts, "omega", limits, _scales(groups, resources))
            n_vars, n_cons = model.n_vars, model.n_cons
            run_cfg = cfg
            if cfg.time_limit_s is not None and cfg.presolve:
                # the presolve's time counts against the limit (the solver keeps at least 1 s)
                run_cfg = replace(cfg, time_limit_s=max(1.0, cfg.time_limit_s - spent))
            status, picked = model.run(run_cfg, warm=warm)
            if status == "time_limit" and picked is None and warm is not None:
                picked = warm  # the solver found nothing better in time: keep the incumbent
            extra["closed_by"] = cfg.solver

    return _finish(problem, groups, cfg, status, picked, t0, n_vars, n_cons, extra)


def _finish(
    problem: Problem,
    groups: list[_Group],
    cfg: SolveConfig,
    status: str,
    picked: list[_GOpt] | None,
    t0: float,
    n_vars: int,
    n_cons: int,
    extra: dict[str, Any] | None = None,
) -> Solution:
    limits = problem.limits.to_dict()
    diagnosis = None
    if picked is None:
        choices: dict[str, int] = {}
        objective = None
        totals: dict[str, float | None] = {r: None for r in RESOURCES}
        binding: list[str] = []
        if status == "infeasible":
            diagnosis = diagnose(problem, cfg, groups)
    else:
        choices = _choices_from(problem, groups, picked)
        objective = objective_of(problem, choices)
        totals = totals_of(problem, choices)
        binding = binding_of(problem, totals)
        over = [r for r in problem.limits.active() if not within(totals[r], limits[r])]
        if over:  # a solver accepted a point within its own (looser) feasibility tolerance
            log.warning("solution exceeds %s by more than %g relative", over, FEAS_RTOL)
    return Solution(
        status=status,
        objective=objective,
        choices=choices,
        totals=totals,
        limits=limits,
        binding=binding,
        solver={
            "name": cfg.solver,
            "seconds": time.perf_counter() - t0,
            "variables": n_vars,
            "constraints": n_cons,
            **(extra or {}),
        },
        diagnosis=diagnosis,
    )


# ---------------------------------------------------------------------------------------------
# Infeasibility diagnosis.


def _fmt(resource: str, value: float) -> str:
    if resource == "size_bytes":
        return f"{value / 1e6:.4g} MB" if value >= 1e4 else f"{value:.6g} bytes"
    if resource == "bops":
        return f"{value / 1e9:.4g} GBOPs" if value >= 1e7 else f"{value:.6g} BOPs"
    return f"{value:.4g} ms"


_NAMES = {"size_bytes": "size", "bops": "BOPS", "latency_ms": "latency"}


def min_reachable(
    problem: Problem,
    resource: str,
    under: dict[str, float] | None = None,
    cfg: SolveConfig | None = None,
) -> float | None:
    """Smallest total of ``resource`` over all assignments (respecting ties and pins) that
    meet the limits in ``under``; None when none does. Without ``under`` it is the sum of
    per-group minima (no solver)."""
    groups = _groups(problem)
    return _min_reachable(groups, resource, under or {}, cfg or SolveConfig())


def _min_reachable(
    groups: list[_Group], resource: str, under: dict[str, float], cfg: SolveConfig
) -> float | None:
    if not under:
        return math.fsum(min(o.costs[resource] for o in g.options) for g in groups)
    res = list(under)
    opts = [_prune(g.options, resource, res) for g in groups]
    mins = {r: math.fsum(min(o.costs[r] for o in g) for g in opts) for r in res}
    if any(not within(mins[r], under[r]) for r in res):
        return None
    best = [g[0] for g in opts]
    if all(within(math.fsum(o.costs[r] for o in best), under[r]) for r in res):
        return math.fsum(o.costs[resource] for o in best)
    model = _Model(opts, resource, under, _scales(groups, res))
    status, picked = model.run(cfg)
    if picked is None:
        return None
    return math.fsum(o.costs[resource] for o in picked)


def diagnose(
    problem: Problem, cfg: SolveConfig | None = None, groups: list[_Group] | None = None
) -> dict[str, Any]:
    """Why the limits cannot all hold: per limit the smallest reachable value of that resource
    alone (respecting ties and pins), whether the limit can be met alone, the sets of limits
    that conflict when each is reachable alone but not together, and an actionable message."""
    cfg = cfg or SolveConfig()
    groups = groups if groups is not None else _groups(problem)
    active = problem.limits.active()
    per: dict[str, dict[str, Any]] = {}
    msgs: list[str] = []
    for r in active:
        lim = problem.limits.get(r)
        m = _min_reachable(groups, r, {}, cfg)
        ok = within(m, lim)
        per[r] = {"limit": lim, "min_reachable": m, "reachable_alone": ok}
        if not ok:
            msgs.append(
                f"{_NAMES[r]} limit {_fmt(r, lim)} is below the smallest reachable "
                f"{_fmt(r, m)} (all layers at their smallest option for {_NAMES[r]}); "
                f"raise it to at least {_fmt(r, m)}"
            )
    conflicts: list[dict[str, Any]] = []
    if not msgs and len(active) >= 2:
        for size in range(2, len(active) + 1):
            for subset in itertools.combinations(active, size):
                if any(set(c["limits"]) <= set(subset) for c in conflicts):
                    continue  # a smaller conflicting set already explains it
                target, others = subset[0], subset[1:]
                under = {r: problem.limits.get(r) for r in others}
                m = _min_reachable(groups, target, under, cfg)
                if m is None or not within(m, problem.limits.get(target)):
                    conflicts.append({
                        "limits": list(subset),
                        "resource": target,
                        "min_given_others": m,
                    })
                    cond = " and ".join(f"{_NAMES[r]} <= {_fmt(r, under[r])}" for r in others)
                    have = "no assignment" if m is None else f"the smallest {_NAMES[target]} is "
                    have += "" if m is None else _fmt(target, m)
                    msgs.append(
                        f"the limits on {', '.join(_NAMES[r] for r in subset)} are each "
                        f"reachable alone but not together: with {cond}, {have} "
                        f"(> {_NAMES[target]} limit {_fmt(target, problem.limits.get(target))}); "
                        "loosen one of them"
                    )
    if not msgs:
        msgs.append("no assignment meets every limit")
    return {"limits": per, "conflicts": conflicts, "message": "; ".join(msgs)}
