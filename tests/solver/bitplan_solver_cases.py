"""Solver test helpers (imported by name): random small problems (hypothesis), an exhaustive
reference, a 30-layer instance, the LP relaxation by CBC and the search's arrays and parameters."""
from __future__ import annotations

import dataclasses
import itertools
import math
import warnings

import numpy as np
import pulp
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from solver.arrays import Arrays, prune_dominated
from solver.groups import groups_of
from solver.params import PARAMS, SearchParams
from solver.problem import RESOURCES, LayerOptions, Limits, Option, Problem, within

# hypothesis settings of the solver's property tests (a solve can take longer than the default
# deadline on a shared machine)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TAGS = ("w2a8", "w4a8", "w8a8", "w4a4")


@st.composite
def problems(draw, max_layers: int = 6, max_options: int = 4, limits: bool = True) -> Problem:
    """Random problems small enough to enumerate: integer-valued costs so that feasibility
    never hinges on float rounding; random ties (tied layers share their tag set)."""
    n = draw(st.integers(1, max_layers))
    names = [f"l{i}" for i in range(n)]
    ties = []
    if n >= 2:
        pairs = draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)),
                              max_size=3))
        ties = [(names[a], names[b]) for a, b in pairs if a != b]
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            i = parent[i]
        return i

    for a, b in ties:
        ra, rb = find(int(a[1:])), find(int(b[1:]))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    tagsets = {}
    for i in range(n):
        r = find(i)
        if r not in tagsets:
            k = draw(st.integers(1, max_options))
            tagsets[r] = list(TAGS[:k])
    cost = st.integers(0, 20).map(float)
    layers = []
    for i in range(n):
        opts = []
        for t in tagsets[find(i)]:
            opts.append(Option(w_bits=int(t[1]), a_bits=int(t[3]),
                               omega=float(draw(st.integers(-3, 50))),
                               size_bytes=draw(cost), bops=draw(cost),
                               latency_ms=draw(cost), tag=t))
        layers.append(LayerOptions(names[i], tuple(opts)))
    lim = {}
    if limits:
        for r in RESOURCES:
            lim[r] = draw(st.none() | st.integers(0, 20 * n).map(float))
    return Problem(tuple(layers), Limits(**lim), tuple(ties))


def brute_force(problem: Problem, limits: Limits | None = None) -> tuple[float | None, list]:
    """(best objective, all optimal assignments) by enumeration; (None, []) if infeasible."""
    limits = limits or problem.limits
    index = {la.name: i for i, la in enumerate(problem.layers)}
    best, argbest = None, []
    for combo in itertools.product(*(range(len(la.options)) for la in problem.layers)):
        opts = [la.options[k] for la, k in zip(problem.layers, combo, strict=True)]
        if any(opts[index[a]].tag != opts[index[b]].tag for a, b in problem.ties):
            continue
        ok = True
        for r in limits.active():
            if not within(math.fsum(o.cost(r) for o in opts), limits.get(r)):
                ok = False
                break
        if not ok:
            continue
        obj = math.fsum(o.omega for o in opts)
        if best is None or obj < best - 1e-12:
            best, argbest = obj, [combo]
        elif abs(obj - best) <= 1e-12:
            argbest.append(combo)
    return best, argbest


def search_params(**values: object) -> SearchParams:
    """The search's parameters with ``values`` changed."""
    return dataclasses.replace(PARAMS, **values)


def arrays_of(problem: Problem) -> tuple[Arrays, dict[str, float]]:
    res = problem.limits.active()
    limits = {r: problem.limits.get(r) for r in res}
    # (prune_dominated sorts each group's options itself)
    return prune_dominated([g.options for g in groups_of(problem)], "omega", res), limits


@st.composite
def float_problems(draw) -> Problem:
    """Float costs spanning magnitudes, up to three limits, no ties."""
    n = draw(st.integers(1, 6))
    layers = []
    for i in range(n):
        k = draw(st.integers(1, 4))
        scale = 10.0 ** draw(st.integers(0, 6))
        opts = []
        for j in range(k):
            c = [draw(st.floats(0, 1, allow_nan=False)) * scale for _ in range(3)]
            opts.append(Option(2 + j, 8, draw(st.floats(-1, 1, allow_nan=False)),
                               *c, f"t{j}"))
        layers.append(LayerOptions(f"l{i}", tuple(opts)))
    probe = Problem(tuple(layers))
    lim = {}
    for r in ("size_bytes", "bops", "latency_ms"):
        if draw(st.booleans()):
            lo = sum(min(o.cost(r) for o in la.options) for la in probe.layers)
            hi = sum(max(o.cost(r) for o in la.options) for la in probe.layers)
            lim[r] = lo + draw(st.floats(-0.1, 1.0)) * (hi - lo)
            lim[r] = max(lim[r], 0.0)
    return Problem(tuple(layers), Limits(**lim))


def assert_closed_in_process(sol, best: float | None) -> None:
    """``sol`` is brute force's answer (``best``; None = infeasible), found without a MILP."""
    if best is None:
        assert sol.status == "infeasible"
    else:
        assert sol.status == "optimal"
        assert sol.solver["closed_by"] in ("shortcut", "branch-and-bound")
        assert sol.objective == pytest.approx(best, rel=1e-9, abs=1e-9)


def mid_instance(fractions: dict[str, float], n: int = 30) -> Problem:
    """n layers x 12 options; each limit at a fraction between its smallest and largest
    reachable total."""
    rng = np.random.default_rng(7)
    layers = []
    for i in range(n):
        params = float(rng.choice([1e3, 1e4, 1e5]))
        trace = float(np.exp(rng.normal(0, 1.5)))
        opts = []
        for w in (2, 3, 4, 5, 6, 8):
            for a in (4, 8):
                omega = trace * params * (4.0 ** -w + 0.3 * 4.0 ** -a) * rng.uniform(0.8, 1.2)
                latency = params * (w + a) * rng.uniform(0.5, 1.5) * 1e-6
                opts.append(Option(w, a, omega, params * w / 8, params * w * a, latency,
                                   f"w{w}a{a}"))
        layers.append(LayerOptions(f"l{i}", tuple(opts)))
    free = Problem(tuple(layers))
    lim = {}
    for r, f in fractions.items():
        lo = sum(min(o.cost(r) for o in la.options) for la in free.layers)
        hi = sum(max(o.cost(r) for o in la.options) for la in free.layers)
        lim[r] = lo + f * (hi - lo)
    return Problem(tuple(layers), Limits(**lim))


def lp_relaxation(problem: Problem) -> float:
    """The LP relaxation's optimum, by CBC on the continuous model (an independent check)."""
    lp = pulp.LpProblem("relaxed", pulp.LpMinimize)
    x = {(i, k): lp.add_variable(f"x_{i}_{k}", 0, 1)
         for i, la in enumerate(problem.layers) for k in range(len(la.options))}
    lp += pulp.lpSum(problem.layers[i].options[k].omega * v for (i, k), v in x.items())
    for i, la in enumerate(problem.layers):
        lp += pulp.lpSum(x[i, k] for k in range(len(la.options))) == 1
    for r in problem.limits.active():
        lp += pulp.lpSum(problem.layers[i].options[k].cost(r) * v
                         for (i, k), v in x.items()) <= problem.limits.get(r)
    with warnings.catch_warnings():  # PuLP 3.x: the bundled CBC's deprecation notice
        warnings.simplefilter("ignore", DeprecationWarning)
        lp.solve(pulp.PULP_CBC_CMD(msg=False))
    assert lp.status == pulp.LpStatusOptimal
    return pulp.value(lp.objective)


def layer_of(name: str, rows: list[tuple]) -> LayerOptions:
    """A layer whose options are (bits, omega, size, bops, latency) rows (w = a bits)."""
    return LayerOptions(name, tuple(
        Option(w, w, om, s, b, lat, f"w{w}a{w}") for w, om, s, b, lat in rows))


def two_layer_problem(limits: Limits) -> Problem:
    """Two layers with a 4-bit and an 8-bit option under ``limits``."""
    rows = [(4, 1.0, 0.5e6, 10.0, 1.0), (8, 0.1, 1.0e6, 40.0, 2.0)]
    return Problem((layer_of("a", rows), layer_of("b", rows)), limits)
