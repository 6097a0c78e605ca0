"""Heuristics that only set incumbents (exactness never rests on them): repair of an
assignment over a limit, and single / paired option moves that lower Omega within the limits."""

from __future__ import annotations

import numpy as np

from .params import PARAMS, SearchParams


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
            # (far faster than single moves on large problems: docs/solver.md).
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
    params: SearchParams = PARAMS,
) -> list[int]:
    """Improve a feasible assignment by single or paired option changes (two groups at once)
    that lower Omega and stay within the limits, until none is left (or ``rounds``): each scan
    applies the best one, then the next best on groups the scan has not touched while they
    still fit (at most ``params.pair_multi``). Vectorised over the moves and the candidate
    pairs (found by a join on the moves' Lagrangian deltas, see below). Returns ``picks``
    unchanged if it does not fit.
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
    rounds = max(2, min(rounds, params.pair_work_max // (moves * moves + 1)))
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
            # (docs/solver.md).
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
        top = np.argsort(gain, kind="stable")[:params.pair_multi]
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
