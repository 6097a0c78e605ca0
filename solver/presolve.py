"""The exact in-process solve of the option arrays (:func:`solve_arrays`): Lagrangian bound,
incumbent, reduced-cost fixing, then beams and the exact search, so that most problems close
without a MILP solver.

The problem (after ties are merged into groups) is a multiple-choice knapsack: one option per
group, minimise sum Omega subject to sum_g c_r(x_g) <= cap_r for each limited resource r.

Exactness, step by step:

- *bound*: for any lam >= 0 and any assignment x within the limits (up to the FEAS_RTOL cushion
  that :func:`solver.problem.within` grants),
  Omega(x) >= L(lam) + sum_g rc_g(x_g) - lam . cushion (see :mod:`solver.bounds`). The
  multipliers come from the LP relaxation's duals (:func:`solver.lp.lp_duals`) with several
  limits, from the hulls with one (:func:`solver.bounds.lp_dual_one`), else from a scalar
  search and coordinate line searches; any lam is valid, so the LP solver's accuracy never
  affects exactness.
- *fixing*: with an incumbent of value UB, options with rc > UB - L(lam) + tol cannot be in a
  solution better than UB and are dropped (the incumbent's options are always kept).
- *search* (:class:`solver.search.Search`): when it finishes inside its budget (children
  evaluated, and the time limit) the incumbent is optimal up to ``eps_rel`` (no incumbent
  means infeasible); otherwise the reduced problem and the incumbent go to the MILP solver.
  Complete assignments are re-checked exactly (math.fsum of the raw costs with ``within``).
- *order*: with one limit a small exact search first (closes most such problems), then beam
  searches widening while they improve the incumbent (heuristics that only set the incumbent;
  a beam that never had to drop a child was the exact search), each followed by a
  neighbourhood search on large trees and pair moves, with a short try at the exact search
  before each beam wider than ``attempt_width``; then the exact search. Each exact search runs
  on a tree rebuilt by fixing with the best incumbent so far.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from .arrays import Arrays
from .bounds import lp_dual_one, plane_grid, smallest_fitting
from .groups import GOpt
from .heuristics import pair_improve, repair
from .lp import lp_duals
from .params import PARAMS, SearchParams
from .problem import FEAS_RTOL, limit_scale, within
from .search import Search


@dataclass
class Result:
    """``status``: "optimal", "infeasible" or "open" (budget spent: hand ``groups`` and
    ``incumbent`` to a MILP solver). ``incumbent`` is the best assignment found (options per
    group), ``groups`` the options that can still be in a better one."""

    status: str
    incumbent: list[GOpt] | None
    groups: list[list[GOpt]]
    info: dict[str, Any]


def solve_arrays(
    arr: Arrays,
    limits: dict[str, float],
    node_limit: int = 8_000_000,
    time_limit_s: float | None = None,
    start: list[GOpt] | None = None,
    params: SearchParams = PARAMS,
) -> Result:
    """Exact presolve and branch-and-bound of ``arr`` under ``limits`` (keys = ``arr.res``).
    ``start``: a candidate assignment (one option per group, e.g. the previous Pareto point);
    used as an incumbent when it is feasible and made of kept options."""
    t0 = time.perf_counter()
    p = Presolve(arr, limits, params)
    info: dict[str, Any] = {"nodes": 0}
    closed = p.trivial()
    if closed is not None:
        return Result(closed[0], closed[1], arr.groups, dict(info, closed_by="shortcut"))
    p.multipliers(info)
    info["lagrange_evals_s"] = time.perf_counter() - t0
    p.reduced_costs()
    p.seed(start)
    info["bound"] = p.lbound
    info["first_incumbent"] = p.ub
    keep = p.fixed(p.ub, p.inc)
    info["free_groups"] = sum(len(k) > 1 for k in keep)
    info["kept"] = sum(len(k) for k in keep)
    p.deadline = None if time_limit_s is None else t0 + time_limit_s
    finished = p.search(keep, node_limit, info["free_groups"])
    info["nodes"] = node_limit - p.budget
    return p.result(finished, info)


class Presolve:
    """One in-process solve; its fields are the state the steps share: the incumbent (``inc``
    picks per group, value ``ub``), the best Lagrangian bound so far (``best_l`` at
    ``best_lam``), the reduced costs at those multipliers, the current tree and the budget of
    children left."""

    def __init__(self, arr: Arrays, limits: dict[str, float], params: SearchParams) -> None:
        self.arr, self.limits, self.params = arr, limits, params
        self.groups = arr.groups
        self.R = R = len(arr.res)
        self.G = G = len(arr.groups)
        self.om = arr.om
        raw_cap = np.array([limits[r] for r in arr.res], dtype=float)
        top = arr.cost.max(axis=2).sum(axis=1) if G else np.zeros(R)
        scale = np.array([limit_scale(float(c), float(t))
                          for c, t in zip(raw_cap, top, strict=True)])
        self.cn = arr.cost / scale[:, None, None]  # normalised costs
        self.cap = raw_cap / scale
        self.cushion = FEAS_RTOL * np.maximum(np.abs(raw_cap), 1e-300) / scale
        self.rows = np.arange(G)
        self.K = K = self.om.shape[1]
        self.valid = np.arange(K)[None, :] < np.array(arr.sizes)[:, None]  # real options
        # Added to values before a minimum is taken, so that none is taken at the padding: it
        # copies a real option, but a matrix product may round a copy a unit lower than the
        # original (seen: a padding index picked, then an IndexError).
        self.pad = np.where(self.valid, 0.0, math.inf)
        self.inc: list[int] | None = None
        self.ub = math.inf
        self.best_l, self.best_lam = -math.inf, np.zeros(R)
        self.lp_picks: list[int] | None = None
        self.deadline: float | None = None
        self.budget = 0  # children the search may still evaluate
        self.tree_now: Search | None = None  # the current tree ...
        self.tree_ub = math.inf  # ... and the incumbent value it was built with

    # -- exact checks on the raw values (the arrays hold the options' own floats)

    def exact_ok(self, picks: list[int]) -> bool:
        arr = self.arr
        return all(within(math.fsum(arr.cost[r, self.rows, picks].tolist()),
                          self.limits[arr.res[r]]) for r in range(self.R))

    def value(self, picks: list[int]) -> float:
        return math.fsum(self.om[self.rows, picks].tolist())

    def trivial(self) -> tuple[str, list[GOpt] | None] | None:
        """(status, incumbent) when no search is needed: infeasible when a limit is below the
        sum of per-group minima, optimal when each group's least-Omega option fits."""
        arr = self.arr
        mins = [math.fsum(float(v) for v in arr.cost[r].min(axis=1)) for r in range(self.R)]
        if any(not within(mins[r], self.limits[arr.res[r]]) for r in range(self.R)):
            return "infeasible", None
        best0 = [int(k) for k in (self.om + self.pad).argmin(axis=1)]
        if self.exact_ok(best0):
            return "optimal", [self.groups[g][k] for g, k in enumerate(best0)]
        return None

    # -- the Lagrangian bound

    def visit(self, lams: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Lagrangian choices at the multipliers ``lams`` (M, R); records the best bound and
        the best choice within the limits. Returns (picks (G, M), their usage in normalised
        units (M, R))."""
        G, K = self.G, self.K
        v = self.om_flat[:, None] + self.cn_flat @ lams.T + self.pad.reshape(-1, 1)
        picks = v.reshape(G, K, -1).argmin(axis=1)
        chosen = self.base[:, None] + picks
        lvals = np.take_along_axis(v, chosen, axis=0).sum(axis=0) - lams @ self.cap
        m = int(lvals.argmax())
        if lvals[m] > self.best_l:
            self.best_l, self.best_lam = float(lvals[m]), lams[m].copy()
        usage = self.cn_flat[chosen].sum(axis=0)
        vals = np.where(np.all(usage <= self.cap + self.cushion * 0.5, axis=1),
                        self.om_flat[chosen].sum(axis=0), math.inf)
        m = int(vals.argmin())
        if vals[m] < self.ub:
            pl = picks[:, m].tolist()
            if self.exact_ok(pl):
                val = self.value(pl)
                if val < self.ub:
                    self.inc, self.ub = pl, val
        return picks, usage

    def multipliers(self, info: dict[str, Any]) -> None:
        """The best multipliers: with several limits the LP relaxation's duals (the Lagrangian
        dual of a multiple-choice knapsack equals its LP relaxation), whose choices at a few
        larger multipliers along them seed the incumbent (they fit more often); else
        :meth:`_line_searches`."""
        om = self.om
        self.base = np.arange(self.G) * self.K  # flat index of each group's first option
        self.om_flat = om.ravel()
        self.cn_flat = np.ascontiguousarray(self.cn.reshape(self.R, -1).T)  # (G * K, R)
        self.spread = float(np.max(om.max(axis=1) - om.min(axis=1))) or 1.0
        lp = lp_duals(om, self.cn, self.cap, self.arr.sizes) if self.R > 1 else None
        if lp is not None:
            info["lp_duals"] = True
            self.lp_picks = lp[1]
            push = np.array([1.01, 1.03, 1.1, 1.3, 2.0])[:, None]
            self.visit(np.vstack([lp[0][None], lp[0][None] * push + (push - 1) * lp[0].mean()]))
        else:
            self._line_searches()

    def _fits(self, mus: np.ndarray) -> np.ndarray:
        """Whether the Lagrangian choice at lam = mu * (1, ..., 1) fits, for each mu."""
        lams = np.repeat(mus[:, None], self.R, axis=1)
        return np.all(self.visit(lams)[1] <= self.cap, axis=1)

    def _line_searches(self) -> None:
        """One limit, or no LP: the smallest mu whose choice at lam = mu * (1, ..., 1) fits
        (with one limit the LP dual optimum, read off the hulls; the scalar search when that
        does not fit); with several limits then coordinate line searches (bisection on the
        subgradient's sign), which stall at the dual's kinks."""
        p, R, cap = self.params, self.R, self.cap
        hi = None
        if R == 1:  # the LP dual straight from the hulls, checked like a search step
            mu = lp_dual_one(self.om, self.cn[0], cap[0], self.arr.sizes)
            if mu is not None:
                trial = np.array([mu, mu * (1 + 1e-9) + 1e-300])
                ok = self._fits(trial)
                hi = float(trial[int(ok.argmax())]) if ok.any() else None
        if hi is None:
            hi = smallest_fitting(self._fits, self.spread, grow_steps=60, rel_tol=1e-6,
                                  points=p.scalar_points)
        if R == 1 or hi is None:
            return
        for _ in range(p.lagrange_rounds):
            before = self.best_l
            for r in range(R):
                lam = self.best_lam.copy()
                a, b = 0.0, max(4.0 * lam[r], hi, 1e-300)
                for _ in range(40):
                    lam[r] = 0.5 * (a + b)
                    u = self.visit(lam[None])[1][0]
                    if u[r] > cap[r]:
                        a = lam[r]
                    else:
                        b = lam[r]
                    if b - a <= p.lagrange_tol * b:
                        break
            if self.best_l <= before + 1e-12 * abs(before):
                break

    def reduced_costs(self) -> None:
        """Reduced costs ``rc`` (inf at the padding), the bound ``lbound`` and its rounding
        allowance ``tol`` at the best multipliers ``lam``; the Lagrangian choice there."""
        lam = self.lam = self.best_lam
        v = self.om + np.tensordot(lam, self.cn, axes=1) + self.pad
        m = v.min(axis=1)
        self.rc = v - m[:, None]
        self.lbound = float(m.sum() - lam @ self.cap)
        self.tol = self.params.fp_rel * (abs(self.lbound) + float(np.abs(m).sum())
                                         + float(lam @ np.abs(self.cap)) + self.spread) \
            + float(lam @ self.cushion)
        self.lag_picks = v.argmin(axis=1).tolist()
        self.planes = plane_grid(lam, self.params)

    # -- fixing

    def rc_limit(self, ub: float) -> float:
        """The largest reduced cost an option can have and still be in an assignment better
        than ub (completions whose bound is >= ub - eps_rel |ub| cannot improve ub
        meaningfully); inf without an incumbent."""
        if math.isinf(ub):
            return math.inf
        return ub - self.params.eps_rel * abs(ub) - self.lbound + self.tol

    def useful(self, ub: float) -> np.ndarray:
        """(G, K) mask of the options that can be in an assignment better than ub: the only
        moves worth trying when improving an incumbent."""
        return self.rc <= self.rc_limit(ub)

    def fixed(self, ub: float, inc: list[int] | None) -> list[list[int]]:
        """Options per group that can be in an assignment better than ub (see rc_limit),
        and the incumbent's."""
        ok = self.useful(ub) & self.valid
        if inc is not None:
            ok[self.rows, inc] = True
        none = ~ok.any(axis=1)  # cannot happen when inc is None (thr = inf); defensive
        if none.any():
            ok[none, self.rc[none].argmin(axis=1)] = True  # (rc is inf at the padding)
        g_of, k_of = np.nonzero(ok)
        return np.split(k_of, np.cumsum(np.bincount(g_of, minlength=self.G))[:-1])

    # -- incumbents

    def seed(self, start: list[GOpt] | None) -> None:
        """The first incumbent: the rounded LP solution (without it the Lagrangian choice at
        the best bound, usually just over a limit), the best feasible Lagrangian choice and the
        caller's ``start``, each repaired; the best one polished by pair moves."""
        starts = [self.lp_picks if self.lp_picks is not None else self.lag_picks]
        if self.inc is not None:
            starts.append(list(self.inc))
        if start is not None:
            pos = [{id(o): k for k, o in enumerate(g)} for g in self.groups]
            ks = [p.get(id(o)) for p, o in zip(pos, start, strict=True)]
            if all(k is not None for k in ks):
                starts.append(ks)
        seeds = []
        for s in dict.fromkeys(map(tuple, starts)):  # each distinct start once
            cand = repair(self.om, self.cn, self.cap, self.arr.sizes, list(s))
            if cand is not None and self.exact_ok(cand):
                seeds.append((self.value(cand), cand))
        if seeds:
            val, cand = min(seeds)
            self._polish(cand, val)

    def _polish(self, picks: list[int], ub: float) -> None:
        """Pair moves from ``picks`` (value ``ub``) over the options that can beat ``ub``
        (after the seeds, and from the incumbent after each improving beam); the result
        becomes the incumbent when it fits and beats the current one."""
        cand = pair_improve(self.om, self.cn, self.cap, self.arr.sizes, picks,
                            allowed=self.useful(ub), lam=self.lam, params=self.params)
        if self.exact_ok(cand):
            val = self.value(cand)
            if val < self.ub:
                self.inc, self.ub = cand, val

    def take_best(self, search: Search) -> None:
        """The best completion of a finished run that is within the limits, if it beats the
        incumbent, becomes the incumbent."""
        ub = self.ub
        for picks in search.completions():
            if self.exact_ok(picks):
                val = self.value(picks)
                if math.isinf(ub) or val < ub - self.params.eps_rel * abs(ub):
                    self.inc, self.ub = picks, val
                break

    # -- the search

    def tree(self, keep: list[list[int]]) -> Search:
        """The search over the options ``keep`` (per group; e.g. fixed(ub, inc): those that can
        still beat ub)."""
        return Search(self.arr, keep, self.cn, self.cap, self.cushion, self.lam, self.planes,
                      self.params)

    def neighbourhood(self, search: Search) -> int:
        """The exact search over the groups where the beam's ``lns_top`` best completions, the
        LP solution, the Lagrangian choice and the incumbent disagree, the others held at the
        incumbent (a relaxation-induced neighbourhood, as RINS in MIP solvers). May improve the
        incumbent; returns the children evaluated."""
        inc, ub = self.inc, self.ub
        comps = list(itertools.islice(search.completions(), self.params.lns_top))
        ref = [self.lag_picks] + ([self.lp_picks] if self.lp_picks is not None else []) + comps
        open_g = {g for g in range(self.G) if len({r[g] for r in ref} | {inc[g]}) > 1}
        if not open_g:
            return 0
        fx = self.fixed(ub, inc)
        sub = self.tree([fx[g] if g in open_g else [inc[g]] for g in range(self.G)])
        states, finished = sub.run(ub, self.params.lns_work, deadline=self.deadline)
        if finished:
            self.take_best(sub)
        return states

    def search(self, keep: list[list[int]], node_limit: int, free_groups: int) -> bool:
        """The search phases on a budget of ``node_limit`` children: with one limit a small
        exact try, then the beams, then the exact search on what is left. True when an exact
        run finished (the incumbent is then optimal, or there is none)."""
        self.tree_now = self.tree(keep)
        self.budget = node_limit
        if self.budget <= 0:
            return False
        # With several limits the first try rarely closed a problem (docs/solver.md).
        if self.R == 1 and self._exact_run(min(self.budget, self.params.probe_states)):
            return True
        if self._beams(free_groups):
            return True
        if self.budget > 0:
            if self.ub < self.tree_ub:
                # the better incumbent fixes more options: a smaller tree
                self.tree_now = self.tree(self.fixed(self.ub, self.inc))
            return self._exact_run(self.budget)
        return False

    def _exact_run(self, max_states: int) -> bool:
        """The exact search on the current tree within ``max_states`` children."""
        states, finished = self.tree_now.run(self.ub, max_states, deadline=self.deadline)
        self.budget -= states
        if finished:
            self.take_best(self.tree_now)
        return finished

    def _beams(self, free_groups: int) -> bool:
        """Beam searches for a near-optimal incumbent (the exact search's size depends on it),
        widening by ``beam_growth`` while they improve it, within half of the budget. True
        when one of them, or an exact try between them, settled the problem."""
        p = self.params
        width, beam_budget = p.beam_width, self.budget // 2
        self.tree_ub = self.ub  # the incumbent value the tree was built with
        while beam_budget > 0:
            states, done = self.tree_now.run(self.ub, beam_budget, beam_width=width,
                                             deadline=self.deadline)
            self.budget -= states
            beam_budget -= states
            if not done:
                return False
            before = self.ub
            self.take_best(self.tree_now)
            if not self.tree_now.truncated:  # the beam held every child: an exact search
                return True
            if self.inc is not None and p.lns_top and free_groups > p.lns_min_free:
                self.budget -= self.neighbourhood(self.tree_now)
            if self.inc is not None:
                self._polish(self.inc, self.ub)
            if self.ub >= before:
                return False
            if width >= p.attempt_width:
                # Before a wider beam, a try at the exact search on the tree rebuilt with this
                # incumbent, on attempt_work times this beam's children (the next beam would
                # take about beam_growth times). If it cannot finish, the smaller tree still
                # makes the next beams cheaper.
                self.tree_now = self.tree(self.fixed(self.ub, self.inc))
                self.tree_ub = self.ub
                spent = self.budget
                finished = self._exact_run(min(self.budget, p.attempt_work * states))
                beam_budget -= spent - self.budget
                if finished:
                    return True
            else:
                # A narrower beam improved: rebuild the tree for the next beams only if the
                # incumbent fixes many options.
                keep_now = self.fixed(self.ub, self.inc)
                if sum(len(k) - 1 for k in keep_now) <= p.rebuild_shrink * \
                        self.tree_now.free_options:
                    self.tree_now = self.tree(keep_now)
                    self.tree_ub = self.ub
            width *= p.beam_growth
        return False

    def result(self, finished: bool, info: dict[str, Any]) -> Result:
        """The outcome: closed (optimal / infeasible), or open with the options refixed by the
        final incumbent for the MILP solver."""
        groups = self.groups
        if self.inc is not None:
            info["incumbent"] = self.ub
        if finished:
            if self.inc is None:
                return Result("infeasible", None, groups, dict(info, closed_by="branch-and-bound"))
            return Result("optimal", [groups[g][k] for g, k in enumerate(self.inc)], groups,
                          dict(info, closed_by="branch-and-bound"))
        reduced = [[groups[g][k] for k in ks] for g, ks in enumerate(self.fixed(self.ub, self.inc))]
        incumbent = None if self.inc is None else [groups[g][k] for g, k in enumerate(self.inc)]
        info["kept"] = sum(len(g) for g in reduced)
        return Result("open", incumbent, reduced, info)
