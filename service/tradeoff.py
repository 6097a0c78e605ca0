"""A job's trade-off curves: the Pareto front of predicted Omega against each limited resource,
the chosen plan marked, and measured quality at a few points along each front.

``fronts(problem, points)`` sweeps every resource the job limits (size, BOPS, latency) from its
smallest reachable total to its largest (all options at their most precise, all-INT8 when 8 is
the widest width offered), the job's other limits held. A front does not depend on the limit of
the resource it sweeps, so with a ``cache`` a re-plan that changes only that limit takes the
parent's front instead of sweeping again. ``pick(front, k)``
chooses up to ``k`` feasible points spread along a front for the pipeline to quantize and
evaluate; ``document(...)`` is ``pareto.json`` (format ``bitplan-pareto/1``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any

from solver import ParetoPoint, Problem, Solution, SolveConfig, pareto
from solver.params import PARAMS
from solver.problem import RESOURCES

from .cache import StageCache, stage_key

VERSION = 1
FORMAT = "bitplan-pareto/1"
FRONT_FORMAT = 1  # the cached sweep's layout (a list of ParetoPoint.to_dict())
POINTS = 20  # points per front: a smooth curve at ~1-30 ms per solve on 50-1000 layers
EVALUATED = 5  # points per front the job quantizes and evaluates (each costs a quantize pass)
_METRICS = ("quant_accuracy", "perplexity_quant", "cosine_mean", "top1_agreement", "kl_mean")


def limited(problem: Problem) -> list[str]:
    """The resources the job limits, in the solver's order."""
    return [r for r in RESOURCES if problem.limits.get(r) is not None]


def fronts(problem: Problem, points: int = POINTS, cfg: SolveConfig | None = None,
           cache: StageCache | None = None) -> dict[str, list[ParetoPoint]]:
    """One front per limited resource (``{}`` when the job limits nothing sweepable), each
    taken from ``cache`` when the same sweep was made before."""
    cfg = cfg or SolveConfig()
    out = {}
    for r in limited(problem):
        if all(o.cost(r) is not None for la in problem.layers for o in la.options):
            key = front_key(problem, r, points, cfg)
            hit = cache.get("fronts", key) if cache is not None else None
            if hit is not None:
                out[r] = [ParetoPoint(**p) for p in json.loads(hit)]
                continue
            out[r] = pareto(problem, r, points, cfg)
            if cache is not None:
                cache.put("fronts", key, json.dumps([p.to_dict() for p in out[r]]))
    return out


def front_key(problem: Problem, resource: str, points: int, cfg: SolveConfig) -> str:
    """The cache key of one sweep: the problem without the swept resource's limit (the sweep
    replaces it by its budgets), the resource, the point count and the solver's settings."""
    doc = problem.to_dict()
    doc.pop("source", None)  # a name, not part of the problem
    doc["limits"] = {**doc.get("limits", {}), resource: None}
    return stage_key("fronts", {}, {
        "format": FRONT_FORMAT, "problem": doc, "resource": resource, "points": points,
        "config": dataclasses.asdict(cfg), "params": dataclasses.asdict(PARAMS)})


def pick(front: Sequence[ParetoPoint], k: int = EVALUATED) -> list[int]:
    """Indices of up to ``k`` feasible points spread evenly along ``front`` (both ends kept),
    distinct choices only (neighbouring budgets often settle on the same plan)."""
    feasible = [i for i, p in enumerate(front) if p.choices]
    if k <= 0:
        return []
    if len(feasible) <= k:
        candidates = feasible
    elif k == 1:
        candidates = [feasible[-1]]  # the most precise end: what the budget buys at most
    else:
        step = (len(feasible) - 1) / (k - 1)
        candidates = sorted({feasible[round(j * step)] for j in range(k)})
    seen, out = set(), []
    for i in candidates:
        key = tuple(sorted(front[i].choices.items()))
        if key not in seen:
            seen.add(key)
            out.append(i)
    return out


def as_solution(problem: Problem, point: ParetoPoint, resource: str) -> Solution:
    """A front point as a solver Solution (for ``make_plan``), its budget as the limit."""
    limits = {r: problem.limits.get(r) for r in RESOURCES}
    limits[resource] = point.budget
    return Solution(status=point.status, objective=point.objective, choices=dict(point.choices),
                    totals=dict(point.totals), limits=limits, binding=[],
                    solver={"name": "pareto", "budget": point.budget})


def primary_metric(metrics: Mapping[str, Any] | None) -> tuple[str, float] | None:
    """The quality figure a curve shows: accuracy with labels, else perplexity / cosine for
    language and embedding models, else agreement with FP32."""
    for key in _METRICS:
        value = (metrics or {}).get(key)
        if isinstance(value, int | float):
            return key, float(value)
    return None


def document(problem: Problem, solution: Solution, swept: Mapping[str, list[ParetoPoint]],
             measured: Mapping[tuple[str, int], Mapping[str, Any]]) -> dict[str, Any]:
    """``pareto.json``: per resource the points (budget, status, Omega, totals, how many
    layers take each option tag, and the metrics where measured), the job's limit, and the
    chosen plan (the job's own solution) with its metrics."""
    out: dict[str, Any] = {"version": VERSION, "format": FORMAT, "fronts": {}}
    tags = {la.name: [o.tag for o in la.options] for la in problem.layers}
    for r, points in swept.items():
        rows = []
        for i, p in enumerate(points):
            mix: dict[str, int] = {}
            for name, idx in p.choices.items():
                mix[tags[name][idx]] = mix.get(tags[name][idx], 0) + 1
            rows.append({"budget": p.budget, "status": p.status, "objective": p.objective,
                         "totals": dict(p.totals), "options": mix,
                         "metrics": dict(measured[(r, i)]) if (r, i) in measured else None})
        out["fronts"][r] = {
            "limit": problem.limits.get(r),
            "points": rows,
            "chosen": {"objective": solution.objective, "totals": dict(solution.totals),
                       "metrics": dict(measured.get(("chosen", 0), {})) or None},
        }
    return out


def load(obj: Any) -> dict[str, Any]:
    """Validate a ``pareto.json`` document (version and shape); returns it."""
    if not isinstance(obj, dict) or obj.get("format") != FORMAT or obj.get("version") != VERSION:
        raise ValueError(f"not a {FORMAT} document")
    for r, front in obj.get("fronts", {}).items():
        if r not in RESOURCES or not isinstance(front.get("points"), list):
            raise ValueError(f"front {r!r} is malformed")
    return obj
