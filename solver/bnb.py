"""Exact in-process presolve: dominance pruning, Lagrangian bound, incumbent, reduced-cost
fixing and a depth-first branch-and-bound, so that most instances close without a MILP solver.

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
  The multipliers come from a scalar search and coordinate line searches; any lam is valid.
- *fixing*: with an incumbent of value UB, options with rc > UB - L(lam) + tol cannot be in a
  solution better than UB and are dropped (the incumbent's options are always kept).
- *branch-and-bound*: depth-first over the groups with more than one option left, options in
  increasing reduced cost; a node is cut when its accumulated reduced cost proves every
  completion has Omega >= UB - EPS_REL * |UB| (see :data:`EPS_REL`), or when the resources
  already used plus the smallest possible use of the remaining groups exceed a limit. Leaves are
  re-checked exactly (math.fsum of the raw costs with :func:`within`). When the search finishes
  inside its node and time budget the incumbent is optimal up to EPS_REL (and no incumbent means
  infeasible); otherwise the reduced problem and the incumbent go to the MILP solver.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .problem import FEAS_RTOL, within

if TYPE_CHECKING:
    from .ilp import _GOpt as GOpt

# A completion is only searched for when it could beat the incumbent by more than this relative
# amount; "optimal" therefore means: no assignment is better by more than EPS_REL * |UB|.
EPS_REL = 1e-12
# Scalings of the best multipliers whose Lagrangian choices seed the incumbent search.
SCALES = (0.9, 1.05, 1.1, 1.25, 1.5)
# Extra incumbent seeds only up to this many options in all (their repair is pure Python).
SEED_MAX_OPTIONS = 2000
# Pair-move polish: at most this many (move pair) evaluations per call, in scans of all pairs.
PAIR_WORK_MAX = 50_000_000
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
    """Drop dominated options (lossless, see the module docstring) and build the arrays."""
    G = len(groups)
    K = max(len(g) for g in groups)
    R = len(res)
    vals = np.empty((1 + R, G, K))
    for gi, g in enumerate(groups):
        n = len(g)
        rows = [[o.value(key) for o in g]] + [[o.costs[r] for o in g] for r in res]
        for i, row in enumerate(rows):
            vals[i, gi, :n] = row
            vals[i, gi, n:] = row[0]
    sizes = np.array([len(g) for g in groups])
    valid = np.arange(K)[None, :] < sizes[:, None]
    # dom[g, j, k]: option j dominates option k.
    le = np.all(vals[:, :, :, None] <= vals[:, :, None, :], axis=0)
    eq = np.all(vals[:, :, :, None] == vals[:, :, None, :], axis=0)
    earlier = np.arange(K)[:, None] < np.arange(K)[None, :]
    dom = le & (~eq | earlier[None]) & valid[:, :, None]
    kept_mask = valid & ~dom.any(axis=1)
    kept_groups: list[list[GOpt]] = []
    idx = np.empty((G, K), dtype=np.intp)
    kmax = 1
    for gi in range(G):
        ks = np.flatnonzero(kept_mask[gi])
        kept_groups.append([groups[gi][k] for k in ks])
        n = len(ks)
        kmax = max(kmax, n)
        idx[gi, :n] = ks
        idx[gi, n:] = ks[0]
    idx = idx[:, :kmax]
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
    node_limit: int = 200_000,
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
    scale = np.where(raw_cap > 0, raw_cap, 1.0)
    cn = arr.cost / scale[:, None, None]  # normalised costs
    cap = raw_cap / scale
    cushion = FEAS_RTOL * np.maximum(np.abs(raw_cap), 1e-300) / scale
    info: dict[str, Any] = {"nodes": 0}

    def exact_ok(picks: list[int]) -> bool:
        return all(within(math.fsum(groups[g][k].costs[r] for g, k in enumerate(picks)),
                          limits[r]) for r in res)

    def value(picks: list[int]) -> float:
        return math.fsum(groups[g][k].value(arr.key) for g, k in enumerate(picks))

    # Infeasible outright when a limit is below the sum of per-group minima.
    mins = [math.fsum(float(v) for v in arr.cost[r].min(axis=1)) for r in range(R)]
    if any(not within(mins[r], limits[res[r]]) for r in range(R)):
        return Result("infeasible", None, groups, dict(info, closed_by="shortcut"))
    best0 = [int(k) for k in om.argmin(axis=1)]
    if exact_ok(best0):
        return Result("optimal", [groups[g][k] for g, k in enumerate(best0)], groups,
                      dict(info, closed_by="shortcut"))

    rows = np.arange(G)
    inc: list[int] | None = None
    ub = math.inf
    best_l, best_lam = -math.inf, np.zeros(R)

    def visit(lam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Lagrangian choice at lam; records the bound and feasible choices. Returns (picks,
        usage of the picks in normalised units)."""
        nonlocal best_l, best_lam, inc, ub
        v = om + np.tensordot(lam, cn, axes=1)
        picks = v.argmin(axis=1)
        lval = float(v[rows, picks].sum() - lam @ cap)
        if lval > best_l:
            best_l, best_lam = lval, lam.copy()
        usage = cn[:, rows, picks].sum(axis=1)
        if np.all(usage <= cap + cushion * 0.5):
            pl = picks.tolist()
            if exact_ok(pl):
                val = value(pl)
                if val < ub:
                    inc, ub = pl, val
        return picks, usage

    # Scalar search along lam = mu * (1, ..., 1): the smallest mu whose choice fits (with one
    # limit this is the LP dual optimum, the best Lagrangian bound).
    spread = float(np.max(om.max(axis=1) - om.min(axis=1))) or 1.0
    hi, ok = spread, False
    for _ in range(60):
        _, u = visit(np.full(R, hi))
        if np.all(u <= cap):
            ok = True
            break
        hi *= 4.0
    if ok:
        lo = 0.0
        for _ in range(50):
            mid = 0.5 * (lo + hi)
            _, u = visit(np.full(R, mid))
            if np.all(u <= cap):
                hi = mid
            else:
                lo = mid
            if hi - lo <= 1e-10 * hi:
                break
        # Several limits: coordinate line searches (bisection on the subgradient's sign).
        if R > 1:
            for _ in range(3):
                before = best_l
                for r in range(R):
                    lam = best_lam.copy()
                    a, b = 0.0, max(4.0 * lam[r], hi, 1e-300)
                    for _ in range(40):
                        lam[r] = 0.5 * (a + b)
                        _, u = visit(lam)
                        if u[r] > cap[r]:
                            a = lam[r]
                        else:
                            b = lam[r]
                        if b - a <= 1e-9 * b:
                            break
                if best_l <= before + 1e-12 * abs(before):
                    break
    info["lagrange_evals_s"] = time.perf_counter() - t0

    # Incumbent: repair + improve the choice at the best bound (and polish the best feasible).
    from .lagrange import _improve  # shared heuristic

    oml = [[o.value(arr.key) for o in g] for g in groups]
    lam = best_lam
    v = om + np.tensordot(lam, cn, axes=1)
    starts = [v.argmin(axis=1).tolist()]
    # a few nearby multipliers give diverse starting points (each repaired and polished)
    # (extra seeds only where the repair heuristic is cheap: it is pure Python)
    for f in SCALES if sum(arr.sizes) <= SEED_MAX_OPTIONS else ():
        ch = (om + np.tensordot(lam * f, cn, axes=1)).argmin(axis=1).tolist()
        if ch not in starts:
            starts.append(ch)
    if inc is not None:
        starts.append(list(inc))
    if start is not None:
        pos = [{id(o): k for k, o in enumerate(g)} for g in groups]
        ks = [p.get(id(o)) for p, o in zip(pos, start, strict=True)]
        if all(k is not None for k in ks):
            starts.append(ks)
    sizes = arr.sizes
    # Repair + single moves on every seed; the (costlier, all-pairs) polish on the best two.
    cands = []
    for s in starts:
        cand = _improve(s, oml, groups, limits, res)
        if exact_ok(cand):
            cands.append((value(cand), cand))
    cands.sort(key=lambda t: t[0])
    for _, cand in cands[:2]:
        cand = pair_improve(om, cn, cap, sizes, cand)
        if exact_ok(cand):
            val = value(cand)
            if val < ub:
                inc, ub = cand, val

    # Reduced costs at the best multipliers.
    m = v.min(axis=1)
    rc = v - m[:, None]
    lbound = float(m.sum() - lam @ cap)
    tol = FP_REL * (abs(lbound) + float(np.abs(m).sum()) + float(lam @ np.abs(cap)) + spread) \
        + float(lam @ cushion)

    def thr_of(u: float) -> float:
        # Completions whose bound is >= u - EPS_REL|u| cannot improve u meaningfully.
        if math.isinf(u):
            return math.inf
        return u - EPS_REL * abs(u) - lbound + tol

    info["bound"] = lbound
    info["first_incumbent"] = ub
    thr = thr_of(ub)
    sizes = arr.sizes
    keep: list[list[int]] = []
    for g in range(G):
        ks = [k for k in range(sizes[g]) if rc[g, k] <= thr or (inc is not None and k == inc[g])]
        if not ks:  # cannot happen when inc is None (thr = inf); defensive
            ks = [int(rc[g, :sizes[g]].argmin())]
        keep.append(ks)
    free = [g for g in range(G) if len(keep[g]) > 1]
    info["free_groups"] = len(free)
    info["kept"] = sum(len(k) for k in keep)

    done, nodes = _dfs(arr, keep, free, rc, cn, cap, cushion, lam, tol, thr_of,
                       inc, ub, value, exact_ok, node_limit, time_limit_s, t0)
    inc, ub, finished = done
    info["nodes"] = nodes
    if inc is not None:
        info["incumbent"] = ub
    if finished:
        if inc is None:
            return Result("infeasible", None, groups, dict(info, closed_by="branch-and-bound"))
        return Result("optimal", [groups[g][k] for g, k in enumerate(inc)], groups,
                      dict(info, closed_by="branch-and-bound"))
    # Open: refix with the final incumbent and hand over.
    thr = thr_of(ub)
    reduced = []
    for g in range(G):
        ks = [k for k in keep[g] if rc[g, k] <= thr or (inc is not None and k == inc[g])]
        reduced.append([groups[g][k] for k in ks])
    incumbent = None if inc is None else [groups[g][k] for g, k in enumerate(inc)]
    info["kept"] = sum(len(g) for g in reduced)
    return Result("open", incumbent, reduced, info)


def pair_improve(
    om: np.ndarray, cn: np.ndarray, cap: np.ndarray, sizes: list[int], picks: list[int],
    rounds: int = 64,
    stats: list[int] | None = None,
) -> list[int]:
    """Improve a feasible assignment by the best single or paired option change (two groups
    at once) that lowers Omega and stays within the limits, until none is left (or ``rounds``).
    Vectorised over all pairs of moves. Returns ``picks`` unchanged if it does not fit.
    ``stats[0]`` (if given) is increased by the number of scans done."""
    G, K = om.shape
    R = cn.shape[0]
    pk = np.array(picks)
    rows = np.arange(G)
    valid = np.arange(K)[None, :] < np.array(sizes)[:, None]
    gid = np.broadcast_to(rows[:, None], (G, K))
    moves = int(sum(sizes)) - G
    # each scan is O(moves^2): cap the scans on large problems (a heuristic, exactness is
    # not at stake)
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
        best_gain, best = -1e-12 * (1.0 + abs(float(om[rows, pk].sum()))), None
        single = (mo < 0) & np.all(mc <= slack[:, None], axis=0)
        if single.any():
            i = int(np.argmin(np.where(single, mo, np.inf)))
            if mo[i] < best_gain:
                best_gain, best = float(mo[i]), ((int(mg[i]), int(mk[i])),)
        down = np.flatnonzero(mo < 0)
        free_ = np.flatnonzero(np.any(mc < 0, axis=0))
        if down.size and free_.size:
            dsum = mo[down][:, None] + mo[free_][None, :]
            ok = (mg[down][:, None] != mg[free_][None, :]) & (dsum < 0)
            for r in range(R):
                ok &= mc[r, down][:, None] + mc[r, free_][None, :] <= slack[r]
            if ok.any():
                flat = int(np.argmin(np.where(ok, dsum, np.inf)))
                a, b = divmod(flat, free_.size)
                if dsum[a, b] < best_gain:
                    i, j = down[a], free_[b]
                    best = ((int(mg[i]), int(mk[i])), (int(mg[j]), int(mk[j])))
        if best is None:
            break
        for g, k in best:
            pk[g] = k
    return pk.tolist()


def _hull_increments(pts: list[tuple[float, float]]) -> tuple[tuple[float, float], list]:
    """Lower-left convex hull of (weight, objective) points: the start (least weight, then
    least objective) and the increments (efficiency, d_weight, d_objective) with decreasing
    efficiency -d_objective / d_weight > 0. The LP relaxation of a multiple-choice knapsack only
    ever uses points on this hull."""
    pts = sorted(pts)
    hull = [pts[0]]
    for p in pts[1:]:
        if p[1] >= hull[-1][1]:
            continue  # heavier and no better: never on the lower-left hull
        while len(hull) >= 2:
            (w0, o0), (w1, o1) = hull[-2], hull[-1]
            if (o0 - o1) * (p[0] - w1) <= (o1 - p[1]) * (w1 - w0):
                hull.pop()  # hull[-1] is above the chord: not convex
            else:
                break
        hull.append(p)
    incs = []
    for (w0, o0), (w1, o1) in zip(hull, hull[1:], strict=False):
        incs.append(((o0 - o1) / (w1 - w0), w1 - w0, o1 - o0))
    return hull[0], incs


def _dfs(arr, keep, free, rc, cn, cap, cushion, lam, tol, thr_of, inc, ub, value, exact_ok,
         node_limit, time_limit_s, t0):
    """Depth-first branch-and-bound over the free groups. Returns ((inc, ub, finished), nodes).

    Two cuts per child besides the resource check: the fixed-multiplier test (accumulated
    reduced cost above ``thr_of(ub)``), and the LP relaxation of the *surrogate* knapsack
    sum_g mu . c(x_g) <= mu . cap over the remaining groups (mu = the best multipliers, scaled),
    computed greedily on per-group convex hulls (Dyer / Zemel). Every assignment within the
    limits meets the surrogate constraint, so the LP value is a valid lower bound; with one
    limit it is the exact LP bound of the remaining subproblem."""
    R = len(arr.res)
    G = len(arr.groups)
    om = arr.om
    base = [keep[g][0] for g in range(G)]  # fixed groups' only option (free ones overwritten)
    fixed_use = [0.0] * R
    om_fixed = 0.0
    for g in range(G):
        if len(keep[g]) == 1:
            om_fixed += float(om[g, keep[g][0]])
            for r in range(R):
                fixed_use[r] += float(cn[r, g, keep[g][0]])
    # Limits in normalised units with the cushion and a little float slack: the search never
    # cuts a point within() accepts; leaves are re-checked exactly.
    room0 = [float(cap[r] + cushion[r]) * (1 + 1e-12) + 1e-15 - fixed_use[r] for r in range(R)]
    mu = [float(x) for x in lam]
    top = max(mu)
    mu = [x / top for x in mu] if top > 0 else [1.0] * R
    # Bounding knapsacks j = (weights d_j, multipliers l_j): keep the single constraint
    # sum d_j . c <= d_j . cap and move l_j . c into the objective (minus l_j . cap). First the
    # surrogate of all limits along the best multipliers; with several limits also each limit
    # kept exactly with the others Lagrangian-relaxed at the root multipliers (at the root that
    # is the full LP bound; deeper it follows the remaining capacity of that limit). The max of
    # valid bounds is a valid bound.
    zero = [0.0] * R
    dirs = [(mu, zero)]
    if R > 1:
        for r in range(R):
            e_r = [1.0 if i == r else 0.0 for i in range(R)]
            dirs.append((e_r, zero))
            dirs.append((e_r, [0.0 if i == r else float(lam[i]) for i in range(R)]))
    J = len(dirs)
    wroom0 = [sum(m * x for m, x in zip(dj, room0, strict=True)) for dj, _ in dirs]
    # the objective's constant part per knapsack: fixed groups' multiplied use minus l_j . cap
    jbase = tuple(om_fixed + sum(lj[r] * (fixed_use[r] - (room0[r] + fixed_use[r]))
                                 for r in range(R)) for _, lj in dirs)
    fptol = FP_REL * (float(np.abs(om).max(axis=1).sum()) + abs(om_fixed)) + 1e-300

    # Branch first on the heaviest groups (largest spread in some limit): once they are
    # fixed, the rest is fine-grained and the LP bound is tight (a few huge layers are what
    # makes the LP gap large).
    def spread(g: int) -> float:
        ks = keep[g]
        return -max(float(cn[r, g, ks].max() - cn[r, g, ks].min()) for r in range(R))

    order = sorted(free, key=spread)
    n = len(order)
    opts = []
    incs: list[list] = [[] for _ in range(J)]
    starts: list[list] = [[] for _ in range(J)]
    for p, g in enumerate(order):
        ks = sorted(keep[g], key=lambda k, g=g: float(rc[g, k]))
        row = []
        for k in ks:
            c = tuple(float(cn[r, g, k]) for r in range(R))
            w = tuple(sum(m * x for m, x in zip(dj, c, strict=True)) for dj, _ in dirs)
            omk = float(om[g, k])
            oj = tuple(omk + sum(m * x for m, x in zip(lj, c, strict=True)) for _, lj in dirs)
            row.append((float(rc[g, k]), k, omk, c, w, oj))
        opts.append(row)
        for j in range(J):
            start, gi = _hull_increments([(o[4][j], o[5][j]) for o in row])
            starts[j].append(start)
            incs[j].extend((e, dw, do, p) for e, dw, do in gi)
    for j in range(J):
        incs[j].sort(key=lambda t: -t[0])
    # suffix sums: smallest use of each resource, and the surrogate LPs' starting points
    suf = [[0.0] * R for _ in range(n + 1)]
    s_om = [[0.0] * (n + 1) for _ in range(J)]
    s_w = [[0.0] * (n + 1) for _ in range(J)]
    for d in range(n - 1, -1, -1):
        for r in range(R):
            suf[d][r] = suf[d + 1][r] + min(o[3][r] for o in opts[d])
        for j in range(J):
            s_w[j][d] = s_w[j][d + 1] + starts[j][d][0]
            s_om[j][d] = s_om[j][d + 1] + starts[j][d][1]

    work = [0]  # LP scans count towards the node budget: 16 increments scanned = 1 node
    moves = sum(arr.sizes) - G
    pair_work = moves * moves // 128 + 1  # one all-pairs scan, in nodes (roughly, by time)

    def lp(j: int, d: int, room: float) -> float:
        """LP bound of surrogate knapsack j over positions >= d with capacity ``room``."""
        room -= s_w[j][d]
        if room < 0:
            return math.inf
        val = s_om[j][d]
        for i, (_, dw, do, p) in enumerate(incs[j]):
            if p < d:
                continue
            if dw <= room:
                room -= dw
                val += do
            else:
                work[0] += i >> 4
                return val + do * (room / dw)
        work[0] += len(incs[j]) >> 4
        return val

    def promising(d: int, o: tuple, w: tuple) -> bool:
        """Whether the LP bounds leave room below the cut for the positions >= d."""
        for j in range(J):
            if o[j] + lp(j, d, wroom0[j] - w[j]) >= cut:
                return False
        return True

    thr = thr_of(ub)
    # a completion must be below this to be searched (inf - inf would be nan: no incumbent)
    cut = math.inf if math.isinf(ub) else ub - EPS_REL * abs(ub) + fptol
    nodes = 0
    if n == 0:
        picks = list(base)
        if exact_ok(picks):
            val = value(picks)
            if val < ub:
                inc, ub = picks, val
        return (inc, ub, True), 0
    # Children of the node at each depth, best bound first (best-child-first diving finds
    # good incumbents early, and a good incumbent is what makes the tree small).
    kids: list[list | None] = [None] * n
    pos = [0] * n
    acc = [0.0] * (n + 1)
    oacc = [om_fixed] * (n + 1)
    wacc = [(0.0,) * J] * (n + 1)
    jacc = [jbase] * (n + 1)
    used = [[0.0] * R for _ in range(n + 1)]
    cur = list(base)
    d = 0
    next_check = 4096
    while d >= 0:
        lst = kids[d]
        last = d == n - 1
        if lst is None:
            u = used[d]
            s = suf[d + 1]
            a0 = acc[d]
            o0 = oacc[d]
            w0 = wacc[d]
            j0 = jacc[d]
            lst = []
            for opt in opts[d]:
                rck, kk, omk, c, w, oj = opt
                nodes += 1
                if a0 + rck > thr:
                    break  # sorted by reduced cost: the rest are worse
                fits = True
                for r in range(R):
                    if u[r] + c[r] + s[r] > room0[r]:
                        fits = False
                        break
                if not fits:
                    continue
                if last:
                    b = o0 + omk
                    if b < cut:
                        lst.append((b, opt, None, None))
                    continue
                jn = tuple(a + b for a, b in zip(j0, oj, strict=True))
                wn = tuple(a + b for a, b in zip(w0, w, strict=True))
                b = -math.inf
                for j in range(J):
                    b = max(b, jn[j] + lp(j, d + 1, wroom0[j] - wn[j]))
                    if b >= cut:
                        break
                if b < cut:
                    lst.append((b, opt, jn, wn))
            lst.sort(key=lambda t: t[0])
            kids[d] = lst
            pos[d] = 0
            if nodes + work[0] >= node_limit:
                return (inc, ub, False), nodes + work[0]
            if nodes + work[0] >= next_check:
                next_check += 4096
                if time_limit_s is not None and time.perf_counter() - t0 > time_limit_s:
                    return (inc, ub, False), nodes + work[0]
        p = pos[d]
        if p >= len(lst) or lst[p][0] >= cut:  # sorted: the rest cannot beat the cut either
            kids[d] = None
            d -= 1
            continue
        pos[d] = p + 1
        _, (rck, kk, omk, c, w, oj), jn, wn = lst[p]
        cur[order[d]] = kk
        if last:
            picks = list(cur)
            if exact_ok(picks):
                val = value(picks)
                if math.isinf(ub) or val < ub - EPS_REL * abs(ub):
                    # polish the new incumbent: a better cut early saves most of the tree
                    scans = [0]
                    better = pair_improve(om, cn, cap, arr.sizes, picks, stats=scans)
                    work[0] += pair_work * scans[0]  # its scans count towards the budget
                    if better != picks and exact_ok(better) and value(better) < val:
                        picks, val = better, value(better)
                    inc, ub = picks, val
                    thr = thr_of(ub)
                    cut = ub - EPS_REL * abs(ub) + fptol
            continue
        acc[d + 1] = acc[d] + rck
        oacc[d + 1] = oacc[d] + omk
        wacc[d + 1] = wn
        jacc[d + 1] = jn
        u = used[d]
        nu = used[d + 1]
        for r in range(R):
            nu[r] = u[r] + c[r]
        d += 1
    return (inc, ub, True), nodes + work[0]
