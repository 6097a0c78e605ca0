"""How far a Hutchinson sweep has come (the share of the vectors it is projected to need), and
which blocks stopped at ``max_iter`` rather than at ``tol``.

The sweep stops a kind of block (output-probe, HVP) when every block's relative standard error
is at most ``tol`` (after ``min_iter`` samples), or at ``max_iter`` vectors. A fraction of
``max_iter`` makes a sweep that converges at 80 of 200 vectors show 40 % and then jump to done;
instead each kind's total is projected from the standard errors measured so far, as the
stopping rule sees them: a block with ``n`` samples and standard error ``se`` reaches
``se <= tol * mean`` after about ``n * (se / (tol * mean))^2`` samples (se ~ 1 / sqrt(n)). The
worst block sets the kind's total (at least ``min_iter`` samples, at most ``max_iter``
vectors; ``max_iter`` while a block has fewer than 2 samples or a mean <= 0, which only
``max_iter`` stops). ``SweepProgress`` turns the projections into a fraction that only moves
forward (a projection can grow when a block's spread does).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def projected_vectors(blocks: Sequence[Any], done: int, cfg: Any, draw: bool) -> int:
    """Vectors one kind of block is projected to take in all, ``done`` of them taken.

    ``blocks``: the kind's ``BlockStats`` (``n``, ``mean``, ``stderr``, ``converged(tol)``);
    ``cfg``: the ``HessianConfig`` (``tol``, ``min_iter``, ``max_iter``, ``vectors_per_pass``);
    ``draw``: a sample is a pass of ``vectors_per_pass`` vectors (drawn chunks), else a vector.
    """
    if not blocks or done >= cfg.max_iter:
        return done
    n = min(s.n for s in blocks)
    if n >= cfg.min_iter and all(s.converged(cfg.tol) for s in blocks):
        return done  # the stopping rule holds: this kind is finished
    need = float(cfg.min_iter)
    for s in blocks:
        if s.n < 2 or s.mean <= 0.0 or not math.isfinite(s.stderr):
            return cfg.max_iter
        need = max(need, s.n * (s.stderr / (cfg.tol * s.mean)) ** 2)
    k = cfg.vectors_per_pass
    passes = math.ceil(need) if draw else math.ceil(math.ceil(need) / k)
    return min(cfg.max_iter, max(passes * k, done + k))  # pending: one more pass at least


class SweepProgress:
    """The shown fraction of a sweep: the vectors taken over the projected total, moving only
    forward and reaching 1 only when the sweep ends.

    Each call spreads what is left to show (``1 - fraction``) over the vectors now projected to
    remain, so the fraction equals taken / total while the projection holds, never stalls when
    a projection grows (the bar slows down instead) and never goes back when one shrinks (it
    speeds up). A sweep still running is one vector short of its total at least, so the
    fraction stays below 1 until the caller reports the end."""

    def __init__(self) -> None:
        self.fraction = 0.0
        self._taken = 0.0

    def update(self, done: Mapping[str, int], partial: Mapping[str, float],
               blocks: Mapping[str, Sequence[Any]], cfg: Any, draw: bool) -> float:
        """The fraction after ``done`` vectors per kind (plus ``partial`` of the pass in
        progress), with the kinds' block stats in ``blocks`` (see :func:`projected_vectors`;
        each vector counted alike)."""
        taken = sum(done.get(kind, 0) + partial.get(kind, 0.0) for kind in blocks)
        total = sum(projected_vectors(stats, done.get(kind, 0), cfg, draw)
                    for kind, stats in blocks.items())
        total = max(total, taken + 1.0)
        if taken > self._taken:
            self.fraction += (1.0 - self.fraction) * (taken - self._taken) / (total - self._taken)
        self._taken = taken  # lower after auto's switch to 'all' (the count starts again)
        return self.fraction


def convergence_summary(layers: Sequence[Any], max_iter: int) -> dict[str, Any]:
    """Which trace blocks stopped at ``max_iter`` rather than at ``tol``: ``layers`` are the
    ``LayerSensitivity`` rows (an activation block counts where its trace was measured)."""
    blocks = [(f"{r.name} (weight)", r.weight_converged) for r in layers]
    blocks += [(f"{r.name} (activation)", r.activation_converged) for r in layers
               if r.activation_trace is not None]
    stuck = [name for name, converged in blocks if not converged]
    return {"blocks": len(blocks), "converged": len(blocks) - len(stuck), "max_iter": max_iter,
            "stopped_at_max_iter": stuck}


def convergence_line(summary: Mapping[str, Any] | None) -> str | None:
    """One line for the terminal when some blocks stopped at ``max_iter`` (else None)."""
    stuck = (summary or {}).get("stopped_at_max_iter") or []
    if not stuck:
        return None
    more = f" and {len(stuck) - 4} more" if len(stuck) > 4 else ""
    return (f"{len(stuck)} of {summary['blocks']} Hessian trace blocks stopped at max_iter "
            f"({summary['max_iter']} vectors) before their standard error reached tol: "
            f"{', '.join(stuck[:4])}{more} (their Omega is the less certain)")
