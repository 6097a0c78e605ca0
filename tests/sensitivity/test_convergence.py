"""The sensitivity fraction: vectors taken over the total projected from the standard errors."""

from __future__ import annotations

import pytest

from sensitivity import HessianConfig, measure
from sensitivity.convergence import SweepProgress, projected_vectors
from sensitivity.hessian import BlockStats
from sensitivity.intake import intake

pytestmark = pytest.mark.usefixtures("one_thread")


def _block(samples: list[float]) -> BlockStats:
    return BlockStats(samples=list(samples))


def test_projection_follows_the_stopping_rule() -> None:
    cfg = HessianConfig(max_iter=200, tol=0.05, min_iter=10, vectors_per_pass=8)
    # 4 samples, mean 1, se 0.1 = 2 tol: the rule needs about 4 * 2^2 = 16 samples
    spread = [1.0 + 0.2 * d for d in (-1.0, 1.0, -1.0, 1.0)]  # sample sd 0.2309, se 0.1155
    b = _block(spread)
    need = 4 * (b.stderr / (0.05 * b.mean)) ** 2  # 21.3 samples
    assert projected_vectors([b], 32, cfg, draw=True) == 22 * 8  # a sample is a pass of 8
    assert projected_vectors([b], 4, cfg, draw=False) == 24  # a sample is a vector: 3 passes
    assert 21 < need < 22
    # the worst block sets the total; min_iter is a floor; max_iter caps
    tight = _block([1.0, 1.001, 0.999, 1.0])
    assert projected_vectors([tight], 32, cfg, draw=True) == 10 * 8
    assert projected_vectors([tight, b], 32, cfg, draw=True) == 176
    assert projected_vectors([_block([1.0, 3.0, -1.0, 1.0])], 32, cfg, draw=True) == 200
    # unknown spread (one sample), a mean <= 0: only max_iter bounds the sweep
    assert projected_vectors([_block([1.0])], 8, cfg, draw=True) == 200
    assert projected_vectors([_block([-1.0, 1.0, -1.5])], 24, cfg, draw=True) == 200
    # converged after min_iter samples: finished, at what was done
    done = _block([1.0, 1.001] * 5)
    assert projected_vectors([done], 80, cfg, draw=True) == 80
    # pending with a projection already met (min_iter not yet): at least one more pass
    assert projected_vectors([_block([1.0, 1.001, 1.0, 1.001, 1.0])], 40, cfg,
                             draw=True) == 80
    assert projected_vectors([_block([1.0, 1.001, 1.0, 1.001, 1.0])], 76, cfg,
                             draw=True) == 84


def test_fraction_moves_forward_over_the_projected_rest() -> None:
    cfg = HessianConfig(max_iter=200, tol=0.05, min_iter=10, vectors_per_pass=8)
    finished = [_block([1.0, 1.001] * 5)]  # converged: its total is what it took (80)
    running = [_block([1.0, 1.001] * 3)]  # 6 samples: min_iter asks for 10 passes (80)
    sweep = SweepProgress()
    f = sweep.update({"gn": 80, "hvp": 48}, {"hvp": 4.0}, {"gn": finished, "hvp": running},
                     cfg, draw=True)
    assert f == pytest.approx((80 + 48 + 4) / (80 + 80))  # a steady projection: taken / total
    f2 = sweep.update({"gn": 80, "hvp": 48}, {"hvp": 8.0}, {"gn": finished, "hvp": running},
                      cfg, draw=True)
    assert f2 == pytest.approx((80 + 48 + 8) / 160)
    # the projection grows (a wide block): the fraction still moves, over the larger rest
    wide = [_block([1.0, 1.3, 0.7, 1.0, 1.2, 0.8])]  # se/mean 0.093: 6 x 3.47 -> 21 passes
    assert projected_vectors(wide, 56, cfg, draw=True) == 21 * 8
    f3 = sweep.update({"gn": 80, "hvp": 56}, {"hvp": 4.0}, {"gn": finished, "hvp": wide},
                      cfg, draw=True)
    assert f2 < f3 == pytest.approx(f2 + (1 - f2) * 4 / (80 + 168 - 136))
    # the end of a pass projected to be the last: still below 1 until the sweep reports done
    last = [_block([1.0, 1.001] * 4 + [1.0])]  # 9 samples, 72 vectors: one pass to go
    f4 = sweep.update({"gn": 80, "hvp": 72}, {"hvp": 8.0}, {"gn": finished, "hvp": last},
                      cfg, draw=True)
    assert f3 < f4 < 1.0
    # auto starts again with 'all' (the counts drop): nothing goes back
    assert sweep.update({"gn": 0, "hvp": 0}, {"hvp": 1.0}, {"gn": [], "hvp": []}, cfg,
                        draw=False) == f4


def test_progress_follows_the_projected_total_on_a_small_model(cnn_pt2, tiny_calib) -> None:
    """Drawn chunks on the digits CNN converge at a small share of max_iter: the fraction never
    goes back, ends at 1, and before the last pass it is far above the share of max_iter."""
    it = intake(cnn_pt2, tiny_calib)
    calls: list[float] = []
    cfg = HessianConfig(max_iter=400, tol=0.1, min_iter=4, vectors_per_pass=4,
                        sampling="chunk", batch_size=8, seed=1)
    res = measure(it, cfg, progress=lambda stage, f: calls.append(f))
    assert calls == sorted(calls) and calls[-1] == 1.0
    assert all(r.weight_converged for r in res.layers)
    used = res.iterations / cfg.max_iter  # the old fraction's value just before done
    assert used <= 0.25, res.iterations  # converged early (measured: 24 of 400 vectors)
    before_done = [f for f in calls if f < 1.0][-1]
    # measured 0.976 (0.06 of max_iter); 0.6 leaves room for another CPU's samples
    assert before_done >= 0.6 and before_done >= 2.4 * used
    # it moved through the sweep, not in one jump at the end: measured 16 distinct values
    assert len({round(f, 6) for f in calls if 0.1 < f < 1.0}) >= 6
