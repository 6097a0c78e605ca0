"""Exact in-process presolve: dominance pruning, Lagrangian bound, incumbent, reduced-cost
fixing and a breadth-first branch-and-bound over numpy arrays, so that most instances close
without a MILP solver.

The problem (after ties are merged into groups) is a multiple-choice knapsack: one option per
group, minimise sum Omega subject to sum_g c_r(x_g) <= cap_r for each limited resource r.

Exactness, step by step:

- *dominance*: option k of a group is dropped when another option j of the same group has
  Omega_j <= Omega_k and c_r(j) <= c_r(k) for every limited r (strictly in one of them, or j
  earlier when they are equal). Swapping k for j in any assignment keeps it feasible and does
  not raise Omega, so some optimum survives (the relation is a strict partial order, so every
  dropped option has a surviving dominator).
- *bound*: for any lam >= 0 and any assignment x within the limits (up to the FEAS_RTOL cushion
  that :func:`solver.problem.within` grants),
  Omega(x) >= L(lam) + sum_g rc_g(x_g) - lam . cushion, with
  L(lam) = sum_g min_k (Omega_gk + lam . c_gk) - lam . cap and reduced costs
  rc_g(k) = Omega_gk + lam . c_gk - min_k' (Omega_gk' + lam . c_gk') >= 0.
  The multipliers come from a scalar search (exact with one limit) and, with several limits,
  the LP relaxation's duals (:func:`lp_duals`; coordinate line searches if it fails); any lam
  is valid, so the LP solver's accuracy never affects exactness.
- *fixing*: with an incumbent of value UB, options with rc > UB - L(lam) + tol cannot be in a
  solution better than UB and are dropped (the incumbent's options are always kept).
- *branch-and-bound* (:class:`_Search`): over the groups with more than one option left, one
  layer of the tree at a time. A partial assignment is cut when the smallest possible use of
  the remaining groups exceeds a limit, or when an LP bound proves every completion has
  Omega >= UB - EPS_REL * |UB| (see :data:`EPS_REL`), or when another partial assignment of the
  same layer dominates it (no larger Omega and no larger use of any limit: every completion of
  the dominated one completes the other at least as well; checked in layers of more than
  DOMINANCE_MIN states). Large exact runs swap the LP curves of the relaxations that keep one
  limit exactly for their integer optimum over the remaining groups (*fronts*, see
  _Search._front). Complete assignments are re-checked exactly (math.fsum of the raw
  costs with :func:`within`). When the search finishes inside its budget (children
  evaluated, and the time limit) the incumbent is optimal up to EPS_REL (and no incumbent
  means infeasible); otherwise the reduced problem and the incumbent go to the MILP solver.
- *order*: with one limit a small exact search first (closes most such problems), then beam
  searches widening while they improve the incumbent (a heuristic that only sets the
  incumbent; a beam that never had to drop a child was the exact search), with a short try at
  the exact search before each beam wider than ATTEMPT_WIDTH, then the exact search; each
  exact search runs on a tree rebuilt by fixing with the best incumbent so far.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .highs import load_highspy
from .problem import FEAS_RTOL, limit_scale, within

if TYPE_CHECKING:
    from .ilp import _GOpt as GOpt

# A completion is only searched for when it could beat the incumbent by more than this relative
# amount; "optimal" therefore means: no assignment is better by more than EPS_REL * |UB|.
EPS_REL = 1e-12
# Width of the beam search that looks for an incumbent before the exact search (see _Search).
BEAM_WIDTH = 16
# A beam layer keeps its BEAM_POOL * width best-bounded children (by the LP relaxations) before
# the dominance check and the planes, which then rank the pool (measured over the 54x12
# multi-limit sweep: 96.6 vs 99.3 ms in all, the same node counts; 2 changed them and was
# slower, 8 gained less; the pool taken before the relaxations other than the first made
# some beams miss the incumbent: one instance 11.8 -> 19.3 ms).
BEAM_POOL = 4
# An exact search stops once its projected work passes this multiple of its budget.
PROJECTION_MAX = 4
# After a beam search that improved the incumbent the next one is BEAM_GROWTH times wider.
BEAM_GROWTH = 4
# After a beam at least ATTEMPT_WIDTH wide improved the incumbent, the exact search gets a try
# on ATTEMPT_WORK times that beam's children before the beam widens (see solve_arrays).
# Measured (best of 3): 1000x12 size+bops 455-483 ms vs 522-561 ms without; the 54x12 sweep
# unchanged; over the 200x12 sweep 1.86 vs 1.90 s in all (two instances 15-20 ms slower).
ATTEMPT_WIDTH = 64
ATTEMPT_WORK = 4
# After a beam narrower than ATTEMPT_WIDTH improved the incumbent, the tree is rebuilt when
# that leaves at most REBUILD_SHRINK times the free options it had (see solve_arrays).
REBUILD_SHRINK = 0.7
# Children the first exact search may evaluate before the beam search runs (one limit only;
# see solve_arrays).
PROBE_STATES = 2000
# Neighbourhood search after each improving beam on trees with more than LNS_MIN_FREE free
# groups: the exact search (within LNS_WORK children) over the groups where the beam's
# LNS_TOP best completions, the LP solution, the Lagrangian choice and the incumbent disagree,
# the other groups held at the incumbent (a relaxation-induced neighbourhood, as RINS in MIP
# solvers). Measured (best of 3, two runs): 1000x12 size+bops+lat 0.47-0.50 s vs 0.57-0.61 s
# (the first beam's 200088.525 becomes 200088.11; the optimum is 200088.0947, and the exact
# search needs 1.42M children from 200088.175, 0.42M from 200088.11); size+bops 0.46-0.47 vs
# 0.42-0.45 s, loose within noise. With 100 in place of 300 it also ran on 200x12, where it
# cost 5-100 ms per instance (2.08 vs 1.88 s over twelve), and 54x12 lost 1-3 ms per solve.
LNS_TOP = 8
LNS_WORK = 200_000
LNS_MIN_FREE = 300
# Layers of the search with at most this many states skip the dominance check (it costs more
# than the children it saves: measured 2-4 ms less per solve over the 54x12 multi-limit sweep).
DOMINANCE_MIN = 32
# Planes (see _Search): with several limits, extra Lagrangian bounds at the LP multipliers
# scaled limit by limit by each combination of these factors (measured on the 200x12 bench
# instances with three limits: the exact search at the optimum needs 0.61M children with
# factors 0-2 against 7.9M+ without; 0-3 takes all twelve 200x12 instances in process).
PLANE_FACTORS = (0.0, 1 / 3, 2 / 3, 1.0, 1.5, 2.0, 3.0)
# An exact run stops evaluating the planes once, over at least PLANE_TRIAL children, they cut
# less than PLANE_MIN_CUT of those that the other bounds and dominance keep (measured:
# 0.1-0.4 % on 1000x12, where they only cost, 11-34 % on 200x12 with three limits). Beams
# keep them: there their tighter bounds rank the children, which is how the beams find better
# incumbents (200x12 seed 0 with three limits, width 256: 25273.0 with planes, 25311.4
# without; optimum 25271.9).
PLANE_TRIAL = 10_000
PLANE_MIN_CUT = 0.01
# Entries of the (states x planes) temporary per block (32 MB of float64).
PLANE_BLOCK = 4_000_000
# Consecutive groups share one layer of the search while the product of their option counts
# stays within this.
MERGE_MAX = 36
# Trial multipliers per round of the scalar multiplier search (smallest_fitting; with one limit
# only when the hulls' multiplier does not fit), evaluated as one batch: 5-6 rounds instead of
# ~25 bisection steps (measured ~0.8 ms less per 54x12 solve with one limit, when it ran every
# time; 8 and 32 the same within noise).
SCALAR_POINTS = 16
# Fronts (see _Search): an exact run builds them once it has evaluated FRONT_TRIGGER children
# (smaller runs finish sooner than the fronts build), each holding at most FRONT_MAX points.
# Measured on 1000x12 size+bops+lat (best of 2): 0.64 s against 1.24 s without fronts (the
# exact search at the optimum: 0.32M children instead of 2.66M); 200x12 and the other 1000x12
# instances unchanged within noise. FRONT_MAX 3000 and 6000 were slower (the build cost grows
# faster than the children it saves), as were triggers in the beams too (fronts built for trees
# whose exact search is small: 1000x12 loose 0.35 vs 0.27 s).
FRONT_MAX = 1500
FRONT_TRIGGER = 100_000
# The LP curves of every depth are built at once and kept while they hold at most this many
# breakpoints in all (depths x increments); larger trees build each depth's in turn in a run.
CURVE_CACHE_MAX = 1_000_000
# Rounds of coordinate line searches on the multipliers when there are several limits.
LAGRANGE_ROUNDS = 3
# Relative width at which a coordinate line search on one multiplier stops.
LAGRANGE_TOL = 1e-4
# Pair-move polish: at most this many (move pair) evaluations per call, in scans of all pairs.
PAIR_WORK_MAX = 50_000_000
# A scan of pair_improve applies its best move and then up to PAIR_MULTI - 1 more of the next
# best on untouched groups (measured: 199 vs 205 ms over the 54x12 multi-limit sweep against
# one move per scan, 1.73 vs 1.81 s over twelve 200x12 instances, 1000x12 1-3 % faster).
PAIR_MULTI = 64
# Relative floating-point allowance on the bound (sums over up to ~1e5 terms in float64).
FP_REL = 1e-11


@dataclass
class Arrays:
    """Per-group option arrays after dominance pruning, padded to a rectangle by repeating each
    group's first kept option (duplicates never change a minimum)."""

    groups: list[list[GOpt]]  # kept options per group
    key: str
    res: list[str]
    om: np.ndarray  # (G, K) objective values
    cost: np.ndarray  # (R, G, K) raw costs
    sizes: list[int] = field(default_factory=list)


def prune_dominated(groups: list[list[GOpt]], key: str, res: list[str]) -> Arrays:
    """Sort each group's options by (``key``, then the costs of ``res`` in order; stable), drop
    the dominated ones (lossless, see the module docstring) and build the arrays. The kept
    options stay in that order, so each group's first is its least-``key`` one."""
    G = len(groups)
    K = max(len(g) for g in groups)
    R = len(res)
    sizes = np.array([len(g) for g in groups])
    opts = [o for g in groups for o in g]
    flat = np.array([[o.value(key) for o in opts]] + [[o.costs[r] for o in opts] for r in res],
                    dtype=float).reshape(1 + R, -1)
    valid = np.arange(K)[None, :] < sizes[:, None]
    vals = np.empty((1 + R, G, K))
    vals[:, valid] = flat
    # padding: a copy of the group's first option (sorted after it: duplicates never change a
    # minimum, and later equal options are dominated)
    vals[:, ~valid] = np.broadcast_to(vals[:, :, :1], vals.shape)[:, ~valid]
    order = np.lexsort((*vals[::-1], ~valid), axis=-1)  # real options first, then by value
    vals = np.take_along_axis(vals, np.broadcast_to(order, vals.shape), axis=2)
    # dom[g, j, k]: option j dominates option k.
    le = np.all(vals[:, :, :, None] <= vals[:, :, None, :], axis=0)
    eq = np.all(vals[:, :, :, None] == vals[:, :, None, :], axis=0)
    earlier = np.arange(K)[:, None] < np.arange(K)[None, :]
    dom = le & (~eq | earlier[None]) & valid[:, :, None]
    kept_mask = valid & ~dom.any(axis=1)
    kept_groups: list[list[GOpt]] = [[] for _ in range(G)]
    g_of, at = np.nonzero(kept_mask)  # row-major: each group's kept options in order
    for g, k in zip(g_of.tolist(), order[g_of, at].tolist(), strict=True):
        kept_groups[g].append(groups[g][k])
    n_kept = kept_mask.sum(axis=1)
    kmax = int(n_kept.max())
    idx = np.argsort(~kept_mask, axis=1, kind="stable")[:, :kmax]  # kept positions first
    idx = np.where(np.arange(kmax)[None, :] < n_kept[:, None], idx, idx[:, :1])
    gather = np.take_along_axis(vals, np.broadcast_to(idx, (1 + R, G, kmax)), axis=2)
    return Arrays(kept_groups, key, list(res), gather[0], gather[1:],
                  [len(g) for g in kept_groups])


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
) -> Result:
    """Exact presolve and branch-and-bound of ``arr`` under ``limits`` (keys = ``arr.res``).
    ``start``: a candidate assignment (one option per group, e.g. the previous Pareto point);
    used as an incumbent when it is feasible and made of kept options."""
    t0 = time.perf_counter()
    res = arr.res
    R = len(res)
    groups = arr.groups
    G = len(groups)
    om = arr.om
    raw_cap = np.array([limits[r] for r in res], dtype=float)
    top = arr.cost.max(axis=2).sum(axis=1) if G else np.zeros(R)
    scale = np.array([limit_scale(float(c), float(t)) for c, t in zip(raw_cap, top, strict=True)])
    cn = arr.cost / scale[:, None, None]  # normalised costs
    cap = raw_cap / scale
    cushion = FEAS_RTOL * np.maximum(np.abs(raw_cap), 1e-300) / scale
    info: dict[str, Any] = {"nodes": 0}

    rows = np.arange(G)

    # Exact checks on the raw values (the arrays hold the options' own floats).
    def exact_ok(picks: list[int]) -> bool:
        return all(within(math.fsum(arr.cost[r, rows, picks].tolist()), limits[res[r]])
                   for r in range(R))

    def value(picks: list[int]) -> float:
        return math.fsum(om[rows, picks].tolist())

    # Infeasible outright when a limit is below the sum of per-group minima.
    mins = [math.fsum(float(v) for v in arr.cost[r].min(axis=1)) for r in range(R)]
    if any(not within(mins[r], limits[res[r]]) for r in range(R)):
        return Result("infeasible", None, groups, dict(info, closed_by="shortcut"))
    K = om.shape[1]
    valid = np.arange(K)[None, :] < np.array(arr.sizes)[:, None]  # (G, K): real options
    # Added to values before a minimum is taken, so that none is taken at the padding: it
    # copies a real option, but a matrix product may round a copy a unit lower than the
    # original (seen: a padding index picked, then an IndexError).
    pad = np.where(valid, 0.0, math.inf)
    best0 = [int(k) for k in (om + pad).argmin(axis=1)]
    if exact_ok(best0):
        return Result("optimal", [groups[g][k] for g, k in enumerate(best0)], groups,
                      dict(info, closed_by="shortcut"))

    base = np.arange(G) * K  # flat index of each group's first option
    om_flat = om.ravel()
    cn_flat = np.ascontiguousarray(cn.reshape(R, -1).T)  # (G * K, R)
    inc: list[int] | None = None
    ub = math.inf
    best_l, best_lam = -math.inf, np.zeros(R)

    def visit(lams: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Lagrangian choices at the multipliers ``lams`` (M, R); records the best bound and
        the best choice within the limits. Returns (picks (G, M), their usage in normalised
        units (M, R))."""
        nonlocal best_l, best_lam, inc, ub
        v = om_flat[:, None] + cn_flat @ lams.T + pad.reshape(-1, 1)  # (G * K, M)
        picks = v.reshape(G, K, -1).argmin(axis=1)
        chosen = base[:, None] + picks
        lvals = np.take_along_axis(v, chosen, axis=0).sum(axis=0) - lams @ cap
        m = int(lvals.argmax())
        if lvals[m] > best_l:
            best_l, best_lam = float(lvals[m]), lams[m].copy()
        usage = cn_flat[chosen].sum(axis=0)
        vals = np.where(np.all(usage <= cap + cushion * 0.5, axis=1),
                        om_flat[chosen].sum(axis=0), math.inf)
        m = int(vals.argmin())
        if vals[m] < ub:
            pl = picks[:, m].tolist()
            if exact_ok(pl):
                val = value(pl)
                if val < ub:
                    inc, ub = pl, val
        return picks, usage

    spread = float(np.max(om.max(axis=1) - om.min(axis=1))) or 1.0
    lp_picks: list[int] | None = None
    # Several limits: the LP relaxation's duals are the best multipliers (the Lagrangian dual
    # of a multiple-choice knapsack equals its LP relaxation), and the choices at a few larger
    # multipliers along them seed the incumbent (they fit more often). Measured: 209 vs 224 ms
    # over the twelve 54x12 multi-limit bench instances against the scalar search first (the
    # order before), 1.76 vs 1.80 s over twelve 200x12 ones, 1000x12 the same.
    lp = lp_duals(om, cn, cap, arr.sizes) if R > 1 else None
    if lp is not None:
        info["lp_duals"] = True
        lp_picks = lp[1]
        push = np.array([1.01, 1.03, 1.1, 1.3, 2.0])[:, None]
        visit(np.vstack([lp[0][None], lp[0][None] * push + (push - 1) * lp[0].mean()]))
    else:
        # One limit, or no LP: the smallest mu whose choice at lam = mu * (1, ..., 1) fits
        # (with one limit this is the LP dual optimum, the best bound: read off the hulls,
        # measured 2.3 vs 2.5 ms per HAWQ-V3 instance; the scalar search, SCALAR_POINTS trial
        # values per round, when that does not fit); with several limits then coordinate line
        # searches (bisection on the subgradient's sign). They stall at the dual's kinks:
        # measured 7x the LP's gap on 1000x12 size+bops.
        def fits(mus: np.ndarray) -> np.ndarray:
            return np.all(visit(np.repeat(mus[:, None], R, axis=1))[1] <= cap, axis=1)

        hi = None
        if R == 1:  # the LP dual straight from the hulls, checked like a search step
            mu = lp_dual_one(om, cn[0], cap[0], arr.sizes)
            if mu is not None:
                trial = np.array([mu, mu * (1 + 1e-9) + 1e-300])
                ok = fits(trial)
                hi = float(trial[int(ok.argmax())]) if ok.any() else None
        if hi is None:
            hi = smallest_fitting(fits, spread, grow_steps=60, rel_tol=1e-6,
                                  points=SCALAR_POINTS)
        if R > 1 and hi is not None:
            for _ in range(LAGRANGE_ROUNDS):
                before = best_l
                for r in range(R):
                    lam = best_lam.copy()
                    a, b = 0.0, max(4.0 * lam[r], hi, 1e-300)
                    for _ in range(40):
                        lam[r] = 0.5 * (a + b)
                        u = visit(lam[None])[1][0]
                        if u[r] > cap[r]:
                            a = lam[r]
                        else:
                            b = lam[r]
                        if b - a <= LAGRANGE_TOL * b:
                            break
                if best_l <= before + 1e-12 * abs(before):
                    break
    info["lagrange_evals_s"] = time.perf_counter() - t0

    lam = best_lam
    v = om + np.tensordot(lam, cn, axes=1) + pad
    # Reduced costs at the best multipliers (inf at the padding).
    m = v.min(axis=1)
    rc = v - m[:, None]
    lbound = float(m.sum() - lam @ cap)
    tol = FP_REL * (abs(lbound) + float(np.abs(m).sum()) + float(lam @ np.abs(cap)) + spread) \
        + float(lam @ cushion)
    sizes = arr.sizes

    def rc_limit(ub: float) -> float:
        """The largest reduced cost an option can have and still be in an assignment better
        than ub (reduced-cost fixing: completions whose bound is >= ub - EPS_REL|ub| cannot
        improve ub meaningfully); inf without an incumbent."""
        return math.inf if math.isinf(ub) else ub - EPS_REL * abs(ub) - lbound + tol

    def useful(ub: float) -> np.ndarray:
        """(G, K) mask of the options that can be in an assignment better than ub: the only
        moves worth trying when improving an incumbent."""
        return rc <= rc_limit(ub)

    # Seeds: the rounded LP solution (without it the choice at the best bound, usually just
    # over a limit), the best feasible Lagrangian choice (along the scalar search, or at the LP
    # multipliers pushed up), the caller's start; each repaired, the best one polished. (The
    # choice at the LP multipliers differs from the rounded LP solution in a few groups and
    # was not worth its repair: measured 198 vs 209 ms over the 54x12 multi-limit sweep, 1.62
    # vs 1.69 s over twelve 200x12 ones.)
    lag_picks = v.argmin(axis=1).tolist()
    starts = [lp_picks if lp_picks is not None else lag_picks]
    if inc is not None:
        starts.append(list(inc))
    if start is not None:
        pos = [{id(o): k for k, o in enumerate(g)} for g in groups]
        ks = [p.get(id(o)) for p, o in zip(pos, start, strict=True)]
        if all(k is not None for k in ks):
            starts.append(ks)
    seeds = []
    for s in dict.fromkeys(map(tuple, starts)):  # each distinct start once
        cand = repair(om, cn, cap, arr.sizes, list(s))
        if cand is not None and exact_ok(cand):
            seeds.append((value(cand), cand))
    if seeds:
        val, cand = min(seeds)
        cand = pair_improve(om, cn, cap, sizes, cand, allowed=useful(val), lam=lam)
        if exact_ok(cand):
            val = value(cand)
            if val < ub:
                inc, ub = cand, val

    def fixed(ub: float, inc: list[int] | None) -> list[list[int]]:
        """Options per group that can be in an assignment better than ub (see rc_limit),
        and the incumbent's."""
        ok = useful(ub) & valid
        if inc is not None:
            ok[rows, inc] = True
        none = ~ok.any(axis=1)  # cannot happen when inc is None (thr = inf); defensive
        if none.any():
            ok[none, rc[none].argmin(axis=1)] = True  # (rc is inf at the padding)
        g_of, k_of = np.nonzero(ok)
        return np.split(k_of, np.cumsum(np.bincount(g_of, minlength=G))[:-1])

    def better(search: _Search, inc: list[int] | None, ub: float) -> tuple[list[int] | None, float]:
        """The best completion of a finished run that is within the limits, if it beats ub."""
        for picks in search.completions():
            if exact_ok(picks):
                val = value(picks)
                if math.isinf(ub) or val < ub - EPS_REL * abs(ub):
                    return picks, val
                break
        return inc, ub

    planes = plane_grid(lam)

    def tree(keep: list[list[int]]) -> _Search:
        """The search over the options ``keep`` (per group; e.g. fixed(ub, inc): those that can
        still beat ub)."""
        return _Search(arr, keep, cn, cap, cushion, lam, planes)

    def neighbourhood(search: _Search, inc: list[int], ub: float,
                      ) -> tuple[list[int], float, int]:
        """The neighbourhood search after a beam (see LNS_TOP): the exact search over the
        groups where the beam's best completions, the LP solution, the Lagrangian choice and
        the incumbent disagree, the others held at the incumbent. Returns the incumbent (the
        same or better), its value and the children evaluated."""
        comps = list(itertools.islice(search.completions(), LNS_TOP))
        ref = [lag_picks] + ([lp_picks] if lp_picks is not None else []) + comps
        open_g = {g for g in range(G) if len({r[g] for r in ref} | {inc[g]}) > 1}
        if not open_g:
            return inc, ub, 0
        fx = fixed(ub, inc)
        sub = tree([fx[g] if g in open_g else [inc[g]] for g in range(G)])
        states, finished = sub.run(ub, LNS_WORK, deadline=deadline)
        if finished:
            inc, ub = better(sub, inc, ub)
        return inc, ub, states

    info["bound"] = lbound
    info["first_incumbent"] = ub
    keep = fixed(ub, inc)
    info["free_groups"] = sum(len(k) > 1 for k in keep)
    info["kept"] = sum(len(k) for k in keep)
    deadline = None if time_limit_s is None else t0 + time_limit_s
    search = tree(keep)
    budget = node_limit
    finished = False
    if budget > 0:
        # 1. With one limit, the exact search on a small budget: the incumbent is then
        # usually optimal or nearly, and this closes the problem at once. (With several
        # limits it rarely closed one: measured, skipping it there saves 3.5 % over the
        # 54x12 multi-limit sweep.)
        if R == 1:
            states, finished = search.run(ub, min(budget, PROBE_STATES), deadline=deadline)
            budget -= states
            if finished:
                inc, ub = better(search, inc, ub)
        if not finished:
            # 2. Beam searches for a near-optimal incumbent (the exact search's size depends on
            # it: measured on 1000x12 size+bops, 0.9M children with the optimum as incumbent,
            # over 88M with one 4e-5 above it). The beam widens BEAM_GROWTH times while it
            # improves the incumbent, within half of the budget.
            width, beam_budget = BEAM_WIDTH, budget // 2
            tree_ub = ub  # the incumbent value the tree was built with
            while beam_budget > 0:
                states, done = search.run(ub, beam_budget, beam_width=width, deadline=deadline)
                budget -= states
                beam_budget -= states
                if not done:
                    break
                before = ub
                inc, ub = better(search, inc, ub)
                if not search.truncated:  # the beam held every child: an exact search
                    finished = True
                    break
                if inc is not None and LNS_TOP and info["free_groups"] > LNS_MIN_FREE:
                    inc, ub, lns_states = neighbourhood(search, inc, ub)
                    budget -= lns_states
                if inc is not None:
                    cand = pair_improve(om, cn, cap, sizes, inc, allowed=useful(ub), lam=lam)
                    if exact_ok(cand) and value(cand) < ub:
                        inc, ub = cand, value(cand)
                if ub >= before:
                    break
                if width >= ATTEMPT_WIDTH:
                    # Before a wider beam, a try at the exact search on the tree rebuilt with
                    # this incumbent, on a budget of ATTEMPT_WORK times this beam's children
                    # (the next beam would take about BEAM_GROWTH times). If it cannot finish,
                    # the smaller tree still makes the next beams cheaper.
                    search = tree(fixed(ub, inc))
                    tree_ub = ub
                    states, finished = search.run(ub, min(budget, ATTEMPT_WORK * states),
                                                  deadline=deadline)
                    budget -= states
                    beam_budget -= states
                    if finished:
                        inc, ub = better(search, inc, ub)
                        break
                else:
                    # A narrower beam improved: rebuild the tree for the next beams only if
                    # the incumbent fixes many options (measured on 1000x12 size+bops+lat:
                    # 1545 -> 448 free options after the first beam, 0.62 vs 0.70 s; 20-30 %
                    # on the other bench instances, where a rebuild did not pay).
                    keep_now = fixed(ub, inc)
                    if sum(len(k) - 1 for k in keep_now) <= REBUILD_SHRINK * search.free_options:
                        search = tree(keep_now)
                        tree_ub = ub
                width *= BEAM_GROWTH
            # 3. The exact search on the rest of the budget.
            if budget > 0 and not finished:
                if ub < tree_ub:
                    # the better incumbent fixes more options: a smaller tree (measured on
                    # 1000x12 size+bops: 0.89M children instead of 1.07M, which overran the
                    # budget)
                    search = tree(fixed(ub, inc))
                states, finished = search.run(ub, budget, deadline=deadline)
                budget -= states
                if finished:
                    inc, ub = better(search, inc, ub)
    info["nodes"] = node_limit - budget
    if inc is not None:
        info["incumbent"] = ub
    if finished:
        if inc is None:
            return Result("infeasible", None, groups, dict(info, closed_by="branch-and-bound"))
        return Result("optimal", [groups[g][k] for g, k in enumerate(inc)], groups,
                      dict(info, closed_by="branch-and-bound"))
    # Open: refix with the final incumbent and hand over.
    reduced = [[groups[g][k] for k in ks] for g, ks in enumerate(fixed(ub, inc))]
    incumbent = None if inc is None else [groups[g][k] for g, k in enumerate(inc)]
    info["kept"] = sum(len(g) for g in reduced)
    return Result("open", incumbent, reduced, info)


def plane_grid(lam: np.ndarray) -> np.ndarray:
    """(P, R) multipliers for the planes: ``lam`` scaled limit by limit by every combination
    of PLANE_FACTORS, less the multiples of ``lam`` itself (the first relaxation of _Search
    already optimises along them). Empty with one limit: its first relaxation is exact."""
    R = len(lam)
    if R < 2:
        return np.zeros((0, R))
    f = np.array(PLANE_FACTORS)
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
    sw, _, (eff, dw, _, _) = _hulls(np.where(pad, np.inf, cost), om)
    used = float(sw.sum())
    if used > cap:
        return None
    order = np.argsort(-eff, kind="stable")
    over = np.flatnonzero(used + np.cumsum(dw[order]) > cap)
    return float(eff[order[over[0]]]) if over.size else None


def lp_duals(om: np.ndarray, cn: np.ndarray, cap: np.ndarray, sizes: list[int],
             backend: str | None = None) -> tuple[np.ndarray, list[int]] | None:
    """Multipliers of the limits at the optimum of the LP relaxation (one option per group
    relaxed to a convex combination), and the LP solution rounded to each group's largest
    share; None when it does not solve. The LP goes to HiGHS: directly through highspy when it
    is installed (measured 1.9 vs 5.6 ms on 54x12, 44 vs 51 ms on 1000x12, and no ~0.4 s
    scipy import), else through scipy's ``linprog``; ``backend`` ("highspy" / "scipy") forces
    one. Only a proposal: the caller evaluates the bound at these multipliers itself, so an
    inaccurate dual costs tightness, never correctness."""
    G, K = om.shape
    R = cn.shape[0]
    valid = np.arange(K)[None, :] < np.array(sizes)[:, None]
    idx = np.flatnonzero(valid.ravel())
    # Omega shifted by each group's minimum and scaled to ~1 (duals scaled back): HiGHS's
    # tolerances are absolute.
    o = om - om.min(axis=1, keepdims=True)
    o_scale = float(o.max()) or 1.0
    cost = (o / o_scale).ravel()[idx]
    a_ub = cn.reshape(R, -1)[:, idx]
    if not (np.all(np.isfinite(cost)) and np.all(np.isfinite(a_ub))
            and np.all(np.isfinite(cap))):
        return None  # the caller falls back to the line searches
    if backend is None:
        backend = "scipy" if load_highspy() is None else "highspy"
    solved = (_lp_highspy if backend == "highspy" else _lp_scipy)(cost, a_ub, cap, idx // K, G)
    if solved is None:
        return None
    duals, x = solved
    lam = -duals * o_scale
    if not np.all(np.isfinite(lam)):
        return None
    share = np.full(G * K, -1.0)
    share[idx] = x
    return np.maximum(lam, 0.0), share.reshape(G, K).argmax(axis=1).tolist()


_HIGHS_LOCAL = threading.local()


def _lp_highspy(cost: np.ndarray, a_ub: np.ndarray, b_ub: np.ndarray, group: np.ndarray,
                G: int) -> tuple[np.ndarray, np.ndarray] | None:
    """min cost . x, sum of x over each group = 1, a_ub x <= b_ub, 0 <= x <= 1 through
    highspy; (duals of the a_ub rows, x) or None."""
    highspy = load_highspy()
    if highspy is None:
        return None
    R, N = a_ub.shape
    # One instance per thread, cleared (options too) for each LP: building a Highs costs
    # ~40 us in Python, clear() ~1 us.
    h = getattr(_HIGHS_LOCAL, "h", None)
    if h is None:
        h = _HIGHS_LOCAL.h = highspy.Highs()
    else:
        h.clear()
    h.setOptionValue("output_flag", False)
    # presolve only costs here (measured through scipy: 2.9 vs 3.7 ms on 54x12)
    h.setOptionValue("presolve", "off")
    h.setOptionValue("threads", 1)
    lp = highspy.HighsLp()
    lp.num_col_ = N
    lp.num_row_ = G + R
    lp.col_cost_ = cost
    lp.col_lower_ = np.zeros(N)
    lp.col_upper_ = np.ones(N)
    lp.row_lower_ = np.concatenate([np.ones(G), np.full(R, -highspy.kHighsInf)])
    lp.row_upper_ = np.concatenate([np.ones(G), b_ub])
    # column-wise: each column has its group's row and the R limit rows
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = np.arange(0, N * (R + 1) + 1, R + 1, dtype=np.int32)
    lp.a_matrix_.index_ = np.column_stack(
        [group] + [np.full(N, G + r) for r in range(R)]).ravel().astype(np.int32)
    lp.a_matrix_.value_ = np.column_stack([np.ones(N), a_ub.T]).ravel()
    if h.passModel(lp) != highspy.HighsStatus.kOk or h.run() != highspy.HighsStatus.kOk \
            or h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
        return None
    sol = h.getSolution()
    return np.asarray(sol.row_dual[G:], dtype=float), np.asarray(sol.col_value, dtype=float)


def _lp_scipy(cost: np.ndarray, a_ub: np.ndarray, b_ub: np.ndarray, group: np.ndarray,
              G: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The same LP as :func:`_lp_highspy` through scipy's ``linprog`` (HiGHS inside)."""
    from scipy import sparse  # lazily: only problems with several limits get here
    from scipy.optimize import linprog

    N = cost.size
    one_each = sparse.csr_matrix((np.ones(N), (group, np.arange(N))), shape=(G, N))
    try:
        lp = linprog(cost, A_ub=a_ub, b_ub=b_ub, A_eq=one_each, b_eq=np.ones(G), bounds=(0, 1),
                     method="highs", options={"presolve": False})
    except ValueError:
        return None
    if lp.status != 0:
        return None
    return np.asarray(lp.ineqlin.marginals, dtype=float), np.asarray(lp.x, dtype=float)


def repair(
    om: np.ndarray, cn: np.ndarray, cap: np.ndarray, sizes: list[int], picks: list[int],
) -> list[int] | None:
    """Make an assignment fit the limits (normalised units), then lower its Omega, by single-
    group moves. Repair takes the move that removes the most excess per unit of Omega added
    (moves that remove excess without adding Omega first); improvement takes fitting moves in
    order of Omega removed per unit of cost added (the greedy of knapsack heuristics), in
    passes of at most one move per group, until no single fitting move lowers Omega.
    Returns None when the excess cannot be reduced any more."""
    G, K = om.shape
    rows = np.arange(G)
    pk = np.array(picks)
    invalid = np.arange(K)[None, :] >= np.array(sizes)[:, None]
    fitted = False
    for _ in range(2 * G * K):
        cur = cn[:, rows, pk]  # (R, G)
        used = cur.sum(axis=1)
        delta = cn - cur[:, :, None]  # (R, G, K): cost change of each move
        d_om = om - om[rows, pk][:, None]
        over = np.maximum(used - cap, 0.0)
        # (a ratio may overflow to inf on a tiny denominator: still the best score, rightly)
        if not fitted and over.any():
            after = np.maximum(used[:, None, None] + delta - cap[:, None, None], 0.0)
            gain = over.sum() - after.sum(axis=0)
            ok = (gain > 1e-15) & ~invalid
            free = ok & (d_om <= 0)  # removes excess without adding Omega: first
            with np.errstate(over="ignore"):
                score = np.where(free, gain, -np.inf) if free.any() else \
                    np.where(ok, gain / np.where(ok, d_om, 1.0), -np.inf)
        else:
            fitted = True
            slack = cap - used
            fits = np.all(delta <= slack[:, None, None], axis=0)
            extra = np.maximum(delta, 0.0).sum(axis=0)
            ok = (d_om < 0) & fits & ~invalid
            free = ok & (extra <= 0)  # lowers Omega at no cost: first
            with np.errstate(over="ignore"):
                score = np.where(free, -d_om, -np.inf) if free.any() else \
                    np.where(ok, -d_om / np.where(ok, extra, 1.0), -np.inf)
            # A pass applies each group's best move, best score first, while it still fits:
            # a move's score does not depend on the other groups' picks, so this is the
            # one-at-a-time greedy except that a group's next move waits for the next pass
            # (measured: 149-343 single moves took 26-63 ms on 1000x12).
            k_best = score.argmax(axis=1)
            s_best = score[rows, k_best]
            order = np.argsort(-s_best, kind="stable")
            order = order[s_best[order] > -np.inf]
            if not order.size:
                return pk.tolist()
            room = slack.tolist()
            moves = delta[:, order, k_best[order]].T.tolist()
            for g, k, d in zip(order.tolist(), k_best[order].tolist(), moves, strict=True):
                if all(x <= r for x, r in zip(d, room, strict=True)):
                    room = [r - x for x, r in zip(d, room, strict=True)]
                    pk[g] = k
            continue
        best = int(np.argmax(score))
        if score.flat[best] == -np.inf:
            return None
        pk[best // K] = best % K
    return pk.tolist() if fitted else None


def pair_improve(
    om: np.ndarray, cn: np.ndarray, cap: np.ndarray, sizes: list[int], picks: list[int],
    rounds: int = 64,
    stats: list[int] | None = None,
    allowed: np.ndarray | None = None,
    lam: np.ndarray | None = None,
) -> list[int]:
    """Improve a feasible assignment by single or paired option changes (two groups at once)
    that lower Omega and stay within the limits, until none is left (or ``rounds``): each scan
    applies the best one, then the next best on groups the scan has not touched while they
    still fit (see PAIR_MULTI). Vectorised over the moves and the candidate pairs (found by a
    join on the moves' Lagrangian deltas, see below). Returns ``picks`` unchanged if it does
    not fit.
    ``allowed`` (G, K): the options moves may go to (default all).
    ``lam`` (R,): multipliers >= 0 of the limits (e.g. the best Lagrangian ones); only the
    speed depends on them (default zeros).
    ``stats[0]`` (if given) is increased by the number of scans done."""
    G, K = om.shape
    R = cn.shape[0]
    lam_ = np.zeros(R) if lam is None else np.maximum(np.asarray(lam, dtype=float), 0.0)
    pk = np.array(picks)
    rows = np.arange(G)
    valid = np.arange(K)[None, :] < np.array(sizes)[:, None]
    if allowed is not None:
        valid = valid & allowed
    gid = np.broadcast_to(rows[:, None], (G, K))
    moves = int(valid.sum())
    # a scan is O(moves^2) at worst (lam = 0): cap the scans on large problems (a heuristic,
    # exactness is not at stake)
    rounds = max(2, min(rounds, PAIR_WORK_MAX // (moves * moves + 1)))
    for _ in range(rounds):
        if stats is not None:
            stats[0] += 1
        used = cn[:, rows, pk].sum(axis=1)
        slack = cap - used
        if np.any(slack < 0):
            break
        d_om = om - om[rows, pk][:, None]
        d_c = cn - cn[:, rows, pk][:, :, None]
        mask = valid & (np.arange(K)[None, :] != pk[:, None])
        mo = d_om[mask]
        mc = d_c[:, mask]
        mg = gid[mask]
        mk = np.broadcast_to(np.arange(K)[None, :], (G, K))[mask]
        # moves that could be part of an improving pair: keep the ones that lower Omega, or
        # that free some resource (the partner then spends it)
        least = -1e-12 * (1.0 + abs(float(om[rows, pk].sum())))  # smallest gain that counts
        single = np.flatnonzero((mo < least) & np.all(mc <= slack[:, None], axis=0))
        gains, costs, first, second = [mo[single]], [mc[:, single]], [single], [single]
        down = np.flatnonzero(mo < 0)
        free_ = np.flatnonzero(np.any(mc < 0, axis=0))
        if down.size and free_.size:
            # An improving pair within the limits has s_d + s_f < lam . slack, for the moves'
            # Lagrangian deltas s = d_Omega + lam . d_cost (its Omega and limit conditions
            # added with weights 1 and lam >= 0). Near a good incumbent most moves have s > 0,
            # so a join on that one sorted condition leaves few pairs to check in full
            # (measured on 1000x12 size+bops: 3.9 vs 80 ms for the set-up call; 2.4M pairs,
            # of which ~40 % pass each condition alone and 0-135 all).
            s_move = mo + lam_ @ mc
            s_f = s_move[free_]
            by = np.argsort(s_f, kind="stable")
            thr = float(lam_ @ slack)
            thr += 1e-9 * (abs(thr) + float(np.abs(s_move).max()))  # rounding: keep borderline
            cnt = np.searchsorted(s_f[by], thr - s_move[down], side="left")
            a = np.repeat(np.arange(down.size), cnt)  # pairs (down[a], free_[b])
            b = by[np.arange(a.size) - np.repeat(np.cumsum(cnt) - cnt, cnt)]
            a, b = down[a], free_[b]
            dsum = mo[a] + mo[b]
            ok = (mg[a] != mg[b]) & (dsum < least)
            for r in range(R):
                ok &= mc[r, a] + mc[r, b] <= slack[r]
            sel = np.flatnonzero(ok)
            sel = sel[np.lexsort((b[sel], a[sel]))]  # by move index: ties in gain break alike
            a, b = a[sel], b[sel]
            gains.append(dsum[sel])
            costs.append(mc[:, a] + mc[:, b])
            first.append(a)
            second.append(b)
        gain = np.concatenate(gains)
        if not gain.size:
            break
        # The best move first, then, in order of gain, each further one on groups no move of
        # this scan touched while it still fits (the moves' deltas stay exact: their groups'
        # picks are unchanged).
        top = np.argsort(gain, kind="stable")[:PAIR_MULTI]
        cost = np.concatenate(costs, axis=1)[:, top].T.tolist()
        one = np.concatenate(first)[top]
        two = np.concatenate(second)[top]
        room = slack.tolist()
        touched: set[int] = set()
        for c, i, j in zip(cost, one.tolist(), two.tolist(), strict=True):
            gs = {int(mg[i]), int(mg[j])}
            if touched & gs or any(x > r for x, r in zip(c, room, strict=True)):
                continue
            room = [r - x for x, r in zip(c, room, strict=True)]
            touched |= gs
            pk[mg[i]] = mk[i]
            pk[mg[j]] = mk[j]
    return pk.tolist()


def _hulls(w: np.ndarray, o: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, ...]]:
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


class _Search:
    """The branch-and-bound tree over the free groups, searched breadth-first: a layer of the
    tree (all surviving partial assignments of the first d groups in branching order) is held
    as arrays, so one layer costs a few numpy operations whatever its width.

    A child (partial assignment) is cut when the smallest possible use of the remaining groups
    pushes a limit over, or when a lower bound on every completion reaches ``cut``. The bounds
    are the LP relaxations of single-constraint knapsacks (:func:`_hulls`, Dyer /
    Zemel) over the remaining groups, each keeping one weighted sum of the limits and moving
    the rest into the objective with fixed multipliers: first the surrogate of all limits along
    the best multipliers; with several limits also each limit kept exactly, once with the
    others dropped and once with them Lagrangian-relaxed. Every assignment within the limits
    meets each of these relaxations, so each value, and their maximum, is a valid lower bound;
    with one limit the first is the exact LP bound of the subtree. With several limits,
    *planes* add the plain Lagrangian bound S_d(lam) - lam . (room left) at a grid of fixed
    multipliers (:func:`plane_grid`): one matrix product per layer, S_d precomputed for every
    depth; the LP multipliers of a subtree drift far from the root's (measured: 0x-1.9x per
    limit at depths 0-9 of a 200x12 instance), which the rays alone do not follow. As a
    function of the remaining capacity a knapsack's LP value is piecewise linear, so a layer's
    ray bounds are one ``np.interp`` per relaxation. Once an exact run has evaluated
    FRONT_TRIGGER children, the relaxations that keep one limit exactly use their integer
    optimum instead, a step function of the capacity (*fronts*, :meth:`_front`), for the
    depths where it has at most FRONT_MAX steps: near the leaves, where the LP curves leave
    most states alive although almost none has a completion below the incumbent.

    ``run(beam_width=B)`` keeps only the B best-bounded children of each layer: a heuristic
    (beam search) that finds good incumbents fast. ``run()`` keeps every child that can beat
    the incumbent: exact, within a budget of children evaluated."""

    def __init__(self, arr: Arrays, keep: list[list[int]], cn: np.ndarray, cap: np.ndarray,
                 cushion: np.ndarray, lam: np.ndarray, planes: np.ndarray | None = None,
                 ) -> None:
        R = len(arr.res)
        G = len(arr.groups)
        om = arr.om
        # Every group's kept options padded to a rectangle: kidx (G, width) option indices,
        # real (G, width) which are real, a_om / a_c their values and costs (padding: inf / 0).
        lens = np.array([len(k) for k in keep])
        flat_k = np.concatenate([np.asarray(k, dtype=np.intp) for k in keep])
        offs = np.cumsum(lens) - lens
        width = int(lens.max())
        real = np.arange(width)[None, :] < lens[:, None]
        kidx = np.zeros((G, width), dtype=np.intp)
        kidx[real] = flat_k
        a_om = np.where(real, om[np.arange(G)[:, None], kidx], math.inf)
        a_c = np.moveaxis(cn[:, np.arange(G)[:, None], kidx], 0, 2) * real[:, :, None]
        self.base = flat_k[offs].tolist()  # fixed groups' only option
        self.free_options = int((lens - 1).sum())  # options beyond one per group
        fixed = np.flatnonzero(lens == 1)
        self.om_fixed = float(a_om[fixed, 0].sum())
        fixed_use = a_c[fixed, 0].sum(axis=0)
        # Limits in normalised units with the cushion and a little float slack: the search
        # never cuts a point within() accepts; complete assignments are re-checked exactly.
        self.room = (cap + cushion) * (1 + 1e-12) + 1e-15 - fixed_use
        top = float(lam.max()) if R else 0.0
        dirs = [lam / top if top > 0 else np.ones(R)]
        mults = [np.zeros(R)]
        if R > 1:
            for r in range(R):
                e_r = np.zeros(R)
                e_r[r] = 1.0
                others = lam.copy()
                others[r] = 0.0
                dirs += [e_r, e_r]
                mults += [np.zeros(R), others]
        self.D = np.array(dirs)  # (J, R): the kept weighted sum of each relaxation
        self.L = np.array(mults)  # (J, R): multipliers of the relaxed limits
        J = len(dirs)

        # Branch first on the heaviest groups (largest spread in some limit): once they are
        # fixed, the rest is fine-grained and the LP bounds are tight.
        free = np.flatnonzero(lens > 1)
        spread = (np.where(real[:, :, None], a_c, -np.inf).max(axis=1)
                  - np.where(real[:, :, None], a_c, np.inf).min(axis=1)).max(axis=1)
        order = free[np.argsort(-spread[free], kind="stable")].tolist()
        # Positions of the tree: consecutive groups in that order merged while the product of
        # their option counts stays within MERGE_MAX (a layer costs a fixed number of numpy
        # calls, so fewer, wider layers are faster; the LP bound of merged groups is the same,
        # their hulls being Minkowski sums). A merged option is a mixed-radix code over the
        # members' kept options.
        self.members: list[list[tuple[int, np.ndarray]]] = []  # (group, its kept options)
        self.code: list[np.ndarray] = []  # (K,) code of each option of the position
        # (K, 1 + R) per position: each option's value and normalised costs
        self.vc: list[np.ndarray] = []
        a_vc = np.concatenate([a_om[:, :, None], a_c], axis=2)
        pos_of = []  # position of each group in order
        for g in order:
            k = int(lens[g])
            ks, g_vc = kidx[g, :k], a_vc[g, :k]
            if self.members and len(self.vc[-1]) * k <= MERGE_MAX:
                self.members[-1].append((g, ks))
                self.code[-1] = (self.code[-1][:, None] * k + np.arange(k)).ravel()
                self.vc[-1] = (self.vc[-1][:, None, :] + g_vc[None, :, :]).reshape(-1, 1 + R)
            else:
                self.members.append([(g, ks)])
                self.code.append(np.arange(k))
                self.vc.append(g_vc)
            pos_of.append(len(self.members) - 1)
        self.om = [vc[:, 0] for vc in self.vc]  # (K,) values
        self.c = [vc[:, 1:] for vc in self.vc]  # (K, R) normalised costs
        n = len(self.members)
        F = len(order)
        # per-position sums of per-group values (a merged position's minimum of a separable
        # sum is the sum of its members' minima)
        first_of = np.flatnonzero(np.diff(pos_of, prepend=-1)) if F else np.zeros(0, np.intp)

        def per_position(x: np.ndarray) -> np.ndarray:
            out = np.zeros((n + 1,) + x.shape[1:])
            if F:
                out[:n] = np.add.reduceat(x, first_of, axis=0)
            return out

        g_om, g_c, pad = a_om[order], a_c[order], ~real[order]  # (F, width[, R])
        minc = per_position(np.where(pad[:, :, None], np.inf, g_c).min(axis=1))
        # LP hulls per group, all relaxations at once (rows j * F + f for the f-th free group
        # in branching order); a position's hull is the Minkowski sum of its members' hulls:
        # their starts added, their increments merged.
        pos_of = np.array(pos_of, dtype=np.intp)
        w_all = np.where(pad[None], np.inf, np.einsum("fkr,jr->jfk", g_c, self.D))
        o_all = g_om[None] + np.einsum("fkr,jr->jfk", g_c, self.L)
        sw, so, (eff, dw, do, row) = _hulls(w_all.reshape(J * F, width),
                                           o_all.reshape(J * F, width))
        start = np.zeros((2, J, n + 1))
        slot = (np.arange(J)[:, None] * (n + 1) + pos_of[None, :]).ravel()
        start[0] = np.bincount(slot, sw, minlength=J * (n + 1)).reshape(J, n + 1)
        start[1] = np.bincount(slot, so, minlength=J * (n + 1)).reshape(J, n + 1)
        # suffix sums over positions >= d: smallest use per limit, hull starting points
        self.min_rest = np.cumsum(minc[::-1], axis=0)[::-1]
        self.s_w, self.s_o = np.cumsum(start[:, :, ::-1], axis=2)[:, :, ::-1]
        rel = row // max(F, 1)
        by = np.lexsort((-eff, rel))  # per relaxation, decreasing efficiency (stable)
        bounds = np.searchsorted(rel[by], np.arange(J + 1))
        pos = pos_of[row % max(F, 1)]
        self.incs = []
        for j in range(J):
            sel = by[bounds[j]:bounds[j + 1]]
            self.incs.append((dw[sel], do[sel], pos[sel]))
        self.lroom = self.L @ self.room
        self.room_dir = self.D @ self.room
        # A state is a row (value, use of each limit); its projections: column j the capacity
        # spent along relaxation j's direction (use . D_j), column J + j its value plus the
        # relaxed limits' share (value + use . L_j).
        proj = np.zeros((1 + R, 2 * J))
        proj[1:, :J] = self.D.T
        proj[0, J:] = 1.0
        proj[1:, J:] = self.L.T
        # the first relaxation's projections are sums over the parent and the option: each
        # position's options projected once
        self.m0 = proj[:, [0, J]]
        self.q0 = [vc @ self.m0 for vc in self.vc]
        self.m_rest = proj[:, [j for j in range(2 * J) if j % J]]  # the other relaxations
        self.limit_at = self.room - self.min_rest[1:]  # use allowed after position d, (n, R)
        self.fptol = FP_REL * (float(np.abs(om).max(axis=1).sum()) + abs(self.om_fixed)) + 1e-300
        self.n = n
        counts = [len(o) for o in self.om]
        self.options_after = np.cumsum(counts[::-1])[::-1][1:].tolist() + [0]  # positions > d
        self._curves: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        self._spent: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        self._cache = n * sum(len(t[0]) for t in self.incs) <= CURVE_CACHE_MAX
        # Planes: plane_const[d, p] = S_d(lam_p) - lam_p . room, where S_d(lam) is the sum over
        # positions >= d of min_k (Omega + lam . c).
        P = 0 if planes is None else len(planes)
        self.plane_lam = np.zeros((0, R)) if planes is None else np.asarray(planes, float)
        self.plane_const = np.zeros((n + 1, P))
        self.plane_m = np.vstack([np.ones((1, P)), self.plane_lam.T])  # (1 + R, P)
        if P:
            best_g = np.full((F, P), np.inf)
            for k in range(width):  # (small temporaries: one option slot at a time)
                np.minimum(best_g, g_om[:, k, None] + g_c[:, k] @ self.plane_lam.T, out=best_g)
            best = per_position(best_g)
            self.plane_const = np.cumsum(best[::-1], axis=0)[::-1] - self.plane_lam @ self.room
        # Fronts: for the relaxations that keep one limit exactly and move the others into
        # the objective (the only one with a single limit), front[d] = (weight, value) steps
        # of the exact integer optimum of the positions >= d; built on demand (_ensure_fronts).
        self.front_rays = [0] if R == 1 else [2 * r + 2 for r in range(R)]
        self.fronts: dict[int, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
        self.front_cut = -math.inf  # the fronts serve runs with a cut at most this

    def _ensure_fronts(self, cut: float) -> None:
        """Build the fronts for runs with a cut of at most ``cut`` (unless they already are)."""
        if cut <= self.front_cut:
            return
        self.fronts = {j: self._front(j, cut) for j in self.front_rays}
        self.front_cut = cut

    def _front(self, j: int, cut: float) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Relaxation j solved exactly (in integers) over the positions >= d, as a step function
        of the capacity along its direction: {d: (weights ascending, values descending)}, the
        Pareto front of the sums of one option per position. Built from the last position
        backward while it holds at most FRONT_MAX points (the depths before use the LP
        curve). A sum whose best completion to a full assignment is >= ``cut`` even when the
        positions < d are LP-relaxed is dropped: it cannot give a bound below the cut to any
        state (the LP prefix value only falls as its capacity grows), and the sums built from
        it for earlier depths would be dropped too (the LP prefix absorbs the added option).
        Measured on 1000x12 size+bops+lat with the optimal incumbent: 14 positions after depth
        58 have fronts of at most 1383 points without dropping, and they cut 96 % of the 4452
        states that the LP curves keep there."""
        Dj, Lj = self.D[j], self.L[j]
        dw, do, pos = self.incs[j]
        out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        wt = np.zeros(1)
        val = np.zeros(1)
        for d in range(self.n - 1, 0, -1):  # runs look up depths >= 1
            wt = (wt[:, None] + self.c[d] @ Dj).ravel()
            val = (val[:, None] + (self.om[d] + self.c[d] @ Lj)).ravel()
            if not math.isinf(cut):
                before = pos < d
                xs, ys = _lp_curve(dw[before], do[before], self.s_w[j, 0] - self.s_w[j, d],
                                   self.s_o[j, 0] - self.s_o[j, d])  # the prefix's
                pre = np.interp(self.room_dir[j] - wt, xs, ys, left=math.inf)
                sel = np.flatnonzero(self.om_fixed + pre + val - self.lroom[j] < cut)
                wt, val = wt[sel], val[sel]
            if wt.size > 8 * FRONT_MAX:  # too many to sort for a front we would not keep
                break
            order = np.argsort(wt, kind="stable")
            wt, val = wt[order], val[order]
            if wt.size:  # keep the points that lower the value
                sel = np.flatnonzero(val[1:] < np.minimum.accumulate(val)[:-1]) + 1
                sel = np.concatenate(([0], sel))
                wt, val = wt[sel], val[sel]
            if wt.size > FRONT_MAX:
                break
            out[d] = (wt, val)
            if not wt.size:
                break
        return out

    def _relaxed(self, j: int, d: int, rest: np.ndarray,
                 curves: list[tuple[np.ndarray, np.ndarray]], fronts: bool) -> np.ndarray:
        """Value of relaxation j over the positions >= d at capacities ``rest``: its front
        when there is one (``fronts``: the run may use them), else the LP curve of ``curves``
        (from :meth:`curves`); inf where the remaining positions cannot fit. (The search reads
        the same values through :meth:`_bound_at`, in terms of the capacity spent.)"""
        front = self.fronts.get(j, {}).get(d) if fronts else None
        if front is None:
            xs, ys = curves[j]
            return np.interp(rest, xs, ys, left=math.inf)
        return _step_value(front, rest)

    def _bound_at(self, j: int, d: int, spent: np.ndarray,
                  curves: list[tuple[np.ndarray, np.ndarray]], fronts: bool) -> np.ndarray:
        """:meth:`_relaxed` less lroom[j], at the capacities ``spent`` along the relaxation's
        direction (rest = room_dir[j] - spent), ``curves`` from :meth:`spent_curves`."""
        front = self.fronts.get(j, {}).get(d) if fronts else None
        if front is not None:
            return _step_value(front, self.room_dir[j] - spent) - self.lroom[j]
        xs, ys = curves[j]
        return np.interp(spent, xs, ys, right=math.inf)

    def _plane_bound(self, vu: np.ndarray, d: int) -> np.ndarray:
        """Best plane bound of the positions >= d for states (value, use) ``vu`` (N, 1 + R),
        their value included; in blocks of PLANE_BLOCK (N, planes) entries."""
        const = self.plane_const[d]
        step = max(1, PLANE_BLOCK // len(const))
        if len(vu) <= step:
            return (vu @ self.plane_m + const).max(axis=1)
        return np.concatenate([(vu[i:i + step] @ self.plane_m + const).max(axis=1)
                               for i in range(0, len(vu), step)])

    def spent_curves(self, d: int, live: list[tuple[np.ndarray, ...]] | None = None,
                     ) -> list[tuple[np.ndarray, np.ndarray]]:
        """The curves of :meth:`curves` as functions of the capacity already spent along each
        direction, less lroom (spent = room_dir - capacity, ascending): a state's bound is
        then value + use . L_j plus one np.interp at use . D_j (right of the curve the rest
        cannot fit: inf). Cached with the curves."""
        out = self._spent.get(d)
        if out is None:
            curves = self.curves(d, live)  # (fills both caches when they are kept)
            out = self._spent.get(d) or [self._as_spent(j, xs, ys)
                                         for j, (xs, ys) in enumerate(curves)]
        return out

    def _as_spent(self, j: int, xs: np.ndarray, ys: np.ndarray,
                  ) -> tuple[np.ndarray, np.ndarray]:
        """Relaxation j's curve (capacity xs, value ys along the last axis) as (capacity spent,
        value less lroom[j]), ascending; see :meth:`spent_curves`."""
        return self.room_dir[j] - xs[..., ::-1], ys[..., ::-1] - self.lroom[j]

    def curves(self, d: int, live: list[tuple[np.ndarray, ...]] | None = None,
               ) -> list[tuple[np.ndarray, np.ndarray]]:
        """Breakpoints (capacity, LP value) of each relaxation over positions >= d: the start,
        then the hull increments of those positions in decreasing efficiency (an increment of
        an earlier position counts as zero: a repeated breakpoint, which np.interp skips).
        ``live``: a run's increments of the positions >= some depth <= d per relaxation, as
        (dw, do, pos), narrowed here to the positions >= d in place: a run asks for the
        depths in order, so each call filters what the last one left instead of every
        increment (used when the depths are not cached; default: every increment)."""
        out = self._curves.get(d)
        if out is not None:
            return out
        if not self._cache:
            if live is None:
                live = list(self.incs)
            out = []
            for j, (dw, do, pos) in enumerate(live):
                keep = pos >= d
                if not keep.all():
                    dw, do, pos = dw[keep], do[keep], pos[keep]
                    live[j] = (dw, do, pos)
                out.append(_lp_curve(dw, do, self.s_w[j, d], self.s_o[j, d]))
            return out
        if not self._curves:  # all depths at once: one cumulative sum per relaxation
            depth = np.arange(self.n + 1)[:, None]
            tables = []
            for j, (dw, do, pos) in enumerate(self.incs):
                later = pos[None, :] >= depth  # (n + 1, increments)
                xs = np.cumsum(np.where(later, dw, 0.0), axis=1) + self.s_w[j][:, None]
                ys = np.cumsum(np.where(later, do, 0.0), axis=1) + self.s_o[j][:, None]
                tables.append((np.hstack([self.s_w[j][:, None], xs]),
                               np.hstack([self.s_o[j][:, None], ys])))
            spent = [self._as_spent(j, xs, ys) for j, (xs, ys) in enumerate(tables)]
            for e in range(self.n + 1):
                self._curves[e] = [(xs[e], ys[e]) for xs, ys in tables]
                self._spent[e] = [(xs[e], ys[e]) for xs, ys in spent]
        return self._curves[d]

    def run(self, ub: float, max_states: int, beam_width: int | None = None,
            deadline: float | None = None) -> tuple[int, bool]:
        """Search for completions better than ``ub``; returns (children evaluated, finished).
        After a finished run, :meth:`completions` lists the complete assignments kept. Without
        ``beam_width``, a finished run kept every assignment within the limits that beats
        ``ub`` by more than EPS_REL (and maybe a few that do not: the caller re-checks them
        exactly); with it, the run is a heuristic, unless no layer was wider than the beam
        (``truncated`` False after the run): then it was the exact search."""
        n = self.n
        R = len(self.room)
        J = len(self.D)
        cut = math.inf if math.isinf(ub) else ub - EPS_REL * abs(ub) + self.fptol
        vu = np.zeros((1, 1 + R))  # the layer's states as rows (value, use of each limit)
        vu[0, 0] = self.om_fixed
        self.truncated = False
        back: list[np.ndarray] = []
        planes_on = len(self.plane_lam) > 0
        seen = plane_cut = 0  # children the planes evaluated and cut in this run
        states = 0
        fronts_on = cut <= self.front_cut
        live = list(self.incs)  # this run's increments of the positions after the layer
        for d in range(n):
            if not fronts_on and beam_width is None and states > FRONT_TRIGGER and FRONT_MAX:
                self._ensure_fronts(cut)  # this exact run is large: tighter bounds pay
                fronts_on = True
            # the budget counts children evaluated (the work), checked before evaluating them
            states += len(vu) * len(self.om[d])
            if states > max_states or (deadline is not None and time.perf_counter() > deadline):
                return states, False
            # children as rows (value, use of each limit)
            vu2 = (vu[:, None, :] + self.vc[d]).reshape(-1, 1 + R)
            ok = vu2[:, 0] < cut
            lim = self.limit_at[d]
            for r in range(R):
                ok &= vu2[:, 1 + r] <= lim[r]
            if d < n - 1:
                spent = self.spent_curves(d + 1, live)
                # The first relaxation (the surrogate along the multipliers) cuts most children
                # (measured: 87 % of those evaluated on 1000x12 with three limits): it runs on
                # all of them, together with the limit check (one selection instead of two),
                # the others on its survivors. Its projections are sums over the parent and the
                # option, so they are built from the two small tables.
                q = ((vu @ self.m0)[:, None, :] + self.q0[d]).reshape(-1, 2)
                # right of the curve the remaining groups cannot fit: no completion
                bound = q[:, 1] + self._bound_at(0, d + 1, q[:, 0], spent, fronts_on)
                ok &= bound < cut
                idx = ok.nonzero()[0]
                vu2, bound = vu2[idx], bound[idx]
                if J > 1 and idx.size:
                    q = vu2 @ self.m_rest  # (N, 2(J - 1)): use . D_j, then value + use . L_j
                    for j in range(1, J):
                        b_j = q[:, J - 2 + j] + self._bound_at(j, d + 1, q[:, j - 1], spent,
                                                              fronts_on)
                        np.maximum(bound, b_j, out=bound)
                    sel = (bound < cut).nonzero()[0]
                    idx, vu2, bound = idx[sel], vu2[sel], bound[sel]
            else:
                idx = ok.nonzero()[0]
                vu2 = vu2[idx]
                bound = vu2[:, 0]
            if beam_width is not None and idx.size > BEAM_POOL * beam_width:
                # a beam keeps its pool of best-bounded children for the dominance check and
                # the planes (see BEAM_POOL)
                self.truncated = True
                sel = np.argpartition(bound, BEAM_POOL * beam_width)[:BEAM_POOL * beam_width]
                idx, vu2, bound = idx[sel], vu2[sel], bound[sel]
            # Dominance before the planes: the planes (N x P products) then run on fewer
            # states, and the same states survive either way (every bound here only grows
            # with a state's value and use: a bound that cuts a state cuts all it dominates),
            # up to the windowed check beyond 384 states.
            # Measured: 54x12 multi-limit sweep 2 % faster (sbl s0 8 %), 200x12 the same.
            if idx.size > DOMINANCE_MIN:
                sel = _undominated(vu2[:, 0], vu2[:, 1:])
                idx, vu2, bound = idx[sel], vu2[sel], bound[sel]
            if planes_on and d < n - 1 and idx.size:
                b_p = self._plane_bound(vu2, d + 1)
                sel = (b_p < cut).nonzero()[0]
                seen += idx.size
                plane_cut += idx.size - sel.size
                idx, vu2 = idx[sel], vu2[sel]
                bound = np.maximum(bound[sel], b_p[sel])
                if beam_width is None and seen >= PLANE_TRIAL and plane_cut < PLANE_MIN_CUT * seen:
                    planes_on = False
            if beam_width is not None and idx.size > beam_width:
                self.truncated = True
                sel = np.argpartition(bound, beam_width)[:beam_width]
                idx, vu2 = idx[sel], vu2[sel]
            back.append(idx)
            vu = vu2
            if not idx.size:
                break
            # Give up early when even this layer's width times the options still to come
            # projects far past the budget (measured: at most 4.2x the final count in runs
            # that finished, 15x in runs that could not), so a hopeless search hands over
            # at a fraction of the budget.
            if beam_width is None and \
                    states + idx.size * self.options_after[d] > PROJECTION_MAX * max_states:
                return states, False
        self._last = (vu[:, 0], back)
        return states, True

    def completions(self) -> Iterator[list[int]]:
        """The complete assignments the last finished run kept (picks per group), best first."""
        vals, back = self._last
        if len(back) < self.n or not vals.size:  # the run ended with an empty layer
            return
        for s in np.argsort(vals, kind="stable"):
            picks = list(self.base)
            i = int(s)
            for d in range(self.n - 1, -1, -1):
                parent, k = divmod(int(back[d][i]), len(self.om[d]))
                code = int(self.code[d][k])
                for g, ks in reversed(self.members[d]):
                    code, r = divmod(code, len(ks))
                    picks[g] = int(ks[r])
                i = parent
            yield picks


def _step_value(front: tuple[np.ndarray, np.ndarray], rest: np.ndarray) -> np.ndarray:
    """A front's value (weights ascending, values) at capacities ``rest``: the value of the
    heaviest step that fits; inf where none does."""
    wt, val = front
    if not wt.size:
        return np.full(rest.shape, math.inf)
    at = np.searchsorted(wt, rest, side="right") - 1
    return np.where(at >= 0, val[np.maximum(at, 0)], math.inf)


def _lp_curve(dw: np.ndarray, do: np.ndarray, w0: float, o0: float,
              ) -> tuple[np.ndarray, np.ndarray]:
    """Breakpoints (capacity, LP value) of an LP curve starting at (w0, o0), the sum of its
    positions' hull starts, through the increments (dw, do) in decreasing efficiency."""
    return np.cumsum(np.concatenate(([w0], dw))), np.cumsum(np.concatenate(([o0], do)))


_LOWER = np.tril(np.ones((384, 384), dtype=bool), k=-1)  # _LOWER[j, i]: i comes before j
# From this many states on, _undominated compares ranks (int16) instead of floats: outer
# comparisons of int16 run ~4x faster than of float64, which pays for the ranking (measured,
# per call: 150 states x 2 limits 31 vs 41 us, 300 x 3 78 vs 191 us; 80 x 2 22 vs 17 us).
RANK_MIN = 100


def _undominated(vals: np.ndarray, use: np.ndarray, window: int = 32) -> np.ndarray:
    """Indices (ascending) of the states that survive dominance: a state is dropped when an
    earlier one (in the order of value) has no larger value and no larger use of any limit, so
    of exact duplicates the first survives. Up to 384 states every earlier state is compared,
    beyond that the ``window`` states just before each one (most dominators are close in
    value: measured, that finds 80-95 % of the dominated states). Dropping only dominated
    states keeps the search exact; dominance is transitive, so it does not matter whether the
    dominator itself survives. (It compares float sums, so a tie within rounding, ~1e-16
    relative, may go either way: far inside the 1e-9 FEAS_RTOL cushion of the limits.)"""
    n, R = use.shape
    order = np.argsort(vals, kind="stable")
    ut = np.ascontiguousarray(use[order].T)  # (R, n), state i at column i
    if n <= len(_LOWER):
        if n >= RANK_MIN:  # each limit's use as its rank among the states, ties equal
            by = np.argsort(ut, axis=1, kind="stable")
            lim = np.arange(R)[:, None]
            srt = ut[lim, by]
            rank = np.zeros((R, n), dtype=np.int16)
            np.cumsum(srt[:, 1:] > srt[:, :-1], axis=1, out=rank[:, 1:])
            ut = np.empty((R, n), dtype=np.int16)
            ut[lim, by] = rank
        hit = ut[0][None, :] <= ut[0][:, None]  # hit[j, i]: state i uses no more than j
        for r in range(1, R):
            hit &= ut[r][None, :] <= ut[r][:, None]
        hit &= _LOWER[:n, :n]
        dead = hit.any(axis=1)
    else:
        before = np.arange(n)[:, None] - np.arange(1, window + 1)[None, :]  # (n, window)
        hit = before >= 0
        before = np.maximum(before, 0)
        for r in range(R):
            hit &= ut[r][before] <= ut[r][:, None]
        dead = hit.any(axis=1)
    return np.sort(order[~dead])
