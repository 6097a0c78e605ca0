"""The search tree: planes and fronts bound every completion, the curves built depth by depth
equal the cached ones, a beam that drops nothing is the exact search, dominance drops only
dominated states."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from bitplan_solver_cases import (
    SETTINGS,
    arrays_of,
    mid_instance,
    problems,
    search_params,
)
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from solver import Problem
from solver.arrays import Arrays
from solver.bounds import plane_grid
from solver.search import Search, undominated


@SETTINGS
@given(problems(max_layers=6, max_options=4))
def test_a_beam_that_drops_nothing_is_the_exact_search(problem: Problem) -> None:
    """solve_arrays treats a beam run that never had to drop a child as the exact search."""
    if not problem.limits.active():
        return
    arr, limits = arrays_of(problem)
    R = len(arr.res)
    cap = np.array([limits[r] for r in arr.res])
    keep = [list(range(n)) for n in arr.sizes]
    search = Search(arr, keep, arr.cost, cap, np.zeros(R), np.zeros(R))
    assert search.run(math.inf, 10**7)[1]
    exact = list(search.completions())
    assert search.run(math.inf, 10**7, beam_width=10**6)[1]
    assert not search.truncated and list(search.completions()) == exact
    search.run(math.inf, 10**7, beam_width=1)
    assert search.truncated == (len(exact) > 1)


@SETTINGS
@given(st.integers(2, 5), st.integers(2, 3), st.integers(2, 3), st.integers(0, 2**31 - 1))
def test_planes_bound_every_completion(groups: int, options: int, limits: int,
                                       seed: int) -> None:
    """A plane's bound of a partial assignment is at most the value of each completion of it
    within the limits (brute force over the remaining positions, one group per position)."""
    rng = np.random.default_rng(seed)
    om = rng.integers(-3, 50, size=(groups, options)).astype(float)
    cost = rng.integers(0, 20, size=(limits, groups, options)).astype(float)
    cap = rng.integers(0, 20 * groups, size=limits).astype(float)
    arr = Arrays([[None] * options] * groups, "omega", [f"r{r}" for r in range(limits)],
                     om, cost, [options] * groups)
    lams = rng.exponential(size=(6, limits)) * rng.integers(0, 2, size=(6, limits))
    search = Search(arr, [list(range(options))] * groups, cost, cap, np.zeros(limits),
                    np.zeros(limits), planes=lams, params=search_params(merge_max=1))
    n = search.n
    assert n == groups
    checked = 0
    for d in range(n - 1):
        for prefix in itertools.product(range(options), repeat=d + 1):
            val = search.om_fixed + sum(search.om[q][k] for q, k in enumerate(prefix))
            use = sum(search.c[q][k] for q, k in enumerate(prefix))
            bound = val + float((use @ lams.T + search.plane_const[d + 1]).max())
            for rest in itertools.product(range(options), repeat=n - d - 1):
                total = use + sum(search.c[d + 1 + i][k] for i, k in enumerate(rest))
                if np.all(total <= search.room):
                    value = val + sum(search.om[d + 1 + i][k] for i, k in enumerate(rest))
                    assert bound <= value + 1e-9 * max(1.0, abs(value))
                    checked += 1
    assume(checked > 0)


def _suffix_optimum(search: Search, j: int, d: int, rest: float) -> float:
    """Brute force: the least value of relaxation j over the positions >= d whose weight along
    its direction fits ``rest`` (inf when none fits)."""
    best = math.inf
    for picks in itertools.product(*(range(len(search.om[q])) for q in range(d, search.n))):
        c = sum(search.c[q][k] for q, k in zip(range(d, search.n), picks, strict=True))
        if c @ search.D[j] <= rest:
            best = min(best, sum(search.om[q][k] for q, k in
                                 zip(range(d, search.n), picks, strict=True)) + c @ search.L[j])
    return best


@SETTINGS
@given(st.integers(2, 5), st.integers(2, 3), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_fronts_are_the_exact_relaxations(groups: int, options: int, limits: int,
                                          seed: int) -> None:
    """A front is the exact (integer) optimum of its relaxation over the positions >= d at
    every capacity, never below the LP curve; with a cut, it differs only where the best
    completion of some prefix reaches the cut anyway (brute force over prefixes and suffixes,
    one group per position)."""
    rng = np.random.default_rng(seed)
    om = rng.integers(-3, 50, size=(groups, options)).astype(float)
    cost = rng.integers(0, 20, size=(limits, groups, options)).astype(float)
    cap = rng.integers(5 * groups, 15 * groups, size=limits).astype(float)
    arr = Arrays([[None] * options] * groups, "omega", [f"r{r}" for r in range(limits)],
                     om, cost, [options] * groups)
    lam = rng.exponential(size=limits)
    search = Search(arr, [list(range(options))] * groups, cost, cap, np.zeros(limits), lam,
                    params=search_params(merge_max=1))
    assert search.front_rays == ([0] if limits == 1 else [2, 4, 6][:limits])
    for j in search.front_rays:
        fronts = search._front(j, math.inf)
        search.fronts = {j: fronts}
        assert sorted(fronts) == list(range(1, search.n))  # all fit in FRONT_MAX here
        for d, (wt, _) in fronts.items():
            assert np.all(np.diff(wt) >= 0)
            probes = np.concatenate([wt, wt - 0.5, [-1.0, wt.max() + 7]])
            got = search._relaxed(j, d, probes, search.curves(d), True)
            lp = search._relaxed(j, d, probes, search.curves(d), False)
            want = [_suffix_optimum(search, j, d, float(x)) for x in probes]
            assert got == pytest.approx(want, rel=1e-12, abs=1e-9)
            assert np.all((lp <= got + 1e-9) | np.isinf(got))
        # with a cut: every prefix's bound is exact below the cut and at least the cut above
        values = [sum(om[g, k] for g, k in enumerate(p))
                  for p in itertools.product(range(options), repeat=groups)]
        cut = float(np.quantile(values, rng.uniform(0.05, 0.6)))
        pruned = search._front(j, cut)
        search.fronts = {j: pruned}
        for d in pruned:
            for prefix in itertools.product(range(options), repeat=d):
                val = sum(search.om[q][k] for q, k in enumerate(prefix))
                use = sum((search.c[q][k] for q, k in enumerate(prefix)), np.zeros(limits))
                base = val + use @ search.L[j] - search.lroom[j]
                rest = np.array([search.room_dir[j] - use @ search.D[j]])
                got = base + search._relaxed(j, d, rest, search.curves(d), True)[0]
                want = base + _suffix_optimum(search, j, d, float(rest[0]))
                if want < cut - 1e-9:
                    assert got == pytest.approx(want, rel=1e-12, abs=1e-9)
                else:
                    assert got >= min(want, cut) - 1e-9


def test_curves_built_depth_by_depth_equal_the_cached_ones() -> None:
    """Trees too large to keep every depth's curves build them in a run, depth after depth,
    from the increments the last depth left: the same curves (and the same curves of the
    capacity spent) as the cached ones."""
    problem = mid_instance({"size_bytes": 0.6, "bops": 0.45, "latency_ms": 0.5}, n=16)
    arr, limits = arrays_of(problem)
    cap = np.array([limits[r] for r in arr.res])
    lam = np.array([1.0, 2.0, 0.5])
    keep = [list(range(n)) for n in arr.sizes]
    cached = Search(arr, keep, arr.cost, cap, np.zeros(3), lam)
    lazy = Search(arr, keep, arr.cost, cap, np.zeros(3), lam,
                  params=search_params(curve_cache_max=-1))
    assert cached._cache and not lazy._cache
    live = list(lazy.incs)
    for d in range(1, lazy.n):
        # (the cached curves repeat a breakpoint for each increment of an earlier position:
        # compared as functions, at every breakpoint of both and between them)
        for want, got in zip(cached.spent_curves(d), lazy.spent_curves(d, live), strict=True):
            pts = np.concatenate([want[0], got[0]])
            pts = np.concatenate([pts, pts - 1e-3, pts + 1e-3])
            a = np.interp(pts, *want, right=math.inf)
            b = np.interp(pts, *got, right=math.inf)
            assert np.array_equal(np.isinf(a), np.isinf(b))
            assert np.allclose(a[np.isfinite(a)], b[np.isfinite(b)], rtol=1e-12, atol=1e-9)
    assert not lazy._spent and not lazy._curves  # nothing kept


def test_plane_bound_in_blocks_equals_one_block(monkeypatch: pytest.MonkeyPatch) -> None:
    problem = mid_instance({"size_bytes": 0.6, "bops": 0.45, "latency_ms": 0.5}, n=16)
    arr, limits = arrays_of(problem)
    cap = np.array([limits[r] for r in arr.res])
    lam = np.array([1.0, 2.0, 0.5])
    search = Search(arr, [list(range(n)) for n in arr.sizes], arr.cost, cap,
                    np.zeros(3), lam, planes=plane_grid(lam))
    use = np.random.default_rng(0).uniform(0, 1, size=(1001, 3)) * cap
    vu = np.column_stack([np.arange(1001.0), use])
    whole = search._plane_bound(vu, 1)
    assert np.allclose(whole, vu[:, 0] + (use @ search.plane_lam.T + search.plane_const[1]).max(1))
    search.params = search_params(plane_block=3 * len(search.plane_lam))  # blocks of 3 states
    assert np.array_equal(search._plane_bound(vu, 1), whole)


def _dominates(a: tuple[float, np.ndarray], b: tuple[float, np.ndarray]) -> bool:
    return a[0] <= b[0] and bool(np.all(a[1] <= b[1]))


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 600), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_undominated_drops_only_dominated_states(n: int, r: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    # few distinct values, so that ties and exact duplicates occur
    vals = rng.integers(0, 20, n).astype(float)
    use = rng.integers(0, 6, (n, r)).astype(float)
    kept = undominated(vals, use)
    assert list(kept) == sorted(set(kept.tolist()))
    alive = set(kept.tolist())
    states = [(vals[i], use[i]) for i in range(n)]
    for i in range(n):
        if i not in alive:  # a kept state covers every dropped one (transitivity)
            assert any(_dominates(states[k], states[i]) for k in kept)
    # the contract: a state dominated by any earlier one in value order (up to 384 states), or
    # by one of the 32 just before it (beyond), is dropped
    order = np.argsort(vals, kind="stable")
    for p, i in enumerate(order):
        earlier = order[:p] if n <= 384 else order[max(0, p - 32):p]
        if any(_dominates(states[k], states[i]) for k in earlier):
            assert i not in alive
