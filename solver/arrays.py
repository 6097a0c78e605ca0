"""The option arrays of the in-process search: each group's options after lossless dominance
pruning, as (groups x options) numpy arrays padded to a rectangle.

Dominance: option k of a group is dropped when another option j of the same group has
Omega_j <= Omega_k and c_r(j) <= c_r(k) for every limited r (strictly in one of them, or j
earlier when they are equal). Swapping k for j in any assignment keeps it feasible and does not
raise Omega, so some optimum survives (the relation is a strict partial order, so every dropped
option has a surviving dominator).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .groups import GOpt


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
