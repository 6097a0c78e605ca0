"""Why a problem is infeasible: the smallest reachable total of each limited resource alone
and the sets of limits that conflict, with a message saying what to loosen."""

from __future__ import annotations

import itertools
import math
from typing import Any

from .config import SolveConfig
from .groups import Group, groups_of, prune_options
from .milp import Model, scales
from .problem import Problem, within


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
    groups = groups_of(problem)
    return _min_reachable(groups, resource, under or {}, cfg or SolveConfig())


def _min_reachable(
    groups: list[Group], resource: str, under: dict[str, float], cfg: SolveConfig
) -> float | None:
    if not under:
        return math.fsum(min(o.costs[resource] for o in g.options) for g in groups)
    res = list(under)
    opts = [prune_options(g.options, resource, res) for g in groups]
    mins = {r: math.fsum(min(o.costs[r] for o in g) for g in opts) for r in res}
    if any(not within(mins[r], under[r]) for r in res):
        return None
    best = [g[0] for g in opts]
    if all(within(math.fsum(o.costs[r] for o in best), under[r]) for r in res):
        return math.fsum(o.costs[resource] for o in best)
    model = Model(opts, resource, under, scales(groups, res))
    status, picked = model.run(cfg)
    if picked is None:
        return None
    return math.fsum(o.costs[resource] for o in picked)


def diagnose(
    problem: Problem, cfg: SolveConfig | None = None, groups: list[Group] | None = None
) -> dict[str, Any]:
    """Why the limits cannot all hold: per limit the smallest reachable value of that resource
    alone (respecting ties and pins), whether the limit can be met alone, the sets of limits
    that conflict when each is reachable alone but not together, and an actionable message."""
    cfg = cfg or SolveConfig()
    groups = groups if groups is not None else groups_of(problem)
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
