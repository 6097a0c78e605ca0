"""The group model: tied layers merged into groups whose options are the shared tags (joint
costs and Omega are the members' sums), and the bookkeeping from picked group options back to
per-layer choices, totals and binding limits."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .problem import FEAS_RTOL, RESOURCES, Problem


@dataclass(slots=True)
class GOpt:
    """One option of a group: the members' options of one tag, with joint Omega and costs."""

    tag: str
    picks: tuple[int, ...]  # option index in each member layer
    omega: float
    costs: dict[str, float | None]

    def value(self, key: str) -> float:
        return self.omega if key == "omega" else self.costs[key]  # type: ignore[return-value]


@dataclass
class Group:
    """Tied layers (indices into the problem's layers) and their joint options."""

    members: list[int]  # layer indices
    options: list[GOpt] = field(default_factory=list)


def groups_of(problem: Problem) -> list[Group]:
    """The problem's tie groups (a lone layer is a group of one), in the problem's order."""
    index = {la.name: i for i, la in enumerate(problem.layers)}
    out = []
    for names in problem.tie_groups():
        members = [index[n] for n in names]
        first = problem.layers[members[0]]
        g = Group(members)
        if len(members) == 1:  # the common case: no sums needed
            g.options = [
                GOpt(o.tag, (k,), o.omega, {"size_bytes": o.size_bytes, "bops": o.bops,
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
            g.options.append(GOpt(opt.tag, picks, math.fsum(o.omega for o in chosen), costs))
        out.append(g)
    return out


def prune_options(opts: list[GOpt], key: str, resources: list[str]) -> list[GOpt]:
    """Drop options dominated in ``key`` and every resource in ``resources`` (lossless)."""
    order = sorted(
        range(len(opts)),
        key=lambda k: (opts[k].value(key), *(opts[k].costs[r] for r in resources), k),
    )
    kept: list[GOpt] = []
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


def sort_options(opts: list[GOpt], key: str, resources: list[str]) -> list[GOpt]:
    """The options by ``key``, then by the costs of ``resources`` (stable)."""
    return sorted(opts, key=lambda o: (o.value(key), *(o.costs[r] for r in resources)))


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


def choices_of(problem: Problem, groups: list[Group], picked: list[GOpt]) -> dict[str, int]:
    """Per layer (in the problem's order) the index of its option in the picked group options."""
    choices: dict[str, int] = {}
    for g, o in zip(groups, picked, strict=True):
        for m, p in zip(g.members, o.picks, strict=True):
            choices[problem.layers[m].name] = p
    return {la.name: choices[la.name] for la in problem.layers}
