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
    f = _Fixing(groups, limits)
    cands = f.first_incumbents()
    if f.nres > 1 and f.inc is not None:
        cands = f.subgradient(iterations)
    if not cands:
        return groups, None, {"bound": f.best_l, "incumbent": None, "kept": None}
    return f.reduce(min(cands, key=f.value))


class _Fixing:
    """One fixing run; its fields are the state the steps share: the best Lagrangian bound so
    far (``best_l`` at ``best_lam``) and the incumbent (``inc`` picks per group, value ``ub``),
    over the options' values ``om`` and normalised costs ``cs`` (group, limit, option)."""

    def __init__(self, groups: list[list[GOpt]], limits: dict[str, float]) -> None:
        self.groups, self.limits = groups, limits
        self.res = res = list(limits)
        scale = {r: limit_scale(limits[r],
                                math.fsum(max(o.costs[r] for o in g) for g in groups))
                 for r in res}
        self.cap = [limits[r] / scale[r] for r in res]
        self.om = [[o.omega for o in g] for g in groups]
        self.cs = [[[o.costs[r] / scale[r] for o in g] for r in res] for g in groups]
        self.nres = len(res)
        self.best_l, self.best_lam = -math.inf, [0.0] * self.nres
        self.inc: list[int] | None = None
        self.ub = math.inf
        self.spread = max((max(o) - min(o) for o in self.om), default=1.0) or 1.0

    def usage(self, picks: list[int]) -> list[float]:
        return [math.fsum(self.cs[g][r][k] for g, k in enumerate(picks))
                for r in range(self.nres)]

    def feasible(self, picks: list[int]) -> bool:
        groups = self.groups
        return all(within(math.fsum(groups[g][k].costs[r] for g, k in enumerate(picks)),
                          self.limits[r]) for r in self.res)

    def value(self, picks: list[int]) -> float:
        return math.fsum(self.om[g][k] for g, k in enumerate(picks))

    def visit(self, mult: list[float]) -> tuple[list[int], float]:
        """The Lagrangian choice at ``mult`` and its bound; records the best bound and the
        best feasible choice."""
        picks, s = _choose(self.om, self.cs, mult)
        lval = s - sum(mult[r] * self.cap[r] for r in range(self.nres))
        if lval > self.best_l:
            self.best_l, self.best_lam = lval, list(mult)
        if self.feasible(picks):
            v = self.value(picks)
            if v < self.ub:
                self.inc, self.ub = picks, v
        return picks, lval

    def first_incumbents(self) -> list[list[int]]:
        """Phase 1: scalar search along lam = mu * (1, ..., 1) for the smallest mu whose
        Lagrangian choice meets every limit (with one limit the LP dual, the best bound, and
        the choice there the LP solution rounded to the feasible side: a strong incumbent).
        Sets the incumbent to the best candidate; returns the candidates."""
        nres = self.nres
        self.visit([0.0] * nres)
        smallest_fitting(lambda mus: [self.feasible(self.visit([float(mus[0])] * nres)[0])],
                         self.spread, grow_steps=40, rel_tol=1e-9)
        # repair works on option arrays padded to a rectangle
        groups, om, cs = self.groups, self.om, self.cs
        width = max(len(g) for g in groups)
        self.om_arr = np.array([row + row[:1] * (width - len(row)) for row in om])
        self.cn_arr = np.array(
            [[cs[g][r] + cs[g][r][:1] * (width - len(cs[g][r])) for g in range(len(cs))]
             for r in range(nres)], dtype=float).reshape(nres, len(groups), width)
        self.sizes = [len(g) for g in groups]
        cands = self.candidates(self.best_lam)
        if cands:
            self.inc = min(cands, key=self.value)
            self.ub = self.value(self.inc)
        return cands

    def improved(self, picks: list[int]) -> list[int]:
        """``picks`` repaired and improved by single-group moves (solver.heuristics.repair),
        or unchanged when that does not fit."""
        out = repair(self.om_arr, self.cn_arr, np.array(self.cap), self.sizes, picks)
        return picks if out is None or not self.feasible(out) else out

    def candidates(self, mult: list[float], with_inc: bool = True) -> list[list[int]]:
        """Incumbent candidates: the incumbent, improved; and the choice at ``mult`` (usually
        just over a limit), repaired then improved."""
        out = []
        if self.inc is not None and with_inc:
            out.append(self.improved(self.inc))
        repaired = self.improved(_choose(self.om, self.cs, mult)[0])
        if self.feasible(repaired):
            out.append(repaired)
        return out

    def subgradient(self, iterations: int) -> list[list[int]]:
        """Phase 2 (several limits): projected subgradient ascent with Polyak steps towards
        the incumbent's value, restarting from the best multipliers when progress stalls.
        Returns the incumbent candidates after it."""
        nres, cap = self.nres, self.cap
        lam, start_lam, start_inc = list(self.best_lam), list(self.best_lam), self.inc
        theta, stall = 1.0, 0
        for _ in range(iterations):
            before = self.best_l
            picks, lval = self.visit(lam)
            if self.ub - self.best_l <= 1e-12 * max(1.0, abs(self.ub)):
                break
            if self.best_l <= before:
                stall += 1
                if stall >= 3:
                    theta, stall = theta / 2, 0
                    lam = list(self.best_lam)
                    picks, lval = self.visit(lam)
            grad = [u - c for u, c in zip(self.usage(picks), cap, strict=True)]
            norm = sum(gr * gr for gr in grad)
            if norm <= 0:
                break
            step = theta * (self.ub - lval) / norm
            lam = [max(0.0, lam[r] + step * grad[r]) for r in range(nres)]
        cands = [self.inc]
        if self.best_lam != start_lam:
            cands += self.candidates(self.best_lam, with_inc=self.inc is not start_inc)
        return cands

    def reduce(self, inc: list[int]) -> tuple[list[list[GOpt]], list[GOpt], dict[str, Any]]:
        """Keep the options whose reduced cost at the best multipliers is within the gap
        between the incumbent ``inc`` and the bound (and the incumbent's)."""
        groups, om, cs, nres, best_lam = self.groups, self.om, self.cs, self.nres, self.best_lam
        ub = self.value(inc)
        _, s = _choose(om, cs, best_lam)
        lbound = s - sum(best_lam[r] * self.cap[r] for r in range(nres))
        gap = ub - lbound
        # Keep more rather than less: a generous tolerance can only weaken the fixing. The
        # second term covers assignments that exceed a limit within FEAS_RTOL (they count as
        # feasible).
        tol = 1e-7 * (abs(ub) + abs(lbound) + self.spread) + 2 * FEAS_RTOL * sum(
            best_lam[r] * max(self.cap[r], 1.0) for r in range(nres))
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
