"""The exact search: a branch-and-bound tree over the free groups, searched breadth-first
(:class:`Search`), and the dominance check between partial assignments (:func:`undominated`).

A layer of the tree (all surviving partial assignments of the first d positions in branching
order) is held as arrays, so one layer costs a few numpy operations whatever its width. A
child is cut when the smallest possible use of the remaining groups pushes a limit over, when
a lower bound on every completion reaches the cut (the incumbent less ``eps_rel``), or when
another child of the same layer dominates it (no larger Omega and no larger use of any limit:
every completion of the dominated one completes the other at least as well).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Iterator

import numpy as np

from .arrays import Arrays
from .bounds import hulls, lp_curve, step_value
from .params import PARAMS, SearchParams


class Search:
    """The branch-and-bound tree over the free groups of ``keep`` (option indices per group).

    The bounds are the LP relaxations of single-constraint knapsacks (:func:`hulls`, Dyer /
    Zemel) over the remaining positions, each keeping one weighted sum of the limits and moving
    the rest into the objective with fixed multipliers: first the surrogate of all limits along
    the best multipliers; with several limits also each limit kept exactly, once with the
    others dropped and once with them Lagrangian-relaxed. Every assignment within the limits
    meets each of these relaxations, so each value, and their maximum, is a valid lower bound;
    with one limit the first is the exact LP bound of the subtree. With several limits,
    *planes* add the plain Lagrangian bound S_d(lam) - lam . (room left) at a grid of fixed
    multipliers (:func:`solver.bounds.plane_grid`): one matrix product per layer, S_d
    precomputed for every depth; they follow the multipliers of a subtree, which drift far
    from the root's. As a function of the remaining capacity a knapsack's LP value is
    piecewise linear, so a layer's ray bounds are one ``np.interp`` per relaxation. Once an
    exact run has evaluated ``front_trigger`` children, the relaxations that keep one limit
    exactly use their integer optimum instead, a step function of the capacity (*fronts*,
    :meth:`_front`), for the depths where it has at most ``front_max`` steps: near the leaves,
    where the LP curves leave most states alive although almost none has a completion below
    the incumbent.

    ``run(beam_width=B)`` keeps only the B best-bounded children of each layer: a heuristic
    (beam search) that finds good incumbents fast. ``run()`` keeps every child that can beat
    the incumbent: exact, within a budget of children evaluated."""

    def __init__(self, arr: Arrays, keep: list[list[int]], cn: np.ndarray, cap: np.ndarray,
                 cushion: np.ndarray, lam: np.ndarray, planes: np.ndarray | None = None,
                 params: SearchParams = PARAMS) -> None:
        self.params = params
        R = len(arr.res)
        a_om, a_c, real, kidx, lens = self._rectangle(arr, keep, cn)
        fixed = np.flatnonzero(lens == 1)
        self.om_fixed = float(a_om[fixed, 0].sum())
        # Limits in normalised units with the cushion and a little float slack: the search
        # never cuts a point within() accepts; complete assignments are re-checked exactly.
        self.room = (cap + cushion) * (1 + 1e-12) + 1e-15 - a_c[fixed, 0].sum(axis=0)
        self._relaxations(lam, R)
        # Branch first on the heaviest groups (largest spread in some limit): once they are
        # fixed, the rest is fine-grained and the LP bounds are tight.
        free = np.flatnonzero(lens > 1)
        spread = (np.where(real[:, :, None], a_c, -np.inf).max(axis=1)
                  - np.where(real[:, :, None], a_c, np.inf).min(axis=1)).max(axis=1)
        order = free[np.argsort(-spread[free], kind="stable")].tolist()
        pos_of = self._positions(order, lens, kidx, a_om, a_c, R)
        g_om, g_c, pad = a_om[order], a_c[order], ~real[order]  # (F, width[, R])
        self._curve_tables(g_om, g_c, pad, pos_of)
        self._projections(R)
        self.fptol = params.fp_rel * (float(np.abs(arr.om).max(axis=1).sum())
                                      + abs(self.om_fixed)) + 1e-300
        counts = [len(o) for o in self.om]
        self.options_after = np.cumsum(counts[::-1])[::-1][1:].tolist() + [0]  # positions > d
        self._curves: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        self._spent: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
        self._cache = self.n * sum(len(t[0]) for t in self.incs) <= params.curve_cache_max
        self._planes(planes, g_om, g_c, R)
        # Fronts: for the relaxations that keep one limit exactly and move the others into
        # the objective (the only one with a single limit), front[d] = (weight, value) steps
        # of the exact integer optimum of the positions >= d; built on demand (_ensure_fronts).
        self.front_rays = [0] if R == 1 else [2 * r + 2 for r in range(R)]
        self.fronts: dict[int, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
        self.front_cut = -math.inf  # the fronts serve runs with a cut at most this

    def _rectangle(self, arr: Arrays, keep: list[list[int]], cn: np.ndarray,
                   ) -> tuple[np.ndarray, ...]:
        """Every group's kept options padded to a rectangle: (a_om, a_c, real, kidx, lens) with
        kidx (G, width) option indices, real (G, width) which are real, a_om / a_c their values
        and normalised costs (padding: inf / 0), lens the kept counts. Sets ``base`` (each
        group's first kept option: a fixed group's only one) and ``free_options``."""
        G = len(arr.groups)
        lens = np.array([len(k) for k in keep])
        flat_k = np.concatenate([np.asarray(k, dtype=np.intp) for k in keep])
        offs = np.cumsum(lens) - lens
        width = int(lens.max())
        real = np.arange(width)[None, :] < lens[:, None]
        kidx = np.zeros((G, width), dtype=np.intp)
        kidx[real] = flat_k
        a_om = np.where(real, arr.om[np.arange(G)[:, None], kidx], math.inf)
        a_c = np.moveaxis(cn[:, np.arange(G)[:, None], kidx], 0, 2) * real[:, :, None]
        self.base = flat_k[offs].tolist()  # fixed groups' only option
        self.free_options = int((lens - 1).sum())  # options beyond one per group
        return a_om, a_c, real, kidx, lens

    def _relaxations(self, lam: np.ndarray, R: int) -> None:
        """D (J, R): the weighted sum of the limits each relaxation keeps; L (J, R): the
        multipliers of the limits it moves into the objective."""
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
        self.D = np.array(dirs)
        self.L = np.array(mults)

    def _positions(self, order: list[int], lens: np.ndarray, kidx: np.ndarray,
                   a_om: np.ndarray, a_c: np.ndarray, R: int) -> list[int]:
        """The positions of the tree: consecutive groups in branching ``order`` merged while the
        product of their option counts stays within ``merge_max`` (a layer costs a fixed
        number of numpy calls, so fewer, wider layers are faster; the LP bound of merged groups
        is the same, their hulls being Minkowski sums). A merged option is a mixed-radix code
        over the members' kept options. Returns the position of each group in ``order``."""
        self.members: list[list[tuple[int, np.ndarray]]] = []  # (group, its kept options)
        self.code: list[np.ndarray] = []  # (K,) code of each option of the position
        # (K, 1 + R) per position: each option's value and normalised costs
        self.vc: list[np.ndarray] = []
        a_vc = np.concatenate([a_om[:, :, None], a_c], axis=2)
        pos_of = []
        for g in order:
            k = int(lens[g])
            ks, g_vc = kidx[g, :k], a_vc[g, :k]
            if self.members and len(self.vc[-1]) * k <= self.params.merge_max:
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
        self.n = len(self.members)
        F = len(order)
        # first group of each position, for per-position sums of per-group values
        self._first_of = np.flatnonzero(np.diff(pos_of, prepend=-1)) if F \
            else np.zeros(0, np.intp)
        return pos_of

    def _per_position(self, x: np.ndarray) -> np.ndarray:
        """Per-group rows (in branching order) summed per position, and a zero row for the end
        (a merged position's minimum of a separable sum is the sum of its members' minima)."""
        out = np.zeros((self.n + 1,) + x.shape[1:])
        if len(x):
            out[:self.n] = np.add.reduceat(x, self._first_of, axis=0)
        return out

    def _curve_tables(self, g_om: np.ndarray, g_c: np.ndarray, pad: np.ndarray,
                      pos_of: list[int]) -> None:
        """Suffix sums over the positions >= d of the smallest use of each limit (min_rest)
        and of the hull starts (s_w, s_o), and each relaxation's hull increments (incs) in
        decreasing efficiency: the LP curves of every depth are built from these."""
        J, n = len(self.D), self.n
        F, width = g_om.shape
        minc = self._per_position(np.where(pad[:, :, None], np.inf, g_c).min(axis=1))
        # LP hulls per group, all relaxations at once (rows j * F + f for the f-th free group
        # in branching order); a position's hull is the Minkowski sum of its members' hulls:
        # their starts added, their increments merged.
        pos_of = np.array(pos_of, dtype=np.intp)
        w_all = np.where(pad[None], np.inf, np.einsum("fkr,jr->jfk", g_c, self.D))
        o_all = g_om[None] + np.einsum("fkr,jr->jfk", g_c, self.L)
        sw, so, (eff, dw, do, row) = hulls(w_all.reshape(J * F, width),
                                           o_all.reshape(J * F, width))
        start = np.zeros((2, J, n + 1))
        slot = (np.arange(J)[:, None] * (n + 1) + pos_of[None, :]).ravel()
        start[0] = np.bincount(slot, sw, minlength=J * (n + 1)).reshape(J, n + 1)
        start[1] = np.bincount(slot, so, minlength=J * (n + 1)).reshape(J, n + 1)
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

    def _projections(self, R: int) -> None:
        """A state is a row (value, use of each limit); its projections: column j the capacity
        spent along relaxation j's direction (use . D_j), column J + j its value plus the
        relaxed limits' share (value + use . L_j). The first relaxation's projections are sums
        over the parent and the option, so each position's options are projected once (q0)."""
        J = len(self.D)
        self.lroom = self.L @ self.room
        self.room_dir = self.D @ self.room
        proj = np.zeros((1 + R, 2 * J))
        proj[1:, :J] = self.D.T
        proj[0, J:] = 1.0
        proj[1:, J:] = self.L.T
        self.m0 = proj[:, [0, J]]
        self.q0 = [vc @ self.m0 for vc in self.vc]
        self.m_rest = proj[:, [j for j in range(2 * J) if j % J]]  # the other relaxations
        self.limit_at = self.room - self.min_rest[1:]  # use allowed after position d, (n, R)

    def _planes(self, planes: np.ndarray | None, g_om: np.ndarray, g_c: np.ndarray,
                R: int) -> None:
        """plane_const[d, p] = S_d(lam_p) - lam_p . room, where S_d(lam) is the sum over
        positions >= d of min_k (Omega + lam . c)."""
        P = 0 if planes is None else len(planes)
        self.plane_lam = np.zeros((0, R)) if planes is None else np.asarray(planes, float)
        self.plane_const = np.zeros((self.n + 1, P))
        self.plane_m = np.vstack([np.ones((1, P)), self.plane_lam.T])  # (1 + R, P)
        if P:
            best_g = np.full((len(g_om), P), np.inf)
            for k in range(g_om.shape[1]):  # (small temporaries: one option slot at a time)
                np.minimum(best_g, g_om[:, k, None] + g_c[:, k] @ self.plane_lam.T, out=best_g)
            best = self._per_position(best_g)
            self.plane_const = np.cumsum(best[::-1], axis=0)[::-1] - self.plane_lam @ self.room

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
        backward while it holds at most ``front_max`` points (the depths before use the LP
        curve). A sum whose best completion to a full assignment is >= ``cut`` even when the
        positions < d are LP-relaxed is dropped: it cannot give a bound below the cut to any
        state (the LP prefix value only falls as its capacity grows), and the sums built from
        it for earlier depths would be dropped too (the LP prefix absorbs the added option)."""
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
                xs, ys = lp_curve(dw[before], do[before], self.s_w[j, 0] - self.s_w[j, d],
                                   self.s_o[j, 0] - self.s_o[j, d])  # the prefix's
                pre = np.interp(self.room_dir[j] - wt, xs, ys, left=math.inf)
                sel = np.flatnonzero(self.om_fixed + pre + val - self.lroom[j] < cut)
                wt, val = wt[sel], val[sel]
            if wt.size > 8 * self.params.front_max:  # too many to sort for a front to keep
                break
            order = np.argsort(wt, kind="stable")
            wt, val = wt[order], val[order]
            if wt.size:  # keep the points that lower the value
                sel = np.flatnonzero(val[1:] < np.minimum.accumulate(val)[:-1]) + 1
                sel = np.concatenate(([0], sel))
                wt, val = wt[sel], val[sel]
            if wt.size > self.params.front_max:
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
        return step_value(front, rest)

    def _bound_at(self, j: int, d: int, spent: np.ndarray,
                  curves: list[tuple[np.ndarray, np.ndarray]], fronts: bool) -> np.ndarray:
        """:meth:`_relaxed` less lroom[j], at the capacities ``spent`` along the relaxation's
        direction (rest = room_dir[j] - spent), ``curves`` from :meth:`spent_curves`."""
        front = self.fronts.get(j, {}).get(d) if fronts else None
        if front is not None:
            return step_value(front, self.room_dir[j] - spent) - self.lroom[j]
        xs, ys = curves[j]
        return np.interp(spent, xs, ys, right=math.inf)

    def _plane_bound(self, vu: np.ndarray, d: int) -> np.ndarray:
        """Best plane bound of the positions >= d for states (value, use) ``vu`` (N, 1 + R),
        their value included; in blocks of ``plane_block`` (N, planes) entries."""
        const = self.plane_const[d]
        step = max(1, self.params.plane_block // len(const))
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
                out.append(lp_curve(dw, do, self.s_w[j, d], self.s_o[j, d]))
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
        ``ub`` by more than ``eps_rel`` (and maybe a few that do not: the caller re-checks them
        exactly); with it, the run is a heuristic, unless no layer was wider than the beam
        (``truncated`` False after the run): then it was the exact search."""
        p = self.params
        n = self.n
        R = len(self.room)
        cut = math.inf if math.isinf(ub) else ub - p.eps_rel * abs(ub) + self.fptol
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
            if not fronts_on and beam_width is None and states > p.front_trigger and p.front_max:
                self._ensure_fronts(cut)  # this exact run is large: tighter bounds pay
                fronts_on = True
            # the budget counts children evaluated (the work), checked before evaluating them
            states += len(vu) * len(self.om[d])
            if states > max_states or (deadline is not None and time.perf_counter() > deadline):
                return states, False
            idx, vu2, bound = self._children(d, vu, cut, live, fronts_on)
            if beam_width is not None and idx.size > p.beam_pool * beam_width:
                # a beam keeps its pool of best-bounded children for the dominance check and
                # the planes (see SearchParams.beam_pool)
                self.truncated = True
                sel = np.argpartition(bound, p.beam_pool * beam_width)[:p.beam_pool * beam_width]
                idx, vu2, bound = idx[sel], vu2[sel], bound[sel]
            # Dominance before the planes: the planes (N x P products) then run on fewer
            # states, and the same states survive either way (every bound here only grows
            # with a state's value and use: a bound that cuts a state cuts all it dominates),
            # up to the windowed check beyond dominance_all_max states.
            if idx.size > p.dominance_min:
                sel = undominated(vu2[:, 0], vu2[:, 1:], self.params)
                idx, vu2, bound = idx[sel], vu2[sel], bound[sel]
            if planes_on and d < n - 1 and idx.size:
                b_p = self._plane_bound(vu2, d + 1)
                sel = (b_p < cut).nonzero()[0]
                seen += idx.size
                plane_cut += idx.size - sel.size
                idx, vu2 = idx[sel], vu2[sel]
                bound = np.maximum(bound[sel], b_p[sel])
                if beam_width is None and seen >= p.plane_trial \
                        and plane_cut < p.plane_min_cut * seen:
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
            # projects far past the budget (see SearchParams.projection_max), so a hopeless
            # search hands over at a fraction of the budget.
            if beam_width is None and \
                    states + idx.size * self.options_after[d] > p.projection_max * max_states:
                return states, False
        self._last = (vu[:, 0], back)
        return states, True

    def _children(self, d: int, vu: np.ndarray, cut: float,
                  live: list[tuple[np.ndarray, ...]], fronts_on: bool,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The children of the layer ``vu`` (states as rows: value, use of each limit) at
        position d that fit the limits and whose bound is below ``cut``: (their indices among
        all children, their rows, their bounds). The first relaxation (the surrogate along the
        multipliers) cuts most children (docs/solver.md): it runs on all of them, together with
        the limit check (one selection instead of two), the others on its survivors. Its
        projections are sums over the parent and the option, so they are built from the two
        small tables."""
        R, J = len(self.room), len(self.D)
        vu2 = (vu[:, None, :] + self.vc[d]).reshape(-1, 1 + R)
        ok = vu2[:, 0] < cut
        lim = self.limit_at[d]
        for r in range(R):
            ok &= vu2[:, 1 + r] <= lim[r]
        if d == self.n - 1:  # complete assignments: their value is their bound
            idx = ok.nonzero()[0]
            vu2 = vu2[idx]
            return idx, vu2, vu2[:, 0]
        spent = self.spent_curves(d + 1, live)
        q = ((vu @ self.m0)[:, None, :] + self.q0[d]).reshape(-1, 2)
        # right of the curve the remaining groups cannot fit: no completion
        bound = q[:, 1] + self._bound_at(0, d + 1, q[:, 0], spent, fronts_on)
        ok &= bound < cut
        idx = ok.nonzero()[0]
        vu2, bound = vu2[idx], bound[idx]
        if J > 1 and idx.size:
            q = vu2 @ self.m_rest  # (N, 2(J - 1)): use . D_j, then value + use . L_j
            for j in range(1, J):
                b_j = q[:, J - 2 + j] + self._bound_at(j, d + 1, q[:, j - 1], spent, fronts_on)
                np.maximum(bound, b_j, out=bound)
            sel = (bound < cut).nonzero()[0]
            idx, vu2, bound = idx[sel], vu2[sel], bound[sel]
        return idx, vu2, bound

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


@functools.cache
def _earlier(n: int) -> np.ndarray:
    """(n, n) bool: [j, i] is True when state i comes before state j."""
    return np.tril(np.ones((n, n), dtype=bool), k=-1)


def undominated(vals: np.ndarray, use: np.ndarray, params: SearchParams = PARAMS) -> np.ndarray:
    """Indices (ascending) of the states that survive dominance: a state is dropped when an
    earlier one (in the order of value) has no larger value and no larger use of any limit, so
    of exact duplicates the first survives. Up to ``params.dominance_all_max`` states every
    earlier state is compared, beyond that the ``params.dominance_window`` states just before
    each one (most dominators are close in value). Dropping only dominated
    states keeps the search exact; dominance is transitive, so it does not matter whether the
    dominator itself survives. (It compares float sums, so a tie within rounding, ~1e-16
    relative, may go either way: far inside the 1e-9 FEAS_RTOL cushion of the limits.)"""
    n, R = use.shape
    order = np.argsort(vals, kind="stable")
    ut = np.ascontiguousarray(use[order].T)  # (R, n), state i at column i
    window = params.dominance_window
    if n <= params.dominance_all_max:
        if n >= params.rank_min:  # each limit's use as its rank among the states, ties equal
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
        hit &= _earlier(params.dominance_all_max)[:n, :n]
        dead = hit.any(axis=1)
    else:
        before = np.arange(n)[:, None] - np.arange(1, window + 1)[None, :]  # (n, window)
        hit = before >= 0
        before = np.maximum(before, 0)
        for r in range(R):
            hit &= ut[r][before] <= ut[r][:, None]
        dead = hit.any(axis=1)
    return np.sort(order[~dead])
