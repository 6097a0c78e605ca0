"""Solver test helpers (imported by name): random small problems (hypothesis) and an exhaustive
reference."""
from __future__ import annotations

import itertools
import math

from hypothesis import strategies as st

from solver.problem import RESOURCES, LayerOptions, Limits, Option, Problem, within

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
