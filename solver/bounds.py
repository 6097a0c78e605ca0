"""Lower bounds of the multiple-choice knapsack: convex hulls of each group's options and the
LP curves built from them, the LP multiplier with one limit, the scalar multiplier search,
step functions of fronts and the grid of plane multipliers.

For any lam >= 0 and any assignment x within the limits,
Omega(x) >= L(lam) + sum_g rc_g(x_g) with L(lam) = sum_g min_k (Omega_gk + lam . c_gk) -
lam . cap and reduced costs rc_g(k) >= 0; any lam is valid, so how the multipliers are found
decides tightness, never exactness.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from .params import PARAMS, SearchParams


def plane_grid(lam: np.ndarray, params: SearchParams = PARAMS) -> np.ndarray:
    """(P, R) multipliers for the planes: ``lam`` scaled limit by limit by every combination
    of ``params.plane_factors``, less the multiples of ``lam`` itself (the first relaxation
    of the search already optimises along them). Empty with one limit: its first relaxation
    is exact."""
    R = len(lam)
    if R < 2:
        return np.zeros((0, R))
    f = np.array(params.plane_factors)
    grid = np.stack(np.meshgrid(*([f] * R), indexing="ij"), axis=-1).reshape(-1, R)
    grid = grid[np.ptp(grid, axis=1) > 0]
    return grid * lam


def smallest_fitting(fits: Callable[[np.ndarray], np.ndarray], start: float, grow_steps: int,
                     rel_tol: float, points: int = 1) -> float | None:
    """The smallest mu >= 0 (to ``rel_tol``) with ``fits(mu)``, for a ``fits`` monotone in mu
    (a Lagrangian choice only gets cheaper as its multiplier grows), ``fits`` taking an array
    of mu and answering for each: ``start`` times 4 until it fits, then on [0, that] rounds of
    ``points`` equally spaced trial values (1: bisection) keeping the bracket of the first that
    fits. None when it never fits within ``grow_steps``."""
    hi = None
    lo = 0.0
    for k0 in range(0, grow_steps, max(points, 1)):
        mus = start * 4.0 ** np.arange(k0, min(k0 + max(points, 1), grow_steps))
        ok = np.asarray(fits(mus), dtype=bool)
        if ok.any():
            i = int(ok.argmax())
            hi = float(mus[i])
            break
    if hi is None:
        return None
    for _ in range(400):  # (far more rounds than rel_tol >= 1e-12 needs)
        if hi - lo <= rel_tol * hi:
            break
        mus = lo + (hi - lo) * np.arange(1, points + 1) / (points + 1)
        ok = np.asarray(fits(mus), dtype=bool)
        if ok.any():
            i = int(ok.argmax())
            hi = float(mus[i])
            lo = float(mus[i - 1]) if i else lo
        else:
            lo = float(mus[-1])
    return hi


def lp_dual_one(om: np.ndarray, cost: np.ndarray, cap: float, sizes: list[int],
                ) -> float | None:
    """With one limit, the LP relaxation's multiplier (Dyer / Zemel): the efficiency of the
    hull increment, taken in decreasing efficiency from every group's lightest option, that
    would first overflow ``cap``; None when none does (or the lightest options overflow)."""
    G, K = om.shape
    pad = np.arange(K)[None, :] >= np.array(sizes)[:, None]
    sw, _, (eff, dw, _, _) = hulls(np.where(pad, np.inf, cost), om)
    used = float(sw.sum())
    if used > cap:
        return None
    order = np.argsort(-eff, kind="stable")
    over = np.flatnonzero(used + np.cumsum(dw[order]) > cap)
    return float(eff[order[over[0]]]) if over.size else None


def hulls(w: np.ndarray, o: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, ...]]:
    """Lower-left convex hulls of the (weight, objective) points of each row (padding: weight
    inf): per row the start (least weight, then least objective), and the increments between
    consecutive hull vertices, (efficiency, d_weight, d_objective, row) in row order and along
    each row with decreasing efficiency -d_objective / d_weight > 0. The LP relaxation of a
    multiple-choice knapsack only ever uses points on this hull.

    After sorting a row by (weight, objective), the points strictly below every lighter one
    form a staircase (the others are heavier and no better); a staircase point is a vertex when
    the steepest slope reaching it from a lighter staircase point is less than the shallowest
    slope leaving it to a heavier one (a supporting line touches only it; collinear points are
    dropped)."""
    rows, K = w.shape
    order = np.lexsort((o, w), axis=-1)
    ws = np.take_along_axis(w, order, axis=1)
    os_ = np.take_along_axis(o, order, axis=1)
    stair = np.isfinite(ws)
    stair[:, 1:] &= os_[:, 1:] < np.minimum.accumulate(os_, axis=1)[:, :-1]
    pair = stair[:, :, None] & stair[:, None, :]
    pair &= np.triu(np.ones((K, K), dtype=bool), k=1)
    with np.errstate(all="ignore"):  # pairs off the staircase are masked out
        slope = np.subtract(os_[:, None, :], os_[:, :, None])
        slope /= np.subtract(ws[:, None, :], ws[:, :, None])
    left = slope.max(axis=1, where=pair, initial=-np.inf)  # [r, j]: over lighter i < j
    right = slope.min(axis=2, where=pair, initial=np.inf)  # [r, j]: over heavier k > j
    vertex = stair & (left < right)
    r, c = np.nonzero(vertex)  # row-major: along each row by weight
    vw, vo = ws[r, c], os_[r, c]
    first = np.ones(r.size, dtype=bool)
    first[1:] = r[1:] != r[:-1]
    dw = vw[1:] - vw[:-1]
    do = vo[1:] - vo[:-1]
    inc = ~first[1:]  # consecutive vertices of one row
    dw, do = dw[inc], do[inc]
    starts_w = np.zeros(rows)
    starts_o = np.zeros(rows)
    starts_w[r[first]] = vw[first]
    starts_o[r[first]] = vo[first]
    return starts_w, starts_o, (-do / dw, dw, do, r[1:][inc])


def step_value(front: tuple[np.ndarray, np.ndarray], rest: np.ndarray) -> np.ndarray:
    """A front's value (weights ascending, values) at capacities ``rest``: the value of the
    heaviest step that fits; inf where none does."""
    wt, val = front
    if not wt.size:
        return np.full(rest.shape, math.inf)
    at = np.searchsorted(wt, rest, side="right") - 1
    return np.where(at >= 0, val[np.maximum(at, 0)], math.inf)


def lp_curve(dw: np.ndarray, do: np.ndarray, w0: float, o0: float,
              ) -> tuple[np.ndarray, np.ndarray]:
    """Breakpoints (capacity, LP value) of an LP curve starting at (w0, o0), the sum of its
    positions' hull starts, through the increments (dw, do) in decreasing efficiency."""
    return np.cumsum(np.concatenate(([w0], dw))), np.cumsum(np.concatenate(([o0], do)))
