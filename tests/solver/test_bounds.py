"""Bounds: hulls support every minimum, the one-limit LP multiplier attains the LP optimum,
the plane grid leaves out the multipliers' own ray."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from solver.bounds import hulls, lp_dual_one, plane_grid
from solver.params import PARAMS


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
