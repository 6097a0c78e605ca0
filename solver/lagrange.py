"""Exact variable fixing from a Lagrangian bound (reduced-cost fixing before the MILP).

For multipliers lam_r >= 0 on the limits sum_g c_r(x_g) <= cap_r, every feasible assignment x
satisfies

    Omega(x) >= L(lam) + sum_g rc_g(x_g),
    L(lam) = sum_g min_k (Omega_gk + lam . c_gk) - lam . cap,
    rc_g(k) = Omega_gk + lam . c_gk - min_k' (Omega_gk' + lam . c_gk') >= 0,

because lam . (cap - c(x)) >= 0. So with a feasible incumbent of value UB, any assignment that is
at least as good has rc_g(x_g) <= UB - L(lam) in every group, and options with a larger reduced
cost can be dropped without losing any optimum. This holds for *any* lam >= 0, so the
multipliers only decide how much is fixed, never whether the result is exact. They come from a
projected subgradient ascent (Polyak steps); the incumbent is the best feasible Lagrangian
choice seen, improved by single-group moves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .bounds import smallest_fitting
from .heuristics import repair
from .problem import FEAS_RTOL, limit_scale, within

if TYPE_CHECKING:
    from .groups import GOpt


def _choose(om: list[list[float]], cs: list[list[list[float]]], lam: Sequence[float]):
    """Per group the option minimising Omega + lam . c; returns (indices, sum of minima)."""
    picks = []
    total = 0.0
    nres = len(lam)
    for oms, cg in zip(om, cs, strict=True):
        if nres == 1:
            l0 = lam[0]
            vals = [w + l0 * a for w, a in zip(oms, cg[0], strict=True)]
        elif nres == 2:
            l0, l1 = lam
            vals = [w + l0 * a + l1 * b for w, a, b in zip(oms, cg[0], cg[1], strict=True)]
        else:
            vals = list(oms)
            for r in range(nres):
                lr = lam[r]
                vals = [v + lr * a for v, a in zip(vals, cg[r], strict=True)]
        v = min(vals)
        picks.append(vals.index(v))
        total += v
    return picks, total


def fix(
    groups: list[list[GOpt]],
    limits: dict[str, float],
    iterations: int = 40,
) -> tuple[list[list[GOpt]], list[GOpt] | None, dict[str, Any]]:
    """Drop options that no optimal assignment can use. Returns (reduced groups, incumbent or
    None, info). The incumbent's options always survive; when every group is left with one
    option the incumbent is optimal."""
    res = list(limits)
    scale = {r: limit_scale(limits[r], math.fsum(max(o.costs[r] for o in g) for g in groups))
             for r in res}
    cap = [limits[r] / scale[r] for r in res]
    om = [[o.omega for o in g] for g in groups]
    cs = [[[o.costs[r] / scale[r] for o in g] for r in res] for g in groups]
    nres = len(res)

    def usage(picks: list[int]) -> list[float]:
        return [math.fsum(cs[g][r][k] for g, k in enumerate(picks)) for r in range(nres)]

    def feasible(picks: list[int]) -> bool:
        return all(within(math.fsum(groups[g][k].costs[r] for g, k in enumerate(picks)),
                          limits[r]) for r in res)

    def value(picks: list[int]) -> float:
        return math.fsum(om[g][k] for g, k in enumerate(picks))

    lam = [0.0] * nres
    best_l, best_lam = -math.inf, list(lam)
    inc: list[int] | None = None
    ub = math.inf
    spread = max((max(o) - min(o) for o in om), default=1.0) or 1.0

    def visit(mult: list[float]) -> tuple[list[int], float]:
        nonlocal best_l, best_lam, inc, ub
        picks, s = _choose(om, cs, mult)
        lval = s - sum(mult[r] * cap[r] for r in range(nres))
        if lval > best_l:
            best_l, best_lam = lval, list(mult)
        if feasible(picks):
            v = value(picks)
            if v < ub:
                inc, ub = picks, v
        return picks, lval

    # Phase 1: scalar search along lam = mu * (1, ..., 1) for the smallest mu whose Lagrangian
    # choice meets every limit. With one limit this is the LP dual (the best bound), and the
    # choice there is the LP solution rounded to the feasible side: a strong incumbent.
    visit(lam)
    smallest_fitting(lambda mus: [feasible(visit([float(mus[0])] * nres)[0])], spread,
                     grow_steps=40, rel_tol=1e-9)
    # Incumbent candidates: the best feasible Lagrangian choice, improved; and the choice at
    # the best bound (usually just over a limit), repaired then improved
    # (solver.heuristics.repair, on option arrays padded to a rectangle).
    width = max(len(g) for g in groups)
    om_arr = np.array([row + row[:1] * (width - len(row)) for row in om])
    cn_arr = np.array([[cs[g][r] + cs[g][r][:1] * (width - len(cs[g][r])) for g in range(len(cs))]
                       for r in range(nres)], dtype=float).reshape(nres, len(groups), width)
    sizes = [len(g) for g in groups]

    def improved(picks: list[int]) -> list[int]:
        out = repair(om_arr, cn_arr, np.array(cap), sizes, picks)
        return picks if out is None or not feasible(out) else out

    def candidates(mult: list[float], with_inc: bool = True) -> list[list[int]]:
        out = []
        if inc is not None and with_inc:
            out.append(improved(inc))
        repaired = improved(_choose(om, cs, mult)[0])
        if feasible(repaired):
            out.append(repaired)
        return out

    cands = candidates(best_lam)
    if cands:
        inc = min(cands, key=value)
        ub = value(inc)
    # Phase 2 (several limits): projected subgradient ascent with Polyak steps towards the
    # incumbent's value, restarting from the best multipliers when progress stalls.
    if nres > 1 and inc is not None:
        lam, start_lam, start_inc = list(best_lam), list(best_lam), inc
        theta, stall = 1.0, 0
        for _ in range(iterations):
            before = best_l
            picks, lval = visit(lam)
            if ub - best_l <= 1e-12 * max(1.0, abs(ub)):
                break
            if best_l <= before:
                stall += 1
                if stall >= 3:
                    theta, stall = theta / 2, 0
                    lam = list(best_lam)
                    picks, lval = visit(lam)
            grad = [u - c for u, c in zip(usage(picks), cap, strict=True)]
            norm = sum(gr * gr for gr in grad)
            if norm <= 0:
                break
            step = theta * (ub - lval) / norm
            lam = [max(0.0, lam[r] + step * grad[r]) for r in range(nres)]
        cands = [inc]
        if best_lam != start_lam:
            cands += candidates(best_lam, with_inc=inc is not start_inc)
    if not cands:
        return groups, None, {"bound": best_l, "incumbent": None, "kept": None}
    inc = min(cands, key=value)
    ub = value(inc)

    _, s = _choose(om, cs, best_lam)
    lbound = s - sum(best_lam[r] * cap[r] for r in range(nres))
    gap = ub - lbound
    # Keep more rather than less: a generous tolerance can only weaken the fixing. The second
    # term covers assignments that exceed a limit within FEAS_RTOL (they count as feasible).
    tol = 1e-7 * (abs(ub) + abs(lbound) + spread) + 2 * FEAS_RTOL * sum(
        best_lam[r] * max(cap[r], 1.0) for r in range(nres))
    out = []
    for g, opts in enumerate(groups):
        vals = [om[g][k] + sum(best_lam[r] * cs[g][r][k] for r in range(nres))
                for k in range(len(opts))]
        m = min(vals)
        keep = [o for k, o in enumerate(opts) if vals[k] - m <= gap + tol or k == inc[g]]
        out.append(keep)
    incumbent = [groups[g][k] for g, k in enumerate(inc)]
    kept = sum(len(g) for g in out)
    return out, incumbent, {"bound": lbound, "incumbent": ub, "kept": kept}
