"""The LP relaxation of the multiple-choice knapsack through HiGHS (highspy directly when it is
installed, else scipy's ``linprog``): its duals are the best Lagrangian multipliers."""

from __future__ import annotations

import threading

import numpy as np

from .highs import load_highspy


def lp_duals(om: np.ndarray, cn: np.ndarray, cap: np.ndarray, sizes: list[int],
             backend: str | None = None) -> tuple[np.ndarray, list[int]] | None:
    """Multipliers of the limits at the optimum of the LP relaxation (one option per group
    relaxed to a convex combination), and the LP solution rounded to each group's largest
    share; None when it does not solve. The LP goes to HiGHS: directly through highspy when it
    is installed (faster, and no scipy import: docs/solver.md), else through scipy's
    ``linprog``; ``backend`` ("highspy" / "scipy") forces
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
    solved = (lp_highspy if backend == "highspy" else lp_scipy)(cost, a_ub, cap, idx // K, G)
    if solved is None:
        return None
    duals, x = solved
    lam = -duals * o_scale
    if not np.all(np.isfinite(lam)):
        return None
    share = np.full(G * K, -1.0)
    share[idx] = x
    return np.maximum(lam, 0.0), share.reshape(G, K).argmax(axis=1).tolist()


_HIGHS_PER_THREAD = threading.local()


def lp_highspy(cost: np.ndarray, a_ub: np.ndarray, b_ub: np.ndarray, group: np.ndarray,
                G: int) -> tuple[np.ndarray, np.ndarray] | None:
    """min cost . x, sum of x over each group = 1, a_ub x <= b_ub, 0 <= x <= 1 through
    highspy; (duals of the a_ub rows, x) or None."""
    highspy = load_highspy()
    if highspy is None:
        return None
    R, N = a_ub.shape
    # One instance per thread, cleared (options too) for each LP: building a Highs costs
    # ~40 us in Python, clear() ~1 us.
    h = getattr(_HIGHS_PER_THREAD, "h", None)
    if h is None:
        h = _HIGHS_PER_THREAD.h = highspy.Highs()
    else:
        h.clear()
    h.setOptionValue("output_flag", False)
    # presolve only costs here (docs/solver.md)
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


def lp_scipy(cost: np.ndarray, a_ub: np.ndarray, b_ub: np.ndarray, group: np.ndarray,
              G: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The same LP as :func:`lp_highspy` through scipy's ``linprog`` (HiGHS inside)."""
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
