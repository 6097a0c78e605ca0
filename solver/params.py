"""The tuning constants of the in-process exact solver, in one frozen object.

Every value is a trade of speed only: none of them decides whether an answer is optimal,
except ``eps_rel`` (what "optimal" means) and ``fp_rel`` (rounding allowance of the bounds).
The measurements behind each value are in docs/solver.md. Tests pass a changed copy
(``dataclasses.replace(PARAMS, beam_width=1)``) to ``solve(..., params=...)``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SearchParams:
    """Speed knobs of bounds, heuristics and the search (reasons in one line each)."""

    # "optimal": no assignment is better than the incumbent by more than eps_rel * |UB|.
    eps_rel: float = 1e-12
    # relative floating-point allowance on the bounds (float64 sums of up to ~1e5 terms).
    fp_rel: float = 1e-11
    # first beam width: wide enough to find a good incumbent, narrow enough to be cheap.
    beam_width: int = 16
    # a beam widens by this factor after each beam that improved the incumbent.
    beam_growth: int = 4
    # a beam layer keeps pool * width best-bounded children for dominance and the planes.
    beam_pool: int = 4
    # an exact run stops once its projected work passes this multiple of its budget.
    projection_max: float = 4
    # beams at least this wide are followed by a short try at the exact search ...
    attempt_width: int = 64
    # ... on this multiple of that beam's children.
    attempt_work: int = 4
    # after a narrower improving beam the tree is rebuilt when it keeps at most this share.
    rebuild_shrink: float = 0.7
    # children of the first exact try with one limit (it closes most such problems).
    probe_states: int = 2000
    # neighbourhood search: completions of the beam that define the open groups ...
    lns_top: int = 8
    # ... the children it may evaluate ...
    lns_work: int = 200_000
    # ... and the free groups a tree needs before it pays.
    lns_min_free: int = 300
    # layers of at most this many states skip the dominance check (it costs more there).
    dominance_min: int = 32
    # up to this many states the dominance check compares every pair ...
    dominance_all_max: int = 384
    # ... beyond, each state against this many states just before it in value.
    dominance_window: int = 32
    # from this many states on, the dominance check compares int16 ranks, not floats.
    rank_min: int = 100
    # planes: the LP multipliers scaled limit by limit by each combination of these.
    plane_factors: tuple[float, ...] = (0.0, 1 / 3, 2 / 3, 1.0, 1.5, 2.0, 3.0)
    # an exact run drops the planes when, over plane_trial children, ...
    plane_trial: int = 10_000
    # ... they cut less than this share of what the other bounds keep.
    plane_min_cut: float = 0.01
    # entries of the (states x planes) temporary per block (32 MB of float64).
    plane_block: int = 4_000_000
    # consecutive groups share a search layer while their option counts multiply to <= this.
    merge_max: int = 36
    # trial multipliers per round of the scalar multiplier search (one batch each).
    scalar_points: int = 16
    # an exact run builds fronts once it has evaluated this many children ...
    front_trigger: int = 100_000
    # ... each front holding at most this many points.
    front_max: int = 1500
    # every depth's LP curves are cached while they hold at most this many breakpoints.
    curve_cache_max: int = 1_000_000
    # rounds of coordinate line searches on the multipliers (no LP duals, several limits).
    lagrange_rounds: int = 3
    # relative width at which one such line search stops.
    lagrange_tol: float = 1e-4
    # pair moves: at most this many (move pair) evaluations per call.
    pair_work_max: int = 50_000_000
    # a pair-move scan applies up to this many moves on untouched groups.
    pair_multi: int = 64


PARAMS = SearchParams()
