"""Incumbent heuristics: pair moves reach a pair-local optimum within the limits and the
allowed options; repair fits the limits or gives up."""

from __future__ import annotations

import itertools

import numpy as np
from bitplan_solver_cases import SETTINGS
from hypothesis import given, settings
from hypothesis import strategies as st

from solver.heuristics import pair_improve, repair


def test_pair_improve_makes_a_coordinated_move() -> None:
    # Two groups; moving only one breaks the limit, swapping both lowers Omega.
    om = np.array([[0.0, -1.0], [0.0, 0.5]])
    cn = np.array([[[0.5, 1.0], [0.5, 0.0]]])  # one resource, cap 1
    picks = pair_improve(om, cn, np.array([1.0]), [2, 2], [0, 0])
    assert picks == [1, 1]
    # already optimal: unchanged
    assert pair_improve(om, cn, np.array([1.0]), [2, 2], [1, 1]) == [1, 1]


@settings(max_examples=150, deadline=None)
@given(st.integers(2, 5), st.integers(2, 4), st.integers(1, 3), st.integers(0, 2**32 - 1))
def test_pair_improve_ends_in_a_pair_local_optimum(G: int, K: int, R: int, seed: int) -> None:
    """From a fitting start the result still fits, has no larger Omega, and no single or
    paired option change that fits lowers Omega any further (checked by enumeration). The
    multipliers only speed up the search for pairs: any lam >= 0 gives the same result."""
    rng = np.random.default_rng(seed)
    om = rng.integers(0, 9, (G, K)).astype(float)
    cn = rng.integers(0, 5, (R, G, K)).astype(float)
    start = rng.integers(0, K, G).tolist()
    rows = np.arange(G)
    cap = cn[:, rows, start].sum(axis=1) + rng.integers(0, 4, R)
    picks = pair_improve(om, cn, cap, [K] * G, start)
    lam = rng.choice([0.0, 0.5, 1.0, 3.0, 100.0], R)  # ties in s_d + s_f included
    assert pair_improve(om, cn, cap, [K] * G, start, lam=lam) == picks
    assert np.all(cn[:, rows, picks].sum(axis=1) <= cap)
    value = om[rows, picks].sum()
    assert value <= om[rows, start].sum()
    for g, h in itertools.combinations_with_replacement(range(G), 2):
        for k, m in itertools.product(range(K), repeat=2):
            moved = list(picks)
            moved[g], moved[h] = k, m
            if np.all(cn[:, rows, moved].sum(axis=1) <= cap):
                assert om[rows, moved].sum() >= value


def test_pair_improve_only_moves_to_allowed_options() -> None:
    om = np.array([[0.0, -1.0], [0.0, 0.5]])
    cn = np.array([[[0.5, 1.0], [0.5, 0.0]]])
    allowed = np.array([[True, True], [True, False]])  # the partner move is ruled out
    assert pair_improve(om, cn, np.array([1.0]), [2, 2], [0, 0], allowed=allowed) == [0, 0]


@SETTINGS
@given(st.integers(1, 8), st.integers(1, 5), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_repair_fits_or_gives_up(groups: int, options: int, limits: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    om = rng.normal(size=(groups, options))
    cn = rng.uniform(0, 1, size=(limits, groups, options))
    cap = rng.uniform(0.2, 0.8, size=limits) * groups
    start = rng.integers(0, options, groups).tolist()
    out = repair(om, cn, cap, [options] * groups, start)
    reachable = np.all(cn.min(axis=2).sum(axis=1) <= cap)
    if out is None:
        return
    used = cn[:, np.arange(groups), out].sum(axis=1)
    assert np.all(used <= cap + 1e-12)
    if np.all(cn[:, np.arange(groups), start].sum(axis=1) <= cap):
        # already fitting: improvement never raises Omega
        assert om[np.arange(groups), out].sum() <= om[np.arange(groups), start].sum() + 1e-12
    assert reachable
    # the improvement passes end 1-opt: no single-group move lowers Omega and still fits
    rows = np.arange(groups)
    delta = cn - cn[:, rows, out][:, :, None]
    fits = np.all(delta <= (cap - used)[:, None, None], axis=0)
    assert not np.any(fits & (om < om[rows, out][:, None]))
