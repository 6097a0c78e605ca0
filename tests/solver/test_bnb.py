"""The exact in-process presolve: dominance is lossless, the bound is a bound, the incumbent
polish keeps feasibility, and branch-and-bound equals brute force (also with float costs)."""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings

import numpy as np
import pulp
import pytest
from bitplan_solver_cases import brute_force, problems
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from solver import Limits, Problem, SolveConfig, presolve, solve
from solver.arrays import Arrays, prune_dominated
from solver.bounds import hulls, lp_dual_one, plane_grid
from solver.groups import groups_of
from solver.heuristics import pair_improve, repair
from solver.lp import lp_duals
from solver.params import PARAMS, SearchParams
from solver.problem import LayerOptions, Option, within
from solver.search import Search, undominated

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def _params(**values: object) -> SearchParams:
    """The search's parameters with ``values`` changed."""
    return dataclasses.replace(PARAMS, **values)


def _arrays(problem: Problem) -> tuple[Arrays, dict[str, float]]:
    res = problem.limits.active()
    limits = {r: problem.limits.get(r) for r in res}
    # (prune_dominated sorts each group's options itself)
    return prune_dominated([g.options for g in groups_of(problem)], "omega", res), limits


@SETTINGS
@given(problems(max_layers=6, max_options=4))
def test_dominance_pruning_keeps_an_optimum(problem: Problem) -> None:
    if not problem.limits.active():
        return
    best, _ = brute_force(problem)
    arr, limits = _arrays(problem)
    # enumerate the pruned groups
    found = None
    for combo in itertools.product(*arr.groups):
        if all(within(math.fsum(o.costs[r] for o in combo), limits[r]) for r in limits):
            v = math.fsum(o.omega for o in combo)
            found = v if found is None else min(found, v)
    assert (found is None) == (best is None)
    if best is not None:
        assert found == pytest.approx(best, abs=1e-9)
    for g in arr.groups:  # no kept option dominates another kept one
        for a, b in itertools.permutations(g, 2):
            assert not (a.omega <= b.omega and all(a.costs[r] <= b.costs[r] for r in limits))


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


def _assert_closed_in_process(sol, best: float | None) -> None:
    """``sol`` is brute force's answer (``best``; None = infeasible), found without a MILP."""
    if best is None:
        assert sol.status == "infeasible"
    else:
        assert sol.status == "optimal"
        assert sol.solver["closed_by"] in ("shortcut", "branch-and-bound")
        assert sol.objective == pytest.approx(best, rel=1e-9, abs=1e-9)


@SETTINGS
@given(float_problems())
def test_branch_and_bound_float_costs_match_brute_force(problem: Problem) -> None:
    best, _ = brute_force(problem)
    sol = solve(problem, SolveConfig(bnb_nodes=10**7))
    _assert_closed_in_process(sol, best)


@SETTINGS
@given(problems(max_layers=6, max_options=4))
def test_bound_is_a_bound_and_incumbent_feasible(problem: Problem) -> None:
    if not problem.limits.active():
        return
    best, _ = brute_force(problem)
    arr, limits = _arrays(problem)
    out = presolve.solve_arrays(arr, limits, node_limit=0)
    if out.info.get("closed_by") == "shortcut":
        return
    if best is None:
        assert out.status in ("infeasible", "open") and out.incumbent is None
        return
    assert out.info["bound"] <= best + 1e-9 * max(1.0, abs(best))
    if out.incumbent is not None:
        assert math.fsum(o.omega for o in out.incumbent) >= best - 1e-9
        for r in limits:
            assert within(math.fsum(o.costs[r] for o in out.incumbent), limits[r])
    # an open result keeps an optimum among its reduced options
    found = None
    for combo in itertools.product(*out.groups):
        if all(within(math.fsum(o.costs[r] for o in combo), limits[r]) for r in limits):
            v = math.fsum(o.omega for o in combo)
            found = v if found is None else min(found, v)
    assert found == pytest.approx(best, abs=1e-9)


def test_pair_improve_makes_a_coordinated_move() -> None:
    # Two groups; moving only one breaks the limit, swapping both lowers Omega.
    om = np.array([[0.0, -1.0], [0.0, 0.5]])
    cn = np.array([[[0.5, 1.0], [0.5, 0.0]]])  # one resource, cap 1
    picks = pair_improve(om, cn, np.array([1.0]), [2, 2], [0, 0])
    assert picks == [1, 1]
    # already optimal: unchanged
    assert pair_improve(om, cn, np.array([1.0]), [2, 2], [1, 1]) == [1, 1]


@settings(max_examples=150, deadline=None)
@given(st.integers(2, 5), st.integers(2, 4), st.integers(1, 3), st.integers(0, 2**32 - 1))
def test_pair_improve_ends_in_a_pair_local_optimum(G: int, K: int, R: int, seed: int) -> None:
    """From a fitting start the result still fits, has no larger Omega, and no single or
    paired option change that fits lowers Omega any further (checked by enumeration). The
    multipliers only speed up the search for pairs: any lam >= 0 gives the same result."""
    rng = np.random.default_rng(seed)
    om = rng.integers(0, 9, (G, K)).astype(float)
    cn = rng.integers(0, 5, (R, G, K)).astype(float)
    start = rng.integers(0, K, G).tolist()
    rows = np.arange(G)
    cap = cn[:, rows, start].sum(axis=1) + rng.integers(0, 4, R)
    picks = pair_improve(om, cn, cap, [K] * G, start)
    lam = rng.choice([0.0, 0.5, 1.0, 3.0, 100.0], R)  # ties in s_d + s_f included
    assert pair_improve(om, cn, cap, [K] * G, start, lam=lam) == picks
    assert np.all(cn[:, rows, picks].sum(axis=1) <= cap)
    value = om[rows, picks].sum()
    assert value <= om[rows, start].sum()
    for g, h in itertools.combinations_with_replacement(range(G), 2):
        for k, m in itertools.product(range(K), repeat=2):
            moved = list(picks)
            moved[g], moved[h] = k, m
            if np.all(cn[:, rows, moved].sum(axis=1) <= cap):
                assert om[rows, moved].sum() >= value


def test_pair_improve_only_moves_to_allowed_options() -> None:
    om = np.array([[0.0, -1.0], [0.0, 0.5]])
    cn = np.array([[[0.5, 1.0], [0.5, 0.0]]])
    allowed = np.array([[True, True], [True, False]])  # the partner move is ruled out
    assert pair_improve(om, cn, np.array([1.0]), [2, 2], [0, 0], allowed=allowed) == [0, 0]


@SETTINGS
@given(problems(max_layers=6, max_options=4))
def test_a_beam_that_drops_nothing_is_the_exact_search(problem: Problem) -> None:
    """solve_arrays treats a beam run that never had to drop a child as the exact search."""
    if not problem.limits.active():
        return
    arr, limits = _arrays(problem)
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
                    np.zeros(limits), planes=lams, params=_params(merge_max=1))
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
                    params=_params(merge_max=1))
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


@SETTINGS
@given(float_problems(), st.sampled_from([2, 1500]))
def test_exact_search_with_fronts_matches_brute_force(problem: Problem,
                                                      front_max: int) -> None:
    """Fronts built from the first layer of every exact run (whole, or cut short at two
    points so that the early depths keep the LP curves): still brute force's optimum."""
    best, _ = brute_force(problem)
    sol = solve(problem, SolveConfig(shortcut=False, bnb_nodes=10**7),
                params=_params(front_trigger=-1, front_max=front_max, beam_width=1, probe_states=0))
    _assert_closed_in_process(sol, best)


@SETTINGS
@given(problems(max_layers=7, max_options=4))
def test_neighbourhood_search_keeps_the_optimum(problem: Problem) -> None:
    """The neighbourhood search after each beam only sets incumbents: forced on every tree,
    with one-state beams, the answer is still brute force's."""
    best, _ = brute_force(problem)
    sol = solve(problem, SolveConfig(shortcut=False, bnb_nodes=10**7),
                params=_params(lns_min_free=-1, beam_width=1, probe_states=0))
    _assert_closed_in_process(sol, best)


def test_neighbourhood_search_runs_on_the_disagreeing_groups(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On a 30-layer instance with three limits the search runs on a tree that leaves only
    some groups free (the neighbourhood), and the answer still equals CBC's."""
    problem = _mid_instance({"size_bytes": 0.6, "bops": 0.45, "latency_ms": 0.5})
    free_counts = []
    init = Search.__init__

    def spy(self, arr, keep, *args, **kwargs):
        free_counts.append(sum(len(k) > 1 for k in keep))
        init(self, arr, keep, *args, **kwargs)

    monkeypatch.setattr(Search, "__init__", spy)
    ours = solve(problem, params=_params(lns_min_free=-1, beam_width=2, probe_states=0))
    reference = solve(problem, SolveConfig(presolve=False, fix=False, shortcut=False))
    assert ours.objective == pytest.approx(reference.objective, rel=1e-9)
    assert len(free_counts) >= 2 and min(free_counts[1:]) < free_counts[0]


@pytest.mark.parametrize("limits", [{"a": 2.5}, {"a": 2.5, "b": 2.5}])
def test_padding_is_never_picked(limits: dict[str, float]) -> None:
    """The rectangle's padding copies a real option, but a matrix product may round a copy a
    unit lower than the original (seen on random problems: a padding index came back and the
    caller's lookup failed). With every padding value one unit below the option it copies,
    the answer still holds real options only, and is the optimum."""
    groups = [["g0o0"], ["g1o0", "g1o1"], ["g2o0", "g2o1", "g2o2"]]
    om = np.array([[1.0, 1.0, 1.0], [2.0, 0.0, 2.0], [3.5, 1.0, 0.0]])
    om[0, 1:] = np.nextafter(1.0, -math.inf)
    om[1, 2] = np.nextafter(2.0, -math.inf)
    use = np.array([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
    arr = Arrays(groups, "omega", list(limits), om, np.array([use] * len(limits)),
                     [1, 2, 3])
    res = presolve.solve_arrays(arr, limits)
    assert res.status == "optimal"
    assert res.incumbent == ["g0o0", "g1o0", "g2o1"]  # 1 + 2 + 1 at a use of 1 + 0 + 1 (the
    # only other fit within 2.5: 1 + 0 + 3.5 at 1 + 1 + 0)


def test_curves_built_depth_by_depth_equal_the_cached_ones() -> None:
    """Trees too large to keep every depth's curves build them in a run, depth after depth,
    from the increments the last depth left: the same curves (and the same curves of the
    capacity spent) as the cached ones."""
    problem = _mid_instance({"size_bytes": 0.6, "bops": 0.45, "latency_ms": 0.5}, n=16)
    arr, limits = _arrays(problem)
    cap = np.array([limits[r] for r in arr.res])
    lam = np.array([1.0, 2.0, 0.5])
    keep = [list(range(n)) for n in arr.sizes]
    cached = Search(arr, keep, arr.cost, cap, np.zeros(3), lam)
    lazy = Search(arr, keep, arr.cost, cap, np.zeros(3), lam, params=_params(curve_cache_max=-1))
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


@SETTINGS
@given(float_problems())
def test_exact_search_without_the_curve_cache_matches_brute_force(problem: Problem) -> None:
    best, _ = brute_force(problem)
    sol = solve(problem, SolveConfig(shortcut=False, bnb_nodes=10**7),
                params=_params(curve_cache_max=-1, beam_width=1, probe_states=0))
    _assert_closed_in_process(sol, best)


def test_plane_bound_in_blocks_equals_one_block(monkeypatch: pytest.MonkeyPatch) -> None:
    problem = _mid_instance({"size_bytes": 0.6, "bops": 0.45, "latency_ms": 0.5}, n=16)
    arr, limits = _arrays(problem)
    cap = np.array([limits[r] for r in arr.res])
    lam = np.array([1.0, 2.0, 0.5])
    search = Search(arr, [list(range(n)) for n in arr.sizes], arr.cost, cap,
                    np.zeros(3), lam, planes=plane_grid(lam))
    use = np.random.default_rng(0).uniform(0, 1, size=(1001, 3)) * cap
    vu = np.column_stack([np.arange(1001.0), use])
    whole = search._plane_bound(vu, 1)
    assert np.allclose(whole, vu[:, 0] + (use @ search.plane_lam.T + search.plane_const[1]).max(1))
    search.params = _params(plane_block=3 * len(search.plane_lam))  # blocks of 3 states
    assert np.array_equal(search._plane_bound(vu, 1), whole)


def test_plane_grid_leaves_out_the_multipliers_own_ray() -> None:
    lam = np.array([2.0, 0.5, 1.0])
    grid = plane_grid(lam)
    f = len(PARAMS.plane_factors)
    assert grid.shape == (f ** 3 - f, 3)
    ratios = grid / lam
    assert not np.any(np.ptp(ratios, axis=1) == 0)  # no multiple of lam
    assert plane_grid(np.array([1.0])).shape == (0, 1)


def test_hulls_are_convex() -> None:
    w = np.array([[0.0, 1.0, 2.0, 3.0, 1.5]])
    o = np.array([[5.0, 3.0, 2.5, 0.0, 4.0]])
    sw, so, (eff, dw, do, row) = hulls(w, o)
    assert (sw[0], so[0]) == (0.0, 5.0)
    assert list(eff) == sorted(eff, reverse=True) and np.all(eff > 0)
    assert dw.sum() == 3.0 and do.sum() == -5.0 and np.all(row == 0)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), min_size=1,
                         max_size=7), min_size=1, max_size=5))
def test_hulls_support_every_minimum(rows: list[list[tuple[int, int]]]) -> None:
    """Each row's hull (padded rows, duplicates, collinear points) has the lexicographic least
    point as its start and strictly decreasing positive efficiencies, and its vertices attain
    min(o + t * w) over the row's points for every t >= 0 (the whole LP relaxation)."""
    width = max(map(len, rows))
    w = np.full((len(rows), width), np.inf)
    o = np.zeros((len(rows), width))
    for i, pts in enumerate(rows):
        w[i, :len(pts)] = [p[0] for p in pts]
        o[i, :len(pts)] = [p[1] for p in pts]
    sw, so, (eff, dw, do, row) = hulls(w, o)
    assert np.all(np.diff(row) >= 0)
    for i, pts in enumerate(rows):
        assert (sw[i], so[i]) == min(pts)
        e, a, b = eff[row == i], dw[row == i], do[row == i]
        assert np.all(e > 0) and np.all(np.diff(e) < 0)
        vw = sw[i] + np.concatenate(([0.0], np.cumsum(a)))
        vo = so[i] + np.concatenate(([0.0], np.cumsum(b)))
        for t in [0.0, 1e-3, 0.25, 0.5, 1.0, 2.0, 3.0, 7.0, 1e3, *e.tolist()]:
            assert min(p[1] + t * p[0] for p in pts) == pytest.approx(float((vo + t * vw).min()))
        assert set(zip(vw.tolist(), vo.tolist(), strict=True)) <= set(map(tuple, map(
            lambda p: (float(p[0]), float(p[1])), pts)))


@SETTINGS
@given(problems(max_layers=7, max_options=4))
def test_exact_search_alone_matches_brute_force(problem: Problem) -> None:
    """With a beam of one state and no probe, optimality rests on the exact layered search."""
    best, _ = brute_force(problem)
    sol = solve(problem, SolveConfig(shortcut=False, bnb_nodes=10**7),
                params=_params(beam_width=1, probe_states=0))
    _assert_closed_in_process(sol, best)


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


def _mid_instance(fractions: dict[str, float], n: int = 30) -> Problem:
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


def test_layered_search_matches_cbc_on_a_mid_size_instance() -> None:
    """30 layers x 12 options, two limits: far beyond brute force, so CBC alone is the
    reference; the in-process search must close it and agree."""
    problem = _mid_instance({"size_bytes": 0.5, "bops": 0.3})
    ours = solve(problem)
    reference = solve(problem, SolveConfig(presolve=False, fix=False, shortcut=False))
    assert ours.solver["closed_by"] == "branch-and-bound"
    assert (ours.status, reference.status) == ("optimal", "optimal")
    assert ours.objective == pytest.approx(reference.objective, rel=1e-9)


def test_a_greedy_beam_is_not_taken_for_the_exact_search(monkeypatch: pytest.MonkeyPatch) -> None:
    """A beam of width one (greedy) drops children, so its best completion is only an
    incumbent: the exact search must still run and reach CBC's optimum. Here the beams improve
    the incumbent (the repaired seeds are switched off, so the first incumbent is weak), so the
    exact search runs on a tree rebuilt with the options the better incumbent still allows
    (fails when that rebuild fixes too much)."""
    monkeypatch.setattr(presolve, "repair", lambda *args: None)
    trees = []
    build = Search.__init__

    def spy(self: Search, *args: object) -> None:
        build(self, *args)
        trees.append(sum(len(ks) for members in self.members for _, ks in members))

    monkeypatch.setattr(Search, "__init__", spy)
    problem = _mid_instance({"size_bytes": 0.6, "bops": 0.45, "latency_ms": 0.5})
    ours = solve(problem, params=_params(beam_width=1, beam_growth=1, probe_states=0))
    reference = solve(problem, SolveConfig(presolve=False, fix=False, shortcut=False))
    assert len(trees) == 2 and trees[1] < trees[0]  # rebuilt, and smaller
    assert ours.solver["closed_by"] == "branch-and-bound"
    assert ours.objective == pytest.approx(reference.objective, rel=1e-9)


@pytest.mark.parametrize("work", [0, 1, 1000])
def test_exact_attempts_between_beams_keep_the_optimum(work: int,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Exact tries between widening beams (failing on a tiny budget, or finishing) either
    close the problem at CBC's optimum or leave it to the later beams and the exact search.
    (The repaired seeds are switched off, so that the beams improve a weak first incumbent.)"""
    monkeypatch.setattr(presolve, "repair", lambda *args: None)
    runs = []
    run = Search.run

    def spy(self: Search, ub: float, max_states: int, **kw: object) -> tuple[int, bool]:
        out = run(self, ub, max_states, **kw)
        runs.append((kw.get("beam_width"), out[1]))
        return out

    monkeypatch.setattr(Search, "run", spy)
    problem = _mid_instance({"size_bytes": 0.5, "bops": 0.5, "latency_ms": 0.5})
    ours = solve(problem, params=_params(beam_width=1, probe_states=0, attempt_width=1,
                                         attempt_work=work))
    reference = solve(problem, SolveConfig(presolve=False, fix=False, shortcut=False))
    assert ours.solver["closed_by"] == "branch-and-bound"
    assert ours.objective == pytest.approx(reference.objective, rel=1e-9)
    # the exact runs that follow a beam: the tries (and, after the last beam, the search)
    tries = [done for (before, _), (width, done) in zip(runs, runs[1:], strict=False)
             if before is not None and width is None]
    assert tries
    if work == 0:  # every try fails at once; a beam that dropped nothing closed it
        assert not any(tries) and runs[-1][0] is not None
    else:  # a try closed it
        assert tries[-1] and runs[-1] == (None, True)
    if work == 1000:  # ... the first one
        assert len(tries) == 1


def _lp_relaxation(problem: Problem) -> float:
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


@pytest.mark.parametrize("backend", ["highspy", "scipy"])
@pytest.mark.parametrize("fractions", [{"size_bytes": 0.5, "bops": 0.3},
                                       {"size_bytes": 0.6, "bops": 0.45, "latency_ms": 0.5}])
def test_root_bound_is_the_lp_relaxation(fractions: dict[str, float], backend: str,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """With several limits the multipliers come from the LP's duals (HiGHS directly, or
    through scipy), so the Lagrangian bound reaches the LP relaxation's optimum (the best any
    multipliers can give)."""
    if backend == "highspy":
        pytest.importorskip("highspy")
    monkeypatch.setattr(presolve, "lp_duals", lambda *a: lp_duals(*a, backend=backend))
    problem = _mid_instance(fractions)
    arr, limits = _arrays(problem)
    out = presolve.solve_arrays(arr, limits, node_limit=0)
    assert out.info["lp_duals"]
    assert out.info["bound"] == pytest.approx(_lp_relaxation(problem), rel=1e-7)


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.8])
def test_single_limit_bound_is_the_lp_relaxation(fraction: float,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """With one limit the multiplier comes straight from the hulls (no scalar search), and
    its Lagrangian bound is the LP relaxation's optimum."""
    def no_search(*args: object, **kwargs: object) -> None:
        raise AssertionError("the scalar search ran")

    monkeypatch.setattr(presolve, "smallest_fitting", no_search)
    problem = _mid_instance({"size_bytes": fraction})
    arr, limits = _arrays(problem)
    out = presolve.solve_arrays(arr, limits, node_limit=0)
    assert out.info["bound"] == pytest.approx(_lp_relaxation(problem), rel=1e-9)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 6), st.integers(1, 4), st.floats(0.0, 1.0), st.integers(0, 2**32 - 1))
def test_lp_dual_one_attains_the_lp_optimum(G: int, K: int, where: float, seed: int) -> None:
    """lp_dual_one's multiplier mu gives the Lagrangian bound sum_g min_k (Omega + mu c) -
    mu cap equal to the LP relaxation's optimum (scipy's HiGHS); None only when the
    lightest options overflow the limit or the least-Omega ones fit."""
    from scipy.optimize import linprog

    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, K + 1, G).tolist()
    om = rng.integers(0, 20, (G, K)).astype(float)
    cost = rng.integers(0, 10, (G, K)).astype(float)
    for g, n in enumerate(sizes):  # padding repeats the first option, as in Arrays
        om[g, n:], cost[g, n:] = om[g, 0], cost[g, 0]
    lo = sum(cost[g, :n].min() for g, n in enumerate(sizes))
    hi = sum(cost[g, :n].max() for g, n in enumerate(sizes))
    cap = lo + where * (hi - lo)
    mu = lp_dual_one(om, cost, cap, sizes)
    idx = [(g, k) for g, n in enumerate(sizes) for k in range(n)]
    one_each = np.array([[float(g == h) for h, _ in idx] for g in range(G)])
    lp = linprog([om[g, k] for g, k in idx], A_ub=[[cost[g, k] for g, k in idx]], b_ub=[cap],
                 A_eq=one_each, b_eq=np.ones(G), bounds=(0, 1), method="highs")
    assert lp.status == 0
    if mu is None:
        least = [int(np.argmin(np.where(np.arange(K) < n, om[g], np.inf)))
                 for g, n in enumerate(sizes)]
        assert lp.fun == pytest.approx(sum(om[g, k] for g, k in enumerate(least)))
        return
    bound = sum(min(om[g, k] + mu * cost[g, k] for k in range(n))
                for g, n in enumerate(sizes)) - mu * cap
    assert bound == pytest.approx(lp.fun, rel=1e-9, abs=1e-9)


def test_search_stays_exact_when_the_lp_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """No LP duals (solver failure): the line searches set the multipliers; weaker bounds,
    the same optimum."""
    problem = _mid_instance({"size_bytes": 0.6, "bops": 0.45, "latency_ms": 0.5}, n=16)
    with_lp = solve(problem)
    monkeypatch.setattr(presolve, "lp_duals", lambda *a: None)
    arr, limits = _arrays(problem)
    assert "lp_duals" not in presolve.solve_arrays(arr, limits, node_limit=0).info
    without = solve(problem)
    assert (with_lp.status, without.status) == ("optimal", "optimal")
    assert without.objective == pytest.approx(with_lp.objective, rel=1e-9)


@SETTINGS
@given(st.integers(1, 8), st.integers(1, 5), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_repair_fits_or_gives_up(groups: int, options: int, limits: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    om = rng.normal(size=(groups, options))
    cn = rng.uniform(0, 1, size=(limits, groups, options))
    cap = rng.uniform(0.2, 0.8, size=limits) * groups
    start = rng.integers(0, options, groups).tolist()
    out = repair(om, cn, cap, [options] * groups, start)
    reachable = np.all(cn.min(axis=2).sum(axis=1) <= cap)
    if out is None:
        return
    used = cn[:, np.arange(groups), out].sum(axis=1)
    assert np.all(used <= cap + 1e-12)
    if np.all(cn[:, np.arange(groups), start].sum(axis=1) <= cap):
        # already fitting: improvement never raises Omega
        assert om[np.arange(groups), out].sum() <= om[np.arange(groups), start].sum() + 1e-12
    assert reachable
    # the improvement passes end 1-opt: no single-group move lowers Omega and still fits
    rows = np.arange(groups)
    delta = cn - cn[:, rows, out][:, :, None]
    fits = np.all(delta <= (cap - used)[:, None, None], axis=0)
    assert not np.any(fits & (om < om[rows, out][:, None]))
